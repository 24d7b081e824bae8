//! Opening connections: directly over TCP, or through jump hosts (ProxyJump) whose
//! sessions are shared, with handshakes paced per first-hop server.
//!
//! Every device behind the same jump host chain uses one authenticated session to each
//! hop and opens a `direct-tcpip` channel through the last hop, as `ssh -J` does for one
//! device. The SSH handshake with the device then runs inside that channel, end to end, so
//! the jump host has one connection from arcfleet however many devices are behind it.
//!
//! Handshakes are paced: at most [`MAX_HANDSHAKES_PER_SERVER`] run at once per first-hop
//! server (the jump host, or the device itself for a direct connection), from the TCP
//! connect or channel open until authentication ends.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use russh::client;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::time::timeout;

use super::auth::{self, KeyStore};
use super::host_keys::{HostKeyStore, Verifier};
use super::target::Target;
use super::{Session, SshError};

/// Unauthenticated handshakes arcfleet runs at once through one first-hop server.
///
/// OpenSSH's sshd drops new unauthenticated connections at random once 10 are pending
/// (`MaxStartups 10:30:100`, the default since OpenSSH 6.2), counting them per listening
/// server. arcfleet opens one connection per jump host, so that limit never applies to
/// the jump host. The cap keeps the burst of key exchanges tunnelled through it (each a
/// new TCP connection from the jump host, and some of its CPU) at 8, below that default,
/// for a 50-device start. Direct connections are paced per device address, which only
/// matters when several inventory entries name the same sshd.
pub const MAX_HANDSHAKES_PER_SERVER: usize = 8;

type BoxedFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The shared session to one jump host chain, and the last failure to open it.
#[derive(Default)]
struct JumpSlot {
    session: Option<Arc<Session>>,
    failure: Option<(Instant, Arc<SshError>)>,
}

