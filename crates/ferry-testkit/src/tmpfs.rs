//! A size-limited tmpfs mounted over a test's directory (a replica storage or a spool the
//! test fills up), unmounted when dropped, even when the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs; dropping it unmounts it (lazily: a daemon may still hold files).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "256M") named `name` over `dir`, creating `dir`.
    pub fn mount(dir: &Path, size: &str, name: &str) -> Self {
        std::fs::create_dir_all(dir).expect("tmpfs mount point");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), name])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mount a {size} tmpfs on {}", dir.display());
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
