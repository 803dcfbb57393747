//! Handshake admission and the request the upstream then gets, on requests built from the
//! pieces a client controls: method, target, the upgrade headers, and tokens in every source —
//! the right one, or one a byte off, unsigned, expired, signed with another key, or carrying an
//! identity that an HTTP parser would not carry byte for byte. Whatever the request, only the
//! right token is ever admitted, and the upstream never sees it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;

use http::Request;
use proptest::prelude::*;

use crate::admission::{ClientConn, Kind, Pass, admit};
use crate::auth::memo::TokenMemo;
use crate::config::Config;
use crate::config::settings::RouteSettings;
use crate::forward;
use crate::state::Shared;

const SECRET: &str = "fuzz-secret-fuzz-secret-fuzz-secret!";

const CONFIG: &str = r#"
[server]
listen = ["127.0.0.1:0"]
handshake_rate_per_ip = "off"
max_connections_per_user = 0

[auth.main]
kind = "jwt"
algorithms = ["HS256"]
secret = "fuzz-secret-fuzz-secret-fuzz-secret!"
token_from = ["header", "query:token", "subprotocol", "cookie:session"]
claims = { user = "sub", tenant = "tenant", conversation = "conversation_id" }

[[route]]
path = "/ws"
match = "prefix"
upstream = "ws://127.0.0.1:9/chat"
auth = "main"
conversation = "query-or-token"
inject = { "x-user-id" = "{user}", "x-tenant-id" = "{tenant}", "x-conversation-id" = "{conversation}", "x-plan" = "{claim.plan}" }

[[route]]
path = "/api"
match = "prefix"
upstream = "ws://127.0.0.1:9/api"
auth = "main"
http = "proxy"
allowed_origins = ["https://chat.example"]
"#;

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let config = Config::from_toml(CONFIG, "fuzz.toml", Path::new("."))
            .unwrap_or_else(|error| panic!("{error}"));
        Shared::new(config, None).unwrap()
    })
}

