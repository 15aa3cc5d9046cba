//! The filesystem core: inodes, lookup counts, attribute and negative-lookup caches,
//! directory snapshots, open handles and write-back staging. No FUSE in here: the adapter
//! in [`crate::fuse`] only translates kernel calls into these methods and their results
//! (or [`FsError::errno`]) into replies.
//!
//! # Model
//!
//! The backing lists a whole tree at once. The core keeps that listing as an inode tree
//! and lists again when it is older than [`FsConfig::attr_ttl`]; inode numbers of paths
//! that survive a new listing are kept. Namespace changes (mkdir, unlink, rmdir, rename)
//! are applied to the backing synchronously. A file opened for writing gets a local
//! staging copy; it is dirty until flushed (close), when it is uploaded, after which the
//! staging copy becomes the cached content of the new version.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use nbagent_protocol::{FileKind, FileRoot};

use crate::backing::{self, Backing, DEFAULT_MAX_ENTRIES, Listing, Ticket};
use crate::cache::{ContentCache, Fetch, ReadAhead, cache_key, read_full_at};
use crate::error::{BackingError, FsError, FsResult};
use crate::path::{join, validate_name_os};

/// Inode number of the tree root.
pub const ROOT_INO: u64 = 1;
/// Default time the kernel and the core may believe attributes and entries.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// Most remembered negative lookups.
const MAX_NEGATIVE: usize = 10_000;
/// Retry delay for a failed re-listing (stale data is served meanwhile).
const RELIST_RETRY: Duration = Duration::from_secs(5);

/// A source of time, injected so that TTLs are testable.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now.
    fn now(&self) -> Instant;
}

/// The system's monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    base: Instant,
    offset: Mutex<Duration>,
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock {
            base: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        }
    }
}

impl ManualClock {
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let mut o = self.offset.lock().unwrap_or_else(|p| p.into_inner());
        *o += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + *self.offset.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Configuration of one mounted tree.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FsConfig {
    /// Which tree.
    pub root: FileRoot,
    /// How long attributes, entries and the listing are believed (default 60 s).
    pub attr_ttl: Duration,
    /// How long a name known to be absent is believed (default 60 s).
    pub negative_ttl: Duration,
    /// Most entries accepted in a listing.
    pub max_entries: usize,
    /// Directory of staging copies of files open for writing.
    pub staging_dir: PathBuf,
    /// Directory of the content cache.
    pub cache_dir: PathBuf,
    /// Bound of the content cache in bytes (default 4 GiB).
    pub cache_bytes: u64,
    /// First read-ahead window (default 128 KiB).
    pub readahead_min: u64,
    /// Largest read-ahead window (default 32 MiB).
    pub readahead_max: u64,
    /// Most bytes asked of the backing in one read (default 4 MiB).
    pub fetch_chunk: u32,
    /// Most backing reads of one file running at once: a sequential reader's read-ahead
    /// fetches the chunks of its window concurrently (default 8).
    pub fetch_in_flight: usize,
    /// Files up to this size are fetched whole when opened, so they can be passed
    /// through (default 8 MiB).
    pub fetch_whole_below: u64,
    /// When a reader opens a file, the next this many files of its directory (in name
    /// order) that are at most [`FsConfig::prefetch_siblings_below`] bytes are fetched
    /// in the background, so that a loop over a directory's small files does not wait
    /// one round trip to the server per file (default 8; 0: never).
    pub prefetch_siblings: usize,
    /// Largest sibling fetched ahead (default 1 MiB).
    pub prefetch_siblings_below: u64,
    /// Owner reported for every file.
    pub uid: u32,
    /// Group reported for every file.
    pub gid: u32,
}

impl FsConfig {
    /// Defaults for `root`, with staging and cache under `work_dir`.
    pub fn new(root: FileRoot, work_dir: impl Into<PathBuf>) -> Self {
        let work: PathBuf = work_dir.into();
        FsConfig {
            root,
            attr_ttl: DEFAULT_TTL,
            negative_ttl: DEFAULT_TTL,
            max_entries: DEFAULT_MAX_ENTRIES,
            staging_dir: work.join("staging"),
            cache_dir: work.join("cache"),
            cache_bytes: 4 << 30,
            readahead_min: 128 << 10,
            readahead_max: 32 << 20,
            fetch_chunk: 4 << 20,
            fetch_in_flight: 8,
            fetch_whole_below: 8 << 20,
            prefetch_siblings: 8,
            prefetch_siblings_below: 1 << 20,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }
}

/// Attributes of an inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// File or directory.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Modification time.
    pub mtime: SystemTime,
    /// Permission bits.
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// One entry of a directory snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Name.
    pub name: String,
    /// Attributes.
    pub attr: Attr,
}

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenMode {
    /// For writing (or reading and writing).
    pub write: bool,
    /// Truncate to zero on open.
    pub truncate: bool,
}

impl OpenMode {
    /// From `open(2)` flags.
    pub fn from_flags(flags: i32) -> Self {
        let acc = flags & nix::libc::O_ACCMODE;
        OpenMode {
            write: acc == nix::libc::O_WRONLY || acc == nix::libc::O_RDWR,
            truncate: flags & nix::libc::O_TRUNC != 0,
        }
    }
}

/// What the adapter needs to answer an open.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The handle.
    pub fh: u64,
    /// The local file holding the whole current content, for passthrough: the staging
    /// copy of a staged file, or the complete cache file of a remote one.
    pub local: Option<Arc<File>>,
    /// Whether `local` is a staging copy (writes through it are this file's).
    pub staged: bool,
    /// The content is an immutable version: the kernel may keep its page cache.
    pub keep_cache: bool,
}

#[derive(Debug)]
struct Staged {
    file: Arc<File>,
    path: PathBuf,
    base_version: String,
    dirty: bool,
    /// Handed to the backing as it is (see [`Fs::flush`]): never written again. A
    /// writer that comes later gets a copy.
    sealed: bool,
    /// Handed over at a close and not uploaded yet (see [`Fs::flush`]).
    handed: Option<Ticket>,
}

#[derive(Debug)]
enum Content {
    Remote { version: String, size: u64 },
    Staged(Staged),
}

#[derive(Debug)]
struct Inode {
    parent: u64,
    name: String,
    kind: FileKind,
    lookups: u64,
    open: u32,
    linked: bool,
    /// The backing has this path (false for a created file not yet uploaded).
    in_backing: bool,
    mtime: SystemTime,
    content: Content,
    children: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct Handle {
    ino: u64,
    write: bool,
    readahead: ReadAhead,
}

#[derive(Debug)]
struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    dir_handles: HashMap<u64, Vec<DirEntry>>,
    next_fh: u64,
    writable: bool,
    listed_at: Instant,
    /// Whether a thread is fetching a re-listing (with the lock released).
    listing: bool,
    /// Counts changes to the tree made here (creations, removals, renames, writers,
    /// uploads): a re-listing fetched while it moved may predate them.
    changes: u64,
    negative: HashMap<(u64, String), Instant>,
    /// Inodes a re-listing unlinked (gone from the server), with their last path: a
    /// dirty one cannot be uploaded and its close says so.
    vanished: HashMap<u64, String>,
    staging_seq: u64,
    /// Inodes whose staging copy is handed over and not uploaded yet.
    handed: BTreeSet<u64>,
    /// Inodes whose handed-over copy a thread is uploading (without the lock).
    uploading: BTreeSet<u64>,
}

