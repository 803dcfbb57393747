//! The operator's API under `/admin/`: absent without its token, refused without it; ending a
//! user's sockets (4004 to each, 1000 to its upstream, others untouched); revoking a token so
//! that it is refused (401 `token_revoked`) until lifted, across a restart; and the chat-turn
//! metrics an LLM chat user's wait shows in.

mod common;

use std::net::SocketAddr;

use common::*;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

async fn admin_get(admin: SocketAddr, path: &str) -> (u16, Value) {
    admin_call(admin, "GET", path, Some(ADMIN_TOKEN), None).await
}

async fn admin_post(admin: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    admin_call(admin, "POST", path, Some(ADMIN_TOKEN), Some(body)).await
}

async fn admin_delete(admin: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    admin_call(admin, "DELETE", path, Some(ADMIN_TOKEN), Some(body)).await
}

fn with_api(config: EdgeConfig) -> EdgeConfig {
    with_api_keeping(config, "{dir}")
}

/// The API, with revocations kept in `state_dir`.
fn with_api_keeping(config: EdgeConfig, state_dir: &str) -> EdgeConfig {
    config
        .section(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\nstate_dir = \"{state_dir}\""
        ))
        .without_admin()
}

fn token(sub: &str, jti: &str) -> String {
    hs256(&claims(sub, json!({ "jti": jti, "tenant_id": "acme" })))
}

fn url(edge: &TestEdge, token: &str) -> String {
    edge.url(&format!("/ws/chat?token={token}"))
}

#[tokio::test]
async fn the_api_is_absent_without_its_token_and_refuses_a_wrong_one() {
    let (_upstream, edge) = start_edge(|c| c).await;
    let admin = edge.admin.unwrap();
    let (status, _) = admin_get(admin, "/admin/connections").await;
    assert_eq!(status, 404);

    let (_upstream, edge) = start_edge(with_api).await;
    let admin = edge.admin.unwrap();
    for token in [None, Some("wrong"), Some("admin-token-0123456789abcdeX")] {
        let (status, body) = admin_call(admin, "GET", "/admin/connections", token, None).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("unauthorized"))
        );
    }
    let (status, body) = admin_get(admin, "/admin/connections").await;
    assert_eq!(status, 200);
    assert_eq!(body["connections"], json!([]));
    // Metrics and health stay open.
    assert_eq!(edge.admin_get("/healthz").await.0, 200);
}

