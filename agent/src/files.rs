//! The notebook's attached files inside the container, backed by the server.
//!
//! Two trees: the notebook's files (read-write) and the workspace's (read-only), at
//! configurable paths (`/data/notebook_files`, `/data/workspace_files`). They are set
//! up before the kernel starts, in one of two ways:
//!
//! - **mount** (FUSE available): `nbagent-fusefs` mounts each tree (`allow_other`, files
//!   owned by the notebook user). Its [`ChannelBacking`] turns every backing call of a
//!   FUSE worker thread into a [`BackingRequest`]; [`serve`] answers them: listings and
//!   reads become `file_list`/`file_read` queries over the channel (waiting at most the
//!   configured timeout, after which the kernel sees `EIO`), uploads become sequenced
//!   `file_chunk` messages appended to the durable outbox, so a closed file is safe on
//!   local disk at once and reaches the server whenever it is reachable. `mkdir`,
//!   `rename`, `unlink` and `rmdir` become `file_mkdir`/`file_rename`/`file_remove` in
//!   the same outbox (in order with the uploads), carrying the versions the kernel saw;
//!   until the server acknowledges them, every listing is shown with them replayed.
//!   Sizes and read answers beyond [`ServeLimits`] are refused, not trusted.
//! - **copy** (no FUSE, or `--files-mode copy`): the trees are copied into the same
//!   paths, and changed notebook files are uploaded at shutdown; the agent says so in
//!   its log and in an `output_gap` notice.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nbagent_fusefs::copy::{CopyError, Manifest, copy_tree, sync_back};
use nbagent_fusefs::{
    Backing, BackingError, BackingRequest, ChannelBacking, Fs, FsConfig, Listing, MountOptions,
    Mounted, SystemClock, Ticket, detach_stale, mount,
};
use nbagent_protocol::{FileEntry, FileKind, FileRoot, Message};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::channel::{Queries, QueryError};
use crate::outbox::Attachment;
use crate::sender::{Sender, Shared};

/// Bytes per `file_chunk` (and most asked per `file_read`).
pub const CHUNK: usize = 1 << 20;

/// How the attached files are made available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FilesMode {
    /// Mount with FUSE when the container allows it, else copy.
    Auto,
    /// Mount with FUSE; fall back to copying (with a notice) when that fails.
    Mount,
    /// Copy the trees in before the kernel starts, sync back at shutdown.
    Copy,
    /// No attached files.
    Off,
}

/// Settings of the attached files.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// Mount or copy.
    pub mode: FilesMode,
    /// Where the notebook's files appear.
    pub notebook_dir: PathBuf,
    /// Where the workspace's files appear.
    pub workspace_dir: PathBuf,
    /// Staging and cache directory (private to the agent).
    pub work_dir: PathBuf,
    /// Owner the files appear with (the notebook user).
    pub uid: u32,
    /// Group the files appear with.
    pub gid: u32,
    /// How long one listing or read may wait for the server, and one change for room
    /// in a full outbox.
    pub timeout: Duration,
    /// Largest file size accepted from the server ([`DEFAULT_MAX_FILE_SIZE`]).
    pub max_file_size: u64,
    /// How long a mount believes a listing (and a negative lookup).
    pub ttl: Duration,
    /// How long a FUSE worker polls for the next request after a metadata request
    /// (zero: never).
    pub busy_poll: Duration,
    /// Why FUSE cannot be used here, if it cannot (from the capability probe).
    pub fuse_unavailable: Option<String>,
}

/// Errors setting up the attached files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilesError {
    /// A directory could not be prepared.
    #[error("cannot prepare {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The filesystem core could not be built (the first listing failed).
    #[error("cannot list the {root:?} tree")]
    Core {
        /// Which tree.
        root: FileRoot,
        /// The cause.
        #[source]
        source: nbagent_fusefs::FsError,
    },
    /// Mounting failed.
    #[error("cannot mount the {root:?} tree at {path}")]
    Mount {
        /// Which tree.
        root: FileRoot,
        /// The mount point.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Copying failed.
    #[error("cannot copy the {root:?} tree into {path}")]
    Copy {
        /// Which tree.
        root: FileRoot,
        /// The destination.
        path: PathBuf,
        /// The cause.
        #[source]
        source: CopyError,
    },
    /// A blocking task panicked.
    #[error("a blocking task failed")]
    Join(#[from] tokio::task::JoinError),
}

/// Largest file size believed from the server by default (1 TiB): a listing with a
/// bigger entry is refused.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 1 << 40;

/// How far [`serve`] trusts and waits for the server.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// How long one listing or read may wait for the server, and one change for room
    /// in a full outbox (then it is refused, and the kernel's call fails).
    pub timeout: Duration,
    /// Largest file size accepted in a listing.
    pub max_file_size: u64,
}

/// A change of the notebook tree queued in the outbox, as the listing should show it
/// until the server has stored it.
#[derive(Debug, Clone, PartialEq)]
enum Change {
    /// An uploaded file or a created directory.
    Put(FileEntry),
    /// A removed file or (empty) directory.
    Remove(String),
    /// A renamed file or directory (with everything below it), replacing `to`.
    Rename { from: String, to: String },
}

