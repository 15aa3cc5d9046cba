//! The checkpoint store: one directory of CRIU images per checkpoint under a root,
//! an index persisted as JSON, and a byte budget enforced by eviction.
//!
//! # Keys and the notebook path
//!
//! A checkpoint is the kernel's state after running cell `cell` with code hash
//! `code_hash`, starting from the state of checkpoint `predecessor` (`None` for the
//! first cell after a fresh kernel). For a notebook given as its list of
//! `(cell id, code hash)`, the *path* is the chain of checkpoints whose keys match the
//! cells in order, each the successor of the previous one. [`Store::nearest`] walks
//! that chain and returns the last usable checkpoint at or before a cell: restore it
//! and re-run the cells after it.
//!
//! Failed dumps and checkpoints found not restorable stay in the index (so that the
//! chain continues through them and nobody retries blindly), as do evicted ones,
//! which keep their key but lose their images. Evicted entries that no live entry
//! descends from are pruned.
//!
//! # Eviction
//!
//! When the live images exceed the budget, [`Store::evict`] removes checkpoints least
//! recently used first (a logical clock advanced by every insert and [`Store::touch`]),
//! never the most recent one nor one on the current notebook path, nor one that an
//! incremental dump still needs as its parent. It returns the evicted ids so that the
//! caller can tell the server.
//!
//! # Deduplication and hot copies
//!
//! With [`StoreConfig::dedup`] (the default), [`Store::record`] moves the memory
//! images of a successful dump (`pages-*.img`) into the content-addressed chunk store
//! shared by all checkpoints (see [`crate::chunks`]) and leaves a manifest in the
//! checkpoint's directory; the other image files are small and stay as they are.
//! Chunks are reference-counted: evicting a checkpoint deletes the chunks no other
//! checkpoint references, and the budget counts every chunk once. A checkpoint's
//! [`Store::marginal_bytes`] are what evicting it would free.
//!
//! The [`StoreConfig::hot_copies`] most recently used checkpoints (recorded or
//! restored) also keep their memory images as plain files (a *hot copy*), so that
//! restoring them costs no copy; [`Store::images`] rebuilds the others from their
//! chunks first. Hot copies count against the budget and are the first thing given up
//! when it is exceeded.
//!
//! # Layout
//!
//! ```text
//! <root>/index.json        the index (written to index.json.tmp, then renamed)
//! <root>/<id>/             images of checkpoint <id> (CRIU's files, logs; with
//!                          dedup the manifest, and pages-*.img only while hot)
//! <root>/chunks/ab/cd...   chunk files, named by the SHA-256 of their contents
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::chunks::{
    ChunkError, ChunkRefs, ChunkStore, Chunking, Compression, IngestStats, Manifest,
    MaterialiseStats, is_chunked_file,
};

/// The index file under the root.
pub const INDEX_FILE: &str = "index.json";
/// The chunk store's directory under the root.
pub const CHUNKS_DIR: &str = "chunks";
/// Directory under the store's root where CRIU's logs of failed operations are kept
/// (`<id>-dump.log`, `<id>-restore.log`, ...) once the checkpoint's directory is gone.
pub const LOGS_DIR: &str = "logs";

/// How many kept log files stay in [`LOGS_DIR`] (the oldest go first).
pub const KEPT_LOG_FILES: usize = 40;

/// Version of the index format.
const INDEX_VERSION: u32 = 1;

/// A checkpoint's id: `c` followed by a zero-padded number, unique within a store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CheckpointId(String);

impl CheckpointId {
    fn from_number(n: u64) -> Self {
        Self(format!("c{n:010}"))
    }

    /// The id as a string (also the checkpoint's directory name).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a checkpoint is the state of.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CheckpointKey {
    /// The notebook.
    pub notebook: String,
    /// The cell just run.
    pub cell: String,
    /// Hash of that cell's code.
    pub code_hash: String,
    /// The checkpoint the kernel was in before the cell ran (`None`: a fresh kernel).
    pub predecessor: Option<CheckpointId>,
}

/// Whether a checkpoint can be restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Status {
    /// The dump succeeded.
    Ok,
    /// The dump failed.
    Failed(String),
    /// The dump succeeded but restoring it cannot work (e.g. a file it holds open
    /// changed size).
    NotRestorable(String),
    /// Its images were evicted.
    Evicted,
}

/// One checkpoint of the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Its id.
    pub id: CheckpointId,
    /// What it is the state of.
    pub key: CheckpointKey,
    /// Bytes of its images (0 once evicted or when the dump failed); with dedup, the
    /// logical size of everything in its directory, memory images included.
    pub size_bytes: u64,
    /// How long the dump took, in milliseconds.
    pub duration_ms: u64,
    /// Whether it can be restored.
    pub status: Status,
    /// When it was recorded, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// An incremental dump's parent, whose images it needs.
    pub parent_images: Option<CheckpointId>,
    /// Logical time of the last insert or use (for LRU eviction).
    pub last_used: u64,
    /// Its memory images are in the chunk store (its directory holds a manifest).
    #[serde(default)]
    pub chunked: bool,
    /// Its memory images are also in its directory as plain files (a hot copy).
    #[serde(default)]
    pub hot: bool,
    /// Bytes of the files of its directory that are not chunked.
    #[serde(default)]
    pub own_bytes: u64,
    /// Bytes of its chunked memory images (logical, before deduplication).
    #[serde(default)]
    pub pages_bytes: u64,
}

impl Entry {
    /// Whether it can be restored now.
    pub fn usable(&self) -> bool {
        self.status == Status::Ok
    }
}

/// What a finished dump reports to [`Store::record`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outcome {
    /// Bytes of the images (with dedup the store measures them itself).
    pub size_bytes: u64,
    /// Duration of the dump.
    pub duration: Duration,
    /// The result.
    pub status: Status,
    /// An incremental dump's parent.
    pub parent_images: Option<CheckpointId>,
}

impl Outcome {
    /// A successful full dump.
    pub fn ok(size_bytes: u64, duration: Duration) -> Self {
        Self {
            size_bytes,
            duration,
            status: Status::Ok,
            parent_images: None,
        }
    }

