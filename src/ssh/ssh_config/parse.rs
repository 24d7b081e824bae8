//! Splitting ssh_config lines into a keyword and arguments, and decoding the arguments of
//! the keywords arcfleet uses, the way OpenSSH's `readconf.c` does.

use std::time::Duration;

use super::{JumpHost, Proxy, StrictHostKeyChecking, Value};

/// Splits a line into its lowercased keyword and the rest. Returns `None` for blank lines
/// and comments. The keyword ends at whitespace or at one `=`, which may have whitespace
/// around it.
pub(super) fn split_keyword(line: &str) -> Option<(String, &str)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let (keyword, rest) = line.split_at(end);
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
    Some((keyword.to_ascii_lowercase(), rest))
}

/// Splits arguments on unquoted whitespace. Double and single quotes group words and may
/// start mid-word; a backslash escapes a quote, a backslash, or (outside quotes) a space;
/// an argument starting with `#` ends the line. This follows OpenSSH's `argv_split`.
pub(super) fn split_args(text: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut args = Vec::new();
    let mut i = 0;
    loop {
        while i < chars.len() && (chars[i] == ' ' || chars[i] == '\t') {
            i += 1;
        }
        if i >= chars.len() || chars[i] == '#' {
            return Ok(args);
        }
        let mut arg = String::new();
        let mut quote: Option<char> = None;
        while i < chars.len() {
            let c = chars[i];
            let next = chars.get(i + 1).copied();
            if c == '\\'
                && (matches!(next, Some('\'' | '"' | '\\'))
                    || (quote.is_none() && next == Some(' ')))
            {
                arg.push(next.unwrap_or('\\'));
                i += 2;
                continue;
            }
            match quote {
                None if c == ' ' || c == '\t' => break,
                None if c == '"' || c == '\'' => quote = Some(c),
                Some(open) if c == open => quote = None,
                _ => arg.push(c),
            }
            i += 1;
        }
        if quote.is_some() {
            return Err("unterminated quote".to_owned());
        }
        args.push(arg);
    }
}

/// Decodes the arguments of a keyword arcfleet uses. Returns `Ok(None)` for keywords it
/// does not use.
pub(super) fn decode(keyword: &str, raw: &str, args: &[String]) -> Result<Option<Value>, String> {
    let single_value = || single(keyword, args);
    let value = match keyword {
        "hostname" => Value::HostName(single_value()?),
        "user" => Value::User(single_value()?),
        "port" => Value::Port(parse_port(&single_value()?)?),
        "identityfile" | "identityfile2" => Value::IdentityFile(single_value()?),
        "certificatefile" => Value::CertificateFile(single_value()?),
        "identitiesonly" => Value::IdentitiesOnly(parse_flag(&single_value()?)?),
        "identityagent" => Value::IdentityAgent(single_value()?),
        "hostkeyalias" => Value::HostKeyAlias(single_value()?),
        "proxyjump" => Value::Proxy(parse_proxy_jump(&single_value()?)?),
        // ProxyCommand takes the rest of the line verbatim, as OpenSSH hands it to a shell.
        "proxycommand" if raw.trim() == "none" => Value::Proxy(Proxy::None),
        "proxycommand" => Value::Proxy(Proxy::Command(raw.trim().to_owned())),
        "userknownhostsfile" => Value::UserKnownHostsFile(args.to_vec()),
        "globalknownhostsfile" => Value::GlobalKnownHostsFile(args.to_vec()),
        "stricthostkeychecking" => Value::StrictHostKeyChecking(parse_strict(&single_value()?)?),
        "hashknownhosts" => Value::HashKnownHosts(parse_flag(&single_value()?)?),
        "connecttimeout" => Value::ConnectTimeout(parse_time(&single_value()?)?),
        "serveraliveinterval" => Value::ServerAliveInterval(parse_time(&single_value()?)?),
        "serveralivecountmax" => Value::ServerAliveCountMax(
            single_value()?
                .parse()
                .map_err(|_| "expected a whole number of keepalive requests".to_owned())?,
        ),
        "pubkeyauthentication" => Value::PubkeyAuthentication(parse_flag(&single_value()?)?),
        "knownhostscommand" => unsupported(
            keyword,
            "arcfleet cannot run a KnownHostsCommand: list the host keys in a known_hosts file",
        ),
        "revokedhostkeys" => unsupported(
            keyword,
            "arcfleet does not read key revocation lists: list revoked keys with @revoked in \
             known_hosts",
        ),
        "canonicalizehostname"
            if !matches!(
                single_value()?.to_ascii_lowercase().as_str(),
                "no" | "false"
            ) =>
        {
            unsupported(keyword, "arcfleet does not canonicalize host names")
        }
        _ => return Ok(None),
    };
    Ok(Some(value))
}

fn unsupported(keyword: &str, reason: &str) -> Value {
    Value::Unsupported {
        keyword: keyword.to_owned(),
        reason: reason.to_owned(),
    }
}

fn single(keyword: &str, args: &[String]) -> Result<String, String> {
    match args {
        [value] => Ok(value.clone()),
        [] => Err(format!("`{keyword}` needs a value")),
        [_, extra, ..] => Err(format!(
            "`{keyword}` takes one value; remove `{extra}` and what follows"
        )),
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!(
            "invalid port `{text}`: expected a number from 1 to 65535"
        )),
    }
}

