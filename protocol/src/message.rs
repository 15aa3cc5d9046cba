//! The message catalogue.
//!
//! Every frame header is an [`Envelope`]: an optional sequence number and one
//! [`Message`], serialised as JSON with the message's kind in its `"type"` field:
//!
//! ```json
//! {"seq":42,"msg":{"type":"output","cell":"c1","output":{"kind":"stream","name":"stdout","text":"hi\n"}}}
//! ```
//!
//! Messages that carry data the server must keep (outputs, blobs, datasets, checkpoint
//! and kernel events, file uploads and namespace changes) are *sequenced*: the sender numbers them 1, 2, 3...
//! per stream, keeps them until the peer's cumulative [`Message::Ack`] covers them, and
//! resends the unacknowledged ones after a reconnect; the receiver stores each sequence
//! number once. Control messages (handshake, heartbeat, ack, queries) are not sequenced.
//! See `docs/protocol.md` for the full description.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::version::VersionRange;

/// One frame header: the sequence number, if the message is sequenced, and the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Sequence number of a sequenced message (starting at 1 per stream); absent on
    /// control messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The message.
    pub msg: Message,
}

/// Every message of the protocol, in both directions.
///
/// The direction and whether a message is sequenced are given by [`Message::direction`]
/// and [`Message::is_sequenced`]. Unknown fields inside a message are ignored, so a newer
/// peer may add optional fields without a version bump; an unknown `type` is an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Message {
    // ----- handshake -------------------------------------------------------------
    /// Agent -> server, first frame of an enrolment connection: trade a single-use
    /// token and a certificate signing request for a client certificate.
    Enroll {
        /// Protocol versions the agent speaks.
        versions: VersionRange,
        /// The single-use enrolment token.
        token: String,
        /// PKCS#10 certificate signing request, PEM.
        csr_pem: String,
        /// Agent software name and version, for the server's log.
        software: String,
    },
    /// Server -> agent, answer to [`Message::Enroll`].
    Enrolled {
        /// The version the server picked.
        version: u16,
        /// The agent's name as the server knows it (the certificate's common name).
        agent: String,
        /// The signed client certificate, PEM.
        certificate_pem: String,
        /// The server's certificate authority, PEM (to verify the server from now on).
        ca_pem: String,
        /// Expiry of the certificate, Unix seconds.
        not_after: i64,
    },
    /// Agent -> server, first frame of a data session.
    Hello {
        /// Protocol versions the agent speaks.
        versions: VersionRange,
        /// Identifies the agent's outbox stream. Sequence numbers are per stream: a new
        /// stream (a wiped outbox) starts again at 1.
        stream: String,
        /// Agent software name and version.
        software: String,
        /// Plaintext connections only (legacy agents): the agent's token. Ignored and
        /// must be absent over TLS, where the client certificate identifies the agent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// Highest server sequence number this agent has processed (for server-side
        /// resend of commands).
        #[serde(default)]
        received: u64,
    },
    /// Server -> agent, answer to [`Message::Hello`].
    Welcome {
        /// The version the server picked.
        version: u16,
        /// The agent's name as the server knows it.
        agent: String,
        /// Highest sequence number of this stream the server has stored: the agent
        /// resends everything after it.
        acked: u64,
        /// How often each side sends a heartbeat when otherwise idle, milliseconds. A
        /// side that hears nothing for three intervals drops the connection.
        heartbeat_ms: u64,
        /// Largest payload the server accepts in one frame.
        max_payload: u32,
        /// Whether the connection is encrypted and mutually authenticated.
        tls: bool,
    },
    /// Agent -> server over an authenticated session: renew the client certificate
    /// before it expires.
    RenewCertificate {
        /// A fresh CSR, PEM (the agent may keep or rotate its key).
        csr_pem: String,
    },
    /// Server -> agent, answer to [`Message::RenewCertificate`].
    CertificateRenewed {
        /// The new client certificate, PEM.
        certificate_pem: String,
        /// Expiry of the new certificate, Unix seconds.
        not_after: i64,
    },

    // ----- liveness and flow control ---------------------------------------------
    /// Either direction, when idle for the heartbeat interval.
    Heartbeat {
        /// Sender's clock, Unix milliseconds (informational).
        sent_ms: u64,
    },
    /// Either direction: every sequenced message up to and including `upto` is stored
    /// and may be dropped by the sender.
    Ack {
        /// Highest sequence number stored.
        upto: u64,
    },
    /// Either direction: a refusal or failure. When `fatal`, the sender closes the
    /// connection after this frame.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable explanation, including how to fix it where we know.
        message: String,
        /// The connection closes after this frame.
        fatal: bool,
    },
    /// Either direction: orderly end of the session; nothing more will be sent.
    Goodbye {
        /// Why the session ends.
        reason: String,
    },

    // ----- server -> agent commands (sequenced by the server) ----------------------
    /// Execute one cell.
    ExecuteCell {
        /// Identifier of this request, echoed in the outputs it causes.
        request: String,
        /// The notebook cell.
        cell: String,
        /// The code to run.
        code: String,
    },
    /// Reactive mode: bring the kernel to the state after `cells[..from]` and run
    /// `cells[from..]`.
    RunFrom {
        /// Identifier of this request.
        request: String,
        /// The whole notebook, in order.
        cells: Vec<CellSource>,
        /// Index of the first cell to run.
        from: u32,
    },
    /// Interrupt the running cell.
    Interrupt {
        /// Identifier of this request.
        request: String,
    },
    /// Restart the kernel (its state is lost).
    RestartKernel {
        /// Identifier of this request.
        request: String,
    },
    /// Tear down: report the last outputs and dataset caches, stop the kernel,
    /// unmount, flush the outbox, and exit.
    Shutdown {
        /// Why.
        reason: String,
        /// How long the agent may take before it is killed, milliseconds.
        deadline_ms: u64,
    },

    // ----- agent -> server data (sequenced by the agent) --------------------------
    /// What the agent can do in this container, probed at start.
    Capabilities {
        /// One entry per feature.
        features: Vec<Feature>,
    },
    /// Kernel state change.
    KernelStatus {
        /// The new state.
        state: KernelState,
        /// Extra detail (kernel name, restart reason...).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        detail: String,
    },
    /// The kernel process died.
    KernelDied {
        /// Exit code, if it exited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        /// Signal number, if it was killed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        /// Last lines of the kernel's log.
        log_tail: String,
    },
    /// A cell started executing.
    CellStarted {
        /// The request that asked for it.
        request: String,
        /// The cell.
        cell: String,
        /// Unix milliseconds.
        started_ms: u64,
    },
    /// One output of a cell, in the order the kernel emitted it.
    Output {
        /// The request that caused it.
        request: String,
        /// The cell.
        cell: String,
        /// The output itself.
        output: OutputContent,
    },
    /// A cell finished.
    CellFinished {
        /// The request that asked for it.
        request: String,
        /// The cell.
        cell: String,
        /// How it ended.
        status: CellStatus,
        /// The kernel's execution counter, if it assigned one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        execution_count: Option<u64>,
        /// Wall time of the execution, milliseconds.
        duration_ms: u64,
    },
    /// Some outputs may be missing: the kernel emitted while no agent listened (for
    /// example between an agent crash and its restart).
    OutputGap {
        /// The cell that was running, if known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cell: Option<String>,
        /// Explanation.
        reason: String,
    },
    /// One chunk of a content-addressed blob (an image, a chart); the payload holds
    /// the bytes `offset..offset + payload.len()`. The server verifies the hash when
    /// the last chunk arrives.
    BlobChunk {
        /// SHA-256 of the whole blob, lower-case hex.
        hash: String,
        /// MIME type.
        media_type: String,
        /// Offset of this chunk.
        offset: u64,
        /// Size of the whole blob.
        total: u64,
    },
    /// Head and tail rows of a tabular result.
    DatasetHeadTail {
        /// The cell that produced it.
        cell: String,
        /// Variable name or a label.
        name: String,
        /// Column names and types.
        columns: Vec<Column>,
        /// Number of rows in the whole dataset.
        total_rows: u64,
        /// Up to 100 first rows.
        head: Vec<Vec<Value>>,
        /// Up to 100 last rows.
        tail: Vec<Vec<Value>>,
    },
    /// A checkpoint event.
    Checkpoint {
        /// The cell after which the checkpoint was (or was to be) taken.
        cell: String,
        /// Checkpoint identifier.
        checkpoint: String,
        /// What happened.
        event: CheckpointEvent,
        /// Bytes stored, when known.
        #[serde(default)]
        bytes: u64,
        /// Time the operation took, milliseconds.
        #[serde(default)]
        duration_ms: u64,
        /// Why it failed or was evicted.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// One chunk of a file the kernel wrote in the attached files; the payload holds
    /// the bytes at `offset`. The last chunk (`offset + len == total`) commits a new
    /// version.
    FileChunk {
        /// Which tree.
        root: FileRoot,
        /// Path relative to the root, `/`-separated, no `..`.
        path: String,
        /// Version the writer started from (for conflict detection); empty for a new file.
        base_version: String,
        /// Offset of this chunk.
        offset: u64,
        /// Size of the whole new content.
        total: u64,
        /// SHA-256 of the whole new content, lower-case hex: the new version. The
        /// server assembles the chunks like a blob's and verifies this hash.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        version: String,
    },
    /// A directory the kernel created in the attached files. Applied in sequence order
    /// with uploads, removals and renames; creating an existing directory changes nothing.
    FileMkdir {
        /// Which tree.
        root: FileRoot,
        /// Path relative to the root.
        path: String,
    },
    /// A file the kernel removed (`kind` file) or an empty directory (`kind` dir). A file
    /// is removed only at `base_version`; a server that has another version keeps it.
    FileRemove {
        /// Which tree.
        root: FileRoot,
        /// Path relative to the root.
        path: String,
        /// File or directory.
        kind: FileKind,
        /// Version of the file the kernel removed (empty for a directory, or a file the
        /// agent has not seen a version of).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        base_version: String,
    },
    /// A file or directory the kernel renamed, replacing `to` if it existed. A file
    /// whose server version is not `base_version` stays where it is (the writer's
    /// version appears at `to`); a replaced file whose version is not
    /// `replaced_version` is kept as a conflict copy.
    FileRename {
        /// Which tree.
        root: FileRoot,
        /// Current path.
        from: String,
        /// New path.
        to: String,
        /// Version of the renamed file as the kernel saw it (empty for a directory).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        base_version: String,
        /// Version of the file at `to` the rename replaces, as the kernel saw it (empty
        /// when there was none).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        replaced_version: String,
    },

    // ----- queries (not sequenced; answered by `request` id) ----------------------
    /// Agent -> server: which of these blobs does the server already have?
    BlobQuery {
        /// Correlates the answer.
        request: u64,
        /// SHA-256 hashes, hex.
        hashes: Vec<String>,
    },
    /// Server -> agent: answer to [`Message::BlobQuery`].
    BlobStatus {
        /// The query's id.
        request: u64,
        /// The hashes the server has, complete and verified.
        present: Vec<String>,
    },
    /// Agent -> server: list an attached-files tree.
    FileList {
        /// Correlates the answer.
        request: u64,
        /// Which tree.
        root: FileRoot,
    },
    /// Server -> agent: answer to [`Message::FileList`].
    FileListing {
        /// The query's id.
        request: u64,
        /// Whether the kernel may write this tree.
        writable: bool,
        /// Entries.
        entries: Vec<FileEntry>,
        /// Why the tree cannot be listed (then `entries` is empty).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Agent -> server: read a byte range of an attached file.
    FileRead {
        /// Correlates the answer.
        request: u64,
        /// Which tree.
        root: FileRoot,
        /// Path relative to the root.
        path: String,
        /// Version to read (from the listing).
        version: String,
        /// First byte.
        offset: u64,
        /// Number of bytes wanted.
        len: u32,
    },
    /// Server -> agent: answer to [`Message::FileRead`]; the payload holds the bytes.
    FileData {
        /// The query's id.
        request: u64,
        /// Offset of the payload.
        offset: u64,
        /// The file ends with this payload.
        eof: bool,
        /// Why the range cannot be read (no such file or version); the payload is empty.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// A notebook cell's identity and source (reactive mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellSource {
    /// Stable cell identifier.
    pub id: String,
    /// Source code.
    pub code: String,
}

/// One output of a cell, following the Jupyter output kinds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum OutputContent {
    /// Text on stdout or stderr.
    Stream {
        /// `stdout` or `stderr`.
        name: String,
        /// The text.
        text: String,
    },
    /// Rich display data. Large values (images) are replaced by
    /// `{"blob": "<sha256>"}` and uploaded with [`Message::BlobChunk`].
    DisplayData {
        /// MIME bundle.
        data: Value,
        /// Jupyter metadata.
        #[serde(default)]
        metadata: Value,
        /// Display id, for later updates.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        display_id: Option<String>,
    },
    /// Replaces an earlier display with the same display id.
    UpdateDisplayData {
        /// MIME bundle.
        data: Value,
        /// Jupyter metadata.
        #[serde(default)]
        metadata: Value,
        /// The display being updated.
        display_id: String,
    },
    /// The value of the cell's last expression.
    ExecuteResult {
        /// Execution counter.
        execution_count: u64,
        /// MIME bundle.
        data: Value,
        /// Jupyter metadata.
        #[serde(default)]
        metadata: Value,
    },
    /// An exception.
    Error {
        /// Exception class name.
        ename: String,
        /// Exception value.
        evalue: String,
        /// Formatted traceback lines.
        traceback: Vec<String>,
    },
    /// Clear the cell's output.
    ClearOutput {
        /// Wait for the next output before clearing.
        wait: bool,
    },
}

impl OutputContent {
    /// `outputs` with consecutive texts of one stream joined, as notebook formats store
    /// them: a kernel flushes its streams when it likes, so one `print` may arrive as
    /// one message or as several.
    #[must_use]
    pub fn coalesce_streams(outputs: &[OutputContent]) -> Vec<OutputContent> {
        let mut out: Vec<OutputContent> = Vec::with_capacity(outputs.len());
        for o in outputs {
            if let (
                Some(OutputContent::Stream {
                    name: prev,
                    text: acc,
                }),
                OutputContent::Stream { name, text },
            ) = (out.last_mut(), o)
                && prev == name
            {
                acc.push_str(text);
                continue;
            }
            out.push(o.clone());
        }
        out
    }
}

/// Kernel lifecycle states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelState {
    /// Process started, not yet answering.
    Starting,
    /// Answering and idle.
    Idle,
    /// Running code.
    Busy,
    /// Being restarted.
    Restarting,
    /// Restored from a checkpoint.
    Restored,
    /// Gone.
    Dead,
}

