//! The flat CSV inventory format, one device per row.

use std::collections::BTreeMap;
use std::path::Path;

use super::{
    check_arm_segment, check_host, check_label, check_name, check_user, parse_port, ClusterRef,
    Device, InventoryError, Location, Role,
};

/// The header a CSV inventory must start with, in this order.
pub const HEADER: [&str; 9] = [
    "name",
    "host",
    "port",
    "user",
    "subscription",
    "resource_group",
    "cluster",
    "role",
    "labels",
];

pub(super) fn parse(path: &Path, text: &str) -> Result<Vec<Device>, InventoryError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(text.as_bytes());
    let at = |line: u64| Location {
        path: path.to_owned(),
        line: usize::try_from(line).unwrap_or(usize::MAX),
    };

    let header = reader.headers().map_err(|error| InventoryError::Invalid {
        location: at(1),
        message: format!("cannot read the CSV header: {error}"),
    })?;
    let found: Vec<&str> = header.iter().collect();
    if found != HEADER {
        return Err(InventoryError::Invalid {
            location: at(header.position().map_or(1, |p| line_of(text, p.byte()))),
            message: format!(
                "unexpected CSV header `{}`: the header must be exactly `{}`",
                found.join(","),
                HEADER.join(",")
            ),
        });
    }

    let mut devices = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|error| {
            let line = error.position().map_or(0, |p| line_of(text, p.byte()));
            InventoryError::Invalid {
                location: at(line),
                message: format!("invalid CSV row: {error}"),
            }
        })?;
        let line = record.position().map_or(0, |p| line_of(text, p.byte()));
        let location = at(line);
        let device = parse_row(&record, &location).map_err(|message| InventoryError::Invalid {
            location: location.clone(),
            message,
        })?;
        devices.push(device);
    }
    Ok(devices)
}

/// Returns the 1-based line of the record that starts at a byte offset. The CSV reader
/// counts lines without the comment lines, and a record's offset can point at the comment
/// or blank lines before it, so the line is found in the text instead.
fn line_of(text: &str, byte: u64) -> u64 {
    let mut start = usize::try_from(byte).unwrap_or(usize::MAX).min(text.len());
    let mut line = 1 + text.as_bytes()[..start]
        .iter()
        .filter(|&&b| b == b'\n')
        .count() as u64;
    while let Some(rest) = text.get(start..) {
        let first = rest.lines().next().unwrap_or("");
        if !(first.trim().is_empty() || first.starts_with('#')) || first.len() == rest.len() {
            break;
        }
        start += first.len() + 1;
        line += 1;
    }
    line
}

fn parse_row(record: &csv::StringRecord, location: &Location) -> Result<Device, String> {
    let field = |index: usize| record.get(index).unwrap_or("");
    let name = field(0).to_owned();
    check_name(&name).map_err(|message| format!("field `name`: {message}"))?;
    let in_field =
        |column: &str, message: String| format!("device `{name}`, field `{column}`: {message}");

    let host = field(1).to_owned();
    check_host(&host).map_err(|m| in_field("host", m))?;
    let port = match field(2) {
        "" => None,
        port => Some(parse_port(port).map_err(|m| in_field("port", m))?),
    };
    let user = match field(3) {
        "" => None,
        user => {
            check_user(user).map_err(|m| in_field("user", m))?;
            Some(user.to_owned())
        }
    };
    let role = Role::parse(field(7)).ok_or_else(|| {
        in_field(
            "role",
            format!("invalid role `{}`: expected `server` or `agent`", field(7)),
        )
    })?;
    let cluster = parse_cluster(field(4), field(5), field(6), role)
        .map_err(|(column, m)| in_field(column, m))?;
    let labels = parse_labels(field(8)).map_err(|m| in_field("labels", m))?;

    Ok(Device {
        name,
        host,
        port,
        user,
        role,
        cluster,
        labels,
        identity_file: None,
        proxy_jump: None,
        source: location.clone(),
    })
}

