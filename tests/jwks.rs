//! Keys from an identity provider: a JWK set served over HTTPS by the test (with its own CA),
//! rotated, taken down and brought back; and sets read from files. Tokens are ES256, signed
//! with keys the test generates.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// An ES256 signing key and its public half as a JWK.
struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    jwk: serde_json::Value,
}

impl SigningKey {
    fn new(kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // The uncompressed point: 0x04, then x and y.
        let point = pair.public_key_raw();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        });
        SigningKey {
            kid: kid.to_owned(),
            encoding: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            jwk,
        }
    }

    /// A token for `sub`, naming this key (or `kid`, to name another).
    fn token(&self, sub: &str) -> String {
        self.token_naming(sub, &self.kid)
    }

    fn token_naming(&self, sub: &str, kid: &str) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &claims(sub, json!({})), &self.encoding).unwrap()
    }
}

fn key_set(keys: &[&SigningKey]) -> String {
    json!({ "keys": keys.iter().map(|key| key.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

/// An identity provider: serves `/jwks.json` over HTTPS, counts the fetches, and can be down
/// (503).
struct Provider {
    port: u16,
    set: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

impl Provider {
    async fn start(ca: &TestCa, set: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let acceptor = TlsAcceptor::from(ca.server_config(&["localhost"]));
        let provider = Provider {
            port,
            set: Arc::new(Mutex::new(set)),
            fetches: Arc::default(),
            down: Arc::default(),
        };
        let (set, fetches, down) = (
            provider.set.clone(),
            provider.fetches.clone(),
            provider.down.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let (set, fetches, down) = (set.clone(), fetches.clone(), down.clone());
                let service = service_fn(move |request: Request<Incoming>| {
                    let answer = if request.uri().path() != "/jwks.json" {
                        (StatusCode::NOT_FOUND, String::new())
                    } else if down.load(Ordering::SeqCst) {
                        (StatusCode::SERVICE_UNAVAILABLE, String::new())
                    } else {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        (StatusCode::OK, set.lock().unwrap().clone())
                    };
                    async move {
                        let mut response = Response::new(Full::new(Bytes::from(answer.1)));
                        *response.status_mut() = answer.0;
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(tls), service));
            }
        });
        provider
    }

    fn url(&self) -> String {
        format!("https://localhost:{}/jwks.json", self.port)
    }

    fn publish(&self, set: String) {
        *self.set.lock().unwrap() = set;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// An edge whose policy `main` takes ES256 tokens with keys from `provider`; `extra` lines go
/// into the policy.
async fn edge_for(ca: &TestCa, provider: &Provider, upstream: &Upstream, extra: &str) -> TestEdge {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.ca_pem).unwrap();
    let keys = format!(
        "algorithms = [\"ES256\"]\njwks = {{ url = \"{}\", ca = {{ file = \"ca.pem\" }} }}\n{extra}",
        provider.url()
    );
    let config = EdgeConfig::new(&upstream.url("/ws/chat")).keys(&keys);
    TestEdge::start_in(&config.build(), dir).await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Twenty handshakes at once with tokens signed by `key` but naming keys nobody published.
async fn twenty_unknown_kids(url: &str, key: &SigningKey) -> Vec<Refused> {
    let attempts = (0..20).map(|i| unknown_kid(url, key, format!("random-{i}")));
    futures_util::future::join_all(attempts).await
}

/// A handshake with a token signed by `key` but naming `kid` (which nobody published).
async fn unknown_kid(url: &str, key: &SigningKey, kid: String) -> Refused {
    let token = key.token_naming("mallory", &kid);
    connect_refused(url, &[("Authorization", &bearer(&token))]).await
}

async fn wait_ready(edge: &TestEdge) {
    eventually(WAIT, "/readyz answering 200", || async {
        edge.admin_get("/readyz").await.0 == 200
    })
    .await;
}

#[tokio::test]
async fn a_rotated_key_is_accepted_on_its_first_try_and_unknown_kids_cost_no_load() {
    let ca = TestCa::new();
    let old = SigningKey::new("2026-11");
    let provider = Provider::start(&ca, key_set(&[&old])).await;
    let mut upstream = Upstream::start().await;
    let edge = edge_for(&ca, &provider, &upstream, "").await;
    wait_ready(&edge).await;
    assert_eq!(provider.fetches(), 1);
    let url = edge.url("/ws/chat");
    let _ws = connect_ok(&url, &[("Authorization", &bearer(&old.token("alice")))]).await;
    assert_eq!(
        upstream.next_request().await.header("x-user-id"),
        Some("alice")
    );

    // The provider rotates: a token signed with the new key is accepted at once, after
    // exactly one more fetch.
    let new = SigningKey::new("2026-12");
    provider.publish(key_set(&[&old, &new]));
    let _ws = connect_ok(&url, &[("Authorization", &bearer(&new.token("bob")))]).await;
    assert_eq!(
        upstream.next_request().await.header("x-user-id"),
        Some("bob")
    );
    assert_eq!(provider.fetches(), 2);
    edge.wait_metric("wsedge_jwks_keys{policy=\"main\"}", 2.0)
        .await;

    // Twenty tokens naming keys nobody published, at once: refused, and no more fetches
    // (the one just made is less than jwks_min_refetch ago).
    for refused in twenty_unknown_kids(&url, &new).await {
        assert_eq!(refused.status, 401);
        assert_eq!(refused.body["error"], "token_invalid");
    }
    assert_eq!(provider.fetches(), 2, "unknown kids fetched the set again");
    assert_eq!(
        edge.metric("wsedge_jwks_fetches_total{policy=\"main\",result=\"ok\"}")
            .await,
        Some(2.0)
    );
}

#[tokio::test]
async fn unknown_kids_are_merged_into_one_fetch_and_limited_per_interval() {
    let ca = TestCa::new();
    let key = SigningKey::new("k1");
    let provider = Provider::start(&ca, key_set(&[&key])).await;
    let upstream = Upstream::start().await;
    let edge = edge_for(&ca, &provider, &upstream, "jwks_min_refetch = \"2s\"").await;
    wait_ready(&edge).await;
    let url = edge.url("/ws/chat");
    // Twenty at once, none in the set: the first causes one fetch, the others join it.
    for refused in twenty_unknown_kids(&url, &key).await {
        assert_eq!(refused.status, 401);
    }
    assert_eq!(provider.fetches(), 2);
    // Within the interval: judged on the set as it is, without a fetch.
    let refused = unknown_kid(&url, &key, "random".into()).await;
    assert_eq!(refused.status, 401);
    assert_eq!(provider.fetches(), 2);
    // Once the interval has passed, an unknown kid may fetch again: the provider may have
    // rotated once more.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let refused = unknown_kid(&url, &key, "later".into()).await;
    assert_eq!(refused.status, 401);
    assert_eq!(provider.fetches(), 3);
}

#[tokio::test]
async fn a_provider_down_at_start_gives_503_then_recovers_and_down_later_keeps_the_last_set() {
    let ca = TestCa::new();
    let key = SigningKey::new("k1");
    let provider = Provider::start(&ca, key_set(&[&key])).await;
    provider.down.store(true, Ordering::SeqCst);
    let mut upstream = Upstream::start().await;
    let edge = edge_for(&ca, &provider, &upstream, "").await;
    let url = edge.url("/ws/chat");
    let auth = bearer(&key.token("alice"));

    // No set yet: not ready, and handshakes get 503 auth_unavailable with Retry-After.
    edge.wait_metric_until(
        "wsedge_jwks_fetches_total{policy=\"main\",result=\"error\"}",
        |errors| errors >= 1.0,
    )
    .await;
    let (status, body) = edge.admin_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("main"), "{body}");
    let refused = connect_refused(&url, &[("Authorization", &auth)]).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.body["error"], "auth_unavailable");
    assert!(refused.headers.contains_key("retry-after"));

    // The provider comes back: the edge retries on its own and serves.
    provider.down.store(false, Ordering::SeqCst);
    wait_ready(&edge).await;
    let _ws = connect_ok(&url, &[("Authorization", &auth)]).await;
    assert_eq!(
        upstream.next_request().await.header("x-user-id"),
        Some("alice")
    );

    // Down again: fetches fail (an unknown kid forces one), the last good set keeps serving.
    provider.down.store(true, Ordering::SeqCst);
    let before = edge
        .metric("wsedge_jwks_fetches_total{policy=\"main\",result=\"error\"}")
        .await
        .unwrap_or(0.0);
    let refused = unknown_kid(&url, &key, "rotated?".into()).await;
    assert_eq!(refused.status, 401);
    edge.wait_metric_until(
        "wsedge_jwks_fetches_total{policy=\"main\",result=\"error\"}",
        |errors| errors > before,
    )
    .await;
    let _ws = connect_ok(&url, &[("Authorization", &auth)]).await;
    assert_eq!(edge.admin_get("/readyz").await.0, 200);
}

#[tokio::test]
async fn two_policies_with_the_same_kid_never_share_keys() {
    // One policy fetches its set, the other reads a file; both name their key "shared".
    let ca = TestCa::new();
    let remote = SigningKey::new("shared");
    let local = SigningKey::new("shared");
    let provider = Provider::start(&ca, key_set(&[&remote])).await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.ca_pem).unwrap();
    std::fs::write(dir.path().join("local.json"), key_set(&[&local])).unwrap();
    let keys = format!(
        "algorithms = [\"ES256\"]\njwks = {{ url = \"{}\", ca = {{ file = \"ca.pem\" }} }}",
        provider.url()
    );
    let config = EdgeConfig::new(&upstream.url("/ws/chat"))
        .keys(&keys)
        .section(
            "[auth.local]\nkind = \"jwt\"\nalgorithms = [\"ES256\"]\njwks = { file = \"local.json\" }",
        )
        .section(&format!(
            "[[route]]\npath = \"/ws/local\"\nupstream = \"{}\"\nauth = \"local\"",
            upstream.url("/ws/chat")
        ));
    let edge = TestEdge::start_in(&config.build(), dir).await;
    wait_ready(&edge).await;
    let (to_remote, to_local) = (edge.url("/ws/chat"), edge.url("/ws/local"));
    let remote_token = bearer(&remote.token("alice"));
    let local_token = bearer(&local.token("bob"));
    let _a = connect_ok(&to_remote, &[("Authorization", &remote_token)]).await;
    let _b = connect_ok(&to_local, &[("Authorization", &local_token)]).await;
    for (url, token) in [(&to_remote, &local_token), (&to_local, &remote_token)] {
        let refused = connect_refused(url, &[("Authorization", token)]).await;
        assert_eq!(refused.status, 401, "a key crossed to another policy");
        assert_eq!(refused.body["error"], "token_invalid");
    }
    assert_eq!(
        edge.metric("wsedge_jwks_keys{policy=\"local\"}").await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_reload_keeps_the_fetched_set_and_rereads_files() {
    let ca = TestCa::new();
    let key = SigningKey::new("k1");
    let (before, after) = (SigningKey::new("f1"), SigningKey::new("f2"));
    let provider = Provider::start(&ca, key_set(&[&key])).await;
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.ca_pem).unwrap();
    std::fs::write(dir.path().join("local.json"), key_set(&[&before])).unwrap();
    let config = EdgeConfig::new(&upstream.url("/ws/chat"))
        .keys(&format!(
            "algorithms = [\"ES256\"]\njwks = {{ url = \"{}\", ca = {{ file = \"ca.pem\" }} }}",
            provider.url()
        ))
        .section(
            "[auth.local]\nkind = \"jwt\"\nalgorithms = [\"ES256\"]\njwks = { file = \"local.json\" }",
        )
        .section(&format!(
            "[[route]]\npath = \"/ws/local\"\nupstream = \"{}\"\nauth = \"local\"",
            upstream.url("/ws/chat")
        ))
        .build();
    let edge = TestEdge::start_in(&config, dir).await;
    wait_ready(&edge).await;
    let local = edge.url("/ws/local");
    let _ws = connect_ok(&local, &[("Authorization", &bearer(&before.token("a")))]).await;

    // The provider goes down and the file changes; then the config is reloaded: the set
    // fetched before serves on, and the file is read again.
    provider.down.store(true, Ordering::SeqCst);
    std::fs::write(edge.dir.path().join("local.json"), key_set(&[&after])).unwrap();
    let config = wsedge::Config::from_toml(&config, "reload.toml", edge.dir.path()).unwrap();
    edge.handle.reload(config).await;
    let _ws = connect_ok(
        &edge.url("/ws/chat"),
        &[("Authorization", &bearer(&key.token("alice")))],
    )
    .await;
    assert_eq!(edge.admin_get("/readyz").await.0, 200);
    let _ws = connect_ok(&local, &[("Authorization", &bearer(&after.token("b")))]).await;
    let refused = connect_refused(&local, &[("Authorization", &bearer(&before.token("a")))]).await;
    assert_eq!(refused.status, 401);
}

#[tokio::test]
async fn bad_jwks_settings_are_refused_with_their_location() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty.json"), r#"{"keys": []}"#).unwrap();
    for (keys, expected) in [
        (
            "algorithms = [\"ES256\"]\njwks = { url = \"http://idp.example/jwks.json\" }",
            "must start with https://",
        ),
        (
            "algorithms = [\"HS256\"]\njwks = { file = \"empty.json\" }",
            "not HS*",
        ),
        (
            "algorithms = [\"ES256\"]\njwks = { file = \"empty.json\" }",
            "no key usable",
        ),
        (
            "algorithms = [\"ES256\"]\njwks = { file = \"empty.json\", url = \"https://a/b\" }",
            "either file or url",
        ),
        (
            "algorithms = [\"ES256\"]\nsecret = \"0123456789abcdef0123456789abcdef\"\njwks = { file = \"empty.json\" }",
            "not both",
        ),
        (
            "algorithms = [\"ES256\"]\njwks = { url = \"https://idp.example/jwks.json\" }\njwks_min_refetch = \"0s\"",
            "at least 1s",
        ),
    ] {
        let text = EdgeConfig::new("ws://127.0.0.1:9/ws").keys(keys).build();
        let error = wsedge::Config::from_toml(&text, "proxy.toml", dir.path())
            .err()
            .unwrap_or_else(|| panic!("accepted: {keys}"))
            .to_string();
        assert!(error.contains(expected), "{keys}: {error}");
        assert!(error.starts_with("proxy.toml:"), "{error}");
    }
}

#[tokio::test]
async fn a_token_never_brings_its_own_key() {
    // A token naming a key set or a certificate of the attacker's (jku, x5u), embedding its own
    // key (jwk) and chain (x5c) and naming a kid the provider does not publish: refused, and
    // nothing of the attacker's is ever fetched.
    let ca = TestCa::new();
    let published = SigningKey::new("k1");
    let provider = Provider::start(&ca, key_set(&[&published])).await;
    let forged = SigningKey::new("evil");
    let attacker = Provider::start(&ca, key_set(&[&forged])).await;
    let upstream = Upstream::start().await;
    let edge = edge_for(&ca, &provider, &upstream, "").await;
    wait_ready(&edge).await;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("evil".into());
    header.jku = Some(attacker.url());
    header.jwk = Some(serde_json::from_value(forged.jwk.clone()).unwrap());
    header.x5u = Some(attacker.url());
    // A chain the token carries itself: whatever it holds, it is never read.
    header.x5c = Some(vec![URL_SAFE_NO_PAD.encode(b"not a certificate")]);
    let token =
        jsonwebtoken::encode(&header, &claims("mallory", json!({})), &forged.encoding).unwrap();
    let refused =
        connect_refused(&edge.url("/ws/chat"), &[("Authorization", &bearer(&token))]).await;
    assert_eq!(refused.status, 401);
    assert_eq!(attacker.fetches(), 0);
    // The same for a kid the provider does publish: its own key decides, not the token's.
    header.kid = Some("k1".into());
    let token =
        jsonwebtoken::encode(&header, &claims("mallory", json!({})), &forged.encoding).unwrap();
    let refused =
        connect_refused(&edge.url("/ws/chat"), &[("Authorization", &bearer(&token))]).await;
    assert_eq!(refused.status, 401);
    assert_eq!(attacker.fetches(), 0);
}

#[tokio::test]
async fn a_kid_is_a_name_to_match_exactly_never_a_path() {
    // Signed with the published key, but naming it by a path, a spelling or a padding some
    // key store would resolve to it: each is a kid the provider does not publish. Refused,
    // and together they cost the provider at most one fetch (the one forced fetch a
    // `jwks_min_refetch` allows).
    let ca = TestCa::new();
    let published = SigningKey::new("k1");
    let provider = Provider::start(&ca, key_set(&[&published])).await;
    let mut upstream = Upstream::start().await;
    let edge = edge_for(&ca, &provider, &upstream, "jwks_min_refetch = \"1h\"").await;
    wait_ready(&edge).await;
    let before = provider.fetches();
    let tricks = [
        "../k1".to_owned(),
        "k1/../k1".to_owned(),
        "./k1".to_owned(),
        "/etc/passwd".to_owned(),
        "..%2fk1".to_owned(),
        "k1\u{0}".to_owned(),
        "k1 ".to_owned(),
        " k1".to_owned(),
        "K1".to_owned(),
        "k1\r\n".to_owned(),
        "k1'; DROP TABLE keys; --".to_owned(),
        "k".repeat(4_000),
    ];
    let url = edge.url("/ws/chat");
    for kid in &tricks {
        let refused = unknown_kid(&url, &published, kid.clone()).await;
        assert_eq!(refused.status, 401, "kid {kid:?}: {}", refused.body);
    }
    assert!(
        provider.fetches() - before <= 1,
        "{} fetches for {} unknown kids",
        provider.fetches() - before,
        tricks.len()
    );
    assert_eq!(upstream.handshakes_so_far(), 0);
    // Control: the published kid itself.
    let _ws = connect_ok(
        &url,
        &[("Authorization", &bearer(&published.token("alice")))],
    )
    .await;
}

#[tokio::test]
async fn a_withdrawn_key_stops_working_on_a_keep_alive_connection_too() {
    let ca = TestCa::new();
    let old = SigningKey::new("2026-11");
    let provider = Provider::start(&ca, key_set(&[&old])).await;
    let upstream = common::plain::HttpUpstream::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.ca_pem).unwrap();
    let keys = format!(
        "algorithms = [\"ES256\"]\njwks = {{ url = \"{}\", ca = {{ file = \"ca.pem\" }} }}",
        provider.url()
    );
    let config = EdgeConfig::new(&upstream.url("/api"))
        .keys(&keys)
        .path("/api")
        .route("match = \"prefix\"\nhttp = \"proxy\"");
    let edge = TestEdge::start_in(&config.build(), dir).await;
    wait_ready(&edge).await;
    let token = old.token("alice");
    let authorization = bearer(&token);
    let mut client = common::plain::HttpClient::connect(edge.addr).await;
    let request = || common::plain::get("/api/echo", &[("authorization", &authorization)]);
    assert_eq!(client.fetch(request()).await.status, 200);
    // The connection's next request with the same token is not verified again: unless the
    // set has changed since.
    assert_eq!(client.fetch(request()).await.status, 200);

    // The provider withdraws the key (a leak) and publishes another; a token naming the new
    // one makes the edge fetch the set at once.
    let new = SigningKey::new("2026-12");
    provider.publish(key_set(&[&new]));
    let bob = bearer(&new.token("bob"));
    let mut another = common::plain::HttpClient::connect(edge.addr).await;
    let accepted = another
        .fetch(common::plain::get("/api/echo", &[("authorization", &bob)]))
        .await;
    assert_eq!(accepted.status, 200);
    assert_eq!(provider.fetches(), 2);
    // The same keep-alive connection, the same token: refused now.
    let refused = client.fetch(request()).await;
    assert_eq!(
        (refused.status, refused.json()["error"].as_str()),
        (401, Some("token_invalid"))
    );
}
