//! The MVCC store: key index in memory, every revision of every key in sled.
//!
//! Layout in sled (one `Db`, the trees named in [`schema`]):
//! - `key`: encoded [`Revision`] (+ tombstone mark) → protobuf `mvccpb.KeyValue`. Immutable once
//!   written; only compaction deletes from it.
//! - `lease`: lease ID → lease record (see [`crate::lease`]), changed in the same transaction as
//!   the revision that granted, revoked or checkpointed it.
//! - `meta`: the consistent index (an opaque blob the Raft layer hands in with every write, written
//!   in the same sled transaction as the data it covers) and the scheduled / finished compaction
//!   revisions.
//!
//! Invariants (etcd bug 13766 came from breaking the first two):
//! 1. The consistent index is written atomically with the data it produced.
//! 2. The in-memory key index and current revision change only after the write is queued for
//!    sled (see [`crate::persister`]): its records are readable from then on, and sled receives
//!    them in one transaction per group of applies, with the newest consistent index of the group.
//!    What readers see may be ahead of sled, never ahead of the Raft log it was applied from.
//! 3. Every request is checked completely before anything is written, so a refused request leaves
//!    no trace.
//! 4. The in-memory index is derived state: [`KvStore::open`] rebuilds it from the `key` tree.
//!
//! sled is not the durability boundary: its flush does not fsync on Linux. The Raft log is; after
//! a crash the Raft layer re-applies the log from the consistent index found here.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::RwLock;
use std::sync::RwLockReadGuard;
use std::time::Duration;

use bytes::Bytes;
use fetcd_proto::etcdserverpb::AlarmRequest;
use fetcd_proto::etcdserverpb::AlarmResponse;
use fetcd_proto::etcdserverpb::AlarmType;
use fetcd_proto::etcdserverpb::CompactionRequest;
use fetcd_proto::etcdserverpb::CompactionResponse;
use fetcd_proto::etcdserverpb::DeleteRangeRequest;
use fetcd_proto::etcdserverpb::DeleteRangeResponse;
use fetcd_proto::etcdserverpb::LeaseCheckpointRequest;
use fetcd_proto::etcdserverpb::LeaseCheckpointResponse;
use fetcd_proto::etcdserverpb::LeaseGrantRequest;
use fetcd_proto::etcdserverpb::LeaseGrantResponse;
use fetcd_proto::etcdserverpb::LeaseRevokeRequest;
use fetcd_proto::etcdserverpb::LeaseRevokeResponse;
use fetcd_proto::etcdserverpb::Member;
use fetcd_proto::etcdserverpb::PutRequest;
use fetcd_proto::etcdserverpb::PutResponse;
use fetcd_proto::etcdserverpb::RangeRequest;
use fetcd_proto::etcdserverpb::RangeResponse;
use fetcd_proto::etcdserverpb::ResponseHeader;
use fetcd_proto::etcdserverpb::TxnRequest;
use fetcd_proto::etcdserverpb::TxnResponse;
use fetcd_proto::etcdserverpb::WatchResponse;
use fetcd_proto::mvccpb::event::EventType;
use fetcd_proto::mvccpb::Event;
use fetcd_proto::mvccpb::KeyValue;
use fetcd_proto::wire::EncodedRangeResponse;
use prost::Message;
use sled::IVec;

use crate::alarm;
use crate::alarm::AlarmSet;
use crate::compactor;
use crate::compactor::Compactor;
use crate::compactor::ReadPins;
use crate::defrag;
use crate::key_index::KeyIndex;
use crate::key_tree;
use crate::kv::KeyRange;
use crate::kv::ReadView;
use crate::lease::Lease;
use crate::lease::LeaseIndex;
use crate::lease::LeaseStamp;
use crate::ops;
use crate::persister::Persister;
use crate::persister::Trees;
use crate::persister::WriteSet;
use crate::revision::Revision;
use crate::schema;
use crate::value_cache::ValueCache;
use crate::watch::CatchUp;
use crate::watch::EventBatch;
use crate::watch::SendOutcome;
use crate::watch::SharedEvent;
use crate::watch::WatchHub;
use crate::watch::WatchKey;
use crate::watch::WatchMessage;
use crate::watch::WatchSink;
use crate::watch::WatchSpec;
use crate::KvError;
use crate::Result;
use crate::StorageError;

/// sled's page cache. Its default (1 GiB) is what made fetcd's memory grow with the data: the
/// key index is in memory anyway, Ranges take their values from [`ValueCache`] first, and the
/// writes only touch the rightmost leaves of the `key` tree, so a small cache plus the OS page
/// cache serve reads as well. sled's accounting undercounts its decoded nodes (a heap profile
/// showed ~100 MiB of them under a 64 MiB cap). Measured with the value cache in place (kube mix
/// alone, 20k ops; peak RSS after loading 1M keys of 256 bytes): 32 MiB 5.8-5.9k ops/s, 309 MiB;
/// 16 MiB same speed, 295 MiB; 8 MiB same speed, 284 MiB. Before the value cache, 16 MiB cost
/// the kube mix 10-15 % (its list pages decoded sled nodes from disk again and again).
const CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// The stored key-values Ranges read recently ([`ValueCache`]); sized for the objects a
/// kube-apiserver lists again and again (its list pages reread the same prefixes).
const VALUE_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// A key in the index: a boxed slice, 8 bytes smaller than a `Vec` in every B-tree slot (the
/// index holds every key in memory).
pub(crate) type IndexKey = Box<[u8]>;

/// The index and the revisions it is valid for, published together so a reader never sees a
/// revision whose index changes are missing.
#[derive(Debug, Default)]
pub(crate) struct IndexState {
    pub(crate) keys: BTreeMap<IndexKey, KeyIndex>,
    /// The newest revision; 1 for an empty store, as in etcd.
    pub(crate) current: i64,
    /// Reads below this revision are refused; -1 before the first compaction.
    pub(crate) compact: i64,
    /// Leases and the keys attached to them.
    leases: LeaseIndex,
}

/// A change the store will write: one Raft entry's worth of KV work.
#[derive(Clone, Debug, PartialEq)]
pub enum WriteOp {
    /// Put one key.
    Put(PutRequest),
    /// Delete a key range.
    DeleteRange(DeleteRangeRequest),
    /// A transaction; may also be read-only.
    Txn(TxnRequest),
    /// Drop history below a revision.
    Compaction(CompactionRequest),
    /// Create a lease (its ID already chosen and its TTL already raised to the minimum by the
    /// proposer, so every member applies the same thing).
    LeaseGrant(LeaseGrantRequest, Option<LeaseStamp>),
    /// Delete a lease and, in one revision, every key attached to it.
    LeaseRevoke(LeaseRevokeRequest),
    /// Record the remaining TTL of leases, so it survives a leader change or restart.
    LeaseCheckpoint(LeaseCheckpointRequest, Option<LeaseStamp>),
    /// Record a member's name and URLs (cluster metadata; takes no revision).
    SetMember(Member),
    /// Forget a removed member's name and URLs.
    RemoveMember(u64),
    /// Raise or clear an alarm (see [`crate::alarm`]).
    Alarm(AlarmRequest),
    /// Nothing for the KV space (a Raft blank or membership entry), but its consistent index
    /// must still be recorded.
    Noop,
}

impl WriteOp {
    /// Whether applying this may hold its thread for long: it may touch many keys (a
    /// DeleteRange over a span, a Txn with a long read or such a delete, a lease revoke with its
    /// attached keys), or it waits for the persister (a compaction). The caller may want to run
    /// it where a long hold of the thread blocks nothing else.
    pub fn may_take_long(&self) -> bool {
        match self {
            WriteOp::DeleteRange(d) => ops::delete_may_take_long(d),
            WriteOp::Txn(t) => ops::txn_may_take_long(t),
            WriteOp::LeaseRevoke(_) | WriteOp::Compaction(_) => true,
            _ => false,
        }
    }
}

/// The answer to one [`WriteOp`].
#[derive(Clone, Debug, PartialEq)]
pub enum WriteResponse {
    /// Answer to [`WriteOp::Put`].
    Put(PutResponse),
    /// Answer to [`WriteOp::DeleteRange`].
    DeleteRange(DeleteRangeResponse),
    /// Answer to [`WriteOp::Txn`].
    Txn(TxnResponse),
    /// Answer to [`WriteOp::Compaction`].
    Compaction(CompactionResponse),
    /// Answer to [`WriteOp::LeaseGrant`].
    LeaseGrant(LeaseGrantResponse),
    /// Answer to [`WriteOp::LeaseRevoke`].
    LeaseRevoke(LeaseRevokeResponse),
    /// Answer to [`WriteOp::LeaseCheckpoint`].
    LeaseCheckpoint(LeaseCheckpointResponse),
    /// Answer to [`WriteOp::Alarm`].
    Alarm(AlarmResponse),
    /// Answer to [`WriteOp::Noop`].
    Noop,
}

