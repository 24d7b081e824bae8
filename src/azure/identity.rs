//! Checking the federated identity credentials of the workloads' user-assigned identities
//! against each cluster's issuer, before a workload meets AADSTS700211.
//!
//! For each identity the inventory lists, arcfleet reads its federated identity
//! credentials and looks for one whose issuer is the cluster's issuer, whose subject is
//! `system:serviceaccount:<namespace>:<name>` and whose audiences include the expected
//! audience. Entra compares the three as exact strings in that order, so the first
//! comparison that no credential passes names the AADSTS code a token exchange would
//! fail with: 700211 (issuer), 700213 (subject) or 700212 (audience).

use std::collections::HashMap;

use futures::stream::{self, StreamExt};
use serde::Serialize;

use super::arm::{ArmClient, ArmError, FederatedCredential, IdentityRef};
use super::pipeline::ARM_CONCURRENCY;
use super::Resolution;
use crate::inventory::WorkloadIdentity;

/// The kind of a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    /// No credential trusts the cluster's issuer (AADSTS700211).
    IssuerMismatch,
    /// No credential with that issuer has the workload's subject (AADSTS700213).
    SubjectMismatch,
    /// No matching credential accepts the audience (AADSTS700212).
    AudienceMismatch,
    /// The credentials could not be read.
    ReadFailed,
    /// The cluster has no issuer to compare with.
    ClusterNotResolved,
}

impl FindingKind {
    /// Returns the AADSTS code a token exchange would fail with.
    pub fn aadsts_code(self) -> Option<u32> {
        match self {
            FindingKind::IssuerMismatch => Some(700211),
            FindingKind::SubjectMismatch => Some(700213),
            FindingKind::AudienceMismatch => Some(700212),
            FindingKind::ReadFailed | FindingKind::ClusterNotResolved => None,
        }
    }

    /// Returns the name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::IssuerMismatch => "issuer-mismatch",
            FindingKind::SubjectMismatch => "subject-mismatch",
            FindingKind::AudienceMismatch => "audience-mismatch",
            FindingKind::ReadFailed => "read-failed",
            FindingKind::ClusterNotResolved => "cluster-not-resolved",
        }
    }
}

/// One problem found for one workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `resource-group/name` of the cluster.
    pub cluster: String,
    /// `resource-group/name` of the identity.
    pub identity: String,
    /// The expected subject.
    pub subject: String,
    /// The kind of problem.
    pub kind: FindingKind,
    /// The AADSTS code a token exchange would fail with, if any.
    pub aadsts: Option<u32>,
    /// The problem and the command that fixes it.
    pub message: String,
}

/// The result of the identity check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IdentityReport {
    /// Identities checked.
    pub checked: usize,
    /// Problems found, in inventory order.
    pub findings: Vec<Finding>,
}

/// Checks every identity against its cluster's issuer. Each identity's credentials are
/// read once, however many clusters name it.
pub async fn check_all(
    client: &ArmClient,
    identities: &[WorkloadIdentity],
    resolution: &Resolution,
) -> IdentityReport {
    let mut distinct: Vec<IdentityRef> = identities.iter().map(identity_ref).collect();
    distinct.sort();
    distinct.dedup_by(|a, b| key(a) == key(b));
    let credentials: HashMap<_, _> = stream::iter(distinct)
        .map(|identity| async move {
            let result = client.list_federated_credentials(&identity).await;
            (key(&identity), result)
        })
        .buffer_unordered(ARM_CONCURRENCY)
        .collect()
        .await;

    let findings = identities
        .iter()
        .filter_map(|workload| {
            let issuer = match resolution.issuer(&workload.cluster) {
                Ok(issuer) => issuer.to_owned(),
                Err(problem) => return Some(unresolved(workload, &problem.to_string())),
            };
            match credentials.get(&key(&identity_ref(workload))) {
                Some(Ok(list)) => compare(workload, &issuer, list),
                Some(Err(error)) => Some(read_failed(workload, error)),
                None => Some(read_failed(
                    workload,
                    &ArmError::Other("the credentials were not read".into()),
                )),
            }
        })
        .collect();
    IdentityReport {
        checked: identities.len(),
        findings,
    }
}

