//! One fetcd member: opens the Raft log, the MVCC store and the state machine under the data
//! directory, starts openraft, bootstraps a new single-member cluster, and offers the two things
//! the server needs — propose a write and wait for a linearizable read point.
//!
//! Data directory layout (like etcd's `member/{wal,snap}`):
//! - `member/wal/`: the Raft log (pre-zeroed segments; fdatasync'd).
//! - `member/kv/`: the sled MVCC store (rebuildable from snapshot + log).
//! - `member/snap/`: the newest state-machine snapshot (fsync'd).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use fetcd_proto::raftpb::InternalRaftBatch;
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
use crate::log_store::SyncGauge;
use crate::membership::MembershipChange;
use crate::membership::MembershipError;
use crate::network::Network;
use crate::network::PeerError;
use crate::network::PeerService;
use crate::read_index::ReadIndex;
use crate::state_machine::StateMachine;
use crate::transfer::Pauses;
use crate::typ;
use crate::NodeId;
use crate::TypeConfig;
use fetcd_proto::raftpb::raft_peer_server::RaftPeerServer;

/// How a member is set up.
#[derive(Clone, Debug)]
pub struct RaftNodeConfig {
    /// This member's id.
    pub node_id: NodeId,
    /// This member's advertised peer URL (kept in the membership).
    pub peer_url: String,
    /// Every initial member and its peer URL (etcd's `--initial-cluster`); empty means this
    /// member alone.
    pub initial_members: BTreeMap<NodeId, String>,
    /// `--initial-cluster-state existing`: join a running cluster (the leader adds this member)
    /// instead of bootstrapping a new one.
    pub join_existing: bool,
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
            initial_members: BTreeMap::new(),
            join_existing: false,
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
    /// Leadership moved while the request was being proposed; it was not applied.
    #[error("leader changed")]
    LeaderChanged,
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
/// While the writers move in lockstep ([`Lockstep`]), a batch takes at most this share (1/n) of
/// the concurrent writers, counted as the most write requests this member held at once (queued,
/// or in the batches in flight) lately. One entry for all of them keeps every client in lockstep:
/// the worker decodes all their requests, syncs once, applies and answers all, then idles while
/// the clients turn the answers into new requests, and they idle meanwhile. 64 writers on one
/// connection got one sync per 2.8 ms cycle, each for all 64, with the worker busy 54 % of it.
/// With smaller entries, answers flow back while the next entries sync. The two batches in
/// flight are appended back to back, so a quarter makes two groups of requests that take turns
/// (docs/benchmarks.md).
const BATCH_SHARE: usize = 4;
/// With fewer concurrent writers than this, batches are not capped: each client's share of a
/// cycle is short, and the extra syncs cost more than the overlap gains (put with 16 clients:
/// 10–16 % fewer puts/s when split in two).
const SPLIT_FROM_WRITERS: usize = 32;
/// How long a peak of held requests counts as the number of concurrent writers.
const WRITERS_WINDOW: Duration = Duration::from_secs(1);
/// How long uncapped batches are watched for lockstep before the count starts over.
const LOCKSTEP_WINDOW: Duration = Duration::from_millis(100);
/// Uncapped batches seen before lockstep is decided; 7/8 of them must have found nearly every
/// writer queued.
const LOCKSTEP_SAMPLES: u32 = 16;
/// How long batches stay capped before they are let go uncapped again, to see whether the
/// writers still move in lockstep.
const LOCKSTEP_RECHECK: Duration = Duration::from_secs(1);

/// A request waiting to be proposed, and where its answer goes.
struct Proposal {
    req: InternalRaftRequest,
    size: usize,
    done: oneshot::Sender<Result<ApplyResult, ProposeError>>,
}

/// A read barrier waiting for the next read-index round.
type ReadWaiter = oneshot::Sender<Result<(), ProposeError>>;

/// What the proposal and read-index tasks share.
struct Shared {
    raft: typ::Raft,
    network: Network,
    id: NodeId,
    timeout: Duration,
    /// This member's appends waiting for their fdatasync (see [`run_batcher`]).
    log_syncs: Arc<SyncGauge>,
    state_machine: Arc<StateMachine>,
    pauses: Arc<Pauses>,
    read_index: Arc<ReadIndex>,
    /// Batches the batcher has in flight.
    batches: AtomicUsize,
    /// Proposals in flight that went around the batcher ([`RaftNode::propose`]).
    lone: AtomicUsize,
    /// The batcher's estimate of concurrent writers ([`Writers`]) when it last formed a batch.
    writers: AtomicUsize,
    /// Proposals that went around the batcher so far.
    lone_total: AtomicU64,
}

/// Decrements a count of proposals in flight when the proposal is done or dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The Raft log's directory under `member/`.
const LOG_DIR: &str = "wal";

/// Where fetcd kept its Raft log before `crate::wal` (in the `raft-log` crate's format).
const OLD_LOG_DIR: &str = "raft-log";

/// Opens the member's Raft log. A log left in the earlier format is refused rather than
/// ignored: starting from an empty log next to a state machine that applied it would lose the
/// entries it holds that the state machine does not.
fn open_log(member: &std::path::Path) -> std::io::Result<LogStore<TypeConfig>> {
    let old = member.join(OLD_LOG_DIR);
    if std::fs::read_dir(&old).is_ok_and(|mut d| d.next().is_some()) {
        return Err(std::io::Error::other(format!(
            "{} holds a Raft log in the format of fetcd before its own write-ahead log; this \
             version cannot read it. Take a snapshot with the old version (etcdctl snapshot \
             save) and restore it with `fetcd snapshot restore`",
            old.display()
        )));
    }
    LogStore::open(&member.join(LOG_DIR))
}

/// The MVCC store's directory under `member/`.
const KV_DIR: &str = "kv";

/// Opens the member's MVCC store. sled is a cache of the Raft log (see `state_machine`): it
/// does not fsync, and sled 0.34 has open crash-recovery bugs. A store whose files are damaged
/// ([`fetcd_storage::StorageError::is_damage`]) is moved aside to `kv.damaged-<unix seconds>`
/// (only the newest such copy is kept, for inspection) and started empty: the state machine
/// then reloads the newest snapshot, and openraft re-applies the log after it (openraft refuses
/// to start if the log does not reach back that far). A panic of sled while it opens the store
/// counts as damage too; any other error stops the start.
fn open_store(member: &std::path::Path) -> Result<KvStore, fetcd_storage::StorageError> {
    open_store_with(member, KvStore::open_path)
}

/// [`open_store`], opening the store with `open`.
fn open_store_with(
    member: &std::path::Path,
    open: impl Fn(&std::path::Path) -> Result<KvStore, fetcd_storage::StorageError>,
) -> Result<KvStore, fetcd_storage::StorageError> {
    let dir = member.join(KV_DIR);
    let e = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open(&dir))) {
        Ok(Err(e)) if e.is_damage() => e.to_string(),
        Ok(other) => return other,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            format!("opening the store panicked: {what}")
        }
    };
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let prefix = format!("{KV_DIR}.damaged-");
    let aside = member.join(format!("{prefix}{unix}"));
    tracing::error!(
        error = %e,
        moved_to = %aside.display(),
        "the MVCC store is damaged; rebuilding it from the snapshot and the Raft log"
    );
    for old in std::fs::read_dir(member)? {
        let old = old?.path();
        let name = old.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with(&prefix) {
            std::fs::remove_dir_all(&old)?;
        }
    }
    std::fs::rename(&dir, &aside)?;
    std::fs::File::open(member)?.sync_all()?;
    open(&dir)
}

