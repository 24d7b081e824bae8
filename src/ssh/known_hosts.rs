//! Strict host-key verification against an OpenSSH `known_hosts` file.
//!
//! Supported entry forms, as `sshd(8)`'s SSH_KNOWN_HOSTS FILE FORMAT describes them:
//! plain and hashed (`|1|salt|hash`) host names, `[host]:port` for ports other than 22,
//! comma-separated patterns with `*`, `?` and `!` negation, several key types per host, and
//! the `@revoked` marker. `@cert-authority` lines are read but host certificates are not
//! accepted yet, so such hosts count as unknown.

use std::collections::HashMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use russh::keys::ssh_key::{HashAlg, PublicKey};
use sha1::Sha1;

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
/// (hashed names, wildcards, negations) are matched one by one on every lookup, with
/// their patterns lowercased and their salts decoded once, at load time.
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
    hosts: Hosts,
    key: PublicKey,
    line: usize,
}

/// The host field of a line, prepared for matching.
enum Hosts {
    /// `|1|salt|hash`: the HMAC-SHA1 of the host name, keyed with the salt.
    Hashed {
        /// The HMAC already keyed with the salt.
        mac: Hmac<Sha1>,
        hash: Vec<u8>,
    },
    /// Comma-separated patterns, lowercased.
    Patterns(Vec<Pattern>),
}

impl std::fmt::Debug for Hosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hosts::Hashed { .. } => f.write_str("Hashed"),
            Hosts::Patterns(patterns) => f.debug_list().entries(patterns).finish(),
        }
    }
}

#[derive(Debug)]
struct Pattern {
    /// The lowercased pattern, without its `!`.
    glob: Vec<char>,
    negated: bool,
}

impl Pattern {
    fn is_exact(&self) -> bool {
        !self.negated && !self.glob.iter().any(|&c| c == '*' || c == '?')
    }
}

impl Hosts {
    /// Matches `name` (as given, for hashed entries) or `lowered` (its lowercased
    /// characters, for patterns).
    fn matches(&self, name: &str, lowered: &[char]) -> bool {
        match self {
            Hosts::Hashed { mac, hash } => {
                let mut mac = mac.clone();
                mac.update(name.as_bytes());
                mac.verify_slice(hash).is_ok()
            }
            Hosts::Patterns(patterns) => {
                let mut matched = false;
                for pattern in patterns {
                    if wildcard_matches(&pattern.glob, lowered) {
                        if pattern.negated {
                            return false;
                        }
                        matched = true;
                    }
                }
                matched
            }
        }
    }

    /// Returns the lowercased names to index the entry under, or `None` when it must be
    /// matched on every lookup.
    fn exact_names(&self) -> Option<Vec<String>> {
        match self {
            Hosts::Patterns(patterns) if patterns.iter().all(Pattern::is_exact) => Some(
                patterns
                    .iter()
                    .map(|pattern| pattern.glob.iter().collect())
                    .collect(),
            ),
            _ => None,
        }
    }
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
            match entry.hosts.exact_names() {
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

    /// Looks up `key` for `host` on `port`.
    pub fn verify(&self, host: &str, port: u16, key: &PublicKey) -> Verdict {
        let name = host_name(host, port);
        let lowered = name.to_ascii_lowercase();
        let lowered_chars: Vec<char> = lowered.chars().collect();
        let scanned = self
            .scanned
            .iter()
            .copied()
            .filter(|&index| self.entries[index].hosts.matches(&name, &lowered_chars));
        let mut indices: Vec<usize> = self
            .exact
            .get(&lowered)
            .into_iter()
            .flatten()
            .copied()
            .chain(scanned)
            .collect();
        // The verdict names the first matching line, so keep the file's order.
        indices.sort_unstable();
        indices.dedup();
        let matching: Vec<&Entry> = indices.iter().map(|&i| &self.entries[i]).collect();

        let same_key = |entry: &&Entry| entry.key.key_data() == key.key_data();
        let at = |entry: &Entry| format!("{}:{}", self.path, entry.line);
        if let Some(entry) = matching
            .iter()
            .find(|e| e.marker == Marker::Revoked && same_key(e))
        {
            return Verdict::Revoked { entry: at(entry) };
        }
        let plain = || matching.iter().filter(|e| e.marker == Marker::None);
        if plain().any(same_key) {
            return Verdict::Trusted;
        }
        if let Some(entry) = plain().find(|e| e.key.algorithm() == key.algorithm()) {
            return Verdict::Changed { entry: at(entry) };
        }
        Verdict::Unknown
    }
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

/// Formats a known_hosts line for a key, for messages that tell the user what to add.
pub fn format_line(host: &str, port: u16, key: &PublicKey) -> String {
    let mut key = key.clone();
    key.set_comment("");
    let encoded = key.to_openssh().unwrap_or_default();
    format!("{} {}", host_name(host, port), encoded.trim())
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
        hosts: parse_hosts(first)?,
        key,
        line: number,
    })
}

