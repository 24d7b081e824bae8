use std::path::Path;
use std::process::Command;

use super::*;

use crate::ssh::test_keys::{key, KEY_A, KEY_B};

#[test]
fn plain_entry_with_port_is_trusted() {
    let hosts = KnownHosts::parse(&format!("[10.0.0.1]:2222 {KEY_A}\n"), "kh");
    assert_eq!(
        hosts.verify(&host_name("10.0.0.1", 2222), &key(KEY_A)),
        Verdict::Trusted
    );
    assert_eq!(
        hosts.verify(&host_name("10.0.0.1", 22), &key(KEY_A)),
        Verdict::Unknown
    );
}

#[test]
fn different_key_of_same_type_is_changed() {
    let hosts = KnownHosts::parse(&format!("edge1,edge1.lan {KEY_A}\n"), "kh");
    assert_eq!(
        hosts.verify("edge1.lan", &key(KEY_B)),
        Verdict::Changed {
            entry: "kh:1".into()
        }
    );
}

#[test]
fn revoked_key_is_rejected_even_if_listed() {
    let text = format!("edge1 {KEY_A}\n@revoked * {KEY_A}\n");
    let hosts = KnownHosts::parse(&text, "kh");
    assert_eq!(
        hosts.verify("edge1", &key(KEY_A)),
        Verdict::Revoked {
            entry: "kh:2".into()
        }
    );
}

#[test]
fn hashed_entry_matches() {
    let line = format_hashed_line("edge1", &key(KEY_A), &[7u8; 20]);
    let hosts = KnownHosts::parse(&line, "kh");
    assert!(hosts.uses_hashing());
    assert_eq!(hosts.verify("edge1", &key(KEY_A)), Verdict::Trusted);
    assert_eq!(hosts.verify("edge2", &key(KEY_A)), Verdict::Unknown);
}

#[test]
fn hashed_line_matches_ssh_keygen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("known_hosts");
    std::fs::write(&path, format!("[edge1]:2222 {KEY_A}\n")).unwrap();
    let status = Command::new("ssh-keygen")
        .args(["-q", "-H", "-f"])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    let hosts = KnownHosts::load(&path).unwrap();
    assert!(hosts.uses_hashing());
    assert_eq!(
        hosts.verify(&host_name("edge1", 2222), &key(KEY_A)),
        Verdict::Trusted
    );
    let ours = format_hashed_line("[edge1]:2222", &key(KEY_A), &[9u8; 20]);
    std::fs::write(&path, format!("{ours}\n")).unwrap();
    let found = Command::new("ssh-keygen")
        .args(["-F", "[edge1]:2222", "-f"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "ssh-keygen -F finds our hashed line"
    );
}

#[test]
fn wildcards_and_negation() {
    let hosts = KnownHosts::parse(&format!("*.plant-a.lan,!bad.plant-a.lan {KEY_A}\n"), "kh");
    assert_eq!(
        hosts.verify("e1.plant-a.lan", &key(KEY_A)),
        Verdict::Trusted
    );
    assert_eq!(
        hosts.verify("bad.plant-a.lan", &key(KEY_A)),
        Verdict::Unknown
    );
}

#[test]
fn comments_garbage_and_unknown_markers_are_skipped() {
    let text = format!("# c\nnot a key line\n@future edge1 {KEY_B}\nedge1 {KEY_A}\n");
    let hosts = KnownHosts::parse(&text, "kh");
    assert_eq!(hosts.verify("edge1", &key(KEY_A)), Verdict::Trusted);
    assert_eq!(
        hosts.verify("edge1", &key(KEY_B)),
        Verdict::Changed {
            entry: "kh:4".into()
        }
    );
}

#[test]
fn format_line_omits_comment() {
    let mut commented = key(KEY_A);
    commented.set_comment("root@edge1");
    assert_eq!(
        format_line("[h]:2222", &commented),
        format!("[h]:2222 {KEY_A}")
    );
}

/// A CA and a host key certified by it, made with the real ssh-keygen.
struct Signed {
    _dir: tempfile::TempDir,
    ca: String,
    certificate: Certificate,
}

