//! etcd's Maintenance service. Every answer comes from this member's own state (its store, its
//! Raft metrics, its disk), as etcd's do, so it works unchanged once there are several members.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fetcd_proto::etcdserverpb as pb;
use fetcd_proto::etcdserverpb::alarm_request::AlarmAction;
use fetcd_proto::etcdserverpb::maintenance_server::Maintenance;
use fetcd_proto::etcdserverpb::AlarmType;
use fetcd_proto::raftpb::internal_raft_request::Request;
use fetcd_proto::raftpb::maintenance_peer_server::MaintenancePeer;
use fetcd_proto::status as msg;
use fetcd_raft::maintenance::TransferError;
use fetcd_storage::write_behind::WriteBehind;
use fetcd_storage::WriteResponse;
use futures::Stream;
use tonic::Request as GrpcRequest;
use tonic::Response;
use tonic::Status;

use crate::node::EtcdNode;
use crate::snapshot;
use crate::status;
use crate::version;

/// Size of one `SnapshotResponse.blob`, as etcd (32 KiB).
const SNAPSHOT_CHUNK: usize = 32 * 1024;
/// How long a `dbSizeInUse` estimate is reused: it reads every record of the store.
const IN_USE_CACHE: Duration = Duration::from_secs(5);

/// The Maintenance service of one member.
#[derive(Debug, Clone)]
pub struct MaintenanceService {
    node: Arc<EtcdNode>,
}

impl MaintenanceService {
    /// A Maintenance service over `node`.
    pub fn new(node: Arc<EtcdNode>) -> Self {
        MaintenanceService { node }
    }

