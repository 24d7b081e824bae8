//! The rollout: waves, batches, failure budgets, one server per cluster at a time, and
//! orderly stops.
//!
//! Waves run one after another. Inside a wave, batches run one after another; inside a
//! batch, clusters run in parallel while the servers of one cluster run one at a time, so
//! an HA cluster never has two servers restarting at once. A failure ends that cluster's
//! turn: its remaining servers are skipped for this run. After every device the wave's
//! failures are compared with the budget; once it is exceeded no device starts, running
//! ones finish, and later waves are skipped unless the run goes on past failed waves.

pub mod select;
pub mod waves;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use tokio::sync::Semaphore;

use crate::azure::Resolution;
use crate::converge::{run_device, Job, Mode};
use crate::events::Event;
use crate::inventory::{Device, Inventory, Role};
use crate::progress::Progress;
use crate::report::{Action, DeviceReport};
use crate::ssh::Target;
use waves::{BatchSize, Wave};

/// Default number of devices worked on at once.
///
/// Each device keeps one SSH connection open for its whole run, and most of that time is
/// spent waiting for K3s to restart, so the cap bounds open connections and the burst of
/// key exchanges at the start rather than CPU. 50 keeps a small CI runner well inside its
/// file-descriptor limit; raise it for large fleets on a larger controller.
pub const DEFAULT_CONCURRENCY: usize = 50;

/// Rollout settings: concurrency, batches, budget and pauses.
#[derive(Debug, Clone)]
pub struct Options {
    /// Devices worked on at once, fleet-wide.
    pub concurrency: usize,
    /// Batch ramp inside each wave; empty means the whole wave at once.
    pub batches: Vec<BatchSize>,
    /// Failure budget per wave, in percent of the wave's devices; `None` means no budget.
    pub max_fail_percent: Option<f64>,
    /// Pause between waves.
    pub pause_between_waves: Duration,
    /// Whether later waves still run after a wave exceeded its budget.
    pub continue_past_failed_waves: bool,
}

/// The rollout's result.
#[derive(Debug)]
pub struct Outcome {
    /// One report per selected device, in inventory order.
    pub reports: Vec<DeviceReport>,
    /// Whether a wave exceeded its budget and stopped the rollout.
    pub halted: bool,
    /// Whether a signal interrupted the run.
    pub interrupted: bool,
}

/// Shared state while devices run.
struct Run<'a> {
    inventory: &'a Inventory,
    /// The SSH route of each device, by inventory index; `None` for agents and for
    /// devices outside the selection.
    targets: &'a [Option<Target>],
    resolution: &'a Resolution,
    job: Arc<Job>,
    options: &'a Options,
    progress: &'a Progress,
    slots: Semaphore,
    /// Clusters whose turn ended with a failure, and the server that failed.
    failed_clusters: Mutex<HashMap<(String, String, String), String>>,
    reports: Mutex<BTreeMap<usize, DeviceReport>>,
    /// Set when the current wave exceeds its budget.
    wave_broken: AtomicBool,
    wave_failures: AtomicUsize,
}

/// Runs the waves and returns every selected device's report.
pub async fn run(
    inventory: &Inventory,
    targets: &[Option<Target>],
    resolution: &Resolution,
    job: Arc<Job>,
    waves: &[Wave],
    options: &Options,
    progress: &Progress,
) -> Outcome {
    let run = Run {
        inventory,
        targets,
        resolution,
        job: job.clone(),
        options,
        progress,
        slots: Semaphore::new(options.concurrency.max(1)),
        failed_clusters: Mutex::new(HashMap::new()),
        reports: Mutex::new(BTreeMap::new()),
        wave_broken: AtomicBool::new(false),
        wave_failures: AtomicUsize::new(0),
    };
    let mut halted = false;
    for (position, wave) in waves.iter().enumerate() {
        let stop_reason = if job.shutdown.is_requested() {
            Some("the run was interrupted before this wave".to_owned())
        } else if halted && !options.continue_past_failed_waves {
            Some("an earlier wave exceeded its failure budget".to_owned())
        } else {
            None
        };
        if let Some(reason) = stop_reason {
            run.skip_all(wave, &format!("not started: {reason}"));
            continue;
        }
        if position > 0 && !options.pause_between_waves.is_zero() {
            tracing::info!(wave = %wave.name, "pausing {:?} before the wave", options.pause_between_waves);
            job.shutdown.sleep(options.pause_between_waves).await;
            if job.shutdown.is_requested() {
                run.skip_all(
                    wave,
                    "not started: the run was interrupted before this wave",
                );
                continue;
            }
        }
        let broken = run.run_wave(wave).await;
        halted |= broken;
    }
    let mut reports = run.reports.into_inner().unwrap_or_else(|p| p.into_inner());
    let ordered = waves
        .iter()
        .flat_map(|w| w.devices.iter().copied())
        .collect::<std::collections::BTreeSet<usize>>()
        .into_iter()
        .filter_map(|index| reports.remove(&index))
        .collect();
    Outcome {
        reports: ordered,
        halted,
        interrupted: job.shutdown.is_requested(),
    }
}

