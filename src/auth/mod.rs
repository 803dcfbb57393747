//! Authentication policies: where the token comes from, how it is verified, and which claims
//! become the identity.

pub(crate) mod algorithm;
pub(crate) mod claims;
pub(crate) mod error;
mod hmac_jwt;
pub(crate) mod jwks;
pub(crate) mod jwt;
pub(crate) mod memo;
pub(crate) mod signed_params;
pub(crate) mod token_source;

use std::sync::Arc;

use http::HeaderMap;
use jsonwebtoken::Algorithm;

use claims::{Claims, claim_string, numeric_date};
use error::AuthError;
use jwks::JwksKeys;
use jwt::JwtVerifier;
use memo::TokenMemo;
use signed_params::SignedParams;
use token_source::{FoundToken, TokenSource};

/// Which claim names carry the identity.
#[derive(Debug, Clone)]
pub(crate) struct ClaimNames {
    pub(crate) user: String,
    pub(crate) tenant: String,
    pub(crate) conversation: String,
    /// The claim listing the conversations the token may open (`"*"`: any), when the policy
    /// checks membership.
    pub(crate) conversations: Option<String>,
}

impl Default for ClaimNames {
    fn default() -> Self {
        Self {
            user: "sub".into(),
            tenant: "tenant_id".into(),
            conversation: "conversation_id".into(),
            conversations: None,
        }
    }
}

/// How a policy checks what a client presents.
// One per policy, never moved on a request's path: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Verifier {
    /// A JWT, with the one key of the config.
    Jwt(JwtVerifier),
    /// A JWT, with the key its `kid` names in a JWK set.
    Jwks(Arc<JwksKeys>),
    /// HMAC-signed query parameters.
    SignedParams(SignedParams),
}

impl Verifier {
    fn verify(&self, token: &str, claim_names: &ClaimNames) -> Result<Claims, AuthError> {
        match self {
            Self::Jwt(verifier) => verifier.verify(token),
            Self::Jwks(keys) => keys.verify(token),
            Self::SignedParams(params) => params.verify(token, claim_names),
        }
    }

    fn check_time(&self, claims: &Claims) -> Result<(), AuthError> {
        let leeway = match self {
            Self::Jwt(verifier) => verifier.leeway(),
            Self::Jwks(keys) => keys.leeway(),
            Self::SignedParams(params) => params.leeway,
        };
        jwt::check_time(claims, leeway)
    }
}

/// A named `[auth.NAME]` policy, validated and ready to verify.
pub(crate) struct AuthPolicy {
    pub(crate) name: String,
    pub(crate) algorithms: Vec<Algorithm>,
    pub(crate) token_from: Vec<TokenSource>,
    pub(crate) claims: ClaimNames,
    /// Accepted issuers and audiences (empty: not checked); `wsedge token` uses the first.
    pub(crate) issuers: Vec<String>,
    pub(crate) audiences: Vec<String>,
    pub(crate) verifier: Verifier,
    /// The HMAC secret, kept so that `wsedge token` can mint development tokens.
    pub(crate) hmac_secret: Option<Vec<u8>>,
}

/// The longest user, tenant, conversation or claim value the edge passes on.
pub(crate) const MAX_VALUE_LEN: usize = 256;

/// Whether `value` reaches the upstream byte for byte as a header value or a query value, and
/// reads the same to every HTTP parser: printable ASCII, spaces only inside. Parsers trim
/// leading and trailing whitespace (so " alice" would arrive as "alice" while the edge counted,
/// keyed and revoked it as another user), drop or refuse control bytes, and read bytes above
/// 0x7f as Latin-1 or UTF-8 as they please.
pub(crate) fn is_passable(value: &str) -> bool {
    value.len() <= MAX_VALUE_LEN && reads_the_same(value)
}

/// [`is_passable`] but for the length: a header a template composes from several values.
pub(crate) fn reads_the_same(value: &str) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.iter().all(|&b| (0x20..0x7f).contains(&b))
        && bytes[0] != b' '
        && bytes[bytes.len() - 1] != b' '
}

