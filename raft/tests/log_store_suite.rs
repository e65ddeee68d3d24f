//! Tests of `fetcd_raft::log_store::LogStore`: openraft's storage test suite, plus durability
//! tests that reopen the store from its directory.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use fetcd_raft::log_store::LogStore;
use fetcd_raft::log_store::LogStoreConfig;
use openraft::storage::RaftLogStorage;
use openraft::storage::RaftLogStorageExt;
use openraft::storage::RaftStateMachine;
use openraft::testing::StoreBuilder;
use openraft::testing::Suite;
use openraft::BasicNode;
use openraft::CommittedLeaderId;
use openraft::Entry;
use openraft::EntryPayload;
use openraft::ErrorSubject;
use openraft::ErrorVerb;
use openraft::LogId;
use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::RaftSnapshotBuilder;
use openraft::Snapshot;
use openraft::SnapshotMeta;
use openraft::StorageError;
use openraft::StoredMembership;
use openraft::Vote;
use serde::Deserialize;
use serde::Serialize;
use tempfile::TempDir;

/// A client request of the test type config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Put {
    pub key: String,
    pub value: String,
}

/// The reply to a [`Put`]: the previous value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutReply {
    pub prev: Option<String>,
}

openraft::declare_raft_types!(
    pub TestConfig:
        D = Put,
        R = PutReply,
);

type NodeId = u64;

// --- a minimal in-memory state machine, as required by the suite ---------------------------

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SmData {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, BasicNode>,
    kv: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct SmInner {
    data: SmData,
    snapshot: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>,
    snapshot_seq: u64,
}

#[derive(Debug, Clone, Default)]
pub struct MemStateMachine {
    inner: Arc<tokio::sync::Mutex<SmInner>>,
}

fn sm_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError<NodeId> {
    StorageError::from_io_error(
        ErrorSubject::StateMachine,
        ErrorVerb::Write,
        std::io::Error::other(e),
    )
}

impl RaftSnapshotBuilder<TestConfig> for MemStateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TestConfig>, StorageError<NodeId>> {
        let mut inner = self.inner.lock().await;
        let bytes = bincode::serialize(&inner.data).map_err(sm_err)?;
        inner.snapshot_seq += 1;

        let last = inner.data.last_applied;
        let snapshot_id = match &last {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, inner.snapshot_seq),
            None => format!("--{}", inner.snapshot_seq),
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: inner.data.last_membership.clone(),
            snapshot_id,
        };
        inner.snapshot = Some((meta.clone(), bytes.clone()));

        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TestConfig> for MemStateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let inner = self.inner.lock().await;
        Ok((inner.data.last_applied, inner.data.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<PutReply>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TestConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.inner.lock().await;
        let mut replies = Vec::new();
        for entry in entries {
            inner.data.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => PutReply::default(),
                EntryPayload::Normal(put) => PutReply {
                    prev: inner.data.kv.insert(put.key, put.value),
                },
                EntryPayload::Membership(m) => {
                    inner.data.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    PutReply::default()
                }
            };
            replies.push(reply);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let data: SmData = bincode::deserialize(&bytes).map_err(sm_err)?;
        let mut inner = self.inner.lock().await;
        inner.data = data;
        inner.snapshot = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TestConfig>>, StorageError<NodeId>> {
        let inner = self.inner.lock().await;
        Ok(inner.snapshot.as_ref().map(|(meta, bytes)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(bytes.clone())),
        }))
    }
}

// --- openraft's storage suite --------------------------------------------------------------

struct Builder;

impl StoreBuilder<TestConfig, LogStore<TestConfig>, MemStateMachine, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore<TestConfig>, MemStateMachine), StorageError<NodeId>> {
        let dir = TempDir::new()
            .map_err(|e| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        let store = LogStore::open(dir.path())
            .map_err(|e| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        Ok((dir, store, MemStateMachine::default()))
    }
}

#[test]
fn openraft_storage_suite() {
    // The suite runs each case on its own tokio runtime, so this is not a `#[tokio::test]`.
    Suite::<TestConfig, LogStore<TestConfig>, MemStateMachine, Builder, TempDir>::test_all(Builder)
        .unwrap();
}

// --- durability ----------------------------------------------------------------------------

fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn put_ent(term: u64, index: u64) -> Entry<TestConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Put {
            key: format!("k{index}"),
            value: format!("v{index}-{}", "x".repeat(index as usize)),
        }),
    }
}

