//! The agent's Jupyter client: ZeroMQ sockets to one kernel, the handshake, running a
//! cell and collecting its outputs in order, interrupt and shutdown requests on the
//! control channel, and the heartbeat.
//!
//! Built on `jupyter-zmq-client` (sockets, signatures) and `jupyter-protocol` (request
//! types). Replies and iopub messages are decoded (module `wire`) from the raw JSON, so a
//! MIME bundle reaches the agent exactly as the kernel sent it and a malformed message
//! is an error value, never a panic.
//!
//! # A fresh client every time
//!
//! [`KernelClient::connect`] is what the agent calls when a kernel has just been
//! started, after a restart, after a CRIU restore, and when a new agent adopts a
//! kernel a crashed agent left running. It must build a **new** client each time: a
//! kept client does not recover from a restore or restart (zeromq 0.7 reconnects SUB
//! sockets only, DEALER sends then fail with "not connected to peers", and the first
//! send to a starting kernel can vanish silently). Drop the old [`KernelClient`] (and
//! its [`ControlHandle`] clones) first, then connect: `connect` re-sends
//! `kernel_info_request` every 200 ms until a reply arrives, then waits until iopub
//! delivers a message (the kernel's `iopub_welcome`, or, for a second subscriber that
//! gets no welcome, the status messages of another `kernel_info_request`), so no output
//! of the next cell can be lost to a subscription that is not yet in place.
//!
//! # Completion and cancellation
//!
//! [`KernelClient::execute`] returns when both the shell `execute_reply` and the iopub
//! `status: idle` of that request have arrived; every output precedes that idle on
//! iopub, so nothing of the cell arrives later. The agent may drop an `execute` future
//! (for example in a `tokio::select!` against the kernel's death): the client is then
//! in an unknown state (the reply and outputs of that request are still queued) and
//! must be discarded; connect a fresh one before the next cell.

mod wire;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jupyter_protocol::{
    ExecuteRequest, Header, InputReply, InterruptRequest, JupyterMessage, JupyterMessageContent,
    KernelInfoRequest, ReplyStatus, ShutdownRequest,
};
use jupyter_zmq_client::{
    ClientControlConnection, ClientHeartbeatConnection, ClientIoPubConnection,
    ClientShellConnection, ClientStdinConnection, Connection, RawMessage, RuntimeError,
    create_client_control_connection, create_client_heartbeat_connection,
    create_client_iopub_connection, create_client_shell_connection_with_identity,
    create_client_stdin_connection_with_identity, peer_identity_for_session,
};
use nbagent_protocol::{CellStatus, KernelState};
use tokio::sync::{Mutex, mpsc};
use tokio::time::{Instant, timeout_at};
use tracing::{debug, info, instrument, warn};
use zeromq::SocketRecv;

pub use jupyter_zmq_client::ConnectionInfo;
pub use wire::{DecodeError, ExecEvent, KernelInfo};

use wire::Incoming;

/// What the agent says when a kernel asks for input: notebooks run unattended, there is
/// nobody to type an answer.
pub const STDIN_NOT_SUPPORTED: &str =
    "stdin is not supported: input() cannot be answered in this notebook";

/// How often `connect` re-sends a `kernel_info_request` that got no answer.
pub const RESEND_EVERY: Duration = Duration::from_millis(200);

/// How long a [`ControlHandle`] request waits for its reply.
pub const CONTROL_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The `username` the client puts in message headers.
const USERNAME: &str = "nbagent";

