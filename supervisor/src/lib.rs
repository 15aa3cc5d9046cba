//! `nbsupervisor`: the notebook container's PID 1.
//!
//! It starts the agent command (normally `nbagent ...`) as its child, reaps every
//! process, forwards signals to the agent, restarts the agent when it crashes and shuts
//! everything down in order. It is small and synchronous: one thread, signals read from
//! a `signalfd`, children reaped with `waitpid(-1, WNOHANG)`.
//!
//! - [`policy`]: the decisions (restart, backoff, shutdown phases, exit status) as a
//!   pure state machine.
//! - [`supervisor`]: the driver that owns the agent process and carries out the
//!   decisions.
//! - [`signals`]: blocking signals and reading them from a signalfd.
//! - [`teardown`], [`procs`], [`sys`]: signalling what is left, the `/proc` tree, the
//!   syscalls behind a trait.
//! - [`records`]: exit records for adopted processes.
//! - [`config`], [`telemetry`]: command line and logging.
//!
//! # Behaviour
//!
//! - **Reaping.** As PID 1 it reaps everything; otherwise it makes itself a child
//!   subreaper (`PR_SET_CHILD_SUBREAPER`), so orphans of its descendants are reparented
//!   to it, and reaps them.
//! - **The agent** runs in its own process group with an empty signal mask and gets
//!   `NBSUPERVISOR_PID=<supervisor pid>` and `NBSUPERVISOR_RUN_DIR=<run dir>`.
//! - **Signals.** SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 (and SIGINT when not PID 1) are
//!   forwarded to the agent. SIGTERM (and SIGINT when PID 1) starts the orderly
//!   shutdown: SIGTERM to the agent; once it is gone, SIGTERM to every remaining
//!   descendant; at `--shutdown-deadline-secs` after the SIGTERM, SIGKILL to whatever
//!   is left; then the `--unmount` paths are detached and the supervisor exits.
//! - **Agent exits.** Exit 0: the agent finished on purpose; the same teardown (SIGTERM
//!   to what is left, SIGKILL at the deadline), exit 0. Exit 78 (`EX_CONFIG`): not
//!   restarted, same teardown, exit 78. Anything else (another code, a signal): logged
//!   and restarted after an exponential backoff with jitter (`--backoff-initial-ms`,
//!   doubled per crash up to `--backoff-max-ms`, reset after an agent that ran
//!   `--backoff-reset-secs`; each delay drawn from `[base/2, base]`), optionally capped
//!   by `--max-restarts` per `--restart-window-secs`. Processes the dead agent left
//!   behind (the notebook kernel) are **not** touched, so the next agent can adopt them.
//! - **"Every remaining descendant".** As PID 1 of its PID namespace: `kill(-1, sig)`.
//!   Otherwise `kill(-1)` is never used (it would reach the whole host): the supervisor
//!   walks `/proc` (`--proc-dir`) and signals each process whose parent chain leads to
//!   it, repeating the SIGKILL round while reaping until none is left (for at most 5 s).
//!
//! # Exit status
//!
//! | status | meaning |
//! |--------|---------|
//! | 0      | orderly end: the agent exited 0 by itself, or after SIGTERM it ended (whatever its status) within the deadline |
//! | 1      | the supervisor failed (set-up error, the agent command cannot be started) or gave up after `--max-restarts` |
//! | 78     | the agent exited 78 (`EX_CONFIG`) and was not restarted |
//! | 137    | the shutdown deadline passed with the agent still running: it was SIGKILLed |
//!
//! # Exit records (contract with the agent)
//!
//! A new agent that adopts a process (the notebook kernel) which is not its child
//! cannot `waitpid` it: the supervisor reaps it. To learn its exit status:
//!
//! 1. The supervisor creates `<run-dir>/watch/` and `<run-dir>/exit/` (mode 0755,
//!    owned by the supervisor's user, root) at start and empties both: records of an
//!    earlier container run are meaningless. The agent finds the run directory in
//!    `NBSUPERVISOR_RUN_DIR`.
//! 2. The agent creates the (empty) file `<run-dir>/watch/<pid>` for a process it
//!    wants to hear about, with `<pid>` as seen in the supervisor's PID namespace
//!    (which is the agent's). It should do so right after starting the process, while
//!    it is still its parent: the supervisor only ever reaps a process once it has been
//!    orphaned, and a process that exits after the agent died but before the watch
//!    file exists is reaped without a record.
//! 3. When the supervisor reaps `<pid>` and `watch/<pid>` exists, it writes
//!    `<run-dir>/exit/<pid>` atomically (a temporary file `exit/.<pid>.tmp`, fsynced,
//!    then renamed) containing one line of JSON,
//!    `{"pid":N,"code":C,"signal":null}` for an exit with status C or
//!    `{"pid":N,"code":null,"signal":S}` for a death by signal number S, and then
//!    removes `watch/<pid>`. Readers ignore names starting with a dot.
//! 4. The agent reads and deletes `exit/<pid>`. If the agent reaps a watched child
//!    itself (it was still its parent), it deletes `watch/<pid>` itself: a stale watch
//!    file would produce a wrong record when the pid is reused by another orphan.
//!
//! To tell "still running" from "exited", the agent checks `exit/<pid>` first and then
//! whether the process exists (`kill(pid, 0)`); a record written in between is caught
//! by checking `exit/<pid>` once more.

pub mod config;
pub mod policy;
pub mod procs;
pub mod records;
pub mod signals;
pub mod supervisor;
pub mod sys;
pub mod teardown;
pub mod telemetry;

pub use config::Config;
pub use policy::Outcome;

/// Errors that stop the supervisor before it can run (exit status 1).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// The signals could not be blocked or the signalfd opened.
    #[error("cannot set up signal handling")]
    Signals(#[source] nix::errno::Errno),
    /// `PR_SET_CHILD_SUBREAPER` failed.
    #[error("cannot become a child subreaper")]
    Subreaper(#[source] nix::errno::Errno),
    /// The run directory could not be prepared.
    #[error("cannot prepare the run directory")]
    RunDir(#[from] records::RecordError),
    /// Waiting for signals or children failed.
    #[error("cannot wait for signals or children")]
    Wait(#[source] nix::errno::Errno),
}

/// Runs the supervisor with the real syscalls until it exits; the outcome gives the
/// exit status ([`Outcome::code`]).
pub fn run(config: Config) -> Result<Outcome, SupervisorError> {
    supervisor::supervise(&config, &sys::RealSys)
}
