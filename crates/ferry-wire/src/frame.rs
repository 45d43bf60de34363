//! Frame layout, encoding, and the async [`FrameReader`] / [`FrameWriter`].

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Result, WireError};
use crate::rate::RateLimiter;

/// The four magic bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"FRY1";
/// The wire protocol version this build writes and accepts.
pub const WIRE_VERSION: u8 = 1;
/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 24;
/// Default maximum for both the on-wire payload and the uncompressed payload
/// length of a frame (8 MiB).
pub const MAX_FRAME: usize = 8 * 1024 * 1024;
/// Flag bit: the payload is one or more zstd frames.
pub const FLAG_ZSTD: u8 = 0b0000_0001;
/// zstd level used by default: level 1 is the fastest real compression and
/// on two cores replication throughput matters more than the last few percent.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Suggested interval between keepalives on an otherwise idle connection.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// Suggested idle timeout for a reader: four missed keepalives.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Chunk size used for rate-limited writes and for read-ahead.
const IO_CHUNK: usize = 64 * 1024;

/// What a frame carries. The numeric values are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A JSON-encoded application control message (hello, cycle start/end,
    /// acks, errors ...). See [`encode_control`] / [`decode_control`].
    Control = 1,
    /// A binary [`crate::ExtentBatch`].
    ExtentBatch = 2,
    /// A keepalive carrying an 8-byte sender-chosen value
    /// ([`encode_keepalive`]).
    Keepalive = 3,
}

impl FrameKind {
    /// All kinds, for tests and exhaustive handling.
    pub const ALL: [FrameKind; 3] = [
        FrameKind::Control,
        FrameKind::ExtentBatch,
        FrameKind::Keepalive,
    ];

    /// Parse the on-wire kind byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(FrameKind::Control),
            2 => Some(FrameKind::ExtentBatch),
            3 => Some(FrameKind::Keepalive),
            _ => None,
        }
    }
}

/// A decoded, verified frame: checksums matched and the payload is
/// uncompressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(kind: FrameKind, payload: impl Into<Bytes>) -> Self {
        Frame {
            kind,
            payload: payload.into(),
        }
    }

    /// Decode this frame as a JSON control message.
    pub fn control<T: DeserializeOwned>(&self) -> Result<T> {
        decode_control(self)
    }

    /// Decode this frame as an extent batch (zero-copy for data extents).
    pub fn batch(&self) -> Result<crate::ExtentBatch> {
        self.expect_kind(FrameKind::ExtentBatch)?;
        crate::ExtentBatch::decode(self.payload.clone())
    }

    /// Decode this frame as a keepalive and return its value.
    pub fn keepalive(&self) -> Result<u64> {
        decode_keepalive(self)
    }

    fn expect_kind(&self, expected: FrameKind) -> Result<()> {
        if self.kind == expected {
            Ok(())
        } else {
            Err(WireError::UnexpectedKind {
                expected,
                got: self.kind,
            })
        }
    }
}

/// Encode a control message as JSON. Control messages are application
/// defined; this crate only frames them.
pub fn encode_control<T: Serialize + ?Sized>(msg: &T) -> Result<Bytes> {
    serde_json::to_vec(msg)
        .map(Bytes::from)
        .map_err(WireError::BadControl)
}

/// Decode a [`FrameKind::Control`] frame into `T`.
pub fn decode_control<T: DeserializeOwned>(frame: &Frame) -> Result<T> {
    frame.expect_kind(FrameKind::Control)?;
    serde_json::from_slice(&frame.payload).map_err(WireError::BadControl)
}

/// Keepalive payload: 8 bytes little-endian, a value chosen by the sender
/// (a counter or a timestamp, so a peer can echo it to measure RTT).
pub fn encode_keepalive(value: u64) -> Bytes {
    Bytes::copy_from_slice(&value.to_le_bytes())
}

