//! Several edges sharing one real Redis (`[cluster]`): a user's connection limit holds across
//! them and frees when a socket closes or an edge dies; a disconnect or revocation made on one
//! edge acts on the others; a stream cut on one edge is resumed through another, exactly once,
//! over the upstream connection it had; and Redis going away cuts no live socket while
//! `on_redis_down` decides new handshakes.

mod common;

use std::time::{Duration, Instant};

use common::process::EdgeProcess;
use common::redis_server::RedisServer;
use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const CLUSTER_SECRET: &str = "cluster-secret-0123456789abcdef-0123456789";
const NODE_TTL_SECS: u64 = 3;

/// An edge of the cluster on `redis`, in front of `upstream`, with the admin API and resume.
fn member(upstream: &Upstream, redis: &RedisServer, node: &str, extra: &str) -> EdgeConfig {
    member_renewing(upstream, redis, node, extra, NODE_TTL_SECS)
}

/// The same with its own `node_ttl` (leases renewed every third of it).
fn member_renewing(
    upstream: &Upstream,
    redis: &RedisServer,
    node: &str,
    extra: &str,
    node_ttl_secs: u64,
) -> EdgeConfig {
    member_with(upstream, redis, node, extra, node_ttl_secs, "", "")
}

/// The same, with more lines in its `[admin]` section.
fn member_with(
    upstream: &Upstream,
    redis: &RedisServer,
    node: &str,
    extra: &str,
    node_ttl_secs: u64,
    admin_extra: &str,
    resume_extra: &str,
) -> EdgeConfig {
    EdgeConfig::new(&upstream.url("/ws/chat"))
        .without_admin()
        .server("max_connections_per_user = 2")
        .section(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n{admin_extra}"
        ))
        .section(&format!(
            "[cluster]\nredis = \"{}\"\nnode = \"{node}\"\nsecret = \"{CLUSTER_SECRET}\"\nlink = \"127.0.0.1:0\"\nnode_ttl = \"{node_ttl_secs}s\"\n{extra}",
            redis.url()
        ))
        .route(&format!(
            r#"resume = {{ window = "10s", max_messages = 50000, max_bytes = "4MiB"{resume_extra} }}"#
        ))
}

async fn start_member(upstream: &Upstream, redis: &RedisServer, node: &str) -> TestEdge {
    TestEdge::start(&member(upstream, redis, node, "").build()).await
}

fn token(sub: &str, jti: &str) -> String {
    hs256(&claims(sub, json!({ "jti": jti, "tenant_id": "acme" })))
}

fn chat(edge_addr: std::net::SocketAddr, token: &str) -> String {
    format!("ws://{edge_addr}/ws/chat?token={token}")
}

async fn admin_post(edge: &TestEdge, path: &str, body: serde_json::Value) -> serde_json::Value {
    let admin = edge.admin.expect("an admin listener");
    let (status, body) = admin_call(admin, "POST", path, Some(ADMIN_TOKEN), Some(body)).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Connects `user`, expecting the edge to let them in, and waits for the upstream to see it.
async fn connect_user(edge: std::net::SocketAddr, upstream: &mut Upstream, user: &str) -> Client {
    let client = connect_ok(&chat(edge, &token(user, user)), &[]).await;
    upstream.next_request().await;
    client
}

async fn refused_user(edge: std::net::SocketAddr, user: &str) -> Refused {
    connect_refused(&chat(edge, &token(user, user)), &[]).await
}

#[tokio::test]
async fn a_users_limit_holds_across_edges_and_frees_when_a_socket_closes() {
    let redis = RedisServer::start().await;
    let mut upstream = Upstream::start().await;
    // Renewals every 20 s: a lease given back within the test's wait is given back by the
    // socket's close, not by a renewal.
    let start = |node: &'static str| {
        let config = member_renewing(&upstream, &redis, node, "", 60).build();
        async move { TestEdge::start(&config).await }
    };
    let a = start("edge-a").await;
    let b = start("edge-b").await;

    let mut on_a = connect_user(a.addr, &mut upstream, "alice").await;
    let _on_b = connect_user(b.addr, &mut upstream, "alice").await;
    // Each edge holds one of alice's two: a third is refused on either.
    for edge in [&a, &b] {
        let refused = refused_user(edge.addr, "alice").await;
        assert_eq!(
            (refused.status, refused.body["error"].as_str()),
            (429, Some("too_many_connections"))
        );
    }
    // Another user is counted apart.
    let _bob = connect_user(b.addr, &mut upstream, "bob").await;
    let leases: usize = redis
        .query(redis::cmd("ZCARD").arg("wsedge:user:4:acme:5:alice"))
        .await;
    assert_eq!(leases, 2, "alice's leases in Redis");

    // A socket that closes gives its place back, on the other edge too.
    on_a.close(None).await.unwrap();
    upstream.next_close().await;
    eventually(
        Duration::from_secs(5),
        "alice's lease given back",
        || async {
            redis
                .query::<usize>(redis::cmd("ZCARD").arg("wsedge:user:4:acme:5:alice"))
                .await
                == 1
        },
    )
    .await;
    let _again = connect_user(b.addr, &mut upstream, "alice").await;
    assert_eq!(refused_user(a.addr, "alice").await.status, 429);
}

