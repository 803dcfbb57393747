//! Every way a relayed connection ends, in one place: the close codes the edge sends, the
//! violations a peer's frames can commit, what a client that cannot have its session is told,
//! and — for each reason a connection ends — what each side is sent (the close plans).
//!
//! Nothing else builds a close: the relay, the session registry and the handshake name an
//! [`EdgeClose`] or pass a peer's [`Close`] on, and [`Plan`] decides which.

use std::fmt;

use crate::metrics::Limit;

/// Close codes (RFC 6455 §7.4.1, the IANA registry, and the edge's own 4xxx).
pub(crate) mod codes {
    pub(crate) const NORMAL: u16 = 1000;
    pub(crate) const GOING_AWAY: u16 = 1001;
    pub(crate) const PROTOCOL_ERROR: u16 = 1002;
    pub(crate) const INVALID_PAYLOAD: u16 = 1007;
    pub(crate) const POLICY: u16 = 1008;
    pub(crate) const TOO_BIG: u16 = 1009;
    pub(crate) const BAD_GATEWAY: u16 = 1014;
    pub(crate) const TOKEN_EXPIRED: u16 = 4001;
    /// A reconnect named a session that cannot be resumed; the reason says why.
    pub(crate) const SESSION_NOT_RESUMABLE: u16 = 4002;
    /// Another connection resumed this one's session.
    pub(crate) const SESSION_TAKEN_OVER: u16 = 4003;
    pub(crate) const REVOKED: u16 = 4004;
}

/// A close frame's status code and reason, as a peer sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Close {
    /// `None` for a close frame without a body.
    pub(crate) code: Option<u16>,
    pub(crate) reason: String,
}

impl Close {
    /// Reads a received close frame's body (RFC 6455 §5.5.1, §7.4).
    pub(crate) fn parse(payload: &[u8]) -> Result<Self, FrameError> {
        match payload {
            [] => Ok(Self {
                code: None,
                reason: String::new(),
            }),
            [_] => Err(FrameError::Protocol("close frame with a one-byte body")),
            [high, low, reason @ ..] => {
                let code = u16::from_be_bytes([*high, *low]);
                if !close_code_allowed(code) {
                    return Err(FrameError::Protocol("invalid close code"));
                }
                let reason = std::str::from_utf8(reason).map_err(|_| FrameError::InvalidUtf8)?;
                Ok(Self {
                    code: Some(code),
                    reason: reason.to_owned(),
                })
            }
        }
    }
}

/// Codes a peer may send in a close frame: the registered ones (RFC 6455 §7.4.1 and the IANA
/// registry's 1012–1014) and the ranges for libraries and applications.
pub(crate) fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A violation in what a peer sent, each with the close code the peer is closed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// RFC 6455 broken: 1002.
    Protocol(&'static str),
    /// Text that is not UTF-8: 1007.
    InvalidUtf8,
    /// A message over the size limit: 1009.
    TooBig,
}

impl FrameError {
    pub(crate) fn code(self) -> u16 {
        match self {
            Self::Protocol(_) => codes::PROTOCOL_ERROR,
            Self::InvalidUtf8 => codes::INVALID_PAYLOAD,
            Self::TooBig => codes::TOO_BIG,
        }
    }

    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::Protocol(reason) => reason,
            Self::InvalidUtf8 => "invalid UTF-8",
            Self::TooBig => "message too big",
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason(), self.code())
    }
}

/// Why a session cannot be resumed. Every case is told to the client (close 4002 with the
/// reason, or the `edge.session` announcement); none is silently replaced by a fresh session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotResumable {
    /// No such session for this user (also what another user's session id looks like).
    Unknown,
    /// The resume window passed.
    Expired,
    /// Messages the client has not received were dropped: the buffer was full.
    Overflowed,
    /// The client says it received more messages than were sent.
    Ahead,
    /// The session ended: the client or the edge closed it.
    Closed,
    /// A new session was asked for under the id of a live one.
    InUse,
    /// The session belongs to another conversation.
    Conversation,
}