/// Decode a [`FrameKind::Keepalive`] frame.
pub fn decode_keepalive(frame: &Frame) -> Result<u64> {
    frame.expect_kind(FrameKind::Keepalive)?;
    let arr: [u8; 8] = frame.payload[..]
        .try_into()
        .map_err(|_| WireError::BadKeepalive {
            len: frame.payload.len(),
        })?;
    Ok(u64::from_le_bytes(arr))
}

/// Parsed and validated fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: FrameKind,
    pub flags: u8,
    pub payload_len: u32,
    pub raw_len: u32,
    pub payload_crc: u32,
}

impl Header {
    pub(crate) fn compressed(&self) -> bool {
        self.flags & FLAG_ZSTD != 0
    }

    /// Serialise a header. `kind`/`flags` are raw bytes so tests can forge
    /// invalid headers with valid checksums.
    pub(crate) fn encode_raw(
        kind: u8,
        flags: u8,
        reserved: u8,
        payload_len: u32,
        raw_len: u32,
        payload_crc: u32,
    ) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4] = WIRE_VERSION;
        h[5] = kind;
        h[6] = flags;
        h[7] = reserved;
        h[8..12].copy_from_slice(&payload_len.to_le_bytes());
        h[12..16].copy_from_slice(&raw_len.to_le_bytes());
        h[16..20].copy_from_slice(&payload_crc.to_le_bytes());
        let hcrc = crc32c::crc32c(&h[0..20]);
        h[20..24].copy_from_slice(&hcrc.to_le_bytes());
        h
    }

    /// Parse and validate a header. Performs no allocation, so every length
    /// is checked against `max` before anyone allocates for it.
    ///
    /// Order: magic, version (a future version may lay the rest out
    /// differently, so it is reported as such rather than as a checksum
    /// error), header CRC (so no corrupted field is ever interpreted), then
    /// field validity and limits.
    pub(crate) fn parse(h: &[u8], max: usize) -> Result<Header> {
        debug_assert!(h.len() >= HEADER_LEN);
        let magic: [u8; 4] = h[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(WireError::BadMagic { got: magic });
        }
        if h[4] != WIRE_VERSION {
            return Err(WireError::UnsupportedVersion { got: h[4] });
        }
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let expected = u32_at(20);
        let got = crc32c::crc32c(&h[0..20]);
        if expected != got {
            return Err(WireError::HeaderChecksum { expected, got });
        }
        let kind = FrameKind::from_u8(h[5])
            .ok_or_else(|| WireError::BadHeader(format!("unknown frame kind {}", h[5])))?;
        let flags = h[6];
        if flags & !FLAG_ZSTD != 0 {
            return Err(WireError::BadHeader(format!(
                "unknown flag bits {flags:#04x}"
            )));
        }
        if h[7] != 0 {
            return Err(WireError::BadHeader(format!(
                "reserved byte is {:#04x}, must be 0",
                h[7]
            )));
        }
        let payload_len = u32_at(8);
        let raw_len = u32_at(12);
        for len in [payload_len, raw_len] {
            if len as u64 > max as u64 {
                return Err(WireError::TooLarge {
                    len: len as u64,
                    max: max as u64,
                });
            }
        }
        if flags & FLAG_ZSTD == 0 && payload_len != raw_len {
            return Err(WireError::BadHeader(format!(
                "uncompressed frame with payload length {payload_len} != raw length {raw_len}"
            )));
        }
        Ok(Header {
            kind,
            flags,
            payload_len,
            raw_len,
            payload_crc: u32_at(16),
        })
    }
}

/// A frame already encoded to its exact on-wire bytes (header + payload).
///
/// Produced by [`FrameEncoder`] / [`encode_frame`] or read verbatim (and
/// checksum-verified) from a spool by [`crate::SpoolReader::next_encoded`], so
/// it can be forwarded without recompressing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame {
    bytes: Bytes,
    kind: FrameKind,
    raw_len: u32,
    compressed: bool,
}

