//! The content cache: byte ranges fetched from the backing, kept in sparse files of a
//! bounded local directory, one file per content version (content-addressed), evicted
//! least-recently-used first. A file whose every byte is present can be handed to the
//! kernel for FUSE passthrough.
//!
//! The buffers of the latest fetches are also kept in memory for a while ([`Recent`]): a
//! sequential reader mostly waits for a read-ahead fetch, and is then answered with a
//! slice of its buffer rather than by reading the bytes back from the cache file.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};

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
/// falls back to `min` on a seek. A read that starts within the window of where the
/// last one ended counts as sequential: the kernel's concurrent read-ahead requests
/// reach the daemon's threads slightly out of order.
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
        let end = offset.saturating_add(len);
        if offset.abs_diff(self.next) > self.window {
            self.window = self.min;
            self.next = end;
        } else {
            if offset != 0 {
                self.window = (self.window.saturating_mul(2)).min(self.max);
            }
            self.next = self.next.max(end);
        }
        len.max(self.window)
    }

    /// The current window.
    pub fn window(&self) -> u64 {
        self.window
    }
}

/// Fetches up to `len` bytes at `offset` of one content version from the backing; may
/// be called from several threads at once (read-ahead).
pub type Fetch = Arc<dyn Fn(u64, u32) -> Result<Bytes, BackingError> + Send + Sync>;

/// The fetches a read starts: see [`plan_fetches`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchPlan {
    /// Missing parts of the requested range that nobody is fetching: the reader fetches
    /// them itself, in order.
    pub need: Vec<(u64, u64)>,
    /// Missing parts of the read-ahead window that nobody is fetching, to fetch in the
    /// background (at most the in-flight bound, counting fetches already running).
    pub ahead: Vec<(u64, u64)>,
    /// Whether part of the requested range is being fetched by someone else: the reader
    /// waits for it.
    pub wait: bool,
}

/// Plans the fetches of a read of `[offset, end)` with read-ahead up to `ahead_end`, of
/// content of `size` bytes, given the bytes `present` and the ranges `in_flight`. Every
/// fetch lies within one `chunk`-aligned chunk of the content, so concurrent readers
/// and read-ahead ask for the same ranges; a window of at least one chunk is rounded up
/// to a chunk boundary, so a sequential reader's read-ahead asks for whole chunks, not
/// for the sliver its window moved by. At most `max_in_flight` fetches run at once
/// (counting `in_flight`); the requested range is fetched regardless.
pub fn plan_fetches(
    present: &RangeSet,
    in_flight: &BTreeMap<u64, u64>,
    size: u64,
    (offset, end): (u64, u64),
    ahead_end: u64,
    chunk: u64,
    max_in_flight: usize,
) -> FetchPlan {
    let chunk = chunk.max(1);
    let end = end.min(size);
    let mut covered = present.clone();
    for (&s, &e) in in_flight {
        covered.insert(s, e);
    }
    let missing_len = |set: &RangeSet, a: u64, b: u64| -> u64 {
        set.missing(a, b).iter().map(|(s, e)| e - s).sum()
    };
    let mut plan = FetchPlan {
        wait: missing_len(&covered, offset, end) < missing_len(present, offset, end),
        ..FetchPlan::default()
    };
    let split = |covered: &RangeSet, a: u64, b: u64, out: &mut Vec<(u64, u64)>, max: usize| {
        for (mut s, e) in covered.missing(a, b) {
            while s < e && out.len() < max {
                let stop = e.min((s / chunk + 1).saturating_mul(chunk));
                out.push((s, stop));
                s = stop;
            }
        }
    };
    split(&covered, offset, end, &mut plan.need, usize::MAX);
    for &(s, e) in &plan.need {
        covered.insert(s, e);
    }
    let window = ahead_end.saturating_sub(offset);
    let mut ahead_end = ahead_end.min(size);
    if window >= chunk {
        ahead_end = ahead_end.div_ceil(chunk).saturating_mul(chunk).min(size);
    }
    let room = max_in_flight.saturating_sub(in_flight.len() + plan.need.len());
    if end < ahead_end && room > 0 {
        split(&covered, end, ahead_end, &mut plan.ahead, room);
    }
    plan
}

