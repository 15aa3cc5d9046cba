//! A whole notebook stack for the kernel tests and the kernel benchmark: an in-process
//! `nbserver`, and the real `nbsupervisor` running the real `nbagent`, which runs a real
//! ipykernel as the notebook user. Plus small `/proc` readers to inspect the process tree.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nbagent::runtime::KernelRecord;
use nbagent::runtime::record::proc_stat;
use nbagent_protocol::{
    CellSource, CheckpointEvent, Envelope, Feature, FileRoot, Message, OutputContent,
};
use nbserver::run::{self, CellResult};
use nbserver::store::StoredMessage;

use crate::{bin, tail};

/// The notebook user the tests run kernels as (created by `scripts/setup.sh`).
pub const KERNEL_USER: &str = "nbuser";
/// The kernel's Python (the venv `scripts/setup.sh` creates).
pub const KERNEL_PYTHON: &str = "/opt/nbagent/venv/bin/python";

/// Why the kernel tests cannot run here, if they cannot: they need root (to switch to
/// the notebook user and create PID namespaces), the `nbuser` account and the kernel
/// venv with ipykernel.
pub fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root: the agent needs root to start kernels as another user".into());
    }
    if !matches!(nix::unistd::User::from_name(KERNEL_USER), Ok(Some(_))) {
        return Some(format!(
            "user {KERNEL_USER} does not exist (scripts/setup.sh creates it)"
        ));
    }
    if !Path::new(KERNEL_PYTHON).exists() {
        return Some(format!(
            "{KERNEL_PYTHON} is missing (scripts/setup.sh creates the kernel venv)"
        ));
    }
    None
}

/// Where the reactive tests find CRIU.
pub const CRIU: &str = nbagent::DEFAULT_CRIU;

/// Why the checkpoint tests cannot run here, if they cannot: the kernel prerequisites
/// ([`missing_prerequisite`]) plus CRIU >= 4.2 at [`CRIU`].
pub fn missing_checkpoint_prerequisite() -> Option<String> {
    if let Some(why) = missing_prerequisite() {
        return Some(why);
    }
    let out = match Command::new(CRIU).arg("--version").output() {
        Ok(o) => o,
        Err(e) => {
            return Some(format!(
                "{CRIU} cannot run ({e}); scripts/criu.sh installs it"
            ));
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| {
            v.trim()
                .split('.')
                .map(|n| n.parse::<u32>().unwrap_or(0))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    match version.as_slice() {
        [major, minor, ..] if (*major, *minor) >= (4, 2) => None,
        _ => Some(format!(
            "{CRIU} is not CRIU >= 4.2 (it says {:?}); scripts/criu.sh installs it",
            text.trim()
        )),
    }
}

/// One checkpoint event the agent reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointReport {
    /// The cell after which the checkpoint was (to be) taken; empty for evictions.
    pub cell: String,
    /// The checkpoint id (empty when the store had none).
    pub checkpoint: String,
    /// What happened.
    pub event: CheckpointEvent,
    /// Bytes stored.
    pub bytes: u64,
    /// How long it took.
    pub duration_ms: u64,
    /// Why (failures, evictions).
    pub reason: String,
}

/// How to start the stack.
#[derive(Debug, Clone)]
pub struct Setup {
    /// KERNEL_USERNAME for the agent.
    pub kernel_user: String,
    /// Extra environment for the supervisor (and so the agent).
    pub env: Vec<(String, String)>,
    /// RUST_LOG for the agent and the supervisor.
    pub rust_log: String,
    /// Extra arguments for the agent (after the ones the harness passes).
    pub agent_args: Vec<String>,
    /// Files attached on the server before the agent starts: (tree, path, content).
    /// The harness turns attached files off (`NBAGENT_FILES_MODE=off`) unless `env`
    /// says otherwise.
    pub files: Vec<(FileRoot, String, Vec<u8>)>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            kernel_user: KERNEL_USER.into(),
            env: Vec::new(),
            rust_log: "info".into(),
            agent_args: Vec::new(),
            files: Vec::new(),
        }
    }
}

