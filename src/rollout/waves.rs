//! Waves and batches: the order in which a rollout reaches devices.
//!
//! A wave is a group of devices that share the value of a label (by default `wave`), taken
//! in the order the playbook or `--waves` lists them; values not listed follow in the order
//! they first appear in the inventory, and devices without the label come last, in a wave
//! named `unlabelled`. Inside a wave, devices start in batches whose sizes come from a ramp
//! such as `1, 5, 20%`: one device, then five, then 20% of the wave at a time. The last
//! size repeats until the wave is done.

use crate::inventory::Device;

/// Name of the wave that contains devices without the wave label.
pub const UNLABELLED: &str = "unlabelled";

/// Name of the only wave when no device has the wave label.
pub const ALL: &str = "all";

/// One wave: its name and the inventory indices of its devices, in inventory order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wave {
    /// The label value, [`UNLABELLED`] or [`ALL`].
    pub name: String,
    /// Inventory indices.
    pub devices: Vec<usize>,
}

/// One step of a batch ramp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BatchSize {
    /// A number of devices.
    Count(usize),
    /// A percentage of the wave's devices, rounded up.
    Percent(f64),
}

/// Parses a ramp such as `1, 5, 20%`, `10` or `25%`.
pub fn parse_batches(text: &str) -> Result<Vec<BatchSize>, String> {
    let mut sizes = Vec::new();
    for part in text.split(',').map(str::trim) {
        let size = if let Some(percent) = part.strip_suffix('%') {
            match percent.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => BatchSize::Percent(p),
                _ => {
                    return Err(format!(
                        "invalid batch `{part}`: a percentage must be above 0% and at most 100%"
                    ))
                }
            }
        } else {
            match part.parse::<usize>() {
                Ok(n) if n > 0 => BatchSize::Count(n),
                _ => return Err(format!("invalid batch `{part}` in `{text}`: expected a count such as 5 or a percentage such as 20%")),
            }
        };
        sizes.push(size);
    }
    Ok(sizes)
}

/// Splits `total` devices into batch sizes following the ramp; an empty ramp means one
/// batch with every device.
pub fn batch_sizes(total: usize, ramp: &[BatchSize]) -> Vec<usize> {
    if ramp.is_empty() {
        return if total == 0 { Vec::new() } else { vec![total] };
    }
    let mut sizes = Vec::new();
    let mut left = total;
    let mut step = 0;
    while left > 0 {
        let size = match ramp[step.min(ramp.len() - 1)] {
            BatchSize::Count(n) => n,
            BatchSize::Percent(p) => ((total as f64) * p / 100.0).ceil() as usize,
        }
        .clamp(1, left);
        sizes.push(size);
        left -= size;
        step += 1;
    }
    sizes
}

/// Groups the selected devices into waves by `label`, ordered by `order` first.
pub fn plan(devices: &[Device], selected: &[usize], label: &str, order: &[String]) -> Vec<Wave> {
    let any_labelled = selected
        .iter()
        .any(|&i| devices[i].labels.contains_key(label));
    if !any_labelled {
        return vec![Wave {
            name: ALL.to_owned(),
            devices: selected.to_vec(),
        }];
    }
    let mut waves: Vec<Wave> = order
        .iter()
        .map(|name| Wave {
            name: name.clone(),
            devices: Vec::new(),
        })
        .collect();
    for &index in selected {
        let name = devices[index]
            .labels
            .get(label)
            .cloned()
            .unwrap_or_else(|| UNLABELLED.to_owned());
        match waves.iter_mut().find(|w| w.name == name) {
            Some(wave) => wave.devices.push(index),
            None => waves.push(Wave {
                name,
                devices: vec![index],
            }),
        }
    }
    // Devices without the label go last, after every named wave.
    if let Some(position) = waves.iter().position(|w| w.name == UNLABELLED) {
        let unlabelled = waves.remove(position);
        waves.push(unlabelled);
    }
    waves.retain(|w| !w.devices.is_empty());
    waves
}

/// Returns whether `failed` devices exceed a budget of `max_fail_percent` of `total`.
/// The budget is exceeded, not merely reached: with 10% of 20 devices, 2 failures are
/// within the budget and the third breaks it; with 0%, the first failure breaks it.
pub fn budget_exceeded(failed: usize, total: usize, max_fail_percent: f64) -> bool {
    (failed as f64) * 100.0 > max_fail_percent * (total as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{Location, Role};

    fn device(name: &str, wave: Option<&str>) -> Device {
        Device {
            name: name.into(),
            host: "h".into(),
            port: None,
            user: None,
            proxy_jump: None,
            role: Role::Server,
            cluster: None,
            labels: wave
                .map(|w| [("wave".to_owned(), w.to_owned())].into())
                .unwrap_or_default(),
            identity_file: None,
            source: Location {
                path: "i".into(),
                line: 1,
            },
        }
    }

    #[test]
    fn ramp_parses_counts_and_percentages() {
        assert_eq!(
            parse_batches("1, 5, 20%").unwrap(),
            vec![
                BatchSize::Count(1),
                BatchSize::Count(5),
                BatchSize::Percent(20.0)
            ]
        );
        for bad in ["0", "-1", "x", "0%", "101%", "1,,2"] {
            assert!(parse_batches(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ramp_repeats_its_last_size() {
        let ramp = parse_batches("1, 5, 20%").unwrap();
        assert_eq!(batch_sizes(30, &ramp), vec![1, 5, 6, 6, 6, 6]);
        assert_eq!(batch_sizes(3, &ramp), vec![1, 2]);
        assert_eq!(batch_sizes(0, &ramp), Vec::<usize>::new());
        assert_eq!(batch_sizes(7, &[]), vec![7]);
    }

    #[test]
    fn waves_follow_order_then_appearance_then_unlabelled() {
        let devices = vec![
            device("a", Some("rest")),
            device("b", None),
            device("c", Some("canary")),
            device("d", Some("extra")),
            device("e", Some("rest")),
        ];
        let selected: Vec<usize> = (0..devices.len()).collect();
        let waves = plan(
            &devices,
            &selected,
            "wave",
            &["canary".into(), "rest".into(), "empty".into()],
        );
        let names: Vec<&str> = waves.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, vec!["canary", "rest", "extra", "unlabelled"]);
        assert_eq!(waves[1].devices, vec![0, 4]);
    }

    #[test]
    fn no_labels_means_one_wave() {
        let devices = vec![device("a", None), device("b", None)];
        let waves = plan(&devices, &[0, 1], "wave", &[]);
        assert_eq!(
            waves,
            vec![Wave {
                name: ALL.into(),
                devices: vec![0, 1]
            }]
        );
    }

    #[test]
    fn budget_must_be_exceeded() {
        assert!(!budget_exceeded(2, 20, 10.0));
        assert!(budget_exceeded(3, 20, 10.0));
        assert!(budget_exceeded(1, 20, 0.0));
        assert!(!budget_exceeded(0, 20, 0.0));
        assert!(!budget_exceeded(20, 20, 100.0));
    }
}
