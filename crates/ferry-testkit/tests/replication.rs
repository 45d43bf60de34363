//! Replication between two real ferryd (127.0.0.1 → 127.0.0.2) of a real guest that writes
//! verifiable blocks: authorization, the replica VM, recovery points that are exact
//! prefixes of the guest's writes, retention, suspend/resume, the final byte-for-byte copy
//! and removal on each side.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_testkit::guest::{parse_console, verify_prefix, GuestWorkload};
use ferry_testkit::host::Host;
use ferry_testkit::replication::{
    compare_images, enable_replica_server, free_port, layer, points, quiesce, read_image, status,
    wait_for,
};
use serde_json::Value;

const SEED: u64 = 4242;
const SPAN: u64 = 4096; // 16 MiB of the 64 MiB disk

fn fingerprint(host: &Host) -> String {
    host.ferry_json(&["server", "show"])["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Verifies that a recovery point is exactly the guest's writes 1..=M; returns M.
fn verify_point(point: &Value) -> u64 {
    let data = read_image(&layer(point));
    match verify_prefix(&data, SEED, SPAN) {
        Ok(v) => v.last_seq,
        Err(e) => panic!("recovery point {point} is not a prefix of the guest's writes: {e}"),
    }
}

fn digest(data: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    h.finish()
}

fn health_of(host: &Host, vm: &str) -> Value {
    host.ferry_json(&["replication", "health", vm])[0].clone()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn replication_ships_exact_recovery_points_and_ends_byte_identical() {
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    let storage = b.dir.path().join("replicas");
    let storage_s = storage.to_str().unwrap();
    let b_socket = b.socket.to_str().unwrap();

    a.create_guest_vm(
        "app",
        GuestWorkload {
            seed: SEED,
            start: 1,
            span_blocks: SPAN,
        },
        0.1,
        &["--memory", "256M", "--disk", "64M"],
    );
    a.ferry_ok(&["vm", "start", "app"]);
    a.wait_console("app", Duration::from_secs(60), "guest writes", |c| {
        parse_console(c).last_wrote_seq.unwrap_or(0) >= 3
    });

    // 1. Authorization. Disabled, then enabled but with no rule for host a: refused on
    //    both sides with the reason, nothing stored on either.
    let err = a.ferry_err(&["replication", "enable", "app", "--to", b_socket]);
    assert!(err.contains("is not a replica server"), "{err}");
    // Tests run in parallel: a free replication port, not the default 7444.
    let port = free_port("127.0.0.2");
    b.ferry_ok(&["replica-server", "set", "--enable", "--port", &port]);
    let err = a.ferry_err(&["replication", "enable", "app", "--to", b_socket]);
    assert!(
        err.contains("not authorized to replicate to b")
            && err.contains(&format!("--allow a={}", fingerprint(&a))),
        "{err}"
    );
    assert!(b.log_text().contains("refused an unauthorized primary"));
    assert!(a.ferry_json(&["vm", "show", "app"])["replication"].is_null());
    assert_eq!(
        b.ferry_json(&["vm", "list"]).as_array().unwrap().len(),
        0,
        "a refused primary left a VM on the replica"
    );
    assert!(files_under(&storage).is_empty());
    // A certificate listed under another name is refused too.
    b.ferry_ok(&[
        "replica-server",
        "set",
        "--allow",
        &format!("impostor={}", fingerprint(&a)),
        "--storage",
        storage_s,
    ]);
    let err = a.ferry_err(&["replication", "enable", "app", "--to", b_socket]);
    assert!(
        err.contains("authorized on b as primary \"impostor\""),
        "{err}"
    );
    b.ferry_ok(&["replica-server", "set", "--disallow", "impostor"]);
    b.ferry_ok(&[
        "replica-server",
        "set",
        "--allow",
        &format!("a={}", fingerprint(&a)),
        "--storage",
        storage_s,
        "--trust-group",
        "site1",
    ]);

    // 2. Enable: the replica VM appears at once; the initial copy completes (--wait).
    let err = a.ferry_err(&[
        "replication",
        "enable",
        "app",
        "--to",
        b_socket,
        "--interval",
        "0s",
    ]);
    assert!(err.contains("use 1s to 24h"), "{err}");
    let out = a.ferry_ok(&[
        "replication",
        "enable",
        "app",
        "--to",
        b_socket,
        "--interval",
        "5s",
        "--recovery-points",
        "2",
        "--point-spacing",
        "5s",
        "--app-consistent-every",
        "5s",
        "--wait",
    ]);
    println!("{out}");
    let st = status(&a, "app");
    assert_eq!(st["state"], "replicating", "{st}");
    assert!(st["last_cycle"].as_i64().unwrap() >= 1);
    let list = b.ferry_json(&["vm", "list"]);
    assert_eq!(list[0]["name"], "app");
    assert_eq!(list[0]["replication"], "replica");
    let err = b.ferry_err(&["vm", "start", "app"]);
    assert!(err.contains("starts only through a failover"), "{err}");
    let bst = status(&b, "app");
    assert_eq!(bst["role"], "replica");
    assert_eq!(bst["partner"], "a");

    // 3. Cycles: every newest point is a prefix of the writes, and later points hold more;
    //    application-consistent points (every 5 s at most) match a freeze of the guest.
    let mut last_seq = 0;
    let mut app_points = std::collections::BTreeSet::new();
    for round in 0..3 {
        let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
        wait_for("a new cycle", Duration::from_secs(60), || {
            status(&a, "app")["last_cycle"].as_i64().unwrap() > cycle
        });
        quiesce(&a, &b, "app");
        assert_eq!(status(&a, "app")["state"], "suspended");
        let pts = points(&b, "app");
        assert!(!pts.is_empty() && pts.len() <= 3, "retention kept {pts:?}");
        let mut seqs = Vec::new();
        let frozen = parse_console(&a.console("app")).frozen;
        for p in &pts {
            let seq = verify_point(p);
            // An application-consistent point holds exactly the writes done when the
            // guest agent quiesced the guest (the FROZEN line), nothing after.
            if p["consistency"] == "application" {
                assert!(
                    frozen.contains(&seq),
                    "point {p} holds writes up to {seq}, the guest froze at {frozen:?}"
                );
                app_points.insert(p["id"].as_i64().unwrap());
            } else {
                assert_eq!(p["consistency"], "crash", "{p}");
            }
            seqs.push(seq);
        }
        println!(
            "round {round}: points {:?} hold writes up to {seqs:?}",
            pts.iter().map(|p| p["cycle"].clone()).collect::<Vec<_>>()
        );
        assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{seqs:?}");
        let newest = *seqs.last().unwrap();
        assert!(newest > last_seq, "no progress: {newest} after {last_seq}");
        last_seq = newest;
        a.ferry_ok(&["replication", "resume", "app"]);
    }
    assert!(
        !app_points.is_empty(),
        "no application-consistent point was taken"
    );
    // Test failover from the oldest point while cycles go on: the test VM boots isolated,
    // replication keeps adding points, and stopping the test leaves every point unchanged.
    quiesce(&a, &b, "app");
    let before: Vec<(i64, u64)> = points(&b, "app")
        .iter()
        .map(|p| (p["id"].as_i64().unwrap(), digest(&read_image(&layer(p)))))
        .collect();
    a.ferry_ok(&["replication", "resume", "app"]);
    let oldest = before[0].0.to_string();
    let out = b.ferry_ok(&["failover", "test", "app", "--point", &oldest]);
    assert!(out.contains("app-test"), "{out}");
    let err = b.ferry_err(&["failover", "test", "app"]);
    assert!(err.contains("is running"), "{err}");
    let err = b.ferry_err(&["replication", "remove", "app"]);
    assert!(err.contains("stop-test"), "{err}");
    let test_vm = b.ferry_json(&["vm", "show", "app-test"]);
    assert_eq!(test_vm["state"], "running", "{test_vm}");
    assert_eq!(
        test_vm["nics"].as_array().unwrap().len(),
        0,
        "not isolated: {test_vm}"
    );
    b.wait_console(
        "app-test",
        Duration::from_secs(60),
        "the test VM's writes",
        |c| parse_console(c).last_wrote_seq.unwrap_or(0) >= 2,
    );
    assert_eq!(health_of(&b, "app")["test_failover_status"], "running");
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    wait_for("cycles during the test", Duration::from_secs(60), || {
        status(&a, "app")["last_cycle"].as_i64().unwrap() >= cycle + 2
    });
    let out = b.ferry_ok(&["failover", "stop-test", "app"]);
    assert!(out.contains("unchanged"), "{out}");
    assert!(b
        .ferry_err(&["vm", "show", "app-test"])
        .contains("app-test"));
    let h = health_of(&b, "app");
    assert_eq!(h["test_failover_status"], "not running");
    assert!(h["last_test_failover_at"].as_i64().is_some(), "{h}");
    quiesce(&a, &b, "app");
    let after: Vec<(i64, u64)> = points(&b, "app")
        .iter()
        .map(|p| (p["id"].as_i64().unwrap(), digest(&read_image(&layer(p)))))
        .collect();
    for (id, d) in &before {
        if let Some((_, d2)) = after.iter().find(|(i, _)| i == id) {
            assert_eq!(
                d, d2,
                "recovery point {id} changed during the test failover"
            );
        }
    }
    assert!(
        after.iter().any(|(i, _)| i.to_string() == oldest),
        "the tested point was merged away while pinned"
    );
    a.ferry_ok(&["replication", "resume", "app"]);
    let report = parse_console(&a.console("app"));
    assert!(!report.is_frozen(), "the guest was left frozen");
    println!(
        "application-consistent points {app_points:?}; the guest froze at {:?}",
        report.frozen
    );
    // Retention: the latest point plus the newest of each of the 2 previous 5 s periods,
    // after a few cycles at the interval.
    std::thread::sleep(Duration::from_secs(16));
    quiesce(&a, &b, "app");
    let pts = points(&b, "app");
    let periods: Vec<i64> = pts
        .iter()
        .map(|p| p["taken_at"].as_i64().unwrap() / 5)
        .collect();
    assert_eq!(pts.len(), 3, "2 additional points + the latest: {pts:?}");
    assert!(periods.windows(2).all(|w| w[0] < w[1]), "{periods:?}");
    let seqs: Vec<u64> = pts.iter().map(verify_point).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] <= w[1]) && seqs[2] >= last_seq,
        "{seqs:?}"
    );
    a.ferry_ok(&["replication", "resume", "app"]);

    // 4. The guest stops; a final cycle makes the replica equal the primary.
    a.ferry_ok(&["vm", "stop", "app"]);
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    a.ferry_ok(&["replication", "now", "app"]);
    wait_for("the final cycle", Duration::from_secs(60), || {
        status(&a, "app")["last_cycle"].as_i64().unwrap() > cycle
    });
    quiesce(&a, &b, "app");
    let primary_disk = PathBuf::from(
        a.ferry_json(&["vm", "show", "app"])["disks"][0]["path"]
            .as_str()
            .unwrap(),
    );
    let newest = points(&b, "app").last().cloned().unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
        .arg(&primary_disk)
        .arg(layer(&newest))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replica differs from primary: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(verify_point(&newest) >= last_seq);

    // 5. Suspended on the replica side: the primary's cycles fail with the reason and
    //    what to do; resumed there, cycles go through again.
    a.ferry_ok(&["replication", "resume", "app"]);
    b.ferry_ok(&["replication", "suspend", "app"]);
    assert_eq!(status(&b, "app")["state"], "suspended");
    wait_for("the primary to notice", Duration::from_secs(60), || {
        status(&a, "app")["state"] == "error"
    });
    let err = status(&a, "app")["last_error"].as_str().unwrap().to_owned();
    assert!(
        err.contains("suspended on the replica server b") && err.contains("resume"),
        "{err}"
    );
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    b.ferry_ok(&["replication", "resume", "app"]);
    wait_for("cycles after the resume", Duration::from_secs(60), || {
        let st = status(&a, "app");
        st["state"] == "replicating" && st["last_cycle"].as_i64().unwrap() > cycle
    });

    // 6. Removed on the replica first: its VM and files go, and the primary is told (it is
    //    not silently re-created); then removed on the primary.
    quiesce(&a, &b, "app");
    b.ferry_ok(&["replication", "remove", "app"]);
    assert_eq!(b.ferry_json(&["vm", "list"]).as_array().unwrap().len(), 0);
    assert!(
        files_under(&storage).is_empty(),
        "left behind: {:?}",
        files_under(&storage)
    );
    a.ferry_ok(&["replication", "resume", "app"]);
    wait_for(
        "the primary to notice the removal",
        Duration::from_secs(60),
        || status(&a, "app")["state"] == "error",
    );
    let err = status(&a, "app")["last_error"].as_str().unwrap().to_owned();
    assert!(err.contains("b has no replica of app"), "{err}");
    assert_eq!(b.ferry_json(&["vm", "list"]).as_array().unwrap().len(), 0);
    a.ferry_ok(&["replication", "remove", "app"]);
    assert!(a.ferry_json(&["vm", "show", "app"])["replication"].is_null());
}

