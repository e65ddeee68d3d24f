//! The durable Raft log: openraft's [`RaftLogStorage`] on fetcd's write-ahead log ([`crate::wal`]).
//!
//! [`LogStore`] stores log entries, the vote and the committed log id of one Raft node in a
//! directory of its own. It is generic over the openraft type config `C`, as long as
//! `C::Entry` is openraft's default [`Entry<C>`].
//!
//! The Raft log is what makes an acknowledged write survive `kill -9` and power loss: openraft
//! only reports a write as committed after a quorum has *persisted* the entry, and a node that
//! forgets an entry it acknowledged can break that quorum. So this module has one job above all:
//! never report a write as persisted before it is on stable storage. (Not sled: sled 0.34's
//! `flush` does not `fsync` on Linux, sled issue #1452. The state machine may live in sled
//! because it is rebuilt from this log.)
//!
//! # Records
//!
//! Each change is one record of the write-ahead log, a kind byte then its fields in `bincode`
//! 1.3 (default configuration: little-endian, fixed-size integers):
//!
//! | kind | record | fields |
//! |---|---|---|
//! | 1 | entry | u32 length of the log id, [`LogId`], then the [`EntryPayload`] |
//! | 2 | vote | [`Vote`] |
//! | 3 | committed | [`LogId`] |
//! | 4 | truncate | u64 index: entries from it on are gone |
//! | 5 | purge | [`LogId`]: entries up to it are gone |
//! | 6 | state | (vote, committed, purged), each optional: the first record of every segment |
//!
//! Replay applies them in order; an entry also removes every entry at or after its index (that
//! is what appending after a truncation means), so a lost truncate record cannot leave stale
//! entries behind the ones that replaced them. The `state` record makes every segment
//! self-contained from the log's point of view: once a purge record is durable, the segments
//! that hold only purged entries are removed, and what their vote and committed records said is
//! in the next segment's first record.
//!
//! # Durability contract
//!
//! - [`append`](RaftLogStorage::append) writes the entries and `fdatasync`s the segment before
//!   it calls the [`LogFlushed`] callback, on the caller's thread. openraft 0.9's core awaits
//!   that callback before it does anything else (`RaftCore::append_to_log`), so a sync on a
//!   thread of its own would only add two thread wake-ups to every write; the leader's client
//!   requests are batched into one entry before (see `RaftNode`'s batcher), which is the group
//!   commit. A failed write or sync fails this call and every later write (a failed fsync is
//!   never retried). When syncs are slow, the worker thread's other tasks move to another
//!   thread for the wait ([`LogStoreConfig::slow_sync`]).
//! - The exceptions, in a cluster of several voters: the leader ([`LogStore::pipeline_as`])
//!   reports its own appends flushed once written and syncs them on a thread of its own, so
//!   that the followers get them meanwhile; any other member, while reads wait on it, syncs
//!   its appends on a blocking thread and calls the callback from there once synced
//!   ([`LogStore::sync_off_worker`]), so that its worker thread serves those reads and the
//!   leader's vouch requests meanwhile. [`LogStore::durability`] tells how far the log is
//!   durable; the state machine and the AppendEntries that carry a commit index wait on it
//!   ([`crate::durable`]).
//! - [`save_vote`](RaftLogStorage::save_vote) returns once the vote is synced.
//! - [`save_committed`](RaftLogStorage::save_committed) and
//!   [`truncate`](RaftLogStorage::truncate) are written with the next write and durable with
//!   the next sync, which comes before any entry appended after them is reported persisted.
//! - [`purge`](RaftLogStorage::purge) syncs its record, then removes the segments it made
//!   unneeded and syncs the directory. Losing a purge in a crash is harmless (the entries come
//!   back).
//!
//! # Memory
//!
//! Every live entry's log id and location stay in memory (48 bytes each, plus the map's
//! overhead); payloads only in a cache of the newest entries ([`LogStoreConfig::cache_bytes`]). Older ones are read back
//! with `pread` and checked against their checksum, which a follower needs only when it is more
//! than the cache behind.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::time::Duration;
use std::time::Instant;

