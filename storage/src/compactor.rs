//! Compaction off the write path (etcd's `kvindex.Compact` + `scheduleCompaction`).
//!
//! A compaction is decided when its Raft entry is applied: the compaction revision moves (readers
//! of older revisions are refused from then on) and the decision is written to sled with the
//! applied marker. The work runs here, one compaction after another in the order they were
//! decided, while writes go on:
//! - the key index drops the revisions no read can reach any more, a chunk of keys at a time
//!   under the index lock (as etcd's per-key locking; the whole walk at once held every read and
//!   write for 80 ms on a 300k-key store), collecting the revisions that stay visible. A write
//!   that publishes a key's entry meanwhile compacts it first (see `WriteTxn::commit`), so no
//!   entry brings compacted revisions back;
//! - the `key` tree loses every stored revision up to the compaction revision that the index did
//!   not keep (on a 300k-key store that walk stalled every write for 0.6 s when it ran under the
//!   store's writer), holding the store's history lock exclusively, so a snapshot or HashKV
//!   walking the history never sees half of it. Deletions go in batches with a pause between
//!   them, as etcd's do, so their disk writes do not pile up in front of the Raft log's fsyncs.
//!   They start only once no Range that read below the newest decided compaction revision is
//!   still loading its values (see [`ReadPins`]).
//!
//! A crash before a compaction finished leaves `scheduled > finished` in sled, and opening the
//! store finishes it. A snapshot install replaces the trees under the history lock and bumps the
//! store's epoch: compactions decided before it are skipped (what the index kept was about the
//! old contents), and the install finishes the one its own data carries.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::RwLock;
use std::time::Duration;

use crate::error::Result;
use crate::error::StorageError;
use crate::key_tree;
use crate::key_tree::Retain;
use crate::kvstore::IndexKey;
use crate::kvstore::IndexState;
use crate::persister::SharedTrees;
use crate::persister::Trees;
use crate::revision::Revision;
use crate::schema;

/// How deletions are paced (etcd's `--experimental-compaction-batch-limit` and
/// `--experimental-compaction-sleep-interval`, same defaults). A sled batch holds sled's write
/// lock, so the persister's group commits wait for it; and back-to-back batches' writeback lands
/// in the Raft log's fdatasyncs (ext4 commits a file's metadata with the other files' dirty
/// data), which stalled puts for ~100 ms on a 300k-key compaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactionPacing {
    /// Deletions per sled batch (at least 1).
    pub batch_limit: usize,
    /// The pause between two batches.
    pub sleep: Duration,
}

impl Default for CompactionPacing {
    fn default() -> Self {
        CompactionPacing {
            batch_limit: 1000,
            sleep: Duration::from_millis(10),
        }
    }
}

/// How many keys' index entries are compacted per hold of the index lock (~0.3 ms).
const INDEX_CHUNK: usize = 1024;

/// The read revisions of the Ranges still loading values after they let go of the key index
/// (etcd's reads keep a bolt read transaction open as long). The compaction thread deletes
/// compacted revisions only once no read below the newest decided compaction revision is
/// pinned, so a long Range neither holds writers behind the index lock nor finds its values
/// gone.
#[derive(Default)]
pub(crate) struct ReadPins {
    /// Pinned read revision → how many reads hold it.
    held: Mutex<BTreeMap<i64, usize>>,
    released: Condvar,
}

impl ReadPins {
    /// Keeps what a read at `rev` needs until the pin is dropped. Call it under the key index
    /// lock after checking `rev` against the compaction revision: a compaction decided later
    /// then finds the pin when it runs.
    pub(crate) fn pin(&self, rev: i64) -> ReadPin<'_> {
        *self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(rev)
            .or_default() += 1;
        ReadPin { pins: self, rev }
    }

    /// Returns once no read below `rev` is pinned.
    pub(crate) fn wait_none_below(&self, rev: i64) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        while held.first_key_value().is_some_and(|(r, _)| *r < rev) {
            held = self.released.wait(held).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A read revision pinned by [`ReadPins::pin`].
pub(crate) struct ReadPin<'a> {
    pins: &'a ReadPins,
    rev: i64,
}

