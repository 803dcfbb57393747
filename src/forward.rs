//! The request as it goes upstream: the client's headers minus handshake, hop-by-hop,
//! identity and token-carrying ones; the identity the edge decided, injected; the forwarding
//! headers (`X-Forwarded-For`, `X-Forwarded-Proto`, `x-request-id`); the query without the
//! token and without what the edge decides itself, plus the route's `upstream_query`.

use std::net::SocketAddr;

use http::header::{self, HeaderName, HeaderValue};

use crate::auth::token_source::{self, SUBPROTOCOL_PREFIX, TokenSource};
use crate::auth::{self, Identity};
use crate::config::settings::{
    CONVERSATION_PARAM, ConversationMode, PathMatch, RouteSettings, TargetSettings,
    is_reserved_header,
};
use crate::query;

/// Identity headers stripped from every client request, whatever a route injects: a chat core
/// that trusts `x-user-id` must never see a client's own copy.
const IDENTITY_HEADERS: [&str; 3] = ["x-user-id", "x-tenant-id", "x-conversation-id"];

/// An identity value (a claim) that no header can carry byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a claim cannot be carried in a header")]
pub(crate) struct ClaimNotAHeader;

/// The longest header value a template may compose.
const MAX_TEMPLATE_VALUE_LEN: usize = 1024;

// Made at compile time: `from_static` outside a const checks every byte on every request.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// The request's id, from the client (when sane) to the upstream and back.
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request the edge sends to one target: what [`ShapedRequest::for_target`] makes.
pub(crate) struct UpstreamRequest<'a> {
    pub(crate) path_and_query: String,
    pub(crate) headers: &'a [(HeaderName, HeaderValue)],
    /// The client's offered subprotocols (minus a token entry), comma-joined.
    pub(crate) subprotocols: Option<&'a str>,
}

/// Whether two header names are the same once `_` is read as `-`: CGI, WSGI and several web
/// servers fold them together, so `X_User_Id` must be stripped like `x-user-id`.
fn same_header(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).all(|(x, y)| {
            x.eq_ignore_ascii_case(&y) || (matches!(x, b'_' | b'-') && matches!(y, b'_' | b'-'))
        })
}

/// Headers the edge sets itself about the request's path to it: a client's copies are never
/// trusted.
fn is_forwarding_header(lower: &str) -> bool {
    matches!(lower, "x-request-id" | "x-real-ip" | "forwarded") || lower.starts_with("x-forwarded-")
}

