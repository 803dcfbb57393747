//! CORS at the edge, for routes that list `allowed_origins`: a preflight is answered here
//! without a token (a browser sends none with it), and every response to an allowed origin
//! says so. Other origins are refused by admission (403 `origin_not_allowed`).
//!
//! An origin the route names is granted credentials (cookies); one let in only by `"*"` is
//! not: `Access-Control-Allow-Origin: *` lets any page read a response, but not with the
//! user's cookies — were `*` to echo every origin with credentials, any website a user visits
//! could read their chats through a cookie token.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

/// How long a browser may keep a preflight's answer.
const MAX_AGE_SECONDS: &str = "600";

/// Whether `request` is a CORS preflight: `OPTIONS` naming an origin and the method to come.
pub(crate) fn is_preflight<B>(request: &Request<B>) -> bool {
    request.method() == Method::OPTIONS
        && request.headers().contains_key(header::ORIGIN)
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// 204 with what the preflight asked for allowed, for the origin it came from (admission has
/// checked that origin against `allowed`).
pub(crate) fn preflight<B>(request: &Request<B>, allowed: &[String]) -> Response<Full<Bytes>> {
    let asked = request.headers();
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    allow(headers, allowed, asked.get(header::ORIGIN));
    if let Some(method) = asked.get(header::ACCESS_CONTROL_REQUEST_METHOD) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, method.clone());
    }
    if let Some(requested) = asked.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested.clone());
    }
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(MAX_AGE_SECONDS),
    );
    headers.append(
        header::VARY,
        HeaderValue::from_static("Access-Control-Request-Method, Access-Control-Request-Headers"),
    );
    response
}

/// Marks a response of a route that allows the origins `allowed` as readable by `origin` (the
/// request's, which admission let in): credentials included when the route names it. The
/// upstream's own `Access-Control-Allow-Origin` and `-Credentials` give way: the edge decides,
/// per route. Every response of such a route varies by `Origin`, one without it too, so that
/// a cache never hands one origin's answer to another.
pub(crate) fn allow(headers: &mut HeaderMap, allowed: &[String], origin: Option<&HeaderValue>) {
    headers.remove(header::ACCESS_CONTROL_ALLOW_CREDENTIALS);
    match origin {
        Some(origin) if names(allowed, origin) => {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        Some(_) => {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        }
        None => {
            headers.remove(header::ACCESS_CONTROL_ALLOW_ORIGIN);
        }
    }
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// Whether `allowed` names `origin` itself (rather than letting it in by `"*"`).
fn names(allowed: &[String], origin: &HeaderValue) -> bool {
    origin.to_str().is_ok_and(|origin| {
        allowed
            .iter()
            .any(|entry| entry.eq_ignore_ascii_case(origin))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preflight_is_answered_with_what_it_asked_for() {
        let request = Request::builder()
            .method(Method::OPTIONS)
            .header("origin", "https://chat.example.com")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type, x-client")
            .body(())
            .unwrap();
        assert!(is_preflight(&request));
        let allowed = ["https://chat.example.com".to_owned(), "*".to_owned()];
        let response = preflight(&request, &allowed);
        assert_eq!(response.status(), 204);
        let headers = response.headers();
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://chat.example.com"
        );
        assert_eq!(headers["access-control-allow-credentials"], "true");
        assert_eq!(headers["access-control-allow-methods"], "POST");
        assert_eq!(
            headers["access-control-allow-headers"],
            "content-type, x-client"
        );
        let vary: Vec<&str> = headers
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert!(vary.contains(&"Origin"), "{vary:?}");
        // An origin let in by "*" may read, but never with the user's cookies.
        let other = Request::builder()
            .method(Method::OPTIONS)
            .header("origin", "https://elsewhere.example")
            .header("access-control-request-method", "GET")
            .body(())
            .unwrap();
        let response = preflight(&other, &allowed);
        assert_eq!(response.headers()["access-control-allow-origin"], "*");
        assert!(
            !response
                .headers()
                .contains_key("access-control-allow-credentials")
        );
        // An OPTIONS without the preflight headers is an ordinary request.
        let plain = Request::builder().method(Method::OPTIONS).body(()).unwrap();
        assert!(!is_preflight(&plain));
    }
}
