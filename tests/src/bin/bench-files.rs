//! Attached-files benchmark over the real channel: the real `nbsupervisor` runs the real
//! `nbagent` (and its ipykernel, which stays idle), files are attached on an in-process
//! `nbserver` through its API, and the agent mounts them with FUSE and serves every
//! listing and read through its production path (`ChannelBacking` -> `files::serve` ->
//! mutual TLS -> nbserver's files table and blob store). The benchmark process times
//! file operations as root against the mount points, side by side with the same
//! operations on the native filesystem of the same disk, and prints each ratio with its
//! target.
//!
//! `cargo build --release --bins -p nbagent -p nbserver -p nbsupervisor &&
//!  cargo run --release -p nbagent-tests --bin bench-files [-- --size-mib 1024 --files 10000]`
//! (`--only-read`: the sequential reads only, a quicker run).
//!
//! Needs root (to drop the page cache and to mount), `/dev/fuse`, and what the kernel
//! tests need (the `nbuser` account, /opt/nbagent/venv); and about 7x the file size free
//! in `$TMPDIR` (native copies, the server's blobs, the agent's cache, staging and
//! outbox all live there, on one filesystem).
//!
//! Method. "Cold" means the page cache was dropped first (`echo 3 >
//! /proc/sys/vm/drop_caches`, which also forgets FUSE's dentries and inodes) and, for the
//! mount, that the agent has never fetched the bytes: a cold read comes from the server.
//! The small files are attached to the workspace tree after the agent mounted it, and
//! the stat loop runs once the agent's listing is older than its TTL (60 s), so the cold
//! stat loop includes the first listing of the 10,000 files from the server. Memory is
//! touched before timing (this VM hands freed memory back to the host lazily), and dirty
//! pages of earlier phases are written back and memory touched again (untimed) right
//! before each timed write; the write is the best of three, the two sides alternating.
//! The write figure includes the close, which links the file into the outbox (the
//! kernel's `RELEASE` right after it hashes the file and queues its `file_chunk`
//! records); the close's share and when the server has stored the file are printed
//! below the table. The `ls -l` row lists the directory and stats every entry after the
//! kernel's caches were dropped (the agent's listing is then fresh): `READDIRPLUS`
//! answers the attributes with the names, so no `stat` asks the daemon again.
//!
//! Measured here on 2026-12-08 (release; kernel 6.18, 2 vCPUs, nothing else running;
//! `$TMPDIR` on the ext4 root disk, 35% full), with busy polling of `/dev/fuse`, the
//! faster re-listing (agent) and tree query (server), and sibling prefetch:
//!
//! ```text
//!                                             native       nbagent    ratio            target  met
//! 1024 MiB seq read, cold (from server)     1.23 GB/s     0.50 GB/s      41%      >= 1.00 GB/s   NO
//! 1024 MiB seq read, warm                 14.87 GB/s    12.91 GB/s      87%     >= 90% native   NO
//! 1024 MiB seq write + close               0.76 GB/s     3.00 GB/s     397%     >= 50% native  yes
//! stat 10000 files, cold (listing)         75k ops/s     26k ops/s      34%      >= 20k ops/s  yes
//! stat 10000 files, warm                  357k ops/s    395k ops/s     111%     >= 80% native  yes
//! list + stat 10000 files (ls -l), cold     48k ops/s    130k ops/s     272%                 -    -
//! open+4 KiB read+close x10000, cold      7k files/s    2k files/s      31%                 -    -
//! open+4 KiB read+close x10000, warm    149k files/s   16k files/s      11%                 -    -
//!
//! CPU time of the cold read per GiB: agent 1.76 s, server and reader 1.79 s
//! cold stat: the first one (with the listing from the server) took 47 ms
//! ```
//!
//! This VM's figures move a lot from run to run, so here are seven whole runs of the
//! day's builds (cold stat with its first stat's listing; warm stat and warm read
//! ratios; warm small-file opens):
//!
//! ```text
//! busy poll   cold stat   first stat   warm stat   warm read   small files warm
//! on          22k         91 ms        74%         -           15k/s    (before the server's tree query)
//! on          28k         51 ms        77%         96%         15k/s    (a disturbed run: write 27%)
//! on          24k         72 ms        118%        101%        22k/s
//! on          21k         61 ms        73%         97%         19k/s
//! on          15k         90 ms        119%        100%        12k/s    (CPU per GiB 2.5 s: a slow run)
//! on          26k         47 ms        111%        87%         16k/s    (the table above)
//! on          17k         37 ms        82%         100%        18k/s    (write 45%: a 0.67 s close)
//! off         12k         91 ms        84%         92%          8k/s    (--files-busy-poll-us 0)
//! ```
//!
//! Warm stat and warm read never reach the daemon (kernel caches, passthrough), so
//! their spread (73-119%, 87-101%) is this VM's, not the agent's. With polling, a cold
//! `stat` costs one `LOOKUP` round trip of ~35-45 us instead of ~70 us; what is left is
//! mostly waking the `stat` process itself on its idle vCPU when the answer comes, and
//! the other worker, woken for every request although the polling one takes it.
//! Before today's work the first stat took 86-91 ms: the server read 10,000 rows
//! through sqlx's `Any` driver (55-75 ms; one aggregated JSON row now takes 12-18 ms)
//! and the agent applied the listing in ~27 ms (10 ms now). The cold small-file loop
//! (2-3k files/s) now overlaps the next eight files' fetches, yet `perf record -a`
//! over the stat and small-file phases of the last run found the vCPUs 74% idle: the
//! loop waits rather than computes. Each file still costs a `LOOKUP` and an `OPEN`
//! round trip, a passthrough backing registration, and on the server a cold blob read
//! and a query of its files table, and the agent creates a cache file for it; which
//! of these dominates is not measured yet.
//!
//! Measured here on 2026-12-07 (release; kernel 6.18, 2 vCPUs, nothing else running;
//! `$TMPDIR` on the ext4 root disk, 44% full):
//!
//! ```text
//! attached files over the real channel (release binaries; nbserver over mutual TLS; FUSE passthrough on)
//! native side, the server's blobs and the agent's cache, staging and outbox: ext4 (/dev/vda at /)
//!
//!                                             native       nbagent    ratio            target  met
//! 1024 MiB seq read, cold (from server)     1.46 GB/s     0.52 GB/s      36%      >= 1.00 GB/s   NO
//! 1024 MiB seq read, warm                 15.46 GB/s    15.10 GB/s      98%     >= 90% native  yes
//! 1024 MiB seq write + close               1.29 GB/s     0.69 GB/s      53%     >= 50% native  yes
//! stat 10000 files, cold (listing)        104k ops/s     17k ops/s      17%      >= 20k ops/s   NO
//! stat 10000 files, warm                  406k ops/s    411k ops/s     101%     >= 80% native  yes
//! list + stat 10000 files (ls -l), cold     93k ops/s     99k ops/s     106%                 -    -
//! open+4 KiB read+close x10000, cold      8k files/s    2k files/s      23%                 -    -
//! open+4 KiB read+close x10000, warm    219k files/s   11k files/s       5%                 -    -
//!
//! CPU time of the cold read per GiB: agent 1.79 s, server and reader 1.65 s
//! out.bin: close took 0.00 s of the 1.57 s write; stored by the server 1.4 s after the close returned
//! ```
//!
//! The write varies most between runs on this day: the run before gave 0.31 GB/s
//! (close 0.50 s of a 3.48 s write, native 3.96 GB/s), and the previous session's
//! build, run between the two, 0.50 GB/s (close 0.47 s of 2.14 s, native 3.46 GB/s);
//! the passthrough write itself, not the close, took the time, so this disk's
//! writeback, not the daemon (which sees no write calls), sets it. Cold stat was 15k,
//! 13k (previous build) and 17k ops/s; warm stat 91%, 67% and 101% of native.
//!
//! Measured on 2026-12-03, third session (same machine):
//!
//! ```text
//!                                             native       nbagent    ratio            target  met
//! 1024 MiB seq read, cold (from server)     1.07 GB/s     0.52 GB/s      49%      >= 1.00 GB/s   NO
//! 1024 MiB seq read, warm                 13.02 GB/s    12.97 GB/s     100%     >= 90% native  yes
//! 1024 MiB seq write + close               1.11 GB/s     1.38 GB/s     125%     >= 50% native  yes
//! stat 10000 files, cold (listing)         98k ops/s     13k ops/s      13%      >= 20k ops/s   NO
//! stat 10000 files, warm                  451k ops/s    281k ops/s      62%     >= 80% native   NO
//! list + stat 10000 files (ls -l), cold     64k ops/s    105k ops/s     165%                 -    -
//! open+4 KiB read+close x10000, cold      7k files/s    2k files/s      21%                 -    -
//! open+4 KiB read+close x10000, warm    148k files/s    9k files/s       6%                 -    -
//!
//! CPU time of the cold read per GiB: agent 1.96 s, server and reader 1.63 s
//! out.bin: close took 0.00 s of the 0.78 s write; stored by the server 1.6 s after the close returned
//! ```
//!
//! The run before that (same day, same build) gave write + close 1.17 vs 0.92 GB/s (126%),
//! cold stat 17k ops/s, warm stat 302k vs 359k (84%), `ls -l` cold 104k vs 69k ops/s,
//! cold read 0.49 GB/s. The native page-cache write of 1 GiB varies from 0.9 to 3.3 GB/s
//! between runs on this VM; with `--size-mib 512` the write was 3.19 vs 2.93 GB/s (109%).
//!
//! The session before (close still hashing the file):
//!
//! ```text
//!                                             native       nbagent    ratio            target  met
//! 1024 MiB seq read, cold (from server)     1.58 GB/s     0.57 GB/s      36%      >= 1.00 GB/s   NO
//! 1024 MiB seq read, warm                 13.25 GB/s    13.29 GB/s     100%     >= 90% native  yes
//! 1024 MiB seq write + close               3.31 GB/s     0.96 GB/s      29%     >= 50% native   NO
//! stat 10000 files, cold (listing)         67k ops/s     13k ops/s      20%      >= 20k ops/s   NO
//! stat 10000 files, warm                  329k ops/s    317k ops/s      96%     >= 80% native  yes
//! out.bin: close took 0.79 s of the 1.12 s write; stored by the server 10.0 s after the close returned
//! ```
//!
//! An earlier session's run (before the changes described below; 2 vCPUs shared with
//! three other helpers' builds, load average 5-8):
//!
//! ```text
//! attached files over the real channel (release binaries; nbserver over mutual TLS; FUSE passthrough on)
//! native side, the server's blobs and the agent's cache, staging and outbox: ext4 (/dev/vda at /)
//!
//!                                             native       nbagent    ratio            target  met
//! 1024 MiB seq read, cold (from server)     1.28 GB/s     0.18 GB/s      14%      >= 1.00 GB/s   NO
//! 1024 MiB seq read, warm                  6.22 GB/s     6.73 GB/s     108%     >= 90% native  yes
//! 1024 MiB seq write + close               0.61 GB/s     0.17 GB/s      28%     >= 50% native   NO
//! stat 10000 files, cold (listing)        101k ops/s     64k ops/s      64%      >= 20k ops/s  yes
//! stat 10000 files, warm                  679k ops/s    926k ops/s     136%     >= 80% native  yes
//! open+4 KiB read+close x10000, cold      7k files/s    2k files/s      35%                 -    -
//! open+4 KiB read+close x10000, warm    356k files/s   62k files/s      17%                 -    -
//!
//! ```
//!
//! The same with `TMPDIR=/dev/shm` (tmpfs; "cold" native reads are then memory reads,
//! and the server's blobs are in memory too):
//!
//! ```text
//! 1024 MiB seq read, cold (from server)     7.04 GB/s     0.21 GB/s       3%      >= 1.00 GB/s   NO
//! 1024 MiB seq read, warm                  7.45 GB/s     4.61 GB/s      62%     >= 90% native   NO
//! 1024 MiB seq write + close               3.31 GB/s     0.40 GB/s      12%     >= 50% native   NO
//! stat 10000 files, cold (listing)        406k ops/s     83k ops/s      20%      >= 20k ops/s  yes
//! stat 10000 files, warm                  884k ops/s    760k ops/s      86%     >= 80% native  yes
//! open+4 KiB read+close x10000, cold    255k files/s    4k files/s       2%                 -    -
//! open+4 KiB read+close x10000, warm    358k files/s   72k files/s      20%                 -    -
//! ```
//!
//! Where the time goes, for the targets missed:
//!
//! - **Cold read** (0.2 GB/s in the table above, target 1 GB/s: not met). The table was taken
//!   when the content cache fetched its read-ahead window as 4 MiB `file_read` queries
//!   one after the other and the server answered one connection's queries in order:
//!   one request in flight, ~0.7 of the 2 vCPUs busy. Since then the cache keeps up to
//!   8 chunk-aligned 4 MiB fetches in flight (background read-ahead over a window of up
//!   to 32 MiB) and the server answers up to 8 `file_read` queries of a connection at
//!   once. With `--size-mib 512 --files 2000` on the ext4 disk (load average 2.5-4)
//!   the cold read went from 0.24 GB/s to 0.37 GB/s. `perf record -a` during the read
//!   now finds the vCPUs busy (idle ~3%): kernel copies to and from user space
//!   (`_copy_to_iter` 12%), user-space memmove 12%, AES-GCM encryption and decryption
//!   ~3% each, memset 3% (zeroed buffers), spinlocks ~10%. Per byte the path still
//!   costs two AES-GCM passes and about seven copies (blob pread, TLS write, TLS read,
//!   frame payload, cache pwrite, cache pread for the reply, `/dev/fuse`), so the next
//!   lever is copies, not concurrency.
//!
//!   Then (this session): the mount raises the kernel read-ahead of its backing device
//!   to 8 MiB (`/sys/class/bdi/<dev>/read_ahead_kb`; INIT caps it at 128 KiB), so the
//!   daemon gets 1 MiB reads (512 per 512 MiB instead of 4096, counted with the
//!   `fuse:fuse_request_send` tracepoint); a reader waiting for a read-ahead chunk is
//!   answered with a slice of the fetched buffer (kept in memory, bounded) instead of a
//!   pread of the cache file; the agent keeps the `file_data` payload as it came (no
//!   `Vec` copy); the server reads blobs into unzeroed buffers and writes large payloads
//!   after the header instead of copying them next to it; the agent's TLS stream reads
//!   the socket through a 256 KiB buffer (rustls asks for 4 KiB at a time: 64x fewer
//!   receive calls). The run prints the CPU time of the cold read per GiB, which the
//!   load of this shared machine disturbs less than the throughput. `--only-read`,
//!   `TMPDIR=/dev/shm` (no disk in the way), before and after alternated three times
//!   (load average 2-3.5, another helper's builds using ~35% of the vCPUs):
//!
//!   ```text
//!                      cold read         CPU per GiB: agent   server + reader
//!   before             0.24-0.43 GB/s    2.7-3.1 s            1.8-2.1 s
//!   after              0.41-0.48 GB/s    2.1-2.5 s            1.7-1.8 s
//!   ```
//!
//!   On the ext4 disk (`--size-mib 512 --files 1000`) the two are within the noise
//!   (0.35 and 0.27 GB/s in one back-to-back pair; native cold 0.9-1.0 GB/s, and the
//!   agent's cache writes share the disk with the server's blob reads); warm reads are
//!   unchanged (passthrough, ~100% of native). About 4 CPU-seconds per GiB on 2 vCPUs
//!   caps the cold read near 0.5 GB/s. `perf record -p <agent>` finds the agent's time
//!   in the TLS reader (~60%: rustls copies each decrypted record into a `Vec` in
//!   `take_received_plaintext` and again into our buffer, memmove ~15% of the agent;
//!   AES-GCM ~8%; loopback TCP), the read-ahead threads' cache writes (~20%, mostly
//!   page allocation and the copy into the page cache) and the FUSE replies (~17%,
//!   the copy into the reader's page cache). What is left: rustls' unbuffered API (or
//!   kTLS) to decrypt into the frame buffer, one copy and a pass fewer per byte on each
//!   side; the cache write is the price of warm reads and passthrough.
//! - **Write + close** (0.96 GB/s, 29% of a 3.3 GB/s page-cache write; the writes
//!   themselves run at native speed through passthrough: 0.33 s of the 1.12 s). It was
//!   0.17-0.4 GB/s when the close copied the staged file to a snapshot, hashed it and
//!   appended 1 GiB of `file_chunk` records to the outbox (three passes, and the
//!   outbox's 1 GiB bound made the tail wait for acknowledgements). Now the close hashes
//!   the file once and hard-links it into the outbox as an attachment whose records
//!   reference its ranges (no copy; sealed against later writers); under the default
//!   periodic fsync policy the attachment is synced by the periodic sync, not in the
//!   close (with that fsync in the close, the same run gave 0.62 GB/s, the close taking
//!   1.31 s). What was left was the hash itself: SHA-256 runs at ~1.5 GB/s here
//!   (SHA-NI), ~0.7 s per GiB. Then (third session) the hash left the close: `FLUSH`
//!   only hands the file over (a hard link into the outbox with a small note: root,
//!   path, base version; recovered and uploaded after a crash of the agent), and the
//!   kernel's `RELEASE`, which the closing process does not wait for, hashes it and
//!   appends its records. The close now takes ~0 s and write + close runs at the speed
//!   of the passthrough write (109-126% of native across four runs; the figure was also
//!   skewed before by memory the VM handed back to the host between the native and the
//!   mount's write, now touched right before each). A close that lands on an ext4
//!   journal commit (the periodic outbox fsync of an earlier upload) can still wait for
//!   it: one round of one run took 0.64 s in the close.
//! - **Cold metadata** (13-17k ops/s here, target 20k: not met on an idle VM). Each
//!   `stat` of a name the kernel forgot is a `LOOKUP` round trip to the daemon, ~70 us,
//!   most of it waking a thread on an idle vCPU: this guest's `haltpoll` cpuidle driver
//!   runs with `guest_halt_poll_ns` 0, so every wakeup of an idle vCPU is a halt exit to
//!   the host. With `echo 200000 > /sys/module/haltpoll/parameters/guest_halt_poll_ns`
//!   the `fuse-bench` example's cold stat of 10,000 files went from 12.5k to 49.6k
//!   ops/s (set back to 0 after; a tuning of the VM, not of the agent, so not counted
//!   here). With a busy loop on the other vCPU it doubles (8.2k -> 17.9k), and the
//!   earlier 64k ops/s was measured at load average 5-8. The listing of the 10,000
//!   files from the server, in the first `stat`, takes ~70 ms. A listing followed by
//!   `stat`s (`ls -l`, `os.scandir`, `glob`) asks the daemon once per 4 KiB of entries,
//!   not once per name (`READDIRPLUS`): 105k ops/s, faster than native ext4 here.
//! - **Warm read** (met on disk, 108%; 62-170% across the tmpfs runs): the read is
//!   passed through to the complete cache file; the spread is this shared machine.
//! - **Small files, cold** (2-6k files/s): each open fetches the whole file from the
//!   server, one round trip per file; the first listing itself is cheap (~70 ms for
//!   10,000 entries).
//!
//! The first run found a bug: the listing of the 10,000 files is a 1.5 MB `file_listing`
//! header, over the protocol's 1 MiB limit, and the agent dropped the connection at
//! every re-listing; the agent now accepts headers of up to 16 MiB from the server.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nbagent_protocol::FileRoot;
use nbagent_tests::kernel::{Notebook, Setup, missing_prerequisite};
use serde_json::Value;

