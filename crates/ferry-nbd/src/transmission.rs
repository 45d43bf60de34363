//! Transmission phase: sending requests and validating replies.
//!
//! [`Conn::execute`] runs a batch of requests with up to [`MAX_IN_FLIGHT`]
//! requests and [`MAX_BYTES_IN_FLIGHT`] payload bytes outstanding at once,
//! matching replies to requests by cookie. The
//! pipelining matters for reads of many scattered dirty extents, where one
//! round trip per extent would dominate. Replies may arrive out of order and
//! structured chunks of different requests may interleave, so every piece of
//! per-request state lives in an [`InFlight`] entry.
//!
//! Everything the server sends is checked before it is trusted: magic,
//! cookie, chunk type against the command, chunk length against the request
//! (so a hostile length never makes us allocate or read past a buffer), read
//! chunks for bounds and overlap, block status descriptors for zero lengths
//! and overreach. A violation poisons the connection ([`NbdError::ConnectionBroken`]
//! afterwards) because the byte stream can no longer be parsed reliably. A
//! command error from the server, in contrast, leaves the stream in sync: the
//! remaining replies are drained and the first error is returned.

use std::collections::BTreeMap;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};

use crate::error::{Errno, NbdError, ProtocolError};
use crate::proto::*;

/// Most requests outstanding at once in one [`Conn::execute`] batch.
pub(crate) const MAX_IN_FLIGHT: usize = 16;

/// Most READ/WRITE payload bytes outstanding at once (a single larger
/// request is still allowed), bounding the server's buffering for us.
pub(crate) const MAX_BYTES_IN_FLIGHT: u64 = 64 << 20;

/// Longest error chunk payload we accept: error, message length, the
/// longest legal message and room for an offset or future fixed fields.
const MAX_ERROR_CHUNK: u32 = 6 + MAX_STRING as u32 + 64;

/// Any byte stream an NBD session can run over.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

pub(crate) type Io = BufStream<Box<dyn Transport>>;

/// What a request carries and where its reply goes.
pub(crate) enum Payload<'a> {
    /// No data either way (FLUSH, WRITE_ZEROES, TRIM).
    None,
    /// Data sent with the request (WRITE).
    Write(&'a [u8]),
    /// Buffer the reply data lands in (READ); its length is the request length.
    Read(&'a mut [u8]),
    /// Collector for a BLOCK_STATUS reply.
    Status(&'a mut StatusReply),
}

/// One transmission request.
pub(crate) struct Op<'a> {
    pub command: u16,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
    pub payload: Payload<'a>,
}

/// The descriptors of one metadata context from a BLOCK_STATUS reply.
pub(crate) struct StatusReply {
    /// The context id whose descriptors are kept.
    pub context_id: u32,
    /// All context ids selected at negotiation; chunks for others are errors.
    pub known_ids: Vec<u32>,
    /// (length, flags) pairs, consecutive from the request offset.
    pub descriptors: Vec<(u32, u32)>,
    seen_ids: Vec<u32>,
}

impl StatusReply {
    pub fn new(context_id: u32, known_ids: Vec<u32>) -> Self {
        Self {
            context_id,
            known_ids,
            descriptors: Vec::new(),
            seen_ids: Vec::new(),
        }
    }
}

/// A request that was sent and whose reply is not complete yet.
struct InFlight<'a> {
    cookie: u64,
    op: Op<'a>,
    /// A structured chunk arrived for this request.
    got_chunk: bool,
    /// First error the server reported for this request.
    error: Option<NbdError>,
    /// Parts of a READ already filled in.
    coverage: Coverage,
}

impl<'a> InFlight<'a> {
    fn new(cookie: u64, op: Op<'a>) -> Self {
        Self {
            cookie,
            op,
            got_chunk: false,
            error: None,
            coverage: Coverage::default(),
        }
    }

    fn record_error(&mut self, errno: Errno, offset: Option<u64>, message: String) {
        if self.error.is_none() {
            self.error = Some(NbdError::Server {
                command: command_name(self.op.command),
                errno,
                offset,
                message,
            });
        }
    }

