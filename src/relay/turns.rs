//! Chat turns as the edge sees them: a client data message, then the upstream's data messages
//! until the client's next message, or until the upstream has been silent for `turn_gap` after
//! it began answering. (Before the first answer no gap applies: a model may think for longer
//! than any gap before its first token, and that wait is what a user feels most.)
//!
//! Per pass of the relay's pumps this costs a comparison of message counts and, when messages
//! moved, a timestamp the relay already has. The route's histograms are shared by every
//! connection (each behind a lock): a connection hands its turns over at once when it last did
//! a second ago or more — any chat a person types — and in batches of up to 32 when it turns
//! faster (an echo-fast client: three locks per message otherwise), the rest at its end.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::TurnMetrics;

struct Turn {
    started: Instant,
    answered: Option<Instant>,
    last: Instant,
    messages: u64,
}

/// A connection's turns: made at its first client message (an idle connection carries two
/// words for it).
pub(crate) struct Turns {
    gap: Duration,
    metrics: Option<Arc<TurnMetrics>>,
    state: Option<Box<State>>,
}

impl Turns {
    pub(crate) fn new(gap: Duration, metrics: Option<Arc<TurnMetrics>>) -> Self {
        Self {
            gap,
            metrics,
            state: None,
        }
    }

    fn state(&mut self) -> &mut State {
        let (gap, metrics) = (self.gap, &self.metrics);
        self.state
            .get_or_insert_with(|| Box::new(State::new(gap, metrics.clone())))
    }

    /// The client sent one or more data messages: a turn begins (the one before ends).
    pub(crate) fn client_spoke(&mut self, now: Instant) {
        self.state().client_spoke(now);
    }

    /// The upstream sent `messages` data messages.
    pub(crate) fn upstream_spoke(&mut self, messages: u64, now: Instant) {
        if let Some(state) = self.state.as_mut() {
            state.upstream_spoke(messages, now);
        }
    }

    /// Ends the open turn, if any, and hands every observation over (the connection ends).
    pub(crate) fn end(&mut self) {
        if let Some(state) = self.state.as_mut() {
            state.end();
        }
    }

    /// When the open turn ends by silence or held observations are due, if either.
    pub(crate) fn due_at(&self) -> Option<Instant> {
        self.state.as_ref().and_then(|state| state.due_at())
    }

    /// What is due at `now`: a turn silent for the gap ends, held observations go out.
    pub(crate) fn tick(&mut self, now: Instant) {
        if let Some(state) = self.state.as_mut() {
            state.tick(now);
        }
    }

    /// Turns begun so far.
    pub(crate) fn count(&self) -> u64 {
        self.state.as_ref().map_or(0, |state| state.count)
    }
}

struct State {
    gap: Duration,
    open: Option<Turn>,
    count: u64,
    metrics: Option<Arc<TurnMetrics>>,
    /// Observations not handed to the histograms yet.
    pending: Pending,
    /// Until when observations are held rather than handed over at once.
    hold_until: Option<Instant>,
}

/// How many observations a connection holds before it hands them over.
const BATCH: usize = 32;
/// A connection that handed observations over this recently holds the next ones.
const BATCH_AGE: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Pending {
    first_response: Vec<f64>,
    messages: Vec<f64>,
    seconds: Vec<f64>,
    count: usize,
}

impl Pending {
    fn push(values: &mut Vec<f64>, count: &mut usize, value: f64) {
        values.push(value);
        *count += 1;
    }

    fn flush(&mut self, metrics: &TurnMetrics) {
        self.count = 0;
        for (values, histogram) in [
            (&mut self.first_response, &metrics.first_response),
            (&mut self.messages, &metrics.messages),
            (&mut self.seconds, &metrics.seconds),
        ] {
            for value in values.drain(..) {
                histogram.observe(value);
            }
        }
    }
}

impl State {
    fn new(gap: Duration, metrics: Option<Arc<TurnMetrics>>) -> Self {
        Self {
            gap,
            open: None,
            count: 0,
            metrics,
            pending: Pending::default(),
            hold_until: None,
        }
    }

