//! The shell scripts arcfleet runs on a node, and parsers for what they print.
//!
//! Scripts use only POSIX sh, coreutils, systemctl, journalctl and `k3s kubectl`, since
//! edge nodes often have nothing else. Every value that reaches a script passes through
//! [`quote`]. File contents travel as base64 so that no byte of them is interpreted.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::secret::Secret;
use crate::ssh::quote::quote;

/// Directory on the node where arcfleet keeps the previous version of its drop-in.
pub const BACKUP_DIR: &str = "/var/lib/arcfleet/backup";

/// Succeeds when sudo needs no password for the login user.
pub const SUDO_WITHOUT_PASSWORD: &str = "sudo -n true";

/// The privilege scripts run with on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Privilege {
    /// The login user is root.
    Root,
    /// `sudo -n`: sudo without a password.
    Sudo,
    /// `sudo -S` with this password on the first line of stdin.
    SudoPassword(Secret),
}

/// Wraps a script so that it runs under `sh` as root.
///
/// With a password, `sudo -k -S -p ''` reads it from the first line of stdin without a
/// prompt. `-k` makes sudo ask every time the policy wants a password, even within sudo's
/// credential cache timeout, so sudo consumes the line. Where the policy lets `sh` run
/// without a password after all, the line stays on the script's stdin, and arcfleet's
/// scripts never read stdin. The password is never part of the command line, which other
/// users of the node could read in the process list.
pub fn wrap(script: &str, privilege: &Privilege) -> String {
    match privilege {
        Privilege::Root => format!("sh -c {}", quote(script)),
        Privilege::Sudo => format!("sudo -n sh -c {}", quote(script)),
        Privilege::SudoPassword(_) => format!("sudo -k -S -p '' sh -c {}", quote(script)),
    }
}

/// The service account and audience of the token a probe or proof mints.
#[derive(Debug, Clone, Copy)]
pub struct TokenRequest<'a> {
    /// Namespace of the service account.
    pub namespace: &'a str,
    /// Name of the service account.
    pub service_account: &'a str,
    /// Audience of the token.
    pub audience: &'a str,
}

impl<'a> From<&'a crate::playbook::VerifyToken> for TokenRequest<'a> {
    fn from(step: &'a crate::playbook::VerifyToken) -> Self {
        TokenRequest {
            namespace: &step.namespace,
            service_account: &step.service_account,
            audience: &step.audience,
        }
    }
}

/// Shell function `mint NS SA AUD`: mints a ten-minute token and prints
/// `@@claims NS/SA HEADER.PAYLOAD`, cutting the signature off on the node, so the token
/// itself never leaves the node and could not be used by anyone who reads the output.
/// On failure prints `@@token-error NS/SA BASE64-STDERR` and returns 2 when the service
/// account does not exist, 1 otherwise.
const MINT_FUNCTION: &str = r#"mint() {
  e=$(mktemp) || return 1
  if t=$(k3s kubectl create token "$2" -n "$1" --audience "$3" --duration 10m 2>"$e"); then
    printf '@@claims %s/%s %s\n' "$1" "$2" "$(printf '%s' "$t" | cut -d. -f1,2)"
    rm -f "$e"
    return 0
  fi
  printf '@@token-error %s/%s %s\n' "$1" "$2" "$(b64 < "$e")"
  if grep -q 'not found' "$e"; then rm -f "$e"; return 2; fi
  rm -f "$e"
  return 1
}
"#;

/// Mints a token for `token`'s service account, or for default/default when that
/// account does not exist; sets `minted=1` on success.
fn mint_call(token: TokenRequest<'_>) -> String {
    let audience = quote(token.audience);
    format!(
        "minted=\nif mint {} {} {audience}; then minted=1\n\
         elif [ $? = 2 ] && mint default default {audience}; then minted=1; fi\n",
        quote(token.namespace),
        quote(token.service_account),
    )
}

