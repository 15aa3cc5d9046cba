//! The kernel launch with real processes: the real launcher, the real `__kernel-init`
//! (the `nbagent` binary), a real Python as the "kernel". Needs root and the users of
//! scripts/setup.sh; skips with a printed reason otherwise.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nbagent::capabilities::{ProbeConfig, probe};
use nbagent::kernel::launch::{
    EnvPolicy, KernelExit, KernelProcess, LaunchConfig, LaunchError, launch,
};
use nbagent::kernel::spec::{InterruptMode, SpecError, SpecSearch};
use nbagent::users::{SystemUserDb, UserInfo, UserPolicy};
use nix::sys::signal::Signal;

const VENV: &str = "/opt/nbagent/venv";
const PYTHON: &str = "/opt/nbagent/venv/bin/python";
const DEADLINE: Duration = Duration::from_secs(20);

/// The notebook user, or `None` (with the reason printed) when the test cannot run here.
fn setup(test: &str) -> Option<UserInfo> {
    if !nix::unistd::geteuid().is_root() {
        nbagent_testkit::say_skip(&format!(
            "skipping {test}: needs root (run the tests as root, as CI does)"
        ));
        return None;
    }
    if !Path::new(PYTHON).exists() {
        nbagent_testkit::say_skip(&format!(
            "skipping {test}: {PYTHON} is missing (run scripts/setup.sh)"
        ));
        return None;
    }
    match UserPolicy::default().authorize(&SystemUserDb, "nbuser", "test") {
        Ok(u) => Some(u),
        Err(e) => {
            nbagent_testkit::say_skip(&format!(
                "skipping {test}: user nbuser is not usable ({e}); run scripts/setup.sh"
            ));
            None
        }
    }
}

/// Polls `f` until it returns `Some`, or panics at the deadline.
fn poll_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn agent_env() -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    for (k, v) in [
        ("PATH", "/usr/bin:/bin"),
        ("LANG", "C.UTF-8"),
        ("NBAGENT_TOKEN", "agent-token"),
        ("NBAGENT_SERVER", "127.0.0.1:7443"),
        ("NBSUPERVISOR_SECRET", "s"),
        ("AWS_SECRET_ACCESS_KEY", "s"),
        ("SOME_API_KEY", "s"),
        ("DB_PASSWORD", "s"),
        ("JPY_PARENT_PID", "1"),
        ("KERNEL_FOO", "foo-value"),
    ] {
        env.push((k.into(), v.into()));
    }
    env
}

struct Launched {
    process: KernelProcess,
    _dir: tempfile::TempDir,
}

fn config(user: &UserInfo, dir: &Path, argv: &[&str]) -> LaunchConfig {
    let policy = EnvPolicy {
        extra_path: vec![PathBuf::from(VENV).join("bin")],
        ..EnvPolicy::default()
    };
    let env = policy.build(agent_env(), user, &BTreeMap::new());
    let mut c = LaunchConfig::new(
        "test",
        argv.iter().map(|s| s.to_string()).collect(),
        env,
        user.clone(),
        dir.join("kernel.log"),
    );
    c.init_exe = env!("CARGO_BIN_EXE_nbagent").into();
    c
}

fn start(user: &UserInfo, argv: &[&str]) -> Launched {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let process = launch(&config(user, dir.path(), argv)).expect("the kernel launches");
    Launched { process, _dir: dir }
}

fn log(l: &Launched) -> String {
    std::fs::read_to_string(l.process.log_path()).unwrap_or_default()
}

fn wait_for_log(l: &Launched, text: &str) {
    poll_until(&format!("{text:?} in the kernel log"), || {
        log(l).contains(text).then_some(())
    });
}

const PROBE: &str = r#"
import json, os, sys
st = {}
for line in open('/proc/self/status'):
    k, _, v = line.partition(':')
    if k in ('CapEff', 'CapPrm', 'CapBnd', 'CapInh', 'CapAmb', 'NoNewPrivs', 'NSpid'):
        st[k] = v.strip()
try:
    open(sys.argv[1]).read()
    key = 'readable'
except PermissionError:
    key = 'PermissionError'
except Exception as e:
    key = repr(e)
def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
fds = [fd for fd in range(3, 1024) if is_open(fd)]
print(json.dumps({'status': st, 'fds': fds, 'pid': os.getpid(), 'ppid': os.getppid(),
                  'uid': os.getuid(), 'gid': os.getgid(), 'key': key,
                  'env': dict(os.environ), 'cwd': os.getcwd()}), flush=True)
