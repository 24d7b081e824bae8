//! kube-apiserver arguments as K3s assembles them from its defaults and the
//! `kube-apiserver-arg` items.
//!
//! The rules follow K3s's `pkg/util/args.go` (`GetArgs`). For each item `key=value`, in
//! order:
//!
//! - `key=value` drops K3s's default for the key and appends the value to what earlier
//!   items gave;
//! - `key+=value` keeps the default first, then earlier values, then the value;
//! - `key-=value` puts the value first, then the default, then earlier values.
//!
//! Once an item names a key, the default is gone for later items. A bare `key` means
//! `key=true`.

use std::collections::BTreeMap;

use super::Origin;

/// K3s's default `cluster-domain`.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// Returns K3s's default service-account issuer for a cluster domain.
pub fn default_issuer(cluster_domain: &str) -> String {
    format!("https://kubernetes.default.svc.{cluster_domain}")
}

/// One value of a kube-apiserver flag and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ArgValue {
    /// The flag value.
    pub value: String,
    /// The config item that set it, or `None` for K3s's built-in default.
    pub origin: Option<Origin>,
}

/// The kube-apiserver flags that matter for the issuer, with every value in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApiServerArgs {
    flags: BTreeMap<String, Vec<ArgValue>>,
}

impl ApiServerArgs {
    /// Applies `items` (the `kube-apiserver-arg` values in order) over K3s's defaults.
    pub fn assemble(defaults: &[(&str, String)], items: &[(String, Origin)]) -> Self {
        let mut initial: BTreeMap<String, String> = defaults
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone()))
            .collect();
        let mut flags: BTreeMap<String, Vec<ArgValue>> = BTreeMap::new();

        for (item, origin) in items {
            let item = item.strip_prefix("--").unwrap_or(item);
            let (raw_key, value) = item.split_once('=').unwrap_or((item, "true"));
            let key = raw_key.trim_end_matches(['+', '-']).to_owned();
            let default = initial.remove(&key).map(|value| ArgValue {
                value,
                origin: None,
            });
            let existing = flags.remove(&key).unwrap_or_default();
            let new = ArgValue {
                value: value.to_owned(),
                origin: Some(origin.clone()),
            };
            let values = if raw_key.ends_with('+') {
                default.into_iter().chain(existing).chain([new]).collect()
            } else if raw_key.ends_with('-') {
                [new].into_iter().chain(default).chain(existing).collect()
            } else {
                existing.into_iter().chain([new]).collect()
            };
            flags.insert(key, values);
        }
        for (key, value) in initial {
            flags.insert(
                key,
                vec![ArgValue {
                    value,
                    origin: None,
                }],
            );
        }
        ApiServerArgs { flags }
    }

    /// Returns every value of a flag, in the order kube-apiserver receives them.
    pub fn values(&self, key: &str) -> &[ArgValue] {
        self.flags.get(key).map_or(&[], Vec::as_slice)
    }

    /// Returns the value kube-apiserver uses for a single-valued flag: the last one given.
    pub fn last(&self, key: &str) -> Option<&ArgValue> {
        self.values(key).last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUER: &str = "service-account-issuer";

    fn assemble(items: &[&str]) -> Vec<String> {
        let defaults = [(ISSUER, default_issuer(DEFAULT_CLUSTER_DOMAIN))];
        let items: Vec<(String, Origin)> = items
            .iter()
            .enumerate()
            .map(|(i, item)| ((*item).to_owned(), Origin::new("/c.yaml", i + 1)))
            .collect();
        ApiServerArgs::assemble(&defaults, &items)
            .values(ISSUER)
            .iter()
            .map(|v| v.value.clone())
            .collect()
    }

    const DEFAULT: &str = "https://kubernetes.default.svc.cluster.local";

    #[test]
    fn no_items_keep_default() {
        assert_eq!(assemble(&[]), vec![DEFAULT]);
    }

    #[test]
    fn plain_item_replaces_default() {
        assert_eq!(
            assemble(&["service-account-issuer=https://a/"]),
            vec!["https://a/"]
        );
    }

    #[test]
    fn repeated_plain_items_accumulate() {
        assert_eq!(
            assemble(&[
                "service-account-issuer=https://a/",
                "service-account-issuer=https://b/"
            ]),
            vec!["https://a/", "https://b/"]
        );
    }

    #[test]
    fn plus_item_appends_after_default() {
        assert_eq!(
            assemble(&["service-account-issuer+=https://a/"]),
            vec![DEFAULT, "https://a/"]
        );
    }

    #[test]
    fn minus_item_prepends_before_default() {
        assert_eq!(
            assemble(&["service-account-issuer-=https://a/"]),
            vec!["https://a/", DEFAULT]
        );
    }

    #[test]
    fn minus_item_prepends_before_earlier_values() {
        assert_eq!(
            assemble(&[
                "service-account-issuer=https://x/",
                "service-account-issuer-=https://a/"
            ]),
            vec!["https://a/", "https://x/"]
        );
    }

    #[test]
    fn default_is_used_only_once() {
        assert_eq!(
            assemble(&[
                "service-account-issuer+=https://a/",
                "service-account-issuer+=https://b/"
            ]),
            vec![DEFAULT, "https://a/", "https://b/"]
        );
    }

    #[test]
    fn leading_dashes_are_ignored() {
        assert_eq!(
            assemble(&["--service-account-issuer=https://a/"]),
            vec!["https://a/"]
        );
    }

    #[test]
    fn bare_key_means_true() {
        let items = vec![("anonymous-auth".to_owned(), Origin::new("/c", 1))];
        let args = ApiServerArgs::assemble(&[], &items);
        assert_eq!(args.last("anonymous-auth").unwrap().value, "true");
    }

    #[test]
    fn default_origin_is_none() {
        let defaults = [(ISSUER, DEFAULT.to_owned())];
        let args = ApiServerArgs::assemble(&defaults, &[]);
        assert_eq!(args.values(ISSUER)[0].origin, None);
    }
}
