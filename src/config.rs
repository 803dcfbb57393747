//! `proxy.toml`: raw serde structs (unknown keys refused) turned into a validated [`Config`].
//!
//! The same path serves start-up, `wsedge check` and reload: everything is parsed, every
//! file is read and every key is built here, so a `Config` that exists is one that can serve.
//! Every error carries the TOML span of the value it is about, reported as `file:line:col`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::auth::jwt::{self, JwtSettings, VerifyingKey};
use crate::auth::{AuthPolicy, ClaimNames, TokenSource};
use crate::relay::{Lifecycle, RateLimit};
use crate::route::{
    ConversationMode, HostMatch, PathMatch, Route, Router, TenantRule, UpstreamTarget,
};
use crate::session::ResumeSettings;
use crate::template::Template;
use crate::tls;
use crate::units::{parse_duration, parse_size};

// ---------------------------------------------------------------------------------------------
// Validated configuration

pub struct Config {
    pub server: ServerSettings,
    pub admin: Option<AdminSettings>,
    pub log: LogSettings,
    pub policies: BTreeMap<String, Arc<AuthPolicy>>,
    pub router: Router,
    /// Things that are allowed but deserve attention (inline secrets, keys not enforced yet),
    /// already formatted as `file:line:col: warning: …`.
    pub warnings: Vec<String>,
}

pub struct ServerSettings {
    pub listen: Vec<SocketAddr>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    pub drain_timeout: Duration,
    pub max_header_size: usize,
    /// Concurrent connections one user (per tenant) may hold; `None` = unlimited.
    pub max_connections_per_user: Option<u32>,
    /// Connections still in TLS or before their upgrade; more are closed as they arrive.
    pub max_pending_handshakes: usize,
    pub handshake_rate_per_ip: Option<RateLimit>,
    /// Threads, each with its own event loop and its own listening socket per address.
    pub workers: usize,
}

pub struct AdminSettings {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

impl Config {
    /// Reads and validates a config file. Relative paths inside it are relative to its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            diagnostics: vec![format!("{}: cannot read config: {e}", path.display())],
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self::from_toml(&text, &path.display().to_string(), &base)
    }

    /// Validates config text; `name` is what messages call the file, `base` resolves relative paths.
    pub fn from_toml(text: &str, name: &str, base: &Path) -> Result<Config, ConfigError> {
        let mut ctx = Ctx {
            text,
            name,
            base,
            errors: Vec::new(),
            warnings: Vec::new(),
            native_roots: None,
        };
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(error) => {
                let span = error.span().unwrap_or(0..0);
                ctx.error(span, error.message().trim());
                return Err(ctx.into_error());
            }
        };
        let config = ctx.validate(raw);
        match config {
            Some(config) if ctx.errors.is_empty() => Ok(config),
            _ => Err(ctx.into_error()),
        }
    }
}

/// Why 32: a person with a few devices and tabs stays far below it, while one leaked token
/// cannot take a meaningful share of the edge.
const DEFAULT_MAX_CONNECTIONS_PER_USER: u32 = 32;

// ---------------------------------------------------------------------------------------------
// Raw file structs

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    admin: Option<RawAdmin>,
    log: Option<RawLog>,
    #[serde(default)]
    auth: BTreeMap<String, Spanned<RawAuth>>,
    #[serde(default, rename = "route")]
    routes: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Spanned<Vec<Spanned<String>>>,
    tls: Option<OneOrManyTls>,
    handshake_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    drain_timeout: Option<Spanned<String>>,
    max_header_size: Option<Spanned<String>>,
    max_connections_per_user: Option<Spanned<i64>>,
    max_pending_handshakes: Option<Spanned<i64>>,
    handshake_rate_per_ip: Option<Spanned<RawRate>>,
    workers: Option<Spanned<i64>>,
}

/// `tls = { cert, key }`, or a list of them selected by the client's SNI name.
enum OneOrManyTls {
    One(RawTls),
    Many(Vec<RawTls>),
}

