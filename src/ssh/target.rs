//! Working out how to reach a device: the inventory, ssh_config and the command line
//! combined into one [`Target`] per device.
//!
//! Precedence, highest first: what the inventory sets for the device (its own fields, then
//! the inventory's defaults or group variables), then ssh_config, then the command-line
//! options (`--user`, `--identity`, `--known-hosts`, `--connect-timeout`,
//! `--accept-new-host-keys`), then built-in defaults. The inventory host is what ssh_config's
//! `Host` patterns match, and ssh_config's `HostName` replaces it as the address to connect
//! to, as `ssh <host>` does. Jump hosts are looked up in ssh_config the same way, with the
//! user and port written in the ProxyJump value winning over their `Host` block.

use std::path::PathBuf;
use std::time::Duration;

use super::known_hosts::host_name;
use super::ssh_config::{
    parse_proxy_jump, HostSettings, JumpHost, Proxy, Setting, SshConfig, StrictHostKeyChecking,
};
use super::tokens::{expand_path, TokenValues};

/// Maximum number of jump hosts in a chain, counting the hops that jump hosts' own
/// ssh_config blocks add.
const MAX_JUMP_HOPS: usize = 8;

/// Private keys tried when neither the inventory, ssh_config nor `--identity` names one,
/// in this order; missing files are skipped.
const DEFAULT_IDENTITIES: [&str; 3] = ["~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa"];

/// The inventory's settings for reaching a device.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The inventory host, matched against `Host` patterns.
    pub host: String,
    /// Port set in the inventory.
    pub port: Option<u16>,
    /// Login user set in the inventory.
    pub user: Option<String>,
    /// Private key set in the inventory.
    pub identity_file: Option<String>,
    /// ProxyJump value set in the inventory (`none` for a direct connection).
    pub proxy_jump: Option<String>,
}

/// Command-line settings, used when neither the inventory nor ssh_config sets a value.
#[derive(Debug, Clone)]
pub struct Fallbacks {
    /// `--user`, else the local user.
    pub user: String,
    /// `--identity`, when given.
    pub identity: Option<String>,
    /// `--known-hosts`.
    pub known_hosts: String,
    /// `--accept-new-host-keys`.
    pub accept_new: bool,
    /// `--connect-timeout`.
    pub connect_timeout: Duration,
    /// Keepalive interval when ssh_config sets no ServerAliveInterval.
    pub keepalive_interval: Duration,
    /// Unanswered keepalives before the connection counts as dead, when ssh_config sets
    /// no ServerAliveCountMax.
    pub keepalive_max: usize,
    /// The agent socket from SSH_AUTH_SOCK.
    pub agent: Option<PathBuf>,
    /// Local values for `~` and `%` tokens.
    pub tokens: TokenValues,
}

/// A private key to try, and where it was named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The private key file.
    pub path: PathBuf,
    /// Whether a missing or unreadable file is an error (named by the inventory or
    /// `--identity`) rather than skipped (named by ssh_config or a default, as OpenSSH
    /// skips them).
    pub required: bool,
}

/// Keepalive settings of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Interval between keepalive requests when nothing arrives from the server.
    pub interval: Duration,
    /// Unanswered requests after which the connection is closed.
    pub max: usize,
}

