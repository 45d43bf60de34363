//! The API's request bodies as ferryd parses them (serde_json into the ferry-api-types
//! request types, `deny_unknown_fields`; bodies are capped at 1 MiB by the server), plus
//! the pure parsers the handlers apply to their fields (durations, sizes). The first
//! byte picks the endpoint. A body that parses must round-trip unchanged.
#![no_main]

use ferry_api_types::*;
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

fn roundtrip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(
    body: &[u8],
) -> Option<T> {
    let v: T = serde_json::from_slice(body).ok()?;
    let json = serde_json::to_vec(&v).expect("serializes");
    let back: T = serde_json::from_slice(&json).expect("parses back");
    assert_eq!(back, v);
    Some(v)
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 10 {
        0 => {
            roundtrip::<VmCreateRequest>(body);
        }
        1 => {
            roundtrip::<ShutdownRequest>(body);
        }
        2 => {
            roundtrip::<ReplicaServerSetRequest>(body);
        }
        3 => {
            if let Some(r) = roundtrip::<EnableReplicationRequest>(body) {
                let _ = ferry_domain::replication::parse_duration(&r.interval);
                if let Some(s) = &r.point_spacing {
                    let _ = ferry_domain::replication::parse_duration(s);
                }
                if let Some(s) = &r.app_consistent_every {
                    let _ = ferry_domain::replication::parse_duration(s);
                }
            }
        }
        4 => {
            roundtrip::<ImportRequest>(body);
        }
        5 => {
            roundtrip::<CheckpointCreateRequest>(body);
        }
        6 => {
            roundtrip::<CheckpointApplyRequest>(body);
        }
        7 => {
            roundtrip::<CheckpointRenameRequest>(body);
        }
        8 => {
            roundtrip::<CheckpointExportRequest>(body);
        }
        _ => {
            roundtrip::<VmImportRequest>(body);
            // Sizes as users type them (`--size 10G`).
            if let Ok(s) = std::str::from_utf8(body) {
                let _ = ferry_domain::size::parse_size(s);
            }
        }
    }
});
