//! Reactive-mode costs with a real ipykernel, for kernels of about 50 MB, 500 MB and
//! 2 GB: checkpoint pause, restore-to-ready (eager and lazy), re-execution, the
//! memory-copy floor, and the bytes the deduplicated store keeps for 1 and for 10
//! checkpoints.
//!
//! ```text
//! cargo run --release -p nbagent-tests --bin bench-reactive [-- SIZES_MB [dir]]
//! ```
//!
//! `SIZES_MB` is a comma-separated list (default `50,500,2048`); `dir` (default
//! `/tmp/nbagent-reactive-bench`) is removed and recreated for every size. Needs what
//! the checkpoint tests need: root, the `nbuser` account, /opt/nbagent/venv (ipykernel,
//! numpy) and CRIU 4.2+.
//!
//! The kernel runs the way the agent runs it: `python -m ipykernel_launcher -f
//! conn.json --HistoryManager.enabled=False` as `nbuser` (`setpriv`), in its own PID
//! namespace and session (`unshare --pid --fork setsid`), stdin `/dev/null`, stdout
//! and stderr a log opened `O_APPEND`, no `JPY_PARENT_PID`, TCP on 127.0.0.1. Cells go
//! through the agent's own client ([`KernelClient`]), which stays connected during
//! dumps (they close its TCP connections in the images, `tcp_close`); every restore
//! gets a fresh client. Dumps run as `nbuser` (`CriuConfig::run_as`, unprivileged
//! CRIU) into a directory handed to that user for the dump, restores as root, and
//! every dump is recorded into a deduplicated [`Store`], as
//! `agent/src/runtime/reactive.rs` does.
//!
//! Per size: a fresh kernel runs cell 0 (`import numpy as np`, a random `uint8` heap
//! of N bytes) and cells 1..9 (each rewrites a different 1% slice of the heap); a dump
//! follows every cell. Then the latest checkpoint is restored from its hot copy,
//! eagerly and lazily, and the first one rebuilt from chunks, each until a fresh
//! client has had `kernel_info` and a trivial cell (`assert v == K`, which also checks
//! the state) has run.
//!
//! Measured here (2 shared cores, load ~4 from other builds, ext4 on a virtual disk):
//!
//! ```text
//!  heap |   rss | floor |           pause | ingest |          restore eager |         restore lazy | lazy done |         cold |       re-exec | image | 1 ckpt |            10 ckpts
//!    MB |   MiB |    ms |     ms (target) |     ms |     ms [criu] (target) |      ms [criu] (200) |        ms | ms mat+ready | ms start+cell |   MiB |    MiB |      MiB (x 1 ckpt)
//!    50 |   114 |     6 |      58 (59) ok |     82 |      88 [76] (59) MISS |    131 [67] (200) ok |       131 |        38+92 |       216+187 |    91 |     92 |    306 (3.33x) MISS
//!   500 |   568 |    50 |  227 (125) MISS |    431 |   267 [257] (125) MISS |    171 [86] (200) ok |       346 |      217+322 |      209+1512 |   541 |    542 |      848 (1.56x) ok
//!  2048 |  2132 |   190 | 1034 (335) MISS |   1713 |   911 [903] (335) MISS |    191 [70] (200) ok |       965 |    1770+2173 |      209+5961 |  2089 |   2093 |     2670 (1.28x) ok
//! ```

