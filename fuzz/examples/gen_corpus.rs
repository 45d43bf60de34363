//! Writes the seed corpora under fuzz/corpus/<target>/ from Ferry's real encoders (frame
//! writer, batch encoder, spool writer, the replication messages), real qcow2 images made
//! by qemu-img and written by qemu-io, and a real qemu-nbd session recorded byte for byte.
//! Run from fuzz/: `cargo run --example gen_corpus` (needs qemu-img, qemu-io, qemu-nbd;
//! scripts/install-deps.sh installs them). Deterministic except for qemu's own bytes.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use ferry_api_types::*;
use ferry_fuzz::replication::proto::{BootFileMeta, DiskMeta, ExportManifest, Msg, Resume};
use ferry_nbd::{NbdClient, BASE_ALLOCATION};
use ferry_wire::{Extent, ExtentBatch, FrameWriter, SpoolWriter};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

fn corpus(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(name), bytes).unwrap();
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn spec_json(kernel: bool) -> serde_json::Value {
    let boot = if kernel {
        serde_json::json!({"kind": "kernel", "kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img", "append": "console=ttyS0"})
    } else {
        serde_json::json!({"kind": "disk"})
    };
    serde_json::json!({
        "name": "web-1", "cpus": 2, "memory_mib": 1024,
        "disks": [{"file": "disk0.qcow2", "size_bytes": 1073741824u64}, {"file": "data.qcow2", "size_bytes": 4194304}],
        "boot": boot,
        "nics": [{"kind": {"kind": "bridge", "bridge": "br0"}, "mac": "52:54:00:12:34:56"}, {"kind": {"kind": "user"}, "mac": "52:54:00:12:34:57"}]
    })
}

fn settings_json() -> serde_json::Value {
    serde_json::json!({
        "interval": {"secs": 300, "nanos": 0},
        "retention": {"additional": 4, "spacing_secs": 3600},
        "compression": true, "excluded_disks": [1],
        "initial": {"method": "network"}, "bandwidth_limit": 10485760,
        "granularity": 65536, "app_consistent_every": 3600, "relationship_id": 7
    })
}

fn messages() -> Vec<Msg> {
    let hello = |kernel: bool| {
        let v = serde_json::json!({
            "type": "hello", "protocol": 1, "primary": "host-a",
            "spec": spec_json(kernel),
            "disks": [{"index": 0, "size_bytes": 1073741824u64}],
            "settings": settings_json(), "last_cycle": 12, "reverse": false,
            "boot_files": if kernel { serde_json::json!([
                {"role": "kernel", "size": 9000000, "hash": blake3::hash(b"kernel").to_hex().to_string()},
                {"role": "initrd", "size": 30000000, "hash": blake3::hash(b"initrd").to_hex().to_string()}]) } else { serde_json::json!([]) }
        });
        serde_json::from_value::<Msg>(v).expect("seed Hello parses")
    };
    let _ = (
        DiskMeta {
            index: 0,
            size_bytes: 1,
        },
        BootFileMeta {
            role: String::new(),
            size: 0,
            hash: String::new(),
        },
    );
    vec![
        hello(false),
        hello(true),
        Msg::Welcome {
            replica: "host-b".into(),
            last_cycle: 11,
            resume: Some(Resume {
                cycle: 12,
                next_batch: 40,
                capture: 0x1234_5678,
            }),
            extra: vec![(0, 4096, 65536)],
            need_boot_files: vec!["kernel".into()],
        },
        Msg::BootFile {
            role: "kernel".into(),
            offset: 0,
            data: ferry_fuzz::replication::proto::to_hex(b"\x7fELF\x02\x01\x01"),
        },
        Msg::BootFileStored {
            role: "initrd".into(),
        },
        Msg::Refused {
            reason: "host-a is not authorized".into(),
        },
        Msg::HashRequest,
        Msg::Hashes {
            disk: 0,
            hashes: "00112233445566778899aabbccddeeff".into(),
        },
        Msg::PlannedFailover {
            cycle: 12,
            start: true,
            reverse_to: Some(("host-a".into(), "10.0.0.1:7444".into())),
        },
        Msg::FailedOver {
            message: "started".into(),
        },
        Msg::CycleBegin {
            cycle: 13,
            kind: "delta".into(),
            taken_at: 1_760_000_000,
            from_batch: 0,
            batches: 3,
            bytes: 1 << 20,
            app_consistent: true,
            capture: 99,
            streamed: false,
        },
        Msg::CycleEnd {
            cycle: 13,
            batches: None,
            bytes: None,
        },
        Msg::CycleBegin {
            cycle: 14,
            kind: "delta".into(),
            taken_at: 1_760_000_030,
            from_batch: 0,
            batches: 0,
            bytes: 0,
            app_consistent: false,
            capture: 101,
            streamed: true,
        },
        Msg::CycleEnd {
            cycle: 14,
            batches: Some(3),
            bytes: Some(1 << 20),
        },
        Msg::Committed {
            cycle: 13,
            point: 5,
        },
        Msg::Failed {
            reason: "disk full".into(),
        },
    ]
}

