//! The decoder harness shared by the `frame_decoder` fuzz target (`fuzz/`) and the
//! deterministic smoke test (`decoder_smoke.rs`), so CI runs the same checks on stable
//! that the fuzzer runs on nightly.
//!
//! Input layout: byte 0 chooses the limits (bit 0), the stored sequence number the
//! server resumes from (bits 1-3) and seeds the chunk sizes; the rest is the byte stream
//! an agent sent. The stream is fed to a [`FrameDecoder`] in chunks, every frame is
//! parsed, and every parsed frame goes through a [`ServerSession`] (and an
//! [`AgentSession`], which must refuse what an agent sends but never panic).
//!
//! Invariants checked: no panic; decoded frames within the limits; the decoder never
//! grows the buffer beyond one admissible frame nor allocates when refusing; decoding
//! is independent of how the stream was split; a parsed header re-encodes to a header
//! that parses to the same frame; the server's sequence bookkeeping is monotonic and
//! hands out `New` only for `stored + 1`.
#![allow(dead_code)]

use bytes::BytesMut;
use nbagent_protocol::{
    AgentSession, Frame, FrameDecoder, FrameError, Limits, RawFrame, Receipt, SUPPORTED,
    SendWindow, ServerEvent, ServerSession, ServerState,
};

/// Small limits, so that limit checks are reached by short inputs.
pub const SMALL: Limits = Limits {
    max_header: 512,
    max_payload: 64,
};

/// What one run reached, so a test can check that the harness gets past the decoder.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Whole frames decoded.
    pub frames: usize,
    /// Frames whose header parsed.
    pub parsed: usize,
    /// Sequenced messages the server stored.
    pub new_data: usize,
    /// Resends the server dropped.
    pub duplicates: usize,
    /// Frames the server session refused.
    pub refused: usize,
}

/// Runs the whole harness on one input. Panics when an invariant breaks.
pub fn run(data: &[u8]) -> Stats {
    let mut stats = Stats::default();
    let Some((&control, stream)) = data.split_first() else {
        return stats;
    };
    let limits = if control & 1 == 1 {
        SMALL
    } else {
        Limits::default()
    };
    let resume_at = u64::from((control >> 1) & 0b111);

    let chunks = chunk_sizes(control, stream.len());
    let (frames, outcome) = decode(stream, &chunks, limits);
    let (whole_frames, whole_outcome) = decode(stream, &[], limits);
    assert_eq!(frames, whole_frames, "decoding depends on the split");
    assert_eq!(outcome, whole_outcome, "decoding depends on the split");

    stats.frames = frames.len();
    let mut server = Server::new(resume_at);
    let mut agent = AgentSession::new(SUPPORTED, SendWindow::resume(resume_at, 0));
    for raw in &frames {
        let frame = match raw.parse() {
            Ok(frame) => frame,
            // A real server answers `malformed_frame` and closes; keep going to
            // exercise more frames.
            Err(FrameError::BadHeader(_)) => continue,
            Err(e) => panic!("parse can only fail on the header: {e}"),
        };
        stats.parsed += 1;
        check_reencode(&frame);
        server.feed(&frame, &mut stats);
        if let Err(e) = agent.on_frame(&frame) {
            let _ = (e.code(), e.to_string());
        }
    }
    stats
}

/// Chunk sizes derived from the control byte: deterministic per input, so a crash
/// reproduces, and varied, so splits inside the prefix and the body are exercised.
fn chunk_sizes(control: u8, len: usize) -> Vec<usize> {
    let mut state = u32::from(control).wrapping_mul(0x9E37_79B9) | 1;
    let mut sizes = Vec::new();
    let mut total = 0;
    while total < len {
        // xorshift32
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = match state % 4 {
            0 => 1,
            1 => (state >> 8) as usize % 8 + 1,
            2 => (state >> 8) as usize % 64 + 1,
            _ => (state >> 8) as usize % 1024 + 1,
        };
        sizes.push(n);
        total += n;
    }
    sizes
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Only whole frames.
    Clean,
    /// A framing error (named by its variant).
    Failed(&'static str),
}

fn name(e: &FrameError) -> &'static str {
    match e {
        FrameError::HeaderTooLarge { .. } => "header_too_large",
        FrameError::PayloadTooLarge { .. } => "payload_too_large",
        FrameError::EmptyHeader => "empty_header",
        FrameError::BadHeader(_) => "bad_header",
        FrameError::Truncated { .. } => "truncated",
        FrameError::UnexpectedTls => "unexpected_tls",
        _ => "other",
    }
}

