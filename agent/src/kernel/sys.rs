//! The privileged system calls of the kernel launch, behind a trait.
//!
//! [`Sys`] is what the kernel's init ([`super::init`]) calls to drop privileges, in the
//! order [`super::init::drop_privileges`] fixes. [`RealSys`] makes the calls (nix and
//! caps); [`RecordingSys`] records them, in order, and can be told to fail one, so that
//! the order and the error paths are unit-tested without root. The implementation is
//! always passed in explicitly.
//!
//! The module also holds the few raw calls the launcher needs (`clone` into a new PID
//! namespace, `fork` for probes, `pidfd_open`), each wrapped once in a small function
//! whose `// SAFETY:` comment says why it is sound.

use std::fmt;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use caps::CapSet;
use nix::libc;
use nix::unistd::{Gid, Pid, Uid};

/// One step of dropping privileges; names the step in errors.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Call {
    /// `setsid()`: a new session, no controlling terminal.
    Setsid,
    /// `setgroups(groups)`: the user's supplementary groups.
    Setgroups(Vec<u32>),
    /// `setresgid(gid, gid, gid)`.
    Setresgid(u32),
    /// Drop every capability from the bounding set (needs CAP_SETPCAP: before setuid).
    DropBoundingSet,
    /// Clear the ambient set.
    ClearAmbient,
    /// `setresuid(uid, uid, uid)`.
    Setresuid(u32),
    /// Empty the effective, inheritable and permitted sets, then check that every set
    /// (bounding and ambient too) is empty.
    ClearCaps,
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
    NoNewPrivs,
    /// `prctl(PR_SET_DUMPABLE, 1)`: changing uid made the process non-dumpable, which
    /// would keep CRIU's parasite (running as the notebook user) out of its own
    /// `/proc` entries. The process has no privileges left to protect.
    Dumpable,
    /// `chdir(dir)`.
    Chdir(PathBuf),
    /// The init itself becomes the notebook user, keeping only CAP_SYS_ADMIN (see
    /// [`Sys::init_become_user`]).
    InitBecomeUser(u32),
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Call::Setsid => write!(f, "setsid"),
            Call::Setgroups(g) => write!(f, "setgroups({g:?})"),
            Call::Setresgid(g) => write!(f, "setresgid({g})"),
            Call::DropBoundingSet => write!(f, "drop the capability bounding set"),
            Call::ClearAmbient => write!(f, "clear the ambient capabilities"),
            Call::Setresuid(u) => write!(f, "setresuid({u})"),
            Call::ClearCaps => write!(
                f,
                "clear the effective, permitted and inheritable capabilities"
            ),
            Call::NoNewPrivs => write!(f, "set PR_SET_NO_NEW_PRIVS"),
            Call::Dumpable => write!(f, "set PR_SET_DUMPABLE"),
            Call::Chdir(d) => write!(f, "chdir to {}", d.display()),
            Call::InitBecomeUser(u) => {
                write!(f, "switch the init to uid {u} keeping only CAP_SYS_ADMIN")
            }
        }
    }
}

/// A privileged call failed.
#[derive(Debug, thiserror::Error)]
#[error("{call} failed")]
pub struct SysError {
    /// The call.
    pub call: Call,
    /// The cause (an errno, or the caps crate's error inside an `io::Error`).
    #[source]
    pub source: io::Error,
}

/// The privileged calls of the kernel's init.
pub trait Sys {
    /// `setsid()`.
    fn setsid(&self) -> Result<(), SysError>;
    /// `setgroups(groups)`.
    fn setgroups(&self, groups: &[u32]) -> Result<(), SysError>;
    /// `setresgid(gid, gid, gid)`.
    fn setresgid(&self, gid: u32) -> Result<(), SysError>;
    /// Drops every capability from the bounding set.
    fn drop_bounding_set(&self) -> Result<(), SysError>;
    /// Clears the ambient set.
    fn clear_ambient(&self) -> Result<(), SysError>;
    /// `setresuid(uid, uid, uid)`.
    fn setresuid(&self, uid: u32) -> Result<(), SysError>;
    /// Empties the effective, inheritable and permitted sets and checks that all five
    /// sets are empty.
    fn clear_caps(&self) -> Result<(), SysError>;
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
    fn set_no_new_privs(&self) -> Result<(), SysError>;
    /// `prctl(PR_SET_DUMPABLE, 1)` (see [`Call::Dumpable`]).
    fn set_dumpable(&self) -> Result<(), SysError>;
    /// `chdir(dir)`.
    fn chdir(&self, dir: &Path) -> Result<(), SysError>;
    /// Turns the (root) init into the notebook user with CAP_SYS_ADMIN as its only
    /// capability (bounding set too), no_new_privs and dumpable. CRIU then runs as that
    /// same user (hosts without CAP_SYS_RESOURCE cannot `prlimit` another user's
    /// process), and its parasite in the init needs CAP_SYS_ADMIN to mount a procfs of
    /// the kernel's PID namespace. The kernel cannot ptrace the init: it lacks a
    /// capability the init has.
    fn init_become_user(&self, uid: u32, gid: u32, groups: &[u32]) -> Result<(), SysError>;
}

