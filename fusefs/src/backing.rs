//! The backing store the core reads through and writes back to.
//!
//! [`Backing`] is a blocking trait: FUSE worker threads call it directly. Two
//! implementations live here:
//!
//! - [`LocalDir`]: trees that are plain local directories (development and tests).
//! - [`ChannelBacking`]: each call becomes a [`BackingRequest`] on a bounded tokio channel
//!   whose receiver an async task owns (the agent's session with the server). For a
//!   listing or a read, which need the server, the calling thread waits for the answer
//!   for at most a timeout, after which the call fails with [`BackingError::Timeout`]
//!   (EIO to the kernel) and the reason is logged. A change (hand-over, upload, mkdir,
//!   remove, rename) is local: its answer comes once the agent's outbox has it or has
//!   refused it (the answering task bounds its own wait for room in the outbox; an
//!   upload's hashing takes as long as the file needs), and the caller waits for that
//!   answer, so a change never lands after its caller was told it failed.
//!
//! Whatever the implementation, listings are checked by [`validate_listing`] before the
//! core believes them.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use nbagent_protocol::{FileEntry, FileKind, FileRoot};
use nix::libc;
use sha2::{Digest, Sha256};

use crate::error::{BackingError, ListingError};
use crate::path::split_path;

/// Default bound on the entries of one listing.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// Longest version string believed from a listing.
pub const MAX_VERSION_LEN: usize = 256;
/// Prefix of the temporary files [`LocalDir`] writes uploads to.
const UPLOAD_PREFIX: &str = ".nbagent-upload-";
/// Distinguishes concurrent uploads of one process.
static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A listing of one tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Whether the kernel may write the tree.
    pub writable: bool,
    /// Files and directories, paths relative to the tree root.
    pub entries: Vec<FileEntry>,
}

/// A file handed over for upload ([`Backing::hand_over`]), not yet uploaded.
pub type Ticket = u64;

/// [`Backing::hand_over`] and [`Backing::upload`] at once; returns the version.
pub fn upload_now(
    backing: &dyn Backing,
    root: FileRoot,
    path: &str,
    base_version: &str,
    staged: &Path,
) -> Result<String, BackingError> {
    let ticket = backing.hand_over(root, path, base_version, staged)?;
    backing.upload(ticket)
}

