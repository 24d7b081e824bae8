//! arcfleet converges fleets of Azure Arc-connected K3s clusters on their Arc OIDC issuer.
//!
//! The parts, in the order a run uses them:
//!
//! - [`inventory`] loads the devices and the Arc cluster each belongs to.
//! - [`playbook`] loads the convergence steps and their parameters.
//! - [`azure`] resolves each cluster's OIDC issuer from Azure Resource Manager.
//! - [`ssh`] opens verified SSH sessions to the nodes and runs commands on them.
//! - [`k3s`] models K3s's effective server configuration and plans the change.
//! - [`converge`] probes, changes, restarts, verifies and rolls back one node.
//! - [`rollout`] selects devices and runs them in waves and batches, one server per
//!   cluster at a time.
//! - [`events`], [`progress`] and [`shutdown`] carry a run's live output and orderly stop.
//! - [`report`] renders results: the summary table, the CSV report and JSON.

pub mod azure;
pub mod cli;
pub mod converge;
pub mod events;
pub mod inventory;
pub mod k3s;
pub mod playbook;
pub mod progress;
pub mod report;
pub mod rollout;
pub mod secret;
pub mod shutdown;
pub mod ssh;
pub mod yaml;