fn sign(header: &str, claims: serde_json::Value, secret: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signing_input = format!("{}.{}", b64.encode(header), b64.encode(claims.to_string()));
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = aws_lc_rs::hmac::sign(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", b64.encode(tag.as_ref()))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// The one token that may get in, and the ones that must not.
struct Tokens {
    good: String,
    /// Good, but for a claim that only a route injecting it must refuse.
    odd_claim: String,
    bad: Vec<String>,
}

fn tokens() -> &'static Tokens {
    static TOKENS: OnceLock<Tokens> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let exp = now() + 3600;
        let good_claims =
            serde_json::json!({"sub": "alice", "tenant": "acme", "plan": "pro", "exp": exp});
        let good = sign(HS256, good_claims.clone(), SECRET);
        let mut flipped = good.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let claims = |sub: serde_json::Value| serde_json::json!({"sub": sub, "exp": exp});
        let bad = vec![
            String::from_utf8(flipped).unwrap_or_default(),
            sign(r#"{"alg":"none"}"#, good_claims.clone(), SECRET),
            sign(r#"{"alg":"HS512"}"#, good_claims.clone(), SECRET),
            sign(
                HS256,
                good_claims.clone(),
                "another-secret-another-secret-another",
            ),
            sign(
                HS256,
                serde_json::json!({"sub": "alice", "exp": now() - 3600}),
                SECRET,
            ),
            sign(
                HS256,
                serde_json::json!({"sub": "alice", "exp": "never"}),
                SECRET,
            ),
            sign(HS256, serde_json::json!({"sub": "alice"}), SECRET),
            sign(HS256, claims(" alice".into()), SECRET),
            sign(HS256, claims("alice ".into()), SECRET),
            sign(HS256, claims("ali\r\nce".into()), SECRET),
            sign(HS256, claims("al\u{0}ice".into()), SECRET),
            sign(HS256, claims("alicé".into()), SECRET),
            sign(HS256, claims("a".repeat(10_000).into()), SECRET),
            sign(HS256, claims(serde_json::json!(["alice"])), SECRET),
            sign(
                HS256,
                serde_json::json!({"sub": "alice", "tenant": " acme", "exp": exp}),
                SECRET,
            ),
            format!("{}.", good),
            good.replace('.', ".."),
            good[..good.len() / 2].to_owned(),
            "a.b.c".to_owned(),
            ".".repeat(3000),
        ];
        let odd_claim = sign(
            HS256,
            serde_json::json!({"sub": "alice", "plan": "a\nb", "exp": exp}),
            SECRET,
        );
        let mut bad = bad;
        bad.push(odd_claim.clone());
        Tokens {
            good,
            odd_claim,
            bad,
        }
    })
}

#[derive(Debug, Clone)]
struct Case {
    method: &'static str,
    target: String,
    headers: Vec<(String, String)>,
    /// Whether the case is a well-formed upgrade carrying the good token, nothing else odd.
    clean: bool,
}

/// Which token a case carries.
#[derive(Debug, Clone)]
enum Pick {
    Good,
    Bad(prop::sample::Index),
    /// The good token with the byte at an index replaced (in the header, the claims or the
    /// signature; with a byte of base64's other alphabet, padding, a dot or worse).
    Mutated(prop::sample::Index, u8),
}

fn case() -> impl Strategy<Value = Case> {
    let token = prop_oneof![
        3 => Just(Pick::Good),
        1 => any::<prop::sample::Index>().prop_map(Pick::Bad),
        2 => (
            any::<prop::sample::Index>(),
            prop::sample::select(b"AQgwBCDEFZaz0189-_.=+/ %".to_vec()),
        )
            .prop_map(|(at, byte)| Pick::Mutated(at, byte)),
    ];
    let place = 0usize..5;
    let extras = prop::collection::vec(
        (
            prop::sample::select(vec![
                "host",
                "connection",
                "upgrade",
                "sec-websocket-version",
                "sec-websocket-key",
                "origin",
                "cookie",
                "authorization",
                "sec-websocket-protocol",
                "x-user-id",
                "x_user_id",
                "x-forwarded-for",
                "content-length",
                "transfer-encoding",
            ]),
            prop::sample::select(vec![
                "",
                " ",
                "upgrade",
                "websocket",
                "13",
                "8",
                "dGhlIHNhbXBsZSBub25jZQ==",
                "x",
                "https://chat.example",
                "https://evil.example",
                "session=1",
                "Bearer x",
                "bearer",
                "bearer.x",
                "admin",
                "5",
                "chunked",
                "a, b",
                "edge",
                "edge:443",
                "127.0.0.1",
                "\"quoted\"",
            ]),
        ),
        0..4,
    );
    let target = prop_oneof![
        prop::sample::select(vec![
            "/ws",
            "/ws/chat",
            "/ws/../admin",
            "/ws/%2e%2e/x",
            "/ws/a%00b",
            "/api/items",
            "/api",
            "/other",
            "/ws?conversation_id=c1",
            "/ws?conversation_id=c1&conversation_id=c2",
            "/ws?conversation_id=%20c1",
            "/ws?conversation_id=c%0d%0a",
            "/ws?token=&token=x",
            "/ws?a=1&a=2",
            "*",
            "http://other/ws",
        ])
        .prop_map(str::to_owned),
        "/ws[/?&=%a-z0-9.;]{0,20}",
    ];
    (
        prop::sample::select(vec![
            "GET", "GET", "GET", "POST", "OPTIONS", "HEAD", "CONNECT",
        ]),
        target,
        token,
        place,
        extras,
        any::<bool>(),
    )
        .prop_map(|(method, target, token, place, extras, bad_token)| {
            let tokens = tokens();
            let token = match token {
                Pick::Good if !bad_token => tokens.good.clone(),
                Pick::Good => tokens.bad[0].clone(),
                Pick::Bad(i) => tokens.bad[i.index(tokens.bad.len())].clone(),
                Pick::Mutated(at, byte) => {
                    let mut mutated = tokens.good.clone().into_bytes();
                    mutated[at.index(tokens.good.len())] = byte;
                    String::from_utf8_lossy(&mutated).into_owned()
                }
            };
            let mut headers: Vec<(String, String)> = vec![
                ("host".into(), "edge".into()),
                ("connection".into(), "Upgrade".into()),
                ("upgrade".into(), "websocket".into()),
                ("sec-websocket-version".into(), "13".into()),
                (
                    "sec-websocket-key".into(),
                    "dGhlIHNhbXBsZSBub25jZQ==".into(),
                ),
            ];
            let plain_target = matches!(
                target.as_str(),
                "/ws" | "/ws/chat" | "/ws?conversation_id=c1"
            );
            let mut target = target;
            match place {
                0 => headers.push(("authorization".into(), format!("Bearer {token}"))),
                1 => {
                    target.push(if target.contains('?') { '&' } else { '?' });
                    target.push_str(&format!("token={token}"));
                }
                2 => headers.push((
                    "sec-websocket-protocol".into(),
                    format!("chat, bearer.{token}"),
                )),
                3 => headers.push(("cookie".into(), format!("theme=dark; session={token}"))),
                _ => {}
            }
            let clean = extras.is_empty()
                && token == tokens.good
                && place < 4
                && method == "GET"
                && plain_target;
            headers.extend(
                extras
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned())),
            );
            Case {
                method,
                target,
                headers,
                clean,
            }
        })
}