/// Initial replication from an existing copy on the replica (e.g. restored from a backup,
/// partly stale): refused with the path to use while the copy is missing, then only the
/// differing chunks are shipped, and the replica equals the primary. The VM stays off
/// (offline cycles), and its second disk is excluded.
#[test]
fn initial_copy_from_an_existing_copy_ships_only_differences() {
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    let storage = enable_replica_server(&b, "127.0.0.2");
    // 32 MiB of random data on a 64 MiB disk.
    let seed = a.dir.path().join("seed.qcow2");
    let raw = a.dir.path().join("seed.raw");
    let sh = |cmd: String| {
        let st = Command::new("sh").arg("-c").arg(&cmd).status().unwrap();
        assert!(st.success(), "{cmd}");
    };
    sh(format!(
        "truncate -s 64M {r} && dd if=/dev/urandom of={r} bs=1M count=32 conv=notrunc status=none && qemu-img convert -O qcow2 {r} {s} && rm {r}",
        r = raw.display(),
        s = seed.display()
    ));
    a.ferry_ok(&[
        "vm",
        "create",
        "seeded",
        "--disk",
        seed.to_str().unwrap(),
        "--disk",
        "8M",
    ]);
    let disk = PathBuf::from(
        a.ferry_json(&["vm", "show", "seeded"])["disks"][0]["path"]
            .as_str()
            .unwrap(),
    );
    let enable = [
        "replication",
        "enable",
        "seeded",
        "--to",
        b.socket.to_str().unwrap(),
        "--interval",
        "5s",
        "--initial",
        "existing",
        "--exclude-disk",
        "1",
        "--wait",
    ];

    // No copy on the replica yet: refused with where to put it; nothing stored.
    let copy = storage.join("seeded").join("disk0.qcow2");
    let err = a.ferry_err(&enable);
    assert!(
        err.contains("existing copy") && err.contains(copy.to_str().unwrap()),
        "{err}"
    );
    assert!(a.ferry_json(&["vm", "show", "seeded"])["replication"].is_null());
    assert_eq!(b.ferry_json(&["vm", "list"]).as_array().unwrap().len(), 0);

    // A stale copy: the primary then changes 2 MiB and zeroes 1 MiB.
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    std::fs::copy(&disk, &copy).unwrap();
    sh(format!(
        "qemu-io -f qcow2 -c 'write -P 0x61 5M 2M' -c 'write -z 20M 1M' {} >/dev/null",
        disk.display()
    ));
    a.ferry_ok(&enable);
    let st = status(&a, "seeded");
    assert_eq!(st["state"], "replicating", "{st}");
    let pts = points(&b, "seeded");
    assert_eq!(pts.len(), 1);
    assert_eq!(pts[0]["kind"], "initial");
    let shipped = pts[0]["bytes"].as_u64().unwrap();
    println!("initial copy from an existing copy shipped {shipped} bytes of 32 MiB");
    assert!(shipped <= 3 << 20, "shipped {shipped} bytes");
    assert_eq!(
        pts[0]["layers"].as_array().unwrap().len(),
        1,
        "the excluded disk was replicated"
    );
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
        .arg(&disk)
        .arg(layer(&pts[0]))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replica differs: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Removed on the primary only, then enabled again: the replica's points do not match a
    // new relationship, so it refuses (nothing stored here) instead of building on them.
    a.ferry_ok(&["replication", "remove", "seeded"]);
    let again = [
        "replication",
        "enable",
        "seeded",
        "--to",
        b.socket.to_str().unwrap(),
        "--interval",
        "5s",
        "--exclude-disk",
        "1",
    ];
    let err = a.ferry_err(&again);
    assert!(err.contains("re-created on one side"), "{err}");
    assert!(a.ferry_json(&["vm", "show", "seeded"])["replication"].is_null());
    // The replica VM has both disk slots; the excluded one is blank.
    let show = b.ferry_json(&["vm", "show", "seeded"]);
    assert_eq!(show["disks"].as_array().unwrap().len(), 2, "{show}");
    assert!(show["disks"][1]["path"]
        .as_str()
        .unwrap()
        .ends_with("disk1.excluded.qcow2"));
}

