//! Kernel benchmark: from `nbsupervisor` start to a ready kernel (agent start, kernel
//! process start, kernel_info), the agent's own overhead per trivial cell against a bare
//! Python `jupyter_client` talking to the SAME ipykernel, and the resident memory of
//! each process, each figure with its target.
//!
//! The overhead is isolated from the server and its database: the agent logs, for every
//! cell, the time from the runtime taking the cell to `cell_finished` queued in the
//! outbox (`agent_us`: cell_started, record updates, execute_request -> reply and idle,
//! outputs, cell_finished) and its execute_request -> idle round trip (`kernel_us`), in
//! a `cell timing` event (target `nbagent::timing`, debug). The bare client is
//! `jupyter_client.BlockingKernelClient` (the kernel venv's python, as root) loaded
//! with the agent kernel's connection file, run while the agent is idle.
//!
//! `cargo build --release --bins &&
//!  cargo run --release -p nbagent-tests --bin bench-kernel [-- --cells 200]`
//!
//! Needs what the kernel tests need: root, the `nbuser` account, /opt/nbagent/venv.
//!
//! Last run (release, 2 cores shared with other builds):
//!
//! ```text
//! kernel benchmark (release binaries, python3 ipykernel, 200 cells of `pass`)
//!
//! start-up, from nbsupervisor spawn                      ms
//!   nbsupervisor started the agent                            20
//!   agent up (outbox opened)                                  31
//!   agent connected to the server (session established)      42
//!   kernel process started (init reported its pid)            72
//!   kernel ready (kernel_info answered)                      441
//!   ready seen by the test (status stored)                   442
//! split of the kernel start (agent's own timings)
//!   process start: spec, user, files, clone + init            12
//!   kernel_info: connect until the kernel answers            368
//!   total kernel start (ready_ms)                            381
//!
//! per cell of `pass`, the same kernel                       median ms   p99 ms
//!   bare jupyter_client (execute -> reply + idle)              3.254    8.245
//!   agent: execute_request -> reply + idle                     2.797    6.728
//!   agent: cell taken -> cell_finished queued                  3.593    8.497
//!   agent: its own work in that (the above minus the kernel)   0.613    4.294
//!   full path incl. server + database (submit -> stored)       6.924   18.908
//!   full path + checkpoint per cell (reactive mode)          139.135  180.376
//! overhead over the bare client (median cell taken -> finished minus bare): 0.339 ms; target <= 1 ms: met
//!
//! resident memory (VmRSS, after 211 cells)
//!   nbagent                                  11.5 MiB  target <= 30 MiB: met
//!   nbsupervisor                              3.0 MiB  target <= 3 MiB: met
//!   kernel init (nbagent __kernel-init)       5.2 MiB
//!   ipykernel                                49.5 MiB
//!   (PSS, libc's pages shared out: nbagent 8.0 MiB, nbsupervisor 1.5 MiB)
//!
//! nbsupervisor after the shutdown: exit status: 0
//! ```

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
from jupyter_client import BlockingKernelClient
cf, n, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kc = BlockingKernelClient()
kc.load_connection_file(cf)
kc.start_channels()
try:
    kc.wait_for_ready(timeout=30)
    quiet = lambda msg: None
    run = lambda: kc.execute_interactive('pass', timeout=30, output_hook=quiet, allow_stdin=False)
    for _ in range(warm):
        run()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = run()
        out.append((time.perf_counter() - t) * 1000)
        assert r['content']['status'] == 'ok', r
    print(json.dumps({'rtt_ms': out}))
finally:
    kc.stop_channels()
"#;

/// Targets.
const OVERHEAD_TARGET_MS: f64 = 1.0;
const AGENT_RSS_TARGET_MIB: f64 = 30.0;
const SUPERVISOR_RSS_TARGET_MIB: f64 = 3.0;

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