use openraft::storage::LogFlushed;
use openraft::storage::LogState;
use openraft::storage::RaftLogStorage;
use openraft::Entry;
use openraft::EntryPayload;
use openraft::ErrorSubject;
use openraft::ErrorVerb;
use openraft::LogId;
use openraft::NodeId;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::RaftTypeConfig;
use openraft::StorageError;
use openraft::Vote;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::durable::Durability;
use crate::durable::Job;
use crate::durable::Syncer;
use crate::wal;
use crate::wal::Loc;
use crate::wal::Wal;

/// How long an open waits for a log this process is still closing.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

const ENTRY: u8 = 1;
const VOTE: u8 = 2;
const COMMITTED: u8 = 3;
const TRUNCATE: u8 = 4;
const PURGE: u8 = 5;
const STATE: u8 = 6;

/// Tunables of a [`LogStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogStoreConfig {
    /// The size a segment file is created with (zero-filled, so that a write into it does not
    /// grow the file). A segment is closed when the next record would not fit; purged entries
    /// are released to the file system one whole segment at a time.
    ///
    /// Default: 16 MiB (etcd's WAL: 64 MiB).
    pub segment_size: u64,

    /// Bytes of the newest entries' payloads kept in memory for readers; older ones are read
    /// from their segment.
    ///
    /// Default: 4 MiB.
    pub cache_bytes: usize,

    /// Syncs are done on the calling thread (see the module documentation). Once they take
    /// this long on average (a busy or networked disk), a sync on a multi-threaded tokio
    /// runtime first hands the worker's other tasks to another thread (`block_in_place`), as
    /// Go's scheduler does around etcd's blocking fsync; a quicker sync is cheaper to wait out
    /// than that hand-off.
    ///
    /// Default: 1 ms.
    pub slow_sync: Duration,

    /// Whether a write that must be durable at once bypasses the page cache (`O_DIRECT |
    /// O_DSYNC`, see [`crate::wal`]); off, or where the file system refuses it, every write is
    /// followed by `fdatasync`.
    ///
    /// Default: on.
    pub direct_io: bool,
}

impl Default for LogStoreConfig {
    fn default() -> Self {
        Self {
            segment_size: 16 * 1024 * 1024,
            cache_bytes: 4 * 1024 * 1024,
            slow_sync: Duration::from_millis(1),
            direct_io: true,
        }
    }
}

/// The durable Raft log of one node; see the [module documentation](self).
///
/// Cloning is cheap: clones share the same underlying log, which is how
/// [`get_log_reader`](RaftLogStorage::get_log_reader) hands out readers.
pub struct LogStore<C: RaftTypeConfig> {
    shared: Arc<Shared<C>>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// Lock order: `wal`, then `state`, then the segment files.
struct Shared<C: RaftTypeConfig> {
    wal: Mutex<Wal>,
    state: Mutex<State<C>>,
    files: wal::Files,
    syncs: Arc<SyncGauge>,
    /// Moving average of the syncs' durations, in µs.
    sync_us: AtomicU64,
    slow_sync_us: u64,
    /// How far the log is written and durable.
    durability: Arc<Durability>,
    /// Syncs this member's appends while it leads several voters; started on first use.
    syncer: Mutex<Option<Syncer>>,
    /// This member's id while it leads several voters (see [`LogStore::pipeline_as`]).
    pipeline_as: Mutex<Option<C::NodeId>>,
    /// Appends may sync on a blocking thread (see [`LogStore::sync_off_worker`]).
    sync_off_worker: AtomicBool,
    /// Until when (µs since `opened`) reads wait on this member ([`LogStore::reads_here`]).
    reads_until: AtomicU64,
    opened: Instant,
    /// The member whose log this is, for the sync thread's logs and test hooks.
    member: AtomicU64,
}

/// How long after a read arrives appends keep syncing off the worker thread
/// ([`LogStore::reads_here`]).
const READS_WINDOW: Duration = Duration::from_millis(10);

/// Appends whose fdatasync has not completed yet.
///
/// The proposer reads it to hold its next batch while a sync runs: fsyncs of the log happen one
/// after another anyway, so a batch proposed during a sync only waits for the next one, and
/// proposing it at once splits the clients into cohorts that each get half a sync's worth of
/// batching. Holding it lets everything that arrives during the sync share the next one.
/// A leader of several voters does not count its appends: they are reported before their sync
/// (see [`crate::durable`]), so the next batch has nothing to wait for.
#[derive(Debug, Default)]
pub struct SyncGauge {
    pending: AtomicUsize,
    idle: tokio::sync::Notify,
}

impl SyncGauge {
    /// Appends waiting for their sync.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Resolves once no append waits for a sync.
    pub async fn wait_idle(&self) {
        let notified = self.idle.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.pending() == 0 {
            return;
        }
        notified.await;
    }