/// Builds what goes upstream: the client's headers minus handshake, hop-by-hop, identity and
/// token-carrying ones; the injected identity; forwarding headers; the rewritten query.
pub(crate) fn shape<B>(
    request: &http::Request<B>,
    route: &RouteSettings,
    identity: &Identity,
    client: SocketAddr,
    tls: bool,
    request_id: &str,
) -> Result<ShapedRequest, ClaimNotAHeader> {
    let headers = request.headers();
    let strip_token = !route.forward_token;
    // Every place the policy reads tokens from is cleared, not only the one that held the
    // token used: a second copy elsewhere must not reach the upstream either.
    let sources: &[TokenSource] = match (&route.auth, strip_token) {
        (Some(policy), true) => &policy.token_from,
        _ => &[],
    };
    let strip_authorization = sources.contains(&TokenSource::Header);
    let token_cookies: Vec<&str> = sources
        .iter()
        .filter_map(|s| match s {
            TokenSource::Cookie(name) => Some(name.as_str()),
            _ => None,
        })
        .collect();

    // Headers the client's Connection header nominates are hop-by-hop too (RFC 9110 §7.6.1).
    let nominated: Vec<String> = token_source::header_list(headers, header::CONNECTION)
        .map(str::to_ascii_lowercase)
        .collect();

    let mut out: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(headers.len() + 6);
    for (name, value) in headers {
        let lower = name.as_str();
        let dropped = is_reserved_header(name)
            || IDENTITY_HEADERS
                .iter()
                .any(|identity| same_header(identity, lower))
            || route
                .inject
                .iter()
                .any(|(injected, _)| same_header(injected.as_str(), lower))
            || nominated.iter().any(|n| n == lower)
            // HTTP2-Settings goes with an h2c upgrade, which never goes upstream (RFC 7540
            // §3.2.1), whether or not Connection names it.
            || matches!(
                lower,
                "keep-alive"
                    | "expect"
                    | "proxy-connection"
                    | "proxy-authorization"
                    | "http2-settings"
            )
            || is_forwarding_header(lower)
            // `X_Forwarded_For` is `X-Forwarded-For` to CGI, WSGI and several web servers.
            || (lower.contains('_') && is_forwarding_header(&lower.replace('_', "-")))
            || (strip_authorization && name == header::AUTHORIZATION)
            || (!token_cookies.is_empty() && name == header::COOKIE);
        if !dropped {
            out.push((name.clone(), value.clone()));
        }
    }
    if !token_cookies.is_empty()
        && let Some(rest) = token_source::cookie_header_without(headers, &token_cookies)
        && let Ok(value) = HeaderValue::from_str(&rest)
    {
        out.push((header::COOKIE, value));
    }

    for (name, template) in &route.inject {
        if let Some(value) = template.render(identity) {
            // Claims a template names are checked here, as the identity's own values were at
            // admission: what an HTTP parser would not carry byte for byte is refused.
            if value.len() > MAX_TEMPLATE_VALUE_LEN || !auth::reads_the_same(&value) {
                return Err(ClaimNotAHeader);
            }
            // The rendered text becomes the header's bytes as they are, not a copy.
            let value = HeaderValue::from_maybe_shared(bytes::Bytes::from(value))
                .map_err(|_| ClaimNotAHeader)?;
            out.push((name.clone(), value));
        }
    }
    out.push((X_FORWARDED_FOR, forwarded_for(client.ip())));
    out.push((
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    ));
    out.push((X_REQUEST_ID, header_value(request_id)));

    let offered: Vec<&str> = token_source::offered_subprotocols(headers)
        .filter(|entry| {
            !(sources.contains(&TokenSource::Subprotocol) && entry.starts_with(SUBPROTOCOL_PREFIX))
        })
        .collect();
    let subprotocols = (!offered.is_empty()).then(|| offered.join(", "));

    Ok(ShapedRequest {
        remainder: match &route.path {
            PathMatch::Prefix(prefix) => request.uri().path()[prefix.len()..].to_owned(),
            PathMatch::Exact(_) => String::new(),
        },
        query: upstream_query(request.uri().query(), route, identity, sources),
        headers: out,
        subprotocols,
    })
}

thread_local! {
    /// The last client address a worker wrote, as a header value: a keep-alive connection's
    /// requests come one after another from one address, and are served on one worker.
    static LAST_ADDRESS: std::cell::RefCell<Option<(std::net::IpAddr, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// `X-Forwarded-For`'s value for a client address.
fn forwarded_for(ip: std::net::IpAddr) -> HeaderValue {
    LAST_ADDRESS.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((seen, value)) if *seen == ip => value.clone(),
            _ => {
                let value = address_value(ip);
                *last = Some((ip, value.clone()));
                value
            }
        }
    })
}

