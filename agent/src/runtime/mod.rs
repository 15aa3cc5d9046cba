//! The kernel runtime: one task that owns the notebook's kernel, runs the cells the
//! server sends, reports every output through the durable outbox, and handles
//! interrupt, restart, kernel death and shutdown.
//!
//! ```text
//! channel --commands--> runtime --execute_request--> kernel (ZeroMQ)
//!                          |  <--iopub events-------
//!                          v
//!                       Reporter --> outbox --> server
//! ```
//!
//! Cells run one at a time in the order the server queued them. While a cell runs, the
//! runtime keeps reading commands: an interrupt reaches the kernel at once (by message
//! or SIGINT, as its kernelspec says), further cells queue, a restart or shutdown
//! aborts the cell. A kernel that dies is noticed within [`DEATH_POLL`] and reported
//! with its exit status and the tail of its log; the next cell starts a new kernel.
//!
//! The kernel outlives the agent: if the agent is killed, `nbsupervisor` restarts it,
//! and the new agent finds the [`KernelRecord`], checks that the process is the same
//! one, connects fresh sockets (handshake on control: the kernel may still be busy with
//! the cell the dead agent sent) and carries on. That cell's msg_id is in the record:
//! the new agent collects the rest of its outputs and its end, and it can be
//! interrupted like any other. Outputs the kernel published while no agent listened are
//! lost (ZeroMQ PUB drops them); the runtime reports that as an `output_gap` instead of
//! hiding it.

pub mod reactive;
pub mod record;
pub mod report;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nbagent_checkpoint::store::CheckpointId;
use nbagent_protocol::{CellStatus, CheckpointEvent, Frame, KernelState, Message, OutputContent};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, instrument, warn};

use crate::capabilities;
use crate::kernel::client::{ConnectionInfo, ControlHandle, ExecEvent, KernelClient};
use crate::kernel::launch::{self, EnvPolicy, KernelExit, KernelProcess, LaunchConfig};
use crate::kernel::spec::{InterruptMode, KernelSpec, SpecSearch};
use crate::users::{SystemUserDb, UserPolicy};
pub use record::{KernelRecord, RunningCell};
pub use report::Reporter;

/// How often the runtime checks that the kernel process is alive.
pub const DEATH_POLL: Duration = Duration::from_millis(50);

/// How long a kernel gets to exit after a shutdown request before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// When the agent is told to stop during a cell, how long the interrupted cell gets to
/// end (and report its `KeyboardInterrupt`) before the kernel is stopped anyway.
const STOP_INTERRUPT_GRACE: Duration = Duration::from_secs(2);

/// The longest an orderly stop of the kernel takes: the interrupted cell's grace, the
/// shutdown request, the grace after it, and the kill (with room to report).
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// Lines of the kernel log sent with a death report.
const LOG_TAIL_LINES: usize = 40;

/// Everything the runtime needs to know.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The agent's state directory (the kernel record and logs live under it).
    pub state_dir: PathBuf,
    /// Kernelspec name.
    pub kernel_name: String,
    /// Where kernelspecs are looked up.
    pub spec_search: SpecSearch,
    /// The notebook user, if given.
    pub kernel_user: Option<String>,
    /// Who may run kernels.
    pub policy: UserPolicy,
    /// Directories put first on the kernel's PATH.
    pub kernel_path: Vec<PathBuf>,
    /// The executable that becomes the kernel's init (`nbagent` itself).
    pub init_exe: PathBuf,
    /// Where per-kernel directories (connection files) are created; must be
    /// traversable by the notebook user.
    pub runtime_dir: PathBuf,
    /// nbsupervisor's run directory (exit records of adopted kernels), if supervised.
    pub supervisor_run_dir: Option<PathBuf>,
    /// How long a new kernel may take to answer.
    pub start_timeout: Duration,
    /// `/proc`.
    pub proc_root: PathBuf,
    /// The CRIU binary, if configured (for the capability report and checkpoints).
    pub criu: Option<PathBuf>,
    /// Whether to checkpoint the kernel after every cell (reactive mode).
    pub checkpoints: bool,
    /// Where checkpoints are stored.
    pub checkpoint_dir: PathBuf,
    /// Most bytes of checkpoint images kept.
    pub checkpoint_budget: u64,
    /// Restore lazily where userfaultfd allows it.
    pub lazy_restore: bool,
    /// The FUSE device the capability probe checks (`--dev-fuse`).
    pub dev_fuse: PathBuf,
}

/// How the runtime ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeExit {
    /// The server asked for a shutdown; the kernel is stopped.
    Shutdown {
        /// The reason the server gave.
        reason: String,
    },
    /// The agent is stopping in order (SIGTERM): the running cell was interrupted and
    /// the kernel is stopped, its record removed.
    Stopped {
        /// Why the agent stops.
        reason: String,
    },
    /// The command channel closed without a stop; the kernel keeps running so that the
    /// next agent can adopt it.
    Detached,
}

/// Tells a running [`Runtime`] that the agent stops in order: the kernel is stopped
/// rather than left for adoption. Dropping it without [`stop`](Self::stop) changes
/// nothing.
#[derive(Debug)]
pub struct StopHandle(watch::Sender<Option<String>>);

impl StopHandle {
    /// A handle and the receiver to give to [`Runtime::run`].
    pub fn new() -> (Self, watch::Receiver<Option<String>>) {
        let (tx, rx) = watch::channel(None);
        (Self(tx), rx)
    }

    /// Asks the runtime to stop the kernel and return [`RuntimeExit::Stopped`].
    pub fn stop(&self, reason: &str) {
        self.0.send_replace(Some(reason.to_owned()));
    }
}

/// Resolves with the reason once a stop is asked for; never if the handle is dropped
/// without one.
async fn stop_requested(stop: &mut watch::Receiver<Option<String>>) -> String {
    let reason = stop
        .wait_for(Option::is_some)
        .await
        .map(|r| r.clone().unwrap_or_default());
    match reason {
        Ok(r) => r,
        Err(_) => std::future::pending().await,
    }
}

/// A queued cell.
#[derive(Debug, Clone)]
struct Pending {
    request: String,
    cell: String,
    code: String,
    /// A cell a previous agent sent, still running in an adopted kernel: collect the
    /// rest of it instead of sending `code`.
    resume: Option<RunningCell>,
}

/// The process behind the kernel.
#[derive(Debug)]
enum Process {
    /// Started by this agent: its child, waited for directly.
    Child(KernelProcess),
    /// Adopted from a previous agent: not our child; death is seen in /proc and the
    /// exit status comes from nbsupervisor's exit record.
    Adopted { pid: i32, start_ticks: u64 },
    /// Restored from a checkpoint by CRIU as our child (`rst_sibling`).
    Restored { pid: i32, exit: Option<Exit> },
}

