//! The Raft state machine: applies committed entries to the MVCC store, builds and installs
//! snapshots.
//!
//! The applied marker (last applied log id + last membership) is the store's opaque "consistent
//! index": the store writes it in the same sled transaction as the data the entries up to it
//! produced (applies are grouped into sled transactions off the apply path), so
//! after a crash the marker never claims more or less than what is stored. sled may lose its last
//! writes on a crash (it does not fsync); the marker then lags and openraft re-applies the tail
//! of the (fdatasynced) Raft log.
//!
//! Snapshots are files written with fsync; log purge only follows a snapshot, so the state is
//! always rebuildable from the newest snapshot plus the log. On open, a store whose marker is
//! behind the snapshot (sled lost more than the kept log tail, or was wiped) is reloaded from it.

use std::io::Cursor;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;

use fetcd_storage::schema;
use fetcd_storage::KvStore;
use openraft::storage::RaftStateMachine;
use openraft::storage::Snapshot;
use openraft::EntryPayload;
use openraft::LogId;
use openraft::RaftSnapshotBuilder;
use openraft::SnapshotMeta;
use openraft::StorageError;
use openraft::StorageIOError;
use openraft::StoredMembership;
use serde::Deserialize;
use serde::Serialize;

use crate::command::into_write_op;
use crate::command::ApplyResult;
use crate::command::CommandResponse;
use crate::NodeId;
use crate::TypeConfig;

type Membership = StoredMembership<NodeId, openraft::BasicNode>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// What the consistent index blob holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
}

impl Applied {
    fn encode(&self) -> Vec<u8> {
        // Serializing plain data into a Vec cannot fail.
        bincode::serialize(self).unwrap_or_default()
    }

    fn decode(b: &[u8]) -> Result<Self, bincode::Error> {
        bincode::deserialize(b)
    }
}

/// One exported store record: (tree, key, value).
type Record = (String, Vec<u8>, Vec<u8>);

/// A snapshot file: its meta and the store's records.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: Meta,
    records: Vec<Record>,
}

const SNAPSHOT_FILE: &str = "current.snap";

/// The state machine over a [`KvStore`].
#[derive(Debug)]
pub struct StateMachine {
    store: Arc<KvStore>,
    snapshot_dir: PathBuf,
    applied: Mutex<Applied>,
    snapshot_seq: AtomicU64,
}