/// Errors of the kernel client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The kernel address is not an IP address.
    #[error("invalid kernel address {ip:?}")]
    Address {
        /// What was given.
        ip: String,
        /// The parser's error.
        #[source]
        source: std::net::AddrParseError,
    },
    /// No free port could be reserved.
    #[error("cannot reserve a port on {ip}")]
    Ports {
        /// The address.
        ip: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection file could not be serialised.
    #[error("cannot serialise the connection file")]
    ConnectionFile(#[source] serde_json::Error),
    /// A socket could not be created or connected.
    #[error("cannot connect the {channel} channel")]
    Connect {
        /// `shell`, `iopub`, `control` or `heartbeat`.
        channel: &'static str,
        /// The cause.
        #[source]
        source: RuntimeError,
    },
    /// The kernel did not answer in time.
    #[error("timed out waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
    },
    /// A message could not be sent.
    #[error("cannot send {msg_type} on the {channel} channel")]
    Send {
        /// The channel.
        channel: &'static str,
        /// The request.
        msg_type: &'static str,
        /// The cause.
        #[source]
        source: RuntimeError,
    },
    /// A socket failed while receiving.
    #[error("cannot receive on the {channel} channel")]
    Recv {
        /// The channel.
        channel: &'static str,
        /// The cause.
        #[source]
        source: zeromq::ZmqError,
    },
    /// A reply to one of our requests could not be decoded.
    #[error("malformed {msg_type} from the kernel")]
    Protocol {
        /// The reply's type.
        msg_type: String,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// The kernel answered a request with an error status.
    #[error("the kernel refused {request}: {ename}: {evalue}")]
    Refused {
        /// The request.
        request: &'static str,
        /// Exception class, if given.
        ename: String,
        /// Exception value, if given.
        evalue: String,
    },
}

/// Connection information for a new kernel: TCP on `ip`, five free ports, a fresh
/// random HMAC-SHA256 key.
///
/// The ports are found by binding port 0 on `ip` (all five at once, so they differ)
/// and released before returning: the kernel must bind them soon after. Write the
/// file with [`connection_file_json`].
pub fn new_connection_info(ip: &str, kernel_name: &str) -> Result<ConnectionInfo, ClientError> {
    let addr: std::net::IpAddr = ip.parse().map_err(|source| ClientError::Address {
        ip: ip.to_owned(),
        source,
    })?;
    let listeners = (0..5)
        .map(|_| std::net::TcpListener::bind((addr, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| ClientError::Ports {
            ip: ip.to_owned(),
            source,
        })?;
    let mut ports = [0u16; 5];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener
            .local_addr()
            .map_err(|source| ClientError::Ports {
                ip: ip.to_owned(),
                source,
            })?
            .port();
    }
    drop(listeners);
    let [shell_port, iopub_port, stdin_port, control_port, hb_port] = ports;
    Ok(ConnectionInfo {
        ip: ip.to_owned(),
        transport: jupyter_protocol::connection_info::Transport::TCP,
        shell_port,
        iopub_port,
        stdin_port,
        control_port,
        hb_port,
        key: hex::encode(rand::random::<[u8; 32]>()),
        signature_scheme: "hmac-sha256".to_owned(),
        kernel_name: Some(kernel_name.to_owned()),
    })
}

/// The standard Jupyter connection-file JSON of `info`. It holds the HMAC key: the
/// caller writes it with mode 0600 and the kernel user as owner.
pub fn connection_file_json(info: &ConnectionInfo) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec_pretty(info).map_err(ClientError::ConnectionFile)
}

/// How one execution ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ExecOutcome {
    /// `msg_id` of the `execute_request`.
    pub msg_id: String,
    /// The reply's status. An interrupted cell is `Error` with `ename`
    /// `KeyboardInterrupt` (that is what ipykernel reports); `Aborted` is a request the
    /// kernel skipped because an earlier one failed.
    pub status: CellStatus,
    /// The kernel's execution counter, if it assigned one.
    pub execution_count: Option<u64>,
    /// Exception class, for errors.
    pub ename: Option<String>,
    /// Exception value, for errors.
    pub evalue: Option<String>,
    /// When the request was sent.
    pub started: SystemTime,
    /// When both the reply and the final idle had arrived.
    pub finished: SystemTime,
    /// `finished - started`, measured on a monotonic clock.
    pub duration: Duration,
}

/// Where `execute` delivers its events.
enum Sink<'a> {
    Callback(&'a mut (dyn FnMut(ExecEvent) + Send)),
    Channel(&'a mpsc::Sender<ExecEvent>),
}

impl Sink<'_> {
    async fn emit(&mut self, event: ExecEvent) {
        match self {
            Sink::Callback(f) => f(event),
            Sink::Channel(tx) => {
                if tx.send(event).await.is_err() {
                    debug!("execution event receiver gone; event dropped");
                }
            }
        }
    }
}

