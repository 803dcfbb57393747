//! Chat turns as the edge sees them: a client data message, then the upstream's data messages
//! until the client's next message, or until the upstream has been silent for `turn_gap` after
//! it began answering. (Before the first answer no gap applies: a model may think for longer
//! than any gap before its first token, and that wait is what a user feels most.)
//!
//! Per pass of the relay's pumps this costs a comparison of message counts and, when messages
//! moved, a timestamp the relay already has.

use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::TurnMetrics;

struct Turn {
    started: Instant,
    answered: Option<Instant>,
    last: Instant,
    messages: u64,
}

pub(crate) struct Turns {
    gap: Duration,
    open: Option<Turn>,
    count: u64,
    metrics: Option<TurnMetrics>,
}

impl Turns {
    pub(crate) fn new(gap: Duration, metrics: Option<TurnMetrics>) -> Self {
        Self {
            gap,
            open: None,
            count: 0,
            metrics,
        }
    }

    /// The client sent one or more data messages: a turn begins (the one before ends).
    pub(crate) fn client_spoke(&mut self, now: Instant) {
        self.end();
        self.open = Some(Turn {
            started: now,
            answered: None,
            last: now,
            messages: 0,
        });
        self.count += 1;
    }

    /// The upstream sent `messages` data messages.
    pub(crate) fn upstream_spoke(&mut self, messages: u64, now: Instant) {
        let Some(turn) = self.open.as_mut() else {
            return;
        };
        if turn.answered.is_some() && now.duration_since(turn.last) > self.gap {
            // Silent too long: the turn ended at its last message; this is not part of it.
            self.end();
            return;
        }
        if turn.answered.is_none() {
            turn.answered = Some(now);
            if let Some(metrics) = &self.metrics {
                metrics
                    .first_response
                    .observe(now.duration_since(turn.started).as_secs_f64());
            }
        }
        turn.messages += messages;
        turn.last = now;
    }

    /// Ends the open turn, if any (the connection ends, or the client speaks again).
    pub(crate) fn end(&mut self) {
        let Some(turn) = self.open.take() else {
            return;
        };
        if let Some(metrics) = &self.metrics {
            metrics.messages.observe(turn.messages as f64);
            if turn.answered.is_some() {
                metrics
                    .seconds
                    .observe(turn.last.duration_since(turn.started).as_secs_f64());
            }
        }
    }

    /// Turns begun so far.
    pub(crate) fn count(&self) -> u64 {
        self.count
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
        let mut turns = Turns::new(Duration::from_secs(5), Some(metrics.clone()));
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
        turns.end();
        assert_eq!(turns.count(), 2);
        assert_eq!(summary(&metrics.first_response), (1, 8.0));
        // Two turns: 10 messages, and none (unanswered).
        assert_eq!(summary(&metrics.messages), (2, 10.0));
        assert_eq!(summary(&metrics.seconds), (1, 9.0));
    }
}
