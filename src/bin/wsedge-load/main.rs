//! `wsedge-load`: the load tool behind BENCHMARKS.md, and the upstream it drives.
//!
//! Modes (one JSON line of results each):
//!   stream     C connections each receive N messages of S bytes pushed by the upstream
//!   rtt        C connections each do R echo round trips; latency percentiles in µs
//!   handshake  K upgrades at concurrency C; handshakes/s and latency percentiles
//!   idle       hold C connections (source addresses spread over 127.0.0.x) for a while
//!   http       C keep-alive connections each send R GETs; requests/s and latency percentiles
//!   sse        C connections each read an event stream of N events; events/s
//!   resume     C connections each lose their connection and resume their session R times
//!              while reading N numbered messages; every number must arrive once, in order
//!   slow       C connections each read N streamed messages slowly (a pause every B)
//!   upstream   the matching upstream: echoes data, streams on `stream N SIZE`; with
//!              `--http-listen`, answers GETs and streams SSE over HTTP
//!
//! Any proxy in front of the upstream can be measured the same way: direct, nginx, HAProxy,
//! wsedge. With `--jwt-secret`, every connection carries a fresh HS256 token (its own `sub`
//! and `jti`) in the query parameter `--token-param`.

mod http;
mod soak;
mod upstream;
mod websocket;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "wsedge-load",
    about = "Load tool and test upstream for WebSocket proxies"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Connections each receive N messages of S bytes pushed by the upstream.
    Stream {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 20)]
        connections: usize,
        #[arg(long, default_value_t = 200_000)]
        messages: u64,
        #[arg(long, default_value_t = 32)]
        size: usize,
    },
    /// Connections each do echo round trips of binary messages.
    Rtt {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 50)]
        connections: usize,
        #[arg(long, default_value_t = 200)]
        round_trips: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Upgrades at a fixed concurrency, each closed right after the 101.
    Handshake {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 5000)]
        count: usize,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
    },
    /// Holds connections open and idle; prints "ready" on stderr once all are open.
    Idle {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 5000)]
        connections: usize,
        /// How long to hold them once all are open, like "10s".
        #[arg(long, default_value = "10s")]
        hold: String,
        /// Spread source addresses over 127.0.0.2 … 127.0.0.(1+N) so ephemeral ports last.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=250))]
        sources: u8,
        /// Connections opened at once.
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
    },
    /// Keep-alive connections each send R GET requests, one after the other.
    Http {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 50)]
        connections: usize,
        #[arg(long, default_value_t = 200)]
        requests: usize,
    },
    /// Connections each read a Server-Sent Events stream of N events of S bytes of data.
    Sse {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 20)]
        connections: usize,
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        #[arg(long, default_value_t = 32)]
        size: usize,
    },
    /// Connections that lose their connection and resume their session, reading numbered
    /// messages (the route must be resumable).
    Resume {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 20)]
        connections: usize,
        #[arg(long, default_value_t = 2000)]
        messages: u64,
        #[arg(long, default_value_t = 3)]
        rounds: u64,
        /// Resume through this URL (another edge of a cluster) instead of `--url`.
        #[arg(long)]
        resume_url: Option<String>,
    },
    /// Connections that read a stream slowly.
    Slow {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 5)]
        connections: usize,
        #[arg(long, default_value_t = 5000)]
        messages: u64,
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Messages read between pauses.
        #[arg(long, default_value_t = 100)]
        batch: u64,
        /// Each pause, like "20ms".
        #[arg(long, default_value = "20ms")]
        pause: String,
    },
    /// The upstream: echoes data messages; `stream N SIZE` pushes N texts of SIZE bytes. With
    /// `--http-listen`, also an HTTP upstream answering GETs and streaming SSE on
    /// `/…/sse?events=N&size=S`.
    Upstream {
        #[arg(long, default_value = "127.0.0.1:19001")]
        listen: SocketAddr,
        #[arg(long)]
        http_listen: Option<SocketAddr>,
    },
}

