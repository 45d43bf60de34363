//! A replica server trusts nothing a primary sends: who may replicate is decided from the
//! peer's certificate before anything it sends is read; "any authenticated primary" means
//! any certificate the configured CA issued, never any self-signed one; a primary cannot
//! start a VM on the replica unless the replica's admin allows it; and a replica server
//! cannot make its old primary overwrite its VM without a planned failover or that host's
//! own consent. Real ferryd daemons over real mutual TLS; the hostile peer speaks the real
//! wire protocol with crafted messages. VMs stay off (offline replication through
//! qemu-nbd), so no guest boots.

use std::path::Path;
use std::time::Duration;

use ferry_testkit::host::Host;
use ferry_testkit::hostile::HostilePeer;
use ferry_testkit::pki::TestCa;
use ferry_testkit::replication::{enable_replica_server, points, status, wait_for};
use serde_json::{json, Value};

/// Where `host`'s replica server listens, and its certificate fingerprint.
fn replica_port(host: &Host) -> (String, String) {
    let info = host.ferry_json(&["replica-server", "show"]);
    (
        info["listening"].as_str().expect("listening").to_owned(),
        info["fingerprint"]
            .as_str()
            .expect("fingerprint")
            .to_owned(),
    )
}

/// A peer presenting `host`'s own certificate and key (a compromised `host`).
fn peer_as(host: &Host, to: &Host) -> HostilePeer {
    let (addr, fp) = replica_port(to);
    let read = |f: &str| std::fs::read(host.data_dir.join(f)).expect("identity file");
    HostilePeer::connect(&addr, &fp, &read("host.crt"), &read("host.key")).expect("TLS")
}

/// A valid greeting for VM `vm`, as a primary named `primary` would send it.
fn hello(primary: &str, vm: &str, last_cycle: i64, reverse: bool) -> Value {
    json!({
        "type": "hello",
        "protocol": 1,
        "primary": primary,
        "spec": {
            "name": vm, "cpus": 1, "memory_mib": 256,
            "disks": [{"file": "disk0.qcow2", "size_bytes": 16u64 << 20}],
            "boot": {"kind": "disk"}, "nics": [],
        },
        "disks": [{"index": 0, "size_bytes": 16u64 << 20}],
        "settings": {
            "interval": {"secs": 5, "nanos": 0},
            "retention": {"additional": 0, "spacing_secs": 3600},
            "compression": false, "excluded_disks": [],
            "initial": {"method": "network"}, "bandwidth_limit": null,
            "granularity": 65536, "relationship_id": 7,
        },
        "last_cycle": last_cycle,
        "reverse": reverse,
    })
}

fn vm_names(host: &Host) -> Vec<String> {
    host.ferry_json(&["vm", "list"])
        .as_array()
        .expect("vm list")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_owned())
        .collect()
}

fn events_of_kind(host: &Host, kind: &str) -> Vec<Value> {
    host.ferry_json(&["events"])
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == kind)
        .cloned()
        .collect()
}

fn replicate_offline(primary: &Host, replica: &Host, vm: &str) -> Result<(), String> {
    primary.ferry_ok(&["vm", "create", vm, "--memory", "256M", "--disk", "16M"]);
    let r = primary.ferry(&[
        "replication",
        "enable",
        vm,
        "--to",
        replica.socket.to_str().unwrap(),
        "--interval",
        "5s",
        "--wait",
    ]);
    if r.code == 0 {
        Ok(())
    } else {
        Err(r.stderr.trim().to_owned())
    }
}

