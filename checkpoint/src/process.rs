//! Killing and reaping a process tree so that its pids are free for a restore.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::error::CriuError;

/// Poll interval while waiting for processes to disappear.
const POLL: Duration = Duration::from_millis(5);

/// Fields of `/proc/<pid>/stat` that we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    pub state: char,
    pub ppid: i32,
    pub session: i32,
}

/// Reads `/proc/<pid>/stat`; `None` if the process does not exist.
pub(crate) fn stat(pid: i32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut it = rest.split_ascii_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    let _pgrp: i32 = it.next()?.parse().ok()?;
    let session = it.next()?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        session,
    })
}

/// Whether `pid` is the init (pid 1) of its own PID namespace, from the `NSpid` line
/// of `/proc/<pid>/status`.
pub(crate) fn is_pid_ns_init(pid: i32) -> bool {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .is_some_and(|ids| {
            let ids: Vec<&str> = ids.split_ascii_whitespace().collect();
            ids.len() > 1 && ids.last() == Some(&"1")
        })
}

/// Whether `pid` exists (running or zombie).
pub fn pid_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `pid` and all its descendants, as they are now (parents before children).
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        if !seen.insert(p) || !pid_exists(p) {
            continue;
        }
        out.push(p);
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children = task.path().join("children");
            if let Ok(text) = fs::read_to_string(children) {
                queue.extend(
                    text.split_ascii_whitespace()
                        .filter_map(|c| c.parse::<i32>().ok()),
                );
            }
        }
    }
    out
}

/// Kills the tree rooted at `pid` with `SIGKILL` and waits until every process of it
/// is gone, so that its pids can be reused by a restore.
///
/// Processes that are children of the caller are reaped with `waitpid`; the others
/// are waited for until `/proc/<pid>` disappears (their parent reaps them; for a PID
/// namespace whose init is killed, the kernel kills the rest). Fails with
/// [`CriuError::Kill`] if that does not happen within `timeout`.
#[tracing::instrument(skip_all, fields(pid))]
pub fn kill_tree(pid: i32, timeout: Duration) -> Result<(), CriuError> {
    let deadline = Instant::now() + timeout;
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let tree = descendants(pid);
    for &p in &tree {
        match kill(Pid::from_raw(p), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                return Err(CriuError::Kill {
                    pid,
                    reason: format!("kill({p}, SIGKILL): {e}"),
                });
            }
        }
    }
    for &p in &tree {
        while let Some(st) = stat(p) {
            if st.ppid == me {
                match waitpid(Pid::from_raw(p), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => {}
                    Ok(_) | Err(Errno::ECHILD) => continue,
                    Err(e) => {
                        return Err(CriuError::Kill {
                            pid,
                            reason: format!("waitpid({p}): {e}"),
                        });
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(CriuError::Kill {
                    pid,
                    reason: format!(
                        "pid {p} (state {}, parent {}) still exists after {timeout:?}",
                        st.state, st.ppid
                    ),
                });
            }
            thread::sleep(POLL);
        }
    }
    tracing::debug!(processes = tree.len(), "process tree killed and gone");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_name() {
        let s = parse_stat("42 (a b) c)) S 7 42 42 0 -1").unwrap();
        assert_eq!(
            s,
            Stat {
                state: 'S',
                ppid: 7,
                session: 42
            }
        );
    }

    #[test]
    fn own_process_is_found() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(pid_exists(me));
        assert_eq!(descendants(me).first(), Some(&me));
    }
}
