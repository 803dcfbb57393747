//! HMAC-signed connection parameters (`kind = "hmac"`), for backends that mint them instead of
//! JWTs: the query carries the user, tenant, conversation, an expiry (Unix seconds) and the
//! lowercase hex HMAC-SHA256, keyed with the policy's secret, of
//! `"wsedge-hmac-v1\n" + user + "\n" + tenant + "\n" + conversation + "\n" + expires` (an
//! absent value is the empty string).
//!
//! A value holding a control character is refused: with a line break in a value, two different
//! sets of parameters could make the same signed string, and one user's signature would open
//! another user's identity.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::{constant_time, hmac};

use super::ClaimNames;
use super::claims::Claims;
use super::error::AuthError;
use super::token_source::{FoundToken, TokenSource};
use crate::query;

/// What the signed string starts with: a signature for something else never fits.
const CONTEXT: &str = "wsedge-hmac-v1";

/// The query parameter names, `params = { user, tenant, conversation, expires, signature }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParamNames {
    pub(crate) user: String,
    pub(crate) tenant: String,
    pub(crate) conversation: String,
    pub(crate) expires: String,
    pub(crate) signature: String,
}

impl Default for ParamNames {
    fn default() -> Self {
        Self {
            user: "user_id".into(),
            tenant: "tenant_id".into(),
            conversation: "conversation_id".into(),
            expires: "expires".into(),
            signature: "signature".into(),
        }
    }
}

impl ParamNames {
    /// All five, as token sources: none of them is passed upstream.
    pub(crate) fn sources(&self) -> Vec<TokenSource> {
        [
            &self.user,
            &self.tenant,
            &self.conversation,
            &self.expires,
            &self.signature,
        ]
        .into_iter()
        .map(|name| TokenSource::Query(name.clone()))
        .collect()
    }
}

/// The values one request carries.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Signed {
    pub(crate) user: String,
    pub(crate) tenant: String,
    pub(crate) conversation: String,
    pub(crate) expires: String,
}

impl Signed {
    /// The string the signature is over.
    fn message(&self) -> String {
        format!(
            "{CONTEXT}\n{}\n{}\n{}\n{}",
            self.user, self.tenant, self.conversation, self.expires
        )
    }
}

/// A `kind = "hmac"` policy's verifier.
pub(crate) struct SignedParams {
    key: hmac::Key,
    pub(crate) names: ParamNames,
    /// How far out `expires` may be.
    pub(crate) max_ttl: Duration,
    /// Seconds of grace for `expires`, as JWT policies give `exp`.
    pub(crate) leeway: u64,
}

