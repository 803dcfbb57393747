//! RFC 6455 frames, read without being decoded into messages.
//!
//! The relay passes data frames on without decoding them into messages: a server's frames go to
//! the client byte for byte, and a client's frame goes upstream with its header unchanged but
//! for the masking key, which the edge replaces with a fresh one of its own (RFC 6455 §5.3: a
//! client that chose its key would choose the bytes the upstream's network sees). A frame
//! larger than [`WHOLE_FRAME_LIMIT`] is passed on as it arrives, as fragments of its message,
//! each a whole frame (RFC 6455 §5.4 lets an intermediary refragment when no extension is
//! negotiated); a smaller one waits until it is all read. Either way what the edge has written
//! to a peer always ends at a frame boundary, so a close can always follow at once, whatever
//! the other side is in the middle of. What the edge must still know — where frames and
//! messages begin and end, whether a text message is valid UTF-8, whether a message is over the
//! size limit, and what a control frame says — is read here from the headers and, for text,
//! from the payload as it streams past. Nothing waits for a whole message, nor for a whole
//! frame over 8 KiB.

use std::fmt;

use super::close::FrameError;

pub(crate) mod opcode {
    pub(crate) const CONTINUATION: u8 = 0;
    pub(crate) const TEXT: u8 = 1;
    pub(crate) const BINARY: u8 = 2;
    pub(crate) const CLOSE: u8 = 8;
    pub(crate) const PING: u8 = 9;
    pub(crate) const PONG: u8 = 10;
}

/// The largest control frame payload (RFC 6455 §5.5).
pub(crate) const MAX_CONTROL_PAYLOAD: usize = 125;

/// Data frames up to this size (header included) wait until they are all read and go on as
/// they are; larger ones go on as they arrive, as fragments. Half a read buffer: a chat's
/// messages and an LLM's tokens keep their framing, and what waits fits the buffer.
pub(crate) const WHOLE_FRAME_LIMIT: usize = 8 * 1024;

/// Who wrote the frames being read: clients must mask, servers must not (RFC 6455 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Writer {
    Client,
    Server,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
    header_len: usize,
}

