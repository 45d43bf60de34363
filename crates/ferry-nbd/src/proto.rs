//! Wire constants and fixed-size message layouts of the NBD protocol.
//!
//! Names follow `doc/proto.md` of the NBD project so the code can be read
//! side by side with the specification. Everything is big-endian on the wire.
//! Only the pieces of the protocol this client speaks are listed; the
//! experimental extended headers (64-bit lengths) are deliberately absent.

// ---- Handshake ----------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, newstyle negotiation magic (also prefixes each client option).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// `cliserv_magic` of the oldstyle negotiation, which we refuse.
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic prefixing each option reply of fixed newstyle negotiation.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: server supports fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: server can skip the 124 zero bytes.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: client does not want the 124 zero bytes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit set in every option error reply type.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;

pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---- Transmission flags (sent with the export size) ---------------------

pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Transmission --------------------------------------------------------

pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;

pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit set in every error chunk type.
pub const NBD_REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
#[allow(dead_code)] // handled as "any error chunk" via the flag bit
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_FLAG_ERROR | 2;

// ---- Limits ----------------------------------------------------------------

/// Longest string (export name, context name, error message) the spec allows.
pub const MAX_STRING: usize = 4096;
/// Largest minimum block size a server may advertise.
pub const MAX_MINIMUM_BLOCK: u32 = 1 << 16;
/// Default and upper cap of the payload per READ/WRITE request (32 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 1 << 25;
/// Largest effect length we put in one payload-free request (WRITE_ZEROES,
/// TRIM, BLOCK_STATUS). It is a multiple of every legal minimum block size.
pub const MAX_EFFECT_LEN: u32 = u32::MAX - (MAX_MINIMUM_BLOCK - 1);
/// Servers SHOULD NOT send more block status descriptors in one chunk.
pub const MAX_DESCRIPTORS: usize = 1 << 20;
/// Bound on option reply payloads during the handshake: a context id or info
/// type plus the longest legal string, with headroom.
pub const MAX_OPTION_REPLY: u32 = 2 * MAX_STRING as u32;

/// Size of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;

/// Encodes a transmission request header (`NBD_REQUEST_MAGIC` layout).
pub fn encode_request(
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
) -> [u8; REQUEST_HEADER_LEN] {
    let mut header = [0u8; REQUEST_HEADER_LEN];
    header[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    header[4..6].copy_from_slice(&flags.to_be_bytes());
    header[6..8].copy_from_slice(&command.to_be_bytes());
    header[8..16].copy_from_slice(&cookie.to_be_bytes());
    header[16..24].copy_from_slice(&offset.to_be_bytes());
    header[24..28].copy_from_slice(&length.to_be_bytes());
    header
}

/// Encodes an option request header (`IHAVEOPT`, option, data length).
pub fn encode_option_header(option: u32, data_len: u32) -> [u8; 16] {
    let mut header = [0u8; 16];
    header[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    header[8..12].copy_from_slice(&option.to_be_bytes());
    header[12..16].copy_from_slice(&data_len.to_be_bytes());
    header
}

/// Human-readable name of a command, for error messages.
pub fn command_name(command: u16) -> &'static str {
    match command {
        NBD_CMD_READ => "NBD_CMD_READ",
        NBD_CMD_WRITE => "NBD_CMD_WRITE",
        NBD_CMD_DISC => "NBD_CMD_DISC",
        NBD_CMD_FLUSH => "NBD_CMD_FLUSH",
        NBD_CMD_TRIM => "NBD_CMD_TRIM",
        NBD_CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        NBD_CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "NBD_CMD_?",
    }
}

/// Human-readable name of an option, for error messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "NBD_OPT_?",
    }
}

/// Reads a big-endian u16 at `at` (caller guarantees the bounds).
pub fn be16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

/// Reads a big-endian u32 at `at` (caller guarantees the bounds).
pub fn be32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_be_bytes(b)
}

/// Reads a big-endian u64 at `at` (caller guarantees the bounds).
pub fn be64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_layout_matches_spec() {
        let h = encode_request(NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, 0x0102, 0x1000, 512);
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(be16(&h, 4), 1);
        assert_eq!(be16(&h, 6), 1);
        assert_eq!(be64(&h, 8), 0x0102);
        assert_eq!(be64(&h, 16), 0x1000);
        assert_eq!(be32(&h, 24), 512);
    }

    #[test]
    fn magics_spell_their_ascii_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn effect_limit_is_aligned_to_every_legal_minimum_block() {
        assert_eq!(MAX_EFFECT_LEN % MAX_MINIMUM_BLOCK, 0);
    }
}
