//! Where a client's token may come from, and finding it in a request.
//!
//! Browsers cannot set `Authorization` on a WebSocket, so the query parameter, the
//! `bearer.<token>` subprotocol entry and a cookie are first-class sources, tried in the
//! order the policy lists them.

use http::header::{AUTHORIZATION, COOKIE, SEC_WEBSOCKET_PROTOCOL};
use http::{HeaderMap, HeaderName};

/// The subprotocol entry prefix that carries a token: `Sec-WebSocket-Protocol: chat.v1, bearer.<token>`.
pub(crate) const SUBPROTOCOL_PREFIX: &str = "bearer.";

/// A `token_from` entry that names no source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid token source {0:?}: expected \"header\", \"query:NAME\", \"subprotocol\" or \"cookie:NAME\""
)]
pub(crate) struct InvalidTokenSource(String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenSource {
    /// `Authorization: Bearer <token>`
    Header,
    /// A query parameter of this name.
    Query(String),
    /// A `bearer.<token>` entry of `Sec-WebSocket-Protocol`.
    Subprotocol,
    /// A cookie of this name.
    Cookie(String),
}

impl TokenSource {
    /// Parses the `token_from` syntax: `header`, `query:NAME`, `subprotocol`, `cookie:NAME`.
    pub(crate) fn parse(text: &str) -> Result<Self, InvalidTokenSource> {
        let (kind, name) = match text.split_once(':') {
            Some((kind, name)) => (kind, Some(name)),
            None => (text, None),
        };
        let valid_name = |name: &str| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        match (kind, name) {
            ("header", None) => Ok(Self::Header),
            ("subprotocol", None) => Ok(Self::Subprotocol),
            ("query", None) => Ok(Self::Query("token".to_owned())),
            ("query", Some(name)) if valid_name(name) => Ok(Self::Query(name.to_owned())),
            ("cookie", Some(name)) if valid_name(name) => Ok(Self::Cookie(name.to_owned())),
            _ => Err(InvalidTokenSource(text.to_owned())),
        }
    }
}

/// A token found in a request, and which source it came from (so it can be removed).
#[derive(Debug, Clone)]
pub(crate) struct FoundToken {
    pub(crate) token: String,
    pub(crate) source: TokenSource,
}

/// Looks for a token in each source in order; the first source that has one wins.
pub(crate) fn find_token(
    sources: &[TokenSource],
    headers: &HeaderMap,
    query: Option<&str>,
) -> Option<FoundToken> {
    sources.iter().find_map(|source| {
        let token = match source {
            TokenSource::Header => bearer_from_authorization(headers),
            TokenSource::Query(name) => query_param(query, name),
            TokenSource::Subprotocol => offered_subprotocols(headers)
                .find_map(|entry| entry.strip_prefix(SUBPROTOCOL_PREFIX).map(str::to_owned)),
            TokenSource::Cookie(name) => cookie(headers, name),
        }?;
        (!token.is_empty()).then(|| FoundToken {
            token,
            source: source.clone(),
        })
    })
}

fn bearer_from_authorization(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// The first value of a query parameter, percent-decoded.
pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    crate::query::pairs(query?)
        .find(|pair| pair.key == name)
        .map(|pair| pair.value().into_owned())
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key.trim() == name).then(|| value.trim().trim_matches('"').to_owned())
        })
}

/// Every entry the client offered in `Sec-WebSocket-Protocol`, across repeated headers.
pub(crate) fn offered_subprotocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    header_list(headers, SEC_WEBSOCKET_PROTOCOL)
}

/// The comma-separated entries of a list-valued header, across repeated headers, trimmed.
pub(crate) fn header_list(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
}

/// The `Cookie` header without the named cookies; `None` when nothing else is left.
pub(crate) fn cookie_header_without(headers: &HeaderMap, names: &[&str]) -> Option<String> {
    let kept: Vec<&str> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .map(str::trim)
        .filter(|pair| {
            !pair.is_empty()
                && pair
                    .split_once('=')
                    .is_none_or(|(key, _)| !names.contains(&key.trim()))
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn sources_are_tried_in_order() {
        let h = headers(&[
            ("authorization", "Bearer from-header"),
            ("sec-websocket-protocol", "chat.v1, bearer.from-proto"),
            ("cookie", "a=1; session=from-cookie"),
        ]);
        let q = Some("x=1&token=from%2Dquery");
        let all = [
            TokenSource::Query("token".into()),
            TokenSource::Header,
            TokenSource::Subprotocol,
            TokenSource::Cookie("session".into()),
        ];
        let found = find_token(&all, &h, q).map(|f| f.token);
        assert_eq!(found.as_deref(), Some("from-query"));
        let found = find_token(&all[1..], &h, q).map(|f| f.token);
        assert_eq!(found.as_deref(), Some("from-header"));
        let found = find_token(&all[2..], &h, q).map(|f| f.token);
        assert_eq!(found.as_deref(), Some("from-proto"));
        let found = find_token(&all[3..], &h, q).map(|f| f.token);
        assert_eq!(found.as_deref(), Some("from-cookie"));
        assert!(find_token(&all, &HeaderMap::new(), None).is_none());
    }

    #[test]
    fn source_syntax() {
        assert_eq!(
            TokenSource::parse("query"),
            Ok(TokenSource::Query("token".into()))
        );
        assert_eq!(
            TokenSource::parse("cookie:sid"),
            Ok(TokenSource::Cookie("sid".into()))
        );
        assert!(TokenSource::parse("cookie").is_err());
        assert!(TokenSource::parse("carrier-pigeon").is_err());
        assert!(TokenSource::parse("query:a b").is_err());
    }

    #[test]
    fn cookie_removal_keeps_the_others() {
        let h = headers(&[("cookie", "a=1; session=secret"), ("cookie", "b=2")]);
        assert_eq!(
            cookie_header_without(&h, &["session"]).as_deref(),
            Some("a=1; b=2")
        );
        let h = headers(&[("cookie", "session=secret")]);
        assert_eq!(cookie_header_without(&h, &["session"]), None);
    }
}
