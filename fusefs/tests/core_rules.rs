//! Rules of the core: name safety, refused listings, symlinks, read-only trees, TTLs.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use nbagent_fusefs::{
    Backing, BackingError, Fs, FsConfig, FsError, Listing, ListingError, ManualClock, OpenMode,
    ROOT_INO,
};
use nbagent_protocol::{FileEntry, FileKind, FileRoot};
use nix::libc;
use proptest::prelude::*;

#[test]
fn unsafe_names_are_refused() {
    let b = tempfile::tempdir().unwrap();
    let w = tempfile::tempdir().unwrap();
    fs::write(b.path().join("ok"), "x").unwrap();
    let fs = common::local_fs(b.path(), w.path(), true, None);
    let long = "x".repeat(256);
    let cases: [(&OsStr, i32); 6] = [
        (OsStr::new(".."), libc::EINVAL),
        (OsStr::new("."), libc::EINVAL),
        (OsStr::new("a/b"), libc::EINVAL),
        (OsStr::from_bytes(b"a\0b"), libc::EINVAL),
        (OsStr::new(""), libc::ENOENT),
        (OsStr::new(&long), libc::ENAMETOOLONG),
    ];
    for (name, errno) in cases {
        assert_eq!(
            fs.lookup(ROOT_INO, name).unwrap_err().errno(),
            errno,
            "lookup {name:?}"
        );
        assert_eq!(
            fs.mkdir(ROOT_INO, name).unwrap_err().errno(),
            errno,
            "mkdir {name:?}"
        );
        let w = OpenMode {
            write: true,
            truncate: false,
        };
        assert_eq!(
            fs.create(ROOT_INO, name, w).unwrap_err().errno(),
            errno,
            "create {name:?}"
        );
        assert_eq!(
            fs.rename(ROOT_INO, OsStr::new("ok"), ROOT_INO, name, false)
                .unwrap_err()
                .errno(),
            errno,
            "rename to {name:?}"
        );
    }
    assert_eq!(fs.symlink().unwrap_err().errno(), libc::EPERM);
    assert_eq!(fs.link().unwrap_err().errno(), libc::EPERM);
    // A 255-byte name is fine.
    fs.mkdir(ROOT_INO, OsStr::new(&"y".repeat(255))).unwrap();
}

/// A backing that serves a fixed listing (which a test may replace).
#[derive(Debug)]
struct Fixed(Mutex<Vec<FileEntry>>);

impl Fixed {
    fn new(entries: Vec<FileEntry>) -> Self {
        Fixed(Mutex::new(entries))
    }
}

impl Backing for Fixed {
    fn list(&self, _root: FileRoot) -> Result<Listing, BackingError> {
        Ok(Listing {
            writable: false,
            entries: self.0.lock().unwrap().clone(),
        })
    }
    fn read(
        &self,
        _: FileRoot,
        _: &str,
        _: &str,
        _: u64,
        _: u32,
    ) -> Result<bytes::Bytes, BackingError> {
        Ok(bytes::Bytes::new())
    }
    fn hand_over(
        &self,
        _: FileRoot,
        _: &str,
        _: &str,
        _: &std::path::Path,
    ) -> Result<nbagent_fusefs::Ticket, BackingError> {
        Err(BackingError::ReadOnly)
    }
    fn upload(&self, _: nbagent_fusefs::Ticket) -> Result<String, BackingError> {
        Err(BackingError::ReadOnly)
    }
    fn mkdir(&self, _: FileRoot, _: &str) -> Result<(), BackingError> {
        Err(BackingError::ReadOnly)
    }
    fn remove(&self, _: FileRoot, _: &str, _: FileKind) -> Result<(), BackingError> {
        Err(BackingError::ReadOnly)
    }
    fn rename(&self, _: FileRoot, _: &str, _: &str) -> Result<(), BackingError> {
        Err(BackingError::ReadOnly)
    }
}

fn file(path: &str) -> FileEntry {
    FileEntry {
        path: path.to_owned(),
        kind: FileKind::File,
        size: 0,
        mtime_ms: 0,
        version: "v1".to_owned(),
    }
}

