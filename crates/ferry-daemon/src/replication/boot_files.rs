//! The files a direct-kernel VM boots from (kernel, initrd). A replica never uses a host
//! path a primary sends: it keeps its own copies in the replica VM's directory
//! (`boot/kernel`, `boot/initrd`), and the primary ships them when the replica lacks them
//! or holds another version (same name, other content: compared by BLAKE3). The replica
//! checks every chunk's place and the whole file's size and hash before the file replaces
//! its previous copy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context};
use ferry_domain::{Boot, VmSpec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{from_hex, to_hex, BootFileMeta, Msg, BOOT_FILE_CHUNK, MAX_BOOT_FILE};
use ferry_wire::{FrameReader, FrameWriter};

/// The roles a boot file may have.
pub const ROLES: [&str; 2] = ["kernel", "initrd"];

/// (path, size, mtime) → BLAKE3 hex: a cycle's handshake does not read a 60 MB initrd again.
static HASHES: Mutex<Option<HashMap<(PathBuf, u64, SystemTime), String>>> = Mutex::new(None);

/// BLAKE3 of the file at `path` (hex) and its size, cached by size and mtime.
pub async fn hash_file(path: &Path) -> anyhow::Result<(u64, String)> {
    let meta = tokio::fs::metadata(path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    let key = (path.to_owned(), meta.len(), meta.modified()?);
    if let Some(h) = HASHES
        .lock()
        .expect("hash cache")
        .get_or_insert_with(HashMap::new)
        .get(&key)
    {
        return Ok((meta.len(), h.clone()));
    }
    let owned = path.to_owned();
    let hash = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(std::fs::File::open(owned)?)?;
        Ok(hasher.finalize().to_hex().to_string())
    })
    .await??;
    HASHES
        .lock()
        .expect("hash cache")
        .get_or_insert_with(HashMap::new)
        .insert(key, hash.clone());
    Ok((meta.len(), hash))
}

/// The primary's boot files of `spec`: what it announces, and where each one is.
pub async fn announce(spec: &VmSpec) -> anyhow::Result<Vec<(BootFileMeta, PathBuf)>> {
    let Boot::Kernel { kernel, initrd, .. } = &spec.boot else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (role, path) in [("kernel", Some(kernel)), ("initrd", initrd.as_ref())] {
        let Some(path) = path else { continue };
        let path = PathBuf::from(path);
        let (size, hash) = hash_file(&path).await.with_context(|| {
            format!("the {role} of {} cannot be read for its replica", spec.name)
        })?;
        out.push((
            BootFileMeta {
                role: role.to_owned(),
                size,
                hash,
            },
            path,
        ));
    }
    Ok(out)
}

/// Sends the boot files the replica asked for, each followed by its receipt.
pub async fn send<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    files: &[(BootFileMeta, PathBuf)],
    needed: &[String],
    answer_timeout: std::time::Duration,
) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    for role in needed {
        let (meta, path) = files.iter().find(|(m, _)| &m.role == role).ok_or_else(|| {
            anyhow!("the replica asked for a boot file {role:?} that was not announced")
        })?;
        let mut f = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut offset = 0u64;
        let mut buf = vec![0u8; BOOT_FILE_CHUNK];
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 && offset > 0 {
                break;
            }
            writer
                .write_control(&Msg::BootFile {
                    role: role.clone(),
                    offset,
                    data: to_hex(&buf[..n]),
                })
                .await?;
            offset += n as u64;
            if n == 0 || offset >= meta.size {
                break;
            }
        }
        let answer = tokio::time::timeout(answer_timeout, async {
            loop {
                let frame = reader
                    .read_frame()
                    .await?
                    .ok_or_else(|| anyhow!("the replica server closed the connection"))?;
                if frame.kind != ferry_wire::FrameKind::Keepalive {
                    return Ok::<Msg, anyhow::Error>(frame.control()?);
                }
            }
        })
        .await
        .map_err(|_| {
            anyhow!("the replica server did not confirm the {role} within {answer_timeout:?}")
        })??;
        match answer {
            Msg::BootFileStored { role: r } if &r == role => {}
            Msg::Failed { reason } => bail!("the replica refused the {role}: {reason}"),
            other => bail!("unexpected answer to the {role}: {other:?}"),
        }
    }
    Ok(())
}

