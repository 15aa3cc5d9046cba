//! Round-trip and decoder properties of the wire protocol.
//!
//! (a) every message type survives the JSON envelope; (b) frames decode identically
//! however the byte stream is split; (c) the decoder never panics on arbitrary bytes and
//! refuses oversized frames from the 8-byte prefix alone, without allocating; (d)
//! `Frame::to_raw` and `RawFrame::parse` are inverse; (e) a readable table with one
//! hand-written instance of each message type.

mod common;

use std::collections::BTreeSet;

use bytes::{BufMut, BytesMut};
use nbagent_protocol::codec::PREFIX_LEN;
use nbagent_protocol::{
    Envelope, ErrorCode, Frame, FrameDecoder, FrameError, Limits, Message, RawFrame,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

use common::{all_error_codes, all_message_types, encode_all, examples, json_type};

// ----- helpers ------------------------------------------------------------------------

/// How a byte stream ended, for comparing two decodings of it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Every byte formed whole frames.
    Clean,
    /// An error, named by its variant.
    Failed(&'static str),
}

fn error_name(e: &FrameError) -> &'static str {
    match e {
        FrameError::HeaderTooLarge { .. } => "header_too_large",
        FrameError::PayloadTooLarge { .. } => "payload_too_large",
        FrameError::EmptyHeader => "empty_header",
        FrameError::BadHeader(_) => "bad_header",
        FrameError::Truncated { .. } => "truncated",
        FrameError::UnexpectedTls => "unexpected_tls",
        _ => "other",
    }
}

/// Feeds `wire` to a decoder in chunks of the given lengths (the rest in one last
/// chunk), draining every whole frame after each chunk, then ends the stream.
/// Checks on the way that every frame respects the limits and that the decoder never
/// reserves room for more than one whole, admissible frame.
fn decode_chunked(wire: &[u8], chunks: &[usize], limits: Limits) -> (Vec<RawFrame>, Outcome) {
    let mut decoder = FrameDecoder::new(limits);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = wire;
    let mut sizes = chunks.iter().copied().chain(std::iter::once(usize::MAX));
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(usize::MAX).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        buf.extend_from_slice(chunk);
        loop {
            let cap_before = buf.capacity();
            match decoder.decode(&mut buf) {
                Ok(Some(raw)) => {
                    assert!(!raw.header.is_empty());
                    assert!(raw.header.len() <= limits.max_header as usize);
                    assert!(raw.payload.len() <= limits.max_payload as usize);
                    frames.push(raw);
                }
                Ok(None) => {
                    // Growing the buffer is allowed only towards one admissible frame.
                    if buf.capacity() > cap_before {
                        let max = usize::try_from(limits.max_frame()).expect("fits");
                        assert!(
                            buf.capacity() <= max.max(2 * cap_before),
                            "decoder reserved {} bytes (limit {max})",
                            buf.capacity()
                        );
                    }
                    break;
                }
                Err(e) => {
                    assert_eq!(buf.capacity(), cap_before, "an error must not allocate");
                    return (frames, Outcome::Failed(error_name(&e)));
                }
            }
        }
    }
    match decoder.finish(&buf) {
        Ok(()) => (frames, Outcome::Clean),
        Err(e) => (frames, Outcome::Failed(error_name(&e))),
    }
}

fn small_limits() -> Limits {
    Limits {
        max_header: 300,
        max_payload: 40,
    }
}

// ----- coverage of the catalogue ------------------------------------------------------

#[test]
fn every_type_has_a_generator() {
    let all = all_message_types();
    let mut runner = TestRunner::deterministic();
    let strategy = common::message();
    let mut seen = BTreeSet::new();
    for _ in 0..20_000 {
        let msg = strategy
            .new_tree(&mut runner)
            .expect("generate a message")
            .current();
        assert_eq!(msg.kind(), json_type(&msg), "kind() disagrees with serde");
        seen.insert(msg.kind().to_owned());
        if seen.len() == all.len() {
            break;
        }
    }
    let missing: Vec<_> = all.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "no generator for message types {missing:?}"
    );
    let unknown: Vec<_> = seen.difference(&all).collect();
    assert!(unknown.is_empty(), "kind() names unknown types {unknown:?}");
}

