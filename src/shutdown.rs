//! Orderly shutdown on SIGINT or SIGTERM.
//!
//! The first signal stops the rollout from starting devices: devices that have not yet
//! changed anything stop before writing, and devices past their write finish, meaning
//! they verify or roll back within their restart deadlines. Reports are written as usual.
//! A second signal exits at once with the interrupted status; files on devices are still
//! never half-written, because every write is a rename.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// A shared flag that says the run was interrupted.
#[derive(Debug, Default)]
pub struct Shutdown {
    requested: AtomicBool,
    notify: Notify,
}

impl Shutdown {
    /// Marks the run as interrupted and wakes every waiter.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Returns whether the run was interrupted.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Sleeps for `duration`, returning early when the run is interrupted.
    pub async fn sleep(&self, duration: std::time::Duration) {
        if self.is_requested() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(duration) => {}
            () = self.notify.notified() => {}
        }
    }
}

/// Listens for SIGINT and SIGTERM: the first requests shutdown, the second exits with
/// `exit_code`.
pub fn listen(shutdown: std::sync::Arc<Shutdown>, exit_code: u8) {
    tokio::spawn(async move {
        let Ok(mut terminate) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            tracing::warn!("cannot listen for SIGTERM; only Ctrl-C stops the run cleanly");
            return;
        };
        for count in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            if count == 0 {
                tracing::warn!(
                    "interrupted: starting no new device; running devices finish or roll back \
                     (signal again to exit at once)"
                );
                shutdown.request();
            } else {
                tracing::error!("interrupted twice: exiting without waiting for running devices");
                std::process::exit(i32::from(exit_code));
            }
        }
    });
}