/// A connected client of one kernel. See the [module documentation](self) for why it
/// must be rebuilt after every restart, restore or cancelled execution.
pub struct KernelClient {
    info: ConnectionInfo,
    session: String,
    kernel: KernelInfo,
    iopub: ClientIoPubConnection,
    shell: ClientShellConnection,
    /// Only to answer an `input_request` a kernel sends although `allow_stdin` is false.
    stdin: ClientStdinConnection,
    heartbeat: Option<ClientHeartbeatConnection>,
    control: ControlHandle,
}

impl std::fmt::Debug for KernelClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelClient")
            .field("ip", &self.info.ip)
            .field("shell_port", &self.info.shell_port)
            .field("session", &self.session)
            .field("kernel", &self.kernel)
            .finish_non_exhaustive()
    }
}

/// Waits for `fut` until `deadline`.
async fn within<F: Future>(
    deadline: Instant,
    what: &'static str,
    fut: F,
) -> Result<F::Output, ClientError> {
    timeout_at(deadline, fut)
        .await
        .map_err(|_| ClientError::Timeout { what })
}

fn message(content: impl Into<JupyterMessageContent>) -> JupyterMessage {
    let mut msg = JupyterMessage::new(content, None);
    USERNAME.clone_into(&mut msg.header.username);
    msg
}

/// Reads one message from a socket and checks its signature. `Ok(Err(_))` is a message
/// that arrived but could not be decoded: the socket is still good.
async fn read<S: SocketRecv>(
    conn: &mut Connection<S>,
    channel: &'static str,
) -> Result<Result<Incoming, DecodeError>, ClientError> {
    let multipart = conn
        .socket
        .recv()
        .await
        .map_err(|source| ClientError::Recv { channel, source })?;
    Ok(RawMessage::from_multipart(multipart, &conn.mac)
        .map_err(DecodeError::Frame)
        .and_then(|raw| wire::decode(&raw.jparts)))
}

/// Sends `make()` on a DEALER connection every [`RESEND_EVERY`] until a `reply_type`
/// answering any of the requests sent arrives, or `deadline` passes. Failed sends
/// (no peer yet) and replies to other requests are skipped.
async fn request_with_retry(
    conn: &mut Connection<zeromq::DealerSocket>,
    channel: &'static str,
    make: impl Fn() -> JupyterMessage,
    reply_type: &'static str,
    deadline: Instant,
) -> Result<Incoming, ClientError> {
    let mut sent: Vec<String> = Vec::new();
    for attempt in 0u32.. {
        if Instant::now() >= deadline {
            break;
        }
        let next = (Instant::now() + RESEND_EVERY).min(deadline);
        let msg = make();
        let id = msg.header.msg_id.clone();
        match timeout_at(next, conn.send(msg)).await {
            Ok(Ok(())) => sent.push(id),
            Ok(Err(e)) => debug!(channel, attempt, error = %e, "request not sent; retrying"),
            Err(_) => debug!(channel, attempt, "send did not complete; retrying"),
        }
        while Instant::now() < next {
            match timeout_at(next, read(conn, channel)).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    debug!(channel, error = %e, "receive failed; retrying");
                    tokio::time::sleep_until(next).await;
                    break;
                }
                Ok(Ok(Err(e))) => warn!(channel, error = %e, "undecodable message skipped"),
                Ok(Ok(Ok(m))) => {
                    if m.msg_type == reply_type
                        && m.parent_id.as_ref().is_some_and(|p| sent.contains(p))
                    {
                        debug!(channel, attempt, "reply received");
                        return Ok(m);
                    }
                    debug!(channel, msg_type = %m.msg_type, "message for another request skipped");
                }
            }
        }
    }
    Err(ClientError::Timeout { what: reply_type })
}

/// How [`KernelClient::connect_with`] checks that the kernel answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handshake {
    /// kernel_info on shell (an idle or starting kernel), then on control.
    Shell,
    /// kernel_info on control only (a kernel that may be busy).
    Control,
}

/// How long an adopting client waits for the iopub welcome of a busy kernel.
const BUSY_WELCOME_WAIT: Duration = Duration::from_secs(2);

