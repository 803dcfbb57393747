//! HMAC-signed connection parameters (`kind = "hmac"`): the query carries the identity, an
//! expiry and a signature made as PRODUCT.md writes it (computed here independently of the
//! edge), and every way of getting it wrong is refused before the upstream hears of it.

mod common;

use aws_lc_rs::hmac;
use common::*;

const HMAC_SECRET: &str = "signing-secret-for-connection-params";

/// The signed query for these values (`None`: the parameter is left out, signed as empty).
fn signed_query(
    secret: &str,
    user: &str,
    tenant: Option<&str>,
    conversation: Option<&str>,
    expires: u64,
) -> String {
    let message = format!(
        "wsedge-hmac-v1\n{user}\n{}\n{}\n{expires}",
        tenant.unwrap_or(""),
        conversation.unwrap_or("")
    );
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
        message.as_bytes(),
    );
    let signature: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let mut query = format!("user_id={user}");
    if let Some(tenant) = tenant {
        query.push_str(&format!("&tenant_id={tenant}"));
    }
    if let Some(conversation) = conversation {
        query.push_str(&format!("&conversation_id={conversation}"));
    }
    format!("{query}&expires={expires}&signature={signature}")
}

fn alice(expires: u64) -> String {
    signed_query(HMAC_SECRET, "alice", Some("acme"), Some("c42"), expires)
}

/// An edge whose route takes signed parameters; `policy` lines go into the hmac policy.
async fn hmac_edge(policy: &str) -> (Upstream, TestEdge) {
    start_edge(|c| {
        c.auth("signed")
            .section(&format!(
                "[auth.signed]\nkind = \"hmac\"\nsecret = \"{HMAC_SECRET}\"\n{policy}"
            ))
            .route("conversation = \"query-or-token\"")
    })
    .await
}

#[tokio::test]
async fn signed_parameters_open_a_session_and_never_reach_the_upstream() {
    let (mut upstream, edge) = hmac_edge("").await;
    let query = format!("{}&lang=en", alice(now() + 600));
    let _ws = connect_ok(&edge.url(&format!("/ws/chat?{query}")), &[]).await;
    let seen = upstream.next_request().await;
    assert_eq!(seen.header("x-user-id"), Some("alice"));
    assert_eq!(seen.header("x-tenant-id"), Some("acme"));
    assert_eq!(seen.header("x-conversation-id"), Some("c42"));
    // What was signed stays at the edge; the client's own parameters go on.
    for name in [
        "user_id",
        "tenant_id",
        "conversation_id",
        "expires",
        "signature",
    ] {
        assert_eq!(seen.query_param(name), None, "{name} reached the upstream");
    }
    assert_eq!(seen.query_param("lang").as_deref(), Some("en"));
}

#[tokio::test]
async fn every_fault_in_signed_parameters_is_refused() {
    let (mut upstream, edge) = hmac_edge("max_ttl = \"1h\"").await;
    let in_ten_minutes = now() + 600;
    let good = alice(in_ten_minutes);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "tampered user",
            good.replace("user_id=alice", "user_id=mallory"),
            401,
            "token_invalid",
        ),
        (
            "another conversation",
            good.replace("conversation_id=c42", "conversation_id=c43"),
            401,
            "token_invalid",
        ),
        (
            "a later expiry",
            good.replace(
                &format!("expires={in_ten_minutes}"),
                &format!("expires={}", in_ten_minutes + 60),
            ),
            401,
            "token_invalid",
        ),
        (
            "another key",
            signed_query(
                "some-other-secret-some-other-secret",
                "alice",
                Some("acme"),
                Some("c42"),
                in_ten_minutes,
            ),
            401,
            "token_invalid",
        ),
        ("expired", alice(now() - 60), 401, "token_expired"),
        (
            "beyond max_ttl",
            alice(now() + 2 * 3600),
            401,
            "token_invalid",
        ),
        (
            "no signature",
            good.split("&signature=").next().unwrap().to_owned(),
            401,
            "token_missing",
        ),
        (
            "a parameter twice",
            format!("{good}&user_id=alice"),
            401,
            "token_invalid",
        ),
    ];
    for (what, query, status, error) in cases {
        let refused = connect_refused(&edge.url(&format!("/ws/chat?{query}")), &[]).await;
        assert_eq!(
            (refused.status, refused.body["error"].as_str()),
            (status, Some(error)),
            "{what}"
        );
    }
    assert_eq!(
        upstream.handshakes_so_far(),
        0,
        "a refusal reached the upstream"
    );
}

