//! Exit records: how an agent learns the exit status of a process it adopted but that
//! is not its child (see the crate documentation for the contract).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::policy::ProcessExit;

/// Errors preparing or writing exit records.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// A directory could not be created or cleaned.
    #[error("cannot prepare directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A record could not be written.
    #[error("cannot write exit record {path}")]
    Write {
        /// The record's final path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The `watch/` and `exit/` directories under the run directory.
#[derive(Debug, Clone)]
pub struct ExitRecords {
    run_dir: PathBuf,
    watch: PathBuf,
    exit: PathBuf,
}

/// The JSON text of a record.
pub fn record_json(pid: i32, exit: ProcessExit) -> String {
    let (code, signal) = match exit {
        ProcessExit::Code(c) => (c.to_string(), "null".to_owned()),
        ProcessExit::Signal(s) => ("null".to_owned(), s.to_string()),
    };
    format!("{{\"pid\":{pid},\"code\":{code},\"signal\":{signal}}}\n")
}

fn dir_0755(path: &Path) -> Result<(), RecordError> {
    let err = |source| RecordError::Dir {
        path: path.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(err)
}

/// Removes every entry of `dir` (records left by an earlier run refer to pids of
/// processes that no longer exist).
fn clear(dir: &Path) -> Result<(), RecordError> {
    let err = |source| RecordError::Dir {
        path: dir.to_owned(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let path = entry.path();
        let res = if entry.file_type().map_err(err)?.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match res {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(())
}

impl ExitRecords {
    /// Creates `run_dir`, `run_dir/watch` and `run_dir/exit` (mode 0755) and empties
    /// the last two.
    pub fn prepare(run_dir: &Path) -> Result<Self, RecordError> {
        let records = Self {
            run_dir: run_dir.to_owned(),
            watch: run_dir.join("watch"),
            exit: run_dir.join("exit"),
        };
        dir_0755(&records.run_dir)?;
        for dir in [&records.watch, &records.exit] {
            dir_0755(dir)?;
            clear(dir)?;
        }
        Ok(records)
    }

    /// The run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Called for every process the supervisor reaps: if `watch/<pid>` exists, writes
    /// `exit/<pid>` atomically and removes the watch file. Returns whether a record was
    /// written.
    pub fn on_reaped(&self, pid: i32, exit: ProcessExit) -> Result<bool, RecordError> {
        let watch = self.watch.join(pid.to_string());
        if std::fs::symlink_metadata(&watch).is_err() {
            return Ok(false);
        }
        let path = self.exit.join(pid.to_string());
        let err = |source| RecordError::Write {
            path: path.clone(),
            source,
        };
        let tmp = self.exit.join(format!(".{pid}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(record_json(pid, exit).as_bytes())
            .map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(err)?;
        match std::fs::remove_file(&watch) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        assert_eq!(
            record_json(42, ProcessExit::Code(3)),
            "{\"pid\":42,\"code\":3,\"signal\":null}\n"
        );
        assert_eq!(
            record_json(7, ProcessExit::Signal(9)),
            "{\"pid\":7,\"code\":null,\"signal\":9}\n"
        );
    }

    #[test]
    fn watched_pid_gets_a_record_and_others_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let r = ExitRecords::prepare(&run).unwrap();
        let mode = std::fs::metadata(run.join("watch"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        std::fs::write(run.join("watch/42"), "").unwrap();
        assert!(!r.on_reaped(41, ProcessExit::Code(0)).unwrap());
        assert!(r.on_reaped(42, ProcessExit::Signal(15)).unwrap());
        assert!(!run.join("watch/42").exists());
        let text = std::fs::read_to_string(run.join("exit/42")).unwrap();
        assert_eq!(text, "{\"pid\":42,\"code\":null,\"signal\":15}\n");
        let names: Vec<_> = std::fs::read_dir(run.join("exit")).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left");
    }

    #[test]
    fn prepare_clears_stale_entries() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        ExitRecords::prepare(run).unwrap();
        std::fs::write(run.join("watch/1"), "").unwrap();
        std::fs::write(run.join("exit/2"), "{}").unwrap();
        ExitRecords::prepare(run).unwrap();
        assert_eq!(std::fs::read_dir(run.join("watch")).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(run.join("exit")).unwrap().count(), 0);
    }
}
