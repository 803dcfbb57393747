//! The context that collects every error of a config with its location, the helpers every
//! section uses (durations, sizes, ranges, rates, files, secrets), and the server, admin and
//! log sections. Policies are validated in `auth.rs`, routes in `route.rs`.

use std::fmt;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use super::raw::{OneOrManyTls, RawAdmin, RawLog, RawRate, RawSecret, RawServer};
use super::settings::{
    AdminSettings, ConfigError, LogFormat, LogSettings, RateLimit, ServerSettings,
};
use crate::tls;
use crate::units::{parse_duration, parse_size};

/// Why 32: a person with a few devices and tabs stays far below it, while one leaked token
/// cannot take a meaningful share of the edge.
const DEFAULT_MAX_CONNECTIONS_PER_USER: i64 = 32;

/// Validation of one config text: every error and warning found, each with its location.
pub(super) struct Ctx<'a> {
    text: &'a str,
    name: &'a str,
    base: &'a Path,
    errors: Vec<String>,
    warnings: Vec<String>,
    /// The system's trust store, read once for all routes that need it.
    pub(super) native_roots: Option<Arc<rustls::RootCertStore>>,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(text: &'a str, name: &'a str, base: &'a Path) -> Self {
        Self {
            text,
            name,
            base,
            errors: Vec::new(),
            warnings: Vec::new(),
            native_roots: None,
        }
    }

    fn location(&self, span: &Range<usize>) -> String {
        let offset = span.start.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        format!("{}:{line}:{column}", self.name)
    }

    pub(super) fn error(&mut self, span: Range<usize>, message: impl fmt::Display) {
        let line = format!("{}: {message}", self.location(&span));
        self.errors.push(line);
    }

    pub(super) fn warn(&mut self, span: Range<usize>, message: impl fmt::Display) {
        let line = format!("{}: warning: {message}", self.location(&span));
        self.warnings.push(line);
    }

    /// The warnings found so far, taken.
    pub(super) fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// How many errors have been found so far.
    pub(super) fn error_count(&self) -> usize {
        self.errors.len()
    }

    pub(super) fn into_error(self) -> ConfigError {
        ConfigError {
            diagnostics: self.errors,
        }
    }

    pub(super) fn path(&self, text: &str) -> PathBuf {
        let path = Path::new(text);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base.join(path)
        }
    }

    /// A value written as text and read by `parse` (a duration, a size); `default` when it is
    /// absent, or (with the error at its location) when it cannot be read.
    fn parsed<T, E: fmt::Display>(
        &mut self,
        value: &Option<Spanned<String>>,
        default: T,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> T {
        let Some(value) = value else { return default };
        match parse(value.get_ref()) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.error(value.span(), error);
                default
            }
        }
    }

    pub(super) fn duration(
        &mut self,
        value: &Option<Spanned<String>>,
        default: Duration,
    ) -> Duration {
        self.parsed(value, default, parse_duration)
    }

    /// A duration that may be switched off with `"off"` (or `"0s"`).
    pub(super) fn optional_duration(
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

    pub(super) fn size(&mut self, value: &Option<Spanned<String>>, default: u64) -> u64 {
        self.parsed(value, default, parse_size)
    }

    /// A size that must lie in `range`; `out_of_range` says so at the value.
    pub(super) fn size_in(
        &mut self,
        value: &Option<Spanned<String>>,
        default: u64,
        range: RangeInclusive<u64>,
        out_of_range: &str,
    ) -> usize {
        let size = self.size(value, default);
        if let Some(value) = value
            && !range.contains(&size)
        {
            self.error(value.span(), out_of_range);
        }
        usize::try_from(size).unwrap_or(usize::MAX)
    }

    /// An integer that must lie in `range`, named `what` in the error at the value.
    pub(super) fn integer<T: TryFrom<i64>>(
        &mut self,
        value: &Option<Spanned<i64>>,
        default: T,
        range: RangeInclusive<i64>,
        what: &str,
    ) -> T {
        let Some(value) = value else { return default };
        let number = *value.get_ref();
        match T::try_from(number) {
            Ok(number_as_t) if range.contains(&number) => number_as_t,
            _ => {
                self.error(
                    value.span(),
                    format!(
                        "{what} must be between {} and {}",
                        range.start(),
                        range.end()
                    ),
                );
                default
            }
        }
    }

    pub(super) fn rate(
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

    pub(super) fn read_file(
        &mut self,
        span: Range<usize>,
        what: &str,
        text: &str,
    ) -> Option<Vec<u8>> {
        let path = self.path(text);
        match std::fs::read(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                self.error(span, format!("cannot read {what} {}: {e}", path.display()));
                None
            }
        }
    }

    pub(super) fn secret(&mut self, secret: &Spanned<RawSecret>, what: &str) -> Option<Vec<u8>> {
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

    pub(super) fn admin(&mut self, raw: RawAdmin) -> Option<AdminSettings> {
        let token = match &raw.token {
            None => None,
            Some(token) => {
                let span = token.span();
                let token = self.secret(token, "token")?;
                if token.len() < 16 {
                    self.error(span, "the admin token must be at least 16 bytes");
                    return None;
                }
                Some(token)
            }
        };
        let state_dir = raw.state_dir.as_ref().map(|dir| self.path(dir.get_ref()));
        let Some(listen) = raw.listen else {
            return Some(AdminSettings {
                listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
                token,
                state_dir,
            });
        };
        match listen.get_ref().parse() {
            Ok(listen) => Some(AdminSettings {
                listen,
                token,
                state_dir,
            }),
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
        }
    }

    pub(super) fn server(&mut self, raw: RawServer) -> Option<ServerSettings> {
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
        // In the order of the file's keys, so that the errors come in that order too.
        let tls = raw.tls.and_then(|tls| self.listener_tls(tls));
        let handshake_timeout = self.duration(&raw.handshake_timeout, Duration::from_secs(10));
        let max_connections = self.integer(
            &raw.max_connections,
            100_000,
            1..=10_000_000,
            "max_connections",
        );
        let drain_timeout = self.duration(&raw.drain_timeout, Duration::from_secs(30));
        let max_header_size = self.size_in(
            &raw.max_header_size,
            16 * 1024,
            8192..=1024 * 1024,
            "max_header_size must be between 8KiB and 1MiB",
        );
        let max_connections_per_user = self.integer(
            &raw.max_connections_per_user,
            DEFAULT_MAX_CONNECTIONS_PER_USER,
            0..=i64::from(u32::MAX),
            "max_connections_per_user (0: unlimited)",
        );
        let max_pending_handshakes = self.integer(
            &raw.max_pending_handshakes,
            4096,
            1..=1_000_000,
            "max_pending_handshakes",
        );
        // A sixteenth by default: one address cannot take the slots everyone else needs,
        // while a NAT'd office reconnecting at once fits.
        let max_pending_handshakes_per_ip = self.integer(
            &raw.max_pending_handshakes_per_ip,
            (max_pending_handshakes / 16).max(1),
            0..=1_000_000,
            "max_pending_handshakes_per_ip (0: no limit of its own)",
        );
        let handshake_rate_per_ip = self.rate(
            &raw.handshake_rate_per_ip,
            Some(RateLimit {
                per_second: 20.0,
                burst: 40,
            }),
        );
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = self.integer(&raw.workers, cores, 1..=1024, "workers");
        Some(ServerSettings {
            listen,
            tls,
            handshake_timeout,
            max_connections,
            drain_timeout,
            max_header_size,
            max_connections_per_user: u32::try_from(max_connections_per_user)
                .ok()
                .filter(|&max| max > 0),
            max_pending_handshakes,
            max_pending_handshakes_per_ip: (max_pending_handshakes_per_ip > 0)
                .then_some(max_pending_handshakes_per_ip),
            handshake_rate_per_ip,
            workers,
        })
    }

    /// `tls = { cert, key }` or a list of them, chosen by SNI.
    fn listener_tls(&mut self, tls: OneOrManyTls) -> Option<Arc<rustls::ServerConfig>> {
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
            Err((index, error)) => {
                self.error(pairs[index].0.clone(), error);
                None
            }
        }
    }

    pub(super) fn log(&mut self, raw: Option<RawLog>) -> LogSettings {
        let mut settings = LogSettings {
            format: LogFormat::Text,
            level: "info".into(),
            audit: None,
        };
        let Some(raw) = raw else { return settings };
        if let Some(format) = raw.format {
            settings.format = format;
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
}
