//! The durable outbox: every sequenced message the agent sends is appended here
//! *before* it is sent, and removed only after the server's cumulative ack.
//!
//! # Guarantees
//!
//! - **Crash safety.** The outbox survives agent restarts and `SIGKILL` at any
//!   instant. Each record carries a CRC-32 over its length, sequence number and bytes;
//!   on [`Outbox::open`] a torn or damaged tail is detected, truncated away and never
//!   misread. With [`FsyncPolicy::Never`] a *power loss* may also lose the last records
//!   written (the page cache is gone); see [`Outbox::on_welcome`] for how numbering then
//!   stays safe.
//! - **Exactly-once numbering.** Sequence numbers are per *stream* (a random 128-bit
//!   id created once in `<dir>/stream`); a wiped outbox gets a new stream and starts
//!   again at 1. Within a stream a number is never reused, across any number of
//!   restarts, even when everything was acked and deleted.
//! - **Bounded, with backpressure.** The unacked records may use at most
//!   [`OutboxConfig::max_bytes`] (default 1 GiB). An [`Outbox::append`] that would go
//!   over returns [`OutboxError::Full`] and writes nothing: the caller waits for acks
//!   (backpressure) and logs it. Nothing is ever dropped silently. A single record
//!   larger than `max_bytes` is refused with [`OutboxError::RecordTooLarge`]. Disk use
//!   is at most about `max_bytes + segment_bytes` (acked records stay on disk until their
//!   whole segment is acked).
//! - **Cheap appends.** One `write(2)` per record and no `fsync` unless
//!   [`FsyncPolicy::EveryAppend`] asks for it. Acks do not `fsync` either: the acked
//!   watermark is written (tmp + rename) every [`ACK_PERSIST_EVERY`] acks, on
//!   [`Outbox::sync`] and on drop. An outdated watermark after a crash only causes
//!   resends, which the server deduplicates.
//!
//! - **Files without copies.** [`Outbox::append_attached`] appends a run of messages
//!   whose payloads are consecutive ranges of one local file (the chunks of an
//!   uploaded file) without copying the file: it becomes an *attachment*, a hard link
//!   in the outbox directory (a copy only where linking fails), and the records hold a
//!   reference instead of the payload. The caller must not change the file afterwards
//!   (linking shares its content). An attachment is deleted once all its records are
//!   acked; its bytes are not counted against [`OutboxConfig::max_bytes`] (they are
//!   the file's own, which exist anyway).
//! - **Held files.** [`AttachmentStager::hold`] links a file into the outbox with a
//!   small note (the caller's, opaque here) before its messages can be made (an upload
//!   whose content hash is not computed yet): it survives a crash, and
//!   [`Outbox::take_held`] hands it back after the next open so the caller can append
//!   it then. Appending it is atomic with respect to crashes: its records are written
//!   first, then it is renamed to its final name, then the note is removed; a crash in
//!   between leaves either the held file (records cut as referring to a missing
//!   attachment) or the appended one (the note, alone, is removed on open).
//!
//! # Layout
//!
//! ```text
//! <dir>/stream                     stream id, 32 hex digits, written once
//! <dir>/acked                      acked watermark (decimal), written lazily
//! <dir>/lock                       flock(2) held while open: one writer only
//! <dir>/seg-<first seq:020>.log    segments of records, each up to segment_bytes
//! <dir>/att-<first seq:020>        attachment whose first record has that number
//! <dir>/att-tmp-<random>           attachment being prepared (no record yet)
//! <dir>/att-held-<random>          held file (no record yet), kept across restarts
//! <dir>/att-held-<random>.note     its caller's note
//! ```
//!
//! Each record is `[u32 frame_len][u32 crc32][u64 seq][frame]`, where `frame` is
//! exactly the wire frame (`nbagent_protocol::codec::encode_raw` of the JSON
//! `Envelope { seq, msg }` and the payload), so a resend writes the stored bytes to the
//! socket without re-encoding (an attached record is read back with its payload from
//! its attachment, see [`record`]). Records of one segment have consecutive sequence numbers
//! starting at the one in its name; the segment name thus also remembers the numbering
//! when the segment is empty. The last segment is never deleted, so the last assigned
//! number always survives on disk.
//!
//! # Memory
//!
//! The outbox keeps 8 bytes per unacked record (its offset) plus a cache of the most
//! recent unacked frames ([`OutboxConfig::cache_bytes`], default 64 MiB) so that sending
//! right after appending, the common case, never reads the disk.
//!
//! The outbox is synchronous std I/O; the async side wraps it in a mutex.

mod record;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use nbagent_protocol::{Message, RawFrame, SendWindow, SeqError};
use nix::fcntl::{Flock, FlockArg};

/// Default bound of unacked bytes (1 GiB).
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Default segment size (64 MiB).
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Default size of the in-memory cache of recent frames (64 MiB).
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;
/// The acked watermark is written to disk after this many advancing acks.
pub const ACK_PERSIST_EVERY: u32 = 64;

/// Largest sequence number believed from a file name or the watermark file, so that
/// arithmetic on numbers read from disk cannot overflow.
const MAX_SEQ: u64 = 1 << 62;

const STREAM_FILE: &str = "stream";
const ACKED_FILE: &str = "acked";
const LOCK_FILE: &str = "lock";
const SEG_PREFIX: &str = "seg-";
const SEG_SUFFIX: &str = ".log";
const ATT_PREFIX: &str = "att-";
const ATT_TMP_PREFIX: &str = "att-tmp-";
const ATT_HELD_PREFIX: &str = "att-held-";
const NOTE_SUFFIX: &str = ".note";
/// Largest note of a held file accepted on open.
const MAX_NOTE_LEN: u64 = 64 << 10;

/// When the outbox calls `fsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Never (the default): survives a crash or `SIGKILL` of the agent, not a power
    /// loss of the machine.
    #[default]
    Never,
    /// After every append: survives power loss, at the cost of one `fsync` per record.
    EveryAppend,
    /// Only when the caller calls [`Outbox::sync`] (for example on a timer), and when a
    /// segment is closed.
    Periodic,
}

/// Where and how big the outbox is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutboxConfig {
    /// Directory of the outbox; created if missing.
    pub dir: PathBuf,
    /// Most bytes of unacked records kept (default [`DEFAULT_MAX_BYTES`]).
    pub max_bytes: u64,
    /// Size at which a new segment file is started (default [`DEFAULT_SEGMENT_BYTES`]).
    pub segment_bytes: u64,
    /// Most bytes of recent frames kept in memory (default [`DEFAULT_CACHE_BYTES`]).
    pub cache_bytes: usize,
    /// When to `fsync` (default [`FsyncPolicy::Never`]).
    pub fsync: FsyncPolicy,
}

