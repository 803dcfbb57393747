//! Keys from a JSON Web Key Set (RFC 7517), held per policy: a file read with the config, or
//! an identity provider's set fetched over HTTPS (by `crate::jwks_refresh`) and replaced whole
//! when it rotates.
//!
//! A token's key is the one its `kid` names; the token's own `jku`, `x5u` and `jwk` headers are
//! never looked at (a token must not bring the key it is checked with). Each key verifies only
//! the policy's algorithms of its own family (and only its `alg`, when the set says), so a
//! set that mixes RSA and EC keys gives each its own validation. Symmetric (`oct`) keys are
//! refused from a remote set: anyone who can read it could sign. The keys of one policy are
//! never seen by another, even where two sets use the same `kid`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use tokio::sync::{Notify, watch};

use super::claims::Claims;
use super::error::AuthError;
use super::jwt;

/// How long a handshake with an unknown `kid` waits for the fetch it caused (a fetch is given
/// 5 s).
pub(crate) const UNKNOWN_KID_WAIT: Duration = Duration::from_secs(6);
/// Handshakes of one policy that may wait for a fetch at once; more are judged on the set at
/// hand (a flood of made-up `kid`s must not pile up waiting requests).
const MAX_WAITING: usize = 256;

/// A key set that cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JwksError {
    #[error("not a JWK set (a JSON object with \"keys\"): {0}")]
    NotJson(serde_json::Error),
    #[error("the JWK set has no key usable with the policy's algorithms ({skipped} skipped)")]
    NoUsableKey { skipped: usize },
}

/// One key, ready to verify.
struct Key {
    decoding: DecodingKey,
    validation: Validation,
}

/// The usable keys of one set, by `kid`.
pub(crate) struct KeySet {
    by_kid: HashMap<String, Vec<Key>>,
    /// Keys without a `kid`: usable only by a token without one, when the set holds no other.
    unnamed: Vec<Key>,
    /// Keys left out (another use, another family, an algorithm the policy does not accept,
    /// a symmetric key from a remote set, a malformed key).
    pub(crate) skipped: usize,
}

impl KeySet {
    pub(crate) fn len(&self) -> usize {
        self.by_kid.values().map(Vec::len).sum::<usize>() + self.unnamed.len()
    }

    /// The key for a token with header `kid` and `alg`.
    fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<&Key, AuthError> {
        let candidates = match kid {
            Some(kid) => self.by_kid.get(kid).ok_or(AuthError::UnknownKey)?,
            None if self.len() == 1 => {
                if self.unnamed.is_empty() {
                    self.by_kid.values().next().ok_or(AuthError::UnknownKey)?
                } else {
                    &self.unnamed
                }
            }
            None => return Err(AuthError::Invalid("token names no key (kid)")),
        };
        candidates
            .iter()
            .find(|key| key.validation.algorithms.contains(&alg))
            .ok_or(AuthError::Invalid("token algorithm is not accepted"))
    }
}

/// What a policy accepts of a set's keys.
#[derive(Clone)]
pub(crate) struct Acceptance {
    /// The policy's validation (issuer, audience, leeway) with all its algorithms; each key
    /// gets a copy narrowed to its own.
    pub(crate) validation: Validation,
    /// Whether the set comes from a URL (symmetric keys refused).
    pub(crate) remote: bool,
}

impl Acceptance {
    /// Reads a JWK set and keeps the keys the policy can use.
    pub(crate) fn parse(&self, json: &[u8]) -> Result<KeySet, JwksError> {
        // Key by key: one key of a kind this edge does not know must not lose the others.
        #[derive(serde::Deserialize)]
        struct RawSet {
            keys: Vec<serde_json::Value>,
        }
        let raw: RawSet = serde_json::from_slice(json).map_err(JwksError::NotJson)?;
        let mut set = KeySet {
            by_kid: HashMap::new(),
            unnamed: Vec::new(),
            skipped: 0,
        };
        for value in raw.keys {
            let key = serde_json::from_value::<Jwk>(value)
                .ok()
                .and_then(|jwk| self.key(&jwk).map(|key| (jwk.common.key_id, key)));
            match key {
                Some((Some(kid), key)) => set.by_kid.entry(kid).or_default().push(key),
                Some((None, key)) => set.unnamed.push(key),
                None => set.skipped += 1,
            }
        }
        if set.len() == 0 {
            return Err(JwksError::NoUsableKey {
                skipped: set.skipped,
            });
        }
        Ok(set)
    }

