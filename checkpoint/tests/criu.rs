//! Dump and restore with the real CRIU (skipped with a reason where it cannot run).

mod common;

use std::fs;
use std::time::Duration;

use common::*;
use nbagent_checkpoint::{
    Criu, CriuConfig, CriuError, DumpOptions, RestoreOptions, kill_tree, pid_exists,
};

#[test]
fn probe_reports_features() {
    let _g = serial();
    let Some(criu) = criu_or_skip("probe_reports_features") else {
        return;
    };
    let p = criu.probe().unwrap();
    assert!(p.version.major >= 4);
    eprintln!("probe: {p:?}");
}

#[test]
fn dump_kill_restore_twice_keeps_dumped_state() {
    let _g = serial();
    let Some(criu) = criu_or_skip("dump_kill_restore_twice_keeps_dumped_state") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut tree, mut ctl) = spawn_state(dir.path(), 50);
    assert_eq!(ctl.ask("set before"), "ok");
    let sum = ctl.ask("sum");

    let images = dir.path().join("ck1");
    let stats = criu
        .dump(tree.root, &images, &DumpOptions::default())
        .unwrap();
    eprintln!("dump: {stats:?}");
    let mark = ctl.n;
    assert!(stats.image_bytes > 50 << 20, "{stats:?}");
    assert!(!stats.incremental);
    assert!(images.join("dump.log").exists());

    // Left running: it still answers, and its state moves on.
    assert_eq!(ctl.ask("set after"), "ok");
    assert_eq!(ctl.ask("get"), "after");
    let root = tree.root;
    tree.kill();
    assert!(!pid_exists(root));

    let me = i32::try_from(std::process::id()).unwrap();
    for round in 0..2 {
        ctl.rewind(mark);
        let r = criu.restore(&images, &RestoreOptions::default()).unwrap();
        let guard = Restored(r.pid);
        eprintln!("restore {round}: pid {} in {:?}", r.pid, r.duration);
        // A PID namespace's init comes back in a new namespace: pid 1 inside, a new
        // pid outside.
        let status = fs::read_to_string(format!("/proc/{}/status", r.pid)).unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
        assert!(nspid.ends_with("\t1"), "{nspid}");
        eprintln!("dumped root {root}, restored root {}: {nspid}", r.pid);
        // rst_sibling: the restored root is our child.
        let stat = fs::read_to_string(format!("/proc/{}/stat", r.pid)).unwrap();
        let ppid: i32 = stat[stat.rfind(')').unwrap() + 2..]
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(ppid, me, "restored root should be our child");
        assert!(images.join("restore.log").exists());
        // The restored process sees the dumped state, not the later one.
        assert_eq!(ctl.ask("get"), "before");
        assert_eq!(ctl.ask("sum"), sum);
        assert_eq!(ctl.ask("tcp"), "ping");
        assert_eq!(ctl.ask("set changed"), "ok");
        // Our child: kill_tree reaps it with waitpid.
        kill_tree(r.pid, Duration::from_secs(10)).unwrap();
        assert!(!pid_exists(r.pid));
        std::mem::forget(guard);
    }
    let log = tree.log_text();
    assert!(log.contains("ready"), "{log}");
}

#[test]
fn restore_while_live_tree_runs_is_refused() {
    let _g = serial();
    let Some(criu) = criu_or_skip("restore_while_live_tree_runs_is_refused") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // In its own PID namespace: its pids are free in a new namespace, but its
    // listening port is not.
    let (tree, _ctl) = spawn_state(dir.path(), 1);
    let images = dir.path().join("ck");
    criu.dump(tree.root, &images, &DumpOptions::default())
        .unwrap();
    let e = criu
        .restore(&images, &RestoreOptions::default())
        .unwrap_err();
    assert!(matches!(e, CriuError::AddressInUse { .. }), "{e}");
    assert!(pid_exists(tree.root));

    // Without a PID namespace: its pid must be free.
    let plain = dir.path().join("plain");
    fs::create_dir_all(&plain).unwrap();
    let (tree, _ctl) = spawn_state_no_pidns(&plain, 1);
    let images = plain.join("ck");
    criu.dump(tree.root, &images, &DumpOptions::default())
        .unwrap();
    let e = criu
        .restore(&images, &RestoreOptions::default())
        .unwrap_err();
    assert!(
        matches!(e, CriuError::PidInUse { pid, log: None } if pid == tree.root),
        "{e}"
    );
}

#[test]
fn restore_from_empty_or_corrupt_images_explains() {
    let _g = serial();
    let Some(criu) = criu_or_skip("restore_from_empty_or_corrupt_images_explains") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let e = criu
        .restore(&empty, &RestoreOptions::default())
        .unwrap_err();
    eprintln!("empty: {e}");
    let log = e.log().expect("a log tail");
    assert!(!log.tail.is_empty(), "{e}");
    assert!(matches!(e, CriuError::Failed { op: "restore", .. }), "{e}");

    // A real dump whose images are damaged.
    let (mut tree, _ctl) = spawn_state(dir.path(), 1);
    let images = dir.path().join("ck");
    criu.dump(tree.root, &images, &DumpOptions::default())
        .unwrap();
    tree.kill();
    for entry in fs::read_dir(&images).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("core-") || name.starts_with("pstree") {
            fs::write(&p, b"garbage").unwrap();
        }
    }
    let e = criu
        .restore(&images, &RestoreOptions::default())
        .unwrap_err();
    eprintln!("corrupt: {e}");
    assert!(!e.log().expect("a log tail").tail.is_empty(), "{e}");
}