/// Receives `(tree, key, value)` records from [`KvStore::export`].
pub type ExportSink<'a> = dyn FnMut(&str, &[u8], &[u8]) -> Result<()> + 'a;

/// Where a store opened from a path lives (see [`crate::defrag`]).
struct OnDisk {
    root: std::path::PathBuf,
    /// The generation in use and the last one a defragmentation started (never reused).
    generations: Mutex<(u64, u64)>,
}

/// The MVCC key-value store (etcd's `mvcc.store`).
pub struct KvStore {
    /// The sled database and its trees; replaced whole by [`KvStore::defragment`] (under the
    /// writer, after the persister drained), so every access goes through [`KvStore::trees`].
    db: RwLock<sled::Db>,
    trees: Arc<RwLock<Trees>>,
    /// Where the database lives, if it was opened from a path (needed to defragment).
    disk: Option<OnDisk>,
    /// Shared with the compaction thread, which compacts it a chunk of keys at a time.
    index: Arc<RwLock<IndexState>>,
    /// One writer at a time; writes are applied in Raft log order anyway.
    writer: Mutex<()>,
    /// Shared by readers that walk the `key` tree's history without the writer ([`KvStore::export`],
    /// HashKV): revisions up to the current one never change in sled except when deleted, so
    /// such a reader only has to keep deletions (compaction, snapshot install, defragmentation)
    /// out. Taken before the writer by whoever takes both.
    history: Arc<RwLock<()>>,
    /// Bumped when a snapshot install starts and again when it ends (under `history` and the
    /// writer), so it is odd while the trees are being replaced: compactions decided before are
    /// not run on what replaced the store, and a read that overlapped an install is run again
    /// (see [`KvStore::read_committed`]).
    epoch: Arc<AtomicU64>,
    /// Revisions that Ranges still loading values read at; compaction keeps their history.
    pins: Arc<ReadPins>,
    /// Deletes compacted revisions off the write path.
    compactor: Compactor,
    /// Watchers, notified at commit.
    hub: WatchHub,
    /// Active alarms, changed only after the sled write that stored them.
    alarms: RwLock<AlarmSet>,
    /// Writes committed write transactions to sled in groups, off the apply path.
    pub(crate) persister: Arc<Persister>,
    /// Decoded values of recently read revisions.
    values: ValueCache,
}

impl Drop for KvStore {
    fn drop(&mut self) {
        // Writes what is still queued and lets go of the trees (and so of sled's file lock).
        self.compactor.stop();
        self.persister.stop();
    }
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore").finish_non_exhaustive()
    }
}

impl KvStore {
    /// Opens the store in `db`, rebuilding the key index from the `key` tree and finishing a
    /// compaction that a crash interrupted.
    pub fn open(db: sled::Db) -> Result<Self> {
        Self::open_in(db, None)
    }

    fn open_in(db: sled::Db, disk: Option<OnDisk>) -> Result<Self> {
        let trees = Arc::new(RwLock::new(Trees::open(&db)?));
        let persister = Persister::start(trees.clone())?;
        let history: Arc<RwLock<()>> = Arc::default();
        let epoch: Arc<AtomicU64> = Arc::default();
        let index: Arc<RwLock<IndexState>> = Arc::default();
        let pins: Arc<ReadPins> = Arc::default();
        let compactor = Compactor::start(
            trees.clone(),
            index.clone(),
            history.clone(),
            epoch.clone(),
            pins.clone(),
        )?;
        let store = KvStore {
            db: RwLock::new(db),
            trees,
            disk,
            index,
            writer: Mutex::new(()),
            history,
            epoch,
            pins,
            compactor,
            hub: WatchHub::default(),
            alarms: RwLock::new(AlarmSet::new()),
            persister,
            values: ValueCache::new(VALUE_CACHE_BYTES),
        };
        store.restore()?;
        Ok(store)
    }

    /// Opens (or creates) a sled database at `path` and the store in it, after finishing or
    /// undoing a defragmentation that a crash interrupted (see [`crate::defrag`]). Waits (up to
    /// 10 s) for sled's file lock, which a member closed a moment ago in the same process may
    /// still hold.
    pub fn open_path(path: &std::path::Path) -> Result<Self> {
        let current = defrag::recover(path)?;
        let db = defrag::open_db(&defrag::generation_dir(path, current), CACHE_BYTES)?;
        let disk = OnDisk {
            root: path.to_path_buf(),
            generations: Mutex::new((current, current)),
        };
        Self::open_in(db, Some(disk))
    }

    /// Waits (up to `limit`) until no handle of the store at `path` is open any more, so that it
    /// can be opened again; false if one still is.
    pub fn wait_closed(path: &std::path::Path, limit: Duration) -> bool {
        defrag::wait_store_closed(path, limit)
    }

    /// The trees as they are now (a defragmentation replaces them; it waits for this guard).
    pub(crate) fn trees(&self) -> RwLockReadGuard<'_, Trees> {
        self.trees.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Rewrites the store into a fresh sled database holding only the live records and swaps it
    /// in, so the space compaction freed goes back to the file system (etcd's defragmentation of
    /// its bolt file; sled never shrinks its files itself). Writers wait meanwhile, as in etcd;
    /// readers go on. A store opened without a path only flushes.
    pub fn defragment(&self) -> Result<()> {
        let Some(disk) = &self.disk else {
            return self.flush();
        };
        // What compactions freed is deleted first (else it would be copied), and nothing is
        // deleted while the copy is made.
        self.compactor.wait(self.compact_revision());
        let history = self.write_history();
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.persister.barrier()?;
        let mut generations = disk.generations.lock().unwrap_or_else(|p| p.into_inner());
        let (current, last) = *generations;
        let next = last + 1;
        // A failed attempt's number is not reused: its database may still be closing.
        generations.1 = next;
        let (db, trees) = defrag::rewrite(&self.trees(), &disk.root, next, CACHE_BYTES)?;
        // Readers wait for the switch (they only ever hold the trees for one request).
        let old_trees = std::mem::replace(
            &mut *self.trees.write().unwrap_or_else(|p| p.into_inner()),
            trees,
        );
        let old_db =
            std::mem::replace(&mut *self.db.write().unwrap_or_else(|p| p.into_inner()), db);
        generations.0 = next;
        drop((old_trees, old_db));
        // Writers go on while the old generation's files are removed (which may wait for sled
        // to finish closing it).
        drop((generations, writer, history));
        defrag::remove_generation(&defrag::generation_dir(&disk.root, current));
        Ok(())
    }

    /// Rebuilds the in-memory state from sled (etcd's `restore` / `restoreIntoIndex`).
    fn restore(&self) -> Result<()> {
        let scheduled = self
            .read_meta_i64(schema::SCHEDULED_COMPACT_REV)?
            .unwrap_or(-1);
        let finished = self
            .read_meta_i64(schema::FINISHED_COMPACT_REV)?
            .unwrap_or(-1);
        let mut st = IndexState {
            keys: BTreeMap::new(),
            current: 1,
            compact: finished,
            leases: LeaseIndex::default(),
        };
        for item in self.trees().lease.iter() {
            let (k, v) = item?;
            let lease = Lease::decode(&k, &v)?;
            st.leases
                .publish(HashMap::from([(lease.id, Some(lease))]), HashMap::new());
        }
        // The lease of each live key is the one in its latest put.
        let mut key_lease: HashMap<Vec<u8>, i64> = HashMap::new();
        for item in key_tree::scan(&self.trees().key, Revision::default(), None) {
            let key_tree::Record {
                rev,
                tombstone,
                value,
            } = item?;
            let kv: IndexedKv = decode_stored(&value[..])?;
            st.current = st.current.max(rev.main);
            if tombstone || kv.lease == 0 {
                if !key_lease.is_empty() {
                    key_lease.remove(&kv.key);
                }
            } else {
                key_lease.insert(kv.key.clone(), kv.lease);
            }
            // One descent of the B-tree per record (prost decodes a key of 8 bytes or more into
            // an exact-size vector, which boxes without a copy).
            match st.keys.entry(kv.key.into_boxed_slice()) {
                Entry::Occupied(mut e) if tombstone => {
                    if e.get().is_live() {
                        e.get_mut().tombstone(rev);
                    }
                }
                Entry::Occupied(mut e) => {
                    e.get_mut().put(rev);
                }
                // A tombstone whose puts were compacted away says nothing.
                Entry::Vacant(_) if tombstone => {}
                Entry::Vacant(e) => {
                    let created = Revision::new(kv.create_revision, 0);
                    e.insert(KeyIndex::restore(created, rev, kv.version));
                }
            }
        }
        st.current = st.current.max(scheduled).max(finished);
        for (k, lease) in key_lease {
            st.leases.attach(k, lease);
        }
        *self.alarms.write().unwrap_or_else(|p| p.into_inner()) = alarm::load(&self.trees().meta)?;
        let leases = st.leases.leases.len();
        let keys = st.keys.len();
        let current = st.current;
        {
            let mut index = self.write_index();
            *index = st;
            // A Range of the replaced index may still be loading values; what it puts in the
            // cache carries the epoch it started in, which no later reader matches.
            self.values.clear();
        }
        self.hub.set_current(current);
        if scheduled > finished {
            // At open nothing else runs; on a snapshot install the caller holds the history.
            tracing::info!(scheduled, finished, "finishing interrupted compaction");
            self.write_index().compact = scheduled;
            let keep = compactor::compact_index(&self.index, scheduled);
            // Nothing to share the disk with yet: no pause between batches.
            let pacing = compactor::CompactionPacing {
                batch_limit: compactor::CompactionPacing::default().batch_limit,
                sleep: Duration::ZERO,
            };
            compactor::delete_compacted(&self.trees(), scheduled, &keep, pacing)?;
        }
        tracing::info!(
            keys,
            leases,
            revision = self.current_revision(),
            "mvcc store restored"
        );
        Ok(())
    }

