//! Kernel benchmark: from `nbsupervisor` start to a ready kernel (agent start, kernel
//! process start, kernel_info), the round trip of a `pass` cell through the whole agent
//! path (server submit -> CellFinished stored) against a bare Python `jupyter_client`
//! talking to the same ipykernel, and the resident memory of each process.
//!
//! `cargo build --release --bins -p nbagent -p nbsupervisor &&
//!  cargo run --release -p nbagent-tests --bin bench-kernel [-- --cells 200]`
//!
//! Needs what the kernel tests need: root, the `nbuser` account, /opt/nbagent/venv.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nbagent_protocol::{CellStatus, Message};
use nbagent_tests::kernel::{self, Notebook, Setup, children, rss_kib};
use serde_json::Value;

const WARMUP: usize = 10;
/// Cells timed with a checkpoint after each (each costs a CRIU dump).
const CHECKPOINTED_CELLS: usize = 20;

const BARE: &str = r#"
import json, sys, time
from jupyter_client.manager import start_new_kernel
n, warm = int(sys.argv[1]), int(sys.argv[2])
t = time.perf_counter()
km, kc = start_new_kernel(kernel_name='python3', startup_timeout=60)
start_ms = (time.perf_counter() - t) * 1000
quiet = lambda msg: None
try:
    for _ in range(warm):
        kc.execute_interactive('pass', timeout=30, output_hook=quiet)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = kc.execute_interactive('pass', timeout=30, output_hook=quiet)
        out.append((time.perf_counter() - t) * 1000)
        assert r['content']['status'] == 'ok', r
    print(json.dumps({'start_ms': start_ms, 'rtt_ms': out}))
finally:
    kc.stop_channels()
    km.shutdown_kernel(now=True)
"#;

fn parse_args() -> anyhow::Result<usize> {
    let mut cells = 200;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--cells" => cells = it.next().context("--cells needs a value")?.parse()?,
            other => bail!("unknown flag {other}; flags: --cells N"),
        }
    }
    Ok(cells)
}

/// Median and p99 of milliseconds.
fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.5), at(0.99))
}

/// One JSON log line of the agent.
struct Event {
    unix_ms: i64,
    fields: Value,
}

/// The first event whose message is `message` in the stack log.
fn event(log: &Path, message: &str) -> anyhow::Result<Event> {
    let text = std::fs::read_to_string(log)?;
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["fields"]["message"] != message {
            continue;
        }
        let ts = v["timestamp"].as_str().context("timestamp")?;
        let t = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)?;
        return Ok(Event {
            unix_ms: (t.unix_timestamp_nanos() / 1_000_000) as i64,
            fields: v["fields"].clone(),
        });
    }
    bail!("no {message:?} event in {}", log.display())
}

fn field_ms(e: &Event, name: &str) -> anyhow::Result<f64> {
    e.fields[name]
        .as_u64()
        .map(|v| v as f64)
        .with_context(|| format!("no {name} in {}", e.fields))
}

