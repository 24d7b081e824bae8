//! Device inventories: which nodes to converge, how to reach them, and which Arc cluster
//! each belongs to.
//!
//! Three formats load into the same [`Inventory`]: arcfleet's YAML file with `defaults`,
//! `clusters` and `devices` sections, a flat CSV file with the header
//! `name,host,port,user,subscription,resource_group,cluster,role,labels` as CMDB exports
//! produce it, and Ansible inventories (YAML or INI, see [`ansible`]). Only the YAML
//! format can list the workload identities of a cluster. Every error names the file, the
//! line and the field.

mod ansible;
mod csv_format;
mod yaml_format;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// Default SSH port for devices that do not set one.
pub const DEFAULT_PORT: u16 = 22;

/// A loaded, validated inventory.
#[derive(Debug, Clone, PartialEq)]
pub struct Inventory {
    /// Devices in file order.
    pub devices: Vec<Device>,
    /// Every distinct cluster the file names, devices or not, in file order.
    pub clusters: Vec<ClusterRef>,
    /// User-assigned identities whose federated credentials should trust a cluster.
    pub identities: Vec<WorkloadIdentity>,
    /// Problems that did not stop loading, each with its `file:line`.
    pub warnings: Vec<String>,
}

/// A user-assigned managed identity that a workload on a cluster signs in as, with the
/// service account the workload runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadIdentity {
    /// The cluster the workload runs on.
    pub cluster: ClusterRef,
    /// Subscription of the identity; the cluster's unless the inventory sets another.
    pub subscription: String,
    /// Resource group of the identity.
    pub resource_group: String,
    /// Name of the identity.
    pub name: String,
    /// Namespace of the workload's service account.
    pub namespace: String,
    /// Name of the workload's service account.
    pub service_account: String,
    /// The audience the workload's token is requested for.
    pub audience: String,
    /// The file and line that define the identity.
    pub source: Location,
}

/// The audience of tokens exchanged for Entra tokens by workload identity federation.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";

impl WorkloadIdentity {
    /// Returns the subject of the workload's service-account tokens.
    pub fn subject(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

/// One node to converge.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Unique name of the device in the inventory.
    pub name: String,
    /// Host name or address to connect to, matched against ssh_config `Host` patterns.
    pub host: String,
    /// SSH port, when the inventory sets one (else ssh_config's Port, else 22).
    pub port: Option<u16>,
    /// SSH login user, when the inventory sets one (else ssh_config's User, else
    /// `--user`, else the local user).
    pub user: Option<String>,
    /// K3s role of the node.
    pub role: Role,
    /// The Arc cluster the node belongs to; agents may have none.
    pub cluster: Option<ClusterRef>,
    /// Free-form labels, used for selection.
    pub labels: BTreeMap<String, String>,
    /// Private key for this device, overriding ssh_config and `--identity`.
    pub identity_file: Option<PathBuf>,
    /// Jump hosts (a ProxyJump value; `none` connects directly), overriding ssh_config.
    pub proxy_jump: Option<String>,
    /// The file and line that define the device.
    pub source: Location,
}

/// K3s node role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A `k3s server` node, which runs kube-apiserver.
    Server,
    /// A `k3s agent` node, which arcfleet leaves untouched.
    Agent,
}

impl Role {
    /// Parses `server` or `agent`; an empty value means server.
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "" | "server" => Some(Role::Server),
            "agent" => Some(Role::Agent),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Server => "server",
            Role::Agent => "agent",
        })
    }
}

/// The Azure Resource Manager coordinates of a connected cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterRef {
    /// Subscription ID.
    pub subscription: String,
    /// Resource group name.
    pub resource_group: String,
    /// Connected cluster name.
    pub name: String,
}

impl ClusterRef {
    /// Returns the key under which ARM treats two references as the same resource: ARM
    /// compares subscription, resource group and resource names case-insensitively.
    pub fn key(&self) -> (String, String, String) {
        (
            self.subscription.to_ascii_lowercase(),
            self.resource_group.to_ascii_lowercase(),
            self.name.to_ascii_lowercase(),
        )
    }

    /// Returns the ARM resource ID.
    pub fn resource_id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Kubernetes/connectedClusters/{}",
            self.subscription, self.resource_group, self.name
        )
    }
}

impl fmt::Display for ClusterRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.resource_group, self.name)
    }
}

/// A file and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file.
    pub path: PathBuf,
    /// 1-based line number.
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.line)
    }
}

/// An inventory that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The file could not be read.
    #[error("cannot read inventory {}: {source}", path.display())]
    Read {
        /// The inventory path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The format could not be determined from the file name or content.
    #[error(
        "inventory {} has an unknown format: use a .yaml, .yml, .csv or .ini file, or pass \
         --inventory-format",
        path.display()
    )]
    UnknownFormat {
        /// The inventory path.
        path: PathBuf,
    },
    /// A value in the file is invalid.
    #[error("{location}: {message}")]
    Invalid {
        /// The file and line of the invalid value.
        location: Location,
        /// The problem and its fix.
        message: String,
    },
}

