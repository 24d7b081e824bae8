//! Ansible inventories, in the YAML and INI formats of Ansible's `yaml` and `ini` inventory
//! plugins: groups with `hosts`, `vars` and `children`, host ranges such as
//! `edge[01:20].lan`, and host variables.
//!
//! Variables combine as Ansible combines them: group variables from the least specific
//! group to the most specific (groups sorted by depth below `all`, then
//! `ansible_group_priority`, then name), then host variables, later values winning. A host
//! listed in several places collects the variables of every occurrence.
//!
//! Each host becomes a device named by its inventory hostname:
//!
//! | variable | device field |
//! | --- | --- |
//! | `ansible_host` (`ansible_ssh_host`) | host |
//! | `ansible_port` (`ansible_ssh_port`) | port |
//! | `ansible_user` (`ansible_ssh_user`) | user |
//! | `ansible_ssh_private_key_file` (`ansible_private_key_file`) | identity file |
//! | `-J` or `-o ProxyJump=` in `ansible_ssh_common_args` / `ansible_ssh_extra_args` | jump hosts |
//! | `k3s_role` (`server` or `agent`) | role; without it, hosts in a group named `agent` are agents and the rest servers (k3s-ansible's `server`/`agent` layout); a host in both groups is an error |
//! | `arc_subscription`, `arc_resource_group`, `arc_cluster` | the Arc connected cluster; servers need all three, and an agent with only some gets none |
//! | `arcfleet_labels` (mapping, or `key=value;key=value`) | labels |
//!
//! Every group a host belongs to, directly or through `children`, except `all` and
//! `ungrouped`, also becomes the label `group/<name>=true`. Hosts whose
//! `ansible_connection` is not SSH (`local`, `docker`, ...) are left out with a warning.
//! Jinja2 templates in the variables arcfleet reads are errors, because arcfleet does not
//! evaluate them, and `group_vars/` and `host_vars/` directories are not read.

mod ini;
mod yaml;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use super::{
    check_arm_segment, check_host, check_label, check_name, check_proxy_jump, check_user,
    csv_format::parse_labels, parse_port, ClusterRef, Device, InventoryError, Location, Role,
};

pub(super) use self::ini::parse as parse_ini;
pub(super) use self::yaml::{looks_like_ansible, parse as parse_yaml};

/// Variables arcfleet reads; any other `arc_` or `arcfleet_` variable is probably a typo.
const ARCFLEET_VARS: &[&str] = &[
    "arc_subscription",
    "arc_resource_group",
    "arc_cluster",
    "arcfleet_labels",
];

/// `ansible_connection` values that mean SSH.
const SSH_CONNECTIONS: &[&str] = &[
    "ssh",
    "smart",
    "paramiko",
    "paramiko_ssh",
    "ansible.builtin.ssh",
];

/// A variable value as written.
#[derive(Debug, Clone, PartialEq)]
enum VarValue {
    Text(String),
    Map(Vec<(String, String)>),
    /// A list or nested mapping, named by kind for messages.
    Other(&'static str),
}

#[derive(Debug, Clone)]
struct Var {
    name: String,
    value: VarValue,
    line: usize,
}

#[derive(Debug, Default)]
struct Group {
    vars: Vec<Var>,
    children: Vec<String>,
    hosts: Vec<String>,
}

#[derive(Debug)]
struct HostEntry {
    name: String,
    vars: Vec<Var>,
    line: usize,
}

/// Groups and hosts as read, before variables are combined.
#[derive(Debug, Default)]
struct Model {
    groups: BTreeMap<String, Group>,
    hosts: Vec<HostEntry>,
    index: HashMap<String, usize>,
}

impl Model {
    fn group(&mut self, name: &str) -> &mut Group {
        self.groups.entry(name.to_owned()).or_default()
    }

    fn add_child(&mut self, parent: &str, child: &str) {
        self.group(child);
        let parent = self.group(parent);
        if !parent.children.iter().any(|c| c == child) {
            parent.children.push(child.to_owned());
        }
    }

