use super::*;

fn frame(fin: bool, op: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::new();
    write_header(
        &mut out,
        if fin { 0x80 } else { 0 } | op,
        payload.len(),
        mask,
    );
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
    out
}

/// Feeds `input` to a reader in pieces of `step` bytes, as reads would deliver them,
/// collecting (passed-on bytes, messages ended, controls) or the first error.
fn run(
    reader: &mut FrameReader,
    input: &[u8],
    step: usize,
) -> Result<(Vec<u8>, usize, Vec<u8>), FrameError> {
    let mut buffer = Vec::new();
    let mut passed = Vec::new();
    let mut messages = 0;
    let mut controls = Vec::new();
    for piece in input.chunks(step.max(1)) {
        buffer.extend_from_slice(piece);
        let mut at = 0;
        loop {
            match reader.next(&mut buffer[at..])? {
                Event::NeedMore => break,
                Event::Data {
                    len,
                    payload,
                    message_end,
                    piece,
                    ..
                } => {
                    let (header, bytes) = outgoing(&buffer[at..], len, payload, &piece);
                    passed.extend_from_slice(header);
                    passed.extend_from_slice(bytes);
                    messages += usize::from(message_end);
                    at += len;
                }
                Event::Control { len, frame } => {
                    controls.push(frame.opcode);
                    at += len;
                }
            }
            if at == buffer.len() {
                break;
            }
        }
        buffer.drain(..at);
    }
    Ok((passed, messages, controls))
}

/// A frame read back: (first header byte, masking key, unmasked payload).
type Decoded = (u8, Option<[u8; 4]>, Vec<u8>);

/// The frames in `bytes`.
fn decode(mut bytes: &[u8]) -> Vec<Decoded> {
    let mut frames = Vec::new();
    while let Some(header) = parse_header(bytes).unwrap() {
        let end = header.header_len + header.len as usize;
        let mut payload = bytes[header.header_len..end].to_vec();
        if let Some(key) = header.mask {
            apply_mask(&mut payload, key, 0);
        }
        frames.push((bytes[0], header.mask, payload));
        bytes = &bytes[end..];
    }
    assert!(bytes.is_empty(), "a frame cut short");
    frames
}

#[test]
fn data_frames_pass_on_in_any_split_as_whole_frames_with_the_edges_own_masking_keys() {
    let key = [1, 2, 3, 4];
    let input = [
        frame(true, opcode::TEXT, "héllo wörld ✓".as_bytes(), Some(key)),
        frame(false, opcode::BINARY, &[7; 300], Some(key)),
        frame(true, opcode::PING, b"hi", Some(key)),
        frame(true, opcode::CONTINUATION, &[9; 70_000], Some(key)),
    ]
    .concat();
    let expected = vec![
        (opcode::TEXT, "héllo wörld ✓".as_bytes().to_vec()),
        (
            opcode::BINARY,
            [[7; 300].to_vec(), vec![9; 70_000]].concat(),
        ),
    ];
    for step in [1, 2, 3, 7, 13, 100, 4096, input.len()] {
        let mut reader = FrameReader::new(Writer::Client, 1 << 20);
        let (passed, messages, controls) = run(&mut reader, &input, step).unwrap();
        // Whole frames only (decode fails on a cut one), each with a key of the edge's.
        let frames = decode(&passed);
        let keys: Vec<_> = frames.iter().map(|(_, key, _)| key.unwrap()).collect();
        assert!(
            !keys.contains(&key),
            "the client's key went on: step {step}"
        );
        assert!(
            keys.windows(2).any(|w| w[0] != w[1]),
            "one key for every frame"
        );
        assert_eq!(join_messages(&frames), expected, "step {step}");
        assert_eq!(messages, 2, "step {step}");
        assert_eq!(controls, vec![opcode::PING], "step {step}");
        assert!(!reader.mid_message());
        if step == input.len() {
            // All at once: every frame goes on as it was framed.
            assert_eq!(frames.len(), 3);
        }
    }
    // A server's frames, each read whole, pass on byte for byte; one read in pieces goes
    // on as fragments of the same message.
    let input = [
        frame(true, opcode::TEXT, "héllo".as_bytes(), None),
        frame(true, opcode::BINARY, &[7; 300], None),
    ]
    .concat();
    let mut reader = FrameReader::new(Writer::Server, 1 << 20);
    assert_eq!(run(&mut reader, &input, input.len()).unwrap().0, input);
    let mut reader = FrameReader::new(Writer::Server, 1 << 20);
    let passed = run(&mut reader, &input, 100).unwrap().0;
    assert_eq!(
        join_messages(&decode(&passed)),
        vec![
            (opcode::TEXT, "héllo".as_bytes().to_vec()),
            (opcode::BINARY, vec![7; 300])
        ]
    );
}

