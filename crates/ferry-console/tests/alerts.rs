//! Alerts end to end, with real parts: two ferryd hosts replicating a real guest through a
//! cuttable link, a real SMTP server (aiosmtpd, requiring STARTTLS and AUTH) and a real
//! HTTP webhook receiver, both started by the test. Cutting the link makes the console
//! send one alert mail and one webhook; restoring it (and resetting the statistics, as
//! Hyper-V's Warning needs) sends one clear mail and one webhook — exactly one of each,
//! however long the condition lasted and however its level changed. A host going down and
//! coming back is alerted and cleared the same way. Bad alert settings change nothing.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::smtp::{smtp_certificates, SmtpServer};
use common::{free_port, host_form, start_guest, wait_until, Console};
use ferry_testkit::host::Host;
use ferry_testkit::link::Link;
use ferry_testkit::replication::{enable_replica_server_at, status, wait_for};
use serde_json::Value;

/// An HTTP server that records every JSON document POSTed to it and answers 200, or, while
/// `refuse` is set, records nothing and answers 503 (a receiver that is down).
fn webhook_receiver() -> (SocketAddr, Arc<Mutex<Vec<Value>>>, Arc<AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let refuse = Arc::new(AtomicBool::new(false));
    let r = refuse.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut raw = Vec::new();
            let mut buf = [0u8; 8192];
            let body = loop {
                let n = s.read(&mut buf).unwrap_or(0);
                if n == 0 {
                    break None;
                }
                raw.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&raw).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        assert!(head.starts_with("POST /hook "), "{head}");
                        break Some(body[..len].to_owned());
                    }
                }
            };
            if r.load(Ordering::SeqCst) {
                let _ = s.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            }
            if let Some(v) = body.and_then(|b| serde_json::from_str::<Value>(&b).ok()) {
                g.lock().unwrap().push(v);
            }
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (addr, got, refuse)
}

fn count(hooks: &Arc<Mutex<Vec<Value>>>, event: &str, rule: &str) -> usize {
    hooks
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h["event"] == event && h["rule"] == rule)
        .count()
}