#[test]
fn bad_listings_are_refused_with_a_clear_error() {
    let w = tempfile::tempdir().unwrap();
    let open = |entries: Vec<FileEntry>, max: usize| {
        let mut config = FsConfig::new(FileRoot::Workspace, w.path());
        config.max_entries = max;
        Fs::new(
            config,
            Arc::new(Fixed::new(entries)),
            Arc::new(ManualClock::default()),
        )
    };
    for bad in ["../x", "/etc/passwd", "a/../../etc", "a/./b"] {
        let err = open(vec![file(bad)], 10).unwrap_err();
        let FsError::Backing(BackingError::Listing(ListingError::InvalidPath { path, .. })) = &err
        else {
            panic!("{bad}: {err:?}");
        };
        assert_eq!(path, bad);
        assert_eq!(err.errno(), libc::EIO);
    }
    let many = (0..11).map(|i| file(&format!("f{i}"))).collect();
    let err = open(many, 10).unwrap_err();
    let FsError::Backing(BackingError::Listing(inner)) = &err else {
        panic!("{err:?}");
    };
    assert_eq!(
        inner.to_string(),
        "listing has 11 entries, more than the limit of 10"
    );
    assert!(open(vec![file("a"), file("b/c")], 10).is_ok());
}

#[test]
fn read_only_tree_refuses_every_mutation() {
    let b = tempfile::tempdir().unwrap();
    let w = tempfile::tempdir().unwrap();
    fs::create_dir(b.path().join("d")).unwrap();
    fs::write(b.path().join("f"), "x").unwrap();
    let fs = common::local_fs(b.path(), w.path(), false, None);
    let f = fs.lookup(ROOT_INO, OsStr::new("f")).unwrap();
    assert_eq!(f.perm, 0o444);
    let erofs = |r: Result<(), FsError>| assert_eq!(r.unwrap_err().errno(), libc::EROFS);
    let w = OpenMode {
        write: true,
        truncate: false,
    };
    erofs(fs.open(f.ino, w).map(|_| ()));
    erofs(fs.create(ROOT_INO, OsStr::new("n"), w).map(|_| ()));
    erofs(fs.set_size(f.ino, 0).map(|_| ()));
    erofs(fs.mkdir(ROOT_INO, OsStr::new("n")).map(|_| ()));
    erofs(fs.unlink(ROOT_INO, OsStr::new("f")));
    erofs(fs.rmdir(ROOT_INO, OsStr::new("d")));
    erofs(fs.rename(ROOT_INO, OsStr::new("f"), ROOT_INO, OsStr::new("g"), false));
    // Reading works.
    let o = fs.open(f.ino, OpenMode::default()).unwrap();
    assert_eq!(fs.read(o.fh, 0, 10).unwrap(), &b"x"[..]);
    fs.release(o.fh).unwrap();
}

#[test]
fn attribute_and_negative_caches_follow_the_clock() {
    let b = tempfile::tempdir().unwrap();
    let w = tempfile::tempdir().unwrap();
    fs::write(b.path().join("a"), "1").unwrap();
    let clock = Arc::new(ManualClock::default());
    let fs = common::local_fs(b.path(), w.path(), true, Some(clock.clone()));
    assert_eq!(
        fs.lookup(ROOT_INO, OsStr::new("new")).unwrap_err().errno(),
        libc::ENOENT
    );
    // Appears in the backing behind the core's back.
    fs::write(b.path().join("new"), "22").unwrap();
    fs::write(b.path().join("a"), "333").unwrap();
    clock.advance(Duration::from_secs(30));
    assert!(
        fs.lookup(ROOT_INO, OsStr::new("new")).is_err(),
        "negative entry still valid"
    );
    let a = fs.lookup(ROOT_INO, OsStr::new("a")).unwrap();
    assert_eq!(a.size, 1, "attributes still cached");
    clock.advance(Duration::from_secs(31));
    assert_eq!(
        fs.getattr(a.ino).unwrap().size,
        3,
        "re-listed after the ttl"
    );
    assert_eq!(fs.lookup(ROOT_INO, OsStr::new("new")).unwrap().size, 2);
    let again = fs.lookup(ROOT_INO, OsStr::new("a")).unwrap();
    assert_eq!(again.ino, a.ino, "inode numbers survive a re-listing");
    // Removed behind the core's back: the inode lives on until forgotten.
    fs::remove_file(b.path().join("a")).unwrap();
    clock.advance(Duration::from_secs(61));
    assert!(fs.lookup(ROOT_INO, OsStr::new("a")).is_err());
    let count = fs.inode_count();
    fs.forget(a.ino, 2);
    assert_eq!(fs.inode_count(), count - 1);
}

