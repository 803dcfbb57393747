//! The bounded buffer of upstream messages a client may not have received.

use std::collections::VecDeque;

use crate::ws::close::NotResumable;

/// The upstream's data frames as passed to the client, from the oldest message the client may
/// not have received. Offsets count every byte ever pushed, so that a ping can name "all up
/// to here" and its pong free exactly that.
#[derive(Debug)]
pub(crate) struct ReplayBuffer {
    bytes: VecDeque<u8>,
    /// The offset of `bytes[0]`.
    base: u64,
    /// The end offsets of the complete messages held, oldest first.
    ends: VecDeque<u64>,
    /// The sequence number (from 1) of the oldest message held.
    first_seq: u64,
}

impl Default for ReplayBuffer {
    fn default() -> Self {
        Self {
            bytes: VecDeque::new(),
            base: 0,
            ends: VecDeque::new(),
            first_seq: 1,
        }
    }
}

impl ReplayBuffer {
    /// The offset after the last byte pushed.
    pub(crate) fn end(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        self.bytes.extend(data);
    }

    /// The bytes pushed so far end a message.
    pub(crate) fn message_ended(&mut self) {
        self.ends.push_back(self.end());
    }

    /// The sequence number (from 1) of the oldest message held.
    pub(crate) fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// Upstream messages completed since the session began.
    pub(crate) fn completed_messages(&self) -> u64 {
        self.first_seq - 1 + self.ends.len() as u64
    }

    /// Complete messages held.
    pub(crate) fn messages(&self) -> usize {
        self.ends.len()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The client has everything before `offset`: drop the messages that end there or earlier.
    /// Returns how many messages and bytes were dropped.
    pub(crate) fn acknowledge(&mut self, offset: u64) -> (usize, usize) {
        let mut messages = 0;
        let mut upto = self.base;
        while let Some(&end) = self.ends.front() {
            if end > offset {
                break;
            }
            self.ends.pop_front();
            upto = end;
            messages += 1;
        }
        let bytes = (upto - self.base) as usize;
        self.bytes.drain(..bytes);
        self.base = upto;
        self.first_seq += messages as u64;
        if self.bytes.is_empty() {
            // Idle sessions keep no buffer.
            self.bytes = VecDeque::new();
            self.ends = VecDeque::new();
        }
        (messages, bytes)
    }

    /// Where a replay for a client that has received `last_seq` messages starts.
    pub(crate) fn replay_start(&self, last_seq: u64) -> Result<u64, NotResumable> {
        if last_seq > self.completed_messages() {
            return Err(NotResumable::Ahead);
        }
        if last_seq + 1 < self.first_seq {
            return Err(NotResumable::Overflowed);
        }
        Ok(if last_seq + 1 == self.first_seq {
            self.base
        } else {
            self.ends[(last_seq - self.first_seq) as usize]
        })
    }

    /// The offset after the last complete message.
    pub(crate) fn complete_end(&self) -> u64 {
        self.ends.back().copied().unwrap_or(self.base)
    }

    /// The bytes from `from` to `to` (offsets within the buffer), appended to `out`; returns
    /// how many complete messages end in that range.
    pub(crate) fn copy_range(&self, from: u64, to: u64, out: &mut Vec<u8>) -> u64 {
        let (start, end) = ((from - self.base) as usize, (to - self.base) as usize);
        let (front, back) = self.bytes.as_slices();
        let split = front.len();
        if start < split {
            out.extend_from_slice(&front[start..end.min(split)]);
        }
        if end > split {
            out.extend_from_slice(&back[start.max(split) - split..end - split]);
        }
        self.ends
            .iter()
            .filter(|&&message_end| message_end > from && message_end <= to)
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffer_with(messages: &[&[u8]]) -> ReplayBuffer {
        let mut buffer = ReplayBuffer::default();
        for message in messages {
            buffer.push(message);
            buffer.message_ended();
        }
        buffer
    }

    #[test]
    fn replay_starts_after_what_the_client_has() {
        let buffer = buffer_with(&[b"one", b"two", b"three"]);
        let mut out = Vec::new();
        let start = buffer.replay_start(1).unwrap();
        assert_eq!(buffer.copy_range(start, buffer.end(), &mut out), 2);
        assert_eq!(out, b"twothree");
        assert_eq!(buffer.replay_start(3).unwrap(), buffer.end());
        assert_eq!(buffer.replay_start(4), Err(NotResumable::Ahead));
    }

    #[test]
    fn acknowledged_messages_are_dropped_and_cannot_be_replayed() {
        let mut buffer = buffer_with(&[b"one", b"two", b"three"]);
        // An offset inside "two" frees only "one".
        assert_eq!(buffer.acknowledge(4), (1, 3));
        assert_eq!(buffer.replay_start(0), Err(NotResumable::Overflowed));
        let mut out = Vec::new();
        buffer.copy_range(buffer.replay_start(1).unwrap(), buffer.end(), &mut out);
        assert_eq!(out, b"twothree");
        assert_eq!(buffer.acknowledge(buffer.end()), (2, 8));
        assert_eq!(buffer.bytes(), 0);
        assert_eq!(buffer.completed_messages(), 3);
        assert_eq!(buffer.replay_start(3).unwrap(), buffer.end());
    }

    #[test]
    fn ranges_copy_across_the_ring_seam() {
        let mut buffer = ReplayBuffer::default();
        // Wrap the deque around: drop the front, then add behind it.
        for message in [&b"aaaa"[..], b"bbbb", b"cccc", b"dddd"] {
            buffer.push(message);
            buffer.message_ended();
        }
        buffer.acknowledge(8);
        for message in [&b"eeee"[..], b"ffff", b"gggggggggggggggg"] {
            buffer.push(message);
            buffer.message_ended();
        }
        buffer.push(b"hh");
        assert!(
            !buffer.bytes.as_slices().1.is_empty(),
            "the deque did not wrap"
        );
        let mut out = Vec::new();
        let start = buffer.replay_start(2).unwrap();
        assert_eq!(buffer.copy_range(start, buffer.complete_end(), &mut out), 5);
        assert_eq!(out, b"ccccddddeeeeffffgggggggggggggggg");
        out.clear();
        assert_eq!(
            buffer.copy_range(buffer.replay_start(6).unwrap(), buffer.end(), &mut out),
            1
        );
        assert_eq!(out, b"gggggggggggggggghh");
    }

    #[test]
    fn a_partial_message_is_replayed_from_its_start() {
        let mut buffer = buffer_with(&[b"one"]);
        buffer.push(b"tw");
        let mut out = Vec::new();
        assert_eq!(
            buffer.copy_range(buffer.replay_start(1).unwrap(), buffer.end(), &mut out),
            0
        );
        assert_eq!(out, b"tw");
    }
}
