//! How far this member's Raft log is on stable storage, and a leader's syncs off its Raft core.
//!
//! openraft 0.9's core awaits the flush of each append before it does anything else, so a leader
//! of several voters used to sync an entry before it even sent it to the followers: the
//! leader's fsync and the followers' ran one after the other. A leader now reports its own
//! appends flushed once they are *written*, and a thread of its own ([`Syncer`]) syncs them while
//! the followers write theirs, as etcd's leader does (the Raft thesis, §10.2.1). openraft may
//! then count the leader in a commit quorum before its copy is durable, so that commit is not
//! shown to anyone until it is. Two gates wait on [`Durability`]:
//! - the state machine applies an entry only once it is durable here, so no client hears of a
//!   write (nor reads nor watches it) before;
//! - an AppendEntries carries a commit index only once this log is durable up to it, so no
//!   follower applies an entry this member could still lose in a power cut.
//!
//! An acknowledged write is thus on the leader's disk and on a follower's, as before. Followers
//! keep syncing every append before they acknowledge it.

use std::fs::File;
use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Instant;

use crate::watermark::Watermark;

/// How far the log is durable: every entry below [`end`](Self::end) that the log holds now is on
/// stable storage. It also tells how far the log is written ([`written_end`](Self::written_end)),
/// durable or not, which is what a leader is about to replicate.
#[derive(Debug, Default)]
pub struct Durability {
    /// Moved only under `epoch`'s lock (closed when a sync failed).
    end: Watermark,
    /// Bumped by every truncation: a sync started before one must not vouch for the entries
    /// written after it at the same indexes.
    epoch: Mutex<u64>,
    /// One past the last entry index written (changed under the log's write lock).
    written: AtomicU64,
}

impl Durability {
    /// A log whose entries below `end` are durable (those it replayed on open).
    pub(crate) fn new(end: u64) -> Self {
        Self {
            end: Watermark::new(end),
            epoch: Mutex::new(0),
            written: AtomicU64::new(end),
        }
    }

    /// One past the highest durable entry index.
    pub fn end(&self) -> u64 {
        self.end.end()
    }

    /// One past the last entry index written to the log, durable or not.
    pub fn written_end(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Entries below `end` are written (an append); the caller holds the log's write lock.
    pub(crate) fn wrote(&self, end: u64) {
        self.written.store(end, Ordering::Release);
    }

    /// A purge past the last entry: the next entry written follows `end - 1`. Returns whether
    /// that moved the written end.
    pub(crate) fn skipped_to(&self, end: u64) -> bool {
        self.written.fetch_max(end, Ordering::AcqRel) < end
    }

    /// Resolves once the entry at `index` is durable; fails if a sync of the log failed (the log
    /// then takes no more writes, and the entry may never be).
    pub async fn wait(&self, index: u64) -> io::Result<()> {
        self.end
            .wait_past(index)
            .await
            .map_err(|_| io::Error::other("a sync of the raft log failed"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.epoch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current epoch, read under the log's write lock (where truncations happen).
    pub(crate) fn epoch(&self) -> u64 {
        *self.lock()
    }

    /// A sync that started in `epoch`, when everything below `end` was written, completed.
    pub(crate) fn synced(&self, epoch: u64, end: u64) {
        let current = self.lock();
        if *current == epoch && end > self.end.end() {
            self.end.set(end);
        }
    }

    /// Entries from `from` on were removed: the ones written there next are not durable yet.
    pub(crate) fn truncated(&self, from: u64) {
        let mut epoch = self.lock();
        *epoch += 1;
        self.written.fetch_min(from, Ordering::AcqRel);
        if self.end.end() > from {
            self.end.set(from);
        }
    }

    /// A sync failed: waiters fail rather than wait for an entry that may never be durable.
    pub(crate) fn fail(&self) {
        self.end.close();
    }

    /// Whether a sync failed.
    pub(crate) fn failed(&self) -> bool {
        self.end.is_closed()
    }
}

/// A write to make durable.
pub(crate) struct Job {
    /// The segment the write went to. Earlier segments were synced when the log moved on from
    /// them.
    pub file: Arc<File>,
    pub epoch: u64,
    /// One past the last entry index written.
    pub end: u64,
}

/// The thread that syncs a leader's appends; one sync covers every write queued meanwhile.
pub(crate) struct Syncer {
    jobs: mpsc::Sender<Job>,
}

impl Syncer {
    /// Starts the thread for the log of member `member`; it ends when the `Syncer` is dropped.
    pub(crate) fn start(durability: Arc<Durability>, member: u64) -> io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || {
                while let Ok(mut job) = rx.recv() {
                    // A later write covers the earlier ones: same segment, or a later one that
                    // was started only after the earlier one was synced.
                    while let Ok(next) = rx.try_recv() {
                        job = next;
                    }
                    #[cfg(feature = "fault-injection")]
                    crate::fault::wait_log_syncs_released(member);
                    let started = Instant::now();
                    match job.file.sync_data() {
                        Ok(()) => {
                            crate::metrics::WAL_FSYNC.observe(started.elapsed());
                            durability.synced(job.epoch, job.end);
                        }
                        Err(e) => {
                            tracing::error!(member, error = %e, "syncing the raft log failed");
                            durability.fail();
                            return;
                        }
                    }
                }
            })?;
        Ok(Self { jobs })
    }

    /// Queues a sync; false if the thread is gone (a sync failed).
    pub(crate) fn sync(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::Durability;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_sync_from_before_a_truncation_vouches_for_nothing() {
        let d = Arc::new(Durability::new(5));
        let epoch = d.epoch();
        d.truncated(3);
        // Entries 3.. were written again since; the old sync must not cover them.
        d.synced(epoch, 8);
        assert_eq!(d.end(), 3);
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.wait(6).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "entry 6 is not durable yet");
        d.synced(d.epoch(), 7);
        let res = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(res, Ok(Ok(Ok(())))), "{res:?}");
    }

    #[tokio::test]
    async fn a_failed_sync_fails_the_waiters() {
        let d = Arc::new(Durability::new(0));
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.wait(0).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        d.fail();
        let res = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert!(matches!(res, Ok(Ok(Err(_)))), "{res:?}");
    }
}
