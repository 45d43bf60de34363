//! The replication control messages as the replica parses them (`Msg`, JSON in Control
//! frames, compiled from ferryd's own `replication/proto.rs`), and the pure part of what it
//! does with a greeting: the spec, settings and boot-file checks of `check_hello`, the
//! localization of boot paths, and hex payloads. Parsed messages must round-trip.
#![no_main]

use ferry_fuzz::replication::{check_msg, proto::Msg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = serde_json::from_slice::<Msg>(data) {
        check_msg(&msg);
    }
});