/// The agent's listing TTL (`nbagent_fusefs::DEFAULT_TTL`).
const LISTING_TTL: Duration = Duration::from_secs(60);
/// Size of each small file.
const SMALL: usize = 4096;

struct Args {
    size_mib: u64,
    files: usize,
    /// Only the sequential reads (a quicker run when working on the read path).
    only_read: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        size_mib: 1024,
        files: 10_000,
        only_read: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--size-mib" => a.size_mib = it.next().context("--size-mib needs a value")?.parse()?,
            "--files" => a.files = it.next().context("--files needs a value")?.parse()?,
            "--only-read" => a.only_read = true,
            other => bail!("unknown flag {other}; flags: --size-mib N --files N --only-read"),
        }
    }
    Ok(a)
}

/// Flushes dirty pages and drops the page cache, dentries and inodes.
fn drop_caches() -> anyhow::Result<()> {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").context("drop caches (needs root)")
}

fn touch_memory(bytes: usize) {
    // This VM hands freed memory back to the host lazily: touch it before timing.
    let mut v = vec![0u8; bytes];
    for i in (0..bytes).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(&v);
}

/// Deterministic, incompressible-looking bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
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

fn read_all(path: &Path) -> anyhow::Result<(u64, Duration)> {
    let start = Instant::now();
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok((total, start.elapsed()))
}

