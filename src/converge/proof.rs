//! Proving the fix: a token minted on the node must carry the Arc issuer and a signing
//! key that the issuer publishes, or Entra rejects it with AADSTS700211.

use super::{remote, Failure, Node};
use crate::report::Cause;

impl Node<'_> {
    /// Mints a token on the node and checks that its `iss` is the Arc issuer byte for byte
    /// and that the issuer publishes its signing key.
    pub(super) async fn prove_token(&mut self, issuer: &str) -> Result<(), Failure> {
        self.prove_minted(issuer, None).await
    }

    /// Checks a token as [`Node::prove_token`] does, using `minted` (what the probe minted)
    /// when there is one instead of minting another. Only the token's header and claims
    /// ever leave the node: the mint script cuts the signature off there.
    pub(super) async fn prove_minted(
        &mut self,
        issuer: &str,
        minted: Option<Result<remote::Minted, String>>,
    ) -> Result<(), Failure> {
        let Some(step) = self.job.playbook.verify_token.clone() else {
            return Ok(());
        };
        let minted = match minted {
            Some(minted) => minted,
            None => self.mint((&step).into()).await,
        };
        let minted = minted.map_err(|error| Failure {
            cause: Cause::CommandFailed,
            message: format!("minting a token failed: {error}"),
        })?;

        let expected = format!("{}/{}", step.namespace, step.service_account);
        if minted.account != expected {
            self.report.log.push(format!(
                "service account {expected} not found; minted the token for {}",
                minted.account
            ));
        }
        let claims = crate::azure::oidc::decode_token(&format!("{}.", minted.claims))
            .map_err(Failure::with(Cause::TokenIssuerMismatch))?;

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

    /// Mints a token and returns its header and claims.
    async fn mint(&mut self, token: remote::TokenRequest<'_>) -> Result<remote::Minted, String> {
        let output = self
            .run(&remote::mint_claims(token), self.job.command_timeout)
            .await
            .map_err(|error| error.to_string())?;
        remote::minted(&remote::Tagged::parse(&output.stdout_text()))
            .unwrap_or_else(|| Err("k3s is not on the node's PATH".to_owned()))
    }
}
