//! A size-limited tmpfs for tests of a full disk.

/// A tmpfs of `size` mounted on a temp folder (the tests run as root), unmounted on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs failed (the tests run as root)"
        );
        Tmpfs { dir }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills the filesystem up to `room` bytes short of full; returns the filler's path.
    pub fn fill_leaving(&self, room: u64) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0x5a_u8; 1 << 20];
        let mut written = 0u64;
        while let Ok(n) = file.write(&chunk) {
            if n == 0 {
                break;
            }
            written += n as u64;
        }
        file.set_len(written.saturating_sub(room)).unwrap();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
