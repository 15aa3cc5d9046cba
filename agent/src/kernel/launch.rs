//! Launching the kernel confined: its own PID namespace, the notebook's user, no
//! capabilities.
//!
//! ```text
//! agent --clone(CLONE_NEWPID)+exec--> nbagent __kernel-init   (PID 1 of the new namespace)
//!       --fork+exec--> the kernel argv                          (PID 2)
//! ```
//!
//! [`launch`] clones a child into a new PID namespace with a raw
//! `clone(CLONE_NEWPID | SIGCHLD)`, so the init is the agent's direct child (the agent
//! waits for it) and PID 1 of the namespace. Everything the child needs is prepared
//! before the clone; the child only `dup2`s its descriptors and `execve`s the init (the
//! agent is multi-threaded). The child's stdin is `/dev/null`, its stdout and stderr the
//! kernel log opened `O_APPEND | O_CREAT` (a CRIU restore needs every file the kernel
//! holds to be append-only), fd 3 the report pipe and fd 4 the configuration pipe. The
//! init ([`super::init`]) drops privileges, starts the kernel and reports its pid (or its
//! failure, naming the step) on the report pipe, which [`launch`] waits for.
//!
//! # Exit status
//!
//! The init exits with the kernel's exit code, or with 128 + N if signal N killed the
//! kernel (the shell convention). [`KernelExit::from_init`] reads a status above 128 (and
//! at most 128 + 64) as death by signal, so a kernel that itself calls `exit(137)` reads
//! as killed by SIGKILL. If the init itself is killed (e.g. [`KernelProcess::kill`] with
//! SIGKILL, which tears down the whole namespace), that signal is reported.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tracing::{info, instrument, warn};

use super::init::{INIT_ARG, InitConfig, InitReport, REPORT_FD};
use super::sys::{ExecArgs, clone_newpid, dup_and_exec, raw_write};
use crate::users::UserInfo;

/// The descriptor on which the init reads its [`InitConfig`].
pub const CONFIG_FD: i32 = 4;

/// `PATH` for the kernel when the agent has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Marker the cloned child writes on the report pipe when `execve` of the init fails,
/// followed by the errno (4 bytes, native endian).
const EXEC_FAILED: &[u8; 4] = b"EXEC";

/// Errors of the kernel launch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// The kernel argv is empty.
    #[error("kernel {kernel}: the kernel argv is empty")]
    EmptyArgv {
        /// The kernel.
        kernel: String,
    },
    /// A bare `argv[0]` is not on the kernel's PATH.
    #[error(
        "kernel {kernel}: program {program} not found on the kernel's PATH ({path}); install it or add its directory to the kernel path"
    )]
    ProgramNotFound {
        /// The kernel.
        kernel: String,
        /// `argv[0]`.
        program: String,
        /// The PATH searched.
        path: String,
    },
    /// A file, directory or pipe could not be prepared.
    #[error("kernel {kernel}: cannot {action} {}", path.display())]
    Io {
        /// The kernel.
        kernel: String,
        /// What was being done.
        action: &'static str,
        /// The file concerned (may be empty).
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A string for `execve` holds a NUL byte.
    #[error("kernel {kernel}: an argument or environment variable holds a NUL byte")]
    Nul {
        /// The kernel.
        kernel: String,
        /// The cause.
        #[source]
        source: std::ffi::NulError,
    },
    /// `clone(CLONE_NEWPID)` failed.
    #[error(
        "kernel {kernel}: cannot create a PID namespace (clone(CLONE_NEWPID)); the agent needs CAP_SYS_ADMIN"
    )]
    Clone {
        /// The kernel.
        kernel: String,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The init executable could not be executed.
    #[error("kernel {kernel}: cannot execute the kernel init {}", path.display())]
    ExecInit {
        /// The kernel.
        kernel: String,
        /// The init executable.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The init failed before the kernel started (dropping privileges, or starting the
    /// kernel).
    #[error("kernel {kernel} for user {user}: {error}")]
    Init {
        /// The kernel.
        kernel: String,
        /// The user.
        user: String,
        /// The failed privileged step, if that is what failed.
        step: Option<String>,
        /// The init's error and causes.
        error: String,
    },
    /// The init exited without reporting.
    #[error(
        "kernel {kernel}: the kernel init exited before starting the kernel ({status:?}); kernel log tail: {log_tail}"
    )]
    InitDied {
        /// The kernel.
        kernel: String,
        /// Its wait status.
        status: String,
        /// The end of the kernel log.
        log_tail: String,
    },
    /// The init did not report within the start timeout.
    #[error("kernel {kernel}: the kernel init did not start the kernel within {timeout:?}")]
    StartTimeout {
        /// The kernel.
        kernel: String,
        /// The timeout.
        timeout: Duration,
    },
    /// A system call on the running kernel failed.
    #[error("kernel {kernel}: {action} failed")]
    Sys {
        /// The kernel.
        kernel: String,
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The kernel has already exited and was reaped.
    #[error("kernel {kernel} has already exited ({exit})")]
    NotRunning {
        /// The kernel.
        kernel: String,
        /// How it exited.
        exit: KernelExit,
    },
}