/// Parses a frame header; `Ok(None)` when `input` does not hold all of it yet.
fn parse_header(input: &[u8]) -> Result<Option<Header>, FrameError> {
    let [first, second, ..] = *input else {
        return Ok(None);
    };
    if first & 0x70 != 0 {
        // No extension is ever negotiated through the edge.
        return Err(FrameError::Protocol("reserved bits set"));
    }
    let masked = second & 0x80 != 0;
    let (len, mut header_len) = match second & 0x7f {
        126 => {
            let Some(bytes) = input.get(2..4) else {
                return Ok(None);
            };
            let len = u16::from_be_bytes([bytes[0], bytes[1]]);
            if len < 126 {
                // RFC 6455 §5.2: the minimal number of bytes must be used.
                return Err(FrameError::Protocol("length not minimally encoded"));
            }
            (u64::from(len), 4)
        }
        127 => {
            let Some(bytes) = input.get(2..10) else {
                return Ok(None);
            };
            let mut be = [0u8; 8];
            be.copy_from_slice(bytes);
            let len = u64::from_be_bytes(be);
            if len >> 63 != 0 {
                return Err(FrameError::Protocol("frame length out of range"));
            }
            if len <= 0xffff {
                return Err(FrameError::Protocol("length not minimally encoded"));
            }
            (len, 10)
        }
        short => (u64::from(short), 2),
    };
    let mask = if masked {
        let Some(bytes) = input.get(header_len..header_len + 4) else {
            return Ok(None);
        };
        header_len += 4;
        Some([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        None
    };
    Ok(Some(Header {
        fin: first & 0x80 != 0,
        opcode: first & 0x0f,
        mask,
        len,
        header_len,
    }))
}

/// XORs `data` with `mask`, starting `offset` bytes into the mask's 4-byte cycle.
pub(crate) fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let rotated = {
        let mut m = [0u8; 4];
        for (i, byte) in m.iter_mut().enumerate() {
            *byte = mask[(offset + i) & 3];
        }
        m
    };
    let word = u64::from_ne_bytes([
        rotated[0], rotated[1], rotated[2], rotated[3], rotated[0], rotated[1], rotated[2],
        rotated[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ word).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= rotated[i & 3];
    }
}

/// Checks UTF-8 that arrives in pieces split anywhere, failing as soon as a byte makes the
/// text invalid (not only at the end).
#[derive(Debug, Default, Clone)]
pub(crate) struct Utf8Validator {
    /// The start of a character whose remaining bytes are in the next piece.
    partial: [u8; 4],
    partial_len: u8,
}

impl Utf8Validator {
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Result<(), FrameError> {
        if self.partial_len > 0 {
            let have = usize::from(self.partial_len);
            let want = utf8_char_len(self.partial[0]);
            let take = (want - have).min(bytes.len());
            self.partial[have..have + take].copy_from_slice(&bytes[..take]);
            let now = have + take;
            bytes = &bytes[take..];
            match std::str::from_utf8(&self.partial[..now]) {
                Ok(_) => self.partial_len = 0,
                Err(e) if e.error_len().is_none() && now < want => {
                    self.partial_len = now as u8;
                    return Ok(());
                }
                Err(_) => return Err(FrameError::InvalidUtf8),
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let rest = &bytes[e.valid_up_to()..];
                self.partial[..rest.len()].copy_from_slice(rest);
                self.partial_len = rest.len() as u8;
                Ok(())
            }
            Err(_) => Err(FrameError::InvalidUtf8),
        }
    }

    /// The text ended: a character cut short is invalid.
    pub(crate) fn finish(&mut self) -> Result<(), FrameError> {
        let complete = self.partial_len == 0;
        self.partial_len = 0;
        if complete {
            Ok(())
        } else {
            Err(FrameError::InvalidUtf8)
        }
    }
}

/// A whole text payload: ASCII (most LLM tokens) is checked a word at a time first.
fn check_utf8(text: &[u8]) -> Result<(), FrameError> {
    if text.is_ascii() || std::str::from_utf8(text).is_ok() {
        Ok(())
    } else {
        Err(FrameError::InvalidUtf8)
    }
}

/// The length of a UTF-8 character from its first byte (1 for bytes that cannot start one, so
/// that `from_utf8` reports them).
fn utf8_char_len(first: u8) -> usize {
    match first {
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 1,
    }
}

/// Turns payload bytes masked with `from` into the same bytes masked with `to`, `offset` bytes
/// into the frame; a whole text payload is checked for UTF-8 on the way.
fn remask(
    payload: &mut [u8],
    from: [u8; 4],
    to: [u8; 4],
    offset: usize,
    text: bool,
) -> Result<(), FrameError> {
    if text {
        apply_mask(payload, from, offset);
        check_utf8(payload)?;
        apply_mask(payload, to, offset);
    } else {
        let delta = [
            from[0] ^ to[0],
            from[1] ^ to[1],
            from[2] ^ to[2],
            from[3] ^ to[3],
        ];
        apply_mask(payload, delta, offset);
    }
    Ok(())
}

/// [`remask`] for a piece of a text message, whose characters may be split between pieces.
fn remask_text(
    payload: &mut [u8],
    from: [u8; 4],
    to: [u8; 4],
    offset: usize,
    utf8: &mut Utf8Validator,
) -> Result<(), FrameError> {
    apply_mask(payload, from, offset);
    utf8.feed(payload)?;
    apply_mask(payload, to, offset);
    Ok(())
}

/// A control frame, read whole (its payload is at most 125 bytes), unmasked.
#[derive(Clone, Copy)]
pub(crate) struct Control {
    pub(crate) opcode: u8,
    payload: [u8; MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl Control {
    pub(crate) fn payload(&self) -> &[u8] {
        &self.payload[..usize::from(self.len)]
    }
}

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Control")
            .field("opcode", &self.opcode)
            .field("len", &self.len)
            .finish()
    }
}

/// Appends a frame header: `first` is the FIN bit and opcode, `len` the payload's length.
fn write_header(out: &mut Vec<u8>, first: u8, len: usize, mask: Option<[u8; 4]>) {
    out.extend_from_slice(PieceHeader::encode(first, len, mask).bytes());
}

/// Appends a final frame with `payload` to `out`; masked with a fresh key when `masked`
/// (frames the edge sends upstream, as a client).
pub(crate) fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], masked: bool) {
    let mask = masked.then(mask_key);
    write_header(out, 0x80 | opcode, payload.len(), mask);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
}

