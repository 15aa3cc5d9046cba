//! Benchmark: the attached-files mount over a local-directory backing, side by side with
//! the native filesystem. Not a test; prints a table.
//!
//! `cargo run --release -p nbagent-fusefs --example fuse-bench -- [SIZE_MIB] [FILES]`
//! (defaults 1024 and 10000). Needs root and /dev/fuse.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbagent_fusefs::{Fs, FsConfig, LocalDir, MountOptions, SystemClock, mount};
use nbagent_protocol::FileRoot;

type BoxError = Box<dyn std::error::Error>;

fn touch_memory(bytes: usize) {
    // This VM hands freed memory back to the host lazily: touch it before timing.
    let mut v = vec![0u8; bytes];
    for i in (0..bytes).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(&v);
}

fn read_all(path: &Path) -> Result<(u64, Duration), BoxError> {
    let start = Instant::now();
    let mut f = File::open(path)?;
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

fn write_all(path: &Path, size: u64) -> Result<Duration, BoxError> {
    let buf = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut f = File::create(path)?;
    let mut done = 0;
    while done < size {
        f.write_all(&buf)?;
        done += buf.len() as u64;
    }
    drop(f); // close: flush, and for the mount the upload to the backing
    Ok(start.elapsed())
}

fn stat_loop(dir: &Path, n: usize) -> Result<Duration, BoxError> {
    let start = Instant::now();
    for i in 0..n {
        fs::metadata(dir.join(format!("f{i:05}")))?;
    }
    Ok(start.elapsed())
}

fn small_reads(path: &Path, size: u64, n: u64) -> Result<Duration, BoxError> {
    let f = File::open(path)?;
    let mut buf = [0u8; 4096];
    let blocks = size / 4096;
    let start = Instant::now();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.read_exact_at(&mut buf, (x % blocks) * 4096)?;
    }
    Ok(start.elapsed())
}

fn gbps(bytes: u64, d: Duration) -> String {
    format!("{:.2} GB/s", bytes as f64 / d.as_secs_f64() / 1e9)
}

fn per_sec(n: u64, d: Duration) -> String {
    format!("{:.0}/s", n as f64 / d.as_secs_f64())
}

fn row(name: &str, native: String, fuse: String, ratio: f64) {
    println!("{name:<34} {native:>14} {fuse:>14} {:>9.2}x", ratio);
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let size_mib: u64 = args.get(1).map_or(Ok(1024), |s| s.parse())?;
    let files: usize = args.get(2).map_or(Ok(10_000), |s| s.parse())?;
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("needs root and /dev/fuse");
        std::process::exit(2);
    }
    let size = size_mib << 20;
    let t = tempfile::tempdir_in("/var/tmp")?;
    let (b, w, mnt) = (t.path().join("b"), t.path().join("w"), t.path().join("mnt"));
    fs::create_dir_all(b.join("many"))?;
    fs::create_dir_all(&mnt)?;
    eprintln!("preparing {size_mib} MiB and {files} files...");
    write_all(&b.join("big.bin"), size)?;
    for i in 0..files {
        fs::write(b.join("many").join(format!("f{i:05}")), b"x")?;
    }
    let root = FileRoot::Notebook;
    let backing = LocalDir::new().with_tree(root, &b, true);
    let mut config = FsConfig::new(root, &w);
    config.cache_bytes = size * 3;
    let fs_core = Arc::new(Fs::new(config, Arc::new(backing), Arc::new(SystemClock))?);
    let m = mount(fs_core, &mnt, &MountOptions::default())?;
    touch_memory((size as usize).saturating_mul(2));

    println!(
        "passthrough: {}",
        if m.passthrough() { "on" } else { "off" }
    );
    println!(
        "{:<34} {:>14} {:>14} {:>10}",
        "", "native", "fuse", "fuse/nat"
    );

    // Sequential read, warm.
    read_all(&b.join("big.bin"))?;
    let (n, native) = read_all(&b.join("big.bin"))?;
    let (_, first) = read_all(&mnt.join("big.bin"))?;
    let (_, warm) = read_all(&mnt.join("big.bin"))?;
    row(
        &format!("{size_mib} MiB seq read, first (fetch)"),
        gbps(n, native),
        gbps(n, first),
        native.as_secs_f64() / first.as_secs_f64(),
    );
    row(
        &format!("{size_mib} MiB seq read, warm"),
        gbps(n, native),
        gbps(n, warm),
        native.as_secs_f64() / warm.as_secs_f64(),
    );

    // Metadata.
    let native_cold = stat_loop(&b.join("many"), files)?;
    let native_warm = stat_loop(&b.join("many"), files)?;
    let fuse_cold = stat_loop(&mnt.join("many"), files)?;
    let fuse_warm = stat_loop(&mnt.join("many"), files)?;
    let nf = files as u64;
    row(
        &format!("stat {files} files, cold"),
        per_sec(nf, native_cold),
        per_sec(nf, fuse_cold),
        native_cold.as_secs_f64() / fuse_cold.as_secs_f64(),
    );
    row(
        &format!("stat {files} files, warm"),
        per_sec(nf, native_warm),
        per_sec(nf, fuse_warm),
        native_warm.as_secs_f64() / fuse_warm.as_secs_f64(),
    );

    // 4 KiB random reads (warm).
    let reads = 100_000;
    let native_small = small_reads(&b.join("big.bin"), size, reads)?;
    let fuse_small = small_reads(&mnt.join("big.bin"), size, reads)?;
    row(
        "4 KiB random reads, warm",
        per_sec(reads, native_small),
        per_sec(reads, fuse_small),
        native_small.as_secs_f64() / fuse_small.as_secs_f64(),
    );

    // Sequential write (the mount's figure includes the upload at close).
    touch_memory((size as usize).saturating_mul(2));
    let native_w = write_all(&b.join("native-out.bin"), size)?;
    let fuse_w = write_all(&mnt.join("fuse-out.bin"), size)?;
    row(
        &format!("{size_mib} MiB seq write + close"),
        gbps(size, native_w),
        gbps(size, fuse_w),
        native_w.as_secs_f64() / fuse_w.as_secs_f64(),
    );
    println!(
        "(fuse/nat is throughput relative to native: 1.00x = as fast; reads served by the daemon: {})",
        m.fs().reads_served()
    );
    m.unmount()?;
    Ok(())
}