/// A stored agent message with its decoded header.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The row.
    pub row: StoredMessage,
    /// The decoded message.
    pub msg: Message,
}

/// A running stack. Dropping it stops the supervisor (SIGTERM, then SIGKILL) and kills a
/// kernel left behind.
#[derive(Debug)]
pub struct Notebook {
    /// The in-process server.
    pub server: nbserver::RunningServer,
    /// The agent's name.
    pub agent: String,
    /// The enrolment token (to check it does not leak).
    pub token: String,
    /// `--state-dir` of the agent.
    pub state_dir: PathBuf,
    /// `--run-dir` of the supervisor.
    pub run_dir: PathBuf,
    /// `NBAGENT_RUNTIME_DIR`.
    pub runtime_dir: PathBuf,
    /// Stdout and stderr of the supervisor, the agent and the kernel init.
    pub log: PathBuf,
    /// When the supervisor was spawned.
    pub started: Instant,
    /// The same, Unix milliseconds (to compare with the store's `received_at`).
    pub started_unix_ms: i64,
    supervisor: Child,
    exited: Option<ExitStatus>,
    cells: AtomicUsize,
    _tmp: tempfile::TempDir,
}

impl Notebook {
    /// Starts the server and `nbsupervisor -- nbagent ...`; returns at once (the agent
    /// connects and starts its kernel in the background).
    pub async fn start(setup: Setup) -> Notebook {
        let tmp = tempfile::tempdir().expect("tempdir");
        // The runtime directory below must be traversable by the notebook user.
        std::fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod tempdir");
        let data_dir = tmp.path().join("server");
        let state_dir = tmp.path().join("agent");
        let run_dir = tmp.path().join("run");
        let runtime_dir = tmp.path().join("runtime");
        let log = tmp.path().join("stack.log");
        let config = nbserver::ServerConfig::new(data_dir.clone(), "127.0.0.1:0".parse().unwrap());
        let server = nbserver::start(config).await.expect("start nbserver");
        let agent = "kernel-agent".to_owned();
        let token =
            nbserver::cli::create_token(&server.state.store, &agent, Duration::from_secs(600))
                .await
                .expect("token")
                .to_string();
        for (root, path, bytes) in &setup.files {
            nbserver::files::put_bytes(
                &server.state.store,
                &server.state.blobs,
                &agent,
                *root,
                path,
                bytes.clone(),
            )
            .await
            .expect("attach file");
        }
        let mut cmd = Command::new(bin("nbsupervisor"));
        cmd.arg("--run-dir")
            .arg(&run_dir)
            .args(["--shutdown-deadline-secs", "20", "--"])
            .arg(bin("nbagent"))
            .args(["--server", &server.addr.to_string()])
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--server-ca")
            .arg(data_dir.join("pki").join("ca.crt"))
            .args(["--kernel", "python3"])
            .args(&setup.agent_args)
            .env("NBAGENT_TOKEN", &token)
            .env("KERNEL_USERNAME", &setup.kernel_user)
            .env("NBAGENT_RUNTIME_DIR", &runtime_dir)
            .env("NBAGENT_LOG_FORMAT", "json")
            .env("RUST_LOG", &setup.rust_log)
            .env("NBAGENT_FILES_MODE", "off")
            .envs(setup.env.iter().map(|(k, v)| (k, v)));
        let f = std::fs::File::create(&log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f);
        let started = Instant::now();
        let started_unix_ms = unix_ms();
        let supervisor = cmd.spawn().expect("spawn nbsupervisor");
        Notebook {
            server,
            agent,
            token,
            state_dir,
            run_dir,
            runtime_dir,
            log,
            started,
            started_unix_ms,
            supervisor,
            exited: None,
            cells: AtomicUsize::new(0),
            _tmp: tmp,
        }
    }

