//! Copy mode: copy a tree, change it, sync back only what changed.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

use std::fs;

use nbagent_fusefs::LocalDir;
use nbagent_fusefs::copy::{CopyError, copy_tree, sync_back};
use nbagent_protocol::FileRoot;

#[test]
fn copy_modify_sync_back_uploads_only_changed_files() {
    let backing_dir = tempfile::tempdir().unwrap();
    let b = backing_dir.path();
    fs::create_dir_all(b.join("data/raw")).unwrap();
    fs::write(b.join("data/a.csv"), "x,y\n1,2\n").unwrap();
    fs::write(b.join("data/raw/b.bin"), vec![7u8; 100_000]).unwrap();
    fs::write(b.join("notes.txt"), "keep").unwrap();
    let backing = LocalDir::new().with_tree(FileRoot::Notebook, b, true);

    let copy_dir = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let c = copy_dir.path().join("files");
    let manifest = copy_tree(&backing, FileRoot::Notebook, &c, 1000, 4096).unwrap();
    assert_eq!(
        fs::read(c.join("data/raw/b.bin")).unwrap(),
        vec![7u8; 100_000]
    );
    assert_eq!(
        fs::read_to_string(c.join("data/a.csv")).unwrap(),
        "x,y\n1,2\n"
    );
    assert_eq!(manifest.files.len(), 3);

    // Nothing changed: nothing uploaded.
    let report = sync_back(&backing, &manifest, &c, scratch.path()).unwrap();
    assert!(report.uploaded.is_empty());
    assert_eq!(report.unchanged, 3);

    // Change one file, add one in a new directory, touch another without changing it.
    fs::write(c.join("data/a.csv"), "x,y\n1,2\n3,4\n").unwrap();
    fs::create_dir(c.join("out")).unwrap();
    fs::write(c.join("out/result.txt"), "42").unwrap();
    fs::write(c.join("notes.txt"), "keep").unwrap();
    let before = fs::metadata(b.join("notes.txt"))
        .unwrap()
        .modified()
        .unwrap();
    let report = sync_back(&backing, &manifest, &c, scratch.path()).unwrap();
    assert_eq!(report.uploaded, ["data/a.csv", "out/result.txt"]);
    assert_eq!(report.created_dirs, ["out"]);
    assert_eq!(report.unchanged, 2);
    assert_eq!(
        fs::read_to_string(b.join("data/a.csv")).unwrap(),
        "x,y\n1,2\n3,4\n"
    );
    assert_eq!(fs::read_to_string(b.join("out/result.txt")).unwrap(), "42");
    let after = fs::metadata(b.join("notes.txt"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after, "an unchanged file is not uploaded");

    // A read-only tree refuses to sync changes.
    let ro = LocalDir::new().with_tree(FileRoot::Workspace, b, false);
    let ro_dir = copy_dir.path().join("ro");
    let m = copy_tree(&ro, FileRoot::Workspace, &ro_dir, 1000, 4096).unwrap();
    fs::write(ro_dir.join("notes.txt"), "changed").unwrap();
    assert!(matches!(
        sync_back(&ro, &m, &ro_dir, scratch.path()),
        Err(CopyError::ReadOnly { changed: 1 })
    ));
}

#[test]
fn copy_refuses_an_oversized_listing() {
    let backing_dir = tempfile::tempdir().unwrap();
    for i in 0..5 {
        fs::write(backing_dir.path().join(format!("f{i}")), "x").unwrap();
    }
    let backing = LocalDir::new().with_tree(FileRoot::Notebook, backing_dir.path(), true);
    let dest = tempfile::tempdir().unwrap();
    let err = copy_tree(&backing, FileRoot::Notebook, dest.path(), 3, 4096).unwrap_err();
    assert!(matches!(err, CopyError::Listing(_)), "{err:?}");
}

/// A tree copied again over what a kernel left there (an agent restarted beside a running
/// kernel): symlinks planted where the server has a file or a directory are replaced,
/// never followed, so the copy (made as root) writes nothing outside the tree; and
/// sync-back does not read through one.
#[test]
fn planted_symlinks_are_replaced_not_followed() {
    let backing_dir = tempfile::tempdir().unwrap();
    let b = backing_dir.path();
    fs::create_dir_all(b.join("sub")).unwrap();
    fs::write(b.join("a.csv"), "from the server").unwrap();
    fs::write(b.join("sub/b.txt"), "nested").unwrap();
    let backing = LocalDir::new().with_tree(FileRoot::Notebook, b, true);

    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    fs::write(&victim, "precious").unwrap();
    let copy_dir = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let c = copy_dir.path().join("files");
    fs::create_dir_all(&c).unwrap();
    std::os::unix::fs::symlink(&victim, c.join("a.csv")).unwrap();
    std::os::unix::fs::symlink(outside.path(), c.join("sub")).unwrap();

    let manifest = copy_tree(&backing, FileRoot::Notebook, &c, 1000, 4096).unwrap();
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    assert!(!outside.path().join("b.txt").exists());
    for (rel, want) in [("a.csv", "from the server"), ("sub/b.txt", "nested")] {
        let meta = fs::symlink_metadata(c.join(rel)).unwrap();
        assert!(meta.is_file(), "{rel} is a regular file now");
        assert_eq!(fs::read_to_string(c.join(rel)).unwrap(), want);
    }
    assert!(fs::symlink_metadata(c.join("sub")).unwrap().is_dir());

    // A link to a secret added later is neither uploaded nor read.
    let secret = outside.path().join("key");
    fs::write(&secret, "agent key").unwrap();
    std::os::unix::fs::symlink(&secret, c.join("key.txt")).unwrap();
    let report = sync_back(&backing, &manifest, &c, scratch.path()).unwrap();
    assert!(report.uploaded.is_empty(), "{report:?}");
    assert!(!b.join("key.txt").exists());
}
