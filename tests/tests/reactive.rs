//! Reactive mode end to end: the agent checkpoints its real ipykernel with the real
//! CRIU after every cell, and a `RunFrom` restores the nearest usable checkpoint and
//! re-executes the cells after it. Every test compares what a re-run produced with what
//! the same notebook gives when run from the top in a fresh kernel (or with an exact
//! model of it), so a restore that brings back the wrong state fails.
//!
//! Needs root, the `nbuser` account, the kernel venv (`scripts/setup.sh`) and CRIU >= 4.2
//! at /opt/nbagent/criu/bin/criu (`scripts/criu.sh`); each test says why it skips when
//! they are missing. One stack at a time: checkpoints are CPU- and disk-heavy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use nbagent_protocol::{CellSource, CellStatus, CheckpointEvent};
use nbagent_tests::kernel::{
    CheckpointReport, KERNEL_USER, Notebook, Setup, missing_checkpoint_prerequisite,
    missing_prerequisite, stdout_of,
};
use nbserver::run::CellResult;
use sha2::Digest;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn skip(test: &str, why: Option<String>) -> bool {
    match why {
        Some(why) => {
            nbagent_tests::say_skip(&format!("SKIP {test}: {why}"));
            true
        }
        None => false,
    }
}

fn cell(id: &str, code: &str) -> CellSource {
    CellSource {
        id: id.to_owned(),
        code: code.to_owned(),
    }
}

/// Starts a stack with `setup` and waits for its kernel.
async fn ready(setup: Setup) -> Notebook {
    let nb = Notebook::start(setup).await;
    nb.wait_kernel_ready(Duration::from_secs(60)).await;
    nb
}

/// Asserts every cell succeeded.
fn all_ok(nb: &Notebook, what: &str, results: &[CellResult]) {
    for r in results {
        assert_eq!(
            r.status,
            CellStatus::Ok,
            "{what}: cell {} ({}) failed: {:?}\n--- log:\n{}",
            r.cell,
            r.request,
            r.outputs,
            nb.log_tail()
        );
    }
}

/// The index in the notebook of a cell a `RunFrom` executed (`<run>/<index>`).
fn index_of(r: &CellResult) -> usize {
    r.request
        .rsplit('/')
        .next()
        .and_then(|i| i.parse().ok())
        .expect("request id ends with the cell index")
}

fn events(all: &[CheckpointReport], since: usize, event: CheckpointEvent) -> Vec<CheckpointReport> {
    all.iter()
        .skip(since)
        .filter(|c| c.event == event)
        .cloned()
        .collect()
}

/// Asserts that the cells a re-run executed produced what the same cells produced in
/// the run from the top (`top` holds every cell).
fn same_as_top(rerun: &[CellResult], top: &[CellResult]) {
    for r in rerun {
        let t = &top[index_of(r)];
        assert_eq!(r.cell, t.cell);
        assert_eq!(r.status, t.status, "cell {}", r.cell);
        assert_eq!(
            r.outputs, t.outputs,
            "cell {} differs between the re-run and the run from the top",
            r.cell
        );
    }
}

/// The last cell of the state test: a digest of the user's globals (variables that are
/// not modules or callables; instances by their attributes) and of the modules
/// imported since cell 0 took `_base`.
const DIGEST: &str = r#"import hashlib, sys, types
def _digest():
    g = globals()
    items = []
    for k in sorted(g):
        v = g[k]
        if k.startswith("_") or k in ("In", "Out", "exit", "quit", "get_ipython"):
            continue
        if isinstance(v, types.ModuleType) or callable(v):
            continue
        if hasattr(v, "__dict__"):
            v = (type(v).__name__, sorted(vars(v).items()))
        items.append((k, repr(v)))
    mods = sorted(m for m in sys.modules if m not in _base)
    return hashlib.sha256(repr((items, mods)).encode()).hexdigest(), items, mods
_d, _items, _mods = _digest()
print("digest", _d)
print("globals", _items)
print("modules", [m for m in _mods if not m.startswith("_")])
"#;

