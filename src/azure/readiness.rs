//! The parts of a `Microsoft.Kubernetes/connectedClusters` resource arcfleet reads, and the
//! readiness gates a cluster must pass before its issuer is written to a node.
//!
//! Every field is optional and unknown fields are ignored, for single resources and list
//! pages alike, so a cluster that lacks an optional field fails only the gate that needs
//! it instead of failing the whole page.

use std::fmt;

use serde::Deserialize;

use super::issuer;
use crate::inventory::ClusterRef;

/// A connected cluster resource, as far as arcfleet reads it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct ConnectedCluster {
    /// ARM resource ID.
    pub id: Option<String>,
    /// Resource name.
    pub name: Option<String>,
    /// Resource properties.
    pub properties: Properties,
}

/// `properties` of a connected cluster.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct Properties {
    /// `Connecting`, `Connected`, `Offline`, `Expired` or a value added later.
    pub connectivity_status: Option<String>,
    /// `Succeeded`, `Failed`, `Canceled`, `Provisioning`, `Updating`, `Deleting`,
    /// `Accepted` or a value added later.
    pub provisioning_state: Option<String>,
    /// Present only in preview api-versions (2024-07-15-preview and later).
    pub oidc_issuer_profile: Option<OidcIssuerProfile>,
    /// Present only in preview api-versions (2024-07-15-preview and later).
    pub security_profile: Option<SecurityProfile>,
}

/// `properties.oidcIssuerProfile`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct OidcIssuerProfile {
    /// Whether the Arc OIDC issuer is enabled.
    pub enabled: Option<bool>,
    /// The issuer URL, empty for a while after the issuer is enabled.
    pub issuer_url: Option<String>,
}

/// `properties.securityProfile`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase")]
pub struct SecurityProfile {
    /// `securityProfile.workloadIdentity`.
    pub workload_identity: Option<WorkloadIdentity>,
}

/// `properties.securityProfile.workloadIdentity`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct WorkloadIdentity {
    /// Whether the workload identity webhook is enabled.
    pub enabled: Option<bool>,
}

/// A readiness gate, in the order they are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gate {
    /// `connectivityStatus` is `Connected`.
    Connectivity,
    /// `provisioningState` is `Succeeded`.
    Provisioning,
    /// `oidcIssuerProfile.enabled` is true and `issuerUrl` is a valid URL.
    OidcIssuer,
    /// `securityProfile.workloadIdentity.enabled` is true.
    WorkloadIdentity,
}

impl Gate {
    /// Returns the gate's name in reports and the issuers file.
    pub fn as_str(self) -> &'static str {
        match self {
            Gate::Connectivity => "connectivity",
            Gate::Provisioning => "provisioning",
            Gate::OidcIssuer => "oidc-issuer",
            Gate::WorkloadIdentity => "workload-identity",
        }
    }

    /// Parses a name from [`Gate::as_str`].
    pub fn parse(text: &str) -> Option<Gate> {
        [
            Gate::Connectivity,
            Gate::Provisioning,
            Gate::OidcIssuer,
            Gate::WorkloadIdentity,
        ]
        .into_iter()
        .find(|gate| gate.as_str() == text)
    }
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of the gates for one cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum Readiness {
    /// Every gate passed.
    Ready(String),
    /// A gate failed in a way that usually clears by itself: the issuer URL is not filled
    /// in yet, or the cluster is still connecting or updating. `--wait-for-issuer` polls
    /// these.
    Pending(Gate, String),
    /// A gate failed and needs a fix, given in the message.
    Failed(Gate, String),
    /// ARM returned an issuer that arcfleet refuses to write.
    InvalidIssuer(String),
}

/// Applies the gates in order and returns the first that fails, with its fix.
pub fn check(cluster: &ClusterRef, properties: &Properties) -> Readiness {
    if let Some(readiness) = check_connectivity(cluster, properties.connectivity_status.as_deref())
    {
        return readiness;
    }
    if let Some(readiness) = check_provisioning(cluster, properties.provisioning_state.as_deref()) {
        return readiness;
    }
    let issuer = match check_oidc(cluster, properties.oidc_issuer_profile.as_ref()) {
        Ok(issuer) => issuer,
        Err(readiness) => return readiness,
    };
    let workload_identity = properties
        .security_profile
        .as_ref()
        .and_then(|profile| profile.workload_identity.as_ref())
        .and_then(|identity| identity.enabled);
    if workload_identity != Some(true) {
        return Readiness::Failed(
            Gate::WorkloadIdentity,
            format!(
                "cluster {cluster} has workload identity disabled \
                 (securityProfile.workloadIdentity.enabled is {}): run `az connectedk8s update \
                 --name {} --resource-group {} --enable-workload-identity`",
                describe_bool(workload_identity),
                cluster.name,
                cluster.resource_group
            ),
        );
    }
    Readiness::Ready(issuer)
}

