//! The modes a soak mixes in besides the benchmark's: clients that lose their connection and
//! resume their session, and clients that read slowly while the upstream streams.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::websocket::Socket;
use crate::{Gathered, Target, gather};

/// Connections each ask for `messages` numbered texts, read some, lose the connection (no
/// close frame, as a phone going into a tunnel does), resume with `last_seq`, and so on
/// `rounds` times: every number must arrive once, in order.
pub(crate) async fn resume(
    target: &Target,
    connections: usize,
    messages: u64,
    rounds: u64,
) -> anyhow::Result<serde_json::Value> {
    let mut tasks = Vec::new();
    for n in 0..connections {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let session = uuid::Uuid::new_v4().simple().to_string();
            let mut ws = target
                .connect_with_query(n, &format!("session_id={session}"))
                .await?;
            ws.send(Message::text(format!("seq {messages}"))).await?;
            let mut next = 0u64;
            for round in 1..=rounds {
                // Lose the connection somewhere in the stream, a little further each round.
                let cut_at = messages * round / (rounds + 1);
                next = read_numbers(&mut ws, next, cut_at).await?;
                drop(ws);
                ws = target
                    .connect_with_query(n, &format!("session_id={session}&last_seq={next}"))
                    .await
                    .with_context(|| format!("resume at {next}"))?;
            }
            next = read_numbers(&mut ws, next, messages).await?;
            let _ = ws.close(None).await;
            anyhow::Ok(next)
        }));
    }
    let Gathered {
        results,
        errors,
        first_error,
    } = gather(tasks).await;
    Ok(json!({
        "mode": "resume", "label": target.label, "connections": connections,
        "messages": messages, "rounds": rounds, "received": results.iter().sum::<u64>(),
        "resumed": results.len() as u64 * rounds, "errors": errors, "first_error": first_error,
    }))
}

/// Reads numbered texts from `next` until `until`, failing on a gap or a repeat.
async fn read_numbers(ws: &mut Socket, mut next: u64, until: u64) -> anyhow::Result<u64> {
    while next < until {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let got: u64 = text
                    .parse()
                    .with_context(|| format!("not a number: {text}"))?;
                if got != next {
                    bail!("expected message {next}, got {got}");
                }
                next += 1;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(other)) => bail!("unexpected message {other:?}"),
            Some(Err(error)) => bail!("stream broke at {next}: {error}"),
            None => bail!("stream ended at {next}"),
        }
    }
    Ok(next)
}

/// Connections each ask for `messages` texts of `size` bytes and read them slowly: a pause of
/// `pause` after every `batch` messages, so that the proxy's buffers fill and it must hold the
/// upstream back.
pub(crate) async fn slow(
    target: &Target,
    connections: usize,
    messages: u64,
    size: usize,
    batch: u64,
    pause: Duration,
) -> anyhow::Result<serde_json::Value> {
    let mut tasks = Vec::new();
    for n in 0..connections {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = target.connect(n, None).await?;
            ws.send(Message::text(format!("stream {messages} {size}")))
                .await?;
            let mut count = 0u64;
            while count < messages {
                match ws.next().await {
                    Some(Ok(Message::Text(_))) => {
                        count += 1;
                        if count % batch.max(1) == 0 {
                            tokio::time::sleep(pause).await;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => bail!("stream broke after {count}: {error}"),
                    None => bail!("stream ended after {count}"),
                }
            }
            let _ = ws.close(None).await;
            anyhow::Ok(count)
        }));
    }
    let Gathered {
        results,
        errors,
        first_error,
    } = gather(tasks).await;
    Ok(json!({
        "mode": "slow", "label": target.label, "connections": connections,
        "messages": messages, "received": results.iter().sum::<u64>(),
        "errors": errors, "first_error": first_error,
    }))
}
