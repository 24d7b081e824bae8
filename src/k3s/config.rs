//! K3s config files merged the way `k3s server` merges them.
//!
//! The rules follow K3s's `pkg/configfilearg/parser.go`:
//!
//! - The main file loads first, then the drop-ins in `<config>.d/`: regular files whose
//!   names end in `.yaml` or `.yml` (any case), in byte order of their names. The main
//!   file may be missing when a drop-in exists.
//! - Each file is a mapping decoded leniently, so a key repeated within one file is not an
//!   error: its entries are applied in order, like entries from separate files.
//! - For each key the last value wins, unless the key is written with a `+` suffix and the
//!   key already has a value: then the new items are appended. A single string stands for
//!   a one-item list. Items are never split on commas.
//! - Keys keep the order in which they were first seen; each list item becomes one
//!   `--key=item` argument.

use std::collections::HashMap;

use super::Origin;
use crate::yaml::{self, Node, Value};

/// One config file's name and content as read from the node.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    /// Absolute path on the node.
    pub path: String,
    /// File content.
    pub text: String,
}

/// A value with the place it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The value as K3s passes it on.
    pub text: String,
    /// The file and line of the value.
    pub origin: Origin,
}

/// The merged value of one key.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    /// A scalar value.
    Scalar(Item),
    /// A list of items.
    List(Vec<Item>),
}

impl Setting {
    /// Returns the items as a list, converting a scalar the way K3s's `+` merge does: a
    /// string becomes one item and an empty value becomes no item.
    pub fn items(&self) -> Vec<Item> {
        match self {
            Setting::List(items) => items.clone(),
            Setting::Scalar(item) if item.text.trim().is_empty() => Vec::new(),
            Setting::Scalar(item) => vec![item.clone()],
        }
    }
}

/// The state of one key after merging.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyState {
    /// The merged value.
    pub setting: Setting,
    /// The key entry that last replaced the value (an entry without `+`, or the first).
    pub replaced_at: Origin,
}

/// Config files merged into one ordered set of keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergedConfig {
    order: Vec<String>,
    keys: HashMap<String, KeyState>,
    /// The files that were read, in merge order.
    pub files: Vec<String>,
}

/// A config file K3s would fail to read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid YAML.
    #[error("{path}:{line}: invalid YAML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The line of the error.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// The file's top level is not a mapping.
    #[error(
        "{path}:{line}: the top level must be a mapping of flag names to values, found {found}"
    )]
    NotAMapping {
        /// The file.
        path: String,
        /// The line of the top-level node.
        line: usize,
        /// The kind of node found instead.
        found: &'static str,
    },
}

/// Returns whether K3s reads a file of this name from the drop-in directory.
pub fn is_dropin_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.contains('/') && (lower.ends_with(".yaml") || lower.ends_with(".yml"))
}

/// Orders drop-in files the way K3s does, dropping names K3s ignores.
pub fn order_dropins(mut files: Vec<ConfigFile>) -> Vec<ConfigFile> {
    files.retain(|file| is_dropin_name(file_name(&file.path)));
    files.sort_by(|a, b| {
        file_name(&a.path)
            .as_bytes()
            .cmp(file_name(&b.path).as_bytes())
    });
    files
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

impl MergedConfig {
    /// Merges the main file (if present) and the drop-ins, which must already be ordered.
    pub fn merge(main: Option<&ConfigFile>, dropins: &[ConfigFile]) -> Result<Self, ConfigError> {
        let mut merged = MergedConfig::default();
        for file in main.into_iter().chain(dropins) {
            merged.apply_file(file)?;
        }
        Ok(merged)
    }

    fn apply_file(&mut self, file: &ConfigFile) -> Result<(), ConfigError> {
        self.files.push(file.path.clone());
        let root = yaml::parse(&file.text).map_err(|error| ConfigError::Syntax {
            path: file.path.clone(),
            line: error.line,
            message: error.message,
        })?;
        let Some(root) = root else { return Ok(()) };
        if root.is_null() {
            return Ok(());
        }
        let Value::Map(entries) = &root.value else {
            return Err(ConfigError::NotAMapping {
                path: file.path.clone(),
                line: root.line,
                found: root.kind(),
            });
        };
        for (key, value) in entries {
            self.apply_entry(&file.path, key, value);
        }
        Ok(())
    }

    fn apply_entry(&mut self, path: &str, key: &Node, value: &Node) {
        let raw_key = scalar_text(key);
        let append = raw_key.ends_with('+');
        let name = raw_key.trim_end_matches('+').to_owned();
        let setting = to_setting(path, value);
        let key_origin = Origin::new(path, key.line);

        match self.keys.get_mut(&name) {
            Some(state) if append => {
                let mut items = state.setting.items();
                items.extend(setting.items());
                state.setting = Setting::List(items);
            }
            Some(state) => {
                state.setting = setting;
                state.replaced_at = key_origin;
            }
            None => {
                self.order.push(name.clone());
                self.keys.insert(
                    name,
                    KeyState {
                        setting,
                        replaced_at: key_origin,
                    },
                );
            }
        }
    }

    /// Returns the merged state of a key.
    pub fn get(&self, key: &str) -> Option<&KeyState> {
        self.keys.get(key)
    }

    /// Returns the items of a list key, or of a scalar given for it.
    pub fn items(&self, key: &str) -> Vec<Item> {
        self.keys
            .get(key)
            .map(|state| state.setting.items())
            .unwrap_or_default()
    }

    /// Returns the value of a scalar key.
    pub fn scalar(&self, key: &str) -> Option<&Item> {
        match self.keys.get(key).map(|state| &state.setting) {
            Some(Setting::Scalar(item)) => Some(item),
            _ => None,
        }
    }

    /// Returns the keys in the order K3s emits them.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(String::as_str)
    }
}

