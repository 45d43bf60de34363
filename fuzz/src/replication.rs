//! The replica's message types and greeting checks, compiled from ferryd's own sources.

#[path = "../../crates/ferry-daemon/src/replication/proto.rs"]
#[allow(dead_code, clippy::all)] // linted where it lives, in ferryd
pub mod proto;

#[path = "../../crates/ferry-daemon/src/replication/boot_files.rs"]
#[allow(dead_code, unused_imports, clippy::all)]
pub mod boot_files;

use proto::Msg;

/// What the replica does with a parsed message before acting on it, where that is pure:
/// a `Hello` goes through the greeting's checks (the spec's and the settings' own
/// validation and the announced boot files, as `replica.rs` `check_hello`), hex payloads
/// are decoded, and every message must survive a JSON round trip unchanged.
pub fn check_msg(msg: &Msg) {
    match msg {
        Msg::Hello {
            spec,
            settings,
            boot_files,
            disks,
            ..
        } => {
            let mut checked = spec.clone();
            for (i, d) in checked.disks.iter_mut().enumerate() {
                d.file = format!("disk{i}.qcow2");
            }
            let spec_ok = checked.validate().is_ok();
            let _ = settings.validate(spec.disks.len());
            let _ = boot_files::check_announced(spec, boot_files);
            if spec_ok {
                // A valid spec localized to this host's storage points only inside it.
                let dir = std::path::Path::new("/replica/storage/vm");
                let local = boot_files::localize(spec, dir);
                if let ferry_domain::Boot::Kernel { kernel, initrd, .. } = &local.boot {
                    assert!(std::path::Path::new(kernel).starts_with(dir), "{kernel}");
                    if let Some(i) = initrd {
                        assert!(std::path::Path::new(i).starts_with(dir), "{i}");
                    }
                }
            }
            let _ = disks.iter().map(|d| d.size_bytes).max();
        }
        Msg::BootFile { data, .. } => {
            if let Some(bytes) = proto::from_hex(data) {
                assert_eq!(proto::to_hex(&bytes), data.to_ascii_lowercase());
            }
        }
        Msg::Hashes { hashes, .. } => {
            let _ = proto::from_hex(hashes);
        }
        _ => {}
    }
    let json = serde_json::to_vec(msg).expect("a message serializes");
    let back: Msg = serde_json::from_slice(&json).expect("a serialized message parses");
    assert_eq!(&back, msg);
}
