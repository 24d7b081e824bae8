//! Why a device is not compliant: one cause from a fixed list, each with a one-line fix.
//!
//! docs/reference.md lists every cause; the CSV report's `cause` and `fix` columns and the
//! console summary's grouping use the same names.

use serde::Serialize;

/// The cause of a failed, skipped or non-compliant device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// The device did not accept a TCP connection or the SSH handshake in time.
    Unreachable,
    /// The device's host key is not in known_hosts.
    HostKeyUnknown,
    /// The device offered a host key other than the one recorded, or a revoked one.
    HostKeyMismatch,
    /// SSH authentication or privilege escalation failed.
    AuthFailed,
    /// The device does not run a K3s server.
    NotAServer,
    /// The Azure credential could not get a token.
    AzureAuthFailed,
    /// ARM does not know the connected cluster, or denies reading it.
    AzureClusterNotFound,
    /// The cluster is not connected, not provisioned, or has the OIDC issuer disabled.
    AzureClusterNotReady,
    /// The cluster has no issuer URL yet, or one arcfleet refuses to write.
    IssuerMissingInAzure,
    /// A K3s config file is not valid YAML.
    ConfigInvalid,
    /// Another configuration source would override arcfleet's drop-in.
    ConfigOverridden,
    /// K3s did not come up with the Arc issuer; the previous configuration is back.
    RestartFailedRolledBack,
    /// K3s did not come up with the Arc issuer and the rollback failed too.
    RollbackFailed,
    /// The node did not become Ready, or its etcd member did not vote again.
    NodeNotReady,
    /// The running API server does not sign with the Arc issuer (audit and check).
    IssuerNotEffective,
    /// A freshly minted token carries another issuer than the Arc issuer.
    TokenIssuerMismatch,
    /// The token's signing key is not among the keys the Arc issuer publishes.
    SigningKeyNotPublished,
    /// SecretSync objects report a failure after the controller restart.
    SecretSyncFailing,
    /// A federated identity credential does not match the cluster's issuer.
    IdentityCredentialMismatch,
    /// The run did not start on the device.
    NotStarted,
    /// A remote command failed in a way no other cause covers.
    CommandFailed,
}

impl Cause {
    /// Returns the cause's name as reports print it.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Unreachable => "unreachable",
            Cause::HostKeyUnknown => "host-key-unknown",
            Cause::HostKeyMismatch => "host-key-mismatch",
            Cause::AuthFailed => "auth-failed",
            Cause::NotAServer => "not-a-server",
            Cause::AzureAuthFailed => "azure-auth-failed",
            Cause::AzureClusterNotFound => "azure-cluster-not-found",
            Cause::AzureClusterNotReady => "azure-cluster-not-ready",
            Cause::IssuerMissingInAzure => "issuer-missing-in-azure",
            Cause::ConfigInvalid => "config-invalid",
            Cause::ConfigOverridden => "config-overridden",
            Cause::RestartFailedRolledBack => "restart-failed-rolled-back",
            Cause::RollbackFailed => "rollback-failed",
            Cause::NodeNotReady => "node-not-ready",
            Cause::IssuerNotEffective => "issuer-not-effective",
            Cause::TokenIssuerMismatch => "token-issuer-mismatch",
            Cause::SigningKeyNotPublished => "signing-key-not-published",
            Cause::SecretSyncFailing => "secret-sync-failing",
            Cause::IdentityCredentialMismatch => "identity-credential-mismatch",
            Cause::NotStarted => "not-started",
            Cause::CommandFailed => "command-failed",
        }
    }

    /// Returns the one-line fix.
    pub fn fix(self) -> &'static str {
        match self {
            Cause::Unreachable => "Check the address, the network path and that sshd runs; raise --connect-timeout for slow links.",
            Cause::HostKeyUnknown => "Verify the key's fingerprint on the device, then add the line from the error to known_hosts.",
            Cause::HostKeyMismatch => "Find out why the device offered a changed or revoked key before trusting it; if the device was reinstalled, replace its known_hosts entry.",
            Cause::AuthFailed => "Fix what the error names: the key file or its passphrase, the user's authorized_keys, or the user's sudo rights or sudo password.",
            Cause::NotAServer => "Set the device's role to agent in the inventory, or point it at a K3s server.",
            Cause::AzureAuthFailed => "Fix the Azure credential (see the AADSTS code in the error) and run again.",
            Cause::AzureClusterNotFound => "Check subscription, resource group and cluster name in the inventory, and the Reader role.",
            Cause::AzureClusterNotReady => "Bring the cluster back to Connected and enable the OIDC issuer (az connectedk8s update --enable-oidc-issuer).",
            Cause::IssuerMissingInAzure => "Wait until Azure publishes the issuer URL after --enable-oidc-issuer, then run again.",
            Cause::ConfigInvalid => "Fix the YAML at the file and line named in the error; K3s would not start with it either.",
            Cause::ConfigOverridden => "Change the setting at the file and line named in the error so that arcfleet's drop-in takes effect.",
            Cause::RestartFailedRolledBack => "Read the K3s journal lines in the error, fix the cause, and run again.",
            Cause::RollbackFailed => "Log in to the node now: K3s may be down. Put back the drop-in from /var/lib/arcfleet/backup (NAME.prev, or delete the drop-in when NAME.absent exists), restart k3s, then run arcfleet again.",
            Cause::NodeNotReady => "Check the node and its etcd member (kubectl get nodes, EtcdIsVoter) before converging the cluster's other servers.",
            Cause::IssuerNotEffective => "Run arcfleet converge to apply the change and restart K3s.",
            Cause::TokenIssuerMismatch => "Check for an issuer set outside arcfleet's drop-in and that K3s restarted with it.",
            Cause::SigningKeyNotPublished => "Tokens are signed with a key Arc does not publish: check the cluster's service-account signing key and the Arc agents.",
            Cause::SecretSyncFailing => "Check the SecretSync's reason and the federated identity credential (issuer, subject, audience).",
            Cause::IdentityCredentialMismatch => "Update the federated identity credential to the cluster's issuer, subject and audience.",
            Cause::NotStarted => "Run again, or with --retry-failed, once the reason in the error is resolved.",
            Cause::CommandFailed => "Read the error and the device's transcript in the run record.",
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
