//! One cycle on the replica, as its pipeline: its frames are received and checked
//! (`receive`), written into the cycle's layers (`apply`), and the layers made durable and
//! recorded as a recovery point (`commit`). A half-received cycle stays staged (`staging`)
//! for the primary to resume. A primary's session and an exported initial copy both come
//! through here.

use std::sync::Arc;
use std::time::Instant;

use ferry_store::ReplicationRow;
use ferry_wire::FrameReader;
use tokio::io::AsyncRead;
use tracing::info;

use super::{apply, commit, receive, staging};
use crate::replication::Shared;

/// A cycle as its `CycleBegin` (or an export's manifest) announced it.
pub(super) struct Announced<'a> {
    pub(super) cycle: i64,
    pub(super) kind: &'a str,
    pub(super) taken_at: i64,
    /// The batch a resumed cycle continues from.
    pub(super) from_batch: u64,
    /// The number of batches and data bytes (0 for a streamed cycle, which says them at
    /// its end).
    pub(super) batches: u64,
    pub(super) bytes: u64,
    pub(super) app_consistent: bool,
    /// The capture the cycle comes from (0: unknown, never resumed).
    pub(super) capture: u64,
    pub(super) streamed: bool,
}

/// Receives, applies and commits a cycle: the new recovery point's id, and the cycle's size.
pub(super) async fn receive_cycle<R: AsyncRead + Unpin>(
    shared: &Arc<Shared>,
    rel: &ReplicationRow,
    reader: &mut FrameReader<R>,
    announced: &Announced<'_>,
) -> anyhow::Result<(i64, u64)> {
    let target = receive::target(shared, rel, announced)?;
    let mut staging = staging::resume_or_start(shared, rel, &target, announced).await?;
    let mut layers = apply::Layers::open(shared, rel.vm_id, &staging).await?;
    let mut timing = receive::ApplyTiming::default();
    let received = receive::frames(
        shared,
        rel,
        reader,
        announced,
        &target,
        &mut layers,
        &mut staging,
        &mut timing,
    )
    .await;
    let bytes = match received {
        Ok(bytes) => bytes,
        Err(e) => {
            // Keep what was durably written, so the primary can resume after a dropped link.
            layers.abandon();
            staging::keep(shared, rel.vm_id, staging);
            return Err(e);
        }
    };
    let t = Instant::now();
    commit::make_durable(layers, &staging, &target.vm_dir).await?;
    let durable = Instant::now();
    timing.durable = durable - t;
    let point = commit::record_point(shared, rel.vm_id, &target, announced, bytes, &staging)?;
    timing.record = durable.elapsed();
    let s = |d: std::time::Duration| format!("{:.3}", d.as_secs_f64());
    info!(
        vm = %target.vm.spec.name,
        cycle = announced.cycle,
        receive_s = s(timing.receive),
        decode_s = s(timing.decode),
        apply_s = s(timing.apply),
        checkpoint_s = s(timing.checkpoint),
        durable_s = s(timing.durable),
        record_s = s(timing.record),
        "cycle applied"
    );
    Ok(point)
}
