//! The VM manager: the host's inventory joined with the QEMU processes that run it.
//! Every operation goes through the domain's lifecycle state machine; the resulting state
//! is persisted before and after the QEMU side effect, so a restarted ferryd knows where
//! each VM was and can re-attach to the processes that survived it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api_types::{
    ActionReply, ConsoleLog, DiskInfo, DiskRequest, ExecReply, ExecRequest, ImageFormat, NicInfo,
    NicRequest, VmCreateRequest, VmInfo, VmSetRequest,
};
use ferry_domain::lifecycle::{self, Action, Operation};
use ferry_domain::spec::mac_from_seed;
use ferry_domain::{
    Boot, CdromSpec, DiskBus, DiskRole, DiskSpec, Firmware, NicKind, NicSpec, VmName, VmSpec,
    VmState,
};
use ferry_qemu::hardware::{self, Hardware, Uefi};
use ferry_qemu::process::{self, disk_node, Accel, NicArg, NicBackend, QemuCommand};
use ferry_qemu::qmp::{self, Qmp};
use ferry_qemu::{img, migration, qcow2};
use ferry_store::{Store, StoreError, VmRow};
use ring::rand::SecureRandom;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::error::ApiFailure;

/// How long QEMU may take to start and answer QMP.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `quit` may take before the process is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default ACPI shutdown timeout.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// Most console log returned by one request.
const CONSOLE_CHUNK: u64 = 1 << 20;

/// File name of a UEFI VM's NVRAM (its variable store) in the VM's directory.
const NVRAM_FILE: &str = "nvram.qcow2";

/// Where a new VM's disk comes from.
#[derive(Debug, PartialEq, Eq)]
enum DiskSource {
    /// A new empty qcow2.
    New,
    /// A copy of a qcow2 image.
    CopyQcow2(PathBuf),
    /// A copy of OVMF's raw variable template, as qcow2.
    NvramTemplate(PathBuf),
    /// A raw image or block device used in place, tracked by a qcow2 metadata file.
    TrackRaw(PathBuf),
}

/// An ISO given for the CD drive must lie in the API's file roots, exist and be readable
/// now.
/// Refuses a bridge this host does not have (VM NICs, bridge mappings, test networks).
pub fn require_bridge(br: &str) -> Result<(), ApiFailure> {
    if Path::new("/sys/class/net").join(br).join("bridge").exists() {
        return Ok(());
    }
    Err(ApiFailure::invalid(format!(
        "bridge {br} does not exist on this host; create it (ip link add {br} type bridge) or pick another"
    )))
}

fn check_iso(cfg: &Config, iso: &str) -> Result<(), ApiFailure> {
    if !iso.starts_with('/') {
        return Err(ApiFailure::invalid(format!(
            "ISO path {iso:?} must be absolute"
        )));
    }
    cfg.allowed_path("ISO", Path::new(iso))
        .map_err(ApiFailure::invalid)?;
    std::fs::File::open(iso)
        .and_then(|f| f.metadata())
        .and_then(|m| {
            if m.is_dir() {
                Err(std::io::Error::other("it is a directory"))
            } else {
                Ok(())
            }
        })
        .map_err(|e| ApiFailure::invalid(format!("ISO {iso} cannot be read: {e}")))
}

/// A live QEMU process of a VM.
struct Instance {
    pid: u32,
    qmp: Qmp,
    /// Becomes true once the process is gone.
    exited: watch::Receiver<bool>,
}

