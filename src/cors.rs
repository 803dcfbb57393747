//! CORS at the edge, for routes that list `allowed_origins`: a preflight is answered here
//! without a token (a browser sends none with it), and every response to an allowed origin
//! says so. Other origins are refused by admission (403 `origin_not_allowed`).

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
/// checked that origin).
pub(crate) fn preflight<B>(request: &Request<B>) -> Response<Full<Bytes>> {
    let asked = request.headers();
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    if let Some(origin) = asked.get(header::ORIGIN) {
        allow(headers, origin);
    }
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

/// Marks a response as readable by `origin`, credentials included. The upstream's own
/// `Access-Control-Allow-Origin` and `-Credentials` give way: the edge decides, per route.
pub(crate) fn allow(headers: &mut HeaderMap, origin: &HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
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
        let response = preflight(&request);
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
        // An OPTIONS without the preflight headers is an ordinary request.
        let plain = Request::builder().method(Method::OPTIONS).body(()).unwrap();
        assert!(!is_preflight(&plain));
    }
}
