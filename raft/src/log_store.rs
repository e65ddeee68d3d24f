//! The durable Raft log: openraft's [`RaftLogStorage`] on top of the [`raft_log`] crate.
//!
//! [`LogStore`] stores log entries, the vote and the committed log id of one Raft node in a
//! directory of its own. It is generic over the openraft type config `C`, as long as
//! `C::Entry` is openraft's default [`Entry<C>`].
//!
//! # Why raft-log
//!
//! The Raft log is what makes an acknowledged write survive `kill -9` and power loss: openraft
//! only reports a write as committed after a quorum has *persisted* the entry, and a node that
//! forgets an entry it acknowledged can break that quorum. So this module has one job above all:
//! never report a write as persisted before it is on stable storage.
//!
//! - **Not sled.** sled 0.34's `flush` does not `fsync` on Linux: it calls `sync_file_range`,
//!   which neither flushes the drive's write cache nor persists file metadata (sled issue
//!   #1452). Data that sled reports as flushed can therefore still be lost on power loss. The
//!   state machine may live in sled, because it is rebuilt from the Raft log; the log itself
//!   must not.
//! - **Not our own segment files.** A correct append-only log needs record framing, checksums,
//!   recovery that truncates a torn tail, fsync of the directory when a file is created or
//!   removed, ordering "purge record durable before the segment is unlinked", and group commit.
//!   [`raft_log`] (by openraft's author, built on `chunked-wal`) already does all of that and is
//!   tested for it.
//! - **What raft-log does.** Every record is appended to the open chunk file
//!   (`r-<offset>.wal`) with a CRC32 checksum. `flush(sync = true, callback)` hands the pending
//!   bytes to a background flush worker thread, which collects every request that arrives while
//!   is queued (up to `flush_batch_wait` — 0 by default — and 2048 requests), writes them with one
//!   vectored write, calls `sync_data` (fdatasync) **once for the whole batch**, and only then
//!   invokes the callbacks of the batch. That is our group commit: many concurrent appends and
//!   votes share one fdatasync. (The leader's appends also arrive pre-batched: `RaftNode` puts
//!   concurrent client requests into one entry, since openraft 0.9's core awaits this callback
//!   before it appends the next entry or sends the entry to followers — a wait here would only
//!   add latency.) A new chunk file and a removed one are made durable with an
//!   fsync of the directory. On open, every chunk is replayed; a trailing record cut short by a
//!   crash (`UnexpectedEof`) or a zero-filled tail is truncated, any other corruption (bad
//!   CRC in the middle) fails the open instead of silently losing data. An exclusive `LOCK`
//!   file keeps a second process out of the directory.
//!
//! # On-disk encoding
//!
//! raft-log frames each record as `[u32 record type][fields][u32 CRC32]`. The fields this module
//! supplies — log ids, votes and entry payloads — are each written as a frame of
//! `[u32 big-endian length][bytes]` (the layout of codeq's `Vec<u8>`), where `bytes` is
//! `bincode` 1.3 serde encoding with bincode's default `serialize` configuration (little-endian,
//! fixed-size integers). An `Append` record stores the [`LogId`] and the [`EntryPayload`]
//! separately, so the log id is not stored twice.
//!
//! The length frame matters for crash recovery: a record cut short by a crash always fails to
//! decode with `UnexpectedEof`, which is the error raft-log truncates on, while a frame that is
//! complete but does not decode is reported as `InvalidData`. Changing the bincode
//! configuration, or the serde layout of openraft's `LogId`/`Vote`/`EntryPayload` or of the
//! application data `C::D`, changes the on-disk format.
//!
//! # Durability contract
//!
//! Every write goes to raft-log's in-memory state at once (so reads see it) and to the flush
//! worker in call order, and the worker writes in that order, so all write IO is serialized as
//! openraft requires: a later `sync` covers every earlier record.
//!
//! ### To ensure correctness
//!
//! - [`append`](RaftLogStorage::append): the entries are readable when the method returns. The
//!   [`LogFlushed`] callback fires only after the flush worker has written **and fdatasync'ed**
//!   the batch containing them (or with the IO error if writing or syncing failed; the worker
//!   then stops and every later write fails — a failed fsync is never retried). `append` does
//!   not wait for the sync.
//! - [`save_vote`](RaftLogStorage::save_vote): does not return until the vote (and everything
//!   written before it) is fdatasync'ed.
//! - [`save_committed`](RaftLogStorage::save_committed): best effort. The record is handed to
//!   the worker without a sync and becomes durable with the next synced write. A committed log id
//!   that is not above the stored one, or that is not in this log, is not stored.
//! - [`truncate`](RaftLogStorage::truncate): effective for readers at once; handed to the worker
//!   without a sync, so it becomes durable with the next `append` or `save_vote`, which is before
//!   any entry appended after it is reported as persisted.
//! - [`purge`](RaftLogStorage::purge): effective for readers at once; a sync is requested but not
//!   awaited. Chunk files holding only purged entries are unlinked by the worker after the purge
//!   record is synced. Losing a purge in a crash is harmless (the entries come back).
//!
//! # Memory
//!
//! raft-log keeps payloads in memory: every entry of the open chunk, plus entries of closed chunks
//! until the cache limits are reached. [`LogStoreConfig`] therefore uses much smaller chunks
//! (4 MiB / 256 Ki records) and cache (4 MiB) than raft-log's defaults (1 GiB / 1 Mi records,
//! 1 GiB), which bounds the pinned memory (a heap profile after loading 300k keys showed 34 MiB
//! of log payloads with a 32 MiB cache, an eighth of the member's RSS) and the granularity at
//! which purged space is returned to the file system. Entries older than the cache are read back
//! with `pread`, which a follower needs only when it is more than the cache behind (under a
//! 64-client put load here, about half a second of writes).
//!
//! # Caveats
//!
//! - raft-log's API is `&mut self`, so the log sits behind a [`std::sync::Mutex`] shared by the
//!   store and its readers. The lock is never held across an `.await`, but reads of entries that
//!   are no longer cached do a `pread` under it, and a write may block briefly when more than
//!   64 MiB of writes are queued for the worker.
//! - Dropping the last handle closes the log: pending records are written and synced and the
//!   worker thread is joined, which blocks the dropping thread for one fdatasync.
//! - raft-log itself panics (poisoning the mutex, which later calls report as an error) only on
//!   internal inconsistencies, e.g. a poisoned internal lock.

