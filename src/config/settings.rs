//! The validated configuration: what the edge runs with. A value of these types exists only
//! once everything it names has been read, parsed and built, so the runtime never checks again.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use rustls::pki_types::ServerName;
use serde::Deserialize;

use crate::auth::AuthPolicy;
use crate::auth::jwks::JwksKeys;
use crate::template::Template;

pub struct Config {
    pub(crate) server: ServerSettings,
    pub(crate) admin: Option<AdminSettings>,
    pub log: LogSettings,
    /// `None`: this edge stands alone.
    pub(crate) cluster: Option<Arc<ClusterSettings>>,
    pub(crate) policies: BTreeMap<String, Arc<AuthPolicy>>,
    pub(crate) routes: Vec<Arc<RouteSettings>>,
    /// The key sets fetched from identity providers, one per policy with `jwks = { url }`.
    pub(crate) jwks: Vec<JwksSource>,
    /// Things that are allowed but deserve attention (inline secrets, keys not enforced yet),
    /// already formatted as `file:line:col: warning: …`.
    pub warnings: Vec<String>,
}

impl Config {
    /// How many `[[route]]` and `[auth.NAME]` it has.
    pub fn counts(&self) -> (usize, usize) {
        (self.routes.len(), self.policies.len())
    }
}

/// A policy's key set at an identity provider.
pub(crate) struct JwksSource {
    pub(crate) policy: String,
    /// The set's URL (HTTPS), as a target: host, port, path, TLS.
    pub(crate) target: TargetSettings,
    /// How often the set is fetched again (sooner when the provider's `max-age` says so).
    pub(crate) refresh: Duration,
    pub(crate) keys: Arc<JwksKeys>,
}

/// A configuration that failed to load: every problem found, each with its location.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub diagnostics: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.diagnostics.join("\n"))
    }
}

pub(crate) struct ServerSettings {
    pub(crate) listen: Vec<SocketAddr>,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) handshake_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) drain_timeout: Duration,
    pub(crate) max_header_size: usize,
    /// Concurrent connections one user (per tenant) may hold; `None` = unlimited.
    pub(crate) max_connections_per_user: Option<u32>,
    /// Connections still in TLS or before their upgrade; more are closed as they arrive.
    pub(crate) max_pending_handshakes: usize,
    /// Of those, how many one address (an IPv6 /64) may hold; `None` = no limit of its own.
    pub(crate) max_pending_handshakes_per_ip: Option<usize>,
    pub(crate) handshake_rate_per_ip: Option<RateLimit>,
    /// Threads, each with its own event loop and its own listening socket per address.
    pub(crate) workers: usize,
}

pub(crate) struct AdminSettings {
    pub(crate) listen: SocketAddr,
    /// The `/admin/` API's bearer token; `None`: the API answers 404.
    pub(crate) token: Option<Vec<u8>>,
    /// Where revocations survive a restart; `None`: in memory only.
    pub(crate) state_dir: Option<PathBuf>,
}

/// `[cluster]`: the edges that share one Redis.
pub(crate) struct ClusterSettings {
    /// Where Redis is (its URL may hold a password: never logged).
    pub(crate) redis: redis::ConnectionInfo,
    /// This edge's name among the others (logs, the session directory).
    pub(crate) node: String,
    /// Signs what one edge asks of another over the link.
    pub(crate) secret: Vec<u8>,
    /// How long an edge's leases and sessions outlive its last renewal: a dead edge stops
    /// counting after this.
    pub(crate) node_ttl: Duration,
    pub(crate) on_redis_down: RedisDown,
    /// How long a handshake waits on Redis before `on_redis_down` decides.
    pub(crate) redis_timeout: Duration,
    /// Where this edge listens for other edges' resumes.
    pub(crate) link: SocketAddr,
    /// Where the other edges reach that listener (`host:port`); `None`: the link address.
    pub(crate) advertise: Option<String>,
}

/// What per-user limits and revocation checks do while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RedisDown {
    /// Limits hold per edge, revocations as last known: handshakes go on.
    Open,
    /// Handshakes on authenticated routes are refused with 503 until Redis is back.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
    /// The JSONL audit log, if any.
    pub audit: Option<PathBuf>,
}

/// A token bucket: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RateLimit {
    pub(crate) per_second: f64,
    pub(crate) burst: u32,
}

