//! Helpers for the end-to-end tests: locate and run the real `nbserver` and `nbagent`
//! binaries as child processes, kill them, and wait for conditions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod kernel;

pub use nbagent_testkit::say_skip;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary built next to the running executable: a test lives in
/// `target/<profile>/deps/` and a benchmark program in `target/<profile>/`; the binaries
/// are in `target/<profile>/<name>`. `scripts/test.sh` builds them first.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let here = exe.parent().expect("executable in a directory");
    let candidates = [Some(here), here.parent()];
    if let Some(p) = candidates
        .iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.exists())
    {
        return p;
    }
    panic!(
        "{name} not found next to {}: build the binaries first (cargo build --bins -p nbagent -p nbserver -p nbsupervisor, as scripts/test.sh does)",
        exe.display()
    );
}

/// A free loopback port (bound and released; good enough for tests on one machine).
pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Polls `cond` every few milliseconds until it is true or `timeout` passes.
/// Returns whether it became true.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Proc {
    /// The child.
    pub child: Child,
    /// For messages.
    pub name: String,
}

impl Proc {
    /// Spawns `cmd`; its stderr goes to `log` (appended).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        cmd.stdout(Stdio::from(f.try_clone().expect("dup")))
            .stderr(Stdio::from(f));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            name: name.to_owned(),
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().expect("wait")
    }

    /// Waits for exit up to `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `nbserver serve` on `addr` with `data_dir` and waits until it accepts.
pub fn start_server(data_dir: &Path, addr: SocketAddr, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("nbserver"));
    cmd.arg("--data-dir")
        .arg(data_dir)
        .arg("serve")
        .arg("--listen")
        .arg(addr.to_string())
        .args(extra);
    let log = data_dir.with_extension("log");
    let p = Proc::spawn("nbserver", cmd, &log);
    assert!(
        wait_until(Duration::from_secs(30), || TcpStream::connect(addr).is_ok()),
        "nbserver did not start listening on {addr}; see {}",
        log.display()
    );
    p
}

/// Runs `nbserver token create` and returns the token.
pub fn create_token(data_dir: &Path, agent: &str, ttl_secs: u64) -> String {
    let out = Command::new(bin("nbserver"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["token", "create", "--agent", agent, "--ttl-secs"])
        .arg(ttl_secs.to_string())
        .output()
        .expect("nbserver token create");
    assert!(
        out.status.success(),
        "token create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned()
}

/// The last `n` lines of a log file, for assertion messages.
pub fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
