//! Crash test of the outbox: a child process appends as fast as it can and is killed
//! with SIGKILL at an arbitrary instant; every append it reported as done must be
//! found intact on reopen, and numbering must continue.
//!
//! The child is this same test binary, re-run with `--exact child_writer` and the
//! outbox directory in an environment variable.
//!
//! Also holds a throughput measurement, ignored by default:
//! `cargo test --release -p nbagent --test outbox -- --ignored --nocapture`.

#![allow(clippy::unwrap_used)] // unwrap on test fixtures is fine

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use bytes::BytesMut;
use nbagent::outbox::{Outbox, OutboxConfig};
use nbagent_protocol::{FrameDecoder, Message, OutputContent};

const CHILD_ENV: &str = "NBAGENT_OUTBOX_CRASH_DIR";

fn config(dir: &Path) -> OutboxConfig {
    let mut c = OutboxConfig::new(dir);
    c.segment_bytes = 64 << 10;
    c.cache_bytes = 32 << 10;
    c
}

fn message(seq: u64) -> Message {
    Message::BlobChunk {
        hash: format!("{seq:064x}"),
        media_type: "application/octet-stream".into(),
        offset: 0,
        total: payload(seq).len() as u64,
    }
}

fn payload(seq: u64) -> Vec<u8> {
    let len = (seq * 37 % 3000) as usize;
    (0..len).map(|i| (seq as usize + i) as u8).collect()
}

/// The child: appends forever, acking now and then, printing each sequence number
/// once its append has returned. Does nothing when run as an ordinary test.
#[test]
fn child_writer() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut ob = Outbox::open(config(Path::new(&dir))).unwrap();
    let mut out = std::io::stdout().lock();
    for _ in 0..1_000_000 {
        let next = ob.window().last_assigned() + 1;
        let seq = ob.append(&message(next), &payload(next)).unwrap();
        assert_eq!(seq, next);
        if seq.is_multiple_of(100) {
            ob.ack(seq - 50).unwrap();
        }
        if writeln!(out, "{seq}").and_then(|()| out.flush()).is_err() {
            return;
        }
    }
}

#[test]
fn sigkill_at_any_instant_loses_no_completed_append() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut previous_last = 0;
    for (round, kill_after) in [700u64, 1900, 3100].into_iter().enumerate() {
        let mut child = Command::new(&exe)
            .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, tmp.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut confirmed = 0;
        while confirmed < previous_last + kill_after {
            let line = lines.next().expect("child stopped early").unwrap();
            // libtest prints its own lines too; keep the numbers.
            if let Ok(n) = line.trim().parse::<u64>() {
                confirmed = n;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();

        let mut ob = Outbox::open(config(tmp.path())).unwrap();
        let w = ob.window();
        assert!(
            w.last_assigned() >= confirmed,
            "round {round}: {} < confirmed {confirmed}",
            w.last_assigned()
        );
        let frames = ob.frames_after(0, usize::MAX).unwrap();
        assert_eq!(frames.len() as u64, w.in_flight(), "round {round}");
        for (i, (seq, frame)) in frames.iter().enumerate() {
            assert_eq!(*seq, w.acked() + 1 + i as u64, "round {round}: contiguous");
            let mut buf = BytesMut::from(frame.as_ref());
            let raw = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
            let f = raw.parse().unwrap();
            assert_eq!(f.envelope.seq, Some(*seq));
            assert_eq!(f.envelope.msg, message(*seq));
            assert_eq!(f.payload.as_ref(), payload(*seq).as_slice());
        }
        let next = w.last_assigned() + 1;
        assert_eq!(ob.append(&message(next), &payload(next)).unwrap(), next);
        previous_last = next;
    }
}

/// Throughput, for the record; prints to stderr, asserts nothing about speed.
#[test]
#[ignore = "measurement, run by hand with --release --ignored --nocapture"]
fn throughput() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(OutboxConfig::new(tmp.path())).unwrap();
    let small = Message::Output {
        request: "r1".into(),
        cell: "c1".into(),
        output: OutputContent::Stream {
            name: "stdout".into(),
            text: "x".repeat(100),
        },
    };
    let n = 100_000u64;
    let t = Instant::now();
    for _ in 0..n {
        ob.append(&small, b"").unwrap();
    }
    let dt = t.elapsed().as_secs_f64();
    let rec = ob.pending_bytes() / n;
    eprintln!(
        "small: {n} appends of {rec} B in {dt:.3} s = {:.0} appends/s",
        n as f64 / dt
    );
    ob.ack(n).unwrap();

    let big = vec![7u8; 1 << 20];
    let msg = Message::BlobChunk {
        hash: "0".repeat(64),
        media_type: "image/png".into(),
        offset: 0,
        total: 1 << 20,
    };
    let m = 256u64;
    let t = Instant::now();
    for _ in 0..m {
        ob.append(&msg, &big).unwrap();
    }
    let dt = t.elapsed().as_secs_f64();
    eprintln!(
        "large: {m} appends of 1 MiB in {dt:.3} s = {:.0} MB/s",
        (m << 20) as f64 / dt / 1e6
    );
    let t = Instant::now();
    let frames = ob.frames_after(n, usize::MAX).unwrap();
    let dt = t.elapsed().as_secs_f64();
    eprintln!(
        "resend read of {} frames (cache + disk) in {dt:.3} s",
        frames.len()
    );
}
