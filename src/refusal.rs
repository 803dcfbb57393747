//! Refusals before the upgrade: each reason maps to exactly one status, answered as plain HTTP
//! with a small JSON body `{"error": "...", "message": "..."}`.

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::auth::AuthError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    /// A stable machine-readable reason, also used in logs and metrics.
    pub reason: &'static str,
    pub message: Cow<'static, str>,
}

impl Refusal {
    fn new(
        status: StatusCode,
        reason: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }

    pub fn no_route() -> Self {
        Self::new(StatusCode::NOT_FOUND, "no_route", "no route for this path")
    }

    pub fn not_websocket() -> Self {
        Self::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint only accepts WebSocket upgrades",
        )
    }

    pub fn bad_handshake(message: &'static str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_handshake", message)
    }

    pub fn origin() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "origin not allowed",
        )
    }

    pub fn auth(error: &AuthError) -> Self {
        let reason = match error {
            AuthError::Missing => "token_missing",
            AuthError::Expired => "token_expired",
            AuthError::Invalid(_) => "token_invalid",
        };
        Self::new(StatusCode::UNAUTHORIZED, reason, error.to_string())
    }

    pub fn forbidden(reason: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, reason, message)
    }

    pub fn full() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "capacity",
            "the edge is at its connection limit",
        )
    }

    pub fn handshake_rate() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many handshakes from this address",
        )
    }

    pub fn too_many_connections() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            "this user already holds the maximum number of connections",
        )
    }

    pub fn draining() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the edge is shutting down",
        )
    }

    pub fn upstream_unreachable() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_unreachable",
            "upstream unreachable",
        )
    }

    pub fn upstream_bad_response() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_bad_handshake",
            "upstream answered the upgrade with an invalid response",
        )
    }

    pub fn upstream_timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            "upstream did not complete the handshake in time",
        )
    }

    /// The upstream refused the upgrade with its own status, which the client gets as is.
    pub fn upstream_refused(status: StatusCode) -> Self {
        Self::new(status, "upstream_refused", "upstream refused the upgrade")
    }

    /// The limit this refusal enforces, for `wsedge_limit_hits_total`.
    pub(crate) fn limit_kind(&self) -> Option<crate::metrics::Limit> {
        use crate::metrics::Limit;
        match self.reason {
            "rate_limited" => Some(Limit::HandshakeRatePerIp),
            "too_many_connections" => Some(Limit::MaxConnectionsPerUser),
            "capacity" => Some(Limit::MaxConnections),
            _ => None,
        }
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({ "error": self.reason, "message": self.message });
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // One request per connection: a refused client must not keep an idle connection open
        // (hyper's header timeout only covers the wait for a connection's first request).
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        match self.reason {
            "token_missing" => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"wsedge\""),
                );
            }
            "token_expired" => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"wsedge\", error=\"invalid_token\", error_description=\"token expired\""),
                );
            }
            "token_invalid" => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"wsedge\", error=\"invalid_token\""),
                );
            }
            "rate_limited" | "too_many_connections" => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            "upgrade_required" => {
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
            _ => {}
        }
        response
    }
}