#[test]
fn alerts_mail_and_webhook_once_when_replication_is_cut_and_once_when_it_is_restored() {
    // The SMTP server's certificate, from a CA the console is told to trust.
    let tls = tempfile::tempdir().unwrap();
    let path = |n: &str| tls.path().join(n).to_str().unwrap().to_owned();
    smtp_certificates(tls.path());
    let smtp_port = free_port();
    let smtp = SmtpServer::start(smtp_port, &path("cert.pem"), &path("key.pem"));
    let (hook_addr, hooks, refuse) = webhook_receiver();

    // Two hosts, the replica behind a cuttable link, a guest replicating every 5 s.
    let a = Host::start("site-a", "127.0.0.1", "accel = \"tcg\"");
    let mut b = Host::start("site-b", "127.0.0.2", "accel = \"tcg\"");
    let port: u16 = ferry_testkit::replication::free_port("127.0.0.2")
        .parse()
        .unwrap();
    let storage = enable_replica_server_at(&b, &port.to_string());
    let (_, b_fp) = b.credentials();
    let link = Link::start("127.0.0.1", SocketAddr::from(([127, 0, 0, 2], port)));
    start_guest(&a, "app", 53);
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

    // The webhook receiver is on loopback, which webhooks may target only when the
    // console's config allows it.
    let console = Console::start_with(2, "webhook_allow = [\"127.0.0.1\"]");
    let cookie = console.login();
    for h in [&a, &b] {
        let (url, fp, token) = host_form(h);
        let to = console.post(
            &cookie,
            "/hosts",
            &[("url", &url), ("fingerprint", &fp), ("token", &token)],
        );
        assert!(to.contains("ok="), "{to}");
    }

    // Bad settings are refused in one line and change nothing.
    let smtp_port_s = smtp_port.to_string();
    let hook_url = format!("http://{hook_addr}/hook");
    let console_url = format!("http://{}", console.addr);
    let ca_file = path("ca.pem");
    let mut settings = vec![
        ("health_min", "warning"),
        ("rpo_factor", "3"),
        ("resync_required", "on"),
        ("initial_not_finished_min", "60"),
        ("failover_not_reversed_min", "60"),
        ("host_unreachable", "on"),
        ("test_failover_max_age_days", "30"),
        // Off until the end, where it is tried at 100 %.
        ("storage_free_min_percent", "0"),
        ("debounce_s", "4"),
        ("smtp_host", "127.0.0.1"),
        ("smtp_port", "not-a-port"),
        ("smtp_security", "starttls"),
        ("smtp_username", "ferry"),
        ("smtp_password", "mail-secret"),
        ("smtp_ca_file", &ca_file),
        ("mail_from", "ferry@console.test"),
        ("mail_to", "ops@example.test"),
        ("webhook_url", &hook_url),
        ("console_url", &console_url),
    ];
    let to = console.post(&cookie, "/alerts/settings", &settings);
    assert!(to.contains("err=SMTP%20port"), "{to}");
    assert!(!console.get(&cookie, "/alerts").contains("127.0.0.1"));
    let port_field = settings
        .iter()
        .position(|(k, _)| *k == "smtp_port")
        .unwrap();
    settings[port_field].1 = &smtp_port_s;
    let to = console.post(&cookie, "/alerts/settings", &settings);
    assert!(to.contains("ok="), "{to}");
    let page = console.get(&cookie, "/alerts");
    assert!(
        !page.contains("mail-secret"),
        "the SMTP password is shown back"
    );
    // The "send a test notification" button reaches both channels.
    let to = console.post(&cookie, "/alerts/test", &[]);
    assert!(
        to.contains("ok=test%20notification%20sent%20%28email%2C%20webhook%29"),
        "{to}"
    );
    smtp.wait_subject(
        "[ferry] ALERT: test (ferry-console)",
        Duration::from_secs(30),
    );
    wait_until("the test webhook", Duration::from_secs(30), || {
        count(&hooks, "alert_started", "test") == 1
    });
    smtp.mails.lock().unwrap().clear();

    // Normal first: no alert, no mail (but the test one).
    wait_until("Normal on the dashboard", Duration::from_secs(90), || {
        console
            .get(&cookie, "/")
            .contains(r#"<td class="rel-health"><span class="health normal""#)
    });
    std::thread::sleep(Duration::from_secs(6));
    assert!(smtp.subjects().is_empty(), "{:?}", smtp.subjects());

    // Cut: one alert mail (over STARTTLS, authenticated) and one webhook.
    link.partition();
    let mail = smtp.wait_subject("ALERT: app: health", Duration::from_secs(90));
    println!("alert mail: {mail}");
    assert_eq!(mail["user"], "ferry");
    assert!(
        mail["tls"].as_str().unwrap_or("").starts_with("TLSv1."),
        "{mail}"
    );
    assert_eq!(mail["to"][0], "ops@example.test");
    assert_eq!(mail["from"], "ferry@console.test");
    let body = mail["body"].as_str().unwrap();
    assert!(body.contains("site-a -> site-b"), "{body}");
    assert!(body.contains(&format!("{console_url}/alerts")), "{body}");
    wait_until("the alert webhook", Duration::from_secs(30), || {
        count(&hooks, "alert_started", "health") == 1
    });
    // It gets worse (Critical) while cut: still one alert.
    wait_for("Critical", Duration::from_secs(90), || {
        a.ferry_json(&["replication", "health", "app"])[0]["health"] == "critical"
    });
    std::thread::sleep(Duration::from_secs(6));
    let health_alerts = |s: &[String], tag: &str| {
        s.iter()
            .filter(|x| x.contains(&format!("{tag}: app: health")))
            .count()
    };
    assert_eq!(
        health_alerts(&smtp.subjects(), "ALERT"),
        1,
        "{:?}",
        smtp.subjects()
    );

    // The cut also stops recovery points: the RPO passes 3 x the interval.
    smtp.wait_subject("ALERT: app: rpo", Duration::from_secs(90));

    // Restore: recovery points arrive again, and the RPO alert clears by itself, with
    // nobody touching anything.
    link.heal();
    let cycle = status(&a, "app")["last_cycle"].as_i64().unwrap();
    wait_for("a cycle after the cut", Duration::from_secs(60), || {
        status(&a, "app")["last_cycle"].as_i64().unwrap() > cycle
    });
    let mail = smtp.wait_subject("CLEARED: app: rpo", Duration::from_secs(60));
    println!("RPO clear mail: {mail}");
    // Health is Hyper-V's: the missed cycles stay in the monitoring window (Warning) until
    // it rolls over or the statistics are reset, as an operator does once the cause is
    // fixed; then its alert clears too, once.
    assert_eq!(health_alerts(&smtp.subjects(), "CLEARED"), 0);
    a.ferry_ok(&["replication", "health", "app", "--reset"]);
    b.ferry_ok(&["replication", "health", "app", "--reset"]);
    let mail = smtp.wait_subject("CLEARED: app: health", Duration::from_secs(60));
    println!("clear mail: {mail}");
    wait_until("the clear webhook", Duration::from_secs(30), || {
        count(&hooks, "alert_cleared", "health") == 1
    });
    std::thread::sleep(Duration::from_secs(8));
    let subjects = smtp.subjects();
    println!("mails: {subjects:?}");
    assert_eq!(health_alerts(&subjects, "ALERT"), 1, "{subjects:?}");
    assert_eq!(health_alerts(&subjects, "CLEARED"), 1, "{subjects:?}");
    assert_eq!(count(&hooks, "alert_started", "health"), 1);
    assert_eq!(count(&hooks, "alert_cleared", "health"), 1);
    // The RPO rule started and cleared exactly once; no other rule fired.
    assert_eq!(count(&hooks, "alert_started", "rpo"), 1);
    assert_eq!(count(&hooks, "alert_cleared", "rpo"), 1);
    for rule in ["resync_required", "host_unreachable"] {
        let (s, c) = (
            count(&hooks, "alert_started", rule),
            count(&hooks, "alert_cleared", rule),
        );
        assert!(s <= 1 && s == c, "{rule}: {s} starts, {c} clears");
    }
    // The alerts page lists it as past, with its four deliveries.
    let page = console.get(&cookie, "/alerts");
    let past = page.split(r#"id="past-alerts""#).nth(1).unwrap();
    let row = past
        .split("<tr data-rule=\"health\">")
        .nth(1)
        .expect("the health alert among past alerts");
    assert!(
        row.contains("start email ok; start webhook ok; clear email ok; clear webhook ok"),
        "{row}"
    );

    // A host that stops answering is alerted, and cleared when it is back. The webhook
    // receiver is down when the alert starts: the delivery fails, is recorded as failed,
    // and is sent again once the receiver is back (once).
    refuse.store(true, Ordering::SeqCst);
    b.stop_daemon();
    smtp.wait_subject("ALERT: host_unreachable (site-b)", Duration::from_secs(60));
    wait_until(
        "the failed webhook delivery",
        Duration::from_secs(30),
        || {
            let page = console.get(&cookie, "/alerts");
            page.split("<tr data-rule=\"host_unreachable\">")
                .nth(1)
                .is_some_and(|row| row.contains("start webhook FAILED"))
        },
    );
    assert_eq!(count(&hooks, "alert_started", "host_unreachable"), 0);
    refuse.store(false, Ordering::SeqCst);
    wait_until("the webhook sent again", Duration::from_secs(60), || {
        count(&hooks, "alert_started", "host_unreachable") == 1
    });
    b.launch();
    smtp.wait_subject(
        "CLEARED: host_unreachable (site-b)",
        Duration::from_secs(60),
    );
    let hook = hooks
        .lock()
        .unwrap()
        .iter()
        .find(|h| h["rule"] == "host_unreachable")
        .cloned()
        .unwrap();
    assert_eq!(hook["host"], "site-b", "{hook}");
    assert_eq!(count(&hooks, "alert_started", "host_unreachable"), 1);
    assert_eq!(count(&hooks, "alert_cleared", "host_unreachable"), 1);

    // Replica storage free space, as site-b measures it: no filesystem has 100 % free, so
    // that threshold alerts, and turning the rule off clears it.
    let pct = settings
        .iter()
        .position(|(k, _)| *k == "storage_free_min_percent")
        .unwrap();
    settings[pct].1 = "100";
    console.post(&cookie, "/alerts/settings", &settings);
    let mail = smtp.wait_subject("ALERT: storage_free (site-b)", Duration::from_secs(60));
    let body = mail["body"].as_str().unwrap();
    assert!(
        body.contains(&format!(
            "Replica storage {} on site-b has",
            storage.display()
        )),
        "{body}"
    );
    assert!(console
        .get(&cookie, "/hosts")
        .contains(&format!("{}: ", storage.display())));
    settings[pct].1 = "0";
    console.post(&cookie, "/alerts/settings", &settings);
    smtp.wait_subject("CLEARED: storage_free (site-b)", Duration::from_secs(60));
}