/// A client address as a header value (IPv4 without going through `fmt`: this is on every
/// request's path).
fn address_value(ip: std::net::IpAddr) -> HeaderValue {
    let std::net::IpAddr::V4(v4) = ip else {
        return header_value(&ip.to_string());
    };
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    HeaderValue::from_bytes(&text[..len]).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// A header value from text the edge made (ids, addresses); never fails.
pub(crate) fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// The client query as it goes upstream: minus the token (unless forwarded) and minus keys the
/// route sets itself, plus the route's `upstream_query`.
fn upstream_query(
    client_query: Option<&str>,
    route: &RouteSettings,
    identity: &Identity,
    token_sources: &[TokenSource],
) -> String {
    // The token, and what the edge decides: the conversation reaches the upstream only as the
    // edge decided it (upstream_query), never as the client wrote it. Dropped in any spelling
    // an upstream's parser may read as the same key (`may_read_as`), and behind a `;` (some
    // split pairs on it too).
    let edge_owns = |key: &str| {
        let token = token_sources
            .iter()
            .any(|s| matches!(s, TokenSource::Query(name) if may_read_as(key, name)));
        let conversation =
            may_read_as(key, CONVERSATION_PARAM) && route.conversation != ConversationMode::None;
        token
            || conversation
            || route
                .upstream_query
                .iter()
                .any(|(name, _)| may_read_as(key, name))
    };
    // Pairs the upstream gets as the client wrote them; only the route's own are encoded here.
    let mut query = String::new();
    for pair in query::pairs(client_query.unwrap_or("")) {
        let hidden_owned = memchr::memchr(b';', pair.raw.as_bytes()).is_some()
            && pair
                .raw
                .split(';')
                .any(|part| query::pairs(part).any(|inner| edge_owns(&inner.key)));
        if edge_owns(&pair.key) || hidden_owned {
            continue;
        }
        if !query.is_empty() {
            query.push('&');
        }
        query.push_str(pair.raw);
    }
    let mut serializer = form_urlencoded::Serializer::for_suffix(query, 0);
    for (key, template) in &route.upstream_query {
        if let Some(value) = template.render(identity) {
            serializer.append_pair(key, &value);
        }
    }
    serializer.finish()
}

/// Whether some upstream's query parser may read `key` as `name`: frameworks compare keys
/// ignoring case, Unicode's too (.NET, Java: `conversatıon_id` with a dotless ı), merge
/// `name[]` and `name[x]` into `name` (Rack, PHP, Express's `qs`), and PHP reads `.` and
/// spaces in a key as `_`.
fn may_read_as(key: &str, name: &str) -> bool {
    // ASCII on both sides (nearly every key): the same folding without Unicode's tables, in
    // one walk (keys are short: a search call per key cost more than the comparison).
    if key.is_ascii() && name.is_ascii() {
        let base =
            |text: &[u8]| -> usize { text.iter().position(|&b| b == b'[').unwrap_or(text.len()) };
        let (key, name) = (key.as_bytes(), name.as_bytes());
        let (key, name) = (&key[..base(key)], &name[..base(name)]);
        let fold = |b: u8| match b {
            b'.' | b' ' => b'_',
            other => other.to_ascii_lowercase(),
        };
        return key.len() == name.len() && key.iter().zip(name).all(|(&k, &n)| fold(k) == fold(n));
    }
    fn fold(text: &str) -> impl Iterator<Item = char> + '_ {
        let base = text.split('[').next().unwrap_or(text);
        base.chars()
            .flat_map(char::to_uppercase)
            .flat_map(char::to_lowercase)
            .map(|c| if c == '.' || c == ' ' { '_' } else { c })
    }
    fold(key).eq(fold(name))
}

/// The upstream request before a target is chosen: each target has its own path and query.
pub(crate) struct ShapedRequest {
    /// What follows a prefix route's path in the client's path.
    remainder: String,
    query: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    subprotocols: Option<String>,
}

impl ShapedRequest {
    pub(crate) fn for_target(&self, target: &TargetSettings) -> UpstreamRequest<'_> {
        let remainder = self.remainder.as_str();
        let target_query = target.query.as_deref().filter(|q| !q.is_empty());
        // Made at its full length at once: growing it piece by piece reallocated it for most
        // requests.
        let length = target.path.len()
            + 1
            + remainder.len()
            + target_query.map_or(0, |query| query.len() + 1)
            + self.query.len()
            + 1;
        let mut path = String::with_capacity(length);
        path.push_str(&target.path);
        match (path.ends_with('/'), remainder.strip_prefix('/')) {
            (_, None) if remainder.is_empty() => {}
            (true, Some(rest)) => path.push_str(rest),
            (false, None) => {
                path.push('/');
                path.push_str(remainder);
            }
            _ => path.push_str(remainder),
        }
        if path.is_empty() {
            path.push('/');
        }
        let mut path_and_query = path;
        for (i, part) in target_query
            .into_iter()
            .chain((!self.query.is_empty()).then_some(self.query.as_str()))
            .enumerate()
        {
            path_and_query.push(if i == 0 { '?' } else { '&' });
            path_and_query.push_str(part);
        }
        UpstreamRequest {
            path_and_query,
            headers: &self.headers,
            subprotocols: self.subprotocols.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_an_upstream_may_read_as_the_name() {
        for key in [
            "token",
            "TOKEN",
            "Token[]",
            "token[x]",
            "conversation.id",
            "conversation id",
            "CONVERSATION_ID",
            "conversatıon_id", // dotless ı: .NET and Java fold it to i
        ] {
            let name = if key.to_ascii_lowercase().starts_with("tok") {
                "token"
            } else {
                "conversation_id"
            };
            assert!(may_read_as(key, name), "{key}");
        }
        for key in [
            "tokens",
            "toke",
            "_token",
            "conversation-id",
            "token\u{200b}",
        ] {
            assert!(
                !may_read_as(key, "token") && !may_read_as(key, "conversation_id"),
                "{key}"
            );
        }
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "10.20.30.40",
            "255.255.255.255",
            "192.168.100.9",
            "::1",
            "2001:db8::ff00:42:8329",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(address_value(ip), ip.to_string().as_str());
        }
    }
}
