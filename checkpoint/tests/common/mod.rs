//! Helpers of the real-CRIU tests: skip checks and process trees in their own PID
//! namespace and session.

#![allow(dead_code)]
// Test helpers: a failed setup step should fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nbagent_checkpoint::{Criu, CriuConfig, DEFAULT_CRIU_BINARY, kill_tree, pid_exists};

pub const PYTHON: &str = "/opt/nbagent/venv/bin/python";

/// Real-CRIU tests run one at a time: they share 2 cores and their timings matter.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A driver for the installed CRIU, or `None` (with the reason printed) when this
/// machine cannot run the test.
pub fn criu_or_skip(test: &str) -> Option<Criu> {
    let skip = |why: String| {
        say_skip(&format!("skipping {test}: {why}"));
        None
    };
    if !nix::unistd::Uid::effective().is_root() {
        return skip("not root (CRIU needs root)".into());
    }
    if !Path::new(DEFAULT_CRIU_BINARY).exists() {
        return skip(format!(
            "{DEFAULT_CRIU_BINARY} missing (scripts/criu.sh installs it)"
        ));
    }
    if !Path::new(PYTHON).exists() {
        return skip(format!("{PYTHON} missing (the kernel venv)"));
    }
    let criu = Criu::new(CriuConfig::default());
    match criu.version() {
        Ok(_) => Some(criu),
        Err(e) => skip(format!("{e}")),
    }
}

pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// A tree started as `unshare --pid --fork setsid <argv>`: `root` is the PID
/// namespace's init (host pid), `unshare` its parent (our child).
pub struct Tree {
    pub unshare: Option<Child>,
    pub root: i32,
    pub log: PathBuf,
}

impl Tree {
    pub fn spawn(argv: &[&str], dir: &Path, env: &[(&str, &str)]) -> Tree {
        Self::spawn_with(&["--pid", "--fork", "setsid"], argv, dir, env)
    }

    /// `unshare` with `prefix` (e.g. only `setsid` via `--fork`-less forms).
    pub fn spawn_with(prefix: &[&str], argv: &[&str], dir: &Path, env: &[(&str, &str)]) -> Tree {
        let log = dir.join("out.log");
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = Command::new("unshare");
        cmd.args(prefix)
            .args(argv)
            .current_dir(dir)
            .env_remove("JPY_PARENT_PID")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let upid = i32::try_from(child.id()).unwrap();
        let root = poll("the namespace's init", Duration::from_secs(10), || {
            let text = fs::read_to_string(format!("/proc/{upid}/task/{upid}/children")).ok()?;
            text.split_whitespace().next()?.parse::<i32>().ok()
        });
        Tree {
            unshare: Some(child),
            root,
            log,
        }
    }

    /// Kills the live tree and reaps it (and `unshare`).
    pub fn kill(&mut self) {
        kill_tree(self.root, Duration::from_secs(10)).unwrap();
        if let Some(mut u) = self.unshare.take() {
            u.wait().unwrap();
        }
        assert!(!pid_exists(self.root));
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = kill_tree(self.root, Duration::from_secs(10));
        if let Some(mut u) = self.unshare.take() {
            let _ = u.kill();
            let _ = u.wait();
        }
    }
}

/// Kills (and reaps) a restored root on drop.
pub struct Restored(pub i32);

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = kill_tree(self.0, Duration::from_secs(10));
    }
}

/// The state machine of `STATE_PY`: requests are files `req-N` in its control dir,
/// answers `resp-N`, both written with rename so nothing is held open.
pub struct Ctl {
    pub dir: PathBuf,
    pub n: u32,
}

impl Ctl {
    /// After a restore the process is back at the request it had answered at dump
    /// time: forget the requests and answers since.
    pub fn rewind(&mut self, to: u32) {
        for n in to + 1..=self.n {
            for f in [format!("req-{n}"), format!("resp-{n}")] {
                let _ = fs::remove_file(self.dir.join(f));
            }
        }
        self.n = to;
    }

