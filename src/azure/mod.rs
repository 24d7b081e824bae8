//! Resolving each connected cluster's OIDC issuer from Azure Resource Manager.
//!
//! arcfleet reads every distinct cluster once, never once per device, through
//! azure_mgmt_hybridkubernetes's client with api-version 2024-07-15-preview: the GA
//! 2024-01-01 responses lack `oidcIssuerProfile`. The response body is decoded leniently
//! (every field optional), so a cluster that lacks an optional field fails only on the
//! readiness gate that needs it.

pub mod credential;
pub mod issuer;
pub mod oidc;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use azure_core::error::ErrorKind;
use azure_core::{ExponentialRetryOptions, RetryOptions, StatusCode, Url};
use azure_mgmt_hybridkubernetes::package_2024_07_15_preview::Client;
use futures::stream::{self, StreamExt};
use serde::Deserialize;

use crate::inventory::ClusterRef;

/// The public cloud's Resource Manager endpoint.
pub const PUBLIC_ARM_ENDPOINT: &str = "https://management.azure.com/";

/// Parallel ARM reads. ARM allows thousands of reads per subscription per hour; eight at
/// once keeps a large fleet's resolution short without bursting into throttling.
const ARM_CONCURRENCY: usize = 8;

/// How to reach Azure.
#[derive(Clone)]
pub struct AzureSettings {
    /// Resource Manager endpoint.
    pub arm_endpoint: Url,
    /// The credential.
    pub credential: Arc<dyn azure_core::auth::TokenCredential>,
}

/// The reason a cluster's devices cannot be converged.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterProblem {
    /// ARM does not know the cluster.
    NotFound(String),
    /// The cluster exists but fails a readiness gate.
    NotReady(String),
    /// The cluster has no issuer URL yet.
    NoIssuer(String),
    /// ARM reports an issuer arcfleet refuses to write.
    InvalidIssuer(String),
    /// The credential could not get a token.
    AuthFailed(String),
    /// Another ARM error.
    Failed(String),
}

impl ClusterProblem {
    /// Returns the report cause for the cluster's devices.
    pub fn cause(&self) -> crate::report::Cause {
        use crate::report::Cause;
        match self {
            ClusterProblem::NotFound(_) | ClusterProblem::Failed(_) => Cause::AzureClusterNotFound,
            ClusterProblem::NotReady(_) => Cause::AzureClusterNotReady,
            ClusterProblem::NoIssuer(_) | ClusterProblem::InvalidIssuer(_) => {
                Cause::IssuerMissingInAzure
            }
            ClusterProblem::AuthFailed(_) => Cause::AzureAuthFailed,
        }
    }
}

impl std::fmt::Display for ClusterProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterProblem::NotFound(m)
            | ClusterProblem::NotReady(m)
            | ClusterProblem::NoIssuer(m)
            | ClusterProblem::InvalidIssuer(m)
            | ClusterProblem::AuthFailed(m)
            | ClusterProblem::Failed(m) => f.write_str(m),
        }
    }
}

/// Issuers resolved for a run, keyed by [`ClusterRef::key`].
#[derive(Debug, Default)]
pub struct Resolution {
    results: HashMap<(String, String, String), Result<String, ClusterProblem>>,
    /// ARM requests sent, retries excluded.
    pub requests: usize,
}

impl Resolution {
    /// Returns the issuer of a cluster, or why there is none.
    pub fn issuer(&self, cluster: &ClusterRef) -> Result<&str, ClusterProblem> {
        match self.results.get(&cluster.key()) {
            Some(Ok(issuer)) => Ok(issuer),
            Some(Err(problem)) => Err(problem.clone()),
            None => Err(ClusterProblem::Failed(format!(
                "cluster {cluster} was not resolved"
            ))),
        }
    }

    /// Returns the first authentication failure, if the credential failed.
    pub fn auth_failure(&self) -> Option<&str> {
        self.results.values().find_map(|result| match result {
            Err(ClusterProblem::AuthFailed(message)) => Some(message.as_str()),
            _ => None,
        })
    }

    /// Records a result directly; for offline sources and tests.
    pub fn insert(&mut self, cluster: &ClusterRef, result: Result<String, ClusterProblem>) {
        self.results.insert(cluster.key(), result);
    }
}

