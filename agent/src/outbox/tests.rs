#![allow(clippy::unwrap_used)] // unwrap on test fixtures is fine
use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use nbagent_protocol::{Envelope, FrameDecoder, Message, OutputContent};
use proptest::prelude::*;

use super::*;

fn output(i: u64, text_len: usize) -> Message {
    Message::Output {
        request: format!("r{i}"),
        cell: "c1".into(),
        output: OutputContent::Stream {
            name: "stdout".into(),
            text: "x".repeat(text_len),
        },
    }
}

fn blob(i: u64) -> Message {
    Message::BlobChunk {
        hash: format!("{i:064x}"),
        media_type: "image/png".into(),
        offset: 0,
        total: 10,
    }
}

fn config(dir: &Path) -> OutboxConfig {
    OutboxConfig::new(dir)
}

fn small(dir: &Path, segment_bytes: u64, cache_bytes: usize) -> OutboxConfig {
    let mut c = OutboxConfig::new(dir);
    c.segment_bytes = segment_bytes;
    c.cache_bytes = cache_bytes;
    c
}

fn all(ob: &Outbox) -> Vec<(u64, Bytes)> {
    ob.frames_after(0, usize::MAX).unwrap()
}

fn segment_files(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let first = parse_segment_name(e.file_name().to_str()?)?;
            Some((first, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Decodes a stored frame with the real wire decoder.
fn decode(frame: &Bytes) -> (Envelope, Bytes) {
    let mut buf = BytesMut::from(frame.as_ref());
    let raw = FrameDecoder::default().decode(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty(), "trailing bytes after the frame");
    let f = raw.parse().unwrap();
    (f.envelope, f.payload)
}

#[test]
fn append_ack_reopen_keeps_exactly_the_unacked_records() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(config(tmp.path())).unwrap();
    for i in 1..=10u64 {
        let payload = vec![i as u8; i as usize * 3];
        assert_eq!(ob.append(&blob(i), &payload).unwrap(), i);
    }
    assert_eq!(ob.ack(4).unwrap(), 4);
    let before = all(&ob);
    assert_eq!(
        before.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (5..=10).collect::<Vec<_>>()
    );
    for (seq, frame) in &before {
        let (env, payload) = decode(frame);
        assert_eq!(env.seq, Some(*seq));
        assert_eq!(env.msg, blob(*seq));
        assert_eq!(
            payload.as_ref(),
            vec![*seq as u8; *seq as usize * 3].as_slice()
        );
    }
    let pending_bytes = ob.pending_bytes();
    assert_eq!(
        pending_bytes,
        before
            .iter()
            .map(|(_, f)| (f.len() + record::HEADER_LEN) as u64)
            .sum::<u64>()
    );
    drop(ob);

    let ob = Outbox::open(config(tmp.path())).unwrap();
    assert_eq!(ob.window(), SendWindow::resume(10, 4));
    assert_eq!(ob.pending_count(), 6);
    assert_eq!(ob.pending_bytes(), pending_bytes);
    assert_eq!(all(&ob), before);
}

#[test]
fn numbering_resumes_after_everything_acked_and_never_reuses() {
    let tmp = tempfile::tempdir().unwrap();
    // Small segments so that acked ones are deleted.
    let cfg = small(tmp.path(), 600, DEFAULT_CACHE_BYTES);
    let mut ob = Outbox::open(cfg.clone()).unwrap();
    for i in 1..=20 {
        assert_eq!(ob.append(&output(i, 100), b"").unwrap(), i);
    }
    assert_eq!(ob.ack(20).unwrap(), 20);
    assert_eq!(ob.pending_count(), 0);
    assert_eq!(ob.pending_bytes(), 0);
    assert_eq!(
        segment_files(tmp.path()).len(),
        1,
        "only the last segment stays"
    );
    drop(ob);

    let mut ob = Outbox::open(cfg.clone()).unwrap();
    assert_eq!(ob.window(), SendWindow::resume(20, 20));
    assert_eq!(ob.append(&output(21, 1), b"").unwrap(), 21);
    drop(ob);

    // A crash loses the lazily written watermark: numbering still continues, and the
    // records still on disk are merely resent.
    fs::remove_file(tmp.path().join(ACKED_FILE)).unwrap();
    let mut ob = Outbox::open(cfg).unwrap();
    let w = ob.window();
    assert_eq!(w.last_assigned(), 21);
    assert!(w.acked() <= 21);
    assert_eq!(ob.append(&output(22, 1), b"").unwrap(), 22);
}

#[test]
fn stale_and_impossible_acks() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(config(tmp.path())).unwrap();
    for i in 1..=3 {
        ob.append(&output(i, 5), b"").unwrap();
    }
    assert_eq!(ob.ack(2).unwrap(), 2);
    assert_eq!(ob.ack(1).unwrap(), 0, "stale ack ignored");
    let err = ob.ack(4).unwrap_err();
    assert!(
        matches!(
            err,
            OutboxError::Ack(SeqError::AckBeyondSent { acked: 4, sent: 3 })
        ),
        "{err}"
    );
    assert_eq!(ob.window(), SendWindow::resume(3, 2));
}

#[test]
fn non_sequenced_messages_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(config(tmp.path())).unwrap();
    let err = ob
        .append(&Message::Heartbeat { sent_ms: 1 }, b"")
        .unwrap_err();
    assert!(
        matches!(err, OutboxError::NotSequenced { kind: "heartbeat" }),
        "{err}"
    );
    assert_eq!(ob.window().last_assigned(), 0);
}