impl SignedParams {
    pub(crate) fn new(secret: &[u8], names: ParamNames, max_ttl: Duration, leeway: u64) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            names,
            max_ttl,
            leeway,
        }
    }

    /// The parameters of `query`, as one token: the signed string and the signature, a line
    /// apart (what the connection's memo remembers and [`Self::verify`] reads). `None`
    /// without a signature; an error when a parameter comes twice.
    pub(crate) fn find(&self, query: Option<&str>) -> Result<Option<FoundToken>, AuthError> {
        let mut signed = Signed::default();
        let mut signature = None::<String>;
        let names = &self.names;
        let mut seen = [false; 5];
        for pair in query::pairs(query.unwrap_or("")) {
            let key = pair.key.as_ref();
            let slot = match key {
                _ if key == names.user => 0,
                _ if key == names.tenant => 1,
                _ if key == names.conversation => 2,
                _ if key == names.expires => 3,
                _ if key == names.signature => 4,
                _ => continue,
            };
            if std::mem::replace(&mut seen[slot], true) {
                return Err(AuthError::Invalid("a signed parameter is given twice"));
            }
            let value = pair
                .exact_value()
                .ok_or(AuthError::Invalid("a signed parameter is not UTF-8"))?
                .into_owned();
            match slot {
                0 => signed.user = value,
                1 => signed.tenant = value,
                2 => signed.conversation = value,
                3 => signed.expires = value,
                _ => signature = Some(value),
            }
        }
        let Some(signature) = signature.filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let values = [
            &signed.user,
            &signed.tenant,
            &signed.conversation,
            &signed.expires,
            &signature,
        ];
        if values.iter().any(|v| v.chars().any(char::is_control)) {
            return Err(AuthError::Invalid(
                "a signed parameter holds a control character",
            ));
        }
        Ok(Some(FoundToken {
            token: format!("{}\n{signature}", signed.message()),
            source: TokenSource::Query(names.signature.clone()),
        }))
    }

    /// Checks a token made by [`Self::find`]: its signature, its expiry and `max_ttl`; the
    /// claims it stands for, named as the policy's `claims` say.
    pub(crate) fn verify(
        &self,
        token: &str,
        claim_names: &ClaimNames,
    ) -> Result<Claims, AuthError> {
        let malformed = AuthError::Invalid("the signed parameters are malformed");
        let (message, signature) = token.rsplit_once('\n').ok_or(malformed.clone())?;
        let mut lines = message.split('\n');
        let (Some(CONTEXT), Some(user), Some(tenant), Some(conversation), Some(expires), None) = (
            lines.next(),
            lines.next(),
            lines.next(),
            lines.next(),
            lines.next(),
            lines.next(),
        ) else {
            return Err(malformed);
        };
        let expected = hmac::sign(&self.key, message.as_bytes());
        let given = decode_hex(signature).ok_or(AuthError::Invalid("signature is not hex"))?;
        if constant_time::verify_slices_are_equal(expected.as_ref(), &given).is_err() {
            return Err(AuthError::Invalid("signature is invalid"));
        }
        if user.is_empty() {
            return Err(AuthError::Invalid("the signed parameters name no user"));
        }
        let expires: u64 = expires
            .parse()
            .map_err(|_| AuthError::Invalid("expires is not a Unix time in seconds"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        if expires < now.saturating_sub(self.leeway) {
            return Err(AuthError::Expired);
        }
        if expires > now.saturating_add(self.max_ttl.as_secs()) {
            return Err(AuthError::Invalid("expires is further out than max_ttl"));
        }
        let mut claims = Claims::new();
        claims.insert(claim_names.user.clone(), user.into());
        if !tenant.is_empty() {
            claims.insert(claim_names.tenant.clone(), tenant.into());
        }
        if !conversation.is_empty() {
            claims.insert(claim_names.conversation.clone(), conversation.into());
        }
        claims.insert("exp".into(), expires.into());
        Ok(claims)
    }

    /// The query string that signs `signed` (for `wsedge token` and tests).
    pub(crate) fn query_string(&self, signed: &Signed) -> String {
        let tag = hmac::sign(&self.key, signed.message().as_bytes());
        let signature: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let names = &self.names;
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair(&names.user, &signed.user);
        if !signed.tenant.is_empty() {
            query.append_pair(&names.tenant, &signed.tenant);
        }
        if !signed.conversation.is_empty() {
            query.append_pair(&names.conversation, &signed.conversation);
        }
        query.append_pair(&names.expires, &signed.expires);
        query.append_pair(&names.signature, &signature);
        query.finish()
    }
}

/// Lowercase hex, two digits a byte (one signature, one spelling).
fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? * 16 + digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"hmac-secret-hmac-secret-hmac-secret";

    fn params() -> SignedParams {
        SignedParams::new(SECRET, ParamNames::default(), Duration::from_secs(3600), 0)
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn signed(expires: u64) -> Signed {
        Signed {
            user: "alice".into(),
            tenant: "acme".into(),
            conversation: "c42".into(),
            expires: expires.to_string(),
        }
    }

    fn check(params: &SignedParams, query: &str) -> Result<Claims, AuthError> {
        let found = params.find(Some(query))?.ok_or(AuthError::Missing)?;
        params.verify(&found.token, &ClaimNames::default())
    }

    #[test]
    fn the_signature_is_the_documented_hmac() {
        // The canonical string, signed independently of the code under test.
        let message = "wsedge-hmac-v1\nalice\nacme\nc42\n1900000000";
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, SECRET),
            message.as_bytes(),
        );
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let query = params().query_string(&signed(1_900_000_000));
        assert!(query.ends_with(&format!("&signature={hex}")), "{query}");
        assert!(
            query
                .starts_with("user_id=alice&tenant_id=acme&conversation_id=c42&expires=1900000000")
        );
    }

    #[test]
    fn valid_parameters_become_claims_and_every_fault_is_refused() {
        let params = params();
        let good = params.query_string(&signed(now() + 60));
        let claims = check(&params, &good).unwrap();
        assert_eq!(
            (
                &claims["sub"],
                &claims["tenant_id"],
                &claims["conversation_id"]
            ),
            (&"alice".into(), &"acme".into(), &"c42".into())
        );
        let tampered = good.replace("user_id=alice", "user_id=mallory");
        assert_eq!(
            check(&params, &tampered).unwrap_err(),
            AuthError::Invalid("signature is invalid")
        );
        let other = good.replace("conversation_id=c42", "conversation_id=c43");
        assert!(check(&params, &other).is_err());
        let wrong_key = SignedParams::new(
            b"another-secret-another-secret-xx",
            ParamNames::default(),
            Duration::from_secs(3600),
            0,
        );
        assert!(check(&wrong_key, &good).is_err());
        let expired = params.query_string(&signed(now() - 5));
        assert_eq!(check(&params, &expired).unwrap_err(), AuthError::Expired);
        let too_far = params.query_string(&signed(now() + 7200));
        assert_eq!(
            check(&params, &too_far).unwrap_err(),
            AuthError::Invalid("expires is further out than max_ttl")
        );
        let upper = {
            let (head, signature) = good.split_once("&signature=").unwrap();
            format!("{head}&signature={}", signature.to_uppercase())
        };
        assert_eq!(
            check(&params, &upper).unwrap_err(),
            AuthError::Invalid("signature is not hex")
        );
        let not_utf8 = good.replace("user_id=alice", "user_id=alic%FF");
        assert!(check(&params, &not_utf8).is_err());
        // Percent-encoding is read: an encoded name or value is the same parameter.
        let encoded = good.replace("user_id=alice", "user%5Fid=%61lice");
        assert!(check(&params, &encoded).is_ok());
        let unsigned = good.split("&signature=").next().unwrap().to_owned();
        assert_eq!(check(&params, &unsigned).unwrap_err(), AuthError::Missing);
        let twice = format!("{good}&user_id=alice");
        assert!(check(&params, &twice).is_err());
        // A line break moved between values makes the same signed string: refused.
        let mut shifted = signed(now() + 60);
        shifted.user = "alice\nacme".into();
        shifted.tenant = String::new();
        let query = params.query_string(&shifted);
        assert!(check(&params, &query).is_err());
    }
}
