//! The YAML inventory format.
//!
//! ```yaml
//! defaults:            # optional; applies to devices that do not set the field
//!   user: root
//!   port: 22
//!   role: server
//!   identity_file: ~/.ssh/arcfleet_ed25519
//!   labels: {site: plant-a}
//! clusters:            # key -> Arc connected cluster
//!   line1:
//!     subscription: 00000000-0000-0000-0000-000000000000
//!     resource_group: rg-plant-a
//!     name: plant-a-line1   # optional, defaults to the key
//!     identities:           # optional; checked by `arcfleet audit`
//!       - resource_group: rg-identities
//!         name: sse-identity
//!         service_account: azure-secret-store/secret-sync-controller
//! devices:
//!   - name: edge-01
//!     host: 10.20.0.11
//!     cluster: line1
//!     labels: {wave: canary}
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{
    check_arm_segment, check_host, check_label, check_name, check_proxy_jump, check_user,
    distinct_clusters, parse_port, ClusterRef, Device, Inventory, InventoryError, Location, Role,
    WorkloadIdentity, TOKEN_EXCHANGE_AUDIENCE,
};
use crate::yaml::{self, Node, Value};

const TOP_FIELDS: &[&str] = &["defaults", "clusters", "devices"];
const DEFAULT_FIELDS: &[&str] = &[
    "user",
    "port",
    "role",
    "identity_file",
    "labels",
    "proxy_jump",
];
const CLUSTER_FIELDS: &[&str] = &["subscription", "resource_group", "name", "identities"];
const IDENTITY_FIELDS: &[&str] = &[
    "subscription",
    "resource_group",
    "name",
    "service_account",
    "audience",
];
const DEVICE_FIELDS: &[&str] = &[
    "name",
    "host",
    "port",
    "user",
    "role",
    "cluster",
    "labels",
    "identity_file",
    "proxy_jump",
];

/// Decoding context: the file, for locations in errors.
struct Doc<'a> {
    path: &'a Path,
}

impl Doc<'_> {
    fn error(&self, line: usize, message: impl Into<String>) -> InventoryError {
        InventoryError::Invalid {
            location: Location {
                path: self.path.to_owned(),
                line,
            },
            message: message.into(),
        }
    }

    /// Returns the entries of a mapping node, rejecting unknown and repeated fields.
    fn fields<'n>(
        &self,
        node: &'n Node,
        what: &str,
        allowed: &[&str],
    ) -> Result<BTreeMap<&'n str, &'n Node>, InventoryError> {
        let Value::Map(entries) = &node.value else {
            return Err(self.error(
                node.line,
                format!("{what} must be a mapping, found {}", node.kind()),
            ));
        };
        let mut fields = BTreeMap::new();
        for (key, value) in entries {
            let name = key.as_scalar().unwrap_or_default();
            if !allowed.contains(&name) {
                return Err(self.error(
                    key.line,
                    format!(
                        "unknown field `{name}` in {what}: expected one of {}",
                        allowed.join(", ")
                    ),
                ));
            }
            if fields.insert(name, value).is_some() {
                return Err(self.error(key.line, format!("field `{name}` repeated in {what}")));
            }
        }
        Ok(fields)
    }

    fn string(&self, node: &Node, field: &str) -> Result<String, InventoryError> {
        match node.as_scalar() {
            Some(_) if node.is_null() => Ok(String::new()),
            Some(text) => Ok(text.to_owned()),
            None => Err(self.error(
                node.line,
                format!("field `{field}` must be a string, found {}", node.kind()),
            )),
        }
    }

    fn labels(&self, node: &Node) -> Result<BTreeMap<String, String>, InventoryError> {
        if node.is_null() {
            return Ok(BTreeMap::new());
        }
        let Value::Map(entries) = &node.value else {
            return Err(self.error(
                node.line,
                format!("field `labels` must be a mapping, found {}", node.kind()),
            ));
        };
        let mut labels = BTreeMap::new();
        for (key, value) in entries {
            let key_text = self.string(key, "labels")?;
            let value_text = self.string(value, "labels")?;
            check_label(&key_text, &value_text).map_err(|m| self.error(key.line, m))?;
            if labels.insert(key_text.clone(), value_text).is_some() {
                return Err(self.error(key.line, format!("label `{key_text}` is given twice")));
            }
        }
        Ok(labels)
    }
}

