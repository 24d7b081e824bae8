//! Table-driven cases for the effective configuration and the planned change, plus a
//! property test that converging twice equals converging once.

use proptest::prelude::*;

use super::*;
use crate::k3s::unit::parse_systemctl_cat;

const ARC: &str = "https://eastus.oic.prod-arc.azure.com/tenant-1/cluster-1/";
const DEFAULT: &str = "https://kubernetes.default.svc.cluster.local";
const MAIN: &str = "/etc/rancher/k3s/config.yaml";
const DIR: &str = "/etc/rancher/k3s/config.yaml.d";

fn unit_with(flags: &[&str]) -> Unit {
    let mut text = String::from(
        "# /etc/systemd/system/k3s.service\n[Service]\nType=notify\nExecStart=/usr/local/bin/k3s \\\n    server",
    );
    for flag in flags {
        text.push_str(&format!(" \\\n    '{flag}'"));
    }
    text.push('\n');
    parse_systemctl_cat(&text, "k3s")
}

/// A node layout for one case.
#[derive(Clone, Debug)]
struct Layout {
    main: Option<&'static str>,
    dropins: Vec<(&'static str, &'static str)>,
    flags: Vec<&'static str>,
    env: Vec<(&'static str, &'static str)>,
}

impl Layout {
    fn files(&self) -> NodeFiles {
        let unit = unit_with(&self.flags);
        let environment: Vec<(String, String)> = self
            .env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let probe = NodeFiles {
            unit: unit.clone(),
            environment: environment.clone(),
            ..NodeFiles::default()
        };
        let config_path = probe.config_path();
        NodeFiles {
            unit,
            environment,
            main: self.main.map(|text| ConfigFile {
                path: config_path.clone(),
                text: text.to_owned(),
            }),
            dropins: self
                .dropins
                .iter()
                .map(|(name, text)| ConfigFile {
                    path: format!("{config_path}.d/{name}"),
                    text: (*text).to_owned(),
                })
                .collect(),
        }
    }
}

fn layout(main: Option<&'static str>) -> Layout {
    Layout {
        main,
        dropins: Vec::new(),
        flags: Vec::new(),
        env: Vec::new(),
    }
}

fn target(keep: bool) -> Target {
    Target {
        issuer: ARC.to_owned(),
        keep_previous_issuers: keep,
        max_token_expiration: "24h".to_owned(),
    }
}

