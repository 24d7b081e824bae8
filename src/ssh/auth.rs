//! Public-key authentication: private key files (encrypted ones with a passphrase), keys
//! held by ssh-agent, and OpenSSH user certificates for either.
//!
//! Keys are offered in OpenSSH's order. Each identity file comes first, in turn, with its
//! certificates before the key. When the agent has the same key, the agent signs, so the
//! file's passphrase is not needed. Then, unless IdentitiesOnly is set, the agent's other
//! keys and certificates follow.
//! RSA keys sign with SHA-2 (`rsa-sha2-512` or `-256`, whichever the server lists in
//! `server-sig-algs`), because OpenSSH 8.8 and later reject SHA-1 `ssh-rsa` signatures.
//! OpenSSH servers drop the connection after MaxAuthTries (6 by default) rejected keys, so
//! a long agent key list can fail before the right key is offered: set IdentitiesOnly.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use russh::client::Handle;
use russh::keys::agent::client::AgentClient;
use russh::keys::agent::AgentIdentity;
use russh::keys::{Certificate, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use tokio::net::UnixStream;
use tokio::sync::OnceCell;

use super::host_keys::Verifier;
use super::known_hosts::fingerprint;
use super::target::{Identity, Target};
use super::SshError;
use crate::secret::Secret;

/// The passphrase for encrypted private keys and where it came from.
#[derive(Debug, Clone)]
pub struct Passphrase {
    /// The passphrase.
    pub secret: Secret,
    /// Its source, such as `file /run/secrets/key-pass`, for messages.
    pub source: String,
}

type LoadResult = Result<Arc<PrivateKey>, String>;

/// Private keys of a run, each read and decrypted once and shared by every connection.
#[derive(Default)]
pub struct KeyStore {
    passphrase: Option<Passphrase>,
    keys: Mutex<HashMap<PathBuf, Arc<OnceCell<LoadResult>>>>,
}

impl KeyStore {
    /// Creates a store that decrypts encrypted keys with `passphrase`.
    pub fn new(passphrase: Option<Passphrase>) -> KeyStore {
        KeyStore {
            passphrase,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Returns the public half of a private key file: from the file itself when its format
    /// stores it unencrypted (OpenSSH's format does, even for encrypted keys), else from
    /// `FILE.pub`, else by decrypting the key. `Ok(None)` means the file does not exist.
    pub async fn public_key(&self, path: &Path) -> Result<Option<PublicKey>, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error.to_string()),
        };
        if let Ok(key) = PrivateKey::from_openssh(&text) {
            return Ok(Some(key.public_key().clone()));
        }
        let mut public = path.as_os_str().to_owned();
        public.push(".pub");
        if let Ok(key) = russh::keys::load_public_key(PathBuf::from(public)) {
            return Ok(Some(key));
        }
        Ok(Some(self.private_key(path).await?.public_key().clone()))
    }

    /// Returns a decrypted private key, loading it on first use. Decryption (bcrypt for
    /// OpenSSH keys) runs on a blocking thread, once per file even when many connections
    /// ask at the same time.
    pub async fn private_key(&self, path: &Path) -> LoadResult {
        let cell = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            keys.entry(path.to_owned()).or_default().clone()
        };
        cell.get_or_init(|| self.load(path.to_owned()))
            .await
            .clone()
    }

    async fn load(&self, path: PathBuf) -> LoadResult {
        let passphrase = self.passphrase.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let secret = passphrase.as_ref().map(|p| p.secret.expose());
            russh::keys::load_secret_key(&path, secret)
        })
        .await
        .map_err(|error| format!("key loading stopped: {error}"))?;
        loaded
            .map(Arc::new)
            .map_err(|error| match (error, &self.passphrase) {
                (russh::keys::Error::KeyIsEncrypted, _) => "the key is encrypted: pass \
                 --identity-passphrase-file or --identity-passphrase-env, or add the key to \
                 ssh-agent"
                    .to_owned(),
                (
                    russh::keys::Error::SshKey(russh::keys::ssh_key::Error::Crypto),
                    Some(passphrase),
                ) => format!(
                    "the passphrase from {} does not decrypt the key: check that it is this \
                     key's passphrase",
                    passphrase.source
                ),
                (other, Some(passphrase)) => format!(
                    "{other}; if the key is encrypted, check the passphrase from {}",
                    passphrase.source
                ),
                (other, None) => other.to_string(),
            })
    }
}