#[tokio::test]
async fn signed_parameters_expire_mid_session_with_4001() {
    let (mut upstream, edge) = hmac_edge("").await;
    let mut client =
        RawClient::connect(edge.addr, &format!("/ws/chat?{}", alice(now() + 2)), &[]).await;
    upstream.next_request().await;
    assert_eq!(client.read_close_code().await, Some(4001));
    edge.wait_idle().await;
}

#[test]
fn forward_token_cannot_send_signed_parameters_upstream() {
    let text = EdgeConfig::new("ws://127.0.0.1:9/ws")
        .auth("signed")
        .section(
            "[auth.signed]\nkind = \"hmac\"\nsecret = \"signing-secret-for-connection-params\"",
        )
        .route("forward_token = true")
        .build();
    let error = wsedge::Config::from_toml(&text, "proxy.toml", std::path::Path::new("."))
        .err()
        .expect("forward_token with an hmac policy loaded")
        .to_string();
    assert!(error.contains("forward_token does not apply"), "{error}");
}

#[tokio::test]
async fn signed_parameters_never_reach_an_http_upstream_either() {
    let mut upstream = plain::HttpUpstream::start("a").await;
    let config = EdgeConfig::new(&upstream.url("/api"))
        .path("/api")
        .auth("signed")
        .section(&format!(
            "[auth.signed]\nkind = \"hmac\"\nsecret = \"{HMAC_SECRET}\""
        ))
        .route("match = \"prefix\"\nhttp = \"proxy\"\nconversation = \"query-or-token\"");
    let edge = TestEdge::start(&config.build()).await;
    let mut client = plain::HttpClient::connect(edge.addr).await;
    let path = format!("/api/echo?{}&page=2", alice(now() + 600));
    let response = client.fetch(plain::get(&path, &[])).await;
    assert_eq!(response.status, 200);
    let seen = upstream.next_request().await.request;
    assert_eq!(seen.header("x-user-id"), Some("alice"));
    assert_eq!(seen.header("x-conversation-id"), Some("c42"));
    assert_eq!(seen.query(), vec![("page".to_owned(), "2".to_owned())]);
    let refused = client
        .fetch(plain::get(&path.replace("alice", "mallory"), &[]))
        .await;
    assert_eq!(refused.status, 401);
}

#[test]
fn bad_hmac_settings_are_refused_with_their_location() {
    for (policy, expected) in [
        (
            "secret = \"signing-secret-for-connection-params\"\nalgorithms = [\"HS256\"]",
            "algorithms does not apply",
        ),
        ("secret = \"short\"", "at least"),
        ("", "needs secret"),
        (
            "secret = \"signing-secret-for-connection-params\"\nparams = { user = \"id\", tenant = \"id\" }",
            "named twice",
        ),
        (
            "secret = \"signing-secret-for-connection-params\"\nmax_ttl = \"soon\"",
            "invalid duration \"soon\"",
        ),
        (
            "secret = \"signing-secret-for-connection-params\"\nclaims = { conversations = \"convs\" }",
            "claims.conversations does not apply",
        ),
        (
            "secret = \"signing-secret-for-connection-params\"\njwks_min_refetch = \"5s\"",
            "jwks_min_refetch does not apply",
        ),
    ] {
        let text = EdgeConfig::new("ws://127.0.0.1:9/ws")
            .auth("signed")
            .section(&format!("[auth.signed]\nkind = \"hmac\"\n{policy}"))
            .build();
        let error = wsedge::Config::from_toml(&text, "proxy.toml", std::path::Path::new("."))
            .err()
            .unwrap_or_else(|| panic!("accepted: {policy}"))
            .to_string();
        assert!(error.contains(expected), "{policy}: {error}");
        assert!(error.starts_with("proxy.toml:"), "{error}");
    }
}