"#;

#[test]
fn kernel_runs_confined() {
    let Some(user) = setup("kernel_runs_confined") else {
        return;
    };
    // Stands for the agent's key: root-owned, 0600, in a directory anyone may enter.
    let keydir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(keydir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = keydir.path().join("agent.key");
    std::fs::write(&key, "secret").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A bare "python", as in the venv's kernel.json: resolved on the kernel's PATH.
    let mut l = start(&user, &["python", "-c", PROBE, key.to_str().unwrap()]);
    assert!(l.process.pid() > 1);
    assert!(l.process.start_time() > 0);
    assert_eq!(
        l.process.wait().unwrap(),
        KernelExit::Exited(0),
        "{}",
        log(&l)
    );
    let text = log(&l);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON in the log: {text}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let st = &v["status"];
    for cap in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
        assert_eq!(st[cap], "0000000000000000", "{cap}: {st}");
    }
    assert_eq!(st["NoNewPrivs"], "1");
    assert_eq!(v["uid"], user.uid);
    assert_eq!(v["gid"], user.gid);
    assert_eq!(v["pid"], 2, "the kernel is PID 2 of its namespace");
    assert_eq!(v["ppid"], 1, "its parent is the namespace's init");
    let nspid: Vec<&str> = st["NSpid"].as_str().unwrap().split_whitespace().collect();
    assert_eq!(nspid.len(), 2, "two PID namespace levels: {nspid:?}");
    assert_eq!(nspid[1], "2");
    assert_eq!(v["key"], "PermissionError");
    // Nothing but stdin, stdout and stderr is inherited (no report pipe, no agent fds).
    assert_eq!(v["fds"], serde_json::json!([]), "inherited descriptors");
    let env = v["env"].as_object().unwrap();
    for k in env.keys() {
        assert!(
            !k.starts_with("NBAGENT_") && !k.starts_with("NBSUPERVISOR_"),
            "{k}"
        );
        let up = k.to_uppercase();
        assert!(
            k.starts_with("KERNEL_")
                || !["TOKEN", "SECRET", "KEY", "PASSWORD"]
                    .iter()
                    .any(|s| up.contains(s)),
            "{k}"
        );
        assert_ne!(k, "JPY_PARENT_PID");
    }
    assert_eq!(env["KERNEL_FOO"], "foo-value");
    assert_eq!(env["HOME"], user.home.to_str().unwrap());
    assert_eq!(env["USER"], "nbuser");
    assert!(
        env["PATH"]
            .as_str()
            .unwrap()
            .starts_with("/opt/nbagent/venv/bin:")
    );
    assert_eq!(v["cwd"], user.home.to_str().unwrap());
    // The log is append-only and private.
    let mode = std::fs::metadata(l.process.log_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        l.process
            .log_tail(5, 4096)
            .unwrap()
            .contains("\"NoNewPrivs\": \"1\"")
    );
}

#[test]
fn exit_code_is_reported() {
    let Some(user) = setup("exit_code_is_reported") else {
        return;
    };
    let mut l = start(&user, &[PYTHON, "-c", "import sys; sys.exit(3)"]);
    let exit = l.process.wait().unwrap();
    assert_eq!(exit, KernelExit::Exited(3));
    assert_eq!(
        (exit.exit_code(), exit.signal(), exit.code()),
        (Some(3), None, 3)
    );
    // Reaped once; later calls return the same status, and signalling is refused.
    assert_eq!(l.process.try_wait().unwrap(), Some(KernelExit::Exited(3)));
    assert!(matches!(
        l.process.kill(Signal::SIGTERM),
        Err(LaunchError::NotRunning { .. })
    ));
}

#[test]
fn killed_kernel_reports_the_signal() {
    let Some(user) = setup("killed_kernel_reports_the_signal") else {
        return;
    };
    let mut l = start(
        &user,
        &[
            PYTHON,
            "-c",
            "import time; print('ready', flush=True); time.sleep(600)",
        ],
    );
    wait_for_log(&l, "ready");
    assert_eq!(l.process.try_wait().unwrap(), None);
    let _pidfd = l.process.pidfd().unwrap();
    let kernel = poll_until("the kernel's outer pid", || l.process.kernel_pid());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(kernel), Signal::SIGKILL).unwrap();
    let exit = l.process.wait().unwrap();
    // The init exits 128 + 9; read back as death by SIGKILL.
    assert_eq!(exit, KernelExit::Signaled(9));
    assert_eq!(
        (exit.exit_code(), exit.signal(), exit.code()),
        (None, Some(9), 137)
    );
}