/// Writes three records and returns (dir, segment path, segment bytes, offset of the
/// third record, the first two frames).
fn three_records(tmp: &Path) -> (PathBuf, Vec<u8>, u64, Vec<(u64, Bytes)>) {
    let mut ob = Outbox::open(config(tmp)).unwrap();
    for i in 1..=3 {
        ob.append(&blob(i), b"some payload").unwrap();
    }
    let frames = all(&ob);
    let third = ob.segments[0].starts[2];
    drop(ob);
    let (_, path) = segment_files(tmp).pop().unwrap();
    let data = fs::read(&path).unwrap();
    (path, data, third, frames[..2].to_vec())
}

fn assert_recovers_two(dir: &Path, path: &Path, third: u64, two: &[(u64, Bytes)], what: &str) {
    let mut ob = Outbox::open(config(dir)).unwrap();
    assert_eq!(ob.window().last_assigned(), 2, "{what}");
    assert_eq!(all(&ob), two, "{what}");
    assert_eq!(
        fs::metadata(path).unwrap().len(),
        third,
        "{what}: tail truncated"
    );
    assert_eq!(ob.last().unwrap().unwrap().0, 2, "{what}");
    // The outbox goes on from there.
    assert_eq!(ob.append(&blob(3), b"again").unwrap(), 3, "{what}");
    drop(ob);
    let ob = Outbox::open(config(dir)).unwrap();
    let frames = all(&ob);
    assert_eq!(frames.len(), 3, "{what}");
    assert_eq!(decode(&frames[2].1).1.as_ref(), b"again", "{what}");
}

#[test]
fn torn_tail_at_every_offset_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, data, third, two) = three_records(tmp.path());
    for cut in third..data.len() as u64 {
        fs::write(&path, &data[..cut as usize]).unwrap();
        assert_recovers_two(tmp.path(), &path, third, &two, &format!("cut at {cut}"));
    }
}

#[test]
fn damaged_last_record_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, data, third, two) = three_records(tmp.path());
    for at in third as usize..data.len() {
        let mut bad = data.clone();
        bad[at] ^= 0x40;
        fs::write(&path, &bad).unwrap();
        assert_recovers_two(tmp.path(), &path, third, &two, &format!("flip at {at}"));
    }
    // Zeros where the last record should be (a common power-loss artefact).
    let mut zeroed = data.clone();
    zeroed[third as usize..].fill(0);
    fs::write(&path, &zeroed).unwrap();
    assert_recovers_two(tmp.path(), &path, third, &two, "zeroed tail");
}

