//! Passwords and passphrases read from a file or an environment variable, never from the
//! command line, where every user of the machine could read them in the process list.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A password or passphrase. `Debug` and `Display` print a placeholder, so a secret cannot
/// reach a log line or an error message by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// Returns the value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The source of a secret, named in messages.
#[derive(Debug, Clone)]
pub enum SecretSource {
    /// A file, read whole; one trailing newline is dropped.
    File(std::path::PathBuf),
    /// An environment variable.
    Env(String),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(path) => write!(f, "file {}", path.display()),
            SecretSource::Env(name) => write!(f, "environment variable {name}"),
        }
    }
}

impl SecretSource {
    /// Returns the source given by a file option or an environment-variable option, if any.
    pub fn from_options(file: Option<&Path>, env: Option<&str>) -> Option<SecretSource> {
        match (file, env) {
            (Some(path), _) => Some(SecretSource::File(path.to_owned())),
            (None, Some(name)) => Some(SecretSource::Env(name.to_owned())),
            (None, None) => None,
        }
    }

    /// Reads the secret. Returns it with a warning when the file is readable by other users.
    pub fn read(&self) -> Result<(Secret, Option<String>), String> {
        let (value, warning) = match self {
            SecretSource::File(path) => {
                let value = std::fs::read_to_string(path)
                    .map_err(|error| format!("cannot read {self}: {error}"))?;
                let mode = std::fs::metadata(path)
                    .map(|m| m.permissions().mode())
                    .unwrap_or(0);
                let warning = (mode & 0o077 != 0).then(|| {
                    format!(
                        "{self} is readable by other users (mode {:o}): restrict it with chmod 600",
                        mode & 0o777
                    )
                });
                (value, warning)
            }
            SecretSource::Env(name) => {
                let value = std::env::var(name)
                    .map_err(|_| format!("{self} is not set or not valid UTF-8"))?;
                (value, None)
            }
        };
        let value = value
            .strip_suffix("\r\n")
            .or_else(|| value.strip_suffix('\n'))
            .unwrap_or(&value);
        if value.is_empty() {
            return Err(format!("{self} is empty"));
        }
        Ok((Secret::new(value), warning))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let secret = Secret::new("hunter2");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert!(!format!("{secret}").contains("hunter2"));
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn file_secret_trims_newline_and_warns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pass");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (secret, warning) = SecretSource::File(path.clone()).read().unwrap();
        assert_eq!(secret.expose(), "s3cret");
        assert!(warning.unwrap().contains("chmod 600"));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (_, warning) = SecretSource::File(path).read().unwrap();
        assert!(warning.is_none());
    }

    #[test]
    fn empty_and_missing_sources_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, "\n").unwrap();
        assert!(SecretSource::File(path)
            .read()
            .unwrap_err()
            .contains("is empty"));
        let error = SecretSource::Env("ARCFLEET_TEST_SURELY_UNSET".into())
            .read()
            .unwrap_err();
        assert!(error.contains("ARCFLEET_TEST_SURELY_UNSET"), "{error}");
    }
}