/// How the environment of the kernel is built from the agent's.
///
/// The kernel gets: `PATH` ([`EnvPolicy::extra_path`] first, then the agent's `PATH` or
/// [`EnvPolicy::default_path`]); `LANG`, `LC_*`, `TZ`, `TERM` and `MPLBACKEND` if set;
/// `HOME`, `USER`, `LOGNAME` and `SHELL` of the notebook user; every `KERNEL_*`
/// variable; then the kernelspec's own `env`. Never `NBAGENT_*`, `NBSUPERVISOR_*`,
/// `JPY_PARENT_PID`, anything whose name contains `TOKEN`, `SECRET`, `KEY` or `PASSWORD`
/// (unless it starts with `KERNEL_`), nor anything else of the agent's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvPolicy {
    /// Directories put first on the kernel's PATH (the kernel venv's `bin`).
    pub extra_path: Vec<PathBuf>,
    /// PATH when the agent has none.
    pub default_path: String,
}

impl Default for EnvPolicy {
    fn default() -> Self {
        Self {
            extra_path: Vec::new(),
            default_path: DEFAULT_PATH.into(),
        }
    }
}

fn is_agent_var(name: &str) -> bool {
    name.starts_with("NBAGENT_") || name.starts_with("NBSUPERVISOR_") || name == "JPY_PARENT_PID"
}

fn is_secret_name(name: &str) -> bool {
    let up = name.to_ascii_uppercase();
    ["TOKEN", "SECRET", "KEY", "PASSWORD"]
        .iter()
        .any(|s| up.contains(s))
}

fn passes_through(name: &str) -> bool {
    matches!(name, "LANG" | "TZ" | "TERM" | "MPLBACKEND") || name.starts_with("LC_")
}

impl EnvPolicy {
    /// The kernel's whole environment.
    pub fn build<I, K, V>(
        &self,
        agent_env: I,
        user: &UserInfo,
        spec_env: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut env = BTreeMap::new();
        let mut agent_path = None;
        for (k, v) in agent_env {
            let (k, v) = (k.as_ref(), v.as_ref());
            if k.starts_with("KERNEL_") {
                env.insert(k.to_owned(), v.to_owned());
            } else if is_agent_var(k) || is_secret_name(k) {
                continue;
            } else if k == "PATH" {
                agent_path = Some(v.to_owned());
            } else if passes_through(k) {
                env.insert(k.to_owned(), v.to_owned());
            }
        }
        let base = agent_path
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| self.default_path.clone());
        let mut parts: Vec<String> = self
            .extra_path
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        for p in base.split(':') {
            if !p.is_empty() && !parts.iter().any(|q| q == p) {
                parts.push(p.to_owned());
            }
        }
        env.insert("PATH".into(), parts.join(":"));
        env.insert("HOME".into(), user.home.to_string_lossy().into_owned());
        env.insert("USER".into(), user.name.clone());
        env.insert("LOGNAME".into(), user.name.clone());
        env.insert("SHELL".into(), user.shell.to_string_lossy().into_owned());
        for (k, v) in spec_env {
            if !is_agent_var(k) {
                env.insert(k.clone(), v.clone());
            }
        }
        env
    }
}