#[test]
fn segments_roll_over_and_acked_ones_are_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small(tmp.path(), 1000, DEFAULT_CACHE_BYTES);
    let mut ob = Outbox::open(cfg.clone()).unwrap();
    for i in 1..=50 {
        ob.append(&output(i, 150), b"").unwrap();
    }
    let files = segment_files(tmp.path());
    assert!(files.len() >= 10, "{} segments", files.len());
    for (first, path) in &files {
        let len = fs::metadata(path).unwrap().len();
        assert!(len <= 1000, "segment {first} has {len} bytes");
    }
    assert_eq!(files[0].0, 1);
    let frames = all(&ob);

    ob.ack(25).unwrap();
    let left = segment_files(tmp.path());
    // Exactly the segments holding something above 25 remain.
    let expected: Vec<u64> = files
        .iter()
        .enumerate()
        .filter(|(i, _)| files.get(i + 1).is_none_or(|(next, _)| next - 1 > 25))
        .map(|(_, (first, _))| *first)
        .collect();
    assert_eq!(left.iter().map(|(f, _)| *f).collect::<Vec<_>>(), expected);
    assert!(left[0].0 <= 26);
    assert_eq!(all(&ob), frames[25..]);
    drop(ob);

    let ob = Outbox::open(cfg).unwrap();
    assert_eq!(ob.window(), SendWindow::resume(50, 25));
    assert_eq!(all(&ob), frames[25..]);
}

#[test]
fn full_at_the_limit_then_progress_after_acks() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path());
    let mut probe = Outbox::open(config(&tmp.path().join("probe"))).unwrap();
    probe.append(&output(1, 100), b"").unwrap();
    let rec = probe.pending_bytes();
    cfg.max_bytes = rec * 5 + rec / 2;
    let mut ob = Outbox::open(cfg.clone()).unwrap();
    for i in 1..=5 {
        ob.append(&output(i, 100), b"").unwrap();
    }
    let (_, seg) = segment_files(tmp.path()).pop().unwrap();
    let len_before = fs::metadata(&seg).unwrap().len();
    let err = ob.append(&output(6, 100), b"").unwrap_err();
    match err {
        OutboxError::Full {
            pending_bytes,
            max_bytes,
        } => {
            assert_eq!(pending_bytes, rec * 5);
            assert_eq!(max_bytes, cfg.max_bytes);
        }
        other => panic!("expected Full, got {other}"),
    }
    assert_eq!(
        fs::metadata(&seg).unwrap().len(),
        len_before,
        "nothing written"
    );
    assert_eq!(ob.window().last_assigned(), 5);

    ob.ack(2).unwrap();
    assert_eq!(ob.append(&output(6, 100), b"").unwrap(), 6);
    assert_eq!(ob.append(&output(7, 100), b"").unwrap(), 7);
    assert!(matches!(
        ob.append(&output(8, 100), b""),
        Err(OutboxError::Full { .. })
    ));

    let err = ob
        .append(&blob(9), &vec![0u8; cfg.max_bytes as usize])
        .unwrap_err();
    assert!(matches!(err, OutboxError::RecordTooLarge { .. }), "{err}");
}

#[test]
fn stream_id_is_stable_and_new_after_wipe() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("outbox");
    let mut ob = Outbox::open(config(&dir)).unwrap();
    let id = ob.stream_id().to_owned();
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    ob.append(&output(1, 1), b"").unwrap();
    drop(ob);
    let ob = Outbox::open(config(&dir)).unwrap();
    assert_eq!(ob.stream_id(), id);
    drop(ob);

    fs::remove_dir_all(&dir).unwrap();
    let mut ob = Outbox::open(config(&dir)).unwrap();
    assert_ne!(ob.stream_id(), id);
    assert_eq!(
        ob.append(&output(1, 1), b"").unwrap(),
        1,
        "a new stream starts at 1"
    );
}

#[test]
fn damaged_stream_id_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    drop(Outbox::open(config(tmp.path())).unwrap());
    fs::write(tmp.path().join(STREAM_FILE), "not hex\n").unwrap();
    let err = Outbox::open(config(tmp.path())).unwrap_err();
    assert!(matches!(err, OutboxError::BadStreamId { .. }), "{err}");
}

#[test]
fn second_open_is_locked_out() {
    let tmp = tempfile::tempdir().unwrap();
    let ob = Outbox::open(config(tmp.path())).unwrap();
    let err = Outbox::open(config(tmp.path())).unwrap_err();
    assert!(matches!(err, OutboxError::Locked { .. }), "{err}");
    drop(ob);
    Outbox::open(config(tmp.path())).unwrap();
}