/// Renders the identity check for the console: a count line, then one block per finding.
pub fn render(report: &IdentityReport) -> String {
    let mut text = format!(
        "\nidentity check: {} identities, {} findings\n",
        report.checked,
        report.findings.len()
    );
    for finding in &report.findings {
        let code = finding
            .aadsts
            .map(|code| format!(" (AADSTS{code})"))
            .unwrap_or_default();
        text.push_str(&format!(
            "  {} {} {}: {}{code}\n    {}\n",
            finding.cluster,
            finding.identity,
            finding.subject,
            finding.kind.as_str(),
            finding.message
        ));
    }
    text
}

fn identity_ref(workload: &WorkloadIdentity) -> IdentityRef {
    IdentityRef {
        subscription: workload.subscription.clone(),
        resource_group: workload.resource_group.clone(),
        name: workload.name.clone(),
    }
}

/// ARM compares names case-insensitively.
fn key(identity: &IdentityRef) -> (String, String, String) {
    (
        identity.subscription.to_ascii_lowercase(),
        identity.resource_group.to_ascii_lowercase(),
        identity.name.to_ascii_lowercase(),
    )
}

/// Compares one identity's credentials with the expected issuer, subject and audience, in
/// Entra's order, and returns the first mismatch.
pub fn compare(
    workload: &WorkloadIdentity,
    issuer: &str,
    credentials: &[FederatedCredential],
) -> Option<Finding> {
    let subject = workload.subject();
    let with_issuer: Vec<&FederatedCredential> =
        credentials.iter().filter(|c| c.issuer == issuer).collect();
    if with_issuer.is_empty() {
        return Some(issuer_mismatch(workload, issuer, credentials));
    }
    let with_subject: Vec<&FederatedCredential> = with_issuer
        .iter()
        .copied()
        .filter(|c| c.subject == subject)
        .collect();
    let Some(first) = with_subject.first() else {
        let named = with_issuer[0];
        let message = format!(
            "no federated credential of identity {} trusts subject {subject} from issuer \
             {issuer}; credentials with this issuer have {}. Fix: `{}`",
            identity_ref(workload),
            describe(&with_issuer, |c| format!("subject {}", c.subject)),
            az_update(workload, &named.name, &format!("--subject {subject}"))
        );
        return Some(finding(workload, FindingKind::SubjectMismatch, message));
    };
    if with_subject
        .iter()
        .any(|c| c.audiences.contains(&workload.audience))
    {
        return None;
    }
    let message =
        format!(
        "federated credential {} of identity {} matches issuer and subject but does not accept \
         audience {}; it has audiences [{}]. Fix: `{}`",
        first.name,
        identity_ref(workload),
        workload.audience,
        first.audiences.join(", "),
        az_update(workload, &first.name, &format!("--audiences {}", workload.audience))
    );
    Some(finding(workload, FindingKind::AudienceMismatch, message))
}

fn issuer_mismatch(
    workload: &WorkloadIdentity,
    issuer: &str,
    credentials: &[FederatedCredential],
) -> Finding {
    let subject = workload.subject();
    let same_subject: Vec<&FederatedCredential> = credentials
        .iter()
        .filter(|c| c.subject == subject)
        .collect();
    let identity = identity_ref(workload);
    let message = match same_subject.first() {
        Some(named) => format!(
            "no federated credential of identity {identity} trusts the issuer of cluster {} \
             ({issuer}); {}{}. Fix: `{}`",
            workload.cluster,
            describe(&same_subject, |c| format!("trusts issuer {}", c.issuer)),
            near_miss(issuer, &same_subject),
            az_update(workload, &named.name, &format!("--issuer {issuer}"))
        ),
        None => format!(
            "identity {identity} has no federated credential for subject {subject} from the \
             issuer of cluster {} ({issuer}). Fix: `az identity federated-credential create \
             --name {} --identity-name {} --resource-group {} --subscription {} --issuer \
             {issuer} --subject {subject} --audiences {}`",
            workload.cluster,
            credential_name(workload),
            workload.name,
            workload.resource_group,
            workload.subscription,
            workload.audience
        ),
    };
    finding(workload, FindingKind::IssuerMismatch, message)
}