fn state_notebook(cell3: &str) -> Vec<CellSource> {
    vec![
        cell(
            "s0",
            "import sys\n_base = set(sys.modules)\nimport colorsys\nx = 3\nhue = colorsys.rgb_to_hsv(0.2, 0.4, 0.4)",
        ),
        cell(
            "s1",
            "import textwrap\ndata = {'a': [1, 2, 3], 's': textwrap.shorten('hello world again', 12)}\nlog = []",
        ),
        cell(
            "s2",
            "class Acc:\n    def __init__(self):\n        self.total = 0\n        self.items = []\n    def add(self, v):\n        self.total += v\n        self.items.append(v)\nacc = Acc()\nfor i in range(5):\n    acc.add(i * x)",
        ),
        cell("s3", cell3),
        cell(
            "s4",
            "acc.add(len(log) + 10)\nlog.append(acc.total)\nz = [y, acc.total, len(data['a'])]\nprint('z', z)",
        ),
        cell("s5", DIGEST),
    ]
}

fn digest_line(r: &CellResult) -> String {
    stdout_of(r)
        .lines()
        .find(|l| l.starts_with("digest "))
        .unwrap_or_else(|| panic!("no digest in {:?}", r.outputs))
        .to_owned()
}

/// 1. Edit cell 3 and re-run from it: the agent restores the checkpoint after cell 2
///    and runs cells 3.. only; the digest of the kernel's state (globals, an instance,
///    a list mutated in place, imported modules) and every re-run cell's output equal
///    those of the edited notebook run from the top in a fresh kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerun_from_an_edited_cell_gives_the_state_of_a_fresh_run() {
    if skip(
        "rerun_from_an_edited_cell_gives_the_state_of_a_fresh_run",
        missing_checkpoint_prerequisite(),
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let nb = ready(Setup::default()).await;
    let original = state_notebook(
        "import statistics\nlog.append(statistics.mean(data['a']))\ndata['a'].append(4)\ny = x * 7",
    );
    let first = nb.run_cells("first", &original).await;
    all_ok(&nb, "first run", &first);
    let original_digest = digest_line(&first[5]);
    assert!(
        stdout_of(&first[5]).contains("'statistics'"),
        "the digest does not see the module cell 3 imports: {}",
        stdout_of(&first[5])
    );
    let ck = nb.wait_checkpoint_of("s5", 0).await;
    assert_eq!(ck.event, CheckpointEvent::Created, "{ck:?}");

    let k = 3;
    let edited = state_notebook(
        "import fractions\nlog.append(str(fractions.Fraction(sum(data['a']), 4)))\ndata['a'].append(5)\ny = x * 11",
    );
    let since = nb.checkpoints().await.len();
    let t = Instant::now();
    let rerun = nb.run_from("edit", &edited, k).await;
    let rerun_time = t.elapsed();
    all_ok(&nb, "re-run from the edited cell", &rerun);
    let after = nb.checkpoints().await;
    let restored = events(&after, since, CheckpointEvent::Restored);
    assert_eq!(
        restored.len(),
        1,
        "the re-run did not restore exactly one checkpoint: {:?}",
        &after[since..]
    );
    assert_eq!(
        restored[0].cell, "s2",
        "the re-run restored the wrong checkpoint"
    );
    assert_eq!(
        rerun.iter().map(index_of).collect::<Vec<_>>(),
        (k..edited.len()).collect::<Vec<_>>(),
        "the re-run did not execute exactly the cells from the edited one"
    );

    let since = nb.checkpoints().await.len();
    let t = Instant::now();
    let top = nb.run_from("top", &edited, 0).await;
    let top_time = t.elapsed();
    all_ok(&nb, "run from the top", &top);
    assert_eq!(top.len(), edited.len());
    assert!(
        events(&nb.checkpoints().await, since, CheckpointEvent::Restored).is_empty(),
        "a run from the top restored a checkpoint"
    );
    assert!(rerun.len() < top.len());
    let rerun_digest = digest_line(rerun.last().unwrap());
    assert_eq!(
        rerun_digest,
        digest_line(top.last().unwrap()),
        "state after the re-run differs from a fresh run:\nre-run: {}\nfrom the top: {}",
        stdout_of(rerun.last().unwrap()),
        stdout_of(top.last().unwrap())
    );
    same_as_top(&rerun, &top);
    assert_ne!(
        rerun_digest, original_digest,
        "the edit did not change the state"
    );
    let out = stdout_of(rerun.last().unwrap());
    assert!(
        out.contains("'fractions'") && !out.contains("'statistics'"),
        "modules after the re-run: {out}"
    );
    println!(
        "re-run from cell {k}: {} cells in {:.2}s (restore {} ms); from the top: {} cells in {:.2}s",
        rerun.len(),
        rerun_time.as_secs_f64(),
        restored[0].duration_ms,
        top.len(),
        top_time.as_secs_f64()
    );
}