impl OutboxConfig {
    /// A configuration with the defaults for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            cache_bytes: DEFAULT_CACHE_BYTES,
            fsync: FsyncPolicy::Never,
        }
    }
}

/// Errors of the outbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// A file operation failed.
    #[error("outbox i/o failed: {op} {path}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another process (or another `Outbox` in this one) has the outbox open.
    #[error("outbox {path} is locked by another process")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::errno::Errno,
    },
    /// Only sequenced messages go through the outbox.
    #[error("{kind} messages are not sequenced and do not go through the outbox")]
    NotSequenced {
        /// The message's type.
        kind: &'static str,
    },
    /// The unacked records would exceed the bound: wait for acks and retry.
    #[error("outbox full: {pending_bytes} bytes unacked, limit {max_bytes} bytes")]
    Full {
        /// Bytes of unacked records now.
        pending_bytes: u64,
        /// The configured bound.
        max_bytes: u64,
    },
    /// One record is larger than the whole outbox (or than a record can be).
    #[error("record of {len} bytes can never fit in the outbox (limit {max_bytes} bytes)")]
    RecordTooLarge {
        /// Size of the record.
        len: u64,
        /// The limit it exceeds.
        max_bytes: u64,
    },
    /// The message could not be serialised.
    #[error("cannot serialise {kind} message")]
    Encode {
        /// The message's type.
        kind: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The server acknowledged something impossible.
    #[error("ack refused")]
    Ack(#[source] SeqError),
    /// The stream id file holds something else than a stream id.
    #[error("stream id file {path} is damaged; remove the outbox directory to start a new stream")]
    BadStreamId {
        /// The file.
        path: PathBuf,
    },
    /// A record that was valid when the outbox was opened no longer is.
    #[error("outbox record damaged at {path} offset {offset}: {reason}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Offset of the record.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// Parts of an attached append lie outside its file.
    #[error("attached payload at {offset}+{len} lies outside the {file_len}-byte file")]
    OutsideAttachment {
        /// Offset of the part.
        offset: u64,
        /// Its length.
        len: u32,
        /// Length of the file.
        file_len: u64,
    },
    /// Sequence numbers are exhausted (only after an absurd `Welcome`).
    #[error("outbox sequence numbers are exhausted")]
    SequenceExhausted,
    /// An earlier append failed and its partial record could not be removed; appends
    /// are refused until the outbox is reopened (which truncates the damage).
    #[error("outbox is unusable after a failed write; reopen it")]
    Poisoned,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OutboxError + 'a {
    move |source| OutboxError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// One segment file: consecutive records starting at `first`.
#[derive(Debug)]
struct Segment {
    /// Sequence number of its first record (also in its name).
    first: u64,
    path: PathBuf,
    /// Offset of each record: `starts[i]` is the record of `first + i`.
    starts: Vec<u64>,
    /// Bytes of valid records.
    len: u64,
    /// Attached records found when the segment was scanned: (seq, attachment, end of
    /// the payload in it).
    refs: Vec<(u64, u64, u64)>,
}

impl Segment {
    fn new(dir: &Path, first: u64) -> Self {
        Self {
            first,
            path: segment_path(dir, first),
            starts: Vec::new(),
            len: 0,
            refs: Vec::new(),
        }
    }

    /// Sequence number of its last record (`first - 1` when empty).
    fn end(&self) -> u64 {
        self.first + self.starts.len() as u64 - 1
    }

    /// Byte range of the records `lo..=hi` (which must be in this segment).
    fn range(&self, lo: u64, hi: u64) -> (u64, u64) {
        let from = self.starts[(lo - self.first) as usize];
        let to = self
            .starts
            .get((hi + 1 - self.first) as usize)
            .copied()
            .unwrap_or(self.len);
        (from, to)
    }
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{SEG_PREFIX}{first:020}{SEG_SUFFIX}"))
}

fn attachment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{ATT_PREFIX}{id:020}"))
}

fn parse_attachment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(ATT_PREFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A file made ready to become an attachment ([`AttachmentStager::prepare`] or
/// [`AttachmentStager::hold`]), outside the outbox lock: linked (or copied) into the
/// outbox directory under a temporary name, and synced when the policy asks for it.
/// Removed on drop unless appended, or held ([`Attachment::release`] to drop a held
/// file for good).
#[derive(Debug)]
pub struct Attachment {
    path: PathBuf,
    len: u64,
    appended: bool,
    /// The note of a held file.
    note: Option<PathBuf>,
}

impl Attachment {
    /// Length of the file.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file in the outbox directory (read it, do not change it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes a held file and its note (no longer wanted: nothing to send).
    pub fn release(mut self) {
        if let Some(note) = self.note.take() {
            let _ = fs::remove_file(&self.path);
            let _ = fs::remove_file(note);
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if !self.appended && self.note.is_none() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// What [`Outbox::prepare_attachment`] needs, taken from the outbox under its lock.
#[derive(Debug, Clone)]
pub struct AttachmentStager {
    dir: PathBuf,
    durable: bool,
}

impl AttachmentStager {
    /// Links `src` into the outbox directory (copies it where linking fails, e.g.
    /// across filesystems) and syncs it under [`FsyncPolicy::EveryAppend`] (under
    /// `Periodic` the next [`Outbox::sync`] or [`Outbox::take_unsynced`] covers it).
    pub fn prepare(&self, src: &Path) -> Result<Attachment, OutboxError> {
        self.link(src, ATT_TMP_PREFIX)
    }

    /// Like [`prepare`](Self::prepare), and keeps the file with `note` across
    /// restarts until it is appended or [released](Attachment::release):
    /// [`Outbox::take_held`] returns it after the next open. Under
    /// [`FsyncPolicy::EveryAppend`] both are synced with the directory.
    pub fn hold(&self, src: &Path, note: &[u8]) -> Result<Attachment, OutboxError> {
        let mut att = self.link(src, ATT_HELD_PREFIX)?;
        let note_path = note_path(&att.path);
        let tmp = self.dir.join(format!(
            "{ATT_TMP_PREFIX}{:016x}{NOTE_SUFFIX}",
            rand::random::<u64>()
        ));
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(note)?;
            if self.durable {
                f.sync_all()?;
            }
            fs::rename(&tmp, &note_path)?;
            if self.durable {
                File::open(&self.dir)?.sync_all()?;
            }
            Ok(())
        })();
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_file(&note_path);
            return Err(OutboxError::Io {
                op: "writing the note of",
                path: att.path.clone(),
                source,
            });
        }
        att.note = Some(note_path);
        Ok(att)
    }

    fn link(&self, src: &Path, prefix: &str) -> Result<Attachment, OutboxError> {
        let path = self
            .dir
            .join(format!("{prefix}{:016x}", rand::random::<u64>()));
        if let Err(e) = fs::hard_link(src, &path) {
            tracing::debug!(src = %src.display(), error = %e, "cannot link an attachment; copying it");
            fs::copy(src, &path).map_err(io_err("copying", src))?;
        }
        let mut att = Attachment {
            path,
            len: 0,
            appended: false,
            note: None,
        };
        let file = File::open(&att.path).map_err(io_err("opening", &att.path))?;
        att.len = file.metadata().map_err(io_err("reading", &att.path))?.len();
        if self.durable {
            file.sync_all().map_err(io_err("syncing", &att.path))?;
        }
        Ok(att)
    }
}

fn note_path(held: &Path) -> PathBuf {
    let mut p = held.as_os_str().to_owned();
    p.push(NOTE_SUFFIX);
    PathBuf::from(p)
}

/// A record as stored: its body (the wire frame, or for an attached record the frame's
/// head and the reference) and whether it is attached.
#[derive(Debug, Clone)]
struct Stored {
    body: Bytes,
    attached: bool,
}

impl Stored {
    /// Length of the frame on the wire.
    fn wire_len(&self) -> usize {
        if self.attached {
            record::attached(&self.body).map_or(self.body.len(), |r| r.head.len() + r.payload_len)
        } else {
            self.body.len()
        }
    }
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(SEG_PREFIX)?.strip_suffix(SEG_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&n| (1..=MAX_SEQ).contains(&n))
}

/// The durable outbox. See the [module documentation](self).
pub struct Outbox {
    config: OutboxConfig,
    stream_id: String,
    _lock: Flock<File>,
    window: SendWindow,
    /// Segments in order; the last one is the one appended to.
    segments: VecDeque<Segment>,
    /// Append handle of the last segment, opened lazily.
    active: Option<File>,
    /// The most recent unacked records, a suffix of the pending records.
    cache: VecDeque<(u64, Stored)>,
    /// Attachments still needed: id (its first record's number) -> its last record.
    attachments: std::collections::BTreeMap<u64, u64>,
    /// Held files found on open and not yet taken, with their notes.
    held: Vec<(Attachment, Vec<u8>)>,
    /// Attachments appended under [`FsyncPolicy::Periodic`] and not synced since.
    unsynced: Vec<PathBuf>,
    cache_bytes: usize,
    pending_bytes: u64,
    /// Watermark last written to `<dir>/acked`.
    persisted_acked: u64,
    acks_since_persist: u32,
    poisoned: bool,
    buf: BytesMut,
}

impl Outbox {
    /// Opens (or creates) the outbox in `config.dir` and recovers its state: verifies
    /// every record, truncates a torn tail, finds the last sequence number and the
    /// acked watermark, and deletes fully acked segments.
    ///
    /// Reads every record once, so its cost grows with the unacked backlog. Fails with
    /// [`OutboxError::Locked`] while another `Outbox` has the directory open. Where the
    /// numbering of the segments is not continuous (a segment lost or damaged in its
    /// middle, which a crash alone cannot cause), the records from the gap on are
    /// dropped with an error in the log, and numbering continues after the last
    /// record kept.
    pub fn open(config: OutboxConfig) -> Result<Outbox, OutboxError> {
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let lock = lock_dir(&dir)?;
        let stream_id = load_or_create_stream(&dir)?;
        let watermark = read_watermark(&dir);
        let mut segments = recover_segments(&dir)?;

        let derived = segments.front().map_or(0, |s| s.first - 1);
        let acked = watermark.max(derived);
        let data_end = segments.back().map_or(0, Segment::end);
        let last = acked.max(data_end);
        if last > data_end {
            // Every record on disk is acked and the numbering continues past them
            // (records lost in a power loss after the server stored them): the
            // segments are useless and the next append must start a fresh one.
            for seg in segments.drain(..) {
                remove_segment(&seg)?;
            }
        }
        while segments.len() > 1 && segments.front().is_some_and(|s| s.end() <= acked) {
            if let Some(seg) = segments.pop_front() {
                remove_segment(&seg)?;
            }
        }
        let attachments = recover_attachments(&dir, &mut segments, acked)?;
        let held = recover_held(&dir)?;
        let last = acked.max(segments.back().map_or(0, Segment::end));
        let mut outbox = Outbox {
            stream_id,
            _lock: lock,
            window: SendWindow::resume(last, acked),
            segments,
            active: None,
            cache: VecDeque::new(),
            attachments,
            held,
            unsynced: Vec::new(),
            cache_bytes: 0,
            pending_bytes: 0,
            persisted_acked: watermark,
            acks_since_persist: 0,
            poisoned: false,
            buf: BytesMut::new(),
            config,
        };
        outbox.pending_bytes = outbox.compute_pending_bytes();
        tracing::info!(
            dir = %dir.display(),
            stream = %outbox.stream_id,
            last,
            acked,
            pending = outbox.pending_count(),
            pending_bytes = outbox.pending_bytes,
            segments = outbox.segments.len(),
            "outbox opened"
        );
        Ok(outbox)
    }

    /// The stream id (32 hex digits) to announce in `Hello`.
    pub fn stream_id(&self) -> &str {
        &self.stream_id
    }

    /// Appends a sequenced message and its payload; returns its sequence number.
    ///
    /// Refuses non-sequenced messages ([`OutboxError::NotSequenced`]); returns
    /// [`OutboxError::Full`] without writing anything when the unacked records would
    /// exceed the bound (wait for acks and retry), and
    /// [`OutboxError::RecordTooLarge`] for a record that can never fit.
    ///
    /// If the write itself fails, the partial record is removed and nothing is
    /// appended. If that removal fails, or an `fsync` of [`FsyncPolicy::EveryAppend`]
    /// fails (the record is then written but perhaps not durable), the outbox refuses
    /// further appends with [`OutboxError::Poisoned`] until it is reopened.
    pub fn append(&mut self, msg: &Message, payload: &[u8]) -> Result<u64, OutboxError> {
        if !msg.is_sequenced() {
            return Err(OutboxError::NotSequenced { kind: msg.kind() });
        }
        if self.poisoned {
            return Err(OutboxError::Poisoned);
        }
        let Some(seq) = self.window.last_assigned().checked_add(1) else {
            return Err(OutboxError::SequenceExhausted);
        };
        let header = record::encode_header(seq, msg).map_err(|source| OutboxError::Encode {
            kind: msg.kind(),
            source,
        })?;
        let len = record::record_len(header.len(), payload.len());
        let record_limit = (record::HEADER_LEN as u64) + u64::from(u32::MAX);
        if len > self.config.max_bytes || len > record_limit {
            return Err(OutboxError::RecordTooLarge {
                len,
                max_bytes: self.config.max_bytes.min(record_limit),
            });
        }
        if self.pending_bytes + len > self.config.max_bytes {
            return Err(OutboxError::Full {
                pending_bytes: self.pending_bytes,
                max_bytes: self.config.max_bytes,
            });
        }
        self.prepare_segment(seq, len)?;

        self.buf.clear();
        record::encode(seq, &header, payload, &mut self.buf);
        let mut rec = self.buf.split().freeze();
        self.write_records(&rec, &[len])?;
        let assigned = self.window.assign();
        debug_assert_eq!(assigned, seq);
        self.pending_bytes += len;
        self.sync_every_append(false)?;

        let frame = rec.split_off(record::HEADER_LEN);
        self.cache_push(
            seq,
            Stored {
                body: frame,
                attached: false,
            },
        );
        Ok(seq)
    }

    /// What [`AttachmentStager::prepare`] needs; call it under the outbox's lock and
    /// prepare the attachment without it.
    pub fn attachment_stager(&self) -> AttachmentStager {
        AttachmentStager {
            dir: self.config.dir.clone(),
            durable: self.config.fsync == FsyncPolicy::EveryAppend,
        }
    }

    /// The held files found when the outbox was opened, oldest first, with their
    /// notes ([`AttachmentStager::hold`]); each stays on disk until appended or
    /// released.
    pub fn take_held(&mut self) -> Vec<(Attachment, Vec<u8>)> {
        std::mem::take(&mut self.held)
    }

    /// Appends one sequenced message per part, each with the payload `len` bytes at
    /// `offset` of the attachment (see the module documentation); returns the last
    /// sequence number. All or none are appended: [`OutboxError::Full`] and the other
    /// errors of [`append`](Self::append) leave the outbox and `att` as they were, so
    /// the call can be retried.
    pub fn append_attached(
        &mut self,
        att: &mut Attachment,
        parts: &[(Message, u64, u32)],
    ) -> Result<u64, OutboxError> {
        if self.poisoned {
            return Err(OutboxError::Poisoned);
        }
        let last_assigned = self.window.last_assigned();
        let first = last_assigned
            .checked_add(1)
            .filter(|f| {
                f.checked_add(parts.len() as u64)
                    .is_some_and(|e| e <= MAX_SEQ)
            })
            .ok_or(OutboxError::SequenceExhausted)?;
        self.buf.clear();
        let mut lens = Vec::with_capacity(parts.len());
        for (i, (msg, offset, len)) in parts.iter().enumerate() {
            if !msg.is_sequenced() {
                return Err(OutboxError::NotSequenced { kind: msg.kind() });
            }
            if offset
                .checked_add(u64::from(*len))
                .is_none_or(|end| end > att.len)
            {
                return Err(OutboxError::OutsideAttachment {
                    offset: *offset,
                    len: *len,
                    file_len: att.len,
                });
            }
            let seq = first + i as u64;
            let header = record::encode_header(seq, msg).map_err(|source| OutboxError::Encode {
                kind: msg.kind(),
                source,
            })?;
            let len_before = self.buf.len();
            record::encode_attached(seq, &header, *len, first, *offset, &mut self.buf);
            lens.push((self.buf.len() - len_before) as u64);
            if lens.last().is_some_and(|&l| l > record::MAX_BODY_LEN) {
                return Err(OutboxError::RecordTooLarge {
                    len: lens.last().copied().unwrap_or_default(),
                    max_bytes: record::MAX_BODY_LEN,
                });
            }
        }
        let total: u64 = lens.iter().sum();
        if total > self.config.max_bytes {
            return Err(OutboxError::RecordTooLarge {
                len: total,
                max_bytes: self.config.max_bytes,
            });
        }
        if self.pending_bytes + total > self.config.max_bytes {
            return Err(OutboxError::Full {
                pending_bytes: self.pending_bytes,
                max_bytes: self.config.max_bytes,
            });
        }
        if parts.is_empty() {
            return Ok(last_assigned);
        }
        self.prepare_segment(first, total)?;
        let final_path = attachment_path(&self.config.dir, first);
        // Records first, then the name they refer to: a crash in between leaves
        // records whose attachment is missing (cut on open) and the file under its
        // old name (held: appended again after the restart).
        let recs = self.buf.split().freeze();
        self.write_records(&recs, &lens)?;
        if let Err(e) = fs::rename(&att.path, &final_path) {
            self.unwrite_records(&lens);
            return Err(io_err("renaming", &att.path)(e));
        }
        att.appended = true;
        if let Some(note) = att.note.take() {
            let _ = fs::remove_file(note);
        }
        let mut at = 0usize;
        for len in lens.iter().map(|&l| l as usize) {
            let seq = self.window.assign();
            let body = recs.slice(at + record::HEADER_LEN..at + len);
            at += len;
            self.cache_push(
                seq,
                Stored {
                    body,
                    attached: true,
                },
            );
        }
        let last = self.window.last_assigned();
        self.pending_bytes += total;
        self.attachments.insert(first, last);
        if self.config.fsync == FsyncPolicy::Periodic {
            self.unsynced.push(final_path);
        }
        // The attachment's new name is durable with the directory.
        self.sync_every_append(true)?;
        Ok(last)
    }

    /// Writes whole records (of lengths `lens`) to the active segment and indexes
    /// them. If the write fails, what was written is removed so later appends do not
    /// follow garbage; if that fails too, the outbox is poisoned.
    fn write_records(&mut self, recs: &[u8], lens: &[u64]) -> Result<(), OutboxError> {
        let (Some(seg), Some(file)) = (self.segments.back_mut(), self.active.as_mut()) else {
            return Err(OutboxError::Poisoned);
        };
        if let Err(source) = file.write_all(recs) {
            if let Err(e) = file.set_len(seg.len) {
                tracing::error!(path = %seg.path.display(), error = %e, "cannot remove a partial outbox record");
                self.poisoned = true;
            }
            return Err(OutboxError::Io {
                op: "appending to",
                path: seg.path.clone(),
                source,
            });
        }
        for len in lens {
            seg.starts.push(seg.len);
            seg.len += len;
        }
        Ok(())
    }

    /// Removes the records (of lengths `lens`) just written by
    /// [`write_records`](Self::write_records); poisons the outbox if that fails.
    fn unwrite_records(&mut self, lens: &[u64]) {
        let (Some(seg), Some(file)) = (self.segments.back_mut(), self.active.as_mut()) else {
            self.poisoned = true;
            return;
        };
        for _ in lens {
            if let Some(start) = seg.starts.pop() {
                seg.len = start;
            }
        }
        if let Err(e) = file.set_len(seg.len) {
            tracing::error!(path = %seg.path.display(), error = %e, "cannot remove outbox records");
            self.poisoned = true;
        }
    }

    /// Under [`FsyncPolicy::EveryAppend`], syncs the active segment (and the directory
    /// if `dir`). The records are written but may not be durable after a failure, and
    /// the state of the page cache after a failed fsync is unknown: the outbox is then
    /// poisoned.
    fn sync_every_append(&mut self, dir: bool) -> Result<(), OutboxError> {
        if self.config.fsync != FsyncPolicy::EveryAppend {
            return Ok(());
        }
        let (Some(seg), Some(file)) = (self.segments.back(), self.active.as_ref()) else {
            return Err(OutboxError::Poisoned);
        };
        let synced = file
            .sync_data()
            .map_err(io_err("syncing", &seg.path))
            .and_then(|()| {
                if dir {
                    sync_dir(&self.config.dir)
                } else {
                    Ok(())
                }
            });
        if synced.is_err() {
            self.poisoned = true;
        }
        synced
    }

    /// Makes sure the last segment can take a record of `len` bytes numbered `seq`:
    /// opens it, or starts a new one when it is full (or there is none).
    fn prepare_segment(&mut self, seq: u64, len: u64) -> Result<(), OutboxError> {
        let full = self
            .segments
            .back()
            .is_none_or(|s| s.len > 0 && s.len + len > self.config.segment_bytes);
        if !full {
            if self.active.is_none()
                && let Some(seg) = self.segments.back()
            {
                self.active = Some(open_append(&seg.path)?);
            }
            return Ok(());
        }
        let sync = self.config.fsync != FsyncPolicy::Never;
        if let (Some(old), Some(seg)) = (self.active.take(), self.segments.back())
            && sync
        {
            old.sync_data().map_err(io_err("syncing", &seg.path))?;
        }
        let seg = Segment::new(&self.config.dir, seq);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&seg.path)
            .map_err(io_err("creating", &seg.path))?;
        // A leftover file of that name holds nothing we still need.
        file.set_len(0).map_err(io_err("truncating", &seg.path))?;
        if sync {
            sync_dir(&self.config.dir)?;
        }
        tracing::debug!(path = %seg.path.display(), first = seq, "outbox segment started");
        self.segments.push_back(seg);
        self.active = Some(file);
        self.delete_acked_segments()
    }

    fn cache_push(&mut self, seq: u64, frame: Stored) {
        if frame.body.len() > self.config.cache_bytes {
            // The cache must stay a contiguous suffix: start it again after this one.
            self.cache.clear();
            self.cache_bytes = 0;
            return;
        }
        self.cache_bytes += frame.body.len();
        self.cache.push_back((seq, frame));
        while self.cache_bytes > self.config.cache_bytes {
            if let Some((_, f)) = self.cache.pop_front() {
                self.cache_bytes -= f.body.len();
            }
        }
    }

    /// Applies the server's cumulative ack: everything up to `upto` is stored and may
    /// be dropped. Returns how many records it newly released; a stale (lower) ack is
    /// ignored. An ack beyond the last assigned number is an error
    /// ([`OutboxError::Ack`]). Fully acked segments are deleted.
    ///
    /// If deleting a segment fails, the ack is still applied and the deletion is
    /// retried on the next ack.
    pub fn ack(&mut self, upto: u64) -> Result<u64, OutboxError> {
        let released = self.window.on_ack(upto).map_err(OutboxError::Ack)?;
        if released == 0 {
            return Ok(0);
        }
        let acked = self.window.acked();
        while let Some((seq, f)) = self.cache.front() {
            if *seq > acked {
                break;
            }
            self.cache_bytes -= f.body.len();
            self.cache.pop_front();
        }
        self.pending_bytes = self.compute_pending_bytes();
        self.acks_since_persist += 1;
        let done: Vec<u64> = self
            .attachments
            .iter()
            .filter(|&(_, &last)| last <= acked)
            .map(|(&id, _)| id)
            .collect();
        if !done.is_empty() {
            // An attachment is deleted only once the watermark that makes its records
            // unneeded is on disk: a reopened outbox must not find its records pending
            // without it.
            self.persist_watermark(self.config.fsync != FsyncPolicy::Never)?;
            for id in done {
                let path = attachment_path(&self.config.dir, id);
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("deleting", &path)(e)),
                }
                self.attachments.remove(&id);
            }
        } else if self.acks_since_persist >= ACK_PERSIST_EVERY {
            self.persist_watermark(false)?;
        }
        self.delete_acked_segments()?;
        Ok(released)
    }

    /// Applies the `acked` of the server's `Welcome`, the highest number of this
    /// stream it has stored. Call it on every (re)connection before resending.
    ///
    /// Normally this is an ordinary [`ack`](Self::ack). If the server has stored more
    /// than this outbox ever assigned, local records were lost (a power loss with
    /// [`FsyncPolicy::Never`]): the numbering then jumps past the server's watermark,
    /// durably, so that no number the server already stored is reused for a new
    /// message (the server would drop it as a duplicate). Returns how many records
    /// were released. A watermark beyond 2^62 is refused as absurd.
    pub fn on_welcome(&mut self, server_acked: u64) -> Result<u64, OutboxError> {
        let last = self.window.last_assigned();
        if server_acked <= last {
            return self.ack(server_acked);
        }
        if server_acked > MAX_SEQ {
            return Err(OutboxError::Ack(SeqError::AckBeyondSent {
                acked: server_acked,
                sent: last,
            }));
        }
        let released = last - self.window.acked();
        tracing::warn!(
            stream = %self.stream_id,
            server_acked,
            last,
            "server stored more than the outbox holds; outbox records were lost, numbering continues after the server's"
        );
        self.window = SendWindow::resume(server_acked, server_acked);
        self.persist_watermark(true)?;
        self.cache.clear();
        self.cache_bytes = 0;
        self.active = None;
        while let Some(seg) = self.segments.pop_front() {
            remove_segment(&seg)?;
        }
        for id in std::mem::take(&mut self.attachments).into_keys() {
            let _ = fs::remove_file(attachment_path(&self.config.dir, id));
        }
        self.pending_bytes = 0;
        Ok(released)
    }

    /// Sequence bookkeeping: last assigned number and acked watermark.
    pub fn window(&self) -> SendWindow {
        self.window.clone()
    }

    /// Bytes of unacked records on disk (record headers included).
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Number of unacked records.
    pub fn pending_count(&self) -> u64 {
        self.window.in_flight()
    }

    /// Wire frames of the unacked records numbered above `after`, in order, totalling
    /// at most about `max_bytes` (always at least one frame when any is pending).
    ///
    /// Numbers at or below the acked watermark are never returned (they may be gone).
    /// Recent frames come from memory, older ones from the segment files.
    pub fn frames_after(
        &self,
        after: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, OutboxError> {
        let last = self.window.last_assigned();
        let mut next = after.max(self.window.acked()).saturating_add(1);
        let mut out = Vec::new();
        let mut total = 0usize;
        // Takes one stored record into `out`; false once the budget is spent.
        let mut take = |seq: u64, stored: &Stored, out: &mut Vec<(u64, Bytes)>| {
            let len = stored.wire_len();
            if !out.is_empty() && total + len > max_bytes {
                return Ok(false);
            }
            total += len;
            out.push((seq, self.wire_frame(stored)?));
            Ok::<_, OutboxError>(true)
        };
        while next <= last {
            let cache_front = self.cache.front().map_or(u64::MAX, |(s, _)| *s);
            if next >= cache_front {
                let from = (next - cache_front) as usize;
                for (seq, stored) in self.cache.iter().skip(from) {
                    if !take(*seq, stored, &mut out)? {
                        break;
                    }
                }
                return Ok(out);
            }
            let hi = last.min(cache_front - 1);
            let budget = max_bytes.saturating_sub(out.iter().map(|(_, f)| f.len()).sum());
            let got = self.read_disk(next, hi, budget, out.is_empty())?;
            if got.is_empty() {
                return Ok(out);
            }
            next = got.last().map_or(next, |(s, _)| s + 1);
            for (seq, stored) in &got {
                if !take(*seq, stored, &mut out)? {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// The wire frame of a stored record: the body itself, or for an attached record
    /// its head followed by the payload read from the attachment.
    fn wire_frame(&self, stored: &Stored) -> Result<Bytes, OutboxError> {
        if !stored.attached {
            return Ok(stored.body.clone());
        }
        let corrupt = |reason| OutboxError::Corrupt {
            path: self.config.dir.clone(),
            offset: 0,
            reason,
        };
        let r = record::attached(&stored.body).ok_or_else(|| corrupt("bad attached record"))?;
        let path = attachment_path(&self.config.dir, r.attachment);
        let file = File::open(&path).map_err(io_err("opening", &path))?;
        let mut frame = vec![0u8; r.head.len() + r.payload_len];
        frame[..r.head.len()].copy_from_slice(&r.head);
        file.read_exact_at(&mut frame[r.head.len()..], r.offset)
            .map_err(io_err("reading", &path))?;
        Ok(Bytes::from(frame))
    }

    /// Reads records `lo..=hi` (at most to the end of `lo`'s segment) from disk, within
    /// `budget` body bytes (at least one record if `at_least_one`).
    fn read_disk(
        &self,
        lo: u64,
        hi: u64,
        budget: usize,
        at_least_one: bool,
    ) -> Result<Vec<(u64, Stored)>, OutboxError> {
        let Some(seg) = self
            .segments
            .iter()
            .find(|s| s.first <= lo && lo <= s.end())
        else {
            return Ok(Vec::new());
        };
        let hi = hi.min(seg.end());
        // Extend the range record by record within the budget.
        let mut end = lo;
        let mut frame_total = 0usize;
        while end <= hi {
            let (a, b) = seg.range(end, end);
            let frame_len = (b - a) as usize - record::HEADER_LEN;
            if !(end == lo && at_least_one) && frame_total + frame_len > budget {
                break;
            }
            frame_total += frame_len;
            end += 1;
        }
        if end == lo {
            return Ok(Vec::new());
        }
        let (from, to) = seg.range(lo, end - 1);
        let file = File::open(&seg.path).map_err(io_err("opening", &seg.path))?;
        let mut buf = vec![0u8; (to - from) as usize];
        file.read_exact_at(&mut buf, from)
            .map_err(io_err("reading", &seg.path))?;
        let data = Bytes::from(buf);
        let mut out = Vec::with_capacity((end - lo) as usize);
        for seq in lo..end {
            let (a, b) = seg.range(seq, seq);
            let rec = data.slice((a - from) as usize..(b - from) as usize);
            let corrupt = |reason| OutboxError::Corrupt {
                path: seg.path.clone(),
                offset: a,
                reason,
            };
            let head = record::verify(&rec).map_err(|e| corrupt(e.as_str()))?;
            if head.seq != seq {
                return Err(corrupt("unexpected sequence number"));
            }
            out.push((
                seq,
                Stored {
                    body: rec.slice(record::HEADER_LEN..),
                    attached: head.attached,
                },
            ));
        }
        Ok(out)
    }

    /// The last record appended (acked or not), decoded; `None` if there is none on
    /// disk (a new stream, or after [`on_welcome`](Self::on_welcome) skipped ahead).
    /// Used to resume a workload after a restart.
    pub fn last(&self) -> Result<Option<(u64, RawFrame)>, OutboxError> {
        let last = self.window.last_assigned();
        let stored = match self.cache.back() {
            Some((seq, stored)) if *seq == last => stored.clone(),
            _ => {
                let Some(seg) = self.segments.iter().rev().find(|s| !s.starts.is_empty()) else {
                    return Ok(None);
                };
                if seg.end() != last {
                    return Ok(None);
                }
                match self.read_disk(last, last, 0, true)?.pop() {
                    Some((_, stored)) => stored,
                    None => return Ok(None),
                }
            }
        };
        let frame = self.wire_frame(&stored)?;
        let raw = record::to_raw(&frame).ok_or_else(|| OutboxError::Corrupt {
            path: self.config.dir.clone(),
            offset: 0,
            reason: "frame prefix inconsistent with record length",
        })?;
        Ok(Some((last, raw)))
    }

    /// Flushes appended records to stable storage (`fsync` of the current segment)
    /// and writes the acked watermark. For [`FsyncPolicy::Periodic`].
    pub fn sync(&mut self) -> Result<(), OutboxError> {
        sync_attachments(&self.take_unsynced())?;
        if let (Some(file), Some(seg)) = (&self.active, self.segments.back()) {
            file.sync_data().map_err(io_err("syncing", &seg.path))?;
        }
        self.persist_watermark(false)
    }

    /// The attachments appended since the last sync, for a periodic `fsync` without
    /// the outbox's lock ([`sync_attachments`]), before the segment's.
    pub fn take_unsynced(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.unsynced)
    }

    /// A second handle on the active segment, so that a periodic `fsync` can run
    /// without holding the outbox (appends and sends go on meanwhile). Rotation
    /// syncs the segment it closes, so the active one is all that needs it.
    pub fn sync_handle(&self) -> Result<Option<File>, OutboxError> {
        match (&self.active, self.segments.back()) {
            (Some(file), Some(seg)) => Ok(Some(
                file.try_clone().map_err(io_err("duplicating", &seg.path))?,
            )),
            _ => Ok(None),
        }
    }

    /// Bytes of records above the acked watermark, from the segment index.
    fn compute_pending_bytes(&self) -> u64 {
        let lo = self.window.acked() + 1;
        self.segments
            .iter()
            .filter(|s| !s.starts.is_empty() && s.end() >= lo)
            .map(|s| s.len - s.starts[lo.saturating_sub(s.first) as usize])
            .sum()
    }

    /// Deletes every segment but the last whose records are all acked.
    fn delete_acked_segments(&mut self) -> Result<(), OutboxError> {
        let acked = self.window.acked();
        while self.segments.len() > 1 && self.segments.front().is_some_and(|s| s.end() <= acked) {
            if let Some(seg) = self.segments.front() {
                remove_segment(seg)?;
            }
            self.segments.pop_front();
        }
        Ok(())
    }

    /// Writes the acked watermark (tmp + rename); durably (with `fsync`) if `durable`.
    fn persist_watermark(&mut self, durable: bool) -> Result<(), OutboxError> {
        let acked = self.window.acked();
        if acked == self.persisted_acked && !durable {
            return Ok(());
        }
        write_atomic(
            &self.config.dir,
            ACKED_FILE,
            format!("{acked}\n").as_bytes(),
            durable,
        )?;
        self.persisted_acked = acked;
        self.acks_since_persist = 0;
        Ok(())
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A summary: the cache may hold many megabytes.
        f.debug_struct("Outbox")
            .field("dir", &self.config.dir)
            .field("stream_id", &self.stream_id)
            .field("window", &self.window)
            .field("pending_bytes", &self.pending_bytes)
            .field("segments", &self.segments.len())
            .field("cached_frames", &self.cache.len())
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if let Err(e) = self.persist_watermark(false) {
            tracing::warn!(error = %e, "cannot write the outbox's acked watermark on close");
        }
    }
}

/// Fsyncs attachments; one already deleted (all its records acked) needs nothing.
pub fn sync_attachments(paths: &[PathBuf]) -> Result<(), OutboxError> {
    for path in paths {
        match File::open(path) {
            Ok(f) => f.sync_data().map_err(io_err("syncing", path))?,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("opening", path)(e)),
        }
    }
    Ok(())
}

fn lock_dir(dir: &Path) -> Result<Flock<File>, OutboxError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("opening", &path))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, source)| OutboxError::Locked { path, source })
}