    /// The newest revision.
    pub fn current_revision(&self) -> i64 {
        self.read_index().current
    }

    /// The revision of the last compaction (-1 if none).
    pub fn compact_revision(&self) -> i64 {
        self.read_index().compact
    }

    /// The consistent index last written with data: the Raft layer's opaque applied marker.
    pub fn consistent_index(&self) -> Result<Option<Vec<u8>>> {
        self.persister.barrier()?;
        Ok(self
            .trees()
            .meta
            .get(schema::CONSISTENT_INDEX)?
            .map(|v| v.to_vec()))
    }

    /// A lease, if it exists.
    pub fn lease(&self, id: i64) -> Option<Lease> {
        self.read_index()
            .leases
            .leases
            .get(&id)
            .map(|e| e.lease.clone())
    }

    /// The keys attached to a lease, in key order (empty if it does not exist).
    pub fn lease_keys(&self, id: i64) -> Vec<Vec<u8>> {
        self.read_index()
            .leases
            .leases
            .get(&id)
            .map(|e| e.keys.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every lease, in ID order.
    pub fn leases(&self) -> Vec<Lease> {
        let st = self.read_index();
        let mut out: Vec<Lease> = st.leases.leases.values().map(|e| e.lease.clone()).collect();
        out.sort_by_key(|l| l.id);
        out
    }

    /// Every member's recorded name and URLs, in id order.
    pub fn members(&self) -> Result<Vec<Member>> {
        self.persister.barrier()?;
        let mut out = Vec::new();
        for item in self.trees().meta.scan_prefix(schema::MEMBER_PREFIX) {
            let (_, v) = item?;
            out.push(
                Member::decode(v.as_ref())
                    .map_err(|e| StorageError::Corrupt(format!("bad member record: {e}")))?,
            );
        }
        Ok(out)
    }

    /// Changes whenever a lease is granted or revoked: lets the lessor skip reconciling its
    /// timers with the table when nothing changed.
    pub fn lease_epoch(&self) -> u64 {
        self.read_index().leases.epoch
    }

    /// Serves a Range at the current or a historical revision (never through Raft).
    pub fn range(&self, req: &RangeRequest) -> Result<std::result::Result<RangeResponse, KvError>> {
        self.read_planned(
            |view| ops::plan_range(view, req),
            || {},
            |plan, epoch| plan.finish(|rev| load_from(self, rev, epoch)),
        )
    }

    /// [`KvStore::range`] with the key-values as stored (encoded `mvccpb.KeyValue`s), which a
    /// server copies into its response without decoding and encoding them again.
    pub fn range_encoded(
        &self,
        req: &RangeRequest,
    ) -> Result<std::result::Result<EncodedRangeResponse, KvError>> {
        self.range_encoded_with(req, || {})
    }

    /// [`KvStore::range_encoded`], running `between` after each index walk and before the
    /// values are loaded (where tests race writes, compactions and installs with it).
    fn range_encoded_with(
        &self,
        req: &RangeRequest,
        between: impl FnMut(),
    ) -> Result<std::result::Result<EncodedRangeResponse, KvError>> {
        self.read_planned(
            |view| ops::plan_range(view, req),
            between,
            |plan, epoch| {
                plan.finish_encoded(
                    |rev| Ok(load_encoded_from(self, rev, epoch)?.0),
                    |rev| load_from(self, rev, epoch),
                )
            },
        )
    }

    /// Plans a read (its index walks) with `plan`, then has `finish` load the values, given
    /// the epoch the read started in. Only the walks hold the index lock when there are many
    /// values: loading them is most of a large Range's time (0.6 s for 300k keys, during which
    /// every write waited to publish), so from [`UNLOCKED_LOAD_FROM`] values on the lowest
    /// revision read is pinned instead, and no compaction deletes what is still to be loaded.
    fn read_planned<P: ops::ReadPlan, T>(
        &self,
        plan: impl Fn(&dyn ReadView) -> Result<std::result::Result<P, KvError>>,
        mut between: impl FnMut(),
        finish: impl Fn(P, u64) -> Result<T>,
    ) -> Result<std::result::Result<T, KvError>> {
        self.read_committed(|epoch| {
            let view = self.committed(epoch);
            let plan = match plan(&view)? {
                Ok(plan) => plan,
                Err(e) => return Ok(Err(e)),
            };
            let (rev, values) = plan.reads();
            let _guard = self.hold_for_load(view, rev, values);
            between();
            Ok(Ok(finish(plan, epoch)?))
        })
    }

    /// The committed state as of now, for a read that started in `epoch`.
    fn committed(&self, epoch: u64) -> CommittedView<'_> {
        CommittedView {
            st: self.read_index(),
            store: self,
            epoch,
        }
    }

    /// What keeps the values a read is about to load: from [`UNLOCKED_LOAD_FROM`] of them on,
    /// a pin of `rev` (the lowest revision it reads at) instead of `view`'s index lock; below,
    /// the lock itself, as a few values load faster than a pin is taken and released.
    fn hold_for_load<'a>(
        &'a self,
        view: CommittedView<'a>,
        rev: Option<i64>,
        values: usize,
    ) -> LoadGuard<'a> {
        match rev {
            Some(rev) if values >= UNLOCKED_LOAD_FROM => {
                let pin = self.pins.pin(rev);
                drop(view);
                LoadGuard::Pinned { _pin: pin }
            }
            _ => LoadGuard::Locked { _view: view },
        }
    }

    /// Serves a Txn that only reads (no put or delete in any branch) without taking the writer.
    /// Its Ranges load their values as [`KvStore::range`]'s do: without the index lock when
    /// there are many.
    pub fn read_txn(&self, req: &TxnRequest) -> Result<std::result::Result<TxnResponse, KvError>> {
        self.read_txn_with(req, || {})
    }

    /// [`KvStore::read_txn`], running `between` after the index walks (as
    /// [`KvStore::range_encoded_with`]).
    fn read_txn_with(
        &self,
        req: &TxnRequest,
        between: impl FnMut(),
    ) -> Result<std::result::Result<TxnResponse, KvError>> {
        self.read_planned(
            |view| ops::plan_read_txn(view, req),
            between,
            |plan, epoch| plan.finish(&mut |rev| load_from(self, rev, epoch)),
        )
    }

    /// Runs `read`, given the epoch it starts in, until no snapshot install overlapped it. An
    /// install clears and refills the trees while readers go on, so a read that crossed one
    /// may have seen neither the old store nor the new (even "indexed but not stored").
    fn read_committed<T>(&self, mut read: impl FnMut(u64) -> Result<T>) -> Result<T> {
        loop {
            let epoch = self.epoch.load(Ordering::SeqCst);
            if epoch % 2 == 1 {
                // An install is running, under the history lock: wait for it, not spin.
                drop(self.read_history());
                continue;
            }
            let res = read(epoch);
            if self.epoch.load(Ordering::SeqCst) == epoch {
                return res;
            }
        }
    }

    /// Applies write operations in order, each tagged with the consistent index to record with
    /// it. Returns one answer per operation; `Err` means storage failed and nothing after the
    /// last durable consistent index may be assumed applied.
    pub fn apply<I>(&self, ops_in: I) -> Result<Vec<std::result::Result<WriteResponse, KvError>>>
    where
        I: IntoIterator<Item = (WriteOp, Vec<u8>)>,
    {
        let guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let mut txn = WriteTxn::new(self, Some(guard));
        for (op, consistent_index) in ops_in {
            let refused =
                if alarm::refused_when_corrupt(&op) && txn.alarm_active(AlarmType::Corrupt) {
                    // etcd's corrupt applier: no write while CORRUPT is raised.
                    Some(KvError::Corrupt)
                } else if alarm::needs_space(&op) && txn.alarm_active(AlarmType::Nospace) {
                    // etcd's capped applier: nothing that grows the store while NOSPACE is raised.
                    Some(KvError::NoSpace)
                } else {
                    None
                };
            if let Some(e) = refused {
                txn.end_op();
                txn.consistent_index = Some(consistent_index);
                out.push(Err(e));
                continue;
            }
            let res = match op {
                WriteOp::Put(req) => ops::put(&mut txn, &req)?.map(WriteResponse::Put),
                WriteOp::DeleteRange(req) => {
                    ops::delete_range(&mut txn, &req)?.map(WriteResponse::DeleteRange)
                }
                WriteOp::Txn(req) => ops::txn(&mut txn, &req)?.map(WriteResponse::Txn),
                WriteOp::LeaseGrant(req, stamp) => {
                    ops::lease_grant(&mut txn, &req, stamp).map(WriteResponse::LeaseGrant)
                }
                WriteOp::LeaseRevoke(req) => {
                    ops::lease_revoke(&mut txn, &req)?.map(WriteResponse::LeaseRevoke)
                }
                WriteOp::LeaseCheckpoint(req, stamp) => Ok(WriteResponse::LeaseCheckpoint(
                    ops::lease_checkpoint(&mut txn, &req, stamp),
                )),
                WriteOp::SetMember(m) => {
                    txn.meta_batch.insert(member_key(m.id), m.encode_to_vec());
                    txn.meta_changed = true;
                    Ok(WriteResponse::Noop)
                }
                WriteOp::RemoveMember(id) => {
                    txn.meta_batch.remove(member_key(id));
                    txn.meta_changed = true;
                    Ok(WriteResponse::Noop)
                }
                WriteOp::Alarm(req) => Ok(WriteResponse::Alarm(txn.apply_alarm(&req))),
                WriteOp::Noop => Ok(WriteResponse::Noop),
                WriteOp::Compaction(req) => {
                    // Compaction rewrites the committed index: commit what is staged first.
                    let guard = txn.commit()?;
                    let res = self.compact(&req, &consistent_index)?;
                    txn = WriteTxn::new(self, guard);
                    if res.is_err() {
                        // A refused compaction wrote nothing; its index is recorded like a Noop's.
                        txn.consistent_index = Some(consistent_index);
                    }
                    out.push(res.map(WriteResponse::Compaction));
                    continue;
                }
            };
            txn.end_op();
            txn.consistent_index = Some(consistent_index);
            out.push(res);
        }
        txn.commit()?;
        Ok(out)
    }

    /// Compacts at `req.revision`. The caller holds the writer.
    fn compact(
        &self,
        req: &CompactionRequest,
        consistent_index: &[u8],
    ) -> Result<std::result::Result<CompactionResponse, KvError>> {
        let rev = req.revision;
        let current = {
            let st = self.read_index();
            if rev <= st.compact {
                return Ok(Err(KvError::Compacted));
            }
            if rev > st.current {
                return Ok(Err(KvError::FutureRevision));
            }
            st.current
        };
        // Everything applied before goes to sled first: the compaction writes sled directly.
        self.persister.barrier()?;
        // Schedule first, atomically with the consistent index: a crash after this point
        // finishes the compaction on restart instead of re-applying the entry.
        let mut batch = sled::Batch::default();
        batch.insert(schema::SCHEDULED_COMPACT_REV, &rev.to_be_bytes());
        batch.insert(schema::CONSISTENT_INDEX, consistent_index);
        self.trees().meta.apply_batch(batch)?;
        // Readers of older revisions are refused from now on; the index and the history are
        // compacted on the compaction thread.
        self.write_index().compact = rev;
        self.compactor
            .submit(rev, self.epoch.load(Ordering::SeqCst));
        Ok(Ok(CompactionResponse {
            header: Some(ops::header(current)),
        }))
    }

    /// Paces the deletions of later compactions (etcd's compaction batch limit and sleep
    /// interval flags).
    pub fn set_compaction_pacing(&self, pacing: compactor::CompactionPacing) {
        self.compactor.set_pacing(pacing);
    }

    /// Returns once the compactions decided up to `rev` are physically done (etcd's
    /// `physical` compaction request waits for this).
    pub fn wait_compaction(&self, rev: i64) {
        self.compactor.wait(rev)
    }

    /// Asks sled to write its buffers out. Not an fsync on Linux (sled 0.34); durability comes from
    /// the Raft log. Used before snapshots and on clean shutdown to shorten replay.
    pub fn flush(&self) -> Result<()> {
        self.persister.barrier()?;
        self.db.read().unwrap_or_else(|p| p.into_inner()).flush()?;
        Ok(())
    }

    /// Writes every tree this store owns as `(tree, key, value)` records, for Raft snapshots,
    /// as one consistent revision. Writers wait only while the current revision is fixed and the
    /// small `meta` and `lease` trees are copied, not while the history is read: a snapshot of
    /// a large store used to stall every write for as long as the export took (0.5 s at 200k
    /// keys). Later writes only add revisions above the fixed one, which the walk leaves out,
    /// and deletions wait for it (see `history`).
    pub fn export(&self, out: &mut ExportSink<'_>) -> Result<()> {
        let history = self.read_history();
        let (end, small, trees) = {
            let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            self.persister.barrier()?;
            let end = Revision::new(self.read_index().current.saturating_add(1), 0);
            let trees = self.trees();
            let mut small = Vec::new();
            for (name, tree) in [
                (schema::META_TREE, &trees.meta),
                (schema::LEASE_TREE, &trees.lease),
            ] {
                for item in tree.iter() {
                    let (k, v) = item?;
                    small.push((name, k, v));
                }
            }
            (end, small, trees)
        };
        // One record per revision, whatever this member's blocks: the receiver groups them
        // its own way, and members of earlier versions read them.
        for item in key_tree::scan(&trees.key, Revision::default(), Some(end)) {
            let r = item?;
            out(schema::KEY_TREE, &r.key(), &r.value)?;
        }
        for (name, k, v) in small {
            out(name, &k, &v)?;
        }
        drop(history);
        Ok(())
    }

    /// Keeps deletions out of the `key` tree's history while the guard lives.
    pub(crate) fn read_history(&self) -> RwLockReadGuard<'_, ()> {
        self.history.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_history(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.history.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the whole store with exported records (a Raft snapshot install) and rebuilds the
    /// index. `records` yields `(tree, key, value)`.
    pub fn import<I>(&self, records: I) -> Result<()>
    where
        I: IntoIterator<Item = Result<(String, Vec<u8>, Vec<u8>)>>,
    {
        let _history = self.write_history();
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        self.persister.barrier()?;
        // Compactions still queued were decided about what is being replaced, and reads
        // meanwhile are run again; odd until the guard is dropped, before the locks.
        let _installing = Installing::start(&self.epoch);
        {
            let trees = self.trees();
            trees.key.clear()?;
            trees.meta.clear()?;
            trees.lease.clear()?;
            let mut blocks = key_tree::BlockWriter::default();
            for rec in records {
                let (name, k, v) = rec?;
                match name.as_str() {
                    schema::KEY_TREE => blocks.push_single(&k, &v)?,
                    schema::META_TREE => {
                        trees.meta.insert(k, v)?;
                    }
                    schema::LEASE_TREE => {
                        trees.lease.insert(k, v)?;
                    }
                    other => return Err(StorageError::Corrupt(format!("unknown tree {other}"))),
                }
                for (k, v) in blocks.take_sealed() {
                    trees.key.insert(k, v)?;
                }
            }
            for (k, v) in blocks.finish() {
                trees.key.insert(k, v)?;
            }
        }
        self.restore()
    }

    /// Registers a watcher (inactive until [`KvStore::activate_watch`]); returns the revision its
    /// `created` response reports. The server queues `created` before activating, so no event
    /// can overtake it.
    pub fn watch(&self, key: WatchKey, spec: WatchSpec, sink: Arc<dyn WatchSink>) -> i64 {
        self.hub.register(key, spec, sink)
    }

    /// Starts delivery to a registered watcher: history first (if it starts in the past), then
    /// live events.
    pub fn activate_watch(&self, key: WatchKey) {
        self.hub.activate(key)
    }

    /// Removes a watcher; false if it was unknown.
    pub fn cancel_watch(&self, key: WatchKey) -> bool {
        self.hub.cancel(key)
    }

    /// Removes every watcher of a closed stream.
    pub fn cancel_watch_stream(&self, stream: u64) {
        self.hub.cancel_stream(stream)
    }

    /// A stream's progress request: the revision to report if all its watchers are synced,
    /// otherwise `None`, and the answer goes to `sink` once they are.
    pub fn request_progress(&self, stream: u64, sink: Arc<dyn WatchSink>) -> Option<i64> {
        self.hub.request_progress(stream, sink)
    }

    /// The revision for a periodic progress notification of one watcher, if it is synced.
    pub fn watcher_progress(&self, key: WatchKey) -> Option<i64> {
        self.hub.watcher_progress(key)
    }

    /// True while some watcher waits for history (or a progress answer for room).
    pub fn has_unsynced_watchers(&self) -> bool {
        self.hub.has_unsynced()
    }

    /// The watcher registry (sizes, for metrics and tests).
    pub fn watchers(&self) -> &WatchHub {
        &self.hub
    }

    /// One catch-up round (etcd's `syncWatchers`): every unsynced watcher gets up to
    /// `max_revisions` revisions of its history; a watcher that reaches the current revision
    /// turns synced; one behind the compaction revision is canceled with `compact_revision`.
    /// Returns how many watchers got something (0: every laggard waits for its client).
    pub fn sync_watchers(&self, max_revisions: i64) -> Result<usize> {
        let ws: Vec<CatchUp> = self.hub.unsynced();
        let mut progressed = 0;
        if !ws.is_empty() {
            // One read of the revision window serves every lagging watcher (etcd's
            // syncWatchers), instead of one scan per watcher.
            let current = self.current_revision();
            let first = |w: &CatchUp| {
                if w.min_rev < 0 {
                    current + 1
                } else {
                    w.min_rev
                }
            };
            let from = ws.iter().map(first).min().unwrap_or(current + 1);
            let to = current.min(from.saturating_add(max_revisions.max(1) - 1));
            // Shared, so each event is encoded once for all the watchers it goes to.
            let events: Vec<Arc<SharedEvent>> = self
                .history(None, from, to)?
                .into_iter()
                .map(SharedEvent::new)
                .collect();
            // Checked after reading: a compaction that started meanwhile may have removed part
            // of what was read, and then the watcher must be told, not handed a gap.
            let compact = self.compact_revision();
            let mut shared = SharedSelections::default();
            for w in &ws {
                if self.catch_up(w, &events, first(w), to, current, compact, &mut shared) {
                    progressed += 1;
                }
            }
        }
        self.hub.retry_progress();
        Ok(progressed)
    }

    /// One watcher's step of a catch-up round over `events` (revisions up to `to`); true if it
    /// moved forward.
    #[allow(clippy::too_many_arguments)]
    fn catch_up(
        &self,
        w: &CatchUp,
        events: &[Arc<SharedEvent>],
        from: i64,
        to: i64,
        current: i64,
        compact: i64,
        shared: &mut SharedSelections,
    ) -> bool {
        if w.min_rev > current {
            return self.hub.advance(w, w.min_rev);
        }
        if w.min_rev < compact {
            // etcd sends this one with header revision 0.
            let resp = WatchResponse {
                header: Some(ResponseHeader::default()),
                watch_id: w.key.id,
                compact_revision: compact,
                canceled: true,
                ..Default::default()
            };
            return match w.sink.try_send(WatchMessage::response(resp)) {
                SendOutcome::Full => false,
                SendOutcome::Sent | SendOutcome::Closed => {
                    self.hub.cancel_caught_up(w);
                    true
                }
            };
        }
        // Like etcd, a negative start revision reads no history.
        if w.min_rev < 0 {
            return self.hub.advance(w, current + 1);
        }
        if from > to {
            // Later than this round's window; a later round reaches it.
            return false;
        }
        let mine = shared.get_or_select(&w.spec, from, || {
            EventBatch::new(
                events
                    .iter()
                    .filter(|e| {
                        e.event().kv.as_ref().is_some_and(|kv| {
                            kv.mod_revision >= from && w.spec.range.contains(&kv.key)
                        }) && w.spec.wants_event(e)
                    })
                    .cloned()
                    .collect(),
            )
        });
        if !mine.is_empty() {
            let msg = WatchMessage::Events {
                watch_id: w.key.id,
                revision: current,
                events: mine,
            };
            match w.sink.try_send(msg) {
                SendOutcome::Sent => {}
                SendOutcome::Full => return false,
                SendOutcome::Closed => {
                    self.hub.cancel_caught_up(w);
                    return true;
                }
            }
        }
        self.hub.advance(w, to + 1)
    }

    /// The previous value a watch event reports as `prev_kv`: the key at `mod_revision - 1`
    /// (etcd's rule); `None` if there is none or it was compacted, as in etcd.
    pub fn watch_prev_kv(&self, ev: &Event) -> Option<KeyValue> {
        let kv = ev.kv.as_ref()?;
        let req = RangeRequest {
            key: kv.key.clone(),
            revision: kv.mod_revision - 1,
            ..Default::default()
        };
        match self.range(&req) {
            Ok(Ok(mut r)) => r.kvs.pop(),
            _ => None,
        }
    }

    /// The events of `range` (every key if `None`) in revisions `[from, to]`, in order, from the
    /// `key` tree.
    pub fn history(&self, range: Option<&KeyRange>, from: i64, to: i64) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        if from > to {
            return Ok(out);
        }
        let start = Revision::new(from.max(0), 0);
        let end = Revision::new(to.saturating_add(1), 0);
        // Queued records are read before sled (see `Persister::range`). sled receives groups in
        // revision order, so the queued records sled does not have are all after the last one it
        // has: sled's range, then the queued tail past it.
        let queued = self
            .persister
            .range(&start.to_bytes(false), &end.to_bytes(false));
        let mut last: Option<Revision> = None;
        for item in key_tree::scan(&self.trees().key, start, Some(end)) {
            let r = item?;
            push_history_event(&mut out, range, r.rev, r.tombstone, &r.value)?;
            last = Some(r.rev);
        }
        for (k, v) in queued {
            let (rev, tombstone) = key_tree::decode_single(&k)?;
            if last.is_none_or(|l| rev > l) {
                push_history_event(&mut out, range, rev, tombstone, &v)?;
            }
        }
        Ok(out)
    }

    fn read_meta_i64(&self, key: &str) -> Result<Option<i64>> {
        match self.trees().meta.get(key)? {
            None => Ok(None),
            Some(v) => {
                let b: [u8; 8] = v.as_ref().try_into().map_err(|_| {
                    StorageError::Corrupt(format!("meta {key} is {} bytes", v.len()))
                })?;
                Ok(Some(i64::from_be_bytes(b)))
            }
        }
    }

    /// The active alarms.
    pub(crate) fn alarm_set(&self) -> RwLockReadGuard<'_, AlarmSet> {
        self.alarms.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the writer: no apply or compaction runs until the guard is dropped.
    pub(crate) fn lock_writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn read_index(&self) -> RwLockReadGuard<'_, IndexState> {
        // A panic while holding the lock cannot leave the index half-updated: publication is a
        // sequence of whole-entry inserts after the sled commit. Keep serving.
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_index(&self) -> std::sync::RwLockWriteGuard<'_, IndexState> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn member_key(id: u64) -> Vec<u8> {
    let mut k = schema::MEMBER_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// A DELETE event as etcd reports it: the key and the deleting revision.
