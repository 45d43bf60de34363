//! Internal qcow2 snapshots of a VM that is off, with `qemu-img snapshot`: the disk side
//! of checkpoints. (A running VM's are taken over QMP: `blockdev-snapshot-internal-sync`
//! in a transaction, or `snapshot-save` with memory state; see [`crate::qmp`].)
//!
//! Applying a snapshot is where change tracking gets in the way: QEMU 7.2 refuses to revert
//! an image that holds any dirty bitmap ("Device has active dirty bitmaps"), even a
//! disabled one. [`apply`] therefore stashes every bitmap in a scratch qcow2, removes them,
//! reverts, and restores them, so replication's record of unsent writes survives.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::Deserialize;

use crate::cbt;
use crate::process::one_line;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// `qemu-img` could not be run.
    #[error("cannot run {binary:?}: {source}")]
    Run {
        /// The binary.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img` failed.
    #[error("qemu-img {action} on {image:?} failed: {stderr}")]
    Tool {
        /// What was attempted.
        action: String,
        /// The image.
        image: PathBuf,
        /// qemu-img's stderr on one line.
        stderr: String,
    },
    /// Reading or changing the image's bitmaps failed.
    #[error(transparent)]
    Bitmaps(#[from] cbt::CbtError),
    /// `qemu-img info` printed something unexpected.
    #[error("cannot parse qemu-img info of {image:?}: {source}")]
    Parse {
        /// The image.
        image: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

async fn qemu_img(
    binary: &Path,
    action: &str,
    image: &Path,
    args: &[&OsStr],
) -> Result<Vec<u8>, SnapshotError> {
    let out = tokio::process::Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| SnapshotError::Run {
            binary: binary.into(),
            source,
        })?;
    if !out.status.success() {
        let stderr = one_line(&out.stderr);
        return Err(SnapshotError::Tool {
            action: action.into(),
            image: image.into(),
            stderr: if stderr.is_empty() {
                format!("exited with {}", out.status)
            } else {
                stderr
            },
        });
    }
    Ok(out.stdout)
}

async fn snapshot_op(
    binary: &Path,
    op: &str,
    image: &Path,
    tag: &str,
) -> Result<(), SnapshotError> {
    qemu_img(
        binary,
        &format!("snapshot {op} {tag}"),
        image,
        &[
            OsStr::new("snapshot"),
            OsStr::new("-q"),
            OsStr::new(op),
            OsStr::new(tag),
            image.as_os_str(),
        ],
    )
    .await
    .map(|_| ())
}

/// Takes internal snapshot `tag` of the image of a VM that is off.
pub async fn create(binary: &Path, image: &Path, tag: &str) -> Result<(), SnapshotError> {
    snapshot_op(binary, "-c", image, tag).await
}

/// Deletes internal snapshot `tag`: its clusters that nothing else uses are freed; the
/// image and its other snapshots are unchanged.
pub async fn delete(binary: &Path, image: &Path, tag: &str) -> Result<(), SnapshotError> {
    snapshot_op(binary, "-d", image, tag).await
}

/// One internal snapshot as `qemu-img info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SnapshotInfo {
    /// Tag.
    pub name: String,
    /// Bytes of memory state it holds (0 for a disk-only snapshot).
    #[serde(rename = "vm-state-size", default)]
    pub vm_state_size: u64,
}

/// The internal snapshots of an image (read with `-U`, so also while the VM runs).
pub async fn list(binary: &Path, image: &Path) -> Result<Vec<SnapshotInfo>, SnapshotError> {
    #[derive(Deserialize)]
    struct Info {
        #[serde(default)]
        snapshots: Vec<SnapshotInfo>,
    }
    let out = qemu_img(
        binary,
        "info",
        image,
        &[
            OsStr::new("info"),
            OsStr::new("--output=json"),
            OsStr::new("-U"),
            image.as_os_str(),
        ],
    )
    .await?;
    let info: Info = serde_json::from_slice(&out).map_err(|source| SnapshotError::Parse {
        image: image.into(),
        source,
    })?;
    Ok(info.snapshots)
}

/// What [`apply`] did to the image's change tracking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracking {
    /// Every bitmap was stashed and restored unchanged.
    Kept,
    /// A bitmap was inconsistent (QEMU did not close the image cleanly); its record of
    /// writes is gone and the bitmaps were dropped.
    Lost,
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// What became of the bitmaps.
    pub tracking: Tracking,
    /// The bitmaps stashed in `scratch` and, with `restore == false`, left there (the
    /// image has none): the caller re-creates them once QEMU runs.
    pub stashed: Vec<cbt::OfflineBitmap>,
}

