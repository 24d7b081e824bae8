//! Azure clouds and the endpoints a run uses in them.
//!
//! `--cloud` picks the Resource Manager endpoint, the Entra authority host and the token
//! scope together. An explicit `--arm-endpoint` (or `ARCFLEET_ARM_ENDPOINT`) replaces the
//! cloud's ARM endpoint and with it the scope, and `AZURE_AUTHORITY_HOST` replaces the
//! cloud's authority host. Everything else follows the cloud.

use url::Url;

use super::issuer::check_endpoint;

/// An Azure cloud, named as the Azure CLI names it (`az cloud list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Cloud {
    /// The public cloud.
    #[default]
    #[value(name = "AzureCloud")]
    AzureCloud,
    /// Azure Government (US).
    #[value(name = "AzureUSGovernment")]
    AzureUSGovernment,
    /// Azure operated by 21Vianet (China).
    #[value(name = "AzureChinaCloud")]
    AzureChinaCloud,
}

impl Cloud {
    /// Returns the Resource Manager endpoint of the cloud.
    pub fn arm_endpoint(self) -> &'static str {
        match self {
            Cloud::AzureCloud => "https://management.azure.com/",
            Cloud::AzureUSGovernment => "https://management.usgovcloudapi.net/",
            Cloud::AzureChinaCloud => "https://management.chinacloudapi.cn/",
        }
    }

    /// Returns the Microsoft Entra authority host of the cloud.
    pub fn authority_host(self) -> &'static str {
        match self {
            Cloud::AzureCloud => "https://login.microsoftonline.com/",
            Cloud::AzureUSGovernment => "https://login.microsoftonline.us/",
            Cloud::AzureChinaCloud => "https://login.chinacloudapi.cn/",
        }
    }

    /// Returns the name `--cloud` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Cloud::AzureCloud => "AzureCloud",
            Cloud::AzureUSGovernment => "AzureUSGovernment",
            Cloud::AzureChinaCloud => "AzureChinaCloud",
        }
    }
}

/// The endpoints of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Resource Manager endpoint, ending in `/`.
    pub arm: Url,
    /// Entra authority host, ending in `/`.
    pub authority: Url,
    /// OAuth scope of ARM tokens: the ARM endpoint followed by `.default`.
    pub scope: String,
}

/// Combines a cloud with the explicit overrides. Empty overrides count as not given.
pub fn endpoints(
    cloud: Cloud,
    arm_override: Option<&str>,
    authority_override: Option<&str>,
) -> Result<Endpoints, String> {
    fn given(value: Option<&str>) -> Option<&str> {
        value.filter(|text| !text.is_empty())
    }
    let arm_text = given(arm_override).unwrap_or(cloud.arm_endpoint());
    let authority_text = given(authority_override).unwrap_or(cloud.authority_host());
    let arm = with_trailing_slash(check_endpoint("--arm-endpoint", arm_text)?);
    let authority = with_trailing_slash(check_endpoint("AZURE_AUTHORITY_HOST", authority_text)?);
    // ARM accepts tokens issued for its own URL, which for the three clouds is the ARM
    // resource ID the Azure CLI requests too.
    let scope = format!("{arm}.default");
    Ok(Endpoints {
        arm,
        authority,
        scope,
    })
}

fn with_trailing_slash(mut url: Url) -> Url {
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clouds_set_all_three_endpoints() {
        let cases = [
            (
                Cloud::AzureCloud,
                "https://management.azure.com/",
                "https://login.microsoftonline.com/",
            ),
            (
                Cloud::AzureUSGovernment,
                "https://management.usgovcloudapi.net/",
                "https://login.microsoftonline.us/",
            ),
            (
                Cloud::AzureChinaCloud,
                "https://management.chinacloudapi.cn/",
                "https://login.chinacloudapi.cn/",
            ),
        ];
        for (cloud, arm, authority) in cases {
            let endpoints = endpoints(cloud, None, None).unwrap();
            assert_eq!(endpoints.arm.as_str(), arm, "{cloud:?}");
            assert_eq!(endpoints.authority.as_str(), authority, "{cloud:?}");
            assert_eq!(endpoints.scope, format!("{arm}.default"), "{cloud:?}");
        }
    }

    #[test]
    fn overrides_replace_cloud_endpoints() {
        let endpoints = endpoints(
            Cloud::AzureUSGovernment,
            Some("http://127.0.0.1:8080"),
            Some("http://127.0.0.1:8081/"),
        )
        .unwrap();
        assert_eq!(endpoints.arm.as_str(), "http://127.0.0.1:8080/");
        assert_eq!(endpoints.authority.as_str(), "http://127.0.0.1:8081/");
        assert_eq!(endpoints.scope, "http://127.0.0.1:8080/.default");
    }

    #[test]
    fn empty_overrides_keep_cloud() {
        let endpoints = endpoints(Cloud::AzureChinaCloud, Some(""), Some("")).unwrap();
        assert_eq!(
            endpoints.arm.as_str(),
            Cloud::AzureChinaCloud.arm_endpoint()
        );
        assert_eq!(
            endpoints.authority.as_str(),
            Cloud::AzureChinaCloud.authority_host()
        );
    }

    #[test]
    fn plain_http_override_off_loopback_is_rejected() {
        let error = endpoints(Cloud::AzureCloud, Some("http://arm.example/"), None).unwrap_err();
        assert!(error.contains("--arm-endpoint"), "{error}");
    }
}
