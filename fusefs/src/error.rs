//! Errors of the filesystem core, each with the errno the kernel sees.

use std::io;
use std::time::Duration;

use nix::libc;

/// Why a backing-store call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackingError {
    /// Local I/O on the backing failed.
    #[error("backing i/o failed on {path}")]
    Io {
        /// Path relative to the tree root.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The backing did not answer in time.
    #[error("backing {op} timed out after {after:?}")]
    Timeout {
        /// Which call.
        op: &'static str,
        /// How long the caller waited.
        after: Duration,
    },
    /// The channel to the backing is gone (agent shutting down or disconnected).
    #[error("backing channel closed during {op}")]
    Disconnected {
        /// Which call.
        op: &'static str,
    },
    /// Too many requests are already waiting for the backing.
    #[error("backing request queue is full")]
    QueueFull,
    /// The tree has no such file, or not at that version.
    #[error("{path} not found in the backing (version {version:?})")]
    NotFound {
        /// Path relative to the tree root.
        path: String,
        /// Version asked for.
        version: String,
    },
    /// The file changed in the backing since the writer's base version.
    #[error("{path} changed in the backing since version {base_version:?}")]
    Conflict {
        /// Path relative to the tree root.
        path: String,
        /// The version the writer started from.
        base_version: String,
    },
    /// The backing does not serve this tree.
    #[error("tree {0:?} is not served by this backing")]
    NoSuchTree(nbagent_protocol::FileRoot),
    /// The backing refuses mutations of this tree.
    #[error("tree is read-only in the backing")]
    ReadOnly,
    /// A listing was refused.
    #[error("listing refused")]
    Listing(#[source] ListingError),
    /// The server's answer was refused: beyond a configured bound (a file size, a
    /// reply longer than asked), so it is not trusted.
    #[error("the server's answer to {op} was refused: {reason}")]
    Untrusted {
        /// Which call.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// The server reported an error.
    #[error("server refused {op}: {reason}")]
    Remote {
        /// Which call.
        op: &'static str,
        /// What the server said.
        reason: String,
    },
}

/// Why a listing from the backing was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ListingError {
    /// More entries than the configured limit.
    #[error("listing has {count} entries, more than the limit of {limit}")]
    TooManyEntries {
        /// Entries in the listing (at least).
        count: usize,
        /// The configured limit.
        limit: usize,
    },
    /// An entry's path is unsafe or malformed.
    #[error("listing entry {path:?} is invalid")]
    InvalidPath {
        /// The path as received.
        path: String,
        /// Why.
        #[source]
        reason: PathError,
    },
    /// Two entries have the same path.
    #[error("listing has {path:?} twice")]
    Duplicate {
        /// The path.
        path: String,
    },
    /// An entry lies below a path that is a file.
    #[error("listing entry {path:?} lies below a file")]
    ParentIsFile {
        /// The path.
        path: String,
    },
    /// A file entry has a version that cannot name content.
    #[error("listing entry {path:?} has an invalid version")]
    InvalidVersion {
        /// The path.
        path: String,
    },
}

/// Why a name or path is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// Empty name or path.
    #[error("empty name")]
    Empty,
    /// `.` or `..`.
    #[error("name is a dot or dot-dot")]
    Dot,
    /// The name holds a `/`.
    #[error("name holds a slash")]
    Slash,
    /// The name holds a NUL byte.
    #[error("name holds a nul byte")]
    Nul,
    /// The name is not UTF-8 (paths of the protocol are strings).
    #[error("name is not utf-8")]
    NotUtf8,
    /// A component is longer than 255 bytes.
    #[error("name is {0} bytes, more than 255")]
    NameTooLong(usize),
    /// The whole path is longer than 4096 bytes.
    #[error("path is {0} bytes, more than 4096")]
    PathTooLong(usize),
    /// The path starts with `/`.
    #[error("path is absolute")]
    Absolute,
}

impl PathError {
    /// The errno for this refusal.
    pub fn errno(&self) -> i32 {
        match self {
            PathError::NameTooLong(_) | PathError::PathTooLong(_) => libc::ENAMETOOLONG,
            PathError::Empty => libc::ENOENT,
            PathError::Dot
            | PathError::Slash
            | PathError::Nul
            | PathError::NotUtf8
            | PathError::Absolute => libc::EINVAL,
        }
    }
}

/// An error of the filesystem core. Every variant maps to an errno with [`FsError::errno`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    /// No such file or directory.
    #[error("no such entry")]
    NotFound,
    /// The name already exists.
    #[error("entry exists")]
    Exists,
    /// A directory was expected.
    #[error("not a directory")]
    NotDir,
    /// A file was expected.
    #[error("is a directory")]
    IsDir,
    /// The directory is not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// The tree is read-only.
    #[error("tree is read-only")]
    ReadOnly,
    /// Not supported on purpose (symlinks, hard links, special files).
    #[error("operation not permitted")]
    NotPermitted,
    /// A name or path was refused.
    #[error("invalid name")]
    InvalidName(#[from] PathError),
    /// An invalid argument (rename into itself, unknown flags).
    #[error("invalid argument")]
    InvalidArgument,
    /// Unknown inode.
    #[error("unknown inode {0}")]
    UnknownInode(u64),
    /// Unknown or wrong-mode file handle.
    #[error("bad file handle {0}")]
    BadHandle(u64),
    /// The operation is not implemented (the kernel may fall back).
    #[error("not implemented")]
    NotImplemented,
    /// A file is too big for the operation.
    #[error("file too big")]
    TooBig,
    /// A file written but not uploaded vanished from the server's listing (with its
    /// directory, or removed there): its content cannot be placed, so the close fails
    /// rather than reporting success.
    #[error("{path} vanished from the server before it was uploaded")]
    Vanished {
        /// The file's last path.
        path: String,
    },
    /// The backing store failed.
    #[error("backing store failed")]
    Backing(#[from] BackingError),
    /// Local I/O (staging or cache) failed.
    #[error("local i/o failed")]
    Io(#[from] io::Error),
}

impl FsError {
    /// The errno for the kernel.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::ReadOnly => libc::EROFS,
            FsError::NotPermitted => libc::EPERM,
            FsError::InvalidName(p) => p.errno(),
            FsError::InvalidArgument => libc::EINVAL,
            FsError::UnknownInode(_) => libc::ENOENT,
            FsError::BadHandle(_) => libc::EBADF,
            FsError::NotImplemented => libc::ENOSYS,
            FsError::TooBig => libc::EFBIG,
            FsError::Vanished { .. } => libc::EIO,
            FsError::Backing(BackingError::ReadOnly) => libc::EROFS,
            FsError::Backing(BackingError::NotFound { .. }) => libc::ESTALE,
            FsError::Backing(_) => libc::EIO,
            FsError::Io(e) => match e.raw_os_error() {
                Some(libc::ENOSPC) => libc::ENOSPC,
                Some(libc::EDQUOT) => libc::EDQUOT,
                _ => libc::EIO,
            },
        }
    }
}

/// Result of the core.
pub type FsResult<T> = Result<T, FsError>;