use std::fmt;
use std::fs;
use std::io;
use std::io::Read;
use std::marker::PhantomData;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
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
use raft_log::api::raft_log_writer::RaftLogWriter;
use raft_log::codeq::Decode;
use raft_log::codeq::Encode;
use raft_log::RaftLog;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;

/// The file raft-log (chunked-wal) holds an exclusive `flock` on while the log is open.
const LOCK_FILE: &str = "LOCK";

/// How long an open waits for a log this process is still closing.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Tunables of a [`LogStore`].
///
/// The defaults are chosen for an etcd-like server: chunks small enough that the entries pinned
/// in memory (the whole open chunk) stay bounded, and a cache large enough that followers
/// catching up are served from memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogStoreConfig {
    /// A chunk file is closed and a new one started after this many records.
    ///
    /// Default: 256 Ki (raft-log: 1 Mi).
    pub chunk_max_records: usize,

    /// A chunk file is closed and a new one started once it reaches this many bytes.
    ///
    /// Every payload of the open chunk stays in memory, so this bounds that memory. Purged
    /// entries are released to the file system one whole chunk at a time.
    ///
    /// Default: 4 MiB (raft-log: 1 GiB).
    pub chunk_max_size: usize,

    /// Cached payloads beyond this count are evicted, oldest first. Payloads not yet in a closed
    /// and synced chunk (the open chunk's) cannot be evicted and are kept regardless.
    ///
    /// Default: 100 000 (raft-log's default).
    pub log_cache_max_items: usize,

    /// Cached payloads beyond this many bytes are evicted, oldest first; same exception as
    /// [`log_cache_max_items`](Self::log_cache_max_items).
    ///
    /// Default: 4 MiB (raft-log: 1 GiB).
    pub log_cache_capacity: usize,

    /// How long the flush worker waits for more writes to share one fdatasync.
    ///
    /// Default: none (raft-log: 1 ms): the worker syncs what is queued as soon as it is free, and
    /// everything queued during a sync shares the next one.
    pub flush_batch_wait: Duration,
}