#[derive(Args, Clone)]
struct Target {
    /// ws://host:port/path?query (http:// for the HTTP modes)
    #[arg(long)]
    url: String,
    /// Extra request headers, `Name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Mint a fresh HS256 token per connection with this secret.
    #[arg(long)]
    jwt_secret: Option<String>,
    /// Sign with this RSA private key (PEM) instead: one RS256 token for every connection,
    /// made before the run (an RSA signature costs the tool as much as a verification costs
    /// the edge, on the same cores), naming `--jwt-kid`.
    #[arg(long, conflicts_with = "jwt_secret", requires = "jwt_kid")]
    jwt_rsa_key: Option<std::path::PathBuf>,
    #[arg(long)]
    jwt_kid: Option<String>,
    /// The query parameter that carries the token.
    #[arg(long, default_value = "token")]
    token_param: String,
    /// HTTP modes: send the token as `Authorization: Bearer …`, as REST clients do, instead of
    /// in the query.
    #[arg(long)]
    bearer: bool,
    /// A label for the result line (e.g. "nginx").
    #[arg(long, default_value = "")]
    label: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let result = match cli.mode {
            Mode::Upstream {
                listen,
                http_listen,
            } => return upstream::run(listen, http_listen).await,
            Mode::Stream {
                mut target,
                connections,
                messages,
                size,
            } => {
                target.prepare()?;
                websocket::stream(&target, connections, messages, size).await?
            }
            Mode::Rtt {
                mut target,
                connections,
                round_trips,
                size,
            } => {
                target.prepare()?;
                websocket::rtt(&target, connections, round_trips, size).await?
            }
            Mode::Handshake {
                mut target,
                count,
                concurrency,
            } => {
                target.prepare()?;
                websocket::handshake(&target, count, concurrency).await?
            }
            Mode::Idle {
                mut target,
                connections,
                hold,
                sources,
                concurrency,
            } => {
                target.prepare()?;
                let hold = wsedge::parse_duration(&hold)?;
                websocket::idle(&target, connections, hold, sources, concurrency).await?
            }
            Mode::Http {
                mut target,
                connections,
                requests,
            } => {
                target.prepare()?;
                http::requests(&target, connections, requests).await?
            }
            Mode::Resume {
                mut target,
                connections,
                messages,
                rounds,
                resume_url,
            } => {
                target.prepare()?;
                let mut resume_target = target.clone();
                if let Some(url) = resume_url {
                    resume_target.url = url;
                }
                let targets = soak::ResumeTargets {
                    first: &target,
                    resume: &resume_target,
                };
                soak::resume(targets, connections, messages, rounds).await?
            }
            Mode::Slow {
                mut target,
                connections,
                messages,
                size,
                batch,
                pause,
            } => {
                target.prepare()?;
                let pause = wsedge::parse_duration(&pause)?;
                soak::slow(&target, connections, messages, size, batch, pause).await?
            }
            Mode::Sse {
                mut target,
                connections,
                events,
                size,
            } => {
                target.prepare()?;
                http::events(&target, connections, events, size).await?
            }
        };
        println!("{result}");
        Ok(())
    })
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Target {
    /// The URL's authority and address; its scheme must be `scheme`.
    fn authority(&self, scheme: &str) -> anyhow::Result<(String, SocketAddr)> {
        let uri: ::http::Uri = self.url.parse().context("invalid --url")?;
        if uri.scheme_str() != Some(scheme) {
            bail!("--url must be {scheme}:// (put TLS in front of the tool, not inside it)");
        }
        let authority = uri.authority().context("--url has no host")?.to_string();
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&authority)?
            .next()
            .context("--url host does not resolve")?;
        Ok((authority, addr))
    }

    /// Signs the one RS256 token of `--jwt-rsa-key` into the URL, before a run starts.
    fn prepare(&mut self) -> anyhow::Result<()> {
        let Some(path) = &self.jwt_rsa_key else {
            return Ok(());
        };
        let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = self.jwt_kid.clone();
        let claims = json!({ "sub": "user-rs256", "iat": now_secs(), "exp": now_secs() + 3600 });
        let token = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).context("--jwt-rsa-key")?,
        )?;
        let separator = if self.url.contains('?') { '&' } else { '?' };
        self.url = format!("{}{separator}{}={token}", self.url, self.token_param);
        self.jwt_rsa_key = None;
        Ok(())
    }

    /// The URL for connection `n`: with a fresh token when a secret is given.
    fn url_for(&self, n: usize) -> anyhow::Result<String> {
        let Some(token) = self.token_for(n)? else {
            return Ok(self.url.clone());
        };
        let separator = if self.url.contains('?') { '&' } else { '?' };
        Ok(format!(
            "{}{separator}{}={token}",
            self.url, self.token_param
        ))
    }

    /// A fresh token for connection `n`, when a secret is given.
    fn token_for(&self, n: usize) -> anyhow::Result<Option<String>> {
        let Some(secret) = &self.jwt_secret else {
            return Ok(None);
        };
        let claims = json!({
            "sub": format!("user-{n}"),
            "jti": uuid::Uuid::new_v4().simple().to_string(),
            "iat": now_secs(),
            "exp": now_secs() + 3600,
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )?;
        Ok(Some(token))
    }
}

/// What the tasks of a run came to: the results of those that succeeded, how many failed, and
/// the first failure's message.
struct Gathered<T> {
    results: Vec<T>,
    errors: usize,
    first_error: Option<String>,
}

async fn gather<T>(tasks: Vec<tokio::task::JoinHandle<anyhow::Result<T>>>) -> Gathered<T> {
    let mut gathered = Gathered {
        results: Vec::with_capacity(tasks.len()),
        errors: 0,
        first_error: None,
    };
    for task in tasks {
        match task.await {
            Ok(Ok(result)) => gathered.results.push(result),
            Ok(Err(error)) => {
                gathered.errors += 1;
                gathered
                    .first_error
                    .get_or_insert_with(|| format!("{error:#}"));
            }
            Err(error) => {
                gathered.errors += 1;
                gathered
                    .first_error
                    .get_or_insert_with(|| error.to_string());
            }
        }
    }
    gathered
}

pub(crate) fn percentiles(mut samples: Vec<u64>) -> serde_json::Value {
    if samples.is_empty() {
        return json!(null);
    }
    samples.sort_unstable();
    let at =
        |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1];
    json!({ "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": samples[samples.len() - 1] })
}
