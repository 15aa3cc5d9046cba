//! Adaptive busy polling of `/dev/fuse` while metadata requests come in quick succession.
//!
//! A `stat` of a name the kernel has forgotten is one `LOOKUP` round trip to the daemon,
//! and most of that round trip is spent waking the daemon's thread: on a VM whose idle
//! vCPUs halt (no guest halt polling), waking a thread on an idle vCPU is a halt exit to
//! the host, tens of microseconds. A thread that is already running when the request is
//! queued answers it without that wakeup. Measured with `fuse-bench` on 2 vCPUs: a cold
//! `stat` loop over 10,000 names ran at 15-17k ops/s with the daemon's threads asleep in
//! `read`, and at 20-28k ops/s with one of them polling.
//!
//! Polling costs a CPU, so it is adaptive, the way `haltpoll` is: one worker thread's
//! `/dev/fuse` descriptor (its own open file description; the mount clones the device for
//! the others) is switched to `O_NONBLOCK` when a metadata request arrives, and fuser's
//! receive loop then retries its `read` on `EAGAIN` instead of sleeping. A governor
//! thread switches it back to blocking once a whole window (default 200 us) has passed
//! without a metadata request, so a burst is followed by at most two windows of polling
//! and an idle mount polls not at all. Data requests (`READ`, `WRITE`) do not count: a
//! large cold read is paced by the server, and polling between its requests would take
//! CPU from the TLS path that feeds it. The other workers keep blocking in `read` and
//! still take requests, so a slow request (a fetch from the server) never stops the
//! mount.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, fcntl};

/// Default polling window.
pub const DEFAULT_WINDOW: Duration = Duration::from_micros(200);

#[derive(Debug, Default)]
struct State {
    polling: bool,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    window: Duration,
    /// Metadata requests seen so far.
    requests: AtomicU64,
    /// Mirror of `State::polling` for the requests' fast path.
    polling: AtomicBool,
    /// The polled descriptor, once the mount has one.
    fd: Mutex<Option<OwnedFd>>,
    state: Mutex<State>,
    wake: Condvar,
}

/// The requests' side: counts metadata requests and starts polling. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Poll {
    shared: Option<Arc<Shared>>,
}

/// The governor thread; stops it when dropped.
#[derive(Debug)]
pub(crate) struct Governor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets or clears `O_NONBLOCK` on the polled descriptor.
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fd) = fd.as_ref() else {
            return Err(io::Error::other("no descriptor to poll yet"));
        };
        let flags = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL)?);
        let flags = if on {
            flags | OFlag::O_NONBLOCK
        } else {
            flags - OFlag::O_NONBLOCK
        };
        fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags))?;
        Ok(())
    }

    fn govern(&self) {
        let mut state = self.state();
        loop {
            while !state.polling && !state.stop {
                state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            let seen = self.requests.load(Ordering::Acquire);
            state = self
                .wake
                .wait_timeout_while(state, self.window, |s| !s.stop)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if state.stop {
                return;
            }
            if self.requests.load(Ordering::Acquire) == seen {
                if let Err(e) = self.set_nonblocking(false) {
                    tracing::warn!(error = %e, "cannot stop polling /dev/fuse; polling stays off");
                    state.stop = true;
                }
                state.polling = false;
                self.polling.store(false, Ordering::Release);
            }
        }
    }
}

impl Poll {
    /// A poll that never polls.
    pub(crate) fn off() -> Self {
        Poll { shared: None }
    }

    /// A poll with `window` (zero: off) and its governor, which waits for
    /// [`Governor::attach`].
    pub(crate) fn new(window: Duration) -> io::Result<(Self, Option<Governor>)> {
        if window.is_zero() {
            return Ok((Self::off(), None));
        }
        let shared = Arc::new(Shared {
            window,
            requests: AtomicU64::new(0),
            polling: AtomicBool::new(false),
            fd: Mutex::new(None),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("nbfs-poll".to_owned())
                .spawn(move || shared.govern())?
        };
        let governor = Governor {
            shared: shared.clone(),
            thread: Some(thread),
        };
        Ok((
            Poll {
                shared: Some(shared),
            },
            Some(governor),
        ))
    }

    /// Called by every metadata request: starts polling if it is off.
    pub(crate) fn request(&self) {
        let Some(shared) = &self.shared else { return };
        shared.requests.fetch_add(1, Ordering::AcqRel);
        if shared.polling.load(Ordering::Acquire) {
            return;
        }
        let mut state = shared.state();
        if state.polling || state.stop {
            return;
        }
        match shared.set_nonblocking(true) {
            Ok(()) => {
                state.polling = true;
                shared.polling.store(true, Ordering::Release);
                shared.wake.notify_one();
            }
            Err(e) => {
                tracing::debug!(error = %e, "not polling /dev/fuse");
            }
        }
    }
}

impl Governor {
    /// Polls `fd` (a duplicate of one worker's `/dev/fuse` descriptor) from now on.
    pub(crate) fn attach(&self, fd: OwnedFd) {
        *self.shared.fd.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
    }

    /// Whether the descriptor is being polled now.
    pub(crate) fn polling(&self) -> bool {
        self.shared.polling.load(Ordering::Acquire)
    }
}

impl Drop for Governor {
    fn drop(&mut self) {
        self.shared.state().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Instant;

    fn nonblocking(fd: &impl AsFd) -> bool {
        let flags = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL).unwrap());
        flags.contains(OFlag::O_NONBLOCK)
    }

    /// Waits (bounded) until `cond` holds; the governor works on its own thread.
    fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "{what} did not happen in 10 s");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_request_polls_and_a_quiet_window_blocks_again() {
        let (mut rd, wr) = std::io::pipe().unwrap();
        let (poll, governor) = Poll::new(Duration::from_millis(5)).unwrap();
        let governor = governor.unwrap();
        governor.attach(OwnedFd::from(rd.try_clone().unwrap()));
        assert!(!nonblocking(&rd));
        assert!(!governor.polling());

        poll.request();
        assert!(governor.polling());
        assert!(
            nonblocking(&rd),
            "a request switches the descriptor to O_NONBLOCK"
        );
        let mut buf = [0u8; 8];
        let e = rd.read(&mut buf).unwrap_err();
        assert_eq!(
            e.kind(),
            io::ErrorKind::WouldBlock,
            "a polled read returns at once"
        );

        eventually("the end of polling", || !governor.polling());
        assert!(
            !nonblocking(&rd),
            "a quiet window switches it back to blocking"
        );

        poll.request();
        assert!(nonblocking(&rd), "the next burst polls again");
        drop(governor);
        drop(wr);
    }

    #[test]
    fn a_zero_window_never_polls() {
        let (poll, governor) = Poll::new(Duration::ZERO).unwrap();
        assert!(governor.is_none());
        poll.request();
        assert!(poll.shared.is_none());
    }
}