/// The messages whole frames make: (opcode, payload).
fn join_messages(frames: &[Decoded]) -> Vec<(u8, Vec<u8>)> {
    let mut messages: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut open = false;
    for (first, _, payload) in frames {
        if open {
            assert_eq!(first & 0x0f, opcode::CONTINUATION);
            messages.last_mut().unwrap().1.extend_from_slice(payload);
        } else {
            messages.push((first & 0x0f, payload.clone()));
        }
        open = first & 0x80 == 0;
    }
    messages
}

fn whole_frame(mask: Option<[u8; 4]>) -> Vec<u8> {
    frame(true, opcode::TEXT, b"fine", mask)
}

#[test]
fn skimming_agrees_with_reading_frame_by_frame() {
    for writer in [Writer::Client, Writer::Server] {
        let mask = (writer == Writer::Client).then_some([3, 1, 4, 1]);
        let mut input = Vec::new();
        for i in 0..50 {
            input.extend(frame(
                true,
                opcode::TEXT,
                format!("token {i} é").as_bytes(),
                mask,
            ));
            input.extend(frame(true, opcode::BINARY, &[i as u8; 7], mask));
        }
        input.extend(frame(true, opcode::PING, b"", mask));
        input.extend(frame(true, opcode::TEXT, b"after", mask));
        let mut reader = FrameReader::new(writer, 1024);
        let mut skimmed = input.clone();
        let result = reader.skim(&mut skimmed);
        assert!(result.error.is_none());
        let (len, messages) = (result.len, result.messages);
        assert_eq!(messages, 100);
        let contents = |bytes: &[u8]| {
            decode(bytes)
                .into_iter()
                .map(|(first, _, payload)| (first, payload))
                .collect::<Vec<_>>()
        };
        assert_eq!(contents(&skimmed[..len]), contents(&input[..len]));
        assert_eq!(skimmed[..len] == input[..len], writer == Writer::Server);
        let mut rest = FrameReader::new(writer, 1024);
        let (_, after, controls) = run(&mut rest, &input[len..], 1000).unwrap();
        assert_eq!((after, controls), (1, vec![opcode::PING]));
        // Invalid UTF-8 is caught by the skim too.
        let bad = frame(true, opcode::TEXT, &[b'a', 0xff], mask);
        // ...and the good messages before it are passed over, to go on.
        let mut two = [whole_frame(mask), bad.clone()].concat();
        let result = reader.skim(&mut two);
        assert_eq!(result.error.map(FrameError::code), Some(1007));
        assert_eq!((result.len, result.messages), (whole_frame(mask).len(), 1));
        // A frame that is not all there is left for `next`.
        let whole = frame(true, opcode::TEXT, b"abc", mask);
        let cut = whole.len() - 1;
        assert_eq!(reader.skim(&mut whole.clone()[..cut]).len, 0);
    }
}

#[test]
fn masking_rules_follow_the_writer() {
    let mut reader = FrameReader::new(Writer::Client, 1024);
    let err = run(&mut reader, &frame(true, opcode::TEXT, b"x", None), 64).unwrap_err();
    assert_eq!(err.code(), 1002);
    let mut reader = FrameReader::new(Writer::Server, 1024);
    let err = run(
        &mut reader,
        &frame(true, opcode::TEXT, b"x", Some([1; 4])),
        64,
    )
    .unwrap_err();
    assert_eq!(err.code(), 1002);
}

