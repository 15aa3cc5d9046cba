//! One agent connection: handshake, enrolment, and the exactly-once data path.
//!
//! The loop reads whatever frames one socket read delivers, stores the new sequenced
//! messages of that batch in one database transaction (blob chunks first, to the blob
//! store), and then acknowledges the highest stored sequence number. A crash anywhere
//! before the commit loses nothing: the agent still holds the messages and resends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nbagent_protocol::io::{FrameReader, IoError, write_frame, write_raw};
use nbagent_protocol::{
    Envelope, ErrorCode, FileRoot, Frame, Limits, Message, RawFrame, Receipt, SUPPORTED,
    ServerEvent, ServerSession, SessionError,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

use crate::blobs::ChunkOutcome;
use crate::files;
use crate::pki::Token;
use crate::state::ServerState;
use crate::store::{FileChange, NewMessage, TokenError};

/// How the peer reached us.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Remote address, for logs.
    pub addr: String,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The agent name from a verified client certificate.
    pub cert_agent: Option<String>,
}

/// Largest number of frames handled in one batch (one transaction).
const MAX_BATCH: usize = 2048;

/// Largest number of bytes gathered into one batch.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// `file_read` queries of one connection answered at the same time. Their answers are
/// written as they complete (the agent matches them by request id), so a sequential
/// reader that keeps several ranges in flight is not served one range at a time; beyond
/// this many the connection loop waits for the oldest to be answered.
const MAX_READS_IN_FLIGHT: usize = 8;

/// Why a connection ended, for the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    /// Transport or framing failure.
    #[error(transparent)]
    Io(#[from] IoError),
    /// We refused the peer (the peer was told why).
    #[error("refused: {code}: {message}")]
    Refused {
        /// The code sent.
        code: ErrorCode,
        /// The message sent.
        message: String,
    },
    /// Storage failed; the agent keeps its messages and will resend.
    #[error("storage failed")]
    Store(#[from] crate::store::StoreError),
    /// The agent was silent too long.
    #[error("no frame from the agent for {0:?}")]
    Timeout(Duration),
    /// A newer connection of the same agent replaced this one.
    #[error("replaced by a newer connection of the same agent")]
    Replaced,
}

/// Serves one connection until it ends.
pub async fn serve<S>(io: S, peer: Peer, state: Arc<ServerState>) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (rd, mut wr) = tokio::io::split(io);
    let limits = Limits {
        max_payload: state.config.max_payload,
        ..Limits::default()
    };
    let mut reader = FrameReader::new(rd, limits);
    let mut session = ServerSession::new(SUPPORTED);

    // The first frame decides: enrolment or data session.
    let first =
        match tokio::time::timeout(state.config.handshake_timeout, reader.read_frame()).await {
            Err(_) => return Err(ConnError::Timeout(state.config.handshake_timeout)),
            Ok(Err(e)) => return Err(refuse_io(&mut wr, e).await),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(f))) => f,
        };
    let frame = match first.parse() {
        Ok(f) => f,
        Err(e) => return Err(refuse(&mut wr, ErrorCode::MalformedFrame, e.to_string()).await),
    };
    let event = match session.on_frame(&frame) {
        Ok(ev) => ev,
        Err(e) => return Err(refuse(&mut wr, e.code(), e.to_string()).await),
    };
    match (event, frame.envelope.msg) {
        (
            ServerEvent::Enroll { version },
            Message::Enroll {
                token,
                csr_pem,
                software,
                ..
            },
        ) => enroll(&mut wr, &peer, &state, version, &token, &csr_pem, &software).await,
        (
            ServerEvent::Hello { version },
            Message::Hello {
                stream,
                software,
                token,
                received,
                ..
            },
        ) => {
            let agent = authenticate(&mut wr, &peer, &state, token.as_deref()).await?;
            let hello = Hello {
                version,
                agent,
                stream,
                software,
                received,
            };
            data_session(reader, wr, session, &peer, &state, hello).await
        }
        _ => Err(refuse(
            &mut wr,
            ErrorCode::UnexpectedMessage,
            "expected hello or enroll".into(),
        )
        .await),
    }
}

