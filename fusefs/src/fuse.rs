//! The `fuser` adapter: translates kernel calls into [`Fs`] calls and results into
//! replies, nothing more; plus mount and unmount helpers.
//!
//! # Passthrough
//!
//! When the kernel offers `FUSE_PASSTHROUGH` (checked in `init`) and
//! [`MountOptions::passthrough`] is on, a file whose whole content is local (complete in
//! the content cache, or staged for writing) is opened in passthrough mode: the kernel
//! reads and writes the local file directly and the daemon sees no read or write calls.
//! The kernel does not mix modes on one inode: while an inode has passthrough opens every
//! open of it uses the same backing file, and an open that cannot (a writer while readers
//! pass through to the cache file) fails with `EBUSY`. Other files are opened with
//! `FOPEN_KEEP_CACHE` when their content is an immutable version, and served with large
//! reads (the largest read-ahead the kernel allows).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use fuser::{
    BackgroundSession, BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};
use nbagent_protocol::FileKind;
use nix::mount::MntFlags;

use crate::core::{Attr, DEFAULT_TTL, Fs, OpenMode, Opened};
use crate::error::FsError;
use crate::poll::{self, Governor, Poll};

/// How to mount.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MountOptions {
    /// TTL of entries and attributes in the kernel (default 60 s).
    pub ttl: Duration,
    /// FUSE worker threads (default 2).
    pub threads: usize,
    /// Use FUSE passthrough when the kernel offers it (default on).
    pub passthrough: bool,
    /// Let other users than the mounter use the mount (default on: the kernel runs as the
    /// notebook's user).
    pub allow_other: bool,
    /// Name shown in the mount table.
    pub fsname: String,
    /// The kernel's read-ahead for the mount, in bytes (default 8 MiB; 0 leaves the
    /// kernel's default, 128 KiB). Set through `<bdi_dir>/<major>:<minor>/read_ahead_kb`
    /// after the mount; a sequential reader's reads then reach the daemon as requests of
    /// up to the kernel's largest (1 MiB by default) rather than 128 KiB.
    pub kernel_readahead: u64,
    /// Where the kernel lists its backing devices (default `/sys/class/bdi`).
    pub bdi_dir: PathBuf,
    /// How long one worker keeps polling `/dev/fuse` after a metadata request instead
    /// of sleeping in `read` (default 200 us; zero: never). Polling saves the wakeup of
    /// an idle CPU on every round trip of a burst of lookups, getattrs and opens; see
    /// the `poll` module.
    pub busy_poll: Duration,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            ttl: DEFAULT_TTL,
            threads: 2,
            passthrough: true,
            allow_other: true,
            fsname: "nbagent".to_owned(),
            kernel_readahead: 8 << 20,
            bdi_dir: PathBuf::from("/sys/class/bdi"),
            busy_poll: poll::DEFAULT_WINDOW,
        }
    }
}

#[derive(Debug, Default)]
struct BackingIds {
    by_fh: HashMap<u64, Arc<BackingId>>,
    /// Live backing of an inode and whether it is a staging copy.
    by_ino: HashMap<u64, (Weak<BackingId>, bool)>,
    /// Opens of an inode in cached (non-passthrough) mode.
    cached: HashMap<u64, u32>,
    fh_ino: HashMap<u64, u64>,
}

/// The `fuser::Filesystem` over an [`Fs`].
#[derive(Debug)]
pub struct FuseFs {
    fs: Arc<Fs>,
    ttl: Duration,
    want_passthrough: bool,
    passthrough: Arc<AtomicBool>,
    ids: Mutex<BackingIds>,
    /// Busy polling of `/dev/fuse` during metadata bursts (off until mounted).
    poll: Poll,
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Dir => FileType::Directory,
        FileKind::File => FileType::RegularFile,
    }
}

fn to_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 128 << 10,
        flags: 0,
    }
}

impl FuseFs {
    /// An adapter over `fs`.
    pub fn new(fs: Arc<Fs>, options: &MountOptions) -> Self {
        FuseFs {
            fs,
            ttl: options.ttl,
            want_passthrough: options.passthrough,
            passthrough: Arc::new(AtomicBool::new(false)),
            ids: Mutex::new(BackingIds::default()),
            poll: Poll::off(),
        }
    }

