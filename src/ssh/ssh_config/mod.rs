//! Reading an OpenSSH client configuration file (`~/.ssh/config`, ssh_config(5)).
//!
//! `Host` blocks with patterns (`*`, `?`, `!` negation) select the lines that apply to a
//! host; lines before the first `Host` apply to every host. For each keyword the first
//! value found wins, except `IdentityFile` and `CertificateFile`, which accumulate, as in
//! OpenSSH. Values are checked when the file is read, so a bad port or an unterminated
//! quote is an error with its `file:line` even in a block no device uses.
//!
//! arcfleet reads one file and never `/etc/ssh/ssh_config`. `Include` and `Match` are
//! errors, because ignoring them would connect with settings OpenSSH would not use. A
//! keyword OpenSSH does not know gets a warning, because it is probably a typo. A real
//! OpenSSH keyword that arcfleet has no use for is ignored, as `ssh` ignores an option
//! that does not affect it. Keywords that would change host-key checking in a way
//! arcfleet cannot follow (`KnownHostsCommand`, `RevokedHostKeys`, `CanonicalizeHostname`)
//! fail the devices they apply to.

mod keywords;
mod parse;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::inventory::Location;

use super::pattern::{glob_matches, host_matches_list};

pub use parse::parse_proxy_jump;

/// One hop of a ProxyJump list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpHost {
    /// Login user, when the hop names one.
    pub user: Option<String>,
    /// Host name or address (an ssh_config `Host` alias is resolved like any host).
    pub host: String,
    /// Port, when the hop names one.
    pub port: Option<u16>,
}

/// The route to a host: direct, through jump hosts, or through a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proxy {
    /// `ProxyJump none` or `ProxyCommand none`: connect directly.
    None,
    /// `ProxyJump`: the hops, first one first.
    Jump(Vec<JumpHost>),
    /// `ProxyCommand`, which arcfleet does not run.
    Command(String),
}

/// `StrictHostKeyChecking` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrictHostKeyChecking {
    /// `yes`: unknown and changed keys are rejected.
    Yes,
    /// `ask`: OpenSSH prompts on a terminal. arcfleet never prompts, so it means `yes`.
    Ask,
    /// `accept-new`: unknown keys are recorded, changed keys are rejected.
    AcceptNew,
    /// `no` or `off`: arcfleet rejects this setting.
    No,
}

/// A decoded ssh_config line value.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    HostName(String),
    User(String),
    Port(u16),
    IdentityFile(String),
    CertificateFile(String),
    IdentitiesOnly(bool),
    IdentityAgent(String),
    HostKeyAlias(String),
    Proxy(Proxy),
    UserKnownHostsFile(Vec<String>),
    GlobalKnownHostsFile(Vec<String>),
    StrictHostKeyChecking(StrictHostKeyChecking),
    HashKnownHosts(bool),
    ConnectTimeout(Duration),
    ServerAliveInterval(Duration),
    ServerAliveCountMax(usize),
    PubkeyAuthentication(bool),
    Unsupported { keyword: String, reason: String },
}

/// A value and the line that set it.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting<T> {
    /// The value as written (tokens such as `%h` are expanded later).
    pub value: T,
    /// The line that set the value.
    pub origin: Location,
}