fn delete_event(key: Vec<u8>, rev: i64) -> Event {
    Event {
        r#type: EventType::Delete as i32,
        kv: Some(KeyValue {
            key,
            mod_revision: rev,
            ..Default::default()
        }),
        prev_kv: None,
    }
}

/// What the index rebuild needs of a stored `mvccpb.KeyValue`: the same field numbers without
/// the value (field 5), which prost then skips instead of allocating and copying it for every
/// stored revision of a restart.
#[derive(Clone, PartialEq, prost::Message)]
struct IndexedKv {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(int64, tag = "2")]
    create_revision: i64,
    #[prost(int64, tag = "4")]
    version: i64,
    #[prost(int64, tag = "6")]
    lease: i64,
}

/// A stored `key` tree record as `M` (the whole [`KeyValue`], or [`IndexedKv`]).
fn decode_stored<M: Message + Default>(v: impl bytes::Buf) -> Result<M> {
    M::decode(v).map_err(|e| StorageError::Corrupt(format!("bad key-value: {e}")))
}

/// Appends the event a `key` tree record stands for, if its key is in `range`.
fn push_history_event(
    out: &mut Vec<Event>,
    range: Option<&KeyRange>,
    rev: Revision,
    tombstone: bool,
    v: &[u8],
) -> Result<()> {
    let kv = decode_stored::<KeyValue>(v)?;
    if range.is_some_and(|r| !r.contains(&kv.key)) {
        return Ok(());
    }
    out.push(if tombstone {
        delete_event(kv.key, rev.main)
    } else {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(kv),
            prev_kv: None,
        }
    });
    Ok(())
}