fn blank_ent(term: u64, index: u64) -> Entry<TestConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Blank,
    }
}

/// Appends `put_ent(term, i)` for every `i` in `indexes`, as one batch.
async fn append_puts(
    store: &mut LogStore<TestConfig>,
    term: u64,
    indexes: std::ops::RangeInclusive<u64>,
) {
    store
        .blocking_append(indexes.map(|i| put_ent(term, i)))
        .await
        .unwrap();
}

async fn read_all(store: &mut LogStore<TestConfig>) -> Vec<Entry<TestConfig>> {
    store.try_get_log_entries(..).await.unwrap()
}

fn assert_entries(got: &[Entry<TestConfig>], want: impl IntoIterator<Item = Entry<TestConfig>>) {
    let want: Vec<_> = want.into_iter().collect();
    assert_eq!(got.len(), want.len(), "got {got:?}");
    for (g, w) in got.iter().zip(want.iter()) {
        assert_eq!(g.log_id, w.log_id);
        assert_eq!(g.payload, w.payload);
    }
}

/// Copies the log directory of a store that is still open (so nothing is written on close):
/// what is in the copy was on disk when the copy was taken.
fn snapshot_dir(from: &Path) -> TempDir {
    let to = TempDir::new().unwrap();
    for f in std::fs::read_dir(from).unwrap() {
        let f = f.unwrap();
        // Purged segments being removed are no part of the log (and may vanish meanwhile).
        if f.file_name() == "LOCK" || f.file_name().to_string_lossy().ends_with(".dead") {
            continue;
        }
        std::fs::copy(f.path(), to.path().join(f.file_name())).unwrap();
    }
    to
}

#[tokio::test]
async fn reopen_keeps_vote_entries_purge_and_truncate() {
    let dir = TempDir::new().unwrap();

    {
        let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
        store.blocking_append([blank_ent(1, 0)]).await.unwrap();
        append_puts(&mut store, 1, 1..=10).await;
        store.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
        store.save_committed(Some(log_id(1, 7))).await.unwrap();
        store.purge(log_id(1, 3)).await.unwrap();
        store.truncate(log_id(1, 9)).await.unwrap();
        // Truncated entries are replaced by ones of a newer term.
        store.blocking_append([put_ent(2, 9)]).await.unwrap();

        assert_eq!(
            LogState {
                last_purged_log_id: Some(log_id(1, 3)),
                last_log_id: Some(log_id(2, 9)),
            },
            store.get_log_state().await.unwrap()
        );
    }

    let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
    assert_eq!(
        Some(Vote::new_committed(2, 1)),
        store.read_vote().await.unwrap()
    );
    assert_eq!(Some(log_id(1, 7)), store.read_committed().await.unwrap());
    assert_eq!(
        LogState {
            last_purged_log_id: Some(log_id(1, 3)),
            last_log_id: Some(log_id(2, 9)),
        },
        store.get_log_state().await.unwrap()
    );
    let got = read_all(&mut store).await;
    assert_entries(&got, (4..=8).map(|i| put_ent(1, i)).chain([put_ent(2, 9)]));

    // Exact ranges, and ranges reaching into purged or absent indexes.
    let got = store.try_get_log_entries(5..7).await.unwrap();
    assert_entries(&got, [put_ent(1, 5), put_ent(1, 6)]);
    let got = store.try_get_log_entries(0..=4).await.unwrap();
    assert_entries(&got, [put_ent(1, 4)]);
    assert!(store.try_get_log_entries(10..).await.unwrap().is_empty());

    // The reopened log keeps accepting appends.
    store.blocking_append([put_ent(2, 10)]).await.unwrap();
    let mut reader = store.get_log_reader().await;
    let got = reader.try_get_log_entries(10..11).await.unwrap();
    assert_entries(&got, [put_ent(2, 10)]);
}

