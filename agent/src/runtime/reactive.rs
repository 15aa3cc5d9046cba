//! Reactive mode: a CRIU checkpoint of the kernel after every cell, and the choice of
//! which checkpoint to restore when the user re-runs from cell k.
//!
//! Every executed cell gets an entry in the checkpoint store keyed by (notebook, cell,
//! hash of its code, entry of the previous cell in this kernel), so entries form a tree
//! of execution paths rooted at a fresh kernel. A cell that ran but could not be
//! checkpointed (it raised, it keeps a TCP connection open, the dump failed) still gets
//! an entry, marked unusable with the reason: the path goes through it, and a later
//! cell's checkpoint stays reachable. To re-run from cell k the engine asks the store
//! for the nearest usable entry on the notebook's current path at or before k-1,
//! restores it, and re-executes the cells after it.
//!
//! What makes a checkpoint unsafe to restore is checked by looking at the kernel's
//! processes right after the cell, before dumping:
//! - an established TCP connection other than the agent's own ZeroMQ connections
//!   (CRIU would bring it back closed, with `tcp_close`), and
//! - regular files held open for writing without `O_APPEND`: their sizes are recorded
//!   with the checkpoint and compared before a restore (CRIU refuses a file whose size
//!   changed, and the program's file offset would no longer match).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nbagent_checkpoint::store::{CheckpointId, CheckpointKey, Outcome, Store, StoreConfig};
use nbagent_checkpoint::{Criu, CriuConfig, DumpOptions, RestoreOptions, RunAs};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

/// The file, in a checkpoint's directory, listing files the kernel held open.
const OPEN_FILES: &str = "nbagent-open-files.json";

/// The file, in a checkpoint's directory, holding the record of the kernel that was
/// dumped: a restored kernel listens on that kernel's ports with its key, which are
/// not those of the kernel running when it is restored (after a restart, or a failed
/// restore that started a fresh kernel).
const KERNEL_RECORD: &str = "nbagent-kernel.json";

/// Notebook id used in the store when the server does not name one.
pub const DEFAULT_NOTEBOOK: &str = "notebook";

/// Hash of a cell's code, as used in checkpoint keys.
pub fn code_hash(code: &str) -> String {
    hex::encode(Sha256::digest(code.as_bytes()))
}

/// Where the live kernel stands in the checkpoint store: what the next cell's entry
/// is linked to. Kept in the kernel's record (so that an agent adopting the kernel
/// continues the chain), and reset with the kernel: a fresh kernel starts at
/// [`Chain::Fresh`], a restored one at [`Chain::After`] its checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "entry")]
pub enum Chain {
    /// A fresh kernel: no cell has run in it.
    Fresh,
    /// The last cell run in this kernel has this entry.
    After(CheckpointId),
    /// Unknown (a record from an agent that did not keep the chain, a resumed cell
    /// whose code is not known, an entry that could not be recorded): cells are not
    /// recorded until the next restore or restart, because linking them to a guessed
    /// predecessor would let a re-run restore a wrong state.
    #[default]
    Broken,
}

impl Chain {
    /// The predecessor of the next cell's entry (`Some(None)`: a root entry), or
    /// `None` when the chain is broken and the cell must not be recorded.
    pub fn predecessor(&self) -> Option<Option<CheckpointId>> {
        match self {
            Chain::Fresh => Some(None),
            Chain::After(id) => Some(Some(id.clone())),
            Chain::Broken => None,
        }
    }

    /// The chain after a cell: `entry` is its recorded entry, `None` if it could not
    /// be recorded.
    pub fn after_cell(&self, entry: Option<CheckpointId>) -> Chain {
        match (self, entry) {
            (Chain::Broken, _) | (_, None) => Chain::Broken,
            (_, Some(id)) => Chain::After(id),
        }
    }
}

/// A file the kernel held open for writing (not append-only) at a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldFile {
    /// Its path.
    pub path: PathBuf,
    /// Its size at the checkpoint.
    pub size: u64,
}

