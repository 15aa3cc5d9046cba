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
//!
//! An *attached* record (the top bit of `frame_len` set, [`ATTACHED`]) keeps its payload
//! in an attachment file of the outbox instead: its body is the frame's prefix (with the
//! real payload length) and JSON header, followed by a reference of [`REF_LEN`] bytes,
//! the attachment's id and the payload's offset in it (both `u64`, big-endian):
//!
//! ```text
//! | header_len u32 | payload_len u32 | header (JSON) | attachment u64 | offset u64 |
//! ```
//!
//! [`attached`] reads the reference; the outbox puts the payload back when it sends.

use bytes::{BufMut, Bytes, BytesMut};
use nbagent_protocol::codec::{self, PREFIX_LEN};
use nbagent_protocol::{Message, RawFrame};
use serde::Serialize;

/// Size of the record header (length, CRC, sequence number).
pub(super) const HEADER_LEN: usize = 16;

/// Smallest valid frame: the codec prefix plus a non-empty header.
const MIN_FRAME_LEN: usize = PREFIX_LEN + 1;

/// Set in the length field of an attached record.
pub(super) const ATTACHED: u32 = 1 << 31;
/// Longest body of a record (the length field's other 31 bits).
pub(super) const MAX_BODY_LEN: u64 = (ATTACHED - 1) as u64;
/// Bytes of the reference that ends an attached record's body.
pub(super) const REF_LEN: usize = 16;

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
    let start = begin(seq, dst, PREFIX_LEN + header.len() + payload.len());
    codec::encode_raw(header, payload, dst);
    finish(start, 0, dst);
}

/// Length of an attached record with this header.
#[cfg(test)]
pub(super) fn attached_record_len(header_len: usize) -> u64 {
    (HEADER_LEN + PREFIX_LEN + REF_LEN) as u64 + header_len as u64
}

/// Appends one whole attached record to `dst`: the frame of `header` and a payload of
/// `payload_len` bytes found at `offset` in attachment `attachment`.
pub(super) fn encode_attached(
    seq: u64,
    header: &[u8],
    payload_len: u32,
    attachment: u64,
    offset: u64,
    dst: &mut BytesMut,
) {
    let start = begin(seq, dst, PREFIX_LEN + header.len() + REF_LEN);
    dst.put_u32(u32::try_from(header.len()).unwrap_or(u32::MAX));
    dst.put_u32(payload_len);
    dst.put_slice(header);
    dst.put_u64(attachment);
    dst.put_u64(offset);
    finish(start, ATTACHED, dst);
}

/// Writes a record header with the length and CRC left blank; returns where it starts.
fn begin(seq: u64, dst: &mut BytesMut, body_len: usize) -> usize {
    let start = dst.len();
    dst.reserve(HEADER_LEN + body_len);
    dst.put_u32(0);
    dst.put_u32(0);
    dst.put_u64(seq);
    start
}

/// Fills in the length (with `flags`) and CRC of the record starting at `start`.
fn finish(start: usize, flags: u32, dst: &mut BytesMut) {
    let body_len = u32::try_from(dst.len() - start - HEADER_LEN).unwrap_or(u32::MAX);
    dst[start..start + 4].copy_from_slice(&(body_len | flags).to_be_bytes());
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
    /// Length of the body that follows the header (the frame, or for an attached
    /// record the frame without its payload and the reference).
    pub frame_len: usize,
    /// Whether the payload is in an attachment.
    pub attached: bool,
    /// The stored CRC.
    pub crc: u32,
    /// The record's sequence number.
    pub seq: u64,
}

impl Head {
    /// Parses the 16-byte record header. `None` if the length cannot be that of a frame.
    pub(super) fn parse(b: &[u8; HEADER_LEN]) -> Option<Head> {
        let raw = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let attached = raw & ATTACHED != 0;
        let frame_len = (raw & !ATTACHED) as usize;
        if frame_len < MIN_FRAME_LEN + if attached { REF_LEN } else { 0 } {
            return None;
        }
        Some(Head {
            frame_len,
            attached,
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
    if head.attached {
        split_attached(&record[HEADER_LEN..]).ok_or(Invalid::Frame)?;
    } else {
        split_frame(&record[HEADER_LEN..]).ok_or(Invalid::Frame)?;
    }
    Ok(head)
}

/// Where an attached record's payload is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reference {
    /// The frame's prefix and header (what precedes the payload on the wire).
    pub head: Bytes,
    /// Length of the payload.
    pub payload_len: usize,
    /// The attachment holding it.
    pub attachment: u64,
    /// Its offset there.
    pub offset: u64,
}

/// Header length, payload length, attachment and offset of an attached body; `None`
/// if its prefix does not describe it.
fn split_attached(body: &[u8]) -> Option<(usize, usize, u64, u64)> {
    let p: &[u8; PREFIX_LEN] = body.get(..PREFIX_LEN)?.try_into().ok()?;
    let h = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize;
    let l = u32::from_be_bytes([p[4], p[5], p[6], p[7]]) as usize;
    if h == 0 || PREFIX_LEN + h + REF_LEN != body.len() {
        return None;
    }
    let r = &body[PREFIX_LEN + h..];
    let attachment = u64::from_be_bytes(r[..8].try_into().ok()?);
    let offset = u64::from_be_bytes(r[8..16].try_into().ok()?);
    Some((h, l, attachment, offset))
}

/// The attachment and the end of the payload in it, of a verified attached body.
pub(super) fn reference_of(body: &[u8]) -> Option<(u64, u64)> {
    let (_, len, attachment, offset) = split_attached(body)?;
    Some((attachment, offset.checked_add(len as u64)?))
}

/// The reference of a verified attached body.
pub(super) fn attached(body: &Bytes) -> Option<Reference> {
    let (h, payload_len, attachment, offset) = split_attached(body)?;
    Some(Reference {
        head: body.slice(..PREFIX_LEN + h),
        payload_len,
        attachment,
        offset,
    })
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

    #[test]
    fn attached_record_roundtrip_and_damage_detected() {
        let header = encode_header(9, &msg()).unwrap();
        let mut buf = BytesMut::new();
        encode_attached(9, &header, 1 << 20, 42, 3 << 20, &mut buf);
        assert_eq!(buf.len() as u64, attached_record_len(header.len()));
        let head = verify(&buf).unwrap();
        assert!(head.attached);
        assert_eq!(head.seq, 9);
        let body = buf.clone().freeze().slice(HEADER_LEN..);
        let r = attached(&body).unwrap();
        assert_eq!(
            (r.payload_len, r.attachment, r.offset),
            (1 << 20, 42, 3 << 20)
        );
        assert_eq!(&r.head[PREFIX_LEN..], header.as_slice());
        // Not a wire frame: its prefix announces a payload it does not hold.
        assert!(to_raw(&body).is_none());
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x01;
            assert!(verify(&bad).is_err(), "flipped byte {i} not detected");
        }
    }
}