/// How a kernel process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Exit {
    code: Option<i32>,
    signal: Option<i32>,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (_, Some(s)) => write!(f, "killed by signal {s}"),
            (Some(c), None) => write!(f, "exited with code {c}"),
            (None, None) => f.write_str("exited (status unknown)"),
        }
    }
}

impl From<KernelExit> for Exit {
    fn from(e: KernelExit) -> Self {
        Exit {
            code: e.exit_code(),
            signal: e.signal(),
        }
    }
}

/// A running kernel and a connected client.
struct Kernel {
    process: Process,
    client: KernelClient,
    control: ControlHandle,
    interrupt: InterruptMode,
    record: KernelRecord,
    record_path: PathBuf,
    log: PathBuf,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("process", &self.process)
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

impl Kernel {
    fn pid(&self) -> i32 {
        self.process.pid()
    }

    /// The kernel's ZeroMQ ports (connections to them are the agent's).
    fn ports(&self) -> std::collections::BTreeSet<u16> {
        serde_json::from_value::<ConnectionInfo>(self.record.connection.clone())
            .map(|i| {
                [
                    i.shell_port,
                    i.iopub_port,
                    i.stdin_port,
                    i.control_port,
                    i.hb_port,
                ]
                .into_iter()
                .collect()
            })
            .unwrap_or_default()
    }

    /// `Some` once the process is gone.
    async fn poll_exit(&mut self, cfg: &RuntimeConfig) -> Option<Exit> {
        self.process.poll_exit(cfg).await
    }
}

impl Process {
    fn pid(&self) -> i32 {
        match self {
            Process::Child(p) => p.pid(),
            Process::Adopted { pid, .. } | Process::Restored { pid, .. } => *pid,
        }
    }

    /// `Some` once the process is gone.
    async fn poll_exit(&mut self, cfg: &RuntimeConfig) -> Option<Exit> {
        match self {
            Process::Restored { pid, exit } => {
                if exit.is_none() {
                    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
                    match waitpid(nix::unistd::Pid::from_raw(*pid), Some(WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::StillAlive) => {}
                        Ok(st) => *exit = KernelExit::from_init(st).map(Exit::from),
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(_) => *exit = Some(Exit::default()),
                    }
                }
                *exit
            }
            Process::Child(p) => match p.try_wait() {
                Ok(Some(e)) => Some(e.into()),
                Ok(None) => None,
                Err(e) => {
                    warn!(error = %e, "cannot wait for the kernel; assuming it is gone");
                    Some(Exit::default())
                }
            },
            Process::Adopted { pid, start_ticks } => {
                let alive = record::proc_stat(&cfg.proc_root, *pid)
                    .is_some_and(|s| s.start_ticks == *start_ticks && s.state != 'Z');
                if alive {
                    None
                } else {
                    Some(read_exit_record(cfg, *pid).await)
                }
            }
        }
    }
}

impl Kernel {
    /// Resolves when the kernel process has exited.
    async fn wait_exit(&mut self, cfg: &RuntimeConfig) -> Exit {
        let mut tick = tokio::time::interval(DEATH_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some(e) = self.poll_exit(cfg).await {
                return e;
            }
        }
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Asks the kernel to exit, then kills it, and waits until it is gone.
    async fn stop(mut self, cfg: &RuntimeConfig) -> Exit {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.control.shutdown_request(false))
            .await;
        let graceful = {
            let wait = self.wait_exit(cfg);
            tokio::time::timeout(SHUTDOWN_GRACE, wait).await
        };
        let exit = match graceful {
            Ok(e) => e,
            Err(_) => {
                debug!(
                    pid = self.pid(),
                    "kernel did not exit after shutdown_request; killing"
                );
                // The init is PID 1 of the kernel's namespace: when it dies, every
                // process of the namespace is killed with it.
                signal(self.pid(), nix::sys::signal::Signal::SIGKILL);
                self.wait_exit(cfg).await
            }
        };
        if let Err(e) = KernelRecord::remove(&self.record_path) {
            warn!(error = %e, "cannot remove the kernel record");
        }
        exit
    }
}

/// The end of a kernel log, for death reports.
fn log_tail(path: &Path) -> String {
    launch::log_tail(path, LOG_TAIL_LINES, 16 * 1024)
        .unwrap_or_else(|e| format!("(cannot read the kernel log {}: {e})", path.display()))
}

/// Interrupts the running cell as the kernelspec says: an interrupt_request on the
/// control channel, or SIGINT to the kernel's init (which forwards it).
async fn interrupt_kernel(mode: InterruptMode, control: &ControlHandle, pid: i32) {
    if mode == InterruptMode::Message {
        match control.interrupt_request().await {
            Ok(()) => return,
            Err(e) => warn!(error = %chain(&e), "interrupt request failed; sending SIGINT"),
        }
    }
    signal(pid, nix::sys::signal::Signal::SIGINT);
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
        debug!(pid, signal = ?sig, error = %e, "cannot signal the kernel");
    }
}

