//! Changed-block tracking against real QEMU 7.2, qemu-nbd and nbdinfo.
//!
//! The guest is the project's test guest (`guest/out`, built by
//! `guest/build.sh guest/out`) under TCG: it writes checksummed 4 KiB blocks
//! "CBT seq=N blk=B …" to /dev/vda at LCG-chosen positions. Because every
//! write carries its sequence number, a copy of a fleecing export tells
//! exactly which writes it contains, and the host can recompute the LCG to
//! check that the copy is a consistent point (writes 1..N, nothing else).
//!
//! Every QEMU is killed by a pid guard and every qemu-nbd by
//! `OfflineExport`'s drop. The tests take a shared lock so only one TCG
//! guest runs at a time on the small test machines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_qemu::cbt::{
    self, BitmapState, CbtError, FleecePoint, NodeSpec, OfflineExport, FLEECE_PREFIX,
};
use ferry_qemu::img;
use ferry_qemu::process::{self, Accel, QemuCommand};
use ferry_qemu::qmp::{self, Qmp};

const QEMU: &str = "qemu-system-x86_64";
const QEMU_IMG: &str = "qemu-img";
const QEMU_NBD: &str = "qemu-nbd";
const DISK_SIZE: u64 = 32 << 20;
const BLOCK: u64 = 4096;
/// The guest writes only the first SPAN blocks (16 MiB).
const SPAN: u64 = 4096;
const SEED: u64 = 12345;
const GRANULARITY: u64 = 4096;

/// One TCG guest at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// SIGKILLs a process on drop unless it is already gone.
struct PidGuard(u32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if process::pid_alive(self.0) {
            let _ = process::signal(self.0, libc::SIGKILL);
        }
    }
}

struct Vm {
    // Field order: the QMP connection closes before the kill.
    qmp: Qmp,
    cmd: QemuCommand,
    guard: PidGuard,
}

impl Vm {
    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.cmd.console_log).unwrap_or_default())
            .into_owned()
    }

    /// (seq, blk) of every `GUEST: WROTE` line so far.
    fn writes(&self) -> Vec<(u64, u64)> {
        self.console()
            .lines()
            .filter_map(|l| {
                let rest = l.trim().strip_prefix("GUEST: WROTE seq=")?;
                let (seq, blk) = rest.split_once(" blk=")?;
                Some((seq.parse().ok()?, blk.trim().parse().ok()?))
            })
            .collect()
    }

    async fn wait_writes(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.writes().len() < n {
            assert!(
                Instant::now() < deadline,
                "guest did not reach {n} writes; console:\n{}",
                self.console()
            );
            assert!(process::pid_alive(self.guard.0), "QEMU exited");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn status(&self) -> String {
        self.qmp.execute(&qmp::QueryStatus).await.unwrap().status
    }

    async fn quit(self) {
        let pid = self.guard.0;
        self.qmp.quit().await.unwrap();
        assert!(process::wait_exit(pid, Duration::from_secs(20)).await);
    }

    async fn kill(self) {
        let pid = self.guard.0;
        process::signal(pid, libc::SIGKILL).unwrap();
        assert!(process::wait_exit(pid, Duration::from_secs(20)).await);
    }
}

fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fc")
        .tempdir_in("/tmp")
        .unwrap()
}

fn guest_out() -> PathBuf {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out");
    assert!(
        out.join("vmlinuz").exists() && out.join("initramfs.gz").exists(),
        "test guest missing: run `flock guest/.build.lock guest/build.sh guest/out` in the workspace"
    );
    out
}

