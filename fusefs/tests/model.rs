//! Property test of the core against a simple model: random sequences of operations give
//! the same results (values and errnos) in the core as in a `BTreeMap` of path -> node,
//! and after every step the core's tree and the backing directory both match the model.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

mod common;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nbagent_fusefs::{Fs, ManualClock, OpenMode, ROOT_INO};
use nbagent_protocol::FileKind;
use nix::libc;
use proptest::prelude::*;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    File(Vec<u8>),
    Dir,
}

type P = Vec<&'static str>;

#[derive(Debug, Clone)]
enum Op {
    Create(P),
    Write(P, u16, Vec<u8>),
    Truncate(P, u8),
    Rename(P, P, bool),
    Unlink(P),
    Mkdir(P),
    Rmdir(P),
    Lookup(P),
    Forget(P),
    Read(P),
    Tick,
}

fn path() -> impl Strategy<Value = P> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..=3)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => path().prop_map(Op::Create),
        3 => (path(), 0u16..64, prop::collection::vec(any::<u8>(), 0..32))
            .prop_map(|(p, o, d)| Op::Write(p, o, d)),
        1 => (path(), 0u8..64).prop_map(|(p, s)| Op::Truncate(p, s)),
        2 => (path(), path(), any::<bool>()).prop_map(|(a, b, n)| Op::Rename(a, b, n)),
        1 => path().prop_map(Op::Unlink),
        3 => path().prop_map(Op::Mkdir),
        1 => path().prop_map(Op::Rmdir),
        1 => path().prop_map(Op::Lookup),
        1 => path().prop_map(Op::Forget),
        1 => path().prop_map(Op::Read),
        1 => Just(Op::Tick),
    ]
}

#[derive(Debug, Default)]
struct Model {
    nodes: BTreeMap<String, Node>,
}

fn join(p: &[&str]) -> String {
    p.join("/")
}

impl Model {
    /// Errno of walking to a directory.
    fn dir(&self, p: &[&str]) -> Result<(), i32> {
        for i in 1..=p.len() {
            match self.nodes.get(&join(&p[..i])) {
                None => return Err(libc::ENOENT),
                Some(Node::File(_)) => return Err(libc::ENOTDIR),
                Some(Node::Dir) => {}
            }
        }
        Ok(())
    }

    fn get(&self, p: &[&str]) -> Result<&Node, i32> {
        self.dir(&p[..p.len() - 1])?;
        self.nodes.get(&join(p)).ok_or(libc::ENOENT)
    }

    fn is_empty_dir(&self, path: &str) -> bool {
        let prefix = format!("{path}/");
        !self.nodes.keys().any(|k| k.starts_with(&prefix))
    }

