//! The path check against what it guards: a `.` or `..` segment written in any spelling an
//! upstream server resolves — each dot and each slash percent-encoded up to four times over,
//! through IIS's `%u`, overlong UTF-8 or the fullwidth forms — is refused, and a path whose
//! segments are names, however encoded, is let through.

use proptest::prelude::*;

use crate::admission::path::check;

/// What a server reads once decoded, how many times it is percent-encoded over (a server
/// decoding four times reads it), and the case of the hex digits.
type Written = (Vec<u8>, u8, bool);

/// `bytes` percent-encoded `depth` times: each byte as `%HH`, and each character of that
/// escape in turn encoded `depth - 1` times (so `.` twice over is `%252e` or `%25%32%65`, one
/// decoding at a time for the whole escape). At depth 0 the bytes are written as they are.
fn write(bytes: &[u8], depth: u8, upper: bool, out: &mut String) {
    if depth == 0 {
        out.push_str(std::str::from_utf8(bytes).unwrap_or("\u{fffd}"));
        return;
    }
    for byte in bytes {
        let escape = if upper {
            format!("%{byte:02X}")
        } else {
            format!("%{byte:02x}")
        };
        for character in escape.bytes() {
            write(&[character], depth - 1, upper, out);
        }
    }
}

fn written(parts: &[Written]) -> String {
    let mut out = String::new();
    for (bytes, depth, upper) in parts {
        write(bytes, *depth, *upper, &mut out);
    }
    out
}

fn owned(texts: &[&[u8]]) -> Vec<Vec<u8>> {
    texts.iter().map(|text| text.to_vec()).collect()
}

/// A dot as some server reads it. Forms that are not UTF-8 (overlong) are encoded at least once;
/// a `%u` form is an escape itself, so it has one encoding less to spare.
fn dot() -> impl Strategy<Value = Written> {
    let overlong = owned(&[b"\xc0\xae", b"\xe0\x80\xae", b"\xf0\x80\x80\xae"]);
    prop_oneof![
        (Just(b".".to_vec()), 0..=4u8, any::<bool>()),
        (Just("\u{ff0e}".as_bytes().to_vec()), 0..=4u8, any::<bool>()),
        (
            prop::sample::select(owned(&[b"%u002e", b"%U002E", b"%uff0e", b"%uFF0E"])),
            0..=3u8,
            any::<bool>()
        ),
        (prop::sample::select(overlong), 1..=4u8, any::<bool>()),
    ]
}

/// A slash, or what some server reads as one.
fn slash() -> impl Strategy<Value = Written> {
    let raw = owned(&[b"/", b"\\", "\u{ff0f}".as_bytes(), "\u{ff3c}".as_bytes()]);
    let overlong = owned(&[
        b"\xc0\xaf",
        b"\xe0\x80\xaf",
        b"\xf0\x80\x80\xaf",
        b"\xc1\x9c",
        b"\xe0\x81\x9c",
    ]);
    prop_oneof![
        3 => (prop::sample::select(raw), 0..=4u8, any::<bool>()),
        1 => (prop::sample::select(owned(&[b"%u002f", b"%u005c"])), 0..=3u8, any::<bool>()),
        1 => (prop::sample::select(overlong), 1..=4u8, any::<bool>()),
    ]
}

/// A segment that is a name: never `.` or `..`, before a `;` or not.
fn name() -> impl Strategy<Value = Vec<Written>> {
    let character = prop::sample::select(owned(&[
        b"a",
        b"Z",
        b"0",
        b"9",
        b"-",
        b"_",
        b"~",
        b".",
        b";",
        b"=",
        "é".as_bytes(),
        "日".as_bytes(),
    ]));
    // A dot segment drawn is made a name (a filter would reject too many cases).
    prop::collection::vec((character, 0..=4u8, any::<bool>()), 0..6).prop_map(|mut characters| {
        let text: Vec<u8> = characters.iter().flat_map(|(b, _, _)| b.clone()).collect();
        let before_parameter = text.split(|&b| b == b';').next().unwrap_or(&[]);
        if before_parameter == b"." || before_parameter == b".." {
            characters.insert(0, (b"a".to_vec(), 0, false));
        }
        characters
    })
}

/// Segments of names, each after a slash.
fn names() -> impl Strategy<Value = Vec<Written>> {
    prop::collection::vec((slash(), name()), 0..4).prop_map(|segments| {
        segments
            .into_iter()
            .flat_map(|(slash, name)| std::iter::once(slash).chain(name))
            .collect()
    })
}

proptest! {
    #![proptest_config(super::cases())]

    #[test]
    fn a_dot_segment_in_any_spelling_is_refused(
        before in names(),
        slash_before in slash(),
        dots in prop::collection::vec(dot(), 1..=2),
        parameter in prop::option::of(name()),
        after in prop::option::of((slash(), name())),
    ) {
        let mut parts = vec![(b"/api".to_vec(), 0, false)];
        parts.extend(before);
        parts.push(slash_before);
        parts.extend(dots);
        if let Some(parameter) = parameter {
            parts.push((b";".to_vec(), 0, false));
            parts.extend(parameter);
        }
        if let Some((slash, name)) = after {
            parts.push(slash);
            parts.extend(name);
        }
        let path = written(&parts);
        prop_assert!(check(&path).is_err(), "{:?} let through", path);
    }

    #[test]
    fn a_path_of_names_is_let_through_however_encoded(rest in names()) {
        let mut parts = vec![(b"/api".to_vec(), 0, false)];
        parts.extend(rest);
        let path = written(&parts);
        prop_assert!(check(&path).is_ok(), "{:?} refused", path);
    }

    #[test]
    fn any_path_is_judged_and_a_literal_dot_segment_never_let_through(
        path in prop_oneof![
            ".{0,40}",
            "(/|\\.|%|2|e|5|c|f|u|0|;|\\\\|\u{ff0e}|\u{ff0f}|a){0,40}",
        ]
    ) {
        if check(&path).is_ok() {
            prop_assert!(
                !path.split(['/', '\\']).any(|segment| segment == "." || segment == ".."),
                "{:?} let through",
                path
            );
        }
    }
}
