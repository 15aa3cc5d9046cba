//! The content cache: byte ranges fetched from the backing, kept in sparse files of a
//! bounded local directory, one file per content version (content-addressed), evicted
//! least-recently-used first. A file whose every byte is present can be handed to the
//! kernel for FUSE passthrough.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backing::hash_bytes;
use crate::error::{BackingError, FsError, FsResult};

/// Disjoint, merged half-open ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Adds `[start, end)`.
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        let overlapping: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in overlapping {
            self.ranges.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// The parts of `[start, end)` not in the set, in order.
    pub fn missing(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        let first = self
            .ranges
            .range(..=start)
            .next_back()
            .map(|(s, _)| *s)
            .unwrap_or(start);
        for (&s, &e) in self.ranges.range(first..) {
            if s >= end {
                break;
            }
            if e <= at {
                continue;
            }
            if s > at {
                out.push((at, s));
            }
            at = at.max(e);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    /// Bytes in the set.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// Read-ahead that doubles its window on sequential reads, from `min` up to `max`, and
/// falls back to `min` on a seek.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAhead {
    next: u64,
    window: u64,
    min: u64,
    max: u64,
}

impl ReadAhead {
    /// A read-ahead starting at `min` bytes.
    pub fn new(min: u64, max: u64) -> Self {
        ReadAhead {
            next: 0,
            window: min,
            min,
            max: max.max(min),
        }
    }

    /// Records a read of `len` bytes at `offset`; returns how many bytes from `offset` to
    /// fetch.
    pub fn advise(&mut self, offset: u64, len: u64) -> u64 {
        if offset == self.next && offset != 0 {
            self.window = (self.window.saturating_mul(2)).min(self.max);
        } else if offset != self.next {
            self.window = self.min;
        }
        self.next = offset.saturating_add(len);
        len.max(self.window)
    }

    /// The current window.
    pub fn window(&self) -> u64 {
        self.window
    }
}

#[derive(Debug)]
struct Entry {
    file: Arc<File>,
    size: u64,
    present: RangeSet,
    last_used: u64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    tick: u64,
    used: u64,
}

/// The cache key of a content version: the version itself when it is a SHA-256 in hex,
/// else the SHA-256 of the version string (so that a key is always a safe file name).
pub fn cache_key(version: &str) -> String {
    if version.len() == 64
        && version
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        version.to_owned()
    } else {
        hash_bytes(version.as_bytes())
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct ContentCache {
    dir: PathBuf,
    max_bytes: u64,
    chunk: u32,
    inner: Mutex<Inner>,
}

impl ContentCache {
    /// A cache in `dir` (created; leftover files of an earlier run are removed) holding at
    /// most about `max_bytes`, fetching at most `chunk` bytes per backing read.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64, chunk: u32) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        for e in fs::read_dir(&dir)? {
            let e = e?;
            if e.file_name().to_str().is_some_and(|n| n.len() == 64) {
                fs::remove_file(e.path())?;
            }
        }
        Ok(ContentCache {
            dir,
            max_bytes,
            chunk: chunk.max(4096),
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    fn entry_file(&self, inner: &mut Inner, key: &str, size: u64) -> io::Result<Arc<File>> {
        inner.tick += 1;
        let tick = inner.tick;
        if let Some(e) = inner.entries.get_mut(key)
            && e.size == size
        {
            e.last_used = tick;
            return Ok(e.file.clone());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.path_of(key))?;
        file.set_len(size)?;
        let file = Arc::new(file);
        if let Some(old) = inner.entries.insert(
            key.to_owned(),
            Entry {
                file: file.clone(),
                size,
                present: RangeSet::default(),
                last_used: tick,
            },
        ) {
            inner.used -= old.present.len();
        }
        Ok(file)
    }

    fn evict(&self, inner: &mut Inner, keep: &str) {
        while inner.used > self.max_bytes {
            let victim = inner
                .entries
                .iter()
                .filter(|(k, _)| k.as_str() != keep)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else { break };
            if let Some(e) = inner.entries.remove(&victim) {
                inner.used -= e.present.len();
                tracing::debug!(key = %victim, bytes = e.present.len(), "evicting cached content");
                let _ = fs::remove_file(self.path_of(&victim));
            }
        }
    }

    /// Reads `len` bytes at `offset` of content `key` of `size` bytes, fetching the
    /// missing parts of `[offset, offset + prefetch)` with `fetch(offset, len)`.
    pub fn read(
        &self,
        key: &str,
        size: u64,
        offset: u64,
        len: u32,
        prefetch: u64,
        fetch: &dyn Fn(u64, u32) -> Result<Vec<u8>, BackingError>,
    ) -> FsResult<Vec<u8>> {
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let end = size.min(offset.saturating_add(u64::from(len)));
        let want_end = size.min(offset.saturating_add(prefetch.max(u64::from(len))));
        let (file, missing) = {
            let mut inner = self.lock();
            let file = self.entry_file(&mut inner, key, size)?;
            let missing = inner
                .entries
                .get(key)
                .map(|e| e.present.missing(offset, want_end))
                .unwrap_or_else(|| vec![(offset, want_end)]);
            (file, missing)
        };
        let mut out = vec![0u8; (end - offset) as usize];
        let mut from_backing = RangeSet::default();
        for (mut at, stop) in missing {
            while at < stop {
                let n = u32::try_from((stop - at).min(u64::from(self.chunk))).unwrap_or(self.chunk);
                let data = fetch(at, n)?;
                if data.is_empty() {
                    break;
                }
                let got_end = at + data.len() as u64;
                // Copy the overlap with the request into the answer.
                let lo = at.max(offset);
                let hi = got_end.min(end);
                if lo < hi {
                    out[(lo - offset) as usize..(hi - offset) as usize]
                        .copy_from_slice(&data[(lo - at) as usize..(hi - at) as usize]);
                    from_backing.insert(lo, hi);
                }
                match file.write_all_at(&data, at) {
                    Ok(()) => {
                        let mut inner = self.lock();
                        if let Some(e) = inner.entries.get_mut(key)
                            && Arc::ptr_eq(&e.file, &file)
                        {
                            let before = e.present.len();
                            e.present.insert(at, got_end);
                            let added = e.present.len() - before;
                            inner.used += added;
                        }
                        self.evict(&mut inner, key);
                    }
                    Err(e) => tracing::warn!(key, error = %e, "cannot write to the content cache"),
                }
                at = got_end;
            }
        }
        for (lo, hi) in from_backing.missing(offset, end) {
            read_full_at(
                &file,
                &mut out[(lo - offset) as usize..(hi - offset) as usize],
                lo,
            )?;
        }
        Ok(out)
    }

    /// The cache file of `key` if all its `size` bytes are present.
    pub fn complete(&self, key: &str, size: u64) -> Option<Arc<File>> {
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        let e = inner.entries.get_mut(key)?;
        if e.size != size || !e.present.missing(0, size).is_empty() {
            return None;
        }
        e.last_used = tick;
        Some(e.file.clone())
    }

    /// Fetches every missing byte of `key`.
    pub fn fill(
        &self,
        key: &str,
        size: u64,
        fetch: &dyn Fn(u64, u32) -> Result<Vec<u8>, BackingError>,
    ) -> FsResult<()> {
        let missing = {
            let mut inner = self.lock();
            self.entry_file(&mut inner, key, size)?;
            inner
                .entries
                .get(key)
                .map(|e| e.present.missing(0, size))
                .unwrap_or_default()
        };
        for (lo, hi) in missing {
            let len = u32::try_from((hi - lo).min(u64::from(u32::MAX))).unwrap_or(u32::MAX);
            self.read(key, size, lo, len.min(self.chunk), hi - lo, fetch)?;
        }
        Ok(())
    }

    /// Takes `path` (a complete local copy of content `key`) into the cache by renaming it.
    pub fn adopt(&self, key: &str, path: &Path, size: u64) -> FsResult<()> {
        let dst = self.path_of(key);
        fs::rename(path, &dst)?;
        let file = Arc::new(OpenOptions::new().read(true).write(true).open(&dst)?);
        let mut inner = self.lock();
        inner.tick += 1;
        let mut present = RangeSet::default();
        present.insert(0, size);
        let entry = Entry {
            file,
            size,
            present,
            last_used: inner.tick,
        };
        if let Some(old) = inner.entries.insert(key.to_owned(), entry) {
            inner.used -= old.present.len();
        }
        inner.used += size;
        self.evict(&mut inner, key);
        Ok(())
    }

    /// Bytes cached.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// Number of versions cached.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads exactly `buf.len()` bytes at `offset` or fails.
pub(crate) fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> FsResult<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            return Err(FsError::Io(io::Error::from(io::ErrorKind::UnexpectedEof)));
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn range_set() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        assert_eq!(r.missing(0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(r.missing(12, 18), vec![]);
        assert_eq!(r.missing(15, 35), vec![(20, 30)]);
        r.insert(20, 30);
        assert_eq!(r.missing(0, 50), vec![(0, 10), (40, 50)]);
        assert_eq!(r.len(), 30);
        r.insert(5, 45);
        assert_eq!(r.len(), 40);
        assert_eq!(r.missing(5, 45), vec![]);
    }

    #[test]
    fn read_ahead_grows_on_sequential_reads() {
        let mut ra = ReadAhead::new(100, 1000);
        assert_eq!(ra.advise(0, 10), 100);
        assert_eq!(ra.advise(10, 10), 200);
        assert_eq!(ra.advise(20, 10), 400);
        assert_eq!(ra.advise(30, 10), 800);
        assert_eq!(ra.advise(40, 10), 1000);
        assert_eq!(ra.advise(5000, 10), 100);
    }

    #[test]
    fn fetches_once_and_evicts_lru() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ContentCache::new(dir.path(), 250, 4096).unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        let calls = Cell::new(0);
        let fetch = |off: u64, len: u32| {
            calls.set(calls.get() + 1);
            let end = (off as usize + len as usize).min(data.len());
            Ok(data[off as usize..end].to_vec())
        };
        let k1 = cache_key("one");
        assert_eq!(
            cache.read(&k1, 100, 10, 5, 0, &fetch).unwrap(),
            &data[10..15]
        );
        assert!(cache.complete(&k1, 100).is_none());
        assert_eq!(cache.read(&k1, 100, 0, 100, 0, &fetch).unwrap(), data);
        let before = calls.get();
        assert_eq!(
            cache.read(&k1, 100, 50, 10, 0, &fetch).unwrap(),
            &data[50..60]
        );
        assert_eq!(calls.get(), before, "a cached range is not fetched again");
        assert!(cache.complete(&k1, 100).is_some());
        // Reads past the end are short.
        assert_eq!(
            cache.read(&k1, 100, 95, 10, 0, &fetch).unwrap(),
            &data[95..]
        );
        let k2 = cache_key("two");
        let k3 = cache_key("three");
        cache.fill(&k2, 100, &fetch).unwrap();
        cache.fill(&k3, 100, &fetch).unwrap();
        assert!(cache.used() <= 250);
        assert!(cache.complete(&k1, 100).is_none(), "the oldest was evicted");
        assert!(cache.complete(&k3, 100).is_some());
        assert!(!dir.path().join(&k1).exists());
    }
}
