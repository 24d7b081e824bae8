//! The change arcfleet makes on a K3s server, decided from the node's effective
//! configuration.
//!
//! arcfleet owns one drop-in, [`DROPIN_NAME`], in the config file's `.d` directory and
//! never rewrites other files. The drop-in appends to `kube-apiserver-arg` (the `+` key
//! suffix), so every earlier setting stays. It names the Arc issuer with the `-=`
//! operator, which K3s puts before every other issuer value, so the Arc issuer signs new
//! tokens and the issuer the node used before stays accepted. Its name starts with `zz-`
//! so that it sorts after the drop-ins people usually write (`10-foo.yaml`, `node.yaml`);
//! a drop-in that sorts later and replaces `kube-apiserver-arg` without `+` would discard
//! it, and arcfleet then refuses the node, naming that file and line.

use std::time::Duration;

use super::apiserver::{self, ApiServerArgs, ArgValue};
use super::config::{order_dropins, ConfigError, ConfigFile, MergedConfig};
use super::duration::parse_go_duration;
use super::unit::Unit;
use super::Origin;

/// Name of the drop-in arcfleet owns.
pub const DROPIN_NAME: &str = "zz-arcfleet-oidc-issuer.yaml";

/// Default location of the K3s config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rancher/k3s/config.yaml";

const ISSUER_FLAG: &str = "service-account-issuer";
const EXPIRATION_FLAG: &str = "service-account-max-token-expiration";
const APISERVER_ARG_KEY: &str = "kube-apiserver-arg";

/// Everything read from a node that shapes kube-apiserver's flags.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFiles {
    /// The K3s unit with its drop-ins.
    pub unit: Unit,
    /// Variables from the unit's environment files and `Environment=` lines, in order.
    pub environment: Vec<(String, String)>,
    /// The main config file, when it exists.
    pub main: Option<ConfigFile>,
    /// Every regular file in the drop-in directory, in any order.
    pub dropins: Vec<ConfigFile>,
}

/// The flags the node should run with.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The cluster's Arc OIDC issuer URL, exactly as ARM returns it.
    pub issuer: String,
    /// Whether the issuers the node used before stay accepted after the Arc issuer.
    pub keep_previous_issuers: bool,
    /// Value for `service-account-max-token-expiration`, as a Go duration.
    pub max_token_expiration: String,
}

/// kube-apiserver's issuer-related flags as one set of files produces them.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    /// `service-account-issuer` values in order; the first signs new tokens.
    pub issuers: Vec<ArgValue>,
    /// The last `service-account-max-token-expiration` value, if any.
    pub max_token_expiration: Option<ArgValue>,
    /// The cluster domain, which decides K3s's default issuer.
    pub cluster_domain: String,
    /// Files read, in merge order.
    pub files: Vec<String>,
    /// The file and line that last replaced `kube-apiserver-arg` without `+`.
    pub apiserver_args_replaced_at: Option<Origin>,
}

impl Effective {
    /// Returns the issuer values alone.
    pub fn issuer_list(&self) -> Vec<String> {
        self.issuers.iter().map(|v| v.value.clone()).collect()
    }
}

/// The outcome converging the node would have.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The configuration already gives the target flags.
    Configured,
    /// Writing the new drop-in content gives the target flags.
    Change,
    /// No drop-in content gives the target flags; the reason names the file and line.
    Blocked(String),
}

/// The planned change for one node.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Absolute path of arcfleet's drop-in.
    pub dropin_path: String,
    /// The drop-in's current content, if the file exists.
    pub current_dropin: Option<String>,
    /// The drop-in's content after the change (`None`: the file should not exist).
    pub new_dropin: Option<String>,
    /// Flags from the files as they are.
    pub before: Effective,
    /// Flags after the change (equal to `before` unless the decision is a change).
    pub after: Effective,
    /// The issuer list the target requires.
    pub expected_issuers: Vec<String>,
    /// The decision.
    pub decision: Decision,
}

/// The node's configuration could not be evaluated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// A config file is invalid, so K3s itself would fail to start.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The target's token lifetime is not a Go duration.
    #[error("invalid max token expiration `{0}`: expected a Go duration such as `24h`")]
    Expiration(String),
}

