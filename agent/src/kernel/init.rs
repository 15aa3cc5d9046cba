//! `nbagent __kernel-init`: the tiny init that is PID 1 of the kernel's PID namespace.
//!
//! The launcher ([`super::launch`]) clones a child into a new PID namespace, and that
//! child immediately executes `nbagent __kernel-init <json>` ([`InitConfig`]). The init
//! then, single-threaded and without tokio:
//!
//! 1. drops privileges through [`Sys`] ([`drop_privileges`]): `setsid`, the user's
//!    supplementary groups, `setresgid`, the capability bounding set (which needs
//!    CAP_SETPCAP, so before `setresuid`), the ambient set, `setresuid`, then empties and
//!    checks every capability set, sets `PR_SET_NO_NEW_PRIVS` and changes to the working
//!    directory. Both the init and the kernel then run as the notebook's user with no
//!    capabilities: the kernel never runs with privileges, not even for one instruction;
//! 2. starts the kernel argv (PID 2 of the namespace) with the already filtered
//!    environment, and tells the launcher its pid (or why it failed) on the report pipe;
//! 3. with the signals blocked and taken with `sigwait` (no asynchronous handlers):
//!    forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the kernel, and
//!    reaps every child (the notebook's orphans are reparented to the namespace's init);
//! 4. when the kernel exits: SIGKILLs whatever is left in the namespace, reaps it, and
//!    exits with the kernel's exit code, or 128 + the signal number if a signal killed
//!    it (the shell convention; see [`super::launch::KernelExit`]).
//!
//! If the init fails before the kernel starts it exits with [`INIT_FAILED`].

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitCode;

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::sys::{Call, RealSys, Sys, SysError};

/// The first argument that selects the init in `nbagent`'s `main`.
pub const INIT_ARG: &str = "__kernel-init";

/// Exit status of an init that failed before the kernel started.
pub const INIT_FAILED: u8 = 125;

/// The descriptor on which the launcher reads the init's [`InitReport`].
pub const REPORT_FD: i32 = 3;

/// Signals the init forwards to the kernel.
pub const FORWARDED: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// What the launcher tells the init (one JSON argument).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitConfig {
    /// Kernel name, for the log.
    pub kernel: String,
    /// The kernel's argv; `argv[0]` is an absolute path.
    pub argv: Vec<String>,
    /// The kernel's whole environment (already filtered).
    pub env: BTreeMap<String, String>,
    /// Working directory of the kernel.
    pub cwd: PathBuf,
    /// Working directory of the init itself [default: `cwd`]. CRIU's parasite makes a
    /// scratch directory (`proc.crtools`) there during every dump, so it should be a
    /// directory of this kernel alone: two kernels of one user dumped at once would
    /// otherwise race for the same name in the shared home.
    #[serde(default)]
    pub init_cwd: Option<PathBuf>,
    /// The notebook user's name.
    pub user: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    /// Its supplementary groups.
    pub groups: Vec<u32>,
    /// Descriptor of the report pipe, if any.
    #[serde(default)]
    pub report_fd: Option<i32>,
}

/// What the init tells the launcher on the report pipe (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitReport {
    /// The kernel started, with this pid in the namespace.
    Started {
        /// The kernel's pid inside the namespace (2).
        kernel_pid: i32,
    },
    /// The init failed before the kernel started.
    Failed {
        /// The step that failed, if it was a privileged call.
        #[serde(default)]
        step: Option<String>,
        /// The error and its causes.
        error: String,
    },
}