fn mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "?".into())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cells = parse_args()?;
    if let Some(why) = kernel::missing_prerequisite() {
        bail!("cannot run the kernel benchmark: {why}");
    }
    let agent_bin = nbagent_tests::bin("nbagent");
    let profile = agent_bin
        .parent()
        .and_then(Path::file_name)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();

    // --- start-up --------------------------------------------------------------
    // The cell path itself: no checkpoint after each cell (measured separately below).
    let nb = Notebook::start(Setup {
        agent_args: vec!["--no-checkpoints".into()],
        ..Setup::default()
    })
    .await;
    let caps = nb
        .wait_for("capabilities", Duration::from_secs(60), |m| {
            m.first().cloned()
        })
        .await;
    nb.wait_kernel_ready(Duration::from_secs(60)).await;
    let ready_seen = nb.started.elapsed();
    let session = event(&nb.log, "session established")?;
    let launched = event(&nb.log, "kernel launched")?;
    let connected = event(&nb.log, "kernel client connected")?;
    let ready = event(&nb.log, "kernel ready")?;
    let t0 = nb.started_unix_ms;
    let agent_connected = (session.unix_ms - t0) as f64;
    let caps_stored = (caps.row.received_at - t0) as f64;
    let spawn_ms = field_ms(&ready, "spawn_ms")?;
    let kernel_info_ms = field_ms(&connected, "elapsed_ms")?;
    let ready_ms = field_ms(&ready, "ready_ms")?;
    let ready_at = (ready.unix_ms - t0) as f64;
    let launched_at = (launched.unix_ms - t0) as f64;

    // --- round trips through the agent ----------------------------------------
    for _ in 0..WARMUP {
        let r = nb.run("pass").await;
        anyhow::ensure!(r.status == CellStatus::Ok, "warm-up cell failed: {r:?}");
    }
    let mut agent_rtt = Vec::with_capacity(cells);
    for _ in 0..cells {
        let t = Instant::now();
        let req = nb.submit("pass").await;
        let r = nb.wait(&req, Duration::from_secs(30)).await;
        agent_rtt.push(t.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(r.status == CellStatus::Ok, "cell failed: {r:?}");
    }

    // --- memory ---------------------------------------------------------------
    let rec = nb.record().context("no kernel record")?;
    let agent_pid = nb.agent_pid().context("no agent process")?;
    let kernel_pid = children(rec.pid).first().copied();
    let rss = [
        ("nbsupervisor", rss_kib(nb.supervisor_pid())),
        ("nbagent", rss_kib(agent_pid)),
        ("kernel init (nbagent __kernel-init)", rss_kib(rec.pid)),
        ("ipykernel", kernel_pid.and_then(rss_kib)),
    ];
    let mut nb = nb;
    nb.command(&Message::Shutdown {
        reason: "benchmark done".into(),
        deadline_ms: 10_000,
    })
    .await;
    let exit = nb.wait_exit(Duration::from_secs(30)).await;

    // --- the same cell with reactive mode on (a CRIU dump after every cell) -------
    let mut ckpt_rtt = Vec::new();
    if kernel::missing_checkpoint_prerequisite().is_none() {
        let mut nb = Notebook::start(Setup::default()).await;
        nb.wait_kernel_ready(Duration::from_secs(60)).await;
        for _ in 0..WARMUP {
            let _ = nb.run("pass").await;
        }
        for _ in 0..CHECKPOINTED_CELLS {
            let t = Instant::now();
            let req = nb.submit("pass").await;
            let _ = nb.wait(&req, Duration::from_secs(60)).await;
            // The next cell waits for the checkpoint; so does this measure.
            let r2 = nb.submit("pass").await;
            let _ = nb.wait(&r2, Duration::from_secs(60)).await;
            ckpt_rtt.push(t.elapsed().as_secs_f64() * 1000.0 / 2.0);
        }
        nb.command(&Message::Shutdown {
            reason: "benchmark done".into(),
            deadline_ms: 10_000,
        })
        .await;
        let _ = nb.wait_exit(Duration::from_secs(30)).await;
    }

    // --- bare jupyter_client --------------------------------------------------
    let out = tokio::process::Command::new(kernel::KERNEL_PYTHON)
        .arg("-c")
        .arg(BARE)
        .arg(cells.to_string())
        .arg(WARMUP.to_string())
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "bare jupyter_client run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bare: Value = serde_json::from_slice(&out.stdout)?;
    let bare_start = bare["start_ms"].as_f64().context("start_ms")?;
    let bare_rtt: Vec<f64> = bare["rtt_ms"]
        .as_array()
        .context("rtt_ms")?
        .iter()
        .filter_map(Value::as_f64)
        .collect();

    let ckpt = (!ckpt_rtt.is_empty()).then(|| stats(ckpt_rtt));
    let (a50, a99) = stats(agent_rtt);
    let (b50, b99) = stats(bare_rtt);
    println!("kernel benchmark ({profile} binaries, python3 ipykernel, {cells} cells of `pass`)");
    println!();
    println!("start-up, from nbsupervisor spawn                      ms");
    println!("  agent connected to the server (session established) {agent_connected:>7.0}");
    println!("  capability report stored by the server               {caps_stored:>7.0}");
    println!("  kernel launched (init reported the kernel's pid)     {launched_at:>7.0}");
    println!("  kernel ready (kernel_info answered)                  {ready_at:>7.0}");
    println!(
        "  ready seen by the test (status stored)               {:>7.0}",
        ready_seen.as_secs_f64() * 1000.0
    );
    println!("split of the kernel start (agent's own timings)");
    println!("  process start: spec, user, files, clone + init       {spawn_ms:>7.0}");
    println!("  kernel_info: connect until the kernel answers        {kernel_info_ms:>7.0}");
    println!("  total kernel start (ready_ms)                        {ready_ms:>7.0}");
    println!("  bare jupyter_client start_new_kernel (as root)       {bare_start:>7.0}");
    println!();
    println!("(the agent path runs with --no-checkpoints; the last row adds reactive mode's dump)");
    println!("round trip of `pass`                  median ms   p99 ms");
    println!("  full agent path (submit -> stored)  {a50:>9.2} {a99:>8.2}");
    println!("  bare jupyter_client                 {b50:>9.2} {b99:>8.2}");
    println!(
        "  ratio agent / bare                  {:>9.2} {:>8.2}",
        a50 / b50,
        a99 / b99
    );
    if let Some((c50, c99)) = ckpt {
        println!("  agent path + checkpoint per cell    {c50:>9.2} {c99:>8.2}");
    }
    println!();
    println!("resident memory (VmRSS, after {} cells)", cells + WARMUP);
    for (what, kib) in rss {
        println!("  {what:<38} {:>10}", mib(kib));
    }
    println!();
    println!(
        "nbsupervisor after the shutdown: {}",
        exit.map(|s| s.to_string())
            .unwrap_or_else(|| "still running".into())
    );
    Ok(())
}
