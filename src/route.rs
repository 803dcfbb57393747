//! Routes: matching a request to a route, the route's upstream targets, and its identity rules
//! (tenant and conversation).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::HeaderName;
use rustls::pki_types::ServerName;

use crate::auth::{AuthPolicy, Identity};
use crate::refusal::Refusal;
use crate::relay::Lifecycle;
use crate::session::ResumeSettings;
use crate::template::Template;
use crate::tls::UpstreamTls;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// Matches the path itself and anything below it on a segment boundary.
    Prefix(String),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
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

    fn len(&self) -> usize {
        match self {
            Self::Exact(path) | Self::Prefix(path) => path.len(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMatch(String);

impl HostMatch {
    pub fn new(host: &str) -> Self {
        Self(host.to_ascii_lowercase())
    }

    fn matches(&self, host: Option<&str>) -> bool {
        host.is_some_and(|host| host.eq_ignore_ascii_case(&self.0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversationMode {
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
pub enum TenantRule {
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
pub struct UpstreamTarget {
    /// Scheme, authority and path only: what logs and the audit log show. A query or user
    /// info in the configured URL may hold credentials.
    pub url: String,
    pub host: String,
    pub port: u16,
    /// `host[:port]` for the Host header, the port left out when it is the default.
    pub authority: String,
    pub path: String,
    pub query: Option<String>,
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// Passive health: until when (ms on the process clock) this target is passed over.
    down_until: AtomicU64,
}

/// Milliseconds since the first call: a cheap monotonic clock that fits in an atomic.
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl UpstreamTarget {
    pub fn parse(url: &str, tls: Option<&UpstreamTls>) -> Result<Self, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| format!("invalid upstream URL {url:?}"))?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => {
                return Err(format!(
                    "upstream URL {url:?} must start with ws:// or wss://"
                ));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("upstream URL {url:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let default_port = if secure { 443 } else { 80 };
        let port = uri.port_u16().unwrap_or(default_port);
        let host_for_header = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let authority = if port == default_port {
            host_for_header
        } else {
            format!("{host_for_header}:{port}")
        };
        let tls = if secure {
            let tls = tls.ok_or_else(|| {
                format!("upstream {url:?} needs TLS settings that failed to load")
            })?;
            let name = match &tls.server_name {
                Some(name) => name.clone(),
                None => ServerName::try_from(host.clone()).map_err(|_| {
                    format!("upstream host {host:?} is not a valid TLS server name")
                })?,
            };
            Some((tls.config.clone(), name))
        } else {
            None
        };
        Ok(Self {
            url: format!(
                "{}://{authority}{}",
                if secure { "wss" } else { "ws" },
                uri.path()
            ),
            host,
            port,
            authority,
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            tls,
            down_until: AtomicU64::new(0),
        })
    }

    pub fn is_healthy(&self) -> bool {
        self.down_until.load(Ordering::Relaxed) <= clock_ms()
    }

    /// Passes this target over for `cooldown` after it refused or timed out.
    pub fn mark_down(&self, cooldown: Duration) {
        self.down_until
            .store(clock_ms() + cooldown.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn mark_up(&self) {
        if self.down_until.load(Ordering::Relaxed) != 0 {
            self.down_until.store(0, Ordering::Relaxed);
        }
    }
}

/// Everything a route needs, as produced by config validation.
pub struct RouteSettings {
    pub path: PathMatch,
    pub host: Option<HostMatch>,
    pub targets: Vec<UpstreamTarget>,
    pub auth: Option<Arc<AuthPolicy>>,
    pub allowed_origins: Option<Vec<String>>,
    pub conversation: ConversationMode,
    pub tenant: TenantRule,
    pub inject: Vec<(HeaderName, Template)>,
    pub upstream_query: Vec<(String, Template)>,
    pub forward_token: bool,
    pub connect_timeout: Duration,
    pub max_message_size: usize,
    pub lifecycle: Lifecycle,
    /// How long a target that failed to connect is passed over.
    pub upstream_cooldown: Duration,
    /// Sessions survive a client's drop (`resume = { … }`).
    pub resume: Option<ResumeSettings>,
}

pub struct Route {
    pub settings: RouteSettings,
    /// A short label for logs and metrics: the host (if any) and path.
    pub label: Arc<str>,
    next_target: AtomicUsize,
    /// This route's metric handles, resolved at its first connection.
    pub metrics: OnceLock<crate::metrics::RouteMetrics>,
}

impl std::ops::Deref for Route {
    type Target = RouteSettings;
    fn deref(&self) -> &RouteSettings {
        &self.settings
    }
}

impl Route {
    pub fn new(settings: RouteSettings) -> Self {
        let path = match &settings.path {
            PathMatch::Exact(path) => path.clone(),
            PathMatch::Prefix(path) => format!("{path}*"),
        };
        let label = match &settings.host {
            Some(HostMatch(host)) => format!("{host}{path}"),
            None => path,
        };
        Self {
            settings,
            label: label.into(),
            next_target: AtomicUsize::new(0),
            metrics: OnceLock::new(),
        }
    }

    /// The targets in the order to try them: the healthy ones from the round-robin position,
    /// then those cooling down — a last resort is better than refusing without trying.
    pub fn targets_in_order(&self) -> Vec<&UpstreamTarget> {
        let count = self.targets.len();
        let start = if count > 1 {
            self.next_target.fetch_add(1, Ordering::Relaxed) % count
        } else {
            0
        };
        let rotated = (0..count).map(|i| &self.targets[(start + i) % count]);
        let (mut order, cooling): (Vec<_>, Vec<_>) = rotated.partition(|t| t.is_healthy());
        order.extend(cooling);
        order
    }

    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
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

    /// Applies the tenant and conversation rules to a verified identity.
    pub fn resolve_identity(
        &self,
        identity: &mut Identity,
        host: Option<&str>,
        path: &str,
        query_conversation: Option<String>,
    ) -> Result<(), Refusal> {
        let bound_tenant = match &self.tenant {
            TenantRule::Optional | TenantRule::Required => None,
            TenantRule::Pin(tenant) => Some(tenant.clone()),
            TenantRule::FromHost => {
                let label = host
                    .and_then(|h| h.split('.').next())
                    .filter(|label| !label.is_empty());
                Some(
                    label
                        .ok_or_else(|| {
                            Refusal::forbidden("tenant_not_allowed", "the host names no tenant")
                        })?
                        .to_ascii_lowercase(),
                )
            }
            TenantRule::FromPath(n) => {
                let segment = path.split('/').filter(|s| !s.is_empty()).nth(n - 1);
                Some(
                    segment
                        .ok_or_else(|| {
                            Refusal::forbidden("tenant_not_allowed", "the path names no tenant")
                        })?
                        .to_owned(),
                )
            }
        };
        match (bound_tenant, &identity.tenant) {
            (Some(bound), Some(claimed)) if !bound.eq_ignore_ascii_case(claimed) => {
                return Err(Refusal::forbidden(
                    "tenant_not_allowed",
                    "the token's tenant is not allowed here",
                ));
            }
            // Only a pinned tenant comes from the config. Host and path are client input: a
            // token that names no tenant cannot be bound to whatever tenant the client asks for.
            (Some(_), None) if !matches!(self.tenant, TenantRule::Pin(_)) => {
                return Err(Refusal::forbidden(
                    "tenant_required",
                    "the token names no tenant",
                ));
            }
            (Some(bound), None) => identity.tenant = Some(bound),
            _ => {}
        }
        if self.tenant == TenantRule::Required && identity.tenant.is_none() {
            return Err(Refusal::forbidden(
                "tenant_required",
                "the token names no tenant",
            ));
        }

        let mismatch = || {
            Refusal::forbidden(
                "conversation_not_allowed",
                "the token does not allow this conversation",
            )
        };
        identity.conversation = match (
            self.conversation,
            identity.conversation.take(),
            query_conversation,
        ) {
            (ConversationMode::None, _, _) => None,
            (_, Some(token), Some(query)) if token != query => return Err(mismatch()),
            (_, Some(token), _) => Some(token),
            (ConversationMode::Token, None, _) => {
                return Err(Refusal::forbidden(
                    "conversation_required",
                    "the token names no conversation",
                ));
            }
            (ConversationMode::QueryOrToken, None, query) => query,
            (ConversationMode::Generate, None, Some(query)) => Some(query),
            (ConversationMode::Generate, None, None) => Some(uuid::Uuid::new_v4().to_string()),
        };
        Ok(())
    }
}

/// Header names that belong to the WebSocket handshake itself or to hop-by-hop semantics.
pub fn is_reserved_header(name: &HeaderName) -> bool {
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

/// The routes of one config, in match order.
pub struct Router {
    routes: Vec<Arc<Route>>,
    /// Indices into `routes` sorted most specific first; kept separate so that config order
    /// stays available for messages.
    order: Vec<usize>,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Self {
        let routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        let mut order: Vec<usize> = (0..routes.len()).collect();
        // Host-specific before host-less, longer paths first, exact before prefix.
        order.sort_by_key(|&i| {
            let route = &routes[i];
            (
                route.host.is_none(),
                std::cmp::Reverse(route.path.len()),
                matches!(route.path, PathMatch::Prefix(_)),
            )
        });
        Self { routes, order }
    }

    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Arc<Route>> {
        self.order.iter().map(|&i| &self.routes[i]).find(|route| {
            route.path.matches(path) && route.host.as_ref().is_none_or(|h| h.matches(host))
        })
    }

    /// Pairs of routes (config order) that could never both be reached.
    pub fn duplicates(&self) -> Vec<(usize, usize)> {
        let mut pairs = Vec::new();
        for (i, a) in self.routes.iter().enumerate() {
            for (j, b) in self.routes.iter().enumerate().skip(i + 1) {
                if a.path == b.path && a.host == b.host {
                    pairs.push((i, j));
                }
            }
        }
        pairs
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: PathMatch, host: Option<&str>) -> Route {
        Route::new(RouteSettings {
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
            resume: None,
        })
    }

    #[test]
    fn longest_match_wins_and_host_routes_come_first() {
        let router = Router::new(vec![
            route(PathMatch::Prefix("/ws".into()), None),
            route(PathMatch::Prefix("/ws/chat".into()), None),
            route(PathMatch::Exact("/ws/chat".into()), None),
            route(PathMatch::Prefix("/ws".into()), Some("admin.example.com")),
        ]);
        let label = |host, path| router.find(host, path).map(|r| r.label.to_string());
        assert_eq!(label(None, "/ws/chat").as_deref(), Some("/ws/chat"));
        assert_eq!(label(None, "/ws/chat/7").as_deref(), Some("/ws/chat*"));
        assert_eq!(label(None, "/ws/other").as_deref(), Some("/ws*"));
        assert_eq!(label(None, "/wsx"), None);
        assert_eq!(
            label(Some("ADMIN.example.com"), "/ws/chat").as_deref(),
            Some("admin.example.com/ws*")
        );
        assert_eq!(label(None, "/"), None);
    }

    #[test]
    fn conversation_rules() {
        let mut r = route(PathMatch::Exact("/".into()), None);
        let with = |conversation: Option<&str>| Identity {
            user: "u".into(),
            conversation: conversation.map(str::to_owned),
            ..Default::default()
        };
        let conv = |r: &Route, token: Option<&str>, query: Option<&str>| {
            let mut id = with(token);
            r.resolve_identity(&mut id, None, "/", query.map(str::to_owned))
                .map(|()| id.conversation)
                .map_err(|refusal| refusal.reason)
        };
        assert_eq!(conv(&r, Some("c1"), None), Ok(Some("c1".into())));
        assert_eq!(conv(&r, Some("c1"), Some("c1")), Ok(Some("c1".into())));
        assert_eq!(
            conv(&r, Some("c1"), Some("c2")),
            Err("conversation_not_allowed")
        );
        assert_eq!(conv(&r, None, Some("c2")), Ok(Some("c2".into())));
        r.settings.conversation = ConversationMode::Token;
        assert_eq!(conv(&r, None, Some("c2")), Err("conversation_required"));
        r.settings.conversation = ConversationMode::Generate;
        assert_eq!(
            conv(&r, None, None).map(|c| c.map(|c| c.len())),
            Ok(Some(36))
        );
    }

    #[test]
    fn tenant_rules() {
        let mut r = route(PathMatch::Prefix("/t".into()), None);
        let with = |tenant: Option<&str>| Identity {
            user: "u".into(),
            tenant: tenant.map(str::to_owned),
            ..Default::default()
        };
        let tenant = |r: &Route, token: Option<&str>, host: Option<&str>, path: &str| {
            let mut id = with(token);
            r.resolve_identity(&mut id, host, path, None)
                .map(|()| id.tenant)
                .map_err(|refusal| refusal.reason)
        };
        r.settings.tenant = TenantRule::Required;
        assert_eq!(tenant(&r, None, None, "/t"), Err("tenant_required"));
        r.settings.tenant = TenantRule::Pin("acme".into());
        assert_eq!(tenant(&r, None, None, "/t"), Ok(Some("acme".into())));
        assert_eq!(
            tenant(&r, Some("evil"), None, "/t"),
            Err("tenant_not_allowed")
        );
        r.settings.tenant = TenantRule::FromHost;
        assert_eq!(
            tenant(&r, Some("acme"), Some("acme.chat.example.com"), "/t"),
            Ok(Some("acme".into()))
        );
        assert_eq!(
            tenant(&r, Some("acme"), Some("evil.chat.example.com"), "/t"),
            Err("tenant_not_allowed")
        );
        assert_eq!(
            tenant(&r, None, Some("acme.chat.example.com"), "/t"),
            Err("tenant_required")
        );
        r.settings.tenant = TenantRule::FromPath(2);
        assert_eq!(
            tenant(&r, Some("globex"), None, "/t/globex/chat"),
            Ok(Some("globex".into()))
        );
        assert_eq!(
            tenant(&r, None, None, "/t/globex/chat"),
            Err("tenant_required")
        );
    }
}