fn proc_field(pid: &str, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// (pid, state) of every process whose parent is `ppid`.
fn children_by_scan(ppid: i32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc")
        .expect("/proc is readable")
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if proc_field(&name, "PPid").as_deref() == Some(ppid.to_string().as_str())
            && let Some(state) = proc_field(&name, "State")
        {
            out.push((name, state));
        }
    }
    out
}

#[test]
fn orphans_are_reaped() {
    let Some(user) = setup("orphans_are_reaped") else {
        return;
    };
    let script = "import subprocess, time\n\
                  subprocess.run(['sh', '-c', 'sleep 0.1 &'])\n\
                  print('spawned', flush=True)\n\
                  time.sleep(600)\n";
    let mut l = start(&user, &[PYTHON, "-c", script]);
    wait_for_log(&l, "spawned");
    let init = l.process.pid();
    let kernel = poll_until("the kernel's outer pid", || l.process.kernel_pid());
    // `sh` has exited, so the `sleep` is an orphan reparented to the init. Once it ends,
    // the init must reap it: nothing but the kernel stays a child of the init, and
    // no zombie.
    let left = poll_until("the orphan to be reaped", || {
        let kids = children_by_scan(init);
        let only_kernel = kids.iter().all(|(pid, _)| *pid == kernel.to_string());
        only_kernel.then_some(kids)
    });
    assert!(left.iter().all(|(_, s)| !s.starts_with('Z')), "{left:?}");
    l.process.kill(Signal::SIGKILL).unwrap();
    assert_eq!(l.process.wait().unwrap(), KernelExit::Signaled(9));
}

#[test]
fn interrupt_reaches_the_kernel() {
    let Some(user) = setup("interrupt_reaches_the_kernel") else {
        return;
    };
    let script = "import signal, sys, time\n\
                  def on_int(*_):\n    print('interrupted', flush=True)\n    sys.exit(0)\n\
                  signal.signal(signal.SIGINT, on_int)\n\
                  print('ready', flush=True)\n\
                  while True:\n    time.sleep(1)\n";
    let mut l = start(&user, &[PYTHON, "-c", script]);
    wait_for_log(&l, "ready");
    l.process.interrupt().unwrap();
    assert_eq!(l.process.wait().unwrap(), KernelExit::Exited(0));
    assert!(log(&l).contains("interrupted"), "{}", log(&l));
}

#[test]
fn failed_privilege_step_is_named() {
    let Some(user) = setup("failed_privilege_step_is_named") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&user, dir.path(), &[PYTHON, "-c", "pass"]);
    c.cwd = Some("/nonexistent/nbagent-test".into());
    match launch(&c) {
        Err(LaunchError::Init { step, error, .. }) => {
            assert_eq!(step.as_deref(), Some("chdir to /nonexistent/nbagent-test"));
            assert!(
                error.contains("cannot drop privileges to user nbuser"),
                "{error}"
            );
        }
        other => panic!("{other:?}"),
    }
    c.cwd = None;
    c.argv = vec!["no-such-kernel-program".into()];
    assert!(matches!(
        launch(&c),
        Err(LaunchError::ProgramNotFound { .. })
    ));
    c.argv = vec![PYTHON.into()];
    c.init_exe = "/nonexistent/nbagent".into();
    assert!(matches!(launch(&c), Err(LaunchError::ExecInit { .. })));
}

#[test]
fn finds_the_venv_kernelspec() {
    if !Path::new(VENV)
        .join("share/jupyter/kernels/python3")
        .exists()
    {
        nbagent_testkit::say_skip(&format!(
            "skipping finds_the_venv_kernelspec: no kernelspec in {VENV} (run scripts/setup.sh)"
        ));
        return;
    }
    let search = SpecSearch::standard(|_| None, None, Some(Path::new(VENV)));
    let spec = search.find("python3").unwrap();
    assert_eq!(spec.argv[0], "python");
    assert_eq!(spec.language, "python");
    assert_eq!(spec.display_name, "Python 3 (ipykernel)");
    assert_eq!(spec.interrupt_mode, InterruptMode::Signal);
    assert_eq!(spec.prefix_bin(), Some(PathBuf::from(VENV).join("bin")));
    let argv = spec.argv_for(Path::new("/run/k/connection.json"));
    assert_eq!(argv.last().unwrap(), "/run/k/connection.json");
    assert!(search.list().iter().any(|s| s.name == "python3"));
}

