//! Ferry watched the way operators watch servers: the shipped Prometheus rules pass their
//! `promtool` unit tests (and a rules file that does not parse is caught), and a real
//! Prometheus server scrapes two real ferryd over their TLS API (host certificate as CA,
//! bearer token from the token file) while a real guest replicates. Every dashboard
//! panel's and every rule's expression returns series, `increase()` of the cycle counter
//! across a statistics reset equals the cycles done, the RPO computed in PromQL agrees
//! with `ferry replication status`, the alert rules go pending on a real suspension, a
//! scrape without the token gets 401 and nothing else, and ferryd's JSON log lines about
//! cycles carry the VM, relationship and cycle.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::guest::{parse_console, GuestWorkload};
use ferry_testkit::host::Host;
use ferry_testkit::replication::{enable_replica_server, free_port, status, wait_for};
use serde_json::Value;

fn contrib() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib")
}

fn promtool(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian's prometheus package, installed by scripts/install-deps.sh)")
}

#[test]
fn shipped_rules_pass_promtool_and_a_rules_file_that_does_not_parse_is_caught() {
    let dir = contrib().join("prometheus");
    let out = promtool(&["check", "rules", "ferry-rules.yml"], &dir);
    assert!(out.status.success(), "{out:?}");
    let out = promtool(&["test", "rules", "ferry-rules.test.yml"], &dir);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS"), "{text}");

    // The same tests against a copy whose Critical rule has a broken expression: promtool
    // refuses the rules file, so a typo cannot ship.
    let tmp = tempfile::tempdir().unwrap();
    let rules = std::fs::read_to_string(dir.join("ferry-rules.yml")).unwrap();
    assert!(rules.contains("expr: ferry_replication_health == 2"));
    std::fs::write(
        tmp.path().join("ferry-rules.yml"),
        rules.replace(
            "expr: ferry_replication_health == 2",
            "expr: ferry_replication_health == (2",
        ),
    )
    .unwrap();
    std::fs::copy(
        dir.join("ferry-rules.test.yml"),
        tmp.path().join("ferry-rules.test.yml"),
    )
    .unwrap();
    let out = promtool(&["test", "rules", "ferry-rules.test.yml"], tmp.path());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a broken rules file passed: {text}");
    assert!(text.contains("parse error"), "{text}");
}

