//! Machine-readable run events, one JSON object per line on stdout with `--json`.
//!
//! Every event has `event` (its kind) and `time` (RFC 3339, UTC). CI systems read them
//! while the run goes on; the end-of-run reports carry the same facts in full.

use std::io::Write;
use std::sync::Mutex;

use serde::Serialize;

use crate::report::{Action, Totals};

/// One event of a run.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The run starts working on devices.
    RunStarted {
        /// `converge`, `check` or `audit`.
        mode: String,
        /// Devices selected for the run.
        devices: usize,
        /// Wave names in order.
        waves: Vec<String>,
    },
    /// Work on a device starts.
    DeviceStarted {
        /// The device.
        device: String,
        /// Its wave.
        wave: String,
    },
    /// A step on a device ended.
    StepDone {
        /// The device.
        device: String,
        /// The step name (probe, write-dropin, restart-k3s, verify-issuer, rollback,
        /// wait-node-ready, restart-secret-sync).
        step: String,
        /// `ok`, `failed` or `skipped`.
        outcome: String,
        /// Detail for a failure, empty otherwise.
        detail: String,
    },
    /// Work on a device ended.
    DeviceFinished {
        /// The device.
        device: String,
        /// Its wave.
        wave: String,
        /// The outcome.
        action: Action,
        /// Whether the device signs with the Arc issuer.
        compliant: bool,
        /// The reason it failed or is not compliant.
        error: String,
        /// Time spent on it.
        duration_ms: u64,
    },
    /// Every device of a wave ended or was skipped.
    WaveFinished {
        /// The wave.
        wave: String,
        /// Devices in the wave.
        devices: usize,
        /// Devices that failed.
        failed: usize,
        /// Whether the failures exceeded the wave's budget.
        budget_exceeded: bool,
    },
    /// The run ended.
    RunFinished {
        /// Counts by outcome.
        totals: Totals,
        /// The process exit status.
        exit_code: u8,
        /// The exit status's name.
        exit: String,
    },
}

/// The event sink: stdout as JSON lines, or nothing.
pub struct Events {
    enabled: bool,
    out: Mutex<std::io::Stdout>,
}

impl Events {
    /// Creates a sink that writes to stdout when `enabled`.
    pub fn new(enabled: bool) -> Events {
        Events {
            enabled,
            out: Mutex::new(std::io::stdout()),
        }
    }

    /// Returns a sink that drops every event.
    pub fn disabled() -> Events {
        Self::new(false)
    }

    /// Returns whether events are written.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Writes one event as a JSON line.
    pub fn emit(&self, event: Event) {
        if !self.enabled {
            return;
        }
        let line = render(&event, &now_rfc3339());
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // A closed stdout (the reader went away) must not fail the run.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// Writes a step event.
    pub fn step(&self, device: &str, step: &str, outcome: &str, detail: &str) {
        self.emit(Event::StepDone {
            device: device.to_owned(),
            step: step.to_owned(),
            outcome: outcome.to_owned(),
            detail: detail.to_owned(),
        });
    }
}

/// Renders an event with its time as one JSON object.
pub fn render(event: &Event, time: &str) -> String {
    let mut value = serde_json::to_value(event).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.insert(
            "time".to_owned(),
            serde_json::Value::String(time.to_owned()),
        );
    }
    value.to_string()
}

/// Returns the current UTC time in RFC 3339 form.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_render_with_kind_and_time() {
        let line = render(
            &Event::DeviceStarted {
                device: "edge-01".into(),
                wave: "canary".into(),
            },
            "2026-12-04T10:00:00Z",
        );
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["event"], "device_started");
        assert_eq!(value["device"], "edge-01");
        assert_eq!(value["wave"], "canary");
        assert_eq!(value["time"], "2026-12-04T10:00:00Z");
    }

    #[test]
    fn finished_event_uses_action_names() {
        let line = render(
            &Event::DeviceFinished {
                device: "e".into(),
                wave: "w".into(),
                action: Action::NotApplicable,
                compliant: true,
                error: String::new(),
                duration_ms: 0,
            },
            "t",
        );
        assert!(line.contains("\"action\":\"not-applicable\""), "{line}");
    }
}
