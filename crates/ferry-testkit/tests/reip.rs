//! Re-IP on failover (Hyper-V's "Failover TCP/IP") on the real Debian guest: a UEFI q35 VM
//! made from the installed disk gets a replica-site address for its NIC (bad ones refused,
//! nothing changed), is replicated with it, and after a planned failover with start on the
//! replica server its qemu-guest-agent is told to configure it; `ferry vm exec` then shows
//! the addresses inside the guest, the DNS server in its resolver, a guest that reached
//! multi-user with nothing failed, and the guest answering ping on its replica-site address
//! from the replica side's network (a bridge and a network namespace of the test's own);
//! the reverse replication back to the old primary then takes application-consistent points
//! through the real guest's agent (fsfreeze), and a test failover there, on the replica
//! side's isolated test network, reaches multi-user and answers on its test failover IP.
//! Then the failback: a file written in the guest on the replica side, a shutdown, a planned
//! failover back to the old primary with reverse replication, and the file is there. Last
//! the unplanned failover: an SQLite workload runs in the guest, a crash-consistent point
//! reaches the replica server, the primary site dies (ferryd and QEMU SIGKILLed), and the
//! forced failover to that point boots: the boot's fsck of the root says clean, the
//! guest reaches multi-user, the database passes its integrity check with rows 1..N and no
//! gap, and after a shutdown `e2fsck -f` of the failed-over disk finds nothing to fix.

use std::process::Command;
use std::time::{Duration, Instant};

use ferry_testkit::debian::{debian_image, fsck_root};
use ferry_testkit::host::{CliResult, Host};
use ferry_testkit::replication::{enable_replica_server, points, wait_for};
use serde_json::Value;

/// The replica site's address of the guest's NIC (on QEMU's user-mode network 10.0.2.0/24,
/// where DHCP would give 10.0.2.15).
const ADDR: &str = "10.0.2.77/24";

/// The replica site's network on the bridge NIC: the test's own bridge (no uplink), and a
/// network namespace of its own plugged into it by a veth pair, holding 10.77.0.1/24, from
/// where the guest is pinged. Both go when the test ends, even on failure.
struct SiteNet {
    bridge: String,
    netns: String,
}

/// The guest's address on the replica site's network.
const SITE_ADDR: &str = "10.77.0.5/24";

