//! `proxy.toml`: raw serde structs (unknown keys refused, [`raw`]) turned into a validated
//! [`Config`] ([`settings`]) by [`validate`] (server, admin, log), [`auth`] (policies) and
//! [`route`] (routes).
//!
//! The same path serves start-up, `wsedge check` and reload: everything is parsed, every
//! file is read and every key is built here, so a `Config` that exists is one that can serve.
//! Every error carries the TOML span of the value it is about, reported as `file:line:col`.

mod auth;
mod cluster;
mod raw;
mod route;
pub(crate) mod settings;
mod validate;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use raw::RawConfig;
pub use settings::{Config, ConfigError, LogFormat, LogSettings};
use validate::Ctx;

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
        let mut ctx = Ctx::new(text, name, base);
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(error) => {
                let span = error.span().unwrap_or(0..0);
                ctx.error(span, error.message().trim());
                return Err(ctx.into_error());
            }
        };
        match validate(&mut ctx, raw) {
            Some(config) if ctx.error_count() == 0 => Ok(config),
            _ => Err(ctx.into_error()),
        }
    }
}

/// The whole config; `None` (with errors recorded in `ctx`) when any part of it failed.
fn validate(ctx: &mut Ctx, raw: RawConfig) -> Option<Config> {
    let server = ctx.server(raw.server);
    let admin = raw.admin.and_then(|admin| ctx.admin(admin));
    let log = ctx.log(raw.log);
    let cluster = raw.cluster.and_then(|cluster| ctx.cluster(cluster));

    let mut policies = BTreeMap::new();
    let mut jwks = Vec::new();
    for (name, auth) in raw.auth {
        if name == "none" {
            ctx.error(auth.span(), "a policy cannot be named \"none\": routes use auth = \"none\" to mean no authentication");
            continue;
        }
        if let Some(built) = ctx.policy(&name, auth) {
            jwks.extend(built.jwks);
            policies.insert(name, Arc::new(built.policy));
        }
    }

    if raw.routes.is_empty() {
        ctx.error(
            0..0,
            "no [[route]]: the edge would refuse every request with 404",
        );
    }
    let mut routes = Vec::new();
    for raw_route in raw.routes {
        if let Some(route) = ctx.route(raw_route, &policies) {
            routes.push(Arc::new(route));
        }
    }
    for (i, first) in routes.iter().enumerate() {
        for (j, second) in routes.iter().enumerate().skip(i + 1) {
            if first.path == second.path && first.host == second.host {
                ctx.error(
                    0..0,
                    format!(
                        "two routes have the same host and path: route #{} and route #{}",
                        i + 1,
                        j + 1
                    ),
                );
            }
        }
    }
    Some(Config {
        server: server?,
        admin,
        log,
        cluster: cluster.map(Arc::new),
        policies,
        routes,
        jwks,
        warnings: ctx.take_warnings(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use settings::{Affinity, ConversationMode, HttpSettings, PathMatch};
    use std::time::Duration;

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
    fn a_route_with_a_bad_duration_is_left_out_with_that_error_alone() {
        // Two routes on one path, one of them broken: only the broken value is reported (a
        // broken route takes no part in the duplicate check).
        let text = format!(
            "{}\nconnect_timeout = \"soon\"\n\n[[route]]\npath = \"/ws/chat\"\nupstream = \"ws://127.0.0.1:9/ws\"\nauth = \"main\"\n",
            minimal("")
        );
        let error = load(&text).err().expect("refused");
        assert_eq!(error.diagnostics.len(), 1, "{:?}", error.diagnostics);
        assert!(
            error.diagnostics[0].starts_with("proxy.toml:16:19: invalid duration"),
            "{:?}",
            error.diagnostics
        );
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
        let route = &config.routes[0];
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
    fn modes_are_checked_where_they_are() {
        for (value, at, mentions) in [
            (
                "match = \"fuzzy\"",
                "proxy.toml:14:9:",
                "unknown variant `fuzzy`",
            ),
            (
                "conversation = \"maybe\"",
                "proxy.toml:14:16:",
                "`query-or-token`",
            ),
            ("http = \"tunnel\"", "proxy.toml:14:8:", "`refuse`"),
            (
                "http = \"proxy\"\nhttp_timeout = \"0s\"",
                "proxy.toml:15:16:",
                "http_timeout must be between 1s and 1h",
            ),
            (
                "http = \"proxy\"\nmax_body_size = \"2GiB\"",
                "proxy.toml:15:17:",
                "max_body_size must be between",
            ),
            ("affinity = \"sticky\"", "proxy.toml:14:12:", "`user`"),
            ("token_expiry = \"later\"", "proxy.toml:14:16:", "`ignore`"),
            ("tenant = \"maybe\"", "proxy.toml:14:10:", "tenant must be"),
            (
                "tenant = { pin = \"acme\", from = \"host\" }",
                "proxy.toml:14:10:",
                "tenant must be",
            ),
            (
                "tenant = { from = \"path:0\" }",
                "proxy.toml:14:10:",
                "unknown tenant source",
            ),
        ] {
            let error = first_error(&minimal(value));
            assert!(
                error.starts_with(at) && error.contains(mentions),
                "{value}: {error}"
            );
        }
        let log = minimal("").replace("[auth.main]", "[log]\nformat = \"xml\"\n\n[auth.main]");
        let error = first_error(&log);
        assert!(
            error.starts_with("proxy.toml:6:10:") && error.contains("`json`"),
            "{error}"
        );
        let kind = minimal("").replace("kind = \"jwt\"", "kind = \"oauth\"");
        let error = first_error(&kind);
        assert!(
            error.starts_with("proxy.toml:6:8:") && error.contains("`hmac`"),
            "{error}"
        );
        let config = load(&minimal("match = \"prefix\"\nconversation = \"none\"")).unwrap();
        let route = &config.routes[0];
        assert_eq!(route.path, PathMatch::Prefix("/ws/chat".into()));
        assert_eq!(route.conversation, ConversationMode::None);
        assert_eq!(
            route.http, None,
            "plain HTTP is refused unless a route proxies it"
        );
        let config = load(&minimal("http = \"proxy\"\naffinity = \"user\"")).unwrap();
        let route = &config.routes[0];
        assert_eq!(
            route.http,
            Some(HttpSettings {
                timeout: Duration::from_secs(120),
                max_body_size: 1 << 20
            })
        );
        assert_eq!(route.affinity, Affinity::User);
        // Keys that only a proxying route reads are pointed out elsewhere.
        let config = load(&minimal("max_body_size = \"1KiB\"")).unwrap();
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.starts_with("proxy.toml:14:17: warning: max_body_size has no effect")),
            "{:?}",
            config.warnings
        );
        // Affinity by user needs users.
        let open = minimal("affinity = \"user\"").replace("auth = \"main\"", "auth = \"none\"");
        assert!(first_error(&open).starts_with("proxy.toml:14:12: affinity = \"user\" needs"));
    }

    #[test]
    fn integers_out_of_range_are_refused_at_the_value() {
        for (key, mentions) in [
            (
                "max_connections = 0",
                "max_connections must be between 1 and 10000000",
            ),
            ("workers = 2000", "workers must be between 1 and 1024"),
            (
                "max_pending_handshakes = -1",
                "max_pending_handshakes must be between",
            ),
            ("max_connections_per_user = -1", "max_connections_per_user"),
        ] {
            let text = minimal("").replace("[server]\n", &format!("[server]\n{key}\n"));
            let error = first_error(&text);
            let column = key.find('=').unwrap() + 3;
            assert!(
                error.starts_with(&format!("proxy.toml:3:{column}: {mentions}")),
                "{key}: {error}"
            );
        }
        let text = minimal("").replace("[server]\n", "[server]\nmax_connections_per_user = 0\n");
        assert_eq!(load(&text).unwrap().server.max_connections_per_user, None);
    }

    #[test]
    fn short_hmac_secrets_are_refused() {
        let text = minimal("").replace(SECRET, "short");
        assert!(first_error(&text).contains("at least 32"));
    }
}
