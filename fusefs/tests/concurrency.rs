//! The core used from several threads at once, as FUSE worker threads use it: writers
//! that close (hand over) and release (upload without the core lock), fsyncs, readers
//! and renames of the same few files never deadlock, and each file ends with the whole
//! content of one write, the same through the core as in the backing.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::ffi::OsStr;
use std::fs;
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use nbagent_fusefs::{Fs, FsError, OpenMode, ROOT_INO};

const FILES: u64 = 3;
const THREADS: u64 = 4;
const ROUNDS: u64 = 150;

/// What thread `t` writes in round `i`: one tag repeated, so that a mix of two writes
/// shows.
fn content(t: u64, i: u64) -> Vec<u8> {
    format!("t{t}i{i};").repeat(1500).into_bytes()
}

fn is_whole(bytes: &[u8]) -> bool {
    let text = std::str::from_utf8(bytes).unwrap();
    let mut tags = text.split_terminator(';');
    let Some(first) = tags.next() else {
        return false;
    };
    tags.all(|t| t == first) && text.ends_with(';')
}

/// xorshift64: the same schedule of operations for a given seed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// `result`, or `None` if the name was renamed away by another thread meanwhile.
fn unless_gone<T>(result: Result<T, FsError>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(FsError::NotFound) => None,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn write_whole(fs: &Fs, name: &str, bytes: &[u8], fsync: bool) {
    let Some(attr) = unless_gone(fs.lookup(ROOT_INO, OsStr::new(name))) else {
        return;
    };
    let mode = OpenMode {
        write: true,
        truncate: true,
    };
    let opened = fs.open(attr.ino, mode).unwrap();
    fs.write(opened.fh, 0, bytes).unwrap();
    if fsync {
        fs.fsync(opened.fh).unwrap();
    }
    fs.flush(opened.fh).unwrap();
    fs.release(opened.fh).unwrap();
    fs.forget(attr.ino, 1);
}

fn read_all(fs: &Fs, name: &str) -> Option<Vec<u8>> {
    let attr = unless_gone(fs.lookup(ROOT_INO, OsStr::new(name)))?;
    let opened = fs.open(attr.ino, OpenMode::default()).unwrap();
    let bytes = fs.read(opened.fh, 0, 1 << 20).unwrap().to_vec();
    fs.release(opened.fh).unwrap();
    fs.forget(attr.ino, 1);
    Some(bytes)
}

#[test]
fn concurrent_writers_readers_and_renames_settle_on_whole_contents() {
    let b = tempfile::tempdir().unwrap();
    let w = tempfile::tempdir().unwrap();
    for f in 0..FILES {
        fs::write(b.path().join(format!("f{f}")), content(99, 0)).unwrap();
    }
    let fs = Arc::new(common::local_fs(b.path(), w.path(), true, None));
    let (done_tx, done) = mpsc::channel();
    for t in 0..THREADS {
        let (fs, done_tx) = (fs.clone(), done_tx.clone());
        thread::spawn(move || {
            let mut rng = t * 7919 + 1;
            for i in 0..ROUNDS {
                let name = format!("f{}", next(&mut rng) % FILES);
                match next(&mut rng) % 8 {
                    0..=3 => {
                        write_whole(&fs, &name, &content(t, i), next(&mut rng).is_multiple_of(4))
                    }
                    4..=6 => {
                        // A read while another thread writes may see that write under
                        // way: only the final contents must be whole.
                        let _ = read_all(&fs, &name);
                    }
                    _ => {
                        let away = format!("away{t}");
                        let renamed = fs.rename(
                            ROOT_INO,
                            OsStr::new(&name),
                            ROOT_INO,
                            OsStr::new(&away),
                            false,
                        );
                        if unless_gone(renamed).is_some() {
                            fs.rename(
                                ROOT_INO,
                                OsStr::new(&away),
                                ROOT_INO,
                                OsStr::new(&name),
                                false,
                            )
                            .unwrap();
                        }
                    }
                }
            }
            done_tx.send(t).unwrap();
        });
    }
    for _ in 0..THREADS {
        done.recv_timeout(Duration::from_secs(120))
            .expect("a thread is stuck: a deadlock in the core?");
    }
    // A namespace change comes after every upload handed over before it.
    fs.mkdir(ROOT_INO, OsStr::new("after")).unwrap();
    for f in 0..FILES {
        let name = format!("f{f}");
        let stored = fs::read(b.path().join(&name)).unwrap();
        assert!(
            is_whole(&stored),
            "{name} in the backing is a mix of writes"
        );
        let seen = read_all(&fs, &name).expect("the file is there");
        assert!(
            seen == stored,
            "{name}: the core shows {} bytes ({}), the backing holds {} ({})",
            seen.len(),
            String::from_utf8_lossy(&seen[..seen.len().min(12)]),
            stored.len(),
            String::from_utf8_lossy(&stored[..stored.len().min(12)]),
        );
    }
}