/// Reads every distinct cluster in `clusters` once.
pub async fn resolve(settings: &AzureSettings, clusters: &[ClusterRef]) -> Resolution {
    let mut distinct: Vec<&ClusterRef> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for cluster in clusters {
        if seen.insert(cluster.key()) {
            distinct.push(cluster);
        }
    }
    let client = match build_client(settings) {
        Ok(client) => client,
        Err(error) => {
            let mut resolution = Resolution::default();
            for cluster in distinct {
                resolution.insert(cluster, Err(ClusterProblem::Failed(error.to_string())));
            }
            return resolution;
        }
    };

    let requests = AtomicUsize::new(0);
    let results: Vec<_> = stream::iter(distinct)
        .map(|cluster| {
            let client = &client;
            let requests = &requests;
            async move {
                requests.fetch_add(1, Ordering::Relaxed);
                (cluster, read_cluster(client, cluster).await)
            }
        })
        .buffer_unordered(ARM_CONCURRENCY)
        .collect()
        .await;

    let mut resolution = Resolution {
        requests: requests.into_inner(),
        ..Resolution::default()
    };
    for (cluster, result) in results {
        match &result {
            Ok(issuer) => tracing::debug!(cluster = %cluster, issuer = %issuer, "resolved issuer"),
            Err(problem) => tracing::warn!(cluster = %cluster, "cluster not usable: {problem}"),
        }
        resolution.insert(cluster, result);
    }
    resolution
}

fn build_client(settings: &AzureSettings) -> azure_core::Result<Client> {
    let retry = ExponentialRetryOptions::default()
        .initial_delay(Duration::from_millis(500))
        .max_retries(5u32)
        .max_delay(Duration::from_secs(30))
        .max_total_elapsed(Duration::from_secs(90));
    let scope = settings.arm_endpoint.join(".default")?.to_string();
    Client::builder(settings.credential.clone())
        .endpoint(settings.arm_endpoint.clone())
        .scopes(&[scope.as_str()])
        .retry(RetryOptions::exponential(retry))
        .build()
}

