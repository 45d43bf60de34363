//! Fixed-newstyle negotiation: from the server greeting to transmission.
//!
//! The client always asks for structured replies (so reads can skip holes
//! and errors carry messages), selects the requested metadata contexts,
//! and enters transmission with `NBD_OPT_GO` while requesting
//! `NBD_INFO_BLOCK_SIZE`, which commits us to honour the server's size
//! constraints. Oldstyle servers and the `NBD_OPT_EXPORT_NAME` fallback are
//! not supported: every server we target (QEMU, nbdkit, nbd-server) speaks
//! `NBD_OPT_GO`.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{NbdError, OptionError, ProtocolError};
use crate::proto::*;

/// Size constraints of an export (see "Size constraints" in the spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Offsets and lengths of requests must be multiples of this.
    pub minimum: u32,
    /// Requests aligned to this avoid read-modify-write on the server.
    pub preferred: u32,
    /// Largest READ/WRITE payload the server accepts.
    pub maximum: u32,
}

impl Default for BlockSize {
    /// The defaults the spec prescribes when the server advertises nothing.
    fn default() -> Self {
        Self {
            minimum: 1,
            preferred: 4096,
            maximum: DEFAULT_MAX_PAYLOAD,
        }
    }
}

/// What the handshake established.
#[derive(Debug, Clone)]
pub(crate) struct Negotiated {
    pub size: u64,
    pub transmission_flags: u16,
    pub block_size: BlockSize,
    pub structured_replies: bool,
    /// Selected metadata contexts: (name, id).
    pub contexts: Vec<(String, u32)>,
}

/// Runs the whole handshake. On a refused or malformed option the session is
/// ended with `NBD_OPT_ABORT` (best effort) before the error is returned.
pub(crate) async fn negotiate<S>(
    io: &mut S,
    export: &str,
    contexts: &[&str],
) -> Result<Negotiated, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    check_string("export name", export)?;
    for context in contexts {
        check_string("metadata context", context)?;
    }
    greet(io).await?;
    match haggle(io, export, contexts).await {
        Ok(negotiated) => Ok(negotiated),
        Err(err) => {
            if !matches!(err, NbdError::Io(_)) {
                // Soft disconnect; the server may close without replying,
                // so we neither wait for nor check its answer.
                let _ = send_option(io, NBD_OPT_ABORT, &[]).await;
            }
            Err(err)
        }
    }
}

fn check_string(what: &str, value: &str) -> Result<(), NbdError> {
    if value.len() > MAX_STRING || value.contains('\0') {
        return Err(NbdError::InvalidRequest(format!(
            "{what} {value:?} is longer than {MAX_STRING} bytes or contains NUL"
        )));
    }
    Ok(())
}

/// Reads `NBDMAGIC`, `IHAVEOPT` and the handshake flags; answers with the
/// client flags.
async fn greet<S>(io: &mut S) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let magic = io.read_u64().await?;
    if magic != NBDMAGIC {
        return Err(ProtocolError::BadMagic {
            expected: "NBDMAGIC",
            got: magic,
        }
        .into());
    }
    match io.read_u64().await? {
        IHAVEOPT => {}
        CLISERV_MAGIC => return Err(ProtocolError::Oldstyle.into()),
        got => {
            return Err(ProtocolError::BadMagic {
                expected: "IHAVEOPT",
                got,
            }
            .into())
        }
    }
    let handshake_flags = io.read_u16().await?;
    if handshake_flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtocolError::NotFixedNewstyle.into());
    }
    let mut client_flags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if handshake_flags & NBD_FLAG_NO_ZEROES != 0 {
        client_flags |= NBD_FLAG_C_NO_ZEROES;
    }
    io.write_u32(client_flags).await?;
    io.flush().await?;
    Ok(())
}