#[test]
fn unlinked_open_file_stays_readable_and_writes_stage_until_released() {
    let b = tempfile::tempdir().unwrap();
    let w = tempfile::tempdir().unwrap();
    fs::write(b.path().join("a"), "hello").unwrap();
    let fs = common::local_fs(b.path(), w.path(), true, None);
    let a = fs.lookup(ROOT_INO, OsStr::new("a")).unwrap();
    let rw = OpenMode {
        write: true,
        truncate: false,
    };
    let o = fs.open(a.ino, rw).unwrap();
    assert!(o.staged);
    fs.write(o.fh, 5, b" world").unwrap();
    assert_eq!(
        fs::read(b.path().join("a")).unwrap(),
        b"hello",
        "dirty until flushed"
    );
    assert_eq!(fs.getattr(a.ino).unwrap().size, 11);
    fs.flush(o.fh).unwrap();
    // The close hands the file over; the release (which the closing process does
    // not wait for) uploads it.
    assert_eq!(fs::read(b.path().join("a")).unwrap(), b"hello");
    fs.release(o.fh).unwrap();
    assert_eq!(fs::read(b.path().join("a")).unwrap(), b"hello world");
    // Read handle survives unlink.
    let r = fs.open(a.ino, OpenMode::default()).unwrap();
    assert!(
        r.local.is_some(),
        "the uploaded staging copy is the cached content"
    );
    fs.unlink(ROOT_INO, OsStr::new("a")).unwrap();
    assert_eq!(fs.read(r.fh, 0, 100).unwrap(), &b"hello world"[..]);
    fs.release(r.fh).unwrap();
}

#[test]
fn a_written_file_that_vanished_from_the_server_fails_its_close() {
    let b = tempfile::tempdir().unwrap();
    let w = tempfile::tempdir().unwrap();
    fs::create_dir(b.path().join("d")).unwrap();
    fs::write(b.path().join("d/a"), "old").unwrap();
    let clock = Arc::new(ManualClock::default());
    let fs = common::local_fs(b.path(), w.path(), true, Some(clock.clone()));
    let d = fs.lookup(ROOT_INO, OsStr::new("d")).unwrap();
    let a = fs.lookup(d.ino, OsStr::new("a")).unwrap();
    let rw = OpenMode {
        write: true,
        truncate: false,
    };
    let o = fs.open(a.ino, rw).unwrap();
    fs.write(o.fh, 0, b"new").unwrap();
    // The directory goes on the server while the file is being written; a re-listing
    // unlinks it.
    fs::remove_dir_all(b.path().join("d")).unwrap();
    clock.advance(Duration::from_secs(61));
    assert_eq!(
        fs.lookup(ROOT_INO, OsStr::new("d")).unwrap_err().errno(),
        libc::ENOENT
    );
    let err = fs.flush(o.fh).unwrap_err();
    assert!(
        matches!(err, FsError::Vanished { ref path } if path == "d/a"),
        "{err:?}"
    );
    assert_eq!(err.errno(), libc::EIO);
    assert!(fs.release(o.fh).is_err());
    assert!(!b.path().join("d").exists(), "nothing recreated");

    // A file the kernel itself unlinked while writing is discarded quietly (POSIX).
    fs::write(b.path().join("b"), "x").unwrap();
    clock.advance(Duration::from_secs(61));
    let bf = fs.lookup(ROOT_INO, OsStr::new("b")).unwrap();
    let o = fs.open(bf.ino, rw).unwrap();
    fs.write(o.fh, 0, b"yy").unwrap();
    fs.unlink(ROOT_INO, OsStr::new("b")).unwrap();
    fs.release(o.fh).unwrap();
    assert!(!b.path().join("b").exists());
}

/// A local-directory backing that records what reaches it: like the agent's outbox it
/// keeps a hard link to every file handed over instead of a copy; it logs hand-overs,
/// uploads and renames in the order they come; [gated](Observed::gated), its uploads
/// say when they start and wait for a go-ahead.
#[derive(Debug)]
struct Observed {
    inner: nbagent_fusefs::LocalDir,
    keep: tempfile::TempDir,
    links: Mutex<Vec<std::path::PathBuf>>,
    log: Mutex<Vec<String>>,
    /// Paths read from the backing, in order.
    reads: Mutex<Vec<String>>,
    /// Listings taken.
    lists: std::sync::atomic::AtomicUsize,
    gate: Option<Gate>,
}

/// Where a gated operation (`op`: "upload", "read" or "list") says it started, and
/// waits for its go-ahead.
#[derive(Debug)]
struct Gate {
    op: &'static str,
    started: Mutex<mpsc::Sender<()>>,
    go: Mutex<mpsc::Receiver<()>>,
}

impl Observed {
    fn new(tree: &std::path::Path) -> Self {
        Self {
            inner: nbagent_fusefs::LocalDir::new().with_tree(FileRoot::Notebook, tree, true),
            keep: tempfile::tempdir().unwrap(),
            links: Mutex::default(),
            log: Mutex::default(),
            reads: Mutex::default(),
            lists: Default::default(),
            gate: None,
        }
    }

    /// Operations `op` send on `started` and then wait for `go`.
    fn gated(self, op: &'static str, started: mpsc::Sender<()>, go: mpsc::Receiver<()>) -> Self {
        Self {
            gate: Some(Gate {
                op,
                started: Mutex::new(started),
                go: Mutex::new(go),
            }),
            ..self
        }
    }