fn parse_flag(text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "yes" | "true" => Ok(true),
        "no" | "false" => Ok(false),
        _ => Err(format!("invalid value `{text}`: expected yes or no")),
    }
}

fn parse_strict(text: &str) -> Result<StrictHostKeyChecking, String> {
    match text.to_ascii_lowercase().as_str() {
        "yes" | "true" => Ok(StrictHostKeyChecking::Yes),
        "ask" => Ok(StrictHostKeyChecking::Ask),
        "accept-new" => Ok(StrictHostKeyChecking::AcceptNew),
        "no" | "false" | "off" => Ok(StrictHostKeyChecking::No),
        _ => Err(format!(
            "invalid value `{text}`: expected yes, accept-new, ask, no or off"
        )),
    }
}

/// Parses an OpenSSH time value (sshd_config(5) TIME FORMATS): a number of seconds, or a
/// sequence of numbers with the units s, m, h, d or w, such as `1h30m`.
fn parse_time(text: &str) -> Result<Duration, String> {
    let invalid =
        || format!("invalid time `{text}`: expected seconds or a value like 30s, 5m or 1h30m");
    if text.is_empty() {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c.to_ascii_lowercase() {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return Err(invalid()),
        };
        let number: u64 = digits.parse().map_err(|_| invalid())?;
        total = total.saturating_add(number.saturating_mul(unit));
        digits.clear();
    }
    if !digits.is_empty() {
        let number: u64 = digits.parse().map_err(|_| invalid())?;
        total = total.saturating_add(number);
    }
    Ok(Duration::from_secs(total))
}

/// Parses a ProxyJump value: `none`, or comma-separated hops `[user@]host[:port]` or
/// `ssh://[user@]host[:port]`, with IPv6 addresses in brackets.
pub fn parse_proxy_jump(text: &str) -> Result<Proxy, String> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(Proxy::None);
    }
    let hops = text
        .split(',')
        .map(parse_jump_host)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Proxy::Jump(hops))
}

fn parse_jump_host(text: &str) -> Result<JumpHost, String> {
    let spec = text.trim();
    let invalid = |why: &str| format!("invalid ProxyJump host `{spec}`: {why}");
    let rest = spec.strip_prefix("ssh://").unwrap_or(spec);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (user, address) = match rest.rsplit_once('@') {
        Some((user, address)) if !user.is_empty() => (Some(user.to_owned()), address),
        Some(_) => return Err(invalid("the user before `@` is empty")),
        None => (None, rest),
    };
    let (host, port) = if let Some(bracketed) = address.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| invalid("`[` without a closing `]`"))?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Err(invalid("unexpected text after `]`")),
        }
    } else {
        match address.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (address, None),
        }
    };
    if host.is_empty() {
        return Err(invalid("the host name is empty"));
    }
    if host.starts_with('-') || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(invalid("expected a host name or address"));
    }
    let port = port.map(parse_port).transpose().map_err(|m| invalid(&m))?;
    Ok(JumpHost {
        user,
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyword_separators() {
        assert_eq!(split_keyword("  Port 22"), Some(("port".into(), "22")));
        assert_eq!(split_keyword("Port=22"), Some(("port".into(), "22")));
        assert_eq!(split_keyword("Port = 22"), Some(("port".into(), "22")));
        assert_eq!(split_keyword("# comment"), None);
        assert_eq!(split_keyword("   "), None);
    }

    #[test]
    fn arguments_follow_openssh_quoting() {
        assert_eq!(split_args("a b\tc").unwrap(), ["a", "b", "c"]);
        assert_eq!(split_args("\"a b\" c").unwrap(), ["a b", "c"]);
        assert_eq!(split_args("x'y z'w").unwrap(), ["xy zw"]);
        assert_eq!(split_args("a\\ b").unwrap(), ["a b"]);
        assert_eq!(split_args("a # comment").unwrap(), ["a"]);
        assert_eq!(
            split_args("a#b").unwrap(),
            ["a#b"],
            "# inside a word is literal"
        );
        assert!(split_args("\"open").is_err());
    }

    #[test]
    fn time_values() {
        assert_eq!(parse_time("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_time("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_time("10S").unwrap(), Duration::from_secs(10));
        assert!(parse_time("10x").is_err());
        assert!(parse_time("").is_err());
    }

    #[test]
    fn proxy_jump_forms() {
        let Proxy::Jump(hops) =
            parse_proxy_jump("ops@bastion:2222,ssh://[fd00::1]:22,inner").unwrap()
        else {
            panic!("expected hops");
        };
        assert_eq!(
            hops,
            [
                JumpHost {
                    user: Some("ops".into()),
                    host: "bastion".into(),
                    port: Some(2222)
                },
                JumpHost {
                    user: None,
                    host: "fd00::1".into(),
                    port: Some(22)
                },
                JumpHost {
                    user: None,
                    host: "inner".into(),
                    port: None
                },
            ]
        );
        assert_eq!(parse_proxy_jump("none").unwrap(), Proxy::None);
        assert!(parse_proxy_jump("bastion:99999").is_err());
        assert!(parse_proxy_jump("@bastion").is_err());
        assert!(parse_proxy_jump("a,,b").is_err());
        assert!(parse_proxy_jump("-oProxyCommand=x").is_err());
    }
}
