//! Content-addressed blob store on the local filesystem.
//!
//! A blob lives at `<dir>/sha256/<first two hex digits>/<64 hex digits>`, named by the
//! lower-case hex SHA-256 of its content. Uploads arrive in chunks, possibly resent after a
//! reconnect; they are assembled with positioned writes in `<dir>/partial/<uploader>-<hash>`
//! and, once the last byte is in, synced, verified against the hash and renamed into place
//! atomically. Hashes and uploader names come from the network and are validated before
//! they go anywhere near a path.
//!
//! The API is synchronous (std only); call it from `tokio::task::spawn_blocking` in async
//! code.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tracing::{debug, warn};

/// Largest blob accepted unless configured otherwise: 1 GiB.
pub const DEFAULT_MAX_BLOB_SIZE: u64 = 1 << 30;

/// Longest uploader name accepted in a partial file name.
const MAX_UPLOADER_LEN: usize = 128;

/// How much of an invalid, untrusted value is kept in an error.
const MAX_ECHO: usize = 80;

/// Errors from the blob store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// The hash is not 64 lower-case hex digits.
    #[error("invalid blob hash {hash:?} (expected 64 lower-case hex digits)")]
    InvalidHash {
        /// The offending value (cut to 80 characters).
        hash: String,
    },
    /// The uploader name cannot be used in a file name.
    #[error("invalid uploader name {uploader:?}")]
    InvalidUploader {
        /// The offending value (cut to 80 characters).
        uploader: String,
    },
    /// The announced blob size exceeds the configured maximum.
    #[error("blob of {total} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The announced size.
        total: u64,
        /// The configured maximum.
        max: u64,
    },
    /// A chunk reaches past the announced end of the blob.
    #[error("chunk at offset {offset} of {len} bytes reaches past the blob size {total}")]
    ChunkOutOfRange {
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        len: u64,
        /// Announced blob size.
        total: u64,
    },
    /// The assembled content does not hash to the announced hash; the partial upload was
    /// deleted.
    #[error("blob content hashes to {actual}, not the announced {expected}")]
    HashMismatch {
        /// The announced hash.
        expected: String,
        /// The hash of what was received.
        actual: String,
    },
    /// No blob with that hash is stored.
    #[error("blob {hash} not found")]
    NotFound {
        /// The hash.
        hash: String,
    },
    /// A filesystem operation failed.
    #[error("blob store cannot {op} {path:?}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What [`BlobStore::write_chunk`] did with a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChunkOutcome {
    /// The chunk was written; the blob is not complete yet.
    Written {
        /// End offset of this chunk (`offset + len`).
        end: u64,
    },
    /// This chunk completed the blob: it was verified and is now stored.
    Complete {
        /// Size of the blob in bytes.
        size: u64,
    },
    /// The blob is already stored; the chunk was ignored.
    AlreadyPresent,
}

/// A content-addressed blob store rooted at one directory.
#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
    max_size: u64,
    fsync: bool,
    /// Running hashes of uploads whose chunks arrived in order, so completion needs no
    /// second read of the file. Lost on restart: completion then re-reads the file.
    running: Mutex<HashMap<PathBuf, RunningHash>>,
}

