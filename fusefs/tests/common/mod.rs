//! Shared helpers of the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use nbagent_fusefs::{Fs, FsConfig, LocalDir, ManualClock, SystemClock};
use nbagent_protocol::FileRoot;

/// A core over a local directory, with its work dir inside `work`.
pub fn local_fs(
    backing: &Path,
    work: &Path,
    writable: bool,
    clock: Option<Arc<ManualClock>>,
) -> Fs {
    let root = FileRoot::Notebook;
    let b = LocalDir::new().with_tree(root, backing, writable);
    let config = FsConfig::new(root, work);
    match clock {
        Some(c) => Fs::new(config, Arc::new(b), c).unwrap(),
        None => Fs::new(config, Arc::new(b), Arc::new(SystemClock)).unwrap(),
    }
}

/// Why a test that needs a real mount cannot run here, if it cannot.
pub fn fuse_skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root: mounting FUSE needs CAP_SYS_ADMIN".to_owned());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing".to_owned());
    }
    None
}

/// Returns early from a test, saying why, when FUSE mounts are not possible.
#[macro_export]
macro_rules! require_fuse {
    () => {
        if let Some(reason) = common::fuse_skip_reason() {
            nbagent_testkit::say_skip(&format!("skipping: {reason}"));
            return;
        }
    };
}
