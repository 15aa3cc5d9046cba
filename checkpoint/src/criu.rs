//! The CRIU driver: version and feature probes, dump, restore, lazy restore.
//!
//! Every operation runs one `criu swrk` (see [`crate::swrk`]) and keeps CRIU's log in
//! the images directory (`dump.log`, `restore.log`, `lazy-pages.log`). Failures carry
//! the log's last lines and are classified where the cause is known.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use rust_criu::rust_criu_protobuf::rpc;
use serde::{Deserialize, Serialize};

use crate::error::{CriuError, CriuLog, CriuVersion, MIN_CRIU_VERSION};
use crate::process;
use crate::swrk;

/// Where scripts/criu.sh installs CRIU 4.2.
pub const DEFAULT_CRIU_BINARY: &str = "/opt/nbagent/criu/bin/criu";
/// Lines of CRIU's log attached to errors.
pub const LOG_TAIL_LINES: usize = 20;
/// The file in an images directory that records how the dump was made.
pub const DUMP_META_FILE: &str = "nbagent-dump.json";
/// CRIU's log of a dump, in the images directory.
pub const DUMP_LOG: &str = "dump.log";
/// CRIU's log of a restore, in the images directory.
pub const RESTORE_LOG: &str = "restore.log";
/// The lazy-pages daemon's log, in the images directory.
pub const LAZY_PAGES_LOG: &str = "lazy-pages.log";
/// The socket the lazy-pages daemon listens on, in the work (= images) directory.
const LAZY_PAGES_SOCKET: &str = "lazy-pages.socket";
/// How long the lazy-pages daemon may take to listen.
const LAZY_PAGES_START: Duration = Duration::from_secs(10);

/// How to run CRIU.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CriuConfig {
    /// The `criu` executable (default [`DEFAULT_CRIU_BINARY`]).
    pub binary: PathBuf,
    /// CRIU's log level, 0-4 (default 4: the log tail is only useful when verbose).
    pub log_level: i32,
    /// Run dumps as this user instead of root, in CRIU's unprivileged mode (see
    /// [`RunAs`]).
    pub run_as: Option<RunAs>,
}

/// Who `criu swrk` runs as for dumps (restores always run as root).
///
/// CRIU reads and sets every dumped task's resource limits with `prlimit`, which the
/// kernel allows between different users only with CAP_SYS_RESOURCE; hosts (and
/// containers) without it cannot checkpoint a kernel that runs as the notebook user
/// from a root CRIU. Running CRIU as that same user, with only the capabilities its
/// unprivileged mode needs as ambient capabilities (CHECKPOINT_RESTORE, SYS_PTRACE;
/// SYS_ADMIN for the namespace's procfs; SETPCAP, SETUID and SETGID to restore the
/// bounding set and credentials; DAC_OVERRIDE and DAC_READ_SEARCH because the restored
/// root task works as uid 0 until its credentials are restored), works without
/// CAP_SYS_RESOURCE. The worker is started through util-linux
/// `setpriv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
}

impl Default for CriuConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from(DEFAULT_CRIU_BINARY),
            log_level: 4,
            run_as: None,
        }
    }
}

impl CriuConfig {
    /// The defaults with another binary.
    pub fn with_binary(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            ..Self::default()
        }
    }
}

/// What the installed CRIU and kernel support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Probe {
    /// CRIU's version (at least [`MIN_CRIU_VERSION`]).
    pub version: CriuVersion,
    /// Soft-dirty memory tracking (`mem_dirty_track`): incremental dumps work.
    pub mem_dirty_track: bool,
    /// Non-cooperative userfaultfd (`uffd-noncoop`): lazy restore works.
    pub lazy_pages: bool,
}

/// How to dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DumpOptions {
    /// Images of the previous dump of the same tree: the dump stores only pages
    /// changed since, when the kernel tracks dirty memory; a full dump otherwise.
    pub parent: Option<PathBuf>,
    /// Fail with [`CriuError::NoDirtyTracking`] instead of falling back to a full dump.
    pub require_incremental: bool,
    /// Dump a tree whose session or process group lies outside it (`shell_job`);
    /// `None` decides from the root's session id.
    pub shell_job: Option<bool>,
    /// Dump external unix socket peers (`ext_unix_sk`).
    pub ext_unix_sk: bool,
}

