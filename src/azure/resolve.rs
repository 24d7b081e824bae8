//! Reading every distinct cluster once, applying the readiness gates, and waiting for
//! clusters whose issuer is not there yet.
//!
//! The steps: plan the reads ([`read_plan`]) and send at most
//! [`ARM_CONCURRENCY`](super::pipeline::ARM_CONCURRENCY) of them at a time, while the
//! pipeline caps the HTTP requests themselves. Where a list is not allowed, fall back to
//! narrower reads. Then apply the gates, and with a wait re-read only the pending clusters
//! until they are ready or the wait is over. The results are kept for the whole run.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};

use super::arm::{ArmClient, ArmError, ListScope};
use super::pipeline::ARM_CONCURRENCY;
use super::read_plan::{self, Read};
use super::readiness::{self, ConnectedCluster, Readiness};
use super::{distinct, ClusterProblem, Gate, Resolution};
use crate::inventory::ClusterRef;

/// Clusters whose problem is logged as a warning. The rest are logged at debug level and
/// counted, because one failed list can make hundreds of clusters fail for one reason.
const MAX_WARNINGS: usize = 5;

/// Shortest and longest pause between polls of pending clusters.
const MIN_POLL_INTERVAL: Duration = Duration::from_secs(2);
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(15);

type Key = (String, String, String);
type ReadResult = Result<ConnectedCluster, ClusterProblem>;

/// The state of one cluster after a read and the gates.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Every gate passed.
    Ready(String),
    /// A gate failed in a way that usually clears by itself.
    Pending(Gate, String),
    /// The read failed or a gate needs a fix.
    Problem(ClusterProblem),
}

impl Outcome {
    fn of(cluster: &ClusterRef, read: Option<ReadResult>) -> Outcome {
        let resource = match read {
            Some(Ok(resource)) => resource,
            Some(Err(problem)) => return Outcome::Problem(problem),
            None => {
                return Outcome::Problem(ClusterProblem::Failed(format!(
                    "cluster {cluster} was not read"
                )))
            }
        };
        match readiness::check(cluster, &resource.properties) {
            Readiness::Ready(issuer) => Outcome::Ready(issuer),
            Readiness::Pending(gate, message) => Outcome::Pending(gate, message),
            Readiness::Failed(gate, message) => {
                Outcome::Problem(ClusterProblem::NotReady { gate, message })
            }
            Readiness::InvalidIssuer(message) => {
                Outcome::Problem(ClusterProblem::InvalidIssuer(message))
            }
        }
    }

    fn into_result(self, waited: Duration) -> Result<String, ClusterProblem> {
        match self {
            Outcome::Ready(issuer) => Ok(issuer),
            Outcome::Pending(gate, message) if waited.is_zero() => {
                Err(ClusterProblem::NotReady { gate, message })
            }
            Outcome::Pending(gate, message) => Err(ClusterProblem::NotReady {
                gate,
                message: format!(
                    "{message} (still so after waiting {})",
                    humantime::format_duration(waited)
                ),
            }),
            Outcome::Problem(problem) => Err(problem),
        }
    }
}

/// Resolves the issuer of every distinct cluster in `clusters`. With a non-zero
/// `wait_for_issuer`, clusters that are still pending (no issuer URL yet, connecting, or
/// provisioning) are read again until they are ready or the wait is over.
pub async fn resolve(
    client: &ArmClient,
    clusters: &[ClusterRef],
    wait_for_issuer: Duration,
) -> Resolution {
    let clusters = distinct(clusters);
    let deadline = Instant::now() + wait_for_issuer;
    let mut outcomes = gate_all(&clusters, read_all(client, &clusters).await);

    let interval = poll_interval(wait_for_issuer);
    loop {
        let pending = pending(&clusters, &outcomes);
        let now = Instant::now();
        if pending.is_empty() || now >= deadline {
            break;
        }
        tracing::info!(
            clusters = pending.len(),
            seconds_left = (deadline - now).as_secs(),
            "waiting for pending clusters (--wait-for-issuer)"
        );
        tokio::time::sleep(interval.min(deadline - now)).await;
        outcomes.extend(gate_all(&pending, read_all(client, &pending).await));
    }

    let mut resolution = Resolution::default();
    let mut unusable = 0;
    for cluster in &clusters {
        let outcome = outcomes
            .remove(&cluster.key())
            .unwrap_or_else(|| Outcome::of(cluster, None));
        let result = outcome.into_result(wait_for_issuer);
        match &result {
            Ok(issuer) => tracing::debug!(cluster = %cluster, issuer = %issuer, "resolved issuer"),
            Err(problem) if unusable < MAX_WARNINGS => {
                unusable += 1;
                tracing::warn!(cluster = %cluster, "cluster not usable: {problem}");
            }
            Err(problem) => {
                unusable += 1;
                tracing::debug!(cluster = %cluster, "cluster not usable: {problem}");
            }
        }
        resolution.insert(cluster, result);
    }
    if unusable > MAX_WARNINGS {
        tracing::warn!(
            clusters = unusable - MAX_WARNINGS,
            "more clusters not usable; the reports list each one (-v logs them)"
        );
    }
    resolution
}

