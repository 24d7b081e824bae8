//! Host-key checking during key exchange: the known_hosts files of a run, loaded once, and
//! recording unknown keys when accept-new is on.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use russh::client;
use russh::keys::{Certificate, PublicKey, PublicKeyOrCertificate};

use super::known_hosts::{self, CertVerdict, KnownHosts, Verdict};
use super::target::Target;
use super::SshError;

/// The known_hosts files of a run, each read once and shared by every connection.
#[derive(Default)]
pub struct HostKeyStore {
    files: Mutex<HashMap<PathBuf, Arc<KnownHosts>>>,
    /// Serializes recording within this process; `flock(2)` serializes with others.
    recording: Mutex<()>,
}

impl HostKeyStore {
    /// Returns a file's entries, reading it on first use. A missing file is empty.
    pub fn file(&self, path: &Path) -> Result<Arc<KnownHosts>, SshError> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = files.get(path) {
            return Ok(file.clone());
        }
        let file = KnownHosts::load(path).map_err(|error| SshError::KnownHosts {
            path: path.to_owned(),
            message: error.to_string(),
        })?;
        let file = Arc::new(file);
        files.insert(path.to_owned(), file.clone());
        Ok(file)
    }

    /// Returns whether any of the target's files has a `@cert-authority` line for it.
    pub fn has_authority_for(&self, target: &Target) -> Result<bool, SshError> {
        for path in &target.known_hosts {
            if self.file(path)?.has_authority_for(&target.host_key_name) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Looks a plain key up in every file of the target: a revocation anywhere wins, then
    /// a matching entry anywhere, then a changed key.
    pub fn verify(&self, target: &Target, key: &PublicKey) -> Result<Verdict, SshError> {
        let mut verdicts = Vec::new();
        for path in &target.known_hosts {
            verdicts.push(self.file(path)?.verify(&target.host_key_name, key));
        }
        let revoked = verdicts
            .iter()
            .find(|v| matches!(v, Verdict::Revoked { .. }));
        let changed = verdicts
            .iter()
            .find(|v| matches!(v, Verdict::Changed { .. }));
        Ok(if let Some(revoked) = revoked {
            revoked.clone()
        } else if verdicts.contains(&Verdict::Trusted) {
            Verdict::Trusted
        } else if let Some(changed) = changed {
            changed.clone()
        } else {
            Verdict::Unknown
        })
    }

    /// Checks a host certificate against every file of the target.
    pub fn verify_certificate(
        &self,
        target: &Target,
        certificate: &Certificate,
    ) -> Result<CertVerdict, SshError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut verdicts = Vec::new();
        for path in &target.known_hosts {
            let file = self.file(path)?;
            verdicts.push(file.verify_certificate(
                &target.host_key_name,
                &target.principal,
                certificate,
                now,
            ));
        }
        let rank = |verdict: &CertVerdict| match verdict {
            CertVerdict::Revoked { .. } => 0,
            CertVerdict::Trusted { .. } => 1,
            CertVerdict::Invalid { .. } => 2,
            CertVerdict::NoAuthority => 3,
        };
        Ok(verdicts
            .into_iter()
            .min_by_key(rank)
            .unwrap_or(CertVerdict::NoAuthority))
    }

    /// Appends a line for an unknown key to `path` and returns the line. The file is
    /// locked with `flock(2)` and read again first, so a key another process or
    /// connection recorded meanwhile is not added twice, and a different key recorded
    /// meanwhile is reported as changed. The name is hashed when `hash` is `Some(true)`, or,
    /// when `hash` is `None`, when the file already has hashed entries. A missing file is created with
    /// mode 0600.
    pub fn record(
        &self,
        path: &Path,
        name: &str,
        key: &PublicKey,
        hash: Option<bool>,
    ) -> Result<Option<String>, String> {
        let _serial = self.recording.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)?;
        }
        let mut file = open_for_append(path)?;
        file.lock()
            .map_err(|e| format!("cannot lock the file: {e}"))?;

        let mut text = String::new();
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.read_to_string(&mut text))
            .map_err(|e| format!("cannot read the file: {e}"))?;
        let current = KnownHosts::parse(&text, &path.display().to_string());
        match current.verify(name, key) {
            Verdict::Trusted => {
                self.replace(path, current);
                return Ok(None);
            }
            Verdict::Unknown => {}
            Verdict::Changed { entry } | Verdict::Revoked { entry } => {
                return Err(format!("{entry} now lists another key for this host"))
            }
        }

        let line = if hash.unwrap_or_else(|| current.uses_hashing()) {
            let mut salt = [0u8; 20];
            getrandom::getrandom(&mut salt).map_err(|e| format!("no random salt: {e}"))?;
            known_hosts::format_hashed_line(name, key, &salt)
        } else {
            known_hosts::format_line(name, key)
        };
        let separator = if text.is_empty() || text.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        let record = format!("{separator}{line}\n");
        file.write_all(record.as_bytes())
            .and_then(|_| file.sync_data())
            .map_err(|e| format!("cannot append to the file: {e}"))?;
        text.push_str(&record);
        self.replace(path, KnownHosts::parse(&text, &path.display().to_string()));
        Ok(Some(line))
    }

    fn replace(&self, path: &Path, file: KnownHosts) {
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_owned(), Arc::new(file));
    }
}

fn create_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

fn open_for_append(path: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot open the file: {e}"))
}

