//! The driver: owns the agent process, the reaper and the signal descriptor, feeds
//! [`Machine`] and carries out its actions.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tracing::{debug, error, info, instrument, warn};

use crate::SupervisorError;
use crate::config::Config;
use crate::policy::{Action, Input, Machine, Outcome, ProcessExit};
use crate::records::ExitRecords;
use crate::signals::{self, Signals};
use crate::sys::Sys;
use crate::teardown::{self, Scope};

/// How long SIGKILLed processes get to disappear before the supervisor exits anyway
/// (a process stuck in the kernel, e.g. on a dead FUSE mount, may never go).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// A number in `[0, 1)` for the backoff jitter, from the standard library's randomly
/// keyed hasher (no extra dependency; this is not cryptography).
fn jitter() -> f64 {
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// What one reaping pass found.
#[derive(Debug, Default)]
struct Reaped {
    agent: Option<ProcessExit>,
    no_children: bool,
}

/// The running supervisor.
struct Driver<'a> {
    config: &'a Config,
    sys: &'a dyn Sys,
    signals: Signals,
    records: ExitRecords,
    scope: Scope,
    self_pid: Pid,
    agent: Option<Pid>,
    machine: Machine,
}

/// Runs the supervisor until it decides to exit.
#[instrument(skip_all, fields(supervisor_pid = nix::unistd::getpid().as_raw()))]
pub fn supervise(config: &Config, sys: &dyn Sys) -> Result<Outcome, SupervisorError> {
    let signals = Signals::block().map_err(SupervisorError::Signals)?;
    let self_pid = nix::unistd::getpid();
    let pid1 = self_pid.as_raw() == 1;
    let scope = if pid1 {
        Scope::Namespace
    } else {
        nix::sys::prctl::set_child_subreaper(true).map_err(SupervisorError::Subreaper)?;
        Scope::Tree {
            root: self_pid,
            proc_dir: config.proc_dir.clone(),
        }
    };
    let records = ExitRecords::prepare(&config.run_dir)?;
    info!(
        pid1,
        run_dir = %config.run_dir.display(),
        agent = ?config.command,
        "supervisor started"
    );
    teardown::unmount_all(sys, &config.unmount, "start");
    let mut driver = Driver {
        config,
        sys,
        signals,
        records,
        scope,
        self_pid,
        agent: None,
        machine: Machine::new(config.policy(pid1), Box::new(jitter)),
    };
    driver.run()
}

