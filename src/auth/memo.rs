//! What the last token a connection presented proved: a keep-alive client sends its bearer
//! token with every request, and the same bytes under the same policy verify the same way, so
//! only the first is verified. What time changes is checked every time: a token that has
//! expired since is refused as expired. So is what a key set's refresh changes: a token
//! verified with a JWK set is verified again once the set has been replaced (its key may have
//! been withdrawn).

use std::sync::{Arc, Mutex};

use super::{AuthPolicy, Identity, Verifier};

/// One connection's memo (empty until a token verifies).
#[derive(Default)]
pub(crate) struct TokenMemo(Mutex<Option<Memo>>);

struct Memo {
    /// Held, not only compared: a policy replaced by a reload cannot be mistaken for a new one
    /// that happens to live at the same address.
    policy: Arc<AuthPolicy>,
    token: Box<str>,
    identity: Identity,
    /// The generation of the policy's JWK set the token was verified with.
    keys: Option<u64>,
}

/// Which JWK set a policy verifies with now, when it verifies with one (read before a token
/// is verified: a set replaced meanwhile must not vouch for it).
pub(super) fn key_generation(policy: &AuthPolicy) -> Option<u64> {
    match &policy.verifier {
        Verifier::Jwks(keys) => Some(keys.generation()),
        Verifier::Jwt(_) | Verifier::SignedParams(_) => None,
    }
}

impl TokenMemo {
    /// The identity `token` proved under `policy`, if it is the one remembered.
    pub(super) fn recall(&self, policy: &Arc<AuthPolicy>, token: &str) -> Option<Identity> {
        let memo = self.0.lock().ok()?;
        let memo = memo.as_ref()?;
        (Arc::ptr_eq(&memo.policy, policy)
            && *memo.token == *token
            && memo.keys == key_generation(policy))
        .then(|| memo.identity.clone())
    }

    /// Remembers what `token` proved under `policy`, verified with the JWK set of generation
    /// `keys` (see [`key_generation`]).
    pub(super) fn remember(
        &self,
        policy: &Arc<AuthPolicy>,
        token: &str,
        identity: &Identity,
        keys: Option<u64>,
    ) {
        if let Ok(mut memo) = self.0.lock() {
            *memo = Some(Memo {
                policy: policy.clone(),
                token: token.into(),
                identity: identity.clone(),
                keys,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use http::HeaderMap;
    use jsonwebtoken::Algorithm;
    use serde_json::json;

    use super::*;
    use crate::auth::claims::Claims;
    use crate::auth::error::AuthError;
    use crate::auth::jwt::{self, JwtSettings, JwtVerifier, SigningKey, VerifyingKey};
    use crate::auth::token_source::TokenSource;
    use crate::auth::{AuthPolicy, ClaimNames};

    fn policy(secret: &[u8]) -> Arc<AuthPolicy> {
        let algorithms = [Algorithm::HS256];
        let settings = JwtSettings {
            algorithms: &algorithms,
            issuer: &[],
            audience: &[],
            leeway: Duration::ZERO,
        };
        let verifier = JwtVerifier::new(&settings, &VerifyingKey::Secret(secret.to_vec()))
            .expect("an HMAC verifier");
        Arc::new(AuthPolicy {
            name: "main".into(),
            algorithms: algorithms.to_vec(),
            token_from: vec![TokenSource::Header],
            claims: ClaimNames::default(),
            issuers: Vec::new(),
            audiences: Vec::new(),
            verifier: crate::auth::Verifier::Jwt(verifier),
            hmac_secret: Some(secret.to_vec()),
        })
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs())
    }

    fn token(secret: &[u8], sub: &str, exp: u64) -> String {
        let claims: Claims = serde_json::from_value(json!({ "sub": sub, "exp": exp })).unwrap();
        jwt::mint(
            Algorithm::HS256,
            &SigningKey::Secret(secret.to_vec()),
            &claims,
            None,
        )
        .unwrap_or_else(|_| panic!("a token"))
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
        headers
    }

    const SECRET: &[u8] = b"memo-secret-0123456789abcdef0123456789";

    #[test]
    fn the_same_token_is_recalled_and_a_different_one_verified() {
        let policy = policy(SECRET);
        let memo = TokenMemo::default();
        let alice = token(SECRET, "alice", now() + 600);
        let (identity, _) = policy
            .authenticate(&bearer(&alice), None, Some(&memo))
            .unwrap();
        assert_eq!(identity.user, "alice");
        assert_eq!(
            memo.recall(&policy, &alice).map(|identity| identity.user),
            Some("alice".to_owned())
        );
        // Another token on the same connection is verified, and remembered instead.
        let forged = format!("{}x", token(SECRET, "bob", now() + 600));
        assert!(
            policy
                .authenticate(&bearer(&forged), None, Some(&memo))
                .is_err()
        );
        let bob = token(SECRET, "bob", now() + 600);
        let (identity, _) = policy
            .authenticate(&bearer(&bob), None, Some(&memo))
            .unwrap();
        assert_eq!(identity.user, "bob");
        assert!(memo.recall(&policy, &alice).is_none());
    }

    #[test]
    fn a_remembered_token_that_has_expired_since_is_refused() {
        let policy = policy(SECRET);
        let memo = TokenMemo::default();
        let token = token(SECRET, "alice", now() + 600);
        // As if the token had been verified and its exp had passed since.
        let mut identity = policy
            .authenticate(&bearer(&token), None, Some(&memo))
            .unwrap()
            .0;
        Arc::make_mut(&mut identity.claims).insert("exp".into(), json!(now().saturating_sub(5)));
        memo.remember(&policy, &token, &identity, None);
        assert!(matches!(
            policy.authenticate(&bearer(&token), None, Some(&memo)),
            Err(AuthError::Expired)
        ));
    }

    #[test]
    fn a_policy_replaced_by_a_reload_verifies_again() {
        let old = policy(SECRET);
        let memo = TokenMemo::default();
        let token = token(SECRET, "alice", now() + 600);
        old.authenticate(&bearer(&token), None, Some(&memo))
            .unwrap();
        // The new policy has another secret: the remembered result is not its to reuse.
        let new = policy(b"another-secret-0123456789abcdef0123456789");
        assert!(
            new.authenticate(&bearer(&token), None, Some(&memo))
                .is_err()
        );
    }
}