impl EncodedFrame {
    /// The exact bytes to put on the wire.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }
    /// On-wire length including the header.
    pub fn wire_len(&self) -> usize {
        self.bytes.len()
    }
    /// Uncompressed payload length.
    pub fn raw_len(&self) -> usize {
        self.raw_len as usize
    }
    pub fn kind(&self) -> FrameKind {
        self.kind
    }
    pub fn is_compressed(&self) -> bool {
        self.compressed
    }
}

/// Reusable frame encoder (keeps its zstd context). It is `Send`, so large
/// batches can be encoded inside `spawn_blocking` and written with
/// [`FrameWriter::write_encoded`], keeping compression off the async
/// executor.
pub struct FrameEncoder {
    level: i32,
    max_frame: usize,
    compressor: Option<zstd::bulk::Compressor<'static>>,
}

impl std::fmt::Debug for FrameEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameEncoder")
            .field("level", &self.level)
            .field("max_frame", &self.max_frame)
            .finish()
    }
}

impl Default for FrameEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameEncoder {
    pub fn new() -> Self {
        FrameEncoder {
            level: DEFAULT_ZSTD_LEVEL,
            max_frame: MAX_FRAME,
            compressor: None,
        }
    }

    /// Set the zstd level (clamped to 1..=19).
    pub fn with_level(mut self, level: i32) -> Self {
        self.level = level.clamp(1, 19);
        self.compressor = None;
        self
    }

    /// Refuse payloads larger than `max` (must match the reader's limit).
    pub fn with_max_frame(mut self, max: usize) -> Self {
        self.max_frame = max.min(u32::MAX as usize);
        self
    }

    /// Encode one frame. With `compress`, the payload is zstd-compressed and
    /// the compressed form is kept only if it is strictly smaller.
    pub fn encode(
        &mut self,
        kind: FrameKind,
        payload: &[u8],
        compress: bool,
    ) -> Result<EncodedFrame> {
        if payload.len() > self.max_frame {
            return Err(WireError::TooLarge {
                len: payload.len() as u64,
                max: self.max_frame as u64,
            });
        }
        let raw_len = payload.len() as u32;
        if compress && payload.len() > 32 {
            if let Some(frame) = self.try_compress(kind, payload, raw_len)? {
                return Ok(frame);
            }
        }
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(&Header::encode_raw(
            kind as u8,
            0,
            0,
            raw_len,
            raw_len,
            crc32c::crc32c(payload),
        ));
        buf.extend_from_slice(payload);
        Ok(EncodedFrame {
            bytes: buf.into(),
            kind,
            raw_len,
            compressed: false,
        })
    }

    /// Encode an extent batch as one frame, as `encode(ExtentBatch, &batch.encode()?, ..)`
    /// would, but uncompressed with a single copy of its data: the batch is written straight
    /// after the frame header's place (for the bulk of a cycle, which is random data that
    /// does not compress, this saves a copy of every byte).
    pub fn encode_batch(
        &mut self,
        batch: &crate::ExtentBatch,
        compress: bool,
    ) -> Result<EncodedFrame> {
        if compress {
            return self.encode(FrameKind::ExtentBatch, &batch.encode()?, true);
        }
        let len = batch.encoded_len();
        if len > self.max_frame {
            return Err(WireError::TooLarge {
                len: len as u64,
                max: self.max_frame as u64,
            });
        }
        let mut buf = Vec::with_capacity(HEADER_LEN + len);
        buf.resize(HEADER_LEN, 0);
        batch.encode_into(&mut buf)?;
        let raw_len = (buf.len() - HEADER_LEN) as u32;
        let crc = crc32c::crc32c(&buf[HEADER_LEN..]);
        buf[..HEADER_LEN].copy_from_slice(&Header::encode_raw(
            FrameKind::ExtentBatch as u8,
            0,
            0,
            raw_len,
            raw_len,
            crc,
        ));
        Ok(EncodedFrame {
            bytes: buf.into(),
            kind: FrameKind::ExtentBatch,
            raw_len,
            compressed: false,
        })
    }

