//! The real Debian guest (`guest/debian/`): its installer ISO, the UEFI firmware, a raw
//! QEMU runner for it, and a synchronous guest agent client to check the installed system.
//!
//! [`debian_image`] builds (or reuses, from `/var/cache/ferry-debian/<key>`) a bookworm root
//! from Debian packages and an ISO whose live system installs it onto the VM's first virtio
//! disk unattended (GPT: ESP + ext4 root, grub at the removable EFI path) and powers off.
//! [`RawVm`] runs QEMU directly (q35, TCG, OVMF pflash); once `ferry vm create` has
//! `--cdrom` and `--firmware uefi`, tests can hand the same [`DebianImage::iso`] to Ferry
//! instead.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::repo_root;

/// The cached build of `guest/debian/build.sh`.
#[derive(Debug, Clone)]
pub struct DebianImage {
    /// The installer ISO (BIOS + EFI bootable).
    pub iso: PathBuf,
    /// Its cache directory (also holds `root.squashfs`, `vmlinuz`, `live-initrd.gz`).
    pub dir: PathBuf,
}

/// The Debian guest's installer ISO, built by `guest/debian/build.sh` if its cache is cold
/// (a few minutes; a tenth of a second when cached; the script serializes builds itself).
/// Panics loudly if it cannot be built.
pub fn debian_image() -> DebianImage {
    let out = Command::new(repo_root().join("guest/debian/build.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run guest/debian/build.sh");
    assert!(
        out.status.success(),
        "guest/debian/build.sh failed (run scripts/install-deps.sh as root)"
    );
    let iso = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        iso.is_file(),
        "guest/debian/build.sh printed no ISO: {iso:?}"
    );
    let dir = iso.parent().expect("cache dir").to_path_buf();
    DebianImage { iso, dir }
}

/// Installs the guest from `iso` onto `disk` (raw; erased) in a UEFI VM with the OVMF vars
/// `vars`: boots the ISO, waits for the installer to power off, and checks its console
/// (`console_log`) says `FERRY-INSTALL: DONE`. Returns how long it took.
pub fn install(iso: &Path, disk: &Path, vars: &Path, console_log: &Path) -> Result<Duration> {
    let t = Instant::now();
    let mut vm = RawVm::start(&RawVmConfig {
        disk: disk.to_path_buf(),
        disk_format: "raw",
        cdrom: Some(iso.to_path_buf()),
        vars: vars.to_path_buf(),
        agent_socket: None,
        console_log: console_log.to_path_buf(),
        memory_mib: 1024,
    })?;
    let finished = vm.wait_exit(Duration::from_secs(480));
    let console = vm.console();
    if finished.is_err() || !console.contains("FERRY-INSTALL: DONE") {
        bail!(
            "the install did not finish ({finished:?}); console:\n{}",
            tail(&console, 40)
        );
    }
    Ok(t.elapsed())
}

/// Makes `to` a fresh copy of the OVMF vars template (a VM's empty NVRAM).
pub fn fresh_vars(to: &Path) -> Result<()> {
    std::fs::copy(ovmf().vars_template, to)
        .with_context(|| format!("copy OVMF vars to {}", to.display()))?;
    Ok(())
}

impl DebianImage {
    /// Where the installed, never booted disk is cached (qcow2).
    pub fn installed_disk_path(&self) -> PathBuf {
        self.dir.join("installed.qcow2")
    }