/// Status probe, in one round trip: user id, the K3s server unit, `files` and the regular
/// files of `dirs`, and the issuer the running API server signs with. The agent unit is
/// read only when there is no server unit, to tell an agent apart from a node without
/// K3s. A node with both units is probed as a server.
///
/// With a `token` request the probe mints a token (see [`mint_claims`]), whose issuer is
/// the one the API server signs with, and reads the OIDC discovery document only when
/// minting fails. A compliant node thus costs one K3s command.
pub fn status_probe(files: &[String], dirs: &[String], token: Option<TokenRequest<'_>>) -> String {
    let mut script = String::from("b64() { base64 | tr -d '\\n'; }\n");
    script.push_str(&unit_text_function(""));
    script.push_str(
        r#"printf '@@uid %s\n' "$(id -u)"
if text=$(unit_text); then
  printf '@@unit k3s %s\n' "$(printf '%s\n' "$text" | b64)"
elif text=$(systemctl cat k3s-agent.service 2>/dev/null); then
  printf '@@unit k3s-agent %s\n' "$(printf '%s\n' "$text" | b64)"
fi
"#,
    );
    script.push_str(&emit_files(files, dirs));
    script.push_str("minted=\nif command -v k3s >/dev/null 2>&1; then\n");
    if let Some(token) = token {
        script.push_str(MINT_FUNCTION);
        script.push_str(&mint_call(token));
    }
    script.push_str(
        r#"  if [ -z "$minted" ]; then
    if out=$(k3s kubectl get --raw /.well-known/openid-configuration 2>&1); then
      printf '@@oidc %s\n' "$(printf '%s' "$out" | b64)"
    else
      printf '@@oidc-error %s\n' "$(printf '%s' "$out" | b64)"
    fi
  fi
fi
true
"#,
    );
    script
}

/// Directories of systemd's system unit load path other than `/etc/systemd/system`, in
/// priority order (systemd.unit(5), "Unit File Load Path"; `/lib/systemd/system` on
/// systems without a merged `/usr`).
const OTHER_UNIT_DIRS: [&str; 12] = [
    "/etc/systemd/system.control",
    "/run/systemd/system.control",
    "/run/systemd/transient",
    "/run/systemd/generator.early",
    "/etc/systemd/system.attached",
    "/run/systemd/system",
    "/run/systemd/system.attached",
    "/run/systemd/generator",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
    "/run/systemd/generator.late",
];

/// Shell function `unit_text`: prints the K3s server unit and its drop-ins as
/// `systemctl cat k3s.service` does. It reads the files itself when the unit is a regular
/// file in `/etc/systemd/system` (where the K3s installer writes it) and no other
/// load-path directory has the unit, a drop-in for it or a `service.d` drop-in. That costs
/// a node less than starting systemctl. Otherwise it runs `systemctl cat`. `root` prefixes every path,
/// for tests.
fn unit_text_function(root: &str) -> String {
    let others: Vec<String> = OTHER_UNIT_DIRS
        .iter()
        .map(|dir| quote(&format!("{root}{dir}")))
        .collect();
    format!(
        r#"unit_text() (
  LC_ALL=C
  etc={etc}
  u="$etc/k3s.service"
  direct=1
  if [ ! -f "$u" ] || [ -L "$u" ] || [ -e "$etc/service.d" ]; then direct=; fi
  for d in {others}; do
    for n in k3s.service k3s.service.d service.d; do
      if [ -e "$d/$n" ] || [ -L "$d/$n" ]; then direct=; fi
    done
  done
  for f in "$u.d"/*; do
    if [ -L "$f" ]; then direct=; fi
  done
  if [ -z "$direct" ]; then
    systemctl cat k3s.service 2>/dev/null
    return
  fi
  printf '# /etc/systemd/system/k3s.service\n'
  cat "$u"
  for f in "$u.d"/*.conf; do
    if [ -f "$f" ]; then printf '\n# /etc/systemd/system/k3s.service.d/%s\n' "${{f##*/}}"; cat "$f"; fi
  done
)
"#,
        etc = quote(&format!("{root}/etc/systemd/system")),
        others = others.join(" "),
    )
}

/// Mints a token and prints its claims as `mint` does, never the token itself.
pub fn mint_claims(token: TokenRequest<'_>) -> String {
    format!(
        "b64() {{ base64 | tr -d '\\n'; }}\n{MINT_FUNCTION}{}true\n",
        mint_call(token)
    )
}

