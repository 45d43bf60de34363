//! The replica VM a primary's greeting describes: what the primary says about its VM is
//! checked against this host's rules and limits before anything is stored, then the replica
//! VM and its relationship are found or created in the primary's authorized storage. Part
//! of answering the greeting (`session`), kept apart because it is the only place a replica
//! VM comes into being.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::anyhow;
use ferry_domain::replication::{InitialMethod, ReplicationSettings};
use ferry_domain::{DiskSpec, ReplicationState, Role, VmSpec};
use ferry_store::ReplicationRow;
use tracing::info;

use crate::replication::proto::DiskMeta;
use crate::replication::{now_unix, Shared};

/// What a primary's greeting says about its VM, checked against this host's rules: the
/// spec's own validity (CPU, memory, disk and NIC counts and sizes, names), the disk list
/// and settings, and the announced boot files.
pub(super) fn check_hello(
    spec: &VmSpec,
    disks: &[DiskMeta],
    settings: &ReplicationSettings,
    boot_files: &[crate::replication::proto::BootFileMeta],
) -> Result<(), String> {
    // The primary's disk file names are its own business (a failed-over replica's are
    // paths into its storage) and are never used here: the replica names its own files.
    let mut checked = spec.clone();
    for (i, d) in checked.disks.iter_mut().enumerate() {
        d.file = format!("disk{i}.qcow2");
    }
    checked
        .validate()
        .map_err(|e| format!("the primary's description of {} is invalid: {e}", spec.name))?;
    settings.validate(spec.disks.len()).map_err(|e| {
        format!(
            "the primary's replication settings of {} are invalid: {e}",
            spec.name
        )
    })?;
    if disks.len() > ferry_domain::spec::MAX_DISKS
        || disks
            .iter()
            .any(|d| d.size_bytes == 0 || d.size_bytes > ferry_domain::spec::MAX_DISK_BYTES)
    {
        return Err(format!(
            "the primary sent an invalid disk list for {}: at most {} disks of 1 byte to {} bytes",
            spec.name,
            ferry_domain::spec::MAX_DISKS,
            ferry_domain::spec::MAX_DISK_BYTES
        ));
    }
    crate::replication::boot_files::check_announced(spec, boot_files)
}

/// The directory of replica VM `vm_id` when it lives in the primary's authorized
/// `storage` (so its boot files are this host's copies, kept there), after pointing its
/// spec at them (replicas created before boot files were shipped kept the primary's
/// paths). `None` for a VM that became a replica by reverse replication: its spec is this
/// host's own.
pub(super) fn managed_boot_dir(
    shared: &Arc<Shared>,
    vm_id: i64,
    storage: &Path,
) -> anyhow::Result<Option<PathBuf>> {
    let row = shared
        .store
        .vm_by_id(vm_id)?
        .ok_or_else(|| anyhow!("the replica VM is gone"))?;
    let Some(dir) = row
        .spec
        .disks
        .first()
        .and_then(|d| Path::new(&d.file).parent())
        .map(Path::to_path_buf)
    else {
        return Ok(None);
    };
    if !dir.starts_with(storage) {
        return Ok(None);
    }
    let local = crate::replication::boot_files::localize(&row.spec, &dir);
    if local != row.spec {
        shared.store.set_vm_spec(vm_id, &local)?;
    }
    Ok(Some(dir))
}

/// This replica server's limits on a new replica VM: how many one primary may have, and
/// how many virtual disk bytes the replicas in one storage location may add up to.
fn check_limits(
    shared: &Arc<Shared>,
    primary: &str,
    fingerprint: &str,
    storage: &Path,
    disks: &[DiskMeta],
    vm: &str,
) -> Result<(), String> {
    let cfg = super::config_for(shared, vm);
    let me = &shared.cfg.name;
    let replicas: Vec<(ferry_store::VmRow, ReplicationRow)> = shared
        .store
        .list_vms()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter_map(|v| {
            let rel = shared.store.replication(v.id).ok()??;
            (rel.role == Role::Replica).then_some((v, rel))
        })
        .collect();
    if let Some(max) = cfg.max_vms_per_primary {
        let mine = replicas
            .iter()
            .filter(|(_, r)| r.partner_fingerprint == fingerprint)
            .count();
        if mine >= max as usize {
            return Err(format!(
                "primary {primary} already has {mine} replica VMs on {me}, its limit: on {me}, raise it with `ferry replica-server set --max-vms-per-primary N` or remove one"
            ));
        }
    }
    if let Some(quota) = cfg.storage_quota_bytes {
        let used: u64 = replicas
            .iter()
            .filter(|(v, _)| {
                v.spec
                    .disks
                    .first()
                    .is_some_and(|d| Path::new(&d.file).starts_with(storage))
            })
            .flat_map(|(v, _)| v.spec.disks.iter().map(|d| d.size_bytes))
            .sum();
        let wanted: u64 = disks.iter().map(|d| d.size_bytes).sum();
        if used.saturating_add(wanted) > quota {
            return Err(format!(
                "a replica of {wanted} bytes would take {} past its quota of {quota} bytes ({used} in use): on {me}, raise it with `ferry replica-server set --storage-quota SIZE`",
                storage.display()
            ));
        }
    }
    Ok(())
}

