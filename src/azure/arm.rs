//! Azure Resource Manager reads: one connected cluster, the connected clusters of a
//! resource group or subscription (following `nextLink`), and the federated identity
//! credentials of a user-assigned identity.
//!
//! Single clusters are read with azure_mgmt_hybridkubernetes's `get().send()` and the body
//! is decoded leniently. Its list builders only offer `into_stream()`, which decodes pages
//! into the crate's strict models (`identity`, `location` and
//! `agentPublicKeyCertificate` are required), so one unusual cluster would fail a whole
//! page. arcfleet therefore sends the same list request (same path and api-version)
//! through the same azure_core pipeline and decodes each page item by item. Federated
//! identity credentials are read with azure_mgmt_msi, whose model requires only the fields
//! every credential has (`issuer`, `subject`, `audiences`).

use std::collections::HashSet;
use std::sync::Arc;

use azure_core::auth::TokenCredential;
use azure_core::error::{ErrorKind, HttpError};
use azure_core::{Context, Method, Pipeline, Request, StatusCode, Url};
use azure_mgmt_hybridkubernetes::package_2024_07_15_preview as hybrid;
use azure_mgmt_msi::package_2023_01_31 as msi;
use futures::StreamExt;
use serde::Deserialize;

use super::pipeline::{self, ArmStats, RetryBudgetExceeded, RetrySettings};
use super::readiness::ConnectedCluster;
use crate::inventory::ClusterRef;

/// The connectedClusters api-version of azure_mgmt_hybridkubernetes's default package;
/// the GA 2024-01-01 responses lack `oidcIssuerProfile` and `securityProfile`.
pub const CONNECTED_CLUSTERS_API_VERSION: &str = "2024-07-15-preview";

/// Pages one list may take before arcfleet gives up on it, in case an endpoint keeps
/// returning a `nextLink`.
const MAX_PAGES: usize = 10_000;

/// A scope whose connected clusters are listed in one paged request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListScope {
    /// Every connected cluster of a subscription.
    Subscription(String),
    /// Every connected cluster of a resource group: subscription and group name.
    ResourceGroup(String, String),
}

impl ListScope {
    /// Returns the ARM path of the list.
    pub fn path(&self) -> String {
        match self {
            ListScope::Subscription(subscription) => format!(
                "/subscriptions/{subscription}/providers/Microsoft.Kubernetes/connectedClusters"
            ),
            ListScope::ResourceGroup(subscription, group) => format!(
                "/subscriptions/{subscription}/resourcegroups/{group}/providers/Microsoft.Kubernetes/connectedClusters"
            ),
        }
    }
}

impl std::fmt::Display for ListScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListScope::Subscription(subscription) => write!(f, "subscription {subscription}"),
            ListScope::ResourceGroup(subscription, group) => {
                write!(f, "resource group {group} in subscription {subscription}")
            }
        }
    }
}

/// A user-assigned managed identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityRef {
    /// Subscription ID.
    pub subscription: String,
    /// Resource group name.
    pub resource_group: String,
    /// Identity name.
    pub name: String,
}

impl std::fmt::Display for IdentityRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.resource_group, self.name)
    }
}

/// A federated identity credential of a user-assigned identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedCredential {
    /// The credential's resource name.
    pub name: String,
    /// The trusted issuer URL.
    pub issuer: String,
    /// The trusted subject, `system:serviceaccount:<namespace>:<name>` for Kubernetes.
    pub subject: String,
    /// The accepted audiences.
    pub audiences: Vec<String>,
}

/// An ARM request that failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ArmError {
    /// No token could be obtained, or ARM rejected it (401).
    #[error("{0}")]
    Auth(String),
    /// ARM returned an error status.
    #[error("ARM returned HTTP {status} ({code}): {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// ARM error code (`ResourceNotFound`, `AuthorizationFailed`, ...).
        code: String,
        /// ARM error message.
        message: String,
    },
    /// ARM kept throttling the request beyond the retry budget.
    #[error("{0}")]
    Throttled(String),
    /// Another failure: transport, timeout or an unreadable body.
    #[error("{0}")]
    Other(String),
}

