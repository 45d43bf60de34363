//! Checkpoints on a real guest: production checkpoints hold exactly the writes up to the
//! guest's freeze, a standard checkpoint resumes the guest's write sequence where it was,
//! delete and delete --subtree keep the other checkpoints applicable, an export imports as
//! a VM that boots, and bad input changes nothing. Then on a replicated VM: replication
//! keeps going across create and apply, an apply ships only what it changed and the replica
//! ends byte-identical, and an apply whose difference cannot be known asks for a resync.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_testkit::guest::{parse_console, verify_prefix, GuestWorkload};
use ferry_testkit::host::Host;
use ferry_testkit::replication::{
    compare_images, enable_replica_server, layer, points, read_image, status, vm_disk, wait_for,
};
use serde_json::Value;

const SEED: u64 = 4242;
const SPAN: u64 = 2048;

fn disk_seq(image: &Path) -> u64 {
    verify_prefix(&read_image(image), SEED, SPAN)
        .unwrap_or_else(|e| panic!("{} is not a prefix of the writes: {e}", image.display()))
        .last_seq
}

fn create_guest_vm(host: &Host, vm: &str, disk: &str) {
    host.create_guest_vm(
        vm,
        GuestWorkload {
            seed: SEED,
            start: 1,
            span_blocks: SPAN,
        },
        0.05,
        &["--memory", "128M", "--disk", disk],
    );
}

fn console_seq(host: &Host, vm: &str) -> u64 {
    parse_console(&host.console(vm)).last_wrote_seq.unwrap_or(0)
}

fn wait_writes(host: &Host, vm: &str, more_than: u64) -> u64 {
    host.wait_console(vm, Duration::from_secs(90), "guest writes", |c| {
        parse_console(c).last_wrote_seq.unwrap_or(0) > more_than
    });
    console_seq(host, vm)
}

fn list(host: &Host, vm: &str) -> Value {
    host.ferry_json(&["checkpoint", "list", vm])
}

fn cp_id(list: &Value, name: &str) -> i64 {
    list["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no checkpoint {name} in {list}"))["id"]
        .as_i64()
        .unwrap()
}

