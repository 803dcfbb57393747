//! One direction of a relayed connection for one poll: read what the source sent, pass its data
//! frames on to the destination (and the replay buffer), answer nothing itself — the pings and
//! pongs it finds are handed back to the relay — and stop reading when the destination is full.

use std::task::{Context, Poll};

use tokio::time::Instant;

use crate::config::settings::RateLimit;
use crate::metrics::DirectionCounters;
use crate::session::replay::ReplayBuffer;
use crate::ws::close::{Close, End, FrameError};
use crate::ws::frame::{self, Event, opcode};
use crate::ws::leg::Leg;

/// Unwritten bytes at which a destination stops its source from being read.
const OUT_HIGH: usize = 64 * 1024;
/// Unwritten bytes at which a source is not read any further: what the other direction has
/// queued for it (about `OUT_HIGH` at most) plus the edge's answers to its pings. A peer that
/// sends pings and reads nothing is stopped there; a slow reader is still read, or its pongs
/// could not be seen.
const SOURCE_OUT_HIGH: usize = 2 * OUT_HIGH;
/// Reads per direction in one poll before the task yields, so that one busy connection
/// cannot starve the others on its worker.
const READS_PER_POLL: usize = 16;

/// What one direction carried: data messages and their payload bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Traffic {
    pub(crate) messages: u64,
    pub(crate) bytes: u64,
}

/// What one pass of a pump found besides the data it moved.
#[derive(Default)]
pub(crate) struct Outcome {
    pub(crate) data: bool,
    /// The payloads of the pings read, each to be answered.
    pub(crate) pings: Vec<Vec<u8>>,
    /// A pong answered the outstanding ping.
    pub(crate) pong: bool,
    pub(crate) end: Option<End>,
}

/// One direction for one poll: parse what the source sent, pass data frames on, write.
pub(crate) struct Pump<'a> {
    pub(crate) source: &'a mut Leg,
    /// `None` while a resumable session's client is away.
    pub(crate) dest: Option<&'a mut Leg>,
    pub(crate) bucket: Option<&'a mut TokenBucket>,
    /// Only whole messages reach the destination.
    pub(crate) atomic: bool,
    /// The most a whole-message destination may hold of one unfinished message.
    pub(crate) held_limit: usize,
    pub(crate) replay: Option<&'a mut ReplayBuffer>,
    /// Stop reading while the replay buffer holds this many (messages, bytes).
    pub(crate) replay_cap: Option<(usize, usize)>,
    pub(crate) traffic: &'a mut Traffic,
    pub(crate) counters: &'a DirectionCounters,
}

