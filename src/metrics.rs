//! Typed metrics in Prometheus text format (prometheus-client, rather than hand-formatting:
//! escaping, histogram buckets and `# TYPE` lines are easy to get subtly wrong).
//!
//! Handles are resolved once per connection (a label lookup takes a lock); per batch of
//! frames the relay only adds to atomics it already holds.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    pub(crate) route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HandshakeLabels {
    pub(crate) route: String,
    /// 101 for an upgrade, else the refusal status.
    pub(crate) status: u16,
    pub(crate) reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HttpLabels {
    pub(crate) route: String,
    pub(crate) status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabels {
    pub(crate) route: String,
    /// "client_to_upstream" or "upstream_to_client".
    pub(crate) direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CloseLabels {
    /// The side the close was sent to: "client" or "upstream".
    pub(crate) side: &'static str,
    pub(crate) code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LimitLabels {
    pub(crate) kind: &'static str,
}

/// A limit that stopped a request or a connection: `wsedge_limit_hits_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    HandshakeRatePerIp,
    MaxConnectionsPerUser,
    MaxConnections,
    MaxPendingHandshakes,
    MaxPendingHandshakesPerIp,
    HandshakeTimeout,
    MaxHeaderSize,
    MaxMessageSize,
    MessageRate,
    IdleTimeout,
    MaxSession,
    ResumeBuffer,
}

impl Limit {
    /// The `kind` label: the name of the setting that set the limit.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::HandshakeRatePerIp => "handshake_rate_per_ip",
            Self::MaxConnectionsPerUser => "max_connections_per_user",
            Self::MaxConnections => "max_connections",
            Self::MaxPendingHandshakes => "max_pending_handshakes",
            Self::MaxPendingHandshakesPerIp => "max_pending_handshakes_per_ip",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::MaxHeaderSize => "max_header_size",
            Self::MaxMessageSize => "max_message_size",
            Self::MessageRate => "message_rate",
            Self::IdleTimeout => "idle_timeout",
            Self::MaxSession => "max_session",
            Self::ResumeBuffer => "resume_buffer",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResumeLabels {
    pub(crate) route: String,
    /// "resumed", or why not: "unknown", "expired", "overflowed", "ahead", "closed",
    /// "in_use", "conversation".
    pub(crate) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct JwksFetchLabels {
    pub(crate) policy: String,
    /// "ok", "error" (not reached, not 200, too large, timed out) or "invalid" (no usable key).
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PolicyLabels {
    pub(crate) policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OpLabels {
    pub(crate) op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    pub(crate) kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SideLabels {
    /// "in": another edge's client relayed to a session here; "out": a client here relayed to
    /// its session on another edge.
    pub(crate) side: &'static str,
}

/// What several edges sharing Redis (`[cluster]`) count.
#[derive(Default)]
pub(crate) struct ClusterMetrics {
    pub(crate) redis_up: Gauge,
    pub(crate) redis_errors: Family<OpLabels, Counter>,
    /// Handshakes decided by `on_redis_down` ("open" let through, "closed" refused).
    pub(crate) redis_down_decisions: Family<ResultLabels, Counter>,
    pub(crate) events: Family<KindLabels, Counter>,
    pub(crate) links: Family<SideLabels, Gauge>,
    pub(crate) remote_resumes: Family<ResultLabels, Counter>,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) open_connections: Family<RouteLabels, Gauge>,
    pub(crate) handshakes: Family<HandshakeLabels, Counter>,
    pub(crate) messages: Family<DirectionLabels, Counter>,
    pub(crate) bytes: Family<DirectionLabels, Counter>,
    pub(crate) session_duration: HistogramFamily<RouteLabels>,
    pub(crate) upstream_connect: HistogramFamily<RouteLabels>,
    pub(crate) closes: Family<CloseLabels, Counter>,
    pub(crate) limit_hits: Family<LimitLabels, Counter>,
    pub(crate) reloads: Family<ResultLabels, Counter>,
    pub(crate) audit_dropped: Counter,
    pub(crate) resumes: Family<ResumeLabels, Counter>,
    pub(crate) sessions_detached: Gauge,
    pub(crate) resume_buffered_messages: Gauge,
    pub(crate) resume_buffered_bytes: Gauge,
    pub(crate) http_requests: Family<HttpLabels, Counter>,
    pub(crate) http_request_seconds: HistogramFamily<RouteLabels>,
    pub(crate) jwks_fetches: Family<JwksFetchLabels, Counter>,
    pub(crate) jwks_keys: Family<PolicyLabels, Gauge>,
    pub(crate) first_response_seconds: HistogramFamily<RouteLabels>,
    pub(crate) turn_messages: HistogramFamily<RouteLabels>,
    pub(crate) turn_seconds: HistogramFamily<RouteLabels>,
    pub(crate) cluster: ClusterMetrics,
}

/// A route's chat-turn histograms (see `relay::turns`).
#[derive(Clone)]
pub(crate) struct TurnMetrics {
    /// Client message → first upstream message of its turn.
    pub(crate) first_response: Histogram,
    /// Upstream messages in a turn.
    pub(crate) messages: Histogram,
    /// Client message → last upstream message of an answered turn.
    pub(crate) seconds: Histogram,
}

/// A route's handles for what every upgraded connection touches, resolved once per route
/// (each lookup by label takes a lock and an allocation) rather than once per handshake.
pub(crate) struct RouteMetrics {
    pub(crate) upgraded: Counter,
    pub(crate) connect: Histogram,
    pub(crate) session: Histogram,
    /// On routes that proxy plain HTTP.
    pub(crate) http_seconds: Option<Histogram>,
    /// `wsedge_http_requests_total{status="200"}` of the route, resolved once: most proxied
    /// requests are counted there, and a lookup by label takes a lock and two allocations.
    pub(crate) http_ok: Option<Counter>,
    pub(crate) open: Gauge,
    pub(crate) client_to_upstream: DirectionCounters,
    pub(crate) upstream_to_client: DirectionCounters,
    pub(crate) turns: Arc<TurnMetrics>,
}

/// The two counters of one direction of one connection.
#[derive(Clone, Default)]
pub(crate) struct DirectionCounters {
    pub(crate) messages: Counter,
    pub(crate) bytes: Counter,
}

impl DirectionCounters {
    pub(crate) fn add(&self, messages: u64, bytes: u64) {
        self.messages.inc_by(messages);
        self.bytes.inc_by(bytes);
    }
}

/// Counts something in a gauge for as long as the guard lives.
pub(crate) struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub(crate) fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn first_response_buckets() -> Histogram {
    // 10 ms to ~80 s: a cached answer to a model thinking for a minute.
    Histogram::new(exponential_buckets(0.01, 2.0, 14))
}

fn turn_message_buckets() -> Histogram {
    // 1 to 16,384 messages: a one-line reply to a long answer streamed token by token.
    Histogram::new(exponential_buckets(1.0, 2.0, 15))
}

fn turn_buckets() -> Histogram {
    // 50 ms to ~14 min.
    Histogram::new(exponential_buckets(0.05, 2.0, 15))
}

fn session_buckets() -> Histogram {
    // 1 s to ~9 h.
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

fn http_buckets() -> Histogram {
    // 1 ms to ~2 min (a long-poll's length).
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

fn connect_buckets() -> Histogram {
    // 0.25 ms to ~8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("wsedge");
        let metrics = Metrics {
            open_connections: Family::default(),
            handshakes: Family::default(),
            messages: Family::default(),
            bytes: Family::default(),
            session_duration: Family::new_with_constructor(session_buckets as fn() -> Histogram),
            upstream_connect: Family::new_with_constructor(connect_buckets as fn() -> Histogram),
            closes: Family::default(),
            limit_hits: Family::default(),
            reloads: Family::default(),
            audit_dropped: Counter::default(),
            resumes: Family::default(),
            sessions_detached: Gauge::default(),
            resume_buffered_messages: Gauge::default(),
            resume_buffered_bytes: Gauge::default(),
            http_requests: Family::default(),
            http_request_seconds: Family::new_with_constructor(http_buckets as fn() -> Histogram),
            jwks_fetches: Family::default(),
            jwks_keys: Family::default(),
            first_response_seconds: Family::new_with_constructor(
                first_response_buckets as fn() -> Histogram,
            ),
            turn_messages: Family::new_with_constructor(turn_message_buckets as fn() -> Histogram),
            turn_seconds: Family::new_with_constructor(turn_buckets as fn() -> Histogram),
            cluster: ClusterMetrics::default(),
            registry: Registry::default(),
        };
        registry.register(
            "open_connections",
            "Proxied WebSocket connections open now",
            metrics.open_connections.clone(),
        );
        registry.register(
            "handshakes",
            "Handshakes by outcome: status 101 for an upgrade, else the refusal status and reason",
            metrics.handshakes.clone(),
        );
        registry.register(
            "messages",
            "Data messages relayed, by direction",
            metrics.messages.clone(),
        );
        registry.register(
            "bytes",
            "Payload bytes relayed, by direction",
            metrics.bytes.clone(),
        );
        registry.register(
            "session_duration_seconds",
            "Length of proxied sessions",
            metrics.session_duration.clone(),
        );
        registry.register(
            "upstream_connect_seconds",
            "Time to connect to the upstream and complete its handshake",
            metrics.upstream_connect.clone(),
        );
        registry.register(
            "closes",
            "Close frames sent or passed on, by the side they went to and their code",
            metrics.closes.clone(),
        );
        registry.register(
            "limit_hits",
            "Requests or connections stopped by a limit, by kind",
            metrics.limit_hits.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result",
            metrics.reloads.clone(),
        );
        registry.register(
            "audit_dropped",
            "Audit events dropped because the audit writer fell behind",
            metrics.audit_dropped.clone(),
        );
        registry.register(
            "resumes",
            "Attempts to resume a session, by outcome",
            metrics.resumes.clone(),
        );
        registry.register(
            "sessions_detached",
            "Resumable sessions whose client is away, kept for the resume window",
            metrics.sessions_detached.clone(),
        );
        registry.register(
            "resume_buffered_messages",
            "Upstream messages kept for clients that may not have received them",
            metrics.resume_buffered_messages.clone(),
        );
        registry.register(
            "resume_buffered_bytes",
            "Bytes of the upstream messages kept for resumes",
            metrics.resume_buffered_bytes.clone(),
        );
        registry.register(
            "http_requests",
            "Plain HTTP requests on routes that proxy them, by response status (refusals included)",
            metrics.http_requests.clone(),
        );
        registry.register(
            "http_request_seconds",
            "Length of proxied HTTP exchanges, from the request to the end of the response body",
            metrics.http_request_seconds.clone(),
        );
        registry.register(
            "first_response_seconds",
            "Time from a client's message to the upstream's first message of its answer (time to first token)",
            metrics.first_response_seconds.clone(),
        );
        registry.register(
            "turn_messages",
            "Upstream messages in a chat turn (a client message and the answer to it)",
            metrics.turn_messages.clone(),
        );
        registry.register(
            "turn_seconds",
            "Time from a client's message to the last message of its answer",
            metrics.turn_seconds.clone(),
        );
        registry.register(
            "jwks_fetches",
            "Fetches of identity providers' key sets, by policy and result",
            metrics.jwks_fetches.clone(),
        );
        registry.register(
            "jwks_keys",
            "Usable keys in each policy's key set",
            metrics.jwks_keys.clone(),
        );
        let cluster = &metrics.cluster;
        registry.register(
            "cluster_redis_up",
            "1 while the cluster's Redis answers, 0 while it does not",
            cluster.redis_up.clone(),
        );
        registry.register(
            "cluster_redis_errors",
            "Redis calls that failed or timed out, by what they were for",
            cluster.redis_errors.clone(),
        );
        registry.register(
            "cluster_redis_down_decisions",
            "Handshakes that on_redis_down decided while Redis was down: let through (open) or refused (closed)",
            cluster.redis_down_decisions.clone(),
        );
        registry.register(
            "cluster_events",
            "Disconnects, revocations and lifts received from other edges",
            cluster.events.clone(),
        );
        registry.register(
            "cluster_links",
            "Clients relayed between this edge and the edge holding their session, open now",
            cluster.links.clone(),
        );
        registry.register(
            "cluster_remote_resumes",
            "Resumes of sessions held by another edge, by result",
            cluster.remote_resumes.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The Prometheus text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub(crate) fn direction(&self, route: &str, direction: &'static str) -> DirectionCounters {
        let labels = DirectionLabels {
            route: route.to_owned(),
            direction,
        };
        DirectionCounters {
            messages: self.messages.get_or_create_owned(&labels),
            bytes: self.bytes.get_or_create_owned(&labels),
        }
    }

    pub(crate) fn for_route(&self, route: &str, http: bool) -> RouteMetrics {
        let labels = RouteLabels {
            route: route.to_owned(),
        };
        RouteMetrics {
            upgraded: self.handshakes.get_or_create_owned(&HandshakeLabels {
                route: route.to_owned(),
                status: 101,
                reason: "ok".to_owned(),
            }),
            connect: self.upstream_connect.get_or_create_owned(&labels),
            session: self.session_duration.get_or_create_owned(&labels),
            http_seconds: http.then(|| self.http_request_seconds.get_or_create_owned(&labels)),
            http_ok: http.then(|| {
                self.http_requests.get_or_create_owned(&HttpLabels {
                    route: route.to_owned(),
                    status: 200,
                })
            }),
            open: self.open_connections.get_or_create_owned(&labels),
            client_to_upstream: self.direction(route, "client_to_upstream"),
            upstream_to_client: self.direction(route, "upstream_to_client"),
            turns: Arc::new(TurnMetrics {
                first_response: self.first_response_seconds.get_or_create_owned(&labels),
                messages: self.turn_messages.get_or_create_owned(&labels),
                seconds: self.turn_seconds.get_or_create_owned(&labels),
            }),
        }
    }

    pub(crate) fn handshake(&self, route: &str, status: u16, reason: &str) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                route: route.to_owned(),
                status,
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub(crate) fn http_request(&self, route: &str, status: u16) {
        self.http_requests
            .get_or_create(&HttpLabels {
                route: route.to_owned(),
                status,
            })
            .inc();
    }

    pub(crate) fn limit_hit(&self, limit: Limit) {
        self.limit_hits
            .get_or_create(&LimitLabels {
                kind: limit.label(),
            })
            .inc();
    }

    pub(crate) fn close(&self, side: &'static str, code: u16) {
        self.closes.get_or_create(&CloseLabels { side, code }).inc();
    }

    pub(crate) fn resume(&self, route: &str, outcome: &'static str) {
        self.resumes
            .get_or_create(&ResumeLabels {
                route: route.to_owned(),
                outcome,
            })
            .inc();
    }

    pub(crate) fn jwks_fetch(&self, policy: &str, result: &'static str) {
        self.jwks_fetches
            .get_or_create(&JwksFetchLabels {
                policy: policy.to_owned(),
                result,
            })
            .inc();
    }

    pub(crate) fn jwks_keys(&self, policy: &str, keys: usize) {
        self.jwks_keys
            .get_or_create(&PolicyLabels {
                policy: policy.to_owned(),
            })
            .set(keys as i64);
    }

    pub(crate) fn forget_jwks_keys(&self, policy: &str) {
        self.jwks_keys.remove(&PolicyLabels {
            policy: policy.to_owned(),
        });
    }

    pub(crate) fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "refused" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_families_and_values() {
        let metrics = Metrics::new();
        metrics.handshake("/ws/chat", 401, "token_missing");
        metrics
            .direction("/ws/chat", "upstream_to_client")
            .add(3, 96);
        metrics.for_route("/ws/chat", false).open.inc();
        let text = metrics.encode();
        assert!(text.contains("wsedge_handshakes_total{route=\"/ws/chat\",status=\"401\",reason=\"token_missing\"} 1"), "{text}");
        assert!(
            text.contains(
                "wsedge_messages_total{route=\"/ws/chat\",direction=\"upstream_to_client\"} 3"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "wsedge_bytes_total{route=\"/ws/chat\",direction=\"upstream_to_client\"} 96"
            ),
            "{text}"
        );
        assert!(
            text.contains("wsedge_open_connections{route=\"/ws/chat\"} 1"),
            "{text}"
        );
    }
}