/// Converts a YAML node to a setting. Scalars keep their written text.
///
/// NOTE: K3s decodes with YAML 1.1 rules and then formats the value, so a plain `0640`
/// reaches K3s as `416` and `yes` as `true`. arcfleet only interprets string-valued keys
/// (`kube-apiserver-arg`, `cluster-domain`), where the written text is what K3s sees.
fn to_setting(path: &str, node: &Node) -> Setting {
    let item = |node: &Node| Item {
        text: scalar_text(node),
        origin: Origin::new(path, node.line),
    };
    match &node.value {
        Value::Seq(items) => Setting::List(items.iter().map(item).collect()),
        _ => Setting::Scalar(item(node)),
    }
}

fn scalar_text(node: &Node) -> String {
    match &node.value {
        Value::Scalar { .. } if node.is_null() => String::new(),
        Value::Scalar { text, .. } => text.clone(),
        Value::Seq(_) | Value::Map(_) => format!("<{}>", node.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, text: &str) -> ConfigFile {
        ConfigFile {
            path: path.to_owned(),
            text: text.to_owned(),
        }
    }

    fn texts(items: &[Item]) -> Vec<&str> {
        items.iter().map(|item| item.text.as_str()).collect()
    }

    #[test]
    fn dropin_names_filtered_and_sorted_by_bytes() {
        let files = order_dropins(vec![
            file("/d/b.yaml", ""),
            file("/d/A.YML", ""),
            file("/d/a.yaml", ""),
            file("/d/notes.txt", ""),
            file("/d/c.yaml.bak", ""),
            file("/d/10-x.yml", ""),
        ]);
        let names: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            names,
            vec!["/d/10-x.yml", "/d/A.YML", "/d/a.yaml", "/d/b.yaml"]
        );
    }

    #[test]
    fn plus_key_appends_across_files() {
        let main = file("/c.yaml", "kube-apiserver-arg:\n  - a=1\n");
        let dropin = file("/c.yaml.d/x.yaml", "kube-apiserver-arg+:\n  - b=2\n");
        let merged = MergedConfig::merge(Some(&main), &[dropin]).unwrap();
        assert_eq!(
            texts(&merged.items("kube-apiserver-arg")),
            vec!["a=1", "b=2"]
        );
    }

    #[test]
    fn key_without_plus_replaces() {
        let main = file("/c.yaml", "kube-apiserver-arg:\n  - a=1\n");
        let dropin = file("/c.yaml.d/x.yaml", "kube-apiserver-arg:\n  - b=2\n");
        let merged = MergedConfig::merge(Some(&main), &[dropin]).unwrap();
        assert_eq!(texts(&merged.items("kube-apiserver-arg")), vec!["b=2"]);
        let state = merged.get("kube-apiserver-arg").unwrap();
        assert_eq!(state.replaced_at.to_string(), "/c.yaml.d/x.yaml:1");
    }

    #[test]
    fn duplicate_key_in_one_file_last_wins() {
        let main = file(
            "/c.yaml",
            "cluster-domain: a.local\ncluster-domain: b.local\n",
        );
        let merged = MergedConfig::merge(Some(&main), &[]).unwrap();
        assert_eq!(merged.scalar("cluster-domain").unwrap().text, "b.local");
        assert_eq!(merged.keys().count(), 1);
    }

    #[test]
    fn scalar_for_list_is_one_item() {
        let main = file("/c.yaml", "kube-apiserver-arg: a=1,b=2\n");
        let merged = MergedConfig::merge(Some(&main), &[]).unwrap();
        assert_eq!(texts(&merged.items("kube-apiserver-arg")), vec!["a=1,b=2"]);
    }

    #[test]
    fn plus_on_scalar_converts_both_sides() {
        let main = file("/c.yaml", "kube-apiserver-arg: a=1\n");
        let dropin = file("/d/x.yaml", "kube-apiserver-arg+: b=2\n");
        let merged = MergedConfig::merge(Some(&main), &[dropin]).unwrap();
        assert_eq!(
            texts(&merged.items("kube-apiserver-arg")),
            vec!["a=1", "b=2"]
        );
    }

    #[test]
    fn plus_on_new_key_sets_it() {
        let dropin = file("/d/x.yaml", "kube-apiserver-arg+:\n  - b=2\n");
        let merged = MergedConfig::merge(None, &[dropin]).unwrap();
        assert_eq!(texts(&merged.items("kube-apiserver-arg")), vec!["b=2"]);
    }

    #[test]
    fn invalid_yaml_names_file_and_line() {
        let main = file("/etc/rancher/k3s/config.yaml", "a: 1\nb: [2\n");
        let error = MergedConfig::merge(Some(&main), &[]).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("/etc/rancher/k3s/config.yaml:"),
            "{error}"
        );
    }

    #[test]
    fn top_level_list_is_rejected() {
        let main = file("/c.yaml", "- a\n- b\n");
        let error = MergedConfig::merge(Some(&main), &[]).unwrap_err();
        assert!(matches!(error, ConfigError::NotAMapping { .. }), "{error}");
    }

    #[test]
    fn empty_file_contributes_nothing() {
        let main = file("/c.yaml", "# nothing yet\n");
        let merged = MergedConfig::merge(Some(&main), &[]).unwrap();
        assert_eq!(merged.keys().count(), 0);
    }

    #[test]
    fn item_origin_is_the_item_line() {
        let main = file("/c.yaml", "x: 1\nkube-apiserver-arg:\n  - a=1\n  - b=2\n");
        let merged = MergedConfig::merge(Some(&main), &[]).unwrap();
        let items = merged.items("kube-apiserver-arg");
        assert_eq!(items[1].origin.to_string(), "/c.yaml:4");
    }
}
