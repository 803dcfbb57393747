//! `[auth.NAME]` → a ready [`AuthPolicy`]: algorithms, key, issuer and audience, token sources
//! and claim names.

use std::time::Duration;

use toml::Spanned;

use super::raw::{AuthKind, RawAuth};
use super::validate::Ctx;
use crate::auth::algorithm::parse_algorithm;
use crate::auth::jwt::{JwtSettings, JwtVerifier, VerifyingKey};
use crate::auth::token_source::TokenSource;
use crate::auth::{AuthPolicy, ClaimNames};

impl Ctx<'_> {
    pub(super) fn policy(&mut self, name: &str, raw: Spanned<RawAuth>) -> Option<AuthPolicy> {
        let span = raw.span();
        let raw = raw.into_inner();
        match raw.kind.get_ref() {
            AuthKind::Jwt => {}
            AuthKind::Hmac => {
                self.error(
                    raw.kind.span(),
                    "kind = \"hmac\" is not supported by this version yet; use \"jwt\"",
                );
                return None;
            }
        }
        let mut algorithms = Vec::new();
        let algorithms_span = raw.algorithms.as_ref().map_or(span.clone(), |a| a.span());
        match &raw.algorithms {
            None => self.error(
                span.clone(),
                format!("[auth.{name}] needs algorithms, e.g. [\"HS256\"]"),
            ),
            Some(list) => {
                for alg in list.get_ref() {
                    match parse_algorithm(alg.get_ref()) {
                        Ok(alg) => algorithms.push(alg),
                        Err(error) => self.error(alg.span(), error),
                    }
                }
            }
        }
        if let Some(jwks) = &raw.jwks {
            self.error(
                jwks.span(),
                "jwks is not supported by this version yet; use secret or public_key",
            );
            return None;
        }
        let key = match (&raw.secret, &raw.public_key) {
            (Some(secret), None) => self.secret(secret, "secret").map(VerifyingKey::Secret),
            (None, Some(public_key)) => self
                .secret(public_key, "public_key")
                .map(VerifyingKey::PublicPem),
            (Some(secret), Some(_)) => {
                self.error(
                    secret.span(),
                    "give either secret (HS*) or public_key, not both",
                );
                None
            }
            (None, None) => {
                self.error(
                    span.clone(),
                    format!("[auth.{name}] needs secret (HS*) or public_key"),
                );
                None
            }
        };
        let issuer = raw
            .issuer
            .map(|i| i.into_inner().into_vec())
            .unwrap_or_default();
        let audience = raw
            .audience
            .map(|a| a.into_inner().into_vec())
            .unwrap_or_default();
        let leeway = self.duration(&raw.leeway, Duration::from_secs(30));
        let mut token_from = Vec::new();
        match raw.token_from {
            None => {
                token_from = vec![
                    TokenSource::Header,
                    TokenSource::Query("token".into()),
                    TokenSource::Subprotocol,
                ]
            }
            Some(sources) => {
                for source in sources {
                    match TokenSource::parse(source.get_ref()) {
                        Ok(source) => token_from.push(source),
                        Err(error) => self.error(source.span(), error),
                    }
                }
            }
        }
        let mut claims = ClaimNames::default();
        if let Some(raw_claims) = raw.claims {
            claims.user = raw_claims.user.unwrap_or(claims.user);
            claims.tenant = raw_claims.tenant.unwrap_or(claims.tenant);
            claims.conversation = raw_claims.conversation.unwrap_or(claims.conversation);
        }
        let key = key?;
        if algorithms.is_empty() {
            return None;
        }
        let settings = JwtSettings {
            algorithms: &algorithms,
            issuer: &issuer,
            audience: &audience,
            leeway,
        };
        let verifier = match JwtVerifier::new(&settings, &key) {
            Ok(verifier) => verifier,
            Err(error) => {
                self.error(algorithms_span, format!("[auth.{name}]: {error}"));
                return None;
            }
        };
        Some(AuthPolicy {
            name: name.to_owned(),
            algorithms,
            token_from,
            claims,
            issuers: issuer,
            audiences: audience,
            verifier,
            hmac_secret: match key {
                VerifyingKey::Secret(secret) => Some(secret),
                VerifyingKey::PublicPem(_) => None,
            },
        })
    }
}
