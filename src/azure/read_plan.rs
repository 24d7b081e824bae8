//! Choosing how to read a set of connected clusters from ARM with few requests.
//!
//! The rule, per subscription:
//!
//! 1. A resource group with [`GROUP_LIST_MIN`] or more of the clusters is listed, one
//!    request per page. A resource group with one of them is read with a GET.
//! 2. When that leaves [`SUBSCRIPTION_LIST_MIN`] or more reads in one subscription, the
//!    whole subscription is listed instead.
//!
//! A list returns every connected cluster of its scope, including ones the inventory does
//! not name, so a subscription list costs one request per page of all its clusters.
//! When a list is not allowed (HTTP 403), its clusters are read again with the next
//! narrower plan: resource group lists and GETs for a subscription, GETs for a group.

use std::collections::HashMap;

use super::arm::ListScope;
use crate::inventory::ClusterRef;

/// Clusters of one resource group from which the group is listed instead of read one by
/// one.
pub const GROUP_LIST_MIN: usize = 2;

/// Reads in one subscription from which the subscription is listed instead.
// NOTE: a subscription with many more connected clusters than the inventory names costs a
// request per page of all of them, because the rule cannot know a scope's size in advance.
pub const SUBSCRIPTION_LIST_MIN: usize = 3;

/// One read of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// GET one cluster.
    Get(ClusterRef),
    /// List a scope and pick out these clusters.
    List(ListScope, Vec<ClusterRef>),
}

/// Plans the reads for distinct `clusters`; `allow_subscription` enables step 2 of the
/// rule. The plan keeps the order in which subscriptions and groups first appear.
pub fn plan(clusters: &[ClusterRef], allow_subscription: bool) -> Vec<Read> {
    let mut reads = Vec::new();
    for (subscription, members) in group_by(clusters, |c| c.subscription.to_ascii_lowercase()) {
        let mut subscription_reads = Vec::new();
        for (_, group) in group_by(&members, |c| c.resource_group.to_ascii_lowercase()) {
            subscription_reads.push(if group.len() >= GROUP_LIST_MIN {
                let scope = ListScope::ResourceGroup(
                    group[0].subscription.clone(),
                    group[0].resource_group.clone(),
                );
                Read::List(scope, group)
            } else {
                Read::Get(group[0].clone())
            });
        }
        if allow_subscription && subscription_reads.len() >= SUBSCRIPTION_LIST_MIN {
            let scope = ListScope::Subscription(members[0].subscription.clone());
            tracing::debug!(%subscription, clusters = members.len(), "listing the subscription");
            reads.push(Read::List(scope, members));
        } else {
            reads.extend(subscription_reads);
        }
    }
    reads
}

/// Groups clusters by a key, keeping first-appearance order of keys and members.
fn group_by(
    clusters: &[ClusterRef],
    key: impl Fn(&ClusterRef) -> String,
) -> Vec<(String, Vec<ClusterRef>)> {
    let mut groups: Vec<(String, Vec<ClusterRef>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for cluster in clusters {
        let group_key = key(cluster);
        let position = *index.entry(group_key.clone()).or_insert_with(|| {
            groups.push((group_key, Vec::new()));
            groups.len() - 1
        });
        groups[position].1.push(cluster.clone());
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(subscription: &str, group: &str, name: &str) -> ClusterRef {
        ClusterRef {
            subscription: subscription.into(),
            resource_group: group.into(),
            name: name.into(),
        }
    }

    #[test]
    fn single_cluster_is_read_with_get() {
        let clusters = [cluster("s", "rg", "c1")];
        assert_eq!(plan(&clusters, true), [Read::Get(clusters[0].clone())]);
    }

    #[test]
    fn two_clusters_in_a_group_list_the_group() {
        let clusters = [cluster("s", "rg", "c1"), cluster("s", "RG", "c2")];
        let reads = plan(&clusters, true);
        assert_eq!(reads.len(), 1);
        assert!(
            matches!(&reads[0], Read::List(ListScope::ResourceGroup(_, group), members)
                if group == "rg" && members.len() == 2),
            "{reads:?}"
        );
    }

    #[test]
    fn many_groups_list_the_subscription() {
        let clusters = [
            cluster("s", "a", "c1"),
            cluster("s", "b", "c2"),
            cluster("s", "c", "c3"),
            cluster("t", "a", "c4"),
        ];
        let reads = plan(&clusters, true);
        assert_eq!(reads.len(), 2, "{reads:?}");
        assert!(
            matches!(&reads[0], Read::List(ListScope::Subscription(s), members)
                if s == "s" && members.len() == 3),
            "{reads:?}"
        );
        assert_eq!(reads[1], Read::Get(clusters[3].clone()));
    }

    #[test]
    fn two_reads_keep_group_plan() {
        let clusters = [
            cluster("s", "a", "c1"),
            cluster("s", "a", "c2"),
            cluster("s", "b", "c3"),
        ];
        let reads = plan(&clusters, true);
        assert_eq!(reads.len(), 2, "{reads:?}");
        assert!(matches!(
            &reads[0],
            Read::List(ListScope::ResourceGroup(..), _)
        ));
        assert_eq!(reads[1], Read::Get(clusters[2].clone()));
    }

    #[test]
    fn fallback_plan_never_lists_subscription() {
        let clusters = [
            cluster("s", "a", "c1"),
            cluster("s", "b", "c2"),
            cluster("s", "c", "c3"),
        ];
        let reads = plan(&clusters, false);
        assert!(
            reads.iter().all(|read| matches!(read, Read::Get(_))),
            "{reads:?}"
        );
    }

    #[test]
    fn two_subscriptions_need_two_lists() {
        let clusters: Vec<ClusterRef> = (0..200)
            .map(|i| {
                cluster(
                    ["s1", "s2"][i % 2],
                    &format!("rg-{}", i % 20),
                    &format!("c{i}"),
                )
            })
            .collect();
        let reads = plan(&clusters, true);
        assert_eq!(reads.len(), 2);
        assert!(reads.iter().all(
            |read| matches!(read, Read::List(ListScope::Subscription(_), m) if m.len() == 100)
        ));
    }
}