/// Waits until iopub delivers a message: the welcome, or, for a second subscriber that
/// gets none, the status messages of another kernel_info_request sent on shell.
async fn wait_iopub(
    iopub: &mut ClientIoPubConnection,
    shell: &mut ClientShellConnection,
    deadline: Instant,
) -> Result<bool, ClientError> {
    let kernel_info = || message(KernelInfoRequest {});
    loop {
        let next = (Instant::now() + RESEND_EVERY).min(deadline);
        match timeout_at(next, read(iopub, "iopub")).await {
            Ok(Ok(Ok(m))) => return Ok(m.msg_type == "iopub_welcome"),
            Ok(Ok(Err(e))) => {
                warn!(channel = "iopub", error = %e, "undecodable message skipped")
            }
            Ok(Err(e)) => {
                debug!(error = %e, "iopub receive failed; retrying");
                tokio::time::sleep_until(next).await;
            }
            Err(_) => {
                if Instant::now() >= deadline {
                    return Err(ClientError::Timeout {
                        what: "an iopub message",
                    });
                }
                if let Err(e) = shell.send(kernel_info()).await {
                    debug!(error = %e, "kernel_info_request for iopub not sent");
                }
            }
        }
    }
}

fn kernel_info_of(m: &Incoming) -> Result<KernelInfo, ClientError> {
    let protocol = |source| ClientError::Protocol {
        msg_type: m.msg_type.clone(),
        source,
    };
    let status = wire::reply_status(&m.content).map_err(protocol)?;
    if status.status != CellStatus::Ok {
        return Err(ClientError::Refused {
            request: "kernel_info_request",
            ename: status.ename.unwrap_or_default(),
            evalue: status.evalue.unwrap_or_default(),
        });
    }
    wire::kernel_info(&m.content).map_err(protocol)
}

impl KernelClient {
    /// Connects a new client to the kernel of `info` and completes the handshake within
    /// `timeout`: opens iopub (subscribed to everything), shell (with this session's
    /// identity), control and heartbeat; gets `kernel_info` on shell (re-sent every
    /// [`RESEND_EVERY`], which covers a kernel that is still starting); waits until
    /// iopub delivers a message; and checks that control answers.
    ///
    /// Call it for every new kernel, restart, restore and adoption, with the previous
    /// client dropped (see the [module documentation](self)).
    #[instrument(skip_all, fields(kernel = %format!("{}:{}", info.ip, info.shell_port)))]
    pub async fn connect(info: &ConnectionInfo, timeout: Duration) -> Result<Self, ClientError> {
        let session = uuid::Uuid::new_v4().to_string();
        Self::connect_with(info, &session, timeout, Handshake::Shell).await
    }