#[tokio::test]
async fn reopen_after_purging_everything() {
    let dir = TempDir::new().unwrap();
    {
        let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
        append_puts(&mut store, 1, 1..=5).await;
        store.save_vote(&Vote::new(1, 1)).await.unwrap();
        // Past the last entry, as when the state machine is ahead of the log.
        store.purge(log_id(3, 8)).await.unwrap();
    }

    let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
    assert_eq!(
        LogState {
            last_purged_log_id: Some(log_id(3, 8)),
            last_log_id: Some(log_id(3, 8)),
        },
        store.get_log_state().await.unwrap()
    );
    assert!(read_all(&mut store).await.is_empty());
    store.blocking_append([put_ent(3, 9)]).await.unwrap();
    assert_entries(&read_all(&mut store).await, [put_ent(3, 9)]);
}

#[tokio::test]
async fn purge_past_a_stale_tail_hides_it() {
    // The log holds (1,1)..(1,3); a state machine applied up to (3,1) purges the log to (3,1).
    // Entries 2 and 3 are older than (3,1) and must not be served.
    let dir = TempDir::new().unwrap();
    let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
    append_puts(&mut store, 1, 1..=3).await;
    store.purge(log_id(3, 1)).await.unwrap();

    assert_eq!(
        LogState {
            last_purged_log_id: Some(log_id(3, 1)),
            last_log_id: Some(log_id(3, 1)),
        },
        store.get_log_state().await.unwrap()
    );
    assert!(read_all(&mut store).await.is_empty());

    store.blocking_append([put_ent(3, 2)]).await.unwrap();
    assert_entries(&read_all(&mut store).await, [put_ent(3, 2)]);
}

#[tokio::test]
async fn truncate_before_the_first_entry_removes_everything() {
    // The first entry of a log need not directly follow the purged log id.
    let dir = TempDir::new().unwrap();
    let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
    append_puts(&mut store, 1, 5..=7).await;

    store.truncate(log_id(1, 3)).await.unwrap();
    assert_eq!(
        LogState {
            last_purged_log_id: None,
            last_log_id: None,
        },
        store.get_log_state().await.unwrap()
    );
    assert!(read_all(&mut store).await.is_empty());

    // Truncating past the last entry is a no-op.
    append_puts(&mut store, 1, 1..=3).await;
    store.truncate(log_id(1, 9)).await.unwrap();
    assert_eq!(3, read_all(&mut store).await.len());
}

#[tokio::test]
async fn append_callback_fires_after_the_entries_are_written() {
    let dir = TempDir::new().unwrap();
    let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();

    // `blocking_append` returns once the `LogFlushed` callback has fired, which happens only
    // after the batch was written and fdatasync'ed. Look at what is in the files at that point,
    // without closing `store` (closing writes and syncs everything).
    append_puts(&mut store, 1, 1..=20).await;
    let copy = snapshot_dir(dir.path());
    let mut reopened = LogStore::<TestConfig>::open(copy.path()).unwrap();
    assert_entries(
        &read_all(&mut reopened).await,
        (1..=20).map(|i| put_ent(1, i)),
    );
    assert_eq!(None, reopened.read_vote().await.unwrap());
    drop(reopened);

    // Likewise `save_vote` returns only after the sync.
    store.save_vote(&Vote::new(4, 2)).await.unwrap();
    let copy = snapshot_dir(dir.path());
    let mut reopened = LogStore::<TestConfig>::open(copy.path()).unwrap();
    assert_eq!(Some(Vote::new(4, 2)), reopened.read_vote().await.unwrap());
    assert_eq!(20, read_all(&mut reopened).await.len());

    drop(store);
}

