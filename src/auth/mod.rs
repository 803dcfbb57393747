//! Authentication policies: where the token comes from, how it is verified, and which claims
//! become the identity.

mod hmac_jwt;
pub mod jwt;
pub mod token_source;

use http::HeaderMap;
use jsonwebtoken::Algorithm;
use serde_json::Value;

pub use jwt::{Claims, JwtVerifier};
pub use token_source::{FoundToken, TokenSource};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token in the request")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("{0}")]
    Invalid(&'static str),
}

/// Which claim names carry the identity.
#[derive(Debug, Clone)]
pub struct ClaimNames {
    pub user: String,
    pub tenant: String,
    pub conversation: String,
}

impl Default for ClaimNames {
    fn default() -> Self {
        Self {
            user: "sub".into(),
            tenant: "tenant_id".into(),
            conversation: "conversation_id".into(),
        }
    }
}

/// A named `[auth.NAME]` policy, validated and ready to verify.
pub struct AuthPolicy {
    pub name: String,
    pub algorithms: Vec<Algorithm>,
    pub token_from: Vec<TokenSource>,
    pub claims: ClaimNames,
    /// Accepted issuers and audiences (empty: not checked); `wsedge token` uses the first.
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    pub verifier: JwtVerifier,
    /// The HMAC secret, kept so that `wsedge token` can mint development tokens.
    pub hmac_secret: Option<Vec<u8>>,
}

/// Who is connecting, as established from a verified token.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub user: String,
    pub tenant: Option<String>,
    pub conversation: Option<String>,
    pub claims: Claims,
    /// The token's `exp`, in seconds since the epoch.
    pub expires_at: Option<u64>,
}

impl AuthPolicy {
    /// Finds the token, verifies it and reads the identity claims.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<(Identity, FoundToken), AuthError> {
        let found =
            token_source::find_token(&self.token_from, headers, query).ok_or(AuthError::Missing)?;
        let claims = self.verifier.verify(&found.token)?;
        let user = claim_string(&claims, &self.claims.user)
            .ok_or(AuthError::Invalid("token has no user claim"))?;
        let identity = Identity {
            user,
            tenant: claim_string(&claims, &self.claims.tenant),
            conversation: claim_string(&claims, &self.claims.conversation),
            // A fractional `exp` (Python's `time.time()`) passed verification: it must end
            // the session too.
            expires_at: claims.get("exp").and_then(hmac_jwt::numeric_date),
            claims,
        };
        Ok((identity, found))
    }
}

/// A claim as a string: strings as they are, numbers and booleans printed; empty counts as absent.
pub fn claim_string(claims: &Claims, name: &str) -> Option<String> {
    let text = match claims.get(name)? {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => return None,
    };
    (!text.is_empty()).then_some(text)
}

/// A claim for a `{claim.NAME}` template: scalars as text, arrays and objects as JSON.
pub fn claim_text(claims: &Claims, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::Null => None,
        Value::Array(_) | Value::Object(_) => claims.get(name).map(Value::to_string),
        _ => claim_string(claims, name),
    }
}
