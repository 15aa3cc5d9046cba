//! The record of the running kernel that lets a restarted agent adopt it.
//!
//! When the agent starts a kernel it writes `<state>/kernel/kernel.json` (mode 0600,
//! atomically: temporary file, rename) with the kernel's process id and start
//! time (so a recycled PID is not mistaken for the kernel), its connection info, and the
//! cell that is running. An agent that starts and finds a record whose process is alive
//! connects to that kernel instead of starting a new one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest record accepted (it is a few hundred bytes).
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// Errors reading or writing the record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The file could not be read or written.
    #[error("cannot access the kernel record {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a kernel record.
    #[error("the kernel record {path} is damaged")]
    Format {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// The cell that was executing when the record was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningCell {
    /// The server's request id.
    pub request: String,
    /// The cell id.
    pub cell: String,
    /// The Jupyter msg_id of the execute_request.
    pub msg_id: String,
    /// When it started, Unix milliseconds.
    pub started_ms: u64,
}

/// What an agent needs to adopt a running kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelRecord {
    /// PID (in the agent's namespace) of the kernel's init process.
    pub pid: i32,
    /// Start time of that process, clock ticks since boot (field 22 of
    /// `/proc/<pid>/stat`), to recognise a recycled PID.
    pub start_ticks: u64,
    /// The Jupyter connection info (connection-file JSON).
    pub connection: serde_json::Value,
    /// Kernelspec name.
    pub kernel_name: String,
    /// Whether interrupts go as a message (`true`) or SIGINT.
    pub interrupt_by_message: bool,
    /// The kernel's log file.
    pub log: PathBuf,
    /// The notebook user.
    pub user: String,
    /// The shell socket identity the agent used, so that a reply to a request sent by
    /// a previous agent reaches its successor.
    #[serde(default)]
    pub session: String,
    /// The cell running when the record was written, if any.
    #[serde(default)]
    pub running: Option<RunningCell>,
    /// Cells executed so far in this kernel (for reports after adoption).
    #[serde(default)]
    pub executed: u64,
    /// Where this kernel stands in the checkpoint store (reactive mode); a record
    /// without it (an older agent's) is [`Chain::Broken`].
    #[serde(default)]
    pub chain: super::reactive::Chain,
}

impl KernelRecord {
    /// Where the record lives under the agent's state directory.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("kernel").join("kernel.json")
    }

    /// Reads the record, if there is one.
    pub fn load(path: &Path) -> Result<Option<KernelRecord>, RecordError> {
        let io = |source| RecordError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        if meta.len() > MAX_RECORD_BYTES {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} bytes is too large for a kernel record", meta.len()),
            )));
        }
        let bytes = std::fs::read(path).map_err(io)?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| RecordError::Format {
                path: path.to_owned(),
                source,
            })
    }

    /// Writes the record atomically with mode 0600.
    ///
    /// Without fsync: the record describes a live process, which survives a crash of
    /// the agent (the page cache does too) but not of the machine; after a machine
    /// crash a torn record is refused by [`load`](Self::load) and removed. It is saved
    /// twice per cell, and an fsync costs milliseconds (bench-kernel).
    pub fn save(&self, path: &Path) -> Result<(), RecordError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| RecordError::Io {
            path: path.to_owned(),
            source,
        };
        let json = serde_json::to_vec_pretty(self).map_err(|source| RecordError::Format {
            path: path.to_owned(),
            source,
        })?;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&json).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Removes the record (the kernel is gone for good).
    pub fn remove(path: &Path) -> Result<(), RecordError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(RecordError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Whether the recorded process still runs (same PID, same start time, not a zombie).
    pub fn is_alive(&self, proc_root: &Path) -> bool {
        match proc_stat(proc_root, self.pid) {
            Some(s) => s.start_ticks == self.start_ticks && s.state != 'Z' && s.state != 'X',
            None => false,
        }
    }
}

/// The fields of `/proc/<pid>/stat` the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// State letter (`R`, `S`, `Z`...).
    pub state: char,
    /// Parent PID.
    pub ppid: i32,
    /// Start time, clock ticks since boot.
    pub start_ticks: u64,
}

/// Reads `/proc/<pid>/stat` under `proc_root`; `None` if the process does not exist or
/// the file does not parse.
pub fn proc_stat(proc_root: &Path, pid: i32) -> Option<ProcStat> {
    let s = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    parse_stat(&s)
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) is in parentheses
/// and may itself contain spaces and parentheses, so fields are counted from the last
/// `)`.
pub fn parse_stat(s: &str) -> Option<ProcStat> {
    let rest = &s[s.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); field 4 is ppid; field 22 is starttime.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn stat_with_tricky_command_name() {
        let s = "4242 (a) b (c)) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let st = parse_stat(s).unwrap();
        assert_eq!(st.state, 'S');
        assert_eq!(st.ppid, 17);
        assert_eq!(st.start_ticks, 987654);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1"), None);
    }

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id() as i32;
        let st = proc_stat(Path::new("/proc"), me).unwrap();
        let mut r = KernelRecord {
            pid: me,
            start_ticks: st.start_ticks,
            connection: serde_json::json!({}),
            kernel_name: "python3".into(),
            interrupt_by_message: false,
            log: "/dev/null".into(),
            user: "nbuser".into(),
            session: String::new(),
            running: None,
            executed: 0,
            chain: super::super::reactive::Chain::Fresh,
        };
        assert!(r.is_alive(Path::new("/proc")));
        r.start_ticks += 1;
        assert!(!r.is_alive(Path::new("/proc")));
    }

    #[test]
    fn save_load_remove() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel.json");
        assert_eq!(KernelRecord::load(&path).unwrap(), None);
        let r = KernelRecord {
            pid: 7,
            start_ticks: 9,
            connection: serde_json::json!({"shell_port": 1}),
            kernel_name: "python3".into(),
            interrupt_by_message: true,
            log: "/tmp/k.log".into(),
            user: "nbuser".into(),
            session: "s".into(),
            running: Some(RunningCell {
                request: "r".into(),
                cell: "c".into(),
                msg_id: "m".into(),
                started_ms: 1,
            }),
            executed: 3,
            chain: super::super::reactive::Chain::After(
                serde_json::from_str("\"c0000000004\"").unwrap(),
            ),
        };
        r.save(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(KernelRecord::load(&path).unwrap(), Some(r));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            KernelRecord::load(&path),
            Err(RecordError::Format { .. })
        ));
        KernelRecord::remove(&path).unwrap();
        KernelRecord::remove(&path).unwrap();
    }

    #[test]
    fn a_record_without_a_chain_has_a_broken_one() {
        // An older agent's record: the entry of the kernel's last cell is unknown, so
        // the adopting agent must not link the next cell to a guessed predecessor.
        let old = serde_json::json!({
            "pid": 7, "start_ticks": 9, "connection": {}, "kernel_name": "python3",
            "interrupt_by_message": true, "log": "/tmp/k.log", "user": "nbuser"
        });
        let r: KernelRecord = serde_json::from_value(old).unwrap();
        assert_eq!(r.chain, super::super::reactive::Chain::Broken);
        assert_eq!(r.chain.predecessor(), None);
    }
}
