//! Staging: a cycle being received stays resumable. Its layers and how far they got
//! durably are kept in memory and as `staging.json` beside the layers, so after a dropped
//! link, or a replica crash, the primary resumes the transfer instead of restarting it.
//! The receive stage checkpoints it; the commit stage deletes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::bail;
use ferry_domain::replication::InitialMethod;
use ferry_domain::Role;
use ferry_store::{ReplicationRow, Store};
use tracing::info;

use super::apply::{create_layer, layer_path, Layers};
use super::commit::fsync;
use super::cycle::Announced;
use super::receive::Target;
use crate::replication::Shared;

/// A cycle being received: its layers and how far it got durably. Also kept as
/// `staging.json` beside the layers, so a transfer resumes after a replica crash too.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Staging {
    pub(super) cycle: i64,
    pub(super) layers: Vec<(usize, PathBuf)>,
    pub(super) next_batch: u64,
    /// The capture being received (`CycleBegin::capture`).
    #[serde(default)]
    pub(super) capture: u64,
}

pub(super) const STAGING_FILE: &str = "staging.json";

/// The staged layers of cycle `announced`, if it resumes the cycle staged here at the
/// batch the primary resumes from; otherwise whatever was staged goes, and the cycle starts
/// fresh layers on the latest point.
pub(super) async fn resume_or_start(
    shared: &Arc<Shared>,
    rel: &ReplicationRow,
    target: &Target,
    announced: &Announced<'_>,
) -> anyhow::Result<Staging> {
    let (cycle, from_batch, capture) = (announced.cycle, announced.from_batch, announced.capture);
    let vm_dir = &target.vm_dir;
    // Continue a staged cycle, or start fresh layers.
    let staged = shared
        .replica
        .staging
        .lock()
        .expect("staging")
        .remove(&rel.vm_id);
    let staging = match staged {
        Some(s)
            if s.cycle == cycle
                && s.next_batch == from_batch
                && s.capture == capture
                && capture != 0 =>
        {
            s
        }
        other => {
            if let Some(old) = other {
                for (_, p) in &old.layers {
                    let _ = std::fs::remove_file(p);
                }
            }
            let _ = std::fs::remove_file(vm_dir.join(STAGING_FILE));
            if from_batch != 0 {
                bail!("the primary resumed cycle {cycle} at batch {from_batch}, but nothing is staged here: restart the cycle");
            }
            let mut layers = Vec::new();
            for &(disk, size) in &target.disk_sizes {
                let path = layer_path(vm_dir, rel.settings.relationship_id, disk, cycle);
                let _ = std::fs::remove_file(&path);
                // On the latest point; before the first, on the existing copy if that is
                // the initial method.
                let backing = target
                    .latest
                    .as_ref()
                    .and_then(|p| p.layers.iter().find(|(d, _)| *d == disk))
                    .map(|(_, l)| PathBuf::from(l))
                    .or_else(|| {
                        (rel.settings.initial == InitialMethod::Existing)
                            .then(|| vm_dir.join(format!("disk{disk}.qcow2")))
                    });
                create_layer(&shared.cfg.qemu_img, &path, size, backing.as_deref()).await?;
                layers.push((disk, path));
            }
            Staging {
                cycle,
                layers,
                next_batch: 0,
                capture,
            }
        }
    };
    Ok(staging)
}

/// A durable checkpoint of the cycle being received: its layers flushed, then how far it
/// got (`next_batch`) recorded. A dropped link re-sends only what came after.
pub(super) async fn checkpoint(
    layers: &mut Layers,
    staging: &mut Staging,
    vm_dir: &Path,
    next_batch: u64,
) -> anyhow::Result<()> {
    layers.flush().await?;
    staging.next_batch = next_batch;
    save_staging(vm_dir, staging)
}

/// Keeps a cycle that stopped part-way staged for the primary to resume.
pub(super) fn keep(shared: &Shared, vm_id: i64, staging: Staging) {
    shared
        .replica
        .staging
        .lock()
        .expect("staging")
        .insert(vm_id, staging);
}

/// Records how far a cycle being received got (after its layers were flushed).
fn save_staging(vm_dir: &Path, staging: &Staging) -> anyhow::Result<()> {
    let tmp = vm_dir.join("staging.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(staging)?)?;
    fsync(&tmp)?;
    std::fs::rename(&tmp, vm_dir.join(STAGING_FILE))?;
    // The rename is durable only once the directory is.
    fsync(vm_dir)?;
    Ok(())
}

/// At startup: a cycle that was being received resumes from its `staging.json` (if it is
/// the next cycle and its layers are there); any other layer not referenced by a recovery
/// point is a half-received cycle and goes. Returns the staged cycles by VM id.
pub fn recover_staging(store: &Store) -> anyhow::Result<HashMap<i64, Staging>> {
    let mut staged = HashMap::new();
    for rel in store
        .list_replications()?
        .into_iter()
        .filter(|r| r.role == Role::Replica)
    {
        let points = store.list_points(rel.vm_id)?;
        let mut referenced: Vec<String> = points
            .iter()
            .flat_map(|p| p.layers.iter().map(|(_, l)| l.clone()))
            .collect();
        let Some(vm) = store.vm_by_id(rel.vm_id)? else {
            continue;
        };
        let Some(dir) = PathBuf::from(&vm.spec.disks[0].file)
            .parent()
            .map(Path::to_path_buf)
        else {
            continue;
        };
        let staging: Option<Staging> = std::fs::read(dir.join(STAGING_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|s: &Staging| {
                s.cycle == rel.last_cycle + 1 && s.layers.iter().all(|(_, p)| p.exists())
            });
        match staging {
            Some(s) => {
                info!(vm = %vm.spec.name, cycle = s.cycle, next_batch = s.next_batch, "a partly received cycle will resume");
                referenced.extend(s.layers.iter().map(|(_, p)| p.display().to_string()));
                staged.insert(rel.vm_id, s);
            }
            None => {
                let _ = std::fs::remove_file(dir.join(STAGING_FILE));
            }
        }
        // Everything a referenced layer is built on is referenced too: a crash in the
        // middle of a retention merge leaves a dropped point's layer under later ones.
        let mut queue: Vec<PathBuf> = referenced.iter().map(PathBuf::from).collect();
        while let Some(layer) = queue.pop() {
            if let Some(b) = backing_file(&layer) {
                let s = b.display().to_string();
                if !referenced.contains(&s) {
                    referenced.push(s);
                    queue.push(b);
                }
            }
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("disk")
                && name.contains(".c")
                && name.ends_with(".qcow2")
                && !referenced.iter().any(|r| Path::new(r) == p)
            {
                info!(file = %p.display(), "removing a layer of an incomplete cycle");
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    Ok(staged)
}

/// The backing file named in a qcow2 image's header (relative names resolved against the
/// image's directory), if any.
fn backing_file(image: &Path) -> Option<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image).ok()?;
    let mut head = [0u8; 20];
    f.read_exact(&mut head).ok()?;
    if &head[..4] != b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(head[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(head[16..20].try_into().ok()?) as usize;
    if offset == 0 || len == 0 || len > 4096 {
        return None;
    }
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut name = vec![0u8; len];
    f.read_exact(&mut name).ok()?;
    let name = PathBuf::from(String::from_utf8(name).ok()?);
    Some(if name.is_absolute() {
        name
    } else {
        image.parent()?.join(name)
    })
}
