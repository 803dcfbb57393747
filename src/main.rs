//! The `wsedge` command: run the edge, check a config, mint a development token, run the demo.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::SignalKind;
use tokio_util::sync::CancellationToken;
use wsedge::{Config, ConfigError, Edge, LogFormat, LogSettings, TokenRequest, systemd};

/// The binary's allocator. Under long mixed load glibc's arenas held more of the pages freed
/// by short requests beside long-lived sockets than jemalloc does (BENCHMARKS.md, the soaks of
/// 2026-12-03); jemalloc's background threads hand free pages back on a timer, on threads of
/// their own, so an idle edge shrinks without a request to prompt it.
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, which it reads by this name as it starts (`_RJEM_MALLOC_CONF` in the
/// environment still overrides them). Free pages go back after a second rather than ten: under
/// steady churn the ten seconds' worth of freed pages it kept was more than the edge had in use.
#[cfg(target_os = "linux")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static ALLOCATOR_SETTINGS: &[u8; 20] = b"dirty_decay_ms:1000\0";

/// Exit status for a configuration that does not validate (EX_USAGE... sysexits' EX_DATAERR
/// is 65, but 64 is what operators script against for "fix your input").
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "wsedge",
    version,
    about = "WebSocket reverse proxy and authentication edge"
)]
struct Cli {
    /// The config file to run with.
    #[arg(long, short, global = true, default_value = "proxy.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and exit: 0 when it can serve, 64 with file:line:col errors when not.
    Check,
    /// Print a token signed with a policy's key (for a kind = "hmac" policy, the signed query
    /// string), for development and testing.
    Token(Box<TokenArgs>),
    /// Run a self-contained demo: the edge, a streaming chat core and a browser page, on loopback.
    Demo {
        /// Port for the edge's WebSocket listener.
        #[arg(long, default_value_t = 8787)]
        port: u16,
        /// Port for the browser page.
        #[arg(long, default_value_t = 8788)]
        page_port: u16,
        /// Send one message through the edge, print what comes back, and exit.
        #[arg(long)]
        once: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The control plane (signals, admin, reloads, the demo); connections run on the edge's workers.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("wsedge: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        None => runtime.block_on(run(&cli.config)),
        Some(Command::Check) => return check(&cli.config),
        Some(Command::Token(request)) => token(&cli.config, *request),
        Some(Command::Demo {
            port,
            page_port,
            once,
        }) => {
            init_logging(&LogSettings {
                format: LogFormat::Text,
                level: "warn".into(),
                audit: None,
            });
            runtime.block_on(wsedge::run_demo(port, page_port, once))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if let Some(config_error) = error.downcast_ref::<ConfigError>() {
                eprintln!("{config_error}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
            eprintln!("wsedge: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: &Path) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    for warning in &config.warnings {
        eprintln!("{warning}");
    }
    Ok(config)
}

fn check(path: &Path) -> ExitCode {
    match load_config(path) {
        Ok(config) => {
            let (routes, policies) = config.counts();
            println!(
                "{}: ok ({routes} route{}, {policies} auth polic{})",
                path.display(),
                if routes == 1 { "" } else { "s" },
                if policies == 1 { "y" } else { "ies" },
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

fn init_logging(settings: &LogSettings) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour only on a terminal: under systemd the escape codes would land in the journal.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    // A second initialisation (never in the binary, possible in embedders) is harmless.
    let _ = match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

async fn run(path: &Path) -> anyhow::Result<()> {
    let config = load_config(path)?;
    init_logging(&config.log);
    // Signal handlers first: a SIGHUP or SIGTERM that arrives while binding must not kill us.
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let edge = Edge::bind(config).await?;
    let handle = edge.handle();
    tracing::info!(
        listen = ?edge.local_addrs(),
        admin = ?edge.admin_addr(),
        config = %path.display(),
        "wsedge serving"
    );
    // The bound addresses (real ports where the config said 0), as `systemctl status` shows
    // them and as a supervisor that started the edge on port 0 reads them back.
    let status = serving_status(&edge.local_addrs(), edge.admin_addr());
    let server = tokio::spawn(edge.run());
    systemd::ready(&status);
    let watchdog_stop = CancellationToken::new();
    systemd::spawn_watchdog(watchdog_stop.clone());

    loop {
        tokio::select! {
            _ = hangup.recv() => {
                systemd::reloading();
                match handle.reload_from(path).await {
                    Ok(()) => {
                        tracing::info!(config = %path.display(), "config reloaded");
                        systemd::ready("serving (reloaded)");
                    }
                    Err(error) => {
                        for line in &error.diagnostics {
                            tracing::error!("reload refused, still serving the previous config: {line}");
                        }
                        systemd::ready("serving (reload refused: see the log)");
                    }
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    systemd::stopping();
    handle.shutdown();
    server.await.context("the edge task failed")?;
    watchdog_stop.cancel();
    tracing::info!("stopped");
    Ok(())
}

/// `serving on 127.0.0.1:8443, [::1]:8443 (admin on 127.0.0.1:9090)`.
fn serving_status(listen: &[std::net::SocketAddr], admin: Option<std::net::SocketAddr>) -> String {
    let listen: Vec<String> = listen.iter().map(ToString::to_string).collect();
    match admin {
        Some(admin) => format!("serving on {} (admin on {admin})", listen.join(", ")),
        None => format!("serving on {}", listen.join(", ")),
    }
}

fn signal(kind: SignalKind) -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).context("cannot install a signal handler")
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The [auth.NAME] policy whose key signs the token (default: the only one).
    #[arg(long)]
    auth: Option<String>,
    /// The user (the policy's user claim).
    #[arg(long)]
    sub: String,
    #[arg(long)]
    tenant: Option<String>,
    #[arg(long)]
    conversation: Option<String>,
    /// Lifetime, like "1h" or "30s".
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// Extra claims, `name=value` (repeatable).
    #[arg(long = "claim", value_name = "NAME=VALUE")]
    claims: Vec<String>,
    /// PEM private key for RS*/PS*/ES*/EdDSA policies (HS* policies use their secret).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Issuer, when the policy requires one (default: the policy's first issuer).
    #[arg(long)]
    issuer: Option<String>,
    /// Audience, when the policy requires one (default: the policy's first audience).
    #[arg(long)]
    audience: Option<String>,
    /// The key id to name in the token's header (policies with a JWK set choose keys by it).
    #[arg(long)]
    kid: Option<String>,
}

fn token(path: &Path, args: TokenArgs) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let ttl = wsedge::parse_duration(&args.ttl).context("--ttl")?;
    let claims = args
        .claims
        .iter()
        .map(|claim| {
            claim
                .split_once('=')
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .with_context(|| format!("--claim {claim:?}: expected NAME=VALUE"))
        })
        .collect::<anyhow::Result<_>>()?;
    let private_key = match &args.key {
        Some(file) => {
            Some(std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?)
        }
        None => None,
    };
    let request = TokenRequest {
        policy: args.auth,
        user: args.sub,
        tenant: args.tenant,
        conversation: args.conversation,
        ttl,
        claims,
        private_key,
        issuer: args.issuer,
        audience: args.audience,
        kid: args.kid,
    };
    let token = wsedge::mint_token(&config, request)
        .with_context(|| format!("cannot sign a token with {}", path.display()))?;
    println!("{token}");
    Ok(())
}