/// Values from `defaults:`.
#[derive(Default)]
struct Defaults {
    user: Option<String>,
    port: Option<u16>,
    role: Option<Role>,
    identity_file: Option<PathBuf>,
    proxy_jump: Option<String>,
    labels: BTreeMap<String, String>,
}

pub(super) fn parse(path: &Path, text: &str) -> Result<Inventory, InventoryError> {
    let doc = Doc { path };
    let root = yaml::parse(text)
        .map_err(|error| doc.error(error.line, format!("invalid YAML: {}", error.message)))?
        .ok_or_else(|| doc.error(1, "the inventory is empty: add a `devices:` list"))?;
    let top = doc.fields(&root, "the inventory", TOP_FIELDS)?;

    let defaults = match top.get("defaults") {
        Some(node) if !node.is_null() => parse_defaults(&doc, node)?,
        _ => Defaults::default(),
    };
    let (clusters, identities) = match top.get("clusters") {
        Some(node) if !node.is_null() => parse_clusters(&doc, node)?,
        _ => (BTreeMap::new(), Vec::new()),
    };
    let Some(devices_node) = top.get("devices") else {
        return Err(doc.error(
            root.line,
            "missing field `devices`: list the devices to converge",
        ));
    };
    let Value::Seq(items) = &devices_node.value else {
        return Err(doc.error(
            devices_node.line,
            format!(
                "field `devices` must be a list, found {}",
                devices_node.kind()
            ),
        ));
    };
    let devices = items
        .iter()
        .map(|item| parse_device(&doc, item, &defaults, &clusters))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Inventory {
        devices,
        clusters: distinct_clusters(clusters.into_values().collect()),
        identities,
        warnings: Vec::new(),
    })
}

fn parse_defaults(doc: &Doc, node: &Node) -> Result<Defaults, InventoryError> {
    let fields = doc.fields(node, "defaults", DEFAULT_FIELDS)?;
    let mut defaults = Defaults::default();
    for (name, value) in fields {
        match name {
            "user" => {
                let user = doc.string(value, name)?;
                check_user(&user).map_err(|m| doc.error(value.line, format!("defaults: {m}")))?;
                defaults.user = Some(user);
            }
            "port" => {
                let port = parse_port(&doc.string(value, name)?)
                    .map_err(|m| doc.error(value.line, format!("defaults: {m}")))?;
                defaults.port = Some(port);
            }
            "role" => defaults.role = Some(parse_role(doc, value)?),
            "identity_file" => defaults.identity_file = Some(doc.string(value, name)?.into()),
            "labels" => defaults.labels = doc.labels(value)?,
            "proxy_jump" => {
                let proxy_jump = doc.string(value, name)?;
                check_proxy_jump(&proxy_jump)
                    .map_err(|m| doc.error(value.line, format!("defaults: {m}")))?;
                defaults.proxy_jump = Some(proxy_jump);
            }
            _ => {}
        }
    }
    Ok(defaults)
}

/// A cluster entry and the line it is defined on.
type Clusters = BTreeMap<String, ClusterRef>;

fn parse_clusters(
    doc: &Doc,
    node: &Node,
) -> Result<(Clusters, Vec<WorkloadIdentity>), InventoryError> {
    let Value::Map(entries) = &node.value else {
        return Err(doc.error(
            node.line,
            format!(
                "field `clusters` must be a mapping of names to clusters, found {}",
                node.kind()
            ),
        ));
    };
    let mut clusters = Clusters::new();
    let mut identities = Vec::new();
    for (key, value) in entries {
        let key_text = doc.string(key, "clusters")?;
        let what = format!("cluster `{key_text}`");
        let fields = doc.fields(value, &what, CLUSTER_FIELDS)?;
        let get = |field: &str| -> Result<String, InventoryError> {
            match fields.get(field) {
                Some(node) => doc.string(node, field),
                None if field == "name" => Ok(key_text.clone()),
                None => Err(doc.error(value.line, format!("{what}: missing field `{field}`"))),
            }
        };
        let cluster = ClusterRef {
            subscription: get("subscription")?,
            resource_group: get("resource_group")?,
            name: get("name")?,
        };
        for (field, text) in [
            ("subscription", &cluster.subscription),
            ("resource_group", &cluster.resource_group),
            ("name", &cluster.name),
        ] {
            let line = fields.get(field).map_or(value.line, |node| node.line);
            check_arm_segment(field, text).map_err(|m| doc.error(line, format!("{what}: {m}")))?;
        }
        if let Some(list) = fields.get("identities") {
            identities.extend(parse_identities(doc, list, &what, &cluster)?);
        }
        if clusters.insert(key_text.clone(), cluster).is_some() {
            return Err(doc.error(key.line, format!("{what} is defined twice")));
        }
    }
    Ok((clusters, identities))
}

