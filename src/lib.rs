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
//! - [`fleet`] runs many devices at once and shows progress.
//! - [`report`] renders results: the summary table, the CSV report and JSON.

pub mod azure;
pub mod cli;
pub mod converge;
pub mod fleet;
pub mod inventory;
pub mod k3s;
pub mod playbook;
pub mod report;
pub mod secret;
pub mod ssh;
pub mod yaml;