/// Everything needed to open an authenticated connection to one host.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// The host as given: the inventory host or a jump host.
    pub alias: String,
    /// The address connected to, after ssh_config's HostName.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Login user.
    pub user: String,
    /// Private keys to try, in order.
    pub identities: Vec<Identity>,
    /// Certificates from ssh_config's CertificateFile, offered with matching keys.
    pub certificate_files: Vec<PathBuf>,
    /// Whether agent keys that are not among `identities` stay unused.
    pub identities_only: bool,
    /// The ssh-agent socket, if any.
    pub agent: Option<PathBuf>,
    /// known_hosts files checked, user files first.
    pub known_hosts: Vec<PathBuf>,
    /// The file new host keys are recorded in, with accept-new.
    pub record_in: Option<PathBuf>,
    /// The name host keys are looked up under: `host`, `[host]:port` or HostKeyAlias.
    pub host_key_name: String,
    /// The name a host certificate's principals must match: the host or HostKeyAlias.
    pub principal: String,
    /// Whether unknown host keys are recorded instead of rejected.
    pub accept_new: bool,
    /// ssh_config's HashKnownHosts, when set; otherwise new entries are hashed when the
    /// file already has hashed entries.
    pub hash_new_entries: Option<bool>,
    /// Jump hosts, first one first; empty for a direct connection.
    pub jumps: Vec<Target>,
    /// Bound on connecting, key exchange and authentication.
    pub connect_timeout: Duration,
    /// Keepalives; `None` when ServerAliveInterval is 0.
    pub keepalive: Option<Keepalive>,
}

impl Target {
    /// Returns `host:port`, with brackets around an IPv6 address.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Returns a name for the route, such as `root@10.0.0.5:22 via jump@bastion:22`.
    pub fn describe(&self) -> String {
        let mut text = format!("{}@{}", self.user, self.address());
        if !self.jumps.is_empty() {
            let hops: Vec<String> = self
                .jumps
                .iter()
                .map(|hop| format!("{}@{}", hop.user, hop.address()))
                .collect();
            text.push_str(&format!(" via {}", hops.join(", ")));
        }
        text
    }
}

/// Resolves a device's target. Errors name the inventory or ssh_config line to fix.
pub fn resolve(
    request: &Request,
    config: &SshConfig,
    fallbacks: &Fallbacks,
) -> Result<Target, String> {
    let settings = config.lookup(&request.host);
    let mut target = resolve_one(request, &settings, fallbacks, false)?;
    let proxy = match &request.proxy_jump {
        Some(text) => parse_proxy_jump(text).map_err(|m| format!("inventory proxy_jump: {m}"))?,
        None => settings
            .proxy
            .as_ref()
            .map_or(Proxy::None, |setting| setting.value.clone()),
    };
    target.jumps = resolve_proxy(&proxy, &settings, config, fallbacks, &mut vec![])?;
    Ok(target)
}