fn pending(clusters: &[ClusterRef], outcomes: &HashMap<Key, Outcome>) -> Vec<ClusterRef> {
    clusters
        .iter()
        .filter(|c| matches!(outcomes.get(&c.key()), Some(Outcome::Pending(..))))
        .cloned()
        .collect()
}

/// Returns the pause between polls: a twentieth of the wait, within the bounds.
fn poll_interval(wait: Duration) -> Duration {
    (wait / 20).clamp(MIN_POLL_INTERVAL, MAX_POLL_INTERVAL)
}

fn gate_all(clusters: &[ClusterRef], mut reads: HashMap<Key, ReadResult>) -> HashMap<Key, Outcome> {
    clusters
        .iter()
        .map(|cluster| {
            (
                cluster.key(),
                Outcome::of(cluster, reads.remove(&cluster.key())),
            )
        })
        .collect()
}

/// Reads every cluster with the planned reads, at most [`ARM_CONCURRENCY`] reads at once.
async fn read_all(client: &ArmClient, clusters: &[ClusterRef]) -> HashMap<Key, ReadResult> {
    run_plan(client, read_plan::plan(clusters, true)).await
}

fn run_plan(client: &ArmClient, reads: Vec<Read>) -> BoxFuture<'_, HashMap<Key, ReadResult>> {
    Box::pin(async move {
        let results: Vec<Vec<(ClusterRef, ReadResult)>> = stream::iter(reads)
            .map(|read| run_read(client, read))
            .buffer_unordered(ARM_CONCURRENCY)
            .collect()
            .await;
        results
            .into_iter()
            .flatten()
            .map(|(cluster, result)| (cluster.key(), result))
            .collect()
    })
}

async fn run_read(client: &ArmClient, read: Read) -> Vec<(ClusterRef, ReadResult)> {
    match read {
        Read::Get(cluster) => {
            let result = client
                .get_cluster(&cluster)
                .await
                .map_err(|error| problem(&cluster, error));
            vec![(cluster, result)]
        }
        Read::List(scope, members) => match client.list_clusters(&scope).await {
            Ok(resources) => pick_members(&scope, members, resources),
            Err(error) => list_failed(client, scope, members, error).await,
        },
    }
}

/// Handles a failed list: a 403 falls back to narrower reads, a missing scope makes each
/// member not found, and any other error is each member's problem.
async fn list_failed(
    client: &ArmClient,
    scope: ListScope,
    members: Vec<ClusterRef>,
    error: ArmError,
) -> Vec<(ClusterRef, ReadResult)> {
    if let ArmError::Status { status: 403, .. } = &error {
        tracing::info!(%scope, "listing is not allowed; reading its clusters with narrower requests");
        let narrower = match scope {
            ListScope::Subscription(_) => read_plan::plan(&members, false),
            ListScope::ResourceGroup(..) => members.iter().cloned().map(Read::Get).collect(),
        };
        let mut results = run_plan(client, narrower).await;
        return members
            .into_iter()
            .map(|cluster| {
                let result = results.remove(&cluster.key()).unwrap_or_else(|| {
                    Err(ClusterProblem::Failed(format!(
                        "cluster {cluster} was not read"
                    )))
                });
                (cluster, result)
            })
            .collect();
    }
    members
        .into_iter()
        .map(|cluster| {
            let result = Err(problem(&cluster, error.clone()));
            (cluster, result)
        })
        .collect()
}

/// Picks the inventory's clusters out of a list; a cluster the list lacks is not found.
fn pick_members(
    scope: &ListScope,
    members: Vec<ClusterRef>,
    resources: Vec<ConnectedCluster>,
) -> Vec<(ClusterRef, ReadResult)> {
    let mut by_key: HashMap<Key, ConnectedCluster> = resources
        .into_iter()
        .filter_map(|resource| Some((key_of_id(resource.id.as_deref()?)?, resource)))
        .collect();
    members
        .into_iter()
        .map(|cluster| {
            let result = by_key.remove(&cluster.key()).ok_or_else(|| {
                ClusterProblem::NotFound(format!(
                    "ARM has no connected cluster {}: the list of {scope} does not contain it; \
                     check the subscription, resource group and name in the inventory",
                    cluster.resource_id()
                ))
            });
            (cluster, result)
        })
        .collect()
}

