//! Checks on issuer URLs and endpoints before they are used.

use url::{Host, Url};

/// Checks an issuer URL from ARM before it is written to a node.
///
/// The issuer must be an absolute `https` URL with a host, and must contain only
/// characters RFC 3986 allows in a URL: no whitespace, quotes, backslashes or control
/// characters, and no comma, which kube-apiserver rejects. The string is never normalised, because Entra compares issuers byte for
/// byte.
pub fn validate(issuer: &str) -> Result<(), String> {
    if let Some(bad) = issuer.chars().find(|c| !is_url_char(*c)) {
        return Err(format!("it contains {bad:?}, which no issuer URL contains"));
    }
    if issuer.contains(',') {
        // kube-apiserver fails to start with "invalid character \",\" in URL".
        return Err("it contains ',', which kube-apiserver rejects in an issuer URL".to_owned());
    }
    let url = Url::parse(issuer).map_err(|error| format!("it is not a URL ({error})"))?;
    if url.scheme() != "https" {
        return Err(format!(
            "its scheme is `{}`, expected `https`",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("it has no host".to_owned());
    }
    if url.as_str() != issuer {
        return Err(format!(
            "it is not in canonical form (a parser reads it as {}), so it cannot be compared \
             exactly",
            url.as_str()
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("it has a query or fragment, which OIDC issuers must not have".to_owned());
    }
    Ok(())
}

/// Returns whether `c` may appear in a URL as RFC 3986 section 2 lists them.
fn is_url_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~:/?#[]@!$&()*+,;=%".contains(c)
}

/// Checks an Azure endpoint URL: `https`, or `http` only on a loopback address, where the
/// test emulator runs.
pub fn check_endpoint(name: &str, value: &str) -> Result<Url, String> {
    let url =
        Url::parse(value).map_err(|error| format!("{name} `{value}` is not a URL: {error}"))?;
    let loopback = match url.host() {
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        Some(Host::Domain(domain)) => domain == "localhost",
        None => false,
    };
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        scheme => Err(format!(
            "{name} `{value}` uses {scheme}: use https (plain http is allowed only on a \
             loopback address)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arc_issuer_is_accepted_verbatim() {
        assert!(
            validate("https://eastus.oic.prod-arc.azure.com/72f988bf-86f1/0c9a7f12-3b1e/").is_ok()
        );
    }

    #[test]
    fn bad_issuers_are_rejected() {
        for issuer in [
            "http://eastus.oic.prod-arc.azure.com/t/u/",
            "https://a.example/ x",
            "https://a.example/'x",
            "https://a.example/\"x",
            "https://a.example/\nx",
            "https://a.example/\\x",
            "https:///path",
            "ftp://a.example/",
            "not a url",
            "",
            "https://a.example/?q=1",
            "https://a.example/t/u,v/",
        ] {
            assert!(validate(issuer).is_err(), "{issuer:?}");
        }
    }

    #[test]
    fn endpoints_need_https_off_loopback() {
        assert!(check_endpoint("--arm-endpoint", "https://management.usgovcloudapi.net/").is_ok());
        assert!(check_endpoint("--arm-endpoint", "http://127.0.0.1:8080/").is_ok());
        assert!(check_endpoint("--arm-endpoint", "http://localhost:8080/").is_ok());
        assert!(check_endpoint("--arm-endpoint", "http://arm.example/").is_err());
        assert!(check_endpoint("--arm-endpoint", "management.azure.com").is_err());
    }
}