/// A token minted on the node, as its header and claims without the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minted {
    /// `namespace/service-account` the token was minted for.
    pub account: String,
    /// `HEADER.PAYLOAD` of the token, base64url.
    pub claims: String,
}

/// Reads the outcome of `mint` from script output: the minted claims, the errors of the
/// attempts, or `None` when nothing was minted or tried (K3s missing).
pub fn minted(tagged: &Tagged) -> Option<Result<Minted, String>> {
    if let Some(value) = tagged.all("claims").last() {
        let (account, claims) = value.split_once(' ').unwrap_or(("", value));
        return Some(Ok(Minted {
            account: account.to_owned(),
            claims: claims.trim().to_owned(),
        }));
    }
    let errors: Vec<String> = tagged
        .all("token-error")
        .iter()
        .map(|value| {
            let (account, error) = value.split_once(' ').unwrap_or((value, ""));
            format!("{account}: {}", decode(error).trim())
        })
        .collect();
    (!errors.is_empty()).then(|| Err(errors.join("; ")))
}

/// Reads files and the regular files of directories, printing each as base64.
pub fn read_files(files: &[String], dirs: &[String]) -> String {
    let mut script = emit_files(files, dirs);
    script.push_str("true\n");
    script
}

/// Script lines that print `files` and the regular files of `dirs` as
/// `@@file PATH BASE64`.
fn emit_files(files: &[String], dirs: &[String]) -> String {
    let mut script = String::from(
        "emit() { printf '@@file %s ' \"$1\"; base64 < \"$1\" | tr -d '\\n'; echo; }\n",
    );
    for file in files {
        script.push_str(&format!("[ -f {0} ] && emit {0}\n", quote(file)));
    }
    for dir in dirs {
        script.push_str(&format!(
            "if [ -d {0} ]; then printf '@@dir %s\\n' {0}; for f in {0}/* {0}/.[!.]*; do \
             [ -f \"$f\" ] && emit \"$f\"; done; fi\n",
            quote(dir)
        ));
    }
    script
}

/// Lines of the form `@@tag rest` collected from a script's output.
#[derive(Debug, Default)]
pub struct Tagged {
    /// Each tag's values in order.
    pub values: BTreeMap<String, Vec<String>>,
}

impl Tagged {
    /// Parses script output.
    pub fn parse(text: &str) -> Tagged {
        let mut tagged = Tagged::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("@@") {
                let (tag, value) = rest.split_once(' ').unwrap_or((rest, ""));
                tagged
                    .values
                    .entry(tag.to_owned())
                    .or_default()
                    .push(value.to_owned());
            }
        }
        tagged
    }

    /// Returns the first value of a tag.
    pub fn first(&self, tag: &str) -> Option<&str> {
        self.values
            .get(tag)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    /// Returns every value of a tag.
    pub fn all(&self, tag: &str) -> &[String] {
        self.values.get(tag).map_or(&[], Vec::as_slice)
    }
}