    /// One JWK as a key, if the policy can use it.
    fn key(&self, jwk: &Jwk) -> Option<Key> {
        // A key meant for encryption is not one to check signatures with.
        if matches!(
            jwk.common.public_key_use,
            Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
        ) {
            return None;
        }
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
            AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
            // jsonwebtoken reads any octet key pair as Ed25519: only that curve is one.
            AlgorithmParameters::OctetKeyPair(params) if params.curve == EllipticCurve::Ed25519 => {
                AlgorithmFamily::Ed
            }
            AlgorithmParameters::OctetKey(_) if !self.remote => AlgorithmFamily::Hmac,
            _ => return None,
        };
        let declared = match jwk.common.key_algorithm {
            Some(alg) => Some(alg.to_string().parse::<Algorithm>().ok()?),
            None => None,
        };
        // An EC key verifies the one algorithm of its curve.
        let curve = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(params) => match params.curve {
                EllipticCurve::P256 => Some(Algorithm::ES256),
                EllipticCurve::P384 => Some(Algorithm::ES384),
                _ => return None,
            },
            _ => None,
        };
        let algorithms: Vec<Algorithm> = self
            .validation
            .algorithms
            .iter()
            .copied()
            .filter(|alg| alg.family() == family)
            .filter(|alg| declared.is_none_or(|declared| declared == *alg))
            .filter(|alg| curve.is_none_or(|curve| curve == *alg))
            .collect();
        if algorithms.is_empty() {
            return None;
        }
        let decoding = DecodingKey::from_jwk(jwk).ok()?;
        let mut validation = self.validation.clone();
        validation.algorithms = algorithms;
        Some(Key {
            decoding,
            validation,
        })
    }
}

/// Whether an unknown-`kid` refetch may go out, and whether one is under way.
#[derive(Default)]
struct Forced {
    last: Option<Instant>,
    pending: bool,
}

/// A policy's key set as it is now, and what its refresher needs.
pub(crate) struct JwksKeys {
    acceptance: Acceptance,
    current: ArcSwapOption<KeySet>,
    /// Counts the sets installed: a request that found its `kid` missing from one generation
    /// is judged again when a later one has come meanwhile.
    generation: AtomicU64,
    /// Requests waiting for a forced fetch now.
    waiting: AtomicUsize,
    /// Whether a refresher runs for this set (one per set, whatever starts it).
    refreshed: AtomicBool,
    /// The JSON the current set was read from: a reload that changes the policy reads it again.
    raw: Mutex<Option<Bytes>>,
    /// At most one refetch per this for tokens with an unknown `kid`.
    min_refetch: Duration,
    forced: Mutex<Forced>,
    /// Counts fetch attempts (for those waiting on a forced one).
    attempts: watch::Sender<u64>,
    /// Wakes the refresher for a forced fetch or its retirement.
    wake: Notify,
    /// Set when a reload replaced the policy: its refresher stops.
    retired: AtomicBool,
}

impl JwksKeys {
    pub(crate) fn new(acceptance: Acceptance, min_refetch: Duration) -> Self {
        Self {
            acceptance,
            current: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            refreshed: AtomicBool::new(false),
            raw: Mutex::new(None),
            min_refetch,
            forced: Mutex::new(Forced::default()),
            attempts: watch::Sender::new(0),
            wake: Notify::new(),
            retired: AtomicBool::new(false),
        }
    }

    /// A set read from a file with the config.
    pub(crate) fn from_file(
        acceptance: Acceptance,
        json: &[u8],
        min_refetch: Duration,
    ) -> Result<Self, JwksError> {
        let keys = Self::new(acceptance, min_refetch);
        keys.install(Bytes::copy_from_slice(json))?;
        Ok(keys)
    }

    /// Reads `json` and makes it the current set; the set before stays when it is unusable.
    /// Returns how many keys the new set holds.
    pub(crate) fn install(&self, json: Bytes) -> Result<usize, JwksError> {
        let set = self.acceptance.parse(&json)?;
        let count = set.len();
        self.current.store(Some(Arc::new(set)));
        self.generation.fetch_add(1, Ordering::SeqCst);
        *self.raw.lock().unwrap_or_else(|p| p.into_inner()) = Some(json);
        Ok(count)
    }