/// A running member.
pub struct RaftNode {
    raft: typ::Raft,
    state_machine: Arc<StateMachine>,
    pub(crate) config: RaftNodeConfig,
    proposals: mpsc::Sender<Proposal>,
    reads: mpsc::Sender<ReadWaiter>,
    pub(crate) network: Network,
    /// Leader-transfer pauses of this member (see [`crate::transfer`]).
    pub(crate) pauses: Arc<Pauses>,
    /// This member's read index when it leads (see [`crate::read_index`]).
    read_index: Arc<ReadIndex>,
    /// One leader transfer at a time.
    pub(crate) transferring: tokio::sync::Mutex<()>,
    /// Whether this member is a learner now ([`track_learner`]).
    learner: Arc<AtomicBool>,
    /// What the batcher shares, for writes that go around it.
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.config.node_id)
            .finish()
    }
}

impl RaftNode {
    /// Opens (or creates) the member's stores and starts Raft. A fresh member of a new cluster
    /// bootstraps it with the initial membership (every initial member writes the same first
    /// entry, so the cluster forms exactly once however they start); a joining member waits to
    /// be added; a restarted one resumes from its data dir. The caller serves
    /// [`RaftNode::peer_service`] on the peer listeners right after this returns: initializing
    /// first matters, since a vote arriving before would make this member refuse to.
    pub async fn open(config: RaftNodeConfig) -> Result<Self, OpenError> {
        let member = config.data_dir.join("member");
        std::fs::create_dir_all(&member).map_err(OpenError::Log)?;
        // Both read their whole files on a restart (the log's chunks since the last purge, the
        // MVCC store's key tree into the key index): side by side they take the longer's time.
        let (log_store, store) = std::thread::scope(|s| {
            let log = s.spawn(|| open_log(&member));
            let store = open_store(&member);
            let log = log
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("opening the raft log panicked")));
            (log, store)
        });
        let log_store = log_store.map_err(OpenError::Log)?;
        let log_syncs = log_store.sync_gauge();
        log_store.set_member(config.node_id);
        let store = Arc::new(store?);
        let state_machine = StateMachine::open(store, &member.join("snap"))?;
        state_machine.apply_only_durable(log_store.durability());

        let election_ms = config.election_timeout.as_millis().max(1) as u64;
        let raft_config = openraft::Config {
            cluster_name: "fetcd".into(),
            heartbeat_interval: config.heartbeat_interval.as_millis().max(1) as u64,
            election_timeout_min: election_ms,
            election_timeout_max: election_ms * 2,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_count.max(1)),
            max_in_snapshot_log_to_keep: config.snapshot_catchup_entries,
            // Entries carry batches of up to MAX_BATCH_BYTES; bound one AppendEntries message.
            max_payload_entries: 64,
            ..Default::default()
        }
        .validate()
        .map_err(|e| OpenError::Raft(e.to_string()))?;

        let network = Network::new(config.node_id, log_store.durability());
        let log = log_store.clone();
        let raft = openraft::Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network.clone(),
            log_store,
            state_machine.clone(),
        )
        .await
        .map_err(|e| OpenError::Raft(e.to_string()))?;

        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| OpenError::Raft(e.to_string()))?;
        if !initialized && config.join_existing {
            tracing::info!(
                id = config.node_id,
                "joining an existing cluster: waiting to be added by its leader"
            );
        } else if !initialized {
            let members: BTreeMap<NodeId, BasicNode> = if config.initial_members.is_empty() {
                BTreeMap::from([(config.node_id, BasicNode::new(&config.peer_url))])
            } else {
                config
                    .initial_members
                    .iter()
                    .map(|(id, url)| (*id, BasicNode::new(url)))
                    .collect()
            };
            let n = members.len();
            match raft.initialize(members).await {
                Ok(()) => {
                    tracing::info!(
                        id = config.node_id,
                        members = n,
                        "bootstrapped a new cluster"
                    )
                }
                // Another initial member already reached this one: it gets the same first entry
                // from the leader instead of writing it itself.
                Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(e))) => {
                    tracing::info!(reason = %e, "cluster already forming; joining it")
                }
                Err(e) => return Err(OpenError::Raft(e.to_string())),
            }
            if n == 1 {
                if let Err(e) = raft.trigger().elect().await {
                    tracing::warn!(error = %e, "could not trigger election");
                }
            }
        } else if is_sole_voter(&raft, config.node_id) {
            // A lone member need not sit out an election timeout after a restart.
            if let Err(e) = raft.trigger().elect().await {
                tracing::warn!(error = %e, "could not trigger election");
            }
        }
        let pauses = Pauses::new(raft.clone());
        let read_index = Arc::new(ReadIndex::new(
            raft.clone(),
            &network,
            state_machine.clone(),
            log.clone(),
            config.node_id,
            config.heartbeat_interval,
        ));
        let shared = Arc::new(Shared {
            raft: raft.clone(),
            network: network.clone(),
            id: config.node_id,
            timeout: config.request_timeout,
            log_syncs,
            state_machine: state_machine.clone(),
            pauses: pauses.clone(),
            read_index: read_index.clone(),
            batches: AtomicUsize::new(0),
            lone: AtomicUsize::new(0),
            writers: AtomicUsize::new(0),
            lone_total: AtomicU64::new(0),
        });
        let (proposals, rx) = mpsc::channel(16 * MAX_BATCH_REQUESTS);
        tokio::spawn(run_batcher(shared.clone(), rx));
        let (reads, rx) = mpsc::channel(16 * MAX_BATCH_REQUESTS);
        tokio::spawn(run_read_index(shared.clone(), rx));
        let learner = Arc::new(AtomicBool::new(false));
        tokio::spawn(track_learner(raft.clone(), config.node_id, learner.clone()));
        tokio::spawn(track_leadership(raft.clone(), config.node_id, log));
        Ok(RaftNode {
            raft,
            state_machine,
            config,
            proposals,
            reads,
            network,
            pauses,
            read_index,
            transferring: tokio::sync::Mutex::new(()),
            learner,
            shared,
        })
    }

    /// Waits until some member leads, up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, ProposeError> {
        tokio::time::timeout(timeout, leader_of(&self.raft))
            .await
            .unwrap_or(Err(ProposeError::NoLeader))
    }

    /// Proposes `req` and returns the state machine's answer once it is applied here. Requests
    /// proposed concurrently share Raft entries (see [`run_batcher`]); a write that finds no
    /// other in flight or queued is proposed from the caller's task, without the two hand-offs
    /// to the batcher's task and back, which would batch it with nothing.
    pub async fn propose(&self, req: InternalRaftRequest) -> Result<ApplyResult, ProposeError> {
        if let Some(_lone) = self.claim_lone() {
            let mut answers = submit_in_time(&self.shared, vec![req]).await?;
            return answers
                .pop()
                .ok_or_else(|| ProposeError::Stopped("state machine answered no request".into()));
        }
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

    /// Claims the lone write in flight if writes come one at a time: the batcher last counted
    /// at most one writer, and no batch is in flight or queued, and no other lone write is.
    /// With more writers every write goes to the batcher, or the first to arrive after each
    /// batch would take a sync of its own (put, 64 clients: 49.3k → 42.3k puts/s when it did).
    /// A batch proposed meanwhile runs beside the lone write, as two batches may; the batcher
    /// counts the lone write among the writers and sees its sync through the log's gauge.
    fn claim_lone(&self) -> Option<InFlight<'_>> {
        let s = &self.shared;
        let idle = |s: &Shared| {
            s.writers.load(Ordering::SeqCst) <= 1
                && s.batches.load(Ordering::SeqCst) == 0
                && self.proposals.capacity() == self.proposals.max_capacity()
        };
        if !idle(s)
            || s.lone
                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return None;
        }
        let lone = InFlight(&s.lone);
        // A batch may have started between the first look and the claim.
        if !idle(s) {
            return None;
        }
        s.lone_total.fetch_add(1, Ordering::Relaxed);
        Some(lone)
    }

    /// Writes proposed so far from their own task, around the batcher (see [`Self::propose`]):
    /// with writes one at a time it counts every write; with many writers, almost none.
    pub fn lone_proposals(&self) -> u64 {
        self.shared.lone_total.load(Ordering::Relaxed)
    }

    /// Returns once this member's state machine has applied everything committed before the call,
    /// as confirmed by a quorum (a read index from the leader, which may be this member). A read
    /// after this is linearizable. Concurrent callers share one read-index round.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        self.read_index.reading();
        let (done, answer) = oneshot::channel();
        self.reads
            .send(done)
            .await
            .map_err(|_| ProposeError::Stopped("read-index queue closed".into()))?;
        match tokio::time::timeout(self.config.request_timeout, answer).await {
            Err(_) => Err(ProposeError::Timeout),
            Ok(Err(_)) => Err(ProposeError::Stopped("read barrier dropped".into())),
            Ok(Ok(r)) => r,
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

    /// True if this member knows a leader that can still lead: another member it follows, or
    /// itself with a quorum confirming that within `timeout` (a leader cut off from the others
    /// keeps its role in openraft, but must not count as one; etcd's check-quorum steps it down).
    pub async fn has_live_leader(&self, timeout: Duration) -> bool {
        match self.leader() {
            None => false,
            // Handing leadership over: deliberately silent, not cut off.
            Some(l) if l == self.config.node_id && self.pauses.is_held() => true,
            Some(l) if l == self.config.node_id => {
                // Confirms leadership with a quorum (the first step of a read index), from the
                // replication traffic where it can (see `crate::read_index`).
                let confirm = self.read_index.leader_read_index();
                matches!(tokio::time::timeout(timeout, confirm).await, Ok(Ok(_)))
            }
            Some(_) => true,
        }
    }

    /// `--election-timeout`: how long a member may go without hearing from a leader.
    pub fn election_timeout(&self) -> Duration {
        self.config.election_timeout
    }

    /// The current leader, if known.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// The tonic service peers talk to (Raft RPCs, forwarded writes, read index); its
    /// AppendEntries streams end once `stop` turns true (the member's server is stopping).
    pub fn peer_service(
        &self,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> RaftPeerServer<PeerService> {
        PeerService::server(
            self.raft.clone(),
            self.pauses.clone(),
            self.read_index.clone(),
            stop,
        )
    }

    /// The leader (if another member) and a channel to its peer port, for requests only the
    /// leader can answer (lease keepalives).
    pub fn leader_channel(&self) -> Option<(NodeId, tonic::transport::Channel)> {
        let leader = self.leader()?;
        if leader == self.config.node_id {
            return None;
        }
        self.peer_channel(leader).map(|c| (leader, c))
    }

    /// A channel to the peer port of member `id` (voter or learner), shared with replication,
    /// for the peer services beside Raft's; `None` if it is not a member.
    pub fn peer_channel(&self, id: NodeId) -> Option<tonic::transport::Channel> {
        let addr = peer_addr(&self.raft, id)?;
        self.network.channel(&addr).ok()
    }

    /// Makes a membership change on the leader (this member or, forwarded, another). Once it
    /// succeeds, this member knows it too: the answer lists the members as this member knows
    /// them, and etcd answers with the membership after the change.
    pub async fn change_membership(
        &self,
        change: MembershipChange,
    ) -> Result<Result<(), MembershipError>, ProposeError> {
        let leaves = matches!(change, MembershipChange::Remove { id } if id == self.config.node_id);
        let fut = async {
            self.pauses.wait_released().await;
            let leader = leader_of(&self.raft).await?;
            if leader == self.config.node_id {
                return Ok((crate::membership::apply(&self.raft, change).await, false));
            }
            let addr = peer_addr(&self.raft, leader).ok_or(ProposeError::NoLeader)?;
            let res = self
                .network
                .change_membership(&addr, &change)
                .await
                .map_err(|e| {
                    tracing::debug!(error = %e, "membership change to the leader failed");
                    ProposeError::Timeout
                })?;
            Ok((res, true))
        };
        let (res, forwarded) = tokio::time::timeout(self.config.request_timeout, fut)
            .await
            .unwrap_or(Err(ProposeError::Timeout))?;
        if forwarded && res.is_ok() && !leaves {
            // The leader answered once the change was committed; this member may not have it
            // yet. A member that was removed learns nothing more, so it does not wait. The
            // change is made either way, so a failed wait must not report it as failed.
            if let Err(e) = self.membership_barrier().await {
                tracing::warn!(error = %e, "membership changed; this member's view of it may lag");
            }
        }
        Ok(res)
    }

    /// A [`read_barrier`](Self::read_barrier) after which [`members`](Self::members) shows every
    /// membership change committed before the call.
    ///
    /// The read barrier waits for the state machine, which may apply an entry before openraft's
    /// metrics (where the membership is read) report the append that brought it: a follower
    /// gets, appends and commits entries in one step of the Raft core, and reports them at its
    /// end. So this also waits until the metrics have caught up with what was applied.
    pub async fn membership_barrier(&self) -> Result<(), ProposeError> {
        self.read_barrier().await?;
        let end = self.state_machine.applied_end();
        if end == 0 {
            return Ok(());
        }
        self.raft
            .wait(Some(self.config.request_timeout))
            .applied_index_at_least(Some(end - 1), "membership view caught up")
            .await
            .map(|_| ())
            .map_err(|e| ProposeError::Stopped(e.to_string()))
    }

    /// The members of the cluster as Raft knows them.
    pub fn members(&self) -> Vec<crate::membership::RaftMember> {
        crate::membership::members(&self.raft)
    }

    /// True if this member is a learner now: a member that does not vote, which serves clients
    /// only what etcd lets a learner serve. Cheap enough to ask on every request.
    pub fn is_learner(&self) -> bool {
        self.learner.load(Ordering::Relaxed)
    }

    /// True if this member is the leader now.
    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.config.node_id)
    }

    /// This member's leader-transfer pauses (see [`crate::transfer`]); public for tests that
    /// play a coordinator dying mid-transfer.
    pub fn transfer_pauses(&self) -> &Arc<Pauses> {
        &self.pauses
    }

    /// Waits (up to `limit`) until the files of the member stored in `data_dir` (its Raft log
    /// and MVCC store) are closed, so that it can be opened again; false if one is still open.
    /// Called after [`shutdown`](Self::shutdown) with every handle of the node dropped: the
    /// tasks still holding the files end a moment after Raft stopped.
    pub fn wait_closed(data_dir: &std::path::Path, limit: Duration) -> bool {
        let member = data_dir.join("member");
        let deadline = Instant::now() + limit;
        let log = LogStore::<TypeConfig>::wait_closed(&member.join(LOG_DIR), limit);
        let left = deadline.saturating_duration_since(Instant::now());
        log && KvStore::wait_closed(&member.join(KV_DIR), left)
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
        self.state_machine.close();
        if let Err(e) = self.store().flush() {
            tracing::warn!(error = %e, "kv store flush on shutdown");
        }
    }
}