    /// Final checks once the last reply chunk arrived. `Ok(Some(_))` is the
    /// server's error for this request; `Err(_)` is a protocol violation.
    fn finish(self) -> Result<Option<NbdError>, NbdError> {
        if self.error.is_some() {
            return Ok(self.error);
        }
        match &self.op.payload {
            Payload::Read(_) if self.coverage.total != u64::from(self.op.length) => {
                Err(ProtocolError::IncompleteRead {
                    covered: self.coverage.total,
                    requested: u64::from(self.op.length),
                }
                .into())
            }
            Payload::Status(status) if !status.seen_ids.contains(&status.context_id) => {
                Err(ProtocolError::MissingContextChunk(status.context_id).into())
            }
            _ => Ok(None),
        }
    }
}

/// Non-overlapping ranges of a READ that replies already filled, relative to
/// the request offset.
#[derive(Default)]
struct Coverage {
    ranges: BTreeMap<u64, u64>,
    total: u64,
}

impl Coverage {
    /// Records `[start, start + len)`; false if empty, beyond `limit` or
    /// overlapping an earlier range.
    fn insert(&mut self, start: u64, len: u64, limit: u64) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        if len == 0 || end > limit {
            return false;
        }
        let overlaps_before = self
            .ranges
            .range(..=start)
            .next_back()
            .is_some_and(|(_, &prev_end)| prev_end > start);
        let overlaps_after = self
            .ranges
            .range(start..)
            .next()
            .is_some_and(|(&next_start, _)| next_start < end);
        if overlaps_before || overlaps_after {
            return false;
        }
        self.ranges.insert(start, end);
        self.total += len;
        true
    }
}

/// The transmission-phase connection.
pub(crate) struct Conn {
    io: Io,
    next_cookie: u64,
    /// Set while a batch runs; still set afterwards if the batch ended in a
    /// fatal error or its future was dropped mid-way.
    broken: bool,
}

impl Conn {
    pub fn new(io: Io) -> Self {
        Self {
            io,
            next_cookie: 1,
            broken: false,
        }
    }

