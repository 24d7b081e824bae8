//! Choosing an Azure credential without ever probing the instance metadata address unless
//! the user asks for managed identity.
//!
//! Client secrets and workload identity use arcfleet's own [`EntraCredential`], which
//! re-reads the federated token file for every token request and reports Entra's AADSTS
//! codes. The Azure CLI and managed identity use azure_identity's credentials.

use std::path::PathBuf;
use std::sync::Arc;

use azure_core::auth::TokenCredential;
use azure_core::Url;
use azure_identity::{
    AzureCliCredential, TokenCredentialOptions, VirtualMachineManagedIdentityCredential,
};

use super::entra::EntraCredential;

/// Which credential to use, as `--azure-auth` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMethod {
    /// The first configured of client secret, workload identity and Azure CLI.
    Auto,
    /// AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET.
    ClientSecret,
    /// AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_FEDERATED_TOKEN_FILE.
    WorkloadIdentity,
    /// The signed-in Azure CLI (`az account get-access-token`).
    Cli,
    /// The managed identity of the machine arcfleet runs on (instance metadata service).
    ManagedIdentity,
}

/// A credential that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// No credential source is configured.
    #[error(
        "no Azure credential is configured: set AZURE_TENANT_ID, AZURE_CLIENT_ID and \
         AZURE_CLIENT_SECRET (or AZURE_FEDERATED_TOKEN_FILE), sign in with `az login`, or \
         pass --azure-auth managed-identity on an Azure machine"
    )]
    NoneConfigured,
    /// A variable the chosen method needs is missing.
    #[error("--azure-auth {method} needs the environment variable {variable}")]
    MissingVariable {
        /// The method.
        method: &'static str,
        /// The missing variable.
        variable: &'static str,
    },
    /// The federated token file could not be read.
    #[error("cannot read AZURE_FEDERATED_TOKEN_FILE {path}: {source}")]
    TokenFile {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The authority host and tenant form no token endpoint URL.
    #[error("AZURE_AUTHORITY_HOST {authority} and tenant {tenant} form no token URL: {source}")]
    TokenUrl {
        /// The authority host.
        authority: String,
        /// The tenant ID.
        tenant: String,
        /// The parse error.
        source: url::ParseError,
    },
}

/// The credential in use and a name for logs.
pub struct Chosen {
    /// The credential.
    pub credential: Arc<dyn TokenCredential>,
    /// The method name, for logs and errors.
    pub name: &'static str,
}