/// A small deterministic generator (splitmix64), so that a failing seed can be replayed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const CELLS: usize = 10;
const MODULUS: i64 = 1_000_003;

/// Cell `i` of the randomised notebook with constants `mult`, `add`.
fn chain_cell(i: usize, mult: &[i64], add: &[i64]) -> CellSource {
    let mut code = if i == 0 {
        format!("log = []\nx0 = {}\nlog.append(x0 % 97)", add[0])
    } else {
        format!(
            "x{i} = (x{p} * {m} + {c} + len(log)) % {MODULUS}\nlog.append(x{i} % 97)",
            p = i - 1,
            m = mult[i],
            c = add[i]
        )
    };
    if i == CELLS - 1 {
        let xs: Vec<String> = (0..CELLS).map(|j| format!("x{j}")).collect();
        code.push_str(&format!(
            "\nimport hashlib\n_state = repr((log, [{}]))\nprint(hashlib.sha256(_state.encode()).hexdigest(), _state)",
            xs.join(", ")
        ));
    }
    CellSource {
        id: format!("r{i}"),
        code,
    }
}

/// What the last cell prints for constants `mult`, `add`, computed in Rust.
fn chain_expected(mult: &[i64], add: &[i64]) -> String {
    let mut log: Vec<i64> = Vec::new();
    let mut xs: Vec<i64> = Vec::new();
    for i in 0..CELLS {
        let x = if i == 0 {
            add[0]
        } else {
            (xs[i - 1] * mult[i] + add[i] + log.len() as i64).rem_euclid(MODULUS)
        };
        xs.push(x);
        log.push(x.rem_euclid(97));
    }
    let list = |v: &[i64]| {
        format!(
            "[{}]",
            v.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
        )
    };
    let state = format!("({}, {})", list(&log), list(&xs));
    format!(
        "{} {state}\n",
        hex::encode(sha2::Sha256::digest(state.as_bytes()))
    )
}