    fn apply(&mut self, op: &Op) -> Result<Option<Vec<u8>>, i32> {
        match op {
            Op::Create(p) => {
                self.dir(&p[..p.len() - 1])?;
                if self.nodes.contains_key(&join(p)) {
                    return Err(libc::EEXIST);
                }
                self.nodes.insert(join(p), Node::File(Vec::new()));
            }
            Op::Write(p, off, data) => {
                let Node::File(_) = self.get(p)? else {
                    return Err(libc::EISDIR);
                };
                if let Some(Node::File(c)) = self.nodes.get_mut(&join(p))
                    && !data.is_empty()
                {
                    let end = *off as usize + data.len();
                    if c.len() < end {
                        c.resize(end, 0);
                    }
                    c[*off as usize..end].copy_from_slice(data);
                }
            }
            Op::Truncate(p, size) => {
                let Node::File(_) = self.get(p)? else {
                    return Err(libc::EISDIR);
                };
                if let Some(Node::File(c)) = self.nodes.get_mut(&join(p)) {
                    c.resize(*size as usize, 0);
                }
            }
            Op::Rename(from, to, noreplace) => {
                self.dir(&from[..from.len() - 1])?;
                self.dir(&to[..to.len() - 1])?;
                let (f, t) = (join(from), join(to));
                let src = self.nodes.get(&f).cloned().ok_or(libc::ENOENT)?;
                let dst = self.nodes.get(&t).cloned();
                if *noreplace && dst.is_some() {
                    return Err(libc::EEXIST);
                }
                let to_parent = join(&to[..to.len() - 1]);
                if to_parent == f || to_parent.starts_with(&format!("{f}/")) {
                    return Err(libc::EINVAL);
                }
                if f == t {
                    return Ok(None);
                }
                match (&src, &dst) {
                    (Node::Dir, Some(Node::File(_))) => return Err(libc::ENOTDIR),
                    (Node::File(_), Some(Node::Dir)) => return Err(libc::EISDIR),
                    (Node::Dir, Some(Node::Dir)) if !self.is_empty_dir(&t) => {
                        return Err(libc::ENOTEMPTY);
                    }
                    _ => {}
                }
                self.nodes.remove(&t);
                let prefix = format!("{f}/");
                let moved: Vec<String> = self
                    .nodes
                    .keys()
                    .filter(|k| **k == f || k.starts_with(&prefix))
                    .cloned()
                    .collect();
                for k in moved {
                    if let Some(n) = self.nodes.remove(&k) {
                        self.nodes.insert(format!("{t}{}", &k[f.len()..]), n);
                    }
                }
            }
            Op::Unlink(p) => match self.get(p)? {
                Node::Dir => return Err(libc::EISDIR),
                Node::File(_) => {
                    self.nodes.remove(&join(p));
                }
            },
            Op::Mkdir(p) => {
                self.dir(&p[..p.len() - 1])?;
                if self.nodes.contains_key(&join(p)) {
                    return Err(libc::EEXIST);
                }
                self.nodes.insert(join(p), Node::Dir);
            }
            Op::Rmdir(p) => match self.get(p)? {
                Node::File(_) => return Err(libc::ENOTDIR),
                Node::Dir if !self.is_empty_dir(&join(p)) => return Err(libc::ENOTEMPTY),
                Node::Dir => {
                    self.nodes.remove(&join(p));
                }
            },
            Op::Lookup(p) | Op::Forget(p) => {
                self.get(p)?;
            }
            Op::Read(p) => match self.get(p)? {
                Node::Dir => return Err(libc::EISDIR),
                Node::File(c) => return Ok(Some(c.clone())),
            },
            Op::Tick => {}
        }
        Ok(None)
    }
}

struct Harness {
    fs: Fs,
    clock: Arc<ManualClock>,
    lookups: HashMap<u64, u64>,
}

impl Harness {
    fn lookup(&mut self, parent: u64, name: &str) -> Result<(u64, FileKind), i32> {
        let a = self
            .fs
            .lookup(parent, OsStr::new(name))
            .map_err(|e| e.errno())?;
        *self.lookups.entry(a.ino).or_default() += 1;
        Ok((a.ino, a.kind))
    }

    fn resolve(&mut self, p: &[&str]) -> Result<u64, i32> {
        let mut at = ROOT_INO;
        for name in p {
            at = self.lookup(at, name)?.0;
        }
        Ok(at)
    }

    /// Walks to a directory as the kernel's path walk does: a file there is ENOTDIR.
    fn resolve_dir(&mut self, p: &[&str]) -> Result<u64, i32> {
        let mut at = ROOT_INO;
        for name in p {
            let (ino, kind) = self.lookup(at, name)?;
            if kind != FileKind::Dir {
                return Err(libc::ENOTDIR);
            }
            at = ino;
        }
        Ok(at)
    }

