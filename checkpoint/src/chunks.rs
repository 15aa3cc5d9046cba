//! Deduplicated storage of CRIU memory images: a content-addressed chunk store shared
//! by all checkpoints, and per-checkpoint manifests.
//!
//! # Chunking
//!
//! CRIU's `pages-*.img` files are the raw contents of the dumped pages, page after
//! page in address order (`pagemap-*.img` says which addresses). Between two dumps of
//! the same kernel most pages are unchanged, but a new or freed mapping shifts every
//! page after it by a multiple of the page size, so fixed-offset chunks would stop
//! matching after the first change. Chunk boundaries are therefore content-defined
//! at page granularity: a chunk ends after a page whose CRC-32 has its low bits zero
//! ([`Chunking::boundary_mask`]), once the chunk holds at least
//! [`Chunking::min_bytes`], and at the latest at [`Chunking::max_bytes`]. A shift by
//! whole pages only changes the chunks around the change; unchanged memory gives the
//! same chunks again.
//!
//! Each chunk is named by the SHA-256 of its contents (SHA-NI makes that about as fast
//! as reading the data here) and stored once under `chunks/ab/cdef...`, optionally
//! compressed with LZ4 ([`Compression`]). A chunk file shorter than the chunk is
//! compressed, one of the same length is raw.
//!
//! # Manifests and references
//!
//! A checkpoint's [`Manifest`] lists each chunked file with its size and chunks, in
//! order. [`ChunkRefs`] counts, for every chunk, how many checkpoints reference it
//! (once per checkpoint however often it repeats there): the store's unique bytes,
//! and a checkpoint's marginal bytes (those of chunks only it references), follow.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The page size CRIU's images are made of.
pub const PAGE: usize = 4096;
/// The manifest file in a checkpoint's directory.
pub const MANIFEST_FILE: &str = "nbagent-manifest.json";
/// Version of the manifest format.
const MANIFEST_VERSION: u32 = 1;
/// Size of the buffers used to read images and write materialised files.
const IO_BUFFER: usize = 8 << 20;

/// Whether a file of an images directory goes into the chunk store (the memory
/// images, `pages-*.img`); the others are small and kept as they are.
pub fn is_chunked_file(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// How image files are cut into chunks (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Chunking {
    /// Smallest chunk (but the last of a file), a multiple of [`PAGE`].
    pub min_bytes: usize,
    /// Largest chunk, a multiple of [`PAGE`].
    pub max_bytes: usize,
    /// A page whose CRC-32 `& boundary_mask == 0` ends a chunk (past `min_bytes`);
    /// `2^k - 1` gives chunks of about `min_bytes + 2^k` pages.
    pub boundary_mask: u32,
}

impl Default for Chunking {
    /// 16 KiB to 256 KiB, about 80 KiB on average.
    fn default() -> Self {
        Self {
            min_bytes: 4 * PAGE,
            max_bytes: 64 * PAGE,
            boundary_mask: 15,
        }
    }
}

impl Chunking {
    /// Chunks of exactly `bytes` (a multiple of [`PAGE`]), cut at fixed offsets.
    pub fn fixed(bytes: usize) -> Self {
        Self {
            min_bytes: bytes,
            max_bytes: bytes,
            boundary_mask: u32::MAX,
        }
    }

    /// The length of the first chunk of `data`, which holds at least `max_bytes`
    /// bytes unless it is the end of the file.
    pub fn cut(&self, data: &[u8]) -> usize {
        let max = self.max_bytes.max(PAGE);
        if data.len() <= self.min_bytes {
            return data.len().min(max);
        }
        let mut end = self.min_bytes.max(PAGE);
        // The page that completes the minimum may already end the chunk.
        while end < data.len() && end < max {
            let page = &data[end - PAGE..end];
            if crc32fast::hash(page) & self.boundary_mask == 0 {
                return end;
            }
            end += PAGE;
        }
        end.min(data.len())
    }
}

/// How chunks are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Compression {
    /// Raw (the default: materialising is a plain copy).
    #[default]
    None,
    /// LZ4 block compression, kept only where it saves at least an eighth.
    Lz4,
}

/// A chunk's name: the SHA-256 of its contents.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId([u8; 32]);

impl ChunkId {
    /// The id of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// Lower-case hex.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
    }

    /// Parses 64 hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(Self(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.hex()[..16])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ChunkId::parse(&s).ok_or_else(|| serde::de::Error::custom("a chunk id is 64 hex digits"))
    }
}

