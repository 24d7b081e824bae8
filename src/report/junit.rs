//! JUnit XML: one test suite per wave and one test case per device, so CI systems show each
//! device as a test.
//!
//! A failed device (unreachable included) is a failure; a would-change device in a check or
//! audit is a failure too, since it is not compliant. Agents and skipped devices are
//! skipped test cases.

use std::collections::BTreeMap;

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};

use super::{Action, DeviceReport};

/// Renders the reports as a JUnit XML document named `name`.
pub fn render(name: &str, reports: &[DeviceReport]) -> Result<String, quick_junit::SerializeError> {
    let mut waves: BTreeMap<(usize, String), Vec<&DeviceReport>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for report in reports {
        if !order.contains(&report.wave) {
            order.push(report.wave.clone());
        }
        let index = order.iter().position(|w| *w == report.wave).unwrap_or(0);
        waves
            .entry((index, report.wave.clone()))
            .or_default()
            .push(report);
    }

    let mut document = Report::new(name);
    for ((_, wave), members) in waves {
        let mut suite = TestSuite::new(if wave.is_empty() {
            "fleet".to_owned()
        } else {
            wave
        });
        suite.add_test_cases(members.into_iter().map(test_case));
        document.add_test_suite(suite);
    }
    document.to_string()
}

fn test_case(report: &DeviceReport) -> TestCase {
    let status = match report.action {
        Action::Unchanged | Action::Changed => TestCaseStatus::success(),
        Action::NotApplicable | Action::Skipped => {
            let mut status = TestCaseStatus::skipped();
            let message = if report.action == Action::NotApplicable {
                "agent: nothing to configure".to_owned()
            } else {
                report.error.clone()
            };
            status.set_message(message);
            status
        }
        Action::WouldChange | Action::Failed => {
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
            let kind = if report.unreachable {
                "unreachable"
            } else {
                report.action.as_str()
            };
            status.set_type(kind);
            status.set_message(report.error.lines().next().unwrap_or("").to_owned());
            status.set_description(report.error.clone());
            status
        }
    };
    let mut case = TestCase::new(report.device.clone(), status);
    case.set_classname(if report.cluster.is_empty() {
        report.role.to_string()
    } else {
        report.cluster.clone()
    });
    case.set_time(report.duration);
    case.set_system_out(report.log.join("\n"));
    case
}
