//! The capture of a VM that is off: its images are the frozen view (the VM is off and
//! locked, so nothing writes to them), each exported read-only by `qemu-nbd` with the
//! generation being read. The next generation is started on the images before the read;
//! the older ones stay until the replica commits the point.

use ferry_nbd::BASE_ALLOCATION;
use ferry_qemu::cbt::{self, OfflineExport};
use tracing::info;

use super::capture::Capture;
use super::frame::Tap;
use super::generations::set_generation;
use super::read::{read_to_spool, ReadSummary, Source};
use super::spool::write_meta;
use super::ResyncRequired;
use crate::replication::qemu_nbd_path;

/// Captures the stopped VM from its images: the new generation started, the read, and the
/// captured cycle's description.
pub(super) async fn capture(c: &Capture<'_>, mut tap: Option<&mut Tap>) -> anyhow::Result<()> {
    start_generation(c).await?;
    // The VM is off: nothing runs inside to be inconsistent.
    let point = c.point_taken(false, tap.as_deref_mut()).await;
    match read_exports(c, tap).await {
        Ok(read) => {
            let p = c.describe(&point, &read);
            write_meta(&c.meta_path, &p)?;
            set_generation(c.shared, c.rel.vm_id, c.new_gen_no);
            // The older generations stay until the replica has committed this point.
            info!(
                vm = %c.vm.spec.name,
                cycle = c.cycle,
                kind = c.kind,
                dirty_bytes = read.dirty_bytes,
                timing = %read.timing,
                "offline cycle captured"
            );
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&c.spool_path);
            // The old generation still holds everything; the new one only what follows.
            Err(e)
        }
    }
}

/// Checks the generation a delta reads on every image, and starts the new one.
async fn start_generation(c: &Capture<'_>) -> anyhow::Result<()> {
    let qemu_img = &c.shared.cfg.qemu_img;
    let gran = c.rel.settings.granularity as u64;
    let vm = c.vm;
    for (_, image, _) in &c.disks {
        let bitmaps = cbt::offline_bitmaps(qemu_img, image).await?;
        if let Some(old) = c.old_gen.as_deref() {
            match bitmaps.iter().find(|b| b.name == old) {
                None => return Err(ResyncRequired(format!("change tracking of {} was lost (generation {old} is missing): resynchronization required — run `ferry replication resume {} --resync`", image.display(), vm.spec.name)).into()),
                Some(b) if b.in_use() => return Err(ResyncRequired(format!("change tracking of {} is inconsistent (QEMU or the host crashed while the VM ran): resynchronization required — run `ferry replication resume {} --resync`", image.display(), vm.spec.name)).into()),
                Some(_) => {}
            }
        }
        // Start the new generation now: the VM is off and locked, so nothing is written
        // between this instant and the read below.
        if !bitmaps.iter().any(|b| b.name == c.new_gen) {
            cbt::add_bitmap_offline(qemu_img, image, &c.new_gen, gran).await?;
        }
    }
    Ok(())
}

/// Exports every image (with the generation read, for a delta), reads them, and closes the
/// exports.
async fn read_exports(c: &Capture<'_>, tap: Option<&mut Tap>) -> anyhow::Result<ReadSummary> {
    let (shared, rel) = (c.shared, c.rel);
    let old_gen = c.old_gen.as_deref();
    let qemu_nbd = qemu_nbd_path(&shared.cfg);
    let mut exports = Vec::new();
    let mut sources = Vec::new();
    let result = async {
        for (i, image, size) in &c.disks {
            let socket = shared
                .cfg
                .data_dir
                .join("run")
                .join(format!("off-{}-{i}.sock", rel.vm_id));
            let export = OfflineExport::start(&qemu_nbd, image, old_gen, &socket).await?;
            sources.push(Source {
                disk: *i,
                socket: socket.clone(),
                export: export.export_name().to_owned(),
                size: *size,
            });
            exports.push(export);
        }
        let context = old_gen
            .map(ferry_nbd::dirty_bitmap_context)
            .unwrap_or_else(|| BASE_ALLOCATION.to_owned());
        read_to_spool(c, &sources, &context, tap).await
    }
    .await;
    for e in exports {
        let _ = e.close().await;
    }
    result
}
