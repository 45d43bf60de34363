//! `qemu-img` wrappers: image info, qcow2 creation and conversions.
//!
//! Output of `qemu-img info --output=json` is parsed by a pure function
//! ([`parse_info`]) tested against fixtures captured from QEMU 7.2. Errors
//! carry qemu-img's stderr condensed to one line.
//!
//! The functions that create a file refuse to overwrite an existing one:
//! `qemu-img` would silently clobber it, and here it may be a VM's disk.

use std::ffi::OsStr;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;

use crate::process::one_line;

/// Bound on metadata-only operations (`info`, `create`). A hung NFS mount
/// should not hang the daemon; conversions scale with the image and have
/// no timeout (drop the future to cancel them).
const QUICK_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    /// The `qemu-img` binary does not exist.
    #[error("qemu-img binary {binary:?} not found; install it with `apt-get install qemu-utils`")]
    BinaryNotFound {
        /// The binary that was looked up.
        binary: PathBuf,
        /// The error of the exec.
        #[source]
        source: std::io::Error,
    },
    /// Running `qemu-img` failed for another reason.
    #[error("Failed to run qemu-img binary {binary:?}")]
    RunQemuImg {
        /// The binary.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img` did not finish in time and was killed.
    #[error("qemu-img {action} of {path:?} did not finish within {timeout:?}")]
    Timeout {
        /// The subcommand.
        action: &'static str,
        /// The image.
        path: PathBuf,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// An input image does not exist.
    #[error("Image {path:?} does not exist")]
    ImageNotFound {
        /// The missing image.
        path: PathBuf,
    },
    /// An output file exists already.
    #[error("Refusing to overwrite existing file {path:?}")]
    OutputExists {
        /// The existing file.
        path: PathBuf,
    },
    /// `qemu-img info` failed.
    #[error("qemu-img info of {path:?} failed: {stderr}")]
    Info {
        /// The image.
        path: PathBuf,
        /// qemu-img's stderr on one line.
        stderr: String,
    },
    /// The output of `qemu-img info` was not the expected JSON.
    #[error("Failed to parse qemu-img info output")]
    ParseInfo {
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// `qemu-img create` failed.
    #[error("qemu-img create of {path:?} failed: {stderr}")]
    Create {
        /// The image.
        path: PathBuf,
        /// qemu-img's stderr on one line.
        stderr: String,
    },
    /// `qemu-img convert` failed.
    #[error("qemu-img convert of {src:?} to {dst:?} failed: {stderr}")]
    Convert {
        /// The source image.
        src: PathBuf,
        /// The destination.
        dst: PathBuf,
        /// qemu-img's stderr on one line.
        stderr: String,
    },
}

/// What ferryd needs from `qemu-img info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Image format, e.g. `qcow2`, `raw`.
    pub format: String,
    /// Size the guest sees, in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host, when known.
    pub actual_size: Option<u64>,
    /// Backing file as recorded in the image (may be relative to it).
    pub backing_filename: Option<String>,
    /// Names of the persistent dirty bitmaps stored in a qcow2.
    pub dirty_bitmaps: Vec<String>,
    /// A qcow2's external data file (the raw image its metadata describes), if any.
    pub data_file: Option<String>,
}

#[derive(Deserialize)]
struct RawInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size")]
    actual_size: Option<u64>,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
}

#[derive(Deserialize)]
struct FormatSpecific {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: FormatData,
}

#[derive(Deserialize, Default)]
struct FormatData {
    #[serde(default)]
    bitmaps: Vec<RawBitmap>,
    #[serde(rename = "data-file")]
    data_file: Option<String>,
}

#[derive(Deserialize)]
struct RawBitmap {
    name: String,
}

/// Parses `qemu-img info --output=json` of a single image.
pub fn parse_info(json: &str) -> Result<ImageInfo, ImgError> {
    let raw: RawInfo =
        serde_json::from_str(json).map_err(|source| ImgError::ParseInfo { source })?;
    let (dirty_bitmaps, data_file) = match raw.format_specific {
        // Only qcow2 stores bitmaps; other formats' data has other shapes.
        Some(fs) if fs.kind == "qcow2" => (
            fs.data.bitmaps.into_iter().map(|b| b.name).collect(),
            fs.data.data_file,
        ),
        _ => (Vec::new(), None),
    };
    Ok(ImageInfo {
        format: raw.format,
        virtual_size: raw.virtual_size,
        actual_size: raw.actual_size,
        backing_filename: raw.backing_filename,
        dirty_bitmaps,
        data_file,
    })
}

/// Runs `qemu-img info` on an image. Uses `-U` (force share), so it works
/// on images a running VM holds; the data is then a snapshot that may be
/// slightly stale.
pub async fn info(qemu_img: &Path, path: &Path) -> Result<ImageInfo, ImgError> {
    info_with(qemu_img, path, None).await
}