impl Run<'_> {
    /// Runs one wave batch by batch; returns whether it exceeded its budget.
    async fn run_wave(&self, wave: &Wave) -> bool {
        tracing::info!(wave = %wave.name, devices = wave.devices.len(), "wave started");
        self.wave_broken.store(false, Ordering::SeqCst);
        self.wave_failures.store(0, Ordering::SeqCst);
        let mut start = 0;
        for size in waves::batch_sizes(wave.devices.len(), &self.options.batches) {
            let batch = &wave.devices[start..start + size];
            start += size;
            if self.stopping() {
                self.skip(batch, &wave.name, &self.stop_message());
                continue;
            }
            self.run_batch(batch, wave).await;
        }
        let failed = self.wave_failures.load(Ordering::SeqCst);
        let broken = self.wave_broken.load(Ordering::SeqCst);
        self.job.events.emit(Event::WaveFinished {
            wave: wave.name.clone(),
            devices: wave.devices.len(),
            failed,
            budget_exceeded: broken,
        });
        if broken {
            tracing::error!(wave = %wave.name, failed, devices = wave.devices.len(), "wave exceeded its failure budget");
        } else {
            tracing::info!(wave = %wave.name, failed, "wave finished");
        }
        broken
    }

    /// Runs a batch: clusters in parallel, the servers of one cluster one at a time.
    async fn run_batch(&self, batch: &[usize], wave: &Wave) {
        let serial = self.job.mode == Mode::Converge;
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut by_cluster: BTreeMap<(String, String, String), usize> = BTreeMap::new();
        for &index in batch {
            let device = &self.inventory.devices[index];
            match (&device.cluster, device.role, serial) {
                (Some(cluster), Role::Server, true) => match by_cluster.get(&cluster.key()) {
                    Some(&group) => groups[group].push(index),
                    None => {
                        by_cluster.insert(cluster.key(), groups.len());
                        groups.push(vec![index]);
                    }
                },
                _ => groups.push(vec![index]),
            }
        }
        stream::iter(groups)
            .for_each_concurrent(None, |group| self.run_group(group, wave))
            .await;
    }

    async fn run_group(&self, group: Vec<usize>, wave: &Wave) {
        for index in group {
            let device = &self.inventory.devices[index];
            if self.stopping() {
                self.skip(&[index], &wave.name, &self.stop_message());
                continue;
            }
            // Servers of a cluster that ARM could not resolve all fail at once with that
            // reason, without being contacted, so they are reported rather than skipped.
            let gated = device.cluster.as_ref().filter(|cluster| {
                self.job.mode == Mode::Converge
                    && device.role == Role::Server
                    && self.resolution.issuer(cluster).is_ok()
            });
            if let Some(cluster) = gated {
                let failed = self
                    .failed_clusters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&cluster.key())
                    .cloned();
                if let Some(failed) = failed {
                    let message = format!(
                        "not started: server {failed} of cluster {cluster} failed, and arcfleet \
                         stops a cluster at its first failure so that its servers keep one \
                         issuer list"
                    );
                    self.skip(&[index], &wave.name, &message);
                    continue;
                }
            }
            let Ok(_slot) = self.slots.acquire().await else {
                return;
            };
            if self.stopping() {
                self.skip(&[index], &wave.name, &self.stop_message());
                continue;
            }
            let report = self.run_one(index, device, &wave.name).await;
            self.record(index, device, report, wave);
        }
    }

    async fn run_one(&self, index: usize, device: &Device, wave: &str) -> DeviceReport {
        self.job.events.emit(Event::DeviceStarted {
            device: device.name.clone(),
            wave: wave.to_owned(),
        });
        let issuer = device
            .cluster
            .as_ref()
            .map(|cluster| self.resolution.issuer(cluster).map(str::to_owned));
        let target = self.targets.get(index).and_then(Option::as_ref);
        let mut report = run_device(device, target, issuer, &self.job).await;
        report.wave = wave.to_owned();
        report
    }

    fn record(&self, index: usize, device: &Device, report: DeviceReport, wave: &Wave) {
        if report.action == Action::Failed {
            if let (Some(cluster), Role::Server) = (&device.cluster, device.role) {
                self.failed_clusters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(cluster.key(), device.name.clone());
            }
            let failed = self.wave_failures.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some(budget) = self.options.max_fail_percent {
                if waves::budget_exceeded(failed, wave.devices.len(), budget) {
                    self.wave_broken.store(true, Ordering::SeqCst);
                }
            }
        }
        self.finish(index, report);
    }

    fn finish(&self, index: usize, report: DeviceReport) {
        self.progress.finished(&report);
        self.job.events.emit(Event::DeviceFinished {
            device: report.device.clone(),
            wave: report.wave.clone(),
            action: report.action,
            compliant: report.compliant,
            error: report.error.clone(),
            duration_ms: u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX),
        });
        self.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(index, report);
    }

    fn stopping(&self) -> bool {
        self.job.shutdown.is_requested() || self.wave_broken.load(Ordering::SeqCst)
    }

    fn stop_message(&self) -> String {
        if self.job.shutdown.is_requested() {
            "not started: the run was interrupted".to_owned()
        } else {
            "not started: the wave exceeded its failure budget".to_owned()
        }
    }

    fn skip(&self, indices: &[usize], wave: &str, message: &str) {
        for &index in indices {
            let mut report = DeviceReport::new(&self.inventory.devices[index]).skip(message);
            report.wave = wave.to_owned();
            self.finish(index, report);
        }
    }

    fn skip_all(&self, wave: &Wave, message: &str) {
        self.skip(&wave.devices, &wave.name, message);
        self.job.events.emit(Event::WaveFinished {
            wave: wave.name.clone(),
            devices: wave.devices.len(),
            failed: 0,
            budget_exceeded: false,
        });
    }
}