/// What a dump did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DumpStats {
    /// Wall time of the CRIU request.
    pub duration: Duration,
    /// Bytes of the image files (`*.img`) in the images directory.
    pub image_bytes: u64,
    /// Whether only changed pages were dumped (against [`DumpOptions::parent`]).
    pub incremental: bool,
    /// CRIU's log.
    pub log: PathBuf,
}

/// How to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RestoreOptions {
    /// Restore memory lazily through a `criu lazy-pages` daemon started for the
    /// images directory (see [`LazyPages`]).
    pub lazy_pages: bool,
    /// Restore the root as a sibling of `criu swrk`, that is as a child of the caller
    /// (`rst_sibling`, default true), so that the caller can `waitpid` it.
    pub as_child: bool,
    /// Override the `shell_job` recorded at dump time.
    pub shell_job: Option<bool>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            lazy_pages: false,
            as_child: true,
            shell_job: None,
        }
    }
}

/// What a restore did.
#[derive(Debug)]
#[non_exhaustive]
pub struct RestoreStats {
    /// Pid of the restored root (in the caller's PID namespace). With
    /// [`RestoreOptions::as_child`] it is the caller's child: reap it.
    pub pid: i32,
    /// Wall time of the CRIU request (plus starting the lazy-pages daemon).
    pub duration: Duration,
    /// The lazy-pages daemon, still serving pages, for a lazy restore.
    pub lazy_pages: Option<LazyPages>,
}

/// A running `criu lazy-pages` daemon. It exits by itself once it has sent every
/// page (or the restored tree is gone). Dropping the handle leaves it running and
/// reaps it from a background thread.
#[derive(Debug)]
pub struct LazyPages {
    child: Option<Child>,
    log: PathBuf,
}

impl LazyPages {
    /// The daemon's log.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Waits until the daemon has served every page and exited, at most `timeout`.
    /// Returns whether it exited.
    pub fn wait(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => {
                    self.child = None;
                    return true;
                }
                Ok(None) if Instant::now() >= deadline => return false,
                Ok(None) => thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

impl Drop for LazyPages {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            thread::spawn(move || child.wait());
        }
    }
}

/// How a dump was made, recorded beside its images so that the restore matches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpMeta {
    /// Pid of the dumped root in the dumper's PID namespace.
    pub root_pid: i32,
    /// Whether the root is the init of its own PID namespace. Then the restore makes
    /// a new namespace and the root gets a new pid outside it (1 inside); otherwise
    /// every pid of the tree must be free.
    #[serde(default)]
    pub pid_ns_init: bool,
    /// Whether `shell_job` was used.
    pub shell_job: bool,
    /// Whether TCP connections were closed (`tcp_close`); restore must match.
    pub tcp_close: bool,
    /// Whether the dump is incremental against a parent.
    pub incremental: bool,
    /// The parent images, for an incremental dump.
    pub parent: Option<PathBuf>,
}

/// The CRIU driver.
#[derive(Debug)]
pub struct Criu {
    config: CriuConfig,
    probe: OnceLock<Probe>,
}