    /// Takes over the set `previous` (the same policy before a reload) until its own first
    /// fetch: a reload does not leave a policy without keys.
    pub(crate) fn adopt(&self, previous: &JwksKeys) {
        let json = previous
            .raw
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(json) = json {
            let _ = self.install(json);
        }
    }

    pub(crate) fn loaded(&self) -> bool {
        self.current.load().is_some()
    }

    pub(crate) fn key_count(&self) -> usize {
        self.current.load().as_ref().map_or(0, |set| set.len())
    }

    /// Which set is current (see [`Self::refetch_for_unknown_kid`]).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Claims the right to run this set's refresher: true once.
    pub(crate) fn claim_refresher(&self) -> bool {
        !self.refreshed.swap(true, Ordering::SeqCst)
    }

    pub(crate) fn leeway(&self) -> u64 {
        self.acceptance.validation.leeway
    }

    /// Verifies `token` with the key its header names.
    pub(crate) fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("token is malformed"))?;
        let current = self.current.load();
        let set = current.as_ref().ok_or(AuthError::Unavailable)?;
        let key = set.key_for(header.kid.as_deref(), header.alg)?;
        jwt::decode(token, &key.decoding, &key.validation)
    }

    /// For a token whose `kid` generation `seen` of the set lacked: true at once when a later
    /// set has come since; else asks the refresher to fetch the set at once and waits for that
    /// fetch (joining one under way), at most `wait`. False when no fetch is allowed now (one
    /// went out less than `min_refetch` ago, or too many requests wait already): the token is
    /// judged on the set as it is, and random `kid`s never become load on the provider.
    pub(crate) async fn refetch_for_unknown_kid(&self, seen: u64, wait: Duration) -> bool {
        if self.generation() != seen {
            return true;
        }
        // A file is read with the config, and a replaced policy's refresher has stopped.
        if !self.acceptance.remote || self.retired() {
            return false;
        }
        let waiting = Waiting::enter(&self.waiting);
        if waiting.count > MAX_WAITING {
            return false;
        }
        let mut attempts = self.attempts.subscribe();
        {
            let mut forced = self.forced.lock().unwrap_or_else(|p| p.into_inner());
            if !forced.pending {
                if forced
                    .last
                    .is_some_and(|last| last.elapsed() < self.min_refetch)
                {
                    return false;
                }
                forced.pending = true;
                forced.last = Some(Instant::now());
                self.wake.notify_one();
            }
        }
        matches!(
            tokio::time::timeout(wait, attempts.changed()).await,
            Ok(Ok(()))
        )
    }

    /// For the refresher: whether the coming fetch is a forced one (it then asks the provider
    /// to bypass its caches).
    pub(crate) fn forced_pending(&self) -> bool {
        self.forced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pending
    }

    /// For the refresher: a fetch has ended (well or not). Those waiting for a forced one are
    /// told when it was one (a scheduled fetch that began before their request may not hold
    /// their key: the refresher, woken, goes again at once).
    pub(crate) fn attempted(&self, forced: bool) {
        if !forced {
            return;
        }
        self.forced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pending = false;
        self.attempts.send_modify(|count| *count += 1);
    }

    /// For the refresher: waits until woken (a forced fetch, or retirement).
    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }

    /// The policy was replaced by a reload: its refresher stops, and requests waiting for a
    /// fetch are let go.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.wake.notify_one();
        self.attempts.send_modify(|count| *count += 1);
    }

    pub(crate) fn retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

/// One request counted among those waiting, for as long as it waits.
struct Waiting<'a> {
    counter: &'a AtomicUsize,
    /// How many wait, this one included.
    count: usize,
}

