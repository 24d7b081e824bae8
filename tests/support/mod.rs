//! A lab of real sshd devices with the K3s stand-in, plus the Azure emulator, driven by
//! `tests/lab/lab.py`, and helpers to run the built `arcfleet` binary against it.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

/// A running lab; dropping it stops every process it started.
pub struct Lab {
    dir: tempfile::TempDir,
    /// The lab's manifest.json.
    pub manifest: Value,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn lab_script() -> PathBuf {
    repo().join("tests/lab/lab.py")
}

/// The Python that runs the lab: Debian's, which has PyYAML from python3-yaml, unless
/// ARCFLEET_LAB_PYTHON names another.
fn python() -> String {
    std::env::var("ARCFLEET_LAB_PYTHON").unwrap_or_else(|_| {
        if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3".to_owned()
        } else {
            "python3".to_owned()
        }
    })
}

/// Returns a default spec for `servers` servers spread over `clusters` clusters, plus
/// `agents` agents, as `lab.py spec` prints it.
pub fn spec(servers: usize, clusters: usize, agents: usize) -> Value {
    lab_spec(servers, clusters, agents, &[])
}

/// Returns a spec whose `servers` devices are reachable only through a bastion sshd, in
/// network namespaces the lab creates.
pub fn bastion_spec(servers: usize) -> Value {
    lab_spec(servers, 1, 0, &["--bastion"])
}