/// Decodes base64 into text, replacing invalid UTF-8.
pub fn decode(text: &str) -> String {
    let bytes = STANDARD.decode(text.trim()).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Parses `@@file PATH BASE64` values into (path, content) pairs.
pub fn files(tagged: &Tagged) -> Vec<(String, String)> {
    tagged
        .all("file")
        .iter()
        .filter_map(|value| {
            let (path, data) = value.rsplit_once(' ').unwrap_or((value, ""));
            (!path.is_empty()).then(|| (path.to_owned(), decode(data)))
        })
        .collect()
}

/// Returns the SHA-256 of content as `sha256sum` prints it, or `absent` for no file.
pub fn content_hash(content: Option<&str>) -> String {
    use sha2::{Digest, Sha256};
    match content {
        None => "absent".to_owned(),
        Some(text) => Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    }
}

/// Prints the SHA-256 of a file as [`content_hash`] computes it, or `absent`.
pub fn file_hash(path: &str) -> String {
    format!(
        "f={}\nif [ -f \"$f\" ]; then sha256sum < \"$f\" | cut -d' ' -f1; else echo absent; fi\n",
        quote(path)
    )
}

/// Writes (or removes, when `content` is `None`) arcfleet's drop-in atomically, after
/// saving the current version. Fails with exit status 3, changing nothing, when the file
/// no longer has the content the probe saw.
pub fn apply_dropin(path: &str, expected_hash: &str, content: Option<&str>) -> String {
    let (dir, name) = path.rsplit_once('/').unwrap_or((".", path));
    let mut script = format!(
        "set -eu\numask 077\nf={f}\nd={d}\nb={b}\nprev=\"$b\"/{name}.prev\nabsent=\"$b\"/{name}.absent\n",
        f = quote(path),
        d = quote(dir),
        b = quote(BACKUP_DIR),
        name = quote(name),
    );
    script.push_str(&format!(
        r#"if [ -f "$f" ]; then cur=$(sha256sum < "$f" | cut -d' ' -f1); else cur=absent; fi
if [ -L "$f" ]; then echo "$f is a symbolic link; arcfleet replaces only a regular file it wrote" >&2; exit 5; fi
if [ "$cur" != {expected} ]; then echo "$f changed since it was read; run arcfleet again" >&2; exit 3; fi
mkdir -p "$b"
if [ -f "$f" ]; then
  cp -p "$f" "$prev.tmp"
  mv -f "$prev.tmp" "$prev"
  rm -f "$absent"
else
  rm -f "$prev"
  : > "$absent"
fi
"#,
        expected = quote(expected_hash)
    ));
    match content {
        Some(text) => script.push_str(&format!(
            r#"mkdir -p "$d"
tmp=$(mktemp "$d/.arcfleet.XXXXXX")
trap 'rm -f "$tmp"' EXIT
printf '%s' {data} | base64 -d > "$tmp"
if [ -f "$f" ]; then chown --reference="$f" "$tmp"; chmod --reference="$f" "$tmp"; else chmod 0600 "$tmp"; fi
mv -f "$tmp" "$f"
trap - EXIT
"#,
            data = quote(&STANDARD.encode(text))
        )),
        None => script.push_str("rm -f \"$f\"\n"),
    }
    script
}

/// Puts the saved version of arcfleet's drop-in back (or removes the drop-in when there
/// was none), atomically.
pub fn restore_dropin(path: &str) -> String {
    let (dir, name) = path.rsplit_once('/').unwrap_or((".", path));
    format!(
        r#"set -eu
f={f}; d={d}; prev={b}/{name}.prev; absent={b}/{name}.absent
if [ -f "$prev" ]; then
  tmp=$(mktemp "$d/.arcfleet.XXXXXX"); cp -p "$prev" "$tmp"; mv -f "$tmp" "$f"
elif [ -f "$absent" ]; then
  rm -f "$f"
else
  echo "no saved version of $f in {b}" >&2; exit 4
fi
"#,
        f = quote(path),
        d = quote(dir),
        b = quote(BACKUP_DIR),
        name = quote(name),
    )
}

/// Prints the node clock and what identifies the running K3s process (state, main PID,
/// start time), so that after a dropped connection arcfleet can tell whether a restart
/// happened.
pub fn unit_marker() -> String {
    r#"printf '@@since %s\n' "$(date +%s)"
props=$(systemctl show -p ActiveState,SubState,ExecMainPID,ExecMainStartTimestamp k3s.service 2>/dev/null | tr '\n' ' ')
printf '@@unit %s\n' "$props"
"#
    .to_owned()
}

/// Restarts K3s, bounded by `timeout` seconds even when `systemctl restart` blocks, and
/// prints the node's clock before it starts (for reading the journal afterwards).
pub fn restart_k3s(timeout_seconds: u64) -> String {
    format!(
        "printf '@@since %s\\n' \"$(date +%s)\"\n\
         timeout -k 5 {timeout_seconds} systemctl restart k3s.service; rc=$?\n\
         printf '@@restart %s\\n' \"$rc\"\n"
    )
}

/// Checks whether K3s is active and which issuer the API server publishes.
pub fn health_check() -> String {
    r#"b64() { base64 | tr -d '\n'; }
printf '@@active k3s %s\n' "$(systemctl is-active k3s.service 2>/dev/null)"
if out=$(k3s kubectl get --raw /.well-known/openid-configuration 2>&1); then
  printf '@@oidc %s\n' "$(printf '%s' "$out" | b64)"
else
  printf '@@oidc-error %s\n' "$(printf '%s' "$out" | b64)"
fi
"#
    .to_owned()
}

/// Prints K3s's journal since a node clock time.
pub fn journal_since(since_epoch: &str) -> String {
    format!(
        "journalctl -u k3s.service --since {} --no-pager -o cat -n 40 2>&1 || true\n",
        quote(&format!("@{since_epoch}"))
    )
}

/// Restarts every deployment in the secret-sync namespace and waits for each rollout.
pub fn restart_secret_sync(namespace: &str, rollout_timeout_seconds: u64) -> String {
    format!(
        r#"set -u
ns={ns}
deps=$(k3s kubectl get deployments -n "$ns" -o name) || exit 1
if [ -z "$deps" ]; then echo '@@deployments none'; exit 0; fi
k3s kubectl rollout restart deployment -n "$ns" || exit 1
for d in $deps; do
  k3s kubectl rollout status "$d" -n "$ns" --timeout={timeout}s || exit 2
  printf '@@rolled-out %s\n' "$d"
done
"#,
        ns = quote(namespace),
        timeout = rollout_timeout_seconds
    )
}

/// Prints the node's name (`node_name`, else the host name, which K3s uses by default) and
/// the node list.
pub fn node_conditions(node_name: Option<&str>) -> String {
    let name = node_name.map_or_else(|| "\"$(hostname)\"".to_owned(), quote);
    format!("printf '@@node %s\\n' {name}\nk3s kubectl get nodes -o json\n")
}

/// Lists every SecretSync object as JSON.
pub fn list_secret_syncs() -> String {
    "k3s kubectl get secretsyncs.secret-sync.x-k8s.io -A -o json\n".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_quotes_the_script() {
        assert_eq!(
            wrap("echo 'a'", &Privilege::Root),
            "sh -c 'echo '\\''a'\\'''"
        );
        assert!(wrap("id", &Privilege::Sudo).starts_with("sudo -n sh -c "));
        let with_password = wrap("id", &Privilege::SudoPassword(Secret::new("pw-123")));
        assert!(
            with_password.starts_with("sudo -k -S -p '' sh -c "),
            "{with_password}"
        );
        assert!(
            !with_password.contains("pw-123"),
            "no password in the command"
        );
    }

    #[test]
    fn unit_marker_runs_in_a_real_shell() {
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(unit_marker())
            .output()
            .unwrap();
        let tagged = Tagged::parse(&String::from_utf8_lossy(&output.stdout));
        assert!(tagged
            .first("since")
            .is_some_and(|s| s.parse::<u64>().is_ok()));
        assert!(tagged.first("unit").is_some());
    }

    /// Writes each `(name, script)` of `stand_ins` as an executable in `bin`, runs `script`
    /// in `sh` with `bin` first on PATH, and returns its stdout.
    fn run_with_stand_ins(
        script: &str,
        bin: &std::path::Path,
        stand_ins: &[(&str, &str)],
    ) -> String {
        std::fs::create_dir_all(bin).unwrap();
        for (name, text) in stand_ins {
            let path = bin.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .output()
            .unwrap();
        String::from_utf8(output.stdout).unwrap()
    }

    /// Returns the lines a stand-in appended to `log`, one per call.
    fn calls_in(log: &std::path::Path) -> Vec<String> {
        let calls = std::fs::read_to_string(log).unwrap_or_default();
        calls.lines().map(str::to_owned).collect()
    }

    /// Runs the status probe in a real shell with `systemctl` and `k3s` stand-ins on PATH
    /// that serve the given units, and returns (stdout, the systemctl calls made).
    fn probe_with_units(units: &[&str]) -> (String, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls.log");
        let cases: String = units
            .iter()
            .map(|unit| format!("  'cat {unit}') echo '[Service]' ;;\n"))
            .collect();
        let systemctl = format!(
            "#!/bin/sh\necho \"$*\" >> {log}\ncase \"$*\" in\n{cases}  *) exit 1 ;;\nesac\n",
            log = log.display()
        );
        let k3s = "#!/bin/sh\necho '{\"issuer\":\"https://a/\"}'\n";
        let stdout = run_with_stand_ins(
            &status_probe(&[], &[], None),
            dir.path(),
            &[("systemctl", &systemctl), ("k3s", k3s)],
        );
        (stdout, calls_in(&log))
    }

    /// Runs `unit_text` under `root` with a `systemctl` on PATH that prints `fallback`.
    fn unit_text_under(root: &std::path::Path) -> String {
        let script = format!("{}unit_text\n", unit_text_function(root.to_str().unwrap()));
        let systemctl = "#!/bin/sh\necho fallback \"$*\"\n";
        run_with_stand_ins(&script, &root.join("bin"), &[("systemctl", systemctl)])
    }

    #[test]
    fn unit_is_read_directly_from_etc() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc/systemd/system");
        std::fs::create_dir_all(etc.join("k3s.service.d")).unwrap();
        std::fs::write(
            etc.join("k3s.service"),
            "[Service]\nExecStart=/usr/local/bin/k3s server\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("k3s.service.d/20-b.conf"),
            "[Service]\nExecStart=\nExecStart=/usr/local/bin/k3s server --node-name b",
        )
        .unwrap();
        std::fs::write(etc.join("k3s.service.d/10-a.conf"), "[Service]\n").unwrap();
        std::fs::write(etc.join("k3s.service.d/notes.txt"), "ignored\n").unwrap();

        let text = unit_text_under(root.path());
        assert_eq!(
            text,
            "# /etc/systemd/system/k3s.service\n[Service]\nExecStart=/usr/local/bin/k3s server\n\
             \n# /etc/systemd/system/k3s.service.d/10-a.conf\n[Service]\n\
             \n# /etc/systemd/system/k3s.service.d/20-b.conf\n[Service]\nExecStart=\n\
             ExecStart=/usr/local/bin/k3s server --node-name b"
        );
        let unit = crate::k3s::unit::parse_systemctl_cat(&text, "k3s");
        assert_eq!(unit.subcommand(), Some("server"));

        // A drop-in elsewhere on the load path is systemd's to merge.
        let vendor = root.path().join("usr/lib/systemd/system/k3s.service.d");
        std::fs::create_dir_all(&vendor).unwrap();
        assert_eq!(unit_text_under(root.path()), "fallback cat k3s.service\n");
    }

    #[test]
    fn unit_elsewhere_asks_systemctl() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(unit_text_under(root.path()), "fallback cat k3s.service\n");
        let vendor = root.path().join("lib/systemd/system");
        std::fs::create_dir_all(&vendor).unwrap();
        std::fs::write(vendor.join("k3s.service"), "[Service]\n").unwrap();
        assert_eq!(unit_text_under(root.path()), "fallback cat k3s.service\n");
    }

    /// Runs `script` in a real shell with a `k3s` stand-in on PATH that mints tokens only
    /// for the service accounts in `accounts` (`ns/sa`), and returns the tagged output and
    /// the `k3s` calls made.
    fn run_with_token_stand_in(script: &str, accounts: &[&str]) -> (String, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls.log");
        let known: String = accounts
            .iter()
            .map(|account| format!("  '{account}') ;;\n"))
            .collect();
        let k3s = format!(
            "#!/bin/sh\necho \"$*\" >> {log}\n\
             if [ \"$2\" = create ]; then\n\
             case \"$6/$4\" in\n{known}  *) echo \"serviceaccounts \\\"$4\\\" not found\" >&2; exit 1 ;;\nesac\n\
             echo 'eyJoZWFkZXIi.eyJwYXlsb2FkIg.c2lnbmF0dXJl'\nexit 0\nfi\n\
             echo '{{\"issuer\":\"https://a/\"}}'\n",
            log = log.display()
        );
        let stdout = run_with_stand_ins(script, dir.path(), &[("k3s", &k3s)]);
        (stdout, calls_in(&log))
    }

    const TOKEN: TokenRequest<'static> = TokenRequest {
        namespace: "azure-secret-store",
        service_account: "secret-sync-controller",
        audience: "api://AzureADTokenExchange",
    };

    #[test]
    fn probe_mints_instead_of_reading_discovery() {
        let script = status_probe(&[], &[], Some(TOKEN));
        let (stdout, calls) =
            run_with_token_stand_in(&script, &["azure-secret-store/secret-sync-controller"]);
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert!(calls[0].starts_with("kubectl create token secret-sync-controller"));
        assert!(
            !stdout.contains("c2lnbmF0dXJl"),
            "the signature stays on the node"
        );
        let tagged = Tagged::parse(&stdout);
        assert_eq!(
            minted(&tagged),
            Some(Ok(Minted {
                account: "azure-secret-store/secret-sync-controller".into(),
                claims: "eyJoZWFkZXIi.eyJwYXlsb2FkIg".into(),
            }))
        );
        assert!(tagged.first("oidc").is_none());
    }

    #[test]
    fn missing_service_account_falls_back_to_default() {
        let (stdout, calls) = run_with_token_stand_in(&mint_claims(TOKEN), &["default/default"]);
        assert_eq!(calls.len(), 2, "{calls:?}");
        let minted = minted(&Tagged::parse(&stdout)).unwrap().unwrap();
        assert_eq!(minted.account, "default/default");
    }

    #[test]
    fn failed_mint_reads_discovery_and_reports_why() {
        let script = status_probe(&[], &[], Some(TOKEN));
        let (stdout, calls) = run_with_token_stand_in(&script, &[]);
        assert_eq!(calls.len(), 3, "two mints, then discovery: {calls:?}");
        let tagged = Tagged::parse(&stdout);
        let error = minted(&tagged).unwrap().unwrap_err();
        assert!(
            error.contains("azure-secret-store/secret-sync-controller: serviceaccounts"),
            "{error}"
        );
        assert!(tagged.first("oidc").is_some());
    }

    #[test]
    fn probe_reads_only_the_server_unit() {
        let (stdout, calls) = probe_with_units(&["k3s.service", "k3s-agent.service"]);
        assert_eq!(calls, ["cat k3s.service"]);
        let tagged = Tagged::parse(&stdout);
        assert_eq!(tagged.all("unit").len(), 1);
        assert!(tagged.first("unit").unwrap().starts_with("k3s "));
        assert!(tagged.first("oidc").is_some());
    }

    #[test]
    fn probe_reads_agent_unit_without_server() {
        let (stdout, calls) = probe_with_units(&["k3s-agent.service"]);
        assert_eq!(calls, ["cat k3s.service", "cat k3s-agent.service"]);
        let tagged = Tagged::parse(&stdout);
        assert!(tagged.first("unit").unwrap().starts_with("k3s-agent "));
    }

    #[test]
    fn tagged_lines_parse() {
        let tagged = Tagged::parse("noise\n@@uid 0\n@@unit k3s abc\n@@unit k3s-agent def\n");
        assert_eq!(tagged.first("uid"), Some("0"));
        assert_eq!(tagged.all("unit").len(), 2);
    }

    #[test]
    fn content_hash_matches_sha256sum() {
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg("printf 'a: 1\\n' | sha256sum | cut -d' ' -f1")
            .output()
            .unwrap();
        let expected = String::from_utf8(output.stdout).unwrap();
        assert_eq!(content_hash(Some("a: 1\n")), expected.trim());
    }

    #[test]
    fn apply_and_restore_work_in_a_real_shell() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml.d").join("zz-x.yaml");
        let path = path.to_string_lossy().into_owned();
        let backup = dir.path().join("backup").to_string_lossy().into_owned();
        let run = |script: String| {
            let script = script.replace(&quote(BACKUP_DIR), &quote(&backup));
            std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .output()
                .unwrap()
        };

        let first = run(apply_dropin(&path, "absent", Some("a: 1\n")));
        assert!(
            first.status.success(),
            "{}",
            String::from_utf8_lossy(&first.stderr)
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a: 1\n");

        let stale = run(apply_dropin(&path, "absent", Some("a: 2\n")));
        assert_eq!(stale.status.code(), Some(3));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a: 1\n");

        let hash = content_hash(Some("a: 1\n"));
        let second = run(apply_dropin(&path, &hash, Some("a: 2\n")));
        assert!(second.status.success());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a: 2\n");

        let restored = run(restore_dropin(&path));
        assert!(
            restored.status.success(),
            "{}",
            String::from_utf8_lossy(&restored.stderr)
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a: 1\n");
    }
}
