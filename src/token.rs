//! `wsedge token`: a development token signed with a policy's key, carrying the identity claims
//! that policy reads; for a `kind = "hmac"` policy, the signed query string.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::auth::Verifier;
use crate::auth::claims::Claims;
use crate::auth::jwt::{self, MintError, SigningKey};
use crate::auth::signed_params::Signed;
use crate::config::Config;

/// What a token is asked for.
pub struct TokenRequest {
    /// The `[auth.NAME]` whose key signs it; `None` for the only one.
    pub policy: Option<String>,
    pub user: String,
    pub tenant: Option<String>,
    pub conversation: Option<String>,
    pub ttl: Duration,
    /// Further claims, as text.
    pub claims: Vec<(String, String)>,
    /// A PEM private key, for policies that verify with a public key.
    pub private_key: Option<Vec<u8>>,
    /// Default: the policy's first accepted issuer and audience.
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The `kid` the token's header names (for a policy with a JWK set).
    pub kid: Option<String>,
}

/// A token that cannot be made from this config.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("there is no [auth.{0}]")]
    UnknownPolicy(String),
    #[error("there is no [auth.NAME] policy")]
    NoPolicy,
    #[error("there are several policies: choose one with --auth NAME")]
    SeveralPolicies,
    #[error("[auth.{0}] verifies with a public key: pass --key PRIVATE_KEY.pem to sign")]
    NeedsPrivateKey(String),
    #[error("--ttl is longer than the policy's max_ttl ({0:?})")]
    BeyondMaxTtl(Duration),
    #[error("[auth.{0}] is kind = \"hmac\": {1} does not apply to its signed parameters")]
    NotForSignedParams(String, &'static str),
    #[error("the user may not be empty")]
    EmptyUser,
    #[error(transparent)]
    Mint(#[from] MintError),
}

/// Signs a token for `request` with the key of its policy.
pub fn mint(config: &Config, request: TokenRequest) -> Result<String, TokenError> {
    let policy = match &request.policy {
        Some(name) => config
            .policies
            .get(name)
            .ok_or_else(|| TokenError::UnknownPolicy(name.clone()))?,
        None => {
            let mut policies = config.policies.values();
            match (policies.next(), policies.next()) {
                (Some(policy), None) => policy,
                (None, _) => return Err(TokenError::NoPolicy),
                (Some(_), Some(_)) => return Err(TokenError::SeveralPolicies),
            }
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    if request.user.is_empty() {
        return Err(TokenError::EmptyUser);
    }
    if let Verifier::SignedParams(params) = &policy.verifier {
        let jwt_only = [
            ("--claim", !request.claims.is_empty()),
            ("--key", request.private_key.is_some()),
            ("--issuer", request.issuer.is_some()),
            ("--audience", request.audience.is_some()),
            ("--kid", request.kid.is_some()),
        ];
        if let Some((option, _)) = jwt_only.iter().find(|(_, given)| *given) {
            return Err(TokenError::NotForSignedParams(policy.name.clone(), option));
        }
        if request.ttl > params.max_ttl {
            return Err(TokenError::BeyondMaxTtl(params.max_ttl));
        }
        let signed = Signed {
            user: request.user,
            tenant: request.tenant.unwrap_or_default(),
            conversation: request.conversation.unwrap_or_default(),
            expires: (now + request.ttl.as_secs()).to_string(),
        };
        return Ok(params.query_string(&signed));
    }
    let key = match (request.private_key, &policy.hmac_secret) {
        (Some(pem), _) => SigningKey::PrivatePem(pem),
        (None, Some(secret)) => SigningKey::Secret(secret.clone()),
        (None, None) => return Err(TokenError::NeedsPrivateKey(policy.name.clone())),
    };
    let mut claims = Claims::new();
    claims.insert(policy.claims.user.clone(), request.user.into());
    if let Some(tenant) = request.tenant {
        claims.insert(policy.claims.tenant.clone(), tenant.into());
    }
    if let Some(conversation) = request.conversation {
        claims.insert(policy.claims.conversation.clone(), conversation.into());
    }
    for (name, value) in request.claims {
        claims.insert(name, value.into());
    }
    if let Some(issuer) = request.issuer.or_else(|| policy.issuers.first().cloned()) {
        claims.insert("iss".into(), issuer.into());
    }
    if let Some(audience) = request
        .audience
        .or_else(|| policy.audiences.first().cloned())
    {
        claims.insert("aud".into(), audience.into());
    }
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + request.ttl.as_secs()).into());
    // A policy names at least one algorithm (config validation refuses an empty list).
    let algorithm = policy
        .algorithms
        .first()
        .copied()
        .unwrap_or(jsonwebtoken::Algorithm::HS256);
    Ok(jwt::mint(algorithm, &key, &claims, request.kid.as_deref())?)
}
