//! One small GET over the edge's own HTTP/1.1 client, for what the edge fetches for itself (an
//! identity provider's key set): the whole body, bounded in size and time, on a connection of
//! its own that is closed afterwards. Redirects are not followed.

use std::future::poll_fn;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use super::h1::{H1Error, HttpConnection};
use super::websocket::open;
use crate::config::settings::TargetSettings;

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Exchange(#[from] H1Error),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A fetched document.
pub(crate) struct Fetched {
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// GETs `target`'s path and query; a status other than 200 is an error.
pub(crate) async fn get(
    target: &TargetSettings,
    headers: &[(HeaderName, HeaderValue)],
    limit: usize,
    timeout: Duration,
) -> Result<Fetched, FetchError> {
    tokio::time::timeout(timeout, exchange(target, headers, limit))
        .await
        .map_err(|_| FetchError::Timeout(timeout))?
}

async fn exchange(
    target: &TargetSettings,
    headers: &[(HeaderName, HeaderValue)],
    limit: usize,
) -> Result<Fetched, FetchError> {
    let io = open(target).await.map_err(FetchError::Connect)?;
    let mut connection = HttpConnection::new(io);
    let path_and_query = match &target.query {
        Some(query) => format!("{}?{query}", target.path),
        None => target.path.clone(),
    };
    connection.start(
        &Method::GET,
        &path_and_query,
        &target.authority,
        headers,
        None,
    );
    let head = poll_fn(|cx| connection.poll_head(cx)).await?;
    if head.status != StatusCode::OK {
        return Err(FetchError::Status(head.status));
    }
    let mut body = BytesMut::new();
    while let Some(piece) = poll_fn(|cx| connection.poll_body(cx)).await {
        let piece = piece?;
        if body.len() + piece.len() > limit {
            return Err(FetchError::TooLarge(limit));
        }
        body.extend_from_slice(&piece);
    }
    Ok(Fetched {
        headers: head.headers,
        body: body.freeze(),
    })
}