impl NotResumable {
    /// The close reason sent with 4002, and the announcement's `reason`.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::Unknown => "session unknown",
            Self::Expired => "session expired",
            Self::Overflowed => "session overflowed",
            Self::Ahead => "last_seq ahead",
            Self::Closed => "session closed",
            Self::InUse => "session in use",
            Self::Conversation => "session conversation differs",
        }
    }

    /// The `outcome` label of `wsedge_resumes_total`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Expired => "expired",
            Self::Overflowed => "overflowed",
            Self::Ahead => "ahead",
            Self::Closed => "closed",
            Self::InUse => "in_use",
            Self::Conversation => "conversation",
        }
    }

    /// The case a label names (as another edge sends it over the link).
    pub(crate) fn from_label(label: &str) -> Option<Self> {
        [
            Self::Unknown,
            Self::Expired,
            Self::Overflowed,
            Self::Ahead,
            Self::Closed,
            Self::InUse,
            Self::Conversation,
        ]
        .into_iter()
        .find(|why| why.label() == label)
    }
}

/// Every close the edge sends of its own accord, with its code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EdgeClose {
    /// To the upstream: its client left (or was closed by the edge).
    ClientWentAway,
    /// To the client: its upstream failed or vanished.
    UpstreamFailed,
    /// To the client: its upstream stopped answering pings.
    UpstreamNotResponding,
    /// To a side that stopped answering pings (or the upstream of a client that did).
    HeartbeatTimeout,
    IdleTimeout,
    SessionTimeLimit,
    ShuttingDown,
    /// To the client: its token's `exp` passed (4001).
    TokenExpired,
    /// To the upstream of a client whose token expired (1000: nothing went wrong).
    TokenExpiredUpstream,
    MessageRateExceeded,
    /// To a peer whose frames broke the protocol or the size limit.
    Violation(FrameError),
    /// To a client that cannot have the session it asked for (4002).
    NotResumable(NotResumable),
    /// To a client whose session another connection resumed (4003).
    TakenOver,
    /// To a client an operator disconnected or whose token was revoked (4004).
    Revoked,
    /// To the upstream of a revoked client (1000: the edge ended it on purpose).
    RevokedUpstream,
}

impl EdgeClose {
    pub(crate) fn code(self) -> u16 {
        use codes::*;
        match self {
            Self::ClientWentAway
            | Self::HeartbeatTimeout
            | Self::IdleTimeout
            | Self::SessionTimeLimit
            | Self::ShuttingDown => GOING_AWAY,
            Self::UpstreamFailed | Self::UpstreamNotResponding => BAD_GATEWAY,
            Self::TokenExpired => TOKEN_EXPIRED,
            Self::TokenExpiredUpstream => NORMAL,
            Self::MessageRateExceeded => POLICY,
            Self::Violation(error) => error.code(),
            Self::NotResumable(_) => SESSION_NOT_RESUMABLE,
            Self::TakenOver => SESSION_TAKEN_OVER,
            Self::Revoked => REVOKED,
            Self::RevokedUpstream => NORMAL,
        }
    }

    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::ClientWentAway => "client went away",
            Self::UpstreamFailed => "upstream failed",
            Self::UpstreamNotResponding => "upstream not responding",
            Self::HeartbeatTimeout => "heartbeat timeout",
            Self::IdleTimeout => "idle timeout",
            Self::SessionTimeLimit => "session time limit",
            Self::ShuttingDown => "edge shutting down",
            Self::TokenExpired | Self::TokenExpiredUpstream => "token expired",
            Self::MessageRateExceeded => "message rate exceeded",
            Self::Violation(error) => error.reason(),
            Self::NotResumable(why) => why.reason(),
            Self::TakenOver => "session taken over",
            Self::Revoked | Self::RevokedUpstream => "revoked",
        }
    }

    /// As a close frame's body would carry it.
    pub(crate) fn to_close(self) -> Close {
        Close {
            code: Some(self.code()),
            reason: self.reason().to_owned(),
        }
    }
}