#[tokio::test]
async fn a_killed_edges_connections_stop_counting_within_node_ttl() {
    let redis = RedisServer::start().await;
    let mut upstream = Upstream::start().await;
    let doomed = EdgeProcess::start(&member(&upstream, &redis, "edge-a", "").build(), &[]).await;
    let b = start_member(&upstream, &redis, "edge-b").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(connect_user(doomed.addr, &mut upstream, "alice").await);
    }
    assert_eq!(refused_user(b.addr, "alice").await.status, 429);

    // Killed outright: nothing is given back, its leases just stop being renewed.
    doomed.signal("KILL");
    let killed = Instant::now();
    let mut allowed = None;
    while killed.elapsed() < Duration::from_secs(NODE_TTL_SECS) + WAIT {
        if let Ok((client, _)) = connect(&chat(b.addr, &token("alice", "x")), &[]).await {
            allowed = Some((client, killed.elapsed()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_client, after) = allowed.expect("alice was never let in again");
    assert!(
        after <= Duration::from_secs(NODE_TTL_SECS) + Duration::from_secs(2),
        "a dead edge counted for {after:?}, node_ttl is {NODE_TTL_SECS}s"
    );
    drop(held);
}

#[tokio::test]
async fn a_disconnect_or_revocation_on_one_edge_acts_on_the_others() {
    let redis = RedisServer::start().await;
    let mut upstream = Upstream::start().await;
    let a = start_member(&upstream, &redis, "edge-a").await;
    let b = start_member(&upstream, &redis, "edge-b").await;
    let mut alice = RawClient::connect(
        b.addr,
        &format!("/ws/chat?token={}", token("alice", "a1")),
        &[],
    )
    .await;
    upstream.next_request().await;
    let mut bob = RawClient::connect(
        b.addr,
        &format!("/ws/chat?token={}", token("bob", "b1")),
        &[],
    )
    .await;
    upstream.next_request().await;

    // Asked of edge A, done on edge B.
    let answer = admin_post(&a, "/admin/disconnect", json!({ "user": "alice" })).await;
    assert_eq!(answer["closed"], 0, "A holds none of alice's sockets");
    assert_eq!(answer["cluster"], "published");
    assert_eq!(answer["edges"], 2);
    assert_eq!(alice.read_close_code().await, Some(4004));
    assert_eq!(upstream.next_close().await, Some((1000, "revoked".into())));

    let answer = admin_post(&a, "/admin/revoke", json!({ "jti": "b1" })).await;
    assert_eq!(answer["cluster"], "published");
    assert_eq!(bob.read_close_code().await, Some(4004));
    assert_eq!(upstream.next_close().await, Some((1000, "revoked".into())));
    for edge in [&a, &b] {
        let refused = connect_refused(&chat(edge.addr, &token("bob", "b1")), &[]).await;
        assert_eq!(
            (refused.status, refused.body["error"].as_str()),
            (401, Some("token_revoked"))
        );
    }
    b.wait_metric("wsedge_cluster_events_total{kind=\"revoke\"}", 1.0)
        .await;
    // An edge that joins later reads the revocation from Redis.
    let c = start_member(&upstream, &redis, "edge-c").await;
    until_admitted(
        &c,
        "bob",
        "b1",
        false,
        "the revocation read back by a new edge",
    )
    .await;
    // A lift on one edge lets bob in on every edge.
    let admin = b.admin.unwrap();
    let (status, lifted) = admin_call(
        admin,
        "DELETE",
        "/admin/revoke",
        Some(ADMIN_TOKEN),
        Some(json!({ "jti": "b1" })),
    )
    .await;
    assert_eq!((status, &lifted["lifted"]), (200, &json!(true)));
    until_admitted(&a, "bob", "b1", true, "the lift reaching edge A").await;
}

#[tokio::test]
async fn a_stream_cut_on_one_edge_is_resumed_on_another_exactly_once() {
    const TOTAL: usize = 20_000;
    const CUT: usize = 7_000;
    let redis = RedisServer::start().await;
    let mut upstream = Upstream::start().await;
    let a = start_member(&upstream, &redis, "edge-a").await;
    let b = start_member(&upstream, &redis, "edge-b").await;
    let alice = token("alice", "a1");
    let mut first = RawClient::connect(
        a.addr,
        &format!("/ws/chat?token={alice}&session_id=s-1"),
        &[],
    )
    .await;
    upstream.next_request().await;
    first.send_text(&format!("stream {TOTAL}")).await;
    for expected in 0..CUT {
        assert_eq!(read_text(&mut first).await, expected.to_string());
    }
    first.vanish();
    a.wait_metric("wsedge_sessions_detached", 1.0).await;

    let resumed_at = Instant::now();
    let mut second = RawClient::connect(
        b.addr,
        &format!("/ws/chat?token={alice}&session_id=s-1&last_seq={CUT}"),
        &[],
    )
    .await;
    for expected in CUT..TOTAL {
        assert_eq!(read_text(&mut second).await, expected.to_string());
    }
    let replayed_in = resumed_at.elapsed();
    // Live again, on the upstream connection the session has had all along.
    second.send_text("conn").await;
    assert_eq!(read_text(&mut second).await, "conn 1");
    assert_eq!(
        upstream.handshakes_so_far(),
        0,
        "the upstream saw a new handshake"
    );
    assert_eq!(
        upstream.accepted.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    a.wait_metric("wsedge_cluster_remote_resumes_total{result=\"taken\"}", 1.0)
        .await;
    b.wait_metric(
        "wsedge_cluster_remote_resumes_total{result=\"carried\"}",
        1.0,
    )
    .await;
    a.wait_metric("wsedge_sessions_detached", 0.0).await;
    b.wait_metric("wsedge_cluster_links{side=\"out\"}", 1.0)
        .await;
    println!(
        "cross-edge resume: {} messages replayed in {replayed_in:?}",
        TOTAL - CUT
    );

    // A clean close from the client reaches the upstream through both edges.
    second.send_frame(true, 8, &1000u16.to_be_bytes()).await;
    assert_eq!(upstream.next_close().await, Some((1000, String::new())));
    a.wait_idle().await;
    b.wait_metric("wsedge_cluster_links{side=\"out\"}", 0.0)
        .await;
    // The session is over: a further resume through B is told why, by its owner.
    let mut late = RawClient::connect(
        b.addr,
        &format!("/ws/chat?token={alice}&session_id=s-1&last_seq={TOTAL}"),
        &[],
    )
    .await;
    assert_eq!(late.read_close_code().await, Some(4002));
}

#[tokio::test]
async fn another_user_cannot_resume_a_session_held_by_another_edge() {
    let redis = RedisServer::start().await;
    let mut upstream = Upstream::start().await;
    let a = start_member(&upstream, &redis, "edge-a").await;
    let b = start_member(&upstream, &redis, "edge-b").await;
    let mut alice = RawClient::connect(
        a.addr,
        &format!("/ws/chat?token={}&session_id=s-2", token("alice", "a1")),
        &[],
    )
    .await;
    upstream.next_request().await;
    alice.send_text("hello").await;
    assert_eq!(read_text(&mut alice).await, "hello");
    // Mallory names alice's session through the other edge: it is no session of hers.
    let mut mallory = RawClient::connect(
        b.addr,
        &format!(
            "/ws/chat?token={}&session_id=s-2&last_seq=0",
            token("mallory", "m1")
        ),
        &[],
    )
    .await;
    assert_eq!(mallory.read_close_code().await, Some(4002));
    assert_eq!(
        b.metric("wsedge_cluster_remote_resumes_total{result=\"carried\"}")
            .await,
        None
    );
    // Alice's stream is untouched.
    alice.send_text("still mine").await;
    assert_eq!(read_text(&mut alice).await, "still mine");
}

#[tokio::test]
async fn redis_going_away_cuts_no_live_socket_and_on_redis_down_decides() {
    let mut redis = RedisServer::start().await;
    let mut upstream = Upstream::start().await;
    let open = start_member(&upstream, &redis, "edge-open").await;
    let closed = TestEdge::start(
        &member(
            &upstream,
            &redis,
            "edge-closed",
            "on_redis_down = \"closed\"",
        )
        .build(),
    )
    .await;
    let mut on_open = connect_user(open.addr, &mut upstream, "alice").await;
    let mut on_closed = connect_user(closed.addr, &mut upstream, "bob").await;

    redis.kill().await;
    for edge in [&open, &closed] {
        edge.wait_metric("wsedge_cluster_redis_up", 0.0).await;
    }
    // Live sockets go on, on both edges.
    for client in [&mut on_open, &mut on_closed] {
        client.send(Message::text("still here")).await.unwrap();
        assert_eq!(next_text(client).await, "still here");
    }
    // "open": new handshakes go on, limited per edge (alice's second of two is let in, her
    // third is not).
    let _second = connect_user(open.addr, &mut upstream, "alice").await;
    assert_eq!(refused_user(open.addr, "alice").await.status, 429);
    // "closed": refused while Redis is away.
    let refused = refused_user(closed.addr, "carol").await;
    assert_eq!(
        (refused.status, refused.body["error"].as_str()),
        (503, Some("cluster_unavailable"))
    );
    assert!(refused.headers.contains_key("retry-after"));

    // Back (empty, as after a restart): the edges find it, and write their leases again.
    redis.restart().await;
    closed.wait_metric("wsedge_cluster_redis_up", 1.0).await;
    let _carol = connect_user(closed.addr, &mut upstream, "carol").await;
    eventually(WAIT, "alice's two leases written again", || async {
        redis
            .query::<usize>(redis::cmd("ZCARD").arg("wsedge:user:4:acme:5:alice"))
            .await
            == 2
    })
    .await;
    assert_eq!(refused_user(closed.addr, "alice").await.status, 429);
    on_open.send(Message::text("after")).await.unwrap();
    assert_eq!(next_text(&mut on_open).await, "after");
}

/// The next text frame (answering pings on the way).
async fn read_text(client: &mut RawClient) -> String {
    let frame = client
        .read_answering_pings()
        .await
        .expect("a frame, not the end of the connection");
    assert_eq!(
        frame.opcode,
        1,
        "{:?}",
        String::from_utf8_lossy(&frame.payload)
    );
    String::from_utf8(frame.payload).unwrap()
}

#[tokio::test]
async fn a_revocation_made_while_redis_is_away_reaches_it_when_it_is_back() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let a = start_member(&upstream, &redis, "edge-a").await;
    redis.kill().await;
    a.wait_metric("wsedge_cluster_redis_up", 0.0).await;
    // In effect on this edge at once; written to Redis when it answers again.
    let answer = admin_post(&a, "/admin/revoke", json!({ "jti": "b1" })).await;
    assert_eq!(answer["cluster"], "pending");
    assert_eq!(
        connect_refused(&chat(a.addr, &token("bob", "b1")), &[])
            .await
            .status,
        401
    );
    redis.restart().await;
    eventually(WAIT, "the pending revocation written to Redis", || async {
        stored_revocation(&redis, "jti:b1").await.is_some()
    })
    .await;
    // An edge that starts now reads it back.
    let b = start_member(&upstream, &redis, "edge-b").await;
    until_admitted(
        &b,
        "bob",
        "b1",
        false,
        "the revocation read back by a new edge",
    )
    .await;
}

/// Waits until `edge` lets `user` in with the token id `jti` (`admitted`), or refuses them
/// with 401.
async fn until_admitted(edge: &TestEdge, user: &str, jti: &str, admitted: bool, what: &str) {
    eventually(WAIT, what, || async {
        match connect(&chat(edge.addr, &token(user, jti)), &[]).await {
            Ok(_) => admitted,
            Err(refused) => !admitted && refused.status == 401,
        }
    })
    .await;
}

/// What Redis holds for a revocation's field (`jti:…` or `user:…`): `until at kind`.
async fn stored_revocation(redis: &RedisServer, field: &str) -> Option<String> {
    redis
        .query::<Option<String>>(redis::cmd("HGET").arg("wsedge:revocations").arg(field))
        .await
}

/// Connects `user` with the token id `jti` through `edge`.
async fn connect_raw(edge: &TestEdge, upstream: &mut Upstream, user: &str, jti: &str) -> RawClient {
    let client = RawClient::connect(
        edge.addr,
        &format!("/ws/chat?token={}", token(user, jti)),
        &[],
    )
    .await;
    upstream.next_request().await;
    client
}

#[tokio::test]
async fn redis_restarting_empty_loses_no_revocation_and_events_flow_again() {
    let mut redis = RedisServer::start().await;
    let mut upstream = Upstream::start().await;
    let a = start_member(&upstream, &redis, "edge-a").await;
    let b = start_member(&upstream, &redis, "edge-b").await;
    let mut alice = connect_raw(&b, &mut upstream, "alice", "a1").await;
    let mut dave = connect_raw(&b, &mut upstream, "dave", "d1").await;
    let answer = admin_post(&a, "/admin/revoke", json!({ "jti": "gone" })).await;
    assert_eq!(answer["cluster"], "published");

    redis.kill().await;
    for edge in [&a, &b] {
        edge.wait_metric("wsedge_cluster_redis_up", 0.0).await;
    }
    // B cannot hear of it while Redis is away.
    let answer = admin_post(
        &a,
        "/admin/revoke",
        json!({ "user": "alice", "tenant": "acme" }),
    )
    .await;
    assert_eq!(answer["cluster"], "pending");

    // Back, empty: alice's socket on B ends (by the event A publishes, or by B reading the
    // revocation back), and what Redis lost is written back by the edges that hold it.
    redis.restart().await;
    assert_eq!(alice.read_close_code().await, Some(4004));
    assert_eq!(upstream.next_close().await, Some((1000, "revoked".into())));
    eventually(WAIT, "the lost revocation written back", || async {
        stored_revocation(&redis, "jti:gone")
            .await
            .is_some_and(|stored| stored.ends_with(" r"))
    })
    .await;
    // B listens again: an event published now reaches it.
    eventually(WAIT, "both edges listening again", || async {
        let answer = admin_post(&a, "/admin/disconnect", json!({ "user": "nobody" })).await;
        answer["edges"] == 2
    })
    .await;
    admin_post(&a, "/admin/revoke", json!({ "jti": "d1" })).await;
    assert_eq!(dave.read_close_code().await, Some(4004));
    // An edge that starts now holds all of it.
    let c = start_member(&upstream, &redis, "edge-c").await;
    for (user, jti) in [("bob", "gone"), ("alice", "a2"), ("dave", "d1")] {
        until_admitted(
            &c,
            user,
            jti,
            false,
            "the revocations read back by a new edge",
        )
        .await;
    }
}

/// Writes a field of the revocations' hash as another edge would have, then drops every
/// subscription (as an outage would): the edges missed its event, and read it back.
async fn write_unheard(redis: &RedisServer, field: &str, value: String) {
    redis
        .query::<()>(
            redis::cmd("HSET")
                .arg("wsedge:revocations")
                .arg(field)
                .arg(value),
        )
        .await;
    redis
        .query::<()>(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"))
        .await;
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

#[tokio::test]
async fn what_an_edge_did_not_hear_is_read_back_from_redis() {
    let redis = RedisServer::start().await;
    let mut upstream = Upstream::start().await;
    let a = start_member(&upstream, &redis, "edge-a").await;
    let b = start_member(&upstream, &redis, "edge-b").await;
    // A revocation neither edge heard of ends the live socket it matches.
    let mut carol = connect_raw(&b, &mut upstream, "carol", "c1").await;
    let until = now_ms() / 1000 + 600;
    write_unheard(&redis, "jti:c1", format!("{until} {} r", now_ms())).await;
    assert_eq!(carol.read_close_code().await, Some(4004));
    assert_eq!(upstream.next_close().await, Some((1000, "revoked".into())));
    for edge in [&a, &b] {
        until_admitted(edge, "carol", "c1", false, "the revocation read back").await;
    }

    // A lift neither edge heard of: their copies of the revocation do not undo it.
    admin_post(&a, "/admin/revoke", json!({ "jti": "x1" })).await;
    b.wait_metric("wsedge_cluster_events_total{kind=\"revoke\"}", 1.0)
        .await;
    let stored = stored_revocation(&redis, "jti:x1").await.unwrap();
    let until = stored.split(' ').next().unwrap().to_owned();
    write_unheard(&redis, "jti:x1", format!("{until} {} l", now_ms())).await;
    for edge in [&a, &b] {
        until_admitted(edge, "bob", "x1", true, "the lift read back").await;
    }
}

#[tokio::test]
async fn a_revocation_waiting_for_redis_outlives_a_restart_of_its_edge() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::start().await;
    let state = tempfile::tempdir().unwrap();
    let keeping = format!("state_dir = \"{}\"", state.path().display());
    let config = member_with(&upstream, &redis, "edge-a", "", NODE_TTL_SECS, &keeping, "").build();
    let a = TestEdge::start(&config).await;
    redis.kill().await;
    a.wait_metric("wsedge_cluster_redis_up", 0.0).await;
    let answer = admin_post(&a, "/admin/revoke", json!({ "jti": "p1" })).await;
    assert_eq!(answer["cluster"], "pending");
    a.stop().await;
    assert!(state.path().join("cluster-pending.json").exists());

    let a = TestEdge::start(&config).await;
    redis.restart().await;
    // Written as the change it was (asked at its time), not as a copy written back (at 0).
    eventually(
        WAIT,
        "the revocation written once Redis is back",
        || async {
            stored_revocation(&redis, "jti:p1")
                .await
                .is_some_and(|stored| {
                    let fields: Vec<&str> = stored.split(' ').collect();
                    fields.len() == 3 && fields[1] != "0" && fields[2] == "r"
                })
        },
    )
    .await;
    eventually(WAIT, "nothing left waiting", || async {
        !state.path().join("cluster-pending.json").exists()
    })
    .await;
    let b = start_member(&upstream, &redis, "edge-b").await;
    until_admitted(
        &b,
        "bob",
        "p1",
        false,
        "the revocation read back by another edge",
    )
    .await;
    drop(a);
}

/// The directory's entry for session `id` (`instance link`), if there is one.
async fn directory_entry(redis: &RedisServer, id: &str) -> Option<String> {
    let keys: Vec<String> = redis
        .query(redis::cmd("KEYS").arg(format!("wsedge:session:*:{id}")))
        .await;
    let key = keys.first()?;
    redis.query(redis::cmd("GET").arg(key)).await
}

/// Waits until the edge holding session `id` has renewed its entry `times` times: each time the
/// entry is given a long life here, and the renewal brings it back to `node_ttl`.
async fn renewed(redis: &RedisServer, id: &str, times: usize) {
    let keys: Vec<String> = redis
        .query(redis::cmd("KEYS").arg(format!("wsedge:session:*:{id}")))
        .await;
    let key = keys.first().expect("an entry");
    for _ in 0..times {
        redis
            .query::<()>(redis::cmd("PEXPIRE").arg(key).arg(600_000))
            .await;
        eventually(WAIT, "the entry renewed", || async {
            let left: i64 = redis.query(redis::cmd("PTTL").arg(key)).await;
            (0..=(NODE_TTL_SECS as i64 * 1000)).contains(&left)
        })
        .await;
    }
}

/// The `edge.session` announcement, as JSON.
async fn announcement(client: &mut RawClient) -> serde_json::Value {
    let text = read_text(client).await;
    let announced: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(announced["type"], "edge.session", "{text}");
    announced
}

#[tokio::test]
async fn a_resume_its_owner_no_longer_knows_starts_afresh_where_it_lands() {
    let redis = RedisServer::start().await;
    let mut upstream = Upstream::start().await;
    let announcing = |node: &str| {
        member_with(
            &upstream,
            &redis,
            node,
            "",
            NODE_TTL_SECS,
            "",
            ", announce = true",
        )
        .build()
    };
    let a = TestEdge::start(&announcing("edge-a")).await;
    let b = TestEdge::start(&announcing("edge-b")).await;
    let alice = token("alice", "a1");
    let alice = alice.as_str();
    let connect_session = |edge: std::net::SocketAddr, query: String| async move {
        RawClient::connect(edge, &format!("/ws/chat?token={alice}&{query}"), &[]).await
    };
    let mut on_a = connect_session(a.addr, "session_id=s-3".into()).await;
    upstream.next_request().await;
    assert_eq!(announcement(&mut on_a).await["resumed"], false);
    let mut other_on_a = RawClient::connect(
        a.addr,
        &format!("/ws/chat?token={}&session_id=s-4", token("bob", "b1")),
        &[],
    )
    .await;
    upstream.next_request().await;
    announcement(&mut other_on_a).await;
    eventually(WAIT, "A's sessions in the directory", || async {
        directory_entry(&redis, "s-3").await.is_some()
            && directory_entry(&redis, "s-4").await.is_some()
    })
    .await;
    let a_entry = directory_entry(&redis, "s-3").await.unwrap();

    // The directory names A for a session A does not know (one that ended and was forgotten
    // before its entry lapsed): B asks A, and starts the session afresh, saying why.
    let keys: Vec<String> = redis
        .query(redis::cmd("KEYS").arg("wsedge:session:*:s-3"))
        .await;
    let gone_key = keys[0].replace(":s-3", ":s-gone");
    redis
        .query::<()>(
            redis::cmd("SET")
                .arg(&gone_key)
                .arg(&a_entry)
                .arg("PX")
                .arg(60_000),
        )
        .await;
    let mut gone = connect_session(b.addr, "session_id=s-gone&last_seq=5".into()).await;
    upstream.next_request().await;
    let announced = announcement(&mut gone).await;
    assert_eq!(
        (
            &announced["session_id"],
            &announced["resumed"],
            &announced["reason"]
        ),
        (&json!("s-gone"), &json!(false), &json!("session unknown"))
    );
    gone.send_text("fresh").await;
    assert_eq!(read_text(&mut gone).await, "fresh");
    b.wait_metric(
        "wsedge_cluster_remote_resumes_total{result=\"unknown\"}",
        1.0,
    )
    .await;
    eventually(WAIT, "B's entry for the session it started", || async {
        directory_entry(&redis, "s-gone")
            .await
            .is_some_and(|entry| entry != a_entry)
    })
    .await;

    // The newest session under an id keeps its entry: when another edge has written over
    // A's entry for s-3 (it started a session under that id), A's renewals leave it be.
    let taken = "edge-z.0123456789ab 127.0.0.1:9";
    redis
        .query::<()>(
            redis::cmd("SET")
                .arg(&keys[0])
                .arg(taken)
                .arg("PX")
                .arg(60_000),
        )
        .await;
    renewed(&redis, "s-4", 2).await;
    assert_eq!(directory_entry(&redis, "s-3").await.unwrap(), taken);
    on_a.send_text("still A's").await;
    assert_eq!(read_text(&mut on_a).await, "still A's");
}

/// How many times Redis has run `command` (from INFO commandstats).
async fn command_calls(redis: &RedisServer, command: &str) -> u64 {
    let info: String = redis.query(redis::cmd("INFO").arg("commandstats")).await;
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_lease_whose_call_timed_out_is_given_back_after_redis_takes_it() {
    let redis = RedisServer::start().await;
    let mut upstream = Upstream::start().await;
    // A lease left behind would count for node_ttl: far longer than the test waits.
    let config = member_renewing(
        &upstream,
        &redis,
        "edge-a",
        "on_redis_down = \"closed\"",
        60,
    );
    let edge = TestEdge::start(&config.build()).await;
    // The lease script is loaded by a first handshake.
    let carol = connect_user(edge.addr, &mut upstream, "carol").await;
    let (acquired, released) = (
        command_calls(&redis, "evalsha").await,
        command_calls(&redis, "zrem").await,
    );
    // Writes (and scripts) wait for two seconds; pings do not, so the edge keeps Redis up and
    // asks for dora's lease, which times out: 503, and the lease is given back.
    redis
        .query::<()>(redis::cmd("CLIENT").arg("PAUSE").arg(2000).arg("WRITE"))
        .await;
    let refused = refused_user(edge.addr, "dora").await;
    assert_eq!(
        (refused.status, refused.body["error"].as_str()),
        (503, Some("cluster_unavailable"))
    );
    // Redis runs the lease script, then the release, on the same connection: dora holds
    // nothing once both have run.
    eventually(WAIT, "the lease taken and given back", || async {
        command_calls(&redis, "evalsha").await > acquired
            && command_calls(&redis, "zrem").await > released
    })
    .await;
    assert_eq!(
        redis
            .query::<usize>(redis::cmd("ZCARD").arg("wsedge:user:4:acme:4:dora"))
            .await,
        0
    );
    drop(carol);
}