fn names(list: &Value) -> Vec<String> {
    list["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Takes a production checkpoint of the running VM and returns the guest's FROZEN seq.
fn production_checkpoint(host: &Host, vm: &str, name: &str) -> u64 {
    let frozen_before = parse_console(&host.console(vm)).frozen.len();
    let out = host.ferry_ok(&["checkpoint", "create", vm, name]);
    assert!(out.contains("guest filesystems were frozen"), "{out}");
    let c = host.wait_console(vm, Duration::from_secs(10), "FROZEN", |c| {
        parse_console(c).frozen.len() > frozen_before
    });
    *parse_console(&c).frozen.last().unwrap()
}

#[test]
fn checkpoints_create_apply_delete_export_on_a_real_guest() {
    let host = Host::start("cp", "127.0.0.1", "accel = \"tcg\"");
    create_guest_vm(&host, "app", "16M");

    // Bad input first: nothing may be created.
    let e = host.ferry_err(&["checkpoint", "create", "nosuch"]);
    assert!(e.contains("no VM named \"nosuch\""), "{e}");
    let e = host.ferry_err(&["checkpoint", "create", "app", &"x".repeat(101)]);
    assert!(e.contains("at most 100 characters"), "{e}");
    let e = host.ferry_err(&["checkpoint", "create", "app", ""]);
    assert!(e.contains("cannot be empty"), "{e}");
    assert!(names(&list(&host, "app")).is_empty());
    assert!(host
        .ferry_ok(&["checkpoint", "list", "app"])
        .contains("no checkpoints"));

    host.ferry_ok(&["vm", "start", "app"]);
    let s = wait_writes(&host, "app", 10);

    // Two production checkpoints while the guest writes: each holds exactly the writes up
    // to the guest's freeze.
    let f1 = production_checkpoint(&host, "app", "one");
    wait_writes(&host, "app", f1 + 10);
    let f2 = production_checkpoint(&host, "app", "two");
    assert!(f1 >= s && f2 > f1, "{f1} {f2}");
    wait_writes(&host, "app", f2 + 10);

    // A standard checkpoint: memory and device state.
    let before = console_seq(&host, "app");
    let out = host.ferry_ok(&["checkpoint", "create", "app", "three", "--standard"]);
    assert!(out.contains("memory and device state saved"), "{out}");
    let after = console_seq(&host, "app");
    let l = list(&host, "app");
    let (one, two, three) = (cp_id(&l, "one"), cp_id(&l, "two"), cp_id(&l, "three"));
    assert_eq!(l["checkpoints"][0]["parent_id"], Value::Null);
    assert_eq!(l["checkpoints"][1]["parent_id"], one);
    assert_eq!(l["checkpoints"][2]["parent_id"], two);
    assert_eq!(l["checkpoints"][0]["consistency"], "application-consistent");
    assert_eq!(l["checkpoints"][2]["consistency"], "saved-state");
    assert_eq!(l["current"], three);
    wait_writes(&host, "app", after + 10);

    // Apply "one" to the running VM: it is turned off and its disk holds exactly the
    // writes up to the first freeze.
    let out = host.ferry_ok(&["checkpoint", "apply", "app", "one"]);
    assert!(out.contains("is at checkpoint \"one\" and off"), "{out}");
    assert_eq!(host.vm_state("app"), "off");
    assert_eq!(disk_seq(&vm_disk(&host, "app")), f1);
    assert_eq!(list(&host, "app")["current"], one);

    // A checkpoint of the VM while off hangs under "one": a branch.
    let out = host.ferry_ok(&["checkpoint", "create", "app", "four"]);
    assert!(out.contains("taken while the VM was off"), "{out}");
    let l = list(&host, "app");
    let four = cp_id(&l, "four");
    assert_eq!(l["checkpoints"][3]["parent_id"], one);
    let tree = host.ferry_ok(&["checkpoint", "list", "app"]);
    assert!(
        tree.contains("one [")
            && tree.contains("\n  two [")
            && tree.contains("\n    three [")
            && tree.contains("\n  four [")
            && tree.contains("\n    Now"),
        "{tree}"
    );

    // Delete "two": "three" (below it) moves up to "one" and stays applicable.
    host.ferry_ok(&["checkpoint", "delete", "app", "two"]);
    let l = list(&host, "app");
    assert_eq!(names(&l), ["one", "three", "four"]);
    assert_eq!(l["checkpoints"][1]["parent_id"], one);

    // Apply the standard checkpoint: the guest resumes its write sequence where it was
    // (no new boot), on a disk that matches its memory.
    let log_len = host.console("app").len();
    let out = host.ferry_ok(&["checkpoint", "apply", "app", "three"]);
    assert!(out.contains("resumed from checkpoint \"three\""), "{out}");
    assert_eq!(host.vm_state("app"), "running");
    let tail = |h: &Host| h.console("app")[log_len..].to_owned();
    wait_for("writes after resuming", Duration::from_secs(60), || {
        parse_console(&tail(&host)).last_wrote_seq.is_some()
    });
    let resumed = tail(&host);
    assert!(
        !parse_console(&resumed).ready,
        "the guest booted again:\n{resumed}"
    );
    let first = resumed
        .lines()
        .find_map(|l| l.split("GUEST: WROTE seq=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .expect("a WROTE line");
    assert!(
        (before + 1..=after + 1).contains(&first),
        "resumed at write {first}, the checkpoint was taken between writes {before} and {after}"
    );
    let n = wait_writes(&host, "app", first + 5);
    host.ferry_ok(&["vm", "pause", "app"]);
    let on_disk = disk_seq(&vm_disk(&host, "app"));
    assert!(on_disk >= n, "{on_disk} < {n}");
    host.ferry_ok(&["vm", "resume", "app"]);

    // A subtree below "three": five (running) and six; delete --subtree five.
    production_checkpoint(&host, "app", "five");
    production_checkpoint(&host, "app", "six");
    let out = host.ferry_ok(&["checkpoint", "delete", "app", "five", "--subtree"]);
    assert!(out.contains("and the 1 below it deleted"), "{out}");
    assert_eq!(names(&list(&host, "app")), ["one", "three", "four"]);
    // "four" is still applicable and holds exactly the first freeze's writes. Applied with
    // --checkpoint-first, the running state is saved first, under Hyper-V's default name,
    // below "three" (where the VM was).
    let running_seq = console_seq(&host, "app");
    let out = host.ferry_ok(&["checkpoint", "apply", "app", "four", "--checkpoint-first"]);
    assert!(
        out.contains("the state before was saved as checkpoint \"app ("),
        "{out}"
    );
    assert_eq!(disk_seq(&vm_disk(&host, "app")), f1);
    let l = list(&host, "app");
    assert_eq!(l["current"], four);
    let saved = &l["checkpoints"][3];
    let saved_name = saved["name"].as_str().unwrap().to_owned();
    assert_eq!(saved["parent_id"], three, "{l}");
    // "app (MM/DD/YYYY - hh:mm:ss AM/PM)"
    let stamp = saved_name
        .strip_prefix("app (")
        .unwrap()
        .strip_suffix(')')
        .unwrap();
    let b = stamp.as_bytes();
    assert!(
        stamp.len() == 24
            && b[2] == b'/'
            && b[5] == b'/'
            && &stamp[10..13] == " - "
            && (stamp.ends_with("AM") || stamp.ends_with("PM")),
        "{saved_name}"
    );

    // Every step is in the event log.
    let events = host.ferry_ok(&["events", "--vm", "app", "--last", "100"]);
    for kind in [
        "checkpoint_created",
        "checkpoint_applied",
        "checkpoint_deleted",
    ] {
        assert!(events.contains(kind), "no {kind} event:\n{events}");
    }

    // Rename; bad renames change nothing.
    host.ferry_ok(&["checkpoint", "rename", "app", "four", "four renamed"]);
    let e = host.ferry_err(&["checkpoint", "rename", "app", "four renamed", ""]);
    assert!(e.contains("cannot be empty"), "{e}");
    let e = host.ferry_err(&["checkpoint", "rename", "app", "nosuch", "x"]);
    assert!(e.contains("has no checkpoint \"nosuch\""), "{e}");
    let e = host.ferry_err(&["checkpoint", "apply", "app", "nosuch"]);
    assert!(e.contains("has no checkpoint \"nosuch\""), "{e}");
    assert_eq!(
        names(&list(&host, "app")),
        ["one", "three", "four renamed", saved_name.as_str()]
    );
    assert_eq!(list(&host, "app")["current"], four);

    // The checkpoint saved before that apply holds the state the VM had then.
    host.ferry_ok(&["checkpoint", "apply", "app", &saved_name]);
    assert!(disk_seq(&vm_disk(&host, "app")) >= running_seq);

    // Export "three" and import it as a new VM: its disk is the checkpoint's, and it boots.
    let export = host.dir.path().join("export-three");
    let out = host.ferry_ok(&[
        "checkpoint",
        "export",
        "app",
        "three",
        export.to_str().unwrap(),
    ]);
    assert!(out.contains("ferry vm import"), "{out}");
    let e = host.ferry_err(&[
        "checkpoint",
        "export",
        "app",
        "three",
        export.to_str().unwrap(),
    ]);
    assert!(e.contains("is not empty"), "{e}");
    let exported = disk_seq(&export.join("disk0.qcow2"));
    assert!((before..=after + 1).contains(&exported), "{exported}");
    let e = host.ferry_err(&["vm", "import", host.dir.path().to_str().unwrap()]);
    assert!(e.contains("is not a Ferry export"), "{e}");
    host.ferry_ok(&["vm", "import", export.to_str().unwrap(), "--name", "copy"]);
    assert_eq!(disk_seq(&vm_disk(&host, "copy")), exported);
    host.ferry_ok(&["vm", "start", "copy"]);
    host.wait_console(
        "copy",
        Duration::from_secs(60),
        "the imported VM boots and writes",
        |c| {
            let r = parse_console(c);
            r.ready && r.last_wrote_seq.is_some()
        },
    );
    host.ferry_ok(&["vm", "stop", "copy"]);
    assert!(names(&list(&host, "copy")).is_empty());

    // Another checkpoint operation running: apply is refused, nothing changes. A long
    // export (1 GiB of data) is the operation.
    let big = host.dir.path().join("big.qcow2");
    let big_s = big.to_str().unwrap();
    run(&["qemu-img", "create", "-q", "-f", "qcow2", big_s, "1G"]);
    run(&["qemu-io", "-c", "write -P 7 0 1G", big_s]);
    host.ferry_ok(&["vm", "create", "big", "--memory", "64M", "--disk", big_s]);
    host.ferry_ok(&["checkpoint", "create", "big", "full"]);
    // The export may end before the refusal or the progress is seen on a busy machine:
    // then it runs again, into a new folder.
    let (mut refused, mut progress) = (None, Value::Null);
    let mut attempt = 0;
    let big_export = loop {
        attempt += 1;
        assert!(attempt <= 5, "never saw the export running");
        let dir = host.dir.path().join(format!("export-big-{attempt}"));
        let mut cli =
            host.ferry_cmd(&["checkpoint", "export", "big", "full", dir.to_str().unwrap()]);
        let exporting = std::thread::spawn(move || cli.output().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.join("disk0.qcow2").exists() {
            assert!(Instant::now() < deadline, "the export did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        if refused.is_none() {
            let r = host.ferry(&["checkpoint", "apply", "big", "full"]);
            if r.code != 0 {
                refused = Some(r.stderr.trim().to_owned());
            }
        }
        if progress.is_null() {
            progress = list(&host, "big")["progress"].clone();
        }
        let done = exporting.join().unwrap();
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        if refused.is_some() && !progress.is_null() {
            break dir;
        }
    };
    let e = refused.unwrap();
    assert!(
        e.contains("another checkpoint operation (export) is running on VM big")
            && e.lines().count() == 1,
        "{e}"
    );
    // The API showed the export's progress meanwhile.
    assert_eq!(progress["phase"], "exporting", "{progress}");
    assert_eq!(progress["total_bytes"], 1u64 << 30, "{progress}");
    assert_eq!(
        list(&host, "big")["current"],
        cp_id(&list(&host, "big"), "full")
    );
    assert!(big_export.join("ferry-export.json").exists());
    assert!(list(&host, "big")["progress"].is_null());

    // On a terminal, the CLI draws a progress bar while the export runs (again if the
    // export ended before the first redraw).
    let ferry = ferry_testkit::bin_dir().join("ferry");
    let bar = (1..=3).any(|attempt| {
        let tty_export = host.dir.path().join(format!("export-big-tty-{attempt}"));
        let out = Command::new("script")
            .args(["-qec"])
            .arg(format!(
                "{} checkpoint export big full {}",
                ferry.display(),
                tty_export.display()
            ))
            .arg("/dev/null")
            .env("FERRY_SOCKET", &host.socket)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("exported to"), "{text}");
        let _ = std::fs::remove_dir_all(&tty_export);
        text.contains("exporting [#") && text.contains('%')
    });
    assert!(bar, "no progress bar was drawn");

    // A checkpoint removed from the disk outside Ferry: apply refuses, the disk is kept.
    let disk = vm_disk(&host, "big");
    run(&["qemu-io", "-c", "write -P 9 0 64k", disk.to_str().unwrap()]);
    let tag = String::from_utf8(
        Command::new("qemu-img")
            .args(["snapshot", "-l", disk.to_str().unwrap()])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .split_whitespace()
    .find(|w| w.starts_with("ferry-cp-"))
    .expect("the checkpoint's internal snapshot")
    .to_owned();
    run(&["qemu-img", "snapshot", "-d", &tag, disk.to_str().unwrap()]);
    let e = host.ferry_err(&["checkpoint", "apply", "big", "full"]);
    assert!(
        e.contains("is missing from") && e.contains("nothing was changed"),
        "{e}"
    );
    run(&["qemu-io", "-c", "read -P 9 0 64k", disk.to_str().unwrap()]);
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The newest point of `vm` on `host` whose cycle is above `cycle`, once it exists.
fn point_after(host: &Host, vm: &str, cycle: i64) -> Value {
    let mut found = None;
    wait_for(
        "a recovery point after the apply",
        Duration::from_secs(90),
        || {
            found = points(host, vm)
                .into_iter()
                .find(|p| p["cycle"].as_i64().unwrap() > cycle);
            found.is_some()
        },
    );
    found.unwrap()
}

fn identical(a: &Path, b: &Path) {
    if let Err(diff) = compare_images(a, b) {
        panic!("{} and {} differ: {diff}", a.display(), b.display());
    }
}

#[test]
fn checkpoints_on_a_replicated_vm_keep_the_replica_consistent() {
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    enable_replica_server(&b, "127.0.0.2");
    create_guest_vm(&a, "app", "64M");
    a.ferry_ok(&["vm", "start", "app"]);
    wait_writes(&a, "app", 3);
    a.ferry_ok(&[
        "replication",
        "enable",
        "app",
        "--to",
        b.socket.to_str().unwrap(),
        "--interval",
        "5s",
        "--recovery-points",
        "12",
        "--point-spacing",
        "1s",
        "--wait",
    ]);
    wait_for("two points", Duration::from_secs(90), || {
        points(&b, "app").len() >= 2
    });

    // A checkpoint of the replicated VM; replication keeps going.
    let f = production_checkpoint(&a, "app", "base");
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    wait_for("two more cycles", Duration::from_secs(90), || {
        let st = status(&a, "app");
        st["state"] == "replicating" && st["last_cycle"].as_i64().unwrap() >= cycle + 2
    });
    // Checkpoints and recovery points never mix: the primary lists one checkpoint, the
    // replica refuses checkpoints and lists its recovery points apart.
    assert_eq!(names(&list(&a, "app")), ["base"]);
    let e = b.ferry_err(&["checkpoint", "list", "app"]);
    assert!(
        e.contains("is a replica") && e.contains("ferry replication points app"),
        "{e}"
    );
    let e = b.ferry_err(&["checkpoint", "create", "app", "x"]);
    assert!(e.contains("is a replica"), "{e}");
    assert!(points(&b, "app").iter().all(|p| p.get("name").is_none()));

    // The guest writes on; then the checkpoint is applied. Only what it changed ships, as
    // a delta, and the replica ends byte-identical to the primary.
    wait_writes(&a, "app", f + 40);
    let out = a.ferry_ok(&["checkpoint", "apply", "app", "base"]);
    assert!(
        out.contains("replication sends the") && out.contains("no resynchronization"),
        "{out}"
    );
    assert_eq!(disk_seq(&vm_disk(&a, "app")), f);
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    let p = point_after(&b, "app", cycle);
    // The apply reports what differs (the blocks written since the checkpoint, which
    // go back to what they held then: mostly zeros here, shipped as zero extents).
    let kib: u64 = out
        .split("replication sends the ")
        .nth(1)
        .and_then(|r| r.split(" KiB").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in {out:?}"));
    let bytes = p["bytes"].as_u64().unwrap();
    println!(
        "applying the checkpoint changed {kib} KiB; the next cycle sent {bytes} data bytes ({})",
        p["kind"]
    );
    assert_eq!(p["kind"], "delta", "{p}");
    assert!(
        kib > 0 && kib < 4 << 10,
        "{kib} KiB changed on a 64 MiB disk"
    );
    assert!(bytes < 4 << 20, "{bytes} bytes for a 64 MiB disk");
    assert_eq!(disk_seq(&layer(&p)), f);
    identical(&layer(&p), &vm_disk(&a, "app"));
    assert_eq!(status(&a, "app")["state"], "replicating");

    // A standard checkpoint of the replicated VM, applied while it runs: the VM resumes
    // from its saved state with change tracking re-armed before its vCPUs run, so
    // replication goes on with deltas and the replica still ends byte-identical.
    a.ferry_ok(&["vm", "start", "app"]);
    wait_writes(&a, "app", 5);
    let out = a.ferry_ok(&["checkpoint", "create", "app", "saved", "--standard"]);
    assert!(out.contains("memory and device state saved"), "{out}");
    let seq = wait_writes(&a, "app", console_seq(&a, "app") + 20);
    let out = a.ferry_ok(&["checkpoint", "apply", "app", "saved"]);
    assert!(
        out.contains("resumed from checkpoint \"saved\"") && out.contains("no resynchronization"),
        "{out}"
    );
    assert!(a
        .log_text()
        .contains("change tracking restored on the resumed VM"));
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    point_after(&b, "app", cycle + 1);
    a.ferry_ok(&["vm", "stop", "app"]);
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    let p = point_after(&b, "app", cycle);
    let st = status(&a, "app");
    assert_eq!(st["state"], "replicating", "{st}");
    assert!(
        points(&b, "app")
            .iter()
            .all(|p| p["kind"] == "delta" || p["kind"] == "initial"),
        "a resync happened"
    );
    identical(&layer(&p), &vm_disk(&a, "app"));
    assert!(disk_seq(&vm_disk(&a, "app")) > 0);
    assert!(seq > 0);

    // Applying after QEMU was killed (its change tracking is inconsistent): what differs
    // from the replica cannot be known, so the relationship asks for a resync, clearly.
    a.ferry_ok(&["vm", "start", "app"]);
    wait_writes(&a, "app", 5);
    let pid = a.ferry_json(&["vm", "show", "app"])["pid"]
        .as_u64()
        .unwrap() as i32;
    // SAFETY: kill(2) of the test's own QEMU.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("the VM is off", Duration::from_secs(20), || {
        a.vm_state("app") == "off"
    });
    let out = a.ferry_ok(&["checkpoint", "apply", "app", "base"]);
    assert!(
        out.contains("resynchronization required") && out.contains("--resync"),
        "{out}"
    );
    assert_eq!(status(&a, "app")["state"], "resynchronization_required");
    a.ferry_ok(&["replication", "resume", "app", "--resync"]);
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    let p = point_after(&b, "app", cycle);
    assert_eq!(p["kind"], "resync", "{p}");
    identical(&layer(&p), &vm_disk(&a, "app"));
    assert_eq!(disk_seq(&layer(&p)), f);
}
