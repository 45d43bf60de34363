//! The spool reader on a damaged or hostile spool file: opening at a frame index (which
//! skips frames by their headers alone), then reading frames verified and decompressed, or
//! verbatim for forwarding. Input: two bytes of start index (LE), then the file.
//! Opening at index k must yield exactly the frames a reader from 0 yields after k.
#![no_main]

use ferry_fuzz::{block_on, scratch_file};
use ferry_wire::SpoolReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let start = u16::from_le_bytes([data[0], data[1]]) as u64 % 64;
    let path = scratch_file("spool");
    std::fs::write(&path, &data[2..]).expect("write scratch spool");
    block_on(async {
        let mut all = Vec::new();
        let mut full_end_ok = false;
        if let Ok(mut r) = SpoolReader::open(&path).await {
            loop {
                match r.next_frame().await {
                    Ok(Some(f)) => all.push(f),
                    Ok(None) => {
                        full_end_ok = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            assert_eq!(r.index(), all.len() as u64);
        }
        match SpoolReader::open_at(&path, start).await {
            Ok(mut r) => {
                assert_eq!(r.index(), start);
                let mut i = start as usize;
                while let Ok(Some(f)) = r.next_encoded().await {
                    // Frames the full read verified must be the same frames here.
                    if let Some(whole) = all.get(i) {
                        assert_eq!(f.kind(), whole.kind);
                        assert_eq!(f.raw_len(), whole.payload.len());
                    }
                    i += 1;
                }
            }
            Err(_) => {
                // Opening at an index within a spool that reads cleanly to its end
                // must succeed.
                assert!(
                    !(full_end_ok && start <= all.len() as u64),
                    "open_at({start}) failed on a clean spool of {} frames",
                    all.len()
                );
            }
        }
    });
});