/// Groups queued proposals into Raft entries: whatever is waiting when a batch can be proposed
/// goes into one entry (one append, one fdatasync, one state-machine transaction), up to
/// [`MAX_BATCH_REQUESTS`] / [`MAX_BATCH_BYTES`], and with many writers in lockstep up to a share
/// of them ([`BATCH_SHARE`], [`Lockstep`]). A request that must go alone (compaction) ends the
/// batch and is proposed by itself. On a follower the batch is forwarded to the leader whole.
async fn run_batcher(shared: Arc<Shared>, mut rx: mpsc::Receiver<Proposal>) {
    let mut in_flight = FuturesUnordered::new();
    let mut carry: Option<Proposal> = None;
    // Requests in the batch proposed last.
    let mut last_batch = 0;
    // Requests in the batches in flight.
    let mut proposed = 0;
    let mut writers = Writers::new(Instant::now());
    let mut lockstep = Lockstep::new(Instant::now());
    loop {
        if in_flight.len() >= MAX_BATCHES_IN_FLIGHT {
            if let Some(n) = in_flight.next().await {
                proposed -= n;
            }
            continue;
        }
        if !in_flight.is_empty() {
            let queued = rx.len() + usize::from(carry.is_some());
            if shared.log_syncs.pending() > 0 {
                // The log is syncing the batch in flight: a batch proposed now would only wait
                // for the next sync, so let it gather everything that arrives meanwhile (syncs
                // run one after another; see `SyncGauge`).
                tokio::select! {
                    _ = shared.log_syncs.wait_idle() => {}
                    Some(n) = in_flight.next() => proposed -= n,
                }
                continue;
            }
            if queued < last_batch {
                // Synced and being applied. Its clients answer with their next requests as soon
                // as it is answered; proposing the few that came early would split them into
                // two entries and two syncs. Overlap only a batch as large as the last one.
                tokio::select! {
                    Some(n) = in_flight.next() => proposed -= n,
                    p = rx.recv(), if carry.is_none() => match p {
                        Some(p) => carry = Some(p),
                        None => break,
                    },
                }
                continue;
            }
        }
        let first = match carry.take() {
            Some(p) => p,
            None => tokio::select! {
                biased;
                Some(n) = in_flight.next(), if !in_flight.is_empty() => {
                    proposed -= n;
                    continue;
                }
                p = rx.recv() => match p {
                    Some(p) => p,
                    None => break,
                },
            },
        };
        let alone = must_propose_alone(&first.req);
        let queued = 1 + rx.len() + usize::from(carry.is_some());
        let now = Instant::now();
        let held = proposed + queued + shared.lone.load(Ordering::SeqCst);
        let concurrent = writers.observe(held, now);
        shared.writers.store(concurrent, Ordering::SeqCst);
        let cap = if lockstep.observe(queued, concurrent, now) {
            batch_cap(concurrent)
        } else {
            MAX_BATCH_REQUESTS
        };
        let mut bytes = first.size;
        let mut batch = vec![first];
        while !alone && batch.len() < cap && bytes < MAX_BATCH_BYTES {
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
        last_batch = batch.len();
        proposed += batch.len();
        shared.batches.fetch_add(1, Ordering::SeqCst);
        in_flight.push(propose_batch(shared.clone(), batch));
    }
    while in_flight.next().await.is_some() {}
}

/// The most requests the next batch takes with about `writers` concurrent writers (see
/// [`BATCH_SHARE`]).
fn batch_cap(writers: usize) -> usize {
    if writers < SPLIT_FROM_WRITERS {
        return MAX_BATCH_REQUESTS;
    }
    (writers / BATCH_SHARE).min(MAX_BATCH_REQUESTS)
}

/// The number of concurrent writers, estimated as the most write requests held at once in the
/// current or the previous [`WRITERS_WINDOW`]. Held requests at any one moment undercount them
/// (some are in their clients, some on the wire); the peak finds them all when their requests
/// arrive together, which is when a batch would otherwise take them all.
struct Writers {
    window_start: Instant,
    current: usize,
    previous: usize,
}

impl Writers {
    fn new(now: Instant) -> Self {
        Writers {
            window_start: now,
            current: 0,
            previous: 0,
        }
    }

    /// Records that `held` requests are held at `now`; returns the estimate.
    fn observe(&mut self, held: usize, now: Instant) -> usize {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= WRITERS_WINDOW {
            // A window with no batch at all counts as empty.
            self.previous = if elapsed >= 2 * WRITERS_WINDOW {
                0
            } else {
                self.current
            };
            self.current = 0;
            self.window_start = now;
        }
        self.current = self.current.max(held);
        self.current.max(self.previous)
    }
}

/// Whether the writers move in lockstep, so that batches should be capped ([`BATCH_SHARE`]).
///
/// Lockstep shows when batches are not capped: nearly every writer's request is queued each
/// time a batch is formed, because they were all answered together and all came back together
/// (64 writers on one connection: every batch held all 64). Writers whose requests arrive spread
/// out (64 writers on 8 connections: batches of 8 to 40, about 25 on average) are better served
/// uncapped, as capping them only adds syncs (2,800 instead of 1,650 for 40k puts, and 10 % fewer
/// puts/s). Capped batches hide the signature, so after [`LOCKSTEP_RECHECK`] batches go uncapped
/// again until it shows (a few batches) or a [`LOCKSTEP_WINDOW`] passes without it.
struct Lockstep {
    capped: bool,
    /// When the current count (uncapped) or the cap (capped) started.
    since: Instant,
    /// Uncapped batches formed since `since`.
    formed: u32,
    /// Of those, the ones that found nearly every writer queued.
    full: u32,
}

impl Lockstep {
    fn new(now: Instant) -> Self {
        Lockstep {
            capped: false,
            since: now,
            formed: 0,
            full: 0,
        }
    }

    /// Records that a batch is formed with `queued` requests waiting out of about `writers`
    /// concurrent writers; returns whether this batch is to be capped.
    fn observe(&mut self, queued: usize, writers: usize, now: Instant) -> bool {
        if writers < SPLIT_FROM_WRITERS {
            // Few writers are never split; their batches say nothing about many.
            *self = Lockstep::new(now);
            return false;
        }
        let elapsed = now.saturating_duration_since(self.since);
        let window = if self.capped {
            LOCKSTEP_RECHECK
        } else {
            LOCKSTEP_WINDOW
        };
        if self.capped && elapsed < window {
            return true;
        }
        if elapsed >= window {
            // The cap is lifted to look again, or the count starts over.
            *self = Lockstep::new(now);
        }
        self.formed += 1;
        // "Nearly every writer": at least 7/8 of them.
        if queued * 8 >= writers * 7 {
            self.full += 1;
        }
        if self.formed >= LOCKSTEP_SAMPLES && self.full * 8 >= self.formed * 7 {
            self.capped = true;
            self.since = now;
        }
        false
    }
}

/// Proposes one batch as one entry and hands each request its own answer. Returns the batch's
/// size.
async fn propose_batch(shared: Arc<Shared>, batch: Vec<Proposal>) -> usize {
    let _in_flight = InFlight(&shared.batches);
    let (reqs, dones): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.req, p.done)).unzip();
    let n = reqs.len();
    match submit_in_time(&shared, reqs).await {
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
    n
}

