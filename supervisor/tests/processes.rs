//! The real supervisor binary with real processes. Agents are `sh` scripts; every wait
//! polls a condition with a deadline.

#![allow(clippy::unwrap_used)] // unwrap on test fixtures is fine

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbagent_testkit::say_skip;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_nbsupervisor");
const WAIT: Duration = Duration::from_secs(15);

/// Polls `f` every 10 ms until it holds or `within` passes.
fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `(pid, ppid, state)` of every process.
fn proc_table() -> Vec<(i32, i32, char)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let mut f = stat[close + 1..].split_ascii_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push((pid, ppid, state));
    }
    out
}

fn descendants(root: i32) -> Vec<i32> {
    let table = proc_table();
    let mut out = Vec::new();
    let mut queue = vec![root];
    while let Some(p) = queue.pop() {
        for &(pid, ppid, _) in &table {
            if ppid == p && !out.contains(&pid) {
                out.push(pid);
                queue.push(pid);
            }
        }
    }
    out
}

fn exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn ppid_of(pid: i32) -> Option<i32> {
    proc_table()
        .into_iter()
        .find(|&(p, _, _)| p == pid)
        .map(|(_, ppid, _)| ppid)
}

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A supervisor under test; on drop (a failed test) its whole tree is SIGKILLed.
struct Sup {
    child: Child,
    dir: tempfile::TempDir,
    status: Option<i32>,
}

impl Sup {
    /// Starts `nbsupervisor --log-format json --run-dir <tmp>/run ARGS -- sh -c SCRIPT`
    /// with `$S` naming the test's temporary directory.
    fn start(args: &[&str], script: &str) -> Self {
        Self::start_with(None, args, script)
    }

