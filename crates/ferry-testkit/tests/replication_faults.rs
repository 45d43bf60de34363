//! Replication survives what breaks in real life, with one guest writing verifiable blocks
//! and two real ferryd: the link cut mid-transfer, the replica daemon killed mid-apply,
//! QEMU SIGKILLed (resynchronization required, then resync), the primary daemon killed
//! mid-cycle, the primary's spool without room (cycles stream without it), the replica's
//! storage full. After each: no half-applied point is ever
//! visible, every point is an exact prefix of the guest's writes, the next cycle catches
//! up, and at the end the replica equals the primary byte for byte.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ferry_testkit::guest::{parse_console, GuestWorkload};
use ferry_testkit::host::{pid_alive, Host};
use ferry_testkit::link::Link;
use ferry_testkit::replication::{
    self, compare_images, enable_replica_server_at, free_port, layer, points, quiesce, status,
    wait_for,
};
use ferry_testkit::tmpfs::Tmpfs;

const SEED: u64 = 777;
const SPAN: u64 = 4096; // the guest writes the first 16 MiB; 48 MiB of random data follow

/// Every point is an exact prefix of this test guest's writes (see
/// `ferry_testkit::replication::verify_points`).
fn verify_points(b: &Host, vm: &str) -> u64 {
    replication::verify_points(b, vm, SEED, SPAN)
}

fn verify_quiesced(a: &Host, b: &Host, vm: &str) -> u64 {
    replication::verify_quiesced(a, b, vm, SEED, SPAN)
}