    /// Sends `ops` (within the in-flight limits) and processes
    /// all replies. After the first server error no further ops are sent,
    /// the outstanding replies are drained and that error is returned.
    pub async fn execute(&mut self, ops: Vec<Op<'_>>) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::ConnectionBroken);
        }
        self.broken = true;
        let result = self.pipeline(ops).await;
        if !matches!(&result, Err(err) if err.is_fatal()) {
            self.broken = false;
        }
        result
    }

    async fn pipeline<'a>(&mut self, ops: Vec<Op<'a>>) -> Result<(), NbdError> {
        let mut ops = ops.into_iter().peekable();
        let mut inflight: Vec<InFlight<'a>> = Vec::new();
        let mut bytes_in_flight = 0u64;
        let mut first_error = None;
        loop {
            let mut sent = false;
            while first_error.is_none() && inflight.len() < MAX_IN_FLIGHT {
                let fits = |op: &Op<'_>| {
                    inflight.is_empty() || bytes_in_flight + data_bytes(op) <= MAX_BYTES_IN_FLIGHT
                };
                let Some(op) = ops.next_if(fits) else { break };
                bytes_in_flight += data_bytes(&op);
                let cookie = self.send(&op).await?;
                inflight.push(InFlight::new(cookie, op));
                sent = true;
            }
            if sent {
                self.io.flush().await?;
            }
            if inflight.is_empty() {
                // Either all ops are done or an error stopped sending.
                return first_error.map_or(Ok(()), Err);
            }
            if let Some(index) = self.receive(&mut inflight).await? {
                let done = inflight.swap_remove(index);
                bytes_in_flight -= data_bytes(&done.op);
                if let Some(err) = done.finish()? {
                    first_error.get_or_insert(err);
                }
            }
        }
    }

    /// Writes one request (not flushed) and returns its cookie.
    async fn send(&mut self, op: &Op<'_>) -> Result<u64, NbdError> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let header = encode_request(op.flags, op.command, cookie, op.offset, op.length);
        self.io.write_all(&header).await?;
        if let Payload::Write(data) = op.payload {
            self.io.write_all(data).await?;
        }
        Ok(cookie)
    }

    /// Sends `NBD_CMD_DISC` and closes our side of the stream.
    pub async fn disconnect(&mut self) -> Result<(), NbdError> {
        if self.broken {
            return Err(NbdError::ConnectionBroken);
        }
        self.broken = true;
        let header = encode_request(0, NBD_CMD_DISC, self.next_cookie, 0, 0);
        self.io.write_all(&header).await?;
        self.io.flush().await?;
        self.io.shutdown().await?;
        Ok(())
    }

    /// Reads one reply message (a simple reply or one structured chunk) and
    /// applies it. Returns the index of the request it completed, if any.
    async fn receive(&mut self, inflight: &mut [InFlight<'_>]) -> Result<Option<usize>, NbdError> {
        let magic = self.io.read_u32().await?;
        match magic {
            NBD_SIMPLE_REPLY_MAGIC => {
                let error = self.io.read_u32().await?;
                let cookie = self.io.read_u64().await?;
                let index = find(inflight, cookie)?;
                self.simple_reply(&mut inflight[index], error).await?;
                Ok(Some(index))
            }
            NBD_STRUCTURED_REPLY_MAGIC => {
                let flags = self.io.read_u16().await?;
                let chunk_type = self.io.read_u16().await?;
                let cookie = self.io.read_u64().await?;
                let length = self.io.read_u32().await?;
                let index = find(inflight, cookie)?;
                let done = flags & NBD_REPLY_FLAG_DONE != 0;
                self.chunk(&mut inflight[index], chunk_type, length, done)
                    .await?;
                Ok(done.then_some(index))
            }
            got => Err(ProtocolError::BadMagic {
                expected: "reply magic",
                got: u64::from(got),
            }
            .into()),
        }
    }

    async fn simple_reply(
        &mut self,
        request: &mut InFlight<'_>,
        error: u32,
    ) -> Result<(), NbdError> {
        if request.got_chunk {
            return Err(ProtocolError::SimpleAfterStructured.into());
        }
        if error != 0 {
            request.record_error(Errno::from_wire(error), None, String::new());
            return Ok(());
        }
        match &mut request.op.payload {
            Payload::Read(buf) => {
                self.io.read_exact(buf).await?;
                request.coverage.total = buf.len() as u64;
                Ok(())
            }
            // A successful block status must come as structured chunks.
            Payload::Status(_) => Err(ProtocolError::SimpleReplyForBlockStatus.into()),
            Payload::None | Payload::Write(_) => Ok(()),
        }
    }

    async fn chunk(
        &mut self,
        request: &mut InFlight<'_>,
        chunk_type: u16,
        length: u32,
        done: bool,
    ) -> Result<(), NbdError> {
        request.got_chunk = true;
        let bad_length = ProtocolError::BadChunkLength { chunk_type, length };
        match chunk_type {
            NBD_REPLY_TYPE_NONE if length != 0 => Err(bad_length.into()),
            NBD_REPLY_TYPE_NONE if !done => Err(ProtocolError::NoneWithoutDone.into()),
            NBD_REPLY_TYPE_NONE => Ok(()),
            NBD_REPLY_TYPE_OFFSET_DATA => self.offset_data(request, length).await,
            NBD_REPLY_TYPE_OFFSET_HOLE => self.offset_hole(request, length).await,
            NBD_REPLY_TYPE_BLOCK_STATUS => self.block_status(request, length).await,
            t if t & NBD_REPLY_TYPE_FLAG_ERROR != 0 => self.error_chunk(request, t, length).await,
            other => Err(ProtocolError::UnexpectedChunkType(other).into()),
        }
    }

    /// `NBD_REPLY_TYPE_OFFSET_DATA`: 64-bit offset, then data.
    async fn offset_data(
        &mut self,
        request: &mut InFlight<'_>,
        length: u32,
    ) -> Result<(), NbdError> {
        let Payload::Read(buf) = &mut request.op.payload else {
            return Err(ProtocolError::UnexpectedChunkType(NBD_REPLY_TYPE_OFFSET_DATA).into());
        };
        if length < 9 {
            return Err(ProtocolError::BadChunkLength {
                chunk_type: NBD_REPLY_TYPE_OFFSET_DATA,
                length,
            }
            .into());
        }
        let offset = self.io.read_u64().await?;
        let data_len = u64::from(length - 8);
        let start = claim(
            &mut request.coverage,
            request.op.offset,
            offset,
            data_len,
            buf.len(),
        )?;
        self.io
            .read_exact(&mut buf[start..start + data_len as usize])
            .await?;
        Ok(())
    }

    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: 64-bit offset, 32-bit hole size.
    async fn offset_hole(
        &mut self,
        request: &mut InFlight<'_>,
        length: u32,
    ) -> Result<(), NbdError> {
        let Payload::Read(buf) = &mut request.op.payload else {
            return Err(ProtocolError::UnexpectedChunkType(NBD_REPLY_TYPE_OFFSET_HOLE).into());
        };
        if length != 12 {
            return Err(ProtocolError::BadChunkLength {
                chunk_type: NBD_REPLY_TYPE_OFFSET_HOLE,
                length,
            }
            .into());
        }
        let offset = self.io.read_u64().await?;
        let hole_len = u64::from(self.io.read_u32().await?);
        let start = claim(
            &mut request.coverage,
            request.op.offset,
            offset,
            hole_len,
            buf.len(),
        )?;
        buf[start..start + hole_len as usize].fill(0);
        Ok(())
    }

    /// `NBD_REPLY_TYPE_BLOCK_STATUS`: context id, then (length, flags) pairs.
    async fn block_status(
        &mut self,
        request: &mut InFlight<'_>,
        length: u32,
    ) -> Result<(), NbdError> {
        let request_len = request.op.length;
        let Payload::Status(status) = &mut request.op.payload else {
            return Err(ProtocolError::UnexpectedChunkType(NBD_REPLY_TYPE_BLOCK_STATUS).into());
        };
        let count = (length as usize).saturating_sub(4) / 8;
        if length < 12 || (length - 4) % 8 != 0 || count > MAX_DESCRIPTORS {
            return Err(ProtocolError::BadChunkLength {
                chunk_type: NBD_REPLY_TYPE_BLOCK_STATUS,
                length,
            }
            .into());
        }
        let mut payload = vec![0u8; length as usize];
        self.io.read_exact(&mut payload).await?;
        let context_id = be32(&payload, 0);
        if !status.known_ids.contains(&context_id) {
            return Err(ProtocolError::UnknownContextId(context_id).into());
        }
        if status.seen_ids.contains(&context_id) {
            return Err(ProtocolError::DuplicateContextId(context_id).into());
        }
        status.seen_ids.push(context_id);
        let descriptors = parse_descriptors(&payload[4..], request_len)?;
        if context_id == status.context_id {
            status.descriptors = descriptors;
        }
        Ok(())
    }

    /// Any chunk type with bit 15 set: error, message length, message and,
    /// for `NBD_REPLY_TYPE_ERROR_OFFSET`, a 64-bit offset.
    async fn error_chunk(
        &mut self,
        request: &mut InFlight<'_>,
        chunk_type: u16,
        length: u32,
    ) -> Result<(), NbdError> {
        let bad_length = ProtocolError::BadChunkLength { chunk_type, length };
        if !(6..=MAX_ERROR_CHUNK).contains(&length) {
            return Err(bad_length.into());
        }
        let mut payload = vec![0u8; length as usize];
        self.io.read_exact(&mut payload).await?;
        let error = be32(&payload, 0);
        if error == 0 {
            return Err(ProtocolError::ZeroErrorValue.into());
        }
        let message_len = usize::from(be16(&payload, 4));
        let rest = &payload[6..];
        if message_len > rest.len() {
            return Err(bad_length.into());
        }
        let message = String::from_utf8_lossy(&rest[..message_len]).into_owned();
        let offset = if chunk_type == NBD_REPLY_TYPE_ERROR_OFFSET {
            if rest.len() != message_len + 8 {
                return Err(bad_length.into());
            }
            let offset = be64(rest, message_len);
            let start = request.op.offset;
            if offset < start || offset - start >= u64::from(request.op.length) {
                return Err(ProtocolError::ErrorOffsetOutOfBounds(offset).into());
            }
            Some(offset)
        } else {
            None
        };
        request.record_error(Errno::from_wire(error), offset, message);
        Ok(())
    }
}

