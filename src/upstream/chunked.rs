//! The chunked transfer coding of an upstream's response body (RFC 9112 §7.1), decoded as the
//! bytes arrive: every chunk's data that has arrived is taken in one go, so an event stream
//! written one small chunk per event leaves the edge in as few writes as it arrived in reads.
//! Strict about framing — a size that is not hex, a missing CRLF — since a body that ends
//! elsewhere than the upstream meant is how two hops come to disagree about a connection.

use bytes::{Buf, BytesMut};

/// Chunk sizes above this are refused (16 hex digits would overflow nothing, but no upstream
/// sends a chunk of petabytes).
const MAX_SIZE_DIGITS: u8 = 15;
/// The longest chunk extension or trailer line read (they are skipped).
const MAX_LINE: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed chunked body: {0}")]
pub(crate) struct ChunkError(&'static str);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex digits of a chunk size.
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size: an extension may follow, or the CR.
    SizeWhitespace {
        size: u64,
    },
    /// An extension to skip, up to the CR.
    Extension {
        size: u64,
        skipped: usize,
    },
    /// The LF after a size line.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: a trailer line, or the empty line that ends the body.
    TrailerStart,
    Trailer {
        skipped: usize,
    },
    TrailerLf {
        empty: bool,
    },
    Done,
}

/// Decodes one chunked body.
#[derive(Debug)]
pub(crate) struct Chunked {
    state: State,
}

impl Default for Chunked {
    fn default() -> Self {
        Self {
            state: State::Size { size: 0, digits: 0 },
        }
    }
}

impl Chunked {
    /// Whether the last chunk and the trailers have been read.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes what it can of `input`, appending chunk data to `out` until `out` holds
    /// `limit` bytes, `input` is used up, or the body ends (bytes after the end stay in
    /// `input`).
    pub(crate) fn decode(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        limit: usize,
    ) -> Result<(), ChunkError> {
        while !input.is_empty() && out.len() < limit {
            if let State::Data { left } = self.state {
                let take = (left.min(input.len() as u64) as usize).min(limit - out.len());
                out.extend_from_slice(&input[..take]);
                input.advance(take);
                let left = left - take as u64;
                self.state = if left == 0 {
                    State::DataCr
                } else {
                    State::Data { left }
                };
                continue;
            }
            if self.state == State::Done {
                return Ok(());
            }
            let byte = input[0];
            input.advance(1);
            self.state = self.step(byte)?;
        }
        Ok(())
    }

    /// The next state after one byte of framing.
    fn step(&self, byte: u8) -> Result<State, ChunkError> {
        Ok(match self.state {
            State::Size { size, digits } => match byte {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    if digits == MAX_SIZE_DIGITS {
                        return Err(ChunkError("chunk size too large"));
                    }
                    let digit = (byte as char).to_digit(16).unwrap_or(0) as u64;
                    State::Size {
                        size: size << 4 | digit,
                        digits: digits + 1,
                    }
                }
                _ if digits == 0 => return Err(ChunkError("chunk size is not hex")),
                b'\r' => State::SizeLf { size },
                b';' => State::Extension { size, skipped: 0 },
                b' ' | b'\t' => State::SizeWhitespace { size },
                _ => return Err(ChunkError("chunk size is not hex")),
            },
            State::SizeWhitespace { size } => match byte {
                b' ' | b'\t' => State::SizeWhitespace { size },
                b';' => State::Extension { size, skipped: 0 },
                b'\r' => State::SizeLf { size },
                _ => return Err(ChunkError("junk after a chunk size")),
            },
            State::Extension { size, skipped } => match byte {
                b'\r' => State::SizeLf { size },
                b'\n' => return Err(ChunkError("bare LF in a chunk size line")),
                _ if skipped >= MAX_LINE => return Err(ChunkError("chunk extension too long")),
                _ => State::Extension {
                    size,
                    skipped: skipped + 1,
                },
            },
            State::SizeLf { size } => match byte {
                b'\n' if size == 0 => State::TrailerStart,
                b'\n' => State::Data { left: size },
                _ => return Err(ChunkError("no LF after a chunk size")),
            },
            // Data is taken in bulk by `decode`, never byte by byte.
            State::Data { left } => State::Data { left },
            State::DataCr => match byte {
                b'\r' => State::DataLf,
                _ => return Err(ChunkError("chunk data longer than its size")),
            },
            State::DataLf => match byte {
                b'\n' => State::Size { size: 0, digits: 0 },
                _ => return Err(ChunkError("no LF after chunk data")),
            },
            State::TrailerStart => match byte {
                b'\r' => State::TrailerLf { empty: true },
                b'\n' => return Err(ChunkError("bare LF in a trailer")),
                _ => State::Trailer { skipped: 1 },
            },
            State::Trailer { skipped } => match byte {
                b'\r' => State::TrailerLf { empty: false },
                b'\n' => return Err(ChunkError("bare LF in a trailer")),
                _ if skipped >= MAX_LINE => return Err(ChunkError("trailer line too long")),
                _ => State::Trailer {
                    skipped: skipped + 1,
                },
            },
            State::TrailerLf { empty } => match byte {
                b'\n' if empty => State::Done,
                b'\n' => State::TrailerStart,
                _ => return Err(ChunkError("no LF after a trailer")),
            },
            State::Done => State::Done,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `body` fed in pieces of `piece` bytes; the data, and what is left after the end.
    fn decode(body: &[u8], piece: usize) -> Result<(Vec<u8>, Vec<u8>, bool), ChunkError> {
        let mut chunked = Chunked::default();
        let mut input = BytesMut::new();
        let mut out = BytesMut::new();
        for part in body.chunks(piece) {
            input.extend_from_slice(part);
            chunked.decode(&mut input, &mut out, usize::MAX)?;
        }
        Ok((out.to_vec(), input.to_vec(), chunked.is_done()))
    }

    #[test]
    fn bodies_decode_whole_however_they_are_cut() {
        let body =
            b"5\r\nhello\r\n1;name=value\r\n \r\nA \t;x\r\n0123456789\r\n0 \r\nx-trailer: 1\r\n\r\nNEXT";
        for piece in [1, 2, 3, 7, body.len()] {
            let (data, rest, done) = decode(body, piece).unwrap();
            assert_eq!(data, b"hello 0123456789", "pieces of {piece}");
            assert_eq!(rest, b"NEXT", "pieces of {piece}");
            assert!(done);
        }
    }

    #[test]
    fn data_is_taken_up_to_the_limit() {
        let mut chunked = Chunked::default();
        let mut input = BytesMut::from(&b"a\r\n0123456789\r\n0\r\n\r\n"[..]);
        let mut out = BytesMut::new();
        chunked.decode(&mut input, &mut out, 4).unwrap();
        assert_eq!(&out[..], b"0123");
        chunked.decode(&mut input, &mut out, 64).unwrap();
        assert_eq!(&out[..], b"0123456789");
        assert!(chunked.is_done() && input.is_empty());
    }

    #[test]
    fn bad_framing_is_refused() {
        for body in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\r\nhello\rX",
            b"ffffffffffffffff\r\n",
            b"\r\n",
            b"5;ext\nhello",
            b"0\r\nbad\ntrailer\r\n\r\n",
            b"0\r\n\n",
            b"5 junk\r\nhello\r\n0\r\n\r\n",
        ] {
            assert!(
                decode(body, body.len()).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn an_unfinished_body_is_not_done() {
        let (data, _, done) = decode(b"5\r\nhel", 64).unwrap();
        assert_eq!((data.as_slice(), done), (&b"hel"[..], false));
    }
}