/// 2. Twenty random steps on a ten-cell chain of dependent cells: edit one cell's
///    constant and re-run from it, or re-run from a random cell unchanged. After each
///    step the last cell's digest equals the one an exact Rust model of the notebook
///    computes, and the agent executed only the cells from the re-run one (it restored
///    the checkpoint before it). `NBAGENT_TEST_SEED` replays a seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_edits_and_reruns_match_a_model() {
    if skip(
        "random_edits_and_reruns_match_a_model",
        missing_checkpoint_prerequisite(),
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let seed = std::env::var("NBAGENT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed {seed} (replay with NBAGENT_TEST_SEED={seed})");
    let mut rng = SplitMix(seed);
    let mult: Vec<i64> = (0..CELLS).map(|_| 1 + rng.below(9) as i64).collect();
    let mut add: Vec<i64> = (0..CELLS).map(|_| rng.below(100) as i64).collect();
    let notebook = |mult: &[i64], add: &[i64]| {
        (0..CELLS)
            .map(|i| chain_cell(i, mult, add))
            .collect::<Vec<_>>()
    };

    let nb = ready(Setup::default()).await;
    let first = nb.run_cells("first", &notebook(&mult, &add)).await;
    all_ok(&nb, "first run", &first);
    assert_eq!(stdout_of(&first[CELLS - 1]), chain_expected(&mult, &add));
    let started = Instant::now();
    let mut executed = 0;
    for step in 0..20 {
        let from = rng.below(CELLS as u64) as usize;
        let edit = rng.below(2) == 0;
        if edit {
            add[from] = (add[from] + 1 + rng.below(99) as i64) % 100;
        }
        let cells = notebook(&mult, &add);
        let since = nb.checkpoints().await.len();
        let results = nb.run_from(&format!("step{step}"), &cells, from).await;
        all_ok(&nb, &format!("step {step}"), &results);
        let what = format!(
            "step {step} (seed {seed}): {} from cell {from}",
            if edit { "edit and re-run" } else { "re-run" }
        );
        assert_eq!(
            stdout_of(results.last().unwrap()),
            chain_expected(&mult, &add),
            "{what}: the last cell's state differs from the model"
        );
        assert_eq!(
            results.iter().map(index_of).collect::<Vec<_>>(),
            (from..CELLS).collect::<Vec<_>>(),
            "{what}: not exactly the cells from the re-run one were executed"
        );
        let restored = events(&nb.checkpoints().await, since, CheckpointEvent::Restored);
        if from > 0 {
            assert_eq!(
                restored.iter().map(|c| c.cell.clone()).collect::<Vec<_>>(),
                [format!("r{}", from - 1)],
                "{what}: expected a restore of the checkpoint after the previous cell"
            );
        } else {
            assert!(restored.is_empty(), "{what}: restored {restored:?}");
        }
        executed += results.len();
    }
    println!(
        "20 steps: {executed} cells executed (of {} from the top) in {:.1}s",
        20 * CELLS,
        started.elapsed().as_secs_f64()
    );
}

/// 3a. A cell that keeps an outbound TCP connection open: its state is reported not
///     restorable with the connection in the reason, and a re-run after it restores
///     the checkpoint before it and re-executes it (a new connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tcp_connection_makes_the_state_not_restorable() {
    if skip(
        "an_open_tcp_connection_makes_the_state_not_restorable",
        missing_checkpoint_prerequisite(),
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts and holds every connection, counting them.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
            if tx.send(held.len()).is_err() {
                break;
            }
        }
    });
    let nb = ready(Setup::default()).await;
    let cells = vec![
        cell("t0", "x = 41"),
        cell(
            "t1",
            &format!(
                "import socket\nconn = socket.create_connection(('127.0.0.1', {port}))\nconn.sendall(b'hello')"
            ),
        ),
        cell(
            "t2",
            &format!("print(x + 1, conn.getpeername()[1] == {port})"),
        ),
    ];
    let first = nb.run_cells("first", &cells).await;
    all_ok(&nb, "first run", &first);
    assert_eq!(stdout_of(&first[2]), "42 True\n");
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 1);
    let t1 = nb.wait_checkpoint_of("t1", 0).await;
    assert_eq!(t1.event, CheckpointEvent::NotRestorable, "{t1:?}");
    assert!(
        t1.reason.contains("TCP connection") && t1.reason.contains(&format!("127.0.0.1:{port}")),
        "the reason does not name the connection: {}",
        t1.reason
    );
    let t0 = nb.wait_checkpoint_of("t0", 0).await;
    assert_eq!(t0.event, CheckpointEvent::Created, "{t0:?}");
    // The state after t2 holds the connection too.
    let t2 = nb.wait_checkpoint_of("t2", 0).await;
    assert_eq!(t2.event, CheckpointEvent::NotRestorable, "{t2:?}");

    let since = nb.checkpoints().await.len();
    let rerun = nb.run_from("after-conn", &cells, 2).await;
    all_ok(&nb, "re-run after the connection", &rerun);
    let restored = events(&nb.checkpoints().await, since, CheckpointEvent::Restored);
    assert_eq!(
        restored.iter().map(|c| c.cell.as_str()).collect::<Vec<_>>(),
        ["t0"],
        "expected the checkpoint before the connection to be restored"
    );
    assert_eq!(rerun.iter().map(index_of).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(stdout_of(&rerun[1]), "42 True\n");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        2,
        "the re-run did not connect again"
    );
}