    fn ids(&self) -> MutexGuard<'_, BackingIds> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers an open from the core's [`Opened`]; see the module documentation. A
    /// reader's close has nothing to hand over: `FOPEN_NOFLUSH` spares it the `FLUSH`
    /// round trip.
    fn reply_open(&self, ino: u64, write: bool, opened: Opened, reply: ReplyOpen) {
        let fh = opened.fh;
        let base = if write {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_NOFLUSH
        };
        let mut ids = self.ids();
        ids.fh_ino.insert(fh, ino);
        let live = ids
            .by_ino
            .get(&ino)
            .and_then(|(w, staged)| w.upgrade().map(|id| (id, *staged)));
        if let Some((id, staged_backing)) = live {
            if opened.staged && !staged_backing {
                drop(ids);
                tracing::warn!(
                    ino,
                    "file is passed through to cached content; refusing a writer"
                );
                self.forget_handle(fh);
                let _ = self.fs.release(fh);
                reply.error(Errno::EBUSY);
                return;
            }
            if write {
                self.fs.mark_dirty(fh);
            }
            ids.by_fh.insert(fh, id.clone());
            reply.opened_passthrough(FileHandle(fh), base, &id);
            return;
        }
        let cached = ids.cached.get(&ino).copied().unwrap_or(0);
        if self.passthrough.load(Ordering::Relaxed)
            && cached == 0
            && let Some(local) = &opened.local
        {
            match reply.open_backing(&**local) {
                Ok(id) => {
                    let id = Arc::new(id);
                    ids.by_ino.insert(ino, (Arc::downgrade(&id), opened.staged));
                    ids.by_fh.insert(fh, id.clone());
                    drop(ids);
                    if write {
                        self.fs.mark_dirty(fh);
                    }
                    tracing::debug!(ino, fh, staged = opened.staged, "open with passthrough");
                    reply.opened_passthrough(FileHandle(fh), base, &id);
                    return;
                }
                Err(e) => tracing::debug!(ino, error = %e, "passthrough refused; serving reads"),
            }
        }
        *ids.cached.entry(ino).or_default() += 1;
        let flags = if opened.keep_cache && !write {
            base | FopenFlags::FOPEN_KEEP_CACHE
        } else {
            base
        };
        reply.opened(FileHandle(fh), flags);
    }

    fn forget_handle(&self, fh: u64) {
        let mut ids = self.ids();
        let Some(ino) = ids.fh_ino.remove(&fh) else {
            return;
        };
        if ids.by_fh.remove(&fh).is_none()
            && let Some(c) = ids.cached.get_mut(&ino)
        {
            *c = c.saturating_sub(1);
            if *c == 0 {
                ids.cached.remove(&ino);
            }
        }
        if ids
            .by_ino
            .get(&ino)
            .is_some_and(|(w, _)| w.strong_count() == 0)
        {
            ids.by_ino.remove(&ino);
        }
    }