/// Starts QEMU on `disk`. With `interval`, the test guest boots and writes
/// a block every `interval` seconds; without, QEMU sits in SeaBIOS (enough
/// for QMP and the block layer).
async fn start_vm(dir: &Path, disk: &Path, interval: Option<&str>) -> Vm {
    let (kernel, initrd, append, memory_mib) = match interval {
        Some(interval) => {
            let out = guest_out();
            (
                Some(out.join("vmlinuz")),
                Some(out.join("initramfs.gz")),
                Some(format!(
                    "console=ttyS0 quiet panic=-1 guest.interval={interval} guest.span={SPAN} guest.seed={SEED}"
                )),
                256,
            )
        }
        None => (None, None, None, 64),
    };
    let cmd = QemuCommand {
        binary: QEMU.into(),
        name: "cbt".into(),
        accel: Accel::Tcg,
        cpus: 1,
        memory_mib,
        kernel,
        initrd,
        append,
        disks: vec![disk.into()],
        nics: vec![],
        qmp_socket: dir.join("qmp.sock"),
        console_socket: dir.join("console.sock"),
        console_log: dir.join("console.log"),
        pidfile: dir.join("qemu.pid"),
        vnc_socket: None,
        agent_socket: None,
        loadvm: None,
        incoming: false,
        hardware: Default::default(),
    };
    let pid = process::spawn_daemonized(&cmd).await.unwrap();
    let guard = PidGuard(pid);
    let qmp = Qmp::connect(&cmd.qmp_socket, Duration::from_secs(10))
        .await
        .unwrap();
    Vm { qmp, cmd, guard }
}

async fn new_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("disk0.qcow2");
    img::create_qcow2(QEMU_IMG.as_ref(), &disk, DISK_SIZE)
        .await
        .unwrap();
    disk
}

fn drive0() -> Vec<NodeSpec> {
    vec![NodeSpec {
        node: "drive0".into(),
        size: DISK_SIZE,
    }]
}

// --- the guest's write model -------------------------------------------------

/// The block the guest writes for each seq 1..=upto.
fn lcg_blocks(upto: u64) -> Vec<u64> {
    let mut x = SEED;
    (1..=upto)
        .map(|_| {
            x = (x * 1103515245 + 12345) % (1 << 31);
            x % SPAN
        })
        .collect()
}

/// Distinct blocks written by writes `from+1..=to`.
fn blocks_written(from: u64, to: u64) -> BTreeSet<u64> {
    lcg_blocks(to)
        .into_iter()
        .skip(from as usize)
        .collect::<BTreeSet<_>>()
}

/// blk -> seq of every guest block in a raw image; panics on torn or
/// misplaced blocks.
fn guest_blocks(raw: &[u8]) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for (i, chunk) in raw.chunks(BLOCK as usize).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        let line = &chunk[..64];
        assert!(
            chunk.chunks(64).all(|l| l == line),
            "block {i} is torn or not a guest block"
        );
        let text = std::str::from_utf8(line).unwrap();
        assert!(text.starts_with("CBT seq="), "block {i}: {text:?}");
        let seq: u64 = text[8..16].parse().unwrap();
        let blk: u64 = text[21..29].parse().unwrap();
        assert_eq!(blk, i as u64, "block {i} holds a write for block {blk}");
        out.insert(blk, seq);
    }
    out
}

/// Checks that `raw` holds exactly the writes 1..=N for its largest seq N
/// (a consistent point: no write missing, none from after it) and
/// returns N.
fn check_consistent(raw: &[u8]) -> u64 {
    let blocks = guest_blocks(raw);
    let max = blocks.values().copied().max().unwrap_or(0);
    let mut expected = BTreeMap::new();
    for (i, blk) in lcg_blocks(max).into_iter().enumerate() {
        expected.insert(blk, i as u64 + 1);
    }
    assert_eq!(blocks, expected, "copy is not the prefix 1..={max}");
    max
}

