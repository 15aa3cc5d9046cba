//! The agent's connection to the server: enrolment, mutual TLS, resend from the
//! outbox, acks, heartbeats, and reconnection with exponential backoff and jitter.
//!
//! One task owns the connection. It never holds data of its own: everything it sends
//! comes from the outbox, so a dropped connection, a restarted server or a restarted
//! agent only means "resend everything after the server's `welcome.acked`".

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nbagent_protocol::io::{FrameReader, IoError, write_frame};
use nbagent_protocol::{
    AgentEvent, AgentSession, ErrorCode, Frame, Limits, Message, Receipt, ReceiveLog, SUPPORTED,
    SessionError,
};
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsConnector;
use tracing::{debug, error, info, warn};

use crate::identity::{self, Identity, ServerTrust, TlsRefusal};
use crate::sender::Shared;

/// Limits of frames from the server. Headers may be larger than the protocol's default
/// 1 MiB: a `file_listing` carries the whole tree in its header (~150 bytes an entry,
/// so a 10,000-file tree is ~1.5 MB and the 100,000 entries fusefs accepts ~15 MB).
pub const FROM_SERVER: Limits = Limits {
    max_header: nbagent_protocol::codec::SERVER_MAX_HEADER,
    max_payload: nbagent_protocol::codec::DEFAULT_MAX_PAYLOAD,
};

/// Software string sent in hello/enroll.
pub const SOFTWARE: &str = concat!("nbagent/", env!("CARGO_PKG_VERSION"));

/// Where the enrolment token comes from. The file is re-read at every attempt, so an
/// orchestrator can hand a running agent a fresh token (after a secrets reset).
#[derive(Debug, Clone, Default)]
pub struct TokenSource {
    /// A token given directly (flag or environment).
    pub value: Option<String>,
    /// A file holding the token.
    pub file: Option<PathBuf>,
}

impl TokenSource {
    fn current(&self) -> Option<String> {
        if let Some(f) = &self.file
            && let Ok(s) = std::fs::read_to_string(f)
        {
            let s = s.trim();
            if !s.is_empty() {
                return Some(s.to_owned());
            }
        }
        self.value.clone()
    }
}

/// Reconnection backoff.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// Delay before attempt `n` (0-based): exponential, capped, with full jitter in
    /// the upper half so a fleet of agents does not reconnect in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
        let capped = exp.min(self.max);
        let half = capped / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }
}

/// Channel settings.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// Server address, `host:port`.
    pub server: String,
    /// Name to verify in the server's certificate (default: the host part).
    pub server_name: Option<String>,
    /// Directory of the agent's key and certificates.
    pub identity_dir: PathBuf,
    /// How the server is verified.
    pub trust: Option<ServerTrust>,
    /// Enrolment token.
    pub token: TokenSource,
    /// Legacy plaintext mode (no TLS; the token authenticates every connection).
    pub plaintext: bool,
    /// Reconnection backoff.
    pub backoff: Backoff,
    /// Largest number of unacknowledged bytes on the wire.
    pub window_bytes: usize,
    /// Timeout of connect, TLS handshake and welcome.
    pub connect_timeout: Duration,
    /// File recording the highest server command processed.
    pub command_log: PathBuf,
}