    /// A failed dump.
    pub fn failed(reason: impl Into<String>, duration: Duration) -> Self {
        Self {
            size_bytes: 0,
            duration,
            status: Status::Failed(reason.into()),
            parent_images: None,
        }
    }
}

/// The nearest usable checkpoint found by [`Store::nearest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nearest {
    /// Index (in the notebook's cell list) of the cell it is the state after.
    pub cell_index: usize,
    /// The checkpoint.
    pub entry: Entry,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file operation failed.
    #[error("checkpoint store i/o failed: {op} {path}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The index cannot be read.
    #[error("checkpoint index {path} is damaged; remove the store's root to start over")]
    Corrupt {
        /// The index file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The index was written by a newer version.
    #[error("checkpoint index {path} has version {found}, this build reads {INDEX_VERSION}")]
    Version {
        /// The index file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// No such checkpoint.
    #[error("no checkpoint {id}")]
    Unknown {
        /// The id.
        id: CheckpointId,
    },
    /// The checkpoint exists but cannot be restored.
    #[error("checkpoint {id} cannot be restored: {status:?}")]
    NotUsable {
        /// The id.
        id: CheckpointId,
        /// Its status.
        status: Status,
    },
    /// Storing or rebuilding deduplicated images failed.
    #[error("checkpoint {id}: deduplicated images failed")]
    Chunks {
        /// The checkpoint.
        id: CheckpointId,
        /// The cause.
        #[source]
        source: ChunkError,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Index {
    version: u32,
    next_id: u64,
    clock: u64,
    entries: Vec<Entry>,
}

/// Where the store lives and how big it may get.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreConfig {
    /// Root directory; created if missing.
    pub root: PathBuf,
    /// Most bytes kept on disk after [`Store::evict`] (unique chunks, small image
    /// files and hot copies).
    pub budget_bytes: u64,
    /// Deduplicate memory images through the chunk store (default true).
    pub dedup: bool,
    /// How memory images are cut into chunks.
    pub chunking: Chunking,
    /// How chunks are stored (default raw).
    pub compression: Compression,
    /// How many of the most recently used checkpoints keep a hot copy (default 1: the
    /// latest, or the one just restored).
    pub hot_copies: usize,
}

impl StoreConfig {
    /// A store at `root` with `budget_bytes`, deduplicated, one hot copy.
    pub fn new(root: impl Into<PathBuf>, budget_bytes: u64) -> Self {
        Self {
            root: root.into(),
            budget_bytes,
            dedup: true,
            chunking: Chunking::default(),
            compression: Compression::None,
            hot_copies: 1,
        }
    }

    /// Each checkpoint's images as CRIU wrote them, without the chunk store.
    pub fn without_dedup(mut self) -> Self {
        self.dedup = false;
        self
    }

    /// Another chunking.
    pub fn with_chunking(mut self, chunking: Chunking) -> Self {
        self.chunking = chunking;
        self
    }

    /// Another compression.
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Another number of hot copies.
    pub fn with_hot_copies(mut self, n: usize) -> Self {
        self.hot_copies = n;
        self
    }
}

/// A restorable images directory returned by [`Store::images`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Images {
    /// The directory to give [`crate::Criu::restore`].
    pub dir: PathBuf,
    /// What rebuilding its memory images cost; `None` when it was hot or not
    /// deduplicated.
    pub materialised: Option<MaterialiseStats>,
}

/// The checkpoint store (synchronous std I/O; one owner).
#[derive(Debug)]
pub struct Store {
    config: StoreConfig,
    index: Index,
    chunks: ChunkStore,
    manifests: BTreeMap<CheckpointId, Manifest>,
    refs: ChunkRefs,
}

impl Store {
    /// Opens (or creates) the store at `config.root`.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        fs::create_dir_all(&config.root).map_err(io_err("create", &config.root))?;
        let path = config.root.join(INDEX_FILE);
        let index = match fs::read(&path) {
            Ok(bytes) => {
                let index: Index =
                    serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                if index.version != INDEX_VERSION {
                    return Err(StoreError::Version {
                        path,
                        found: index.version,
                    });
                }
                index
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Index {
                version: INDEX_VERSION,
                ..Index::default()
            },
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let chunks = ChunkStore::new(
            config.root.join(CHUNKS_DIR),
            config.chunking,
            config.compression,
        );
        let mut store = Store {
            config,
            index,
            chunks,
            manifests: BTreeMap::new(),
            refs: ChunkRefs::default(),
        };
        store.load_manifests()?;
        tracing::debug!(
            root = %store.config.root.display(),
            checkpoints = store.index.entries.len(),
            unique_chunks = store.refs.len(),
            "checkpoint store opened"
        );
        Ok(store)
    }

    /// Loads the manifests of live chunked checkpoints, then sweeps chunk files that
    /// none references (left by a crash between writing chunks and the index).
    fn load_manifests(&mut self) -> Result<(), StoreError> {
        let mut damaged = Vec::new();
        for e in self
            .index
            .entries
            .iter()
            .filter(|e| e.chunked && e.size_bytes > 0)
        {
            match Manifest::read(&self.config.root.join(e.id.as_str())) {
                Ok(Some(m)) => {
                    self.refs.add(&m);
                    self.manifests.insert(e.id.clone(), m);
                }
                Ok(None) => damaged.push((e.id.clone(), "its manifest is missing".to_owned())),
                Err(err) => damaged.push((e.id.clone(), err.to_string())),
            }
        }
        for (id, reason) in damaged {
            tracing::warn!(checkpoint = %id, reason, "checkpoint images damaged");
            self.mark_not_restorable(&id, reason)?;
        }
        let (ids, stray) = self.chunks.list().map_err(|source| StoreError::Chunks {
            id: CheckpointId(CHUNKS_DIR.to_owned()),
            source,
        })?;
        let mut swept = 0;
        for id in ids.iter().filter(|id| !self.refs.contains(id)) {
            self.chunks
                .remove(id)
                .map_err(|source| StoreError::Chunks {
                    id: CheckpointId(CHUNKS_DIR.to_owned()),
                    source,
                })?;
            swept += 1;
        }
        for p in &stray {
            let _ = fs::remove_file(p);
        }
        if swept > 0 || !stray.is_empty() {
            tracing::info!(swept, stray = stray.len(), "unreferenced chunks removed");
        }
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// All entries, oldest first.
    pub fn entries(&self) -> &[Entry] {
        &self.index.entries
    }

    /// One entry.
    pub fn get(&self, id: &CheckpointId) -> Option<&Entry> {
        self.index.entries.iter().find(|e| &e.id == id)
    }

    /// The images directory of `id`.
    pub fn dir(&self, id: &CheckpointId) -> PathBuf {
        self.config.root.join(id.as_str())
    }

    /// Bytes on disk: unique chunks, the other files of live checkpoints, and hot
    /// copies (what the budget limits).
    pub fn total_bytes(&self) -> u64 {
        self.stored_bytes() + self.hot_bytes()
    }

    /// [`Store::total_bytes`] without hot copies: what keeping every live checkpoint
    /// restorable takes.
    pub fn stored_bytes(&self) -> u64 {
        let own: u64 = self
            .index
            .entries
            .iter()
            .map(|e| if e.chunked { e.own_bytes } else { e.size_bytes })
            .sum();
        own + self.refs.unique_bytes()
    }

    /// Bytes of hot copies of memory images.
    pub fn hot_bytes(&self) -> u64 {
        self.index
            .entries
            .iter()
            .filter(|e| e.hot)
            .map(|e| e.pages_bytes)
            .sum()
    }

    /// What evicting `id` would free now: its own files, its hot copy, and the chunks
    /// only it references.
    pub fn marginal_bytes(&self, id: &CheckpointId) -> u64 {
        let Some(e) = self.get(id) else { return 0 };
        match self.manifests.get(id) {
            Some(m) if e.chunked => {
                e.own_bytes + if e.hot { e.pages_bytes } else { 0 } + self.refs.marginal_bytes(m)
            }
            _ => e.size_bytes,
        }
    }

    /// The chunk store.
    pub fn chunk_store(&self) -> &ChunkStore {
        &self.chunks
    }

    /// Where CRIU's log `name` of checkpoint `id` is kept after its directory is gone.
    pub fn kept_log(&self, id: &CheckpointId, name: &str) -> PathBuf {
        self.config
            .root
            .join(LOGS_DIR)
            .join(format!("{}-{name}", id.as_str()))
    }

    /// Moves CRIU's logs (`*.log`, `*.log.stderr`) out of `id`'s directory to
    /// [`Store::kept_log`], keeping the newest [`KEPT_LOG_FILES`] there; returns the
    /// `(old, new)` paths moved, so that an error naming the old path can name the new
    /// one. Best effort: a log that cannot be moved is left (and goes with the
    /// directory).
    pub fn keep_logs(&self, id: &CheckpointId) -> Vec<(PathBuf, PathBuf)> {
        let dir = self.dir(id);
        let Ok(files) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        let logs = self.config.root.join(LOGS_DIR);
        let mut moved = Vec::new();
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if !(name.ends_with(".log") || name.ends_with(".log.stderr")) {
                continue;
            }
            if let Err(e) = fs::create_dir_all(&logs) {
                tracing::warn!(dir = %logs.display(), error = %e, "cannot keep CRIU's logs");
                return moved;
            }
            let to = self.kept_log(id, &name);
            match fs::rename(f.path(), &to) {
                Ok(()) => moved.push((f.path(), to)),
                Err(e) => {
                    tracing::warn!(log = %f.path().display(), error = %e, "cannot keep CRIU's log")
                }
            }
        }
        if !moved.is_empty() {
            prune_logs(&logs, KEPT_LOG_FILES);
        }
        moved
    }

    /// Allocates an id and creates its empty images directory, for a dump.
    pub fn allocate(&mut self) -> Result<(CheckpointId, PathBuf), StoreError> {
        self.index.next_id += 1;
        let id = CheckpointId::from_number(self.index.next_id);
        let dir = self.dir(&id);
        // A directory left by a crash before the index was saved: start clean.
        remove_dir_if_exists(&dir)?;
        fs::create_dir(&dir).map_err(io_err("create", &dir))?;
        self.save()?;
        Ok((id, dir))
    }

    /// Records the outcome of the dump into `id`'s directory. A failed dump's
    /// directory is removed (its logs were read by the caller).
    ///
    /// With dedup, a successful dump's memory images go into the chunk store (the
    /// store measures the sizes itself; `outcome.size_bytes` is ignored) and stay as a
    /// hot copy if [`StoreConfig::hot_copies`] allows; the statistics of that are
    /// returned. Incremental dumps (with parent images) are kept as they are. If
    /// storing the images fails, the checkpoint is recorded as failed and the error
    /// returned.
    #[tracing::instrument(skip_all, fields(checkpoint = %id, cell = %key.cell))]
    pub fn record(
        &mut self,
        id: CheckpointId,
        key: CheckpointKey,
        outcome: Outcome,
    ) -> Result<Option<IngestStats>, StoreError> {
        let dir = self.dir(&id);
        let mut outcome = outcome;
        let mut ingest = None;
        let mut ingest_err = None;
        if outcome.status == Status::Ok && self.config.dedup && outcome.parent_images.is_none() {
            match self.chunks.ingest_dir(&dir) {
                Ok((manifest, stats)) => ingest = Some((manifest, stats)),
                Err(e) => {
                    outcome.status = Status::Failed(format!("storing the images failed: {e}"));
                    ingest_err = Some(e);
                }
            }
        }
        if outcome.status != Status::Ok {
            self.keep_logs(&id);
            remove_dir_if_exists(&dir)?;
        }
        self.index.clock += 1;
        let mut entry = Entry {
            id,
            key,
            size_bytes: if outcome.status == Status::Ok {
                outcome.size_bytes
            } else {
                0
            },
            duration_ms: u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX),
            status: outcome.status,
            created_unix_ms: now_unix_ms(),
            parent_images: outcome.parent_images,
            last_used: self.index.clock,
            chunked: false,
            hot: false,
            own_bytes: 0,
            pages_bytes: 0,
        };
        let mut stats = None;
        if let Some((manifest, st)) = ingest {
            entry.chunked = true;
            entry.hot = true;
            entry.pages_bytes = manifest.logical_bytes();
            entry.own_bytes = unchunked_bytes(&dir)?;
            entry.size_bytes = entry.pages_bytes + entry.own_bytes;
            self.refs.add(&manifest);
            self.manifests.insert(entry.id.clone(), manifest);
            stats = Some(st);
        }
        tracing::info!(
            size_bytes = entry.size_bytes,
            duration_ms = entry.duration_ms,
            status = ?entry.status,
            new_chunk_bytes = stats.as_ref().map(|s| s.new_bytes),
            "checkpoint recorded"
        );
        let id = entry.id.clone();
        self.index.entries.retain(|e| e.id != entry.id);
        self.index.entries.push(entry);
        self.limit_hot(self.config.hot_copies, None)?;
        self.save()?;
        match ingest_err {
            Some(source) => Err(StoreError::Chunks { id, source }),
            None => Ok(stats),
        }
    }

    /// A restorable images directory of `id`: its hot copy, or its memory images
    /// rebuilt from the chunk store into its directory (which then becomes hot, and
    /// stays so at least until the next [`Store::record`] or [`Store::images`], so
    /// that a lazy restore can read it). Marks it used.
    #[tracing::instrument(skip_all, fields(checkpoint = %id))]
    pub fn images(&mut self, id: &CheckpointId) -> Result<Images, StoreError> {
        let dir = self.dir(id);
        let entry = self
            .get(id)
            .ok_or_else(|| StoreError::Unknown { id: id.clone() })?;
        if !entry.usable() {
            return Err(StoreError::NotUsable {
                id: id.clone(),
                status: entry.status.clone(),
            });
        }
        let mut materialised = None;
        if entry.chunked && !entry.hot {
            let manifest = self
                .manifests
                .get(id)
                .ok_or_else(|| StoreError::Unknown { id: id.clone() })?;
            let stats =
                self.chunks
                    .materialise(manifest, &dir)
                    .map_err(|source| StoreError::Chunks {
                        id: id.clone(),
                        source,
                    })?;
            tracing::info!(
                bytes = stats.bytes,
                duration_ms = stats.duration.as_millis() as u64,
                "checkpoint images materialised"
            );
            materialised = Some(stats);
        }
        self.index.clock += 1;
        let clock = self.index.clock;
        let entry = self.entry_mut(id)?;
        entry.last_used = clock;
        entry.hot = entry.chunked;
        self.limit_hot(self.config.hot_copies.max(1), Some(id))?;
        self.save()?;
        Ok(Images { dir, materialised })
    }

    /// Drops the hot copies beyond the `limit` most recently used, never `keep`.
    fn limit_hot(&mut self, limit: usize, keep: Option<&CheckpointId>) -> Result<(), StoreError> {
        // A live incremental dump needs its parent's page images as they are.
        let parents: BTreeSet<CheckpointId> = self
            .index
            .entries
            .iter()
            .filter(|e| e.size_bytes > 0)
            .filter_map(|e| e.parent_images.clone())
            .collect();
        let mut hot: Vec<(u64, CheckpointId)> = self
            .index
            .entries
            .iter()
            .filter(|e| e.hot && !parents.contains(&e.id))
            .map(|e| (e.last_used, e.id.clone()))
            .collect();
        hot.sort_by(|a, b| b.cmp(a));
        let mut kept = 0;
        for (_, id) in hot {
            if Some(&id) == keep || kept < limit {
                kept += 1;
                continue;
            }
            self.demote(&id)?;
        }
        Ok(())
    }

    /// Removes the hot copy of `id` (its chunks stay).
    fn demote(&mut self, id: &CheckpointId) -> Result<(), StoreError> {
        let dir = self.dir(id);
        if let Some(m) = self.manifests.get(id) {
            for f in &m.files {
                let p = dir.join(&f.name);
                match fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("remove", &p)(e)),
                }
            }
        }
        self.entry_mut(id)?.hot = false;
        tracing::debug!(checkpoint = %id, "hot copy dropped");
        Ok(())
    }

    /// Forgets `id`'s chunk references and removes the chunks nobody else uses.
    fn release_chunks(&mut self, id: &CheckpointId) -> Result<(), StoreError> {
        if let Some(m) = self.manifests.remove(id) {
            for (chunk, _) in self.refs.remove(&m) {
                self.chunks
                    .remove(&chunk)
                    .map_err(|source| StoreError::Chunks {
                        id: id.clone(),
                        source,
                    })?;
            }
        }
        Ok(())
    }

    /// Marks `id` as used (restored), for LRU eviction.
    pub fn touch(&mut self, id: &CheckpointId) -> Result<(), StoreError> {
        self.index.clock += 1;
        let clock = self.index.clock;
        let entry = self.entry_mut(id)?;
        entry.last_used = clock;
        self.save()
    }

    /// Marks `id` as not restorable (e.g. its restore failed for a reason that will
    /// not go away) and frees its images.
    pub fn mark_not_restorable(
        &mut self,
        id: &CheckpointId,
        reason: impl Into<String>,
    ) -> Result<(), StoreError> {
        let dir = self.dir(id);
        self.keep_logs(id);
        let entry = self.entry_mut(id)?;
        entry.status = Status::NotRestorable(reason.into());
        entry.size_bytes = 0;
        entry.hot = false;
        entry.own_bytes = 0;
        remove_dir_if_exists(&dir)?;
        self.release_chunks(id)?;
        self.save()
    }

    /// The last usable checkpoint at or before cell `k` on the path of `notebook`,
    /// whose cells are `cells` (`(cell id, code hash)` in order).
    pub fn nearest(&self, notebook: &str, cells: &[(String, String)], k: usize) -> Option<Nearest> {
        nearest(&self.index.entries, notebook, cells, k)
    }

    /// Evicts until the live images fit the budget (see the module docs), keeping the
    /// most recent checkpoint and those on the path of `notebook` (`cells` as for
    /// [`Store::nearest`]). Returns the evicted ids.
    #[tracing::instrument(skip_all, fields(notebook))]
    pub fn evict(
        &mut self,
        notebook: &str,
        cells: &[(String, String)],
    ) -> Result<Vec<CheckpointId>, StoreError> {
        let mut protected: BTreeSet<CheckpointId> = path(&self.index.entries, notebook, cells)
            .into_iter()
            .flatten()
            .collect();
        if let Some(latest) = self
            .index
            .entries
            .iter()
            .filter(|e| e.usable())
            .max_by_key(|e| (e.created_unix_ms, e.id.clone()))
        {
            protected.insert(latest.id.clone());
        }
        // Hot copies other than the most recently used one go first: they are caches.
        if self.total_bytes() > self.config.budget_bytes {
            self.limit_hot(1, None)?;
        }
        let mut sim = self.refs.clone();
        let manifests = &self.manifests;
        let victims = plan(
            &self.index.entries,
            self.config.budget_bytes,
            &protected,
            self.total_bytes(),
            |e| match manifests.get(&e.id) {
                Some(m) if e.chunked => {
                    let chunks: u64 = sim.remove(m).iter().map(|(_, s)| u64::from(*s)).sum();
                    e.own_bytes + if e.hot { e.pages_bytes } else { 0 } + chunks
                }
                _ => e.size_bytes,
            },
        );
        for id in &victims {
            remove_dir_if_exists(&self.dir(id))?;
            self.release_chunks(id)?;
            let entry = self.entry_mut(id)?;
            entry.status = Status::Evicted;
            entry.size_bytes = 0;
            entry.hot = false;
            entry.own_bytes = 0;
            tracing::info!(checkpoint = %id, "checkpoint evicted");
        }
        prune_tombstones(&mut self.index.entries);
        if self.total_bytes() > self.config.budget_bytes {
            self.limit_hot(0, None)?;
        }
        if self.total_bytes() > self.config.budget_bytes {
            tracing::warn!(
                total_bytes = self.total_bytes(),
                budget_bytes = self.config.budget_bytes,
                "checkpoints over budget: the rest are protected"
            );
        }
        self.save()?;
        Ok(victims)
    }

    fn entry_mut(&mut self, id: &CheckpointId) -> Result<&mut Entry, StoreError> {
        self.index
            .entries
            .iter_mut()
            .find(|e| &e.id == id)
            .ok_or_else(|| StoreError::Unknown { id: id.clone() })
    }

    /// Writes the index: a temporary file, fsync, rename.
    fn save(&self) -> Result<(), StoreError> {
        let path = self.config.root.join(INDEX_FILE);
        let tmp = self.config.root.join(format!("{INDEX_FILE}.tmp"));
        let bytes =
            serde_json::to_vec_pretty(&self.index).map_err(|source| StoreError::Corrupt {
                path: path.clone(),
                source,
            })?;
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("rename", &path))
    }
}