/// Whether `path` is `top` or lies below it.
fn at_or_below(top: &str, path: &str) -> bool {
    path.strip_prefix(top)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Adds the directories above `path` that `tree` lacks.
fn ensure_parents(tree: &mut BTreeMap<String, FileEntry>, path: &str, mtime_ms: i64) {
    let mut end = 0;
    while let Some(i) = path[end..].find('/') {
        let dir = &path[..end + i];
        tree.entry(dir.to_owned()).or_insert_with(|| FileEntry {
            path: dir.to_owned(),
            kind: FileKind::Dir,
            size: 0,
            mtime_ms,
            version: String::new(),
        });
        end += i + 1;
    }
}

impl Change {
    /// Applies the change to a tree (path -> entry). Applying it to a tree that already
    /// has it (the server stored it before acknowledging) changes nothing more.
    fn apply(&self, tree: &mut BTreeMap<String, FileEntry>) {
        match self {
            Change::Put(e) => {
                ensure_parents(tree, &e.path, e.mtime_ms);
                tree.insert(e.path.clone(), e.clone());
            }
            Change::Remove(path) => tree.retain(|k, _| !at_or_below(path, k)),
            Change::Rename { from, to } => {
                let moved: Vec<FileEntry> = tree
                    .iter()
                    .filter(|(k, _)| at_or_below(from, k))
                    .map(|(_, e)| e.clone())
                    .collect();
                let Some(first) = moved.first() else {
                    return;
                };
                ensure_parents(tree, to, first.mtime_ms);
                tree.retain(|k, _| !at_or_below(from, k) && !at_or_below(to, k));
                for mut e in moved {
                    e.path = format!("{to}{}", &e.path[from.len()..]);
                    tree.insert(e.path.clone(), e);
                }
            }
        }
    }
}

/// Changes queued in the outbox but perhaps not yet stored by the server: applied to
/// every listing until the server acknowledges them, so a re-listing neither hides a
/// file the kernel just wrote or a directory it just made, nor brings back what it
/// removed or renamed.
#[derive(Debug, Default)]
struct Pending {
    /// `(sequence number of the change's last message, tree, change)`, oldest first.
    changes: Vec<(u64, FileRoot, Change)>,
    /// Each tree as last shown to the filesystem core (the server's listing with the
    /// pending changes applied): the versions the kernel saw.
    shown: HashMap<FileRoot, BTreeMap<String, FileEntry>>,
}

impl Pending {
    /// The version of the file at `path` as the kernel saw it (empty if none).
    fn version_of(&self, root: FileRoot, path: &str) -> String {
        self.shown
            .get(&root)
            .and_then(|t| t.get(path))
            .filter(|e| e.kind == FileKind::File)
            .map(|e| e.version.clone())
            .unwrap_or_default()
    }

    fn record(&mut self, seq: u64, root: FileRoot, change: Change) {
        change.apply(self.shown.entry(root).or_default());
        self.changes.push((seq, root, change));
    }

    /// Forgets the changes the server had stored when the listing was asked for
    /// (`acked`), and applies the others to `listing`.
    fn overlay(&mut self, root: FileRoot, listing: &mut Listing, acked: u64) {
        self.changes.retain(|(seq, _, _)| *seq > acked);
        let mut tree: BTreeMap<String, FileEntry> = listing
            .entries
            .drain(..)
            .map(|e| (e.path.clone(), e))
            .collect();
        for (_, r, change) in &self.changes {
            if *r == root {
                change.apply(&mut tree);
            }
        }
        listing.entries = tree.values().cloned().collect();
        self.shown.insert(root, tree);
    }
}

/// What the outbox keeps with a file handed over for upload
/// ([`crate::outbox::AttachmentStager::hold`]), so that an agent restarted after a
/// crash can upload it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct HeldNote {
    root: FileRoot,
    path: String,
    base_version: String,
}

/// A file handed over and not uploaded yet.
#[derive(Debug)]
struct Handed {
    note: HeldNote,
    file: Attachment,
}

/// State shared by the answers of [`serve`].
#[derive(Debug, Default)]
struct Served {
    pending: Mutex<Pending>,
    handed: Mutex<HashMap<Ticket, Handed>>,
    next_ticket: std::sync::atomic::AtomicU64,
}

/// Answers the requests of a [`ChannelBacking`] until its senders are gone, then waits
/// for the answers in flight (dropping the future cancels them). Files handed over
/// before a crash of the agent (held in the outbox) are uploaded first.
pub async fn serve(
    mut requests: mpsc::Receiver<BackingRequest>,
    queries: Queries,
    sender: Sender,
    shared: Arc<Shared>,
    limits: ServeLimits,
) {
    let served = Arc::new(Served::default());
    upload_held_with(&sender, &shared, &served).await;
    let mut answering = tokio::task::JoinSet::new();
    loop {
        let req = tokio::select! {
            req = requests.recv() => match req {
                Some(req) => req,
                None => break,
            },
            Some(_) = answering.join_next() => continue,
        };
        let (queries, sender, shared, served) = (
            queries.clone(),
            sender.clone(),
            shared.clone(),
            served.clone(),
        );
        answering.spawn(async move {
            answer(req, &queries, &sender, &shared, &served, limits).await;
        });
    }
    while answering.join_next().await.is_some() {}
}

/// Uploads the files handed over before a crash of the agent (held in its outbox). With
/// the attached files on, [`serve`] does it before its first answer; with them off the
/// agent calls this at start, so what the kernel wrote is not lost because the next
/// start changed the options.
pub async fn upload_held(sender: &Sender, shared: &Shared) {
    upload_held_with(sender, shared, &Served::default()).await;
}

async fn upload_held_with(sender: &Sender, shared: &Shared, served: &Served) {
    let held = shared.outbox().take_held();
    for (file, note) in held {
        let note: HeldNote = match serde_json::from_slice(&note) {
            Ok(n) => n,
            Err(e) => {
                warn!(path = %file.path().display(), error = %e, "held file with an unreadable note; dropped");
                file.release();
                continue;
            }
        };
        let (root, path) = (note.root, note.path.clone());
        // Nobody waits for these: room in the outbox is waited for as long as it takes
        // (the staging copies went with the old agent).
        match upload_handed(sender, served, Handed { note, file }, None).await {
            Ok(version) => {
                info!(?root, %path, %version, "file closed before the agent restarted queued for upload")
            }
            Err(e) => {
                warn!(?root, %path, error = %e, "file closed before the agent restarted could not be queued")
            }
        }
    }
}

fn query_error(op: &'static str, e: QueryError) -> BackingError {
    match e {
        QueryError::Timeout(after) => BackingError::Timeout { op, after },
        _ => BackingError::Disconnected { op },
    }
}

fn unexpected(op: &'static str, msg: &Message) -> BackingError {
    BackingError::Remote {
        op,
        reason: format!("unexpected answer {}", msg.kind()),
    }
}