/// One chunk of a file: its id, its length, and the bytes its chunk file takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef(pub ChunkId, pub u32, pub u32);

impl ChunkRef {
    /// The chunk.
    pub fn id(&self) -> ChunkId {
        self.0
    }
    /// Its length.
    pub fn len(&self) -> u32 {
        self.1
    }
    /// Whether it is empty (never for stored chunks).
    pub fn is_empty(&self) -> bool {
        self.1 == 0
    }
    /// Bytes of its chunk file.
    pub fn stored(&self) -> u32 {
        self.2
    }
}

/// A chunked file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Its name in the images directory.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// Its chunks, in order.
    pub chunks: Vec<ChunkRef>,
}

/// The chunked files of one checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// The files.
    pub files: Vec<ManifestFile>,
}

impl Default for Manifest {
    fn default() -> Self {
        Self {
            version: MANIFEST_VERSION,
            files: Vec::new(),
        }
    }
}

impl Manifest {
    /// Bytes of the chunked files.
    pub fn logical_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// The distinct chunks it references, with their stored sizes.
    pub fn distinct(&self) -> HashMap<ChunkId, u32> {
        let mut out = HashMap::new();
        for f in &self.files {
            for c in &f.chunks {
                out.insert(c.id(), c.stored());
            }
        }
        out
    }

    /// Reads `dir`'s manifest; `None` when it has none.
    pub fn read(dir: &Path) -> Result<Option<Manifest>, ChunkError> {
        let path = dir.join(MANIFEST_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|source| ChunkError::Corrupt {
            path: path.clone(),
            source,
        })?;
        if m.version != MANIFEST_VERSION {
            return Err(ChunkError::Invalid {
                path,
                reason: format!(
                    "manifest version {} (this build reads {MANIFEST_VERSION})",
                    m.version
                ),
            });
        }
        for f in &m.files {
            let sum: u64 = f.chunks.iter().map(|c| u64::from(c.len())).sum();
            if !is_chunked_file(&f.name) || f.name.contains('/') || sum != f.size {
                return Err(ChunkError::Invalid {
                    path,
                    reason: format!(
                        "file {:?} is not a chunked image or its chunks do not add up",
                        f.name
                    ),
                });
            }
        }
        Ok(Some(m))
    }

    /// Writes the manifest into `dir` (temporary file, then rename).
    pub fn write(&self, dir: &Path) -> Result<(), ChunkError> {
        let path = dir.join(MANIFEST_FILE);
        let tmp = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let bytes = serde_json::to_vec(self).map_err(|source| ChunkError::Corrupt {
            path: path.clone(),
            source,
        })?;
        fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("rename", &path))
    }
}

/// Errors of the chunk store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// A file operation failed.
    #[error("chunk store i/o failed: {op} {path}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A manifest cannot be parsed.
    #[error("checkpoint manifest {path} is damaged")]
    Corrupt {
        /// The manifest.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A manifest or chunk does not hold what it should.
    #[error("checkpoint data {path} is damaged: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> ChunkError + 'a {
    move |source| ChunkError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What storing a checkpoint's images did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IngestStats {
    /// Bytes of the chunked files.
    pub logical_bytes: u64,
    /// Chunks referenced.
    pub chunks: u64,
    /// Chunks that were new to the store.
    pub new_chunks: u64,
    /// Bytes of the new chunk files written.
    pub new_bytes: u64,
    /// Wall time.
    pub duration: Duration,
}

/// What materialising a checkpoint's images did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MaterialiseStats {
    /// Bytes written.
    pub bytes: u64,
    /// Wall time.
    pub duration: Duration,
}

/// The content-addressed chunk files under a directory.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    dir: PathBuf,
    chunking: Chunking,
    compression: Compression,
    copy_file_range: bool,
}

