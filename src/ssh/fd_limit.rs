//! The open-file limit (RLIMIT_NOFILE), which caps how many devices a run can connect to
//! at once, because every SSH connection uses one TCP socket for the device's whole run.
//!
//! Many Linux systems start processes with a soft limit of 1024 and a much higher hard
//! limit (systemd 252's `DefaultLimitNOFILE=1024:524288`). With a `--concurrency` near
//! the soft limit, later connections fail with "Too many open files" and their devices
//! are reported unreachable. So arcfleet raises the soft limit to the hard limit at
//! startup and rejects a `--concurrency` that still does not fit.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors a run uses besides one socket per connected device: standard streams,
/// the async runtime's epoll and wake-up descriptors, HTTPS connections to ARM and the
/// report files being written. An estimate with room to spare, not a measured bound.
pub const BASE_DESCRIPTORS: u64 = 64;

/// The soft limit the kernel accepts when the hard limit is unlimited: Linux rejects a
/// soft RLIMIT_NOFILE above `fs.nr_open`, whose default is 1048576.
const UNLIMITED_TARGET: u64 = 1 << 20;

/// The open-file limit before and after [`raise_soft_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    /// Soft limit at startup; `None` means unlimited.
    pub before: Option<u64>,
    /// Soft limit now in force; `None` means unlimited.
    pub soft: Option<u64>,
    /// Hard limit; `None` means unlimited.
    pub hard: Option<u64>,
}

/// Raises the soft open-file limit to the hard limit, and returns the limits. When the
/// kernel rejects the new value, the soft limit stays as it was and the error is returned.
pub fn raise_soft_limit() -> Result<OpenFileLimit, std::io::Error> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let target = maximum.unwrap_or(UNLIMITED_TARGET);
    if current.is_some_and(|soft| soft < target) {
        let raised = Rlimit {
            current: Some(target),
            maximum,
        };
        setrlimit(Resource::Nofile, raised)?;
    }
    Ok(OpenFileLimit {
        before: current,
        soft: current_soft_limit(),
        hard: maximum,
    })
}

/// Returns the soft open-file limit in force; `None` means unlimited.
pub fn current_soft_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// Returns the descriptors a run with `concurrency` devices at once needs.
pub fn descriptors_needed(concurrency: usize) -> u64 {
    u64::try_from(concurrency)
        .unwrap_or(u64::MAX)
        .saturating_add(BASE_DESCRIPTORS)
}

/// Checks that `concurrency` connections fit in the soft limit `soft` (`None`: unlimited),
/// and returns a message with the fix when they do not.
pub fn check_concurrency(concurrency: usize, soft: Option<u64>) -> Result<(), String> {
    let needed = descriptors_needed(concurrency);
    match soft {
        Some(limit) if limit < needed => Err(format!(
            "--concurrency {concurrency} needs about {needed} open files (one per connected \
             device plus {BASE_DESCRIPTORS}), but the open-file limit is {limit}: lower \
             --concurrency to at most {} or raise the hard limit (`ulimit -Hn`, or \
             LimitNOFILE= for a systemd service)",
            limit.saturating_sub(BASE_DESCRIPTORS)
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_reaches_hard_limit() {
        let limits = raise_soft_limit().unwrap();
        let target = limits.hard.unwrap_or(UNLIMITED_TARGET);
        let expected = limits.before.map(|before| before.max(target));
        assert_eq!(limits.soft, expected);
        assert_eq!(current_soft_limit(), expected);
    }

    #[test]
    fn raise_twice_keeps_the_limit() {
        let first = raise_soft_limit().unwrap();
        let second = raise_soft_limit().unwrap();
        assert_eq!(second.before, first.soft);
        assert_eq!(second.soft, first.soft);
    }

    #[test]
    fn concurrency_check_cases() {
        let cases: [(usize, Option<u64>, bool); 6] = [
            (50, Some(1024), true),
            (960, Some(1024), true),
            (961, Some(1024), false),
            (5000, Some(1024), false),
            (5000, Some(1 << 20), true),
            (usize::MAX, None, true),
        ];
        for (concurrency, soft, fits) in cases {
            let result = check_concurrency(concurrency, soft);
            assert_eq!(
                result.is_ok(),
                fits,
                "{concurrency} in {soft:?}: {result:?}"
            );
        }
    }

    #[test]
    fn concurrency_error_names_the_fix() {
        let message = check_concurrency(2000, Some(1024)).unwrap_err();
        assert!(message.contains("--concurrency 2000"), "{message}");
        assert!(message.contains("limit is 1024"), "{message}");
        assert!(message.contains("at most 960"), "{message}");
    }
}