    /// Adds a host to a group; variables of a host listed again are appended, so later
    /// occurrences win.
    fn add_host(&mut self, group: &str, name: &str, vars: Vec<Var>, line: usize) {
        let members = &mut self.group(group).hosts;
        if !members.iter().any(|h| h == name) {
            members.push(name.to_owned());
        }
        match self.index.get(name) {
            Some(&at) => self.hosts[at].vars.extend(vars),
            None => {
                self.index.insert(name.to_owned(), self.hosts.len());
                self.hosts.push(HostEntry {
                    name: name.to_owned(),
                    vars,
                    line,
                });
            }
        }
    }

    /// Returns each group's depth below `all` (Ansible's `Group.depth`).
    fn depths(&self) -> HashMap<&str, usize> {
        let mut depths: HashMap<&str, usize> = HashMap::from([("all", 0)]);
        let mut changed = true;
        // Relax until no depth grows; a group's depth is one more than its deepest parent.
        // `children` cycles are rejected while reading, so this ends.
        while changed {
            changed = false;
            for name in self.groups.keys() {
                depths
                    .entry(name)
                    .or_insert(if name == "all" { 0 } else { 1 });
            }
            for (name, group) in &self.groups {
                let depth = depths[name.as_str()];
                for child in &group.children {
                    let entry = depths.entry(child).or_insert(1);
                    if *entry < depth + 1 {
                        *entry = depth + 1;
                        changed = true;
                    }
                }
            }
        }
        depths
    }

    /// Returns the groups a host belongs to, directly or through `children`, with `all`.
    fn groups_of(&self, host: &str) -> BTreeSet<&str> {
        let mut found: BTreeSet<&str> = BTreeSet::from(["all"]);
        let mut pending: Vec<&str> = self
            .groups
            .iter()
            .filter(|(_, g)| g.hosts.iter().any(|h| h == host))
            .map(|(name, _)| name.as_str())
            .collect();
        while let Some(name) = pending.pop() {
            if found.insert(name) {
                for (parent, group) in &self.groups {
                    if group.children.iter().any(|c| c == name) {
                        pending.push(parent);
                    }
                }
            }
        }
        found
    }

    /// Returns a host's variables combined in Ansible's order: each name with its final
    /// value and the line that set it.
    fn combined_vars(&self, host: &HostEntry) -> BTreeMap<String, Var> {
        let depths = self.depths();
        let priority = |name: &str| -> i64 {
            self.groups
                .get(name)
                .and_then(|g| {
                    g.vars
                        .iter()
                        .rev()
                        .find(|v| v.name == "ansible_group_priority")
                })
                .and_then(|v| match &v.value {
                    VarValue::Text(text) => text.parse().ok(),
                    _ => None,
                })
                .unwrap_or(1)
        };
        let mut groups: Vec<&str> = self.groups_of(&host.name).into_iter().collect();
        groups.sort_by_key(|name| {
            (
                depths.get(name).copied().unwrap_or(1),
                priority(name),
                *name,
            )
        });
        let mut vars = BTreeMap::new();
        for name in groups {
            for var in self.groups.get(name).map_or(&[][..], |g| &g.vars[..]) {
                vars.insert(var.name.clone(), var.clone());
            }
        }
        for var in &host.vars {
            vars.insert(var.name.clone(), var.clone());
        }
        vars
    }

    /// Rejects `children` cycles, which Ansible rejects too.
    fn check_cycles(&self, path: &Path) -> Result<(), InventoryError> {
        fn visit<'a>(
            model: &'a Model,
            name: &'a str,
            stack: &mut Vec<&'a str>,
        ) -> Result<(), String> {
            if stack.contains(&name) {
                stack.push(name);
                return Err(stack.join(" -> "));
            }
            stack.push(name);
            if let Some(group) = model.groups.get(name) {
                for child in &group.children {
                    visit(model, child, stack)?;
                }
            }
            stack.pop();
            Ok(())
        }
        for name in self.groups.keys() {
            visit(self, name, &mut Vec::new()).map_err(|cycle| InventoryError::Invalid {
                location: Location {
                    path: path.to_owned(),
                    line: 1,
                },
                message: format!("group children form a cycle: {cycle}"),
            })?;
        }
        Ok(())
    }

