//! Reaching the upstream: which of a route's targets to try (`targets.rs`), a WebSocket
//! upgrade to it (`websocket.rs`), and HTTP/1.1 for what is proxied as plain HTTP (`http.rs`:
//! targets and failover; `pool.rs`: keep-alive connections; `h1.rs`: one connection, spoken
//! by the edge; `chunked.rs`: the chunked coding of response bodies), and small fetches the
//! edge makes for itself (`fetch.rs`: an identity provider's key set).

pub(crate) mod chunked;
pub(crate) mod fetch;
pub(crate) mod h1;
pub(crate) mod http;
pub(crate) mod pool;
pub(crate) mod targets;
pub(crate) mod websocket;