/// A re-listing's tree while it is built ([`Fs::relist`]).
struct NewTree {
    /// Names and inodes of every directory's entries, by directory inode.
    children: HashMap<u64, Vec<(String, u64)>>,
    /// Directories by path (`""`: the root).
    dirs: HashMap<String, u64>,
    /// Inodes in the new tree.
    live: std::collections::HashSet<u64>,
}

/// The filesystem core over one tree of a [`Backing`]. All methods take `&self` and are
/// safe to call from several FUSE worker threads.
#[derive(Debug)]
pub struct Fs {
    config: FsConfig,
    backing: Arc<dyn Backing>,
    clock: Arc<dyn Clock>,
    cache: ContentCache,
    state: Mutex<State>,
    /// Signalled when a handle is released (a writer waiting for a sealed file).
    released: std::sync::Condvar,
    reads: AtomicU64,
}

/// How long an open for writing waits for the last handle of a sealed file to be
/// released (the kernel sends that `RELEASE` right after the close) before it writes
/// the handed-over file after all.
const SEALED_WAIT: Duration = Duration::from_secs(2);

fn mtime_of(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

impl Fs {
    /// Lists the tree once (which must succeed) and builds the core.
    pub fn new(
        config: FsConfig,
        backing: Arc<dyn Backing>,
        clock: Arc<dyn Clock>,
    ) -> FsResult<Self> {
        fs::create_dir_all(&config.staging_dir)?;
        let cache = ContentCache::new(
            &config.cache_dir,
            config.cache_bytes,
            config.fetch_chunk,
            config.fetch_in_flight,
        )?;
        let now = clock.now();
        let mut inodes = HashMap::new();
        inodes.insert(
            ROOT_INO,
            Inode {
                parent: ROOT_INO,
                name: String::new(),
                kind: FileKind::Dir,
                lookups: 1,
                open: 0,
                linked: true,
                in_backing: true,
                mtime: SystemTime::now(),
                content: Content::Remote {
                    version: String::new(),
                    size: 0,
                },
                children: BTreeMap::new(),
            },
        );
        let fs = Fs {
            config,
            backing,
            clock,
            cache,
            reads: AtomicU64::new(0),
            state: Mutex::new(State {
                inodes,
                next_ino: ROOT_INO + 1,
                handles: HashMap::new(),
                dir_handles: HashMap::new(),
                next_fh: 1,
                writable: false,
                listed_at: now,
                listing: false,
                changes: 0,
                negative: HashMap::new(),
                vanished: HashMap::new(),
                staging_seq: 0,
                handed: BTreeSet::new(),
                uploading: BTreeSet::new(),
            }),
            released: std::sync::Condvar::new(),
        };
        {
            let mut st = fs.lock();
            let listing = fs.list_validated()?;
            fs.apply_listing(&mut st, listing)?;
        }
        Ok(fs)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration.
    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// The content cache.
    pub fn cache(&self) -> &ContentCache {
        &self.cache
    }

    /// Whether the tree may be written (from the last listing).
    pub fn writable(&self) -> bool {
        self.lock().writable
    }

    /// Number of inodes in the table (linked or still remembered by the kernel).
    pub fn inode_count(&self) -> usize {
        self.lock().inodes.len()
    }

    /// Number of read calls served (reads passed through to a local file never arrive).
    pub fn reads_served(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Number of open file handles.
    pub fn open_handles(&self) -> usize {
        self.lock().handles.len()
    }

    // ----- listing -----------------------------------------------------------------

    fn list_validated(&self) -> FsResult<Listing> {
        let listing = self.backing.list(self.config.root)?;
        backing::validate_listing(&listing, self.config.max_entries)
            .map_err(BackingError::Listing)?;
        Ok(listing)
    }

    /// Lists again if the listing is older than the TTL; a failure is logged and stale
    /// data served. The listing is fetched with the lock released: other operations
    /// (and other callers, which do not wait for it) go on with the current tree
    /// meanwhile. If the tree changed here in the meantime, the listing may predate
    /// the change, so it is fetched again with the lock held.
    fn refresh_if_stale<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let now = self.clock.now();
        if st.listing || now.duration_since(st.listed_at) < self.config.attr_ttl {
            return st;
        }
        st.listing = true;
        let changes = st.changes;
        drop(st);
        let fetched = self.list_validated();
        let mut st = self.lock();
        st.listing = false;
        let applied = match fetched {
            Ok(listing) if st.changes == changes => self.apply_listing(&mut st, listing),
            Ok(_) => {
                tracing::debug!("the tree changed during a re-listing; listing again");
                self.list_validated()
                    .and_then(|listing| self.apply_listing(&mut st, listing))
            }
            Err(e) => Err(e),
        };
        if let Err(e) = applied {
            tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "re-listing failed; serving the previous listing");
            st.listed_at = now
                .checked_sub(self.config.attr_ttl.saturating_sub(RELIST_RETRY))
                .unwrap_or(now);
        }
        st
    }

    /// Replaces the tree with `listing`.
    fn apply_listing(&self, st: &mut State, listing: Listing) -> FsResult<()> {
        st.writable = listing.writable;
        st.listed_at = self.clock.now();
        st.negative.clear();

        // Every inode of the old tree, found through the children maps, which stay as
        // they were until the end.
        let mut old = Vec::new();
        let mut stack = vec![ROOT_INO];
        while let Some(dir) = stack.pop() {
            if let Some(d) = st.inodes.get(&dir) {
                for &child in d.children.values() {
                    old.push(child);
                    if st
                        .inodes
                        .get(&child)
                        .is_some_and(|c| c.kind == FileKind::Dir)
                    {
                        stack.push(child);
                    }
                }
            }
        }

        // The new tree. Sorted, a directory comes before everything under it, and the
        // names of one directory come in order. An entry keeps the inode of the old
        // entry of the same name and kind in the same (kept) directory.
        let mut entries = listing.entries;
        entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        let mut tree = NewTree {
            children: HashMap::from([(ROOT_INO, Vec::new())]),
            dirs: HashMap::from([(String::new(), ROOT_INO)]),
            live: std::collections::HashSet::with_capacity(entries.len() + 1),
        };
        tree.live.insert(ROOT_INO);
        for entry in entries {
            let (dir, name) = entry.path.rsplit_once('/').unwrap_or(("", &entry.path));
            let parent = Self::implicit_dirs(st, &mut tree, dir);
            let ino = Self::place(st, &mut tree, parent, name, entry.kind);
            if let Some(node) = st.inodes.get_mut(&ino) {
                node.mtime = mtime_of(entry.mtime_ms);
                if let Content::Remote { version, size } = &mut node.content {
                    *version = entry.version;
                    *size = entry.size;
                }
            }
            if entry.kind == FileKind::Dir {
                tree.dirs.insert(entry.path, ino);
            }
        }
        // Local files not uploaded yet stay where they are if their directory does.
        let mut gone = Vec::new();
        for ino in old {
            if tree.live.contains(&ino) {
                continue;
            }
            let Some(node) = st.inodes.get(&ino) else {
                continue;
            };
            if matches!(node.content, Content::Staged(_))
                && !node.in_backing
                && let Some(siblings) = tree.children.get_mut(&node.parent)
            {
                siblings.push((node.name.clone(), ino));
                tree.live.insert(ino);
            } else {
                gone.push(ino);
            }
        }
        // Paths while the old tree still stands, then unlinked.
        let gone: Vec<(u64, String)> = gone
            .into_iter()
            .map(|ino| (ino, Self::path_of(st, ino).unwrap_or_default()))
            .collect();
        for (ino, path) in gone {
            tracing::debug!(ino, path = %path, "entry vanished from the listing");
            st.vanished.insert(ino, path);
            self.unlink_inode(st, ino);
        }
        for (ino, node) in st.inodes.iter_mut() {
            if node.kind == FileKind::Dir && node.linked {
                node.children = tree
                    .children
                    .remove(ino)
                    .map(|names| names.into_iter().collect())
                    .unwrap_or_default();
            }
        }
        Ok(())
    }

    /// The inode of directory `dir` of the new tree, creating the directories of its
    /// path that the listing left implicit.
    fn implicit_dirs(st: &mut State, tree: &mut NewTree, dir: &str) -> u64 {
        if let Some(&ino) = tree.dirs.get(dir) {
            return ino;
        }
        let mut parent = ROOT_INO;
        let mut end = 0;
        for part in dir.split('/') {
            end += part.len();
            parent = match tree.dirs.get(&dir[..end]) {
                Some(&ino) => ino,
                None => {
                    let ino = Self::place(st, tree, parent, part, FileKind::Dir);
                    tree.dirs.insert(dir[..end].to_owned(), ino);
                    ino
                }
            };
            end += 1;
        }
        parent
    }

    /// Puts `name` (of `kind`) into directory `parent` of the new tree: the old inode
    /// of that name and kind there, else a new one.
    fn place(st: &mut State, tree: &mut NewTree, parent: u64, name: &str, kind: FileKind) -> u64 {
        let reuse = st
            .inodes
            .get(&parent)
            .and_then(|p| p.children.get(name))
            .copied()
            .filter(|ino| {
                !tree.live.contains(ino) && st.inodes.get(ino).is_some_and(|n| n.kind == kind)
            });
        let ino = match reuse {
            Some(ino) => {
                if let Some(node) = st.inodes.get_mut(&ino) {
                    node.linked = true;
                    node.in_backing = true;
                }
                ino
            }
            None => {
                let remote = Content::Remote {
                    version: String::new(),
                    size: 0,
                };
                Self::new_inode(st, parent, name, kind, remote, true)
            }
        };
        tree.children
            .entry(parent)
            .or_default()
            .push((name.to_owned(), ino));
        if kind == FileKind::Dir {
            tree.children.entry(ino).or_default();
        }
        tree.live.insert(ino);
        ino
    }

    /// Marks an inode unlinked and drops it if nobody remembers it.
    fn unlink_inode(&self, st: &mut State, ino: u64) {
        let Some(node) = st.inodes.get_mut(&ino) else {
            return;
        };
        node.linked = false;
        node.children.clear();
        self.maybe_drop(st, ino);
    }

    fn maybe_drop(&self, st: &mut State, ino: u64) {
        if ino == ROOT_INO {
            return;
        }
        let Some(node) = st.inodes.get(&ino) else {
            return;
        };
        if !(!node.linked && node.lookups == 0 && node.open == 0) {
            return;
        }
        st.vanished.remove(&ino);
        if let Some(Inode {
            content: Content::Staged(s),
            ..
        }) = st.inodes.remove(&ino)
        {
            let _ = fs::remove_file(&s.path);
        }
    }

    // ----- helpers -----------------------------------------------------------------

    fn node(st: &State, ino: u64) -> FsResult<&Inode> {
        st.inodes.get(&ino).ok_or(FsError::UnknownInode(ino))
    }

    fn dir(st: &State, ino: u64) -> FsResult<&Inode> {
        let n = Self::node(st, ino)?;
        if n.kind != FileKind::Dir {
            return Err(FsError::NotDir);
        }
        if !n.linked {
            return Err(FsError::NotFound);
        }
        Ok(n)
    }

    fn path_of(st: &State, ino: u64) -> FsResult<String> {
        let mut parts = Vec::new();
        let mut at = ino;
        while at != ROOT_INO {
            let n = Self::node(st, at)?;
            if !n.linked {
                return Err(FsError::NotFound);
            }
            parts.push(n.name.as_str());
            at = n.parent;
            if parts.len() > crate::path::MAX_PATH {
                return Err(FsError::NotFound);
            }
        }
        parts.reverse();
        Ok(parts.join("/"))
    }

    fn child_path(st: &State, parent: u64, name: &str) -> FsResult<String> {
        Ok(join(&Self::path_of(st, parent)?, name)?)
    }

    fn attr_of(&self, st: &State, ino: u64) -> FsResult<Attr> {
        let n = Self::node(st, ino)?;
        let ro = !st.writable;
        let (size, mtime) = match (&n.kind, &n.content) {
            (FileKind::Dir, _) => (0, n.mtime),
            (FileKind::File, Content::Remote { size, .. }) => (*size, n.mtime),
            (FileKind::File, Content::Staged(s)) => {
                let meta = s.file.metadata()?;
                (meta.len(), meta.modified().unwrap_or(n.mtime))
            }
        };
        let (perm, nlink) = match n.kind {
            FileKind::Dir => (if ro { 0o555 } else { 0o755 }, 2),
            FileKind::File => (if ro { 0o444 } else { 0o644 }, u32::from(n.linked)),
        };
        Ok(Attr {
            ino,
            kind: n.kind,
            size,
            mtime,
            perm,
            nlink,
            uid: self.config.uid,
            gid: self.config.gid,
        })
    }

    /// Every operation that changes the tree comes through here first, so this is
    /// where it is counted (see `State::changes`).
    fn check_writable(st: &mut State) -> FsResult<()> {
        st.changes += 1;
        if st.writable {
            Ok(())
        } else {
            Err(FsError::ReadOnly)
        }
    }

    fn new_staging(&self, st: &mut State, ino: u64) -> FsResult<(Arc<File>, PathBuf)> {
        st.staging_seq += 1;
        let path = self
            .config
            .staging_dir
            .join(format!("{ino}-{}", st.staging_seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((Arc::new(file), path))
    }

    /// Fetches the whole remote content of `ino` into the cache if it is at most
    /// `limit` bytes and not there yet, with the lock released meanwhile; returns the
    /// lock (taken again) and how the fetch went. The node may have changed by then:
    /// callers look again.
    fn fetch_unlocked<'a>(
        &'a self,
        st: MutexGuard<'a, State>,
        ino: u64,
        limit: u64,
    ) -> (MutexGuard<'a, State>, FsResult<()>) {
        let (key, size, fetch) = match &Self::node(&st, ino).map(|n| &n.content) {
            Ok(Content::Remote { version, size }) => {
                let (key, size) = (cache_key(version), *size);
                if size == 0 || size > limit || self.cache.complete(&key, size).is_some() {
                    return (st, Ok(()));
                }
                match Self::path_of(&st, ino) {
                    Ok(rel) => (key, size, self.fetcher(&rel, version)),
                    Err(e) => return (st, Err(e)),
                }
            }
            _ => return (st, Ok(())),
        };
        drop(st);
        let fetched = self.cache.fill(&key, size, &fetch);
        (self.lock(), fetched)
    }

    /// Starts background fetches of the small files that follow `ino` in its directory
    /// (see [`FsConfig::prefetch_siblings`]), unless cached or being fetched already.
    fn prefetch_siblings(&self, st: &State, ino: u64) {
        use std::ops::Bound::{Excluded, Unbounded};
        let Ok(node) = Self::node(st, ino) else {
            return;
        };
        if self.config.prefetch_siblings == 0 || !matches!(node.content, Content::Remote { .. }) {
            return;
        }
        let Ok(dir) = Self::dir(st, node.parent) else {
            return;
        };
        let next = dir
            .children
            .range::<str, _>((Excluded(node.name.as_str()), Unbounded))
            .take(self.config.prefetch_siblings);
        for (_, &sibling) in next {
            let Some(Inode {
                kind: FileKind::File,
                content: Content::Remote { version, size },
                ..
            }) = st.inodes.get(&sibling)
            else {
                continue;
            };
            if *size == 0 || *size > self.config.prefetch_siblings_below {
                continue;
            }
            // The path and fetcher are made only for a fetch that starts.
            let fetch = || {
                let rel = Self::path_of(st, sibling).unwrap_or_default();
                self.fetcher(&rel, version)
            };
            if let Err(e) = self.cache.prefetch(&cache_key(version), *size, fetch) {
                tracing::debug!(ino = sibling, error = %e, "prefetch of a sibling failed");
            }
        }
    }

    fn fetcher(&self, path: &str, version: &str) -> Fetch {
        let (backing, root) = (self.backing.clone(), self.config.root);
        let (path, version) = (path.to_owned(), version.to_owned());
        Arc::new(move |off, len| backing.read(root, &path, &version, off, len))
    }

    /// Gives `ino` a staging copy holding its current content (or nothing if `empty`).
    /// The caller has [settled](Self::settle) the handed-over files: a copy starts
    /// from the version of the file it copies.
    fn stage(&self, st: &mut State, ino: u64, empty: bool) -> FsResult<()> {
        let (version, size) = match &Self::node(st, ino)?.content {
            Content::Staged(s) if s.sealed => {
                // Copy-on-write: the sealed file belongs to a queued upload.
                let (old, old_path, base) =
                    (s.file.clone(), s.path.clone(), s.base_version.clone());
                let (file, path) = self.new_staging(st, ino)?;
                let size = if empty { 0 } else { old.metadata()?.len() };
                copy_range(&old, &file, size)?;
                let _ = fs::remove_file(old_path);
                if let Some(node) = st.inodes.get_mut(&ino) {
                    node.content = Content::Staged(Staged {
                        file,
                        path,
                        base_version: base,
                        dirty: empty,
                        sealed: false,
                        handed: None,
                    });
                }
                return Ok(());
            }
            Content::Staged(_) => return Ok(()),
            Content::Remote { version, size } => (version.clone(), *size),
        };
        let (file, path) = self.new_staging(st, ino)?;
        if !empty && size > 0 {
            let rel = Self::path_of(st, ino)?;
            let key = cache_key(&version);
            let fetch = self.fetcher(&rel, &version);
            self.cache.fill(&key, size, &fetch)?;
            let Some(src) = self.cache.complete(&key, size) else {
                return Err(FsError::Io(std::io::Error::other(
                    "content not complete after fetching",
                )));
            };
            copy_range(&src, &file, size)?;
        }
        if let Some(node) = st.inodes.get_mut(&ino) {
            node.content = Content::Staged(Staged {
                file,
                path,
                base_version: version,
                dirty: empty && size > 0,
                sealed: false,
                handed: None,
            });
        }
        Ok(())
    }

    /// Whether `ino` has content to upload: a dirty staged file that is still linked.
    /// A dirty file unlinked by the kernel has none (the content goes with the name,
    /// POSIX); one gone from the server's listing is an error (its bytes would be lost
    /// silently).
    fn to_upload(st: &State, ino: u64) -> FsResult<bool> {
        let node = Self::node(st, ino)?;
        let Content::Staged(s) = &node.content else {
            return Ok(false);
        };
        if !s.dirty || s.handed.is_some() || st.uploading.contains(&ino) {
            return Ok(false);
        }
        if node.linked {
            return Ok(true);
        }
        match st.vanished.get(&ino) {
            Some(path) => {
                tracing::warn!(ino, %path, "written file vanished from the server before its upload; close fails");
                Err(FsError::Vanished { path: path.clone() })
            }
            None => Ok(false),
        }
    }

    /// Hands a dirty staged file that nobody can write any more over to the backing
    /// (cheap: no hashing, no copy) and seals it; [`Fs::release`], or the next
    /// operation that must come after it, uploads it.
    fn hand_over(&self, st: &mut State, ino: u64) -> FsResult<()> {
        if !Self::to_upload(st, ino)? {
            return Ok(());
        }
        let rel = Self::path_of(st, ino)?;
        let Some(Inode {
            content: Content::Staged(s),
            ..
        }) = st.inodes.get_mut(&ino)
        else {
            return Ok(());
        };
        let ticket = self
            .backing
            .hand_over(self.config.root, &rel, &s.base_version, &s.path)
            .inspect_err(|e| tracing::warn!(ino, path = %rel, error = %e, "hand-over failed"))?;
        s.sealed = true;
        s.handed = Some(ticket);
        st.handed.insert(ino);
        Ok(())
    }

    /// Uploads the files handed over (see [`Fs::flush`]), in order, before an operation
    /// that must come after them (a rename of one, a new writer's copy, another
    /// upload); waits for the ones another thread is uploading. The lock is not held
    /// while the backing hashes and queues a file: lookups, reads and listings go on
    /// meanwhile. Failures are logged; those files stay dirty and their next close or
    /// fsync tries again.
    fn settle<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        loop {
            if let Some(ino) = st.handed.pop_first() {
                st = self.upload_handed(st, ino);
            } else if st.uploading.is_empty() {
                return st;
            } else {
                st = self.wait_released(st);
            }
        }
    }

    /// [Settles](Self::settle) the file `ino` only: before a new copy of it, or the
    /// close of a handle on it (which may drop the copy being uploaded).
    fn settle_one<'a>(&'a self, mut st: MutexGuard<'a, State>, ino: u64) -> MutexGuard<'a, State> {
        loop {
            if st.handed.remove(&ino) {
                st = self.upload_handed(st, ino);
            } else if st.uploading.contains(&ino) {
                st = self.wait_released(st);
            } else {
                return st;
            }
        }
    }

    /// Uploads the handed-over copy of `ino` (taken off `handed` by the caller)
    /// without holding the lock, and wakes the threads waiting for it.
    fn upload_handed<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        ino: u64,
    ) -> MutexGuard<'a, State> {
        let ticket = match st.inodes.get_mut(&ino) {
            Some(Inode {
                content: Content::Staged(s),
                ..
            }) => s.handed.take(),
            _ => None,
        };
        let Some(ticket) = ticket else {
            return st;
        };
        st.uploading.insert(ino);
        drop(st);
        let result = self.backing.upload(ticket);
        let mut st = self.lock();
        st.uploading.remove(&ino);
        match result {
            Ok(version) => self.uploaded(&mut st, ino, version, true),
            Err(e) => tracing::warn!(ino, error = %e, "upload failed; the file stays dirty"),
        }
        self.released.notify_all();
        st
    }

    fn wait_released<'a>(&'a self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.released
            .wait(st)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that `ino` was uploaded as `version`. Unless `frozen` (nobody can write
    /// the staging copy any more), a handle that stays open for writing (fsync, or
    /// another writer) may go on writing through passthrough without the daemon
    /// seeing it: the file stays dirty, and its next close uploads it again (the
    /// backing sends nothing if the content is the same).
    fn uploaded(&self, st: &mut State, ino: u64, version: String, frozen: bool) {
        st.changes += 1;
        let rel = Self::path_of(st, ino).unwrap_or_default();
        tracing::debug!(ino, path = %rel, version = %version, "uploaded");
        if let Some(Inode {
            content: Content::Staged(s),
            in_backing,
            ..
        }) = st.inodes.get_mut(&ino)
        {
            s.dirty = !frozen;
            s.base_version = version;
            s.sealed = frozen;
            *in_backing = true;
        }
    }

    /// Uploads a dirty staged file now (the caller has [settled](Self::settle) the
    /// files handed over before it); on success the staging copy becomes clean.
    /// Unless `frozen` the backing gets a snapshot (made in the kernel).
    fn upload(&self, st: &mut State, ino: u64, frozen: bool) -> FsResult<()> {
        if !Self::to_upload(st, ino)? {
            return Ok(());
        }
        let rel = Self::path_of(st, ino)?;
        let Content::Staged(s) = &Self::node(st, ino)?.content else {
            return Ok(());
        };
        let (file, path, base) = (s.file.clone(), s.path.clone(), s.base_version.clone());
        let uploaded = if frozen {
            backing::upload_now(&*self.backing, self.config.root, &rel, &base, &path)
                .map_err(FsError::from)
        } else {
            st.staging_seq += 1;
            let snap = self
                .config
                .staging_dir
                .join(format!("{ino}-{}.snapshot", st.staging_seq));
            let r = (|| -> FsResult<String> {
                let to = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&snap)?;
                copy_range(&file, &to, file.metadata()?.len())?;
                let root = self.config.root;
                Ok(backing::upload_now(
                    &*self.backing,
                    root,
                    &rel,
                    &base,
                    &snap,
                )?)
            })();
            let _ = fs::remove_file(&snap);
            r
        };
        let version = uploaded
            .inspect_err(|e| tracing::warn!(ino, path = %rel, error = %e, "upload failed"))?;
        self.uploaded(st, ino, version, frozen);
        Ok(())
    }

    /// Waits (at most [`SEALED_WAIT`]) until a sealed `ino` has no open handle, so that
    /// a new writer gets a copy of it rather than the handed-over file; after the
    /// wait, the file is unsealed and written after all (a descriptor of the old
    /// handle is still open: see [`Fs::flush`]).
    fn wait_unsealed<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        ino: u64,
    ) -> MutexGuard<'a, State> {
        let deadline = Instant::now() + SEALED_WAIT;
        loop {
            let busy = st.inodes.get(&ino).is_some_and(|n| {
                n.open > 0 && matches!(&n.content, Content::Staged(s) if s.sealed)
            });
            if !busy {
                return st;
            }
            if st.uploading.contains(&ino) {
                // Being hashed and queued (by this handle's RELEASE, say): not for long.
                st = self.wait_released(st);
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    ino,
                    "a handle of a file handed over for upload is still open; writing it in place"
                );
                if let Some(Inode {
                    content: Content::Staged(s),
                    ..
                }) = st.inodes.get_mut(&ino)
                {
                    s.sealed = false;
                }
                return st;
            }
            st = self
                .released
                .wait_timeout(st, deadline - now)
                .map_or_else(|p| p.into_inner().0, |(g, _)| g);
        }
    }

    /// A staged file nobody has open any more goes back to remote content; its staging
    /// copy becomes the cached content of its version.
    fn unstage_if_idle(&self, st: &mut State, ino: u64) {
        let Some(node) = st.inodes.get_mut(&ino) else {
            return;
        };
        if node.open > 0 || !node.linked {
            return;
        }
        let Content::Staged(s) = &node.content else {
            return;
        };
        if s.dirty {
            return;
        }
        let size = match s.file.metadata() {
            Ok(m) => m.len(),
            Err(_) => return,
        };
        let version = s.base_version.clone();
        let path = s.path.clone();
        node.mtime = s
            .file
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(node.mtime);
        node.content = Content::Remote {
            version: version.clone(),
            size,
        };
        if let Err(e) = self.cache.adopt(&cache_key(&version), &path, size) {
            tracing::debug!(ino, error = %e, "staging copy not adopted by the cache");
            let _ = fs::remove_file(&path);
        }
    }

    fn insert_child(
        &self,
        st: &mut State,
        parent: u64,
        name: &str,
        kind: FileKind,
        content: Content,
        in_backing: bool,
    ) -> u64 {
        let ino = Self::new_inode(st, parent, name, kind, content, in_backing);
        if let Some(p) = st.inodes.get_mut(&parent) {
            p.children.insert(name.to_owned(), ino);
            p.mtime = SystemTime::now();
        }
        st.negative.remove(&(parent, name.to_owned()));
        ino
    }

    /// A new linked inode named `name` under `parent` (which does not list it yet).
    fn new_inode(
        st: &mut State,
        parent: u64,
        name: &str,
        kind: FileKind,
        content: Content,
        in_backing: bool,
    ) -> u64 {
        let ino = st.next_ino;
        st.next_ino += 1;
        st.inodes.insert(
            ino,
            Inode {
                parent,
                name: name.to_owned(),
                kind,
                lookups: 0,
                open: 0,
                linked: true,
                in_backing,
                mtime: SystemTime::now(),
                content,
                children: BTreeMap::new(),
            },
        );
        ino
    }

    // ----- metadata ----------------------------------------------------------------

    /// Looks `name` up in `parent`; counts a kernel lookup on success.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let name = validate_name_os(name)?;
        let mut st = self.lock();
        let now = self.clock.now();
        Self::dir(&st, parent)?;
        let key = (parent, name.to_owned());
        let mut found = Self::dir(&st, parent)?.children.get(name).copied();
        if found.is_some() {
            // A known name is checked against a fresh listing; a known miss is not
            // re-listed while its negative entry lasts.
            st = self.refresh_if_stale(st);
            found = Self::dir(&st, parent)?.children.get(name).copied();
        } else {
            if st.negative.get(&key).is_some_and(|exp| *exp > now) {
                return Err(FsError::NotFound);
            }
            st = self.refresh_if_stale(st);
            found = Self::dir(&st, parent)?.children.get(name).copied();
        }
        let Some(ino) = found else {
            if st.negative.len() >= MAX_NEGATIVE {
                st.negative.clear();
            }
            st.negative.insert(key, now + self.config.negative_ttl);
            return Err(FsError::NotFound);
        };
        let attr = self.attr_of(&st, ino)?;
        if let Some(n) = st.inodes.get_mut(&ino) {
            n.lookups += 1;
        }
        Ok(attr)
    }

    /// Counts a kernel lookup of an inode handed out by [`Fs::readdir`] (readdirplus).
    pub fn remember(&self, ino: u64) {
        if let Some(n) = self.lock().inodes.get_mut(&ino) {
            n.lookups += 1;
        }
    }

    /// The kernel forgets `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        let mut st = self.lock();
        if let Some(node) = st.inodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
        }
        self.maybe_drop(&mut st, ino);
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let mut st = self.lock();
        st = self.refresh_if_stale(st);
        self.attr_of(&st, ino)
    }

    /// Opens a directory: takes a snapshot of its entries.
    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let mut st = self.lock();
        st = self.refresh_if_stale(st);
        let children: Vec<(String, u64)> = Self::dir(&st, ino)?
            .children
            .iter()
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        let mut entries = Vec::with_capacity(children.len());
        for (name, child) in children {
            entries.push(DirEntry {
                name,
                attr: self.attr_of(&st, child)?,
            });
        }
        let fh = st.next_fh;
        st.next_fh += 1;
        st.dir_handles.insert(fh, entries);
        Ok(fh)
    }

    /// Entries of a directory snapshot from index `offset` on (without `.` and `..`).
    pub fn readdir(&self, fh: u64, offset: usize) -> FsResult<Vec<DirEntry>> {
        let st = self.lock();
        let entries = st.dir_handles.get(&fh).ok_or(FsError::BadHandle(fh))?;
        Ok(entries.iter().skip(offset).cloned().collect())
    }

    /// Closes a directory snapshot.
    pub fn releasedir(&self, fh: u64) {
        self.lock().dir_handles.remove(&fh);
    }

    /// Parent of a directory (for `..`).
    pub fn parent_of(&self, ino: u64) -> u64 {
        self.lock().inodes.get(&ino).map_or(ROOT_INO, |n| n.parent)
    }

    // ----- files -------------------------------------------------------------------

    /// Opens a file.
    pub fn open(&self, ino: u64, mode: OpenMode) -> FsResult<Opened> {
        let mut st = self.lock();
        if Self::node(&st, ino)?.kind == FileKind::Dir {
            return Err(FsError::IsDir);
        }
        // Contents come first, without the lock: a writer needs the whole file (its
        // staging copy starts from it), a reader of a small file gets it in one
        // round trip. Other operations go on meanwhile.
        if mode.write && !mode.truncate {
            let fetched;
            (st, fetched) = self.fetch_unlocked(st, ino, u64::MAX);
            fetched?;
        } else if !mode.write {
            let fetched;
            (st, fetched) = self.fetch_unlocked(st, ino, self.config.fetch_whole_below);
            if let Err(e) = fetched {
                // Reads fetch (and fail) on their own.
                tracing::debug!(ino, error = %e, "prefetch on open failed");
            }
        }
        if mode.write || mode.truncate {
            Self::check_writable(&mut st)?;
            st = self.wait_unsealed(st, ino);
            st = self.settle_one(st, ino);
            self.stage(&mut st, ino, mode.truncate)?;
            if mode.truncate
                && let Some(Inode {
                    content: Content::Staged(s),
                    ..
                }) = st.inodes.get_mut(&ino)
                && s.file.metadata()?.len() > 0
            {
                s.file.set_len(0)?;
                s.dirty = true;
            }
        }
        if !mode.write {
            self.prefetch_siblings(&st, ino);
        }
        let (local, staged, keep_cache) = match &Self::node(&st, ino)?.content {
            Content::Staged(s) => (Some(s.file.clone()), true, false),
            Content::Remote { version, size } => {
                (self.cache.complete(&cache_key(version), *size), false, true)
            }
        };
        let fh = self.new_handle(&mut st, ino, mode.write);
        Ok(Opened {
            fh,
            local,
            staged,
            keep_cache,
        })
    }

    /// Registers an open handle of `ino`.
    fn new_handle(&self, st: &mut State, ino: u64, write: bool) -> u64 {
        let fh = st.next_fh;
        st.next_fh += 1;
        st.handles.insert(
            fh,
            Handle {
                ino,
                write,
                readahead: ReadAhead::new(self.config.readahead_min, self.config.readahead_max),
            },
        );
        if let Some(n) = st.inodes.get_mut(&ino) {
            n.open += 1;
        }
        fh
    }

    /// Creates and opens a new empty file (counts a lookup).
    pub fn create(&self, parent: u64, name: &OsStr, mode: OpenMode) -> FsResult<(Attr, Opened)> {
        let name = validate_name_os(name)?;
        let mut st = self.lock();
        Self::check_writable(&mut st)?;
        if Self::dir(&st, parent)?.children.contains_key(name) {
            return Err(FsError::Exists);
        }
        Self::child_path(&st, parent, name)?;
        let st_ref = &mut *st;
        st_ref.staging_seq += 1;
        let path = self
            .config
            .staging_dir
            .join(format!("new-{}", st_ref.staging_seq));
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)?,
        );
        let content = Content::Staged(Staged {
            file: file.clone(),
            path,
            base_version: String::new(),
            dirty: true,
            sealed: false,
            handed: None,
        });
        let ino = self.insert_child(&mut st, parent, name, FileKind::File, content, false);
        let fh = self.new_handle(&mut st, ino, mode.write);
        if let Some(n) = st.inodes.get_mut(&ino) {
            n.lookups += 1;
        }
        let attr = self.attr_of(&st, ino)?;
        Ok((
            attr,
            Opened {
                fh,
                local: Some(file),
                staged: true,
                keep_cache: false,
            },
        ))
    }

    /// Reads from an open file.
    pub fn read(&self, fh: u64, offset: u64, len: u32) -> FsResult<Bytes> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let (ino, plan) = {
            let mut st = self.lock();
            let h = st.handles.get_mut(&fh).ok_or(FsError::BadHandle(fh))?;
            let ino = h.ino;
            let prefetch = h.readahead.advise(offset, u64::from(len));
            let plan = match &Self::node(&st, ino)?.content {
                Content::Staged(s) => Err(s.file.clone()),
                Content::Remote { version, size } => {
                    // The path is resolved now; an unlinked file is read by its last path.
                    let rel = Self::path_of(&st, ino).unwrap_or_default();
                    Ok((rel, version.clone(), *size, prefetch))
                }
            };
            (ino, plan)
        };
        match plan {
            Err(file) => {
                let size = file.metadata()?.len();
                if offset >= size {
                    return Ok(Bytes::new());
                }
                let n = (size - offset).min(u64::from(len)) as usize;
                let mut buf = vec![0u8; n];
                read_full_at(&file, &mut buf, offset)?;
                Ok(Bytes::from(buf))
            }
            Ok((rel, version, size, prefetch)) => {
                let fetch = self.fetcher(&rel, &version);
                self.cache
                    .read(&cache_key(&version), size, offset, len, prefetch, &fetch)
                    .inspect_err(|e| tracing::warn!(ino, error = %e, "read failed"))
            }
        }
    }

    /// Writes to a file open for writing.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let mut st = self.lock();
        let h = st.handles.get(&fh).ok_or(FsError::BadHandle(fh))?;
        if !h.write {
            return Err(FsError::BadHandle(fh));
        }
        let ino = h.ino;
        if matches!(Self::node(&st, ino)?.content, Content::Staged(ref s) if s.sealed) {
            st = self.settle_one(st, ino);
            self.stage(&mut st, ino, false)?;
        }
        match st.inodes.get_mut(&ino).map(|n| &mut n.content) {
            Some(Content::Staged(s)) => {
                s.file.write_all_at(data, offset)?;
                s.dirty = true;
                Ok(u32::try_from(data.len()).unwrap_or(u32::MAX))
            }
            _ => Err(FsError::BadHandle(fh)),
        }
    }

    /// Notes that writes may have reached the staging copy behind the core's back
    /// (passthrough): the file is dirty.
    pub fn mark_dirty(&self, fh: u64) {
        let mut st = self.lock();
        let Some(ino) = st.handles.get(&fh).map(|h| h.ino) else {
            return;
        };
        if let Some(Inode {
            content: Content::Staged(s),
            ..
        }) = st.inodes.get_mut(&ino)
        {
            s.dirty = true;
        }
    }

    /// Saves the file if it is dirty: a close of `fh` (FUSE `FLUSH`).
    ///
    /// When no other handle may write the file, the staging copy itself is *handed
    /// over* to the backing ([`Backing::hand_over`]: the agent links it into its
    /// outbox with a note, which survives a crash of the agent; no hashing, no copy,
    /// so the close does not wait for the file to be read again) and *sealed*. It is
    /// uploaded (hashed and queued) at this handle's `RELEASE`, which the kernel sends
    /// right after the close without making the closing process wait for it, or by
    /// the next operation that must come after it (a rename, a removal, a new
    /// directory, another upload), without the core lock held while it hashes. A
    /// writer that opens the file later waits for that `RELEASE` and gets a copy, and
    /// a write through the daemon copies first.
    /// Otherwise the file is snapshotted and uploaded at once, because another writer
    /// may change it through passthrough without the daemon seeing it. Only a
    /// descriptor duplicated before the close (kept open past the wait) can still
    /// write the handed-over file through passthrough: the upload of that moment may
    /// then be refused by the server (its content no longer matches its version).
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        self.flush_handle(fh, true)
    }

    /// Uploads the file if it is dirty, from a snapshot: `fsync` of `fh`, which stays
    /// open for writing.
    pub fn fsync(&self, fh: u64) -> FsResult<()> {
        self.flush_handle(fh, false)
    }

    fn flush_handle(&self, fh: u64, closing: bool) -> FsResult<()> {
        let mut st = self.lock();
        let (ino, alone) = Self::writers(&st, fh)?;
        if closing && alone {
            return self.hand_over(&mut st, ino);
        }
        let mut st = self.settle(st);
        let ino = Self::writers(&st, fh)?.0;
        self.upload(&mut st, ino, false)
    }

    /// The inode of `fh` and whether no other handle may write it.
    fn writers(st: &State, fh: u64) -> FsResult<(u64, bool)> {
        let ino = st.handles.get(&fh).ok_or(FsError::BadHandle(fh))?.ino;
        let alone = !st
            .handles
            .iter()
            .any(|(h, handle)| *h != fh && handle.ino == ino && handle.write);
        Ok((ino, alone))
    }

    /// Closes a handle: a file handed over at its close is uploaded, and a dirty one
    /// (no `FLUSH` came) is uploaded now, unless this is a reader and writers remain
    /// (their close uploads it).
    pub fn release(&self, fh: u64) -> FsResult<()> {
        let st = self.lock();
        let ino = Self::writers(&st, fh)?.0;
        let mut st = self.settle_one(st, ino);
        let (ino, alone) = Self::writers(&st, fh)?;
        let writer = st.handles.get(&fh).is_some_and(|h| h.write);
        let result = if writer || alone {
            if matches!(Self::to_upload(&st, ino), Ok(true)) {
                st = self.settle(st);
            }
            let (ino, alone) = Self::writers(&st, fh)?;
            self.upload(&mut st, ino, alone)
        } else {
            Ok(())
        };
        let Some(h) = st.handles.remove(&fh) else {
            return Err(FsError::BadHandle(fh));
        };
        if let Some(n) = st.inodes.get_mut(&h.ino) {
            n.open = n.open.saturating_sub(1);
        }
        self.unstage_if_idle(&mut st, h.ino);
        self.maybe_drop(&mut st, h.ino);
        drop(st);
        self.released.notify_all();
        result
    }

    /// Changes the size of a file (`truncate`, `ftruncate`); with no handle the change is
    /// uploaded at once.
    pub fn set_size(&self, ino: u64, size: u64) -> FsResult<Attr> {
        let mut st = self.lock();
        let node = Self::node(&st, ino)?;
        if node.kind == FileKind::Dir {
            return Err(FsError::IsDir);
        }
        Self::check_writable(&mut st)?;
        st = self.settle(st);
        self.stage(&mut st, ino, size == 0)?;
        if let Some(Inode {
            content: Content::Staged(s),
            ..
        }) = st.inodes.get_mut(&ino)
            && s.file.metadata()?.len() != size
        {
            s.file.set_len(size)?;
            s.dirty = true;
        }
        let open = Self::node(&st, ino)?.open;
        if open == 0 {
            self.upload(&mut st, ino, true)?;
            self.unstage_if_idle(&mut st, ino);
        }
        self.attr_of(&st, ino)
    }

    // ----- namespace ---------------------------------------------------------------

    /// Creates a directory (counts a lookup).
    pub fn mkdir(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let name = validate_name_os(name)?;
        let mut st = self.settle(self.lock());
        Self::check_writable(&mut st)?;
        if Self::dir(&st, parent)?.children.contains_key(name) {
            return Err(FsError::Exists);
        }
        let rel = Self::child_path(&st, parent, name)?;
        self.backing.mkdir(self.config.root, &rel)?;
        let content = Content::Remote {
            version: String::new(),
            size: 0,
        };
        let ino = self.insert_child(&mut st, parent, name, FileKind::Dir, content, true);
        if let Some(n) = st.inodes.get_mut(&ino) {
            n.lookups += 1;
        }
        self.attr_of(&st, ino)
    }

    fn remove(&self, parent: u64, name: &OsStr, kind: FileKind) -> FsResult<()> {
        let name = validate_name_os(name)?;
        let mut st = self.settle(self.lock());
        Self::check_writable(&mut st)?;
        let ino = *Self::dir(&st, parent)?
            .children
            .get(name)
            .ok_or(FsError::NotFound)?;
        let node = Self::node(&st, ino)?;
        match (kind, node.kind) {
            (FileKind::File, FileKind::Dir) => return Err(FsError::IsDir),
            (FileKind::Dir, FileKind::File) => return Err(FsError::NotDir),
            (FileKind::Dir, FileKind::Dir) if !node.children.is_empty() => {
                return Err(FsError::NotEmpty);
            }
            _ => {}
        }
        if Self::node(&st, ino)?.in_backing {
            let rel = Self::child_path(&st, parent, name)?;
            self.backing.remove(self.config.root, &rel, kind)?;
        }
        if let Some(p) = st.inodes.get_mut(&parent) {
            p.children.remove(name);
            p.mtime = SystemTime::now();
        }
        self.unlink_inode(&mut st, ino);
        Ok(())
    }

    /// Removes a file.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.remove(parent, name, FileKind::File)
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.remove(parent, name, FileKind::Dir)
    }

    /// Renames within the tree, replacing the target unless `noreplace`.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        noreplace: bool,
    ) -> FsResult<()> {
        let name = validate_name_os(name)?;
        let new_name = validate_name_os(new_name)?;
        let mut st = self.settle(self.lock());
        Self::check_writable(&mut st)?;
        let ino = *Self::dir(&st, parent)?
            .children
            .get(name)
            .ok_or(FsError::NotFound)?;
        let target = Self::dir(&st, new_parent)?.children.get(new_name).copied();
        if noreplace && target.is_some() {
            return Err(FsError::Exists);
        }
        // The new parent must not be the moved directory or lie below it.
        let mut at = new_parent;
        loop {
            if at == ino {
                return Err(FsError::InvalidArgument);
            }
            if at == ROOT_INO {
                break;
            }
            at = Self::node(&st, at)?.parent;
        }
        if target == Some(ino) {
            return Ok(());
        }
        let kind = Self::node(&st, ino)?.kind;
        if let Some(t) = target {
            let tn = Self::node(&st, t)?;
            match (kind, tn.kind) {
                (FileKind::Dir, FileKind::File) => return Err(FsError::NotDir),
                (FileKind::File, FileKind::Dir) => return Err(FsError::IsDir),
                (FileKind::Dir, FileKind::Dir) if !tn.children.is_empty() => {
                    return Err(FsError::NotEmpty);
                }
                _ => {}
            }
        }
        let from = Self::child_path(&st, parent, name)?;
        let to = Self::child_path(&st, new_parent, new_name)?;
        if Self::node(&st, ino)?.in_backing {
            self.backing.rename(self.config.root, &from, &to)?;
        } else if let Some(t) = target
            && Self::node(&st, t)?.in_backing
        {
            self.backing
                .remove(self.config.root, &to, Self::node(&st, t)?.kind)?;
        }
        if let Some(t) = target {
            self.unlink_inode(&mut st, t);
        }
        if let Some(p) = st.inodes.get_mut(&parent) {
            p.children.remove(name);
            p.mtime = SystemTime::now();
        }
        if let Some(p) = st.inodes.get_mut(&new_parent) {
            p.children.insert(new_name.to_owned(), ino);
            p.mtime = SystemTime::now();
        }
        st.negative.remove(&(new_parent, new_name.to_owned()));
        if let Some(n) = st.inodes.get_mut(&ino) {
            n.parent = new_parent;
            n.name = new_name.to_owned();
        }
        Ok(())
    }

    /// Symlinks are not supported.
    pub fn symlink(&self) -> FsResult<Attr> {
        Err(FsError::NotPermitted)
    }

    /// Hard links are not supported.
    pub fn link(&self) -> FsResult<Attr> {
        Err(FsError::NotPermitted)
    }

    /// Staging and cache use, for diagnostics: (staged files, cached bytes).
    pub fn usage(&self) -> (usize, u64) {
        let st = self.lock();
        let staged = st
            .inodes
            .values()
            .filter(|n| matches!(n.content, Content::Staged(_)))
            .count();
        (staged, self.cache.used())
    }
}

/// Copies the first `len` bytes of `from` into `to`, in the kernel
/// (`copy_file_range`, positional: the descriptors' offsets are left alone).
fn copy_range(from: &File, to: &File, len: u64) -> FsResult<()> {
    let (mut off_in, mut off_out) = (0i64, 0i64);
    while (off_in as u64) < len {
        let want = usize::try_from(len - off_in as u64).unwrap_or(usize::MAX);
        let n = nix::fcntl::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want)
            .map_err(std::io::Error::from)?;
        if n == 0 {
            return Err(FsError::Io(std::io::Error::from(
                std::io::ErrorKind::UnexpectedEof,
            )));
        }
    }
    Ok(())
}
