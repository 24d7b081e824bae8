//! Per-device transcripts: every command arcfleet ran on a device and what it printed,
//! with secrets redacted before anything is stored.

use std::fmt::Write;
use std::sync::OnceLock;
use std::time::Duration;

use regex::Regex;
use serde::Serialize;

/// One command and its result.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// The command line as sent, redacted.
    pub command: String,
    /// Standard output, redacted.
    pub stdout: String,
    /// Standard error, redacted.
    pub stderr: String,
    /// Exit status, or the error that ended the command.
    pub status: String,
    /// Time the command took.
    pub duration: Duration,
}

/// Replaces secrets in `text`: JSON Web Tokens (service-account and Azure tokens) and
/// `password=`, `secret=` or `token=` style assignments.
pub fn redact(text: &str) -> String {
    static JWT: OnceLock<Option<Regex>> = OnceLock::new();
    static ASSIGNMENT: OnceLock<Option<Regex>> = OnceLock::new();
    let jwt = JWT.get_or_init(|| {
        Regex::new(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*").ok()
    });
    let assignment = ASSIGNMENT.get_or_init(|| {
        Regex::new(r#"(?i)((?:password|passwd|secret|client_secret|token|assertion)["']?\s*[:=]\s*["']?)[^\s"'&,]+"#).ok()
    });
    let mut text = text.to_owned();
    if let Some(jwt) = jwt {
        text = jwt.replace_all(&text, "<redacted token>").into_owned();
    }
    if let Some(assignment) = assignment {
        text = assignment.replace_all(&text, "${1}<redacted>").into_owned();
    }
    text
}

/// Replaces file contents in probe output (`@@file PATH BASE64` lines) with their size
/// and SHA-256. K3s config and environment files can hold the cluster join token
/// (`token:`, `K3S_TOKEN`), and base64 would hide it from [`redact`].
pub fn summarise_file_payloads(stdout: &str) -> String {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use sha2::{Digest, Sha256};
    stdout
        .lines()
        .map(|line| match line.strip_prefix("@@file ") {
            Some(rest) => {
                let (path, data) = rest.rsplit_once(' ').unwrap_or((rest, ""));
                let bytes = STANDARD.decode(data.trim()).unwrap_or_default();
                let digest: String = Sha256::digest(&bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!(
                    "@@file {path} <{} bytes, sha256 {digest}, content not recorded>",
                    bytes.len()
                )
            }
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Renders a device's transcript as text.
pub fn render(device: &str, host: &str, entries: &[Entry]) -> String {
    let mut text = format!("# arcfleet transcript for {device} ({host})\n");
    for entry in entries {
        let _ = writeln!(text, "\n$ {}", entry.command);
        if !entry.stdout.is_empty() {
            let _ = writeln!(text, "--- stdout\n{}", entry.stdout.trim_end());
        }
        if !entry.stderr.is_empty() {
            let _ = writeln!(text, "--- stderr\n{}", entry.stderr.trim_end());
        }
        let _ = writeln!(
            text,
            "--- {} in {} ms",
            entry.status,
            entry.duration.as_millis()
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_passwords_are_redacted() {
        let jwt = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJpc3MiOiJodHRwczovL2EvIn0.c2lnbmF0dXJl";
        let text = format!("token: {jwt}\nPASSWORD=hunter2 client_secret=\"s3cr3t\" ok=1");
        let redacted = redact(&text);
        assert!(!redacted.contains(jwt), "{redacted}");
        assert!(!redacted.contains("hunter2"), "{redacted}");
        assert!(!redacted.contains("s3cr3t"), "{redacted}");
        assert!(redacted.contains("ok=1"), "{redacted}");
    }

    #[test]
    fn file_payloads_are_not_recorded() {
        let payload = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "token: K10secret\n",
        );
        let summary = summarise_file_payloads(&format!(
            "@@uid 0\n@@file /etc/rancher/k3s/config.yaml {payload}"
        ));
        assert!(!summary.contains(&payload), "{summary}");
        assert!(
            summary.contains("@@file /etc/rancher/k3s/config.yaml <17 bytes"),
            "{summary}"
        );
        assert!(summary.starts_with("@@uid 0\n"), "{summary}");
    }

    #[test]
    fn ordinary_output_is_kept() {
        let text = "@@active k3s active\nhttps://eastus.oic.prod-arc.azure.com/t/u/";
        assert_eq!(redact(text), text);
    }
}
