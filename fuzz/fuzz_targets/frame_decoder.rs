//! Fuzz target: arbitrary bytes, in arbitrary chunk splits, through `FrameDecoder`,
//! `RawFrame::parse` and the server (and agent) session state machines.
//!
//! The harness is shared with `protocol/tests/decoder_smoke.rs`, which runs it on
//! stable over deterministic inputs; see that file and `fuzz/README.md`.
#![no_main]

#[path = "../../protocol/tests/harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = harness::run(data);
});
