//! Unplanned failover on the replica server after the primary site is gone (its ferryd
//! killed, its VM stopped): the split-brain guard, failover to an older recovery point whose
//! disk is exactly that point's prefix of the guest's writes (and boots), cancel restoring
//! the exact previous state, then failover to the latest point, start, and complete.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_testkit::guest::{parse_console, verify_prefix, GuestWorkload};
use ferry_testkit::host::Host;
use ferry_testkit::replication::{
    compare_images, enable_replica_server, layer, points, read_image, vm_disk, wait_for,
};
use serde_json::Value;

const SEED: u64 = 515;
const SPAN: u64 = 2048;

fn last_seq(image: &Path) -> u64 {
    verify_prefix(&read_image(image), SEED, SPAN)
        .unwrap_or_else(|e| panic!("{} is not a prefix of the writes: {e}", image.display()))
        .last_seq
}

/// The test VM `app` on `a`, started and writing, then replicating to `b` every 5 s (with
/// the further `replication enable` options given) once its initial copy is done.
fn replicated_app(a: &Host, b: &Host, options: &[&str]) {
    a.create_guest_vm(
        "app",
        GuestWorkload {
            seed: SEED,
            start: 1,
            span_blocks: SPAN,
        },
        0.1,
        &["--memory", "256M", "--disk", "16M"],
    );
    a.ferry_ok(&["vm", "start", "app"]);
    a.wait_console("app", Duration::from_secs(60), "guest writes", |c| {
        parse_console(c).last_wrote_seq.unwrap_or(0) >= 3
    });
    let to = b.socket.to_str().unwrap();
    let mut args = vec![
        "replication",
        "enable",
        "app",
        "--to",
        to,
        "--interval",
        "5s",
    ];
    args.extend_from_slice(options);
    args.push("--wait");
    a.ferry_ok(&args);
}

