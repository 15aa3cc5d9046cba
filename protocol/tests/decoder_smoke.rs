//! Runs the fuzz harness (`harness/mod.rs`, also used by `fuzz/fuzz_targets/frame_decoder.rs`)
//! over a few thousand deterministic pseudo-random inputs, so CI exercises it on a stable
//! toolchain. Also writes the fuzzer's seed corpus on request (see `fuzz/README.md`).

mod common;
mod harness;

use bytes::{BufMut, Bytes, BytesMut};
use nbagent_protocol::codec::encode_raw;
use nbagent_protocol::{Direction, Envelope, Frame, Message, SUPPORTED};

/// A small deterministic generator (splitmix64); no dependency, same inputs every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn push(wire: &mut BytesMut, seq: Option<u64>, msg: Message, payload: &[u8]) {
    let raw = Frame {
        envelope: Envelope { seq, msg },
        payload: Bytes::copy_from_slice(payload),
    }
    .to_raw();
    encode_raw(&raw.header, &raw.payload, wire);
}

/// A plausible agent stream: hello, then sequenced data with resends, a gap now and
/// then, controls, and a goodbye. Every message type appears somewhere, in either
/// direction, sequenced or not, so the session's refusals are exercised too.
fn session_stream(rng: &mut Rng) -> Vec<u8> {
    let examples = common::examples();
    // Mostly what a conforming agent sends once established, sometimes anything.
    let conforming: Vec<&common::Example> = examples
        .iter()
        .filter(|e| {
            e.direction != Direction::ToAgent
                && !matches!(
                    e.msg,
                    Message::Error { .. }
                        | Message::Goodbye { .. }
                        | Message::Hello { .. }
                        | Message::Enroll { .. }
                )
        })
        .collect();
    let mut wire = BytesMut::new();
    if rng.below(8) != 0 {
        push(
            &mut wire,
            None,
            Message::Hello {
                versions: SUPPORTED,
                stream: "st".into(),
                software: "smoke".into(),
                token: None,
                received: 0,
            },
            &[],
        );
    }
    let mut seq = 0u64;
    for _ in 0..rng.below(12) {
        let ex = if rng.below(8) == 0 {
            &examples[rng.below(examples.len())]
        } else {
            conforming[rng.below(conforming.len())]
        };
        let s = if ex.sequenced {
            match rng.below(12) {
                0 => Some(seq.saturating_sub(rng.below(3) as u64).max(1)), // resend
                1 => Some(seq + 2),                                        // gap
                _ => {
                    seq += 1;
                    Some(seq)
                }
            }
        } else if rng.below(30) == 0 {
            Some(rng.next())
        } else {
            None
        };
        let payload: Vec<u8> = if ex.payload || rng.below(30) == 0 {
            (0..rng.below(48)).map(|_| rng.byte()).collect()
        } else {
            Vec::new()
        };
        push(&mut wire, s, ex.msg.clone(), &payload);
    }
    if rng.below(2) == 0 {
        push(
            &mut wire,
            None,
            Message::Goodbye {
                reason: "done".into(),
            },
            &[],
        );
    }
    wire.to_vec()
}

/// Flips, deletes, duplicates or overwrites a few bytes.
fn mutate(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..rng.below(4) {
        if data.is_empty() {
            return;
        }
        let i = rng.below(data.len());
        match rng.below(5) {
            0 => data[i] ^= 1 << rng.below(8),
            1 => {
                data.remove(i);
            }
            2 => data.insert(i, rng.byte()),
            3 => data[i] = [0x00, 0xff, 0x16, b'"', b'{', b'}'][rng.below(6)],
            _ => data.truncate(i),
        }
    }
}

fn input(rng: &mut Rng) -> Vec<u8> {
    let mut data = vec![rng.byte()];
    match rng.below(4) {
        0 => data.extend((0..rng.below(300)).map(|_| rng.byte())),
        1 => {
            // Plausible prefixes with random bodies.
            let mut wire = BytesMut::new();
            for _ in 0..rng.below(4) {
                wire.put_u32(rng.below(600) as u32);
                wire.put_u32(rng.below(80) as u32);
                wire.extend((0..rng.below(100)).map(|_| rng.byte()));
            }
            data.extend_from_slice(&wire);
        }
        2 => {
            data[0] &= 0b1111_0001; // the server has stored nothing yet
            data.extend(session_stream(rng));
        }
        _ => {
            let mut s = session_stream(rng);
            mutate(rng, &mut s);
            data.extend(s);
        }
    }
    data
}

#[test]
fn harness_holds_on_deterministic_inputs() {
    let mut rng = Rng(0x5EED_F00D);
    let mut total = harness::Stats::default();
    for _ in 0..4000 {
        let data = input(&mut rng);
        let s = harness::run(&data);
        total.frames += s.frames;
        total.parsed += s.parsed;
        total.new_data += s.new_data;
        total.duplicates += s.duplicates;
        total.refused += s.refused;
    }
    // The inputs must reach every layer, or the test proves little.
    assert!(total.parsed > 1000, "{total:?}");
    assert!(total.new_data > 1500, "{total:?}");
    assert!(total.duplicates > 100, "{total:?}");
    assert!(total.refused > 100, "{total:?}");
    assert!(
        total.frames > total.parsed,
        "no malformed headers reached: {total:?}"
    );
}

#[test]
fn harness_accepts_a_clean_session_end_to_end() {
    // Sanity check that the harness reaches the session: a clean stream decodes into
    // whole frames that the server model accepts (a refusal would reset it silently).
    let mut rng = Rng(7);
    let stream = session_stream(&mut rng);
    let (frames, outcome) = harness::decode(&stream, &[3, 1, 9], harness::SMALL);
    assert_eq!(outcome, harness::Outcome::Clean);
    assert!(!frames.is_empty());
    let mut data = vec![0u8];
    data.extend_from_slice(&stream);
    let stats = harness::run(&data);
    assert_eq!(stats.parsed, frames.len(), "{stats:?}");
}

/// Writes seed inputs for the fuzzer into `$NBAGENT_FUZZ_CORPUS` (see fuzz/README.md).
#[test]
#[ignore = "writes the fuzz seed corpus; run on demand"]
fn write_fuzz_seed_corpus() {
    let dir = std::env::var("NBAGENT_FUZZ_CORPUS").expect("set NBAGENT_FUZZ_CORPUS to a directory");
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    let mut rng = Rng(42);
    for i in 0..64 {
        let mut data = vec![rng.byte()];
        data.extend(session_stream(&mut rng));
        std::fs::write(format!("{dir}/seed-{i:03}"), data).expect("write seed");
    }
}