/// Who is connecting, as established from a verified token.
#[derive(Debug, Clone, Default)]
pub(crate) struct Identity {
    pub(crate) user: String,
    pub(crate) tenant: Option<String>,
    pub(crate) conversation: Option<String>,
    /// Shared: an identity is copied for each request of a keep-alive connection.
    pub(crate) claims: Arc<Claims>,
    /// The token's `exp`, in seconds since the epoch.
    pub(crate) expires_at: Option<u64>,
}

/// A request's token, as far as the policy has looked at it.
pub(crate) enum Presented {
    /// The connection's remembered token, still valid: no verification needed.
    Remembered(Identity, FoundToken),
    /// A token to verify.
    Fresh(FoundToken),
}

impl AuthPolicy {
    /// Finds the token, and what `memo` remembers of it (a token verified before on the same
    /// connection has only its expiry checked again). `memo` is for connections that may send
    /// another request (not an upgrade's).
    pub(crate) fn present(
        self: &Arc<Self>,
        headers: &HeaderMap,
        query: Option<&str>,
        memo: Option<&TokenMemo>,
    ) -> Result<Presented, AuthError> {
        let found = match &self.verifier {
            Verifier::SignedParams(params) => params.find(query)?,
            Verifier::Jwt(_) | Verifier::Jwks(_) => {
                token_source::find_token(&self.token_from, headers, query)
            }
        }
        .ok_or(AuthError::Missing)?;
        match memo.and_then(|memo| memo.recall(self, &found.token)) {
            Some(identity) => {
                self.verifier.check_time(&identity.claims)?;
                Ok(Presented::Remembered(identity, found))
            }
            None => Ok(Presented::Fresh(found)),
        }
    }

    /// Finds the token, verifies it unless `memo` holds it, and reads the identity claims.
    #[cfg(test)]
    pub(crate) fn authenticate(
        self: &Arc<Self>,
        headers: &HeaderMap,
        query: Option<&str>,
        memo: Option<&TokenMemo>,
    ) -> Result<(Identity, FoundToken), AuthError> {
        match self.present(headers, query, memo)? {
            Presented::Remembered(identity, found) => Ok((identity, found)),
            Presented::Fresh(found) => self.verify(found, memo),
        }
    }

    /// Whether the token may open `conversation`: always, unless the policy names a membership
    /// claim, which must then list it (or `"*"`).
    pub(crate) fn may_open(&self, claims: &Claims, conversation: &str) -> bool {
        let Some(name) = &self.claims.conversations else {
            return true;
        };
        match claims.get(name) {
            Some(serde_json::Value::Array(list)) => list.iter().any(|entry| {
                entry
                    .as_str()
                    .is_some_and(|c| c == "*" || c == conversation)
            }),
            Some(serde_json::Value::String(one)) => one == "*" || one == conversation,
            _ => false,
        }
    }

    /// Verifies a fresh token and reads the identity claims; `memo` remembers them.
    pub(crate) fn verify(
        self: &Arc<Self>,
        found: FoundToken,
        memo: Option<&TokenMemo>,
    ) -> Result<(Identity, FoundToken), AuthError> {
        let keys = memo::key_generation(self);
        let claims = self.verifier.verify(&found.token, &self.claims)?;
        let user = claim_string(&claims, &self.claims.user)
            .ok_or(AuthError::Invalid("token has no user claim"))?;
        let identity = Identity {
            user,
            tenant: claim_string(&claims, &self.claims.tenant),
            conversation: claim_string(&claims, &self.claims.conversation),
            // A fractional `exp` (Python's `time.time()`) passed verification: it must end
            // the session too.
            expires_at: claims.get("exp").and_then(numeric_date),
            claims: Arc::new(claims),
        };
        if let Some(memo) = memo {
            memo.remember(self, &found.token, &identity, keys);
        }
        Ok((identity, found))
    }
}