fn open_append(path: &Path) -> Result<File, OutboxError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io_err("opening", path))
}

fn sync_dir(dir: &Path) -> Result<(), OutboxError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing", dir))
}

fn remove_segment(seg: &Segment) -> Result<(), OutboxError> {
    match fs::remove_file(&seg.path) {
        Ok(()) => {
            tracing::debug!(path = %seg.path.display(), first = seg.first, "outbox segment deleted");
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("deleting", &seg.path)(e)),
    }
}

/// Writes `dir/name` atomically: a temporary file renamed over it.
fn write_atomic(dir: &Path, name: &str, contents: &[u8], durable: bool) -> Result<(), OutboxError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut f = File::create(&tmp).map_err(io_err("creating", &tmp))?;
    f.write_all(contents).map_err(io_err("writing", &tmp))?;
    if durable {
        f.sync_all().map_err(io_err("syncing", &tmp))?;
    }
    drop(f);
    fs::rename(&tmp, &path).map_err(io_err("renaming", &tmp))?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Reads the stream id, or creates a new stream (removing records of an unknown one).
fn load_or_create_stream(dir: &Path) -> Result<String, OutboxError> {
    let path = dir.join(STREAM_FILE);
    match fs::read_to_string(&path) {
        Ok(s) => {
            let id = s.trim();
            if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(id.to_ascii_lowercase());
            }
            Err(OutboxError::BadStreamId { path })
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            // Records without a stream id cannot be sent to anyone: clear them first.
            for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
                let entry = entry.map_err(io_err("listing", dir))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if parse_segment_name(&name).is_some() || name == ACKED_FILE {
                    tracing::warn!(file = %name, "removing outbox file of an unknown stream");
                    fs::remove_file(entry.path()).map_err(io_err("deleting", &entry.path()))?;
                }
            }
            let id = format!("{:032x}", rand::random::<u128>());
            write_atomic(dir, STREAM_FILE, format!("{id}\n").as_bytes(), true)?;
            tracing::info!(stream = %id, "new outbox stream");
            Ok(id)
        }
        Err(e) => Err(io_err("reading", &path)(e)),
    }
}

