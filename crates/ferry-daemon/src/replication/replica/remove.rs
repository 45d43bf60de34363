//! Removing a replica VM: its relationship, recovery points and files, and its directory
//! when nothing else lives in it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_api_types::ReplicaServerConfig;
use ferry_domain::VmName;
use tracing::warn;

use crate::replication::Shared;

/// Removes a replica VM's relationship, recovery points and files.
pub fn remove_replica(shared: &Arc<Shared>, vm: &VmName) -> anyhow::Result<()> {
    let row = shared.store.get_vm(vm)?;
    let points = shared.store.list_points(row.id)?;
    shared
        .replica
        .staging
        .lock()
        .expect("staging")
        .remove(&row.id);
    // A replica of the Broker's that it placed on another node since: its files are that
    // node's; only this node's rows go.
    let files_ours = crate::broker::owns_files(shared, row.id, vm.as_str());
    shared.store.delete_replication(row.id)?;
    shared.store.delete_vm(vm)?;
    if !files_ours {
        return Ok(());
    }
    let mut dirs = Vec::new();
    for p in &points {
        for (_, l) in &p.layers {
            let _ = std::fs::remove_file(l);
            if let Some(d) = Path::new(l).parent() {
                dirs.push(d.to_path_buf());
            }
        }
    }
    for d in &row.spec.disks {
        let _ = std::fs::remove_file(&d.file);
    }
    if let Some(d) = PathBuf::from(&row.spec.disks[0].file).parent() {
        dirs.push(d.to_path_buf());
    }
    dirs.sort();
    dirs.dedup();
    let cfg = super::config_for(shared, row.spec.name.as_str());
    // A replica the Broker placed here is gone for the whole cluster.
    crate::broker::forget(shared, vm.as_str());
    let others: Vec<PathBuf> = shared
        .store
        .list_vms()?
        .iter()
        .flat_map(|v| v.spec.disks.iter().map(|d| PathBuf::from(&d.file)))
        .collect();
    for d in dirs {
        if owns_whole_dir(&d, &cfg, &others) {
            let _ = std::fs::remove_dir_all(&d);
        } else {
            // Shared with a storage location or another VM (nested or overlapping storage
            // paths): only this replica's own files go, then the directory if empty.
            warn!(dir = %d.display(), "replica directory is shared: removing only its own files");
            for f in ["boot/kernel", "boot/initrd", "staging.json"] {
                let _ = std::fs::remove_file(d.join(f));
            }
            let _ = std::fs::remove_dir(d.join("boot"));
            let _ = std::fs::remove_dir(&d);
        }
    }
    Ok(())
}

/// Whether `dir` (a removed replica's directory) may be deleted with everything in it: it
/// lies strictly inside a storage location, holds no storage location, and holds no disk
/// of another VM. Paths are compared canonicalized (symlinks and `..` cannot fool it).
fn owns_whole_dir(dir: &Path, cfg: &ReplicaServerConfig, other_disks: &[PathBuf]) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let dir = canon(dir);
    let storages: Vec<PathBuf> = cfg
        .entries
        .iter()
        .map(|e| PathBuf::from(&e.storage))
        .chain(cfg.default_storage.iter().map(PathBuf::from))
        .map(|p| canon(&p))
        .collect();
    storages.iter().any(|s| dir.starts_with(s) && &dir != s)
        && !storages.iter().any(|s| s.starts_with(&dir))
        && !other_disks.iter().any(|d| canon(d).starts_with(&dir))
}
