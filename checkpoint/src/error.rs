//! Errors of the CRIU driver.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// The oldest CRIU this crate drives.
pub const MIN_CRIU_VERSION: CriuVersion = CriuVersion {
    major: 4,
    minor: 2,
    sublevel: 0,
};

/// A CRIU version `major.minor.sublevel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CriuVersion {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Sublevel (patch) number, 0 when CRIU does not report one.
    pub sublevel: u32,
}

impl fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.sublevel)
    }
}

/// What a failed CRIU operation left behind to explain itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuLog {
    /// The per-operation log file (`dump.log`, `restore.log`, ...).
    pub path: PathBuf,
    /// Its last lines (see [`crate::LOG_TAIL_LINES`]), or what the worker wrote on
    /// standard error when the log is missing.
    pub tail: String,
}

impl fmt::Display for CriuLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tail.is_empty() {
            write!(f, "log {} is empty or missing", self.path.display())
        } else {
            write!(f, "last lines of {}:\n{}", self.path.display(), self.tail)
        }
    }
}

/// Errors of the CRIU driver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CriuError {
    /// The CRIU binary could not be started.
    #[error("cannot start criu at {binary}")]
    Spawn {
        /// The configured binary.
        binary: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `criu --version` printed nothing we understand.
    #[error("cannot read criu's version from {binary}: {output:?}")]
    VersionUnknown {
        /// The configured binary.
        binary: PathBuf,
        /// What it printed (first line).
        output: String,
    },
    /// The installed CRIU is too old.
    #[error(
        "criu {found} at {binary} is too old: {required} or newer is needed because criu \
         before 4.2 cannot dump processes holding IPv4 sockets on kernels >= 6.16 (and \
         ipykernel always holds one); run scripts/criu.sh to install criu 4.2 into \
         /opt/nbagent/criu and point the criu binary setting at /opt/nbagent/criu/bin/criu"
    )]
    TooOld {
        /// The configured binary.
        binary: PathBuf,
        /// Its version.
        found: CriuVersion,
        /// The oldest supported version.
        required: CriuVersion,
    },
    /// The socketpair to `criu swrk` failed.
    #[error("criu rpc socket failed")]
    Socket {
        /// The cause.
        #[source]
        source: nix::errno::Errno,
    },
    /// A message to or from `criu swrk` could not be encoded or decoded.
    #[error("criu rpc message is malformed")]
    Protobuf {
        /// The cause.
        #[source]
        source: protobuf::Error,
    },
    /// `criu swrk` answered something unexpected.
    #[error("criu rpc protocol error: {reason}")]
    Protocol {
        /// What was wrong.
        reason: String,
    },
    /// `criu swrk` closed the connection without answering.
    #[error("criu swrk exited without answering")]
    WorkerGone,
    /// `criu swrk` did not answer in time and was killed.
    #[error("criu swrk did not answer within {after:?} and was killed")]
    Timeout {
        /// The limit.
        after: std::time::Duration,
    },
    /// A file operation failed.
    #[error("checkpoint i/o failed: {op} {path}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The process to dump does not exist.
    #[error("cannot dump pid {pid}: no such process")]
    NoSuchProcess {
        /// The pid.
        pid: i32,
    },
    /// The images directory holds no dump made by this crate.
    #[error("{dir} holds no checkpoint images (no {file})")]
    NotAnImage {
        /// The images directory.
        dir: PathBuf,
        /// The file that is missing or unreadable.
        file: &'static str,
    },
    /// A process of the tree to restore still runs (or is an unreaped zombie).
    #[error("cannot restore: pid {pid} is in use; kill and reap the live tree first (kill_tree)")]
    PidInUse {
        /// The pid.
        pid: i32,
        /// CRIU's log when CRIU found it, `None` when we did before calling CRIU.
        log: Option<CriuLog>,
    },
    /// The tree holds an established TCP connection and the dump was not told what to
    /// do with it.
    #[error("criu dump refused an established tcp connection (dump with tcp_close); {log}")]
    EstablishedTcp {
        /// CRIU's log.
        log: CriuLog,
    },
    /// A file the tree holds open changed size since the dump.
    #[error(
        "cannot restore: a file held open changed size since the dump ({line}); files \
         written while checkpointed must be opened with O_APPEND; {log}"
    )]
    FileSizeChanged {
        /// CRIU's log line naming the file.
        line: String,
        /// CRIU's log.
        log: CriuLog,
    },
    /// A socket of the tree cannot get its address back.
    #[error(
        "cannot restore: a socket's address is in use ({line}); a listener without \
         SO_REUSEADDR cannot rebind over the TIME_WAIT of its killed connections, or \
         another process took the port; {log}"
    )]
    AddressInUse {
        /// CRIU's log line.
        line: String,
        /// CRIU's log.
        log: CriuLog,
    },
    /// Incremental dumps were asked for but this kernel cannot track dirty memory.
    #[error("incremental dump asked for but criu reports no memory dirty tracking here")]
    NoDirtyTracking,
    /// Lazy restore was asked for but this kernel has no non-cooperative userfaultfd.
    #[error("lazy restore asked for but criu reports no uffd-noncoop support here")]
    NoLazyPages,
    /// The lazy-pages daemon did not come up.
    #[error("criu lazy-pages daemon did not start: {reason}; {log}")]
    LazyPagesDaemon {
        /// What went wrong.
        reason: String,
        /// The daemon's log.
        log: CriuLog,
    },
    /// Any other CRIU failure.
    #[error("criu {op} failed: {errmsg} (errno {errno}); {log}")]
    Failed {
        /// `dump`, `restore`, `feature-check`, ...
        op: &'static str,
        /// `cr_errno` of the response (0 when CRIU gave none).
        errno: i32,
        /// `cr_errmsg` of the response, or a placeholder.
        errmsg: String,
        /// CRIU's log.
        log: CriuLog,
    },
    /// Killing or reaping a tree failed or did not finish in time.
    #[error("cannot kill process tree of pid {pid}: {reason}")]
    Kill {
        /// The root.
        pid: i32,
        /// What went wrong.
        reason: String,
    },
}

impl CriuError {
    /// CRIU's log attached to this error, if any.
    pub fn log(&self) -> Option<&CriuLog> {
        match self {
            CriuError::PidInUse { log, .. } => log.as_ref(),
            CriuError::EstablishedTcp { log }
            | CriuError::FileSizeChanged { log, .. }
            | CriuError::AddressInUse { log, .. }
            | CriuError::LazyPagesDaemon { log, .. }
            | CriuError::Failed { log, .. } => Some(log),
            _ => None,
        }
    }
}