    /// Kills the server (listener and live sessions), waits `down`, and starts it
    /// again on the same address and data directory.
    pub async fn restart_server(&mut self, down: Duration) {
        let config = self.stop_server().await;
        tokio::time::sleep(down).await;
        self.start_server(config).await;
    }

    /// Kills the server (listener and live sessions); returns its configuration for
    /// [`start_server`](Self::start_server). Until then `self.server` is a stand-in on
    /// another address, which the agent does not reach.
    pub async fn stop_server(&mut self) -> nbserver::ServerConfig {
        let mut config = self.server.state.config.clone();
        config.listen = self.server.addr;
        let stand_in = nbserver::ServerConfig::new(
            self._tmp.path().join("stand-in"),
            "127.0.0.1:0".parse().unwrap(),
        );
        let stand_in = nbserver::start(stand_in).await.expect("start stand-in");
        let old = std::mem::replace(&mut self.server, stand_in);
        old.kill().await;
        config
    }

    /// Starts the server stopped by [`stop_server`](Self::stop_server) again.
    pub async fn start_server(&mut self, config: nbserver::ServerConfig) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let fresh = loop {
            match nbserver::start(config.clone()).await {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot restart the server: {e}"),
            }
        };
        std::mem::replace(&mut self.server, fresh).kill().await;
    }

    /// The supervisor's pid.
    pub fn supervisor_pid(&self) -> i32 {
        self.supervisor.id() as i32
    }

    /// The last lines of the stack's log, for assertion messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }

    /// Queues a cell; returns its request id.
    pub async fn submit(&self, code: &str) -> String {
        let n = self.cells.fetch_add(1, Ordering::Relaxed);
        let request = format!("t/{n}");
        self.command(&Message::ExecuteCell {
            request: request.clone(),
            cell: format!("c{n}"),
            code: code.to_owned(),
        })
        .await;
        request
    }

    /// Queues any command.
    pub async fn command(&self, msg: &Message) {
        self.server
            .state
            .submit(&self.agent, msg)
            .await
            .expect("queue command");
    }

    /// Waits for the cell `request` to finish.
    pub async fn wait(&self, request: &str, timeout: Duration) -> CellResult {
        match run::wait_for_cells(
            &self.server.state,
            &self.agent,
            &[request.to_owned()],
            timeout,
            |_| {},
        )
        .await
        {
            Ok(mut r) => r.remove(0),
            Err(e) => panic!(
                "cell {request} did not finish: {e}\n--- log:\n{}",
                self.log_tail()
            ),
        }
    }

    /// Runs one cell (60 s limit, which includes a kernel start).
    pub async fn run(&self, code: &str) -> CellResult {
        let r = self.submit(code).await;
        self.wait(&r, Duration::from_secs(60)).await
    }

    /// Runs one cell that must succeed and returns its stdout.
    pub async fn stdout(&self, code: &str) -> String {
        let r = self.run(code).await;
        assert_eq!(
            r.status,
            nbagent_protocol::CellStatus::Ok,
            "cell {code:?} failed: {:?}",
            r.outputs
        );
        stdout_of(&r)
    }

    /// Every stored message of `kind`, in order.
    pub async fn messages(&self, kind: &str) -> Vec<Stored> {
        self.server
            .state
            .store
            .messages_of_kind(&self.agent, kind)
            .await
            .expect("read store")
            .into_iter()
            .filter_map(|row| {
                let env: Envelope = serde_json::from_str(&row.header).ok()?;
                Some(Stored { row, msg: env.msg })
            })
            .collect()
    }

    /// Waits until `pick` finds something among the stored messages of `kind`.
    pub async fn wait_for<T>(
        &self,
        kind: &str,
        timeout: Duration,
        mut pick: impl FnMut(&[Stored]) -> Option<T>,
    ) -> T {
        let mut stored = self.server.state.stored_events.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            stored.borrow_and_update();
            if let Some(t) = pick(&self.messages(kind).await) {
                return t;
            }
            // Woken by every committed batch; the timeout is the deadline.
            if tokio::time::timeout_at(deadline, stored.changed())
                .await
                .is_err()
            {
                panic!(
                    "no matching {kind} message within {timeout:?}\n--- log:\n{}",
                    self.log_tail()
                );
            }
        }
    }

    /// Runs `cells` as plain cells (`ExecuteCell`, run id `run`), 120 s limit.
    pub async fn run_cells(&self, run: &str, cells: &[CellSource]) -> Vec<CellResult> {
        run::run_cells(
            &self.server.state,
            &self.agent,
            run,
            cells,
            Duration::from_secs(120),
            |_| {},
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "run {run} did not finish: {e}\n--- log:\n{}",
                self.log_tail()
            )
        })
    }

    /// Reactive re-run (`RunFrom`, run id `run`) of `cells` from `from`; the results
    /// of the cells the agent executed, in order. 180 s limit.
    pub async fn run_from(&self, run: &str, cells: &[CellSource], from: usize) -> Vec<CellResult> {
        run::run_from(
            &self.server.state,
            &self.agent,
            run,
            cells,
            from,
            Duration::from_secs(180),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "run_from {run} (from {from}) did not finish: {e}\n--- log:\n{}",
                self.log_tail()
            )
        })
    }

    /// Every checkpoint event stored so far, in order.
    pub async fn checkpoints(&self) -> Vec<CheckpointReport> {
        checkpoint_reports(&self.messages("checkpoint").await)
    }

    /// Waits until the agent reported what became of the checkpoint after cell `cell`
    /// (created, not restorable or failed) among the checkpoint events after the
    /// first `since`; returns that event.
    pub async fn wait_checkpoint_of(&self, cell: &str, since: usize) -> CheckpointReport {
        self.wait_for("checkpoint", Duration::from_secs(120), |m| {
            checkpoint_reports(m).into_iter().skip(since).find(|c| {
                c.cell == cell
                    && matches!(
                        c.event,
                        CheckpointEvent::Created
                            | CheckpointEvent::NotRestorable
                            | CheckpointEvent::Failed
                    )
            })
        })
        .await
    }

    /// The features of the agent's last capability report (waits for one).
    pub async fn capabilities(&self) -> Vec<Feature> {
        self.wait_for("capabilities", Duration::from_secs(60), |m| {
            m.iter().rev().find_map(|s| match &s.msg {
                Message::Capabilities { features } => Some(features.clone()),
                _ => None,
            })
        })
        .await
    }

    /// The details of every `kernel_status` the agent reported.
    pub async fn status_details(&self) -> Vec<String> {
        self.messages("kernel_status")
            .await
            .into_iter()
            .filter_map(|s| match s.msg {
                Message::KernelStatus { detail, .. } => Some(detail),
                _ => None,
            })
            .collect()
    }

    /// Waits until the agent reported a kernel ready (a `kernel_status` idle whose detail
    /// says so, or an adoption).
    pub async fn wait_kernel_ready(&self, timeout: Duration) {
        self.wait_for("kernel_status", timeout, |m| {
            m.iter()
                .any(|s| matches!(&s.msg, Message::KernelStatus { detail, .. } if detail.contains(" ready in ")))
                .then_some(())
        })
        .await;
    }

    /// The kernel record the agent keeps (`<state>/kernel/kernel.json`).
    pub fn record(&self) -> Option<KernelRecord> {
        KernelRecord::load(&nbagent::runtime::record_path(&self.state_dir))
            .expect("read kernel record")
    }

    /// The running agent: the supervisor's child that is not a kernel init.
    pub fn agent_pid(&self) -> Option<i32> {
        children(self.supervisor_pid()).into_iter().find(|&p| {
            !cmdline(p).iter().any(|a| a == "__kernel-init")
                && proc_stat(Path::new("/proc"), p).is_some_and(|s| s.state != 'Z')
        })
    }

    /// Waits for the supervisor to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited {
                return Some(s);
            }
            if let Ok(Some(s)) = self.supervisor.try_wait() {
                self.exited = Some(s);
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Notebook {
    fn drop(&mut self) {
        let kernel = self.record();
        if self.exited.is_none() && matches!(self.supervisor.try_wait(), Ok(None)) {
            let pid = nix::unistd::Pid::from_raw(self.supervisor_pid());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(25);
            while matches!(self.supervisor.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.supervisor.kill();
            let _ = self.supervisor.wait();
        }
        if let Some(k) = kernel
            && k.is_alive(Path::new("/proc"))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(k.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The checkpoint events among `msgs`.
pub fn checkpoint_reports(msgs: &[Stored]) -> Vec<CheckpointReport> {
    msgs.iter()
        .filter_map(|s| match &s.msg {
            Message::Checkpoint {
                cell,
                checkpoint,
                event,
                bytes,
                duration_ms,
                reason,
            } => Some(CheckpointReport {
                cell: cell.clone(),
                checkpoint: checkpoint.clone(),
                event: *event,
                bytes: *bytes,
                duration_ms: *duration_ms,
                reason: reason.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// Now, Unix milliseconds.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The stdout text of a cell, concatenated.
pub fn stdout_of(r: &CellResult) -> String {
    stream_of(r, "stdout")
}

/// The text of one stream of a cell, concatenated.
pub fn stream_of(r: &CellResult, stream: &str) -> String {
    r.outputs
        .iter()
        .filter_map(|o| match o {
            OutputContent::Stream { name, text } if name == stream => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// The children of `pid` (all its threads' children).
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The argv of `pid` (empty for a zombie or a vanished process).
pub fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// One process of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// PID.
    pub pid: i32,
    /// Parent PID.
    pub ppid: i32,
    /// State letter.
    pub state: char,
    /// argv.
    pub cmdline: Vec<String>,
}

/// Every process whose ancestry leads to `root` (excluding `root`), from a scan of all
/// of `/proc`.
pub fn tree(root: i32) -> Vec<ProcInfo> {
    let mut all: HashMap<i32, ProcInfo> = HashMap::new();
    if let Ok(d) = std::fs::read_dir("/proc") {
        for e in d.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(s) = proc_stat(Path::new("/proc"), pid) {
                all.insert(
                    pid,
                    ProcInfo {
                        pid,
                        ppid: s.ppid,
                        state: s.state,
                        cmdline: cmdline(pid),
                    },
                );
            }
        }
    }
    let under = |mut p: i32| {
        for _ in 0..64 {
            match all.get(&p) {
                Some(i) if i.ppid == root => return true,
                Some(i) if i.ppid > 1 => p = i.ppid,
                _ => return false,
            }
        }
        false
    };
    let mut v: Vec<ProcInfo> = all.values().filter(|i| under(i.pid)).cloned().collect();
    v.sort_by_key(|i| i.pid);
    v
}

/// The `Key:\tvalue` lines of `/proc/<pid>/status`.
pub fn proc_status(pid: i32) -> HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// Resident set size of `pid`, KiB (`VmRSS`).
pub fn rss_kib(pid: i32) -> Option<u64> {
    proc_status(pid)
        .get("VmRSS")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether the process `pid` that started at `start_ticks` still exists in any state
/// (a zombie counts: it is not reaped yet).
pub fn exists(pid: i32, start_ticks: u64) -> bool {
    proc_stat(Path::new("/proc"), pid).is_some_and(|s| s.start_ticks == start_ticks)
}

/// Path of the agent's identity directory under its state directory.
pub fn identity_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("identity")
}
