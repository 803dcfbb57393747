//! HS256/384/512 tokens verified with keys prepared once per policy.
//!
//! jsonwebtoken prepares the HMAC key again for every token, and decodes the header twice and
//! the claims twice (once for its checks, once for the caller): a large share of a handshake's
//! work in the edge (BENCHMARKS.md, "What moved the figures"). This path does each step once and keeps jsonwebtoken's order and outcomes (the
//! tests below compare the two token by token), with three differences: it refuses a claim
//! named twice (RFC 7519 §4 lets a parser refuse it; jsonwebtoken refuses only some names) and
//! a `crit` header (RFC 7515 §4.1.11: the edge understands no extension), and it does not look
//! at header members other than `alg` (jsonwebtoken refuses, say, a numeric `typ`; the
//! signature covers them either way).

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::algorithm::parse_algorithm;
use super::claims::{Claims, Parsed, names, numeric};
use super::error::AuthError;

const MALFORMED: AuthError = AuthError::Invalid("token is malformed");
const ALGORITHM: AuthError = AuthError::Invalid("token algorithm is not accepted");

pub(crate) struct HmacVerifier {
    /// The accepted algorithms, each with the secret prepared for it.
    keys: Vec<(Algorithm, hmac::Key)>,
    leeway: u64,
    issuer: Vec<String>,
    audience: Vec<String>,
}

impl HmacVerifier {
    /// `algorithms` are all HS*: the caller checked the family.
    pub(crate) fn new(
        algorithms: &[Algorithm],
        secret: &[u8],
        issuer: &[String],
        audience: &[String],
        leeway: Duration,
    ) -> Self {
        let keys = algorithms
            .iter()
            .filter_map(|&alg| {
                let hmac_alg = match alg {
                    Algorithm::HS256 => hmac::HMAC_SHA256,
                    Algorithm::HS384 => hmac::HMAC_SHA384,
                    Algorithm::HS512 => hmac::HMAC_SHA512,
                    _ => return None,
                };
                Some((alg, hmac::Key::new(hmac_alg, secret)))
            })
            .collect();
        Self {
            keys,
            leeway: leeway.as_secs(),
            issuer: issuer.to_vec(),
            audience: audience.to_vec(),
        }
    }

    pub(crate) fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let (message, signature) = token.rsplit_once('.').ok_or(MALFORMED)?;
        let (header, payload) = message.rsplit_once('.').ok_or(MALFORMED)?;

        let header = decode(header)?;
        let header: Header = serde_json::from_slice(&header).map_err(|_| MALFORMED)?;
        if header.crit.is_some() {
            return Err(AuthError::Invalid("token names critical extensions"));
        }
        // The names jsonwebtoken's `Algorithm` reads; anything else is malformed, as there.
        let algorithm = parse_algorithm(&header.alg).map_err(|_| MALFORMED)?;
        let key = self
            .keys
            .iter()
            .find(|(alg, _)| *alg == algorithm)
            .map(|(_, key)| key)
            .ok_or(ALGORITHM)?;
        let signature = decode(signature)?;
        hmac::verify(key, message.as_bytes(), &signature)
            .map_err(|_| AuthError::Invalid("token signature is invalid"))?;

        let payload = decode(payload)?;
        let UniqueClaims(claims) = serde_json::from_slice(&payload).map_err(|_| MALFORMED)?;
        self.validate(&claims)?;
        Ok(claims)
    }

    pub(super) fn leeway(&self) -> u64 {
        self.leeway
    }

    /// jsonwebtoken's checks, in its order: required claims, then `exp` and `nbf` with the
    /// leeway, then issuer and audience.
    fn validate(&self, claims: &Claims) -> Result<(), AuthError> {
        let exp = numeric(claims.get("exp"));
        let nbf = numeric(claims.get("nbf"));
        let iss = names(claims.get("iss"));
        let aud = names(claims.get("aud"));
        let lacks = AuthError::Invalid("token lacks a required claim");
        let Parsed::Value(exp) = exp else {
            return Err(lacks);
        };
        if !self.issuer.is_empty() && !matches!(iss, Parsed::Value(_)) {
            return Err(lacks);
        }
        if !self.audience.is_empty() && !matches!(aud, Parsed::Value(_)) {
            return Err(lacks);
        }
        if matches!(nbf, Parsed::Malformed) {
            return Err(MALFORMED);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        if exp < now.saturating_sub(self.leeway) {
            return Err(AuthError::Expired);
        }
        if let Parsed::Value(nbf) = nbf
            && nbf > now.saturating_add(self.leeway)
        {
            return Err(AuthError::Invalid("token is not valid yet"));
        }
        if !self.issuer.is_empty() && !names_one_of(&iss, &self.issuer) {
            return Err(AuthError::Invalid("token issuer is not accepted"));
        }
        if !self.audience.is_empty() && !names_one_of(&aud, &self.audience) {
            return Err(AuthError::Invalid("token audience is not accepted"));
        }
        Ok(())
    }
}

