//! A small SSH client on russh: connect with strict host-key checking (directly or through
//! jump hosts), authenticate with keys, ssh-agent or certificates, run commands and read
//! each channel until it closes.
//!
//! - [`ssh_config`] reads `~/.ssh/config`; [`target`] combines it with the inventory and
//!   the command line into one [`Target`] per device.
//! - [`dialer`] opens connections, sharing jump host sessions and pacing handshakes.
//! - [`host_keys`] and [`known_hosts`] check host keys and certificates; [`auth`] logs in.
//! - [`session`] runs commands; [`quote`] quotes every value that reaches a remote shell.

pub mod auth;
pub mod dialer;
mod error;
pub mod fd_limit;
pub mod host_keys;
pub mod known_hosts;
mod pattern;
pub mod quote;
pub mod session;
pub mod ssh_config;
pub mod target;
pub mod tokens;

pub use dialer::Dialer;
pub use error::SshError;
pub use session::{Output, Session};
pub use target::Target;

/// Host keys shared by the known_hosts and host-key tests.
#[cfg(test)]
pub(crate) mod test_keys {
    use russh::keys::PublicKey;

    pub const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    pub const KEY_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEg4Zmrf1SE8Qp3pAvGQvTzdHVTXvUlIfRbsHXt6FDRi";

    /// Parses a key in `type base64` form.
    pub fn key(text: &str) -> PublicKey {
        PublicKey::from_openssh(text).unwrap()
    }
}
