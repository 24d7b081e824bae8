use std::collections::VecDeque;
use std::sync::Mutex as StdMutex;

use azure_core::headers::Headers;
use azure_core::{BytesStream, Response};

use super::*;

/// An HTTP client that records request bodies and returns canned responses in order.
#[derive(Debug, Default)]
struct CannedHttp {
    responses: StdMutex<VecDeque<(u16, String)>>,
    bodies: StdMutex<Vec<String>>,
    urls: StdMutex<Vec<String>>,
}

impl CannedHttp {
    fn new(responses: &[(u16, &str)]) -> Arc<Self> {
        Arc::new(CannedHttp {
            responses: StdMutex::new(
                responses
                    .iter()
                    .map(|(status, body)| (*status, (*body).to_owned()))
                    .collect(),
            ),
            ..CannedHttp::default()
        })
    }

    fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl HttpClient for CannedHttp {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<Response> {
        let body = match request.body() {
            azure_core::Body::Bytes(bytes) => String::from_utf8(bytes.to_vec()).unwrap(),
            _ => panic!("token requests have a bytes body"),
        };
        self.bodies.lock().unwrap().push(body);
        self.urls.lock().unwrap().push(request.url().to_string());
        let (status, body) = self
            .responses
            .lock()
            .unwrap()
            .pop_front()
            .expect("a canned response for every request");
        let status = StatusCode::try_from(status).unwrap();
        Ok(Response::new(
            status,
            Headers::new(),
            Box::pin(BytesStream::new(body.into_bytes())),
        ))
    }
}

const TOKEN_OK: &str =
    r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"at-1"}"#;
const SECRET: &str = "abc8Q~not-a-real-secret-value";

fn authority() -> Url {
    Url::parse("http://127.0.0.1:9/").unwrap()
}

fn secret_credential(http: Arc<CannedHttp>) -> EntraCredential {
    EntraCredential::client_secret(
        http,
        &authority(),
        "tenant-1".into(),
        "app-1".into(),
        SECRET.into(),
    )
    .unwrap()
}

