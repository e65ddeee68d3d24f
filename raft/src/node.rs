//! One fetcd member: opens the Raft log, the MVCC store and the state machine under the data
//! directory, starts openraft, bootstraps a new single-member cluster, and offers the two things
//! the server needs — propose a write and wait for a linearizable read point.
//!
//! Data directory layout (like etcd's `member/{wal,snap}`):
//! - `member/raft-log/`: the Raft log (raft-log chunks; fdatasync'd).
//! - `member/kv/`: the sled MVCC store (rebuildable from snapshot + log).
//! - `member/snap/`: the newest state-machine snapshot (fsync'd).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fetcd_proto::raftpb::InternalRaftRequest;
use fetcd_storage::KvStore;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use openraft::error::ClientWriteError;
use openraft::error::RaftError;
use openraft::BasicNode;
use openraft::SnapshotPolicy;
use prost::Message;
use tokio::sync::mpsc;
use tokio::sync::oneshot;

use crate::command::must_propose_alone;
use crate::command::ApplyResult;
use crate::command::Command;
use crate::log_store::LogStore;
use crate::network::Network;
use crate::state_machine::StateMachine;
use crate::typ;
use crate::NodeId;
use crate::TypeConfig;

/// How a member is set up.
#[derive(Clone, Debug)]
pub struct RaftNodeConfig {
    /// This member's id.
    pub node_id: NodeId,
    /// This member's advertised peer URL (kept in the membership).
    pub peer_url: String,
    /// Root of the member's data (`--data-dir`).
    pub data_dir: PathBuf,
    /// `--heartbeat-interval`.
    pub heartbeat_interval: Duration,
    /// `--election-timeout`.
    pub election_timeout: Duration,
    /// `--snapshot-count`: applied entries between snapshots.
    pub snapshot_count: u64,
    /// Log entries kept behind a snapshot (etcd's `--experimental-snapshot-catchup-entries`).
    pub snapshot_catchup_entries: u64,
    /// How long a proposal or read barrier may wait before `etcdserver: request timed out`.
    pub request_timeout: Duration,
}

impl RaftNodeConfig {
    /// etcd's defaults for a member with this id and data dir.
    pub fn new(node_id: NodeId, data_dir: PathBuf) -> Self {
        RaftNodeConfig {
            node_id,
            peer_url: "http://localhost:2380".into(),
            data_dir,
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            snapshot_count: 100_000,
            snapshot_catchup_entries: 5_000,
            request_timeout: Duration::from_secs(7),
        }
    }
}

/// Why a member could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The Raft log could not be opened.
    #[error("raft log: {0}")]
    Log(#[source] std::io::Error),
    /// The MVCC store could not be restored.
    #[error("kv store: {0}")]
    Storage(#[from] fetcd_storage::StorageError),
    /// The state machine could not be opened.
    #[error("state machine: {0}")]
    StateMachine(#[from] crate::state_machine::OpenError),
    /// openraft refused the configuration or failed to start.
    #[error("raft: {0}")]
    Raft(String),
}

/// Why a proposal or read barrier failed. None of these means the request was applied, except
/// [`ProposeError::Timeout`], after which the outcome is unknown (as in etcd).
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProposeError {
    /// There is no leader right now.
    #[error("no leader")]
    NoLeader,
    /// Another member leads; forwarding arrives with multi-member clusters.
    #[error("not leader; leader is {0:?}")]
    NotLeader(Option<NodeId>),
    /// The member is shutting down or hit a fatal error.
    #[error("stopped: {0}")]
    Stopped(String),
    /// No answer within the request timeout.
    #[error("request timed out")]
    Timeout,
}

/// Most requests one Raft entry carries.
const MAX_BATCH_REQUESTS: usize = 512;
/// Most request bytes one Raft entry carries (a single larger request still goes alone).
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Batches proposed but not yet answered. openraft 0.9 runs a leader's log appends and applies
/// in order, so one entry's fsync cannot overlap the next; two in flight keep the log busy while
/// the previous batch is applied and answered, and everything arriving meanwhile forms the next.
const MAX_BATCHES_IN_FLIGHT: usize = 2;

/// A request waiting to be proposed, and where its answer goes.
struct Proposal {
    req: InternalRaftRequest,
    size: usize,
    done: oneshot::Sender<Result<ApplyResult, ProposeError>>,
}

/// A running member.
pub struct RaftNode {
    raft: typ::Raft,
    state_machine: Arc<StateMachine>,
    config: RaftNodeConfig,
    proposals: mpsc::Sender<Proposal>,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.config.node_id)
            .finish()
    }
}