use std::fs::{self, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nbagent::kernel::client::{
    ConnectionInfo, KernelClient, connection_file_json, new_connection_info,
};
use nbagent_checkpoint::store::{CheckpointId, CheckpointKey, Outcome, Store, StoreConfig};
use nbagent_checkpoint::{
    Criu, CriuConfig, DumpOptions, RestoreOptions, RunAs, descendants, kill_tree,
};
use nbagent_protocol::CellStatus;
use nbagent_tests::kernel::{
    CRIU, KERNEL_PYTHON, KERNEL_USER, missing_checkpoint_prerequisite, proc_status,
};
use tokio::runtime::Runtime;

/// Cells per size: one that builds the heap, then nine that change 1% of it.
const CELLS: usize = 10;
/// How long a kernel may take to answer a fresh client.
const CONNECT: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
struct Row {
    mb: u64,
    /// Kernel resident set after the last cell.
    rss_kib: u64,
    floor: Duration,
    /// Fresh kernel until `kernel_info` answers.
    start: Duration,
    /// `start` plus cell 0.
    reexec: Duration,
    /// CRIU dump, median over the cells.
    pause: Duration,
    pause_max: Duration,
    ingest: Duration,
    /// Restore-to-ready of the latest checkpoint (hot copy), and the CRIU part.
    eager: Duration,
    eager_criu: Duration,
    lazy: Option<Duration>,
    lazy_criu: Option<Duration>,
    /// Lazy restore until the lazy-pages daemon has served every page and exited.
    lazy_done: Option<Duration>,
    /// The first checkpoint: rebuilding its images from chunks, then restore-to-ready.
    materialise: Duration,
    cold: Duration,
    image_bytes: u64,
    one_stored: u64,
    ten_stored: u64,
}

/// The notebook user and the directories of one size's run.
struct Env {
    user: RunAs,
    root: PathBuf,
    kernel_dir: PathBuf,
    info: ConnectionInfo,
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let sizes: Vec<u64> = args
        .next()
        .unwrap_or_else(|| "50,500,2048".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .context("sizes are MB numbers separated by commas")?;
    let root = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "/tmp/nbagent-reactive-bench".into()),
    );
    if let Some(why) = missing_checkpoint_prerequisite() {
        bail!("cannot run the reactive benchmark: {why}");
    }
    let user = nix::unistd::User::from_name(KERNEL_USER)?.context("no notebook user")?;
    let user = RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    };
    let mut config = CriuConfig::with_binary(CRIU);
    config.run_as = Some(user);
    let criu = Criu::new(config);
    let probe = criu.probe()?;
    println!(
        "criu {} (mem_dirty_track {}, lazy_pages {}); ipykernel as {KERNEL_USER}, dumps as {KERNEL_USER}, \
         restores as root; {CELLS} cells per size, 9 of them changing 1% of the heap",
        probe.version, probe.mem_dirty_track, probe.lazy_pages
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for mb in sizes {
        let _ = fs::remove_dir_all(&root);
        let result = run(&rt, &criu, &root, user, mb, probe.lazy_pages);
        let _ = fs::remove_dir_all(&root);
        let row = result.with_context(|| format!("the {mb} MB run"))?;
        eprintln!("{row:?}");
        rows.push(row);
    }
    print_table(&rows);
    Ok(())
}