/// Returns the lowercased (subscription, resource group, name) of a connected cluster's
/// resource ID, or `None` for another kind of ID.
fn key_of_id(id: &str) -> Option<Key> {
    let segments: Vec<&str> = id.trim_matches('/').split('/').collect();
    let [subscriptions, subscription, groups, group, providers, namespace, kind, name] =
        segments.as_slice()
    else {
        return None;
    };
    let expected = [
        (subscriptions, "subscriptions"),
        (groups, "resourcegroups"),
        (providers, "providers"),
        (namespace, "microsoft.kubernetes"),
        (kind, "connectedclusters"),
    ];
    if !expected
        .iter()
        .all(|(segment, word)| segment.eq_ignore_ascii_case(word))
    {
        return None;
    }
    Some((
        subscription.to_ascii_lowercase(),
        group.to_ascii_lowercase(),
        name.to_ascii_lowercase(),
    ))
}

/// Turns a failed read into the cluster's problem, with the fix.
fn problem(cluster: &ClusterRef, error: ArmError) -> ClusterProblem {
    let id = cluster.resource_id();
    match error {
        ArmError::Auth(message) => ClusterProblem::AuthFailed(message),
        ArmError::Throttled(message) => {
            ClusterProblem::Failed(format!("cannot read {id}: {message}"))
        }
        ArmError::Status {
            status: 404,
            code,
            message,
        } => ClusterProblem::NotFound(format!(
            "ARM has no connected cluster {id} ({code}: {message}): check the subscription, \
             resource group and name in the inventory"
        )),
        ArmError::Status {
            status: 403,
            code,
            message,
        } => ClusterProblem::Failed(format!(
            "not allowed to read {id} ({code}): grant the identity the Reader role on the \
             cluster or its resource group. {message}"
        )),
        ArmError::Status {
            status,
            code,
            message,
        } => ClusterProblem::Failed(format!(
            "ARM returned HTTP {status} for {id} ({code}): {message}"
        )),
        ArmError::Other(message) => {
            ClusterProblem::Failed(format!("cannot read {id} from ARM: {message}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str) -> ClusterRef {
        ClusterRef {
            subscription: "S1".into(),
            resource_group: "RG".into(),
            name: name.into(),
        }
    }

    fn resource(id: &str) -> ConnectedCluster {
        ConnectedCluster {
            id: Some(id.into()),
            ..ConnectedCluster::default()
        }
    }

    #[test]
    fn resource_ids_match_case_insensitively() {
        assert_eq!(
            key_of_id("/subscriptions/S1/resourceGroups/Rg/providers/Microsoft.Kubernetes/connectedClusters/C1"),
            Some(("s1".into(), "rg".into(), "c1".into()))
        );
        assert_eq!(
            key_of_id(
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/v"
            ),
            None
        );
        assert_eq!(key_of_id("/subscriptions/s"), None);
    }

    #[test]
    fn list_without_member_reports_not_found() {
        let scope = ListScope::ResourceGroup("S1".into(), "RG".into());
        let picked = pick_members(
            &scope,
            vec![cluster("c1"), cluster("c2")],
            vec![resource(
                "/subscriptions/s1/resourcegroups/rg/providers/Microsoft.Kubernetes/connectedClusters/c1",
            )],
        );
        assert!(picked[0].1.is_ok());
        let Err(ClusterProblem::NotFound(message)) = &picked[1].1 else {
            panic!("{:?}", picked[1]);
        };
        assert!(
            message.contains("ARM has no connected cluster"),
            "{message}"
        );
        assert!(message.contains("resource group RG"), "{message}");
    }

    #[test]
    fn pending_outcome_mentions_wait() {
        let outcome = Outcome::Pending(Gate::OidcIssuer, "no issuer yet".into());
        let Err(problem) = outcome.into_result(Duration::from_secs(90)) else {
            panic!("pending is not ready");
        };
        assert_eq!(
            problem.message(),
            "no issuer yet (still so after waiting 1m 30s)"
        );
        assert!(matches!(
            problem,
            ClusterProblem::NotReady {
                gate: Gate::OidcIssuer,
                ..
            }
        ));
    }

    #[test]
    fn poll_interval_stays_in_bounds() {
        assert_eq!(poll_interval(Duration::from_secs(10)), MIN_POLL_INTERVAL);
        assert_eq!(
            poll_interval(Duration::from_secs(100)),
            Duration::from_secs(5)
        );
        assert_eq!(poll_interval(Duration::from_secs(3600)), MAX_POLL_INTERVAL);
    }

    #[test]
    fn forbidden_read_names_reader_role() {
        let problem = problem(
            &cluster("c1"),
            ArmError::Status {
                status: 403,
                code: "AuthorizationFailed".into(),
                message: "no".into(),
            },
        );
        assert!(problem.message().contains("Reader role"), "{problem}");
    }
}