/// A leader of several voters reports its own appends flushed once written and syncs them on a
/// thread of its own: the entries are readable (for replication) at once, and `durability`
/// says when they are on disk. An append while the stored vote is another member's is synced
/// before its callback, whatever `pipeline_as` says: those are a leader's entries this member
/// acknowledges.
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn only_a_leaders_own_appends_are_synced_after_their_callback() {
    use std::time::Duration;
    // A member id no other test of this process uses: held syncs are process-wide.
    const MEMBER: u64 = 0xfe7c_d10c_0001;
    let dir = TempDir::new().unwrap();
    let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
    store.set_member(MEMBER);
    store.pipeline_as(Some(1));
    store.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
    let durable = store.durability();

    fetcd_raft::fault::hold_log_syncs(MEMBER);
    append_puts(&mut store, 1, 1..=3).await;
    assert_eq!(3, read_all(&mut store).await.len());
    let early = tokio::time::timeout(Duration::from_millis(100), durable.wait(3)).await;
    fetcd_raft::fault::release_log_syncs(MEMBER);
    assert!(
        early.is_err(),
        "entry 3 counted durable while its sync was held"
    );
    tokio::time::timeout(Duration::from_secs(5), durable.wait(3))
        .await
        .expect("entry 3 durable once the sync went through")
        .unwrap();

    // Member 2 leads now: its entries are synced before the callback fires.
    store.save_vote(&Vote::new_committed(2, 2)).await.unwrap();
    fetcd_raft::fault::hold_log_syncs(MEMBER);
    append_puts(&mut store, 2, 4..=5).await;
    let end = durable.end();
    fetcd_raft::fault::release_log_syncs(MEMBER);
    assert_eq!(
        6, end,
        "another leader's entries were acknowledged unsynced"
    );
    drop(store);
    let mut reopened = LogStore::<TestConfig>::open(dir.path()).unwrap();
    assert_eq!(5, read_all(&mut reopened).await.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_the_worker_an_append_is_synced_before_its_callback() {
    // A member of several voters with a read waiting: the append syncs off the worker.
    use std::time::Duration;
    // A member id no other test of this process uses: held syncs are process-wide.
    const MEMBER: u64 = 0xfe7c_d10c_0002;
    let dir = TempDir::new().unwrap();
    let store = LogStore::<TestConfig>::open(dir.path()).unwrap();
    store.set_member(MEMBER);
    store.sync_off_worker(true);
    let durable = store.durability();
    // No read waits here: the append syncs in line, where held syncs do not reach.
    fetcd_raft::fault::hold_log_syncs(MEMBER);
    let mut writer = store.clone();
    let inline =
        tokio::time::timeout(Duration::from_secs(5), append_puts(&mut writer, 1, 1..=1)).await;
    drop(writer);
    fetcd_raft::fault::release_log_syncs(MEMBER);
    assert!(
        inline.is_ok(),
        "an append without reads waiting left the worker"
    );
    assert_eq!(2, durable.end());

    store.reads_here();
    let before = durable.end();

    fetcd_raft::fault::hold_log_syncs(MEMBER);
    let mut appender = store.clone();
    let append = tokio::spawn(async move { append_puts(&mut appender, 1, 2..=4).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (called_back, end) = (append.is_finished(), durable.end());
    fetcd_raft::fault::release_log_syncs(MEMBER);
    assert!(!called_back, "the callback came while the sync was held");
    assert_eq!(
        before, end,
        "entries counted durable while their sync was held"
    );
    tokio::time::timeout(Duration::from_secs(5), append)
        .await
        .expect("the callback once the sync went through")
        .unwrap();
    assert_eq!(5, durable.end());
    drop(store);
    let mut reopened = LogStore::<TestConfig>::open(dir.path()).unwrap();
    assert_eq!(4, read_all(&mut reopened).await.len());
}

/// The newest segment file of a log directory.
fn last_segment(dir: &Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|f| f.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segments.sort();
    segments.pop().unwrap()
}

/// Where the written part of a segment ends (segments are zero-filled beforehand).
fn written_end(data: &[u8]) -> usize {
    data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

/// An entry whose record spans several 512-byte sectors.
fn big_ent(term: u64, index: u64) -> Entry<TestConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Put {
            key: format!("k{index}"),
            value: "y".repeat(3000),
        }),
    }
}

#[tokio::test]
async fn torn_tail_is_truncated_on_reopen() {
    let dir = TempDir::new().unwrap();
    let torn_from;
    {
        let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
        append_puts(&mut store, 1, 1..=4).await;
        let before = written_end(&std::fs::read(last_segment(dir.path())).unwrap());
        store.blocking_append([big_ent(1, 5)]).await.unwrap();
        torn_from = before;
    }

    // A crash during the write of entry 5: its sectors after the first never reached the disk.
    let seg = last_segment(dir.path());
    let mut data = std::fs::read(&seg).unwrap();
    let end = written_end(&data);
    assert!(end - torn_from > 2048, "entry 5 spans several sectors");
    let first_unwritten = (torn_from / 512 + 1) * 512;
    data[first_unwritten..end].fill(0);
    std::fs::write(&seg, &data).unwrap();

    {
        let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
        assert_entries(&read_all(&mut store).await, (1..=4).map(|i| put_ent(1, i)));
        assert_eq!(
            Some(log_id(1, 4)),
            store.get_log_state().await.unwrap().last_log_id
        );
        // What is written over the torn record is shorter than it was.
        store.blocking_append([put_ent(2, 5)]).await.unwrap();
    }
    // Whatever is left of the torn record behind the new one does not come back or stop the
    // reopen. (That a leftover can never pass for a record is `a_stale_record_behind_...`.)
    let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
    assert_entries(
        &read_all(&mut store).await,
        (1..=4).map(|i| put_ent(1, i)).chain([put_ent(2, 5)]),
    );
}

/// Syncs that count as slow hand the worker's other tasks away first (`block_in_place`), which
/// tokio allows only on a multi-threaded runtime: both kinds of runtime must keep working.
async fn writes_with_every_sync_counted_slow() {
    let config = LogStoreConfig {
        slow_sync: std::time::Duration::ZERO,
        ..LogStoreConfig::default()
    };
    let dir = TempDir::new().unwrap();
    {
        let mut store = LogStore::<TestConfig>::open_with_config(dir.path(), &config).unwrap();
        append_puts(&mut store, 1, 1..=3).await;
        store.save_vote(&Vote::new(1, 1)).await.unwrap();
        append_puts(&mut store, 1, 4..=5).await;
        store.purge(log_id(1, 2)).await.unwrap();
    }
    let mut store = LogStore::<TestConfig>::open_with_config(dir.path(), &config).unwrap();
    assert_entries(&read_all(&mut store).await, (3..=5).map(|i| put_ent(1, i)));
    assert_eq!(Some(Vote::new(1, 1)), store.read_vote().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_syncs_on_a_multi_threaded_runtime() {
    writes_with_every_sync_counted_slow().await;
}

#[tokio::test]
async fn slow_syncs_on_a_current_thread_runtime() {
    writes_with_every_sync_counted_slow().await;
}

#[tokio::test]
async fn a_damaged_record_that_is_not_a_torn_write_fails_the_open() {
    let dir = TempDir::new().unwrap();
    {
        let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
        append_puts(&mut store, 1, 1..=5).await;
    }
    // One flipped byte inside the records, every sector still written: that is not a crash,
    // and dropping the entries after it would lose acknowledged writes.
    let seg = last_segment(dir.path());
    let mut data = std::fs::read(&seg).unwrap();
    let end = written_end(&data);
    data[end / 2] ^= 0x40;
    std::fs::write(&seg, &data).unwrap();

    let err = LogStore::<TestConfig>::open(dir.path()).unwrap_err();
    assert_eq!(std::io::ErrorKind::InvalidData, err.kind(), "{err}");
}

#[tokio::test]
async fn a_stale_record_behind_the_tail_is_not_replayed() {
    // Records written but never synced can reach the disk out of order: a crash may keep a
    // later record and lose an earlier one. The later one must not come back once the log has
    // moved on, even when what replaced the lost one is exactly as long.
    let dir = TempDir::new().unwrap();
    {
        let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
        append_puts(&mut store, 1, 1..=3).await;
    }
    let seg = last_segment(dir.path());
    let synced = std::fs::read(&seg).unwrap();
    let synced_end = written_end(&synced);
    {
        let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
        store.blocking_append([put_ent(1, 4)]).await.unwrap();
        store.blocking_append([put_ent(1, 5)]).await.unwrap();
    }
    let later = std::fs::read(&seg).unwrap();
    let later_end = written_end(&later);
    // Entry 4's record is lost, entry 5's survived.
    let mut crashed = later.clone();
    // A record is [u32 LE body length][u32 checksum][body].
    let body_len = u32::from_le_bytes(later[synced_end..synced_end + 4].try_into().unwrap());
    let four_len = 8 + body_len as usize;
    assert!(synced_end + four_len < later_end);
    crashed[synced_end..synced_end + four_len].fill(0);
    std::fs::write(&seg, &crashed).unwrap();
    {
        let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
        assert_entries(&read_all(&mut store).await, (1..=3).map(|i| put_ent(1, i)));
        // The leader of term 2 replaces entry 4 with one of the same size.
        store.blocking_append([put_ent(2, 4)]).await.unwrap();
    }
    let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
    assert_entries(
        &read_all(&mut store).await,
        (1..=3).map(|i| put_ent(1, i)).chain([put_ent(2, 4)]),
    );
}

#[tokio::test]
async fn entries_survive_segment_rotation_and_cache_eviction() {
    // Tiny segments and cache, so that most reads go to the segment files.
    let config = LogStoreConfig {
        segment_size: 4096,
        cache_bytes: 1024,
        ..LogStoreConfig::default()
    };
    let dir = TempDir::new().unwrap();
    let segments_before_purge;
    {
        let mut store = LogStore::<TestConfig>::open_with_config(dir.path(), &config).unwrap();
        // In the first segment only: it is removed by the purge below, and they must not be.
        store.save_vote(&Vote::new(1, 1)).await.unwrap();
        for i in 1..=300 {
            store.blocking_append([put_ent(1, i)]).await.unwrap();
        }
        store.save_committed(Some(log_id(1, 290))).await.unwrap();
        assert_entries(
            &read_all(&mut store).await,
            (1..=300).map(|i| put_ent(1, i)),
        );
        segments_before_purge = wal_file_count(dir.path());
        assert!(
            segments_before_purge > 5,
            "{segments_before_purge} segments"
        );
        store.purge(log_id(1, 200)).await.unwrap();
        // Segments holding only purged entries are gone as soon as the purge returns.
        assert!(wal_file_count(dir.path()) < segments_before_purge);
        assert_entries(
            &read_all(&mut store).await,
            (201..=300).map(|i| put_ent(1, i)),
        );
    }

    let mut store = LogStore::<TestConfig>::open_with_config(dir.path(), &config).unwrap();
    assert_entries(
        &read_all(&mut store).await,
        (201..=300).map(|i| put_ent(1, i)),
    );
    assert_eq!(
        Some(log_id(1, 200)),
        store.get_log_state().await.unwrap().last_purged_log_id
    );
    assert_eq!(Some(Vote::new(1, 1)), store.read_vote().await.unwrap());
    assert_eq!(Some(log_id(1, 290)), store.read_committed().await.unwrap());
}

#[tokio::test]
async fn a_damaged_segment_file_fails_a_read_instead_of_returning_garbage() {
    let config = LogStoreConfig {
        segment_size: 1 << 20,
        cache_bytes: 0,
        ..LogStoreConfig::default()
    };
    let dir = TempDir::new().unwrap();
    let mut store = LogStore::<TestConfig>::open_with_config(dir.path(), &config).unwrap();
    append_puts(&mut store, 1, 1..=3).await;
    store.blocking_append([put_ent(1, 4)]).await.unwrap();
    // Entries 1-3 are read from the file (only the newest payload stays cached).
    assert_eq!(4, read_all(&mut store).await.len());
    let seg = last_segment(dir.path());
    let mut data = std::fs::read(&seg).unwrap();
    let at = data.iter().position(|&b| b == b'v').unwrap();
    data[at] = b'w';
    std::fs::write(&seg, &data).unwrap();
    let err = store.try_get_log_entries(1..2).await.unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
}

fn wal_file_count(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|f| {
            f.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|e| e == "wal")
        })
        .count()
}

#[tokio::test]
async fn committed_is_stored_only_when_it_advances_within_the_log() {
    let dir = TempDir::new().unwrap();
    let mut store = LogStore::<TestConfig>::open(dir.path()).unwrap();
    store.save_committed(Some(log_id(1, 1))).await.unwrap();
    assert_eq!(
        None,
        store.read_committed().await.unwrap(),
        "beyond an empty log"
    );

    append_puts(&mut store, 1, 1..=5).await;
    store.save_committed(Some(log_id(1, 4))).await.unwrap();
    store.save_committed(Some(log_id(1, 3))).await.unwrap();
    store.save_committed(Some(log_id(1, 9))).await.unwrap();
    store.save_committed(None).await.unwrap();
    assert_eq!(Some(log_id(1, 4)), store.read_committed().await.unwrap());
}

#[tokio::test]
async fn second_open_of_the_same_dir_fails() {
    let dir = TempDir::new().unwrap();
    let _store = LogStore::<TestConfig>::open(dir.path()).unwrap();
    let err = LogStore::<TestConfig>::open(dir.path()).unwrap_err();
    assert_eq!(std::io::ErrorKind::WouldBlock, err.kind());
}

#[tokio::test]
async fn open_creates_missing_directories() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("a").join("wal");
    let mut store = LogStore::<TestConfig>::open(&path).unwrap();
    store.blocking_append([put_ent(1, 1)]).await.unwrap();
    assert_eq!(1, read_all(&mut store).await.len());
}

// --- a model of the log, against random operations and reopens ------------------------------

/// A seeded generator: a seed replays exactly.
struct Rng(fastrand::Rng);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0.u64(..n.max(1))
    }
}