/// Resolves a bare `program` (no `/`) against `path` (a `PATH` value): the first
/// regular executable file. A program with a `/` is returned as it is.
pub fn resolve_program(program: &str, path: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    if program.is_empty() {
        return None;
    }
    path.split(':').filter(|d| !d.is_empty()).find_map(|d| {
        let candidate = Path::new(d).join(program);
        let meta = std::fs::metadata(&candidate).ok()?;
        (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(candidate)
    })
}

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// Kernel name (for logs and errors).
    pub kernel: String,
    /// The kernel argv (connection file already substituted); a bare `argv[0]` is
    /// resolved against the `PATH` of `env`.
    pub argv: Vec<String>,
    /// The kernel's environment (see [`EnvPolicy`]).
    pub env: BTreeMap<String, String>,
    /// The notebook user (already authorized, see [`crate::users`]).
    pub user: UserInfo,
    /// Working directory [default: the user's home].
    pub cwd: Option<PathBuf>,
    /// Working directory of the kernel's init [default: the kernel's]. Give it a
    /// directory of this kernel alone, writable by its user: CRIU's parasite creates a
    /// scratch directory there during dumps.
    pub init_cwd: Option<PathBuf>,
    /// The kernel log (stdout and stderr), opened `O_APPEND | O_CREAT`, mode 0600.
    pub log_path: PathBuf,
    /// The executable run as the init with `__kernel-init` [default: `/proc/self/exe`].
    pub init_exe: PathBuf,
    /// Where `/proc` is mounted.
    pub proc_root: PathBuf,
    /// How long the init may take to start the kernel.
    pub start_timeout: Duration,
}

impl LaunchConfig {
    /// A configuration with the defaults.
    pub fn new(
        kernel: impl Into<String>,
        argv: Vec<String>,
        env: BTreeMap<String, String>,
        user: UserInfo,
        log_path: impl Into<PathBuf>,
    ) -> Self {
        Self {
            kernel: kernel.into(),
            argv,
            env,
            user,
            cwd: None,
            init_cwd: None,
            log_path: log_path.into(),
            init_exe: "/proc/self/exe".into(),
            proc_root: "/proc".into(),
            start_timeout: Duration::from_secs(10),
        }
    }
}

/// How the kernel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelExit {
    /// It exited with this code.
    Exited(i32),
    /// This signal killed it (or its init).
    Signaled(i32),
}

impl KernelExit {
    /// Reads the init's wait status (see the module documentation for the convention).
    pub fn from_init(status: WaitStatus) -> Option<Self> {
        match status {
            WaitStatus::Exited(_, c) if c > 128 && c <= 128 + 64 => {
                Some(KernelExit::Signaled(c - 128))
            }
            WaitStatus::Exited(_, c) => Some(KernelExit::Exited(c)),
            WaitStatus::Signaled(_, s, _) => Some(KernelExit::Signaled(s as i32)),
            _ => None,
        }
    }

    /// Shell-style status: the exit code, or 128 + signal.
    pub fn code(self) -> i32 {
        match self {
            KernelExit::Exited(c) => c,
            KernelExit::Signaled(s) => 128 + s,
        }
    }

    /// The exit code, if it exited.
    pub fn exit_code(self) -> Option<i32> {
        match self {
            KernelExit::Exited(c) => Some(c),
            KernelExit::Signaled(_) => None,
        }
    }