impl RaftNode {
    /// Opens (or creates) the member's stores and starts Raft. A fresh single member bootstraps
    /// itself as a one-member cluster; a restarted one resumes from its data dir.
    pub async fn open(config: RaftNodeConfig) -> Result<Self, OpenError> {
        let member = config.data_dir.join("member");
        std::fs::create_dir_all(&member).map_err(OpenError::Log)?;
        let log_store =
            LogStore::<TypeConfig>::open(&member.join("raft-log")).map_err(OpenError::Log)?;
        let store = Arc::new(KvStore::open_path(&member.join("kv"))?);
        let state_machine = StateMachine::open(store, &member.join("snap"))?;

        let election_ms = config.election_timeout.as_millis().max(1) as u64;
        let raft_config = openraft::Config {
            cluster_name: "fetcd".into(),
            heartbeat_interval: config.heartbeat_interval.as_millis().max(1) as u64,
            election_timeout_min: election_ms,
            election_timeout_max: election_ms * 2,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_count.max(1)),
            max_in_snapshot_log_to_keep: config.snapshot_catchup_entries,
            ..Default::default()
        }
        .validate()
        .map_err(|e| OpenError::Raft(e.to_string()))?;

        let raft = openraft::Raft::new(
            config.node_id,
            Arc::new(raft_config),
            Network,
            log_store,
            state_machine.clone(),
        )
        .await
        .map_err(|e| OpenError::Raft(e.to_string()))?;

        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| OpenError::Raft(e.to_string()))?;
        if !initialized {
            let members = BTreeMap::from([(
                config.node_id,
                BasicNode {
                    addr: config.peer_url.clone(),
                },
            )]);
            raft.initialize(members)
                .await
                .map_err(|e| OpenError::Raft(e.to_string()))?;
            tracing::info!(
                id = config.node_id,
                "bootstrapped a new single-member cluster"
            );
        } else if is_sole_voter(&raft, config.node_id) {
            // A lone member need not sit out an election timeout after a restart.
            if let Err(e) = raft.trigger().elect().await {
                tracing::warn!(error = %e, "could not trigger election");
            }
        }
        let (proposals, rx) = mpsc::channel(16 * MAX_BATCH_REQUESTS);
        tokio::spawn(run_batcher(raft.clone(), rx, config.request_timeout));
        Ok(RaftNode {
            raft,
            state_machine,
            config,
            proposals,
        })
    }

    /// Waits until some member leads, up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, ProposeError> {
        let mut rx = self.raft.metrics();
        let res = tokio::time::timeout(timeout, async {
            loop {
                if let Some(l) = rx.borrow().current_leader {
                    return Ok(l);
                }
                if rx.changed().await.is_err() {
                    return Err(ProposeError::Stopped("raft metrics closed".into()));
                }
            }
        })
        .await;
        res.unwrap_or(Err(ProposeError::NoLeader))
    }

    /// Proposes `req` and returns the state machine's answer once it is applied here. Requests
    /// proposed concurrently share Raft entries (see [`run_batcher`]).
    pub async fn propose(&self, req: InternalRaftRequest) -> Result<ApplyResult, ProposeError> {
        let (done, answer) = oneshot::channel();
        let size = req.encoded_len();
        self.proposals
            .send(Proposal { req, size, done })
            .await
            .map_err(|_| ProposeError::Stopped("proposal queue closed".into()))?;
        match tokio::time::timeout(self.config.request_timeout, answer).await {
            Err(_) => Err(ProposeError::Timeout),
            Ok(Err(_)) => Err(ProposeError::Stopped("proposal dropped".into())),
            Ok(Ok(r)) => r,
        }
    }

    /// Returns once this member's state machine has applied everything committed before the call,
    /// as confirmed by a quorum (openraft's read index). A read after this is linearizable.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        let fut = self.raft.ensure_linearizable();
        match tokio::time::timeout(self.config.request_timeout, fut).await {
            Err(_) => Err(ProposeError::Timeout),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(e))) => match e {
                openraft::error::CheckIsLeaderError::ForwardToLeader(f) => match f.leader_id {
                    None => Err(ProposeError::NoLeader),
                    Some(l) => Err(ProposeError::NotLeader(Some(l))),
                },
                openraft::error::CheckIsLeaderError::QuorumNotEnough(_) => {
                    Err(ProposeError::NoLeader)
                }
            },
            Ok(Err(RaftError::Fatal(f))) => Err(ProposeError::Stopped(f.to_string())),
        }
    }

    /// The MVCC store, for local reads.
    pub fn store(&self) -> &Arc<KvStore> {
        self.state_machine.store()
    }

    /// `--data-dir`.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.config.data_dir
    }

    /// This member's id.
    pub fn id(&self) -> NodeId {
        self.config.node_id
    }

    /// The current Raft term, for response headers.
    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// The current leader, if known.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// True if this member is the leader now.
    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.config.node_id)
    }

    /// The underlying Raft handle (metrics, membership, tests).
    pub fn raft(&self) -> &typ::Raft {
        &self.raft
    }

    /// Stops Raft and flushes the store. Acknowledged writes are already durable in the log; the
    /// flush only shortens replay on the next start.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        if let Err(e) = self.store().flush() {
            tracing::warn!(error = %e, "kv store flush on shutdown");
        }
    }
}

