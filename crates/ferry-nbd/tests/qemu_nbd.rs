//! The client against the real `qemu-nbd`, cross-checked with `nbdinfo`
//! (libnbd) and with `qemu-img convert -O raw` of the image itself.
//!
//! These tests need `qemu-img`, `qemu-io`, `qemu-nbd` and `nbdinfo`; a
//! missing tool fails the test loudly instead of skipping it. Every
//! `qemu-nbd` started here is killed when its guard drops, also on failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_nbd::{
    dirty_bitmap_context, Extent, NbdClient, NbdError, WriteOptions, ZeroOptions, BASE_ALLOCATION,
    STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
const EXPORT: &str = "exp";

/// Runs a tool and panics with its output unless it succeeds.
fn run(program: &str, args: &[&str]) -> Vec<u8> {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

fn qemu_io(image: &Path, command: &str) {
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", command, image.to_str().unwrap()],
    );
}

fn create_qcow2(image: &Path, size: u64, backing: Option<&Path>) {
    let size = size.to_string();
    let image = image.to_str().unwrap();
    match backing {
        None => run("qemu-img", &["create", "-q", "-f", "qcow2", image, &size]),
        Some(base) => run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                base.to_str().unwrap(),
                "-F",
                "qcow2",
                image,
                &size,
            ],
        ),
    };
}

