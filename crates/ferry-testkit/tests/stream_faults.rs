//! Faults in the middle of a streamed delta cycle (issue 12 item 2, ADR 0004 decision 3).
//!
//! One guest writes verifiable blocks without pause; its delta cycles stream through a
//! slowed link, so each fault lands while a cycle is on the wire: the primary daemon
//! SIGKILLed with the link cut (and its unsynced spool then torn: a power loss), the
//! replica daemon SIGKILLed, the link cut, QEMU SIGKILLed. After each, no half-applied point
//! is ever visible on the replica and every point is an exact prefix of the guest's writes:
//! the next point holds every write, also those of the cycle that was lost with its spool,
//! which only the change-tracking generation kept until the replica's commit can give.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferry_testkit::guest::{parse_console, GuestWorkload};
use ferry_testkit::host::{pid_alive, Host};
use ferry_testkit::link::Link;
use ferry_testkit::replication::{
    self, compare_images, enable_replica_server_at, free_port, layer, points, status, wait_for,
};

const SEED: u64 = 4242;
const SPAN: u64 = 4096; // 16 MiB of 4 KiB blocks

/// Every point is an exact prefix of this test guest's writes (see
/// `ferry_testkit::replication::verify_points`).
fn verify_points(b: &Host, vm: &str) -> u64 {
    replication::verify_points(b, vm, SEED, SPAN)
}

fn verify_quiesced(a: &Host, b: &Host, vm: &str) -> u64 {
    replication::verify_quiesced(a, b, vm, SEED, SPAN)
}

/// While a fault is staged the link is this slow, so that a cycle of the guest's writes
/// (100-300 KiB dirty in 5 s under TCG) is on the wire for seconds; then full speed again.
const SLOW_LINK: u64 = 16 << 10;

/// Slows `link` and waits until a delta cycle after `after` is being sent, at least
/// `percent` through. Returns that cycle's number.
fn wait_streaming_delta(a: &Host, link: &Link, vm: &str, after: i64, percent: u64) -> i64 {
    link.set_rate(Some(SLOW_LINK));
    let mut cycle = 0;
    wait_for(
        &format!("a delta cycle after {after} on the wire"),
        Duration::from_secs(120),
        || {
            let st = status(a, vm);
            let p = &st["progress"];
            let on_wire = st["last_cycle"].as_i64().unwrap_or(0) >= after
                && p["phase"] == "sending"
                && p["percent"].as_u64().unwrap_or(0) >= percent;
            if on_wire {
                cycle = st["last_cycle"].as_i64().unwrap() + 1;
            }
            on_wire
        },
    );
    cycle
}

/// Waits until a cycle beyond `cycle` is committed and replication is healthy again.
fn wait_committed_beyond(a: &Host, vm: &str, cycle: i64) {
    wait_for(
        &format!("a cycle beyond {cycle}"),
        Duration::from_secs(180),
        || {
            let st = status(a, vm);
            st["state"] == "replicating" && st["last_cycle"].as_i64().unwrap_or(0) > cycle
        },
    );
}

fn no_point(b: &Host, vm: &str, cycle: i64, after: &str) {
    assert!(
        points(b, vm)
            .iter()
            .all(|p| p["cycle"].as_i64().unwrap_or(0) < cycle),
        "cycle {cycle} is visible on the replica after {after}: {:?}",
        points(b, vm)
    );
}