    pub fn ask(&mut self, cmd: &str) -> String {
        self.n += 1;
        let tmp = self.dir.join(format!("tmp-{}", self.n));
        let mut f = File::create(&tmp).unwrap();
        f.write_all(cmd.as_bytes()).unwrap();
        drop(f);
        fs::rename(&tmp, self.dir.join(format!("req-{}", self.n))).unwrap();
        let resp = self.dir.join(format!("resp-{}", self.n));
        poll(
            &format!("answer to {cmd:?}"),
            Duration::from_secs(20),
            || fs::read_to_string(&resp).ok(),
        )
    }
}

/// A process like a kernel: a TCP listener on 127.0.0.1 with a connected pair in
/// the process, a big heap, and one variable read and set through request files.
pub const STATE_PY: &str = r#"
import os, socket, sys, time
ctl = sys.argv[1]
mb = int(sys.argv[2])
heap = bytearray(os.urandom(1 << 20)) * mb
# Like ZeroMQ listeners: SO_REUSEADDR, so that the TIME_WAIT left by the killed
# connections does not keep the restored listener from binding.
lsk = socket.socket(); lsk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); lsk.bind(("127.0.0.1", 0)); lsk.listen(8)
port = lsk.getsockname()[1]
cli = socket.create_connection(("127.0.0.1", port)); srv, _ = lsk.accept()
cli.sendall(b"x"); srv.recv(1)
value = "initial"
n = 0
print("ready", os.getpid(), port, flush=True)
open(os.path.join(ctl, "ready.tmp"), "w").write(str(port)); os.rename(os.path.join(ctl, "ready.tmp"), os.path.join(ctl, "ready"))
while True:
    req = os.path.join(ctl, "req-%d" % (n + 1))
    if not os.path.exists(req):
        time.sleep(0.002)
        continue
    n += 1
    cmd = open(req).read().split(" ", 1)
    if cmd[0] == "set":
        value = cmd[1]; out = "ok"
    elif cmd[0] == "get":
        out = value
    elif cmd[0] == "tcp":
        # The listener survives a restore; a new connection through it works.
        c = socket.create_connection(("127.0.0.1", port)); s, _ = lsk.accept()
        c.sendall(b"ping"); out = s.recv(4).decode(); c.close(); s.close()
    elif cmd[0] == "sum":
        out = str(sum(heap[::4096]))
    else:
        out = "unknown"
    tmp = os.path.join(ctl, "tmp-resp")
    open(tmp, "w").write(out); os.rename(tmp, os.path.join(ctl, "resp-%d" % n))
    print("answered", n, flush=True)
"#;

/// Starts `STATE_PY` with `mb` MiB of heap in `dir`, in its own PID namespace.
pub fn spawn_state(dir: &Path, mb: u32) -> (Tree, Ctl) {
    spawn_state_with(dir, mb, &["--pid", "--fork", "setsid"])
}

/// Starts `STATE_PY` in its own session but in our PID namespace (`unshare --fork
/// setsid`, which unshares nothing and forks).
pub fn spawn_state_no_pidns(dir: &Path, mb: u32) -> (Tree, Ctl) {
    spawn_state_with(dir, mb, &["--fork", "setsid"])
}

fn spawn_state_with(dir: &Path, mb: u32, prefix: &[&str]) -> (Tree, Ctl) {
    let ctl = dir.join("ctl");
    fs::create_dir_all(&ctl).unwrap();
    let mbs = mb.to_string();
    let tree = Tree::spawn_with(
        prefix,
        &[PYTHON, "-c", STATE_PY, ctl.to_str().unwrap(), &mbs],
        dir,
        &[],
    );
    poll(
        "the state process to be ready",
        Duration::from_secs(60),
        || ctl.join("ready").exists().then_some(()),
    );
    (tree, Ctl { dir: ctl, n: 0 })
}

pub use nbagent_testkit::say_skip;