/// Waits until the primary is sending and at least `percent` through.
fn wait_sending(a: &Host, vm: &str, percent: u64) {
    wait_for(
        &format!("sending at {percent}%"),
        Duration::from_secs(120),
        || {
            let p = &status(a, vm)["progress"];
            p["phase"] == "sending" && p["percent"].as_u64().unwrap_or(0) >= percent
        },
    );
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

#[test]
fn replication_recovers_from_link_cuts_crashes_and_full_storage() {
    let mut a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let mut b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    // The replica's storage is a 256 MiB tmpfs, so the test can fill it.
    let storage = b.dir.path().join("replicas");
    let _mount = Tmpfs::mount(&storage, "256M", "ferry-test");
    let port: u16 = free_port("127.0.0.2").parse().unwrap();
    enable_replica_server_at(&b, &port.to_string());
    let b_fp = b.ferry_json(&["server", "show"])["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let link = Link::start("127.0.0.1", SocketAddr::from(([127, 0, 0, 2], port)));

    // A 64 MiB disk: zeros where the guest writes, 48 MiB of random data after.
    let image = a.dir.path().join("seed.qcow2");
    let raw = a.dir.path().join("seed.raw");
    sh(&format!(
        "truncate -s 64M {r} && dd if=/dev/urandom of={r} bs=1M seek=16 count=48 conv=notrunc status=none && qemu-img convert -O qcow2 {r} {i} && rm {r}",
        r = raw.display(),
        i = image.display()
    ));
    a.create_guest_vm(
        "app",
        GuestWorkload {
            seed: SEED,
            start: 1,
            span_blocks: SPAN,
        },
        0.1,
        &["--memory", "256M", "--disk", image.to_str().unwrap()],
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

    // The initial copy (~48 MiB at 4 MiB/s) goes through the cuttable link.
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
        "--bandwidth-limit",
        "4M",
    ]);

    // Enabled by address and fingerprint: the replica's own name is learnt.
    assert_eq!(status(&a, "app")["partner"], "b");

    // 1. Link cut mid-transfer: the cycle fails, no point is visible on the replica.
    wait_sending(&a, "app", 40);
    link.cut();
    wait_for("the cut to be noticed", Duration::from_secs(60), || {
        !status(&a, "app")["last_error"].is_null()
    });
    let st = status(&a, "app");
    println!("after the cut: {st}");
    assert_eq!(st["last_cycle"], 0);
    assert!(
        points(&b, "app").is_empty(),
        "a half-received point is visible"
    );

    // 2. The retry resumes where it stopped; the replica daemon is killed mid-apply and
    //    restarted; the transfer resumes again (the replica kept a durable mark) and
    //    completes.
    wait_sending(&a, "app", 20);
    b.kill_daemon();
    b.launch();
    assert!(
        points(&b, "app").is_empty(),
        "a half-received point is visible after a crash"
    );
    wait_for("the initial copy", Duration::from_secs(180), || {
        status(&a, "app")["last_cycle"].as_i64().unwrap() >= 1
    });
    let resumed = a
        .log_text()
        .matches("resuming an interrupted transfer")
        .count();
    println!(
        "transfers resumed: {resumed}; connections through the link: {}",
        link.connections()
    );
    assert!(
        resumed >= 2,
        "the transfer did not resume after the cut and after the crash"
    );
    let first = verify_quiesced(&a, &b, "app");
    wait_for("a delta cycle", Duration::from_secs(60), || {
        status(&a, "app")["last_cycle"].as_i64().unwrap() >= 2
    });
    assert!(verify_quiesced(&a, &b, "app") >= first);

    // 3. QEMU SIGKILLed: change tracking is lost; resynchronization required, with a
    //    clear message and the points kept; plain resume refuses.
    let pid = a.ferry_json(&["vm", "show", "app"])["pid"]
        .as_u64()
        .unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("QEMU to die", Duration::from_secs(10), || {
        !pid_alive(pid as u32)
    });
    wait_for("the VM to be off", Duration::from_secs(20), || {
        a.vm_state("app") == "off"
    });
    a.ferry_ok(&["replication", "now", "app"]);
    wait_for(
        "resynchronization required",
        Duration::from_secs(60),
        || status(&a, "app")["state"] == "resynchronization_required",
    );
    let st = status(&a, "app");
    println!("after QEMU was killed: {}", st["last_error"]);
    assert!(
        st["last_error"].as_str().unwrap().contains("--resync"),
        "{st}"
    );
    let err = a.ferry_err(&["replication", "resume", "app"]);
    assert!(err.contains("--resync"), "{err}");
    let before_resync = verify_points(&b, "app");

    // 4. While the VM is off, its disk is also edited outside Ferry (24 MiB of new random
    //    data). Resync; the primary daemon is killed mid-transfer and restarted: the
    //    captured cycle is shipped from its spool, and the replica then equals the
    //    (stopped) primary.
    sh(&format!(
        "dd if=/dev/urandom of={r} bs=1M count=24 status=none && qemu-io -f qcow2 -c 'write -s {r} 32M 24M' {d} >/dev/null && rm {r}",
        r = raw.display(),
        d = primary_disk.display()
    ));
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    a.ferry_ok(&["replication", "resume", "app", "--resync"]);
    wait_sending(&a, "app", 30);
    a.kill_daemon();
    a.launch();
    wait_for("the resync", Duration::from_secs(180), || {
        let st = status(&a, "app");
        st["state"] == "replicating" && st["last_cycle"].as_i64().unwrap() > cycle
    });
    quiesce(&a, &b, "app");
    // With only the latest point kept, the next (empty) delta of the stopped VM may merge
    // the resync point away at once: its size is read from the replica's event log, which
    // records every point as it is committed.
    let events = b.ferry_json(&["events", "--vm", "app", "--last", "1000"]);
    let resync_bytes: Vec<u64> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "recovery_point_added")
        .filter_map(|e| {
            let m = e["message"].as_str()?;
            let rest = m.split(", resync, ").nth(1)?;
            rest.split(" bytes").next()?.parse().ok()
        })
        .collect();
    let resent = *resync_bytes
        .last()
        .expect("a resync point in the replica's events");
    println!("resync shipped {resent} bytes of a 64 MiB disk");
    assert!(
        (24 << 20..=40 << 20).contains(&resent),
        "resync shipped {resent} bytes"
    );
    let latest = points(&b, "app").pop().expect("a point");
    compare_images(&primary_disk, &layer(&latest)).expect("replica differs after the resync");
    assert!(verify_points(&b, "app") >= before_resync);
    a.ferry_ok(&["replication", "resume", "app"]);

    // 5. The VM restarts: tracking continues with delta cycles (no new resync).
    a.ferry_ok(&["vm", "start", "app"]);
    a.wait_console("app", Duration::from_secs(60), "guest writes", |c| {
        parse_console(c).last_wrote_seq.unwrap_or(0) >= 3
    });
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    wait_for(
        "a delta cycle after the restart",
        Duration::from_secs(60),
        || status(&a, "app")["last_cycle"].as_i64().unwrap() > cycle,
    );
    assert_eq!(points(&b, "app").last().unwrap()["kind"], "delta");
    verify_quiesced(&a, &b, "app");

    // 5b. The primary's spool has no room (a 200 MiB tmpfs, under the 256 MiB reserve): the
    //     delta cycles stream to the replica without a spool, and their points are exact
    //     prefixes like any other.
    let spool = a.data_dir.join("spool");
    let spool_mount = Tmpfs::mount(&spool, "200M", "ferry-spool");
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    wait_for(
        "delta cycles without a spool",
        Duration::from_secs(90),
        || {
            let st = status(&a, "app");
            st["state"] == "replicating" && st["last_cycle"].as_i64().unwrap() > cycle + 1
        },
    );
    assert!(
        a.log_text().contains("it streams without a spool"),
        "the cycles did not stream without a spool"
    );
    assert_eq!(points(&b, "app").last().unwrap()["kind"], "delta");
    verify_quiesced(&a, &b, "app");
    drop(spool_mount);

    // 6. The replica's storage fills up: the cycle fails with a clear message, the
    //    primary keeps tracking, and once space is freed replication catches up.
    let filler = storage.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "status=none"])
        .arg(format!("of={}", filler.display()))
        .status();
    wait_for("the storage-full error", Duration::from_secs(90), || {
        status(&a, "app")["state"] == "error"
    });
    let st = status(&a, "app");
    println!("storage full: {}", st["last_error"]);
    let msg = st["last_error"].as_str().unwrap().to_lowercase();
    assert!(msg.contains("space"), "{st}");
    assert_eq!(a.vm_state("app"), "running");
    verify_points(&b, "app");
    std::fs::remove_file(&filler).unwrap();
    let cycle = st["last_cycle"].as_i64().unwrap();
    wait_for("replication to catch up", Duration::from_secs(90), || {
        let st = status(&a, "app");
        st["state"] == "replicating" && st["last_cycle"].as_i64().unwrap() > cycle
    });

    // 7. Nothing was lost: the guest stops, a final cycle, byte-for-byte equal.
    a.ferry_ok(&["vm", "stop", "app"]);
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    a.ferry_ok(&["replication", "now", "app"]);
    wait_for("the final cycle", Duration::from_secs(90), || {
        status(&a, "app")["last_cycle"].as_i64().unwrap() > cycle
    });
    quiesce(&a, &b, "app");
    let newest = points(&b, "app").last().cloned().unwrap();
    compare_images(&primary_disk, &layer(&newest)).expect("replica differs from the primary");
    verify_points(&b, "app");
}
