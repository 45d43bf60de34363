//! What differs between a qcow2 image's current state and one of its internal snapshots,
//! read straight from the image's metadata.
//!
//! An internal snapshot shares every cluster with the active image until one side writes
//! it: the write goes to a newly allocated cluster (copy-on-write, because the shared
//! cluster's refcount is above one). So a guest cluster whose L2 entry in the active L1
//! table equals its entry in the snapshot's L1 table holds the same data on both sides;
//! where the entries differ, the two clusters are read and compared block by block (a
//! 4 KiB guest write copies a whole 64 KiB cluster). Comparing the tables is exact enough to
//! ship only what applying a checkpoint changed, and costs a few metadata reads instead of
//! hashing the disk. No crate reads qcow2 snapshot tables; the format is small and
//! documented in QEMU's `docs/interop/qcow2.txt`.
//!
//! The image must not be open read-write elsewhere (the VM is off): the tables are read
//! without locking.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The image cannot be read.
    #[error("cannot read {path:?}: {source}")]
    Io {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a qcow2 this module can compare.
    #[error("{path:?}: {reason}")]
    Unsupported {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No internal snapshot has this name.
    #[error("{path:?} has no internal snapshot named {tag:?}")]
    NoSnapshot {
        /// The image.
        path: PathBuf,
        /// The missing snapshot name.
        tag: String,
    },
}

/// Bits 9–55 of an L1 or standard L2 entry: a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// "Refcount is exactly one": changes when a snapshot is made or deleted, not the data.
const COPIED: u64 = 1 << 63;
/// Incompatible feature bits this reader does not handle: corrupt (1), external data file
/// (2) and extended L2 entries (4).
const UNSUPPORTED_FEATURES: u64 = (1 << 1) | (1 << 2) | (1 << 4);
/// QEMU's limit on an L1 table (32 MiB of entries): anything larger is a damaged header.
const MAX_L1_ENTRIES: u32 = (32 << 20) / 8;

struct Image {
    file: File,
    path: PathBuf,
    cluster_bits: u32,
    size: u64,
}

impl Image {
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, Qcow2Error> {
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|source| Qcow2Error::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(buf)
    }

    fn unsupported(&self, reason: impl Into<String>) -> Qcow2Error {
        Qcow2Error::Unsupported {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn table(&self, offset: u64, entries: u32) -> Result<Vec<u64>, Qcow2Error> {
        let raw = self.read(offset, entries as usize * 8)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

/// Header extension type of a qcow2's external data file name.
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The external data file a qcow2 names in its header (the raw image a metadata-only qcow2
/// tracks), or `None`. Reads only the header, so it is cheap enough for listing VMs.
pub fn external_data_file(path: &Path) -> Result<Option<String>, Qcow2Error> {
    let io = |source| Qcow2Error::Io {
        path: path.into(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut head = vec![0u8; 4096];
    let n = file.read_at(&mut head, 0).map_err(io)?;
    head.truncate(n);
    if head.len() < 104 || &head[..4] != b"QFI\xfb" || be32(&head, 4) < 3 {
        return Ok(None);
    }
    let mut at = be32(&head, 100) as usize;
    while at + 8 <= head.len() {
        let (kind, len) = (be32(&head, at), be32(&head, at + 4) as usize);
        if kind == 0 {
            break;
        }
        let data = at + 8;
        if kind == EXT_DATA_FILE {
            return Ok(head
                .get(data..data + len)
                .map(|b| String::from_utf8_lossy(b).into_owned()));
        }
        at = data + len.div_ceil(8) * 8;
    }
    Ok(None)
}

/// Bit 62 of an L2 entry: a compressed cluster (its data is not at a plain offset).
const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry (v3): the cluster reads as zeros.
const ZERO: u64 = 1;

/// What a guest cluster reads as, from its L2 entry.
enum ClusterData {
    Zeros,
    At(u64),
    /// Compressed, or unallocated over a backing file: not compared here.
    Opaque,
}

fn cluster_data(entry: u64, has_backing: bool) -> ClusterData {
    if entry & COMPRESSED != 0 {
        return ClusterData::Opaque;
    }
    if entry & ZERO != 0 {
        return ClusterData::Zeros;
    }
    match entry & OFFSET_MASK {
        0 if has_backing => ClusterData::Opaque,
        0 => ClusterData::Zeros,
        off => ClusterData::At(off),
    }
}

/// Guest byte ranges `(offset, length)`, sorted and merged, where `image`'s current state
/// differs from its internal snapshot `tag`, in units of `unit` bytes (a power of two no
/// larger than a cluster; the guest's block size is a good choice). Clusters whose mapping
/// differs are compared unit by unit (a cluster copied on write keeps most of its data);
/// compressed clusters and unallocated ones over a backing file count whole. Clipped to
/// the virtual size.
pub fn changed_since_snapshot(
    image: &Path,
    tag: &str,
    unit: u64,
) -> Result<Vec<(u64, u64)>, Qcow2Error> {
    let file = File::open(image).map_err(|source| Qcow2Error::Io {
        path: image.into(),
        source,
    })?;
    let mut img = Image {
        file,
        path: image.into(),
        cluster_bits: 0,
        size: 0,
    };
    let header = img.read(0, 104)?;
    if &header[0..4] != b"QFI\xfb" {
        return Err(img.unsupported("not a qcow2 image"));
    }
    let version = be32(&header, 4);
    if !(2..=3).contains(&version) {
        return Err(img.unsupported(format!("qcow2 version {version} is not supported")));
    }
    img.cluster_bits = be32(&header, 20);
    if !(9..=21).contains(&img.cluster_bits) {
        return Err(img.unsupported(format!("cluster_bits {} out of range", img.cluster_bits)));
    }
    img.size = be64(&header, 24);
    let has_backing = be64(&header, 8) != 0;
    if be32(&header, 32) != 0 {
        return Err(img.unsupported("encrypted images are not supported"));
    }
    if version == 3 && be64(&header, 72) & UNSUPPORTED_FEATURES != 0 {
        return Err(img.unsupported(
            "corrupt images, external data files and extended L2 entries are not supported",
        ));
    }
    let active_l1_size = be32(&header, 36);
    let active_l1_offset = be64(&header, 40);
    let nb_snapshots = be32(&header, 60);
    let snapshots_offset = be64(&header, 64);

    // Find the snapshot's L1 table.
    let mut at = snapshots_offset;
    let mut found = None;
    for _ in 0..nb_snapshots {
        let fixed = img.read(at, 40)?;
        let l1_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_len = be16(&fixed, 12) as u64;
        let name_len = be16(&fixed, 14) as u64;
        let extra_len = be32(&fixed, 36) as u64;
        let name_at = at + 40 + extra_len + id_len;
        let name = img.read(name_at, name_len as usize)?;
        if name == tag.as_bytes() {
            found = Some((l1_offset, l1_size));
            break;
        }
        let end = name_at + name_len;
        at = end.div_ceil(8) * 8;
    }
    let (snap_l1_offset, snap_l1_size) = found.ok_or_else(|| Qcow2Error::NoSnapshot {
        path: image.into(),
        tag: tag.into(),
    })?;

    if active_l1_size > MAX_L1_ENTRIES || snap_l1_size > MAX_L1_ENTRIES {
        return Err(img.unsupported("L1 table larger than QEMU allows (damaged header)"));
    }
    let cluster = 1u64 << img.cluster_bits;
    // Only guest clusters count: a snapshot's L1 table may be longer than the disk (it
    // also maps the memory state of a standard checkpoint, past the virtual size).
    let span = cluster * (cluster / 8);
    // Checked, not `as u32`: a header whose virtual size needs more L1 entries than QEMU
    // allows would otherwise wrap to a short (even empty) table and report "unchanged".
    let guest_l1 = img.size.div_ceil(span);
    if guest_l1 > u64::from(MAX_L1_ENTRIES) {
        return Err(img.unsupported(format!(
            "virtual size {} needs a larger L1 table than QEMU allows (damaged header)",
            img.size
        )));
    }
    let guest_l1 = guest_l1 as u32;
    let active = img.table(active_l1_offset, active_l1_size.min(guest_l1))?;
    let snap = img.table(snap_l1_offset, snap_l1_size.min(guest_l1))?;
    let unit = if unit.is_power_of_two() && unit <= cluster {
        unit
    } else {
        cluster
    };
    let l2_entries = cluster / 8;
    let span_per_l1 = cluster * l2_entries;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut push = |offset: u64, len: u64, size: u64| {
        if offset >= size {
            return;
        }
        let len = len.min(size - offset);
        match ranges.last_mut() {
            Some(last) if last.0 + last.1 == offset => last.1 += len,
            _ => ranges.push((offset, len)),
        }
    };
    let n = active.len().max(snap.len());
    for i in 0..n {
        let a = active.get(i).map_or(0, |e| e & OFFSET_MASK);
        let s = snap.get(i).map_or(0, |e| e & OFFSET_MASK);
        if a == s {
            // The same L2 table (or both unallocated): every cluster under it is shared.
            continue;
        }
        let a_l2 = match a {
            0 => vec![0; l2_entries as usize],
            off => img.table(off, l2_entries as u32)?,
        };
        let s_l2 = match s {
            0 => vec![0; l2_entries as usize],
            off => img.table(off, l2_entries as u32)?,
        };
        for (j, (ea, es)) in a_l2.iter().zip(&s_l2).enumerate() {
            if ea & !COPIED == es & !COPIED {
                continue;
            }
            let guest = i as u64 * span_per_l1 + j as u64 * cluster;
            if guest >= img.size {
                break;
            }
            let read = |d: ClusterData| -> Result<Option<Vec<u8>>, Qcow2Error> {
                match d {
                    ClusterData::Zeros => Ok(Some(vec![0; cluster as usize])),
                    ClusterData::At(off) => img.read(off, cluster as usize).map(Some),
                    ClusterData::Opaque => Ok(None),
                }
            };
            match (
                read(cluster_data(*ea, has_backing))?,
                read(cluster_data(*es, has_backing))?,
            ) {
                (Some(x), Some(y)) => {
                    let units = x.chunks(unit as usize).zip(y.chunks(unit as usize));
                    for (k, (cx, cy)) in units.enumerate() {
                        if cx != cy {
                            push(guest + k as u64 * unit, unit, img.size);
                        }
                    }
                }
                _ => push(guest, cluster, img.size),
            }
        }
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn run(args: &[&str]) {
        let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Real images made by qemu-img and written by qemu-io: the reported ranges are
    /// exactly the clusters written after the snapshot, whatever happened before it.
    #[test]
    fn reports_exactly_the_clusters_written_after_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.qcow2");
        let p = img.to_str().unwrap();
        run(&["qemu-img", "create", "-q", "-f", "qcow2", p, "1G"]);
        run(&[
            "qemu-io",
            "-c",
            "write -P 1 0 1M",
            "-c",
            "write -P 1 600M 64k",
            p,
        ]);
        run(&["qemu-img", "snapshot", "-c", "older", p]);
        run(&["qemu-io", "-c", "write -P 5 2M 64k", p]);
        run(&["qemu-img", "snapshot", "-c", "cp", p]);
        assert_eq!(changed_since_snapshot(&img, "cp", 4096).unwrap(), vec![]);
        // Overwrite one cluster, partly write another, write far away, zero one, and
        // rewrite one block with what it held (copied on write, yet unchanged).
        run(&[
            "qemu-io",
            "-c",
            "write -P 2 128k 64k",
            "-c",
            "write -P 2 300k 4k",
            "-c",
            "write -P 3 900M 64k",
            "-c",
            "write -z 600M 64k",
            "-c",
            "write -P 1 512k 4k",
            p,
        ]);
        let changed = changed_since_snapshot(&img, "cp", 4096).unwrap();
        assert_eq!(
            changed,
            vec![
                (128 << 10, 64 << 10),
                (300 << 10, 4 << 10),
                (600 << 20, 64 << 10),
                (900 << 20, 64 << 10),
            ]
        );
        // In whole clusters, the partly written one counts whole.
        let coarse = changed_since_snapshot(&img, "cp", 64 << 10).unwrap();
        assert!(coarse.contains(&(256 << 10, 64 << 10)), "{coarse:?}");
        // Against the older snapshot, the write at 2M shows too.
        let older = changed_since_snapshot(&img, "older", 4096).unwrap();
        assert!(older.contains(&(2 << 20, 64 << 10)), "{older:?}");
        // Deleting another snapshot changes refcounts (the COPIED flag), not the answer.
        run(&["qemu-img", "snapshot", "-d", "older", p]);
        assert_eq!(changed_since_snapshot(&img, "cp", 4096).unwrap(), changed);
        assert!(matches!(
            changed_since_snapshot(&img, "nope", 4096),
            Err(Qcow2Error::NoSnapshot { .. })
        ));
        // A virtual size no L1 table of QEMU's can map (found while writing the fuzz
        // target): refused, where the size's L1 entry count used to wrap to 0 and the
        // image read as unchanged.
        let huge = dir.path().join("huge.qcow2");
        run(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            huge.to_str().unwrap(),
            "1M",
        ]);
        run(&["qemu-img", "snapshot", "-c", "cp", huge.to_str().unwrap()]);
        run(&["qemu-io", "-c", "write -P 9 0 4k", huge.to_str().unwrap()]);
        let mut bytes = std::fs::read(&huge).unwrap();
        assert_eq!(
            changed_since_snapshot(&huge, "cp", 512).unwrap(),
            vec![(0, 4096)]
        );
        // 2^47 bytes at 512-byte clusters is 2^32 L1 entries.
        bytes[24..32].copy_from_slice(&(1u64 << 47).to_be_bytes());
        std::fs::write(&huge, &bytes).unwrap();
        match changed_since_snapshot(&huge, "cp", 512) {
            Err(Qcow2Error::Unsupported { reason, .. }) => {
                assert!(reason.contains("larger L1 table"), "{reason}")
            }
            other => panic!("a wrapped L1 size was not refused: {other:?}"),
        }
        let raw = dir.path().join("r.raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            changed_since_snapshot(&raw, "cp", 4096),
            Err(Qcow2Error::Unsupported { .. })
        ));
    }
}