/// Errors of the init.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// The command line is not `__kernel-init --config-fd <fd>` or `__kernel-init <json>`.
    #[error(
        "usage: nbagent {INIT_ARG} --config-fd <fd> | <json configuration> (started by nbagent itself)"
    )]
    Usage,
    /// The configuration descriptor could not be read.
    #[error("cannot read the init configuration")]
    ConfigRead(#[source] io::Error),
    /// The configuration is not valid JSON of an [`InitConfig`].
    #[error("cannot parse the init configuration")]
    Config(#[source] serde_json::Error),
    /// The kernel argv is empty.
    #[error("the kernel argv is empty")]
    EmptyArgv,
    /// A privileged call failed.
    #[error("cannot drop privileges to user {user} (uid {uid})")]
    Privileges {
        /// The user.
        user: String,
        /// Its uid.
        uid: u32,
        /// The failed call.
        #[source]
        source: SysError,
    },
    /// Signals could not be blocked or waited for.
    #[error("cannot block or wait for signals")]
    Signals(#[source] nix::Error),
    /// The kernel could not be started.
    #[error("cannot start the kernel {program}")]
    Spawn {
        /// `argv[0]`.
        program: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl InitError {
    /// The error with all its causes, `: `-separated.
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }

    fn report(&self) -> InitReport {
        let step = match self {
            InitError::Privileges { source, .. } => Some(source.call.to_string()),
            _ => None,
        };
        InitReport::Failed {
            step,
            error: self.chain(),
        }
    }
}

/// The steps that turn the kernel process into the notebook user with nothing, in
/// order (run in the kernel's process between fork and exec; see [`start`]).
pub fn privilege_steps(config: &InitConfig) -> Vec<Call> {
    vec![
        Call::Setgroups(config.groups.clone()),
        Call::Setresgid(config.gid),
        Call::DropBoundingSet,
        Call::ClearAmbient,
        Call::Setresuid(config.uid),
        Call::ClearCaps,
        Call::NoNewPrivs,
        Call::Dumpable,
        Call::Chdir(config.cwd.clone()),
    ]
}

/// Performs one step of [`privilege_steps`].
pub fn apply(sys: &dyn Sys, call: &Call) -> Result<(), SysError> {
    match call {
        Call::Setsid => sys.setsid(),
        Call::Setgroups(g) => sys.setgroups(g),
        Call::Setresgid(g) => sys.setresgid(*g),
        Call::DropBoundingSet => sys.drop_bounding_set(),
        Call::ClearAmbient => sys.clear_ambient(),
        Call::Setresuid(u) => sys.setresuid(*u),
        Call::ClearCaps => sys.clear_caps(),
        Call::NoNewPrivs => sys.set_no_new_privs(),
        Call::Dumpable => sys.set_dumpable(),
        Call::Chdir(d) => sys.chdir(d),
        Call::InitBecomeUser(u) => Err(SysError {
            call: Call::InitBecomeUser(*u),
            source: io::Error::other("not a step of the kernel process"),
        }),
    }
}

/// The init's own `setsid`, then every step of [`privilege_steps`], in order; stops at
/// the first failure. (The init runs the first part itself and the kernel process the
/// rest; this is the whole sequence, for tests.)
pub fn drop_privileges(sys: &dyn Sys, config: &InitConfig) -> Result<(), InitError> {
    let err = |source| InitError::Privileges {
        user: config.user.clone(),
        uid: config.uid,
        source,
    };
    sys.setsid().map_err(err)?;
    for step in privilege_steps(config) {
        apply(sys, &step).map_err(err)?;
    }
    Ok(())
}

/// Largest configuration read from the configuration descriptor.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// Parses the configuration JSON.
pub fn parse_config(json: &[u8]) -> Result<InitConfig, InitError> {
    let config: InitConfig = serde_json::from_slice(json).map_err(InitError::Config)?;
    if config.argv.is_empty() {
        return Err(InitError::EmptyArgv);
    }
    Ok(config)
}

/// Reads the configuration named by the arguments after `__kernel-init`: either
/// `--config-fd <fd>` (what the launcher passes: the JSON is read from that descriptor to
/// EOF, so the kernel's environment never shows in the world-readable command line) or
/// the JSON itself.
pub fn read_config(args: &[OsString]) -> Result<InitConfig, InitError> {
    match args {
        [flag, fd] if flag == "--config-fd" => {
            let fd: i32 = fd
                .to_str()
                .and_then(|s| s.parse().ok())
                .ok_or(InitError::Usage)?;
            let file = super::sys::adopt_fd(fd).ok_or(InitError::Usage)?;
            let mut json = Vec::new();
            File::from(file)
                .take(MAX_CONFIG_BYTES)
                .read_to_end(&mut json)
                .map_err(InitError::ConfigRead)?;
            parse_config(&json)
        }
        [json] => parse_config(json.as_encoded_bytes()),
        _ => Err(InitError::Usage),
    }
}

/// The entry point of `nbagent __kernel-init <json>`; `args` are the arguments after
/// `__kernel-init`. Never returns before the kernel exits (or the init fails).
pub fn main(args: Vec<OsString>) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_target(false)
        .with_writer(io::stderr)
        .try_init();
    // Nothing the agent might have left open without O_CLOEXEC reaches the kernel.
    super::sys::cloexec_from(REPORT_FD);
    let config = match read_config(&args) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e.chain(), "nbagent kernel init failed");
            if let Some(f) = super::sys::adopt_fd(REPORT_FD) {
                send_report(&mut File::from(f), &e.report());
            }
            return ExitCode::from(INIT_FAILED);
        }
    };
    let report = config.report_fd.and_then(super::sys::adopt_fd);
    match run(&RealSys, &config, report) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            error!(kernel = %config.kernel, error = %e.chain(), "nbagent kernel init failed");
            ExitCode::from(INIT_FAILED)
        }
    }
}

