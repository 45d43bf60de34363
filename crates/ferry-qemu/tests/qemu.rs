//! Integration tests against the installed QEMU 7.2 and qemu-img.
//!
//! Every VM runs under TCG: nested KVM on the test machines hangs. The VMs
//! have no kernel and just sit in SeaBIOS, which is enough for QMP and the
//! block layer. Each VM is killed by a Drop guard, so a failing assertion
//! never leaks a QEMU.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_qemu::img::{self, ImgError};
use ferry_qemu::process::{self, Accel, ProcessError, QemuCommand};
use ferry_qemu::qmp::{self, Qmp, QmpError};
use tokio::sync::broadcast;

const QEMU: &str = "qemu-system-x86_64";
const QEMU_IMG: &str = "qemu-img";
const DISK_SIZE: u64 = 64 << 20;

/// SIGKILLs the VM on drop unless it is already gone.
struct VmGuard(u32);

impl Drop for VmGuard {
    fn drop(&mut self) {
        if process::pid_alive(self.0) {
            let _ = process::signal(self.0, libc::SIGKILL);
        }
    }
}

/// A short directory under /tmp: unix socket paths must stay under 108
/// bytes, and $TMPDIR may be long.
fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fq")
        .tempdir_in("/tmp")
        .unwrap()
}

fn command(dir: &Path, name: &str, disks: Vec<PathBuf>) -> QemuCommand {
    QemuCommand {
        binary: QEMU.into(),
        name: name.into(),
        accel: Accel::Tcg,
        cpus: 1,
        memory_mib: 64,
        kernel: None,
        initrd: None,
        append: None,
        disks,
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
    }
}