    fn wait_at_gate(&self, op: &str) {
        if let Some(gate) = self.gate.as_ref().filter(|g| g.op == op) {
            gate.started.lock().unwrap().send(()).unwrap();
            gate.go.lock().unwrap().recv().unwrap();
        }
    }

    /// The contents of the files handed over, as they are now.
    fn linked(&self) -> Vec<Vec<u8>> {
        let links = self.links.lock().unwrap();
        links.iter().map(|p| fs::read(p).unwrap()).collect()
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// A core over this backing, working in `work`.
    fn fs(self: &Arc<Self>, work: &std::path::Path) -> Arc<Fs> {
        self.fs_at(work, Arc::new(nbagent_fusefs::SystemClock))
    }

    fn fs_at(
        self: &Arc<Self>,
        work: &std::path::Path,
        clock: Arc<dyn nbagent_fusefs::Clock>,
    ) -> Arc<Fs> {
        let config = FsConfig::new(FileRoot::Notebook, work);
        Arc::new(Fs::new(config, self.clone(), clock).unwrap())
    }
}

impl Backing for Observed {
    fn list(&self, root: FileRoot) -> Result<Listing, BackingError> {
        // Taken before the gate: a held listing predates what happens meanwhile.
        let listing = self.inner.list(root);
        self.lists.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.wait_at_gate("list");
        listing
    }
    fn read(
        &self,
        root: FileRoot,
        path: &str,
        version: &str,
        offset: u64,
        len: u32,
    ) -> Result<bytes::Bytes, BackingError> {
        self.wait_at_gate("read");
        self.reads.lock().unwrap().push(path.to_owned());
        self.inner.read(root, path, version, offset, len)
    }
    fn hand_over(
        &self,
        root: FileRoot,
        path: &str,
        base: &str,
        staged: &std::path::Path,
    ) -> Result<nbagent_fusefs::Ticket, BackingError> {
        let mut links = self.links.lock().unwrap();
        let link = self.keep.path().join(links.len().to_string());
        fs::hard_link(staged, &link).unwrap();
        links.push(link);
        drop(links);
        self.log.lock().unwrap().push(format!("hand over {path}"));
        self.inner.hand_over(root, path, base, staged)
    }
    fn upload(&self, ticket: nbagent_fusefs::Ticket) -> Result<String, BackingError> {
        self.wait_at_gate("upload");
        let version = self.inner.upload(ticket);
        self.log.lock().unwrap().push("upload".to_owned());
        version
    }
    fn mkdir(&self, root: FileRoot, path: &str) -> Result<(), BackingError> {
        self.inner.mkdir(root, path)
    }
    fn remove(&self, root: FileRoot, path: &str, kind: FileKind) -> Result<(), BackingError> {
        self.inner.remove(root, path, kind)
    }
    fn rename(&self, root: FileRoot, from: &str, to: &str) -> Result<(), BackingError> {
        self.log.lock().unwrap().push(format!("rename {from} {to}"));
        self.inner.rename(root, from, to)
    }
}

#[test]
fn a_file_handed_over_at_close_is_never_written_again() {
    let b = tempfile::tempdir().unwrap();
    let w = tempfile::tempdir().unwrap();
    let backing = Arc::new(Observed::new(b.path()));
    let fs = backing.fs(w.path());
    let rw = OpenMode {
        write: true,
        truncate: false,
    };
    let (a, o1) = fs.create(ROOT_INO, OsStr::new("a"), rw).unwrap();
    fs.write(o1.fh, 0, b"first").unwrap();
    fs.flush(o1.fh).unwrap();
    assert_eq!(backing.linked(), vec![b"first".to_vec()]);

    // A write through the daemon on the same handle after its close (a duplicated
    // descriptor) goes to a copy.
    fs.write(o1.fh, 5, b"+more").unwrap();
    fs.flush(o1.fh).unwrap();
    assert_eq!(
        backing.linked(),
        vec![b"first".to_vec(), b"first+more".to_vec()]
    );

    // fsync hands over a snapshot: the file stays writable in place.
    fs.write(o1.fh, 0, b"F").unwrap();
    fs.fsync(o1.fh).unwrap();
    fs.write(o1.fh, 1, b"I").unwrap();
    assert_eq!(backing.linked()[2], b"First+more");

    // A writer that opens before the last handle is released (a close followed at
    // once by an open: the kernel's RELEASE may still be queued) waits for it, or
    // comes after it; either way it writes a copy.
    fs.flush(o1.fh).unwrap();
    let handed = backing.linked().len();
    let opener = {
        let fs = fs.clone();
        std::thread::spawn(move || {
            let trunc = OpenMode {
                write: true,
                truncate: true,
            };
            let o2 = fs.open(a.ino, trunc).unwrap();
            fs.write(o2.fh, 0, b"second").unwrap();
            fs.flush(o2.fh).unwrap();
            fs.release(o2.fh).unwrap();
        })
    };
    fs.release(o1.fh).unwrap();
    opener.join().unwrap();
    let linked = backing.linked();
    assert_eq!(
        linked[handed - 1],
        b"FIrst+more",
        "the handed-over file is intact"
    );
    assert_eq!(linked.last().unwrap(), b"second");
    assert_eq!(fs::read(b.path().join("a")).unwrap(), b"second");
}

#[test]
fn writes_behind_the_daemons_back_after_another_close_are_uploaded() {
    use std::os::unix::fs::FileExt;
    let b = tempfile::tempdir().unwrap();
    let w = tempfile::tempdir().unwrap();
    fs::write(b.path().join("a"), "0000").unwrap();
    let fs = common::local_fs(b.path(), w.path(), true, None);
    let a = fs.lookup(ROOT_INO, OsStr::new("a")).unwrap();
    let rw = OpenMode {
        write: true,
        truncate: false,
    };
    let o1 = fs.open(a.ino, rw).unwrap();
    let o2 = fs.open(a.ino, rw).unwrap();
    // Passthrough writes go to the staging copy without the core seeing them; the
    // adapter marks a file opened that way dirty.
    fs.mark_dirty(o1.fh);
    fs.mark_dirty(o2.fh);
    let local = o2.local.clone().expect("a staged file has a local copy");
    local.write_all_at(b"1", 0).unwrap();
    fs.flush(o1.fh).unwrap();
    fs.release(o1.fh).unwrap();
    assert_eq!(fs::read(b.path().join("a")).unwrap(), b"1000");
    // The other writer goes on; its close uploads what it wrote.
    local.write_all_at(b"2", 1).unwrap();
    fs.fsync(o2.fh).unwrap();
    assert_eq!(fs::read(b.path().join("a")).unwrap(), b"1200");
    local.write_all_at(b"3", 2).unwrap();
    fs.flush(o2.fh).unwrap();
    fs.release(o2.fh).unwrap();
    assert_eq!(fs::read(b.path().join("a")).unwrap(), b"1230");
}

#[test]
fn a_release_uploads_without_stopping_other_operations_and_before_a_rename() {
    let b = tempfile::tempdir().unwrap();
    let w = tempfile::tempdir().unwrap();
    fs::write(b.path().join("a"), "old").unwrap();
    fs::write(b.path().join("other"), "other bytes").unwrap();
    let (started_tx, started) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let backing = Arc::new(Observed::new(b.path()).gated("upload", started_tx, go_rx));
    let fs = backing.fs(w.path());
    let a = fs.lookup(ROOT_INO, OsStr::new("a")).unwrap();
    let rw = OpenMode {
        write: true,
        truncate: true,
    };
    let o = fs.open(a.ino, rw).unwrap();
    fs.write(o.fh, 0, b"new content").unwrap();
    // The close hands the file over without uploading it.
    fs.flush(o.fh).unwrap();
    assert_eq!(backing.log(), ["hand over a"]);
    assert_eq!(fs::read(b.path().join("a")).unwrap(), b"old");
    // The release uploads it; it is held inside the backing's upload.
    let releasing = {
        let fs = fs.clone();
        std::thread::spawn(move || fs.release(o.fh))
    };
    started.recv().unwrap();
    // Meanwhile another file is looked up, opened and read, and `a` is stat'ed.
    let (done_tx, done) = std::sync::mpsc::channel();
    {
        let fs = fs.clone();
        std::thread::spawn(move || {
            let other = fs.lookup(ROOT_INO, OsStr::new("other")).unwrap();
            let h = fs.open(other.ino, OpenMode::default()).unwrap();
            let bytes = fs.read(h.fh, 0, 100).unwrap();
            fs.release(h.fh).unwrap();
            let size = fs.getattr(a.ino).unwrap().size;
            done_tx.send((bytes, size)).unwrap();
        });
    }
    let (bytes, size) = done
        .recv_timeout(Duration::from_secs(30))
        .expect("other operations waited for the upload");
    assert_eq!(&bytes[..], b"other bytes");
    assert_eq!(size, 11);
    // A rename of `a` now comes after the upload whatever the timing.
    let renaming = {
        let fs = fs.clone();
        std::thread::spawn(move || {
            fs.rename(ROOT_INO, OsStr::new("a"), ROOT_INO, OsStr::new("c"), false)
        })
    };
    go.send(()).unwrap();
    releasing.join().unwrap().unwrap();
    renaming.join().unwrap().unwrap();
    assert_eq!(backing.log(), ["hand over a", "upload", "rename a c"]);
    assert_eq!(fs::read(b.path().join("c")).unwrap(), b"new content");
    assert!(!b.path().join("a").exists());
}

#[test]
fn an_open_that_fetches_from_the_server_does_not_stop_other_operations() {
    let b = tempfile::tempdir().unwrap();
    let w = tempfile::tempdir().unwrap();
    fs::write(b.path().join("small"), "small bytes").unwrap();
    fs::write(b.path().join("edit"), "to be appended").unwrap();
    fs::write(b.path().join("other"), "other").unwrap();
    let (started_tx, started) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let backing = Arc::new(Observed::new(b.path()).gated("read", started_tx, go_rx));
    let fs = backing.fs(w.path());
    let rw = OpenMode {
        write: true,
        truncate: false,
    };
    // A reader of a small file (fetched whole at open) and a writer (its staging copy
    // starts from the whole file), each held inside the backing's read.
    for (name, mode) in [("small", OpenMode::default()), ("edit", rw)] {
        let ino = fs.lookup(ROOT_INO, OsStr::new(name)).unwrap().ino;
        let opening = {
            let fs = fs.clone();
            std::thread::spawn(move || fs.open(ino, mode))
        };
        started.recv().unwrap();
        // Meanwhile: lookups, getattrs, a listing and a create that need no server.
        let (done_tx, done) = mpsc::channel();
        {
            let fs = fs.clone();
            std::thread::spawn(move || {
                let other = fs.lookup(ROOT_INO, OsStr::new("other")).unwrap();
                let size = fs.getattr(other.ino).unwrap().size;
                let dir = fs.opendir(ROOT_INO).unwrap();
                let listed = fs.readdir(dir, 0).unwrap().len();
                fs.releasedir(dir);
                done_tx.send((size, listed)).unwrap();
            });
        }
        let (size, listed) = done
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("other operations waited for the open of {name}"));
        assert_eq!((size, listed), (5, 3));
        go.send(()).unwrap();
        let opened = opening.join().unwrap().unwrap();
        if mode.write {
            fs.write(opened.fh, 14, b"!").unwrap();
            fs.fsync(opened.fh).unwrap();
            assert_eq!(fs::read(b.path().join("edit")).unwrap(), b"to be appended!");
        } else {
            assert!(
                opened.local.is_some(),
                "the small file is in the cache once open"
            );
            assert_eq!(&fs.read(opened.fh, 0, 100).unwrap()[..], b"small bytes");
        }
        fs.release(opened.fh).unwrap();
    }
}

