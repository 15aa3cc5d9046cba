//! Session state machines (sans-IO).
//!
//! [`AgentSession`] and [`ServerSession`] take decoded frames and say what they mean
//! in the session's current state, refusing anything out of place; [`SendWindow`] and
//! [`ReceiveLog`] hold the sequence-number and cumulative-ack bookkeeping that makes
//! delivery exactly-once across reconnects. None of them does I/O.

use crate::codec::Frame;
use crate::message::{Direction, ErrorCode, Message};
use crate::version::{self, VersionError, VersionRange};

/// Errors a session raises on a peer's frame. Each maps to an [`ErrorCode`] to send
/// back before closing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The message is not valid in this state or direction.
    #[error("unexpected {kind} message while {state}")]
    Unexpected {
        /// The message's type.
        kind: &'static str,
        /// The session's state.
        state: &'static str,
    },
    /// A sequenced message without a sequence number, or the reverse.
    #[error("{kind} message {problem}")]
    Sequencing {
        /// The message's type.
        kind: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
    /// A payload on a message that takes none.
    #[error("{kind} message carries a payload of {len} bytes but takes none")]
    UnexpectedPayload {
        /// The message's type.
        kind: &'static str,
        /// Payload length.
        len: usize,
    },
    /// No common version.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// The peer skipped sequence numbers.
    #[error(transparent)]
    Seq(#[from] SeqError),
    /// The peer sent an error frame.
    #[error("peer refused: {code}: {message}")]
    Peer {
        /// Its code.
        code: ErrorCode,
        /// Its explanation.
        message: String,
    },
}

impl SessionError {
    /// The code to send to the peer for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::Unexpected { .. }
            | SessionError::Sequencing { .. }
            | SessionError::UnexpectedPayload { .. } => ErrorCode::UnexpectedMessage,
            SessionError::Version(_) => ErrorCode::UnsupportedVersion,
            SessionError::Seq(_) => ErrorCode::SequenceGap,
            SessionError::Peer { code, .. } => *code,
        }
    }
}

/// Sequence-number errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SeqError {
    /// A message arrived with a sequence number beyond the next expected one.
    #[error("sequence gap: expected {expected}, got {got}")]
    Gap {
        /// The next number we expected.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// The peer acknowledged a number we never sent.
    #[error("ack for {acked} but only {sent} were sent")]
    AckBeyondSent {
        /// The ack.
        acked: u64,
        /// Highest number sent.
        sent: u64,
    },
    /// Sequence numbers start at 1.
    #[error("sequence number 0 is invalid")]
    Zero,
}

/// Sender-side bookkeeping: which sequence numbers exist and which the peer has acked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendWindow {
    last_assigned: u64,
    acked: u64,
}

impl SendWindow {
    /// A window that has assigned up to `last_assigned`, of which `acked` are acked.
    pub fn resume(last_assigned: u64, acked: u64) -> Self {
        Self {
            last_assigned,
            acked: acked.min(last_assigned),
        }
    }

    /// Assigns the next sequence number.
    pub fn assign(&mut self) -> u64 {
        self.last_assigned += 1;
        self.last_assigned
    }

    /// Records that numbers up to `seq` were assigned by someone else (a durable
    /// outbox that numbers its records itself).
    pub fn note_assigned(&mut self, seq: u64) {
        self.last_assigned = self.last_assigned.max(seq);
    }

    /// Highest number assigned.
    pub fn last_assigned(&self) -> u64 {
        self.last_assigned
    }

    /// Highest number acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Number of assigned but unacknowledged messages.
    pub fn in_flight(&self) -> u64 {
        self.last_assigned - self.acked
    }

    /// Applies a cumulative ack. Returns how many messages it newly released. An ack
    /// lower than the current one is stale and ignored (returns 0).
    pub fn on_ack(&mut self, upto: u64) -> Result<u64, SeqError> {
        if upto > self.last_assigned {
            return Err(SeqError::AckBeyondSent {
                acked: upto,
                sent: self.last_assigned,
            });
        }
        let released = upto.saturating_sub(self.acked);
        self.acked = self.acked.max(upto);
        Ok(released)
    }
}

/// What the receiver should do with a sequenced message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// The next message: store it.
    New,
    /// Already stored (a resend after a lost ack): drop it, but ack again.
    Duplicate,
}

/// Receiver-side bookkeeping: the highest sequence number stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveLog {
    stored: u64,
}

impl ReceiveLog {
    /// A log whose durable store already holds everything up to `stored`.
    pub fn resume(stored: u64) -> Self {
        Self { stored }
    }

    /// Highest sequence number stored.
    pub fn stored(&self) -> u64 {
        self.stored
    }

