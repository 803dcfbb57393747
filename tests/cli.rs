//! The `wsedge` binary as an operator meets it: `check` with file:line:col diagnostics and exit
//! code 64, `token` minting verifiable JWTs, the edge itself run as a process (real sockets,
//! SIGTERM drain with 1001, no token in the logs), and `demo --once`.

mod common;

use common::process::{EdgeProcess, Run, wsedge};
use common::*;
use futures_util::{SinkExt, StreamExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const UNSET_VAR: &str = "WSEDGE_TEST_UNSET_VAR_XYZ";

// ---------------------------------------------------------------------------------------------
// Helpers

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// A scratch folder holding `jwt.key` (the harness's SECRET) and configs written into it.
fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    // A trailing newline, as `echo` writes it: the secret is the line without it.
    std::fs::write(dir.path().join("jwt.key"), format!("{SECRET}\n")).unwrap();
    dir
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The secret in `jwt.key`, read relative to the config's folder.
const SECRET_FILE: &str = "algorithms = [\"HS256\"]\nsecret = { file = \"jwt.key\" }";

/// A config that validates: HS256 with the secret in `jwt.key` next to the config, tokens from
/// the header or the query. The check tests add the one key they are about.
fn valid_config() -> EdgeConfig {
    EdgeConfig::new("ws://127.0.0.1:9/ws/chat")
        .keys(SECRET_FILE)
        .policy("token_from = [\"header\", \"query:token\"]")
}

/// `wsedge check` on `text` (written into a scratch folder with `jwt.key`).
fn check(text: &str) -> (Run, PathBuf, tempfile::TempDir) {
    let dir = scratch();
    let config = write_config(dir.path(), "proxy.toml", text);
    let run = wsedge(&["check", "--config", path_str(&config)])
        .env_remove(UNSET_VAR)
        .run_blocking();
    (run, config, dir)
}

/// The 1-based line and column (in characters) where `needle` starts; it must occur once.
fn position_of(text: &str, needle: &str) -> (usize, usize) {
    let offset = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} is not in the config:\n{text}"));
    assert_eq!(
        text.matches(needle).count(),
        1,
        "{needle:?} occurs more than once in the config"
    );
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Runs `wsedge check` on `config` and asserts exit code 64 and a first diagnostic that starts
/// with `FILE:LINE:COL: ` for the place where `at` starts, and that mentions `mentions`.
fn assert_check_refuses(config: EdgeConfig, at: &str, mentions: &str) {
    let text = config.build();
    let (run, config, _dir) = check(&text);
    assert_eq!(
        run.code(),
        Some(64),
        "check should exit with 64\nstdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        !run.stdout.contains("ok"),
        "a refused config printed {:?}",
        run.stdout
    );
    let (line, column) = position_of(&text, at);
    let prefix = format!("{}:{line}:{column}: ", config.display());
    let first = run.stderr.lines().next().unwrap_or("");
    assert!(
        first.starts_with(&prefix),
        "expected the first stderr line to start with {prefix:?} (at {at:?}), got:\n{}",
        run.stderr
    );
    assert!(
        first.contains(mentions),
        "expected the diagnostic to mention {mentions:?}, got:\n{}",
        run.stderr
    );
}

/// Decodes and verifies a token (signature, algorithm, exp) and returns its claims.
fn verify(
    token: &str,
    alg: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::DecodingKey,
) -> serde_json::Map<String, serde_json::Value> {
    let mut validation = jsonwebtoken::Validation::new(alg);
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "sub"]);
    match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
        token,
        key,
        &validation,
    ) {
        Ok(data) => {
            assert_eq!(data.header.alg, alg);
            data.claims
        }
        Err(error) => panic!("token {token:?} does not verify: {error}"),
    }
}

fn assert_identity_claims(claims: &serde_json::Map<String, serde_json::Value>, ttl: u64) {
    assert_eq!(claims["sub"], "alice", "{claims:?}");
    assert_eq!(claims["tenant_id"], "acme", "{claims:?}");
    assert_eq!(claims["conversation_id"], "c42", "{claims:?}");
    let exp = claims["exp"].as_u64().expect("exp is a number");
    let expected = now() + ttl;
    assert!(
        exp.abs_diff(expected) <= 5,
        "exp {exp} should be about now + {ttl}s = {expected}"
    );
}