impl ChunkStore {
    /// A chunk store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>, chunking: Chunking, compression: Compression) -> Self {
        Self {
            dir: dir.into(),
            chunking,
            compression,
            copy_file_range: true,
        }
    }

    /// Whether [`ChunkStore::materialise`] copies raw chunks with `copy_file_range`
    /// (default) or with buffered reads and writes.
    pub fn with_copy_file_range(mut self, on: bool) -> Self {
        self.copy_file_range = on;
        self
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of chunk `id`.
    pub fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.hex();
        self.dir.join(&hex[..2]).join(&hex[2..])
    }

    /// Stores `data` unless a chunk of that id exists; returns its reference and
    /// whether it was new.
    pub fn put(&self, data: &[u8]) -> Result<(ChunkRef, bool), ChunkError> {
        let id = ChunkId::of(data);
        let len = u32::try_from(data.len()).map_err(|_| ChunkError::Invalid {
            path: self.dir.clone(),
            reason: format!("chunk of {} bytes is too large", data.len()),
        })?;
        let path = self.path(&id);
        if let Ok(meta) = fs::metadata(&path) {
            let stored = u32::try_from(meta.len()).unwrap_or(u32::MAX);
            return Ok((ChunkRef(id, len, stored), false));
        }
        let compressed = match self.compression {
            Compression::None => None,
            Compression::Lz4 => {
                let c = lz4_flex::block::compress(data);
                (c.len() < data.len() - data.len() / 8).then_some(c)
            }
        };
        let bytes = compressed.as_deref().unwrap_or(data);
        let parent = path.parent().unwrap_or(&self.dir);
        let tmp = path.with_extension("tmp");
        let write = |tmp: &Path| -> io::Result<()> {
            let mut f = File::create(tmp)?;
            f.write_all(bytes)
        };
        if let Err(e) = write(&tmp) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(io_err("write", &tmp)(e));
            }
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
            write(&tmp).map_err(io_err("write", &tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
        let stored = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        Ok((ChunkRef(id, len, stored), true))
    }

    /// Removes chunk `id` (no error if it is gone).
    pub fn remove(&self, id: &ChunkId) -> Result<(), ChunkError> {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Cuts `file` into chunks, stores the new ones, and describes the file.
    pub fn ingest_file(
        &self,
        file: &Path,
        stats: &mut IngestStats,
    ) -> Result<ManifestFile, ChunkError> {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut f = File::open(file).map_err(io_err("open", file))?;
        let max = self.chunking.max_bytes.max(PAGE);
        let mut buf = vec![0u8; IO_BUFFER.max(2 * max)];
        let (mut start, mut end, mut eof) = (0usize, 0usize, false);
        let mut chunks = Vec::new();
        let mut size = 0u64;
        loop {
            // Keep at least one maximal chunk in the buffer unless at the end.
            if !eof && end - start < max {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
                while end < buf.len() {
                    let n = f.read(&mut buf[end..]).map_err(io_err("read", file))?;
                    if n == 0 {
                        eof = true;
                        break;
                    }
                    end += n;
                }
            }
            if start == end {
                break;
            }
            let n = self.chunking.cut(&buf[start..end]);
            let (r, new) = self.put(&buf[start..start + n])?;
            stats.chunks += 1;
            if new {
                stats.new_chunks += 1;
                stats.new_bytes += u64::from(r.stored());
            }
            chunks.push(r);
            size += n as u64;
            start += n;
        }
        stats.logical_bytes += size;
        Ok(ManifestFile { name, size, chunks })
    }

    /// Chunks every memory image of `dir` (see [`is_chunked_file`]) and writes its
    /// manifest there. The image files stay.
    pub fn ingest_dir(&self, dir: &Path) -> Result<(Manifest, IngestStats), ChunkError> {
        let start = Instant::now();
        let mut names = BTreeSet::new();
        for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
            let entry = entry.map_err(io_err("list", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_chunked_file(&name) && entry.file_type().is_ok_and(|t| t.is_file()) {
                names.insert(name);
            }
        }
        let mut stats = IngestStats::default();
        let mut manifest = Manifest::default();
        for name in names {
            manifest
                .files
                .push(self.ingest_file(&dir.join(name), &mut stats)?);
        }
        manifest.write(dir)?;
        stats.duration = start.elapsed();
        Ok((manifest, stats))
    }

    /// Writes the files of `manifest` into `dir` (each to a temporary name, then
    /// renamed), from their chunks.
    pub fn materialise(
        &self,
        manifest: &Manifest,
        dir: &Path,
    ) -> Result<MaterialiseStats, ChunkError> {
        let start = Instant::now();
        let mut bytes = 0;
        let mut buf = Vec::with_capacity(IO_BUFFER);
        let mut scratch = Vec::new();
        let mut copy_range = self.copy_file_range;
        for f in &manifest.files {
            let path = dir.join(&f.name);
            let tmp = dir.join(format!("{}.part", f.name));
            let mut out = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io_err("create", &tmp))?;
            for c in &f.chunks {
                let cpath = self.path(&c.id());
                let len = c.len() as usize;
                if buf.len() + len > IO_BUFFER && !buf.is_empty() {
                    out.write_all(&buf).map_err(io_err("write", &tmp))?;
                    buf.clear();
                }
                let mut cf = File::open(&cpath).map_err(io_err("open", &cpath))?;
                let clen = cf.metadata().map_err(io_err("stat", &cpath))?.len();
                if clen == u64::from(c.len()) {
                    // Raw: copied inside the kernel where it can (one copy instead
                    // of read + write).
                    if copy_range {
                        out.write_all(&buf).map_err(io_err("write", &tmp))?;
                        buf.clear();
                        match copy_all(&cf, &out, len) {
                            Ok(()) => continue,
                            Err(
                                Errno::EXDEV | Errno::ENOSYS | Errno::EINVAL | Errno::EOPNOTSUPP,
                            ) => {
                                // Nothing of this chunk was copied: read it instead.
                                copy_range = false;
                            }
                            Err(e) => return Err(io_err("copy", &cpath)(io::Error::from(e))),
                        }
                    }
                    let at = buf.len();
                    buf.resize(at + len, 0);
                    cf.read_exact(&mut buf[at..])
                        .map_err(io_err("read", &cpath))?;
                } else {
                    scratch.clear();
                    cf.read_to_end(&mut scratch)
                        .map_err(io_err("read", &cpath))?;
                    let data = lz4_flex::block::decompress(&scratch, len).map_err(|e| {
                        ChunkError::Invalid {
                            path: cpath.clone(),
                            reason: format!("lz4: {e}"),
                        }
                    })?;
                    if data.len() != len {
                        return Err(ChunkError::Invalid {
                            path: cpath,
                            reason: format!("{} bytes, expected {len}", data.len()),
                        });
                    }
                    buf.extend_from_slice(&data);
                }
            }
            out.write_all(&buf).map_err(io_err("write", &tmp))?;
            buf.clear();
            drop(out);
            fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
            bytes += f.size;
        }
        Ok(MaterialiseStats {
            bytes,
            duration: start.elapsed(),
        })
    }

    /// Every chunk file present (for mark-and-sweep), and stray temporary files.
    pub fn list(&self) -> Result<(Vec<ChunkId>, Vec<PathBuf>), ChunkError> {
        let mut ids = Vec::new();
        let mut stray = Vec::new();
        let top = match fs::read_dir(&self.dir) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((ids, stray)),
            Err(e) => return Err(io_err("list", &self.dir)(e)),
        };
        for sub in top {
            let sub = sub.map_err(io_err("list", &self.dir))?;
            let prefix = sub.file_name().to_string_lossy().into_owned();
            if prefix.len() != 2 || !sub.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let subdir = sub.path();
            for e in fs::read_dir(&subdir).map_err(io_err("list", &subdir))? {
                let e = e.map_err(io_err("list", &subdir))?;
                let name = e.file_name().to_string_lossy().into_owned();
                match ChunkId::parse(&format!("{prefix}{name}")) {
                    Some(id) => ids.push(id),
                    None => stray.push(e.path()),
                }
            }
        }
        Ok((ids, stray))
    }
}

