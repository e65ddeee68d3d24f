//! etcd's KV service: validate, propose or read, map the error, fill the header.

use std::sync::Arc;

use fetcd_proto::etcdserverpb::request_op::Request as OpRequest;
use fetcd_proto::etcdserverpb::CompactionRequest;
use fetcd_proto::etcdserverpb::CompactionResponse;
use fetcd_proto::etcdserverpb::DeleteRangeRequest;
use fetcd_proto::etcdserverpb::DeleteRangeResponse;
use fetcd_proto::etcdserverpb::PutRequest;
use fetcd_proto::etcdserverpb::PutResponse;
use fetcd_proto::etcdserverpb::RangeRequest;
use fetcd_proto::etcdserverpb::TxnRequest;
use fetcd_proto::etcdserverpb::TxnResponse;
use fetcd_proto::raftpb::internal_raft_request::Request;
use fetcd_proto::wire::kv_server::KV as Kv;
use fetcd_proto::wire::EncodedRangeResponse;
use fetcd_storage::WriteResponse;
use tonic::Request as GrpcRequest;
use tonic::Response;
use tonic::Status;

use crate::node::EtcdNode;
use crate::status;
use crate::validate;

/// The KV service of one member.
#[derive(Debug, Clone)]
pub struct KvService {
    node: Arc<EtcdNode>,
}

impl KvService {
    /// A KV service over `node`.
    pub fn new(node: Arc<EtcdNode>) -> Self {
        KvService { node }
    }
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!("etcdserver: unexpected answer to {what}"))
}

/// True if the client asked for a serializable Txn: it has Ranges (at any depth) and every one
/// is serializable. Such a read-only Txn may skip the read barrier, as in etcd.
///
/// A Txn without any Range (compares only, or nothing at all) is read linearizably. etcd counts
/// it as serializable, since it has no Range that is not, so a follower answers its compares
/// from a state that may predate a write already acknowledged to the same client; the client
/// never asked for that.
fn txn_serializable(r: &TxnRequest) -> bool {
    /// Whether every Range under `r` is serializable; `ranges` counts them.
    fn all_serializable(r: &TxnRequest, ranges: &mut usize) -> bool {
        r.success
            .iter()
            .chain(&r.failure)
            .all(|op| match &op.request {
                Some(OpRequest::RequestRange(r)) => {
                    *ranges += 1;
                    r.serializable
                }
                Some(OpRequest::RequestTxn(t)) => all_serializable(t, ranges),
                _ => true,
            })
    }
    let mut ranges = 0;
    all_serializable(r, &mut ranges) && ranges > 0
}

#[tonic::async_trait]
impl Kv for KvService {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn range(
        &self,
        req: GrpcRequest<RangeRequest>,
    ) -> Result<Response<EncodedRangeResponse>, Status> {
        let r = req.into_inner();
        if !r.serializable && self.node.raft().is_learner() {
            return Err(crate::learner::not_for_learner());
        }
        validate::range(&r)?;
        self.node.read_barrier(r.serializable).await?;
        let store = self.node.store();
        let mut resp = fetcd_raft::off_worker_if(fetcd_storage::range_may_take_long(&r), || {
            store.range_encoded(&r)
        })
        .map_err(|e| status::storage_error(&e))?
        .map_err(|e| status::kv_error(&e))?;
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn put(&self, req: GrpcRequest<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let r = req.into_inner();
        validate::put(&r)?;
        match self.node.write(Request::Put(r)).await? {
            WriteResponse::Put(mut resp) => {
                self.node.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("put")),
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn delete_range(
        &self,
        req: GrpcRequest<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let r = req.into_inner();
        validate::delete_range(&r)?;
        match self.node.write(Request::DeleteRange(r)).await? {
            WriteResponse::DeleteRange(mut resp) => {
                self.node.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("delete range")),
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn txn(&self, req: GrpcRequest<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let r = req.into_inner();
        validate::txn(&r, self.node.max_txn_ops())?;
        if fetcd_storage::is_txn_read_only(&r) {
            // Reads need no log entry: a read point is enough (etcd does the same).
            self.node.read_barrier(txn_serializable(&r)).await?;
            let store = self.node.store();
            let long = fetcd_storage::txn_may_take_long(&r);
            let mut resp = fetcd_raft::off_worker_if(long, || store.read_txn(&r))
                .map_err(|e| status::storage_error(&e))?
                .map_err(|e| status::kv_error(&e))?;
            self.node.fill_header(&mut resp.header);
            return Ok(Response::new(resp));
        }
        match self.node.write(Request::Txn(r)).await? {
            WriteResponse::Txn(mut resp) => {
                self.node.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("txn")),
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn compact(
        &self,
        req: GrpcRequest<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let r = req.into_inner();
        let (rev, physical) = (r.revision, r.physical);
        match self.node.write(Request::Compaction(r)).await? {
            WriteResponse::Compaction(mut resp) => {
                if physical {
                    // etcd's `physical`: answer once this member has deleted what the
                    // compaction freed, not only decided it.
                    let store = self.node.store().clone();
                    tokio::task::spawn_blocking(move || store.wait_compaction(rev))
                        .await
                        .map_err(|e| Status::internal(e.to_string()))?;
                }
                self.node.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("compaction")),
        }
    }
}