/// The frame of a listing, encoded once. A listing whose header an agent would refuse
/// (over [`nbagent_protocol::codec::SERVER_MAX_HEADER`], which would cut the connection
/// at every re-listing) becomes an error listing that says why and what to do.
fn listing_frame(msg: Message) -> RawFrame {
    let raw = Frame::control(msg).to_raw();
    let limit = nbagent_protocol::codec::SERVER_MAX_HEADER as usize;
    if raw.header.len() <= limit {
        return raw;
    }
    let Ok(Frame {
        envelope:
            Envelope {
                msg:
                    Message::FileListing {
                        request, entries, ..
                    },
                ..
            },
        ..
    }) = raw.parse()
    else {
        return raw;
    };
    let size = raw.header.len();
    warn!(
        entries = entries.len(),
        bytes = size,
        "file listing too large for an agent"
    );
    Frame::control(Message::FileListing {
        request,
        writable: false,
        entries: Vec::new(),
        error: Some(format!(
            "the tree has {} entries, a {size}-byte listing, over the {limit} bytes an agent \
             accepts; remove files or split them into fewer, larger archives",
            entries.len()
        )),
    })
    .to_raw()
}

async fn send<W: AsyncWrite + Unpin>(wr: &mut W, msg: Message) -> Result<(), ConnError> {
    write_frame(wr, &Frame::control(msg)).await?;
    wr.flush().await.map_err(IoError::from)?;
    Ok(())
}

/// Sends a fatal error frame and returns the matching error. Write failures are
/// ignored: the peer may already be gone, and the refusal is logged either way.
async fn refuse<W: AsyncWrite + Unpin>(wr: &mut W, code: ErrorCode, message: String) -> ConnError {
    let _ = send(
        wr,
        Message::Error {
            code,
            message: message.clone(),
            fatal: true,
        },
    )
    .await;
    let _ = wr.shutdown().await;
    ConnError::Refused { code, message }
}

async fn refuse_io<W: AsyncWrite + Unpin>(wr: &mut W, e: IoError) -> ConnError {
    match &e {
        IoError::Frame(fe) => {
            let code = match fe {
                nbagent_protocol::FrameError::HeaderTooLarge { .. }
                | nbagent_protocol::FrameError::PayloadTooLarge { .. } => ErrorCode::FrameTooLarge,
                _ => ErrorCode::MalformedFrame,
            };
            refuse(wr, code, fe.to_string()).await
        }
        IoError::Io(_) => ConnError::Io(e),
        _ => ConnError::Io(e),
    }
}

fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

async fn enroll<W: AsyncWrite + Unpin>(
    wr: &mut W,
    peer: &Peer,
    state: &ServerState,
    version: u16,
    token: &str,
    csr_pem: &str,
    software: &str,
) -> Result<(), ConnError> {
    if !peer.tls {
        return Err(refuse(
            wr,
            ErrorCode::PlaintextRefused,
            "enrolment needs TLS: the token and certificate would travel in the clear; \
             connect with TLS (the agent's default)"
                .into(),
        )
        .await);
    }
    let token = match Token::parse(token) {
        Ok(t) => t,
        Err(e) => {
            return Err(refuse(
                wr,
                ErrorCode::TokenUnknown,
                format!("enrolment token is malformed: {e}"),
            )
            .await);
        }
    };
    let grant = match state
        .store
        .consume_token(&token.id, &token.secret_hash(), now_secs(), &peer.addr)
        .await
    {
        Ok(g) => g,
        Err(e) => {
            let (code, message) = token_refusal(&e);
            warn!(peer = %peer.addr, token = %token.id, %code, "enrolment refused");
            return Err(refuse(wr, code, message).await);
        }
    };
    let issued = {
        let ca = state.ca.read().await;
        ca.sign_agent_csr(
            csr_pem,
            &grant.agent,
            state.config.agent_cert_validity,
            time::OffsetDateTime::now_utc(),
        )
    };
    let issued = match issued {
        Ok(i) => i,
        Err(e) => {
            return Err(refuse(
                wr,
                ErrorCode::BadCsr,
                format!("certificate request refused: {e}"),
            )
            .await);
        }
    };
    state
        .store
        .record_agent_cert(&grant.agent, &issued.serial, issued.not_after, now_secs())
        .await?;
    let ca_pem = state.ca.read().await.cert_pem().to_owned();
    info!(agent = %grant.agent, peer = %peer.addr, %software, not_after = issued.not_after, "agent enrolled");
    send(
        wr,
        Message::Enrolled {
            version,
            agent: grant.agent,
            certificate_pem: issued.cert_pem,
            ca_pem,
            not_after: issued.not_after,
        },
    )
    .await?;
    let _ = wr.shutdown().await;
    Ok(())
}