/// Whether a claim's names include one of the accepted (required claims are present here).
fn names_one_of(names: &Parsed<Vec<&str>>, accepted: &[String]) -> bool {
    match names {
        Parsed::Value(names) => names
            .iter()
            .any(|name| accepted.iter().any(|ok| ok == name)),
        Parsed::Malformed | Parsed::Absent => false,
    }
}

/// What jsonwebtoken lets through and the edge does not: a `crit` header, and a claim named
/// twice (jsonwebtoken keeps the last). For tokens jsonwebtoken has verified.
pub(super) fn check_strict(token: &str) -> Result<(), AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload)) = (parts.next(), parts.next()) else {
        return Err(MALFORMED);
    };
    let header = decode(header)?;
    let header: Header = serde_json::from_slice(&header).map_err(|_| MALFORMED)?;
    if header.crit.is_some() {
        return Err(AuthError::Invalid("token names critical extensions"));
    }
    serde_json::from_slice::<UniqueClaims>(&decode(payload)?).map_err(|_| MALFORMED)?;
    Ok(())
}

fn decode(part: &str) -> Result<Vec<u8>, AuthError> {
    URL_SAFE_NO_PAD.decode(part).map_err(|_| MALFORMED)
}

/// The JOSE header: only what verification needs; other members are not looked at.
#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    crit: Option<IgnoredAny>,
}