#[test]
fn frames_from_cache_and_from_disk_agree() {
    let tmp = tempfile::tempdir().unwrap();
    // A cache that holds only the last few frames, and small segments.
    let cfg = small(tmp.path(), 2000, 1500);
    let mut ob = Outbox::open(cfg.clone()).unwrap();
    for i in 1..=60 {
        ob.append(&blob(i), &vec![i as u8; (i as usize * 7) % 90])
            .unwrap();
    }
    ob.ack(3).unwrap();
    assert!(
        ob.cache.front().unwrap().0 > 30,
        "cache holds only recent frames"
    );
    let live = all(&ob);
    assert_eq!(live.len(), 57);
    // Small budgets: contiguous, ordered, at least one frame each time.
    let mut stitched = Vec::new();
    let mut after = 0;
    loop {
        let got = ob.frames_after(after, 300).unwrap();
        if got.is_empty() {
            break;
        }
        let size: usize = got.iter().map(|(_, f)| f.len()).sum();
        assert!(
            got.len() == 1 || size <= 300,
            "{size} bytes in {} frames",
            got.len()
        );
        after = got.last().unwrap().0;
        stitched.extend(got);
    }
    assert_eq!(stitched, live);
    assert!(ob.frames_after(60, usize::MAX).unwrap().is_empty());
    assert_eq!(
        ob.frames_after(0, 0).unwrap().len(),
        1,
        "at least one frame"
    );
    let last = ob.last().unwrap().unwrap();
    drop(ob);

    let ob = Outbox::open(cfg).unwrap();
    assert!(ob.cache.is_empty());
    assert_eq!(all(&ob), live);
    assert_eq!(ob.frames_after(40, usize::MAX).unwrap(), live[37..]);
    assert_eq!(ob.last().unwrap().unwrap(), last);
    assert_eq!(last.0, 60);
    assert_eq!(last.1.parse().unwrap().envelope.msg, blob(60));
}

#[test]
fn last_survives_ack_of_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(config(tmp.path())).unwrap();
    assert!(ob.last().unwrap().is_none());
    ob.append(&output(1, 3), b"").unwrap();
    ob.append(&blob(2), b"xyz").unwrap();
    ob.ack(2).unwrap();
    drop(ob);
    let ob = Outbox::open(config(tmp.path())).unwrap();
    let (seq, raw) = ob.last().unwrap().unwrap();
    assert_eq!(seq, 2);
    assert_eq!(raw.payload.as_ref(), b"xyz");
    assert_eq!(raw.parse().unwrap().envelope.msg, blob(2));
}

#[test]
fn welcome_beyond_local_records_skips_numbering_ahead() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(config(tmp.path())).unwrap();
    for i in 1..=3 {
        ob.append(&output(i, 3), b"").unwrap();
    }
    assert_eq!(ob.on_welcome(2).unwrap(), 2, "an ordinary ack");
    assert_eq!(ob.on_welcome(10).unwrap(), 1);
    assert_eq!(ob.window(), SendWindow::resume(10, 10));
    assert!(all(&ob).is_empty());
    drop(ob);
    // Durable even if the process had crashed right after.
    let mut ob = Outbox::open(config(tmp.path())).unwrap();
    assert_eq!(ob.window(), SendWindow::resume(10, 10));
    assert_eq!(ob.append(&output(11, 3), b"").unwrap(), 11);
}

#[test]
fn missing_middle_segment_cuts_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small(tmp.path(), 500, DEFAULT_CACHE_BYTES);
    let mut ob = Outbox::open(cfg.clone()).unwrap();
    for i in 1..=20 {
        ob.append(&output(i, 100), b"").unwrap();
    }
    let frames = all(&ob);
    drop(ob);
    let files = segment_files(tmp.path());
    assert!(files.len() >= 4);
    fs::remove_file(&files[1].1).unwrap();
    let ob = Outbox::open(cfg).unwrap();
    let kept = files[1].0 - 1;
    assert_eq!(ob.window().last_assigned(), kept);
    assert_eq!(all(&ob), frames[..kept as usize]);
    assert_eq!(segment_files(tmp.path()).len(), 1);
}