/// Keeps the store's epoch odd while a snapshot install replaces the trees, whether it ends
/// well or not (an epoch left odd would make every read wait).
struct Installing<'a>(&'a AtomicU64);

impl<'a> Installing<'a> {
    fn start(epoch: &'a AtomicU64) -> Self {
        epoch.fetch_add(1, Ordering::SeqCst);
        Installing(epoch)
    }
}

impl Drop for Installing<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// The stored key-value at `rev`: queued for sled, or in it. `epoch` is the store's epoch when
/// the reader started.
fn load_from(store: &KvStore, rev: Revision, epoch: u64) -> Result<KeyValue> {
    let (kv, decoded) = load_encoded_from(store, rev, epoch)?;
    match decoded {
        Some(kv) => Ok(kv),
        None => decode_stored(kv),
    }
}

/// The stored key-value at `rev` as encoded, from the value cache or else from the persister's
/// queue or sled; then it is decoded once (also returned) so that nothing corrupt is cached.
fn load_encoded_from(
    store: &KvStore,
    rev: Revision,
    epoch: u64,
) -> Result<(Bytes, Option<KeyValue>)> {
    if let Some(kv) = store.values.get(rev, epoch) {
        return Ok((kv, None));
    }
    let v = match store.persister.get(&rev.to_bytes(false)) {
        Some(v) => v,
        None => {
            let trees = store.trees();
            key_tree::get(&trees.key, &trees.hints, rev)?
        }
        .ok_or_else(|| {
            StorageError::Corrupt(format!("revision {rev:?} is indexed but not stored"))
        })?,
    };
    let encoded = Bytes::copy_from_slice(&v);
    let kv = decode_stored::<KeyValue>(encoded.clone())?;
    store.values.insert(rev, epoch, encoded.clone());
    Ok((encoded, Some(kv)))
}