impl Criu {
    /// A driver for `config`; nothing runs until the first call.
    pub fn new(config: CriuConfig) -> Self {
        Self {
            config,
            probe: OnceLock::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CriuConfig {
        &self.config
    }

    /// CRIU's version from `criu --version`, refusing versions older than
    /// [`MIN_CRIU_VERSION`] with [`CriuError::TooOld`].
    pub fn version(&self) -> Result<CriuVersion, CriuError> {
        let binary = &self.config.binary;
        let out = Command::new(binary)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| CriuError::Spawn {
                binary: binary.clone(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let found = parse_version(&text).ok_or_else(|| CriuError::VersionUnknown {
            binary: binary.clone(),
            output: text.lines().next().unwrap_or("").to_owned(),
        })?;
        if found < MIN_CRIU_VERSION {
            return Err(CriuError::TooOld {
                binary: binary.clone(),
                found,
                required: MIN_CRIU_VERSION,
            });
        }
        Ok(found)
    }

    /// Checks the version and asks CRIU (`FEATURE_CHECK`) for dirty memory tracking
    /// and lazy pages. The result is cached.
    #[tracing::instrument(skip_all)]
    pub fn probe(&self) -> Result<Probe, CriuError> {
        if let Some(p) = self.probe.get() {
            return Ok(*p);
        }
        let version = self.version()?;
        let mut features = rpc::Criu_features::new();
        features.set_mem_track(true);
        features.set_lazy_pages(true);
        let resp = swrk::call(
            &self.config.binary,
            rpc::Criu_req_type::FEATURE_CHECK,
            None,
            Some(features),
            None,
        )?;
        let (mem_dirty_track, lazy_pages) = match resp.features.as_ref() {
            Some(f) => (f.mem_track(), f.lazy_pages()),
            None => (false, false),
        };
        let probe = Probe {
            version,
            mem_dirty_track,
            lazy_pages,
        };
        tracing::info!(
            version = %version,
            mem_dirty_track,
            lazy_pages,
            "criu probed"
        );
        Ok(*self.probe.get_or_init(|| probe))
    }

    /// Dumps the process tree rooted at `pid` into `images_dir` (created if missing),
    /// leaving it running. TCP connections are closed in the images (`tcp_close`): the
    /// restored tree sees them reset, and its listening sockets are restored.
    #[tracing::instrument(skip_all, fields(pid, images = %images_dir.display()))]
    pub fn dump(
        &self,
        pid: i32,
        images_dir: &Path,
        opts: &DumpOptions,
    ) -> Result<DumpStats, CriuError> {
        let Some(root) = process::stat(pid) else {
            return Err(CriuError::NoSuchProcess { pid });
        };
        let probe = self.probe()?;
        fs::create_dir_all(images_dir).map_err(io_err("create", images_dir))?;
        let images_dir = fs::canonicalize(images_dir).map_err(io_err("resolve", images_dir))?;
        let shell_job = opts.shell_job.unwrap_or(root.session != pid);
        let pid_ns_init = process::is_pid_ns_init(pid);

        let mut o = swrk::base_opts(&images_dir, DUMP_LOG, self.config.log_level);
        o.set_pid(pid);
        o.set_leave_running(true);
        o.set_tcp_close(true);
        o.set_shell_job(shell_job);
        o.set_ext_unix_sk(opts.ext_unix_sk);
        let mut incremental = false;
        let mut parent_abs = None;
        if probe.mem_dirty_track {
            // Track on every dump so that the next one can be incremental.
            o.set_track_mem(true);
        }
        if let Some(parent) = &opts.parent {
            if probe.mem_dirty_track {
                let abs = fs::canonicalize(parent).map_err(io_err("resolve", parent))?;
                o.set_parent_img(swrk::path_string(&abs));
                parent_abs = Some(abs);
                incremental = true;
            } else if opts.require_incremental {
                return Err(CriuError::NoDirtyTracking);
            } else {
                tracing::debug!("no dirty memory tracking: full dump");
            }
        }

        let start = Instant::now();
        self.run(rpc::Criu_req_type::DUMP, o, &images_dir, DUMP_LOG)?;
        let duration = start.elapsed();

        let meta = DumpMeta {
            root_pid: pid,
            pid_ns_init,
            shell_job,
            tcp_close: true,
            incremental,
            parent: parent_abs,
        };
        write_meta(&images_dir, &meta)?;
        let image_bytes = image_bytes(&images_dir)?;
        tracing::info!(
            duration_ms = duration.as_millis() as u64,
            image_bytes,
            incremental,
            "criu dump done"
        );
        Ok(DumpStats {
            duration,
            image_bytes,
            incremental,
            log: images_dir.join(DUMP_LOG),
        })
    }

    /// Restores the tree dumped in `images_dir`. The tree's pids must be free: kill and
    /// reap the live tree first ([`crate::kill_tree`]). The images are not consumed;
    /// the same directory can be restored again.
    #[tracing::instrument(skip_all, fields(images = %images_dir.display()))]
    pub fn restore(
        &self,
        images_dir: &Path,
        opts: &RestoreOptions,
    ) -> Result<RestoreStats, CriuError> {
        let images_dir = fs::canonicalize(images_dir).map_err(io_err("resolve", images_dir))?;
        let meta = read_meta(&images_dir)?;
        if let Some(meta) = &meta
            && !meta.pid_ns_init
            && process::pid_exists(meta.root_pid)
        {
            return Err(CriuError::PidInUse {
                pid: meta.root_pid,
                log: None,
            });
        }
        let shell_job = opts
            .shell_job
            .or(meta.as_ref().map(|m| m.shell_job))
            .unwrap_or(false);
        let tcp_close = meta.as_ref().is_none_or(|m| m.tcp_close);

        let mut o = swrk::base_opts(&images_dir, RESTORE_LOG, self.config.log_level);
        o.set_tcp_close(tcp_close);
        o.set_shell_job(shell_job);
        o.set_rst_sibling(opts.as_child);

        let start = Instant::now();
        let lazy = if opts.lazy_pages {
            if !self.probe()?.lazy_pages {
                return Err(CriuError::NoLazyPages);
            }
            o.set_lazy_pages(true);
            Some(self.start_lazy_pages(&images_dir)?)
        } else {
            None
        };
        let resp = self.run(rpc::Criu_req_type::RESTORE, o, &images_dir, RESTORE_LOG)?;
        let duration = start.elapsed();
        let pid = resp.restore.as_ref().map(|r| r.pid()).unwrap_or(0);
        if pid <= 0 {
            return Err(CriuError::Protocol {
                reason: "restore response carries no pid".to_owned(),
            });
        }
        tracing::info!(
            pid,
            duration_ms = duration.as_millis() as u64,
            lazy = opts.lazy_pages,
            "criu restore done"
        );
        Ok(RestoreStats {
            pid,
            duration,
            lazy_pages: lazy,
        })
    }

    fn start_lazy_pages(&self, images_dir: &Path) -> Result<LazyPages, CriuError> {
        let socket = images_dir.join(LAZY_PAGES_SOCKET);
        let log = images_dir.join(LAZY_PAGES_LOG);
        match fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &socket)(e)),
        }
        let mut child = Command::new(&self.config.binary)
            .arg("lazy-pages")
            .arg("--images-dir")
            .arg(images_dir)
            .arg("--log-file")
            .arg(LAZY_PAGES_LOG)
            .arg(format!("-v{}", self.config.log_level))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| CriuError::Spawn {
                binary: self.config.binary.clone(),
                source,
            })?;
        let deadline = Instant::now() + LAZY_PAGES_START;
        loop {
            if socket.exists() {
                break;
            }
            let failed = match child.try_wait() {
                Ok(Some(status)) => Some(format!("it exited with {status}")),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    Some(format!("no socket after {LAZY_PAGES_START:?}"))
                }
                Ok(None) => None,
                Err(e) => Some(format!("cannot wait for it: {e}")),
            };
            if let Some(reason) = failed {
                return Err(CriuError::LazyPagesDaemon {
                    reason,
                    log: log_tail(&log, None),
                });
            }
            thread::sleep(Duration::from_millis(2));
        }
        Ok(LazyPages {
            child: Some(child),
            log,
        })
    }

    /// One request; a failure comes back classified with the log tail.
    fn run(
        &self,
        ty: rpc::Criu_req_type,
        opts: rpc::Criu_opts,
        images_dir: &Path,
        log_file: &str,
    ) -> Result<rpc::Criu_resp, CriuError> {
        let stderr_path = images_dir.join(format!("{log_file}.stderr"));
        let stderr = File::create(&stderr_path).map_err(io_err("create", &stderr_path))?;
        // Only dumps need the kernel's uid (prlimit); restores need real root (CRIU's
        // restorer sets the tasks' credentials the way only root can).
        let run_as = match ty {
            rpc::Criu_req_type::DUMP => self.config.run_as,
            _ => None,
        };
        let mut opts = opts;
        if run_as.is_some() {
            opts.set_unprivileged(true);
        }
        let result = swrk::call_as(
            &self.config.binary,
            run_as,
            ty,
            Some(opts),
            None,
            Some(stderr),
        );
        let log_path = swrk::log_path(images_dir, log_file);
        let resp = match result {
            Ok(resp) if resp.success() => resp,
            Ok(resp) => {
                let log = log_tail(&log_path, Some(&stderr_path));
                return Err(classify(
                    op_name(ty),
                    resp.cr_errno(),
                    resp.cr_errmsg().to_owned(),
                    log,
                ));
            }
            Err(CriuError::WorkerGone) => {
                let log = log_tail(&log_path, Some(&stderr_path));
                return Err(classify(
                    op_name(ty),
                    0,
                    "criu swrk exited without answering".to_owned(),
                    log,
                ));
            }
            Err(e) => return Err(e),
        };
        if fs::metadata(&stderr_path).is_ok_and(|m| m.len() == 0) {
            let _ = fs::remove_file(&stderr_path);
        }
        Ok(resp)
    }
}