fn token_refusal(e: &TokenError) -> (ErrorCode, String) {
    match e {
        TokenError::Unknown => (
            ErrorCode::TokenUnknown,
            "enrolment token is not known to this server: create one with `nbserver token create`"
                .into(),
        ),
        TokenError::Expired { expired_at } => (
            ErrorCode::TokenExpired,
            format!(
                "enrolment token expired at {expired_at} (unix time): create a new one with `nbserver token create`"
            ),
        ),
        TokenError::AlreadyUsed { used_at, used_by } => (
            ErrorCode::TokenUsed,
            format!(
                "enrolment token was already used at {used_at} (unix time) by {used_by}: tokens are single-use; \
                 create a new one with `nbserver token create`"
            ),
        ),
        other => (ErrorCode::Internal, format!("token check failed: {other}")),
    }
}

/// Who is this? A verified client certificate, or (plaintext legacy mode) a token.
async fn authenticate<W: AsyncWrite + Unpin>(
    wr: &mut W,
    peer: &Peer,
    state: &ServerState,
    token: Option<&str>,
) -> Result<String, ConnError> {
    if peer.tls {
        return match &peer.cert_agent {
            Some(name) => Ok(name.clone()),
            None => Err(refuse(
                wr,
                ErrorCode::Unauthenticated,
                "no client certificate: enrol first with a token (nbagent --token ...)".into(),
            )
            .await),
        };
    }
    if state.config.force_agent_tls {
        warn!(peer = %peer.addr, "plaintext agent refused: force_agent_tls is on");
        return Err(refuse(
            wr,
            ErrorCode::PlaintextRefused,
            "this server requires TLS from agents (force_agent_tls is on): upgrade the agent or \
             start it without --plaintext"
                .into(),
        )
        .await);
    }
    let Some(token) = token else {
        return Err(refuse(
            wr,
            ErrorCode::Unauthenticated,
            "plaintext agents must present their token in hello".into(),
        )
        .await);
    };
    let token = match Token::parse(token) {
        Ok(t) => t,
        Err(e) => {
            return Err(refuse(
                wr,
                ErrorCode::TokenUnknown,
                format!("token is malformed: {e}"),
            )
            .await);
        }
    };
    // Legacy agents present their token on every connection. The first use binds it to
    // plaintext; later plaintext uses of the same token are accepted until it expires.
    let agent = match state
        .store
        .consume_token(&token.id, &token.secret_hash(), now_secs(), PLAINTEXT_USER)
        .await
    {
        Ok(g) => {
            // Known from now on, without a certificate.
            state
                .store
                .record_agent_cert(&g.agent, PLAINTEXT_USER, 0, now_secs())
                .await?;
            g.agent
        }
        Err(TokenError::AlreadyUsed { used_by, .. }) if used_by == PLAINTEXT_USER => {
            match state
                .store
                .reused_token_agent(&token.id, &token.secret_hash(), now_secs(), PLAINTEXT_USER)
                .await
            {
                Ok(agent) => agent,
                Err(e) => {
                    let (code, message) = token_refusal(&e);
                    return Err(refuse(wr, code, message).await);
                }
            }
        }
        Err(e) => {
            let (code, message) = token_refusal(&e);
            return Err(refuse(wr, code, message).await);
        }
    };
    warn!(peer = %peer.addr, %agent, "plaintext agent accepted (force_agent_tls is off): its traffic and token are not protected");
    Ok(agent)
}

/// `used_by` marker of tokens used by plaintext (legacy) agents.
const PLAINTEXT_USER: &str = "plaintext";

/// An accepted `hello`.
#[derive(Debug)]
struct Hello {
    version: u16,
    agent: String,
    stream: String,
    software: String,
    /// Highest command the agent has processed.
    received: u64,
}