/// How to end one side of a connection.
#[derive(Debug, Clone)]
pub(crate) enum Finish {
    /// The connection is gone: nothing to send or wait for.
    Gone,
    /// It sent this close: answer with the same, then end.
    Answer(Close),
    /// Pass the other side's close on, then wait briefly for the answer.
    PassOn(Close),
    /// Send the edge's own close, then wait briefly for the answer.
    Send(EdgeClose),
}

impl Finish {
    /// The code of a close the edge sends or passes on (an answer only echoes the peer's).
    pub(crate) fn code(&self) -> Option<u16> {
        match self {
            Finish::PassOn(close) => close.code,
            Finish::Send(close) => Some(close.code()),
            Finish::Gone | Finish::Answer(_) => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Upstream,
}

impl Side {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }

    pub(crate) fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

/// Why one direction of a relay stopped.
#[derive(Debug)]
pub(crate) enum End {
    /// The source sent a close frame (passed on to the other side).
    Closed(Close),
    /// The source's connection went away without a close frame.
    Lost,
    /// The source broke the protocol or the size limit.
    Violation(FrameError),
    /// Writing to the destination failed: the destination is gone.
    DestinationLost,
    /// The client sent faster than `message_rate`.
    RateLimited,
}

/// What the relay's deadlines decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deadline {
    /// A side did not answer a ping, or read nothing, in time.
    Unresponsive(Side),
    Idle,
    SessionLimit,
    TokenExpired,
    /// A detached session's client did not come back in time.
    WindowPassed,
}

/// How a connection ends: what each side is sent, and what the report says.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) to_client: Finish,
    pub(crate) to_upstream: Finish,
    /// The side whose action ended the connection (`None` when the edge ended it).
    pub(crate) ended_by: Option<Side>,
    /// A short reason for logs: "client closed", "upstream lost", "token expired", …
    pub(crate) reason: &'static str,
    /// What exactly a side did wrong, for a protocol error ("reserved opcode", …).
    pub(crate) detail: Option<&'static str>,
    /// A side that stopped responding gets less time to take its close.
    pub(crate) unresponsive: Option<Side>,
    pub(crate) limit: Option<Limit>,
    /// What a client that tries to resume this session afterwards is told.
    pub(crate) session: NotResumable,
}

impl Plan {
    pub(crate) fn shutdown() -> Self {
        Plan {
            to_client: Finish::Send(EdgeClose::ShuttingDown),
            to_upstream: Finish::Send(EdgeClose::ShuttingDown),
            ended_by: None,
            reason: "edge shutting down",
            detail: None,
            unresponsive: None,
            limit: None,
            session: NotResumable::Closed,
        }
    }

    /// An operator ended the connection (a disconnect or a revocation).
    pub(crate) fn revoked() -> Self {
        Plan {
            to_client: Finish::Send(EdgeClose::Revoked),
            to_upstream: Finish::Send(EdgeClose::RevokedUpstream),
            ended_by: None,
            reason: "revoked",
            detail: None,
            unresponsive: None,
            limit: None,
            session: NotResumable::Closed,
        }
    }

    /// The client vanished between the 101 and the upgrade (and no session waits for it).
    pub(crate) fn vanished_during_upgrade() -> Self {
        Plan {
            to_client: Finish::Gone,
            to_upstream: Finish::Send(EdgeClose::ClientWentAway),
            ended_by: Some(Side::Client),
            reason: "client vanished during the upgrade",
            detail: None,
            unresponsive: None,
            limit: None,
            session: NotResumable::Closed,
        }
    }

    /// A detached session read more than its bounds while its client was away.
    pub(crate) fn resume_overflowed() -> Self {
        Plan {
            to_client: Finish::Gone,
            to_upstream: Finish::Send(EdgeClose::ClientWentAway),
            ended_by: None,
            reason: "resume buffer overflowed",
            detail: None,
            unresponsive: None,
            limit: Some(Limit::ResumeBuffer),
            session: NotResumable::Overflowed,
        }
    }

    /// A resumed client has confirmed everything an ended upstream left: its close follows.
    pub(crate) fn upstream_closed_after_replay(close: Close) -> Self {
        Plan {
            to_client: Finish::PassOn(close),
            to_upstream: Finish::Gone,
            ended_by: Some(Side::Upstream),
            reason: "upstream closed",
            detail: None,
            unresponsive: None,
            limit: None,
            session: NotResumable::Closed,
        }
    }