/// The single line `wsedge token` printed, checked to look like a compact JWT.
fn printed_token(run: &Run) -> String {
    assert_eq!(
        run.code(),
        Some(0),
        "token should succeed\nstdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    let token = run.stdout.trim().to_owned();
    assert_eq!(
        token.split('.').count(),
        3,
        "stdout should be one JWT, got {:?}",
        run.stdout
    );
    token
}

/// Whether `word` occurs in `text` as a word of its own (so "disconnected" is not "connected").
fn contains_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

/// Reads until a close frame and returns it (pings and pongs skipped), failing after `WAIT`.
async fn expect_close(ws: &mut Client) -> Option<(CloseCode, String)> {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no close frame in time")
            .expect("the connection ended without a close frame")
            .expect("the connection failed before a close frame");
        match message {
            Message::Close(frame) => return frame.map(|f| (f.code, f.reason.to_string())),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Lets tungstenite send its close reply and see the connection end.
async fn finish_close(ws: &mut Client) {
    let _ = tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

// ---------------------------------------------------------------------------------------------
// wsedge check

#[test]
fn check_accepts_a_valid_config_with_a_secret_file() {
    let (run, _, _dir) = check(&valid_config().build());
    assert_eq!(
        run.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(contains_word(&run.stdout, "ok"), "stdout: {:?}", run.stdout);
    assert!(
        !run.stderr.contains("inline"),
        "a secret file must not be warned about as inline: {}",
        run.stderr
    );
}

#[test]
fn check_resolves_a_relative_secret_file_against_the_config_folder_not_the_cwd() {
    let dir = scratch();
    let config = write_config(dir.path(), "proxy.toml", &valid_config().build());
    // Run from a folder without jwt.key: the file must be found next to the config.
    let elsewhere = tempfile::tempdir().unwrap();
    let run = wsedge(&["check", "--config", path_str(&config)])
        .current_dir(elsewhere.path())
        .run_blocking();
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
}

#[test]
fn check_reports_a_toml_syntax_error_where_it_is() {
    // A doubled `=`: the error is at the second one.
    let config = valid_config().server("drain_timeout = = \"5s\"");
    assert_check_refuses(config, "= \"5s\"", "=");
}

#[test]
fn check_reports_an_unknown_key_where_it_is() {
    let config = valid_config().route("colour = \"blue\"");
    assert_check_refuses(config, "colour = \"blue\"", "colour");
}

#[test]
fn check_reports_a_wrong_type_at_the_value() {
    let config = valid_config().server("max_connections = \"many\"");
    assert_check_refuses(config, "\"many\"", "");
}

#[test]
fn check_reports_a_bad_duration_at_the_value() {
    let config = valid_config().server("handshake_timeout = \"10 parsecs\"");
    assert_check_refuses(config, "\"10 parsecs\"", "10 parsecs");
}

#[test]
fn check_reports_a_bad_size_at_the_value() {
    let config = valid_config().route("max_message_size = \"1 parsec\"");
    assert_check_refuses(config, "\"1 parsec\"", "1 parsec");
}

#[test]
fn check_reports_a_missing_secret_file_at_the_secret() {
    let config =
        valid_config().keys("algorithms = [\"HS256\"]\nsecret = { file = \"missing.key\" }");
    assert_check_refuses(config, "{ file = \"missing.key\" }", "missing.key");
}

#[test]
fn check_reports_a_route_naming_an_unknown_policy_at_the_name() {
    assert_check_refuses(valid_config().auth("nope"), "\"nope\"", "nope");
}

#[test]
fn check_reports_an_unset_secret_variable_at_the_secret() {
    let secret = format!("{{ env = \"{UNSET_VAR}\" }}");
    let config = valid_config().keys(&format!("algorithms = [\"HS256\"]\nsecret = {secret}"));
    assert_check_refuses(config, &secret, UNSET_VAR);
}

#[test]
fn check_reads_a_secret_from_a_set_variable() {
    let dir = scratch();
    let text = valid_config()
        .keys("algorithms = [\"HS256\"]\nsecret = { env = \"WSEDGE_TEST_SET_VAR_XYZ\" }")
        .build();
    let config = write_config(dir.path(), "proxy.toml", &text);
    let run = wsedge(&["check", "--config", path_str(&config)])
        .env("WSEDGE_TEST_SET_VAR_XYZ", SECRET)
        .run_blocking();
    assert_eq!(run.code(), Some(0), "stderr:\n{}", run.stderr);
}

#[test]
fn check_passes_an_inline_secret_with_a_located_warning() {
    let text = valid_config()
        .keys(&format!("algorithms = [\"HS256\"]\nsecret = \"{SECRET}\""))
        .build();
    let (run, config, _dir) = check(&text);
    assert_eq!(
        run.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(contains_word(&run.stdout, "ok"), "stdout: {:?}", run.stdout);
    let (line, column) = position_of(&text, &format!("\"{SECRET}\""));
    let warning = run
        .stderr
        .lines()
        .find(|l| l.contains("inline"))
        .unwrap_or_else(|| panic!("no warning mentions \"inline\":\n{}", run.stderr));
    assert!(
        warning.starts_with(&format!("{}:{line}:{column}: warning", config.display())),
        "{warning}"
    );
    assert!(
        !run.stderr.contains(SECRET) && !run.stdout.contains(SECRET),
        "the secret itself must not be printed"
    );
}

// ---------------------------------------------------------------------------------------------
// wsedge token

/// `wsedge token` with the identity the checks below expect.
const IDENTITY: [&str; 8] = [
    "--sub",
    "alice",
    "--tenant",
    "acme",
    "--conversation",
    "c42",
    "--ttl",
    "10m",
];

fn token_args<'a>(config: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["token", "--config", config];
    args.extend(extra);
    args
}

#[test]
fn token_mints_a_verifiable_hs256_jwt_with_the_identity_and_ttl() {
    let dir = scratch();
    let config = write_config(dir.path(), "proxy.toml", &valid_config().build());
    let run = wsedge(&token_args(path_str(&config), &IDENTITY)).run_blocking();
    let token = printed_token(&run);
    let claims = verify(
        &token,
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
    );
    assert_identity_claims(&claims, 600);
}

#[tokio::test]
async fn token_prints_the_signed_query_of_an_hmac_policy_and_the_edge_takes_it() {
    let mut upstream = Upstream::start().await;
    let text = EdgeConfig::new(&upstream.url("/ws/chat"))
        .auth("signed")
        .section(
            "[auth.signed]\nkind = \"hmac\"\nsecret = \"signing-secret-for-connection-params\"\nmax_ttl = \"1h\"",
        )
        .route("conversation = \"query-or-token\"")
        .build();
    let dir = scratch();
    let config = write_config(dir.path(), "proxy.toml", &text);
    let args = [
        "--auth",
        "signed",
        "--sub",
        "alice",
        "--conversation",
        "c42",
        "--ttl",
        "10m",
    ];
    let run = wsedge(&token_args(path_str(&config), &args)).run().await;
    assert_eq!(run.code(), Some(0), "{}", run.stderr);
    let query = run.stdout.trim().to_owned();
    assert!(
        query.starts_with("user_id=alice&conversation_id=c42&expires="),
        "{query}"
    );
    let edge = TestEdge::start(&text).await;
    let _ws = connect_ok(&edge.url(&format!("/ws/chat?{query}")), &[]).await;
    let seen = upstream.next_request().await;
    assert_eq!(seen.header("x-user-id"), Some("alice"));
    assert_eq!(seen.header("x-conversation-id"), Some("c42"));
    // Longer than the policy lets a signature live: refused, with the reason.
    let too_long = ["--auth", "signed", "--sub", "alice", "--ttl", "2h"];
    let run = wsedge(&token_args(path_str(&config), &too_long))
        .run()
        .await;
    assert_ne!(run.code(), Some(0));
    assert!(run.stderr.contains("max_ttl"), "{}", run.stderr);
}

#[test]
fn token_is_refused_by_another_secret() {
    let dir = scratch();
    let config = write_config(dir.path(), "proxy.toml", &valid_config().build());
    let run = wsedge(&token_args(path_str(&config), &["--sub", "alice"])).run_blocking();
    let token = printed_token(&run);
    let validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    let other = jsonwebtoken::DecodingKey::from_secret(b"another-secret-0123456789abcdef-0123");
    assert!(
        jsonwebtoken::decode::<serde_json::Value>(&token, &other, &validation).is_err(),
        "a token must only verify with the configured secret"
    );
}

fn check_asymmetric_token(
    rcgen_alg: &'static rcgen::SignatureAlgorithm,
    algorithm: &str,
    jwt_alg: jsonwebtoken::Algorithm,
    decoding_key: fn(&[u8]) -> jsonwebtoken::errors::Result<jsonwebtoken::DecodingKey>,
) {
    let dir = scratch();
    let (private_pem, public_pem) = key_pair(rcgen_alg);
    std::fs::write(dir.path().join("pub.pem"), &public_pem).unwrap();
    let private_path = dir.path().join("priv.pem");
    std::fs::write(&private_path, &private_pem).unwrap();
    let keys = format!("algorithms = [\"{algorithm}\"]\npublic_key = {{ file = \"pub.pem\" }}");
    let text = valid_config().keys(&keys).build();
    let config = write_config(dir.path(), "proxy.toml", &text);

    let check = wsedge(&["check", "--config", path_str(&config)]).run_blocking();
    assert_eq!(check.code(), Some(0), "stderr:\n{}", check.stderr);

    let without_key = wsedge(&token_args(path_str(&config), &IDENTITY)).run_blocking();
    assert_ne!(
        without_key.code(),
        Some(0),
        "{algorithm} without --key should fail, printed {:?}",
        without_key.stdout
    );
    assert!(
        without_key.stderr.contains("--key"),
        "the failure should mention --key: {}",
        without_key.stderr
    );
    assert!(
        without_key.stdout.trim().is_empty(),
        "no token should be printed: {:?}",
        without_key.stdout
    );

    let mut args = token_args(path_str(&config), &IDENTITY);
    args.extend(["--key", path_str(&private_path), "--kid", "2026-12"]);
    let with_key = wsedge(&args).run_blocking();
    let token = printed_token(&with_key);
    let key = decoding_key(public_pem.as_bytes()).unwrap();
    let claims = verify(&token, jwt_alg, &key);
    assert_identity_claims(&claims, 600);
    // The key id a policy with a JWK set chooses its key by.
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.kid.as_deref(), Some("2026-12"));
}

#[test]
fn token_signs_eddsa_with_a_private_key_and_demands_key_without_one() {
    check_asymmetric_token(
        &rcgen::PKCS_ED25519,
        "EdDSA",
        jsonwebtoken::Algorithm::EdDSA,
        jsonwebtoken::DecodingKey::from_ed_pem,
    );
}

#[test]
fn token_signs_es256_with_a_private_key_and_demands_key_without_one() {
    check_asymmetric_token(
        &rcgen::PKCS_ECDSA_P256_SHA256,
        "ES256",
        jsonwebtoken::Algorithm::ES256,
        jsonwebtoken::DecodingKey::from_ec_pem,
    );
}

// ---------------------------------------------------------------------------------------------
// Running the edge

#[tokio::test(flavor = "multi_thread")]
async fn the_edge_serves_query_and_header_tokens_then_drains_with_1001_on_sigterm() {
    let mut upstream = Upstream::start().await;
    let dir = scratch();
    // The key file by its full path: the edge runs from a folder of its own.
    let key_file = dir.path().join("jwt.key");
    let keys = format!(
        "algorithms = [\"HS256\"]\nsecret = {{ file = \"{}\" }}",
        path_str(&key_file)
    );
    let text = EdgeConfig::new(&upstream.url("/ws/chat"))
        .server("drain_timeout = \"5s\"")
        .keys(&keys)
        .policy("token_from = [\"header\", \"query:token\"]")
        .build();
    let config = write_config(dir.path(), "proxy.toml", &text);
    let minted = wsedge(&token_args(path_str(&config), &IDENTITY))
        .run()
        .await;
    let token = printed_token(&minted);

    let mut edge = EdgeProcess::start(&text, &[("RUST_LOG", "debug")]).await;

    let base = edge.url("/ws/chat");
    let mut by_query = connect_ok(&format!("{base}?token={token}"), &[]).await;
    let seen = upstream.next_request().await;
    assert_eq!(seen.header("x-user-id"), Some("alice"));
    assert_eq!(seen.header("x-tenant-id"), Some("acme"));
    assert_eq!(seen.header("x-conversation-id"), Some("c42"));
    assert!(
        !seen.target.contains(&token),
        "the token went upstream: {}",
        seen.target
    );
    by_query
        .send(Message::text("hello by query"))
        .await
        .unwrap();
    assert_eq!(next_text(&mut by_query).await, "hello by query");

    let bearer = format!("Bearer {token}");
    let mut by_header = connect_ok(&base, &[("Authorization", &bearer)]).await;
    let seen = upstream.next_request().await;
    assert_eq!(seen.header("x-user-id"), Some("alice"));
    assert_eq!(
        seen.header("authorization"),
        None,
        "the Authorization header went upstream"
    );
    by_header
        .send(Message::text("hello by header"))
        .await
        .unwrap();
    assert_eq!(next_text(&mut by_header).await, "hello by header");

    edge.signal("TERM");
    for (name, ws) in [("query", &mut by_query), ("header", &mut by_header)] {
        let close = expect_close(ws).await;
        let (code, _reason) =
            close.unwrap_or_else(|| panic!("{name} client: close frame without a code"));
        assert_eq!(
            code,
            CloseCode::Away,
            "{name} client: expected 1001 going away"
        );
        finish_close(ws).await;
    }

    let status = edge.wait_exit(WAIT).await;
    let logged = edge.log();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}; log:\n{logged}"
    );
    assert!(
        !logged.contains(&token),
        "the token appears in the log:\n{logged}"
    );
    let signature = token.rsplit('.').next().unwrap();
    assert!(
        !logged.contains(signature),
        "the token's signature appears in the log:\n{logged}"
    );
    assert!(
        contains_word(&logged, "connected"),
        "the log should record the connections (\"connected\"):\n{logged}"
    );
}

// ---------------------------------------------------------------------------------------------
// wsedge demo

#[test]
fn demo_once_runs_end_to_end_and_exits_0() {
    let run = wsedge(&["demo", "--once", "--port", "0", "--page-port", "0"])
        .timeout(Duration::from_secs(60))
        .run_blocking();
    assert_eq!(
        run.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stdout.contains("refused with 401"),
        "stdout:\n{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("x-user-id=alice"),
        "stdout:\n{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains("x-user-id=mallory"),
        "the forged identity must not reach the core:\n{}",
        run.stdout
    );
    // The answer survives the connection cut in the middle of it.
    assert!(
        run.stdout
            .contains("every word once, in order; the chat core saw 1 connection"),
        "stdout:\n{}",
        run.stdout
    );
    // The HTTP half: a REST call carries the identity and no token, an SSE stream arrives whole.
    assert!(
        run.stdout.contains("GET /api/whoami -> 200")
            && run
                .stdout
                .contains("the chat core saw user=alice tenant=acme, no token"),
        "stdout:\n{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("GET /api/stream -> 200")
            && run.stdout.contains("every event once, in order"),
        "stdout:\n{}",
        run.stdout
    );
}

#[test]
fn the_shipped_reference_config_validates() {
    let reference = concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml");
    let run = wsedge(&["check", "--config", reference]).run_blocking();
    assert!(
        run.status.success(),
        "proxy.toml does not validate:\n{}",
        run.stderr
    );
    assert!(
        run.stdout.contains("ok (1 route, 1 auth policy)"),
        "{}",
        run.stdout
    );
    // The only remark is the development secret, which the file's comments explain.
    let warnings: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("warning"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("inline"), "{warnings:?}");
}

#[tokio::test]
async fn a_port_another_process_holds_is_an_error_not_a_shared_port() {
    // The edge's own sockets share their port between its workers (SO_REUSEPORT); a port
    // someone else holds must still be refused, not shared with them.
    // Held the way a second wsedge would hold it: with SO_REUSEPORT too.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseport(true).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let held = socket.listen(16).unwrap();
    let port = held.local_addr().unwrap().port();
    let dir = scratch();
    let text = valid_config()
        .listen(&format!("127.0.0.1:{port}"))
        .without_admin()
        .build();
    let config = write_config(dir.path(), "proxy.toml", &text);
    let run = wsedge(&["--config", path_str(&config)]).run().await;
    drop(held);
    assert!(!run.status.success(), "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn a_claim_or_a_path_cannot_forge_a_log_line() {
    // The line breaks a header or a path can carry (U+2028, NEL) must not reach the log raw:
    // a log reader may split on them, and what follows would read as a line of its own.
    // A claim carrying one is refused (an identity must reach the upstream byte for byte);
    // a path carrying one is logged quoted and escaped.
    let mut upstream = Upstream::start().await;
    let text = EdgeConfig::new(&upstream.url("/ws/chat")).build();
    let edge = EdgeProcess::start(&text, &[]).await;
    let sub = "mallory\u{2028}INFO wsedge: connected user=root\u{85}x";
    let token = hs256(&claims(sub, serde_json::json!({})));
    let refused = connect_refused(&edge.url(&format!("/ws/chat?token={token}")), &[]).await;
    assert_eq!(refused.status, 401);
    let mut stream = tokio::net::TcpStream::connect(edge.addr).await.unwrap();
    let request = "GET /ws/chat\u{2028}INFO\u{85}x\"y HTTP/1.1\r\nHost: edge\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut answer),
    )
    .await;
    assert!(
        answer.starts_with(b"HTTP/1.1 4"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    edge.wait_log("INFO\\u{85}").await;
    let log = edge.log();
    assert!(
        !log.contains('\u{2028}') && !log.contains('\u{85}'),
        "a line break from a client reached the log raw:\n{log}"
    );
    assert_eq!(upstream.handshakes_so_far(), 0);
}