/// A Prometheus server for the test, stopped when dropped.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes every host over TLS once a second with the shipped rules loaded.
    fn start(hosts: &[&Host]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port("127.0.0.1");
        let mut cfg = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n",
        );
        cfg.push_str(&format!(
            "  - {}\nscrape_configs:\n",
            contrib().join("prometheus/ferry-rules.yml").display()
        ));
        for h in hosts {
            // What docs/MONITORING.md tells operators: https, the host certificate as the
            // CA (its name is "ferryd"), the token file as bearer credentials.
            cfg.push_str(&format!(
                "  - job_name: ferry-{name}\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n      server_name: ferryd\n    authorization:\n      credentials_file: {token}\n    static_configs:\n      - targets: ['{addr}']\n",
                name = h.name,
                ca = h.data_dir.join("host.crt").display(),
                token = h.data_dir.join("api.token").display(),
                addr = h.tls_addr,
            ));
        }
        let cfg_path = dir.path().join("prometheus.yml");
        std::fs::write(&cfg_path, &cfg).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's package, installed by scripts/install-deps.sh)");
        let p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        wait_for("Prometheus to be ready", Duration::from_secs(60), || {
            Command::new("curl")
                .args(["-sf", &format!("{}/-/ready", p.url)])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        p
    }

    fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-G"]);
        for (k, v) in params {
            cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let out = cmd.arg(format!("{}{path}", self.url)).output().unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{path}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(v["status"], "success", "{path} {params:?}: {v}");
        v["data"].clone()
    }

    /// An instant query's result vector.
    fn query(&self, q: &str) -> Vec<Value> {
        self.api("/api/v1/query", &[("query", q)])["result"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// The single value `q` returns.
    fn value(&self, q: &str) -> f64 {
        let r = self.query(q);
        assert_eq!(r.len(), 1, "{q}: {r:?}");
        r[0]["value"][1].as_str().unwrap().parse().unwrap()
    }
}

/// Waits until replication of `vm` is suspended and no cycle runs any more (the count of
/// successful cycles stays the same for 3 s).
fn wait_quiet(host: &Host, vm: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let before = count_ok_cycles(host);
        std::thread::sleep(Duration::from_secs(3));
        let st = status(host, vm);
        if st["state"] == "suspended" && st["progress"].is_null() && count_ok_cycles(host) == before
        {
            return before;
        }
        assert!(
            Instant::now() < deadline,
            "cycles of {vm} never stopped: {st}"
        );
    }
}

fn count_ok_cycles(host: &Host) -> u64 {
    let out = Command::new("sqlite3")
        .arg(host.data_dir.join("ferry.db"))
        .arg("SELECT count(*) FROM cycles WHERE ok = 1")
        .output()
        .expect("sqlite3");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Waits until Prometheus's newest sample of `q` equals `want`.
fn wait_value(prom: &Prometheus, q: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = prom.query(q);
        let got = r
            .first()
            .map(|s| s["value"][1].as_str().unwrap().parse::<f64>().unwrap());
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{q} never became {want}; last {got:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn prometheus_scrapes_ferryd_over_tls_while_a_guest_replicates() {
    // ferryd logs JSON here (FERRY_LOG_FORMAT is --log-format's variable; nextest runs
    // each test in its own process, so this reaches only this test's daemons).
    std::env::set_var("FERRY_LOG_FORMAT", "json");
    let a = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    let b = Host::start("b", "127.0.0.2", "accel = \"tcg\"");
    enable_replica_server(&b, "127.0.0.2");
    let (b_token, b_fp) = b.credentials();
    a.ferry_ok(&[
        "host",
        "add",
        "b",
        &format!("https://{}", b.tls_addr),
        "--fingerprint",
        &b_fp,
        "--token",
        &b_token,
    ]);
    a.create_guest_vm(
        "app",
        GuestWorkload {
            seed: 41,
            start: 1,
            span_blocks: 1024,
        },
        0.2,
        &["--memory", "256M", "--disk", "32M"],
    );
    a.ferry_ok(&["vm", "start", "app"]);
    a.wait_console("app", Duration::from_secs(60), "guest writes", |c| {
        parse_console(c).last_wrote_seq.unwrap_or(0) >= 1
    });
    let enabled = a.ferry(&[
        "replication",
        "enable",
        "app",
        "--to",
        "b",
        "--interval",
        "5s",
        "--wait",
    ]);
    assert_eq!(enabled.code, 0, "{enabled:?}");
    // Off a terminal, --wait's progress is plain lines on stdout, never redrawn in place;
    // stderr stays for errors.
    assert!(enabled.stderr.is_empty(), "{enabled:?}");
    let progress: Vec<&str> = enabled
        .stdout
        .lines()
        .take_while(|l| !l.starts_with("VM:"))
        .collect();
    println!("--wait printed {progress:?}");
    assert!(
        !progress.is_empty(),
        "no progress before the result: {enabled:?}"
    );
    assert!(!enabled.stdout.contains('\r'), "{enabled:?}");
    assert!(!enabled.stdout.contains('\u{1b}'), "{enabled:?}");

    // 1. A scrape without the token: 401 and no metric.
    for h in [&a, &b] {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--cacert"])
            .arg(h.data_dir.join("host.crt"))
            .args(["--connect-to", &format!("ferryd:443:{}", h.tls_addr)])
            .arg("https://ferryd/metrics")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.ends_with("\n401"), "{text}");
        assert!(!text.contains("ferry_"), "{text}");
    }

    // 2. Prometheus scrapes both hosts over TLS with the token while the guest replicates.
    let prom = Prometheus::start(&[&a, &b]);
    wait_for("both targets up", Duration::from_secs(60), || {
        prom.query("up == 1").len() == 2
    });
    wait_for("a few cycles scraped", Duration::from_secs(90), || {
        prom.query(r#"ferry_replication_cycles_total{vm="app", role="primary"} >= 3"#)
            .len()
            == 1
            && prom
                .query(r#"ferry_replication_window_average_latency_seconds{vm="app"}"#)
                .len()
                == 2
    });
    // Rates need two samples in their range; the rules need an evaluation.
    std::thread::sleep(Duration::from_secs(3));
    let info = prom.query("ferry_build_info");
    assert_eq!(info.len(), 2, "{info:?}");
    assert_eq!(info[0]["metric"]["version"], env!("CARGO_PKG_VERSION"));

    // Every panel's expression returns series (the dashboard's variables at "All").
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(contrib().join("grafana/ferry.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".*")
                .replace("$vm", ".*")
                .replace("$__rate_interval", "30s");
            let r = prom.query(&expr);
            assert!(
                !r.is_empty(),
                "panel {:?}: {expr} returns nothing",
                panel["title"]
            );
            exprs += 1;
        }
    }
    assert!(exprs >= 11, "{exprs}");
    // The dashboard's variables find the hosts and the VM.
    for var in dash["templating"]["list"].as_array().unwrap() {
        if var["type"] == "query" {
            let def = var["definition"].as_str().unwrap();
            let metric = def
                .trim_start_matches("label_values(")
                .split([',', '{'])
                .next()
                .unwrap();
            assert!(!prom.query(metric).is_empty(), "{def}");
        }
    }

    // Every rule Prometheus loaded evaluates without error; each recording rule's
    // expression returns series, and every series each alert's expression selects exists.
    let groups = prom.api("/api/v1/rules", &[]);
    let mut alerts = 0;
    let mut records = 0;
    for g in groups["groups"].as_array().unwrap() {
        for rule in g["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "{rule}");
            let q = rule["query"].as_str().unwrap();
            if rule["type"] == "recording" {
                records += 1;
                assert!(
                    !prom.query(q).is_empty(),
                    "recording rule {q} returns nothing"
                );
            } else {
                // An alert's expression returns series only while it alerts: each series
                // it selects must be there.
                alerts += 1;
                let names = metric_names(q);
                assert!(!names.is_empty(), "{q}");
                for name in names {
                    assert!(
                        !prom.query(&format!("{{__name__=\"{name}\"}}")).is_empty(),
                        "alert {}: {name} has no series",
                        rule["name"]
                    );
                }
            }
        }
    }
    assert!(records >= 6 && alerts >= 10, "{records} {alerts}");
    // All is well: nothing fires.
    let firing = prom.api("/api/v1/alerts", &[]);
    assert_eq!(firing["alerts"], serde_json::json!([]), "{firing}");

    // 3. Suspend: no more cycles. Prometheus's counter then equals the cycles the store
    //    recorded; the RPO computed in PromQL agrees with `ferry replication status`; the
    //    suspension alerts go pending.
    a.ferry_ok(&["replication", "suspend", "app"]);
    let before = wait_quiet(&a, "app");
    let counter = r#"ferry_replication_cycles_total{vm="app", role="primary"}"#;
    wait_value(&prom, counter, before as f64);
    // From here on, Prometheus's samples hold `before` until the reset and resume below.
    let flat_since = Instant::now();
    let flat_wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let st = status(&a, "app");
    let last_point = st["last_point_at"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let rpo_status = now - last_point;
    let rpo_promql = prom.value(
        r#"time() - ferry_replication_last_point_timestamp_seconds{vm="app", role="primary"}"#,
    );
    println!("RPO: status {rpo_status} s, PromQL {rpo_promql:.1} s");
    assert!(
        (rpo_promql - rpo_status as f64).abs() <= 2.0,
        "RPO: status says {rpo_status} s, PromQL {rpo_promql}"
    );
    let recorded = prom.value(r#"ferry:replication_rpo:seconds{vm="app", role="primary"}"#);
    assert!((recorded - rpo_status as f64).abs() <= 3.0, "{recorded}");
    wait_for(
        "the suspension alerts to go pending",
        Duration::from_secs(30),
        || {
            let alerts = prom.api("/api/v1/alerts", &[]);
            let names: Vec<&str> = alerts["alerts"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["labels"]["vm"] == "app")
                .map(|a| a["labels"]["alertname"].as_str().unwrap())
                .collect();
            names.contains(&"FerryReplicationSuspended")
                && names.contains(&"FerryReplicationWarning")
        },
    );

    // 4. Reset the statistics, resume, let cycles run, suspend again: increase() across
    //    the reset is exactly the cycles done, and Prometheus saw no counter reset.
    // (A few flat samples first: the range below starts at `flat_since`.)
    let wait = Duration::from_secs(3).saturating_sub(flat_since.elapsed());
    std::thread::sleep(wait);
    let h = a.ferry_json(&["replication", "health", "app", "--reset"]);
    assert_eq!(h[0]["successful_cycles"], 0, "{h}");
    a.ferry_ok(&["replication", "resume", "app"]);
    for _ in 0..2 {
        a.ferry_ok(&["replication", "now", "app"]);
    }
    a.ferry_ok(&["replication", "suspend", "app"]);
    let after = wait_quiet(&a, "app");
    let done = after - before;
    assert!(done >= 2, "{done}");
    wait_value(&prom, counter, after as f64);
    // The window's gauge starts again at the reset; the counter does not.
    let window = prom.value(r#"ferry_replication_window_cycles{vm="app", role="primary"}"#);
    assert_eq!(window, done as f64);
    // The range: from the first sample after `flat_since` (before the reset) to the
    // newest one, both exactly on sample times, so increase() needs no extrapolation.
    std::thread::sleep(Duration::from_secs(2));
    let raw = prom.query(&format!("{counter}[2m]"));
    let samples: Vec<(f64, f64)> = raw[0]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v[0].as_f64().unwrap(),
                v[1].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    let &(from, first) = samples
        .iter()
        .find(|(t, _)| *t >= flat_wall)
        .expect("samples since the counter was flat");
    let &(to, last) = samples.last().unwrap();
    assert_eq!((first, last), (before as f64, after as f64), "{samples:?}");
    let range_ms = ((to - from) * 1000.0).round() as u64;
    let at = format!("{to:.3}");
    let at_end = |q: String| -> f64 {
        let r = prom.api("/api/v1/query", &[("query", &q), ("time", &at)])["result"].clone();
        r[0]["value"][1].as_str().unwrap().parse().unwrap()
    };
    let inc = at_end(format!("increase({counter}[{range_ms}ms])"));
    let resets = at_end(format!("resets({counter}[{range_ms}ms])"));
    println!("cycles done {done}; increase() over {range_ms} ms: {inc}, resets {resets}");
    assert_eq!(resets, 0.0);
    assert_eq!(inc, done as f64, "increase() {inc} vs {done} cycles done");

    // 5. ferryd's JSON log: every line of a cycle carries the VM, relationship and cycle.
    let log = a.log_text();
    let cycle_lines: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["span"]["name"] == "cycle")
        .collect();
    assert!(
        cycle_lines
            .iter()
            .any(|v| v["fields"]["message"] == "cycle replicated"),
        "{log}"
    );
    let relationship = cycle_lines[0]["span"]["relationship"].clone();
    assert!(relationship.is_string(), "{relationship}");
    for v in &cycle_lines {
        assert_eq!(v["span"]["vm"], "app", "{v}");
        assert_eq!(v["span"]["relationship"], relationship, "{v}");
        assert!(v["span"]["cycle"].is_u64(), "{v}");
    }
    // The replica's lines of the same cycles, and the event lines (state changes, as
    // failovers are logged) carry the same relationship.
    let replica_lines = b
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "recovery point committed")
        .inspect(|v| {
            assert_eq!(v["span"]["vm"], "app", "{v}");
            assert_eq!(v["span"]["relationship"], relationship, "{v}");
            assert!(v["span"]["cycle"].is_u64(), "{v}");
        })
        .count();
    assert!(replica_lines >= 1);
    let suspended = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["event"] == "replication_state")
        .expect("a state change logged");
    assert_eq!(suspended["fields"]["vm"], "app", "{suspended}");
    assert_eq!(
        suspended["fields"]["relationship"], relationship,
        "{suspended}"
    );
}

/// The metric names an expression selects (label matchers, strings and function names
/// left out): Ferry's families and `up`.
fn metric_names(q: &str) -> Vec<String> {
    let mut plain = String::new();
    let (mut depth, mut quoted) = (0, false);
    for c in q.chars() {
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => depth += 1,
            '}' if !quoted => depth -= 1,
            _ if quoted || depth > 0 => {}
            c => plain.push(c),
        }
    }
    let mut names: Vec<String> = plain
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("ferry") || *w == "up")
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn metric_names_of_rule_expressions() {
    assert_eq!(
        metric_names(r#"up{job=~"ferry.*"} == 0"#),
        ["up".to_owned()]
    );
    assert_eq!(
        metric_names(
            "ferry:replication_rpo:intervals{role=\"replica\"} > 3\n  and on (instance, job, vm, role) ferry_replication_state{role=\"replica\", state=\"replicating\"} == 1"
        ),
        ["ferry:replication_rpo:intervals", "ferry_replication_state"]
    );
}
