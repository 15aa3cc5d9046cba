//! Signalling the remaining descendants and detaching mounts.
//!
//! As PID 1 of its PID namespace the supervisor uses `kill(-1, sig)`, which reaches
//! every other process of the namespace. Otherwise (tests, a container run without its
//! own PID namespace) `kill(-1)` would reach the whole host, so the supervisor walks
//! `/proc` and signals only the processes whose parent chain leads to it (it is a child
//! subreaper, so orphans of its descendants stay in its tree).

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use crate::procs::{self, ProcError};
use crate::sys::Sys;

/// Which processes "all remaining descendants" are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The supervisor is PID 1 of its namespace: everything else in it.
    Namespace,
    /// The supervisor is not PID 1: the processes below `root` in `proc_dir`.
    Tree {
        /// The supervisor's pid.
        root: Pid,
        /// Where the process table is read.
        proc_dir: PathBuf,
    },
}

/// Sends `sig` to every remaining descendant; returns how many processes were
/// signalled (`None` for [`Scope::Namespace`], where the kernel does not say).
pub fn signal_descendants(
    sys: &dyn Sys,
    scope: &Scope,
    sig: Signal,
) -> Result<Option<usize>, ProcError> {
    match scope {
        Scope::Namespace => {
            match sys.kill_all(sig) {
                // ESRCH: nobody else is left.
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => warn!(signal = sig.as_str(), error = %e, "kill(-1) failed"),
            }
            Ok(None)
        }
        Scope::Tree { root, proc_dir } => {
            let table = procs::read_table(proc_dir)?;
            let mut count = 0;
            for pid in procs::descendants(root.as_raw(), &table) {
                match sys.kill(Pid::from_raw(pid), sig) {
                    Ok(()) => count += 1,
                    Err(Errno::ESRCH) => {}
                    Err(e) => warn!(pid, signal = sig.as_str(), error = %e, "kill failed"),
                }
            }
            Ok(Some(count))
        }
    }
}

/// Detaches every path with `umount2(MNT_DETACH)`. A path that does not exist or is
/// not a mount point is fine; other failures are logged and returned.
pub fn unmount_all(sys: &dyn Sys, paths: &[PathBuf], when: &str) -> Vec<(PathBuf, Errno)> {
    let mut failed = Vec::new();
    for path in paths {
        match unmount(sys, path) {
            Ok(true) => info!(path = %path.display(), when, "detached mount"),
            Ok(false) => debug!(path = %path.display(), when, "not mounted"),
            Err(e) => {
                warn!(path = %path.display(), when, error = %e, "cannot detach mount");
                failed.push((path.clone(), e));
            }
        }
    }
    failed
}

