//! Strict host-key verification against an OpenSSH `known_hosts` file.
//!
//! The entry forms of `sshd(8)`'s SSH_KNOWN_HOSTS FILE FORMAT are supported: plain and
//! hashed (`|1|salt|hash`) host names, `[host]:port` for ports other than 22, and
//! comma-separated patterns with `*`, `?` and `!` negation. A host may have several key
//! types. `@revoked` marks keys never to trust, and `@cert-authority` lines trust host
//! certificates signed by the listed CA key. Lines with another marker are skipped, as
//! OpenSSH skips them.

use std::collections::HashMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::public::KeyData;
use russh::keys::ssh_key::{Algorithm, Certificate, HashAlg, PublicKey};
use sha1::Sha1;

use super::pattern::{glob_matches, host_matches_list};

/// The outcome of looking a host key up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A line lists this key for the host.
    Trusted,
    /// The host is listed with another key of the same type: the key changed.
    Changed {
        /// `file:line` of the entry with the expected key.
        entry: String,
    },
    /// The key is marked `@revoked`.
    Revoked {
        /// `file:line` of the `@revoked` entry.
        entry: String,
    },
    /// The host has no key of this type in the file.
    Unknown,
}

/// The outcome of checking a host certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertVerdict {
    /// A `@cert-authority` line for the host lists the CA that signed the certificate, and
    /// the certificate is valid for the host now.
    Trusted {
        /// `file:line` of the `@cert-authority` entry.
        entry: String,
    },
    /// The CA key or the certified key is marked `@revoked`.
    Revoked {
        /// `file:line` of the `@revoked` entry.
        entry: String,
    },
    /// A trusted CA signed the certificate, but the certificate is not valid for this host.
    Invalid {
        /// `file:line` of the `@cert-authority` entry.
        entry: String,
        /// The problem with the certificate.
        reason: String,
    },
    /// No `@cert-authority` line for the host lists the certificate's CA.
    NoAuthority,
}

#[derive(Debug, PartialEq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

/// A parsed known_hosts file, indexed by host name.
///
/// A fleet's known_hosts file has a line per device, so a run looks up N hosts in N lines.
/// Lines whose patterns are all exact names are found with one hash lookup. The others
/// (hashed names, wildcards, negations) are matched one by one on every lookup.
#[derive(Debug, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
    /// Indices of entries whose patterns are all exact names, by each lowercased name.
    exact: HashMap<String, Vec<usize>>,
    /// Indices of the entries every lookup matches one by one.
    scanned: Vec<usize>,
    path: String,
}

#[derive(Debug)]
struct Entry {
    marker: Marker,
    patterns: String,
    key: PublicKey,
    line: usize,
}

