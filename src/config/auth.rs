//! `[auth.NAME]` → a ready [`AuthPolicy`]: for `kind = "jwt"` the algorithms and the key (a
//! secret, a public key, or a JWK set from a file or an identity provider), issuer, audience,
//! token sources; for `kind = "hmac"` the secret, parameter names and `max_ttl`; claim names.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily};
use toml::Spanned;

use super::raw::{AuthKind, RawAuth, RawJwks, RawParams, RawUpstreamTls};
use super::route::https_target;
use super::settings::JwksSource;
use super::validate::Ctx;
use crate::auth::algorithm::{check_secret, parse_algorithm};
use crate::auth::jwks::{Acceptance, JwksKeys};
use crate::auth::jwt::{self, JwtSettings, JwtVerifier, VerifyingKey};
use crate::auth::signed_params::{ParamNames, SignedParams};
use crate::auth::token_source::TokenSource;
use crate::auth::{AuthPolicy, ClaimNames, Verifier};

/// How often a remote key set is fetched again when the policy does not say.
const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
/// The least time between two fetches caused by tokens with an unknown `kid`.
const DEFAULT_JWKS_MIN_REFETCH: Duration = Duration::from_secs(30);
/// How far out an HMAC-signed `expires` may be when the policy does not say.
const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);

/// A policy, and the key set its refresher fetches when it has one at a URL.
pub(super) struct Built {
    pub(super) policy: AuthPolicy,
    pub(super) jwks: Option<JwksSource>,
}