/// Inventory file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Choose by extension and content: `.csv` is CSV, `.ini`, `.cfg` or no extension is an
    /// Ansible INI inventory, and `.yaml`/`.yml` is arcfleet's YAML unless the document
    /// is shaped like an Ansible inventory (top-level groups with `hosts`, `vars` or
    /// `children`).
    #[default]
    Auto,
    /// arcfleet's YAML format.
    Yaml,
    /// The CSV format.
    Csv,
    /// An Ansible inventory, YAML or INI (YAML when it parses as a mapping).
    Ansible,
}

/// How to load an inventory.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The file format.
    pub format: Format,
}

/// Loads an inventory in the chosen format.
pub fn load(path: &Path, options: &LoadOptions) -> Result<Inventory, InventoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
        path: path.to_owned(),
        source,
    })?;
    let resolved = resolve_format(path, &text, options.format)?;
    let inventory = match resolved {
        Resolved::Yaml => yaml_format::parse(path, &text)?,
        Resolved::Csv => from_devices(csv_format::parse(path, &text)?, Vec::new()),
        Resolved::AnsibleYaml => {
            let (devices, warnings) = ansible::parse_yaml(path, &text)?;
            from_devices(devices, warnings)
        }
        Resolved::AnsibleIni => {
            let (devices, warnings) = ansible::parse_ini(path, &text)?;
            from_devices(devices, warnings)
        }
    };
    check_unique_names(&inventory.devices)?;
    Ok(inventory)
}

/// Builds an inventory from a format that names clusters only through its devices.
fn from_devices(devices: Vec<Device>, warnings: Vec<String>) -> Inventory {
    let named: Vec<ClusterRef> = devices.iter().filter_map(|d| d.cluster.clone()).collect();
    Inventory {
        clusters: distinct_clusters(named),
        devices,
        identities: Vec::new(),
        warnings,
    }
}

enum Resolved {
    Yaml,
    Csv,
    AnsibleYaml,
    AnsibleIni,
}

fn resolve_format(path: &Path, text: &str, format: Format) -> Result<Resolved, InventoryError> {
    let extension = path
        .extension()
        .and_then(|extension| extension.to_str())
        .map(str::to_ascii_lowercase);
    let ansible_yaml =
        || matches!(crate::yaml::parse(text), Ok(Some(root)) if ansible::looks_like_ansible(&root));
    let yaml_mapping = || matches!(crate::yaml::parse(text), Ok(Some(root)) if matches!(root.value, crate::yaml::Value::Map(_)));
    Ok(match (format, extension.as_deref()) {
        (Format::Yaml, _) => Resolved::Yaml,
        (Format::Csv, _) => Resolved::Csv,
        (Format::Ansible, Some("yaml" | "yml")) => Resolved::AnsibleYaml,
        (Format::Ansible, Some("ini" | "cfg")) => Resolved::AnsibleIni,
        (Format::Ansible, _) if yaml_mapping() => Resolved::AnsibleYaml,
        (Format::Ansible, _) => Resolved::AnsibleIni,
        (Format::Auto, Some("csv")) => Resolved::Csv,
        (Format::Auto, Some("yaml" | "yml")) if ansible_yaml() => Resolved::AnsibleYaml,
        (Format::Auto, Some("yaml" | "yml")) => Resolved::Yaml,
        (Format::Auto, Some("ini" | "cfg") | None) => Resolved::AnsibleIni,
        (Format::Auto, Some(_)) => {
            return Err(InventoryError::UnknownFormat {
                path: path.to_owned(),
            })
        }
    })
}

/// Returns each cluster once, in first-appearance order, comparing as ARM does.
fn distinct_clusters(clusters: Vec<ClusterRef>) -> Vec<ClusterRef> {
    let mut seen = std::collections::HashSet::new();
    clusters
        .into_iter()
        .filter(|cluster| seen.insert(cluster.key()))
        .collect()
}

fn check_unique_names(devices: &[Device]) -> Result<(), InventoryError> {
    let mut seen: HashMap<&str, &Location> = HashMap::new();
    for device in devices {
        if let Some(first) = seen.insert(&device.name, &device.source) {
            return Err(InventoryError::Invalid {
                location: device.source.clone(),
                message: format!(
                    "duplicate device name `{}`, first defined at line {}: give each device \
                     a unique name",
                    device.name, first.line
                ),
            });
        }
    }
    Ok(())
}

/// Checks a device name: it names report rows and run-record files, so it is restricted
/// to letters, digits, `.`, `_` and `-`.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("device name is empty: set `name`".to_owned());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "device name `{name}` contains {bad:?}: use only letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

