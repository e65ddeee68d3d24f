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
//! always rebuildable from the newest snapshot plus the log. They are streamed to and from disk
//! (see `snapshot_file`), never held in memory whole. On open, a store whose marker is
//! behind the snapshot (sled lost more than the kept log tail, or was wiped) is reloaded from it.

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
use openraft::StorageError;
use openraft::StorageIOError;
use openraft::StoredMembership;
use serde::Deserialize;
use serde::Serialize;

use crate::command::into_write_op;
use crate::command::ApplyResult;
use crate::command::CommandResponse;
use crate::snapshot_file;
use crate::snapshot_file::Meta;
use crate::snapshot_file::SnapshotWriter;
use crate::watermark::Closed;
use crate::watermark::Watermark;
use crate::NodeId;
use crate::TypeConfig;

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

/// What the consistent index blob holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
}

impl Applied {
    /// One past the last applied index.
    fn end(&self) -> u64 {
        self.last_applied.map_or(0, |l| l.index + 1)
    }

    fn encode(&self) -> Vec<u8> {
        // Serializing plain data into a Vec cannot fail.
        bincode::serialize(self).unwrap_or_default()
    }

    fn decode(b: &[u8]) -> Result<Self, bincode::Error> {
        bincode::deserialize(b)
    }
}

const SNAPSHOT_FILE: &str = "current.snap";
/// A snapshot being built (a member may build its own while receiving one from the leader).
const BUILDING_FILE: &str = "building.snap";
/// A snapshot being received from the leader.
const RECEIVING_FILE: &str = "receiving.snap";
/// The snapshot a newer one replaced, while its blocks are given back (see
/// [`StateMachine::publish`]).
const RETIRED_FILE: &str = "retired.snap";

