//! Real FUSE mounts over a local-directory backing. Skipped (with the reason) without
//! root or /dev/fuse.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nbagent_fusefs::fuse::is_mounted;
use nbagent_fusefs::{Fs, FsConfig, LocalDir, MountOptions, Mounted, SystemClock, mount};
use nbagent_protocol::FileRoot;

fn mount_local(backing: &Path, work: &Path, mnt: &Path, writable: bool) -> Mounted {
    let root = FileRoot::Notebook;
    let b = LocalDir::new().with_tree(root, backing, writable);
    let fs = Fs::new(
        FsConfig::new(root, work),
        Arc::new(b),
        Arc::new(SystemClock),
    )
    .unwrap();
    if !is_mounted(mnt).unwrap() {
        fs::create_dir_all(mnt).unwrap();
    }
    mount(Arc::new(fs), mnt, &MountOptions::default()).unwrap()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

#[test]
fn read_and_write_through_a_mount() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let (b, w, mnt) = (t.path().join("b"), t.path().join("w"), t.path().join("mnt"));
    fs::create_dir_all(b.join("data")).unwrap();
    let big = pattern(20 << 20); // larger than fetch_whole_below: served by reads first
    fs::write(b.join("data/big.bin"), &big).unwrap();
    fs::write(b.join("data/t.csv"), "name,value\nalpha,1\nbeta,2\n").unwrap();
    let m = mount_local(&b, &w, &mnt, true);
    assert!(is_mounted(&mnt).unwrap());

    assert_eq!(fs::read(mnt.join("data/big.bin")).unwrap(), big);
    // Reading it again comes from the complete cache (passthrough when available).
    let before = m.fs().reads_served();
    assert_eq!(fs::read(mnt.join("data/big.bin")).unwrap(), big);
    if m.passthrough() {
        assert_eq!(
            m.fs().reads_served(),
            before,
            "passthrough reads never reach the daemon"
        );
    }
    let mut names: Vec<_> = fs::read_dir(mnt.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["big.bin", "t.csv"]);

    // A CSV through Python's csv module, else std.
    let csv = mnt.join("data/t.csv");
    let py = Command::new("python3")
        .args([
            "-c",
            "import csv,sys; r=list(csv.DictReader(open(sys.argv[1]))); print(len(r), r[1]['value'])",
        ])
        .arg(&csv)
        .output();
    match py {
        Ok(out) if out.status.success() => {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2 2");
        }
        _ => {
            eprintln!("python3 not usable; reading the csv with std");
            let text = fs::read_to_string(&csv).unwrap();
            let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split(',').collect()).collect();
            assert_eq!(rows[2], ["beta", "2"]);
        }
    }

    // New file: written, closed (handed over), uploaded before the next namespace
    // operation, whenever the kernel's RELEASE comes.
    let new = pattern(3 << 20);
    let mut f = fs::File::create(mnt.join("data/out.bin")).unwrap();
    f.write_all(&new).unwrap();
    drop(f);
    assert_eq!(
        fs::metadata(mnt.join("data/out.bin")).unwrap().len(),
        new.len() as u64
    );
    fs::create_dir(mnt.join("out")).unwrap();
    assert_eq!(fs::read(b.join("data/out.bin")).unwrap(), new);
    // Overwrite an existing file, then append: the kernel sends the RELEASE of each
    // handle asynchronously after close(2), and the upload happens there.
    fs::write(mnt.join("data/t.csv"), "name,value\n").unwrap();
    let mut f = OpenOptions::new()
        .append(true)
        .open(mnt.join("data/t.csv"))
        .unwrap();
    f.write_all(b"gamma,3\n").unwrap();
    drop(f);
    let want = "name,value\ngamma,3\n";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while fs::read_to_string(b.join("data/t.csv")).unwrap() != want
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(fs::read_to_string(b.join("data/t.csv")).unwrap(), want);
    // Namespace operations reach the backing.
    fs::rename(mnt.join("data/out.bin"), mnt.join("out/moved.bin")).unwrap();
    assert_eq!(fs::read(b.join("out/moved.bin")).unwrap(), new);
    fs::remove_file(mnt.join("out/moved.bin")).unwrap();
    fs::remove_dir(mnt.join("out")).unwrap();
    assert!(!b.join("out").exists());
    let err = fs::remove_dir(mnt.join("data")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::ENOTEMPTY));
    // No symlinks.
    let err = std::os::unix::fs::symlink("/etc/passwd", mnt.join("link")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EPERM));

    drop(m);
    assert!(!is_mounted(&mnt).unwrap(), "unmounted on drop");
    let table = fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!table.contains(mnt.to_str().unwrap()));
}

