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
    /// The token names a key (`kid`) that the policy's key set does not hold.
    #[error("token key (kid) is unknown")]
    UnknownKey,
    /// The policy's keys have not loaded yet (its identity provider has not been reached).
    #[error("the policy's keys are not loaded yet")]
    Unavailable,
}