    fn try_compress(
        &mut self,
        kind: FrameKind,
        payload: &[u8],
        raw_len: u32,
    ) -> Result<Option<EncodedFrame>> {
        if self.compressor.is_none() {
            self.compressor = Some(zstd::bulk::Compressor::new(self.level)?);
        }
        let compressor = self.compressor.as_mut().expect("set above");
        // Room for strictly less than the raw payload: if zstd can't fit, it
        // fails with "destination too small" and we send the data raw.
        let mut cursor = std::io::Cursor::new(Vec::with_capacity(HEADER_LEN + payload.len() - 1));
        cursor.get_mut().resize(HEADER_LEN, 0);
        cursor.set_position(HEADER_LEN as u64);
        match compressor.compress_to_buffer(payload, &mut cursor) {
            Ok(n) if n < payload.len() => {
                let mut buf = cursor.into_inner();
                debug_assert_eq!(buf.len(), HEADER_LEN + n);
                let crc = crc32c::crc32c(&buf[HEADER_LEN..]);
                buf[..HEADER_LEN].copy_from_slice(&Header::encode_raw(
                    kind as u8, FLAG_ZSTD, 0, n as u32, raw_len, crc,
                ));
                Ok(Some(EncodedFrame {
                    bytes: buf.into(),
                    kind,
                    raw_len,
                    compressed: true,
                }))
            }
            Ok(_) => Ok(None),
            Err(e) => {
                tracing::trace!("zstd did not shrink payload ({e}); sending uncompressed");
                Ok(None)
            }
        }
    }
}

/// One-shot convenience around [`FrameEncoder::encode`] with default settings.
pub fn encode_frame(kind: FrameKind, payload: &[u8], compress: bool) -> Result<EncodedFrame> {
    FrameEncoder::new().encode(kind, payload, compress)
}

/// Byte and frame counters of a reader or writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Frames read or written.
    pub frames: u64,
    /// Bytes on the wire, headers included.
    pub wire_bytes: u64,
    /// Uncompressed payload bytes.
    pub raw_bytes: u64,
}

impl FrameStats {
    fn add(&mut self, wire: usize, raw: usize) {
        self.frames += 1;
        self.wire_bytes += wire as u64;
        self.raw_bytes += raw as u64;
    }
}

/// Writes frames to an async byte stream.
///
/// Each `write_*` call writes one whole frame and flushes it (frames are
/// large, and keepalives must actually leave). Writing is **not**
/// cancel-safe: if a write future is dropped half-way, the stream is
/// desynchronised and must be closed.
pub struct FrameWriter<W> {
    inner: W,
    encoder: FrameEncoder,
    limiters: Vec<Arc<RateLimiter>>,
    stats: FrameStats,
}