/// The state machine over a [`KvStore`].
#[derive(Debug)]
pub struct StateMachine {
    store: Arc<KvStore>,
    snapshot_dir: PathBuf,
    applied: Mutex<Applied>,
    /// `applied`'s index, for the tasks that wait for an entry to be applied here.
    applied_end: Watermark,
    /// The last entry handed to the store: committed, durable on a quorum, and possibly seen by
    /// watchers already while the store applies it (before `applied_end` moves). A leader's
    /// read index starts from it (see [`crate::read_index`]).
    applying: Mutex<Option<LogId<NodeId>>>,
    snapshot_seq: AtomicU64,
    /// The Raft log's durability: an entry is applied only once it is durable there (a leader
    /// syncs its own entries beside replicating them; see [`crate::durable`]).
    log_durability: std::sync::OnceLock<Arc<crate::durable::Durability>>,
    /// Held while a snapshot is published: one built here and one received may finish at once,
    /// and both pass through [`RETIRED_FILE`].
    publishing: Mutex<()>,
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
    /// Makes every apply wait until its entries are durable in the Raft log `d` belongs to.
    pub fn apply_only_durable(&self, d: Arc<crate::durable::Durability>) {
        let _ = self.log_durability.set(d);
    }

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
            applied_end: Watermark::new(applied.end()),
            applying: Mutex::new(applied.last_applied),
            applied: Mutex::new(applied),
            snapshot_seq: AtomicU64::new(0),
            log_durability: std::sync::OnceLock::new(),
            publishing: Mutex::new(()),
        };
        // Snapshots cut short by a crash while they were built or received, and a replaced one
        // not yet given back (only unlinked: before the rename it is a second name of the
        // current snapshot).
        for partial in [BUILDING_FILE, RECEIVING_FILE, RETIRED_FILE] {
            match std::fs::remove_file(sm.snapshot_dir.join(partial)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        if let Some((meta, file)) = sm.open_snapshot_file()? {
            let ours = sm.applied().last_applied;
            if meta.last_log_id > ours {
                tracing::warn!(
                    store = ?ours,
                    snapshot = ?meta.last_log_id,
                    "store is behind the snapshot; reloading it from the snapshot"
                );
                sm.load_records(file)?;
            }
        }
        Ok(Arc::new(sm))
    }

    /// The MVCC store, for reads.
    pub fn store(&self) -> &Arc<KvStore> {
        &self.store
    }

    /// Resolves once the entry at `index` is applied here (its effects visible to reads of the
    /// store).
    pub async fn wait_applied(&self, index: u64) -> Result<(), Closed> {
        self.applied_end.wait_past(index).await
    }

    /// One past the last index applied here.
    pub fn applied_end(&self) -> u64 {
        self.applied_end.end()
    }

    /// The last entry whose effects the store shows or is about to show: committed, and no
    /// older than anything this member ever answered or showed a watcher.
    pub fn applying(&self) -> Option<LogId<NodeId>> {
        *self.applying.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_applying(&self, log_id: Option<LogId<NodeId>>) {
        let mut a = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        if log_id > *a {
            *a = log_id;
        }
    }

    /// Stops the waits for entries to be applied (the member is stopping).
    pub fn close(&self) {
        self.applied_end.close();
    }

    fn set_applied(&self, applied: Applied) {
        let end = applied.end();
        let last = applied.last_applied;
        *self.applied.lock().unwrap_or_else(|p| p.into_inner()) = applied;
        self.set_applying(last);
        self.applied_end.set(end);
    }

    fn applied(&self) -> Applied {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the store's contents with the snapshot in `file`, read as a stream.
    fn load_records(&self, file: std::fs::File) -> Result<(), OpenError> {
        let records = snapshot_file::read_records(file)?;
        self.store
            .import(records.map(|r| r.map_err(fetcd_storage::StorageError::from)))?;
        let applied = match self.store.consistent_index()? {
            Some(b) => Applied::decode(&b).map_err(|e| OpenError::Snapshot(e.to_string()))?,
            None => Applied::default(),
        };
        self.set_applied(applied);
        Ok(())
    }

    fn snapshot_path(&self) -> PathBuf {
        self.snapshot_dir.join(SNAPSHOT_FILE)
    }

    /// The current snapshot's meta and its file, if there is one.
    fn open_snapshot_file(&self) -> Result<Option<(Meta, std::fs::File)>, OpenError> {
        let path = self.snapshot_path();
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let meta = snapshot_file::read_meta(&mut file)
            .map_err(|e| OpenError::Snapshot(format!("{}: {e}", path.display())))?;
        Ok(Some((meta, file)))
    }

    /// Makes a complete (synced) partial file the current snapshot: rename, fsync the directory.
    ///
    /// The snapshot it replaces keeps a second name through the rename, so the rename frees
    /// nothing, and its blocks are given back a few megabytes at a time afterwards (see
    /// [`fetcd_storage::write_behind`]).
    fn publish(&self, partial: &str) -> std::io::Result<()> {
        let _one = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.snapshot_path();
        let retired = self.snapshot_dir.join(RETIRED_FILE);
        fetcd_storage::write_behind::remove_gradually(&retired, Some(&current))?;
        match std::fs::hard_link(&current, &retired) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::rename(self.snapshot_dir.join(partial), &current)?;
        std::fs::File::open(&self.snapshot_dir)?.sync_all()?;
        fetcd_storage::write_behind::remove_gradually(&retired, Some(&current))
    }

    /// The snapshot data openraft hands to `install_snapshot` as the received file. It is the
    /// file `begin_receiving_snapshot` created, unless the caller put another one in its place
    /// (openraft's own test suite hands over the leader's file): then its bytes are copied in,
    /// a stream like every other snapshot read.
    fn as_received_file(&self, mut data: std::fs::File) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::MetadataExt;
        let path = self.snapshot_dir.join(RECEIVING_FILE);
        let got = data.metadata()?;
        if let Ok(ours) = std::fs::metadata(&path) {
            if (got.dev(), got.ino()) == (ours.dev(), ours.ino()) {
                return Ok(data);
            }
        }
        std::io::Seek::seek(&mut data, std::io::SeekFrom::Start(0))?;
        let mut out = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        std::io::copy(&mut data, &mut out)?;
        out.sync_all()?;
        Ok(out)
    }

    /// Writes a snapshot of the store (one consistent revision, exported while writes go on) to
    /// the partial file and publishes it.
    fn write_snapshot(&self) -> Result<Meta, SnapshotBuildError> {
        let file = std::fs::File::create(self.snapshot_dir.join(BUILDING_FILE))?;
        let mut out = SnapshotWriter::new(file)?;
        let mut marker = None;
        self.store.export(&mut |tree, k, v| {
            // The marker exported with the data says exactly what this copy contains.
            if tree == schema::META_TREE && k == schema::CONSISTENT_INDEX.as_bytes() {
                marker = Some(v.to_vec());
            }
            Ok(out.record(tree, k, v)?)
        })?;
        let applied = marker
            .map(|v| Applied::decode(&v))
            .transpose()
            .map_err(|e| SnapshotBuildError::Marker(e.to_string()))?
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
        out.finish(&meta)?;
        self.publish(BUILDING_FILE)?;
        Ok(meta)
    }
}

/// Why a snapshot could not be built.
#[derive(Debug, thiserror::Error)]
enum SnapshotBuildError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] fetcd_storage::StorageError),
    #[error("applied marker: {0}")]
    Marker(String),
}

