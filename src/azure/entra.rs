//! Token credentials for Microsoft Entra ID's client credentials grant, proved with a
//! client secret or with a federated assertion (workload identity).
//!
//! arcfleet has its own implementations instead of azure_identity 0.21's, for two reasons:
//!
//! - azure_identity's `WorkloadIdentityCredential` reads the federated token once, when it
//!   is created. A projected service-account token rotates (hourly by default), so a long
//!   run would send an expired assertion and fail with AADSTS700024. This credential reads
//!   `AZURE_FEDERATED_TOKEN_FILE` again for every request to the token endpoint.
//! - azure_identity's error text drops Entra's error body ("Server returned error
//!   response"). These credentials parse `error`, `error_description` and `error_codes` and
//!   add what to do about the AADSTS code.
//!
//! Tokens are cached per scope until shortly before they expire. No error or log line
//! contains the secret, the assertion or a token.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_core::auth::{AccessToken, Secret, TokenCredential};
use azure_core::error::ErrorKind;
use azure_core::{headers, HttpClient, Method, Request, StatusCode, Url};
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::Mutex;

/// Assertion type of a federated client assertion (RFC 7523).
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A cached token is renewed when less than this much of its lifetime remains, or half of
/// the lifetime for tokens that live less than twice as long.
const RENEW_MARGIN: Duration = Duration::from_secs(300);

/// The proof of the application's identity sent to the token endpoint.
enum ClientProof {
    /// `client_secret`, the secret's value.
    Secret(Secret),
    /// `client_assertion`, read from this file for every token request.
    AssertionFile(PathBuf),
}

/// An Entra application that gets ARM tokens with the client credentials grant.
pub struct EntraCredential {
    http: Arc<dyn HttpClient>,
    token_url: Url,
    tenant_id: String,
    client_id: String,
    proof: ClientProof,
    /// Cached tokens by space-joined scopes. The lock is held while a token is fetched, so
    /// concurrent ARM requests wait for one token request instead of sending one each.
    cache: Mutex<HashMap<String, CachedToken>>,
}

struct CachedToken {
    token: AccessToken,
    renew_at: Instant,
}

impl fmt::Debug for EntraCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proof = match &self.proof {
            ClientProof::Secret(_) => "client secret".to_owned(),
            ClientProof::AssertionFile(path) => format!("assertion file {}", path.display()),
        };
        f.debug_struct("EntraCredential")
            .field("token_url", &self.token_url.as_str())
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field("proof", &proof)
            .finish()
    }
}

/// A token request that failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The federated token file could not be read.
    #[error(
        "cannot read AZURE_FEDERATED_TOKEN_FILE {}: {source}: check that the projected \
         service-account token is mounted there",
        path.display()
    )]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The federated token file is empty.
    #[error(
        "AZURE_FEDERATED_TOKEN_FILE {} is empty: it must contain the service-account token \
         (a JWT)",
        path.display()
    )]
    EmptyTokenFile {
        /// The file.
        path: PathBuf,
    },
    /// Entra ID returned an error body.
    #[error("{}", rejection_message(.0))]
    Rejected(Box<Rejection>),
    /// The token endpoint returned an error without an Entra error body.
    #[error(
        "the token endpoint {url} returned HTTP {status} with a body that is not an Entra error"
    )]
    UnexpectedResponse {
        /// The token endpoint.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// A success response without a usable token.
    #[error(
        "the token endpoint {url} returned a success response without an access token: {reason}"
    )]
    MalformedToken {
        /// The token endpoint.
        url: String,
        /// The missing or invalid part.
        reason: String,
    },
    /// The request did not reach the token endpoint.
    #[error("cannot reach the token endpoint {url}: {source}")]
    Transport {
        /// The token endpoint.
        url: String,
        /// The transport error.
        source: azure_core::Error,
    },
}