/// Where the files come from. All calls block; see the module documentation.
pub trait Backing: Send + Sync + fmt::Debug {
    /// Lists a whole tree.
    fn list(&self, root: FileRoot) -> Result<Listing, BackingError>;
    /// Reads up to `len` bytes at `offset` of `path` at `version`; fewer at the end of file.
    fn read(
        &self,
        root: FileRoot,
        path: &str,
        version: &str,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, BackingError>;
    /// First half of an upload: `path` is to be replaced (or created) with the content
    /// of the local file `staged`; `base_version` is the version the writer started
    /// from, empty for a new file. Cheap: it does not read the file (the agent links
    /// it into its outbox with a note, so that it survives a crash of the agent). The
    /// core does not change `staged` afterwards, so an implementation may keep a link
    /// to it instead of a copy. Returns the ticket for [`Backing::upload`].
    fn hand_over(
        &self,
        root: FileRoot,
        path: &str,
        base_version: &str,
        staged: &Path,
    ) -> Result<Ticket, BackingError>;
    /// Second half: computes the version of a handed-over file (the SHA-256 of its
    /// content, hex) and queues or stores it, unless it equals its `base_version`
    /// (nothing changed: nothing is sent); returns the version. The ticket is used up
    /// whatever the result. The core removes `staged` (or keeps it as cached content)
    /// once the call returns.
    fn upload(&self, ticket: Ticket) -> Result<String, BackingError>;
    /// Creates a directory.
    fn mkdir(&self, root: FileRoot, path: &str) -> Result<(), BackingError>;
    /// Removes a file or an empty directory.
    fn remove(&self, root: FileRoot, path: &str, kind: FileKind) -> Result<(), BackingError>;
    /// Renames, replacing the target if it exists (the core has checked the rules).
    fn rename(&self, root: FileRoot, from: &str, to: &str) -> Result<(), BackingError>;
}

/// Checks a listing: at most `max_entries` entries, every path relative and made of valid
/// names, no duplicates, nothing below a file, file versions of sane length.
pub fn validate_listing(listing: &Listing, max_entries: usize) -> Result<(), ListingError> {
    if listing.entries.len() > max_entries {
        return Err(ListingError::TooManyEntries {
            count: listing.entries.len(),
            limit: max_entries,
        });
    }
    let mut kinds: HashMap<&str, FileKind> = HashMap::with_capacity(listing.entries.len());
    for entry in &listing.entries {
        split_path(&entry.path).map_err(|reason| ListingError::InvalidPath {
            path: entry.path.clone(),
            reason,
        })?;
        if entry.kind == FileKind::File
            && (entry.version.is_empty() || entry.version.len() > MAX_VERSION_LEN)
        {
            return Err(ListingError::InvalidVersion {
                path: entry.path.clone(),
            });
        }
        if kinds.insert(&entry.path, entry.kind).is_some() {
            return Err(ListingError::Duplicate {
                path: entry.path.clone(),
            });
        }
    }
    for entry in &listing.entries {
        let mut end = 0;
        while let Some(i) = entry.path[end..].find('/') {
            let prefix = &entry.path[..end + i];
            if kinds.get(prefix) == Some(&FileKind::File) {
                return Err(ListingError::ParentIsFile {
                    path: entry.path.clone(),
                });
            }
            end += i + 1;
        }
    }
    Ok(())
}

/// SHA-256 of a file's content, hex.
pub fn hash_file(file: &mut File) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Copies `src` to `dst` (created, must not exist) and returns the SHA-256 (hex) of
/// the bytes copied.
pub fn copy_hashing(src: &Path, dst: &Path) -> io::Result<String> {
    copy_file_hashing(&mut File::open(src)?, dst)
}

/// [`copy_hashing`] from an open file (read from its current position).
pub fn copy_file_hashing(from: &mut File, dst: &Path) -> io::Result<String> {
    let mut to = OpenOptions::new().write(true).create_new(true).open(dst)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])?;
    }
}

/// SHA-256 of bytes, hex.
pub fn hash_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[derive(Debug, Clone)]
struct LocalTree {
    dir: PathBuf,
    writable: bool,
}