    /// Classifies an arriving sequence number without recording it.
    pub fn check(&self, seq: u64) -> Result<Receipt, SeqError> {
        if seq == 0 {
            Err(SeqError::Zero)
        } else if seq <= self.stored {
            Ok(Receipt::Duplicate)
        } else if seq == self.stored + 1 {
            Ok(Receipt::New)
        } else {
            Err(SeqError::Gap {
                expected: self.stored + 1,
                got: seq,
            })
        }
    }

    /// Records that `seq` is durably stored. Must follow a `check` that said `New`.
    pub fn commit(&mut self, seq: u64) {
        debug_assert_eq!(seq, self.stored + 1);
        self.stored = self.stored.max(seq);
    }
}

fn validate_shape(frame: &Frame, from: Direction) -> Result<(), SessionError> {
    let msg = &frame.envelope.msg;
    let kind = msg.kind();
    let dir = msg.direction();
    if dir != Direction::Both && dir != from {
        return Err(SessionError::Unexpected {
            kind,
            state: match from {
                Direction::ToServer => "receiving from an agent",
                _ => "receiving from the server",
            },
        });
    }
    match (msg.is_sequenced(), frame.envelope.seq) {
        (true, None) => {
            return Err(SessionError::Sequencing {
                kind,
                problem: "has no sequence number",
            });
        }
        (false, Some(_)) => {
            return Err(SessionError::Sequencing {
                kind,
                problem: "must not carry a sequence number",
            });
        }
        _ => {}
    }
    if !msg.has_payload() && !frame.payload.is_empty() {
        return Err(SessionError::UnexpectedPayload {
            kind,
            len: frame.payload.len(),
        });
    }
    if let Message::Error { code, message, .. } = msg {
        return Err(SessionError::Peer {
            code: *code,
            message: message.clone(),
        });
    }
    Ok(())
}

/// States of the server's view of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerState {
    /// Waiting for `hello` or `enroll`.
    AwaitingHello,
    /// Enrolment answered; only the close remains.
    Enrolled,
    /// A data session with the negotiated version.
    Established {
        /// Negotiated version.
        version: u16,
    },
    /// Closed.
    Closed,
}

/// What the server must do with an incoming frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// An enrolment request: check the token, sign the CSR, answer `enrolled`.
    Enroll {
        /// Negotiated version.
        version: u16,
    },
    /// A data session opens: authenticate, look up the stream's stored sequence
    /// number, and answer `welcome`.
    Hello {
        /// Negotiated version.
        version: u16,
    },
    /// A sequenced message to store (or drop, if a duplicate).
    Data {
        /// Its sequence number.
        seq: u64,
        /// New or duplicate.
        receipt: Receipt,
    },
    /// A control message in an established session (heartbeat, ack, query, renew).
    Control,
    /// The agent ends the session.
    Goodbye,
}

/// The server's side of one connection.
#[derive(Debug, Clone)]
pub struct ServerSession {
    state: ServerState,
    supported: VersionRange,
    received: ReceiveLog,
}

impl ServerSession {
    /// A fresh connection speaking `supported`.
    pub fn new(supported: VersionRange) -> Self {
        Self {
            state: ServerState::AwaitingHello,
            supported,
            received: ReceiveLog::default(),
        }
    }

    /// Current state.
    pub fn state(&self) -> &ServerState {
        &self.state
    }

    /// Call after answering `hello` with `welcome`: `stored` is the highest sequence
    /// number of the agent's stream already in the database.
    pub fn established(&mut self, version: u16, stored: u64) {
        self.state = ServerState::Established { version };
        self.received = ReceiveLog::resume(stored);
    }

    /// Call once a data message has been durably stored.
    pub fn commit(&mut self, seq: u64) {
        self.received.commit(seq);
    }

    /// Highest sequence number stored: the value to acknowledge.
    pub fn stored(&self) -> u64 {
        self.received.stored()
    }

    /// Re-synchronises with the durable store after it reported a different position
    /// (for example when another connection of the same agent stored messages).
    pub fn resync(&mut self, stored: u64) {
        self.received = ReceiveLog::resume(stored);
    }