/// Reverts the image of a VM that is off to internal snapshot `tag`, keeping its dirty
/// bitmaps: they are stashed in `scratch` (a path for a temporary qcow2) and, if
/// `restore`, put back and the stash removed. Without `restore` the image is left with no
/// bitmap, as QEMU's `-loadvm` needs, and the stash stays for the caller. A missing
/// snapshot is refused before anything changes.
pub async fn apply(
    binary: &Path,
    image: &Path,
    tag: &str,
    scratch: &Path,
    restore: bool,
) -> Result<Applied, SnapshotError> {
    if !list(binary, image).await?.iter().any(|s| s.name == tag) {
        return Err(SnapshotError::Tool {
            action: format!("snapshot -a {tag}"),
            image: image.into(),
            stderr: format!("the image has no snapshot named {tag:?}"),
        });
    }
    let bitmaps = cbt::offline_bitmaps(binary, image).await?;
    let consistent = bitmaps.iter().all(|b| !b.in_use());
    let stash = consistent && !bitmaps.is_empty();
    let _ = tokio::fs::remove_file(scratch).await;
    if stash {
        let size = crate::img::info(binary, image)
            .await
            .map_err(|e| SnapshotError::Tool {
                action: "info".into(),
                image: image.into(),
                stderr: e.to_string(),
            })?
            .virtual_size
            .to_string();
        qemu_img(
            binary,
            "create (bitmap stash)",
            scratch,
            &[
                OsStr::new("create"),
                OsStr::new("-q"),
                OsStr::new("-f"),
                OsStr::new("qcow2"),
                scratch.as_os_str(),
                OsStr::new(&size),
            ],
        )
        .await?;
        for b in &bitmaps {
            copy_bitmap(binary, image, scratch, b).await?;
        }
    }
    for b in &bitmaps {
        if let Err(e) = cbt::remove_bitmap_offline(binary, image, &b.name).await {
            // Put back the ones already removed: the image is otherwise unchanged.
            if stash {
                let left = cbt::offline_bitmaps(binary, image).await?;
                for b in bitmaps
                    .iter()
                    .filter(|b| !left.iter().any(|l| l.name == b.name))
                {
                    copy_bitmap(binary, scratch, image, b).await?;
                }
                let _ = tokio::fs::remove_file(scratch).await;
            }
            return Err(e.into());
        }
    }
    let reverted = snapshot_op(binary, "-a", image, tag).await;
    if stash && (restore || reverted.is_err()) {
        // Put the bitmaps back (also when the revert failed: the image is unchanged).
        for b in &bitmaps {
            copy_bitmap(binary, scratch, image, b).await?;
        }
        let _ = tokio::fs::remove_file(scratch).await;
    }
    reverted?;
    Ok(Applied {
        tracking: if consistent {
            Tracking::Kept
        } else {
            Tracking::Lost
        },
        stashed: if consistent { bitmaps } else { Vec::new() },
    })
}

/// Adds bitmap `b` (same name, granularity and enabled flag) to `to` and merges the one of
/// `from` into it.
async fn copy_bitmap(
    binary: &Path,
    from: &Path,
    to: &Path,
    b: &cbt::OfflineBitmap,
) -> Result<(), SnapshotError> {
    let g = b.granularity.to_string();
    let mut args = vec![
        OsStr::new("bitmap"),
        OsStr::new("--add"),
        OsStr::new("-g"),
        OsStr::new(&g),
    ];
    if !b.auto() {
        args.push(OsStr::new("--disable"));
    }
    args.extend([
        OsStr::new("--merge"),
        OsStr::new(&b.name),
        OsStr::new("-b"),
        from.as_os_str(),
        OsStr::new("-F"),
        OsStr::new("qcow2"),
        OsStr::new("-f"),
        OsStr::new("qcow2"),
        to.as_os_str(),
        OsStr::new(&b.name),
    ]);
    qemu_img(binary, &format!("bitmap --merge {}", b.name), to, &args)
        .await
        .map(|_| ())
}