/// How a cell ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CellStatus {
    /// Ran to the end.
    Ok,
    /// Raised an exception.
    Error,
    /// Interrupted or not run because an earlier cell failed.
    Aborted,
    /// The kernel died while running it.
    KernelDied,
}

/// Checkpoint lifecycle events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointEvent {
    /// Taken and stored.
    Created,
    /// Removed to stay within the budget.
    Evicted,
    /// The kernel was restored from it.
    Restored,
    /// Could not be taken or restored; see the reason.
    Failed,
    /// The cell's state cannot be checkpointed (open TCP connection, ...).
    NotRestorable,
}

/// One feature of the capability report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    /// Feature name (`fuse_mount`, `checkpoint`, `user_switch`, ...).
    pub name: String,
    /// Whether it is on.
    pub enabled: bool,
    /// What was found (versions, probe results), or why it is off.
    pub detail: String,
    /// For a disabled feature: what would turn it on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub how_to_enable: String,
}

/// A column of a tabular result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Data type as the kernel names it (`int64`, `object`, ...).
    pub dtype: String,
}

/// The two attached-files trees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileRoot {
    /// Files of this notebook (read-write).
    Notebook,
    /// Files shared by the workspace (read-only unless the server says otherwise).
    Workspace,
}

/// One entry of a file listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the root, `/`-separated.
    pub path: String,
    /// File or directory.
    pub kind: FileKind,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// Modification time, Unix milliseconds.
    pub mtime_ms: i64,
    /// Content version (the SHA-256 of the content for files).
    #[serde(default)]
    pub version: String,
}

