//! The apply stage: a cycle's extents written into its layers. Each replicated disk's
//! layer is a new qcow2 image on the previous point's layer, written through a writable
//! `qemu-nbd` (write, write-zeroes, flush); the layers are created here too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_nbd::NbdClient;
use ferry_wire::{ExtentBatch, ExtentKind};
use tokio::process::{Child, Command};

use super::run;
use super::staging::Staging;
use crate::replication::{qemu_nbd_path, Shared};

/// The layers of the cycle being received, open for writing, by disk.
#[derive(Default)]
pub(super) struct Layers {
    writers: HashMap<usize, LayerWriter>,
}

impl Layers {
    /// Opens a writer on each staged layer.
    pub(super) async fn open(
        shared: &Shared,
        vm_id: i64,
        staging: &Staging,
    ) -> anyhow::Result<Self> {
        let qemu_nbd = qemu_nbd_path(&shared.cfg);
        let mut writers: HashMap<usize, LayerWriter> = HashMap::new();
        for (disk, path) in &staging.layers {
            let socket = shared
                .cfg
                .data_dir
                .join("run")
                .join(format!("rx-{}-{disk}.sock", vm_id));
            writers.insert(*disk, LayerWriter::open(&qemu_nbd, path, socket).await?);
        }
        Ok(Layers { writers })
    }

    /// Whether disk `disk` has a layer in this cycle (is replicated).
    pub(super) fn contains(&self, disk: usize) -> bool {
        self.writers.contains_key(&disk)
    }

    /// Writes a checked batch.
    pub(super) async fn write(&mut self, batch: &ExtentBatch) -> anyhow::Result<()> {
        // Per disk: the batch's data extents as one pipelined write (extents
        // of one cycle never overlap), zeroes one by one.
        for (disk, w) in self.writers.iter_mut() {
            let data = batch.extents.iter().filter_map(|e| match &e.kind {
                ExtentKind::Data(d) if e.disk as usize == *disk => Some((e.offset, d.as_ref())),
                _ => None,
            });
            let storage = w.image.parent().map(Path::to_path_buf).unwrap_or_default();
            let full = |e: ferry_nbd::NbdError| {
                if e.to_string().contains("ENOSPC") {
                    anyhow::anyhow!(
                        "the replica storage has no space left (writing disk {disk}'s layer): free space in {} or move the replica storage; the primary keeps tracking and retries",
                        storage.display()
                    )
                } else {
                    e.into()
                }
            };
            w.client()
                .write_many(data, Default::default())
                .await
                .map_err(full)?;
            for e in batch.extents.iter().filter(|e| e.disk as usize == *disk) {
                if let ExtentKind::Zeroes(n) = &e.kind {
                    w.client().write_zeroes(e.offset, *n).await.map_err(full)?;
                }
            }
        }
        Ok(())
    }

    /// Flushes every layer.
    pub(super) async fn flush(&mut self) -> anyhow::Result<()> {
        for w in self.writers.values_mut() {
            w.client().flush().await?;
        }
        Ok(())
    }

    /// Flushes and closes every layer: each `qemu-nbd` closes its image cleanly.
    pub(super) async fn close(mut self) -> anyhow::Result<()> {
        for (_, mut w) in self.writers.drain() {
            w.client().flush().await?;
            w.close().await?;
        }
        Ok(())
    }

    /// Drops the writers without a flush: what was flushed is all that counts.
    pub(super) fn abandon(mut self) {
        for (_, w) in self.writers.drain() {
            let _ = w.client.map(|c| drop(c));
            drop(w.child);
        }
    }
}

/// A writable `qemu-nbd` on one layer, and our client to it.
struct LayerWriter {
    child: Child,
    client: Option<NbdClient>,
    socket: PathBuf,
    /// The layer written (for messages).
    image: PathBuf,
}

impl LayerWriter {
    async fn open(qemu_nbd: &Path, image: &Path, socket: PathBuf) -> anyhow::Result<Self> {
        let _ = std::fs::remove_file(&socket);
        let child = Command::new(qemu_nbd)
            .arg("--format=qcow2")
            .arg("--cache=writeback")
            .arg("--discard=unmap")
            .arg("--detect-zeroes=unmap")
            .arg(format!("--socket={}", socket.display()))
            .arg("--export-name=layer")
            .arg(image)
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", qemu_nbd.display()))?;
        let mut w = LayerWriter {
            child,
            client: None,
            socket,
            image: image.to_path_buf(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if w.socket.exists() {
                if let Ok(c) = NbdClient::connect_unix(&w.socket, "layer", &[]).await {
                    w.client = Some(c);
                    return Ok(w);
                }
            }
            if let Ok(Some(status)) = w.child.try_wait() {
                bail!("qemu-nbd on {} exited ({status})", image.display());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("qemu-nbd on {} did not start", image.display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn client(&mut self) -> &mut NbdClient {
        self.client.as_mut().expect("connected")
    }

    async fn close(mut self) -> anyhow::Result<()> {
        if let Some(c) = self.client.take() {
            c.disconnect().await?;
        }
        // Without --persistent, qemu-nbd exits once its client is gone, after closing the
        // image cleanly.
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(s)) if s.success() => {}
            Ok(Ok(s)) => bail!("qemu-nbd exited with {s}"),
            _ => bail!("qemu-nbd did not exit"),
        }
        let _ = std::fs::remove_file(&self.socket);
        Ok(())
    }
}

/// A cycle's layer. The relationship id is in the name: after a failover and reverse
/// replication the same directory holds the layers of earlier relationships (under the
/// failed-over disks), which a new relationship's cycle numbers must never collide with.
pub(super) fn layer_path(vm_dir: &Path, relationship: u64, disk: usize, cycle: i64) -> PathBuf {
    vm_dir.join(format!(
        "disk{disk}.r{:08x}.c{cycle}.qcow2",
        relationship as u32
    ))
}

/// Creates a layer of `size` bytes on `backing` (or a blank one).
pub(super) async fn create_layer(
    qemu_img: &Path,
    path: &Path,
    size: u64,
    backing: Option<&Path>,
) -> anyhow::Result<()> {
    let mut cmd = Command::new(qemu_img);
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some(b) = backing {
        cmd.arg("-b").arg(b).args(["-F", "qcow2"]);
    }
    cmd.arg(path).arg(size.to_string());
    run(cmd, "create a recovery point layer").await
}
