//! Issue 15's attack matrix, the token and identity rows: hostile JWTs, claims that would not
//! reach the upstream byte for byte as headers, forged forwarding headers and request ids.
//! Each row asserts what the client gets and that the upstream saw nothing of a refused one.
//! (Algorithm confusion, `jku`/`jwk` and `aud` lists are in tests/auth.rs and tests/jwks.rs.)

mod common;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::*;
use serde_json::json;

/// A token with this header and payload text, signed with the test secret: the texts are
/// used as written (duplicate keys, odd numbers), not re-serialised.
fn signed_raw(header: &str, payload: &str) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, SECRET.as_bytes());
    let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

fn payload(fields: &str) -> String {
    format!(r#"{{"sub":"alice","exp":{},{fields}}}"#, now() + 3600)
}

#[tokio::test]
async fn hostile_tokens_get_401_and_never_reach_the_upstream() {
    let (mut upstream, edge) = start_edge(|c| c.server("handshake_rate_per_ip = \"off\"")).await;
    let good = signed_raw(HS256, &payload(r#""iat":1"#));
    let unsigned = |alg: &str| {
        let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#));
        let body = URL_SAFE_NO_PAD.encode(payload(r#""iat":1"#));
        format!("{header}.{body}.")
    };
    let (head, rest) = good.split_once('.').unwrap();
    let (body, signature) = rest.split_once('.').unwrap();
    let standard_alphabet = format!(
        "{}.{}.{}",
        STANDARD.encode(HS256),
        STANDARD.encode(payload(r#""pad":"??>>""#)),
        signature
    );
    let nested = format!("{}1{}", "[".repeat(2000), "]".repeat(2000));
    let cases: Vec<(&str, String)> = vec![
        ("alg none", unsigned("none")),
        ("alg None", unsigned("None")),
        ("alg NONE", unsigned("NONE")),
        ("alg nOnE", unsigned("nOnE")),
        ("alg none with the good signature", {
            let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
            format!("{header}.{body}.{signature}")
        }),
        ("thousands of dots", format!("{head}{}", ".".repeat(5000))),
        ("four parts", format!("{good}.{signature}")),
        ("padding", format!("{head}.{body}=.{signature}")),
        ("standard base64 alphabet", standard_alphabet),
        (
            "exp as a string",
            signed_raw(HS256, r#"{"sub":"alice","exp":"9999999999"}"#),
        ),
        (
            "exp negative",
            signed_raw(HS256, r#"{"sub":"alice","exp":-1}"#),
        ),
        (
            "exp 1e300",
            signed_raw(HS256, r#"{"sub":"alice","exp":1e300}"#),
        ),
        (
            "exp past u64",
            signed_raw(HS256, r#"{"sub":"alice","exp":18446744073709551616}"#),
        ),
        (
            "exp a float in the past",
            signed_raw(HS256, r#"{"sub":"alice","exp":1000000000.5}"#),
        ),
        ("no exp", signed_raw(HS256, r#"{"sub":"alice"}"#)),
        ("sub twice", signed_raw(HS256, &payload(r#""sub":"admin""#))),
        (
            "exp twice, the first long past",
            signed_raw(
                HS256,
                &format!(r#"{{"sub":"alice","exp":1,"exp":{}}}"#, now() + 3600),
            ),
        ),
        (
            "exp twice, spelled with an escape",
            signed_raw(
                HS256,
                &format!(r#"{{"sub":"alice","exp":1,"ex\u0070":{}}}"#, now() + 3600),
            ),
        ),
        (
            "deeply nested JSON",
            signed_raw(HS256, &payload(&format!(r#""deep":{nested}"#))),
        ),
        (
            "HS512 claimed, HS256 accepted",
            signed_raw(r#"{"alg":"HS512"}"#, &payload(r#""iat":1"#)),
        ),
        (
            "header not JSON",
            signed_raw("alg=HS256", &payload(r#""iat":1"#)),
        ),
        ("payload an array", signed_raw(HS256, r#"["alice"]"#)),
    ];
    for (what, token) in &cases {
        let refused = connect_refused(
            &edge.url("/ws/chat"),
            &[("Authorization", &format!("Bearer {token}"))],
        )
        .await;
        assert_eq!(refused.status, 401, "{what}: {}", refused.body);
        let error = refused.body["error"].as_str().unwrap_or_default();
        assert!(
            matches!(error, "token_invalid" | "token_expired"),
            "{what}: {}",
            refused.body
        );
        // The same in the query.
        let refused = connect_refused(&edge.url(&format!("/ws/chat?token={token}")), &[]).await;
        assert_eq!(refused.status, 401, "{what} (query): {}", refused.body);
    }
    assert_eq!(
        upstream.handshakes_so_far(),
        0,
        "a refused token reached the upstream"
    );
    // Control: the well-formed token, and a float `exp` in the future (rounded as issuers do).
    let _ws = connect_ok(&edge.url(&format!("/ws/chat?token={good}")), &[]).await;
    upstream.next_request().await;
    let float_exp = signed_raw(
        HS256,
        &format!(r#"{{"sub":"bob","exp":{}.5}}"#, now() + 3600),
    );
    let _ws = connect_ok(&edge.url(&format!("/ws/chat?token={float_exp}")), &[]).await;
    assert_eq!(
        upstream.next_request().await.header("x-user-id"),
        Some("bob")
    );
}

#[tokio::test]
async fn megabyte_tokens_are_refused_at_the_request_head() {
    let (mut upstream, edge) = start_edge(|c| c).await;
    let huge = format!(
        "{}.{}.{}",
        "a".repeat(400_000),
        "b".repeat(400_000),
        "c".repeat(300_000)
    );
    for request in [
        format!(
            "GET /ws/chat?token={huge} HTTP/1.1\r\nHost: edge\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ),
        format!(
            "GET /ws/chat HTTP/1.1\r\nHost: edge\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {huge}\r\n\r\n"
        ),
    ] {
        let status = raw_status(edge.addr, request.as_bytes()).await;
        assert!(
            matches!(status, Some(414 | 431) | None),
            "a 1 MB token got {status:?}"
        );
    }
    assert_eq!(upstream.handshakes_so_far(), 0);
    edge.wait_idle().await;
}

/// Sends `request` raw and reads the status of the answer (`None`: closed without one).
async fn raw_status(addr: std::net::SocketAddr, request: &[u8]) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The edge may answer and close before it has read all of a huge request.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("the edge answered, or closed, in time");
    String::from_utf8_lossy(&answer)
        .get(9..12)
        .and_then(|code| code.parse().ok())
}

#[tokio::test]
async fn identity_values_a_parser_would_not_carry_byte_for_byte_are_refused() {
    let (mut upstream, edge) = start_edge(|c| {
        c.server("handshake_rate_per_ip = \"off\"").route("conversation = \"query-or-token\"")
            .route("inject = { \"x-user-id\" = \"{user}\", \"x-tenant-id\" = \"{tenant}\", \"x-conversation-id\" = \"{conversation}\", \"x-plan\" = \"{claim.plan}\", \"x-plan-team\" = \"{claim.plan}/{claim.team}\" }")
    })
    .await;
    let with = |extra: serde_json::Value| hs256(&claims("alice", extra));
    let cases: Vec<(&str, String, &str, u16)> = vec![
        ("a leading space", token_for(" alice"), "", 401),
        ("a trailing space", token_for("alice "), "", 401),
        ("a tab", token_for("alice\t"), "", 401),
        ("CR LF", token_for("ali\r\nX-Admin: 1"), "", 401),
        ("NUL", token_for("ali\u{0}ce"), "", 401),
        ("non-ASCII", token_for("alicé"), "", 401),
        ("U+2028", token_for("alice\u{2028}"), "", 401),
        ("10 KB", token_for(&"a".repeat(10_000)), "", 401),
        (
            "a padded tenant",
            with(json!({"tenant_id": "acme "})),
            "",
            401,
        ),
        (
            "a claim a template injects, with a line break",
            with(json!({"plan": "pro\r\nx-user-id: root"})),
            "",
            401,
        ),
        (
            "a claim a template injects, with NUL",
            with(json!({"plan": "pro\u{0}"})),
            "",
            401,
        ),
        (
            "a claim a template injects, non-ASCII",
            with(json!({"plan": "pré"})),
            "",
            401,
        ),
        (
            "a claim a template injects, with a tab inside",
            with(json!({"plan": "pro\tplus"})),
            "",
            401,
        ),
        (
            "a claim a template injects, with DEL",
            with(json!({"plan": "pro\u{7f}"})),
            "",
            401,
        ),
        (
            "a claim a template injects, 10 KB",
            with(json!({"plan": "p".repeat(10_000)})),
            "",
            401,
        ),
        (
            "a header a template composes past 1 KiB",
            with(json!({"plan": "p".repeat(600), "team": "t".repeat(600)})),
            "",
            401,
        ),
        (
            "a padded conversation in the query",
            token_for("alice"),
            "&conversation_id=%20c1",
            400,
        ),
        (
            "CR LF in the query's conversation",
            token_for("alice"),
            "&conversation_id=c1%0D%0Ax-user-id:%20root",
            400,
        ),
        (
            "a 10 KB conversation",
            token_for("alice"),
            &*Box::leak(format!("&conversation_id={}", "c".repeat(10_000)).into_boxed_str()),
            400,
        ),
    ];
    for (what, token, query, status) in &cases {
        let refused =
            connect_refused(&edge.url(&format!("/ws/chat?token={token}{query}")), &[]).await;
        assert_eq!(refused.status, *status, "{what}: {}", refused.body);
    }
    assert_eq!(
        upstream.handshakes_so_far(),
        0,
        "a refused identity reached the upstream"
    );
    // Control: spaces inside a value pass, byte for byte, and a rendered header up to 1 KiB.
    let plan = format!("pro {}", "+".repeat(500));
    let token = hs256(&claims(
        "alice",
        json!({"tenant_id": "Acme Corp", "plan": plan, "team": "t".repeat(500)}),
    ));
    let _ws = connect_ok(
        &edge.url(&format!("/ws/chat?token={token}&conversation_id=c-1")),
        &[],
    )
    .await;
    let seen = upstream.next_request().await;
    assert_eq!(seen.header("x-user-id"), Some("alice"));
    assert_eq!(seen.header("x-tenant-id"), Some("Acme Corp"));
    assert_eq!(seen.header("x-plan"), Some(plan.as_str()));
    let composed = format!("{plan}/{}", "t".repeat(500));
    assert_eq!(seen.header("x-plan-team"), Some(composed.as_str()));
    assert_eq!(seen.header("x-conversation-id"), Some("c-1"));
}

#[tokio::test]
async fn a_pinned_tenant_reaches_the_upstream_in_the_routes_spelling() {
    // The per-user cap, sessions and revocations key on the tenant: "ACME" and "acme" are
    // one tenant, and the upstream sees it one way.
    let (mut upstream, edge) = start_edge(|c| c.route("tenant = { pin = \"acme\" }")).await;
    let token = hs256(&claims("alice", json!({"tenant_id": "ACME"})));
    let _ws = connect_ok(&edge.url(&format!("/ws/chat?token={token}")), &[]).await;
    assert_eq!(
        upstream.next_request().await.header("x-tenant-id"),
        Some("acme")
    );
}

#[tokio::test]
async fn forwarding_headers_and_request_ids_from_the_client_are_not_trusted() {
    let (mut upstream, edge) = start_edge(|c| c).await;
    let token = token_for("alice");
    let _ws = connect_ok(
        &edge.url(&format!("/ws/chat?token={token}")),
        &[
            ("X-Forwarded-For", "6.6.6.6"),
            ("X_Forwarded_For", "6.6.6.6"),
            ("X_Real_IP", "6.6.6.6"),
            ("X_Forwarded_Proto", "https"),
            ("Forwarded", "for=6.6.6.6"),
            ("X_Request_Id", "forged"),
            ("X-Request-Id", "id\"with quote"),
        ],
    )
    .await;
    let seen = upstream.next_request().await;
    assert_eq!(
        seen.header_all("x-forwarded-for"),
        vec!["127.0.0.1".to_string()]
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    for spoofed in [
        "x_forwarded_for",
        "x_real_ip",
        "x_forwarded_proto",
        "forwarded",
        "x_request_id",
    ] {
        assert_eq!(seen.header(spoofed), None, "{spoofed} reached the upstream");
    }
    // A request id that could end a log field early is replaced by the edge's own.
    let id = seen.header("x-request-id").unwrap();
    assert!(!id.contains('"') && id.len() == 36, "{id}");
    // A sane one is kept: it ties the client's logs to the upstream's.
    let _ws = connect_ok(
        &edge.url(&format!("/ws/chat?token={token}")),
        &[("X-Request-Id", "trace-01HZX:span/7")],
    )
    .await;
    assert_eq!(
        upstream.next_request().await.header("x-request-id"),
        Some("trace-01HZX:span/7")
    );
}

#[tokio::test]
async fn a_spoofed_forwarding_header_is_neither_the_rate_key_nor_the_audited_client() {
    // Three handshakes a minute from one address, each claiming another with X-Forwarded-For,
    // Forwarded or X-Real-IP: the fourth is refused all the same, and the audit names the
    // address the connection came from.
    let (mut upstream, edge) = start_edge(|c| {
        c.server("handshake_rate_per_ip = { per_second = 0.05, burst = 3 }")
            .log("audit = \"{dir}/audit.jsonl\"")
    })
    .await;
    let url = edge.url(&format!("/ws/chat?token={}", token_for("alice")));
    let spoofs = [
        ("X-Forwarded-For", "10.0.0.1"),
        ("Forwarded", "for=10.0.0.2"),
        ("X-Real-IP", "10.0.0.3"),
    ];
    let mut open = Vec::new();
    for spoof in spoofs {
        open.push(connect_ok(&url, &[spoof]).await);
        upstream.next_request().await;
    }
    let refused = connect_refused(&url, &[("X-Forwarded-For", "10.0.0.4")]).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    let lines = audit_lines(&edge.dir.path().join("audit.jsonl"), 4).await;
    for line in &lines {
        assert_eq!(
            line["client"].as_str().map(|c| c.starts_with("127.0.0.1:")),
            Some(true),
            "{line}"
        );
    }
    assert_eq!(upstream.handshakes_so_far(), 0);
}