/// Copies `len` bytes from `from`'s offset to `to`'s with `copy_file_range`. A
/// failure before the first byte is returned as is (the caller falls back to reading);
/// after it, as `EIO`.
fn copy_all(from: &File, to: &File, len: usize) -> Result<(), Errno> {
    let mut left = len;
    while left > 0 {
        match nix::fcntl::copy_file_range(from, None, to, None, left) {
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => left -= n,
            Err(Errno::EINTR) => {}
            Err(_) if left < len => return Err(Errno::EIO),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reference counts of the chunks of all live checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkRefs {
    refs: HashMap<ChunkId, (u32, u32)>,
    unique: u64,
}

impl ChunkRefs {
    /// Adds one checkpoint's references.
    pub fn add(&mut self, manifest: &Manifest) {
        for (id, stored) in manifest.distinct() {
            let e = self.refs.entry(id).or_insert((stored, 0));
            if e.1 == 0 {
                self.unique += u64::from(e.0);
            }
            e.1 += 1;
        }
    }

    /// Drops one checkpoint's references; returns the chunks no longer referenced,
    /// with their stored sizes.
    pub fn remove(&mut self, manifest: &Manifest) -> Vec<(ChunkId, u32)> {
        let mut freed = Vec::new();
        for id in manifest.distinct().into_keys() {
            if let Some(e) = self.refs.get_mut(&id) {
                e.1 = e.1.saturating_sub(1);
                if e.1 == 0 {
                    let stored = e.0;
                    self.unique -= u64::from(stored);
                    self.refs.remove(&id);
                    freed.push((id, stored));
                }
            }
        }
        freed
    }

    /// Bytes of all referenced chunk files, each counted once.
    pub fn unique_bytes(&self) -> u64 {
        self.unique
    }

    /// Chunks referenced.
    pub fn len(&self) -> usize {
        self.refs.len()
    }

    /// Whether no chunk is referenced.
    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }

    /// Whether `id` is referenced.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.refs.contains_key(id)
    }

    /// Bytes of the chunks that only `manifest` references (what removing it frees).
    pub fn marginal_bytes(&self, manifest: &Manifest) -> u64 {
        manifest
            .distinct()
            .into_iter()
            .filter(|(id, _)| self.refs.get(id).is_some_and(|e| e.1 == 1))
            .map(|(_, stored)| u64::from(stored))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pseudo-random pages (xorshift), deterministic per seed.
    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn cuts(c: &Chunking, data: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let n = c.cut(&data[at..]);
            assert!(n > 0);
            at += n;
            out.push(at);
        }
        out
    }

    #[test]
    fn chunk_ids_round_trip_as_hex() {
        let id = ChunkId::of(b"abc");
        assert_eq!(
            id.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(ChunkId::parse(&id.hex()), Some(id));
        assert_eq!(ChunkId::parse("zz"), None);
        assert_eq!(ChunkId::parse(&"g".repeat(64)), None);
        let json = serde_json::to_string(&ChunkRef(id, 3, 3)).unwrap();
        assert_eq!(
            serde_json::from_str::<ChunkRef>(&json).unwrap(),
            ChunkRef(id, 3, 3)
        );
    }

    #[test]
    fn cuts_are_page_aligned_and_bounded() {
        let c = Chunking::default();
        let data = random(300 * PAGE + 100, 1);
        let ends = cuts(&c, &data);
        let mut prev = 0;
        for (i, &e) in ends.iter().enumerate() {
            let len = e - prev;
            assert!(len <= c.max_bytes);
            if i + 1 < ends.len() {
                assert_eq!(len % PAGE, 0);
                assert!(len >= c.min_bytes);
            }
            prev = e;
        }
        assert_eq!(*ends.last().unwrap(), data.len());
        // Fixed chunking cuts at fixed offsets.
        let f = Chunking::fixed(16 * PAGE);
        assert!(
            cuts(&f, &data[..64 * PAGE])
                .iter()
                .enumerate()
                .all(|(i, e)| *e == (i + 1) * 16 * PAGE)
        );
    }

    #[test]
    fn cuts_resynchronise_after_pages_are_inserted() {
        let c = Chunking::default();
        let data = random(400 * PAGE, 2);
        let mut shifted = random(3 * PAGE, 3);
        shifted.extend_from_slice(&data);
        let a: BTreeSet<ChunkId> = chunk_ids(&c, &data);
        let b: BTreeSet<ChunkId> = chunk_ids(&c, &shifted);
        let common = a.intersection(&b).count();
        assert!(
            common + 3 >= a.len(),
            "{common} of {} chunks shared",
            a.len()
        );
    }

    fn chunk_ids(c: &Chunking, data: &[u8]) -> BTreeSet<ChunkId> {
        let mut prev = 0;
        cuts(c, data)
            .into_iter()
            .map(|e| {
                let id = ChunkId::of(&data[prev..e]);
                prev = e;
                id
            })
            .collect()
    }

    fn ingest(store: &ChunkStore, dir: &Path, data: &[u8]) -> (Manifest, IngestStats) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("pages-1.img"), data).unwrap();
        fs::write(dir.join("core-1.img"), b"core").unwrap();
        store.ingest_dir(dir).unwrap()
    }

    #[test]
    fn ingest_dedups_and_materialise_rebuilds() {
        for compression in [Compression::None, Compression::Lz4] {
            let tmp = tempfile::tempdir().unwrap();
            let store =
                ChunkStore::new(tmp.path().join("chunks"), Chunking::default(), compression);
            // Half random, half compressible.
            let mut one = random(256 * PAGE, 4);
            one.extend(std::iter::repeat_n(7u8, 256 * PAGE));
            let (m1, s1) = ingest(&store, &tmp.path().join("a"), &one);
            assert_eq!(s1.logical_bytes, one.len() as u64);
            assert_eq!(m1.files.len(), 1, "only pages files are chunked");
            // One page changed in the middle: one or two new chunks.
            let mut two = one.clone();
            two[100 * PAGE + 5] ^= 0xff;
            let (m2, s2) = ingest(&store, &tmp.path().join("b"), &two);
            assert!(s2.new_chunks <= 2, "{s2:?}");
            assert!(s2.new_bytes <= 2 * Chunking::default().max_bytes as u64);
            assert_eq!(Manifest::read(&tmp.path().join("b")).unwrap().unwrap(), m2);

            let out = tmp.path().join("out");
            fs::create_dir(&out).unwrap();
            let st = store.materialise(&m2, &out).unwrap();
            assert_eq!(st.bytes, two.len() as u64);
            assert_eq!(fs::read(out.join("pages-1.img")).unwrap(), two);
            let buffered = store.clone().with_copy_file_range(false);
            buffered.materialise(&m2, &out).unwrap();
            assert_eq!(fs::read(out.join("pages-1.img")).unwrap(), two);
            store.materialise(&m1, &out).unwrap();
            assert_eq!(fs::read(out.join("pages-1.img")).unwrap(), one);
            if compression == Compression::Lz4 {
                let stored: u64 = m1.distinct().values().map(|s| u64::from(*s)).sum();
                assert!(stored < one.len() as u64 * 3 / 4, "{stored}");
            }
        }
    }

    #[test]
    fn refcounts_give_unique_and_marginal_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ChunkStore::new(
            tmp.path().join("chunks"),
            Chunking::fixed(PAGE),
            Compression::None,
        );
        // a: pages 0..4, b: pages 2..6 (sharing 2, 3), each page distinct.
        let pages = random(6 * PAGE, 5);
        let (ma, _) = ingest(&store, &tmp.path().join("a"), &pages[..4 * PAGE]);
        let (mb, _) = ingest(&store, &tmp.path().join("b"), &pages[2 * PAGE..]);
        let mut refs = ChunkRefs::default();
        refs.add(&ma);
        refs.add(&mb);
        let p = PAGE as u64;
        assert_eq!(refs.unique_bytes(), 6 * p);
        assert_eq!(refs.marginal_bytes(&ma), 2 * p);
        assert_eq!(refs.marginal_bytes(&mb), 2 * p);
        let freed = refs.remove(&ma);
        assert_eq!(freed.len(), 2);
        assert_eq!(refs.unique_bytes(), 4 * p);
        assert_eq!(refs.marginal_bytes(&mb), 4 * p);
        // A chunk repeated within one checkpoint is referenced once.
        let mut same = pages[..PAGE].to_vec();
        same.extend_from_slice(&pages[..PAGE]);
        let (ms, _) = ingest(&store, &tmp.path().join("s"), &same);
        let mut r = ChunkRefs::default();
        r.add(&ms);
        assert_eq!((r.len(), r.unique_bytes()), (1, p));
        assert_eq!(r.remove(&ms).len(), 1);
        assert!(r.is_empty());
        let (ids, stray) = store.list().unwrap();
        assert_eq!((ids.len(), stray.len()), (6, 0));
    }

    #[test]
    fn damaged_manifests_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(MANIFEST_FILE), b"{").unwrap();
        assert!(matches!(
            Manifest::read(tmp.path()),
            Err(ChunkError::Corrupt { .. })
        ));
        let bad = Manifest {
            version: MANIFEST_VERSION,
            files: vec![ManifestFile {
                name: "../pages-1.img".into(),
                size: 0,
                chunks: vec![],
            }],
        };
        bad.write(tmp.path()).unwrap();
        assert!(matches!(
            Manifest::read(tmp.path()),
            Err(ChunkError::Invalid { .. })
        ));
        assert!(Manifest::read(&tmp.path().join("none")).unwrap().is_none());
    }
}
