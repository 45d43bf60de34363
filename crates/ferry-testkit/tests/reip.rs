//! Re-IP on failover (Hyper-V's "Failover TCP/IP") on the real Debian guest: a UEFI q35 VM
//! made from the installed disk gets a replica-site address for its NIC (bad ones refused,
//! nothing changed), is replicated with it, and after a planned failover with start on the
//! replica server its qemu-guest-agent is told to configure it; `ferry vm exec` then shows
//! the address inside the guest, the DNS server in its resolver, and a guest that reached
//! multi-user with nothing failed.

use std::time::{Duration, Instant};

use ferry_testkit::debian::debian_image;
use ferry_testkit::host::Host;
use ferry_testkit::replication::{enable_replica_server, wait_for};
use serde_json::Value;

/// The replica site's address of the guest's NIC (on QEMU's user-mode network 10.0.2.0/24,
/// where DHCP would give 10.0.2.15).
const ADDR: &str = "10.0.2.77/24";

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
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    enable_replica_server(&b, "127.0.0.2");
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
    ]);
    let mac = a.ferry_json(&["vm", "show", "app"])["nics"][0]["mac"]
        .as_str()
        .expect("a MAC")
        .to_owned();

    // Bad settings: one line each, and nothing stored.
    for (bad, why) in [
        ("0=10.0.2.300/24", "not an IP address"),
        ("0=10.0.2.77", "not ADDRESS/PREFIX"),
        ("0=10.0.2.77/40", "prefix"),
        ("0=10.0.2.77/24,gw=gateway", "not an IP address"),
        ("0=10.0.2.77/24,mtu=1400", "neither gw=IP nor dns=IP;IP"),
        ("1=10.0.2.77/24", "has no NIC 1"),
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
    a.ferry_ok(&["vm", "set", "app", "--failover-ip", &ip]);
    let expected = serde_json::json!([{
        "mac": mac, "address": ADDR, "gateway": "10.0.2.2", "dns": ["10.0.2.3"]
    }]);
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
        "--wait",
    ]);
    let initial_s = t.elapsed().as_secs();
    assert_eq!(
        b.ferry_json(&["vm", "show", "app"])["failover_ip"],
        expected
    );

    // Planned failover (the VM is off on the primary) with start on the replica server.
    let t = Instant::now();
    let out = a.ferry_ok(&["failover", "planned", "app", "--start"]);
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
        addr["stdout"].as_str().unwrap_or("").contains(ADDR)
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
    eprintln!(
        "reip: initial copy {initial_s} s, planned failover to failover IP applied {applied_s} s"
    );
}
