//! The server's view of its member: propose with size limits, linearizable read points, and
//! etcd's response header.

use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use fetcd_proto::etcdserverpb::alarm_request::AlarmAction;
use fetcd_proto::etcdserverpb::AlarmRequest;
use fetcd_proto::etcdserverpb::AlarmType;
use fetcd_proto::etcdserverpb::ResponseHeader;
use fetcd_proto::raftpb::internal_raft_request::Request;
use fetcd_proto::raftpb::InternalRaftRequest;
use fetcd_proto::raftpb::RequestHeader;
use fetcd_raft::ApplyResult;
use fetcd_raft::RaftNode;
use fetcd_storage::KvStore;
use fetcd_storage::WriteResponse;
use prost::Message;
use tonic::Status;

use crate::lessor::Lessor;
use crate::metrics::Metrics;
use crate::quota::Quota;
use crate::status;

/// Shared by every service of one member.
#[derive(Debug)]
pub struct EtcdNode {
    raft: RaftNode,
    cluster_id: u64,
    member_id: u64,
    max_request_bytes: usize,
    max_txn_ops: usize,
    next_request_id: std::sync::atomic::AtomicU64,
    lessor: Lessor,
    quota: Quota,
    metrics: Metrics,
    in_use: std::sync::Mutex<InUse>,
}

/// The last measurement of the store's live bytes (`dbSizeInUse`), which reads every record.
#[derive(Debug, Default)]
struct InUse {
    last: Option<(Instant, u64)>,
    /// A scrape started a measurement in the background.
    refreshing: bool,
}

/// How old a `dbSizeInUse` measurement `/metrics` serves before it starts a new one (in the
/// background; the scrape gets the older value meanwhile).
const SCRAPE_IN_USE_AGE: Duration = Duration::from_secs(30);

impl EtcdNode {
    /// Wraps a running member.
    pub fn new(
        raft: RaftNode,
        cluster_id: u64,
        max_request_bytes: usize,
        max_txn_ops: usize,
        lessor: Lessor,
    ) -> Arc<Self> {
        let member_id = raft.id();
        Arc::new(EtcdNode {
            raft,
            cluster_id,
            member_id,
            max_request_bytes,
            max_txn_ops,
            next_request_id: std::sync::atomic::AtomicU64::new(1),
            lessor,
            quota: Quota::default(),
            metrics: Metrics::default(),
            in_use: std::sync::Mutex::default(),
        })
    }

    /// Lease deadlines (kept while this member leads).
    pub fn lessor(&self) -> &Lessor {
        &self.lessor
    }

    /// The backend quota (`--quota-backend-bytes`) and the member's measured size.
    pub fn quota(&self) -> &Quota {
        &self.quota
    }

    /// Counters served on `/metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn in_use(&self) -> std::sync::MutexGuard<'_, InUse> {
        self.in_use.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store's live bytes (`dbSizeInUse`), measured at most `max_age` ago.
    pub async fn db_size_in_use(&self, max_age: Duration) -> Result<u64, Status> {
        if let Some((at, n)) = self.in_use().last {
            if at.elapsed() < max_age {
                return Ok(n);
            }
        }
        self.measure_in_use().await
    }

    async fn measure_in_use(&self) -> Result<u64, Status> {
        let store = self.store().clone();
        let n = tokio::task::spawn_blocking(move || store.live_bytes())
            .await
            .map_err(|e| Status::internal(format!("etcdserver: {e}")))?
            .map_err(|e| status::storage_error(&e))?;
        self.in_use().last = Some((Instant::now(), n));
        Ok(n)
    }

    /// The last `dbSizeInUse` measured, if any.
    pub fn db_size_in_use_measured(&self) -> Option<u64> {
        self.in_use().last.map(|(_, n)| n)
    }

    /// Brings the measurement of `dbSizeInUse` up to date for a scrape without making scrapes
    /// wait on a large store: only the first one waits; later ones get the last value while
    /// one older than [`SCRAPE_IN_USE_AGE`] is replaced in the background.
    pub async fn refresh_db_size_in_use(self: &Arc<Self>) {
        let (start, first) = {
            let mut m = self.in_use();
            let stale = m
                .last
                .is_none_or(|(at, _)| at.elapsed() >= SCRAPE_IN_USE_AGE);
            let start = stale && !m.refreshing;
            m.refreshing |= start;
            (start, m.last.is_none())
        };
        if !start {
            return;
        }
        let node = self.clone();
        let measure = async move {
            if let Err(e) = node.measure_in_use().await {
                tracing::warn!(error = %e, "measuring dbSizeInUse failed");
            }
            node.in_use().refreshing = false;
        };
        if first {
            measure.await;
        } else {
            tokio::spawn(measure);
        }
    }