/// Initial replication by export to a folder, carried over, and imported on the replica:
/// the primary waits ("pending initial replication") until the import; a damaged copy of
/// the export is refused with nothing made visible; another VM's export is refused; after
/// the import, delta cycles run over the network and the replica equals the primary.
#[test]
fn initial_copy_by_export_and_import() {
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    enable_replica_server(&b, "127.0.0.2");
    let sh = |cmd: String| {
        let st = Command::new("sh").arg("-c").arg(&cmd).status().unwrap();
        assert!(st.success(), "{cmd}");
    };
    let seed = a.dir.path().join("seed.qcow2");
    let raw = a.dir.path().join("seed.raw");
    sh(format!(
        "truncate -s 32M {r} && dd if=/dev/urandom of={r} bs=1M count=12 conv=notrunc status=none && qemu-img convert -O qcow2 {r} {s} && rm {r}",
        r = raw.display(),
        s = seed.display()
    ));
    a.ferry_ok(&["vm", "create", "carried", "--disk", seed.to_str().unwrap()]);
    let disk = PathBuf::from(
        a.ferry_json(&["vm", "show", "carried"])["disks"][0]["path"]
            .as_str()
            .unwrap(),
    );
    let export = a.dir.path().join("usb-drive");
    let err = a.ferry_err(&[
        "replication",
        "enable",
        "carried",
        "--to",
        b.socket.to_str().unwrap(),
        "--initial",
        "export:relative/dir",
    ]);
    assert!(err.contains("absolute path"), "{err}");
    a.ferry_ok(&[
        "replication",
        "enable",
        "carried",
        "--to",
        b.socket.to_str().unwrap(),
        "--interval",
        "5s",
        "--initial",
        &format!("export:{}", export.display()),
        "--recovery-points",
        "24",
        "--point-spacing",
        "1s",
        "--wait",
    ]);
    let st = status(&a, "carried");
    assert_eq!(st["state"], "waiting_for_initial_replication", "{st}");
    assert_eq!(st["state_label"], "Pending Initial Replication");
    let folder = export.join("carried");
    assert!(folder.join("export.json").is_file() && folder.join("initial.ferry").is_file());
    // The primary keeps waiting (and changes go on being tracked) until the import.
    sh(format!(
        "qemu-io -f qcow2 -c 'write -P 0x33 20M 1M' {} >/dev/null",
        disk.display()
    ));
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        status(&a, "carried")["state"],
        "waiting_for_initial_replication"
    );
    assert!(points(&b, "carried").is_empty());

    // "Carried" to the replica: a damaged copy is refused, nothing visible.
    let carried = b.dir.path().join("from-usb");
    sh(format!("cp -r {} {}", folder.display(), carried.display()));
    let data = carried.join("initial.ferry");
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();
    let err = b.ferry_err(&[
        "replication",
        "import",
        "carried",
        carried.to_str().unwrap(),
    ]);
    assert!(err.contains("checksum") || err.contains("corrupt"), "{err}");
    assert!(points(&b, "carried").is_empty());
    // A truncated copy too.
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes[..bytes.len() - 100]).unwrap();
    let err = b.ferry_err(&[
        "replication",
        "import",
        "carried",
        carried.to_str().unwrap(),
    ]);
    assert!(err.contains("incomplete"), "{err}");
    // Importing on the primary is refused.
    let err = a.ferry_err(&["replication", "import", "carried", folder.to_str().unwrap()]);
    assert!(err.contains("primary"), "{err}");

    // The intact copy imports; the primary notices, then ships the changes made since.
    sh(format!(
        "cp {} {}",
        folder.join("initial.ferry").display(),
        data.display()
    ));
    let out = b.ferry_ok(&[
        "replication",
        "import",
        "carried",
        carried.to_str().unwrap(),
    ]);
    println!("{out}");
    let pts = points(&b, "carried");
    assert_eq!(pts.len(), 1);
    assert_eq!(pts[0]["kind"], "initial");
    // A second import (a retry) is refused and leaves the imported point intact.
    let err = b.ferry_err(&[
        "replication",
        "import",
        "carried",
        carried.to_str().unwrap(),
    ]);
    assert!(err.contains("already has recovery points"), "{err}");
    assert!(layer(&pts[0]).exists());
    wait_for(
        "delta cycles after the import",
        Duration::from_secs(60),
        || {
            let st = status(&a, "carried");
            st["state"] == "replicating" && st["last_cycle"].as_i64().unwrap() >= 2
        },
    );
    quiesce(&a, &b, "carried");
    let newest = points(&b, "carried").last().cloned().unwrap();
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
        .arg(&disk)
        .arg(layer(&newest))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replica differs: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Only the 1 MiB changed after the export went over the network.
    let net: u64 = points(&b, "carried")
        .iter()
        .filter(|p| p["kind"] == "delta")
        .map(|p| p["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(net, 1 << 20, "bytes sent after the import");
}

/// The host-wide replication bandwidth limit follows the time-of-day schedule in the config
/// (local time): a window covering now sets it, outside any window the default applies.
#[test]
fn bandwidth_schedule_sets_the_host_limit_by_time_of_day() {
    let out = Command::new("date").arg("+%H %M").output().unwrap();
    let now: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    let minute = now[0] * 60 + now[1];
    let hm = |m: u32| format!("{:02}:{:02}", (m % 1440) / 60, m % 60);
    // A window from 5 minutes ago to an hour ahead, and one that is not in force now.
    let current = format!("{}-{}=3M", hm(minute + 1435), hm(minute + 60));
    let later = format!("{}-{}=unlimited", hm(minute + 120), hm(minute + 180));
    let a = Host::start(
        "a",
        "127.0.0.1",
        &format!(
            "replication_bandwidth_limit = \"9M\"\nreplication_bandwidth_schedule = [\"{current}\", \"{later}\"]"
        ),
    );
    let s = a.ferry_json(&["server", "show"]);
    assert_eq!(s["replication_bandwidth_limit"], 3 << 20, "{s}");
    assert_eq!(
        s["replication_bandwidth_schedule"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(a
        .ferry_ok(&["server", "show"])
        .contains("outgoing limit 3.0 MiB/s now"));
    let b = Host::start(
        "b",
        "127.0.0.2",
        &format!(
            "replication_bandwidth_limit = \"9M\"\nreplication_bandwidth_schedule = [\"{later}\"]"
        ),
    );
    assert_eq!(
        b.ferry_json(&["server", "show"])["replication_bandwidth_limit"],
        9 << 20
    );
}

/// The primary's spool is bounded by the free space where it lives, but a cycle is not: one
/// larger than that space (here an initial copy of 64 MiB with 44 MiB usable) streams to the
/// replica without a spool (ADR 0004) and arrives whole. An initial copy carried by hand
/// (export) has no stream: it still fails up front with a clear message, nothing spooled,
/// and succeeds once there is room.
#[test]
fn a_cycle_larger_than_the_spools_free_space_streams_without_it() {
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    enable_replica_server(&b, "127.0.0.2");
    let sh = |cmd: String| {
        let st = Command::new("sh").arg("-c").arg(&cmd).status().unwrap();
        assert!(st.success(), "{cmd}");
    };
    let seed = a.dir.path().join("seed.qcow2");
    let raw = a.dir.path().join("seed.raw");
    sh(format!(
        "truncate -s 96M {r} && dd if=/dev/urandom of={r} bs=1M count=64 conv=notrunc status=none && qemu-img convert -O qcow2 {r} {s} && rm {r}",
        r = raw.display(),
        s = seed.display()
    ));
    a.ferry_ok(&["vm", "create", "big", "--disk", seed.to_str().unwrap()]);
    a.ferry_ok(&["vm", "create", "carried", "--disk", seed.to_str().unwrap()]);
    // The spool directory on a 300 MiB tmpfs: 256 MiB stay in reserve, 44 MiB usable.
    let spool = a.data_dir.join("spool");
    let mut mounted = Some(ferry_testkit::tmpfs::Tmpfs::mount(
        &spool,
        "300M",
        "ferry-spool",
    ));
    a.ferry_ok(&[
        "replication",
        "enable",
        "big",
        "--to",
        b.socket.to_str().unwrap(),
        "--interval",
        "5s",
        "--no-compression",
    ]);
    wait_for("the initial copy", Duration::from_secs(120), || {
        status(&a, "big")["last_cycle"].as_i64().unwrap() >= 1
    });
    assert!(
        a.log_text().contains("it streams without a spool"),
        "the initial copy did not stream without a spool"
    );
    let st = status(&a, "big");
    assert!(st["last_error"].is_null(), "{st}");
    let disk = PathBuf::from(
        a.ferry_json(&["vm", "show", "big"])["disks"][0]["path"]
            .as_str()
            .unwrap(),
    );
    let point = points(&b, "big").pop().expect("the initial point");
    compare_images(&disk, &layer(&point)).expect("the unspooled initial copy differs");

    // Exported by hand: refused up front, nothing spooled.
    let export = a.dir.path().join("usb-drive");
    a.ferry_ok(&[
        "replication",
        "enable",
        "carried",
        "--to",
        b.socket.to_str().unwrap(),
        "--interval",
        "5s",
        "--no-compression",
        "--initial",
        &format!("export:{}", export.display()),
    ]);
    wait_for("the refused export", Duration::from_secs(30), || {
        !status(&a, "carried")["last_error"].is_null()
    });
    let st = status(&a, "carried");
    let err = st["last_error"].as_str().unwrap();
    assert!(
        err.contains("may spool up to 64 MiB") && err.contains("free space there"),
        "{st}"
    );
    assert!(
        files_under(&export).is_empty(),
        "a refused export wrote {:?}",
        files_under(&export)
    );
    // Room again: the retry writes the export.
    drop(mounted.take());
    wait_for("the export", Duration::from_secs(60), || {
        status(&a, "carried")["state"] == "waiting_for_initial_replication"
    });
    assert!(!files_under(&export).is_empty(), "nothing was exported");
}
