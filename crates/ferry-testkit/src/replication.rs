//! Helpers the replication and failover tests share: polling, the replication CLI's JSON,
//! recovery points' images, and byte-for-byte comparison of qcow2 chains.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::host::Host;

/// Polls `pred` every 250 ms; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A free TCP port on `ip`, as text (tests run in parallel: never the default 7444).
pub fn free_port(ip: &str) -> String {
    let l = std::net::TcpListener::bind((ip, 0)).expect("bind a free port");
    l.local_addr().expect("local addr").port().to_string()
}

/// Makes `host` (listening on `ip`) a replica server accepting any primary whose
/// certificate the test organization's CA issued, and letting primaries start VMs at a
/// planned failover; returns the storage directory.
pub fn enable_replica_server(host: &Host, ip: &str) -> PathBuf {
    enable_replica_server_at(host, &free_port(ip))
}

/// [`enable_replica_server`] on a chosen `port` (a test that puts a cuttable link in front
/// of it needs to know the port); the storage directory is `replicas` in the host's dir.
pub fn enable_replica_server_at(host: &Host, port: &str) -> PathBuf {
    let storage = host.dir.path().join("replicas");
    host.ferry_ok(&[
        "replica-server",
        "set",
        "--enable",
        "--port",
        port,
        "--allow-any",
        "--trust-ca",
        host.trusted_ca().to_str().expect("utf-8 path"),
        "--allow-primary-start",
        "yes",
        "--storage",
        storage.to_str().expect("utf-8 path"),
    ]);
    storage
}

/// `ferry replication status VM`.
pub fn status(host: &Host, vm: &str) -> Value {
    host.ferry_json(&["replication", "status", vm])
}

/// `ferry replication points VM`.
pub fn points(host: &Host, vm: &str) -> Vec<Value> {
    host.ferry_json(&["replication", "points", vm])
        .as_array()
        .expect("a list of points")
        .clone()
}

/// The top image of disk 0 of a recovery point.
pub fn layer(point: &Value) -> PathBuf {
    let layers = point["layers"].as_array().expect("layers");
    let l = layers
        .iter()
        .find(|l| l[0].as_u64() == Some(0))
        .expect("a layer for disk 0");
    PathBuf::from(l[1].as_str().expect("layer path"))
}

/// Disk 0's image of a VM, from `ferry vm show`.
pub fn vm_disk(host: &Host, vm: &str) -> PathBuf {
    PathBuf::from(
        host.ferry_json(&["vm", "show", vm])["disks"][0]["path"]
            .as_str()
            .expect("disk path"),
    )
}

/// Reads a qcow2 chain as raw bytes (`-U`: the image may be open elsewhere).
pub fn read_image(image: &Path) -> Vec<u8> {
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let status = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(image)
        .arg(out.path())
        .status()
        .expect("qemu-img");
    assert!(status.success(), "qemu-img convert {}", image.display());
    std::fs::read(out.path()).expect("read the converted image")
}

/// `qemu-img compare` of two qcow2 chains: `Err` holds qemu-img's description of the
/// first difference.
pub fn compare_images(a: &Path, b: &Path) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
        .arg(a)
        .arg(b)
        .output()
        .expect("qemu-img");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Suspends replication of `vm` on `a` and waits until no cycle is in flight and the
/// replica `b`'s retention (which merges old points away just after it acknowledges one)
/// has settled, so the point layers read next are stable.
pub fn quiesce(a: &Host, b: &Host, vm: &str) {
    a.ferry_ok(&["replication", "suspend", vm]);
    wait_for(
        "the cycle in flight to end",
        Duration::from_secs(120),
        || status(a, vm)["progress"].is_null(),
    );
    let mut last = points(b, vm);
    wait_for(
        "the replica's retention to settle",
        Duration::from_secs(60),
        || {
            std::thread::sleep(Duration::from_millis(500));
            let now = points(b, vm);
            let settled = now == last;
            last = now;
            settled
        },
    );
}

/// Every recovery point of `vm` on `b` is an exact prefix of the writes of a test guest
/// (`seed`, `span` blocks); returns the newest one's last write.
pub fn verify_points(b: &Host, vm: &str, seed: u64, span: u64) -> u64 {
    let mut last = 0;
    for p in points(b, vm) {
        let data = read_image(&layer(&p));
        last = crate::guest::verify_prefix(&data, seed, span)
            .unwrap_or_else(|e| panic!("recovery point {p} is not a prefix of the writes: {e}"))
            .last_seq;
    }
    last
}

/// [`verify_points`] with replication quiesced (no cycle, so no retention merge, runs while
/// the layers are read), then resumed.
pub fn verify_quiesced(a: &Host, b: &Host, vm: &str, seed: u64, span: u64) -> u64 {
    quiesce(a, b, vm);
    let last = verify_points(b, vm, seed, span);
    a.ferry_ok(&["replication", "resume", vm]);
    last
}