/// Identity of a file's content as far as metadata tells (for the hash cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Self {
        Stamp {
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// Trees that are local directories. Versions are the SHA-256 of the content, cached by
/// (inode, size, mtime). Symlinks and special files in the directories are skipped.
#[derive(Debug)]
pub struct LocalDir {
    trees: HashMap<FileRoot, LocalTree>,
    hashes: Mutex<HashMap<PathBuf, (Stamp, String)>>,
    /// Files handed over and not uploaded yet: ticket -> (root, path, base, staged).
    handed: Mutex<HashMap<Ticket, (FileRoot, String, String, PathBuf)>>,
    max_entries: usize,
}

impl Default for LocalDir {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalDir {
    /// A backing with no trees.
    pub fn new() -> Self {
        LocalDir {
            trees: HashMap::new(),
            hashes: Mutex::new(HashMap::new()),
            handed: Mutex::new(HashMap::new()),
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }

    /// Serves `root` from `dir`.
    pub fn with_tree(mut self, root: FileRoot, dir: impl Into<PathBuf>, writable: bool) -> Self {
        self.trees.insert(
            root,
            LocalTree {
                dir: dir.into(),
                writable,
            },
        );
        self
    }

    /// Stops walking a tree after this many entries (the listing is then refused).
    pub fn with_max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries;
        self
    }

    fn tree(&self, root: FileRoot) -> Result<&LocalTree, BackingError> {
        self.trees.get(&root).ok_or(BackingError::NoSuchTree(root))
    }

    fn writable_tree(&self, root: FileRoot) -> Result<&LocalTree, BackingError> {
        let tree = self.tree(root)?;
        if !tree.writable {
            return Err(BackingError::ReadOnly);
        }
        Ok(tree)
    }

    fn resolve(tree: &LocalTree, path: &str) -> Result<PathBuf, BackingError> {
        let parts = split_path(path).map_err(|reason| {
            BackingError::Listing(ListingError::InvalidPath {
                path: path.to_owned(),
                reason,
            })
        })?;
        let mut full = tree.dir.clone();
        full.extend(parts);
        Ok(full)
    }

    fn version_of(&self, full: &Path, file: &mut File, rel: &str) -> Result<String, BackingError> {
        let io_err = |source| BackingError::Io {
            path: rel.to_owned(),
            source,
        };
        let meta = file.metadata().map_err(io_err)?;
        let stamp = Stamp::of(&meta);
        if let Ok(hashes) = self.hashes.lock()
            && let Some((s, h)) = hashes.get(full)
            && *s == stamp
        {
            return Ok(h.clone());
        }
        let hash = hash_file(file).map_err(io_err)?;
        if let Ok(mut hashes) = self.hashes.lock() {
            hashes.insert(full.to_owned(), (stamp, hash.clone()));
        }
        Ok(hash)
    }

    fn walk(&self, dir: &Path, rel: &str, out: &mut Vec<FileEntry>) -> Result<(), BackingError> {
        let io_err = |source| BackingError::Io {
            path: rel.to_owned(),
            source,
        };
        let mut children: Vec<_> = fs::read_dir(dir)
            .map_err(io_err)?
            .collect::<Result<_, _>>()
            .map_err(io_err)?;
        children.sort_by_key(|c| c.file_name());
        for child in children {
            let Some(name) = child.file_name().to_str().map(str::to_owned) else {
                tracing::warn!(dir = %dir.display(), "skipping a name that is not utf-8");
                continue;
            };
            if name.starts_with(UPLOAD_PREFIX) {
                continue;
            }
            let child_rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if out.len() >= self.max_entries {
                return Err(BackingError::Listing(ListingError::TooManyEntries {
                    count: out.len() + 1,
                    limit: self.max_entries,
                }));
            }
            let meta = child.metadata().map_err(io_err)?;
            let mtime_ms = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            if meta.is_dir() {
                out.push(FileEntry {
                    path: child_rel.clone(),
                    kind: FileKind::Dir,
                    size: 0,
                    mtime_ms,
                    version: String::new(),
                });
                self.walk(&child.path(), &child_rel, out)?;
            } else if meta.is_file() {
                let full = child.path();
                let mut file = File::open(&full).map_err(|source| BackingError::Io {
                    path: child_rel.clone(),
                    source,
                })?;
                let version = self.version_of(&full, &mut file, &child_rel)?;
                out.push(FileEntry {
                    path: child_rel,
                    kind: FileKind::File,
                    size: meta.len(),
                    mtime_ms,
                    version,
                });
            } else {
                tracing::debug!(path = %child_rel, "skipping a symlink or special file");
            }
        }
        Ok(())
    }
}

fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

impl Backing for LocalDir {
    fn list(&self, root: FileRoot) -> Result<Listing, BackingError> {
        let tree = self.tree(root)?;
        let mut entries = Vec::new();
        self.walk(&tree.dir, "", &mut entries)?;
        Ok(Listing {
            writable: tree.writable,
            entries,
        })
    }

    fn read(
        &self,
        root: FileRoot,
        path: &str,
        version: &str,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, BackingError> {
        let tree = self.tree(root)?;
        let full = Self::resolve(tree, path)?;
        let not_found = || BackingError::NotFound {
            path: path.to_owned(),
            version: version.to_owned(),
        };
        let mut file = match open_nofollow(&full) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
            Err(source) => {
                return Err(BackingError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        if self.version_of(&full, &mut file, path)? != version {
            return Err(not_found());
        }
        let mut buf = vec![0u8; len as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = file
                .read_at(&mut buf[done..], offset + done as u64)
                .map_err(|source| BackingError::Io {
                    path: path.to_owned(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(Bytes::from(buf))
    }

    fn hand_over(
        &self,
        root: FileRoot,
        path: &str,
        base_version: &str,
        staged: &Path,
    ) -> Result<Ticket, BackingError> {
        let tree = self.writable_tree(root)?;
        Self::resolve(tree, path)?;
        let ticket = UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = (
            root,
            path.to_owned(),
            base_version.to_owned(),
            staged.to_owned(),
        );
        self.handed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ticket, entry);
        Ok(ticket)
    }

    fn upload(&self, ticket: Ticket) -> Result<String, BackingError> {
        let handed = self
            .handed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ticket);
        let Some((root, path, base_version, staged)) = handed else {
            return Err(BackingError::Remote {
                op: "upload",
                reason: format!("no file handed over with ticket {ticket}"),
            });
        };
        let (path, base_version, staged) = (path.as_str(), base_version.as_str(), &staged);
        // The version returned is the hash of the bytes copied, what is stored.
        let tree = self.writable_tree(root)?;
        let full = Self::resolve(tree, path)?;
        let io_err = |source| BackingError::Io {
            path: path.to_owned(),
            source,
        };
        if !base_version.is_empty()
            && let Ok(mut current) = open_nofollow(&full)
            && self.version_of(&full, &mut current, path)? != base_version
        {
            return Err(BackingError::Conflict {
                path: path.to_owned(),
                base_version: base_version.to_owned(),
            });
        }
        let parent = full
            .parent()
            .ok_or_else(|| io_err(io::Error::new(io::ErrorKind::InvalidInput, "no parent")))?;
        let n = UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = parent.join(format!("{UPLOAD_PREFIX}{}-{n}", std::process::id()));
        match copy_hashing(staged, &tmp).and_then(|v| fs::rename(&tmp, &full).map(|()| v)) {
            Ok(v) => Ok(v),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(io_err(e))
            }
        }
    }

    fn mkdir(&self, root: FileRoot, path: &str) -> Result<(), BackingError> {
        let tree = self.writable_tree(root)?;
        let full = Self::resolve(tree, path)?;
        fs::create_dir(full).map_err(|source| BackingError::Io {
            path: path.to_owned(),
            source,
        })
    }

    fn remove(&self, root: FileRoot, path: &str, kind: FileKind) -> Result<(), BackingError> {
        let tree = self.writable_tree(root)?;
        let full = Self::resolve(tree, path)?;
        match kind {
            FileKind::File => fs::remove_file(full),
            FileKind::Dir => fs::remove_dir(full),
        }
        .map_err(|source| BackingError::Io {
            path: path.to_owned(),
            source,
        })
    }

    fn rename(&self, root: FileRoot, from: &str, to: &str) -> Result<(), BackingError> {
        let tree = self.writable_tree(root)?;
        let src = Self::resolve(tree, from)?;
        let dst = Self::resolve(tree, to)?;
        fs::rename(src, dst).map_err(|source| BackingError::Io {
            path: from.to_owned(),
            source,
        })
    }
}

/// Where the answer to a [`BackingRequest`] goes. Sending never blocks.
pub struct Reply<T>(mpsc::SyncSender<Result<T, BackingError>>);

impl<T> Reply<T> {
    /// Answers the request. If the caller gave up (timeout), the answer is dropped.
    pub fn send(self, result: Result<T, BackingError>) {
        let _ = self.0.try_send(result);
    }
}

impl<T> fmt::Debug for Reply<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reply")
    }
}

/// One call of [`ChannelBacking`], for the async side to answer.
#[derive(Debug)]
#[non_exhaustive]
pub enum BackingRequest {
    /// [`Backing::list`].
    List {
        /// Which tree.
        root: FileRoot,
        /// Answer.
        reply: Reply<Listing>,
    },
    /// [`Backing::read`].
    Read {
        /// Which tree.
        root: FileRoot,
        /// Path.
        path: String,
        /// Version.
        version: String,
        /// First byte.
        offset: u64,
        /// Bytes wanted.
        len: u32,
        /// Answer.
        reply: Reply<Bytes>,
    },
    /// [`Backing::hand_over`].
    HandOver {
        /// Which tree.
        root: FileRoot,
        /// Path.
        path: String,
        /// Version the writer started from.
        base_version: String,
        /// Local file with the new content; stays valid (and unchanged) until the
        /// [`BackingRequest::Upload`] of the ticket is answered.
        staged: PathBuf,
        /// Answer: the ticket.
        reply: Reply<Ticket>,
    },
    /// [`Backing::upload`].
    Upload {
        /// From the [`BackingRequest::HandOver`].
        ticket: Ticket,
        /// Answer: the new version.
        reply: Reply<String>,
    },
    /// [`Backing::mkdir`].
    Mkdir {
        /// Which tree.
        root: FileRoot,
        /// Path.
        path: String,
        /// Answer.
        reply: Reply<()>,
    },
    /// [`Backing::remove`].
    Remove {
        /// Which tree.
        root: FileRoot,
        /// Path.
        path: String,
        /// File or directory.
        kind: FileKind,
        /// Answer.
        reply: Reply<()>,
    },
    /// [`Backing::rename`].
    Rename {
        /// Which tree.
        root: FileRoot,
        /// Old path.
        from: String,
        /// New path.
        to: String,
        /// Answer.
        reply: Reply<()>,
    },
}

impl BackingRequest {
    /// Answers this request by calling `backing` (blocking): for serving a channel from a
    /// thread, or from `spawn_blocking`.
    pub fn answer_with(self, backing: &dyn Backing) {
        match self {
            BackingRequest::List { root, reply } => reply.send(backing.list(root)),
            BackingRequest::Read {
                root,
                path,
                version,
                offset,
                len,
                reply,
            } => reply.send(backing.read(root, &path, &version, offset, len)),
            BackingRequest::HandOver {
                root,
                path,
                base_version,
                staged,
                reply,
            } => reply.send(backing.hand_over(root, &path, &base_version, &staged)),
            BackingRequest::Upload { ticket, reply } => reply.send(backing.upload(ticket)),
            BackingRequest::Mkdir { root, path, reply } => reply.send(backing.mkdir(root, &path)),
            BackingRequest::Remove {
                root,
                path,
                kind,
                reply,
            } => reply.send(backing.remove(root, &path, kind)),
            BackingRequest::Rename {
                root,
                from,
                to,
                reply,
            } => reply.send(backing.rename(root, &from, &to)),
        }
    }
}

/// A backing whose calls are answered by an async task through a channel; see the module
/// documentation.
#[derive(Debug, Clone)]
pub struct ChannelBacking {
    tx: tokio::sync::mpsc::Sender<BackingRequest>,
    timeout: Duration,
}

impl ChannelBacking {
    /// A backing with a queue of `capacity` requests; a listing or a read waits at most
    /// `timeout` for its answer, a change until it is answered (see the module
    /// documentation).
    pub fn new(
        capacity: usize,
        timeout: Duration,
    ) -> (Self, tokio::sync::mpsc::Receiver<BackingRequest>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        (ChannelBacking { tx, timeout }, rx)
    }

    /// Sends a request and waits for its answer: at most the timeout if `bounded`.
    fn call<T>(
        &self,
        op: &'static str,
        bounded: bool,
        make: impl FnOnce(Reply<T>) -> BackingRequest,
    ) -> Result<T, BackingError> {
        use tokio::sync::mpsc::error::TrySendError;
        let (rtx, rrx) = mpsc::sync_channel(1);
        match self.tx.try_send(make(Reply(rtx))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::warn!(op, "backing request queue is full");
                return Err(BackingError::QueueFull);
            }
            Err(TrySendError::Closed(_)) => return Err(BackingError::Disconnected { op }),
        }
        if !bounded {
            return rrx.recv().unwrap_or_else(|_| {
                tracing::warn!(op, "backing dropped the request unanswered");
                Err(BackingError::Disconnected { op })
            });
        }
        match rrx.recv_timeout(self.timeout) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(op, timeout = ?self.timeout, "backing did not answer in time");
                Err(BackingError::Timeout {
                    op,
                    after: self.timeout,
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                tracing::warn!(op, "backing dropped the request unanswered");
                Err(BackingError::Disconnected { op })
            }
        }
    }
}

impl Backing for ChannelBacking {
    fn list(&self, root: FileRoot) -> Result<Listing, BackingError> {
        self.call("list", true, |reply| BackingRequest::List { root, reply })
    }

    fn read(
        &self,
        root: FileRoot,
        path: &str,
        version: &str,
        offset: u64,
        len: u32,
    ) -> Result<Bytes, BackingError> {
        self.call("read", true, |reply| BackingRequest::Read {
            root,
            path: path.to_owned(),
            version: version.to_owned(),
            offset,
            len,
            reply,
        })
    }

    fn hand_over(
        &self,
        root: FileRoot,
        path: &str,
        base_version: &str,
        staged: &Path,
    ) -> Result<Ticket, BackingError> {
        self.call("hand over", false, |reply| BackingRequest::HandOver {
            root,
            path: path.to_owned(),
            base_version: base_version.to_owned(),
            staged: staged.to_owned(),
            reply,
        })
    }

    fn upload(&self, ticket: Ticket) -> Result<String, BackingError> {
        self.call("upload", false, |reply| BackingRequest::Upload {
            ticket,
            reply,
        })
    }

    fn mkdir(&self, root: FileRoot, path: &str) -> Result<(), BackingError> {
        self.call("mkdir", false, |reply| BackingRequest::Mkdir {
            root,
            path: path.to_owned(),
            reply,
        })
    }

    fn remove(&self, root: FileRoot, path: &str, kind: FileKind) -> Result<(), BackingError> {
        self.call("remove", false, |reply| BackingRequest::Remove {
            root,
            path: path.to_owned(),
            kind,
            reply,
        })
    }

    fn rename(&self, root: FileRoot, from: &str, to: &str) -> Result<(), BackingError> {
        self.call("rename", false, |reply| BackingRequest::Rename {
            root,
            from: from.to_owned(),
            to: to.to_owned(),
            reply,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: FileKind) -> FileEntry {
        FileEntry {
            path: path.to_owned(),
            kind,
            size: 0,
            mtime_ms: 0,
            version: if kind == FileKind::File {
                "v".to_owned()
            } else {
                String::new()
            },
        }
    }

    fn listing(entries: Vec<FileEntry>) -> Listing {
        Listing {
            writable: true,
            entries,
        }
    }

    #[test]
    fn listing_refuses_traversal_and_absolute_paths() {
        for bad in ["../x", "/etc/passwd", "a/../../x", "a//b", ".", "a/\0"] {
            let err = validate_listing(&listing(vec![entry(bad, FileKind::File)]), 10);
            assert!(
                matches!(err, Err(ListingError::InvalidPath { .. })),
                "{bad:?}: {err:?}"
            );
            assert!(err.unwrap_err().to_string().contains("is invalid"));
        }
    }

    #[test]
    fn listing_refuses_too_many_entries() {
        let entries = (0..11).map(|i| entry(&format!("f{i}"), FileKind::File));
        let err = validate_listing(&listing(entries.collect()), 10).unwrap_err();
        assert_eq!(
            err,
            ListingError::TooManyEntries {
                count: 11,
                limit: 10
            }
        );
        assert_eq!(
            err.to_string(),
            "listing has 11 entries, more than the limit of 10"
        );
    }

    #[test]
    fn listing_refuses_duplicates_and_children_of_files() {
        let dup = vec![entry("a", FileKind::File), entry("a", FileKind::Dir)];
        assert!(matches!(
            validate_listing(&listing(dup), 10),
            Err(ListingError::Duplicate { .. })
        ));
        let below = vec![entry("a", FileKind::File), entry("a/b", FileKind::File)];
        assert!(matches!(
            validate_listing(&listing(below), 10),
            Err(ListingError::ParentIsFile { .. })
        ));
        let ok = vec![entry("a", FileKind::Dir), entry("a/b/c", FileKind::File)];
        assert_eq!(validate_listing(&listing(ok), 10), Ok(()));
    }

    #[test]
    fn local_dir_lists_reads_and_uploads() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/a.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let b = LocalDir::new().with_tree(FileRoot::Notebook, dir.path(), true);
        let l = b.list(FileRoot::Notebook).unwrap();
        let paths: Vec<_> = l.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["sub", "sub/a.txt"]);
        let v = l.entries[1].version.clone();
        assert_eq!(v, hash_bytes(b"hello"));
        assert_eq!(
            b.read(FileRoot::Notebook, "sub/a.txt", &v, 1, 3).unwrap(),
            &b"ell"[..]
        );
        assert!(matches!(
            b.read(FileRoot::Notebook, "sub/a.txt", "other", 0, 3),
            Err(BackingError::NotFound { .. })
        ));
        assert!(b.read(FileRoot::Notebook, "../x", &v, 0, 3).is_err());
        let staged = dir.path().join("staged");
        fs::write(&staged, b"new").unwrap();
        let nv = upload_now(&b, FileRoot::Notebook, "sub/a.txt", &v, &staged).unwrap();
        assert_eq!(nv, hash_bytes(b"new"));
        assert_eq!(fs::read(dir.path().join("sub/a.txt")).unwrap(), b"new");
        assert!(matches!(
            upload_now(&b, FileRoot::Notebook, "sub/a.txt", &v, &staged),
            Err(BackingError::Conflict { .. })
        ));
        // A ticket is used once.
        let t = b
            .hand_over(FileRoot::Notebook, "sub/a.txt", &nv, &staged)
            .unwrap();
        assert_eq!(b.upload(t).unwrap(), nv);
        assert!(b.upload(t).is_err());
        let small = LocalDir::new()
            .with_tree(FileRoot::Notebook, dir.path(), true)
            .with_max_entries(1);
        assert!(matches!(
            small.list(FileRoot::Notebook),
            Err(BackingError::Listing(ListingError::TooManyEntries { .. }))
        ));
    }

    #[test]
    fn channel_backing_answers_and_times_out() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"abc").unwrap();
        let local = LocalDir::new().with_tree(FileRoot::Workspace, dir.path(), false);
        let (chan, mut rx) = ChannelBacking::new(4, Duration::from_secs(5));
        let server = std::thread::spawn(move || {
            let mut served = 0;
            while let Some(req) = rx.blocking_recv() {
                if served == 1 {
                    // Drop the second request unanswered: the caller sees a disconnect.
                    drop(req);
                } else {
                    req.answer_with(&local);
                }
                served += 1;
            }
        });
        let l = chan.list(FileRoot::Workspace).unwrap();
        assert!(!l.writable);
        assert!(matches!(
            chan.list(FileRoot::Workspace),
            Err(BackingError::Disconnected { op: "list" })
        ));
        assert_eq!(
            chan.read(FileRoot::Workspace, "a", &l.entries[0].version, 0, 10)
                .unwrap(),
            &b"abc"[..]
        );
        drop(chan);
        server.join().unwrap();

        // Nobody answers: the call times out.
        let (slow, _rx) = ChannelBacking::new(4, Duration::from_millis(50));
        let err = slow.list(FileRoot::Notebook).unwrap_err();
        assert!(matches!(err, BackingError::Timeout { op: "list", .. }));
    }
}