/// Expected outcome of one case.
#[derive(Debug)]
enum Expect {
    Configured,
    Change(&'static [&'static str]),
    Blocked(&'static str),
    Error(&'static str),
}

fn check(name: &str, layout: &Layout, keep: bool, expect: Expect) {
    let files = layout.files();
    let result = files.plan(&target(keep));
    match (expect, result) {
        (Expect::Configured, Ok(plan)) => {
            assert_eq!(plan.decision, Decision::Configured, "{name}: {plan:#?}");
            assert_eq!(plan.new_dropin, plan.current_dropin, "{name}");
        }
        (Expect::Change(issuers), Ok(plan)) => {
            assert_eq!(plan.decision, Decision::Change, "{name}: {plan:#?}");
            assert_eq!(plan.after.issuer_list(), issuers, "{name}");
            let expiration = plan
                .after
                .max_token_expiration
                .as_ref()
                .map(|v| v.value.as_str());
            assert!(
                expiration.and_then(parse_go_duration) == Some(Duration::from_secs(86_400)),
                "{name}: expiration {expiration:?}"
            );
        }
        (Expect::Blocked(fragment), Ok(plan)) => match &plan.decision {
            Decision::Blocked(reason) => assert!(reason.contains(fragment), "{name}: {reason}"),
            other => panic!("{name}: expected blocked, got {other:?}\n{plan:#?}"),
        },
        (Expect::Error(fragment), Err(error)) => {
            assert!(error.to_string().contains(fragment), "{name}: {error}")
        }
        (expect, result) => panic!("{name}: expected {expect:?}, got {result:#?}"),
    }
}

const OURS_KEEP: &str = "kube-apiserver-arg+:\n  - \"service-account-issuer-=https://eastus.oic.prod-arc.azure.com/tenant-1/cluster-1/\"\n  - \"service-account-max-token-expiration=24h\"\n";

#[test]
fn table() {
    let cases: Vec<(&str, Layout, bool, Expect)> = vec![
        ("no config at all", layout(None), true, Expect::Change(&[ARC, DEFAULT])),
        ("empty main file", layout(Some("")), true, Expect::Change(&[ARC, DEFAULT])),
        (
            "main file with other settings",
            layout(Some("write-kubeconfig-mode: \"0640\"\ntls-san:\n  - edge.example\n")),
            true,
            Expect::Change(&[ARC, DEFAULT]),
        ),
        (
            "other apiserver args are kept",
            layout(Some("kube-apiserver-arg:\n  - audit-log-maxage=30\n")),
            true,
            Expect::Change(&[ARC, DEFAULT]),
        ),
        (
            "cluster domain changes the default issuer",
            layout(Some("cluster-domain: plant.internal\n")),
            true,
            Expect::Change(&[ARC, "https://kubernetes.default.svc.plant.internal"]),
        ),
        (
            "cluster domain from ExecStart wins",
            Layout {
                flags: vec!["--cluster-domain=edge.lan"],
                ..layout(Some("cluster-domain: plant.internal\n"))
            },
            true,
            Expect::Change(&[ARC, "https://kubernetes.default.svc.edge.lan"]),
        ),
        (
            "duplicate cluster-domain key, last wins",
            layout(Some("cluster-domain: a.local\ncluster-domain: b.local\n")),
            true,
            Expect::Change(&[ARC, "https://kubernetes.default.svc.b.local"]),
        ),
        (
            "drop the previous issuer",
            layout(Some("")),
            false,
            Expect::Change(&[ARC]),
        ),
        (
            "already converged by arcfleet",
            Layout {
                dropins: vec![(DROPIN_NAME, OURS_KEEP)],
                ..layout(Some(""))
            },
            true,
            Expect::Configured,
        ),
        (
            "configured by hand in config.yaml",
            layout(Some(
                "kube-apiserver-arg:\n  - service-account-issuer=https://eastus.oic.prod-arc.azure.com/tenant-1/cluster-1/\n  - service-account-issuer=https://kubernetes.default.svc.cluster.local\n  - service-account-max-token-expiration=24h0m0s\n",
            )),
            true,
            Expect::Configured,
        ),
        (
            "hand-set issuer, only expiration missing",
            layout(Some(
                "kube-apiserver-arg:\n  - service-account-issuer=https://eastus.oic.prod-arc.azure.com/tenant-1/cluster-1/\n",
            )),
            true,
            Expect::Change(&[ARC]),
        ),
        (
            "wrong issuer in config.yaml is kept second",
            layout(Some("kube-apiserver-arg:\n  - service-account-issuer=https://old.example/\n")),
            true,
            Expect::Change(&[ARC, "https://old.example/"]),
        ),
        (
            "wrong issuer in config.yaml blocks dropping previous",
            layout(Some("kube-apiserver-arg:\n  - service-account-issuer=https://old.example/\n")),
            false,
            Expect::Blocked("config.yaml:2"),
        ),
        (
            "arc issuer present but second",
            layout(Some(
                "kube-apiserver-arg:\n  - service-account-issuer=https://old.example/\n  - service-account-issuer=https://eastus.oic.prod-arc.azure.com/tenant-1/cluster-1/\n",
            )),
            true,
            Expect::Blocked("twice"),
        ),
        (
            "issuer in ExecStart stays accepted",
            Layout {
                flags: vec!["--kube-apiserver-arg=service-account-issuer=https://unit.example/"],
                ..layout(Some(""))
            },
            true,
            Expect::Change(&[ARC, "https://unit.example/"]),
        ),
        (
            "issuer in ExecStart in two-word form",
            Layout {
                flags: vec!["--kube-apiserver-arg", "service-account-issuer=https://unit.example/"],
                ..layout(None)
            },
            true,
            Expect::Change(&[ARC, "https://unit.example/"]),
        ),
        (
            "prepended issuer in ExecStart blocks",
            Layout {
                flags: vec!["--kube-apiserver-arg=service-account-issuer-=https://unit.example/"],
                ..layout(Some(""))
            },
            true,
            Expect::Blocked("/etc/systemd/system/k3s.service"),
        ),
        (
            "expiration in ExecStart overrides",
            Layout {
                flags: vec!["--kube-apiserver-arg=service-account-max-token-expiration=48h"],
                ..layout(Some(""))
            },
            true,
            Expect::Blocked("48h"),
        ),
        (
            "later drop-in without plus replaces ours",
            Layout {
                dropins: vec![("zzz-site.yaml", "kube-apiserver-arg:\n  - audit-log-maxage=7\n")],
                ..layout(Some(""))
            },
            true,
            Expect::Blocked("zzz-site.yaml:1"),
        ),
        (
            "later drop-in with plus is fine",
            Layout {
                dropins: vec![("zzz-site.yaml", "kube-apiserver-arg+:\n  - audit-log-maxage=7\n")],
                ..layout(Some(""))
            },
            true,
            Expect::Change(&[ARC, DEFAULT]),
        ),
        (
            "earlier drop-in without plus is fine",
            Layout {
                dropins: vec![("10-site.yaml", "kube-apiserver-arg:\n  - audit-log-maxage=7\n")],
                ..layout(Some("kube-apiserver-arg:\n  - profiling=false\n"))
            },
            true,
            Expect::Change(&[ARC, DEFAULT]),
        ),
        (
            "main file missing, only drop-ins",
            Layout {
                dropins: vec![("10-site.yaml", "cluster-domain: site.local\n")],
                ..layout(None)
            },
            true,
            Expect::Change(&[ARC, "https://kubernetes.default.svc.site.local"]),
        ),
        (
            "non-yaml files in drop-in dir are ignored",
            Layout {
                dropins: vec![("zzz.yaml.bak", "kube-apiserver-arg:\n  - x=1\n")],
                ..layout(Some(""))
            },
            true,
            Expect::Change(&[ARC, DEFAULT]),
        ),
        (
            "upper-case YML suffix is read",
            Layout {
                dropins: vec![("zzz.YML", "kube-apiserver-arg:\n  - x=1\n")],
                ..layout(Some(""))
            },
            true,
            Expect::Blocked("zzz.YML:1"),
        ),
        (
            "scalar apiserver arg is one item",
            layout(Some("kube-apiserver-arg: service-account-issuer=https://old.example/\n")),
            true,
            Expect::Change(&[ARC, "https://old.example/"]),
        ),
        (
            "duplicate apiserver-arg key in one file, last wins",
            layout(Some(
                "kube-apiserver-arg:\n  - service-account-issuer=https://a.example/\nkube-apiserver-arg:\n  - profiling=false\n",
            )),
            true,
            Expect::Change(&[ARC, DEFAULT]),
        ),
        (
            "plus within one file appends",
            layout(Some(
                "kube-apiserver-arg:\n  - profiling=false\nkube-apiserver-arg+:\n  - service-account-issuer=https://a.example/\n",
            )),
            true,
            Expect::Change(&[ARC, "https://a.example/"]),
        ),
        (
            "issuer appended after default with +=",
            layout(Some("kube-apiserver-arg:\n  - service-account-issuer+=https://a.example/\n")),
            true,
            Expect::Change(&[ARC, DEFAULT, "https://a.example/"]),
        ),
        (
            "config file moved with --config",
            Layout {
                flags: vec!["--config=/opt/k3s/server.yaml"],
                dropins: vec![("10-a.yaml", "cluster-domain: moved.local\n")],
                ..layout(Some(""))
            },
            true,
            Expect::Change(&[ARC, "https://kubernetes.default.svc.moved.local"]),
        ),
        (
            "config file moved with K3S_CONFIG_FILE",
            Layout {
                env: vec![("K3S_CONFIG_FILE", "/srv/k3s.yaml")],
                ..layout(Some("cluster-domain: env.local\n"))
            },
            true,
            Expect::Change(&[ARC, "https://kubernetes.default.svc.env.local"]),
        ),
        (
            "invalid YAML in config.yaml",
            layout(Some("kube-apiserver-arg: [a\n")),
            true,
            Expect::Error("config.yaml:"),
        ),
        (
            "invalid YAML in a drop-in",
            Layout {
                dropins: vec![("10-bad.yaml", "a: b: c\n")],
                ..layout(Some(""))
            },
            true,
            Expect::Error("10-bad.yaml:"),
        ),
        (
            "expiration set elsewhere to an equal value",
            layout(Some("kube-apiserver-arg:\n  - service-account-max-token-expiration=1440m\n")),
            true,
            Expect::Change(&[ARC, DEFAULT]),
        ),
        (
            "expiration set elsewhere to another value is overridden by ours",
            layout(Some("kube-apiserver-arg:\n  - service-account-max-token-expiration=48h\n")),
            true,
            Expect::Change(&[ARC, DEFAULT]),
        ),
        (
            "earlier Arc issuer in our drop-in stays accepted",
            Layout {
                dropins: vec![(
                    DROPIN_NAME,
                    "kube-apiserver-arg+:\n  - \"service-account-issuer-=https://stale.example/\"\n",
                )],
                ..layout(Some(""))
            },
            true,
            Expect::Change(&[ARC, "https://stale.example/", DEFAULT]),
        ),
        (
            "earlier Arc issuer is dropped with keep_previous_issuers false",
            Layout {
                dropins: vec![(
                    DROPIN_NAME,
                    "kube-apiserver-arg+:\n  - \"service-account-issuer-=https://stale.example/\"\n",
                )],
                ..layout(Some(""))
            },
            false,
            Expect::Change(&[ARC]),
        ),
    ];
    assert!(cases.len() >= 30, "{} cases", cases.len());
    for (name, layout, keep, expect) in cases {
        check(name, &layout, keep, expect);
    }
}

#[test]
fn dropin_path_follows_config_path() {
    let files = Layout {
        flags: vec!["--config", "/opt/k3s/server.yaml"],
        ..layout(None)
    }
    .files();
    assert_eq!(
        files.dropin_path(),
        format!("/opt/k3s/server.yaml.d/{DROPIN_NAME}")
    );
    assert_eq!(
        layout(None).files().dropin_path(),
        format!("{DIR}/{DROPIN_NAME}")
    );
}

#[test]
fn invalid_expiration_is_rejected() {
    let mut bad = target(true);
    bad.max_token_expiration = "1d".to_owned();
    let error = layout(None).files().plan(&bad).unwrap_err();
    assert!(error.to_string().contains("`1d`"), "{error}");
}

#[test]
fn main_path_constant_matches_default() {
    assert_eq!(layout(None).files().config_path(), MAIN);
}

/// Fragments the property test combines into node layouts.
const MAIN_FRAGMENTS: &[&str] = &[
    "",
    "write-kubeconfig-mode: \"0640\"\n",
    "kube-apiserver-arg:\n  - audit-log-maxage=30\n",
    "kube-apiserver-arg:\n  - service-account-issuer=https://old.example/\n",
    "kube-apiserver-arg: service-account-issuer+=https://extra.example/\n",
    "cluster-domain: plant.internal\n",
    "kube-apiserver-arg:\n  - service-account-max-token-expiration=48h\n",
];

const DROPIN_FRAGMENTS: &[(&str, &str)] = &[
    (
        "10-site.yaml",
        "kube-apiserver-arg+:\n  - profiling=false\n",
    ),
    ("20-domain.yml", "cluster-domain: site.local\n"),
    ("50-tls.yaml", "tls-san:\n  - a.example\n"),
    (
        "90-issuer.yaml",
        "kube-apiserver-arg+:\n  - service-account-issuer=https://site.example/\n",
    ),
    ("notes.txt", "kube-apiserver-arg: [broken\n"),
];

proptest! {
    #[test]
    fn converging_twice_equals_once(
        main in proptest::option::of(0..MAIN_FRAGMENTS.len()),
        dropins in proptest::sample::subsequence((0..DROPIN_FRAGMENTS.len()).collect::<Vec<_>>(), 0..=DROPIN_FRAGMENTS.len()),
        keep in any::<bool>(),
    ) {
        let layout = Layout {
            main: main.map(|i| MAIN_FRAGMENTS[i]),
            dropins: dropins.iter().map(|&i| DROPIN_FRAGMENTS[i]).collect(),
            flags: Vec::new(),
            env: Vec::new(),
        };
        let mut files = layout.files();
        let first = files.plan(&target(keep)).unwrap();
        if first.decision == Decision::Change {
            let path = first.dropin_path.clone();
            files.dropins.retain(|file| file.path != path);
            if let Some(text) = &first.new_dropin {
                files.dropins.push(ConfigFile { path, text: text.clone() });
            }
            let second = files.plan(&target(keep)).unwrap();
            prop_assert_eq!(&second.decision, &Decision::Configured);
            prop_assert_eq!(&second.new_dropin, &first.new_dropin);
            prop_assert_eq!(second.before.issuer_list(), first.after.issuer_list());
        }
    }
}

#[test]
fn new_arc_issuer_converges_once() {
    let stale = "kube-apiserver-arg+:\n  - \"service-account-issuer-=https://stale.example/\"\n";
    let mut files = Layout {
        dropins: vec![(DROPIN_NAME, stale)],
        ..layout(Some(""))
    }
    .files();
    let first = files.plan(&target(true)).unwrap();
    assert_eq!(first.decision, Decision::Change);
    let path = first.dropin_path.clone();
    files.dropins.retain(|file| file.path != path);
    files.dropins.push(ConfigFile {
        path,
        text: first.new_dropin.clone().unwrap(),
    });
    let second = files.plan(&target(true)).unwrap();
    assert_eq!(second.decision, Decision::Configured, "{second:#?}");
    assert_eq!(
        second.before.issuer_list(),
        vec![ARC, "https://stale.example/", DEFAULT]
    );
}