/// The exit status nbsupervisor recorded for `pid` (a kernel adopted from a previous
/// agent is the supervisor's child, not ours). Waits briefly (without blocking the
/// runtime's thread) for the record to appear.
async fn read_exit_record(cfg: &RuntimeConfig, pid: i32) -> Exit {
    let Some(dir) = &cfg.supervisor_run_dir else {
        return Exit::default();
    };
    let path = dir.join("exit").join(pid.to_string());
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        if let Ok(bytes) = tokio::fs::read(&path).await {
            #[derive(serde::Deserialize)]
            struct Rec {
                code: Option<i32>,
                signal: Option<i32>,
            }
            let _ = std::fs::remove_file(&path);
            return match serde_json::from_slice::<Rec>(&bytes) {
                Ok(r) => Exit {
                    code: r.code,
                    signal: r.signal,
                },
                Err(_) => Exit::default(),
            };
        }
        if Instant::now() > deadline {
            return Exit::default();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Errors starting a kernel; each is reported to the server and shown with the cells
/// that could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The kernelspec is not installed.
    #[error("kernelspec not available")]
    Spec(#[from] crate::kernel::spec::SpecError),
    /// No notebook user was given and the agent runs as root.
    #[error(
        "no notebook user: the agent runs as root and kernels never do; set KERNEL_USERNAME \
         (or --kernel-user) to an unprivileged user"
    )]
    NoUser,
    /// The user may not run kernels.
    #[error("the notebook user is refused")]
    User(#[from] crate::users::UserError),
    /// The process could not be started.
    #[error("cannot launch the kernel")]
    Launch(#[from] launch::LaunchError),
    /// The kernel did not answer.
    #[error("the kernel did not answer")]
    Connect(#[from] crate::kernel::client::ClientError),
    /// The record could not be written.
    #[error("cannot record the kernel")]
    Record(#[from] record::RecordError),
    /// A file the kernel needs could not be prepared.
    #[error(transparent)]
    File(#[from] LaunchFileError),
}

/// A file or directory for the kernel could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("cannot prepare {path} for the kernel")]
pub struct LaunchFileError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// ipykernel's history database is a file the kernel keeps open and grows: a
/// checkpoint of such a kernel could never be restored. Kernels started from an
/// ipykernel kernelspec run without it (the other option is to keep history per cell).
fn ipykernel_argv(mut argv: Vec<String>) -> Vec<String> {
    let is_ipykernel = argv.iter().any(|a| a.contains("ipykernel"));
    if is_ipykernel
        && !argv
            .iter()
            .any(|a| a.starts_with("--HistoryManager.enabled"))
    {
        argv.push("--HistoryManager.enabled=False".into());
    }
    argv
}

/// Creates `dir` mode 0711: the kernel user may pass through it to its own
/// per-kernel directory, but not list it.
fn ensure_traversable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
}

/// The whole cause chain of an error, for messages to the user.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The runtime.
#[derive(Debug)]
pub struct Runtime {
    cfg: RuntimeConfig,
    reporter: Reporter,
    kernel: Option<Kernel>,
    queue: VecDeque<Pending>,
    /// Why the last start failed, shown on cells that cannot run.
    start_error: Option<String>,
    /// Checkpoints (reactive mode), when CRIU is usable.
    ckpt: Option<reactive::Checkpointer>,
    /// Why checkpoints are off, when they are.
    ckpt_off: Option<String>,
    /// The notebook's cells as of the last run-from, `(id, code hash)`, to keep their
    /// checkpoints from eviction.
    notebook: Vec<(String, String)>,
}

/// What happened while a cell ran.
enum CellEnd {
    Done,
    Restart,
    Shutdown(String),
    Stopped(String),
    Detached,
}

impl Runtime {
    /// A runtime that reports through `reporter`.
    pub fn new(cfg: RuntimeConfig, reporter: Reporter) -> Self {
        Self {
            cfg,
            reporter,
            kernel: None,
            queue: VecDeque::new(),
            start_error: None,
            ckpt: None,
            ckpt_off: None,
            notebook: Vec::new(),
        }
    }

    /// Opens the checkpoint engine if CRIU may be used here (`features` is the
    /// capability report), else records why reactive mode re-executes instead.
    async fn open_checkpoints(&mut self, features: &[nbagent_protocol::Feature]) {
        let off = |why: String| {
            info!(reason = %why, "checkpoints off: reactive re-runs re-execute from the top");
            Some(why)
        };
        if !self.cfg.checkpoints {
            self.ckpt_off = off("checkpoints are disabled (--no-checkpoints)".into());
            return;
        }
        if let Some(f) = features
            .iter()
            .find(|f| f.name == "checkpoint" && !f.enabled)
        {
            self.ckpt_off = off(format!("{}; {}", f.detail, f.how_to_enable));
            return;
        }
        let Some(criu) = self.cfg.criu.clone() else {
            self.ckpt_off =
                off("CRIU not found (install CRIU >= 4.2: scripts/criu.sh, or pass --criu)".into());
            return;
        };
        let (dir, budget, proc_root) = (
            self.cfg.checkpoint_dir.clone(),
            self.cfg.checkpoint_budget,
            self.cfg.proc_root.clone(),
        );
        // A root agent runs CRIU as the notebook user (see `RunAs`).
        let run_as = if nix::unistd::geteuid().is_root() {
            self.cfg
                .kernel_user
                .as_deref()
                .and_then(|u| nix::unistd::User::from_name(u).ok().flatten())
                .filter(|u| !u.uid.is_root())
                .map(|u| nbagent_checkpoint::RunAs {
                    uid: u.uid.as_raw(),
                    gid: u.gid.as_raw(),
                })
        } else {
            None
        };
        let lazy = self.cfg.lazy_restore;
        let opened = tokio::task::spawn_blocking(move || {
            reactive::Checkpointer::open(&criu, &dir, budget, &proc_root, run_as, lazy)
        })
        .await;
        match opened {
            Ok(Ok(c)) => self.ckpt = Some(c),
            Ok(Err(e)) => self.ckpt_off = off(chain(&e)),
            Err(e) => self.ckpt_off = off(e.to_string()),
        }
    }

    /// After a cell: checkpoint the kernel (if the cell succeeded) or record that its
    /// state is not kept, and report what happened.
    async fn after_cell(&mut self, p: &Pending, status: CellStatus) {
        let (Some(ck), Some(k)) = (self.ckpt.as_mut(), self.kernel.as_mut()) else {
            return;
        };
        // A resumed cell's code is not known here: its entry cannot be keyed.
        let pred = match (&p.resume, k.record.chain.predecessor()) {
            (None, Some(pred)) => pred,
            _ => {
                debug!(cell = %p.cell, "the checkpoint chain of this kernel is broken: the cell is not recorded");
                set_chain(k, reactive::Chain::Broken);
                return;
            }
        };
        if status != CellStatus::Ok {
            let why = match status {
                CellStatus::Error => "the cell raised an error",
                _ => "the cell did not finish",
            };
            let entry = match ck.skip(&p.cell, &p.code, pred, why) {
                Ok(id) => Some(id),
                Err(e) => {
                    warn!(error = %chain(&e), "cannot record the cell in the checkpoint store");
                    None
                }
            };
            let next = k.record.chain.after_cell(entry);
            set_chain(k, next);
            return;
        }
        let cells = self.notebook.clone();
        let current = k.record.chain.clone();
        let taken = ck
            .take(
                k.pid(),
                &k.record,
                &k.ports(),
                &p.cell,
                &p.code,
                &current,
                &cells,
            )
            .await;
        let next = current.after_cell(taken.as_ref().ok().map(|t| t.id().clone()));
        set_chain(k, next);
        let reports = ck.take_reports();
        self.report_background(reports).await;
        let msg = match taken {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %chain(&e), "checkpoint failed");
                let _ = self
                    .reporter
                    .checkpoint(&p.cell, "", CheckpointEvent::Failed, 0, 0, &chain(&e))
                    .await;
                return;
            }
        };
        match msg {
            reactive::Taken::Created {
                id,
                bytes,
                duration,
                parent,
            } => {
                info!(cell = %p.cell, checkpoint = %id, bytes, pause_ms = duration.as_millis() as u64, parent = ?parent, "checkpoint created");
                let _ = self
                    .reporter
                    .checkpoint(
                        &p.cell,
                        id.as_str(),
                        CheckpointEvent::Created,
                        bytes,
                        duration.as_millis() as u64,
                        "",
                    )
                    .await;
            }
            reactive::Taken::NotRestorable { id, reason } => {
                warn!(cell = %p.cell, %reason, "cell state not restorable");
                let _ = self
                    .reporter
                    .checkpoint(
                        &p.cell,
                        id.as_str(),
                        CheckpointEvent::NotRestorable,
                        0,
                        0,
                        &reason,
                    )
                    .await;
            }
            reactive::Taken::Failed {
                id,
                reason,
                duration,
            } => {
                warn!(cell = %p.cell, %reason, "checkpoint failed");
                let _ = self
                    .reporter
                    .checkpoint(
                        &p.cell,
                        id.as_str(),
                        CheckpointEvent::Failed,
                        0,
                        duration.as_millis() as u64,
                        &reason,
                    )
                    .await;
            }
        }
    }

    /// Reports what the background storing of earlier dumps found: evictions, and a
    /// checkpoint reported created whose storing then failed.
    async fn report_background(&self, reports: Vec<reactive::Report>) {
        for r in reports {
            let _ = match r {
                reactive::Report::Evicted(id) => {
                    self.reporter
                        .checkpoint(
                            "",
                            id.as_str(),
                            CheckpointEvent::Evicted,
                            0,
                            0,
                            "over the checkpoint budget",
                        )
                        .await
                }
                reactive::Report::StoreFailed { cell, id, reason } => {
                    self.reporter
                        .checkpoint(&cell, id.as_str(), CheckpointEvent::Failed, 0, 0, &reason)
                        .await
                }
            };
        }
    }

    /// Replaces the live kernel by checkpoint `id`. On failure the kernel is gone
    /// and the checkpoint is marked unusable.
    async fn restore(&mut self, id: &CheckpointId, cell: &str) -> Result<Duration, String> {
        let begun = Instant::now();
        let Some(old) = self.kernel.take() else {
            return Err("no kernel to take the connection details from".into());
        };
        let mut record = old.record.clone();
        let (record_path, mut log) = (old.record_path.clone(), old.log.clone());
        // The live tree must be gone: its listening ports are the restored kernel's.
        let mut old = old;
        signal(old.pid(), nix::sys::signal::Signal::SIGKILL);
        let _ = old.wait_exit(&self.cfg).await;
        drop(old);
        let Some(ck) = self.ckpt.as_mut() else {
            return Err("checkpoints are off".into());
        };
        // The restored kernel listens where the dumped one did, with its key; the live
        // kernel may be another one (a restart, or a fresh kernel started after a
        // failed restore).
        if let Some(dumped) = ck.kernel_record(id) {
            record.connection = dumped.connection;
            record.kernel_name = dumped.kernel_name;
            record.interrupt_by_message = dumped.interrupt_by_message;
            record.log = dumped.log;
            log = record.log.clone();
        }
        let restored = ck.restore(id).await;
        let reports = ck.take_reports();
        let restored = match restored {
            Ok(r) => Ok(r),
            Err(e) => {
                // A state that cannot come back (a file it keeps open changed) is
                // not restorable; anything else is a failed restore.
                let event = if e.is_not_restorable() {
                    CheckpointEvent::NotRestorable
                } else {
                    CheckpointEvent::Failed
                };
                Err((event, ck.mark_not_restorable(id, &chain(&e))))
            }
        };
        self.report_background(reports).await;
        let (pid, criu_time) = match restored {
            Ok(r) => r,
            Err((event, why)) => {
                let _ = self
                    .reporter
                    .checkpoint(cell, id.as_str(), event, 0, 0, &why)
                    .await;
                let _ = KernelRecord::remove(&record_path);
                return Err(why);
            }
        };
        let info: ConnectionInfo = match serde_json::from_value(record.connection.clone()) {
            Ok(i) => i,
            Err(e) => return Err(format!("the kernel record has no connection info: {e}")),
        };
        let client = match KernelClient::connect(&info, self.cfg.start_timeout).await {
            Ok(c) => c,
            Err(e) => {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
                let why = format!("the restored kernel does not answer: {}", chain(&e));
                let why = match self.ckpt.as_mut() {
                    Some(ck) => ck.mark_not_restorable(id, &why),
                    None => why,
                };
                let _ = self
                    .reporter
                    .checkpoint(cell, id.as_str(), CheckpointEvent::Failed, 0, 0, &why)
                    .await;
                return Err(why);
            }
        };
        record.pid = pid;
        record.start_ticks = record::proc_stat(&self.cfg.proc_root, pid)
            .map(|s| s.start_ticks)
            .unwrap_or(0);
        record.running = None;
        record.chain = reactive::Chain::After(id.clone());
        if let Err(e) = record.save(&record_path) {
            warn!(error = %chain(&e), "cannot update the kernel record");
        }
        self.register_watch(pid);
        let control = client.control();
        let interrupt = if record.interrupt_by_message {
            InterruptMode::Message
        } else {
            InterruptMode::Signal
        };
        self.kernel = Some(Kernel {
            process: Process::Restored { pid, exit: None },
            client,
            control,
            interrupt,
            record,
            record_path,
            log,
        });
        let ready = begun.elapsed();
        info!(checkpoint = %id, pid, criu_ms = criu_time.as_millis() as u64, ready_ms = ready.as_millis() as u64, "kernel restored");
        let _ = self
            .reporter
            .checkpoint(
                cell,
                id.as_str(),
                CheckpointEvent::Restored,
                0,
                ready.as_millis() as u64,
                "",
            )
            .await;
        let _ = self
            .reporter
            .status(
                KernelState::Restored,
                &format!(
                    "restored checkpoint {id} (after cell {cell}) in {} ms",
                    ready.as_millis()
                ),
            )
            .await;
        Ok(ready)
    }

    /// Asks nbsupervisor to record the exit status of `pid` if it outlives us.
    fn register_watch(&self, pid: i32) {
        if let Some(run_dir) = &self.cfg.supervisor_run_dir {
            let watch = run_dir.join("watch");
            if std::fs::create_dir_all(&watch)
                .and_then(|()| std::fs::write(watch.join(pid.to_string()), b""))
                .is_err()
            {
                debug!(dir = %watch.display(), "cannot register the kernel with nbsupervisor");
            }
        }
    }

    fn record_path(&self) -> PathBuf {
        KernelRecord::path(&self.cfg.state_dir)
    }

    /// Adopts the kernel a previous agent left running, if its record says there is one
    /// and the process is still the same.
    #[instrument(skip_all)]
    async fn adopt(&mut self) -> Option<Kernel> {
        let path = self.record_path();
        let rec = match KernelRecord::load(&path) {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            Err(e) => {
                warn!(error = %chain(&e), "ignoring the kernel record");
                let _ = KernelRecord::remove(&path);
                return None;
            }
        };
        if !rec.is_alive(&self.cfg.proc_root) {
            info!(
                pid = rec.pid,
                "the recorded kernel is gone; starting a new one"
            );
            let exit = read_exit_record(&self.cfg, rec.pid).await;
            let _ = self
                .reporter
                .died(exit.code, exit.signal, log_tail(&rec.log))
                .await;
            if let Some(running) = &rec.running {
                let _ = self
                    .reporter
                    .cell_finished(
                        &running.request,
                        &running.cell,
                        CellStatus::KernelDied,
                        None,
                        0,
                    )
                    .await;
            }
            let _ = KernelRecord::remove(&path);
            return None;
        }
        let info: ConnectionInfo = match serde_json::from_value(rec.connection.clone()) {
            Ok(i) => i,
            Err(e) => {
                warn!(error = %e, "the kernel record has no usable connection info");
                return None;
            }
        };
        // The kernel may still be running the cell the previous agent sent: a busy
        // kernel answers kernel_info on control only (on shell it would answer once the
        // cell ends, which may be never).
        let client = match KernelClient::connect_busy(&info, &rec.session, self.cfg.start_timeout)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                warn!(pid = rec.pid, error = %chain(&e), "cannot reconnect to the recorded kernel; stopping it");
                signal(rec.pid, nix::sys::signal::Signal::SIGKILL);
                let _ = KernelRecord::remove(&path);
                return None;
            }
        };
        info!(pid = rec.pid, kernel = %rec.kernel_name, executed = rec.executed, "adopted the running kernel");
        let _ = self
            .reporter
            .status(
                KernelState::Idle,
                &format!("adopted running kernel (pid {})", rec.pid),
            )
            .await;
        let control = client.control();
        let interrupt = if rec.interrupt_by_message {
            InterruptMode::Message
        } else {
            InterruptMode::Signal
        };
        let mut kernel = Kernel {
            process: Process::Adopted {
                pid: rec.pid,
                start_ticks: rec.start_ticks,
            },
            client,
            control,
            interrupt,
            log: rec.log.clone(),
            record: rec,
            record_path: path,
        };
        kernel.record.session = kernel.client.session().to_owned();
        // The previous agent may have died before the store recorded the kernel's last
        // checkpoint (it is stored in the background): then the chain cannot go on.
        if let reactive::Chain::After(id) = &kernel.record.chain
            && !self.ckpt.as_ref().is_some_and(|c| c.has_entry(id))
        {
            info!(checkpoint = %id, "the adopted kernel's last checkpoint is not in the store: its cells are not recorded until a restore or restart");
            kernel.record.chain = reactive::Chain::Broken;
        }
        let _ = kernel.record.save(&kernel.record_path);
        if let Some(running) = kernel.record.running.clone() {
            // The previous agent died during this cell. Its outputs from then until
            // now were published with nobody listening.
            let resumable = !running.msg_id.is_empty();
            let reason = format!(
                "the agent restarted while cell {} was running; outputs the kernel \
                 published while no agent listened are lost{}",
                running.cell,
                if resumable {
                    ""
                } else {
                    ", and its end was not observed"
                }
            );
            warn!(cell = %running.cell, "{reason}");
            let _ = self.reporter.gap(Some(&running.cell), &reason).await;
            if resumable {
                // Collect the rest of it (and let it be interrupted) before anything else.
                self.queue.push_front(Pending {
                    request: running.request.clone(),
                    cell: running.cell.clone(),
                    code: String::new(),
                    resume: Some(running),
                });
            } else {
                kernel.record.running = None;
                let _ = self
                    .reporter
                    .cell_finished(
                        &running.request,
                        &running.cell,
                        CellStatus::Aborted,
                        None,
                        0,
                    )
                    .await;
                let _ = kernel.record.save(&kernel.record_path);
            }
        }
        Some(kernel)
    }

    /// Starts a new kernel.
    #[instrument(skip_all, fields(kernel = %self.cfg.kernel_name))]
    async fn start_fresh(&mut self) -> Result<Kernel, StartError> {
        let begun = Instant::now();
        let spec: KernelSpec = self.cfg.spec_search.find(&self.cfg.kernel_name)?;
        let user_name = match &self.cfg.kernel_user {
            Some(u) => u.clone(),
            None if nix::unistd::geteuid().is_root() => return Err(StartError::NoUser),
            None => nix::unistd::User::from_uid(nix::unistd::geteuid())
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_default(),
        };
        let user = self
            .cfg
            .policy
            .authorize(&SystemUserDb, &user_name, &self.cfg.kernel_name)?;
        let _ = self
            .reporter
            .status(KernelState::Starting, &spec.display_name)
            .await;
        let dir = self.cfg.state_dir.join("kernel");
        crate::private_dir(&dir).map_err(|e| match e {
            crate::AgentError::StateDir { source, .. } => {
                StartError::Record(record::RecordError::Io {
                    path: dir.clone(),
                    source,
                })
            }
            other => StartError::Record(record::RecordError::Io {
                path: dir.clone(),
                source: std::io::Error::other(other.to_string()),
            }),
        })?;
        let info = crate::kernel::client::new_connection_info("127.0.0.1", &spec.name)?;
        // The connection file holds the kernel's HMAC key (not the agent's): the
        // kernel user must read it, so it lives in a per-kernel directory of the
        // runtime directory, owned by that user.
        let conn_dir = self
            .cfg
            .runtime_dir
            .join(format!("kernel-{}", uuid::Uuid::new_v4()));
        let conn_file = conn_dir.join("connection.json");
        // The log lives beside it, owned by the kernel's user: CRIU (running as that
        // user) must be able to reach every file the kernel holds open.
        let log = conn_dir.join("kernel.log");
        ensure_traversable(&self.cfg.runtime_dir).map_err(|source| LaunchFileError {
            path: self.cfg.runtime_dir.clone(),
            source,
        })?;
        launch::write_connection_file(
            &conn_file,
            &crate::kernel::client::connection_file_json(&info)?,
            user.uid,
            user.gid,
        )
        .map_err(|source| LaunchFileError {
            path: conn_file.clone(),
            source,
        })?;
        let env = EnvPolicy {
            extra_path: self.cfg.kernel_path.clone(),
            ..EnvPolicy::default()
        }
        .build(std::env::vars(), &user, &spec.env);
        let mut launch_cfg = LaunchConfig::new(
            spec.name.clone(),
            ipykernel_argv(spec.argv_for(&conn_file)),
            env,
            user.clone(),
            log.clone(),
        );
        launch_cfg.init_cwd = Some(conn_dir.clone());
        launch_cfg.init_exe = self.cfg.init_exe.clone();
        launch_cfg.proc_root = self.cfg.proc_root.clone();
        launch_cfg.start_timeout = self.cfg.start_timeout;
        let process = tokio::task::spawn_blocking(move || launch::launch(&launch_cfg))
            .await
            .map_err(|e| LaunchFileError {
                path: PathBuf::new(),
                source: std::io::Error::other(e),
            })??;
        let pid = process.pid();
        let spawned = begun.elapsed();
        self.register_watch(pid);
        let record = KernelRecord {
            pid,
            start_ticks: process.start_time(),
            connection: serde_json::to_value(&info).unwrap_or_default(),
            kernel_name: spec.name.clone(),
            interrupt_by_message: spec.interrupt_mode == InterruptMode::Message,
            log: log.clone(),
            user: user.name.clone(),
            session: String::new(),
            running: None,
            executed: 0,
            chain: reactive::Chain::Fresh,
        };
        let record_path = self.record_path();
        record.save(&record_path)?;
        let client = match KernelClient::connect(&info, self.cfg.start_timeout).await {
            Ok(c) => c,
            Err(e) => {
                signal(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = KernelRecord::remove(&record_path);
                return Err(e.into());
            }
        };
        // The shell identity, so that a successor gets the replies of a running cell.
        let mut record = record;
        record.session = client.session().to_owned();
        if let Err(e) = record.save(&record_path) {
            warn!(error = %chain(&e), "cannot update the kernel record");
        }
        info!(
            pid,
            user = %user.name,
            spawn_ms = spawned.as_millis() as u64,
            ready_ms = begun.elapsed().as_millis() as u64,
            "kernel ready"
        );
        let _ = self
            .reporter
            .status(
                KernelState::Idle,
                &format!(
                    "{} ready in {} ms (pid {pid}, user {})",
                    spec.display_name,
                    begun.elapsed().as_millis(),
                    user.name
                ),
            )
            .await;
        let control = client.control();
        Ok(Kernel {
            process: Process::Child(process),
            client,
            control,
            interrupt: spec.interrupt_mode,
            record,
            record_path,
            log,
        })
    }

    /// Makes sure a kernel runs (adopting, or starting one); on failure remembers why.
    async fn ensure_kernel(&mut self) -> bool {
        if self.kernel.is_some() {
            return true;
        }
        match self.start_fresh().await {
            Ok(k) => {
                self.kernel = Some(k);
                self.start_error = None;
                true
            }
            Err(e) => {
                let why = chain(&e);
                warn!(error = %why, "kernel start failed");
                let _ = self.reporter.status(KernelState::Dead, &why).await;
                self.start_error = Some(why);
                false
            }
        }
    }

    /// Runs until the server asks for a shutdown, `stop` (see [`StopHandle`]) asks for
    /// an orderly stop, or the command channel closes.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Frame>,
        mut stop: watch::Receiver<Option<String>>,
    ) -> RuntimeExit {
        let mut probe = capabilities::ProbeConfig {
            criu: self.cfg.criu.clone(),
            dev_fuse: self.cfg.dev_fuse.clone(),
            ..capabilities::ProbeConfig::default()
        };
        if let Some(u) = self
            .cfg
            .kernel_user
            .as_deref()
            .and_then(|u| nix::unistd::User::from_name(u).ok().flatten())
        {
            probe.switch_uid = u.uid.as_raw();
            probe.switch_gid = u.gid.as_raw();
        }
        let features = tokio::task::spawn_blocking(move || capabilities::probe(&probe))
            .await
            .unwrap_or_default();
        capabilities::log_features(&features);
        self.open_checkpoints(&features).await;
        let _ = self.reporter.capabilities(features).await;
        self.kernel = self.adopt().await;
        if self.kernel.is_none() {
            self.ensure_kernel().await;
        }
        loop {
            if let Some(p) = self.queue.pop_front() {
                match self.run_cell(p, &mut commands, &mut stop).await {
                    CellEnd::Done => {}
                    CellEnd::Restart => self.restart("restart requested").await,
                    CellEnd::Shutdown(reason) => return self.shutdown(reason).await,
                    CellEnd::Stopped(reason) => return self.stop(reason).await,
                    CellEnd::Detached => return RuntimeExit::Detached,
                }
                continue;
            }
            enum Event {
                Command(Option<Frame>),
                Died(Exit),
                Stop(String),
            }
            let event = {
                let cfg = &self.cfg;
                let death = async {
                    match self.kernel.as_mut() {
                        Some(k) => k.wait_exit(cfg).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    reason = stop_requested(&mut stop) => Event::Stop(reason),
                    c = commands.recv() => Event::Command(c),
                    exit = death => Event::Died(exit),
                }
            };
            let frame = match event {
                Event::Stop(reason) => return self.stop(reason).await,
                Event::Died(exit) => {
                    self.kernel_died(exit, None).await;
                    continue;
                }
                Event::Command(None) => return RuntimeExit::Detached,
                Event::Command(Some(f)) => f,
            };
            match frame.envelope.msg {
                Message::ExecuteCell {
                    request,
                    cell,
                    code,
                } => self.queue.push_back(Pending {
                    request,
                    cell,
                    code,
                    resume: None,
                }),
                Message::RunFrom {
                    request,
                    cells,
                    from,
                    ..
                } => self.run_from(&request, cells, from).await,
                Message::Interrupt { .. } => {
                    debug!("interrupt with no cell running: nothing to do");
                }
                Message::RestartKernel { .. } => self.restart("restart requested").await,
                Message::Shutdown { reason, .. } => return self.shutdown(reason).await,
                other => debug!(kind = other.kind(), "command not handled by the runtime"),
            }
        }
    }

    /// Reactive mode: bring the kernel to the state after `cells[..from]` and run
    /// `cells[from..]`. Restores the nearest usable checkpoint at or before cell
    /// `from - 1` and re-executes the cells after it; without one (or without CRIU) a
    /// fresh kernel re-executes from the top.
    #[instrument(skip_all, fields(request, from))]
    async fn run_from(
        &mut self,
        request: &str,
        cells: Vec<nbagent_protocol::CellSource>,
        from: u32,
    ) {
        let from = (from as usize).min(cells.len());
        let keys: Vec<(String, String)> = cells
            .iter()
            .map(|c| (c.id.clone(), reactive::code_hash(&c.code)))
            .collect();
        self.notebook = keys.clone();
        let mut start = 0;
        // The last dump's storing (and the eviction it runs) must be done before a
        // checkpoint is chosen: it may evict the one `nearest` would pick.
        if let Some(ck) = self.ckpt.as_mut() {
            ck.settle().await;
            let reports = ck.take_reports();
            self.report_background(reports).await;
        }
        if from > 0 {
            // Try checkpoints from the nearest backwards; a failed restore marks that
            // one unusable and the next nearest is tried.
            for _attempt in 0..4 {
                let Some((index, id)) = self.ckpt.as_ref().and_then(|c| c.nearest(&keys, from - 1))
                else {
                    break;
                };
                if !self.ensure_kernel().await {
                    break;
                }
                match self.restore(&id, &cells[index].id).await {
                    Ok(t) => {
                        info!(checkpoint = %id, after_cell = index, ready_ms = t.as_millis() as u64, "rewound");
                        start = index + 1;
                        break;
                    }
                    Err(why) => {
                        warn!(checkpoint = %id, %why, "restore failed; trying an earlier checkpoint");
                    }
                }
            }
        }
        if start == 0 {
            let why = match (&self.ckpt, &self.ckpt_off) {
                (None, Some(off)) => {
                    format!("re-executing from the top: checkpoints are off ({off})")
                }
                _ if from == 0 => "running from the first cell: fresh kernel".to_owned(),
                _ => "re-executing from the top: no usable checkpoint on this path".to_owned(),
            };
            info!(request, from, "{why}");
            self.restart(&why).await;
        }
        for (i, c) in cells.into_iter().enumerate().skip(start) {
            self.queue.push_back(Pending {
                request: format!("{request}/{i}"),
                cell: c.id,
                code: c.code,
                resume: None,
            });
        }
    }

    async fn restart(&mut self, why: &str) {
        let _ = self.reporter.status(KernelState::Restarting, why).await;
        if let Some(k) = self.kernel.take() {
            let exit = k.stop(&self.cfg).await;
            info!(%exit, "kernel stopped for a restart");
        }
        self.ensure_kernel().await;
    }

    async fn shutdown(mut self, reason: String) -> RuntimeExit {
        info!(%reason, "stopping the kernel for shutdown");
        self.stop_kernel("shut down").await;
        RuntimeExit::Shutdown { reason }
    }

    /// The orderly stop of the agent: like a shutdown, but the agent itself decided.
    async fn stop(mut self, reason: String) -> RuntimeExit {
        info!(%reason, "stopping the kernel: the agent stops");
        self.stop_kernel(&format!("shut down: {reason}")).await;
        RuntimeExit::Stopped { reason }
    }

    /// Aborts the queued cells, stops the kernel (removing its record) and reports it
    /// dead with `detail`.
    async fn stop_kernel(&mut self, detail: &str) {
        for p in self.queue.drain(..) {
            let _ = self
                .reporter
                .cell_finished(&p.request, &p.cell, CellStatus::Aborted, None, 0)
                .await;
        }
        if let Some(k) = self.kernel.take() {
            let exit = k.stop(&self.cfg).await;
            info!(%exit, "kernel stopped");
        }
        let _ = self.reporter.status(KernelState::Dead, detail).await;
    }

    async fn kernel_died(&mut self, exit: Exit, cell: Option<&Pending>) {
        let Some(k) = self.kernel.take() else { return };
        let tail = k.log_tail();
        warn!(pid = k.pid(), %exit, cell = cell.map(|c| c.cell.as_str()), "kernel died");
        let _ = KernelRecord::remove(&k.record_path);
        let _ = self.reporter.died(exit.code, exit.signal, tail).await;
        let _ = self
            .reporter
            .status(
                KernelState::Dead,
                &format!("kernel {exit}; the next cell starts a new one"),
            )
            .await;
    }

    /// Runs one cell, reading commands meanwhile.
    #[instrument(skip_all, fields(cell = %p.cell, request = %p.request))]
    async fn run_cell(
        &mut self,
        p: Pending,
        commands: &mut mpsc::Receiver<Frame>,
        stop: &mut watch::Receiver<Option<String>>,
    ) -> CellEnd {
        let entered = Instant::now();
        if p.resume.is_some() && self.kernel.is_none() {
            // The adopted kernel is gone already; its death was reported.
            let _ = self
                .reporter
                .cell_finished(&p.request, &p.cell, CellStatus::KernelDied, None, 0)
                .await;
            return CellEnd::Done;
        }
        if !self.ensure_kernel().await {
            let why = self
                .start_error
                .clone()
                .unwrap_or_else(|| "the kernel is not running".into());
            let _ = self.reporter.cell_started(&p.request, &p.cell).await;
            let _ = self
                .reporter
                .output(
                    &p.request,
                    &p.cell,
                    OutputContent::Error {
                        ename: "KernelNotStarted".into(),
                        evalue: why,
                        traceback: Vec::new(),
                    },
                )
                .await;
            let _ = self
                .reporter
                .cell_finished(&p.request, &p.cell, CellStatus::Aborted, None, 0)
                .await;
            return CellEnd::Done;
        }
        if p.resume.is_none() {
            let _ = self.reporter.cell_started(&p.request, &p.cell).await;
        }
        let Some(kernel) = self.kernel.as_mut() else {
            return CellEnd::Done;
        };
        // The msg_id is recorded before the request is sent, so that a successor
        // can collect the rest of the cell if this agent dies.
        let running = p.resume.clone().unwrap_or_else(|| RunningCell {
            request: p.request.clone(),
            cell: p.cell.clone(),
            msg_id: uuid::Uuid::new_v4().to_string(),
            started_ms: report::now_ms(),
        });
        let (msg_id, started_ms) = (running.msg_id.clone(), running.started_ms);
        kernel.record.running = Some(running);
        if let Err(e) = kernel.record.save(&kernel.record_path) {
            warn!(error = %chain(&e), "cannot update the kernel record");
        }

        // Events flow through a bounded channel to a forwarder that appends them to
        // the outbox in order; when the outbox is full the kernel's output waits.
        let (tx, mut rx) = mpsc::channel::<ExecEvent>(256);
        let reporter = self.reporter.clone();
        let (request, cell) = (p.request.clone(), p.cell.clone());
        let forwarder = tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match ev {
                    ExecEvent::Output(o) => {
                        if let Err(e) = reporter.output(&request, &cell, o).await {
                            warn!(error = %e, "cannot queue an output");
                        }
                    }
                    ExecEvent::Status(KernelState::Busy) => {
                        let _ = reporter.status(KernelState::Busy, "").await;
                    }
                    ExecEvent::Malformed { msg_type, reason } => {
                        debug!(%msg_type, %reason, "malformed kernel message skipped");
                    }
                    _ => {}
                }
            }
        });

        let begun = Instant::now();
        let mut end = CellEnd::Done;
        let mut status = CellStatus::Ok;
        let mut execution_count = None;
        let mut kernel_rtt = None;
        let mut died: Option<Exit> = None;
        {
            let Kernel {
                process,
                client,
                control,
                interrupt,
                ..
            } = kernel;
            let pid = process.pid();
            let resuming = p.resume.is_some();
            let exec = async {
                if resuming {
                    client.resume_to(&msg_id, &tx).await
                } else {
                    client.execute_to_with_id(&p.code, &msg_id, &tx).await
                }
            };
            tokio::pin!(exec);
            let mut death_tick = tokio::time::interval(DEATH_POLL);
            death_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let process_ref = process;
            // Set once a stop interrupted the cell: the cell may end until then.
            let mut stopping: Option<(String, tokio::time::Instant)> = None;
            loop {
                let stop_grace = async {
                    match &stopping {
                        Some((_, until)) => tokio::time::sleep_until(*until).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    reason = stop_requested(stop), if stopping.is_none() => {
                        info!(%reason, "the agent stops: interrupting the cell");
                        interrupt_kernel(*interrupt, control, pid).await;
                        stopping = Some((reason, tokio::time::Instant::now() + STOP_INTERRUPT_GRACE));
                    }
                    () = stop_grace => {
                        warn!("the interrupted cell did not end; stopping the kernel anyway");
                        status = CellStatus::Aborted;
                        break;
                    }
                    r = &mut exec => {
                        match r {
                            Ok(o) => {
                                status = o.status;
                                execution_count = o.execution_count;
                                kernel_rtt = Some(o.duration);
                            }
                            Err(e) => {
                                warn!(error = %chain(&e), "execution failed");
                                status = CellStatus::Aborted;
                            }
                        }
                        break;
                    }
                    _ = death_tick.tick() => {
                        let gone = process_ref.poll_exit(&self.cfg).await;
                        if let Some(e) = gone {
                            died = Some(e);
                            status = CellStatus::KernelDied;
                            break;
                        }
                    }
                    c = commands.recv() => match c.map(|f| f.envelope.msg) {
                        Some(Message::Interrupt { .. }) => {
                            info!("interrupting the cell");
                            interrupt_kernel(*interrupt, control, pid).await;
                        }
                        Some(Message::ExecuteCell { request, cell, code }) => {
                            self.queue.push_back(Pending { request, cell, code, resume: None });
                        }
                        Some(Message::RestartKernel { .. }) => {
                            status = CellStatus::Aborted;
                            end = CellEnd::Restart;
                            break;
                        }
                        Some(Message::Shutdown { reason, .. }) => {
                            status = CellStatus::Aborted;
                            end = CellEnd::Shutdown(reason);
                            break;
                        }
                        Some(other) => debug!(kind = other.kind(), "command ignored while a cell runs"),
                        None => {
                            end = CellEnd::Detached;
                            break;
                        }
                    },
                }
            }
            if let Some((reason, _)) = stopping
                && matches!(end, CellEnd::Done)
            {
                end = CellEnd::Stopped(reason);
            }
        }
        drop(tx);
        let _ = forwarder.await;
        if matches!(end, CellEnd::Detached) {
            // The agent is going away mid-cell: leave the record saying which cell
            // runs, for the next agent.
            return end;
        }
        if let Some(kernel) = self.kernel.as_mut() {
            kernel.record.running = None;
            kernel.record.executed += 1;
            if died.is_none() {
                let _ = kernel.record.save(&kernel.record_path);
            }
        }
        let _ = self
            .reporter
            .cell_finished(
                &p.request,
                &p.cell,
                status,
                execution_count,
                if p.resume.is_some() {
                    report::now_ms().saturating_sub(started_ms)
                } else {
                    begun.elapsed().as_millis() as u64
                },
            )
            .await;
        if let Some(rtt) = kernel_rtt {
            // The agent's own cost of a cell is `agent_us - kernel_us` (bench-kernel).
            debug!(
                target: "nbagent::timing",
                agent_us = entered.elapsed().as_micros() as u64,
                kernel_us = rtt.as_micros() as u64,
                "cell timing"
            );
        }
        if died.is_none() && matches!(end, CellEnd::Done) && status != CellStatus::Aborted {
            self.after_cell(&p, status).await;
        } else if let Some(k) = self.kernel.as_mut() {
            // The cell may have changed the kernel's state without an entry: the next
            // cell's must not be linked to the one before it.
            set_chain(k, reactive::Chain::Broken);
        }
        if let Some(exit) = died {
            self.kernel_died(exit, Some(&p)).await;
        } else if status == CellStatus::Aborted && matches!(end, CellEnd::Done) {
            // The client's state is unknown after a failed execution: reconnect.
            self.reconnect().await;
        } else {
            let _ = self.reporter.status(KernelState::Idle, "").await;
        }
        end
    }

    /// Replaces the client of the running kernel by a fresh one.
    async fn reconnect(&mut self) {
        let Some(k) = self.kernel.as_mut() else {
            return;
        };
        let info: Result<ConnectionInfo, _> = serde_json::from_value(k.record.connection.clone());
        let Ok(info) = info else { return };
        match KernelClient::connect(&info, self.cfg.start_timeout).await {
            Ok(c) => {
                k.control = c.control();
                k.record.session = c.session().to_owned();
                k.client = c;
                let _ = k.record.save(&k.record_path);
            }
            Err(e) => warn!(error = %chain(&e), "cannot reconnect to the kernel"),
        }
    }
}

/// Sets the kernel's place in the checkpoint chain and saves its record, so that an
/// agent adopting the kernel continues from there.
fn set_chain(k: &mut Kernel, next: reactive::Chain) {
    if k.record.chain == next {
        return;
    }
    k.record.chain = next;
    if let Err(e) = k.record.save(&k.record_path) {
        warn!(error = %chain(&e), "cannot update the kernel record");
    }
}

/// Default location of the kernel record, for tools and tests.
pub fn record_path(state_dir: &Path) -> PathBuf {
    KernelRecord::path(state_dir)
}