fn parse_identities(
    doc: &Doc,
    node: &Node,
    what: &str,
    cluster: &ClusterRef,
) -> Result<Vec<WorkloadIdentity>, InventoryError> {
    if node.is_null() {
        return Ok(Vec::new());
    }
    let Value::Seq(items) = &node.value else {
        return Err(doc.error(
            node.line,
            format!(
                "{what}: field `identities` must be a list, found {}",
                node.kind()
            ),
        ));
    };
    items
        .iter()
        .map(|item| parse_identity(doc, item, what, cluster))
        .collect()
}

fn parse_identity(
    doc: &Doc,
    node: &Node,
    what: &str,
    cluster: &ClusterRef,
) -> Result<WorkloadIdentity, InventoryError> {
    let context = format!("an identity of {what}");
    let fields = doc.fields(node, &context, IDENTITY_FIELDS)?;
    let get = |field: &str| -> Result<Option<(String, usize)>, InventoryError> {
        fields
            .get(field)
            .map(|value| Ok((doc.string(value, field)?, value.line)))
            .transpose()
    };
    let required = |field: &str| -> Result<(String, usize), InventoryError> {
        get(field)?
            .filter(|(text, _)| !text.is_empty())
            .ok_or_else(|| doc.error(node.line, format!("{context}: missing field `{field}`")))
    };
    let (subscription, subscription_line) =
        get("subscription")?.unwrap_or((cluster.subscription.clone(), node.line));
    let (resource_group, group_line) = required("resource_group")?;
    let (name, name_line) = required("name")?;
    for (field, text, line) in [
        ("subscription", &subscription, subscription_line),
        ("resource_group", &resource_group, group_line),
        ("name", &name, name_line),
    ] {
        check_arm_segment(field, text).map_err(|m| doc.error(line, format!("{context}: {m}")))?;
    }
    let (account, account_line) = required("service_account")?;
    let (namespace, service_account) = parse_service_account(&account)
        .map_err(|m| doc.error(account_line, format!("{context}: {m}")))?;
    let audience = match get("audience")? {
        Some((audience, _)) if !audience.is_empty() => audience,
        _ => TOKEN_EXCHANGE_AUDIENCE.to_owned(),
    };
    Ok(WorkloadIdentity {
        cluster: cluster.clone(),
        subscription,
        resource_group,
        name,
        namespace,
        service_account,
        audience,
        source: Location {
            path: doc.path.to_owned(),
            line: node.line,
        },
    })
}

/// Splits `namespace/name` and checks both parts as Kubernetes names: lowercase letters,
/// digits and `-` (and `.` in the account name), starting and ending with a letter or digit.
fn parse_service_account(text: &str) -> Result<(String, String), String> {
    let invalid = || {
        format!(
            "invalid service_account `{}`: expected `namespace/name`, such as \
             `azure-secret-store/secret-sync-controller`",
            text.escape_debug()
        )
    };
    let (namespace, name) = text.split_once('/').ok_or_else(invalid)?;
    let valid = |part: &str, dots: bool| {
        let edges =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        edges(part.chars().next())
            && edges(part.chars().last())
            && part.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.')
            })
    };
    if !valid(namespace, false) || !valid(name, true) {
        return Err(invalid());
    }
    Ok((namespace.to_owned(), name.to_owned()))
}

fn parse_role(doc: &Doc, node: &Node) -> Result<Role, InventoryError> {
    let text = doc.string(node, "role")?;
    Role::parse(&text).ok_or_else(|| {
        doc.error(
            node.line,
            format!("invalid role `{text}`: expected `server` or `agent`"),
        )
    })
}

