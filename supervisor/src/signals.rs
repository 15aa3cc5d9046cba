//! Synchronous signal handling: the handled signals are blocked with `sigprocmask` and
//! read from a `signalfd`, so no code runs in signal context.

use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// The signals the supervisor handles.
pub const HANDLED: [Signal; 7] = [
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// The blocked signals and the descriptor they are read from.
#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks [`HANDLED`] for the (single-threaded) process and opens a non-blocking,
    /// close-on-exec signalfd for them. Call before starting any child.
    pub fn block() -> Result<Self, Errno> {
        let mut mask = SigSet::empty();
        for sig in HANDLED {
            mask.add(sig);
        }
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Self { fd })
    }

    /// Waits up to `timeout` (`None`: forever) for signals; returns those pending (empty
    /// on timeout). Signals of one kind that arrive together are coalesced, as ever.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<Vec<Signal>, Errno> {
        let timeout = match timeout {
            None => PollTimeout::NONE,
            Some(d) => {
                // Round up so a sub-millisecond remainder does not spin.
                let ms = d.as_nanos().div_ceil(1_000_000);
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
        let mut out = Vec::new();
        while let Some(info) = self.fd.read_signal()? {
            let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
            if let Ok(sig) = Signal::try_from(signo) {
                out.push(sig);
            }
        }
        Ok(out)
    }
}

/// Makes `cmd`'s child start with an empty signal mask (the supervisor's blocked
/// signals would otherwise be inherited through `exec`).
#[allow(unsafe_code)]
pub fn unblock_in_child(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before `exec`, where only
    // async-signal-safe operations are allowed. It builds an empty `sigset_t` on the
    // stack (`sigemptyset`) and calls `sigprocmask`, both async-signal-safe; it
    // allocates nothing, takes no lock and touches no state shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(std::io::Error::from)
        });
    }
}