/// The settings that apply to one host, as ssh_config(5) combines them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSettings {
    /// `HostName`, with `%h` and `%%` expanded.
    pub hostname: Option<Setting<String>>,
    /// `User`.
    pub user: Option<Setting<String>>,
    /// `Port`.
    pub port: Option<Setting<u16>>,
    /// Every `IdentityFile`, in order.
    pub identity_files: Vec<Setting<String>>,
    /// Every `CertificateFile`, in order.
    pub certificate_files: Vec<Setting<String>>,
    /// `IdentitiesOnly`.
    pub identities_only: Option<Setting<bool>>,
    /// `IdentityAgent`.
    pub identity_agent: Option<Setting<String>>,
    /// `HostKeyAlias`.
    pub host_key_alias: Option<Setting<String>>,
    /// `ProxyJump` or `ProxyCommand`, whichever comes first.
    pub proxy: Option<Setting<Proxy>>,
    /// `UserKnownHostsFile`.
    pub user_known_hosts_files: Option<Setting<Vec<String>>>,
    /// `GlobalKnownHostsFile`.
    pub global_known_hosts_files: Option<Setting<Vec<String>>>,
    /// `StrictHostKeyChecking`.
    pub strict_host_key_checking: Option<Setting<StrictHostKeyChecking>>,
    /// `HashKnownHosts`.
    pub hash_known_hosts: Option<Setting<bool>>,
    /// `ConnectTimeout`.
    pub connect_timeout: Option<Setting<Duration>>,
    /// `ServerAliveInterval`; zero disables keepalives.
    pub server_alive_interval: Option<Setting<Duration>>,
    /// `ServerAliveCountMax`.
    pub server_alive_count_max: Option<Setting<usize>>,
    /// `PubkeyAuthentication`.
    pub pubkey_authentication: Option<Setting<bool>>,
    /// Keywords that apply but that arcfleet cannot follow, with the reason.
    pub unsupported: Vec<Setting<String>>,
}

/// An ssh_config file that could not be read, with the line to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read ssh_config {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is invalid or uses a feature arcfleet does not support.
    #[error("{location}: {message}")]
    Invalid {
        /// The line.
        location: Location,
        /// The problem and what to do.
        message: String,
    },
}

#[derive(Debug, Clone)]
struct Line {
    /// Index into `SshConfig::blocks`.
    block: usize,
    value: Value,
    origin: Location,
}

/// A parsed ssh_config file.
#[derive(Debug, Clone, Default)]
pub struct SshConfig {
    /// Host patterns of each block; block 0 holds the lines before the first `Host` and
    /// matches every host.
    blocks: Vec<Vec<String>>,
    lines: Vec<Line>,
}

impl SshConfig {
    /// Returns a configuration with no settings, for `--ssh-config none` or a missing
    /// `~/.ssh/config`.
    pub fn empty() -> SshConfig {
        SshConfig {
            blocks: vec![Vec::new()],
            lines: Vec::new(),
        }
    }

    /// Reads a file. Returns the configuration and warnings about keywords OpenSSH does not
    /// know, each with its `file:line`.
    pub fn load(path: &Path) -> Result<(SshConfig, Vec<String>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        SshConfig::parse(&text, path)
    }

    /// Parses ssh_config text; `path` names the file in errors and warnings.
    pub fn parse(text: &str, path: &Path) -> Result<(SshConfig, Vec<String>), ConfigError> {
        let mut config = SshConfig::empty();
        let mut warnings = Vec::new();
        let mut ignore_unknown: Vec<String> = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let location = Location {
                path: path.to_owned(),
                line: index + 1,
            };
            let invalid = |message: String| ConfigError::Invalid {
                location: location.clone(),
                message,
            };
            let Some((keyword, rest)) = parse::split_keyword(line) else {
                continue;
            };
            let args = parse::split_args(rest).map_err(|m| invalid(format!("`{keyword}`: {m}")))?;
            if args.is_empty() {
                return Err(invalid(format!("no value after `{keyword}`")));
            }
            match keyword.as_str() {
                "host" => {
                    config.blocks.push(args);
                    continue;
                }
                "match" | "include" => {
                    return Err(invalid(format!(
                        "arcfleet does not support `{keyword}`, and ignoring it could connect \
                         with settings OpenSSH would not use: copy the settings into `Host` \
                         blocks of a file for --ssh-config, or pass --ssh-config none"
                    )))
                }
                "ignoreunknown" => {
                    ignore_unknown
                        .extend(args.iter().flat_map(|a| a.split(',')).map(str::to_owned));
                    continue;
                }
                _ => {}
            }
            if !keywords::is_openssh_keyword(&keyword) {
                let ignored = ignore_unknown
                    .iter()
                    .any(|pattern| glob_matches(&pattern.to_ascii_lowercase(), &keyword));
                if !ignored {
                    warnings.push(unknown_keyword_warning(&location, &keyword));
                }
                continue;
            }
            let value = parse::decode(&keyword, rest, &args)
                .map_err(|m| invalid(format!("`{keyword}`: {m}")))?;
            if let Some(value) = value {
                config.lines.push(Line {
                    block: config.blocks.len() - 1,
                    value,
                    origin: location,
                });
            }
        }
        Ok((config, warnings))
    }

    /// Returns the settings for a host as given to `ssh` (an inventory host or jump host).
    pub fn lookup(&self, host: &str) -> HostSettings {
        let matches: Vec<bool> = self
            .blocks
            .iter()
            .enumerate()
            .map(|(index, patterns)| {
                index == 0 || host_matches_list(patterns.iter().map(String::as_str), host)
            })
            .collect();
        let mut settings = HostSettings::default();
        for line in self.lines.iter().filter(|line| matches[line.block]) {
            apply(&mut settings, line, host);
        }
        settings
    }
}