/// Writes `data` to a new file and closes it; returns the time of the whole and of the
/// close alone. Dirty pages of earlier work are written back first and memory for the
/// new page cache is touched (untimed), so that neither side pays for the other's
/// writeback or for the memory the VM handed back to the host while the other ran.
fn write_all(path: &Path, data: &[u8]) -> anyhow::Result<(Duration, Duration)> {
    nix::unistd::sync();
    touch_memory(data.len().saturating_mul(2));
    let start = Instant::now();
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    for chunk in data.chunks(1 << 20) {
        f.write_all(chunk)?;
    }
    let closing = Instant::now();
    drop(f); // close: for the mount, the upload into the outbox
    Ok((start.elapsed(), closing.elapsed()))
}

fn small_name(i: usize) -> String {
    format!("f{i:05}")
}

fn stat_loop(dir: &Path, n: usize) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for i in 0..n {
        let p = dir.join(small_name(i));
        let m = fs::metadata(&p).with_context(|| format!("stat {}", p.display()))?;
        anyhow::ensure!(
            m.len() == SMALL as u64,
            "{} has {} bytes",
            p.display(),
            m.len()
        );
    }
    Ok(start.elapsed())
}

/// Lists `dir` and stats every entry (`ls -l`); returns the time and the count.
fn list_stat(dir: &Path) -> anyhow::Result<(Duration, usize)> {
    let start = Instant::now();
    let mut n = 0;
    for e in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let m = fs::metadata(e?.path())?;
        anyhow::ensure!(
            m.len() == SMALL as u64,
            "a small file has {} bytes",
            m.len()
        );
        n += 1;
    }
    Ok((start.elapsed(), n))
}

