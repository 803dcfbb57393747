//! Query strings and the token sources: the lazy query reader against the `form_urlencoded`
//! crate, and a cookie list with the token's cookies taken out.

use http::HeaderMap;
use http::header::COOKIE;
use proptest::prelude::*;

use crate::auth::token_source::{cookie_header_without, query_param};
use crate::query::pairs;

/// Query text made of the characters that matter to a parser, and some that do not.
fn query_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => prop::sample::select(vec![
            "&", "=", "+", "%", "%2", "%20", "%3D", "%26", "%2B", "%00", "%C3%A9", "%FF", "%e9",
            ";", "token", "conversation_id", "a", "é", "[]", "%5B%5D", ".", " ",
        ])
        .prop_map(str::to_owned),
        1 => ".{0,4}",
    ];
    prop::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(super::cases())]

    #[test]
    fn query_pairs_read_as_form_urlencoded_does(query in query_text()) {
        let ours: Vec<(String, String)> = pairs(&query)
            .map(|pair| (pair.key.to_string(), pair.value().into_owned()))
            .collect();
        let reference: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .map(|(key, value)| (key.into_owned(), value.into_owned()))
            .collect();
        prop_assert_eq!(&ours, &reference);
        for pair in pairs(&query) {
            // An exact value is the value, or there is none because its bytes are not UTF-8.
            match pair.exact_value() {
                Some(exact) => prop_assert_eq!(exact, pair.value()),
                None => prop_assert!(pair.value().contains(char::REPLACEMENT_CHARACTER)),
            }
        }
        for name in ["token", "a", "conversation_id"] {
            let first = reference.iter().find(|(key, _)| key == name).map(|(_, v)| v.clone());
            prop_assert_eq!(query_param(Some(&query), name), first);
        }
    }

    #[test]
    fn a_cookie_list_loses_exactly_the_named_cookies(
        cookies in prop::collection::vec(
            (prop::sample::select(vec!["session", "token", "theme", " token", "token "]),
             "[a-zA-Z0-9=\"]{0,6}"),
            0..6,
        ),
        headers in 1usize..3,
    ) {
        let mut map = HeaderMap::new();
        let texts: Vec<String> = cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for chunk in texts.chunks(texts.len().div_ceil(headers).max(1)) {
            map.append(COOKIE, chunk.join("; ").parse().unwrap());
        }
        let rest = cookie_header_without(&map, &["token"]);
        let kept: Vec<&str> = rest.as_deref().map_or(Vec::new(), |r| r.split("; ").collect());
        for text in &kept {
            prop_assert!(text.split_once('=').is_none_or(|(k, _)| k.trim() != "token"));
        }
        let expected = texts.iter().filter(|t| !t.trim_start().starts_with("token")).count();
        prop_assert_eq!(kept.len(), expected, "{:?} -> {:?}", texts, rest);
    }
}
