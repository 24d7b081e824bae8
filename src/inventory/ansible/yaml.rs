//! Ansible's YAML inventory format:
//!
//! ```yaml
//! all:
//!   vars:
//!     arc_subscription: 3f9a6c1e-5b2d-4e8f-9a7c-1d2e3f4a5b6c
//!   children:
//!     line1:
//!       vars: {arc_resource_group: rg-plant-a, arc_cluster: plant-a-line1}
//!       hosts:
//!         edge-[01:03]:
//!         edge-09: {ansible_host: 10.20.1.19, ansible_port: 2222}
//! ```
//!
//! Top-level keys are groups (usually only `all`); a group has `hosts`, `vars` and
//! `children`, each optional. Any other key in a group is an error.

use std::path::Path;

use super::{expand_host_pattern, Model, Var, VarValue};
use crate::inventory::{Device, InventoryError, Location};
use crate::yaml::{self, Node, Value};

/// Returns whether a parsed YAML document is shaped like an Ansible inventory: a mapping
/// whose values are null or mappings with only `hosts`, `vars` and `children`.
pub(crate) fn looks_like_ansible(root: &Node) -> bool {
    let Value::Map(groups) = &root.value else {
        return false;
    };
    !groups.is_empty()
        && groups.iter().all(|(_, body)| match &body.value {
            Value::Map(keys) => keys
                .iter()
                .all(|(key, _)| matches!(key.as_scalar(), Some("hosts" | "vars" | "children"))),
            _ => body.is_null(),
        })
}

struct Reader<'a> {
    path: &'a Path,
    model: Model,
}

/// Parses a YAML inventory into devices and warnings.
pub(crate) fn parse(path: &Path, text: &str) -> Result<(Vec<Device>, Vec<String>), InventoryError> {
    let mut reader = Reader {
        path,
        model: Model::default(),
    };
    reader.model.group("all");
    let root = yaml::parse(text)
        .map_err(|e| reader.error(e.line, format!("invalid YAML: {}", e.message)))?
        .ok_or_else(|| reader.error(1, "the inventory is empty: add an `all:` group".into()))?;
    let Value::Map(groups) = &root.value else {
        return Err(reader.error(
            root.line,
            format!(
                "an Ansible inventory must be a mapping of groups, found {}",
                root.kind()
            ),
        ));
    };
    for (key, body) in groups {
        let name = reader.group_name(key)?;
        reader.group(&name, body)?;
    }
    reader.model.into_devices(path)
}

impl Reader<'_> {
    fn error(&self, line: usize, message: String) -> InventoryError {
        InventoryError::Invalid {
            location: Location {
                path: self.path.to_owned(),
                line,
            },
            message,
        }
    }

    fn group_name(&self, key: &Node) -> Result<String, InventoryError> {
        match key.as_scalar() {
            Some(name)
                if !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) =>
            {
                Ok(name.to_owned())
            }
            _ => Err(self.error(
                key.line,
                format!(
                    "invalid group name `{}`: use letters, digits and `_`",
                    key.as_scalar().unwrap_or("(not a string)")
                ),
            )),
        }
    }

    fn group(&mut self, name: &str, body: &Node) -> Result<(), InventoryError> {
        self.model.group(name);
        if body.is_null() {
            return Ok(());
        }
        let Value::Map(entries) = &body.value else {
            return Err(self.error(
                body.line,
                format!("group `{name}` must be a mapping, found {}", body.kind()),
            ));
        };
        for (key, value) in entries {
            match key.as_scalar() {
                Some("hosts") => self.hosts(name, value)?,
                Some("vars") => {
                    let vars = self.vars(value, &format!("the vars of group `{name}`"))?;
                    self.model.group(name).vars.extend(vars);
                }
                Some("children") => self.children(name, value)?,
                other => {
                    return Err(self.error(
                        key.line,
                        format!(
                            "unexpected key `{}` in group `{name}`: a group has only hosts, \
                             vars and children",
                            other.unwrap_or("(not a string)")
                        ),
                    ))
                }
            }
        }
        Ok(())
    }

    fn hosts(&mut self, group: &str, node: &Node) -> Result<(), InventoryError> {
        if node.is_null() {
            return Ok(());
        }
        let Value::Map(hosts) = &node.value else {
            return Err(self.error(
                node.line,
                format!(
                    "`hosts` of group `{group}` must be a mapping of host names, found {}",
                    node.kind()
                ),
            ));
        };
        for (key, vars) in hosts {
            let pattern = key.as_scalar().unwrap_or_default();
            let vars = if vars.is_null() {
                Vec::new()
            } else {
                self.vars(vars, &format!("host `{pattern}`"))?
            };
            let names = expand_host_pattern(pattern).map_err(|m| self.error(key.line, m))?;
            for host in names {
                self.model.add_host(group, &host, vars.clone(), key.line);
            }
        }
        Ok(())
    }

    fn children(&mut self, parent: &str, node: &Node) -> Result<(), InventoryError> {
        if node.is_null() {
            return Ok(());
        }
        let Value::Map(children) = &node.value else {
            return Err(self.error(
                node.line,
                format!(
                    "`children` of group `{parent}` must be a mapping of groups, found {}",
                    node.kind()
                ),
            ));
        };
        for (key, body) in children {
            let child = self.group_name(key)?;
            self.model.add_child(parent, &child);
            self.group(&child, body)?;
        }
        Ok(())
    }

    fn vars(&self, node: &Node, owner: &str) -> Result<Vec<Var>, InventoryError> {
        let Value::Map(entries) = &node.value else {
            return Err(self.error(
                node.line,
                format!(
                    "{owner} must be a mapping of variables, found {}",
                    node.kind()
                ),
            ));
        };
        Ok(entries
            .iter()
            .map(|(key, value)| Var {
                name: key.as_scalar().unwrap_or_default().to_owned(),
                value: var_value(value),
                line: key.line,
            })
            .collect())
    }
}

fn var_value(node: &Node) -> VarValue {
    match &node.value {
        Value::Scalar { .. } if node.is_null() => VarValue::Text(String::new()),
        Value::Scalar { text, .. } => VarValue::Text(text.clone()),
        Value::Map(entries) => {
            let pairs: Option<Vec<(String, String)>> = entries
                .iter()
                .map(|(k, v)| Some((k.as_scalar()?.to_owned(), v.as_scalar()?.to_owned())))
                .collect();
            pairs.map_or(VarValue::Other("a nested mapping"), VarValue::Map)
        }
        Value::Seq(_) => VarValue::Other("a list"),
    }
}