impl<'a> Waiting<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        let count = counter.fetch_add(1, Ordering::Relaxed) + 1;
        Self { counter, count }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const RSA_N: &str = "yRE6rHuNR0QbHO3H3Kt2pOKGVhQqGZXInOduQNxXzuKlvQTLUTv4l4sggh5_CYYi_cvI-SXVT9kPWSKXxJXBXd_4LkvcPuUakBoAkfh-eiFVMh2VrUyWyj3MFl0HTVF9KwRXLAcwkREiS3npThHRyIxuy0ZMeZfxVL5arMhw1SRELB8HoGfG_AtH89BIE9jDBHZ9dLelK9a184zAf8LwoPLxvJb3Il5nncqPcSfKDDodMFBIMc4lQzDKL5gvmiXLXB1AGLm8KBjfE8s3L5xqi-yUod-j8MtvIj812dkS4QMiRVN_by2h3ZY8LYVGrqZXZTcgn2ujn8uKjXLZVD5TdQ";

    fn acceptance(algorithms: &[Algorithm], remote: bool) -> Acceptance {
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms.to_vec();
        validation.validate_aud = false;
        Acceptance { validation, remote }
    }

    fn hs_token(kid: Option<&str>, secret: &[u8]) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        let claims = json!({ "sub": "alice", "exp": 4_000_000_000u64 });
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn keys_are_kept_only_where_the_policy_can_use_them() {
        let set = json!({ "keys": [
            { "kty": "RSA", "kid": "rsa", "n": RSA_N, "e": "AQAB" },
            { "kty": "RSA", "kid": "enc", "use": "enc", "n": RSA_N, "e": "AQAB" },
            { "kty": "RSA", "kid": "ps", "alg": "PS256", "n": RSA_N, "e": "AQAB" },
            { "kty": "oct", "kid": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA" },
            { "kty": "XYZ", "kid": "unknown" },
        ]})
        .to_string();
        let remote = acceptance(&[Algorithm::RS256], true)
            .parse(set.as_bytes())
            .unwrap();
        // Only the RS256-capable signing key: not the encryption key, not the PS256 one, no
        // symmetric key from a remote set, and the unknown kind skipped without failing.
        assert_eq!((remote.len(), remote.skipped), (1, 4));
        assert!(remote.key_for(Some("rsa"), Algorithm::RS256).is_ok());
        assert!(matches!(
            remote.key_for(Some("oct"), Algorithm::HS256),
            Err(AuthError::UnknownKey)
        ));
        assert!(matches!(
            remote.key_for(Some("rsa"), Algorithm::RS384),
            Err(AuthError::Invalid(_))
        ));
        // None usable at all is an error, not an empty set.
        assert!(matches!(
            acceptance(&[Algorithm::ES256], true).parse(set.as_bytes()),
            Err(JwksError::NoUsableKey { skipped: 5 })
        ));
        assert!(matches!(
            acceptance(&[Algorithm::RS256], true).parse(b"[]"),
            Err(JwksError::NotJson(_))
        ));
    }

    #[test]
    fn a_token_is_checked_with_the_key_its_kid_names() {
        let secret = b"secret-secret-secret-secret-secret";
        let set = json!({ "keys": [
            { "kty": "oct", "kid": "one", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA" },
            { "kty": "oct", "kid": "two", "k": "b3RoZXItb3RoZXItb3RoZXItb3RoZXItb3RoZXI" },
        ]})
        .to_string();
        let keys = JwksKeys::from_file(
            acceptance(&[Algorithm::HS256], false),
            set.as_bytes(),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(
            keys.verify(&hs_token(Some("one"), secret)).unwrap()["sub"],
            "alice"
        );
        assert!(matches!(
            keys.verify(&hs_token(Some("two"), secret)),
            Err(AuthError::Invalid("token signature is invalid"))
        ));
        assert!(matches!(
            keys.verify(&hs_token(Some("three"), secret)),
            Err(AuthError::UnknownKey)
        ));
        // Without a kid, only a set of one key says which key is meant.
        assert!(matches!(
            keys.verify(&hs_token(None, secret)),
            Err(AuthError::Invalid("token names no key (kid)"))
        ));
        let empty = JwksKeys::new(acceptance(&[Algorithm::HS256], false), Duration::ZERO);
        assert!(matches!(
            empty.verify(&hs_token(Some("one"), secret)),
            Err(AuthError::Unavailable)
        ));
    }

    #[tokio::test]
    async fn a_set_installed_since_the_token_was_judged_is_a_reason_to_judge_it_again() {
        let set = json!({ "keys": [
            { "kty": "oct", "kid": "one", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA" },
        ]})
        .to_string();
        let remote = JwksKeys::new(
            acceptance(&[Algorithm::HS256], false),
            Duration::from_secs(30),
        );
        let seen = remote.generation();
        remote.install(Bytes::from(set.clone())).unwrap();
        // A fetch finished between the token's check and its request for one: judged again
        // at once, without another fetch (the file set below has no refresher to ask).
        assert!(remote.refetch_for_unknown_kid(seen, Duration::ZERO).await);
        assert!(
            !remote
                .refetch_for_unknown_kid(remote.generation(), Duration::ZERO)
                .await
        );
    }
}
