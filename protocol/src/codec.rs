//! Frame codec: length-prefixed frames of a JSON header plus an optional raw payload.
//!
//! ```text
//! +----------------+-----------------+----------------------+-------------------+
//! | header_len u32 | payload_len u32 | header (JSON, UTF-8) | payload (raw)     |
//! | big-endian     | big-endian      | header_len bytes     | payload_len bytes |
//! +----------------+-----------------+----------------------+-------------------+
//! ```
//!
//! Both lengths are checked against [`Limits`] as soon as the 8-byte prefix is
//! available, before a single byte of the body is buffered or allocated, so a peer
//! cannot make us reserve memory by announcing a huge frame.
//!
//! The first byte of a plaintext connection is therefore always `0x00` (a header is
//! far below 16 MiB), while a TLS connection starts with `0x16` (handshake record):
//! the server tells the two apart by peeking at one byte.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::message::Envelope;

/// Size of the fixed frame prefix (two big-endian `u32` lengths).
pub const PREFIX_LEN: usize = 8;

/// Default maximum header size (1 MiB).
pub const DEFAULT_MAX_HEADER: u32 = 1 << 20;

/// Maximum header of a frame from the server to an agent (16 MiB): a `file_listing`
/// carries a whole tree in its header (~150 bytes an entry). Agents accept this much;
/// a server must not send more (it answers with an error listing instead).
pub const SERVER_MAX_HEADER: u32 = 16 << 20;

/// Default maximum payload size (16 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 16 << 20;

/// Hard size limits of one frame, enforced by the decoder before allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted JSON header, in bytes.
    pub max_header: u32,
    /// Largest accepted raw payload, in bytes.
    pub max_payload: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header: DEFAULT_MAX_HEADER,
            max_payload: DEFAULT_MAX_PAYLOAD,
        }
    }
}

impl Limits {
    /// Largest whole frame (prefix included) these limits admit.
    pub fn max_frame(&self) -> u64 {
        PREFIX_LEN as u64 + u64::from(self.max_header) + u64::from(self.max_payload)
    }
}

/// Errors of the frame layer. Every one of them is fatal for the connection: after a
/// framing error the byte stream can no longer be trusted to be in sync.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The announced header is larger than [`Limits::max_header`].
    #[error("frame header of {len} bytes exceeds the limit of {max} bytes")]
    HeaderTooLarge { len: u32, max: u32 },
    /// The announced payload is larger than [`Limits::max_payload`].
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { len: u32, max: u32 },
    /// A frame announced an empty header; every frame has one.
    #[error("frame has an empty header")]
    EmptyHeader,
    /// The header is not valid JSON for an [`Envelope`].
    #[error("frame header is not a valid message")]
    BadHeader(#[source] serde_json::Error),
    /// The peer closed the stream in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
    /// The first bytes look like a TLS record on a plaintext decoder (or vice versa).
    #[error("stream starts with a TLS record where a plaintext frame was expected")]
    UnexpectedTls,
}

/// A frame whose header has not been parsed yet: the bytes exactly as on the wire.
///
/// Keeping the raw header lets a receiver store or forward it without re-encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The JSON header bytes.
    pub header: Bytes,
    /// The raw payload (possibly empty).
    pub payload: Bytes,
}

impl RawFrame {
    /// Parses the header into an [`Envelope`].
    pub fn parse(&self) -> Result<Frame, FrameError> {
        let envelope: Envelope =
            serde_json::from_slice(&self.header).map_err(FrameError::BadHeader)?;
        Ok(Frame {
            envelope,
            payload: self.payload.clone(),
        })
    }

    /// Length of this frame on the wire.
    pub fn wire_len(&self) -> usize {
        PREFIX_LEN + self.header.len() + self.payload.len()
    }
}

/// A decoded frame: a parsed envelope and its raw payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Sequence number (for sequenced messages) and the message itself.
    pub envelope: Envelope,
    /// Raw binary payload (blob bytes, file chunks); empty for most messages.
    pub payload: Bytes,
}

impl Frame {
    /// A frame without a sequence number or payload.
    pub fn control(message: crate::Message) -> Self {
        Self {
            envelope: Envelope {
                seq: None,
                msg: message,
            },
            payload: Bytes::new(),
        }
    }

    /// Encodes the header to JSON, producing the raw wire form.
    pub fn to_raw(&self) -> RawFrame {
        RawFrame {
            header: encode_header(&self.envelope),
            payload: self.payload.clone(),
        }
    }
}

/// Serialises an envelope to its JSON header bytes.
pub fn encode_header(envelope: &Envelope) -> Bytes {
    // Serialising our own types to a Vec cannot fail: every map key is a string and
    // no Serialize impl here returns an error.
    match serde_json::to_vec(envelope) {
        Ok(v) => Bytes::from(v),
        Err(e) => unreachable!("serialising an envelope failed: {e}"),
    }
}

/// Appends the wire form of a frame (prefix, header, payload) to `dst`.
///
/// Encoding does not check [`Limits`]: the sender is trusted to respect the limits it
/// negotiated; use [`check_limits`] when the payload comes from elsewhere.
pub fn encode_raw(header: &[u8], payload: &[u8], dst: &mut BytesMut) {
    dst.reserve(PREFIX_LEN + header.len() + payload.len());
    encode_head(header, payload.len(), dst);
    dst.put_slice(payload);
}

