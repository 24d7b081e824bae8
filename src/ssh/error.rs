//! SSH failures, worded to name the endpoint and what to do.

use std::path::PathBuf;
use std::sync::Arc;

/// An SSH failure, worded to name the device's endpoint and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The TCP connection failed.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// `host:port`.
        address: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// Connecting or authenticating took longer than the connect timeout.
    #[error("connecting to {address} timed out after {seconds}s")]
    ConnectTimeout {
        /// `host:port`.
        address: String,
        /// The timeout.
        seconds: u64,
    },
    /// A jump host could not be reached or could not open a connection to the next host.
    #[error("through jump host {jump_host}: {source}")]
    JumpHost {
        /// `user@host:port` of the jump host.
        jump_host: String,
        /// The failure at the jump host, shared by every device behind it.
        source: Arc<SshError>,
    },
    /// The jump host refused to open a connection to the next host.
    #[error("jump host {jump_host} cannot open a connection to {address}: {reason}")]
    Forward {
        /// `user@host:port` of the jump host.
        jump_host: String,
        /// `host:port` it was asked to connect to.
        address: String,
        /// The jump host's reason.
        reason: String,
    },
    /// The host key is not in known_hosts.
    #[error(
        "host key of {address} is not in {known_hosts} ({key_type} {fingerprint}): verify \
         the fingerprint on the device, then add the line `{line}` or run with \
         --accept-new-host-keys"
    )]
    HostKeyUnknown {
        /// `host:port`.
        address: String,
        /// The known_hosts file.
        known_hosts: String,
        /// The offered key's algorithm.
        key_type: String,
        /// The offered key's SHA-256 fingerprint.
        fingerprint: String,
        /// The known_hosts line that would trust it.
        line: String,
    },
    /// The host offered a different key than known_hosts records.
    #[error(
        "host key of {address} does not match {entry}: the device offered {key_type} \
         {fingerprint}. If the device was reinstalled, replace that entry; otherwise treat \
         it as a possible man-in-the-middle"
    )]
    HostKeyChanged {
        /// `host:port`.
        address: String,
        /// `file:line` of the recorded key.
        entry: String,
        /// The offered key's algorithm.
        key_type: String,
        /// The offered key's SHA-256 fingerprint.
        fingerprint: String,
    },
    /// The host offered a revoked key, or a certificate whose key or CA is revoked.
    #[error("host key of {address} ({fingerprint}) is revoked at {entry}")]
    HostKeyRevoked {
        /// `host:port`.
        address: String,
        /// `file:line` of the `@revoked` entry.
        entry: String,
        /// The offered key's SHA-256 fingerprint.
        fingerprint: String,
    },
    /// The host offered a certificate from a trusted CA that is not valid for it.
    #[error("host certificate of {address} (CA trusted at {entry}) is invalid: {reason}")]
    HostCertificate {
        /// `host:port`.
        address: String,
        /// `file:line` of the `@cert-authority` entry.
        entry: String,
        /// The problem with the certificate.
        reason: String,
    },
    /// A new host key could not be recorded with accept-new.
    #[error("cannot record the host key of {address} in {}: {message}", path.display())]
    HostKeyRecord {
        /// `host:port`.
        address: String,
        /// The known_hosts file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A known_hosts file could not be read.
    #[error("cannot read known_hosts {}: {message}", path.display())]
    KnownHosts {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A private key could not be loaded.
    #[error("cannot load private key {}: {message}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// No key could be offered at all.
    #[error("no key to log in to {user}@{address} with: {detail}")]
    NoIdentity {
        /// The login user.
        user: String,
        /// `host:port`.
        address: String,
        /// The keys looked for, and why none was usable.
        detail: String,
    },
    /// The server rejected every key offered.
    #[error("{user}@{address} rejected every key offered ({tried}): add one of them to the user's authorized_keys")]
    AuthRejected {
        /// The login user.
        user: String,
        /// `host:port`.
        address: String,
        /// The keys offered, with their source and fingerprint.
        tried: String,
    },
    /// The SSH protocol failed.
    #[error("SSH error with {address}: {source}")]
    Protocol {
        /// `host:port`.
        address: String,
        /// The russh error.
        source: russh::Error,
    },
    /// The connection closed while a command was running or being started.
    #[error("the connection to {address} was lost: {detail}")]
    ConnectionLost {
        /// `host:port`.
        address: String,
        /// The error the client got.
        detail: String,
    },
    /// A command did not finish in time.
    #[error("command timed out after {seconds}s on {address}")]
    CommandTimeout {
        /// `host:port`.
        address: String,
        /// The timeout.
        seconds: u64,
    },
    /// The channel closed without an exit status.
    #[error("{address} closed the channel without an exit status{}", signal.as_ref().map(|s| format!(" (killed by signal {s})")).unwrap_or_default())]
    NoExitStatus {
        /// `host:port`.
        address: String,
        /// The signal that ended the command, if the server sent one.
        signal: Option<String>,
    },
}

impl SshError {
    /// Returns the report cause for this error.
    pub fn cause(&self) -> crate::report::Cause {
        use crate::report::Cause;
        match self {
            SshError::JumpHost { source, .. } => source.cause(),
            SshError::Connect { .. }
            | SshError::ConnectTimeout { .. }
            | SshError::Forward { .. }
            | SshError::Protocol { .. }
            | SshError::ConnectionLost { .. } => Cause::Unreachable,
            SshError::HostKeyUnknown { .. } => Cause::HostKeyUnknown,
            SshError::HostKeyChanged { .. }
            | SshError::HostKeyRevoked { .. }
            | SshError::HostCertificate { .. } => Cause::HostKeyMismatch,
            SshError::Key { .. } | SshError::NoIdentity { .. } | SshError::AuthRejected { .. } => {
                Cause::AuthFailed
            }
            SshError::HostKeyRecord { .. }
            | SshError::KnownHosts { .. }
            | SshError::CommandTimeout { .. }
            | SshError::NoExitStatus { .. } => Cause::CommandFailed,
        }
    }

    /// Returns whether the device could not be reached at all (as opposed to refusing).
    pub fn is_unreachable(&self) -> bool {
        match self {
            SshError::Connect { .. } | SshError::ConnectTimeout { .. } => true,
            SshError::Forward { .. } => true,
            SshError::JumpHost { source, .. } => source.is_unreachable(),
            _ => false,
        }
    }

    /// Returns whether the connection itself failed, so that a new connection may succeed
    /// where this one did not.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, SshError::ConnectionLost { .. })
    }
}