/// Buffers of the latest fetches, by content version (`key`, plus the `generation` of its
/// cache entry, which changes when the entry is recreated) and offset; at most
/// `max_bytes`, oldest out first. A sequential reader drops a buffer once it has read its
/// last byte.
#[derive(Debug, Default)]
pub struct Recent {
    held: VecDeque<Held>,
    bytes: usize,
    max_bytes: usize,
}

#[derive(Debug)]
struct Held {
    key: String,
    generation: u64,
    at: u64,
    data: Bytes,
}

impl Held {
    fn end(&self) -> u64 {
        self.at + self.data.len() as u64
    }

    fn is(&self, key: &str, generation: u64) -> bool {
        self.generation == generation && self.key == key
    }
}

impl Recent {
    /// Keeps at most `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Recent {
            max_bytes,
            ..Recent::default()
        }
    }

    /// Keeps `data`, the bytes at `at` of `key` (entry `generation`), dropping the oldest
    /// buffers beyond the bound.
    pub fn insert(&mut self, key: &str, generation: u64, at: u64, data: Bytes) {
        if data.is_empty() || data.len() > self.max_bytes {
            return;
        }
        self.bytes += data.len();
        self.held.push_back(Held {
            key: key.to_owned(),
            generation,
            at,
            data,
        });
        while self.bytes > self.max_bytes {
            let Some(old) = self.held.pop_front() else {
                break;
            };
            self.bytes -= old.data.len();
        }
    }

    /// The held parts of `[start, end)` of `key` (entry `generation`), in order, as
    /// `(offset, bytes)`; buffers whose last byte is in the range are dropped.
    pub fn take(&mut self, key: &str, generation: u64, start: u64, end: u64) -> Vec<(u64, Bytes)> {
        let mut out = Vec::new();
        let mut bytes = self.bytes;
        self.held.retain(|h| {
            if !h.is(key, generation) || h.end() <= start || h.at >= end {
                return true;
            }
            let (lo, hi) = (h.at.max(start), h.end().min(end));
            out.push((lo, h.data.slice((lo - h.at) as usize..(hi - h.at) as usize)));
            let keep = h.end() > end;
            if !keep {
                bytes -= h.data.len();
            }
            keep
        });
        self.bytes = bytes;
        out.sort_unstable_by_key(|(at, _)| *at);
        // Held buffers may overlap (a range fetched twice): keep disjoint parts.
        let mut next = start;
        out.retain_mut(|(at, b)| {
            let stop = *at + b.len() as u64;
            if stop <= next {
                return false;
            }
            if *at < next {
                *b = b.slice((next - *at) as usize..);
                *at = next;
            }
            next = stop;
            true
        });
        out
    }

    /// Forgets every buffer of `key`.
    pub fn forget(&mut self, key: &str) {
        let mut bytes = self.bytes;
        self.held.retain(|h| {
            let keep = h.key != key;
            if !keep {
                bytes -= h.data.len();
            }
            keep
        });
        self.bytes = bytes;
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[derive(Debug)]
struct Entry {
    /// Distinguishes this entry from an earlier one of the same key.
    generation: u64,
    file: Arc<File>,
    size: u64,
    present: RangeSet,
    /// Ranges being fetched (disjoint), start -> end.
    in_flight: BTreeMap<u64, u64>,
    last_used: u64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    tick: u64,
    used: u64,
    recent: Recent,
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
    shared: Arc<Shared>,
    chunk: u32,
    max_in_flight: usize,
}

/// What the cache shares with its read-ahead threads.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
    /// Signalled whenever a fetch ends (its range present, or given up).
    fetched: Condvar,
}