/// Builds the cluster reference; agents may leave all three columns empty.
fn parse_cluster(
    subscription: &str,
    resource_group: &str,
    name: &str,
    role: Role,
) -> Result<Option<ClusterRef>, (&'static str, String)> {
    if role == Role::Agent
        && subscription.is_empty()
        && resource_group.is_empty()
        && name.is_empty()
    {
        return Ok(None);
    }
    for (column, value) in [
        ("subscription", subscription),
        ("resource_group", resource_group),
        ("cluster", name),
    ] {
        check_arm_segment(column, value).map_err(|message| {
            let hint = if value.is_empty() {
                ": every server needs the subscription, resource group and name of its \
                 Arc cluster"
            } else {
                ""
            };
            (column, format!("{message}{hint}"))
        })?;
    }
    Ok(Some(ClusterRef {
        subscription: subscription.to_owned(),
        resource_group: resource_group.to_owned(),
        name: name.to_owned(),
    }))
}

/// Parses `key=value;key=value`; an empty field means no labels.
pub(super) fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text
        .split(';')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
    {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!(
                "invalid label `{}`: expected `key=value`, with `;` between labels",
                pair.escape_debug()
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        check_label(key, value)?;
        if labels.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(format!("label `{key}` is given twice"));
        }
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn load(text: &str) -> Result<Vec<Device>, InventoryError> {
        parse(&PathBuf::from("fleet.csv"), text)
    }

    const HEAD: &str = "name,host,port,user,subscription,resource_group,cluster,role,labels\n";

    #[test]
    fn empty_fields_take_defaults() {
        let devices = load(&format!("{HEAD}edge-1,10.0.0.1,,,sub,rg,c1,,\n")).unwrap();
        assert_eq!(devices[0].port, None, "ssh_config or 22 decides");
        assert_eq!(devices[0].user, None, "ssh_config or --user decides");
        assert_eq!(devices[0].role, Role::Server);
        assert!(devices[0].labels.is_empty());
        assert_eq!(devices[0].source.line, 2);
    }

    #[test]
    fn labels_split_on_semicolons() {
        let devices = load(&format!(
            "{HEAD}e,h,2222,root,s,r,c,server,wave=canary;site=a\n"
        ))
        .unwrap();
        assert_eq!(devices[0].labels["wave"], "canary");
        assert_eq!(devices[0].labels["site"], "a");
    }

    #[test]
    fn wrong_header_is_rejected() {
        let error = load("name,host\ne,h\n").unwrap_err().to_string();
        assert!(error.starts_with("fleet.csv:1:"), "{error}");
        assert!(error.contains("name,host,port,user"), "{error}");
    }

    #[test]
    fn bad_port_names_line_and_field() {
        let error = load(&format!("{HEAD}a,h,22,,s,r,c,,\nb,h,x22,,s,r,c,,\n"))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("fleet.csv:3:"), "{error}");
        assert!(error.contains("field `port`"), "{error}");
        assert!(error.contains("x22"), "{error}");
    }

    #[test]
    fn server_without_cluster_is_rejected() {
        let error = load(&format!("{HEAD}a,h,,,,,,server,\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("field `subscription`"), "{error}");
    }

    #[test]
    fn agent_may_omit_cluster() {
        let devices = load(&format!("{HEAD}a,h,,,,,,agent,\n")).unwrap();
        assert_eq!(devices[0].cluster, None);
    }

    #[test]
    fn unknown_role_is_rejected() {
        let error = load(&format!("{HEAD}a,h,,,s,r,c,master,\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("invalid role `master`"), "{error}");
    }

    #[test]
    fn malformed_label_is_rejected() {
        let error = load(&format!("{HEAD}a,h,,,s,r,c,,wave\n"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("expected `key=value`"), "{error}");
    }

    #[test]
    fn line_numbers_count_comments_and_blank_lines() {
        let text =
            format!("{HEAD}# plant a\n\nedge-1,h,22,,s,r,c,,\n# broken:\nedge-2,h,x,,s,r,c,,\n");
        let error = load(&text).unwrap_err().to_string();
        assert!(error.starts_with("fleet.csv:6:"), "{error}");
    }

    #[test]
    fn short_row_is_rejected() {
        let error = load(&format!("{HEAD}a,h,22\n")).unwrap_err().to_string();
        assert!(error.starts_with("fleet.csv:2:"), "{error}");
    }
}