/// Sends the agent's queued commands numbered above `*sent`, advancing `*sent`.
async fn send_commands<W: AsyncWrite + Unpin>(
    wr: &mut W,
    state: &ServerState,
    agent: &str,
    sent: &mut u64,
) -> Result<(), ConnError> {
    loop {
        let queued = state.store.commands_after(agent, *sent, 256).await?;
        if queued.is_empty() {
            return Ok(());
        }
        for (seq, body) in queued {
            let msg: Message = match serde_json::from_str(&body) {
                Ok(m) => m,
                Err(e) => {
                    // Only the server writes commands; a bad one is skipped, not resent forever.
                    warn!(%agent, seq, error = %e, "stored command is not a valid message; skipped");
                    *sent = seq;
                    continue;
                }
            };
            let frame = Frame {
                envelope: nbagent_protocol::Envelope {
                    seq: Some(seq),
                    msg,
                },
                payload: bytes::Bytes::new(),
            };
            write_frame(wr, &frame).await?;
            *sent = seq;
        }
        wr.flush().await.map_err(IoError::from)?;
    }
}

async fn data_session<R, W>(
    mut reader: FrameReader<R>,
    mut wr: W,
    mut session: ServerSession,
    peer: &Peer,
    state: &Arc<ServerState>,
    hello: Hello,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Hello {
        version,
        agent,
        stream,
        software,
        received,
    } = hello;
    let stored = state.store.stream_stored(&agent, &stream).await?;
    state.store.touch_agent(&agent, now_secs()).await?;
    session.established(version, stored);
    let replaced = state.sessions.register(&agent);
    send(
        &mut wr,
        Message::Welcome {
            version,
            agent: agent.clone(),
            acked: stored,
            heartbeat_ms: state.config.heartbeat.as_millis() as u64,
            max_payload: state.config.max_payload,
            tls: peer.tls,
        },
    )
    .await?;
    info!(%agent, %stream, stored, tls = peer.tls, %software, peer = %peer.addr, "agent session established");
    // Commands: resend everything after what the agent says it processed.
    let bell = state.command_bell(&agent);
    let mut commands_sent = received;
    state.store.ack_commands(&agent, received).await?;
    send_commands(&mut wr, state, &agent, &mut commands_sent).await?;

    let heartbeat = state.config.heartbeat;
    let silence = heartbeat * 3;
    let mut last_rx = Instant::now();
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut frames: Vec<RawFrame> = Vec::with_capacity(MAX_BATCH);
    let mut acked_sent = stored;
    let mut reads: tokio::task::JoinSet<Frame> = tokio::task::JoinSet::new();
    loop {
        frames.clear();
        tokio::select! {
            r = reader.read_batch(&mut frames, MAX_BATCH) => {
                match r {
                    Ok(true) => {}
                    Ok(false) => {
                        info!(%agent, "agent closed the connection");
                        return Ok(());
                    }
                    Err(e) => return Err(refuse_io(&mut wr, e).await),
                }
            }
            _ = tick.tick() => {
                if last_rx.elapsed() > silence {
                    let _ = refuse(&mut wr, ErrorCode::HeartbeatTimeout, format!("nothing received for {silence:?}")).await;
                    return Err(ConnError::Timeout(silence));
                }
                send(&mut wr, Message::Heartbeat { sent_ms: now_ms() as u64 }).await?;
                continue;
            }
            _ = bell.notified() => {
                send_commands(&mut wr, state, &agent, &mut commands_sent).await?;
                continue;
            }
            _ = replaced.notified() => {
                let _ = send(&mut wr, Message::Goodbye { reason: "replaced by a newer connection of this agent".into() }).await;
                return Err(ConnError::Replaced);
            }
            Some(done) = reads.join_next(), if !reads.is_empty() => {
                write_read_answer(&mut wr, done).await?;
                continue;
            }
        }
        last_rx = Instant::now();
        // Take whatever else has already arrived, so that one transaction and one ack
        // cover it (cancel-safe: read_batch only awaits before it has decoded a frame).
        let mut eof = false;
        let mut bytes: usize = frames.iter().map(RawFrame::wire_len).sum();
        while frames.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            let before = frames.len();
            let polled = {
                let mut more = std::pin::pin!(reader.read_batch(&mut frames, MAX_BATCH - before));
                std::future::poll_fn(|cx| std::task::Poll::Ready(more.as_mut().poll(cx))).await
            };
            match polled {
                std::task::Poll::Ready(Ok(true)) => {}
                std::task::Poll::Ready(Ok(false)) => {
                    eof = true;
                    break;
                }
                std::task::Poll::Ready(Err(e)) => return Err(refuse_io(&mut wr, e).await),
                std::task::Poll::Pending => break,
            }
            bytes += frames[before..]
                .iter()
                .map(RawFrame::wire_len)
                .sum::<usize>();
        }
        let mut batch: Vec<NewMessage> = Vec::new();
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut file_chunks: Vec<FileChunk> = Vec::new();
        let mut file_changes: Vec<(u64, FileChange)> = Vec::new();
        let mut goodbye = false;
        let mut duplicates = false;
        for raw in &frames {
            let frame = match raw.parse() {
                Ok(f) => f,
                Err(e) => {
                    return Err(refuse(&mut wr, ErrorCode::MalformedFrame, e.to_string()).await);
                }
            };
            let event = match session.on_frame(&frame) {
                Ok(ev) => ev,
                Err(SessionError::Peer { code, message }) => {
                    warn!(%agent, %code, %message, "agent reported an error");
                    continue;
                }
                Err(e) => return Err(refuse(&mut wr, e.code(), e.to_string()).await),
            };
            match event {
                ServerEvent::Data {
                    seq,
                    receipt: Receipt::New,
                } => {
                    let payload_hash = match &frame.envelope.msg {
                        Message::BlobChunk {
                            hash,
                            media_type,
                            offset,
                            total,
                        } => {
                            chunks.push(Chunk {
                                hash: hash.clone(),
                                media_type: media_type.clone(),
                                offset: *offset,
                                total: *total,
                                payload: frame.payload.clone(),
                            });
                            Some(hash.clone())
                        }
                        Message::FileChunk {
                            root,
                            path,
                            base_version,
                            offset,
                            total,
                            version,
                        } => {
                            file_chunks.push(FileChunk {
                                seq,
                                root: *root,
                                path: path.clone(),
                                base_version: base_version.clone(),
                                offset: *offset,
                                total: *total,
                                version: version.clone(),
                                payload: frame.payload.clone(),
                            });
                            (!version.is_empty()).then(|| version.clone())
                        }
                        msg => {
                            match files::namespace_change(&agent, msg) {
                                Some(Ok(change)) => file_changes.push((seq, change)),
                                Some(Err(e)) => {
                                    refuse_file_op(
                                        &mut wr,
                                        &agent,
                                        ErrorCode::FileRefused,
                                        msg.kind(),
                                        e.to_string(),
                                    )
                                    .await?;
                                }
                                None => {}
                            }
                            None
                        }
                    };
                    let header = match std::str::from_utf8(&raw.header) {
                        Ok(s) => s.to_owned(),
                        Err(_) => {
                            return Err(refuse(
                                &mut wr,
                                ErrorCode::MalformedFrame,
                                "header is not UTF-8".into(),
                            )
                            .await);
                        }
                    };
                    batch.push(NewMessage {
                        seq,
                        kind: frame.envelope.msg.kind().to_owned(),
                        header,
                        payload_hash,
                        received_at: now_ms(),
                    });
                    session.commit(seq);
                }
                ServerEvent::Data {
                    receipt: Receipt::Duplicate,
                    seq,
                } => {
                    debug!(%agent, seq, "duplicate dropped");
                    duplicates = true;
                }
                ServerEvent::Control => match frame.envelope.msg {
                    Message::FileRead {
                        request,
                        root,
                        path,
                        version,
                        offset,
                        len,
                    } => {
                        while reads.len() >= MAX_READS_IN_FLIGHT {
                            match reads.join_next().await {
                                Some(done) => write_read_answer(&mut wr, done).await?,
                                None => break,
                            }
                        }
                        let (state, agent) = (state.clone(), agent.clone());
                        reads.spawn(async move {
                            let read = FileRead {
                                request,
                                root,
                                path,
                                version,
                                offset,
                                len,
                            };
                            read.answer(&state, &agent).await
                        });
                    }
                    msg => control(&mut wr, state, &agent, msg).await?,
                },
                ServerEvent::Goodbye => goodbye = true,
                ServerEvent::Enroll { .. } | ServerEvent::Hello { .. } => {
                    return Err(refuse(
                        &mut wr,
                        ErrorCode::UnexpectedMessage,
                        "second handshake in one session".into(),
                    )
                    .await);
                }
            }
        }
        if !chunks.is_empty() {
            store_chunks(state, &agent, chunks, &mut wr).await?;
        }
        if !file_chunks.is_empty() {
            file_changes.extend(store_file_chunks(state, &agent, file_chunks, &mut wr).await?);
            // Uploads, removals and renames apply in the agent's order.
            file_changes.sort_by_key(|(seq, _)| *seq);
        }
        if !batch.is_empty() {
            let stored = match state
                .store
                .append_with_files(&agent, &stream, &batch, &file_changes)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    // Nothing of this batch is acknowledged: the agent resends it.
                    let _ = refuse(
                        &mut wr,
                        ErrorCode::Internal,
                        "storage failed; retry later".into(),
                    )
                    .await;
                    return Err(e.into());
                }
            };
            session.resync(stored);
            state.notify_stored();
        }
        // Ack new messages, and re-ack resent duplicates so the agent can release them.
        if session.stored() != acked_sent || duplicates {
            acked_sent = session.stored();
            send(&mut wr, Message::Ack { upto: acked_sent }).await?;
        }
        if eof {
            info!(%agent, "agent closed the connection");
            return Ok(());
        }
        if goodbye {
            info!(%agent, stored = session.stored(), "agent said goodbye");
            let _ = wr.shutdown().await;
            return Ok(());
        }
    }
}