/// The current snapshot file, opened for openraft (which reads it from the start to send it).
async fn snapshot_for_openraft(file: std::fs::File) -> std::io::Result<tokio::fs::File> {
    let mut file = tokio::fs::File::from_std(file);
    tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(0)).await?;
    Ok(file)
}

impl RaftSnapshotBuilder<TypeConfig> for Arc<StateMachine> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let sm = self.clone();
        let built = tokio::task::spawn_blocking(move || {
            let meta = sm.write_snapshot()?;
            let file = std::fs::File::open(sm.snapshot_path())?;
            let bytes = file.metadata()?.len();
            Ok::<_, SnapshotBuildError>((meta, file, bytes))
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let (meta, file, bytes) = built.map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        tracing::info!(%meta, bytes, "snapshot built");
        let snapshot = snapshot_for_openraft(file)
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(snapshot),
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
                    let batch = cmd
                        .decode()
                        .map_err(|e| StorageIOError::apply(entry.log_id, &e))?;
                    batch.requests.into_iter().map(into_write_op).collect()
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
        if let (Some(d), Some(last)) = (self.log_durability.get(), applied.last_applied) {
            d.wait(last.index)
                .await
                .map_err(|e| StorageIOError::apply(last, &e))?;
        }
        self.set_applying(applied.last_applied);
        let long = batch.iter().any(|(op, _)| op.may_take_long());
        let store = &self.store;
        let results =
            crate::off_worker_if(long, || store.apply(batch)).map_err(|e| {
                match applied.last_applied {
                    Some(l) => StorageIOError::apply(l, &e),
                    None => StorageIOError::write_state_machine(&e),
                }
            })?;
        self.set_applied(applied);
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
    ) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        // openraft receives one snapshot at a time; a new one replaces a transfer left unfinished.
        // Read back by `install_snapshot`.
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.snapshot_dir.join(RECEIVING_FILE))
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        let err = |e: std::io::Error| StorageIOError::write_snapshot(Some(meta.signature()), &e);
        // Completes the chunk writes still in flight, then makes them durable.
        snapshot.sync_all().await.map_err(err)?;
        let file = snapshot.into_std().await;
        let sm = self.clone();
        let mut file = tokio::task::spawn_blocking(move || sm.as_received_file(file))
            .await
            .map_err(|e| err(std::io::Error::other(e)))?
            .map_err(err)?;
        let sent = snapshot_file::read_meta(&mut file).map_err(err)?;
        if sent.last_log_id != meta.last_log_id {
            let e = std::io::Error::other(format!(
                "received snapshot holds {:?}, announced as {:?}",
                sent.last_log_id, meta.last_log_id
            ));
            return Err(err(e).into());
        }
        let sm = self.clone();
        tokio::task::spawn_blocking(move || {
            sm.publish(RECEIVING_FILE)?;
            sm.load_records(file)
        })
        .await
        .map_err(|e| err(std::io::Error::other(e)))?
        .map_err(|e| StorageIOError::write_state_machine(&e))?;
        // The sender's marker may predate the meta it sent with; the meta is authoritative.
        let applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        self.set_applied(applied);
        tracing::info!(%meta, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let Some((meta, file)) = self
            .open_snapshot_file()
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
        else {
            return Ok(None);
        };
        let snapshot = snapshot_for_openraft(file)
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(snapshot),
        }))
    }
}