/// The real calls (nix and caps).
#[derive(Debug, Clone, Copy, Default)]
pub struct RealSys;

fn errno(call: Call) -> impl FnOnce(nix::Error) -> SysError {
    move |e| SysError {
        call,
        source: io::Error::from(e),
    }
}

fn caps_err(call: Call) -> impl FnOnce(caps::errors::CapsError) -> SysError {
    move |e| SysError {
        call,
        source: io::Error::other(e),
    }
}

/// The capability sets of the calling thread, from `/proc/thread-self/status`, as
/// `(name, mask)` pairs (`CapInh`, `CapPrm`, `CapEff`, `CapBnd`, `CapAmb`).
pub fn capability_masks(status: &str) -> Vec<(String, u64)> {
    status
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            if !k.starts_with("Cap") {
                return None;
            }
            let mask = u64::from_str_radix(v.trim(), 16).ok()?;
            Some((k.to_owned(), mask))
        })
        .collect()
}

impl Sys for RealSys {
    fn setsid(&self) -> Result<(), SysError> {
        nix::unistd::setsid().map(drop).map_err(errno(Call::Setsid))
    }

    fn setgroups(&self, groups: &[u32]) -> Result<(), SysError> {
        let gids: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
        nix::unistd::setgroups(&gids).map_err(errno(Call::Setgroups(groups.to_vec())))
    }

    fn setresgid(&self, gid: u32) -> Result<(), SysError> {
        let g = Gid::from_raw(gid);
        nix::unistd::setresgid(g, g, g).map_err(errno(Call::Setresgid(gid)))
    }

    fn drop_bounding_set(&self) -> Result<(), SysError> {
        caps::clear(None, CapSet::Bounding).map_err(caps_err(Call::DropBoundingSet))
    }

    fn clear_ambient(&self) -> Result<(), SysError> {
        caps::clear(None, CapSet::Ambient).map_err(caps_err(Call::ClearAmbient))
    }

    fn setresuid(&self, uid: u32) -> Result<(), SysError> {
        let u = Uid::from_raw(uid);
        nix::unistd::setresuid(u, u, u).map_err(errno(Call::Setresuid(uid)))
    }

    fn clear_caps(&self) -> Result<(), SysError> {
        // Effective first: it must stay a subset of permitted.
        for set in [CapSet::Effective, CapSet::Inheritable, CapSet::Permitted] {
            caps::clear(None, set).map_err(caps_err(Call::ClearCaps))?;
        }
        let status =
            std::fs::read_to_string("/proc/thread-self/status").map_err(|source| SysError {
                call: Call::ClearCaps,
                source,
            })?;
        let left: Vec<String> = capability_masks(&status)
            .into_iter()
            .filter(|(_, m)| *m != 0)
            .map(|(k, m)| format!("{k}={m:016x}"))
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(SysError {
                call: Call::ClearCaps,
                source: io::Error::other(format!(
                    "capabilities left after clearing: {}",
                    left.join(", ")
                )),
            })
        }
    }

    fn set_no_new_privs(&self) -> Result<(), SysError> {
        nix::sys::prctl::set_no_new_privs().map_err(errno(Call::NoNewPrivs))
    }

    fn set_dumpable(&self) -> Result<(), SysError> {
        nix::sys::prctl::set_dumpable(true).map_err(errno(Call::Dumpable))
    }

    fn chdir(&self, dir: &Path) -> Result<(), SysError> {
        nix::unistd::chdir(dir).map_err(errno(Call::Chdir(dir.to_owned())))
    }

    fn init_become_user(&self, uid: u32, gid: u32, groups: &[u32]) -> Result<(), SysError> {
        use caps::Capability;
        let call = Call::InitBecomeUser(uid);
        let keep: caps::CapsHashSet = [Capability::CAP_SYS_ADMIN].into_iter().collect();
        // Bounding set first: dropping needs CAP_SETPCAP, gone after setuid.
        for cap in caps::read(None, CapSet::Bounding).map_err(caps_err(call.clone()))? {
            if cap != Capability::CAP_SYS_ADMIN {
                caps::drop(None, CapSet::Bounding, cap).map_err(caps_err(call.clone()))?;
            }
        }
        caps::clear(None, CapSet::Ambient).map_err(caps_err(call.clone()))?;
        caps::clear(None, CapSet::Inheritable).map_err(caps_err(call.clone()))?;
        nix::sys::prctl::set_keepcaps(true).map_err(errno(call.clone()))?;
        let gids: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
        nix::unistd::setgroups(&gids).map_err(errno(call.clone()))?;
        let g = Gid::from_raw(gid);
        nix::unistd::setresgid(g, g, g).map_err(errno(call.clone()))?;
        let u = Uid::from_raw(uid);
        nix::unistd::setresuid(u, u, u).map_err(errno(call.clone()))?;
        caps::set(None, CapSet::Permitted, &keep).map_err(caps_err(call.clone()))?;
        caps::set(None, CapSet::Effective, &keep).map_err(caps_err(call.clone()))?;
        nix::sys::prctl::set_keepcaps(false).map_err(errno(call.clone()))?;
        nix::sys::prctl::set_no_new_privs().map_err(errno(call.clone()))?;
        nix::sys::prctl::set_dumpable(true).map_err(errno(call))
    }
}