#[test]
fn streamed_cycles_survive_faults_mid_stream_and_lose_no_write() {
    let mut a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let mut b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    let port: u16 = free_port("127.0.0.2").parse().unwrap();
    enable_replica_server_at(&b, &port.to_string());
    let b_fp = b.ferry_json(&["server", "show"])["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let link = Link::start("127.0.0.1", SocketAddr::from(([127, 0, 0, 2], port)));

    // A guest that writes a 4 KiB block every 20 ms, each in its own change-tracking
    // cluster: a few seconds of writes are a delta of megabytes.
    a.create_guest_vm(
        "app",
        GuestWorkload {
            seed: SEED,
            start: 1,
            span_blocks: SPAN,
        },
        0.02,
        &["--memory", "256M", "--disk", "32M"],
    );
    a.ferry_ok(&["vm", "start", "app"]);
    a.wait_console("app", Duration::from_secs(60), "guest writes", |c| {
        parse_console(c).last_wrote_seq.unwrap_or(0) >= 3
    });
    let primary_disk = PathBuf::from(
        a.ferry_json(&["vm", "show", "app"])["disks"][0]["path"]
            .as_str()
            .unwrap(),
    );
    a.ferry_ok(&[
        "replication",
        "enable",
        "app",
        "--to",
        &link.addr.to_string(),
        "--replica-fingerprint",
        &b_fp,
        "--interval",
        "5s",
        // The guest's blocks compress to almost nothing: uncompressed, a cycle's bytes on
        // the slowed link take seconds.
        "--no-compression",
    ]);
    wait_committed_beyond(&a, "app", 1);
    assert!(
        a.log_text().contains("cycle streamed"),
        "the cycles were not streamed"
    );
    let mut newest = verify_quiesced(&a, &b, "app");

    // 1. The primary daemon is SIGKILLed while a delta streams, and its spool (never
    //    fsynced) is torn as a power loss would leave it. The cycle is abandoned, and the
    //    next point holds its writes too: the generation behind it was kept for it.
    let after = status(&a, "app")["last_cycle"].as_i64().unwrap();
    let cycle = wait_streaming_delta(&a, &link, "app", after, 10);
    // The read is local and fast, the link slow: the capture is complete (its description
    // written) while the cycle is still on the wire. The primary's only VM: its spool
    // directory is the only one.
    let spool_dir = a.data_dir.join("spool");
    let spool_of = |ext: &str| {
        std::fs::read_dir(&spool_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| d.path().join(format!("cycle-{cycle}.{ext}")))
            .find(|p| p.exists())
    };
    wait_for(
        "the captured cycle's description",
        Duration::from_secs(60),
        || spool_of("meta").is_some(),
    );
    assert_eq!(
        status(&a, "app")["progress"]["phase"],
        "sending",
        "the cycle was no longer on the wire"
    );
    // A power loss: the daemon dies and what it had sent but the link had not delivered
    // is lost with it.
    a.kill_daemon();
    link.cut();
    no_point(&b, "app", cycle, "the primary daemon died");
    let spool = spool_of("spool").expect("the captured cycle's spool");
    let len = std::fs::metadata(&spool)
        .unwrap_or_else(|e| panic!("the captured cycle's spool {}: {e}", spool.display()))
        .len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&spool)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    link.set_rate(None);
    a.launch();
    wait_for(
        "the damaged spool to be noticed",
        Duration::from_secs(120),
        || a.log_text().contains("is damaged"),
    );
    no_point(&b, "app", cycle, "its spool was lost");
    wait_committed_beyond(&a, "app", cycle - 1);
    let seen = verify_quiesced(&a, &b, "app");
    assert!(seen > newest, "no new writes after the lost cycle");
    newest = seen;

    // 2. The replica daemon is SIGKILLed mid-stream: no half point; the transfer resumes.
    let after = status(&a, "app")["last_cycle"].as_i64().unwrap();
    let cycle = wait_streaming_delta(&a, &link, "app", after, 20);
    b.kill_daemon();
    link.set_rate(None);
    b.launch();
    no_point(&b, "app", cycle, "the replica daemon died");
    wait_committed_beyond(&a, "app", cycle);
    let seen = verify_quiesced(&a, &b, "app");
    assert!(seen > newest);
    newest = seen;

    // 3. The link is cut mid-stream: no half point; the next attempt completes.
    let after = status(&a, "app")["last_cycle"].as_i64().unwrap();
    let cycle = wait_streaming_delta(&a, &link, "app", after, 20);
    link.cut();
    link.set_rate(None);
    no_point(&b, "app", cycle, "the link was cut");
    wait_committed_beyond(&a, "app", cycle);
    let seen = verify_quiesced(&a, &b, "app");
    assert!(seen > newest);

    // 4. QEMU is SIGKILLed mid-stream: the points stay exact prefixes; change tracking is
    //    lost, so a resynchronization (by hash comparison) brings the replica to the
    //    stopped VM's disk exactly.
    let after = status(&a, "app")["last_cycle"].as_i64().unwrap();
    wait_streaming_delta(&a, &link, "app", after, 10);
    let pid = a.ferry_json(&["vm", "show", "app"])["pid"]
        .as_u64()
        .unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("QEMU to die", Duration::from_secs(10), || {
        !pid_alive(pid as u32)
    });
    link.set_rate(None);
    wait_for("the VM to be off", Duration::from_secs(20), || {
        a.vm_state("app") == "off"
    });
    wait_for(
        "resynchronization required",
        Duration::from_secs(120),
        || {
            a.ferry_ok(&["replication", "now", "app"]);
            std::thread::sleep(Duration::from_millis(500));
            status(&a, "app")["state"] == "resynchronization_required"
        },
    );
    verify_points(&b, "app");
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    a.ferry_ok(&["replication", "resume", "app", "--resync"]);
    wait_committed_beyond(&a, "app", cycle);
    verify_quiesced(&a, &b, "app");
    a.ferry_ok(&["replication", "suspend", "app"]);
    let newest_point = points(&b, "app").pop().expect("a point");
    compare_images(&primary_disk, &layer(&newest_point))
        .expect("the replica differs from the stopped primary after the resync");
}