impl<W> std::fmt::Debug for FrameWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameWriter")
            .field("encoder", &self.encoder)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self::with_encoder(inner, FrameEncoder::new())
    }

    pub fn with_encoder(inner: W, encoder: FrameEncoder) -> Self {
        FrameWriter {
            inner,
            encoder,
            limiters: Vec::new(),
            stats: FrameStats::default(),
        }
    }

    /// Apply a bandwidth limit to this writer's on-wire bytes. May be called
    /// several times (e.g. one limiter per relationship and one per host); a
    /// write waits for all of them.
    pub fn add_limiter(&mut self, limiter: Arc<RateLimiter>) {
        self.limiters.push(limiter);
    }

    /// Encode and write one frame.
    pub async fn write_frame(
        &mut self,
        kind: FrameKind,
        payload: &[u8],
        compress: bool,
    ) -> Result<()> {
        let frame = self.encoder.encode(kind, payload, compress)?;
        self.write_encoded(&frame).await
    }

    /// Write a JSON control message (never compressed: they are small).
    pub async fn write_control<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<()> {
        let payload = encode_control(msg)?;
        self.write_frame(FrameKind::Control, &payload, false).await
    }

    /// Encode and write an extent batch.
    pub async fn write_batch(&mut self, batch: &crate::ExtentBatch, compress: bool) -> Result<()> {
        let payload = batch.encode()?;
        self.write_frame(FrameKind::ExtentBatch, &payload, compress)
            .await
    }

    /// Write a keepalive carrying `value`.
    pub async fn write_keepalive(&mut self, value: u64) -> Result<()> {
        self.write_frame(FrameKind::Keepalive, &encode_keepalive(value), false)
            .await
    }

    /// Write an already-encoded frame verbatim (rate-limited), then flush.
    pub async fn write_encoded(&mut self, frame: &EncodedFrame) -> Result<()> {
        let bytes = frame.as_bytes();
        if self.limiters.is_empty() {
            self.inner.write_all(bytes).await?;
        } else {
            for chunk in bytes.chunks(IO_CHUNK) {
                RateLimiter::acquire_all(&self.limiters, chunk.len() as u64).await;
                self.inner.write_all(chunk).await?;
            }
        }
        self.inner.flush().await?;
        self.stats.add(frame.wire_len(), frame.raw_len());
        Ok(())
    }

    /// Flush the underlying stream.
    pub async fn flush(&mut self) -> Result<()> {
        self.inner.flush().await?;
        Ok(())
    }

    /// Flush and shut down the write side (sends TLS close_notify on a TLS
    /// stream, so the peer sees a clean EOF at a frame boundary).
    pub async fn shutdown(&mut self) -> Result<()> {
        self.inner.shutdown().await?;
        Ok(())
    }

    pub fn stats(&self) -> FrameStats {
        self.stats
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// A checksum-verified frame still in its on-wire form.
struct RawFrame {
    header: Header,
    bytes: Bytes,
}

/// Reads frames from an async byte stream.
///
/// [`read_frame`](Self::read_frame) is **cancel-safe**: partially received
/// bytes stay in the reader's buffer, so it can sit in a `tokio::select!`
/// next to a keepalive timer or be wrapped in `tokio::time::timeout` without
/// desynchronising the stream. After it returns an error the reader is
/// poisoned ([`WireError::Poisoned`]): the position in the stream is unknown.
pub struct FrameReader<R> {
    inner: R,
    pub(crate) buf: BytesMut,
    max_frame: usize,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    poisoned: bool,
    stats: FrameStats,
}

impl<R> std::fmt::Debug for FrameReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader")
            .field("buffered", &self.buf.len())
            .field("max_frame", &self.max_frame)
            .field("poisoned", &self.poisoned)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::new(),
            max_frame: MAX_FRAME,
            decompressor: None,
            poisoned: false,
            stats: FrameStats::default(),
        }
    }

    /// Reject frames whose on-wire or uncompressed payload exceeds `max`.
    pub fn with_max_frame(mut self, max: usize) -> Self {
        self.set_max_frame(max);
        self
    }

    /// Changes the frame limit from the next frame on (a session that caps its greeting
    /// tightly, then accepts full-size frames from a peer it authorized).
    pub fn set_max_frame(&mut self, max: usize) {
        self.max_frame = max.min(u32::MAX as usize);
    }

    /// Read the next frame, verified and decompressed.
    ///
    /// `Ok(None)` means a clean end of stream exactly at a frame boundary;
    /// an end of stream inside a frame is [`WireError::Truncated`].
    pub async fn read_frame(&mut self) -> Result<Option<Frame>> {
        let Some(raw) = self.read_raw().await? else {
            return Ok(None);
        };
        match self.decode_raw(raw) {
            Ok(f) => Ok(Some(f)),
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// Like [`read_frame`](Self::read_frame) but fails with
    /// [`WireError::IdleTimeout`] if no complete frame arrives within `idle`.
    /// Because reading is cancel-safe, bytes of a partially received frame
    /// are kept and the reader stays usable; whether the peer is dead is the
    /// caller's decision (normally: yes, close the connection).
    pub async fn read_frame_timeout(&mut self, idle: Duration) -> Result<Option<Frame>> {
        match tokio::time::timeout(idle, self.read_frame()).await {
            Ok(r) => r,
            Err(_) => Err(WireError::IdleTimeout {
                secs: idle.as_secs_f64(),
            }),
        }
    }

    /// Read the next frame with header and payload checksums verified, but
    /// keep it in its on-wire form (not decompressed) for verbatim
    /// forwarding.
    pub async fn read_encoded(&mut self) -> Result<Option<EncodedFrame>> {
        Ok(self.read_raw().await?.map(|raw| EncodedFrame {
            kind: raw.header.kind,
            raw_len: raw.header.raw_len,
            compressed: raw.header.compressed(),
            bytes: raw.bytes,
        }))
    }

    pub fn stats(&self) -> FrameStats {
        self.stats
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    async fn read_raw(&mut self) -> Result<Option<RawFrame>> {
        if self.poisoned {
            return Err(WireError::Poisoned);
        }
        let r = self.read_raw_inner().await;
        match &r {
            Ok(Some(raw)) => self.stats.add(raw.bytes.len(), raw.header.raw_len as usize),
            Ok(None) => {}
            Err(_) => self.poisoned = true,
        }
        r
    }

    /// Cancel-safe: the only await point is `read_buf`, which either adds
    /// bytes to `self.buf` or doesn't; all parsing is synchronous.
    async fn read_raw_inner(&mut self) -> Result<Option<RawFrame>> {
        loop {
            let need = if self.buf.len() >= HEADER_LEN {
                let header = Header::parse(&self.buf[..HEADER_LEN], self.max_frame)?;
                let total = HEADER_LEN + header.payload_len as usize;
                if self.buf.len() >= total {
                    let bytes = self.buf.split_to(total).freeze();
                    let got = crc32c::crc32c(&bytes[HEADER_LEN..]);
                    if got != header.payload_crc {
                        return Err(WireError::Checksum {
                            expected: header.payload_crc,
                            got,
                        });
                    }
                    return Ok(Some(RawFrame { header, bytes }));
                }
                total
            } else {
                HEADER_LEN
            };
            // `need` is bounded by HEADER_LEN + max_frame (checked above), so
            // this never reserves more than one maximal frame plus read-ahead.
            let missing = need - self.buf.len();
            if self.buf.capacity() - self.buf.len() < missing {
                self.buf.reserve(missing.max(IO_CHUNK));
            }
            let n = match self.inner.read_buf(&mut self.buf).await {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !self.buf.is_empty() => {
                    return Err(WireError::Truncated)
                }
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(WireError::Truncated)
                };
            }
        }
    }

    fn decode_raw(&mut self, raw: RawFrame) -> Result<Frame> {
        let payload = raw.bytes.slice(HEADER_LEN..);
        if !raw.header.compressed() {
            return Ok(Frame {
                kind: raw.header.kind,
                payload,
            });
        }
        let want = raw.header.raw_len as usize;
        if self.decompressor.is_none() {
            self.decompressor = Some(zstd::bulk::Decompressor::new()?);
        }
        let d = self.decompressor.as_mut().expect("set above");
        // Bounded: the output buffer has capacity `want` (<= max_frame) and
        // zstd fails rather than grow it.
        let out = d
            .decompress(&payload, want)
            .map_err(|e| WireError::Decompress(format!("{e} (declared raw length {want})")))?;
        if out.len() != want {
            return Err(WireError::Decompress(format!(
                "decompressed to {} bytes, header declared {want}",
                out.len()
            )));
        }
        Ok(Frame {
            kind: raw.header.kind,
            payload: out.into(),
        })
    }
}
