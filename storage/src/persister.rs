//! Group commit of applied write sets into sled, off the apply path.
//!
//! Every sled transaction costs far more than the writes in it: sled 0.34 rolls its IO buffer
//! twice per atomic batch and hands each sealed buffer to its IO thread pool, waking every idle
//! pool thread. Committing each applied Raft entry in its own transaction made sled about 40 % of
//! a put's CPU and a fixed slice of its latency.
//!
//! So an apply publishes its changes in memory at once and queues them here; one persister thread
//! writes everything queued so far in a single sled transaction, with the newest consistent index
//! among them, and takes the next group. sled therefore still only ever holds the state as of
//! some whole consistent index (the Raft log replays the rest after a crash, exactly as when sled
//! loses unflushed writes), while the number of sled transactions no longer follows the number
//! of entries.
//!
//! Until its group is in sled, a `key` tree record is served from the overlay kept here (point
//! reads and range scans look at it first). The `lease` and `meta` trees are read only through
//! in-memory state or after [`Persister::barrier`].

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::RwLock;
use std::time::Duration;
use std::time::Instant;

use sled::transaction::ConflictableTransactionError;
use sled::transaction::TransactionError;
use sled::IVec;
use sled::Transactional;

use crate::error::Result;
use crate::error::StorageError;
use crate::key_tree::BlockHints;
use crate::key_tree::BlockWriter;
use crate::schema;

/// Bytes of queued `key` records past which an apply waits for the persister: bounds memory when
/// sled falls behind, and turns a persistently slow disk into backpressure on Raft instead.
const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

/// Least time between the starts of two group commits. sled's cost is per transaction, so under
/// load each transaction should carry many applies; an idle store still writes at once (the
/// first group after a pause goes without waiting). sled writes every transaction's buffers with
/// `sync_file_range` (wait for writeback), so each group also costs the disk: at 10 ms the
/// groups' writebacks (~175/s per member) slowed the Raft log's fdatasyncs they share the disk
/// with. Nothing depends on sled being current (the log replays what it lacks), so the interval
/// only bounds the overlay, which [`MAX_QUEUED_BYTES`] bounds too.
const GROUP_INTERVAL: Duration = Duration::from_millis(100);

/// What one committed write transaction changed in sled's trees.
#[derive(Default)]
pub(crate) struct WriteSet {
    /// New `key` tree records (revision → key-value), never overwritten.
    pub keys: Vec<(IVec, IVec)>,
    /// `lease` tree changes, if any.
    pub lease: Option<sled::Batch>,
    /// `meta` tree changes, if any.
    pub meta: Option<sled::Batch>,
    /// The consistent index this write set brings the store to.
    pub consistent_index: Option<Vec<u8>>,
}