/// From how many values on a Range loads them after letting go of the key index (a hundred take
/// ~0.1 ms; a list page of 500 Kubernetes objects about 1 ms).
const UNLOCKED_LOAD_FROM: usize = 100;

/// Held while a read loads its values (see [`KvStore::hold_for_load`]).
enum LoadGuard<'a> {
    Locked { _view: CommittedView<'a> },
    Pinned { _pin: compactor::ReadPin<'a> },
}

/// The committed state, as plain reads see it.
struct CommittedView<'a> {
    st: RwLockReadGuard<'a, IndexState>,
    store: &'a KvStore,
    /// The store's epoch when the read started.
    epoch: u64,
}

impl ReadView for CommittedView<'_> {
    fn rev(&self) -> i64 {
        self.st.current
    }

    fn compact_rev(&self) -> i64 {
        self.st.compact
    }

    fn for_each_key(&self, range: &KeyRange, f: &mut dyn FnMut(&[u8], &KeyIndex) -> bool) {
        if let KeyRange::Single(key) = range {
            // One descent of the index where a range takes two (its two ends): every get, and
            // every Txn's compare, is one key.
            if let Some((k, ki)) = self.st.keys.get_key_value::<[u8]>(key) {
                f(k, ki);
            }
            return;
        }
        let Some(bounds) = range.bounds() else {
            return;
        };
        for (k, ki) in self.st.keys.range::<[u8], _>(bounds) {
            if !f(k, ki) {
                break;
            }
        }
    }

    fn load(&self, rev: Revision) -> Result<KeyValue> {
        load_from(self.store, rev, self.epoch)
    }

    fn lease_exists(&self, id: i64) -> bool {
        self.st.leases.leases.contains_key(&id)
    }
}

/// A write transaction over the committed state (etcd's `storeTxnWrite`): changes are staged in
/// an overlay of key-index entries and a sled batch, visible to later reads of the same
/// transaction, and published only by [`WriteTxn::commit`].
///
/// One `WriteTxn` may carry several operations (a batch of Raft entries); each operation that
/// changes something takes the next main revision.
pub(crate) struct WriteTxn<'a> {
    store: &'a KvStore,
    /// The store's epoch when the transaction started.
    epoch: u64,
    base: Option<RwLockReadGuard<'a, IndexState>>,
    writer: Option<MutexGuard<'a, ()>>,
    overlay: BTreeMap<IndexKey, KeyIndex>,
    staged: HashMap<Revision, KeyValue>,
    /// New `key` tree records (revision → key-value).
    batch: Vec<(IVec, IVec)>,
    /// The revision the current operation started from.
    begin_rev: i64,
    /// Changes of the current operation; their count is the next sub revision.
    changes: usize,
    /// Events of the current operation (one revision).
    events: Vec<Event>,
    /// Events of the operations already ended, per revision, for the watchers at commit.
    revisions: Vec<(i64, Vec<Event>)>,
    consistent_index: Option<Vec<u8>>,
    /// Leases granted, checkpointed (`Some`) or revoked (`None`) by this transaction.
    lease_overlay: HashMap<i64, Option<Lease>>,
    /// Keys whose lease this transaction changed (0 = detached).
    key_lease_overlay: HashMap<Vec<u8>, i64>,
    /// The `lease` tree writes matching `lease_overlay`.
    lease_batch: sled::Batch,
    /// `meta` tree writes: cluster metadata and the alarms of `alarm_overlay`.
    meta_batch: sled::Batch,
    meta_changed: bool,
    /// The alarms as of this transaction, once an alarm request touched them.
    alarm_overlay: Option<AlarmSet>,
}

impl<'a> WriteTxn<'a> {
    fn new(store: &'a KvStore, writer: Option<MutexGuard<'a, ()>>) -> Self {
        let epoch = store.epoch.load(Ordering::SeqCst);
        let base = store.read_index();
        let begin_rev = base.current;
        WriteTxn {
            store,
            epoch,
            base: Some(base),
            writer,
            overlay: BTreeMap::new(),
            staged: HashMap::new(),
            batch: Vec::new(),
            begin_rev,
            changes: 0,
            events: Vec::new(),
            revisions: Vec::new(),
            consistent_index: None,
            lease_overlay: HashMap::new(),
            key_lease_overlay: HashMap::new(),
            lease_batch: sled::Batch::default(),
            meta_batch: sled::Batch::default(),
            meta_changed: false,
            alarm_overlay: None,
        }
    }

    /// True if an alarm of type `alarm` is active as of this transaction.
    fn alarm_active(&self, alarm: AlarmType) -> bool {
        match &self.alarm_overlay {
            Some(set) => alarm::has_alarm(set, alarm),
            None => alarm::has_alarm(&self.store.alarm_set(), alarm),
        }
    }

    /// Stages an alarm change (no revision, like etcd's alarm store).
    fn apply_alarm(&mut self, req: &AlarmRequest) -> AlarmResponse {
        let mut set = match self.alarm_overlay.take() {
            Some(s) => s,
            None => self.store.alarm_set().clone(),
        };
        let (resp, changed) = alarm::apply(&mut set, req);
        if changed {
            let key = alarm::alarm_key(req.member_id, req.alarm);
            if set.contains(&(req.member_id, req.alarm)) {
                self.meta_batch.insert(key, &[][..]);
            } else {
                self.meta_batch.remove(key);
            }
            self.meta_changed = true;
        }
        self.alarm_overlay = Some(set);
        resp
    }

    fn base(&self) -> &IndexState {
        // Present from `new` until `commit` consumes the transaction.
        match &self.base {
            Some(b) => b,
            None => unreachable!("WriteTxn used after commit"),
        }
    }

    /// The revision the current operation's writes get.
    fn write_rev(&self) -> i64 {
        self.begin_rev + 1
    }

    fn key_index_mut(&mut self, key: &[u8]) -> &mut KeyIndex {
        if !self.overlay.contains_key(key) {
            let ki = self.base().keys.get(key).cloned().unwrap_or_default();
            self.overlay.insert(key.into(), ki);
        }
        // Looked up by the borrowed key: `entry` would box the key again on every change.
        match self.overlay.get_mut(key) {
            Some(ki) => ki,
            None => unreachable!("inserted above"),
        }
    }

    /// Stages a put of `key` and returns its revision (etcd's `storeTxnWrite.put`).
    pub(crate) fn put(&mut self, key: &[u8], value: Bytes, lease: i64) -> i64 {
        let rev = Revision::new(self.write_rev(), self.changes as i64);
        let (created, version) = self.key_index_mut(key).put(rev);
        let created = created.main;
        self.set_key_lease(key, lease);
        let kv = KeyValue {
            key: key.to_vec(),
            create_revision: created,
            mod_revision: rev.main,
            version,
            value,
            lease,
        };
        self.batch
            .push((rev.to_bytes(false).into(), kv.encode_to_vec().into()));
        self.events.push(Event {
            r#type: EventType::Put as i32,
            kv: Some(kv.clone()),
            prev_kv: None,
        });
        self.staged.insert(rev, kv);
        self.changes += 1;
        rev.main
    }

    /// Stages deletes of every key of `range` live now; returns how many.
    pub(crate) fn delete_range(&mut self, range: &KeyRange) -> i64 {
        let at = self.rev();
        let mut keys = Vec::new();
        self.for_each_key(range, &mut |k, ki| {
            if ki.get(at).is_some() {
                keys.push(k.to_vec());
            }
            true
        });
        for key in &keys {
            let rev = Revision::new(self.write_rev(), self.changes as i64);
            self.key_index_mut(key).tombstone(rev);
            self.set_key_lease(key, 0);
            let kv = KeyValue {
                key: key.clone(),
                ..Default::default()
            };
            self.batch
                .push((rev.to_bytes(true).into(), kv.encode_to_vec().into()));
            self.events.push(delete_event(key.clone(), rev.main));
            self.changes += 1;
        }
        keys.len() as i64
    }