    /// Keeps a freshly installed raw disk (not yet booted: its first boot makes the
    /// machine-id) as the cached installed disk, unless one is cached already.
    pub fn cache_installed_disk(&self, raw: &Path) -> Result<PathBuf> {
        let path = self.installed_disk_path();
        let _lock = self.lock()?;
        if path.is_file() {
            return Ok(path);
        }
        let tmp = self.dir.join("installed.qcow2.tmp");
        let out = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(raw)
            .arg(&tmp)
            .output()
            .context("run qemu-img")?;
        if !out.status.success() {
            bail!(
                "qemu-img convert: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// The installed guest's disk (qcow2, never booted), installed from the ISO once per
    /// build and then cached next to it (a few minutes under TCG the first time). Use it as
    /// a backing file or copy it; it boots with a fresh copy of the OVMF vars ([`fresh_vars`]),
    /// since grub sits at the removable-media path.
    pub fn installed_disk(&self) -> Result<PathBuf> {
        let path = self.installed_disk_path();
        if path.is_file() {
            return Ok(path);
        }
        let dir = tempfile::tempdir()?;
        let raw = dir.path().join("disk.raw");
        std::fs::File::create(&raw)?.set_len(INSTALL_DISK_BYTES)?;
        let vars = dir.path().join("OVMF_VARS.fd");
        fresh_vars(&vars)?;
        install(&self.iso, &raw, &vars, &dir.path().join("install.log"))?;
        self.cache_installed_disk(&raw)
    }

    /// Serializes writers of the cache directory across test processes.
    fn lock(&self) -> Result<std::fs::File> {
        let f = std::fs::File::create(self.dir.join(".lock"))?;
        f.lock()?;
        Ok(f)
    }
}

/// Size of the disk the guest is installed on (sparse: about 700 MB are used).
pub const INSTALL_DISK_BYTES: u64 = 4 << 30;

/// OVMF (Debian's `ovmf` package): the firmware code, and the template of a VM's NVRAM
/// variables (copy it per VM: the firmware writes to it).
#[derive(Debug, Clone)]
pub struct Ovmf {
    pub code: PathBuf,
    pub vars_template: PathBuf,
}

/// The 4 MiB OVMF build without secure boot. Panics with the package to install.
pub fn ovmf() -> Ovmf {
    let o = Ovmf {
        code: PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        vars_template: PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.fd"),
    };
    assert!(
        o.code.is_file() && o.vars_template.is_file(),
        "OVMF is missing: apt-get install ovmf (scripts/install-deps.sh)"
    );
    o
}

/// What a [`RawVm`] gets.
#[derive(Debug, Clone)]
pub struct RawVmConfig {
    /// The VM's only disk, as a virtio-blk device.
    pub disk: PathBuf,
    /// Its format: "raw" or "qcow2" (e.g. an overlay on [`DebianImage::installed_disk`]).
    pub disk_format: &'static str,
    /// An ISO in a SATA CD-ROM drive.
    pub cdrom: Option<PathBuf>,
    /// This VM's copy of the OVMF variables.
    pub vars: PathBuf,
    /// Unix socket for the guest agent channel (`org.qemu.guest_agent.0`, as Ferry names it).
    pub agent_socket: Option<PathBuf>,
    /// Where the serial console (ttyS0) is written.
    pub console_log: PathBuf,
    pub memory_mib: u32,
}

/// A QEMU process (q35, TCG, UEFI) run directly, killed when dropped.
pub struct RawVm {
    child: Child,
    console_log: PathBuf,
}

impl RawVm {
    /// Starts QEMU. One vCPU: CI runs two TCG guests at once on two cores.
    pub fn start(cfg: &RawVmConfig) -> Result<Self> {
        let fw = ovmf();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-machine", "q35", "-smp", "1"])
            .args(["-m", &cfg.memory_mib.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                fw.code.display()
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                cfg.vars.display()
            ))
            .arg("-drive")
            .arg(format!(
                "if=none,id=disk0,format={},file={}",
                cfg.disk_format,
                cfg.disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=disk0"])
            // A NIC with QEMU's user-mode network (in-process, no host network): the guest's
            // DHCP client gets an address from it.
            .args(["-nic", "user,model=virtio-net-pci"])
            .arg("-serial")
            .arg(format!("file:{}", cfg.console_log.display()));
        if let Some(iso) = &cfg.cdrom {
            cmd.arg("-drive")
                .arg(format!(
                    "if=none,id=cd0,media=cdrom,readonly=on,file={}",
                    iso.display()
                ))
                .args(["-device", "ide-cd,drive=cd0,bus=ide.0"]);
        }
        if let Some(sock) = &cfg.agent_socket {
            cmd.arg("-chardev")
                .arg(format!(
                    "socket,id=qga0,path={},server=on,wait=off",
                    sock.display()
                ))
                .args(["-device", "virtio-serial-pci,id=vser0"])
                .args([
                    "-device",
                    "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
                ]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start qemu-system-x86_64 (scripts/install-deps.sh installs it)")?;
        Ok(RawVm {
            child,
            console_log: cfg.console_log.clone(),
        })
    }

    /// The serial console so far (firmware and grub write bytes that are not UTF-8).
    pub fn console(&self) -> String {
        let bytes = std::fs::read(&self.console_log).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Waits until QEMU exits (the guest powered off); its exit status must be 0.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("QEMU exited with {status}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the guest did not power off within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for RawVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last `n` lines of a console log, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What a command run through the guest agent (`guest-exec`) did.
#[derive(Debug, Clone)]
pub struct ExecResult {
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
}

/// A synchronous client of the real qemu-guest-agent, for tests: ping, exec, shutdown.
/// (Ferry's own client, `ferry_qemu::agent`, does what ferryd needs: freeze and thaw.)
pub struct Qga {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Qga {
    /// Connects to the agent channel and synchronizes (`guest-sync` with a fresh id), retrying
    /// until the agent in the guest answers or `timeout` passes. The channel's socket exists
    /// from QEMU's start, but nothing answers before the guest's agent runs.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let mut next_id = u64::from(std::process::id()) * 1_000_000;
        loop {
            next_id += 1;
            let attempt = (|| -> Result<Self> {
                let stream = UnixStream::connect(socket)?;
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut qga = Qga {
                    reader: BufReader::new(stream.try_clone()?),
                    writer: stream,
                    next_id,
                };
                let id = qga.next_id;
                qga.send("guest-sync", json!({ "id": id }))?;
                // Replies left in the channel by an earlier client come first: skip them.
                while qga.read_reply("guest-sync")?.as_u64() != Some(id) {}
                qga.writer.set_read_timeout(Some(Duration::from_secs(30)))?;
                Ok(qga)
            })();
            match attempt {
                Ok(qga) => return Ok(qga),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("no guest agent answered within {timeout:?}")))
                }
                Err(_) => std::thread::sleep(Duration::from_secs(1)),
            }
        }
    }

    /// Sends one command and returns its `return` value; an `error` reply is an error.
    pub fn call(&mut self, command: &str, arguments: Value) -> Result<Value> {
        self.send(command, arguments)?;
        self.read_reply(command)
    }

    fn send(&mut self, command: &str, arguments: Value) -> Result<()> {
        let mut msg = json!({ "execute": command });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        Ok(())
    }

    fn read_reply(&mut self, command: &str) -> Result<Value> {
        loop {
            let mut reply = String::new();
            if self.reader.read_line(&mut reply)? == 0 {
                bail!("the guest agent channel closed");
            }
            let Ok(v) = serde_json::from_str::<Value>(reply.trim()) else {
                continue; // noise on the channel
            };
            if let Some(err) = v.get("error") {
                bail!("guest agent refused {command}: {err}");
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
        }
    }

    /// `guest-ping`.
    pub fn ping(&mut self) -> Result<()> {
        self.call("guest-ping", Value::Null).map(|_| ())
    }

    /// Runs `path args...` in the guest (`guest-exec` with captured output) and waits up to
    /// `timeout` for it to exit.
    pub fn exec(&mut self, path: &str, args: &[&str], timeout: Duration) -> Result<ExecResult> {
        let r = self.call(
            "guest-exec",
            json!({ "path": path, "arg": args, "capture-output": true }),
        )?;
        let pid = r["pid"]
            .as_i64()
            .ok_or_else(|| anyhow!("guest-exec answered {r}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.call("guest-exec-status", json!({ "pid": pid }))?;
            if s["exited"].as_bool() == Some(true) {
                let text = |key: &str| -> Result<String> {
                    let b64 = s[key].as_str().unwrap_or("");
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .with_context(|| format!("{key} of {path}"))?;
                    Ok(String::from_utf8_lossy(&bytes).into_owned())
                };
                return Ok(ExecResult {
                    // Killed by a signal: no exitcode; report it as -signal.
                    exit_code: s["exitcode"]
                        .as_i64()
                        .unwrap_or_else(|| -s["signal"].as_i64().unwrap_or(0)),
                    stdout: text("out-data")?,
                    stderr: text("err-data")?,
                });
            }
            if Instant::now() > deadline {
                bail!("{path} {args:?} did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `guest-shutdown` (powerdown). The agent sends no reply to it.
    pub fn shutdown(&mut self) -> Result<()> {
        self.send("guest-shutdown", Value::Null)
    }
}

/// Byte offset of the Linux root partition (GPT type 0FC63DAF-…) on a raw disk, read with
/// `sfdisk -J` (util-linux).
pub fn root_partition_offset(disk: &Path) -> Result<u64> {
    let out = Command::new("/usr/sbin/sfdisk")
        .arg("-J")
        .arg(disk)
        .output()
        .context("run sfdisk (apt-get install fdisk)")?;
    if !out.status.success() {
        bail!(
            "sfdisk -J {}: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let table = &v["partitiontable"];
    let sector = table["sectorsize"].as_u64().unwrap_or(512);
    table["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| {
            p["type"]
                .as_str()
                .is_some_and(|t| t.eq_ignore_ascii_case("0FC63DAF-8483-4772-8E79-3D69D8477DE4"))
        })
        .and_then(|p| p["start"].as_u64())
        .map(|start| start * sector)
        .ok_or_else(|| anyhow!("no Linux root partition on {}", disk.display()))
}

/// `e2fsck -fn` of the root filesystem inside a raw disk (read-only: changes nothing).
/// Returns e2fsck's output; an error if it found anything to fix.
pub fn fsck_root(disk: &Path) -> Result<String> {
    let offset = root_partition_offset(disk)?;
    // e2fsprogs' unix I/O manager takes the partition's offset after a '?'.
    let out = Command::new("/usr/sbin/e2fsck")
        .arg("-fn")
        .arg(format!("{}?offset={offset}", disk.display()))
        .output()
        .context("run e2fsck (apt-get install e2fsprogs)")?;
    // stderr (the version banner) first, so the summary line ends the text.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    if !out.status.success() {
        bail!("e2fsck -fn found problems ({}):\n{text}", out.status);
    }
    Ok(text)
}