/// Appends the prefix and header of a frame whose payload has `payload_len` bytes to
/// `dst`: what [`encode_raw`] writes before the payload, for a sender that writes the
/// payload from its own buffer.
pub fn encode_head(header: &[u8], payload_len: usize, dst: &mut BytesMut) {
    dst.reserve(PREFIX_LEN + header.len());
    dst.put_u32(len_u32(header.len()));
    dst.put_u32(len_u32(payload_len));
    dst.put_slice(header);
}

/// Returns an error if a frame with these sizes would be refused by a peer using `limits`.
pub fn check_limits(
    header_len: usize,
    payload_len: usize,
    limits: Limits,
) -> Result<(), FrameError> {
    let h = u32::try_from(header_len).unwrap_or(u32::MAX);
    let p = u32::try_from(payload_len).unwrap_or(u32::MAX);
    if h > limits.max_header {
        return Err(FrameError::HeaderTooLarge {
            len: h,
            max: limits.max_header,
        });
    }
    if p > limits.max_payload {
        return Err(FrameError::PayloadTooLarge {
            len: p,
            max: limits.max_payload,
        });
    }
    Ok(())
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Incremental frame decoder over a caller-owned buffer (sans-IO).
///
/// Feed it whatever bytes arrived, in any split; it yields whole frames.
#[derive(Debug, Clone, Default)]
pub struct FrameDecoder {
    limits: Limits,
}

impl FrameDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self { limits }
    }

    /// The limits this decoder enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Takes one whole frame off the front of `buf`, if one is there.
    ///
    /// Returns `Ok(None)` when more bytes are needed. On success the frame's bytes are
    /// removed from `buf`. Sizes are validated from the prefix alone, so an oversized
    /// frame is refused before its body arrives.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<RawFrame>, FrameError> {
        if buf.len() < PREFIX_LEN {
            if buf.first() == Some(&0x16) {
                return Err(FrameError::UnexpectedTls);
            }
            return Ok(None);
        }
        let header_len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let payload_len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if buf[0] == 0x16 {
            return Err(FrameError::UnexpectedTls);
        }
        if header_len == 0 {
            return Err(FrameError::EmptyHeader);
        }
        check_limits(header_len as usize, payload_len as usize, self.limits)?;
        let total = PREFIX_LEN + header_len as usize + payload_len as usize;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(PREFIX_LEN);
        let header = buf.split_to(header_len as usize).freeze();
        let payload = buf.split_to(payload_len as usize).freeze();
        Ok(Some(RawFrame { header, payload }))
    }

    /// Call when the stream has ended: an error if a partial frame is left in `buf`.
    pub fn finish(&self, buf: &BytesMut) -> Result<(), FrameError> {
        if buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: buf.len(),
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unit tests: a panic is the failure report
mod tests {
    use super::*;
    use crate::Message;

    fn sample() -> RawFrame {
        let mut f = Frame::control(Message::Heartbeat { sent_ms: 7 });
        f.payload = Bytes::from_static(b"\x00\x01binary");
        f.to_raw()
    }

    #[test]
    fn roundtrip_one_frame() {
        let raw = sample();
        let mut buf = BytesMut::new();
        encode_raw(&raw.header, &raw.payload, &mut buf);
        let mut d = FrameDecoder::default();
        let got = d.decode(&mut buf).expect("decode").expect("whole frame");
        assert_eq!(got, raw);
        assert!(buf.is_empty());
        assert!(d.finish(&buf).is_ok());
    }

    #[test]
    fn oversized_header_refused_from_prefix_alone() {
        let mut buf = BytesMut::new();
        buf.put_u32(DEFAULT_MAX_HEADER + 1);
        buf.put_u32(0);
        let err = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::HeaderTooLarge { .. }), "{err}");
    }

    #[test]
    fn oversized_payload_refused_without_allocating() {
        let mut buf = BytesMut::new();
        buf.put_u32(10);
        buf.put_u32(u32::MAX);
        let cap_before = buf.capacity();
        let err = FrameDecoder::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::PayloadTooLarge { .. }), "{err}");
        assert_eq!(buf.capacity(), cap_before);
    }

    #[test]
    fn tls_bytes_detected() {
        let mut buf = BytesMut::from(&[0x16u8, 0x03, 0x01][..]);
        assert!(matches!(
            FrameDecoder::default().decode(&mut buf),
            Err(FrameError::UnexpectedTls)
        ));
    }

    #[test]
    fn truncated_stream_reported() {
        let raw = sample();
        let mut buf = BytesMut::new();
        encode_raw(&raw.header, &raw.payload, &mut buf);
        buf.truncate(buf.len() - 1);
        let mut d = FrameDecoder::default();
        assert!(d.decode(&mut buf).expect("no error").is_none());
        assert!(matches!(d.finish(&buf), Err(FrameError::Truncated { .. })));
    }

    #[test]
    fn empty_header_refused() {
        let mut buf = BytesMut::new();
        buf.put_u32(0);
        buf.put_u32(0);
        assert!(matches!(
            FrameDecoder::default().decode(&mut buf),
            Err(FrameError::EmptyHeader)
        ));
    }
}
