//! QEMU process lifecycle: the command line of a VM, starting it daemonized,
//! tracking it by pid, and probing which accelerator really works.
//!
//! A VM runs as a daemonized QEMU (`-daemonize -pidfile`). It is not a child
//! of ferryd, so ferryd can restart, read the pidfile and re-attach to QMP
//! without the VM noticing. The flip side is that ferryd cannot `wait()` for
//! it; liveness comes from `/proc` ([`pid_alive`]) and pid reuse is guarded
//! against with [`pid_cmdline_contains`].

use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::process::Command;
use tokio::time::Instant;

use crate::hardware::Hardware;

/// Longest unix socket path QEMU can bind: `sun_path` is 108 bytes including
/// the terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// How long [`spawn_daemonized`] waits for the QEMU parent to report that the
/// VM is set up. Opening disks on slow storage is the long part.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Interval of the `/proc` polls in [`wait_exit`] and the probes.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A path would be embedded in a QEMU option string, which cannot hold a
    /// comma without escaping we choose not to rely on.
    #[error("{what} path {path:?} contains a comma, which QEMU's option syntax cannot take")]
    PathContainsComma {
        /// Which path (e.g. "disk 0", "QMP socket").
        what: String,
        /// The offending path.
        path: PathBuf,
    },
    /// A path is relative; QEMU changes to `/` when it daemonizes, so later
    /// uses of a relative path (socket unlink, pidfile removal) would miss.
    #[error(
        "{what} path {path:?} is relative; a daemonized QEMU runs in / and needs absolute paths"
    )]
    RelativePath {
        /// Which path.
        what: String,
        /// The offending path.
        path: PathBuf,
    },
    /// A unix socket path does not fit into `sockaddr_un`.
    #[error(
        "{what} socket path {path:?} is {len} bytes; unix sockets allow at most {SUN_PATH_MAX}"
    )]
    SocketPathTooLong {
        /// Which socket.
        what: String,
        /// The offending path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// A non-path setting is unusable.
    #[error("Invalid {what} {value:?}: {reason}")]
    InvalidSetting {
        /// Which setting.
        what: String,
        /// Its value.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The pidfile names a live QEMU of this VM; starting another would
    /// unlink its sockets and leave it unreachable.
    #[error("QEMU for this VM is already running as pid {pid}")]
    AlreadyRunning {
        /// The running QEMU.
        pid: u32,
    },
    /// A stale socket or pidfile of an earlier run could not be removed.
    #[error("Failed to remove stale file {path:?}")]
    RemoveStale {
        /// The file.
        path: PathBuf,
        /// Why removal failed.
        #[source]
        source: std::io::Error,
    },
    /// The QEMU binary does not exist.
    #[error("QEMU binary {binary:?} not found; install it with `apt-get install qemu-system-x86`")]
    BinaryNotFound {
        /// The binary that was looked up.
        binary: PathBuf,
        /// The error of the exec.
        #[source]
        source: std::io::Error,
    },
    /// Starting the QEMU binary failed for another reason than its absence.
    #[error("Failed to run QEMU binary {binary:?}")]
    SpawnQemu {
        /// The binary.
        binary: PathBuf,
        /// The error of the spawn.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited with an error during startup; the message is its stderr
    /// condensed to one line.
    #[error("{stderr}")]
    StartQemu {
        /// QEMU's exit status.
        status: ExitStatus,
        /// QEMU's stderr on one line (or a note about the exit status when
        /// it printed nothing).
        stderr: String,
    },
    /// QEMU did not finish its startup in time; it was killed.
    #[error("QEMU did not finish starting within {timeout:?} and was killed")]
    StartTimeout {
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// Waiting for QEMU's startup failed at the OS level.
    #[error("Failed to wait for QEMU to start")]
    WaitQemu {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The pidfile could not be read after a successful start.
    #[error("Failed to read pidfile {path:?}")]
    ReadPidfile {
        /// The pidfile.
        path: PathBuf,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The pidfile does not contain a pid.
    #[error("Pidfile {path:?} does not contain a pid: {content:?}")]
    ParsePidfile {
        /// The pidfile.
        path: PathBuf,
        /// What it contained.
        content: String,
    },
    /// The pid can't be signalled safely: 0 and values beyond `i32::MAX`
    /// would address process groups in `kill(2)`.
    #[error("Refusing to signal pid {pid}: not a single-process pid")]
    InvalidPid {
        /// The pid.
        pid: u32,
    },
    /// `kill(2)` failed.
    #[error("Failed to send signal {sig} to pid {pid}")]
    Signal {
        /// The target pid.
        pid: u32,
        /// The signal number.
        sig: i32,
        /// The OS error (e.g. ESRCH when the process is gone).
        #[source]
        source: std::io::Error,
    },
}

/// The accelerator a VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulator; slow but works everywhere.
    Tcg,
}

impl Accel {
    /// The name QEMU's `-accel` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// The CPU model paired with the accelerator: `host` passes the real CPU
    /// through under KVM; TCG can't do that and emulates everything it can.
    fn cpu_model(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }
}

/// Where a NIC's traffic goes on the host.
#[derive(Debug, Clone)]
pub enum NicBackend {
    /// A tap device attached to a Linux bridge through `qemu-bridge-helper`
    /// (the bridge must be allowed in `/etc/qemu/bridge.conf`).
    Bridge {
        /// The bridge interface name, e.g. `br0`.
        bridge: String,
    },
    /// QEMU's user-mode NAT (slirp): no host setup, outbound only.
    User,
}

/// One virtio NIC of a VM.
#[derive(Debug, Clone)]
pub struct NicArg {
    /// Host side of the NIC.
    pub backend: NicBackend,
    /// Guest MAC address, `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
}

/// The name of disk `i`'s qcow2 block node in every VM ferryd starts: QMP commands
/// (bitmaps, fleecing, snapshots) address the disk by it.
pub fn disk_node(i: usize) -> String {
    format!("drive{i}")
}

/// Everything needed to build the QEMU command line of one VM.
#[derive(Debug, Clone)]
pub struct QemuCommand {
    /// The QEMU binary, absolute or looked up in `PATH`.
    pub binary: PathBuf,
    /// VM name, shown in `ps` and to QMP clients.
    pub name: String,
    /// Accelerator.
    pub accel: Accel,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Kernel for direct boot; without it the VM boots from disk 0.
    pub kernel: Option<PathBuf>,
    /// Initrd for direct boot.
    pub initrd: Option<PathBuf>,
    /// Kernel command line for direct boot.
    pub append: Option<String>,
    /// qcow2 disk images; disk `i` becomes block node `drive{i}`.
    pub disks: Vec<PathBuf>,
    /// NICs in guest PCI order.
    pub nics: Vec<NicArg>,
    /// QMP unix socket QEMU listens on.
    pub qmp_socket: PathBuf,
    /// Serial console unix socket QEMU listens on.
    pub console_socket: PathBuf,
    /// File QEMU appends all serial console output to.
    pub console_log: PathBuf,
    /// File QEMU writes its pid to.
    pub pidfile: PathBuf,
    /// Unix socket QEMU's VNC server listens on; `None` gives the VM no display. See
    /// [`push_display`].
    pub vnc_socket: Option<PathBuf>,
    /// Unix socket QEMU listens on for the guest agent channel (a virtio-serial port
    /// named `org.qemu.guest_agent.0`); `None` gives the VM no agent channel.
    pub agent_socket: Option<PathBuf>,
    /// Internal snapshot (a standard checkpoint, with memory state) to resume from: QEMU
    /// starts with `-loadvm TAG -S`, so the vCPUs wait for `cont` (the caller re-arms
    /// change tracking first).
    pub loadvm: Option<String>,
    /// Start as the target of a live migration (`-incoming defer`): QEMU opens the disks
    /// inactive (it neither writes them nor takes the write lock, so the source may keep
    /// them open on shared storage), does not run the guest, and waits for
    /// `migrate-incoming` (see [`crate::migration::prepare_incoming`]). Everything else
    /// must equal the source's command line (same hardware, node names and devices).
    /// Without `-S`, QEMU starts the guest by itself once the migration completes if it
    /// ran on the source. Can't be combined with [`loadvm`](Self::loadvm).
    pub incoming: bool,
    /// Machine type, firmware, disk buses, CD drive, boot order, RNG.
    pub hardware: Hardware,
}

impl QemuCommand {
    /// Checks what [`args`](Self::args) cannot express: commas in paths,
    /// relative paths, socket paths too long for `sockaddr_un`, malformed
    /// MACs and bridge names.
    pub fn validate(&self) -> Result<(), ProcessError> {
        check_value("VM name", &self.name)?;
        if self.cpus == 0 {
            return Err(invalid("CPU count", "0", "a VM needs at least one vCPU"));
        }
        if self.memory_mib == 0 {
            return Err(invalid("memory size", "0", "a VM needs memory"));
        }
        if let (true, Some(tag)) = (self.incoming, &self.loadvm) {
            return Err(invalid(
                "snapshot to resume",
                tag,
                "a migration target gets its state from the source, not from a snapshot",
            ));
        }

        let mut paths: Vec<(String, &Path)> = vec![
            ("QMP socket".into(), &self.qmp_socket),
            ("console socket".into(), &self.console_socket),
            ("console log".into(), &self.console_log),
            ("pidfile".into(), &self.pidfile),
        ];
        if let Some(kernel) = &self.kernel {
            paths.push(("kernel".into(), kernel));
        }
        if let Some(initrd) = &self.initrd {
            paths.push(("initrd".into(), initrd));
        }
        for (i, disk) in self.disks.iter().enumerate() {
            paths.push((format!("disk {i}"), disk));
        }
        paths.extend(self.hardware.paths());
        for (what, path) in &paths {
            check_path(what, path)?;
        }
        // The binary may be a bare name resolved through PATH; only its
        // commas would matter, and it never lands in an option string.

        if let Some(agent) = &self.agent_socket {
            check_path("guest agent socket", agent)?;
        }
        if let Some(vnc) = &self.vnc_socket {
            check_path("VNC socket", vnc)?;
        }
        let agent = self.agent_socket.as_ref();
        for (what, path) in [
            ("QMP", Some(&self.qmp_socket)),
            ("console", Some(&self.console_socket)),
            ("guest agent", agent),
            ("VNC", self.vnc_socket.as_ref()),
        ]
        .into_iter()
        .filter_map(|(w, p)| p.map(|p| (w, p)))
        {
            let len = path.as_os_str().len();
            if len > SUN_PATH_MAX {
                return Err(ProcessError::SocketPathTooLong {
                    what: what.into(),
                    path: path.clone(),
                    len,
                });
            }
        }

        for (j, nic) in self.nics.iter().enumerate() {
            check_mac(&format!("MAC of NIC {j}"), &nic.mac)?;
            if let NicBackend::Bridge { bridge } = &nic.backend {
                check_bridge(&format!("bridge of NIC {j}"), bridge)?;
            }
        }
        Ok(())
    }

    /// The full argv (without the binary itself). Pure; call
    /// [`validate`](Self::validate) first, as values are not escaped.
    pub fn args(&self) -> Vec<OsString> {
        let mut a = Args::default();
        // `guest=` keeps a name like "debug-threads=on" from being parsed as
        // a property of -name.
        a.push2("-name", format!("guest={}", self.name));
        a.push2("-accel", self.accel.as_str());
        a.push2("-machine", self.hardware.machine_arg());
        a.push2("-cpu", self.accel.cpu_model());
        a.push2("-smp", self.cpus.to_string());
        a.push2("-m", self.memory_mib.to_string());
        // No default devices or config files: the VM has exactly what we
        // list, so node names and PCI order are stable across QEMU builds.
        a.push("-nodefaults");
        a.push("-no-user-config");
        a.push2("-display", "none");
        a.push("-daemonize");
        a.push2("-pidfile", &self.pidfile);

        a.push2(
            "-chardev",
            opt(
                "socket,id=qmp,path=",
                &self.qmp_socket,
                ",server=on,wait=off",
            ),
        );
        a.push2("-mon", "chardev=qmp,mode=control");

        // logfile= records console output even when no client is attached to
        // the socket; logappend keeps earlier boots.
        let mut serial = opt(
            "socket,id=serial0,path=",
            &self.console_socket,
            ",server=on,wait=off,logfile=",
        );
        serial.push(&self.console_log);
        serial.push(",logappend=on");
        a.push2("-chardev", serial);
        a.push2("-serial", "chardev:serial0");

        if let Some(agent) = &self.agent_socket {
            a.push2(
                "-chardev",
                opt("socket,id=qga0,path=", agent, ",server=on,wait=off"),
            );
            a.push2("-device", "virtio-serial-pci,id=vser0");
            a.push2(
                "-device",
                "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
            );
        }

        a.0.extend(self.hardware.firmware_args());
        for (i, disk) in self.disks.iter().enumerate() {
            let file = format!("driver=file,node-name=file{i},filename=");
            a.push2("-blockdev", opt(&file, disk, ",cache.direct=off"));
            // Replication addresses the qcow2 node by this name.
            a.push2(
                "-blockdev",
                format!("driver=qcow2,node-name={},file=file{i}", disk_node(i)),
            );
        }
        a.0.extend(self.hardware.disk_device_args(self.disks.len()));
        a.0.extend(self.hardware.device_args());

        if self.nics.is_empty() {
            a.push2("-nic", "none");
        }
        for (j, nic) in self.nics.iter().enumerate() {
            let netdev = match &nic.backend {
                NicBackend::Bridge { bridge } => format!("bridge,id=net{j},br={bridge}"),
                NicBackend::User => format!("user,id=net{j}"),
            };
            a.push2("-netdev", netdev);
            a.push2(
                "-device",
                format!(
                    "virtio-net-pci,netdev=net{j},mac={}{}",
                    nic.mac,
                    self.hardware.nic_suffix(j)
                ),
            );
        }

        if let Some(vnc) = &self.vnc_socket {
            push_display(&mut a, vnc);
        }

        match &self.kernel {
            Some(kernel) => {
                a.push2("-kernel", kernel);
                if let Some(initrd) = &self.initrd {
                    a.push2("-initrd", initrd);
                }
                if let Some(append) = &self.append {
                    a.push2("-append", append);
                }
            }
            // With a boot order, each device's bootindex decides instead.
            None if self.hardware.boot_order.is_empty() => a.push2("-boot", "c"),
            None => {}
        }
        if let Some(tag) = &self.loadvm {
            a.push2("-loadvm", tag);
            a.push("-S");
        }
        if self.incoming {
            // `defer`: the listening address comes later over QMP, after the migration
            // capabilities are set (dirty-bitmaps must be on before the stream starts).
            a.push2("-incoming", "defer");
        }
        a.0
    }
}

/// The graphical console: a standard VGA adapter (the one every OS installer and
/// firmware drives), a USB tablet so the pointer is absolute (a VNC client's mouse then
/// lands where it points, without pointer grabbing), and QEMU's VNC server on a unix
/// socket only: no TCP port is ever opened; ferryd bridges the socket to authenticated
/// websocket clients. Pushed after the disks and NICs so those keep their PCI slots
/// whether or not the VM has a display.
fn push_display(a: &mut Args, vnc_socket: &Path) {
    a.push2("-device", "VGA,id=vga0");
    a.push2("-device", "qemu-xhci,id=usb0");
    a.push2("-device", "usb-tablet,id=tablet0,bus=usb0.0");
    a.push2("-vnc", opt("unix:", vnc_socket, ""));
}

/// Argv under construction.
#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push(&mut self, arg: impl Into<OsString>) {
        self.0.push(arg.into());
    }

    fn push2(&mut self, flag: &str, value: impl Into<OsString>) {
        self.0.push(flag.into());
        self.0.push(value.into());
    }
}

/// `prefix + path + suffix` without a lossy UTF-8 conversion of the path.
fn opt(prefix: &str, path: &Path, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path);
    s.push(suffix);
    s
}

fn invalid(what: &str, value: &str, reason: &'static str) -> ProcessError {
    ProcessError::InvalidSetting {
        what: what.into(),
        value: value.into(),
        reason,
    }
}

fn check_value(what: &str, value: &str) -> Result<(), ProcessError> {
    if value.is_empty() {
        return Err(invalid(what, value, "must not be empty"));
    }
    if value.contains(',') {
        return Err(invalid(
            what,
            value,
            "contains a comma, which QEMU's option syntax cannot take",
        ));
    }
    Ok(())
}

fn check_path(what: &str, path: &Path) -> Result<(), ProcessError> {
    if path.as_os_str().as_encoded_bytes().contains(&b',') {
        return Err(ProcessError::PathContainsComma {
            what: what.into(),
            path: path.into(),
        });
    }
    if !path.is_absolute() {
        return Err(ProcessError::RelativePath {
            what: what.into(),
            path: path.into(),
        });
    }
    Ok(())
}

fn check_mac(what: &str, mac: &str) -> Result<(), ProcessError> {
    let octets: Vec<&str> = mac.split(':').collect();
    let well_formed = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return Err(invalid(
            what,
            mac,
            "expected six hex octets like 52:54:00:12:34:56",
        ));
    }
    // The low bit of the first octet marks a multicast address, which a NIC
    // can't own: the guest would see no unicast traffic.
    let first = u8::from_str_radix(octets[0], 16).unwrap_or(0);
    if first & 1 == 1 {
        return Err(invalid(what, mac, "is a multicast address"));
    }
    Ok(())
}