fn send_report(out: &mut File, report: &InitReport) {
    if let Ok(mut line) = serde_json::to_vec(report) {
        line.push(b'\n');
        let _ = out.write_all(&line);
    }
}

/// Drops privileges, starts the kernel, reports to `report`, then forwards signals and
/// reaps children until the kernel exits; returns the init's exit status.
pub fn run<S>(sys: &S, config: &InitConfig, report: Option<OwnedFd>) -> Result<u8, InitError>
where
    S: Sys + Clone + Send + Sync + 'static,
{
    let mut report = report.map(File::from);
    let started = start(sys, config);
    let (kernel, mask) = match started {
        Ok(k) => k,
        Err(e) => {
            if let Some(r) = report.as_mut() {
                send_report(r, &e.report());
            }
            return Err(e);
        }
    };
    info!(kernel = %config.kernel, kernel_pid = kernel.as_raw(), user = %config.user, "kernel started");
    if let Some(mut r) = report.take() {
        send_report(
            &mut r,
            &InitReport::Started {
                kernel_pid: kernel.as_raw(),
            },
        );
    }
    supervise(kernel, &mask, &config.kernel)
}

/// Starts the kernel. The kernel process drops to the notebook user with no
/// capabilities between fork and exec ([`privilege_steps`]); a failed step is sent back
/// on a close-on-exec pipe and named in the error. The init then becomes the notebook
/// user too but keeps CAP_SYS_ADMIN ([`Sys::init_become_user`]): CRIU injects its
/// parasite into the root of the dumped tree, and for a tree with its own PID namespace
/// the parasite mounts a procfs of that namespace. The init does nothing but reap and
/// forward signals and takes no input from the kernel; the kernel cannot ptrace it (it
/// lacks the init's capability) and can only signal it, ending its own namespace.
fn start<S>(sys: &S, config: &InitConfig) -> Result<(Pid, SigSet), InitError>
where
    S: Sys + Clone + Send + Sync + 'static,
{
    let privileges = |source| InitError::Privileges {
        user: config.user.clone(),
        uid: config.uid,
        source,
    };
    sys.setsid().map_err(privileges)?;
    let mut mask = SigSet::empty();
    for s in FORWARDED {
        mask.add(s);
    }
    mask.add(Signal::SIGCHLD);
    // Blocked before the kernel exists, so that no signal and no exit is missed; the
    // kernel starts with an empty mask (`reset_signals_on_exec`).
    mask.thread_block().map_err(InitError::Signals)?;
    let (program, rest) = config.argv.split_first().ok_or(InitError::EmptyArgv)?;
    let (status_r, status_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| InitError::Spawn {
            program: program.clone(),
            source: io::Error::from(e),
        })?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest).env_clear().envs(&config.env);
    super::sys::reset_signals_on_exec(&mut cmd);
    super::sys::drop_privileges_on_exec(&mut cmd, sys.clone(), privilege_steps(config), status_w);
    let spawned = cmd.spawn();
    // The parent's copy of the write end is gone with `cmd`: read to the end.
    drop(cmd);
    let failed = std::io::read_to_string(File::from(status_r)).unwrap_or_default();
    let child = match spawned {
        Ok(c) => c,
        Err(source) => {
            let steps = privilege_steps(config);
            if let Some((i, errno)) = failed.split_once(' ').and_then(|(i, rest)| {
                let errno = rest.split_whitespace().next()?.parse::<i32>().ok()?;
                Some((i.parse::<usize>().ok()?, errno))
            }) && let Some(call) = steps.get(i)
            {
                let detail = failed.splitn(3, ' ').nth(2).unwrap_or("").to_owned();
                let source = if errno > 0 {
                    io::Error::from_raw_os_error(errno)
                } else {
                    io::Error::other(detail)
                };
                return Err(privileges(SysError {
                    call: call.clone(),
                    source,
                }));
            }
            return Err(InitError::Spawn {
                program: program.clone(),
                source,
            });
        }
    };
    // The child is reaped by `supervise` with waitpid(-1), never through `Child`.
    let pid = i32::try_from(child.id()).map_err(|_| InitError::Spawn {
        program: program.clone(),
        source: io::Error::other("pid out of range"),
    })?;
    sys.init_become_user(config.uid, config.gid, &config.groups)
        .map_err(privileges)?;
    // CRIU's parasite creates (and removes) a scratch directory for the namespace's
    // procfs in the root task's working directory: it must be the user's, and this
    // kernel's alone.
    sys.chdir(config.init_cwd.as_ref().unwrap_or(&config.cwd))
        .map_err(privileges)?;
    Ok((Pid::from_raw(pid), mask))
}