impl Drop for ReadPin<'_> {
    fn drop(&mut self) {
        let mut held = self.pins.held.lock().unwrap_or_else(|p| p.into_inner());
        if let std::collections::btree_map::Entry::Occupied(mut e) = held.entry(self.rev) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
                self.pins.released.notify_all();
            }
        }
    }
}

/// One decided compaction.
struct Job {
    rev: i64,
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
    pacing: Arc<Mutex<CompactionPacing>>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    done: Arc<(Mutex<Progress>, Condvar)>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Compactor {
    /// Starts the thread that compacts `index` and deletes compacted revisions from `trees`
    /// once `pins` holds no older read, taking `history` exclusively while it does, and
    /// skipping jobs decided before the last change of `epoch`.
    pub(crate) fn start(
        trees: SharedTrees,
        index: Arc<RwLock<IndexState>>,
        history: Arc<RwLock<()>>,
        epoch: Arc<AtomicU64>,
        pins: Arc<ReadPins>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let pacing: Arc<Mutex<CompactionPacing>> = Arc::default();
        let paced = pacing.clone();
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
                            let started = std::time::Instant::now();
                            let keep = compact_index(&index, job.rev);
                            tracing::info!(
                                revision = job.rev,
                                took = ?started.elapsed(),
                                "index compaction finished"
                            );
                            // Writes publish their keys compacted at the newest decided
                            // revision, which may be past this job's: then `keep` lacks what
                            // reads below that revision still load.
                            let decided = index.read().unwrap_or_else(|p| p.into_inner()).compact;
                            pins.wait_none_below(decided.max(job.rev));
                            let pacing = *paced.lock().unwrap_or_else(|p| p.into_inner());
                            let trees = trees.read().unwrap_or_else(|p| p.into_inner());
                            if let Err(e) = delete_compacted(&trees, job.rev, &keep, pacing) {
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
            pacing,
            jobs: Mutex::new(Some(tx)),
            done,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Paces the deletions of the compactions that start from now on.
    pub(crate) fn set_pacing(&self, pacing: CompactionPacing) {
        *self.pacing.lock().unwrap_or_else(|p| p.into_inner()) = pacing;
    }

    /// Queues the compaction of the index and the history at `rev`, decided at `epoch`.
    pub(crate) fn submit(&self, rev: i64, epoch: u64) {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let sent = jobs
            .as_ref()
            .is_some_and(|tx| tx.send(Job { rev, epoch }).is_ok());
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

/// Compacts every key's index entry at `rev`, [`INDEX_CHUNK`] keys per hold of the lock, drops
/// the keys left with no history, and returns the revisions at or below `rev` that stay visible
/// (each key's newest as of `rev`). Keys written meanwhile need no care: writes only add
/// revisions above `rev`, and their entries are published compacted.
pub(crate) fn compact_index(index: &RwLock<IndexState>, rev: i64) -> HashSet<Revision> {
    use std::ops::Bound;
    let mut keep = HashSet::new();
    let mut after: Option<IndexKey> = None;
    loop {
        let mut st = index.write().unwrap_or_else(|p| p.into_inner());
        let start = match &after {
            Some(k) => Bound::Excluded(&**k),
            None => Bound::Unbounded,
        };
        let mut emptied = Vec::new();
        let mut last = None;
        for (n, (k, ki)) in st
            .keys
            .range_mut::<[u8], _>((start, Bound::Unbounded))
            .enumerate()
        {
            ki.compact(rev, &mut keep);
            if ki.is_empty() {
                emptied.push(k.clone());
            }
            if n + 1 == INDEX_CHUNK {
                last = Some(k.clone());
                break;
            }
        }
        for k in emptied {
            st.keys.remove(&k);
        }
        drop(st);
        match last {
            Some(k) => after = Some(k),
            None => return keep,
        }
    }
}

/// Deletes the revisions up to `rev` that `keep` does not hold from the `key` tree, in batches
/// paced by `pacing`, then records the compaction as finished. The caller keeps other walkers of
/// the history out.
pub(crate) fn delete_compacted(
    trees: &Trees,
    rev: i64,
    keep: &HashSet<Revision>,
    pacing: CompactionPacing,
) -> Result<()> {
    let limit = pacing.batch_limit.max(1);
    let started = std::time::Instant::now();
    let end = Revision::main_start_bytes(rev.saturating_add(1));
    let alive = |r: Revision| r.main > rev || keep.contains(&r);
    let mut batch = sled::Batch::default();
    let mut n = 0usize;
    let mut deleted = 0usize;
    // Records starting up to `rev`; a block may also hold later revisions, which it keeps.
    for item in trees.key.range(..end) {
        let (k, v) = item?;
        match key_tree::retain(&k, v, alive)? {
            Retain::Keep => continue,
            Retain::Remove { revisions } => {
                batch.remove(k);
                n += revisions;
            }
            Retain::Rewrite { revisions, blocks } => {
                // One batch: readers see the old block or the new ones, never neither.
                batch.remove(k);
                for (k, v) in blocks {
                    batch.insert(k, v);
                }
                n += revisions;
            }
        }
        if n >= limit {
            trees.key.apply_batch(std::mem::take(&mut batch))?;
            deleted += n;
            n = 0;
            if !pacing.sleep.is_zero() {
                std::thread::sleep(pacing.sleep);
            }
        }
    }
    trees.key.apply_batch(batch)?;
    deleted += n;
    trees
        .meta
        .insert(schema::FINISHED_COMPACT_REV, &rev.to_be_bytes())?;
    tracing::info!(revision = rev, deleted, took = ?started.elapsed(), "compaction finished");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use fetcd_proto::etcdserverpb::CompactionRequest;
    use fetcd_proto::etcdserverpb::DeleteRangeRequest;

    use super::*;
    use crate::kvstore::testing::put;
    use crate::kvstore::testing::store;
    use crate::kvstore::KvStore;
    use crate::kvstore::WriteOp;

    fn revs(s: &KvStore, key: &str) -> Vec<Vec<i64>> {
        let st = s.read_index();
        st.keys
            .get(key.as_bytes())
            .map(|ki| {
                ki.history()
                    .iter()
                    .map(|g| g.iter().map(|r| r.main).collect())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_write_publishes_its_key_compacted_while_the_compaction_thread_has_not_run() {
        let s = store();
        put(&s, "a", "1"); // 2
        put(&s, "a", "2"); // 3
        let del = DeleteRangeRequest {
            key: "a".into(),
            ..Default::default()
        };
        s.apply([(WriteOp::DeleteRange(del), b"ci".to_vec())])
            .unwrap(); // 4
        put(&s, "b", "1"); // 5
        put(&s, "b", "2"); // 6
        put(&s, "c", "1"); // 7
                           // Holding the history keeps the compaction thread from starting.
        let history = s.read_history();
        let req = CompactionRequest {
            revision: 6,
            physical: false,
        };
        s.apply([(WriteOp::Compaction(req), b"ci".to_vec())])
            .unwrap();
        assert_eq!(s.compact_revision(), 6);
        assert_eq!(revs(&s, "a"), vec![vec![2, 3, 4], vec![]]);
        put(&s, "a", "3"); // 8
        put(&s, "b", "3"); // 9
        assert_eq!(revs(&s, "a"), vec![vec![8]]);
        assert_eq!(revs(&s, "b"), vec![vec![6, 9]]);
        // Untouched keys wait for the thread.
        assert_eq!(revs(&s, "c"), vec![vec![7]]);
        drop(history);
        s.wait_compaction(6);
        assert_eq!(revs(&s, "a"), vec![vec![8]]);
        assert_eq!(revs(&s, "b"), vec![vec![6, 9]]);
        s.flush().unwrap();
        let stored: Vec<i64> = key_tree::scan(&s.trees().key, Revision::default(), None)
            .map(|r| r.unwrap().rev.main)
            .collect();
        assert_eq!(stored, vec![6, 7, 8, 9]);
    }
}
