//! The comparison a resynchronization (or an initial copy onto an existing copy) reads
//! by: the replica's hashes of every chunk of its disks are fetched before anything is
//! frozen here, and the read sends only the chunks whose hash differs (zero chunks as
//! zero extents, unread).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bytes::Bytes;
use ferry_store::{ReplicationRow, VmRow};
use ferry_wire::Extent;

use super::read::{Mapped, Reading};
use super::session::{handshake, next_control};
use crate::replication::hashes::{self, Hash};
use crate::replication::proto::Msg;
use crate::replication::Shared;

/// How long the replica may take to hash its copy of the disks.
const HASH_TIMEOUT: Duration = Duration::from_secs(3600);

/// Asks the replica for the chunk hashes of every replicated disk.
pub(super) async fn fetch_hashes(
    shared: &Shared,
    vm: &VmRow,
    rel: &ReplicationRow,
) -> anyhow::Result<HashMap<usize, Vec<Hash>>> {
    let mut session = handshake(shared, vm, rel).await?;
    session.writer.write_control(&Msg::HashRequest).await?;
    let wanted = rel.settings.replicated_disks(vm.spec.disks.len());
    let mut out = HashMap::new();
    shared.set_progress(rel.vm_id, "comparing", 0, 0);
    while out.len() < wanted.len() {
        match next_control(&mut session.reader, HASH_TIMEOUT).await? {
            Msg::Hashes { disk, hashes: h } => {
                let size = vm.spec.disks.get(disk).map(|d| d.size_bytes).unwrap_or(0);
                let h = hashes::decode(&h)?;
                if !wanted.contains(&disk) || h.len() as u64 != hashes::chunks(size) {
                    bail!("the replica server sent hashes that do not fit disk {disk}");
                }
                out.insert(disk, h);
            }
            Msg::Failed { reason } => bail!(
                "replica server {} cannot compare: {reason}",
                rel.partner_name
            ),
            other => bail!("unexpected answer from the replica server: {other:?}"),
        }
    }
    session.close().await;
    Ok(out)
}

/// Reads a disk chunk by chunk and sends the chunks whose hash differs from `theirs`.
pub(super) async fn compare(
    r: &mut Reading<'_, '_>,
    disk: Mapped<'_>,
    theirs: Option<&HashMap<usize, Vec<Hash>>>,
) -> anyhow::Result<()> {
    let Mapped {
        source: s,
        mut client,
        map,
        ..
    } = disk;
    let theirs = theirs
        .and_then(|t| t.get(&s.disk))
        .ok_or_else(|| anyhow!("no hashes from the replica for disk {}", s.disk))?;
    let chunk = hashes::chunk_size(s.size);
    let zeros = hashes::zero_chunks(&map, s.size);
    let mut buf = Vec::new();
    for (i, zero) in zeros.iter().enumerate() {
        let offset = i as u64 * chunk;
        let len = chunk.min(s.size - offset);
        r.done += len;
        r.progress("comparing");
        let ext = if *zero {
            if theirs[i] == hashes::zero_hash(len) {
                continue;
            }
            Extent::zeroes(s.disk as u16, offset, len)
        } else {
            buf.resize(len as usize, 0);
            let t = Instant::now();
            client.read(offset, &mut buf).await?;
            r.nbd += t.elapsed();
            if hashes::hash(&buf) == theirs[i] {
                continue;
            }
            if super::read::is_zero(&buf) {
                Extent::zeroes(s.disk as u16, offset, len)
            } else {
                r.data_bytes += len;
                Extent::data(s.disk as u16, offset, Bytes::copy_from_slice(&buf))
            }
        };
        r.out.push(ext).await?;
    }
    let _ = client.disconnect().await;
    Ok(())
}
