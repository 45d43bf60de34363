//! The public client: connection setup, export properties and commands.
//!
//! Each method validates its arguments against the export (size, minimum
//! block alignment, advertised features) before anything is sent, splits the
//! work into requests no larger than the server accepts, and hands them to
//! the pipelined transmission engine.

use std::path::Path;

use tokio::io::{AsyncRead, AsyncWrite, BufStream};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};

use crate::error::NbdError;
use crate::extent::{push_merged, Extent};
use crate::handshake::{negotiate, BlockSize, Negotiated};
use crate::proto::*;
use crate::transmission::{Conn, Op, Payload, StatusReply, Transport};

/// Options for [`NbdClient::write_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// `NBD_CMD_FLAG_FUA`: the server persists the data before replying.
    pub fua: bool,
}

/// Options for [`NbdClient::write_zeroes_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroOptions {
    /// `NBD_CMD_FLAG_FUA`: the server persists the zeroes before replying.
    pub fua: bool,
    /// `NBD_CMD_FLAG_NO_HOLE`: keep the range allocated. Off by default so
    /// the server may punch holes or write zero clusters, which is what an
    /// overlay wants.
    pub no_hole: bool,
}

/// An NBD client connection in the transmission phase.
///
/// Commands take `&mut self`; one batch of requests runs at a time, but a
/// batch (a large read or write, [`NbdClient::read_many`],
/// [`NbdClient::write_many`]) keeps several requests in flight.
///
/// Cancelling a command future mid-way leaves the stream out of sync; later
/// calls then fail with [`NbdError::ConnectionBroken`]. The same happens
/// after any I/O error or protocol violation ([`NbdError::is_fatal`]).
/// A command error ([`NbdError::Server`]) leaves the connection usable,
/// except that after [`crate::Errno::Eshutdown`] the spec asks the client to
/// [`NbdClient::disconnect`].
pub struct NbdClient {
    conn: Conn,
    info: Negotiated,
    /// Largest READ/WRITE payload we send: the server maximum capped at
    /// 32 MiB and rounded down to the minimum block size.
    max_payload: u32,
}