/// The ARM clients of a run. They share one set of pipeline policies, so the concurrency
/// cap and the request count cover every ARM request of the run.
pub struct ArmClient {
    endpoint: Url,
    scope: String,
    credential: Arc<dyn TokenCredential>,
    clusters: hybrid::Client,
    identities: msi::Client,
    pipeline: Pipeline,
    retry: RetrySettings,
    stats: Arc<ArmStats>,
}

impl ArmClient {
    /// Builds the clients for `endpoint`, getting tokens for `scope` from `credential`.
    pub fn new(
        endpoint: Url,
        scope: String,
        credential: Arc<dyn TokenCredential>,
        retry: RetrySettings,
    ) -> ArmClient {
        let stats = Arc::new(ArmStats::default());
        let options = pipeline::client_options(retry, stats.clone());
        let scopes = vec![scope.clone()];
        let clusters = hybrid::Client::new(
            endpoint.clone(),
            credential.clone(),
            scopes.clone(),
            options.clone(),
        );
        let identities = msi::Client::new(
            endpoint.clone(),
            credential.clone(),
            scopes,
            options.clone(),
        );
        let pipeline = Pipeline::new(
            option_env!("CARGO_PKG_NAME"),
            option_env!("CARGO_PKG_VERSION"),
            options,
            Vec::new(),
            Vec::new(),
        );
        ArmClient {
            endpoint,
            scope,
            credential,
            clusters,
            identities,
            pipeline,
            retry,
            stats,
        }
    }

    /// Returns the counts of requests sent so far.
    pub fn stats(&self) -> &ArmStats {
        &self.stats
    }

    /// Reads one connected cluster.
    pub async fn get_cluster(&self, cluster: &ClusterRef) -> Result<ConnectedCluster, ArmError> {
        let request = self.clusters.connected_cluster_client().get(
            cluster.subscription.clone(),
            cluster.resource_group.clone(),
            cluster.name.clone(),
        );
        let response = request.send().await.map_err(|e| self.classify(&e))?;
        let body = response
            .into_raw_response()
            .into_body()
            .collect()
            .await
            .map_err(|e| self.classify(&e))?;
        serde_json::from_slice(&body).map_err(|error| {
            ArmError::Other(format!(
                "ARM returned an unreadable body for {}: {error}",
                cluster.resource_id()
            ))
        })
    }

    /// Lists every connected cluster in `scope`, following `nextLink` to the last page.
    /// Items that are not resource objects are skipped with a warning.
    pub async fn list_clusters(
        &self,
        scope: &ListScope,
    ) -> Result<Vec<ConnectedCluster>, ArmError> {
        let mut url = self.endpoint.clone();
        url.set_path(&scope.path());
        url.query_pairs_mut()
            .append_pair("api-version", CONNECTED_CLUSTERS_API_VERSION);
        let mut clusters = Vec::new();
        let mut seen = HashSet::new();
        for page in 1..=MAX_PAGES {
            let body = self.get_page(url.clone()).await?;
            let next = decode_page(scope, &body, &mut clusters)?;
            tracing::trace!(%scope, page, clusters = clusters.len(), "read a list page");
            let Some(next) = next else {
                return Ok(clusters);
            };
            url = self.next_url(scope, &next)?;
            if !seen.insert(url.to_string()) {
                return Err(ArmError::Other(format!(
                    "ARM returned the same nextLink twice while listing {scope}"
                )));
            }
        }
        Err(ArmError::Other(format!(
            "listing {scope} did not end after {MAX_PAGES} pages"
        )))
    }