/// Runs `qemu-img info -f FORMAT` on an image: the format is stated, never probed, because
/// a raw image whose guest wrote a qcow2 header would otherwise be read as a qcow2 (with
/// whatever backing file that header names).
pub async fn info_as(qemu_img: &Path, path: &Path, format: &str) -> Result<ImageInfo, ImgError> {
    info_with(qemu_img, path, Some(format)).await
}

async fn info_with(
    qemu_img: &Path,
    path: &Path,
    format: Option<&str>,
) -> Result<ImageInfo, ImgError> {
    require_input(path).await?;
    let mut args = vec![
        OsStr::new("info"),
        OsStr::new("--output=json"),
        OsStr::new("-U"),
    ];
    if let Some(f) = format {
        args.extend([OsStr::new("-f"), OsStr::new(f)]);
    }
    args.push(path.as_os_str());
    let out = run(qemu_img, &args, Some(("info", path))).await?;
    if !out.status.success() {
        return Err(ImgError::Info {
            path: path.into(),
            stderr: failure_text(&out),
        });
    }
    parse_info(&String::from_utf8_lossy(&out.stdout))
}

/// Copies an image of the stated `format` into a new qcow2 (no format probing).
pub async fn convert_to_qcow2_from(
    qemu_img: &Path,
    src: &Path,
    format: &str,
    dst: &Path,
) -> Result<(), ImgError> {
    convert(qemu_img, src, dst, &["-f", format, "-O", "qcow2"]).await
}

/// Creates `meta`, a qcow2 that holds no data itself but tracks the raw image or block
/// device `raw` as its external data file (`data_file_raw=on`: guest offset = raw offset,
/// so `raw` stays a valid raw image). The qcow2 layer carries what a raw file cannot:
/// persistent dirty bitmaps for replication.
///
/// `qemu-img create -o data_file=RAW` would truncate an existing RAW to zero first, so
/// the image is created over `scratch` (a new sparse file, removed afterwards) and then
/// pointed at `raw` with `qemu-img amend`, which leaves the raw data untouched.
pub async fn create_raw_tracker(
    qemu_img: &Path,
    meta: &Path,
    raw: &Path,
    scratch: &Path,
    size_bytes: u64,
) -> Result<(), ImgError> {
    require_absent(meta).await?;
    require_absent(scratch).await?;
    require_input(raw).await?;
    let mut create = OsStr::new("data_file=").to_os_string();
    create.push(scratch);
    create.push(",data_file_raw=on");
    let size = size_bytes.to_string();
    let args = [
        OsStr::new("create"),
        OsStr::new("-q"),
        OsStr::new("-f"),
        OsStr::new("qcow2"),
        OsStr::new("-o"),
        &create,
        meta.as_os_str(),
        OsStr::new(&size),
    ];
    let made = async {
        let out = run(qemu_img, &args, Some(("create", meta))).await?;
        if !out.status.success() {
            return Err(ImgError::Create {
                path: meta.into(),
                stderr: failure_text(&out),
            });
        }
        let mut amend = OsStr::new("data_file=").to_os_string();
        amend.push(raw);
        let args = [
            OsStr::new("amend"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            OsStr::new("-o"),
            &amend,
            meta.as_os_str(),
        ];
        let out = run(qemu_img, &args, Some(("create", meta))).await?;
        if !out.status.success() {
            return Err(ImgError::Create {
                path: meta.into(),
                stderr: failure_text(&out),
            });
        }
        Ok(())
    }
    .await;
    // amend opens the data file named in the image, so the scratch goes only now.
    let _ = tokio::fs::remove_file(scratch).await;
    if made.is_err() {
        let _ = tokio::fs::remove_file(meta).await;
    }
    made
}

/// Creates an empty qcow2 image of `size_bytes` with default options.
pub async fn create_qcow2(qemu_img: &Path, path: &Path, size_bytes: u64) -> Result<(), ImgError> {
    require_absent(path).await?;
    let size = size_bytes.to_string();
    let args = [
        OsStr::new("create"),
        OsStr::new("-q"),
        OsStr::new("-f"),
        OsStr::new("qcow2"),
        path.as_os_str(),
        OsStr::new(&size),
    ];
    let out = run(qemu_img, &args, Some(("create", path))).await?;
    if !out.status.success() {
        return Err(ImgError::Create {
            path: path.into(),
            stderr: failure_text(&out),
        });
    }
    Ok(())
}

/// Converts an image in any format qemu-img detects to a new qcow2.
pub async fn convert_to_qcow2(qemu_img: &Path, src: &Path, dst: &Path) -> Result<(), ImgError> {
    convert(qemu_img, src, dst, &["-O", "qcow2"]).await
}

/// Converts an image to a new raw file. Uses `-U`, so it also reads the
/// disk of a running VM (a crash-consistent copy at best; pause the VM for
/// an exact one).
pub async fn convert_to_raw(qemu_img: &Path, src: &Path, dst: &Path) -> Result<(), ImgError> {
    convert(qemu_img, src, dst, &["-U", "-O", "raw"]).await
}

async fn convert(qemu_img: &Path, src: &Path, dst: &Path, opts: &[&str]) -> Result<(), ImgError> {
    require_input(src).await?;
    require_absent(dst).await?;
    let mut args: Vec<&OsStr> = vec![OsStr::new("convert"), OsStr::new("-q")];
    args.extend(opts.iter().map(OsStr::new));
    args.push(src.as_os_str());
    args.push(dst.as_os_str());
    let out = run(qemu_img, &args, None).await?;
    if !out.status.success() {
        // The output did not exist before; a partial one is just garbage.
        let _ = tokio::fs::remove_file(dst).await;
        return Err(ImgError::Convert {
            src: src.into(),
            dst: dst.into(),
            stderr: failure_text(&out),
        });
    }
    Ok(())
}

async fn require_input(path: &Path) -> Result<(), ImgError> {
    match tokio::fs::metadata(path).await {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            Err(ImgError::ImageNotFound { path: path.into() })
        }
        // Other errors (permissions) are left for qemu-img to report.
        _ => Ok(()),
    }
}