#[derive(Debug)]
struct RunningHash {
    next: u64,
    hasher: Sha256,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BlobError {
    let path = path.to_owned();
    move |source| BlobError::Io { op, path, source }
}

fn echo(value: &str) -> String {
    value.chars().take(MAX_ECHO).collect()
}

/// Checks that `hash` is exactly 64 lower-case hex digits.
pub fn validate_hash(hash: &str) -> Result<(), BlobError> {
    let ok = hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if ok {
        Ok(())
    } else {
        Err(BlobError::InvalidHash { hash: echo(hash) })
    }
}

fn validate_uploader(uploader: &str) -> Result<(), BlobError> {
    let ok = !uploader.is_empty()
        && uploader.len() <= MAX_UPLOADER_LEN
        && !uploader.starts_with('.')
        && uploader
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(BlobError::InvalidUploader {
            uploader: echo(uploader),
        })
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

impl BlobStore {
    /// Opens the store in `dir`, creating `dir/sha256` and `dir/partial` if needed.
    pub fn open(dir: impl Into<PathBuf>) -> Result<BlobStore, BlobError> {
        let root = dir.into();
        for sub in ["sha256", "partial"] {
            let path = root.join(sub);
            fs::create_dir_all(&path).map_err(io_err("create directory", &path))?;
        }
        Ok(BlobStore {
            root,
            max_size: DEFAULT_MAX_BLOB_SIZE,
            fsync: true,
            running: Mutex::new(HashMap::new()),
        })
    }

    /// Whether a completed blob is fsynced (file and directory) before it counts as
    /// stored. On by default; off trades power-loss durability for disk bandwidth (a
    /// server crash still loses nothing: the page cache survives it).
    pub fn with_fsync(mut self, fsync: bool) -> BlobStore {
        self.fsync = fsync;
        self
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, RunningHash>> {
        match self.running.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Feeds an in-order chunk to the running hash of `partial`; any other chunk
    /// drops it (completion then hashes the file).
    fn track(&self, partial: &Path, offset: u64, bytes: &[u8]) {
        let mut running = self.running();
        if offset == 0 {
            let mut hasher = Sha256::new();
            hasher.update(bytes);
            running.insert(
                partial.to_owned(),
                RunningHash {
                    next: bytes.len() as u64,
                    hasher,
                },
            );
            return;
        }
        match running.get_mut(partial) {
            Some(r) if r.next == offset => {
                r.hasher.update(bytes);
                r.next += bytes.len() as u64;
            }
            _ => {
                running.remove(partial);
            }
        }
    }

    /// Sets the largest blob size accepted by uploads.
    pub fn with_max_size(mut self, max_size: u64) -> BlobStore {
        self.max_size = max_size;
        self
    }

    /// The largest blob size accepted by uploads.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `hash` is (or would be) stored.
    pub fn path(&self, hash: &str) -> Result<PathBuf, BlobError> {
        validate_hash(hash)?;
        Ok(self.root.join("sha256").join(&hash[..2]).join(hash))
    }

    fn partial_path(&self, uploader: &str, hash: &str) -> Result<PathBuf, BlobError> {
        validate_uploader(uploader)?;
        validate_hash(hash)?;
        Ok(self.root.join("partial").join(format!("{uploader}-{hash}")))
    }

    /// Whether the blob `hash` is stored.
    pub fn has(&self, hash: &str) -> Result<bool, BlobError> {
        let path = self.path(hash)?;
        path.try_exists().map_err(io_err("check", &path))
    }

    /// The content of the blob `hash`.
    pub fn read(&self, hash: &str) -> Result<Vec<u8>, BlobError> {
        let path = self.path(hash)?;
        fs::read(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                BlobError::NotFound {
                    hash: hash.to_owned(),
                }
            } else {
                BlobError::Io {
                    op: "read",
                    path,
                    source,
                }
            }
        })
    }

    /// Up to `len` bytes of the blob `hash` from `offset`, and whether they reach its end.
    pub fn read_range(
        &self,
        hash: &str,
        offset: u64,
        len: usize,
    ) -> Result<(Vec<u8>, bool), BlobError> {
        let path = self.path(hash)?;
        let file = File::open(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                BlobError::NotFound {
                    hash: hash.to_owned(),
                }
            } else {
                BlobError::Io {
                    op: "open",
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let size = file.metadata().map_err(io_err("stat", &path))?.len();
        let start = offset.min(size);
        let want = usize::try_from((size - start).min(len as u64)).unwrap_or(len);
        // Read into spare capacity: the buffer is not zeroed first.
        let mut buf = Vec::with_capacity(want);
        let mut file = &file;
        file.seek(io::SeekFrom::Start(start))
            .and_then(|_| file.take(want as u64).read_to_end(&mut buf))
            .map_err(io_err("read", &path))?;
        if buf.len() != want {
            return Err(io_err("read", &path)(io::Error::from(
                io::ErrorKind::UnexpectedEof,
            )));
        }
        Ok((buf, start + want as u64 >= size))
    }

    /// Stores `bytes` (if not already stored) and returns their hash.
    pub fn put(&self, bytes: &[u8]) -> Result<String, BlobError> {
        let hash = sha256_hex(bytes);
        if self.has(&hash)? {
            return Ok(hash);
        }
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("partial")
            .join(format!(".put-{}-{n}-{hash}", std::process::id()));
        let result = (|| {
            let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
            f.write_all(bytes).map_err(io_err("write", &tmp))?;
            f.sync_all().map_err(io_err("sync", &tmp))?;
            self.install(&tmp, &hash)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| hash)
    }

    /// Writes one chunk of an upload of the blob `hash` (`total` bytes) by `uploader`.
    ///
    /// Idempotent: a chunk may be written again after a resend. The chunk that reaches
    /// `total` completes the upload: the partial file is synced, its SHA-256 checked
    /// against `hash` and, if it matches, renamed into place ([`ChunkOutcome::Complete`]);
    /// if it does not match, the partial file is deleted and
    /// [`BlobError::HashMismatch`] returned. Chunks of a blob already stored are ignored
    /// ([`ChunkOutcome::AlreadyPresent`]).
    pub fn write_chunk(
        &self,
        uploader: &str,
        hash: &str,
        offset: u64,
        total: u64,
        bytes: &[u8],
    ) -> Result<ChunkOutcome, BlobError> {
        let partial = self.partial_path(uploader, hash)?;
        if total > self.max_size {
            return Err(BlobError::TooLarge {
                total,
                max: self.max_size,
            });
        }
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= total)
            .ok_or(BlobError::ChunkOutOfRange { offset, len, total })?;
        if self.has(hash)? {
            // A stale partial from an interrupted upload is of no use any more.
            remove_if_exists(&partial)?;
            return Ok(ChunkOutcome::AlreadyPresent);
        }

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(io_err("open", &partial))?;
        file.write_all_at(bytes, offset)
            .map_err(io_err("write", &partial))?;
        self.track(&partial, offset, bytes);
        if end < total {
            return Ok(ChunkOutcome::Written { end });
        }

        // Last chunk: the file must now hold exactly `total` bytes that hash to `hash`.
        // An earlier attempt that announced a larger size may have left bytes past the end.
        file.set_len(total).map_err(io_err("truncate", &partial))?;
        if self.fsync {
            file.sync_all().map_err(io_err("sync", &partial))?;
        }
        let streamed = self
            .running()
            .remove(&partial)
            .filter(|r| r.next == total)
            .map(|r| hex::encode(r.hasher.finalize()));
        let actual = match streamed {
            Some(h) => h,
            None => hash_file(&file, &partial)?,
        };
        drop(file);
        if actual != hash {
            warn!(
                uploader,
                hash, actual, "uploaded blob does not match its hash"
            );
            remove_if_exists(&partial)?;
            return Err(BlobError::HashMismatch {
                expected: hash.to_owned(),
                actual,
            });
        }
        self.install(&partial, hash)?;
        debug!(uploader, hash, size = total, "blob stored");
        Ok(ChunkOutcome::Complete { size: total })
    }

    /// Deletes partial uploads not written to for `max_age` or longer (abandoned by an
    /// uploader that never came back) and returns how many were deleted.
    pub fn remove_stale_partials(&self, max_age: Duration) -> Result<usize, BlobError> {
        let dir = self.root.join("partial");
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let path = entry.path();
            let modified = match entry.metadata().and_then(|m| m.modified()) {
                Ok(t) => t,
                // Completed or removed by a concurrent upload since the listing.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(BlobError::Io {
                        op: "inspect",
                        path,
                        source,
                    });
                }
            };
            // A modification time in the future counts as fresh.
            if now.duration_since(modified).is_ok_and(|age| age >= max_age) {
                remove_if_exists(&path)?;
                debug!(path = %path.display(), "removed stale partial upload");
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Renames the verified, synced file `from` into the place of blob `hash`.
    fn install(&self, from: &Path, hash: &str) -> Result<(), BlobError> {
        let dest = self.path(hash)?;
        let dir = dest
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.root.clone());
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        if let Err(source) = fs::rename(from, &dest) {
            // A concurrent upload of the same content may have finished first.
            if source.kind() == io::ErrorKind::NotFound && dest.exists() {
                return Ok(());
            }
            return Err(BlobError::Io {
                op: "rename into place",
                path: dest,
                source,
            });
        }
        if self.fsync {
            sync_dir(&dir)?;
        }
        Ok(())
    }
}

fn remove_if_exists(path: &Path) -> Result<(), BlobError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(BlobError::Io {
            op: "remove",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn hash_file(mut file: &File, path: &Path) -> Result<String, BlobError> {
    use std::io::Seek;
    file.rewind().map_err(io_err("rewind", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn partials(store: &BlobStore) -> Vec<String> {
        fs::read_dir(store.root().join("partial"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }

    #[test]
    fn chunks_in_order_assemble_the_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = content(10_000);
        let hash = sha256_hex(&data);
        let total = data.len() as u64;
        let mut outcomes = Vec::new();
        for (i, chunk) in data.chunks(4096).enumerate() {
            let offset = (i * 4096) as u64;
            outcomes.push(
                store
                    .write_chunk("agent-1", &hash, offset, total, chunk)
                    .unwrap(),
            );
        }
        assert_eq!(
            outcomes,
            vec![
                ChunkOutcome::Written { end: 4096 },
                ChunkOutcome::Written { end: 8192 },
                ChunkOutcome::Complete { size: total },
            ]
        );
        assert!(store.has(&hash).unwrap());
        assert_eq!(store.read(&hash).unwrap(), data);
        let path = store.path(&hash).unwrap();
        assert_eq!(path, dir.path().join("sha256").join(&hash[..2]).join(&hash));
        assert!(partials(&store).is_empty(), "partial left behind");
        // Chunks of a stored blob are accepted and ignored.
        assert_eq!(
            store
                .write_chunk("agent-2", &hash, 0, total, &data[..10])
                .unwrap(),
            ChunkOutcome::AlreadyPresent
        );
        assert!(partials(&store).is_empty());
    }

    #[test]
    fn a_resent_chunk_is_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = content(3000);
        let hash = sha256_hex(&data);
        let total = data.len() as u64;
        store
            .write_chunk("a", &hash, 0, total, &data[..1000])
            .unwrap();
        store
            .write_chunk("a", &hash, 1000, total, &data[1000..2000])
            .unwrap();
        // Reconnect: the agent resends from the last chunk it is unsure about.
        store
            .write_chunk("a", &hash, 1000, total, &data[1000..2000])
            .unwrap();
        store
            .write_chunk("a", &hash, 0, total, &data[..1000])
            .unwrap();
        let last = store
            .write_chunk("a", &hash, 2000, total, &data[2000..])
            .unwrap();
        assert_eq!(last, ChunkOutcome::Complete { size: total });
        assert_eq!(store.read(&hash).unwrap(), data);
    }

    #[test]
    fn a_wrong_hash_is_refused_and_the_partial_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = content(100);
        let claimed = sha256_hex(b"something else");
        let err = store
            .write_chunk("a", &claimed, 0, data.len() as u64, &data)
            .unwrap_err();
        match err {
            BlobError::HashMismatch { expected, actual } => {
                assert_eq!(expected, claimed);
                assert_eq!(actual, sha256_hex(&data));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!store.has(&claimed).unwrap());
        assert!(partials(&store).is_empty());
    }

    #[test]
    fn a_missing_middle_chunk_fails_verification() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = content(300);
        let hash = sha256_hex(&data);
        store.write_chunk("a", &hash, 0, 300, &data[..100]).unwrap();
        let err = store
            .write_chunk("a", &hash, 200, 300, &data[200..])
            .unwrap_err();
        assert!(matches!(err, BlobError::HashMismatch { .. }), "{err:?}");
        // Starting over works.
        store.write_chunk("a", &hash, 0, 300, &data[..150]).unwrap();
        let done = store
            .write_chunk("a", &hash, 150, 300, &data[150..])
            .unwrap();
        assert_eq!(done, ChunkOutcome::Complete { size: 300 });
    }

    #[test]
    fn path_tricks_in_hashes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let good = sha256_hex(b"x");
        let bad = [
            "../x".to_owned(),
            format!("../{}", &good[3..]),
            good.to_uppercase(),
            good[..63].to_owned(),
            format!("{good}0"),
            String::new(),
            format!("{}/{}", &good[..2], &good[3..]),
            format!("{}g", &good[..63]),
        ];
        for hash in &bad {
            assert!(
                matches!(store.path(hash), Err(BlobError::InvalidHash { .. })),
                "path({hash:?})"
            );
            assert!(matches!(
                store.has(hash),
                Err(BlobError::InvalidHash { .. })
            ));
            assert!(matches!(
                store.read(hash),
                Err(BlobError::InvalidHash { .. })
            ));
            assert!(matches!(
                store.write_chunk("a", hash, 0, 1, b"x"),
                Err(BlobError::InvalidHash { .. })
            ));
        }
        for uploader in ["", "../a", "a/b", ".hidden", "a b", &"x".repeat(200)] {
            assert!(
                matches!(
                    store.write_chunk(uploader, &good, 0, 1, b"x"),
                    Err(BlobError::InvalidUploader { .. })
                ),
                "uploader {uploader:?}"
            );
        }
        assert!(partials(&store).is_empty());
    }

    #[test]
    fn oversize_and_out_of_range_chunks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap().with_max_size(1000);
        let hash = sha256_hex(b"whatever");
        assert!(matches!(
            store.write_chunk("a", &hash, 0, 1001, b"x"),
            Err(BlobError::TooLarge {
                total: 1001,
                max: 1000
            })
        ));
        assert!(matches!(
            store.write_chunk("a", &hash, 95, 100, &[0; 10]),
            Err(BlobError::ChunkOutOfRange {
                offset: 95,
                len: 10,
                total: 100
            })
        ));
        assert!(matches!(
            store.write_chunk("a", &hash, u64::MAX, 100, &[0; 10]),
            Err(BlobError::ChunkOutOfRange { .. })
        ));
        assert!(partials(&store).is_empty());
        assert_eq!(
            BlobStore::open(dir.path()).unwrap().max_size(),
            DEFAULT_MAX_BLOB_SIZE
        );
    }

    #[test]
    fn put_is_idempotent_and_read_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let h1 = store.put(b"hello").unwrap();
        assert_eq!(
            h1,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(store.put(b"hello").unwrap(), h1);
        assert_eq!(store.read(&h1).unwrap(), b"hello");
        let empty = store.put(b"").unwrap();
        assert_eq!(store.read(&empty).unwrap(), b"");
        let missing = sha256_hex(b"missing");
        assert!(!store.has(&missing).unwrap());
        assert!(matches!(
            store.read(&missing),
            Err(BlobError::NotFound { hash }) if hash == missing
        ));
        assert!(partials(&store).is_empty());
    }

    #[test]
    fn stale_partials_are_removed_fresh_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let old = sha256_hex(b"old");
        let fresh = sha256_hex(b"fresh");
        store.write_chunk("a", &old, 0, 10, b"ol").unwrap();
        store.write_chunk("a", &fresh, 0, 10, b"fr").unwrap();
        let old_path = dir.path().join("partial").join(format!("a-{old}"));
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(&old_path)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
        assert_eq!(
            store
                .remove_stale_partials(Duration::from_secs(600))
                .unwrap(),
            1
        );
        assert_eq!(partials(&store), vec![format!("a-{fresh}")]);
    }

    #[test]
    fn an_empty_blob_completes_with_one_empty_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let hash = sha256_hex(b"");
        assert_eq!(
            store.write_chunk("a", &hash, 0, 0, b"").unwrap(),
            ChunkOutcome::Complete { size: 0 }
        );
        assert!(store.has(&hash).unwrap());
    }
}
