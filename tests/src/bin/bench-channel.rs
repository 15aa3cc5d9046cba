//! Channel benchmark: outputs/s and append-to-commit latency through the durable outbox
//! and mutual TLS into the server's database, blob upload MB/s, and the same bytes over
//! a bare rustls connection (same provider, same cipher suite) as the ceiling.
//!
//! `cargo run --release -p nbagent-tests --bin bench-channel [-- --blob-mb 256 --outputs 50000]`
//!
//! Measured here (2 vCPUs, ext4 on a virtual disk, quiet machine, 2026-12-03):
//!
//! ```text
//! measure                                             durable   crash-safe     baseline   ratio
//! outputs/s (flood, append -> commit -> ack)           177983       188619            -       -
//! output latency p50 (append -> acked commit)         0.26 ms      0.28 ms            -       -
//! output latency p99 (target <= 5 ms)                 2.06 ms      0.77 ms            -       -
//! blob upload, 256 MiB (baseline: bare rustls)       299 MB/s     385 MB/s    1411 MB/s     27%
//! blob upload vs its work floor                                   385 MB/s     595 MB/s     65%
//! ```
//!
//! The 80% target against bare TLS is out of reach on two cores: the work floor (two
//! file writes, one SHA-256, the TLS transfer, one after the other) is itself 42% of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use nbagent::channel::{self, Backoff, ChannelConfig, ChannelStatus, TokenSource};
use nbagent::identity::ServerTrust;
use nbagent::outbox::{FsyncPolicy, Outbox, OutboxConfig};
use nbagent::sender::{Sender, Shared};
use nbagent::workload;
use nbagent_protocol::{CHUNK_SIZE, Message, OutputContent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

struct Args {
    outputs: u64,
    latency_samples: u64,
    blob_mb: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        outputs: 50_000,
        latency_samples: 2_000,
        blob_mb: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--outputs" => a.outputs = v.parse()?,
            "--latency-samples" => a.latency_samples = v.parse()?,
            "--blob-mb" => a.blob_mb = v.parse()?,
            other => anyhow::bail!(
                "unknown flag {other}; flags: --outputs N --latency-samples N --blob-mb N"
            ),
        }
    }
    Ok(a)
}