fn check_connectivity(cluster: &ClusterRef, status: Option<&str>) -> Option<Readiness> {
    let fix = match status {
        Some("Connected") => return None,
        Some("Connecting") => {
            let message = format!(
                "cluster {cluster} is still connecting to Azure Arc (connectivityStatus \
                 Connecting): wait until the Arc agents report in, or pass --wait-for-issuer"
            );
            return Some(Readiness::Pending(Gate::Connectivity, message));
        }
        Some("Offline") => {
            "the Arc agents have not reported for a while: check them with `kubectl get pods \
             -n azure-arc` and the cluster's outbound network"
        }
        Some("Expired") => {
            "the cluster was offline so long that its Arc managed identity certificate \
             expired: delete the connected cluster and connect it again with `az connectedk8s \
             connect`"
        }
        _ => "check the Arc agents on the cluster (`kubectl get pods -n azure-arc`)",
    };
    Some(Readiness::Failed(
        Gate::Connectivity,
        format!(
            "cluster {cluster} is not connected to Azure Arc (connectivityStatus {}): {fix}",
            status.unwrap_or("missing")
        ),
    ))
}

fn check_provisioning(cluster: &ClusterRef, state: Option<&str>) -> Option<Readiness> {
    match state {
        // A response without the field is read as Succeeded, as before this gate existed.
        Some("Succeeded") | None => None,
        Some(state @ ("Provisioning" | "Updating" | "Accepted")) => Some(Readiness::Pending(
            Gate::Provisioning,
            format!(
                "cluster {cluster} has provisioningState {state}: wait until it is Succeeded, \
                 or pass --wait-for-issuer"
            ),
        )),
        Some(state) => Some(Readiness::Failed(
            Gate::Provisioning,
            format!(
                "cluster {cluster} has provisioningState {state}: fix the failed operation in \
                 the cluster's activity log, then run `az connectedk8s update --name {} \
                 --resource-group {}` to reach Succeeded",
                cluster.name, cluster.resource_group
            ),
        )),
    }
}

fn check_oidc(
    cluster: &ClusterRef,
    profile: Option<&OidcIssuerProfile>,
) -> Result<String, Readiness> {
    let enabled = profile.and_then(|p| p.enabled);
    if enabled != Some(true) {
        return Err(Readiness::Failed(
            Gate::OidcIssuer,
            format!(
                "cluster {cluster} has the OIDC issuer disabled (oidcIssuerProfile.enabled is \
                 {}): run `az connectedk8s update --name {} --resource-group {} \
                 --enable-oidc-issuer`",
                describe_bool(enabled),
                cluster.name,
                cluster.resource_group
            ),
        ));
    }
    let issuer = profile
        .and_then(|p| p.issuer_url.clone())
        .unwrap_or_default();
    if issuer.is_empty() {
        return Err(Readiness::Pending(
            Gate::OidcIssuer,
            format!(
                "cluster {cluster} has no OIDC issuer URL yet: Azure fills it in within minutes \
                 of enabling the issuer; pass --wait-for-issuer to wait for it"
            ),
        ));
    }
    issuer::validate(&issuer).map_err(|reason| {
        Readiness::InvalidIssuer(format!(
            "ARM returned issuer {} for cluster {cluster}, which arcfleet will not write to a \
             node: {reason}",
            issuer.escape_debug()
        ))
    })?;
    Ok(issuer)
}

