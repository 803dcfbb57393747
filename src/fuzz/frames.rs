//! The frame reader against a model: a whole-buffer decoder written straight from RFC 6455,
//! fed the same bytes in one piece. The reader, fed in arbitrary pieces (and skimming as the
//! relay does), must pass on the same frames — with its own masking keys — and fail with the
//! same close code.

use proptest::prelude::*;

use crate::ws::frame::{Event, FrameReader, Utf8Validator, Writer, apply_mask, outgoing};

/// A data message as passed on so far: (opcode, payload, whether it ended).
type Message = (u8, Vec<u8>, bool);

/// What reading a stream came to: the data messages passed on (however they were framed),
/// the messages ended, the control frames, and the close code of the first violation.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    data: Vec<Message>,
    messages: usize,
    controls: Vec<(u8, Vec<u8>)>,
    error: Option<u16>,
}

/// Appends one frame's bytes; `len_form` picks the length encoding (0: shortest, 1: 16-bit, 2:
/// 64-bit), so that non-minimal encodings are tried too.
fn encode(out: &mut Vec<u8>, first: u8, payload: &[u8], key: Option<[u8; 4]>, len_form: u8) {
    out.push(first);
    let mask_bit = if key.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    match (len_form, len) {
        (0, 0..=125) => out.push(mask_bit | len as u8),
        (0 | 1, 0..=0xffff) => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = key {
        out.extend_from_slice(&key);
        out[start..].rotate_right(4);
        apply_mask(&mut out[start + 4..], key, 0);
    }
}

struct Header {
    fin: bool,
    opcode: u8,
    rsv: u8,
    key: Option<[u8; 4]>,
    len: u64,
    header_len: usize,
}

/// A frame header straight from RFC 6455 §5.2; `None` when `input` ends inside it.
fn header(input: &[u8]) -> Option<Header> {
    let first = *input.first()?;
    let second = *input.get(1)?;
    let (len, mut header_len) = match second & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes(input.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(input.get(2..10)?.try_into().ok()?), 10),
        short => (u64::from(short), 2),
    };
    let key = if second & 0x80 != 0 {
        let key: [u8; 4] = input.get(header_len..header_len + 4)?.try_into().ok()?;
        header_len += 4;
        Some(key)
    } else {
        None
    };
    Some(Header {
        fin: first & 0x80 != 0,
        opcode: first & 0x0f,
        rsv: first & 0x70,
        key,
        len,
        header_len,
    })
}

/// The model: reads all of `input` at once. Data frames are passed on as far as they arrived
/// (a frame's header only once it is whole), control frames only whole.
/// `whole_up_to`: data frames up to that size pass on only once all of them is there.
fn model(input: &[u8], writer: Writer, max_message: u64, whole_up_to: u64) -> Outcome {
    let mut outcome = Outcome {
        data: Vec::new(),
        messages: 0,
        controls: Vec::new(),
        error: None,
    };
    let mut at = 0;
    // The message in progress: (text, payload so far, cost so far).
    let mut message: Option<(bool, Vec<u8>, u64)> = None;
    loop {
        // The reader judges the first bytes of a header as soon as they arrive.
        let rest = &input[at..];
        // Lengths: at most 2^63 - 1, and in the fewest bytes (RFC 6455 §5.2).
        let long_length_bad = rest.len() >= 10
            && rest[1] & 0x7f == 127
            && !(0x1_0000..1 << 63).contains(&u64::from_be_bytes(
                rest[2..10].try_into().unwrap_or_default(),
            ));
        let short_length_bad = rest.len() >= 4
            && rest[1] & 0x7f == 126
            && u16::from_be_bytes([rest[2], rest[3]]) < 126;
        if rest.len() >= 2 && rest[0] & 0x70 != 0 || long_length_bad || short_length_bad {
            outcome.error = Some(1002);
            return outcome;
        }
        let Some(h) = header(rest) else {
            break;
        };
        let fail = |code| Some(code);
        let error =
            if h.rsv != 0 || h.len >> 63 != 0 || h.key.is_some() != (writer == Writer::Client) {
                fail(1002)
            } else if matches!(h.opcode, 8..=10) {
                (!h.fin || h.len > 125).then_some(1002)
            } else if h.opcode <= 2 {
                let starts = h.opcode != 0;
                if starts == message.is_some() {
                    fail(1002)
                } else {
                    let so_far = message.as_ref().map_or(0, |m| m.2);
                    let cost = if h.len == 0 && !h.fin { 1 } else { h.len };
                    (cost > max_message.saturating_sub(so_far)).then_some(1009)
                }
            } else {
                fail(1002)
            };
        if error.is_some() {
            outcome.error = error;
            return outcome;
        }
        let body_start = at + h.header_len;
        let available = input.len() - body_start;
        let take = (h.len.min(available as u64)) as usize;
        let mut payload = input[body_start..body_start + take].to_vec();
        if let Some(key) = h.key {
            apply_mask(&mut payload, key, 0);
        }
        let small = h.header_len as u64 + h.len <= whole_up_to;
        if h.opcode <= 2 && small && (take as u64) < h.len {
            // Nothing of it passes on yet, but invalid text fails already.
            let text = message.as_ref().map_or(h.opcode == 1, |m| m.0);
            let so_far = message.as_ref().map_or(&[][..], |m| &m.1[..]);
            let seen = [so_far, &payload[..]].concat();
            if text && std::str::from_utf8(&seen).is_err_and(|e| e.error_len().is_some()) {
                outcome.error = Some(1007);
            }
            return outcome;
        }
        if matches!(h.opcode, 8..=10) {
            if take < h.len as usize {
                return outcome;
            }
            outcome.controls.push((h.opcode, payload));
            at = body_start + take;
            continue;
        }
        // (A header whose payload has not begun to arrive passes nothing on yet.)
        if take > 0 || h.len == 0 {
            add_to_messages(
                &mut outcome.data,
                h.opcode,
                &payload,
                take as u64 == h.len && h.fin,
            );
        }
        let cost = if h.len == 0 && !h.fin { 1 } else { h.len };
        let (text, mut text_so_far, so_far) = match message.take() {
            Some(m) => m,
            None => (h.opcode == 1, Vec::new(), 0),
        };
        if text {
            text_so_far.extend_from_slice(&payload);
            let complete = take as u64 == h.len && h.fin;
            match std::str::from_utf8(&text_so_far) {
                Ok(_) => {}
                Err(e) if e.error_len().is_none() && !complete => {}
                Err(_) => {
                    outcome.error = Some(1007);
                    return outcome;
                }
            }
        }
        if (take as u64) < h.len {
            return outcome;
        }
        at = body_start + take;
        if h.fin {
            outcome.messages += 1;
        } else {
            message = Some((text, text_so_far, so_far + cost));
        }
    }
    outcome
}

