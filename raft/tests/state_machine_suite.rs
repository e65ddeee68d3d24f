//! openraft's storage conformance suite against fetcd's real pair: the `LogStore` on its write-ahead log and the
//! `StateMachine` over the sled MVCC store.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use fetcd_proto::etcdserverpb::PutRequest;
use fetcd_proto::etcdserverpb::RangeRequest;
use fetcd_proto::raftpb::internal_raft_request::Request;
use fetcd_proto::raftpb::InternalRaftRequest;
use fetcd_raft::log_store::LogStore;
use fetcd_raft::state_machine::StateMachine;
use fetcd_raft::Command;
use fetcd_raft::NodeId;
use fetcd_raft::TypeConfig;
use fetcd_storage::KvStore;
use openraft::storage::RaftStateMachine;
use openraft::testing::StoreBuilder;
use openraft::testing::Suite;
use openraft::CommittedLeaderId;
use openraft::Entry;
use openraft::EntryPayload;
use openraft::ErrorSubject;
use openraft::ErrorVerb;
use openraft::LogId;
use openraft::StorageError;
use tempfile::TempDir;

struct Builder;

fn io(e: impl std::error::Error) -> StorageError<NodeId> {
    StorageError::from_io_error(
        ErrorSubject::Store,
        ErrorVerb::Write,
        std::io::Error::other(e.to_string()),
    )
}

impl StoreBuilder<TypeConfig, LogStore<TypeConfig>, Arc<StateMachine>, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore<TypeConfig>, Arc<StateMachine>), StorageError<NodeId>> {
        let dir = TempDir::new().map_err(io)?;
        let log = LogStore::open(&dir.path().join("wal")).map_err(io)?;
        let store = Arc::new(KvStore::open_path(&dir.path().join("kv")).map_err(io)?);
        let sm = StateMachine::open(store, &dir.path().join("snap")).map_err(io)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_suite_on_fetcd_log_and_state_machine() {
    Suite::<TypeConfig, LogStore<TypeConfig>, Arc<StateMachine>, Builder, TempDir>::test_all(
        Builder,
    )
    .unwrap();
}

fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(cmd),
    }
}

/// Commands travel and are logged as bytes, and only the state machine decodes them: bytes
/// that are no batch must stop the apply (as etcd's apply panics on an entry it cannot
/// unmarshal), never be skipped as if empty, which would fork this member's state.
#[tokio::test]
async fn a_command_that_does_not_decode_fails_its_apply_and_applies_nothing() {
    let dir = TempDir::new().unwrap();
    let store = Arc::new(KvStore::open_path(&dir.path().join("kv")).unwrap());
    let mut sm = StateMachine::open(store.clone(), &dir.path().join("snap")).unwrap();
    let put = |key: &[u8]| InternalRaftRequest {
        header: None,
        request: Some(Request::Put(PutRequest {
            key: key.to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        })),
    };
    sm.apply([entry(1, Command::new(vec![put(b"a")]))])
        .await
        .unwrap();
    assert_eq!(store.current_revision(), 2);

    // Field 1 (a request) announcing 255 bytes that never come.
    let mut torn = 2u64.to_le_bytes().to_vec();
    torn.extend_from_slice(&[0x0a, 0xff]);
    let garbage: Command = bincode::deserialize(&torn).unwrap();
    let res = sm
        .apply([entry(2, Command::new(vec![put(b"b")])), entry(3, garbage)])
        .await;
    assert!(res.is_err(), "{res:?}");
    assert_eq!(
        store.current_revision(),
        2,
        "nothing of the failed batch applied"
    );
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(1));
    let b = store
        .range(&RangeRequest {
            key: b"b".to_vec(),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
    assert!(b.kvs.is_empty());
}

/// A snapshot replaces the last one without a second copy left behind, and the replaced one is
/// given back after the rename (under another name meanwhile, so the rename frees nothing). A
/// leftover of that name from a crash between the link and the rename is a second name of the
/// current snapshot: reopening unlinks it and the current snapshot still reads back.
#[tokio::test]
async fn a_new_snapshot_replaces_the_last_and_leaves_no_second_copy() {
    use openraft::storage::RaftSnapshotBuilder;

    let dir = TempDir::new().unwrap();
    let snap = dir.path().join("snap");
    let store = Arc::new(KvStore::open_path(&dir.path().join("kv")).unwrap());
    let mut sm = StateMachine::open(store.clone(), &snap).unwrap();
    let put = |key: &[u8]| InternalRaftRequest {
        header: None,
        request: Some(Request::Put(PutRequest {
            key: key.to_vec(),
            value: vec![b'v'; 4096],
            ..Default::default()
        })),
    };
    let files = || {
        let mut names: Vec<String> = std::fs::read_dir(&snap)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    sm.apply([entry(1, Command::new(vec![put(b"a")]))])
        .await
        .unwrap();
    let first = sm.build_snapshot().await.unwrap();
    assert_eq!(files(), ["current.snap"]);
    // A snapshot being sent to a follower: its reader holds the file across the next build.
    let first_len = std::fs::metadata(snap.join("current.snap")).unwrap().len();
    let mut sending = sm.get_current_snapshot().await.unwrap().unwrap();
    let batch: Vec<_> = (0..600).map(|i| put(format!("k{i}").as_bytes())).collect();
    sm.apply([entry(2, Command::new(batch))]).await.unwrap();
    let second = sm.build_snapshot().await.unwrap();
    assert_eq!(files(), ["current.snap"], "the replaced snapshot is gone");
    assert!(second.meta.last_log_id > first.meta.last_log_id);
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, second.meta.last_log_id);
    let mut sent = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut *sending.snapshot, &mut sent)
        .await
        .unwrap();
    assert_eq!(
        sent.len() as u64,
        first_len,
        "the snapshot being sent was kept whole"
    );
    assert_eq!(sending.meta.last_log_id, first.meta.last_log_id);

    // A crash between linking the current snapshot to its retired name and the rename.
    drop(sm);
    std::fs::hard_link(snap.join("current.snap"), snap.join("retired.snap")).unwrap();
    let mut sm = StateMachine::open(store, &snap).unwrap();
    assert_eq!(files(), ["current.snap"]);
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, second.meta.last_log_id);
    let size = std::fs::metadata(snap.join("current.snap")).unwrap().len();
    assert!(
        size > 600 * 4096,
        "the current snapshot kept its data: {size} bytes"
    );
}