/// What the log must hold: the entries' terms by index, and the log pointers.
#[derive(Debug, Clone, Default, PartialEq)]
struct Model {
    entries: BTreeMap<u64, u64>,
    purged: Option<LogId<NodeId>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
}

impl Model {
    fn last(&self) -> Option<LogId<NodeId>> {
        self.entries
            .iter()
            .next_back()
            .map(|(&i, &t)| log_id(t, i))
            .or(self.purged)
    }

    fn next_index(&self) -> u64 {
        self.last().map_or(1, |l| l.index + 1)
    }
}

async fn assert_matches(store: &mut LogStore<TestConfig>, model: &Model, what: &str) {
    assert_eq!(
        LogState {
            last_purged_log_id: model.purged,
            last_log_id: model.last(),
        },
        store.get_log_state().await.unwrap(),
        "{what}"
    );
    assert_eq!(model.vote, store.read_vote().await.unwrap(), "{what}");
    assert_eq!(
        model.committed,
        store.read_committed().await.unwrap(),
        "{what}"
    );
    let got: Vec<_> = read_all(store).await.iter().map(|e| e.log_id).collect();
    let want: Vec<_> = model.entries.iter().map(|(&i, &t)| log_id(t, i)).collect();
    assert_eq!(want, got, "{what}");
    for e in read_all(store).await {
        assert_eq!(
            put_ent(e.log_id.leader_id.term, e.log_id.index).payload,
            e.payload
        );
    }
}

