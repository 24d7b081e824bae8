//! Ansible's INI inventory format:
//!
//! ```ini
//! edge-00 ansible_host=10.20.0.10      # before any section: group `ungrouped`
//!
//! [line1]
//! edge-[01:03] ansible_user=ops        # a host range, with host variables
//! edge-09:2222                         # host:port sets ansible_port
//!
//! [line1:vars]
//! arc_cluster=plant-a-line1
//!
//! [plant_a:children]
//! line1
//! ```
//!
//! Lines starting with `#` or `;` are comments. Host lines split like a shell command line
//! (Python's `shlex`), so values may be quoted.

use std::path::Path;

use super::{expand_host_pattern, Model, Var, VarValue};
use crate::inventory::{Device, InventoryError, Location};

#[derive(Clone, Copy, PartialEq)]
enum Section {
    Hosts,
    Vars,
    Children,
}

/// Parses an INI inventory into devices and warnings.
pub(crate) fn parse(path: &Path, text: &str) -> Result<(Vec<Device>, Vec<String>), InventoryError> {
    let mut model = Model::default();
    model.group("all");
    let mut group = "ungrouped".to_owned();
    let mut section = Section::Hosts;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let error = |message: String| InventoryError::Invalid {
            location: Location {
                path: path.to_owned(),
                line,
            },
            message,
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if let Some(header) = trimmed.strip_prefix('[') {
            let header = header
                .strip_suffix(']')
                .ok_or_else(|| error(format!("invalid section header `{trimmed}`: expected [group], [group:vars] or [group:children]")))?;
            let (name, kind) = header.split_once(':').unwrap_or((header, "hosts"));
            check_group_name(name).map_err(error)?;
            section = match kind {
                "hosts" => Section::Hosts,
                "vars" => Section::Vars,
                "children" => Section::Children,
                other => {
                    return Err(error(format!(
                        "invalid section type `{other}` in `{trimmed}`: expected vars or children"
                    )))
                }
            };
            group = name.to_owned();
            model.group(&group);
            continue;
        }
        match section {
            Section::Hosts => {
                let words = split_words(trimmed).map_err(error)?;
                let Some((pattern, assignments)) = words.split_first() else {
                    continue;
                };
                let (pattern, port) = split_port(pattern);
                let mut vars = Vec::new();
                if let Some(port) = port {
                    vars.push(text_var("ansible_port", port, line));
                }
                for assignment in assignments {
                    let (name, value) = assignment.split_once('=').ok_or_else(|| {
                        error(format!(
                            "`{assignment}` after host `{pattern}` is not `name=value`"
                        ))
                    })?;
                    vars.push(text_var(name, value, line));
                }
                for host in expand_host_pattern(pattern).map_err(error)? {
                    model.add_host(&group, &host, vars.clone(), line);
                }
            }
            Section::Vars => {
                let (name, value) = trimmed.split_once('=').ok_or_else(|| {
                    error(format!("`{trimmed}` in [{group}:vars] is not `name=value`"))
                })?;
                let value = unquote(value.trim());
                model
                    .group(&group)
                    .vars
                    .push(text_var(name.trim(), &value, line));
            }
            Section::Children => {
                let child = trimmed
                    .split_whitespace()
                    .next()
                    .unwrap_or(trimmed)
                    .to_owned();
                check_group_name(&child).map_err(error)?;
                model.add_child(&group, &child);
            }
        }
    }
    model.into_devices(path)
}

fn text_var(name: &str, value: &str, line: usize) -> Var {
    Var {
        name: name.to_owned(),
        value: VarValue::Text(value.to_owned()),
        line,
    }
}

fn check_group_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(format!(
            "invalid group name `{name}`: use letters, digits and `_`"
        ));
    }
    Ok(())
}

/// Splits `host:port`, `[v6-address]:port` and `[v6-address]` as Ansible's
/// `parse_address` does; a host range such as `edge[01:03]` keeps its colon.
fn split_port(pattern: &str) -> (&str, Option<&str>) {
    if let Some(rest) = pattern.strip_prefix('[') {
        if let Some((address, after)) = rest.split_once(']') {
            if address.contains(':') {
                return (address, after.strip_prefix(':'));
            }
        }
    }
    let Some((host, port)) = pattern.rsplit_once(':') else {
        return (pattern, None);
    };
    let outside_brackets = host.split('[').next().unwrap_or(host);
    let is_port = !port.is_empty() && port.chars().all(|c| c.is_ascii_digit());
    if is_port && !outside_brackets.contains(':') && bracket_balanced(host) {
        (host, Some(port))
    } else {
        (pattern, None)
    }
}

fn bracket_balanced(text: &str) -> bool {
    text.matches('[').count() == text.matches(']').count()
}

fn unquote(value: &str) -> String {
    for quote in ['"', '\''] {
        if let Some(inner) = value
            .strip_prefix(quote)
            .and_then(|v| v.strip_suffix(quote))
        {
            return inner.to_owned();
        }
    }
    value.to_owned()
}

/// Splits a line into words like Python's `shlex.split(line, comments=True)`: whitespace
/// separates words, single quotes keep everything literally, double quotes allow `\"` and
/// `\\`, a backslash outside quotes escapes the next character, and a word starting with
/// `#` starts a comment.
pub(crate) fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match chars.peek() {
            None | Some('#') => return Ok(words),
            Some(_) => {}
        }
        let mut word = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            match c {
                '\'' => loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(inner) => word.push(inner),
                        None => return Err("unterminated single quote".to_owned()),
                    }
                },
                '"' => loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') if matches!(chars.peek(), Some('"' | '\\')) => {
                            word.extend(chars.next());
                        }
                        Some(inner) => word.push(inner),
                        None => return Err("unterminated double quote".to_owned()),
                    }
                },
                '\\' => word.extend(chars.next()),
                other => word.push(other),
            }
        }
        words.push(word);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_like_shlex() {
        assert_eq!(
            split_words("h a=1 b='x y' c=\"q\\\"z\" # note").unwrap(),
            ["h", "a=1", "b=x y", "c=q\"z"]
        );
        assert!(split_words("h a='open").is_err());
    }

    #[test]
    fn ports_split_off_hosts() {
        assert_eq!(split_port("edge:2222"), ("edge", Some("2222")));
        assert_eq!(split_port("edge[01:03]"), ("edge[01:03]", None));
        assert_eq!(
            split_port("edge[01:03]:2222"),
            ("edge[01:03]", Some("2222"))
        );
        assert_eq!(split_port("[fd00::1]:22"), ("fd00::1", Some("22")));
        assert_eq!(split_port("fd00::1"), ("fd00::1", None));
    }
}