#[test]
fn a_relisting_does_not_stop_other_operations_and_misses_no_change_made_meanwhile() {
    let b = tempfile::tempdir().unwrap();
    let w = tempfile::tempdir().unwrap();
    fs::write(b.path().join("a"), "alpha").unwrap();
    let (started_tx, started) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let backing = Arc::new(Observed::new(b.path()).gated("list", started_tx, go_rx));
    let clock = Arc::new(ManualClock::default());
    let fs = {
        let (backing, clock, work) = (backing.clone(), clock.clone(), w.path().to_owned());
        let building = std::thread::spawn(move || backing.fs_at(&work, clock));
        started.recv().unwrap();
        go.send(()).unwrap();
        building.join().unwrap()
    };
    let a = fs.lookup(ROOT_INO, OsStr::new("a")).unwrap().ino;
    let lists = || backing.lists.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(lists(), 1);
    let rw = OpenMode {
        write: true,
        truncate: true,
    };
    for round in ["quiet", "a directory made meanwhile"] {
        fs::write(b.path().join("b"), round).unwrap(); // behind the core's back
        clock.advance(Duration::from_secs(61));
        let before = lists();
        let relisting = {
            let fs = fs.clone();
            std::thread::spawn(move || fs.lookup(ROOT_INO, OsStr::new("b")))
        };
        started
            .recv_timeout(Duration::from_secs(30))
            .expect("a stale tree is listed again");
        // The listing is held: other operations go on with the tree as it was.
        let (done_tx, done) = mpsc::channel();
        {
            let fs = fs.clone();
            std::thread::spawn(move || {
                let size = fs.getattr(a).unwrap().size;
                let h = fs.open(a, OpenMode::default()).unwrap();
                let bytes = fs.read(h.fh, 0, 100).unwrap();
                fs.release(h.fh).unwrap();
                done_tx.send((size, bytes)).unwrap();
            });
        }
        let (size, bytes) = done
            .recv_timeout(Duration::from_secs(30))
            .expect("operations waited for the re-listing");
        assert_eq!((size, &bytes[..]), (5, &b"alpha"[..]));
        let made = round != "quiet";
        if made {
            // A change here while the held listing (taken before it) is on its way.
            fs.mkdir(ROOT_INO, OsStr::new("made")).unwrap();
            let (_, o) = fs.create(ROOT_INO, OsStr::new("new"), rw).unwrap();
            fs.write(o.fh, 0, b"written").unwrap();
            fs.release(o.fh).unwrap();
        }
        go.send(()).unwrap();
        if made {
            // ... so the listing is taken again, with the change in it.
            started
                .recv_timeout(Duration::from_secs(30))
                .expect("a listing that may predate a change is taken again");
            go.send(()).unwrap();
        }
        let b_attr = relisting.join().unwrap().unwrap();
        assert_eq!(
            b_attr.size,
            round.len() as u64,
            "{round}: the new listing applies"
        );
        assert_eq!(lists() - before, 1 + usize::from(made), "{round}");
        if made {
            assert_eq!(
                fs.lookup(ROOT_INO, OsStr::new("made")).unwrap().kind,
                FileKind::Dir
            );
            assert_eq!(fs.lookup(ROOT_INO, OsStr::new("new")).unwrap().size, 7);
        }
    }
}