    /// Interprets one frame from the agent.
    pub fn on_frame(&mut self, frame: &Frame) -> Result<ServerEvent, SessionError> {
        validate_shape(frame, Direction::ToServer)?;
        let msg = &frame.envelope.msg;
        let unexpected = |state: &'static str| SessionError::Unexpected {
            kind: msg.kind(),
            state,
        };
        match &self.state {
            ServerState::AwaitingHello => match msg {
                Message::Enroll { versions, .. } => {
                    let version = version::negotiate(*versions, self.supported)?;
                    self.state = ServerState::Enrolled;
                    Ok(ServerEvent::Enroll { version })
                }
                Message::Hello { versions, .. } => {
                    let version = version::negotiate(*versions, self.supported)?;
                    Ok(ServerEvent::Hello { version })
                }
                _ => Err(unexpected("awaiting hello")),
            },
            ServerState::Enrolled => match msg {
                Message::Goodbye { .. } => {
                    self.state = ServerState::Closed;
                    Ok(ServerEvent::Goodbye)
                }
                _ => Err(unexpected("enrolled")),
            },
            ServerState::Established { .. } => match msg {
                Message::Enroll { .. } | Message::Hello { .. } => Err(unexpected("established")),
                Message::Goodbye { .. } => {
                    self.state = ServerState::Closed;
                    Ok(ServerEvent::Goodbye)
                }
                _ => match frame.envelope.seq {
                    Some(seq) => {
                        let receipt = self.received.check(seq)?;
                        Ok(ServerEvent::Data { seq, receipt })
                    }
                    None => Ok(ServerEvent::Control),
                },
            },
            ServerState::Closed => Err(unexpected("closed")),
        }
    }
}

/// States of the agent's view of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// `hello` or `enroll` sent, waiting for the answer.
    AwaitingWelcome,
    /// Established with the negotiated version.
    Established {
        /// Negotiated version.
        version: u16,
    },
    /// Closed.
    Closed,
}

/// What the agent must do with an incoming frame.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// The server accepted the session; resend everything after `acked`.
    Welcome {
        /// Negotiated version.
        version: u16,
        /// Highest sequence number the server has stored.
        acked: u64,
    },
    /// The server signed our certificate.
    Enrolled,
    /// The server stored everything up to `upto`.
    Acked {
        /// Cumulative ack.
        upto: u64,
        /// How many outbox entries this releases.
        released: u64,
    },
    /// A command or answer from the server.
    Message,
    /// The server ends the session.
    Goodbye,
}

/// The agent's side of one connection.
#[derive(Debug, Clone)]
pub struct AgentSession {
    state: AgentState,
    offered: VersionRange,
    window: SendWindow,
}

impl AgentSession {
    /// A session that has sent `hello`/`enroll` offering `offered`; `window` is the
    /// outbox's sequence bookkeeping.
    pub fn new(offered: VersionRange, window: SendWindow) -> Self {
        Self {
            state: AgentState::AwaitingWelcome,
            offered,
            window,
        }
    }

    /// Current state.
    pub fn state(&self) -> AgentState {
        self.state
    }

    /// The send window.
    pub fn window(&self) -> &SendWindow {
        &self.window
    }

    /// Assigns the next sequence number for a new data message.
    pub fn assign(&mut self) -> u64 {
        self.window.assign()
    }

    /// Records that sequence numbers up to `seq` were assigned elsewhere (by a durable
    /// outbox) and sent: acks up to `seq` become valid.
    pub fn note_sent(&mut self, seq: u64) {
        self.window.note_assigned(seq);
    }

