//! Reaching the upstream: which of a route's targets to try (`targets.rs`), a WebSocket
//! upgrade to it (`websocket.rs`), and pooled HTTP/1.1 for what is proxied as plain HTTP
//! (`http.rs`, its connections in `pool.rs`).

pub(crate) mod http;
pub(crate) mod pool;
pub(crate) mod targets;
pub(crate) mod websocket;
