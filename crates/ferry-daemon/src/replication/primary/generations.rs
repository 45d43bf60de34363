//! Change-tracking generations: a `ferry-r<N>` dirty bitmap on every replicated disk per
//! generation. A capture reads generation N and starts N+1; N is dropped only once the
//! replica has committed the point (`commit`). A capture whose outcome was not recorded
//! leaves stray generations, which are folded into the newest, and that one adopted.

use std::path::{Path, PathBuf};

use anyhow::bail;
use ferry_qemu::cbt;
use ferry_qemu::process::disk_node;

use crate::replication::Shared;

/// The name of dirty-bitmap generation `n` of a VM's relationship (one per VM).
pub fn generation_name(n: i64) -> String {
    format!("ferry-r{n}")
}

/// Returns the generation holding every change since the last point, after folding stray
/// generations into it: older strays merge into the current one; a newer one (a capture
/// started it and its outcome was not recorded) absorbs every other and is adopted.
pub(super) async fn reconcile_generations(
    qmp: &ferry_qemu::qmp::Qmp,
    nodes: &[String],
    current: i64,
) -> anyhow::Result<i64> {
    let found = generations_on(qmp, nodes).await?;
    let on_node = |node: &str| -> Vec<i64> {
        found
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, names)| {
                names
                    .iter()
                    .filter_map(|n| n.strip_prefix("ferry-r").and_then(|g| g.parse().ok()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let newest = nodes
        .iter()
        .flat_map(|n| on_node(n))
        .max()
        .unwrap_or(current)
        .max(current);
    let target = generation_name(newest);
    for node in nodes {
        for g in on_node(node).into_iter().filter(|g| *g != newest) {
            cbt::rollback_generation(qmp, &[node.as_str()], &generation_name(g), &target).await?;
        }
    }
    Ok(newest)
}

/// [`reconcile_generations`] for a VM that is off, on its images.
pub(super) async fn reconcile_offline(
    qemu_img: &Path,
    images: &[PathBuf],
    current: i64,
) -> anyhow::Result<i64> {
    let mut newest = current;
    let mut all = Vec::new();
    for image in images {
        let found: Vec<(i64, bool)> = cbt::offline_bitmaps(qemu_img, image)
            .await?
            .into_iter()
            // An in-use (inconsistent) generation is left to the capture, which asks for a
            // resynchronization.
            .filter(|b| !b.in_use())
            .filter_map(|b| {
                let g = b.name.strip_prefix("ferry-r")?.parse().ok()?;
                Some((g, b.flags.iter().any(|f| f == "auto")))
            })
            .collect();
        newest = found
            .iter()
            .map(|f| f.0)
            .max()
            .unwrap_or(newest)
            .max(newest);
        all.push((image, found));
    }
    let target = generation_name(newest);
    for (image, found) in all {
        for (g, _) in found.iter().filter(|f| f.0 != newest) {
            let source = generation_name(*g);
            let mut cmd = tokio::process::Command::new(qemu_img);
            // The source bitmap is in the same image: no `-b` (naming the image again as
            // the source's file opens it twice, which its own write lock refuses).
            cmd.args(["bitmap", "--merge", &source, "-f", "qcow2"])
                .arg(image)
                .arg(&target);
            let out = cmd.output().await?;
            if !out.status.success() {
                bail!(
                    "cannot fold change-tracking generation {source} into {target} of {}: {}",
                    image.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            cbt::remove_bitmap_offline(qemu_img, image, &source).await?;
        }
        // The adopted generation must record once QEMU opens the image.
        if found.iter().any(|f| f.0 == newest && !f.1) {
            let out = tokio::process::Command::new(qemu_img)
                .args(["bitmap", "--enable", "-f", "qcow2"])
                .arg(image)
                .arg(&target)
                .output()
                .await?;
            if !out.status.success() {
                bail!(
                    "cannot enable change-tracking generation {target} of {}: {}",
                    image.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }
    Ok(newest)
}

/// The change-tracking generations (`ferry-r<N>` bitmaps) on each of `nodes`.
pub(super) async fn generations_on(
    qmp: &ferry_qemu::qmp::Qmp,
    nodes: &[String],
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let infos = qmp
        .execute(&ferry_qemu::qmp::QueryNamedBlockNodes { flat: Some(true) })
        .await?;
    Ok(nodes
        .iter()
        .map(|node| {
            let names = infos
                .iter()
                .find(|n| &n.node_name == node)
                .map(|info| {
                    info.dirty_bitmaps
                        .iter()
                        .filter_map(|b| b.name.clone())
                        .filter(|n| n.starts_with("ferry-r"))
                        .collect()
                })
                .unwrap_or_default();
            (node.clone(), names)
        })
        .collect())
}

pub(super) fn set_generation(shared: &Shared, vm_id: i64, generation: i64) {
    let _ = shared.store.set_generation(vm_id, generation);
}

/// Removes the generations `which` picks from a VM's replicated disks: through QMP while
/// it runs, on its images while it is off. Goes on past a failure and returns the first.
pub(super) async fn remove_generations(
    shared: &Shared,
    vm: &ferry_store::VmRow,
    rel: &ferry_store::ReplicationRow,
    which: impl Fn(&str) -> bool,
) -> anyhow::Result<()> {
    let disks = super::disks(shared, vm, rel);
    let mut first: Option<anyhow::Error> = None;
    let mut note = |r: Result<(), cbt::CbtError>| {
        if let Err(e) = r {
            first.get_or_insert(e.into());
        }
    };
    if let Some(qmp) = shared.vms.live_qmp(&vm.spec.name) {
        let nodes: Vec<String> = disks.iter().map(|(i, _, _)| disk_node(*i)).collect();
        for (node, names) in generations_on(&qmp, &nodes).await? {
            for name in names.iter().filter(|n| which(n)) {
                note(
                    cbt::remove_generation(&qmp, &[node.as_str()], name)
                        .await
                        .map(drop),
                );
            }
        }
    } else {
        for (_, image, _) in &disks {
            match cbt::offline_bitmaps(&shared.cfg.qemu_img, image).await {
                Ok(bitmaps) => {
                    for b in bitmaps.iter().filter(|b| which(&b.name)) {
                        note(
                            cbt::remove_bitmap_offline(&shared.cfg.qemu_img, image, &b.name)
                                .await
                                .map(drop),
                        );
                    }
                }
                Err(e) => note(Err(e)),
            }
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img(args: &[&str]) {
        let st = std::process::Command::new("qemu-img")
            .args(args)
            .status()
            .expect("qemu-img (install qemu-utils)");
        assert!(st.success(), "qemu-img {args:?}");
    }

    /// A stray older generation on a stopped VM's image (left when the commit that should
    /// have dropped it met the VM shutting down) is folded into the current one: its
    /// changes stay tracked, and it is gone.
    #[tokio::test]
    async fn an_older_stray_generation_is_folded_offline() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.qcow2");
        let img = image.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", img, "16M"]);
        qemu_img(&["bitmap", "--add", "-g", "65536", img, "ferry-r1"]);
        // A write tracked only by the older generation (before the newer one began).
        let st = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write 1M 64k", img])
            .output()
            .unwrap();
        assert!(st.status.success());
        qemu_img(&["bitmap", "--add", "-g", "65536", img, "ferry-r2"]);
        let current = reconcile_offline(Path::new("qemu-img"), &[image.clone()], 2)
            .await
            .expect("the fold");
        assert_eq!(current, 2);
        let left: Vec<String> = cbt::offline_bitmaps(Path::new("qemu-img"), &image)
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert_eq!(left, vec!["ferry-r2".to_string()]);
        // The older generation's change is now in the current one, as a capture reads it.
        let socket = dir.path().join("nbd.sock");
        let export =
            cbt::OfflineExport::start(Path::new("qemu-nbd"), &image, Some("ferry-r2"), &socket)
                .await
                .expect("qemu-nbd");
        let ctx = ferry_nbd::dirty_bitmap_context("ferry-r2");
        let mut client =
            ferry_nbd::NbdClient::connect_unix(&socket, export.export_name(), &[ctx.as_str()])
                .await
                .unwrap();
        let dirty: Vec<(u64, u64)> = client
            .map(&ctx)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.flags & 1 != 0)
            .map(|e| (e.offset, e.length))
            .collect();
        let _ = client.disconnect().await;
        let _ = export.close().await;
        assert_eq!(dirty, vec![(1 << 20, 64 << 10)]);
    }
}
