//! Dump and restore times of a Python process with a 50 MB and a 500 MB heap,
//! against copying the same bytes in memory and to a file beside the images.
//!
//! ```text
//! cargo run --release -p nbagent-checkpoint --example bench [-- /path/to/criu [dir]]
//! ```
//!
//! Needs root and CRIU 4.2+. Each size runs three rounds; medians are printed.

use std::fs::{self, OpenOptions};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nbagent_checkpoint::{
    Criu, CriuConfig, DEFAULT_CRIU_BINARY, DumpOptions, RestoreOptions, kill_tree,
};

const PYTHON: &str = "/opt/nbagent/venv/bin/python";
const ROUNDS: usize = 3;

const HEAP_PY: &str = r#"
import os, socket, sys, time
heap = bytearray(os.urandom(1 << 20)) * int(sys.argv[2])
lsk = socket.socket(); lsk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsk.bind(("127.0.0.1", 0)); lsk.listen(1)
open(sys.argv[1] + ".tmp", "w").close(); os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(1)
"#;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let binary = args
        .next()
        .unwrap_or_else(|| DEFAULT_CRIU_BINARY.to_owned());
    let root = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "/tmp/nbagent-ckpt-bench".into()),
    );
    let criu = Criu::new(CriuConfig::with_binary(binary));
    let probe = criu.probe()?;
    println!(
        "criu {} (mem_dirty_track {}, lazy_pages {})",
        probe.version, probe.mem_dirty_track, probe.lazy_pages
    );
    println!(
        "{:>7} {:>10} {:>10} {:>11} {:>11} {:>10} {:>10}",
        "heap", "image", "dump", "restore", "mem copy", "file copy", "dump/file"
    );
    for mb in [50u32, 500] {
        let dir = root.join(format!("{mb}mb"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let (mut dumps, mut restores, mut copies, mut writes) = (vec![], vec![], vec![], vec![]);
        let mut image = 0;
        for round in 0..ROUNDS {
            let pid = spawn(&dir, mb)?;
            let images = dir.join(format!("ck{round}"));
            let d = criu.dump(pid, &images, &DumpOptions::default())?;
            image = d.image_bytes;
            dumps.push(d.duration);
            kill_tree(pid, Duration::from_secs(30))?;
            let r = criu.restore(&images, &RestoreOptions::default())?;
            restores.push(r.duration);
            kill_tree(r.pid, Duration::from_secs(30))?;
            let (c, w) = copy_times(&dir, image)?;
            copies.push(c);
            writes.push(w);
            fs::remove_dir_all(&images)?;
        }
        let (d, r, c, w) = (
            median(dumps),
            median(restores),
            median(copies),
            median(writes),
        );
        println!(
            "{:>5}MB {:>8}MB {:>9.3}s {:>10.3}s {:>10.3}s {:>9.3}s {:>9.1}x",
            mb,
            image >> 20,
            d.as_secs_f64(),
            r.as_secs_f64(),
            c.as_secs_f64(),
            w.as_secs_f64(),
            d.as_secs_f64() / w.as_secs_f64().max(1e-9)
        );
    }
    let _ = fs::remove_dir_all(&root);
    Ok(())
}

/// Starts the heap process in its own PID namespace and session; returns its init.
fn spawn(dir: &Path, mb: u32) -> anyhow::Result<i32> {
    let ready = dir.join("ready");
    let _ = fs::remove_file(&ready);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("out.log"))?;
    let child = Command::new("unshare")
        .args(["--pid", "--fork", "setsid", PYTHON, "-c", HEAP_PY])
        .arg(&ready)
        .arg(mb.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("unshare")?;
    let upid = child.id();
    // `unshare` reaps its child and exits when we kill the tree; reap it then.
    thread::spawn(move || {
        let mut child = child;
        child.wait()
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if ready.exists()
            && let Ok(text) = fs::read_to_string(format!("/proc/{upid}/task/{upid}/children"))
            && let Some(pid) = text.split_whitespace().next()
        {
            return Ok(pid.parse()?);
        }
        if Instant::now() > deadline {
            bail!(
                "heap process did not start; see {}",
                dir.join("out.log").display()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Copying `len` bytes in memory, and writing them to a file in `dir` (fsync-free,
/// like CRIU's image writes).
fn copy_times(dir: &Path, len: u64) -> anyhow::Result<(Duration, Duration)> {
    let src: Vec<u8> = (0..len)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let start = Instant::now();
    let dst = black_box(src.clone());
    let mem = start.elapsed();
    let path = dir.join("copy.bin");
    let start = Instant::now();
    fs::write(&path, &dst)?;
    let file = start.elapsed();
    fs::remove_file(&path)?;
    Ok((mem, file))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}