    /// Hands the observations over when there are enough, or they have waited long enough
    /// (`now`: `None` at the connection's end, when everything goes).
    fn hand_over(&mut self, now: Option<Instant>) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        if self.pending.count == 0 {
            return;
        }
        let due = match now {
            None => true,
            Some(now) => {
                self.pending.count >= BATCH || self.hold_until.is_none_or(|until| now >= until)
            }
        };
        if due {
            self.pending.flush(metrics);
            self.hold_until = now.map(|now| now + BATCH_AGE);
        }
    }

    fn client_spoke(&mut self, now: Instant) {
        self.close_turn();
        self.hand_over(Some(now));
        self.open = Some(Turn {
            started: now,
            answered: None,
            last: now,
            messages: 0,
        });
        self.count += 1;
    }

    fn upstream_spoke(&mut self, messages: u64, now: Instant) {
        let Some(turn) = self.open.as_mut() else {
            return;
        };
        if turn.answered.is_some() && now.duration_since(turn.last) > self.gap {
            // Silent too long: the turn ended at its last message; this is not part of it.
            self.close_turn();
            self.hand_over(Some(now));
            return;
        }
        if turn.answered.is_none() {
            turn.answered = Some(now);
            if self.metrics.is_some() {
                let waited = now.duration_since(turn.started).as_secs_f64();
                let pending = &mut self.pending;
                Pending::push(&mut pending.first_response, &mut pending.count, waited);
                self.hand_over(Some(now));
            }
        }
        if let Some(turn) = self.open.as_mut() {
            turn.messages += messages;
            turn.last = now;
        }
    }

    fn end(&mut self) {
        self.close_turn();
        self.hand_over(None);
    }

    fn due_at(&self) -> Option<Instant> {
        let quiet = self
            .open
            .as_ref()
            .filter(|turn| turn.answered.is_some())
            .map(|turn| turn.last + self.gap);
        let held = self.hold_until.filter(|_| self.pending.count > 0);
        match (quiet, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn tick(&mut self, now: Instant) {
        if self
            .open
            .as_ref()
            .is_some_and(|turn| turn.answered.is_some() && now >= turn.last + self.gap)
        {
            self.close_turn();
        }
        self.hand_over(Some(now));
    }

    /// Ends the open turn, if any (the client speaks again, or the upstream fell silent).
    fn close_turn(&mut self) {
        let Some(turn) = self.open.take() else {
            return;
        };
        if self.metrics.is_some() {
            let pending = &mut self.pending;
            Pending::push(
                &mut pending.messages,
                &mut pending.count,
                turn.messages as f64,
            );
            if turn.answered.is_some() {
                let lasted = turn.last.duration_since(turn.started).as_secs_f64();
                Pending::push(&mut pending.seconds, &mut pending.count, lasted);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

    fn histogram() -> Histogram {
        Histogram::new(exponential_buckets(0.001, 2.0, 20))
    }

    /// (count, sum) of a histogram, through its exposition.
    fn summary(histogram: &Histogram) -> (u64, f64) {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("h", "h", histogram.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let value = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (value("h_count ") as u64, value("h_sum "))
    }

    #[test]
    fn a_turn_is_a_client_message_and_the_answer_until_the_next_one_or_the_gap() {
        let metrics = TurnMetrics {
            first_response: histogram(),
            messages: histogram(),
            seconds: histogram(),
        };
        let mut turns = Turns::new(Duration::from_secs(5), Some(Arc::new(metrics.clone())));
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // Nothing before the client speaks counts.
        turns.upstream_spoke(3, at(0));
        turns.client_spoke(at(100));
        // A model thinking for 8 s (longer than the gap) still answers this turn.
        turns.upstream_spoke(1, at(8_100));
        turns.upstream_spoke(9, at(9_100));
        // 6 s of silence: the turn ended at 9.1 s; this message belongs to none.
        turns.upstream_spoke(1, at(15_200));
        turns.client_spoke(at(16_000));
        // The second turn is answered, then silent: the relay's timer ends it on time, and what
        // it held goes out then.
        turns.upstream_spoke(2, at(16_500));
        assert_eq!(turns.due_at(), Some(at(21_500)));
        turns.tick(at(21_500));
        assert_eq!(
            turns.due_at(),
            None,
            "the turn ended and everything was handed over"
        );
        assert_eq!(summary(&metrics.messages), (2, 12.0));
        turns.end();
        assert_eq!(turns.count(), 2);
        assert_eq!(summary(&metrics.first_response), (2, 8.5));
        assert_eq!(summary(&metrics.seconds), (2, 9.5));
        // An unanswered turn counts, with no messages.
        turns.client_spoke(at(30_000));
        turns.end();
        assert_eq!(summary(&metrics.messages), (3, 12.0));
        assert_eq!(turns.count(), 3);
    }
}