impl NodeFiles {
    /// Returns the config file K3s reads: `K3S_CONFIG_FILE` wins over `--config`, which
    /// wins over the default path.
    pub fn config_path(&self) -> String {
        if let Some((_, path)) = self
            .environment
            .iter()
            .rev()
            .find(|(name, value)| name == "K3S_CONFIG_FILE" && !value.is_empty())
        {
            return path.clone();
        }
        flag_values(&self.unit.flags(), &["--config", "-c"])
            .last()
            .map_or_else(
                || DEFAULT_CONFIG_PATH.to_owned(),
                |(value, _)| value.clone(),
            )
    }

    /// Returns the path of arcfleet's drop-in.
    pub fn dropin_path(&self) -> String {
        format!("{}.d/{DROPIN_NAME}", self.config_path())
    }

    /// Returns the Kubernetes node name K3s registers, when the configuration sets one:
    /// `K3S_NODE_NAME`, a `--node-name` flag, or `node-name` in the config files. K3s
    /// uses the host name otherwise.
    pub fn node_name(&self) -> Option<String> {
        let from_env = self
            .environment
            .iter()
            .rev()
            .find(|(name, value)| name == "K3S_NODE_NAME" && !value.is_empty())
            .map(|(_, value)| value.clone());
        let from_flag = || {
            flag_values(&self.unit.flags(), &["--node-name"])
                .last()
                .map(|(value, _)| value.clone())
        };
        let from_config = || {
            let dropins = order_dropins(self.dropins.clone());
            let merged = MergedConfig::merge(self.main.as_ref(), &dropins).ok()?;
            merged.scalar("node-name").map(|item| item.text.clone())
        };
        from_env
            .or_else(from_flag)
            .or_else(from_config)
            .filter(|name| !name.is_empty())
    }

    /// Computes the flags this node's files give, with arcfleet's drop-in replaced by
    /// `dropin` (`None`: without it).
    pub fn effective_with(&self, dropin: Option<&str>) -> Result<Effective, ConfigError> {
        let dropin_path = self.dropin_path();
        let mut dropins: Vec<ConfigFile> = self
            .dropins
            .iter()
            .filter(|file| file.path != dropin_path)
            .cloned()
            .collect();
        if let Some(text) = dropin {
            dropins.push(ConfigFile {
                path: dropin_path,
                text: text.to_owned(),
            });
        }
        let merged = MergedConfig::merge(self.main.as_ref(), &order_dropins(dropins))?;
        Ok(self.effective_of(&merged))
    }

    fn effective_of(&self, merged: &MergedConfig) -> Effective {
        let unit_flags = self.unit.flags();
        let cluster_domain = flag_values(&unit_flags, &["--cluster-domain"])
            .last()
            .map(|(value, _)| value.clone())
            .or_else(|| {
                merged
                    .scalar("cluster-domain")
                    .map(|item| item.text.clone())
            })
            .filter(|domain| !domain.is_empty())
            .unwrap_or_else(|| apiserver::DEFAULT_CLUSTER_DOMAIN.to_owned());

        // Config file values come first; K3s appends the unit's own flags after them.
        let mut items: Vec<(String, Origin)> = merged
            .items(APISERVER_ARG_KEY)
            .into_iter()
            .map(|item| (item.text, item.origin))
            .collect();
        items.extend(flag_values(&unit_flags, &["--kube-apiserver-arg"]));

        let defaults = [(ISSUER_FLAG, apiserver::default_issuer(&cluster_domain))];
        let args = ApiServerArgs::assemble(&defaults, &items);
        Effective {
            issuers: args.values(ISSUER_FLAG).to_vec(),
            max_token_expiration: args.last(EXPIRATION_FLAG).cloned(),
            cluster_domain,
            files: merged.files.clone(),
            apiserver_args_replaced_at: merged
                .get(APISERVER_ARG_KEY)
                .map(|state| state.replaced_at.clone()),
        }
    }