/// Bytes of the regular files of `dir` that are not chunked.
fn unchunked_bytes(dir: &Path) -> Result<u64, StoreError> {
    let mut total = 0;
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        if is_chunked_file(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let meta = entry.metadata().map_err(io_err("stat", &entry.path()))?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Removes the oldest files of `dir` (by modification time, then name) beyond `keep`.
fn prune_logs(dir: &Path, keep: usize) {
    let Ok(files) = fs::read_dir(dir) else {
        return;
    };
    let mut all: Vec<(SystemTime, PathBuf)> = files
        .flatten()
        .filter_map(|f| {
            let m = f.metadata().ok()?;
            m.is_file()
                .then(|| (m.modified().unwrap_or(UNIX_EPOCH), f.path()))
        })
        .collect();
    all.sort();
    let excess = all.len().saturating_sub(keep);
    for (_, p) in all.into_iter().take(excess) {
        let _ = fs::remove_file(p);
    }
}

fn remove_dir_if_exists(dir: &Path) -> Result<(), StoreError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", dir)(e)),
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// For each cell of the notebook, the most recent usable checkpoint on the path at
/// that cell (`None` where there is none). The chain goes through entries of any
/// status: all entries matching a cell are candidate predecessors of the next one.
pub fn path(
    entries: &[Entry],
    notebook: &str,
    cells: &[(String, String)],
) -> Vec<Option<CheckpointId>> {
    let mut out = Vec::with_capacity(cells.len());
    let mut frontier: BTreeSet<Option<&CheckpointId>> = BTreeSet::from([None]);
    for (cell, hash) in cells {
        let step: Vec<&Entry> = entries
            .iter()
            .filter(|e| {
                e.key.notebook == notebook
                    && &e.key.cell == cell
                    && &e.key.code_hash == hash
                    && frontier.contains(&e.key.predecessor.as_ref())
            })
            .collect();
        if step.is_empty() {
            break;
        }
        out.push(
            step.iter()
                .filter(|e| e.usable())
                .max_by_key(|e| (e.created_unix_ms, &e.id))
                .map(|e| e.id.clone()),
        );
        frontier = step.iter().map(|e| Some(&e.id)).collect();
    }
    out.resize(cells.len(), None);
    out
}

/// The last usable checkpoint at or before cell `k` (see [`Store::nearest`]).
pub fn nearest(
    entries: &[Entry],
    notebook: &str,
    cells: &[(String, String)],
    k: usize,
) -> Option<Nearest> {
    let upto = cells.len().min(k.saturating_add(1));
    let ids = path(entries, notebook, &cells[..upto]);
    let (cell_index, id) = ids
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, id)| id.as_ref().map(|id| (i, id)))?;
    let entry = entries.iter().find(|e| &e.id == id)?.clone();
    Some(Nearest { cell_index, entry })
}

