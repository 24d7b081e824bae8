//! Strict host-key verification against an OpenSSH `known_hosts` file.
//!
//! Supported entry forms, as `sshd(8)`'s SSH_KNOWN_HOSTS FILE FORMAT describes them:
//! plain and hashed (`|1|salt|hash`) host names, `[host]:port` for ports other than 22,
//! comma-separated patterns with `*`, `?` and `!` negation, several key types per host, and
//! the `@revoked` marker. `@cert-authority` lines are read but host certificates are not
//! accepted yet, so such hosts count as unknown.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use russh::keys::ssh_key::{HashAlg, PublicKey};
use sha1::Sha1;

/// The outcome of looking a host key up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A line lists this key for the host.
    Trusted,
    /// The host is listed with another key of the same type: the key changed.
    Changed {
        /// `file:line` of the entry with the expected key.
        entry: String,
    },
    /// The key is marked `@revoked`.
    Revoked {
        /// `file:line` of the `@revoked` entry.
        entry: String,
    },
    /// The host has no key of this type in the file.
    Unknown,
}

#[derive(Debug, PartialEq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

/// A parsed known_hosts file.
#[derive(Debug, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
    path: String,
}

#[derive(Debug)]
struct Entry {
    marker: Marker,
    patterns: String,
    key: PublicKey,
    line: usize,
}

impl KnownHosts {
    /// Reads a known_hosts file; a missing file is an empty one. Lines that do not parse
    /// are skipped, as OpenSSH does.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(error),
        };
        Ok(Self::parse(&text, &path.display().to_string()))
    }

    /// Parses known_hosts text; `path` names the file in verdicts.
    pub fn parse(text: &str, path: &str) -> Self {
        let entries = text
            .lines()
            .enumerate()
            .filter_map(|(index, line)| parse_line(line, index + 1))
            .collect();
        KnownHosts {
            entries,
            path: path.to_owned(),
        }
    }

    /// Returns the file the entries came from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Looks up `key` for `host` on `port`.
    pub fn verify(&self, host: &str, port: u16, key: &PublicKey) -> Verdict {
        let name = host_name(host, port);
        let matching = || {
            self.entries
                .iter()
                .filter(|entry| host_matches(&entry.patterns, &name))
        };
        let same_key = |entry: &Entry| entry.key.key_data() == key.key_data();
        let at = |entry: &Entry| format!("{}:{}", self.path, entry.line);

        if let Some(entry) = matching().find(|e| e.marker == Marker::Revoked && same_key(e)) {
            return Verdict::Revoked { entry: at(entry) };
        }
        let plain = || matching().filter(|e| e.marker == Marker::None);
        if plain().any(same_key) {
            return Verdict::Trusted;
        }
        if let Some(entry) = plain().find(|e| e.key.algorithm() == key.algorithm()) {
            return Verdict::Changed { entry: at(entry) };
        }
        Verdict::Unknown
    }
}

/// Returns the name a host is recorded under: `host`, or `[host]:port` off port 22.
pub fn host_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Returns the key's SHA-256 fingerprint as OpenSSH prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Formats a known_hosts line for a key, for messages that tell the user what to add.
pub fn format_line(host: &str, port: u16, key: &PublicKey) -> String {
    let mut key = key.clone();
    key.set_comment("");
    let encoded = key.to_openssh().unwrap_or_default();
    format!("{} {}", host_name(host, port), encoded.trim())
}

fn parse_line(line: &str, number: usize) -> Option<Entry> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut fields = line.split_whitespace();
    let mut first = fields.next()?;
    let marker = match first {
        "@revoked" => Marker::Revoked,
        "@cert-authority" => Marker::CertAuthority,
        _ => Marker::None,
    };
    if marker != Marker::None {
        first = fields.next()?;
    }
    let key_type = fields.next()?;
    let key_base64 = fields.next()?;
    let key = PublicKey::from_openssh(&format!("{key_type} {key_base64}")).ok()?;
    Some(Entry {
        marker,
        patterns: first.to_owned(),
        key,
        line: number,
    })
}