fn sign_host_key(extra: &[&str]) -> Signed {
    let dir = tempfile::tempdir().unwrap();
    let keygen = |args: &[&str], cwd: &Path| {
        let output = Command::new("ssh-keygen")
            .args(args)
            .current_dir(cwd)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    keygen(&["-q", "-t", "ed25519", "-N", "", "-f", "ca"], dir.path());
    keygen(&["-q", "-t", "ed25519", "-N", "", "-f", "host"], dir.path());
    let mut args = vec!["-q", "-s", "ca", "-I", "edge1-host"];
    args.extend_from_slice(extra);
    args.push("host.pub");
    keygen(&args, dir.path());
    let ca = std::fs::read_to_string(dir.path().join("ca.pub")).unwrap();
    let certificate = Certificate::from_openssh(
        &std::fs::read_to_string(dir.path().join("host-cert.pub")).unwrap(),
    )
    .unwrap();
    Signed {
        _dir: dir,
        ca: ca.trim().to_owned(),
        certificate,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn certificate_from_listed_authority_is_trusted() {
    let signed = sign_host_key(&["-h", "-n", "edge1,*.plant-a.lan"]);
    let text = format!("@cert-authority [edge*]:*,*.plant-a.lan {}\n", signed.ca);
    let hosts = KnownHosts::parse(&text, "kh");
    assert!(hosts.has_authority_for("[edge1]:2222"));
    assert!(!hosts.has_authority_for("other"));
    assert_eq!(
        hosts.verify_certificate("[edge1]:2222", "edge1", &signed.certificate, now()),
        CertVerdict::Trusted {
            entry: "kh:1".into()
        }
    );
    assert_eq!(
        hosts.verify_certificate(
            "e7.plant-a.lan",
            "e7.plant-a.lan",
            &signed.certificate,
            now()
        ),
        CertVerdict::Trusted {
            entry: "kh:1".into()
        },
        "principals are patterns"
    );
}

#[test]
fn certificate_without_listed_authority_falls_back() {
    let signed = sign_host_key(&["-h", "-n", "edge1"]);
    let hosts = KnownHosts::parse(&format!("@cert-authority other {}\n", signed.ca), "kh");
    assert_eq!(
        hosts.verify_certificate("edge1", "edge1", &signed.certificate, now()),
        CertVerdict::NoAuthority
    );
    let plain_key_only = KnownHosts::parse(&format!("edge1 {KEY_A}\n"), "kh");
    assert_eq!(
        plain_key_only.verify_certificate("edge1", "edge1", &signed.certificate, now()),
        CertVerdict::NoAuthority,
        "a plain key line is no authority"
    );
}

#[test]
fn certificate_problems_are_named() {
    let cases: [(&[&str], &str, &str); 3] = [
        (&["-h", "-n", "edge2"], "edge1", "not among its principals"),
        (&["-n", "edge1"], "edge1", "user certificate"),
        (&["-h", "-n", "edge1", "-V", "-2d:-1d"], "edge1", "expired"),
    ];
    for (args, principal, expected) in cases {
        let signed = sign_host_key(args);
        let hosts = KnownHosts::parse(&format!("@cert-authority * {}\n", signed.ca), "kh");
        match hosts.verify_certificate("edge1", principal, &signed.certificate, now()) {
            CertVerdict::Invalid { entry, reason } => {
                assert_eq!(entry, "kh:1");
                assert!(reason.contains(expected), "{args:?}: {reason}");
            }
            other => panic!("{args:?}: expected Invalid, got {other:?}"),
        }
    }
}

#[test]
fn revoked_authority_rejects_its_certificates() {
    let signed = sign_host_key(&["-h", "-n", "edge1"]);
    let text = format!("@cert-authority * {ca}\n@revoked * {ca}\n", ca = signed.ca);
    let hosts = KnownHosts::parse(&text, "kh");
    assert_eq!(
        hosts.verify_certificate("edge1", "edge1", &signed.certificate, now()),
        CertVerdict::Revoked {
            entry: "kh:2".into()
        }
    );
}

#[test]
fn exact_names_match_case_insensitively() {
    let hosts = KnownHosts::parse(&format!("EDGE1,[Edge2]:2222 {KEY_A}\n"), "kh");
    assert_eq!(hosts.verify("edge1", &key(KEY_A)), Verdict::Trusted);
    assert_eq!(
        hosts.verify(&host_name("edge2", 2222), &key(KEY_A)),
        Verdict::Trusted
    );
    assert_eq!(hosts.verify("edge3", &key(KEY_A)), Verdict::Unknown);
}

#[test]
fn verdict_names_first_line_across_index_and_scan() {
    // Line 1 is matched by wildcard, line 2 by exact name; both list another key.
    let changed = Verdict::Changed {
        entry: "kh:1".into(),
    };
    let hosts = KnownHosts::parse(&format!("*.lan {KEY_B}\nedge1.lan {KEY_B}\n"), "kh");
    assert_eq!(hosts.verify("edge1.lan", &key(KEY_A)), changed);
    let reversed = KnownHosts::parse(&format!("edge1.lan {KEY_B}\n*.lan {KEY_B}\n"), "kh");
    assert_eq!(reversed.verify("edge1.lan", &key(KEY_A)), changed);
}

#[test]
fn negation_vetoes_an_exact_name() {
    let hosts = KnownHosts::parse(&format!("edge1,!edge1 {KEY_A}\n"), "kh");
    assert_eq!(hosts.verify("edge1", &key(KEY_A)), Verdict::Unknown);
}

#[test]
fn fleet_sized_file_finds_each_host() {
    let mut text = String::new();
    for port in 20000..22000 {
        text.push_str(&format!("[127.0.0.1]:{port} {KEY_B}\n"));
    }
    text.push_str(&format!("[127.0.0.1]:23000 {KEY_A}\n"));
    let hosts = KnownHosts::parse(&text, "kh");
    let at = |port| host_name("127.0.0.1", port);
    assert_eq!(hosts.verify(&at(21999), &key(KEY_B)), Verdict::Trusted);
    assert_eq!(hosts.verify(&at(23000), &key(KEY_A)), Verdict::Trusted);
    assert_eq!(
        hosts.verify(&at(20500), &key(KEY_A)),
        Verdict::Changed {
            entry: "kh:501".into()
        }
    );
    assert_eq!(hosts.verify(&at(24000), &key(KEY_A)), Verdict::Unknown);
}