    /// Interprets one frame from the server.
    pub fn on_frame(&mut self, frame: &Frame) -> Result<AgentEvent, SessionError> {
        validate_shape(frame, Direction::ToAgent)?;
        let msg = &frame.envelope.msg;
        let unexpected = |state: &'static str| SessionError::Unexpected {
            kind: msg.kind(),
            state,
        };
        match self.state {
            AgentState::AwaitingWelcome => match msg {
                Message::Welcome { version, acked, .. } => {
                    if !self.offered.contains(*version) {
                        return Err(VersionError {
                            offered: VersionRange::new(*version, *version),
                            supported: self.offered,
                        }
                        .into());
                    }
                    if *acked > self.window.last_assigned() {
                        // The server stored more of this stream than we remember
                        // assigning (local records lost in a power loss): continue
                        // numbering after its watermark so no number is reused.
                        self.window = SendWindow::resume(*acked, *acked);
                    } else {
                        self.window.on_ack(*acked)?;
                    }
                    self.state = AgentState::Established { version: *version };
                    Ok(AgentEvent::Welcome {
                        version: *version,
                        acked: *acked,
                    })
                }
                Message::Enrolled { version, .. } => {
                    if !self.offered.contains(*version) {
                        return Err(VersionError {
                            offered: VersionRange::new(*version, *version),
                            supported: self.offered,
                        }
                        .into());
                    }
                    self.state = AgentState::Closed;
                    Ok(AgentEvent::Enrolled)
                }
                _ => Err(unexpected("awaiting welcome")),
            },
            AgentState::Established { .. } => match msg {
                Message::Welcome { .. } | Message::Enrolled { .. } => {
                    Err(unexpected("established"))
                }
                Message::Ack { upto } => {
                    let released = self.window.on_ack(*upto)?;
                    Ok(AgentEvent::Acked {
                        upto: *upto,
                        released,
                    })
                }
                Message::Goodbye { .. } => {
                    self.state = AgentState::Closed;
                    Ok(AgentEvent::Goodbye)
                }
                _ => Ok(AgentEvent::Message),
            },
            AgentState::Closed => Err(unexpected("closed")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unit tests: a panic is the failure report
mod tests {
    use super::*;
    use crate::message::{Envelope, OutputContent};
    use crate::version::SUPPORTED;
    use bytes::Bytes;

    fn frame(seq: Option<u64>, msg: Message) -> Frame {
        Frame {
            envelope: Envelope { seq, msg },
            payload: Bytes::new(),
        }
    }

    fn hello() -> Frame {
        frame(
            None,
            Message::Hello {
                versions: SUPPORTED,
                stream: "s".into(),
                software: "t".into(),
                token: None,
                received: 0,
            },
        )
    }

    fn output(seq: u64) -> Frame {
        frame(
            Some(seq),
            Message::Output {
                request: "r".into(),
                cell: "c".into(),
                output: OutputContent::Stream {
                    name: "stdout".into(),
                    text: "x".into(),
                },
            },
        )
    }

    #[test]
    fn server_dedups_and_refuses_gaps() {
        let mut s = ServerSession::new(SUPPORTED);
        assert_eq!(
            s.on_frame(&hello()).unwrap(),
            ServerEvent::Hello { version: 1 }
        );
        s.established(1, 5);
        assert_eq!(
            s.on_frame(&output(3)).unwrap(),
            ServerEvent::Data {
                seq: 3,
                receipt: Receipt::Duplicate
            }
        );
        assert_eq!(
            s.on_frame(&output(6)).unwrap(),
            ServerEvent::Data {
                seq: 6,
                receipt: Receipt::New
            }
        );
        s.commit(6);
        let err = s.on_frame(&output(8)).unwrap_err();
        assert_eq!(err.code(), ErrorCode::SequenceGap);
    }

    #[test]
    fn server_refuses_data_before_hello_and_unsequenced_data() {
        let mut s = ServerSession::new(SUPPORTED);
        assert_eq!(
            s.on_frame(&output(1)).unwrap_err().code(),
            ErrorCode::UnexpectedMessage
        );
        s.on_frame(&hello()).unwrap();
        s.established(1, 0);
        let mut f = output(1);
        f.envelope.seq = None;
        assert!(matches!(
            s.on_frame(&f).unwrap_err(),
            SessionError::Sequencing { .. }
        ));
    }

    #[test]
    fn server_refuses_wrong_direction_and_stray_payload() {
        let mut s = ServerSession::new(SUPPORTED);
        s.on_frame(&hello()).unwrap();
        s.established(1, 0);
        let cmd = frame(
            Some(1),
            Message::Interrupt {
                request: "x".into(),
            },
        );
        assert!(s.on_frame(&cmd).is_err());
        let mut hb = frame(None, Message::Heartbeat { sent_ms: 1 });
        hb.payload = Bytes::from_static(b"zz");
        assert!(matches!(
            s.on_frame(&hb).unwrap_err(),
            SessionError::UnexpectedPayload { len: 2, .. }
        ));
    }

    #[test]
    fn server_refuses_unsupported_version() {
        let mut s = ServerSession::new(SUPPORTED);
        let mut f = hello();
        if let Message::Hello { versions, .. } = &mut f.envelope.msg {
            *versions = VersionRange::new(7, 9);
        }
        assert_eq!(
            s.on_frame(&f).unwrap_err().code(),
            ErrorCode::UnsupportedVersion
        );
    }

    #[test]
    fn agent_window_tracks_acks() {
        let mut a = AgentSession::new(SUPPORTED, SendWindow::resume(10, 2));
        let welcome = frame(
            None,
            Message::Welcome {
                version: 1,
                agent: "a".into(),
                acked: 4,
                heartbeat_ms: 1000,
                max_payload: 1,
                tls: true,
            },
        );
        assert_eq!(
            a.on_frame(&welcome).unwrap(),
            AgentEvent::Welcome {
                version: 1,
                acked: 4
            }
        );
        assert_eq!(a.window().in_flight(), 6);
        assert_eq!(
            a.on_frame(&frame(None, Message::Ack { upto: 9 })).unwrap(),
            AgentEvent::Acked {
                upto: 9,
                released: 5
            }
        );
        assert!(a.on_frame(&frame(None, Message::Ack { upto: 11 })).is_err());
    }

    #[test]
    fn peer_error_surfaces_with_its_code() {
        let mut a = AgentSession::new(SUPPORTED, SendWindow::default());
        let e = frame(
            None,
            Message::Error {
                code: ErrorCode::TokenUsed,
                message: "token already used".into(),
                fatal: true,
            },
        );
        let err = a.on_frame(&e).unwrap_err();
        assert_eq!(err.code(), ErrorCode::TokenUsed);
        assert!(err.to_string().contains("token already used"));
    }
}