impl KnownHosts {
    /// Reads a known_hosts file; a missing file is an empty one. Lines that do not parse
    /// are skipped, as OpenSSH does.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(error),
        };
        Ok(Self::parse(&text, &path.display().to_string()))
    }

    /// Parses known_hosts text; `path` names the file in verdicts.
    pub fn parse(text: &str, path: &str) -> Self {
        let mut hosts = KnownHosts {
            path: path.to_owned(),
            ..KnownHosts::default()
        };
        let entries = text
            .lines()
            .enumerate()
            .filter_map(|(index, line)| parse_line(line, index + 1));
        for entry in entries {
            let index = hosts.entries.len();
            match exact_names(&entry.patterns) {
                Some(names) => {
                    for name in names {
                        hosts.exact.entry(name).or_default().push(index);
                    }
                }
                None => hosts.scanned.push(index),
            }
            hosts.entries.push(entry);
        }
        hosts
    }

    /// Returns the file the entries came from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Returns whether any entry has a hashed host name, so that new entries should be
    /// hashed too.
    pub fn uses_hashing(&self) -> bool {
        self.entries
            .iter()
            .any(|entry| entry.patterns.starts_with("|1|"))
    }

    /// Looks up `key` for a host recorded under `name` (see [`host_name`]).
    pub fn verify(&self, name: &str, key: &PublicKey) -> Verdict {
        let same_key = |entry: &Entry| entry.key.key_data() == key.key_data();
        if let Some(entry) = self.revoked(name, key.key_data()) {
            return Verdict::Revoked {
                entry: self.at(entry),
            };
        }
        let plain = || self.matching(name).filter(|e| e.marker == Marker::None);
        if plain().any(same_key) {
            return Verdict::Trusted;
        }
        if let Some(entry) = plain().find(|e| e.key.algorithm() == key.algorithm()) {
            return Verdict::Changed {
                entry: self.at(entry),
            };
        }
        Verdict::Unknown
    }

    /// Returns whether a `@cert-authority` line applies to a host recorded under `name`.
    pub fn has_authority_for(&self, name: &str) -> bool {
        self.matching(name)
            .any(|entry| entry.marker == Marker::CertAuthority)
    }

    /// Checks a host certificate the way OpenSSH 9 does. The CA must be listed for `name`
    /// in a `@cert-authority` line, and the certificate must:
    ///
    /// - be a host certificate, valid at `now` (Unix seconds);
    /// - list a principal matching `principal`, the host name without port (or
    ///   HostKeyAlias);
    /// - carry no critical options;
    /// - not be signed with SHA-1 RSA, which OpenSSH's default CASignatureAlgorithms
    ///   excludes.
    pub fn verify_certificate(
        &self,
        name: &str,
        principal: &str,
        certificate: &Certificate,
        now: u64,
    ) -> CertVerdict {
        for revoked_key in [certificate.signature_key(), certificate.public_key()] {
            if let Some(entry) = self.revoked(name, revoked_key) {
                return CertVerdict::Revoked {
                    entry: self.at(entry),
                };
            }
        }
        let Some(authority) = self.matching(name).find(|entry| {
            entry.marker == Marker::CertAuthority
                && entry.key.key_data() == certificate.signature_key()
        }) else {
            return CertVerdict::NoAuthority;
        };
        let entry = self.at(authority);
        match certificate_problem(certificate, &authority.key, principal, now) {
            None => CertVerdict::Trusted { entry },
            Some(reason) => CertVerdict::Invalid { entry, reason },
        }
    }

    /// Returns the entries for `name` in file order, since verdicts name the first
    /// matching line.
    fn matching<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a Entry> + 'a {
        let scanned = self
            .scanned
            .iter()
            .copied()
            .filter(|&index| host_matches(&self.entries[index].patterns, name));
        let mut indices: Vec<usize> = self
            .exact
            .get(&name.to_ascii_lowercase())
            .into_iter()
            .flatten()
            .copied()
            .chain(scanned)
            .collect();
        indices.sort_unstable();
        indices.dedup();
        indices.into_iter().map(|index| &self.entries[index])
    }

    fn revoked<'a>(&'a self, name: &str, key: &KeyData) -> Option<&'a Entry> {
        self.matching(name)
            .find(|entry| entry.marker == Marker::Revoked && entry.key.key_data() == key)
    }

    fn at(&self, entry: &Entry) -> String {
        format!("{}:{}", self.path, entry.line)
    }
}