impl ContentCache {
    /// A cache in `dir` (created; leftover files of an earlier run are removed) holding at
    /// most about `max_bytes`, fetching at most `chunk` bytes per backing read, with at
    /// most `max_in_flight` backing reads of one content version running at once.
    pub fn new(
        dir: impl Into<PathBuf>,
        max_bytes: u64,
        chunk: u32,
        max_in_flight: usize,
    ) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        for e in fs::read_dir(&dir)? {
            let e = e?;
            if e.file_name().to_str().is_some_and(|n| n.len() == 64) {
                fs::remove_file(e.path())?;
            }
        }
        let (chunk, max_in_flight) = (chunk.max(4096), max_in_flight.max(1));
        // Room for a whole read-ahead window and the chunk being read.
        let recent = (max_in_flight + 1).saturating_mul(chunk as usize);
        Ok(ContentCache {
            shared: Arc::new(Shared {
                dir,
                max_bytes,
                inner: Mutex::new(Inner {
                    recent: Recent::new(recent),
                    ..Inner::default()
                }),
                fetched: Condvar::new(),
            }),
            chunk,
            max_in_flight,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock()
    }

    fn path_of(&self, key: &str) -> PathBuf {
        self.shared.path_of(key)
    }

    fn evict(&self, inner: &mut Inner, keep: &str) {
        self.shared.evict(inner, keep)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The cache file of `key` (created if needed) and the generation of its entry.
    fn entry_file(&self, inner: &mut Inner, key: &str, size: u64) -> io::Result<(Arc<File>, u64)> {
        inner.tick += 1;
        let tick = inner.tick;
        if let Some(e) = inner.entries.get_mut(key)
            && e.size == size
        {
            e.last_used = tick;
            return Ok((e.file.clone(), e.generation));
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
                generation: tick,
                file: file.clone(),
                size,
                present: RangeSet::default(),
                in_flight: BTreeMap::new(),
                last_used: tick,
            },
        ) {
            inner.used -= old.present.len();
            inner.recent.forget(key);
        }
        Ok((file, tick))
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
                inner.recent.forget(&victim);
                tracing::debug!(key = %victim, bytes = e.present.len(), "evicting cached content");
                let _ = fs::remove_file(self.path_of(&victim));
            }
        }
    }

    /// Records `data`, fetched at `at` into `file` (the entry of `key` when the fetch
    /// started), and ends the fetch that started at `at`.
    fn store(&self, key: &str, file: &Arc<File>, at: u64, data: &Bytes) {
        let written = match file.write_all_at(data, at) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(key, error = %e, "cannot write to the content cache");
                false
            }
        };
        let mut inner = self.lock();
        if let Some(e) = inner.entries.get_mut(key)
            && Arc::ptr_eq(&e.file, file)
        {
            e.in_flight.remove(&at);
            let added = if written {
                let before = e.present.len();
                e.present.insert(at, at + data.len() as u64);
                e.present.len() - before
            } else {
                0
            };
            let generation = e.generation;
            inner.used += added;
            if written {
                inner.recent.insert(key, generation, at, data.clone());
            }
        }
        self.evict(&mut inner, key);
        drop(inner);
        self.fetched.notify_all();
    }

    /// Ends the fetch of `[at, ..)` of `key` without data.
    fn abandon(&self, key: &str, file: &Arc<File>, at: u64) {
        let mut inner = self.lock();
        if let Some(e) = inner.entries.get_mut(key)
            && Arc::ptr_eq(&e.file, file)
        {
            e.in_flight.remove(&at);
        }
        drop(inner);
        self.fetched.notify_all();
    }
}

