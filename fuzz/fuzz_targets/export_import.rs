//! An exported initial copy as the replica imports it (`ferry replication import`): the
//! `export.json` manifest, then the data file's frames, read as `import_initial` reads
//! them (the file followed by the closing CycleEnd frame it appends). Input: two bytes of
//! manifest length (LE), the manifest, then the data file.
#![no_main]

use ferry_fuzz::replication::proto::{ExportManifest, Msg};
use ferry_fuzz::{block_on, drain_frames};
use ferry_wire::{FrameReader, FrameWriter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mlen = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (manifest, file) = data[2..].split_at(mlen);
    let cycle = match serde_json::from_slice::<ExportManifest>(manifest) {
        Ok(m) => {
            let json = serde_json::to_vec(&m).expect("manifest serializes");
            let back: ExportManifest = serde_json::from_slice(&json).expect("and parses");
            assert_eq!(back, m);
            m.cycle
        }
        Err(_) => 1,
    };
    block_on(async {
        let mut end = FrameWriter::new(Vec::new());
        end.write_control(&Msg::CycleEnd {
            cycle,
            batches: None,
            bytes: None,
        })
        .await
        .expect("encode CycleEnd");
        let stream = tokio::io::AsyncReadExt::chain(file, std::io::Cursor::new(end.into_inner()));
        drain_frames(FrameReader::new(stream)).await;
    });
});
