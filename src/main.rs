//! The `wsedge` command: run the edge, check a config, mint a development token, run the demo.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio::signal::unix::SignalKind;
use tokio_util::sync::CancellationToken;
use wsedge::auth::jwt::{self, SigningKey};
use wsedge::config::{LogFormat, LogSettings};
use wsedge::{Config, Edge, systemd};

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
    /// Print a token signed with a policy's key, for development and testing.
    Token(Box<TokenRequest>),
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
            runtime.block_on(wsedge::demo::run(port, page_port, once))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if let Some(config_error) = error.downcast_ref::<wsedge::ConfigError>() {
                eprintln!("{config_error}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
            eprintln!("wsedge: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: &Path) -> Result<Config, wsedge::ConfigError> {
    let config = Config::load(path)?;
    for warning in &config.warnings {
        eprintln!("{warning}");
    }
    Ok(config)
}

fn check(path: &Path) -> ExitCode {
    match load_config(path) {
        Ok(config) => {
            println!(
                "{}: ok ({} route{}, {} auth polic{})",
                path.display(),
                config.router.routes().len(),
                if config.router.routes().len() == 1 {
                    ""
                } else {
                    "s"
                },
                config.policies.len(),
                if config.policies.len() == 1 {
                    "y"
                } else {
                    "ies"
                },
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
    let server = tokio::spawn(edge.run());
    systemd::ready("serving");
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

fn signal(kind: SignalKind) -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).context("cannot install a signal handler")
}

#[derive(clap::Args)]
struct TokenRequest {
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
}

fn token(path: &Path, request: TokenRequest) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let policy = match &request.auth {
        Some(name) => config
            .policies
            .get(name)
            .with_context(|| format!("no [auth.{name}] in {}", path.display()))?,
        None => {
            let mut policies = config.policies.values();
            match (policies.next(), policies.next()) {
                (Some(policy), None) => policy,
                (None, _) => bail!("{} has no [auth.NAME] policy", path.display()),
                (Some(_), Some(_)) => bail!(
                    "{} has several policies: choose one with --auth NAME",
                    path.display()
                ),
            }
        }
    };
    let ttl = wsedge::units::parse_duration(&request.ttl).map_err(anyhow::Error::msg)?;
    let key = match (&request.key, &policy.hmac_secret) {
        (Some(file), _) => SigningKey::PrivatePem(
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?,
        ),
        (None, Some(secret)) => SigningKey::Secret(secret.clone()),
        (None, None) => bail!(
            "[auth.{}] verifies with a public key: pass --key PRIVATE_KEY.pem to sign",
            policy.name
        ),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let mut claims = jwt::Claims::new();
    claims.insert(policy.claims.user.clone(), request.sub.into());
    if let Some(tenant) = request.tenant {
        claims.insert(policy.claims.tenant.clone(), tenant.into());
    }
    if let Some(conversation) = request.conversation {
        claims.insert(policy.claims.conversation.clone(), conversation.into());
    }
    for claim in &request.claims {
        let (name, value) = claim
            .split_once('=')
            .with_context(|| format!("--claim {claim:?}: expected NAME=VALUE"))?;
        claims.insert(name.to_owned(), value.into());
    }
    if let Some(issuer) = request.issuer.or_else(|| policy.issuers.first().cloned()) {
        claims.insert("iss".into(), issuer.into());
    }
    if let Some(audience) = request
        .audience
        .or_else(|| policy.audiences.first().cloned())
    {
        claims.insert("aud".into(), audience.into());
    }
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + ttl.as_secs()).into());
    let token = jwt::mint(policy.algorithms[0], &key, &claims).map_err(anyhow::Error::msg)?;
    println!("{token}");
    Ok(())
}
