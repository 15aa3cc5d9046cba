//! Turning what the kernel displays into protocol messages: binary and large values
//! of a MIME bundle leave the bundle as content-addressed blobs, uploaded in chunks
//! before the output that references them.

use base64::Engine;
use bytes::Bytes;
use nbagent_protocol::{CHUNK_SIZE, Message};
use serde_json::{Map, Value, json};

use crate::workload::sha256_hex;

/// Text values larger than this leave the bundle as blobs too.
pub const INLINE_TEXT_LIMIT: usize = 256 * 1024;

/// A value taken out of a MIME bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// SHA-256, hex.
    pub hash: String,
    /// MIME type.
    pub media_type: String,
    /// The bytes.
    pub bytes: Bytes,
}

impl Blob {
    /// The `blob_chunk` messages (and payloads) that upload this blob.
    pub fn chunks(&self) -> Vec<(Message, Bytes)> {
        let total = self.bytes.len();
        let mut out = Vec::with_capacity(total.div_ceil(CHUNK_SIZE).max(1));
        let mut offset = 0;
        loop {
            let end = (offset + CHUNK_SIZE).min(total);
            out.push((
                Message::BlobChunk {
                    hash: self.hash.clone(),
                    media_type: self.media_type.clone(),
                    offset: offset as u64,
                    total: total as u64,
                },
                self.bytes.slice(offset..end),
            ));
            offset = end;
            if offset >= total {
                return out;
            }
        }
    }
}

/// Jupyter sends a text value as a string or as a list of lines.
fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| p.as_str())
            .collect::<Option<Vec<_>>>()
            .map(|p| p.concat()),
        _ => None,
    }
}

fn is_binary(media_type: &str) -> bool {
    (media_type.starts_with("image/") && media_type != "image/svg+xml")
        || media_type == "application/pdf"
        || media_type.starts_with("audio/")
        || media_type.starts_with("video/")
}

/// Replaces binary values (base64 in Jupyter's JSON) and oversized text values of a
/// MIME bundle by `{"blob": hash, "size": n}` and returns the blobs, in bundle order.
/// Values that are not valid base64 stay inline: nothing is dropped.
pub fn extract_blobs(bundle: &mut Value) -> Vec<Blob> {
    let Value::Object(map) = bundle else {
        return Vec::new();
    };
    let mut blobs = Vec::new();
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        let Some(text) = map.get(&key).and_then(text_of) else {
            continue;
        };
        let bytes = if is_binary(&key) {
            let clean: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            match base64::engine::general_purpose::STANDARD.decode(clean.as_bytes()) {
                Ok(b) => b,
                Err(_) => continue,
            }
        } else if text.len() > INLINE_TEXT_LIMIT {
            text.into_bytes()
        } else {
            continue;
        };
        let hash = sha256_hex(&bytes);
        let size = bytes.len();
        map.insert(key.clone(), json!({"blob": hash, "size": size}));
        blobs.push(Blob {
            hash,
            media_type: key,
            bytes: Bytes::from(bytes),
        });
    }
    blobs
}

/// An empty JSON object, for absent metadata.
pub fn empty_object() -> Value {
    Value::Object(Map::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_becomes_a_blob_and_text_stays() {
        let png = vec![0x89u8, b'P', b'N', b'G', 0, 1, 2, 3];
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        let mut bundle = json!({"image/png": format!("{}\n", b64), "text/plain": "<Figure>"});
        let blobs = extract_blobs(&mut bundle);
        assert_eq!(blobs.len(), 1);
        assert_eq!(&blobs[0].bytes[..], &png[..]);
        assert_eq!(blobs[0].media_type, "image/png");
        assert_eq!(bundle["image/png"]["blob"], json!(sha256_hex(&png)));
        assert_eq!(bundle["text/plain"], json!("<Figure>"));
    }

    #[test]
    fn large_text_leaves_small_text_and_bad_base64_stay() {
        let big = "x".repeat(INLINE_TEXT_LIMIT + 1);
        let mut bundle =
            json!({"text/html": [big.clone()], "image/jpeg": "%%%not base64", "text/plain": "ok"});
        let blobs = extract_blobs(&mut bundle);
        assert_eq!(blobs.len(), 1);
        assert_eq!(blobs[0].bytes.len(), big.len());
        assert_eq!(bundle["image/jpeg"], json!("%%%not base64"));
        assert_eq!(bundle["text/plain"], json!("ok"));
    }

    #[test]
    fn chunks_cover_the_blob_in_order() {
        let b = Blob {
            hash: "h".into(),
            media_type: "image/png".into(),
            bytes: Bytes::from(vec![7u8; CHUNK_SIZE * 2 + 5]),
        };
        let chunks = b.chunks();
        assert_eq!(chunks.len(), 3);
        let total: usize = chunks.iter().map(|(_, p)| p.len()).sum();
        assert_eq!(total, CHUNK_SIZE * 2 + 5);
        assert!(
            matches!(chunks[2].0, Message::BlobChunk { offset, .. } if offset == 2 * CHUNK_SIZE as u64)
        );
        let empty = Blob {
            bytes: Bytes::new(),
            ..b
        };
        assert_eq!(empty.chunks().len(), 1);
    }

    #[test]
    fn non_object_bundles_are_left_alone() {
        let mut v = json!("just text");
        assert!(extract_blobs(&mut v).is_empty());
    }
}