    /// The lease `key` is attached to as of this transaction (0 = none).
    fn key_lease(&self, key: &[u8]) -> i64 {
        match self.key_lease_overlay.get(key) {
            Some(l) => *l,
            None => self.base().leases.key_lease.get(key).copied().unwrap_or(0),
        }
    }

    fn set_key_lease(&mut self, key: &[u8], lease: i64) {
        if self.key_lease(key) != lease {
            self.key_lease_overlay.insert(key.to_vec(), lease);
        }
    }

    /// A lease as of this transaction.
    pub(crate) fn lease(&self, id: i64) -> Option<Lease> {
        match self.lease_overlay.get(&id) {
            Some(l) => l.clone(),
            None => self.base().leases.leases.get(&id).map(|e| e.lease.clone()),
        }
    }

    /// Stages a lease record (grant or checkpoint).
    pub(crate) fn put_lease(&mut self, lease: Lease) {
        self.lease_batch
            .insert(&Lease::tree_key(lease.id), lease.encode());
        self.lease_overlay.insert(lease.id, Some(lease));
    }

    /// Stages the removal of a lease record (its keys are deleted by the caller).
    pub(crate) fn remove_lease(&mut self, id: i64) {
        self.lease_batch.remove(&Lease::tree_key(id));
        self.lease_overlay.insert(id, None);
    }

    /// The keys attached to lease `id` as of this transaction, in key order.
    pub(crate) fn lease_keys(&self, id: i64) -> Vec<Vec<u8>> {
        let mut keys: std::collections::BTreeSet<Vec<u8>> = self
            .base()
            .leases
            .leases
            .get(&id)
            .map(|e| {
                e.keys
                    .iter()
                    .filter(|k| !self.key_lease_overlay.contains_key(*k))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        keys.extend(
            self.key_lease_overlay
                .iter()
                .filter(|(_, l)| **l == id)
                .map(|(k, _)| k.clone()),
        );
        keys.into_iter().collect()
    }

    /// True if this transaction changed leases or attachments: it must be written and published
    /// even when no key changed (a grant or checkpoint takes no revision, as in etcd).
    fn lease_changed(&self) -> bool {
        !self.lease_overlay.is_empty() || !self.key_lease_overlay.is_empty()
    }

    /// Closes the current operation: if it changed anything, the revision advances.
    fn end_op(&mut self) {
        if self.changes > 0 {
            self.begin_rev += 1;
            self.changes = 0;
            self.revisions
                .push((self.begin_rev, std::mem::take(&mut self.events)));
        }
    }

    /// Queues the staged records and the consistent index for sled (one atomic group, see
    /// [`crate::persister`]), then publishes the index changes. Returns the writer guard for
    /// reuse.
    fn commit(mut self) -> Result<Option<MutexGuard<'a, ()>>> {
        self.end_op();
        let store = self.store;
        let lease_changed = self.lease_changed();
        if !self.batch.is_empty()
            || self.consistent_index.is_some()
            || lease_changed
            || self.meta_changed
        {
            store.persister.enqueue(WriteSet {
                keys: std::mem::take(&mut self.batch),
                lease: lease_changed.then(|| std::mem::take(&mut self.lease_batch)),
                meta: self
                    .meta_changed
                    .then(|| std::mem::take(&mut self.meta_batch)),
                consistent_index: self.consistent_index.take(),
            })?;
        }
        // Only now, with the records readable (queued or in sled), does anyone get to see them.
        drop(self.base.take());
        if let Some(set) = self.alarm_overlay.take() {
            *store.alarms.write().unwrap_or_else(|p| p.into_inner()) = set;
        }
        if !self.overlay.is_empty() || self.begin_rev != store.current_revision() || lease_changed {
            let mut st = store.write_index();
            for (k, mut ki) in std::mem::take(&mut self.overlay) {
                // The compaction thread may have compacted this key since it was read: publish
                // it compacted too, or the revisions it deleted would come back into the index.
                if ki.needs_compaction(st.compact) {
                    ki.compact(st.compact, &mut HashSet::new());
                    if ki.is_empty() {
                        st.keys.remove(&k);
                        continue;
                    }
                }
                st.keys.insert(k, ki);
            }
            st.leases.publish(
                std::mem::take(&mut self.lease_overlay),
                std::mem::take(&mut self.key_lease_overlay),
            );
            st.current = self.begin_rev;
            // Still under the index lock: watchers get revision R before any reader sees R.
            for (rev, events) in std::mem::take(&mut self.revisions) {
                store.hub.notify(rev, events);
            }
        }
        Ok(self.writer.take())
    }
}

impl ReadView for WriteTxn<'_> {
    fn rev(&self) -> i64 {
        if self.changes > 0 {
            self.begin_rev + 1
        } else {
            self.begin_rev
        }
    }

    fn compact_rev(&self) -> i64 {
        self.base().compact
    }

    fn for_each_key(&self, range: &KeyRange, f: &mut dyn FnMut(&[u8], &KeyIndex) -> bool) {
        if let KeyRange::Single(key) = range {
            // As for the committed view; this transaction's own entry shadows the committed one.
            let found = self
                .overlay
                .get_key_value::<[u8]>(key)
                .or_else(|| self.base().keys.get_key_value::<[u8]>(key));
            if let Some((k, ki)) = found {
                f(k, ki);
            }
            return;
        }
        let Some(bounds) = range.bounds() else {
            return;
        };
        let mut base = self.base().keys.range::<[u8], _>(bounds).peekable();
        let mut over = self.overlay.range::<[u8], _>(bounds).peekable();
        loop {
            let next = match (base.peek(), over.peek()) {
                (None, None) => break,
                (Some(_), None) => base.next(),
                (None, Some(_)) => over.next(),
                (Some((bk, _)), Some((ok, _))) => match bk.cmp(ok) {
                    std::cmp::Ordering::Less => base.next(),
                    std::cmp::Ordering::Greater => over.next(),
                    std::cmp::Ordering::Equal => {
                        base.next();
                        over.next()
                    }
                },
            };
            if let Some((k, ki)) = next {
                if !f(k, ki) {
                    break;
                }
            }
        }
    }

    fn load(&self, rev: Revision) -> Result<KeyValue> {
        match self.staged.get(&rev) {
            Some(kv) => Ok(kv.clone()),
            None => load_from(self.store, rev, self.epoch),
        }
    }