/// Authenticates as `target.user`, trying keys in OpenSSH's order.
pub(super) async fn authenticate(
    handle: &mut Handle<Verifier>,
    target: &Target,
    keys: &KeyStore,
) -> Result<(), SshError> {
    let mut attempt = Attempt {
        handle,
        target,
        agent: connect_agent(target).await,
        agent_keys: Vec::new(),
        rsa_hash: None,
        tried: Vec::new(),
        offered_keys: HashSet::new(),
        skipped: Vec::new(),
    };
    attempt.agent_keys = attempt.list_agent_keys().await;

    for identity in &target.identities {
        if attempt.try_identity(identity, keys).await? {
            return Ok(());
        }
    }
    if !target.identities_only && attempt.try_remaining_agent_keys().await? {
        return Ok(());
    }
    Err(attempt.failure())
}

/// One authentication run and what it has tried so far.
struct Attempt<'a> {
    handle: &'a mut Handle<Verifier>,
    target: &'a Target,
    agent: Option<AgentClient<UnixStream>>,
    agent_keys: Vec<AgentIdentity>,
    /// The RSA signature hash, asked of the server once.
    rsa_hash: Option<Option<HashAlg>>,
    /// Keys and certificates offered, as `source (fingerprint or key id)`.
    tried: Vec<String>,
    /// SHA-256 fingerprints of the plain keys offered, so the agent's are not offered twice.
    offered_keys: HashSet<String>,
    /// Keys that could not be offered, with why.
    skipped: Vec<String>,
}

async fn connect_agent(target: &Target) -> Option<AgentClient<UnixStream>> {
    let path = target.agent.as_ref()?;
    match AgentClient::connect_uds(path).await {
        Ok(agent) => Some(agent),
        Err(error) => {
            tracing::warn!(agent = %path.display(), %error, "cannot connect to ssh-agent; using key files only");
            None
        }
    }
}

