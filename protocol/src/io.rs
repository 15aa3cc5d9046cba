//! Thin async adapter over tokio streams (feature `tokio`): reads whole frames and
//! writes encoded ones. All protocol logic stays in the sans-IO modules.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{self, Frame, FrameDecoder, FrameError, Limits, RawFrame};

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The transport failed.
    #[error("connection failed")]
    Io(#[from] std::io::Error),
    /// The bytes were not a valid frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads frames off an async byte stream, batching whatever one read delivers.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    decoder: FrameDecoder,
}

/// Size of one read from the socket.
const READ_CHUNK: usize = 256 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader enforcing `limits`.
    pub fn new(inner: R, limits: Limits) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
            decoder: FrameDecoder::new(limits),
        }
    }

    /// Waits for at least one whole frame and appends every whole frame already
    /// received (at most `max`) to `out`. Returns `false` at a clean end of stream
    /// (no partial frame pending) with nothing appended.
    pub async fn read_batch(
        &mut self,
        out: &mut Vec<RawFrame>,
        max: usize,
    ) -> Result<bool, IoError> {
        let start = out.len();
        loop {
            while out.len() - start < max {
                match self.decoder.decode(&mut self.buf)? {
                    Some(f) => out.push(f),
                    None => break,
                }
            }
            if out.len() > start {
                return Ok(true);
            }
            self.buf.reserve(READ_CHUNK);
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                self.decoder.finish(&self.buf)?;
                return Ok(false);
            }
        }
    }

    /// Reads one frame; `None` at a clean end of stream.
    pub async fn read_frame(&mut self) -> Result<Option<RawFrame>, IoError> {
        let mut v = Vec::with_capacity(1);
        if self.read_batch(&mut v, 1).await? {
            Ok(v.pop())
        } else {
            Ok(None)
        }
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// Encodes and writes one frame (not flushed).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), IoError> {
    let raw = frame.to_raw();
    write_raw(w, &raw).await
}

/// Payloads at least this large are written from their own buffer after the prefix and
/// header, rather than copied next to them first.
const COPY_PAYLOAD_BELOW: usize = 64 * 1024;

/// Writes one already-encoded frame (not flushed).
pub async fn write_raw<W: AsyncWrite + Unpin>(w: &mut W, raw: &RawFrame) -> Result<(), IoError> {
    if raw.payload.len() >= COPY_PAYLOAD_BELOW {
        let mut head = BytesMut::new();
        codec::encode_head(&raw.header, raw.payload.len(), &mut head);
        w.write_all(&head).await?;
        w.write_all(&raw.payload).await?;
        return Ok(());
    }
    let mut buf = BytesMut::with_capacity(raw.wire_len());
    codec::encode_raw(&raw.header, &raw.payload, &mut buf);
    w.write_all(&buf).await?;
    Ok(())
}