/// Random appends (single and batched), truncations, purges (inside and past the log), votes
/// and committed ids on tiny segments, checked against [`Model`] after every step, after
/// reopening, and on a copy of the directory taken right after a synced write (what a crash
/// at that moment leaves). Once with durable writes around the page cache, once with
/// `fdatasync` after each.
#[tokio::test]
async fn random_operations_and_reopens_match_a_model() {
    for direct_io in [true, false] {
        operations_match_a_model(&LogStoreConfig {
            segment_size: 4096,
            cache_bytes: 2048,
            direct_io,
            ..LogStoreConfig::default()
        })
        .await;
    }
}

async fn operations_match_a_model(config: &LogStoreConfig) {
    let seeds: u64 = std::env::var("FETCD_WAL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    for seed in 0..seeds {
        let mut rng = Rng(fastrand::Rng::with_seed(seed));
        let dir = TempDir::new().unwrap();
        let mut store = LogStore::<TestConfig>::open_with_config(dir.path(), config).unwrap();
        let mut model = Model::default();
        let mut term = 1;
        for step in 0..250 {
            let what = format!("seed {seed} step {step}");
            let mut synced = false;
            match rng.below(100) {
                0..=49 => {
                    let batch = if rng.below(4) == 0 { 12 } else { 1 };
                    let n = 1 + rng.below(batch);
                    let from = model.next_index();
                    let term_now = term;
                    store
                        .blocking_append((from..from + n).map(|i| put_ent(term_now, i)))
                        .await
                        .unwrap();
                    for i in from..from + n {
                        model.entries.insert(i, term);
                    }
                    synced = true;
                }
                50..=59 => {
                    // A new leader's entries replace the tail.
                    let Some(&first) = model.entries.keys().next() else {
                        continue;
                    };
                    let last = model.next_index() - 1;
                    let at = first + rng.below(last - first + 1);
                    store.truncate(log_id(term, at)).await.unwrap();
                    drop(model.entries.split_off(&at));
                    term += 1;
                }
                60..=69 => {
                    let last = model.next_index() - 1;
                    let lo = model.purged.map_or(0, |p| p.index);
                    if rng.below(5) == 0 {
                        // Past the last entry, as after installing a snapshot.
                        term += 1;
                        let to = log_id(term, last + 1 + rng.below(5));
                        store.purge(to).await.unwrap();
                        model.entries.clear();
                        model.purged = Some(to);
                    } else if last > lo {
                        let at = lo + 1 + rng.below(last - lo);
                        let to = log_id(model.entries[&at], at);
                        store.purge(to).await.unwrap();
                        model.entries = model.entries.split_off(&(at + 1));
                        model.purged = Some(to);
                    } else {
                        continue;
                    }
                    synced = true;
                }
                70..=79 => {
                    let vote = Vote::new(term, rng.below(3));
                    if model.vote.is_some_and(|v| v > vote) {
                        continue;
                    }
                    store.save_vote(&vote).await.unwrap();
                    model.vote = Some(vote);
                    synced = true;
                }
                80..=89 => {
                    let Some(&first) = model.entries.keys().next() else {
                        continue;
                    };
                    let last = model.next_index() - 1;
                    let at = first + rng.below(last - first + 1);
                    let c = log_id(model.entries[&at], at);
                    store.save_committed(Some(c)).await.unwrap();
                    if model.committed.is_none_or(|m| m < c) {
                        model.committed = Some(c);
                    }
                }
                _ => {
                    drop(store);
                    store = LogStore::open_with_config(dir.path(), config).unwrap();
                    assert_matches(&mut store, &model, &format!("{what}, reopened")).await;
                    continue;
                }
            }
            assert_matches(&mut store, &model, &what).await;
            if synced && rng.below(8) == 0 {
                let copy = snapshot_dir(dir.path());
                let mut crashed =
                    LogStore::<TestConfig>::open_with_config(copy.path(), config).unwrap();
                assert_matches(&mut crashed, &model, &format!("{what}, crash copy")).await;
            }
        }
    }
}

