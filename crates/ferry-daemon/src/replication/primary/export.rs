//! An initial copy carried by hand: the captured initial cycle is written out (its spool as
//! a data file, with a manifest) for `ferry replication import` on the replica server, and
//! counts as shipped only once the replica has imported it.

use std::path::Path;

use anyhow::Context;
use ferry_domain::ReplicationState;
use ferry_store::ReplicationRow;
use tracing::info;

use super::session::handshake;
use super::spool::{spool_dir, spool_paths};
use super::{set_state, vm_row, AwaitingImport, Pending};
use crate::replication::proto::{ExportManifest, EXPORT_DATA, EXPORT_FORMAT, EXPORT_MANIFEST};
use crate::replication::Shared;

/// Exports the captured initial copy `p` into `dir` once, then waits (`AwaitingImport`)
/// until the replica has imported it; `Ok` once it has, for it to be recorded as shipped.
pub(super) async fn export_or_await_import(
    shared: &Shared,
    rel: &ReplicationRow,
    p: &Pending,
    dir: &Path,
) -> anyhow::Result<()> {
    if rel.state != ReplicationState::WaitingForInitialReplication {
        export_initial(shared, rel, p, dir).await?;
        set_state(
            shared,
            rel.vm_id,
            ReplicationState::WaitingForInitialReplication,
            None,
        );
        return Err(AwaitingImport.into());
    }
    // Exported: ship() (after this) only records it once the replica has imported it.
    let vm = vm_row(shared, rel.vm_id)?;
    let session = handshake(shared, &vm, rel).await?;
    let imported = session.last_cycle >= p.cycle;
    session.close().await;
    if !imported {
        return Err(AwaitingImport.into());
    }
    Ok(())
}

/// Writes the captured initial copy to `dir/VM/` (data file + manifest) for carrying to
/// the replica server, where `ferry replication import` applies it.
async fn export_initial(
    shared: &Shared,
    rel: &ReplicationRow,
    p: &Pending,
    dir: &Path,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let vm = vm_row(shared, rel.vm_id)?;
    let out = dir.join(vm.spec.name.as_str());
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create the export folder {}", out.display()))?;
    let (spool_path, _) = spool_paths(&spool_dir(shared, rel.vm_id), p.cycle);
    let data = out.join(EXPORT_DATA);
    let mut src = tokio::fs::File::open(&spool_path).await?;
    let mut dst = tokio::fs::File::create(&data)
        .await
        .with_context(|| format!("cannot write {}", data.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0u64;
    shared.set_progress(rel.vm_id, "exporting", 0, p.spool_bytes);
    loop {
        let n = src.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])
            .await
            .with_context(|| format!("cannot write {}", data.display()))?;
        done += n as u64;
        shared.set_progress(rel.vm_id, "exporting", done, p.spool_bytes);
    }
    dst.sync_all().await?;
    let manifest = ExportManifest {
        format: EXPORT_FORMAT,
        vm: vm.spec.name.to_string(),
        primary: shared.cfg.name.clone(),
        primary_fingerprint: shared.identity.fingerprint.clone(),
        cycle: p.cycle,
        kind: p.kind.clone(),
        taken_at: p.taken_at,
        frames: p.frames,
        data_bytes: p.data_bytes,
        file_bytes: done,
    };
    let tmp = out.join("export.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&manifest)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, out.join(EXPORT_MANIFEST))?;
    info!(vm = %vm.spec.name, dir = %out.display(), bytes = done, "initial copy exported");
    Ok(())
}