/// `--allow-any` admits exactly the certificates the trusted CA issued: not ferryd's
/// default self-signed ones, not another CA's; a refused peer is told why before it can
/// send anything, and gets an event on the replica; a configuration stored by an older
/// ferryd (allow-any without a CA) admits nobody by "any".
#[test]
fn allow_any_admits_only_certificates_of_the_trusted_ca() {
    let mut b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let stranger = Host::start_self_signed("stranger", "127.0.0.3", "accel = \"tcg\"");
    let outsider = {
        let mut h = Host::configure_self_signed("outsider", "127.0.0.4", "accel = \"tcg\"");
        TestCa::new("Another organization").issue_host("outsider", &h.data_dir);
        h.launch();
        h
    };
    let storage = b.dir.path().join("replicas");
    let storage = storage.to_str().unwrap();

    // Bad input changes nothing: --allow-any without a CA, a CA file that is no PEM.
    let before = b.ferry_json(&["replica-server", "show"]);
    let err = b.ferry_err(&[
        "replica-server",
        "set",
        "--enable",
        "--allow-any",
        "--storage",
        storage,
    ]);
    assert!(err.contains("--trust-ca"), "{err}");
    let junk = b.dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let err = b.ferry_err(&[
        "replica-server",
        "set",
        "--enable",
        "--allow-any",
        "--trust-ca",
        junk.to_str().unwrap(),
        "--storage",
        storage,
    ]);
    assert!(err.contains("no PEM certificate"), "{err}");
    assert_eq!(b.ferry_json(&["replica-server", "show"]), before);
    assert!(
        !Path::new(storage).exists(),
        "a refused setting created storage"
    );

    enable_replica_server(&b, "127.0.0.2");
    let shown = b.ferry_ok(&["replica-server", "show"]);
    assert!(shown.contains("certificate from the trusted CA"), "{shown}");

    // A host of the organization replicates.
    replicate_offline(&a, &b, "app").expect("a CA-issued primary is admitted");
    assert_eq!(points(&b, "app").len(), 1);

    // ferryd's own self-signed certificate is not "any authenticated primary".
    let err = replicate_offline(&stranger, &b, "intruder").unwrap_err();
    assert!(
        err.contains("not authorized") && err.contains("not issued by the trusted CA"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // Nor is a certificate of another organization's CA.
    let err = replicate_offline(&outsider, &b, "intruder2").unwrap_err();
    assert!(err.contains("not issued by the trusted CA"), "{err}");
    assert_eq!(vm_names(&b), ["app"], "a refused primary left a VM behind");
    assert!(
        std::fs::read_dir(storage)
            .unwrap()
            .all(|e| e.unwrap().file_name() == "app"),
        "a refused primary left files in the replica storage"
    );
    let refused = events_of_kind(&b, "primary_refused");
    assert!(!refused.is_empty(), "no primary_refused event");
    assert!(refused[0]["code"] == 1200, "{refused:?}");

    // The refusal comes before the peer's first byte is read: a stranger that sends
    // nothing is already told.
    let mut peer = peer_as(&stranger, &b);
    let reply = peer
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("a refusal");
    assert_eq!(reply["type"], "refused", "{reply}");
    assert!(
        reply["reason"]
            .as_str()
            .unwrap()
            .contains("ferry replica-server set --allow NAME="),
        "{reply}"
    );

    // A configuration stored by an older ferryd, allow-any without a CA: nobody is admitted
    // by "any" (a listed primary still would be), and `show` says how to fix it.
    b.stop_daemon();
    let db = b.data_dir.join("ferry.db");
    let sql = "UPDATE settings SET value = json_remove(value, '$.trusted_ca') WHERE key = 'replica_server';";
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(sql)
        .output()
        .expect("sqlite3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.launch();
    let shown = b.ferry_ok(&["replica-server", "show"]);
    assert!(shown.contains("trusts no CA"), "{shown}");
    let mut peer = peer_as(&a, &b);
    let reply = peer
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("a refusal");
    assert_eq!(reply["type"], "refused", "{reply}");
    assert!(
        reply["reason"].as_str().unwrap().contains("--trust-ca"),
        "{reply}"
    );
}

/// What an authorized primary may do is still bounded: its greeting is capped before it is
/// parsed, a planned failover does not start the VM unless the replica's admin allows it,
/// and its replica server (when it is compromised) cannot turn the primary's VM into a
/// replica and overwrite it without a planned failover or the primary admin's consent.
#[test]
fn an_authorized_peer_cannot_overrun_start_or_take_over() {
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    enable_replica_server(&b, "127.0.0.2");
    enable_replica_server(&a, "127.0.0.1");
    replicate_offline(&a, &b, "app").expect("replicates");

    // A greeting larger than any real one is refused before it is buffered whole.
    let mut peer = peer_as(&a, &b);
    let huge = vec![b'x'; 1 << 20];
    let _ = peer.send_frame(ferry_wire::FrameKind::Control, &huge);
    match peer.recv(Duration::from_secs(10)) {
        Ok(None) | Err(_) => {}
        Ok(Some(m)) => panic!("a 1 MiB greeting got an answer: {m}"),
    }
    assert_eq!(status(&b, "app")["state"], "replicating");

    // b, compromised, claims reverse replication of "app" onto a: a's VM is merely off, no
    // failover happened, and a's admin did not agree. Refused; nothing changes on a.
    let mut peer = peer_as(&b, &a);
    peer.send(&hello("b", "app", 1, true)).unwrap();
    let reply = peer
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("a reply");
    assert_eq!(reply["type"], "refused", "{reply}");
    let reason = reply["reason"].as_str().unwrap();
    assert!(
        reason.contains("did not agree") && reason.contains("ferry replication accept-reverse app"),
        "{reason}"
    );
    let st = status(&a, "app");
    assert_eq!(st["role"], "primary", "{st}");
    assert_eq!(st["state"], "replicating", "{st}");

    // A planned failover with --start: b's admin did not allow primaries to start VMs
    // (turned off here; the testkit's replica servers allow it), so the VM fails over but
    // stays off, and the reply says how to start it.
    b.ferry_ok(&["replica-server", "set", "--allow-primary-start", "no"]);
    let out = a.ferry_ok(&["failover", "planned", "app", "--start"]);
    assert!(out.contains("was not started"), "{out}");
    assert_eq!(b.vm_state("app"), "off");
    wait_for("the failover on b", Duration::from_secs(30), || {
        status(&b, "app")["state"] != "replicating"
    });
    // b's own admin starts it.
    b.ferry_ok(&["vm", "start", "app"]);
    assert_eq!(b.vm_state("app"), "running");
    b.ferry_ok(&["vm", "stop", "app"]);
}