    /// The signal, if one killed it.
    pub fn signal(self) -> Option<i32> {
        match self {
            KernelExit::Exited(_) => None,
            KernelExit::Signaled(s) => Some(s),
        }
    }
}

impl std::fmt::Display for KernelExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelExit::Exited(c) => write!(f, "exit code {c}"),
            KernelExit::Signaled(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by {sig}"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

/// A launched kernel: its init (the agent's child), and the kernel log.
///
/// Dropping it neither kills nor reaps the kernel: a kernel outlives a crashed agent and
/// is adopted by the next one (verify the pid with [`proc_start_time`]).
#[derive(Debug)]
pub struct KernelProcess {
    kernel: String,
    pid: Pid,
    start_time: u64,
    log_path: PathBuf,
    proc_root: PathBuf,
    exit: Option<KernelExit>,
}

impl KernelProcess {
    /// The init's pid (in the agent's namespace).
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// The kernel name.
    pub fn kernel(&self) -> &str {
        &self.kernel
    }

    /// The init's start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot).
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// The kernel log.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The kernel's pid in the agent's namespace (the init's only direct child
    /// normally), from `/proc/<init>/task/<init>/children`.
    pub fn kernel_pid(&self) -> Option<i32> {
        children(&self.proc_root, self.pid()).into_iter().next()
    }

    fn running(&self) -> Result<(), LaunchError> {
        match self.exit {
            Some(exit) => Err(LaunchError::NotRunning {
                kernel: self.kernel.clone(),
                exit,
            }),
            None => Ok(()),
        }
    }

    /// Sends `signal` to the init: SIGKILL ends the whole namespace at once; the init
    /// forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the kernel.
    pub fn kill(&self, signal: Signal) -> Result<(), LaunchError> {
        self.running()?;
        nix::sys::signal::kill(self.pid, signal).map_err(|source| LaunchError::Sys {
            kernel: self.kernel.clone(),
            action: "kill",
            source,
        })
    }

    /// Interrupts the kernel (SIGINT, forwarded by the init): for kernelspecs with
    /// `interrupt_mode` `signal`.
    pub fn interrupt(&self) -> Result<(), LaunchError> {
        self.kill(Signal::SIGINT)
    }

    /// A pidfd of the init, readable once it exits (for an async runtime to poll).
    pub fn pidfd(&self) -> Result<OwnedFd, LaunchError> {
        self.running()?;
        super::sys::pidfd_open(self.pid).map_err(|source| LaunchError::Io {
            kernel: self.kernel.clone(),
            action: "open a pidfd for",
            path: PathBuf::from(self.pid.to_string()),
            source,
        })
    }

    fn wait_with(&mut self, flags: Option<WaitPidFlag>) -> Result<Option<KernelExit>, LaunchError> {
        if let Some(exit) = self.exit {
            return Ok(Some(exit));
        }
        loop {
            match waitpid(self.pid, flags) {
                Ok(WaitStatus::StillAlive) => return Ok(None),
                Ok(st) => {
                    if let Some(exit) = KernelExit::from_init(st) {
                        info!(kernel = %self.kernel, pid = self.pid(), %exit, "kernel exited");
                        self.exit = Some(exit);
                        return Ok(Some(exit));
                    }
                }
                Err(Errno::EINTR) => {}
                Err(source) => {
                    return Err(LaunchError::Sys {
                        kernel: self.kernel.clone(),
                        action: "waitpid",
                        source,
                    });
                }
            }
        }
    }

    /// The exit status if the kernel has exited (reaps the init), without blocking.
    pub fn try_wait(&mut self) -> Result<Option<KernelExit>, LaunchError> {
        self.wait_with(Some(WaitPidFlag::WNOHANG))
    }

    /// Waits for the kernel to exit (blocking: call it off the async runtime).
    pub fn wait(&mut self) -> Result<KernelExit, LaunchError> {
        loop {
            if let Some(exit) = self.wait_with(None)? {
                return Ok(exit);
            }
        }
    }

    /// The last `n_lines` lines of the kernel log, reading at most `max_bytes`.
    pub fn log_tail(&self, n_lines: usize, max_bytes: u64) -> io::Result<String> {
        log_tail(&self.log_path, n_lines, max_bytes)
    }
}

/// The last `n_lines` lines of `path`, reading at most its last `max_bytes` bytes (a
/// partial first line is dropped). Invalid UTF-8 is replaced.
pub fn log_tail(path: &Path, n_lines: usize, max_bytes: u64) -> io::Result<String> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max_bytes);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(max_bytes).read_to_end(&mut buf)?;
    let mut text: &[u8] = &buf;
    if start > 0 {
        match text.iter().position(|b| *b == b'\n') {
            Some(i) => text = &text[i + 1..],
            None => text = &[],
        }
    }
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n_lines);
    Ok(lines[from..].join("\n"))
}