impl NbdClient {
    /// Connects over a Unix socket (how `qemu-nbd --socket` serves).
    pub async fn connect_unix(
        path: &Path,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<Self, NbdError> {
        let stream = UnixStream::connect(path).await?;
        Self::connect(stream, export, meta_contexts).await
    }

    /// Connects over TCP.
    pub async fn connect_tcp(
        addr: impl ToSocketAddrs,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<Self, NbdError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Self::connect(stream, export, meta_contexts).await
    }

    /// Runs the handshake on an established stream: structured replies, the
    /// given metadata contexts (each must be offered by the server, else
    /// [`NbdError::ContextNotAvailable`]) and `NBD_OPT_GO` on `export`.
    pub async fn connect<S>(
        stream: S,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<Self, NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut io = BufStream::new(Box::new(stream) as Box<dyn Transport>);
        let info = negotiate(&mut io, export, meta_contexts).await?;
        let block = info.block_size;
        let capped = block.maximum.min(DEFAULT_MAX_PAYLOAD);
        let max_payload = capped - capped % block.minimum;
        Ok(Self {
            conn: Conn::new(io),
            info,
            max_payload,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Raw transmission flags (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.info.transmission_flags
    }

    fn has_flag(&self, flag: u16) -> bool {
        self.info.transmission_flags & flag != 0
    }

    /// `NBD_FLAG_READ_ONLY`.
    pub fn read_only(&self) -> bool {
        self.has_flag(NBD_FLAG_READ_ONLY)
    }

    /// `NBD_FLAG_SEND_FLUSH`.
    pub fn can_flush(&self) -> bool {
        self.has_flag(NBD_FLAG_SEND_FLUSH)
    }

    /// `NBD_FLAG_SEND_FUA`.
    pub fn can_fua(&self) -> bool {
        self.has_flag(NBD_FLAG_SEND_FUA)
    }

    /// `NBD_FLAG_SEND_TRIM`.
    pub fn can_trim(&self) -> bool {
        self.has_flag(NBD_FLAG_SEND_TRIM)
    }

    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub fn can_write_zeroes(&self) -> bool {
        self.has_flag(NBD_FLAG_SEND_WRITE_ZEROES)
    }

    /// `NBD_FLAG_SEND_FAST_ZERO`.
    pub fn can_fast_zero(&self) -> bool {
        self.has_flag(NBD_FLAG_SEND_FAST_ZERO)
    }

    /// `NBD_FLAG_SEND_DF`.
    pub fn can_df(&self) -> bool {
        self.has_flag(NBD_FLAG_SEND_DF)
    }

    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub fn can_multi_conn(&self) -> bool {
        self.has_flag(NBD_FLAG_CAN_MULTI_CONN)
    }

    /// `NBD_FLAG_ROTATIONAL`.
    pub fn is_rotational(&self) -> bool {
        self.has_flag(NBD_FLAG_ROTATIONAL)
    }

    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.info.structured_replies
    }

    /// Size constraints advertised by the server (or the spec defaults).
    pub fn block_size(&self) -> BlockSize {
        self.info.block_size
    }

    /// Largest payload this client puts in one READ or WRITE request.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// The metadata contexts the server selected, as (name, id).
    pub fn meta_contexts(&self) -> &[(String, u32)] {
        &self.info.contexts
    }

    /// Reads `buf.len()` bytes at `offset`. Holes reported by the server are
    /// zero-filled.
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.read_many([(offset, buf)]).await
    }

    /// Reads several ranges with requests pipelined across all of them; use
    /// it for scattered extents. Each item is (offset, destination buffer).
    pub async fn read_many<'a, I>(&mut self, ranges: I) -> Result<(), NbdError>
    where
        I: IntoIterator<Item = (u64, &'a mut [u8])>,
    {
        let ranges: Vec<(u64, &'a mut [u8])> = ranges.into_iter().collect();
        for (offset, buf) in &ranges {
            self.check_range(*offset, buf.len() as u64)?;
        }
        let piece = self.max_payload as usize;
        let mut ops = Vec::new();
        for (offset, buf) in ranges {
            for (i, part) in buf.chunks_mut(piece).enumerate() {
                ops.push(Op {
                    command: NBD_CMD_READ,
                    flags: 0,
                    offset: offset + (i * piece) as u64,
                    length: part.len() as u32,
                    payload: Payload::Read(part),
                });
            }
        }
        self.conn.execute(ops).await
    }

    /// Writes `data` at `offset`.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.write_with(offset, data, WriteOptions::default()).await
    }

    /// Writes `data` at `offset` with options (FUA).
    pub async fn write_with(
        &mut self,
        offset: u64,
        data: &[u8],
        options: WriteOptions,
    ) -> Result<(), NbdError> {
        self.write_many([(offset, data)], options).await
    }

    /// Writes several ranges with requests pipelined across all of them.
    /// Each item is (offset, data).
    pub async fn write_many<'a, I>(
        &mut self,
        ranges: I,
        options: WriteOptions,
    ) -> Result<(), NbdError>
    where
        I: IntoIterator<Item = (u64, &'a [u8])>,
    {
        self.check_writable()?;
        let flags = self.fua_flag(options.fua)?;
        let ranges: Vec<(u64, &'a [u8])> = ranges.into_iter().collect();
        for (offset, data) in &ranges {
            self.check_range(*offset, data.len() as u64)?;
        }
        let piece = self.max_payload as usize;
        let mut ops = Vec::new();
        for (offset, data) in ranges {
            for (i, part) in data.chunks(piece).enumerate() {
                ops.push(Op {
                    command: NBD_CMD_WRITE,
                    flags,
                    offset: offset + (i * piece) as u64,
                    length: part.len() as u32,
                    payload: Payload::Write(part),
                });
            }
        }
        self.conn.execute(ops).await
    }

    /// Makes `[offset, offset + len)` read as zeroes, letting the server
    /// punch holes (see [`ZeroOptions::no_hole`]).
    pub async fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.write_zeroes_with(offset, len, ZeroOptions::default())
            .await
    }

    /// [`NbdClient::write_zeroes`] with options.
    pub async fn write_zeroes_with(
        &mut self,
        offset: u64,
        len: u64,
        options: ZeroOptions,
    ) -> Result<(), NbdError> {
        self.check_writable()?;
        if !self.can_write_zeroes() {
            return Err(NbdError::Unsupported("NBD_CMD_WRITE_ZEROES"));
        }
        let mut flags = self.fua_flag(options.fua)?;
        if options.no_hole {
            flags |= NBD_CMD_FLAG_NO_HOLE;
        }
        self.effect(NBD_CMD_WRITE_ZEROES, flags, offset, len).await
    }

    /// `NBD_CMD_TRIM`: tells the server the range is no longer needed; its
    /// contents are undefined afterwards.
    pub async fn trim(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.check_writable()?;
        if !self.can_trim() {
            return Err(NbdError::Unsupported("NBD_CMD_TRIM"));
        }
        self.effect(NBD_CMD_TRIM, 0, offset, len).await
    }

    /// `NBD_CMD_FLUSH`: every write already acknowledged reaches stable
    /// storage before this returns.
    pub async fn flush(&mut self) -> Result<(), NbdError> {
        if !self.can_flush() {
            return Err(NbdError::Unsupported("NBD_CMD_FLUSH"));
        }
        let op = Op {
            command: NBD_CMD_FLUSH,
            flags: 0,
            offset: 0,
            length: 0,
            payload: Payload::None,
        };
        self.conn.execute(vec![op]).await
    }

    /// Extents of `context` covering exactly `[offset, offset + len)`, in
    /// order, with adjacent extents of equal flags merged. Loops over
    /// `NBD_CMD_BLOCK_STATUS` as long as the server answers short.
    pub async fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        let context_id = self.context_id(context)?;
        self.check_range(offset, len)?;
        let known_ids: Vec<u32> = self.info.contexts.iter().map(|(_, id)| *id).collect();
        let end = offset + len;
        let mut extents = Vec::new();
        let mut cursor = offset;
        while cursor < end {
            let length = (end - cursor).min(u64::from(MAX_EFFECT_LEN)) as u32;
            let mut status = StatusReply::new(context_id, known_ids.clone());
            let op = Op {
                command: NBD_CMD_BLOCK_STATUS,
                flags: 0,
                offset: cursor,
                length,
                payload: Payload::Status(&mut status),
            };
            self.conn.execute(vec![op]).await?;
            // The reply has at least one descriptor and none of length 0,
            // so the cursor always advances.
            for (length, flags) in status.descriptors {
                let length = u64::from(length).min(end - cursor);
                if length == 0 {
                    break;
                }
                push_merged(&mut extents, Extent::new(cursor, length, flags));
                cursor += length;
            }
        }
        Ok(extents)
    }

    /// All extents of `context` over the whole export.
    pub async fn map(&mut self, context: &str) -> Result<Vec<Extent>, NbdError> {
        self.block_status(context, 0, self.size()).await
    }

    /// Ends the session with `NBD_CMD_DISC`.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        self.conn.disconnect().await
    }

    fn context_id(&self, context: &str) -> Result<u32, NbdError> {
        self.info
            .contexts
            .iter()
            .find(|(name, _)| name == context)
            .map(|(_, id)| *id)
            .ok_or_else(|| {
                NbdError::InvalidRequest(format!("metadata context {context:?} was not negotiated"))
            })
    }

    fn check_writable(&self) -> Result<(), NbdError> {
        if self.read_only() {
            return Err(NbdError::Unsupported("writes (export is read-only)"));
        }
        Ok(())
    }

    fn fua_flag(&self, fua: bool) -> Result<u16, NbdError> {
        match (fua, self.can_fua()) {
            (false, _) => Ok(0),
            (true, true) => Ok(NBD_CMD_FLAG_FUA),
            (true, false) => Err(NbdError::Unsupported("NBD_CMD_FLAG_FUA")),
        }
    }

    /// Runs a payload-free command over a range, split into pieces of at
    /// most [`MAX_EFFECT_LEN`] bytes.
    async fn effect(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), NbdError> {
        self.check_range(offset, len)?;
        let step = u64::from(MAX_EFFECT_LEN);
        let mut ops = Vec::new();
        let mut start = offset;
        while start < offset + len {
            let length = (offset + len - start).min(step);
            ops.push(Op {
                command,
                flags,
                offset: start,
                length: length as u32,
                payload: Payload::None,
            });
            start += length;
        }
        self.conn.execute(ops).await
    }

    /// The range must lie inside the export and be aligned to the minimum
    /// block size (an unaligned tail ending at the export size is allowed).
    fn check_range(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        let size = self.size();
        let end = offset.checked_add(len).filter(|&end| end <= size);
        let Some(end) = end else {
            return Err(NbdError::InvalidRequest(format!(
                "range {offset}+{len} exceeds the export size {size}"
            )));
        };
        let minimum = u64::from(self.info.block_size.minimum);
        if offset % minimum != 0 || (len % minimum != 0 && end != size) {
            return Err(NbdError::InvalidRequest(format!(
                "range {offset}+{len} is not aligned to the minimum block size {minimum}"
            )));
        }
        Ok(())
    }
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("size", &self.info.size)
            .field("transmission_flags", &self.info.transmission_flags)
            .field("block_size", &self.info.block_size)
            .field("contexts", &self.info.contexts)
            .finish_non_exhaustive()
    }
}