/// Why a connection attempt or session ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// TCP connect failed.
    #[error("cannot connect to {server}")]
    Connect {
        /// The server address.
        server: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS layer refused us or we refused the server.
    #[error("{0}")]
    Tls(TlsRefusal),
    /// Transport or framing error in an established session.
    #[error("connection lost")]
    Io(#[from] IoError),
    /// The server refused with an error frame.
    #[error("server refused: {code}: {message}")]
    Refused {
        /// Its code.
        code: ErrorCode,
        /// Its explanation.
        message: String,
    },
    /// The server broke the protocol.
    #[error("protocol error")]
    Protocol(#[from] SessionError),
    /// No enrolment token is available.
    #[error("not enrolled and no enrolment token: pass --token or NBAGENT_TOKEN (or --token-file)")]
    NoToken,
    /// The configuration is incomplete.
    #[error("{0}")]
    Config(String),
    /// Credentials could not be stored or loaded.
    #[error("agent credentials")]
    Identity(#[from] identity::IdentityError),
    /// The outbox failed.
    #[error("outbox")]
    Outbox(#[from] crate::outbox::OutboxError),
    /// A state file could not be read or written.
    #[error("cannot read or write {path}")]
    State {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Nothing heard from the server within the deadline.
    #[error("no answer from the server for {0:?}")]
    Timeout(Duration),
}

impl ChannelError {
    fn refused_code(&self) -> Option<ErrorCode> {
        match self {
            ChannelError::Refused { code, .. } => Some(*code),
            ChannelError::Protocol(SessionError::Peer { code, .. }) => Some(*code),
            _ => None,
        }
    }
}

/// State changes the channel reports to the rest of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelStatus {
    /// Not connected (yet, or again).
    Disconnected,
    /// A data session is established.
    Connected {
        /// The agent's name as the server knows it.
        agent: String,
        /// Whether TLS is in use.
        tls: bool,
    },
    /// The channel cannot go on without operator action (reason in the log).
    Stuck(String),
}

/// A query (not sequenced) for the server, answered by request id.
#[derive(Debug)]
pub struct Query {
    /// The request id inside `msg`.
    pub request: u64,
    /// The query (`file_list`, `file_read`, `blob_query`).
    pub msg: Message,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Frame>,
}

/// Why a query got no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The channel task is gone (the agent is stopping).
    #[error("the channel to the server is closed")]
    Closed,
    /// The connection dropped before the answer came.
    #[error("the connection to the server dropped before the answer")]
    Dropped,
    /// No answer in time (the server is unreachable or slow).
    #[error("no answer from the server within {0:?}")]
    Timeout(Duration),
}

/// The producers' handle for queries: [`Queries::ask`] sends a query over the live
/// session (waiting for one if disconnected) and waits for the answer.
#[derive(Debug, Clone)]
pub struct Queries {
    tx: mpsc::Sender<Query>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl Queries {
    /// A handle and the receiver the channel task takes (see [`run_with_queries`]).
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<Query>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Queries {
                tx,
                next: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            },
            rx,
        )
    }

    /// Sends the query `make(request id)` and waits at most `timeout` for its answer.
    pub async fn ask(
        &self,
        make: impl FnOnce(u64) -> Message,
        timeout: Duration,
    ) -> Result<Frame, QueryError> {
        let request = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let query = Query {
            request,
            msg: make(request),
            reply,
        };
        let asked = async {
            self.tx.send(query).await.map_err(|_| QueryError::Closed)?;
            answer.await.map_err(|_| QueryError::Dropped)
        };
        tokio::time::timeout(timeout, asked)
            .await
            .map_err(|_| QueryError::Timeout(timeout))?
    }
}

/// The request id an answer from the server refers to.
fn answer_to(msg: &Message) -> Option<u64> {
    match msg {
        Message::FileListing { request, .. }
        | Message::FileData { request, .. }
        | Message::BlobStatus { request, .. } => Some(*request),
        _ => None,
    }
}

/// Runs the channel until `shutdown` turns true, then sends goodbye.
///
/// Commands from the server are forwarded on `commands`.
pub async fn run(
    config: ChannelConfig,
    shared: Arc<Shared>,
    commands: mpsc::Sender<Frame>,
    status: watch::Sender<ChannelStatus>,
    shutdown: watch::Receiver<bool>,
) {
    let (_queries, rx) = Queries::new(1);
    run_with_queries(config, shared, commands, rx, status, shutdown).await
}

/// [`run`], also sending the queries of `queries` and routing their answers back.
pub async fn run_with_queries(
    config: ChannelConfig,
    shared: Arc<Shared>,
    commands: mpsc::Sender<Frame>,
    mut queries: mpsc::Receiver<Query>,
    status: watch::Sender<ChannelStatus>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut attempt: u32 = 0;
    let mut attempts = Attempts::default();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let r = tokio::select! {
            r = session(&config, &shared, &commands, &mut queries, &status, &mut attempts, shutdown.clone()) => r,
            _ = shutdown.changed() => return,
        };
        let _ = status.send(ChannelStatus::Disconnected);
        match r {
            Ok(SessionEnd::Shutdown) => return,
            Ok(SessionEnd::Closed) => {
                info!("server closed the session; reconnecting");
                attempt = 0;
            }
            Err(e) => {
                let stuck = matches!(e, ChannelError::NoToken | ChannelError::Config(_))
                    || matches!(
                        e.refused_code(),
                        Some(ErrorCode::UnsupportedVersion | ErrorCode::PlaintextRefused)
                    );
                if stuck {
                    error!(error = %e, "cannot connect without operator action; retrying slowly");
                    let _ = status.send(ChannelStatus::Stuck(e.to_string()));
                    attempt = attempt.max(30);
                } else {
                    warn!(error = %e, cause = ?std::error::Error::source(&e).map(|c| c.to_string()), attempt, "channel down");
                }
            }
        }
        let delay = config.backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        debug!(?delay, "reconnecting after backoff");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// How a session ended without error.
#[derive(Debug)]
enum SessionEnd {
    /// We were asked to shut down and said goodbye.
    Shutdown,
    /// The server ended the session.
    Closed,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn host_of(server: &str) -> &str {
    let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Bytes read from the socket at once under TLS.
const SOCKET_READ_BUFFER: usize = 256 * 1024;

async fn tcp_connect(config: &ChannelConfig) -> Result<TcpStream, ChannelError> {
    let fut = TcpStream::connect(&config.server);
    let tcp = tokio::time::timeout(config.connect_timeout, fut)
        .await
        .map_err(|_| ChannelError::Timeout(config.connect_timeout))?
        .map_err(|source| ChannelError::Connect {
            server: config.server.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

async fn tls_connect(
    config: &ChannelConfig,
    trust: &ServerTrust,
    identity: Option<&Identity>,
) -> Result<Box<dyn Io>, ChannelError> {
    let tcp = tcp_connect(config).await?;
    let client = identity::client_config(trust, identity)?;
    let name = config
        .server_name
        .clone()
        .unwrap_or_else(|| host_of(&config.server).to_owned());
    let server_name = rustls_pki_types::ServerName::try_from(name.clone())
        .map_err(|_| ChannelError::Config(format!("invalid server name {name:?}")))?;
    // rustls reads the socket 4 KiB at a time: a buffer below it makes that one
    // receive call per 256 KiB, not per 4 KiB, when the server sends file contents.
    let tcp = tokio::io::BufReader::with_capacity(SOCKET_READ_BUFFER, tcp);
    let stream = tokio::time::timeout(
        config.connect_timeout,
        TlsConnector::from(client).connect(server_name, tcp),
    )
    .await
    .map_err(|_| ChannelError::Timeout(config.connect_timeout))?
    .map_err(|e| ChannelError::Tls(identity::describe_tls_error(&e)))?;
    Ok(Box::new(stream))
}

/// Maps a transport error during the first exchange to a TLS refusal where it is one
/// (TLS 1.3 reports a refused client certificate on the first read).
fn classify_first_read(e: IoError) -> ChannelError {
    match e {
        IoError::Io(io) => {
            let refusal = identity::describe_tls_error(&io);
            if refusal == TlsRefusal::Other {
                ChannelError::Io(IoError::Io(io))
            } else {
                ChannelError::Tls(refusal)
            }
        }
        other => ChannelError::Io(other),
    }
}

async fn read_one<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    timeout: Duration,
) -> Result<Frame, ChannelError> {
    let raw = tokio::time::timeout(timeout, reader.read_frame())
        .await
        .map_err(|_| ChannelError::Timeout(timeout))?
        .map_err(classify_first_read)?
        .ok_or(ChannelError::Io(IoError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "server closed the connection during the handshake",
        ))))?;
    Ok(raw.parse().map_err(IoError::from)?)
}

/// Trades a token for a client certificate and stores the new identity.
pub async fn enroll(config: &ChannelConfig, token: &str) -> Result<Identity, ChannelError> {
    let trust = config.trust.as_ref().ok_or_else(|| {
        ChannelError::Config(
            "no way to verify the server: pass --server-ca FILE or --server-ca-sha256 HEX".into(),
        )
    })?;
    let (key, csr_pem) = identity::generate_key_and_csr()?;
    let io = tls_connect(config, trust, None).await?;
    let (rd, mut wr) = tokio::io::split(io);
    let mut reader = FrameReader::new(rd, FROM_SERVER);
    write_frame(
        &mut wr,
        &Frame::control(Message::Enroll {
            versions: SUPPORTED,
            token: token.to_owned(),
            csr_pem,
            software: SOFTWARE.into(),
        }),
    )
    .await?;
    wr.flush().await.map_err(IoError::from)?;
    let frame = read_one(&mut reader, config.connect_timeout).await?;
    let mut session = AgentSession::new(SUPPORTED, Default::default());
    session.on_frame(&frame)?;
    match frame.envelope.msg {
        Message::Enrolled {
            agent,
            certificate_pem,
            ca_pem,
            not_after,
            ..
        } => {
            let id = Identity::store(
                &config.identity_dir,
                key.as_str(),
                &certificate_pem,
                &ca_pem,
            )?;
            info!(%agent, not_after, "enrolled with the server");
            Ok(id)
        }
        other => Err(ChannelError::Protocol(SessionError::Unexpected {
            kind: other.kind(),
            state: "enrolling",
        })),
    }
}

/// Per-channel memory across attempts.
#[derive(Debug, Default)]
struct Attempts {
    /// Tokens the server refused: not tried again.
    refused_tokens: Vec<String>,
    /// The stored certificate was refused: enrol again before the next session.
    must_enrol: bool,
}

/// Gets credentials: the stored identity, or a fresh enrolment.
async fn credentials(
    config: &ChannelConfig,
    attempts: &mut Attempts,
    allow_enrol: bool,
) -> Result<Identity, ChannelError> {
    if !attempts.must_enrol
        && let Some(id) = Identity::load(&config.identity_dir)?
    {
        return Ok(id);
    }
    if !allow_enrol {
        return Err(ChannelError::NoToken);
    }
    let token = config.token.current().ok_or(ChannelError::NoToken)?;
    if attempts.refused_tokens.contains(&token) {
        return Err(ChannelError::NoToken);
    }
    match enroll(config, &token).await {
        Ok(id) => {
            attempts.must_enrol = false;
            Ok(id)
        }
        Err(e) => {
            if matches!(
                e.refused_code(),
                Some(ErrorCode::TokenUnknown | ErrorCode::TokenExpired | ErrorCode::TokenUsed)
            ) {
                error!(error = %e, "enrolment token refused; waiting for a new one");
                attempts.refused_tokens.push(token);
            }
            Err(e)
        }
    }
}

type Reader = FrameReader<tokio::io::ReadHalf<Box<dyn Io>>>;
type Writer = tokio::io::WriteHalf<Box<dyn Io>>;

/// An established data session.
struct Connected {
    reader: Reader,
    wr: Writer,
    proto: AgentSession,
    agent: String,
    heartbeat: Duration,
    acked: u64,
    identity: Option<Identity>,
    tls: bool,
}

/// Connects, authenticates and exchanges hello/welcome.
async fn connect(
    config: &ChannelConfig,
    stream: String,
    window: nbagent_protocol::SendWindow,
    received: u64,
    attempts: &mut Attempts,
    allow_enrol: bool,
) -> Result<Connected, ChannelError> {
    let (io, identity, tls): (Box<dyn Io>, Option<Identity>, bool) = if config.plaintext {
        warn!(server = %config.server, "connecting in plaintext (legacy mode): traffic and token are not protected");
        (Box::new(tcp_connect(config).await?), None, false)
    } else {
        let id = credentials(config, attempts, allow_enrol).await?;
        match tls_connect(config, &data_trust(config, &id), Some(&id)).await {
            Ok(io) => (io, Some(id), true),
            Err(ChannelError::Tls(r)) if r.needs_enrolment() => {
                warn!(reason = %r, "credentials no longer accepted; will enrol again (the kernel and outbox are kept)");
                attempts.must_enrol = true;
                return Err(ChannelError::Tls(r));
            }
            Err(e) => return Err(e),
        }
    };
    let (rd, mut wr) = tokio::io::split(io);
    let mut reader = FrameReader::new(rd, FROM_SERVER);
    write_frame(
        &mut wr,
        &Frame::control(Message::Hello {
            versions: SUPPORTED,
            stream,
            software: SOFTWARE.into(),
            token: if config.plaintext {
                config.token.current()
            } else {
                None
            },
            received,
        }),
    )
    .await?;
    wr.flush().await.map_err(IoError::from)?;
    let mut proto = AgentSession::new(SUPPORTED, window);
    let welcome = match read_one(&mut reader, config.connect_timeout).await {
        Err(ChannelError::Tls(r)) if r.needs_enrolment() && identity.is_some() => {
            // TLS 1.3 reports a refused client certificate on the first read.
            warn!(reason = %r, "client certificate refused; will enrol again (the kernel and outbox are kept)");
            attempts.must_enrol = true;
            return Err(ChannelError::Tls(r));
        }
        r => r?,
    };
    let event = proto.on_frame(&welcome)?;
    match (event, welcome.envelope.msg) {
        (
            AgentEvent::Welcome { acked, .. },
            Message::Welcome {
                agent,
                heartbeat_ms,
                ..
            },
        ) => Ok(Connected {
            reader,
            wr,
            proto,
            agent,
            heartbeat: Duration::from_millis(heartbeat_ms.clamp(100, 600_000)),
            acked,
            identity,
            tls,
        }),
        (_, other) => Err(ChannelError::Protocol(SessionError::Unexpected {
            kind: other.kind(),
            state: "awaiting welcome",
        })),
    }
}

/// Opens a data session with the stored credentials (never enrols), says goodbye, and
/// returns the agent name the server gave. For diagnostics and tests.
pub async fn probe(config: &ChannelConfig, stream: &str) -> Result<String, ChannelError> {
    let mut attempts = Attempts::default();
    let mut c = connect(
        config,
        stream.to_owned(),
        nbagent_protocol::SendWindow::default(),
        0,
        &mut attempts,
        false,
    )
    .await?;
    write_frame(
        &mut c.wr,
        &Frame::control(Message::Goodbye {
            reason: "probe".into(),
        }),
    )
    .await?;
    let _ = c.wr.shutdown().await;
    Ok(c.agent)
}

async fn session(
    config: &ChannelConfig,
    shared: &Arc<Shared>,
    commands: &mpsc::Sender<Frame>,
    queries: &mut mpsc::Receiver<Query>,
    status: &watch::Sender<ChannelStatus>,
    attempts: &mut Attempts,
    shutdown: watch::Receiver<bool>,
) -> Result<SessionEnd, ChannelError> {
    let (stream, window) = {
        let ob = shared.outbox();
        (ob.stream_id().to_owned(), ob.window())
    };
    let log = CommandLog::load(config.command_log.clone())?;
    let mut c = connect(config, stream, window, log.stored(), attempts, true).await?;
    shared.on_welcome(c.acked)?;
    info!(agent = %c.agent, tls = c.tls, acked = c.acked, pending = shared.outbox().pending_count(), "session established");
    let _ = status.send(ChannelStatus::Connected {
        agent: c.agent.clone(),
        tls: c.tls,
    });
    if let Some(id) = &c.identity {
        maybe_renew(id, &mut c.wr).await?;
    }
    pump(
        config,
        shared,
        commands,
        queries,
        c.reader,
        c.wr,
        c.proto,
        c.heartbeat,
        c.acked,
        log,
        shutdown,
    )
    .await
}

fn data_trust(config: &ChannelConfig, id: &Identity) -> ServerTrust {
    match &config.trust {
        Some(ServerTrust::CaFile(f)) => ServerTrust::CaFile(f.clone()),
        _ => ServerTrust::CaPem(id.ca_pem().to_owned()),
    }
}

async fn maybe_renew<W: AsyncWrite + Unpin>(id: &Identity, wr: &mut W) -> Result<(), ChannelError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if id.needs_renewal(now) {
        let csr_pem = id.renewal_csr()?;
        info!(
            not_after = id.not_after(),
            "client certificate is past two thirds of its life; renewing"
        );
        write_frame(wr, &Frame::control(Message::RenewCertificate { csr_pem })).await?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn pump<R, W>(
    config: &ChannelConfig,
    shared: &Arc<Shared>,
    commands: &mpsc::Sender<Frame>,
    queries: &mut mpsc::Receiver<Query>,
    mut reader: FrameReader<R>,
    mut wr: W,
    mut proto: AgentSession,
    heartbeat: Duration,
    acked: u64,
    mut log: CommandLog,
    mut shutdown: watch::Receiver<bool>,
) -> Result<SessionEnd, ChannelError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut sent = acked;
    let mut in_flight: std::collections::VecDeque<(u64, usize)> = Default::default();
    let mut in_flight_bytes: usize = 0;
    let mut last_tx = tokio::time::Instant::now();
    let mut last_rx = tokio::time::Instant::now();
    let mut frames = Vec::new();
    // Queries sent in this session, by request id; dropped (the askers see the
    // connection drop) when the session ends.
    let mut asked: std::collections::HashMap<u64, oneshot::Sender<Frame>> = Default::default();
    let mut queries_open = true;
    loop {
        // Send what the window allows.
        let room = config.window_bytes.saturating_sub(in_flight_bytes);
        if room > 0 {
            let batch = shared.outbox().frames_after(sent, room.min(4 << 20))?;
            if !batch.is_empty() {
                for (seq, bytes) in &batch {
                    wr.write_all(bytes).await.map_err(IoError::from)?;
                    in_flight.push_back((*seq, bytes.len()));
                    in_flight_bytes += bytes.len();
                    sent = *seq;
                }
                proto.note_sent(sent);
                wr.flush().await.map_err(IoError::from)?;
                last_tx = tokio::time::Instant::now();
                continue;
            }
        }
        let appended = shared.appended.notified();
        frames.clear();
        tokio::select! {
            _ = appended, if room > 0 => continue,
            q = queries.recv(), if queries_open => {
                match q {
                    Some(q) if !q.reply.is_closed() => {
                        write_frame(&mut wr, &Frame::control(q.msg)).await?;
                        wr.flush().await.map_err(IoError::from)?;
                        last_tx = tokio::time::Instant::now();
                        asked.retain(|_, r| !r.is_closed());
                        asked.insert(q.request, q.reply);
                    }
                    Some(_) => debug!("query abandoned before it was sent"),
                    None => queries_open = false,
                }
                continue;
            }
            r = reader.read_batch(&mut frames, 1024) => {
                if !r? {
                    return Ok(SessionEnd::Closed);
                }
                last_rx = tokio::time::Instant::now();
            }
            _ = tokio::time::sleep_until(last_tx + heartbeat) => {
                write_frame(&mut wr, &Frame::control(Message::Heartbeat { sent_ms: now_ms() })).await?;
                wr.flush().await.map_err(IoError::from)?;
                last_tx = tokio::time::Instant::now();
                continue;
            }
            _ = tokio::time::sleep_until(last_rx + heartbeat * 3) => {
                return Err(ChannelError::Timeout(heartbeat * 3));
            }
            _ = shutdown.changed() => {
                let _ = write_frame(&mut wr, &Frame::control(Message::Goodbye { reason: "agent shutting down".into() })).await;
                let _ = wr.flush().await;
                let _ = wr.shutdown().await;
                return Ok(SessionEnd::Shutdown);
            }
        }
        for raw in frames.drain(..) {
            let frame = raw.parse().map_err(IoError::from)?;
            match proto.on_frame(&frame) {
                Ok(AgentEvent::Acked { upto, .. }) => {
                    shared.ack(upto)?;
                    while in_flight.front().is_some_and(|(s, _)| *s <= upto) {
                        if let Some((_, len)) = in_flight.pop_front() {
                            in_flight_bytes -= len;
                        }
                    }
                }
                Ok(AgentEvent::Goodbye) => return Ok(SessionEnd::Closed),
                Ok(AgentEvent::Message) => match &frame.envelope.msg {
                    Message::Heartbeat { .. } => {}
                    Message::CertificateRenewed {
                        certificate_pem,
                        not_after,
                    } => {
                        Identity::complete_renewal(&config.identity_dir, certificate_pem)?;
                        info!(not_after, "client certificate renewed");
                    }
                    _ => match frame.envelope.seq {
                        // A command: processed at most once, across agent restarts.
                        Some(seq) => match log.check(seq).map_err(SessionError::from)? {
                            Receipt::Duplicate => {
                                debug!(seq, "command already processed; acknowledging again");
                                ack_commands(&mut wr, log.stored()).await?;
                            }
                            Receipt::New => {
                                log.commit(seq)?;
                                if commands.send(frame).await.is_err() {
                                    warn!(seq, "no command consumer; command dropped");
                                }
                                ack_commands(&mut wr, seq).await?;
                            }
                        },
                        None if answer_to(&frame.envelope.msg)
                            .is_some_and(|r| asked.contains_key(&r)) =>
                        {
                            if let Some(reply) =
                                answer_to(&frame.envelope.msg).and_then(|r| asked.remove(&r))
                            {
                                let _ = reply.send(frame);
                            }
                        }
                        None => {
                            if commands.send(frame).await.is_err() {
                                debug!("no consumer for a server answer; dropped");
                            }
                        }
                    },
                },
                Ok(AgentEvent::Welcome { .. } | AgentEvent::Enrolled) => {}
                Err(SessionError::Peer { code, message }) if !is_fatal(&frame) => {
                    warn!(%code, %message, "server reported an error");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

async fn ack_commands<W: AsyncWrite + Unpin>(wr: &mut W, upto: u64) -> Result<(), ChannelError> {
    write_frame(wr, &Frame::control(Message::Ack { upto })).await?;
    wr.flush().await.map_err(IoError::from)?;
    Ok(())
}

/// The highest server command this agent has processed, kept in a small file so a
/// restarted agent neither runs a command twice nor skips one.
#[derive(Debug)]
pub struct CommandLog {
    path: PathBuf,
    log: ReceiveLog,
}

impl CommandLog {
    /// Loads the log from `path` (0 if the file does not exist yet).
    pub fn load(path: PathBuf) -> Result<Self, ChannelError> {
        let stored = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse::<u64>().map_err(|_| {
                ChannelError::Config(format!(
                    "{} does not hold a command number; remove it only if the server's \
                     command queue was reset too",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => {
                return Err(ChannelError::State { path, source: e });
            }
        };
        Ok(Self {
            path,
            log: ReceiveLog::resume(stored),
        })
    }

    /// Highest command processed.
    pub fn stored(&self) -> u64 {
        self.log.stored()
    }

    fn check(&self, seq: u64) -> Result<Receipt, nbagent_protocol::SeqError> {
        self.log.check(seq)
    }

    /// Durably records `seq` as processed (before the command runs: at most once).
    fn commit(&mut self, seq: u64) -> Result<(), ChannelError> {
        use std::io::Write;
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "{seq}")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|source| ChannelError::State {
            path: self.path.clone(),
            source,
        })?;
        self.log.commit(seq);
        Ok(())
    }
}

fn is_fatal(frame: &Frame) -> bool {
    matches!(frame.envelope.msg, Message::Error { fatal: true, .. })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps_with_jitter() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        for attempt in 0..40 {
            let d = b.delay(attempt);
            let full = (Duration::from_millis(100) * 2u32.saturating_pow(attempt.min(20)))
                .min(Duration::from_secs(5));
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} vs {full:?}"
            );
        }
    }

    #[test]
    fn host_parsing() {
        assert_eq!(host_of("127.0.0.1:7443"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7443"), "::1");
        assert_eq!(host_of("nb.example:1"), "nb.example");
    }
}