/// The start time of `pid` (field 22 of `<proc_root>/<pid>/stat`, clock ticks since
/// boot): with the pid, it names a process unambiguously, so an adopted pid can be
/// checked against the recorded value.
pub fn proc_start_time(proc_root: &Path, pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat"))?;
    parse_start_time(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/<pid>/stat"))
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields from 3 on; start time is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The children of `pid` (from `<proc_root>/<pid>/task/<pid>/children`).
pub fn children(proc_root: &Path, pid: i32) -> Vec<i32> {
    let p = proc_root
        .join(pid.to_string())
        .join("task")
        .join(pid.to_string())
        .join("children");
    std::fs::read_to_string(p)
        .map(|s| {
            s.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Writes the kernel's connection file `path` (mode 0600, owned by `uid:gid`), creating
/// its directory (the per-kernel runtime directory) mode 0700 owned by `uid:gid`. The
/// file is written to a temporary name and renamed, and neither the directory nor the
/// file may be a symbolic link.
pub fn write_connection_file(path: &Path, json: &[u8], uid: u32, gid: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "connection file has no directory",
            )
        })?;
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "connection file has no name")
    })?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!(
            "runtime directory {} is not a directory",
            dir.display()
        )));
    }
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let mut tmp_name = OsStr::new(".").to_os_string();
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    f.write_all(json)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// A duplicate of `fd` numbered above 4 (the child's descriptors 0-4 are `dup2`
/// targets, so no source may be one of them).
fn above_targets(mut fd: OwnedFd) -> io::Result<OwnedFd> {
    // Each duplicate takes the lowest free number, so the low ones stay held (in `held`)
    // until a number above the targets comes out.
    let mut held = Vec::new();
    while fd.as_raw_fd() <= CONFIG_FD {
        let next = fd.try_clone()?;
        held.push(fd);
        fd = next;
    }
    Ok(fd)
}