fn unknown_keyword_warning(location: &Location, keyword: &str) -> String {
    let hint = keywords::closest_keyword(keyword)
        .map(|known| format!(" (did you mean `{known}`?)"))
        .unwrap_or_default();
    format!(
        "{location}: unknown ssh_config keyword `{keyword}`{hint}; OpenSSH would reject the \
         file and arcfleet ignores the line"
    )
}

/// Stores a line's value in `settings` unless an earlier line already set the keyword.
fn apply(settings: &mut HostSettings, line: &Line, host: &str) {
    fn first<T: Clone>(slot: &mut Option<Setting<T>>, value: &T, origin: &Location) {
        if slot.is_none() {
            *slot = Some(Setting {
                value: value.clone(),
                origin: origin.clone(),
            });
        }
    }
    let origin = &line.origin;
    let setting = |value: &String| Setting {
        value: value.clone(),
        origin: origin.clone(),
    };
    match &line.value {
        Value::HostName(name) => {
            first(&mut settings.hostname, &expand_hostname(name, host), origin)
        }
        Value::User(user) => first(&mut settings.user, user, origin),
        Value::Port(port) => first(&mut settings.port, port, origin),
        Value::IdentityFile(path) => settings.identity_files.push(setting(path)),
        Value::CertificateFile(path) => settings.certificate_files.push(setting(path)),
        Value::IdentitiesOnly(flag) => first(&mut settings.identities_only, flag, origin),
        Value::IdentityAgent(agent) => first(&mut settings.identity_agent, agent, origin),
        Value::HostKeyAlias(alias) => first(&mut settings.host_key_alias, alias, origin),
        Value::Proxy(proxy) => first(&mut settings.proxy, proxy, origin),
        Value::UserKnownHostsFile(files) => {
            first(&mut settings.user_known_hosts_files, files, origin)
        }
        Value::GlobalKnownHostsFile(files) => {
            first(&mut settings.global_known_hosts_files, files, origin)
        }
        Value::StrictHostKeyChecking(mode) => {
            first(&mut settings.strict_host_key_checking, mode, origin)
        }
        Value::HashKnownHosts(flag) => first(&mut settings.hash_known_hosts, flag, origin),
        Value::ConnectTimeout(limit) => first(&mut settings.connect_timeout, limit, origin),
        Value::ServerAliveInterval(interval) => {
            first(&mut settings.server_alive_interval, interval, origin)
        }
        Value::ServerAliveCountMax(count) => {
            first(&mut settings.server_alive_count_max, count, origin)
        }
        Value::PubkeyAuthentication(flag) => {
            first(&mut settings.pubkey_authentication, flag, origin)
        }
        Value::Unsupported { keyword, reason } => settings
            .unsupported
            .push(setting(&format!("`{keyword}`: {reason}"))),
    }
}

/// Expands `%h` (the host as given) and `%%` in a HostName value, the only tokens
/// OpenSSH accepts there.
fn expand_hostname(value: &str, host: &str) -> String {
    let mut expanded = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            expanded.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => expanded.push_str(host),
            Some('%') => expanded.push('%'),
            Some(other) => {
                expanded.push('%');
                expanded.push(other);
            }
            None => expanded.push('%'),
        }
    }
    expanded
}

#[cfg(test)]
mod tests;
