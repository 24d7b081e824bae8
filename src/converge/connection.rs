//! A device's connection during its run: reconnecting after the connection drops, and
//! running scripts as root through sudo.
//!
//! A command is never sent again after a drop, because it may have run. The connection is
//! replaced before the next command, and the caller decides what a lost command means:
//! the restart step, for one, reads the unit state before deciding anything.

use std::time::Duration;

use super::remote::{self, Privilege};
use crate::secret::Secret;
use crate::ssh::{Dialer, Output, Session, SshError, Target};

/// The connection to one device, replaced when it drops.
pub(super) struct Connection<'a> {
    dialer: &'a Dialer,
    target: &'a Target,
    session: Option<Session>,
    /// Sessions opened after the first, for the device log.
    pub(super) reconnects: usize,
    /// The privilege scripts run with.
    pub(super) privilege: Privilege,
}

impl<'a> Connection<'a> {
    /// Opens the first session.
    pub(super) async fn open(
        dialer: &'a Dialer,
        target: &'a Target,
    ) -> Result<Connection<'a>, SshError> {
        let session = dialer.connect(target).await?;
        Ok(Connection {
            dialer,
            target,
            session: Some(session),
            reconnects: 0,
            privilege: Privilege::Root,
        })
    }

    /// Returns the session, opening a new one when the last one dropped.
    async fn session(&mut self) -> Result<&Session, SshError> {
        if self.session.as_ref().is_some_and(Session::is_closed) {
            self.session = None;
        }
        if self.session.is_none() {
            // Callers poll once a second while a node restarts, so failed attempts are
            // debug lines and only a successful reconnect is reported.
            let route = self.target.describe();
            let session = match self.dialer.connect(self.target).await {
                Ok(session) => session,
                Err(error) => {
                    tracing::debug!(%route, %error, "reconnect failed");
                    return Err(error);
                }
            };
            self.reconnects += 1;
            tracing::info!(%route, reconnects = self.reconnects, "reconnected");
            self.session = Some(session);
        }
        match &self.session {
            Some(session) => Ok(session),
            None => Err(SshError::ConnectionLost {
                address: self.target.address(),
                detail: "no session".into(),
            }),
        }
    }

    /// Runs a command as the login user. A lost connection is dropped, so that the next
    /// command reconnects; the lost command is not repeated.
    pub(super) async fn run_plain(
        &mut self,
        command: &str,
        stdin: Option<&[u8]>,
        limit: Duration,
    ) -> Result<Output, SshError> {
        let result = self.session().await?.run(command, stdin, limit).await;
        if matches!(&result, Err(error) if error.is_connection_lost()) {
            self.session = None;
        }
        result
    }

    /// Runs a script as root: directly for root, else through sudo, feeding the sudo
    /// password first on stdin when there is one. The script's stdin is empty after that
    /// line, so scripts carry their data inline (as base64) and never read stdin.
    pub(super) async fn run_as_root(
        &mut self,
        script: &str,
        limit: Duration,
    ) -> Result<Output, SshError> {
        let command = remote::wrap(script, &self.privilege);
        let stdin = match &self.privilege {
            Privilege::SudoPassword(password) => Some(format!("{}\n", password.expose())),
            _ => None,
        };
        self.run_plain(&command, stdin.as_deref().map(str::as_bytes), limit)
            .await
    }

    /// Chooses how scripts become root. Root needs nothing. Other users get `sudo -n` when
    /// it works without a password, so a configured password is never sent needlessly, and
    /// else sudo with the password, when one is configured. Without a password, `sudo -n`
    /// failures surface in the probe with a hint.
    pub(super) async fn choose_privilege(
        &mut self,
        password: Option<&Secret>,
        limit: Duration,
    ) -> Result<(), SshError> {
        if self.target.user == "root" {
            self.privilege = Privilege::Root;
            return Ok(());
        }
        self.privilege = Privilege::Sudo;
        let Some(password) = password else {
            return Ok(());
        };
        let probe = self
            .run_plain(remote::SUDO_WITHOUT_PASSWORD, None, limit)
            .await?;
        if probe.status != 0 {
            self.privilege = Privilege::SudoPassword(password.clone());
        }
        Ok(())
    }

    /// Closes the session.
    pub(super) async fn close(self) {
        if let Some(session) = self.session {
            session.close().await;
        }
    }
}