/// Explains an issuer that differs only in a way people miss.
fn near_miss(issuer: &str, credentials: &[&FederatedCredential]) -> &'static str {
    let bare = |text: &str| text.trim_end_matches('/').to_ascii_lowercase();
    if credentials.iter().any(|c| bare(&c.issuer) == bare(issuer)) {
        " (the issuers differ only in case or the trailing slash, and Entra compares them \
         exactly)"
    } else {
        ""
    }
}

fn describe(
    credentials: &[&FederatedCredential],
    detail: impl Fn(&FederatedCredential) -> String,
) -> String {
    credentials
        .iter()
        .map(|c| format!("credential {} {}", c.name, detail(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn az_update(workload: &WorkloadIdentity, credential: &str, change: &str) -> String {
    format!(
        "az identity federated-credential update --name {credential} --identity-name {} \
         --resource-group {} --subscription {} {change}",
        workload.name, workload.resource_group, workload.subscription
    )
}

/// Suggests a credential name: letters, digits, `-` and `_`, at most 120 characters, as
/// ARM allows for federated identity credentials.
fn credential_name(workload: &WorkloadIdentity) -> String {
    let raw = format!(
        "{}-{}-{}",
        workload.cluster.name, workload.namespace, workload.service_account
    );
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(120)
        .collect()
}

fn finding(workload: &WorkloadIdentity, kind: FindingKind, message: String) -> Finding {
    let message = match kind.aadsts_code() {
        Some(code) => format!("token exchange would fail with AADSTS{code}: {message}"),
        None => message,
    };
    Finding {
        cluster: workload.cluster.to_string(),
        identity: identity_ref(workload).to_string(),
        subject: workload.subject(),
        kind,
        aadsts: kind.aadsts_code(),
        message,
    }
}

fn read_failed(workload: &WorkloadIdentity, error: &ArmError) -> Finding {
    let fix = match error {
        ArmError::Status { status: 404, .. } => {
            "check the identity's subscription, resource group and name in the inventory"
        }
        ArmError::Status { status: 403, .. } => {
            "grant arcfleet's identity the Reader role on the managed identity"
        }
        _ => "run again later",
    };
    let message = format!(
        "cannot read the federated credentials of identity {} (inventory {}): {error}; {fix}",
        identity_ref(workload),
        workload.source
    );
    finding(workload, FindingKind::ReadFailed, message)
}

fn unresolved(workload: &WorkloadIdentity, reason: &str) -> Finding {
    let message = format!(
        "identity {} was not checked, because cluster {} has no issuer: {reason}",
        identity_ref(workload),
        workload.cluster
    );
    finding(workload, FindingKind::ClusterNotResolved, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{ClusterRef, Location, TOKEN_EXCHANGE_AUDIENCE};

    const ISSUER: &str = "https://eastus.oic.prod-arc.azure.com/t1/u1/";

    fn workload() -> WorkloadIdentity {
        WorkloadIdentity {
            cluster: ClusterRef {
                subscription: "s".into(),
                resource_group: "rg".into(),
                name: "line1".into(),
            },
            subscription: "s".into(),
            resource_group: "rg-id".into(),
            name: "sse-identity".into(),
            namespace: "azure-secret-store".into(),
            service_account: "secret-sync-controller".into(),
            audience: TOKEN_EXCHANGE_AUDIENCE.into(),
            source: Location {
                path: "plant.yaml".into(),
                line: 7,
            },
        }
    }

    fn credential(name: &str, issuer: &str, subject: &str, audience: &str) -> FederatedCredential {
        FederatedCredential {
            name: name.into(),
            issuer: issuer.into(),
            subject: subject.into(),
            audiences: vec![audience.into()],
        }
    }

    const SUBJECT: &str = "system:serviceaccount:azure-secret-store:secret-sync-controller";

    #[test]
    fn matching_credential_has_no_finding() {
        let list = [
            credential(
                "other",
                "https://x.example/",
                "system:serviceaccount:a:b",
                TOKEN_EXCHANGE_AUDIENCE,
            ),
            credential("sse", ISSUER, SUBJECT, TOKEN_EXCHANGE_AUDIENCE),
        ];
        assert_eq!(compare(&workload(), ISSUER, &list), None);
    }

    #[test]
    fn wrong_issuer_is_700211_with_update() {
        let list = [credential(
            "sse",
            "https://kubernetes.default.svc.cluster.local",
            SUBJECT,
            TOKEN_EXCHANGE_AUDIENCE,
        )];
        let finding = compare(&workload(), ISSUER, &list).unwrap();
        assert_eq!(finding.kind, FindingKind::IssuerMismatch);
        assert_eq!(finding.aadsts, Some(700211));
        assert!(
            finding
                .message
                .starts_with("token exchange would fail with AADSTS700211"),
            "{}",
            finding.message
        );
        assert!(
            finding.message.contains(&format!("federated-credential update --name sse --identity-name sse-identity --resource-group rg-id --subscription s --issuer {ISSUER}")),
            "{}",
            finding.message
        );
    }

    #[test]
    fn trailing_slash_difference_is_explained() {
        let list = [credential(
            "sse",
            ISSUER.trim_end_matches('/'),
            SUBJECT,
            TOKEN_EXCHANGE_AUDIENCE,
        )];
        let finding = compare(&workload(), ISSUER, &list).unwrap();
        assert!(
            finding.message.contains("trailing slash"),
            "{}",
            finding.message
        );
    }

    #[test]
    fn no_credential_suggests_create() {
        let finding = compare(&workload(), ISSUER, &[]).unwrap();
        assert_eq!(finding.kind, FindingKind::IssuerMismatch);
        assert!(finding.message.contains("federated-credential create --name line1-azure-secret-store-secret-sync-controller"), "{}", finding.message);
        assert!(
            finding.message.contains(&format!("--subject {SUBJECT}")),
            "{}",
            finding.message
        );
    }

    #[test]
    fn wrong_subject_is_700213() {
        let list = [credential(
            "sse",
            ISSUER,
            "system:serviceaccount:default:default",
            TOKEN_EXCHANGE_AUDIENCE,
        )];
        let finding = compare(&workload(), ISSUER, &list).unwrap();
        assert_eq!(finding.kind, FindingKind::SubjectMismatch);
        assert_eq!(finding.aadsts, Some(700213));
        assert!(
            finding
                .message
                .contains("subject system:serviceaccount:default:default"),
            "{}",
            finding.message
        );
        assert!(
            finding.message.contains(&format!("--subject {SUBJECT}")),
            "{}",
            finding.message
        );
    }

    #[test]
    fn wrong_audience_is_700212() {
        let list = [credential("sse", ISSUER, SUBJECT, "api://other")];
        let finding = compare(&workload(), ISSUER, &list).unwrap();
        assert_eq!(finding.kind, FindingKind::AudienceMismatch);
        assert_eq!(finding.aadsts, Some(700212));
        assert!(
            finding.message.contains("[api://other]"),
            "{}",
            finding.message
        );
        assert!(
            finding
                .message
                .contains("--audiences api://AzureADTokenExchange"),
            "{}",
            finding.message
        );
    }

    #[test]
    fn issuer_is_compared_exactly() {
        let upper = ISSUER.replace("eastus", "EastUS");
        let list = [credential("sse", &upper, SUBJECT, TOKEN_EXCHANGE_AUDIENCE)];
        assert_eq!(
            compare(&workload(), ISSUER, &list).map(|f| f.kind),
            Some(FindingKind::IssuerMismatch)
        );
    }

    #[test]
    fn read_failure_names_inventory_line() {
        let error = ArmError::Status {
            status: 404,
            code: "ResourceNotFound".into(),
            message: "not found".into(),
        };
        let finding = read_failed(&workload(), &error);
        assert_eq!(finding.kind, FindingKind::ReadFailed);
        assert!(
            finding.message.contains("plant.yaml:7"),
            "{}",
            finding.message
        );
        assert_eq!(finding.aadsts, None);
    }
}