    /// One direction stopped: `side` is its source.
    pub(crate) fn for_end(side: Side, end: End) -> Self {
        use EdgeClose::{ClientWentAway, MessageRateExceeded, UpstreamFailed, Violation};
        let limit = match &end {
            End::Violation(FrameError::TooBig) => Some(Limit::MaxMessageSize),
            End::RateLimited => Some(Limit::MessageRate),
            _ => None,
        };
        let detail = match &end {
            End::Violation(FrameError::Protocol(why)) => Some(*why),
            _ => None,
        };
        let (to_source, to_other, reason) = match (side, end) {
            (Side::Client, End::Closed(frame)) => (
                Finish::Answer(frame.clone()),
                Finish::PassOn(frame),
                "client closed",
            ),
            (Side::Upstream, End::Closed(frame)) => (
                Finish::Answer(frame.clone()),
                Finish::PassOn(frame),
                "upstream closed",
            ),
            (Side::Client, End::Lost) => {
                (Finish::Gone, Finish::Send(ClientWentAway), "client lost")
            }
            (Side::Upstream, End::Lost) => {
                (Finish::Gone, Finish::Send(UpstreamFailed), "upstream lost")
            }
            (Side::Client, End::Violation(error)) => (
                Finish::Send(Violation(error)),
                Finish::Send(ClientWentAway),
                match error {
                    FrameError::TooBig => "client message too big",
                    FrameError::InvalidUtf8 => "client sent invalid UTF-8",
                    FrameError::Protocol(_) => "client protocol error",
                },
            ),
            (Side::Upstream, End::Violation(error)) => (
                Finish::Send(Violation(error)),
                Finish::Send(UpstreamFailed),
                match error {
                    FrameError::TooBig => "upstream message too big",
                    FrameError::InvalidUtf8 => "upstream sent invalid UTF-8",
                    FrameError::Protocol(_) => "upstream protocol error",
                },
            ),
            // The destination is gone: tell the source why, as if the destination had been lost.
            (Side::Client, End::DestinationLost) => {
                (Finish::Send(UpstreamFailed), Finish::Gone, "upstream lost")
            }
            (Side::Upstream, End::DestinationLost) => {
                (Finish::Send(ClientWentAway), Finish::Gone, "client lost")
            }
            (_, End::RateLimited) => (
                Finish::Send(MessageRateExceeded),
                Finish::Send(ClientWentAway),
                "client message rate exceeded",
            ),
        };
        let (to_client, to_upstream) = match side {
            Side::Client => (to_source, to_other),
            Side::Upstream => (to_other, to_source),
        };
        Plan {
            to_client,
            to_upstream,
            ended_by: Some(side),
            reason,
            detail,
            unresponsive: None,
            limit,
            session: NotResumable::Closed,
        }
    }

    pub(crate) fn for_deadline(deadline: Deadline) -> Self {
        use EdgeClose::{
            ClientWentAway, HeartbeatTimeout, IdleTimeout, SessionTimeLimit, TokenExpired,
            TokenExpiredUpstream, UpstreamNotResponding,
        };
        let (to_client, to_upstream, reason) = match deadline {
            Deadline::Unresponsive(Side::Client) => (
                Finish::Send(HeartbeatTimeout),
                Finish::Send(ClientWentAway),
                "client unresponsive",
            ),
            Deadline::Unresponsive(Side::Upstream) => (
                Finish::Send(UpstreamNotResponding),
                Finish::Send(HeartbeatTimeout),
                "upstream unresponsive",
            ),
            Deadline::Idle => (
                Finish::Send(IdleTimeout),
                Finish::Send(IdleTimeout),
                "idle timeout",
            ),
            Deadline::SessionLimit => (
                Finish::Send(SessionTimeLimit),
                Finish::Send(SessionTimeLimit),
                "session time limit",
            ),
            Deadline::TokenExpired => (
                Finish::Send(TokenExpired),
                Finish::Send(TokenExpiredUpstream),
                "token expired",
            ),
            Deadline::WindowPassed => (
                Finish::Gone,
                Finish::Send(ClientWentAway),
                "resume window passed",
            ),
        };
        Plan {
            to_client,
            to_upstream,
            ended_by: None,
            reason,
            detail: None,
            unresponsive: match deadline {
                Deadline::Unresponsive(side) => Some(side),
                _ => None,
            },
            limit: match deadline {
                Deadline::Idle => Some(Limit::IdleTimeout),
                Deadline::SessionLimit => Some(Limit::MaxSession),
                _ => None,
            },
            session: match deadline {
                Deadline::WindowPassed => NotResumable::Expired,
                _ => NotResumable::Closed,
            },
        }
    }
}