/// Launches the kernel of `config` (see the module documentation) and waits until the
/// init reports that the kernel started. Blocking: call it off the async runtime.
#[instrument(skip_all, fields(kernel = %config.kernel, user = %config.user.name))]
pub fn launch(config: &LaunchConfig) -> Result<KernelProcess, LaunchError> {
    let kernel = config.kernel.clone();
    let io_err = |action: &'static str, path: &Path| {
        let kernel = kernel.clone();
        let path = path.to_owned();
        move |source| LaunchError::Io {
            kernel: kernel.clone(),
            action,
            path: path.clone(),
            source,
        }
    };
    let (program, rest) = config
        .argv
        .split_first()
        .ok_or_else(|| LaunchError::EmptyArgv {
            kernel: kernel.clone(),
        })?;
    let path_var = config.env.get("PATH").cloned().unwrap_or_default();
    let resolved =
        resolve_program(program, &path_var).ok_or_else(|| LaunchError::ProgramNotFound {
            kernel: kernel.clone(),
            program: program.clone(),
            path: path_var.clone(),
        })?;
    let mut argv = vec![resolved.to_string_lossy().into_owned()];
    argv.extend(rest.iter().cloned());
    let init_config = InitConfig {
        kernel: kernel.clone(),
        argv,
        env: config.env.clone(),
        cwd: config
            .cwd
            .clone()
            .unwrap_or_else(|| config.user.home.clone()),
        init_cwd: config.init_cwd.clone(),
        user: config.user.name.clone(),
        uid: config.user.uid,
        gid: config.user.gid,
        groups: config.user.gids(),
        report_fd: Some(REPORT_FD),
    };
    let config_json = serde_json::to_vec(&init_config).map_err(|e| LaunchError::Io {
        kernel: kernel.clone(),
        action: "encode the init configuration for",
        path: config.init_exe.clone(),
        source: io::Error::other(e),
    })?;

    let log = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&config.log_path)
        .map_err(io_err("open the kernel log", &config.log_path))?;
    // The kernel's user owns its log: a CRIU restore (running as that user) reopens it.
    std::os::unix::fs::fchown(&log, Some(config.user.uid), Some(config.user.gid))
        .map_err(io_err("chown the kernel log", &config.log_path))?;
    let devnull = File::open("/dev/null").map_err(io_err("open", Path::new("/dev/null")))?;
    let pipe = |what| {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| LaunchError::Io {
            kernel: kernel.clone(),
            action: what,
            path: PathBuf::new(),
            source: io::Error::from(e),
        })
    };
    // A socket pair rather than a pipe, for the read timeout.
    let (report_r, report_w) =
        std::os::unix::net::UnixStream::pair().map_err(|source| LaunchError::Io {
            kernel: kernel.clone(),
            action: "create the report socket pair",
            path: PathBuf::new(),
            source,
        })?;
    let report_w = OwnedFd::from(report_w);
    let (config_r, config_w) = pipe("create the configuration pipe")?;
    let dup_err = io_err("duplicate descriptors for", &config.init_exe);
    let log = above_targets(OwnedFd::from(log)).map_err(&dup_err)?;
    let devnull = above_targets(OwnedFd::from(devnull)).map_err(&dup_err)?;
    let report_w = above_targets(report_w).map_err(&dup_err)?;
    let config_r = above_targets(config_r).map_err(dup_err)?;

    let fd_arg = CONFIG_FD.to_string();
    let exec = ExecArgs::new(
        &config.init_exe,
        &[
            OsStr::new("nbagent"),
            OsStr::new(INIT_ARG),
            OsStr::new("--config-fd"),
            OsStr::new(&fd_arg),
        ],
        &[],
    )
    .map_err(|source| LaunchError::Nul {
        kernel: kernel.clone(),
        source,
    })?;
    let dups = [
        (devnull.as_raw_fd(), 0),
        (log.as_raw_fd(), 1),
        (log.as_raw_fd(), 2),
        (report_w.as_raw_fd(), REPORT_FD),
        (config_r.as_raw_fd(), CONFIG_FD),
    ];
    let report_raw = report_w.as_raw_fd();
    let pid = clone_newpid(Box::new(|| {
        let errno = dup_and_exec(&dups, &exec);
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(EXEC_FAILED);
        msg[4..].copy_from_slice(&errno.to_ne_bytes());
        raw_write(report_raw, &msg);
        127
    }))
    .map_err(|source| LaunchError::Clone {
        kernel: kernel.clone(),
        source,
    })?;
    drop((report_w, config_r, log, devnull));
    let start_time = proc_start_time(&config.proc_root, pid.as_raw()).unwrap_or(0);
    let mut process = KernelProcess {
        kernel: kernel.clone(),
        pid,
        start_time,
        log_path: config.log_path.clone(),
        proc_root: config.proc_root.clone(),
        exit: None,
    };

    // The configuration: the init reads it to EOF. A failed write means the init is gone;
    // its report (or exit) says why.
    let mut config_w = File::from(config_w);
    if let Err(e) = config_w.write_all(&config_json) {
        warn!(error = %e, "cannot send the configuration to the kernel init");
    }
    drop(config_w);

    let report = read_report(report_r, config.start_timeout);
    let fail = |process: &mut KernelProcess, err: LaunchError| {
        let _ = process.kill(Signal::SIGKILL);
        let _ = process.wait();
        Err(err)
    };
    match report {
        Ok(Some(bytes)) if bytes.starts_with(EXEC_FAILED) && bytes.len() >= 8 => {
            let mut e = [0u8; 4];
            e.copy_from_slice(&bytes[4..8]);
            fail(
                &mut process,
                LaunchError::ExecInit {
                    kernel,
                    path: config.init_exe.clone(),
                    source: io::Error::from_raw_os_error(i32::from_ne_bytes(e)),
                },
            )
        }
        Ok(Some(bytes)) => match serde_json::from_slice::<InitReport>(bytes.trim_ascii()) {
            Ok(InitReport::Started { kernel_pid }) => {
                info!(pid = pid.as_raw(), kernel_pid, start_time, log = %config.log_path.display(), "kernel launched");
                Ok(process)
            }
            Ok(InitReport::Failed { step, error }) => fail(
                &mut process,
                LaunchError::Init {
                    kernel,
                    user: config.user.name.clone(),
                    step,
                    error,
                },
            ),
            Err(_) => died(&mut process, config),
        },
        Ok(None) => died(&mut process, config),
        Err(()) => fail(
            &mut process,
            LaunchError::StartTimeout {
                kernel,
                timeout: config.start_timeout,
            },
        ),
    }
}