/// What the kernel's processes hold that matters for a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspection {
    /// Established TCP connections that are not the agent's (`local -> remote`).
    pub tcp: Vec<String>,
    /// Regular files open for writing without `O_APPEND`.
    pub files: Vec<HeldFile>,
}

/// Looks at the processes `pids` under `proc_root`. `own_ports` are the kernel's
/// ZeroMQ ports: connections to them are the agent's and are not counted.
pub fn inspect(proc_root: &Path, pids: &[i32], own_ports: &BTreeSet<u16>) -> Inspection {
    let mut out = Inspection::default();
    let mut inodes = BTreeSet::new();
    let mut seen_files = BTreeSet::new();
    for &pid in pids {
        let fd_dir = proc_root.join(pid.to_string()).join("fd");
        let Ok(fds) = std::fs::read_dir(&fd_dir) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if let Some(inode) = t
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
            {
                inodes.insert(inode);
                continue;
            }
            if !target.is_absolute() || !target.is_file() {
                continue;
            }
            let info = proc_root
                .join(pid.to_string())
                .join("fdinfo")
                .join(fd.file_name());
            let Some(flags) = std::fs::read_to_string(&info).ok().and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            }) else {
                continue;
            };
            const O_ACCMODE: u32 = 0o3;
            const O_APPEND: u32 = 0o2000;
            let writable = flags & O_ACCMODE != 0;
            if writable && flags & O_APPEND == 0 && seen_files.insert(target.clone()) {
                let size = std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
                out.files.push(HeldFile { path: target, size });
            }
        }
    }
    if let Some(&pid) = pids.first() {
        for table in ["tcp", "tcp6"] {
            let path = proc_root.join(pid.to_string()).join("net").join(table);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            for line in text.lines().skip(1) {
                if let Some(c) = parse_tcp_line(line)
                    && c.state == 1
                    && inodes.contains(&c.inode)
                    && !own_ports.contains(&c.local_port)
                    && !own_ports.contains(&c.remote_port)
                {
                    out.tcp.push(format!("{} -> {}", c.local, c.remote));
                }
            }
        }
    }
    out
}

/// One row of `/proc/net/tcp`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TcpRow {
    local: String,
    local_port: u16,
    remote: String,
    remote_port: u16,
    state: u8,
    inode: u64,
}

fn parse_addr(s: &str) -> Option<(String, u16)> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = if ip.len() == 8 {
        let n = u32::from_str_radix(ip, 16).ok()?;
        std::net::Ipv4Addr::from(n.swap_bytes()).to_string()
    } else {
        format!("[{ip}]")
    };
    Some((format!("{ip}:{port}"), port))
}

fn parse_tcp_line(line: &str) -> Option<TcpRow> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let (local, local_port) = parse_addr(f.get(1)?)?;
    let (remote, remote_port) = parse_addr(f.get(2)?)?;
    Some(TcpRow {
        local,
        local_port,
        remote,
        remote_port,
        state: u8::from_str_radix(f.get(3)?, 16).ok()?,
        inode: f.get(9)?.parse().ok()?,
    })
}

/// What happened to one cell's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Stored.
    Created {
        /// Its id.
        id: CheckpointId,
        /// Bytes stored.
        bytes: u64,
        /// The pause.
        duration: Duration,
        /// The incremental dump's parent, if it was one.
        parent: Option<CheckpointId>,
    },
    /// The state after this cell cannot be restored; the entry keeps the path.
    NotRestorable {
        /// The entry.
        id: CheckpointId,
        /// Why.
        reason: String,
    },
    /// The dump failed.
    Failed {
        /// The entry.
        id: CheckpointId,
        /// Why.
        reason: String,
        /// How long it took.
        duration: Duration,
    },
}

impl Taken {
    /// The entry recorded for the cell.
    pub fn id(&self) -> &CheckpointId {
        match self {
            Taken::Created { id, .. }
            | Taken::NotRestorable { id, .. }
            | Taken::Failed { id, .. } => id,
        }
    }
}