/// Exit status for a wait status of the kernel: its code, or 128 + signal.
fn exit_status(status: WaitStatus) -> Option<u8> {
    match status {
        WaitStatus::Exited(_, code) => Some(u8::try_from(code & 0xff).unwrap_or(INIT_FAILED)),
        WaitStatus::Signaled(_, sig, _) => {
            Some(u8::try_from(128 + (sig as i32)).unwrap_or(INIT_FAILED))
        }
        _ => None,
    }
}

fn supervise(kernel: Pid, mask: &SigSet, name: &str) -> Result<u8, InitError> {
    loop {
        let sig = mask.wait().map_err(InitError::Signals)?;
        if sig != Signal::SIGCHLD {
            if let Err(e) = nix::sys::signal::kill(kernel, sig)
                && e != Errno::ESRCH
            {
                warn!(kernel = %name, signal = %sig, error = %e, "cannot forward a signal");
            }
            continue;
        }
        // Reap everything that has exited: the kernel and the notebook's orphans.
        let mut kernel_status = None;
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(st) if st.pid() == Some(kernel) => {
                    if let Some(code) = exit_status(st) {
                        info!(kernel = %name, status = ?st, exit = code, "kernel exited");
                        kernel_status = Some(code);
                    }
                }
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    warn!(kernel = %name, error = %e, "waitpid failed");
                    break;
                }
            }
        }
        if let Some(code) = kernel_status {
            kill_namespace();
            return Ok(code);
        }
    }
}