impl Attempt<'_> {
    fn protocol(&self, source: russh::Error) -> SshError {
        SshError::Protocol {
            address: self.target.address(),
            source,
        }
    }

    async fn list_agent_keys(&mut self) -> Vec<AgentIdentity> {
        let Some(agent) = self.agent.as_mut() else {
            return Vec::new();
        };
        match agent.request_identities().await {
            Ok(keys) => keys,
            Err(error) => {
                tracing::warn!(%error, "ssh-agent did not list its keys; using key files only");
                Vec::new()
            }
        }
    }

    async fn hash_for(&mut self, key: &PublicKey) -> Result<Option<HashAlg>, SshError> {
        if !key.algorithm().is_rsa() {
            return Ok(None);
        }
        if let Some(hash) = self.rsa_hash {
            return Ok(hash);
        }
        // A server that sends no server-sig-algs is older than OpenSSH 7.2; SHA-512 is
        // still the best guess.
        let best = self
            .handle
            .best_supported_rsa_hash()
            .await
            .map_err(|e| self.protocol(e))?
            .unwrap_or(Some(HashAlg::Sha512));
        self.rsa_hash = Some(best);
        Ok(best)
    }

    fn agent_holds(&self, key: &PublicKey) -> bool {
        self.agent_keys.iter().any(|identity| {
            matches!(identity, AgentIdentity::PublicKey { key: held, .. } if held.key_data() == key.key_data())
        })
    }

    /// Tries one identity file: its certificates, then the key. Returns whether the
    /// server accepted one.
    async fn try_identity(
        &mut self,
        identity: &Identity,
        keys: &KeyStore,
    ) -> Result<bool, SshError> {
        let path = &identity.path;
        let public = match keys.public_key(path).await {
            Ok(Some(public)) => public,
            Ok(None) if identity.required => {
                return Err(SshError::Key {
                    path: path.clone(),
                    message: "the file does not exist".into(),
                })
            }
            Ok(None) => {
                tracing::debug!(key = %path.display(), "identity file not found, skipped");
                return Ok(false);
            }
            Err(message) => return self.unusable(identity, message),
        };
        let in_agent = self.agent_holds(&public);
        let source = if in_agent {
            format!("{} via ssh-agent", path.display())
        } else {
            path.display().to_string()
        };

        for certificate in certificates_for(path, &public, &self.target.certificate_files) {
            let label = format!("certificate for {source}");
            let accepted = if in_agent {
                self.offer_certificate_via_agent(&certificate, &public, &label)
                    .await?
            } else {
                match keys.private_key(path).await {
                    Ok(private) => self.offer_certificate(private, certificate, &label).await?,
                    Err(message) => return self.unusable(identity, message),
                }
            };
            if accepted {
                return Ok(true);
            }
        }
        if in_agent {
            return self.offer_via_agent(public, &source).await;
        }
        match keys.private_key(path).await {
            Ok(private) => self.offer_key(private, &source).await,
            Err(message) => self.unusable(identity, message),
        }
    }

    /// Records a key that cannot be used. A key the inventory or `--identity` names fails
    /// the connection at once, unless the agent has keys that may still work.
    fn unusable(&mut self, identity: &Identity, message: String) -> Result<bool, SshError> {
        if identity.required && self.agent_keys.is_empty() {
            return Err(SshError::Key {
                path: identity.path.clone(),
                message,
            });
        }
        tracing::debug!(key = %identity.path.display(), %message, "identity skipped");
        self.skipped
            .push(format!("{}: {message}", identity.path.display()));
        Ok(false)
    }

    async fn offer_key(&mut self, key: Arc<PrivateKey>, source: &str) -> Result<bool, SshError> {
        let hash = self.hash_for(key.public_key()).await?;
        let print = fingerprint(key.public_key());
        self.tried.push(format!("{source} ({print})"));
        self.offered_keys.insert(print);
        let user = self.target.user.clone();
        let result = self
            .handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash))
            .await
            .map_err(|e| self.protocol(e))?;
        Ok(result.success())
    }

    async fn offer_certificate(
        &mut self,
        key: Arc<PrivateKey>,
        certificate: Certificate,
        label: &str,
    ) -> Result<bool, SshError> {
        self.tried
            .push(format!("{label} ({})", certificate.key_id()));
        let user = self.target.user.clone();
        let result = self
            .handle
            .authenticate_openssh_cert(user, key, certificate)
            .await
            .map_err(|e| self.protocol(e))?;
        Ok(result.success())
    }

    async fn offer_via_agent(&mut self, key: PublicKey, source: &str) -> Result<bool, SshError> {
        let hash = self.hash_for(&key).await?;
        let print = fingerprint(&key);
        self.tried.push(format!("{source} ({print})"));
        self.offered_keys.insert(print);
        let user = self.target.user.clone();
        let Some(agent) = self.agent.as_mut() else {
            return Ok(false);
        };
        match self
            .handle
            .authenticate_publickey_with(user, key, hash, agent)
            .await
        {
            Ok(result) => Ok(result.success()),
            Err(error) => self.agent_failed(error),
        }
    }

    async fn offer_certificate_via_agent(
        &mut self,
        certificate: &Certificate,
        key: &PublicKey,
        label: &str,
    ) -> Result<bool, SshError> {
        let hash = self.hash_for(key).await?;
        self.tried
            .push(format!("{label} ({})", certificate.key_id()));
        let user = self.target.user.clone();
        let Some(agent) = self.agent.as_mut() else {
            return Ok(false);
        };
        match self
            .handle
            .authenticate_certificate_with(user, certificate.clone(), hash, agent)
            .await
        {
            Ok(result) => Ok(result.success()),
            Err(error) => self.agent_failed(error),
        }
    }

    /// Handles an agent error: an agent that declines to sign fails that key only, but a
    /// broken connection to the server fails the whole attempt.
    fn agent_failed(&mut self, error: russh::AgentAuthError) -> Result<bool, SshError> {
        match error {
            russh::AgentAuthError::Send(_) => Err(self.protocol(russh::Error::SendError)),
            russh::AgentAuthError::Key(error) => {
                self.skipped
                    .push(format!("ssh-agent did not sign: {error}"));
                Ok(false)
            }
        }
    }

    async fn try_remaining_agent_keys(&mut self) -> Result<bool, SshError> {
        for identity in std::mem::take(&mut self.agent_keys) {
            let accepted = match &identity {
                AgentIdentity::PublicKey { key, comment } => {
                    if self.offered_keys.contains(&fingerprint(key)) {
                        continue;
                    }
                    let source = format!("ssh-agent key {comment}");
                    self.offer_via_agent(key.clone(), source.trim_end()).await?
                }
                AgentIdentity::Certificate {
                    certificate,
                    comment,
                } => {
                    let key = PublicKey::new(certificate.public_key().clone(), "");
                    let label = format!("ssh-agent certificate {comment}");
                    self.offer_certificate_via_agent(certificate, &key, label.trim_end())
                        .await?
                }
            };
            if accepted {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn failure(self) -> SshError {
        let address = self.target.address();
        let user = self.target.user.clone();
        if self.tried.is_empty() {
            let mut looked_for: Vec<String> = self
                .target
                .identities
                .iter()
                .map(|i| i.path.display().to_string())
                .collect();
            looked_for.push(match &self.target.agent {
                Some(path) => format!("ssh-agent at {} (no keys)", path.display()),
                None => {
                    "no ssh-agent (SSH_AUTH_SOCK is not set, or IdentityAgent is none)".to_owned()
                }
            });
            let mut detail = format!("looked for {}", looked_for.join(", "));
            if !self.skipped.is_empty() {
                detail.push_str(&format!("; {}", self.skipped.join("; ")));
            }
            return SshError::NoIdentity {
                user,
                address,
                detail: format!("{detail}. Pass --identity, set IdentityFile or start ssh-agent"),
            };
        }
        let mut tried = self.tried.join(", ");
        if !self.skipped.is_empty() {
            tried.push_str(&format!("; not offered: {}", self.skipped.join("; ")));
        }
        SshError::AuthRejected {
            user,
            address,
            tried,
        }
    }
}

/// Returns the certificates to offer with a key: `FILE-cert.pub` beside it, then the
/// CertificateFile entries whose certified key is this key. Missing files are skipped.
fn certificates_for(
    path: &Path,
    key: &PublicKey,
    certificate_files: &[PathBuf],
) -> Vec<Certificate> {
    let mut beside = path.as_os_str().to_owned();
    beside.push("-cert.pub");
    let candidates =
        std::iter::once(PathBuf::from(beside)).chain(certificate_files.iter().cloned());
    let mut certificates: Vec<Certificate> = Vec::new();
    for candidate in candidates {
        match russh::keys::load_openssh_certificate(&candidate) {
            Ok(certificate) if certificate.public_key() == key.key_data() => {
                if !certificates.iter().any(|c| c == &certificate) {
                    certificates.push(certificate);
                }
            }
            Ok(_) => {}
            Err(error) => {
                if candidate.exists() {
                    tracing::warn!(certificate = %candidate.display(), %error, "certificate not readable, skipped");
                }
            }
        }
    }
    certificates
}
