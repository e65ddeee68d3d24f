//! The backend space quota (`--quota-backend-bytes`, etcd's `backendQuota`).
//!
//! A write that would grow the database (Put, a writing Txn, LeaseGrant) is admitted only while
//! the member's backend size plus the request's size stays under the quota. Otherwise the member
//! raises a `NOSPACE` alarm for itself through Raft and refuses the request with
//! `etcdserver: mvcc: database space exceeded`; while the alarm is active every member's store
//! refuses such writes at apply time too (see `fetcd_storage::alarm`).
//!
//! The backend size is the MVCC store's files (`member/kv`), fetcd's counterpart of etcd's bolt
//! file; the Raft log and snapshots are not counted, as etcd does not count its WAL. As in etcd,
//! compaction alone frees space for reuse without shrinking the files, and `Defragment` gives it
//! back; then `etcdctl alarm disarm` lets writes in again.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::time::Duration;
use std::time::Instant;

use fetcd_raft::RaftNode;

/// etcd's default quota (`--quota-backend-bytes 0`): 2 GiB.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// How long a measured size is reused: the size walks the data directory, which is too much for
/// every write and changes slowly.
const SIZE_CACHE: Duration = Duration::from_millis(100);

/// The quota and a cached measurement of the member's size.
#[derive(Debug)]
pub struct Quota {
    bytes: AtomicU64,
    size: Arc<Mutex<Measured>>,
}

/// The last measurement, and a count of [`Quota::forget_size`] calls, so that a measurement
/// started before one is not kept after it.
#[derive(Debug, Default)]
struct Measured {
    last: Option<(Instant, u64)>,
    generation: u64,
    /// A measurement runs on a blocking thread for [`Quota::available`].
    measuring: bool,
}

impl Default for Quota {
    fn default() -> Self {
        Quota {
            bytes: AtomicU64::new(DEFAULT_QUOTA_BYTES),
            size: Arc::default(),
        }
    }
}

impl Quota {
    /// Sets the quota from `--quota-backend-bytes` (0 = etcd's default).
    pub fn set_bytes(&self, bytes: u64) {
        let bytes = if bytes == 0 {
            DEFAULT_QUOTA_BYTES
        } else {
            bytes
        };
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    /// The quota in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Forgets the measured size (after a defragmentation changed it).
    pub fn forget_size(&self) {
        let mut m = lock(&self.size);
        m.last = None;
        m.generation += 1;
    }

    /// The member's backend size, measured at most [`SIZE_CACHE`] ago (measured now, on this
    /// thread, if it is older).
    pub fn db_size(&self, raft: &RaftNode) -> u64 {
        let mut m = lock(&self.size);
        match m.last {
            Some((at, size)) if at.elapsed() < SIZE_CACHE => size,
            _ => {
                let size = raft.backend_size();
                m.last = Some((Instant::now(), size));
                size
            }
        }
    }

    /// True if a request of `cost` bytes fits (etcd: `size + cost < quota`). Writes call this,
    /// so it does not walk the data directory itself once a size is known: an older
    /// measurement is used while a new one runs on a blocking thread (a backend with many
    /// files, such as sled's blobs for large values, takes a while to walk).
    pub fn available(&self, raft: &RaftNode, cost: usize) -> bool {
        self.recent_size(raft).saturating_add(cost as u64) < self.bytes()
    }

    fn recent_size(&self, raft: &RaftNode) -> u64 {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.db_size(raft);
        };
        let mut m = lock(&self.size);
        let Some((at, size)) = m.last else {
            drop(m);
            return self.db_size(raft);
        };
        if at.elapsed() >= SIZE_CACHE && !m.measuring {
            m.measuring = true;
            let (slot, generation, dir) = (self.size.clone(), m.generation, raft.backend_dir());
            runtime.spawn_blocking(move || {
                let size = fetcd_raft::maintenance::dir_size(&dir);
                let mut m = lock(&slot);
                if m.generation == generation {
                    m.last = Some((Instant::now(), size));
                }
                m.measuring = false;
            });
        }
        size
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fetcd_raft::RaftNodeConfig;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Once a size is known, writes are admitted on it while the directory is measured again
    /// in the background; growth past the quota is refused within a few intervals.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn growth_is_seen_by_a_measurement_in_the_background() -> TestResult {
        let tmp = tempfile::TempDir::new()?;
        let raft = RaftNode::open(RaftNodeConfig::new(1, tmp.path().to_path_buf())).await?;
        let quota = Quota::default();
        let before = quota.db_size(&raft);
        assert!(before > 0, "sled's files are measured");
        quota.set_bytes(before + 512 * 1024);
        assert!(quota.available(&raft, 1));

        // The backend grows by a megabyte (as with a large value sled keeps in a file).
        std::fs::write(raft.backend_dir().join("grown"), vec![1u8; 1024 * 1024])?;
        assert!(
            quota.available(&raft, 1),
            "a recent measurement is used as it is"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while quota.available(&raft, 1) {
            assert!(Instant::now() < deadline, "growth never seen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(quota.db_size(&raft) >= before + 1024 * 1024);

        // After forget_size (a defragmentation), the next check measures at once.
        std::fs::remove_file(raft.backend_dir().join("grown"))?;
        quota.forget_size();
        assert!(quota.available(&raft, 1));
        raft.shutdown().await;
        Ok(())
    }
}