/// 3b. A cell keeps a file open for writing (not append) and a later cell grows it: a
///     re-run after the first cell must not restore that cell's checkpoint (CRIU would
///     find the file's size changed); a `failed` event names the file, an earlier
///     checkpoint is restored instead, and the results equal a run from the top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_grown_after_its_checkpoint_is_not_restored() {
    if skip(
        "a_file_grown_after_its_checkpoint_is_not_restored",
        missing_checkpoint_prerequisite(),
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let user = nix::unistd::User::from_name(KERNEL_USER).unwrap().unwrap();
    nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("out.txt");
    let p = path.display();
    let nb = ready(Setup::default()).await;
    let cells = vec![
        cell("f0", "x = 5"),
        cell(
            "f1",
            &format!("fh = open('{p}', 'w')\nfh.write('a' * 100)\nfh.flush()"),
        ),
        cell("f2", "fh.write('b' * 50)\nfh.flush()\nprint(fh.tell())"),
        cell(
            "f3",
            &format!("print(x, fh.tell(), open('{p}').read().count('b'))"),
        ),
    ];
    let first = nb.run_cells("first", &cells).await;
    all_ok(&nb, "first run", &first);
    assert_eq!(stdout_of(&first[3]), "5 150 50\n");
    for c in ["f0", "f1", "f2", "f3"] {
        let ck = nb.wait_checkpoint_of(c, 0).await;
        assert_eq!(ck.event, CheckpointEvent::Created, "{ck:?}");
    }

    let since = nb.checkpoints().await.len();
    let rerun = nb.run_from("after-open", &cells, 2).await;
    all_ok(&nb, "re-run after the open", &rerun);
    let after = nb.checkpoints().await;
    let failed = events(&after, since, CheckpointEvent::Failed);
    assert!(
        failed.iter().any(|c| c.cell == "f1"
            && c.reason.contains(&p.to_string())
            && c.reason.contains("100 bytes")
            && c.reason.contains("150 bytes")),
        "no failed restore of the checkpoint after f1 naming the file: {:?}",
        &after[since..]
    );
    let restored = events(&after, since, CheckpointEvent::Restored);
    assert!(
        restored.iter().all(|c| c.cell != "f1"),
        "the checkpoint after f1 was restored although the file grew: {restored:?}"
    );
    assert_eq!(
        restored.iter().map(|c| c.cell.as_str()).collect::<Vec<_>>(),
        ["f0"],
        "expected the checkpoint before the open to be restored: {:?}\n--- log:\n{}",
        &after[since..],
        nb.log_tail()
    );
    assert_eq!(rerun.iter().map(index_of).collect::<Vec<_>>(), [1, 2, 3]);

    let top = nb.run_from("top", &cells, 0).await;
    all_ok(&nb, "run from the top", &top);
    assert_eq!(stdout_of(&top[3]), "5 150 50\n");
    same_as_top(&rerun, &top);
}