impl Default for LogStoreConfig {
    fn default() -> Self {
        Self {
            chunk_max_records: 256 * 1024,
            chunk_max_size: 4 * 1024 * 1024,
            log_cache_max_items: 100_000,
            log_cache_capacity: 4 * 1024 * 1024,
            flush_batch_wait: Duration::ZERO,
        }
    }
}

/// The durable Raft log of one node; see the [module documentation](self).
///
/// Cloning is cheap: clones share the same underlying log, which is how
/// [`get_log_reader`](RaftLogStorage::get_log_reader) hands out readers.
pub struct LogStore<C: RaftTypeConfig> {
    inner: Arc<Mutex<RaftLog<RaftLogTypes<C>>>>,
    syncs: Arc<SyncGauge>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            syncs: self.syncs.clone(),
        }
    }
}

/// Appends handed to the flush worker whose fdatasync has not completed yet.
///
/// The proposer reads it to hold its next batch while a sync runs: fsyncs of the log happen one
/// after another anyway, so a batch proposed during a sync only waits for the next one, and
/// proposing it at once splits the clients into cohorts that each get half a sync's worth of
/// batching. Holding it lets everything that arrives during the sync share the next one.
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

impl<C: RaftTypeConfig> fmt::Debug for LogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl<C: RaftTypeConfig> LogStore<C> {
    /// Opens (creating it if needed) the log stored in `dir`, with [`LogStoreConfig::default`].
    ///
    /// Replays the log, truncating a record torn by a crash. Fails if the directory is locked by
    /// another open `LogStore` (in this or another process), if it is not valid UTF-8, or if the
    /// log is corrupt.
    pub fn open(dir: &Path) -> Result<Self, io::Error> {
        Self::open_with_config(dir, &LogStoreConfig::default())
    }

    /// Waits (up to `limit`) until no `LogStore` holds the log in `dir` open; false if one still
    /// does. Closing is the drop of the last clone, which the tasks reading the log (openraft's
    /// replication streams) do a moment after the Raft core stopped.
    pub fn wait_closed(dir: &Path, limit: Duration) -> bool {
        fetcd_storage::defrag::wait_unlocked(&dir.join(LOCK_FILE), limit)
    }

