//! The request path, as upstream servers may read it: `.` and `..` segments are refused in
//! every spelling some server resolves, since a server or intermediary that normalises them
//! would route a request outside the path its route names.

use super::refusal::Refusal;

/// Decodings tried on a path: servers decode once, a few twice; a path still holding an escape
/// after this many was made to be read by a decoder that keeps going, and is refused.
const DECODINGS: usize = 4;

/// Byte sequences some server reads as a dot or a slash once decoded: overlong UTF-8
/// (C0 AE is `.` to decoders that do not check), and the fullwidth forms NFKC folds to ASCII.
const READ_AS: [(&[u8], u8); 12] = [
    (&[0xc0, 0xae], b'.'),
    (&[0xe0, 0x80, 0xae], b'.'),
    (&[0xf0, 0x80, 0x80, 0xae], b'.'),
    (&[0xef, 0xbc, 0x8e], b'.'),
    (&[0xc0, 0xaf], b'/'),
    (&[0xe0, 0x80, 0xaf], b'/'),
    (&[0xf0, 0x80, 0x80, 0xaf], b'/'),
    (&[0xc1, 0x9c], b'/'),
    (&[0xe0, 0x81, 0x9c], b'/'),
    (&[0xef, 0xbc, 0x8f], b'/'),
    (&[0xef, 0xbc, 0xbc], b'/'),
    (b"\\", b'/'),
];

fn refused<T>(message: &'static str) -> Result<T, Refusal> {
    Err(Refusal::BadHandshake(message))
}

/// Refuses a path with a `.` or `..` segment in any spelling an upstream server resolves:
/// percent-encoded (`%2e`), decoded twice (`%252e`, `%25%32%65`), IIS's `%u002e`, overlong
/// UTF-8, fullwidth; with `\`, `%2f` or `%5c` for a slash; and `..;…`, a path parameter ending
/// the segment (`..;` is `..` to Tomcat). A NUL byte, encoded at any depth, is refused too.
pub(crate) fn check(path: &str) -> Result<(), Refusal> {
    let bytes = path.as_bytes();
    // The common path has nothing a server could read differently: one look at the bytes.
    if bytes.is_ascii() && memchr::memchr3(b'%', b'\\', b';', bytes).is_none() {
        if path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
        {
            return refused("dot segments are not allowed in the path");
        }
        return Ok(());
    }
    let mut normal = read_as_ascii(bytes);
    let mut decodings = 0;
    while let Some(decoded) = decode_once(&normal) {
        decodings += 1;
        if decodings > DECODINGS {
            return refused("a path encoded over and over");
        }
        normal = read_as_ascii(&decoded);
    }
    if normal.contains(&0) {
        return refused("a NUL byte in the path");
    }
    let dots = |segment: &[u8]| {
        let name = segment.split(|&b| b == b';').next().unwrap_or(segment);
        name == b"." || name == b".."
    };
    if normal.split(|&b| b == b'/').any(dots) {
        return refused("dot segments are not allowed in the path");
    }
    Ok(())
}

/// `bytes` with what some server reads as a dot or a slash ([`READ_AS`]) made one.
fn read_as_ascii(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    'bytes: while at < bytes.len() {
        let byte = bytes[at];
        if byte == b'\\' || byte >= 0xc0 {
            for (sequence, read) in READ_AS {
                if bytes[at..].starts_with(sequence) {
                    out.push(read);
                    at += sequence.len();
                    continue 'bytes;
                }
            }
        }
        out.push(byte);
        at += 1;
    }
    out
}

/// One percent-decoding of `bytes`: every `%HH`, and IIS's `%uHHHH` (as UTF-8); `None` when
/// there was nothing to decode. Each decoding shortens the path.
fn decode_once(bytes: &[u8]) -> Option<Vec<u8>> {
    memchr::memchr(b'%', bytes)?;
    let hex = |digits: &[u8]| -> Option<u32> {
        let text = std::str::from_utf8(digits).ok()?;
        u32::from_str_radix(text, 16).ok()
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut decoded = false;
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let rest = &bytes[at + 1..];
            if let Some(byte) = rest
                .get(..2)
                .filter(|d| d.iter().all(u8::is_ascii_hexdigit))
            {
                out.push(hex(byte).unwrap_or(0) as u8);
                at += 3;
                decoded = true;
                continue;
            }
            let unicode = rest
                .get(..5)
                .filter(|d| {
                    d[0].eq_ignore_ascii_case(&b'u') && d[1..].iter().all(u8::is_ascii_hexdigit)
                })
                .and_then(|d| char::from_u32(hex(&d[1..])?));
            if let Some(char) = unicode {
                out.extend_from_slice(char.encode_utf8(&mut [0; 4]).as_bytes());
                at += 6;
                decoded = true;
                continue;
            }
        }
        out.push(bytes[at]);
        at += 1;
    }
    decoded.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn dot_segments_in_any_spelling_a_server_resolves_and_nothing_else() {
        for path in [
            "/api/.",
            "/api/../admin",
            "/api/%2e%2e/admin",
            "/api/.%2E/admin",
            "/api/%2E./admin",
            // Tomcat's path parameter, IIS's backslash, encoded slashes and backslashes.
            "/api/..;/admin",
            "/api/..;jsessionid=x/admin",
            "/api\\..\\admin",
            "/api/..%2fadmin",
            "/api/..%2Fadmin",
            "/api/..%5cadmin",
            "/api/%2e%2e%5cadmin",
            "/api/a%00b",
            // Decoded twice, its hex digits encoded too, or deeper.
            "/api/%252e%252e/admin",
            "/api/%25252e%25252e/admin",
            "/api/%25%32%65%25%32%65/admin",
            "/api/%2%65./admin",
            "/api/..%252fadmin",
            "/api/a%2500b",
            "/api/%2525252e./admin",
            // Overlong UTF-8, IIS's %u, fullwidth (encoded and raw).
            "/api/%c0%ae%c0%ae/admin",
            "/api/%C0%AE./admin",
            "/api/..%c0%afadmin",
            "/api/%e0%80%ae%e0%80%ae/admin",
            "/api/%f0%80%80%ae./admin",
            "/api/..%e0%81%9cadmin",
            "/api/%u002e%u002e/admin",
            "/api/..%u005cadmin",
            "/api/%uff0e%uff0e/admin",
            "/api/%ef%bc%8e%ef%bc%8e/admin",
            "/api/..%ef%bc%bcadmin",
            "/api/\u{ff0e}\u{ff0e}/admin",
            "/api/..\u{ff0f}admin",
        ] {
            assert!(check(path).is_err(), "{path}");
        }
        for path in [
            "/api",
            "/api/...",
            "/api/.a/a.",
            "/api/%2e%2e%2e",
            "/api/a%2fb",
            "/api/a;b=c",
            "/api/%",
            "/api/%2",
            "/api/%zz",
            "/api/caf%C3%A9",
            "/api/café",
            "/api/100%25",
            "/api/%25%25",
            "/api/%c0",
            "/api/%u",
            "/api/%u12",
            "/api/%ud800",
            "/api/日本語/%E6%97%A5",
        ] {
            assert!(check(path).is_ok(), "{path}");
        }
        // A path nested past the decodings a server makes is refused, however long, quickly.
        let deep = format!("/api/%{}2e", "25".repeat(30_000));
        assert!(check(&deep).is_err());
    }
}
