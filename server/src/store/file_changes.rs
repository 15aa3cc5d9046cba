//! The kernel's changes to the attached files (uploads, directories, removals, renames),
//! applied to the `files` table inside the transaction that stores their sequence
//! numbers ([`super::Store::append_with_files`]), so each applies exactly once and in
//! the agent's order.
//!
//! Nothing here deletes a version the writer did not see: a file whose server version
//! differs from the one the kernel saw stays (or is kept as `<path> (conflict <tag>)`).

use sqlx::AnyConnection;
use tracing::{debug, warn};

use super::{
    FileRecord, FileRow, StoreError, UploadOutcome, file_record, from_db, query_err, to_db,
};

/// One change to an agent's attached files, as the kernel made it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileChange {
    /// A new version of a file whose content is in the blob store.
    Upload {
        /// The version as it should be listed.
        upload: FileRecord,
        /// Version the writer started from (empty for a new file).
        base_version: String,
        /// Suffix of a conflict copy's name.
        conflict_tag: String,
    },
    /// A directory created (its record: kind `dir`).
    Mkdir {
        /// The directory.
        dir: FileRecord,
    },
    /// A file (or, with `dir`, an empty directory) removed.
    Remove {
        /// Agent.
        agent: String,
        /// Tree.
        root: String,
        /// Path.
        path: String,
        /// Whether a directory was removed.
        dir: bool,
        /// Version of the file removed (empty: not known).
        base_version: String,
    },
    /// A file or directory renamed, replacing `to`.
    Rename {
        /// Agent.
        agent: String,
        /// Tree.
        root: String,
        /// Current path.
        from: String,
        /// New path.
        to: String,
        /// Version of the renamed file the kernel saw (empty for a directory).
        base_version: String,
        /// Version of the replaced file the kernel saw (empty when none).
        replaced_version: String,
        /// Suffix of a conflict copy's name.
        conflict_tag: String,
        /// Modification time of the renamed entry, Unix milliseconds.
        mtime_ms: i64,
    },
}

impl FileChange {
    /// The path the change is about (for logs).
    pub fn path(&self) -> &str {
        match self {
            FileChange::Upload { upload, .. } => &upload.path,
            FileChange::Mkdir { dir } => &dir.path,
            FileChange::Remove { path, .. } => path,
            FileChange::Rename { from, .. } => from,
        }
    }
}

/// The name a conflicting version is kept under.
pub fn conflict_name(path: &str, tag: &str) -> String {
    format!("{path} (conflict {tag})")
}

pub(super) async fn file(
    conn: &mut AnyConnection,
    agent: &str,
    root: &str,
    path: &str,
) -> Result<Option<FileRecord>, StoreError> {
    let row: Option<FileRow> = sqlx::query_as(
        "SELECT agent, root, path, kind, version, size, mtime_ms FROM files \
         WHERE agent = $1 AND root = $2 AND path = $3",
    )
    .bind(agent)
    .bind(root)
    .bind(path)
    .fetch_optional(&mut *conn)
    .await
    .map_err(query_err("look up file"))?;
    row.map(file_record).transpose()
}

pub(super) async fn put(conn: &mut AnyConnection, f: &FileRecord) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO files (agent, root, path, kind, version, size, mtime_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (agent, root, path) DO UPDATE SET kind = excluded.kind, \
         version = excluded.version, size = excluded.size, mtime_ms = excluded.mtime_ms",
    )
    .bind(&f.agent)
    .bind(&f.root)
    .bind(&f.path)
    .bind(&f.kind)
    .bind(&f.version)
    .bind(to_db("size", f.size)?)
    .bind(f.mtime_ms)
    .execute(&mut *conn)
    .await
    .map_err(query_err("put file"))?;
    Ok(())
}

async fn delete(
    conn: &mut AnyConnection,
    agent: &str,
    root: &str,
    path: &str,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM files WHERE agent = $1 AND root = $2 AND path = $3")
        .bind(agent)
        .bind(root)
        .bind(path)
        .execute(&mut *conn)
        .await
        .map_err(query_err("delete file"))?;
    Ok(())
}