/// The russh handler of one connection: checks the host key against the target's
/// known_hosts files and keeps the reason for a rejection, which russh reports only as
/// "unknown key".
pub struct Verifier {
    store: Arc<HostKeyStore>,
    target: Target,
    rejection: Arc<Mutex<Option<SshError>>>,
}

impl Verifier {
    pub(super) fn new(
        store: Arc<HostKeyStore>,
        target: &Target,
        rejection: Arc<Mutex<Option<SshError>>>,
    ) -> Verifier {
        let mut target = target.clone();
        target.jumps.clear();
        Verifier {
            store,
            target,
            rejection,
        }
    }

    fn reject(&self, error: SshError) -> bool {
        *self.rejection.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
        false
    }

    fn check_key(&self, key: &PublicKey) -> Result<bool, SshError> {
        let address = self.target.address();
        let fingerprint = known_hosts::fingerprint(key);
        let key_type = key.algorithm().to_string();
        let rejection = match self.store.verify(&self.target, key)? {
            Verdict::Trusted => return Ok(true),
            Verdict::Unknown if self.target.accept_new => return self.accept_new(key),
            Verdict::Unknown => SshError::HostKeyUnknown {
                known_hosts: self
                    .target
                    .known_hosts
                    .first()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "any known_hosts file (UserKnownHostsFile is none)".into()),
                line: known_hosts::format_line(&self.target.host_key_name, key),
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
        Ok(self.reject(rejection))
    }

    fn accept_new(&self, key: &PublicKey) -> Result<bool, SshError> {
        let address = self.target.address();
        let Some(path) = &self.target.record_in else {
            return Ok(self.reject(SshError::HostKeyRecord {
                address,
                path: PathBuf::from("(none)"),
                message: "UserKnownHostsFile is none, so there is no file to record it in".into(),
            }));
        };
        match self.store.record(
            path,
            &self.target.host_key_name,
            key,
            self.target.hash_new_entries,
        ) {
            Ok(Some(_)) => {
                tracing::info!(
                    host = %address,
                    fingerprint = %known_hosts::fingerprint(key),
                    file = %path.display(),
                    "recorded new host key"
                );
                Ok(true)
            }
            Ok(None) => Ok(true),
            Err(message) => Ok(self.reject(SshError::HostKeyRecord {
                address,
                path: path.clone(),
                message,
            })),
        }
    }

    fn check_certificate(&self, certificate: &Certificate) -> Result<bool, SshError> {
        let address = self.target.address();
        match self.store.verify_certificate(&self.target, certificate)? {
            CertVerdict::Trusted { entry } => {
                tracing::debug!(host = %address, ca = %entry, "host certificate accepted");
                Ok(true)
            }
            CertVerdict::Revoked { entry } => Ok(self.reject(SshError::HostKeyRevoked {
                address,
                entry,
                fingerprint: known_hosts::fingerprint(&PublicKey::new(
                    certificate.public_key().clone(),
                    "",
                )),
            })),
            CertVerdict::Invalid { entry, reason } => Ok(self.reject(SshError::HostCertificate {
                address,
                entry,
                reason,
            })),
            // OpenSSH checks the certified key as a plain key when no CA applies.
            CertVerdict::NoAuthority => {
                self.check_key(&PublicKey::new(certificate.public_key().clone(), ""))
            }
        }
    }
}

impl client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        offered: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let checked = match offered {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.check_key(key),
            PublicKeyOrCertificate::Certificate(certificate) => self.check_certificate(certificate),
        };
        Ok(checked.unwrap_or_else(|error| self.reject(error)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ssh::test_keys::{key, KEY_A, KEY_B};

    #[test]
    fn record_creates_file_and_skips_known_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/.ssh/known_hosts");
        let store = HostKeyStore::default();
        let line = store.record(&path, "[h]:2222", &key(KEY_A), None).unwrap();
        assert_eq!(line, Some(format!("[h]:2222 {KEY_A}")));
        assert_eq!(
            store.record(&path, "[h]:2222", &key(KEY_A), None).unwrap(),
            None
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            store.file(&path).unwrap().verify("[h]:2222", &key(KEY_A)),
            Verdict::Trusted,
            "the cache sees the new line"
        );
    }

    #[test]
    fn record_hashes_when_the_file_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        let hashed = known_hosts::format_hashed_line("other", &key(KEY_B), &[1u8; 20]);
        std::fs::write(&path, hashed).unwrap();
        let store = HostKeyStore::default();
        let line = store
            .record(&path, "edge", &key(KEY_A), None)
            .unwrap()
            .unwrap();
        assert!(line.starts_with("|1|"), "{line}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "a newline was added first: {text}");
        assert!(!text.contains("edge"));
        let plain = store
            .record(&path, "edge2", &key(KEY_A), Some(false))
            .unwrap()
            .unwrap();
        assert!(
            plain.starts_with("edge2 "),
            "HashKnownHosts no wins: {plain}"
        );
    }

    #[test]
    fn record_never_replaces_a_changed_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_hosts");
        std::fs::write(&path, format!("edge {KEY_B}\n")).unwrap();
        let error = HostKeyStore::default()
            .record(&path, "edge", &key(KEY_A), None)
            .unwrap_err();
        assert!(error.contains("known_hosts:1"), "{error}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("edge {KEY_B}\n")
        );
    }
}
