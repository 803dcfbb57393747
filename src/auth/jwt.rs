//! JWT verification (and minting, for `wsedge token` and tests).
//!
//! Algorithm confusion is closed twice: the policy's algorithm list must all belong to the
//! family of its key (checked when the config is loaded), and a token whose header names an
//! algorithm outside that list is refused — by `hmac_jwt.rs` for HS* policies, which holds
//! only HMAC keys, and by jsonwebtoken for the others, which also refuses a family other than
//! the key's. `alg: none` is an algorithm neither knows, so such a token never parses.

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};
use std::time::Duration;

use super::AuthError;
use super::hmac_jwt::HmacVerifier;

pub type Claims = Map<String, Value>;

/// Key material for a policy, by algorithm family.
pub enum VerifyingKey {
    Secret(Vec<u8>),
    PublicPem(Vec<u8>),
}

pub enum JwtVerifier {
    /// HS*: verified by the edge with keys prepared once (`hmac_jwt.rs`).
    Hmac(HmacVerifier),
    /// RS*, PS*, ES*, EdDSA: verified by jsonwebtoken.
    Library {
        key: DecodingKey,
        validation: Validation,
    },
}

pub struct JwtSettings<'a> {
    pub algorithms: &'a [Algorithm],
    pub issuer: &'a [String],
    pub audience: &'a [String],
    pub leeway: Duration,
}

/// The one family all the algorithms belong to, or an error naming the mix.
pub fn common_family(algorithms: &[Algorithm]) -> Result<AlgorithmFamily, String> {
    let first = algorithms
        .first()
        .ok_or("algorithms must name at least one algorithm")?;
    let family = first.family();
    if algorithms.iter().any(|alg| alg.family() != family) {
        return Err(format!(
            "algorithms mix key families ({algorithms:?}); one policy verifies with one key, so use one family per policy"
        ));
    }
    Ok(family)
}

pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    let alg = match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => {
            return Err(format!(
                "unsupported algorithm {name:?}: expected one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"
            ));
        }
    };
    Ok(alg)
}

impl JwtVerifier {
    pub fn new(settings: &JwtSettings, key: &VerifyingKey) -> Result<Self, String> {
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
    pub(super) fn library(settings: &JwtSettings, key: &VerifyingKey) -> Result<Self, String> {
        let family = common_family(settings.algorithms)?;
        let key = match (family, key) {
            (AlgorithmFamily::Hmac, VerifyingKey::Secret(secret)) => {
                check_secret(secret)?;
                DecodingKey::from_secret(secret)
            }
            (AlgorithmFamily::Hmac, VerifyingKey::PublicPem(_)) => {
                return Err("HS* algorithms verify with `secret`, not `public_key`".into());
            }
            (_, VerifyingKey::Secret(_)) => {
                return Err(format!(
                    "{family:?} algorithms verify with a PEM `public_key`, not a `secret`"
                ));
            }
            (AlgorithmFamily::Rsa, VerifyingKey::PublicPem(pem)) => DecodingKey::from_rsa_pem(pem)
                .map_err(|e| format!("public_key is not an RSA public key in PEM: {e}"))?,
            (AlgorithmFamily::Ec, VerifyingKey::PublicPem(pem)) => DecodingKey::from_ec_pem(pem)
                .map_err(|e| format!("public_key is not an EC public key in PEM: {e}"))?,
            (AlgorithmFamily::Ed, VerifyingKey::PublicPem(pem)) => DecodingKey::from_ed_pem(pem)
                .map_err(|e| format!("public_key is not an Ed25519 public key in PEM: {e}"))?,
        };

        let mut validation = Validation::new(settings.algorithms[0]);
        validation.algorithms = settings.algorithms.to_vec();
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
        Ok(Self::Library { key, validation })
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let (key, validation) = match self {
            Self::Hmac(verifier) => return verifier.verify(token),
            Self::Library { key, validation } => (key, validation),
        };
        jsonwebtoken::decode::<Claims>(token, key, validation)
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
            })
    }
}

fn check_secret(secret: &[u8]) -> Result<(), String> {
    if secret.len() < 32 {
        return Err(format!(
            "the HMAC secret is {} bytes; use at least 32 random bytes",
            secret.len()
        ));
    }
    Ok(())
}

/// Signs claims with a policy's key: the HMAC secret, or a PEM private key for the other families.
pub fn mint(algorithm: Algorithm, key: &SigningKey, claims: &Claims) -> Result<String, String> {
    let encoding_key = match (algorithm.family(), key) {
        (AlgorithmFamily::Hmac, SigningKey::Secret(secret)) => EncodingKey::from_secret(secret),
        (AlgorithmFamily::Rsa, SigningKey::PrivatePem(pem)) => EncodingKey::from_rsa_pem(pem)
            .map_err(|e| format!("not an RSA private key in PEM: {e}"))?,
        (AlgorithmFamily::Ec, SigningKey::PrivatePem(pem)) => EncodingKey::from_ec_pem(pem)
            .map_err(|e| format!("not an EC private key in PEM (PKCS#8): {e}"))?,
        (AlgorithmFamily::Ed, SigningKey::PrivatePem(pem)) => EncodingKey::from_ed_pem(pem)
            .map_err(|e| format!("not an Ed25519 private key in PEM: {e}"))?,
        (AlgorithmFamily::Hmac, SigningKey::PrivatePem(_)) => {
            return Err("HS* tokens are signed with the policy's secret, not a private key".into());
        }
        (_, SigningKey::Secret(_)) => {
            return Err(format!(
                "{algorithm:?} tokens are signed with a private key: pass --key PRIVATE_KEY.pem"
            ));
        }
    };
    jsonwebtoken::encode(&Header::new(algorithm), claims, &encoding_key)
        .map_err(|e| format!("signing failed: {e}"))
}

pub enum SigningKey {
    Secret(Vec<u8>),
    PrivatePem(Vec<u8>),
}
