use std::path::{Path, PathBuf};

use super::*;

const SUB: &str = "3f9a6c1e-5b2d-4e8f-9a7c-1d2e3f4a5b6c";

fn ini(text: &str) -> Result<(Vec<Device>, Vec<String>), InventoryError> {
    parse_ini(Path::new("hosts.ini"), text)
}

fn yaml(text: &str) -> Result<(Vec<Device>, Vec<String>), InventoryError> {
    parse_yaml(Path::new("hosts.yml"), text)
}

fn by_name<'a>(devices: &'a [Device], name: &str) -> &'a Device {
    devices
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no device {name} in {devices:?}"))
}

const INI_FLEET: &str = "\
# Plant A
[line1]
edge-[01:02] ansible_user=ops
edge-09:2222 ansible_host=10.20.1.19 arcfleet_labels=\"wave=canary\"

[line1:vars]
arc_resource_group=rg-plant-a
arc_cluster=plant-a-line1

[agent]
agt-01 ansible_host=10.20.1.31

[plant_a:children]
line1
agent

[plant_a:vars]
arc_subscription=3f9a6c1e-5b2d-4e8f-9a7c-1d2e3f4a5b6c
arc_cluster=overridden-by-line1
ansible_ssh_common_args='-o ProxyJump=jump@bastion.plant-a -o StrictHostKeyChecking=no'
";

const YAML_FLEET: &str = "\
all:
  children:
    plant_a:
      vars:
        arc_subscription: 3f9a6c1e-5b2d-4e8f-9a7c-1d2e3f4a5b6c
        arc_cluster: overridden-by-line1
        ansible_ssh_common_args: -o ProxyJump=jump@bastion.plant-a -o StrictHostKeyChecking=no
      children:
        line1:
          vars:
            arc_resource_group: rg-plant-a
            arc_cluster: plant-a-line1
          hosts:
            edge-[01:02]:
              ansible_user: ops
            edge-09:
              ansible_host: 10.20.1.19
              ansible_port: 2222
              arcfleet_labels: {wave: canary}
        agent:
          hosts:
            agt-01: {ansible_host: 10.20.1.31}
";

#[test]
fn ini_and_yaml_describe_the_same_fleet() {
    let (from_ini, ini_warnings) = ini(INI_FLEET).unwrap();
    let (from_yaml, yaml_warnings) = yaml(YAML_FLEET).unwrap();
    let summary = |devices: &[Device]| -> Vec<_> {
        devices
            .iter()
            .map(|d| {
                (
                    d.name.clone(),
                    d.host.clone(),
                    d.port,
                    d.user.clone(),
                    d.role,
                    d.cluster.clone(),
                    d.labels.clone(),
                    d.proxy_jump.clone(),
                )
            })
            .collect()
    };
    assert_eq!(summary(&from_ini), summary(&from_yaml));
    assert_eq!(
        ini_warnings.len(),
        yaml_warnings.len(),
        "{ini_warnings:?} {yaml_warnings:?}"
    );
}

#[test]
fn ini_fields_map_to_devices() {
    let (devices, warnings) = ini(INI_FLEET).unwrap();
    let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["edge-01", "edge-02", "edge-09", "agt-01"]);

    let edge = by_name(&devices, "edge-01");
    assert_eq!(edge.host, "edge-01", "no ansible_host: the inventory name");
    assert_eq!(edge.user.as_deref(), Some("ops"));
    assert_eq!(edge.port, None);
    assert_eq!(edge.role, Role::Server);
    assert_eq!(
        edge.cluster,
        Some(ClusterRef {
            subscription: SUB.into(),
            resource_group: "rg-plant-a".into(),
            name: "plant-a-line1".into(),
        }),
        "the child group's arc_cluster wins over its parent's"
    );
    assert_eq!(edge.labels["group/line1"], "true");
    assert_eq!(edge.labels["group/plant_a"], "true");
    assert_eq!(edge.proxy_jump.as_deref(), Some("jump@bastion.plant-a"));
    assert_eq!(edge.source.line, 3);

    let nine = by_name(&devices, "edge-09");
    assert_eq!(nine.host, "10.20.1.19");
    assert_eq!(nine.port, Some(2222));
    assert_eq!(nine.labels["wave"], "canary");

    let agent = by_name(&devices, "agt-01");
    assert_eq!(agent.role, Role::Agent, "membership of group `agent`");
    assert!(agent.labels.contains_key("group/agent"));

    assert!(
        warnings
            .iter()
            .any(|w| w.contains("StrictHostKeyChecking=no")),
        "ignored ssh options are reported: {warnings:?}"
    );
}

#[test]
fn host_vars_win_over_group_vars() {
    let text = "[g]\nh1 arc_cluster=own\n[g:vars]\narc_cluster=group\narc_subscription=s\narc_resource_group=rg\n";
    let (devices, _) = ini(text).unwrap();
    assert_eq!(devices[0].cluster.as_ref().unwrap().name, "own");
}

#[test]
fn group_priority_breaks_ties_between_siblings() {
    let text = "\
[a]
h1
[b]
h1
[a:vars]
arc_cluster=from-a
ansible_group_priority=10
[b:vars]
arc_cluster=from-b
[all:vars]
arc_subscription=s
arc_resource_group=rg
";
    let (devices, _) = ini(text).unwrap();
    assert_eq!(
        devices[0].cluster.as_ref().unwrap().name,
        "from-a",
        "a higher priority is applied later"
    );
    let without_priority = text.replace("ansible_group_priority=10\n", "");
    let (devices, _) = ini(&without_priority).unwrap();
    assert_eq!(
        devices[0].cluster.as_ref().unwrap().name,
        "from-b",
        "then by name"
    );
}

