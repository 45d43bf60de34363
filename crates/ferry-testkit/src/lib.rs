//! Ferry's test harness: real `ferryd` hosts with their own directories, sockets, ports
//! and logs ([`host`]), the verifiable test guest's host-side model ([`guest`]), and
//! cleanup of every process a test started, even when the test fails (Drop guards).

pub mod cluster;
pub mod debian;
pub mod guest;
pub mod host;
pub mod hostile;
pub mod link;
pub mod pki;
pub mod replication;
pub mod tmpfs;

use std::path::PathBuf;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// The directory holding the workspace's binaries (`ferryd`, `ferry`), next to the test
/// executable (`target/debug/deps/..`). `cargo test`/`nextest` build them with the tests.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("deps dir");
    let dir = if deps.ends_with("deps") {
        deps.parent().expect("profile dir").to_path_buf()
    } else {
        deps.to_path_buf()
    };
    for bin in ["ferryd", "ferry"] {
        assert!(
            dir.join(bin).is_file(),
            "{} is missing: build the workspace first (cargo build --workspace)",
            dir.join(bin).display()
        );
    }
    dir
}

/// The test guest's kernel and initramfs, built by `guest/build.sh` if needed (under a
/// lock, since tests run in parallel processes). Panics loudly if it cannot be built.
pub fn test_guest() -> (PathBuf, PathBuf) {
    let root = repo_root();
    let out = root.join("guest/out");
    let status = std::process::Command::new("flock")
        .arg(root.join("guest/.build.lock"))
        .arg(root.join("guest/build.sh"))
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run flock guest/build.sh (util-linux)");
    assert!(
        status.success(),
        "guest/build.sh failed: install linux-image-amd64 busybox-static cpio kmod"
    );
    (out.join("vmlinuz"), out.join("initramfs.gz"))
}