#[test]
fn periodic_and_every_append_policies_work() {
    for policy in [FsyncPolicy::EveryAppend, FsyncPolicy::Periodic] {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = small(tmp.path(), 400, DEFAULT_CACHE_BYTES);
        cfg.fsync = policy;
        let mut ob = Outbox::open(cfg.clone()).unwrap();
        for i in 1..=10 {
            ob.append(&output(i, 100), b"").unwrap();
        }
        ob.ack(5).unwrap();
        ob.sync().unwrap();
        assert_eq!(
            fs::read_to_string(tmp.path().join(ACKED_FILE)).unwrap(),
            "5\n"
        );
        let frames = all(&ob);
        drop(ob);
        assert_eq!(all(&Outbox::open(cfg).unwrap()), frames);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Ack(u8),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..400).prop_map(Op::Append),
        2 => any::<u8>().prop_map(Op::Ack),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn behaves_like_a_queue(ops in proptest::collection::vec(op(), 1..80)) {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = small(tmp.path(), 1200, 1500);
        cfg.max_bytes = 4000;
        let mut ob = Outbox::open(cfg.clone()).unwrap();
        let mut model: VecDeque<(u64, Bytes)> = VecDeque::new();
        let (mut last, mut acked) = (0u64, 0u64);
        let model_bytes = |m: &VecDeque<(u64, Bytes)>| {
            m.iter().map(|(_, f)| (f.len() + record::HEADER_LEN) as u64).sum::<u64>()
        };
        for op in ops {
            match op {
                Op::Append(n) => {
                    let payload = vec![(last % 251) as u8; n];
                    let msg = blob(last + 1);
                    let header = record::encode_header(last + 1, &msg).unwrap();
                    let mut frame = BytesMut::new();
                    nbagent_protocol::codec::encode_raw(&header, &payload, &mut frame);
                    let len = (frame.len() + record::HEADER_LEN) as u64;
                    match ob.append(&msg, &payload) {
                        Ok(seq) => {
                            prop_assert!(model_bytes(&model) + len <= cfg.max_bytes);
                            last += 1;
                            prop_assert_eq!(seq, last);
                            model.push_back((seq, frame.freeze()));
                        }
                        Err(OutboxError::Full { pending_bytes, .. }) => {
                            prop_assert_eq!(pending_bytes, model_bytes(&model));
                            prop_assert!(pending_bytes + len > cfg.max_bytes);
                        }
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
                Op::Ack(k) => {
                    let upto = acked + (last - acked) * u64::from(k) / 255;
                    let released = ob.ack(upto).unwrap();
                    prop_assert_eq!(released, upto - acked);
                    acked = upto;
                    while model.front().is_some_and(|(s, _)| *s <= acked) {
                        model.pop_front();
                    }
                }
                Op::Reopen => {
                    drop(ob);
                    ob = Outbox::open(cfg.clone()).unwrap();
                }
            }
            prop_assert_eq!(ob.window(), SendWindow::resume(last, acked));
            prop_assert_eq!(ob.pending_count(), model.len() as u64);
            prop_assert_eq!(ob.pending_bytes(), model_bytes(&model));
            let got = all(&ob);
            prop_assert_eq!(&got, &Vec::from(model.clone()));
            let mid = acked + (last - acked) / 2;
            let some = ob.frames_after(mid, 500).unwrap();
            let expected: Vec<_> = model.iter().filter(|(s, _)| *s > mid).cloned().collect();
            prop_assert!(expected.starts_with(&some));
            prop_assert_eq!(some.is_empty(), expected.is_empty());
        }
        drop(ob);
        let ob = Outbox::open(cfg).unwrap();
        prop_assert_eq!(all(&ob), Vec::from(model));
    }
}

#[test]
fn absurd_numbers_are_refused_without_overflow() {
    let tmp = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(config(tmp.path())).unwrap();
    ob.append(&output(1, 1), b"").unwrap();
    assert!(ob.frames_after(u64::MAX, usize::MAX).unwrap().is_empty());
    let err = ob.on_welcome(u64::MAX).unwrap_err();
    assert!(matches!(err, OutboxError::Ack(_)), "{err}");
    assert_eq!(ob.append(&output(2, 1), b"").unwrap(), 2);
    drop(ob);
    // A watermark file beyond belief is ignored rather than trusted.
    fs::write(tmp.path().join(ACKED_FILE), format!("{}\n", u64::MAX)).unwrap();
    let ob = Outbox::open(config(tmp.path())).unwrap();
    assert_eq!(ob.window(), SendWindow::resume(2, 0));
}

/// Writes `content` to a new file in `dir` and prepares it as an attachment.
fn attachment(ob: &Outbox, dir: &Path, name: &str, content: &[u8]) -> (PathBuf, Attachment) {
    let src = dir.join(name);
    fs::write(&src, content).unwrap();
    let att = ob.attachment_stager().prepare(&src).unwrap();
    (src, att)
}

fn outbox_files(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

#[test]
fn attached_records_send_the_file_bytes_without_copying_them() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("outbox");
    let mut ob = Outbox::open(config(&dir)).unwrap();
    assert_eq!(ob.append(&output(1, 10), b"").unwrap(), 1);
    let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let (src, mut att) = attachment(&ob, tmp.path(), "src", &content);
    let parts = [
        (blob(2), 0, 4096),
        (blob(3), 4096, 4096),
        (blob(4), 8192, 1808),
    ];
    assert_eq!(ob.append_attached(&mut att, &parts).unwrap(), 4);
    drop(att);
    // Linked, not copied: the attachment is the source file's inode.
    let linked = dir.join(format!("{ATT_PREFIX}{:020}", 2));
    assert_eq!(
        fs::metadata(&linked).unwrap().ino(),
        fs::metadata(&src).unwrap().ino()
    );
    // The last record appended reads back with its payload.
    let (last, raw) = ob.last().unwrap().unwrap();
    assert_eq!(last, 4);
    assert_eq!(raw.payload.as_ref(), &content[8192..]);
    assert_eq!(ob.append(&output(5, 10), b"").unwrap(), 5);
    // The records themselves are small: the payloads are not in the segments.
    assert!(ob.pending_bytes() < 2_000, "{}", ob.pending_bytes());

    let check = |frames: &[(u64, Bytes)]| {
        assert_eq!(
            frames.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        for (seq, frame) in frames {
            let (env, payload) = decode(frame);
            assert_eq!(env.seq, Some(*seq));
            if let Some((msg, at, len)) = parts.iter().find(|p| p.0 == blob(*seq)) {
                assert_eq!(env.msg, *msg);
                assert_eq!(
                    payload.as_ref(),
                    &content[*at as usize..*at as usize + *len as usize]
                );
            } else {
                assert_eq!(env.msg, output(*seq, 10));
            }
        }
    };
    let from_memory = all(&ob);
    check(&from_memory);
    drop(ob);

    // From disk after a reopen; the budget counts the payloads.
    let mut ob = Outbox::open(config(&dir)).unwrap();
    assert_eq!(all(&ob), from_memory);
    let some = ob.frames_after(1, 5_000).unwrap();
    assert_eq!(
        some.len(),
        1,
        "one 4 KiB payload fits in 5000 bytes, two do not"
    );
    assert_eq!(some[0], from_memory[1]);

    // The attachment goes once all its records are acked, and stays gone on reopen.
    ob.ack(3).unwrap();
    assert!(linked.exists());
    ob.ack(4).unwrap();
    assert!(!linked.exists());
    assert!(src.exists(), "the source file is the caller's");
    drop(ob);
    let ob = Outbox::open(config(&dir)).unwrap();
    assert_eq!(ob.window(), SendWindow::resume(5, 4));
    assert_eq!(all(&ob), from_memory[4..].to_vec());
}

#[test]
fn a_lost_attachment_drops_its_records_and_the_later_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("outbox");
    let mut ob = Outbox::open(config(&dir)).unwrap();
    ob.append(&output(1, 10), b"").unwrap();
    let (_, mut att) = attachment(&ob, tmp.path(), "src", &[7u8; 100]);
    let parts = [(blob(2), 0, 50), (blob(3), 50, 50)];
    ob.append_attached(&mut att, &parts).unwrap();
    ob.append(&output(4, 10), b"").unwrap();
    let kept = all(&ob)[..1].to_vec();
    drop(ob);
    fs::remove_file(dir.join(format!("{ATT_PREFIX}{:020}", 2))).unwrap();

    let mut ob = Outbox::open(config(&dir)).unwrap();
    assert_eq!(ob.window(), SendWindow::resume(1, 0));
    assert_eq!(all(&ob), kept);
    assert_eq!(ob.append(&output(2, 10), b"").unwrap(), 2);
}

#[test]
fn attachments_without_records_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("outbox");
    let ob = Outbox::open(config(&dir)).unwrap();
    // Dropped before being appended: removed at once.
    let (_, att) = attachment(&ob, tmp.path(), "a", b"abc");
    assert_eq!(outbox_files(&dir, ATT_PREFIX).len(), 1);
    drop(att);
    assert!(outbox_files(&dir, ATT_PREFIX).is_empty());
    // Left by a crash between preparing and appending, or with its records lost:
    // removed on open.
    let (_, att) = attachment(&ob, tmp.path(), "b", b"abc");
    std::mem::forget(att);
    fs::write(dir.join(format!("{ATT_PREFIX}{:020}", 7)), b"x").unwrap();
    drop(ob);
    assert_eq!(outbox_files(&dir, ATT_PREFIX).len(), 2);
    let _ob = Outbox::open(config(&dir)).unwrap();
    assert!(outbox_files(&dir, ATT_PREFIX).is_empty());
}

#[test]
fn a_full_outbox_keeps_the_attachment_for_a_retry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("outbox");
    let mut c = config(&dir);
    c.max_bytes = 1_000;
    let mut ob = Outbox::open(c).unwrap();
    ob.append(&output(1, 700), b"").unwrap();
    let (_, mut att) = attachment(&ob, tmp.path(), "src", &[1u8; 300]);
    let parts = [(blob(2), 0, 150), (blob(3), 150, 150)];
    assert!(matches!(
        ob.append_attached(&mut att, &parts),
        Err(OutboxError::Full { .. })
    ));
    assert_eq!(ob.window().last_assigned(), 1);
    // Out of range parts are refused whatever the space.
    assert!(matches!(
        ob.append_attached(&mut att, &[(blob(2), 200, 150)]),
        Err(OutboxError::OutsideAttachment { .. })
    ));
    ob.ack(1).unwrap();
    assert_eq!(ob.append_attached(&mut att, &parts).unwrap(), 3);
    let frames = all(&ob);
    assert_eq!(frames.len(), 2);
    assert_eq!(decode(&frames[1].1).1.as_ref(), &[1u8; 150]);
}