/// SIGKILLs every process left in the namespace and reaps them.
///
/// `kill(-1, SIGKILL)` signals every process the caller may signal except itself and
/// PID 1; this init *is* PID 1 of the kernel's own PID namespace, and a process cannot
/// see (or signal) anything outside its namespace, so this is exactly "everything else in
/// the namespace" and nothing of the agent's. The kernel (and init) run as the notebook
/// user with no_new_privs, so every process left has the same uid and can be signalled.
fn kill_namespace() {
    loop {
        let _ = nix::sys::signal::kill(Pid::from_raw(-1), Signal::SIGKILL);
        match waitpid(None, None) {
            Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::sys::{Call, RecordingSys};

    fn config() -> InitConfig {
        InitConfig {
            kernel: "python3".into(),
            argv: vec!["/bin/true".into()],
            env: BTreeMap::new(),
            cwd: "/home/nbuser".into(),
            init_cwd: Some("/run/nbagent/kernel-1".into()),
            user: "nbuser".into(),
            uid: 1001,
            gid: 1001,
            groups: vec![1001, 100],
            report_fd: None,
        }
    }

    #[test]
    fn config_without_init_cwd_still_parses() {
        let mut json = serde_json::to_value(config()).unwrap();
        json.as_object_mut().unwrap().remove("init_cwd");
        let parsed: InitConfig = serde_json::from_value(json).unwrap();
        assert_eq!(parsed.init_cwd, None);
        assert_eq!(parsed.cwd, config().cwd);
    }

    #[test]
    fn drops_privileges_in_order() {
        let sys = RecordingSys::new();
        drop_privileges(&sys, &config()).unwrap();
        assert_eq!(
            sys.calls(),
            vec![
                Call::Setsid,
                Call::Setgroups(vec![1001, 100]),
                Call::Setresgid(1001),
                Call::DropBoundingSet,
                Call::ClearAmbient,
                Call::Setresuid(1001),
                Call::ClearCaps,
                Call::NoNewPrivs,
                Call::Dumpable,
                Call::Chdir("/home/nbuser".into()),
            ]
        );
    }

    #[test]
    fn failing_call_aborts_and_names_the_step() {
        for (pred, step) in [
            (
                (|c: &Call| matches!(c, Call::DropBoundingSet)) as fn(&Call) -> bool,
                "drop the capability bounding set",
            ),
            (
                |c: &Call| matches!(c, Call::Setresuid(_)),
                "setresuid(1001)",
            ),
            (
                |c: &Call| matches!(c, Call::Setgroups(_)),
                "setgroups([1001, 100])",
            ),
        ] {
            let sys = RecordingSys::fail_on(pred);
            let e = drop_privileges(&sys, &config()).unwrap_err();
            let calls = sys.calls();
            assert!(pred(calls.last().unwrap()), "stopped at the failing call");
            assert!(!calls.contains(&Call::NoNewPrivs));
            let chain = e.chain();
            assert!(
                chain.starts_with("cannot drop privileges to user nbuser (uid 1001)"),
                "{chain}"
            );
            assert!(chain.contains(&format!("{step} failed")), "{chain}");
            match e.report() {
                InitReport::Failed { step: Some(s), .. } => assert_eq!(s, step),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn failure_is_reported_and_kernel_not_started() {
        let sys = RecordingSys::fail_on(|c| matches!(c, Call::ClearCaps));
        let (r, w) = nix::unistd::pipe().unwrap();
        let e = run(&sys, &config(), Some(w)).unwrap_err();
        assert!(matches!(e, InitError::Privileges { .. }));
        let line = std::io::read_to_string(File::from(r)).unwrap();
        let report: InitReport = serde_json::from_str(line.trim()).unwrap();
        assert!(matches!(report, InitReport::Failed { step: Some(_), .. }));
    }

    #[test]
    fn parses_args() {
        let json = serde_json::to_string(&config()).unwrap();
        assert_eq!(read_config(&[json.clone().into()]).unwrap(), config());
        assert!(matches!(read_config(&[]), Err(InitError::Usage)));
        assert!(matches!(
            read_config(&["{".into()]),
            Err(InitError::Config(_))
        ));
        let (r, w) = nix::unistd::pipe().unwrap();
        File::from(w).write_all(json.as_bytes()).unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(r).to_string();
        assert_eq!(
            read_config(&["--config-fd".into(), fd.into()]).unwrap(),
            config()
        );
    }

    #[test]
    fn exit_status_convention() {
        let p = Pid::from_raw(2);
        assert_eq!(exit_status(WaitStatus::Exited(p, 3)), Some(3));
        assert_eq!(
            exit_status(WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            Some(137)
        );
    }
}