async fn require_absent(path: &Path) -> Result<(), ImgError> {
    match tokio::fs::symlink_metadata(path).await {
        Ok(_) => Err(ImgError::OutputExists { path: path.into() }),
        Err(_) => Ok(()),
    }
}

/// qemu-img's stderr on one line, or the exit status if it printed nothing.
fn failure_text(out: &std::process::Output) -> String {
    let stderr = one_line(&out.stderr);
    if stderr.is_empty() {
        format!("qemu-img exited with {} and printed nothing", out.status)
    } else {
        stderr
    }
}

/// Runs qemu-img to completion, with [`QUICK_TIMEOUT`] when `timed` names
/// the action and image.
async fn run(
    qemu_img: &Path,
    args: &[&OsStr],
    timed: Option<(&'static str, &Path)>,
) -> Result<std::process::Output, ImgError> {
    let child = Command::new(qemu_img)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Cancelling the future (or a timeout) must not leave qemu-img
        // writing behind our back.
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| {
            if source.kind() == ErrorKind::NotFound {
                ImgError::BinaryNotFound {
                    binary: qemu_img.into(),
                    source,
                }
            } else {
                ImgError::RunQemuImg {
                    binary: qemu_img.into(),
                    source,
                }
            }
        })?;
    let wait = child.wait_with_output();
    let result = match timed {
        Some((action, path)) => tokio::time::timeout(QUICK_TIMEOUT, wait)
            .await
            .map_err(|_| ImgError::Timeout {
                action,
                path: path.into(),
                timeout: QUICK_TIMEOUT,
            })?,
        None => wait.await,
    };
    result.map_err(|source| ImgError::RunQemuImg {
        binary: qemu_img.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_qcow2() {
        let info = parse_info(include_str!("../tests/fixtures/info-qcow2.json")).unwrap();
        assert_eq!(
            info,
            ImageInfo {
                format: "qcow2".into(),
                virtual_size: 64 << 20,
                actual_size: Some(200704),
                backing_filename: None,
                dirty_bitmaps: vec![],
                data_file: None,
            }
        );
    }

    #[test]
    fn parses_qcow2_with_backing() {
        let info = parse_info(include_str!("../tests/fixtures/info-qcow2-backing.json")).unwrap();
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.backing_filename.as_deref(), Some("disk.qcow2"));
        assert!(info.dirty_bitmaps.is_empty());
    }

    #[test]
    fn parses_bitmaps_enabled_and_disabled() {
        let info = parse_info(include_str!("../tests/fixtures/info-qcow2-bitmaps.json")).unwrap();
        assert_eq!(info.dirty_bitmaps, ["cbt-1", "cbt-2"]);
    }

    #[test]
    fn parses_bitmap_in_use_by_running_vm() {
        // Captured with -U while QEMU held the image: the bitmap is flagged
        // in-use but is still listed.
        let info = parse_info(include_str!(
            "../tests/fixtures/info-qcow2-bitmap-in-use.json"
        ))
        .unwrap();
        assert_eq!(info.dirty_bitmaps, ["cbt-1"]);
    }

    #[test]
    fn parses_raw() {
        let info = parse_info(include_str!("../tests/fixtures/info-raw.json")).unwrap();
        assert_eq!(
            info,
            ImageInfo {
                format: "raw".into(),
                virtual_size: 1 << 20,
                actual_size: Some(4096),
                backing_filename: None,
                dirty_bitmaps: vec![],
                data_file: None,
            }
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            parse_info("qemu-img: oops"),
            Err(ImgError::ParseInfo { .. })
        ));
        assert!(matches!(parse_info("{}"), Err(ImgError::ParseInfo { .. })));
    }
}