impl SiteNet {
    /// A bridge and a namespace holding `host_addr` (e.g. 10.77.0.1/24) on it; `tag` keeps
    /// the names of two networks of one test apart.
    fn create(tag: char, host_addr: &str) -> Self {
        let id = std::process::id() % 100000;
        let net = SiteNet {
            bridge: format!("fr{tag}{id}"),
            netns: format!("ferry-reip{tag}-{id}"),
        };
        let (va, vb) = (format!("fv{tag}{id}a"), format!("fv{tag}{id}b"));
        // Left over by a killed run of this test (same pid), if any.
        for args in [["link", "del", &net.bridge], ["netns", "del", &net.netns]] {
            let _ = Command::new("ip")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status();
        }
        run(&["link", "add", &net.bridge, "type", "bridge"]);
        run(&["link", "set", &net.bridge, "up"]);
        run(&["netns", "add", &net.netns]);
        run(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        run(&["link", "set", &va, "master", &net.bridge]);
        run(&["link", "set", &va, "up"]);
        run(&["link", "set", &vb, "netns", &net.netns]);
        for args in [
            vec!["addr", "add", host_addr, "dev", vb.as_str()],
            vec!["link", "set", vb.as_str(), "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut all = vec!["netns", "exec", net.netns.as_str(), "ip"];
            all.extend(args);
            run(&all);
        }
        // qemu-bridge-helper only attaches taps to bridges its ACL allows.
        std::fs::create_dir_all("/etc/qemu").unwrap();
        let conf = std::path::Path::new("/etc/qemu/bridge.conf");
        let allow = format!("allow {}", net.bridge);
        let text = std::fs::read_to_string(conf).unwrap_or_default();
        if !text.lines().any(|l| l.trim() == allow) {
            std::fs::write(conf, format!("{text}{allow}\n")).unwrap();
        }
        net
    }
}

impl Drop for SiteNet {
    fn drop(&mut self) {
        // The veth goes with the namespace.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

fn run(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?} failed");
}

/// Waits for `vm`'s guest agent to answer, then returns what `systemctl
/// is-system-running --wait` said (the system's state once its boot has finished).
fn system_state(host: &Host, vm: &str, what: &str) -> CliResult {
    let mut r = None;
    wait_for(what, Duration::from_secs(400), || {
        let out = host.ferry(&[
            "vm",
            "exec",
            vm,
            "--timeout",
            "120",
            "--",
            "/usr/bin/systemctl",
            "is-system-running",
            "--wait",
        ]);
        // Anything but "no agent yet" ends the wait; the caller checks the state.
        let answered = !out.stderr.contains("guest agent did not answer");
        r = Some(out);
        answered
    });
    r.expect("an answer")
}

fn events(host: &Host) -> Vec<Value> {
    host.ferry_json(&["events", "--vm", "app", "--last", "200"])
        .as_array()
        .expect("a list of events")
        .clone()
}

#[test]
fn failover_ip_is_applied_in_the_real_guest_through_its_agent() {
    let disk = debian_image()
        .installed_disk()
        .unwrap_or_else(|e| panic!("{e:#}"));
    let net = SiteNet::create('b', "10.77.0.1/24");
    // The replica side's isolated test network, for test failovers.
    let test_net = SiteNet::create('t', "10.88.0.1/24");
    let mut a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    // The replica server maps the primary's bridge onto its default bridge at failover.
    let b = Host::start(
        "b",
        "127.0.0.2",
        &format!("accel = \"tcg\"\ndefault_bridge = \"{}\"", net.bridge),
    );
    enable_replica_server(&b, "127.0.0.2");
    // A takes the reverse replication after the planned failover.
    enable_replica_server(&a, "127.0.0.1");
    a.ferry_ok(&[
        "vm",
        "create",
        "app",
        "--memory",
        "1024M",
        "--firmware",
        "uefi",
        "--machine",
        "q35",
        "--disk",
        disk.to_str().expect("utf-8 path"),
        "--nic",
        "user",
        "--nic",
        &format!("bridge={}", net.bridge),
    ]);
    let nics = a.ferry_json(&["vm", "show", "app"])["nics"].clone();
    let mac = nics[0]["mac"].as_str().expect("a MAC").to_owned();
    let mac1 = nics[1]["mac"].as_str().expect("a MAC").to_owned();

    // Bad settings: one line each, and nothing stored.
    for (bad, why) in [
        ("0=10.0.2.300/24", "not an IP address"),
        ("0=10.0.2.77", "not ADDRESS/PREFIX"),
        ("0=10.0.2.77/40", "prefix"),
        ("0=10.0.2.77/24,gw=gateway", "not an IP address"),
        ("0=10.0.2.77/24,mtu=1400", "neither gw=IP nor dns=IP;IP"),
        ("2=10.0.2.77/24", "has no NIC 2"),
        ("10.0.2.77/24", "not NIC=ADDRESS/PREFIX"),
    ] {
        let err = a.ferry_err(&["vm", "set", "app", "--failover-ip", bad]);
        assert!(
            err.contains(why) && err.trim().lines().count() == 1,
            "{bad}: {err}"
        );
    }
    assert_eq!(
        a.ferry_json(&["vm", "show", "app"])["failover_ip"],
        serde_json::json!([])
    );
    let ip = format!("{mac}={ADDR},gw=10.0.2.2,dns=10.0.2.3");
    let ip1 = format!("1={SITE_ADDR}");
    a.ferry_ok(&[
        "vm",
        "set",
        "app",
        "--failover-ip",
        &ip,
        "--failover-ip",
        &ip1,
    ]);
    let expected = serde_json::json!([
        { "mac": mac, "address": ADDR, "gateway": "10.0.2.2", "dns": ["10.0.2.3"] },
        { "mac": mac1, "address": SITE_ADDR, "gateway": null, "dns": [] },
    ]);
    assert_eq!(
        a.ferry_json(&["vm", "show", "app"])["failover_ip"],
        expected
    );
    let shown = a.ferry_ok(&["vm", "show", "app"]);
    assert!(
        shown.contains(&format!(
            "Failover IP: {ADDR} on NIC {mac}, gateway 10.0.2.2, DNS 10.0.2.3"
        )),
        "{shown}"
    );

    // Replicated with the spec: the replica VM has it.
    let t = Instant::now();
    a.ferry_ok(&[
        "replication",
        "enable",
        "app",
        "--to",
        b.socket.to_str().unwrap(),
        "--interval",
        "30s",
        // Tried on every cycle: skipped while the VM is off on A, through the real
        // guest's agent (fsfreeze) once the failed-over VM replicates back.
        "--app-consistent-every",
        "30s",
        "--wait",
    ]);
    let initial_s = t.elapsed().as_secs();
    assert_eq!(
        b.ferry_json(&["vm", "show", "app"])["failover_ip"],
        expected
    );
    // The replica site owns its addresses (as in Hyper-V, set on the replica VM): the
    // replica server may set them on the replica VM, and nothing else of its hardware.
    b.ferry_ok(&[
        "vm",
        "set",
        "app",
        "--failover-ip",
        &ip,
        "--failover-ip",
        &ip1,
    ]);
    assert_eq!(
        b.ferry_json(&["vm", "show", "app"])["failover_ip"],
        expected
    );
    let err = b.ferry_err(&["vm", "set", "app", "--rng", "on"]);
    assert!(err.contains("is a replica"), "{err}");

    // Planned failover (the VM is off on the primary) with start on the replica server,
    // and reverse replication back to A.
    let t = Instant::now();
    let out = a.ferry_ok(&["failover", "planned", "app", "--start", "--reverse"]);
    println!("{out}");
    // The replica server's reply and event: applied once the guest's agent answers.
    let mut outcome = None;
    wait_for(
        "the failover IP's outcome",
        Duration::from_secs(600),
        || {
            outcome = events(&b)
                .into_iter()
                .find(|e| e["kind"] == "failover_ip_applied" || e["kind"] == "failover_ip_failed");
            outcome.is_some()
        },
    );
    let outcome = outcome.unwrap();
    let applied_s = t.elapsed().as_secs();
    assert_eq!(outcome["kind"], "failover_ip_applied", "{outcome}");
    assert!(
        outcome["message"].as_str().unwrap().contains(ADDR),
        "{outcome}"
    );

    // Inside the guest, through its agent: the replica-site address on the NIC.
    let exec = |args: &[&str]| {
        let mut all = vec!["vm", "exec", "app", "--timeout", "120", "--"];
        all.extend_from_slice(args);
        b.ferry_json(&all)
    };
    let mut addr = Value::Null;
    wait_for("the address in the guest", Duration::from_secs(120), || {
        addr = exec(&["/usr/sbin/ip", "-4", "-o", "addr", "show"]);
        let text = addr["stdout"].as_str().unwrap_or("");
        text.contains(ADDR) && text.contains(SITE_ADDR)
    });
    assert!(
        !addr["stdout"].as_str().unwrap().contains("10.0.2.15/"),
        "the DHCP address is still there: {addr}"
    );
    let route = exec(&["/usr/sbin/ip", "-4", "route", "show", "default"]);
    assert!(
        route["stdout"].as_str().unwrap().contains("via 10.0.2.2"),
        "{route}"
    );
    let resolv = exec(&["/usr/bin/cat", "/etc/resolv.conf"]);
    assert!(
        resolv["stdout"]
            .as_str()
            .unwrap()
            .contains("nameserver 10.0.2.3"),
        "{resolv}"
    );
    // It answers on the replica-site address, from the replica side's network.
    wait_for("the guest to answer ping", Duration::from_secs(90), || {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &net.netns,
                "ping",
                "-c",
                "2",
                "-W",
                "5",
                "10.77.0.5",
            ])
            .status()
            .expect("run ping (iputils-ping, scripts/install-deps.sh)")
            .success()
    });
    // The guest came up whole: multi-user, nothing failed.
    let state = exec(&["/usr/bin/systemctl", "is-system-running", "--wait"]);
    assert_eq!(
        state["stdout"].as_str().unwrap().trim(),
        "running",
        "{state}"
    );
    // `ferry vm exec` passes the program's exit code on, and says so in JSON.
    let r = b.ferry(&[
        "vm",
        "exec",
        "app",
        "--",
        "/bin/sh",
        "-c",
        "echo out; exit 3",
    ]);
    assert_eq!((r.code, r.stdout.as_str()), (3, "out\n"), "{r:?}");
    let r = b.ferry(&[
        "--output", "json", "vm", "exec", "app", "--", "/bin/sh", "-c", "exit 4",
    ]);
    let j: Value = serde_json::from_str(&r.stdout).expect("JSON");
    assert_eq!(
        (r.code, &j["exit_code"]),
        (4, &serde_json::json!(4)),
        "{r:?}"
    );
    let err = b.ferry_err(&["vm", "exec", "app", "--", "/nonexistent/prog"]);
    assert!(
        err.contains("guest agent") && err.trim().lines().count() == 1,
        "{err}"
    );
    // Reverse replication takes application-consistent points through the real guest's
    // qemu-guest-agent (fsfreeze), now that it runs.
    wait_for(
        "an application-consistent point on A",
        Duration::from_secs(300),
        || {
            points(&a, "app")
                .iter()
                .any(|p| p["consistency"] == "application")
        },
    );
    let app_s = t.elapsed().as_secs();
    eprintln!("reip: app-consistent point back on A {app_s} s after the failover");

    // A test failover on A (now the replica) from the latest point: the real guest boots,
    // isolated, to multi-user with its services up, checked through its agent.
    // It runs on the replica side's test network, with the test failover IP set there
    // (the replica owns it, as the failover IP).
    a.ferry_ok(&[
        "vm",
        "set",
        "app",
        "--test-failover-ip",
        "0=10.88.0.8/24",
        "--test-failover-ip",
        "1=10.88.0.9/24",
    ]);
    let err = a.ferry_err(&["failover", "test", "app", "--network", "nosuchbr0"]);
    assert!(
        err.contains("does not exist") && err.trim().lines().count() == 1,
        "{err}"
    );
    // Refused before anything happened: no test VM.
    assert!(a
        .ferry_err(&["vm", "show", "app-test"])
        .contains("app-test"));
    let t = Instant::now();
    let out = a.ferry_ok(&["failover", "test", "app", "--network", &test_net.bridge]);
    assert!(
        out.contains("app-test") && out.contains(&format!("on test network {}", test_net.bridge)),
        "{out}"
    );
    let state = system_state(
        &a,
        "app-test",
        "the test failover's guest to reach multi-user",
    );
    assert_eq!(state.stdout.trim(), "running", "{state:?}");
    // Its test failover IP, applied through its agent, answers on the test network.
    wait_for(
        "the test failover IP in the test VM",
        Duration::from_secs(120),
        || {
            let r = a.ferry(&[
                "vm",
                "exec",
                "app-test",
                "--timeout",
                "30",
                "--",
                "/usr/sbin/ip",
                "-4",
                "-o",
                "addr",
                "show",
            ]);
            r.stdout.contains("10.88.0.8/24") && r.stdout.contains("10.88.0.9/24")
        },
    );
    wait_for(
        "the test VM to answer ping",
        Duration::from_secs(90),
        || {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &test_net.netns,
                    "ping",
                    "-c",
                    "2",
                    "-W",
                    "5",
                    "10.88.0.9",
                ])
                .status()
                .expect("run ping")
                .success()
        },
    );
    let test_s = t.elapsed().as_secs();
    a.ferry_ok(&["failover", "stop-test", "app"]);
    eprintln!("reip: test failover to multi-user {test_s} s");

    // Failback: what the guest wrote on B comes back to A with a planned failover (no data
    // loss), and A is the primary again, replicating to B.
    let t = Instant::now();
    let marker = exec(&[
        "/bin/sh",
        "-c",
        "echo written-on-b > /root/failback-marker && sync && cat /root/failback-marker",
    ]);
    assert_eq!(marker["stdout"], "written-on-b\n", "{marker}");
    b.ferry_ok(&["vm", "shutdown", "app"]);
    let out = b.ferry_ok(&["failover", "planned", "app", "--start", "--reverse"]);
    println!("{out}");
    let on_a = |args: &[&str]| {
        let mut all = vec!["vm", "exec", "app", "--timeout", "120", "--"];
        all.extend_from_slice(args);
        a.ferry(&all)
    };
    let r = system_state(&a, "app", "the failed-back guest's agent");
    assert_eq!(r.stdout.trim(), "running", "{r:?}");
    let r = on_a(&["/usr/bin/cat", "/root/failback-marker"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "written-on-b\n"), "{r:?}");
    let role = a.ferry_json(&["replication", "status", "app"]);
    assert_eq!(role["role"], "primary", "{role}");
    let failback_s = t.elapsed().as_secs();
    eprintln!("reip: failback to a running guest on A {failback_s} s");

    // Unplanned failover: the guest's SQLite workload runs, a crash-consistent point of it
    // reaches B, and the primary site dies.
    let r = on_a(&["/usr/bin/systemctl", "start", "ferry-writer"]);
    assert_eq!(r.code, 0, "{r:?}");
    let rows_on_a = || -> i64 {
        let r = on_a(&[
            "/usr/bin/sqlite3",
            "/var/lib/ferry-writer/rows.db",
            "SELECT COUNT(*) FROM rows",
        ]);
        r.stdout.trim().parse().unwrap_or(0)
    };
    wait_for("ferry-writer's rows", Duration::from_secs(120), || {
        rows_on_a() >= 5
    });
    // Only a point taken after this second holds those rows (the reverse replication's
    // first points, taken while the guest booted, are crash-consistent too). Same clock:
    // both hosts run on this machine.
    let rows_seen_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // A point taken now, soon after the last application-consistent one, is
    // crash-consistent (the agent is asked at most every 30 s): the hard case.
    let mut crash_point = Value::Null;
    wait_for(
        "a crash-consistent point of the running workload on B",
        Duration::from_secs(300),
        || {
            if let Some(p) = points(&b, "app").into_iter().rev().find(|p| {
                p["consistency"] == "crash" && p["taken_at"].as_i64() > Some(rows_seen_at)
            }) {
                crash_point = p;
                return true;
            }
            a.ferry(&["replication", "now", "app"]);
            std::thread::sleep(Duration::from_secs(5));
            false
        },
    );
    let qemu_pid = a.ferry_json(&["vm", "show", "app"])["pid"]
        .as_u64()
        .expect("the VM runs on A") as i32;
    a.kill_daemon();
    // SAFETY: kill(2) of the QEMU process this test's ferryd started.
    unsafe { libc::kill(qemu_pid, libc::SIGKILL) };
    let t = Instant::now();
    let point = crash_point["id"].as_i64().expect("a point id").to_string();
    let out = b.ferry_ok(&[
        "failover", "start", "app", "--point", &point, "--start", "--force",
    ]);
    println!("{out}");
    let r = system_state(&b, "app", "the failed-over guest's agent");
    let booted_s = t.elapsed().as_secs();
    assert_eq!(r.stdout.trim(), "running", "{r:?}");
    // The boot checked the root before mounting it read-write (systemd-fsck-root: the
    // kernel mounts it read-only, this guest's initramfs has no fsck): the check ran,
    // succeeded, and e2fsck called the file system clean.
    let unit = exec(&[
        "/usr/bin/systemctl",
        "show",
        "systemd-fsck-root.service",
        "-p",
        "Result",
        "-p",
        "ExecMainStatus",
        "-p",
        "ExecMainStartTimestampMonotonic",
    ]);
    let unit = unit["stdout"].as_str().unwrap_or("").to_owned();
    assert!(
        unit.contains("Result=success\n")
            && unit.contains("ExecMainStatus=0\n")
            && !unit.contains("ExecMainStartTimestampMonotonic=0\n"),
        "{unit}"
    );
    let fsck = exec(&[
        "/usr/bin/journalctl",
        "-b",
        "-u",
        "systemd-fsck-root.service",
        "-o",
        "cat",
        "--no-pager",
    ]);
    let log = fsck["stdout"].as_str().unwrap_or("");
    println!("the failed-over boot's fsck of its root:\n{log}");
    assert!(
        log.contains("clean,") && !log.contains("UNEXPECTED INCONSISTENCY"),
        "{fsck}"
    );
    // The database: whole, with rows 1..N and no gap.
    let db = |sql: &str| {
        exec(&["/usr/bin/sqlite3", "/var/lib/ferry-writer/rows.db", sql])["stdout"]
            .as_str()
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    assert_eq!(db("PRAGMA integrity_check"), "ok");
    let (count, max) = (
        db("SELECT COUNT(*) FROM rows"),
        db("SELECT MAX(n) FROM rows"),
    );
    assert_eq!(count, max, "the failed-over database has a gap");
    assert!(count.parse::<i64>().unwrap() >= 5, "{count} rows");
    // Shut down cleanly, then a forced full check of the failed-over disk finds nothing.
    b.ferry_ok(&["vm", "shutdown", "app"]);
    let shown = b.ferry_json(&["vm", "show", "app"]);
    let file = shown["disks"][0]["path"]
        .as_str()
        .expect("disk 0's path")
        .to_owned();
    let raw = tempfile::NamedTempFile::new_in("/var/tmp").expect("a temporary file");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw", &file])
        .arg(raw.path())
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img convert of {file}");
    let report = fsck_root(raw.path()).unwrap_or_else(|e| panic!("{e:#}"));
    println!("{report}");
    eprintln!(
        "reip: unplanned failover to crash-consistent point {point}: {count} rows, guest running {booted_s} s after the failover"
    );
    eprintln!(
        "reip: initial copy {initial_s} s, planned failover to failover IP applied {applied_s} s"
    );
}
