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