/// Appends a close frame (`code` `None`: one without a body). A control payload is at most
/// 125 bytes: the reason is cut at a character boundary.
pub(crate) fn write_close(out: &mut Vec<u8>, code: Option<u16>, reason: &str, masked: bool) {
    let mut body = [0u8; MAX_CONTROL_PAYLOAD];
    let len = match code {
        None => 0,
        Some(code) => {
            body[..2].copy_from_slice(&code.to_be_bytes());
            let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            body[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
            2 + end
        }
    };
    write_frame(out, opcode::CLOSE, &body[..len], masked);
}

/// A masking key: RFC 6455 §5.3 asks for an unpredictable one (a CSPRNG seeded from the
/// system, per thread).
fn mask_key() -> [u8; 4] {
    rand::random()
}

/// The header of a fragment the edge cuts from a frame that has not all arrived (empty when
/// nothing of the frame's payload has: nothing goes on yet).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PieceHeader {
    bytes: [u8; 14],
    len: u8,
}

impl PieceHeader {
    fn new(first: u8, payload: usize, key: Option<[u8; 4]>) -> Self {
        if payload == 0 {
            return PieceHeader::default();
        }
        Self::encode(first, payload, key)
    }

    /// A frame header: `first` is the FIN bit and opcode, `len` the payload's length.
    fn encode(first: u8, len: usize, key: Option<[u8; 4]>) -> Self {
        let mut header = PieceHeader::default();
        let mask_bit = if key.is_some() { 0x80 } else { 0 };
        header.bytes[0] = first;
        let mut end = match len {
            0..=125 => {
                header.bytes[1] = mask_bit | len as u8;
                2
            }
            126..=0xffff => {
                header.bytes[1] = mask_bit | 126;
                header.bytes[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                4
            }
            _ => {
                header.bytes[1] = mask_bit | 127;
                header.bytes[2..10].copy_from_slice(&(len as u64).to_be_bytes());
                10
            }
        };
        if let Some(key) = key {
            header.bytes[end..end + 4].copy_from_slice(&key);
            end += 4;
        }
        header.len = end as u8;
        header
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// What goes on for a data event whose bytes start `input`: (a header the edge wrote, the bytes
/// that follow it) — nothing and the bytes as they are for a whole frame, a fragment's own
/// header and the payload among them for a piece.
pub(crate) fn outgoing<'a>(
    input: &'a [u8],
    len: usize,
    payload: usize,
    piece: &'a Option<PieceHeader>,
) -> (&'a [u8], &'a [u8]) {
    match piece {
        None => (&[], &input[..len]),
        Some(piece) => (piece.bytes(), &input[len - payload..len]),
    }
}

/// What the reader found at the start of its input.
#[derive(Debug)]
pub(crate) enum Event {
    /// The input holds too little to go on; nothing was consumed.
    NeedMore,
    /// The first `len` bytes of the input belong to a data frame: its header (when it starts
    /// there) and some or all of its payload. They go on as they are when they are the whole
    /// frame; otherwise `piece` is set, and the header written in their place makes the
    /// payload among them a fragment of its own.
    Data {
        len: usize,
        /// How many of them are payload (the rest is the frame's header).
        payload: usize,
        /// These bytes begin a message (its first frame's header).
        message_start: bool,
        /// These bytes end a message.
        message_end: bool,
        piece: Option<PieceHeader>,
    },
    /// A whole control frame (`len` bytes of input), not to be passed on.
    Control { len: usize, frame: Control },
}

/// What a skim passed over: whole messages, up to the first that is not simple, or that
/// broke the protocol (`error`: the frames before it are good and go on).
#[derive(Debug, Default)]
pub(crate) struct Skimmed {
    pub(crate) len: usize,
    pub(crate) messages: u64,
    pub(crate) payload_bytes: u64,
    pub(crate) error: Option<FrameError>,
}

/// Reads one peer's frames: headers, fragmentation, masking, the size limit and text validity.
#[derive(Debug)]
pub(crate) struct FrameReader {
    writer: Writer,
    max_message: u64,
    /// [`WHOLE_FRAME_LIMIT`], but for tests.
    whole_up_to: u64,
    /// A text frame waiting to be whole: how much of its payload has been checked, and the
    /// UTF-8 state after it.
    waiting: Option<(usize, Utf8Validator)>,
    /// Payload bytes of the current data frame not read yet.
    remaining: u64,
    /// Whether a data frame's payload is being read (its header is behind us).
    in_frame: bool,
    frame_fin: bool,
    /// The opcode the current frame's next fragment goes on with: its own, until a fragment of
    /// it has gone, then continuation.
    piece_opcode: u8,
    /// The client's masking key of the current frame.
    mask: [u8; 4],
    /// The edge's own key that replaces it (client frames only).
    remask: [u8; 4],
    /// How many payload bytes of the current frame have been read (for the mask's phase).
    frame_offset: u64,
    /// The message in progress: `Some(true)` for text, `Some(false)` for binary.
    message: Option<bool>,
    message_len: u64,
    utf8: Utf8Validator,
}

impl FrameReader {
    pub(crate) fn new(writer: Writer, max_message: usize) -> Self {
        Self {
            writer,
            max_message: max_message as u64,
            whole_up_to: WHOLE_FRAME_LIMIT as u64,
            waiting: None,
            remaining: 0,
            in_frame: false,
            frame_fin: false,
            piece_opcode: 0,
            mask: [0; 4],
            remask: [0; 4],
            frame_offset: 0,
            message: None,
            message_len: 0,
            utf8: Utf8Validator::default(),
        }
    }

    /// Frames up to `limit` bytes go on whole, larger ones in fragments as they arrive.
    #[cfg(test)]
    pub(crate) fn with_whole_frames_up_to(mut self, limit: usize) -> Self {
        self.whole_up_to = limit as u64;
        self
    }

    /// Whether the bytes passed on so far end inside a message.
    pub(crate) fn mid_message(&self) -> bool {
        self.message.is_some()
    }

    /// Passes over the whole single-frame data messages that start `input` — what a stream of
    /// LLM tokens is made of — and says what it passed over (and the violation it stopped at,
    /// if any: what is before it is good). It stops at anything else (a fragment, a control frame, a frame not all read yet), which
    /// [`FrameReader::next`] then reads.
    pub(crate) fn skim(&mut self, input: &mut [u8]) -> Skimmed {
        let mut skimmed = Skimmed::default();
        if self.in_frame || self.message.is_some() {
            return skimmed;
        }
        let masked = self.writer == Writer::Client;
        let header_len = if masked { 6 } else { 2 };
        while let [first, second, ..] = input[skimmed.len..] {
            let len = usize::from(second & 0x7f);
            let opcode = first & 0x0f;
            let simple = first & 0xf0 == 0x80
                && matches!(opcode, opcode::TEXT | opcode::BINARY)
                && len < 126
                && (second & 0x80 != 0) == masked;
            let at = skimmed.len;
            let end = at + header_len + len;
            if !simple || end > input.len() || len as u64 > self.max_message {
                break;
            }
            let text = opcode == opcode::TEXT;
            if masked {
                let key_at = at + 2;
                let mut client_key = [0u8; 4];
                client_key.copy_from_slice(&input[key_at..key_at + 4]);
                let own_key = mask_key();
                input[key_at..key_at + 4].copy_from_slice(&own_key);
                let remasked = remask(
                    &mut input[at + header_len..end],
                    client_key,
                    own_key,
                    0,
                    text,
                );
                if let Err(error) = remasked {
                    skimmed.error = Some(error);
                    break;
                }
            } else if text && let Err(error) = check_utf8(&input[at + header_len..end]) {
                skimmed.error = Some(error);
                break;
            }
            skimmed.len = end;
            skimmed.messages += 1;
            skimmed.payload_bytes += len as u64;
            // A frame that waited to be whole is read now.
            self.waiting = None;
        }
        skimmed
    }

    /// Reads what starts `input`. Call again with the input advanced by the event's length.
    /// A client's data frames are re-masked in `input` as they are read.
    pub(crate) fn next(&mut self, input: &mut [u8]) -> Result<Event, FrameError> {
        if self.in_frame {
            return self.payload(input, 0, false);
        }
        let Some(header) = parse_header(input)? else {
            return Ok(Event::NeedMore);
        };
        match (self.writer, header.mask) {
            (Writer::Client, None) => return Err(FrameError::Protocol("unmasked client frame")),
            (Writer::Server, Some(_)) => return Err(FrameError::Protocol("masked server frame")),
            _ => {}
        }
        match header.opcode {
            opcode::CLOSE | opcode::PING | opcode::PONG => {
                if !header.fin {
                    return Err(FrameError::Protocol("fragmented control frame"));
                }
                if header.len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(FrameError::Protocol("control frame too long"));
                }
                let total = header.header_len + header.len as usize;
                let Some(bytes) = input.get(header.header_len..total) else {
                    return Ok(Event::NeedMore);
                };
                let mut frame = Control {
                    opcode: header.opcode,
                    payload: [0; MAX_CONTROL_PAYLOAD],
                    len: bytes.len() as u8,
                };
                frame.payload[..bytes.len()].copy_from_slice(bytes);
                if let Some(mask) = header.mask {
                    apply_mask(&mut frame.payload[..bytes.len()], mask, 0);
                }
                Ok(Event::Control { len: total, frame })
            }
            opcode::TEXT | opcode::BINARY | opcode::CONTINUATION => {
                let message_start = header.opcode != opcode::CONTINUATION;
                match (message_start, self.message) {
                    (true, Some(_)) => {
                        return Err(FrameError::Protocol("new message inside a fragmented one"));
                    }
                    (false, None) => {
                        return Err(FrameError::Protocol("continuation without a message"));
                    }
                    _ => {}
                }
                let message_len = if message_start { 0 } else { self.message_len };
                // An empty fragment that does not end its message carries nothing but costs
                // a frame to pass on: it counts as a byte, so that a message is bounded in
                // frames as well as in bytes.
                let cost = if header.len == 0 && !header.fin {
                    1
                } else {
                    header.len
                };
                if cost > self.max_message.saturating_sub(message_len) {
                    return Err(FrameError::TooBig);
                }
                let frame_len = header.header_len as u64 + header.len;
                if frame_len <= self.whole_up_to && (input.len() as u64) < frame_len {
                    self.check_waiting_text(input, &header, message_start)?;
                    return Ok(Event::NeedMore);
                }
                self.waiting = None;
                if message_start {
                    self.message = Some(header.opcode == opcode::TEXT);
                    self.message_len = 0;
                }
                self.message_len += cost;
                self.in_frame = true;
                self.frame_fin = header.fin;
                self.piece_opcode = header.opcode;
                self.remaining = header.len;
                self.mask = header.mask.unwrap_or([0; 4]);
                if header.mask.is_some() {
                    self.remask = mask_key();
                    input[header.header_len - 4..header.header_len].copy_from_slice(&self.remask);
                }
                self.frame_offset = 0;
                self.payload(input, header.header_len, message_start)
            }
            _ => Err(FrameError::Protocol("reserved opcode")),
        }
    }

    /// Invalid text fails as soon as it is read, even in a frame that waits to be whole; what
    /// was checked at an earlier read is not checked again.
    fn check_waiting_text(
        &mut self,
        input: &[u8],
        header: &Header,
        message_start: bool,
    ) -> Result<(), FrameError> {
        let text = if message_start {
            header.opcode == opcode::TEXT
        } else {
            self.message == Some(true)
        };
        if !text {
            return Ok(());
        }
        let (checked, mut utf8) = self.waiting.take().unwrap_or_else(|| {
            let utf8 = if message_start {
                Utf8Validator::default()
            } else {
                self.utf8.clone()
            };
            (0, utf8)
        });
        let mask = header.mask.unwrap_or([0; 4]);
        let arrived = &input[header.header_len + checked..];
        let mut scratch = [0u8; 512];
        for (i, piece) in arrived.chunks(512).enumerate() {
            let clear = &mut scratch[..piece.len()];
            clear.copy_from_slice(piece);
            apply_mask(clear, mask, checked + i * 512);
            utf8.feed(clear)?;
        }
        self.waiting = Some((checked + arrived.len(), utf8));
        Ok(())
    }

    /// The payload bytes of the current frame that `input` holds after `header_len` bytes.
    fn payload(
        &mut self,
        input: &mut [u8],
        header_len: usize,
        message_start: bool,
    ) -> Result<Event, FrameError> {
        let available = (input.len() - header_len) as u64;
        let take = self.remaining.min(available) as usize;
        if take == 0 && self.remaining > 0 {
            return Ok(if header_len > 0 {
                // The header is read; its frame goes on as fragments, as its payload arrives.
                Event::Data {
                    len: header_len,
                    payload: 0,
                    message_start,
                    message_end: false,
                    piece: Some(PieceHeader::default()),
                }
            } else {
                Event::NeedMore
            });
        }
        let bytes = &mut input[header_len..header_len + take];
        let text = self.message == Some(true);
        if self.writer == Writer::Client {
            let offset = self.frame_offset as usize;
            if text {
                remask_text(bytes, self.mask, self.remask, offset, &mut self.utf8)?;
            } else {
                remask(bytes, self.mask, self.remask, offset, false)?;
            }
        } else if text {
            self.utf8.feed(bytes)?;
        }
        let offset = self.frame_offset;
        self.remaining -= take as u64;
        self.frame_offset += take as u64;
        let frame_end = self.remaining == 0;
        // A frame that arrived whole (its header in this event too) goes on as it is; a part
        // of one goes on as a fragment of its own.
        let piece = (header_len == 0 || !frame_end).then(|| {
            let fin = frame_end && self.frame_fin;
            let opcode = std::mem::replace(&mut self.piece_opcode, opcode::CONTINUATION);
            // Masked from this fragment's first byte: the frame's key, turned by the offset.
            let key = (self.writer == Writer::Client).then(|| {
                let mut key = self.remask;
                key.rotate_left((offset % 4) as usize);
                key
            });
            PieceHeader::new(u8::from(fin) << 7 | opcode, take, key)
        });
        let mut message_end = false;
        if frame_end {
            self.in_frame = false;
            if self.frame_fin {
                if self.message == Some(true) {
                    self.utf8.finish()?;
                }
                self.message = None;
                message_end = true;
            }
        }
        Ok(Event::Data {
            len: header_len + take,
            payload: take,
            message_start,
            message_end,
            piece,
        })
    }
}

#[cfg(test)]
mod tests;