    fn start_with(wrapper: Option<&[&str]>, args: &[&str], script: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let run = dir.path().join("run");
        let mut argv: Vec<String> = Vec::new();
        if let Some(w) = wrapper {
            argv.extend(w.iter().map(|s| s.to_string()));
        }
        argv.push(BIN.to_owned());
        argv.extend(["--log-format", "json", "--run-dir"].map(String::from));
        argv.push(run.display().to_string());
        argv.extend(args.iter().map(|s| s.to_string()));
        argv.extend(["--", "sh", "-c", script].map(String::from));
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .env("S", dir.path())
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Sup {
            child,
            dir,
            status: None,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The `fields` of every JSON log event whose message is `message`.
    fn events(&self, message: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(self.path("log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v.get("fields").cloned())
            .filter(|f| f["message"] == message)
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("log")).unwrap_or_default()
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the supervisor to exit; its exit status.
    fn wait_exit(&mut self, within: Duration) -> i32 {
        let child = &mut self.child;
        let mut status = None;
        let exited = wait_until(within, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        assert!(exited, "supervisor still running; log:\n{}", self.log());
        let code = status.and_then(|s| s.code()).unwrap_or(-1);
        self.status = Some(code);
        code
    }

    fn wait_file(&self, name: &str) {
        let p = self.path(name);
        assert!(
            wait_until(WAIT, || p.exists()),
            "{name} never appeared; log:\n{}",
            self.log()
        );
    }
}

impl Drop for Sup {
    fn drop(&mut self) {
        if self.status.is_none() && self.child.try_wait().ok().flatten().is_none() {
            for pid in descendants(self.pid()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn orphans_are_reaped_and_the_agent_gets_its_environment() {
    let mut sup = Sup::start(
        &[],
        r#"echo "$NBSUPERVISOR_PID $NBSUPERVISOR_RUN_DIR" > $S/env
           (sleep 0.2 &)
           (sh -c 'sleep 0.3; exit 4' &)
           touch $S/ready
           exec sleep 60"#,
    );
    sup.wait_file("ready");
    assert!(
        wait_until(WAIT, || sup.events("orphan reaped").len() >= 2),
        "{}",
        sup.log()
    );
    let reaped = sup.events("orphan reaped");
    assert!(
        reaped.iter().any(|e| e["status"] == "exit code 4"),
        "{reaped:?}"
    );
    let env = std::fs::read_to_string(sup.path("env")).unwrap();
    let run = sup.path("run");
    assert_eq!(env.trim(), format!("{} {}", sup.pid(), run.display()));
    // No zombie is left under the supervisor: only the agent remains its child.
    let started = sup.events("agent started");
    let agent = started[0]["pid"].as_i64().unwrap() as i32;
    let children: Vec<_> = proc_table()
        .into_iter()
        .filter(|&(_, ppid, _)| ppid == sup.pid())
        .collect();
    assert_eq!(children, vec![(agent, sup.pid(), 'S')]);
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(WAIT), 0);
}

#[test]
fn crashing_agent_is_restarted_with_backoff() {
    let mut sup = Sup::start(
        &["--backoff-initial-ms", "100", "--backoff-max-ms", "1000"],
        r#"n=$(cat $S/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > $S/count
           [ $n -le 2 ] && exit 1
           touch $S/ready
           exec sleep 60"#,
    );
    sup.wait_file("ready");
    assert_eq!(std::fs::read_to_string(sup.path("count")).unwrap(), "3\n");
    let started = sup.events("agent started");
    let attempts: Vec<_> = started.iter().map(|e| e["attempt"].clone()).collect();
    assert_eq!(attempts, [1, 2, 3]);
    let delays: Vec<u64> = sup
        .events("restart scheduled")
        .iter()
        .map(|e| e["delay_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(delays.len(), 2, "{}", sup.log());
    assert!((50..=100).contains(&delays[0]), "{delays:?}");
    assert!((100..=200).contains(&delays[1]), "{delays:?}");
    let exits = sup.events("agent exited");
    assert!(
        exits.iter().all(|e| e["status"] == "exit code 1"),
        "{exits:?}"
    );
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(WAIT), 0);
    assert_eq!(
        sup.events("agent started").len(),
        3,
        "no restart at shutdown"
    );
}

#[test]
fn sigterm_is_forwarded_and_a_clean_agent_exit_gives_zero() {
    let mut sup = Sup::start(
        &[],
        r#"trap 'echo term > $S/got; exit 0' TERM
           sleep 60 & echo $! > $S/child
           touch $S/ready
           wait"#,
    );
    sup.wait_file("ready");
    let child = read_pid(&sup.path("child"));
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(WAIT), 0);
    assert_eq!(std::fs::read_to_string(sup.path("got")).unwrap(), "term\n");
    // The agent's leftover child got SIGTERM once the agent was gone.
    assert!(!exists(child));
    let sig = sup.events("signalled remaining processes");
    assert_eq!(sig[0]["count"], 1, "{sig:?}");
}

#[test]
fn agent_ignoring_sigterm_is_killed_at_the_deadline() {
    let mut sup = Sup::start(
        &["--shutdown-deadline-secs", "1"],
        r#"trap '' TERM
           sleep 60 &
           setsid sleep 60 &
           touch $S/ready
           while :; do sleep 1; done"#,
    );
    sup.wait_file("ready");
    assert!(wait_until(WAIT, || descendants(sup.pid()).len() >= 4));
    let tree = descendants(sup.pid());
    let t0 = Instant::now();
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(WAIT), 137);
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    for pid in tree {
        assert!(!exists(pid), "{pid} survived");
    }
    assert_eq!(
        sup.events("shutdown deadline passed with the agent still running; killing everything")
            .len(),
        1
    );
}

#[test]
fn orphan_survives_an_agent_crash_but_not_the_shutdown() {
    let mut sup = Sup::start(
        &["--backoff-initial-ms", "20"],
        r#"if [ ! -e $S/orphan ]; then
             setsid sleep 60 & echo $! > $S/orphan
             exit 1
           fi
           touch $S/ready
           exec sleep 60"#,
    );
    sup.wait_file("ready");
    let orphan = read_pid(&sup.path("orphan"));
    assert!(
        exists(orphan),
        "the kernel-like orphan was killed on restart"
    );
    assert_eq!(
        ppid_of(orphan),
        Some(sup.pid()),
        "reparented to the subreaper"
    );
    assert_eq!(sup.events("agent started").len(), 2);
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(WAIT), 0);
    assert!(!exists(orphan), "orphan left after shutdown");
}

#[test]
fn exit_record_for_an_adopted_child() {
    let mut sup = Sup::start(
        &["--backoff-initial-ms", "20"],
        r#"if [ ! -e $S/child ]; then
             sh -c 'sleep 0.3; exit 3' &
             : > "$NBSUPERVISOR_RUN_DIR/watch/$!"
             echo $! > $S/child
             exit 1
           fi
           exec sleep 60"#,
    );
    sup.wait_file("child");
    let child = read_pid(&sup.path("child"));
    let record = sup.path(&format!("run/exit/{child}"));
    assert!(wait_until(WAIT, || record.exists()), "{}", sup.log());
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"pid": child, "code": 3, "signal": null})
    );
    assert!(!sup.path(&format!("run/watch/{child}")).exists());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(sup.path("run/watch"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o7777, 0o755);
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(WAIT), 0);
}

#[test]
fn agent_exit_zero_ends_the_supervisor_without_restart() {
    let mut sup = Sup::start(&[], "echo x >> $S/starts; exit 0");
    assert_eq!(sup.wait_exit(WAIT), 0);
    assert_eq!(std::fs::read_to_string(sup.path("starts")).unwrap(), "x\n");
    assert_eq!(sup.events("agent started").len(), 1);
}

#[test]
fn agent_config_error_is_not_restarted() {
    let mut sup = Sup::start(
        &["--backoff-initial-ms", "1"],
        "echo x >> $S/starts; exit 78",
    );
    assert_eq!(sup.wait_exit(WAIT), 78);
    assert_eq!(std::fs::read_to_string(sup.path("starts")).unwrap(), "x\n");
    assert_eq!(
        sup.events("agent exited with 78 (EX_CONFIG): configuration error, not restarting")
            .len(),
        1
    );
}

#[test]
fn agent_that_cannot_start_gives_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .args(["--", "/nonexistent/nbagent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("cannot start the agent"), "{log}");
}

#[test]
fn max_restarts_gives_up() {
    let mut sup = Sup::start(
        &["--backoff-initial-ms", "1", "--max-restarts", "2"],
        "echo x >> $S/starts; exit 1",
    );
    assert_eq!(sup.wait_exit(WAIT), 1);
    assert_eq!(
        std::fs::read_to_string(sup.path("starts")).unwrap(),
        "x\nx\nx\n"
    );
}

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Detaches the test's mounts even when the test fails.
struct Unmount(Vec<PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        for p in &self.0 {
            while nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
        }
    }
}

#[test]
fn unmount_paths_are_detached_at_start_and_at_shutdown() {
    let scratch = tempfile::tempdir().unwrap();
    let (stale, late) = (scratch.path().join("stale"), scratch.path().join("late"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::create_dir(&late).unwrap();
    let _guard = Unmount(vec![stale.clone(), late.clone()]);
    if let Err(e) = nix::mount::mount(
        Some("nbsup-stale"),
        &stale,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    ) {
        say_skip(&format!(
            "SKIP unmount test: cannot mount a tmpfs here ({e}); needs root with CAP_SYS_ADMIN"
        ));
        return;
    }
    assert!(is_mounted(&stale));
    let script = format!(
        r#"if mountpoint -q {stale}; then echo mounted; else echo clean; fi > $S/stale-state
           mount -t tmpfs nbsup-late {late} || exit 1
           touch $S/ready
           exec sleep 60"#,
        stale = stale.display(),
        late = late.display()
    );
    let stale_arg = stale.display().to_string();
    let late_arg = late.display().to_string();
    let mut sup = Sup::start(
        &[
            "--unmount",
            &stale_arg,
            "--unmount",
            &late_arg,
            "--unmount",
            "/nonexistent/nbsup-mount",
        ],
        &script,
    );
    sup.wait_file("ready");
    assert_eq!(
        std::fs::read_to_string(sup.path("stale-state")).unwrap(),
        "clean\n"
    );
    assert!(is_mounted(&late));
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(WAIT), 0);
    assert!(!is_mounted(&late), "{}", sup.log());
    assert!(!is_mounted(&stale));
}

/// Whether `unshare --pid --fork --mount-proc` works here (root, util-linux).
fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

const UNSHARE: &[&str] = &["unshare", "--pid", "--fork", "--mount-proc"];

#[test]
fn as_pid1_leftovers_are_killed_with_kill_minus_one() {
    if !can_unshare() {
        say_skip("SKIP pid-1 test: `unshare --pid --fork --mount-proc` fails (needs root)");
        return;
    }
    let mut sup = Sup::start_with(
        Some(UNSHARE),
        &["--shutdown-deadline-secs", "1"],
        r#"echo $NBSUPERVISOR_PID > $S/pid
           (sh -c 'trap "" TERM; touch $S/orphan-ready; exec sleep 60' &)
           (sleep 60 &)
           while [ ! -e $S/orphan-ready ]; do sleep 0.05; done
           exit 0"#,
    );
    let t0 = Instant::now();
    assert_eq!(sup.wait_exit(WAIT), 0, "{}", sup.log());
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert_eq!(std::fs::read_to_string(sup.path("pid")).unwrap(), "1\n");
    let started = sup.events("supervisor started");
    assert_eq!(started[0]["pid1"], true, "{started:?}");
    assert_eq!(
        sup.events("signalled every other process of the namespace (kill -1)")
            .len(),
        1
    );
    assert_eq!(
        sup.events("SIGKILL sent to every other process of the namespace (kill -1)")
            .len(),
        1
    );
    assert_eq!(sup.events("all processes gone").len(), 1, "{}", sup.log());
}

#[test]
fn as_pid1_sigterm_from_the_parent_namespace_stops_in_order() {
    if !can_unshare() {
        say_skip("SKIP pid-1 test: `unshare --pid --fork --mount-proc` fails (needs root)");
        return;
    }
    let mut sup = Sup::start_with(
        Some(UNSHARE),
        &[],
        r#"trap 'echo term > $S/got; exit 0' TERM
           touch $S/ready
           sleep 60 & wait"#,
    );
    sup.wait_file("ready");
    // The supervisor is the child of `unshare` (which does not forward signals).
    let mut inner = None;
    assert!(wait_until(WAIT, || {
        inner = proc_table()
            .into_iter()
            .find(|&(_, ppid, _)| ppid == sup.pid())
            .map(|(pid, _, _)| pid);
        inner.is_some()
    }));
    kill(Pid::from_raw(inner.unwrap()), Signal::SIGTERM).unwrap();
    assert_eq!(sup.wait_exit(WAIT), 0, "{}", sup.log());
    assert_eq!(std::fs::read_to_string(sup.path("got")).unwrap(), "term\n");
}

#[test]
fn other_signals_are_forwarded_to_the_agent() {
    // Every forwarded signal interrupts `wait` and leaves another `sleep` behind; a
    // short deadline bounds the teardown of stragglers on a loaded machine.
    let mut sup = Sup::start(
        &["--shutdown-deadline-secs", "3"],
        r#"for s in HUP INT QUIT USR1 USR2; do trap "echo $s >> \$S/got" $s; done
           trap 'exit 0' TERM
           touch $S/ready
           while :; do sleep 60 & wait; done"#,
    );
    sup.wait_file("ready");
    let sigs = [
        Signal::SIGHUP,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ];
    for (i, sig) in sigs.into_iter().enumerate() {
        sup.signal(sig);
        // One at a time: the shell may coalesce signals that arrive together.
        let got = sup.path("got");
        assert!(
            wait_until(WAIT, || std::fs::read_to_string(&got)
                .is_ok_and(|t| t.lines().count() == i + 1)),
            "{sig} not forwarded; log:\n{}",
            sup.log()
        );
    }
    assert_eq!(
        std::fs::read_to_string(sup.path("got")).unwrap(),
        "HUP\nINT\nQUIT\nUSR1\nUSR2\n"
    );
    // Not PID 1: SIGINT was only forwarded, the agent still runs.
    assert!(sup.child.try_wait().unwrap().is_none());
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(WAIT), 0);
}

#[test]
fn sigterm_interrupts_the_restart_delay() {
    let mut sup = Sup::start(
        &["--backoff-initial-ms", "60000", "--backoff-max-ms", "60000"],
        "echo x >> $S/starts; exit 1",
    );
    assert!(wait_until(WAIT, || !sup
        .events("restart scheduled")
        .is_empty()));
    let t0 = Instant::now();
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(WAIT), 0);
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(std::fs::read_to_string(sup.path("starts")).unwrap(), "x\n");
}