/// The per-route rules of a connection's life after the upgrade.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Lifecycle {
    /// The edge pings each side this often (`None`: no heartbeats).
    pub(crate) ping_interval: Option<Duration>,
    /// A side that has not answered a ping within this is closed.
    pub(crate) pong_timeout: Duration,
    /// No data message either way for this long closes both sides.
    pub(crate) idle_timeout: Option<Duration>,
    /// A session longer than this is closed.
    pub(crate) max_session: Option<Duration>,
    /// Close the client with 4001 when its token's `exp` (+ grace) passes.
    pub(crate) close_on_token_expiry: bool,
    pub(crate) token_expiry_grace: Duration,
    /// Client → upstream messages per connection.
    pub(crate) message_rate: Option<RateLimit>,
    /// A chat turn (a client message and the upstream's answer) ends when the upstream has
    /// been silent this long after it began answering.
    pub(crate) turn_gap: Duration,
}

impl Default for Lifecycle {
    /// The defaults, and why: a 30 s ping keeps NAT and load-balancer mappings alive (most
    /// drop idle flows after 60–350 s) and finds a vanished phone within 40 s; an idle chat tab
    /// is legitimate, so there is no idle or session limit unless a route asks; 100 messages/s
    /// with a burst of 200 is far above a person typing and below a runaway client loop.
    fn default() -> Self {
        Self {
            ping_interval: Some(Duration::from_secs(30)),
            pong_timeout: Duration::from_secs(10),
            idle_timeout: None,
            max_session: None,
            close_on_token_expiry: true,
            token_expiry_grace: Duration::ZERO,
            message_rate: Some(RateLimit {
                per_second: 100.0,
                burst: 200,
            }),
            turn_gap: Duration::from_secs(5),
        }
    }
}

impl Lifecycle {
    /// When a connection whose token expires at `expires_at` ends for it (`exp` + grace), if
    /// the route ends connections then. An `exp` centuries away (some issuers mint "never
    /// expires" tokens) is no deadline; it must neither overflow the clock arithmetic nor wrap
    /// around to "now".
    pub(crate) fn token_deadline(
        &self,
        expires_at: Option<std::time::SystemTime>,
    ) -> Option<tokio::time::Instant> {
        let exp = expires_at.filter(|_| self.close_on_token_expiry)?;
        let remaining = exp
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::time::Instant::now().checked_add(remaining.checked_add(self.token_expiry_grace)?)
    }
}

/// A route's `resume = { … }`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ResumeSettings {
    /// How long a session whose client dropped is kept for it.
    pub(crate) window: Duration,
    /// Upstream messages kept for a client that may not have received them.
    pub(crate) max_messages: usize,
    pub(crate) max_bytes: usize,
    /// Tell each client what happened to its session in a first `edge.session` message.
    pub(crate) announce: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PathMatch {
    Exact(String),
    /// Matches the path itself and anything below it on a segment boundary.
    Prefix(String),
}