    fn apply(&mut self, op: &Op) -> Result<Option<Vec<u8>>, i32> {
        let e = |e: nbagent_fusefs::FsError| e.errno();
        let split = |p: &P| (p[..p.len() - 1].to_vec(), p[p.len() - 1]);
        match op {
            Op::Create(p) => {
                let (dir, name) = split(p);
                let parent = self.resolve_dir(&dir)?;
                let write = OpenMode {
                    write: true,
                    truncate: false,
                };
                let (attr, opened) = self.fs.create(parent, OsStr::new(name), write).map_err(e)?;
                *self.lookups.entry(attr.ino).or_default() += 1;
                self.fs.release(opened.fh).map_err(e)?;
            }
            Op::Write(p, off, data) => {
                let ino = self.resolve(p)?;
                let write = OpenMode {
                    write: true,
                    truncate: false,
                };
                let opened = self.fs.open(ino, write).map_err(e)?;
                self.fs.write(opened.fh, u64::from(*off), data).map_err(e)?;
                self.fs.release(opened.fh).map_err(e)?;
            }
            Op::Truncate(p, size) => {
                let ino = self.resolve(p)?;
                let a = self.fs.set_size(ino, u64::from(*size)).map_err(e)?;
                assert_eq!(a.size, u64::from(*size));
            }
            Op::Rename(from, to, noreplace) => {
                let (fdir, fname) = split(from);
                let (tdir, tname) = split(to);
                let fp = self.resolve_dir(&fdir)?;
                let tp = self.resolve_dir(&tdir)?;
                self.fs
                    .rename(fp, OsStr::new(fname), tp, OsStr::new(tname), *noreplace)
                    .map_err(e)?;
            }
            Op::Unlink(p) => {
                let (dir, name) = split(p);
                let parent = self.resolve_dir(&dir)?;
                self.fs.unlink(parent, OsStr::new(name)).map_err(e)?;
            }
            Op::Mkdir(p) => {
                let (dir, name) = split(p);
                let parent = self.resolve_dir(&dir)?;
                let a = self.fs.mkdir(parent, OsStr::new(name)).map_err(e)?;
                *self.lookups.entry(a.ino).or_default() += 1;
            }
            Op::Rmdir(p) => {
                let (dir, name) = split(p);
                let parent = self.resolve_dir(&dir)?;
                self.fs.rmdir(parent, OsStr::new(name)).map_err(e)?;
            }
            Op::Lookup(p) => {
                self.resolve(p)?;
            }
            Op::Forget(p) => {
                let ino = self.resolve(p)?;
                if let Some(n) = self.lookups.remove(&ino) {
                    self.fs.forget(ino, n);
                }
            }
            Op::Read(p) => {
                let ino = self.resolve(p)?;
                let opened = self.fs.open(ino, OpenMode::default()).map_err(e)?;
                let data = self.fs.read(opened.fh, 0, 1 << 20).map_err(e)?;
                self.fs.release(opened.fh).map_err(e)?;
                return Ok(Some(data.to_vec()));
            }
            Op::Tick => self.clock.advance(Duration::from_secs(61)),
        }
        Ok(None)
    }

    /// The whole tree as the core shows it.
    fn snapshot(&self) -> BTreeMap<String, Node> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(ROOT_INO, String::new())];
        while let Some((ino, prefix)) = stack.pop() {
            let fh = self.fs.opendir(ino).unwrap();
            let entries = self.fs.readdir(fh, 0).unwrap();
            self.fs.releasedir(fh);
            for ent in entries {
                let path = if prefix.is_empty() {
                    ent.name.clone()
                } else {
                    format!("{prefix}/{}", ent.name)
                };
                match ent.attr.kind {
                    FileKind::Dir => {
                        stack.push((ent.attr.ino, path.clone()));
                        out.insert(path, Node::Dir);
                    }
                    FileKind::File => {
                        let opened = self.fs.open(ent.attr.ino, OpenMode::default()).unwrap();
                        let data = self.fs.read(opened.fh, 0, 1 << 20).unwrap();
                        self.fs.release(opened.fh).unwrap();
                        assert_eq!(data.len() as u64, ent.attr.size, "size of {path}");
                        out.insert(path, Node::File(data.to_vec()));
                    }
                }
            }
        }
        out
    }
}

fn disk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Node>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if e.file_type().unwrap().is_dir() {
            disk(&e.path(), &path, out);
            out.insert(path, Node::Dir);
        } else {
            out.insert(path, Node::File(fs::read(e.path()).unwrap()));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn core_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        let backing = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::default());
        let fs = common::local_fs(backing.path(), work.path(), true, Some(clock.clone()));
        let mut h = Harness { fs, clock, lookups: HashMap::new() };
        let mut model = Model::default();
        for (i, op) in ops.iter().enumerate() {
            let expected = model.apply(op);
            let got = h.apply(op);
            prop_assert_eq!(&got, &expected, "step {}: {:?}", i, op);
            prop_assert_eq!(&h.snapshot(), &model.nodes, "core after step {}: {:?}", i, op);
            let mut on_disk = BTreeMap::new();
            disk(backing.path(), "", &mut on_disk);
            prop_assert_eq!(&on_disk, &model.nodes, "backing after step {}: {:?}", i, op);
            prop_assert_eq!(h.fs.open_handles(), 0);
        }
        // Once the kernel forgets everything, only linked inodes remain.
        for (ino, n) in std::mem::take(&mut h.lookups) {
            h.fs.forget(ino, n);
        }
        prop_assert_eq!(h.fs.inode_count(), model.nodes.len() + 1);
    }
}
