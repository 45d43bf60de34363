//! Bad input — names, sizes, images, kernels, bridges, states, configs, a missing QEMU —
//! gets a clear one-line error, and changes nothing: the inventory and the VM storage
//! directory look exactly as before.

use std::process::Command;

use ferry_testkit::bin_dir;
use ferry_testkit::host::Host;

/// A fingerprint of everything a failed command could have changed.
fn snapshot(host: &Host) -> (serde_json::Value, Vec<String>) {
    let list = host.ferry_json(&["vm", "list"]);
    let mut files: Vec<String> = walk(&host.vm_storage);
    files.sort();
    (list, files)
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            out.push(format!("{} {len}", p.display()));
            if p.is_dir() {
                out.extend(walk(&p));
            }
        }
    }
    out
}

#[test]
fn bad_requests_are_refused_with_one_line_and_change_nothing() {
    let host = Host::start("a", "127.0.0.1", "accel = \"tcg\"");
    host.ferry_ok(&[
        "vm", "create", "existing", "--memory", "64M", "--disk", "16M",
    ]);
    let image = host.dir.path().join("src.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-f", "qcow2"])
        .arg(&image)
        .arg("48M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let not_an_image = host.dir.path().join("text.img");
    std::fs::write(&not_an_image, "").unwrap();
    let before = snapshot(&host);

    let cases: &[(&[&str], &str)] = &[
        (
            &["vm", "create", "existing", "--disk", "1G"],
            "already exists",
        ),
        (
            &["vm", "create", "../escape", "--disk", "1G"],
            "contains '/'",
        ),
        (
            &["vm", "create", "..", "--disk", "1G"],
            "must start with a letter or digit",
        ),
        (&["vm", "create", "", "--disk", "1G"], "empty"),
        (
            &["vm", "create", &"x".repeat(65), "--disk", "1G"],
            "limit is 64",
        ),
        (
            &["vm", "create", "v", "--cpus", "0", "--disk", "1G"],
            "cpus must be between",
        ),
        (
            &["vm", "create", "v", "--memory", "1M", "--disk", "1G"],
            "memory must be between",
        ),
        (&["vm", "create", "v", "--memory", "lots"], "--memory lots"),
        (
            &["vm", "create", "v", "--disk", "0"],
            "size must be between",
        ),
        (
            &["vm", "create", "v", "--disk", "/tmp/nonexistent/disk.qcow2"],
            "/tmp/nonexistent/disk.qcow2 not found",
        ),
        // The API reads and writes files only in its file roots: the token is not a key
        // to the host's secrets.
        (
            &["vm", "create", "v", "--disk", "/etc/shadow,format=raw"],
            "disk image /etc/shadow is outside the folders",
        ),
        (
            &["vm", "create", "v", "--kernel", "/etc/shadow"],
            "kernel /etc/shadow is outside the folders",
        ),
        (
            &["vm", "create", "v", "--cdrom", "/root/secret.iso"],
            "ISO /root/secret.iso is outside the folders",
        ),
        (
            &["vm", "import", "/etc"],
            "import folder /etc is outside the folders",
        ),
        (
            &[
                "replica-server",
                "set",
                "--enable",
                "--storage",
                "/etc/ferry-replicas",
            ],
            "storage /etc/ferry-replicas is outside the folders",
        ),
        (
            &["vm", "create", "v", "--kernel", "/tmp/nonexistent/vmlinuz"],
            "kernel /tmp/nonexistent/vmlinuz not found",
        ),
        (&["vm", "create", "v", "--append", "x"], "need --kernel"),
        (
            &[
                "vm",
                "create",
                "v",
                "--disk",
                "1G",
                "--nic",
                "bridge=nosuchbr0",
            ],
            "bridge nosuchbr0 does not exist",
        ),
        (
            &["vm", "create", "v", "--disk", "1G", "--nic", "bridge"],
            "no default_bridge",
        ),
        (
            &["vm", "create", "v", "--disk", "1G", "--nic", "tap"],
            "use bridge=BR",
        ),
        (
            &["vm", "create", "v", "--disk", "1G", "--nic", "bridge=a,b"],
            "not a valid interface name",
        ),
        (&["vm", "start", "ghost"], "no VM named \"ghost\""),
        (&["vm", "show", "ghost"], "no VM named \"ghost\""),
        (&["vm", "delete", "ghost"], "no VM named \"ghost\""),
        (&["vm", "stop", "existing"], "already off"),
        (&["vm", "pause", "existing"], "already off"),
        (&["vm", "console", "existing"], "no QEMU process"),
        (&["checkpoint", "create", "ghost"], "no VM named \"ghost\""),
        (
            &["checkpoint", "create", "existing", &"n".repeat(101)],
            "at most 100 characters",
        ),
        (
            &["checkpoint", "create", "existing", " "],
            "cannot be empty",
        ),
        (
            &["checkpoint", "apply", "existing", "nosuch"],
            "has no checkpoint \"nosuch\"",
        ),
        (
            &["checkpoint", "delete", "existing", "42", "--subtree"],
            "has no checkpoint \"42\"",
        ),
        (
            &["checkpoint", "rename", "existing", "nosuch", "x"],
            "has no checkpoint \"nosuch\"",
        ),
        (
            &[
                "checkpoint",
                "export",
                "existing",
                "nosuch",
                "/tmp/ferry-never",
            ],
            "has no checkpoint \"nosuch\"",
        ),
        (
            &["vm", "import", "/tmp/nonexistent/export"],
            "is not a Ferry export",
        ),
        (
            &["--host", "nosuchhost", "vm", "list"],
            "unknown host \"nosuchhost\"",
        ),
        (
            &["--host", "https://127.0.0.1:1", "vm", "list"],
            "needs --token-file (or --token) and --fingerprint",
        ),
    ];
    for (args, want) in cases {
        let err = host.ferry_err(args);
        assert!(err.contains(want), "ferry {args:?}: {err}");
        assert_eq!(snapshot(&host), before, "ferry {args:?} changed something");
    }
    // An empty file is a valid raw image to qemu-img, so importing it is refused by size.
    let err = host.ferry_err(&[
        "vm",
        "create",
        "v",
        "--disk",
        &format!("{},format=raw", not_an_image.display()),
    ]);
    assert!(err.contains("size must be between"), "{err}");
    assert_eq!(snapshot(&host), before);

    // The API refuses malformed JSON and unknown fields the same way.
    let r = host.ferry(&["vm", "list"]);
    assert_eq!(r.code, 0);
    let api = |method: &str, path: &str, body: &str| -> (u16, serde_json::Value) {
        let out = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&host.socket)
            .args([
                "-X",
                method,
                "-H",
                "content-type: application/json",
                "-d",
                body,
            ])
            .arg(format!("http://ferryd{path}"))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (json, code) = text.rsplit_once('\n').expect("status line");
        (
            code.parse().unwrap(),
            serde_json::from_str(json).unwrap_or_default(),
        )
    };
    for (method, path, body, want) in [
        (
            "POST",
            "/v1/vms/existing/checkpoints",
            r#"{"kind":"weird"}"#,
            "unknown variant",
        ),
        (
            "POST",
            "/v1/vms/existing/checkpoints",
            r#"{"nme":"x"}"#,
            "unknown field",
        ),
        ("POST", "/v1/vms/existing/checkpoints", "{", "EOF"),
        (
            "POST",
            "/v1/vms/existing/checkpoints/1/frobnicate",
            "{}",
            "no checkpoint action",
        ),
        (
            "POST",
            "/v1/vms/existing/checkpoints/1/rename",
            "{}",
            "missing field",
        ),
        (
            "POST",
            "/v1/import",
            r#"{"dir":"relative"}"#,
            "absolute path",
        ),
        (
            "DELETE",
            "/v1/vms/existing/checkpoints/1?subtree=maybe",
            "",
            "subtree",
        ),
    ] {
        let (code, err) = api(method, path, body);
        let msg = err["message"].as_str().unwrap_or_default();
        assert!(
            (400..500).contains(&code) && msg.contains(want) && !msg.contains('\n'),
            "{method} {path} {body}: {code} {err}"
        );
        assert_eq!(snapshot(&host), before, "{method} {path} changed something");
    }

    // A good import works and copies the image as qcow2 of the same size.
    host.ferry_ok(&[
        "vm",
        "create",
        "imported",
        "--memory",
        "64M",
        "--disk",
        image.to_str().unwrap(),
    ]);
    let info = host.ferry_json(&["vm", "show", "imported"]);
    assert_eq!(info["disks"][0]["size_bytes"], 48u64 << 20);
    assert!(info["disks"][0]["path"]
        .as_str()
        .unwrap()
        .ends_with("imported/disk0.qcow2"));
    assert!(image.exists(), "import must copy, not move");

    // A start that QEMU refuses leaves the VM off with the reason; a missing disk too.
    std::fs::remove_file(host.vm_storage.join("imported/disk0.qcow2")).unwrap();
    let err = host.ferry_err(&["vm", "start", "imported"]);
    assert!(err.contains("disk") && err.contains("missing"), "{err}");
    assert_eq!(host.vm_state("imported"), "off");
}

