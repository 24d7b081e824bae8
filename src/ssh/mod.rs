//! A small SSH client on russh: connect with strict host-key checking, authenticate with a
//! private key, run commands and read each channel until it closes.

pub mod fd_limit;
pub mod known_hosts;
pub mod quote;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::ChannelMsg;
use tokio::time::timeout;

use known_hosts::{KnownHosts, Verdict};

/// Expands a leading `~/` to the home directory, as OpenSSH does for key paths.
pub fn expand_home(path: &Path) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => path.to_owned(),
    }
}

/// Formats `host:port`, with brackets around an IPv6 address.
fn socket_address(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Upper bound on one command's captured stdout or stderr.
const MAX_OUTPUT_BYTES: usize = 16 << 20;

/// Address, login and key of one device.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Login user.
    pub user: String,
    /// Private key file.
    pub identity: PathBuf,
}

/// Connection settings shared by every device of a run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Bound on TCP connect, key exchange and authentication together.
    pub connect_timeout: Duration,
    /// Interval between keepalive requests on an idle connection.
    pub keepalive_interval: Duration,
    /// Unanswered keepalives after which the connection counts as dead.
    pub keepalive_max: usize,
}

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
    /// The host key is not in known_hosts.
    #[error(
        "host key of {address} is not in {known_hosts} ({key_type} {fingerprint}): verify \
         the fingerprint on the device, then add the line `{line}`"
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
    /// The host offered a revoked key.
    #[error("host key of {address} ({fingerprint}) is revoked at {entry}")]
    HostKeyRevoked {
        /// `host:port`.
        address: String,
        /// `file:line` of the `@revoked` entry.
        entry: String,
        /// The offered key's SHA-256 fingerprint.
        fingerprint: String,
    },
    /// The host offered a host certificate, which arcfleet does not verify yet.
    #[error("{address} offered a host certificate; arcfleet verifies plain host keys only")]
    HostCertificate {
        /// `host:port`.
        address: String,
    },
    /// The private key could not be loaded.
    #[error("cannot load private key {}: {message}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The server rejected the key.
    #[error("{user}@{address} rejected public key {} ({fingerprint}): add it to the user's authorized_keys", path.display())]
    AuthRejected {
        /// The login user.
        user: String,
        /// `host:port`.
        address: String,
        /// The key file.
        path: PathBuf,
        /// The key's fingerprint.
        fingerprint: String,
    },
    /// The SSH protocol failed.
    #[error("SSH error with {address}: {source}")]
    Protocol {
        /// `host:port`.
        address: String,
        /// The russh error.
        source: russh::Error,
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
            SshError::Connect { .. }
            | SshError::ConnectTimeout { .. }
            | SshError::Protocol { .. } => Cause::Unreachable,
            SshError::HostKeyUnknown { .. } => Cause::HostKeyUnknown,
            SshError::HostKeyChanged { .. }
            | SshError::HostKeyRevoked { .. }
            | SshError::HostCertificate { .. } => Cause::HostKeyMismatch,
            SshError::Key { .. } | SshError::AuthRejected { .. } => Cause::AuthFailed,
            SshError::CommandTimeout { .. } | SshError::NoExitStatus { .. } => Cause::CommandFailed,
        }
    }

    /// Returns whether the device could not be reached at all (as opposed to refusing).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            SshError::Connect { .. } | SshError::ConnectTimeout { .. }
        )
    }
}

/// Private keys loaded once per run and shared by every device that uses them.
#[derive(Default)]
pub struct KeyStore {
    keys: Mutex<HashMap<PathBuf, Arc<PrivateKey>>>,
}

impl KeyStore {
    /// Loads a private key, or returns the copy loaded before.
    pub fn load(&self, path: &Path) -> Result<Arc<PrivateKey>, SshError> {
        let mut keys = self
            .keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(key) = keys.get(path) {
            return Ok(key.clone());
        }
        let key = russh::keys::load_secret_key(path, None).map_err(|error| SshError::Key {
            path: path.to_owned(),
            message: match error {
                russh::keys::Error::KeyIsEncrypted => {
                    "the key is encrypted; arcfleet needs an unencrypted key".to_owned()
                }
                other => other.to_string(),
            },
        })?;
        let key = Arc::new(key);
        keys.insert(path.to_owned(), key.clone());
        Ok(key)
    }
}

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

/// Host-key checking during key exchange. The verdict is kept so that a rejection can be
/// reported with the offered key.
struct Verifier {
    known_hosts: Arc<KnownHosts>,
    host: String,
    port: u16,
    rejection: Arc<Mutex<Option<SshError>>>,
}