    /// Connects to a kernel that may be busy running a cell sent by a previous agent
    /// (adoption after an agent crash): the handshake uses the control channel only,
    /// which ipykernel answers while shell is busy, and iopub is given a short while to
    /// deliver its welcome. `session` is the previous client's session id: the shell
    /// socket reuses its identity, so the `execute_reply` of the running cell reaches
    /// this client. Follow with [`resume_to`](Self::resume_to) to collect the rest of
    /// that cell.
    #[instrument(skip_all, fields(kernel = %format!("{}:{}", info.ip, info.shell_port)))]
    pub async fn connect_busy(
        info: &ConnectionInfo,
        session: &str,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let session = if session.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            session.to_owned()
        };
        Self::connect_with(info, &session, timeout, Handshake::Control).await
    }

    async fn connect_with(
        info: &ConnectionInfo,
        session: &str,
        timeout: Duration,
        handshake: Handshake,
    ) -> Result<Self, ClientError> {
        let begun = Instant::now();
        let deadline = begun + timeout;
        let session = session.to_owned();
        let connect = |channel| move |source| ClientError::Connect { channel, source };

        let mut iopub = within(
            deadline,
            "the iopub connection",
            create_client_iopub_connection(info, "", &session),
        )
        .await?
        .map_err(connect("iopub"))?;
        let identity = peer_identity_for_session(&session).map_err(connect("shell"))?;
        let mut shell = within(
            deadline,
            "the shell connection",
            create_client_shell_connection_with_identity(info, &session, identity.clone()),
        )
        .await?
        .map_err(connect("shell"))?;
        // The kernel routes an input_request to the shell socket's identity.
        let stdin = within(
            deadline,
            "the stdin connection",
            create_client_stdin_connection_with_identity(info, &session, identity),
        )
        .await?
        .map_err(connect("stdin"))?;
        let mut control = within(
            deadline,
            "the control connection",
            create_client_control_connection(info, &session),
        )
        .await?
        .map_err(connect("control"))?;
        let heartbeat = within(
            deadline,
            "the heartbeat connection",
            create_client_heartbeat_connection(info),
        )
        .await?
        .map_err(connect("heartbeat"))?;

        let kernel_info = || message(KernelInfoRequest {});
        let (kernel, welcome) = match handshake {
            Handshake::Shell => {
                let reply = request_with_retry(
                    &mut shell,
                    "shell",
                    kernel_info,
                    "kernel_info_reply",
                    deadline,
                )
                .await?;
                let kernel = kernel_info_of(&reply)?;
                let welcome = wait_iopub(&mut iopub, &mut shell, deadline).await?;
                let reply = request_with_retry(
                    &mut control,
                    "control",
                    kernel_info,
                    "kernel_info_reply",
                    deadline,
                )
                .await?;
                kernel_info_of(&reply)?;
                (kernel, welcome)
            }
            Handshake::Control => {
                let reply = request_with_retry(
                    &mut control,
                    "control",
                    kernel_info,
                    "kernel_info_reply",
                    deadline,
                )
                .await?;
                let kernel = kernel_info_of(&reply)?;
                // A busy kernel publishes nothing but the welcome; do not wait long.
                let short = (Instant::now() + BUSY_WELCOME_WAIT).min(deadline);
                let welcome = loop {
                    match timeout_at(short, read(&mut iopub, "iopub")).await {
                        Ok(Ok(Ok(m))) => break m.msg_type == "iopub_welcome",
                        Ok(Ok(Err(e))) => {
                            warn!(channel = "iopub", error = %e, "undecodable message skipped")
                        }
                        Ok(Err(e)) => return Err(e),
                        Err(_) => {
                            warn!("no iopub welcome from a busy kernel; continuing");
                            break false;
                        }
                    }
                };
                (kernel, welcome)
            }
        };

        info!(
            protocol = %kernel.protocol_version,
            implementation = %kernel.implementation,
            language = %kernel.language,
            welcome,
            elapsed_ms = begun.elapsed().as_millis() as u64,
            "kernel client connected"
        );
        Ok(Self {
            info: info.clone(),
            session,
            kernel,
            iopub,
            shell,
            stdin,
            heartbeat: Some(heartbeat),
            control: ControlHandle {
                conn: Arc::new(Mutex::new(control)),
            },
        })
    }

    /// What the kernel said about itself during the handshake.
    pub fn kernel_info(&self) -> &KernelInfo {
        &self.kernel
    }

    /// This client's Jupyter session id.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// A handle on the control channel, usable while [`execute`](Self::execute) holds
    /// the client (to interrupt it).
    pub fn control(&self) -> ControlHandle {
        self.control.clone()
    }

    /// Runs `code` (`silent: false`, `store_history: true`, `allow_stdin: false`, so
    /// `input()` raises `StdinNotImplementedError` in ipykernel; a kernel that sends an
    /// `input_request` anyway is answered with end of file, see
    /// [`STDIN_NOT_SUPPORTED`]) and passes every
    /// iopub event of this request to `sink`, in the order the kernel published them.
    ///
    /// Returns when both the `execute_reply` and the final `status: idle` have arrived.
    /// Messages of other requests are skipped; unknown message types are skipped (debug
    /// log); an undecodable iopub message of this request becomes
    /// [`ExecEvent::Malformed`]. If this future is dropped before it returns, discard
    /// the client.
    pub async fn execute(
        &mut self,
        code: &str,
        sink: &mut (impl FnMut(ExecEvent) + Send),
    ) -> Result<ExecOutcome, ClientError> {
        self.execute_inner(code, None, Sink::Callback(sink)).await
    }

    /// [`execute`](Self::execute), delivering the events to a channel (waiting for room
    /// when it is full). Events are dropped if the receiver is gone; the execution
    /// still runs to its end.
    pub async fn execute_to(
        &mut self,
        code: &str,
        events: &mpsc::Sender<ExecEvent>,
    ) -> Result<ExecOutcome, ClientError> {
        self.execute_inner(code, None, Sink::Channel(events)).await
    }

    /// [`execute_to`](Self::execute_to) with the `msg_id` of the execute_request
    /// chosen by the caller, so that it can be recorded before the request is sent (an
    /// agent that dies mid-cell leaves it for its successor, which resumes with
    /// [`resume_to`](Self::resume_to)).
    pub async fn execute_to_with_id(
        &mut self,
        code: &str,
        msg_id: &str,
        events: &mpsc::Sender<ExecEvent>,
    ) -> Result<ExecOutcome, ClientError> {
        self.execute_inner(code, Some(msg_id), Sink::Channel(events))
            .await
    }

    /// Collects the rest of a request sent by a previous client (see
    /// [`connect_busy`](Self::connect_busy)): its iopub events from now on, until its
    /// `status: idle`. The `execute_reply` is used if it arrives (it does when the
    /// shell identity was reused) but not required; without it the outcome's status
    /// is derived from the outputs (an error output means `Error`) and the execution
    /// count is unknown.
    pub async fn resume_to(
        &mut self,
        msg_id: &str,
        events: &mpsc::Sender<ExecEvent>,
    ) -> Result<ExecOutcome, ClientError> {
        let started = SystemTime::now();
        let begun = Instant::now();
        self.collect(
            msg_id.to_owned(),
            Sink::Channel(events),
            started,
            begun,
            false,
        )
        .await
    }

    #[instrument(skip_all, fields(kernel = %format!("{}:{}", self.info.ip, self.info.shell_port), msg_id))]
    async fn execute_inner(
        &mut self,
        code: &str,
        msg_id: Option<&str>,
        sink: Sink<'_>,
    ) -> Result<ExecOutcome, ClientError> {
        let mut request = message(ExecuteRequest {
            code: code.to_owned(),
            silent: false,
            store_history: true,
            user_expressions: None,
            allow_stdin: false,
            stop_on_error: true,
        });
        if let Some(id) = msg_id {
            id.clone_into(&mut request.header.msg_id);
        }
        let msg_id = request.header.msg_id.clone();
        tracing::Span::current().record("msg_id", msg_id.as_str());
        let started = SystemTime::now();
        let begun = Instant::now();
        self.shell
            .send(request)
            .await
            .map_err(|source| ClientError::Send {
                channel: "shell",
                msg_type: "execute_request",
                source,
            })?;
        self.collect(msg_id, sink, started, begun, true).await
    }

    /// Reads iopub and shell until the request `msg_id` is idle on iopub and (when
    /// `need_reply`) its execute_reply has arrived.
    async fn collect(
        &mut self,
        msg_id: String,
        mut sink: Sink<'_>,
        started: SystemTime,
        begun: Instant,
        need_reply: bool,
    ) -> Result<ExecOutcome, ClientError> {
        let mut reply: Option<wire::ExecuteReply> = None;
        let mut idle = false;
        let mut saw_error: Option<(String, String)> = None;
        let mut reply_wait: Option<Instant> = None;
        let reply = loop {
            if idle && reply.is_some() {
                break reply.take();
            }
            if idle && !need_reply {
                // A reply addressed to the previous client's identity may still come;
                // give it a moment, then go on without it.
                let until = *reply_wait.get_or_insert_with(|| Instant::now() + RESEND_EVERY);
                if Instant::now() >= until {
                    break None;
                }
            }
            let pause = async {
                match reply_wait {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = pause => {}
                m = read(&mut self.iopub, "iopub") => match m? {
                    Err(e) => warn!(channel = "iopub", error = %e, "undecodable message skipped"),
                    Ok(m) if m.parent_id.as_deref() != Some(msg_id.as_str()) => {
                        debug!(msg_type = %m.msg_type, "iopub message of another request skipped");
                    }
                    Ok(m) => match wire::iopub_event(&m.msg_type, &m.content) {
                        Ok(Some(event)) => {
                            if event == ExecEvent::Status(KernelState::Idle) {
                                idle = true;
                            }
                            if let ExecEvent::Output(nbagent_protocol::OutputContent::Error { ename, evalue, .. }) = &event {
                                saw_error = Some((ename.clone(), evalue.clone()));
                            }
                            sink.emit(event).await;
                        }
                        Ok(None) => debug!(msg_type = %m.msg_type, "iopub message not reported"),
                        Err(e) => {
                            warn!(msg_type = %m.msg_type, error = %e, "malformed iopub message skipped");
                            sink.emit(ExecEvent::Malformed {
                                msg_type: m.msg_type,
                                reason: e.to_string(),
                            })
                            .await;
                        }
                    },
                },
                m = read(&mut self.stdin, "stdin") => match m? {
                    Err(e) => warn!(channel = "stdin", error = %e, "undecodable message skipped"),
                    Ok(m) if m.msg_type == "input_request" => {
                        let prompt = m.content.get("prompt").and_then(serde_json::Value::as_str).unwrap_or_default();
                        warn!(prompt, "the kernel asked for input; answering end of file");
                        self.answer_input(&m).await?;
                        sink.emit(ExecEvent::Output(nbagent_protocol::OutputContent::Stream {
                            name: "stderr".into(),
                            text: format!("{STDIN_NOT_SUPPORTED} (prompt {prompt:?}); the kernel got end of file\n"),
                        }))
                        .await;
                    }
                    Ok(m) => debug!(msg_type = %m.msg_type, "stdin message skipped"),
                },
                m = read(&mut self.shell, "shell"), if reply.is_none() => match m? {
                    Err(e) => warn!(channel = "shell", error = %e, "undecodable message skipped"),
                    Ok(m) if m.answers("execute_reply", &msg_id) => {
                        reply = Some(wire::execute_reply(&m.content).map_err(|source| {
                            ClientError::Protocol { msg_type: m.msg_type.clone(), source }
                        })?);
                    }
                    Ok(m) => debug!(msg_type = %m.msg_type, "shell message of another request skipped"),
                },
            }
        };
        let finished = SystemTime::now();
        let duration = begun.elapsed();
        let (status, execution_count, ename, evalue) = match reply {
            Some(r) => (
                r.status.status,
                r.execution_count,
                r.status.ename,
                r.status.evalue,
            ),
            None => match saw_error {
                Some((n, v)) => (CellStatus::Error, None, Some(n), Some(v)),
                None => (CellStatus::Ok, None, None, None),
            },
        };
        debug!(
            ?status,
            duration_us = duration.as_micros() as u64,
            "executed"
        );
        Ok(ExecOutcome {
            msg_id,
            status,
            execution_count,
            ename,
            evalue,
            started,
            finished,
            duration,
        })
    }

    /// Answers an `input_request` with end of file (`"\u{4}"`, what Jupyter consoles
    /// send for Ctrl-D: ipykernel raises `EOFError`), so the kernel does not wait for
    /// input forever.
    async fn answer_input(&mut self, request: &Incoming) -> Result<(), ClientError> {
        let mut reply = message(InputReply {
            value: "\u{4}".into(),
            status: ReplyStatus::Ok,
            error: None,
        });
        reply.header.session.clone_from(&self.session);
        reply.parent_header = serde_json::from_value::<Header>(request.header.clone()).ok();
        self.stdin
            .send(reply)
            .await
            .map_err(|source| ClientError::Send {
                channel: "stdin",
                msg_type: "input_reply",
                source,
            })
    }

    /// Pings the heartbeat channel: `true` if the kernel echoed within `timeout`.
    ///
    /// After a miss the socket is rebuilt on the next call (a REQ socket that lost its
    /// reply cannot send again).
    pub async fn heartbeat(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let ping = async {
            let hb = match &mut self.heartbeat {
                Some(hb) => hb,
                None => self
                    .heartbeat
                    .insert(create_client_heartbeat_connection(&self.info).await?),
            };
            hb.single_heartbeat().await
        };
        match timeout_at(deadline, ping).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                debug!(error = %e, "heartbeat failed");
                self.heartbeat = None;
                false
            }
            Err(_) => {
                debug!("heartbeat timed out");
                self.heartbeat = None;
                false
            }
        }
    }
}