#[test]
fn opening_a_file_fetches_the_next_small_files_of_its_directory_once() {
    let b = tempfile::tempdir().unwrap();
    let w = tempfile::tempdir().unwrap();
    fs::create_dir(b.path().join("d")).unwrap();
    for i in 0..20 {
        fs::write(b.path().join(format!("d/f{i:02}")), format!("file {i}")).unwrap();
    }
    fs::write(b.path().join("d/f05"), vec![7u8; 2 << 20]).unwrap(); // above 1 MiB
    let backing = Arc::new(Observed::new(b.path()));
    let fs = backing.fs(w.path());
    let d = fs.lookup(ROOT_INO, OsStr::new("d")).unwrap().ino;
    let reads_of = |name: &str| {
        let path = format!("d/{name}");
        backing
            .reads
            .lock()
            .unwrap()
            .iter()
            .filter(|p| **p == path)
            .count()
    };
    // Files f00..f08 opened and read in order, as a loop over the directory does.
    for i in 0..9 {
        let name = format!("f{i:02}");
        let ino = fs.lookup(d, OsStr::new(&name)).unwrap().ino;
        let h = fs.open(ino, OpenMode::default()).unwrap();
        let want = if i == 5 {
            vec![7u8; 100]
        } else {
            format!("file {i}").into_bytes()
        };
        assert_eq!(&fs.read(h.fh, 0, 100).unwrap()[..], &want[..]);
        fs.release(h.fh).unwrap();
    }
    // The opens of f00..f08 fetched the eight files after each: f01..f16 in the
    // background, f17 and later not at all.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while (1..=16).any(|i| reads_of(&format!("f{i:02}")) == 0) {
        assert!(std::time::Instant::now() < deadline, "{:?}", backing.reads);
        std::thread::yield_now();
    }
    for i in 0..20 {
        let name = format!("f{i:02}");
        // Once: an open waits for the fetch in flight. f05 is above the limit: only
        // its own open fetched it.
        let expected = usize::from(i <= 16);
        assert_eq!(reads_of(&name), expected, "backing reads of {name}");
    }
}