#[test]
fn read_only_tree_refuses_writes_with_erofs() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let (b, w, mnt) = (t.path().join("b"), t.path().join("w"), t.path().join("mnt"));
    fs::create_dir_all(&b).unwrap();
    fs::write(b.join("ro.txt"), "fixed").unwrap();
    let m = mount_local(&b, &w, &mnt, false);
    assert_eq!(fs::read_to_string(mnt.join("ro.txt")).unwrap(), "fixed");
    let err = fs::File::create(mnt.join("new.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30));
    let err = OpenOptions::new()
        .write(true)
        .open(mnt.join("ro.txt"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30));
    let err = fs::remove_file(mnt.join("ro.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(30));
    m.unmount().unwrap();
    assert!(!is_mounted(&mnt).unwrap());
}

const HELPER_ENV: &str = "NBAGENT_FUSEFS_STALE_HELPER";

/// Not a test on its own: the child process of `stale_mount_is_detached_and_remounted`,
/// which mounts and then waits to be killed.
#[test]
fn stale_helper() {
    let Ok(dir) = std::env::var(HELPER_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let m = mount_local(&dir.join("b"), &dir.join("w1"), &dir.join("mnt"), true);
    println!("\nNBAGENT-HELPER-MOUNTED");
    std::io::stdout().flush().unwrap();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(m);
}

#[test]
fn stale_mount_is_detached_and_remounted() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    fs::create_dir_all(t.path().join("b")).unwrap();
    fs::write(t.path().join("b/f.txt"), "still here").unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["stale_helper", "--exact", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, t.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mounted = BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("NBAGENT-HELPER-MOUNTED"));
    assert!(mounted, "helper did not mount");
    child.kill().unwrap();
    child.wait().unwrap();
    let mnt = t.path().join("mnt");
    // The daemon is dead: the mount is still there and every access fails.
    assert!(is_mounted(&mnt).unwrap());
    let err = fs::metadata(mnt.join("f.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::ENOTCONN));

    let m = mount_local(&t.path().join("b"), &t.path().join("w2"), &mnt, true);
    assert_eq!(fs::read_to_string(mnt.join("f.txt")).unwrap(), "still here");
    drop(m);
    assert!(!is_mounted(&mnt).unwrap());
}

#[test]
fn metadata_requests_make_a_worker_poll_and_the_mount_still_serves_and_unmounts() {
    require_fuse!();
    let t = tempfile::tempdir().unwrap();
    let (b, w) = (t.path().join("b"), t.path().join("w"));
    fs::create_dir_all(&b).unwrap();
    fs::write(b.join("a.txt"), "alpha").unwrap();
    let root = FileRoot::Notebook;
    let mut mounts = Vec::new();
    for (name, window) in [
        ("polled", Duration::from_secs(3600)),
        ("never", Duration::ZERO),
    ] {
        let fs = Fs::new(
            FsConfig::new(root, w.join(name)),
            Arc::new(LocalDir::new().with_tree(root, &b, true)),
            Arc::new(SystemClock),
        )
        .unwrap();
        let mnt = t.path().join(name);
        fs::create_dir_all(&mnt).unwrap();
        let mut options = MountOptions::default();
        options.busy_poll = window;
        let m = mount(Arc::new(fs), &mnt, &options).unwrap();
        // A lookup and a getattr (metadata), then a read, a write and a listing: served
        // whether or not a worker polls.
        assert_eq!(fs::metadata(mnt.join("a.txt")).unwrap().len(), 5);
        assert_eq!(fs::read_to_string(mnt.join("a.txt")).unwrap(), "alpha");
        let mut f = fs::File::create(mnt.join(format!("{name}.txt"))).unwrap();
        f.write_all(name.as_bytes()).unwrap();
        f.sync_all().unwrap(); // uploads to the backing
        drop(f);
        let listed = fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name());
        assert!(listed.into_iter().any(|n| n == *format!("{name}.txt")));
        mounts.push((name, m, mnt));
    }
    for (name, m, mnt) in mounts {
        // The hour-long window cannot have passed: the polled mount is still polling.
        assert_eq!(m.polling(), name == "polled", "{name}");
        m.unmount().unwrap();
        assert!(!is_mounted(&mnt).unwrap(), "{name} unmounted");
        assert_eq!(
            fs::read_to_string(b.join(format!("{name}.txt"))).unwrap(),
            name
        );
    }
}
