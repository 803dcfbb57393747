//! Query strings read lazily: every key is decoded (a client may percent-encode a key to slip
//! past a check), a value only when it is asked for. The query carries a JWT of several hundred
//! bytes on most handshakes, and decoding it for every look at the query was a tenth of a
//! handshake's work.

use std::borrow::Cow;

/// One `key=value` pair of a query string.
pub(crate) struct Pair<'a> {
    /// The key, decoded.
    pub(crate) key: Cow<'a, str>,
    raw_value: &'a str,
    /// The pair as the client wrote it.
    pub(crate) raw: &'a str,
}

impl<'a> Pair<'a> {
    /// The value, decoded (`+` is a space, `%XX` a byte, invalid UTF-8 replaced).
    pub(crate) fn value(&self) -> Cow<'a, str> {
        decode(self.raw_value)
    }

    /// The value, decoded; `None` when its bytes are not UTF-8 (nothing replaced: for values
    /// that are signed, where two byte strings must never read as one).
    pub(crate) fn exact_value(&self) -> Option<Cow<'a, str>> {
        if memchr::memchr2(b'%', b'+', self.raw_value.as_bytes()).is_none() {
            return Some(Cow::Borrowed(self.raw_value));
        }
        let spaced: Vec<u8> = self
            .raw_value
            .bytes()
            .map(|b| if b == b'+' { b' ' } else { b })
            .collect();
        let bytes: Vec<u8> = percent_encoding::percent_decode(&spaced).collect();
        String::from_utf8(bytes).ok().map(Cow::Owned)
    }
}

/// The pairs of `application/x-www-form-urlencoded` text, in order, empty ones skipped.
pub(crate) fn pairs(query: &str) -> impl Iterator<Item = Pair<'_>> {
    // Split with the memchr crate's vectorised search: a query holds a token of hundreds of
    // bytes, which `str::split` would walk a byte (or word) at a time, twice.
    let bytes = query.as_bytes();
    let mut start = 0;
    std::iter::from_fn(move || {
        while start <= bytes.len() {
            let end = memchr::memchr(b'&', &bytes[start..]).map_or(bytes.len(), |at| start + at);
            let raw = &query[start..end];
            start = end + 1;
            if raw.is_empty() {
                continue;
            }
            let (key, raw_value) = match memchr::memchr(b'=', raw.as_bytes()) {
                Some(at) => (&raw[..at], &raw[at + 1..]),
                None => (raw, ""),
            };
            return Some(Pair {
                key: decode(key),
                raw_value,
                raw,
            });
        }
        None
    })
}

fn decode(raw: &str) -> Cow<'_, str> {
    if memchr::memchr2(b'%', b'+', raw.as_bytes()).is_none() {
        return Cow::Borrowed(raw);
    }
    let spaced: Vec<u8> = raw
        .bytes()
        .map(|b| if b == b'+' { b' ' } else { b })
        .collect();
    let bytes: Vec<u8> = percent_encoding::percent_decode(&spaced).collect();
    Cow::Owned(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_like_form_urlencoded() {
        for query in [
            "token=abc.def.ghi&conversation_id=c%2042&x",
            "a=1&&b=%E2%9C%93+ok&c=%ff&tok%65n=sneaky&=empty&d=",
        ] {
            let ours: Vec<(String, String)> = pairs(query)
                .map(|pair| (pair.key.to_string(), pair.value().to_string()))
                .collect();
            let theirs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
            assert_eq!(ours, theirs, "{query}");
        }
    }

    #[test]
    fn raw_pairs_are_as_written() {
        let raw: Vec<&str> = pairs("a=%41&&b").map(|pair| pair.raw).collect();
        assert_eq!(raw, ["a=%41", "b"]);
    }
}
