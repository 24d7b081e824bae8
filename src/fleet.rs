//! Running many devices at once, with live progress.

use std::io::IsTerminal;
use std::sync::Arc;

use futures::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::azure::Resolution;
use crate::converge::{run_device, Job};
use crate::inventory::Inventory;
use crate::report::{Action, DeviceReport};
use crate::ssh::Target;

/// Default number of devices converged at once.
///
/// Each device keeps one SSH connection open for its whole run, and most of that time is spent
/// waiting for K3s to restart, so the cap bounds open connections and the burst of key
/// exchanges at the start rather than CPU. 50 keeps a small CI runner well inside its
/// file-descriptor limit; raise it for large fleets on a larger controller.
pub const DEFAULT_CONCURRENCY: usize = 50;

/// Live progress: a bar on a terminal, one line per finished device otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
    counts: std::sync::Mutex<[usize; 3]>,
}

impl Progress {
    /// Creates the display for `total` devices on stderr.
    pub fn new(total: usize, quiet: bool) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            let style =
                ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            quiet,
            counts: std::sync::Mutex::new([0; 3]),
        }
    }

    fn finished(&self, report: &DeviceReport) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        match report.action {
            Action::Changed => counts[1] += 1,
            Action::Failed => counts[2] += 1,
            _ => counts[0] += 1,
        }
        let message = format!(
            "ok {} changed {} failed {}",
            counts[0], counts[1], counts[2]
        );
        match &self.bar {
            Some(bar) => {
                bar.set_message(message);
                bar.inc(1);
            }
            None if self.quiet => {}
            None => {
                let detail = if report.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", report.error.lines().next().unwrap_or(""))
                };
                tracing::info!(
                    device = %report.device,
                    action = report.action.as_str(),
                    compliant = report.compliant,
                    ms = report.duration.as_millis() as u64,
                    "finished{detail}"
                );
            }
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Runs every device of the inventory, at most `concurrency` at once, and returns their
/// reports in inventory order. `targets` has one entry per device, `None` for devices that
/// are not contacted.
pub async fn run(
    inventory: &Inventory,
    targets: &[Option<Target>],
    resolution: &Resolution,
    job: Arc<Job>,
    concurrency: usize,
    progress: &Progress,
) -> Vec<DeviceReport> {
    let mut results: Vec<(usize, DeviceReport)> =
        stream::iter(inventory.devices.iter().enumerate())
            .map(|(index, device)| {
                let job = job.clone();
                let issuer = device
                    .cluster
                    .as_ref()
                    .map(|cluster| resolution.issuer(cluster).map(str::to_owned));
                let target = targets.get(index).and_then(Option::as_ref);
                async move {
                    tracing::debug!(device = %device.name, "started");
                    let report = run_device(device, target, issuer, &job).await;
                    progress.finished(&report);
                    (index, report)
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
    results.sort_by_key(|(index, _)| *index);
    results.into_iter().map(|(_, report)| report).collect()
}
