//! Issue 15's attack matrix, the frame and abuse rows: whatever a client does wrong on the
//! wire, it gets the close code RFC 6455 names, the upstream gets a real close frame, and the
//! audit log says what happened; the edge masks what it sends upstream with keys of its own;
//! one address cannot take every pending-handshake slot, flood pings, or cut a message into
//! thousands of fragments at another client's expense.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// A frame as a raw test client writes it: masked with `key`, the length as given.
fn frame(first: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut out = vec![first];
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

const KEY: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// `len` letters, a to z over and over.
fn letters(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

/// A text message of `text`, a fragment a byte.
fn one_byte_fragments(text: &[u8]) -> Vec<u8> {
    let mut fragments = Vec::with_capacity(text.len() * 7);
    for (i, byte) in text.iter().enumerate() {
        let first = match (i, i == text.len() - 1) {
            (0, _) => 0x01,
            (_, true) => 0x80,
            _ => 0x00,
        };
        fragments.extend(frame(first, &[*byte], KEY));
    }
    fragments
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    payload
}

#[tokio::test]
async fn every_client_violation_gets_its_close_code_and_the_upstream_a_close_frame() {
    let (mut upstream, edge) = start_edge(|c| {
        c.server("handshake_rate_per_ip = \"off\"")
            .log("audit = \"{dir}/audit.jsonl\"")
    })
    .await;
    let token = token_for("alice");
    let mut long_header_ping = vec![0x89, 0x80 | 126, 0, 126];
    long_header_ping.extend_from_slice(&KEY);
    long_header_ping.extend_from_slice(&[0; 126]);
    let mut huge_length = vec![0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 0];
    huge_length.extend_from_slice(&KEY);
    let mut not_minimal = vec![0x81, 0x80 | 126, 0, 5];
    not_minimal.extend_from_slice(&KEY);
    not_minimal.extend(b"hello".iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "unmasked",
            vec![0x81, 0x02, b'h', b'i'],
            1002,
            "unmasked client frame",
        ),
        ("RSV1", frame(0xc1, b"x", KEY), 1002, "reserved bits set"),
        ("RSV3", frame(0x91, b"x", KEY), 1002, "reserved bits set"),
        ("opcode 3", frame(0x83, b"", KEY), 1002, "reserved opcode"),
        ("opcode 0xB", frame(0x8b, b"", KEY), 1002, "reserved opcode"),
        (
            "a 126-byte ping",
            long_header_ping,
            1002,
            "control frame too long",
        ),
        (
            "a fragmented ping",
            frame(0x09, b"", KEY),
            1002,
            "fragmented control frame",
        ),
        (
            "a 2^63 length",
            huge_length,
            1002,
            "frame length out of range",
        ),
        (
            "a length not minimal",
            not_minimal,
            1002,
            "length not minimally encoded",
        ),
        (
            "a continuation first",
            frame(0x80, b"x", KEY),
            1002,
            "continuation without a message",
        ),
        ("invalid UTF-8", frame(0x81, b"a\xffb", KEY), 1007, ""),
        (
            "invalid UTF-8 across fragments",
            [frame(0x01, b"a\xe2\x82", KEY), frame(0x80, b"(", KEY)].concat(),
            1007,
            "",
        ),
        (
            "close reason not UTF-8",
            frame(0x88, &close_payload(1000, b"\xff"), KEY),
            1007,
            "",
        ),
        (
            "close code 1005",
            frame(0x88, &close_payload(1005, b""), KEY),
            1002,
            "invalid close code",
        ),
        (
            "close code 1006",
            frame(0x88, &close_payload(1006, b""), KEY),
            1002,
            "invalid close code",
        ),
        (
            "close code 999",
            frame(0x88, &close_payload(999, b""), KEY),
            1002,
            "invalid close code",
        ),
        (
            "close code 5000",
            frame(0x88, &close_payload(5000, b""), KEY),
            1002,
            "invalid close code",
        ),
        ("a one-byte close", frame(0x88, &[3], KEY), 1002, ""),
        ("RSV2", frame(0xa1, b"x", KEY), 1002, "reserved bits set"),
        (
            "a 126-byte close",
            frame(0x88, &close_payload(1000, &[b'a'; 124]), KEY),
            1002,
            "control frame too long",
        ),
        (
            "a fragmented close",
            frame(0x08, &close_payload(1000, b""), KEY),
            1002,
            "fragmented control frame",
        ),
    ];
    // Every other reserved opcode, data (4-7) and control (0xC-0xF).
    let mut cases = cases;
    for opcode in [4u8, 5, 6, 7, 0xc, 0xd, 0xe, 0xf] {
        let what: &str = Box::leak(format!("opcode {opcode:#x}").into_boxed_str());
        cases.push((
            what,
            frame(0x80 | opcode, b"", KEY),
            1002,
            "reserved opcode",
        ));
    }
    for (i, (what, bytes, code, _)) in cases.iter().enumerate() {
        let id = format!("case-{i}");
        let mut client = RawClient::connect(
            edge.addr,
            &format!("/ws/chat?token={token}"),
            &[("X-Request-Id", &id)],
        )
        .await;
        upstream.next_request().await;
        client.send_raw(bytes).await;
        assert_eq!(client.read_close_code().await, Some(*code), "{what}");
        let close = upstream.next_close().await;
        assert_eq!(
            close.map(|(code, _)| code),
            Some(1001),
            "{what}: the upstream's close"
        );
    }
    // The audit log names each violation.
    let lines = audit_lines(&edge.dir.path().join("audit.jsonl"), 2 * cases.len()).await;
    for (i, (what, _, code, detail)) in cases.iter().enumerate() {
        let id = format!("case-{i}");
        let disconnect = lines
            .iter()
            .find(|line| line["event"] == "disconnect" && line["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("{what}: no disconnect line"));
        assert_eq!(disconnect["client_close"], *code, "{what}");
        let reason = disconnect["reason"].as_str().unwrap_or_default();
        if *code == 1007 {
            assert_eq!(reason, "client sent invalid UTF-8", "{what}");
        } else {
            assert_eq!(reason, "client protocol error", "{what}");
        }
        if !detail.is_empty() {
            assert_eq!(disconnect["detail"], *detail, "{what}");
        }
    }
    edge.wait_idle().await;
}

/// A WebSocket server written by hand, to see the frames the edge sends as bytes: each frame
/// it reads is reported as (first header byte, masking key, unmasked payload).
async fn raw_upstream() -> (SocketAddr, mpsc::Receiver<(u8, Option<[u8; 4]>, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buffer = Vec::new();
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buffer.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
        let key = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| value.trim().to_owned())
            })
            .unwrap();
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        );
        stream.write_all(answer.as_bytes()).await.unwrap();
        buffer.drain(..head_end);
        loop {
            while let Some((first, key, payload, used)) = parse(&buffer) {
                buffer.drain(..used);
                if tx.send((first, key, payload)).await.is_err() {
                    return;
                }
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
    });
    (addr, rx)
}

