//! A deterministic synthetic workload: stream outputs and blobs through the outbox, as a
//! kernel would, until a real kernel replaces it. Used by the README's main job, the
//! end-to-end tests and the benchmark.
//!
//! Item `k` of the plan is sent as sequence number `k` of a fresh stream, and the
//! workload must be the only producer: a restarted agent resumes at
//! `outbox.window().last_assigned() + 1`, so an agent killed at any instant produces
//! every item exactly once.

use bytes::Bytes;
use nbagent_protocol::{CHUNK_SIZE, Message, OutputContent};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::sender::{SendError, Sender};

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Number of stream outputs.
    pub outputs: u64,
    /// Number of blobs (PNG-like binary), spread evenly among the outputs.
    pub blobs: u64,
    /// Size of each blob.
    pub blob_bytes: usize,
}

impl std::str::FromStr for Workload {
    type Err = String;

    /// Parses `outputs=N,blobs=M,blob_bytes=B` (any subset; sizes accept `k`/`M`).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut w = Workload {
            outputs: 1000,
            blobs: 4,
            blob_bytes: 256 * 1024,
        };
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("expected key=value, got {part:?}"))?;
            let n = parse_size(v).ok_or_else(|| format!("not a number: {v:?}"))?;
            match k.trim() {
                "outputs" => w.outputs = n,
                "blobs" => w.blobs = n,
                "blob_bytes" => {
                    w.blob_bytes = usize::try_from(n).map_err(|_| "blob_bytes too large")?;
                }
                other => return Err(format!("unknown workload key {other:?}")),
            }
        }
        Ok(w)
    }
}

fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mul) = match v.as_bytes().last()? {
        b'k' | b'K' => (&v[..v.len() - 1], 1024),
        b'M' => (&v[..v.len() - 1], 1024 * 1024),
        b'G' => (&v[..v.len() - 1], 1024 * 1024 * 1024),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

/// One step of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item {
    /// Stream output number `i`.
    Output(u64),
    /// Chunk `chunk` of blob `blob`.
    BlobChunk {
        /// Blob index.
        blob: u64,
        /// Chunk index.
        chunk: u64,
    },
    /// The display_data output that references blob `blob`.
    Display(u64),
}

impl Workload {
    fn chunks_per_blob(&self) -> u64 {
        (self.blob_bytes.max(1)).div_ceil(CHUNK_SIZE) as u64
    }

    /// The whole plan, in order.
    pub fn plan(&self) -> Vec<Item> {
        let mut plan = Vec::new();
        let every = self
            .outputs
            .checked_div(self.blobs)
            .map_or(u64::MAX, |n| n.max(1));
        let mut blob = 0;
        for i in 0..self.outputs {
            plan.push(Item::Output(i));
            if (i + 1) % every == 0 && blob < self.blobs {
                self.push_blob(&mut plan, blob);
                blob += 1;
            }
        }
        while blob < self.blobs {
            self.push_blob(&mut plan, blob);
            blob += 1;
        }
        plan
    }

    fn push_blob(&self, plan: &mut Vec<Item>, blob: u64) {
        for chunk in 0..self.chunks_per_blob() {
            plan.push(Item::BlobChunk { blob, chunk });
        }
        plan.push(Item::Display(blob));
    }

    /// Total bytes of blob payload.
    pub fn blob_total(&self) -> u64 {
        self.blobs * self.blob_bytes as u64
    }
}

