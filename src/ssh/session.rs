//! An authenticated connection: running commands and reading each channel until it closes.

use std::time::Duration;

use russh::client::Handle;
use russh::ChannelMsg;
use tokio::time::timeout;

use super::host_keys::Verifier;
use super::SshError;

/// Upper bound on one command's captured stdout or stderr.
const MAX_OUTPUT_BYTES: usize = 16 << 20;

/// A command's output and exit status.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
    /// Exit status.
    pub status: u32,
}

impl Output {
    /// Returns stdout as text, replacing invalid UTF-8.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Returns stderr as text, replacing invalid UTF-8.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// An authenticated SSH connection to one host.
pub struct Session {
    handle: Handle<Verifier>,
    address: String,
}

impl Session {
    pub(super) fn new(handle: Handle<Verifier>, address: String) -> Session {
        Session { handle, address }
    }

    /// Returns `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Returns whether the connection has ended, for example after the server went away
    /// or keepalives went unanswered.
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    pub(super) fn handle(&self) -> &Handle<Verifier> {
        &self.handle
    }

    /// Runs `command` through the login shell, feeding `stdin` if given, and reads the
    /// channel until the server closes it or `limit` passes. A command that is silent for
    /// a long time is fine: the connection has no inactivity timeout, and keepalives tell
    /// a quiet server from a dead one. When the connection ends during the command, the
    /// error is [`SshError::ConnectionLost`], and the command may or may not have run.
    pub async fn run(
        &self,
        command: &str,
        stdin: Option<&[u8]>,
        limit: Duration,
    ) -> Result<Output, SshError> {
        let result = match timeout(limit, self.run_inner(command, stdin)).await {
            Ok(result) => result,
            Err(_) => Err(SshError::CommandTimeout {
                address: self.address.clone(),
                seconds: limit.as_secs(),
            }),
        };
        match result {
            Err(error) if self.closes_soon(&error).await => Err(SshError::ConnectionLost {
                address: self.address.clone(),
                detail: error.to_string(),
            }),
            other => other,
        }
    }

    /// Returns whether the connection ended behind an error. The channel can report its
    /// end a moment before the session task does, so a channel that vanished without an
    /// exit status is given up to a second to show up as a closed connection.
    async fn closes_soon(&self, error: &SshError) -> bool {
        let may_be_drop = matches!(
            error,
            SshError::Protocol { .. } | SshError::NoExitStatus { signal: None, .. }
        );
        if !may_be_drop {
            return false;
        }
        for _ in 0..50 {
            if self.is_closed() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.is_closed()
    }

    async fn run_inner(&self, command: &str, stdin: Option<&[u8]>) -> Result<Output, SshError> {
        let protocol = |source| SshError::Protocol {
            address: self.address.clone(),
            source,
        };
        let mut channel = self.handle.channel_open_session().await.map_err(protocol)?;
        channel.exec(true, command).await.map_err(protocol)?;
        if let Some(data) = stdin {
            channel.data(data).await.map_err(protocol)?;
        }
        channel.eof().await.map_err(protocol)?;

        let mut output = Output::default();
        let mut status = None;
        let mut signal = None;
        while let Some(message) = channel.wait().await {
            match message {
                ChannelMsg::Data { data } => append_capped(&mut output.stdout, &data),
                ChannelMsg::ExtendedData { data, ext: 1 } => {
                    append_capped(&mut output.stderr, &data)
                }
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    signal = Some(format!("{signal_name:?}"))
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        match status {
            Some(status) => {
                output.status = status;
                Ok(output)
            }
            None => Err(SshError::NoExitStatus {
                address: self.address.clone(),
                signal,
            }),
        }
    }

    /// Closes the connection politely.
    pub async fn close(&self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

fn append_capped(buffer: &mut Vec<u8>, data: &[u8]) {
    let room = MAX_OUTPUT_BYTES.saturating_sub(buffer.len());
    buffer.extend_from_slice(&data[..data.len().min(room)]);
}