/// Payload bytes an op moves in either direction.
fn data_bytes(op: &Op<'_>) -> u64 {
    match op.payload {
        Payload::Read(_) | Payload::Write(_) => u64::from(op.length),
        Payload::None | Payload::Status(_) => 0,
    }
}

fn find(inflight: &[InFlight<'_>], cookie: u64) -> Result<usize, NbdError> {
    inflight
        .iter()
        .position(|request| request.cookie == cookie)
        .ok_or_else(|| ProtocolError::UnexpectedCookie(cookie).into())
}

/// Checks that a content chunk at absolute `offset` of `len` bytes lies
/// inside the request starting at `request_offset` of `buf_len` bytes and
/// overlaps nothing earlier; returns its start within the buffer.
fn claim(
    coverage: &mut Coverage,
    request_offset: u64,
    offset: u64,
    len: u64,
    buf_len: usize,
) -> Result<usize, NbdError> {
    let out_of_bounds = ProtocolError::ReadChunkOutOfBounds {
        offset,
        length: len,
    };
    let Some(start) = offset.checked_sub(request_offset) else {
        return Err(out_of_bounds.into());
    };
    if !coverage.insert(start, len, buf_len as u64) {
        return Err(out_of_bounds.into());
    }
    Ok(start as usize)
}

/// Parses block status descriptors. Every length must be nonzero, and all
/// but the last must end before `request_len` (the last may reach past it).
fn parse_descriptors(raw: &[u8], request_len: u32) -> Result<Vec<(u32, u32)>, ProtocolError> {
    let mut descriptors = Vec::with_capacity(raw.len() / 8);
    let mut sum = 0u64;
    for pair in raw.chunks_exact(8) {
        let length = be32(pair, 0);
        let flags = be32(pair, 4);
        if length == 0 {
            return Err(ProtocolError::ZeroLengthExtent);
        }
        if sum >= u64::from(request_len) {
            return Err(ProtocolError::ExtentBeyondRequest);
        }
        sum += u64::from(length);
        descriptors.push((length, flags));
    }
    Ok(descriptors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_rejects_overlap_and_overreach() {
        let mut c = Coverage::default();
        assert!(c.insert(100, 50, 1000));
        assert!(!c.insert(120, 10, 1000)); // inside
        assert!(!c.insert(90, 20, 1000)); // overlaps start
        assert!(!c.insert(149, 5, 1000)); // overlaps end
        assert!(!c.insert(0, 0, 1000)); // empty
        assert!(!c.insert(990, 20, 1000)); // beyond
        assert!(!c.insert(u64::MAX, 2, u64::MAX)); // wraps
        assert!(c.insert(150, 850, 1000));
        assert!(c.insert(0, 100, 1000));
        assert_eq!(c.total, 1000);
    }

    fn raw(descriptors: &[(u32, u32)]) -> Vec<u8> {
        descriptors
            .iter()
            .flat_map(|(l, f)| l.to_be_bytes().into_iter().chain(f.to_be_bytes()))
            .collect()
    }

    #[test]
    fn descriptors_follow_the_spec() {
        assert_eq!(
            parse_descriptors(&raw(&[(10, 1), (100, 0)]), 50).unwrap(),
            vec![(10, 1), (100, 0)]
        );
        assert_eq!(
            parse_descriptors(&raw(&[(10, 1), (0, 0)]), 50),
            Err(ProtocolError::ZeroLengthExtent)
        );
        assert_eq!(
            parse_descriptors(&raw(&[(50, 1), (10, 0)]), 50),
            Err(ProtocolError::ExtentBeyondRequest)
        );
    }
}