fn run(
    rt: &Runtime,
    criu: &Criu,
    root: &Path,
    user: RunAs,
    mb: u64,
    lazy: bool,
) -> anyhow::Result<Row> {
    let n = mb << 20;
    let mut row = Row {
        mb,
        floor: copy_floor(n),
        ..Row::default()
    };
    let env = prepare(root, user)?;
    let store_root = root.join("store");
    let mut store = Store::open(StoreConfig::new(&store_root, u64::MAX))?;
    // Traversable by the notebook user (CRIU dumps as that user), not listable.
    fs::set_permissions(&store_root, fs::Permissions::from_mode(0o711))?;

    // Re-execution: a fresh kernel and the cell that builds the heap.
    let begun = Instant::now();
    let mut kernel = Kernel::spawn(&env)?;
    let mut client = rt.block_on(KernelClient::connect(&env.info, CONNECT))?;
    row.start = begun.elapsed();
    cell(
        rt,
        &mut client,
        &format!(
            "import numpy as np\na = np.random.default_rng(0).integers(0, 256, {n}, dtype=np.uint8)\nv = 0"
        ),
    )?;
    row.reexec = begun.elapsed();

    // Ten cells, a checkpoint after each, the client connected as the agent's is.
    let (slice, step) = (n / 100, n / 10);
    let (mut ids, mut pauses, mut ingests) = (Vec::<CheckpointId>::new(), vec![], vec![]);
    for i in 0..CELLS {
        if i > 0 {
            let off = i as u64 * step;
            cell(
                rt,
                &mut client,
                &format!(
                    "a[{off}:{off} + {slice}] = np.random.default_rng({i}).integers(0, 256, {slice}, dtype=np.uint8)\nv = {i}"
                ),
            )?;
        }
        let (id, dir) = store.allocate()?;
        own_tree(&dir, user.uid, user.gid, 0o700, 0o600)?;
        let dumped = criu.dump(kernel.root, &dir, &DumpOptions::default());
        own_tree(&dir, 0, user.gid, 0o750, 0o640)?;
        let d = dumped.with_context(|| format!("dump after cell {i}"))?;
        pauses.push(d.duration);
        let key = CheckpointKey {
            notebook: "bench".into(),
            cell: format!("cell{i}"),
            code_hash: format!("h{i}"),
            predecessor: ids.last().cloned(),
        };
        let st = store
            .record(id.clone(), key, Outcome::ok(d.image_bytes, d.duration))?
            .context("the dump was not deduplicated")?;
        ingests.push(st.duration);
        if i == 0 {
            row.image_bytes = d.image_bytes;
            row.one_stored = store.stored_bytes();
        }
        ids.push(id);
    }
    row.ten_stored = store.stored_bytes();
    row.pause_max = pauses.iter().copied().max().unwrap_or_default();
    row.pause = median(pauses);
    row.ingest = median(ingests);
    row.rss_kib = descendants(kernel.root)
        .into_iter()
        .filter_map(|p| {
            proc_status(p)
                .get("VmRSS")
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum();
    drop(client);
    kernel.kill()?;

    // The latest checkpoint from its hot copy, eagerly then lazily.
    let last = ids.last().context("no checkpoint")?.clone();
    let modes: &[bool] = if lazy { &[false, true] } else { &[false] };
    for &lazy in modes {
        let begun = Instant::now();
        let img = store.images(&last)?;
        anyhow::ensure!(img.materialised.is_none(), "the latest should be hot");
        let (criu_t, mut daemon, pid) =
            restore_until_ready(rt, criu, &img.dir, lazy, &env.info, CELLS - 1)?;
        let t = begun.elapsed();
        if lazy {
            (row.lazy, row.lazy_criu) = (Some(t), Some(criu_t));
        } else {
            (row.eager, row.eager_criu) = (t, criu_t);
        }
        if let Some(d) = daemon.as_mut() {
            if d.wait(Duration::from_secs(300)) {
                row.lazy_done = Some(begun.elapsed());
            } else {
                eprintln!("the lazy-pages daemon did not finish within 300 s");
            }
        }
        kill_tree(pid, Duration::from_secs(60))?;
    }

    // The first checkpoint, rebuilt from the chunk store.
    let begun = Instant::now();
    let img = store.images(&ids[0])?;
    row.materialise = img
        .materialised
        .as_ref()
        .map(|m| m.duration)
        .context("the first checkpoint should be cold")?;
    let (_, _, pid) = restore_until_ready(rt, criu, &img.dir, false, &env.info, 0)?;
    row.cold = begun.elapsed();
    kill_tree(pid, Duration::from_secs(60))?;
    Ok(row)
}

/// Restores `dir`, connects a fresh client and runs a trivial cell that checks that
/// `v` is `value`. Returns the CRIU part, the lazy-pages daemon and the restored pid.
fn restore_until_ready(
    rt: &Runtime,
    criu: &Criu,
    dir: &Path,
    lazy: bool,
    info: &ConnectionInfo,
    value: usize,
) -> anyhow::Result<(Duration, Option<nbagent_checkpoint::LazyPages>, i32)> {
    let mut opts = RestoreOptions::default();
    opts.lazy_pages = lazy;
    let mut r = criu.restore(dir, &opts)?;
    let ready = (|| {
        let mut client = rt.block_on(KernelClient::connect(info, CONNECT))?;
        cell(rt, &mut client, &format!("assert v == {value}"))
    })();
    if let Err(e) = ready {
        let _ = kill_tree(r.pid, Duration::from_secs(60));
        return Err(e.context(format!("restored kernel {} not ready", dir.display())));
    }
    Ok((r.duration, r.lazy_pages.take(), r.pid))
}

/// Runs `code`; fails unless it ends `ok`.
fn cell(rt: &Runtime, client: &mut KernelClient, code: &str) -> anyhow::Result<()> {
    let out = rt.block_on(client.execute(code, &mut |_| {}))?;
    anyhow::ensure!(
        out.status == CellStatus::Ok,
        "cell {code:?} ended {:?}: {} {}",
        out.status,
        out.ename.unwrap_or_default(),
        out.evalue.unwrap_or_default()
    );
    Ok(())
}

/// Creates `root` (mode 0711) and the kernel's directory in it (the notebook user's,
/// its `HOME` and working directory), with the connection file.
fn prepare(root: &Path, user: RunAs) -> anyhow::Result<Env> {
    fs::create_dir_all(root)?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o711))?;
    let kernel_dir = root.join("kernel");
    fs::create_dir(&kernel_dir)?;
    fs::set_permissions(&kernel_dir, fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::chown(&kernel_dir, Some(user.uid), Some(user.gid))?;
    let info = new_connection_info("127.0.0.1", "python3")?;
    let conn = kernel_dir.join("conn.json");
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&conn)?;
    std::io::Write::write_all(&mut f, &connection_file_json(&info)?)?;
    std::os::unix::fs::fchown(&f, Some(user.uid), Some(user.gid))?;
    Ok(Env {
        user,
        root: root.to_owned(),
        kernel_dir,
        info,
    })
}