/// A JSON object whose member names are all different.
struct UniqueClaims(Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueClaims {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ClaimsVisitor;

        impl<'de> Visitor<'de> for ClaimsVisitor {
            type Value = UniqueClaims;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of claims")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<UniqueClaims, A::Error> {
                let mut claims = Map::new();
                while let Some((name, value)) = access.next_entry::<String, Value>()? {
                    if claims.contains_key(&name) {
                        return Err(de::Error::custom(format!("claim {name:?} appears twice")));
                    }
                    claims.insert(name, value);
                }
                Ok(UniqueClaims(claims))
            }
        }

        deserializer.deserialize_map(ClaimsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::jwt::{JwtSettings, JwtVerifier, VerifyingKey};
    use serde_json::json;

    const SECRET: &[u8] = b"differential-secret-0123456789abcdef";

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn sign(alg: hmac::Algorithm, header: &str, claims: &str) -> String {
        let message = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
        let tag = hmac::sign(&hmac::Key::new(alg, SECRET), message.as_bytes());
        format!("{message}.{}", b64(tag.as_ref()))
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// Tokens of every shape worth telling apart: good, expired, early, wrong issuer or
    /// audience, odd claim types, odd headers, broken signatures and structure.
    fn tokens() -> Vec<(String, String)> {
        let now = now();
        let mut claim_sets = vec![
            json!({"sub": "alice", "exp": now + 60}).to_string(),
            json!({"sub": "alice", "exp": now - 10}).to_string(),
            json!({"sub": "alice", "exp": now - 100}).to_string(),
            json!({"sub": "alice", "exp": (now + 60) as f64 + 0.4}).to_string(),
            json!({"sub": "alice", "exp": (now - 10) as f64 - 0.6}).to_string(),
            json!({"sub": "alice", "exp": "soon"}).to_string(),
            json!({"sub": "alice", "exp": null}).to_string(),
            json!({"sub": "alice", "exp": -5}).to_string(),
            json!({"sub": "alice", "exp": 1e30}).to_string(),
            json!({"sub": "alice", "exp": true}).to_string(),
            json!({"sub": "alice"}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "nbf": now + 10}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "nbf": now + 100}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "nbf": now - 100}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "nbf": "later"}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "nbf": null}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "iss": "https://issuer"}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "iss": "https://other"}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "iss": ["https://other", "https://issuer"]})
                .to_string(),
            json!({"sub": "alice", "exp": now + 60, "iss": ["https://other"]}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "iss": 7}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "iss": ["https://issuer", 7]}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "aud": "chat"}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "aud": "billing"}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "aud": ["billing", "api"]}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "aud": ["billing"]}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "aud": []}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "aud": {"x": 1}}).to_string(),
            json!({"sub": "alice", "exp": now + 60, "iss": "https://issuer", "aud": "chat",
                   "tenant": "acme", "nested": {"a": [1, 2.5, null]}})
            .to_string(),
            json!({"sub": 42, "exp": now + 60}).to_string(),
            format!(
                r#"{{"sub":"alice","exp":{},"iss":"https:\/\/issuer","aud":"ch\u0061t"}}"#,
                now + 60
            ),
            format!(r#"{{"sub":"alice","exp":{},"exp":{}}}"#, now + 60, now + 61),
            "[]".to_owned(),
            "\"alice\"".to_owned(),
            "{".to_owned(),
            format!(r#"{{"exp":{}}} x"#, now + 60),
        ];
        claim_sets.push(format!(
            r#"  {{ "sub" : "alice" , "exp" : {} }}  "#,
            now + 60
        ));
        let headers = [
            (r#"{"alg":"HS256","typ":"JWT"}"#, hmac::HMAC_SHA256),
            (r#"{"alg":"HS512"}"#, hmac::HMAC_SHA512),
            (r#"{"alg":"HS384"}"#, hmac::HMAC_SHA384),
            (r#"{"alg":"HS\u0032\u00356"}"#, hmac::HMAC_SHA256),
            (r#"{"alg":"none"}"#, hmac::HMAC_SHA256),
            (r#"{"alg":"hs256"}"#, hmac::HMAC_SHA256),
            (r#"{"alg":"RS256"}"#, hmac::HMAC_SHA256),
            (r#"{"alg":"ES256"}"#, hmac::HMAC_SHA256),
            (r#"{"typ":"JWT"}"#, hmac::HMAC_SHA256),
            (r#"{"alg":"HS256","alg":"HS256"}"#, hmac::HMAC_SHA256),
            (r#"{"alg":5}"#, hmac::HMAC_SHA256),
            ("[]", hmac::HMAC_SHA256),
            ("not json", hmac::HMAC_SHA256),
        ];
        let mut tokens = Vec::new();
        for (header, alg) in headers {
            for claims in &claim_sets {
                let token = sign(alg, header, claims);
                tokens.push((format!("{header} {claims}"), token.clone()));
                // The same token with its signature broken in a few ways.
                let (message, signature) = token.rsplit_once('.').unwrap();
                let mut flipped = URL_SAFE_NO_PAD.decode(signature).unwrap();
                flipped[0] ^= 1;
                for (how, bad) in [
                    ("flipped", format!("{message}.{}", b64(&flipped))),
                    ("empty", format!("{message}.")),
                    ("not base64", format!("{message}.!!")),
                    ("padded", format!("{token}=")),
                    ("truncated", format!("{message}.{}", &signature[..10])),
                ] {
                    tokens.push((format!("{header} {claims} ({how})"), bad));
                }
            }
        }
        let good = sign(hmac::HMAC_SHA256, r#"{"alg":"HS256"}"#, &claim_sets[0]);
        for (how, token) in [
            ("two parts", good.rsplit_once('.').unwrap().0.to_owned()),
            ("four parts", format!("{good}.x")),
            ("leading dot", format!(".{good}")),
            ("trailing dot", format!("{good}.")),
            ("spaces", format!(" {good} ")),
            ("empty", String::new()),
            ("dots", "..".to_owned()),
            ("header with a dot", format!("a.{good}")),
        ] {
            tokens.push((how.to_owned(), token));
        }
        tokens
    }

    #[test]
    fn hmac_tokens_are_judged_as_jsonwebtoken_judges_them() {
        let issuer = vec!["https://issuer".to_owned()];
        let audience = vec!["chat".to_owned(), "api".to_owned()];
        let none: Vec<String> = Vec::new();
        let key = VerifyingKey::Secret(SECRET.to_vec());
        let mut compared = 0;
        for algorithms in [
            vec![Algorithm::HS256],
            vec![Algorithm::HS256, Algorithm::HS512],
        ] {
            for (issuer, audience) in [
                (&none, &none),
                (&issuer, &none),
                (&none, &audience),
                (&issuer, &audience),
            ] {
                for leeway in [Duration::ZERO, Duration::from_secs(30)] {
                    let settings = JwtSettings {
                        algorithms: &algorithms,
                        issuer,
                        audience,
                        leeway,
                    };
                    let ours = JwtVerifier::new(&settings, &key).unwrap();
                    assert!(matches!(ours, JwtVerifier::Hmac(_)));
                    let theirs = JwtVerifier::library(&settings, &key).unwrap();
                    for (case, token) in tokens() {
                        let (a, b) = (ours.verify(&token), theirs.verify(&token));
                        if a != b {
                            panic!(
                                "{case}\n  algorithms {algorithms:?} issuer {issuer:?} audience {audience:?} leeway {leeway:?}\n  ours:         {a:?}\n  jsonwebtoken: {b:?}"
                            );
                        }
                        compared += 1;
                    }
                }
            }
        }
        assert!(compared > 10_000, "{compared}");
    }

    #[test]
    fn a_claim_named_twice_and_critical_extensions_are_refused() {
        let verifier = HmacVerifier::new(&[Algorithm::HS256], SECRET, &[], &[], Duration::ZERO);
        let exp = now() + 60;
        let twice = sign(
            hmac::HMAC_SHA256,
            r#"{"alg":"HS256"}"#,
            &format!(r#"{{"sub":"alice","sub":"mallory","exp":{exp}}}"#),
        );
        assert_eq!(verifier.verify(&twice), Err(MALFORMED));
        let crit = sign(
            hmac::HMAC_SHA256,
            r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
            &format!(r#"{{"sub":"alice","exp":{exp}}}"#),
        );
        assert!(verifier.verify(&crit).is_err());
        let fine = sign(
            hmac::HMAC_SHA256,
            r#"{"alg":"HS256"}"#,
            &format!(r#"{{"sub":"alice","exp":{exp}}}"#),
        );
        assert_eq!(verifier.verify(&fine).unwrap()["sub"], "alice");
    }
}
