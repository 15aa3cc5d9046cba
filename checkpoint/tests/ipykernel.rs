//! A real ipykernel survives dump, kill and restore, and answers a fresh client.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use nbagent_checkpoint::{DumpOptions, RestoreOptions, kill_tree};

/// Runs `code` on the kernel through a fresh jupyter_client connection and returns
/// its stdout.
const CLIENT_PY: &str = r#"
import sys
from jupyter_client import BlockingKernelClient
c = BlockingKernelClient()
c.load_connection_file(sys.argv[1])
c.start_channels()
c.wait_for_ready(timeout=30)
out = []
def hook(m):
    if m["msg_type"] == "stream":
        out.append(m["content"]["text"])
r = c.execute_interactive(sys.argv[2], timeout=30, output_hook=hook)
c.stop_channels()
if r["content"]["status"] != "ok":
    sys.exit("cell failed: %r" % (r["content"],))
sys.stdout.write("".join(out))
"#;

fn run_cell(conn: &Path, code: &str) -> String {
    let out = Command::new(PYTHON)
        .args(["-c", CLIENT_PY, conn.to_str().expect("utf-8 path"), code])
        .output()
        .expect("the jupyter_client script runs");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn ipykernel_restores_and_answers_a_fresh_client() {
    let _g = serial();
    let Some(criu) = criu_or_skip("ipykernel_restores_and_answers_a_fresh_client") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let conn = dir.path().join("conn.json");
    let mut tree = Tree::spawn(
        &[
            PYTHON,
            "-m",
            "ipykernel_launcher",
            "-f",
            conn.to_str().unwrap(),
            "--HistoryManager.enabled=False",
        ],
        dir.path(),
        &[],
    );
    // ipykernel writes the connection file (random ports on 127.0.0.1) when it is
    // missing.
    poll("the connection file", Duration::from_secs(60), || {
        let text = fs::read_to_string(&conn).ok()?;
        text.contains("shell_port").then_some(())
    });
    assert_eq!(run_cell(&conn, "x = 41\nprint(x)"), "41\n");

    let images = dir.path().join("ck");
    let stats = criu
        .dump(tree.root, &images, &DumpOptions::default())
        .unwrap();
    eprintln!("ipykernel dump: {stats:?}");
    // Left running: state moves on.
    assert_eq!(run_cell(&conn, "x = 99\nprint(x)"), "99\n");
    tree.kill();

    for round in 0..2 {
        let r = criu.restore(&images, &RestoreOptions::default()).unwrap();
        let guard = Restored(r.pid);
        eprintln!(
            "ipykernel restore {round}: pid {} in {:?}",
            r.pid, r.duration
        );
        assert_eq!(run_cell(&conn, "print(x)"), "41\n");
        assert_eq!(run_cell(&conn, "x += 1\nprint(x)"), "42\n");
        kill_tree(r.pid, Duration::from_secs(10)).unwrap();
        std::mem::forget(guard);
    }
    let log = tree.log_text();
    assert!(!log.contains("Traceback"), "{log}");
}