/// One `file_read` query, answered off the connection loop.
#[derive(Debug)]
struct FileRead {
    request: u64,
    root: FileRoot,
    path: String,
    version: String,
    offset: u64,
    len: u32,
}

impl FileRead {
    /// The `file_data` answer: the range (one positioned read into the payload buffer,
    /// at most `files::MAX_READ` bytes) or the reason it was refused.
    async fn answer(self, state: &ServerState, agent: &str) -> Frame {
        let FileRead {
            request,
            root,
            path,
            version,
            offset,
            len,
        } = self;
        let r = files::read_range(
            &state.store,
            &state.blobs,
            agent,
            root,
            &path,
            &version,
            offset,
            len,
        )
        .await;
        let (msg, payload) = match r {
            Ok((bytes, eof)) => (
                Message::FileData {
                    request,
                    offset,
                    eof,
                    error: None,
                },
                bytes::Bytes::from(bytes),
            ),
            Err(e) => {
                debug!(%agent, %path, error = %e, "file read refused");
                (
                    Message::FileData {
                        request,
                        offset,
                        eof: true,
                        error: Some(e.to_string()),
                    },
                    bytes::Bytes::new(),
                )
            }
        };
        Frame {
            envelope: nbagent_protocol::Envelope { seq: None, msg },
            payload,
        }
    }
}