/// Prepares a host field: a hashed name, or a comma-separated list of patterns. Returns
/// `None` for a hashed name that does not decode, which could never match.
fn parse_hosts(field: &str) -> Option<Hosts> {
    if let Some(hashed) = field.strip_prefix("|1|") {
        let (salt, hash) = hashed.split_once('|')?;
        let (salt, hash) = (STANDARD.decode(salt).ok()?, STANDARD.decode(hash).ok()?);
        let mac = Hmac::<Sha1>::new_from_slice(&salt).ok()?;
        return Some(Hosts::Hashed { mac, hash });
    }
    let patterns = field
        .split(',')
        .map(|pattern| {
            let (negated, glob) = match pattern.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, pattern),
            };
            Pattern {
                glob: glob.to_ascii_lowercase().chars().collect(),
                negated,
            }
        })
        .collect();
    Some(Hosts::Patterns(patterns))
}

/// Glob matching with `*` (any run) and `?` (one character), as in ssh_config patterns.
fn wildcard_matches(pattern: &[char], text: &[char]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            backtrack = Some((p, t));
            p += 1;
        } else if let Some((star, matched)) = backtrack {
            p = star + 1;
            t = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    const KEY_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEg4Zmrf1SE8Qp3pAvGQvTzdHVTXvUlIfRbsHXt6FDRi";

    fn key(text: &str) -> PublicKey {
        PublicKey::from_openssh(text).unwrap()
    }

    #[test]
    fn plain_entry_with_port_is_trusted() {
        let hosts = KnownHosts::parse(&format!("[10.0.0.1]:2222 {KEY_A}\n"), "kh");
        assert_eq!(
            hosts.verify("10.0.0.1", 2222, &key(KEY_A)),
            Verdict::Trusted
        );
        assert_eq!(hosts.verify("10.0.0.1", 22, &key(KEY_A)), Verdict::Unknown);
    }

    #[test]
    fn different_key_of_same_type_is_changed() {
        let hosts = KnownHosts::parse(&format!("edge1,edge1.lan {KEY_A}\n"), "kh");
        assert_eq!(
            hosts.verify("edge1.lan", 22, &key(KEY_B)),
            Verdict::Changed {
                entry: "kh:1".into()
            }
        );
    }

    #[test]
    fn revoked_key_is_rejected_even_if_listed() {
        let text = format!("edge1 {KEY_A}\n@revoked * {KEY_A}\n");
        let hosts = KnownHosts::parse(&text, "kh");
        assert_eq!(
            hosts.verify("edge1", 22, &key(KEY_A)),
            Verdict::Revoked {
                entry: "kh:2".into()
            }
        );
    }

    #[test]
    fn hashed_entry_matches() {
        // Made with: ssh-keygen -H on a file holding "edge1 KEY_A".
        let salt = [7u8; 20];
        let mut mac = Hmac::<Sha1>::new_from_slice(&salt).unwrap();
        mac.update(b"edge1");
        let hash = mac.finalize().into_bytes();
        let line = format!(
            "|1|{}|{} {KEY_A}\n",
            STANDARD.encode(salt),
            STANDARD.encode(hash)
        );
        let hosts = KnownHosts::parse(&line, "kh");
        assert_eq!(hosts.verify("edge1", 22, &key(KEY_A)), Verdict::Trusted);
        assert_eq!(hosts.verify("edge2", 22, &key(KEY_A)), Verdict::Unknown);
    }

    #[test]
    fn wildcards_and_negation() {
        let hosts = KnownHosts::parse(&format!("*.plant-a.lan,!bad.plant-a.lan {KEY_A}\n"), "kh");
        assert_eq!(
            hosts.verify("e1.plant-a.lan", 22, &key(KEY_A)),
            Verdict::Trusted
        );
        assert_eq!(
            hosts.verify("bad.plant-a.lan", 22, &key(KEY_A)),
            Verdict::Unknown
        );
    }

    #[test]
    fn comments_and_garbage_are_skipped() {
        let hosts = KnownHosts::parse(&format!("# c\nnot a key line\nedge1 {KEY_A}\n"), "kh");
        assert_eq!(hosts.verify("edge1", 22, &key(KEY_A)), Verdict::Trusted);
    }

    #[test]
    fn glob_matching() {
        let glob = |pattern: &str, text: &str| {
            let pattern: Vec<char> = pattern.chars().collect();
            let text: Vec<char> = text.chars().collect();
            wildcard_matches(&pattern, &text)
        };
        assert!(glob("a*c", "abbbc"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "abbc"));
        assert!(glob("*", ""));
    }

    #[test]
    fn exact_names_match_case_insensitively() {
        let hosts = KnownHosts::parse(&format!("EDGE1,[Edge2]:2222 {KEY_A}\n"), "kh");
        assert_eq!(hosts.verify("edge1", 22, &key(KEY_A)), Verdict::Trusted);
        assert_eq!(hosts.verify("edge2", 2222, &key(KEY_A)), Verdict::Trusted);
        assert_eq!(hosts.verify("edge3", 22, &key(KEY_A)), Verdict::Unknown);
    }

    #[test]
    fn verdict_names_first_line_across_index_and_scan() {
        // Line 1 is matched by wildcard, line 2 by exact name; both list another key.
        let text = format!("*.lan {KEY_B}\nedge1.lan {KEY_B}\n");
        let hosts = KnownHosts::parse(&text, "kh");
        assert_eq!(
            hosts.verify("edge1.lan", 22, &key(KEY_A)),
            Verdict::Changed {
                entry: "kh:1".into()
            }
        );
        let reversed = KnownHosts::parse(&format!("edge1.lan {KEY_B}\n*.lan {KEY_B}\n"), "kh");
        assert_eq!(
            reversed.verify("edge1.lan", 22, &key(KEY_A)),
            Verdict::Changed {
                entry: "kh:1".into()
            }
        );
    }

    #[test]
    fn negation_vetoes_an_exact_name() {
        let hosts = KnownHosts::parse(&format!("edge1,!edge1 {KEY_A}\n"), "kh");
        assert_eq!(hosts.verify("edge1", 22, &key(KEY_A)), Verdict::Unknown);
    }

    #[test]
    fn fleet_sized_file_finds_each_host() {
        let mut text = String::new();
        for port in 20000..22000 {
            text.push_str(&format!("[127.0.0.1]:{port} {KEY_B}\n"));
        }
        text.push_str(&format!("[127.0.0.1]:23000 {KEY_A}\n"));
        let hosts = KnownHosts::parse(&text, "kh");
        assert_eq!(
            hosts.verify("127.0.0.1", 21999, &key(KEY_B)),
            Verdict::Trusted
        );
        assert_eq!(
            hosts.verify("127.0.0.1", 23000, &key(KEY_A)),
            Verdict::Trusted
        );
        assert_eq!(
            hosts.verify("127.0.0.1", 20500, &key(KEY_A)),
            Verdict::Changed {
                entry: "kh:501".into()
            }
        );
        assert_eq!(
            hosts.verify("127.0.0.1", 24000, &key(KEY_A)),
            Verdict::Unknown
        );
    }

    #[test]
    fn undecodable_hashed_line_is_skipped() {
        let text = format!("|1|not base64!|x {KEY_A}\nedge1 {KEY_A}\n");
        let hosts = KnownHosts::parse(&text, "kh");
        assert_eq!(hosts.entries.len(), 1);
        assert_eq!(hosts.verify("edge1", 22, &key(KEY_A)), Verdict::Trusted);
    }
}
