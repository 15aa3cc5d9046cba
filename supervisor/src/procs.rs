//! The process tree as seen in `/proc` (the directory is configurable for tests).

use std::collections::{HashMap, HashSet};
use std::path::Path;

/// One process: its pid and its parent's pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcEntry {
    /// Process id.
    pub pid: i32,
    /// Parent process id.
    pub ppid: i32,
}

/// Errors reading the process table.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcError {
    /// The proc directory could not be listed.
    #[error("cannot list {path}")]
    List {
        /// The directory.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Parses the parent pid out of the text of `/proc/<pid>/stat`. The command name in
/// parentheses may itself contain spaces and parentheses, so the fields are read after
/// the last `)`.
pub fn parse_stat_ppid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

/// Reads every process of `proc_dir`. Processes that vanish while being read are
/// skipped.
pub fn read_table(proc_dir: &Path) -> Result<Vec<ProcEntry>, ProcError> {
    let entries = std::fs::read_dir(proc_dir).map_err(|source| ProcError::List {
        path: proc_dir.to_owned(),
        source,
    })?;
    let mut table = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(ppid) = parse_stat_ppid(&stat) {
            table.push(ProcEntry { pid, ppid });
        }
    }
    Ok(table)
}

/// Every process whose parent chain leads to `root` (not `root` itself), parents before
/// their children.
pub fn descendants(root: i32, table: &[ProcEntry]) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for e in table {
        children.entry(e.ppid).or_default().push(e.pid);
    }
    let mut seen = HashSet::from([root]);
    let mut out = Vec::new();
    let mut i = 0;
    let mut queue = vec![root];
    while let Some(&pid) = queue.get(i) {
        i += 1;
        for &child in children.get(&pid).map(Vec::as_slice).unwrap_or_default() {
            if seen.insert(child) {
                out.push(child);
                queue.push(child);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_names() {
        assert_eq!(parse_stat_ppid("42 (sleep) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parse_stat_ppid("42 (a) b (c) R 9 1 1"), Some(9));
        assert_eq!(parse_stat_ppid("42 (x"), None);
        assert_eq!(parse_stat_ppid(""), None);
    }

    #[test]
    fn descendants_follow_the_parent_chain() {
        let e = |pid, ppid| ProcEntry { pid, ppid };
        let table = [
            e(1, 0),
            e(10, 1),
            e(11, 10),
            e(12, 11),
            e(13, 10),
            e(20, 1),
            e(21, 20),
        ];
        assert_eq!(descendants(10, &table), vec![11, 13, 12]);
        assert_eq!(descendants(12, &table), Vec::<i32>::new());
        assert_eq!(descendants(99, &table), Vec::<i32>::new());
        // A cycle (cannot happen, but must not loop).
        assert_eq!(descendants(5, &[e(5, 6), e(6, 5)]), vec![6]);
    }

    #[test]
    fn reads_the_real_proc() {
        let me = std::process::id() as i32;
        let table = read_table(Path::new("/proc")).unwrap();
        let mine = table.iter().find(|e| e.pid == me).unwrap();
        assert_eq!(mine.ppid, std::os::unix::process::parent_id() as i32);
    }
}