#[test]
fn example_table_covers_every_type_once() {
    let all = all_message_types();
    let mut listed = BTreeSet::new();
    for ex in examples() {
        assert!(
            listed.insert(json_type(&ex.msg)),
            "{} listed twice",
            ex.msg.kind()
        );
    }
    assert_eq!(listed, all);
}

#[test]
fn error_code_display_matches_its_wire_name() {
    let codes = all_error_codes();
    assert_eq!(
        codes.len(),
        15,
        "update docs/protocol.md for new codes: {codes:?}"
    );
    for name in codes {
        let code: ErrorCode =
            serde_json::from_value(serde_json::Value::String(name.clone())).expect("parse");
        assert_eq!(code.to_string(), name);
    }
}

// ----- (e) the hand-written table -----------------------------------------------------

#[test]
fn table_of_examples_round_trips() {
    for (i, ex) in examples().into_iter().enumerate() {
        let kind = ex.msg.kind();
        assert_eq!(kind, json_type(&ex.msg), "row {i}");
        assert_eq!(ex.msg.direction(), ex.direction, "{kind}: direction");
        assert_eq!(ex.msg.is_sequenced(), ex.sequenced, "{kind}: sequenced");
        assert_eq!(ex.msg.has_payload(), ex.payload, "{kind}: payload");

        let envelope = Envelope {
            seq: ex.sequenced.then_some(7),
            msg: ex.msg,
        };
        let json = serde_json::to_string(&envelope).expect("serialise");
        let back: Envelope =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{kind}: {e}\nheader: {json}"));
        assert_eq!(back, envelope, "{kind}: header {json}");

        let frame = Frame {
            envelope,
            payload: if ex.payload {
                bytes::Bytes::from_static(b"\x89PNG")
            } else {
                bytes::Bytes::new()
            },
        };
        let (raws, wire) = encode_all(std::slice::from_ref(&frame));
        let (got, outcome) = decode_chunked(&wire, &[1, 3, 5], Limits::default());
        assert_eq!(outcome, Outcome::Clean, "{kind}");
        assert_eq!(got, raws, "{kind}");
        assert_eq!(got[0].parse().expect("parse"), frame, "{kind}");
    }
}