    /// Lists the federated identity credentials of a user-assigned identity.
    pub async fn list_federated_credentials(
        &self,
        identity: &IdentityRef,
    ) -> Result<Vec<FederatedCredential>, ArmError> {
        let mut pages = self
            .identities
            .federated_identity_credentials_client()
            .list(
                identity.subscription.clone(),
                identity.resource_group.clone(),
                identity.name.clone(),
            )
            .into_stream();
        let mut credentials = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.classify(&e))?;
            credentials.extend(page.value.into_iter().map(|item| {
                let properties = item.properties;
                FederatedCredential {
                    name: item.proxy_resource.resource.name.unwrap_or_default(),
                    issuer: properties
                        .as_ref()
                        .map(|p| p.issuer.clone())
                        .unwrap_or_default(),
                    subject: properties
                        .as_ref()
                        .map(|p| p.subject.clone())
                        .unwrap_or_default(),
                    audiences: properties.map(|p| p.audiences).unwrap_or_default(),
                }
            }));
        }
        Ok(credentials)
    }

    async fn get_page(&self, url: Url) -> Result<Vec<u8>, ArmError> {
        let token = self
            .credential
            .get_token(&[self.scope.as_str()])
            .await
            .map_err(|e| self.classify(&e))?;
        let mut request = Request::new(url, Method::Get);
        request.insert_header(
            azure_core::headers::AUTHORIZATION,
            format!("Bearer {}", token.token.secret()),
        );
        request.set_body(azure_core::EMPTY_BODY);
        let response = self
            .pipeline
            .send(&Context::new(), &mut request)
            .await
            .map_err(|e| self.classify(&e))?;
        if response.status() != StatusCode::Ok {
            return Err(ArmError::Other(format!(
                "ARM returned HTTP {} for a list request, expected 200",
                u16::from(response.status())
            )));
        }
        let body = response.into_body().collect().await;
        Ok(body.map_err(|e| self.classify(&e))?.to_vec())
    }

    /// Returns the URL of the next page. A `nextLink` must point at the ARM endpoint, so
    /// the token is never sent to another host.
    fn next_url(&self, scope: &ListScope, next: &str) -> Result<Url, ArmError> {
        let mut url = self.endpoint.join(next).map_err(|error| {
            ArmError::Other(format!(
                "ARM returned an invalid nextLink for {scope}: {error}"
            ))
        })?;
        if url.origin() != self.endpoint.origin() {
            return Err(ArmError::Other(format!(
                "ARM returned a nextLink to {} while listing {scope}; arcfleet sends tokens only \
                 to {}",
                url.origin().ascii_serialization(),
                self.endpoint.origin().ascii_serialization()
            )));
        }
        if !url.query_pairs().any(|(key, _)| key == "api-version") {
            url.query_pairs_mut()
                .append_pair("api-version", CONNECTED_CLUSTERS_API_VERSION);
        }
        Ok(url)
    }

    /// Turns an azure_core error into an [`ArmError`] with the details a user acts on.
    fn classify(&self, error: &azure_core::Error) -> ArmError {
        if let ErrorKind::Credential = error.kind() {
            return ArmError::Auth(format!(
                "Azure authentication failed: {}",
                error_chain(error)
            ));
        }
        if let Some(exceeded) = find_in_chain::<RetryBudgetExceeded>(error) {
            return ArmError::Throttled(format!(
                "{exceeded}: wait for ARM's read limit to recover and run again, or raise \
                 --arm-max-wait"
            ));
        }
        let Some(http) = find_in_chain::<HttpError>(error) else {
            return ArmError::Other(error_chain(error));
        };
        let status = http.status();
        let code = http.error_code().unwrap_or("no error code").to_owned();
        let message = http.error_message().unwrap_or("").to_owned();
        match status {
            StatusCode::TooManyRequests | StatusCode::ServiceUnavailable => {
                ArmError::Throttled(format!(
                    "ARM kept answering HTTP {} ({code}) until the {:.1} s retry budget \
                     (--arm-max-wait) ran out: wait for ARM's read limit to recover and run \
                     again, or raise --arm-max-wait",
                    u16::from(status),
                    self.retry.max_wait.as_secs_f64(),
                ))
            }
            StatusCode::Unauthorized => {
                ArmError::Auth(format!("ARM rejected the access token ({code}): {message}"))
            }
            status => ArmError::Status {
                status: u16::from(status),
                code,
                message,
            },
        }
    }
}

