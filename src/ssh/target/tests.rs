use std::path::Path;

use super::*;

fn fallbacks() -> Fallbacks {
    Fallbacks {
        user: "cli-user".into(),
        identity: None,
        known_hosts: "~/.ssh/known_hosts".into(),
        accept_new: false,
        connect_timeout: Duration::from_secs(15),
        keepalive_interval: Duration::from_secs(15),
        keepalive_max: 3,
        agent: Some(PathBuf::from("/run/agent.sock")),
        tokens: TokenValues {
            home: "/home/ops".into(),
            local_user: "ops".into(),
            local_host: "controller".into(),
            uid: "1000".into(),
            original_host: String::new(),
            host: String::new(),
            port: 22,
            remote_user: String::new(),
        },
    }
}

fn config(text: &str) -> SshConfig {
    SshConfig::parse(text, Path::new("cfg")).unwrap().0
}

fn request(host: &str) -> Request {
    Request {
        host: host.into(),
        ..Request::default()
    }
}

const CONFIG: &str = "\
Host edge-*
    HostName 10.250.1.%h
    User ssh-config-user
    Port 2200
    IdentityFile ~/.ssh/%n_key
    ProxyJump bastion
    ServerAliveInterval 20

Host bastion
    HostName 192.0.2.10
    User jump
    IdentityFile ~/.ssh/jump_key
    ProxyJump outer:2022

Host outer
    User outer-user
";

#[test]
fn inventory_fields_win_over_ssh_config() {
    let req = Request {
        port: Some(22),
        user: Some("root".into()),
        identity_file: Some("~/inventory_key".into()),
        ..request("edge-7")
    };
    let target = resolve(&req, &config(CONFIG), &fallbacks()).unwrap();
    assert_eq!(
        target.host, "10.250.1.edge-7",
        "HostName maps the inventory host"
    );
    assert_eq!(target.port, 22);
    assert_eq!(target.user, "root");
    assert_eq!(
        target.identities,
        [Identity {
            path: "/home/ops/inventory_key".into(),
            required: true
        }]
    );
}

#[test]
fn ssh_config_wins_over_command_line() {
    let target = resolve(&request("edge-7"), &config(CONFIG), &fallbacks()).unwrap();
    assert_eq!(target.port, 2200);
    assert_eq!(target.user, "ssh-config-user");
    assert_eq!(
        target.identities[0].path,
        PathBuf::from("/home/ops/.ssh/edge-7_key")
    );
    assert!(!target.identities[0].required);
    assert_eq!(target.keepalive.unwrap().interval, Duration::from_secs(20));
    assert_eq!(target.keepalive.unwrap().max, 3);
    assert_eq!(target.host_key_name, "[10.250.1.edge-7]:2200");
}

#[test]
fn command_line_fills_what_nothing_else_sets() {
    let mut fallbacks = fallbacks();
    fallbacks.identity = Some("/keys/cli".into());
    let target = resolve(&request("plain"), &SshConfig::empty(), &fallbacks).unwrap();
    assert_eq!(target.host, "plain");
    assert_eq!(target.port, 22);
    assert_eq!(target.user, "cli-user");
    assert_eq!(
        target.identities,
        [Identity {
            path: "/keys/cli".into(),
            required: true
        }]
    );
    assert_eq!(
        target.known_hosts,
        [
            PathBuf::from("/home/ops/.ssh/known_hosts"),
            PathBuf::from("/etc/ssh/ssh_known_hosts"),
            PathBuf::from("/etc/ssh/ssh_known_hosts2"),
        ]
    );
    assert_eq!(target.agent, Some(PathBuf::from("/run/agent.sock")));
    assert!(target.jumps.is_empty());
}

#[test]
fn default_identities_are_optional() {
    let target = resolve(&request("plain"), &SshConfig::empty(), &fallbacks()).unwrap();
    assert_eq!(target.identities.len(), 3);
    assert!(target.identities.iter().all(|i| !i.required));
}

#[test]
fn jump_hosts_use_their_own_blocks_and_first_hop_chain() {
    let target = resolve(&request("edge-7"), &config(CONFIG), &fallbacks()).unwrap();
    let hops: Vec<String> = target.jumps.iter().map(Target::describe).collect();
    assert_eq!(
        hops,
        ["outer-user@outer:2022", "jump@192.0.2.10:22"],
        "bastion's own ProxyJump comes first"
    );
    assert_eq!(
        target.jumps[1].identities[0].path,
        PathBuf::from("/home/ops/.ssh/jump_key")
    );
    assert_eq!(
        target.describe(),
        "ssh-config-user@10.250.1.edge-7:2200 via outer-user@outer:2022, jump@192.0.2.10:22"
    );
}