/// Finds (or creates) the replica VM and relationship for this primary's VM.
#[allow(clippy::too_many_arguments)]
pub(super) fn replica_for(
    shared: &Arc<Shared>,
    primary: &str,
    fingerprint: &str,
    from_ip: &str,
    spec: &VmSpec,
    disks: &[DiskMeta],
    settings: &ReplicationSettings,
    storage: &Path,
) -> Result<ReplicationRow, String> {
    let store = &shared.store;
    let me = &shared.cfg.name;
    if let Ok(row) = store.get_vm(&spec.name) {
        return match store.replication(row.id).map_err(|e| e.to_string())? {
            Some(rel) if rel.role == Role::Replica && rel.partner_fingerprint == fingerprint => Ok(rel),
            _ => Err(format!(
                "a VM named {} already exists on {me} and is not a replica from {primary}: rename or remove it there",
                spec.name
            )),
        };
    }
    if disks.is_empty() || disks.iter().any(|d| d.size_bytes == 0) {
        return Err("the primary sent an invalid disk list".into());
    }
    let expected: Vec<(usize, u64)> = spec
        .disks
        .iter()
        .enumerate()
        .filter(|(i, _)| !settings.excluded_disks.contains(i))
        .map(|(i, d)| (i, d.size_bytes))
        .collect();
    let announced: Vec<(usize, u64)> = disks.iter().map(|d| (d.index, d.size_bytes)).collect();
    if expected != announced {
        return Err(
            "the primary sent a disk list that does not match its VM and exclusions".into(),
        );
    }
    check_limits(
        shared,
        primary,
        fingerprint,
        storage,
        disks,
        spec.name.as_str(),
    )?;
    let dir = storage.join(spec.name.as_str());
    if settings.initial == InitialMethod::Existing {
        for d in disks {
            let seed = dir.join(format!("disk{}.qcow2", d.index));
            check_seed(&seed, d.size_bytes).map_err(|e| {
                format!(
                    "initial copy from an existing copy: {e}; put a qcow2 copy of disk {} of {} ({} bytes) at {} on {me}, then enable again",
                    d.index,
                    spec.name,
                    d.size_bytes,
                    seed.display()
                )
            })?;
        }
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| format!("cannot create {} on {me}: {e}", dir.display()))?;
    // The replica VM's disks point into its storage (same slots as on the primary); they
    // are updated to the latest recovery point's layers as points arrive. An excluded disk
    // gets a blank image of its size, as the failed-over VM will need one.
    let mut replica_spec = spec.clone();
    let mut slots = Vec::new();
    for (i, d) in spec.disks.iter().enumerate() {
        let excluded = settings.excluded_disks.contains(&i);
        let file = dir.join(if excluded {
            format!("disk{i}.excluded.qcow2")
        } else {
            format!("disk{i}.qcow2")
        });
        if excluded && !file.exists() {
            let ok = std::process::Command::new(&shared.cfg.qemu_img)
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&file)
                .arg(d.size_bytes.to_string())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                return Err(format!("cannot create {} on {me}", file.display()));
            }
        }
        slots.push(DiskSpec {
            file: file.display().to_string(),
            size_bytes: d.size_bytes,
            ..d.clone()
        });
    }
    replica_spec.disks = slots;
    let replica_spec = crate::replication::boot_files::localize(&replica_spec, &dir);
    let row = store
        .insert_vm(&replica_spec, now_unix())
        .map_err(|e| e.to_string())?;
    let rel = ReplicationRow {
        vm_id: row.id,
        role: Role::Replica,
        partner_name: primary.to_owned(),
        partner_addr: from_ip.to_owned(),
        partner_fingerprint: fingerprint.to_owned(),
        settings: settings.clone(),
        state: ReplicationState::WaitingForInitialReplication,
        generation: 0,
        last_cycle: 0,
        last_point_at: None,
        last_error: None,
        created_at: now_unix(),
    };
    if let Err(e) = store.insert_replication(&rel) {
        let _ = store.delete_vm(&spec.name);
        return Err(e.to_string());
    }
    shared.events.emit(
        &spec.name,
        "replica_created",
        &format!(
            "replica of {} from {primary} created in {}",
            spec.name,
            dir.display()
        ),
    );
    info!(vm = %spec.name, %primary, dir = %dir.display(), "replica VM created");
    Ok(rel)
}

/// An existing copy must be a qcow2 image of the disk's exact size.
fn check_seed(path: &Path, size: u64) -> Result<(), String> {
    use std::io::Read;
    let mut head = [0u8; 32];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| format!("{} cannot be read ({e})", path.display()))?;
    if &head[..4] != b"QFI\xfb" {
        return Err(format!(
            "{} is not a qcow2 image (convert it with `qemu-img convert -O qcow2`)",
            path.display()
        ));
    }
    let virtual_size = u64::from_be_bytes(head[24..32].try_into().expect("8 bytes"));
    if virtual_size != size {
        return Err(format!(
            "{} is {virtual_size} bytes, the disk is {size}",
            path.display()
        ));
    }
    Ok(())
}