#[test]
fn periodic_policy_syncs_attachments_later_not_at_append() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("outbox");
    let mut c = config(&dir);
    c.fsync = FsyncPolicy::Periodic;
    let mut ob = Outbox::open(c).unwrap();
    let (_, mut att) = attachment(&ob, tmp.path(), "src", &[3u8; 64]);
    ob.append_attached(&mut att, &[(blob(1), 0, 64)]).unwrap();
    let pending = ob.take_unsynced();
    assert_eq!(pending, vec![dir.join(format!("{ATT_PREFIX}{:020}", 1))]);
    assert!(ob.take_unsynced().is_empty(), "taken once");
    sync_attachments(&pending).unwrap();
    // An attachment acked and deleted before the sync needs nothing.
    let (_, mut att) = attachment(&ob, tmp.path(), "src2", &[4u8; 64]);
    ob.append_attached(&mut att, &[(blob(2), 0, 64)]).unwrap();
    ob.ack(2).unwrap();
    ob.sync().unwrap();
    assert!(ob.take_unsynced().is_empty());
    // Under the default policy nothing is kept for syncing.
    drop(ob);
    let mut ob = Outbox::open(config(&dir)).unwrap();
    let (_, mut att) = attachment(&ob, tmp.path(), "src3", &[5u8; 64]);
    ob.append_attached(&mut att, &[(blob(3), 0, 64)]).unwrap();
    assert!(ob.take_unsynced().is_empty());
}