/// [`submit`] within the request timeout, with one answer per request.
async fn submit_in_time(
    shared: &Shared,
    reqs: Vec<InternalRaftRequest>,
) -> Result<Vec<ApplyResult>, ProposeError> {
    let n = reqs.len();
    match tokio::time::timeout(shared.timeout, submit(shared, reqs)).await {
        Err(_) => Err(ProposeError::Timeout),
        Ok(Ok(answers)) if answers.len() == n => Ok(answers),
        Ok(Ok(answers)) => Err(ProposeError::Stopped(format!(
            "state machine answered {} of {n} requests",
            answers.len()
        ))),
        Ok(Err(e)) => Err(e),
    }
}

/// The peer URL of member `id` in the current membership.
pub(crate) fn peer_addr(raft: &typ::Raft, id: NodeId) -> Option<String> {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&id)
        .map(|n| n.addr.clone())
}

/// Keeps `learner` equal to whether member `id` is in the membership without a vote, as the
/// membership changes, until the Raft instance shuts down. Follows openraft's server metrics,
/// which change with votes, roles and memberships only: the full metrics change with every
/// append, commit and apply, and woke this task (and [`track_leadership`]) for each.
async fn track_learner(raft: typ::Raft, id: NodeId, learner: Arc<AtomicBool>) {
    let mut rx = raft.server_metrics();
    loop {
        let is_learner = crate::membership::is_learner_in(
            rx.borrow_and_update().membership_config.membership(),
            id,
        );
        learner.store(is_learner, Ordering::Relaxed);
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Tells the Raft log whether member `id` leads several voters, whose own appends are then
/// synced beside their replication ([`crate::durable`]), and whether there are several voters,
/// when the other appends sync off the worker thread ([`LogStore::sync_off_worker`]), until the
/// Raft instance shuts down.
async fn track_leadership(raft: typ::Raft, id: NodeId, log: LogStore<TypeConfig>) {
    let mut rx = raft.server_metrics();
    let mut pipelined = false;
    loop {
        let (leads, several) = {
            let m = rx.borrow_and_update();
            (
                m.current_leader == Some(id),
                m.membership_config.membership().voter_ids().count() > 1,
            )
        };
        let now = leads && several;
        if now != pipelined {
            pipelined = now;
            log.pipeline_as(now.then_some(id));
        }
        log.sync_off_worker(several);
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Waits (bounded by the caller's timeout) until some member leads.
async fn leader_of(raft: &typ::Raft) -> Result<NodeId, ProposeError> {
    let mut rx = raft.metrics();
    loop {
        if let Some(l) = rx.borrow().current_leader {
            return Ok(l);
        }
        if rx.changed().await.is_err() {
            return Err(ProposeError::Stopped("raft metrics closed".into()));
        }
    }
}

/// Waits until this member applied `index`, so a write answered here is visible to the next
/// local read.
async fn wait_applied(shared: &Shared, index: u64) -> Result<(), ProposeError> {
    shared
        .state_machine
        .wait_applied(index)
        .await
        .map_err(|_| ProposeError::Stopped("the state machine stopped".into()))
}

/// Proposes `reqs` as one entry: locally if this member leads, else forwarded to the leader
/// (retried when the member asked says another one leads; never after the leader may have got
/// it, since a write must not be applied twice).
async fn submit(
    shared: &Shared,
    reqs: Vec<InternalRaftRequest>,
) -> Result<Vec<ApplyResult>, ProposeError> {
    let raft = &shared.raft;
    let mut leader = leader_of(raft).await?;
    let batch = InternalRaftBatch { requests: reqs };
    for _ in 0..3 {
        if leader == shared.id && shared.pauses.is_held() {
            // Handing leadership over: propose once that is done, wherever the leader is then.
            shared.pauses.wait_released().await;
            leader = leader_of(raft).await?;
        }
        if leader == shared.id {
            return match raft.client_write(Command::from_batch(&batch)).await {
                Ok(resp) => Ok(resp.data.0),
                // Leadership moved between the check and the proposal; nothing was appended.
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                    Err(ProposeError::LeaderChanged)
                }
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                    Err(ProposeError::Stopped(e.to_string()))
                }
                Err(RaftError::Fatal(f)) => Err(ProposeError::Stopped(f.to_string())),
            };
        }
        let addr = peer_addr(raft, leader).ok_or(ProposeError::NoLeader)?;
        // A copy, so a member that no longer leads (a stale view during an election) can be
        // answered by forwarding again instead of failing the whole batch; it costs about what
        // encoding the batch for the wire costs.
        match shared.network.forward(&addr, batch.clone()).await {
            Ok(Ok((index, resp))) => {
                wait_applied(shared, index).await?;
                return Ok(resp.0);
            }
            Ok(Err(PeerError::NotLeader(Some(l)))) if l != leader => leader = l,
            Ok(Err(PeerError::NotLeader(_))) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                leader = leader_of(raft).await?;
            }
            Ok(Err(e)) => return Err(ProposeError::Stopped(e.to_string())),
            // The request may or may not have reached the leader: the outcome is unknown.
            Err(e) => {
                tracing::debug!(error = %e, leader, "forwarding a write failed");
                return Err(ProposeError::Timeout);
            }
        }
    }
    Err(ProposeError::LeaderChanged)
}

/// Serves read barriers in rounds: every barrier queued when a round starts shares its read
/// index (a barrier that arrives during a round waits for the next one, which starts after it).
async fn run_read_index(shared: Arc<Shared>, mut rx: mpsc::Receiver<ReadWaiter>) {
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let res = match tokio::time::timeout(shared.timeout, read_index_round(&shared)).await {
            Err(_) => Err(ProposeError::Timeout),
            Ok(r) => r,
        };
        for w in waiters {
            let _ = w.send(res.clone());
        }
    }
}

/// One read-index round: the leader's confirmed commit point, then wait until applied here.
async fn read_index_round(shared: &Shared) -> Result<(), ProposeError> {
    let raft = &shared.raft;
    let mut leader = leader_of(raft).await?;
    for _ in 0..3 {
        if leader == shared.id && shared.pauses.is_held() {
            shared.pauses.wait_released().await;
            leader = leader_of(raft).await?;
        }
        if leader == shared.id {
            return match shared.read_index.leader_read_index().await {
                Ok(read) => wait_applied(shared, read).await,
                Err(RaftError::APIError(e)) => match e {
                    openraft::error::CheckIsLeaderError::ForwardToLeader(_) => {
                        Err(ProposeError::LeaderChanged)
                    }
                    openraft::error::CheckIsLeaderError::QuorumNotEnough(_) => {
                        Err(ProposeError::NoLeader)
                    }
                },
                Err(RaftError::Fatal(f)) => Err(ProposeError::Stopped(f.to_string())),
            };
        }
        let addr = peer_addr(raft, leader).ok_or(ProposeError::NoLeader)?;
        // The vote is read now, after every read of this round arrived (see `ReadIndexAsk`).
        let ask = shared.read_index.ask();
        match shared.network.read_index(&addr, &ask).await {
            Ok(Ok(index)) => return wait_applied(shared, index).await,
            Ok(Err(PeerError::NotLeader(Some(l)))) if l != leader => leader = l,
            Ok(Err(PeerError::NotLeader(_))) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                leader = leader_of(raft).await?;
            }
            Ok(Err(PeerError::NoQuorum)) => return Err(ProposeError::NoLeader),
            Ok(Err(PeerError::Stopped(e))) => return Err(ProposeError::Stopped(e)),
            Err(e) => {
                tracing::debug!(error = %e, leader, "read index from the leader failed");
                return Err(ProposeError::NoLeader);
            }
        }
    }
    Err(ProposeError::LeaderChanged)
}

