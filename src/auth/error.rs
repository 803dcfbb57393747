//! Why a token was not accepted.

/// A token that is missing, expired or not acceptable; each maps to one refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    #[error("no token in the request")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("{0}")]
    Invalid(&'static str),
}