fn describe_bool(value: Option<bool>) -> &'static str {
    match value {
        Some(true) => "true",
        Some(false) => "false",
        None => "missing",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterRef {
        ClusterRef {
            subscription: "s".into(),
            resource_group: "rg".into(),
            name: "c1".into(),
        }
    }

    fn properties(json: &str) -> Properties {
        serde_json::from_str::<ConnectedCluster>(json)
            .unwrap()
            .properties
    }

    const READY: &str = r#"{"properties":{"connectivityStatus":"Connected","provisioningState":"Succeeded",
        "oidcIssuerProfile":{"enabled":true,"issuerUrl":"https://eastus.oic.prod-arc.azure.com/t/u/"},
        "securityProfile":{"workloadIdentity":{"enabled":true}}}}"#;

    #[test]
    fn ready_cluster_gives_issuer() {
        assert_eq!(
            check(&cluster(), &properties(READY)),
            Readiness::Ready("https://eastus.oic.prod-arc.azure.com/t/u/".into())
        );
    }

    #[test]
    fn ga_response_without_profile_fails_oidc_gate() {
        let p = properties(r#"{"properties":{"connectivityStatus":"Connected"}}"#);
        let Readiness::Failed(gate, message) = check(&cluster(), &p) else {
            panic!("expected a failed gate");
        };
        assert_eq!(gate, Gate::OidcIssuer);
        assert!(message.contains("--enable-oidc-issuer"), "{message}");
        assert!(message.contains("is missing"), "{message}");
    }

    #[test]
    fn connectivity_states_map_to_gates() {
        for (status, pending) in [
            ("Connecting", true),
            ("Offline", false),
            ("Expired", false),
            ("SomethingNew", false),
        ] {
            let p = properties(&format!(
                r#"{{"properties":{{"connectivityStatus":"{status}"}}}}"#
            ));
            let readiness = check(&cluster(), &p);
            match (&readiness, pending) {
                (Readiness::Pending(Gate::Connectivity, _), true) => {}
                (Readiness::Failed(Gate::Connectivity, message), false) => {
                    assert!(message.contains(status), "{message}");
                }
                _ => panic!("{status}: {readiness:?}"),
            }
        }
    }

    #[test]
    fn missing_connectivity_fails() {
        let readiness = check(&cluster(), &properties("{}"));
        assert!(
            matches!(&readiness, Readiness::Failed(Gate::Connectivity, m) if m.contains("missing")),
            "{readiness:?}"
        );
    }

    #[test]
    fn provisioning_states_map_to_gates() {
        let base = |state: &str| {
            properties(&READY.replace(
                r#""provisioningState":"Succeeded""#,
                &format!(r#""provisioningState":"{state}""#),
            ))
        };
        assert!(matches!(
            check(&cluster(), &base("Updating")),
            Readiness::Pending(Gate::Provisioning, _)
        ));
        assert!(matches!(
            check(&cluster(), &base("Failed")),
            Readiness::Failed(Gate::Provisioning, _)
        ));
    }

    #[test]
    fn empty_issuer_is_pending() {
        let p = properties(&READY.replace("https://eastus.oic.prod-arc.azure.com/t/u/", ""));
        let readiness = check(&cluster(), &p);
        assert!(
            matches!(&readiness, Readiness::Pending(Gate::OidcIssuer, m) if m.contains("--wait-for-issuer")),
            "{readiness:?}"
        );
    }

    #[test]
    fn disabled_workload_identity_fails_last_gate() {
        let p = properties(&READY.replace(
            r#""workloadIdentity":{"enabled":true}"#,
            r#""workloadIdentity":{"enabled":false}"#,
        ));
        let readiness = check(&cluster(), &p);
        assert!(
            matches!(&readiness, Readiness::Failed(Gate::WorkloadIdentity, m) if m.contains("--enable-workload-identity")),
            "{readiness:?}"
        );
        let p = properties(&READY.replace(r#""workloadIdentity":{"enabled":true}"#, ""));
        assert!(matches!(
            check(&cluster(), &p),
            Readiness::Failed(Gate::WorkloadIdentity, _)
        ));
    }

    #[test]
    fn quoted_issuer_is_refused() {
        let p = properties(&READY.replace("/t/u/", "/t/'u/"));
        assert!(matches!(check(&cluster(), &p), Readiness::InvalidIssuer(_)));
    }

    #[test]
    fn unknown_and_null_fields_are_tolerated() {
        let p = properties(
            r#"{"properties":{"connectivityStatus":"Connected","newThing":{"a":1},
            "oidcIssuerProfile":null,"securityProfile":{"workloadIdentity":null}},"extra":1}"#,
        );
        assert_eq!(p.connectivity_status.as_deref(), Some("Connected"));
        assert_eq!(p.oidc_issuer_profile, None);
    }

    #[test]
    fn gate_names_round_trip() {
        for gate in [
            Gate::Connectivity,
            Gate::Provisioning,
            Gate::OidcIssuer,
            Gate::WorkloadIdentity,
        ] {
            assert_eq!(Gate::parse(gate.as_str()), Some(gate));
        }
        assert_eq!(Gate::parse("nope"), None);
    }
}
