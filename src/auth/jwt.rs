//! JWT verification (and minting, for `wsedge token` and tests).
//!
//! Algorithm confusion is closed twice: the policy's algorithm list must all belong to the
//! family of its key (checked when the config is loaded), and a token whose header names an
//! algorithm outside that list is refused — by `hmac_jwt.rs` for HS* policies, which holds
//! only HMAC keys, and by jsonwebtoken for the others, which also refuses a family other than
//! the key's. `alg: none` is an algorithm neither knows, so such a token never parses.

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use std::time::Duration;

use super::algorithm::{KeyError, check_secret, common_family};
use super::claims::Claims;
use super::error::AuthError;
use super::hmac_jwt::HmacVerifier;

/// Key material for a policy, by algorithm family.
pub(crate) enum VerifyingKey {
    Secret(Vec<u8>),
    PublicPem(Vec<u8>),
}

pub(crate) enum JwtVerifier {
    /// HS*: verified by the edge with keys prepared once (`hmac_jwt.rs`).
    Hmac(HmacVerifier),
    /// RS*, PS*, ES*, EdDSA: verified by jsonwebtoken.
    Library {
        key: DecodingKey,
        validation: Validation,
    },
}

pub(crate) struct JwtSettings<'a> {
    pub(crate) algorithms: &'a [Algorithm],
    pub(crate) issuer: &'a [String],
    pub(crate) audience: &'a [String],
    pub(crate) leeway: Duration,
}

impl JwtVerifier {
    pub(crate) fn new(settings: &JwtSettings, key: &VerifyingKey) -> Result<Self, KeyError> {
        let family = common_family(settings.algorithms)?;
        if let (AlgorithmFamily::Hmac, VerifyingKey::Secret(secret)) = (family, key) {
            check_secret(secret)?;
            return Ok(Self::Hmac(HmacVerifier::new(
                settings.algorithms,
                secret,
                settings.issuer,
                settings.audience,
                settings.leeway,
            )));
        }
        Self::library(settings, key)
    }

    /// The jsonwebtoken verifier, for every family (HS* too, to compare the two in tests).
    pub(super) fn library(settings: &JwtSettings, key: &VerifyingKey) -> Result<Self, KeyError> {
        let family = common_family(settings.algorithms)?;
        let key = match (family, key) {
            (AlgorithmFamily::Hmac, VerifyingKey::Secret(secret)) => {
                check_secret(secret)?;
                DecodingKey::from_secret(secret)
            }
            (AlgorithmFamily::Hmac, VerifyingKey::PublicPem(_)) => {
                return Err(KeyError::SecretExpected);
            }
            (_, VerifyingKey::Secret(_)) => return Err(KeyError::PublicKeyExpected(family)),
            (AlgorithmFamily::Rsa, VerifyingKey::PublicPem(pem)) => {
                DecodingKey::from_rsa_pem(pem).map_err(KeyError::NotRsaPublicKey)?
            }
            (AlgorithmFamily::Ec, VerifyingKey::PublicPem(pem)) => {
                DecodingKey::from_ec_pem(pem).map_err(KeyError::NotEcPublicKey)?
            }
            (AlgorithmFamily::Ed, VerifyingKey::PublicPem(pem)) => {
                DecodingKey::from_ed_pem(pem).map_err(KeyError::NotEdPublicKey)?
            }
        };

        let validation = validation(settings, settings.algorithms.to_vec());
        Ok(Self::Library { key, validation })
    }

    pub(crate) fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        match self {
            Self::Hmac(verifier) => verifier.verify(token),
            Self::Library { key, validation } => decode(token, key, validation),
        }
    }

    /// The leeway given to `exp` and `nbf`, in seconds.
    pub(crate) fn leeway(&self) -> u64 {
        match self {
            Self::Hmac(verifier) => verifier.leeway(),
            Self::Library { validation, .. } => validation.leeway,
        }
    }
}