#[test]
fn user_and_port_in_proxy_jump_win() {
    let req = Request {
        proxy_jump: Some("admin@bastion:2222".into()),
        ..request("edge-7")
    };
    let target = resolve(&req, &config(CONFIG), &fallbacks()).unwrap();
    let bastion = target.jumps.last().unwrap();
    assert_eq!(bastion.user, "admin");
    assert_eq!(bastion.port, 2222);
    assert_eq!(bastion.host, "192.0.2.10");
}

#[test]
fn inventory_proxy_jump_none_connects_directly() {
    let req = Request {
        proxy_jump: Some("none".into()),
        ..request("edge-7")
    };
    let target = resolve(&req, &config(CONFIG), &fallbacks()).unwrap();
    assert!(target.jumps.is_empty());
}

#[test]
fn weak_host_key_checking_is_rejected_with_line() {
    let cfg = config("Host lab-*\n  StrictHostKeyChecking no\n");
    let error = resolve(&request("lab-1"), &cfg, &fallbacks()).unwrap_err();
    assert!(error.starts_with("cfg:2:"), "{error}");
    assert!(error.contains("man-in-the-middle"), "{error}");
    assert!(resolve(&request("other"), &cfg, &fallbacks()).is_ok());
}

#[test]
fn accept_new_comes_from_ssh_config_or_flag() {
    let cfg = config("Host new-*\n  StrictHostKeyChecking accept-new\nHost strict\n  StrictHostKeyChecking yes\n");
    assert!(
        resolve(&request("new-1"), &cfg, &fallbacks())
            .unwrap()
            .accept_new
    );
    assert!(
        !resolve(&request("x"), &cfg, &fallbacks())
            .unwrap()
            .accept_new
    );
    let mut flagged = fallbacks();
    flagged.accept_new = true;
    assert!(resolve(&request("x"), &cfg, &flagged).unwrap().accept_new);
    assert!(
        !resolve(&request("strict"), &cfg, &flagged)
            .unwrap()
            .accept_new,
        "an explicit ssh_config yes wins over the flag"
    );
}

#[test]
fn proxy_command_and_loops_are_errors() {
    let cfg = config("Host a\n  ProxyCommand nc %h %p\n");
    let error = resolve(&request("a"), &cfg, &fallbacks()).unwrap_err();
    assert!(error.contains("ProxyJump"), "{error}");
    assert!(error.starts_with("cfg:2:"), "{error}");

    let looping = config("Host a\n  ProxyJump b\nHost b\n  ProxyJump a\n");
    let error = resolve(&request("a"), &looping, &fallbacks()).unwrap_err();
    assert!(error.contains("loops back to b"), "{error}");
    assert!(error.contains("b -> a -> b"), "{error}");
    assert!(error.starts_with("cfg:2:"), "{error}");
}

#[test]
fn known_hosts_files_and_alias() {
    let cfg = config(
        "Host edge\n  UserKnownHostsFile ~/.ssh/kh_%h /etc/fleet_kh\n  GlobalKnownHostsFile /etc/ssh/ssh_known_hosts\n  HostKeyAlias edge-alias\n  HashKnownHosts yes\n",
    );
    let target = resolve(&request("edge"), &cfg, &fallbacks()).unwrap();
    assert_eq!(
        target.known_hosts,
        [
            PathBuf::from("/home/ops/.ssh/kh_edge"),
            PathBuf::from("/etc/fleet_kh"),
            PathBuf::from("/etc/ssh/ssh_known_hosts"),
        ]
    );
    assert_eq!(
        target.record_in,
        Some(PathBuf::from("/home/ops/.ssh/kh_edge"))
    );
    assert_eq!(target.host_key_name, "edge-alias");
    assert_eq!(target.principal, "edge-alias");
    assert_eq!(target.hash_new_entries, Some(true));
}

#[test]
fn server_alive_zero_disables_keepalive() {
    let cfg = config("Host *\n  ServerAliveInterval 0\n");
    assert_eq!(
        resolve(&request("x"), &cfg, &fallbacks())
            .unwrap()
            .keepalive,
        None
    );
}

#[test]
fn identity_agent_none_and_path() {
    let cfg =
        config("Host a\n  IdentityAgent none\nHost b\n  IdentityAgent ~/agent.%r\n  User u\n");
    assert_eq!(
        resolve(&request("a"), &cfg, &fallbacks()).unwrap().agent,
        None
    );
    assert_eq!(
        resolve(&request("b"), &cfg, &fallbacks()).unwrap().agent,
        Some(PathBuf::from("/home/ops/agent.u"))
    );
}

#[test]
fn pubkey_authentication_no_is_rejected() {
    let cfg = config("Host a\n  PubkeyAuthentication no\n");
    let error = resolve(&request("a"), &cfg, &fallbacks()).unwrap_err();
    assert!(error.contains("keys only"), "{error}");
}