/// Checks a host name or address. It never reaches a shell, but whitespace or a leading
/// `-` would only ever be a typo or an option injection.
fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("host is empty: set the device's address or DNS name".to_owned());
    }
    if host.starts_with('-') || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "invalid host `{}`: expected a DNS name or IP address",
            host.escape_debug()
        ));
    }
    Ok(())
}

/// Parses an SSH port; an empty value means [`DEFAULT_PORT`].
fn parse_port(text: &str) -> Result<u16, String> {
    if text.is_empty() {
        return Ok(DEFAULT_PORT);
    }
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!(
            "invalid port `{}`: expected a number from 1 to 65535",
            text.escape_debug()
        )),
    }
}

/// Checks a ProxyJump value the way ssh_config's ProxyJump is checked.
fn check_proxy_jump(value: &str) -> Result<(), String> {
    crate::ssh::ssh_config::parse_proxy_jump(value).map(|_| ())
}

/// Checks a login user name the way OpenSSH's client would accept it.
fn check_user(user: &str) -> Result<(), String> {
    if user.is_empty() {
        return Err("user is empty: set `user` or pass --user".to_owned());
    }
    if user.starts_with('-') || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("invalid user `{}`", user.escape_debug()));
    }
    Ok(())
}

/// Checks an ARM name segment (subscription, resource group or cluster name).
pub(crate) fn check_arm_segment(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} is empty"));
    }
    if value
        .chars()
        .any(|c| !(c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '(' | ')')))
    {
        return Err(format!(
            "invalid {field} `{}`: Azure names contain only letters, digits, `-`, `_`, `.`, \
             `(` and `)`",
            value.escape_debug()
        ));
    }
    Ok(())
}

/// Checks one label key or value.
fn check_label(key: &str, value: &str) -> Result<(), String> {
    let valid = |text: &str| {
        !text.is_empty()
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
    };
    if !valid(key) {
        return Err(format!(
            "invalid label key `{}`: use letters, digits, `.`, `_`, `-` and `/`",
            key.escape_debug()
        ));
    }
    if !valid(value) {
        return Err(format!(
            "invalid value `{}` for label `{key}`: use letters, digits, `.`, `_`, `-` and `/`",
            value.escape_debug()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_empty_means_default() {
        assert_eq!(parse_port(""), Ok(22));
        assert_eq!(parse_port("2222"), Ok(2222));
        assert!(parse_port("0").is_err());
        assert!(parse_port("70000").is_err());
        assert!(parse_port("22a").is_err());
    }

    #[test]
    fn name_rejects_shell_characters() {
        assert!(check_name("edge-01.plant_a").is_ok());
        assert!(check_name("edge 01").is_err());
        assert!(check_name("edge;rm").is_err());
        assert!(check_name("").is_err());
    }

    #[test]
    fn host_rejects_option_injection() {
        assert!(check_host("10.0.0.1").is_ok());
        assert!(check_host("-oProxyCommand=x").is_err());
        assert!(check_host("a b").is_err());
    }

    #[test]
    fn bundled_examples_describe_the_same_fleet() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("inventory");
        let options = LoadOptions::default();
        let yaml = load(&dir.join("plant-a.yaml"), &options).unwrap();
        let csv = load(&dir.join("plant-a.csv"), &options).unwrap();
        let ini = load(&dir.join("plant-a.ini"), &options).unwrap();
        let ansible_yaml = load(&dir.join("plant-a.ansible.yaml"), &options).unwrap();
        let summary = |inventory: &Inventory| -> Vec<_> {
            inventory
                .devices
                .iter()
                .map(|d| {
                    let cluster = if d.role == Role::Agent {
                        None
                    } else {
                        d.cluster.clone()
                    };
                    let labels: BTreeMap<String, String> = d
                        .labels
                        .iter()
                        .filter(|(key, _)| !key.starts_with("group/"))
                        .map(|(key, value)| (key.clone(), value.clone()))
                        .collect();
                    (
                        d.name.clone(),
                        d.host.clone(),
                        d.port.unwrap_or(DEFAULT_PORT),
                        d.user.clone(),
                        d.role,
                        cluster,
                        labels,
                    )
                })
                .collect()
        };
        assert_eq!(summary(&yaml), summary(&csv));
        assert_eq!(summary(&yaml), summary(&ini));
        assert_eq!(summary(&yaml), summary(&ansible_yaml));
    }

    #[test]
    fn cluster_key_ignores_case() {
        let a = ClusterRef {
            subscription: "SUB".into(),
            resource_group: "RG".into(),
            name: "C".into(),
        };
        let b = ClusterRef {
            subscription: "sub".into(),
            resource_group: "rg".into(),
            name: "c".into(),
        };
        assert_eq!(a.key(), b.key());
    }
}
