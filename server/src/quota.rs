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
use std::sync::Mutex;
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
    size: Mutex<Option<(Instant, u64)>>,
}

impl Default for Quota {
    fn default() -> Self {
        Quota {
            bytes: AtomicU64::new(DEFAULT_QUOTA_BYTES),
            size: Mutex::new(None),
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
        *self.size.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The member's backend size, measured at most [`SIZE_CACHE`] ago.
    pub fn db_size(&self, raft: &RaftNode) -> u64 {
        let mut cached = self.size.lock().unwrap_or_else(|p| p.into_inner());
        match *cached {
            Some((at, size)) if at.elapsed() < SIZE_CACHE => size,
            _ => {
                let size = raft.backend_size();
                *cached = Some((Instant::now(), size));
                size
            }
        }
    }

    /// True if a request of `cost` bytes fits (etcd: `size + cost < quota`).
    pub fn available(&self, raft: &RaftNode, cost: usize) -> bool {
        self.db_size(raft).saturating_add(cost as u64) < self.bytes()
    }
}
