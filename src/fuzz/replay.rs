//! The replay cursor against a model: a list of messages. Whatever was pushed, acknowledged and
//! asked for, a resume from `last_seq` gets exactly the messages after it, or a refusal when
//! they are gone or were never sent.

use proptest::prelude::*;

use crate::session::replay::ReplayBuffer;

#[derive(Debug, Clone)]
enum Step {
    /// A message pushed in pieces (a frame may arrive in several reads).
    Message(Vec<Vec<u8>>),
    /// Part of a message that is not over yet, then nothing else of it.
    Unfinished(Vec<u8>),
    /// A pong for "everything up to the offset at this fraction of what was pushed".
    Acknowledge(prop::sample::Index),
    /// A resume asks for what follows `last_seq`: one near what exists, or anything.
    Resume(prop::sample::Index, Option<u64>),
}

fn step() -> impl Strategy<Value = Step> {
    // A message is frames: at least a frame header's two bytes.
    let bytes = prop::collection::vec(any::<u8>(), 0..20);
    let message = (
        prop::collection::vec(any::<u8>(), 2..20),
        prop::collection::vec(bytes.clone(), 0..3),
    )
        .prop_map(|(first, mut rest)| {
            rest.insert(0, first);
            rest
        });
    prop_oneof![
        4 => message.prop_map(Step::Message),
        1 => bytes.prop_map(Step::Unfinished),
        2 => any::<prop::sample::Index>().prop_map(Step::Acknowledge),
        3 => (any::<prop::sample::Index>(), prop::option::weighted(0.2, any::<u64>()))
            .prop_map(|(i, raw)| Step::Resume(i, raw)),
    ]
}

proptest! {
    #![proptest_config(super::cases())]

    #[test]
    fn a_resume_gets_exactly_the_messages_after_last_seq(
        steps in prop::collection::vec(step(), 0..40)
    ) {
        let mut buffer = ReplayBuffer::default();
        // Every complete message: (seq from 1, bytes, end offset); and the oldest kept.
        let mut sent: Vec<(Vec<u8>, u64)> = Vec::new();
        let mut first_kept = 0usize;
        let mut unfinished = false;
        for step in steps {
            match step {
                Step::Message(pieces) if !unfinished => {
                    for piece in &pieces {
                        buffer.push(piece);
                    }
                    buffer.message_ended();
                    sent.push((pieces.concat(), buffer.end()));
                }
                Step::Unfinished(piece) if !unfinished => {
                    buffer.push(&piece);
                    unfinished = true;
                }
                Step::Message(_) | Step::Unfinished(_) => {}
                Step::Acknowledge(at) => {
                    let offset = at.index(buffer.end() as usize + 1) as u64;
                    buffer.acknowledge(offset);
                    while first_kept < sent.len() && sent[first_kept].1 <= offset {
                        first_kept += 1;
                    }
                }
                Step::Resume(near, raw) => {
                    let last_seq = raw.unwrap_or(near.index(sent.len() + 3) as u64);
                    let result = buffer.replay_start(last_seq);
                    let fits = last_seq <= sent.len() as u64 && last_seq >= first_kept as u64;
                    prop_assert_eq!(result.is_ok(), fits, "last_seq {}", last_seq);
                    if let Ok(start) = result {
                        let mut out = Vec::new();
                        let end = buffer.complete_end();
                        let count = buffer.copy_range(start, end, &mut out);
                        let expected: Vec<u8> = sent[last_seq as usize..]
                            .iter()
                            .flat_map(|(bytes, _)| bytes.clone())
                            .collect();
                        prop_assert_eq!(count, sent.len() as u64 - last_seq);
                        prop_assert_eq!(out, expected);
                    }
                }
            }
            prop_assert_eq!(buffer.first_seq(), first_kept as u64 + 1);
            prop_assert_eq!(buffer.completed_messages(), sent.len() as u64);
            prop_assert_eq!(buffer.messages(), sent.len() - first_kept);
        }
    }
}