    /// Live bytes of the store, estimated at most [`IN_USE_CACHE`] ago.
    async fn db_size_in_use(&self) -> Result<u64, Status> {
        self.node.db_size_in_use(IN_USE_CACHE).await
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        let mut h = None;
        self.node.fill_header(&mut h);
        h
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// This member's HashKV at `rev` (0: its current revision), for clients and for peers.
async fn hash_kv(node: &EtcdNode, rev: i64) -> Result<pb::HashKvResponse, Status> {
    let store = node.store().clone();
    let h = tokio::task::spawn_blocking(move || store.hash_kv(rev))
        .await
        .map_err(join_error)?
        .map_err(|e| status::storage_error(&e))?
        .map_err(|e| status::kv_error(&e))?;
    let mut header = Some(pb::ResponseHeader {
        revision: h.current_revision,
        ..Default::default()
    });
    node.fill_header(&mut header);
    Ok(pb::HashKvResponse {
        header,
        hash: h.hash,
        compact_revision: h.compact_revision,
        hash_revision: h.hash_revision,
    })
}

/// The peer-port side of Maintenance: what members ask of each other (etcd's peer handler), so
/// that a learner, which refuses HashKV on its client port, is still checked for corruption.
#[derive(Debug, Clone)]
pub struct MaintenancePeerService {
    node: Arc<EtcdNode>,
}

impl MaintenancePeerService {
    /// The peer-port maintenance service of `node`.
    pub fn new(node: Arc<EtcdNode>) -> Self {
        MaintenancePeerService { node }
    }
}

#[tonic::async_trait]
impl MaintenancePeer for MaintenancePeerService {
    async fn hash_kv(
        &self,
        req: GrpcRequest<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        hash_kv(&self.node, req.into_inner().revision)
            .await
            .map(Response::new)
    }
}

fn join_error(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("etcdserver: {e}"))
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    type SnapshotStream = BoxStream<pb::SnapshotResponse>;

    /// GET answers from this member's alarm set (after a read barrier, so it includes every
    /// alarm committed before the call); ACTIVATE and DEACTIVATE go through Raft and answer
    /// with the alarm if it changed, as etcd.
    async fn alarm(
        &self,
        req: GrpcRequest<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        let r = req.into_inner();
        let mut resp = match AlarmAction::try_from(r.action) {
            Ok(AlarmAction::Get) => {
                self.node.read_barrier(false).await?;
                let t = AlarmType::try_from(r.alarm).unwrap_or(AlarmType::None);
                pb::AlarmResponse {
                    header: None,
                    alarms: self.node.store().alarms(t),
                }
            }
            Ok(AlarmAction::Activate) | Ok(AlarmAction::Deactivate) => {
                match self.node.write(Request::Alarm(r)).await? {
                    WriteResponse::Alarm(a) => a,
                    _ => return Err(Status::internal("etcdserver: unexpected answer to alarm")),
                }
            }
            Err(_) => return Err(Status::invalid_argument("etcdserver: unknown alarm action")),
        };
        resp.header = None;
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn status(
        &self,
        _: GrpcRequest<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let raft = self.node.raft();
        let st = raft.raft_status();
        let errors = self
            .node
            .store()
            .alarms(AlarmType::None)
            .iter()
            .map(fetcd_storage::alarm_text)
            .collect();
        let resp = pb::StatusResponse {
            header: self.header(),
            version: version::ETCD_SERVER_VERSION.into(),
            db_size: self.node.quota().db_size(raft) as i64,
            leader: st.leader,
            raft_index: st.last_log_index,
            raft_term: st.term,
            raft_applied_index: st.applied_index,
            errors,
            db_size_in_use: self.db_size_in_use().await? as i64,
            is_learner: st.is_learner,
            ..Default::default()
        };
        Ok(Response::new(resp))
    }

    /// Rewrites the store into a fresh sled database and swaps it in (see
    /// `fetcd_storage::defrag`), so space freed by compaction goes back to the file system and
    /// `dbSize` shrinks, as etcd's defragmentation of its bolt file. Writes on this member wait
    /// meanwhile, as in etcd.
    async fn defragment(
        &self,
        _: GrpcRequest<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        let before = self.node.quota().db_size(self.node.raft());
        tracing::info!(db_size = before, "starting defragment");
        let store = self.node.store().clone();
        let res = tokio::task::spawn_blocking(move || store.defragment())
            .await
            .map_err(join_error)?;
        self.node.quota().forget_size();
        res.map_err(|e| status::storage_error(&e))?;
        let after = self.node.quota().db_size(self.node.raft());
        tracing::info!(
            db_size_before = before,
            db_size_after = after,
            "finished defragment"
        );
        Ok(Response::new(pb::DefragmentResponse { header: None }))
    }

    async fn hash(
        &self,
        _: GrpcRequest<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        let store = self.node.store().clone();
        let hash = tokio::task::spawn_blocking(move || store.hash_all())
            .await
            .map_err(join_error)?
            .map_err(|e| status::storage_error(&e))?;
        Ok(Response::new(pb::HashResponse {
            header: self.header(),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: GrpcRequest<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        hash_kv(&self.node, req.into_inner().revision)
            .await
            .map(Response::new)
    }

    /// Streams one consistent copy of the store (see [`crate::snapshot`]) in 32 KiB chunks. The
    /// copy goes to an unnamed file in the data dir first (writes go on meanwhile; see
    /// `KvStore::export`), so a slow client holds no store lock and no memory.
    async fn snapshot(
        &self,
        _: GrpcRequest<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let store = self.node.store().clone();
        let dir = self.node.raft().data_dir().to_path_buf();
        // The copy goes to an unnamed file in the data directory (gone when closed, even after a
        // crash), then to the client chunk by chunk: never the whole store in memory.
        let (file, total) = tokio::task::spawn_blocking(move || {
            let io = |source| snapshot::SnapshotError::Io {
                path: dir.clone(),
                source,
            };
            let file = tempfile::tempfile_in(&dir).map_err(io)?;
            // Written a megabyte at a time to disk, not in one burst the Raft log's writes
            // would wait behind (see `fetcd_storage::write_behind`).
            let mut out = std::io::BufWriter::with_capacity(1 << 20, WriteBehind::new(file));
            let total = snapshot::write(&store, &mut out)?;
            let mut file = out
                .into_inner()
                .map_err(|e| io(e.into_error()))?
                .finish()
                .map_err(io)?;
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0)).map_err(io)?;
            Ok::<_, snapshot::SnapshotError>((file, total))
        })
        .await
        .map_err(join_error)?
        .map_err(|e| Status::internal(format!("etcdserver: snapshot: {e}")))?;
        let header = self.header();
        tracing::info!(bytes = total, "sending snapshot");
        let file = tokio::fs::File::from_std(file);
        let chunks =
            futures::stream::unfold((file, total), move |(mut file, remaining)| async move {
                if remaining == 0 {
                    return None;
                }
                let n = remaining.min(SNAPSHOT_CHUNK as u64);
                let mut blob = vec![0; n as usize];
                match tokio::io::AsyncReadExt::read_exact(&mut file, &mut blob).await {
                    Ok(_) => {
                        let resp = pb::SnapshotResponse {
                            header,
                            remaining_bytes: remaining - n,
                            blob,
                            version: version::ETCD_SERVER_VERSION.into(),
                        };
                        Some((Ok(resp), (file, remaining - n)))
                    }
                    Err(e) => {
                        let status = Status::internal(format!("etcdserver: snapshot: {e}"));
                        Some((Err(status), (file, 0)))
                    }
                }
            });
        Ok(Response::new(Box::pin(chunks)))
    }

    /// etcd's v3rpc answers `not leader` unless this member leads (etcdctl sends MoveLeader to
    /// the leader it finds through Status), then `bad leader transferee` for a non-voter.
    async fn move_leader(
        &self,
        req: GrpcRequest<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        let target = req.into_inner().target_id;
        match self.node.raft().transfer_leader(target).await {
            Ok(()) => Ok(Response::new(pb::MoveLeaderResponse {
                header: self.header(),
            })),
            Err(TransferError::NotLeader) => Err(Status::failed_precondition(msg::ERR_NOT_LEADER)),
            Err(TransferError::BadTransferee) => {
                Err(Status::failed_precondition(msg::ERR_BAD_LEADER_TRANSFEREE))
            }
            Err(TransferError::Timeout) => {
                Err(Status::unavailable(msg::ERR_TIMEOUT_LEADER_TRANSFER))
            }
        }
    }

    async fn downgrade(
        &self,
        _: GrpcRequest<pb::DowngradeRequest>,
    ) -> Result<Response<pb::DowngradeResponse>, Status> {
        Err(Status::unimplemented("fetcd: Downgrade is not implemented"))
    }
}