fn changed_blocks(a: &[u8], b: &[u8]) -> BTreeSet<u64> {
    a.chunks(BLOCK as usize)
        .zip(b.chunks(BLOCK as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

// --- NBD clients -------------------------------------------------------------

/// The 4 KiB blocks `nbdinfo --map=CONTEXT --json` reports dirty (type bit
/// 0 of a `qemu:dirty-bitmap:` context).
async fn dirty_blocks(uri: &str, context: &str) -> BTreeSet<u64> {
    let out = tokio::process::Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg("--json")
        .arg(uri)
        .output()
        .await
        .expect("nbdinfo runs (apt-get install libnbd-bin)");
    assert!(
        out.status.success(),
        "nbdinfo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let extents: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut blocks = BTreeSet::new();
    for e in extents {
        if e["type"].as_u64().unwrap() & 1 == 1 {
            let offset = e["offset"].as_u64().unwrap();
            let length = e["length"].as_u64().unwrap();
            assert_eq!((offset % BLOCK, length % BLOCK), (0, 0));
            blocks.extend(offset / BLOCK..(offset + length) / BLOCK);
        }
    }
    blocks
}

/// Copies a whole NBD export into a raw file with qemu-img and returns it.
async fn copy_export(uri: &str, dst: &Path) -> Vec<u8> {
    let out = tokio::process::Command::new(QEMU_IMG)
        .args(["convert", "-q", "-f", "raw", "-O", "raw", uri])
        .arg(dst)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img convert failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = std::fs::read(dst).unwrap();
    assert_eq!(raw.len() as u64, DISK_SIZE);
    raw
}

fn fleece_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(FLEECE_PREFIX))
        .collect()
}

/// Asserts QEMU has no exports, jobs or fleecing nodes left.
async fn assert_no_leftovers(qmp: &Qmp, dir: &Path) {
    assert!(qmp
        .execute(&qmp::QueryBlockExports)
        .await
        .unwrap()
        .is_empty());
    assert!(qmp.execute(&qmp::QueryBlockJobs).await.unwrap().is_empty());
    let nodes = qmp
        .execute(&qmp::QueryNamedBlockNodes { flat: Some(true) })
        .await
        .unwrap();
    assert!(
        !nodes.iter().any(|n| n.node_name.starts_with(FLEECE_PREFIX)),
        "{nodes:?}"
    );
    assert!(fleece_files(dir).is_empty(), "{:?}", fleece_files(dir));
}

async fn state(qmp: &Qmp, name: &str) -> BitmapState {
    cbt::bitmap_state(qmp, "drive0", name).await.unwrap()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// --- tests -------------------------------------------------------------------

/// (a) + (b) + (e): a full copy, then incremental cycles while the guest
/// keeps writing. Each exported dirty set equals exactly the blocks the
/// guest wrote between the two points, each copy of a fleecing export is a
/// consistent point, and a failed cycle folds its generation into the next.
#[tokio::test]
async fn cycles_export_exact_dirty_sets_and_consistent_points() {
    let _serial = SERIAL.lock().await;
    let dir = short_tempdir();
    let d = dir.path();
    let disk = new_disk(d).await;
    let vm = start_vm(d, &disk, Some("0.2")).await;
    let qmp = &vm.qmp;
    vm.wait_writes(3).await;

    // Cycle 0: full copy; generation cbt-1 starts at the same instant.
    let t = Instant::now();
    let announced = vm.writes().last().unwrap().0;
    let p0 = FleecePoint::create(qmp, d, &drive0(), None, "cbt-1", GRANULARITY, 0)
        .await
        .unwrap();
    assert_eq!(p0.meta_context(), "base:allocation");
    assert_eq!(p0.old_generation(), None);
    let uri0 = p0.disks()[0].nbd_uri(p0.nbd_socket());
    let raw0 = copy_export(&uri0, &d.join("copy0.raw")).await;
    let m0 = check_consistent(&raw0);
    assert!(
        m0 >= announced,
        "point 0 holds {m0} < {announced} announced writes"
    );
    assert!(matches!(
        state(qmp, "cbt-1").await,
        BitmapState::Ok {
            recording: true,
            granularity: GRANULARITY,
            ..
        }
    ));
    let r0 = p0.release(qmp, true).await.unwrap();
    println!(
        "cycle 0 (full): seq {m0}, transaction + create + copy + release {:.1} ms, release {:.1} ms",
        ms(t.elapsed()),
        ms(r0.duration)
    );
    assert!(matches!(state(qmp, "cbt-1").await, BitmapState::Ok { .. }));
    assert_no_leftovers(qmp, d).await;

    // Cycle 1: incremental, success.
    vm.wait_writes(vm.writes().len() + 6).await;
    let t = Instant::now();
    let p1 = FleecePoint::create(qmp, d, &drive0(), Some("cbt-1"), "cbt-2", GRANULARITY, 1)
        .await
        .unwrap();
    let created = t.elapsed();
    let transaction1 = p1.transaction_time();
    assert_eq!(p1.meta_context(), "qemu:dirty-bitmap:cbt-1");
    let cbt1 = state(qmp, "cbt-1").await;
    assert!(
        matches!(
            cbt1,
            BitmapState::Ok {
                recording: false,
                ..
            }
        ),
        "{cbt1:?}"
    );
    assert!(matches!(
        state(qmp, "cbt-2").await,
        BitmapState::Ok {
            recording: true,
            ..
        }
    ));
    let uri1 = p1.disks()[0].nbd_uri(p1.nbd_socket());
    let d1 = dirty_blocks(&uri1, &p1.meta_context()).await;
    let raw1 = copy_export(&uri1, &d.join("copy1.raw")).await;
    let m1 = check_consistent(&raw1);
    assert!(m1 > m0);
    assert!(!d1.is_empty());
    assert_eq!(
        d1,
        blocks_written(m0, m1),
        "dirty set != writes {}..={m1}",
        m0 + 1
    );
    assert_eq!(d1, changed_blocks(&raw0, &raw1));
    let BitmapState::Ok { count, .. } = cbt1 else {
        unreachable!()
    };
    assert_eq!(count, d1.len() as u64 * BLOCK);
    let r1 = p1.release(qmp, true).await.unwrap();
    let cycle1 = t.elapsed();
    assert_eq!(state(qmp, "cbt-1").await, BitmapState::Missing);
    assert!(matches!(
        state(qmp, "cbt-2").await,
        BitmapState::Ok {
            recording: true,
            granularity: GRANULARITY,
            ..
        }
    ));
    assert_no_leftovers(qmp, d).await;
    println!(
        "cycle 1: writes {}..={m1}, {} dirty blocks, transaction {:.2} ms, create {:.1} ms, \
         release {:.1} ms, cycle incl. full 32 MiB copy {:.1} ms, CBW {} bytes",
        m0 + 1,
        d1.len(),
        ms(transaction1),
        ms(created),
        ms(r1.duration),
        ms(cycle1),
        r1.cbw_bytes
    );

    // Cycle 2: the copy fails; the frozen generation is folded into the
    // new one.
    vm.wait_writes(vm.writes().len() + 6).await;
    let p2 = FleecePoint::create(qmp, d, &drive0(), Some("cbt-2"), "cbt-3", GRANULARITY, 2)
        .await
        .unwrap();
    let transaction2 = p2.transaction_time();
    let uri2 = p2.disks()[0].nbd_uri(p2.nbd_socket());
    let d2 = dirty_blocks(&uri2, &p2.meta_context()).await;
    let raw2 = copy_export(&uri2, &d.join("copy2.raw")).await;
    let m2 = check_consistent(&raw2);
    assert_eq!(d2, blocks_written(m1, m2));
    p2.release(qmp, false).await.unwrap();
    assert_eq!(state(qmp, "cbt-2").await, BitmapState::Missing);
    let BitmapState::Ok {
        recording: true,
        count,
        ..
    } = state(qmp, "cbt-3").await
    else {
        panic!("cbt-3 not recording");
    };
    assert!(count >= d2.len() as u64 * BLOCK);
    assert_no_leftovers(qmp, d).await;

    // Cycle 3 ships the union: everything since the last good point.
    vm.wait_writes(vm.writes().len() + 4).await;
    let p3 = FleecePoint::create(qmp, d, &drive0(), Some("cbt-3"), "cbt-4", GRANULARITY, 3)
        .await
        .unwrap();
    let uri3 = p3.disks()[0].nbd_uri(p3.nbd_socket());
    let d3 = dirty_blocks(&uri3, &p3.meta_context()).await;
    let raw3 = copy_export(&uri3, &d.join("copy3.raw")).await;
    let m3 = check_consistent(&raw3);
    assert!(d3.is_superset(&d2), "failed cycle's blocks lost");
    assert_eq!(d3, blocks_written(m1, m3));
    assert_eq!(d3, changed_blocks(&raw1, &raw3));
    p3.release(qmp, true).await.unwrap();
    assert_eq!(state(qmp, "cbt-3").await, BitmapState::Missing);
    assert!(matches!(
        state(qmp, "cbt-4").await,
        BitmapState::Ok {
            recording: true,
            ..
        }
    ));
    assert_no_leftovers(qmp, d).await;
    println!(
        "cycle 2 (failed): {} dirty blocks, transaction {:.2} ms; cycle 3: {} dirty blocks ⊇ cycle 2",
        d2.len(),
        ms(transaction2),
        d3.len()
    );

    assert!(!vm.console().contains("dd failed"));
    vm.quit().await;
}

/// (c): the merged generation survives a clean quit, shows up in
/// `qemu-img info`, and qemu-nbd --bitmap offline reports the same dirty
/// extents as QEMU's own export did online; offline rotation leaves a
/// generation that records from the next start.
#[tokio::test]
async fn generation_survives_quit_and_exports_offline() {
    let _serial = SERIAL.lock().await;
    let dir = short_tempdir();
    let d = dir.path();
    let disk = new_disk(d).await;
    let vm = start_vm(d, &disk, Some("0.2")).await;
    let qmp = &vm.qmp;
    // Before the guest has booted, so cbt-1 sees every write.
    cbt::start_tracking(qmp, &["drive0"], "cbt-1", GRANULARITY)
        .await
        .unwrap();
    let err = cbt::start_tracking(qmp, &["drive0"], "cbt-1", GRANULARITY)
        .await
        .unwrap_err();
    println!(
        "second start_tracking: {err}: {:?}",
        std::error::Error::source(&err)
    );
    vm.wait_writes(6).await;

    // Online: freeze the guest so nothing changes until the quit.
    qmp.execute(&qmp::Stop).await.unwrap();
    let p = FleecePoint::create(qmp, d, &drive0(), Some("cbt-1"), "cbt-2", GRANULARITY, 1)
        .await
        .unwrap();
    let online = dirty_blocks(&p.disks()[0].nbd_uri(p.nbd_socket()), &p.meta_context()).await;
    assert!(!online.is_empty());
    // Rolled back: cbt-2 now holds everything cbt-1 had.
    p.release(qmp, false).await.unwrap();
    assert_eq!(state(qmp, "cbt-1").await, BitmapState::Missing);
    assert_eq!(
        state(qmp, "cbt-2").await,
        BitmapState::Ok {
            recording: true,
            count: online.len() as u64 * BLOCK,
            granularity: GRANULARITY
        }
    );
    vm.quit().await;

    let info = img::info(QEMU_IMG.as_ref(), &disk).await.unwrap();
    assert_eq!(info.dirty_bitmaps, ["cbt-2"]);
    let bitmaps = cbt::offline_bitmaps(QEMU_IMG.as_ref(), &disk)
        .await
        .unwrap();
    assert_eq!(bitmaps.len(), 1);
    assert!(bitmaps[0].auto() && !bitmaps[0].in_use(), "{bitmaps:?}");
    assert_eq!(bitmaps[0].granularity, GRANULARITY);

    // Offline: the same extents through qemu-nbd --bitmap.
    let export = OfflineExport::start(
        QEMU_NBD.as_ref(),
        &disk,
        Some("cbt-2"),
        &d.join("offline.sock"),
    )
    .await
    .unwrap();
    let qemu_nbd = PidGuard(export.pid().unwrap());
    assert_eq!(export.meta_context(), "qemu:dirty-bitmap:cbt-2");
    let offline = dirty_blocks(&export.nbd_uri(), &export.meta_context()).await;
    assert_eq!(offline, online);
    let raw = copy_export(&export.nbd_uri(), &d.join("offline.raw")).await;
    let last = check_consistent(&raw);
    // The tracking started before the first write: the dirty set is every
    // block the guest ever wrote.
    assert_eq!(offline, blocks_written(0, last));
    let pid = qemu_nbd.0;
    export.close().await.unwrap();
    assert!(process::wait_exit(pid, Duration::from_secs(5)).await);
    assert!(!d.join("offline.sock").exists());

    // Rotate offline; a second call is a no-op.
    for _ in 0..2 {
        cbt::rotate_bitmap_offline(QEMU_IMG.as_ref(), &disk, "cbt-2", "cbt-3", GRANULARITY)
            .await
            .unwrap();
    }
    let bitmaps = cbt::offline_bitmaps(QEMU_IMG.as_ref(), &disk)
        .await
        .unwrap();
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    assert_eq!(bitmaps[0].name, "cbt-3");
    assert!(bitmaps[0].auto(), "{bitmaps:?}");

    // Without --enable, QEMU 7.2 loads it recording at the next start.
    let vm = start_vm(d, &disk, None).await;
    assert_eq!(
        state(&vm.qmp, "cbt-3").await,
        BitmapState::Ok {
            recording: true,
            count: 0,
            granularity: GRANULARITY
        }
    );
    vm.quit().await;
}

/// (d) and crash cleanup: a daemon crash leaves a fleecing point behind,
/// which cleanup_stale removes; after SIGKILL of QEMU a generation loaded
/// from the image is inconsistent (offline and online) and a runtime one is
/// missing; both removal paths work and a fresh generation can start.
#[tokio::test]
async fn crash_leaves_generation_inconsistent_and_cleanup_recovers() {
    let _serial = SERIAL.lock().await;
    let dir = short_tempdir();
    let d = dir.path();
    let disk = new_disk(d).await;
    let qemu_img: &Path = QEMU_IMG.as_ref();
    for name in ["cbt-1", "cbt-x"] {
        cbt::add_bitmap_offline(qemu_img, &disk, name, GRANULARITY)
            .await
            .unwrap();
    }

    let vm = start_vm(d, &disk, None).await;
    let qmp = &vm.qmp;
    assert!(matches!(
        state(qmp, "cbt-1").await,
        BitmapState::Ok {
            recording: true,
            ..
        }
    ));

    // The daemon "crashes" during a fleecing window.
    let abandoned = FleecePoint::create(qmp, d, &drive0(), None, "cbt-rt", GRANULARITY, 7)
        .await
        .unwrap();
    drop(abandoned);
    assert_eq!(fleece_files(d), ["ferry-fleece-7-0.qcow2"]);
    let cleaned = cbt::cleanup_stale(qmp, d).await.unwrap();
    assert_eq!(cleaned.exports, ["ferry-fleece-7-0-export"]);
    assert_eq!(cleaned.jobs, ["ferry-fleece-7-0-job"]);
    assert_eq!(cleaned.nodes, ["ferry-fleece-7-0"]);
    assert_eq!(cleaned.files, [d.join("ferry-fleece-7-0.qcow2")]);
    assert!(!cleaned.resumed_vm);
    assert!(cbt::cleanup_stale(qmp, d).await.unwrap().is_empty());
    assert_no_leftovers(qmp, d).await;
    // A new point works after the cleanup, with the same NBD server.
    let p = FleecePoint::create(qmp, d, &drive0(), Some("cbt-rt"), "cbt-rt2", GRANULARITY, 8)
        .await
        .unwrap();
    p.release(qmp, true).await.unwrap();
    assert!(matches!(
        state(qmp, "cbt-rt2").await,
        BitmapState::Ok { .. }
    ));

    vm.kill().await;

    let bitmaps = cbt::offline_bitmaps(qemu_img, &disk).await.unwrap();
    let names: Vec<&str> = bitmaps.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        names,
        ["cbt-1", "cbt-x"],
        "runtime generations never reach the image"
    );
    assert!(bitmaps.iter().all(|b| b.in_use()), "{bitmaps:?}");
    let info = img::info(qemu_img, &disk).await.unwrap();
    assert_eq!(info.dirty_bitmaps, ["cbt-1", "cbt-x"]);

    let err = OfflineExport::start(QEMU_NBD.as_ref(), &disk, Some("cbt-1"), &d.join("off.sock"))
        .await
        .unwrap_err();
    println!("offline export of the crashed generation: {err}");
    assert!(
        matches!(err, CbtError::GenerationInconsistent { .. }),
        "{err:?}"
    );
    assert!(cbt::remove_bitmap_offline(qemu_img, &disk, "cbt-x")
        .await
        .unwrap());
    assert!(!cbt::remove_bitmap_offline(qemu_img, &disk, "cbt-x")
        .await
        .unwrap());

    let vm = start_vm(d, &disk, None).await;
    let qmp = &vm.qmp;
    assert_eq!(state(qmp, "cbt-1").await, BitmapState::Inconsistent);
    assert_eq!(state(qmp, "cbt-rt2").await, BitmapState::Missing);
    assert_eq!(state(qmp, "cbt-x").await, BitmapState::Missing);
    let err = FleecePoint::create(qmp, d, &drive0(), Some("cbt-1"), "cbt-2", GRANULARITY, 9)
        .await
        .unwrap_err();
    println!("fleecing from the crashed generation: {err}");
    assert!(
        matches!(err, CbtError::GenerationInconsistent { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("full copy"));
    let err = FleecePoint::create(qmp, d, &drive0(), Some("nope"), "cbt-2", GRANULARITY, 9)
        .await
        .unwrap_err();
    assert!(matches!(err, CbtError::GenerationMissing { .. }), "{err:?}");
    assert_no_leftovers(qmp, d).await;
    assert_eq!(
        cbt::remove_generation(qmp, &["drive0"], "cbt-1")
            .await
            .unwrap(),
        ["drive0"]
    );
    assert_eq!(state(qmp, "cbt-1").await, BitmapState::Missing);
    cbt::start_tracking(qmp, &["drive0"], "cbt-2", GRANULARITY)
        .await
        .unwrap();
    vm.quit().await;
    let bitmaps = cbt::offline_bitmaps(qemu_img, &disk).await.unwrap();
    assert_eq!(bitmaps.len(), 1);
    assert_eq!(bitmaps[0].name, "cbt-2");
    assert!(!bitmaps[0].in_use());
}

/// Unmounts a tmpfs on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A fleecing overlay on a 1 MiB tmpfs fills up: copy-before-write fails,
/// QEMU pauses the guest (BLOCK_IO_ERROR, io-error), the point reports it,
/// and a failed release cancels everything, folds the generation back and
/// resumes the guest without a failed write.
#[tokio::test]
async fn full_overlay_pauses_guest_and_release_resumes_it() {
    let _serial = SERIAL.lock().await;
    let dir = short_tempdir();
    let d = dir.path();
    let run_dir = d.join("run");
    std::fs::create_dir(&run_dir).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1M", "tmpfs"])
        .arg(&run_dir)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "this test mounts a 1 MiB tmpfs to fill the overlay and needs root (CAP_SYS_ADMIN)"
    );
    let _mount = Mount(run_dir.clone());

    let disk = new_disk(d).await;
    // Data under every block the guest may overwrite: copy-before-write then
    // has real old data to save (zeros would cost the overlay almost nothing).
    let status = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("write -P 0x5a 0 {}", SPAN * 4096),
        ])
        .arg(&disk)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "qemu-io could not fill the disk");
    let vm = start_vm(d, &disk, Some("0.05")).await;
    let qmp = &vm.qmp;
    cbt::start_tracking(qmp, &["drive0"], "cbt-1", GRANULARITY)
        .await
        .unwrap();
    vm.wait_writes(3).await;

    let p = FleecePoint::create(
        qmp,
        &run_dir,
        &drive0(),
        Some("cbt-1"),
        "cbt-2",
        GRANULARITY,
        1,
    )
    .await
    .unwrap();
    let io_error = tokio::time::timeout(Duration::from_secs(90), p.io_error_occurred())
        .await
        .expect("the overlay never filled up");
    println!("I/O error in the window: {io_error:?}");
    assert!(io_error.nospace, "{io_error:?}");
    assert_eq!(io_error.action, "stop");
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm.status().await != "io-error" {
        assert!(Instant::now() < deadline, "guest not paused by the error");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = vm.writes().len();

    let report = p.release(qmp, false).await.unwrap();
    println!("release after overlay full: {report:?}");
    assert!(report.resumed_vm);
    assert_eq!(report.io_error.as_ref(), Some(&io_error));
    assert_eq!(vm.status().await, "running");
    assert_eq!(state(qmp, "cbt-1").await, BitmapState::Missing);
    assert!(matches!(
        state(qmp, "cbt-2").await,
        BitmapState::Ok {
            recording: true,
            ..
        }
    ));
    assert_no_leftovers(qmp, &run_dir).await;

    vm.wait_writes(before + 3).await;
    assert!(!vm.console().contains("dd failed"), "{}", vm.console());
    vm.quit().await;
}