impl Ctx<'_> {
    pub(super) fn policy(&mut self, name: &str, raw: Spanned<RawAuth>) -> Option<Built> {
        let span = raw.span();
        let raw = raw.into_inner();
        let leeway = self.duration(&raw.leeway, Duration::from_secs(30));
        let mut claims = ClaimNames::default();
        if let Some(raw_claims) = &raw.claims {
            let pick = |given: &Option<String>, default: &str| {
                given.clone().unwrap_or_else(|| default.to_owned())
            };
            claims.user = pick(&raw_claims.user, &claims.user);
            claims.tenant = pick(&raw_claims.tenant, &claims.tenant);
            claims.conversation = pick(&raw_claims.conversation, &claims.conversation);
            claims.conversations = raw_claims.conversations.clone();
        }
        match raw.kind.get_ref() {
            AuthKind::Jwt => self.jwt_policy(name, span, raw, claims, leeway),
            AuthKind::Hmac => self.hmac_policy(name, span, raw, claims, leeway),
        }
    }

    fn jwt_policy(
        &mut self,
        name: &str,
        span: std::ops::Range<usize>,
        raw: RawAuth,
        claims: ClaimNames,
        leeway: Duration,
    ) -> Option<Built> {
        if let Some(params) = &raw.params {
            self.error(params.span(), "params belong to kind = \"hmac\" policies");
        }
        if let Some(max_ttl) = &raw.max_ttl {
            self.error(
                max_ttl.span(),
                "max_ttl belongs to kind = \"hmac\" policies",
            );
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
        let issuer = raw
            .issuer
            .map(|i| i.into_inner().into_vec())
            .unwrap_or_default();
        let audience = raw
            .audience
            .map(|a| a.into_inner().into_vec())
            .unwrap_or_default();
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
                for source in sources.into_inner() {
                    match TokenSource::parse(source.get_ref()) {
                        Ok(source) => token_from.push(source),
                        Err(error) => self.error(source.span(), error),
                    }
                }
            }
        }
        if let (Some(refetch), None) = (&raw.jwks_min_refetch, &raw.jwks) {
            self.error(refetch.span(), "jwks_min_refetch needs jwks");
        }
        if algorithms.is_empty() {
            return None;
        }
        let settings = JwtSettings {
            algorithms: &algorithms,
            issuer: &issuer,
            audience: &audience,
            leeway,
        };
        let mut hmac_secret = None;
        let mut jwks = None;
        let verifier = match (&raw.jwks, &raw.secret, &raw.public_key) {
            (Some(set), None, None) => {
                let min_refetch = self.duration(&raw.jwks_min_refetch, DEFAULT_JWKS_MIN_REFETCH);
                if let Some(given) = &raw.jwks_min_refetch
                    && min_refetch < Duration::from_secs(1)
                {
                    self.error(
                        given.span(),
                        "jwks_min_refetch must be at least 1s (made-up kids would otherwise drive fetches)",
                    );
                }
                let (keys, source) =
                    self.jwks(name, set, &settings, algorithms_span, min_refetch)?;
                jwks = source;
                Verifier::Jwks(keys)
            }
            (None, secret, public_key) => {
                let key = match (secret, public_key) {
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
                            format!("[auth.{name}] needs secret (HS*), public_key or jwks"),
                        );
                        None
                    }
                }?;
                let verifier = match JwtVerifier::new(&settings, &key) {
                    Ok(verifier) => verifier,
                    Err(error) => {
                        self.error(algorithms_span, format!("[auth.{name}]: {error}"));
                        return None;
                    }
                };
                if let VerifyingKey::Secret(secret) = key {
                    hmac_secret = Some(secret);
                }
                Verifier::Jwt(verifier)
            }
            (Some(set), _, _) => {
                self.error(
                    set.span(),
                    "give jwks or a key (secret, public_key), not both",
                );
                return None;
            }
        };
        Some(Built {
            policy: AuthPolicy {
                name: name.to_owned(),
                algorithms,
                token_from,
                claims,
                issuers: issuer,
                audiences: audience,
                verifier,
                hmac_secret,
            },
            jwks,
        })
    }

    /// A policy's JWK set: read now from a file, or (an empty set, until its first fetch) at
    /// a URL.
    fn jwks(
        &mut self,
        name: &str,
        set: &Spanned<RawJwks>,
        settings: &JwtSettings,
        algorithms_span: std::ops::Range<usize>,
        min_refetch: Duration,
    ) -> Option<(Arc<JwksKeys>, Option<JwksSource>)> {
        if settings
            .algorithms
            .iter()
            .any(|alg| alg.family() == AlgorithmFamily::Hmac)
        {
            self.error(
                algorithms_span,
                format!(
                    "[auth.{name}]: a JWK set holds public keys: its algorithms are RS*, PS*, ES* or EdDSA, not HS*"
                ),
            );
            return None;
        }
        let acceptance = Acceptance {
            validation: jwt::validation(settings, settings.algorithms.to_vec()),
            remote: set.get_ref().url.is_some(),
        };
        let raw = set.get_ref();
        match (&raw.file, &raw.url) {
            (Some(file), None) => {
                for (key, span) in [
                    ("refresh", raw.refresh.as_ref().map(Spanned::span)),
                    ("ca", raw.ca.as_ref().map(Spanned::span)),
                ] {
                    if let Some(span) = span {
                        self.error(span, format!("{key} belongs to jwks = {{ url }}"));
                    }
                }
                let json = self.read_file(file.span(), "JWK set", file.get_ref())?;
                match JwksKeys::from_file(acceptance, &json, min_refetch) {
                    Ok(keys) => Some((Arc::new(keys), None)),
                    Err(error) => {
                        self.error(file.span(), format!("{}: {error}", file.get_ref()));
                        None
                    }
                }
            }
            (None, Some(url)) => {
                let refresh = self.duration(&raw.refresh, DEFAULT_JWKS_REFRESH);
                if refresh < Duration::from_secs(1) {
                    if let Some(given) = &raw.refresh {
                        self.error(given.span(), "refresh must be at least 1s");
                    }
                    return None;
                }
                let ca = raw.ca.as_ref().map(|ca| ca.get_ref().file.clone());
                let tls = self.upstream_tls(Some(RawUpstreamTls {
                    ca,
                    server_name: None,
                }))?;
                let target = match https_target(url.get_ref(), &tls) {
                    Ok(target) => target,
                    Err(error) => {
                        self.error(url.span(), error);
                        return None;
                    }
                };
                let keys = Arc::new(JwksKeys::new(acceptance, min_refetch));
                let source = JwksSource {
                    policy: name.to_owned(),
                    target,
                    refresh,
                    keys: keys.clone(),
                };
                Some((keys, Some(source)))
            }
            _ => {
                self.error(set.span(), "jwks takes either file or url");
                None
            }
        }
    }

    fn hmac_policy(
        &mut self,
        name: &str,
        span: std::ops::Range<usize>,
        raw: RawAuth,
        claims: ClaimNames,
        leeway: Duration,
    ) -> Option<Built> {
        for (key, given) in [
            ("algorithms", raw.algorithms.as_ref().map(Spanned::span)),
            ("public_key", raw.public_key.as_ref().map(Spanned::span)),
            ("jwks", raw.jwks.as_ref().map(Spanned::span)),
            ("issuer", raw.issuer.as_ref().map(Spanned::span)),
            ("audience", raw.audience.as_ref().map(Spanned::span)),
            ("token_from", raw.token_from.as_ref().map(Spanned::span)),
            (
                "jwks_min_refetch",
                raw.jwks_min_refetch.as_ref().map(Spanned::span),
            ),
        ] {
            if let Some(given) = given {
                self.error(
                    given,
                    format!("{key} does not apply to kind = \"hmac\" (the query carries signed parameters)"),
                );
            }
        }
        if claims.conversations.is_some() {
            self.error(
                span.clone(),
                "claims.conversations does not apply to kind = \"hmac\": the signed parameters name one conversation",
            );
        }
        let max_ttl = self.duration(&raw.max_ttl, DEFAULT_MAX_TTL);
        let names = self.param_names(raw.params);
        let Some(secret) = &raw.secret else {
            self.error(span, format!("[auth.{name}] needs secret"));
            return None;
        };
        let secret_span = secret.span();
        let secret = self.secret(secret, "secret")?;
        if let Err(error) = check_secret(&secret) {
            self.error(secret_span, format!("[auth.{name}]: {error}"));
            return None;
        }
        let names = names?;
        let token_from = names.sources();
        let params = SignedParams::new(&secret, names, max_ttl, leeway.as_secs());
        Some(Built {
            policy: AuthPolicy {
                name: name.to_owned(),
                // Not a JWT: no algorithm is read from the request.
                algorithms: vec![Algorithm::HS256],
                token_from,
                claims,
                issuers: Vec::new(),
                audiences: Vec::new(),
                verifier: Verifier::SignedParams(params),
                hmac_secret: Some(secret),
            },
            jwks: None,
        })
    }

    /// `params = { user, tenant, conversation, expires, signature }`: five different names.
    fn param_names(&mut self, raw: Option<Spanned<RawParams>>) -> Option<ParamNames> {
        let mut names = ParamNames::default();
        let Some(raw) = raw else { return Some(names) };
        let span = raw.span();
        let raw = raw.into_inner();
        for (given, slot) in [
            (raw.user, &mut names.user),
            (raw.tenant, &mut names.tenant),
            (raw.conversation, &mut names.conversation),
            (raw.expires, &mut names.expires),
            (raw.signature, &mut names.signature),
        ] {
            if let Some(given) = given {
                *slot = given;
            }
        }
        let all = [
            &names.user,
            &names.tenant,
            &names.conversation,
            &names.expires,
            &names.signature,
        ];
        let valid = |name: &str| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if let Some(bad) = all.iter().find(|name| !valid(name)) {
            self.error(
                span,
                format!("params: {bad:?} is not a query parameter name"),
            );
            return None;
        }
        for (i, first) in all.iter().enumerate() {
            if all[i + 1..].contains(first) {
                self.error(span, format!("params: {first:?} is named twice"));
                return None;
            }
        }
        Some(names)
    }
}