async fn haggle<S>(io: &mut S, export: &str, contexts: &[&str]) -> Result<Negotiated, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let structured_replies = opt_structured_reply(io).await?;
    let mut selected = Vec::new();
    if !contexts.is_empty() {
        if !structured_replies {
            return Err(NbdError::Unsupported(
                "NBD_OPT_STRUCTURED_REPLY (needed for metadata contexts)",
            ));
        }
        selected = opt_set_meta_context(io, export, contexts).await?;
        for wanted in contexts {
            if !selected.iter().any(|(name, _)| name == wanted) {
                return Err(NbdError::ContextNotAvailable(wanted.to_string()));
            }
        }
    }
    let (size, transmission_flags, block_size) = opt_go(io, export).await?;
    Ok(Negotiated {
        size,
        transmission_flags,
        block_size,
        structured_replies,
        contexts: selected,
    })
}

/// `NBD_OPT_STRUCTURED_REPLY`; `Ok(false)` if the server does not know it.
async fn opt_structured_reply<S>(io: &mut S) -> Result<bool, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(io, NBD_OPT_STRUCTURED_REPLY, &[]).await?;
    let reply = read_option_reply(io, NBD_OPT_STRUCTURED_REPLY).await?;
    match reply.reply_type {
        NBD_REP_ACK => Ok(true),
        NBD_REP_ERR_UNSUP => Ok(false),
        _ => Err(reply.into_error(NBD_OPT_STRUCTURED_REPLY)),
    }
}

/// `NBD_OPT_SET_META_CONTEXT`; returns every (name, id) the server selected.
async fn opt_set_meta_context<S>(
    io: &mut S,
    export: &str,
    queries: &[&str],
) -> Result<Vec<(String, u32)>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut data = Vec::new();
    push_string(&mut data, export);
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        push_string(&mut data, query);
    }
    send_option(io, NBD_OPT_SET_META_CONTEXT, &data).await?;
    let mut selected = Vec::new();
    loop {
        let reply = read_option_reply(io, NBD_OPT_SET_META_CONTEXT).await?;
        match reply.reply_type {
            NBD_REP_META_CONTEXT => selected.push(parse_meta_context(&reply)?),
            NBD_REP_ACK => return Ok(selected),
            _ => return Err(reply.into_error(NBD_OPT_SET_META_CONTEXT)),
        }
    }
}

fn parse_meta_context(reply: &OptionReply) -> Result<(String, u32), NbdError> {
    let data = &reply.data;
    if data.len() < 5 || data.len() > 4 + MAX_STRING {
        return Err(reply.malformed());
    }
    let id = be32(data, 0);
    let name = std::str::from_utf8(&data[4..]).map_err(|_| ProtocolError::BadString)?;
    Ok((name.to_owned(), id))
}

/// `NBD_OPT_GO` with an `NBD_INFO_BLOCK_SIZE` request.
async fn opt_go<S>(io: &mut S, export: &str) -> Result<(u64, u16, BlockSize), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut data = Vec::new();
    push_string(&mut data, export);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    send_option(io, NBD_OPT_GO, &data).await?;

    let mut export_info = None;
    let mut block_size = BlockSize::default();
    loop {
        let reply = read_option_reply(io, NBD_OPT_GO).await?;
        match reply.reply_type {
            NBD_REP_INFO => match parse_info(&reply)? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize(sizes) => block_size = sizes,
                Info::Other => {}
            },
            NBD_REP_ACK => {
                let (size, flags) = export_info.ok_or(ProtocolError::MissingExportInfo)?;
                if flags & NBD_FLAG_HAS_FLAGS == 0 {
                    return Err(ProtocolError::BadTransmissionFlags(flags).into());
                }
                return Ok((size, flags, block_size));
            }
            _ => return Err(reply.into_error(NBD_OPT_GO)),
        }
    }
}

enum Info {
    Export { size: u64, flags: u16 },
    BlockSize(BlockSize),
    Other,
}