/// A fake that records the calls in order and fails the first call matching
/// [`RecordingSys::fail_on`].
#[derive(Debug, Default, Clone)]
pub struct RecordingSys {
    calls: std::sync::Arc<Mutex<Vec<Call>>>,
    fail: Option<fn(&Call) -> bool>,
}

impl RecordingSys {
    /// A fake on which every call succeeds.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fake on which calls matching `pred` fail with EPERM (after being recorded).
    pub fn fail_on(pred: fn(&Call) -> bool) -> Self {
        Self {
            calls: std::sync::Arc::new(Mutex::new(Vec::new())),
            fail: Some(pred),
        }
    }

    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn record(&self, call: Call) -> Result<(), SysError> {
        let fails = self.fail.is_some_and(|f| f(&call));
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call.clone());
        }
        if fails {
            Err(SysError {
                call,
                source: io::Error::from_raw_os_error(libc::EPERM),
            })
        } else {
            Ok(())
        }
    }
}

impl Sys for RecordingSys {
    fn setsid(&self) -> Result<(), SysError> {
        self.record(Call::Setsid)
    }
    fn setgroups(&self, groups: &[u32]) -> Result<(), SysError> {
        self.record(Call::Setgroups(groups.to_vec()))
    }
    fn setresgid(&self, gid: u32) -> Result<(), SysError> {
        self.record(Call::Setresgid(gid))
    }
    fn drop_bounding_set(&self) -> Result<(), SysError> {
        self.record(Call::DropBoundingSet)
    }
    fn clear_ambient(&self) -> Result<(), SysError> {
        self.record(Call::ClearAmbient)
    }
    fn setresuid(&self, uid: u32) -> Result<(), SysError> {
        self.record(Call::Setresuid(uid))
    }
    fn clear_caps(&self) -> Result<(), SysError> {
        self.record(Call::ClearCaps)
    }
    fn set_no_new_privs(&self) -> Result<(), SysError> {
        self.record(Call::NoNewPrivs)
    }
    fn set_dumpable(&self) -> Result<(), SysError> {
        self.record(Call::Dumpable)
    }
    fn chdir(&self, dir: &Path) -> Result<(), SysError> {
        self.record(Call::Chdir(dir.to_owned()))
    }
    fn init_become_user(&self, uid: u32, _gid: u32, _groups: &[u32]) -> Result<(), SysError> {
        self.record(Call::InitBecomeUser(uid))
    }
}

/// Stack for the child of [`clone_newpid`]. The child runs on it only until `execve` or
/// `_exit`, doing nothing but async-signal-safe calls.
const CLONE_STACK: usize = 64 * 1024;