#[test]
fn missing_qemu_binary_is_a_clear_error_and_the_vm_stays_off() {
    let host = Host::start(
        "a",
        "127.0.0.1",
        "accel = \"tcg\"\nqemu_binary = \"/nonexistent/qemu-system-x86_64\"",
    );
    host.ferry_ok(&["vm", "create", "v", "--memory", "64M", "--disk", "16M"]);
    let err = host.ferry_err(&["vm", "start", "v"]);
    assert!(err.contains("/nonexistent/qemu-system-x86_64"), "{err}");
    assert!(err.contains("apt-get install qemu-system-x86"), "{err}");
    let info = host.ferry_json(&["vm", "show", "v"]);
    assert_eq!(info["state"], "off");
    assert!(
        info["last_error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent"),
        "{info}"
    );
}

#[test]
fn bad_configs_stop_ferryd_at_start_with_one_line() {
    let cases = [
        ("bogus_key = 1", "unknown field `bogus_key`"),
        ("accel = \"xen\"", "unknown variant `xen`"),
        ("default_bridge = \"no/slash\"", "default_bridge"),
    ];
    for (extra, want) in cases {
        let host = Host::configure("a", "127.0.0.1", extra);
        let out = Command::new(bin_dir().join("ferryd"))
            .arg("--config")
            .arg(&host.config)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr
            .lines()
            .find(|l| l.starts_with("ferryd: "))
            .unwrap_or_else(|| panic!("{stderr}"));
        assert!(line.contains(want), "{extra}: {line}");
        assert!(
            !host.data_dir.exists(),
            "a refused config must not create the data dir"
        );
    }
    let out = Command::new(bin_dir().join("ferryd"))
        .args(["--config", "/nonexistent/ferryd.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot read config file /nonexistent/ferryd.toml"));
}