#[test]
fn a_held_file_survives_a_restart_until_appended() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("outbox");
    let ob = Outbox::open(config(&dir)).unwrap();
    let src = tmp.path().join("src");
    fs::write(&src, [9u8; 100]).unwrap();
    let att = ob.attachment_stager().hold(&src, b"note one").unwrap();
    // Dropping the handle (a crash) keeps it; the source may go.
    drop(att);
    fs::remove_file(&src).unwrap();
    drop(ob);

    let mut ob = Outbox::open(config(&dir)).unwrap();
    let mut held = ob.take_held();
    assert!(ob.take_held().is_empty(), "taken once");
    assert_eq!(held.len(), 1);
    let (mut att, note) = held.remove(0);
    assert_eq!(note, b"note one");
    assert_eq!(att.len(), 100);
    assert_eq!(fs::read(att.path()).unwrap(), [9u8; 100]);
    // Appended: the file gets its final name and the note goes.
    let parts = [(blob(1), 0, 60), (blob(2), 60, 40)];
    assert_eq!(ob.append_attached(&mut att, &parts).unwrap(), 2);
    drop(att);
    assert_eq!(
        outbox_files(&dir, ATT_PREFIX),
        vec![format!("{ATT_PREFIX}{:020}", 1)]
    );
    drop(ob);
    let mut ob = Outbox::open(config(&dir)).unwrap();
    assert!(ob.take_held().is_empty());
    let frames = all(&ob);
    assert_eq!(decode(&frames[1].1).1.as_ref(), &[9u8; 40]);
}