fn output(i: u64) -> Message {
    Message::Output {
        request: "bench".into(),
        cell: "c".into(),
        output: OutputContent::Stream {
            name: "stdout".into(),
            text: format!("line {i}: the quick brown fox jumps over the lazy dog\n"),
        },
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Figures of one configuration.
struct Figures {
    outputs_per_s: f64,
    p50: Duration,
    p99: Duration,
    blob_mbs: f64,
    blob_bytes: u64,
}

/// Durability settings of one run.
#[derive(Clone, Copy)]
struct Durability {
    /// Agent: fsync the outbox every 100 ms (else: page cache only).
    agent_fsync: bool,
    /// Server: fsync each completed blob.
    server_fsync: bool,
}

async fn run_channel(args: &Args, d: Durability) -> anyhow::Result<Figures> {
    let tmp = tempfile::tempdir()?;
    let mut config = nbserver::ServerConfig::new(tmp.path().join("server"), "127.0.0.1:0".parse()?);
    config.heartbeat = Duration::from_secs(5);
    config.fsync_blobs = d.server_fsync;
    let server = nbserver::start(config).await?;
    let token =
        nbserver::cli::create_token(&server.state.store, "bench", Duration::from_secs(600)).await?;

    let mut oc = OutboxConfig::new(tmp.path().join("agent/outbox"));
    oc.fsync = if d.agent_fsync {
        FsyncPolicy::Periodic
    } else {
        FsyncPolicy::Never
    };
    let outbox = Outbox::open(oc)?;
    let shared = Shared::new(outbox, true);
    let sender = Sender::new(shared.clone());
    let (cmd_tx, _cmd_rx) = mpsc::channel(16);
    let (status_tx, mut status_rx) = watch::channel(ChannelStatus::Disconnected);
    let (stop_tx, stop_rx) = watch::channel(false);
    let cfg = ChannelConfig {
        server: server.addr.to_string(),
        server_name: None,
        identity_dir: tmp.path().join("agent/identity"),
        trust: Some(ServerTrust::CaFile(tmp.path().join("server/pki/ca.crt"))),
        token: TokenSource {
            value: Some(token.to_string()),
            file: None,
        },
        plaintext: false,
        backoff: Backoff::default(),
        window_bytes: 16 << 20,
        connect_timeout: Duration::from_secs(10),
        command_log: tmp.path().join("agent/commands.received"),
    };
    let chan = tokio::spawn(channel::run(
        cfg,
        shared.clone(),
        cmd_tx,
        status_tx,
        stop_rx,
    ));
    while !matches!(*status_rx.borrow(), ChannelStatus::Connected { .. }) {
        status_rx.changed().await?;
    }
    let syncer = d.agent_fsync.then(|| {
        let fs = shared.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_millis(100));
            loop {
                t.tick().await;
                let _ = nbagent::sender::sync_outbox(&fs).await;
            }
        })
    });

    // 1. Throughput: flood outputs.
    let empty = Bytes::new();
    let t0 = Instant::now();
    for i in 0..args.outputs {
        sender.send(&output(i), &empty).await?;
    }
    shared.drained().await;
    let flood = t0.elapsed();
    let _ = shared.take_latency_samples();

    // 2. Latency: one output at a time, append -> ack (the server acks after its
    // database commit).
    for i in 0..args.latency_samples {
        sender.send(&output(i), &empty).await?;
        shared.drained().await;
    }
    let mut lat = shared.take_latency_samples();
    lat.sort();

    // 3. Blobs through the outbox, 16 MiB each, in 1 MiB chunks.
    let blob_bytes = args.blob_mb << 20;
    let blob_count = blob_bytes.div_ceil(16 << 20).max(1);
    let per_blob = blob_bytes / blob_count;
    let blobs: Vec<(Bytes, String)> = (0..blob_count as u64)
        .map(|i| {
            let b = Bytes::from(workload::blob_bytes(1000 + i, per_blob));
            let h = workload::sha256_hex(&b);
            (b, h)
        })
        .collect();
    let t1 = Instant::now();
    for (b, h) in &blobs {
        let mut off = 0;
        while off < b.len() {
            let end = (off + CHUNK_SIZE).min(b.len());
            let msg = Message::BlobChunk {
                hash: h.clone(),
                media_type: "application/octet-stream".into(),
                offset: off as u64,
                total: b.len() as u64,
            };
            sender.send(&msg, &b.slice(off..end)).await?;
            off = end;
        }
    }
    shared.drained().await;
    let blob_time = t1.elapsed();
    let total_blob = (per_blob * blob_count) as u64;
    if let Some(s) = syncer {
        s.abort();
    }
    let _ = stop_tx.send(true);
    let _ = chan.await;
    let stored = server.state.store.blob_count().await?;
    anyhow::ensure!(
        stored == blob_count as u64,
        "server stored {stored} of {blob_count} blobs"
    );
    server.shutdown().await;
    Ok(Figures {
        outputs_per_s: args.outputs as f64 / flood.as_secs_f64(),
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        blob_mbs: total_blob as f64 / 1e6 / blob_time.as_secs_f64(),
        blob_bytes: total_blob,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // Touch memory first so the VM's lazy page return does not skew the first run.
    let warm = vec![1u8; 512 << 20];
    std::hint::black_box(&warm);
    drop(warm);

    let durable = run_channel(
        &args,
        Durability {
            agent_fsync: true,
            server_fsync: true,
        },
    )
    .await?;
    let crash_safe = run_channel(
        &args,
        Durability {
            agent_fsync: false,
            server_fsync: false,
        },
    )
    .await?;
    let tmp = tempfile::tempdir()?;
    let bare = bare_tls(tmp.path(), durable.blob_bytes).await?;
    let bare_mbs = durable.blob_bytes as f64 / 1e6 / bare.as_secs_f64();
    let floor = work_floor(tmp.path(), durable.blob_bytes)? + bare;
    let floor_mbs = durable.blob_bytes as f64 / 1e6 / floor.as_secs_f64();

    println!(
        "nbagent channel benchmark: loopback, mutual TLS (rustls/ring), outbox on disk, SQLite"
    );
    println!("  durable    = agent outbox fsync every 100 ms, server fsyncs each blob");
    println!(
        "  crash-safe = page cache only on both sides (survives process crashes, not power loss)"
    );
    println!();
    println!(
        "{:<46} {:>12} {:>12} {:>12} {:>7}",
        "measure", "durable", "crash-safe", "baseline", "ratio"
    );
    println!(
        "{:<46} {:>12.0} {:>12.0} {:>12} {:>7}",
        "outputs/s (flood, append -> commit -> ack)",
        durable.outputs_per_s,
        crash_safe.outputs_per_s,
        "-",
        "-"
    );
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    println!(
        "{:<46} {:>12} {:>12} {:>12} {:>7}",
        "output latency p50 (append -> acked commit)",
        ms(durable.p50),
        ms(crash_safe.p50),
        "-",
        "-"
    );
    println!(
        "{:<46} {:>12} {:>12} {:>12} {:>7}",
        "output latency p99 (target <= 5 ms)",
        ms(durable.p99),
        ms(crash_safe.p99),
        "-",
        "-"
    );
    println!(
        "{:<46} {:>7.0} MB/s {:>7.0} MB/s {:>7.0} MB/s {:>6.0}%",
        format!("blob upload, {} MiB (baseline: bare rustls)", args.blob_mb),
        durable.blob_mbs,
        crash_safe.blob_mbs,
        bare_mbs,
        crash_safe.blob_mbs / bare_mbs * 100.0
    );
    println!(
        "{:<46} {:>12} {:>12} {:>12} {:>6.0}%",
        "  durable blob upload vs bare rustls",
        "",
        "",
        "",
        durable.blob_mbs / bare_mbs * 100.0
    );
    println!(
        "{:<46} {:>12} {:>7.0} MB/s {:>7.0} MB/s {:>6.0}%",
        "blob upload vs its work floor (see below)",
        "",
        crash_safe.blob_mbs,
        floor_mbs,
        crash_safe.blob_mbs / floor_mbs * 100.0
    );
    println!();
    println!(
        "work floor: the same bytes written to a file twice (outbox, blob store), hashed once"
    );
    println!("(SHA-256 verification) and sent over bare rustls, one step after the other.");
    Ok(())
}

/// Time to do, one after the other, the work a blob upload cannot avoid besides TLS:
/// append the bytes to a file (the outbox), write them to another (the blob store),
/// and hash them (the server verifies content addresses).
fn work_floor(dir: &std::path::Path, bytes: u64) -> anyhow::Result<Duration> {
    use sha2::Digest;
    use std::io::Write;
    let chunk = workload::blob_bytes(7, CHUNK_SIZE);
    let t = Instant::now();
    for name in ["floor-a", "floor-b"] {
        let mut f = std::fs::File::create(dir.join(name))?;
        let mut n = 0u64;
        while n < bytes {
            f.write_all(&chunk)?;
            n += chunk.len() as u64;
        }
    }
    let mut h = sha2::Sha256::new();
    let mut n = 0u64;
    while n < bytes {
        h.update(&chunk);
        n += chunk.len() as u64;
    }
    std::hint::black_box(h.finalize());
    let d = t.elapsed();
    std::fs::remove_file(dir.join("floor-a"))?;
    std::fs::remove_file(dir.join("floor-b"))?;
    Ok(d)
}

/// Pushes `bytes` through a bare rustls connection over loopback with the same
/// provider; the receiver reads everything and answers one byte.
async fn bare_tls(dir: &std::path::Path, bytes: u64) -> anyhow::Result<Duration> {
    let pki = dir.join("bare-pki");
    let ca = nbserver::pki::CertificateAuthority::load_or_create(&pki)?;
    let cert = nbserver::pki::load_or_issue_server_cert(&pki, &ca, &["127.0.0.1".into()])?;
    let acceptor = tokio_rustls::TlsAcceptor::from(nbserver::pki::server_config(&ca, &cert)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let mut s = acceptor.accept(tcp).await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < bytes {
            let n = s.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "eof");
            got += n as u64;
        }
        s.write_all(b"k").await?;
        s.flush().await?;
        anyhow::Ok(())
    });
    let client = nbagent::identity::client_config(&ServerTrust::CaFile(pki.join("ca.crt")), None)?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::clone(&client))
        .connect(name, tcp)
        .await?;
    let chunk = vec![7u8; CHUNK_SIZE];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    s.flush().await?;
    let mut k = [0u8; 1];
    s.read_exact(&mut k).await?;
    let d = t.elapsed();
    srv.await??;
    Ok(d)
}