/// Creates a child in a new PID namespace (`clone(CLONE_NEWPID | SIGCHLD)`): a direct
/// child of the caller, which can wait for it, and PID 1 of the new namespace. The child
/// runs `child` and exits with its return value.
///
/// `child` runs in a copy of the caller's address space with a single thread, while other
/// threads of the caller may have held locks (the allocator's among them) at the time of
/// the clone: it must do only async-signal-safe work (`dup2`, `execve`, `write`, `_exit`)
/// and must not allocate. Everything it needs is prepared before.
pub(crate) fn clone_newpid(child: Box<dyn FnMut() -> isize + '_>) -> nix::Result<Pid> {
    let mut stack = vec![0u8; CLONE_STACK];
    // SAFETY: without CLONE_VM the child gets its own copy of the address space, so the
    // stack buffer and the closure stay valid in it for as long as it runs; the caller's
    // copy outlives the call. The callers' closures only make async-signal-safe calls and
    // never return into Rust code of the parent's threads (they execve or return, and
    // `clone`'s trampoline then calls `_exit`). The stack is large enough for them.
    #[allow(unsafe_code)]
    unsafe {
        nix::sched::clone(
            child,
            &mut stack,
            nix::sched::CloneFlags::CLONE_NEWPID,
            Some(libc::SIGCHLD),
        )
    }
}

/// `fork()` for short probes: the child runs `child` and calls `_exit` with its result.
/// Returns the child's pid in the parent. `child` must be async-signal-safe and must not
/// allocate (the caller may be multi-threaded).
pub(crate) fn fork_probe(child: impl FnOnce() -> i32) -> nix::Result<Pid> {
    // SAFETY: in the child only `child` runs, which the callers keep to raw system calls
    // (no allocation, no locks), and then `_exit`, which does not run atexit handlers or
    // destructors of the parent's state.
    #[allow(unsafe_code)]
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(child),
        nix::unistd::ForkResult::Child => {
            let code = child();
            // SAFETY: `_exit` is async-signal-safe and never returns.
            #[allow(unsafe_code)]
            unsafe {
                libc::_exit(code)
            }
        }
    }
}

/// Raw `setresuid`/`setresgid` system calls for probe children: unlike the libc
/// wrappers they affect only the calling thread and take no locks, which is what a
/// forked child of a multi-threaded process needs. Returns the errno on failure.
pub(crate) fn raw_setres_ids(uid: u32, gid: u32) -> Result<(), i32> {
    // SAFETY: plain system calls with integer arguments; no memory is passed.
    #[allow(unsafe_code)]
    let r = unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) };
    if r != 0 {
        return Err(nix::errno::Errno::last_raw());
    }
    // SAFETY: as above.
    #[allow(unsafe_code)]
    let r = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
    if r != 0 {
        return Err(nix::errno::Errno::last_raw());
    }
    Ok(())
}

/// Raw `prctl(PR_SET_NO_NEW_PRIVS, 1)` for probe children. Returns the errno on failure.
pub(crate) fn raw_no_new_privs() -> Result<(), i32> {
    // SAFETY: a plain system call with integer arguments.
    #[allow(unsafe_code)]
    let r = unsafe { libc::syscall(libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if r != 0 {
        Err(nix::errno::Errno::last_raw())
    } else {
        Ok(())
    }
}

/// `pidfd_open(pid, 0)`: a file descriptor that becomes readable when the process exits
/// (pollable by an async runtime) and that keeps naming this process even if the pid is
/// reused.
pub fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call with integer arguments.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this new descriptor; nothing else owns it.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `dup2(from, to)` and `execve(path, argv, envp)`, for the child of [`clone_newpid`]:
/// only raw libc calls on pointers prepared by the parent (no allocation). Returns the
/// errno of the failed call (`execve` returns only on failure).
///
/// `argv` and `envp` must be null-terminated arrays of pointers to NUL-terminated
/// strings that outlive the call; [`ExecArgs`] builds them.
pub(crate) fn dup_and_exec(dups: &[(i32, i32)], exec: &ExecArgs) -> i32 {
    for &(from, to) in dups {
        // SAFETY: dup2 on integer descriptors is async-signal-safe; a bad descriptor
        // is reported through the return value.
        #[allow(unsafe_code)]
        let r = unsafe { libc::dup2(from, to) };
        if r < 0 {
            return nix::errno::Errno::last_raw();
        }
    }
    // SAFETY: `ExecArgs` keeps the strings alive and the pointer arrays null-terminated.
    #[allow(unsafe_code)]
    unsafe {
        libc::execve(
            exec.path.as_ptr(),
            exec.argv_ptrs.as_ptr(),
            exec.envp_ptrs.as_ptr(),
        )
    };
    nix::errno::Errno::last_raw()
}

/// `write(fd, bytes)` for a child of [`clone_newpid`] (async-signal-safe, best effort).
pub(crate) fn raw_write(fd: i32, bytes: &[u8]) {
    // SAFETY: the buffer is valid for its length; a failed write is ignored.
    #[allow(unsafe_code)]
    unsafe {
        libc::write(fd, bytes.as_ptr().cast(), bytes.len())
    };
}

/// Makes `cmd`'s child start with an empty signal mask and SIGPIPE at its default
/// disposition. The init keeps the signals it forwards blocked (it takes them with
/// `sigwait`), and a blocked mask survives `fork` and `execve`: without this the kernel
/// would never see SIGINT.
pub(crate) fn reset_signals_on_exec(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec; it only calls
    // `pthread_sigmask` and `signal`, both async-signal-safe, and allocates nothing.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::signal::SigSet::empty()
                .thread_set_mask()
                .map_err(io::Error::from)?;
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
            .map_err(io::Error::from)?;
            Ok(())
        })
    };
}

