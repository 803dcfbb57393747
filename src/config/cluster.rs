//! `[cluster]`: where Redis is, this edge's name and link, and what Redis being down means.

use std::net::SocketAddr;
use std::time::Duration;

use redis::IntoConnectionInfo;
use toml::Spanned;

use super::raw::RawCluster;
use super::settings::{ClusterSettings, RedisDown};
use super::validate::Ctx;

/// Shorter than this, renewals (a third of it) would be a busy loop against Redis.
const SHORTEST_NODE_TTL: Duration = Duration::from_secs(3);
const DEFAULT_LINK: &str = "0.0.0.0:7443";

impl Ctx<'_> {
    pub(super) fn cluster(&mut self, raw: Spanned<RawCluster>) -> Option<ClusterSettings> {
        let raw = raw.into_inner();
        let redis = self.redis_url(&raw.redis);
        let node = raw.node.get_ref();
        let node_ok = !node.is_empty()
            && node.len() <= 64
            && node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !node_ok {
            self.error(
                raw.node.span(),
                "node must be 1 to 64 characters of A-Z a-z 0-9 - _ .",
            );
        }
        let secret_span = raw.secret.span();
        let secret = self.secret(&raw.secret, "secret");
        if secret.as_ref().is_some_and(|secret| secret.len() < 32) {
            self.error(
                secret_span,
                "the cluster secret must be at least 32 bytes: it signs what one edge asks of another",
            );
        }
        let node_ttl = self.duration(&raw.node_ttl, Duration::from_secs(30));
        if node_ttl < SHORTEST_NODE_TTL
            && let Some(value) = &raw.node_ttl
        {
            self.error(value.span(), "node_ttl must be at least 3s");
        }
        let on_redis_down = match raw
            .on_redis_down
            .as_ref()
            .map(|v| (v.get_ref().as_str(), v))
        {
            None | Some(("open", _)) => RedisDown::Open,
            Some(("closed", _)) => RedisDown::Closed,
            Some((other, value)) => {
                self.error(
                    value.span(),
                    format!("on_redis_down must be \"open\" or \"closed\", not {other:?}"),
                );
                RedisDown::Open
            }
        };
        let redis_timeout = self.duration(&raw.redis_timeout, Duration::from_millis(250));
        let link_text = raw
            .link
            .as_ref()
            .map_or(DEFAULT_LINK, |l| l.get_ref().as_str());
        let link = match link_text.parse::<SocketAddr>() {
            Ok(link) => Some(link),
            Err(_) => {
                let span = raw.link.as_ref().map_or(0..0, Spanned::span);
                self.error(
                    span,
                    format!("invalid link address {link_text:?}: expected IP:PORT"),
                );
                None
            }
        };
        let advertise = raw.advertise.as_ref().map(|a| a.get_ref().clone());
        if let Some(value) = &raw.advertise
            && !valid_host_port(value.get_ref())
        {
            self.error(
                value.span(),
                "advertise must be HOST:PORT, where the other edges reach this edge's link",
            );
        }
        if advertise.is_none() && link.is_some_and(|link| link.ip().is_unspecified()) {
            let span = raw.link.as_ref().map_or(0..0, Spanned::span);
            self.error(
                span,
                format!(
                    "the link listens on {link_text}: set advertise = \"HOST:PORT\", the address the other edges reach it at"
                ),
            );
        }
        Some(ClusterSettings {
            redis: redis?,
            node: node_ok.then(|| node.clone())?,
            secret: secret.filter(|secret| secret.len() >= 32)?,
            node_ttl,
            on_redis_down,
            redis_timeout,
            link: link?,
            advertise,
        })
    }

    /// The Redis URL, checked; the message never repeats it (it may hold a password).
    fn redis_url(&mut self, url: &Spanned<String>) -> Option<redis::ConnectionInfo> {
        let text = url.get_ref();
        if !(text.starts_with("redis://")
            || text.starts_with("rediss://")
            || text.starts_with("redis+unix://")
            || text.starts_with("unix://"))
        {
            self.error(
                url.span(),
                "redis must be a redis://HOST:PORT/DB URL (or redis+unix:///PATH)",
            );
            return None;
        }
        if text.starts_with("rediss://") {
            self.error(
                url.span(),
                "rediss:// (TLS to Redis) is not supported: put Redis on a private network or loopback",
            );
            return None;
        }
        match text.as_str().into_connection_info() {
            Ok(info) => Some(info),
            Err(error) => {
                self.error(url.span(), format!("not a Redis URL: {}", error.category()));
                None
            }
        }
    }
}