/// The VM manager.
pub struct VmManager {
    cfg: Arc<Config>,
    store: Arc<Store>,
    accel: Accel,
    instances: Mutex<HashMap<String, Arc<Instance>>>,
    /// Serializes operations on one VM (start vs delete, …) without blocking others.
    op_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Runtime file paths of a VM. Sockets live in the data dir under the VM's numeric id,
/// because unix socket paths are limited to 108 bytes and VM names may be long.
struct RuntimePaths {
    qmp: PathBuf,
    console: PathBuf,
    pidfile: PathBuf,
    agent: PathBuf,
    vnc: PathBuf,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl VmManager {
    /// A manager over `store`, giving VMs `accel`.
    pub fn new(cfg: Arc<Config>, store: Arc<Store>, accel: Accel) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            store,
            accel,
            instances: Mutex::new(HashMap::new()),
            op_locks: Mutex::new(HashMap::new()),
        })
    }

    fn run_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("run")
    }

    fn runtime_paths(&self, id: i64) -> RuntimePaths {
        let dir = self.run_dir();
        RuntimePaths {
            qmp: dir.join(format!("{id}.qmp")),
            console: dir.join(format!("{id}.console")),
            pidfile: dir.join(format!("{id}.pid")),
            agent: dir.join(format!("{id}.qga")),
            vnc: dir.join(format!("{id}.vnc")),
        }
    }

    /// The guest agent socket of a VM (present while it runs, whether or not the guest
    /// runs an agent).
    pub(crate) fn agent_socket(&self, id: i64) -> PathBuf {
        self.runtime_paths(id).agent
    }

    pub(crate) fn vm_dir(&self, name: &VmName) -> PathBuf {
        self.cfg.vm_storage.join(name.as_str())
    }

    fn console_log_path(&self, name: &VmName) -> PathBuf {
        self.vm_dir(name).join("console.log")
    }

    /// Serializes operations on one VM; the replication engine holds it while it reads a
    /// stopped VM's disks or holds a fleecing point, so the VM cannot start or stop under it.
    pub(crate) async fn lock_vm(&self, name: &VmName) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .op_locks
            .lock()
            .expect("op_locks")
            .entry(name.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// The QMP connection of a VM whose QEMU process is alive.
    pub(crate) fn live_qmp(&self, name: &VmName) -> Option<Qmp> {
        self.instance(name)
            .filter(|i| !*i.exited.borrow())
            .map(|i| i.qmp.clone())
    }

    fn instance(&self, name: &VmName) -> Option<Arc<Instance>> {
        self.instances
            .lock()
            .expect("instances")
            .get(name.as_str())
            .cloned()
    }

    fn row(&self, name: &str) -> Result<(VmName, VmRow), ApiFailure> {
        let vm = VmName::new(name).map_err(|e| ApiFailure::invalid(e.to_string()))?;
        let row = self.store.get_vm(&vm)?;
        Ok((vm, row))
    }

    /// Applies `op` to the VM's stored state, persists the new state, returns the actions.
    fn transition(&self, row: &VmRow, op: Operation) -> Result<(VmState, Vec<Action>), ApiFailure> {
        let (next, actions) = lifecycle::step(row.state, op)
            .map_err(|e| ApiFailure::conflict(format!("{}: {e}", row.spec.name)))?;
        if next != row.state {
            let (pid, started) = if next.has_process() {
                (row.pid, row.started_at)
            } else {
                (None, None)
            };
            self.store.set_runtime(&row.spec.name, next, pid, started)?;
        }
        Ok((next, actions))
    }

    // ---- re-attach --------------------------------------------------------------------

    /// After a ferryd restart: re-attach to every QEMU that survived, mark the rest off.
    pub async fn reattach_all(self: &Arc<Self>) -> Result<(), ApiFailure> {
        std::fs::create_dir_all(self.run_dir()).map_err(|e| {
            ApiFailure::internal(format!("cannot create {}: {e}", self.run_dir().display()))
        })?;
        for row in self.store.list_vms()? {
            if !row.state.has_process() {
                continue;
            }
            let name = row.spec.name.clone();
            let paths = self.runtime_paths(row.id);
            let alive = row.pid.is_some_and(|pid| {
                process::pid_alive(pid)
                    && process::pid_cmdline_contains(pid, &paths.qmp.display().to_string())
            });
            if !alive {
                warn!(vm = %name, "QEMU exited while ferryd was not running");
                self.store.set_runtime(&name, VmState::Off, None, None)?;
                self.store
                    .set_last_error(&name, Some("QEMU exited while ferryd was not running"))?;
                cleanup_runtime(&paths);
                continue;
            }
            let pid = row.pid.expect("alive implies pid");
            match Qmp::connect(&paths.qmp, QMP_CONNECT_TIMEOUT).await {
                Ok(qmp) => {
                    let status = qmp.execute(&qmp::QueryStatus {}).await;
                    let state = match status {
                        Ok(s) if s.running => VmState::Running,
                        Ok(_) => VmState::Paused,
                        Err(e) => {
                            warn!(vm = %name, error = %e, "query-status failed on re-attach");
                            VmState::Running
                        }
                    };
                    self.store
                        .set_runtime(&name, state, Some(pid), row.started_at)?;
                    self.track(&name, pid, qmp);
                    info!(vm = %name, pid, %state, "re-attached to running VM");
                }
                Err(e) => {
                    warn!(vm = %name, pid, error = %e, "cannot re-attach to QEMU; it keeps running untracked");
                    self.store.set_last_error(
                        &name,
                        Some(&format!("cannot re-attach to QEMU pid {pid}: {e}")),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Registers a live process and watches for its end.
    fn track(self: &Arc<Self>, name: &VmName, pid: u32, qmp: Qmp) {
        let (tx, rx) = watch::channel(false);
        let instance = Arc::new(Instance {
            pid,
            qmp: qmp.clone(),
            exited: rx,
        });
        self.instances
            .lock()
            .expect("instances")
            .insert(name.to_string(), instance);
        let this = Arc::clone(self);
        let name = name.clone();
        let mut events = qmp.events();
        tokio::spawn(async move {
            // Remember why QEMU ended, from its SHUTDOWN event, to tell a guest power-off
            // from a crash.
            let mut shutdown_reason: Option<String> = None;
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(ev) if ev.event == "SHUTDOWN" => {
                            shutdown_reason = ev.data.get("reason").and_then(|r| r.as_str()).map(str::to_owned);
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => break,
                    },
                    _ = qmp.closed() => break,
                }
            }
            // QMP closes a moment before the process is gone.
            if !process::wait_exit(pid, Duration::from_secs(10)).await {
                warn!(vm = %name, pid, "QMP closed but QEMU still runs; killing it");
                let _ = process::signal(pid, libc::SIGKILL);
                process::wait_exit(pid, Duration::from_secs(5)).await;
            }
            this.on_exit(&name, shutdown_reason.as_deref());
            let _ = tx.send(true);
        });
    }

    fn on_exit(&self, name: &VmName, reason: Option<&str>) {
        self.instances
            .lock()
            .expect("instances")
            .remove(name.as_str());
        let Ok(row) = self.store.get_vm(name) else {
            return;
        };
        let was = row.state;
        if let Err(e) = self.transition(&row, Operation::Exited) {
            warn!(vm = %name, error = %e.message, "exit transition");
        }
        cleanup_runtime(&self.runtime_paths(row.id));
        let error = match (was, reason) {
            (VmState::Stopping | VmState::ShuttingDown, _) => None,
            (_, Some("guest-shutdown")) => None,
            (_, Some(r)) => Some(format!("QEMU exited ({r})")),
            (_, None) => Some("QEMU exited unexpectedly (crashed or was killed)".to_owned()),
        };
        if let Some(e) = &error {
            warn!(vm = %name, "{e}");
        } else {
            info!(vm = %name, "VM is off");
        }
        let _ = self.store.set_last_error(name, error.as_deref());
    }

    // ---- queries ----------------------------------------------------------------------

    /// Every VM.
    pub fn list(&self) -> Result<Vec<VmInfo>, ApiFailure> {
        Ok(self
            .store
            .list_vms()?
            .iter()
            .map(|r| self.info(r))
            .collect())
    }

    /// One VM. While it runs, the CD drive shows what QEMU has in it (the guest may have
    /// ejected the disc itself).
    pub async fn show(&self, name: &str) -> Result<VmInfo, ApiFailure> {
        let (vm, row) = self.row(name)?;
        let mut info = self.info(&row);
        if let (Some(cd), Some(qmp)) = (info.cdrom.as_mut(), self.live_qmp(&vm)) {
            if let Ok(medium) = hardware::cdrom_medium(&qmp).await {
                cd.iso = medium;
            }
        }
        Ok(info)
    }

    /// Number of VMs.
    pub fn count(&self) -> usize {
        self.store.list_vms().map(|v| v.len()).unwrap_or(0)
    }

    fn info(&self, row: &VmRow) -> VmInfo {
        let dir = self.vm_dir(&row.spec.name);
        let (boot, append) = match &row.spec.boot {
            Boot::Disk => ("disk".to_owned(), None),
            Boot::Kernel { append, .. } => ("kernel".to_owned(), append.clone()),
        };
        VmInfo {
            name: row.spec.name.to_string(),
            state: row.state,
            pid: row.pid,
            uptime_s: row
                .started_at
                .filter(|_| row.state.has_process())
                .map(|t| (now_unix() - t).max(0) as u64),
            cpus: row.spec.cpus,
            memory_mib: row.spec.memory_mib,
            disks: row
                .spec
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let path = dir.join(&d.file);
                    DiskInfo {
                        data_file: qcow2::external_data_file(&path).ok().flatten(),
                        path: path.display().to_string(),
                        size_bytes: d.size_bytes,
                        node: disk_node(i),
                        bus: d.bus,
                        role: d.role,
                    }
                })
                .collect(),
            nics: row
                .spec
                .nics
                .iter()
                .map(|n| NicInfo {
                    kind: match n.kind {
                        NicKind::Bridge(_) => "bridge".into(),
                        NicKind::User => "user".into(),
                    },
                    bridge: match &n.kind {
                        NicKind::Bridge(b) => Some(b.clone()),
                        NicKind::User => None,
                    },
                    mac: n.mac.clone(),
                })
                .collect(),
            boot,
            append,
            vnc: row.spec.vnc,
            last_error: row.last_error.clone(),
            replication: self
                .store
                .replication(row.id)
                .ok()
                .flatten()
                .map(|r| r.role.as_str().to_owned()),
            machine: row.spec.machine,
            firmware: row.spec.firmware,
            secure_boot: row.spec.secure_boot,
            cdrom: row.spec.cdrom.clone(),
            boot_order: row.spec.boot_order.clone(),
            rng: row.spec.rng,
            failover_ip: row.spec.failover_ip.clone(),
            test_failover_ip: row.spec.test_failover_ip.clone(),
        }
    }

    // ---- create / delete --------------------------------------------------------------

    /// Creates a VM: validates everything first, then makes its directory and disks, then
    /// records it. A failure at any step removes what was made.
    pub async fn create(&self, req: VmCreateRequest) -> Result<VmInfo, ApiFailure> {
        let name = VmName::new(&req.name).map_err(|e| ApiFailure::invalid(e.to_string()))?;
        let _guard = self.lock_vm(&name).await;
        match self.store.get_vm(&name) {
            Ok(_) => {
                return Err(ApiFailure::conflict(format!(
                    "a VM named {name:?} already exists; choose another name or delete it first"
                )))
            }
            Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        // Resolve disks: sizes of new ones, existence, format and size of imported ones.
        let mut disks = Vec::new();
        let mut sources = Vec::new();
        for (i, d) in req.disks.iter().enumerate() {
            let file = format!("disk{i}.qcow2");
            match d {
                DiskRequest::New { size_bytes, bus } => {
                    disks.push(DiskSpec {
                        file,
                        size_bytes: *size_bytes,
                        bus: *bus,
                        role: DiskRole::Data,
                    });
                    sources.push(DiskSource::New);
                }
                DiskRequest::Import { path, format, bus } => {
                    let (source, size_bytes) = self.resolve_image(path, *format).await?;
                    if let DiskSource::TrackRaw(raw) = &source {
                        if sources.contains(&DiskSource::TrackRaw(raw.clone())) {
                            return Err(ApiFailure::invalid(format!(
                                "raw disk {} is given twice",
                                raw.display()
                            )));
                        }
                    }
                    disks.push(DiskSpec {
                        file,
                        size_bytes,
                        bus: *bus,
                        role: DiskRole::Data,
                    });
                    sources.push(source);
                }
            }
        }
        if let Some(iso) = req.cdrom.as_ref().and_then(|c| c.iso.as_deref()) {
            check_iso(&self.cfg, iso)?;
        }
        if req.nvram.is_some() && req.firmware != Firmware::Uefi {
            return Err(ApiFailure::invalid(
                "an NVRAM image needs --firmware uefi".to_owned(),
            ));
        }
        if req.firmware == Firmware::Uefi {
            let (_, template) = self.ovmf_files(req.secure_boot)?;
            let flash_size = std::fs::metadata(&template).map(|m| m.len()).map_err(|e| {
                ApiFailure::invalid(format!(
                    "cannot read the UEFI variable template {}: {e}",
                    template.display()
                ))
            })?;
            let source = match &req.nvram {
                Some(path) => {
                    let (source, size) = self.resolve_image(path, Some(ImageFormat::Qcow2)).await?;
                    // The flash chip's size is fixed by the firmware build.
                    if size != flash_size {
                        return Err(ApiFailure::invalid(format!(
                            "NVRAM image {path} is {size} bytes; this host's OVMF needs {flash_size}"
                        )));
                    }
                    source
                }
                None => DiskSource::NvramTemplate(template),
            };
            let size_bytes = flash_size;
            disks.push(DiskSpec {
                file: NVRAM_FILE.to_owned(),
                size_bytes,
                bus: DiskBus::default(),
                role: DiskRole::Nvram,
            });
            sources.push(source);
        }
        for (what, path) in [("kernel", &req.kernel), ("initrd", &req.initrd)] {
            if let Some(p) = path {
                if Path::new(p).is_absolute() {
                    self.cfg
                        .allowed_path(what, Path::new(p))
                        .map_err(ApiFailure::invalid)?;
                }
                if Path::new(p).is_absolute() && !Path::new(p).is_file() {
                    return Err(ApiFailure::invalid(format!("{what} {p} not found")));
                }
            }
        }
        if req.kernel.is_none() && (req.initrd.is_some() || req.append.is_some()) {
            return Err(ApiFailure::invalid(
                "--initrd and --append need --kernel".to_owned(),
            ));
        }
        let mut nics = Vec::new();
        for n in &req.nics {
            let kind = match n {
                NicRequest::User => NicKind::User,
                NicRequest::Bridge { bridge } => {
                    let br = bridge.clone().or_else(|| self.cfg.default_bridge.clone()).ok_or_else(|| {
                        ApiFailure::invalid(
                            "no bridge named and no default_bridge in ferryd's config; use --nic bridge=BR".to_owned(),
                        )
                    })?;
                    NicKind::Bridge(br)
                }
            };
            nics.push(NicSpec {
                kind,
                mac: random_mac(),
            });
        }
        let spec = VmSpec {
            name: name.clone(),
            cpus: req.cpus,
            memory_mib: req.memory_mib,
            disks,
            vnc: req.vnc.unwrap_or(true),
            boot: match req.kernel {
                Some(kernel) => Boot::Kernel {
                    kernel,
                    initrd: req.initrd,
                    append: req.append,
                },
                None => Boot::Disk,
            },
            nics,
            machine: req.machine,
            firmware: req.firmware,
            secure_boot: req.secure_boot,
            cdrom: req.cdrom,
            boot_order: req.boot_order,
            rng: req.rng,
            failover_ip: Vec::new(),
            test_failover_ip: Vec::new(),
        };
        spec.validate()
            .map_err(|e| ApiFailure::invalid(e.to_string()))?;
        for nic in &spec.nics {
            if let NicKind::Bridge(br) = &nic.kind {
                require_bridge(br)?;
            }
        }

        let dir = self.vm_dir(&name);
        if dir.exists() {
            return Err(ApiFailure::conflict(format!(
                "{} already exists but belongs to no VM; move it away or choose another name",
                dir.display()
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiFailure::internal(format!("cannot create {}: {e}", dir.display())))?;
        let made = async {
            for (d, source) in spec.disks.iter().zip(&sources) {
                let target = dir.join(&d.file);
                let qemu_img = &self.cfg.qemu_img;
                match source {
                    DiskSource::New => img::create_qcow2(qemu_img, &target, d.size_bytes).await,
                    DiskSource::CopyQcow2(src) => {
                        img::convert_to_qcow2_from(qemu_img, src, "qcow2", &target).await
                    }
                    DiskSource::NvramTemplate(src) => {
                        img::convert_to_qcow2_from(qemu_img, src, "raw", &target).await
                    }
                    DiskSource::TrackRaw(raw) => {
                        let scratch = dir.join(format!("{}.scratch", d.file));
                        img::create_raw_tracker(qemu_img, &target, raw, &scratch, d.size_bytes)
                            .await
                    }
                }
                .map_err(|e| ApiFailure::qemu(e.to_string()))?;
            }
            let row = self.store.insert_vm(&spec, now_unix())?;
            Ok::<_, ApiFailure>(row)
        }
        .await;
        match made {
            Ok(row) => {
                info!(vm = %name, "created");
                Ok(self.info(&row))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Checks an existing image and tells how it becomes a disk: a qcow2 is copied, a raw
    /// image or block device is tracked in place. The format is the one given or the
    /// name's (`.qcow2`, `.raw`, a block device); the contents are never probed.
    async fn resolve_image(
        &self,
        path: &str,
        format: Option<ImageFormat>,
    ) -> Result<(DiskSource, u64), ApiFailure> {
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(ApiFailure::invalid(format!(
                "disk image path {path:?} must be absolute"
            )));
        }
        self.cfg
            .allowed_path("disk image", p)
            .map_err(ApiFailure::invalid)?;
        let meta = std::fs::metadata(p)
            .map_err(|e| ApiFailure::invalid(format!("disk image {path} not found: {e}")))?;
        let is_block = std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type());
        if !meta.is_file() && !is_block {
            return Err(ApiFailure::invalid(format!(
                "disk image {path} is neither a file nor a block device"
            )));
        }
        let format = match format {
            Some(f) => f,
            None if is_block || path.ends_with(".raw") => ImageFormat::Raw,
            None if path.ends_with(".qcow2") => ImageFormat::Qcow2,
            None => {
                return Err(ApiFailure::invalid(format!(
                    "cannot tell the format of disk image {path}: add ,format=raw or ,format=qcow2 (ferry never guesses from the contents)"
                )))
            }
        };
        // Reading the first bytes proves the image is readable at all, with a clear error.
        let mut magic = [0u8; 4];
        std::fs::File::open(p)
            .and_then(|f| {
                use std::os::unix::fs::FileExt;
                f.read_at(&mut magic, 0)
            })
            .map_err(|e| ApiFailure::invalid(format!("cannot read disk image {path}: {e}")))?;
        let fmt = match format {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        };
        let info = img::info_as(&self.cfg.qemu_img, p, fmt)
            .await
            .map_err(|e| {
                ApiFailure::invalid(format!("disk image {path} is unreadable as {fmt}: {e}"))
            })?;
        match format {
            ImageFormat::Qcow2 => {
                if let Some(b) = &info.backing_filename {
                    return Err(ApiFailure::invalid(format!(
                        "qcow2 image {path} has a backing file ({b}); flatten it first (qemu-img convert -O qcow2)"
                    )));
                }
                if let Some(f) = &info.data_file {
                    return Err(ApiFailure::invalid(format!(
                        "qcow2 image {path} keeps its data in an external file ({f}); give that raw file with ,format=raw instead"
                    )));
                }
                Ok((DiskSource::CopyQcow2(p.to_path_buf()), info.virtual_size))
            }
            ImageFormat::Raw => {
                if &magic == b"QFI\xfb" {
                    return Err(ApiFailure::invalid(format!(
                        "disk image {path} starts with a qcow2 header; if it is a qcow2, give ,format=qcow2"
                    )));
                }
                let raw = std::fs::canonicalize(p)
                    .map_err(|e| ApiFailure::invalid(format!("disk image {path}: {e}")))?;
                if let Some(owner) = self.raw_owner(&raw)? {
                    return Err(ApiFailure::conflict(format!(
                        "raw disk {} is already used by VM {owner}",
                        raw.display()
                    )));
                }
                Ok((DiskSource::TrackRaw(raw), info.virtual_size))
            }
        }
    }

    /// The VM whose disk tracks the raw image or block device `raw` (canonical path).
    fn raw_owner(&self, raw: &Path) -> Result<Option<String>, ApiFailure> {
        for row in self.store.list_vms()? {
            for disk in self.disk_paths(&row) {
                let Ok(Some(data)) = qcow2::external_data_file(&disk) else {
                    continue;
                };
                let data = disk.parent().unwrap_or(Path::new("/")).join(data);
                let same = std::fs::canonicalize(&data).is_ok_and(|d| d == raw) || data == raw;
                if same {
                    return Ok(Some(row.spec.name.to_string()));
                }
            }
        }
        Ok(None)
    }

    /// The OVMF code and variable-template files for a UEFI VM, which must exist.
    fn ovmf_files(&self, secure_boot: bool) -> Result<(PathBuf, PathBuf), ApiFailure> {
        let dir = &self.cfg.firmware_dir;
        let (code, vars) = if secure_boot {
            ("OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd")
        } else {
            ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd")
        };
        let (code, vars) = (dir.join(code), dir.join(vars));
        for f in [&code, &vars] {
            if !f.is_file() {
                return Err(ApiFailure::invalid(format!(
                    "UEFI firmware {} not found; install Debian's ovmf package (apt-get install ovmf) or set firmware_dir in ferryd's config",
                    f.display()
                )));
            }
        }
        Ok((code, vars))
    }

    /// Deletes a VM that is off: its inventory entry, disks and directory.
    pub async fn delete(&self, name: &str) -> Result<ActionReply, ApiFailure> {
        let (vm, _) = self.row(name)?;
        let _guard = self.lock_vm(&vm).await;
        let row = self.store.get_vm(&vm)?;
        if let Some(rel) = self.store.replication(row.id)? {
            return Err(ApiFailure::conflict(format!(
                "VM {vm} is a {} of a replication relationship: remove replication first (ferry replication remove {vm})",
                rel.role.as_str()
            )));
        }
        self.transition(&row, Operation::Delete)?;
        self.store.delete_vm(&vm)?;
        self.store.delete_checkpoints_of(row.id)?;
        let dir = self.vm_dir(&vm);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(vm = %vm, error = %e, "cannot remove {}", dir.display());
            }
        }
        cleanup_runtime(&self.runtime_paths(row.id));
        info!(vm = %vm, "deleted");
        Ok(ActionReply {
            state: VmState::Off,
            message: format!("VM {vm} deleted with its disks"),
        })
    }

    // ---- lifecycle --------------------------------------------------------------------

    /// Starts a VM.
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<ActionReply, ApiFailure> {
        let (vm, _) = self.row(name)?;
        let _guard = self.lock_vm(&vm).await;
        let row = self.store.get_vm(&vm)?;
        if let Some(rel) = self.store.replication(row.id)? {
            let failed_over = matches!(
                rel.state,
                ferry_domain::ReplicationState::FailedOverWaitingCompletion
                    | ferry_domain::ReplicationState::FailedOver
            );
            if rel.role == ferry_domain::Role::Primary
                && rel.state == ferry_domain::ReplicationState::PreparedForFailover
            {
                return Err(ApiFailure::conflict(format!(
                    "VM {vm} is prepared for a planned failover: it runs on {} now; to run it here, cancel the failover (`ferry failover cancel {vm}`)",
                    rel.partner_name
                )));
            }
            if rel.role == ferry_domain::Role::Replica && !failed_over {
                return Err(ApiFailure::conflict(format!(
                    "VM {vm} is a replica: it starts only through a failover to one of its recovery points (`ferry failover start {vm} [--point ID]`), not directly"
                )));
            }
        }
        self.transition(&row, Operation::Start)?;
        match self.spawn(&row, None).await {
            Ok((pid, qmp)) => {
                let started = now_unix();
                self.store
                    .set_runtime(&vm, VmState::Running, Some(pid), Some(started))?;
                self.store.set_last_error(&vm, None)?;
                self.track(&vm, pid, qmp);
                info!(vm = %vm, pid, accel = self.accel.as_str(), "started");
                Ok(ActionReply {
                    state: VmState::Running,
                    message: format!("VM {vm} started (pid {pid}, {})", self.accel.as_str()),
                })
            }
            Err(e) => {
                self.store.set_runtime(&vm, VmState::Off, None, None)?;
                self.store.set_last_error(&vm, Some(&e.message))?;
                Err(e)
            }
        }
    }

    /// Starts a VM that is off from the memory and device state saved in internal snapshot
    /// `tag` (a standard checkpoint): QEMU restores it with the vCPUs stopped, `rearm` runs
    /// (it restores change tracking before the guest can write), then the vCPUs continue.
    /// The caller holds the VM's lock.
    pub(crate) async fn resume_from_saved_state<F, Fut>(
        self: &Arc<Self>,
        vm: &VmName,
        tag: &str,
        rearm: F,
    ) -> Result<ActionReply, ApiFailure>
    where
        F: FnOnce(Qmp) -> Fut,
        Fut: std::future::Future<Output = Result<(), ApiFailure>>,
    {
        let row = self.store.get_vm(vm)?;
        self.transition(&row, Operation::Start)?;
        let started = async {
            let (pid, qmp) = self.spawn(&row, Some(tag)).await?;
            let ready = async {
                rearm(qmp.clone()).await?;
                qmp.execute(&qmp::Cont {}).await.map_err(|e| {
                    ApiFailure::qemu(format!("{vm}: QEMU refused to continue: {e}"))
                })?;
                Ok::<_, ApiFailure>(())
            }
            .await;
            if let Err(e) = ready {
                let _ = process::signal(pid, libc::SIGKILL);
                process::wait_exit(pid, QUIT_TIMEOUT).await;
                return Err(e);
            }
            Ok((pid, qmp))
        }
        .await;
        match started {
            Ok((pid, qmp)) => {
                self.store
                    .set_runtime(vm, VmState::Running, Some(pid), Some(now_unix()))?;
                self.store.set_last_error(vm, None)?;
                self.track(vm, pid, qmp);
                info!(vm = %vm, pid, tag, "resumed from saved state");
                Ok(ActionReply {
                    state: VmState::Running,
                    message: format!("VM {vm} resumed from its saved state (pid {pid})"),
                })
            }
            Err(e) => {
                self.store.set_runtime(vm, VmState::Off, None, None)?;
                self.store.set_last_error(vm, Some(&e.message))?;
                Err(e)
            }
        }
    }

    /// The qcow2 images of a VM, in disk order.
    pub(crate) fn disk_paths(&self, row: &VmRow) -> Vec<PathBuf> {
        let dir = self.vm_dir(&row.spec.name);
        row.spec.disks.iter().map(|d| dir.join(&d.file)).collect()
    }

    /// The VM's stored row.
    pub(crate) fn get(&self, name: &str) -> Result<(VmName, VmRow), ApiFailure> {
        self.row(name)
    }

    async fn spawn(&self, row: &VmRow, loadvm: Option<&str>) -> Result<(u32, Qmp), ApiFailure> {
        self.spawn_as(row, loadvm, false).await
    }

    /// Starts QEMU for the VM: normally, from a snapshot (`loadvm`), or as the target of a
    /// live migration (`incoming`).
    async fn spawn_as(
        &self,
        row: &VmRow,
        loadvm: Option<&str>,
        incoming: bool,
    ) -> Result<(u32, Qmp), ApiFailure> {
        let paths = self.runtime_paths(row.id);
        let dir = self.vm_dir(&row.spec.name);
        // A VM made by replication (its disks live in the replica storage) may not have its
        // own directory yet: it holds the console log.
        std::fs::create_dir_all(&dir)
            .map_err(|e| ApiFailure::internal(format!("cannot create {}: {e}", dir.display())))?;
        for d in &row.spec.disks {
            let p = dir.join(&d.file);
            if !p.is_file() {
                return Err(ApiFailure::qemu(format!(
                    "disk {} is missing; restore it or delete the VM",
                    p.display()
                )));
            }
        }
        let (kernel, initrd, append) = match &row.spec.boot {
            Boot::Disk => (None, None, None),
            Boot::Kernel {
                kernel,
                initrd,
                append,
            } => (
                Some(PathBuf::from(kernel)),
                initrd.as_ref().map(PathBuf::from),
                append.clone(),
            ),
        };
        let hardware = self.hardware(&row.spec)?;
        let cmd = QemuCommand {
            hardware,
            binary: self.cfg.qemu_binary.clone(),
            name: row.spec.name.to_string(),
            accel: self.accel,
            cpus: row.spec.cpus,
            memory_mib: row.spec.memory_mib,
            kernel,
            initrd,
            append,
            disks: row.spec.disks.iter().map(|d| dir.join(&d.file)).collect(),
            nics: row
                .spec
                .nics
                .iter()
                .map(|n| NicArg {
                    backend: match &n.kind {
                        NicKind::Bridge(b) => NicBackend::Bridge { bridge: b.clone() },
                        NicKind::User => NicBackend::User,
                    },
                    mac: n.mac.clone(),
                })
                .collect(),
            qmp_socket: paths.qmp.clone(),
            console_socket: paths.console.clone(),
            console_log: self.console_log_path(&row.spec.name),
            pidfile: paths.pidfile.clone(),
            agent_socket: Some(paths.agent.clone()),
            loadvm: loadvm.map(str::to_owned),
            incoming,
            vnc_socket: row.spec.vnc.then(|| paths.vnc.clone()),
        };
        let pid = process::spawn_daemonized(&cmd)
            .await
            .map_err(|e| ApiFailure::qemu(e.to_string()))?;
        match Qmp::connect(&paths.qmp, QMP_CONNECT_TIMEOUT).await {
            Ok(qmp) => Ok((pid, qmp)),
            Err(e) => {
                let _ = process::signal(pid, libc::SIGKILL);
                Err(ApiFailure::qemu(format!(
                    "QEMU started but QMP did not answer: {e}"
                )))
            }
        }
    }

    /// Starts the VM here as the target of a live migration: QEMU with the VM's hardware
    /// waits for the stream on `listen_ip` (a free port). Returns where it listens, and a
    /// receiver that says once the guest runs here (or why not).
    pub async fn incoming(
        self: &Arc<Self>,
        name: &str,
        listen_ip: std::net::IpAddr,
        tls: Option<&migration::MigrationTls>,
    ) -> Result<
        (
            std::net::SocketAddr,
            watch::Receiver<Option<Result<(), String>>>,
        ),
        ApiFailure,
    > {
        let (vm, _) = self.row(name)?;
        let _guard = self.lock_vm(&vm).await;
        let row = self.store.get_vm(&vm)?;
        if row.state != VmState::Off {
            return Err(ApiFailure::conflict(format!(
                "VM {vm} is {} here; a migration target must be off",
                row.state
            )));
        }
        self.transition(&row, Operation::Start)?;
        let (pid, qmp) = match self.spawn_as(&row, None, true).await {
            Ok(p) => p,
            Err(e) => {
                self.store.set_runtime(&vm, VmState::Off, None, None)?;
                return Err(e);
            }
        };
        let prepared = async {
            if let Some(tls) = tls {
                migration::use_tls(&qmp, migration::TlsEnd::Target, tls).await?;
            }
            migration::prepare_incoming(&qmp, (listen_ip, 0).into()).await
        };
        let listen = match prepared.await {
            Ok(a) => a,
            Err(e) => {
                let _ = process::signal(pid, libc::SIGKILL);
                self.store.set_runtime(&vm, VmState::Off, None, None)?;
                return Err(ApiFailure::qemu(format!("cannot receive a migration: {e}")));
            }
        };
        self.store
            .set_runtime(&vm, VmState::Running, Some(pid), Some(now_unix()))?;
        self.store.set_last_error(&vm, None)?;
        self.track(&vm, pid, qmp.clone());
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let r = migration::wait_incoming_done(&qmp, Duration::from_secs(600))
                .await
                .map(drop)
                .map_err(|e| e.to_string());
            let _ = tx.send(Some(r));
        });
        info!(vm = %vm, %listen, "waiting for the live migration");
        Ok((listen, rx))
    }

    /// Live-migrates the running VM to the QEMU waiting at `target` (see
    /// [`VmManager::incoming`] on the other node); on success this node's QEMU quits and
    /// the VM is off here. Under the VM's lock, so no replication capture (whose fleecing
    /// point would hold the dirty bitmaps) runs meanwhile.
    pub async fn migrate_out(
        &self,
        name: &str,
        target: std::net::SocketAddr,
        timeout: Duration,
        tls: Option<&migration::MigrationTls>,
    ) -> Result<migration::MigrationOutcome, ApiFailure> {
        let (vm, _) = self.row(name)?;
        let inst = {
            let _guard = self.lock_vm(&vm).await;
            let inst = self.live(&vm)?;
            let opts = migration::MigrateOptions {
                timeout,
                ..Default::default()
            };
            if let Some(tls) = tls {
                migration::use_tls(&inst.qmp, migration::TlsEnd::Source, tls)
                    .await
                    .map_err(|e| {
                        ApiFailure::qemu(format!(
                            "cannot set up TLS for the migration of {vm}: {e}"
                        ))
                    })?;
            }
            let outcome =
                migration::migrate(&inst.qmp, target, opts, |p| {
                    tracing::debug!(vm = %vm, status = ?p.status, sent = p.ram_transferred, remaining = p.ram_remaining, "migrating");
                })
                .await
                .map_err(|e| ApiFailure::qemu(format!("live migration of {vm} failed: {e}")))?;
            let row = self.store.get_vm(&vm)?;
            self.transition(&row, Operation::Stop)?;
            info!(vm = %vm, %target, total_ms = outcome.total_ms, downtime_ms = ?outcome.downtime_ms, "live migration done");
            (inst, outcome)
        };
        let (inst, outcome) = inst;
        if inst.qmp.quit().await.is_err() {
            let _ = process::signal(inst.pid, libc::SIGKILL);
        }
        let mut exited = inst.exited.clone();
        if tokio::time::timeout(QUIT_TIMEOUT, exited.wait_for(|e| *e))
            .await
            .is_err()
        {
            let _ = process::signal(inst.pid, libc::SIGKILL);
            let _ = tokio::time::timeout(QUIT_TIMEOUT, exited.wait_for(|e| *e)).await;
        }
        Ok(outcome)
    }

    /// The QEMU hardware of a spec. An ISO that is gone (e.g. a VM failed over to a host
    /// without it) leaves the drive empty rather than keeping the VM from starting.
    fn hardware(&self, spec: &VmSpec) -> Result<Hardware, ApiFailure> {
        let uefi = match spec.firmware {
            Firmware::Bios => None,
            Firmware::Uefi => {
                let (code, _) = self.ovmf_files(spec.secure_boot)?;
                let nvram_disk = spec
                    .disks
                    .iter()
                    .position(|d| d.role == DiskRole::Nvram)
                    .ok_or_else(|| {
                        ApiFailure::internal(format!("UEFI VM {} has no NVRAM disk", spec.name))
                    })?;
                Some(Uefi {
                    code,
                    nvram_disk,
                    secure_boot: spec.secure_boot,
                })
            }
        };
        let cdrom = spec.cdrom.as_ref().map(|c| {
            c.iso.as_ref().map(PathBuf::from).filter(|iso| {
                let there = iso.exists();
                if !there {
                    warn!(vm = %spec.name, "ISO {} is gone; the CD drive starts empty", iso.display());
                }
                there
            })
        });
        Ok(Hardware {
            machine: spec.machine,
            uefi,
            disk_buses: spec.disks.iter().map(|d| d.bus).collect(),
            cdrom,
            boot_order: spec.boot_order.clone(),
            rng: spec.rng,
        })
    }

    /// Changes a VM's hardware (`ferry vm set`): the CD drive also while it runs (through
    /// QMP, then recorded); the machine type and RNG only while it is off; the boot order
    /// at any time, effective at the next start. Everything is checked before anything
    /// changes.
    pub async fn set(&self, name: &str, req: VmSetRequest) -> Result<VmInfo, ApiFailure> {
        let (vm, _) = self.row(name)?;
        let _guard = self.lock_vm(&vm).await;
        let row = self.store.get_vm(&vm)?;
        let ip_only = req.cdrom.is_none()
            && !req.eject
            && req.boot_order.is_none()
            && req.machine.is_none()
            && req.rng.is_none()
            && (req.failover_ip.is_some() || req.test_failover_ip.is_some());
        if let Some(rel) = self.store.replication(row.id)? {
            // Failover IPs are the replica site's business (as in Hyper-V, where they are
            // set on the replica VM's NIC): a replica may change its own.
            if rel.role == ferry_domain::Role::Replica && !ip_only {
                return Err(ApiFailure::conflict(format!(
                    "VM {vm} is a replica; change its hardware on its primary"
                )));
            }
            // The replica keeps the spec it got when replication was enabled; a machine,
            // RNG or boot order changed here alone would come up differently after a
            // failover. The CD drive's disc is host-local and may change.
            if req.machine.is_some() || req.rng.is_some() || req.boot_order.is_some() {
                return Err(ApiFailure::conflict(format!(
                    "VM {vm} is replicated and its replica keeps the hardware it had when replication was enabled; remove replication, change it, and enable replication again"
                )));
            }
        }
        if req.cdrom.is_some() && req.eject {
            return Err(ApiFailure::invalid(
                "--cdrom and --eject exclude each other".to_owned(),
            ));
        }
        if req == VmSetRequest::default() {
            return Err(ApiFailure::invalid(
                "nothing to change; give --cdrom, --eject, --boot, --machine, --rng, --failover-ip or --test-failover-ip".to_owned(),
            ));
        }
        let running = row.state.has_process();
        let mut spec = row.spec.clone();
        if let Some(iso) = &req.cdrom {
            check_iso(&self.cfg, iso)?;
            if spec.cdrom.is_none() && running {
                return Err(ApiFailure::conflict(format!(
                    "VM {vm} has no CD drive; add one while it is off (ferry vm set {vm} --cdrom ISO)"
                )));
            }
            spec.cdrom = Some(CdromSpec {
                iso: Some(iso.clone()),
            });
        }
        if req.eject {
            let Some(cd) = spec.cdrom.as_mut() else {
                return Err(ApiFailure::invalid(format!("VM {vm} has no CD drive")));
            };
            cd.iso = None;
        }
        if req.machine.is_some() || req.rng.is_some() {
            if running {
                return Err(ApiFailure::conflict(format!(
                    "VM {vm} is {}: change its machine type or RNG while it is off",
                    row.state
                )));
            }
            spec.machine = req.machine.unwrap_or(spec.machine);
            spec.rng = req.rng.unwrap_or(spec.rng);
        }
        if let Some(order) = &req.boot_order {
            spec.boot_order = order.clone();
        }
        if let Some(list) = &req.failover_ip {
            spec.failover_ip = parse_failover_ips(&spec, list)?;
        }
        if let Some(list) = &req.test_failover_ip {
            spec.test_failover_ip = parse_failover_ips(&spec, list)?;
        }
        // A replica's or failed-over VM's disks are paths into the replica storage, not
        // the plain names a new VM's spec has (as the replica server's own check of a
        // primary's spec, they are judged under plain names).
        let mut checked = spec.clone();
        for (i, d) in checked.disks.iter_mut().enumerate() {
            if d.file.starts_with('/') {
                d.file = format!("ferry-check-{i}.qcow2");
            }
        }
        checked
            .validate()
            .map_err(|e| ApiFailure::invalid(e.to_string()))?;
        if running && (req.cdrom.is_some() || req.eject) {
            let inst = self.live(&vm)?;
            let done = match &req.cdrom {
                Some(iso) => hardware::change_cdrom(&inst.qmp, Path::new(iso)).await,
                None => hardware::eject_cdrom(&inst.qmp).await,
            };
            done.map_err(|e| ApiFailure::qemu(format!("{vm}: QEMU refused the CD change: {e}")))?;
        }
        self.store.set_vm_spec(row.id, &spec)?;
        info!(vm = %vm, "hardware changed");
        let row = self.store.get_vm(&vm)?;
        Ok(self.info(&row))
    }

    /// Runs a program in a running guest through its agent (`ferry vm exec`), bounded in
    /// time; an admin's way into a guest without a network, and how tests look inside.
    pub async fn exec(&self, name: &str, req: ExecRequest) -> Result<ExecReply, ApiFailure> {
        let (vm, row) = self.row(name)?;
        if !row.state.has_process() {
            return Err(ApiFailure::conflict(format!(
                "VM {vm} is {}: start it first",
                row.state
            )));
        }
        let Some(path) = req.argv.first() else {
            return Err(ApiFailure::invalid(
                "nothing to run: give the program and its arguments after --".to_owned(),
            ));
        };
        let timeout = Duration::from_secs(req.timeout_s.unwrap_or(60).clamp(1, 600));
        // The channel takes one client at a time: a replication cycle freezing the guest
        // holds it for a moment, so the connection may wait as long as the whole call.
        let mut agent = ferry_qemu::agent::GuestAgent::connect(&self.agent_socket(row.id), timeout)
            .await
            .map_err(|e| ApiFailure::conflict(format!("{vm}: {e}")))?;
        let out = agent
            .exec(path, &req.argv[1..], timeout)
            .await
            .map_err(|e| ApiFailure::conflict(format!("{vm}: {e}")))?;
        Ok(ExecReply {
            exit_code: out.exit_code,
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    fn live(&self, vm: &VmName) -> Result<Arc<Instance>, ApiFailure> {
        self.instance(vm).ok_or_else(|| {
            ApiFailure::conflict(format!(
                "VM {vm} has no QEMU process ferryd can control; see `ferry vm show {vm}`"
            ))
        })
    }

    /// Pauses a running VM's vCPUs.
    pub async fn pause(&self, name: &str) -> Result<ActionReply, ApiFailure> {
        self.simple(name, Operation::Pause, VmState::Paused, "paused")
            .await
    }

    /// Resumes a paused VM.
    pub async fn resume(&self, name: &str) -> Result<ActionReply, ApiFailure> {
        self.simple(name, Operation::Resume, VmState::Running, "resumed")
            .await
    }

    async fn simple(
        &self,
        name: &str,
        op: Operation,
        target: VmState,
        verb: &str,
    ) -> Result<ActionReply, ApiFailure> {
        let (vm, _) = self.row(name)?;
        let _guard = self.lock_vm(&vm).await;
        let row = self.store.get_vm(&vm)?;
        lifecycle::step(row.state, op).map_err(|e| ApiFailure::conflict(format!("{vm}: {e}")))?;
        let inst = self.live(&vm)?;
        let res = match op {
            Operation::Pause => inst.qmp.execute(&qmp::Stop {}).await.map(|_| ()),
            Operation::Resume => inst.qmp.execute(&qmp::Cont {}).await.map(|_| ()),
            _ => unreachable!("simple() handles pause and resume"),
        };
        res.map_err(|e| ApiFailure::qemu(format!("{vm}: QEMU refused to {verb}: {e}")))?;
        self.transition(&row, op)?;
        Ok(ActionReply {
            state: target,
            message: format!("VM {vm} {verb}"),
        })
    }

    /// Asks the guest to power off (ACPI) and waits up to `timeout` for it.
    pub async fn shutdown(&self, name: &str, timeout: Duration) -> Result<ActionReply, ApiFailure> {
        let (vm, _) = self.row(name)?;
        let inst = {
            let _guard = self.lock_vm(&vm).await;
            let row = self.store.get_vm(&vm)?;
            lifecycle::step(row.state, Operation::Shutdown)
                .map_err(|e| ApiFailure::conflict(format!("{vm}: {e}")))?;
            let inst = self.live(&vm)?;
            inst.qmp
                .execute(&qmp::SystemPowerdown {})
                .await
                .map_err(|e| {
                    ApiFailure::qemu(format!("{vm}: cannot send the ACPI power-off: {e}"))
                })?;
            self.transition(&row, Operation::Shutdown)?;
            inst
        };
        // Wait without holding the VM's lock, so `stop` can cut a slow shutdown short.
        let began = Instant::now();
        let mut exited = inst.exited.clone();
        let done = tokio::time::timeout(timeout, exited.wait_for(|e| *e))
            .await
            .is_ok();
        if done {
            return Ok(ActionReply {
                state: VmState::Off,
                message: format!(
                    "VM {vm} shut down by the guest in {:.1} s",
                    began.elapsed().as_secs_f64()
                ),
            });
        }
        let _guard = self.lock_vm(&vm).await;
        let row = self.store.get_vm(&vm)?;
        if row.state == VmState::ShuttingDown {
            self.transition(&row, Operation::ShutdownTimedOut)?;
        }
        Err(ApiFailure {
            status: 504,
            code: "shutdown_timeout",
            message: format!(
                "VM {vm} did not power off within {} s (does the guest handle the ACPI power button?); it is still running: retry, or power it off with `ferry vm stop {vm}`",
                timeout.as_secs()
            ),
        })
    }

    /// Powers a VM off now: QMP `quit` (QEMU closes its disks cleanly), SIGKILL if QEMU
    /// does not end in time.
    pub async fn stop(&self, name: &str) -> Result<ActionReply, ApiFailure> {
        let (vm, _) = self.row(name)?;
        let inst = {
            let _guard = self.lock_vm(&vm).await;
            let row = self.store.get_vm(&vm)?;
            lifecycle::step(row.state, Operation::Stop)
                .map_err(|e| ApiFailure::conflict(format!("{vm}: {e}")))?;
            let inst = self.live(&vm)?;
            self.transition(&row, Operation::Stop)?;
            inst
        };
        if let Err(e) = inst.qmp.quit().await {
            warn!(vm = %vm, error = %e, "quit failed; killing QEMU");
            let _ = process::signal(inst.pid, libc::SIGKILL);
        }
        let mut exited = inst.exited.clone();
        if tokio::time::timeout(QUIT_TIMEOUT, exited.wait_for(|e| *e))
            .await
            .is_err()
        {
            warn!(vm = %vm, "QEMU did not quit in time; killing it");
            let _ = process::signal(inst.pid, libc::SIGKILL);
            let _ = tokio::time::timeout(QUIT_TIMEOUT, exited.wait_for(|e| *e)).await;
        }
        let state = self.store.get_vm(&vm)?.state;
        Ok(ActionReply {
            state,
            message: format!("VM {vm} powered off"),
        })
    }

    // ---- console ----------------------------------------------------------------------

    /// What the serial console printed, from `offset`.
    pub async fn console_log(&self, name: &str, offset: u64) -> Result<ConsoleLog, ApiFailure> {
        let (vm, _) = self.row(name)?;
        let path = self.console_log_path(&vm);
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(ApiFailure::internal(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        let len = bytes.len() as u64;
        let start = offset.min(len);
        let end = (start + CONSOLE_CHUNK).min(len);
        Ok(ConsoleLog {
            offset: start,
            next_offset: end,
            text: String::from_utf8_lossy(&bytes[start as usize..end as usize]).into_owned(),
        })
    }

    /// The serial console socket of a running VM.
    pub fn console_socket(&self, name: &str) -> Result<PathBuf, ApiFailure> {
        let (vm, row) = self.row(name)?;
        self.live(&vm)?;
        Ok(self.runtime_paths(row.id).console)
    }

    /// The VNC socket of a running VM with a display.
    pub fn vnc_socket(&self, name: &str) -> Result<PathBuf, ApiFailure> {
        let (vm, row) = self.row(name)?;
        self.live(&vm)?;
        if !row.spec.vnc {
            return Err(no_display(&vm));
        }
        Ok(self.runtime_paths(row.id).vnc)
    }

    /// A PNG of a running VM's display, through QMP `screendump` into a file of its own
    /// in the run directory (QEMU writes it; each request gets its own name so two at
    /// once do not read each other's half-written file).
    pub async fn screenshot(&self, name: &str) -> Result<Vec<u8>, ApiFailure> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let (vm, row) = self.row(name)?;
        let inst = self.live(&vm)?;
        if !row.spec.vnc {
            return Err(no_display(&vm));
        }
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = self.run_dir().join(format!("{}.screen{n}.png", row.id));
        let dumped = inst
            .qmp
            .execute(&qmp::Screendump {
                filename: file.clone(),
                format: Some(qmp::ImageFormat::Png),
            })
            .await;
        let read = match dumped {
            Ok(_) => tokio::fs::read(&file)
                .await
                .map_err(|e| ApiFailure::internal(format!("cannot read {}: {e}", file.display()))),
            Err(e) => Err(ApiFailure::qemu(format!("screendump failed: {e}"))),
        };
        let _ = tokio::fs::remove_file(&file).await;
        read
    }

    /// Drops QMP connections without touching the VMs (daemon shutdown: VMs keep running).
    pub fn detach_all(&self) {
        self.instances.lock().expect("instances").clear();
    }
}

fn cleanup_runtime(paths: &RuntimePaths) {
    for p in [&paths.qmp, &paths.console, &paths.pidfile, &paths.vnc] {
        let _ = std::fs::remove_file(p);
    }
}

fn no_display(vm: &VmName) -> ApiFailure {
    ApiFailure::conflict(format!(
        "VM {vm} has no display; create it with --vnc to get one"
    ))
}

fn random_mac() -> String {
    let mut b = [0u8; 3];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .expect("system randomness");
    mac_from_seed(b)
}

/// `NIC=ADDR/PREFIX[,gw=IP][,dns=IP;IP]` settings, NIC being an index from 0 or a MAC.
fn parse_failover_ips(
    spec: &VmSpec,
    list: &[String],
) -> Result<Vec<ferry_domain::spec::FailoverIp>, ApiFailure> {
    list.iter()
        .map(|item| {
            let (nic, rest) = item.split_once('=').ok_or_else(|| {
                ApiFailure::invalid(format!(
                    "failover IP {item:?} is not NIC=ADDRESS/PREFIX[,gw=IP][,dns=IP;IP]"
                ))
            })?;
            let mac = match nic.parse::<usize>() {
                Ok(i) => spec.nics.get(i).map(|n| n.mac.clone()),
                Err(_) => spec
                    .nics
                    .iter()
                    .find(|n| n.mac.eq_ignore_ascii_case(nic))
                    .map(|n| n.mac.clone()),
            }
            .ok_or_else(|| {
                ApiFailure::invalid(format!(
                    "failover IP {item:?}: {} has no NIC {nic} (give its index from 0 or its MAC)",
                    spec.name
                ))
            })?;
            ferry_domain::spec::FailoverIp::parse(&mac, rest)
                .map_err(|e| ApiFailure::invalid(format!("{item:?}: {e}")))
        })
        .collect()
}