fn lock<T>(p: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

async fn answer(
    req: BackingRequest,
    queries: &Queries,
    sender: &Sender,
    shared: &Shared,
    served: &Served,
    limits: ServeLimits,
) {
    let pending = &served.pending;
    match req {
        BackingRequest::List { root, reply } => {
            // What the server had stored before it was asked is in its answer.
            let acked = shared.outbox().window().acked();
            let r = list(queries, root, limits).await.map(|mut listing| {
                lock(pending).overlay(root, &mut listing, acked);
                listing
            });
            reply.send(r);
        }
        BackingRequest::Read {
            root,
            path,
            version,
            offset,
            len,
            reply,
        } => reply.send(read(queries, root, &path, &version, offset, len, limits.timeout).await),
        BackingRequest::HandOver {
            root,
            path,
            base_version,
            staged,
            reply,
        } => {
            let note = HeldNote {
                root,
                path,
                base_version,
            };
            reply.send(hand_over(shared, served, note, staged).await);
        }
        BackingRequest::Upload { ticket, reply } => {
            let handed = lock(&served.handed).remove(&ticket);
            let r = match handed {
                Some(h) => upload_handed(sender, served, h, Some(limits.timeout)).await,
                None => Err(BackingError::Remote {
                    op: "upload",
                    reason: format!("no file handed over with ticket {ticket}"),
                }),
            };
            reply.send(r);
        }
        BackingRequest::Mkdir { root, path, reply } => {
            let change = Change::Put(FileEntry {
                path: path.clone(),
                kind: FileKind::Dir,
                size: 0,
                mtime_ms: now_ms(),
                version: String::new(),
            });
            let msg = Message::FileMkdir { root, path };
            let r = queue_change(sender, pending, "mkdir", root, msg, change, limits.timeout);
            reply.send(r.await);
        }
        BackingRequest::Remove {
            root,
            path,
            kind,
            reply,
        } => {
            let base_version = lock(pending).version_of(root, &path);
            let msg = Message::FileRemove {
                root,
                path: path.clone(),
                kind,
                base_version,
            };
            let change = Change::Remove(path);
            let r = queue_change(sender, pending, "remove", root, msg, change, limits.timeout);
            reply.send(r.await);
        }
        BackingRequest::Rename {
            root,
            from,
            to,
            reply,
        } => {
            let (base_version, replaced_version) = {
                let p = lock(pending);
                (p.version_of(root, &from), p.version_of(root, &to))
            };
            let msg = Message::FileRename {
                root,
                from: from.clone(),
                to: to.clone(),
                base_version,
                replaced_version,
            };
            let change = Change::Rename { from, to };
            let r = queue_change(sender, pending, "rename", root, msg, change, limits.timeout);
            reply.send(r.await);
        }
        other => {
            warn!(request = ?other, "backing request not supported; dropped");
        }
    }
}

/// Appends a namespace change to the outbox (a local write: the kernel does not wait
/// for the server) and shows it in listings until the server acknowledges it.
async fn queue_change(
    sender: &Sender,
    pending: &Mutex<Pending>,
    op: &'static str,
    root: FileRoot,
    msg: Message,
    change: Change,
    wait: Duration,
) -> Result<(), BackingError> {
    if root == FileRoot::Workspace {
        return Err(BackingError::ReadOnly);
    }
    let seq = queued(op, Some(wait), sender.send(&msg, &Bytes::new())).await?;
    info!(?root, change = ?change, seq, "file change queued");
    lock(pending).record(seq, root, change);
    Ok(())
}

/// Waits for `append` (a [`Sender`] append, which waits while the outbox is full) for at
/// most `wait`: an append is all or nothing, so a change given up here is never queued
/// later.
async fn queued(
    op: &'static str,
    wait: Option<Duration>,
    append: impl std::future::Future<Output = Result<u64, crate::sender::SendError>>,
) -> Result<u64, BackingError> {
    let refused = |reason: String| BackingError::Remote { op, reason };
    let appended = match wait {
        Some(wait) => tokio::time::timeout(wait, append).await.map_err(|_| {
            warn!(op, ?wait, "outbox still full; the change is refused");
            refused(format!(
                "the outbox stayed full for {wait:?} (the server has not acknowledged for a while)"
            ))
        })?,
        None => append.await,
    };
    appended.map_err(|e| refused(format!("outbox refused the change: {e}")))
}

/// Refuses a listing with a file bigger than `max` (a size the core would otherwise
/// trust, for attributes and reads).
fn check_sizes(entries: &[FileEntry], max: u64) -> Result<(), BackingError> {
    match entries.iter().find(|e| e.size > max) {
        Some(e) => {
            let reason = format!(
                "the server listed {:?} with {} bytes, more than the {max} accepted",
                e.path, e.size
            );
            warn!(%reason, "file listing refused");
            Err(BackingError::Untrusted { op: "list", reason })
        }
        None => Ok(()),
    }
}

/// Refuses a `file_data` answer longer than what was asked.
fn check_reply_len(path: &str, got: usize, asked: u32) -> Result<(), BackingError> {
    if got as u64 > u64::from(asked) {
        let reason = format!("the server answered {got} bytes to a read of {asked} of {path:?}");
        warn!(%reason, "file read refused");
        return Err(BackingError::Untrusted { op: "read", reason });
    }
    Ok(())
}

async fn list(
    queries: &Queries,
    root: FileRoot,
    limits: ServeLimits,
) -> Result<Listing, BackingError> {
    let frame = queries
        .ask(
            |request| Message::FileList { request, root },
            limits.timeout,
        )
        .await
        .map_err(|e| query_error("list", e))?;
    match frame.envelope.msg {
        Message::FileListing {
            writable,
            entries,
            error: None,
            ..
        } => {
            check_sizes(&entries, limits.max_file_size)?;
            Ok(Listing { writable, entries })
        }
        Message::FileListing {
            error: Some(reason),
            ..
        } => Err(BackingError::Remote { op: "list", reason }),
        other => Err(unexpected("list", &other)),
    }
}

async fn read(
    queries: &Queries,
    root: FileRoot,
    path: &str,
    version: &str,
    offset: u64,
    len: u32,
    timeout: Duration,
) -> Result<Bytes, BackingError> {
    let len = len as usize;
    // The usual case is one answer, whose payload (a slice of the channel's read
    // buffer) is the result itself; more answers are joined.
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    let mut done = 0;
    while done < len {
        let at = offset + done as u64;
        let want = u32::try_from((len - done).min(CHUNK * 4)).unwrap_or(u32::MAX);
        let frame = queries
            .ask(
                |request| Message::FileRead {
                    request,
                    root,
                    path: path.to_owned(),
                    version: version.to_owned(),
                    offset: at,
                    len: want,
                },
                timeout,
            )
            .await
            .map_err(|e| query_error("read", e))?;
        match frame.envelope.msg {
            Message::FileData {
                error: Some(reason),
                ..
            } => {
                return Err(if reason.contains("not found") {
                    BackingError::NotFound {
                        path: path.to_owned(),
                        version: version.to_owned(),
                    }
                } else {
                    BackingError::Remote { op: "read", reason }
                });
            }
            Message::FileData { eof, .. } => {
                check_reply_len(path, frame.payload.len(), want)?;
                let last = eof || frame.payload.is_empty();
                done += frame.payload.len();
                match &mut joined {
                    None if first.is_empty() => first = frame.payload,
                    None => {
                        let mut j = BytesMut::with_capacity(len);
                        j.extend_from_slice(&first);
                        j.extend_from_slice(&frame.payload);
                        joined = Some(j);
                    }
                    Some(j) => j.extend_from_slice(&frame.payload),
                }
                if last {
                    break;
                }
            }
            other => return Err(unexpected("read", &other)),
        }
    }
    Ok(joined.map_or(first, BytesMut::freeze))
}

/// Holds `staged` (unchanged from now on) in the outbox with its note: a link, no
/// copy, no hashing; it survives a crash of the agent ([`serve`] uploads it after the
/// restart). Returns the ticket for [`upload_handed`].
async fn hand_over(
    shared: &Shared,
    served: &Served,
    note: HeldNote,
    staged: PathBuf,
) -> Result<Ticket, BackingError> {
    if note.root == FileRoot::Workspace {
        return Err(BackingError::ReadOnly);
    }
    let refused = |reason: String| BackingError::Remote {
        op: "hand over",
        reason,
    };
    let bytes = serde_json::to_vec(&note).map_err(|e| refused(e.to_string()))?;
    let stager = shared.outbox().attachment_stager();
    let file = tokio::task::spawn_blocking(move || stager.hold(&staged, &bytes))
        .await
        .map_err(|e| refused(e.to_string()))?
        .map_err(|e| refused(format!("outbox refused the file: {e}")))?;
    let ticket = served
        .next_ticket
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    lock(&served.handed).insert(ticket, Handed { note, file });
    Ok(ticket)
}

/// Hashes a handed-over file and appends it to the outbox as `file_chunk` messages
/// whose payloads stay in the file ([`Sender::send_attached`]), or drops it when its
/// content is the version it started from. Shows it in listings until the server
/// acknowledges it. Returns its version.
async fn upload_handed(
    sender: &Sender,
    served: &Served,
    handed: Handed,
    wait: Option<Duration>,
) -> Result<String, BackingError> {
    let Handed { note, mut file } = handed;
    let io = |source| BackingError::Io {
        path: note.path.clone(),
        source,
    };
    let at = file.path().to_owned();
    let version = tokio::task::spawn_blocking(move || {
        std::fs::File::open(&at).and_then(|mut f| nbagent_fusefs::backing::hash_file(&mut f))
    })
    .await
    .map_err(|e| io(std::io::Error::other(e)))?
    .map_err(io)?;
    if version == note.base_version {
        debug!(root = ?note.root, path = %note.path, "closed file unchanged; nothing to upload");
        file.release();
        return Ok(version);
    }
    let (root, path, size) = (note.root, note.path.as_str(), file.len());
    let parts: Vec<(Message, u64, u32)> = chunk_ranges(size)
        .map(|(offset, len)| {
            let msg = Message::FileChunk {
                root,
                path: path.to_owned(),
                base_version: note.base_version.clone(),
                offset,
                total: size,
                version: version.clone(),
            };
            (msg, offset, len)
        })
        .collect();
    let seq = match queued("upload", wait, sender.send_attached(&mut file, &parts)).await {
        Ok(seq) => seq,
        Err(e) => {
            file.release();
            return Err(e);
        }
    };
    info!(?root, %path, %version, size, seq, "file queued for upload");
    let entry = FileEntry {
        path: path.to_owned(),
        kind: FileKind::File,
        size,
        mtime_ms: now_ms(),
        version: version.clone(),
    };
    lock(&served.pending).record(seq, root, Change::Put(entry));
    Ok(version)
}

/// The `[offset, offset + len)` ranges of the chunks of a file of `size` bytes: one
/// empty chunk for an empty file.
fn chunk_ranges(size: u64) -> impl Iterator<Item = (u64, u32)> {
    let n = size.div_ceil(CHUNK as u64).max(1);
    (0..n).map(move |i| {
        let offset = i * CHUNK as u64;
        (offset, (size - offset).min(CHUNK as u64) as u32)
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One tree as set up.
#[derive(Debug)]
enum Tree {
    Mounted(Mounted),
    Copied {
        manifest: Manifest,
        dir: PathBuf,
        /// Private directory the changed files are copied to before upload.
        scratch: PathBuf,
    },
}

/// The attached files while the kernel runs; [`AttachedFiles::detach`] at shutdown.
#[derive(Debug)]
pub struct AttachedFiles {
    trees: Vec<Tree>,
    backing: Arc<ChannelBacking>,
}

fn dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> FilesError + '_ {
    move |source| FilesError::Dir {
        path: path.to_owned(),
        source,
    }
}

/// Makes copied files owned by the notebook user (notebook tree) or read-only for it
/// (workspace tree).
fn own_copy(dir: &Path, writable: bool, uid: u32, gid: u32) -> std::io::Result<()> {
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        set_owner(&d, writable, true, uid, gid)?;
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                set_owner(&e.path(), writable, false, uid, gid)?;
            }
        }
    }
    Ok(())
}

