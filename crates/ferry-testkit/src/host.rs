//! A real `ferryd` for tests: its own temp directory (config, data, VM storage, admin
//! socket, log), a free TLS port on a loopback address, and the `ferry` CLI pointed at it.
//! Dropping a [`Host`] kills its ferryd and every QEMU it started (found by pidfile).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::guest::GuestWorkload;
use crate::{bin_dir, test_guest};

/// A running (or stopped) ferryd for a test.
pub struct Host {
    /// The host's name.
    pub name: String,
    /// Its temp directory (holds everything below).
    pub dir: tempfile::TempDir,
    /// Config file.
    pub config: PathBuf,
    /// Data dir.
    pub data_dir: PathBuf,
    /// VM storage.
    pub vm_storage: PathBuf,
    /// Admin socket.
    pub socket: PathBuf,
    /// TLS API address.
    pub tls_addr: String,
    /// ferryd's log file.
    pub log: PathBuf,
    child: Option<Child>,
    /// Its certificate is issued by the test CA (else ferryd makes a self-signed one).
    ca_issued: bool,
    /// A command ferryd runs under (e.g. `nsenter` into a cluster node's namespaces).
    launcher: Vec<String>,
}

/// What a `ferry` invocation did.
#[derive(Debug)]
pub struct CliResult {
    /// Exit code.
    pub code: i32,
    /// Stdout.
    pub stdout: String,
    /// Stderr.
    pub stderr: String,
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

impl Host {
    /// Writes a config (plus `extra` TOML lines) and starts ferryd on `ip`.
    pub fn start(name: &str, ip: &str, extra: &str) -> Self {
        let host = Self::configure(name, ip, extra);
        let mut host = host;
        host.launch();
        host
    }

    /// Writes the config without starting ferryd; the host's certificate is issued by the
    /// test organization's CA ([`crate::pki::test_ca`]), whose certificate is in
    /// [`Host::trusted_ca`].
    /// The files are written when ferryd is first launched (or by
    /// [`Host::issue_identity`]): a config ferryd refuses leaves no data dir behind.
    pub fn configure(name: &str, ip: &str, extra: &str) -> Self {
        let mut host = Self::configure_self_signed(name, ip, extra);
        host.ca_issued = true;
        host
    }

    /// Writes the CA-issued identity into the data dir unless one is there (a host made
    /// with [`Host::configure`]; ferryd uses these files instead of making its own).
    pub fn issue_identity(&self) {
        if self.ca_issued && !self.data_dir.join("host.key").exists() {
            crate::pki::test_ca().issue_host(&self.name, &self.data_dir);
        }
    }

    /// Like [`Host::start`], but ferryd makes its own self-signed certificate (its default
    /// without an organization CA).
    pub fn start_self_signed(name: &str, ip: &str, extra: &str) -> Self {
        let mut host = Self::configure_self_signed(name, ip, extra);
        host.launch();
        host
    }

    /// The test CA's certificate as a file (what `replica-server set --trust-ca` takes).
    pub fn trusted_ca(&self) -> PathBuf {
        let path = self.dir.path().join("trusted-ca.pem");
        if !path.exists() {
            std::fs::write(&path, &crate::pki::test_ca().pem).expect("write the CA");
        }
        path
    }

    /// Writes the config without starting ferryd, leaving its identity to ferryd.
    pub fn configure_self_signed(name: &str, ip: &str, extra: &str) -> Self {
        // Short paths: unix sockets are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("ferry-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let data_dir = dir.path().join("data");
        let vm_storage = dir.path().join("vms");
        let socket = dir.path().join("ferryd.sock");
        let tls_addr = format!("{ip}:{}", free_port(ip));
        let config = dir.path().join("ferryd.toml");
        std::fs::write(
            &config,
            format!(
                "name = \"{name}\"\ndata_dir = \"{}\"\nvm_storage = \"{}\"\nadmin_socket = \"{}\"\ntls_listen = \"{tls_addr}\"\n{}{extra}\n",
                data_dir.display(),
                vm_storage.display(),
                socket.display(),
                // Tests keep their images, ISOs, exports and loop devices in temp dirs, the
                // checkout (the test guest) and the Debian guest's cache.
                if extra.contains("file_roots") {
                    String::new()
                } else {
                    format!(
                        "file_roots = [\"/tmp\", \"{}\", \"/var/cache/ferry-debian\", \"/dev\"]\n",
                        crate::repo_root().display()
                    )
                },
            ),
        )
        .expect("write config");
        let log = dir.path().join("ferryd.log");
        Self {
            name: name.to_owned(),
            dir,
            config,
            data_dir,
            vm_storage,
            socket,
            tls_addr,
            log,
            child: None,
            ca_issued: false,
            launcher: Vec::new(),
        }
    }

    /// A host whose ferryd runs under `launcher` (a cluster node's `nsenter …`), with its
    /// config already written in `dir`: `socket` is where the admin socket appears outside
    /// the node, `tls_addr` where the node listens.
    pub fn in_namespaces(
        name: &str,
        dir: tempfile::TempDir,
        socket: PathBuf,
        tls_addr: String,
        vm_storage: PathBuf,
        launcher: Vec<String>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            config: dir.path().join("ferryd.toml"),
            data_dir: dir.path().join("data"),
            log: dir.path().join("ferryd.log"),
            dir,
            vm_storage,
            socket,
            tls_addr,
            child: None,
            ca_issued: false,
            launcher,
        }
    }