/// 4. With a 60 MB budget, six cells that each add 12 MB of incompressible data to the
///    kernel get checkpoints evicted, and a re-run afterwards still gives the right
///    result (from a checkpoint still kept, or by re-executing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_budget_checkpoints_are_evicted_and_reruns_stay_correct() {
    if skip(
        "over_budget_checkpoints_are_evicted_and_reruns_stay_correct",
        missing_checkpoint_prerequisite(),
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let nb = ready(Setup {
        env: vec![("NBAGENT_CHECKPOINT_BUDGET_MB".into(), "60".into())],
        ..Setup::default()
    })
    .await;
    let cells: Vec<CellSource> = (0..6)
        .map(|i| {
            let prev = if i == 0 { "0".to_owned() } else { format!("v{}", i - 1) };
            let mut code = format!(
                "import os\nblob{i} = os.urandom(12_000_000)\nv{i} = {prev} * 3 + {i} + len(blob{i}) // 1_000_000"
            );
            if i == 5 {
                code.push_str("\nprint(v5, sum(len(b) for b in (blob0, blob1, blob2, blob3, blob4, blob5)))");
            }
            cell(&format!("b{i}"), &code)
        })
        .collect();
    let expected = {
        let mut v = 0i64;
        for i in 0..6 {
            v = v * 3 + i + 12;
        }
        format!("{v} 72000000\n")
    };
    let first = nb.run_cells("first", &cells).await;
    all_ok(&nb, "first run", &first);
    assert_eq!(stdout_of(&first[5]), expected);
    nb.wait_checkpoint_of("b5", 0).await;
    let all = nb.checkpoints().await;
    let created = events(&all, 0, CheckpointEvent::Created);
    let evicted = events(&all, 0, CheckpointEvent::Evicted);
    println!(
        "60 MB budget: {} checkpoints created ({} MB in all), {} evicted",
        created.len(),
        created.iter().map(|c| c.bytes).sum::<u64>() >> 20,
        evicted.len()
    );
    for c in &created {
        println!("  created after {}: {} MB", c.cell, c.bytes >> 20);
    }
    assert!(!evicted.is_empty(), "nothing evicted: {all:?}");
    assert!(
        evicted.iter().all(|e| e.reason.contains("budget")),
        "{evicted:?}"
    );

    let since = all.len();
    let rerun = nb.run_from("rerun", &cells, 4).await;
    all_ok(&nb, "re-run", &rerun);
    assert_eq!(stdout_of(rerun.last().unwrap()), expected);
    let restored = events(&nb.checkpoints().await, since, CheckpointEvent::Restored);
    let evicted_ids: Vec<&str> = evicted.iter().map(|e| e.checkpoint.as_str()).collect();
    assert!(
        restored
            .iter()
            .all(|r| !evicted_ids.contains(&r.checkpoint.as_str())),
        "an evicted checkpoint was restored: {restored:?}"
    );
    println!(
        "re-run from cell 4: {} cells executed, restored {:?}",
        rerun.len(),
        restored.iter().map(|c| c.cell.as_str()).collect::<Vec<_>>()
    );
}

/// Runs three cells, re-runs from an edited cell 2, and checks the agent re-executed
/// from the top because checkpoints are off, with the right results and no checkpoint.
async fn rerun_without_checkpoints(nb: &Notebook) {
    let mut cells = vec![
        cell("n0", "log = [1]"),
        cell("n1", "log.append(len(log) * 10)"),
        cell("n2", "log.append(sum(log))\nprint(log)"),
    ];
    let first = nb.run_cells("first", &cells).await;
    all_ok(nb, "first run", &first);
    assert_eq!(stdout_of(&first[2]), "[1, 10, 11]\n");
    cells[1].code = "log.append(len(log) * 100)".into();
    let rerun = nb.run_from("edit", &cells, 1).await;
    all_ok(nb, "re-run", &rerun);
    assert_eq!(
        rerun.iter().map(index_of).collect::<Vec<_>>(),
        [0, 1, 2],
        "without checkpoints the re-run must execute from the top"
    );
    assert_eq!(stdout_of(&rerun[2]), "[1, 100, 101]\n");
    let details = nb.status_details().await;
    assert!(
        details
            .iter()
            .any(|d| d.contains("re-executing from the top: checkpoints are off")),
        "no status says why the re-run re-executes: {details:?}"
    );
    let all = nb.checkpoints().await;
    assert!(
        all.iter().all(|c| !matches!(
            c.event,
            CheckpointEvent::Created | CheckpointEvent::Restored
        )),
        "checkpoints were taken or restored: {all:?}"
    );
}