/// Resolves a host's own settings, without its jump hosts.
fn resolve_one(
    request: &Request,
    settings: &HostSettings,
    fallbacks: &Fallbacks,
    is_jump_host: bool,
) -> Result<Target, String> {
    reject_unsupported(settings)?;
    let host = settings
        .hostname
        .as_ref()
        .map_or_else(|| request.host.clone(), |s| s.value.clone());
    let port = request
        .port
        .or(settings.port.as_ref().map(|s| s.value))
        .unwrap_or(22);
    let user = request
        .user
        .clone()
        .or_else(|| settings.user.as_ref().map(|s| s.value.clone()))
        .unwrap_or_else(|| fallbacks.user.clone());

    let tokens = TokenValues {
        original_host: request.host.clone(),
        host: host.clone(),
        port,
        remote_user: user.clone(),
        ..fallbacks.tokens.clone()
    };
    let expand =
        |raw: &str, origin: &str| expand_path(raw, &tokens).map_err(|m| format!("{origin}: {m}"));
    let identities = resolve_identities(request, settings, fallbacks, is_jump_host, &expand)?;
    let certificate_files = settings
        .certificate_files
        .iter()
        .map(|s| expand(&s.value, &s.origin.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let agent = match &settings.identity_agent {
        Some(setting) => match setting.value.as_str() {
            "none" => None,
            "SSH_AUTH_SOCK" => fallbacks.agent.clone(),
            raw => {
                let raw = raw.strip_prefix('$').map_or_else(
                    || raw.to_owned(),
                    |name| std::env::var(name).unwrap_or_default(),
                );
                Some(expand(&raw, &setting.origin.to_string())?)
            }
        },
        None => fallbacks.agent.clone(),
    };

    let (known_hosts, record_in) = resolve_known_hosts(settings, fallbacks, &expand)?;
    let accept_new = resolve_accept_new(settings, fallbacks)?;
    let alias = settings.host_key_alias.as_ref().map(|s| s.value.clone());
    let keepalive = resolve_keepalive(settings, fallbacks);
    Ok(Target {
        alias: request.host.clone(),
        host_key_name: alias.clone().unwrap_or_else(|| host_name(&host, port)),
        principal: alias.unwrap_or_else(|| host.clone()),
        host,
        port,
        user,
        identities,
        certificate_files,
        identities_only: settings.identities_only.as_ref().is_some_and(|s| s.value),
        agent,
        known_hosts,
        record_in,
        accept_new,
        hash_new_entries: settings.hash_known_hosts.as_ref().map(|s| s.value),
        jumps: Vec::new(),
        connect_timeout: settings
            .connect_timeout
            .as_ref()
            .map_or(fallbacks.connect_timeout, |s| s.value),
        keepalive,
    })
}

fn reject_unsupported(settings: &HostSettings) -> Result<(), String> {
    if let Some(first) = settings.unsupported.first() {
        return Err(format!("{}: {}", first.origin, first.value));
    }
    if let Some(Setting {
        value: false,
        origin,
    }) = &settings.pubkey_authentication
    {
        return Err(format!(
            "{origin}: PubkeyAuthentication no leaves arcfleet no way to log in, because it \
             authenticates with keys only"
        ));
    }
    Ok(())
}

fn resolve_identities(
    request: &Request,
    settings: &HostSettings,
    fallbacks: &Fallbacks,
    is_jump_host: bool,
    expand: &dyn Fn(&str, &str) -> Result<PathBuf, String>,
) -> Result<Vec<Identity>, String> {
    if let (Some(path), false) = (&request.identity_file, is_jump_host) {
        return Ok(vec![Identity {
            path: expand(path, "inventory identity_file")?,
            required: true,
        }]);
    }
    if !settings.identity_files.is_empty() {
        return settings
            .identity_files
            .iter()
            .map(|s| {
                Ok(Identity {
                    path: expand(&s.value, &s.origin.to_string())?,
                    required: false,
                })
            })
            .collect();
    }
    if let Some(path) = &fallbacks.identity {
        return Ok(vec![Identity {
            path: expand(path, "--identity")?,
            required: true,
        }]);
    }
    DEFAULT_IDENTITIES
        .iter()
        .map(|path| {
            Ok(Identity {
                path: expand(path, "default identity")?,
                required: false,
            })
        })
        .collect()
}

/// OpenSSH's GlobalKnownHostsFile when ssh_config sets none (ssh_config(5)).
const DEFAULT_GLOBAL_KNOWN_HOSTS: [&str; 2] =
    ["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"];

/// Returns the known_hosts files to check and the one to record new keys in.
fn resolve_known_hosts(
    settings: &HostSettings,
    fallbacks: &Fallbacks,
    expand: &dyn Fn(&str, &str) -> Result<PathBuf, String>,
) -> Result<(Vec<PathBuf>, Option<PathBuf>), String> {
    let expand_all = |setting: &Setting<Vec<String>>| -> Result<Vec<PathBuf>, String> {
        if setting.value.iter().any(|v| v == "none") {
            return Ok(Vec::new());
        }
        setting
            .value
            .iter()
            .map(|raw| expand(raw, &setting.origin.to_string()))
            .collect()
    };
    let user_files = match &settings.user_known_hosts_files {
        Some(setting) => expand_all(setting)?,
        None => vec![expand(&fallbacks.known_hosts, "--known-hosts")?],
    };
    let global_files = match &settings.global_known_hosts_files {
        Some(setting) => expand_all(setting)?,
        None => DEFAULT_GLOBAL_KNOWN_HOSTS
            .iter()
            .map(PathBuf::from)
            .collect(),
    };
    let record_in = user_files.first().cloned();
    Ok((
        user_files.into_iter().chain(global_files).collect(),
        record_in,
    ))
}

fn resolve_accept_new(settings: &HostSettings, fallbacks: &Fallbacks) -> Result<bool, String> {
    let Some(setting) = &settings.strict_host_key_checking else {
        return Ok(fallbacks.accept_new);
    };
    match setting.value {
        StrictHostKeyChecking::Yes | StrictHostKeyChecking::Ask => Ok(false),
        StrictHostKeyChecking::AcceptNew => Ok(true),
        StrictHostKeyChecking::No => Err(format!(
            "{}: StrictHostKeyChecking no would trust any host key, including a \
             man-in-the-middle's and a changed key, and arcfleet writes K3s configuration as \
             root: set it to yes or accept-new for this host",
            setting.origin
        )),
    }
}

fn resolve_keepalive(settings: &HostSettings, fallbacks: &Fallbacks) -> Option<Keepalive> {
    let interval = settings
        .server_alive_interval
        .as_ref()
        .map_or(fallbacks.keepalive_interval, |s| s.value);
    if interval.is_zero() {
        return None;
    }
    Some(Keepalive {
        interval,
        max: settings
            .server_alive_count_max
            .as_ref()
            .map_or(fallbacks.keepalive_max, |s| s.value),
    })
}

/// Resolves the jump hosts of a proxy setting. The first hop's own ProxyJump is followed,
/// because OpenSSH reaches the first hop with a plain `ssh` that reads its block. Later
/// hops are reached through the hops before them, which replaces their own ProxyJump.
fn resolve_proxy(
    proxy: &Proxy,
    settings: &HostSettings,
    config: &SshConfig,
    fallbacks: &Fallbacks,
    chain: &mut Vec<String>,
) -> Result<Vec<Target>, String> {
    let hops = match proxy {
        Proxy::None => return Ok(Vec::new()),
        Proxy::Jump(hops) => hops,
        Proxy::Command(command) => {
            let origin = settings
                .proxy
                .as_ref()
                .map(|s| s.origin.to_string())
                .unwrap_or_default();
            return Err(format!(
                "{origin}: arcfleet does not run ProxyCommand `{command}`: use ProxyJump for \
                 jump hosts"
            ));
        }
    };
    let mut targets = Vec::new();
    for (index, hop) in hops.iter().enumerate() {
        let origin = settings
            .proxy
            .as_ref()
            .map(|s| format!("{}: ", s.origin))
            .unwrap_or_default();
        if chain.contains(&hop.host) {
            return Err(format!(
                "{origin}ProxyJump loops back to {}: {} -> {}; remove the loop from the \
                 ProxyJump lines of these hosts",
                hop.host,
                chain.join(" -> "),
                hop.host
            ));
        }
        if chain.len() >= MAX_JUMP_HOPS {
            return Err(format!(
                "{origin}ProxyJump through {} is longer than {MAX_JUMP_HOPS} hops: shorten \
                 the chain",
                chain.join(" -> ")
            ));
        }
        chain.push(hop.host.clone());
        let hop_settings = config.lookup(&hop.host);
        let request = jump_request(hop);
        let target = resolve_one(&request, &hop_settings, fallbacks, true)?;
        if index == 0 {
            if let Some(own) = &hop_settings.proxy {
                targets.extend(resolve_proxy(
                    &own.value,
                    &hop_settings,
                    config,
                    fallbacks,
                    chain,
                )?);
            }
        }
        targets.push(target);
    }
    Ok(targets)
}

fn jump_request(hop: &JumpHost) -> Request {
    Request {
        host: hop.host.clone(),
        port: hop.port,
        user: hop.user.clone(),
        identity_file: None,
        proxy_jump: None,
    }
}

#[cfg(test)]
mod tests;