/// Writes a finished `file_read` answer. A task that panicked answers nothing: the
/// agent's query times out and the kernel sees `EIO`.
async fn write_read_answer<W: AsyncWrite + Unpin>(
    wr: &mut W,
    done: Result<Frame, tokio::task::JoinError>,
) -> Result<(), ConnError> {
    match done {
        Ok(frame) => {
            write_frame(wr, &frame).await?;
            wr.flush().await.map_err(IoError::from)?;
        }
        Err(e) => warn!(error = %e, "file read task failed"),
    }
    Ok(())
}

/// A blob chunk waiting to be written.
#[derive(Debug)]
struct Chunk {
    hash: String,
    media_type: String,
    offset: u64,
    total: u64,
    payload: bytes::Bytes,
}

/// Writes a batch's blob chunks to the blob store on one blocking thread (before the
/// batch's messages are committed) and records the blobs they complete.
async fn store_chunks<W: AsyncWrite + Unpin>(
    state: &Arc<ServerState>,
    agent: &str,
    chunks: Vec<Chunk>,
    wr: &mut W,
) -> Result<(), ConnError> {
    let blobs = state.blobs.clone();
    let uploader = agent.to_owned();
    let outcomes = tokio::task::spawn_blocking(move || {
        chunks
            .into_iter()
            .map(|c| {
                let r = blobs.write_chunk(&uploader, &c.hash, c.offset, c.total, &c.payload);
                (c, r)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ConnError::Io(IoError::Io(std::io::Error::other(e))))?;
    for (c, outcome) in outcomes {
        match outcome {
            Ok(ChunkOutcome::Complete { size }) => {
                state
                    .store
                    .record_blob(&c.hash, size, &c.media_type, now_secs())
                    .await?;
                debug!(%agent, hash = %c.hash, size, "blob stored");
            }
            Ok(ChunkOutcome::AlreadyPresent) if c.offset + c.payload.len() as u64 >= c.total => {
                // The last chunk of a blob already on disk: a server killed between
                // storing the file and recording it would otherwise never record it
                // (the resent messages are duplicates). Recording is idempotent.
                state
                    .store
                    .record_blob(&c.hash, c.total, &c.media_type, now_secs())
                    .await?;
            }
            Ok(_) => {}
            Err(e) => {
                // The agent computed the hash; a mismatch is corruption or a bug. Keep
                // the message (nothing is dropped) and tell the agent.
                warn!(%agent, hash = %c.hash, error = %e, "blob chunk refused");
                send(
                    wr,
                    Message::Error {
                        code: ErrorCode::BlobMismatch,
                        message: format!("blob {}: {e}", c.hash),
                        fatal: false,
                    },
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// A chunk of a file the kernel wrote, waiting to be written.
#[derive(Debug)]
struct FileChunk {
    seq: u64,
    root: FileRoot,
    path: String,
    base_version: String,
    offset: u64,
    total: u64,
    version: String,
    payload: bytes::Bytes,
}

/// Tells the agent (non-fatally) why a file upload or a namespace change (mkdir,
/// remove, rename) was not applied; the message itself is stored and acknowledged like
/// any other (resending would not help).
async fn refuse_file_op<W: AsyncWrite + Unpin>(
    wr: &mut W,
    agent: &str,
    code: ErrorCode,
    what: &str,
    why: String,
) -> Result<(), ConnError> {
    warn!(%agent, %what, reason = %why, "file operation refused");
    send(
        wr,
        Message::Error {
            code,
            message: format!("{what} refused: {why}"),
            fatal: false,
        },
    )
    .await
}

/// [`refuse_file_op`] for an upload of `path`.
async fn refuse_upload<W: AsyncWrite + Unpin>(
    wr: &mut W,
    agent: &str,
    path: &str,
    why: String,
) -> Result<(), ConnError> {
    let what = format!("upload of {path:?}");
    refuse_file_op(wr, agent, ErrorCode::BlobMismatch, &what, why).await
}

/// Writes a batch's file chunks to the blob store (like blob chunks: idempotent,
/// verified against the announced version) and returns the uploads their last chunks
/// complete, to be recorded with the batch (conflicting versions kept beside the
/// current one).
async fn store_file_chunks<W: AsyncWrite + Unpin>(
    state: &Arc<ServerState>,
    agent: &str,
    chunks: Vec<FileChunk>,
    wr: &mut W,
) -> Result<Vec<(u64, FileChange)>, ConnError> {
    let mut changes = Vec::new();
    let mut ok = Vec::with_capacity(chunks.len());
    for c in chunks {
        if let Err(e) = files::validate_path(&c.path) {
            refuse_upload(wr, agent, &c.path, e.to_string()).await?;
        } else if !files::writable(c.root) {
            refuse_upload(wr, agent, &c.path, "the workspace tree is read-only".into()).await?;
        } else if c.version.is_empty() {
            refuse_upload(wr, agent, &c.path, "no version (sha-256) announced".into()).await?;
        } else {
            ok.push(c);
        }
    }
    let blobs = state.blobs.clone();
    let uploader = agent.to_owned();
    let outcomes = tokio::task::spawn_blocking(move || {
        ok.into_iter()
            .map(|c| {
                let r = blobs.write_chunk(&uploader, &c.version, c.offset, c.total, &c.payload);
                (c, r)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ConnError::Io(IoError::Io(std::io::Error::other(e))))?;
    for (c, outcome) in outcomes {
        let last = c.offset + c.payload.len() as u64 == c.total;
        match outcome {
            Ok(ChunkOutcome::Complete { size }) => {
                state
                    .store
                    .record_blob(&c.version, size, "application/octet-stream", now_secs())
                    .await?;
            }
            Ok(ChunkOutcome::AlreadyPresent) if last => {}
            Ok(_) => continue,
            Err(e) => {
                refuse_upload(wr, agent, &c.path, e.to_string()).await?;
                continue;
            }
        }
        match files::upload_change(agent, c.root, &c.path, &c.base_version, &c.version, c.total) {
            Ok(change) => changes.push((c.seq, change)),
            Err(e) => refuse_upload(wr, agent, &c.path, e.to_string()).await?,
        }
    }
    Ok(changes)
}

async fn control<W: AsyncWrite + Unpin>(
    wr: &mut W,
    state: &Arc<ServerState>,
    agent: &str,
    msg: Message,
) -> Result<(), ConnError> {
    match msg {
        Message::Heartbeat { .. } => Ok(()),
        Message::Ack { upto } => {
            state.store.ack_commands(agent, upto).await?;
            Ok(())
        }
        Message::BlobQuery { request, hashes } => {
            let present = hashes
                .into_iter()
                .filter(|h| state.blobs.has(h).unwrap_or(false))
                .collect();
            send(wr, Message::BlobStatus { request, present }).await
        }
        Message::FileList { request, root } => {
            let msg = match files::listing(&state.store, agent, root).await {
                Ok(entries) => Message::FileListing {
                    request,
                    writable: files::writable(root),
                    entries,
                    error: None,
                },
                Err(e) => {
                    warn!(%agent, ?root, error = %e, "file listing failed");
                    Message::FileListing {
                        request,
                        writable: false,
                        entries: Vec::new(),
                        error: Some(e.to_string()),
                    }
                }
            };
            write_raw(wr, &listing_frame(msg)).await?;
            wr.flush().await.map_err(IoError::from)?;
            Ok(())
        }
        Message::RenewCertificate { csr_pem } => {
            let issued = state.ca.read().await.sign_agent_csr(
                &csr_pem,
                agent,
                state.config.agent_cert_validity,
                time::OffsetDateTime::now_utc(),
            );
            match issued {
                Ok(i) => {
                    state
                        .store
                        .record_agent_cert(agent, &i.serial, i.not_after, now_secs())
                        .await?;
                    info!(%agent, not_after = i.not_after, "agent certificate renewed");
                    send(
                        wr,
                        Message::CertificateRenewed {
                            certificate_pem: i.cert_pem,
                            not_after: i.not_after,
                        },
                    )
                    .await
                }
                Err(e) => {
                    send(
                        wr,
                        Message::Error {
                            code: ErrorCode::BadCsr,
                            message: format!("renewal refused: {e}"),
                            fatal: false,
                        },
                    )
                    .await
                }
            }
        }
        other => {
            debug!(%agent, kind = other.kind(), "control message not handled yet");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbagent_protocol::{FileEntry, FileKind};

    fn listing(n: usize) -> Message {
        let entries = (0..n)
            .map(|i| FileEntry {
                path: format!("data/part-{i:08}/{}", "x".repeat(100)),
                kind: FileKind::File,
                size: 1,
                mtime_ms: 0,
                version: "0".repeat(64),
            })
            .collect();
        Message::FileListing {
            request: 7,
            writable: true,
            entries,
            error: None,
        }
    }

    #[test]
    fn a_listing_an_agent_would_refuse_becomes_an_error() {
        let small = listing(10);
        let parsed = |raw: RawFrame| raw.parse().unwrap().envelope.msg;
        assert_eq!(parsed(listing_frame(small.clone())), small);
        // ~260 bytes an entry: 80,000 entries are ~20 MB, over the 16 MiB limit.
        match parsed(listing_frame(listing(80_000))) {
            Message::FileListing {
                request,
                entries,
                error: Some(e),
                writable,
            } => {
                assert_eq!(request, 7);
                assert!(entries.is_empty() && !writable);
                assert!(e.contains("80000 entries") && e.contains("over the"), "{e}");
            }
            other => panic!("not an error listing: {other:?}"),
        }
    }
}