/// Deterministic content of blob `i` (xorshift stream; incompressible like a PNG).
pub fn blob_bytes(i: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (i.wrapping_add(1)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// SHA-256 hex of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Builds the message (and payload) for one item. `cache` keeps the current blob so
/// its chunks are not regenerated.
pub fn message(
    w: &Workload,
    item: Item,
    cache: &mut Option<(u64, Bytes, String)>,
) -> (Message, Bytes) {
    let blob = |b: u64, cache: &mut Option<(u64, Bytes, String)>| -> (Bytes, String) {
        if let Some((i, bytes, hash)) = cache
            && *i == b
        {
            return (bytes.clone(), hash.clone());
        }
        let bytes = Bytes::from(blob_bytes(b, w.blob_bytes));
        let hash = sha256_hex(&bytes);
        *cache = Some((b, bytes.clone(), hash.clone()));
        (bytes, hash)
    };
    match item {
        Item::Output(i) => (
            Message::Output {
                request: "workload".into(),
                cell: format!("cell-{}", i / 100),
                output: OutputContent::Stream {
                    name: "stdout".into(),
                    text: format!("line {i}: the quick brown fox jumps over the lazy dog\n"),
                },
            },
            Bytes::new(),
        ),
        Item::BlobChunk { blob: b, chunk } => {
            let (bytes, hash) = blob(b, cache);
            let start = (chunk as usize * CHUNK_SIZE).min(bytes.len());
            let end = (start + CHUNK_SIZE).min(bytes.len());
            (
                Message::BlobChunk {
                    hash,
                    media_type: "image/png".into(),
                    offset: start as u64,
                    total: bytes.len() as u64,
                },
                bytes.slice(start..end),
            )
        }
        Item::Display(b) => {
            let (_, hash) = blob(b, cache);
            (
                Message::Output {
                    request: "workload".into(),
                    cell: format!("blob-{b}"),
                    output: OutputContent::DisplayData {
                        data: json!({"image/png": {"blob": hash}, "text/plain": format!("<Figure {b}>")}),
                        metadata: json!({}),
                        display_id: None,
                    },
                },
                Bytes::new(),
            )
        }
    }
}

/// Progress callback argument.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Items sent so far (including those sent before a restart).
    pub done: u64,
    /// Items in the plan.
    pub total: u64,
}

/// Sends the plan from item `already_sent` on. Returns the number of items sent now.
pub async fn run(
    w: &Workload,
    sender: &Sender,
    already_sent: u64,
    mut progress: impl FnMut(Progress),
) -> Result<u64, SendError> {
    let plan = w.plan();
    let total = plan.len() as u64;
    let mut cache = None;
    let mut sent = 0;
    for (k, item) in plan.iter().enumerate().skip(already_sent as usize) {
        let (msg, payload) = message(w, *item, &mut cache);
        sender.send(&msg, &payload).await?;
        sent += 1;
        let done = k as u64 + 1;
        if done.is_multiple_of(10_000) || done == total {
            progress(Progress { done, total });
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_counts() {
        let w: Workload = "outputs=1000,blobs=3,blob_bytes=2500k".parse().unwrap();
        let plan = w.plan();
        let chunks = plan
            .iter()
            .filter(|i| matches!(i, Item::BlobChunk { .. }))
            .count();
        assert_eq!(chunks, 3 * 3);
        assert_eq!(plan.len(), 1000 + 9 + 3);
        assert!(matches!(plan[0], Item::Output(0)));
    }

    #[test]
    fn chunks_reassemble_to_the_hash() {
        let w = Workload {
            outputs: 1,
            blobs: 1,
            blob_bytes: CHUNK_SIZE + 17,
        };
        let mut cache = None;
        let mut whole = Vec::new();
        let mut want = String::new();
        for item in w.plan() {
            if let (Message::BlobChunk { hash, offset, .. }, p) = message(&w, item, &mut cache) {
                assert_eq!(offset as usize, whole.len());
                whole.extend_from_slice(&p);
                want = hash;
            }
        }
        assert_eq!(whole.len(), CHUNK_SIZE + 17);
        assert_eq!(sha256_hex(&whole), want);
    }

    #[test]
    fn bad_specs_refused() {
        assert!("outputs".parse::<Workload>().is_err());
        assert!("colour=3".parse::<Workload>().is_err());
        assert!("outputs=x".parse::<Workload>().is_err());
    }
}