/// Something learnt after the fact (while storing a dump in the background), to be
/// reported: see [`Checkpointer::take_reports`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Evicted to stay within the budget.
    Evicted(CheckpointId),
    /// Storing the dump of `cell` failed after it was reported created.
    StoreFailed {
        /// The cell.
        cell: String,
        /// The checkpoint.
        id: CheckpointId,
        /// Why.
        reason: String,
    },
}

/// The background storing of one dump.
#[derive(Debug)]
struct Storing {
    cell: String,
    id: CheckpointId,
    task: tokio::task::JoinHandle<Result<Vec<CheckpointId>, ReactiveError>>,
}

/// Whether to dump incrementally, and against which checkpoint: the previous dump of
/// the same live kernel (`chain`), if the kernel tracks dirty memory and that
/// checkpoint's page images are there as CRIU wrote them (`images_present`).
pub fn incremental_parent(
    dirty_tracking: bool,
    chain: &Chain,
    images_present: impl FnOnce(&CheckpointId) -> bool,
) -> Option<CheckpointId> {
    if !dirty_tracking {
        return None;
    }
    match chain {
        Chain::After(id) if images_present(id) => Some(id.clone()),
        _ => None,
    }
}

/// Replaces, in `text`, every moved path by its new place.
fn rename_paths(text: &str, moved: &[(PathBuf, PathBuf)]) -> String {
    let mut out = text.to_owned();
    for (from, to) in moved {
        out = out.replace(&*from.to_string_lossy(), &to.to_string_lossy());
    }
    out
}

/// Errors of the checkpoint engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReactiveError {
    /// The store failed.
    #[error("checkpoint store")]
    Store(#[from] nbagent_checkpoint::store::StoreError),
    /// CRIU failed.
    #[error("criu")]
    Criu(#[from] nbagent_checkpoint::CriuError),
    /// The checkpoint cannot be used (the kernel's chain is broken, a setting failed).
    #[error("{0}")]
    Unsafe(String),
    /// A file the checkpoint depends on changed since: the state cannot come back.
    #[error("{0}")]
    NotRestorable(String),
    /// The blocking task failed.
    #[error("checkpoint task failed")]
    Join(#[from] tokio::task::JoinError),
}

impl ReactiveError {
    /// Whether the checkpoint cannot be restored because of what the kernel did after
    /// it (a file it held open for writing changed), rather than a failure.
    pub fn is_not_restorable(&self) -> bool {
        matches!(
            self,
            ReactiveError::NotRestorable(_)
                | ReactiveError::Criu(nbagent_checkpoint::CriuError::FileSizeChanged { .. })
        )
    }
}

/// The checkpoint engine: CRIU plus the store.
#[derive(Debug)]
pub struct Checkpointer {
    criu: std::sync::Arc<Criu>,
    store: std::sync::Arc<std::sync::Mutex<Store>>,
    /// Storing the last dump (chunking, eviction) runs while the next cell does; this
    /// is its task, awaited before the store is used for anything else that waits.
    pending: Option<Storing>,
    /// What the background storing found, until the runtime reports it.
    reports: Vec<Report>,
    /// The kernel tracks dirty memory: dumps can be incremental.
    dirty_tracking: bool,
    notebook: String,
    proc_root: PathBuf,
    run_as: Option<RunAs>,
    /// Restore lazily (memory served on demand by a `criu lazy-pages` daemon).
    lazy: bool,
    /// The daemon of the last lazy restore, until it has served every page.
    lazy_daemon: Option<nbagent_checkpoint::LazyPages>,
}

/// Gives `dir` and everything in it to `uid:gid` with the given modes.
/// The scratch directory CRIU's parasite makes in the dumped root task's working
/// directory to mount the namespace's procfs (`criu/pie/parasite.c`).
const CRIU_PROC_SCRATCH: &str = "proc.crtools";

/// Removes a scratch directory that a dump killed half-way left in the working
/// directory of `pid` (the kernel's init): CRIU's parasite `mkdir`s it without
/// `O_EXCL`-style recovery, so a leftover would fail every later dump. Only an empty
/// directory is removed (detaching a procfs still mounted there first).
fn clear_stale_proc_scratch(proc_root: &Path, pid: i32) {
    let Ok(cwd) = std::fs::read_link(proc_root.join(pid.to_string()).join("cwd")) else {
        return;
    };
    let scratch = cwd.join(CRIU_PROC_SCRATCH);
    if std::fs::symlink_metadata(&scratch).is_err() {
        return;
    }
    let _ = nix::mount::umount2(&scratch, nix::mount::MntFlags::MNT_DETACH);
    match std::fs::remove_dir(&scratch) {
        Ok(()) => {
            warn!(dir = %scratch.display(), "removed a scratch directory an earlier dump left")
        }
        Err(e) => {
            warn!(dir = %scratch.display(), error = %e, "cannot remove a scratch directory an earlier dump left; the dump will fail")
        }
    }
}

fn own_tree(dir: &Path, uid: u32, gid: u32, dir_mode: u32, file_mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            own_tree(&e.path(), uid, gid, dir_mode, file_mode)?;
        } else if t.is_file() {
            std::os::unix::fs::lchown(e.path(), Some(uid), Some(gid))?;
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(file_mode))?;
        }
    }
    Ok(())
}