#[allow(clippy::type_complexity)]
fn parse(bytes: &[u8]) -> Option<(u8, Option<[u8; 4]>, Vec<u8>, usize)> {
    let (&first, &second) = (bytes.first()?, bytes.get(1)?);
    let (len, mut at) = match second & 0x7f {
        126 => (
            u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let key = if second & 0x80 != 0 {
        let key: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    let mut payload = bytes.get(at..at + len)?.to_vec();
    if let Some(key) = key {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Some((first, key, payload, at + len))
}

#[tokio::test]
async fn frames_go_upstream_masked_with_the_edges_own_keys() {
    // RFC 6455 §5.3: a client that chose the masking key would choose the bytes on the edge's
    // network to the upstream (a key of zeros sends the payload as it is).
    let (upstream_addr, mut seen) = raw_upstream().await;
    let config = EdgeConfig::new(&format!("ws://{upstream_addr}/ws/chat"));
    let edge = TestEdge::start(&config.build()).await;
    let mut client = RawClient::connect(
        edge.addr,
        &format!("/ws/chat?token={}", token_for("alice")),
        &[],
    )
    .await;
    let zeros = [0u8; 4];
    let long = pattern(300);
    let sent: Vec<(u8, Vec<u8>, [u8; 4])> = vec![
        (0x81, b"one".to_vec(), KEY),
        (0x81, b"two, with a key of zeros".to_vec(), zeros),
        (0x82, long.clone(), zeros),
        (0x01, b"frag".to_vec(), KEY),
        (0x80, b"ments".to_vec(), zeros),
    ];
    for (first, payload, key) in &sent {
        client.send_raw(&frame(*first, payload, *key)).await;
    }
    let mut keys = Vec::new();
    for (first, payload, client_key) in &sent {
        let (got_first, key, got) = tokio::time::timeout(WAIT, seen.recv())
            .await
            .expect("the upstream got the frame in time")
            .expect("the upstream is there");
        assert_eq!(
            (got_first, &got),
            (*first, payload),
            "a frame changed on the way"
        );
        let key = key.expect("frames to an upstream are masked");
        assert_ne!(key, *client_key, "the client's masking key went upstream");
        keys.push(key);
    }
    keys.dedup();
    assert!(keys.len() > 1, "one key for every frame: {keys:?}");
}

#[tokio::test]
async fn one_address_cannot_take_every_pending_handshake_slot() {
    let (mut upstream, edge) =
        start_edge(|c| c.server("max_pending_handshakes = 64\nmax_pending_handshakes_per_ip = 8"))
            .await;
    // 127.0.0.2 opens silent connections, far more than its share.
    let mut silent = Vec::new();
    for _ in 0..40 {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        silent.push(socket.connect(edge.addr).await.unwrap());
    }
    // Past its eight, the edge closes them on arrival: once it has counted 32, each of those
    // has its end of stream waiting, and the eight it holds have nothing to read.
    edge.wait_metric(
        "wsedge_limit_hits_total{kind=\"max_pending_handshakes_per_ip\"}",
        32.0,
    )
    .await;
    let mut closed = 0;
    for stream in &mut silent {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 32, "connections closed beyond the address's share");
    // Another address is served meanwhile.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let stream = socket.connect(edge.addr).await.unwrap();
    let mut ws = upgrade_on(stream, &format!("/ws/chat?token={}", token_for("bob"))).await;
    upstream.next_request().await;
    ws.send_frame(true, 1, b"hello").await;
    assert_eq!(
        ws.read_frame().await.map(|f| f.payload),
        Some(b"hello".to_vec())
    );
    drop(silent);
}

/// A raw client on a socket the test made (bound to an address of its choosing).
async fn upgrade_on(stream: TcpStream, target: &str) -> RawClient {
    RawClient::upgrade_stream(stream, target, &[]).await
}

#[tokio::test]
async fn a_ping_flood_and_one_byte_fragments_cost_another_client_nothing() {
    let (mut upstream, edge) = start_edge(|c| c.server("handshake_rate_per_ip = \"off\"")).await;
    let mut flooder = RawClient::connect(
        edge.addr,
        &format!("/ws/chat?token={}", token_for("mallory")),
        &[],
    )
    .await;
    upstream.next_request().await;
    // 20,000 pings in one go, never reading the pongs: the edge answers what it can and stops
    // reading the flooder when the pongs back up; nothing reaches the upstream.
    let ping = frame(0x89, b"ping-payload", KEY);
    let flood: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 20_000)
        .collect();
    let mut flood_writer = flooder.take_writer();
    let flooding = tokio::spawn(async move {
        let _ = flood_writer.write_raw(&flood).await;
        flood_writer
    });
    // Meanwhile another client's message in 5,000 one-byte fragments arrives whole.
    let mut other = RawClient::connect(
        edge.addr,
        &format!("/ws/chat?token={}", token_for("alice")),
        &[],
    )
    .await;
    upstream.next_request().await;
    let text = letters(5000);
    other.send_raw(&one_byte_fragments(&text)).await;
    let echoed = tokio::time::timeout(WAIT, other.read_answering_pings())
        .await
        .expect("the echo arrived in time")
        .expect("the connection is open");
    assert_eq!(echoed.payload, text);
    flooding.abort();
    let _ = flooding.await;
    drop(flooder);
    drop(other);
    edge.wait_idle().await;
}

#[tokio::test]
async fn a_client_that_breaks_the_protocol_inside_a_long_frame_leaves_the_upstream_a_close() {
    // The frame's first half goes upstream as it arrives (as a fragment of its own); the
    // invalid byte in its second half ends the client with 1007, and the upstream still gets
    // a close frame, not a frame cut off by the end of the stream.
    let (mut upstream, edge) = start_edge(|c| c).await;
    let mut client = RawClient::connect(
        edge.addr,
        &format!("/ws/chat?token={}", token_for("alice")),
        &[],
    )
    .await;
    upstream.next_request().await;
    let mut payload = vec![b'a'; 200_000];
    payload[150_000] = 0xff;
    let whole = frame(0x81, &payload, KEY);
    client.send_raw(&whole[..100_000]).await;
    // The first half has gone upstream before the rest is sent.
    edge.wait_metric_until(
        "wsedge_bytes_total{route=\"/ws/chat\",direction=\"client_to_upstream\"}",
        |bytes| bytes >= 90_000.0,
    )
    .await;
    client.send_raw(&whole[100_000..]).await;
    assert_eq!(client.read_close_code().await, Some(1007));
    let close = upstream.next_close().await;
    assert_eq!(close.map(|(code, _)| code), Some(1001));
    edge.wait_idle().await;
}

#[tokio::test]
async fn one_address_flooding_pings_and_one_byte_fragments_reaches_the_upstream_with_its_message_only()
 {
    // 127.0.0.2 sends a message cut into 100,000 one-byte fragments, then 20,000 pings, then
    // a last message, reading what comes back; meanwhile 127.0.0.3 chats on another route. The
    // other client is answered while the flood goes on, the flooder's upstream gets its message
    // whole and then the last one, and never a ping: pings are the edge's to answer.
    let (upstream_addr, mut seen) = raw_upstream().await;
    let mut echo = Upstream::start().await;
    let config = EdgeConfig::new(&format!("ws://{upstream_addr}/ws/chat"))
        .server("handshake_rate_per_ip = \"off\"")
        .section(&format!(
            "[[route]]\npath = \"/ws/echo\"\nupstream = \"{}\"\nauth = \"main\"",
            echo.url("/ws/echo")
        ));
    let edge = TestEdge::start(&config.build()).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = socket.connect(edge.addr).await.unwrap();
    let mut flooder = upgrade_on(stream, &format!("/ws/chat?token={}", token_for("mallory"))).await;
    let text = letters(100_000);
    let mut flood = one_byte_fragments(&text);
    let ping = frame(0x89, b"ping-payload", KEY);
    for _ in 0..20_000 {
        flood.extend_from_slice(&ping);
    }
    flood.extend(frame(0x81, b"last", KEY));
    let mut writer = flooder.take_writer();
    let flooding = tokio::spawn(async move {
        writer.write_raw(&flood).await.unwrap();
        writer
    });
    // The flooder reads its pongs (a flood that never reads is another test's).
    let draining = tokio::spawn(async move {
        while let Some(frame) = flooder.read_ignoring_pings().await {
            if frame.close_code().is_some() {
                break;
            }
        }
    });

    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let stream = socket.connect(edge.addr).await.unwrap();
    let mut other = upgrade_on(stream, &format!("/ws/echo?token={}", token_for("alice"))).await;
    echo.next_request().await;
    other.send_frame(true, 1, b"hello").await;
    assert_eq!(
        tokio::time::timeout(WAIT, other.read_frame())
            .await
            .expect("the other client was answered in time")
            .map(|f| f.payload),
        Some(b"hello".to_vec())
    );

    let mut message = Vec::new();
    let mut frames = 0;
    let last = loop {
        let (first, _, payload) = tokio::time::timeout(WAIT, seen.recv())
            .await
            .expect("the flooder's frames reached the upstream in time")
            .expect("the upstream is reading");
        assert_ne!(payload, b"ping-payload", "a client's ping went upstream");
        if first & 0x0f >= 8 {
            // The edge's own heartbeat, not the client's.
            continue;
        }
        if message.len() < text.len() {
            frames += 1;
            message.extend_from_slice(&payload);
            continue;
        }
        break (first, payload);
    };
    assert_eq!(message, text, "the fragmented message, in {frames} frames");
    assert_eq!(last, (0x81, b"last".to_vec()));
    let writer = flooding.await.unwrap();
    draining.abort();
    let _ = draining.await;
    drop((writer, other, seen));
    edge.wait_idle().await;
}