fn died(process: &mut KernelProcess, config: &LaunchConfig) -> Result<KernelProcess, LaunchError> {
    let _ = process.kill(Signal::SIGKILL);
    let status = match process.wait() {
        Ok(exit) => exit.to_string(),
        Err(e) => e.to_string(),
    };
    Err(LaunchError::InitDied {
        kernel: config.kernel.clone(),
        status,
        log_tail: log_tail(&config.log_path, 20, 8192).unwrap_or_default(),
    })
}

/// Reads the init's report: bytes up to the first newline or EOF (`None` if nothing came
/// before EOF); `Err` on timeout.
fn read_report(
    mut sock: std::os::unix::net::UnixStream,
    timeout: Duration,
) -> Result<Option<Vec<u8>>, ()> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return Err(());
        }
        let mut chunk = [0u8; 4096];
        match sock.read(&mut chunk) {
            Ok(0) => return Ok((!buf.is_empty()).then_some(buf)),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.contains(&b'\n') || buf.len() > 1 << 20 {
                    return Ok(Some(buf));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(());
            }
            Err(_) => return Ok((!buf.is_empty()).then_some(buf)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> UserInfo {
        UserInfo {
            name: "nbuser".into(),
            uid: 1001,
            gid: 1001,
            home: "/home/nbuser".into(),
            shell: "/bin/bash".into(),
            groups: vec![(1001, "nbuser".into())],
        }
    }

    #[test]
    fn env_filter() {
        let agent = [
            ("PATH", "/usr/bin:/bin"),
            ("LANG", "C.UTF-8"),
            ("LC_ALL", "C"),
            ("LC_API_KEY", "x"),
            ("TZ", "UTC"),
            ("TERM", "xterm"),
            ("MPLBACKEND", "Agg"),
            ("HOME", "/root"),
            ("USER", "root"),
            ("NBAGENT_TOKEN", "t"),
            ("NBAGENT_SERVER", "s"),
            ("NBSUPERVISOR_X", "s"),
            ("JPY_PARENT_PID", "1"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("GITHUB_TOKEN", "s"),
            ("DB_PASSWORD", "s"),
            ("KERNEL_FOO", "bar"),
            ("KERNEL_API_TOKEN", "ok"),
            ("RANDOM_THING", "no"),
        ];
        let spec: BTreeMap<String, String> = [
            ("PYDEVD_DISABLE".to_string(), "1".to_string()),
            ("NBAGENT_X".into(), "no".into()),
        ]
        .into_iter()
        .collect();
        let policy = EnvPolicy {
            extra_path: vec!["/opt/nbagent/venv/bin".into(), "/usr/bin".into()],
            ..EnvPolicy::default()
        };
        let env = policy.build(agent, &user(), &spec);
        let keys: Vec<&str> = env.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            vec![
                "HOME",
                "KERNEL_API_TOKEN",
                "KERNEL_FOO",
                "LANG",
                "LC_ALL",
                "LOGNAME",
                "MPLBACKEND",
                "PATH",
                "PYDEVD_DISABLE",
                "SHELL",
                "TERM",
                "TZ",
                "USER"
            ]
        );
        assert_eq!(env["PATH"], "/opt/nbagent/venv/bin:/usr/bin:/bin");
        assert_eq!(env["HOME"], "/home/nbuser");
        assert_eq!(env["USER"], "nbuser");
        let none: [(&str, &str); 0] = [];
        let env = EnvPolicy::default().build(none, &user(), &BTreeMap::new());
        assert_eq!(env["PATH"], DEFAULT_PATH);
    }

    #[test]
    fn resolves_bare_programs() {
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("python");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(d.path().join("noexec"), "").unwrap();
        let path = format!("/nonexistent:{}", d.path().display());
        assert_eq!(resolve_program("python", &path), Some(exe));
        assert_eq!(resolve_program("noexec", &path), None);
        assert_eq!(resolve_program("/x/y", ""), Some(PathBuf::from("/x/y")));
    }

    #[test]
    fn exit_convention() {
        let p = Pid::from_raw(5);
        assert_eq!(
            KernelExit::from_init(WaitStatus::Exited(p, 3)),
            Some(KernelExit::Exited(3))
        );
        let k = KernelExit::from_init(WaitStatus::Exited(p, 137)).unwrap();
        assert_eq!((k.signal(), k.code(), k.exit_code()), (Some(9), 137, None));
        assert_eq!(
            KernelExit::from_init(WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            Some(KernelExit::Signaled(9))
        );
        assert_eq!(k.to_string(), "killed by SIGKILL");
    }

    #[test]
    fn tail_of_log() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log");
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, &text).unwrap();
        assert_eq!(log_tail(&p, 2, 1 << 20).unwrap(), "line 998\nline 999");
        // 20 bytes: a partial line is dropped.
        assert_eq!(log_tail(&p, 10, 20).unwrap(), "line 998\nline 999");
        assert_eq!(log_tail(&p, 0, 100).unwrap(), "");
    }

    #[test]
    fn parses_stat_start_time() {
        let stat =
            "123 (a b) c) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 100";
        assert_eq!(parse_start_time(stat), Some(98765));
        let me = proc_start_time(Path::new("/proc"), std::process::id() as i32).unwrap();
        assert!(me > 0);
    }

    #[test]
    fn connection_file_in_private_dir() {
        let d = tempfile::tempdir().unwrap();
        let me = nix::unistd::getuid().as_raw();
        let mg = nix::unistd::getgid().as_raw();
        let path = d.path().join("run/kernel-1/connection.json");
        write_connection_file(&path, b"{}", me, mg).unwrap();
        write_connection_file(&path, b"{\"a\":1}", me, mg).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"a\":1}");
        let fm = std::fs::metadata(&path).unwrap();
        assert_eq!(fm.permissions().mode() & 0o777, 0o600);
        let dm = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(dm.permissions().mode() & 0o777, 0o700);
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }
}