    fn started(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    fn finished(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// An entry's payload for a reader: in the cache, or to be read from its segment (the file
/// handle taken with the entry, so that a segment removed meanwhile can still be read).
enum Payload {
    Cached(Arc<[u8]>),
    OnDisk(Loc, Option<Arc<File>>),
}

/// Where a live entry is.
struct Meta<NID: NodeId> {
    log_id: LogId<NID>,
    loc: Loc,
}

/// The log as replayed from its records, plus the payload cache.
struct State<C: RaftTypeConfig> {
    vote: Option<Vote<C::NodeId>>,
    committed: Option<LogId<C::NodeId>>,
    purged: Option<LogId<C::NodeId>>,
    entries: BTreeMap<u64, Meta<C::NodeId>>,
    cache: BTreeMap<u64, Arc<[u8]>>,
    cached_bytes: usize,
    cache_cap: usize,
    /// The highest entry index each segment holds, to tell which segments a purge empties.
    segment_last: BTreeMap<u64, u64>,
}

impl<C: RaftTypeConfig> State<C> {
    fn new(cache_cap: usize) -> Self {
        Self {
            vote: None,
            committed: None,
            purged: None,
            entries: BTreeMap::new(),
            cache: BTreeMap::new(),
            cached_bytes: 0,
            cache_cap,
            segment_last: BTreeMap::new(),
        }
    }

    fn last(&self) -> Option<LogId<C::NodeId>> {
        self.entries
            .values()
            .next_back()
            .map(|m| m.log_id.clone())
            .or_else(|| self.purged.clone())
    }

    fn purged_index(&self) -> Option<u64> {
        self.purged.as_ref().map(|p| p.index)
    }

    fn insert(&mut self, log_id: LogId<C::NodeId>, loc: Loc, payload: Arc<[u8]>) {
        let index = log_id.index;
        if self.purged_index().is_some_and(|p| index <= p) {
            return;
        }
        self.truncate_from(index);
        let last = self.segment_last.entry(loc.seq).or_insert(index);
        *last = (*last).max(index);
        self.entries.insert(index, Meta { log_id, loc });
        self.cached_bytes += payload.len();
        self.cache.insert(index, payload);
        while self.cached_bytes > self.cache_cap && self.cache.len() > 1 {
            if let Some((_, p)) = self.cache.pop_first() {
                self.cached_bytes -= p.len();
            }
        }
    }

    fn truncate_from(&mut self, index: u64) {
        if self
            .entries
            .last_key_value()
            .is_none_or(|(&last, _)| last < index)
        {
            return;
        }
        drop(self.entries.split_off(&index));
        for (_, p) in self.cache.split_off(&index) {
            self.cached_bytes -= p.len();
        }
    }

    fn purge_to(&mut self, log_id: LogId<C::NodeId>) {
        if self.purged.as_ref().is_some_and(|p| p >= &log_id) {
            return;
        }
        // A purge at or past the last log id (the state machine is ahead of the log) empties
        // the log, dropping entries above its index too: they are older than what was applied.
        let keep_from = if self.last().as_ref() <= Some(&log_id) {
            u64::MAX
        } else {
            log_id.index.saturating_add(1)
        };
        self.entries = self.entries.split_off(&keep_from);
        let kept = self.cache.split_off(&keep_from);
        for p in self.cache.values() {
            self.cached_bytes -= p.len();
        }
        self.cache = kept;
        self.purged = Some(log_id);
    }

    /// Applies one record read back from the log.
    fn replay(&mut self, loc: Loc, body: &[u8]) -> io::Result<()> {
        let (&kind, fields) = body
            .split_first()
            .ok_or_else(|| invalid("empty wal record"))?;
        match kind {
            ENTRY => {
                let (log_id, payload) = split_entry::<C::NodeId>(fields)?;
                self.insert(log_id, loc, payload.into());
            }
            VOTE => self.vote = Some(decode(fields)?),
            COMMITTED => self.committed = Some(decode(fields)?),
            TRUNCATE => self.truncate_from(decode(fields)?),
            PURGE => self.purge_to(decode(fields)?),
            STATE => {
                let (vote, committed, purged): StateRecord<C::NodeId> = decode(fields)?;
                self.vote = vote;
                self.committed = committed;
                if let Some(p) = purged {
                    self.purge_to(p);
                }
            }
            other => return Err(invalid(&format!("unknown wal record kind {other}"))),
        }
        Ok(())
    }

    fn state_record(&self) -> io::Result<Vec<u8>> {
        let rec: StateRecord<C::NodeId> = (
            self.vote.clone(),
            self.committed.clone(),
            self.purged.clone(),
        );
        record(STATE, &rec)
    }
}

type StateRecord<NID> = (Option<Vote<NID>>, Option<LogId<NID>>, Option<LogId<NID>>);

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> io::Result<T> {
    bincode::deserialize(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// A record's body: `kind`, then `value` in bincode. Records (and entry records, below) size
/// their buffer first: bincode writes field by field, and a growing `Vec` was reallocated
/// several times per record. Sizing them took 3.4k of the 105k instructions one member spent
/// per put (callgrind), all of it on the put's path.
fn record<T: Serialize>(kind: u8, value: &T) -> io::Result<Vec<u8>> {
    let invalid = |e| io::Error::new(io::ErrorKind::InvalidInput, e);
    let size = bincode::serialized_size(value).map_err(invalid)?;
    let mut body = Vec::with_capacity(1 + usize::try_from(size).map_err(io::Error::other)?);
    body.push(kind);
    bincode::serialize_into(&mut body, value).map_err(invalid)?;
    Ok(body)
}

/// An entry record's body (kind, u32 length of the log id, log id, payload), and where the
/// payload starts in it.
fn entry_record<C>(entry: &Entry<C>) -> io::Result<(Vec<u8>, usize)>
where
    C: RaftTypeConfig,
    EntryPayload<C>: Serialize,
{
    let invalid = |e| io::Error::new(io::ErrorKind::InvalidInput, e);
    let id_size = bincode::serialized_size(&entry.log_id).map_err(invalid)?;
    let payload_size = bincode::serialized_size(&entry.payload).map_err(invalid)?;
    let id_len = u32::try_from(id_size).map_err(io::Error::other)?;
    let total = usize::try_from(1 + 4 + id_size + payload_size).map_err(io::Error::other)?;
    let mut body = Vec::with_capacity(total);
    body.push(ENTRY);
    body.extend_from_slice(&id_len.to_le_bytes());
    bincode::serialize_into(&mut body, &entry.log_id).map_err(invalid)?;
    let payload_at = body.len();
    bincode::serialize_into(&mut body, &entry.payload).map_err(invalid)?;
    Ok((body, payload_at))
}

/// The log id and the payload bytes of an entry record's fields (after the kind).
fn split_entry<NID: NodeId>(fields: &[u8]) -> io::Result<(LogId<NID>, &[u8])> {
    let short = || invalid("wal entry record too short");
    let len_bytes: [u8; 4] = fields
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(short)?;
    let id_end = 4 + u32::from_le_bytes(len_bytes) as usize;
    let id = fields.get(4..id_end).ok_or_else(short)?;
    Ok((decode(id)?, &fields[id_end..]))
}

impl<C: RaftTypeConfig> fmt::Debug for LogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl<C: RaftTypeConfig> LogStore<C> {
    /// Opens (or creates) the log stored in `dir`, with [`LogStoreConfig::default`].
    ///
    /// Replays the log, truncating a record torn by a crash. Fails if the directory is locked by
    /// another open `LogStore` (in this or another process) or if the log is corrupt.
    pub fn open(dir: &Path) -> Result<Self, io::Error> {
        Self::open_with_config(dir, &LogStoreConfig::default())
    }

    /// Waits (up to `limit`) until no `LogStore` holds the log in `dir` open; false if one still
    /// does. Closing is the drop of the last clone, which the tasks reading the log (openraft's
    /// replication streams) do a moment after the Raft core stopped.
    pub fn wait_closed(dir: &Path, limit: Duration) -> bool {
        fetcd_storage::defrag::wait_unlocked(&dir.join(wal::LOCK_FILE), limit)
    }

    /// Like [`open`](Self::open), with explicit tunables.
    pub fn open_with_config(dir: &Path, config: &LogStoreConfig) -> Result<Self, io::Error> {
        // A log this process just closed may still be held by a task that is ending; wait for it
        // as the MVCC store's open does, then let the open report a lock that stays taken.
        if !Self::wait_closed(dir, CLOSE_WAIT) {
            tracing::warn!(dir = %dir.display(), "raft log still locked after {CLOSE_WAIT:?}");
        }
        let mut state = State::<C>::new(config.cache_bytes);
        let mut wal = Wal::open(
            dir,
            config.segment_size.max(4096),
            config.direct_io,
            |loc, body| state.replay(loc, body),
        )?;
        if wal.active_is_empty() {
            let header = state.state_record()?;
            wal.push(&header)?;
            wal.flush(true)?;
        }
        let files = wal.files();
        // Everything replayed was synced (or was a torn tail, cut off).
        let end = state.last().map_or(0, |l| l.index + 1);
        Ok(Self {
            shared: Arc::new(Shared {
                wal: Mutex::new(wal),
                state: Mutex::new(state),
                files,
                syncs: Arc::default(),
                sync_us: AtomicU64::new(0),
                slow_sync_us: u64::try_from(config.slow_sync.as_micros()).unwrap_or(u64::MAX),
                durability: Arc::new(Durability::new(end)),
                syncer: Mutex::new(None),
                pipeline_as: Mutex::new(None),
                sync_off_worker: AtomicBool::new(false),
                reads_until: AtomicU64::new(0),
                opened: Instant::now(),
                member: AtomicU64::new(0),
            }),
        })
    }

    /// Names the member whose log this is (in the sync thread's logs and test hooks).
    pub fn set_member(&self, id: u64) {
        self.shared.member.store(id, Ordering::Relaxed);
    }

    /// Whether appends (other than a leader's own, see [`pipeline_as`](Self::pipeline_as))
    /// may sync on a blocking thread, the callback following the sync, rather than on the
    /// calling worker thread: on for a member of several voters. They do while reads wait on
    /// this member ([`reads_here`](Self::reads_here)): openraft's core waits for the callback
    /// either way, but the worker thread stays free meanwhile for its clients' reads and for
    /// the leader's vouch requests ([`crate::vouch`]), which must not wait for this disk.
    /// Otherwise (a lone member, or writes alone) the sync stays in line: the hand-off to
    /// another thread and back costs a write two thread wake-ups (three members, one client
    /// writing: p50 0.265 → 0.285 ms, measured).
    pub fn sync_off_worker(&self, on: bool) {
        self.shared.sync_off_worker.store(on, Ordering::Relaxed);
    }

    /// A read waits on this member now (a client's linearizable read, or a vouch request):
    /// appends sync off the worker thread for the next [`READS_WINDOW`] if they may.
    pub fn reads_here(&self) {
        let until = self.shared.opened.elapsed() + READS_WINDOW;
        let until = u64::try_from(until.as_micros()).unwrap_or(u64::MAX);
        self.shared.reads_until.fetch_max(until, Ordering::Relaxed);
    }

    /// Whether an append now syncs off the worker thread (see [`Self::sync_off_worker`]).
    fn syncs_off_worker(&self) -> bool {
        if !self.shared.sync_off_worker.load(Ordering::Relaxed) {
            return false;
        }
        let now = u64::try_from(self.shared.opened.elapsed().as_micros()).unwrap_or(u64::MAX);
        now < self.shared.reads_until.load(Ordering::Relaxed)
    }

    /// The vote saved in this log: synced before `save_vote` returns, so before openraft
    /// grants it to anyone.
    pub fn saved_vote(&self) -> Option<Vote<C::NodeId>> {
        self.state().vote.clone()
    }

    /// How far the log is durable.
    pub fn durability(&self) -> Arc<Durability> {
        self.shared.durability.clone()
    }

    /// Tells the log that member `id` leads a cluster of several voters (`None`: it does not).
    /// Its own appends are then written, reported flushed and synced on another thread (see the
    /// module documentation). Only a performance hint: an append takes that path only while the
    /// stored vote is `id`'s committed one, which is when it can only be `id`'s own entries.
    pub fn pipeline_as(&self, id: Option<C::NodeId>) {
        *self
            .shared
            .pipeline_as
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = id;
    }

    /// Whether an append now is this member's own, as leader of several voters.
    fn pipelined(&self) -> bool {
        let me = self
            .shared
            .pipeline_as
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(me) = me else {
            return false;
        };
        self.state()
            .vote
            .as_ref()
            .is_some_and(|v| v.is_committed() && v.leader_id().voted_for() == Some(me))
    }

    /// Marks what is written so far durable after a sync (the caller holds the `wal` lock).
    fn synced(&self) {
        let d = &self.shared.durability;
        d.synced(d.epoch(), d.written_end());
    }

    /// Queues a sync of what is written so far on the sync thread.
    fn sync_later(&self, wal: &Wal) -> io::Result<()> {
        let d = &self.shared.durability;
        let job = Job {
            file: wal.active_file(),
            epoch: d.epoch(),
            end: d.written_end(),
        };
        let mut syncer = self.shared.syncer.lock().unwrap_or_else(|p| p.into_inner());
        if syncer.is_none() {
            let member = self.shared.member.load(Ordering::Relaxed);
            *syncer = Some(Syncer::start(d.clone(), member)?);
        }
        if syncer.as_ref().is_some_and(|s| s.sync(job)) {
            Ok(())
        } else {
            Err(io::Error::other("the raft log's sync thread is gone"))
        }
    }

    /// The count of appends waiting for their fdatasync.
    pub fn sync_gauge(&self) -> Arc<SyncGauge> {
        self.shared.syncs.clone()
    }

    fn wal(&self) -> Result<MutexGuard<'_, Wal>, io::Error> {
        self.shared
            .wal
            .lock()
            .map_err(|_poisoned| io::Error::other("raft log writer is poisoned: a write panicked"))
    }

    fn state(&self) -> MutexGuard<'_, State<C>> {
        // The state is only changed after the write it reflects succeeded, by code that does not
        // panic half way; a poisoned lock still holds a consistent state.
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes what is pushed and syncs it; see [`LogStoreConfig::slow_sync`].
    fn sync(&self, wal: &mut Wal) -> io::Result<()> {
        let slow = self.shared.sync_us.load(Ordering::Relaxed) >= self.shared.slow_sync_us;
        crate::off_worker_if(slow, || self.sync_here(wal))
    }

    /// Writes what is pushed and syncs it on the calling thread, timing the sync.
    fn sync_here(&self, wal: &mut Wal) -> io::Result<()> {
        let started = Instant::now();
        let res = wal.flush(true);
        let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let avg = self.shared.sync_us.load(Ordering::Relaxed);
        self.shared
            .sync_us
            .store(avg - avg / 4 + took / 4, Ordering::Relaxed);
        if res.is_ok() {
            self.synced();
        }
        res
    }

    /// Makes written entries readable: their locations, and their payloads in the cache.
    fn publish(&self, records: Vec<(LogId<C::NodeId>, Vec<u8>, usize)>, locs: Vec<Loc>) {
        let mut state = self.state();
        for ((log_id, body, payload_at), loc) in records.into_iter().zip(locs) {
            state.insert(log_id, loc, body[payload_at..].into());
        }
    }

    /// Pushes a record, first starting a new segment (headed by the log's state) if it does
    /// not fit in the active one.
    fn push(&self, wal: &mut Wal, body: &[u8]) -> io::Result<Loc> {
        if wal.needs_rotation(body.len()) {
            wal.rotate()?;
            // The old segment was synced before the new one was started.
            self.synced();
            let header = self.state().state_record()?;
            wal.push(&header)?;
        }
        wal.push(body)
    }
}

impl<C> RaftLogReader<C> for LogStore<C>
where
    C: RaftTypeConfig<Entry = Entry<C>>,
    EntryPayload<C>: Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>>
    where
        RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend,
    {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => i.saturating_add(1),
            Bound::Excluded(&i) => i,
            Bound::Unbounded => u64::MAX,
        };
        if start >= end {
            return Ok(Vec::new());
        }

        // Collect under the lock what the cache has and where the rest is; read outside it.
        let wanted: Vec<(LogId<C::NodeId>, Payload)> = {
            let state = self.state();
            let files = wal::read_lock(&self.shared.files);
            state
                .entries
                .range(start..end)
                .map(|(i, m)| {
                    let payload = match state.cache.get(i) {
                        Some(p) => Payload::Cached(p.clone()),
                        None => Payload::OnDisk(m.loc, files.get(&m.loc.seq).cloned()),
                    };
                    (m.log_id.clone(), payload)
                })
                .collect()
        };

        let mut entries = Vec::with_capacity(wanted.len());
        for (log_id, payload) in wanted {
            let read_err = |e| sto_err(ErrorSubject::Log(log_id.clone()), ErrorVerb::Read, e);
            let bytes: Arc<[u8]> = match payload {
                Payload::Cached(p) => p,
                Payload::OnDisk(loc, file) => {
                    let file = file.ok_or_else(|| {
                        read_err(io::Error::other("the entry's wal segment is gone"))
                    })?;
                    let body = wal::read_record(&file, loc).map_err(read_err)?;
                    let fields = body
                        .get(1..)
                        .ok_or_else(|| read_err(invalid("empty record")))?;
                    let (_, payload) = split_entry::<C::NodeId>(fields).map_err(read_err)?;
                    payload.into()
                }
            };
            let payload: EntryPayload<C> = decode(&bytes).map_err(read_err)?;
            entries.push(Entry { log_id, payload });
        }
        Ok(entries)
    }
}

impl<C> RaftLogStorage<C> for LogStore<C>
where
    C: RaftTypeConfig<Entry = Entry<C>>,
    EntryPayload<C>: Serialize + DeserializeOwned,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<C::NodeId>> {
        let state = self.state();
        Ok(LogState {
            last_purged_log_id: state.purged.clone(),
            last_log_id: state.last(),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let err = |e| sto_err(ErrorSubject::Vote, ErrorVerb::Write, e);
        let body = record(VOTE, vote).map_err(err)?;
        let mut wal = self.wal().map_err(err)?;
        self.push(&mut wal, &body).map_err(err)?;
        self.sync(&mut wal).map_err(err)?;
        self.state().vote = Some(vote.clone());
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<C::NodeId>>, StorageError<C::NodeId>> {
        Ok(self.state().vote.clone())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<C::NodeId>>,
    ) -> Result<(), StorageError<C::NodeId>> {
        let Some(committed) = committed else {
            return Ok(());
        };
        let err = |e| sto_err(ErrorSubject::Store, ErrorVerb::Write, e);
        let mut wal = self.wal().map_err(err)?;
        {
            // Storing the committed log id is optional: skip a value that does not advance, or
            // one that is not in this log (then the log cannot be replayed up to it anyway).
            let state = self.state();
            if state.committed.as_ref() >= Some(&committed) {
                return Ok(());
            }
            if state.last().as_ref() < Some(&committed) {
                tracing::debug!(%committed, "not storing a committed log id beyond the last log id");
                return Ok(());
            }
        }
        let body = record(COMMITTED, &committed).map_err(err)?;
        // Best effort: written and synced with the next synced write.
        self.push(&mut wal, &body).map_err(err)?;
        self.state().committed = Some(committed);
        Ok(())
    }

    async fn read_committed(
        &mut self,
    ) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        Ok(self.state().committed.clone())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Encode before touching the log, so that a failure writes nothing.
        let mut records = Vec::new();
        for entry in entries {
            let (body, payload_at) = entry_record(&entry).map_err(|e| {
                sto_err(ErrorSubject::Log(entry.log_id.clone()), ErrorVerb::Write, e)
            })?;
            records.push((entry.log_id, body, payload_at));
        }

        let err = |e| sto_err(ErrorSubject::Logs, ErrorVerb::Write, e);
        if self.shared.durability.failed() {
            let e = io::Error::other("a sync of the raft log failed; the log takes no more writes");
            callback.log_io_completed(Err(io::Error::new(e.kind(), e.to_string())));
            return Err(err(e));
        }
        let pipelined = self.pipelined();
        let mut wal = self.wal().map_err(err)?;
        // Entries at or below the purge point are already covered by the state machine.
        // openraft does not normally append there, but its storage test suite does after
        // purging to the state machine's last applied log id.
        if let Some(purged) = self.state().purged_index() {
            records.retain(|(log_id, _, _)| log_id.index > purged);
        }

        let mut locs = Vec::with_capacity(records.len());
        for (_, body, _) in &records {
            locs.push(self.push(&mut wal, body).map_err(err)?);
        }
        if let Some((last, _, _)) = records.last() {
            self.shared.durability.wrote(last.index + 1);
        }
        // A leader of several voters syncs on the sync thread, beside replication; anyone else
        // before the callback.
        let written = if pipelined {
            wal.flush(false).and_then(|()| self.sync_later(&wal))
        } else if self.syncs_off_worker() {
            // The entries are readable at once; openraft reads none of them before the
            // callback, which it awaits before anything else.
            self.publish(records, locs);
            drop(wal);
            self.shared.syncs.started();
            let me = self.clone();
            tokio::task::spawn_blocking(move || {
                #[cfg(feature = "fault-injection")]
                crate::fault::wait_log_syncs_released(me.shared.member.load(Ordering::Relaxed));
                let res = me.wal().and_then(|mut wal| me.sync_here(&mut wal));
                me.shared.syncs.finished();
                callback.log_io_completed(res);
            });
            return Ok(());
        } else {
            self.shared.syncs.started();
            let synced = self.sync(&mut wal);
            self.shared.syncs.finished();
            synced
        };
        if let Err(e) = written {
            callback.log_io_completed(Err(io::Error::new(e.kind(), e.to_string())));
            return Err(err(e));
        }
        self.publish(records, locs);
        drop(wal);
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let err = |e| sto_err(ErrorSubject::Logs, ErrorVerb::Delete, e);
        let mut wal = self.wal().map_err(err)?;
        // Remove [log_id.index, +oo).
        if self
            .state()
            .entries
            .last_key_value()
            .is_none_or(|(&last, _)| log_id.index > last)
        {
            return Ok(());
        }
        // What a sync still in flight covers stops counting at the truncation (see
        // `Durability::truncated`): make the entries kept durable now.
        let d = &self.shared.durability;
        if d.end() < d.written_end() {
            self.sync(&mut wal).map_err(err)?;
        }
        let body = record(TRUNCATE, &log_id.index).map_err(err)?;
        // Durable with the next synced write, before any entry appended after it.
        self.push(&mut wal, &body).map_err(err)?;
        self.state().truncate_from(log_id.index);
        self.shared.durability.truncated(log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let err = |e| sto_err(ErrorSubject::Logs, ErrorVerb::Delete, e);
        let mut wal = self.wal().map_err(err)?;
        if self.state().purged.as_ref() >= Some(&log_id) {
            return Ok(());
        }
        // Remove (-oo, log_id.index]. Past the last entry, `last` becomes `log_id`.
        let body = record(PURGE, &log_id).map_err(err)?;
        self.push(&mut wal, &body).map_err(err)?;
        self.sync(&mut wal).map_err(err)?;

        // Segments before the first one still holding a live entry are no longer needed: the
        // purge record is durable, and later segments start with the log's state.
        let first_needed = {
            let mut state = self.state();
            state.purge_to(log_id.clone());
            let active = wal.active();
            let first = state
                .segment_last
                .iter()
                .find(|(&seq, &last)| seq >= active || last > log_id.index)
                .map_or(active, |(&seq, _)| seq)
                .min(active);
            state.segment_last = state.segment_last.split_off(&first);
            first
        };
        wal.remove_before(first_needed).map_err(err)?;
        // A purge past the last entry empties the log: the next entry follows the purged one.
        let end = log_id.index + 1;
        if self.shared.durability.skipped_to(end) {
            self.synced();
        }
        Ok(())
    }
}

fn sto_err<NID: NodeId>(
    subject: ErrorSubject<NID>,
    verb: ErrorVerb,
    e: io::Error,
) -> StorageError<NID> {
    StorageError::from_io_error(subject, verb, e)
}