/// The persisted watermark; 0 when missing or unreadable (only causes resends).
fn read_watermark(dir: &Path) -> u64 {
    let path = dir.join(ACKED_FILE);
    match fs::read_to_string(&path) {
        Ok(s) => s
            .trim()
            .parse()
            .ok()
            .filter(|&n| n <= MAX_SEQ)
            .unwrap_or_else(|| {
                tracing::warn!(path = %path.display(), "ignoring damaged outbox watermark");
                0
            }),
        Err(e) => {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot read outbox watermark");
            }
            0
        }
    }
}

/// Checks that every attachment an unacked record needs is there, deletes the others
/// (and any left half-prepared), and returns the needed ones (id -> last record).
///
/// A needed attachment that is missing or too short (only lost files cause that: an
/// attachment is in place before its records are written) loses its records and all
/// that follow, like a damaged tail.
fn recover_attachments(
    dir: &Path,
    segments: &mut VecDeque<Segment>,
    acked: u64,
) -> Result<std::collections::BTreeMap<u64, u64>, OutboxError> {
    // id -> (first unacked record, last record, bytes needed)
    let needed = |segments: &VecDeque<Segment>| {
        let mut m = std::collections::BTreeMap::<u64, (u64, u64, u64)>::new();
        for &(seq, id, end) in segments.iter().flat_map(|s| &s.refs) {
            if seq > acked {
                let e = m.entry(id).or_insert((seq, seq, 0));
                e.1 = e.1.max(seq);
                e.2 = e.2.max(end);
            }
        }
        m
    };
    let mut want = needed(segments);
    let mut cut: Option<u64> = None;
    for (&id, &(first, _, end)) in &want {
        let path = attachment_path(dir, id);
        let len = fs::metadata(&path).map(|m| m.len());
        if len.as_ref().map_or(true, |&l| l < end) {
            tracing::error!(path = %path.display(), needed = end, found = ?len.ok(), "outbox attachment missing or short; dropping its records and later ones");
            cut = Some(cut.map_or(first, |c| c.min(first)));
        }
    }
    if let Some(cut) = cut {
        truncate_from(segments, cut)?;
        want = needed(segments);
    }
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale = if name.starts_with(ATT_TMP_PREFIX) {
            true
        } else {
            parse_attachment_name(&name).is_some_and(|id| !want.contains_key(&id))
        };
        if stale {
            fs::remove_file(entry.path()).map_err(io_err("deleting", &entry.path()))?;
        }
    }
    Ok(want
        .into_iter()
        .map(|(id, (_, last, _))| (id, last))
        .collect())
}