/// Opens connections for every device of a run, sharing jump host sessions, host keys and
/// private keys.
pub struct Dialer {
    host_keys: Arc<HostKeyStore>,
    keys: Arc<KeyStore>,
    jump_hosts: Mutex<HashMap<String, Arc<tokio::sync::Mutex<JumpSlot>>>>,
    pacers: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Dialer {
    /// Creates a dialer with no connections yet.
    pub fn new(host_keys: Arc<HostKeyStore>, keys: Arc<KeyStore>) -> Dialer {
        Dialer {
            host_keys,
            keys,
            jump_hosts: Mutex::new(HashMap::new()),
            pacers: Mutex::new(HashMap::new()),
        }
    }

    /// Opens an authenticated connection to `target`, through its jump hosts if it has
    /// any. The connect timeout bounds the TCP connect (or channel open), key exchange and
    /// authentication, not the wait for a handshake slot.
    pub async fn connect(&self, target: &Target) -> Result<Session, SshError> {
        match target.jumps.split_last() {
            None => self.connect_direct(target).await,
            Some((last, before)) => {
                let jump = self.jump_session(before, last).await?;
                self.connect_through(&jump, &target.jumps[0], last, target)
                    .await
            }
        }
    }

    /// Closes every shared jump host session.
    pub async fn close(&self) {
        let slots: Vec<_> = self
            .jump_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for slot in slots {
            if let Some(session) = slot.lock().await.session.take() {
                session.close().await;
            }
        }
    }

    fn pacer(&self, server: &str) -> Arc<Semaphore> {
        self.pacers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(server.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_HANDSHAKES_PER_SERVER)))
            .clone()
    }

    async fn connect_direct(&self, target: &Target) -> Result<Session, SshError> {
        let address = target.address();
        let pacer = self.pacer(&address);
        let _slot = pacer.acquire().await;
        let attempt = async {
            let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
                .await
                .map_err(|source| SshError::Connect {
                    address: address.clone(),
                    source,
                })?;
            let _ = stream.set_nodelay(true);
            self.handshake(target, stream).await
        };
        within_connect_timeout(target, attempt).await
    }

    /// Opens a channel from `jump` (the session to `jump_host`) to `target` and runs the
    /// handshake in it, paced by the chain's first hop.
    async fn connect_through(
        &self,
        jump: &Session,
        first_hop: &Target,
        jump_host: &Target,
        target: &Target,
    ) -> Result<Session, SshError> {
        let pacer = self.pacer(&first_hop.address());
        let _slot = pacer.acquire().await;
        let attempt = async {
            let channel = jump
                .handle()
                .channel_open_direct_tcpip(
                    target.host.clone(),
                    u32::from(target.port),
                    "127.0.0.1",
                    0,
                )
                .await
                .map_err(|error| forward_error(jump_host, target, error))?;
            self.handshake(target, pump(channel.into_stream())).await
        };
        within_connect_timeout(target, attempt).await
    }

    async fn handshake<S>(&self, target: &Target, stream: S) -> Result<Session, SshError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let address = target.address();
        let config = client_config(target, self.host_keys.has_authority_for(target)?);
        let rejection = Arc::new(Mutex::new(None));
        let verifier = Verifier::new(self.host_keys.clone(), target, rejection.clone());
        let mut handle = match client::connect_stream(Arc::new(config), stream, verifier).await {
            Ok(handle) => handle,
            Err(error) => {
                let rejected = rejection.lock().unwrap_or_else(|p| p.into_inner()).take();
                return Err(rejected.unwrap_or(SshError::Protocol {
                    address,
                    source: error,
                }));
            }
        };
        auth::authenticate(&mut handle, target, &self.keys).await?;
        tracing::debug!(route = %target.describe(), "authenticated");
        Ok(Session::new(handle, address))
    }

    /// Returns the shared session to `last`, reached through `before`, opening it (and the
    /// hops before it) when there is none or it has closed. Callers that were waiting while
    /// an attempt failed get that failure instead of trying again at once, so an
    /// unreachable jump host costs one connect timeout, not one per device.
    fn jump_session<'a>(
        &'a self,
        before: &'a [Target],
        last: &'a Target,
    ) -> BoxedFuture<'a, Result<Arc<Session>, SshError>> {
        Box::pin(async move {
            let requested = Instant::now();
            let slot = self
                .jump_hosts
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(chain_key(before, last))
                .or_default()
                .clone();
            let mut slot = slot.lock().await;
            if let Some(session) = slot.session.as_ref().filter(|s| !s.is_closed()) {
                return Ok(session.clone());
            }
            let wrap = |source: Arc<SshError>| SshError::JumpHost {
                jump_host: format!("{}@{}", last.user, last.address()),
                source,
            };
            if let Some((failed_at, error)) = &slot.failure {
                if *failed_at >= requested {
                    return Err(wrap(error.clone()));
                }
            }
            let opened = match before.split_last() {
                None => self.connect_direct(last).await,
                Some((previous, earlier)) => {
                    let jump = self.jump_session(earlier, previous).await?;
                    self.connect_through(&jump, &before[0], previous, last)
                        .await
                }
            };
            match opened {
                Ok(session) => {
                    tracing::info!(jump_host = %last.describe(), "jump host session open");
                    let session = Arc::new(session);
                    slot.session = Some(session.clone());
                    slot.failure = None;
                    Ok(session)
                }
                Err(error) => {
                    let error = Arc::new(error);
                    slot.failure = Some((Instant::now(), error.clone()));
                    Err(wrap(error))
                }
            }
        })
    }
}

/// Bytes a tunnelled connection buffers in each direction before its writer waits.
const TUNNEL_BUFFER_BYTES: usize = 64 << 20;

/// Returns a stream for an SSH session tunnelled through `channel`, with a task copying
/// between them in both directions.
///
/// The jump host session's task hands incoming data to each channel through a bounded
/// buffer and waits when it is full. A session running on the channel stream sends
/// through the jump host's bounded command queue and reads nothing while a send waits.
/// Used directly, one session waiting to send while its incoming buffer fills would stop
/// the shared jump host session and every device behind it. The copy task reads the
/// channel as soon as data arrives and buffers up to [`TUNNEL_BUFFER_BYTES`] each way, so
/// neither side waits on the other.
fn pump<S>(channel: S) -> tokio::io::DuplexStream
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (session_side, pump_side) = tokio::io::duplex(TUNNEL_BUFFER_BYTES);
    tokio::spawn(async move {
        let (mut from_channel, mut to_channel) = tokio::io::split(channel);
        let (mut from_session, mut to_session) = tokio::io::split(pump_side);
        let down = async {
            let copied = tokio::io::copy(&mut from_channel, &mut to_session).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut to_session).await;
            copied
        };
        let up = async {
            let copied = tokio::io::copy(&mut from_session, &mut to_channel).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut to_channel).await;
            copied
        };
        let (down, up) = tokio::join!(down, up);
        tracing::trace!(?down, ?up, "tunnel closed");
    });
    session_side
}

