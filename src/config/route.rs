//! `[[route]]` → [`RouteSettings`]: path and host, upstream targets (with their TLS), the
//! identity rules, what is injected upstream, the connection's lifecycle and session resume.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use rustls::pki_types::ServerName;
use toml::Spanned;

use super::raw::{
    HttpMode, MatchMode, RawResume, RawRoute, RawTenant, RawUpstreamTls, TokenExpiry,
};
use super::settings::{
    Affinity, ConversationMode, HostMatch, HttpSettings, Lifecycle, PathMatch, ResumeSettings,
    RouteSettings, TargetSettings, TenantRule, is_reserved_header,
};
use super::validate::Ctx;
use crate::auth::{AuthPolicy, Verifier};
use crate::template::Template;
use crate::tls;

/// An upstream URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpstreamUrlError {
    #[error("invalid upstream URL {0:?}")]
    Invalid(String),
    #[error("upstream URL {0:?} must start with ws:// or wss://")]
    Scheme(String),
    #[error("URL {0:?} must start with https:// (keys are never fetched in the clear)")]
    HttpsOnly(String),
    #[error("upstream URL {0:?} has no host")]
    NoHost(String),
    #[error("upstream {0:?} needs TLS settings that failed to load")]
    NoTls(String),
    #[error("upstream host {0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// How a route reaches its `wss://` upstreams (and a policy its identity provider).
pub(super) struct UpstreamTls {
    config: Arc<rustls::ClientConfig>,
    /// Overrides the name checked in the upstream's certificate (default: the URL's host).
    server_name: Option<ServerName<'static>>,
}

/// How long a proxied HTTP exchange may wait for the upstream's response head, or between two
/// reads of a body: a long-poll holds a request for tens of seconds (Engine.IO's ping interval
/// and timeout add up to 45 s), and a reverse proxy's usual 60 s is too close to that.
const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(120);

/// What a route injects when it names nothing.
const DEFAULT_INJECT: [(&str, &str); 3] = [
    ("x-user-id", "{user}"),
    ("x-tenant-id", "{tenant}"),
    ("x-conversation-id", "{conversation}"),
];