/// Detaches one mount; `Ok(false)` when it was not mounted.
fn unmount(sys: &dyn Sys, path: &Path) -> Result<bool, Errno> {
    let mut detached = false;
    // Mounts can be stacked: detach until the path is no mount point (bounded).
    for _ in 0..16 {
        match sys.unmount_detach(path) {
            Ok(()) => detached = true,
            Err(Errno::ENOENT | Errno::EINVAL) => return Ok(detached),
            Err(e) => return Err(e),
        }
    }
    Ok(detached)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Call {
        Kill(i32, Signal),
        KillAll(Signal),
        Unmount(PathBuf),
    }

    #[derive(Default)]
    struct FakeSys {
        calls: RefCell<Vec<Call>>,
        /// How many times each path can be unmounted, then the error to return.
        mounts: RefCell<HashMap<PathBuf, (u32, Errno)>>,
    }

    impl Sys for FakeSys {
        fn kill(&self, pid: Pid, sig: Signal) -> Result<(), Errno> {
            self.calls.borrow_mut().push(Call::Kill(pid.as_raw(), sig));
            if pid.as_raw() == 13 {
                Err(Errno::ESRCH)
            } else {
                Ok(())
            }
        }
        fn kill_all(&self, sig: Signal) -> Result<(), Errno> {
            self.calls.borrow_mut().push(Call::KillAll(sig));
            Ok(())
        }
        fn unmount_detach(&self, path: &Path) -> Result<(), Errno> {
            self.calls.borrow_mut().push(Call::Unmount(path.to_owned()));
            let mut mounts = self.mounts.borrow_mut();
            match mounts.get_mut(path) {
                Some((n, _)) if *n > 0 => {
                    *n -= 1;
                    Ok(())
                }
                Some((_, e)) => Err(*e),
                None => Err(Errno::ENOENT),
            }
        }
    }

    fn fake_proc(entries: &[(i32, i32, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (pid, ppid, comm) in entries {
            let p = dir.path().join(pid.to_string());
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("stat"), format!("{pid} ({comm}) S {ppid} 0 0 0")).unwrap();
        }
        std::fs::create_dir(dir.path().join("self")).unwrap();
        std::fs::write(dir.path().join("uptime"), "1.0 1.0").unwrap();
        dir
    }

    #[test]
    fn tree_scope_signals_only_descendants_and_never_everyone() {
        let proc_dir = fake_proc(&[
            (1, 0, "init"),
            (10, 1, "nbsupervisor"),
            (11, 10, "nbagent"),
            (12, 11, "sh) S 1 (x"),
            (13, 10, "gone"),
            (20, 1, "sshd"),
            (21, 20, "bash"),
        ]);
        let sys = FakeSys::default();
        let scope = Scope::Tree {
            root: Pid::from_raw(10),
            proc_dir: proc_dir.path().to_owned(),
        };
        let n = signal_descendants(&sys, &scope, Signal::SIGKILL).unwrap();
        assert_eq!(n, Some(2));
        let mut calls = sys.calls.into_inner();
        calls.sort_by_key(|c| match c {
            Call::Kill(p, _) => *p,
            _ => 0,
        });
        assert_eq!(
            calls,
            vec![
                Call::Kill(11, Signal::SIGKILL),
                Call::Kill(12, Signal::SIGKILL),
                Call::Kill(13, Signal::SIGKILL),
            ]
        );
    }

    #[test]
    fn tree_scope_with_a_missing_proc_is_an_error() {
        let sys = FakeSys::default();
        let scope = Scope::Tree {
            root: Pid::from_raw(10),
            proc_dir: PathBuf::from("/nonexistent/proc"),
        };
        assert!(signal_descendants(&sys, &scope, Signal::SIGTERM).is_err());
        assert!(sys.calls.into_inner().is_empty());
    }

    #[test]
    fn namespace_scope_uses_kill_all() {
        let sys = FakeSys::default();
        let n = signal_descendants(&sys, &Scope::Namespace, Signal::SIGTERM).unwrap();
        assert_eq!(n, None);
        assert_eq!(sys.calls.into_inner(), vec![Call::KillAll(Signal::SIGTERM)]);
    }

    #[test]
    fn unmount_tolerates_not_mounted_and_reports_the_rest() {
        let sys = FakeSys::default();
        let (a, b, c) = (
            PathBuf::from("/a"),
            PathBuf::from("/b"),
            PathBuf::from("/c"),
        );
        sys.mounts
            .borrow_mut()
            .insert(a.clone(), (2, Errno::EINVAL));
        sys.mounts.borrow_mut().insert(b.clone(), (0, Errno::EBUSY));
        let failed = unmount_all(&sys, &[a.clone(), b.clone(), c.clone()], "test");
        assert_eq!(failed, vec![(b.clone(), Errno::EBUSY)]);
        assert_eq!(
            sys.calls.into_inner(),
            vec![
                Call::Unmount(a.clone()),
                Call::Unmount(a.clone()),
                Call::Unmount(a),
                Call::Unmount(b),
                Call::Unmount(c),
            ]
        );
    }
}
