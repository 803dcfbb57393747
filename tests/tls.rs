//! TLS on both legs: wss:// clients terminated by the edge (TLS 1.2 and 1.3, ALPN http/1.1),
//! and wss:// upstreams verified against the route's CA.

mod common;

use std::sync::Arc;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;

fn tls_edge_config(upstream: &str) -> String {
    EdgeConfig::new(upstream)
        .server("tls = { cert = \"edge.crt\", key = \"edge.key\" }")
        .build()
}

async fn wss_connect(
    edge: &TestEdge,
    client_config: Arc<rustls::ClientConfig>,
    path: &str,
) -> (
    WebSocketStream<TlsStream<TcpStream>>,
    Option<Vec<u8>>,
    rustls::ProtocolVersion,
) {
    let tcp = TcpStream::connect(edge.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = TlsConnector::from(client_config)
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the edge");
    let (_, session) = tls.get_ref();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let version = session.protocol_version().unwrap();
    let request = http::Request::builder()
        .uri(format!("wss://localhost{path}"))
        .header("Host", "localhost")
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", generate_key())
        .body(())
        .unwrap();
    let (ws, _) = tokio_tungstenite::client_async(request, tls)
        .await
        .expect("WebSocket over TLS");
    (ws, alpn, version)
}

fn client_config(
    ca: &TestCa,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

#[tokio::test]
async fn wss_clients_are_terminated_with_tls_1_2_and_1_3() {
    let mut upstream = Upstream::start().await;
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    ca.write(dir.path(), "edge", &["localhost"]);
    let edge = TestEdge::start_in(&tls_edge_config(&upstream.url("/ws/chat")), dir).await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let path = format!("/ws/chat?token={}", token_for("alice"));
        let (mut ws, alpn, negotiated) =
            wss_connect(&edge, client_config(&ca, version), &path).await;
        assert_eq!(negotiated, version.version);
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        ws.send(Message::text("over tls")).await.unwrap();
        let echoed = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text("over tls"));
        let seen = upstream.next_request().await;
        assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
        assert_eq!(seen.header("x-user-id"), Some("alice"));
        ws.close(None).await.unwrap();
    }
    edge.wait_idle().await;
}

#[tokio::test]
async fn a_plaintext_client_on_a_tls_listener_never_gets_an_upgrade() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::start().await;
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    ca.write(dir.path(), "edge", &["localhost"]);
    let edge = TestEdge::start_in(&tls_edge_config(&upstream.url("/ws/chat")), dir).await;
    let mut tcp = TcpStream::connect(edge.addr).await.unwrap();
    let request = format!(
        "GET /ws/chat?token={} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {}\r\n\r\n",
        token_for("alice"),
        generate_key()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    // The edge answers with a TLS alert (or nothing) and closes: never a 101, never a hang.
    let mut received = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut received))
        .await
        .expect("the edge must close a plaintext connection on a TLS listener")
        .ok();
    assert!(!received.starts_with(b"HTTP/1.1 101"));
    assert_eq!(edge.handle.stats().accepted(), 0);
}

#[tokio::test]
async fn wss_upstreams_are_verified_against_the_route_ca() {
    let ca = TestCa::new();
    let mut upstream =
        Upstream::start_with(UpstreamMode::Normal, Some(ca.server_config(&["127.0.0.1"]))).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("upstream-ca.pem"), &ca.ca_pem).unwrap();
    let url = format!("wss://{}/ws/chat", upstream.addr);
    let edge = TestEdge::start_in(
        &EdgeConfig::new(&url)
            .route(r#"upstream_tls = { ca = "upstream-ca.pem" }"#)
            .build(),
        dir,
    )
    .await;
    let mut ws = connect_ok(
        &edge.url(&format!("/ws/chat?token={}", token_for("alice"))),
        &[],
    )
    .await;
    assert_eq!(
        upstream.next_request().await.header("x-user-id"),
        Some("alice")
    );
    ws.send(Message::text("to a wss core")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "to a wss core");
    ws.close(None).await.unwrap();
    edge.wait_idle().await;
}

#[tokio::test]
async fn a_wss_upstream_with_an_untrusted_certificate_is_502() {
    let ca = TestCa::new();
    let upstream =
        Upstream::start_with(UpstreamMode::Normal, Some(ca.server_config(&["127.0.0.1"]))).await;
    let other_ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("other-ca.pem"), &other_ca.ca_pem).unwrap();
    let url = format!("wss://{}/ws/chat", upstream.addr);
    let edge = TestEdge::start_in(
        &EdgeConfig::new(&url)
            .route(r#"upstream_tls = { ca = "other-ca.pem" }"#)
            .build(),
        dir,
    )
    .await;
    let refused = connect_refused(
        &edge.url(&format!("/ws/chat?token={}", token_for("alice"))),
        &[],
    )
    .await;
    assert_eq!(refused.status, 502);
}

/// Connects with TLS to the edge with this SNI name, trusting only `ca`; true when the
/// certificate the edge chose verifies.
async fn tls_accepted(edge: &TestEdge, ca: &TestCa, name: &str) -> bool {
    let tcp = TcpStream::connect(edge.addr).await.unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    TlsConnector::from(ca.client_config())
        .connect(server_name, tcp)
        .await
        .is_ok()
}

#[tokio::test]
async fn several_certificates_are_chosen_by_sni() {
    let upstream = Upstream::start().await;
    // Two names, each with a certificate from its own CA: a client trusting only one CA
    // completes TLS only if the edge chose that name's certificate.
    let (chat_ca, admin_ca) = (TestCa::new(), TestCa::new());
    let dir = tempfile::tempdir().unwrap();
    chat_ca.write(dir.path(), "chat", &["chat.example.com"]);
    admin_ca.write(dir.path(), "admin", &["admin.example.com"]);
    let config = EdgeConfig::new(&upstream.url("/ws/chat"))
        .server("tls = [{ cert = \"chat.crt\", key = \"chat.key\" }, { cert = \"admin.crt\", key = \"admin.key\" }]")
        .build();
    let edge = TestEdge::start_in(&config, dir).await;
    assert!(tls_accepted(&edge, &chat_ca, "chat.example.com").await);
    assert!(tls_accepted(&edge, &admin_ca, "admin.example.com").await);
    assert!(
        !tls_accepted(&edge, &admin_ca, "chat.example.com").await,
        "the admin certificate was served for chat"
    );
    assert!(
        !tls_accepted(&edge, &chat_ca, "admin.example.com").await,
        "the chat certificate was served for admin"
    );
}