impl Ctx<'_> {
    pub(super) fn route(
        &mut self,
        raw: Spanned<RawRoute>,
        policies: &BTreeMap<String, Arc<AuthPolicy>>,
    ) -> Option<RouteSettings> {
        let route_span = raw.span();
        let mut raw = raw.into_inner();
        let errors_before = self.error_count();

        // Errors come in the order of the route's keys, mostly.
        let path = raw.path.get_ref().clone();
        if !path.starts_with('/') || path.contains(['?', '#']) {
            self.error(
                raw.path.span(),
                format!("route path {path:?} must start with '/' and hold no query"),
            );
        }
        let path = match raw.path_match {
            None | Some(MatchMode::Exact) => PathMatch::Exact(path),
            Some(MatchMode::Prefix) => PathMatch::Prefix(path),
        };
        let auth = match raw.auth.get_ref().as_str() {
            "none" => None,
            name => match policies.get(name) {
                Some(policy) => Some(policy.clone()),
                None => {
                    self.error(
                        raw.auth.span(),
                        format!("route names auth policy {name:?}, but there is no [auth.{name}]"),
                    );
                    None
                }
            },
        };
        if raw.forward_token == Some(true)
            && auth
                .as_ref()
                .is_some_and(|policy| matches!(policy.verifier, Verifier::SignedParams(_)))
        {
            self.error(
                raw.auth.span(),
                "forward_token does not apply to a kind = \"hmac\" policy: signed parameters never reach the upstream",
            );
        }
        let upstream_tls = self.upstream_tls(raw.upstream_tls.take());
        let targets = self.targets(
            raw.upstream.take(),
            raw.upstreams.take(),
            upstream_tls.as_ref(),
            &route_span,
        );
        let tenant = match raw.tenant.take() {
            None => TenantRule::Optional,
            Some(rule) => self.tenant(rule),
        };
        let inject = self.inject(raw.inject.take());
        let upstream_query = self.upstream_query(raw.upstream_query.take().unwrap_or_default());
        let max_message_size = self.size_in(
            &raw.max_message_size,
            1 << 20,
            16..=(256 << 20),
            "max_message_size must be between 16B and 256MiB",
        );
        let connect_timeout = self.duration(&raw.connect_timeout, Duration::from_secs(10));
        let http = self.http(&raw);
        let lifecycle = self.lifecycle(&raw, auth.is_some());
        let upstream_cooldown = self.duration(&raw.upstream_cooldown, Duration::from_secs(10));
        let affinity = match &raw.affinity {
            Some(affinity) if *affinity.get_ref() == Affinity::User && auth.is_none() => {
                self.error(
                    affinity.span(),
                    "affinity = \"user\" needs a route with an auth policy: without one there is no user",
                );
                Affinity::None
            }
            Some(affinity) => *affinity.get_ref(),
            None => Affinity::None,
        };
        let resume = raw
            .resume
            .as_ref()
            .map(|resume| self.resume(resume, auth.is_some()));

        if self.error_count() > errors_before {
            return None;
        }
        Some(RouteSettings {
            path,
            host: raw.host.map(|h| HostMatch::new(h.get_ref())),
            targets,
            auth,
            allowed_origins: raw.allowed_origins.filter(|list| !list.is_empty()),
            conversation: raw.conversation.unwrap_or(ConversationMode::QueryOrToken),
            tenant,
            inject,
            upstream_query,
            forward_token: raw.forward_token.unwrap_or(false),
            connect_timeout,
            max_message_size,
            lifecycle,
            upstream_cooldown,
            affinity,
            resume,
            http,
        })
    }

    /// `http = "proxy"` with its `http_timeout` and `max_body_size`.
    fn http(&mut self, raw: &RawRoute) -> Option<HttpSettings> {
        let proxy = raw
            .http
            .as_ref()
            .is_some_and(|http| *http.get_ref() == HttpMode::Proxy);
        if !proxy {
            for (key, value) in [
                ("http_timeout", &raw.http_timeout),
                ("max_body_size", &raw.max_body_size),
            ] {
                if let Some(value) = value {
                    self.warn(
                        value.span(),
                        format!("{key} has no effect without http = \"proxy\""),
                    );
                }
            }
            return None;
        }
        let timeout = self.duration(&raw.http_timeout, DEFAULT_HTTP_TIMEOUT);
        if let Some(value) = &raw.http_timeout
            && !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&timeout)
        {
            self.error(value.span(), "http_timeout must be between 1s and 1h");
        }
        let max_body_size = self.size_in(
            &raw.max_body_size,
            1 << 20,
            0..=(1 << 30),
            "max_body_size must be between 0B and 1GiB",
        );
        Some(HttpSettings {
            timeout,
            max_body_size: max_body_size as u64,
        })
    }

    fn targets(
        &mut self,
        one: Option<Spanned<String>>,
        many: Option<Spanned<Vec<Spanned<String>>>>,
        tls: Option<&UpstreamTls>,
        route_span: &Range<usize>,
    ) -> Vec<TargetSettings> {
        let urls: Vec<Spanned<String>> = match (one, many) {
            (Some(one), None) => vec![one],
            (None, Some(many)) if !many.get_ref().is_empty() => many.into_inner(),
            (None, Some(many)) => {
                self.error(many.span(), "upstreams needs at least one URL");
                Vec::new()
            }
            (Some(one), Some(_)) => {
                self.error(one.span(), "give either upstream or upstreams, not both");
                Vec::new()
            }
            (None, None) => {
                self.error(
                    route_span.clone(),
                    "route needs upstream = \"ws://host:port/path\"",
                );
                Vec::new()
            }
        };
        let mut targets = Vec::new();
        for url in urls {
            match target(url.get_ref(), tls) {
                Ok(target) => targets.push(target),
                Err(error) => self.error(url.span(), error),
            }
        }
        targets
    }

    fn tenant(&mut self, rule: Spanned<RawTenant>) -> TenantRule {
        let span = rule.span();
        match rule.into_inner() {
            RawTenant::Optional => TenantRule::Optional,
            RawTenant::Required => TenantRule::Required,
            RawTenant::Pin(tenant) => TenantRule::Pin(tenant),
            RawTenant::From(from) if from == "host" => TenantRule::FromHost,
            RawTenant::From(from) => match from
                .strip_prefix("path:")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(segment) if segment >= 1 => TenantRule::FromPath(segment),
                _ => {
                    self.error(
                        span,
                        format!("unknown tenant source {from:?}: expected \"host\" or \"path:N\" (N from 1)"),
                    );
                    TenantRule::Optional
                }
            },
        }
    }

    fn inject(
        &mut self,
        raw: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    ) -> Vec<(HeaderName, Template)> {
        let Some(map) = raw else {
            return DEFAULT_INJECT
                .iter()
                .filter_map(|(name, template)| {
                    Some((
                        HeaderName::from_static(name),
                        Template::parse(template).ok()?,
                    ))
                })
                .collect();
        };
        let mut inject = Vec::new();
        for (name, template) in map {
            let Ok(header) = HeaderName::from_bytes(name.get_ref().as_bytes()) else {
                self.error(
                    name.span(),
                    format!("{:?} is not a valid header name", name.get_ref()),
                );
                continue;
            };
            if is_reserved_header(&header) {
                self.error(
                    name.span(),
                    format!("{header} is set by the WebSocket handshake and cannot be injected"),
                );
                continue;
            }
            match Template::parse(template.get_ref()) {
                Ok(template) => inject.push((header, template)),
                Err(error) => self.error(template.span(), error),
            }
        }
        inject
    }

    fn upstream_query(
        &mut self,
        raw: BTreeMap<Spanned<String>, Spanned<String>>,
    ) -> Vec<(String, Template)> {
        let mut upstream_query = Vec::new();
        for (name, template) in raw {
            if name.get_ref().is_empty() {
                self.error(
                    name.span(),
                    "upstream_query parameter names cannot be empty",
                );
                continue;
            }
            match Template::parse(template.get_ref()) {
                Ok(template) => upstream_query.push((name.into_inner(), template)),
                Err(error) => self.error(template.span(), error),
            }
        }
        upstream_query
    }

    fn lifecycle(&mut self, raw: &RawRoute, authenticated: bool) -> Lifecycle {
        let defaults = Lifecycle::default();
        let token_expiry = raw.token_expiry.as_ref();
        let lifecycle = Lifecycle {
            ping_interval: self.optional_duration(&raw.ping_interval, defaults.ping_interval),
            pong_timeout: self.duration(&raw.pong_timeout, defaults.pong_timeout),
            idle_timeout: self.optional_duration(&raw.idle_timeout, defaults.idle_timeout),
            max_session: self.optional_duration(&raw.max_session, defaults.max_session),
            close_on_token_expiry: token_expiry
                .is_none_or(|expiry| *expiry.get_ref() == TokenExpiry::Close),
            token_expiry_grace: self.duration(&raw.token_expiry_grace, defaults.token_expiry_grace),
            message_rate: self.rate(&raw.message_rate, defaults.message_rate),
            turn_gap: self.duration(&raw.turn_gap, defaults.turn_gap),
        };
        if let Some(value) = &raw.turn_gap
            && lifecycle.turn_gap.is_zero()
        {
            self.error(value.span(), "turn_gap must be more than 0s");
        }
        if let Some(value) = &raw.pong_timeout
            && lifecycle.pong_timeout.is_zero()
        {
            self.error(value.span(), "pong_timeout must be more than 0s");
        }
        if let Some(expiry) = token_expiry
            && lifecycle.close_on_token_expiry
            && !authenticated
        {
            self.warn(
                expiry.span(),
                "token_expiry has no effect on a route with auth = \"none\"",
            );
        }
        lifecycle
    }

    fn resume(&mut self, resume: &Spanned<RawResume>, authenticated: bool) -> ResumeSettings {
        let span = resume.span();
        let resume = resume.get_ref();
        let window = self.duration(&Some(resume.window.clone()), Duration::ZERO);
        if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&window) {
            self.error(
                resume.window.span(),
                "resume.window must be between 100ms and 1h",
            );
        }
        let max_messages = self.integer(
            &resume.max_messages,
            1000,
            1..=1_000_000,
            "resume.max_messages",
        );
        let max_bytes = self.size_in(
            &resume.max_bytes,
            4 << 20,
            (1 << 10)..=(1 << 30),
            "resume.max_bytes must be between 1KiB and 1GiB",
        );
        if !authenticated {
            self.warn(
                span,
                "resume on a route with auth = \"none\": anyone who knows a session_id can take that session over",
            );
        }
        ResumeSettings {
            window,
            max_messages,
            max_bytes,
            announce: resume.announce.unwrap_or(false),
        }
    }

    pub(super) fn upstream_tls(&mut self, raw: Option<RawUpstreamTls>) -> Option<UpstreamTls> {
        let raw = raw.unwrap_or(RawUpstreamTls {
            ca: None,
            server_name: None,
        });
        let roots = match &raw.ca {
            Some(ca) => {
                let pem = self.read_file(ca.span(), "upstream CA", ca.get_ref())?;
                match tls::root_store_from_pem(&pem) {
                    Ok(roots) => Arc::new(roots),
                    Err(error) => {
                        self.error(ca.span(), error);
                        return None;
                    }
                }
            }
            None => self
                .native_roots
                .get_or_insert_with(|| Arc::new(tls::native_root_store()))
                .clone(),
        };
        let server_name = match raw.server_name {
            Some(name) => match ServerName::try_from(name.get_ref().clone()) {
                Ok(name) => Some(name),
                Err(_) => {
                    self.error(
                        name.span(),
                        format!("{:?} is not a valid TLS server name", name.get_ref()),
                    );
                    return None;
                }
            },
            None => None,
        };
        match tls::client_config(roots) {
            Ok(config) => Some(UpstreamTls {
                config,
                server_name,
            }),
            Err(error) => {
                self.error(0..0, error);
                None
            }
        }
    }
}