/// A cloneable handle on a client's control channel, for interrupting and shutting
/// down the kernel while [`KernelClient::execute`] runs. Requests through clones are
/// serialised; each waits up to [`CONTROL_REPLY_TIMEOUT`] for its reply.
#[derive(Clone)]
pub struct ControlHandle {
    conn: Arc<Mutex<ClientControlConnection>>,
}

impl std::fmt::Debug for ControlHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlHandle").finish_non_exhaustive()
    }
}

impl ControlHandle {
    /// Asks the kernel to interrupt the running cell (`interrupt_request`, the
    /// `interrupt_mode: message` way; ipykernel then sends itself SIGINT). Returns once
    /// the kernel has acknowledged; the cell then ends with a `KeyboardInterrupt`
    /// error.
    pub async fn interrupt_request(&self) -> Result<(), ClientError> {
        self.request(
            message(InterruptRequest {}),
            "interrupt_request",
            "interrupt_reply",
        )
        .await
    }

    /// Asks the kernel to shut down. `restart` only tells the kernel that a new one
    /// will follow; the process owner starts it (ipykernel exits either way).
    pub async fn shutdown_request(&self, restart: bool) -> Result<(), ClientError> {
        self.request(
            message(ShutdownRequest { restart }),
            "shutdown_request",
            "shutdown_reply",
        )
        .await
    }

