//! A Markdown summary for CI job pages (`--summary-md`): totals, waves, and the devices
//! that need attention grouped by reason.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::{Action, DeviceReport, Totals};

/// Renders the summary. `title` is the first heading; `exit` names the exit status.
pub fn render(title: &str, exit: &str, reports: &[DeviceReport]) -> String {
    let totals = Totals::of(reports);
    let mut text = String::new();
    let _ = writeln!(text, "# {title}\n");
    let _ = writeln!(text, "Exit status: **{exit}**\n");
    let _ = writeln!(text, "| devices | compliant servers | unchanged | changed | would change | not applicable | failed | skipped |");
    let _ = writeln!(text, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    let _ = writeln!(
        text,
        "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
        totals.devices,
        totals.compliant,
        totals.unchanged,
        totals.changed,
        totals.would_change,
        totals.not_applicable,
        totals.failed,
        totals.skipped
    );

    let mut waves: Vec<(String, Vec<&DeviceReport>)> = Vec::new();
    for report in reports {
        match waves.iter_mut().find(|(name, _)| *name == report.wave) {
            Some((_, members)) => members.push(report),
            None => waves.push((report.wave.clone(), vec![report])),
        }
    }
    if waves.len() > 1 {
        let _ = writeln!(text, "## Waves\n");
        let _ = writeln!(
            text,
            "| wave | devices | changed | unchanged | failed | skipped |"
        );
        let _ = writeln!(text, "| --- | --- | --- | --- | --- | --- |");
        for (name, members) in &waves {
            let count = |action: Action| members.iter().filter(|r| r.action == action).count();
            let _ = writeln!(
                text,
                "| {} | {} | {} | {} | {} | {} |",
                cell(name),
                members.len(),
                count(Action::Changed),
                count(Action::Unchanged),
                count(Action::Failed),
                count(Action::Skipped)
            );
        }
        text.push('\n');
    }

    let attention: Vec<&DeviceReport> = reports
        .iter()
        .filter(|r| {
            matches!(
                r.action,
                Action::Failed | Action::WouldChange | Action::Skipped
            )
        })
        .collect();
    if attention.is_empty() {
        let _ = writeln!(text, "Every server signs with its cluster's Arc issuer.");
        return text;
    }
    let _ = writeln!(text, "## Devices that need attention\n");
    let mut by_reason: BTreeMap<String, Vec<&DeviceReport>> = BTreeMap::new();
    for report in attention {
        let reason = report.error.lines().next().unwrap_or("").to_owned();
        by_reason.entry(reason).or_default().push(report);
    }
    for (reason, members) in by_reason {
        let names: Vec<String> = members.iter().map(|r| format!("`{}`", r.device)).collect();
        let _ = writeln!(
            text,
            "- **{}** ({}): {}",
            members[0].action.as_str(),
            members.len(),
            names.join(", ")
        );
        let _ = writeln!(text, "  {}", cell(&reason));
    }
    text
}

/// Escapes text for a Markdown table cell or list item.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}
