//! The wire frame decoder as the replica runs it on a connection: header parsing (magic,
//! version, header CRC, fields, limits), payload CRC, zstd decompression into exactly the
//! declared length, then batch / keepalive / control decoding of each frame. The first
//! input byte sets how many bytes each socket read delivers (frames arrive in pieces) and
//! whether a tight greeting limit is in force; the rest is the byte stream.
#![no_main]

use ferry_fuzz::{block_on, drain_frames, Trickle};
use ferry_wire::{FrameReader, MAX_FRAME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let chunk = match ctl & 0x7f {
        0 => usize::MAX,
        n => n as usize,
    };
    // Bit 7: the pre-authorization greeting limit (64 KiB) instead of the full frame limit.
    let max = if ctl & 0x80 != 0 { 64 << 10 } else { MAX_FRAME };
    block_on(async {
        let reader = FrameReader::new(Trickle::new(stream, chunk)).with_max_frame(max);
        drain_frames(reader).await;
        // The verbatim-forwarding path (spool → wire) verifies without decompressing.
        let mut raw = FrameReader::new(Trickle::new(stream, chunk)).with_max_frame(max);
        while let Ok(Some(f)) = raw.read_encoded().await {
            assert!(f.wire_len() >= ferry_wire::HEADER_LEN);
            assert!(f.raw_len() <= max);
        }
    });
});