#[test]
fn dump_of_missing_pid_is_clear() {
    let _g = serial();
    let Some(criu) = criu_or_skip("dump_of_missing_pid_is_clear") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A pid that existed and is gone.
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = i32::try_from(c.id()).unwrap();
    c.wait().unwrap();
    let e = criu
        .dump(pid, &dir.path().join("ck"), &DumpOptions::default())
        .unwrap_err();
    assert!(matches!(e, CriuError::NoSuchProcess { .. }), "{e}");
    assert!(e.to_string().contains("no such process"), "{e}");
}

#[test]
fn old_criu_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("criu");
    fs::write(&fake, "#!/bin/sh\necho 'Version: 3.17'\n").unwrap();
    let mut perm = fs::metadata(&fake).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    fs::set_permissions(&fake, perm).unwrap();
    let criu = Criu::new(CriuConfig::with_binary(&fake));
    for e in [criu.version().unwrap_err(), criu.probe().unwrap_err()] {
        let msg = e.to_string();
        assert!(matches!(e, CriuError::TooOld { .. }), "{msg}");
        assert!(msg.contains("3.17.0"), "{msg}");
        assert!(msg.contains("IPv4 sockets on kernels >= 6.16"), "{msg}");
        assert!(msg.contains("scripts/criu.sh"), "{msg}");
    }
    let missing = Criu::new(CriuConfig::with_binary(dir.path().join("nope")));
    assert!(matches!(missing.version(), Err(CriuError::Spawn { .. })));
}

#[test]
fn lazy_restore_serves_pages_through_the_daemon() {
    let _g = serial();
    let Some(criu) = criu_or_skip("lazy_restore_serves_pages_through_the_daemon") else {
        return;
    };
    if !criu.probe().unwrap().lazy_pages {
        common::say_skip("skipping lazy_restore_serves_pages_through_the_daemon: no uffd-noncoop");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut tree, mut ctl) = spawn_state(dir.path(), 20);
    assert_eq!(ctl.ask("set before"), "ok");
    let sum = ctl.ask("sum");
    let mark = ctl.n;
    let images = dir.path().join("ck");
    criu.dump(tree.root, &images, &DumpOptions::default())
        .unwrap();
    assert_eq!(ctl.ask("set after"), "ok");
    tree.kill();
    ctl.rewind(mark);

    let mut opts = RestoreOptions::default();
    opts.lazy_pages = true;
    let r = criu.restore(&images, &opts).unwrap();
    let _guard = Restored(r.pid);
    eprintln!("lazy restore: pid {} in {:?}", r.pid, r.duration);
    let mut daemon = r.lazy_pages.expect("a lazy-pages daemon");
    assert_eq!(ctl.ask("get"), "before");
    // Touching the whole heap faults every page in through the daemon.
    assert_eq!(ctl.ask("sum"), sum);
    assert!(
        daemon.wait(Duration::from_secs(60)),
        "lazy-pages daemon did not finish; see {}",
        daemon.log().display()
    );
    assert_eq!(ctl.ask("get"), "before");
}

#[test]
fn incremental_dumps_follow_the_probe() {
    let _g = serial();
    let Some(criu) = criu_or_skip("incremental_dumps_follow_the_probe") else {
        return;
    };
    let probe = criu.probe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (tree, mut ctl) = spawn_state(dir.path(), 1);
    let first = dir.path().join("ck1");
    criu.dump(tree.root, &first, &DumpOptions::default())
        .unwrap();
    assert_eq!(ctl.ask("set later"), "ok");
    let mut opts = DumpOptions::default();
    opts.parent = Some(first.clone());
    let second = criu
        .dump(tree.root, &dir.path().join("ck2"), &opts)
        .unwrap();
    // Without dirty tracking the second dump is a full one.
    assert_eq!(second.incremental, probe.mem_dirty_track);
    opts.require_incremental = true;
    let third = criu.dump(tree.root, &dir.path().join("ck3"), &opts);
    if probe.mem_dirty_track {
        assert!(third.unwrap().incremental);
    } else {
        assert!(
            matches!(third, Err(CriuError::NoDirtyTracking)),
            "{third:?}"
        );
    }
}

#[test]
fn restore_after_a_held_file_changed_size_is_explained() {
    let _g = serial();
    let Some(criu) = criu_or_skip("restore_after_a_held_file_changed_size_is_explained") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let held = dir.path().join("held.txt");
    let ready = dir.path().join("ready");
    let prog = format!(
        "import os, time\nf = open({held:?}, 'w'); f.write('abc'); f.flush()\nopen({ready:?}, 'w').close()\nwhile True: time.sleep(1)\n"
    );
    let mut tree = Tree::spawn(&[PYTHON, "-c", &prog], dir.path(), &[]);
    poll("the holder to be ready", Duration::from_secs(30), || {
        ready.exists().then_some(())
    });
    let images = dir.path().join("ck");
    criu.dump(tree.root, &images, &DumpOptions::default())
        .unwrap();
    tree.kill();
    fs::write(&held, b"abcdef").unwrap();
    let e = criu
        .restore(&images, &RestoreOptions::default())
        .unwrap_err();
    assert!(matches!(e, CriuError::FileSizeChanged { .. }), "{e}");
    assert!(e.to_string().contains("O_APPEND"), "{e}");
    // Back to the dumped size, it restores.
    fs::write(&held, b"abc").unwrap();
    let r = criu.restore(&images, &RestoreOptions::default()).unwrap();
    kill_tree(r.pid, Duration::from_secs(10)).unwrap();
}