/// What jsonwebtoken checks of a token besides its signature: `exp` (required) and `nbf` with
/// the leeway, the issuer and audience when the policy names them, and `algorithms`.
pub(crate) fn validation(settings: &JwtSettings, algorithms: Vec<Algorithm>) -> Validation {
    let mut validation = Validation::new(settings.algorithms[0]);
    validation.algorithms = algorithms;
    validation.leeway = settings.leeway.as_secs();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if !settings.issuer.is_empty() {
        validation.set_issuer(settings.issuer);
        required.push("iss");
    }
    if settings.audience.is_empty() {
        // Without a configured audience there is nothing to compare an `aud` claim to.
        validation.validate_aud = false;
    } else {
        validation.set_audience(settings.audience);
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// Verifies `token` with jsonwebtoken; its errors as the refusals they become.
pub(crate) fn decode(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<Claims, AuthError> {
    use jsonwebtoken::errors::ErrorKind;
    let claims = jsonwebtoken::decode::<Claims>(token, key, validation)
        .map(|data| data.claims)
        .map_err(|error| match error.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::Invalid("token is not valid yet"),
            ErrorKind::InvalidIssuer => AuthError::Invalid("token issuer is not accepted"),
            ErrorKind::InvalidAudience => AuthError::Invalid("token audience is not accepted"),
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                AuthError::Invalid("token algorithm is not accepted")
            }
            ErrorKind::InvalidSignature => AuthError::Invalid("token signature is invalid"),
            ErrorKind::MissingRequiredClaim(_) => {
                AuthError::Invalid("token lacks a required claim")
            }
            _ => AuthError::Invalid("token is malformed"),
        })?;
    super::hmac_jwt::check_strict(token)?;
    Ok(claims)
}

/// Whether claims that verified before have expired since (with `leeway` seconds, as at their
/// verification).
pub(crate) fn check_time(claims: &Claims, leeway: u64) -> Result<(), AuthError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    match claims.get("exp").and_then(super::claims::numeric_date) {
        Some(exp) if exp < now.saturating_sub(leeway) => Err(AuthError::Expired),
        _ => Ok(()),
    }
}

/// A token that cannot be signed with the key given.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("not an RSA private key in PEM: {0}")]
    NotRsaPrivateKey(jsonwebtoken::errors::Error),
    #[error("not an EC private key in PEM (PKCS#8): {0}")]
    NotEcPrivateKey(jsonwebtoken::errors::Error),
    #[error("not an Ed25519 private key in PEM: {0}")]
    NotEdPrivateKey(jsonwebtoken::errors::Error),
    #[error("HS* tokens are signed with the policy's secret, not a private key")]
    SecretExpected,
    #[error("{0:?} tokens are signed with a private key: pass --key PRIVATE_KEY.pem")]
    PrivateKeyExpected(Algorithm),
    #[error("signing failed: {0}")]
    Signing(jsonwebtoken::errors::Error),
}

/// Signs claims with a policy's key: the HMAC secret, or a PEM private key for the other families.
pub(crate) fn mint(
    algorithm: Algorithm,
    key: &SigningKey,
    claims: &Claims,
    kid: Option<&str>,
) -> Result<String, MintError> {
    let encoding_key = match (algorithm.family(), key) {
        (AlgorithmFamily::Hmac, SigningKey::Secret(secret)) => EncodingKey::from_secret(secret),
        (AlgorithmFamily::Rsa, SigningKey::PrivatePem(pem)) => {
            EncodingKey::from_rsa_pem(pem).map_err(MintError::NotRsaPrivateKey)?
        }
        (AlgorithmFamily::Ec, SigningKey::PrivatePem(pem)) => {
            EncodingKey::from_ec_pem(pem).map_err(MintError::NotEcPrivateKey)?
        }
        (AlgorithmFamily::Ed, SigningKey::PrivatePem(pem)) => {
            EncodingKey::from_ed_pem(pem).map_err(MintError::NotEdPrivateKey)?
        }
        (AlgorithmFamily::Hmac, SigningKey::PrivatePem(_)) => {
            return Err(MintError::SecretExpected);
        }
        (_, SigningKey::Secret(_)) => return Err(MintError::PrivateKeyExpected(algorithm)),
    };
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &encoding_key).map_err(MintError::Signing)
}

pub(crate) enum SigningKey {
    Secret(Vec<u8>),
    PrivatePem(Vec<u8>),
}