    /// Plans the change that gives `target`.
    pub fn plan(&self, target: &Target) -> Result<Plan, PlanError> {
        let wanted_expiration = parse_go_duration(&target.max_token_expiration)
            .ok_or_else(|| PlanError::Expiration(target.max_token_expiration.clone()))?;
        let dropin_path = self.dropin_path();
        let current_dropin = self
            .dropins
            .iter()
            .find(|file| file.path == dropin_path)
            .map(|file| file.text.clone());

        let before = self.effective_with(current_dropin.as_deref())?;
        let base = self.effective_with(None)?;
        // Arc issuers an earlier converge wrote stay accepted after a new one, so tokens
        // signed with them keep validating until keep_previous_issuers is turned off.
        let earlier_arc: Vec<String> = current_dropin
            .as_deref()
            .map(dropin_issuers)
            .unwrap_or_default()
            .into_iter()
            .filter(|issuer| *issuer != target.issuer)
            .collect();
        let target_earlier = if target.keep_previous_issuers {
            earlier_arc
        } else {
            Vec::new()
        };
        let expected_issuers = expected_issuers(&base, target, &target_earlier);
        let mut plan = Plan {
            dropin_path,
            current_dropin: current_dropin.clone(),
            new_dropin: current_dropin.clone(),
            after: before.clone(),
            before,
            expected_issuers,
            decision: Decision::Configured,
        };
        if satisfies(&plan.before, &plan.expected_issuers, wanted_expiration) {
            return Ok(plan);
        }

        let mut blocked = None;
        for candidate in candidate_dropins(&base, target, &target_earlier, wanted_expiration) {
            let after = self.effective_with(candidate.as_deref())?;
            if satisfies(&after, &plan.expected_issuers, wanted_expiration) {
                plan.decision = Decision::Change;
                plan.new_dropin = candidate;
                plan.after = after;
                return Ok(plan);
            }
            blocked.get_or_insert((candidate, after));
        }
        if let Some((candidate, after)) = blocked {
            let reason = explain_block(&after, &plan.expected_issuers, target, &plan.dropin_path);
            plan.decision = Decision::Blocked(reason);
            plan.new_dropin = candidate;
            plan.after = after;
        }
        Ok(plan)
    }
}

/// Collects the values of a flag from a command line, in both `--flag=value` and
/// `--flag value` forms.
fn flag_values(flags: &[(String, Origin)], names: &[&str]) -> Vec<(String, Origin)> {
    let mut values = Vec::new();
    let mut iter = flags.iter();
    while let Some((arg, origin)) = iter.next() {
        for name in names {
            if arg == name {
                if let Some((value, _)) = iter.next() {
                    values.push((value.clone(), origin.clone()));
                }
            } else if let Some(value) = arg.strip_prefix(&format!("{name}=")) {
                values.push((value.to_owned(), origin.clone()));
            }
        }
    }
    values
}

/// The issuer list the target requires: the Arc issuer, then (when kept) earlier Arc
/// issuers from arcfleet's drop-in and the issuers the node's own files give, each once.
fn expected_issuers(base: &Effective, target: &Target, earlier_arc: &[String]) -> Vec<String> {
    let mut issuers = vec![target.issuer.clone()];
    if target.keep_previous_issuers {
        for issuer in earlier_arc.iter().cloned().chain(base.issuer_list()) {
            if !issuers.contains(&issuer) {
                issuers.push(issuer);
            }
        }
    }
    issuers
}

fn satisfies(effective: &Effective, expected_issuers: &[String], expiration: Duration) -> bool {
    let expiration_ok = effective
        .max_token_expiration
        .as_ref()
        .and_then(|value| parse_go_duration(&value.value))
        == Some(expiration);
    effective.issuer_list() == expected_issuers && expiration_ok
}

/// Lists drop-in contents that may give the target, most preferred first; `None` stands
/// for no drop-in.
///
/// The `-=` form puts the Arc issuer before every other value whichever file sets them.
/// When a later source (an ExecStart flag) sets an issuer with the plain form, K3s drops
/// its default only at that point, so `-=` would keep the default as an extra issuer; the
/// plain form avoids that. The caller takes the first candidate that gives the target.
fn candidate_dropins(
    base: &Effective,
    target: &Target,
    earlier_arc: &[String],
    expiration: Duration,
) -> Vec<Option<String>> {
    let base_expiration = base
        .max_token_expiration
        .as_ref()
        .and_then(|value| parse_go_duration(&value.value));
    let expiration_item = (base_expiration != Some(expiration))
        .then(|| format!("{EXPIRATION_FLAG}={}", target.max_token_expiration));

    // `-=` items each go to the front, so earlier Arc issuers are written first (last
    // first) and the new Arc issuer last, which leaves it in front of them.
    let earlier_items: Vec<String> = earlier_arc
        .iter()
        .rev()
        .map(|issuer| format!("{ISSUER_FLAG}-={issuer}"))
        .collect();
    let issuer_forms: Vec<Vec<String>> =
        if base.issuer_list().first() == Some(&target.issuer) && earlier_arc.is_empty() {
            vec![Vec::new()]
        } else if target.keep_previous_issuers {
            let prepend = format!("{ISSUER_FLAG}-={}", target.issuer);
            let plain = format!("{ISSUER_FLAG}={}", target.issuer);
            vec![
                earlier_items.iter().cloned().chain([prepend]).collect(),
                [plain]
                    .into_iter()
                    .chain(earlier_items.iter().map(|i| i.replacen("-=", "+=", 1)))
                    .collect(),
            ]
        } else {
            vec![vec![format!("{ISSUER_FLAG}={}", target.issuer)]]
        };
    issuer_forms
        .into_iter()
        .map(|issuer_items| {
            let items: Vec<String> = issuer_items
                .into_iter()
                .chain(expiration_item.clone())
                .collect();
            dropin_text(&items)
        })
        .collect()
}

