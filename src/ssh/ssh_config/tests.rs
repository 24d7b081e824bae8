use super::*;

fn parse(text: &str) -> (SshConfig, Vec<String>) {
    SshConfig::parse(text, Path::new("config")).unwrap()
}

fn parse_error(text: &str) -> String {
    SshConfig::parse(text, Path::new("config"))
        .unwrap_err()
        .to_string()
}

const FLEET: &str = "\
# Plant A
Host edge-* !edge-99
    User ops
    Port 2222
    IdentityFile ~/.ssh/plant_a
    IdentityFile ~/.ssh/%h_%r
    ProxyJump jump@bastion.plant-a:22

Host edge-01
    HostName 10.20.1.11
    User root

Host bastion.plant-a
    User jump
    IdentitiesOnly yes

Host *
    User fallback
    ServerAliveInterval 10
    ServerAliveCountMax 4
    ConnectTimeout 1m
    StrictHostKeyChecking accept-new
    UserKnownHostsFile ~/.ssh/known_hosts ~/.ssh/known_hosts2
";

#[test]
fn first_value_wins_per_keyword() {
    let (config, warnings) = parse(FLEET);
    assert!(warnings.is_empty(), "{warnings:?}");
    let edge = config.lookup("edge-01");
    let user = edge.user.unwrap();
    assert_eq!(user.value, "ops", "the edge-* block comes first");
    assert_eq!(user.origin.line, 3);
    assert_eq!(edge.port.unwrap().value, 2222);
    assert_eq!(edge.hostname.unwrap().value, "10.20.1.11");
    assert_eq!(
        edge.server_alive_interval.unwrap().value,
        Duration::from_secs(10)
    );
    assert_eq!(edge.server_alive_count_max.unwrap().value, 4);
    assert_eq!(edge.connect_timeout.unwrap().value, Duration::from_secs(60));
    assert_eq!(
        edge.strict_host_key_checking.unwrap().value,
        StrictHostKeyChecking::AcceptNew
    );
    assert_eq!(
        edge.user_known_hosts_files.unwrap().value,
        ["~/.ssh/known_hosts", "~/.ssh/known_hosts2"]
    );
}

#[test]
fn identity_files_accumulate() {
    let (config, _) = parse(FLEET);
    let files: Vec<String> = config
        .lookup("edge-07")
        .identity_files
        .into_iter()
        .map(|s| s.value)
        .collect();
    assert_eq!(files, ["~/.ssh/plant_a", "~/.ssh/%h_%r"]);
}

#[test]
fn negated_pattern_skips_block() {
    let (config, _) = parse(FLEET);
    let excluded = config.lookup("edge-99");
    assert_eq!(excluded.user.unwrap().value, "fallback");
    assert!(excluded.proxy.is_none());
    assert!(excluded.identity_files.is_empty());
}

#[test]
fn proxy_jump_hops_are_parsed() {
    let (config, _) = parse(FLEET);
    let proxy = config.lookup("edge-02").proxy.unwrap();
    assert_eq!(
        proxy.value,
        Proxy::Jump(vec![JumpHost {
            user: Some("jump".into()),
            host: "bastion.plant-a".into(),
            port: Some(22)
        }])
    );
    assert_eq!(proxy.origin.line, 7);
}

#[test]
fn lines_before_first_host_apply_everywhere() {
    let (config, _) = parse("User early\nHost a\n  User late\n");
    assert_eq!(config.lookup("a").user.unwrap().value, "early");
    assert_eq!(config.lookup("b").user.unwrap().value, "early");
}

#[test]
fn hostname_expands_percent_h() {
    let (config, _) = parse("Host *.lan\n  HostName %h.plant-a.example\n");
    assert_eq!(
        config.lookup("e1.lan").hostname.unwrap().value,
        "e1.lan.plant-a.example"
    );
}

#[test]
fn include_and_match_are_errors_with_line() {
    let include = parse_error("Host a\n  User x\nInclude ~/.ssh/config.d/*\n");
    assert!(include.starts_with("config:3:"), "{include}");
    assert!(include.contains("`include`"), "{include}");
    let matched = parse_error("Match host a exec true\n  User x\n");
    assert!(matched.starts_with("config:1:"), "{matched}");
    assert!(matched.contains("--ssh-config none"), "{matched}");
}

#[test]
fn typo_warns_with_line_and_suggestion() {
    let (config, warnings) = parse("Host a\n  IdentifyFile ~/.ssh/k\n  User ops\n");
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].starts_with("config:2:"), "{}", warnings[0]);
    assert!(warnings[0].contains("`identifyfile`"), "{}", warnings[0]);
    assert!(warnings[0].contains("`identityfile`"), "{}", warnings[0]);
    assert_eq!(config.lookup("a").user.unwrap().value, "ops");
}

#[test]
fn real_keywords_arcfleet_does_not_use_are_silent() {
    let (_, warnings) = parse("Host *\n  ForwardAgent yes\n  ControlMaster auto\n  SendEnv LANG\n");
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn ignore_unknown_silences_later_typos() {
    let (_, warnings) =
        parse("IgnoreUnknown UseKeychainX,Foo*\nHost *\n  FooBar 1\n  UseKeychainX yes\n");
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn invalid_values_name_the_line() {
    for (text, expected) in [
        ("Host a\n  Port 99999\n", "config:2:"),
        ("Host a\n  Port 22 23\n", "takes one value"),
        ("Host a\n  IdentitiesOnly maybe\n", "expected yes or no"),
        ("Host a\n  ConnectTimeout soon\n", "invalid time"),
        ("Host a\n  StrictHostKeyChecking sometimes\n", "accept-new"),
        ("Host a\n  HostName \"unterminated\n", "unterminated quote"),
        ("Host a\n  User\n", "no value after `user`"),
        ("Host a\n  ProxyJump bastion:0\n", "invalid ProxyJump host"),
    ] {
        let error = parse_error(text);
        assert!(error.contains(expected), "{text:?}: {error}");
    }
}

#[test]
fn proxy_command_and_jump_share_one_slot() {
    let (config, _) = parse("Host a\n  ProxyCommand ssh -W %h:%p gw\n  ProxyJump gw\n");
    assert_eq!(
        config.lookup("a").proxy.unwrap().value,
        Proxy::Command("ssh -W %h:%p gw".into())
    );
}

#[test]
fn unsupported_keywords_are_collected_for_their_hosts() {
    let (config, _) =
        parse("Host a\n  KnownHostsCommand /bin/true\nHost b\n  CanonicalizeHostname no\n");
    let a = config.lookup("a");
    assert_eq!(a.unsupported.len(), 1);
    assert!(
        a.unsupported[0].value.contains("KnownHostsCommand"),
        "{:?}",
        a.unsupported
    );
    assert!(config.lookup("b").unsupported.is_empty());
}

#[test]
fn equals_and_quotes_are_accepted() {
    let (config, _) = parse("Host=a\n  IdentityFile=\"/keys/my key\"\n");
    assert_eq!(config.lookup("a").identity_files[0].value, "/keys/my key");
}