    fn entry(&self, result: Result<Attr, FsError>, reply: ReplyEntry) {
        match result {
            Ok(a) => reply.entry(&self.ttl, &to_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let caps = config.capabilities();
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_AUTO_INVAL_DATA,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            if caps.contains(flag) {
                let _ = config.add_capabilities(flag);
            }
        }
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let pt = self.want_passthrough
            && caps.contains(InitFlags::FUSE_PASSTHROUGH)
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok();
        self.passthrough.store(pt, Ordering::Relaxed);
        tracing::info!(passthrough = pt, "fuse session initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.poll.request();
        self.entry(self.fs.lookup(parent.0, name), reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.poll.request();
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.ttl, &to_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.poll.request();
        // Modes, owners and times are not stored by the backing: accepted and ignored.
        let result = match size {
            Some(size) => self.fs.set_size(ino.0, size),
            None => self.fs.getattr(ino.0),
        };
        match result {
            Ok(a) => reply.attr(&self.ttl, &to_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        self.poll.request();
        if mode & nix::libc::S_IFMT != nix::libc::S_IFREG {
            reply.error(Errno::EPERM);
            return;
        }
        let result = self
            .fs
            .create(parent.0, name, OpenMode::default())
            .and_then(|(attr, opened)| self.fs.release(opened.fh).map(|()| attr));
        self.entry(result, reply);
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.poll.request();
        self.entry(self.fs.mkdir(parent.0, name), reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.poll.request();
        match self.fs.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.poll.request();
        match self.fs.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        self.poll.request();
        self.entry(self.fs.symlink(), reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.poll.request();
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            reply.error(Errno::EINVAL);
            return;
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self
            .fs
            .rename(parent.0, name, newparent.0, newname, noreplace)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.poll.request();
        self.entry(self.fs.link(), reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.poll.request();
        let mode = OpenMode::from_flags(flags.0);
        match self.fs.open(ino.0, mode) {
            Ok(opened) => self.reply_open(ino.0, mode.write, opened, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: fuser::ReplyData,
    ) {
        match self.fs.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.poll.request();
        if !self.fs.writable() {
            // Nothing is ever dirty: ENOSYS makes the kernel stop sending flushes.
            reply.error(Errno::ENOSYS);
            return;
        }
        match self.fs.flush(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fs.fsync(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.poll.request();
        // The passthrough id goes first: an open waiting in the core for this release
        // must not find it still alive and reuse it for a new staging copy.
        self.forget_handle(fh.0);
        if let Err(e) = self.fs.release(fh.0) {
            tracing::warn!(ino = ino.0, error = %e, "release failed");
        }
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        self.poll.request();
        // No extended attributes: ENOSYS makes the kernel stop asking (the kernel asks
        // for security.capability before the first write).
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        self.poll.request();
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctls: plain files are not terminals (Python's open() asks with TCGETS).
        reply.error(Errno::ENOTTY);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.poll.request();
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.poll.request();
        let mut at = offset;
        if at == 0 {
            if reply.add(ino, 1, FileType::Directory, ".") {
                return reply.ok();
            }
            at = 1;
        }
        if at == 1 {
            let parent = INodeNo(self.fs.parent_of(ino.0));
            if reply.add(parent, 2, FileType::Directory, "..") {
                return reply.ok();
            }
            at = 2;
        }
        let skip = usize::try_from(at - 2).unwrap_or(usize::MAX);
        match self.fs.readdir(fh.0, skip) {
            Ok(entries) => {
                for (i, e) in entries.iter().enumerate() {
                    let next = at + i as u64 + 1;
                    if reply.add(INodeNo(e.attr.ino), next, file_type(e.attr.kind), &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.poll.request();
        let mut at = offset;
        let dot = |i: u64| match self.fs.getattr(i) {
            Ok(a) => Some(to_attr(&a)),
            Err(_) => None,
        };
        if at == 0 {
            if let Some(a) = dot(ino.0)
                && reply.add(ino, 1, ".", &self.ttl, &a, Generation(0))
            {
                return reply.ok();
            }
            at = 1;
        }
        if at == 1 {
            let parent = self.fs.parent_of(ino.0);
            if let Some(a) = dot(parent)
                && reply.add(INodeNo(parent), 2, "..", &self.ttl, &a, Generation(0))
            {
                return reply.ok();
            }
            at = 2;
        }
        let skip = usize::try_from(at - 2).unwrap_or(usize::MAX);
        match self.fs.readdir(fh.0, skip) {
            Ok(entries) => {
                for (i, e) in entries.iter().enumerate() {
                    let next = at + i as u64 + 1;
                    let attr = to_attr(&e.attr);
                    if reply.add(attr.ino, next, &e.name, &self.ttl, &attr, Generation(0)) {
                        break;
                    }
                    // The kernel counts a lookup for every entry it was given.
                    self.fs.remember(e.attr.ino);
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.poll.request();
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        self.poll.request();
        let mode = OpenMode::from_flags(flags);
        match self.fs.create(parent.0, name, mode) {
            Ok((attr, opened)) => {
                let fh = opened.fh;
                let mut ids = self.ids();
                ids.fh_ino.insert(fh, attr.ino);
                if self.passthrough.load(Ordering::Relaxed)
                    && let Some(local) = &opened.local
                    && let Ok(id) = reply.open_backing(&**local)
                {
                    let id = Arc::new(id);
                    ids.by_ino.insert(attr.ino, (Arc::downgrade(&id), true));
                    ids.by_fh.insert(fh, id.clone());
                    drop(ids);
                    reply.created_passthrough(
                        &self.ttl,
                        &to_attr(&attr),
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                        &id,
                    );
                    return;
                }
                *ids.cached.entry(attr.ino).or_default() += 1;
                reply.created(
                    &self.ttl,
                    &to_attr(&attr),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                );
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// A mounted tree; unmounts on drop.
#[derive(Debug)]
pub struct Mounted {
    session: Option<BackgroundSession>,
    /// Stopped after the session (field order).
    governor: Option<Governor>,
    mountpoint: PathBuf,
    fs: Arc<Fs>,
    passthrough: Arc<AtomicBool>,
}

impl Mounted {
    /// The core behind the mount.
    pub fn fs(&self) -> &Arc<Fs> {
        &self.fs
    }

    /// Whether the kernel accepted FUSE passthrough for this mount.
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Whether a worker is polling `/dev/fuse` for requests now (see
    /// [`MountOptions::busy_poll`]).
    pub fn polling(&self) -> bool {
        self.governor.as_ref().is_some_and(Governor::polling)
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts and waits for the session to end. If the mount is busy it is detached
    /// lazily instead.
    pub fn unmount(mut self) -> io::Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match session.umount_and_join() {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed; detaching");
                detach_stale(&self.mountpoint)
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount on drop failed");
        }
    }
}

/// An absolute form of `path` that does not touch the last component (which may be a
/// dead FUSE mount that cannot be stat'ed).
fn absolute_mountpoint(path: &Path) -> io::Result<PathBuf> {
    let abs = std::path::absolute(path)?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(fs::canonicalize(parent)?.join(name)),
        _ => Ok(abs),
    }
}

/// Decodes the octal escapes (`\040`) of a mount table field.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether something is mounted at `path` (from `/proc/self/mounts`).
pub fn is_mounted(path: &Path) -> io::Result<bool> {
    let target = absolute_mountpoint(path)?;
    let table = fs::read_to_string("/proc/self/mounts")?;
    Ok(table
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .any(|m| Path::new(&unescape_mount_field(m)) == target))
}

/// Detaches (`umount2(MNT_DETACH)`) whatever is mounted at `path`, such as a FUSE mount
/// whose daemon died (every access fails with `ENOTCONN`). Nothing mounted is fine.
pub fn detach_stale(path: &Path) -> io::Result<()> {
    let target = absolute_mountpoint(path)?;
    for _ in 0..16 {
        if !is_mounted(&target)? {
            return Ok(());
        }
        tracing::info!(mountpoint = %target.display(), "detaching an earlier mount");
        nix::mount::umount2(&target, MntFlags::MNT_DETACH).map_err(io::Error::from)?;
    }
    Err(io::Error::other(
        "mount point still mounted after 16 detaches",
    ))
}

/// Mounts `fs` at `mountpoint` after detaching a stale mount there. Read-only trees are
/// mounted read-only.
pub fn mount(fs: Arc<Fs>, mountpoint: &Path, options: &MountOptions) -> io::Result<Mounted> {
    detach_stale(mountpoint)?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(options.fsname.clone()),
        MountOption::Subtype("nbagent".to_owned()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
        if fs.writable() {
            MountOption::RW
        } else {
            MountOption::RO
        },
    ];
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(options.threads.max(1));
    // Each worker reads its own clone of the device, so that one of them alone can poll.
    config.clone_fd = !options.busy_poll.is_zero();
    let mut adapter = FuseFs::new(fs.clone(), options);
    let (poll, governor) = Poll::new(options.busy_poll)?;
    adapter.poll = poll;
    let passthrough = adapter.passthrough.clone();
    let session = fuser::Session::new(adapter, mountpoint, &config)?;
    if let Some(governor) = &governor {
        // The session's own descriptor is read by its last worker; the others get clones.
        governor.attach(session.as_fd().try_clone_to_owned()?);
    }
    let session = session.spawn()?;
    let mounted = Mounted {
        session: Some(session),
        governor,
        mountpoint: absolute_mountpoint(mountpoint)?,
        fs,
        passthrough,
    };
    if options.kernel_readahead > 0 {
        // After the first call, which waits for the session's INIT: INIT lowers the
        // read-ahead to at most what it announces.
        let set = fs::metadata(&mounted.mountpoint)
            .and_then(|m| set_readahead(&options.bdi_dir, m.dev(), options.kernel_readahead));
        match set {
            Ok(()) => tracing::debug!(bytes = options.kernel_readahead, "kernel read-ahead set"),
            Err(e) => {
                tracing::info!(error = %e, "cannot set the kernel read-ahead; reads stay small")
            }
        }
    }
    Ok(mounted)
}

/// Sets the read-ahead of the backing device of filesystem `dev` to `bytes`.
fn set_readahead(bdi_dir: &Path, dev: u64, bytes: u64) -> io::Result<()> {
    let name = format!(
        "{}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    fs::write(
        bdi_dir.join(name).join("read_ahead_kb"),
        (bytes / 1024).max(1).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_the_read_ahead_of_the_device() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("0:53")).unwrap();
        let dev = nix::sys::stat::makedev(0, 53);
        set_readahead(dir.path(), dev, 8 << 20).unwrap();
        let kb = fs::read_to_string(dir.path().join("0:53/read_ahead_kb")).unwrap();
        assert_eq!(kb, "8192");
        // No such device: an error, for the caller to log.
        assert!(set_readahead(dir.path(), nix::sys::stat::makedev(0, 54), 1 << 20).is_err());
    }

    #[test]
    fn unescapes_mount_table() {
        assert_eq!(unescape_mount_field("/a\\040b"), "/a b");
        assert_eq!(unescape_mount_field("/plain"), "/plain");
        assert_eq!(unescape_mount_field("/x\\"), "/x\\");
    }
}