impl ContentCache {
    /// Reads `len` bytes at `offset` of content `key` of `size` bytes, fetching the
    /// missing parts of `[offset, offset + len)` with `fetch(offset, len)` and starting
    /// background fetches of `[offset, offset + prefetch)` (see [`plan_fetches`]). A part
    /// another reader or the read-ahead is already fetching is waited for, and taken from
    /// its buffer while that is held in memory ([`Recent`]); other parts are read from the
    /// cache file. A range within one fetched buffer is answered without a copy.
    pub fn read(
        &self,
        key: &str,
        size: u64,
        offset: u64,
        len: u32,
        prefetch: u64,
        fetch: &Fetch,
    ) -> FsResult<Bytes> {
        if offset >= size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = size.min(offset.saturating_add(u64::from(len)));
        let ahead_end = size.min(offset.saturating_add(prefetch.max(u64::from(len))));
        // Parts of the answer, by offset, and the ranges they cover.
        let mut parts: BTreeMap<u64, Bytes> = BTreeMap::new();
        let mut got = RangeSet::default();
        loop {
            let (file, plan) = {
                let mut inner = self.lock();
                let (file, _) = self.shared.entry_file(&mut inner, key, size)?;
                let Some(e) = inner.entries.get_mut(key) else {
                    break;
                };
                let plan = plan_fetches(
                    &e.present,
                    &e.in_flight,
                    size,
                    (offset, end),
                    ahead_end,
                    u64::from(self.chunk),
                    self.max_in_flight,
                );
                for &(s, stop) in plan.need.iter().chain(&plan.ahead) {
                    e.in_flight.insert(s, stop);
                }
                (file, plan)
            };
            for &(s, stop) in &plan.ahead {
                self.fetch_in_background(key, &file, s, stop, fetch);
            }
            for (i, &(at, stop)) in plan.need.iter().enumerate() {
                let n = u32::try_from(stop - at).unwrap_or(self.chunk);
                let data = match fetch(at, n) {
                    Ok(d) => d,
                    Err(err) => {
                        for &(s, _) in &plan.need[i..] {
                            self.shared.abandon(key, &file, s);
                        }
                        return Err(err.into());
                    }
                };
                // The overlap with the request is part of the answer.
                let lo = at.max(offset);
                let hi = (at + data.len() as u64).min(end);
                if lo < hi {
                    for (a, b) in got.missing(lo, hi) {
                        parts.insert(a, data.slice((a - at) as usize..(b - at) as usize));
                    }
                    got.insert(lo, hi);
                }
                self.shared.store(key, &file, at, &data);
            }
            if !plan.wait {
                break;
            }
            // Someone else is fetching part of the range: wait until nothing overlapping
            // it is in flight, then plan again (a failed fetch is retried by this reader,
            // whose own error then reaches the kernel).
            let mut inner = self.lock();
            loop {
                let busy = inner.entries.get(key).is_some_and(|e| {
                    Arc::ptr_eq(&e.file, &file)
                        && e.in_flight
                            .range(..end)
                            .next_back()
                            .is_some_and(|(_, &stop)| stop > offset)
                });
                if !busy {
                    break;
                }
                inner = self
                    .shared
                    .fetched
                    .wait(inner)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
        let file = {
            let mut inner = self.lock();
            let (file, generation) = self.shared.entry_file(&mut inner, key, size)?;
            for (lo, hi) in got.missing(offset, end) {
                for (at, b) in inner.recent.take(key, generation, lo, hi) {
                    got.insert(at, at + b.len() as u64);
                    parts.insert(at, b);
                }
            }
            file
        };
        for (lo, hi) in got.missing(offset, end) {
            let mut buf = vec![0u8; (hi - lo) as usize];
            read_full_at(&file, &mut buf, lo)?;
            parts.insert(lo, Bytes::from(buf));
        }
        Ok(join_parts(parts, (end - offset) as usize))
    }

    /// Fetches `[at, stop)` of `key` on a read-ahead thread.
    fn fetch_in_background(&self, key: &str, file: &Arc<File>, at: u64, stop: u64, fetch: &Fetch) {
        let (shared, key_owned, file_owned, fetch) = (
            self.shared.clone(),
            key.to_owned(),
            file.clone(),
            fetch.clone(),
        );
        let n = u32::try_from(stop - at).unwrap_or(self.chunk);
        let spawned = std::thread::Builder::new()
            .name("nbfs-readahead".into())
            .spawn(move || match fetch(at, n) {
                Ok(data) => shared.store(&key_owned, &file_owned, at, &data),
                Err(e) => {
                    tracing::debug!(key = %key_owned, at, error = %e, "read-ahead failed");
                    shared.abandon(&key_owned, &file_owned, at);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a read-ahead thread");
            self.shared.abandon(key, file, at);
        }
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

    /// Starts fetching all `size` bytes of `key` (at most one chunk) on a read-ahead
    /// thread, unless any of it is present or in flight already. A reader of it waits
    /// for that fetch rather than asking again. `fetch` makes the fetcher, and is
    /// called only when a fetch starts.
    pub fn prefetch(&self, key: &str, size: u64, fetch: impl FnOnce() -> Fetch) -> FsResult<()> {
        if size == 0 || size > u64::from(self.chunk) {
            return Ok(());
        }
        let file = {
            let mut inner = self.lock();
            let (file, _) = self.shared.entry_file(&mut inner, key, size)?;
            let Some(e) = inner.entries.get_mut(key) else {
                return Ok(());
            };
            if !e.present.is_empty() || !e.in_flight.is_empty() {
                return Ok(());
            }
            e.in_flight.insert(0, size);
            file
        };
        self.fetch_in_background(key, &file, 0, size, &fetch());
        Ok(())
    }

    /// Fetches every missing byte of `key`.
    pub fn fill(&self, key: &str, size: u64, fetch: &Fetch) -> FsResult<()> {
        let missing = {
            let mut inner = self.lock();
            self.shared.entry_file(&mut inner, key, size)?;
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
            generation: inner.tick,
            file,
            size,
            present,
            in_flight: BTreeMap::new(),
            last_used: inner.tick,
        };
        if let Some(old) = inner.entries.insert(key.to_owned(), entry) {
            inner.used -= old.present.len();
            inner.recent.forget(key);
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

/// The answer made of disjoint `parts` (by offset, covering `len` bytes in order): the
/// one part itself, or a copy of them all.
fn join_parts(parts: BTreeMap<u64, Bytes>, len: usize) -> Bytes {
    if parts.len() == 1 {
        return parts.into_values().next().unwrap_or_default();
    }
    let mut out = BytesMut::with_capacity(len);
    for b in parts.into_values() {
        out.extend_from_slice(&b);
    }
    out.freeze()
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn set(ranges: &[(u64, u64)]) -> RangeSet {
        let mut r = RangeSet::default();
        for &(s, e) in ranges {
            r.insert(s, e);
        }
        r
    }

    #[test]
    fn plan_keeps_a_bounded_window_of_whole_chunks_in_flight() {
        const C: u64 = 100;
        let none = BTreeMap::new();
        // A small first read: only its own bytes and a small window, no rounding.
        let p = plan_fetches(&set(&[]), &none, 10_000, (0, 10), 50, C, 4);
        assert_eq!(p.need, vec![(0, 10)]);
        assert_eq!(p.ahead, vec![(10, 50)]);
        assert!(!p.wait);
        // A window of at least a chunk is rounded up to whole chunks, split per chunk,
        // and bounded by the in-flight limit (the needed part counts).
        let p = plan_fetches(&set(&[]), &none, 10_000, (0, 10), 1000, C, 4);
        assert_eq!(p.need, vec![(0, 10)]);
        assert_eq!(p.ahead, vec![(10, 100), (100, 200), (200, 300)]);
        // A sequential reader inside a chunk being fetched waits for it, and tops the
        // window up with the next whole chunks, never the sliver its window moved by.
        let fl: BTreeMap<u64, u64> = [(300, 400), (400, 500)].into();
        let p = plan_fetches(&set(&[(0, 300)]), &fl, 10_000, (290, 310), 690, C, 4);
        assert!(p.need.is_empty());
        assert!(p.wait);
        assert_eq!(p.ahead, vec![(500, 600), (600, 700)]);
        // At the bound nothing more starts; the requested range is fetched regardless.
        let fl: BTreeMap<u64, u64> = [(100, 200), (200, 300), (300, 400), (400, 500)].into();
        let p = plan_fetches(&set(&[]), &fl, 10_000, (0, 50), 1000, C, 4);
        assert_eq!(p.need, vec![(0, 50)]);
        assert!(p.ahead.is_empty());
        assert!(!p.wait);
        // Present bytes are skipped, a read across a chunk boundary is split at it, and
        // nothing is planned past the end of the content.
        let p = plan_fetches(&set(&[(120, 130)]), &none, 250, (90, 160), 1000, C, 8);
        assert_eq!(p.need, vec![(90, 100), (100, 120), (130, 160)]);
        assert_eq!(p.ahead, vec![(160, 200), (200, 250)]);
        // A fully present range plans nothing.
        let p = plan_fetches(&set(&[(0, 250)]), &none, 250, (0, 250), 1000, C, 8);
        assert_eq!(p, FetchPlan::default());
    }

    #[test]
    fn concurrent_read_ahead_fills_the_right_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ContentCache::new(dir.path(), 1 << 30, 4096, 4).unwrap();
        let data: Arc<Vec<u8>> = Arc::new((0..200_000u32).map(|i| (i % 251) as u8).collect());
        let d = data.clone();
        let fetch: Fetch = Arc::new(move |off: u64, len: u32| {
            let end = (off as usize + len as usize).min(d.len());
            Ok(Bytes::copy_from_slice(&d[off as usize..end]))
        });
        let key = cache_key("seq");
        let size = data.len() as u64;
        let mut ra = ReadAhead::new(4096, 64 << 10);
        let mut at = 0u64;
        while at < size {
            let prefetch = ra.advise(at, 1000);
            let got = cache.read(&key, size, at, 1000, prefetch, &fetch).unwrap();
            let end = (at as usize + 1000).min(data.len());
            assert_eq!(got, &data[at as usize..end], "at {at}");
            at += 1000;
        }
        // Read-ahead threads may still be finishing; a fill waits for them.
        cache.fill(&key, size, &fetch).unwrap();
        let file = cache.complete(&key, size).expect("complete");
        let mut all = vec![0u8; data.len()];
        read_full_at(&file, &mut all, 0).unwrap();
        assert_eq!(all, *data);
    }

    #[test]
    fn recent_buffers_answer_reads_and_stay_bounded() {
        let data: Bytes = (0..=255u8).collect::<Vec<u8>>().into();
        let mut r = Recent::new(250);
        r.insert("k", 1, 0, data.slice(0..100));
        r.insert("k", 1, 100, data.slice(100..200));
        r.insert("other", 1, 0, data.slice(0..10));
        assert_eq!(r.bytes(), 210);
        // Another generation of the key, or a range nothing holds: nothing.
        assert!(r.take("k", 2, 0, 10).is_empty());
        assert!(r.take("k", 1, 200, 210).is_empty());
        // A range inside one buffer is a slice of it, which is kept.
        let got = r.take("k", 1, 10, 20);
        assert_eq!(got, vec![(10, data.slice(10..20))]);
        assert_eq!(r.bytes(), 210);
        // A range across two buffers: both parts, in order; the first buffer, read to
        // its end, is dropped.
        let got = r.take("k", 1, 90, 110);
        assert_eq!(
            got,
            vec![(90, data.slice(90..100)), (100, data.slice(100..110))]
        );
        assert_eq!(r.bytes(), 110);
        assert!(r.take("k", 1, 0, 10).is_empty());
        // The bound drops the oldest buffers; a buffer over the bound is not kept.
        r.insert("k", 1, 200, data.slice(200..256));
        r.insert("k", 1, 0, data.slice(0..100));
        assert_eq!(r.bytes(), 166);
        assert!(r.take("k", 1, 100, 110).is_empty());
        assert_eq!(r.take("other", 1, 0, 10), vec![(0, data.slice(0..10))]);
        assert_eq!(r.bytes(), 156);
        r.insert("big", 1, 0, Bytes::from(vec![0; 251]));
        assert_eq!(r.bytes(), 156);
        // Overlapping buffers give disjoint parts.
        r.insert("k", 1, 50, data.slice(50..150));
        let got = r.take("k", 1, 40, 160);
        assert_eq!(
            got,
            vec![(40, data.slice(40..100)), (100, data.slice(100..150))]
        );
        r.forget("k");
        assert_eq!(r.bytes(), 0);
    }

    #[test]
    fn a_waiting_reader_is_answered_from_the_fetched_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ContentCache::new(dir.path(), 1 << 30, 4096, 4).unwrap();
        let data: Bytes = (0..16384u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into();
        let d = data.clone();
        let fetch: Fetch = Arc::new(move |off: u64, len: u32| {
            let end = (off as usize + len as usize).min(d.len());
            Ok(d.slice(off as usize..end))
        });
        let key = cache_key("mem");
        let size = data.len() as u64;
        // The first read fetches its range and starts the read-ahead of the next chunks.
        let got = cache.read(&key, size, 0, 4096, 16384, &fetch).unwrap();
        assert_eq!(got, data.slice(0..4096));
        // Reads inside a fetched chunk are slices of the fetched buffer itself.
        let got = cache.read(&key, size, 4096, 1000, 16384, &fetch).unwrap();
        assert_eq!(got, data.slice(4096..5096));
        assert_eq!(got.as_ptr(), data[4096..].as_ptr(), "no copy");
        // A read across two chunks is joined.
        let got = cache.read(&key, size, 8000, 1000, 16384, &fetch).unwrap();
        assert_eq!(got, data.slice(8000..9000));
        // Once the buffers are gone the cache file answers.
        cache.lock().recent.forget(&key);
        let got = cache.read(&key, size, 10_000, 4000, 16384, &fetch).unwrap();
        assert_eq!(got, data.slice(10_000..14_000));
    }

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
        // Requests swapped by concurrent threads keep the window growing.
        let mut ra = ReadAhead::new(100, 1000);
        assert_eq!(ra.advise(0, 50), 100);
        assert_eq!(ra.advise(100, 50), 200);
        assert_eq!(ra.advise(50, 50), 400);
        assert_eq!(ra.advise(150, 50), 800);
    }

    #[test]
    fn fetches_once_and_evicts_lru() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ContentCache::new(dir.path(), 250, 4096, 4).unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        let calls = Arc::new(AtomicUsize::new(0));
        let (c, d) = (calls.clone(), data.clone());
        let fetch: Fetch = Arc::new(move |off: u64, len: u32| {
            c.fetch_add(1, Ordering::SeqCst);
            let end = (off as usize + len as usize).min(d.len());
            Ok(Bytes::copy_from_slice(&d[off as usize..end]))
        });
        let k1 = cache_key("one");
        assert_eq!(
            cache.read(&k1, 100, 10, 5, 0, &fetch).unwrap(),
            &data[10..15]
        );
        assert!(cache.complete(&k1, 100).is_none());
        assert_eq!(cache.read(&k1, 100, 0, 100, 0, &fetch).unwrap(), data);
        let before = calls.load(Ordering::SeqCst);
        assert_eq!(
            cache.read(&k1, 100, 50, 10, 0, &fetch).unwrap(),
            &data[50..60]
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            before,
            "a cached range is not fetched again"
        );
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
