//! The extent-batch decoder on its own (a frame payload that passed its CRC): counts,
//! tags, lengths, overflow, overlap and trailing bytes. What decodes must re-encode to
//! exactly the same bytes, and every extent must lie inside `u64` without overlap.
#![no_main]

use ferry_fuzz::check_batch_roundtrip;
use ferry_wire::ExtentBatch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = ExtentBatch::decode(bytes::Bytes::copy_from_slice(data)) {
        for e in &batch.extents {
            assert!(!e.is_empty());
            assert!(e.end().is_some());
        }
        check_batch_roundtrip(data, &batch);
    }
});