/// A kernel started as `unshare --pid --fork setsid setpriv ... sh -c 'setpriv ...
/// python -m ipykernel_launcher ... & wait'`: `root` is its PID namespace's init (the
/// shell, as the notebook user with CAP_SYS_ADMIN only), the kernel its child.
struct Kernel {
    unshare: Option<Child>,
    root: i32,
}

impl Kernel {
    fn spawn(env: &Env) -> anyhow::Result<Kernel> {
        let log_path = env.root.join("kernel.log");
        let log = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&log_path)?;
        std::os::unix::fs::fchown(&log, Some(env.user.uid), Some(env.user.gid))?;
        let err = log.try_clone()?;
        let home = env.kernel_dir.to_string_lossy().into_owned();
        let child = Command::new("/usr/bin/unshare")
            .args(["--pid", "--fork", "setsid", "setpriv"])
            .arg(format!("--reuid={}", env.user.uid))
            .arg(format!("--regid={}", env.user.gid))
            // The init (a shell) keeps CAP_SYS_ADMIN, as the agent's init does: CRIU's
            // parasite in the root of the dumped tree mounts a procfs of its PID
            // namespace. The kernel has no capability.
            .args([
                "--init-groups",
                "--inh-caps=-all,+sys_admin",
                "--ambient-caps=+sys_admin",
                "--bounding-set=-all,+sys_admin",
                "--",
                "/bin/sh",
                "-c",
                "setpriv --inh-caps=-all --ambient-caps=-all -- \"$@\" & wait",
                "sh",
                KERNEL_PYTHON,
                "-m",
                "ipykernel_launcher",
                "-f",
                "conn.json",
                "--HistoryManager.enabled=False",
            ])
            .current_dir(&env.kernel_dir)
            .env_clear()
            .env("PATH", nbagent::kernel::launch::DEFAULT_PATH)
            .env("HOME", &home)
            .env("USER", KERNEL_USER)
            .env("LOGNAME", KERNEL_USER)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .context("start unshare")?;
        let upid = child.id();
        let mut kernel = Kernel {
            unshare: Some(child),
            root: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        kernel.root = loop {
            let children = fs::read_to_string(format!("/proc/{upid}/task/{upid}/children"))
                .unwrap_or_default();
            if let Some(pid) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
            {
                break pid;
            }
            if Instant::now() > deadline {
                bail!(
                    "no kernel under unshare; log: {}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        Ok(kernel)
    }

    /// Kills the kernel and reaps `unshare`.
    fn kill(&mut self) -> anyhow::Result<()> {
        if self.root > 0 {
            kill_tree(self.root, Duration::from_secs(60))?;
        }
        if let Some(mut u) = self.unshare.take() {
            u.wait()?;
        }
        Ok(())
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Gives `dir` and its files to `uid:gid` with the given modes (as the agent does
/// around a dump).
fn own_tree(dir: &Path, uid: u32, gid: u32, dir_mode: u32, file_mode: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(dir_mode))?;
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::os::unix::fs::lchown(e.path(), Some(uid), Some(gid))?;
            fs::set_permissions(e.path(), fs::Permissions::from_mode(file_mode))?;
        }
    }
    Ok(())
}

/// The floor: copying `len` bytes between two buffers already touched (freed memory
/// comes back lazily, so untouched buffers would time page faults instead). Best of 3.
fn copy_floor(len: u64) -> Duration {
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let mut src = vec![0u8; len];
    for (i, b) in src.iter_mut().enumerate().step_by(512) {
        *b = (i >> 9) as u8;
    }
    let mut dst = vec![1u8; len];
    for b in dst.iter_mut().step_by(512) {
        *b = 2;
    }
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
        best = best.min(start.elapsed());
    }
    best
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

fn mib(b: u64) -> String {
    format!("{:.0}", b as f64 / f64::from(1 << 20))
}

/// `figure (target) ok|MISS`.
fn vs(d: Duration, target_ms: f64) -> String {
    let v = d.as_secs_f64() * 1e3;
    let mark = if v <= target_ms { "ok" } else { "MISS" };
    format!("{v:.0} ({target_ms:.0}) {mark}")
}

fn print_table(rows: &[Row]) {
    const WIDTHS: [usize; 13] = [5, 5, 5, 15, 6, 22, 20, 9, 12, 13, 5, 6, 19];
    let line = |cells: [&str; 13]| {
        let cells: Vec<String> = cells
            .iter()
            .zip(WIDTHS)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        println!("{}", cells.join(" | "));
    };
    println!();
    line([
        "heap",
        "rss",
        "floor",
        "pause",
        "ingest",
        "restore eager",
        "restore lazy",
        "lazy done",
        "cold",
        "re-exec",
        "image",
        "1 ckpt",
        "10 ckpts",
    ]);
    line([
        "MB",
        "MiB",
        "ms",
        "ms (target)",
        "ms",
        "ms [criu] (target)",
        "ms [criu] (200)",
        "ms",
        "ms mat+ready",
        "ms start+cell",
        "MiB",
        "MiB",
        "MiB (x 1 ckpt)",
    ]);
    for r in rows {
        let target = r.floor.as_secs_f64() * 1.5e3 + 50.0;
        let ratio = r.ten_stored as f64 / r.one_stored.max(1) as f64;
        line([
            &r.mb.to_string(),
            &format!("{:.0}", r.rss_kib as f64 / 1024.0),
            &ms(r.floor),
            &vs(r.pause, target),
            &ms(r.ingest),
            &vs(r.eager, target).replacen(' ', &format!(" [{}] ", ms(r.eager_criu)), 1),
            &match (r.lazy, r.lazy_criu) {
                (Some(t), Some(c)) => vs(t, 200.0).replacen(' ', &format!(" [{}] ", ms(c)), 1),
                _ => "n/a".into(),
            },
            &r.lazy_done.map(ms).unwrap_or_else(|| "n/a".into()),
            &format!(
                "{}+{}",
                ms(r.materialise),
                ms(r.cold.saturating_sub(r.materialise))
            ),
            &format!("{}+{}", ms(r.start), ms(r.reexec.saturating_sub(r.start))),
            &mib(r.image_bytes),
            &mib(r.one_stored),
            &format!(
                "{} ({ratio:.2}x) {}",
                mib(r.ten_stored),
                if ratio <= 2.0 { "ok" } else { "MISS" }
            ),
        ]);
    }
    println!();
    println!(
        "targets: pause <= 1.5 x floor + 50 ms; restore eager <= 1.5 x floor + 50 ms, lazy <= 200 ms; \
         10 checkpoints << 10 x one (marked ok at <= 2x)"
    );
    println!(
        "rss = the kernel's resident set after the last cell; floor = memcpy of the heap's bytes between \
         touched buffers (best of 3); pause = criu dump as {KERNEL_USER} (leave running), median of {CELLS}; \
         ingest = chunking into the store after the dump (kernel running again); restore = criu restore \
         (as root) + a fresh client's kernel_info + a trivial cell, from the hot copy of the latest \
         checkpoint, [criu] the restore request alone; lazy done = until the lazy-pages daemon has \
         served every page; cold = the first checkpoint rebuilt from chunks, \
         then restored eagerly to ready; re-exec = fresh ipykernel until kernel_info + the cell building \
         the heap; image = criu's image files of one dump; 1 ckpt / 10 ckpts = bytes stored (unique \
         chunks + small files, hot copy excluded)"
    );
}