/// Kinds of file entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
}

/// Machine-readable reasons carried by [`Message::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// No protocol version in common.
    UnsupportedVersion,
    /// The enrolment token is not known to the server.
    TokenUnknown,
    /// The enrolment token has expired.
    TokenExpired,
    /// The enrolment token was already used.
    TokenUsed,
    /// The certificate signing request is invalid.
    BadCsr,
    /// The server requires TLS and the agent connected in plaintext.
    PlaintextRefused,
    /// A data session was attempted without a client certificate.
    Unauthenticated,
    /// A frame exceeded the size limit.
    FrameTooLarge,
    /// A frame could not be decoded.
    MalformedFrame,
    /// A message arrived that is not valid in the session's state.
    UnexpectedMessage,
    /// A sequence number skipped ahead of the next expected one.
    SequenceGap,
    /// A blob's bytes did not match its hash, or its chunks were inconsistent.
    BlobMismatch,
    /// A change to the attached files (mkdir, remove, rename) was not applied: an
    /// invalid path or a read-only tree.
    FileRefused,
    /// The peer was silent for three heartbeat intervals.
    HeartbeatTimeout,
    /// The server failed internally; the agent should retry later.
    Internal,
}

impl ErrorCode {
    /// Whether retrying the same thing later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::Internal | ErrorCode::HeartbeatTimeout)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::TokenUnknown => "token_unknown",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenUsed => "token_used",
            ErrorCode::BadCsr => "bad_csr",
            ErrorCode::PlaintextRefused => "plaintext_refused",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::UnexpectedMessage => "unexpected_message",
            ErrorCode::SequenceGap => "sequence_gap",
            ErrorCode::BlobMismatch => "blob_mismatch",
            ErrorCode::FileRefused => "file_refused",
            ErrorCode::HeartbeatTimeout => "heartbeat_timeout",
            ErrorCode::Internal => "internal",
        };
        f.write_str(s)
    }
}