/// Which entries to evict so that live images fit `budget`: least recently used
/// first, skipping `protected` ones and parents of live incremental dumps.
/// Each entry's `size_bytes` counts in full (no shared chunks).
pub fn plan_eviction(
    entries: &[Entry],
    budget: u64,
    protected: &BTreeSet<CheckpointId>,
) -> Vec<CheckpointId> {
    let total = entries.iter().map(|e| e.size_bytes).sum();
    plan(entries, budget, protected, total, |e| e.size_bytes)
}

/// [`plan_eviction`] for a store whose bytes on disk are `total` and where evicting
/// an entry frees `free(entry)` given the entries evicted before it.
fn plan(
    entries: &[Entry],
    budget: u64,
    protected: &BTreeSet<CheckpointId>,
    mut total: u64,
    mut free: impl FnMut(&Entry) -> u64,
) -> Vec<CheckpointId> {
    let mut needed_by: BTreeMap<&CheckpointId, usize> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.size_bytes > 0) {
        if let Some(p) = &e.parent_images {
            *needed_by.entry(p).or_default() += 1;
        }
    }
    let mut candidates: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.size_bytes > 0 && !protected.contains(&e.id))
        .collect();
    candidates.sort_by_key(|e| (e.last_used, e.created_unix_ms));
    let mut victims = Vec::new();
    // Evicting an incremental child may free its parent: repeat until stable.
    loop {
        let mut progress = false;
        for e in &candidates {
            if total <= budget {
                return victims;
            }
            if victims.contains(&e.id) || needed_by.get(&e.id).is_some_and(|n| *n > 0) {
                continue;
            }
            total = total.saturating_sub(free(e));
            victims.push(e.id.clone());
            if let Some(p) = &e.parent_images
                && let Some(n) = needed_by.get_mut(p)
            {
                *n = n.saturating_sub(1);
            }
            progress = true;
            break;
        }
        if !progress || total <= budget {
            return victims;
        }
    }
}

