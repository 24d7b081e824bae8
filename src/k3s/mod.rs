//! K3s's effective server configuration and the change that puts the Arc issuer first.
//!
//! Everything here is pure: the [`converge`](crate::converge) step reads the files from the
//! node, and this module decides what kube-apiserver would run with before and after the
//! change.

pub mod apiserver;
pub mod config;
pub mod duration;
pub mod plan;
pub mod unit;

use std::fmt;

/// A place in a file on the node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// Path of the file on the node.
    pub path: String,
    /// 1-based line.
    pub line: usize,
}

impl Origin {
    /// Creates an origin.
    pub fn new(path: &str, line: usize) -> Self {
        Origin {
            path: path.to_owned(),
            line,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path, self.line)
    }
}
