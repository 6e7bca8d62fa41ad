//! "Never accept what cannot be kept": a free-space check of the state directory's filesystem.
//!
//! The outbox refuses inserts beyond its own byte limit (`outbox.max_bytes`), but the disk can
//! fill up for other reasons (logs, other services, a limit set larger than the disk). Before
//! storing, ingest asks [`DiskGuard::has_room`]; below `outbox.min_free_disk_bytes` it answers
//! `AE`/`CE` "storage full, retry later" instead of risking a failed or torn commit.
//! `statvfs` costs a system call, so the answer is cached for [`RECHECK`]; the margin is meant
//! to be far larger than what arrives in that time.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one `statvfs` answer is reused.
pub const RECHECK: Duration = Duration::from_millis(250);

/// Free-space check of one directory's filesystem.
#[derive(Debug)]
pub struct DiskGuard {
    dir: PathBuf,
    min_free: u64,
    last: Mutex<Option<(Instant, u64)>>,
}

impl DiskGuard {
    pub fn new(dir: PathBuf, min_free: u64) -> DiskGuard {
        DiskGuard {
            dir,
            min_free,
            last: Mutex::new(None),
        }
    }

    /// Bytes available to this (unprivileged) process on the filesystem of the directory.
    pub fn available(&self) -> std::io::Result<u64> {
        let st = rustix::fs::statvfs(&self.dir).map_err(std::io::Error::from)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// `Ok(())` when at least `min_free + incoming` bytes are free, else the free byte count.
    /// A failing `statvfs` (directory removed?) counts as no room.
    pub fn has_room(&self, incoming: u64) -> Result<(), u64> {
        if self.min_free == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let cached = self
            .last
            .lock()
            .ok()
            .and_then(|g| *g)
            .filter(|(at, _)| now.duration_since(*at) < RECHECK)
            .map(|(_, free)| free);
        let free = match cached {
            Some(f) => f,
            None => {
                let f = self.available().unwrap_or(0);
                if let Ok(mut g) = self.last.lock() {
                    *g = Some((now, f));
                }
                f
            }
        };
        if free >= self.min_free.saturating_add(incoming) {
            Ok(())
        } else {
            Err(free)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let dir = tempfile::tempdir().expect("tmp");
        let free = DiskGuard::new(dir.path().into(), 1)
            .available()
            .expect("statvfs");
        assert!(free > 0);
        assert_eq!(
            DiskGuard::new(dir.path().into(), 0).has_room(u64::MAX),
            Ok(())
        );
        assert!(DiskGuard::new(dir.path().into(), 1).has_room(0).is_ok());
        assert!(
            DiskGuard::new(dir.path().into(), u64::MAX / 2)
                .has_room(0)
                .is_err()
        );
        assert!(
            DiskGuard::new("/nonexistent/dir".into(), 1)
                .has_room(0)
                .is_err()
        );
    }
}
