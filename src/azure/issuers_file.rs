//! The offline issuers file: a CSV snapshot of every cluster's issuer, written by
//! `arcfleet issuers export` where Azure is reachable and read by `--issuers-file` on
//! air-gapped jump hosts, which then need no Azure access at all.
//!
//! Columns, in this order: `subscription,resource_group,cluster,issuer` and then
//! `status,failed_gate,message,resolved_at`. `status` is `ready`, when `issuer` is set, or
//! the reason there is no issuer: `not-ready`, `not-found`, `invalid-issuer`,
//! `auth-failed` or `failed`. `failed_gate` names the readiness gate of a `not-ready` row,
//! `message` is the problem and its fix, and `resolved_at` is when ARM was read (RFC 3339,
//! UTC).
//! A file with only the first four columns is read too, every row then being ready.
//!
//! Issuers from the file pass the same check as issuers from ARM
//! ([`issuer::validate`](super::issuer::validate)), and no value is trimmed, because Entra
//! compares issuers byte for byte.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::readiness::Gate;
use super::{issuer, ClusterProblem, Resolution};
use crate::inventory::{check_arm_segment, ClusterRef, Location};

/// The columns every issuers file starts with.
pub const REQUIRED_COLUMNS: [&str; 4] = ["subscription", "resource_group", "cluster", "issuer"];

/// The columns `issuers export` writes after the required ones.
pub const STATUS_COLUMNS: [&str; 4] = ["status", "failed_gate", "message", "resolved_at"];

/// An issuers file that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IssuersFileError {
    /// The file could not be read.
    #[error("cannot read issuers file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A row or the header is invalid.
    #[error("{location}: {message}")]
    Invalid {
        /// The file and line.
        location: Location,
        /// The problem and its fix.
        message: String,
    },
}

/// Renders the issuers file for `clusters`, in their order.
pub fn render(clusters: &[ClusterRef], resolution: &Resolution, resolved_at: &str) -> Vec<u8> {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    let header: Vec<&str> = REQUIRED_COLUMNS
        .iter()
        .chain(&STATUS_COLUMNS)
        .copied()
        .collect();
    // Writing to a Vec cannot fail and every record has the header's 8 fields, so the
    // results are ignored.
    let _ = writer.write_record(&header);
    for cluster in clusters {
        let (issuer, status, gate, message) = match resolution.issuer(cluster) {
            Ok(issuer) => (issuer.to_owned(), "ready", "", String::new()),
            Err(problem) => {
                let gate = match &problem {
                    ClusterProblem::NotReady { gate, .. } => gate.as_str(),
                    _ => "",
                };
                (String::new(), problem.status(), gate, problem.to_string())
            }
        };
        let _ = writer.write_record([
            cluster.subscription.as_str(),
            &cluster.resource_group,
            &cluster.name,
            &issuer,
            status,
            gate,
            &message,
            resolved_at,
        ]);
    }
    writer.into_inner().unwrap_or_default()
}

/// The rows of a loaded issuers file.
#[derive(Debug)]
pub struct IssuersFile {
    path: PathBuf,
    rows: HashMap<(String, String, String), Result<String, ClusterProblem>>,
}

impl IssuersFile {
    /// Reads and checks a whole file; any invalid row fails the load with its line.
    pub fn load(path: &Path) -> Result<IssuersFile, IssuersFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| IssuersFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        parse(path, &text)
    }

    /// Returns the resolution of `clusters` from the file. A cluster without a row fails
    /// with a message to export the file again.
    pub fn resolution(&self, clusters: &[ClusterRef]) -> Resolution {
        let mut resolution = Resolution::default();
        for cluster in clusters {
            let result = self.rows.get(&cluster.key()).cloned().unwrap_or_else(|| {
                Err(ClusterProblem::NotFound(format!(
                    "the issuers file {} has no row for cluster {}: run `arcfleet issuers \
                     export` again with this inventory",
                    self.path.display(),
                    cluster.resource_id()
                )))
            });
            resolution.insert(cluster, result);
        }
        resolution
    }

    /// Returns the number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Returns whether the file has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Column positions found in the header.
struct Columns {
    status: Option<usize>,
    gate: Option<usize>,
    message: Option<usize>,
}

fn parse(path: &Path, text: &str) -> Result<IssuersFile, IssuersFileError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let at = |line: u64, message: String| IssuersFileError::Invalid {
        location: Location {
            path: path.to_owned(),
            line: usize::try_from(line).unwrap_or(usize::MAX),
        },
        message,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|error| at(1, format!("cannot read the CSV header: {error}")))?
        .clone();
    let columns = check_header(&header).map_err(|message| at(1, message))?;

    let mut rows = HashMap::new();
    let mut first_lines: HashMap<(String, String, String), u64> = HashMap::new();
    for record in reader.records() {
        let record = record.map_err(|error| {
            let line = error.position().map_or(0, |p| p.line());
            at(line, format!("invalid CSV row: {error}"))
        })?;
        let line = record.position().map_or(0, |p| p.line());
        let location = format!("{}:{line}", path.display());
        let (cluster, result) =
            parse_row(&record, &columns, &location).map_err(|message| at(line, message))?;
        if let Some(first) = first_lines.insert(cluster.key(), line) {
            return Err(at(
                line,
                format!(
                    "cluster {} is listed twice, first at line {first}: keep one row per cluster",
                    cluster.resource_id()
                ),
            ));
        }
        rows.insert(cluster.key(), result);
    }
    Ok(IssuersFile {
        path: path.to_owned(),
        rows,
    })
}