#[test]
fn unknown_type_and_unknown_envelope_field_are_refused_unknown_message_field_ignored() {
    let bad_type = RawFrame {
        header: bytes::Bytes::from_static(br#"{"msg":{"type":"teleport"}}"#),
        payload: bytes::Bytes::new(),
    };
    assert!(matches!(bad_type.parse(), Err(FrameError::BadHeader(_))));
    let extra_envelope_field = RawFrame {
        header: bytes::Bytes::from_static(br#"{"msg":{"type":"ack","upto":1},"prio":9}"#),
        payload: bytes::Bytes::new(),
    };
    assert!(matches!(
        extra_envelope_field.parse(),
        Err(FrameError::BadHeader(_))
    ));
    let extra_message_field = RawFrame {
        header: bytes::Bytes::from_static(br#"{"msg":{"type":"ack","upto":1,"new_field":[1]}}"#),
        payload: bytes::Bytes::new(),
    };
    assert_eq!(
        extra_message_field
            .parse()
            .expect("forward compatible")
            .envelope
            .msg,
        Message::Ack { upto: 1 }
    );
}

// ----- (c) oversized frames -----------------------------------------------------------

#[test]
fn limit_boundaries_are_inclusive() {
    let limits = small_limits();
    let mut buf = BytesMut::new();
    buf.put_u32(limits.max_header);
    buf.put_u32(limits.max_payload);
    assert!(
        FrameDecoder::new(limits)
            .decode(&mut buf)
            .expect("at limit")
            .is_none()
    );

    for (h, p, want) in [
        (limits.max_header + 1, 0, "header_too_large"),
        (1, limits.max_payload + 1, "payload_too_large"),
        (u32::MAX, u32::MAX, "header_too_large"),
    ] {
        let mut buf = BytesMut::with_capacity(PREFIX_LEN);
        buf.put_u32(h);
        buf.put_u32(p);
        let cap = buf.capacity();
        let err = FrameDecoder::new(limits)
            .decode(&mut buf)
            .expect_err("refused");
        assert_eq!(error_name(&err), want);
        assert_eq!(buf.capacity(), cap, "no allocation for a refused frame");
        assert_eq!(buf.len(), PREFIX_LEN, "refusal consumes nothing");
    }
}

proptest! {
    #![proptest_config(Config { cases: 256, ..Config::default() })]

    // ----- (a) envelope JSON round trip ----------------------------------------------

    #[test]
    fn envelope_json_round_trips(envelope in common::envelope()) {
        let json = serde_json::to_vec(&envelope).expect("serialise");
        let back: Envelope = serde_json::from_slice(&json).expect("parse back");
        prop_assert_eq!(&back, &envelope);
        let v: serde_json::Value = serde_json::from_slice(&json).expect("valid JSON");
        prop_assert_eq!(v["msg"]["type"].as_str(), Some(envelope.msg.kind()));
        prop_assert_eq!(v.get("seq").is_some(), envelope.seq.is_some());
    }

    #[test]
    fn finite_floats_round_trip_exactly(f in proptest::num::f64::ANY) {
        prop_assume!(f.is_finite());
        let v = serde_json::Value::from(f);
        let text = serde_json::to_string(&v).expect("serialise");
        let back: serde_json::Value = serde_json::from_str(&text).expect("parse");
        prop_assert_eq!(back.as_f64().map(f64::to_bits), Some(f.to_bits()), "{}", text);
    }

    // ----- (d) to_raw / parse ---------------------------------------------------------

    #[test]
    fn to_raw_then_parse_is_identity(frame in common::frame()) {
        let raw = frame.to_raw();
        prop_assert_eq!(raw.wire_len(), PREFIX_LEN + raw.header.len() + frame.payload.len());
        prop_assert_eq!(raw.parse().expect("parse"), frame);
    }

    // ----- (b) splits and chunkings ---------------------------------------------------

    #[test]
    fn one_or_two_frames_split_at_every_byte(
        frames in prop::collection::vec(common::frame(), 1..=2)
    ) {
        let (raws, wire) = encode_all(&frames);
        for split in 0..=wire.len() {
            let (got, outcome) = decode_chunked(&wire, &[split], Limits::default());
            prop_assert_eq!(&outcome, &Outcome::Clean, "split at {}", split);
            prop_assert_eq!(&got, &raws, "split at {}", split);
        }
        // And one byte at a time.
        let (got, outcome) = decode_chunked(&wire, &vec![1; wire.len()], Limits::default());
        prop_assert_eq!(outcome, Outcome::Clean);
        let parsed: Vec<Frame> = got.iter().map(|r| r.parse().expect("parse")).collect();
        prop_assert_eq!(parsed, frames);
    }

    #[test]
    fn many_frames_in_random_chunks(
        frames in prop::collection::vec(common::frame(), 0..8),
        chunks in prop::collection::vec(1usize..200, 0..64),
    ) {
        let (raws, wire) = encode_all(&frames);
        let (got, outcome) = decode_chunked(&wire, &chunks, Limits::default());
        prop_assert_eq!(outcome, Outcome::Clean);
        prop_assert_eq!(&got, &raws);
        let parsed: Vec<Frame> = got.iter().map(|r| r.parse().expect("parse")).collect();
        prop_assert_eq!(parsed, frames);
    }

    #[test]
    fn a_cut_stream_reports_truncation(
        frames in prop::collection::vec(common::frame(), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let (raws, wire) = encode_all(&frames);
        let last = raws.last().expect("one frame").wire_len();
        // Cut strictly inside the last frame.
        let keep = wire.len() - 1 - cut.index(last);
        let (got, outcome) = decode_chunked(&wire[..keep], &[], Limits::default());
        prop_assert_eq!(&got[..], &raws[..raws.len() - 1]);
        let want = if keep == wire.len() - last {
            Outcome::Clean
        } else {
            Outcome::Failed("truncated")
        };
        prop_assert_eq!(outcome, want);
    }

    // ----- (c) arbitrary bytes ----------------------------------------------------------

    #[test]
    fn arbitrary_bytes_never_panic_and_decode_the_same_in_any_split(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        chunks in prop::collection::vec(1usize..40, 0..32),
        small in any::<bool>(),
    ) {
        let limits = if small { small_limits() } else { Limits::default() };
        let whole = decode_chunked(&bytes, &[], limits);
        let split = decode_chunked(&bytes, &chunks, limits);
        prop_assert_eq!(&whole, &split);
        for raw in &whole.0 {
            // Parsing untrusted headers may fail but never panics.
            let _ = raw.parse();
        }
    }

    #[test]
    fn frame_like_garbage_decodes_the_same_in_any_split(
        parts in prop::collection::vec(
            (0u32..400, 0u32..60, prop::collection::vec(any::<u8>(), 0..80)),
            0..6
        ),
        chunks in prop::collection::vec(1usize..40, 0..32),
    ) {
        // Prefixes with plausible lengths followed by random bodies: reaches the
        // limit checks and the body path far more often than uniform bytes.
        let mut wire = BytesMut::new();
        for (h, p, body) in &parts {
            wire.put_u32(*h);
            wire.put_u32(*p);
            wire.put_slice(body);
        }
        let limits = small_limits();
        let whole = decode_chunked(&wire, &[], limits);
        let split = decode_chunked(&wire, &chunks, limits);
        prop_assert_eq!(&whole, &split);
    }

    #[test]
    fn oversized_announcement_fails_on_the_eighth_byte(
        header in 0u32..=u32::MAX,
        payload in 0u32..=u32::MAX,
        body in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let limits = small_limits();
        prop_assume!(header > limits.max_header || payload > limits.max_payload);
        let mut wire = BytesMut::new();
        wire.put_u32(header);
        wire.put_u32(payload);
        wire.put_slice(&body);
        let mut decoder = FrameDecoder::new(limits);
        let mut buf = BytesMut::with_capacity(64);
        for (i, b) in wire.iter().enumerate() {
            buf.put_u8(*b);
            let cap = buf.capacity();
            let r = decoder.decode(&mut buf);
            prop_assert_eq!(buf.capacity(), cap, "allocated at byte {}", i + 1);
            if i + 1 < PREFIX_LEN && wire[0] != 0x16 {
                prop_assert!(matches!(r, Ok(None)), "early verdict at byte {}", i + 1);
            } else {
                prop_assert!(r.is_err(), "no error at byte {}", i + 1);
                break;
            }
        }
    }

    #[test]
    fn admissible_announcement_reserves_at_most_the_frame(
        header in 1u32..=300,
        payload in 0u32..=40,
    ) {
        let limits = small_limits();
        let mut buf = BytesMut::with_capacity(PREFIX_LEN);
        buf.put_u32(header);
        buf.put_u32(payload);
        let r = FrameDecoder::new(limits).decode(&mut buf).expect("admissible");
        prop_assert!(r.is_none());
        let total = PREFIX_LEN + header as usize + payload as usize;
        prop_assert!(buf.capacity() >= total, "reserves room for the frame");
        prop_assert!(buf.capacity() <= total.max(2 * PREFIX_LEN));
    }
}

#[test]
fn tls_client_hello_is_recognised_at_any_length() {
    // The first bytes of a real TLS 1.2/1.3 ClientHello record.
    let hello = [
        0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    for n in 1..=hello.len() {
        let mut buf = BytesMut::from(&hello[..n]);
        let err = FrameDecoder::default().decode(&mut buf).expect_err("tls");
        assert_eq!(error_name(&err), "unexpected_tls", "after {n} bytes");
    }
    // Plaintext frames start with 0x00 under the default limits.
    let (_, wire) = encode_all(&[Frame::control(Message::Heartbeat { sent_ms: 0 })]);
    assert_eq!(wire[0], 0x00);
}
