//! wsedge: a WebSocket reverse proxy and authentication edge for real-time chat.
//!
//! The binary is a thin shell over [`Edge`]: tests bind it on port 0, drive it with real
//! sockets, and stop it through the same cancellation token the signal handlers use.
//!
//! The modules, each using only modules later in this list: `demo` → `server` (listeners, TLS,
//! HTTP) → `fast_path` (plain GETs read and answered by the edge itself) → `admin` (and
//! `admin_api`) → `jwks_refresh` (identity providers' key sets kept current) → `dispatch`
//! (every request: admitted, then upgraded or proxied) → `handshake` (the upgrade) →
//! `handoff` (a resuming client carried between edges over the cluster's link) → `passthrough` (plain HTTP passed through) → `report` (log, audit and metrics of a request)
//! → `admission` (the ordered checks: `Admitted` or a `Refusal`) → `state` (what a running edge
//! shares) → `cluster` (several edges through Redis) → `route` (routes at run time) → `upstream` (targets, affinity, failover, the
//! upstream's handshake, pooled HTTP, the edge's own fetches) → `forward` (the request shaped
//! for the upstream) → `relay` (the state machine over two legs) → `session` (registry, replay
//! buffer, detach and attach) → `ws` (frames, legs, closes). Beside them, using none of them:
//! `token`, `systemd`, `limits`, `config`, `template`, `auth`, `tls`, `metrics`, `audit`,
//! `stats`, `query`, `units`, `cors`, `shutdown`, `connections`, `revocation`.
#![forbid(unsafe_code)]

mod admin;
mod admin_api;
mod admission;
mod audit;
mod auth;
mod cluster;
mod config;
mod connections;
mod cors;
mod deadline;
mod demo;
mod dispatch;
mod fast_path;
mod forward;
mod handoff;
mod handshake;
mod jwks_refresh;
mod limits;
mod metrics;
mod passthrough;
mod query;
mod relay;
mod report;
mod revocation;
mod route;
mod server;
mod session;
mod shutdown;
mod state;
mod stats;
pub mod systemd;
mod template;
mod tls;
mod token;
mod units;
mod upstream;
mod ws;

#[cfg(test)]
mod fuzz;

pub use config::{Config, ConfigError, LogFormat, LogSettings};
pub use demo::run as run_demo;
pub use server::{Edge, EdgeHandle};
pub use stats::Stats;
pub use tls::{TlsError, server_config as tls_server_config};
pub use token::{TokenError, TokenRequest, mint as mint_token};
pub use units::{UnitError, parse_duration};
