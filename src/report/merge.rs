//! `arcfleet report merge`: joining the CSV reports of sharded runs into one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::CSV_COLUMNS;

/// A merge that could not be done.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// A report could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The report.
        path: PathBuf,
        /// The CSV error.
        source: csv::Error,
    },
    /// A report does not have arcfleet's columns.
    #[error("{}:1: unexpected header `{found}`: expected an arcfleet CSV report with `{}`", path.display(), CSV_COLUMNS.join(","))]
    Header {
        /// The report.
        path: PathBuf,
        /// The header found.
        found: String,
    },
    /// Two reports list the same device.
    #[error("{}:{line}: device `{device}` is also in {} line {first_line}: the shards overlap, so check that each job used a different --shard", path.display(), first.display())]
    Duplicate {
        /// The report with the second row.
        path: PathBuf,
        /// Its line.
        line: u64,
        /// The device.
        device: String,
        /// The report with the first row.
        first: PathBuf,
        /// Its line.
        first_line: u64,
    },
}

/// Reads the reports in order and returns the merged CSV text. Rows keep their input
/// order; a device in two reports is an error.
pub fn merge(paths: &[PathBuf]) -> Result<String, MergeError> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    let csv_error = |path: &Path, source| MergeError::Read {
        path: path.to_owned(),
        source,
    };
    writer
        .write_record(CSV_COLUMNS)
        .map_err(|e| csv_error(Path::new("-"), e))?;
    let mut seen: HashMap<String, (PathBuf, u64)> = HashMap::new();
    for path in paths {
        let mut reader = csv::Reader::from_path(path).map_err(|e| csv_error(path, e))?;
        let header: Vec<String> = reader
            .headers()
            .map_err(|e| csv_error(path, e))?
            .iter()
            .map(str::to_owned)
            .collect();
        if header != CSV_COLUMNS {
            return Err(MergeError::Header {
                path: path.clone(),
                found: header.join(","),
            });
        }
        for record in reader.records() {
            let record = record.map_err(|e| csv_error(path, e))?;
            let line = record.position().map_or(0, |p| p.line());
            let device = record.get(0).unwrap_or("").to_owned();
            if let Some((first, first_line)) = seen.get(&device) {
                return Err(MergeError::Duplicate {
                    path: path.clone(),
                    line,
                    device,
                    first: first.clone(),
                    first_line: *first_line,
                });
            }
            seen.insert(device, (path.clone(), line));
            writer
                .write_record(&record)
                .map_err(|e| csv_error(path, e))?;
        }
    }
    let bytes = writer
        .into_inner()
        .map_err(|e| csv_error(Path::new("-"), e.into_error().into()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}