#[test]
fn parses_a_kernelspec_with_message_interrupts() {
    let root = tempfile::tempdir().unwrap();
    let d = root.path().join("mykernel");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(
        d.join("kernel.json"),
        r#"{"argv": ["/usr/bin/mk", "-f", "{connection_file}"], "display_name": "My Kernel",
            "language": "r", "interrupt_mode": "message", "env": {"A": "1", "B": "two"},
            "metadata": {"x": 1}}"#,
    )
    .unwrap();
    let spec = SpecSearch::new(vec![root.path().into()])
        .find("mykernel")
        .unwrap();
    assert_eq!(spec.interrupt_mode, InterruptMode::Message);
    assert_eq!(spec.language, "r");
    assert_eq!(spec.env.get("B").map(String::as_str), Some("two"));
    assert_eq!(
        spec.argv_for(Path::new("/c.json")),
        vec!["/usr/bin/mk", "-f", "/c.json"]
    );
}

#[test]
fn missing_kernelspec_lists_the_search_path() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let search = SpecSearch::new(vec![a.path().into(), b.path().into()]);
    let e = search.find("nope").unwrap_err();
    assert!(matches!(e, SpecError::NotFound { .. }));
    let msg = e.to_string();
    assert!(msg.contains("no kernelspec named nope"), "{msg}");
    assert!(msg.contains(&a.path().display().to_string()), "{msg}");
    assert!(msg.contains(&b.path().display().to_string()), "{msg}");
}

#[test]
fn malformed_kernelspec_names_the_file() {
    let root = tempfile::tempdir().unwrap();
    let d = root.path().join("bad");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(
        d.join("kernel.json"),
        r#"{"argv": ["x"], "display_name": }"#,
    )
    .unwrap();
    let e = SpecSearch::new(vec![root.path().into()])
        .find("bad")
        .unwrap_err();
    assert!(matches!(e, SpecError::Malformed { .. }));
    let file = d.join("kernel.json").display().to_string();
    assert!(e.to_string().contains(&file), "{e}");
    let cause = std::error::Error::source(&e).unwrap().to_string();
    assert!(cause.contains("line 1"), "{cause}");
}

#[test]
fn capabilities_probe() {
    let Some(user) = setup("capabilities_probe") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let criu = dir.path().join("criu");
    std::fs::write(&criu, "#!/bin/sh\necho 'Version: 3.17'\n").unwrap();
    std::fs::set_permissions(&criu, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = ProbeConfig {
        dev_fuse: dir.path().join("no-fuse"),
        criu: Some(criu),
        switch_uid: user.uid,
        switch_gid: user.gid,
        ..ProbeConfig::default()
    };
    let features = probe(&config);
    nbagent::capabilities::log_features(&features);
    let get = |n: &str| {
        features
            .iter()
            .find(|f| f.name == n)
            .unwrap_or_else(|| panic!("no feature {n}: {features:?}"))
    };
    for name in ["sys_admin", "pid_namespace", "user_switch"] {
        assert!(get(name).enabled, "{:?}", get(name));
        assert!(get(name).how_to_enable.is_empty());
    }
    let cp = get("checkpoint");
    assert!(!cp.enabled);
    assert!(
        cp.detail.contains("3.17") && cp.detail.contains("IPv4 sockets"),
        "{cp:?}"
    );
    assert!(cp.how_to_enable.contains("CRIU >= 4.2"), "{cp:?}");
    let fuse = get("fuse_mount");
    assert!(!fuse.enabled);
    assert!(fuse.detail.contains("does not exist"), "{fuse:?}");
    assert!(
        fuse.how_to_enable.contains("--device /dev/fuse"),
        "{fuse:?}"
    );
    assert!(
        get("checkpoint_restore").enabled || !get("checkpoint_restore").how_to_enable.is_empty()
    );
    let names: Vec<&str> = features.iter().map(|f| f.name.as_str()).collect();
    for n in [
        "user_switch",
        "pid_namespace",
        "fuse_mount",
        "checkpoint",
        "sys_admin",
        "checkpoint_restore",
    ] {
        assert!(names.contains(&n), "{names:?}");
    }
}
