//! The K3s systemd unit as `systemctl cat` prints it: the unit file and its drop-ins, each
//! after a `# /path` header line.
//!
//! From it arcfleet takes the `ExecStart` command line, whose flags K3s applies after the
//! config files, and the `EnvironmentFile` list, which can move the config file through
//! `K3S_CONFIG_FILE`.

use super::Origin;

/// What the unit contributes to K3s's configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unit {
    /// Arguments of the effective `ExecStart`, the program included, each with its origin.
    pub exec_start: Vec<(String, Origin)>,
    /// `EnvironmentFile` paths, with whether a missing file is tolerated (`-` prefix).
    pub environment_files: Vec<(String, bool)>,
    /// Inline `Environment=` assignments.
    pub environment: Vec<(String, String)>,
}

impl Unit {
    /// Returns the `k3s` subcommand (`server` or `agent`), if ExecStart runs one.
    pub fn subcommand(&self) -> Option<&str> {
        self.exec_start
            .iter()
            .skip(1)
            .map(|(arg, _)| arg.as_str())
            .find(|arg| !arg.starts_with('-'))
    }

    /// Returns the flags after the subcommand.
    pub fn flags(&self) -> Vec<(String, Origin)> {
        let mut args = self.exec_start.iter().skip(1);
        let mut flags = Vec::new();
        for (arg, _) in args.by_ref() {
            if !arg.starts_with('-') {
                break;
            }
        }
        flags.extend(args.cloned());
        flags
    }
}

/// Parses `systemctl cat UNIT` output.
pub fn parse_systemctl_cat(text: &str, unit_name: &str) -> Unit {
    let mut unit = Unit::default();
    let mut file = String::from("(unit)");
    let mut section = String::new();
    let mut lines = text.lines().enumerate().peekable();
    let mut line_in_file = 0usize;

    while let Some((_, raw)) = lines.next() {
        line_in_file += 1;
        if let Some(path) = raw.strip_prefix("# /") {
            file = format!("/{}", path.trim());
            line_in_file = 0;
            section.clear();
            continue;
        }
        let start_line = line_in_file;
        let mut logical = raw.trim_end().to_owned();
        while logical.ends_with('\\') {
            logical.pop();
            match lines.next() {
                Some((_, next)) => {
                    line_in_file += 1;
                    logical.push(' ');
                    logical.push_str(next.trim());
                }
                None => break,
            }
        }
        let line = logical.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            section = line.to_owned();
            continue;
        }
        if section != "[Service]" {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let origin = Origin::new(&file, start_line);
        let value = value.trim().replace("%N", unit_name);
        match key.trim() {
            // An empty ExecStart= resets the list, which is how drop-ins replace it.
            "ExecStart" if value.is_empty() => unit.exec_start.clear(),
            "ExecStart" => {
                let command = value.trim_start_matches(['-', '@', ':', '+', '!']);
                unit.exec_start = split_command(command)
                    .into_iter()
                    .map(|arg| (arg, origin.clone()))
                    .collect();
            }
            "EnvironmentFile" if value.is_empty() => unit.environment_files.clear(),
            "EnvironmentFile" => {
                let optional = value.starts_with('-');
                let path = value.trim_start_matches('-').to_owned();
                unit.environment_files.push((path, optional));
            }
            "Environment" => {
                for assignment in split_command(&value) {
                    if let Some((name, value)) = assignment.split_once('=') {
                        unit.environment.push((name.to_owned(), value.to_owned()));
                    }
                }
            }
            _ => {}
        }
    }
    unit
}

/// Splits a systemd command line into words, honouring single and double quotes and
/// backslash escapes.
fn split_command(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), '\\') | (None, '\\') => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
                in_word = true;
            }
            (Some(_), c) => current.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            (None, c) => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(current);
    }
    words
}

/// Parses an environment file the way systemd reads `EnvironmentFile=`: `KEY=VALUE` lines,
/// optional `export`, quotes removed, `#` comments.
pub fn parse_environment_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#') && !line.starts_with(';'))
        .filter_map(|line| {
            let line = line.strip_prefix("export ").unwrap_or(line);
            let (key, value) = line.split_once('=')?;
            let value = value.trim();
            let unquoted = split_command(value).join(" ");
            Some((key.trim().to_owned(), unquoted))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSTALLER_UNIT: &str = "# /etc/systemd/system/k3s.service\n\
[Unit]\n\
Description=Lightweight Kubernetes\n\
\n\
[Service]\n\
Type=notify\n\
EnvironmentFile=-/etc/default/%N\n\
EnvironmentFile=-/etc/sysconfig/%N\n\
EnvironmentFile=-/etc/systemd/system/k3s.service.env\n\
ExecStart=/usr/local/bin/k3s \\\n\
    server \\\n\
\t'--kube-apiserver-arg=service-account-issuer=https://x.example/' \\\n\
\t'--cluster-init' \\\n";

    #[test]
    fn installer_unit_parses() {
        let unit = parse_systemctl_cat(INSTALLER_UNIT, "k3s");
        assert_eq!(unit.subcommand(), Some("server"));
        let flags: Vec<String> = unit.flags().into_iter().map(|(arg, _)| arg).collect();
        assert_eq!(
            flags,
            vec![
                "--kube-apiserver-arg=service-account-issuer=https://x.example/",
                "--cluster-init"
            ]
        );
        assert_eq!(
            unit.exec_start[0].1.to_string(),
            "/etc/systemd/system/k3s.service:9"
        );
        assert_eq!(
            unit.environment_files[0],
            ("/etc/default/k3s".to_owned(), true)
        );
    }

    #[test]
    fn drop_in_replaces_exec_start() {
        let text = format!(
            "{INSTALLER_UNIT}\n# /etc/systemd/system/k3s.service.d/override.conf\n[Service]\n\
             ExecStart=\nExecStart=/usr/local/bin/k3s server --config /opt/k3s.yaml\n"
        );
        let unit = parse_systemctl_cat(&text, "k3s");
        let flags: Vec<String> = unit.flags().into_iter().map(|(arg, _)| arg).collect();
        assert_eq!(flags, vec!["--config", "/opt/k3s.yaml"]);
        assert_eq!(
            unit.exec_start[0].1.to_string(),
            "/etc/systemd/system/k3s.service.d/override.conf:3"
        );
    }

    #[test]
    fn environment_file_strips_quotes() {
        let vars =
            parse_environment_file("# c\nK3S_CONFIG_FILE=\"/opt/k3s/config.yaml\"\nexport A=b\n");
        assert_eq!(
            vars,
            vec![
                (
                    "K3S_CONFIG_FILE".to_owned(),
                    "/opt/k3s/config.yaml".to_owned()
                ),
                ("A".to_owned(), "b".to_owned())
            ]
        );
    }

    #[test]
    fn split_command_honours_quotes() {
        assert_eq!(
            split_command(r#"a 'b c' "d\"e" f\ g"#),
            vec!["a", "b c", "d\"e", "f g"]
        );
    }
}