#[tokio::test]
async fn disconnecting_a_user_closes_exactly_their_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut upstream = Upstream::start().await;
    let config = with_api(EdgeConfig::new(&upstream.url("/ws/chat")))
        .log(&format!("audit = \"{}\"", audit.display()));
    let edge = TestEdge::start_in(&config.build(), dir).await;
    let admin = edge.admin.unwrap();
    let mut alice_1 = RawClient::connect(
        edge.addr,
        &format!("/ws/chat?token={}", token("alice", "a1")),
        &[],
    )
    .await;
    let mut alice_2 = RawClient::connect(
        edge.addr,
        &format!("/ws/chat?token={}", token("alice", "a2")),
        &[],
    )
    .await;
    let mut bob = connect_ok(&url(&edge, &token("bob", "b1")), &[]).await;
    for _ in 0..3 {
        upstream.next_request().await;
    }
    let (status, listed) = admin_get(admin, "/admin/connections?user=alice").await;
    assert_eq!(status, 200);
    let listed = listed["connections"].as_array().unwrap().clone();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["user"], "alice");
    assert_eq!(listed[0]["tenant"], "acme");
    assert!(listed.iter().any(|c| c["jti"] == "a2"));

    // At least one selector.
    let (status, _) = admin_post(admin, "/admin/disconnect", json!({})).await;
    assert_eq!(status, 400);
    let (status, body) = admin_post(
        admin,
        "/admin/disconnect",
        json!({ "user": "alice", "tenant": "acme" }),
    )
    .await;
    assert_eq!((status, &body), (200, &json!({ "closed": 2 })));
    assert_eq!(alice_1.read_close_code().await, Some(4004));
    assert_eq!(alice_2.read_close_code().await, Some(4004));
    for _ in 0..2 {
        let (code, reason) = upstream.next_close().await.expect("the upstream's close");
        assert_eq!((code, reason.as_str()), (1000, "revoked"));
    }
    // Bob's socket goes on.
    bob.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_text(&mut bob).await, "still here");
    // Its traffic, as listed: the ten bytes each way.
    eventually(WAIT, "bob's bytes in the listing", || async {
        let (_, body) = admin_get(admin, "/admin/connections?user=bob").await;
        body["connections"][0]["bytes_in"] == 10 && body["connections"][0]["bytes_out"] == 10
    })
    .await;

    let is_the_call = |line: &Value| {
        line["event"] == "admin" && line["path"] == "/admin/disconnect" && line["status"] == 200
    };
    let read = || -> Vec<Value> {
        std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    };
    eventually(WAIT, "the disconnect's audit line", || async {
        read().iter().any(is_the_call)
    })
    .await;
    let lines = read();
    let admin_line = lines.iter().find(|line| is_the_call(line)).unwrap();
    assert_eq!(admin_line["answered"]["closed"], 2);
    assert_eq!(admin_line["asked"]["user"], "alice");
    assert!(
        admin_line["client"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert!(
        !std::fs::read_to_string(&audit)
            .unwrap()
            .contains(ADMIN_TOKEN)
    );
}

#[tokio::test]
async fn a_revoked_token_is_closed_refused_until_lifted_and_survives_a_restart() {
    // The state outlives the edge's own scratch folder.
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    let mut upstream = Upstream::start().await;
    let config = with_api_keeping(EdgeConfig::new(&upstream.url("/ws/chat")), state_dir).build();
    let edge = TestEdge::start(&config).await;
    let admin = edge.admin.unwrap();
    let revoked = token("alice", "j-revoked");
    let mut live = RawClient::connect(edge.addr, &format!("/ws/chat?token={revoked}"), &[]).await;
    upstream.next_request().await;

    let (status, body) = admin_post(admin, "/admin/revoke", json!({ "jti": "j-revoked" })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["closed"], 1);
    assert_eq!(live.read_close_code().await, Some(4004));
    let refused = connect_refused(&url(&edge, &revoked), &[]).await;
    assert_eq!(
        (refused.status, refused.body["error"].as_str()),
        (401, Some("token_revoked"))
    );
    // Another token of the same user is not this one.
    let _other = connect_ok(&url(&edge, &token("alice", "j-other")), &[]).await;

    // A user revoked until a moment, and the revocations kept across a restart.
    let (status, body) = admin_post(
        admin,
        "/admin/revoke",
        json!({ "user": "bob", "tenant": "acme", "until": "2099-01-01T00:00:00Z" }),
    )
    .await;
    assert_eq!(
        (status, body["until"].as_str()),
        (200, Some("2099-01-01T00:00:00Z"))
    );
    edge.stop().await;
    let edge = TestEdge::start(&config).await;
    let admin = edge.admin.unwrap();
    for (token, what) in [(&revoked, "the jti"), (&token("bob", "b9"), "the user")] {
        let refused = connect_refused(&url(&edge, token), &[]).await;
        assert_eq!(refused.status, 401, "{what} after a restart");
        assert_eq!(refused.body["error"], "token_revoked");
    }
    let (status, body) = admin_delete(admin, "/admin/revoke", json!({ "jti": "j-revoked" })).await;
    assert_eq!((status, &body), (200, &json!({ "lifted": true })));
    let _back = connect_ok(&url(&edge, &revoked), &[]).await;
    // A body that names nothing, or two things, is refused.
    for body in [
        json!({}),
        json!({ "jti": "x", "user": "y" }),
        json!({ "jti": "x", "until": "soon" }),
    ] {
        let (status, _) = admin_post(admin, "/admin/revoke", body).await;
        assert_eq!(status, 400);
    }
}

#[tokio::test]
async fn a_detached_session_is_ended_by_a_disconnect() {
    let mut upstream = Upstream::start().await;
    let config = with_api(EdgeConfig::new(&upstream.url("/ws/chat")))
        .route("resume = { window = \"60s\" }")
        .build();
    let edge = TestEdge::start(&config).await;
    let admin = edge.admin.unwrap();
    let path = format!("/ws/chat?token={}&session_id=s1", token("carol", "c1"));
    let client = RawClient::connect(edge.addr, &path, &[]).await;
    upstream.next_request().await;
    // Gone without a close: the session waits for it.
    drop(client);
    eventually(WAIT, "the session detaching", || async {
        let (_, body) = admin_get(admin, "/admin/connections?session=s1").await;
        body["connections"][0]["detached"] == true
    })
    .await;
    let (_, body) = admin_post(admin, "/admin/disconnect", json!({ "session": "s1" })).await;
    assert_eq!(body["closed"], 1);
    let (code, _) = upstream.next_close().await.expect("the upstream's close");
    assert_eq!(code, 1000);
    edge.wait_idle().await;
    // Coming back finds nothing to resume.
    let mut back = RawClient::connect(edge.addr, &format!("{path}&last_seq=0"), &[]).await;
    assert_eq!(back.read_close_code().await, Some(4002));
}

#[tokio::test]
async fn the_wait_for_the_first_answer_and_the_turns_are_measured() {
    let (mut upstream, edge) = start_edge(|c| c.log("audit = \"{dir}/audit.jsonl\"")).await;
    let mut ws = connect_ok(&url(&edge, &token("dana", "d1")), &[]).await;
    upstream.next_request().await;
    // A model that thinks for 400 ms, then streams five tokens.
    ws.send(Message::text("later 400 5")).await.unwrap();
    for _ in 0..5 {
        next_text(&mut ws).await;
    }
    ws.close(None).await.unwrap();
    edge.wait_idle().await;
    let route = "{route=\"/ws/chat\"}";
    let first = |name: &str| format!("wsedge_{name}{route}");
    edge.wait_metric(&first("first_response_seconds_count"), 1.0)
        .await;
    let waited = edge
        .metric(&first("first_response_seconds_sum"))
        .await
        .unwrap();
    // The upstream's 400 ms, and not much more: a loaded machine gets a second of slack.
    assert!(
        (0.39..1.4).contains(&waited),
        "first response after {waited} s"
    );
    assert_eq!(edge.metric(&first("turn_messages_sum")).await, Some(5.0));
    assert_eq!(edge.metric(&first("turn_seconds_count")).await, Some(1.0));
    // The disconnect's audit line counts the turns.
    let audit = edge.dir.path().join("audit.jsonl");
    let lines = audit_lines(&audit, 2).await;
    let disconnect = lines
        .iter()
        .find(|line| line["event"] == "disconnect")
        .expect("a disconnect line");
    assert_eq!(disconnect["turns"], 1);
}

#[tokio::test]
async fn revocations_match_what_the_edge_settled_on() {
    // A pinned tenant: the token names none, the route says "acme"; a numeric jti; an `exp`
    // thousands of years away (the default `until` must not follow it there).
    let mut upstream = Upstream::start().await;
    let config = with_api(EdgeConfig::new(&upstream.url("/ws/chat")))
        .route("tenant = { pin = \"acme\" }")
        .build();
    let edge = TestEdge::start(&config).await;
    let admin = edge.admin.unwrap();
    let pinned = hs256(&claims("erin", json!({})));
    let mut live = RawClient::connect(edge.addr, &format!("/ws/chat?token={pinned}"), &[]).await;
    upstream.next_request().await;
    let (_, body) = admin_post(
        admin,
        "/admin/revoke",
        json!({ "user": "erin", "tenant": "acme" }),
    )
    .await;
    assert_eq!(body["closed"], 1);
    assert_eq!(live.read_close_code().await, Some(4004));
    let refused = connect_refused(&url(&edge, &pinned), &[]).await;
    assert_eq!(refused.body["error"], "token_revoked");

    let numeric = hs256(&claims(
        "frank",
        json!({ "jti": 123, "exp": 99_999_999_999u64 }),
    ));
    let _live = connect_ok(&url(&edge, &numeric), &[]).await;
    upstream.next_request().await;
    let (status, body) = admin_post(admin, "/admin/revoke", json!({ "jti": "123" })).await;
    assert_eq!((status, body["closed"].as_u64()), (200, Some(1)), "{body}");
    // At most 30 days from now, not the token's year 5138.
    let until = humantime::parse_rfc3339(body["until"].as_str().unwrap()).unwrap();
    let days = until
        .duration_since(std::time::SystemTime::now())
        .unwrap()
        .as_secs()
        / 86_400;
    assert!((29..=30).contains(&days), "{days} days");
    let refused = connect_refused(&url(&edge, &numeric), &[]).await;
    assert_eq!(refused.body["error"], "token_revoked");
    // A user without a tenant is not every tenant's user of that name.
    let (_, body) = admin_post(admin, "/admin/revoke", json!({ "user": "grace" })).await;
    assert_eq!(body["closed"], 0);
}