fn parse_info(reply: &OptionReply) -> Result<Info, NbdError> {
    let data = &reply.data;
    if data.len() < 2 {
        return Err(reply.malformed());
    }
    match be16(data, 0) {
        NBD_INFO_EXPORT if data.len() == 12 => Ok(Info::Export {
            size: be64(data, 2),
            flags: be16(data, 10),
        }),
        NBD_INFO_BLOCK_SIZE if data.len() == 14 => {
            let sizes = BlockSize {
                minimum: be32(data, 2),
                preferred: be32(data, 6),
                maximum: be32(data, 10),
            };
            validate_block_size(sizes)?;
            Ok(Info::BlockSize(sizes))
        }
        NBD_INFO_EXPORT | NBD_INFO_BLOCK_SIZE => Err(reply.malformed()),
        _ => Ok(Info::Other),
    }
}

/// The constraints the spec puts on advertised block sizes.
fn validate_block_size(sizes: BlockSize) -> Result<(), ProtocolError> {
    let BlockSize {
        minimum,
        preferred,
        maximum,
    } = sizes;
    let ok = minimum.is_power_of_two()
        && minimum <= MAX_MINIMUM_BLOCK
        && preferred.is_power_of_two()
        && preferred >= minimum
        && maximum >= preferred;
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::BadBlockSize {
            minimum,
            preferred,
            maximum,
        })
    }
}

fn push_string(data: &mut Vec<u8>, value: &str) {
    data.extend_from_slice(&(value.len() as u32).to_be_bytes());
    data.extend_from_slice(value.as_bytes());
}

async fn send_option<S>(io: &mut S, option: u32, data: &[u8]) -> Result<(), NbdError>
where
    S: AsyncWrite + Unpin,
{
    io.write_all(&encode_option_header(option, data.len() as u32))
        .await?;
    io.write_all(data).await?;
    io.flush().await?;
    Ok(())
}

struct OptionReply {
    reply_type: u32,
    data: Vec<u8>,
}

impl OptionReply {
    fn malformed(&self) -> NbdError {
        ProtocolError::BadOptionReply {
            reply_type: self.reply_type,
            length: self.data.len() as u32,
        }
        .into()
    }

    /// Turns an error reply into [`NbdError::OptionRefused`]; any other
    /// reply type is unexpected at this point.
    fn into_error(self, option: u32) -> NbdError {
        if self.reply_type & NBD_REP_FLAG_ERROR == 0 {
            return ProtocolError::UnexpectedOptionReply(self.reply_type).into();
        }
        NbdError::OptionRefused {
            option: option_name(option),
            reply: OptionError(self.reply_type),
            message: String::from_utf8_lossy(&self.data).into_owned(),
        }
    }
}

async fn read_option_reply<S>(io: &mut S, option: u32) -> Result<OptionReply, NbdError>
where
    S: AsyncRead + Unpin,
{
    let magic = io.read_u64().await?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtocolError::BadMagic {
            expected: "option reply magic",
            got: magic,
        }
        .into());
    }
    let got = io.read_u32().await?;
    if got != option {
        return Err(ProtocolError::OptionMismatch {
            expected: option,
            got,
        }
        .into());
    }
    let reply_type = io.read_u32().await?;
    let length = io.read_u32().await?;
    if length > MAX_OPTION_REPLY {
        return Err(ProtocolError::BadOptionReply { reply_type, length }.into());
    }
    let mut data = vec![0u8; length as usize];
    io.read_exact(&mut data).await?;
    Ok(OptionReply { reply_type, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_rules() {
        assert!(validate_block_size(BlockSize::default()).is_ok());
        let bad = [
            (3, 4096, 1 << 25),          // minimum not a power of two
            (1 << 17, 1 << 17, 1 << 25), // minimum above 64 KiB
            (512, 256, 1 << 25),         // preferred below minimum
            (512, 4096, 1024),           // maximum below preferred
        ];
        for (minimum, preferred, maximum) in bad {
            let sizes = BlockSize {
                minimum,
                preferred,
                maximum,
            };
            assert!(validate_block_size(sizes).is_err(), "{sizes:?}");
        }
    }
}