/// Adds a frame's payload (or what arrived of it) to the messages it belongs to.
fn add_to_messages(messages: &mut Vec<Message>, opcode: u8, payload: &[u8], ends: bool) {
    match messages.last_mut() {
        Some((_, so_far, false)) if opcode == 0 => so_far.extend_from_slice(payload),
        _ => messages.push((opcode, payload.to_vec(), false)),
    }
    if ends && let Some(last) = messages.last_mut() {
        last.2 = true;
    }
}

/// The messages in what the reader passed on, which must be whole frames only (a frame not
/// all read goes on as fragments of its own).
fn messages_of(mut passed: &[u8]) -> Vec<Message> {
    let mut messages = Vec::new();
    while let Some(h) = header(passed) {
        let end = h.header_len + h.len as usize;
        assert!(end <= passed.len(), "a frame passed on is cut short");
        let mut payload = passed[h.header_len..end].to_vec();
        if let Some(key) = h.key {
            apply_mask(&mut payload, key, 0);
        }
        add_to_messages(&mut messages, h.opcode, &payload, h.fin);
        passed = &passed[end..];
    }
    assert!(passed.is_empty(), "bytes after the last whole frame");
    messages
}

/// The reader fed `input` in pieces of the given sizes (cycled), as the relay's pump drives it:
/// a skim first when `skim`, then frame by frame. Returns the outcome and the keys it used.
fn read(
    input: &[u8],
    pieces: &[usize],
    writer: Writer,
    max_message: u64,
    whole_up_to: u64,
    skim: bool,
) -> Outcome {
    let mut reader = FrameReader::new(writer, max_message as usize)
        .with_whole_frames_up_to(whole_up_to as usize);
    let mut buffer = Vec::new();
    let mut passed = Vec::new();
    let mut outcome = Outcome {
        data: Vec::new(),
        messages: 0,
        controls: Vec::new(),
        error: None,
    };
    let mut fed = 0;
    let mut piece = 0;
    'feed: while fed < input.len() {
        let size = pieces
            .get(piece % pieces.len().max(1))
            .copied()
            .unwrap_or(input.len());
        piece += 1;
        let end = (fed + size.max(1)).min(input.len());
        buffer.extend_from_slice(&input[fed..end]);
        fed = end;
        let mut at = 0;
        while at < buffer.len() {
            if skim {
                let skimmed = reader.skim(&mut buffer[at..]);
                passed.extend_from_slice(&buffer[at..at + skimmed.len]);
                outcome.messages += skimmed.messages as usize;
                at += skimmed.len;
                if let Some(error) = skimmed.error {
                    outcome.error = Some(error.code());
                    break 'feed;
                }
                if at == buffer.len() {
                    break;
                }
            }
            match reader.next(&mut buffer[at..]) {
                Err(error) => {
                    outcome.error = Some(error.code());
                    break 'feed;
                }
                Ok(Event::NeedMore) => break,
                Ok(Event::Data {
                    len,
                    payload,
                    message_end,
                    piece,
                    ..
                }) => {
                    let (header, bytes) = outgoing(&buffer[at..], len, payload, &piece);
                    passed.extend_from_slice(header);
                    passed.extend_from_slice(bytes);
                    outcome.messages += usize::from(message_end);
                    at += len;
                }
                Ok(Event::Control { len, frame }) => {
                    outcome
                        .controls
                        .push((frame.opcode, frame.payload().to_vec()));
                    at += len;
                }
            }
        }
        buffer.drain(..at);
    }
    outcome.data = messages_of(&passed);
    if writer == Writer::Client && outcome.error.is_none() {
        let keys_kept = keys(&passed)
            .zip(keys(&masked_data_frames(input)))
            .filter(|(ours, theirs)| ours == theirs)
            .count();
        // A fresh 32-bit key matches the client's by chance once in 2^32 frames.
        assert!(
            keys_kept <= 1,
            "the client's masking keys went on: {keys_kept}"
        );
    }
    outcome
}