/// Returns why a certificate signed by `authority` is not valid for `principal` at `now`.
fn certificate_problem(
    certificate: &Certificate,
    authority: &PublicKey,
    principal: &str,
    now: u64,
) -> Option<String> {
    if certificate.cert_type() != CertType::Host {
        return Some("it is a user certificate, not a host certificate".to_owned());
    }
    if certificate.signature().algorithm() == (Algorithm::Rsa { hash: None }) {
        return Some(
            "the CA signed it with ssh-rsa (SHA-1), which OpenSSH no longer accepts: re-sign \
             it with rsa-sha2-512"
                .to_owned(),
        );
    }
    let fingerprint = authority.fingerprint(HashAlg::Sha256);
    if certificate.validate_at(now, [&fingerprint]).is_err() {
        return Some(if now < certificate.valid_after() {
            "it is not valid yet".to_owned()
        } else if now >= certificate.valid_before() {
            "it has expired".to_owned()
        } else {
            "its signature does not verify".to_owned()
        });
    }
    if !certificate.critical_options().is_empty() {
        let names: Vec<&str> = certificate
            .critical_options()
            .keys()
            .map(String::as_str)
            .collect();
        return Some(format!(
            "it has critical options ({}), which host certificates do not support",
            names.join(", ")
        ));
    }
    let principal = principal.to_ascii_lowercase();
    let listed = certificate.valid_principals();
    if listed.is_empty() {
        return Some("it lists no principals".to_owned());
    }
    if !listed
        .iter()
        .any(|pattern| glob_matches(&pattern.to_ascii_lowercase(), &principal))
    {
        return Some(format!(
            "`{principal}` is not among its principals ({})",
            listed.join(", ")
        ));
    }
    None
}

/// Returns the name a host is recorded under: `host`, or `[host]:port` off port 22.
pub fn host_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Returns the key's SHA-256 fingerprint as OpenSSH prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Formats a known_hosts line recording `key` under `name`, for messages that tell the
/// user what to add.
pub fn format_line(name: &str, key: &PublicKey) -> String {
    format!("{name} {}", encode_key(key))
}

/// Formats a known_hosts line with the name hashed (`|1|salt|hash`, HMAC-SHA1 keyed with
/// the 20-byte `salt`), as `ssh-keygen -H` and `HashKnownHosts yes` write it.
pub fn format_hashed_line(name: &str, key: &PublicKey, salt: &[u8; 20]) -> String {
    format!("{} {}", hash_name(name, salt), encode_key(key))
}

fn hash_name(name: &str, salt: &[u8]) -> String {
    let hash = match Hmac::<Sha1>::new_from_slice(salt) {
        Ok(mut mac) => {
            mac.update(name.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        // HMAC accepts keys of any length, so this arm is never taken.
        Err(_) => Vec::new(),
    };
    format!("|1|{}|{}", STANDARD.encode(salt), STANDARD.encode(hash))
}

fn encode_key(key: &PublicKey) -> String {
    let mut key = key.clone();
    key.set_comment("");
    key.to_openssh().unwrap_or_default().trim().to_owned()
}

fn parse_line(line: &str, number: usize) -> Option<Entry> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut fields = line.split_whitespace();
    let mut first = fields.next()?;
    let marker = match first {
        "@revoked" => Marker::Revoked,
        "@cert-authority" => Marker::CertAuthority,
        other if other.starts_with('@') => return None,
        _ => Marker::None,
    };
    if marker != Marker::None {
        first = fields.next()?;
    }
    let key_type = fields.next()?;
    let key_base64 = fields.next()?;
    let key = PublicKey::from_openssh(&format!("{key_type} {key_base64}")).ok()?;
    Some(Entry {
        marker,
        patterns: first.to_owned(),
        key,
        line: number,
    })
}

/// Returns the lowercased names of a host field made only of exact names, or `None` when
/// it is hashed or has a wildcard or negation, so it must be matched on every lookup.
fn exact_names(patterns: &str) -> Option<Vec<String>> {
    if patterns.starts_with("|1|") {
        return None;
    }
    patterns
        .split(',')
        .map(|pattern| {
            let plain = !pattern.is_empty() && !pattern.contains(['*', '?', '!']);
            plain.then(|| pattern.to_ascii_lowercase())
        })
        .collect()
}

/// Matches a host name against a comma-separated pattern list or a hashed entry.
fn host_matches(patterns: &str, name: &str) -> bool {
    if let Some(hashed) = patterns.strip_prefix("|1|") {
        return hashed_matches(hashed, name);
    }
    host_matches_list(patterns.split(','), name)
}

fn hashed_matches(hashed: &str, name: &str) -> bool {
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (STANDARD.decode(salt), STANDARD.decode(hash)) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

#[cfg(test)]
mod tests;