/// Every record of one tree (filtered in Rust: a prefix match portable between the two
/// dialects, and the reference server's trees are small).
async fn tree(
    conn: &mut AnyConnection,
    agent: &str,
    root: &str,
) -> Result<Vec<FileRecord>, StoreError> {
    let rows: Vec<FileRow> = sqlx::query_as(
        "SELECT agent, root, path, kind, version, size, mtime_ms FROM files \
         WHERE agent = $1 AND root = $2 ORDER BY path",
    )
    .bind(agent)
    .bind(root)
    .fetch_all(&mut *conn)
    .await
    .map_err(query_err("list files"))?;
    rows.into_iter().map(file_record).collect()
}

async fn below(
    conn: &mut AnyConnection,
    agent: &str,
    root: &str,
    dir: &str,
) -> Result<Vec<FileRecord>, StoreError> {
    let prefix = format!("{dir}/");
    let mut all = tree(conn, agent, root).await?;
    all.retain(|f| f.path.starts_with(&prefix));
    Ok(all)
}

async fn blob_size(conn: &mut AnyConnection, hash: &str) -> Result<Option<u64>, StoreError> {
    let size: Option<i64> = sqlx::query_scalar("SELECT size FROM blobs WHERE hash = $1")
        .bind(hash)
        .fetch_optional(&mut *conn)
        .await
        .map_err(query_err("look up blob"))?;
    size.map(|s| from_db("size", s)).transpose()
}

/// Moves a file at `path` whose version is not `expected` to its conflict name, so that
/// what is about to replace it does not lose it. Returns where it went.
async fn keep_aside(
    conn: &mut AnyConnection,
    current: &FileRecord,
    tag: &str,
) -> Result<String, StoreError> {
    let kept_as = conflict_name(&current.path, tag);
    put(
        conn,
        &FileRecord {
            path: kept_as.clone(),
            ..current.clone()
        },
    )
    .await?;
    delete(conn, &current.agent, &current.root, &current.path).await?;
    Ok(kept_as)
}

/// Records an upload (see [`super::Store::record_file_upload`]).
pub(super) async fn upload(
    conn: &mut AnyConnection,
    upload: &FileRecord,
    base_version: &str,
    conflict_tag: &str,
) -> Result<UploadOutcome, StoreError> {
    let current = file(conn, &upload.agent, &upload.root, &upload.path).await?;
    let current_version = current
        .as_ref()
        .filter(|c| c.kind == "file")
        .map(|c| c.version.as_str());
    if current_version == Some(upload.version.as_str()) {
        return Ok(UploadOutcome::AlreadyCurrent);
    }
    let fits = match &current {
        None => true,
        Some(c) if c.kind == "dir" => false,
        Some(c) => c.version == base_version,
    };
    if fits {
        put(conn, upload).await?;
        return Ok(UploadOutcome::Stored);
    }
    // Already kept as a conflict copy (a resend)?
    let prefix = format!("{} (conflict ", upload.path);
    let siblings = tree(conn, &upload.agent, &upload.root).await?;
    if let Some(kept) = siblings
        .iter()
        .find(|f| f.path.starts_with(&prefix) && f.version == upload.version)
    {
        return Ok(UploadOutcome::Conflict {
            kept_as: kept.path.clone(),
        });
    }
    let kept_as = conflict_name(&upload.path, conflict_tag);
    put(
        conn,
        &FileRecord {
            path: kept_as.clone(),
            ..upload.clone()
        },
    )
    .await?;
    Ok(UploadOutcome::Conflict { kept_as })
}

/// Applies one change. Changes that no longer make sense on the server (the source is
/// gone, the directory is not empty there) change nothing and are logged.
pub(super) async fn apply(conn: &mut AnyConnection, change: &FileChange) -> Result<(), StoreError> {
    match change {
        FileChange::Upload {
            upload: up,
            base_version,
            conflict_tag,
        } => {
            let outcome = upload(conn, up, base_version, conflict_tag).await?;
            if let UploadOutcome::Conflict { kept_as } = &outcome {
                warn!(agent = %up.agent, path = %up.path, %kept_as, "file changed since the writer's version; both kept");
            } else {
                debug!(agent = %up.agent, path = %up.path, version = %up.version, ?outcome, "file version stored");
            }
        }
        FileChange::Mkdir { dir } => match file(conn, &dir.agent, &dir.root, &dir.path).await? {
            None => put(conn, dir).await?,
            Some(f) if f.kind == "dir" => {}
            Some(_) => {
                warn!(agent = %dir.agent, path = %dir.path, "mkdir over a file on the server; the file is kept");
            }
        },
        FileChange::Remove {
            agent,
            root,
            path,
            dir,
            base_version,
        } => {
            let Some(current) = file(conn, agent, root, path).await? else {
                debug!(%agent, %path, "removed path already gone");
                return Ok(());
            };
            match (*dir, current.kind == "dir") {
                (true, true) => {
                    if below(conn, agent, root, path).await?.is_empty() {
                        delete(conn, agent, root, path).await?;
                    } else {
                        warn!(%agent, %path, "removed directory is not empty on the server; kept");
                    }
                }
                (false, false) => {
                    if base_version.is_empty() || current.version == *base_version {
                        delete(conn, agent, root, path).await?;
                    } else {
                        warn!(%agent, %path, version = %current.version, %base_version, "removed file changed on the server since; the server's version is kept");
                    }
                }
                _ => warn!(%agent, %path, "removal of a different kind of entry; kept"),
            }
        }
        FileChange::Rename {
            agent,
            root,
            from,
            to,
            base_version,
            replaced_version,
            conflict_tag,
            mtime_ms,
        } => {
            rename(
                conn,
                agent,
                root,
                from,
                to,
                base_version,
                replaced_version,
                conflict_tag,
                *mtime_ms,
            )
            .await?;
        }
    }
    Ok(())
}