fn check_header(header: &csv::StringRecord) -> Result<Columns, String> {
    let names: Vec<&str> = header.iter().collect();
    if names.len() < REQUIRED_COLUMNS.len() || names[..REQUIRED_COLUMNS.len()] != REQUIRED_COLUMNS {
        return Err(format!(
            "unexpected header `{}`: an issuers file starts with `{}`; write one with \
             `arcfleet issuers export`",
            names.join(","),
            REQUIRED_COLUMNS.join(",")
        ));
    }
    for name in &names[REQUIRED_COLUMNS.len()..] {
        if !STATUS_COLUMNS.contains(name) {
            return Err(format!(
                "unknown column `{name}`: after `{}` the columns may be {}",
                REQUIRED_COLUMNS.join(","),
                STATUS_COLUMNS.join(", ")
            ));
        }
    }
    let find = |wanted: &str| names.iter().position(|name| *name == wanted);
    Ok(Columns {
        status: find("status"),
        gate: find("failed_gate"),
        message: find("message"),
    })
}

fn parse_row(
    record: &csv::StringRecord,
    columns: &Columns,
    location: &str,
) -> Result<(ClusterRef, Result<String, ClusterProblem>), String> {
    let field = |index: Option<usize>| index.and_then(|i| record.get(i)).unwrap_or("");
    let cluster = ClusterRef {
        subscription: field(Some(0)).to_owned(),
        resource_group: field(Some(1)).to_owned(),
        name: field(Some(2)).to_owned(),
    };
    for (name, value) in [
        ("subscription", &cluster.subscription),
        ("resource_group", &cluster.resource_group),
        ("cluster", &cluster.name),
    ] {
        check_arm_segment(name, value)?;
    }
    let issuer = field(Some(3));
    let status = match field(columns.status) {
        "" => "ready",
        status => status,
    };
    if status == "ready" {
        issuer::validate(issuer).map_err(|reason| {
            format!(
                "invalid issuer {} for cluster {}: {reason}",
                issuer.escape_debug(),
                cluster.resource_id()
            )
        })?;
        return Ok((cluster, Ok(issuer.to_owned())));
    }
    if !issuer.is_empty() {
        return Err(format!(
            "cluster {} has status `{status}` and an issuer; a row has an issuer only when its \
             status is `ready`",
            cluster.resource_id()
        ));
    }
    let problem = recorded_problem(
        status,
        field(columns.gate),
        field(columns.message),
        location,
    )?;
    Ok((cluster, Err(problem)))
}