/// The list page envelope; items are decoded one by one.
#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    value: Option<Vec<serde_json::Value>>,
    #[serde(rename = "nextLink", default)]
    next_link: Option<String>,
}

/// Appends the clusters of one page and returns its `nextLink`, if any.
fn decode_page(
    scope: &ListScope,
    body: &[u8],
    clusters: &mut Vec<ConnectedCluster>,
) -> Result<Option<String>, ArmError> {
    let page: Page = serde_json::from_slice(body).map_err(|error| {
        ArmError::Other(format!(
            "ARM returned an unreadable list page for {scope}: {error}"
        ))
    })?;
    for item in page.value.unwrap_or_default() {
        match serde_json::from_value::<ConnectedCluster>(item) {
            Ok(cluster) => clusters.push(cluster),
            Err(error) => {
                tracing::warn!(%scope, "skipped an unreadable item of a list page: {error}")
            }
        }
    }
    Ok(page.next_link.filter(|link| !link.is_empty()))
}

/// Returns the first error of type `T` in the source chain of `error`, itself included.
fn find_in_chain<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}

/// Formats an error with its sources, once each.
pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
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

    fn scope() -> ListScope {
        ListScope::ResourceGroup("s".into(), "rg".into())
    }

    #[test]
    fn list_paths_follow_the_crate() {
        assert_eq!(
            ListScope::Subscription("s1".into()).path(),
            "/subscriptions/s1/providers/Microsoft.Kubernetes/connectedClusters"
        );
        assert_eq!(
            scope().path(),
            "/subscriptions/s/resourcegroups/rg/providers/Microsoft.Kubernetes/connectedClusters"
        );
    }

    #[test]
    fn page_skips_unreadable_items() {
        let body = br#"{"value":[{"name":"a","properties":{"connectivityStatus":"Connected"}},
            "not an object",{"name":"b","properties":{"provisioningState":7}}],
            "nextLink":"https://management.azure.com/next"}"#;
        let mut clusters = Vec::new();
        let next = decode_page(&scope(), body, &mut clusters).unwrap();
        assert_eq!(next.as_deref(), Some("https://management.azure.com/next"));
        let names: Vec<_> = clusters.iter().map(|c| c.name.clone().unwrap()).collect();
        assert_eq!(names, ["a"]);
    }

    #[test]
    fn last_page_has_no_next_link() {
        let mut clusters = Vec::new();
        assert_eq!(
            decode_page(&scope(), br#"{"value":[],"nextLink":""}"#, &mut clusters).unwrap(),
            None
        );
        assert_eq!(
            decode_page(&scope(), br#"{"value":null}"#, &mut clusters).unwrap(),
            None
        );
        assert!(decode_page(&scope(), b"\"text\"", &mut clusters).is_err());
    }

    #[test]
    fn next_link_to_another_host_is_rejected() {
        #[derive(Debug)]
        struct NoCredential;
        #[async_trait::async_trait]
        impl TokenCredential for NoCredential {
            async fn get_token(
                &self,
                _: &[&str],
            ) -> azure_core::Result<azure_core::auth::AccessToken> {
                Err(azure_core::Error::message(ErrorKind::Credential, "none"))
            }
            async fn clear_cache(&self) -> azure_core::Result<()> {
                Ok(())
            }
        }
        let client = ArmClient::new(
            Url::parse("http://127.0.0.1:9/").unwrap(),
            "http://127.0.0.1:9/.default".into(),
            Arc::new(NoCredential),
            RetrySettings::default(),
        );
        let same = client
            .next_url(&scope(), "http://127.0.0.1:9/subscriptions/s?$skiptoken=x")
            .unwrap();
        assert!(
            same.as_str().contains("api-version=2024-07-15-preview"),
            "{same}"
        );
        let error = client
            .next_url(&scope(), "https://evil.example/subscriptions/s")
            .unwrap_err();
        assert!(error.to_string().contains("evil.example"), "{error}");
    }
}
