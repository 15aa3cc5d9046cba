//! Copy mode, for when FUSE is not available: copy a tree from the backing into a local
//! directory, and later upload what changed (by content hash). Plain file operations.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use nbagent_protocol::{FileKind, FileRoot};

use crate::backing::{Backing, hash_file, validate_listing};
use crate::error::{BackingError, ListingError};
use crate::path::split_path;

/// Why copying or syncing back failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError {
    /// The backing failed.
    #[error("backing failed")]
    Backing(#[from] BackingError),
    /// The listing was refused.
    #[error("listing refused")]
    Listing(#[from] ListingError),
    /// Local I/O failed.
    #[error("local i/o failed on {path}")]
    Io {
        /// The local path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The tree is read-only and files were changed.
    #[error("tree is read-only; {changed} changed files were not uploaded")]
    ReadOnly {
        /// How many.
        changed: usize,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CopyError + '_ {
    move |source| CopyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What was copied: the base for [`sync_back`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// Which tree.
    pub root: Option<FileRoot>,
    /// Whether the tree may be written.
    pub writable: bool,
    /// File path -> SHA-256 of the content copied (hex).
    pub files: BTreeMap<String, String>,
    /// File path -> the backing's version of it.
    pub versions: BTreeMap<String, String>,
    /// Directory paths.
    pub dirs: BTreeSet<String>,
}

/// What [`sync_back`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Files uploaded (new or changed).
    pub uploaded: Vec<String>,
    /// Directories created in the backing.
    pub created_dirs: Vec<String>,
    /// Files of the manifest no longer in the directory (not deleted in the backing).
    pub missing: Vec<String>,
    /// Files left as they were.
    pub unchanged: usize,
}

/// Copies tree `root` into `dest` (created if missing). At most `max_entries` entries.
pub fn copy_tree(
    backing: &dyn Backing,
    root: FileRoot,
    dest: &Path,
    max_entries: usize,
    chunk: u32,
) -> Result<Manifest, CopyError> {
    let listing = backing.list(root)?;
    validate_listing(&listing, max_entries)?;
    fs::create_dir_all(dest).map_err(io_at(dest))?;
    let mut manifest = Manifest {
        root: Some(root),
        writable: listing.writable,
        ..Manifest::default()
    };
    let mut entries = listing.entries;
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    for entry in entries {
        let mut local = dest.to_owned();
        // Validated by validate_listing: relative, no dots.
        local.extend(entry.path.split('/'));
        if let Some(parent) = local.parent() {
            fs::create_dir_all(parent).map_err(io_at(parent))?;
        }
        match entry.kind {
            FileKind::Dir => {
                fs::create_dir_all(&local).map_err(io_at(&local))?;
                manifest.dirs.insert(entry.path);
            }
            FileKind::File => {
                let mut out = File::create(&local).map_err(io_at(&local))?;
                let mut offset = 0u64;
                loop {
                    let data =
                        backing.read(root, &entry.path, &entry.version, offset, chunk.max(4096))?;
                    if data.is_empty() {
                        break;
                    }
                    out.write_all(&data).map_err(io_at(&local))?;
                    offset += data.len() as u64;
                }
                drop(out);
                let mut f = File::open(&local).map_err(io_at(&local))?;
                let hash = hash_file(&mut f).map_err(io_at(&local))?;
                manifest.files.insert(entry.path.clone(), hash);
                manifest.versions.insert(entry.path, entry.version);
            }
        }
    }
    Ok(manifest)
}

fn walk(
    dir: &Path,
    rel: &str,
    files: &mut Vec<String>,
    dirs: &mut Vec<String>,
) -> Result<(), CopyError> {
    let mut children: Vec<_> = fs::read_dir(dir)
        .map_err(io_at(dir))?
        .collect::<Result<_, _>>()
        .map_err(io_at(dir))?;
    children.sort_by_key(|c| c.file_name());
    for child in children {
        let Some(name) = child.file_name().to_str().map(str::to_owned) else {
            tracing::warn!(dir = %dir.display(), "skipping a name that is not utf-8");
            continue;
        };
        let child_rel = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        if split_path(&child_rel).is_err() {
            tracing::warn!(path = %child_rel, "skipping an invalid path");
            continue;
        }
        let meta = fs::symlink_metadata(child.path()).map_err(io_at(&child.path()))?;
        if meta.is_dir() {
            dirs.push(child_rel.clone());
            walk(&child.path(), &child_rel, files, dirs)?;
        } else if meta.is_file() {
            files.push(child_rel);
        }
    }
    Ok(())
}

/// Uploads the files of `dir` that differ from `manifest` (by SHA-256), and creates new
/// directories. Deletions are reported, not applied.
pub fn sync_back(
    backing: &dyn Backing,
    manifest: &Manifest,
    dir: &Path,
) -> Result<SyncReport, CopyError> {
    let root = manifest.root.unwrap_or(FileRoot::Notebook);
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    walk(dir, "", &mut files, &mut dirs)?;
    let mut report = SyncReport::default();
    let mut changed = Vec::new();
    for rel in &files {
        let mut local = dir.to_owned();
        local.extend(rel.split('/'));
        let mut f = File::open(&local).map_err(io_at(&local))?;
        let hash = hash_file(&mut f).map_err(io_at(&local))?;
        if manifest.files.get(rel) == Some(&hash) {
            report.unchanged += 1;
        } else {
            changed.push((rel.clone(), local));
        }
    }
    let new_dirs: Vec<String> = dirs
        .into_iter()
        .filter(|d| !manifest.dirs.contains(d))
        .collect();
    let nothing_to_do = changed.is_empty() && new_dirs.is_empty();
    if !manifest.writable && !nothing_to_do {
        return Err(CopyError::ReadOnly {
            changed: changed.len(),
        });
    }
    for d in new_dirs {
        backing.mkdir(root, &d)?;
        report.created_dirs.push(d);
    }
    for (rel, local) in changed {
        let base = manifest.versions.get(&rel).map_or("", String::as_str);
        backing.upload(root, &rel, base, &local)?;
        report.uploaded.push(rel);
    }
    let present: BTreeSet<&String> = files.iter().collect();
    report.missing = manifest
        .files
        .keys()
        .filter(|k| !present.contains(k))
        .cloned()
        .collect();
    Ok(report)
}