impl Pump<'_> {
    pub(crate) fn run(mut self, cx: &mut Context<'_>, now: Instant) -> Outcome {
        let mut outcome = Outcome::default();
        let mut reads = 0;
        loop {
            if let Err(end) = self.parse(&mut outcome) {
                outcome.end = Some(end);
                return outcome;
            }
            if let Some(dest) = self.dest.as_deref_mut()
                && dest.has_output()
            {
                match dest.poll_write_out(cx, now) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => {
                        outcome.end = Some(End::DestinationLost);
                        return outcome;
                    }
                    Poll::Pending => {
                        if dest.pending_out() >= OUT_HIGH {
                            self.source.hold_reading();
                            return outcome;
                        }
                    }
                }
            }
            if let (Some(replay), Some((messages, bytes))) = (&self.replay, self.replay_cap)
                && (replay.messages() >= messages || replay.bytes() >= bytes)
                && !self.source.reading_mid_message()
            {
                // Full of what the client has not confirmed: its pong will make room. (A
                // message is finished first: only whole messages can be let go.)
                self.source.hold_reading();
                return outcome;
            }
            // The edge's own frames to the source (pongs): one that sends pings and reads
            // nothing is not read any further until it takes its answers.
            if self.source.has_output()
                && let Poll::Ready(Err(_)) = self.source.poll_write_out(cx, now)
            {
                outcome.end = Some(End::Lost);
                return outcome;
            }
            if self.source.pending_out() >= SOURCE_OUT_HIGH {
                return outcome;
            }
            if reads == READS_PER_POLL {
                cx.waker().wake_by_ref();
                return outcome;
            }
            self.source.resume_reading(now);
            match self.source.poll_fill(cx) {
                Poll::Pending => {
                    self.source.release_idle();
                    return outcome;
                }
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    outcome.end = Some(End::Lost);
                    return outcome;
                }
                Poll::Ready(Ok(_)) => reads += 1,
            }
        }
    }

    /// Consumes every whole frame (and any data frame's available bytes) read so far.
    fn parse(&mut self, outcome: &mut Outcome) -> Result<(), End> {
        let expected_pong = self.source.ping().map(|ping| ping.payload.to_be_bytes());
        let (input, reader) = self.source.parse_parts();
        let mut at = 0;
        // Data bytes not yet copied to the destination: copied in one piece when possible.
        let mut run_start = 0;
        let mut messages = 0;
        let mut payload_bytes = 0;
        let mut result = Ok(());
        // Runs of whole single-frame messages pass in one step when nothing needs to see
        // each message (rate limit, replay buffer, whole-message holding).
        let skim = self.bucket.is_none() && self.replay.is_none() && !self.atomic;
        while at < input.len() {
            if skim {
                let skimmed = reader.skim(&mut input[at..]);
                at += skimmed.len;
                messages += skimmed.messages;
                payload_bytes += skimmed.payload_bytes;
                if let Some(error) = skimmed.error {
                    result = Err(End::Violation(error));
                    break;
                }
                if at == input.len() {
                    break;
                }
            }
            match reader.next(&mut input[at..]) {
                Err(error) => {
                    result = Err(End::Violation(error));
                    break;
                }
                Ok(Event::NeedMore) => break,
                Ok(Event::Data {
                    len,
                    payload,
                    message_start,
                    message_end,
                    piece,
                    ..
                }) => {
                    if message_start
                        && let Some(bucket) = self.bucket.as_deref_mut()
                        && !bucket.allow()
                    {
                        result = Err(End::RateLimited);
                        break;
                    }
                    // What goes on: the bytes as they are (a whole frame), or a fragment cut
                    // from a frame not all here (its own header, then the payload among them).
                    let (header, bytes) = frame::outgoing(&input[at..], len, payload, &piece);
                    if let Some(replay) = self.replay.as_deref_mut() {
                        replay.push(header);
                        replay.push(bytes);
                        if message_end {
                            replay.message_ended();
                        }
                    }
                    messages += u64::from(message_end);
                    payload_bytes += payload as u64;
                    if self.atomic && !(message_start && message_end) {
                        if let Some(dest) = self.dest.as_deref_mut() {
                            dest.push_data(&input[run_start..at]);
                            dest.hold(header);
                            // Frame headers count too: endless empty fragments must not
                            // grow what is held.
                            if dest.hold(bytes) > self.held_limit {
                                result = Err(End::Violation(FrameError::TooBig));
                                run_start = at;
                                break;
                            }
                            if message_end {
                                dest.release_held();
                            }
                        }
                        at += len;
                        run_start = at;
                        continue;
                    }
                    if piece.is_some() {
                        if let Some(dest) = self.dest.as_deref_mut() {
                            dest.push_data(&input[run_start..at]);
                            dest.push_data(header);
                            dest.push_data(bytes);
                        }
                        at += len;
                        run_start = at;
                        continue;
                    }
                    at += len;
                }
                Ok(Event::Control { len, frame }) => {
                    if let Some(dest) = self.dest.as_deref_mut() {
                        dest.push_data(&input[run_start..at]);
                    }
                    at += len;
                    run_start = at;
                    match frame.opcode {
                        opcode::PING => outcome.pings.push(frame.payload().to_vec()),
                        opcode::PONG => {
                            if expected_pong.is_some_and(|p| p[..] == *frame.payload()) {
                                outcome.pong = true;
                            }
                        }
                        _ => {
                            result = Close::parse(frame.payload())
                                .map_err(End::Violation)
                                .and_then(|close| Err(End::Closed(close)));
                            break;
                        }
                    }
                }
            }
        }
        if let Some(dest) = self.dest.as_deref_mut() {
            dest.push_data(&input[run_start..at]);
        }
        self.source.consume(at);
        if payload_bytes > 0 || messages > 0 {
            outcome.data = true;
            self.traffic.messages += messages;
            self.traffic.bytes += payload_bytes;
            self.counters.add(messages, payload_bytes);
        }
        result
    }
}

pub(crate) struct TokenBucket {
    limit: RateLimit,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            tokens: f64::from(limit.burst),
            last: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.limit.per_second;
        self.tokens = (self.tokens + refill).min(f64::from(self.limit.burst));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A message's payload plus its frame headers, at a generous number of fragments.
pub(crate) fn held_limit(max_message: usize) -> usize {
    max_message * 2 + 4096
}