/// Makes the child of `cmd` perform `steps` (see `init::privilege_steps`) between
/// fork and exec. On a failure the child writes `"<step index> <errno> <message>"` to
/// `status` (close-on-exec, so a successful exec leaves it empty) and the spawn fails.
pub(crate) fn drop_privileges_on_exec<S>(
    cmd: &mut std::process::Command,
    sys: S,
    steps: Vec<Call>,
    status: OwnedFd,
) where
    S: Sys + Send + Sync + 'static,
{
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec. The init that
    // spawns the kernel is single-threaded (it never starts a thread), so the child
    // is a full copy of a one-thread process: allocating and formatting are safe, no
    // lock can be held by a thread that no longer exists.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            for (i, step) in steps.iter().enumerate() {
                if let Err(e) = crate::kernel::init::apply(&sys, step) {
                    let msg = format!("{i} {} {}", e.source.raw_os_error().unwrap_or(0), e.source);
                    let _ = nix::unistd::write(&status, msg.as_bytes());
                    return Err(io::Error::other(msg));
                }
            }
            Ok(())
        })
    };
}

/// Sets `FD_CLOEXEC` on every open descriptor numbered `min` or above (listed from
/// `/proc/self/fd`), so that nothing inherited by accident reaches an exec'd child.
pub(crate) fn cloexec_from(min: i32) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= min)
        .collect();
    for fd in fds {
        // SAFETY: F_SETFD on an integer descriptor only changes its close-on-exec flag;
        // a descriptor that is already closed (the directory listing's own) gives EBADF,
        // which is ignored.
        #[allow(unsafe_code)]
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC)
        };
    }
}

/// Takes ownership of descriptor `fd` inherited from the parent (the report pipe), if it
/// is open and not one of the standard descriptors; marks it close-on-exec.
pub(crate) fn adopt_fd(fd: i32) -> Option<OwnedFd> {
    if fd < 3 {
        return None;
    }
    // SAFETY: F_GETFD only queries the descriptor.
    #[allow(unsafe_code)]
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return None;
    }
    // SAFETY: the descriptor is open (F_GETFD succeeded) and was set up by the launcher
    // for this process only; nothing else in the init owns it, and it is adopted once.
    #[allow(unsafe_code)]
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Some(owned)
}

/// The path, argv and environment of an `execve`, as NUL-terminated strings and the
/// null-terminated pointer arrays that point into them.
#[derive(Debug)]
pub(crate) struct ExecArgs {
    path: std::ffi::CString,
    _argv: Vec<std::ffi::CString>,
    _envp: Vec<std::ffi::CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
}

impl ExecArgs {
    /// Builds the arrays; fails on an interior NUL byte.
    pub(crate) fn new(
        path: &Path,
        argv: &[&std::ffi::OsStr],
        envp: &[String],
    ) -> Result<Self, std::ffi::NulError> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
        let argv = argv
            .iter()
            .map(|a| std::ffi::CString::new(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let envp = envp
            .iter()
            .map(|e| std::ffi::CString::new(e.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let ptrs = |v: &[std::ffi::CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        Ok(Self {
            argv_ptrs: ptrs(&argv),
            envp_ptrs: ptrs(&envp),
            path,
            _argv: argv,
            _envp: envp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_sys_records_and_fails() {
        let sys = RecordingSys::fail_on(|c| matches!(c, Call::Setresuid(_)));
        assert!(sys.setsid().is_ok());
        let e = sys.setresuid(1001).unwrap_err();
        assert_eq!(e.to_string(), "setresuid(1001) failed");
        assert_eq!(sys.calls(), vec![Call::Setsid, Call::Setresuid(1001)]);
    }

    #[test]
    fn parses_capability_masks() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(
            capability_masks(status),
            vec![("CapInh".into(), 0), ("CapEff".into(), 0x1ff_ffff_ffff)]
        );
    }
}
