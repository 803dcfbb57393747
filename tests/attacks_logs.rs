//! The last rows of the attack matrix: after hostile and ordinary traffic of every kind
//! (tokens in each source, good, forged, expired and a megabyte long; WebSocket, HTTP and
//! unrouted requests; a resume), no token and no query string is in the text log, the audit
//! log or the metrics; and values a client or a token chose (a user, a conversation, a
//! request id, a session id, a path) cannot forge a field of a text log line.

mod common;

use common::plain::{HttpClient, HttpUpstream, get};
use common::process::EdgeProcess;
use common::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What would forge a field in a text log line if a value were written raw.
const FORGED: &str = "\" user=\"root\"";

/// The signature and payload segments of a token: either one in a log means the token leaked.
fn secret_parts(token: &str) -> Vec<String> {
    token.split('.').skip(1).map(str::to_owned).collect()
}

/// Sends `request` on a connection of its own and reads what comes back until the edge
/// closes (a head too large may get an answer or only a close).
async fn raw(edge: &EdgeProcess, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(edge.addr).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn no_token_or_query_reaches_a_log_an_audit_line_or_a_metric_and_no_value_forges_a_field() {
    let mut upstream = Upstream::start().await;
    let mut api = HttpUpstream::start("a").await;
    let config = EdgeConfig::new(&upstream.url("/ws/chat"))
        .server("handshake_rate_per_ip = \"off\"")
        .log("level = \"debug\"\naudit = \"{dir}/audit.jsonl\"")
        .policy(r#"token_from = ["query:token", "header", "cookie:session", "subprotocol"]"#)
        .section(&format!(
            "[[route]]\npath = \"/api\"\nmatch = \"prefix\"\nupstream = \"{}\"\nauth = \"main\"\nhttp = \"proxy\"",
            api.url("/api")
        ))
        .route("conversation = \"query-or-token\"\nresume = { window = \"30s\" }");
    let edge = EdgeProcess::start(&config.build(), &[]).await;
    let mut tokens = Vec::new();
    let mut mint = |sub: &str, extra: serde_json::Value| {
        let token = hs256(&claims(sub, extra));
        tokens.push(token.clone());
        token
    };

    // WebSocket: a good token from each source, each with a planted query parameter.
    let query = mint("q-user", json!({}));
    let header = mint("h-user", json!({}));
    let cookie = mint("c-user", json!({}));
    let protocol = mint("p-user", json!({}));
    let forger = mint(&format!("alice{FORGED}"), json!({}));
    let accepted: Vec<(String, Vec<(String, String)>)> = vec![
        (
            format!("/ws/chat?token={query}&planted=PLANTED-1&session_id=s-1"),
            vec![],
        ),
        (
            "/ws/chat?planted=PLANTED-2".into(),
            vec![("Authorization".into(), format!("Bearer {header}"))],
        ),
        (
            "/ws/chat?planted=PLANTED-3".into(),
            vec![("Cookie".into(), format!("theme=dark; session={cookie}"))],
        ),
        (
            "/ws/chat?planted=PLANTED-4".into(),
            vec![(
                "Sec-WebSocket-Protocol".into(),
                format!("chat.v1, bearer.{protocol}"),
            )],
        ),
        // A user, a conversation and a request id that would each forge a field if written
        // raw (printable ASCII: all three pass admission).
        (
            format!(
                "/ws/chat?token={forger}&conversation_id=c1%22%20user=%22root%22&planted=PLANTED-5"
            ),
            vec![("x-request-id".into(), format!("r1{FORGED}"))],
        ),
    ];
    for (path, headers) in &accepted {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        let mut ws = connect_ok(&edge.url(path), &headers).await;
        upstream.next_request().await;
        ws.close(None).await.unwrap();
        // Until the edge's close comes back and the socket ends.
        while let Some(Ok(_)) = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the edge closed in time")
        {}
    }

    // Refused: forged, expired, unsigned and megabyte tokens, a session id that would forge a
    // field, and a request nowhere.
    let mut forged = mint("mallory", json!({}));
    forged.push('x');
    let expired = mint("late", json!({ "exp": now() - 3600 }));
    let unsigned = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        secret_parts(&mint("nobody", json!({})))[0]
    );
    tokens.push(unsigned.clone());
    for token in [&forged, &expired, &unsigned] {
        let refused = connect_refused(
            &edge.url(&format!("/ws/chat?token={token}&planted=PLANTED-6")),
            &[],
        )
        .await;
        assert_eq!(refused.status, 401);
    }
    let refused = connect_refused(
        &edge.url(&format!(
            "/ws/chat?token={query}&session_id=s%22%20user=%22root%22&planted=PLANTED-7"
        )),
        &[],
    )
    .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    let huge = "A".repeat(1 << 20);
    tokens.push(huge.clone());
    let answer = raw(
        &edge,
        format!("GET /ws/chat?token={huge}&planted=PLANTED-8 HTTP/1.1\r\nHost: x\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{answer}"
    );
    let answer = raw(
        &edge,
        format!("GET /nowhere?token={query}&planted=PLANTED-9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    // HTTP: a proxied call with the token in the query, and refused ones.
    let mut client = HttpClient::connect(edge.addr).await;
    let answered = client
        .fetch(get(
            &format!("/api/echo?token={query}&planted=PLANTED-10"),
            &[],
        ))
        .await;
    assert_eq!(answered.status, 200);
    api.next_request().await;
    let refused = client
        .fetch(get(
            "/api/echo?planted=PLANTED-11",
            &[("authorization", &format!("Bearer {forged}"))],
        ))
        .await;
    assert_eq!(refused.status, 401);
    drop(client);

    // Everything has been reported once the five disconnects are in the audit log and the
    // six refusals (three tokens, the session id, nowhere, the HTTP call) in the text log.
    let audit_path = edge.dir.path().join("audit.jsonl");
    eventually(WAIT, "every request reported", || async {
        let audit = std::fs::read_to_string(&audit_path).unwrap_or_default();
        audit.matches("\"event\":\"disconnect\"").count() == 5
            && edge.log().matches(" refused ").count() >= 6
    })
    .await;
    let log = edge.log();
    let audit = std::fs::read_to_string(&audit_path).unwrap();
    let (status, metrics) = http_get(edge.admin.unwrap(), "/metrics").await;
    assert_eq!(status, 200);

    for (name, text) in [("log", &log), ("audit log", &audit), ("metrics", &metrics)] {
        assert!(
            !text.contains("PLANTED"),
            "a query string reached the {name}:\n{text}"
        );
        for token in &tokens {
            for part in secret_parts(token).iter().filter(|part| part.len() > 8) {
                assert!(
                    !text.contains(part.as_str()),
                    "a token reached the {name}:\n{text}"
                );
            }
        }
        assert!(
            !text.contains(&huge[..64]),
            "the megabyte token reached the {name}"
        );
    }
    // Every query the log mentions is the redaction mark.
    for (at, _) in log.match_indices('?') {
        let after = &log[at..];
        let in_a_target = log[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '/');
        assert!(
            !in_a_target || after.starts_with("?<redacted>"),
            "a query reached the log: {}",
            String::from_utf8_lossy(
                &log.as_bytes()[at.saturating_sub(60)..(at + 60).min(log.len())]
            )
        );
    }

    // No value forged a field: each is quoted and escaped, or refused (the session id), or
    // replaced (the request id).
    assert!(
        !log.contains(" user=\"root"),
        "a client's value forged a field of a log line:\n{log}"
    );
    let connected = log
        .lines()
        .find(|line| line.contains("connected") && line.contains("alice"))
        .unwrap_or_else(|| panic!("no connected line for the forging user:\n{log}"));
    assert!(
        connected.contains(r#"user="alice\" user=\"root\"""#),
        "{connected}"
    );
    assert!(
        connected.contains(r#"conversation="c1\" user=\"root\"""#),
        "{connected}"
    );
    assert!(!connected.contains("r1\""), "{connected}");
    assert_eq!(upstream.handshakes_so_far(), 0);
}