/// The held files in `dir` with their notes, oldest first; removes a note whose file
/// is gone (appended just before a crash) and a file without a note (a crash while it
/// was being held).
fn recover_held(dir: &Path) -> Result<Vec<(Attachment, Vec<u8>)>, OutboxError> {
    let mut held = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with(ATT_HELD_PREFIX) {
            continue;
        }
        let path = entry.path();
        if let Some(file) = name.strip_suffix(NOTE_SUFFIX) {
            if !dir.join(file).exists() {
                remove_if_exists(&path)?;
            }
            continue;
        }
        let note_path = note_path(&path);
        let mut noted = None;
        let note = match File::open(&note_path) {
            Ok(f) => {
                noted = f.metadata().and_then(|m| m.modified()).ok();
                let mut note = Vec::new();
                f.take(MAX_NOTE_LEN + 1)
                    .read_to_end(&mut note)
                    .map_err(io_err("reading", &note_path))?;
                Some(note).filter(|n| n.len() as u64 <= MAX_NOTE_LEN)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("reading", &note_path)(e)),
        };
        let meta = entry.metadata().map_err(io_err("reading", &path))?;
        let Some(note) = note else {
            tracing::warn!(path = %path.display(), "held file without a (valid) note; removed");
            remove_if_exists(&path)?;
            remove_if_exists(&note_path)?;
            continue;
        };
        let att = Attachment {
            path,
            len: meta.len(),
            appended: false,
            note: Some(note_path),
        };
        held.push((noted, att, note));
    }
    held.sort_by_key(|h| h.0);
    Ok(held.into_iter().map(|(_, a, n)| (a, n)).collect())
}