fn batches() -> Vec<ExtentBatch> {
    vec![
        ExtentBatch {
            seq: 0,
            extents: vec![
                Extent::data(0, 0, vec![0xabu8; 4096]),
                Extent::zeroes(0, 65536, 1 << 20),
            ],
        },
        ExtentBatch {
            seq: 1,
            extents: vec![
                Extent::data(0, 8192, (0..200u8).collect::<Vec<_>>()),
                Extent::data(1, 0, b"hello".to_vec()),
                Extent::zeroes(1, 4096, 4096),
            ],
        },
        ExtentBatch {
            seq: 7,
            extents: vec![Extent::zeroes(3, u64::MAX - 4096, 4096)],
        },
        ExtentBatch {
            seq: 2,
            extents: vec![],
        },
    ]
}

async fn frames_stream(compress: bool) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new());
    for m in messages().iter().take(3) {
        w.write_control(m).await.unwrap();
    }
    for b in batches() {
        w.write_batch(&b, compress).await.unwrap();
    }
    w.write_keepalive(42).await.unwrap();
    w.write_control(&Msg::CycleEnd { cycle: 13 }).await.unwrap();
    w.into_inner()
}

async fn spool_file(dir: &Path, name: &str, compress: bool) -> Vec<u8> {
    let path = dir.join(name);
    let mut s = SpoolWriter::create(&path).await.unwrap();
    s.append_control(&messages()[10]).await.unwrap();
    for b in batches() {
        s.append_batch(&b, compress).await.unwrap();
    }
    s.finish().await.unwrap();
    std::fs::read(&path).unwrap()
}

/// A stream that keeps a copy of every byte read through it (what the server sent).
struct Recorder {
    inner: tokio::net::UnixStream,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Recorder {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.seen
                .lock()
                .unwrap()
                .extend_from_slice(&buf.filled()[before..]);
        }
        r
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Records what a real qemu-nbd sends for the same calls the nbd_client target makes.
async fn record_nbd(dir: &Path, image: &Path, read_only: bool) -> Vec<u8> {
    let sock = dir.join(format!("nbd-{read_only}.sock"));
    let mut cmd = Command::new("qemu-nbd");
    cmd.arg(format!("--socket={}", sock.display()))
        .args(["-f", "qcow2", "-x", "drive0"]);
    if read_only {
        cmd.arg("-r");
    }
    let mut child = cmd.arg(image).spawn().expect("qemu-nbd");
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let stream = Recorder {
        inner: tokio::net::UnixStream::connect(&sock).await.unwrap(),
        seen: seen.clone(),
    };
    let mut nbd = NbdClient::connect(stream, "drive0", &[BASE_ALLOCATION])
        .await
        .unwrap();
    // The same sequence as fuzz_targets/nbd_client.rs.
    let size = nbd.size();
    nbd.map(BASE_ALLOCATION).await.unwrap();
    let len = size.min(8192) as usize;
    let mut buf = vec![0u8; len];
    nbd.read(0, &mut buf).await.unwrap();
    if !nbd.read_only() {
        nbd.write(0, &buf).await.unwrap();
        nbd.write_zeroes(0, len as u64).await.unwrap();
        nbd.trim(0, len as u64).await.unwrap();
    }
    nbd.flush().await.unwrap();
    nbd.disconnect().await.unwrap();
    let _ = child.wait();
    let out = seen.lock().unwrap().clone();
    out
}

fn qcow2_images(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, opts) in [
        ("v3", "cluster_size=512"),
        ("v2", "cluster_size=512,compat=0.10"),
        ("v3-4k", "cluster_size=4096"),
    ] {
        let img = dir.join(format!("{name}.qcow2"));
        let p = img.to_str().unwrap();
        run(&[
            "qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, "256K",
        ]);
        run(&[
            "qemu-io",
            "-c",
            "write -P 1 0 8k",
            "-c",
            "write -P 1 100k 4k",
            p,
        ]);
        run(&["qemu-img", "snapshot", "-c", "cp", p]);
        run(&[
            "qemu-io",
            "-c",
            "write -P 2 4k 4k",
            "-c",
            "write -z 100k 4k",
            "-c",
            "write -P 3 200k 1k",
            p,
        ]);
        out.push((name.to_string(), std::fs::read(&img).unwrap()));
    }
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let tmp = tempfile_dir();

