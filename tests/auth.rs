//! Authentication at the handshake: every JWT algorithm family, every refusal a forged, stale or
//! confused token must get (401 with `WWW-Authenticate: Bearer` and a JSON `error`), every token
//! source — and that the token never reaches the upstream unless a route asks for it.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use futures_util::SinkExt;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A config whose policy `main` has these algorithms and key, with one route at /ws/chat.
fn policy_config(upstream: &str, keys: &str) -> String {
    EdgeConfig::new(upstream).keys(keys).build()
}

/// An upstream and an edge with `policy` lines added to its HS256 policy and `route` lines to
/// its route.
async fn setup(policy: &str, route: &str) -> (Upstream, TestEdge) {
    start_edge(|c| c.policy(policy).route(route)).await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn www_authenticate(refused: &Refused) -> String {
    refused
        .headers
        .get("www-authenticate")
        .unwrap_or_else(|| {
            panic!(
                "a {} refusal without WWW-Authenticate: {:?}",
                refused.status, refused.headers
            )
        })
        .to_str()
        .unwrap()
        .to_owned()
}

/// A 401 for a token that was there but is not acceptable.
fn assert_bad_token(refused: &Refused, error: &str) {
    assert_eq!(refused.status, 401, "refusal: {refused:?}");
    let challenge = www_authenticate(refused);
    assert!(
        challenge.starts_with("Bearer "),
        "WWW-Authenticate is not a Bearer challenge: {challenge}"
    );
    assert!(
        challenge.contains(r#"error="invalid_token""#),
        "WWW-Authenticate lacks error=\"invalid_token\": {challenge}"
    );
    assert_eq!(refused.body["error"], error, "body: {}", refused.body);
}

/// A 401 for a request that carried no token at all.
fn assert_missing_token(refused: &Refused) {
    assert_eq!(refused.status, 401, "refusal: {refused:?}");
    let challenge = www_authenticate(refused);
    assert!(
        challenge.starts_with("Bearer"),
        "WWW-Authenticate is not a Bearer challenge: {challenge}"
    );
    assert!(
        !challenge.contains("error="),
        "a missing token is not an invalid one (RFC 6750 §3.1): {challenge}"
    );
    assert_eq!(
        refused.body["error"], "token_missing",
        "body: {}",
        refused.body
    );
}

/// After a refusal: a valid connection made next is the first thing the upstream sees, so the
/// refused handshake never reached it.
async fn assert_upstream_untouched(
    upstream: &mut Upstream,
    edge: &TestEdge,
    valid_token: &str,
    probe_user: &str,
) {
    let ws = connect_ok(
        &edge.url("/ws/chat"),
        &[("Authorization", &bearer(valid_token))],
    )
    .await;
    let seen = upstream.next_request().await;
    assert_eq!(
        seen.header("x-user-id"),
        Some(probe_user),
        "the upstream saw a refused handshake first: {seen:?}"
    );
    drop(ws);
}

/// Fails if the token appears anywhere in what the upstream saw (target or any header value).
fn assert_token_absent(seen: &SeenRequest, token: &str) {
    assert!(
        !seen.target.contains(token),
        "the token reached the upstream in its target: {}",
        seen.target
    );
    // The signature alone would be enough to replay a re-assembled token.
    let signature = token.rsplit('.').next().unwrap();
    for (name, values) in &seen.headers {
        for value in values {
            assert!(
                !value.contains(token) && !value.contains(signature),
                "the token reached the upstream in {name}: {value}"
            );
        }
    }
}

fn base64url_json(value: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

// ---------------------------------------------------------------------------------------------
// 1. Every algorithm family connects, and the upstream sees the token's user

async fn hmac_family_connects(alg: Algorithm, name: &str) {
    let mut upstream = Upstream::start().await;
    let policy = format!("algorithms = [\"{name}\"]\nsecret = \"{SECRET}\"");
    let edge = TestEdge::start(&policy_config(&upstream.url("/ws/chat"), &policy)).await;
    let token = sign(
        alg,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &claims("user-hmac", json!({})),
    );
    let mut ws = connect_ok(&edge.url("/ws/chat"), &[("Authorization", &bearer(&token))]).await;
    let seen = upstream.next_request().await;
    assert_eq!(seen.header("x-user-id"), Some("user-hmac"));
    // The relay works through the authenticated socket.
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hello");

    // A token of another HMAC strength is not accepted by this policy.
    let other = if alg == Algorithm::HS256 {
        Algorithm::HS512
    } else {
        Algorithm::HS256
    };
    let other_token = sign(
        other,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &claims("user-hmac", json!({})),
    );
    let refused = connect_refused(
        &edge.url("/ws/chat"),
        &[("Authorization", &bearer(&other_token))],
    )
    .await;
    assert_bad_token(&refused, "token_invalid");
}

#[tokio::test]
async fn hs256_token_connects_with_its_user() {
    hmac_family_connects(Algorithm::HS256, "HS256").await;
}

#[tokio::test]
async fn hs384_token_connects_with_its_user() {
    hmac_family_connects(Algorithm::HS384, "HS384").await;
}

#[tokio::test]
async fn hs512_token_connects_with_its_user() {
    hmac_family_connects(Algorithm::HS512, "HS512").await;
}

/// An edge whose policy verifies `name` tokens with the public half of a fresh `key_alg` pair;
/// returns the private PEM for signing.
async fn asymmetric_edge(
    name: &str,
    key_alg: &'static rcgen::SignatureAlgorithm,
    upstream: &Upstream,
) -> (TestEdge, String, String) {
    let (private_pem, public_pem) = key_pair(key_alg);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pub.pem"), &public_pem).unwrap();
    let policy = format!("algorithms = [\"{name}\"]\npublic_key = {{ file = \"pub.pem\" }}");
    let edge = TestEdge::start_in(&policy_config(&upstream.url("/ws/chat"), &policy), dir).await;
    (edge, private_pem, public_pem)
}

async fn asymmetric_family_connects(
    alg: Algorithm,
    name: &str,
    key_alg: &'static rcgen::SignatureAlgorithm,
    encoding_key: fn(&[u8]) -> jsonwebtoken::errors::Result<EncodingKey>,
) {
    let mut upstream = Upstream::start().await;
    let (edge, private_pem, _) = asymmetric_edge(name, key_alg, &upstream).await;
    let key = encoding_key(private_pem.as_bytes()).unwrap();
    let user = format!("user-{name}");
    let token = sign(alg, &key, &claims(&user, json!({})));
    let _ws = connect_ok(&edge.url("/ws/chat"), &[("Authorization", &bearer(&token))]).await;
    let seen = upstream.next_request().await;
    assert_eq!(seen.header("x-user-id"), Some(user.as_str()));

    // The same claims signed by a different key of the same kind are refused.
    let (stranger_pem, _) = key_pair(key_alg);
    let forged = sign(
        alg,
        &encoding_key(stranger_pem.as_bytes()).unwrap(),
        &claims(&user, json!({})),
    );
    let refused = connect_refused(
        &edge.url("/ws/chat"),
        &[("Authorization", &bearer(&forged))],
    )
    .await;
    assert_bad_token(&refused, "token_invalid");
}

#[tokio::test]
async fn rs256_token_connects_with_its_user() {
    asymmetric_family_connects(
        Algorithm::RS256,
        "RS256",
        &rcgen::PKCS_RSA_SHA256,
        EncodingKey::from_rsa_pem,
    )
    .await;
}

#[tokio::test]
async fn ps256_token_connects_with_its_user() {
    asymmetric_family_connects(
        Algorithm::PS256,
        "PS256",
        &rcgen::PKCS_RSA_SHA256,
        EncodingKey::from_rsa_pem,
    )
    .await;
}

#[tokio::test]
async fn es256_token_connects_with_its_user() {
    asymmetric_family_connects(
        Algorithm::ES256,
        "ES256",
        &rcgen::PKCS_ECDSA_P256_SHA256,
        EncodingKey::from_ec_pem,
    )
    .await;
}

#[tokio::test]
async fn es384_token_connects_with_its_user() {
    asymmetric_family_connects(
        Algorithm::ES384,
        "ES384",
        &rcgen::PKCS_ECDSA_P384_SHA384,
        EncodingKey::from_ec_pem,
    )
    .await;
}

#[tokio::test]
async fn eddsa_token_connects_with_its_user() {
    asymmetric_family_connects(
        Algorithm::EdDSA,
        "EdDSA",
        &rcgen::PKCS_ED25519,
        EncodingKey::from_ed_pem,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. Refusals

#[tokio::test]
async fn a_request_without_a_token_gets_401_without_an_error_code() {
    let (mut upstream, edge) = setup("", "").await;
    let refused = connect_refused(&edge.url("/ws/chat"), &[]).await;
    assert_missing_token(&refused);
    assert_eq!(
        refused
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap()),
        Some("application/json")
    );
    // An empty token is no token either.
    let refused = connect_refused(&edge.url("/ws/chat?token="), &[]).await;
    assert_missing_token(&refused);
    assert_upstream_untouched(&mut upstream, &edge, &token_for("probe"), "probe").await;
}

#[tokio::test]
async fn a_garbage_token_gets_401_invalid_token() {
    let (mut upstream, edge) = setup("", "").await;
    for garbage in ["garbage", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30.", "Zm9v.YmFy"] {
        let refused = connect_refused(
            &edge.url("/ws/chat"),
            &[("Authorization", &bearer(garbage))],
        )
        .await;
        assert_bad_token(&refused, "token_invalid");
    }
    assert_upstream_untouched(&mut upstream, &edge, &token_for("probe"), "probe").await;
}

#[tokio::test]
async fn a_token_signed_with_another_secret_gets_401() {
    let (mut upstream, edge) = setup("", "").await;
    let forged = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another-secret-0123456789abcdef-0123456789"),
        &claims("alice", json!({})),
    );
    let refused = connect_refused(
        &edge.url("/ws/chat"),
        &[("Authorization", &bearer(&forged))],
    )
    .await;
    assert_bad_token(&refused, "token_invalid");

    // A valid token whose payload was swapped for another user's keeps the old signature.
    let genuine = token_for("alice");
    let parts: Vec<&str> = genuine.split('.').collect();
    let swapped = format!(
        "{}.{}.{}",
        parts[0],
        base64url_json(&serde_json::Value::Object(claims("admin", json!({})))),
        parts[2]
    );
    let refused = connect_refused(
        &edge.url("/ws/chat"),
        &[("Authorization", &bearer(&swapped))],
    )
    .await;
    assert_bad_token(&refused, "token_invalid");
    assert_upstream_untouched(&mut upstream, &edge, &token_for("probe"), "probe").await;
}

#[tokio::test]
async fn an_expired_token_gets_401_token_expired() {
    // Default leeway (30 s); two minutes past is beyond it.
    let (mut upstream, edge) = setup("", "").await;
    let expired = hs256(&claims("alice", json!({ "exp": now() - 120 })));
    let refused = connect_refused(
        &edge.url("/ws/chat"),
        &[("Authorization", &bearer(&expired))],
    )
    .await;
    assert_bad_token(&refused, "token_expired");

    // A token without exp at all is not a forever-token.
    let mut no_exp = claims("alice", json!({}));
    no_exp.remove("exp");
    let refused = connect_refused(
        &edge.url("/ws/chat"),
        &[("Authorization", &bearer(&hs256(&no_exp)))],
    )
    .await;
    assert_bad_token(&refused, "token_invalid");
    assert_upstream_untouched(&mut upstream, &edge, &token_for("probe"), "probe").await;
}

#[tokio::test]
async fn a_token_not_valid_yet_gets_401() {
    let (mut upstream, edge) = setup("", "").await;
    let early = hs256(&claims("alice", json!({ "nbf": now() + 600 })));
    let refused =
        connect_refused(&edge.url("/ws/chat"), &[("Authorization", &bearer(&early))]).await;
    assert_bad_token(&refused, "token_invalid");

    // Control: an nbf in the past is fine.
    let ready = hs256(&claims("alice", json!({ "nbf": now() - 60 })));
    let _ws = connect_ok(&edge.url("/ws/chat"), &[("Authorization", &bearer(&ready))]).await;
    assert_eq!(
        upstream.next_request().await.header("x-user-id"),
        Some("alice")
    );
}

#[tokio::test]
async fn a_token_from_the_wrong_issuer_gets_401() {
    let (mut upstream, edge) = setup("issuer = \"https://auth.example.com\"", "").await;
    for bad in [
        claims("alice", json!({ "iss": "https://evil.example.com" })),
        claims("alice", json!({})), // no iss at all
    ] {
        let refused = connect_refused(
            &edge.url("/ws/chat"),
            &[("Authorization", &bearer(&hs256(&bad)))],
        )
        .await;
        assert_bad_token(&refused, "token_invalid");
    }

    // Control: the configured issuer is accepted.
    let good = hs256(&claims(
        "alice",
        json!({ "iss": "https://auth.example.com" }),
    ));
    let _ws = connect_ok(&edge.url("/ws/chat"), &[("Authorization", &bearer(&good))]).await;
    assert_eq!(
        upstream.next_request().await.header("x-user-id"),
        Some("alice")
    );
}

#[tokio::test]
async fn a_token_for_the_wrong_audience_gets_401() {
    let (mut upstream, edge) = setup("audience = \"chat\"", "").await;
    for bad in [
        claims("alice", json!({ "aud": "billing" })),
        claims("alice", json!({ "aud": ["billing", "admin"] })),
        claims("alice", json!({})), // no aud at all
    ] {
        let refused = connect_refused(
            &edge.url("/ws/chat"),
            &[("Authorization", &bearer(&hs256(&bad)))],
        )
        .await;
        assert_bad_token(&refused, "token_invalid");
    }

    // Control: the configured audience is accepted, alone or in a list.
    for good in [
        claims("alice", json!({ "aud": "chat" })),
        claims("alice", json!({ "aud": ["billing", "chat"] })),
    ] {
        let _ws = connect_ok(
            &edge.url("/ws/chat"),
            &[("Authorization", &bearer(&hs256(&good)))],
        )
        .await;
        assert_eq!(
            upstream.next_request().await.header("x-user-id"),
            Some("alice")
        );
    }
}

#[tokio::test]
async fn a_token_without_a_user_gets_401() {
    let (mut upstream, edge) = setup("", "").await;
    let mut no_sub = claims("alice", json!({}));
    no_sub.remove("sub");
    let refused = connect_refused(
        &edge.url("/ws/chat"),
        &[("Authorization", &bearer(&hs256(&no_sub)))],
    )
    .await;
    assert_bad_token(&refused, "token_invalid");

    // An empty sub is no user either.
    let empty_sub = claims("", json!({}));
    let refused = connect_refused(
        &edge.url("/ws/chat"),
        &[("Authorization", &bearer(&hs256(&empty_sub)))],
    )
    .await;
    assert_bad_token(&refused, "token_invalid");
    assert_upstream_untouched(&mut upstream, &edge, &token_for("probe"), "probe").await;
}

#[tokio::test]
async fn an_alg_none_token_gets_401() {
    let (mut upstream, edge) = setup("", "").await;
    let body = base64url_json(&serde_json::Value::Object(claims("alice", json!({}))));
    for header in [
        json!({ "alg": "none", "typ": "JWT" }),
        json!({ "alg": "None", "typ": "JWT" }),
        json!({ "alg": "NONE", "typ": "JWT" }),
    ] {
        let unsigned = format!("{}.{body}.", base64url_json(&header));
        let refused = connect_refused(
            &edge.url("/ws/chat"),
            &[("Authorization", &bearer(&unsigned))],
        )
        .await;
        assert_bad_token(&refused, "token_invalid");
        // Nor through the query.
        let refused = connect_refused(&edge.url(&format!("/ws/chat?token={unsigned}")), &[]).await;
        assert_bad_token(&refused, "token_invalid");
    }
    assert_upstream_untouched(&mut upstream, &edge, &token_for("probe"), "probe").await;
}

#[tokio::test]
async fn an_hs256_token_keyed_with_the_rsa_public_key_gets_401() {
    let mut upstream = Upstream::start().await;
    let (edge, private_pem, public_pem) =
        asymmetric_edge("RS256", &rcgen::PKCS_RSA_SHA256, &upstream).await;
    let claims = claims("admin", json!({}));
    // The public key is public: an attacker has it byte for byte, with or without the newline.
    for secret in [public_pem.as_str(), public_pem.trim_end()] {
        let confused = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(secret.as_bytes()),
            &claims,
        );
        let refused = connect_refused(
            &edge.url("/ws/chat"),
            &[("Authorization", &bearer(&confused))],
        )
        .await;
        assert_bad_token(&refused, "token_invalid");
    }

    // Control: a real RS256 token from the private key is accepted, and is the first thing the
    // upstream sees.
    let real = sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap(),
        &claims,
    );
    let _ws = connect_ok(&edge.url("/ws/chat"), &[("Authorization", &bearer(&real))]).await;
    assert_eq!(
        upstream.next_request().await.header("x-user-id"),
        Some("admin")
    );
}

#[tokio::test]
async fn a_policy_mixing_hmac_and_rsa_algorithms_does_not_load() {
    let dir = tempfile::tempdir().unwrap();
    let (_, public_pem) = key_pair(&rcgen::PKCS_ECDSA_P256_SHA256);
    std::fs::write(dir.path().join("pub.pem"), public_pem).unwrap();
    let text = policy_config(
        "ws://127.0.0.1:9/ws/chat",
        "algorithms = [\"ES256\", \"HS256\"]\npublic_key = { file = \"pub.pem\" }",
    );
    let result = wsedge::Config::from_toml(&text, "test.toml", dir.path());
    assert!(
        result.is_err(),
        "a policy accepting HS256 next to a public key would invite algorithm confusion"
    );
}

#[tokio::test]
async fn a_token_expired_ten_seconds_ago_passes_within_leeway_only() {
    let expired_10s = || hs256(&claims("alice", json!({ "exp": now() - 10 })));

    let (mut upstream, edge) = setup("leeway = \"30s\"", "").await;
    let _ws = connect_ok(
        &edge.url("/ws/chat"),
        &[("Authorization", &bearer(&expired_10s()))],
    )
    .await;
    assert_eq!(
        upstream.next_request().await.header("x-user-id"),
        Some("alice")
    );

    let (_upstream, strict) = setup("leeway = \"0s\"", "").await;
    let refused = connect_refused(
        &strict.url("/ws/chat"),
        &[("Authorization", &bearer(&expired_10s()))],
    )
    .await;
    assert_bad_token(&refused, "token_expired");
}

// ---------------------------------------------------------------------------------------------
// 3. Token sources, and the token kept from the upstream

/// Where the client puts its token.
#[derive(Clone, Copy, Debug)]
enum Place {
    Header,
    Query(&'static str),
    Subprotocol,
    Cookie(&'static str),
}

/// A request carrying `token` in `place`, plus the same bystanders every time: a `lang=en`
/// query parameter, a `chat.v1` subprotocol and a `theme=dark` cookie.
fn request_with(edge: &TestEdge, place: Place, token: &str) -> (String, Vec<(String, String)>) {
    let mut query = "lang=en".to_owned();
    let mut protocols = "chat.v1".to_owned();
    let mut cookies = "theme=dark".to_owned();
    let mut headers = Vec::new();
    match place {
        Place::Header => headers.push(("Authorization".to_owned(), bearer(token))),
        Place::Query(name) => query.push_str(&format!("&{name}={token}")),
        Place::Subprotocol => protocols.push_str(&format!(", bearer.{token}")),
        Place::Cookie(name) => cookies.push_str(&format!("; {name}={token}")),
    }
    headers.push(("Sec-WebSocket-Protocol".to_owned(), protocols));
    headers.push(("Cookie".to_owned(), cookies));
    (edge.url(&format!("/ws/chat?{query}")), headers)
}

async fn connect_with(
    edge: &TestEdge,
    place: Place,
    token: &str,
) -> Result<(Client, http::Response<Option<Vec<u8>>>), Refused> {
    let (url, headers) = request_with(edge, place, token);
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    connect(&url, &headers).await
}

/// The token from `place` authenticates, and the upstream sees the identity and the bystanders
/// but not the token.
async fn token_source_is_used_and_stripped(token_from: &str, place: Place) {
    let (mut upstream, edge) = setup(&format!("token_from = [{token_from}]"), "").await;
    let token = token_for("alice");
    let (_ws, response) = match connect_with(&edge, place, &token).await {
        Ok(ok) => ok,
        Err(refused) => panic!("token in {place:?} refused: {refused:?}"),
    };
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("chat.v1")
    );
    let seen = upstream.next_request().await;
    assert_eq!(seen.header("x-user-id"), Some("alice"));
    assert_token_absent(&seen, &token);
    assert_eq!(seen.query_param("lang").as_deref(), Some("en"), "{seen:?}");
    assert_eq!(seen.query_param("token"), None, "{seen:?}");
    if let Place::Query(name) = place {
        assert_eq!(seen.query_param(name), None, "{seen:?}");
    }
    assert_eq!(seen.header("authorization"), None, "{seen:?}");
    assert_eq!(
        seen.header_all("sec-websocket-protocol"),
        vec!["chat.v1".to_owned()],
        "the upstream must still be offered chat.v1, and only that"
    );
    assert_eq!(
        seen.header_all("cookie"),
        vec!["theme=dark".to_owned()],
        "other cookies must survive the token's removal"
    );
}

#[tokio::test]
async fn token_from_authorization_bearer_is_used_and_not_forwarded() {
    token_source_is_used_and_stripped(r#""header""#, Place::Header).await;
}

#[tokio::test]
async fn token_from_query_token_is_used_and_not_forwarded() {
    token_source_is_used_and_stripped(r#""query:token""#, Place::Query("token")).await;
}

#[tokio::test]
async fn token_from_a_custom_query_parameter_is_used_and_not_forwarded() {
    token_source_is_used_and_stripped(r#""query:access_token""#, Place::Query("access_token"))
        .await;
}

#[tokio::test]
async fn token_from_the_subprotocol_is_used_and_not_forwarded() {
    token_source_is_used_and_stripped(r#""subprotocol""#, Place::Subprotocol).await;
}

#[tokio::test]
async fn token_from_a_cookie_is_used_and_not_forwarded() {
    token_source_is_used_and_stripped(r#""cookie:session""#, Place::Cookie("session")).await;
}

#[tokio::test]
async fn the_first_listed_source_wins() {
    let (mut upstream, edge) = setup(r#"token_from = ["query:token", "header"]"#, "").await;
    // A valid token in the query beats garbage in the header.
    let token = token_for("alice");
    let _ws = connect_ok(
        &edge.url(&format!("/ws/chat?token={token}")),
        &[("Authorization", "Bearer garbage")],
    )
    .await;
    let seen = upstream.next_request().await;
    assert_eq!(seen.header("x-user-id"), Some("alice"));
    assert_eq!(seen.query_param("token"), None, "{seen:?}");

    // And the other way round: garbage in the query is what gets judged, not the header's
    // valid token.
    let refused = connect_refused(
        &edge.url("/ws/chat?token=garbage"),
        &[("Authorization", &bearer(&token_for("bob")))],
    )
    .await;
    assert_bad_token(&refused, "token_invalid");
}

#[tokio::test]
async fn a_source_not_listed_is_ignored() {
    let (mut upstream, edge) = setup(r#"token_from = ["header"]"#, "").await;
    let token = token_for("alice");
    for place in [
        Place::Cookie("session"),
        Place::Query("token"),
        Place::Subprotocol,
    ] {
        let refused = match connect_with(&edge, place, &token).await {
            Ok(_) => panic!("a token in {place:?} was accepted though token_from = [\"header\"]"),
            Err(refused) => refused,
        };
        assert_missing_token(&refused);
    }
    assert_upstream_untouched(&mut upstream, &edge, &token_for("probe"), "probe").await;
}

#[tokio::test]
async fn a_client_cannot_claim_another_identity_with_headers() {
    let (mut upstream, edge) = setup("", "").await;
    let token = token_for("alice");
    let _ws = connect_ok(
        &edge.url("/ws/chat"),
        &[
            ("Authorization", &bearer(&token)),
            ("x-user-id", "mallory"),
            ("X-Tenant-Id", "evil-corp"),
        ],
    )
    .await;
    let seen = upstream.next_request().await;
    assert_eq!(seen.header_all("x-user-id"), vec!["alice".to_owned()]);
    assert!(seen.header_all("x-tenant-id").is_empty(), "{seen:?}");
}

// ---------------------------------------------------------------------------------------------
// 4. forward_token = true

async fn token_is_forwarded(place: Place) {
    let (mut upstream, edge) = setup(
        r#"token_from = ["header", "query:token", "subprotocol", "cookie:session"]"#,
        "forward_token = true",
    )
    .await;
    let token = token_for("alice");
    let (_ws, response) = match connect_with(&edge, place, &token).await {
        Ok(ok) => ok,
        Err(refused) => panic!("token in {place:?} refused: {refused:?}"),
    };
    let seen = upstream.next_request().await;
    assert_eq!(seen.header("x-user-id"), Some("alice"));
    match place {
        Place::Header => assert_eq!(seen.header("authorization"), Some(bearer(&token).as_str())),
        Place::Query(name) => assert_eq!(seen.query_param(name), Some(token.clone())),
        Place::Subprotocol => {
            assert_eq!(
                seen.header("sec-websocket-protocol"),
                Some(format!("chat.v1, bearer.{token}").as_str())
            );
        }
        Place::Cookie(name) => {
            assert_eq!(
                seen.header("cookie"),
                Some(format!("theme=dark; {name}={token}").as_str())
            );
        }
    }
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("chat.v1")
    );
}

#[tokio::test]
async fn forward_token_keeps_the_authorization_header() {
    token_is_forwarded(Place::Header).await;
}

#[tokio::test]
async fn forward_token_keeps_the_query_parameter() {
    token_is_forwarded(Place::Query("token")).await;
}

#[tokio::test]
async fn forward_token_keeps_the_subprotocol_entry() {
    token_is_forwarded(Place::Subprotocol).await;
}

#[tokio::test]
async fn forward_token_keeps_the_cookie() {
    token_is_forwarded(Place::Cookie("session")).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Subprotocol answers

#[tokio::test]
async fn with_a_real_subprotocol_offered_the_client_gets_the_upstreams_choice() {
    let (mut upstream, edge) = setup(r#"token_from = ["subprotocol"]"#, "").await;
    let token = token_for("alice");
    let offer = format!("chat.v1, bearer.{token}");
    let (_ws, response) = connect(&edge.url("/ws/chat"), &[("Sec-WebSocket-Protocol", &offer)])
        .await
        .unwrap_or_else(|refused| panic!("refused: {refused:?}"));
    assert_eq!(response.status(), 101);
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("chat.v1")
    );
    let seen = upstream.next_request().await;
    assert_eq!(seen.header("sec-websocket-protocol"), Some("chat.v1"));
    assert_eq!(seen.header("x-user-id"), Some("alice"));
}

#[tokio::test]
async fn with_only_the_token_offered_the_client_gets_its_entry_echoed() {
    let (mut upstream, edge) = setup(r#"token_from = ["subprotocol"]"#, "").await;
    let token = token_for("alice");
    let offer = format!("bearer.{token}");
    // tungstenite's client, like a browser, fails a socket whose offer went unanswered.
    let (mut ws, response) = connect(&edge.url("/ws/chat"), &[("Sec-WebSocket-Protocol", &offer)])
        .await
        .unwrap_or_else(|refused| panic!("refused: {refused:?}"));
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some(offer.as_str())
    );
    let seen = upstream.next_request().await;
    assert_eq!(seen.header("x-user-id"), Some("alice"));
    assert!(
        seen.header_all("sec-websocket-protocol").is_empty(),
        "the upstream was offered a subprotocol: {seen:?}"
    );
    assert_token_absent(&seen, &token);
    ws.send(Message::text("still works")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "still works");
}

// ---------------------------------------------------------------------------------------------
// 6. auth = "none"

#[tokio::test]
async fn an_open_route_connects_without_a_token_and_injects_no_identity() {
    let mut upstream = Upstream::start().await;
    let config = format!(
        r#"
[server]
listen = ["127.0.0.1:0"]

[[route]]
path = "/ws/public"
upstream = "{}"
auth = "none"
"#,
        upstream.url("/ws/public")
    );
    let edge = TestEdge::start(&config).await;
    let mut ws = connect_ok(
        &edge.url("/ws/public"),
        &[
            ("x-user-id", "mallory"),
            ("x-tenant-id", "evil-corp"),
            ("x-conversation-id", "c-stolen"),
        ],
    )
    .await;
    let seen = upstream.next_request().await;
    assert_eq!(seen.path(), "/ws/public");
    for name in ["x-user-id", "x-tenant-id", "x-conversation-id"] {
        assert!(
            seen.header_all(name).is_empty(),
            "the upstream saw a client-sent {name}: {seen:?}"
        );
    }
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hi");
}

#[tokio::test]
async fn copies_of_the_token_in_every_configured_source_are_removed() {
    let (mut upstream, edge) = setup(
        r#"token_from = ["query:token", "header", "subprotocol", "cookie:session"]"#,
        "",
    )
    .await;
    let token = token_for("alice");
    let url = edge.url(&format!("/ws/chat?token={token}&lang=en"));
    let authorization = bearer(&token);
    let protocols = format!("chat.v1, bearer.{token}");
    let cookie = format!("theme=dark; session={token}");
    let _ws = connect_ok(
        &url,
        &[
            ("Authorization", authorization.as_str()),
            ("Sec-WebSocket-Protocol", protocols.as_str()),
            ("Cookie", cookie.as_str()),
        ],
    )
    .await;
    let seen = upstream.next_request().await;
    assert_token_absent(&seen, &token);
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(seen.header("sec-websocket-protocol"), Some("chat.v1"));
    assert_eq!(seen.header("cookie"), Some("theme=dark"));
    assert_eq!(seen.query_param("lang").as_deref(), Some("en"));
}

#[tokio::test]
async fn a_membership_claim_lets_a_token_open_only_its_conversations() {
    let (mut upstream, edge) = setup(
        r#"claims = { conversations = "convs" }"#,
        r#"conversation = "query-or-token""#,
    )
    .await;
    let member = hs256(&claims("alice", json!({ "convs": ["c1", "c2"] })));
    let anywhere = hs256(&claims("root", json!({ "convs": "*" })));
    let nowhere = token_for("bob");
    for (token, conversation, allowed) in [
        (&member, "c1", true),
        (&member, "c2", true),
        (&member, "c3", false),
        (&anywhere, "c3", true),
        (&nowhere, "c1", false),
    ] {
        let url = edge.url(&format!("/ws/chat?conversation_id={conversation}"));
        let authorization = bearer(token);
        let headers = [("Authorization", authorization.as_str())];
        if allowed {
            let _ws = connect_ok(&url, &headers).await;
            let seen = upstream.next_request().await;
            assert_eq!(seen.header("x-conversation-id"), Some(conversation));
        } else {
            let refused = connect_refused(&url, &headers).await;
            assert_eq!(
                (refused.status, refused.body["error"].as_str()),
                (403, Some("conversation_not_allowed")),
                "{conversation}"
            );
        }
    }
    // A token naming its conversation is held to the list too.
    let named = hs256(&claims(
        "alice",
        json!({ "conversation_id": "c9", "convs": ["c1"] }),
    ));
    let refused =
        connect_refused(&edge.url("/ws/chat"), &[("Authorization", &bearer(&named))]).await;
    assert_eq!(refused.status, 403);
}