/// Removes `path`; already gone is fine (a directory scan may come across a file
/// removed with another).
fn remove_if_exists(path: &Path) -> Result<(), OutboxError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(io_err("deleting", path)(e)),
        _ => Ok(()),
    }
}

/// Drops the records numbered `cut` and above (keeping at least one segment, which
/// remembers the numbering).
fn truncate_from(segments: &mut VecDeque<Segment>, cut: u64) -> Result<(), OutboxError> {
    while segments.len() > 1 && segments.back().is_some_and(|s| s.first >= cut) {
        if let Some(seg) = segments.pop_back() {
            remove_segment(&seg)?;
        }
    }
    if let Some(seg) = segments.back_mut()
        && cut <= seg.end()
    {
        let idx = cut.saturating_sub(seg.first) as usize;
        let offset = seg.starts[idx];
        OpenOptions::new()
            .write(true)
            .open(&seg.path)
            .and_then(|f| f.set_len(offset))
            .map_err(io_err("truncating", &seg.path))?;
        seg.starts.truncate(idx);
        seg.len = offset;
        seg.refs.retain(|r| r.0 < cut);
    }
    Ok(())
}

/// Scans every segment, truncates damaged tails, and cuts the chain where numbering
/// is not continuous (keeping the earlier records).
fn recover_segments(dir: &Path) -> Result<VecDeque<Segment>, OutboxError> {
    let mut firsts = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let entry = entry.map_err(io_err("listing", dir))?;
        if let Some(first) = entry.file_name().to_str().and_then(parse_segment_name) {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();
    let mut segments: VecDeque<Segment> = VecDeque::new();
    let mut cut = false;
    for first in firsts {
        let mut seg = Segment::new(dir, first);
        if cut {
            remove_segment(&seg)?;
            continue;
        }
        let prev_end = segments.back().map(Segment::end);
        if let Some(prev_end) = prev_end.filter(|&e| e + 1 != first) {
            if prev_end >= first {
                tracing::error!(path = %seg.path.display(), "outbox segments overlap; dropping this and later segments");
            } else {
                tracing::error!(
                    path = %seg.path.display(),
                    missing_from = prev_end + 1,
                    missing_to = first - 1,
                    "outbox records missing; dropping this and later segments"
                );
            }
            cut = true;
            remove_segment(&seg)?;
            continue;
        }
        scan_segment(&mut seg)?;
        segments.push_back(seg);
    }
    Ok(segments)
}

/// Reads a segment, indexing its valid records and truncating whatever follows them.
fn scan_segment(seg: &mut Segment) -> Result<(), OutboxError> {
    let path = seg.path.clone();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err("opening", &path))?;
    let file_len = file.metadata().map_err(io_err("reading", &path))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, &file);
    let mut offset = 0u64;
    let mut rec = Vec::new();
    let mut reason = None;
    loop {
        if offset == file_len {
            break;
        }
        let mut head = [0u8; record::HEADER_LEN];
        if let Err(e) = reader.read_exact(&mut head) {
            if e.kind() == ErrorKind::UnexpectedEof {
                reason = Some("torn record header");
                break;
            }
            return Err(io_err("reading", &path)(e));
        }
        let Some(h) = record::Head::parse(&head) else {
            reason = Some(record::Invalid::Length.as_str());
            break;
        };
        if offset + h.record_len() > file_len {
            reason = Some("torn record");
            break;
        }
        rec.clear();
        rec.extend_from_slice(&head);
        rec.resize(record::HEADER_LEN + h.frame_len, 0);
        reader
            .read_exact(&mut rec[record::HEADER_LEN..])
            .map_err(io_err("reading", &path))?;
        if let Err(e) = record::verify(&rec) {
            reason = Some(e.as_str());
            break;
        }
        let expected = seg.first + seg.starts.len() as u64;
        if h.seq != expected {
            reason = Some("unexpected sequence number");
            break;
        }
        if h.attached {
            match record::reference_of(&rec[record::HEADER_LEN..]) {
                Some((id, end)) => seg.refs.push((h.seq, id, end)),
                None => {
                    reason = Some(record::Invalid::Frame.as_str());
                    break;
                }
            }
        }
        seg.starts.push(offset);
        offset += h.record_len();
    }
    seg.len = offset;
    if let Some(reason) = reason {
        tracing::warn!(
            path = %path.display(),
            offset,
            dropped_bytes = file_len - offset,
            reason,
            "truncating damaged outbox tail"
        );
        drop(reader);
        file.set_len(offset).map_err(io_err("truncating", &path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