impl WriteSet {
    fn bytes(&self) -> usize {
        self.keys.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

#[derive(Default)]
struct Queue {
    sets: Vec<WriteSet>,
    /// Write sets queued since open.
    enqueued: u64,
    /// Write sets in sled since open.
    persisted: u64,
    bytes: usize,
    /// A sled write failed: the store must not accept more (the Raft layer stops on it).
    failed: Option<String>,
    stop: bool,
    /// Someone waits in [`Persister::barrier`]: write now, do not wait out the group interval.
    urgent: bool,
    /// The persister thread waits for work (nothing queued): the next enqueue must wake it.
    /// While it waits out the group interval instead, it wakes by itself, and an enqueue that
    /// is not urgent leaves it be (a wake-up per applied entry cost a futex call on the apply
    /// path and a context switch).
    idle: bool,
}

/// The three trees the persister writes.
#[derive(Clone)]
pub(crate) struct Trees {
    pub key: sled::Tree,
    /// Where the `key` tree's blocks start, as point reads found out.
    pub hints: Arc<BlockHints>,
    pub meta: sled::Tree,
    pub lease: sled::Tree,
}

impl Trees {
    /// The store's trees in `db` (created if missing).
    pub(crate) fn open(db: &sled::Db) -> Result<Self> {
        Ok(Trees {
            key: db.open_tree(schema::KEY_TREE)?,
            hints: Arc::default(),
            meta: db.open_tree(schema::META_TREE)?,
            lease: db.open_tree(schema::LEASE_TREE)?,
        })
    }

    /// Each tree with its name, `meta` last (it holds the consistent index).
    pub(crate) fn named(&self) -> [(&'static str, &sled::Tree); 3] {
        [
            (schema::KEY_TREE, &self.key),
            (schema::LEASE_TREE, &self.lease),
            (schema::META_TREE, &self.meta),
        ]
    }
}

/// The trees, shared with the store, which swaps them when it defragments (only while the
/// queue is empty and no apply can add to it).
pub(crate) type SharedTrees = Arc<RwLock<Trees>>;

/// The queue, the `key` overlay and the thread writing them to sled.
pub(crate) struct Persister {
    queue: Mutex<Queue>,
    /// Signals the thread that work was queued or stop was asked.
    work: Condvar,
    /// Signals barrier and backpressure waiters that a group reached sled.
    done: Condvar,
    /// `key` records queued but not yet in sled.
    overlay: RwLock<BTreeMap<IVec, IVec>>,
    /// Size of `overlay`, so reads skip its lock when it is empty (the read-heavy case).
    overlay_len: AtomicUsize,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Persister {
    /// Starts the persister thread over `trees`.
    pub(crate) fn start(trees: SharedTrees) -> Result<Arc<Self>> {
        let p = Arc::new(Persister {
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            overlay: RwLock::new(BTreeMap::new()),
            overlay_len: AtomicUsize::new(0),
            thread: Mutex::new(None),
        });
        let worker = p.clone();
        let handle = std::thread::Builder::new()
            .name("fetcd-persist".into())
            .spawn(move || worker.run(trees))
            .map_err(StorageError::Io)?;
        *lock(&p.thread) = Some(handle);
        Ok(p)
    }

    /// Queues a committed write set. Its `key` records are readable through the overlay as soon
    /// as this returns, so the caller publishes the new revision only afterwards.
    pub(crate) fn enqueue(&self, set: WriteSet) -> Result<()> {
        let mut q = lock(&self.queue);
        while q.bytes > MAX_QUEUED_BYTES && q.failed.is_none() {
            q.urgent = true;
            self.work.notify_one();
            q = self.done.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(e) = &q.failed {
            return Err(StorageError::Persist(e.clone()));
        }
        if !set.keys.is_empty() {
            let mut ov = self.overlay.write().unwrap_or_else(|p| p.into_inner());
            for (k, v) in &set.keys {
                ov.insert(k.clone(), v.clone());
            }
            self.overlay_len.store(ov.len(), Ordering::SeqCst);
        }
        q.bytes += set.bytes();
        // A big group is worth writing without waiting for more.
        if q.bytes > MAX_QUEUED_BYTES / 16 {
            q.urgent = true;
        }
        q.sets.push(set);
        q.enqueued += 1;
        if q.idle || q.urgent {
            self.work.notify_one();
        }
        Ok(())
    }

    /// Returns once everything queued before the call is in sled (or sled failed).
    pub(crate) fn barrier(&self) -> Result<()> {
        let mut q = lock(&self.queue);
        let target = q.enqueued;
        if q.persisted < target {
            q.urgent = true;
            self.work.notify_one();
        }
        while q.persisted < target && q.failed.is_none() {
            q = self.done.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        match &q.failed {
            Some(e) => Err(StorageError::Persist(e.clone())),
            None => Ok(()),
        }
    }

    /// A `key` record not yet in sled.
    pub(crate) fn get(&self, key: &[u8]) -> Option<IVec> {
        if self.overlay_len.load(Ordering::SeqCst) == 0 {
            return None;
        }
        self.overlay
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// The `key` records of `range` not yet in sled. Read this before scanning sled: a record
    /// leaves the overlay only after it is in sled, so the two reads together miss nothing.
    pub(crate) fn range(&self, start: &[u8], end: &[u8]) -> Vec<(IVec, IVec)> {
        if self.overlay_len.load(Ordering::SeqCst) == 0 {
            return Vec::new();
        }
        self.overlay
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Writes what is queued and stops the thread. Idempotent.
    pub(crate) fn stop(&self) {
        lock(&self.queue).stop = true;
        self.work.notify_one();
        if let Some(h) = lock(&self.thread).take() {
            if h.join().is_err() {
                tracing::error!("the kv persister thread panicked");
            }
        }
    }

    fn run(&self, trees: SharedTrees) {
        let mut last: Option<Instant> = None;
        while let Some((sets, upto)) = self.next_group(last) {
            let started = Instant::now();
            last = Some(started);
            let res = write_group(&trees.read().unwrap_or_else(|p| p.into_inner()), &sets);
            crate::metrics::BACKEND_COMMIT.observe(started.elapsed());
            if res.is_ok() {
                // Only now may readers stop finding these records in the overlay.
                let mut ov = self.overlay.write().unwrap_or_else(|p| p.into_inner());
                for (k, _) in sets.iter().flat_map(|s| &s.keys) {
                    ov.remove(k);
                }
                self.overlay_len.store(ov.len(), Ordering::SeqCst);
            }
            let mut q = lock(&self.queue);
            match res {
                Ok(()) => {
                    q.persisted = upto;
                    let written: usize = sets.iter().map(WriteSet::bytes).sum();
                    q.bytes = q.bytes.saturating_sub(written);
                }
                Err(e) => {
                    tracing::error!(error = %e, "writing applied state to sled failed");
                    q.failed = Some(e.to_string());
                }
            }
            self.done.notify_all();
            if q.failed.is_some() {
                return;
            }
        }
    }

    /// Waits for the next group: lets it gather until [`GROUP_INTERVAL`] after the previous one
    /// started (`last`) unless someone waits for it, then takes everything queued and the count
    /// it brings `persisted` to. `None` once stopped with nothing left.
    fn next_group(&self, last: Option<Instant>) -> Option<(Vec<WriteSet>, u64)> {
        let mut q = lock(&self.queue);
        let due = last.map(|t| t + GROUP_INTERVAL);
        while let Some(wait) = due.and_then(|d| d.checked_duration_since(Instant::now())) {
            if q.urgent || q.stop || wait.is_zero() {
                break;
            }
            q = self
                .work
                .wait_timeout(q, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        while q.sets.is_empty() && !q.stop {
            q.idle = true;
            q = self.work.wait(q).unwrap_or_else(|p| p.into_inner());
            q.idle = false;
        }
        if q.sets.is_empty() {
            return None;
        }
        q.urgent = false;
        Some((std::mem::take(&mut q.sets), q.enqueued))
    }
}

/// Writes a group of write sets, in order, as one sled transaction with the newest consistent
/// index among them; their revisions go in blocks (see [`crate::key_tree`]).
fn write_group(trees: &Trees, sets: &[WriteSet]) -> Result<()> {
    let mut blocks = BlockWriter::default();
    for (k, v) in sets.iter().flat_map(|s| &s.keys) {
        blocks.push_single(k, v)?;
    }
    let mut keys = sled::Batch::default();
    for (k, v) in blocks.finish() {
        keys.insert(k, v);
    }
    let ci = sets.iter().rev().find_map(|s| s.consistent_index.as_ref());
    (&trees.key, &trees.meta, &trees.lease)
        .transaction(|(kt, mt, lt)| {
            kt.apply_batch(&keys)?;
            for set in sets {
                if let Some(b) = &set.lease {
                    lt.apply_batch(b)?;
                }
                if let Some(b) = &set.meta {
                    mt.apply_batch(b)?;
                }
            }
            if let Some(ci) = ci {
                mt.insert(schema::CONSISTENT_INDEX, ci.as_slice())?;
            }
            Ok::<_, ConflictableTransactionError<()>>(())
        })
        .map_err(|e| match e {
            TransactionError::Storage(e) => StorageError::Sled(e),
            TransactionError::Abort(()) => {
                StorageError::Corrupt("write transaction aborted".into())
            }
        })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_tree;
    use crate::revision::Revision;

    fn trees() -> (sled::Db, Trees) {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .expect("open sled");
        let t = Trees::open(&db).expect("trees");
        (db, t)
    }

    fn key(rev: u8) -> Vec<u8> {
        Revision::new(i64::from(rev), 0).to_bytes(false)
    }

    /// The revisions in sled.
    fn stored(t: &Trees) -> Vec<(Revision, IVec)> {
        key_tree::scan(&t.key, Revision::default(), None)
            .map(|r| r.map(|r| (r.rev, r.value)).expect("scan"))
            .collect()
    }

    fn set(rev: u8, ci: u8) -> WriteSet {
        let mut meta = sled::Batch::default();
        meta.insert(&b"m"[..], vec![rev]);
        WriteSet {
            keys: vec![(key(rev).into(), vec![rev, rev].into())],
            lease: None,
            meta: Some(meta),
            consistent_index: Some(vec![ci]),
        }
    }

    #[test]
    fn queued_records_are_readable_until_sled_has_them() {
        let (_db, t) = trees();
        let p = Persister::start(Arc::new(RwLock::new(t.clone()))).expect("start");
        for i in 1..=50u8 {
            p.enqueue(set(i, i)).expect("enqueue");
            // Readable at once, from the overlay or (already written) from sled.
            let got = p.get(&key(i)).or_else(|| {
                key_tree::get(&t.key, &t.hints, Revision::new(i64::from(i), 0)).expect("sled get")
            });
            assert_eq!(got.as_deref(), Some(&[i, i][..]));
        }
        // A range read of the overlay plus sled sees every record once.
        let mut seen: BTreeMap<IVec, IVec> = p.range(&key(0), &key(255)).into_iter().collect();
        for (rev, v) in stored(&t) {
            seen.entry(rev.to_bytes(false).into()).or_insert(v);
        }
        assert_eq!(seen.len(), 50);
        p.barrier().expect("barrier");
        assert_eq!(p.overlay_len.load(Ordering::SeqCst), 0);
        assert!(
            p.get(&key(7)).is_none(),
            "a written record leaves the overlay"
        );
        assert_eq!(stored(&t).len(), 50);
        // Later write sets win, and the marker is the newest one.
        assert_eq!(t.meta.get(b"m").expect("get").as_deref(), Some(&[50u8][..]));
        assert_eq!(
            t.meta
                .get(schema::CONSISTENT_INDEX)
                .expect("get")
                .as_deref(),
            Some(&[50u8][..])
        );
        p.stop();
    }

    /// Nobody asks for these writes: an idle persister is woken by the enqueue, a persister
    /// waiting out its group interval (not woken) writes when the interval ends.
    #[test]
    fn queued_sets_reach_sled_unasked() {
        let (_db, t) = trees();
        let p = Persister::start(Arc::new(RwLock::new(t.clone()))).expect("start");
        let written = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while stored(&t).len() < n {
                assert!(Instant::now() < deadline, "{n} records never reached sled");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // Long idle: the thread waits for work.
        std::thread::sleep(GROUP_INTERVAL * 2);
        p.enqueue(set(1, 1)).expect("enqueue");
        written(1);
        // Right after a group: the thread waits out the interval.
        p.enqueue(set(2, 2)).expect("enqueue");
        p.enqueue(set(3, 3)).expect("enqueue");
        written(3);
        assert_eq!(p.overlay_len.load(Ordering::SeqCst), 0);
        p.stop();
    }

    #[test]
    fn stop_writes_what_is_queued() {
        let (_db, t) = trees();
        let p = Persister::start(Arc::new(RwLock::new(t.clone()))).expect("start");
        for i in 1..=5u8 {
            p.enqueue(set(i, i)).expect("enqueue");
        }
        p.stop();
        assert_eq!(stored(&t).len(), 5);
        assert_eq!(
            t.meta
                .get(schema::CONSISTENT_INDEX)
                .expect("get")
                .as_deref(),
            Some(&[5u8][..])
        );
    }
}