impl PathMatch {
    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            Self::Exact(exact) => path == exact,
            Self::Prefix(prefix) => {
                path.starts_with(prefix.as_str())
                    && (prefix.ends_with('/')
                        || path.len() == prefix.len()
                        || path.as_bytes()[prefix.len()] == b'/')
            }
        }
    }

    pub(crate) fn path(&self) -> &str {
        match self {
            Self::Exact(path) | Self::Prefix(path) => path,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostMatch(String);

impl HostMatch {
    pub(crate) fn new(host: &str) -> Self {
        Self(host.to_ascii_lowercase())
    }

    pub(crate) fn matches(&self, host: Option<&str>) -> bool {
        host.is_some_and(|host| host.eq_ignore_ascii_case(&self.0))
    }

    pub(crate) fn host(&self) -> &str {
        &self.0
    }
}

/// The query parameter a client names its conversation with.
pub(crate) const CONVERSATION_PARAM: &str = "conversation_id";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ConversationMode {
    /// The token must carry the conversation; a query naming another one is refused.
    Token,
    /// The token's conversation if it has one (the query must agree), else the query's.
    QueryOrToken,
    /// As `QueryOrToken`, and a fresh id when neither names one.
    Generate,
    /// The edge does not deal with conversations.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TenantRule {
    Optional,
    Required,
    /// Only this tenant; a token naming another is refused.
    Pin(String),
    /// The first label of the Host (`acme.chat.example.com` → `acme`).
    FromHost,
    /// The Nth path segment, counting from 1.
    FromPath(usize),
}

/// One upstream URL, parsed once.
#[derive(Debug, Clone)]
pub(crate) struct TargetSettings {
    /// Scheme, authority and path only: what logs and the audit log show. A query or user
    /// info in the configured URL may hold credentials.
    pub(crate) url: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    /// `host[:port]` for the Host header, the port left out when it is the default.
    pub(crate) authority: String,
    pub(crate) path: String,
    pub(crate) query: Option<String>,
    pub(crate) tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

/// How a route passes on requests that are not WebSocket upgrades (`http = "proxy"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpSettings {
    /// The longest wait for the upstream's response head, and between two reads of a body
    /// either way; never a bound on a whole exchange (an SSE stream runs for minutes).
    pub(crate) timeout: Duration,
    /// The largest request body passed on (413 past it).
    pub(crate) max_body_size: u64,
}

/// Which of a route's targets a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Affinity {
    /// Round robin over the healthy targets.
    None,
    /// One target per tenant and user while it is healthy: what a backend keeping per-client
    /// state on one node (Engine.IO's `sid`) needs from its polling requests and its upgrade.
    User,
}

/// One `[[route]]`.
pub(crate) struct RouteSettings {
    pub(crate) path: PathMatch,
    pub(crate) host: Option<HostMatch>,
    pub(crate) targets: Vec<TargetSettings>,
    pub(crate) auth: Option<Arc<AuthPolicy>>,
    pub(crate) allowed_origins: Option<Vec<String>>,
    pub(crate) conversation: ConversationMode,
    pub(crate) tenant: TenantRule,
    pub(crate) inject: Vec<(HeaderName, Template)>,
    pub(crate) upstream_query: Vec<(String, Template)>,
    pub(crate) forward_token: bool,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_message_size: usize,
    pub(crate) lifecycle: Lifecycle,
    /// How long a target that failed to connect is passed over.
    pub(crate) upstream_cooldown: Duration,
    pub(crate) affinity: Affinity,
    /// Sessions survive a client's drop (`resume = { … }`).
    pub(crate) resume: Option<ResumeSettings>,
    /// Requests that are not upgrades are proxied (`http = "proxy"`), or refused with 426.
    pub(crate) http: Option<HttpSettings>,
}

impl RouteSettings {
    /// A short label for logs and metrics: the host (if any) and path, `*` for a prefix.
    pub(crate) fn label(&self) -> String {
        let path = match &self.path {
            PathMatch::Exact(path) => path.clone(),
            PathMatch::Prefix(path) => format!("{path}*"),
        };
        match &self.host {
            Some(host) => format!("{}{path}", host.host()),
            None => path,
        }
    }

    pub(crate) fn origin_allowed(&self, origin: Option<&str>) -> bool {
        match (&self.allowed_origins, origin) {
            (None, _) => true,
            // Origin is what browsers send and cannot forge; other clients can send anything,
            // so requiring it would stop CLI clients without stopping an attacker.
            (Some(_), None) => true,
            (Some(allowed), Some(origin)) => allowed
                .iter()
                .any(|entry| entry == "*" || entry.eq_ignore_ascii_case(origin)),
        }
    }
}

/// Header names that belong to the WebSocket handshake itself or to hop-by-hop semantics: a
/// route cannot inject them, and a client's copies never go upstream.
pub(crate) fn is_reserved_header(name: &HeaderName) -> bool {
    use http::header::*;
    [
        HOST,
        CONNECTION,
        UPGRADE,
        SEC_WEBSOCKET_KEY,
        SEC_WEBSOCKET_VERSION,
        SEC_WEBSOCKET_ACCEPT,
        SEC_WEBSOCKET_EXTENSIONS,
        SEC_WEBSOCKET_PROTOCOL,
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        TE,
        TRAILER,
    ]
    .contains(name)
}

#[cfg(test)]
impl RouteSettings {
    /// A route to no upstream with every other setting at its default, for unit tests.
    pub(crate) fn for_test(path: PathMatch, host: Option<&str>) -> Self {
        Self {
            path,
            host: host.map(HostMatch::new),
            targets: vec![],
            auth: None,
            allowed_origins: None,
            conversation: ConversationMode::QueryOrToken,
            tenant: TenantRule::Optional,
            inject: vec![],
            upstream_query: vec![],
            forward_token: false,
            connect_timeout: Duration::from_secs(1),
            max_message_size: 1024,
            lifecycle: Lifecycle::default(),
            upstream_cooldown: Duration::from_secs(10),
            affinity: Affinity::None,
            resume: None,
            http: None,
        }
    }
}