    // Wire frames: first byte = read size (0: all at once) and the greeting-limit bit.
    for (i, ctl) in [0u8, 7, 0x80 | 24].into_iter().enumerate() {
        let mut s = vec![ctl];
        s.extend(frames_stream(i != 1).await);
        put("frame_reader", &format!("stream-{i}"), &s);
    }
    for (i, b) in batches().iter().enumerate() {
        put("batch_decode", &format!("batch-{i}"), &b.encode().unwrap());
    }
    for (i, (start, compress)) in [(0u16, true), (2, false), (5, true)]
        .into_iter()
        .enumerate()
    {
        let mut s = start.to_le_bytes().to_vec();
        s.extend(spool_file(&tmp, &format!("s{i}.spool"), compress).await);
        put("spool_reader", &format!("spool-{i}"), &s);
    }
    for (i, m) in messages().iter().enumerate() {
        put(
            "replication_msg",
            &format!("msg-{i:02}"),
            &serde_json::to_vec(m).unwrap(),
        );
    }
    // An export: the manifest as ferryd writes it (pretty JSON), then the data file (a
    // spool of an initial cycle).
    let data = spool_file(&tmp, "initial.ferry", true).await;
    let manifest = ExportManifest {
        format: 1,
        vm: "web-1".into(),
        primary: "host-a".into(),
        primary_fingerprint: "ab".repeat(32),
        cycle: 1,
        kind: "initial".into(),
        taken_at: 1_760_000_000,
        frames: 5,
        data_bytes: 8493,
        file_bytes: data.len() as u64,
    };
    let m = serde_json::to_vec_pretty(&manifest).unwrap();
    let mut s = (m.len() as u16).to_le_bytes().to_vec();
    s.extend(&m);
    s.extend(&data);
    put("export_import", "export-0", &s);

    for (name, bytes) in qcow2_images(&tmp) {
        let mut s = vec![12u8]; // unit 4 KiB
        s.extend(&bytes);
        put("qcow2_metadata", &name, &s);
    }

    let img = tmp.join("nbd.qcow2");
    run(&[
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        "1M",
    ]);
    run(&[
        "qemu-io",
        "-c",
        "write -P 1 0 64k",
        "-c",
        "write -P 2 512k 4k",
        img.to_str().unwrap(),
    ]);
    for (i, (ro, chunk)) in [(false, 0u8), (true, 0), (false, 5)]
        .into_iter()
        .enumerate()
    {
        let mut s = vec![chunk];
        s.extend(record_nbd(&tmp, &img, ro).await);
        put("nbd_client", &format!("session-{i}"), &s);
    }

    let api: Vec<(u8, serde_json::Value)> = vec![
        (
            0,
            serde_json::to_value(VmCreateRequest {
                name: "web-1".into(),
                cpus: 2,
                memory_mib: 1024,
                disks: vec![
                    DiskRequest::New {
                        size_bytes: 1 << 30,
                    },
                    DiskRequest::Import {
                        path: "/srv/img/base.qcow2".into(),
                    },
                ],
                kernel: Some("/boot/vmlinuz".into()),
                initrd: None,
                append: Some("console=ttyS0".into()),
                nics: vec![
                    NicRequest::Bridge {
                        bridge: Some("br0".into()),
                    },
                    NicRequest::User,
                ],
            })
            .unwrap(),
        ),
        (1, serde_json::json!({"timeout_s": 30})),
        (
            2,
            serde_json::to_value(ReplicaServerSetRequest {
                enabled: Some(true),
                port: Some(7444),
                allow_any: Some(false),
                trusted_ca: Some(String::new()),
                allow_primary_start: Some(false),
                map_bridge: Some(("host-a/br0".into(), "br1".into())),
                unmap_bridge: None,
                storage: Some("/srv/replicas".into()),
                allow: Some(AuthorizationEntry {
                    primary: "host-a".into(),
                    fingerprint: "ab".repeat(32),
                    storage: "/srv/replicas".into(),
                    trust_group: "default".into(),
                }),
                disallow: None,
            })
            .unwrap(),
        ),
        (
            3,
            serde_json::to_value(EnableReplicationRequest {
                replica_name: "host-b".into(),
                replica_addr: "host-b:7444".into(),
                replica_fingerprint: "cd".repeat(32),
                interval: "5m".into(),
                recovery_points: 4,
                point_spacing: Some("1h".into()),
                compression: true,
                exclude_disks: vec![1],
                initial: Some("export:/mnt/usb".into()),
                bandwidth_limit: Some(10 << 20),
                granularity: Some(65536),
                app_consistent_every: Some("1h".into()),
            })
            .unwrap(),
        ),
        (4, serde_json::json!({"dir": "/mnt/usb/web-1"})),
        (
            5,
            serde_json::json!({"name": "before-upgrade", "kind": "standard"}),
        ),
        (6, serde_json::json!({"checkpoint_first": true})),
        (7, serde_json::json!({"name": "renamed"})),
        (8, serde_json::json!({"dir": "/srv/export"})),
        (
            9,
            serde_json::json!({"dir": "/srv/export/web-1", "name": "web-2"}),
        ),
        (9, serde_json::json!("10G")),
    ];
    for (i, (which, body)) in api.iter().enumerate() {
        let mut s = vec![*which];
        s.extend(serde_json::to_vec(body).unwrap());
        put("api_requests", &format!("body-{i:02}"), &s);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    println!("corpora written under {}", corpus("").display());
}

fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferry-gen-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