/// The parts of a connectedClusters resource arcfleet reads, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ConnectedCluster {
    properties: Properties,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Properties {
    connectivity_status: Option<String>,
    provisioning_state: Option<String>,
    oidc_issuer_profile: Option<OidcIssuerProfile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct OidcIssuerProfile {
    enabled: Option<bool>,
    issuer_url: Option<String>,
}

async fn read_cluster(client: &Client, cluster: &ClusterRef) -> Result<String, ClusterProblem> {
    let request = client.connected_cluster_client().get(
        cluster.subscription.clone(),
        cluster.resource_group.clone(),
        cluster.name.clone(),
    );
    let response = request
        .send()
        .await
        .map_err(|error| classify(cluster, &error))?;
    let body = response
        .into_raw_response()
        .into_body()
        .collect()
        .await
        .map_err(|error| classify(cluster, &error))?;
    let resource: ConnectedCluster = serde_json::from_slice(&body).map_err(|error| {
        ClusterProblem::Failed(format!(
            "ARM returned an unreadable body for {cluster}: {error}"
        ))
    })?;
    issuer_of(cluster, &resource.properties)
}

/// Applies the readiness gates and returns the issuer.
fn issuer_of(cluster: &ClusterRef, properties: &Properties) -> Result<String, ClusterProblem> {
    let not_ready = |message: String| Err(ClusterProblem::NotReady(message));
    match properties.connectivity_status.as_deref() {
        Some("Connected") => {}
        status => {
            return not_ready(format!(
                "cluster {cluster} is not connected to Azure Arc (connectivityStatus {}): \
                 check the Arc agents on the cluster (`kubectl get pods -n azure-arc`)",
                status.unwrap_or("missing")
            ))
        }
    }
    match properties.provisioning_state.as_deref() {
        Some("Succeeded") | None => {}
        Some(state) => {
            return not_ready(format!(
                "cluster {cluster} has provisioningState {state}: wait until it is Succeeded"
            ))
        }
    }
    let profile = properties.oidc_issuer_profile.as_ref();
    if profile.and_then(|p| p.enabled) != Some(true) {
        return not_ready(format!(
            "cluster {cluster} has the OIDC issuer disabled: run `az connectedk8s update \
             --name {} --resource-group {} --enable-oidc-issuer`",
            cluster.name, cluster.resource_group
        ));
    }
    let issuer = profile
        .and_then(|p| p.issuer_url.clone())
        .unwrap_or_default();
    if issuer.is_empty() {
        return Err(ClusterProblem::NoIssuer(format!(
            "cluster {cluster} has no OIDC issuer URL yet: Azure fills it in minutes after \
             the issuer is enabled; run again later"
        )));
    }
    issuer::validate(&issuer).map_err(|reason| {
        ClusterProblem::InvalidIssuer(format!(
            "ARM returned issuer {} for cluster {cluster}, which arcfleet will not write to a \
             node: {reason}",
            issuer.escape_debug()
        ))
    })?;
    Ok(issuer)
}

/// Turns an SDK error into the cluster's problem, with the fix.
fn classify(cluster: &ClusterRef, error: &azure_core::Error) -> ClusterProblem {
    if let ErrorKind::Credential = error.kind() {
        return ClusterProblem::AuthFailed(format!(
            "Azure authentication failed: {}",
            error_chain(error)
        ));
    }
    let Some(http) = error.as_http_error() else {
        return ClusterProblem::Failed(format!(
            "cannot read {cluster} from ARM: {}",
            error_chain(error)
        ));
    };
    let code = http.error_code().unwrap_or("");
    let message = http.error_message().unwrap_or("");
    match http.status() {
        StatusCode::NotFound => ClusterProblem::NotFound(format!(
            "ARM has no connected cluster {} ({code}): check the subscription, resource group \
             and name in the inventory",
            cluster.resource_id()
        )),
        StatusCode::Forbidden => ClusterProblem::Failed(format!(
            "not allowed to read {} ({code}): grant the identity the Reader role on it. {message}",
            cluster.resource_id()
        )),
        StatusCode::Unauthorized => {
            ClusterProblem::AuthFailed(format!("ARM rejected the access token ({code}): {message}"))
        }
        status => ClusterProblem::Failed(format!(
            "ARM returned {} for {} ({code}): {message}",
            u16::from(status),
            cluster.resource_id()
        )),
    }
}

/// Formats an error with its sources, once each.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        let next_text = next.to_string();
        if !text.contains(&next_text) {
            text.push_str(": ");
            text.push_str(&next_text);
        }
        source = next.source();
    }
    text
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

    #[test]
    fn ready_cluster_gives_issuer() {
        let p = properties(
            r#"{"properties":{"connectivityStatus":"Connected","provisioningState":"Succeeded",
            "oidcIssuerProfile":{"enabled":true,"issuerUrl":"https://eastus.oic.prod-arc.azure.com/t/u/"}}}"#,
        );
        assert_eq!(
            issuer_of(&cluster(), &p).unwrap(),
            "https://eastus.oic.prod-arc.azure.com/t/u/"
        );
    }

    #[test]
    fn ga_response_without_profile_is_not_ready() {
        let p = properties(r#"{"properties":{"connectivityStatus":"Connected"}}"#);
        let error = issuer_of(&cluster(), &p).unwrap_err();
        assert!(
            error.to_string().contains("--enable-oidc-issuer"),
            "{error}"
        );
    }

    #[test]
    fn offline_cluster_is_not_ready() {
        let p = properties(r#"{"properties":{"connectivityStatus":"Offline"}}"#);
        let error = issuer_of(&cluster(), &p).unwrap_err();
        assert!(
            error.to_string().contains("connectivityStatus Offline"),
            "{error}"
        );
    }

    #[test]
    fn empty_issuer_is_not_ready() {
        let p = properties(
            r#"{"properties":{"connectivityStatus":"Connected","oidcIssuerProfile":{"enabled":true,"issuerUrl":""}}}"#,
        );
        let error = issuer_of(&cluster(), &p).unwrap_err();
        assert!(
            error.to_string().contains("no OIDC issuer URL yet"),
            "{error}"
        );
    }

    #[test]
    fn quoted_issuer_is_refused() {
        let p = properties(
            r#"{"properties":{"connectivityStatus":"Connected","oidcIssuerProfile":{"enabled":true,"issuerUrl":"https://a/'x"}}}"#,
        );
        assert!(matches!(
            issuer_of(&cluster(), &p),
            Err(ClusterProblem::InvalidIssuer(_))
        ));
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let p = properties(
            r#"{"properties":{"connectivityStatus":"Connected","newThing":{"a":1}},"extra":1}"#,
        );
        assert_eq!(p.connectivity_status.as_deref(), Some("Connected"));
    }
}