proptest! {
    #![proptest_config(super::cases())]

    #[test]
    fn only_the_right_token_is_admitted_and_the_upstream_never_sees_it(case in case()) {
        let mut builder = Request::builder().method(case.method).uri(case.target.as_str());
        for (name, value) in &case.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        // What hyper cannot parse never reaches admission.
        let Ok(request) = builder.body(()) else {
            return Ok(());
        };
        let shared = shared();
        let live = shared.live.load();
        let peer: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let conn = ClientConn { peer, tls: false };
        let memo = TokenMemo::default();
        let tokens = tokens();
        match admit(&request, conn, shared, &live, &memo, Pass::First) {
            Ok(admitted) => {
                if matches!(admitted.kind, Kind::Preflight) {
                    prop_assert!(admitted.token.is_none());
                    return Ok(());
                }
                let found = admitted.token.as_ref().map(|t| t.token.as_str());
                let injects_plan = admitted.route.inject.iter().any(|(name, _)| name == "x-plan");
                if found == Some(tokens.odd_claim.as_str()) {
                    let shaped = forward::shape(&request, admitted.route, &admitted.identity, peer, false, "r");
                    prop_assert_eq!(shaped.is_err(), injects_plan);
                    return Ok(());
                }
                prop_assert_eq!(found, Some(tokens.good.as_str()), "{:?}", case);
                prop_assert_eq!(admitted.identity.user.as_str(), "alice");
                let shaped = forward::shape(
                    &request,
                    admitted.route,
                    &admitted.identity,
                    peer,
                    false,
                    "request-1",
                );
                let shaped = match shaped {
                    Ok(shaped) => shaped,
                    Err(_) => return Err(TestCaseError::fail(format!("admitted, then not shaped: {case:?}"))),
                };
                let upstream = {
                    let settings: &RouteSettings = admitted.route;
                    shaped.for_target(&settings.targets[0])
                };
                prop_assert!(!upstream.path_and_query.contains(&tokens.good), "{:?}", case);
                let mut user_ids = 0;
                for (name, value) in upstream.headers {
                    let value = value.as_bytes();
                    prop_assert!(
                        !value.windows(tokens.good.len()).any(|w| w == tokens.good.as_bytes()),
                        "the token went upstream in {}: {:?}", name, case
                    );
                    if name == "x-user-id" {
                        user_ids += 1;
                        prop_assert_eq!(value, b"alice");
                    }
                }
                prop_assert_eq!(user_ids, 1);
            }
            Err(rejected) => {
                prop_assert!(!case.clean, "refused {:?}: {:?}", rejected.refusal, case);
            }
        }
    }
}
