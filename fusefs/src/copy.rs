//! Copy mode, for when FUSE is not available: copy a tree from the backing into a local
//! directory, and later upload what changed (by content hash). Plain file operations.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};

use nbagent_protocol::{FileKind, FileRoot};

use crate::backing::{Backing, hash_file, upload_now, validate_listing};
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
    // The tree may hold what a kernel left there (an agent restarted beside a running
    // kernel copies again): nothing below `dest` is followed if it is a symlink, so a
    // planted link cannot make this (root) process write outside the tree.
    let base = open_dir(dest).map_err(io_at(dest))?;
    for entry in entries {
        let mut local = dest.to_owned();
        // Validated by validate_listing: relative, no dots.
        local.extend(entry.path.split('/'));
        let (parent, name) = match entry.path.rsplit_once('/') {
            Some((parent, name)) => (Some(parent), name),
            None => (None, entry.path.as_str()),
        };
        let parent_fd = match parent {
            Some(parent) => dirs_beneath(&base, parent).map_err(io_at(&local))?,
            None => base.try_clone().map_err(io_at(dest))?,
        };
        match entry.kind {
            FileKind::Dir => {
                dirs_beneath(&parent_fd, name).map_err(io_at(&local))?;
                manifest.dirs.insert(entry.path);
            }
            FileKind::File => {
                let mut out = create_beneath(&parent_fd, name).map_err(io_at(&local))?;
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
                let mut f = open_beneath(&base, &entry.path, OFlag::O_RDONLY, Mode::empty())
                    .map_err(io_at(&local))?;
                let hash = hash_file(&mut f).map_err(io_at(&local))?;
                manifest.files.insert(entry.path.clone(), hash);
                manifest.versions.insert(entry.path, entry.version);
            }
        }
    }
    Ok(manifest)
}

/// How every path below a copied tree is resolved: beneath its directory, through no
/// symlink at all.
fn no_links() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// Opens the directory of a copied tree (the agent made it; trusted).
fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_MAGICLINKS);
    Ok(openat2(nix::fcntl::AT_FDCWD, dir, how)?)
}

/// Opens `rel` beneath `base`, through no symlink.
fn open_beneath(base: &OwnedFd, rel: &str, flags: OFlag, mode: Mode) -> io::Result<File> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .mode(mode)
        .resolve(no_links());
    Ok(File::from(openat2(base, rel, how)?))
}

/// Whether an open failed because a symlink (or a non-directory) is in the way.
fn in_the_way(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::ELOOP | Errno::ENOTDIR | Errno::EXDEV)
    )
}

/// The directory `rel` beneath `base`, made where missing; a symlink or file in the way
/// of a component is removed first (it is the copy's, not the server's).
fn dirs_beneath(base: &OwnedFd, rel: &str) -> io::Result<OwnedFd> {
    let mut cur = base.try_clone()?;
    for comp in rel.split('/') {
        match mkdirat(&cur, comp, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY;
        let next = match open_beneath(&cur, comp, flags, Mode::empty()) {
            Err(e) if in_the_way(&e) => {
                unlinkat(&cur, comp, UnlinkatFlags::NoRemoveDir)?;
                mkdirat(&cur, comp, Mode::from_bits_truncate(0o755))?;
                open_beneath(&cur, comp, flags, Mode::empty())?
            }
            r => r?,
        };
        cur = next.into();
    }
    Ok(cur)
}

/// Creates (or truncates) file `name` in directory `parent`; a symlink of that name is
/// replaced, never followed.
fn create_beneath(parent: &OwnedFd, name: &str) -> io::Result<File> {
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC;
    let mode = Mode::from_bits_truncate(0o644);
    match open_beneath(parent, name, flags, mode) {
        Err(e) if in_the_way(&e) => {
            unlinkat(parent, name, UnlinkatFlags::NoRemoveDir)?;
            open_beneath(parent, name, flags, mode)
        }
        r => r,
    }
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
/// directories. Deletions are reported, not applied. Each changed file is copied into
/// `scratch` (a private directory outside the tree) and uploaded from there.
pub fn sync_back(
    backing: &dyn Backing,
    manifest: &Manifest,
    dir: &Path,
    scratch: &Path,
) -> Result<SyncReport, CopyError> {
    let root = manifest.root.unwrap_or(FileRoot::Notebook);
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    walk(dir, "", &mut files, &mut dirs)?;
    let mut report = SyncReport::default();
    let mut changed = Vec::new();
    let base_dir = open_dir(dir).map_err(io_at(dir))?;
    for rel in &files {
        let mut local = dir.to_owned();
        local.extend(rel.split('/'));
        // Read as root from a tree the kernel wrote: never through a symlink.
        let mut f =
            open_beneath(&base_dir, rel, OFlag::O_RDONLY, Mode::empty()).map_err(io_at(&local))?;
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
    // What is uploaded is a private copy made through a descriptor opened beneath the
    // tree: the kernel cannot swap a file for a symlink between the check and the copy.
    fs::create_dir_all(scratch).map_err(io_at(scratch))?;
    for (i, (rel, local)) in changed.into_iter().enumerate() {
        let base = manifest.versions.get(&rel).map_or("", String::as_str);
        let copy = scratch.join(format!("sync-{i}"));
        let _ = fs::remove_file(&copy);
        let mut f =
            open_beneath(&base_dir, &rel, OFlag::O_RDONLY, Mode::empty()).map_err(io_at(&local))?;
        let uploaded = File::create_new(&copy)
            .and_then(|mut to| io::copy(&mut f, &mut to))
            .map_err(io_at(&local))
            .and_then(|_| Ok(upload_now(backing, root, &rel, base, &copy)?));
        let _ = fs::remove_file(&copy);
        uploaded?;
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
