//! Expansion of `~`, `${VAR}` and `%` tokens in ssh_config paths (ssh_config(5) TOKENS and
//! ENVIRONMENT VARIABLES), as OpenSSH applies them to IdentityFile, CertificateFile,
//! IdentityAgent and UserKnownHostsFile.

use std::path::PathBuf;

/// The values the tokens stand for.
#[derive(Debug, Clone)]
pub struct TokenValues {
    /// `%d` and `~`: the local home directory.
    pub home: String,
    /// `%u`: the local user name.
    pub local_user: String,
    /// `%l`: the local host name.
    pub local_host: String,
    /// `%i`: the local user id.
    pub uid: String,
    /// `%n`: the host as given (inventory host or jump host).
    pub original_host: String,
    /// `%h`: the host name connected to, after HostName.
    pub host: String,
    /// `%p`: the port.
    pub port: u16,
    /// `%r`: the remote login user.
    pub remote_user: String,
}

impl TokenValues {
    /// Reads the local values from the environment and `/proc`; the remote ones start
    /// empty.
    pub fn local() -> TokenValues {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let local_host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|ids| ids.split_whitespace().next().map(str::to_owned))
            })
            .unwrap_or_default();
        TokenValues {
            home: env("HOME").unwrap_or_else(|| "/".to_owned()),
            local_user: env("USER")
                .or_else(|| env("LOGNAME"))
                .unwrap_or_else(|| "root".to_owned()),
            local_host,
            uid,
            original_host: String::new(),
            host: String::new(),
            port: 22,
            remote_user: String::new(),
        }
    }
}

/// Expands a path: a leading `~/` (or `~` alone), `${VAR}` and the `%` tokens `%%`, `%d`,
/// `%h`, `%i`, `%l`, `%n`, `%p`, `%r` and `%u`. Other tokens and unset variables are
/// errors, as in OpenSSH.
pub fn expand_path(raw: &str, values: &TokenValues) -> Result<PathBuf, String> {
    let with_home = if raw == "~" {
        values.home.clone()
    } else if let Some(rest) = raw.strip_prefix("~/") {
        format!("{}/{rest}", values.home.trim_end_matches('/'))
    } else if raw.starts_with('~') {
        return Err(format!(
            "`{raw}`: `~user` paths are not supported; write the full path"
        ));
    } else {
        raw.to_owned()
    };
    let with_env = expand_env(&with_home)?;
    expand_percent(&with_env, values).map(PathBuf::from)
}

fn expand_env(text: &str) -> Result<String, String> {
    let mut expanded = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        expanded.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("`{text}`: `${{` without a closing `}}`"))?;
        let name = &after[..end];
        let value = std::env::var(name)
            .map_err(|_| format!("`{text}`: environment variable `{name}` is not set"))?;
        expanded.push_str(&value);
        rest = &after[end + 1..];
    }
    expanded.push_str(rest);
    Ok(expanded)
}

fn expand_percent(text: &str, values: &TokenValues) -> Result<String, String> {
    let mut expanded = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            expanded.push(c);
            continue;
        }
        let token = chars
            .next()
            .ok_or_else(|| format!("`{text}`: `%` at the end of the value"))?;
        match token {
            '%' => expanded.push('%'),
            'd' => expanded.push_str(&values.home),
            'h' => expanded.push_str(&values.host),
            'i' => expanded.push_str(&values.uid),
            'l' => expanded.push_str(&values.local_host),
            'n' => expanded.push_str(&values.original_host),
            'p' => expanded.push_str(&values.port.to_string()),
            'r' => expanded.push_str(&values.remote_user),
            'u' => expanded.push_str(&values.local_user),
            other => {
                return Err(format!(
                    "`{text}`: unsupported token `%{other}`; arcfleet expands %%, %d, %h, %i, \
                     %l, %n, %p, %r and %u"
                ))
            }
        }
    }
    Ok(expanded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> TokenValues {
        TokenValues {
            home: "/home/ops".into(),
            local_user: "ops".into(),
            local_host: "controller".into(),
            uid: "1000".into(),
            original_host: "edge-01".into(),
            host: "10.20.1.11".into(),
            port: 2222,
            remote_user: "root".into(),
        }
    }

    #[test]
    fn tilde_and_tokens_expand() {
        let path = expand_path("~/.ssh/%n_%r@%h:%p", &values()).unwrap();
        assert_eq!(
            path,
            PathBuf::from("/home/ops/.ssh/edge-01_root@10.20.1.11:2222")
        );
        assert_eq!(
            expand_path("%d/%u/%l/%i/100%%", &values()).unwrap(),
            PathBuf::from("/home/ops/ops/controller/1000/100%")
        );
    }

    #[test]
    fn environment_variables_expand() {
        let path = expand_path("${HOME}/k", &values()).unwrap();
        assert!(!path.to_string_lossy().contains('$'), "{path:?}");
        let error = expand_path("${ARCFLEET_TEST_SURELY_UNSET}/k", &values()).unwrap_err();
        assert!(error.contains("is not set"), "{error}");
    }

    #[test]
    fn unknown_token_is_an_error() {
        let error = expand_path("~/.ssh/%C", &values()).unwrap_err();
        assert!(error.contains("`%C`"), "{error}");
        assert!(expand_path("~root/.ssh/id", &values()).is_err());
    }
}