#[test]
fn a_crash_in_the_middle_of_appending_a_held_file_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("outbox");
    let mut ob = Outbox::open(config(&dir)).unwrap();
    let src = tmp.path().join("src");
    fs::write(&src, [4u8; 10]).unwrap();
    let mut att = ob.attachment_stager().hold(&src, b"n").unwrap();
    let held_path = att.path().to_owned();
    ob.append_attached(&mut att, &[(blob(1), 0, 10)]).unwrap();
    drop(att);
    drop(ob);
    // As if the agent died after writing the records, before the rename: the records
    // point at a missing attachment and are cut; the held file is handed back.
    let appended = dir.join(format!("{ATT_PREFIX}{:020}", 1));
    fs::rename(&appended, &held_path).unwrap();
    fs::write(note_path(&held_path), b"n").unwrap();
    let mut ob = Outbox::open(config(&dir)).unwrap();
    assert_eq!(ob.window(), SendWindow::resume(0, 0));
    let mut held = ob.take_held();
    assert_eq!(held.len(), 1);
    let (mut att, _) = held.remove(0);
    assert_eq!(
        ob.append_attached(&mut att, &[(blob(1), 0, 10)]).unwrap(),
        1
    );
    drop(att);
    drop(ob);
    // After the rename, before the note's removal: the lone note is removed.
    fs::write(note_path(&held_path), b"n").unwrap();
    let mut ob = Outbox::open(config(&dir)).unwrap();
    assert!(ob.take_held().is_empty());
    assert!(outbox_files(&dir, &format!("{ATT_PREFIX}held")).is_empty());
    assert_eq!(decode(&all(&ob)[0].1).1.as_ref(), &[4u8; 10]);
}

#[test]
fn held_files_are_released_or_removed_without_a_note() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("outbox");
    let ob = Outbox::open(config(&dir)).unwrap();
    let src = tmp.path().join("src");
    fs::write(&src, b"abc").unwrap();
    let att = ob.attachment_stager().hold(&src, b"x").unwrap();
    assert_eq!(outbox_files(&dir, ATT_PREFIX).len(), 2, "file and note");
    att.release();
    assert!(outbox_files(&dir, ATT_PREFIX).is_empty());
    // A note lost (crash while holding) or absurdly large: the file is dropped.
    let a = ob.attachment_stager().hold(&src, b"x").unwrap();
    fs::remove_file(note_path(a.path())).unwrap();
    let b = ob.attachment_stager().hold(&src, b"y").unwrap();
    fs::write(note_path(b.path()), vec![0u8; MAX_NOTE_LEN as usize + 1]).unwrap();
    drop((a, b));
    drop(ob);
    let mut ob = Outbox::open(config(&dir)).unwrap();
    assert!(ob.take_held().is_empty());
    assert!(outbox_files(&dir, ATT_PREFIX).is_empty());
}