/// Opens each small file, reads 4 KiB, closes it.
fn small_reads(dir: &Path, n: usize) -> anyhow::Result<Duration> {
    let mut buf = vec![0u8; SMALL];
    let start = Instant::now();
    for i in 0..n {
        let p = dir.join(small_name(i));
        let mut f = File::open(&p).with_context(|| format!("open {}", p.display()))?;
        f.read_exact(&mut buf)
            .with_context(|| format!("read {}", p.display()))?;
    }
    Ok(start.elapsed())
}

/// The shortest of `n` runs (warm figures: the machine is shared, the best run is the
/// one least disturbed).
fn best_of(n: usize, mut f: impl FnMut() -> anyhow::Result<Duration>) -> anyhow::Result<Duration> {
    let mut best = f()?;
    for _ in 1..n {
        best = best.min(f()?);
    }
    Ok(best)
}

/// Compares two files chunk by chunk (untimed).
fn same_content(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

/// User plus system CPU time of process `pid`, or of this process (the in-process
/// server and the reading thread).
fn cpu_time(pid: Option<i32>) -> anyhow::Result<Duration> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks =
        |i: usize| -> anyhow::Result<u64> { Ok(f.get(i).context("short stat line")?.parse()?) };
    // utime and stime are fields 14 and 15, that is 11 and 12 after the name.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 1000 / hz))
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// The type of the filesystem holding `path` (the longest matching mount point).
fn fs_type_of(path: &Path) -> String {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, at, ty) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(at)
                .then(|| (at.len(), format!("{ty} ({dev} at {at})")))
        })
        .max_by_key(|(n, _)| *n)
        .map_or_else(|| "unknown".to_owned(), |(_, t)| t)
}

