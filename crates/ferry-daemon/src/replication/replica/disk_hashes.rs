//! Answers a primary's `HashRequest`: the chunk hashes of the replica's disks, so a
//! comparing cycle (an initial copy onto an existing copy, or a resync) sends only the
//! chunks that differ.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use ferry_nbd::{NbdClient, BASE_ALLOCATION};
use ferry_qemu::cbt::OfflineExport;

use super::replicated_disks;
use crate::replication::{hashes, qemu_nbd_path, Shared};

/// The chunk hashes of every replicated disk: of the latest recovery point, or of the
/// existing copy before the first point.
pub(super) async fn disk_hashes(
    shared: &Arc<Shared>,
    vm_id: i64,
) -> anyhow::Result<Vec<(usize, String)>> {
    let rel = shared
        .store
        .replication(vm_id)?
        .ok_or_else(|| anyhow!("replication was removed"))?;
    let vm = shared
        .store
        .vm_by_id(vm_id)?
        .ok_or_else(|| anyhow!("the replica VM is gone"))?;
    let latest = shared.store.list_points(vm_id)?.pop();
    let qemu_nbd = qemu_nbd_path(&shared.cfg);
    let mut out = Vec::new();
    for (disk, size) in replicated_disks(&vm.spec, &rel) {
        let image = match &latest {
            Some(p) => p
                .layers
                .iter()
                .find(|(d, _)| *d == disk)
                .map(|(_, l)| PathBuf::from(l))
                .ok_or_else(|| anyhow!("the latest recovery point has no layer for disk {disk}"))?,
            None => {
                let seed = PathBuf::from(&vm.spec.disks[disk].file);
                if !seed.exists() {
                    bail!("there is no recovery point and no existing copy of disk {disk} to compare with");
                }
                seed
            }
        };
        let socket = shared
            .cfg
            .data_dir
            .join("run")
            .join(format!("hash-{vm_id}-{disk}.sock"));
        let export = OfflineExport::start(&qemu_nbd, &image, None, &socket).await?;
        let result = async {
            let mut c =
                NbdClient::connect_unix(&socket, export.export_name(), &[BASE_ALLOCATION]).await?;
            let h = hashes::hash_disk(&mut c, size).await?;
            let _ = c.disconnect().await;
            Ok::<_, anyhow::Error>(h)
        }
        .await;
        let _ = export.close().await;
        let h = result.with_context(|| format!("hashing disk {disk} of {}", vm.spec.name))?;
        out.push((disk, hashes::encode(&h)));
    }
    Ok(out)
}
