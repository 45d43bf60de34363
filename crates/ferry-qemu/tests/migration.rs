//! Live migration between two real QEMU 7.2 processes on this host, over
//! 127.0.0.1, with the disk on shared storage (both QEMUs open the same
//! qcow2) and the dirty bitmaps carried in the migration stream.
//!
//! The guest is the project's test guest (`ferry_testkit::test_guest`)
//! under TCG, writing checksummed 4 KiB blocks to its disk every 0.2 s; the
//! host-side model (`ferry_testkit::guest`) checks that the final image is
//! an exact prefix of the guest's writes.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_qemu::cbt;
use ferry_qemu::migration::{self, MigrateOptions, MigrationError, MigrationProgress};
use ferry_qemu::process::{self, Accel, QemuCommand};
use ferry_qemu::qmp::{self, DirtyBitmapInfo, MigrationStatus, Qmp};
use ferry_qemu::{img, BitmapState};
use ferry_testkit::guest::{self, GuestWorkload};

const QEMU: &str = "qemu-system-x86_64";
const QEMU_IMG: &str = "qemu-img";
const DISK_SIZE: u64 = 32 << 20;
/// The guest writes only the first SPAN 4 KiB blocks (16 MiB).
const SPAN: u64 = 4096;
const GRANULARITY: u64 = 4096;
const WORKLOAD: GuestWorkload = GuestWorkload {
    seed: 12345,
    start: 1,
    span_blocks: SPAN,
};
/// Loaded from the image at start (added offline), so the image has it
/// flagged in-use while the source runs.
const FROM_IMAGE: &str = "cbt-1";
/// Added at runtime, as the replication code starts a generation.
const RUNTIME: &str = "cbt-2";

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
    /// Starts QEMU in `dir` on `disk`, booting the test guest if `guest`,
    /// else sitting in SeaBIOS.
    async fn start(dir: &Path, disk: &Path, guest: bool, incoming: bool) -> Vm {
        std::fs::create_dir_all(dir).unwrap();
        let (kernel, initrd, append, memory_mib) = if guest {
            let (kernel, initrd) = ferry_testkit::test_guest();
            let append = WORKLOAD.kernel_args(0, 0.2);
            (Some(kernel), Some(initrd), Some(append), 256)
        } else {
            (None, None, None, 64)
        };
        let cmd = QemuCommand {
            binary: QEMU.into(),
            name: "mig".into(),
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
            incoming,
            hardware: Default::default(),
        };
        let pid = process::spawn_daemonized(&cmd).await.unwrap();
        let guard = PidGuard(pid);
        let qmp = Qmp::connect(&cmd.qmp_socket, Duration::from_secs(10))
            .await
            .unwrap();
        Vm { qmp, cmd, guard }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.cmd.console_log).unwrap_or_default())
            .into_owned()
    }

    fn last_write(&self) -> Option<u64> {
        guest::parse_console(&self.console()).last_wrote_seq
    }

    /// Waits until the console announces write `seq`.
    async fn wait_write(&self, seq: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.last_write().unwrap_or(0) < seq {
            assert!(
                Instant::now() < deadline,
                "guest did not reach write {seq}; console:\n{}",
                self.console()
            );
            assert!(process::pid_alive(self.guard.0), "QEMU exited");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn status(&self) -> String {
        self.qmp.execute(&qmp::QueryStatus).await.unwrap().status
    }

    async fn bitmap(&self, name: &str) -> Option<DirtyBitmapInfo> {
        let nodes = self
            .qmp
            .execute(&qmp::QueryNamedBlockNodes { flat: Some(true) })
            .await
            .unwrap();
        let drive0 = nodes.into_iter().find(|n| n.node_name == "drive0")?;
        drive0
            .dirty_bitmaps
            .into_iter()
            .find(|b| b.name.as_deref() == Some(name))
    }

    async fn quit(self) {
        let pid = self.guard.0;
        self.qmp.quit().await.unwrap();
        assert!(
            process::wait_exit(pid, Duration::from_secs(20)).await,
            "QEMU did not exit after quit"
        );
    }
}

fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fm")
        .tempdir_in("/tmp")
        .unwrap()
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// A local port nobody listens on.
fn dead_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Distinct blocks written by writes `1..=upto`.
fn blocks_written(upto: u64) -> BTreeSet<u64> {
    (1..=upto)
        .map(|seq| guest::block_for_seq(WORKLOAD.seed, seq, SPAN))
        .collect()
}

/// The guest runs on A and writes; its disk carries a persistent bitmap
/// loaded from the image and one added at runtime. Failing attempts first
/// (a target that does not listen; a peer that swallows the stream, slowly
/// and then at full speed, cancelled at the timeout) leave the guest
/// running on A and its bitmaps persistent (QEMU 7.2 silently drops their
/// persistence after a cancelled migration; `migrate` re-arms them). Then
/// A migrates to B (`-incoming defer`, same disk): the guest runs on B and
/// keeps writing, both bitmaps arrive persistent, recording and with at
/// least A's bits, A exits on quit, and after B's clean quit the image
/// holds both bitmaps (not in-use), an exact prefix of the guest's writes,
/// and each bitmap marks exactly the blocks those writes touched.
#[tokio::test]
async fn live_migration_carries_guest_and_bitmaps() {
    let dir = short_tempdir();
    let d = dir.path();
    let qemu_img: &Path = QEMU_IMG.as_ref();
    let disk = d.join("disk0.qcow2");
    img::create_qcow2(qemu_img, &disk, DISK_SIZE).await.unwrap();
    cbt::add_bitmap_offline(qemu_img, &disk, FROM_IMAGE, GRANULARITY)
        .await
        .unwrap();

    let a = Vm::start(&d.join("a"), &disk, true, false).await;
    // Before the guest has booted, so both bitmaps see every write.
    cbt::start_tracking(&a.qmp, &["drive0"], RUNTIME, GRANULARITY)
        .await
        .unwrap();
    a.wait_write(3).await;

    // A target nobody listens on: a clear error, quickly; the guest runs on.
    let t = Instant::now();
    let err = migration::migrate(
        &a.qmp,
        dead_port(),
        MigrateOptions {
            timeout: Duration::from_secs(20),
            ..Default::default()
        },
        |_| {},
    )
    .await
    .unwrap_err();
    let msg = chain(&err);
    eprintln!("migrate to a dead port ({:?}): {msg}", t.elapsed());
    assert!(!msg.contains('\n'), "{msg:?}");
    assert!(msg.contains("Connection refused"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(a.status().await, "running");

    // A "target" that swallows the stream without ever answering, first at
    // 1 MiB/s (too slow for the 2 s timeout), then at full speed (the
    // whole stream is sent, but without the target's confirmation over the
    // return path the source must not call it completed): both are
    // cancelled at the timeout, and the guest runs on.
    for (max_bandwidth, timeout) in [(1 << 20, 2), (1 << 30, 3)] {
        let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sink_addr = sink.local_addr().unwrap();
        let drain = tokio::spawn(async move {
            let (mut conn, _) = sink.accept().await.unwrap();
            let _ = tokio::io::copy(&mut conn, &mut tokio::io::sink()).await;
        });
        let t = Instant::now();
        let err = migration::migrate(
            &a.qmp,
            sink_addr,
            MigrateOptions {
                downtime_limit_ms: 300,
                max_bandwidth,
                timeout: Duration::from_secs(timeout),
            },
            |_| {},
        )
        .await
        .unwrap_err();
        eprintln!(
            "migrate into a sink at {max_bandwidth} B/s with a {timeout} s timeout ({:?}): {}",
            t.elapsed(),
            chain(&err)
        );
        assert!(matches!(err, MigrationError::Timeout { .. }), "{err:?}");
        assert!(
            t.elapsed() < Duration::from_secs(timeout + 8),
            "{:?}",
            t.elapsed()
        );
        let info = a.qmp.execute(&qmp::QueryMigrate).await.unwrap();
        assert_eq!(info.status, Some(MigrationStatus::Cancelled));
        assert_eq!(a.status().await, "running");
        drain.abort();
    }
    let before_failures = a.last_write().unwrap();
    a.wait_write(before_failures + 2).await;

    // The real target: same command line plus -incoming defer, same disk.
    let b = Vm::start(&d.join("b"), &disk, true, true).await;
    assert_eq!(b.status().await, "inmigrate");
    let listen = migration::prepare_incoming(&b.qmp, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    assert_ne!(listen.port(), 0);

    let on_a = [
        a.bitmap(FROM_IMAGE).await.unwrap(),
        a.bitmap(RUNTIME).await.unwrap(),
    ];
    for bitmap in &on_a {
        assert!(bitmap.persistent && bitmap.recording, "{bitmap:?}");
    }
    let last_on_a_before = a.last_write().unwrap();
    let mut polls = Vec::<MigrationProgress>::new();
    let outcome = migration::migrate(
        &a.qmp,
        listen,
        MigrateOptions {
            timeout: Duration::from_secs(60),
            ..Default::default()
        },
        |p| polls.push(p),
    )
    .await
    .unwrap();
    eprintln!(
        "live migration: total {} ms, downtime {:?} ms, setup {:?} ms, {} of {} RAM bytes sent, \
         {} dirty syncs, {} polls",
        outcome.total_ms,
        outcome.downtime_ms,
        outcome.setup_ms,
        outcome.ram_transferred,
        outcome.ram_total,
        outcome.dirty_sync_count,
        polls.len()
    );
    assert!(outcome.downtime_ms.is_some_and(|ms| ms > 0), "{outcome:?}");
    assert!(outcome.total_ms > 0);
    // The total includes the firmware and option ROM RAM blocks.
    assert!(outcome.ram_transferred > 0 && outcome.ram_total >= 256 << 20);
    assert_eq!(
        polls.last().map(|p| p.status),
        Some(MigrationStatus::Completed)
    );

    assert!(
        migration::wait_incoming_done(&b.qmp, Duration::from_secs(30))
            .await
            .unwrap()
    );
    assert_eq!(b.status().await, "running");
    assert_eq!(a.status().await, "postmigrate");
    let last_on_a = a.last_write().unwrap();
    assert!(last_on_a >= last_on_a_before);
    a.quit().await;

    // The guest keeps writing on B, continuing A's sequence.
    b.wait_write(last_on_a + 5).await;
    let console_b = guest::parse_console(&b.console());
    assert!(!console_b.ready, "the guest booted again on B");
    assert!(!b.console().contains("dd failed"), "{}", b.console());

    for before in &on_a {
        let name = before.name.as_deref().unwrap();
        let after = b
            .bitmap(name)
            .await
            .unwrap_or_else(|| panic!("bitmap {name} missing on B"));
        eprintln!(
            "{name}: {} dirty bytes on A before migration, {} on B after",
            before.count, after.count
        );
        assert!(after.persistent && after.recording, "{after:?}");
        assert!(!after.inconsistent && !after.busy, "{after:?}");
        assert_eq!(after.granularity, GRANULARITY);
        assert!(after.count >= before.count, "{before:?} -> {after:?}");
    }

    // Freeze the guest, read the final bitmaps, and close B cleanly.
    b.qmp.execute(&qmp::Stop).await.unwrap();
    let mut counts = Vec::new();
    for name in [FROM_IMAGE, RUNTIME] {
        counts.push(b.bitmap(name).await.unwrap().count);
    }
    let last_on_b = b.last_write().unwrap();
    b.quit().await;

    let bitmaps = cbt::offline_bitmaps(qemu_img, &disk).await.unwrap();
    let mut names: Vec<&str> = bitmaps.iter().map(|b| b.name.as_str()).collect();
    // Re-arming re-creates them, so their order may change.
    names.sort();
    assert_eq!(names, [FROM_IMAGE, RUNTIME], "{bitmaps:?}");
    for bitmap in &bitmaps {
        assert!(bitmap.auto() && !bitmap.in_use(), "{bitmap:?}");
    }

    let raw = ferry_testkit::replication::read_image(&disk);
    let verified = guest::verify_prefix(&raw, WORKLOAD.seed, SPAN)
        .unwrap_or_else(|e| panic!("image after migration: {e}"));
    eprintln!(
        "writes 1..={} on disk: {last_on_a} announced on A, {last_on_b} on B",
        verified.last_seq
    );
    assert!(verified.last_seq >= last_on_b);
    // Both bitmaps tracked from before the first write: each marks exactly
    // the blocks of writes 1..=M, on A and B together.
    let expected = blocks_written(verified.last_seq).len() as u64 * GRANULARITY;
    assert_eq!(counts, [expected, expected]);

    // The image opens again with both generations intact.
    let c = Vm::start(&d.join("c"), &disk, false, false).await;
    for name in [FROM_IMAGE, RUNTIME] {
        assert_eq!(
            cbt::bitmap_state(&c.qmp, "drive0", name).await.unwrap(),
            BitmapState::Ok {
                recording: true,
                count: expected,
                granularity: GRANULARITY
            }
        );
    }
    c.quit().await;
}

/// Wrong calls fail at once with a clear message: preparing a QEMU that was
/// not started with `-incoming`, waiting on it as a target, and migrating to
/// a port nobody listens on.
#[tokio::test]
async fn wrong_calls_fail_clearly() {
    let dir = short_tempdir();
    let d = dir.path();
    let disk = d.join("disk0.qcow2");
    img::create_qcow2(QEMU_IMG.as_ref(), &disk, DISK_SIZE)
        .await
        .unwrap();
    let vm = Vm::start(&d.join("a"), &disk, false, false).await;

    let err = migration::prepare_incoming(&vm.qmp, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(&err, MigrationError::NotIncoming { status } if status == "running"),
        "{err:?}"
    );
    let err = migration::wait_incoming_done(&vm.qmp, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, MigrationError::NotIncoming { .. }), "{err:?}");

    let t = Instant::now();
    let target = dead_port();
    let err = migration::migrate(&vm.qmp, target, MigrateOptions::default(), |_| {})
        .await
        .unwrap_err();
    let msg = chain(&err);
    eprintln!("{msg}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(msg.contains(&target.to_string()), "{msg}");
    assert!(msg.contains("Connection refused"), "{msg}");
    assert_eq!(vm.status().await, "running");
    vm.quit().await;
}

/// An incoming QEMU whose source never connects times out clearly.
#[tokio::test]
async fn incoming_without_source_times_out() {
    let dir = short_tempdir();
    let d = dir.path();
    let disk: PathBuf = d.join("disk0.qcow2");
    img::create_qcow2(QEMU_IMG.as_ref(), &disk, DISK_SIZE)
        .await
        .unwrap();
    let vm = Vm::start(&d.join("b"), &disk, false, true).await;
    migration::prepare_incoming(&vm.qmp, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let err = migration::wait_incoming_done(&vm.qmp, Duration::from_millis(500))
        .await
        .unwrap_err();
    eprintln!("{err}");
    assert!(
        matches!(err, MigrationError::IncomingTimeout { .. }),
        "{err:?}"
    );
    vm.quit().await;
}