/// Groups queued proposals into Raft entries: whatever is waiting when a batch can be proposed
/// goes into one entry (one append, one fdatasync, one state-machine transaction), up to
/// [`MAX_BATCH_REQUESTS`] / [`MAX_BATCH_BYTES`]. A request that must go alone (compaction) ends the
/// batch and is proposed by itself.
async fn run_batcher(raft: typ::Raft, mut rx: mpsc::Receiver<Proposal>, timeout: Duration) {
    let mut in_flight = FuturesUnordered::new();
    let mut carry: Option<Proposal> = None;
    loop {
        if in_flight.len() >= MAX_BATCHES_IN_FLIGHT {
            in_flight.next().await;
            continue;
        }
        let first = match carry.take() {
            Some(p) => p,
            None => tokio::select! {
                biased;
                Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
                p = rx.recv() => match p {
                    Some(p) => p,
                    None => break,
                },
            },
        };
        let alone = must_propose_alone(&first.req);
        let mut bytes = first.size;
        let mut batch = vec![first];
        while !alone && batch.len() < MAX_BATCH_REQUESTS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) if must_propose_alone(&p.req) || bytes + p.size > MAX_BATCH_BYTES => {
                    carry = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.size;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        in_flight.push(propose_batch(raft.clone(), batch, timeout));
    }
    while in_flight.next().await.is_some() {}
}

/// Proposes one batch as one entry and hands each request its own answer.
async fn propose_batch(raft: typ::Raft, batch: Vec<Proposal>, timeout: Duration) {
    let (reqs, dones): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.req, p.done)).unzip();
    let n = reqs.len();
    let result = match tokio::time::timeout(timeout, raft.client_write(Command::new(reqs))).await {
        Err(_) => Err(ProposeError::Timeout),
        Ok(Ok(resp)) if resp.data.0.len() == n => Ok(resp.data.0),
        Ok(Ok(resp)) => Err(ProposeError::Stopped(format!(
            "state machine answered {} of {n} requests",
            resp.data.0.len()
        ))),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => match f.leader_id {
            None => Err(ProposeError::NoLeader),
            Some(l) => Err(ProposeError::NotLeader(Some(l))),
        },
        Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
            Err(ProposeError::Stopped(e.to_string()))
        }
        Ok(Err(RaftError::Fatal(f))) => Err(ProposeError::Stopped(f.to_string())),
    };
    match result {
        Ok(answers) => {
            for (done, answer) in dones.into_iter().zip(answers) {
                // The client may have given up (timeout); its answer has nowhere to go.
                let _ = done.send(Ok(answer));
            }
        }
        Err(e) => {
            for done in dones {
                let _ = done.send(Err(e.clone()));
            }
        }
    }
}

fn is_sole_voter(raft: &typ::Raft, id: NodeId) -> bool {
    let m = raft.metrics().borrow().membership_config.clone();
    let voters: Vec<NodeId> = m.membership().voter_ids().collect();
    voters == [id]
}