    /// Starts ferryd and waits until its API answers.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "ferryd already running");
        self.issue_identity();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let ferryd = bin_dir().join("ferryd");
        let mut cmd = match self.launcher.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&ferryd);
                c
            }
            None => Command::new(&ferryd),
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .env("FERRY_LOG", "info,ferry=debug")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn ferryd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ferry(&["server", "show"]).code == 0 {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "ferryd exited with {status} at start; log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ferryd did not answer in 30 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// ferryd's pid, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM (graceful shutdown) and wait; returns the exit code.
    pub fn stop_daemon(&mut self) -> i32 {
        let mut child = self.child.take().expect("ferryd running");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().expect("wait ferryd");
        status.code().unwrap_or(-1)
    }

    /// Forgets a ferryd that was killed from outside (a fenced node), reaping it.
    pub fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL (a crash) and wait.
    pub fn kill_daemon(&mut self) {
        let mut child = self.child.take().expect("ferryd running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Runs `ferry ARGS` against this host's admin socket.
    pub fn ferry(&self, args: &[&str]) -> CliResult {
        self.ferry_with(args, &[])
    }

    /// `ferry ARGS` against this host, not yet run (to run it in the background).
    pub fn ferry_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin_dir().join("ferry"));
        cmd.args(args)
            .env("FERRY_SOCKET", &self.socket)
            .env("FERRY_HOSTS_FILE", self.dir.path().join("hosts.json"))
            .env_remove("FERRY_HOST")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `ferry ARGS` with extra environment variables.
    pub fn ferry_with(&self, args: &[&str], env: &[(&str, &str)]) -> CliResult {
        let mut cmd = self.ferry_cmd(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out: Output = cmd.output().expect("run ferry");
        CliResult {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `ferry vm create NAME` of the verifiable test guest: a direct boot of its kernel and
    /// initramfs, writing `workload` without end, one write every `interval_s` seconds.
    /// `options` are the other `vm create` options (`--memory`, `--disk`, `--nic`, …).
    pub fn create_guest_vm(
        &self,
        name: &str,
        workload: GuestWorkload,
        interval_s: f64,
        options: &[&str],
    ) {
        let (kernel, initrd) = test_guest();
        let append = workload.kernel_args(0, interval_s);
        let mut args = vec![
            "vm",
            "create",
            name,
            "--kernel",
            kernel.to_str().expect("utf-8 path"),
            "--initrd",
            initrd.to_str().expect("utf-8 path"),
            "--append",
            &append,
        ];
        args.extend_from_slice(options);
        self.ferry_ok(&args);
    }

    /// Runs `ferry ARGS`, panicking with its stderr unless it succeeds; returns stdout.
    pub fn ferry_ok(&self, args: &[&str]) -> String {
        let r = self.ferry(args);
        assert_eq!(
            r.code, 0,
            "ferry {args:?} failed: {}\n{}",
            r.stderr, r.stdout
        );
        r.stdout
    }

    /// Runs `ferry ARGS` expecting failure; returns the one-line error.
    pub fn ferry_err(&self, args: &[&str]) -> String {
        let r = self.ferry(args);
        assert_ne!(r.code, 0, "ferry {args:?} should have failed: {}", r.stdout);
        let err = r.stderr.trim().to_owned();
        assert_eq!(err.lines().count(), 1, "error must be one line: {err:?}");
        assert!(err.starts_with("ferry: error: "), "{err}");
        err
    }

    /// Runs `ferry --output json ARGS` and parses stdout.
    pub fn ferry_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.ferry_ok(&all);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("ferry {args:?}: bad JSON ({e}): {out}"))
    }

    /// A VM's state as ferry reports it.
    pub fn vm_state(&self, vm: &str) -> String {
        self.ferry_json(&["vm", "show", vm])["state"]
            .as_str()
            .expect("state")
            .to_owned()
    }

    /// The VM's serial console output so far (from the API).
    pub fn console(&self, vm: &str) -> String {
        self.ferry_ok(&["vm", "console", vm, "--log"])
    }

    /// Waits until `pred(console)` holds, or panics after `timeout` with the console.
    pub fn wait_console(
        &self,
        vm: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console(vm);
            if pred(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what} on {vm}'s console:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The console log read from disk, for when ferryd is down.
    pub fn offline_console(host: &Host, vm: &str) -> String {
        std::fs::read_to_string(host.vm_storage.join(vm).join("console.log")).unwrap_or_default()
    }

    /// ferryd's log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The API token and certificate fingerprint, for remote access.
    pub fn credentials(&self) -> (String, String) {
        let token = std::fs::read_to_string(self.data_dir.join("api.token"))
            .expect("token")
            .trim()
            .to_owned();
        let fp = self.ferry_json(&["server", "show"])["fingerprint"]
            .as_str()
            .expect("fingerprint")
            .to_owned();
        (token, fp)
    }

    /// Pids of the QEMU processes this host's ferryd started (from pidfiles).
    pub fn qemu_pids(&self) -> Vec<u32> {
        qemu_pids(&self.data_dir.join("run"))
    }
}

fn qemu_pids(run: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(run) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// True if `pid` is a live (non-zombie) process.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let marker = self.data_dir.display().to_string();
        for pid in qemu_pids(&self.data_dir.join("run")) {
            // Only a QEMU of ours: a stale pidfile's pid may belong to someone else now.
            let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&marker))
                .unwrap_or(false);
            if !ours {
                continue;
            }
            // SAFETY: kill(2) on a pid read from this host's own pidfile.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if std::thread::panicking() {
            eprintln!("--- ferryd log of {} ---\n{}", self.name, self.log_text());
        }
    }
}
