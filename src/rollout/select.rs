//! Choosing which devices a run covers: `--limit`, `--shard` and `--retry-failed`.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use crate::inventory::Device;

/// Parses `--shard I/N` (1-based `I`).
pub fn parse_shard(text: &str) -> Result<(usize, usize), String> {
    let invalid = || format!("invalid shard `{text}`: expected I/N with 1 <= I <= N, such as 2/3");
    let (index, count) = text.split_once('/').ok_or_else(invalid)?;
    let index: usize = index.trim().parse().map_err(|_| invalid())?;
    let count: usize = count.trim().parse().map_err(|_| invalid())?;
    if count == 0 || index == 0 || index > count {
        return Err(invalid());
    }
    Ok((index, count))
}

/// Returns whether a device matches one `--limit` pattern: `key=value` matches a label
/// (or `role`, `cluster` and `name`), anything else is a glob on the device name. Values
/// may be globs too.
pub fn matches(device: &Device, pattern: &str) -> bool {
    let glob = |pattern: &str, text: &str| {
        glob::Pattern::new(pattern).map_or(pattern == text, |compiled| compiled.matches(text))
    };
    match pattern.split_once('=') {
        Some((key, value)) => match key {
            _ if device.labels.contains_key(key) => glob(value, &device.labels[key]),
            "name" => glob(value, &device.name),
            "role" => glob(value, &device.role.to_string()),
            "cluster" => device
                .cluster
                .as_ref()
                .is_some_and(|c| glob(value, &c.name) || glob(value, &c.to_string())),
            _ => false,
        },
        None => glob(pattern, &device.name),
    }
}

/// Checks `--limit` patterns before use: globs must compile.
pub fn check_limit(pattern: &str) -> Result<(), String> {
    let glob_part = pattern.split_once('=').map_or(pattern, |(_, value)| value);
    glob::Pattern::new(glob_part)
        .map(|_| ())
        .map_err(|error| format!("invalid --limit pattern `{pattern}`: {error}"))
}

/// Assigns devices to `count` shards and returns whether the device at `index` belongs
/// to shard `shard` (1-based).
///
/// Servers of one Arc cluster always land in the same shard, so that two CI jobs never
/// restart servers of one HA cluster at once. Clusters (and devices without one, by name)
/// are sorted and dealt round-robin, so every job that reads the same inventory computes
/// the same split, and the shards cover the fleet exactly once.
pub fn shard_members(devices: &[Device], shard: usize, count: usize) -> Vec<bool> {
    let group_key = |device: &Device| match &device.cluster {
        Some(cluster) => {
            let (subscription, group, name) = cluster.key();
            format!("cluster:{subscription}/{group}/{name}")
        }
        None => format!("device:{}", device.name),
    };
    let groups: BTreeMap<String, ()> = devices.iter().map(|d| (group_key(d), ())).collect();
    let positions: BTreeMap<&String, usize> =
        groups.keys().enumerate().map(|(i, key)| (key, i)).collect();
    devices
        .iter()
        .map(|device| {
            let key = group_key(device);
            positions
                .get(&key)
                .is_some_and(|position| position % count == shard - 1)
        })
        .collect()
}

/// Reads a failed-devices list (one name per line, `#` comments) and checks every name
/// against the inventory.
pub fn read_retry_list(path: &Path, devices: &[Device]) -> Result<HashSet<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read --retry-failed {}: {error}", path.display()))?;
    let known: HashSet<&str> = devices.iter().map(|d| d.name.as_str()).collect();
    let mut names = HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let name = line.split('#').next().unwrap_or("").trim();
        if name.is_empty() {
            continue;
        }
        if !known.contains(name) {
            return Err(format!(
                "{}:{}: device `{name}` is not in the inventory: was the list written for \
                 another inventory?",
                path.display(),
                index + 1
            ));
        }
        names.insert(name.to_owned());
    }
    Ok(names)
}

/// Renders the failed-devices list that `--retry-failed` reads.
pub fn render_retry_list(entries: &[(&str, &str, &str)]) -> String {
    let mut text = String::from(
        "# Devices that failed or were skipped in the last arcfleet run.\n\
         # Run only these again with: arcfleet converge --retry-failed THIS_FILE ...\n",
    );
    for (name, action, reason) in entries {
        let reason = reason.lines().next().unwrap_or("");
        text.push_str(&format!("{name}  # {action}: {reason}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{ClusterRef, Location, Role};

    fn device(name: &str, cluster: Option<&str>, labels: &[(&str, &str)]) -> Device {
        Device {
            name: name.into(),
            host: "h".into(),
            port: None,
            user: None,
            proxy_jump: None,
            role: if cluster.is_some() {
                Role::Server
            } else {
                Role::Agent
            },
            cluster: cluster.map(|c| ClusterRef {
                subscription: "s".into(),
                resource_group: "rg".into(),
                name: c.into(),
            }),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            identity_file: None,
            source: Location {
                path: "i".into(),
                line: 1,
            },
        }
    }

    #[test]
    fn shard_syntax() {
        assert_eq!(parse_shard("2/3"), Ok((2, 3)));
        for bad in ["0/3", "4/3", "1/0", "x/3", "3", ""] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limit_by_glob_and_label() {
        let d = device("pa-l1-srv1", Some("line1"), &[("wave", "canary")]);
        assert!(matches(&d, "pa-l1-*"));
        assert!(!matches(&d, "pb-*"));
        assert!(matches(&d, "wave=canary"));
        assert!(matches(&d, "wave=can*"));
        assert!(!matches(&d, "wave=rest"));
        assert!(matches(&d, "role=server"));
        assert!(matches(&d, "cluster=line1"));
        assert!(!matches(&d, "site=x"));
    }

    #[test]
    fn shards_cover_each_device_once_and_keep_clusters_together() {
        let devices: Vec<Device> = (0..30)
            .map(|i| {
                let cluster = format!("c{}", i % 7);
                device(
                    &format!("d{i:02}"),
                    if i % 10 == 9 { None } else { Some(&cluster) },
                    &[],
                )
            })
            .collect();
        let shards: Vec<Vec<bool>> = (1..=3).map(|s| shard_members(&devices, s, 3)).collect();
        for (i, device) in devices.iter().enumerate() {
            let owners = shards.iter().filter(|members| members[i]).count();
            assert_eq!(owners, 1, "{} is in exactly one shard", device.name);
        }
        for members in &shards {
            let clusters: HashSet<_> = devices
                .iter()
                .zip(members)
                .filter(|(_, m)| **m)
                .filter_map(|(d, _)| d.cluster.as_ref().map(|c| c.name.clone()))
                .collect();
            for other in shards.iter().filter(|o| !std::ptr::eq(*o, members)) {
                for (d, m) in devices.iter().zip(other) {
                    if *m {
                        let name = d.cluster.as_ref().map(|c| c.name.clone());
                        assert!(name.is_none_or(|n| !clusters.contains(&n)), "cluster split");
                    }
                }
            }
        }
    }

    #[test]
    fn retry_list_round_trips_and_rejects_unknown_names() {
        let devices = vec![device("a", Some("c"), &[]), device("b", Some("c"), &[])];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("failed.txt");
        std::fs::write(
            &path,
            render_retry_list(&[("b", "failed", "cannot connect\nmore")]),
        )
        .unwrap();
        let names = read_retry_list(&path, &devices).unwrap();
        assert_eq!(names, HashSet::from(["b".to_owned()]));
        std::fs::write(&path, "a\nzz\n").unwrap();
        let error = read_retry_list(&path, &devices).unwrap_err();
        assert!(error.contains("failed.txt:2"), "{error}");
    }
}