/// Drops evicted entries that no other entry descends from (recursively).
fn prune_tombstones(entries: &mut Vec<Entry>) {
    loop {
        let referenced: BTreeSet<CheckpointId> = entries
            .iter()
            .filter_map(|e| e.key.predecessor.clone())
            .collect();
        let before = entries.len();
        entries.retain(|e| e.status != Status::Evicted || referenced.contains(&e.id));
        if entries.len() == before {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(spec: &[(&str, &str)]) -> Vec<(String, String)> {
        spec.iter()
            .map(|(c, h)| (c.to_string(), h.to_string()))
            .collect()
    }

    fn key(cell: &str, hash: &str, pred: Option<&CheckpointId>) -> CheckpointKey {
        CheckpointKey {
            notebook: "nb".into(),
            cell: cell.into(),
            code_hash: hash.into(),
            predecessor: pred.cloned(),
        }
    }

    /// Records a successful checkpoint of `size` bytes after `cell`.
    fn add(
        s: &mut Store,
        cell: &str,
        hash: &str,
        pred: Option<&CheckpointId>,
        size: u64,
    ) -> CheckpointId {
        let (id, dir) = s.allocate().unwrap();
        fs::write(dir.join("pages-1.img"), b"x").unwrap();
        s.record(
            id.clone(),
            key(cell, hash, pred),
            Outcome::ok(size, Duration::from_millis(5)),
        )
        .unwrap();
        id
    }

    fn store(dir: &Path, budget: u64) -> Store {
        Store::open(StoreConfig::new(dir, budget).without_dedup()).unwrap()
    }

    #[test]
    fn nearest_follows_the_path_and_stops_at_edits() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = store(tmp.path(), u64::MAX);
        let a = add(&mut s, "a", "1", None, 10);
        let b = add(&mut s, "b", "1", Some(&a), 10);
        let c = add(&mut s, "c", "1", Some(&b), 10);
        let nb = cells(&[("a", "1"), ("b", "1"), ("c", "1"), ("d", "1")]);
        assert_eq!(s.nearest("nb", &nb, 3).unwrap().entry.id, c);
        assert_eq!(s.nearest("nb", &nb, 2).unwrap().cell_index, 2);
        assert_eq!(s.nearest("nb", &nb, 1).unwrap().entry.id, b);
        assert_eq!(s.nearest("nb", &nb, 0).unwrap().entry.id, a);
        // Editing b: the state after a is the nearest for anything from b on.
        let edited = cells(&[("a", "1"), ("b", "2"), ("c", "1")]);
        let n = s.nearest("nb", &edited, 2).unwrap();
        assert_eq!((n.cell_index, &n.entry.id), (0, &a));
        // Another notebook, or an edited first cell: nothing.
        assert!(s.nearest("other", &nb, 3).is_none());
        assert!(s.nearest("nb", &cells(&[("a", "9")]), 0).is_none());
        // k past the end is clamped.
        assert_eq!(s.nearest("nb", &nb, 99).unwrap().entry.id, c);
    }

    #[test]
    fn the_chain_continues_through_failed_and_evicted_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = store(tmp.path(), u64::MAX);
        let a = add(&mut s, "a", "1", None, 10);
        let (b, _) = s.allocate().unwrap();
        s.record(
            b.clone(),
            key("b", "1", Some(&a)),
            Outcome::failed("criu dump failed", Duration::ZERO),
        )
        .unwrap();
        assert!(!s.dir(&b).exists());
        let c = add(&mut s, "c", "1", Some(&b), 10);
        let nb = cells(&[("a", "1"), ("b", "1"), ("c", "1")]);
        assert_eq!(s.nearest("nb", &nb, 1).unwrap().entry.id, a);
        assert_eq!(s.nearest("nb", &nb, 2).unwrap().entry.id, c);
        s.mark_not_restorable(&c, "file changed size").unwrap();
        assert_eq!(s.nearest("nb", &nb, 2).unwrap().entry.id, a);
    }

    #[test]
    fn re_running_a_cell_gives_a_second_candidate() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = store(tmp.path(), u64::MAX);
        let a1 = add(&mut s, "a", "1", None, 10);
        let b1 = add(&mut s, "b", "1", Some(&a1), 10);
        let a2 = add(&mut s, "a", "1", None, 10);
        let nb = cells(&[("a", "1"), ("b", "1")]);
        // Cell a has two checkpoints; b descends from the older one and is still found.
        let n0 = s.nearest("nb", &nb, 0).unwrap().entry.id;
        assert!(n0 == a2 || n0 == a1);
        assert_eq!(s.nearest("nb", &nb, 1).unwrap().entry.id, b1);
    }

    #[test]
    fn eviction_is_lru_and_spares_the_path_and_the_latest() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = store(tmp.path(), 30);
        // An abandoned branch x1 <- x2, then the current path a <- b <- c.
        let x1 = add(&mut s, "x", "1", None, 10);
        let x2 = add(&mut s, "y", "1", Some(&x1), 10);
        let a = add(&mut s, "a", "1", None, 10);
        let b = add(&mut s, "b", "1", Some(&a), 10);
        let c = add(&mut s, "c", "1", Some(&b), 10);
        s.touch(&x1).unwrap(); // x2 is now the least recently used.
        let nb = cells(&[("a", "1"), ("b", "1"), ("c", "1")]);
        let evicted = s.evict("nb", &nb).unwrap();
        assert_eq!(evicted, vec![x2.clone(), x1.clone()]);
        assert_eq!(s.total_bytes(), 30);
        assert!(!s.dir(&x1).exists() && !s.dir(&x2).exists());
        assert!(s.dir(&a).exists() && s.dir(&c).exists());
        // Tombstones without descendants are pruned.
        assert!(s.get(&x1).is_none() && s.get(&x2).is_none());

        // The notebook moved on: only c (latest) is protected now, a and b go,
        // LRU first, until the budget holds.
        let mut s2 = store(tmp.path(), 10);
        let evicted = s2.evict("nb", &cells(&[("z", "1")])).unwrap();
        assert_eq!(evicted, vec![a.clone(), b.clone()]);
        // a and b stay as tombstones: c descends from them.
        assert_eq!(s2.get(&a).unwrap().status, Status::Evicted);
        let nb = cells(&[("a", "1"), ("b", "1"), ("c", "1")]);
        assert_eq!(s2.nearest("nb", &nb, 2).unwrap().entry.id, c);
        assert!(s2.nearest("nb", &nb, 1).is_none());
    }

    #[test]
    fn eviction_keeps_parents_of_incremental_dumps() {
        let e = |id: u64, size: u64, used: u64, parent: Option<u64>| Entry {
            id: CheckpointId::from_number(id),
            key: key("a", "1", None),
            size_bytes: size,
            duration_ms: 0,
            status: Status::Ok,
            created_unix_ms: id,
            parent_images: parent.map(CheckpointId::from_number),
            last_used: used,
            chunked: false,
            hot: false,
            own_bytes: 0,
            pages_bytes: 0,
        };
        // 1 is the oldest but 2 needs it; 2 goes first, then 1.
        let entries = vec![e(1, 10, 1, None), e(2, 5, 2, Some(1)), e(3, 10, 3, None)];
        let protected = BTreeSet::from([CheckpointId::from_number(3)]);
        let v = plan_eviction(&entries, 20, &protected);
        assert_eq!(v, vec![CheckpointId::from_number(2)]);
        let v = plan_eviction(&entries, 10, &protected);
        assert_eq!(
            v,
            vec![CheckpointId::from_number(2), CheckpointId::from_number(1)]
        );
        // Everything protected: nothing to do even over budget.
        let all: BTreeSet<_> = entries.iter().map(|e| e.id.clone()).collect();
        assert!(plan_eviction(&entries, 0, &all).is_empty());
    }

    #[test]
    fn index_survives_reopen_and_damage_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = store(tmp.path(), 100);
        let a = add(&mut s, "a", "1", None, 10);
        let b = add(&mut s, "b", "1", Some(&a), 20);
        let before = s.entries().to_vec();
        drop(s);
        let mut s = store(tmp.path(), 100);
        assert_eq!(s.entries(), &before[..]);
        assert_eq!(s.total_bytes(), 30);
        // Ids keep counting after reopen.
        let c = add(&mut s, "c", "1", Some(&b), 1);
        assert!(c > b);
        assert!(!tmp.path().join("index.json.tmp").exists());

        fs::write(tmp.path().join(INDEX_FILE), b"{not json").unwrap();
        let e = Store::open(StoreConfig::new(tmp.path(), 100)).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    }

    /// Pseudo-random bytes (xorshift), deterministic per seed.
    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Records a fake dump whose memory image is `pages`.
    fn add_dump(s: &mut Store, cell: &str, pages: &[u8]) -> CheckpointId {
        let (id, dir) = s.allocate().unwrap();
        fs::write(dir.join("pages-1.img"), pages).unwrap();
        fs::write(dir.join("core-1.img"), b"core").unwrap();
        let st = s
            .record(
                id.clone(),
                key(cell, "1", None),
                Outcome::ok(0, Duration::from_millis(5)),
            )
            .unwrap()
            .expect("ingested");
        assert_eq!(st.logical_bytes, pages.len() as u64);
        id
    }

    const P: usize = crate::chunks::PAGE;

    #[test]
    fn dedup_counts_unique_bytes_and_frees_unique_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = StoreConfig::new(tmp.path(), u64::MAX).with_chunking(Chunking::fixed(4 * P));
        let mut s = Store::open(cfg.clone()).unwrap();
        // Ten versions of 1 MiB, each changing one page of the previous.
        let mut pages = random(256 * P, 7);
        let mut ids = Vec::new();
        let mut versions = Vec::new();
        for i in 0..10 {
            pages[(i * 25 + 3) * P] ^= 0x5a;
            versions.push(pages.clone());
            ids.push(add_dump(&mut s, &format!("c{i}"), &pages));
        }
        let one = pages.len() as u64;
        // 1 MiB + 9 changed chunks of 16 KiB, plus small files; one hot copy.
        let own: u64 = s.entries().iter().map(|e| e.own_bytes).sum();
        let unique = s.stored_bytes() - own;
        assert!(unique <= one + 10 * 4 * P as u64, "{unique}");
        assert_eq!(s.hot_bytes(), one);
        assert!(s.get(&ids[9]).unwrap().hot && !s.get(&ids[0]).unwrap().hot);
        assert!(!s.dir(&ids[0]).join("pages-1.img").exists());
        // Marginal: only the changed chunk (and its own files) is the first's alone.
        let own = s.get(&ids[0]).unwrap().own_bytes;
        assert_eq!(s.marginal_bytes(&ids[0]), own + 4 * P as u64);

        // Rebuilding an old one gives back its bytes; it becomes the hot one.
        let img = s.images(&ids[0]).unwrap();
        assert!(img.materialised.is_some());
        assert_eq!(fs::read(img.dir.join("pages-1.img")).unwrap(), versions[0]);
        assert!(fs::read(img.dir.join("core-1.img")).is_ok());
        assert!(!s.get(&ids[9]).unwrap().hot);
        let again = s.images(&ids[0]).unwrap();
        assert!(again.materialised.is_none(), "hot: no copy");
        let last = s.images(&ids[9]).unwrap();
        assert_eq!(fs::read(last.dir.join("pages-1.img")).unwrap(), versions[9]);

        // Reopening recounts from the manifests.
        let (stored, total) = (s.stored_bytes(), s.total_bytes());
        drop(s);
        let mut s = Store::open(cfg).unwrap();
        assert_eq!((s.stored_bytes(), s.total_bytes()), (stored, total));

        // Evicting down to a budget frees exactly the unique chunks of the victims.
        let chunks_before = s.chunk_store().list().unwrap().0.len();
        s.config.budget_bytes = s.total_bytes() - 3 * 4 * P as u64;
        let evicted = s.evict("nb", &[]).unwrap();
        assert!(!evicted.is_empty(), "something went");
        assert!(s.total_bytes() <= s.config.budget_bytes);
        let chunks_after = s.chunk_store().list().unwrap().0.len();
        assert_eq!(
            chunks_before - chunks_after,
            evicted.len(),
            "one unique chunk each"
        );
        // The rest still restore to their bytes.
        for (i, id) in ids.iter().enumerate() {
            if evicted.contains(id) {
                assert!(matches!(
                    s.images(id),
                    Err(StoreError::NotUsable { .. }) | Err(StoreError::Unknown { .. })
                ));
                continue;
            }
            let img = s.images(id).unwrap();
            assert_eq!(
                fs::read(img.dir.join("pages-1.img")).unwrap(),
                versions[i],
                "{id}"
            );
        }
        // Evicting all but the latest leaves its chunks only.
        s.config.budget_bytes = 0;
        s.evict("nb", &[]).unwrap();
        let latest = s.entries().iter().filter(|e| e.usable()).count();
        assert_eq!(latest, 1);
        assert_eq!(s.chunk_store().list().unwrap().0.len(), 256 / 4);
        assert_eq!(s.hot_bytes(), 0, "over budget: hot copies go too");
    }

    #[test]
    fn unreferenced_chunks_are_swept_on_open_and_damage_is_contained() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = StoreConfig::new(tmp.path(), u64::MAX).with_hot_copies(0);
        let mut s = Store::open(cfg.clone()).unwrap();
        let a = add_dump(&mut s, "a", &random(64 * P, 1));
        let b = add_dump(&mut s, "b", &random(64 * P, 2));
        assert_eq!(s.hot_bytes(), 0, "no hot copies");
        let n = s.chunk_store().list().unwrap().0.len();
        // A crash after writing chunks but before the index: they are orphans.
        s.chunk_store().put(&random(P, 3)).unwrap();
        // A damaged manifest: that checkpoint is given up, not the store.
        fs::write(s.dir(&b).join(crate::chunks::MANIFEST_FILE), b"{").unwrap();
        drop(s);
        let mut s = Store::open(cfg).unwrap();
        assert!(matches!(
            s.get(&b).unwrap().status,
            Status::NotRestorable(_)
        ));
        assert!(s.get(&a).unwrap().usable());
        assert!(s.chunk_store().list().unwrap().0.len() < n);
        let img = s.images(&a).unwrap();
        assert_eq!(
            fs::read(img.dir.join("pages-1.img")).unwrap(),
            random(64 * P, 1)
        );
    }

    #[test]
    fn logs_of_a_failed_dump_and_a_failed_restore_are_kept_and_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = store(tmp.path(), 1 << 30);
        // A failed dump: its directory goes, its logs stay under logs/.
        let (id, dir) = s.allocate().unwrap();
        fs::write(dir.join("dump.log"), b"Error (criu/x.c:1): boom").unwrap();
        fs::write(dir.join("dump.log.stderr"), b"stderr").unwrap();
        fs::write(dir.join("pages-1.img"), b"x").unwrap();
        s.record(
            id.clone(),
            key("a", "h", None),
            Outcome::failed("boom", Duration::ZERO),
        )
        .unwrap();
        assert!(!dir.exists());
        let kept = s.kept_log(&id, "dump.log");
        assert_eq!(
            kept,
            tmp.path().join(LOGS_DIR).join(format!("{id}-dump.log"))
        );
        assert_eq!(fs::read(&kept).unwrap(), b"Error (criu/x.c:1): boom");
        assert!(s.kept_log(&id, "dump.log.stderr").exists());
        assert!(
            !tmp.path()
                .join(LOGS_DIR)
                .join(format!("{id}-pages-1.img"))
                .exists()
        );

        // A restore that failed: the checkpoint is marked, its restore log kept, and
        // keep_logs reports the move so that the error can name the kept path.
        let ok = add(&mut s, "a", "h", None, 10);
        fs::write(s.dir(&ok).join("restore.log"), b"restore failed").unwrap();
        let moved = s.keep_logs(&ok);
        assert_eq!(
            moved,
            vec![(
                s.dir(&ok).join("restore.log"),
                s.kept_log(&ok, "restore.log")
            )]
        );
        s.mark_not_restorable(&ok, "restore failed").unwrap();
        assert_eq!(
            fs::read(s.kept_log(&ok, "restore.log")).unwrap(),
            b"restore failed"
        );

        // Bounded: only the newest KEPT_LOG_FILES stay.
        for _ in 0..KEPT_LOG_FILES + 5 {
            let (id, dir) = s.allocate().unwrap();
            fs::write(dir.join("dump.log"), b"x").unwrap();
            s.record(
                id,
                key("b", "h", None),
                Outcome::failed("x", Duration::ZERO),
            )
            .unwrap();
        }
        let n = fs::read_dir(tmp.path().join(LOGS_DIR)).unwrap().count();
        assert_eq!(n, KEPT_LOG_FILES);
        // The newest is among them.
        let last = s.index.entries.last().unwrap().id.clone();
        assert!(s.kept_log(&last, "dump.log").exists());
    }
}
