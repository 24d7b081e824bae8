//! The signing keys an Arc OIDC issuer publishes, fetched the way Entra fetches them: the
//! discovery document at `<issuer>.well-known/openid-configuration`, then its `jwks_uri`.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Mutex;

/// Bound on each discovery or key-set request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Key IDs per issuer, fetched once per run.
#[derive(Default)]
pub struct IssuerKeys {
    cache: Mutex<HashMap<String, Result<Vec<String>, String>>>,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct KeySet {
    #[serde(default)]
    keys: Vec<Key>,
}

#[derive(Deserialize)]
struct Key {
    #[serde(default)]
    kid: Option<String>,
}

impl IssuerKeys {
    /// Returns the key IDs `issuer` publishes, or why they could not be read.
    pub async fn key_ids(&self, issuer: &str) -> Result<Vec<String>, String> {
        let mut cache = self.cache.lock().await;
        if let Some(result) = cache.get(issuer) {
            return result.clone();
        }
        let result = fetch(issuer).await;
        match &result {
            Ok(kids) => {
                tracing::debug!(issuer, keys = kids.len(), "read the issuer's signing keys")
            }
            Err(error) => tracing::warn!(issuer, "cannot read the issuer's signing keys: {error}"),
        }
        cache.insert(issuer.to_owned(), result.clone());
        result
    }
}

async fn fetch(issuer: &str) -> Result<Vec<String>, String> {
    let client = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let discovery_url = format!("{issuer}.well-known/openid-configuration");
    let discovery: Discovery = get_json(&client, &discovery_url).await?;
    if discovery.issuer != issuer {
        return Err(format!(
            "{discovery_url} names issuer {}, not {issuer}, so Entra would reject its tokens",
            discovery.issuer
        ));
    }
    let keys: KeySet = get_json(&client, &discovery.jwks_uri).await?;
    Ok(keys.keys.into_iter().filter_map(|key| key.kid).collect())
}

async fn get_json<T: for<'de> Deserialize<'de>>(
    client: &reqwest::Client,
    url: &str,
) -> Result<T, String> {
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url} failed: {}", error_chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("GET {url} returned {status}"));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("GET {url} failed while reading the body: {e}"))?;
    serde_json::from_slice(&body)
        .map_err(|e| format!("GET {url} returned an unreadable document: {e}"))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        text.push_str(": ");
        text.push_str(&next.to_string());
        source = next.source();
    }
    text
}

/// The parts of a service-account token arcfleet checks.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenClaims {
    /// The `iss` claim.
    pub issuer: String,
    /// The `kid` header.
    pub key_id: String,
    /// The `aud` claim's values.
    pub audiences: Vec<String>,
}

/// Decodes a JWT's header and payload without verifying the signature; the caller
/// compares the key ID with the issuer's published keys instead.
pub fn decode_token(token: &str) -> Result<TokenClaims, String> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let mut parts = token.trim().split('.');
    let (Some(header), Some(payload), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("the token is not a JWT (three dot-separated parts)".to_owned());
    };
    let decode = |part: &str| -> Result<serde_json::Value, String> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .map_err(|_| "the token is not base64url-encoded".to_owned())?;
        serde_json::from_slice(&bytes).map_err(|_| "the token's parts are not JSON".to_owned())
    };
    let header = decode(header)?;
    let payload = decode(payload)?;
    let audiences = match &payload["aud"] {
        serde_json::Value::String(aud) => vec![aud.clone()],
        serde_json::Value::Array(values) => values
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    Ok(TokenClaims {
        issuer: payload["iss"].as_str().unwrap_or_default().to_owned(),
        key_id: header["kid"].as_str().unwrap_or_default().to_owned(),
        audiences,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    #[test]
    fn token_claims_decode() {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k1"}"#);
        let payload =
            URL_SAFE_NO_PAD.encode(r#"{"iss":"https://a/","aud":["api://AzureADTokenExchange"]}"#);
        let claims = decode_token(&format!("{header}.{payload}.sig\n")).unwrap();
        assert_eq!(claims.issuer, "https://a/");
        assert_eq!(claims.key_id, "k1");
        assert_eq!(claims.audiences, vec!["api://AzureADTokenExchange"]);
    }

    #[test]
    fn garbage_is_not_a_token() {
        assert!(decode_token("not a token").is_err());
        assert!(decode_token("a.b.c").is_err());
    }
}