fn set_owner(p: &Path, writable: bool, dir: bool, uid: u32, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mode = match (writable, dir) {
        (true, true) => 0o755,
        (true, false) => 0o644,
        (false, true) => 0o555,
        (false, false) => 0o444,
    };
    // Through the descriptor of the entry itself, never a symlink put in its place: a
    // kernel running beside a restarted agent writes in this tree.
    let nofollow = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nofollow.bits())
        .open(p)?;
    if writable && nix::unistd::geteuid().is_root() {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    }
    f.set_permissions(std::fs::Permissions::from_mode(mode))
}

impl AttachedFiles {
    /// Sets up both trees (see the module documentation). A tree that cannot be set up
    /// is left out (logged); the kernel starts anyway.
    pub async fn attach(
        config: &FilesConfig,
        queries: Queries,
        sender: Sender,
        shared: Arc<Shared>,
    ) -> AttachedFiles {
        let (backing, requests) = ChannelBacking::new(256, config.timeout + Duration::from_secs(1));
        tokio::spawn(serve(
            requests,
            queries,
            sender.clone(),
            shared,
            ServeLimits {
                timeout: config.timeout,
                max_file_size: config.max_file_size,
            },
        ));
        let backing = Arc::new(backing);
        let mut files = AttachedFiles {
            trees: Vec::new(),
            backing,
        };
        let mut copy_reason = match (config.mode, &config.fuse_unavailable) {
            (FilesMode::Copy, _) => Some("--files-mode copy".to_owned()),
            (_, Some(why)) => Some(format!("FUSE is not available ({why})")),
            _ => None,
        };
        for (root, dir) in [
            (FileRoot::Notebook, &config.notebook_dir),
            (FileRoot::Workspace, &config.workspace_dir),
        ] {
            if copy_reason.is_none() {
                match files.mount_tree(config, root, dir).await {
                    Ok(m) => {
                        info!(?root, mountpoint = %dir.display(), passthrough = m.passthrough(), "attached files mounted");
                        files.trees.push(Tree::Mounted(m));
                        continue;
                    }
                    Err(e @ FilesError::Core { .. }) => {
                        warn!(?root, error = %e, cause = ?std::error::Error::source(&e).map(|c| c.to_string()), "attached files not available");
                        continue;
                    }
                    Err(e) => {
                        warn!(?root, error = %e, cause = ?std::error::Error::source(&e).map(|c| c.to_string()), "mount failed; copying the files instead");
                        copy_reason = Some(format!("mounting failed: {e}"));
                    }
                }
            }
            match files.copy_in(config, root, dir).await {
                Ok(manifest) => {
                    info!(?root, dir = %dir.display(), files = manifest.files.len(), "attached files copied");
                    files.trees.push(Tree::Copied {
                        manifest,
                        dir: dir.clone(),
                        scratch: config.work_dir.join("sync"),
                    });
                }
                Err(e) => {
                    warn!(?root, error = %e, cause = ?std::error::Error::source(&e).map(|c| c.to_string()), "attached files not available");
                }
            }
        }
        if let Some(why) = copy_reason {
            let reason = format!(
                "attached files are a copy, not a mount, because {why}: {} and {} were copied \
                 before the kernel started; changes to notebook files are uploaded when the \
                 agent shuts down, and changes on the server meanwhile are not seen",
                config.notebook_dir.display(),
                config.workspace_dir.display()
            );
            warn!(%reason, "attached files copied");
            let notice = Message::OutputGap { cell: None, reason };
            if let Err(e) = sender.send(&notice, &Bytes::new()).await {
                warn!(error = %e, "cannot report the copy mode");
            }
        }
        files
    }