/// Whether the agent reported the notebook tree mounted with passthrough.
fn passthrough(log: &Path) -> anyhow::Result<Option<bool>> {
    let text = fs::read_to_string(log)?;
    Ok(text.lines().find_map(|line| {
        let v: Value = serde_json::from_str(line).ok()?;
        (v["fields"]["message"] == "attached files mounted")
            .then(|| v["fields"]["passthrough"].as_bool())
            .flatten()
    }))
}

/// One row of the table: throughputs (higher is better), the target, whether it is met.
struct Row {
    what: String,
    native: f64,
    agent: f64,
    unit: &'static str,
    target: Target,
}

#[derive(Clone, Copy)]
enum Target {
    /// At least this much, absolute (in the row's unit).
    Absolute(f64),
    /// At least this fraction of native.
    OfNative(f64),
    None,
}

fn fmt_value(v: f64, unit: &'static str) -> String {
    match unit {
        "GB/s" => format!("{v:.2} GB/s"),
        _ => format!("{:.0}k {unit}", v / 1000.0),
    }
}

impl Row {
    fn print(&self) {
        let ratio = self.agent / self.native;
        let (target, met) = match self.target {
            Target::Absolute(t) => (
                format!(">= {}", fmt_value(t, self.unit)),
                if self.agent >= t { "yes" } else { "NO" },
            ),
            Target::OfNative(f) => (
                format!(">= {:.0}% native", f * 100.0),
                if ratio >= f { "yes" } else { "NO" },
            ),
            Target::None => ("-".to_owned(), "-"),
        };
        println!(
            "{:<36} {:>13} {:>13} {:>7.0}% {:>17} {:>4}",
            self.what,
            fmt_value(self.native, self.unit),
            fmt_value(self.agent, self.unit),
            ratio * 100.0,
            target,
            met
        );
    }
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn per_sec(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if let Some(why) = missing_prerequisite() {
        bail!("cannot run: {why}");
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("cannot run: /dev/fuse does not exist");
    }
    let size = usize::try_from(args.size_mib << 20)?;
    let n = args.files;

    // The native side: the same bytes on the same disk.
    let native = tempfile::tempdir()?;
    let fs_type = fs_type_of(native.path());
    let mounts = tempfile::tempdir()?;
    fs::set_permissions(
        mounts.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let (nb_dir, ws_dir) = (
        mounts.path().join("notebook_files"),
        mounts.path().join("workspace_files"),
    );
    eprintln!(
        "preparing {} MiB and {n} files of {SMALL} bytes...",
        args.size_mib
    );
    let big = pattern(size, 0x9e37_79b9_7f4a_7c15);
    let native_big = native.path().join("big.bin");
    fs::write(&native_big, &big)?;
    let native_many = native.path().join("many");
    fs::create_dir_all(&native_many)?;
    let small: Vec<Vec<u8>> = (0..n).map(|i| pattern(SMALL, i as u64 + 7)).collect();
    for (i, bytes) in small.iter().enumerate() {
        fs::write(native_many.join(small_name(i)), bytes)?;
    }

    // The stack: the big file attached before the agent starts.
    let setup = Setup {
        env: vec![("NBAGENT_FILES_MODE".into(), "mount".into())],
        rust_log: "info".into(),
        agent_args: vec![
            "--notebook-files".into(),
            nb_dir.display().to_string(),
            "--workspace-files".into(),
            ws_dir.display().to_string(),
            "--no-checkpoints".into(),
        ],
        files: vec![(FileRoot::Notebook, "big.bin".into(), big)],
        ..Setup::default()
    };
    let nb = Notebook::start(setup).await;
    nb.wait_kernel_ready(Duration::from_secs(120)).await;
    // The trees were mounted (and listed) before the kernel started.
    let listed_before = Instant::now();
    let mount_table = fs::read_to_string("/proc/self/mounts")?;
    if !mount_table.contains(&nb_dir.display().to_string())
        || !mount_table.contains(&ws_dir.display().to_string())
    {
        bail!("the trees are not mounted\n--- log:\n{}", nb.log_tail());
    }
    let passthrough = passthrough(&nb.log)?;

    // The small files: attached after the workspace tree was listed.
    let t = Instant::now();
    for (i, bytes) in small.into_iter().enumerate() {
        nbserver::files::put_bytes(
            &nb.server.state.store,
            &nb.server.state.blobs,
            &nb.agent,
            FileRoot::Workspace,
            &format!("many/{}", small_name(i)),
            bytes,
        )
        .await
        .context("attach a small file")?;
    }
    eprintln!(
        "attached {n} small files in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let mut rows = Vec::new();
    let mib = args.size_mib;
    let fuse_big = nb_dir.join("big.bin");

    // (a) + (b): sequential read, cold then warm.
    let (nb2, fb2) = (native_big.clone(), fuse_big.clone());
    let agent_pid = nb.agent_pid().context("no agent process")?;
    let (native_cold, fuse_cold, native_warm, fuse_warm, same, cpu) = run_blocking(move || {
        touch_memory(size.saturating_mul(2));
        drop_caches()?;
        let (bytes, native_cold) = read_all(&nb2)?;
        drop_caches()?;
        eprintln!("reading the mount, cold...");
        let cpu_before = (cpu_time(Some(agent_pid))?, cpu_time(None)?);
        let (fuse_bytes, fuse_cold) = read_all(&fb2)?;
        let cpu = (
            cpu_time(Some(agent_pid))? - cpu_before.0,
            cpu_time(None)? - cpu_before.1,
        );
        eprintln!("reading warm...");
        anyhow::ensure!(
            fuse_bytes == bytes,
            "the mount read {fuse_bytes} of {bytes} bytes"
        );
        let native_warm = best_of(3, || Ok(read_all(&nb2)?.1))?;
        let fuse_warm = best_of(3, || Ok(read_all(&fb2)?.1))?;
        let same = same_content(&nb2, &fb2)?;
        Ok((native_cold, fuse_cold, native_warm, fuse_warm, same, cpu))
    })
    .await
    .with_context(|| format!("--- log:\n{}", nb.log_tail()))?;
    anyhow::ensure!(same, "the mount's big.bin differs from the attached bytes");
    let bytes = size as u64;
    rows.push(Row {
        what: format!("{mib} MiB seq read, cold (from server)"),
        native: gbps(bytes, native_cold),
        agent: gbps(bytes, fuse_cold),
        unit: "GB/s",
        target: Target::Absolute(1.0),
    });
    rows.push(Row {
        what: format!("{mib} MiB seq read, warm"),
        native: gbps(bytes, native_warm),
        agent: gbps(bytes, fuse_warm),
        unit: "GB/s",
        target: Target::OfNative(0.9),
    });
    let cold_cpu = format!(
        "CPU time of the cold read per GiB: agent {:.2} s, server and reader {:.2} s",
        cpu.0.as_secs_f64() * 1024.0 / mib as f64,
        cpu.1.as_secs_f64() * 1024.0 / mib as f64,
    );
    if args.only_read {
        print_table(passthrough, &fs_type, &rows);
        println!();
        println!("{cold_cpu}");
        return Ok(());
    }

    // (e): sequential write + close.
    let data = pattern(size, 0x2545_f491_4f6c_dd1d);
    let expected = data.clone();
    let (native_out, fuse_out) = (native.path().join("out.bin"), nb_dir.join("out.bin"));
    let (native_w, fuse_w, data) = run_blocking(move || {
        // Best of three, the two sides alternating (the same file rewritten).
        let mut native_w = Duration::MAX;
        let mut fuse_w = (Duration::MAX, Duration::ZERO);
        for _ in 0..3 {
            native_w = native_w.min(write_all(&native_out, &data)?.0);
            let w = write_all(&fuse_out, &data)?;
            if w.0 < fuse_w.0 {
                fuse_w = w;
            }
        }
        Ok((native_w, fuse_w, data))
    })
    .await
    .with_context(|| format!("--- log:\n{}", nb.log_tail()))?;
    drop(data);
    let (fuse_w, fuse_close) = fuse_w;
    let written = Instant::now();
    rows.push(Row {
        what: format!("{mib} MiB seq write + close"),
        native: gbps(bytes, native_w),
        agent: gbps(bytes, fuse_w),
        unit: "GB/s",
        target: Target::OfNative(0.5),
    });
    // Untimed: the upload reaches the server with the right bytes.
    let deadline = Instant::now() + Duration::from_secs(300);
    let stored_after = loop {
        let got = nbserver::files::read(
            &nb.server.state.store,
            &nb.server.state.blobs,
            &nb.agent,
            FileRoot::Notebook,
            "out.bin",
        )
        .await?;
        if got.as_deref() == Some(expected.as_slice()) {
            break written.elapsed();
        }
        if Instant::now() > deadline {
            bail!(
                "out.bin did not reach the server\n--- log:\n{}",
                nb.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    drop(expected);

    // (c) + (d): the workspace listing must be older than the TTL so the first lookup
    // lists again from the server (the benchmark waits out the rest of the TTL).
    let relist_at = listed_before + LISTING_TTL + Duration::from_secs(2);
    let wait = relist_at.saturating_duration_since(Instant::now());
    eprintln!(
        "waiting {:.0} s for the listing TTL to pass...",
        wait.as_secs_f64()
    );
    tokio::time::sleep_until(relist_at.into()).await;
    let (nm, fm) = (native_many.clone(), ws_dir.join("many"));
    let (stat, small_rd) = run_blocking(move || {
        touch_memory(256 << 20);
        drop_caches()?;
        let native_cold = stat_loop(&nm, n)?;
        let native_warm = best_of(3, || stat_loop(&nm, n))?;
        drop_caches()?;
        // The first stat lists the tree again from the server (timed apart as well).
        let first = Instant::now();
        fs::metadata(fm.join(small_name(0)))?;
        let listing = first.elapsed();
        let fuse_cold = stat_loop(&fm, n)? + listing;
        let fuse_warm = best_of(3, || stat_loop(&fm, n))?;
        drop_caches()?;
        let (native_ls, count) = list_stat(&nm)?;
        anyhow::ensure!(count == n, "listed {count} of {n} native files");
        drop_caches()?;
        let (fuse_ls, count) = list_stat(&fm)?;
        anyhow::ensure!(count == n, "listed {count} of {n} files through the mount");
        drop_caches()?;
        let native_rd_cold = small_reads(&nm, n)?;
        let native_rd_warm = best_of(3, || small_reads(&nm, n))?;
        drop_caches()?;
        let fuse_rd_cold = small_reads(&fm, n)?;
        let fuse_rd_warm = best_of(3, || small_reads(&fm, n))?;
        eprintln!(
            "cold stat: the first one (with the listing from the server) took {:.0} ms",
            listing.as_secs_f64() * 1000.0
        );
        Ok((
            [
                native_cold,
                fuse_cold,
                native_warm,
                fuse_warm,
                native_ls,
                fuse_ls,
            ],
            [native_rd_cold, fuse_rd_cold, native_rd_warm, fuse_rd_warm],
        ))
    })
    .await
    .with_context(|| format!("--- log:\n{}", nb.log_tail()))?;
    rows.push(Row {
        what: format!("stat {n} files, cold (listing)"),
        native: per_sec(n, stat[0]),
        agent: per_sec(n, stat[1]),
        unit: "ops/s",
        target: Target::Absolute(20_000.0),
    });
    rows.push(Row {
        what: format!("stat {n} files, warm"),
        native: per_sec(n, stat[2]),
        agent: per_sec(n, stat[3]),
        unit: "ops/s",
        target: Target::OfNative(0.8),
    });
    rows.push(Row {
        what: format!("list + stat {n} files (ls -l), cold"),
        native: per_sec(n, stat[4]),
        agent: per_sec(n, stat[5]),
        unit: "ops/s",
        target: Target::None,
    });
    rows.push(Row {
        what: format!("open+4 KiB read+close x{n}, cold"),
        native: per_sec(n, small_rd[0]),
        agent: per_sec(n, small_rd[1]),
        unit: "files/s",
        target: Target::None,
    });
    rows.push(Row {
        what: format!("open+4 KiB read+close x{n}, warm"),
        native: per_sec(n, small_rd[2]),
        agent: per_sec(n, small_rd[3]),
        unit: "files/s",
        target: Target::None,
    });

    print_table(passthrough, &fs_type, &rows);
    println!();
    println!("{cold_cpu}");
    println!(
        "out.bin: close took {:.2} s of the {:.2} s write; stored by the server {:.1} s after the close returned",
        fuse_close.as_secs_f64(),
        fuse_w.as_secs_f64(),
        stored_after.as_secs_f64()
    );
    Ok(())
}

fn print_table(passthrough: Option<bool>, fs_type: &str, rows: &[Row]) {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "attached files over the real channel ({profile} binaries; nbserver over mutual TLS; FUSE passthrough {})",
        match passthrough {
            Some(true) => "on",
            Some(false) => "off",
            None => "unknown",
        }
    );
    println!(
        "native side, the server's blobs and the agent's cache, staging and outbox: {fs_type}"
    );
    println!();
    println!(
        "{:<36} {:>13} {:>13} {:>8} {:>17} {:>4}",
        "", "native", "nbagent", "ratio", "target", "met"
    );
    for r in rows {
        r.print();
    }
}
