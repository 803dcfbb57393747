//! JWT algorithms by name, the key family they belong to, and what makes a key usable: the
//! rules a policy's `algorithms` and key must meet before the edge verifies anything with them.

use jsonwebtoken::{Algorithm, AlgorithmFamily};

/// A policy's algorithms or key that cannot verify tokens.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("algorithms must name at least one algorithm")]
    NoAlgorithms,
    #[error(
        "algorithms mix key families ({0:?}); one policy verifies with one key, so use one family per policy"
    )]
    MixedFamilies(Vec<Algorithm>),
    #[error(
        "unsupported algorithm {0:?}: expected one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"
    )]
    UnsupportedAlgorithm(String),
    #[error("HS* algorithms verify with `secret`, not `public_key`")]
    SecretExpected,
    #[error("{0:?} algorithms verify with a PEM `public_key`, not a `secret`")]
    PublicKeyExpected(AlgorithmFamily),
    #[error("public_key is not an RSA public key in PEM: {0}")]
    NotRsaPublicKey(jsonwebtoken::errors::Error),
    #[error("public_key is not an EC public key in PEM: {0}")]
    NotEcPublicKey(jsonwebtoken::errors::Error),
    #[error("public_key is not an Ed25519 public key in PEM: {0}")]
    NotEdPublicKey(jsonwebtoken::errors::Error),
    #[error("the HMAC secret is {0} bytes; use at least 32 random bytes")]
    ShortSecret(usize),
}

/// The one family all the algorithms belong to.
pub(crate) fn common_family(algorithms: &[Algorithm]) -> Result<AlgorithmFamily, KeyError> {
    let first = algorithms.first().ok_or(KeyError::NoAlgorithms)?;
    let family = first.family();
    if algorithms.iter().any(|alg| alg.family() != family) {
        return Err(KeyError::MixedFamilies(algorithms.to_vec()));
    }
    Ok(family)
}

/// An algorithm by its JOSE name.
pub(crate) fn parse_algorithm(name: &str) -> Result<Algorithm, KeyError> {
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
        _ => return Err(KeyError::UnsupportedAlgorithm(name.to_owned())),
    };
    Ok(alg)
}

/// An HMAC secret must be long enough that guessing it is no option.
pub(crate) fn check_secret(secret: &[u8]) -> Result<(), KeyError> {
    if secret.len() < 32 {
        return Err(KeyError::ShortSecret(secret.len()));
    }
    Ok(())
}