    async fn mount_tree(
        &self,
        config: &FilesConfig,
        root: FileRoot,
        dir: &Path,
    ) -> Result<Mounted, FilesError> {
        let dir = dir.to_owned();
        let mut fs_config = FsConfig::new(root, config.work_dir.join(root_dir_name(root)));
        fs_config.uid = config.uid;
        fs_config.gid = config.gid;
        fs_config.attr_ttl = config.ttl;
        fs_config.negative_ttl = config.ttl;
        let backing: Arc<dyn Backing> = self.backing.clone();
        let busy_poll = config.busy_poll;
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(dir_err(&dir))?;
            detach_stale(&dir).map_err(|source| FilesError::Mount {
                root,
                path: dir.clone(),
                source,
            })?;
            let fs = Fs::new(fs_config, backing, Arc::new(SystemClock))
                .map_err(|source| FilesError::Core { root, source })?;
            let mut options = MountOptions::default();
            options.fsname = format!("nbagent-{}", root_dir_name(root));
            options.busy_poll = busy_poll;
            mount(Arc::new(fs), &dir, &options).map_err(|source| FilesError::Mount {
                root,
                path: dir.clone(),
                source,
            })
        })
        .await?
    }

    async fn copy_in(
        &self,
        config: &FilesConfig,
        root: FileRoot,
        dir: &Path,
    ) -> Result<Manifest, FilesError> {
        let dir = dir.to_owned();
        let backing = self.backing.clone();
        let (uid, gid) = (config.uid, config.gid);
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(dir_err(&dir))?;
            let manifest = copy_tree(
                &*backing,
                root,
                &dir,
                nbagent_fusefs::backing::DEFAULT_MAX_ENTRIES,
                CHUNK as u32,
            )
            .map_err(|source| FilesError::Copy {
                root,
                path: dir.clone(),
                source,
            })?;
            own_copy(&dir, manifest.writable, uid, gid).map_err(dir_err(&dir))?;
            Ok(manifest)
        })
        .await?
    }

    /// Where each tree is and whether it is mounted (else copied).
    pub fn trees(&self) -> Vec<(PathBuf, bool)> {
        self.trees
            .iter()
            .map(|t| match t {
                Tree::Mounted(m) => (m.mountpoint().to_owned(), true),
                Tree::Copied { dir, .. } => (dir.clone(), false),
            })
            .collect()
    }

    /// Unmounts the mounted trees and uploads the changed files of the copied ones
    /// (through the outbox: call before draining it).
    pub async fn detach(self) {
        for tree in self.trees {
            let backing = self.backing.clone();
            let r = tokio::task::spawn_blocking(move || match tree {
                Tree::Mounted(m) => {
                    let at = m.mountpoint().display().to_string();
                    m.unmount()
                        .map(|()| format!("unmounted {at}"))
                        .map_err(|e| format!("unmount of {at} failed: {e}"))
                }
                Tree::Copied {
                    manifest,
                    dir,
                    scratch,
                } => {
                    if !manifest.writable {
                        return Ok(format!("{} is read-only; nothing to sync", dir.display()));
                    }
                    sync_back(&*backing, &manifest, &dir, &scratch)
                        .map(|r| {
                            format!(
                                "synced {}: {} uploaded, {} unchanged",
                                dir.display(),
                                r.uploaded.len(),
                                r.unchanged
                            )
                        })
                        .map_err(|e| format!("sync back of {} failed: {e}", dir.display()))
                }
            })
            .await;
            match r {
                Ok(Ok(what)) => info!("attached files: {what}"),
                Ok(Err(why)) => warn!("attached files: {why}"),
                Err(e) => warn!(error = %e, "attached files: detach task failed"),
            }
        }
    }
}