#[test]
fn an_unknown_log_format_is_one_line_and_starts_nothing_and_json_logs_json() {
    let host = Host::configure("a", "127.0.0.1", "accel = \"tcg\"");
    let console_dir = host.dir.path().join("console");
    let console_cfg = host.dir.path().join("console.toml");
    std::fs::write(
        &console_cfg,
        format!(
            "listen = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n",
            ferry_testkit::replication::free_port("127.0.0.1"),
            console_dir.display()
        ),
    )
    .unwrap();
    let runs = [
        (
            "ferryd",
            Command::new(bin_dir().join("ferryd"))
                .arg("--config")
                .arg(&host.config)
                .args(["--log-format", "xml"])
                .output()
                .unwrap(),
        ),
        (
            "ferry-console",
            Command::new(bin_dir().join("ferry-console"))
                .arg("--config")
                .arg(&console_cfg)
                .args(["--log-format", "xml"])
                .output()
                .unwrap(),
        ),
    ];
    for (bin, out) in runs {
        assert_eq!(out.status.code(), Some(2), "{bin}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr,
            format!("{bin}: error: unknown --log-format \"xml\": use text or json\n")
        );
        assert!(out.stdout.is_empty(), "{bin}: {out:?}");
    }
    assert!(!host.data_dir.exists(), "ferryd must not have started");
    assert!(!console_dir.exists(), "the console must not have started");

    // `--log-format json` on the console: its log lines are JSON objects.
    std::fs::write(
        &console_cfg,
        format!(
            "listen = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n[auth]\nmode = \"proxy_header\"\nheader = \"X-User\"\n",
            ferry_testkit::replication::free_port("127.0.0.1"),
            console_dir.display()
        ),
    )
    .unwrap();
    let mut console = Command::new(bin_dir().join("ferry-console"))
        .arg("--config")
        .arg(&console_cfg)
        .args(["--log-format", "json"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(console.stderr.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _ = console.kill();
    let _ = console.wait();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_eq!(v["level"], "INFO", "{v}");
    assert!(
        v["fields"]["message"]
            .as_str()
            .unwrap()
            .contains("listening"),
        "{v}"
    );
}