#[test]
fn protocol_violations_get_1002() {
    let cases: Vec<Vec<u8>> = vec![
        {
            let mut f = frame(true, opcode::TEXT, b"x", None);
            f[0] |= 0x40; // RSV1
            f
        },
        frame(true, 3, b"", None),
        frame(true, 11, b"", None),
        frame(false, opcode::PING, b"", None),
        frame(true, opcode::PING, &[0; 126], None),
        frame(true, opcode::CONTINUATION, b"x", None),
        [
            frame(false, opcode::TEXT, b"a", None),
            frame(true, opcode::TEXT, b"b", None),
        ]
        .concat(),
        vec![0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 1],
        // Lengths not minimally encoded (RFC 6455 §5.2).
        vec![0x82, 126, 0, 125],
        vec![0x82, 127, 0, 0, 0, 0, 0, 0, 0xff, 0xff],
    ];
    for (i, case) in cases.iter().enumerate() {
        let mut reader = FrameReader::new(Writer::Server, 1 << 20);
        let err = run(&mut reader, case, 64).unwrap_err();
        assert_eq!(err.code(), 1002, "case {i}: {err}");
    }
}

#[test]
fn messages_over_the_limit_get_1009_before_any_of_the_frame_passes() {
    let mut reader = FrameReader::new(Writer::Server, 100);
    assert!(
        run(
            &mut reader,
            &frame(true, opcode::BINARY, &[0; 100], None),
            64
        )
        .is_ok()
    );
    let mut reader = FrameReader::new(Writer::Server, 100);
    let input = [
        frame(false, opcode::BINARY, &[0; 60], None),
        frame(true, opcode::CONTINUATION, &[0; 41], None),
    ]
    .concat();
    assert_eq!(run(&mut reader, &input, 1000).unwrap_err().code(), 1009);
    let mut reader = FrameReader::new(Writer::Server, 100);
    match reader.next(&mut [0x82, 101]) {
        Err(e) => assert_eq!(e.code(), 1009),
        other => panic!("{other:?}"),
    }
}

#[test]
fn endless_empty_fragments_are_bounded_like_bytes() {
    // A full-size message may end with an empty final fragment...
    let mut reader = FrameReader::new(Writer::Server, 100);
    let input = [
        frame(false, opcode::BINARY, &[0; 100], None),
        frame(true, opcode::CONTINUATION, &[], None),
    ]
    .concat();
    assert_eq!(run(&mut reader, &input, 1000).unwrap().1, 1);
    // ...but empty fragments that end nothing count: 100 pass, the 101st does not.
    let mut reader = FrameReader::new(Writer::Server, 100);
    let mut input = frame(false, opcode::BINARY, &[], None);
    for _ in 0..99 {
        input.extend(frame(false, opcode::CONTINUATION, &[], None));
    }
    assert!(run(&mut reader, &input, 1000).is_ok());
    let more = frame(false, opcode::CONTINUATION, &[], None);
    assert_eq!(run(&mut reader, &more, 1000).unwrap_err().code(), 1009);
}

