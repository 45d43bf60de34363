//! An initial copy carried by hand: the export a primary wrote (`--initial export:DIR`)
//! goes through the same cycle pipeline as a session's cycle, read from the file instead
//! of the connection.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use ferry_domain::Role;
use ferry_wire::{FrameReader, FrameWriter};
use tracing::info;

use super::cycle::{receive_cycle, Announced};
use super::one_session;
use crate::replication::proto::{ExportManifest, Msg, EXPORT_DATA, EXPORT_FORMAT, EXPORT_MANIFEST};
use crate::replication::Shared;

/// Applies an initial copy exported on the primary (`--initial export:DIR`) as the first
/// recovery point. The data file is read as the wire stream would be (checksummed frames):
/// a damaged or truncated file is refused and nothing becomes visible.
pub async fn import_initial(shared: &Arc<Shared>, vm_id: i64, dir: &Path) -> anyhow::Result<i64> {
    let rel = shared
        .store
        .replication(vm_id)?
        .ok_or_else(|| anyhow!("replication was removed"))?;
    let vm = shared
        .store
        .vm_by_id(vm_id)?
        .ok_or_else(|| anyhow!("the replica VM is gone"))?;
    if rel.role != Role::Replica {
        bail!(
            "{} is the primary: import on its replica server {}",
            vm.spec.name,
            rel.partner_name
        );
    }
    if rel.last_cycle != 0 {
        bail!(
            "{} already has recovery points: there is nothing to import",
            vm.spec.name
        );
    }
    let manifest_path = dir.join(EXPORT_MANIFEST);
    let manifest: ExportManifest = std::fs::read(&manifest_path)
        .map_err(|e| {
            anyhow!(
                "cannot read {} ({e}): give the folder the primary exported to, DIR/{}",
                manifest_path.display(),
                vm.spec.name
            )
        })
        .and_then(|b| {
            serde_json::from_slice(&b)
                .map_err(|e| anyhow!("{} is not an export manifest: {e}", manifest_path.display()))
        })?;
    if manifest.format != EXPORT_FORMAT {
        bail!(
            "export format {} is not supported (this ferryd reads {EXPORT_FORMAT})",
            manifest.format
        );
    }
    if manifest.vm != vm.spec.name.as_str() {
        bail!("this export holds VM {}, not {}", manifest.vm, vm.spec.name);
    }
    if manifest.primary_fingerprint != rel.partner_fingerprint {
        bail!(
            "this export comes from host {} (certificate {}), not from {}'s primary {}",
            manifest.primary,
            manifest.primary_fingerprint,
            vm.spec.name,
            rel.partner_name
        );
    }
    if manifest.cycle != 1 {
        bail!(
            "the export holds cycle {}, not an initial copy",
            manifest.cycle
        );
    }
    let data = dir.join(EXPORT_DATA);
    let len = std::fs::metadata(&data)
        .map_err(|e| anyhow!("cannot read {} ({e})", data.display()))?
        .len();
    if len != manifest.file_bytes {
        bail!(
            "{} is {len} bytes, the manifest says {}: the copy is incomplete",
            data.display(),
            manifest.file_bytes
        );
    }
    let _one_session = one_session(shared, vm_id).await;
    // Again under the lock: an import (or a session) may have committed meanwhile.
    let rel = shared
        .store
        .replication(vm_id)?
        .ok_or_else(|| anyhow!("replication was removed"))?;
    if rel.last_cycle != 0 {
        bail!(
            "{} already has recovery points: there is nothing to import",
            vm.spec.name
        );
    }
    // The stream ends as a session's would.
    let mut end = FrameWriter::new(Vec::new());
    end.write_control(&Msg::CycleEnd {
        cycle: manifest.cycle,
        batches: None,
        bytes: None,
    })
    .await?;
    let stream = tokio::io::AsyncReadExt::chain(
        tokio::fs::File::open(&data).await?,
        std::io::Cursor::new(end.into_inner()),
    );
    let mut reader = FrameReader::new(stream);
    let announced = Announced {
        cycle: manifest.cycle,
        kind: &manifest.kind,
        taken_at: manifest.taken_at,
        from_batch: 0,
        batches: manifest.frames,
        bytes: manifest.data_bytes,
        app_consistent: false,
        capture: 0,
        streamed: false,
    };
    let point = receive_cycle(shared, &rel, &mut reader, &announced)
        .await
        .with_context(|| format!("importing {}", data.display()))?
        .0;
    info!(vm = %vm.spec.name, point, "initial copy imported");
    Ok(point)
}