fn check_bridge(what: &str, bridge: &str) -> Result<(), ProcessError> {
    check_value(what, bridge)?;
    // IFNAMSIZ is 16 including the NUL.
    if bridge.len() > 15 || bridge.contains(['/', ' ', '=']) {
        return Err(invalid(what, bridge, "is not a valid interface name"));
    }
    Ok(())
}

/// Condenses a tool's stderr to one line for an error message: trimmed
/// non-empty lines joined with "; ".
pub(crate) fn one_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn remove_stale(path: &Path) -> Result<(), ProcessError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(ProcessError::RemoveStale {
            path: path.into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn read_pidfile(path: &Path) -> Result<u32, ProcessError> {
    let content = std::fs::read_to_string(path).map_err(|source| ProcessError::ReadPidfile {
        path: path.into(),
        source,
    })?;
    content
        .trim()
        .parse()
        .map_err(|_| ProcessError::ParsePidfile {
            path: path.into(),
            content,
        })
}

/// Starts the VM as a daemonized QEMU and returns the pid of the daemon.
///
/// A daemonized QEMU is not our child: it is reparented to init, so ferryd
/// can exit or restart and re-attach to the VM through the pidfile and the
/// QMP socket. QEMU's parent process exits only once the VM is set up
/// (disks open, sockets listening), and before that its stderr carries any
/// startup error; a failure is returned as that stderr on one line.
pub async fn spawn_daemonized(cmd: &QemuCommand) -> Result<u32, ProcessError> {
    cmd.validate()?;
    if let Ok(pid) = read_pidfile(&cmd.pidfile) {
        if pid_alive(pid) && pid_cmdline_contains(pid, &cmd.qmp_socket.to_string_lossy()) {
            return Err(ProcessError::AlreadyRunning { pid });
        }
    }
    // A stale socket would make QEMU fail to bind; a stale pidfile would be
    // mistaken for the new VM's if QEMU failed before writing it.
    for path in [&cmd.qmp_socket, &cmd.console_socket, &cmd.pidfile] {
        remove_stale(path)?;
    }
    if let Some(agent) = &cmd.agent_socket {
        remove_stale(agent)?;
    }

    let mut command = Command::new(&cmd.binary);
    command
        .args(cmd.args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Only the short-lived parent is our child; if we give up on it, it
        // must not linger.
        .kill_on_drop(true);
    // SAFETY: the closure runs between fork and exec and only calls
    // setsid(2), which is async-signal-safe and touches no memory of ours.
    unsafe {
        // A new session detaches QEMU from ferryd's terminal and process
        // group from the start, so a Ctrl-C or SIGHUP aimed at ferryd never
        // reaches a VM that is still starting.
        command.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    let child = command.spawn().map_err(|source| {
        if source.kind() == ErrorKind::NotFound {
            ProcessError::BinaryNotFound {
                binary: cmd.binary.clone(),
                source,
            }
        } else {
            ProcessError::SpawnQemu {
                binary: cmd.binary.clone(),
                source,
            }
        }
    })?;

    // The daemon redirects its stderr to /dev/null before it releases the
    // parent, so stderr reaches EOF exactly when the parent exits.
    let output = match tokio::time::timeout(SPAWN_TIMEOUT, child.wait_with_output()).await {
        Ok(result) => result.map_err(|source| ProcessError::WaitQemu { source })?,
        Err(_) => {
            // Dropping the future killed the parent; the daemon wrote its
            // pidfile early, so it can be found and killed too.
            if let Ok(pid) = read_pidfile(&cmd.pidfile) {
                let _ = signal(pid, libc::SIGKILL);
            }
            return Err(ProcessError::StartTimeout {
                timeout: SPAWN_TIMEOUT,
            });
        }
    };

    let stderr = one_line(&output.stderr);
    if !output.status.success() {
        let stderr = if stderr.is_empty() {
            format!(
                "QEMU exited with {} during startup and printed nothing",
                output.status
            )
        } else {
            stderr
        };
        return Err(ProcessError::StartQemu {
            status: output.status,
            stderr,
        });
    }
    if !stderr.is_empty() {
        tracing::warn!(vm = %cmd.name, "QEMU warned during startup: {stderr}");
    }
    let pid = read_pidfile(&cmd.pidfile)?;
    tracing::info!(vm = %cmd.name, pid, "QEMU started");
    Ok(pid)
}

/// Whether a process with this pid exists and is not a zombie.
///
/// A daemonized QEMU that exited stays a zombie until init reaps it; for
/// ferryd it is gone already.
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may
    // itself contain spaces and parentheses; hence the last ')'.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X" | "x") | None)
}

/// Whether any single argument of the process' command line contains
/// `needle`. Guards against pid reuse: check for the VM's QMP socket path
/// before trusting a pid from a pidfile.
pub fn pid_cmdline_contains(pid: u32, needle: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = needle.as_bytes();
    cmdline
        .split(|&b| b == 0)
        .any(|arg| needle.is_empty() || arg.windows(needle.len()).any(|w| w == needle))
}

/// Sends signal `sig` to the single process `pid`.
pub fn signal(pid: u32, sig: i32) -> Result<(), ProcessError> {
    // 0 and anything that turns negative as pid_t would signal a whole
    // process group (or every process we may signal).
    let target = match i32::try_from(pid) {
        Ok(p) if p > 0 => p,
        _ => return Err(ProcessError::InvalidPid { pid }),
    };
    // SAFETY: kill(2) takes plain integers and has no memory-safety
    // preconditions; `target` is a positive pid, so it addresses exactly one
    // process.
    let rc = unsafe { libc::kill(target, sig) };
    if rc == -1 {
        return Err(ProcessError::Signal {
            pid,
            sig,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Waits until `pid` is gone (or a zombie); returns false on timeout.
pub async fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !pid_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A 512-byte MBR that writes 'K' to the debug console port 0xE9 and halts:
///
/// ```text
/// B0 4B   mov al, 'K'
/// E6 E9   out 0xE9, al
/// F4      hlt
/// EB FD   jmp -3        ; back to hlt, in case an interrupt wakes it
/// ```
fn probe_mbr() -> [u8; 512] {
    let mut mbr = [0u8; 512];
    mbr[..7].copy_from_slice(&[0xB0, b'K', 0xE6, 0xE9, 0xF4, 0xEB, 0xFD]);
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    mbr
}

/// Whether a KVM guest actually executes code here.
///
/// Opening `/dev/kvm` is not enough: on some nested setups it opens fine
/// but the guest never gets past the BIOS, or QEMU aborts setting up the
/// vCPU. So this boots a tiny MBR under KVM with the CPU model VMs get
/// (`-cpu host`) and waits up to `timeout` for it to print.
pub async fn probe_kvm(binary: &Path, timeout: Duration) -> bool {
    probe_boot(binary, Accel::Kvm, timeout).await
}

/// Whether the probe MBR boots under TCG; proves the probe itself works, so
/// a false [`probe_kvm`] means KVM rather than the probe is broken.
pub async fn probe_tcg_boots(binary: &Path, timeout: Duration) -> bool {
    probe_boot(binary, Accel::Tcg, timeout).await
}

/// Scratch directory of one probe, removed on drop.
struct ProbeDir(PathBuf);

impl Drop for ProbeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn probe_boot(binary: &Path, accel: Accel, timeout: Duration) -> bool {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = ProbeDir(std::env::temp_dir().join(format!(
        "ferry-probe-{}-{}-{n}",
        std::process::id(),
        accel.as_str()
    )));
    match run_probe(binary, accel, timeout, &dir.0).await {
        Ok(booted) => booted,
        Err(e) => {
            tracing::debug!(accel = accel.as_str(), "Boot probe failed to run: {e}");
            false
        }
    }
}

async fn run_probe(
    binary: &Path,
    accel: Accel,
    timeout: Duration,
    dir: &Path,
) -> std::io::Result<bool> {
    tokio::fs::create_dir_all(dir).await?;
    let mbr = dir.join("mbr.raw");
    let out = dir.join("debugcon.out");
    let err = dir.join("stderr.log");
    tokio::fs::write(&mbr, probe_mbr()).await?;

    let mut drive = OsString::from("file=");
    drive.push(&mbr);
    drive.push(",format=raw,if=ide");
    let mut chardev = OsString::from("file,id=dbg,path=");
    chardev.push(&out);

    let mut child = Command::new(binary)
        .args(["-accel", accel.as_str(), "-cpu", accel.cpu_model()])
        .args([
            "-machine",
            "pc",
            "-m",
            "16",
            "-nodefaults",
            "-display",
            "none",
            "-no-user-config",
        ])
        .arg("-drive")
        .arg(drive)
        .arg("-chardev")
        .arg(chardev)
        .args(["-device", "isa-debugcon,iobase=0xe9,chardev=dbg"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err)?)
        .kill_on_drop(true)
        .spawn()?;

    let deadline = Instant::now() + timeout;
    let booted = loop {
        if printed_k(&out).await {
            break true;
        }
        // QEMU exiting on its own means it failed (e.g. KVM vCPU setup);
        // look once more in case it printed just before.
        if child.try_wait()?.is_some() {
            break printed_k(&out).await;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    let _ = child.kill().await;
    if !booted {
        let stderr = one_line(&tokio::fs::read(&err).await.unwrap_or_default());
        tracing::info!(
            accel = accel.as_str(),
            "Boot probe did not boot within {timeout:?}: {stderr}"
        );
    }
    Ok(booted)
}

/// Whether the probe MBR's 'K' reached the debug console file.
async fn printed_k(out: &Path) -> bool {
    tokio::fs::read(out).await.is_ok_and(|b| b.contains(&b'K'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> QemuCommand {
        QemuCommand {
            binary: "qemu-system-x86_64".into(),
            name: "web1".into(),
            accel: Accel::Tcg,
            cpus: 2,
            memory_mib: 512,
            kernel: None,
            initrd: None,
            append: None,
            disks: vec![
                "/vms/web1/disk0.qcow2".into(),
                "/vms/web1/disk1.qcow2".into(),
            ],
            nics: vec![],
            qmp_socket: "/run/ferry/web1/qmp.sock".into(),
            console_socket: "/run/ferry/web1/console.sock".into(),
            vnc_socket: None,
            agent_socket: None,
            loadvm: None,
            incoming: false,
            hardware: Hardware::default(),
            console_log: "/var/log/ferry/web1-console.log".into(),
            pidfile: "/run/ferry/web1/qemu.pid".into(),
        }
    }

    fn argv(cmd: &QemuCommand) -> Vec<String> {
        cmd.args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    /// The value following `flag`, for every occurrence.
    fn values(args: &[String], flag: &str) -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }

    #[test]
    fn args_tcg_disk_boot() {
        let args = argv(&sample());
        #[rustfmt::skip]
        let expected: Vec<&str> = vec![
            "-name", "guest=web1",
            "-accel", "tcg",
            "-machine", "pc",
            "-cpu", "max",
            "-smp", "2",
            "-m", "512",
            "-nodefaults", "-no-user-config",
            "-display", "none",
            "-daemonize", "-pidfile", "/run/ferry/web1/qemu.pid",
            "-chardev", "socket,id=qmp,path=/run/ferry/web1/qmp.sock,server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", "socket,id=serial0,path=/run/ferry/web1/console.sock,server=on,wait=off,logfile=/var/log/ferry/web1-console.log,logappend=on",
            "-serial", "chardev:serial0",
            "-blockdev", "driver=file,node-name=file0,filename=/vms/web1/disk0.qcow2,cache.direct=off",
            "-blockdev", "driver=qcow2,node-name=drive0,file=file0",
            "-blockdev", "driver=file,node-name=file1,filename=/vms/web1/disk1.qcow2,cache.direct=off",
            "-blockdev", "driver=qcow2,node-name=drive1,file=file1",
            "-device", "virtio-blk-pci,drive=drive0,id=vblk0",
            "-device", "virtio-blk-pci,drive=drive1,id=vblk1",
            "-nic", "none",
            "-boot", "c",
        ];
        assert_eq!(args, expected);
    }

    #[test]
    fn args_kvm_kernel_nics() {
        let mut cmd = sample();
        cmd.accel = Accel::Kvm;
        cmd.kernel = Some("/boot/vmlinuz".into());
        cmd.initrd = Some("/boot/initrd.img".into());
        cmd.append = Some("console=ttyS0 root=/dev/vda,x".into());
        cmd.nics = vec![
            NicArg {
                backend: NicBackend::Bridge {
                    bridge: "br0".into(),
                },
                mac: "52:54:00:00:00:01".into(),
            },
            NicArg {
                backend: NicBackend::User,
                mac: "52:54:00:00:00:02".into(),
            },
        ];
        let args = argv(&cmd);
        assert_eq!(values(&args, "-accel"), ["kvm"]);
        assert_eq!(values(&args, "-cpu"), ["host"]);
        assert_eq!(
            values(&args, "-netdev"),
            ["bridge,id=net0,br=br0", "user,id=net1"]
        );
        let devices = values(&args, "-device");
        assert!(devices.contains(&"virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01".to_string()));
        assert!(devices.contains(&"virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02".to_string()));
        assert!(values(&args, "-nic").is_empty());
        assert_eq!(values(&args, "-kernel"), ["/boot/vmlinuz"]);
        assert_eq!(values(&args, "-initrd"), ["/boot/initrd.img"]);
        // -append is a plain argument: commas are fine there.
        assert_eq!(values(&args, "-append"), ["console=ttyS0 root=/dev/vda,x"]);
        assert!(values(&args, "-boot").is_empty());
        cmd.validate().unwrap();
    }

    #[test]
    fn args_display_on_a_unix_socket_only() {
        let mut cmd = sample();
        assert!(values(&argv(&cmd), "-vnc").is_empty());
        let plain = values(&argv(&cmd), "-device");
        cmd.vnc_socket = Some("/run/ferry/7.vnc".into());
        let args = argv(&cmd);
        assert_eq!(values(&args, "-vnc"), ["unix:/run/ferry/7.vnc"]);
        let devices = values(&args, "-device");
        // The display devices come after the others, which keep their order (PCI slots).
        assert_eq!(devices[..plain.len()], plain[..]);
        assert_eq!(
            devices[plain.len()..],
            [
                "VGA,id=vga0",
                "qemu-xhci,id=usb0",
                "usb-tablet,id=tablet0,bus=usb0.0"
            ]
        );
        cmd.validate().unwrap();
        cmd.vnc_socket = Some(format!("/run/{}/x.vnc", "d".repeat(110)).into());
        assert!(matches!(
            cmd.validate(),
            Err(ProcessError::SocketPathTooLong { .. })
        ));
        cmd.vnc_socket = Some("/run/a,b.vnc".into());
        assert!(cmd.validate().is_err());
    }

    #[test]
    fn args_incoming_only_adds_incoming_defer() {
        let mut cmd = sample();
        let normal = argv(&cmd);
        cmd.incoming = true;
        let args = argv(&cmd);
        assert_eq!(args[..normal.len()], normal[..]);
        assert_eq!(args[normal.len()..], ["-incoming", "defer"]);
        cmd.validate().unwrap();
        cmd.loadvm = Some("cp-1".into());
        let err = cmd.validate().unwrap_err();
        assert!(
            matches!(err, ProcessError::InvalidSetting { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn validate_accepts_sample() {
        sample().validate().unwrap();
    }

    #[test]
    fn validate_rejects_comma_in_disk() {
        let mut cmd = sample();
        cmd.disks[1] = "/vms/a,b.qcow2".into();
        let err = cmd.validate().unwrap_err();
        assert!(
            matches!(err, ProcessError::PathContainsComma { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "disk 1 path \"/vms/a,b.qcow2\" contains a comma, which QEMU's option syntax cannot take"
        );
    }

    #[test]
    fn validate_rejects_comma_in_sockets_and_name() {
        let mut cmd = sample();
        cmd.console_log = "/var/log/a,b".into();
        assert!(cmd
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("console log path"));

        let mut cmd = sample();
        cmd.name = "a,b".into();
        assert!(matches!(
            cmd.validate(),
            Err(ProcessError::InvalidSetting { .. })
        ));
    }

    #[test]
    fn validate_rejects_long_socket_path() {
        let mut cmd = sample();
        let long = format!("/{}/qmp.sock", "d".repeat(100));
        assert_eq!(long.len(), 110);
        cmd.qmp_socket = long.into();
        let err = cmd.validate().unwrap_err();
        assert!(
            matches!(err, ProcessError::SocketPathTooLong { len: 110, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("at most 107"), "{err}");

        // 107 bytes is the longest that fits.
        let mut cmd = sample();
        cmd.console_socket = format!("/{}", "c".repeat(106)).into();
        cmd.validate().unwrap();
    }

    #[test]
    fn validate_rejects_relative_path() {
        let mut cmd = sample();
        cmd.pidfile = "qemu.pid".into();
        assert!(matches!(
            cmd.validate(),
            Err(ProcessError::RelativePath { .. })
        ));
    }

    #[test]
    fn validate_checks_nics() {
        for mac in [
            "52:54:00:00:00",
            "52-54-00-00-00-01",
            "52:54:00:00:00:0g",
            "01:00:5e:00:00:01",
        ] {
            let mut cmd = sample();
            cmd.nics = vec![NicArg {
                backend: NicBackend::User,
                mac: mac.into(),
            }];
            assert!(cmd.validate().is_err(), "{mac} accepted");
        }
        let mut cmd = sample();
        cmd.nics = vec![NicArg {
            backend: NicBackend::Bridge {
                bridge: "br0,x=y".into(),
            },
            mac: "52:54:00:00:00:01".into(),
        }];
        assert!(cmd.validate().is_err());
    }

    #[test]
    fn one_line_condenses() {
        assert_eq!(
            one_line(b"a: warning\n\n  b: error  \n"),
            "a: warning; b: error"
        );
        assert_eq!(one_line(b""), "");
    }

    #[test]
    fn mbr_encoding() {
        let mbr = probe_mbr();
        assert_eq!(&mbr[..7], &[0xB0, 0x4B, 0xE6, 0xE9, 0xF4, 0xEB, 0xFD]);
        // jmp rel8 -3 from the end of the jmp (offset 7) lands on hlt (4).
        assert_eq!(7 + (mbr[6] as i8) as isize, 4);
        assert!(mbr[7..510].iter().all(|&b| b == 0));
        assert_eq!(&mbr[510..], &[0x55, 0xAA]);
    }

    #[test]
    fn own_pid_is_alive_and_signal_guards() {
        let me = std::process::id();
        assert!(pid_alive(me));
        assert!(!pid_alive(0));
        assert!(pid_cmdline_contains(me, ""));
        assert!(!pid_cmdline_contains(
            me,
            "definitely-not-in-our-cmdline-\u{1}"
        ));
        assert!(matches!(
            signal(0, 0),
            Err(ProcessError::InvalidPid { pid: 0 })
        ));
        assert!(matches!(
            signal(u32::MAX, 0),
            Err(ProcessError::InvalidPid { .. })
        ));
        signal(me, 0).unwrap();
    }
}
