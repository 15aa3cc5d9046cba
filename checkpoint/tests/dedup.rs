//! Deduplicated checkpoints of a real process with real CRIU: ten dumps of a 100 MB
//! heap that changes by about 1% between them take far less than ten images, restore
//! to the right state, and eviction frees the chunks only they used.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::time::{Duration, Instant};

use common::*;
use nbagent_checkpoint::chunks::Manifest;
use nbagent_checkpoint::store::{CheckpointId, CheckpointKey, Outcome, Store, StoreConfig};
use nbagent_checkpoint::{DumpOptions, RestoreOptions, kill_tree};

/// A 100 MB random heap; `mutate N` rewrites 16 blocks of 64 KiB (1%) at
/// pseudo-random offsets and sets the value to N; `sum` is the heap's SHA-256.
const HEAP_PY: &str = r#"
import hashlib, os, random, sys, time
ctl = sys.argv[1]
heap = bytearray(os.urandom(int(sys.argv[2]) << 20))
value = "initial"
n = 0
open(os.path.join(ctl, "ready.tmp"), "w").close(); os.rename(os.path.join(ctl, "ready.tmp"), os.path.join(ctl, "ready"))
while True:
    req = os.path.join(ctl, "req-%d" % (n + 1))
    if not os.path.exists(req):
        time.sleep(0.002)
        continue
    n += 1
    cmd = open(req).read().split(" ", 1)
    if cmd[0] == "mutate":
        rnd = random.Random(int(cmd[1]))
        for _ in range(16):
            off = rnd.randrange(0, len(heap) - 65536)
            heap[off:off + 65536] = os.urandom(65536)
        value = cmd[1]
        out = hashlib.sha256(heap).hexdigest()
    elif cmd[0] == "get":
        out = value
    elif cmd[0] == "sum":
        out = hashlib.sha256(heap).hexdigest()
    else:
        out = "unknown"
    tmp = os.path.join(ctl, "tmp-resp")
    open(tmp, "w").write(out); os.rename(tmp, os.path.join(ctl, "resp-%d" % n))
"#;

fn key(cell: usize, pred: Option<&CheckpointId>) -> CheckpointKey {
    CheckpointKey {
        notebook: "nb".into(),
        cell: format!("cell{cell}"),
        code_hash: "h".into(),
        predecessor: pred.cloned(),
    }
}

#[test]
fn ten_checkpoints_of_a_changing_heap_dedup_restore_and_evict() {
    let _g = serial();
    let Some(criu) = criu_or_skip("ten_checkpoints_of_a_changing_heap_dedup_restore_and_evict")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ctl_dir = dir.path().join("ctl");
    fs::create_dir_all(&ctl_dir).unwrap();
    let mut tree = Tree::spawn(
        &[PYTHON, "-c", HEAP_PY, ctl_dir.to_str().unwrap(), "100"],
        dir.path(),
        &[],
    );
    poll("the heap process", Duration::from_secs(60), || {
        ctl_dir.join("ready").exists().then_some(())
    });
    let mut ctl = Ctl { dir: ctl_dir, n: 0 };
    let root = dir.path().join("store");
    let mut store = Store::open(StoreConfig::new(&root, u64::MAX)).unwrap();

    let mut ids: Vec<CheckpointId> = Vec::new();
    let mut sums = Vec::new();
    let mut marks = Vec::new();
    let mut one_image = 0;
    for i in 0..10 {
        sums.push(ctl.ask(&format!("mutate {i}")));
        marks.push(ctl.n);
        let (id, images) = store.allocate().unwrap();
        let d = criu
            .dump(tree.root, &images, &DumpOptions::default())
            .unwrap();
        if i == 0 {
            one_image = d.image_bytes;
        }
        let st = store
            .record(
                id.clone(),
                key(i, ids.last()),
                Outcome::ok(d.image_bytes, d.duration),
            )
            .unwrap()
            .expect("deduplicated");
        eprintln!(
            "checkpoint {i}: dump {:?}, image {} B, new chunk bytes {} ({} of {} chunks) in {:?}",
            d.duration, d.image_bytes, st.new_bytes, st.new_chunks, st.chunks, st.duration
        );
        ids.push(id);
    }
    let stored = store.stored_bytes();
    eprintln!(
        "10 checkpoints: {stored} B stored (+{} B hot copy), one image {one_image} B, {:.2}x",
        store.hot_bytes(),
        stored as f64 / one_image as f64
    );
    assert!(one_image > 100 << 20, "{one_image}");
    assert!(stored < 3 * one_image, "{stored} B for 10 checkpoints");
    tree.kill();

    // The first: rebuilt from chunks; the last: rebuilt again (the first took the
    // hot copy), restored lazily where the kernel can.
    let lazy = criu.probe().unwrap().lazy_pages;
    for (i, lazy) in [(0usize, false), (9, lazy)] {
        let t = Instant::now();
        let img = store.images(&ids[i]).unwrap();
        let materialise = t.elapsed();
        assert!(img.materialised.is_some(), "checkpoint {i} was not hot");
        ctl.rewind(marks[i]);
        let mut opts = RestoreOptions::default();
        opts.lazy_pages = lazy;
        let r = criu.restore(&img.dir, &opts).unwrap();
        let guard = Restored(r.pid);
        eprintln!(
            "checkpoint {i}: materialised in {materialise:?}, restored (lazy {lazy}) in {:?}",
            r.duration
        );
        assert_eq!(ctl.ask("get"), i.to_string());
        assert_eq!(ctl.ask("sum"), sums[i], "heap of checkpoint {i}");
        kill_tree(r.pid, Duration::from_secs(10)).unwrap();
        std::mem::forget(guard);
    }

    // Evict down to about half: the chunks left are exactly those of the survivors.
    let total = store.total_bytes();
    drop(store);
    let mut store = Store::open(StoreConfig::new(&root, total / 2)).unwrap();
    let before = store.chunk_store().list().unwrap().0.len();
    let evicted = store.evict("nb", &[]).unwrap();
    assert!(!evicted.is_empty());
    assert!(store.total_bytes() <= total / 2, "{}", store.total_bytes());
    let mut live = BTreeSet::new();
    for e in store.entries().iter().filter(|e| e.usable()) {
        let m = Manifest::read(&store.dir(&e.id)).unwrap().unwrap();
        live.extend(m.distinct().into_keys());
    }
    let left: BTreeSet<_> = store.chunk_store().list().unwrap().0.into_iter().collect();
    eprintln!(
        "evicted {} checkpoints: {before} -> {} chunks, {} B on disk",
        evicted.len(),
        left.len(),
        store.total_bytes()
    );
    assert_eq!(left, live);
    assert!(left.len() < before);
    for id in &evicted {
        assert!(!store.dir(id).exists());
    }
}