/// Identifies a jump host chain by each hop's login and address.
fn chain_key(before: &[Target], last: &Target) -> String {
    before
        .iter()
        .chain(std::iter::once(last))
        .map(|hop| format!("{}@{}", hop.user, hop.address()))
        .collect::<Vec<_>>()
        .join(" > ")
}

fn forward_error(jump_host: &Target, target: &Target, error: russh::Error) -> SshError {
    let reason = match error {
        russh::Error::ChannelOpenFailure(russh::ChannelOpenFailure::ConnectFailed) => {
            "the connection failed (is the address right and sshd running?)".to_owned()
        }
        russh::Error::ChannelOpenFailure(russh::ChannelOpenFailure::AdministrativelyProhibited) => {
            "forwarding is prohibited (set AllowTcpForwarding yes for this user on the jump host)"
                .to_owned()
        }
        other => other.to_string(),
    };
    SshError::Forward {
        jump_host: format!("{}@{}", jump_host.user, jump_host.address()),
        address: target.address(),
        reason,
    }
}

async fn within_connect_timeout(
    target: &Target,
    attempt: impl Future<Output = Result<Session, SshError>>,
) -> Result<Session, SshError> {
    match timeout(target.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(SshError::ConnectTimeout {
            address: target.address(),
            seconds: target.connect_timeout.as_secs(),
        }),
    }
}

/// Builds the russh configuration of one connection. There is no inactivity timeout, so
/// a command that prints nothing for minutes (a K3s restart) keeps its connection;
/// keepalives detect a dead peer instead. Host certificate algorithms are offered only
/// when a `@cert-authority` line could vouch for the host, as OpenSSH orders them.
fn client_config(target: &Target, offer_certificates: bool) -> client::Config {
    use russh::keys::{Algorithm, EcdsaCurve, HashAlg};
    let mut preferred = russh::Preferred::default();
    if offer_certificates {
        preferred.host_key_certificates = std::borrow::Cow::Owned(vec![
            Algorithm::Ed25519,
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256,
            },
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP384,
            },
            Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP521,
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha256),
            },
        ]);
    }
    client::Config {
        inactivity_timeout: None,
        keepalive_interval: target.keepalive.map(|k| k.interval),
        keepalive_max: target.keepalive.map_or(3, |k| k.max),
        nodelay: true,
        preferred,
        ..client::Config::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_no_inactivity_timeout() {
        let target = Target {
            alias: "a".into(),
            host: "a".into(),
            port: 22,
            user: "u".into(),
            identities: Vec::new(),
            certificate_files: Vec::new(),
            identities_only: false,
            agent: None,
            known_hosts: Vec::new(),
            record_in: None,
            host_key_name: "a".into(),
            principal: "a".into(),
            accept_new: false,
            hash_new_entries: None,
            jumps: Vec::new(),
            connect_timeout: std::time::Duration::from_secs(5),
            keepalive: Some(super::super::target::Keepalive {
                interval: std::time::Duration::from_secs(7),
                max: 2,
            }),
        };
        let config = client_config(&target, false);
        assert_eq!(config.inactivity_timeout, None);
        assert_eq!(
            config.keepalive_interval,
            Some(std::time::Duration::from_secs(7))
        );
        assert_eq!(config.keepalive_max, 2);
        assert!(config.preferred.host_key_certificates.is_empty());
        assert!(!client_config(&target, true)
            .preferred
            .host_key_certificates
            .is_empty());
    }
}