/// Every event whose message is `message` in the stack log, in order.
fn events(log: &Path, message: &str) -> anyhow::Result<Vec<Event>> {
    let text = std::fs::read_to_string(log)?;
    let mut found = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["fields"]["message"] != message {
            continue;
        }
        let ts = v["timestamp"].as_str().context("timestamp")?;
        let t = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)?;
        found.push(Event {
            unix_ms: (t.unix_timestamp_nanos() / 1_000_000) as i64,
            fields: v["fields"].clone(),
        });
    }
    Ok(found)
}

/// The first event whose message is `message` in the stack log.
fn event(log: &Path, message: &str) -> anyhow::Result<Event> {
    events(log, message)?
        .into_iter()
        .next()
        .with_context(|| format!("no {message:?} event in {}", log.display()))
}

/// Proportional set size (shared pages such as libc's divided among their users), KiB.
fn pss_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
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
        rust_log: "info,nbagent::timing=debug".into(),
        env: vec![("NBSUPERVISOR_LOG_FORMAT".into(), "json".into())],
        ..Setup::default()
    })
    .await;
    nb.wait_kernel_ready(Duration::from_secs(60)).await;
    let ready_seen = nb.started.elapsed();
    let t0 = nb.started_unix_ms;
    let at = |e: &Event| (e.unix_ms - t0) as f64;
    let agent_spawned = at(&event(&nb.log, "agent started")?);
    let agent_up = at(&event(&nb.log, "outbox opened")?);
    let session = at(&event(&nb.log, "session established")?);
    let launched = event(&nb.log, "kernel launched")?;
    let connected = event(&nb.log, "kernel client connected")?;
    let ready = event(&nb.log, "kernel ready")?;
    let spawn_ms = field_ms(&ready, "spawn_ms")?;
    let kernel_info_ms = field_ms(&connected, "elapsed_ms")?;
    let ready_ms = field_ms(&ready, "ready_ms")?;
    let ready_at = at(&ready);
    let launched_at = at(&launched);

    // --- cells through the agent ------------------------------------------------
    let mut full_rtt = Vec::with_capacity(cells);
    for i in 0..WARMUP + cells {
        let t = Instant::now();
        let req = nb.submit("pass").await;
        let r = nb.wait(&req, Duration::from_secs(30)).await;
        anyhow::ensure!(r.status == CellStatus::Ok, "cell failed: {r:?}");
        if i >= WARMUP {
            full_rtt.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let timings = events(&nb.log, "cell timing")?;
    anyhow::ensure!(
        timings.len() >= WARMUP + cells,
        "{} cell timing events for {} cells (is nbagent::timing=debug on?)",
        timings.len(),
        WARMUP + cells
    );
    let us = |e: &Event, f: &str| e.fields[f].as_u64().map(|v| v as f64 / 1000.0);
    let timed = &timings[timings.len() - cells..];
    let agent_ms: Vec<f64> = timed.iter().filter_map(|e| us(e, "agent_us")).collect();
    let kernel_ms: Vec<f64> = timed.iter().filter_map(|e| us(e, "kernel_us")).collect();
    let own_ms: Vec<f64> = agent_ms
        .iter()
        .zip(&kernel_ms)
        .map(|(a, k)| a - k)
        .collect();

    // --- the bare client against the same kernel, the agent idle ----------------
    let rec = nb.record().context("no kernel record")?;
    let conn_file = rec
        .log
        .parent()
        .context("kernel directory")?
        .join("connection.json");
    let out = tokio::process::Command::new(kernel::KERNEL_PYTHON)
        .arg("-c")
        .arg(BARE)
        .arg(&conn_file)
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
    let bare_rtt: Vec<f64> = bare["rtt_ms"]
        .as_array()
        .context("rtt_ms")?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    // The agent still works after the bare client used its kernel.
    let r = nb.run("pass").await;
    anyhow::ensure!(
        r.status == CellStatus::Ok,
        "cell after the bare client: {r:?}"
    );

    // --- memory ---------------------------------------------------------------
    let agent_pid = nb.agent_pid().context("no agent process")?;
    let kernel_pid = children(rec.pid).first().copied();
    let sup_rss = rss_kib(nb.supervisor_pid());
    let agent_rss = rss_kib(agent_pid);
    let sup_pss = pss_kib(nb.supervisor_pid());
    let agent_pss = pss_kib(agent_pid);
    let rss = [
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

    let ckpt = (!ckpt_rtt.is_empty()).then(|| stats(ckpt_rtt));
    let (a50, a99) = stats(agent_ms);
    let (k50, k99) = stats(kernel_ms);
    let (o50, o99) = stats(own_ms);
    let (b50, b99) = stats(bare_rtt);
    let (f50, f99) = stats(full_rtt);
    let overhead = a50 - b50;
    let mib_of = |k: Option<u64>| k.map(|k| k as f64 / 1024.0);
    println!("kernel benchmark ({profile} binaries, python3 ipykernel, {cells} cells of `pass`)");
    println!();
    println!("start-up, from nbsupervisor spawn                      ms");
    println!("  nbsupervisor started the agent                       {agent_spawned:>7.0}");
    println!("  agent up (outbox opened)                             {agent_up:>7.0}");
    println!("  agent connected to the server (session established) {session:>7.0}");
    println!("  kernel process started (init reported its pid)       {launched_at:>7.0}");
    println!("  kernel ready (kernel_info answered)                  {ready_at:>7.0}");
    println!(
        "  ready seen by the test (status stored)               {:>7.0}",
        ready_seen.as_secs_f64() * 1000.0
    );
    println!("split of the kernel start (agent's own timings)");
    println!("  process start: spec, user, files, clone + init       {spawn_ms:>7.0}");
    println!("  kernel_info: connect until the kernel answers        {kernel_info_ms:>7.0}");
    println!("  total kernel start (ready_ms)                        {ready_ms:>7.0}");
    println!();
    println!("per cell of `pass`, the same kernel                       median ms   p99 ms");
    println!("  bare jupyter_client (execute -> reply + idle)          {b50:>9.3} {b99:>8.3}");
    println!("  agent: execute_request -> reply + idle                 {k50:>9.3} {k99:>8.3}");
    println!("  agent: cell taken -> cell_finished queued              {a50:>9.3} {a99:>8.3}");
    println!("  agent: its own work in that (the above minus the kernel) {o50:>7.3} {o99:>8.3}");
    println!("  full path incl. server + database (submit -> stored)   {f50:>9.3} {f99:>8.3}");
    if let Some((c50, c99)) = ckpt {
        println!("  full path + checkpoint per cell (reactive mode)        {c50:>9.3} {c99:>8.3}");
    }
    println!(
        "overhead over the bare client (median cell taken -> finished minus bare): {overhead:.3} ms; \
         target <= {OVERHEAD_TARGET_MS} ms: {}",
        verdict(overhead <= OVERHEAD_TARGET_MS)
    );
    println!();
    println!(
        "resident memory (VmRSS, after {} cells)",
        cells + WARMUP + 1
    );
    let target = |what: &str, kib: Option<u64>, limit: f64| {
        println!(
            "  {what:<38} {:>10}  target <= {limit} MiB: {}",
            mib(kib),
            verdict(mib_of(kib).is_some_and(|m| m <= limit))
        );
    };
    target("nbagent", agent_rss, AGENT_RSS_TARGET_MIB);
    target("nbsupervisor", sup_rss, SUPERVISOR_RSS_TARGET_MIB);
    for (what, kib) in rss {
        println!("  {what:<38} {:>10}", mib(kib));
    }
    println!(
        "  (PSS, libc's pages shared out: nbagent {}, nbsupervisor {})",
        mib(agent_pss),
        mib(sup_pss)
    );
    println!();
    println!(
        "nbsupervisor after the shutdown: {}",
        exit.map(|s| s.to_string())
            .unwrap_or_else(|| "still running".into())
    );
    Ok(())
}