#[test]
fn a_readers_close_leaves_a_writers_file_to_the_writer() {
    let b = tempfile::tempdir().unwrap();
    let w = tempfile::tempdir().unwrap();
    fs::write(b.path().join("a"), "old").unwrap();
    let fs = common::local_fs(b.path(), w.path(), true, None);
    let a = fs.lookup(ROOT_INO, OsStr::new("a")).unwrap();
    let writer = fs
        .open(
            a.ino,
            OpenMode {
                write: true,
                truncate: true,
            },
        )
        .unwrap();
    fs.write(writer.fh, 0, b"half").unwrap();
    let reader = fs.open(a.ino, OpenMode::default()).unwrap();
    assert_eq!(&fs.read(reader.fh, 0, 100).unwrap()[..], b"half");
    // The reader goes while the writer is still at work: nothing is uploaded.
    fs.release(reader.fh).unwrap();
    assert_eq!(fs::read(b.path().join("a")).unwrap(), b"old");
    fs.write(writer.fh, 4, b" and the rest").unwrap();
    fs.flush(writer.fh).unwrap();
    fs.release(writer.fh).unwrap();
    assert_eq!(fs::read(b.path().join("a")).unwrap(), b"half and the rest");
    // A reader alone with a dirty file (a size change of an open file) uploads it.
    let reader = fs.open(a.ino, OpenMode::default()).unwrap();
    fs.set_size(a.ino, 4).unwrap();
    fs.release(reader.fh).unwrap();
    assert_eq!(fs::read(b.path().join("a")).unwrap(), b"half");
}