/// A detached session's upstream ended: how to finish the upstream now, and the close its
/// client gets after the replay.
pub(crate) fn upstream_ended_while_detached(end: End) -> (Finish, Close) {
    match end {
        End::Closed(close) => (Finish::Answer(close.clone()), close),
        End::Violation(error) => (
            Finish::Send(EdgeClose::Violation(error)),
            EdgeClose::UpstreamFailed.to_close(),
        ),
        End::Lost | End::DestinationLost | End::RateLimited => {
            (Finish::Gone, EdgeClose::UpstreamFailed.to_close())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_bodies_are_checked() {
        assert_eq!(Close::parse(&[]).unwrap().code, None);
        assert_eq!(Close::parse(&[3]).unwrap_err().code(), 1002);
        assert_eq!(
            Close::parse(&[0x03, 0xe8, b'o', b'k']).unwrap(),
            Close {
                code: Some(1000),
                reason: "ok".into()
            }
        );
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            let body = code.to_be_bytes();
            assert_eq!(Close::parse(&body).unwrap_err().code(), 1002, "{code}");
        }
        for code in [
            1000u16, 1001, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999,
        ] {
            assert!(Close::parse(&code.to_be_bytes()).is_ok(), "{code}");
        }
        assert_eq!(Close::parse(&[0x03, 0xe8, 0xff]).unwrap_err().code(), 1007);
    }

    #[test]
    fn every_plan_sends_the_codes_the_readme_names() {
        let violation = |side| Plan::for_end(side, End::Violation(FrameError::TooBig));
        let plan = violation(Side::Client);
        assert_eq!(
            (plan.to_client.code(), plan.to_upstream.code()),
            (Some(1009), Some(1001))
        );
        assert_eq!(plan.limit, Some(Limit::MaxMessageSize));
        let plan = violation(Side::Upstream);
        assert_eq!(
            (plan.to_client.code(), plan.to_upstream.code()),
            (Some(1014), Some(1009))
        );
        let plan = Plan::for_end(Side::Client, End::RateLimited);
        assert_eq!(
            (plan.to_client.code(), plan.to_upstream.code()),
            (Some(1008), Some(1001))
        );
        let plan = Plan::for_deadline(Deadline::TokenExpired);
        assert_eq!(
            (plan.to_client.code(), plan.to_upstream.code()),
            (Some(4001), Some(1000))
        );
        let plan = Plan::for_deadline(Deadline::Unresponsive(Side::Upstream));
        assert_eq!(
            (plan.to_client.code(), plan.to_upstream.code()),
            (Some(1014), Some(1001))
        );
        assert_eq!(plan.unresponsive, Some(Side::Upstream));
        let plan = Plan::for_deadline(Deadline::WindowPassed);
        assert_eq!(plan.session, NotResumable::Expired);
        // A peer's close is passed on as it came, and answered in kind.
        let close = Close {
            code: Some(4000),
            reason: "done".into(),
        };
        let plan = Plan::for_end(Side::Upstream, End::Closed(close.clone()));
        assert!(matches!(&plan.to_client, Finish::PassOn(c) if *c == close));
        assert!(matches!(&plan.to_upstream, Finish::Answer(c) if *c == close));
        assert_eq!(
            plan.to_upstream.code(),
            None,
            "an answer is not the edge's close"
        );
    }
}
