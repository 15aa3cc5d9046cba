//! The few syscalls with side effects on other processes and mounts, behind a trait so
//! the teardown logic can be tested with a fake that records calls.

use std::path::Path;

use nix::errno::Errno;
use nix::mount::MntFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// Syscalls the teardown needs.
pub trait Sys {
    /// `kill(pid, sig)` for one process (`pid` > 0).
    fn kill(&self, pid: Pid, sig: Signal) -> Result<(), Errno>;
    /// `kill(-1, sig)`: every process the caller may signal except itself. Only correct
    /// when the caller is PID 1 of its PID namespace.
    fn kill_all(&self, sig: Signal) -> Result<(), Errno>;
    /// `umount2(path, MNT_DETACH)`.
    fn unmount_detach(&self, path: &Path) -> Result<(), Errno>;
}

/// The real syscalls.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealSys;

impl Sys for RealSys {
    fn kill(&self, pid: Pid, sig: Signal) -> Result<(), Errno> {
        if pid.as_raw() <= 0 {
            // Never a process group or "everyone" by accident.
            return Err(Errno::EINVAL);
        }
        nix::sys::signal::kill(pid, sig)
    }

    fn kill_all(&self, sig: Signal) -> Result<(), Errno> {
        nix::sys::signal::kill(Pid::from_raw(-1), sig)
    }

    fn unmount_detach(&self, path: &Path) -> Result<(), Errno> {
        nix::mount::umount2(path, MntFlags::MNT_DETACH)
    }
}
