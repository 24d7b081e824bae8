//! Resolving each connected cluster's OIDC issuer from Azure Resource Manager.
//!
//! - [`cloud`] picks the ARM endpoint, authority host and token scope.
//! - [`credential`] chooses the credential; [`entra`] implements the client-secret and
//!   workload-identity ones.
//! - [`pipeline`] is the azure_core pipeline every ARM request goes through (retries,
//!   concurrency cap, request count).
//! - [`arm`] sends the reads; [`read_plan`] chooses between GETs and list reads.
//! - [`readiness`] decodes a cluster leniently and applies the readiness gates.
//! - [`resolve`] reads every distinct cluster once and waits for pending issuers.
//! - [`issuers_file`] writes and reads the offline issuers file.
//! - [`identity`] compares federated identity credentials with the cluster issuers.
//! - [`oidc`] reads the signing keys an issuer publishes and decodes minted tokens.
//!
//! arcfleet reads connected clusters with api-version 2024-07-15-preview: the GA
//! 2024-01-01 responses lack `oidcIssuerProfile`.

pub mod arm;
pub mod cloud;
pub mod credential;
pub mod entra;
pub mod identity;
pub mod issuer;
pub mod issuers_file;
pub mod oidc;
pub mod pipeline;
pub mod read_plan;
pub mod readiness;
pub mod resolve;

use std::collections::HashMap;
use std::fmt;

pub use arm::ArmClient;
pub use readiness::Gate;
pub use resolve::resolve;

use crate::inventory::ClusterRef;

/// The reason a cluster's devices cannot be converged.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterProblem {
    /// ARM does not know the cluster.
    NotFound(String),
    /// The cluster exists but fails a readiness gate.
    NotReady {
        /// The first gate that failed.
        gate: Gate,
        /// What failed and the fix.
        message: String,
    },
    /// ARM reports an issuer arcfleet refuses to write.
    InvalidIssuer(String),
    /// The credential could not get a token.
    AuthFailed(String),
    /// Another ARM error.
    Failed(String),
}

impl ClusterProblem {
    /// Returns the status name used in the issuers file.
    pub fn status(&self) -> &'static str {
        match self {
            ClusterProblem::NotFound(_) => "not-found",
            ClusterProblem::NotReady { .. } => "not-ready",
            ClusterProblem::InvalidIssuer(_) => "invalid-issuer",
            ClusterProblem::AuthFailed(_) => "auth-failed",
            ClusterProblem::Failed(_) => "failed",
        }
    }

    /// Returns the report cause for the cluster's devices.
    pub fn cause(&self) -> crate::report::Cause {
        use crate::report::Cause;
        match self {
            ClusterProblem::NotFound(_) | ClusterProblem::Failed(_) => Cause::AzureClusterNotFound,
            ClusterProblem::NotReady {
                gate: Gate::OidcIssuer,
                ..
            }
            | ClusterProblem::InvalidIssuer(_) => Cause::IssuerMissingInAzure,
            ClusterProblem::NotReady { .. } => Cause::AzureClusterNotReady,
            ClusterProblem::AuthFailed(_) => Cause::AzureAuthFailed,
        }
    }

    /// Returns the message with its fix.
    pub fn message(&self) -> &str {
        match self {
            ClusterProblem::NotFound(m)
            | ClusterProblem::NotReady { message: m, .. }
            | ClusterProblem::InvalidIssuer(m)
            | ClusterProblem::AuthFailed(m)
            | ClusterProblem::Failed(m) => m,
        }
    }
}

impl fmt::Display for ClusterProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// Issuers resolved for a run, keyed by [`ClusterRef::key`].
#[derive(Debug, Default)]
pub struct Resolution {
    results: HashMap<(String, String, String), Result<String, ClusterProblem>>,
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

    /// Records the result of one cluster.
    pub fn insert(&mut self, cluster: &ClusterRef, result: Result<String, ClusterProblem>) {
        self.results.insert(cluster.key(), result);
    }

    /// Returns the number of clusters recorded.
    pub fn len(&self) -> usize {
        self.results.len()
    }

    /// Returns whether no cluster is recorded.
    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }
}

/// Returns each cluster once, in first-appearance order, comparing as ARM does.
pub fn distinct(clusters: &[ClusterRef]) -> Vec<ClusterRef> {
    let mut seen = std::collections::HashSet::new();
    clusters
        .iter()
        .filter(|cluster| seen.insert(cluster.key()))
        .cloned()
        .collect()
}