/// The fields of an Entra error response, and the application and tenant of the request.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// HTTP status.
    pub status: u16,
    /// OAuth error (`invalid_client`, `unauthorized_client`, ...).
    pub error: String,
    /// AADSTS codes from `error_codes`.
    pub codes: Vec<u32>,
    /// The first line of `error_description`, which starts with `AADSTS<code>:`.
    pub description: String,
    /// `trace_id`, for Microsoft support.
    pub trace_id: Option<String>,
    /// `correlation_id`, for Microsoft support.
    pub correlation_id: Option<String>,
    /// The application of the request.
    pub client_id: String,
    /// The tenant of the request.
    pub tenant_id: String,
}

impl TokenError {
    /// Returns the AADSTS codes of an Entra rejection; empty for other errors.
    pub fn codes(&self) -> &[u32] {
        match self {
            TokenError::Rejected(rejection) => &rejection.codes,
            _ => &[],
        }
    }
}

fn rejection_message(rejection: &Rejection) -> String {
    let mut message = format!(
        "Microsoft Entra ID rejected the token request of client {} in tenant {} (HTTP {} {}): {}",
        rejection.client_id,
        rejection.tenant_id,
        rejection.status,
        rejection.error,
        rejection.description
    );
    if let Some(hint) = rejection.codes.iter().find_map(|code| hint(*code)) {
        message.push_str(". Fix: ");
        message.push_str(hint);
    }
    let ids: Vec<String> = [
        ("trace ID", &rejection.trace_id),
        ("correlation ID", &rejection.correlation_id),
    ]
    .into_iter()
    .filter_map(|(name, value)| value.as_ref().map(|value| format!("{name} {value}")))
    .collect();
    if !ids.is_empty() {
        message.push_str(&format!(" ({})", ids.join(", ")));
    }
    message
}

/// Returns what to do about an AADSTS code, for the codes a client credentials grant meets.
pub fn hint(code: u32) -> Option<&'static str> {
    Some(match code {
        90002 => {
            "the tenant does not exist in this cloud: check AZURE_TENANT_ID and that --cloud \
             names the cloud the tenant is in"
        }
        700016 => {
            "no application with AZURE_CLIENT_ID exists in the tenant: check AZURE_CLIENT_ID \
             and AZURE_TENANT_ID, and that the app registration was not deleted"
        }
        7000215 => {
            "check that AZURE_CLIENT_SECRET holds the client secret's value, not its secret \
             ID; the value is shown only once, when the secret is created"
        }
        7000222 => "the client secret has expired: create a new one and set AZURE_CLIENT_SECRET",
        7000218 => {
            "the request carried neither a client secret nor an assertion: set \
             AZURE_CLIENT_SECRET or AZURE_FEDERATED_TOKEN_FILE"
        }
        700211 => {
            "no federated identity credential of the app trusts the issuer of the token in \
             AZURE_FEDERATED_TOKEN_FILE: set the credential's issuer to the token's `iss` \
             claim exactly, trailing slash included"
        }
        700212 => {
            "no federated identity credential of the app accepts the token's audience: set \
             the credential's audience to the token's `aud` claim (usually \
             api://AzureADTokenExchange)"
        }
        700213 => {
            "no federated identity credential of the app matches the token's subject: set the \
             credential's subject to the token's `sub` claim \
             (system:serviceaccount:<namespace>:<name>)"
        }
        700024 => {
            "the assertion in AZURE_FEDERATED_TOKEN_FILE has expired, so the file is stale: \
             check that the kubelet still refreshes the projected token"
        }
        70021 => {
            "no federated identity credential matches the assertion; a credential created in \
             the last few minutes may not have propagated yet, so retry later, otherwise check \
             its issuer, subject and audience"
        }
        50027 => "AZURE_FEDERATED_TOKEN_FILE does not contain a valid JWT",
        500011 | 1002012 => {
            "the token scope names no resource in this tenant: check --cloud and --arm-endpoint"
        }
        53003 => "Conditional Access blocked the request: ask the tenant's administrator",
        _ => return None,
    })
}

