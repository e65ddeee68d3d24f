//! openraft's storage conformance suite against fetcd's real pair: the `LogStore` on its write-ahead log and the
//! `StateMachine` over the sled MVCC store.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use fetcd_raft::log_store::LogStore;
use fetcd_raft::state_machine::StateMachine;
use fetcd_raft::NodeId;
use fetcd_raft::TypeConfig;
use fetcd_storage::KvStore;
use openraft::testing::StoreBuilder;
use openraft::testing::Suite;
use openraft::ErrorSubject;
use openraft::ErrorVerb;
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