fn form(body: &str) -> HashMap<String, String> {
    url::form_urlencoded::parse(body.as_bytes())
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

#[tokio::test]
async fn client_secret_request_has_oauth_fields() {
    let http = CannedHttp::new(&[(200, TOKEN_OK)]);
    let credential = secret_credential(http.clone());
    let token = credential
        .get_token(&["https://management.azure.com/.default"])
        .await
        .unwrap();
    assert_eq!(token.token.secret(), "at-1");
    let sent = form(&http.bodies()[0]);
    assert_eq!(sent["grant_type"], "client_credentials");
    assert_eq!(sent["client_id"], "app-1");
    assert_eq!(sent["client_secret"], SECRET);
    assert_eq!(sent["scope"], "https://management.azure.com/.default");
    assert_eq!(
        http.urls.lock().unwrap()[0],
        "http://127.0.0.1:9/tenant-1/oauth2/v2.0/token"
    );
}

#[tokio::test]
async fn token_is_cached_per_scope() {
    let http = CannedHttp::new(&[(200, TOKEN_OK), (200, TOKEN_OK)]);
    let credential = secret_credential(http.clone());
    credential.get_token(&["a/.default"]).await.unwrap();
    credential.get_token(&["a/.default"]).await.unwrap();
    assert_eq!(http.bodies().len(), 1, "second call served from the cache");
    credential.get_token(&["b/.default"]).await.unwrap();
    assert_eq!(http.bodies().len(), 2, "another scope needs its own token");
}

#[tokio::test]
async fn cleared_cache_requests_again() {
    let http = CannedHttp::new(&[(200, TOKEN_OK), (200, TOKEN_OK)]);
    let credential = secret_credential(http.clone());
    credential.get_token(&["a/.default"]).await.unwrap();
    credential.clear_cache().await.unwrap();
    credential.get_token(&["a/.default"]).await.unwrap();
    assert_eq!(http.bodies().len(), 2);
}

#[tokio::test]
async fn invalid_secret_shows_code_and_fix() {
    let body = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app 'app-1'.\r\nTrace ID: t-1\r\nCorrelation ID: c-1\r\nTimestamp: 2026-01-01 00:00:00Z","error_codes":[7000215],"timestamp":"2026-01-01 00:00:00Z","trace_id":"t-1","correlation_id":"c-1","error_uri":"https://login.microsoftonline.com/error?code=7000215"}"#;
    let http = CannedHttp::new(&[(401, body)]);
    let credential = secret_credential(http);
    let error = credential.get_token(&["a/.default"]).await.unwrap_err();
    let message = crate::azure::arm::error_chain(&error);
    assert!(
        message.contains("AADSTS7000215: Invalid client secret provided"),
        "{message}"
    );
    assert!(message.contains("not its secret ID"), "{message}");
    assert!(message.contains("HTTP 401 invalid_client"), "{message}");
    assert!(
        message.contains("trace ID t-1, correlation ID c-1"),
        "{message}"
    );
    assert!(!message.contains("Timestamp"), "{message}");
    assert!(
        !message.contains(SECRET),
        "no secret in the error: {message}"
    );
    assert_eq!(error.kind(), &ErrorKind::Credential);
}

#[tokio::test]
async fn description_without_prefix_gets_code() {
    let body = r#"{"error":"invalid_request","error_description":"Tenant 'x' not found.","error_codes":[90002]}"#;
    let http = CannedHttp::new(&[(400, body)]);
    let error = secret_credential(http)
        .token(&["a/.default"])
        .await
        .unwrap_err();
    assert_eq!(error.codes(), &[90002]);
    let message = error.to_string();
    assert!(
        message.contains("AADSTS90002: Tenant 'x' not found."),
        "{message}"
    );
    assert!(message.contains("--cloud"), "{message}");
}

#[tokio::test]
async fn non_entra_error_body_is_reported() {
    let http = CannedHttp::new(&[(502, "<html>bad gateway</html>")]);
    let error = secret_credential(http)
        .token(&["a/.default"])
        .await
        .unwrap_err();
    assert!(
        matches!(error, TokenError::UnexpectedResponse { status: 502, .. }),
        "{error}"
    );
}

#[tokio::test]
async fn success_without_token_is_malformed() {
    let http = CannedHttp::new(&[(200, r#"{"token_type":"Bearer","expires_in":10}"#)]);
    let error = secret_credential(http)
        .token(&["a/.default"])
        .await
        .unwrap_err();
    assert!(error.to_string().contains("access_token"), "{error}");
}

#[tokio::test]
async fn string_expires_in_is_accepted() {
    let http = CannedHttp::new(&[(200, r#"{"expires_in":"3600","access_token":"at-2"}"#)]);
    let token = secret_credential(http)
        .token(&["a/.default"])
        .await
        .unwrap();
    assert_eq!(token.token.secret(), "at-2");
}

#[tokio::test]
async fn workload_identity_rereads_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "first.jwt.value\n").unwrap();
    // A zero lifetime makes every call request a new token.
    let expiring = r#"{"expires_in":0,"access_token":"at"}"#;
    let http = CannedHttp::new(&[(200, expiring), (200, expiring)]);
    let credential = EntraCredential::workload_identity(
        http.clone(),
        &authority(),
        "tenant-1".into(),
        "app-1".into(),
        file.clone(),
    )
    .unwrap();
    credential.get_token(&["a/.default"]).await.unwrap();
    std::fs::write(&file, "second.jwt.value").unwrap();
    credential.get_token(&["a/.default"]).await.unwrap();

    let bodies = http.bodies();
    assert_eq!(bodies.len(), 2);
    let first = form(&bodies[0]);
    let second = form(&bodies[1]);
    assert_eq!(first["client_assertion"], "first.jwt.value");
    assert_eq!(second["client_assertion"], "second.jwt.value");
    assert_eq!(first["client_assertion_type"], JWT_BEARER);
    assert!(!first.contains_key("client_secret"));
}

#[tokio::test]
async fn missing_token_file_names_path() {
    let http = CannedHttp::new(&[]);
    let credential = EntraCredential::workload_identity(
        http.clone(),
        &authority(),
        "t".into(),
        "c".into(),
        PathBuf::from("/nonexistent/token"),
    )
    .unwrap();
    let error = credential.token(&["a/.default"]).await.unwrap_err();
    assert!(error.to_string().contains("/nonexistent/token"), "{error}");
    assert!(
        http.bodies().is_empty(),
        "nothing sent without an assertion"
    );
}

#[tokio::test]
async fn empty_token_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "\n").unwrap();
    let credential = EntraCredential::workload_identity(
        CannedHttp::new(&[]),
        &authority(),
        "t".into(),
        "c".into(),
        file,
    )
    .unwrap();
    let error = credential.token(&["a/.default"]).await.unwrap_err();
    assert!(
        matches!(error, TokenError::EmptyTokenFile { .. }),
        "{error}"
    );
}

#[test]
fn token_url_keeps_authority_path() {
    let base = Url::parse("https://login.example/prefix").unwrap();
    assert_eq!(
        token_url(&base, "t1").unwrap().as_str(),
        "https://login.example/prefix/t1/oauth2/v2.0/token"
    );
}

#[test]
fn federation_codes_have_hints() {
    for code in [
        90002, 700016, 7000215, 7000222, 700211, 700212, 700213, 700024, 70021, 50027,
    ] {
        assert!(hint(code).is_some(), "AADSTS{code}");
    }
    assert!(hint(70021).unwrap().contains("retry later"));
    assert!(hint(700024).unwrap().contains("stale"));
    assert!(hint(1).is_none());
}

#[test]
fn debug_output_hides_secret() {
    let credential = secret_credential(CannedHttp::new(&[]));
    let text = format!("{credential:?}");
    assert!(!text.contains(SECRET), "{text}");
    assert!(text.contains("app-1"), "{text}");
}