fn is_sole_voter(raft: &typ::Raft, id: NodeId) -> bool {
    let m = raft.metrics().borrow().membership_config.clone();
    let voters: Vec<NodeId> = m.membership().voter_ids().collect();
    voters == [id]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn damaged_copies(member: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(member)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with("kv.damaged-"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn a_damaged_store_is_moved_aside_and_started_empty() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let member = dir.path();
        let kv = member.join(KV_DIR);
        let store = KvStore::open_path(&kv)?;
        store.import([Ok((
            fetcd_storage::schema::META_TREE.to_string(),
            fetcd_storage::schema::CONSISTENT_INDEX.as_bytes().to_vec(),
            b"marker".to_vec(),
        ))])?;
        assert!(store.consistent_index()?.is_some());
        drop(store);
        assert!(KvStore::wait_closed(&kv, Duration::from_secs(10)));

        // Damage: CURRENT names no generation.
        std::fs::write(kv.join("CURRENT"), b"")?;
        let store = open_store(member)?;
        assert_eq!(store.consistent_index()?, None, "not started empty");
        assert_eq!(damaged_copies(member).len(), 1);
        drop(store);
        assert!(KvStore::wait_closed(&kv, Duration::from_secs(10)));

        // Damaged again a second later: only the newest copy is kept.
        std::thread::sleep(Duration::from_millis(1100));
        let first = damaged_copies(member);
        std::fs::write(kv.join("CURRENT"), b"gen-9")?;
        drop(open_store(member)?);
        let second = damaged_copies(member);
        assert_eq!(second.len(), 1);
        assert_ne!(first, second);
        assert!(KvStore::wait_closed(&kv, Duration::from_secs(10)));

        // A panic while opening counts as damage (sled has panicked on damaged files).
        std::thread::sleep(Duration::from_millis(1100));
        let tries = AtomicUsize::new(0);
        let store = open_store_with(member, |dir| {
            if tries.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("a sled bug");
            }
            KvStore::open_path(dir)
        })?;
        assert_eq!(tries.load(Ordering::SeqCst), 2);
        let third = damaged_copies(member);
        assert_eq!(third.len(), 1);
        assert_ne!(second, third);
        drop(store);
        assert!(KvStore::wait_closed(&kv, Duration::from_secs(10)));

        // Not damage: the store cannot be opened at all (here `kv` is a file). Nothing moves.
        std::fs::remove_dir_all(&kv)?;
        std::fs::write(&kv, b"not a directory")?;
        assert!(open_store(member).is_err());
        assert!(kv.is_file());
        assert_eq!(damaged_copies(member), third);
        Ok(())
    }

    #[test]
    fn writers_are_the_peak_of_this_or_the_last_window() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut w = Writers::new(t0);
        assert_eq!(w.observe(10, at(0)), 10);
        assert_eq!(w.observe(64, at(100)), 64);
        assert_eq!(
            w.observe(3, at(200)),
            64,
            "a lower count does not lower the peak"
        );
        // The next window still remembers the last one's peak ...
        assert_eq!(w.observe(5, at(1_100)), 64);
        // ... and the one after forgets it.
        assert_eq!(w.observe(7, at(2_150)), 7);
        // After a quiet spell longer than two windows nothing old counts.
        assert_eq!(w.observe(40, at(2_200)), 40);
        assert_eq!(w.observe(2, at(6_000)), 2);
    }

    #[test]
    fn batches_are_capped_only_while_writers_move_in_lockstep() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut l = Lockstep::new(t0);
        // One writer's batches always hold every writer, but few writers are never split, and
        // many who come after them start uncapped.
        for i in 0..20 {
            assert!(!l.observe(1, 1, at(i)), "one writer, batch {i}");
        }
        // Spread arrivals: about a third of 64 writers queued each time, never capped.
        for i in 20..100 {
            assert!(!l.observe(20 + (i % 20), 64, at(i as u64)), "batch {i}");
        }
        // Every writer queued each time: capped once enough batches in a window show it ...
        let mut t = 300;
        let mut seen = 0;
        while !l.observe(64, 64, at(t)) {
            seen += 1;
            t += 2;
            assert!(seen <= 2 * LOCKSTEP_SAMPLES, "never capped");
        }
        assert_eq!(seen, LOCKSTEP_SAMPLES, "capped after {seen} batches");
        // ... and stays capped (whatever is queued meanwhile) until the recheck ...
        assert!(l.observe(16, 64, at(t + 500)));
        assert!(l.observe(32, 64, at(t + 990)));
        // ... which goes uncapped again: spread arrivals now keep it so past a window.
        let r = t + 1_000;
        for i in 0..50 {
            assert!(!l.observe(20, 64, at(r + 3 * i)), "recheck batch {i}");
        }
        // A few full batches among spread ones are not lockstep: all clients starting together,
        // or the first batches after a cap is lifted, before the requests spread out again.
        for i in 0..5 {
            assert!(!l.observe(64, 64, at(r + 300 + i)), "burst batch {i}");
        }
        for i in 0..20 {
            assert!(
                !l.observe(25, 64, at(r + 305 + i)),
                "after a burst, batch {i}"
            );
        }
    }

    #[test]
    fn batches_are_split_only_with_many_writers() {
        assert_eq!(batch_cap(1), MAX_BATCH_REQUESTS);
        assert_eq!(batch_cap(SPLIT_FROM_WRITERS - 1), MAX_BATCH_REQUESTS);
        assert_eq!(
            batch_cap(SPLIT_FROM_WRITERS),
            SPLIT_FROM_WRITERS / BATCH_SHARE
        );
        assert_eq!(batch_cap(64), 16);
        assert_eq!(batch_cap(130), 32);
        assert_eq!(batch_cap(100_000), MAX_BATCH_REQUESTS);
    }

    #[test]
    fn a_log_in_the_old_format_is_refused_not_ignored() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let member = dir.path().join("member");
        std::fs::create_dir_all(member.join(OLD_LOG_DIR)).expect("mkdir");
        // An empty directory holds nothing to lose.
        open_log(&member).expect("open next to an empty old log directory");

        std::fs::write(member.join(OLD_LOG_DIR).join("r-0000000000.wal"), b"x").expect("write");
        let err = open_log(&member).expect_err("an old log must not be ignored");
        assert!(err.to_string().contains("raft-log"), "{err}");
    }
}