impl Driver<'_> {
    fn run(&mut self) -> Result<Outcome, SupervisorError> {
        if let Some(o) = self.feed(Input::Start)? {
            return Ok(o);
        }
        loop {
            let reaped = self.reap()?;
            if let Some(exit) = reaped.agent
                && let Some(o) = self.feed(Input::AgentExited(exit))?
            {
                return Ok(o);
            }
            if reaped.no_children
                && let Some(o) = self.feed(Input::ChildrenGone)?
            {
                return Ok(o);
            }
            if let Some(o) = self.feed(Input::Tick)? {
                return Ok(o);
            }
            let timeout = self
                .machine
                .deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            let sigs = self.signals.wait(timeout).map_err(SupervisorError::Wait)?;
            for sig in sigs {
                if sig == Signal::SIGCHLD {
                    continue;
                }
                if let Some(o) = self.feed(Input::Signal(sig))? {
                    return Ok(o);
                }
            }
        }
    }

    /// Feeds one input and carries out the resulting actions; `Some` when it is time
    /// to exit.
    fn feed(&mut self, input: Input) -> Result<Option<Outcome>, SupervisorError> {
        let mut queue = VecDeque::from(self.machine.handle(input, Instant::now()));
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Spawn { attempt } => {
                    if let Err(e) = self.spawn(attempt) {
                        error!(attempt, error = %e, "cannot start the agent");
                        queue.extend(self.machine.handle(Input::SpawnFailed, Instant::now()));
                    }
                }
                Action::SignalAgent(sig) => {
                    if let Some(pid) = self.agent {
                        match self.sys.kill(pid, sig) {
                            Ok(()) | Err(Errno::ESRCH) => {}
                            Err(e) => warn!(
                                pid = pid.as_raw(),
                                signal = sig.as_str(),
                                error = %e,
                                "cannot signal the agent"
                            ),
                        }
                    }
                }
                Action::SignalDescendants(sig) => {
                    match teardown::signal_descendants(self.sys, &self.scope, sig) {
                        Ok(Some(count)) => {
                            info!(
                                signal = sig.as_str(),
                                count, "signalled remaining processes"
                            );
                        }
                        Ok(None) => info!(
                            signal = sig.as_str(),
                            "signalled every other process of the namespace (kill -1)"
                        ),
                        Err(e) => warn!(
                            signal = sig.as_str(),
                            error = %e,
                            "cannot signal remaining processes"
                        ),
                    }
                }
                Action::KillDescendants => self.kill_everything()?,
                Action::Exit(outcome) => {
                    teardown::unmount_all(self.sys, &self.config.unmount, "shutdown");
                    info!(?outcome, code = outcome.code(), "supervisor exiting");
                    return Ok(Some(outcome));
                }
            }
        }
        Ok(None)
    }

    fn spawn(&mut self, attempt: u32) -> std::io::Result<()> {
        let (program, args) = match self.config.command.split_first() {
            Some(split) => split,
            None => return Err(std::io::Error::other("empty agent command")),
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("NBSUPERVISOR_PID", self.self_pid.as_raw().to_string())
            .env("NBSUPERVISOR_RUN_DIR", self.records.run_dir())
            .process_group(0);
        signals::unblock_in_child(&mut cmd);
        // The child is reaped by `reap` (waitpid(-1)); the `Child` handle is dropped
        // without waiting, which neither kills nor reaps it.
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).map_err(std::io::Error::other)?;
        self.agent = Some(Pid::from_raw(pid));
        info!(pid, attempt, "agent started");
        Ok(())
    }

    /// Reaps every exited child without blocking, writing exit records.
    fn reap(&mut self) -> Result<Reaped, SupervisorError> {
        let mut out = Reaped::default();
        loop {
            let (pid, exit) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(WaitStatus::Exited(pid, code)) => (pid, ProcessExit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _core)) => (pid, ProcessExit::Signal(sig as i32)),
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => {
                    out.no_children = true;
                    break;
                }
                Err(e) => return Err(SupervisorError::Wait(e)),
            };
            if self.agent == Some(pid) {
                self.agent = None;
                out.agent = Some(exit);
            } else {
                debug!(pid = pid.as_raw(), status = %exit, "orphan reaped");
            }
            match self.records.on_reaped(pid.as_raw(), exit) {
                Ok(true) => info!(pid = pid.as_raw(), status = %exit, "exit record written"),
                Ok(false) => {}
                Err(e) => warn!(pid = pid.as_raw(), error = %e, "cannot write exit record"),
            }
        }
        Ok(out)
    }

    /// SIGKILLs everything left and reaps it, for at most [`KILL_WAIT`]; repeated
    /// because a process may fork between the listing and the kill.
    fn kill_everything(&mut self) -> Result<(), SupervisorError> {
        let until = Instant::now() + KILL_WAIT;
        let mut rounds = 0u32;
        loop {
            rounds += 1;
            match teardown::signal_descendants(self.sys, &self.scope, Signal::SIGKILL) {
                Ok(Some(count)) if rounds == 1 => {
                    info!(count, "SIGKILL sent to remaining processes");
                }
                Ok(None) if rounds == 1 => {
                    info!("SIGKILL sent to every other process of the namespace (kill -1)");
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot list remaining processes"),
            }
            if self.reap()?.no_children {
                info!(rounds, "all processes gone");
                return Ok(());
            }
            let now = Instant::now();
            if now >= until {
                warn!(
                    rounds,
                    "processes survived SIGKILL (stuck in the kernel?); exiting anyway"
                );
                return Ok(());
            }
            let wait = (until - now).min(Duration::from_millis(50));
            for sig in self
                .signals
                .wait(Some(wait))
                .map_err(SupervisorError::Wait)?
            {
                if sig != Signal::SIGCHLD {
                    debug!(signal = sig.as_str(), "signal ignored while killing");
                }
            }
        }
    }
}