#[test]
fn unplanned_failover_to_a_chosen_point_cancel_and_complete() {
    let mut a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    enable_replica_server(&b, "127.0.0.2");
    replicated_app(&a, &b, &["--recovery-points", "5", "--point-spacing", "1s"]);
    wait_for("three points", Duration::from_secs(60), || {
        points(&b, "app").len() >= 3
    });
    // The primary site goes away: its VM stops, its ferryd dies.
    a.ferry_ok(&["vm", "stop", "app"]);
    a.kill_daemon();

    // Split-brain guard: the primary sent a point moments ago.
    let err = b.ferry_err(&["failover", "start", "app"]);
    assert!(
        err.contains("probably still running") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        b.ferry_json(&["replication", "status", "app"])["state"],
        "replicating"
    );

    // Failover to an older point: the VM's disk is exactly that point.
    let pts = points(&b, "app");
    let older = pts[pts.len() - 2].clone();
    let older_seq = last_seq(&layer(&older));
    let latest_seq = last_seq(&layer(pts.last().unwrap()));
    assert!(older_seq <= latest_seq);
    let before_disk = vm_disk(&b, "app");
    let out = b.ferry_ok(&[
        "failover",
        "start",
        "app",
        "--point",
        &older["id"].to_string(),
        "--force",
    ]);
    println!("{out}");
    let st = b.ferry_json(&["replication", "status", "app"]);
    assert_eq!(st["state"], "failed_over_waiting_completion", "{st}");
    let disk = vm_disk(&b, "app");
    assert_ne!(disk, before_disk);
    assert_eq!(
        last_seq(&disk),
        older_seq,
        "the failed-over disk is not the chosen point"
    );
    // It boots and runs from that point.
    b.ferry_ok(&["vm", "start", "app"]);
    b.wait_console(
        "app",
        Duration::from_secs(60),
        "the failed-over guest",
        |c| parse_console(c).last_wrote_seq.unwrap_or(0) >= 2,
    );
    assert!(b
        .ferry_err(&["failover", "start", "app", "--force"])
        .contains("already failed over"));

    // Cancel: off, its writes discarded, the replica VM back on its latest point.
    b.ferry_ok(&["failover", "cancel", "app"]);
    assert_eq!(b.vm_state("app"), "off");
    assert_eq!(vm_disk(&b, "app"), before_disk);
    assert!(!disk.exists(), "the failover overlay was left behind");
    assert_eq!(
        b.ferry_json(&["replication", "status", "app"])["state"],
        "replicating"
    );
    let after: Vec<(i64, u64)> = points(&b, "app")
        .iter()
        .map(|p| (p["id"].as_i64().unwrap(), last_seq(&layer(p))))
        .collect();
    assert_eq!(after.len(), pts.len(), "cancel changed the recovery points");
    assert_eq!(after.last().unwrap().1, latest_seq);

    // Failover to the older point again, started at once; complete keeps only that point.
    // (The old primary then holds writes beyond it: the later point, and what it wrote
    // after its last cycle.)
    b.ferry_ok(&[
        "failover",
        "start",
        "app",
        "--point",
        &older["id"].to_string(),
        "--start",
        "--force",
    ]);
    assert_eq!(b.vm_state("app"), "running");
    b.ferry_ok(&["failover", "complete", "app"]);
    let pts = points(&b, "app");
    assert_eq!(pts.len(), 1, "{pts:?}");
    let st = b.ferry_json(&["replication", "status", "app"]);
    assert_eq!(st["state"], "failed_over");
    let h = b.ferry_json(&["replication", "health", "app"])[0].clone();
    assert_eq!(h["health"], "warning");
    assert!(
        h["details"][0]
            .as_str()
            .unwrap()
            .contains("reverse replication"),
        "{h}"
    );
    assert!(b
        .ferry_err(&["failover", "cancel", "app"])
        .contains("completed"));
    let events = b.ferry_json(&["events", "--vm", "app"]);
    for kind in [
        "failover_started",
        "failover_cancelled",
        "failover_completed",
    ] {
        assert!(
            events.as_array().unwrap().iter().any(|e| e["kind"] == kind),
            "no {kind} event"
        );
    }
    // The old primary comes back. Its disk may hold writes the chosen point lacks, so
    // reverse replication refuses without --resync; with it, both sides are compared and
    // the replica (the old primary) ends up equal to the failed-over VM.
    a.launch();
    enable_replica_server(&a, "127.0.0.1");
    let reverse = [
        "replication",
        "reverse",
        "app",
        "--to",
        a.socket.to_str().unwrap(),
    ];
    // No full copy, no whole-disk comparison: the first cycle sends the union of what the
    // old primary wrote after the chosen point and what the new primary wrote since.
    b.ferry_ok(&reverse);
    assert_eq!(
        a.ferry_json(&["replication", "status", "app"])["role"],
        "replica"
    );
    wait_for("the first reverse cycles", Duration::from_secs(60), || {
        let st = b.ferry_json(&["replication", "status", "app"]);
        st["state"] == "replicating" && st["last_cycle"].as_i64().unwrap() >= 3
    });
    let kinds: Vec<Value> = points(&a, "app")
        .iter()
        .map(|p| p["kind"].clone())
        .collect();
    assert!(
        kinds.iter().all(|k| k == "delta" || k == "reverse-base"),
        "{kinds:?}"
    );
    let sent: u64 = points(&a, "app")
        .iter()
        .map(|p| p["bytes"].as_u64().unwrap())
        .sum();
    println!("reverse after an unplanned failover sent {sent} bytes in points {kinds:?}");
    assert!(sent < 4 << 20, "{sent} bytes for a 16 MiB disk");
    b.ferry_ok(&["vm", "stop", "app"]);
    let cycle = b.ferry_json(&["replication", "status", "app"])["last_cycle"]
        .as_i64()
        .unwrap();
    b.ferry_ok(&["replication", "now", "app"]);
    wait_for("the final reverse cycle", Duration::from_secs(60), || {
        b.ferry_json(&["replication", "status", "app"])["last_cycle"]
            .as_i64()
            .unwrap()
            > cycle
    });
    b.ferry_ok(&["replication", "suspend", "app"]);
    std::thread::sleep(Duration::from_millis(500));
    let newest = points(&a, "app").last().cloned().unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
        .arg(vm_disk(&b, "app"))
        .arg(layer(&newest))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the old primary differs after the reverse resync: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Planned failover: refused while the VM runs; once it is off every change is shipped, the
/// primary will not start it, and the replica's failed-over disk equals the primary's byte
/// for byte (zero data loss). Cancelling on both sides restores replication.
#[test]
fn planned_failover_loses_nothing_and_cancel_restores_replication() {
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    enable_replica_server(&b, "127.0.0.2");
    replicated_app(&a, &b, &[]);
    let err = a.ferry_err(&["failover", "planned", "app"]);
    assert!(err.contains("shut it down first"), "{err}");
    // The guest keeps writing until it is stopped: those last writes must reach the replica.
    std::thread::sleep(Duration::from_secs(2));
    a.ferry_ok(&["vm", "stop", "app"]);
    let out = a.ferry_ok(&["failover", "planned", "app"]);
    println!("{out}");
    let st = a.ferry_json(&["replication", "status", "app"]);
    assert_eq!(st["state"], "prepared_for_failover", "{st}");
    assert_eq!(st["state_label"], "Prepared for planned failover");
    let err = a.ferry_err(&["vm", "start", "app"]);
    assert!(err.contains("prepared for a planned failover"), "{err}");
    let bst = b.ferry_json(&["replication", "status", "app"]);
    assert_eq!(bst["state"], "failed_over_waiting_completion", "{bst}");
    let primary_disk = vm_disk(&a, "app");
    let replica_disk = vm_disk(&b, "app");
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
        .arg(&primary_disk)
        .arg(&replica_disk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "data lost in the planned failover: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Every write the guest announced is on the replica. A hard stop can land after a
    // block reached the disk (dd ... fsync) and before its console line: then the replica
    // (equal to the primary's disk, above) holds that one more write, never fewer.
    let wrote = parse_console(&a.console("app")).last_wrote_seq.unwrap();
    let held = last_seq(&replica_disk);
    assert!(
        held == wrote || held == wrote + 1,
        "the replica misses the last writes: it holds up to {held}, the guest wrote {wrote}"
    );

    // Cancel on both sides: the VM runs on the primary again and cycles go on.
    b.ferry_ok(&["failover", "cancel", "app"]);
    a.ferry_ok(&["failover", "cancel", "app"]);
    a.ferry_ok(&["vm", "start", "app"]);
    let cycle = a.ferry_json(&["replication", "status", "app"])["last_cycle"]
        .as_i64()
        .unwrap();
    wait_for("cycles after the cancel", Duration::from_secs(60), || {
        let st = a.ferry_json(&["replication", "status", "app"]);
        st["state"] == "replicating" && st["last_cycle"].as_i64().unwrap() > cycle
    });
}

fn points_sum(host: &Host, vm: &str) -> (u64, Vec<String>) {
    let pts = points(host, vm);
    (
        pts.iter().map(|p| p["bytes"].as_u64().unwrap()).sum(),
        pts.iter()
            .map(|p| p["kind"].as_str().unwrap().to_owned())
            .collect(),
    )
}

fn identical(a: &Path, b: &Path) {
    if let Err(diff) = compare_images(a, b) {
        panic!("{} and {} differ: {diff}", a.display(), b.display());
    }
}

/// A planned failover round trip A→B→A with reverse replication both ways: each direction
/// ships only what the running side wrote (no initial copy, no resync), and every switch
/// leaves the two disks byte-identical.
#[test]
fn planned_failover_reverse_and_failback_ship_only_changes() {
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    for h in [&a, &b] {
        let ip = if h.name == "a" {
            "127.0.0.1"
        } else {
            "127.0.0.2"
        };
        enable_replica_server(&h, ip);
    }
    replicated_app(
        &a,
        &b,
        &["--recovery-points", "24", "--point-spacing", "1s"],
    );

    // A -> B: planned failover, started on B, then reversed: B replicates back to A.
    a.ferry_ok(&["vm", "stop", "app"]);
    // One command: planned failover, started on B, replication reversed to A.
    let out = a.ferry_ok(&["failover", "planned", "app", "--start", "--reverse"]);
    println!("{out}");
    assert!(out.contains("reversed"), "{out}");
    assert_eq!(b.vm_state("app"), "running");
    assert_eq!(
        b.ferry_json(&["replication", "status", "app"])["role"],
        "primary"
    );
    let ast = a.ferry_json(&["replication", "status", "app"]);
    assert_eq!(
        (ast["role"].as_str(), ast["partner"].as_str()),
        (Some("replica"), Some("b"))
    );
    assert!(a.ferry_err(&["vm", "start", "app"]).contains("replica"));
    b.wait_console("app", Duration::from_secs(60), "the guest on b", |c| {
        parse_console(c).last_wrote_seq.unwrap_or(0) >= 3
    });
    let c0 = b.ferry_json(&["replication", "status", "app"])["last_cycle"]
        .as_i64()
        .unwrap();
    wait_for("cycles b -> a", Duration::from_secs(60), || {
        b.ferry_json(&["replication", "status", "app"])["last_cycle"]
            .as_i64()
            .unwrap()
            >= c0 + 2
    });
    let (sent, kinds) = points_sum(&a, "app");
    println!("b -> a: {sent} bytes in points {kinds:?}");
    // Delta only: no initial copy, no resynchronization. The guest writes 4 KiB every
    // 0.1 s: a few hundred KiB, not the 16 MiB disk.
    assert!(
        kinds.iter().all(|k| k == "delta" || k == "reverse-base"),
        "{kinds:?}"
    );
    assert!(
        sent > 0 && sent < 4 << 20,
        "reverse replication sent {sent} bytes"
    );

    // B -> A: failback by a planned failover the other way, then reversed again.
    b.ferry_ok(&["vm", "stop", "app"]);
    b.ferry_ok(&["failover", "planned", "app"]);
    identical(&vm_disk(&b, "app"), &vm_disk(&a, "app"));
    a.ferry_ok(&[
        "replication",
        "reverse",
        "app",
        "--to",
        b.socket.to_str().unwrap(),
    ]);
    assert_eq!(
        a.ferry_json(&["replication", "status", "app"])["role"],
        "primary"
    );
    assert_eq!(
        b.ferry_json(&["replication", "status", "app"])["role"],
        "replica"
    );
    // A's console log still holds the first boot's lines: wait for this boot's writes.
    let seen = a.console("app").len();
    a.ferry_ok(&["vm", "start", "app"]);
    a.wait_console("app", Duration::from_secs(60), "the guest back on a", |c| {
        c.get(seen..)
            .is_some_and(|new| new.contains("WROTE seq=3 "))
    });
    let cycle = a.ferry_json(&["replication", "status", "app"])["last_cycle"]
        .as_i64()
        .unwrap();
    wait_for("cycles a -> b again", Duration::from_secs(60), || {
        a.ferry_json(&["replication", "status", "app"])["last_cycle"]
            .as_i64()
            .unwrap()
            >= cycle + 2
    });
    let (sent, kinds) = points_sum(&b, "app");
    println!("a -> b after failback: {sent} bytes in points {kinds:?}");
    assert!(
        kinds.iter().all(|k| k == "delta" || k == "reverse-base"),
        "{kinds:?}"
    );
    assert!(
        sent > 0 && sent < 4 << 20,
        "replication after failback sent {sent} bytes"
    );
    // Back where it started: A primary running, B replica; after a final cycle, identical.
    a.ferry_ok(&["vm", "stop", "app"]);
    let cycle = a.ferry_json(&["replication", "status", "app"])["last_cycle"]
        .as_i64()
        .unwrap();
    a.ferry_ok(&["replication", "now", "app"]);
    wait_for("the final cycle", Duration::from_secs(60), || {
        a.ferry_json(&["replication", "status", "app"])["last_cycle"]
            .as_i64()
            .unwrap()
            > cycle
    });
    a.ferry_ok(&["replication", "suspend", "app"]);
    std::thread::sleep(Duration::from_millis(500));
    let newest = points(&b, "app").last().cloned().unwrap();
    identical(&vm_disk(&a, "app"), &layer(&newest));
}

/// The primary site dies hard (QEMU SIGKILLed, ferryd killed): failover to an older point
/// gives exactly that point, and boots. The old primary's change tracking died with QEMU, so
/// reverse replication refuses to guess and asks for --resync, which compares both sides and
/// leaves them identical.
#[test]
fn unplanned_failover_after_qemu_is_killed_then_reverse_with_resync() {
    let mut a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    for (h, ip) in [(&a, "127.0.0.1"), (&b, "127.0.0.2")] {
        enable_replica_server(&h, ip);
    }
    replicated_app(&a, &b, &["--recovery-points", "5", "--point-spacing", "1s"]);
    wait_for("three points", Duration::from_secs(60), || {
        points(&b, "app").len() >= 3
    });
    let pid = a.ferry_json(&["vm", "show", "app"])["pid"]
        .as_u64()
        .unwrap() as i32;
    // SAFETY: kill(2) of the test's own QEMU.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    a.kill_daemon();

    let pts = points(&b, "app");
    let older = pts[pts.len() - 2].clone();
    let older_seq = last_seq(&layer(&older));
    b.ferry_ok(&[
        "failover",
        "start",
        "app",
        "--point",
        &older["id"].to_string(),
        "--force",
    ]);
    assert_eq!(last_seq(&vm_disk(&b, "app")), older_seq);
    b.ferry_ok(&["vm", "start", "app"]);
    b.wait_console(
        "app",
        Duration::from_secs(60),
        "the failed-over guest",
        |c| parse_console(c).last_wrote_seq.unwrap_or(0) >= 2,
    );
    b.ferry_ok(&["failover", "complete", "app"]);

    a.launch();
    let reverse = [
        "replication",
        "reverse",
        "app",
        "--to",
        a.socket.to_str().unwrap(),
    ];
    let err = b.ferry_err(&reverse);
    assert!(err.contains("--resync"), "{err}");
    let mut with_resync = reverse.to_vec();
    with_resync.push("--resync");
    b.ferry_ok(&with_resync);
    wait_for("the reverse resync", Duration::from_secs(60), || {
        let st = b.ferry_json(&["replication", "status", "app"]);
        st["state"] == "replicating" && st["last_cycle"].as_i64().unwrap() >= 2
    });
    b.ferry_ok(&["vm", "stop", "app"]);
    let cycle = b.ferry_json(&["replication", "status", "app"])["last_cycle"]
        .as_i64()
        .unwrap();
    b.ferry_ok(&["replication", "now", "app"]);
    wait_for("the final reverse cycle", Duration::from_secs(60), || {
        b.ferry_json(&["replication", "status", "app"])["last_cycle"]
            .as_i64()
            .unwrap()
            > cycle
    });
    b.ferry_ok(&["replication", "suspend", "app"]);
    std::thread::sleep(Duration::from_millis(500));
    let newest = points(&a, "app").last().cloned().unwrap();
    identical(&vm_disk(&b, "app"), &layer(&newest));
}