/// Rebuilds the problem a row records, saying that it comes from the file.
fn recorded_problem(
    status: &str,
    gate: &str,
    message: &str,
    location: &str,
) -> Result<ClusterProblem, String> {
    let message = format!(
        "the issuers file ({location}) records: {}; export the file again once that is fixed",
        if message.is_empty() { status } else { message }
    );
    Ok(match status {
        "not-ready" => ClusterProblem::NotReady {
            gate: Gate::parse(gate).ok_or_else(|| {
                format!(
                    "invalid failed_gate `{}` for status not-ready: expected connectivity, \
                     provisioning, oidc-issuer or workload-identity",
                    gate.escape_debug()
                )
            })?,
            message,
        },
        "not-found" => ClusterProblem::NotFound(message),
        "invalid-issuer" => ClusterProblem::InvalidIssuer(message),
        // An offline run has no credential, so a recorded authentication failure is just
        // a cluster without an issuer.
        "auth-failed" | "failed" => ClusterProblem::Failed(message),
        other => {
            return Err(format!(
                "invalid status `{}`: expected ready, not-ready, not-found, invalid-issuer, \
                 auth-failed or failed",
                other.escape_debug()
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUER: &str = "https://eastus.oic.prod-arc.azure.com/t1/0c9a7f12/";

    fn cluster(name: &str) -> ClusterRef {
        ClusterRef {
            subscription: "3f9a6c1e-5b2d".into(),
            resource_group: "rg-plant-a".into(),
            name: name.into(),
        }
    }

    fn load(text: &str) -> Result<IssuersFile, IssuersFileError> {
        parse(Path::new("issuers.csv"), text)
    }

    #[test]
    fn export_round_trips() {
        let clusters = [cluster("ready"), cluster("pending"), cluster("gone")];
        let mut resolution = Resolution::default();
        resolution.insert(&clusters[0], Ok(ISSUER.into()));
        resolution.insert(
            &clusters[1],
            Err(ClusterProblem::NotReady {
                gate: Gate::OidcIssuer,
                message: "no issuer URL yet, \"quoted\"".into(),
            }),
        );
        resolution.insert(&clusters[2], Err(ClusterProblem::NotFound("gone".into())));
        let text =
            String::from_utf8(render(&clusters, &resolution, "2026-01-01T00:00:00Z")).unwrap();
        assert!(text.starts_with(
            "subscription,resource_group,cluster,issuer,status,failed_gate,message,resolved_at\n"
        ));

        let file = load(&text).unwrap();
        assert_eq!(file.len(), 3);
        let loaded = file.resolution(&clusters);
        assert_eq!(loaded.issuer(&clusters[0]), Ok(ISSUER));
        let Err(ClusterProblem::NotReady { gate, message }) = loaded.issuer(&clusters[1]) else {
            panic!("pending cluster stays not ready");
        };
        assert_eq!(gate, Gate::OidcIssuer);
        assert!(
            message.contains("no issuer URL yet, \"quoted\""),
            "{message}"
        );
        assert!(message.contains("issuers.csv:3"), "{message}");
        assert!(matches!(
            loaded.issuer(&clusters[2]),
            Err(ClusterProblem::NotFound(_))
        ));
    }

    #[test]
    fn four_columns_are_enough() {
        let text = format!("subscription,resource_group,cluster,issuer\ns,rg,c1,{ISSUER}\n");
        let file = load(&text).unwrap();
        let c1 = ClusterRef {
            subscription: "S".into(),
            resource_group: "RG".into(),
            name: "C1".into(),
        };
        assert_eq!(
            file.resolution(std::slice::from_ref(&c1)).issuer(&c1),
            Ok(ISSUER)
        );
    }

    #[test]
    fn missing_row_asks_for_export() {
        let file = load("subscription,resource_group,cluster,issuer\n").unwrap();
        let error = file
            .resolution(&[cluster("c9")])
            .issuer(&cluster("c9"))
            .unwrap_err();
        assert!(error.to_string().contains("issuers export"), "{error}");
    }

    #[test]
    fn invalid_issuer_names_line() {
        for issuer in [
            "http://eastus.oic.prod-arc.azure.com/t/u/",
            "\"https://a.example/ x\"",
            "https://a.example/'x",
            "",
        ] {
            let text = format!(
                "subscription,resource_group,cluster,issuer\ns,rg,c1,{ISSUER}\ns,rg,c2,{issuer}\n"
            );
            let error = load(&text).unwrap_err().to_string();
            assert!(
                error.starts_with("issuers.csv:3: invalid issuer"),
                "{issuer}: {error}"
            );
        }
    }

    #[test]
    fn issuer_is_not_trimmed() {
        let text = format!("subscription,resource_group,cluster,issuer\ns,rg,c1,\"{ISSUER} \"\n");
        assert!(
            load(&text).is_err(),
            "a trailing space is not silently dropped"
        );
    }

    #[test]
    fn bad_header_is_rejected() {
        let error = load("sub,rg,cluster,issuer\n").unwrap_err().to_string();
        assert!(error.starts_with("issuers.csv:1:"), "{error}");
        assert!(error.contains("issuers export"), "{error}");
        let error = load("subscription,resource_group,cluster,issuer,owner\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown column `owner`"), "{error}");
    }

    #[test]
    fn duplicate_cluster_is_rejected() {
        let text = format!(
            "subscription,resource_group,cluster,issuer\ns,rg,c1,{ISSUER}\nS,RG,C1,{ISSUER}\n"
        );
        let error = load(&text).unwrap_err().to_string();
        assert!(error.starts_with("issuers.csv:3:"), "{error}");
        assert!(error.contains("first at line 2"), "{error}");
    }

    #[test]
    fn inconsistent_rows_are_rejected() {
        let header =
            "subscription,resource_group,cluster,issuer,status,failed_gate,message,resolved_at\n";
        for (row, expected) in [
            (
                format!("s,rg,c1,{ISSUER},failed,,x,"),
                "only when its status is `ready`",
            ),
            (
                "s,rg,c1,,not-ready,nope,x,".to_owned(),
                "invalid failed_gate",
            ),
            ("s,rg,c1,,maybe,,x,".to_owned(), "invalid status `maybe`"),
            ("s,r g,c1,,failed,,x,".to_owned(), "invalid resource_group"),
        ] {
            let error = load(&format!("{header}{row}\n")).unwrap_err().to_string();
            assert!(error.starts_with("issuers.csv:2:"), "{row}: {error}");
            assert!(error.contains(expected), "{row}: {error}");
        }
    }

    #[test]
    fn byte_order_mark_is_skipped() {
        let text =
            format!("\u{feff}subscription,resource_group,cluster,issuer\ns,rg,c1,{ISSUER}\n");
        assert_eq!(load(&text).unwrap().len(), 1);
    }
}