/// Matches a host name against a comma-separated pattern list or a hashed entry.
fn host_matches(patterns: &str, name: &str) -> bool {
    if let Some(hashed) = patterns.strip_prefix("|1|") {
        return hashed_matches(hashed, name);
    }
    let mut matched = false;
    for pattern in patterns.split(',') {
        if let Some(negated) = pattern.strip_prefix('!') {
            if wildcard_matches(&negated.to_ascii_lowercase(), &name.to_ascii_lowercase()) {
                return false;
            }
        } else if wildcard_matches(&pattern.to_ascii_lowercase(), &name.to_ascii_lowercase()) {
            matched = true;
        }
    }
    matched
}

fn hashed_matches(hashed: &str, name: &str) -> bool {
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (STANDARD.decode(salt), STANDARD.decode(hash)) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

/// Glob matching with `*` (any run) and `?` (one character), as in ssh_config patterns.
fn wildcard_matches(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            backtrack = Some((p, t));
            p += 1;
        } else if let Some((star, matched)) = backtrack {
            p = star + 1;
            t = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    const KEY_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEg4Zmrf1SE8Qp3pAvGQvTzdHVTXvUlIfRbsHXt6FDRi";

    fn key(text: &str) -> PublicKey {
        PublicKey::from_openssh(text).unwrap()
    }

    #[test]
    fn plain_entry_with_port_is_trusted() {
        let hosts = KnownHosts::parse(&format!("[10.0.0.1]:2222 {KEY_A}\n"), "kh");
        assert_eq!(
            hosts.verify("10.0.0.1", 2222, &key(KEY_A)),
            Verdict::Trusted
        );
        assert_eq!(hosts.verify("10.0.0.1", 22, &key(KEY_A)), Verdict::Unknown);
    }

    #[test]
    fn different_key_of_same_type_is_changed() {
        let hosts = KnownHosts::parse(&format!("edge1,edge1.lan {KEY_A}\n"), "kh");
        assert_eq!(
            hosts.verify("edge1.lan", 22, &key(KEY_B)),
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
            hosts.verify("edge1", 22, &key(KEY_A)),
            Verdict::Revoked {
                entry: "kh:2".into()
            }
        );
    }

    #[test]
    fn hashed_entry_matches() {
        // Made with: ssh-keygen -H on a file holding "edge1 KEY_A".
        let salt = [7u8; 20];
        let mut mac = Hmac::<Sha1>::new_from_slice(&salt).unwrap();
        mac.update(b"edge1");
        let hash = mac.finalize().into_bytes();
        let line = format!(
            "|1|{}|{} {KEY_A}\n",
            STANDARD.encode(salt),
            STANDARD.encode(hash)
        );
        let hosts = KnownHosts::parse(&line, "kh");
        assert_eq!(hosts.verify("edge1", 22, &key(KEY_A)), Verdict::Trusted);
        assert_eq!(hosts.verify("edge2", 22, &key(KEY_A)), Verdict::Unknown);
    }

    #[test]
    fn wildcards_and_negation() {
        let hosts = KnownHosts::parse(&format!("*.plant-a.lan,!bad.plant-a.lan {KEY_A}\n"), "kh");
        assert_eq!(
            hosts.verify("e1.plant-a.lan", 22, &key(KEY_A)),
            Verdict::Trusted
        );
        assert_eq!(
            hosts.verify("bad.plant-a.lan", 22, &key(KEY_A)),
            Verdict::Unknown
        );
    }

    #[test]
    fn comments_and_garbage_are_skipped() {
        let hosts = KnownHosts::parse(&format!("# c\nnot a key line\nedge1 {KEY_A}\n"), "kh");
        assert_eq!(hosts.verify("edge1", 22, &key(KEY_A)), Verdict::Trusted);
    }

    #[test]
    fn glob_matching() {
        assert!(wildcard_matches("a*c", "abbbc"));
        assert!(wildcard_matches("a?c", "abc"));
        assert!(!wildcard_matches("a?c", "abbc"));
        assert!(wildcard_matches("*", ""));
    }
}