/// A log in `dir` of 4 KiB segments holding entries 1..=120, purged up to 100: its config, the
/// bytes its first segment held before the purge, and the store, still open.
async fn purged_to_100(dir: &Path) -> (LogStoreConfig, Vec<u8>, LogStore<TestConfig>) {
    let config = LogStoreConfig {
        segment_size: 4096,
        ..LogStoreConfig::default()
    };
    let mut store = LogStore::<TestConfig>::open_with_config(dir, &config).unwrap();
    for i in 1..=120 {
        store.blocking_append([put_ent(1, i)]).await.unwrap();
    }
    let first_segment = std::fs::read(dir.join("0000000000000000.wal")).unwrap();
    store.purge(log_id(1, 100)).await.unwrap();
    assert!(!dir.join("0000000000000000.wal").exists());
    (config, first_segment, store)
}

#[tokio::test]
async fn a_segment_left_behind_an_interrupted_purge_is_not_replayed() {
    let dir = TempDir::new().unwrap();
    let (config, first_segment, store) = purged_to_100(dir.path()).await;
    drop(store);
    // The oldest segment's unlink was lost, the next ones' were not: a gap in the numbers.
    std::fs::write(dir.path().join("0000000000000000.wal"), &first_segment).unwrap();
    let mut store = LogStore::<TestConfig>::open_with_config(dir.path(), &config).unwrap();
    assert_entries(
        &read_all(&mut store).await,
        (101..=120).map(|i| put_ent(1, i)),
    );
    assert!(!dir.path().join("0000000000000000.wal").exists());
}

/// Purged segments are renamed out of the log at once and removed in the background; one that a
/// stop caught half given back (cut short under its `.dead` name) is removed at the next open and
/// never read as part of the log.
#[tokio::test]
async fn purged_segments_go_in_the_background_and_a_half_removed_one_is_no_corruption() {
    let dir = TempDir::new().unwrap();
    let dead = dir.path().join("0000000000000000.wal.dead");
    let (config, first_segment, store) = purged_to_100(dir.path()).await;
    {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_dir(dir.path())
            .unwrap()
            .any(|f| f.unwrap().file_name().to_string_lossy().ends_with(".dead"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "purged segments still there"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        drop(store);
    }
    // Stopped while the oldest purged segment was being shrunk.
    std::fs::write(&dead, &first_segment[..first_segment.len() / 2 + 7]).unwrap();
    let mut store = LogStore::<TestConfig>::open_with_config(dir.path(), &config).unwrap();
    assert_entries(
        &read_all(&mut store).await,
        (101..=120).map(|i| put_ent(1, i)),
    );
    assert!(!dead.exists());
}