/// Who sends a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Agent to server.
    ToServer,
    /// Server to agent.
    ToAgent,
    /// Either.
    Both,
}

impl Message {
    /// The `"type"` tag of this message, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Enroll { .. } => "enroll",
            Message::Enrolled { .. } => "enrolled",
            Message::Hello { .. } => "hello",
            Message::Welcome { .. } => "welcome",
            Message::RenewCertificate { .. } => "renew_certificate",
            Message::CertificateRenewed { .. } => "certificate_renewed",
            Message::Heartbeat { .. } => "heartbeat",
            Message::Ack { .. } => "ack",
            Message::Error { .. } => "error",
            Message::Goodbye { .. } => "goodbye",
            Message::ExecuteCell { .. } => "execute_cell",
            Message::RunFrom { .. } => "run_from",
            Message::Interrupt { .. } => "interrupt",
            Message::RestartKernel { .. } => "restart_kernel",
            Message::Shutdown { .. } => "shutdown",
            Message::Capabilities { .. } => "capabilities",
            Message::KernelStatus { .. } => "kernel_status",
            Message::KernelDied { .. } => "kernel_died",
            Message::CellStarted { .. } => "cell_started",
            Message::Output { .. } => "output",
            Message::CellFinished { .. } => "cell_finished",
            Message::OutputGap { .. } => "output_gap",
            Message::BlobChunk { .. } => "blob_chunk",
            Message::DatasetHeadTail { .. } => "dataset_head_tail",
            Message::Checkpoint { .. } => "checkpoint",
            Message::FileChunk { .. } => "file_chunk",
            Message::FileMkdir { .. } => "file_mkdir",
            Message::FileRemove { .. } => "file_remove",
            Message::FileRename { .. } => "file_rename",
            Message::BlobQuery { .. } => "blob_query",
            Message::BlobStatus { .. } => "blob_status",
            Message::FileList { .. } => "file_list",
            Message::FileListing { .. } => "file_listing",
            Message::FileRead { .. } => "file_read",
            Message::FileData { .. } => "file_data",
        }
    }

    /// Who may send this message.
    pub fn direction(&self) -> Direction {
        match self {
            Message::Enroll { .. }
            | Message::Hello { .. }
            | Message::RenewCertificate { .. }
            | Message::Capabilities { .. }
            | Message::KernelStatus { .. }
            | Message::KernelDied { .. }
            | Message::CellStarted { .. }
            | Message::Output { .. }
            | Message::CellFinished { .. }
            | Message::OutputGap { .. }
            | Message::BlobChunk { .. }
            | Message::DatasetHeadTail { .. }
            | Message::Checkpoint { .. }
            | Message::FileChunk { .. }
            | Message::FileMkdir { .. }
            | Message::FileRemove { .. }
            | Message::FileRename { .. }
            | Message::BlobQuery { .. }
            | Message::FileList { .. }
            | Message::FileRead { .. } => Direction::ToServer,
            Message::Enrolled { .. }
            | Message::Welcome { .. }
            | Message::CertificateRenewed { .. }
            | Message::ExecuteCell { .. }
            | Message::RunFrom { .. }
            | Message::Interrupt { .. }
            | Message::RestartKernel { .. }
            | Message::Shutdown { .. }
            | Message::BlobStatus { .. }
            | Message::FileListing { .. }
            | Message::FileData { .. } => Direction::ToAgent,
            Message::Heartbeat { .. }
            | Message::Ack { .. }
            | Message::Error { .. }
            | Message::Goodbye { .. } => Direction::Both,
        }
    }

    /// Whether this message must carry a sequence number (and be kept until acked).
    pub fn is_sequenced(&self) -> bool {
        matches!(
            self,
            Message::Capabilities { .. }
                | Message::KernelStatus { .. }
                | Message::KernelDied { .. }
                | Message::CellStarted { .. }
                | Message::Output { .. }
                | Message::CellFinished { .. }
                | Message::OutputGap { .. }
                | Message::BlobChunk { .. }
                | Message::DatasetHeadTail { .. }
                | Message::Checkpoint { .. }
                | Message::FileChunk { .. }
                | Message::FileMkdir { .. }
                | Message::FileRemove { .. }
                | Message::FileRename { .. }
                | Message::ExecuteCell { .. }
                | Message::RunFrom { .. }
                | Message::Interrupt { .. }
                | Message::RestartKernel { .. }
                | Message::Shutdown { .. }
        )
    }

    /// Whether this message may carry a raw payload.
    pub fn has_payload(&self) -> bool {
        matches!(
            self,
            Message::BlobChunk { .. } | Message::FileChunk { .. } | Message::FileData { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(name: &str, text: &str) -> OutputContent {
        OutputContent::Stream {
            name: name.into(),
            text: text.into(),
        }
    }

    #[test]
    fn consecutive_texts_of_one_stream_are_joined_and_nothing_else() {
        let error = OutputContent::Error {
            ename: "E".into(),
            evalue: "v".into(),
            traceback: vec![],
        };
        let outputs = [
            stream("stdout", "started"),
            stream("stdout", "\n"),
            stream("stderr", "warn\n"),
            stream("stdout", "done\n"),
            error.clone(),
            error.clone(),
            stream("stdout", "after\n"),
        ];
        assert_eq!(
            OutputContent::coalesce_streams(&outputs),
            [
                stream("stdout", "started\n"),
                stream("stderr", "warn\n"),
                stream("stdout", "done\n"),
                error.clone(),
                error,
                stream("stdout", "after\n"),
            ]
        );
        assert!(OutputContent::coalesce_streams(&[]).is_empty());
    }
}