fn parse_device(
    doc: &Doc,
    node: &Node,
    defaults: &Defaults,
    clusters: &Clusters,
) -> Result<Device, InventoryError> {
    let fields = doc.fields(node, "a device", DEVICE_FIELDS)?;
    let text = |field: &str| -> Result<Option<(String, usize)>, InventoryError> {
        fields
            .get(field)
            .map(|value| Ok((doc.string(value, field)?, value.line)))
            .transpose()
    };

    let (name, name_line) = text("name")?.unwrap_or((String::new(), node.line));
    check_name(&name).map_err(|m| doc.error(name_line, m))?;
    let fail = |line: usize, field: &str, message: String| {
        doc.error(line, format!("device `{name}`, field `{field}`: {message}"))
    };

    let (host, host_line) = text("host")?.unwrap_or((String::new(), node.line));
    check_host(&host).map_err(|m| fail(host_line, "host", m))?;
    let port = match text("port")? {
        Some((port, line)) => Some(parse_port(&port).map_err(|m| fail(line, "port", m))?),
        None => defaults.port,
    };
    let user = match text("user")?.filter(|(user, _)| !user.is_empty()) {
        Some((user, line)) => {
            check_user(&user).map_err(|m| fail(line, "user", m))?;
            Some(user)
        }
        None => defaults.user.clone(),
    };
    let role = match fields.get("role") {
        Some(value) => parse_role(doc, value)?,
        None => defaults.role.unwrap_or(Role::Server),
    };

    let cluster = match text("cluster")? {
        Some((key, line)) if !key.is_empty() => {
            Some(clusters.get(&key).cloned().ok_or_else(|| {
                let known: Vec<&str> = clusters.keys().map(String::as_str).collect();
                fail(
                    line,
                    "cluster",
                    format!(
                        "cluster `{key}` is not defined under `clusters:` (defined: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                )
            })?)
        }
        _ if role == Role::Server => {
            return Err(fail(
                node.line,
                "cluster",
                "missing: every server needs the Arc cluster it belongs to".to_owned(),
            ))
        }
        _ => None,
    };

    let mut labels = defaults.labels.clone();
    if let Some(value) = fields.get("labels") {
        labels.extend(doc.labels(value)?);
    }
    let identity_file = match text("identity_file")? {
        Some((path, _)) => Some(PathBuf::from(path)),
        None => defaults.identity_file.clone(),
    };
    let proxy_jump = match text("proxy_jump")? {
        Some((proxy_jump, line)) => {
            check_proxy_jump(&proxy_jump).map_err(|m| fail(line, "proxy_jump", m))?;
            Some(proxy_jump)
        }
        None => defaults.proxy_jump.clone(),
    };

    Ok(Device {
        name,
        host,
        port,
        user,
        role,
        cluster,
        labels,
        identity_file,
        proxy_jump,
        source: Location {
            path: doc.path.to_owned(),
            line: node.line,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_inventory(text: &str) -> Result<Inventory, InventoryError> {
        parse(Path::new("plant.yaml"), text)
    }

    fn load(text: &str) -> Result<Vec<Device>, InventoryError> {
        load_inventory(text).map(|inventory| inventory.devices)
    }

    const CLUSTERS: &str = "clusters:\n  line1: {subscription: s1, resource_group: rg}\n";

    #[test]
    fn defaults_apply_to_devices() {
        let text = format!(
            "defaults:\n  user: root\n  port: 2200\n  labels: {{site: a}}\n{CLUSTERS}devices:\n  \
             - {{name: e1, host: h1, cluster: line1, labels: {{wave: w1}}}}\n"
        );
        let devices = load(&text).unwrap();
        assert_eq!(devices[0].user.as_deref(), Some("root"));
        assert_eq!(devices[0].port, Some(2200));
        assert_eq!(devices[0].labels["site"], "a");
        assert_eq!(devices[0].labels["wave"], "w1");
        assert_eq!(devices[0].cluster.as_ref().unwrap().name, "line1");
    }

    #[test]
    fn unknown_device_field_names_line() {
        let text = format!("{CLUSTERS}devices:\n  - name: e1\n    hots: h1\n    cluster: line1\n");
        let error = load(&text).unwrap_err().to_string();
        assert!(error.starts_with("plant.yaml:5:"), "{error}");
        assert!(error.contains("unknown field `hots`"), "{error}");
    }

    #[test]
    fn undefined_cluster_is_rejected() {
        let text = format!("{CLUSTERS}devices:\n  - {{name: e1, host: h, cluster: line9}}\n");
        let error = load(&text).unwrap_err().to_string();
        assert!(error.contains("cluster `line9` is not defined"), "{error}");
        assert!(error.contains("line1"), "{error}");
    }

    #[test]
    fn server_needs_cluster() {
        let error = load("devices:\n  - {name: e1, host: h}\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("field `cluster`"), "{error}");
    }

    #[test]
    fn invalid_yaml_names_line() {
        let error = load("devices:\n  - {name: e1\n").unwrap_err().to_string();
        assert!(error.contains("invalid YAML"), "{error}");
        assert!(error.starts_with("plant.yaml:"), "{error}");
    }

    #[test]
    fn cluster_missing_subscription_is_rejected() {
        let error = load("clusters:\n  c: {resource_group: rg}\ndevices: []\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing field `subscription`"), "{error}");
    }

    #[test]
    fn numeric_port_and_quoted_values_load() {
        let text = format!(
            "{CLUSTERS}devices:\n  - {{name: e1, host: \"h\", port: 22, cluster: line1}}\n"
        );
        assert_eq!(load(&text).unwrap()[0].port, Some(22));
    }

    const IDENTITY_CLUSTERS: &str =
        "clusters:\n  line1:\n    subscription: s1\n    resource_group: rg\n    identities:\n";

    #[test]
    fn identities_load_with_defaults() {
        let text = format!(
            "{IDENTITY_CLUSTERS}      - {{resource_group: rg-id, name: sse, service_account: azure-secret-store/secret-sync-controller}}\n      \
             - {{subscription: s2, resource_group: rg-id, name: app, service_account: apps/web.v1, audience: api://custom}}\ndevices: []\n"
        );
        let inventory = load_inventory(&text).unwrap();
        let [first, second] = inventory.identities.as_slice() else {
            panic!("{:?}", inventory.identities);
        };
        assert_eq!(
            first.subscription, "s1",
            "the cluster's subscription by default"
        );
        assert_eq!(
            first.subject(),
            "system:serviceaccount:azure-secret-store:secret-sync-controller"
        );
        assert_eq!(first.audience, TOKEN_EXCHANGE_AUDIENCE);
        assert_eq!(first.cluster.name, "line1");
        assert_eq!(first.source.line, 6);
        assert_eq!(second.subscription, "s2");
        assert_eq!(second.service_account, "web.v1");
        assert_eq!(second.audience, "api://custom");
    }

    #[test]
    fn identity_needs_service_account() {
        let text = format!(
            "{IDENTITY_CLUSTERS}      - {{resource_group: rg-id, name: sse}}\ndevices: []\n"
        );
        let error = load_inventory(&text).unwrap_err().to_string();
        assert!(error.starts_with("plant.yaml:6:"), "{error}");
        assert!(error.contains("missing field `service_account`"), "{error}");
    }

    #[test]
    fn invalid_service_account_is_rejected() {
        for account in [
            "no-slash",
            "Upper/name",
            "ns/",
            "/name",
            "ns/-bad",
            "n.s/name",
        ] {
            let text = format!(
                "{IDENTITY_CLUSTERS}      - {{resource_group: rg-id, name: sse, service_account: \"{account}\"}}\ndevices: []\n"
            );
            let error = load_inventory(&text).unwrap_err().to_string();
            assert!(
                error.contains("invalid service_account"),
                "{account}: {error}"
            );
        }
    }

    #[test]
    fn unknown_identity_field_is_rejected() {
        let text = format!(
            "{IDENTITY_CLUSTERS}      - {{resource_group: rg-id, name: sse, service_account: a/b, issuer: x}}\ndevices: []\n"
        );
        let error = load_inventory(&text).unwrap_err().to_string();
        assert!(error.contains("unknown field `issuer`"), "{error}");
    }

    #[test]
    fn clusters_without_devices_are_listed() {
        let text = "clusters:\n  a: {subscription: s, resource_group: rg}\n  b: {subscription: s, resource_group: rg}\ndevices: []\n";
        let inventory = load_inventory(text).unwrap();
        let names: Vec<_> = inventory.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }
}
