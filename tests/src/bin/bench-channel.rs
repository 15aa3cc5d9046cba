//! Channel benchmark: outputs/s and append-to-commit latency through the durable outbox
//! and mutual TLS into the server's database, blob upload MB/s, and the same bytes over
//! a bare rustls connection (same provider, same cipher suite) as the ceiling.
//!
//! `cargo run --release -p nbagent-tests --bin bench-channel [-- --blob-mb 256 --outputs 50000]`

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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let tmp = tempfile::tempdir()?;
    let mut config = nbserver::ServerConfig::new(tmp.path().join("server"), "127.0.0.1:0".parse()?);
    config.heartbeat = Duration::from_secs(5);
    let server = nbserver::start(config).await?;
    let token =
        nbserver::cli::create_token(&server.state.store, "bench", Duration::from_secs(600)).await?;

    let mut oc = OutboxConfig::new(tmp.path().join("agent/outbox"));
    oc.fsync = FsyncPolicy::Periodic;
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
    // Periodic fsync, as the agent binary does.
    let fs = shared.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_millis(100));
        loop {
            t.tick().await;
            let s = fs.clone();
            let _ = tokio::task::spawn_blocking(move || s.outbox().sync()).await;
        }
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

    // 2. Latency: one output at a time, paced, append -> ack (the server acks after its
    // database commit).
    for i in 0..args.latency_samples {
        sender.send(&output(i), &empty).await?;
        shared.drained().await;
    }
    let mut lat = shared.take_latency_samples();
    lat.sort();

    // 3. Blobs through the outbox.
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
    let total_blob = (per_blob * blob_count) as f64;
    let _ = stop_tx.send(true);
    let _ = chan.await;
    server.shutdown().await;

    // 4. Ceiling: the same bytes over a bare rustls connection, same provider.
    let bare = bare_tls(tmp.path(), (per_blob * blob_count) as u64).await?;

    let ops = args.outputs as f64 / flood.as_secs_f64();
    let blob_mbs = total_blob / 1e6 / blob_time.as_secs_f64();
    let bare_mbs = total_blob / 1e6 / bare.as_secs_f64();
    println!("nbagent channel benchmark (loopback, mutual TLS, outbox on disk, SQLite)");
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "measure", "nbagent", "baseline", "ratio"
    );
    println!(
        "{:<44} {:>14.0} {:>14} {:>8}",
        "outputs/s (flood, append->commit->ack)", ops, "-", "-"
    );
    println!(
        "{:<44} {:>12.2}ms {:>14} {:>8}",
        "output latency p50 (append -> acked commit)",
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        "-",
        "-"
    );
    println!(
        "{:<44} {:>12.2}ms {:>14} {:>8}",
        "output latency p99 (target <= 5 ms)",
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        "-",
        "-"
    );
    println!(
        "{:<44} {:>12.0}MB/s {:>10.0}MB/s {:>7.0}%",
        format!("blob upload {} MiB (target >= 80% of bare)", args.blob_mb),
        blob_mbs,
        bare_mbs,
        blob_mbs / bare_mbs * 100.0
    );
    Ok(())
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