/// The guest-visible bytes of an image, as QEMU itself reads them.
fn raw_contents(image: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("contents.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::read(raw).unwrap()
}

/// A `qemu-nbd` serving one image on a Unix socket; killed on drop.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl QemuNbd {
    fn start(dir: &Path, image: &Path, extra: &[&str]) -> Self {
        let socket = dir.join("nbd.sock");
        let log = std::fs::File::create(dir.join("qemu-nbd.log")).unwrap();
        let mut child = Command::new("qemu-nbd")
            .args([
                "--persistent",
                "--shared=4",
                "--format=qcow2",
                "--export-name",
                EXPORT,
            ])
            .arg(format!("--socket={}", socket.display()))
            .args(extra)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qemu-nbd (is it installed?): {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(dir.join("qemu-nbd.log")).unwrap_or_default();
                panic!("qemu-nbd exited early ({status}): {log}");
            }
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "qemu-nbd did not listen in time");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, socket }
    }

    async fn connect(&self, contexts: &[&str]) -> NbdClient {
        NbdClient::connect_unix(&self.socket, EXPORT, contexts)
            .await
            .expect("connect to qemu-nbd")
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///{EXPORT}?socket={}", self.socket.display())
    }

    /// Extents of `context` as libnbd's `nbdinfo --map` reports them,
    /// merged the same way the client merges.
    fn nbdinfo_map(&self, context: &str) -> Vec<Extent> {
        let out = run(
            "nbdinfo",
            &[&format!("--map={context}"), "--json", &self.uri()],
        );
        let json: serde_json::Value = serde_json::from_slice(&out).expect("nbdinfo JSON");
        let mut extents: Vec<Extent> = Vec::new();
        for entry in json.as_array().expect("array") {
            let offset = entry["offset"].as_u64().unwrap();
            let length = entry["length"].as_u64().unwrap();
            let flags = entry["type"].as_u64().unwrap() as u32;
            match extents.last_mut() {
                Some(last) if last.end() == offset && last.flags == flags => last.length += length,
                _ => extents.push(Extent::new(offset, length, flags)),
            }
        }
        extents
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `extents` restricted to `[start, end)`.
fn clip(extents: &[Extent], start: u64, end: u64) -> Vec<Extent> {
    extents
        .iter()
        .filter(|e| e.end() > start && e.offset < end)
        .map(|e| {
            let offset = e.offset.max(start);
            Extent::new(offset, e.end().min(end) - offset, e.flags)
        })
        .collect()
}

fn dirty_ranges(extents: &[Extent]) -> Vec<(u64, u64)> {
    extents
        .iter()
        .filter(|e| e.has(STATE_DIRTY))
        .map(|e| (e.offset, e.length))
        .collect()
}

/// A 64 MiB image with 1 MiB of data, then bitmap `b1`, then more writes
/// that the (enabled, persistent) bitmap records.
fn fleecing_image(dir: &Path) -> PathBuf {
    let image = dir.join("disk.qcow2");
    create_qcow2(&image, 64 * MIB, None);
    qemu_io(&image, "write -P 0xab 0 1M");
    run(
        "qemu-img",
        &[
            "bitmap",
            "--add",
            "-g",
            "4096",
            image.to_str().unwrap(),
            "b1",
        ],
    );
    qemu_io(&image, "write -P 0xcd 2M 64k");
    qemu_io(&image, "write -P 0xef 10M 4k");
    qemu_io(&image, "write -P 0x11 34603520 1000"); // 33 MiB + 512, unaligned
    qemu_io(&image, "write -z 0 64k");
    qemu_io(&image, "write -P 0x77 67104768 4k"); // last 4 KiB
    image
}

#[tokio::test]
async fn fleecing_export_matches_nbdinfo_and_the_image() {
    let dir = TempDir::new().unwrap();
    let image = fleecing_image(dir.path());
    let expected = raw_contents(&image, dir.path());
    let server = QemuNbd::start(dir.path(), &image, &["--read-only", "--bitmap=b1"]);
    let dirty_ctx = dirty_bitmap_context("b1");
    let mut nbd = server.connect(&[BASE_ALLOCATION, &dirty_ctx]).await;

    assert_eq!(nbd.size(), 64 * MIB);
    assert!(nbd.read_only());
    assert!(nbd.structured_replies());
    assert_eq!(nbd.meta_contexts().len(), 2);

    // Dirty bitmap: exactly the writes made after the bitmap was added, at
    // 4 KiB granularity, and exactly what libnbd sees.
    let dirty = nbd.map(&dirty_ctx).await.unwrap();
    assert_eq!(dirty, server.nbdinfo_map(&dirty_ctx));
    assert_eq!(
        dirty_ranges(&dirty),
        vec![
            (0, 64 << 10),
            (2 * MIB, 64 << 10),
            (10 * MIB, 4096),
            (33 * MIB, 4096),
            (64 * MIB - 4096, 4096),
        ]
    );
    let dirty_bytes: u64 = dirty
        .iter()
        .filter(|e| e.has(STATE_DIRTY))
        .map(|e| e.length)
        .sum();
    assert_eq!(dirty_bytes, 2 * (64 << 10) + 3 * 4096);
    assert_eq!(dirty.last().unwrap().end(), 64 * MIB);

    // Allocation: identical to libnbd's view; the zeroed start reads as zero.
    let allocation = nbd.map(BASE_ALLOCATION).await.unwrap();
    assert_eq!(allocation, server.nbdinfo_map(BASE_ALLOCATION));
    assert!(allocation[0].has(STATE_ZERO) && allocation[0].offset == 0);
    assert!(allocation
        .iter()
        .any(|e| e.has(STATE_HOLE | STATE_ZERO) && e.offset <= 20 * MIB && e.end() > 20 * MIB));

    // A sub-range query returns exactly that range.
    let (start, end) = (MIB + 4096, 12 * MIB);
    let part = nbd
        .block_status(&dirty_ctx, start, end - start)
        .await
        .unwrap();
    assert_eq!(part, clip(&dirty, start, end));
    assert_eq!(part.first().unwrap().offset, start);
    assert_eq!(part.last().unwrap().end(), end);

    // Reading the dirty extents (pipelined) yields the image's bytes.
    let dirty_extents: Vec<Extent> = dirty
        .iter()
        .copied()
        .filter(|e| e.has(STATE_DIRTY))
        .collect();
    let mut buffers: Vec<Vec<u8>> = dirty_extents
        .iter()
        .map(|e| vec![0x55; e.length as usize])
        .collect();
    nbd.read_many(
        dirty_extents
            .iter()
            .zip(buffers.iter_mut())
            .map(|(e, b)| (e.offset, b.as_mut_slice())),
    )
    .await
    .unwrap();
    for (e, buf) in dirty_extents.iter().zip(&buffers) {
        assert!(
            buf[..] == expected[e.offset as usize..e.end() as usize],
            "dirty extent {e:?} differs"
        );
    }

    // The whole export, in max-payload pieces, equals the image.
    let mut all = vec![0x55; nbd.size() as usize];
    nbd.read(0, &mut all).await.unwrap();
    assert!(all == expected, "full read differs from qemu-img convert");
    assert_eq!(&all[2 * MIB as usize..][..4], &[0xcd; 4]);

    // Writes are refused locally on a read-only export.
    assert!(matches!(
        nbd.write(0, &[0; 512]).await,
        Err(NbdError::Unsupported(_))
    ));
    nbd.disconnect().await.unwrap();
}

/// Deterministic non-repeating test data.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn writable_overlay_receives_writes_zeroes_and_flush() {
    let dir = TempDir::new().unwrap();
    let base = dir.path().join("base.qcow2");
    create_qcow2(&base, 64 * MIB, None);
    qemu_io(&base, "write -P 0x5a 0 8M");
    let overlay = dir.path().join("overlay.qcow2");
    create_qcow2(&overlay, 64 * MIB, Some(&base));

    let mut expected = vec![0u8; 64 * MIB as usize];
    expected[..8 * MIB as usize].fill(0x5a);

    let server = QemuNbd::start(dir.path(), &overlay, &[]);
    let mut nbd = server.connect(&[BASE_ALLOCATION]).await;
    assert!(!nbd.read_only());
    assert!(nbd.can_flush() && nbd.can_write_zeroes() && nbd.can_fua());

    // 40 MiB in one call: more than the maximum payload, so it is split.
    assert!(nbd.max_payload() <= 32 * MIB as u32);
    let big = pattern(40 * MIB as usize, 1);
    nbd.write(4 * MIB, &big).await.unwrap();
    expected[4 * MIB as usize..44 * MIB as usize].copy_from_slice(&big);

    // Zeroes over freshly written data and over backing-file data.
    nbd.write_zeroes(6 * MIB, MIB).await.unwrap();
    expected[6 * MIB as usize..7 * MIB as usize].fill(0);
    nbd.write_zeroes(0, MIB).await.unwrap();
    expected[..MIB as usize].fill(0);

    let small = pattern(4096, 2);
    nbd.write_with(50 * MIB, &small, WriteOptions { fua: true })
        .await
        .unwrap();
    expected[50 * MIB as usize..][..4096].copy_from_slice(&small);
    nbd.write_zeroes_with(
        52 * MIB,
        64 << 10,
        ZeroOptions {
            fua: true,
            no_hole: true,
        },
    )
    .await
    .unwrap();
    nbd.flush().await.unwrap();

    // The zeroed backing range now reads as zero according to the server.
    let status = nbd.block_status(BASE_ALLOCATION, 0, MIB).await.unwrap();
    assert!(status.iter().all(|e| e.has(STATE_ZERO)), "{status:?}");
    assert_eq!(status.iter().map(|e| e.length).sum::<u64>(), MIB);

    // Reading back through NBD.
    let mut back = vec![0; 12 * MIB as usize];
    nbd.read(0, &mut back).await.unwrap();
    assert!(
        back[..] == expected[..12 * MIB as usize],
        "read-back differs"
    );
    nbd.disconnect().await.unwrap();

    // Kill the server without a graceful shutdown: what was flushed must be
    // in the image, and the image must be consistent.
    drop(server);
    run("qemu-img", &["check", "-q", overlay.to_str().unwrap()]);
    let actual = raw_contents(&overlay, dir.path());
    assert_eq!(actual.len(), expected.len());
    let first_diff = actual.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "image differs from expected contents");
}

