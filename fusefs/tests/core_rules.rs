//! Rules of the core: name safety, refused listings, symlinks, read-only trees, TTLs.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

use nbagent_fusefs::{
    Backing, BackingError, Fs, FsConfig, FsError, Listing, ListingError, ManualClock, OpenMode,
    ROOT_INO,
};
use nbagent_protocol::{FileEntry, FileKind, FileRoot};
use nix::libc;

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

/// A backing that serves a fixed listing.
#[derive(Debug)]
struct Fixed(Vec<FileEntry>);

impl Backing for Fixed {
    fn list(&self, _root: FileRoot) -> Result<Listing, BackingError> {
        Ok(Listing {
            writable: false,
            entries: self.0.clone(),
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
    fn upload(
        &self,
        _: FileRoot,
        _: &str,
        _: &str,
        _: &std::path::Path,
    ) -> Result<String, BackingError> {
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
            Arc::new(Fixed(entries)),
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
fn unlinked_open_file_stays_readable_and_writes_stage_until_flush() {
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
    assert_eq!(fs::read(b.path().join("a")).unwrap(), b"hello world");
    fs.release(o.fh).unwrap();
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
