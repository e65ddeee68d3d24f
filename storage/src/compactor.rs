//! Physical compaction off the write path (etcd's `scheduleCompaction`).
//!
//! A compaction is decided when its Raft entry is applied: the index drops what it no longer
//! needs, the compaction revision moves, and the decision is written to sled with the applied
//! marker. Deleting the unreachable revisions from the `key` tree means walking every stored
//! revision up to the compaction revision (every live key's latest one included): on a 300k-key
//! store that walk stalled every write for 0.6 s while it ran under the store's writer. It now
//! runs here, one compaction after another in the order they were decided, holding only the
//! store's history lock exclusively (so a snapshot or HashKV walking the history never sees half
//! of it) while writes go on. Nothing reads the revisions it deletes: the index stopped pointing
//! at them when the compaction was decided, and readers of older revisions are refused as
//! compacted from then on.
//!
//! A crash before a compaction finished leaves `scheduled > finished` in sled, and opening the
//! store finishes it. A snapshot install replaces the trees under the history lock and bumps the
//! store's epoch: compactions decided before it are skipped (what the index kept was about the
//! old contents), and the install finishes the one its own data carries.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::RwLock;

use crate::error::Result;
use crate::error::StorageError;
use crate::persister::SharedTrees;
use crate::persister::Trees;
use crate::revision::Revision;
use crate::schema;

/// How many `key` tree deletions go in one sled batch.
const COMPACTION_BATCH: usize = 10_000;

/// One decided compaction.
struct Job {
    rev: i64,
    /// Revisions at or below `rev` that are still visible (each key's newest as of `rev`).
    keep: HashSet<Revision>,
    /// The store's epoch when it was decided.
    epoch: u64,
}

/// Compactions handed to the thread, and how far it got.
#[derive(Default)]
struct Progress {
    /// The newest revision submitted.
    submitted: i64,
    /// The revision up to which every submitted compaction has been dealt with.
    done: i64,
}

/// The compaction thread and its queue.
pub(crate) struct Compactor {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    done: Arc<(Mutex<Progress>, Condvar)>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Compactor {
    /// Starts the thread that deletes compacted revisions from `trees`, taking `history`
    /// exclusively while it does, and skipping jobs decided before the last change of `epoch`.
    pub(crate) fn start(
        trees: SharedTrees,
        history: Arc<RwLock<()>>,
        epoch: Arc<AtomicU64>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let done: Arc<(Mutex<Progress>, Condvar)> = Arc::default();
        let finished = done.clone();
        let thread = std::thread::Builder::new()
            .name("fetcd-compact".into())
            .spawn(move || {
                for job in rx {
                    {
                        let _history = history.write().unwrap_or_else(|p| p.into_inner());
                        if job.epoch != epoch.load(Ordering::SeqCst) {
                            tracing::info!(
                                revision = job.rev,
                                "compaction skipped: a snapshot replaced the store"
                            );
                        } else {
                            let trees = trees.read().unwrap_or_else(|p| p.into_inner());
                            if let Err(e) = delete_compacted(&trees, job.rev, &job.keep) {
                                // The decision is in sled: the next open finishes it.
                                tracing::error!(revision = job.rev, error = %e, "compaction failed");
                            }
                        }
                    }
                    let (lock, cv) = &*finished;
                    let mut d = lock.lock().unwrap_or_else(|p| p.into_inner());
                    d.done = d.done.max(job.rev);
                    cv.notify_all();
                }
            })
            .map_err(StorageError::Io)?;
        Ok(Compactor {
            jobs: Mutex::new(Some(tx)),
            done,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues the deletion of the revisions up to `rev` that `keep` does not hold.
    pub(crate) fn submit(&self, rev: i64, keep: HashSet<Revision>, epoch: u64) {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let sent = jobs
            .as_ref()
            .is_some_and(|tx| tx.send(Job { rev, keep, epoch }).is_ok());
        if sent {
            let mut d = self.done.0.lock().unwrap_or_else(|p| p.into_inner());
            d.submitted = d.submitted.max(rev);
        } else {
            // Stopping: the decision is in sled, and the next open finishes it.
            tracing::warn!(revision = rev, "compaction left for the next start");
        }
    }

    /// Returns once every compaction submitted up to `rev` has been dealt with (one finished
    /// before this store was opened, or by a snapshot install, needs no waiting).
    pub(crate) fn wait(&self, rev: i64) {
        let (lock, cv) = &*self.done;
        let mut d = lock.lock().unwrap_or_else(|p| p.into_inner());
        while d.done < rev.min(d.submitted) {
            d = cv.wait(d).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Finishes the queued compactions and stops the thread. Idempotent.
    pub(crate) fn stop(&self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            if h.join().is_err() {
                tracing::error!("the compaction thread panicked");
            }
        }
    }
}

/// Deletes the revisions up to `rev` that `keep` does not hold from the `key` tree, in batches,
/// then records the compaction as finished. The caller keeps other walkers of the history out.
pub(crate) fn delete_compacted(trees: &Trees, rev: i64, keep: &HashSet<Revision>) -> Result<()> {
    let end = Revision::main_start_bytes(rev.saturating_add(1));
    let mut batch = sled::Batch::default();
    let mut n = 0usize;
    let mut deleted = 0usize;
    for item in trees.key.range(..end) {
        let (k, _) = item?;
        let (r, _) = Revision::from_bytes(&k)
            .ok_or_else(|| StorageError::Corrupt(format!("bad revision key {k:?}")))?;
        if keep.contains(&r) {
            continue;
        }
        batch.remove(k);
        n += 1;
        if n == COMPACTION_BATCH {
            trees.key.apply_batch(std::mem::take(&mut batch))?;
            deleted += n;
            n = 0;
        }
    }
    trees.key.apply_batch(batch)?;
    deleted += n;
    trees
        .meta
        .insert(schema::FINISHED_COMPACT_REV, &rev.to_be_bytes())?;
    tracing::info!(revision = rev, deleted, "compaction finished");
    Ok(())
}