impl client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        offered: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let address = socket_address(&self.host, self.port);
        let key: &PublicKey = match offered {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            PublicKeyOrCertificate::Certificate(_) => {
                self.reject(SshError::HostCertificate { address });
                return Ok(false);
            }
        };
        let fingerprint = known_hosts::fingerprint(key);
        let key_type = key.algorithm().to_string();
        let rejection = match self.known_hosts.verify(&self.host, self.port, key) {
            Verdict::Trusted => return Ok(true),
            Verdict::Unknown => SshError::HostKeyUnknown {
                known_hosts: self.known_hosts_path(),
                line: known_hosts::format_line(&self.host, self.port, key),
                address,
                key_type,
                fingerprint,
            },
            Verdict::Changed { entry } => SshError::HostKeyChanged {
                address,
                entry,
                key_type,
                fingerprint,
            },
            Verdict::Revoked { entry } => SshError::HostKeyRevoked {
                address,
                entry,
                fingerprint,
            },
        };
        self.reject(rejection);
        Ok(false)
    }
}

impl Verifier {
    fn reject(&self, error: SshError) {
        *self.rejection.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }

    fn known_hosts_path(&self) -> String {
        self.known_hosts.path().to_owned()
    }
}

/// An authenticated SSH connection to one device.
pub struct Session {
    handle: Handle<Verifier>,
    address: String,
}

impl Session {
    /// Connects, verifies the host key and authenticates, all within the connect timeout.
    pub async fn connect(
        endpoint: &Endpoint,
        settings: &Settings,
        known_hosts: Arc<KnownHosts>,
        keys: &KeyStore,
    ) -> Result<Session, SshError> {
        let address = socket_address(&endpoint.host, endpoint.port);
        let key = keys.load(&endpoint.identity)?;
        let attempt = Self::connect_inner(endpoint, settings, known_hosts, key, &address);
        match timeout(settings.connect_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(SshError::ConnectTimeout {
                address,
                seconds: settings.connect_timeout.as_secs(),
            }),
        }
    }

    async fn connect_inner(
        endpoint: &Endpoint,
        settings: &Settings,
        known_hosts: Arc<KnownHosts>,
        key: Arc<PrivateKey>,
        address: &str,
    ) -> Result<Session, SshError> {
        let config = Arc::new(client::Config {
            keepalive_interval: Some(settings.keepalive_interval),
            keepalive_max: settings.keepalive_max,
            nodelay: true,
            ..client::Config::default()
        });
        let rejection = Arc::new(Mutex::new(None));
        let verifier = Verifier {
            known_hosts,
            host: endpoint.host.clone(),
            port: endpoint.port,
            rejection: rejection.clone(),
        };
        let stream = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|source| SshError::Connect {
                address: address.to_owned(),
                source,
            })?;
        let protocol = |source| SshError::Protocol {
            address: address.to_owned(),
            source,
        };
        let mut handle = match client::connect_stream(config, stream, verifier).await {
            Ok(handle) => handle,
            Err(error) => {
                let rejected = rejection.lock().unwrap_or_else(|p| p.into_inner()).take();
                return Err(rejected.unwrap_or_else(|| protocol(error)));
            }
        };

        let hash = if key.algorithm().is_rsa() {
            // OpenSSH 8.8 and later refuse SHA-1 `ssh-rsa` signatures; prefer SHA-2 unless
            // the server's `server-sig-algs` lacks it.
            match handle.best_supported_rsa_hash().await.map_err(protocol)? {
                Some(best) => best,
                None => Some(HashAlg::Sha512),
            }
        } else {
            None
        };
        let result = handle
            .authenticate_publickey(
                &endpoint.user,
                PrivateKeyWithHashAlg::new(key.clone(), hash),
            )
            .await
            .map_err(protocol)?;
        if !result.success() {
            return Err(SshError::AuthRejected {
                user: endpoint.user.clone(),
                address: address.to_owned(),
                path: endpoint.identity.clone(),
                fingerprint: known_hosts::fingerprint(key.public_key()),
            });
        }
        Ok(Session {
            handle,
            address: address.to_owned(),
        })
    }

    /// Runs `command` through the login shell, feeding `stdin` if given, and reads the
    /// channel until the server closes it or `limit` passes.
    pub async fn run(
        &self,
        command: &str,
        stdin: Option<&[u8]>,
        limit: Duration,
    ) -> Result<Output, SshError> {
        match timeout(limit, self.run_inner(command, stdin)).await {
            Ok(result) => result,
            Err(_) => Err(SshError::CommandTimeout {
                address: self.address.clone(),
                seconds: limit.as_secs(),
            }),
        }
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
    pub async fn close(self) {
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