impl EntraCredential {
    /// Creates a credential that proves the application with a client secret.
    pub fn client_secret(
        http: Arc<dyn HttpClient>,
        authority_host: &Url,
        tenant_id: String,
        client_id: String,
        secret: String,
    ) -> Result<Self, url::ParseError> {
        Self::new(
            http,
            authority_host,
            tenant_id,
            client_id,
            ClientProof::Secret(Secret::new(secret)),
        )
    }

    /// Creates a credential that proves the application with the federated token in
    /// `token_file`, read again for every token request.
    pub fn workload_identity(
        http: Arc<dyn HttpClient>,
        authority_host: &Url,
        tenant_id: String,
        client_id: String,
        token_file: PathBuf,
    ) -> Result<Self, url::ParseError> {
        Self::new(
            http,
            authority_host,
            tenant_id,
            client_id,
            ClientProof::AssertionFile(token_file),
        )
    }

    fn new(
        http: Arc<dyn HttpClient>,
        authority_host: &Url,
        tenant_id: String,
        client_id: String,
        proof: ClientProof,
    ) -> Result<Self, url::ParseError> {
        let token_url = token_url(authority_host, &tenant_id)?;
        Ok(EntraCredential {
            http,
            token_url,
            tenant_id,
            client_id,
            proof,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Returns a cached token for `scopes`, or requests a new one.
    async fn token(&self, scopes: &[&str]) -> Result<AccessToken, TokenError> {
        let key = scopes.join(" ");
        let mut cache = self.cache.lock().await;
        if let Some(cached) = cache.get(&key) {
            if Instant::now() < cached.renew_at {
                return Ok(cached.token.clone());
            }
        }
        let (token, lifetime) = self.request_token(&key).await?;
        let margin = RENEW_MARGIN.min(lifetime / 2);
        let renew_at = Instant::now() + lifetime.saturating_sub(margin);
        cache.insert(
            key,
            CachedToken {
                token: token.clone(),
                renew_at,
            },
        );
        Ok(token)
    }

    /// Sends one token request and returns the token and its lifetime.
    async fn request_token(&self, scope: &str) -> Result<(AccessToken, Duration), TokenError> {
        let body = self.form(scope)?;
        let mut request = Request::new(self.token_url.clone(), Method::Post);
        request.insert_header(
            headers::CONTENT_TYPE,
            azure_core::content_type::APPLICATION_X_WWW_FORM_URLENCODED,
        );
        request.set_body(body);

        tracing::debug!(tenant = %self.tenant_id, client = %self.client_id, scope, "requesting a token");
        let transport = |source| TokenError::Transport {
            url: self.token_url.to_string(),
            source,
        };
        let response = self
            .http
            .execute_request(&request)
            .await
            .map_err(transport)?;
        let (status, _headers, body) = response.deconstruct();
        let body = body.collect().await.map_err(transport)?;
        if status.is_success() {
            parse_token(&body).map_err(|reason| TokenError::MalformedToken {
                url: self.token_url.to_string(),
                reason,
            })
        } else {
            Err(self.rejection(status, &body))
        }
    }

    /// Returns the form body of a token request, reading the assertion file when the
    /// application proves itself with one.
    fn form(&self, scope: &str) -> Result<String, TokenError> {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("client_id", &self.client_id)
            .append_pair("scope", scope)
            .append_pair("grant_type", "client_credentials");
        match &self.proof {
            ClientProof::Secret(secret) => {
                form.append_pair("client_secret", secret.secret());
            }
            ClientProof::AssertionFile(path) => {
                let assertion = read_assertion(path)?;
                form.append_pair("client_assertion_type", JWT_BEARER)
                    .append_pair("client_assertion", &assertion);
            }
        }
        Ok(form.finish())
    }

    fn rejection(&self, status: StatusCode, body: &[u8]) -> TokenError {
        let status = u16::from(status);
        match parse_rejection(body) {
            Some(fields) => TokenError::Rejected(Box::new(Rejection {
                status,
                client_id: self.client_id.clone(),
                tenant_id: self.tenant_id.clone(),
                ..fields
            })),
            None => TokenError::UnexpectedResponse {
                url: self.token_url.to_string(),
                status,
            },
        }
    }
}

#[async_trait::async_trait]
impl TokenCredential for EntraCredential {
    async fn get_token(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        self.token(scopes).await.map_err(|error| {
            tracing::debug!(client = %self.client_id, "token request failed: {error}");
            azure_core::Error::new(ErrorKind::Credential, error)
        })
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        self.cache.lock().await.clear();
        Ok(())
    }
}

/// Returns `{authority}/{tenant}/oauth2/v2.0/token`, keeping a path the authority host has.
fn token_url(authority_host: &Url, tenant_id: &str) -> Result<Url, url::ParseError> {
    let mut base = authority_host.clone();
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    let tenant: String = url::form_urlencoded::byte_serialize(tenant_id.as_bytes()).collect();
    base.join(&format!("{tenant}/oauth2/v2.0/token"))
}

fn read_assertion(path: &Path) -> Result<String, TokenError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenError::TokenFile {
        path: path.to_owned(),
        source,
    })?;
    let assertion = text.trim();
    if assertion.is_empty() {
        return Err(TokenError::EmptyTokenFile {
            path: path.to_owned(),
        });
    }
    Ok(assertion.to_owned())
}

/// The success body of the token endpoint. `expires_in` is a number from Entra ID and a
/// string from some older endpoints, so both are read.
#[derive(Deserialize)]
struct TokenBody {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
}

fn parse_token(body: &[u8]) -> Result<(AccessToken, Duration), String> {
    let parsed: TokenBody =
        serde_json::from_slice(body).map_err(|error| format!("the body is not JSON ({error})"))?;
    let token = parsed
        .access_token
        .filter(|token| !token.is_empty())
        .ok_or("`access_token` is missing")?;
    let seconds = match parsed.expires_in {
        Some(serde_json::Value::Number(number)) => number.as_u64(),
        Some(serde_json::Value::String(text)) => text.parse().ok(),
        _ => None,
    }
    .ok_or("`expires_in` is missing or not a number")?;
    let lifetime = Duration::from_secs(seconds);
    let expires_on = OffsetDateTime::now_utc() + lifetime;
    Ok((AccessToken::new(token, expires_on), lifetime))
}

/// The error body of the token endpoint.
#[derive(Deserialize)]
struct ErrorBody {
    error: Option<String>,
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Vec<u32>,
    trace_id: Option<String>,
    correlation_id: Option<String>,
}

/// Parses an Entra error body; `None` when the body is not one. The status, client and
/// tenant are left empty for the caller to fill in.
fn parse_rejection(body: &[u8]) -> Option<Rejection> {
    let parsed: ErrorBody = serde_json::from_slice(body).ok()?;
    let error = parsed.error?;
    let full = parsed.error_description.unwrap_or_default();
    // Entra appends "Trace ID", "Correlation ID" and "Timestamp" lines. The IDs are kept
    // from their own fields.
    let mut description = full.lines().next().unwrap_or("").trim().to_owned();
    let codes = parsed.error_codes;
    if let Some(code) = codes.first() {
        if !description.starts_with("AADSTS") {
            description = format!("AADSTS{code}: {description}");
        }
    }
    if description.is_empty() {
        description = "no description".to_owned();
    }
    Some(Rejection {
        status: 0,
        error,
        codes,
        description,
        trace_id: parsed.trace_id,
        correlation_id: parsed.correlation_id,
        client_id: String::new(),
        tenant_id: String::new(),
    })
}

#[cfg(test)]
mod tests;
