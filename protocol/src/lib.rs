//! The wire protocol between `nbagent` (inside a notebook's container) and `nbserver`.
//!
//! Sans-IO: this crate turns bytes into frames and frames into session events, and
//! never touches a socket, a clock or a runtime. The agent and the server wrap it in
//! their own async transports; fuzzers and property tests drive it directly.
//!
//! - [`codec`]: length-prefixed frames (JSON header + raw payload) with hard size limits
//!   checked before allocation.
//! - [`message`]: the message catalogue ([`Message`]) and the [`Envelope`] that carries a
//!   sequence number.
//! - [`version`]: version negotiation.
//! - [`session`]: per-connection state machines and the sequence/ack bookkeeping that
//!   gives exactly-once delivery across reconnects.
//!
//! The protocol itself is documented in `docs/protocol.md`.
#![forbid(unsafe_code)]

pub mod codec;
pub mod message;
pub mod session;
pub mod version;

pub use codec::{Frame, FrameDecoder, FrameError, Limits, RawFrame};
pub use message::{
    CellSource, CellStatus, CheckpointEvent, Column, Direction, Envelope, ErrorCode, Feature,
    FileEntry, FileKind, FileRoot, KernelState, Message, OutputContent,
};
pub use session::{
    AgentEvent, AgentSession, AgentState, Receipt, ReceiveLog, SendWindow, SeqError, ServerEvent,
    ServerSession, ServerState, SessionError,
};
pub use version::{SUPPORTED, VersionError, VersionRange, negotiate};

/// Largest blob or file chunk a sender puts in one frame (1 MiB). Well under the
/// default payload limit, so the two sides never disagree about what fits.
pub const CHUNK_SIZE: usize = 1 << 20;