/// Waits for the next event named `name`, skipping others.
async fn expect_event(events: &mut broadcast::Receiver<qmp::Event>, name: &str) -> qmp::Event {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = events.recv().await.unwrap();
            if event.event == name {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {name} event"))
}

async fn start_vm(dir: &Path, name: &str) -> (VmGuard, QemuCommand) {
    let disk = dir.join("disk0.qcow2");
    img::create_qcow2(QEMU_IMG.as_ref(), &disk, DISK_SIZE)
        .await
        .unwrap();
    let cmd = command(dir, name, vec![disk]);
    let pid = process::spawn_daemonized(&cmd).await.unwrap();
    (VmGuard(pid), cmd)
}

#[tokio::test]
async fn vm_lifecycle_over_qmp() {
    let dir = short_tempdir();
    let (vm, cmd) = start_vm(dir.path(), "lifecycle").await;
    let pid = vm.0;
    assert!(process::pid_alive(pid));
    assert!(process::pid_cmdline_contains(
        pid,
        cmd.qmp_socket.to_str().unwrap()
    ));
    assert!(process::pid_cmdline_contains(pid, "guest=lifecycle"));
    assert!(!process::pid_cmdline_contains(pid, "guest=someone-else"));
    assert!(
        cmd.console_log.exists(),
        "console log is created at startup"
    );

    // A second start must not unlink the running VM's sockets.
    let err = process::spawn_daemonized(&cmd).await.unwrap_err();
    assert!(
        matches!(err, ProcessError::AlreadyRunning { pid: p } if p == pid),
        "{err:?}"
    );
    assert!(cmd.qmp_socket.exists());

    let qmp = Qmp::connect(&cmd.qmp_socket, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((qmp.version().major, qmp.version().minor), (7, 2));
    let mut events = qmp.events();

    let status = qmp.execute(&qmp::QueryStatus).await.unwrap();
    assert!(status.running);
    assert_eq!(status.status, "running");

    qmp.execute(&qmp::Stop).await.unwrap();
    expect_event(&mut events, "STOP").await;
    let status = qmp.execute(&qmp::QueryStatus).await.unwrap();
    assert!(!status.running);
    assert_eq!(status.status, "paused");

    qmp.execute(&qmp::Cont).await.unwrap();
    expect_event(&mut events, "RESUME").await;
    assert!(qmp.execute(&qmp::QueryStatus).await.unwrap().running);

    // A persistent bitmap on drive0 shows up typed, and after a clean quit
    // it is stored in the qcow2.
    qmp.execute_raw(
        "block-dirty-bitmap-add",
        Some(serde_json::json!({"node": "drive0", "name": "cbt-1", "persistent": true})),
    )
    .await
    .unwrap();
    let nodes = qmp
        .execute(&qmp::QueryNamedBlockNodes { flat: Some(true) })
        .await
        .unwrap();
    let drive0 = nodes
        .iter()
        .find(|n| n.node_name == "drive0")
        .expect("drive0 listed");
    assert_eq!(drive0.drv, "qcow2");
    assert_eq!(drive0.file, cmd.disks[0].to_str().unwrap());
    let bitmap = &drive0.dirty_bitmaps[0];
    assert_eq!(bitmap.name.as_deref(), Some("cbt-1"));
    assert!(bitmap.recording && bitmap.persistent && !bitmap.inconsistent);
    assert_eq!(bitmap.granularity, 65536);
    let file0 = nodes
        .iter()
        .find(|n| n.node_name == "file0")
        .expect("file0 listed");
    assert_eq!(file0.drv, "file");

    // Untyped escape hatch, and QEMU's error desc as the message.
    let stats = qmp.execute_raw("query-blockstats", None).await.unwrap();
    assert!(stats.is_array());
    let err = qmp.execute_raw("no-such-command", None).await.unwrap_err();
    assert!(
        matches!(&err, QmpError::Command { class, .. } if class == "CommandNotFound"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "The command no-such-command has not been found"
    );

    // qemu-img reads the disk while the VM holds it (-U).
    let info = img::info(QEMU_IMG.as_ref(), &cmd.disks[0]).await.unwrap();
    assert_eq!(
        (info.format.as_str(), info.virtual_size),
        ("qcow2", DISK_SIZE)
    );
    let raw = dir.path().join("copy.raw");
    img::convert_to_raw(QEMU_IMG.as_ref(), &cmd.disks[0], &raw)
        .await
        .unwrap();
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), DISK_SIZE);

    // Re-attach: after the first client goes away the monitor accepts a
    // new one, as after a ferryd restart.
    drop(events);
    drop(qmp);
    let qmp = Qmp::connect(&cmd.qmp_socket, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(qmp.execute(&qmp::QueryStatus).await.unwrap().running);

    let mut events = qmp.events();
    qmp.quit().await.unwrap();
    let shutdown = expect_event(&mut events, "SHUTDOWN").await;
    assert_eq!(shutdown.data["reason"], "host-qmp-quit");
    tokio::time::timeout(Duration::from_secs(10), qmp.closed())
        .await
        .expect("closed() resolves");
    assert!(qmp.is_closed());
    assert!(process::wait_exit(pid, Duration::from_secs(10)).await);
    assert!(!process::pid_alive(pid));
    assert!(matches!(
        qmp.execute(&qmp::QueryStatus).await,
        Err(QmpError::Closed)
    ));

    let info = img::info(QEMU_IMG.as_ref(), &cmd.disks[0]).await.unwrap();
    assert_eq!(info.dirty_bitmaps, ["cbt-1"]);
}

#[tokio::test]
async fn sigterm_stops_vm_and_closes_qmp() {
    let dir = short_tempdir();
    let (vm, cmd) = start_vm(dir.path(), "sigterm").await;
    let qmp = Qmp::connect(&cmd.qmp_socket, Duration::from_secs(10))
        .await
        .unwrap();
    process::signal(vm.0, libc::SIGTERM).unwrap();
    tokio::time::timeout(Duration::from_secs(10), qmp.closed())
        .await
        .expect("closed() resolves");
    assert!(process::wait_exit(vm.0, Duration::from_secs(10)).await);
    // QEMU removes its pidfile and sockets on a clean exit.
    assert!(!cmd.pidfile.exists());
    assert!(!cmd.qmp_socket.exists());
}

#[tokio::test]
async fn spawn_with_missing_disk_reports_qemu_error_on_one_line() {
    let dir = short_tempdir();
    let missing = dir.path().join("missing.qcow2");
    let cmd = command(dir.path(), "nodisk", vec![missing.clone()]);
    let err = process::spawn_daemonized(&cmd).await.unwrap_err();
    assert!(matches!(err, ProcessError::StartQemu { .. }), "{err:?}");
    let msg = err.to_string();
    println!("{msg}");
    assert!(!msg.contains('\n'), "{msg:?}");
    assert!(msg.contains(missing.to_str().unwrap()), "{msg}");
    assert!(msg.contains("No such file or directory"), "{msg}");
    // The failed QEMU removed its pidfile on the way out: nothing to leak.
    assert!(!cmd.pidfile.exists());
}

#[tokio::test]
async fn spawn_with_missing_binary_names_it() {
    let dir = short_tempdir();
    let mut cmd = command(dir.path(), "nobinary", vec![]);
    cmd.binary = "/nonexistent/qemu-system-x86_64".into();
    let err = process::spawn_daemonized(&cmd).await.unwrap_err();
    assert!(
        matches!(err, ProcessError::BinaryNotFound { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent/qemu-system-x86_64"), "{msg}");
    assert!(msg.contains("apt-get install qemu-system-x86"), "{msg}");
}

#[tokio::test]
async fn spawn_validates_first() {
    let dir = short_tempdir();
    let cmd = command(dir.path(), "bad", vec![dir.path().join("a,b.qcow2")]);
    let err = process::spawn_daemonized(&cmd).await.unwrap_err();
    assert!(
        matches!(err, ProcessError::PathContainsComma { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn boot_probes() {
    assert!(process::probe_tcg_boots(QEMU.as_ref(), Duration::from_secs(20)).await);
    let kvm = process::probe_kvm(QEMU.as_ref(), Duration::from_secs(5)).await;
    println!("probe_kvm on this machine: {kvm}");
    assert!(!process::probe_tcg_boots("/nonexistent/qemu".as_ref(), Duration::from_secs(1)).await);
}

#[tokio::test]
async fn img_convert_and_errors() {
    let dir = short_tempdir();
    let d = dir.path();
    let qemu_img: &Path = QEMU_IMG.as_ref();

    let missing = d.join("missing.qcow2");
    let err = img::info(qemu_img, &missing).await.unwrap_err();
    assert!(matches!(err, ImgError::ImageNotFound { .. }), "{err:?}");
    assert!(err.to_string().contains(missing.to_str().unwrap()));

    // Any source format qemu-img detects: here raw.
    let raw = d.join("src.raw");
    std::fs::write(&raw, vec![0xab; 1 << 20]).unwrap();
    let qcow2 = d.join("dst.qcow2");
    img::convert_to_qcow2(qemu_img, &raw, &qcow2).await.unwrap();
    let info = img::info(qemu_img, &qcow2).await.unwrap();
    assert_eq!(
        (info.format.as_str(), info.virtual_size),
        ("qcow2", 1 << 20)
    );
    let back = d.join("back.raw");
    img::convert_to_raw(qemu_img, &qcow2, &back).await.unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&raw).unwrap());

    let err = img::create_qcow2(qemu_img, &qcow2, 1 << 20)
        .await
        .unwrap_err();
    assert!(matches!(err, ImgError::OutputExists { .. }), "{err:?}");
    let err = img::convert_to_raw(qemu_img, &qcow2, &back)
        .await
        .unwrap_err();
    assert!(matches!(err, ImgError::OutputExists { .. }), "{err:?}");

    // qemu-img's own error, condensed to one line.
    let err = img::info(qemu_img, d).await.unwrap_err();
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, ImgError::Info { .. }), "{err:?}");
    assert!(!msg.contains('\n'), "{msg:?}");

    let err = img::create_qcow2(qemu_img, &d.join("nodir/x.qcow2"), 1 << 20)
        .await
        .unwrap_err();
    println!("{err}");
    assert!(matches!(err, ImgError::Create { .. }), "{err:?}");

    let err = img::info("/nonexistent/qemu-img".as_ref(), &qcow2)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("apt-get install qemu-utils"),
        "{err}"
    );
}