/// Puts `record` at its path, first keeping a file there aside when its version is
/// neither `expected` nor the incoming one.
async fn replace(
    conn: &mut AnyConnection,
    record: &FileRecord,
    expected: &str,
    tag: &str,
) -> Result<(), StoreError> {
    if let Some(existing) = file(conn, &record.agent, &record.root, &record.path).await?
        && existing.kind == "file"
        && existing.version != expected
        && existing.version != record.version
    {
        let kept_as = keep_aside(conn, &existing, tag).await?;
        warn!(agent = %record.agent, path = %record.path, %kept_as, "renamed over a file that changed on the server; its version is kept");
    }
    put(conn, record).await
}

#[allow(clippy::too_many_arguments)]
async fn rename(
    conn: &mut AnyConnection,
    agent: &str,
    root: &str,
    from: &str,
    to: &str,
    base_version: &str,
    replaced_version: &str,
    tag: &str,
    mtime_ms: i64,
) -> Result<(), StoreError> {
    if from == to {
        return Ok(());
    }
    let source = file(conn, agent, root, from).await?;
    let children = below(conn, agent, root, from).await?;
    let is_dir = source
        .as_ref()
        .map_or(!children.is_empty(), |s| s.kind == "dir");
    if !is_dir {
        let Some(source) = source else {
            debug!(%agent, %from, "renamed path already gone");
            return Ok(());
        };
        if base_version.is_empty() || source.version == base_version {
            delete(conn, agent, root, from).await?;
            let moved = FileRecord {
                path: to.to_owned(),
                mtime_ms,
                ..source
            };
            return replace(conn, &moved, replaced_version, tag).await;
        }
        // The file changed on the server since the kernel saw it: that version stays
        // at `from`; the kernel's version appears at `to`.
        let Some(size) = blob_size(conn, base_version).await? else {
            warn!(%agent, %from, %base_version, "renamed version unknown on the server; the server's version stays");
            return Ok(());
        };
        warn!(%agent, %from, %to, "renamed file changed on the server since; both kept");
        let mine = FileRecord {
            path: to.to_owned(),
            version: base_version.to_owned(),
            size,
            mtime_ms,
            ..source
        };
        return replace(conn, &mine, replaced_version, tag).await;
    }
    // A directory and everything below it.
    if let Some(target) = file(conn, agent, root, to).await? {
        if target.kind == "dir" {
            delete(conn, agent, root, to).await?;
        } else {
            let kept_as = keep_aside(conn, &target, tag).await?;
            warn!(%agent, path = %to, %kept_as, "directory renamed over a file; the file is kept");
        }
    }
    let dir = FileRecord {
        agent: agent.to_owned(),
        root: root.to_owned(),
        path: to.to_owned(),
        kind: "dir".to_owned(),
        version: String::new(),
        size: 0,
        mtime_ms,
    };
    if source.is_some() {
        delete(conn, agent, root, from).await?;
    }
    put(conn, &dir).await?;
    for child in children {
        let rest = &child.path[from.len()..];
        delete(conn, agent, root, &child.path).await?;
        let moved = FileRecord {
            path: format!("{to}{rest}"),
            ..child
        };
        let expected = moved.version.clone();
        replace(conn, &moved, &expected, tag).await?;
    }
    Ok(())
}
