//! Live progress while devices run.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::report::{Action, DeviceReport};

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

    /// Counts a finished device and shows it.
    pub fn finished(&self, report: &DeviceReport) {
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