/// Reads the environment through a function, so tests can supply their own.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Builds the credential for `method`. `authority_host` is the Entra endpoint (public
/// cloud, a sovereign cloud or the test emulator).
pub fn choose(
    method: AuthMethod,
    authority_host: &Url,
    env: Env<'_>,
) -> Result<Chosen, CredentialError> {
    let var = |name: &str| env(name).filter(|value| !value.is_empty());
    let http = azure_core::new_http_client();
    let require = |method: &'static str, variable: &'static str| {
        var(variable).ok_or(CredentialError::MissingVariable { method, variable })
    };
    let url_error = |tenant: &str| {
        let tenant = tenant.to_owned();
        move |source| CredentialError::TokenUrl {
            authority: authority_host.to_string(),
            tenant,
            source,
        }
    };
    let client_secret = || -> Result<Chosen, CredentialError> {
        let tenant = require("client-secret", "AZURE_TENANT_ID")?;
        let credential = EntraCredential::client_secret(
            http.clone(),
            authority_host,
            tenant.clone(),
            require("client-secret", "AZURE_CLIENT_ID")?,
            require("client-secret", "AZURE_CLIENT_SECRET")?,
        )
        .map_err(url_error(&tenant))?;
        Ok(Chosen {
            credential: Arc::new(credential),
            name: "client-secret",
        })
    };
    let workload_identity = || -> Result<Chosen, CredentialError> {
        let path = require("workload-identity", "AZURE_FEDERATED_TOKEN_FILE")?;
        // Opening the file here reports a missing mount before any device is touched. The
        // credential reads it again for every token request.
        std::fs::File::open(&path).map_err(|source| CredentialError::TokenFile {
            path: path.clone(),
            source,
        })?;
        let tenant = require("workload-identity", "AZURE_TENANT_ID")?;
        let credential = EntraCredential::workload_identity(
            http.clone(),
            authority_host,
            tenant.clone(),
            require("workload-identity", "AZURE_CLIENT_ID")?,
            PathBuf::from(path),
        )
        .map_err(url_error(&tenant))?;
        Ok(Chosen {
            credential: Arc::new(credential),
            name: "workload-identity",
        })
    };
    let cli = || Chosen {
        credential: Arc::new(AzureCliCredential::new()),
        name: "cli",
    };

    match method {
        AuthMethod::ClientSecret => client_secret(),
        AuthMethod::WorkloadIdentity => workload_identity(),
        AuthMethod::Cli => Ok(cli()),
        AuthMethod::ManagedIdentity => {
            let mut options = TokenCredentialOptions::default();
            options.set_authority_host(authority_host.to_string());
            Ok(Chosen {
                credential: Arc::new(VirtualMachineManagedIdentityCredential::new(options)),
                name: "managed-identity",
            })
        }
        AuthMethod::Auto => {
            if var("AZURE_CLIENT_SECRET").is_some() {
                client_secret()
            } else if var("AZURE_FEDERATED_TOKEN_FILE").is_some() {
                workload_identity()
            } else if az_on_path(env) {
                Ok(cli())
            } else {
                Err(CredentialError::NoneConfigured)
            }
        }
    }
}

fn az_on_path(env: Env<'_>) -> bool {
    let Some(path) = env("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| dir.join("az").is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn host() -> Url {
        Url::parse("http://127.0.0.1:9/").unwrap()
    }

    #[test]
    fn auto_prefers_client_secret() {
        let env = env_of(&[
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_CLIENT_SECRET", "s"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/nonexistent"),
        ]);
        let chosen = choose(AuthMethod::Auto, &host(), &env).unwrap();
        assert_eq!(chosen.name, "client-secret");
    }

    #[test]
    fn auto_without_anything_fails_without_imds() {
        let env = env_of(&[("PATH", "/nonexistent")]);
        let error = choose(AuthMethod::Auto, &host(), &env).err().unwrap();
        assert!(matches!(error, CredentialError::NoneConfigured), "{error}");
    }

    #[test]
    fn client_secret_names_missing_variable() {
        let env = env_of(&[("AZURE_TENANT_ID", "t"), ("AZURE_CLIENT_SECRET", "s")]);
        let error = choose(AuthMethod::ClientSecret, &host(), &env)
            .err()
            .unwrap();
        assert!(error.to_string().contains("AZURE_CLIENT_ID"), "{error}");
    }

    #[test]
    fn workload_identity_reads_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "eyJ.token\n").unwrap();
        let file = file.to_string_lossy().into_owned();
        let env = env_of(&[
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_FEDERATED_TOKEN_FILE", &file),
        ]);
        let chosen = choose(AuthMethod::Auto, &host(), &env).unwrap();
        assert_eq!(chosen.name, "workload-identity");
    }

    #[test]
    fn workload_identity_names_missing_file() {
        let env = env_of(&[
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/nonexistent/token"),
        ]);
        let error = choose(AuthMethod::WorkloadIdentity, &host(), &env)
            .err()
            .unwrap();
        assert!(error.to_string().contains("/nonexistent/token"), "{error}");
    }

    #[test]
    fn auto_uses_cli_when_az_is_on_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("az"), "#!/bin/sh\n").unwrap();
        let path = dir.path().to_string_lossy().into_owned();
        let env = env_of(&[("PATH", &path)]);
        let chosen = choose(AuthMethod::Auto, &host(), &env).unwrap();
        assert_eq!(chosen.name, "cli");
    }
}