/// Returns the Arc issuers named in arcfleet's drop-in, in the order they were written.
fn dropin_issuers(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let item = line
                .trim()
                .trim_start_matches("- ")
                .trim()
                .trim_matches('"');
            let value = item.strip_prefix(ISSUER_FLAG)?;
            let value = value.trim_start_matches(['-', '+']).strip_prefix('=')?;
            Some(value.to_owned())
        })
        .collect()
}

/// Renders the drop-in for `items`, or `None` when there is nothing to set.
fn dropin_text(items: &[String]) -> Option<String> {
    if items.is_empty() {
        return None;
    }
    let mut text = String::from(
        "# Written by arcfleet; the next converge replaces this file, so keep other settings\n\
         # in other files. kube-apiserver signs service-account tokens with the first\n\
         # service-account-issuer (the cluster's Azure Arc OIDC issuer) and accepts the rest.\n\
         kube-apiserver-arg+:\n",
    );
    for item in items {
        // Items are validated before planning: issuers contain no quote, backslash or
        // control character, so a double-quoted YAML scalar keeps them verbatim.
        text.push_str(&format!("  - \"{item}\"\n"));
    }
    Some(text)
}

/// Explains why the planned drop-in does not give the target flags.
fn explain_block(after: &Effective, expected: &[String], target: &Target, dropin: &str) -> String {
    let ours = |value: &ArgValue| value.origin.as_ref().is_some_and(|o| o.path == dropin);
    let dropin_reaches_apiserver =
        after.issuers.iter().any(ours) || after.max_token_expiration.as_ref().is_some_and(ours);
    if !dropin_reaches_apiserver {
        if let Some(at) = after
            .apiserver_args_replaced_at
            .as_ref()
            .filter(|at| at.path != dropin)
        {
            return format!(
                "`kube-apiserver-arg` at {at} replaces the list without `+` after \
                 arcfleet's drop-in, so the Arc issuer would not reach kube-apiserver: \
                 write `kube-apiserver-arg+:` there"
            );
        }
    }
    let issuers = after.issuer_list();
    for (index, value) in after.issuers.iter().enumerate() {
        if issuers[..index].contains(&value.value) {
            return format!(
                "issuer `{}` would be given twice ({}), and kube-apiserver refuses to start \
                 with a repeated issuer: remove it there",
                value.value,
                describe_origin(value)
            );
        }
    }
    if let Some(first) = after.issuers.first() {
        if first.value != target.issuer {
            return format!(
                "issuer `{}` from {} would come before the Arc issuer and keep signing tokens: \
                 remove it there",
                first.value,
                describe_origin(first)
            );
        }
    }
    if issuers != expected {
        let extra: Vec<&ArgValue> = after
            .issuers
            .iter()
            .filter(|v| !expected.contains(&v.value))
            .collect();
        if let Some(value) = extra.first() {
            return format!(
                "issuer `{}` from {} stays configured, but the playbook drops previous \
                 issuers: remove it there or set keep_previous_issuers",
                value.value,
                describe_origin(value)
            );
        }
        return format!(
            "the effective issuers would be [{}], expected [{}]",
            issuers.join(", "),
            expected.join(", ")
        );
    }
    match &after.max_token_expiration {
        Some(value) => format!(
            "{EXPIRATION_FLAG}={} from {} overrides {}: remove it there",
            value.value,
            describe_origin(value),
            target.max_token_expiration
        ),
        None => format!("{EXPIRATION_FLAG} would not be set"),
    }
}

fn describe_origin(value: &ArgValue) -> String {
    value
        .origin
        .as_ref()
        .map_or_else(|| "K3s's default".to_owned(), ToString::to_string)
}

#[cfg(test)]
mod tests;