#[tokio::test]
async fn qemu_refuses_unknown_export_and_missing_bitmap() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("disk.qcow2");
    create_qcow2(&image, 4 * MIB, None);
    let server = QemuNbd::start(dir.path(), &image, &["--read-only"]);

    let err = NbdClient::connect_unix(&server.socket, "nope", &[])
        .await
        .unwrap_err();
    match err {
        NbdError::OptionRefused { option, reply, .. } => {
            assert_eq!(option, "NBD_OPT_GO");
            assert_eq!(reply.name(), "NBD_REP_ERR_UNKNOWN");
        }
        other => panic!("expected OptionRefused, got {other:?}"),
    }

    let missing = dirty_bitmap_context("nothere");
    let err = NbdClient::connect_unix(&server.socket, EXPORT, &[&missing])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NbdError::ContextNotAvailable(name) if *name == missing),
        "{err:?}"
    );

    // The server is still fine for a well-behaved client afterwards, and an
    // empty image is one hole.
    let mut nbd = server.connect(&[BASE_ALLOCATION]).await;
    assert_eq!(
        nbd.map(BASE_ALLOCATION).await.unwrap(),
        vec![Extent::new(0, 4 * MIB, STATE_HOLE | STATE_ZERO)]
    );
    assert!(matches!(
        nbd.block_status(&missing, 0, 4096).await,
        Err(NbdError::InvalidRequest(_))
    ));
    nbd.disconnect().await.unwrap();
}