fn lab_spec(servers: usize, clusters: usize, agents: usize, extra: &[&str]) -> Value {
    let output = Command::new(python())
        .arg(lab_script())
        .args(["spec", "--devices", &(servers + agents).to_string()])
        .args([
            "--clusters",
            &clusters.to_string(),
            "--agents",
            &agents.to_string(),
        ])
        .args(extra)
        .output()
        .expect("run lab.py spec");
    assert!(
        output.status.success(),
        "lab.py spec failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("lab.py spec prints JSON")
}

/// Gives every device of a spec a single-server cluster of its own, for tests whose
/// devices are independent sites (a failure stops the rest of a cluster's rollout).
pub fn isolate_clusters(spec: &mut Value) {
    let template = spec["clusters"][0].clone();
    let mut clusters = Vec::new();
    for device in spec["devices"].as_array_mut().unwrap() {
        let mut cluster = template.clone();
        let name = format!("site-{}", device["name"].as_str().unwrap());
        cluster["name"] = json!(name);
        cluster.as_object_mut().unwrap().remove("issuer_url");
        device["cluster"] = json!(name);
        clusters.push(cluster);
    }
    spec["clusters"] = json!(clusters);
}

impl Lab {
    /// Starts a lab from a spec.
    pub fn start(spec: &Value) -> Lab {
        assert!(
            nix_is_root(),
            "lab tests need root: they start sshd in mount namespaces (run them as root or in CI)"
        );
        let dir = tempfile::Builder::new()
            .prefix("arcfleet-lab-")
            .tempdir()
            .expect("temp dir");
        let spec_path = dir.path().join("spec.json");
        std::fs::write(&spec_path, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
        let lab_dir = dir.path().join("lab");
        let output = Command::new(python())
            .arg(lab_script())
            .args(["up", "--dir"])
            .arg(&lab_dir)
            .arg("--spec")
            .arg(&spec_path)
            .output()
            .expect("run lab.py up");
        let mut lab = Lab {
            manifest: Value::Null,
            dir,
        };
        assert!(
            output.status.success(),
            "lab.py up failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(lab_dir.join("manifest.json")).unwrap()).unwrap();
        lab.manifest = manifest;
        lab
    }

    /// Returns the lab directory.
    pub fn lab_dir(&self) -> PathBuf {
        self.dir.path().join("lab")
    }

    /// Returns a path in the test's scratch directory.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Returns a manifest string field.
    pub fn field(&self, name: &str) -> String {
        self.manifest[name]
            .as_str()
            .unwrap_or_else(|| panic!("manifest has no {name}"))
            .to_owned()
    }

    /// Returns the manifest entry of a device.
    pub fn device(&self, name: &str) -> &Value {
        self.manifest["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("no device {name} in the lab"))
    }

    /// Returns every device name, in order.
    pub fn device_names(&self) -> Vec<String> {
        self.manifest["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Returns the host-side path of a file inside a device's filesystem view.
    pub fn device_path(&self, device: &str, path: &str) -> PathBuf {
        let root = PathBuf::from(self.device(device)["root"].as_str().unwrap());
        root.join(path.trim_start_matches('/'))
    }

    /// Returns the Arc issuer of the cluster a device belongs to.
    pub fn cluster_issuer(&self, device: &str) -> String {
        let cluster = self.device(device)["cluster"].as_str().unwrap().to_owned();
        self.manifest["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == cluster.as_str())
            .and_then(|c| c["issuer_url"].as_str())
            .unwrap_or_else(|| panic!("no issuer for cluster {cluster}"))
            .to_owned()
    }

    /// Returns an `arcfleet` command with the lab's Azure emulator, key and known_hosts.
    pub fn arcfleet(&self, args: &[&str]) -> Command {
        let mut command = self.arcfleet_without_keys(args);
        command
            .arg("--identity")
            .arg(self.field("identity_file"))
            .arg("--known-hosts")
            .arg(self.field("known_hosts"));
        command
    }

    /// Returns an `arcfleet` command with the lab's Azure emulator and credentials but no
    /// `--identity` or `--known-hosts`, for commands that take none (`issuers export`) and
    /// tests that bring their own. HOME is the scratch directory, which has no `.ssh`, and
    /// SSH_AUTH_SOCK is unset.
    pub fn arcfleet_without_keys(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_arcfleet"));
        command
            .current_dir(self.dir.path())
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.dir.path())
            .env("ARCFLEET_ARM_ENDPOINT", self.field("arm_endpoint"))
            .env("AZURE_AUTHORITY_HOST", self.field("authority_host"))
            .env("AZURE_TENANT_ID", self.field("tenant_id"))
            .env("AZURE_CLIENT_ID", self.field("client_id"))
            .env("AZURE_CLIENT_SECRET", self.field("client_secret"))
            .env("SSL_CERT_FILE", self.field("ca_file"));
        command
    }

    /// Runs a command through the system OpenSSH client on a device, as root, with the
    /// lab's ssh_config (which goes through the bastion when the lab has one).
    pub fn ssh(&self, device: &str, command: &str) -> Output {
        let entry = self.device(device);
        Command::new("ssh")
            .arg("-F")
            .arg(self.field("ssh_config"))
            .arg("-p")
            .arg(entry["port"].as_u64().unwrap().to_string())
            .arg(format!("root@{}", entry["host"].as_str().unwrap()))
            .arg(command)
            .output()
            .expect("run ssh")
    }

    /// Returns the issuer the device's running API server publishes, read over SSH.
    pub fn published_issuer(&self, device: &str) -> Option<String> {
        let output = self.ssh(
            device,
            "k3s kubectl get --raw /.well-known/openid-configuration",
        );
        if !output.status.success() {
            return None;
        }
        let document: Value = serde_json::from_slice(&output.stdout).ok()?;
        document["issuer"].as_str().map(str::to_owned)
    }

    /// Returns the stand-in's start attempts on a device, without the lab's initial start.
    pub fn restarts(&self, device: &str) -> Vec<Value> {
        let path = self.device_path(device, "/var/lib/rancher/k3s/standin/restarts.log");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|entry| entry["initial"] != json!(true))
            .collect()
    }

    /// Returns the stand-in calls made as root on a device, each with the command lines of
    /// its ancestor processes.
    pub fn calls(&self, device: &str) -> Vec<Value> {
        let path = self.device_path(device, "/var/lib/rancher/k3s/standin/calls.log");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .collect()
    }

    /// Writes a fault file for a device.
    pub fn set_faults(&self, device: &str, faults: Value) {
        let path = self.device_path(device, "/var/lib/rancher/k3s/standin/faults.json");
        std::fs::write(path, serde_json::to_vec(&faults).unwrap()).unwrap();
    }

    /// Returns the number of ARM requests the emulator logged (token requests excluded).
    pub fn arm_requests(&self) -> usize {
        self.emulator_log()
            .iter()
            .filter(|entry| {
                entry["path"]
                    .as_str()
                    .is_some_and(|p| p.to_ascii_lowercase().starts_with("/subscriptions/"))
            })
            .count()
    }

    /// Returns every request the emulator logged, in order.
    pub fn emulator_log(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.field("emulator_log")).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .collect()
    }

    /// Returns the logged requests of one kind (`arm`, `token`, `oidc`, `control`).
    pub fn emulator_requests(&self, kind: &str) -> Vec<Value> {
        self.emulator_log()
            .into_iter()
            .filter(|entry| entry["kind"] == kind)
            .collect()
    }

    /// Applies a JSON merge patch to the emulator state through its control API.
    pub fn patch_emulator(&self, patch: Value) {
        use std::io::{Read, Write};
        let port = self.manifest["emulator_port"]
            .as_u64()
            .expect("emulator_port");
        let body = serde_json::to_vec(&patch).unwrap();
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port as u16)).unwrap();
        write!(
            stream,
            "POST /_emulator/state HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: \
             application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        stream.write_all(&body).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "emulator patch failed: {response}"
        );
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(python())
            .arg(lab_script())
            .args(["down", "--dir"])
            .arg(self.lab_dir())
            .output();
    }
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Reads a CSV report into rows keyed by column name.
pub fn read_csv(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let mut reader = csv::Reader::from_path(path).expect("open CSV report");
    let headers = reader.headers().unwrap().clone();
    reader
        .records()
        .map(|record| {
            let record = record.unwrap();
            headers
                .iter()
                .map(str::to_owned)
                .zip(record.iter().map(str::to_owned))
                .collect()
        })
        .collect()
}

/// Returns a readable dump of a finished command for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The default playbook with a short stability window, so tests finish quickly.
pub const FAST_PLAYBOOK: &str = "name: fast
steps:
  - probe
  - configure-apiserver
  - restart-k3s:
      deadline: 40s
      stability_window: 1s
  - verify-token
  - restart-secret-sync:
      rollout_timeout: 30s
";

pub fn write_playbook(lab: &Lab) -> PathBuf {
    let path = lab.scratch("playbook.yaml");
    std::fs::write(&path, FAST_PLAYBOOK).unwrap();
    path
}

/// Writes a CSV inventory of the lab's devices plus `extra` rows.
pub fn write_inventory(lab: &Lab, extra: &[&str]) -> PathBuf {
    let clusters: HashMap<String, Value> = lab.manifest["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_owned(), c.clone()))
        .collect();
    let mut text =
        String::from("name,host,port,user,subscription,resource_group,cluster,role,labels\n");
    for device in lab.manifest["devices"].as_array().unwrap() {
        let cluster = &clusters[device["cluster"].as_str().unwrap()];
        text.push_str(&format!(
            "{},{},{},{},{},{},{},{},\n",
            device["name"].as_str().unwrap(),
            device["host"].as_str().unwrap(),
            device["port"],
            device["user"].as_str().unwrap(),
            cluster["subscription"].as_str().unwrap(),
            cluster["resource_group"].as_str().unwrap(),
            cluster["name"].as_str().unwrap(),
            device["role"].as_str().unwrap(),
        ));
    }
    for row in extra {
        text.push_str(row);
        text.push('\n');
    }
    let path = lab.scratch("inventory.csv");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn run(lab: &Lab, args: &[&str]) -> std::process::Output {
    lab.arcfleet(args).output().expect("run arcfleet")
}

pub fn rows_by_device(path: &Path) -> HashMap<String, HashMap<String, String>> {
    read_csv(path)
        .into_iter()
        .map(|row| (row["device"].clone(), row))
        .collect()
}
