//! Refusals before the upgrade: each is answered as plain HTTP with a small JSON body
//! `{"error": "...", "message": "..."}`. Status, reason, message, extra headers and the limit
//! a refusal enforces are decided in one match ([`Refusal::describe`]).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::auth::error::AuthError;
use crate::forward::ClaimNotAHeader;
use crate::metrics::Limit;
use crate::upstream::websocket::ConnectError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Too many handshakes from this address.
    RateLimited,
    NoRoute,
    /// Not a WebSocket upgrade, or not version 13.
    UpgradeRequired,
    /// A malformed upgrade; the message says what.
    BadHandshake(&'static str),
    /// A malformed request, upgrade or not; the message says what.
    BadRequest(&'static str),
    /// A request body past the route's `max_body_size`.
    BodyTooLarge,
    /// A client that stopped sending its request body for `http_timeout`.
    RequestTimeout,
    OriginNotAllowed,
    Draining,
    /// `max_connections` reached.
    Capacity,
    TokenMissing,
    TokenExpired,
    /// A token that does not verify; the message says why.
    TokenInvalid(&'static str),
    /// A token signed with a key the policy's key set does not hold (yet: the edge may fetch
    /// the set again and look once more).
    TokenKeyUnknown,
    /// The policy's keys have not loaded yet: its identity provider has not been reached.
    AuthUnavailable,
    /// The token, or its user, was revoked by an operator.
    TokenRevoked,
    /// Redis cannot be reached and the cluster's `on_redis_down` is "closed".
    ClusterUnavailable,
    TenantRequired,
    /// The tenant rule refused; the message says which way.
    TenantNotAllowed(&'static str),
    ConversationRequired,
    ConversationNotAllowed,
    /// The user already holds `max_connections_per_user`.
    TooManyConnections,
    UpstreamUnreachable,
    UpstreamBadHandshake,
    UpstreamTimeout,
    /// The upstream accepted a proxied request and then failed it (closed, answered garbage).
    UpstreamFailed,
    /// The upstream answered the upgrade with its own status, which the client gets as is.
    UpstreamRefused(StatusCode),
}

/// Headers a refusal adds to its response.
enum Extra {
    None,
    /// `WWW-Authenticate` with this value.
    Bearer(&'static str),
    /// `Retry-After: 1`.
    RetryAfter,
    /// The `Upgrade` and `Sec-WebSocket-Version` a client should have sent.
    Upgrade,
}

/// Everything a refusal is.
struct Description {
    status: StatusCode,
    /// A stable machine-readable reason, also used in logs and metrics.
    reason: &'static str,
    message: &'static str,
    limit: Option<Limit>,
    extra: Extra,
}

impl Refusal {
    fn describe(self) -> Description {
        use StatusCode as S;
        let (status, reason, message, limit, extra) = match self {
            Self::RateLimited => (
                S::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many handshakes from this address",
                Some(Limit::HandshakeRatePerIp),
                Extra::RetryAfter,
            ),
            Self::NoRoute => (
                S::NOT_FOUND,
                "no_route",
                "no route for this path",
                None,
                Extra::None,
            ),
            Self::UpgradeRequired => (
                S::UPGRADE_REQUIRED,
                "upgrade_required",
                "this endpoint only accepts WebSocket upgrades",
                None,
                Extra::Upgrade,
            ),
            Self::BadHandshake(message) => {
                (S::BAD_REQUEST, "bad_handshake", message, None, Extra::None)
            }
            Self::BadRequest(message) => {
                (S::BAD_REQUEST, "bad_request", message, None, Extra::None)
            }
            Self::BodyTooLarge => (
                S::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body is larger than this route accepts",
                None,
                Extra::None,
            ),
            Self::RequestTimeout => (
                S::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body stopped arriving",
                None,
                Extra::None,
            ),
            Self::OriginNotAllowed => (
                S::FORBIDDEN,
                "origin_not_allowed",
                "origin not allowed",
                None,
                Extra::None,
            ),
            Self::TokenKeyUnknown => (
                S::UNAUTHORIZED,
                "token_invalid",
                "token key (kid) is unknown",
                None,
                Extra::Bearer("Bearer realm=\"wsedge\", error=\"invalid_token\""),
            ),
            Self::TokenRevoked => (
                S::UNAUTHORIZED,
                "token_revoked",
                "the token has been revoked",
                None,
                Extra::Bearer(
                    "Bearer realm=\"wsedge\", error=\"invalid_token\", error_description=\"token revoked\"",
                ),
            ),
            Self::AuthUnavailable => (
                S::SERVICE_UNAVAILABLE,
                "auth_unavailable",
                "the identity provider's keys are not loaded yet",
                None,
                Extra::RetryAfter,
            ),
            Self::ClusterUnavailable => (
                S::SERVICE_UNAVAILABLE,
                "cluster_unavailable",
                "the edges' shared state cannot be reached",
                None,
                Extra::RetryAfter,
            ),
            Self::Draining => (
                S::SERVICE_UNAVAILABLE,
                "draining",
                "the edge is shutting down",
                None,
                Extra::None,
            ),
            Self::Capacity => (
                S::SERVICE_UNAVAILABLE,
                "capacity",
                "the edge is at its connection limit",
                Some(Limit::MaxConnections),
                Extra::None,
            ),
            Self::TokenMissing => (
                S::UNAUTHORIZED,
                "token_missing",
                "no token in the request",
                None,
                Extra::Bearer("Bearer realm=\"wsedge\""),
            ),
            Self::TokenExpired => (
                S::UNAUTHORIZED,
                "token_expired",
                "token expired",
                None,
                Extra::Bearer(
                    "Bearer realm=\"wsedge\", error=\"invalid_token\", error_description=\"token expired\"",
                ),
            ),
            Self::TokenInvalid(message) => (
                S::UNAUTHORIZED,
                "token_invalid",
                message,
                None,
                Extra::Bearer("Bearer realm=\"wsedge\", error=\"invalid_token\""),
            ),
            Self::TenantRequired => (
                S::FORBIDDEN,
                "tenant_required",
                "the token names no tenant",
                None,
                Extra::None,
            ),
            Self::TenantNotAllowed(message) => (
                S::FORBIDDEN,
                "tenant_not_allowed",
                message,
                None,
                Extra::None,
            ),
            Self::ConversationRequired => (
                S::FORBIDDEN,
                "conversation_required",
                "the token names no conversation",
                None,
                Extra::None,
            ),
            Self::ConversationNotAllowed => (
                S::FORBIDDEN,
                "conversation_not_allowed",
                "the token does not allow this conversation",
                None,
                Extra::None,
            ),
            Self::TooManyConnections => (
                S::TOO_MANY_REQUESTS,
                "too_many_connections",
                "this user already holds the maximum number of connections",
                Some(Limit::MaxConnectionsPerUser),
                Extra::RetryAfter,
            ),
            Self::UpstreamUnreachable => (
                S::BAD_GATEWAY,
                "upstream_unreachable",
                "upstream unreachable",
                None,
                Extra::None,
            ),
            Self::UpstreamBadHandshake => (
                S::BAD_GATEWAY,
                "upstream_bad_handshake",
                "upstream answered the upgrade with an invalid response",
                None,
                Extra::None,
            ),
            Self::UpstreamTimeout => (
                S::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "upstream did not complete the handshake in time",
                None,
                Extra::None,
            ),
            Self::UpstreamFailed => (
                S::BAD_GATEWAY,
                "upstream_failed",
                "upstream failed to answer",
                None,
                Extra::None,
            ),
            Self::UpstreamRefused(status) => (
                status,
                "upstream_refused",
                "upstream refused the upgrade",
                None,
                Extra::None,
            ),
        };
        Description {
            status,
            reason,
            message,
            limit,
            extra,
        }
    }

    pub(crate) fn status(self) -> StatusCode {
        self.describe().status
    }

    /// The stable machine-readable reason: the body's `error`, in logs and metrics.
    pub(crate) fn reason(self) -> &'static str {
        self.describe().reason
    }

    /// The limit this refusal enforces, for `wsedge_limit_hits_total`.
    pub(crate) fn limit(self) -> Option<Limit> {
        self.describe().limit
    }

    pub(crate) fn into_response(self) -> Response<Full<Bytes>> {
        let Description {
            status,
            reason,
            message,
            extra,
            ..
        } = self.describe();
        let body = serde_json::json!({ "error": reason, "message": message });
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // One request per connection: a refused client must not keep an idle connection open
        // (hyper's header timeout only covers the wait for a connection's first request).
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        match extra {
            Extra::None => {}
            Extra::Bearer(challenge) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            Extra::RetryAfter => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Extra::Upgrade => {
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(
                    header::CONNECTION,
                    HeaderValue::from_static("Upgrade, close"),
                );
                headers.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
        }
        response
    }
}

impl From<AuthError> for Refusal {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Missing => Self::TokenMissing,
            AuthError::Expired => Self::TokenExpired,
            AuthError::Invalid(message) => Self::TokenInvalid(message),
            AuthError::UnknownKey => Self::TokenKeyUnknown,
            AuthError::Unavailable => Self::AuthUnavailable,
        }
    }
}

impl From<ConnectError> for Refusal {
    fn from(error: ConnectError) -> Self {
        match error {
            ConnectError::Unreachable(_) => Self::UpstreamUnreachable,
            ConnectError::Timeout => Self::UpstreamTimeout,
            ConnectError::BadResponse(_) => Self::UpstreamBadHandshake,
            ConnectError::Refused(status) => Self::UpstreamRefused(status),
        }
    }
}

impl From<ClaimNotAHeader> for Refusal {
    fn from(_: ClaimNotAHeader) -> Self {
        Self::TokenInvalid("a claim cannot be carried in a header")
    }
}
