//! The modes a soak mixes in besides the benchmark's: clients that lose their connection and
//! resume their session, and clients that read slowly while the upstream streams.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::websocket::Socket;
use crate::{Gathered, Target, gather, percentiles};

/// Where sessions start, and where they are resumed (another edge of a cluster, or the same).
pub(crate) struct ResumeTargets<'a> {
    pub(crate) first: &'a Target,
    pub(crate) resume: &'a Target,
}

/// Connections each ask for `messages` numbered texts, read some, lose the connection (no
/// close frame, as a phone going into a tunnel does), resume with `last_seq`, and so on
/// `rounds` times: every number must arrive once, in order. Each resume is timed from its
/// connect to the first message it receives.
pub(crate) async fn resume(
    targets: ResumeTargets<'_>,
    connections: usize,
    messages: u64,
    rounds: u64,
) -> anyhow::Result<serde_json::Value> {
    let mut tasks = Vec::new();
    for n in 0..connections {
        let target = targets.first.clone();
        let resume_target = targets.resume.clone();
        tasks.push(tokio::spawn(async move {
            let session = uuid::Uuid::new_v4().simple().to_string();
            let mut ws = target
                .connect_with_query(n, &format!("session_id={session}"))
                .await?;
            ws.send(Message::text(format!("seq {messages}"))).await?;
            let mut next = 0u64;
            let mut took = Vec::new();
            for round in 1..=rounds {
                // Lose the connection somewhere in the stream, a little further each round.
                let cut_at = messages * round / (rounds + 1);
                next = read_numbers(&mut ws, next, cut_at).await?;
                drop(ws);
                let started = Instant::now();
                ws = resume_target
                    .connect_with_query(n, &format!("session_id={session}&last_seq={next}"))
                    .await
                    .with_context(|| format!("resume at {next}"))?;
                if next < messages {
                    next = read_numbers(&mut ws, next, next + 1).await?;
                    took.push(started.elapsed().as_micros() as u64);
                }
            }
            next = read_numbers(&mut ws, next, messages).await?;
            let _ = ws.close(None).await;
            anyhow::Ok((next, took))
        }));
    }
    let Gathered {
        results,
        errors,
        first_error,
    } = gather(tasks).await;
    let received: u64 = results.iter().map(|(received, _)| received).sum();
    let took: Vec<u64> = results.into_iter().flat_map(|(_, took)| took).collect();
    Ok(json!({
        "mode": "resume", "label": targets.first.label, "connections": connections,
        "messages": messages, "rounds": rounds, "received": received,
        "resumed": took.len(), "resume_to_first_message_us": percentiles(took),
        "errors": errors, "first_error": first_error,
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