/// The masking keys of the data frames in `bytes`, in order.
fn keys(mut bytes: &[u8]) -> impl Iterator<Item = [u8; 4]> {
    let mut found = Vec::new();
    while let Some(h) = header(bytes) {
        if let Some(key) = h.key
            && h.opcode <= 2
        {
            found.push(key);
        }
        let end = (h.header_len as u64 + h.len).min(bytes.len() as u64) as usize;
        bytes = &bytes[end..];
    }
    found.into_iter()
}

/// The client's data frames only (what reaches the upstream), for comparing keys.
fn masked_data_frames(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = input;
    while let Some(h) = header(rest) {
        let end = (h.header_len as u64 + h.len).min(rest.len() as u64) as usize;
        if h.opcode <= 2 {
            out.extend_from_slice(&rest[..end]);
        }
        rest = &rest[end..];
    }
    out
}

/// A frame as a strategy builds it.
fn frame(masked: bool) -> impl Strategy<Value = Vec<u8>> {
    let payload = prop_oneof![
        ".{0,24}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..8),
        prop::collection::vec(any::<u8>(), 100..400),
    ];
    let opcode = prop_oneof![
        6 => prop::sample::select(vec![0u8, 1, 2, 8, 9, 10]),
        1 => 0u8..16,
    ];
    (
        any::<bool>(),
        opcode,
        payload,
        any::<[u8; 4]>(),
        0u8..3,
        prop::bool::weighted(0.97),
        prop::bool::weighted(0.03),
    )
        .prop_map(
            move |(fin, opcode, payload, key, len_form, right_mask, rsv)| {
                let mut out = Vec::new();
                let first = u8::from(fin) << 7 | u8::from(rsv) << 6 | opcode;
                let key = (masked == right_mask).then_some(key);
                encode(&mut out, first, &payload, key, len_form);
                out
            },
        )
}

/// A stream: structured frames, now and then with a few bytes changed, or raw bytes.
fn stream(masked: bool) -> impl Strategy<Value = Vec<u8>> {
    let frames = || prop::collection::vec(frame(masked), 0..10).prop_map(|frames| frames.concat());
    let mutated = (
        frames(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    )
        .prop_map(|(mut bytes, changes)| {
            if !bytes.is_empty() {
                for (at, byte) in changes {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
            }
            bytes
        });
    prop_oneof![
        6 => frames(),
        2 => mutated,
        1 => prop::collection::vec(any::<u8>(), 0..300),
    ]
}

/// (client, input, read sizes, max_message, whole-frame limit, skim)
type ReaderCase = (bool, Vec<u8>, Vec<usize>, u64, u64, bool);

fn reader_case() -> impl Strategy<Value = ReaderCase> {
    any::<bool>().prop_flat_map(|client| {
        (
            Just(client),
            stream(client),
            prop::collection::vec(1usize..70, 0..12),
            prop_oneof![Just(1u64 << 20), 0u64..600],
            prop_oneof![Just(crate::ws::frame::WHOLE_FRAME_LIMIT as u64), 0u64..200],
            any::<bool>(),
        )
    })
}

proptest! {
    #![proptest_config(super::cases())]

    #[test]
    fn the_frame_reader_agrees_with_the_model_in_any_split(
        (client, input, pieces, max_message, whole_up_to, skim) in reader_case()
    ) {
        let writer = if client { Writer::Client } else { Writer::Server };
        let expected = model(&input, writer, max_message, whole_up_to);
        let got = read(&input, &pieces, writer, max_message, whole_up_to, skim);
        if expected.error.is_some() {
            // What passed before the violation depends on how the bytes arrived; the close
            // code does not.
            prop_assert_eq!(got.error, expected.error);
        } else {
            prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn utf8_in_pieces_is_judged_as_a_whole(
        bytes in prop_oneof![
            ".{0,30}".prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..40),
        ],
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut validator = Utf8Validator::default();
        let mut start = 0;
        let mut result = Ok(());
        for cut in cuts.into_iter().chain([bytes.len()]) {
            result = result.and_then(|()| validator.feed(&bytes[start..cut]));
            start = cut;
        }
        let result = result.and_then(|()| validator.finish());
        prop_assert_eq!(result.is_ok(), std::str::from_utf8(&bytes).is_ok());
    }
}