/// One upstream URL: `ws://` or `wss://` (with the route's TLS settings), host, port, path.
fn target(url: &str, tls: Option<&UpstreamTls>) -> Result<TargetSettings, UpstreamUrlError> {
    let secure = match url.split_once("://").map(|(scheme, _)| scheme) {
        Some("ws") => false,
        Some("wss") => true,
        _ => return Err(UpstreamUrlError::Scheme(url.to_owned())),
    };
    parse_target(url, tls, secure)
}

/// An `https://` URL (an identity provider's key set) as a target.
pub(super) fn https_target(
    url: &str,
    tls: &UpstreamTls,
) -> Result<TargetSettings, UpstreamUrlError> {
    if !url.starts_with("https://") {
        return Err(UpstreamUrlError::HttpsOnly(url.to_owned()));
    }
    parse_target(url, Some(tls), true)
}

fn parse_target(
    url: &str,
    tls: Option<&UpstreamTls>,
    secure: bool,
) -> Result<TargetSettings, UpstreamUrlError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| UpstreamUrlError::Invalid(url.to_owned()))?;
    let scheme = uri.scheme_str().unwrap_or_default().to_owned();
    let host = uri
        .host()
        .ok_or_else(|| UpstreamUrlError::NoHost(url.to_owned()))?
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
        let tls = tls.ok_or_else(|| UpstreamUrlError::NoTls(url.to_owned()))?;
        let name = match &tls.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.clone())
                .map_err(|_| UpstreamUrlError::ServerName(host.clone()))?,
        };
        Some((tls.config.clone(), name))
    } else {
        None
    };
    Ok(TargetSettings {
        url: format!("{scheme}://{authority}{}", uri.path()),
        host,
        port,
        authority,
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        tls,
    })
}