    /// `--max-txn-ops`.
    pub fn max_txn_ops(&self) -> usize {
        self.max_txn_ops
    }

    /// The Raft member.
    pub fn raft(&self) -> &RaftNode {
        &self.raft
    }

    /// The MVCC store, for local reads.
    pub fn store(&self) -> &Arc<KvStore> {
        self.raft.store()
    }

    /// etcd's response header: cluster and member ids, the Raft term, and `revision` (or the
    /// current revision when the answer did not set one).
    pub fn fill_header(&self, header: &mut Option<ResponseHeader>) {
        let h = header.get_or_insert_with(ResponseHeader::default);
        h.cluster_id = self.cluster_id;
        h.member_id = self.member_id;
        h.raft_term = self.raft.term();
        if h.revision == 0 {
            h.revision = self.store().current_revision();
        }
    }

    /// Fills only the ids and the term, keeping `revision` as it is (even 0, which some watch
    /// responses carry in etcd).
    pub fn fill_ids(&self, header: &mut Option<ResponseHeader>) {
        let h = header.get_or_insert_with(ResponseHeader::default);
        h.cluster_id = self.cluster_id;
        h.member_id = self.member_id;
        h.raft_term = self.raft.term();
    }

    /// Proposes a write (KV, lease or alarm) and returns the store's answer, refusing requests
    /// over `--max-request-bytes` before they reach the log, and writes that would grow the
    /// store past the quota (raising `NOSPACE`, as etcd's `quotaAlarmer`).
    pub async fn write(&self, request: Request) -> Result<WriteResponse, Status> {
        if matches!(
            request,
            Request::Put(_) | Request::Txn(_) | Request::LeaseGrant(_)
        ) && !self.quota.available(&self.raft, request.encoded_len())
        {
            self.raise_no_space().await;
            return Err(status::no_space());
        }
        self.propose(request).await
    }

    /// Raises this member's `NOSPACE` alarm through Raft (unless it is active already). A
    /// failure is only logged: the refused request gets `database space exceeded` either way.
    async fn raise_no_space(&self) {
        let raised = self
            .store()
            .alarms(AlarmType::Nospace)
            .iter()
            .any(|a| a.member_id == self.member_id);
        if raised {
            return;
        }
        tracing::warn!(
            quota = self.quota.bytes(),
            size = self.quota.db_size(&self.raft),
            "database space exceeded; raising NOSPACE"
        );
        let alarm = Request::Alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: self.member_id,
            alarm: AlarmType::Nospace as i32,
        });
        if let Err(e) = self.propose(alarm).await {
            tracing::warn!(error = %e, "could not raise NOSPACE");
        }
    }

    /// Proposes `request` without the quota check.
    async fn propose(&self, request: Request) -> Result<WriteResponse, Status> {
        let id = self
            .next_request_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Grants and checkpoints carry who proposed them and when, for the lessor's restart rule.
        let (proposer, proposed_at_unix_ms) = match request {
            Request::LeaseGrant(_) | Request::LeaseCheckpoint(_) => {
                (self.member_id, crate::lessor::unix_ms())
            }
            _ => (0, 0),
        };
        let req = InternalRaftRequest {
            header: Some(RequestHeader {
                id,
                proposer,
                proposed_at_unix_ms,
                ..Default::default()
            }),
            request: Some(request),
        };
        if req.encoded_len() > self.max_request_bytes {
            return Err(status::request_too_large());
        }
        let _pending = self.metrics.proposal_pending();
        match self.raft.propose(req).await {
            Err(e) => {
                self.metrics.proposal_failed();
                Err(status::propose_error(&e))
            }
            Ok(ApplyResult::Write(w)) => Ok(w),
            Ok(ApplyResult::Refused(e)) => Err(status::kv_error(&e)),
            // Cluster metadata (member attributes) has no answer of its own.
            Ok(ApplyResult::None) => Ok(WriteResponse::Noop),
        }
    }

    /// Waits for a linearizable read point (openraft read index); `serializable` reads skip it.
    pub async fn read_barrier(&self, serializable: bool) -> Result<(), Status> {
        if serializable {
            return Ok(());
        }
        self.raft
            .read_barrier()
            .await
            .map_err(|e| status::propose_error(&e))
    }
}