fn op_name(ty: rpc::Criu_req_type) -> &'static str {
    match ty {
        rpc::Criu_req_type::DUMP => "dump",
        rpc::Criu_req_type::RESTORE => "restore",
        rpc::Criu_req_type::FEATURE_CHECK => "feature-check",
        rpc::Criu_req_type::VERSION => "version",
        _ => "request",
    }
}

/// Maps known causes in CRIU's log to their own variants.
fn classify(op: &'static str, errno: i32, errmsg: String, log: CriuLog) -> CriuError {
    let lines: Vec<&str> = log.tail.lines().collect();
    // CRIU's errmsg is its first error, often a harmless one (rlimit). The first
    // error of the tail, leaving out that one and the closing "Restoring FAILED", is
    // the cause; the errors after it are consequences.
    let errmsg = match lines
        .iter()
        .filter(|l| {
            !l.contains("Restoring FAILED")
                && !l.contains("Dumping FAILED")
                && !l.contains("rlimit:")
        })
        .find_map(|l| l.find("Error (").map(|i| &l[i..]))
    {
        Some(last) => last.trim().to_owned(),
        None if errmsg.trim().is_empty() => "no message".to_owned(),
        None => errmsg.trim().to_owned(),
    };
    if op == "dump"
        && lines
            .iter()
            .any(|l| l.contains("Connected TCP socket") || l.contains("--tcp-established"))
    {
        return CriuError::EstablishedTcp { log };
    }
    if op == "restore" {
        // CRIU 4.2 says "has bad size 6 (expect 3)", older ones "has wrong size".
        if let Some(line) = lines
            .iter()
            .find(|l| l.contains("has bad size") || l.contains("has wrong size"))
        {
            let line = line.trim().to_owned();
            return CriuError::FileSizeChanged { line, log };
        }
        if let Some(line) = lines
            .iter()
            .find(|l| l.contains("Error") && l.contains("Address already in use"))
        {
            let line = line.trim().to_owned();
            return CriuError::AddressInUse { line, log };
        }
        if let Some(pid) = lines.iter().find_map(|l| pid_in_use(l)) {
            return CriuError::PidInUse {
                pid,
                log: Some(log),
            };
        }
    }
    CriuError::Failed {
        op,
        errno,
        errmsg,
        log,
    }
}