// By hand rather than `#[serde(untagged)]`: an untagged enum buffers its input, which loses the
// spans that the error messages point with.
impl<'de> Deserialize<'de> for OneOrManyTls {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OneOrManyTls;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("{ cert = \"…\", key = \"…\" } or a list of them")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<OneOrManyTls, A::Error> {
                RawTls::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(OneOrManyTls::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<OneOrManyTls, A::Error> {
                Vec::<RawTls>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(OneOrManyTls::Many)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<Spanned<String>>,
    level: Option<Spanned<String>>,
    audit: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    kind: Spanned<String>,
    algorithms: Option<Spanned<Vec<Spanned<String>>>>,
    secret: Option<Spanned<RawSecret>>,
    public_key: Option<Spanned<RawSecret>>,
    jwks: Option<Spanned<toml::Value>>,
    issuer: Option<Spanned<OneOrMany>>,
    audience: Option<Spanned<OneOrMany>>,
    leeway: Option<Spanned<String>>,
    token_from: Option<Vec<Spanned<String>>>,
    claims: Option<RawClaims>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClaims {
    user: Option<String>,
    tenant: Option<String>,
    conversation: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path: Spanned<String>,
    #[serde(rename = "match")]
    path_match: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    upstream: Option<Spanned<String>>,
    upstreams: Option<Spanned<Vec<Spanned<String>>>>,
    upstream_tls: Option<RawUpstreamTls>,
    auth: Spanned<String>,
    allowed_origins: Option<Vec<String>>,
    conversation: Option<Spanned<String>>,
    tenant: Option<Spanned<RawTenant>>,
    inject: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    upstream_query: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    forward_token: Option<bool>,
    connect_timeout: Option<Spanned<String>>,
    max_message_size: Option<Spanned<String>>,
    http: Option<Spanned<String>>,
    ping_interval: Option<Spanned<String>>,
    pong_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_session: Option<Spanned<String>>,
    token_expiry: Option<Spanned<String>>,
    token_expiry_grace: Option<Spanned<String>>,
    message_rate: Option<Spanned<RawRate>>,
    upstream_cooldown: Option<Spanned<String>>,
    resume: Option<Spanned<RawResume>>,
}

/// A rate: `{ per_second = N, burst = M }`, or `"off"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawRate {
    Off(String),
    Limit(RawRateLimit),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    per_second: f64,
    burst: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    ca: Option<Spanned<String>>,
    server_name: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResume {
    window: Spanned<String>,
    max_messages: Option<Spanned<i64>>,
    max_bytes: Option<Spanned<String>>,
    announce: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawTenant {
    Mode(String),
    Rule(RawTenantRule),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenantRule {
    pin: Option<String>,
    from: Option<String>,
}

/// A secret: an inline development string, or `{ file }`, `{ env }`, `{ credential }`.
enum RawSecret {
    Inline(String),
    File(String),
    Env(String),
    Credential(String),
}

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawSecret;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a string (development only) or one of { file = \"…\" }, { env = \"…\" }, { credential = \"…\" }",
                )
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<RawSecret, E> {
                Ok(RawSecret::Inline(value.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawSecret, A::Error> {
                use serde::de::Error;
                let (key, value): (String, String) = map.next_entry()?.ok_or_else(|| {
                    A::Error::custom("empty secret table: expected one of file, env, credential")
                })?;
                if map.next_key::<String>()?.is_some() {
                    return Err(A::Error::custom(
                        "a secret takes exactly one of file, env, credential",
                    ));
                }
                match key.as_str() {
                    "file" => Ok(RawSecret::File(value)),
                    "env" => Ok(RawSecret::Env(value)),
                    "credential" => Ok(RawSecret::Credential(value)),
                    other => Err(A::Error::unknown_field(
                        other,
                        &["file", "env", "credential"],
                    )),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

struct Ctx<'a> {
    text: &'a str,
    name: &'a str,
    base: &'a Path,
    errors: Vec<String>,
    warnings: Vec<String>,
    native_roots: Option<Arc<rustls::RootCertStore>>,
}

impl Ctx<'_> {
    fn location(&self, span: &Range<usize>) -> String {
        let offset = span.start.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        format!("{}:{line}:{column}", self.name)
    }

    fn error(&mut self, span: Range<usize>, message: impl fmt::Display) {
        let line = format!("{}: {message}", self.location(&span));
        self.errors.push(line);
    }

    fn warn(&mut self, span: Range<usize>, message: impl fmt::Display) {
        let line = format!("{}: warning: {message}", self.location(&span));
        self.warnings.push(line);
    }

    fn into_error(self) -> ConfigError {
        ConfigError {
            diagnostics: self.errors,
        }
    }

    fn path(&self, text: &str) -> PathBuf {
        let path = Path::new(text);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base.join(path)
        }
    }

    fn duration(&mut self, value: &Option<Spanned<String>>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(value) => match parse_duration(value.get_ref()) {
                Ok(duration) => duration,
                Err(message) => {
                    self.error(value.span(), message);
                    default
                }
            },
        }
    }

    /// A duration that may be switched off with `"off"` (or `"0s"`).
    fn optional_duration(
        &mut self,
        value: &Option<Spanned<String>>,
        default: Option<Duration>,
    ) -> Option<Duration> {
        match value {
            None => default,
            Some(text) if text.get_ref() == "off" => None,
            Some(_) => Some(self.duration(value, Duration::ZERO)).filter(|d| !d.is_zero()),
        }
    }

    fn rate(
        &mut self,
        value: &Option<Spanned<RawRate>>,
        default: Option<RateLimit>,
    ) -> Option<RateLimit> {
        let Some(value) = value else { return default };
        match value.get_ref() {
            RawRate::Off(off) if off == "off" => None,
            RawRate::Limit(limit) if (0.001..=1e6).contains(&limit.per_second) => {
                let burst = limit.burst.unwrap_or(limit.per_second.ceil() as u32).max(1);
                Some(RateLimit {
                    per_second: limit.per_second,
                    burst,
                })
            }
            _ => {
                self.error(
                    value.span(),
                    "expected { per_second = N, burst = M } with N from 0.001 to 1000000, or \"off\"",
                );
                default
            }
        }
    }

    fn size(&mut self, value: &Option<Spanned<String>>, default: u64) -> u64 {
        match value {
            None => default,
            Some(value) => match parse_size(value.get_ref()) {
                Ok(size) => size,
                Err(message) => {
                    self.error(value.span(), message);
                    default
                }
            },
        }
    }

    fn read_file(&mut self, span: Range<usize>, what: &str, text: &str) -> Option<Vec<u8>> {
        let path = self.path(text);
        match std::fs::read(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                self.error(span, format!("cannot read {what} {}: {e}", path.display()));
                None
            }
        }
    }

    fn secret(&mut self, secret: &Spanned<RawSecret>, what: &str) -> Option<Vec<u8>> {
        let span = secret.span();
        let bytes = match secret.get_ref() {
            RawSecret::Inline(value) => {
                self.warn(
                    span.clone(),
                    format!("{what} is written inline; in production use {{ file = \"…\" }}, {{ env = \"…\" }} or {{ credential = \"…\" }}"),
                );
                value.clone().into_bytes()
            }
            RawSecret::File(file) => self.read_file(span.clone(), what, file)?,
            RawSecret::Env(name) => match std::env::var(name) {
                Ok(value) => value.into_bytes(),
                Err(_) => {
                    self.error(
                        span,
                        format!("{what}: environment variable {name} is not set"),
                    );
                    return None;
                }
            },
            RawSecret::Credential(name) => {
                let Ok(dir) = std::env::var("CREDENTIALS_DIRECTORY") else {
                    self.error(
                        span,
                        format!("{what}: credential {name:?} needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)"),
                    );
                    return None;
                };
                if name.contains('/') {
                    self.error(
                        span,
                        format!("{what}: credential name {name:?} must not contain '/'"),
                    );
                    return None;
                }
                let path = Path::new(&dir).join(name);
                match std::fs::read(&path) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        self.error(
                            span,
                            format!("{what}: cannot read credential {name:?}: {e}"),
                        );
                        return None;
                    }
                }
            }
        };
        // Files written by `echo` or editors end in a newline that is not part of the secret.
        let trimmed_len = bytes.trim_ascii_end().len();
        let mut bytes = bytes;
        bytes.truncate(trimmed_len);
        Some(bytes)
    }

    fn validate(&mut self, raw: RawConfig) -> Option<Config> {
        let server = self.server(raw.server);
        let admin = raw.admin.and_then(|admin| match admin.listen {
            None => Some(AdminSettings {
                listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            }),
            Some(listen) => match listen.get_ref().parse() {
                Ok(listen) => Some(AdminSettings { listen }),
                Err(_) => {
                    self.error(
                        listen.span(),
                        format!(
                            "invalid admin listen address {:?}: expected IP:PORT",
                            listen.get_ref()
                        ),
                    );
                    None
                }
            },
        });
        let log = self.log(raw.log);

        let mut policies = BTreeMap::new();
        for (name, auth) in raw.auth {
            if name == "none" {
                self.error(auth.span(), "a policy cannot be named \"none\": routes use auth = \"none\" to mean no authentication");
                continue;
            }
            if let Some(policy) = self.policy(&name, auth) {
                policies.insert(name, Arc::new(policy));
            }
        }

        if raw.routes.is_empty() {
            self.error(
                0..0,
                "no [[route]]: the edge would refuse every request with 404",
            );
        }
        let mut routes = Vec::new();
        for raw_route in raw.routes {
            if let Some(route) = self.route(raw_route, &policies) {
                routes.push(route);
            }
        }
        let router = Router::new(routes);
        for (first, second) in router.duplicates() {
            self.error(
                0..0,
                format!(
                    "two routes have the same host and path: route #{} and route #{}",
                    first + 1,
                    second + 1
                ),
            );
        }
        Some(Config {
            server: server?,
            admin,
            log,
            policies,
            router,
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    fn server(&mut self, raw: RawServer) -> Option<ServerSettings> {
        let mut listen = Vec::new();
        if raw.listen.get_ref().is_empty() {
            self.error(raw.listen.span(), "listen needs at least one address");
        }
        for address in raw.listen.get_ref() {
            match address.get_ref().parse::<SocketAddr>() {
                Ok(addr) => listen.push(addr),
                Err(_) => self.error(
                    address.span(),
                    format!(
                        "invalid listen address {:?}: expected IP:PORT like \"0.0.0.0:8443\"",
                        address.get_ref()
                    ),
                ),
            }
        }
        let tls = raw.tls.and_then(|tls| {
            let entries = match tls {
                OneOrManyTls::One(one) => vec![one],
                OneOrManyTls::Many(many) => many,
            };
            let mut pairs = Vec::new();
            for entry in &entries {
                let cert = self.read_file(entry.cert.span(), "certificate", entry.cert.get_ref());
                let key = self.read_file(entry.key.span(), "private key", entry.key.get_ref());
                pairs.push((entry.cert.span(), cert?, key?));
            }
            if pairs.is_empty() {
                self.error(0..0, "tls = [] lists no certificate");
                return None;
            }
            match tls::server_config(
                pairs
                    .iter()
                    .map(|(_, cert, key)| (cert.as_slice(), key.as_slice())),
            ) {
                Ok(config) => Some(config),
                Err((index, message)) => {
                    self.error(pairs[index].0.clone(), message);
                    None
                }
            }
        });
        let max_connections = match &raw.max_connections {
            None => 100_000,
            Some(value) if (1..=10_000_000).contains(value.get_ref()) => *value.get_ref() as usize,
            Some(value) => {
                self.error(
                    value.span(),
                    "max_connections must be between 1 and 10000000",
                );
                1
            }
        };
        let max_connections_per_user = match &raw.max_connections_per_user {
            None => Some(DEFAULT_MAX_CONNECTIONS_PER_USER),
            Some(value) if *value.get_ref() == 0 => None,
            Some(value) if (1..=i64::from(u32::MAX)).contains(value.get_ref()) => {
                Some(*value.get_ref() as u32)
            }
            Some(value) => {
                self.error(
                    value.span(),
                    "max_connections_per_user must be 0 (unlimited) or more",
                );
                None
            }
        };
        let max_pending_handshakes = match &raw.max_pending_handshakes {
            None => 4096,
            Some(value) if (1..=1_000_000).contains(value.get_ref()) => *value.get_ref() as usize,
            Some(value) => {
                self.error(
                    value.span(),
                    "max_pending_handshakes must be between 1 and 1000000",
                );
                1
            }
        };
        let workers = match &raw.workers {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(value) if (1..=1024).contains(value.get_ref()) => *value.get_ref() as usize,
            Some(value) => {
                self.error(value.span(), "workers must be between 1 and 1024");
                1
            }
        };
        let handshake_rate_per_ip = self.rate(
            &raw.handshake_rate_per_ip,
            Some(RateLimit {
                per_second: 20.0,
                burst: 40,
            }),
        );
        let max_header_size = self.size(&raw.max_header_size, 16 * 1024);
        if let Some(value) = &raw.max_header_size
            && !(8192..=1024 * 1024).contains(&max_header_size)
        {
            self.error(
                value.span(),
                "max_header_size must be between 8KiB and 1MiB",
            );
        }
        Some(ServerSettings {
            listen,
            tls,
            handshake_timeout: self.duration(&raw.handshake_timeout, Duration::from_secs(10)),
            max_connections,
            drain_timeout: self.duration(&raw.drain_timeout, Duration::from_secs(30)),
            max_header_size: max_header_size as usize,
            max_connections_per_user,
            handshake_rate_per_ip,
            max_pending_handshakes,
            workers,
        })
    }

    fn log(&mut self, raw: Option<RawLog>) -> LogSettings {
        let mut settings = LogSettings {
            format: LogFormat::Text,
            level: "info".into(),
            audit: None,
        };
        let Some(raw) = raw else { return settings };
        if let Some(format) = raw.format {
            settings.format = match format.get_ref().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    self.error(
                        format.span(),
                        format!("unknown log format {other:?}: expected \"text\" or \"json\""),
                    );
                    LogFormat::Text
                }
            };
        }
        if let Some(level) = raw.level {
            if tracing_subscriber::EnvFilter::try_new(level.get_ref()).is_err() {
                self.error(level.span(), format!("invalid log level {:?}: expected error, warn, info, debug, trace or a filter like \"wsedge=debug\"", level.get_ref()));
            } else {
                settings.level = level.into_inner();
            }
        }
        if let Some(audit) = raw.audit {
            let path = self.path(audit.get_ref());
            match path.parent() {
                Some(dir) if dir.as_os_str().is_empty() || dir.is_dir() => {
                    settings.audit = Some(path)
                }
                _ => self.error(
                    audit.span(),
                    format!("the audit log's folder does not exist: {}", path.display()),
                ),
            }
        }
        settings
    }

    fn policy(&mut self, name: &str, raw: Spanned<RawAuth>) -> Option<AuthPolicy> {
        let span = raw.span();
        let raw = raw.into_inner();
        match raw.kind.get_ref().as_str() {
            "jwt" => {}
            "hmac" => {
                self.error(
                    raw.kind.span(),
                    "kind = \"hmac\" is not supported by this version yet; use \"jwt\"",
                );
                return None;
            }
            other => {
                self.error(
                    raw.kind.span(),
                    format!("unknown auth kind {other:?}: expected \"jwt\""),
                );
                return None;
            }
        }
        let mut algorithms = Vec::new();
        let algorithms_span = raw.algorithms.as_ref().map_or(span.clone(), |a| a.span());
        match &raw.algorithms {
            None => self.error(
                span.clone(),
                format!("[auth.{name}] needs algorithms, e.g. [\"HS256\"]"),
            ),
            Some(list) => {
                for alg in list.get_ref() {
                    match jwt::parse_algorithm(alg.get_ref()) {
                        Ok(alg) => algorithms.push(alg),
                        Err(message) => self.error(alg.span(), message),
                    }
                }
            }
        }
        if let Some(jwks) = &raw.jwks {
            self.error(
                jwks.span(),
                "jwks is not supported by this version yet; use secret or public_key",
            );
            return None;
        }
        let key = match (&raw.secret, &raw.public_key) {
            (Some(secret), None) => self.secret(secret, "secret").map(VerifyingKey::Secret),
            (None, Some(public_key)) => self
                .secret(public_key, "public_key")
                .map(VerifyingKey::PublicPem),
            (Some(secret), Some(_)) => {
                self.error(
                    secret.span(),
                    "give either secret (HS*) or public_key, not both",
                );
                None
            }
            (None, None) => {
                self.error(
                    span.clone(),
                    format!("[auth.{name}] needs secret (HS*) or public_key"),
                );
                None
            }
        };
        let issuer = raw
            .issuer
            .map(|i| i.into_inner().into_vec())
            .unwrap_or_default();
        let audience = raw
            .audience
            .map(|a| a.into_inner().into_vec())
            .unwrap_or_default();
        let leeway = self.duration(&raw.leeway, Duration::from_secs(30));
        let mut token_from = Vec::new();
        match raw.token_from {
            None => {
                token_from = vec![
                    TokenSource::Header,
                    TokenSource::Query("token".into()),
                    TokenSource::Subprotocol,
                ]
            }
            Some(sources) => {
                for source in sources {
                    match TokenSource::parse(source.get_ref()) {
                        Ok(source) => token_from.push(source),
                        Err(message) => self.error(source.span(), message),
                    }
                }
            }
        }
        let mut claims = ClaimNames::default();
        if let Some(raw_claims) = raw.claims {
            claims.user = raw_claims.user.unwrap_or(claims.user);
            claims.tenant = raw_claims.tenant.unwrap_or(claims.tenant);
            claims.conversation = raw_claims.conversation.unwrap_or(claims.conversation);
        }
        let key = key?;
        if algorithms.is_empty() {
            return None;
        }
        let settings = JwtSettings {
            algorithms: &algorithms,
            issuer: &issuer,
            audience: &audience,
            leeway,
        };
        let verifier = match jwt::JwtVerifier::new(&settings, &key) {
            Ok(verifier) => verifier,
            Err(message) => {
                self.error(algorithms_span, format!("[auth.{name}]: {message}"));
                return None;
            }
        };
        Some(AuthPolicy {
            name: name.to_owned(),
            algorithms,
            token_from,
            claims,
            issuers: issuer,
            audiences: audience,
            verifier,
            hmac_secret: match key {
                VerifyingKey::Secret(secret) => Some(secret),
                VerifyingKey::PublicPem(_) => None,
            },
        })
    }

    fn route(
        &mut self,
        raw: Spanned<RawRoute>,
        policies: &BTreeMap<String, Arc<AuthPolicy>>,
    ) -> Option<Route> {
        let route_span = raw.span();
        let raw = raw.into_inner();
        let errors_before = self.errors.len();

        let path = raw.path.get_ref().clone();
        if !path.starts_with('/') || path.contains(['?', '#']) {
            self.error(
                raw.path.span(),
                format!("route path {path:?} must start with '/' and hold no query"),
            );
        }
        let path_match = match raw.path_match.as_ref().map(|m| m.get_ref().as_str()) {
            None | Some("exact") => PathMatch::Exact(path),
            Some("prefix") => PathMatch::Prefix(path),
            Some(other) => {
                let span = raw
                    .path_match
                    .as_ref()
                    .map_or(route_span.clone(), |m| m.span());
                self.error(
                    span,
                    format!("unknown match {other:?}: expected \"exact\" or \"prefix\""),
                );
                PathMatch::Exact(path)
            }
        };
        let host = raw.host.map(|h| HostMatch::new(h.get_ref()));

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

        let upstream_tls = self.upstream_tls(raw.upstream_tls);
        let mut targets = Vec::new();
        let urls: Vec<Spanned<String>> = match (raw.upstream, raw.upstreams) {
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
        for url in urls {
            match UpstreamTarget::parse(url.get_ref(), upstream_tls.as_ref()) {
                Ok(target) => targets.push(target),
                Err(message) => self.error(url.span(), message),
            }
        }

        let allowed_origins = raw.allowed_origins.filter(|list| !list.is_empty());
        let conversation = match raw.conversation.as_ref().map(|c| c.get_ref().as_str()) {
            None | Some("query-or-token") => ConversationMode::QueryOrToken,
            Some("token") => ConversationMode::Token,
            Some("generate") => ConversationMode::Generate,
            Some("none") => ConversationMode::None,
            Some(other) => {
                let span = raw
                    .conversation
                    .as_ref()
                    .map_or(route_span.clone(), |c| c.span());
                self.error(span, format!("unknown conversation mode {other:?}: expected \"token\", \"query-or-token\", \"generate\" or \"none\""));
                ConversationMode::None
            }
        };
        let tenant = match raw.tenant {
            None => TenantRule::Optional,
            Some(rule) => {
                let span = rule.span();
                match rule.into_inner() {
                    RawTenant::Mode(mode) if mode == "optional" => TenantRule::Optional,
                    RawTenant::Mode(mode) if mode == "required" => TenantRule::Required,
                    RawTenant::Rule(RawTenantRule {
                        pin: Some(pin),
                        from: None,
                    }) if !pin.is_empty() => TenantRule::Pin(pin),
                    RawTenant::Rule(RawTenantRule {
                        pin: None,
                        from: Some(from),
                    }) => match from.as_str() {
                        "host" => TenantRule::FromHost,
                        _ => match from
                            .strip_prefix("path:")
                            .and_then(|n| n.parse::<usize>().ok())
                        {
                            Some(segment) if segment >= 1 => TenantRule::FromPath(segment),
                            _ => {
                                self.error(span, format!("unknown tenant source {from:?}: expected \"host\" or \"path:N\" (N from 1)"));
                                TenantRule::Optional
                            }
                        },
                    },
                    _ => {
                        self.error(span, "tenant must be \"optional\", \"required\", { pin = \"NAME\" } or { from = \"host\" | \"path:N\" }");
                        TenantRule::Optional
                    }
                }
            }
        };

        let mut inject = Vec::new();
        let default_inject = [
            ("x-user-id", "{user}"),
            ("x-tenant-id", "{tenant}"),
            ("x-conversation-id", "{conversation}"),
        ];
        match raw.inject {
            None => {
                for (name, template) in default_inject {
                    if let Ok(template) = Template::parse(template) {
                        inject.push((http::HeaderName::from_static(name), template));
                    }
                }
            }
            Some(map) => {
                for (name, template) in map {
                    let header = match http::HeaderName::from_bytes(name.get_ref().as_bytes()) {
                        Ok(header) => header,
                        Err(_) => {
                            self.error(
                                name.span(),
                                format!("{:?} is not a valid header name", name.get_ref()),
                            );
                            continue;
                        }
                    };
                    if crate::route::is_reserved_header(&header) {
                        self.error(
                            name.span(),
                            format!(
                                "{header} is set by the WebSocket handshake and cannot be injected"
                            ),
                        );
                        continue;
                    }
                    match Template::parse(template.get_ref()) {
                        Ok(template) => inject.push((header, template)),
                        Err(message) => self.error(template.span(), message),
                    }
                }
            }
        }
        let mut upstream_query = Vec::new();
        for (name, template) in raw.upstream_query.unwrap_or_default() {
            if name.get_ref().is_empty() {
                self.error(
                    name.span(),
                    "upstream_query parameter names cannot be empty",
                );
                continue;
            }
            match Template::parse(template.get_ref()) {
                Ok(template) => upstream_query.push((name.into_inner(), template)),
                Err(message) => self.error(template.span(), message),
            }
        }

        let max_message_size = self.size(&raw.max_message_size, 1 << 20);
        if let Some(value) = &raw.max_message_size
            && !(16..=(256 << 20)).contains(&max_message_size)
        {
            self.error(
                value.span(),
                "max_message_size must be between 16B and 256MiB",
            );
        }
        let connect_timeout = self.duration(&raw.connect_timeout, Duration::from_secs(10));

        if let Some(http) = &raw.http {
            match http.get_ref().as_str() {
                "refuse" => {}
                "proxy" => self.error(
                    http.span(),
                    "http = \"proxy\" is not supported by this version yet; use \"refuse\"",
                ),
                other => self.error(
                    http.span(),
                    format!("unknown http mode {other:?}: expected \"refuse\" or \"proxy\""),
                ),
            }
        }
        let defaults = Lifecycle::default();
        let lifecycle = Lifecycle {
            ping_interval: self.optional_duration(&raw.ping_interval, defaults.ping_interval),
            pong_timeout: self.duration(&raw.pong_timeout, defaults.pong_timeout),
            idle_timeout: self.optional_duration(&raw.idle_timeout, defaults.idle_timeout),
            max_session: self.optional_duration(&raw.max_session, defaults.max_session),
            close_on_token_expiry: match raw.token_expiry.as_ref().map(|e| e.get_ref().as_str()) {
                None | Some("close") => true,
                Some("ignore") => false,
                Some(other) => {
                    let span = raw
                        .token_expiry
                        .as_ref()
                        .map_or(route_span.clone(), |e| e.span());
                    self.error(
                        span,
                        format!("unknown token_expiry {other:?}: expected \"close\" or \"ignore\""),
                    );
                    true
                }
            },
            token_expiry_grace: self.duration(&raw.token_expiry_grace, defaults.token_expiry_grace),
            message_rate: self.rate(&raw.message_rate, defaults.message_rate),
        };
        if let Some(value) = &raw.pong_timeout
            && lifecycle.pong_timeout.is_zero()
        {
            self.error(value.span(), "pong_timeout must be more than 0s");
        }
        if lifecycle.close_on_token_expiry && auth.is_none() && raw.token_expiry.is_some() {
            let span = raw
                .token_expiry
                .as_ref()
                .map_or(route_span.clone(), |e| e.span());
            self.warn(
                span,
                "token_expiry has no effect on a route with auth = \"none\"",
            );
        }
        let upstream_cooldown = self.duration(&raw.upstream_cooldown, Duration::from_secs(10));
        let resume = raw.resume.as_ref().map(|resume| {
            let span = resume.span();
            let resume = resume.get_ref();
            let window = self.duration(&Some(resume.window.clone()), Duration::ZERO);
            if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&window) {
                self.error(
                    resume.window.span(),
                    "resume.window must be between 100ms and 1h",
                );
            }
            let max_messages = match &resume.max_messages {
                None => 1000,
                Some(n) if (1..=1_000_000).contains(n.get_ref()) => *n.get_ref() as usize,
                Some(n) => {
                    self.error(
                        n.span(),
                        "resume.max_messages must be between 1 and 1000000",
                    );
                    1
                }
            };
            let max_bytes = self.size(&resume.max_bytes, 4 << 20);
            if let Some(value) = &resume.max_bytes
                && !((1 << 10)..=(1 << 30)).contains(&max_bytes)
            {
                self.error(value.span(), "resume.max_bytes must be between 1KiB and 1GiB");
            }
            if auth.is_none() {
                self.warn(
                    span,
                    "resume on a route with auth = \"none\": anyone who knows a session_id can take that session over",
                );
            }
            ResumeSettings {
                window,
                max_messages,
                max_bytes: max_bytes as usize,
                announce: resume.announce.unwrap_or(false),
            }
        });

        if self.errors.len() > errors_before {
            return None;
        }
        Some(Route::new(crate::route::RouteSettings {
            path: path_match,
            host,
            targets,
            auth,
            allowed_origins,
            conversation,
            tenant,
            inject,
            upstream_query,
            forward_token: raw.forward_token.unwrap_or(false),
            connect_timeout,
            max_message_size: max_message_size as usize,
            lifecycle,
            upstream_cooldown,
            resume,
        }))
    }

    fn upstream_tls(&mut self, raw: Option<RawUpstreamTls>) -> Option<tls::UpstreamTls> {
        let raw = raw.unwrap_or(RawUpstreamTls {
            ca: None,
            server_name: None,
        });
        let roots = match &raw.ca {
            Some(ca) => {
                let pem = self.read_file(ca.span(), "upstream CA", ca.get_ref())?;
                match tls::root_store_from_pem(&pem) {
                    Ok(roots) => Arc::new(roots),
                    Err(message) => {
                        self.error(ca.span(), message);
                        return None;
                    }
                }
            }
            None => match &self.native_roots {
                Some(roots) => roots.clone(),
                None => {
                    let roots = Arc::new(tls::native_root_store());
                    self.native_roots = Some(roots.clone());
                    roots
                }
            },
        };
        let server_name = match raw.server_name {
            Some(name) => match rustls::pki_types::ServerName::try_from(name.get_ref().clone()) {
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
            Ok(config) => Some(tls::UpstreamTls {
                config,
                server_name,
            }),
            Err(message) => {
                self.error(0..0, message);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, "proxy.toml", Path::new("."))
    }

    fn minimal(extra_route: &str) -> String {
        format!(
            r#"
[server]
listen = ["127.0.0.1:0"]

[auth.main]
kind = "jwt"
algorithms = ["HS256"]
secret = "{SECRET}"

[[route]]
path = "/ws/chat"
upstream = "ws://127.0.0.1:9/ws"
auth = "main"
{extra_route}
"#
        )
    }

    fn first_error(text: &str) -> String {
        match load(text) {
            Ok(_) => panic!("config should have been refused"),
            Err(error) => error.diagnostics[0].clone(),
        }
    }

    #[test]
    fn minimal_config_loads_with_a_warning_for_the_inline_secret() {
        let config = load(&minimal("")).unwrap();
        assert_eq!(config.server.listen.len(), 1);
        assert!(
            config.warnings[0].starts_with("proxy.toml:8:10: warning: secret is written inline"),
            "{:?}",
            config.warnings
        );
    }

    #[test]
    fn errors_point_at_the_value() {
        let error = first_error(&minimal("max_message_size = \"1 parsec\""));
        assert!(
            error.starts_with("proxy.toml:14:20: invalid size"),
            "{error}"
        );
        let error = first_error(&minimal("colour = \"blue\""));
        assert!(
            error.starts_with("proxy.toml:14:1: unknown field `colour`"),
            "{error}"
        );
        let error = first_error(&minimal("forward_token = \"yes\""));
        assert!(error.starts_with("proxy.toml:14:17:"), "{error}");
        let error = first_error(&minimal("").replace("auth = \"main\"", "auth = \"mian\""));
        assert!(
            error.starts_with("proxy.toml:13:8: route names auth policy \"mian\""),
            "{error}"
        );
        let error = first_error(&minimal("").replace("[server]", "[server"));
        assert!(error.starts_with("proxy.toml:2:"), "{error}");
    }

    #[test]
    fn algorithm_families_cannot_mix() {
        let text = minimal("").replace("[\"HS256\"]", "[\"HS256\", \"RS256\"]");
        let error = first_error(&text);
        assert!(error.contains("mix key families"), "{error}");
    }

    #[test]
    fn values_that_could_not_run_are_refused_by_check() {
        let text = minimal("").replace(
            "[server]\n",
            "[server]\nmax_connections = 9223372036854775807\n",
        );
        assert!(first_error(&text).contains("max_connections must be between"));
        let text = minimal("message_rate = { per_second = 1e-30 }");
        assert!(first_error(&text).contains("per_second"));
        let text = minimal("").replace(
            "[server]\n",
            "[server]\nhandshake_rate_per_ip = { per_second = 1e-30 }\n",
        );
        assert!(first_error(&text).contains("per_second"));
    }

    #[test]
    fn resume_settings_are_checked_where_they_are() {
        let config = load(&minimal(r#"resume = { window = "30s" }"#)).unwrap();
        let route = &config.router.routes()[0];
        let resume = route.resume.as_ref().unwrap();
        assert_eq!(
            (
                resume.window,
                resume.max_messages,
                resume.max_bytes,
                resume.announce
            ),
            (Duration::from_secs(30), 1000, 4 << 20, false)
        );
        for (value, at, mentions) in [
            (
                r#"resume = { window = "2h" }"#,
                "proxy.toml:14:21",
                "resume.window",
            ),
            (
                r#"resume = { window = "30s", max_messages = 0 }"#,
                "proxy.toml:14:43",
                "resume.max_messages",
            ),
            (
                r#"resume = { window = "30s", max_bytes = "1GiB1" }"#,
                "proxy.toml:14:40",
                "invalid size",
            ),
            (
                r#"resume = { window = "30s", max_bytes = "100B" }"#,
                "proxy.toml:14:40",
                "resume.max_bytes",
            ),
            (
                r#"resume = { window = "30s", replay = true }"#,
                "proxy.toml:14:",
                "unknown field",
            ),
        ] {
            let error = first_error(&minimal(value));
            assert!(
                error.starts_with(at) && error.contains(mentions),
                "{value}: {error}"
            );
        }
        let open =
            minimal(r#"resume = { window = "30s" }"#).replace("auth = \"main\"", "auth = \"none\"");
        let config = load(&open).unwrap();
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.contains("anyone who knows a session_id")),
            "{:?}",
            config.warnings
        );
    }

    #[test]
    fn short_hmac_secrets_are_refused() {
        let text = minimal("").replace(SECRET, "short");
        assert!(first_error(&text).contains("at least 32"));
    }
}