    fn lease_exists(&self, id: i64) -> bool {
        self.lease(id).is_some()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod testing {
    use fetcd_proto::etcdserverpb::PutRequest;

    use super::*;

    /// A store in a temporary sled database.
    pub(crate) fn store() -> KvStore {
        KvStore::open(sled::Config::new().temporary(true).open().unwrap()).unwrap()
    }

    /// Runs `f` on the store's committed state.
    pub(crate) fn with_committed<R>(s: &KvStore, f: impl FnOnce(&dyn ReadView) -> R) -> R {
        f(&s.committed(s.epoch.load(Ordering::SeqCst)))
    }

    /// Applies a plain Put.
    pub(crate) fn put(s: &KvStore, key: &str, value: &str) {
        let req = PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        };
        s.apply([(WriteOp::Put(req), b"ci".to_vec())]).unwrap();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod range_tests {
    use std::sync::mpsc;

    use fetcd_proto::etcdserverpb::range_request::SortOrder;
    use fetcd_proto::etcdserverpb::range_request::SortTarget;
    use fetcd_proto::mvccpb::KeyValue;
    use prost::Message;

    use super::testing::put;
    use super::testing::store;
    use super::*;

    /// Puts `k000`, `k001`, ... with `value`: enough keys for a Range to load its values
    /// without the index lock.
    fn fill(s: &KvStore, value: &str) {
        for i in 0..UNLOCKED_LOAD_FROM {
            put(s, &format!("k{i:03}"), value);
        }
    }

    fn all(revision: i64) -> RangeRequest {
        RangeRequest {
            key: vec![0],
            range_end: vec![0],
            revision,
            ..Default::default()
        }
    }

    /// Applies a compaction at `rev`, which must be accepted.
    fn compact(s: &KvStore, rev: i64) {
        let req = CompactionRequest {
            revision: rev,
            physical: false,
        };
        s.apply([(WriteOp::Compaction(req), b"ci".to_vec())])
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
    }

    /// Whether revision `rev` is still in sled.
    fn stored(s: &KvStore, rev: i64) -> bool {
        s.flush().unwrap();
        let trees = s.trees();
        key_tree::get(&trees.key, &trees.hints, Revision::new(rev, 0))
            .unwrap()
            .is_some()
    }

    /// Ranges `req` with `race` run once, after the first index walk; returns the answer and
    /// the number of walks.
    fn range_racing(
        s: &KvStore,
        req: &RangeRequest,
        race: impl FnOnce(),
    ) -> (EncodedRangeResponse, usize) {
        let mut race = Some(race);
        let mut walks = 0;
        let resp = s
            .range_encoded_with(req, || {
                walks += 1;
                if let Some(race) = race.take() {
                    race();
                }
            })
            .unwrap()
            .unwrap();
        (resp, walks)
    }

    /// (key, value, mod_revision) of each key-value of a response.
    fn kvs(resp: &EncodedRangeResponse) -> Vec<(String, String, i64)> {
        resp.kvs
            .iter()
            .map(|b| {
                let kv = KeyValue::decode(b.clone()).unwrap();
                (
                    String::from_utf8(kv.key).unwrap(),
                    String::from_utf8(kv.value.to_vec()).unwrap(),
                    kv.mod_revision,
                )
            })
            .collect()
    }

    /// Puts `key` from another thread, which must get through while a Range loads its values:
    /// that needs no lock a writer waits for.
    fn put_through(s: &Arc<KvStore>, key: &str) {
        let (tx, rx) = mpsc::channel();
        let (w, key) = (s.clone(), key.to_string());
        std::thread::spawn(move || {
            put(&w, &key, "2");
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "a write waited for a Range loading its values"
        );
    }

    #[test]
    fn a_write_publishes_while_a_range_loads_its_values() {
        let s = Arc::new(store());
        fill(&s, "1"); // 2..=101
        let (resp, _) = range_racing(&s, &all(0), || put_through(&s, "a")); // 102
                                                                            // The Range answers as of its walk, without the write it let through.
        assert_eq!(resp.header.as_ref().map(|h| h.revision), Some(101));
        assert_eq!(resp.count as usize, UNLOCKED_LOAD_FROM);
        assert_eq!(kvs(&resp).first(), Some(&("k000".into(), "1".into(), 2)));
        assert_eq!(s.current_revision(), 102);
    }

    #[test]
    fn a_write_publishes_while_a_sorted_keys_only_range_loads_its_values() {
        let s = Arc::new(store());
        fill(&s, "1"); // 2..=101
        let req = RangeRequest {
            keys_only: true,
            sort_order: SortOrder::Descend as i32,
            sort_target: SortTarget::Mod as i32,
            limit: 3,
            ..all(0)
        };
        let (resp, _) = range_racing(&s, &req, || put_through(&s, "k050")); // 102
        assert_eq!(
            kvs(&resp),
            vec![
                ("k099".into(), "".into(), 101),
                ("k098".into(), "".into(), 100),
                ("k097".into(), "".into(), 99)
            ]
        );
        assert!(resp.more);
        assert_eq!(resp.count as usize, UNLOCKED_LOAD_FROM);
    }

    #[test]
    fn a_write_publishes_while_a_read_only_txn_loads_its_values() {
        use fetcd_proto::etcdserverpb::request_op::Request;
        use fetcd_proto::etcdserverpb::response_op::Response;
        use fetcd_proto::etcdserverpb::RequestOp;

        let s = Arc::new(store());
        fill(&s, "1"); // 2..=101
        let range = |r: RangeRequest| RequestOp {
            request: Some(Request::RequestRange(r)),
        };
        // A nested Txn's Range at an older revision, after one of the whole store.
        let nested = TxnRequest {
            success: vec![range(all(50))],
            ..Default::default()
        };
        let req = TxnRequest {
            success: vec![
                range(all(0)),
                RequestOp {
                    request: Some(Request::RequestTxn(nested)),
                },
            ],
            ..Default::default()
        };
        let mut raced = false;
        let resp = s
            .read_txn_with(&req, || {
                if !std::mem::replace(&mut raced, true) {
                    put_through(&s, "k000"); // 102
                }
            })
            .unwrap()
            .unwrap();
        assert!(resp.succeeded);
        assert_eq!(resp.header.as_ref().map(|h| h.revision), Some(101));
        let counts: Vec<i64> = resp
            .responses
            .iter()
            .map(|op| match &op.response {
                Some(Response::ResponseRange(r)) => r.count,
                Some(Response::ResponseTxn(t)) => match &t.responses[0].response {
                    Some(Response::ResponseRange(r)) => r.count,
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(counts, vec![100, 49]);
        assert_eq!(s.current_revision(), 102);
    }

    #[test]
    fn a_compaction_keeps_what_a_range_loading_its_values_reads() {
        let s = store();
        s.set_compaction_pacing(compactor::CompactionPacing {
            batch_limit: 1,
            sleep: Duration::ZERO,
        });
        put(&s, "a", "1"); // 2
        fill(&s, "1"); // 3..=102
        put(&s, "a", "2"); // 103: revision 2 is garbage once compacted at 103
        let (resp, _) = range_racing(&s, &all(102), || {
            compact(&s, 103);
            // Give the compaction thread the time it takes to delete revision 2 if nothing
            // holds it back.
            for _ in 0..50 {
                if !stored(&s, 2) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(stored(&s, 2), "revision 2 deleted under a Range reading it");
        });
        let got = kvs(&resp);
        assert_eq!(got.len(), UNLOCKED_LOAD_FROM + 1);
        assert_eq!(got.first(), Some(&("a".into(), "1".into(), 2)));
        // Once the Range is done the compaction goes on, and later Ranges at 102 are refused.
        s.wait_compaction(103);
        assert!(!stored(&s, 2));
        assert!(matches!(
            s.range_encoded(&all(102)).unwrap(),
            Err(KvError::Compacted)
        ));
    }

    #[test]
    fn a_compaction_run_after_a_later_one_was_decided_keeps_what_a_range_reads() {
        let s = store();
        put(&s, "a", "1"); // 2
        fill(&s, "1"); // 3..=102
        put(&s, "a", "2"); // 103
        put(&s, "b", "1"); // 104
        let (resp, _) = range_racing(&s, &all(102), || {
            // Both compactions are decided before the thread runs the first: the Range at
            // 102 is not below 50, but it is below 104.
            let history = s.read_history();
            compact(&s, 50);
            compact(&s, 104);
            // Published compacted at 104, `a` no longer lists revision 2, so the thread's
            // walk for 50 does not keep it.
            put(&s, "a", "3"); // 105
            drop(history);
            for _ in 0..50 {
                if !stored(&s, 2) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(stored(&s, 2), "revision 2 deleted under a Range reading it");
        });
        assert_eq!(kvs(&resp).first(), Some(&("a".into(), "1".into(), 2)));
        s.wait_compaction(104);
        assert!(!stored(&s, 2));
    }

    #[test]
    fn a_range_that_crossed_a_snapshot_install_is_served_by_what_was_installed() {
        let donor = store();
        fill(&donor, "donor"); // 2..=101
        let mut records = Vec::new();
        donor
            .export(&mut |t, k, v| {
                records.push((t.to_string(), k.to_vec(), v.to_vec()));
                Ok(())
            })
            .unwrap();

        let s = store();
        put(&s, "a", "old"); // 2
        fill(&s, "old"); // 3..=102
                         // What the walk found is gone once the install returns.
        let (resp, walks) = range_racing(&s, &all(0), || {
            s.import(records.into_iter().map(Ok)).unwrap();
        });
        assert_eq!(walks, 2, "the Range was not run again after the install");
        assert_eq!(resp.header.as_ref().map(|h| h.revision), Some(101));
        let got = kvs(&resp);
        assert_eq!(got.len(), UNLOCKED_LOAD_FROM);
        assert!(got.iter().all(|(_, v, _)| v == "donor"), "{got:?}");
    }
}

/// One catch-up round's selections of history, shared between lagging watchers that want the
/// same events: thousands of watchers of one key (an apiserver's, a controller's) would each
/// filter the whole window and hold their own list of the same events otherwise.
#[derive(Default)]
struct SharedSelections {
    /// The latest used last.
    recent: Vec<Selection>,
}

/// What a watcher asked, from which revision, and the events that selected.
struct Selection {
    spec: Arc<WatchSpec>,
    from: i64,
    events: Arc<EventBatch>,
}

impl SharedSelections {
    /// Different wants kept at once; past that, the least recently used one is forgotten (its
    /// watchers then select again).
    const KEEP: usize = 16;

    /// The events `spec` wants from `from` on: a selection made for an equal want in this
    /// round, or `select`'s.
    fn get_or_select(
        &mut self,
        spec: &Arc<WatchSpec>,
        from: i64,
        select: impl FnOnce() -> Arc<EventBatch>,
    ) -> Arc<EventBatch> {
        let same = |s: &Selection| {
            s.from == from
                && (Arc::ptr_eq(&s.spec, spec)
                    || (s.spec.range == spec.range
                        && s.spec.no_put == spec.no_put
                        && s.spec.no_delete == spec.no_delete))
        };
        if let Some(i) = self.recent.iter().rposition(same) {
            let hit = self.recent.remove(i);
            let events = hit.events.clone();
            self.recent.push(hit);
            return events;
        }
        let events = select();
        if self.recent.len() == Self::KEEP {
            self.recent.remove(0);
        }
        self.recent.push(Selection {
            spec: spec.clone(),
            from,
            events: events.clone(),
        });
        events
    }
}