/// `Can't fork for 1234: File exists` and similar lines of a restore log.
fn pid_in_use(line: &str) -> Option<i32> {
    if !line.contains("File exists") {
        return None;
    }
    let idx = line.find("for ")?;
    let digits: String = line[idx + 4..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Parses `Version: 4.2.1` (or `Version: 3.17`) out of `criu --version`.
pub(crate) fn parse_version(text: &str) -> Option<CriuVersion> {
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?;
    let mut parts = line.trim().split('.');
    let major = parts.next()?.trim().parse().ok()?;
    let minor = parts.next()?.trim().parse().ok()?;
    let sublevel = match parts.next() {
        Some(s) => s
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or(0),
        None => 0,
    };
    Some(CriuVersion {
        major,
        minor,
        sublevel,
    })
}

/// The last [`LOG_TAIL_LINES`] lines of `path` (reading at most its last 64 KiB), or
/// of `fallback` when `path` is empty or missing.
pub(crate) fn log_tail(path: &Path, fallback: Option<&Path>) -> CriuLog {
    let tail = read_tail(path);
    if tail.is_empty()
        && let Some(f) = fallback
    {
        let t = read_tail(f);
        if !t.is_empty() {
            return CriuLog {
                path: f.to_path_buf(),
                tail: t,
            };
        }
    }
    CriuLog {
        path: path.to_path_buf(),
        tail,
    }
}

fn read_tail(path: &Path) -> String {
    const MAX: u64 = 64 << 10;
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX && f.seek(SeekFrom::Start(len - MAX)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.take(MAX).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(LOG_TAIL_LINES);
    lines[from..].join("\n")
}

fn write_meta(images_dir: &Path, meta: &DumpMeta) -> Result<(), CriuError> {
    let path = images_dir.join(DUMP_META_FILE);
    let tmp = images_dir.join(format!("{DUMP_META_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(meta).map_err(|e| CriuError::Io {
        op: "encode",
        path: path.clone(),
        source: io::Error::other(e),
    })?;
    fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("rename", &path))
}

/// The dump's metadata; `None` for images not made by this crate.
pub fn read_meta(images_dir: &Path) -> Result<Option<DumpMeta>, CriuError> {
    let path = images_dir.join(DUMP_META_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|_| CriuError::NotAnImage {
            dir: images_dir.to_path_buf(),
            file: DUMP_META_FILE,
        })
}

/// Bytes of the `*.img` files in `dir`.
pub fn image_bytes(dir: &Path) -> Result<u64, CriuError> {
    let mut total = 0;
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        if !name.to_string_lossy().ends_with(".img") {
            continue;
        }
        let meta = entry.metadata().map_err(io_err("stat", &entry.path()))?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CriuError + 'a {
    move |source| CriuError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        let v = parse_version("Version: 4.2.1\nGitID: v4.2.1\n").unwrap();
        assert_eq!((v.major, v.minor, v.sublevel), (4, 2, 1));
        let v = parse_version("Version: 3.17\n").unwrap();
        assert_eq!((v.major, v.minor, v.sublevel), (3, 17, 0));
        assert!(v < MIN_CRIU_VERSION);
        assert!(parse_version("criu: unknown").is_none());
    }

    #[test]
    fn known_causes_are_classified() {
        let log = |tail: &str| CriuLog {
            path: PathBuf::from("x.log"),
            tail: tail.to_owned(),
        };
        let e = classify(
            "dump",
            0,
            String::new(),
            log(
                "(00.01) Error (criu/sk-inet.c:200): inet: Connected TCP socket, consider using --tcp-established option.",
            ),
        );
        assert!(matches!(e, CriuError::EstablishedTcp { .. }), "{e}");
        let e = classify(
            "restore",
            0,
            String::new(),
            log(
                "(00.02) Error (criu/files-reg.c:2222): File tmp/out.txt has wrong size 10 (expected 4)",
            ),
        );
        assert!(matches!(e, CriuError::FileSizeChanged { .. }), "{e}");
        let e = classify(
            "restore",
            0,
            String::new(),
            log("(00.03) Error (criu/cr-restore.c:1500): Can't fork for 4242: File exists"),
        );
        assert!(matches!(e, CriuError::PidInUse { pid: 4242, .. }), "{e}");
        let e = classify(
            "restore",
            0,
            String::new(),
            log(
                "(00.04) 1: Error (criu/sk-inet.c:1059): inet: Can't bind inet socket (id 11): Address already in use",
            ),
        );
        assert!(matches!(e, CriuError::AddressInUse { .. }), "{e}");
        let e = classify(
            "restore",
            0,
            String::new(),
            log(
                "(00.0) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self\n(00.1) 1: Error (criu/x.c:1): the real cause\n(00.15) 1: Error (criu/files.c:1221): Unable to open fd=3\n(00.2) Error (criu/cr-restore.c:2331): Restoring FAILED.",
            ),
        );
        assert!(
            e.to_string()
                .starts_with("criu restore failed: Error (criu/x.c:1): the real cause"),
            "{e}"
        );
        let e = classify("restore", 2, "boom".to_owned(), log("nothing known"));
        assert!(matches!(e, CriuError::Failed { errno: 2, .. }), "{e}");
        assert!(e.to_string().contains("nothing known"));
    }

    #[test]
    fn tail_keeps_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        fs::write(&p, text).unwrap();
        let t = log_tail(&p, None);
        assert_eq!(t.tail.lines().count(), LOG_TAIL_LINES);
        assert!(t.tail.ends_with("line 99"));
        let missing = log_tail(&dir.path().join("none"), Some(&p));
        assert_eq!(missing.path, p);
    }
}