/// Error while opening the state machine.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] fetcd_storage::StorageError),
    /// The snapshot file could not be read.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// I/O on the snapshot directory.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl StateMachine {
    /// Opens the state machine over `store`, keeping snapshots in `snapshot_dir`, and reloads the
    /// store from the snapshot if the store is behind it.
    pub fn open(store: Arc<KvStore>, snapshot_dir: &Path) -> Result<Arc<Self>, OpenError> {
        std::fs::create_dir_all(snapshot_dir)?;
        let applied = match store.consistent_index()? {
            Some(b) => Applied::decode(&b).map_err(|e| OpenError::Snapshot(e.to_string()))?,
            None => Applied::default(),
        };
        let sm = StateMachine {
            store,
            snapshot_dir: snapshot_dir.to_path_buf(),
            applied: Mutex::new(applied),
            snapshot_seq: AtomicU64::new(0),
        };
        if let Some(file) = sm.read_snapshot_file()? {
            let ours = sm.applied().last_applied;
            if file.meta.last_log_id > ours {
                tracing::warn!(
                    store = ?ours,
                    snapshot = ?file.meta.last_log_id,
                    "store is behind the snapshot; reloading it from the snapshot"
                );
                sm.load_records(file.records)?;
            }
        }
        Ok(Arc::new(sm))
    }

    /// The MVCC store, for reads.
    pub fn store(&self) -> &Arc<KvStore> {
        &self.store
    }

    fn applied(&self) -> Applied {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn load_records(&self, records: Vec<Record>) -> Result<(), OpenError> {
        self.store.import(records.into_iter().map(Ok))?;
        let applied = match self.store.consistent_index()? {
            Some(b) => Applied::decode(&b).map_err(|e| OpenError::Snapshot(e.to_string()))?,
            None => Applied::default(),
        };
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = applied;
        Ok(())
    }

    fn snapshot_path(&self) -> PathBuf {
        self.snapshot_dir.join(SNAPSHOT_FILE)
    }

    fn read_snapshot_file(&self) -> Result<Option<SnapshotFile>, OpenError> {
        let path = self.snapshot_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        bincode::deserialize(&bytes)
            .map(Some)
            .map_err(|e| OpenError::Snapshot(format!("{}: {e}", path.display())))
    }

    /// Writes the snapshot file durably: temp file, fsync, rename, fsync the directory.
    fn write_snapshot_file(&self, file: &SnapshotFile) -> std::io::Result<()> {
        let bytes = bincode::serialize(file).map_err(std::io::Error::other)?;
        let tmp = self.snapshot_dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.snapshot_path())?;
        std::fs::File::open(&self.snapshot_dir)?.sync_all()?;
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for Arc<StateMachine> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let mut records: Vec<Record> = Vec::new();
        self.store
            .export(&mut |tree, k, v| {
                records.push((tree.to_string(), k.to_vec(), v.to_vec()));
                Ok(())
            })
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        // The marker exported with the data says exactly what this copy contains.
        let applied = records
            .iter()
            .find(|(t, k, _)| {
                t == schema::META_TREE && k.as_slice() == schema::CONSISTENT_INDEX.as_bytes()
            })
            .map(|(_, _, v)| Applied::decode(v))
            .transpose()
            .map_err(|e| StorageIOError::read_state_machine(&e))?
            .unwrap_or_default();
        let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match applied.last_applied {
            Some(l) => format!(
                "{}-{}-{}-{seq}",
                l.leader_id.term, l.leader_id.node_id, l.index
            ),
            None => format!("0-0-0-{seq}"),
        };
        let meta = Meta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership,
            snapshot_id,
        };
        let file = SnapshotFile { meta, records };
        self.write_snapshot_file(&file)
            .map_err(|e| StorageIOError::write_snapshot(Some(file.meta.signature()), &e))?;
        let data = bincode::serialize(&file.records)
            .map_err(|e| StorageIOError::write_snapshot(Some(file.meta.signature()), &e))?;
        tracing::info!(meta = %file.meta, bytes = data.len(), "snapshot built");
        Ok(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for Arc<StateMachine> {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let a = self.applied();
        Ok((a.last_applied, a.membership))
    }

    #[tracing::instrument(level = "trace", skip_all)]
    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut applied = self.applied();
        let mut batch = Vec::new();
        // How many store operations each entry contributed, to split the answers back.
        let mut per_entry = Vec::new();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            let normal = matches!(entry.payload, EntryPayload::Normal(_));
            let ops: Vec<fetcd_storage::WriteOp> = match entry.payload {
                EntryPayload::Blank => vec![fetcd_storage::WriteOp::Noop],
                EntryPayload::Normal(cmd) => {
                    cmd.0.requests.into_iter().map(into_write_op).collect()
                }
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    vec![fetcd_storage::WriteOp::Noop]
                }
            };
            let marker = applied.encode();
            per_entry.push((ops.len(), normal));
            if ops.is_empty() {
                // An empty command still advances the applied marker.
                batch.push((fetcd_storage::WriteOp::Noop, marker));
            } else {
                batch.extend(ops.into_iter().map(|op| (op, marker.clone())));
            }
        }
        let results = self
            .store
            .apply(batch)
            .map_err(|e| match applied.last_applied {
                Some(l) => StorageIOError::apply(l, &e),
                None => StorageIOError::write_state_machine(&e),
            })?;
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = applied;
        let mut results = results.into_iter();
        let mut out = Vec::with_capacity(per_entry.len());
        for (n, normal) in per_entry {
            let answers: Vec<ApplyResult> = results
                .by_ref()
                .take(n.max(1))
                .map(ApplyResult::from)
                .collect();
            out.push(CommandResponse(if normal {
                answers.into_iter().take(n).collect()
            } else {
                Vec::new()
            }));
        }
        Ok(out)
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
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let records: Vec<Record> = bincode::deserialize(snapshot.get_ref())
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let file = SnapshotFile {
            meta: meta.clone(),
            records,
        };
        self.write_snapshot_file(&file)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.load_records(file.records)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        // The sender's marker may predate the meta it sent with; the meta is authoritative.
        let applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = applied;
        tracing::info!(%meta, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let file = self
            .read_snapshot_file()
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        let Some(file) = file else {
            return Ok(None);
        };
        let data = bincode::serialize(&file.records)
            .map_err(|e| StorageIOError::read_snapshot(Some(file.meta.signature()), &e))?;
        Ok(Some(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