/// Decodes `stream` fed in `chunks` (the remainder in one last chunk).
pub fn decode(stream: &[u8], chunks: &[usize], limits: Limits) -> (Vec<RawFrame>, Outcome) {
    let max_frame = usize::try_from(limits.max_frame()).unwrap_or(usize::MAX);
    let mut decoder = FrameDecoder::new(limits);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = stream;
    let mut sizes = chunks.iter().copied();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        buf.extend_from_slice(chunk);
        loop {
            let cap_before = buf.capacity();
            let len_before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(raw)) => {
                    assert!(!raw.header.is_empty(), "empty header accepted");
                    assert!(raw.header.len() <= limits.max_header as usize);
                    assert!(raw.payload.len() <= limits.max_payload as usize);
                    assert_eq!(len_before - buf.len(), raw.wire_len(), "bytes lost");
                    frames.push(raw);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), len_before, "consumed bytes without a frame");
                    if buf.capacity() > cap_before {
                        assert!(
                            buf.capacity() <= max_frame.max(2 * cap_before),
                            "buffer grew to {} bytes, limit {max_frame}",
                            buf.capacity()
                        );
                    }
                    break;
                }
                Err(e) => {
                    assert_eq!(buf.capacity(), cap_before, "allocated for a refused frame");
                    assert!(!matches!(
                        e,
                        FrameError::BadHeader(_) | FrameError::Truncated { .. }
                    ));
                    return (frames, Outcome::Failed(name(&e)));
                }
            }
        }
    }
    match decoder.finish(&buf) {
        Ok(()) => (frames, Outcome::Clean),
        Err(e) => {
            assert!(matches!(e, FrameError::Truncated { buffered } if buffered == buf.len()));
            (frames, Outcome::Failed(name(&e)))
        }
    }
}

/// A parsed header, written again by us, must parse to the same frame.
fn check_reencode(frame: &Frame) {
    let again = frame.to_raw();
    let back = again.parse().expect("our own header must parse");
    assert_eq!(&back, frame, "header does not survive re-encoding");
}

/// A model of the server's use of [`ServerSession`]: answers `hello` by establishing
/// the session at a stored sequence number, stores new data and checks what the session
/// says against the model. A refused frame closes the connection; the next frame goes
/// to a fresh connection (and the stored data survives, as in the database).
struct Server {
    session: ServerSession,
    stored: u64,
}

impl Server {
    fn new(stored: u64) -> Self {
        Self {
            session: ServerSession::new(SUPPORTED),
            stored,
        }
    }

    fn feed(&mut self, frame: &Frame, stats: &mut Stats) {
        let before = self.session.state().clone();
        match self.session.on_frame(frame) {
            Ok(ServerEvent::Hello { version }) => {
                assert!(SUPPORTED.contains(version));
                assert_eq!(before, ServerState::AwaitingHello);
                self.session.established(version, self.stored);
            }
            Ok(ServerEvent::Enroll { version }) => {
                assert!(SUPPORTED.contains(version));
                assert_eq!(self.session.state(), &ServerState::Enrolled);
            }
            Ok(ServerEvent::Data { seq, receipt }) => {
                assert!(matches!(before, ServerState::Established { .. }));
                assert_eq!(frame.envelope.seq, Some(seq));
                assert!(frame.envelope.msg.is_sequenced());
                match receipt {
                    Receipt::New => {
                        assert_eq!(seq, self.stored + 1, "new data must be the next number");
                        self.session.commit(seq);
                        self.stored = seq;
                        stats.new_data += 1;
                    }
                    Receipt::Duplicate => {
                        assert!(seq >= 1 && seq <= self.stored, "duplicate of unseen {seq}");
                        stats.duplicates += 1;
                    }
                }
                assert_eq!(self.session.stored(), self.stored);
            }
            Ok(ServerEvent::Control) => {
                assert!(matches!(before, ServerState::Established { .. }));
                assert!(frame.envelope.seq.is_none());
            }
            Ok(ServerEvent::Goodbye) => {
                assert_eq!(self.session.state(), &ServerState::Closed);
            }
            Err(e) => {
                // Every refusal maps to a code and a message; the connection closes.
                let _ = (e.code(), e.to_string());
                stats.refused += 1;
                self.session = ServerSession::new(SUPPORTED);
            }
        }
    }
}