/// Writes internal snapshot `tag` of `image` as a new standalone qcow2 `out` (also while
/// the VM runs: a snapshot's clusters never change). `progress` gets the fraction done,
/// 0.0–1.0, as qemu-img reports it.
pub async fn export(
    binary: &Path,
    image: &Path,
    tag: &str,
    out: &Path,
    mut progress: impl FnMut(f64),
) -> Result<(), SnapshotError> {
    use tokio::io::AsyncReadExt;
    let source = format!("snapshot.name={tag}");
    let mut child = tokio::process::Command::new(binary)
        .args([
            OsStr::new("convert"),
            OsStr::new("-p"),
            // qemu-img's default for the output is cache=unsafe (never flushed): the
            // export's manifest, written durably afterwards, must not outlive its disks.
            OsStr::new("-t"),
            OsStr::new("writeback"),
            OsStr::new("-U"),
            OsStr::new("-l"),
            OsStr::new(&source),
            OsStr::new("-O"),
            OsStr::new("qcow2"),
            image.as_os_str(),
            out.as_os_str(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| SnapshotError::Run {
            binary: binary.into(),
            source,
        })?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let errors = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf).await;
        buf
    });
    // qemu-img -p prints "    (12.50/100%)\r" as it goes.
    let mut pending = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = stdout.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&chunk[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\r' || b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Some(f) = parse_progress(&String::from_utf8_lossy(&line)) {
                progress(f);
            }
        }
    }
    let status = child.wait().await.map_err(|source| SnapshotError::Run {
        binary: binary.into(),
        source,
    })?;
    let stderr = errors.await.unwrap_or_default();
    if !status.success() {
        let _ = tokio::fs::remove_file(out).await;
        let stderr = one_line(&stderr);
        return Err(SnapshotError::Tool {
            action: "convert".into(),
            image: image.into(),
            stderr: if stderr.is_empty() {
                format!("exited with {status}")
            } else {
                stderr
            },
        });
    }
    progress(1.0);
    Ok(())
}

/// `"    (12.50/100%)"` → 0.125.
fn parse_progress(line: &str) -> Option<f64> {
    let inner = line.trim().strip_prefix('(')?.strip_suffix("/100%)")?;
    inner
        .parse::<f64>()
        .ok()
        .map(|p| (p / 100.0).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn run(args: &[&str]) -> String {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A real image with two bitmap generations (one disabled): apply reverts the data and
    /// keeps both bitmaps with their bits, granularity and flags; export writes the
    /// snapshot's content.
    #[test]
    fn progress_lines_parse() {
        assert_eq!(parse_progress("    (12.50/100%)\r"), Some(0.125));
        assert_eq!(parse_progress("    (100.00/100%)"), Some(1.0));
        assert_eq!(parse_progress("garbage"), None);
    }

    #[tokio::test]
    async fn apply_reverts_data_and_keeps_bitmaps() {
        let qi = Path::new("qemu-img");
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.qcow2");
        let p = img.to_str().unwrap();
        run(&["qemu-img", "create", "-q", "-f", "qcow2", p, "64M"]);
        run(&[
            "qemu-img",
            "bitmap",
            "--add",
            "-g",
            "4096",
            "--disable",
            p,
            "gen-1",
        ]);
        run(&["qemu-img", "bitmap", "--add", "-g", "4096", p, "gen-2"]);
        run(&["qemu-io", "-c", "write -P 1 0 1M", p]);
        create(qi, &img, "cp").await.unwrap();
        run(&["qemu-io", "-c", "write -P 2 64k 4k", p]);
        let before = cbt::offline_bitmaps(qi, &img).await.unwrap();
        let applied = apply(qi, &img, "cp", &dir.path().join("stash.qcow2"), true)
            .await
            .unwrap();
        assert_eq!(applied.tracking, Tracking::Kept);
        assert_eq!(applied.stashed, before);
        run(&["qemu-io", "-c", "read -P 1 0 1M", p]);
        assert_eq!(cbt::offline_bitmaps(qi, &img).await.unwrap(), before);
        assert!(!dir.path().join("stash.qcow2").exists());
        // gen-2 still holds its bits: the writes of before the apply (nbdinfo reads the
        // bitmap through qemu-nbd).
        let map = run(&[
            "nbdinfo",
            "--map=qemu:dirty-bitmap:gen-2",
            "--",
            "[",
            "qemu-nbd",
            "-r",
            "-f",
            "qcow2",
            "-B",
            "gen-2",
            p,
            "]",
        ]);
        let dirty: Vec<&str> = map.lines().filter(|l| l.ends_with("dirty")).collect();
        assert_eq!(dirty.len(), 1, "{map}");
        assert!(
            dirty[0].split_whitespace().take(2).eq(["0", "1048576"]),
            "{map}"
        );
        let out = dir.path().join("exported.qcow2");
        let mut seen = Vec::new();
        export(qi, &img, "cp", &out, |f| seen.push(f))
            .await
            .unwrap();
        assert_eq!(seen.last(), Some(&1.0), "{seen:?}");
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        run(&["qemu-img", "compare", "-q", p, out.to_str().unwrap()]);
        assert_eq!(list(qi, &img).await.unwrap()[0].name, "cp");
        delete(qi, &img, "cp").await.unwrap();
        assert!(list(qi, &img).await.unwrap().is_empty());
        // A missing snapshot changes nothing, bitmaps included.
        assert!(apply(qi, &img, "cp", &dir.path().join("s2.qcow2"), true)
            .await
            .is_err());
        assert_eq!(cbt::offline_bitmaps(qi, &img).await.unwrap(), before);
    }
}