    async fn request(
        &self,
        msg: JupyterMessage,
        request: &'static str,
        reply_type: &'static str,
    ) -> Result<(), ClientError> {
        let deadline = Instant::now() + CONTROL_REPLY_TIMEOUT;
        let mut conn = within(deadline, reply_type, self.conn.lock()).await?;
        let id = msg.header.msg_id.clone();
        within(deadline, reply_type, conn.send(msg))
            .await?
            .map_err(|source| ClientError::Send {
                channel: "control",
                msg_type: request,
                source,
            })?;
        loop {
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout { what: reply_type });
            }
            match within(deadline, reply_type, read(&mut *conn, "control")).await?? {
                Err(e) => warn!(channel = "control", error = %e, "undecodable message skipped"),
                Ok(m) if m.answers(reply_type, &id) => {
                    let status =
                        wire::reply_status(&m.content).map_err(|source| ClientError::Protocol {
                            msg_type: m.msg_type.clone(),
                            source,
                        })?;
                    if status.status != CellStatus::Ok {
                        return Err(ClientError::Refused {
                            request,
                            ename: status.ename.unwrap_or_default(),
                            evalue: status.evalue.unwrap_or_default(),
                        });
                    }
                    info!(request, "kernel acknowledged");
                    return Ok(());
                }
                Ok(m) => {
                    debug!(msg_type = %m.msg_type, "control message of another request skipped")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_info_is_a_standard_connection_file() {
        let info = new_connection_info("127.0.0.1", "python3").expect("ports");
        let ports = [
            info.shell_port,
            info.iopub_port,
            info.stdin_port,
            info.control_port,
            info.hb_port,
        ];
        let mut unique = ports.to_vec();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 5);
        assert!(ports.iter().all(|&p| p != 0));
        assert_eq!(info.key.len(), 64);
        let other = new_connection_info("127.0.0.1", "python3").expect("ports");
        assert_ne!(info.key, other.key);
        let json: serde_json::Value =
            serde_json::from_slice(&connection_file_json(&info).expect("json")).expect("parse");
        assert_eq!(json["transport"], "tcp");
        assert_eq!(json["signature_scheme"], "hmac-sha256");
        assert_eq!(json["kernel_name"], "python3");
        assert_eq!(json["ip"], "127.0.0.1");
        assert_eq!(json["shell_port"], info.shell_port);
        assert!(matches!(
            new_connection_info("localhost", "python3"),
            Err(ClientError::Address { .. })
        ));
    }
}