/// 5. CRIU too old (a script that says 3.17) or `--no-checkpoints`: the capability report
///    says why (naming 4.2), nothing is checkpointed, and a re-run re-executes from the
///    top with the right results, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_usable_criu_reruns_reexecute_from_the_top() {
    if skip(
        "without_usable_criu_reruns_reexecute_from_the_top",
        missing_prerequisite(),
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = dir.path().join("criu");
    {
        let mut f = std::fs::File::create(&fake).unwrap();
        f.write_all(b"#!/bin/sh\necho 'Version: 3.17'\n").unwrap();
    }
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let nb = ready(Setup {
        env: vec![("NBAGENT_CRIU".into(), fake.display().to_string())],
        ..Setup::default()
    })
    .await;
    let features = nb.capabilities().await;
    let ck = features
        .iter()
        .find(|f| f.name == "checkpoint")
        .expect("a checkpoint feature in the report");
    assert!(!ck.enabled, "{ck:?}");
    assert!(
        ck.detail.contains("3.17") && ck.detail.contains("4.2"),
        "the report does not say CRIU is older than 4.2: {ck:?}"
    );
    rerun_without_checkpoints(&nb).await;
    drop(nb);

    let nb = ready(Setup {
        agent_args: vec!["--no-checkpoints".into()],
        ..Setup::default()
    })
    .await;
    rerun_without_checkpoints(&nb).await;
    let details = nb.status_details().await;
    assert!(
        details.iter().any(|d| d.contains("--no-checkpoints")),
        "no status names --no-checkpoints: {details:?}"
    );
}

/// 6. A kernel holding ~500 MB: the checkpoint after the allocation is restored for a
///    re-run of the cell after it, which sees the array with the expected sum. Prints
///    the dump and restore figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_mb_kernel_is_restored() {
    if skip(
        "a_500_mb_kernel_is_restored",
        missing_checkpoint_prerequisite(),
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let nb = ready(Setup::default()).await;
    let cells = vec![
        cell("m0", "import numpy as np"),
        cell("m1", "big = np.ones(500_000_000 // 8)\nbig[::4096] = 7"),
        cell("m2", "print(float(big.sum()), big.nbytes)"),
    ];
    // 62_500_000 ones, of which ceil(62_500_000 / 4096) = 15_259 became 7.
    let expected = format!("{:.1} 500000000\n", 62_500_000.0 + 6.0 * 15_259.0);
    let first = nb.run_cells("first", &cells).await;
    all_ok(&nb, "first run", &first);
    assert_eq!(stdout_of(&first[2]), expected);
    let m1 = nb.wait_checkpoint_of("m1", 0).await;
    assert_eq!(m1.event, CheckpointEvent::Created, "{m1:?}");
    assert!(m1.bytes > 400 << 20, "the image is too small: {m1:?}");
    let m2 = nb.wait_checkpoint_of("m2", 0).await;

    let since = nb.checkpoints().await.len();
    let t = Instant::now();
    let rerun = nb.run_from("rerun", &cells, 2).await;
    let rerun_time = t.elapsed();
    all_ok(&nb, "re-run", &rerun);
    let restored = events(&nb.checkpoints().await, since, CheckpointEvent::Restored);
    assert_eq!(
        restored.iter().map(|c| c.cell.as_str()).collect::<Vec<_>>(),
        ["m1"],
        "expected the checkpoint after the allocation to be restored"
    );
    assert_eq!(rerun.iter().map(index_of).collect::<Vec<_>>(), [2]);
    assert_eq!(stdout_of(&rerun[0]), expected);
    println!(
        "500 MB kernel: dump after m1 {} MB in {} ms; after m2 {} MB in {} ms; restore {} ms; \
         re-run of m2 (restore + cell) {:.2}s",
        m1.bytes >> 20,
        m1.duration_ms,
        m2.bytes >> 20,
        m2.duration_ms,
        restored[0].duration_ms,
        rerun_time.as_secs_f64()
    );
}