fn valid_host_port(text: &str) -> bool {
    match text.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port > 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::Config;
    use super::*;

    const BASE: &str = r#"[server]
listen = ["127.0.0.1:0"]

[[route]]
path = "/ws"
upstream = "ws://127.0.0.1:9/ws"
auth = "none"

[cluster]
"#;
    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn load(cluster: &str) -> Result<Config, Vec<String>> {
        Config::from_toml(&format!("{BASE}{cluster}"), "proxy.toml", Path::new("."))
            .map_err(|error| error.diagnostics)
    }

    fn refused(cluster: &str) -> Vec<String> {
        match load(cluster) {
            Ok(_) => panic!("the config should have been refused"),
            Err(errors) => errors,
        }
    }

    #[test]
    fn a_cluster_loads_with_its_defaults() {
        let config = load(&format!(
            "redis = \"redis://10.0.0.9:6379/2\"\nnode = \"edge-1\"\nsecret = \"{SECRET}\"\nadvertise = \"edge-1.internal:7443\"\n"
        ))
        .unwrap();
        let cluster = config.cluster.unwrap();
        assert_eq!(cluster.node, "edge-1");
        assert_eq!(cluster.node_ttl, Duration::from_secs(30));
        assert_eq!(cluster.on_redis_down, RedisDown::Open);
        assert_eq!(cluster.redis_timeout, Duration::from_millis(250));
        assert_eq!(cluster.link, "0.0.0.0:7443".parse().unwrap());
        assert_eq!(cluster.advertise.as_deref(), Some("edge-1.internal:7443"));
    }

    #[test]
    fn every_bad_key_is_named_at_its_place_and_a_password_is_never_repeated() {
        let errors = refused(
            "redis = \"http://user:hunter2@redis:6379\"\nnode = \"edge 1\"\nsecret = \"short\"\nnode_ttl = \"1s\"\non_redis_down = \"maybe\"\nlink = \"nowhere\"\n",
        );
        let expect = [
            ("proxy.toml:10:9:", "redis must be a redis://"),
            ("proxy.toml:11:8:", "node must be"),
            ("proxy.toml:12:10:", "at least 32 bytes"),
            ("proxy.toml:13:12:", "node_ttl must be at least 3s"),
            (
                "proxy.toml:14:17:",
                "on_redis_down must be \"open\" or \"closed\"",
            ),
            ("proxy.toml:15:8:", "invalid link address"),
        ];
        for (location, message) in expect {
            assert!(
                errors
                    .iter()
                    .any(|error| error.starts_with(location) && error.contains(message)),
                "no {location} {message:?} in {errors:#?}"
            );
        }
        assert!(!errors.iter().any(|error| error.contains("hunter2")));
        let unreachable = refused(&format!(
            "redis = \"redis://:hunter2@redis:6379\"\nnode = \"a\"\nsecret = \"{SECRET}\"\n"
        ));
        assert!(
            unreachable[0].contains("set advertise"),
            "a link on 0.0.0.0 needs an address to be reached at: {unreachable:?}"
        );
        let missing = refused("node = \"a\"\n");
        assert!(missing[0].contains("missing field `redis`"), "{missing:?}");
    }
}
