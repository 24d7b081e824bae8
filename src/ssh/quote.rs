//! POSIX shell quoting for every value that reaches a remote command line.

/// Quotes `value` as one POSIX shell word.
///
/// The value goes inside single quotes, where the shell interprets nothing; each single
/// quote in it becomes `'\''` (close, escaped quote, reopen). Words made only of
/// characters the shell never treats specially are returned as they are, which keeps
/// transcripts readable.
pub fn quote(value: &str) -> String {
    let safe = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b));
    if safe {
        return value.to_owned();
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(c);
        }
    }
    quoted.push('\'');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_words_stay_bare() {
        assert_eq!(
            quote("/etc/rancher/k3s/config.yaml"),
            "/etc/rancher/k3s/config.yaml"
        );
        assert_eq!(quote("https://a.example/x/"), "https://a.example/x/");
    }

    #[test]
    fn special_characters_are_quoted() {
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("$(rm -rf /)"), "'$(rm -rf /)'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote("a\nb"), "'a\nb'");
    }

    #[test]
    fn quoted_words_survive_a_real_shell() {
        for value in [
            "it's",
            "$HOME `id` \"x\"",
            "a\\b",
            "*",
            "-n",
            "line1\nline2",
            "é ü",
        ] {
            let output = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", quote(value)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(output.stdout).unwrap(), value);
        }
    }
}