    /// Maps every host to a device. Returns the devices and warnings.
    fn into_devices(self, path: &Path) -> Result<(Vec<Device>, Vec<String>), InventoryError> {
        self.check_cycles(path)?;
        let mut warnings = Vec::new();
        if let Some(dir) = path.parent() {
            for sub in ["group_vars", "host_vars"] {
                if dir.join(sub).is_dir() {
                    warnings.push(format!(
                        "{}: arcfleet does not read {sub}/ beside the inventory; put the \
                         variables arcfleet needs in the inventory file",
                        dir.join(sub).display()
                    ));
                }
            }
        }
        let mut devices = Vec::new();
        for host in &self.hosts {
            let mapping = HostMapping {
                model: &self,
                host,
                vars: self.combined_vars(host),
                path,
            };
            if let Some(device) = mapping.device(&mut warnings)? {
                devices.push(device);
            }
        }
        Ok((devices, warnings))
    }
}

/// One host with its combined variables, being turned into a device.
struct HostMapping<'a> {
    model: &'a Model,
    host: &'a HostEntry,
    vars: BTreeMap<String, Var>,
    path: &'a Path,
}

impl HostMapping<'_> {
    fn error(&self, line: usize, message: String) -> InventoryError {
        InventoryError::Invalid {
            location: Location {
                path: self.path.to_owned(),
                line,
            },
            message: format!("host `{}`: {message}", self.host.name),
        }
    }

    /// Returns the text of the first variable set among `names`, with its line.
    fn text(&self, names: &[&str]) -> Result<Option<(String, usize)>, InventoryError> {
        let Some(var) = names.iter().find_map(|name| self.vars.get(*name)) else {
            return Ok(None);
        };
        match &var.value {
            VarValue::Text(text) if text.is_empty() => Ok(None),
            VarValue::Text(text) if text.contains("{{") || text.contains("{%") => Err(self.error(
                var.line,
                format!(
                    "`{}` is a Jinja2 template, which arcfleet does not evaluate: write the value",
                    var.name
                ),
            )),
            VarValue::Text(text) => Ok(Some((text.clone(), var.line))),
            VarValue::Map(_) => Err(self.error(
                var.line,
                format!("`{}` must be a string, found a mapping", var.name),
            )),
            VarValue::Other(kind) => Err(self.error(
                var.line,
                format!("`{}` must be a string, found {kind}", var.name),
            )),
        }
    }

    fn device(&self, warnings: &mut Vec<String>) -> Result<Option<Device>, InventoryError> {
        let line = self.host.line;
        let name = self.host.name.clone();
        check_name(&name).map_err(|m| self.error(line, m))?;
        if let Some((connection, at)) = self.text(&["ansible_connection"])? {
            if !SSH_CONNECTIONS.contains(&connection.as_str()) {
                warnings.push(format!(
                    "{}:{at}: host `{name}` uses ansible_connection={connection}; arcfleet \
                     connects over SSH only, so it is left out",
                    self.path.display()
                ));
                return Ok(None);
            }
        }
        self.warn_unknown_arcfleet_vars(warnings);

        let host = match self.text(&["ansible_host", "ansible_ssh_host"])? {
            Some((host, at)) => {
                check_host(&host).map_err(|m| self.error(at, m))?;
                host
            }
            None => name.clone(),
        };
        let port = self
            .text(&["ansible_port", "ansible_ssh_port"])?
            .map(|(port, at)| parse_port(&port).map_err(|m| self.error(at, m)))
            .transpose()?;
        let user = self
            .text(&["ansible_user", "ansible_ssh_user"])?
            .map(|(user, at)| {
                check_user(&user)
                    .map(|()| user)
                    .map_err(|m| self.error(at, m))
            })
            .transpose()?;
        let identity_file = self
            .text(&["ansible_ssh_private_key_file", "ansible_private_key_file"])?
            .map(|(path, _)| path.into());
        let role = self.role()?;
        let cluster = self.cluster(role)?;
        let proxy_jump = self.proxy_jump(warnings)?;
        Ok(Some(Device {
            name,
            host,
            port,
            user,
            role,
            cluster,
            labels: self.labels()?,
            identity_file,
            proxy_jump,
            source: Location {
                path: self.path.to_owned(),
                line,
            },
        }))
    }

    fn warn_unknown_arcfleet_vars(&self, warnings: &mut Vec<String>) {
        for var in self.vars.values() {
            let ours = var.name.starts_with("arc_") || var.name.starts_with("arcfleet_");
            if ours && !ARCFLEET_VARS.contains(&var.name.as_str()) {
                let message = format!(
                    "{}:{}: variable `{}` is not one arcfleet reads (it reads {}); ignored",
                    self.path.display(),
                    var.line,
                    var.name,
                    ARCFLEET_VARS.join(", ")
                );
                if !warnings.contains(&message) {
                    warnings.push(message);
                }
            }
        }
    }

    fn role(&self) -> Result<Role, InventoryError> {
        if let Some((text, at)) = self.text(&["k3s_role"])? {
            return Role::parse(&text).ok_or_else(|| {
                self.error(
                    at,
                    format!("invalid k3s_role `{text}`: expected `server` or `agent`"),
                )
            });
        }
        let groups = self.model.groups_of(&self.host.name);
        match (groups.contains("server"), groups.contains("agent")) {
            (true, true) => Err(self.error(
                self.host.line,
                "the host is in both the `server` and the `agent` group: set k3s_role".into(),
            )),
            (false, true) => Ok(Role::Agent),
            _ => Ok(Role::Server),
        }
    }

    fn cluster(&self, role: Role) -> Result<Option<ClusterRef>, InventoryError> {
        let fields = [
            ("arc_subscription", self.text(&["arc_subscription"])?),
            ("arc_resource_group", self.text(&["arc_resource_group"])?),
            ("arc_cluster", self.text(&["arc_cluster"])?),
        ];
        // Agents are never contacted, and group variables often give them only part of a
        // cluster's coordinates, so an incomplete set is no error for them.
        if role == Role::Agent && fields.iter().any(|(_, value)| value.is_none()) {
            return Ok(None);
        }
        let mut values = Vec::new();
        for (field, value) in fields {
            let Some((text, at)) = value else {
                return Err(self.error(
                    self.host.line,
                    format!(
                        "missing `{field}`: every server needs arc_subscription, \
                         arc_resource_group and arc_cluster (usually group variables)"
                    ),
                ));
            };
            check_arm_segment(field, &text).map_err(|m| self.error(at, m))?;
            values.push(text);
        }
        let [subscription, resource_group, name] = <[String; 3]>::try_from(values)
            .map_err(|_| self.error(self.host.line, "incomplete Arc cluster".into()))?;
        Ok(Some(ClusterRef {
            subscription,
            resource_group,
            name,
        }))
    }

    fn labels(&self) -> Result<BTreeMap<String, String>, InventoryError> {
        let mut labels = BTreeMap::new();
        for group in self.model.groups_of(&self.host.name) {
            if group != "all" && group != "ungrouped" {
                let key = format!("group/{group}");
                check_label(&key, "true").map_err(|m| self.error(self.host.line, m))?;
                labels.insert(key, "true".to_owned());
            }
        }
        let Some(var) = self.vars.get("arcfleet_labels") else {
            return Ok(labels);
        };
        let own = match &var.value {
            VarValue::Text(text) => parse_labels(text).map_err(|m| self.error(var.line, m))?,
            VarValue::Map(pairs) => {
                let mut own = BTreeMap::new();
                for (key, value) in pairs {
                    check_label(key, value).map_err(|m| self.error(var.line, m))?;
                    own.insert(key.clone(), value.clone());
                }
                own
            }
            VarValue::Other(kind) => {
                return Err(self.error(
                    var.line,
                    format!("`arcfleet_labels` must be a mapping or `key=value;...`, found {kind}"),
                ))
            }
        };
        labels.extend(own);
        Ok(labels)
    }

    /// Reads jump hosts from the SSH arguments Ansible passes to `ssh`. Other options in
    /// them are reported and ignored, except ProxyCommand, which arcfleet cannot run.
    fn proxy_jump(&self, warnings: &mut Vec<String>) -> Result<Option<String>, InventoryError> {
        let mut proxy_jump = None;
        for name in ["ansible_ssh_common_args", "ansible_ssh_extra_args"] {
            let Some((text, at)) = self.text(&[name])? else {
                continue;
            };
            let words =
                ini::split_words(&text).map_err(|m| self.error(at, format!("`{name}`: {m}")))?;
            let mut words = words.into_iter();
            while let Some(word) = words.next() {
                let option = if word == "-J" {
                    words.next().map(|hops| format!("ProxyJump={hops}"))
                } else if let Some(hops) = word.strip_prefix("-J") {
                    Some(format!("ProxyJump={hops}"))
                } else if word == "-o" {
                    words.next()
                } else {
                    word.strip_prefix("-o").map(str::to_owned)
                };
                let Some(option) = option else {
                    warnings.push(self.ignored(at, name, &word));
                    continue;
                };
                let (key, value) = option
                    .split_once(|c: char| c == '=' || c.is_whitespace())
                    .map_or((option.as_str(), ""), |(k, v)| (k, v.trim()));
                match key.to_ascii_lowercase().as_str() {
                    "proxyjump" => {
                        check_proxy_jump(value).map_err(|m| self.error(at, format!("`{name}`: {m}")))?;
                        proxy_jump.get_or_insert_with(|| value.to_owned());
                    }
                    "proxycommand" => {
                        return Err(self.error(
                            at,
                            format!("`{name}` sets ProxyCommand, which arcfleet does not run: use -J or ProxyJump"),
                        ))
                    }
                    _ => warnings.push(self.ignored(at, name, &option)),
                }
            }
        }
        Ok(proxy_jump)
    }

    fn ignored(&self, line: usize, var: &str, option: &str) -> String {
        format!(
            "{}:{line}: host `{}`: arcfleet ignores `{option}` in {var}; it reads only -J and \
             -o ProxyJump there (set SSH options in ssh_config instead)",
            self.path.display(),
            self.host.name
        )
    }
}

