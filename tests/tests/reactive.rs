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

use nbagent_protocol::{CellSource, CellStatus, CheckpointEvent, OutputContent};
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
            OutputContent::coalesce_streams(&r.outputs),
            OutputContent::coalesce_streams(&t.outputs),
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

const CELLS: usize = 4;
const MODULUS: i64 = 1_000_003;

/// Cell `i` of the randomised notebook with constants `mult`, `add`: it prints its
/// value; the last cell also a digest of the whole state.
fn chain_cell(i: usize, mult: &[i64], add: &[i64]) -> CellSource {
    let mut code = if i == 0 {
        format!("log = []\nx0 = {}\nlog.append(x0 % 97)\nprint(x0)", add[0])
    } else {
        format!(
            "x{i} = (x{p} * {m} + {c} + len(log)) % {MODULUS}\nlog.append(x{i} % 97)\nprint(x{i})",
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

/// What every cell prints for constants `mult`, `add`, computed in Rust.
fn chain_expected(mult: &[i64], add: &[i64]) -> Vec<String> {
    let mut log: Vec<i64> = Vec::new();
    let mut xs: Vec<i64> = Vec::new();
    let mut out = Vec::new();
    for i in 0..CELLS {
        let x = if i == 0 {
            add[0]
        } else {
            (xs[i - 1] * mult[i] + add[i] + log.len() as i64).rem_euclid(MODULUS)
        };
        xs.push(x);
        log.push(x.rem_euclid(97));
        out.push(format!("{x}\n"));
    }
    let list = |v: &[i64]| {
        format!(
            "[{}]",
            v.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
        )
    };
    let state = format!("({}, {})", list(&log), list(&xs));
    out[CELLS - 1].push_str(&format!(
        "{} {state}\n",
        hex::encode(sha2::Sha256::digest(state.as_bytes()))
    ));
    out
}

/// 2. Twenty random sequences of three steps on a four-cell chain of dependent
///    cells, each from the same base notebook: edit one cell's constant and re-run from
///    it, or re-run from a random cell unchanged. After each step every re-run cell's
///    output equals what an exact Rust model of the notebook computes, and the agent
///    executed only the cells from the re-run one (it restored the checkpoint before
///    it). Each sequence prints its seed; `NBAGENT_TEST_SEED` replays one sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_edits_and_reruns_match_a_model() {
    if skip(
        "random_edits_and_reruns_match_a_model",
        missing_checkpoint_prerequisite(),
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let replay: Option<u64> = std::env::var("NBAGENT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let seeds: Vec<u64> = match replay {
        Some(s) => vec![s],
        None => {
            let mut master = SplitMix(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64,
            );
            (0..20).map(|_| master.next()).collect()
        }
    };
    // The base notebook is fixed, so that every sequence starts from its checkpoints.
    let mut base = SplitMix(0x5eed);
    let mult: Vec<i64> = (0..CELLS).map(|_| 1 + base.below(9) as i64).collect();
    let base_add: Vec<i64> = (0..CELLS).map(|_| base.below(100) as i64).collect();
    let notebook = |add: &[i64]| {
        (0..CELLS)
            .map(|i| chain_cell(i, &mult, add))
            .collect::<Vec<_>>()
    };

    let nb = ready(Setup::default()).await;
    let first = nb.run_cells("first", &notebook(&base_add)).await;
    all_ok(&nb, "first run", &first);
    assert_eq!(
        first.iter().map(stdout_of).collect::<Vec<_>>(),
        chain_expected(&mult, &base_add)
    );
    let started = Instant::now();
    let (mut executed, mut steps) = (0, 0);
    for (n, &seed) in seeds.iter().enumerate() {
        println!("sequence {n}: seed {seed} (replay with NBAGENT_TEST_SEED={seed})");
        let mut rng = SplitMix(seed);
        let mut add = base_add.clone();
        for step in 0..3 {
            let from = rng.below(CELLS as u64) as usize;
            let edit = rng.below(2) == 0;
            if edit {
                add[from] = (add[from] + 1 + rng.below(99) as i64) % 100;
            }
            let cells = notebook(&add);
            let since = nb.checkpoints().await.len();
            let results = nb.run_from(&format!("s{n}-{step}"), &cells, from).await;
            let what = format!(
                "sequence {n} step {step} (seed {seed}): {} from cell {from}",
                if edit { "edit and re-run" } else { "re-run" }
            );
            all_ok(&nb, &what, &results);
            assert_eq!(
                results.iter().map(index_of).collect::<Vec<_>>(),
                (from..CELLS).collect::<Vec<_>>(),
                "{what}: not exactly the cells from the re-run one were executed; \
                 checkpoint events: {:?}\n--- log:\n{}",
                &nb.checkpoints().await[since..],
                nb.log_tail()
            );
            let expected = chain_expected(&mult, &add);
            for r in &results {
                assert_eq!(
                    stdout_of(r),
                    expected[index_of(r)],
                    "{what}: cell {} differs from the model",
                    r.cell
                );
            }
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
            steps += 1;
        }
    }
    println!(
        "{} sequences, {steps} steps: {executed} cells executed (of {} from the top) in {:.1}s",
        seeds.len(),
        steps * CELLS,
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
///     find the file's size changed); a `not_restorable` event names the file and both
///     sizes, an earlier checkpoint is restored instead, and the results equal a run
///     from the top.
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
    let f1 = nb.wait_checkpoint_of("f1", 0).await;
    let not_restorable = events(&after, since, CheckpointEvent::NotRestorable);
    assert!(
        not_restorable.iter().any(|c| c.cell == "f1"
            && c.checkpoint == f1.checkpoint
            && c.reason.contains(&p.to_string())
            && c.reason.contains("100 bytes")
            && c.reason.contains("150 bytes")
            && c.reason.contains("cannot be restored")),
        "the checkpoint after f1 was not reported not restorable naming the file: {:?}",
        &after[since..]
    );
    assert!(
        events(&after, since, CheckpointEvent::Failed).is_empty(),
        "a grown file is not a failure: {:?}",
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

/// 4. With a 170 MB budget, six cells that each replace 12 MB of incompressible data in
///    the kernel get their oldest checkpoints evicted; a re-run from cell 4 restores the
///    nearest checkpoint that survived on the current path (not an evicted one, and not
///    none) and gives the right result.
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
        env: vec![("NBAGENT_CHECKPOINT_BUDGET_MB".into(), "170".into())],
        ..Setup::default()
    })
    .await;
    // Each cell replaces the kernel's 12 MB of random data (an anonymous mapping
    // filled in place, the previous one unmapped), so each checkpoint has 12 MB of its
    // own beside the ~35 MB shared with the others.
    let cells: Vec<CellSource> = (0..6)
        .map(|i| {
            let prev = if i == 0 { "0".to_owned() } else { format!("v{}", i - 1) };
            let mut code = format!(
                "import mmap\nold = globals().get('blob')\nblob = mmap.mmap(-1, 12_000_000)\n\
                 with open('/dev/urandom', 'rb', buffering=0) as f:\n    assert f.readinto(blob) == len(blob)\n\
                 if old is not None:\n    old.close()\ndel old\n\
                 v{i} = {prev} * 3 + {i} + len(blob) // 1_000_000"
            );
            if i == 5 {
                code.push_str("\nprint(v5, len(blob))");
            }
            cell(&format!("b{i}"), &code)
        })
        .collect();
    let expected = {
        let mut v = 0i64;
        for i in 0..6 {
            v = v * 3 + i + 12;
        }
        format!("{v} 12000000\n")
    };
    let first = nb.run_cells("first", &cells).await;
    all_ok(&nb, "first run", &first);
    assert_eq!(stdout_of(&first[5]), expected);
    nb.wait_checkpoint_of("b5", 0).await;
    let all = nb.checkpoints().await;
    let created = events(&all, 0, CheckpointEvent::Created);
    let evicted = events(&all, 0, CheckpointEvent::Evicted);
    println!(
        "170 MB budget: {} checkpoints created ({} MB in all), {} evicted",
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
    let after = nb.checkpoints().await;
    let restored = events(&after, since, CheckpointEvent::Restored);
    assert_eq!(
        restored.len(),
        1,
        "the re-run did not restore exactly one checkpoint (one on the current path must \
         have survived the budget): {:?}",
        &after[since..]
    );
    let restored = &restored[0];
    // Evictions reported up to the restore (those the storing of b5 found are
    // reported when the restore waits for it).
    let at_restore = after
        .iter()
        .position(|c| c.event == CheckpointEvent::Restored && c.checkpoint == restored.checkpoint)
        .unwrap();
    let evicted_ids: Vec<&str> = after[..at_restore]
        .iter()
        .filter(|c| c.event == CheckpointEvent::Evicted)
        .map(|c| c.checkpoint.as_str())
        .collect();
    // The nearest surviving checkpoint at or before cell 3 is the one restored.
    let nearest = created
        .iter()
        .filter(|c| ["b0", "b1", "b2", "b3"].contains(&c.cell.as_str()))
        .filter(|c| !evicted_ids.contains(&c.checkpoint.as_str()))
        .max_by_key(|c| c.cell.clone())
        .unwrap_or_else(|| panic!("no checkpoint of b0..b3 survived: {after:?}"));
    assert_eq!(
        (restored.cell.as_str(), restored.checkpoint.as_str()),
        (nearest.cell.as_str(), nearest.checkpoint.as_str()),
        "not the nearest surviving checkpoint was restored: {:?}",
        &after[since..]
    );
    let j: usize = restored.cell[1..].parse().unwrap();
    assert_eq!(
        rerun.iter().map(index_of).collect::<Vec<_>>(),
        (j + 1..6).collect::<Vec<_>>(),
        "the re-run did not execute exactly the cells after the restored one"
    );
    println!(
        "re-run from cell 4: {} cells executed, restored the checkpoint after {}",
        rerun.len(),
        restored.cell
    );
}

/// 4b. The chain of checkpoints follows the live kernel: after an agent restart the
///     adopting agent links the next cell's checkpoint to the kernel's last one (a
///     re-run restores it), and after the kernel dies while idle the next cell's
///     checkpoint (a fresh kernel) is not linked to the dead kernel's: a re-run that
///     restored it would lack the earlier cells' variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_chain_survives_adoption_and_resets_on_kernel_death() {
    if skip(
        "the_checkpoint_chain_survives_adoption_and_resets_on_kernel_death",
        missing_checkpoint_prerequisite(),
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let nb = ready(Setup::default()).await;
    let cells = vec![
        cell("k0", "x = 1"),
        cell("k1", "y = 2"),
        cell("k2", "z = 3"),
        cell("k3", "print(x + y + z)"),
        cell("k4", "w = 4"),
        cell("k5", "print(x + y + z + w)"),
    ];
    all_ok(
        &nb,
        "first cells",
        &nb.run_cells("first", &cells[..2]).await,
    );
    let k1 = nb.wait_checkpoint_of("k1", 0).await;
    assert_eq!(k1.event, CheckpointEvent::Created, "{k1:?}");
    // The store records a checkpoint in the background: wait until its index has it,
    // else the adopting agent rightly cannot continue the chain.
    let index = nb.runtime_dir.join("checkpoints").join("index.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&index).is_ok_and(|t| t.contains(&k1.checkpoint)) {
        assert!(
            Instant::now() < deadline,
            "the store did not record {k1:?}\n--- log:\n{}",
            nb.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The agent restarts and adopts the kernel; k2 runs in it.
    let agent = nb.agent_pid().expect("agent pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    nb.wait_for("kernel_status", Duration::from_secs(30), |m| {
        m.iter()
            .any(|s| {
                matches!(&s.msg, nbagent_protocol::Message::KernelStatus { detail, .. }
                    if detail.contains("adopted running kernel"))
            })
            .then_some(())
    })
    .await;
    all_ok(
        &nb,
        "after adoption",
        &nb.run_cells("adopted", &cells[2..3]).await,
    );
    let k2 = nb.wait_checkpoint_of("k2", 0).await;
    assert_eq!(k2.event, CheckpointEvent::Created, "{k2:?}");
    let since = nb.checkpoints().await.len();
    let rerun = nb.run_from("after-adoption", &cells[..4], 3).await;
    all_ok(&nb, "re-run after adoption", &rerun);
    assert_eq!(stdout_of(&rerun[0]), "6\n");
    let restored = events(&nb.checkpoints().await, since, CheckpointEvent::Restored);
    assert_eq!(
        restored
            .iter()
            .map(|c| c.checkpoint.as_str())
            .collect::<Vec<_>>(),
        [k2.checkpoint.as_str()],
        "the checkpoint taken in the adopted kernel is not on the path"
    );

    let k3 = nb.wait_checkpoint_of("k3", since).await;
    assert_eq!(k3.event, CheckpointEvent::Created, "{k3:?}");

    // The kernel dies while idle; k4 runs in a fresh kernel.
    let pid = nb.record().expect("kernel record").pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    nb.wait_for("kernel_died", Duration::from_secs(30), |m| {
        (!m.is_empty()).then_some(())
    })
    .await;
    let r = nb.run_cells("fresh", &cells[4..5]).await;
    all_ok(&nb, "after the death", &r);
    let k4 = nb.wait_checkpoint_of("k4", 0).await;
    assert_eq!(k4.event, CheckpointEvent::Created, "{k4:?}");
    let since = nb.checkpoints().await.len();
    let rerun = nb.run_from("after-death", &cells, 5).await;
    all_ok(&nb, "re-run after the death", &rerun);
    let restored = events(&nb.checkpoints().await, since, CheckpointEvent::Restored);
    assert_eq!(
        restored
            .iter()
            .map(|c| c.checkpoint.as_str())
            .collect::<Vec<_>>(),
        [k3.checkpoint.as_str()],
        "expected the checkpoint after k3 (the last one of the dead kernel), not the one \
         after k4 ({}) taken in a fresh kernel",
        k4.checkpoint
    );
    assert_eq!(rerun.iter().map(index_of).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(stdout_of(&rerun[1]), "10\n");
}

/// 4c. An attached file read through the FUSE mount and kept open: the checkpoint
///     after the cell that opened it is created, a re-run after that cell restores it,
///     and the next cell reads on from the kept file object (its offset and contents
///     came back with the restored kernel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_open_attached_file_reads_on_after_a_restore() {
    if skip(
        "a_kept_open_attached_file_reads_on_after_a_restore",
        missing_checkpoint_prerequisite().or_else(|| {
            (!std::path::Path::new("/dev/fuse").exists())
                .then(|| "/dev/fuse does not exist: FUSE mounts are impossible here".to_owned())
        }),
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mounts = tempfile::tempdir().unwrap();
    std::fs::set_permissions(mounts.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let nbdir = mounts.path().join("notebook_files");
    let content: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let nb = ready(Setup {
        env: vec![("NBAGENT_FILES_MODE".into(), "mount".into())],
        agent_args: vec![
            "--notebook-files".into(),
            nbdir.display().to_string(),
            "--workspace-files".into(),
            mounts.path().join("workspace_files").display().to_string(),
        ],
        files: vec![(
            nbagent_protocol::FileRoot::Notebook,
            "data.bin".into(),
            content.clone(),
        )],
        ..Setup::default()
    })
    .await;
    let path = nbdir.join("data.bin");
    let mount_table = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mount_table.contains(&nbdir.display().to_string()),
        "the notebook files are not mounted:\n{mount_table}"
    );
    let cells = vec![
        cell(
            "o0",
            &format!(
                "fh = open({:?}, 'rb')\nhead = fh.read(1000)\nprint(len(head))",
                path.display().to_string()
            ),
        ),
        cell("o1", "chunk = fh.read(16)\nprint(fh.tell(), chunk.hex())"),
    ];
    let expected = format!("1016 {}\n", hex::encode(&content[1000..1016]));
    let first = nb.run_cells("first", &cells).await;
    all_ok(&nb, "first run", &first);
    assert_eq!(stdout_of(&first[0]), "1000\n");
    assert_eq!(stdout_of(&first[1]), expected);
    let o0 = nb.wait_checkpoint_of("o0", 0).await;
    assert_eq!(
        o0.event,
        CheckpointEvent::Created,
        "{o0:?}\n--- log:\n{}",
        nb.log_tail()
    );

    let since = nb.checkpoints().await.len();
    let rerun = nb.run_from("rerun", &cells, 1).await;
    all_ok(&nb, "re-run", &rerun);
    let after = nb.checkpoints().await;
    let restored = events(&after, since, CheckpointEvent::Restored);
    assert_eq!(
        restored
            .iter()
            .map(|c| c.checkpoint.as_str())
            .collect::<Vec<_>>(),
        [o0.checkpoint.as_str()],
        "expected the checkpoint after the open to be restored: {:?}\n--- log:\n{}",
        &after[since..],
        nb.log_tail()
    );
    assert_eq!(rerun.iter().map(index_of).collect::<Vec<_>>(), [1]);
    assert_eq!(stdout_of(&rerun[0]), expected);
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

/// 10. Resume later: the kernel dies (as after an out-of-memory kill) and the notebook
///     resumes from its last checkpoint instead of from the top: a run from the next cell
///     restores the dead kernel's last state and the next cell sees its variables,
///     without re-running the cells before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_kernel_resumes_from_its_last_checkpoint() {
    if skip(
        "a_dead_kernel_resumes_from_its_last_checkpoint",
        missing_checkpoint_prerequisite(),
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let nb = ready(Setup::default()).await;
    let cells = vec![
        cell(
            "r0",
            "import random\nseed = random.random()\nprint(repr(seed))",
        ),
        cell("r1", "runs = globals().get('runs', 0) + 1"),
        cell("r2", "print(repr(seed), runs)"),
    ];
    let first = nb.run_cells("first", &cells[..2]).await;
    all_ok(&nb, "first run", &first);
    let seed = stdout_of(&first[0]);
    let r1 = nb.wait_checkpoint_of("r1", 0).await;
    assert_eq!(r1.event, CheckpointEvent::Created, "{r1:?}");

    let pid = nb.record().expect("kernel record").pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    nb.wait_for("kernel_died", Duration::from_secs(30), |m| {
        (!m.is_empty()).then_some(())
    })
    .await;

    let since = nb.checkpoints().await.len();
    let resumed = nb.run_from("resume", &cells, 2).await;
    all_ok(&nb, "resume", &resumed);
    assert_eq!(
        resumed.iter().map(index_of).collect::<Vec<_>>(),
        [2],
        "only the cell after the checkpoint runs"
    );
    // The same random seed and one run of r1: the state is the dead kernel's, restored,
    // not a re-execution (which would draw another seed).
    assert_eq!(stdout_of(&resumed[0]), format!("{} 1\n", seed.trim_end()));
    let restored = events(&nb.checkpoints().await, since, CheckpointEvent::Restored);
    assert_eq!(
        restored
            .iter()
            .map(|c| c.checkpoint.as_str())
            .collect::<Vec<_>>(),
        [r1.checkpoint.as_str()],
        "the last checkpoint of the dead kernel was not the one restored"
    );
}