/// Path -> kind, size and inode, as the core shows a tree (through `readdir`).
type Shown = BTreeMap<String, (FileKind, u64, u64)>;

fn walk(fs: &Fs) -> Shown {
    let mut out = Shown::new();
    let mut stack = vec![(ROOT_INO, String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let fh = fs.opendir(dir).unwrap();
        for e in fs.readdir(fh, 0).unwrap() {
            let path = if prefix.is_empty() {
                e.name.clone()
            } else {
                format!("{prefix}/{}", e.name)
            };
            if e.attr.kind == FileKind::Dir {
                stack.push((e.attr.ino, path.clone()));
            }
            out.insert(path, (e.attr.kind, e.attr.size, e.attr.ino));
        }
        fs.releasedir(fh);
    }
    out
}

/// A server tree from generated paths: what a listing holds (a path under another
/// becomes a directory; the directories not generated stay implicit) and what the
/// core must show (every directory).
fn server_tree(
    generated: &[(Vec<&str>, bool, u8)],
) -> (Vec<FileEntry>, BTreeMap<String, (FileKind, u64)>) {
    let mut listed: BTreeMap<String, (FileKind, u64)> = BTreeMap::new();
    for (parts, dir, size) in generated {
        let kind = if *dir { FileKind::Dir } else { FileKind::File };
        let size = if *dir { 0 } else { u64::from(*size) };
        listed.insert(parts.join("/"), (kind, size));
    }
    let mut shown = listed.clone();
    for path in listed.keys() {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            shown.insert(path[..end + i].to_owned(), (FileKind::Dir, 0));
            end += i + 1;
        }
    }
    for (path, entry) in listed.iter_mut() {
        *entry = shown[path];
    }
    let entries = listed
        .into_iter()
        .map(|(path, (kind, size))| FileEntry {
            path,
            kind,
            size,
            mtime_ms: 0,
            version: if kind == FileKind::File {
                format!("v{size}")
            } else {
                String::new()
            },
        })
        .collect();
    (entries, shown)
}

fn generated_tree() -> impl Strategy<Value = Vec<(Vec<&'static str>, bool, u8)>> {
    let part = prop::sample::select(vec!["a", "b", "c", "d"]);
    prop::collection::vec(
        (
            prop::collection::vec(part, 1..=3),
            any::<bool>(),
            any::<u8>(),
        ),
        0..12,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The server's tree changes behind the core's back (files become directories and
    /// back, whole subtrees come and go): after the TTL the core shows exactly the new
    /// tree, what stayed (same path, same kind) keeps its inode, and nothing new gets
    /// an inode of the old tree.
    #[test]
    fn a_relisting_shows_the_new_tree_and_keeps_the_inodes_of_what_stayed(
        old in generated_tree(),
        new in generated_tree(),
    ) {
        let (old_entries, old_shown) = server_tree(&old);
        let (new_entries, new_shown) = server_tree(&new);
        let backing = Arc::new(Fixed::new(old_entries));
        let clock = Arc::new(ManualClock::default());
        let w = tempfile::tempdir().unwrap();
        let fs = Fs::new(
            FsConfig::new(FileRoot::Workspace, w.path()),
            backing.clone(),
            clock.clone(),
        )
        .unwrap();
        let shape = |s: &Shown| -> BTreeMap<String, (FileKind, u64)> {
            s.iter().map(|(p, &(k, size, _))| (p.clone(), (k, size))).collect()
        };
        let before = walk(&fs);
        prop_assert_eq!(shape(&before), old_shown);

        *backing.0.lock().unwrap() = new_entries;
        clock.advance(Duration::from_secs(61));
        let after = walk(&fs);
        prop_assert_eq!(shape(&after), new_shown);
        let old_inos: BTreeSet<u64> = before.values().map(|&(_, _, ino)| ino).collect();
        for (path, &(kind, _, ino)) in &after {
            match before.get(path) {
                Some(&(old_kind, _, old_ino)) if old_kind == kind => {
                    prop_assert_eq!(ino, old_ino, "{} kept its inode", path);
                }
                _ => prop_assert!(!old_inos.contains(&ino), "{} got an old inode", path),
            }
        }
        for path in before.keys().filter(|p| !after.contains_key(*p)) {
            let (parent, name) = match path.rsplit_once('/') {
                Some((dir, name)) => match after.get(dir) {
                    Some(&(FileKind::Dir, _, ino)) => (ino, name),
                    _ => continue,
                },
                None => (ROOT_INO, path.as_str()),
            };
            prop_assert_eq!(
                fs.lookup(parent, OsStr::new(name)).unwrap_err().errno(),
                libc::ENOENT
            );
        }
    }
}
