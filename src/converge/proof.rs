//! Proving the fix: a token minted on the node must carry the Arc issuer and a signing
//! key that the issuer publishes, or Entra rejects it with AADSTS700211.

use std::time::Instant;

use super::{remote, Failure, Node};
use crate::report::{transcript, Cause};

impl Node<'_> {
    /// Mints a token on the node and checks that its `iss` is the Arc issuer byte for byte
    /// and that the issuer publishes its signing key. The token never leaves this function:
    /// it is decoded here and is neither logged nor put in the transcript.
    pub(super) async fn prove_token(&mut self, issuer: &str) -> Result<(), Failure> {
        let Some(step) = self.job.playbook.verify_token.clone() else {
            return Ok(());
        };
        let token = match self
            .mint_token(&step.namespace, &step.service_account, &step.audience)
            .await
        {
            Ok(token) => token,
            Err(error) if error.contains("not found") => {
                self.report.log.push(format!(
                    "service account {}/{} not found; minting the token for default/default",
                    step.namespace, step.service_account
                ));
                self.mint_token("default", "default", &step.audience)
                    .await
                    .map_err(Failure::with(Cause::CommandFailed))?
            }
            Err(error) => {
                return Err(Failure {
                    cause: Cause::CommandFailed,
                    message: error,
                })
            }
        };
        let claims = crate::azure::oidc::decode_token(&token)
            .map_err(Failure::with(Cause::TokenIssuerMismatch))?;
        drop(token);
        self.report.token_issuer = claims.issuer.clone();
        if claims.issuer != issuer {
            let message = format!(
                "a token minted on the node has issuer {}, not the Arc issuer {issuer}: Entra \
                 would answer AADSTS700211",
                claims.issuer
            );
            self.step("verify-token", Err(message.as_str()));
            return Err(Failure {
                cause: Cause::TokenIssuerMismatch,
                message,
            });
        }
        let Some(issuer_keys) = self.job.issuer_keys.clone() else {
            self.report.log.push(
                "token issuer matches; signing key not checked: offline run without access to the issuer"
                    .into(),
            );
            self.step("verify-token", Ok::<(), &str>(()));
            return Ok(());
        };
        let published = issuer_keys.key_ids(issuer).await;
        let result = match published {
            Ok(kids) if kids.contains(&claims.key_id) => {
                self.report.signing_key_published = Some(true);
                self.report.log.push(format!(
                    "token issuer matches; Arc publishes key {}",
                    claims.key_id
                ));
                Ok(())
            }
            Ok(kids) => {
                self.report.signing_key_published = Some(false);
                Err(Failure {
                    cause: Cause::SigningKeyNotPublished,
                    message: format!(
                        "the node signs tokens with key {}, which the Arc issuer does not publish \
                         ({} keys published): Entra cannot verify its tokens",
                        claims.key_id,
                        kids.len()
                    ),
                })
            }
            Err(error) => Err(Failure {
                cause: Cause::SigningKeyNotPublished,
                message: format!("cannot read the keys the Arc issuer publishes: {error}"),
            }),
        };
        self.step(
            "verify-token",
            result.as_ref().map(|_| ()).map_err(|f| f.message.as_str()),
        );
        result
    }

    /// Runs `k3s kubectl create token` and returns the token; the transcript records that
    /// a token was minted, never the token.
    async fn mint_token(
        &mut self,
        namespace: &str,
        account: &str,
        audience: &str,
    ) -> Result<String, String> {
        let script = remote::create_token(namespace, account, audience);
        let command = remote::wrap(&script, &self.connection.privilege);
        let started = Instant::now();
        let result = self
            .connection
            .run_as_root(&script, self.job.command_timeout)
            .await;
        let status = match &result {
            Ok(output) => format!("exit status {}", output.status),
            Err(error) => format!("error: {error}"),
        };
        self.report.transcript.push(transcript::Entry {
            command: transcript::redact(&command),
            stdout: "<token not recorded>".to_owned(),
            stderr: result
                .as_ref()
                .map(|o| transcript::redact(&o.stderr_text()))
                .unwrap_or_default(),
            status,
            duration: started.elapsed(),
        });
        let output = result.map_err(|e| format!("minting a token failed: {e}"))?;
        if output.status != 0 {
            return Err(format!(
                "minting a token failed: {}",
                output.stderr_text().trim()
            ));
        }
        Ok(output.stdout_text())
    }
}
