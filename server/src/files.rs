//! Attached files: the two trees (`notebook`, read-write for the kernel; `workspace`,
//! read-only) the server keeps for each agent, metadata in the `files` table and contents
//! in the blob store under their SHA-256.
//!
//! The agent lists a tree with `file_list`, reads byte ranges with `file_read`, and
//! uploads what the kernel writes with sequenced `file_chunk` messages (assembled and
//! verified like blobs); uploads and the kernel's `file_mkdir`/`file_remove`/`file_rename`
//! become [`FileChange`]s ([`upload_change`], [`namespace_change`]) that the store applies
//! in the transaction storing their messages. Operators attach files with
//! [`put_path`] (`nbserver files put`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbagent_protocol::{FileEntry, FileKind, FileRoot, Message};

use crate::blobs::{BlobError, BlobStore};
use crate::store::{FileChange, FileRecord, Store, StoreError, UploadOutcome};

/// Most bytes returned by one `file_read` (larger requests get a short answer).
pub const MAX_READ: u32 = 4 << 20;

/// Longest accepted path.
const MAX_PATH: usize = 4096;

/// Errors of the attached-files functions.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilesError {
    /// A path is not relative, `/`-separated and free of `.`/`..`/empty components.
    #[error("invalid file path {path:?}: {reason}")]
    InvalidPath {
        /// The path (cut to 200 characters).
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// No such file, or not at that version.
    #[error("{path} not found (version {version:?})")]
    NotFound {
        /// The path.
        path: String,
        /// The version asked for.
        version: String,
    },
    /// The tree is read-only for the kernel.
    #[error("{path}: the workspace tree is read-only")]
    ReadOnly {
        /// The path (cut to 200 characters).
        path: String,
    },
    /// The database failed.
    #[error("file metadata")]
    Store(#[from] StoreError),
    /// The blob store failed.
    #[error("file content")]
    Blob(#[from] BlobError),
    /// Reading a local file to attach failed.
    #[error("cannot read {path}")]
    Io {
        /// The local path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The database name of a tree.
pub fn root_name(root: FileRoot) -> &'static str {
    match root {
        FileRoot::Notebook => "notebook",
        FileRoot::Workspace => "workspace",
    }
}

/// Whether the kernel may write a tree.
pub fn writable(root: FileRoot) -> bool {
    root == FileRoot::Notebook
}

/// Checks that `path` is relative, `/`-separated, and has no empty, `.` or `..`
/// component.
pub fn validate_path(path: &str) -> Result<(), FilesError> {
    let bad = |reason| FilesError::InvalidPath {
        path: path.chars().take(200).collect(),
        reason,
    };
    if path.is_empty() {
        return Err(bad("empty"));
    }
    if path.len() > MAX_PATH {
        return Err(bad("longer than 4096 bytes"));
    }
    if path.starts_with('/') {
        return Err(bad("absolute"));
    }
    if path.contains('\0') {
        return Err(bad("holds a nul byte"));
    }
    for part in path.split('/') {
        match part {
            "" => return Err(bad("has an empty component")),
            "." | ".." => return Err(bad("has a dot or dot-dot component")),
            p if p.len() > 255 => return Err(bad("has a component longer than 255 bytes")),
            _ => {}
        }
    }
    Ok(())
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Attaches `bytes` as `dest` of `root` for `agent` (replacing what was there).
pub async fn put_bytes(
    store: &Store,
    blobs: &Arc<BlobStore>,
    agent: &str,
    root: FileRoot,
    dest: &str,
    bytes: Vec<u8>,
) -> Result<FileRecord, FilesError> {
    validate_path(dest)?;
    let size = bytes.len() as u64;
    let b = blobs.clone();
    let version = tokio::task::spawn_blocking(move || b.put(&bytes))
        .await
        .map_err(|e| FilesError::Io {
            path: dest.into(),
            source: std::io::Error::other(e),
        })??;
    store
        .record_blob(&version, size, "application/octet-stream", now_ms() / 1000)
        .await?;
    let record = FileRecord {
        agent: agent.to_owned(),
        root: root_name(root).to_owned(),
        path: dest.to_owned(),
        kind: "file".to_owned(),
        version,
        size,
        mtime_ms: now_ms(),
    };
    store.put_file(&record).await?;
    Ok(record)
}

/// Attaches a local file, or a directory recursively, as `dest` (default: its file
/// name) of `root` for `agent`. Returns the files attached.
pub async fn put_path(
    store: &Store,
    blobs: &Arc<BlobStore>,
    agent: &str,
    root: FileRoot,
    local: &Path,
    dest: Option<&str>,
) -> Result<Vec<FileRecord>, FilesError> {
    let dest = match dest {
        Some(d) => d.trim_end_matches('/').to_owned(),
        None => local
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned(),
    };
    validate_path(&dest)?;
    let io = |source| FilesError::Io {
        path: local.to_owned(),
        source,
    };
    let meta = std::fs::metadata(local).map_err(io)?;
    if !meta.is_dir() {
        let bytes = std::fs::read(local).map_err(io)?;
        return Ok(vec![
            put_bytes(store, blobs, agent, root, &dest, bytes).await?,
        ]);
    }
    let mut out = Vec::new();
    let mut stack = vec![(local.to_owned(), dest)];
    while let Some((dir, rel)) = stack.pop() {
        let io = |source| FilesError::Io {
            path: dir.clone(),
            source,
        };
        store
            .put_file(&FileRecord {
                agent: agent.to_owned(),
                root: root_name(root).to_owned(),
                path: rel.clone(),
                kind: "dir".to_owned(),
                version: String::new(),
                size: 0,
                mtime_ms: now_ms(),
            })
            .await?;
        let mut children: Vec<_> = std::fs::read_dir(&dir)
            .map_err(io)?
            .collect::<Result<_, _>>()
            .map_err(io)?;
        children.sort_by_key(|c| c.file_name());
        for child in children {
            let Some(name) = child.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let child_rel = format!("{rel}/{name}");
            let ft = child.file_type().map_err(io)?;
            if ft.is_dir() {
                stack.push((child.path(), child_rel));
            } else if ft.is_file() {
                let bytes = std::fs::read(child.path()).map_err(io)?;
                out.push(put_bytes(store, blobs, agent, root, &child_rel, bytes).await?);
            }
        }
    }
    Ok(out)
}

/// The listing of `root` for `agent`, with every ancestor directory present.
pub async fn listing(
    store: &Store,
    agent: &str,
    root: FileRoot,
) -> Result<Vec<FileEntry>, FilesError> {
    let records = store.tree(agent, root_name(root)).await?;
    let mut seen: BTreeSet<String> = records.iter().map(|r| r.path.clone()).collect();
    let mut entries = Vec::with_capacity(records.len());
    for r in records {
        let mut end = 0;
        while let Some(i) = r.path[end..].find('/') {
            let dir = &r.path[..end + i];
            if seen.insert(dir.to_owned()) {
                entries.push(FileEntry {
                    path: dir.to_owned(),
                    kind: FileKind::Dir,
                    size: 0,
                    mtime_ms: r.mtime_ms,
                    version: String::new(),
                });
            }
            end += i + 1;
        }
        let kind = if r.kind == "dir" {
            FileKind::Dir
        } else {
            FileKind::File
        };
        entries.push(FileEntry {
            path: r.path,
            kind,
            size: r.size,
            mtime_ms: r.mtime_ms,
            version: r.version,
        });
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// Up to `len` (at most [`MAX_READ`]) bytes of `path` at `version` from `offset`, and
/// whether they reach the end of the file. Only the path's current version is served.
#[allow(clippy::too_many_arguments)]
pub async fn read_range(
    store: &Store,
    blobs: &Arc<BlobStore>,
    agent: &str,
    root: FileRoot,
    path: &str,
    version: &str,
    offset: u64,
    len: u32,
) -> Result<(Vec<u8>, bool), FilesError> {
    validate_path(path)?;
    let not_found = || FilesError::NotFound {
        path: path.to_owned(),
        version: version.to_owned(),
    };
    let record = store
        .file(agent, root_name(root), path)
        .await?
        .ok_or_else(not_found)?;
    if record.kind != "file" || record.version != version {
        return Err(not_found());
    }
    let b = blobs.clone();
    let hash = record.version.clone();
    let len = len.min(MAX_READ) as usize;
    Ok(
        tokio::task::spawn_blocking(move || b.read_range(&hash, offset, len))
            .await
            .map_err(|e| FilesError::Io {
                path: path.into(),
                source: std::io::Error::other(e),
            })??,
    )
}

/// The current content of `path` in `root` of `agent`, if it is a file.
pub async fn read(
    store: &Store,
    blobs: &Arc<BlobStore>,
    agent: &str,
    root: FileRoot,
    path: &str,
) -> Result<Option<Vec<u8>>, FilesError> {
    let Some(record) = store.file(agent, root_name(root), path).await? else {
        return Ok(None);
    };
    if record.kind != "file" {
        return Ok(None);
    }
    Ok(Some(blobs.read(&record.version)?))
}

/// The suffix of a conflict copy's name: the server's time, `YYYY-MM-DD HH.MM.SS`.
pub fn conflict_tag() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02} {:02}.{:02}.{:02}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// Refuses changes to a tree the kernel may not write.
fn check_writable(root: FileRoot, path: &str) -> Result<(), FilesError> {
    if writable(root) {
        Ok(())
    } else {
        Err(FilesError::ReadOnly {
            path: path.chars().take(200).collect(),
        })
    }
}

/// The change an upload makes (its content already in the blob store), for
/// [`Store::append_with_files`].
pub fn upload_change(
    agent: &str,
    root: FileRoot,
    path: &str,
    base_version: &str,
    version: &str,
    size: u64,
) -> Result<FileChange, FilesError> {
    Ok(FileChange::Upload {
        upload: upload_record(agent, root, path, version, size)?,
        base_version: base_version.to_owned(),
        conflict_tag: conflict_tag(),
    })
}

fn upload_record(
    agent: &str,
    root: FileRoot,
    path: &str,
    version: &str,
    size: u64,
) -> Result<FileRecord, FilesError> {
    validate_path(path)?;
    check_writable(root, path)?;
    Ok(FileRecord {
        agent: agent.to_owned(),
        root: root_name(root).to_owned(),
        path: path.to_owned(),
        kind: "file".to_owned(),
        version: version.to_owned(),
        size,
        mtime_ms: now_ms(),
    })
}

/// The change a `file_mkdir`, `file_remove` or `file_rename` message makes, checked
/// (paths valid, tree writable, a directory not moved below itself); `None` for other
/// messages.
pub fn namespace_change(agent: &str, msg: &Message) -> Option<Result<FileChange, FilesError>> {
    let checked = |root: FileRoot, paths: &[&str]| -> Result<(), FilesError> {
        for p in paths {
            validate_path(p)?;
            check_writable(root, p)?;
        }
        Ok(())
    };
    let change = match msg {
        Message::FileMkdir { root, path } => checked(*root, &[path]).map(|()| FileChange::Mkdir {
            dir: FileRecord {
                agent: agent.to_owned(),
                root: root_name(*root).to_owned(),
                path: path.clone(),
                kind: "dir".to_owned(),
                version: String::new(),
                size: 0,
                mtime_ms: now_ms(),
            },
        }),
        Message::FileRemove {
            root,
            path,
            kind,
            base_version,
        } => checked(*root, &[path]).map(|()| FileChange::Remove {
            agent: agent.to_owned(),
            root: root_name(*root).to_owned(),
            path: path.clone(),
            dir: *kind == FileKind::Dir,
            base_version: base_version.clone(),
        }),
        Message::FileRename {
            root,
            from,
            to,
            base_version,
            replaced_version,
        } => checked(*root, &[from, to]).and_then(|()| {
            if to.starts_with(&format!("{from}/")) {
                return Err(FilesError::InvalidPath {
                    path: to.chars().take(200).collect(),
                    reason: "lies below the renamed directory",
                });
            }
            Ok(FileChange::Rename {
                agent: agent.to_owned(),
                root: root_name(*root).to_owned(),
                from: from.clone(),
                to: to.clone(),
                base_version: base_version.clone(),
                replaced_version: replaced_version.clone(),
                conflict_tag: conflict_tag(),
                mtime_ms: now_ms(),
            })
        }),
        _ => return None,
    };
    Some(change)
}

/// Records a version uploaded by the agent (its content is already in the blob store);
/// see [`Store::record_file_upload`] for conflicts.
pub async fn record_upload(
    store: &Store,
    agent: &str,
    root: FileRoot,
    path: &str,
    base_version: &str,
    version: &str,
    size: u64,
) -> Result<UploadOutcome, FilesError> {
    let upload = upload_record(agent, root, path, version, size)?;
    Ok(store
        .record_file_upload(&upload, base_version, &conflict_tag())
        .await?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            ".",
            "a/./b",
            "x\0",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "a/b.csv", "dir/sub/file name (1).txt"] {
            validate_path(good).unwrap();
        }
        assert!(
            validate_path("../x")
                .unwrap_err()
                .to_string()
                .contains("dot-dot")
        );
    }

    #[tokio::test]
    async fn put_list_read_and_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_in(dir.path()).await.unwrap();
        let blobs = Arc::new(BlobStore::open(dir.path().join("blobs")).unwrap());
        let f = put_bytes(
            &store,
            &blobs,
            "a1",
            FileRoot::Notebook,
            "data/sales.csv",
            b"x,y\n1,2\n".to_vec(),
        )
        .await
        .unwrap();
        let l = listing(&store, "a1", FileRoot::Notebook).await.unwrap();
        let paths: Vec<_> = l.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["data", "data/sales.csv"]);
        assert!(
            listing(&store, "a1", FileRoot::Workspace)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            listing(&store, "other", FileRoot::Notebook)
                .await
                .unwrap()
                .is_empty()
        );
        let (bytes, eof) = read_range(
            &store,
            &blobs,
            "a1",
            FileRoot::Notebook,
            "data/sales.csv",
            &f.version,
            2,
            3,
        )
        .await
        .unwrap();
        assert_eq!((bytes.as_slice(), eof), (&b"y\n1"[..], false));
        let (_, eof) = read_range(
            &store,
            &blobs,
            "a1",
            FileRoot::Notebook,
            "data/sales.csv",
            &f.version,
            5,
            100,
        )
        .await
        .unwrap();
        assert!(eof);
        // Another agent cannot read it, nor a stale version.
        for (agent, version) in [("other", f.version.as_str()), ("a1", "00")] {
            assert!(matches!(
                read_range(
                    &store,
                    &blobs,
                    agent,
                    FileRoot::Notebook,
                    "data/sales.csv",
                    version,
                    0,
                    3
                )
                .await,
                Err(FilesError::NotFound { .. })
            ));
        }

        // An upload based on the current version replaces it; a resend changes nothing.
        let v2 = blobs.put(b"v2").unwrap();
        let up = |base: String, v: String| {
            let store = store.clone();
            async move {
                record_upload(
                    &store,
                    "a1",
                    FileRoot::Notebook,
                    "data/sales.csv",
                    &base,
                    &v,
                    2,
                )
                .await
                .unwrap()
            }
        };
        assert_eq!(
            up(f.version.clone(), v2.clone()).await,
            UploadOutcome::Stored
        );
        assert_eq!(
            up(f.version.clone(), v2.clone()).await,
            UploadOutcome::AlreadyCurrent
        );
        // One based on the old version is kept beside it, once.
        let v3 = blobs.put(b"v3").unwrap();
        let UploadOutcome::Conflict { kept_as } = up(f.version.clone(), v3.clone()).await else {
            panic!("expected a conflict");
        };
        assert!(
            kept_as.starts_with("data/sales.csv (conflict "),
            "{kept_as}"
        );
        assert_eq!(
            up(f.version.clone(), v3.clone()).await,
            UploadOutcome::Conflict {
                kept_as: kept_as.clone()
            }
        );
        assert_eq!(
            read(&store, &blobs, "a1", FileRoot::Notebook, "data/sales.csv")
                .await
                .unwrap()
                .unwrap(),
            b"v2"
        );
        assert_eq!(
            read(&store, &blobs, "a1", FileRoot::Notebook, &kept_as)
                .await
                .unwrap()
                .unwrap(),
            b"v3"
        );
    }
}