#[test]
fn k3s_role_var_and_k3s_ansible_groups() {
    let text = "\
all:
  vars: {arc_subscription: s, arc_resource_group: rg, arc_cluster: c}
  children:
    k3s_cluster:
      children:
        server:
          hosts: {s1: }
        agent:
          hosts: {a1: , a2: {k3s_role: server}}
";
    let (devices, _) = yaml(text).unwrap();
    assert_eq!(by_name(&devices, "s1").role, Role::Server);
    assert_eq!(by_name(&devices, "a1").role, Role::Agent);
    assert_eq!(by_name(&devices, "a2").role, Role::Server, "k3s_role wins");
}

#[test]
fn ranges_expand() {
    assert_eq!(
        expand_host_pattern("e[01:03]").unwrap(),
        ["e01", "e02", "e03"]
    );
    assert_eq!(
        expand_host_pattern("e[0:10:5]").unwrap(),
        ["e0", "e5", "e10"]
    );
    assert_eq!(expand_host_pattern("[a:c]x").unwrap(), ["ax", "bx", "cx"]);
    assert_eq!(
        expand_host_pattern("r[1:2]n[a:b]").unwrap(),
        ["r1na", "r1nb", "r2na", "r2nb"]
    );
    assert!(expand_host_pattern("e[03:01]").is_err());
    assert!(expand_host_pattern("e[01:03").is_err());
    assert!(expand_host_pattern("e[x:03]").is_err());
}

#[test]
fn missing_cluster_names_host_line() {
    let error = ini("[g]\n\nh1 arc_subscription=s\n")
        .unwrap_err()
        .to_string();
    assert!(error.starts_with("hosts.ini:3:"), "{error}");
    assert!(error.contains("arc_resource_group"), "{error}");
}

#[test]
fn agents_may_omit_cluster() {
    let (devices, _) = ini("[g]\nh1 k3s_role=agent\n").unwrap();
    assert_eq!(devices[0].cluster, None);
}

#[test]
fn errors_name_file_and_line() {
    for (text, expected) in [
        ("[g\nh1\n", "hosts.ini:1:"),
        ("[g:nodes]\nh1\n", "invalid section type"),
        ("[g]\nh1 novalue\n", "not `name=value`"),
        ("[g]\nh1 k3s_role=master\n", "hosts.ini:2:"),
        ("[g]\nh1 ansible_port=22x k3s_role=agent\n", "invalid port"),
        (
            "[g]\nh1 ansible_host='{{ lookup(x) }}' k3s_role=agent\n",
            "Jinja2",
        ),
        ("[g]\nbad/name k3s_role=agent\n", "device name"),
        ("[g:vars]\njust-a-word\n", "not `name=value`"),
    ] {
        let error = ini(text).unwrap_err().to_string();
        assert!(error.contains(expected), "{text:?}: {error}");
    }
    for (text, expected) in [
        ("all:\n  host:\n    h1:\n", "hosts.yml:2:"),
        ("all:\n  hosts: [h1]\n", "must be a mapping"),
        (
            "all:\n  hosts:\n    h1: {ansible_port: [1]}\n",
            "found a list",
        ),
        ("all:\n  hosts: {h1: \n", "invalid YAML"),
    ] {
        let error = yaml(text).unwrap_err().to_string();
        assert!(error.contains(expected), "{text:?}: {error}");
    }
}

#[test]
fn children_cycle_is_rejected() {
    let error = ini("[a:children]\nb\n[b:children]\na\n")
        .unwrap_err()
        .to_string();
    assert!(error.contains("cycle"), "{error}");
}

#[test]
fn non_ssh_connections_are_left_out() {
    let (devices, warnings) =
        ini("localhost ansible_connection=local\nedge k3s_role=agent\n").unwrap();
    assert_eq!(devices.len(), 1);
    assert!(
        warnings[0].contains("ansible_connection=local"),
        "{warnings:?}"
    );
}

#[test]
fn misspelt_arcfleet_variable_warns() {
    let (_, warnings) = ini("[g]\nh1 k3s_role=agent arc_clster=c\n").unwrap();
    assert!(
        warnings.iter().any(|w| w.contains("arc_clster")),
        "{warnings:?}"
    );
}

#[test]
fn proxy_jump_forms_in_ssh_args() {
    for args in [
        "-J ops@bastion:2222",
        "-Jops@bastion:2222",
        "-o ProxyJump=ops@bastion:2222",
        "-oProxyJump=ops@bastion:2222",
        "-o 'ProxyJump ops@bastion:2222'",
    ] {
        let text = format!("[g]\nh1 k3s_role=agent\n[g:vars]\nansible_ssh_extra_args={args}\n");
        let (devices, _) = ini(&text).unwrap();
        assert_eq!(
            devices[0].proxy_jump.as_deref(),
            Some("ops@bastion:2222"),
            "{args}"
        );
    }
    let error = ini("[g]\nh1 k3s_role=agent ansible_ssh_common_args='-o ProxyCommand=nc'\n")
        .unwrap_err()
        .to_string();
    assert!(error.contains("ProxyCommand"), "{error}");
}

#[test]
fn yaml_detection() {
    let shape = |text: &str| looks_like_ansible(&crate::yaml::parse(text).unwrap().unwrap());
    assert!(shape(YAML_FLEET));
    assert!(shape("ungrouped:\n  hosts: {a: }\n"));
    assert!(!shape("devices: []\n"));
    assert!(!shape("all:\n  devices: []\n"));
}

#[test]
fn group_vars_directory_warns() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("group_vars")).unwrap();
    let path: PathBuf = dir.path().join("hosts");
    let (_, warnings) = parse_ini(&path, "h1 k3s_role=agent\n").unwrap();
    assert!(
        warnings.iter().any(|w| w.contains("group_vars/")),
        "{warnings:?}"
    );
}