#[test]
fn invalid_utf8_fails_fast_and_split_characters_are_fine() {
    let text = "aé€😀z".as_bytes();
    for step in 1..=text.len() + 2 {
        for writer in [Writer::Client, Writer::Server] {
            let mask = (writer == Writer::Client).then_some([9, 8, 7, 6]);
            let input = [
                frame(false, opcode::TEXT, &text[..3], mask),
                frame(true, opcode::CONTINUATION, &text[3..], mask),
            ]
            .concat();
            let mut reader = FrameReader::new(writer, 1024);
            assert_eq!(run(&mut reader, &input, step).unwrap().1, 1);
        }
    }
    // Invalid in the middle of a long frame: refused before the frame ends.
    let mut payload = vec![b'a'; 10_000];
    payload[10] = 0xff;
    let input = frame(true, opcode::TEXT, &payload, None);
    let mut reader = FrameReader::new(Writer::Server, 1 << 20);
    assert_eq!(
        reader.next(&mut input.clone()[..100]).unwrap_err().code(),
        1007
    );
    // The same in a frame small enough to wait until it is whole, masked or not.
    let mut payload = vec![b'a'; 50];
    payload[3] = 0xff;
    for (writer, mask) in [(Writer::Server, None), (Writer::Client, Some([5, 6, 7, 8]))] {
        let mut input = frame(true, opcode::TEXT, &payload, mask);
        let mut reader = FrameReader::new(writer, 1 << 20);
        assert_eq!(reader.next(&mut input[..12]).unwrap_err().code(), 1007);
    }
    // A character cut off by the end of the message.
    let input = frame(true, opcode::TEXT, &"é".as_bytes()[..1], None);
    let mut reader = FrameReader::new(Writer::Server, 1024);
    assert_eq!(run(&mut reader, &input, 64).unwrap_err().code(), 1007);
    // Overlong encodings and surrogates are invalid.
    for bad in [
        &[0xc0, 0x80][..],
        &[0xed, 0xa0, 0x80],
        &[0xf4, 0x90, 0x80, 0x80],
    ] {
        let mut v = Utf8Validator::default();
        let split = v.feed(&bad[..1]).and_then(|()| v.feed(&bad[1..]));
        assert!(split.and_then(|()| v.finish()).is_err(), "{bad:?}");
    }
}

#[test]
fn a_frame_that_waited_and_was_then_skimmed_leaves_nothing_behind() {
    // Found by the frame fuzz target: the UTF-8 check of a waiting text frame kept its
    // progress after skim() had read the frame, and the next waiting frame sliced past
    // its input.
    let key = Some([1, 2, 3, 4]);
    let first = frame(true, opcode::TEXT, &[b'a'; 40], key);
    let second = frame(true, opcode::TEXT, b"bc", key);
    let mut reader = FrameReader::new(Writer::Client, 1024);
    let mut input = first.clone();
    assert!(matches!(reader.next(&mut input[..30]), Ok(Event::NeedMore)));
    let skimmed = reader.skim(&mut input);
    assert_eq!((skimmed.len, skimmed.messages), (first.len(), 1));
    let mut input = second.clone();
    assert!(matches!(reader.next(&mut input[..7]), Ok(Event::NeedMore)));
    assert_eq!(run(&mut reader, &second, 64).unwrap().1, 1);
}

#[test]
fn written_frames_read_back() {
    for masked in [false, true] {
        let mut out = Vec::new();
        write_frame(&mut out, opcode::TEXT, "ünïcode".as_bytes(), masked);
        write_frame(&mut out, opcode::BINARY, &[5; 70_000], masked);
        write_close(&mut out, Some(4001), &"x".repeat(300), masked);
        let writer = if masked {
            Writer::Client
        } else {
            Writer::Server
        };
        let mut reader = FrameReader::new(writer, 1 << 20);
        let (passed, messages, controls) = run(&mut reader, &out, 1000).unwrap();
        assert_eq!(messages, 2);
        assert_eq!(controls, vec![opcode::CLOSE]);
        assert!(passed.len() > 70_000);
    }
    let mut out = Vec::new();
    write_close(&mut out, Some(1000), &"é".repeat(100), false);
    assert!(out.len() <= 2 + MAX_CONTROL_PAYLOAD);
    let body = &out[2..];
    assert!(super::super::close::Close::parse(body).is_ok());
}

#[test]
fn masking_with_an_offset_matches_byte_by_byte() {
    let key = [0x12, 0x34, 0x56, 0x78];
    for offset in 0..4 {
        for len in [0, 1, 5, 8, 9, 31] {
            let mut fast: Vec<u8> = (0..len as u8).collect();
            let slow: Vec<u8> = fast
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[(i + offset) & 3])
                .collect();
            apply_mask(&mut fast, key, offset);
            assert_eq!(fast, slow);
        }
    }
}
