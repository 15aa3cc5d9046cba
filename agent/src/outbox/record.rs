//! The on-disk record format of the outbox.
//!
//! ```text
//! +---------------+---------------+-------------+------------------------------+
//! | frame_len u32 | crc32 u32     | seq u64     | frame (exactly the wire form) |
//! | big-endian    | big-endian    | big-endian  | frame_len bytes               |
//! +---------------+---------------+-------------+------------------------------+
//! ```
//!
//! The CRC-32 covers the length field, the sequence number and the frame, so a torn
//! or corrupted record (including a damaged length) is detected and never misread.
//! The frame is the codec's wire form (`nbagent_protocol::codec::encode_raw`), so a
//! resend is a plain write of these bytes.

use bytes::{BufMut, Bytes, BytesMut};
use nbagent_protocol::codec::{self, PREFIX_LEN};
use nbagent_protocol::{Message, RawFrame};
use serde::Serialize;

/// Size of the record header (length, CRC, sequence number).
pub(super) const HEADER_LEN: usize = 16;

/// Smallest valid frame: the codec prefix plus a non-empty header.
const MIN_FRAME_LEN: usize = PREFIX_LEN + 1;

/// A borrowed view of an `Envelope`: serialises to exactly the same JSON without
/// cloning the message (checked by a test against `codec::encode_header`).
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    msg: &'a Message,
}

/// Serialises the JSON header of `msg` with sequence number `seq`.
pub(super) fn encode_header(seq: u64, msg: &Message) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&EnvelopeRef {
        seq: Some(seq),
        msg,
    })
}

/// Total record length for a header and payload of these sizes.
pub(super) fn record_len(header_len: usize, payload_len: usize) -> u64 {
    (HEADER_LEN + PREFIX_LEN) as u64 + header_len as u64 + payload_len as u64
}

/// Appends one whole record to `dst`. The caller has checked that the frame length
/// fits in a `u32`.
pub(super) fn encode(seq: u64, header: &[u8], payload: &[u8], dst: &mut BytesMut) {
    let start = dst.len();
    dst.reserve(HEADER_LEN + PREFIX_LEN + header.len() + payload.len());
    dst.put_u32(0);
    dst.put_u32(0);
    dst.put_u64(seq);
    codec::encode_raw(header, payload, dst);
    let frame_len = u32::try_from(dst.len() - start - HEADER_LEN).unwrap_or(u32::MAX);
    dst[start..start + 4].copy_from_slice(&frame_len.to_be_bytes());
    let crc = checksum(&dst[start..]);
    dst[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

/// CRC of a record (header included; the CRC field itself is skipped).
fn checksum(record: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&record[..4]);
    h.update(&record[8..]);
    h.finalize()
}

/// The fixed header of a record, before the frame has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    /// Length of the frame that follows the header.
    pub frame_len: usize,
    /// The stored CRC.
    pub crc: u32,
    /// The record's sequence number.
    pub seq: u64,
}

impl Head {
    /// Parses the 16-byte record header. `None` if the length cannot be that of a frame.
    pub(super) fn parse(b: &[u8; HEADER_LEN]) -> Option<Head> {
        let frame_len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if frame_len < MIN_FRAME_LEN {
            return None;
        }
        Some(Head {
            frame_len,
            crc: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            seq: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        })
    }

    /// Length of the whole record.
    pub(super) fn record_len(&self) -> u64 {
        (HEADER_LEN + self.frame_len) as u64
    }
}

/// Why a record was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Invalid {
    /// The length field is impossible or runs past the data.
    Length,
    /// The checksum does not match.
    Checksum,
    /// The frame's own prefix disagrees with the record length.
    Frame,
}

impl Invalid {
    /// A short description for logs and errors.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Invalid::Length => "bad record length",
            Invalid::Checksum => "checksum mismatch",
            Invalid::Frame => "frame prefix inconsistent with record length",
        }
    }
}

/// Verifies a whole record held in `record` (header and frame, nothing else).
pub(super) fn verify(record: &[u8]) -> Result<Head, Invalid> {
    let head_bytes: &[u8; HEADER_LEN] = record
        .get(..HEADER_LEN)
        .and_then(|s| s.try_into().ok())
        .ok_or(Invalid::Length)?;
    let head = Head::parse(head_bytes).ok_or(Invalid::Length)?;
    if record.len() as u64 != head.record_len() {
        return Err(Invalid::Length);
    }
    if checksum(record) != head.crc {
        return Err(Invalid::Checksum);
    }
    split_frame(&record[HEADER_LEN..]).ok_or(Invalid::Frame)?;
    Ok(head)
}

/// Splits a wire frame into header and payload lengths; `None` if its prefix does not
/// describe exactly `frame.len()` bytes with a non-empty header.
fn split_frame(frame: &[u8]) -> Option<(usize, usize)> {
    let p: &[u8; PREFIX_LEN] = frame.get(..PREFIX_LEN)?.try_into().ok()?;
    let h = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize;
    let l = u32::from_be_bytes([p[4], p[5], p[6], p[7]]) as usize;
    (h > 0 && PREFIX_LEN + h + l == frame.len()).then_some((h, l))
}

/// Splits a verified wire frame into a [`RawFrame`] without copying.
pub(super) fn to_raw(frame: &Bytes) -> Option<RawFrame> {
    let (h, _) = split_frame(frame)?;
    Some(RawFrame {
        header: frame.slice(PREFIX_LEN..PREFIX_LEN + h),
        payload: frame.slice(PREFIX_LEN + h..),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unwrap on test fixtures is fine
mod tests {
    use super::*;
    use nbagent_protocol::{Envelope, OutputContent};

    fn msg() -> Message {
        Message::Output {
            request: "r1".into(),
            cell: "c1".into(),
            output: OutputContent::Stream {
                name: "stdout".into(),
                text: "héllo \"quoted\"\n".into(),
            },
        }
    }

    #[test]
    fn borrowed_envelope_serialises_like_the_protocol() {
        let ours = encode_header(42, &msg()).unwrap();
        let theirs = codec::encode_header(&Envelope {
            seq: Some(42),
            msg: msg(),
        });
        assert_eq!(ours, theirs.as_ref());
    }

    #[test]
    fn record_roundtrip_and_damage_detected() {
        let header = encode_header(7, &msg()).unwrap();
        let mut buf = BytesMut::new();
        encode(7, &header, b"payload", &mut buf);
        assert_eq!(buf.len() as u64, record_len(header.len(), 7));
        let head = verify(&buf).unwrap();
        assert_eq!(head.seq, 7);
        let frame = buf.clone().freeze().slice(HEADER_LEN..);
        let raw = to_raw(&frame).unwrap();
        assert_eq!(raw.header.as_ref(), header.as_slice());
        assert_eq!(raw.payload.as_ref(), b"payload");
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x01;
            assert!(verify(&bad).is_err(), "flipped byte {i} not detected");
        }
        assert_eq!(verify(&buf[..buf.len() - 1]), Err(Invalid::Length));
    }
}
