//! `proxy.toml` as written: serde structs that refuse unknown keys and keep the span of every
//! value that validation may have to point at.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use toml::Spanned;

use super::settings::{Affinity, ConversationMode, LogFormat};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum MatchMode {
    Exact,
    Prefix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum HttpMode {
    Refuse,
    Proxy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum TokenExpiry {
    Close,
    Ignore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum AuthKind {
    Jwt,
    Hmac,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    pub(super) admin: Option<RawAdmin>,
    pub(super) log: Option<RawLog>,
    pub(super) cluster: Option<Spanned<RawCluster>>,
    #[serde(default)]
    pub(super) auth: BTreeMap<String, Spanned<RawAuth>>,
    #[serde(default, rename = "route")]
    pub(super) routes: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Spanned<Vec<Spanned<String>>>,
    pub(super) tls: Option<OneOrManyTls>,
    pub(super) handshake_timeout: Option<Spanned<String>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) drain_timeout: Option<Spanned<String>>,
    pub(super) max_header_size: Option<Spanned<String>>,
    pub(super) max_connections_per_user: Option<Spanned<i64>>,
    pub(super) max_pending_handshakes: Option<Spanned<i64>>,
    pub(super) max_pending_handshakes_per_ip: Option<Spanned<i64>>,
    pub(super) handshake_rate_per_ip: Option<Spanned<RawRate>>,
    pub(super) workers: Option<Spanned<i64>>,
}

/// `tls = { cert, key }`, or a list of them selected by the client's SNI name.
pub(super) enum OneOrManyTls {
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
pub(super) struct RawTls {
    pub(super) cert: Spanned<String>,
    pub(super) key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<Spanned<String>>,
    /// The bearer token of the `/admin/` API (no API without it).
    pub(super) token: Option<Spanned<RawSecret>>,
    /// Where revocations are kept across restarts.
    pub(super) state_dir: Option<Spanned<String>>,
}

/// `[cluster]`: several edges sharing limits, revocations and sessions through Redis.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) redis: Spanned<String>,
    pub(super) node: Spanned<String>,
    pub(super) secret: Spanned<RawSecret>,
    pub(super) node_ttl: Option<Spanned<String>>,
    pub(super) on_redis_down: Option<Spanned<String>>,
    pub(super) redis_timeout: Option<Spanned<String>>,
    pub(super) link: Option<Spanned<String>>,
    pub(super) advertise: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<LogFormat>,
    pub(super) level: Option<Spanned<String>>,
    pub(super) audit: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) kind: Spanned<AuthKind>,
    pub(super) algorithms: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) secret: Option<Spanned<RawSecret>>,
    pub(super) public_key: Option<Spanned<RawSecret>>,
    pub(super) jwks: Option<Spanned<RawJwks>>,
    pub(super) jwks_min_refetch: Option<Spanned<String>>,
    pub(super) issuer: Option<Spanned<OneOrMany>>,
    pub(super) audience: Option<Spanned<OneOrMany>>,
    pub(super) leeway: Option<Spanned<String>>,
    pub(super) token_from: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) claims: Option<RawClaims>,
    /// `kind = "hmac"`: the query parameter names, and how far out `expires` may be.
    pub(super) params: Option<Spanned<RawParams>>,
    pub(super) max_ttl: Option<Spanned<String>>,
}

/// `jwks = { file = "…" }` or `jwks = { url = "https://…", refresh = "5m", ca = { file } }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJwks {
    pub(super) file: Option<Spanned<String>>,
    pub(super) url: Option<Spanned<String>>,
    pub(super) refresh: Option<Spanned<String>>,
    pub(super) ca: Option<Spanned<RawCaFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCaFile {
    pub(super) file: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawParams {
    pub(super) user: Option<String>,
    pub(super) tenant: Option<String>,
    pub(super) conversation: Option<String>,
    pub(super) expires: Option<String>,
    pub(super) signature: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClaims {
    pub(super) user: Option<String>,
    pub(super) tenant: Option<String>,
    pub(super) conversation: Option<String>,
    pub(super) conversations: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) path: Spanned<String>,
    #[serde(rename = "match")]
    pub(super) path_match: Option<MatchMode>,
    pub(super) host: Option<Spanned<String>>,
    pub(super) upstream: Option<Spanned<String>>,
    pub(super) upstreams: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) upstream_tls: Option<RawUpstreamTls>,
    pub(super) auth: Spanned<String>,
    pub(super) allowed_origins: Option<Vec<String>>,
    pub(super) conversation: Option<ConversationMode>,
    pub(super) tenant: Option<Spanned<RawTenant>>,
    pub(super) inject: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    pub(super) upstream_query: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    pub(super) forward_token: Option<bool>,
    pub(super) connect_timeout: Option<Spanned<String>>,
    pub(super) max_message_size: Option<Spanned<String>>,
    pub(super) http: Option<Spanned<HttpMode>>,
    pub(super) http_timeout: Option<Spanned<String>>,
    pub(super) max_body_size: Option<Spanned<String>>,
    pub(super) affinity: Option<Spanned<Affinity>>,
    pub(super) ping_interval: Option<Spanned<String>>,
    pub(super) pong_timeout: Option<Spanned<String>>,
    pub(super) idle_timeout: Option<Spanned<String>>,
    pub(super) max_session: Option<Spanned<String>>,
    pub(super) token_expiry: Option<Spanned<TokenExpiry>>,
    pub(super) token_expiry_grace: Option<Spanned<String>>,
    pub(super) message_rate: Option<Spanned<RawRate>>,
    pub(super) upstream_cooldown: Option<Spanned<String>>,
    pub(super) resume: Option<Spanned<RawResume>>,
    pub(super) turn_gap: Option<Spanned<String>>,
}

/// A rate: `{ per_second = N, burst = M }`, or `"off"`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawRate {
    Off(String),
    Limit(RawRateLimit),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub(super) per_second: f64,
    pub(super) burst: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTls {
    pub(super) ca: Option<Spanned<String>>,
    pub(super) server_name: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResume {
    pub(super) window: Spanned<String>,
    pub(super) max_messages: Option<Spanned<i64>>,
    pub(super) max_bytes: Option<Spanned<String>>,
    pub(super) announce: Option<bool>,
}

/// `tenant = "optional" | "required" | { pin = "NAME" } | { from = "host" | "path:N" }`.
pub(super) enum RawTenant {
    Optional,
    Required,
    Pin(String),
    From(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenantRule {
    pin: Option<String>,
    from: Option<String>,
}

const TENANT_EXPECTED: &str = "tenant must be \"optional\", \"required\", { pin = \"NAME\" } or { from = \"host\" | \"path:N\" }";

// By hand, like `OneOrManyTls`: the error keeps the span of the value it is about.
impl<'de> Deserialize<'de> for RawTenant {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawTenant;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(TENANT_EXPECTED)
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<RawTenant, E> {
                match value {
                    "optional" => Ok(RawTenant::Optional),
                    "required" => Ok(RawTenant::Required),
                    _ => Err(E::custom(TENANT_EXPECTED)),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawTenant, A::Error> {
                use serde::de::Error;
                let rule =
                    RawTenantRule::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                match (rule.pin, rule.from) {
                    (Some(pin), None) if !pin.is_empty() => Ok(RawTenant::Pin(pin)),
                    (None, Some(from)) => Ok(RawTenant::From(from)),
                    _ => Err(A::Error::custom(TENANT_EXPECTED)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A secret: an inline development string, or `{ file }`, `{ env }`, `{ credential }`.
pub(super) enum RawSecret {
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