impl Checkpointer {
    /// Opens the store under `root` and checks CRIU. `Err` says why reactive mode
    /// falls back to re-execution.
    ///
    /// With `run_as` (the notebook user, when the agent is root), dumps run as that
    /// user in CRIU's unprivileged mode (see [`RunAs`]); a checkpoint's directory
    /// belongs to that user only while CRIU dumps into it, and to root (readable by
    /// the user's group) otherwise, so the kernel cannot alter an image it will be
    /// restored from. Restores run as root.
    pub fn open(
        criu_binary: &Path,
        root: &Path,
        budget_bytes: u64,
        proc_root: &Path,
        run_as: Option<RunAs>,
        lazy: bool,
    ) -> Result<Self, ReactiveError> {
        let mut config = CriuConfig::with_binary(criu_binary);
        config.run_as = run_as;
        let criu = Criu::new(config);
        let probe = criu.probe()?;
        info!(
            version = %probe.version,
            incremental = probe.mem_dirty_track,
            lazy = probe.lazy_pages,
            "checkpoints on"
        );
        let store = Store::open(StoreConfig::new(root, budget_bytes))?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Traversable (CRIU may run as the notebook user), not listable.
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711)).map_err(
                |e| {
                    ReactiveError::Unsafe(format!("cannot set the mode of {}: {e}", root.display()))
                },
            )?;
        }
        let lazy = lazy && probe.lazy_pages;
        Ok(Self {
            criu: std::sync::Arc::new(criu),
            store: std::sync::Arc::new(std::sync::Mutex::new(store)),
            pending: None,
            reports: Vec::new(),
            dirty_tracking: probe.mem_dirty_track,
            notebook: DEFAULT_NOTEBOOK.into(),
            proc_root: proc_root.to_owned(),
            run_as,
            lazy,
            lazy_daemon: None,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        match self.store.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Waits for the background storing of the last dump; what it found goes to
    /// [`Checkpointer::take_reports`].
    pub async fn settle(&mut self) {
        let Some(Storing { cell, id, task }) = self.pending.take() else {
            return;
        };
        let reason = match task.await {
            Ok(Ok(evicted)) => {
                self.reports
                    .extend(evicted.into_iter().map(Report::Evicted));
                return;
            }
            Ok(Err(e)) => crate::runtime::chain(&e),
            Err(e) => format!("the checkpoint storing task failed: {e}"),
        };
        warn!(checkpoint = %id, %reason, "storing the last checkpoint failed");
        self.reports.push(Report::StoreFailed {
            cell,
            id,
            reason: format!("storing the checkpoint failed after it was taken: {reason}"),
        });
    }

    /// What was learnt since the last call (evictions, a dump whose storing failed),
    /// for the runtime to report.
    pub fn take_reports(&mut self) -> Vec<Report> {
        std::mem::take(&mut self.reports)
    }

    fn key(&self, cell: &str, code: &str, predecessor: Option<CheckpointId>) -> CheckpointKey {
        CheckpointKey {
            notebook: self.notebook.clone(),
            cell: cell.to_owned(),
            code_hash: code_hash(code),
            predecessor,
        }
    }

    /// Records that `cell` ran but its state is not kept (it raised, or the kernel is
    /// gone), so that the path continues through it.
    pub fn skip(
        &mut self,
        cell: &str,
        code: &str,
        predecessor: Option<CheckpointId>,
        reason: &str,
    ) -> Result<CheckpointId, ReactiveError> {
        let (id, _dir) = self.lock().allocate()?;
        self.lock().record(
            id.clone(),
            self.key(cell, code, predecessor),
            Outcome::failed(reason, Duration::ZERO),
        )?;
        Ok(id)
    }

    /// Checkpoints the kernel tree rooted at `pid` (whose record is `kernel`) after
    /// `cell`, leaving it running.
    #[allow(clippy::too_many_arguments)] // the cell's key plus the kernel's identity
    pub async fn take(
        &mut self,
        pid: i32,
        kernel: &crate::runtime::KernelRecord,
        own_ports: &BTreeSet<u16>,
        cell: &str,
        code: &str,
        chain: &Chain,
        notebook_cells: &[(String, String)],
    ) -> Result<Taken, ReactiveError> {
        let begun = Instant::now();
        let Some(predecessor) = chain.predecessor() else {
            return Err(ReactiveError::Unsafe(
                "the kernel's checkpoint chain is broken".into(),
            ));
        };
        self.finish_lazy().await;
        self.settle().await;
        let pids = nbagent_checkpoint::descendants(pid);
        let found = inspect(&self.proc_root, &pids, own_ports);
        let (id, dir) = self.lock().allocate()?;
        let key = self.key(cell, code, predecessor);
        if !found.tcp.is_empty() {
            let reason = format!(
                "the kernel keeps a TCP connection open ({}); a restored kernel would find it \
                 closed, so this state is not kept (reactive re-runs re-execute this cell)",
                found.tcp.join(", ")
            );
            self.lock()
                .record(id.clone(), key, Outcome::failed(&reason, begun.elapsed()))?;
            self.lock().mark_not_restorable(&id, reason.clone())?;
            return Ok(Taken::NotRestorable { id, reason });
        }
        let parent = {
            let store = self.lock();
            incremental_parent(self.dirty_tracking, chain, |id| {
                store
                    .get(id)
                    .is_some_and(|e| e.usable() && (e.hot || !e.chunked))
            })
        };
        let mut opts = DumpOptions::default();
        opts.parent = parent.as_ref().map(|p| self.lock().dir(p));
        let criu = self.criu.clone();
        let images = dir.clone();
        let run_as = self.run_as;
        let proc_root = self.proc_root.clone();
        let dumped = tokio::task::spawn_blocking(move || {
            clear_stale_proc_scratch(&proc_root, pid);
            if let Some(u) = run_as {
                own_tree(&images, u.uid, u.gid, 0o700, 0o600).map_err(|source| {
                    nbagent_checkpoint::CriuError::Io {
                        op: "hand over to the notebook user",
                        path: images.clone(),
                        source,
                    }
                })?;
            }
            let r = criu.dump(pid, &images, &opts);
            if let Some(u) = run_as
                && let Err(e) = own_tree(&images, 0, u.gid, 0o750, 0o640)
            {
                warn!(dir = %images.display(), error = %e, "cannot take back the checkpoint directory");
            }
            r
        })
        .await?;
        match dumped {
            Ok(stats) => {
                if !found.files.is_empty() {
                    let json = serde_json::to_vec(&found.files).unwrap_or_default();
                    if let Err(e) = std::fs::write(dir.join(OPEN_FILES), json) {
                        warn!(error = %e, "cannot record the kernel's open files");
                    }
                }
                let json = serde_json::to_vec(kernel).unwrap_or_default();
                if let Err(e) = std::fs::write(dir.join(KERNEL_RECORD), json) {
                    warn!(error = %e, "cannot record the dumped kernel's connection");
                }
                // Chunking and eviction run while the next cell does.
                let store = self.store.clone();
                let (rid, notebook, cells) =
                    (id.clone(), self.notebook.clone(), notebook_cells.to_vec());
                let parent = parent.filter(|_| stats.incremental);
                let mut outcome = Outcome::ok(stats.image_bytes, stats.duration);
                outcome.parent_images = parent.clone();
                let task = tokio::task::spawn_blocking(move || {
                    let mut store = match store.lock() {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                    store.record(rid, key, outcome)?;
                    Ok(store.evict(&notebook, &cells)?)
                });
                self.pending = Some(Storing {
                    cell: cell.to_owned(),
                    id: id.clone(),
                    task,
                });
                debug!(checkpoint = %id, bytes = stats.image_bytes, "checkpoint taken");
                Ok(Taken::Created {
                    id,
                    bytes: stats.image_bytes,
                    duration: begun.elapsed(),
                    parent,
                })
            }
            Err(e) => {
                // The directory goes with the failed dump; CRIU's logs are kept and
                // the reason names where.
                let moved = self.lock().keep_logs(&id);
                let reason = rename_paths(&crate::runtime::chain(&e), &moved);
                self.lock()
                    .record(id.clone(), key, Outcome::failed(&reason, begun.elapsed()))?;
                Ok(Taken::Failed {
                    id,
                    reason,
                    duration: begun.elapsed(),
                })
            }
        }
    }

    /// The nearest usable checkpoint at or before cell `k` of `cells` (the notebook's
    /// `(cell id, code hash)` list): `(index of its cell, id)`.
    pub fn nearest(&self, cells: &[(String, String)], k: usize) -> Option<(usize, CheckpointId)> {
        self.lock()
            .nearest(&self.notebook, cells, k)
            .map(|n| (n.cell_index, n.entry.id))
    }

    /// Whether the store has an entry `id` (of any status).
    pub fn has_entry(&self, id: &CheckpointId) -> bool {
        self.lock().get(id).is_some()
    }

    /// The record of the kernel dumped into checkpoint `id` (its connection info and
    /// log), if it was saved.
    pub fn kernel_record(&self, id: &CheckpointId) -> Option<crate::runtime::KernelRecord> {
        let bytes = std::fs::read(self.lock().dir(id).join(KERNEL_RECORD)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Checks that the files the kernel held open still have the sizes they had at the
    /// checkpoint; `Err` with the reason when one changed.
    pub fn check_files(&self, id: &CheckpointId) -> Result<(), String> {
        let path = self.lock().dir(id).join(OPEN_FILES);
        let Ok(bytes) = std::fs::read(&path) else {
            return Ok(());
        };
        let files: Vec<HeldFile> = serde_json::from_slice(&bytes).unwrap_or_default();
        for f in files {
            let now = std::fs::metadata(&f.path).map(|m| m.len()).ok();
            if now != Some(f.size) {
                return Err(format!(
                    "the kernel held {} open for writing at the checkpoint; it was {} bytes then \
                     and is {} now, so the checkpoint cannot be restored",
                    f.path.display(),
                    f.size,
                    now.map(|n| format!("{n} bytes"))
                        .unwrap_or_else(|| "gone".into())
                ));
            }
        }
        Ok(())
    }

    /// Marks a checkpoint unusable, keeping CRIU's logs of it; returns `reason` with
    /// the paths of the logs it names replaced by where they are kept.
    pub fn mark_not_restorable(&mut self, id: &CheckpointId, reason: &str) -> String {
        let mut store = self.lock();
        let moved = store.keep_logs(id);
        let reason = rename_paths(reason, &moved);
        if let Err(e) = store.mark_not_restorable(id, reason.as_str()) {
            warn!(checkpoint = %id, error = %e, "cannot mark the checkpoint");
        }
        reason
    }

    /// Waits until the lazy-pages daemon of the last restore has served every page:
    /// the kernel must not be dumped, nor its images dropped, before that.
    async fn finish_lazy(&mut self) {
        if let Some(mut d) = self.lazy_daemon.take() {
            let done = tokio::task::spawn_blocking(move || d.wait(Duration::from_secs(120)))
                .await
                .unwrap_or(false);
            if !done {
                warn!("the lazy-pages daemon did not finish within 120 s");
            }
        }
    }

    /// Restores checkpoint `id` (the live kernel must be gone); returns the pid of the
    /// restored init, a child of this process.
    pub async fn restore(&mut self, id: &CheckpointId) -> Result<(i32, Duration), ReactiveError> {
        self.settle().await;
        self.check_files(id).map_err(ReactiveError::NotRestorable)?;
        let criu = self.criu.clone();
        // Deduplicated images are rebuilt (unless this is the hot checkpoint).
        let images = self.lock().images(id)?;
        if let Some(m) = &images.materialised {
            debug!(checkpoint = %id, stats = ?m, "images rebuilt from chunks");
        }
        let dir = images.dir;
        self.finish_lazy().await;
        let lazy = self.lazy;
        let mut stats = tokio::task::spawn_blocking(move || {
            let mut opts = RestoreOptions::default();
            opts.lazy_pages = lazy;
            criu.restore(&dir, &opts)
        })
        .await??;
        self.lazy_daemon = stats.lazy_pages.take();
        Ok((stats.pid, stats.duration))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_stale_scratch_directory_is_removed_and_user_files_are_kept() {
        let root = tempfile::tempdir().unwrap();
        let cwd = root.path().join("kernel-1");
        std::fs::create_dir_all(cwd.join(CRIU_PROC_SCRATCH)).unwrap();
        std::fs::create_dir_all(root.path().join("proc/7")).unwrap();
        std::os::unix::fs::symlink(&cwd, root.path().join("proc/7/cwd")).unwrap();
        clear_stale_proc_scratch(&root.path().join("proc"), 7);
        assert!(!cwd.join(CRIU_PROC_SCRATCH).exists());
        assert!(cwd.exists());

        // A non-empty directory of that name is not ours to remove.
        std::fs::create_dir_all(cwd.join(CRIU_PROC_SCRATCH)).unwrap();
        std::fs::write(cwd.join(CRIU_PROC_SCRATCH).join("keep"), b"x").unwrap();
        clear_stale_proc_scratch(&root.path().join("proc"), 7);
        assert!(cwd.join(CRIU_PROC_SCRATCH).join("keep").exists());
        // No such process: nothing happens.
        clear_stale_proc_scratch(&root.path().join("proc"), 8);
    }

    fn id(n: u32) -> CheckpointId {
        serde_json::from_value(serde_json::json!(format!("c{n:010}"))).unwrap()
    }

    #[test]
    fn the_chain_links_cells_of_one_kernel_and_breaks_when_unknown() {
        // A fresh kernel: the first cell's entry is a root.
        let fresh = Chain::Fresh;
        assert_eq!(fresh.predecessor(), Some(None));
        let a = fresh.after_cell(Some(id(1)));
        assert_eq!(a, Chain::After(id(1)));
        assert_eq!(a.predecessor(), Some(Some(id(1))));
        let b = a.after_cell(Some(id(2)));
        assert_eq!(b.predecessor(), Some(Some(id(2))));
        // A cell that could not be recorded breaks it: the next cell must not be
        // linked to the entry before it.
        let broken = b.after_cell(None);
        assert_eq!(broken, Chain::Broken);
        assert_eq!(broken.predecessor(), None);
        // And it stays broken (until a restore or a new kernel replaces it).
        assert_eq!(broken.after_cell(Some(id(3))), Chain::Broken);
    }

    #[test]
    fn the_chain_is_kept_in_the_kernel_record() {
        for c in [Chain::Fresh, Chain::After(id(7)), Chain::Broken] {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Chain>(&json).unwrap(), c, "{json}");
        }
        assert_eq!(Chain::default(), Chain::Broken);
    }

    #[test]
    fn an_incremental_parent_needs_tracking_a_previous_dump_and_its_images() {
        let prev = Chain::After(id(4));
        assert_eq!(incremental_parent(true, &prev, |_| true), Some(id(4)));
        // No soft-dirty tracking (this machine's kernel): always a full dump.
        assert_eq!(incremental_parent(false, &prev, |_| true), None);
        // The previous checkpoint's page images are gone (evicted, chunked and cold).
        assert_eq!(incremental_parent(true, &prev, |_| false), None);
        // A fresh kernel, or an unknown chain: nothing to diff against.
        assert_eq!(incremental_parent(true, &Chain::Fresh, |_| true), None);
        assert_eq!(incremental_parent(true, &Chain::Broken, |_| true), None);
        // The images checked are those of the previous checkpoint.
        assert_eq!(incremental_parent(true, &prev, |c| *c == id(3)), None);
    }

    #[test]
    fn moved_log_paths_are_renamed_in_a_reason() {
        let moved = vec![(
            PathBuf::from("/ck/c0000000002/dump.log"),
            PathBuf::from("/ck/logs/c0000000002-dump.log"),
        )];
        let r = rename_paths(
            "criu dump failed: x; log /ck/c0000000002/dump.log: ...",
            &moved,
        );
        assert_eq!(
            r,
            "criu dump failed: x; log /ck/logs/c0000000002-dump.log: ..."
        );
    }

    #[test]
    fn a_changed_file_is_not_restorable_and_other_errors_are_failures() {
        assert!(ReactiveError::NotRestorable("grown".into()).is_not_restorable());
        assert!(!ReactiveError::Unsafe("broken chain".into()).is_not_restorable());
    }

    #[test]
    fn tcp_rows_parse() {
        let l = "   1: 0100007F:1F90 0200A8C0:D431 01 00000000:00000000 00:00000000 00000000  1001        0 123456 1 0000000000000000 20 4 30 10 -1";
        let r = parse_tcp_line(l).unwrap();
        assert_eq!(r.local, "127.0.0.1:8080");
        assert_eq!(r.remote, "192.168.0.2:54321");
        assert_eq!(r.state, 1);
        assert_eq!(r.inode, 123456);
        assert_eq!(parse_tcp_line("garbage"), None);
    }

    #[test]
    fn own_open_write_file_is_seen_and_append_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("w.bin");
        let a = dir.path().join("a.log");
        let _fw = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&w)
            .unwrap();
        let _fa = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a)
            .unwrap();
        let me = std::process::id() as i32;
        let found = inspect(Path::new("/proc"), &[me], &BTreeSet::new());
        assert!(found.files.iter().any(|f| f.path == w), "{found:?}");
        assert!(!found.files.iter().any(|f| f.path == a), "{found:?}");
    }

    #[test]
    fn an_established_connection_is_seen_unless_it_is_ours() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_s, _) = l.accept().unwrap();
        let me = std::process::id() as i32;
        let found = inspect(Path::new("/proc"), &[me], &BTreeSet::new());
        assert!(!found.tcp.is_empty());
        let ours = inspect(Path::new("/proc"), &[me], &BTreeSet::from([port]));
        assert!(ours.tcp.is_empty(), "{ours:?}");
    }
}
