//! Replication health, statistics, events and metrics, driven by real conditions with a
//! real guest and two real ferryd: a network partition (missed cycles: Warning, then
//! Critical), the link restored and the statistics reset (Normal), suspension on either
//! side, and "resynchronization required" after QEMU is SIGKILLed. Statistics are checked
//! against the cycles the store recorded, the CSV is read with Python's csv module, the
//! Prometheus exposition with a Prometheus parser, and the event log through the CLI
//! (including --follow).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::bin_dir;
use ferry_testkit::guest::{parse_console, GuestWorkload};
use ferry_testkit::host::{pid_alive, Host};
use ferry_testkit::link::Link;
use ferry_testkit::replication::{enable_replica_server_at, free_port, status, wait_for};
use serde_json::Value;

fn health(host: &Host, vm: &str) -> Value {
    host.ferry_json(&["replication", "health", vm])[0].clone()
}

fn wait_health(host: &Host, vm: &str, want: &str, timeout: Duration) -> Value {
    wait_health_where(host, vm, want, timeout, |h| h["health"] == want)
}

/// Waits for a health report that `ok` accepts (`want` names it in the failure message).
fn wait_health_where(
    host: &Host,
    vm: &str,
    want: &str,
    timeout: Duration,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let mut last;
    let deadline = Instant::now() + timeout;
    loop {
        last = health(host, vm);
        if ok(&last) {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "health of {vm} on {} never became {want}; last: {last}",
            host.name
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn sql(host: &Host, query: &str) -> String {
    let out = Command::new("sqlite3")
        .arg(host.data_dir.join("ferry.db"))
        .arg(query)
        .output()
        .expect("sqlite3 (installed by scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn events(host: &Host, vm: &str) -> Vec<Value> {
    host.ferry_json(&["events", "--vm", vm, "--last", "1000"])
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn health_follows_real_conditions_and_statistics_events_metrics_agree() {
    let mut a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    let port: u16 = free_port("127.0.0.2").parse().unwrap();
    enable_replica_server_at(&b, &port.to_string());
    let b_fp = b.ferry_json(&["server", "show"])["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let link = Link::start("127.0.0.1", SocketAddr::from(([127, 0, 0, 2], port)));
    a.create_guest_vm(
        "app",
        GuestWorkload {
            seed: 31,
            start: 1,
            span_blocks: 2048,
        },
        0.2,
        &["--memory", "256M", "--disk", "32M"],
    );
    a.ferry_ok(&["vm", "start", "app"]);
    a.wait_console("app", Duration::from_secs(60), "guest writes", |c| {
        parse_console(c).last_wrote_seq.unwrap_or(0) >= 2
    });
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
        "--wait",
    ]);

    // Normal on both sides once cycles run.
    wait_health(&a, "app", "normal", Duration::from_secs(30));
    wait_health(&b, "app", "normal", Duration::from_secs(30));
    let text = a.ferry_ok(&["replication", "health", "app"]);
    assert!(text.contains("Replication health:      NORMAL"), "{text}");

    // 1. Partition: the next cycle fails (Warning), three in a row (Critical).
    link.partition();
    // On a loaded machine a slow cycle may first count as missed (also Warning, rightly):
    // wait for the Warning that names the failed cycle.
    let h = wait_health_where(
        &a,
        "app",
        "warning for a failed cycle",
        Duration::from_secs(30),
        |h| {
            h["health"] == "warning"
                && h["details"].as_array().is_some_and(|d| {
                    d.iter()
                        .any(|x| x.as_str().unwrap_or("").contains("failed"))
                })
        },
    );
    assert!(h["errors"].as_u64().unwrap_or(0) >= 1, "{h}");
    let h = wait_health(&a, "app", "critical", Duration::from_secs(60));
    assert!(
        h["details"][0].as_str().unwrap().contains("is in error"),
        "{h}"
    );
    assert!(h["errors"].as_u64().unwrap() >= 3, "{h}");

    // 2. Link restored: cycles succeed again; the missed cycles keep it from Normal until
    //    the statistics are reset (a new window), as in Hyper-V.
    link.heal();
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    wait_for(
        "a cycle after the partition",
        Duration::from_secs(30),
        || status(&a, "app")["last_cycle"].as_i64().unwrap() > cycle,
    );
    // The cycle's row (which health reads) is recorded just after the store's last
    // cycle moves: wait for it, then health must have left Critical.
    let before_reset = wait_health_where(
        &a,
        "app",
        "the successful cycle counted",
        Duration::from_secs(30),
        |h| {
            h["details"].as_array().is_some_and(|d| {
                !d.iter()
                    .any(|x| x.as_str().unwrap_or("").contains("is in error"))
            })
        },
    );
    assert_ne!(before_reset["health"], "critical", "{before_reset}");

    // Statistics against the cycles the store recorded in the same window.
    let from_ms = before_reset["from_time"].as_i64().unwrap() * 1000;
    let ok: u64 = sql(
        &a,
        &format!("SELECT count(*) FROM cycles WHERE ok = 1 AND ended_ms >= {from_ms}"),
    )
    .parse()
    .unwrap();
    let failed: u64 = sql(
        &a,
        &format!("SELECT count(*) FROM cycles WHERE ok = 0 AND ended_ms >= {from_ms}"),
    )
    .parse()
    .unwrap();
    let max: u64 = sql(
        &a,
        &format!(
            "SELECT coalesce(max(sent_bytes), 0) FROM cycles WHERE ok = 1 AND ended_ms >= {from_ms}"
        ),
    )
    .parse()
    .unwrap();
    let h = health(&a, "app");
    println!("health after the partition: {h}");
    // (A cycle may end between the two reads: allow one.)
    let succ = h["successful_cycles"].as_u64().unwrap();
    assert!(succ == ok || succ == ok + 1, "{succ} vs {ok}");
    assert_eq!(h["errors"].as_u64().unwrap(), failed);
    assert!(failed >= 3);
    assert!(h["maximum_size"].as_u64().unwrap() >= max);
    assert!(h["average_size"].as_u64().unwrap() <= h["maximum_size"].as_u64().unwrap());

    // CSV, read by a real CSV parser.
    let csv = a.dir.path().join("health.csv");
    a.ferry_ok(&[
        "replication",
        "health",
        "app",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    let py = Command::new("python3")
        .arg("-c")
        .arg(
            "import csv,sys,json; r=list(csv.DictReader(open(sys.argv[1], newline=''))); print(json.dumps(r))",
        )
        .arg(&csv)
        .output()
        .expect("python3");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let rows: Value = serde_json::from_slice(&py.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["vm"], "app");
    assert_eq!(rows[0]["role"], "primary");
    assert_eq!(rows[0]["replica_server"], "b");
    assert!(rows[0]["errors"].as_str().unwrap().parse::<u64>().unwrap() >= 3);

    // Reset: a new window, Normal.
    let h = a.ferry_json(&["replication", "health", "app", "--reset"])[0].clone();
    assert_eq!(h["errors"], 0, "{h}");
    wait_health(&a, "app", "normal", Duration::from_secs(30));

    // 3. Suspended on the primary: Warning. On the replica: Critical on both sides.
    a.ferry_ok(&["replication", "suspend", "app"]);
    let h = wait_health(&a, "app", "warning", Duration::from_secs(30));
    assert!(
        h["details"][0]
            .as_str()
            .unwrap()
            .contains("suspended on the primary"),
        "{h}"
    );
    a.ferry_ok(&["replication", "resume", "app"]);
    b.ferry_ok(&["replication", "suspend", "app"]);
    wait_health(&b, "app", "critical", Duration::from_secs(30));
    let h = wait_health(&a, "app", "critical", Duration::from_secs(60));
    assert!(
        h["details"][0]
            .as_str()
            .unwrap()
            .contains("suspended on the replica"),
        "{h}"
    );
    b.ferry_ok(&["replication", "resume", "app"]);
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    wait_for(
        "cycles after the replica resumed",
        Duration::from_secs(30),
        || {
            let st = status(&a, "app");
            st["state"] == "replicating" && st["last_cycle"].as_i64().unwrap() > cycle
        },
    );
    a.ferry_ok(&["replication", "health", "app", "--reset"]);
    b.ferry_ok(&["replication", "health", "app", "--reset"]);
    wait_health(&a, "app", "normal", Duration::from_secs(30));
    wait_health(&b, "app", "normal", Duration::from_secs(30));

    // 4. Metrics: parsed by a Prometheus exposition parser (after a cycle in the new window).
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    wait_for("a cycle in the new window", Duration::from_secs(30), || {
        status(&a, "app")["last_cycle"].as_i64().unwrap() > cycle
    });
    let out = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&a.socket)
        .arg("http://ferry/metrics")
        .output()
        .expect("curl");
    assert!(out.status.success());
    let body = String::from_utf8(out.stdout).unwrap();
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("a valid exposition");
    let find = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get("vm") == Some("app"))
            .unwrap_or_else(|| panic!("{name} missing in:\n{body}"))
    };
    let value = |name: &str| match find(name).value {
        prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: {other:?}"),
    };
    assert_eq!(value("ferry_replication_health"), 0.0);
    assert!(value("ferry_replication_rpo_seconds") >= 0.0);
    assert!(value("ferry_replication_cycles_total") >= 1.0);
    assert!(value("ferry_replication_window_compression_ratio") >= 1.0);
    // Counters count from the relationship's creation: the statistics resets lowered the
    // window's figures, not the counters (the partition's failed cycles are still there).
    assert!(value("ferry_replication_errors_total") >= 3.0, "{body}");
    assert_eq!(value("ferry_replication_window_errors"), 0.0, "{body}");
    assert!(
        value("ferry_replication_cycles_total") > value("ferry_replication_window_cycles"),
        "{body}"
    );
    assert_eq!(
        find("ferry_replication_health").labels.get("replica"),
        Some("b")
    );
    for name in [
        "ferry_replication_state",
        "ferry_replication_pending_bytes",
        "ferry_replication_window_average_size_bytes",
        "ferry_replication_window_average_latency_seconds",
        "ferry_replication_last_point_timestamp_seconds",
        "ferry_replication_interval_seconds",
        "ferry_replication_suspended",
        "ferry_replication_network_bytes_total",
        "ferry_replication_resynchronized_bytes_total",
        "ferry_replication_errors_total",
    ] {
        find(name);
    }

    // 5. `ferry events --follow` prints new events as they happen.
    let mut follow = Command::new(bin_dir().join("ferry"))
        .arg("--socket")
        .arg(&a.socket)
        .args(["events", "--vm", "app", "--follow", "--last", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    a.ferry_ok(&["replication", "suspend", "app"]);
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let found = loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.contains("replication_state") && line.contains("suspended") => {
                break true
            }
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        found,
        "--follow did not print the suspension; it printed {seen:?}"
    );
    a.ferry_ok(&["replication", "resume", "app"]);

    // 6. QEMU SIGKILLed: resynchronization required is Critical; the resync's start and
    //    end are events.
    let pid = a.ferry_json(&["vm", "show", "app"])["pid"]
        .as_u64()
        .unwrap() as i32;
    // SAFETY: kill(2) of the test's own QEMU.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("QEMU to die", Duration::from_secs(10), || {
        !pid_alive(pid as u32)
    });
    wait_for("the VM to be off", Duration::from_secs(20), || {
        a.vm_state("app") == "off"
    });
    a.ferry_ok(&["replication", "now", "app"]);
    let h = wait_health(&a, "app", "critical", Duration::from_secs(60));
    assert!(
        h["details"][0]
            .as_str()
            .unwrap()
            .contains("Resynchronization is required"),
        "{h}"
    );
    a.ferry_ok(&["replication", "resume", "app", "--resync"]);
    wait_for("the resync", Duration::from_secs(90), || {
        status(&a, "app")["state"] == "replicating"
    });

    // The event log has every step, with stable codes and severities; it survives a
    // daemon restart.
    a.stop_daemon();
    a.launch();
    let ev = events(&a, "app");
    for e in &ev {
        println!(
            "event {} {} {} {}: {}",
            e["id"], e["code"], e["severity"], e["kind"], e["message"]
        );
    }
    let has = |kind: &str, code: u64, pred: &dyn Fn(&str) -> bool| {
        ev.iter()
            .any(|e| e["kind"] == kind && e["code"] == code && pred(e["message"].as_str().unwrap()))
    };
    assert!(has("replication_enabled", 1000, &|_| true));
    assert!(has("cycle_failed", 1030, &|_| true));
    assert!(has("health_changed", 1020, &|m| m.contains("-> warning")));
    assert!(has("health_changed", 1020, &|m| m.contains("-> critical")));
    assert!(has("health_changed", 1020, &|m| m.contains("-> normal")));
    assert!(has("replication_state", 1010, &|m| m
        .contains("-> resynchronization_required")));
    assert!(has("resync_started", 1040, &|_| true));
    assert!(has("resync_finished", 1041, &|_| true));
    assert!(has("statistics_reset", 1090, &|_| true));
    let crit = ev
        .iter()
        .find(|e| {
            e["kind"] == "health_changed" && e["message"].as_str().unwrap().contains("-> critical")
        })
        .unwrap();
    assert_eq!(crit["severity"], "error");
    let ids: Vec<i64> = ev.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let text = a.ferry_ok(&["events", "--vm", "app"]);
    assert!(text.contains("health_changed"), "{text}");
}