fn root_dir_name(root: FileRoot) -> &'static str {
    match root {
        FileRoot::Notebook => "notebook",
        FileRoot::Workspace => "workspace",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::outbox::{Outbox, OutboxConfig};

    const LIMITS: ServeLimits = ServeLimits {
        timeout: Duration::from_secs(2),
        max_file_size: DEFAULT_MAX_FILE_SIZE,
    };

    /// A fake server: answers listings with `entries` and reads with "not found".
    /// A [`serve`] task over `shared`, asking a fake server that lists `entries`.
    fn served(
        shared: &Arc<Shared>,
        entries: Vec<FileEntry>,
    ) -> (ChannelBacking, tokio::task::JoinHandle<()>) {
        let (queries, rx) = Queries::new(8);
        fake_server(rx, entries);
        let (backing, requests) = ChannelBacking::new(8, Duration::from_secs(5));
        let sender = Sender::new(shared.clone());
        let task = tokio::spawn(serve(requests, queries, sender, shared.clone(), LIMITS));
        (backing, task)
    }

    fn fake_server(rx: mpsc::Receiver<crate::channel::Query>, entries: Vec<FileEntry>) {
        fake_server_reading(rx, entries, None);
    }

    /// A fake server answering reads with `data` (or "not found" without it).
    fn fake_server_reading(
        mut rx: mpsc::Receiver<crate::channel::Query>,
        entries: Vec<FileEntry>,
        data: Option<Vec<u8>>,
    ) {
        tokio::spawn(async move {
            while let Some(q) = rx.recv().await {
                let msg = match q.msg {
                    Message::FileList { request, .. } => Message::FileListing {
                        request,
                        writable: true,
                        entries: entries.clone(),
                        error: None,
                    },
                    Message::FileRead { request, path, .. } => match &data {
                        Some(bytes) => {
                            let msg = Message::FileData {
                                request,
                                offset: 0,
                                eof: true,
                                error: None,
                            };
                            let mut frame = nbagent_protocol::Frame::control(msg);
                            frame.payload = Bytes::from(bytes.clone());
                            let _ = q.reply.send(frame);
                            continue;
                        }
                        None => Message::FileData {
                            request,
                            offset: 0,
                            eof: true,
                            error: Some(format!("{path} not found (version \"v\")")),
                        },
                    },
                    other => panic!("unexpected query {other:?}"),
                };
                let _ = q.reply.send(nbagent_protocol::Frame::control(msg));
            }
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uploads_go_to_the_outbox_and_show_in_listings_until_acked() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::new(
            Outbox::open(OutboxConfig::new(dir.path().join("outbox"))).unwrap(),
            false,
        );
        let on_server = FileEntry {
            path: "a.csv".into(),
            kind: FileKind::File,
            size: 1,
            mtime_ms: 0,
            version: "old".into(),
        };
        let (backing, _) = served(&shared, vec![on_server.clone()]);
        let staged = dir.path().join("staged");
        let content: Vec<u8> = (0..CHUNK + CHUNK / 2).map(|i| i as u8).collect();
        std::fs::write(&staged, &content).unwrap();
        let hash = nbagent_fusefs::backing::hash_bytes(&content);
        let b = backing.clone();
        let out = shared.clone();
        let (listed, version, listed_again, read) = tokio::task::spawn_blocking(move || {
            let listed = b.list(FileRoot::Notebook).unwrap();
            let ticket = b
                .hand_over(FileRoot::Notebook, "a.csv", "old", &staged)
                .unwrap();
            // Handed over: held in the outbox, nothing to send yet.
            assert_eq!(out.outbox().pending_count(), 0);
            let version = b.upload(ticket).unwrap();
            assert!(b.upload(ticket).is_err(), "a ticket is used once");
            let again = b.list(FileRoot::Notebook).unwrap();
            let read = b.read(FileRoot::Notebook, "gone.csv", "v", 0, 10);
            (listed, version, again, read)
        })
        .await
        .unwrap();
        assert_eq!(listed.entries, vec![on_server]);
        assert_eq!(version, hash);
        // Two chunks in the outbox, and the listing shows the upload, not the server's
        // older version, until the server acknowledges it.
        assert_eq!(shared.outbox().pending_count(), 2);
        // The chunks are sent with the file's bytes, in order.
        let frames = shared.outbox().frames_after(0, usize::MAX).unwrap();
        let mut sent = Vec::new();
        for (_, frame) in &frames {
            let mut buf = bytes::BytesMut::from(&frame[..]);
            let f = nbagent_protocol::codec::FrameDecoder::new(Default::default())
                .decode(&mut buf)
                .unwrap()
                .unwrap();
            sent.extend_from_slice(&f.payload);
        }
        assert_eq!(sent, content);
        assert_eq!(listed_again.entries.len(), 1);
        assert_eq!(listed_again.entries[0].version, version);
        assert_eq!(listed_again.entries[0].size, content.len() as u64);
        assert!(
            matches!(read, Err(BackingError::NotFound { .. })),
            "{read:?}"
        );
        shared.ack(2).unwrap();
        let b = backing.clone();
        let after_ack = tokio::task::spawn_blocking(move || b.list(FileRoot::Notebook).unwrap())
            .await
            .unwrap();
        assert_eq!(after_ack.entries[0].version, "old");
    }

    /// The `file_chunk` messages in the outbox: (path, base version, version, payload).
    /// The messages queued in the outbox after `after`, with their payloads.
    fn queued_after(shared: &Shared, after: u64) -> Vec<(Message, Bytes)> {
        let frames = shared.outbox().frames_after(after, usize::MAX).unwrap();
        frames
            .iter()
            .map(|(_, frame)| {
                let mut buf = bytes::BytesMut::from(&frame[..]);
                let f = nbagent_protocol::codec::FrameDecoder::new(Default::default())
                    .decode(&mut buf)
                    .unwrap()
                    .unwrap()
                    .parse()
                    .unwrap();
                (f.envelope.msg, f.payload)
            })
            .collect()
    }

    fn queued_chunks(shared: &Shared) -> Vec<(String, String, String, Bytes)> {
        queued_after(shared, 0)
            .into_iter()
            .map(|(msg, payload)| match msg {
                Message::FileChunk {
                    path,
                    base_version,
                    version,
                    ..
                } => (path, base_version, version, payload),
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    /// An agent with its outbox in `dir/outbox` hands `d/out.txt` (changed) and
    /// `same.txt` (unchanged) over and dies before their release; their staging copies
    /// go with it. Returns the outbox directory.
    async fn crash_after_two_hand_overs(dir: &Path) -> PathBuf {
        let outbox_dir = dir.join("outbox");
        let staged = dir.join("staged");
        std::fs::write(&staged, b"written before the crash").unwrap();
        let unchanged = dir.join("unchanged");
        std::fs::write(&unchanged, b"same").unwrap();
        {
            let shared = Shared::new(Outbox::open(OutboxConfig::new(&outbox_dir)).unwrap(), false);
            let (backing, serving) = served(&shared, vec![]);
            let (s, u) = (staged.clone(), unchanged.clone());
            tokio::task::spawn_blocking(move || {
                backing
                    .hand_over(FileRoot::Notebook, "d/out.txt", "v0", &s)
                    .unwrap();
                let same = nbagent_fusefs::backing::hash_bytes(b"same");
                backing
                    .hand_over(FileRoot::Notebook, "same.txt", &same, &u)
                    .unwrap();
                // The workspace is read-only.
                assert!(matches!(
                    backing.hand_over(FileRoot::Workspace, "w.txt", "", &u),
                    Err(BackingError::ReadOnly)
                ));
            })
            .await
            .unwrap();
            // The agent dies before the release: nothing queued yet. (The backing is
            // gone, so `serve` ends once its answers are done and lets go of the outbox.)
            serving.await.unwrap();
            assert_eq!(shared.outbox().pending_count(), 0);
        }
        // The staging copies are gone with the old agent's work directory.
        std::fs::remove_file(&staged).unwrap();
        std::fs::remove_file(&unchanged).unwrap();
        outbox_dir
    }

    /// The changed file of [`crash_after_two_hand_overs`] is queued once, the unchanged
    /// one not at all, and nothing is held any more; returns the version queued.
    fn assert_uploaded_once(shared: &Shared, outbox_dir: &Path) -> String {
        let version = nbagent_fusefs::backing::hash_bytes(b"written before the crash");
        assert_eq!(
            queued_chunks(shared),
            vec![(
                "d/out.txt".to_owned(),
                "v0".to_owned(),
                version.clone(),
                Bytes::from_static(b"written before the crash")
            )],
            "the changed file is queued once, the unchanged one not at all"
        );
        let held: Vec<_> = std::fs::read_dir(outbox_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("att-held-"))
            .collect();
        assert!(held.is_empty(), "{held:?}");
        version
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_handed_over_before_a_crash_is_uploaded_after_the_restart() {
        let dir = tempfile::tempdir().unwrap();
        let outbox_dir = crash_after_two_hand_overs(dir.path()).await;
        let shared = Shared::new(Outbox::open(OutboxConfig::new(&outbox_dir)).unwrap(), false);
        let (backing, _) = served(&shared, vec![]);
        // The first listing is answered after the recovery, and shows the upload.
        let listed = tokio::task::spawn_blocking(move || backing.list(FileRoot::Notebook))
            .await
            .unwrap()
            .unwrap();
        let version = assert_uploaded_once(&shared, &outbox_dir);
        assert!(
            listed
                .entries
                .iter()
                .any(|e| e.path == "d/out.txt" && e.version == version),
            "{listed:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_refused_for_a_full_outbox_is_never_queued_later() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = OutboxConfig::new(dir.path().join("outbox"));
        config.max_bytes = 4_000;
        let shared = Shared::new(Outbox::open(config).unwrap(), false);
        // Something the server has not acknowledged fills the outbox.
        let filler = Message::FileMkdir {
            root: FileRoot::Notebook,
            path: "filler".into(),
        };
        let seq = shared.outbox().append(&filler, &[0u8; 3_900]).unwrap();
        let (backing, _serving) = served(&shared, vec![]);
        let staged = dir.path().join("staged");
        std::fs::write(&staged, b"new bytes").unwrap();
        let b = backing.clone();
        let (mkdir, upload) = tokio::task::spawn_blocking(move || {
            let ticket = b
                .hand_over(FileRoot::Notebook, "f.txt", "v0", &staged)
                .unwrap();
            (b.mkdir(FileRoot::Notebook, "d"), b.upload(ticket))
        })
        .await
        .unwrap();
        // Refused after the serving side's wait, not the caller's timeout.
        for (what, refused) in [("mkdir", mkdir.err()), ("upload", upload.err())] {
            assert!(
                matches!(&refused, Some(BackingError::Remote { reason, .. }) if reason.contains("outbox stayed full")),
                "{what}: {refused:?}"
            );
        }
        // Room again: what was refused does not come after all; a new change goes in.
        shared.ack(seq).unwrap();
        let b = backing.clone();
        tokio::task::spawn_blocking(move || b.mkdir(FileRoot::Notebook, "e"))
            .await
            .unwrap()
            .unwrap();
        let queued: Vec<Message> = queued_after(&shared, seq)
            .into_iter()
            .map(|(msg, _)| msg)
            .collect();
        assert_eq!(
            queued,
            [Message::FileMkdir {
                root: FileRoot::Notebook,
                path: "e".into()
            }]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_handed_over_before_a_crash_is_uploaded_with_the_attached_files_off() {
        let dir = tempfile::tempdir().unwrap();
        let outbox_dir = crash_after_two_hand_overs(dir.path()).await;
        let shared = Shared::new(Outbox::open(OutboxConfig::new(&outbox_dir)).unwrap(), false);
        upload_held(&Sender::new(shared.clone()), &shared).await;
        assert_uploaded_once(&shared, &outbox_dir);
    }

    fn entry(path: &str, kind: FileKind, version: &str) -> FileEntry {
        FileEntry {
            path: path.into(),
            kind,
            size: 0,
            mtime_ms: 0,
            version: version.into(),
        }
    }

    fn paths(listing: &Listing) -> Vec<String> {
        listing
            .entries
            .iter()
            .map(|e| {
                format!(
                    "{}{}",
                    e.path,
                    if e.kind == FileKind::Dir { "/" } else { "" }
                )
            })
            .collect()
    }

    #[test]
    fn pending_changes_overlay_listings_until_acked() {
        let server = vec![
            entry("a.csv", FileKind::File, "va"),
            entry("old", FileKind::Dir, ""),
            entry("old/x", FileKind::File, "vx"),
        ];
        let root = FileRoot::Notebook;
        let mut p = Pending::default();
        let mut l = Listing {
            writable: true,
            entries: server.clone(),
        };
        p.overlay(root, &mut l, 0);
        assert_eq!(p.version_of(root, "a.csv"), "va");
        assert_eq!(p.version_of(root, "old"), "", "directories have no version");
        p.record(1, root, Change::Put(entry("new", FileKind::Dir, "")));
        p.record(2, root, Change::Put(entry("new/f", FileKind::File, "vf")));
        p.record(
            3,
            root,
            Change::Rename {
                from: "old".into(),
                to: "new/moved".into(),
            },
        );
        p.record(4, root, Change::Remove("a.csv".into()));
        p.record(
            5,
            root,
            Change::Rename {
                from: "gone".into(),
                to: "b".into(),
            },
        );
        assert_eq!(
            p.version_of(root, "new/moved/x"),
            "vx",
            "renames move versions"
        );
        assert_eq!(p.version_of(root, "a.csv"), "");
        let expected = ["new/", "new/f", "new/moved/", "new/moved/x"];
        // The server has none of it yet.
        let mut l = Listing {
            writable: true,
            entries: server.clone(),
        };
        p.overlay(root, &mut l, 0);
        assert_eq!(paths(&l), expected);
        // The workspace tree is not affected.
        let mut w = Listing {
            writable: false,
            entries: server.clone(),
        };
        p.overlay(FileRoot::Workspace, &mut w, 0);
        assert_eq!(w.entries, server);
        // The server stored the first three (its listing shows them) before it was
        // asked: they are forgotten, the rest still applies.
        let mut l = Listing {
            writable: true,
            entries: vec![
                entry("a.csv", FileKind::File, "va"),
                entry("new", FileKind::Dir, ""),
                entry("new/f", FileKind::File, "vf"),
                entry("new/moved", FileKind::Dir, ""),
                entry("new/moved/x", FileKind::File, "vx"),
            ],
        };
        p.overlay(root, &mut l, 3);
        assert_eq!(paths(&l), expected);
        assert_eq!(p.changes.len(), 2);
        // All stored: the server's listing is shown as it is.
        let mut l = Listing {
            writable: true,
            entries: vec![entry("z", FileKind::File, "vz")],
        };
        p.overlay(root, &mut l, 5);
        assert_eq!(paths(&l), ["z"]);
        assert!(p.changes.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn namespace_changes_go_to_the_outbox_with_the_versions_seen() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::new(
            Outbox::open(OutboxConfig::new(dir.path().join("outbox"))).unwrap(),
            false,
        );
        let (backing, _) = served(
            &shared,
            vec![
                entry("a.csv", FileKind::File, "va"),
                entry("b.csv", FileKind::File, "vb"),
            ],
        );
        let last = |shared: &Shared| {
            let (seq, raw) = shared.outbox().last().unwrap().unwrap();
            (seq, raw.parse().unwrap().envelope.msg)
        };
        let nb = FileRoot::Notebook;
        let b = backing.clone();
        let s = shared.clone();
        let (msgs, relisted, workspace) = tokio::task::spawn_blocking(move || {
            b.list(nb).unwrap();
            let mut msgs = Vec::new();
            b.mkdir(nb, "d").unwrap();
            msgs.push(last(&s));
            b.rename(nb, "a.csv", "b.csv").unwrap();
            msgs.push(last(&s));
            b.remove(nb, "b.csv", FileKind::File).unwrap();
            msgs.push(last(&s));
            b.remove(nb, "d", FileKind::Dir).unwrap();
            msgs.push(last(&s));
            let relisted = b.list(nb).unwrap();
            let workspace = b.mkdir(FileRoot::Workspace, "w");
            (msgs, relisted, workspace)
        })
        .await
        .unwrap();
        assert_eq!(
            msgs,
            vec![
                (
                    1,
                    Message::FileMkdir {
                        root: nb,
                        path: "d".into()
                    }
                ),
                (
                    2,
                    Message::FileRename {
                        root: nb,
                        from: "a.csv".into(),
                        to: "b.csv".into(),
                        base_version: "va".into(),
                        replaced_version: "vb".into(),
                    }
                ),
                (
                    3,
                    Message::FileRemove {
                        root: nb,
                        path: "b.csv".into(),
                        kind: FileKind::File,
                        base_version: "va".into(),
                    }
                ),
                (
                    4,
                    Message::FileRemove {
                        root: nb,
                        path: "d".into(),
                        kind: FileKind::Dir,
                        base_version: String::new(),
                    }
                ),
            ]
        );
        // Until acknowledged, the server's (stale) listing does not bring them back.
        assert!(relisted.entries.is_empty(), "{:?}", relisted.entries);
        assert!(
            matches!(workspace, Err(BackingError::ReadOnly)),
            "{workspace:?}"
        );
        assert_eq!(shared.outbox().pending_count(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sizes_and_read_replies_beyond_the_limits_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared::new(
            Outbox::open(OutboxConfig::new(dir.path().join("outbox"))).unwrap(),
            false,
        );
        for (size, listed) in [(1000, true), (1001, false)] {
            let (queries, rx) = Queries::new(8);
            let mut big = entry("big.bin", FileKind::File, "v");
            big.size = size;
            fake_server_reading(rx, vec![big], Some(vec![7u8; 10]));
            let (backing, requests) = ChannelBacking::new(8, Duration::from_secs(5));
            let limits = ServeLimits {
                timeout: Duration::from_secs(2),
                max_file_size: 1000,
            };
            tokio::spawn(serve(
                requests,
                queries,
                Sender::new(shared.clone()),
                shared.clone(),
                limits,
            ));
            let (list, short, exact) = tokio::task::spawn_blocking(move || {
                (
                    backing.list(FileRoot::Notebook),
                    backing.read(FileRoot::Notebook, "big.bin", "v", 0, 4),
                    backing.read(FileRoot::Notebook, "big.bin", "v", 0, 10),
                )
            })
            .await
            .unwrap();
            match list {
                Ok(l) => assert!(listed && l.entries.len() == 1),
                Err(e) => {
                    assert!(!listed);
                    let FsErrorLike(errno, text) = fs_error(e);
                    assert_eq!(errno, nix::libc::EIO);
                    assert!(
                        text.contains("1001 bytes, more than the 1000 accepted"),
                        "{text}"
                    );
                }
            }
            // Ten bytes answered to a read of four: refused, not trusted.
            let FsErrorLike(errno, text) = fs_error(short.unwrap_err());
            assert_eq!(errno, nix::libc::EIO);
            assert!(text.contains("answered 10 bytes to a read of 4"), "{text}");
            assert_eq!(exact.unwrap(), vec![7u8; 10]);
        }
    }

    struct FsErrorLike(i32, String);

    /// The errno the kernel would see for a backing error, and its text.
    fn fs_error(e: BackingError) -> FsErrorLike {
        let text = e.to_string();
        FsErrorLike(nbagent_fusefs::FsError::Backing(e).errno(), text)
    }
}