/// Expands Ansible host ranges: `[01:03]` (numeric, keeping the width of the start, with
/// an optional `:step`) and `[a:c]` (letters). Several ranges multiply out.
fn expand_host_pattern(pattern: &str) -> Result<Vec<String>, String> {
    let Some(open) = pattern.find('[') else {
        return Ok(vec![pattern.to_owned()]);
    };
    let close = pattern[open..]
        .find(']')
        .map(|at| open + at)
        .ok_or_else(|| format!("host range in `{pattern}` has no closing `]`"))?;
    let (head, range, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let parts: Vec<&str> = range.split(':').collect();
    let (start, end, step) = match parts.as_slice() {
        [start, end] => (*start, *end, 1),
        [start, end, step] => (
            *start,
            *end,
            step.parse::<usize>()
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| format!("invalid step `{step}` in host range `{pattern}`"))?,
        ),
        _ => {
            return Err(format!(
                "invalid host range `[{range}]`: expected [start:end] or [start:end:step]"
            ))
        }
    };
    let items: Vec<String> = if let (Ok(first), Ok(last)) =
        (start.parse::<u64>(), end.parse::<u64>())
    {
        if first > last {
            return Err(format!("host range `[{range}]` ends before it starts"));
        }
        let width = start.len();
        (first..=last)
            .step_by(step)
            .map(|n| format!("{n:0width$}"))
            .collect()
    } else {
        let (Some(first), Some(last)) = (single_letter(start), single_letter(end)) else {
            return Err(format!(
                "invalid host range `[{range}]`: use numbers such as [01:20] or letters such as [a:f]"
            ));
        };
        if first > last {
            return Err(format!("host range `[{range}]` ends before it starts"));
        }
        (first..=last).step_by(step).map(String::from).collect()
    };
    let rests = expand_host_pattern(tail)?;
    let mut hosts = Vec::new();
    for item in &items {
        for rest in &rests {
            hosts.push(format!("{head}{item}{rest}"));
        }
    }
    Ok(hosts)
}

fn single_letter(text: &str) -> Option<char> {
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_alphabetic() => Some(c),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
