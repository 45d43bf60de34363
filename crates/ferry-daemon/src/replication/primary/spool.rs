//! The spool: a captured cycle waiting to be shipped. Its frames are in `cycle-N.spool`,
//! not fsynced (the change-tracking generation kept until the replica's commit covers its
//! loss); its description, [`Pending`], is in `cycle-N.meta`, fsynced (temp + rename) once
//! the read is complete. A cycle is captured only while no spool is pending, and a dropped
//! link resumes from it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::replication::Shared;

/// A captured cycle waiting to be shipped (the `.meta` next to the spool).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    /// Cycle number.
    pub cycle: i64,
    /// `initial`, `delta`, `resync`.
    pub kind: String,
    /// When the disks were frozen (UNIX s).
    pub taken_at: i64,
    /// The generation tracking changes after this point.
    pub generation: i64,
    /// Frames (batches) in the spool.
    pub frames: u64,
    /// Data bytes in the spool (uncompressed).
    pub data_bytes: u64,
    /// Bytes marked dirty (or allocated) when captured.
    pub dirty_bytes: u64,
    /// Spool file size.
    pub spool_bytes: u64,
    /// When capture started (UNIX ms).
    pub started_ms: i64,
    /// The guest's filesystems were frozen through its agent for the point.
    #[serde(default)]
    pub app_consistent: bool,
    /// This capture's identity (see `Msg::CycleBegin::capture`).
    #[serde(default)]
    pub capture: u64,
    /// The ranges read besides the dirty ones (reverse replication's first cycle, a
    /// checkpoint applied): forgotten only once the replica has committed the point.
    #[serde(default)]
    pub extra: Vec<(usize, u64, u64)>,
    /// Whether the spool holds every frame (false: the cycle was larger than the spool's
    /// free space and went only to the wire; it cannot be resumed, only captured again).
    #[serde(default = "spooled_by_default")]
    pub spooled: bool,
}

/// Descriptions written before `Pending::spooled` existed describe whole spools.
fn spooled_by_default() -> bool {
    true
}

pub(super) fn spool_dir(shared: &Shared, vm_id: i64) -> PathBuf {
    shared.cfg.data_dir.join("spool").join(vm_id.to_string())
}

pub(super) fn spool_paths(dir: &Path, cycle: i64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("cycle-{cycle}.spool")),
        dir.join(format!("cycle-{cycle}.meta")),
    )
}

/// The captured cycle waiting to be shipped, if any.
pub fn pending(shared: &Shared, vm_id: i64) -> Option<Pending> {
    let dir = spool_dir(shared, vm_id);
    let mut found: Vec<Pending> = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".meta"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    found.sort_by_key(|p| p.cycle);
    found.into_iter().next()
}

/// Removes everything spooled for a VM.
pub fn discard_spool(shared: &Shared, vm_id: i64) {
    let _ = std::fs::remove_dir_all(spool_dir(shared, vm_id));
}

pub(super) fn write_meta(path: &Path, p: &Pending) -> anyhow::Result<()> {
    let tmp = path.with_extension("meta.tmp");
    std::fs::write(&tmp, serde_json::to_vec(p)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