    /// Like [`open`](Self::open), with explicit tunables.
    pub fn open_with_config(dir: &Path, config: &LogStoreConfig) -> Result<Self, io::Error> {
        let dir_str = dir.to_str().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("raft log directory is not valid UTF-8: {}", dir.display()),
            )
        })?;

        if !dir.is_dir() {
            fs::create_dir_all(dir)?;
            // Make the new directory entry itself durable; raft-log fsyncs `dir` for the files
            // it creates inside.
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            fs::File::open(parent)?.sync_all()?;
        }

        let mut rl_config = raft_log::Config::new(dir_str);
        rl_config.log_cache_max_items = Some(config.log_cache_max_items);
        rl_config.log_cache_capacity = Some(config.log_cache_capacity);
        rl_config.wal.chunk_max_records = Some(config.chunk_max_records);
        rl_config.wal.chunk_max_size = Some(config.chunk_max_size);
        rl_config.wal.flush_batch_wait = Some(config.flush_batch_wait);
        // This is raft-log's default; spelled out because crash recovery depends on it.
        rl_config.wal.truncate_incomplete_record = Some(true);

        // A log this process just closed may still be held by a task that is ending; wait for it
        // as the MVCC store's open does, then let raft-log report a lock that stays taken.
        if !Self::wait_closed(dir, CLOSE_WAIT) {
            tracing::warn!(dir = %dir.display(), "raft log still locked after {CLOSE_WAIT:?}");
        }
        let raft_log = RaftLog::open(Arc::new(rl_config))?;

        Ok(Self {
            inner: Arc::new(Mutex::new(raft_log)),
            syncs: Arc::default(),
        })
    }

    /// The count of appends waiting for their fdatasync.
    pub fn sync_gauge(&self) -> Arc<SyncGauge> {
        self.syncs.clone()
    }

    /// Locks the log. A poisoned mutex (a panic inside raft-log) is reported as an IO error.
    fn lock(&self) -> Result<MutexGuard<'_, RaftLog<RaftLogTypes<C>>>, io::Error> {
        self.inner.lock().map_err(|_poisoned| {
            io::Error::other("raft log mutex is poisoned: an earlier operation panicked")
        })
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

        let err = |e| sto_err(ErrorSubject::Logs, ErrorVerb::Read, e);
        let raw = {
            let rl = self.lock().map_err(err)?;
            let state = rl.log_state();

            // Serve only (purged, last]. Besides skipping purged entries, this hides entries
            // with an index above `last`: when `purge` moves past the last entry (the state
            // machine is ahead of the log), raft-log drops entries by index only and may keep
            // stale ones above the purge point until they are overwritten or truncated.
            let lo = state.purged().map_or(0, |p| p.0.index.saturating_add(1));
            let hi = state.last().map_or(0, |l| l.0.index.saturating_add(1));
            let start = start.max(lo);
            let end = end.min(hi);
            if start >= end {
                return Ok(Vec::new());
            }

            rl.read(start, end)
                .collect::<Result<Vec<_>, io::Error>>()
                .map_err(err)?
        };

        // Decode outside the lock.
        let mut entries = Vec::with_capacity(raw.len());
        for (log_id, payload) in raw {
            let log_id = log_id.0;
            match bincode::deserialize::<EntryPayload<C>>(&payload.0) {
                Ok(payload) => entries.push(Entry { log_id, payload }),
                Err(e) => {
                    return Err(sto_err(
                        ErrorSubject::Log(log_id),
                        ErrorVerb::Read,
                        io::Error::new(io::ErrorKind::InvalidData, e),
                    ))
                }
            }
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
        let rl = self
            .lock()
            .map_err(|e| sto_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        let state = rl.log_state();

        let last_purged_log_id = state.purged().map(|x| x.0.clone());
        // raft-log moves `last` up to `purged` when a purge goes past the last entry, so `last`
        // is `purged` when the log is empty after a purge.
        let last_log_id = state
            .last()
            .map(|x| x.0.clone())
            .or_else(|| last_purged_log_id.clone());

        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let err = |e| sto_err(ErrorSubject::Vote, ErrorVerb::Write, e);

        let (tx, rx) = oneshot::channel();
        {
            let mut rl = self.lock().map_err(err)?;
            rl.save_vote(VoteCodec(vote.clone())).map_err(err)?;
            rl.flush(true, Some(FlushCallback::Notify(tx, Instant::now())))
                .map_err(err)?;
        }

        // Durable before returning: the worker answers only after the fdatasync.
        match rx.await {
            Ok(res) => res.map_err(err),
            Err(_closed) => Err(err(io::Error::other(
                "raft log flush worker stopped before syncing the vote",
            ))),
        }
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<C::NodeId>>, StorageError<C::NodeId>> {
        let rl = self
            .lock()
            .map_err(|e| sto_err(ErrorSubject::Vote, ErrorVerb::Read, e))?;
        Ok(rl.log_state().vote().map(|v| v.0.clone()))
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<C::NodeId>>,
    ) -> Result<(), StorageError<C::NodeId>> {
        let Some(committed) = committed else {
            return Ok(());
        };
        let err = |e| sto_err(ErrorSubject::Store, ErrorVerb::Write, e);

        let mut rl = self.lock().map_err(err)?;
        let committed = LogIdCodec(committed);
        let state = rl.log_state();

        // Storing the committed log id is optional, so skip what raft-log would reject instead
        // of failing the node: a value that does not advance, or one that is not in this log
        // (then the log cannot be replayed up to it anyway).
        if Some(&committed) <= state.committed() {
            return Ok(());
        }
        if Some(&committed) > state.last() {
            tracing::debug!(
                committed = %committed.0,
                last = ?state.last().map(|l| &l.0),
                "not storing a committed log id beyond the last log id"
            );
            return Ok(());
        }

        rl.commit(committed).map_err(err)?;
        // Best effort: no sync, it becomes durable with the next synced write.
        rl.flush(false, None).map_err(err)?;
        Ok(())
    }

    async fn read_committed(
        &mut self,
    ) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        let rl = self
            .lock()
            .map_err(|e| sto_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
        Ok(rl.log_state().committed().map(|c| c.0.clone()))
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
        // Encode outside the lock, and completely before touching raft-log: raft-log encodes a
        // record straight into its write buffer, so a record that failed half way would leave
        // garbage to be written.
        let mut records = Vec::new();
        for entry in entries {
            let payload = PayloadBytes::encode_payload::<C>(&entry.payload).map_err(|e| {
                sto_err(ErrorSubject::Log(entry.log_id.clone()), ErrorVerb::Write, e)
            })?;
            records.push((LogIdCodec(entry.log_id), payload));
        }

        let err = |e| sto_err(ErrorSubject::Logs, ErrorVerb::Write, e);
        let mut rl = self.lock().map_err(err)?;

        // Entries at or below the purge point are already covered by the state machine; storing
        // them and purging them again is a no-op, and raft-log would refuse them (they are not
        // above its last log id). openraft does not normally append there, but its storage test
        // suite does after purging to the state machine's last applied log id.
        if let Some(purged) = rl.log_state().purged() {
            let purged_index = purged.0.index;
            records.retain(|(log_id, _)| log_id.0.index > purged_index);
        }

        rl.append(records).map_err(err)?;
        // Do not wait: the worker calls `callback` after the fdatasync of the batch.
        self.syncs.started();
        let syncs = self.syncs.clone();
        if let Err(e) = rl.flush(
            true,
            Some(FlushCallback::Append(callback, Instant::now(), syncs)),
        ) {
            self.syncs.finished();
            return Err(err(e));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let err = |e| sto_err(ErrorSubject::Logs, ErrorVerb::Delete, e);
        let mut rl = self.lock().map_err(err)?;
        let state = rl.log_state();

        // Remove [log_id.index, +oo).
        let Some(last) = state.last() else {
            return Ok(());
        };
        if log_id.index > last.0.index {
            return Ok(());
        }

        // raft-log's `truncate(index)` keeps the entry at `index - 1`, which must be present,
        // except for `index == purged + 1`, which keeps nothing but the purged log id.
        let keep_none = state.purged().map_or(0, |p| p.0.index.saturating_add(1));
        let mut index = log_id.index.max(keep_none);
        if index > keep_none && rl.read(index - 1, index).next().is_none() {
            // The log starts after `index - 1` (the first entry of a log need not follow the
            // purged log id), so everything goes.
            index = keep_none;
        }

        rl.truncate(index).map_err(err)?;
        rl.flush(false, None).map_err(err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let err = |e| sto_err(ErrorSubject::Logs, ErrorVerb::Delete, e);
        let mut rl = self.lock().map_err(err)?;

        // Remove (-oo, log_id.index]. If `log_id` is beyond the last entry, raft-log also moves
        // `last` up to `log_id`.
        rl.purge(LogIdCodec(log_id)).map_err(err)?;
        // Chunk files are only unlinked behind a synced flush; request one but do not wait.
        rl.flush(true, None).map_err(err)?;
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

/// Binds raft-log's generic slots to openraft's types.
struct RaftLogTypes<C>(PhantomData<fn() -> C>);

impl<C> fmt::Debug for RaftLogTypes<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RaftLogTypes")
    }
}

impl<C> Default for RaftLogTypes<C> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<C> Clone for RaftLogTypes<C> {
    fn clone(&self) -> Self {
        Self(PhantomData)
    }
}

impl<C> PartialEq for RaftLogTypes<C> {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl<C> Eq for RaftLogTypes<C> {}

impl<C: RaftTypeConfig> raft_log::Types for RaftLogTypes<C> {
    type LogId = LogIdCodec<C::NodeId>;
    type LogPayload = PayloadBytes;
    type Vote = VoteCodec<C::NodeId>;
    type Callback = FlushCallback<C>;
    type UserData = ();

    fn log_index(log_id: &Self::LogId) -> u64 {
        log_id.0.index
    }

    fn payload_size(payload: &Self::LogPayload) -> u64 {
        payload.0.len() as u64
    }
}

/// Called by raft-log's flush worker thread once a flush request is done: after the fdatasync
/// for `flush(true, ..)`.
enum FlushCallback<C: RaftTypeConfig> {
    /// An `append`: tell openraft the entries are persisted. The instant is when the flush
    /// was requested, for [`crate::metrics::WAL_FSYNC`]; the gauge counts it until it is.
    Append(LogFlushed<C>, Instant, Arc<SyncGauge>),
    /// A `save_vote` waiting for its sync.
    Notify(oneshot::Sender<Result<(), io::Error>>, Instant),
}

impl<C: RaftTypeConfig> raft_log::Callback for FlushCallback<C> {
    fn send(self, res: Result<(), io::Error>) {
        let requested = match &self {
            FlushCallback::Append(_, t, _) | FlushCallback::Notify(_, t) => *t,
        };
        if res.is_ok() {
            crate::metrics::WAL_FSYNC.observe(requested.elapsed());
        }
        match self {
            FlushCallback::Append(cb, _, syncs) => {
                cb.log_io_completed(res);
                syncs.finished();
            }
            FlushCallback::Notify(tx, _) => {
                // The waiter may be gone (its future was dropped); nothing to tell then.
                let _ = tx.send(res);
            }
        }
    }
}

/// Writes `bytes` as a `[u32 BE length][bytes]` frame, the layout of codeq's `Vec<u8>`.
fn write_frame<W: io::Write>(bytes: &[u8], mut w: W) -> Result<usize, io::Error> {
    let len = u32::try_from(bytes.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "record field of {} bytes does not fit a u32 length",
                bytes.len()
            ),
        )
    })?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(bytes)?;
    Ok(4 + bytes.len())
}

/// Reads a frame written by [`write_frame`]; a short read is `UnexpectedEof`.
fn read_frame<R: Read>(r: R) -> Result<Vec<u8>, io::Error> {
    Vec::<u8>::decode(r)
}

fn encode_bincode<T: Serialize, W: io::Write>(value: &T, w: W) -> Result<usize, io::Error> {
    // Serialize completely before writing anything, so a failure writes nothing.
    let bytes =
        bincode::serialize(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    write_frame(&bytes, w)
}

fn decode_bincode<T: DeserializeOwned, R: Read>(r: R) -> Result<T, io::Error> {
    let bytes = read_frame(r)?;
    bincode::deserialize(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// An openraft [`LogId`] as raft-log's `LogId`: bincode in a length frame.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct LogIdCodec<NID: NodeId>(LogId<NID>);

impl<NID: NodeId> Encode for LogIdCodec<NID> {
    fn encode<W: io::Write>(&self, w: W) -> Result<usize, io::Error> {
        encode_bincode(&self.0, w)
    }
}

impl<NID: NodeId> Decode for LogIdCodec<NID> {
    fn decode<R: Read>(r: R) -> Result<Self, io::Error> {
        decode_bincode(r).map(Self)
    }
}

/// An openraft [`Vote`] as raft-log's `Vote`: bincode in a length frame.
///
/// raft-log refuses a vote that is not `>=` the stored one, using openraft's partial order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VoteCodec<NID: NodeId>(Vote<NID>);

impl<NID: NodeId> PartialOrd for VoteCodec<NID> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.0.partial_cmp(&other.0)
    }
}

impl<NID: NodeId> Encode for VoteCodec<NID> {
    fn encode<W: io::Write>(&self, w: W) -> Result<usize, io::Error> {
        encode_bincode(&self.0, w)
    }
}

impl<NID: NodeId> Decode for VoteCodec<NID> {
    fn decode<R: Read>(r: R) -> Result<Self, io::Error> {
        decode_bincode(r).map(Self)
    }
}

/// An entry payload as raft-log's `LogPayload`: the bincode bytes of an [`EntryPayload`], kept
/// encoded so that they are serialized once (outside the lock), the cache knows their exact
/// size, and handing a cached payload to a reader is a reference-count increment.
#[derive(Clone)]
struct PayloadBytes(Arc<[u8]>);

impl PayloadBytes {
    fn encode_payload<C>(payload: &EntryPayload<C>) -> Result<Self, io::Error>
    where
        C: RaftTypeConfig,
        EntryPayload<C>: Serialize,
    {
        let bytes = bincode::serialize(payload)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // Checked here because the frame is written into raft-log's buffer after the record
        // header: failing there would leave a partial record behind.
        if u32::try_from(bytes.len()).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("log entry payload of {} bytes is too large", bytes.len()),
            ));
        }
        Ok(Self(bytes.into()))
    }
}

impl fmt::Debug for PayloadBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PayloadBytes({} bytes)", self.0.len())
    }
}

impl Encode for PayloadBytes {
    fn encode<W: io::Write>(&self, w: W) -> Result<usize, io::Error> {
        write_frame(&self.0, w)
    }
}

impl Decode for PayloadBytes {
    fn decode<R: Read>(r: R) -> Result<Self, io::Error> {
        read_frame(r).map(|v| Self(v.into()))
    }
}