/// Checks the boot files a primary announces against its spec and this host's limits.
pub fn check_announced(spec: &VmSpec, files: &[BootFileMeta]) -> Result<(), String> {
    for (i, f) in files.iter().enumerate() {
        if !ROLES.contains(&f.role.as_str()) || files[..i].iter().any(|g| g.role == f.role) {
            return Err(format!(
                "the primary announced a boot file with role {:?}: only one kernel and one initrd",
                f.role
            ));
        }
        if f.size == 0 || f.size > MAX_BOOT_FILE {
            return Err(format!(
                "the primary announced a {} of {} bytes: boot files must be 1 byte to {MAX_BOOT_FILE} bytes",
                f.role, f.size
            ));
        }
        if f.hash.len() != 64 || from_hex(&f.hash).is_none() {
            return Err(format!(
                "the primary announced a {} with a malformed hash",
                f.role
            ));
        }
    }
    let has = |r: &str| files.iter().any(|f| f.role == r);
    match &spec.boot {
        Boot::Kernel { initrd, .. } if !has("kernel") || (initrd.is_some() != has("initrd")) => Err(format!(
            "the primary did not announce the boot files of {} (a direct-kernel VM): upgrade ferry on the primary",
            spec.name
        )),
        Boot::Disk if !files.is_empty() => {
            Err("the primary announced boot files for a VM that boots from its disk".into())
        }
        _ => Ok(()),
    }
}

/// Where the replica keeps its copy of a role's file, in the replica VM's directory.
pub fn local_path(vm_dir: &Path, role: &str) -> PathBuf {
    vm_dir.join("boot").join(role)
}

/// `spec` with its boot paths pointing at this host's own copies in `vm_dir`, and its CD
/// drive empty: an ISO path names a file on the primary, and on this host it could name
/// anything (the drive stays, so the guest's hardware is the same).
pub fn localize(spec: &VmSpec, vm_dir: &Path) -> VmSpec {
    let mut spec = spec.clone();
    if let Some(cd) = spec.cdrom.as_mut() {
        cd.iso = None;
    }
    if let Boot::Kernel { kernel, initrd, .. } = &mut spec.boot {
        *kernel = local_path(vm_dir, "kernel").display().to_string();
        if let Some(i) = initrd {
            *i = local_path(vm_dir, "initrd").display().to_string();
        }
    }
    spec
}

/// The roles whose local copy in `vm_dir` is missing or differs from what was announced.
pub async fn needed(vm_dir: &Path, files: &[BootFileMeta]) -> Vec<String> {
    let mut out = Vec::new();
    for f in files {
        match hash_file(&local_path(vm_dir, &f.role)).await {
            Ok((size, hash)) if size == f.size && hash == f.hash => {}
            _ => out.push(f.role.clone()),
        }
    }
    out
}

/// A boot file being received.
pub struct Incoming {
    meta: BootFileMeta,
    partial: PathBuf,
    file: tokio::fs::File,
    written: u64,
    hasher: blake3::Hasher,
}

/// Receives one `BootFile` chunk for `vm_dir`; `Ok(true)` when the file is complete and in
/// place (then the caller answers `BootFileStored`).
pub async fn receive_chunk(
    vm_dir: &Path,
    announced: &[BootFileMeta],
    needed: &[String],
    current: &mut Option<Incoming>,
    role: &str,
    offset: u64,
    data: &str,
) -> Result<bool, String> {
    if !needed.iter().any(|r| r == role) {
        return Err(format!(
            "the primary sent a boot file {role:?} that was not asked for"
        ));
    }
    let bytes = from_hex(data).ok_or("the primary sent a boot file chunk that is not hex")?;
    if offset == 0 {
        let meta = announced
            .iter()
            .find(|m| m.role == role)
            .cloned()
            .ok_or("boot file not announced")?;
        let dir = vm_dir.join("boot");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let partial = dir.join(format!(".{role}.partial"));
        let file = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
        *current = Some(Incoming {
            meta,
            partial,
            file,
            written: 0,
            hasher: blake3::Hasher::new(),
        });
    }
    let inc = current
        .as_mut()
        .filter(|i| i.meta.role == role && i.written == offset)
        .ok_or_else(|| format!("the primary sent the {role} out of order (chunk at {offset})"))?;
    if inc.written + bytes.len() as u64 > inc.meta.size {
        return Err(format!(
            "the primary sent more of the {role} than the {} bytes it announced",
            inc.meta.size
        ));
    }
    inc.file
        .write_all(&bytes)
        .await
        .map_err(|e| format!("cannot write {}: {e}", inc.partial.display()))?;
    inc.hasher.update(&bytes);
    inc.written += bytes.len() as u64;
    if inc.written < inc.meta.size {
        return Ok(false);
    }
    let inc = current.take().expect("checked above");
    if inc.hasher.finalize().to_hex().as_str() != inc.meta.hash {
        let _ = std::fs::remove_file(&inc.partial);
        return Err(format!(
            "the {role} the primary sent does not match the hash it announced"
        ));
    }
    inc.file
        .sync_all()
        .await
        .map_err(|e| format!("cannot fsync {}: {e}", inc.partial.display()))?;
    let target = local_path(vm_dir, role);
    std::fs::rename(&inc.partial, &target)
        .map_err(|e| format!("cannot put the {role} in place: {e}"))?;
    if let Some(dir) = target.parent() {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(true)
}
