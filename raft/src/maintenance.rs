//! What the Maintenance service asks of a member's Raft: its status as etcd reports it, the
//! on-disk size of its backend, and leader transfer.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::network::Network;
use crate::node::peer_addr;
use crate::transfer::Pauses;
use crate::transfer::TransferStep;
use crate::typ;
use crate::NodeId;
use crate::RaftNode;

/// A member's Raft state, as `StatusResponse` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RaftStatus {
    /// The leader this member knows of (0 if none).
    pub leader: NodeId,
    /// The current term.
    pub term: u64,
    /// The index of the last entry in this member's log.
    pub last_log_index: u64,
    /// The index of the last entry applied to the state machine.
    pub applied_index: u64,
    /// True if this member is a learner (non-voter).
    pub is_learner: bool,
}

/// Why a leader transfer failed (etcd's `MoveLeader` errors).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// This member does not lead; only the leader can hand leadership over.
    #[error("not leader")]
    NotLeader,
    /// The target is not a voting member of the cluster.
    #[error("bad leader transferee")]
    BadTransferee,
    /// The target did not take over within the transfer's time bound (etcd's
    /// `ErrTimeoutLeaderTransfer`), or leadership went to another member meanwhile.
    #[error("leader transfer took too long")]
    Timeout,
}

impl RaftNode {
    /// This member's Raft state from openraft's metrics.
    pub fn raft_status(&self) -> RaftStatus {
        let m = self.raft().metrics().borrow().clone();
        let id = self.id();
        let membership = m.membership_config.membership();
        RaftStatus {
            leader: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            is_learner: crate::membership::is_learner_in(membership, id),
        }
    }

    /// True if `id` is a voting member.
    pub fn is_voter(&self, id: NodeId) -> bool {
        let m = self.raft().metrics().borrow().membership_config.clone();
        let found = m.membership().voter_ids().any(|v| v == id);
        found
    }

    /// Hands leadership to `to` (etcd's `MoveLeader`) and returns once this member sees `to`
    /// lead (see [`crate::transfer`] for how). Moving to the leader itself succeeds at once, as
    /// in etcd. The work runs in its own task: a client giving up must not cut a transfer short
    /// between its pauses and their lifting.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), TransferError> {
        if !self.is_leader() {
            return Err(TransferError::NotLeader);
        }
        if !self.is_voter(to) {
            return Err(TransferError::BadTransferee);
        }
        if to == self.id() {
            return Ok(());
        }
        let _one = self.transferring.lock().await;
        if !self.is_leader() {
            return Err(TransferError::NotLeader);
        }
        let lease = self.config.election_timeout * 2;
        let handover = Handover {
            raft: self.raft().clone(),
            network: self.network.clone(),
            pauses: self.pauses.clone(),
            id: self.id(),
            to,
            lease,
            slack: self.config.heartbeat_interval,
            timeout: self.config.request_timeout + lease,
        };
        tokio::spawn(handover.run())
            .await
            .unwrap_or(Err(TransferError::Timeout))
    }

    /// Bytes of this member's backend, etcd's `dbSize`: the MVCC store (`<data-dir>/member/kv`,
    /// the sled files), the counterpart of etcd's bolt file. The Raft log and snapshots are not
    /// counted, as etcd does not count its WAL and snap files.
    pub fn backend_size(&self) -> u64 {
        dir_size(&self.backend_dir())
    }

    /// Where this member's backend lives, for measuring [`backend_size`](Self::backend_size)
    /// away from the member (on a blocking thread).
    pub fn backend_dir(&self) -> std::path::PathBuf {
        self.data_dir().join("member").join("kv")
    }
}

/// Total size of the regular files under `dir` (0 for what cannot be read: the size is a metric,
/// and a file vanishing mid-walk, like a rotated log chunk, is normal).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// One leader transfer, run by the leader (see [`crate::transfer`]).
struct Handover {
    raft: typ::Raft,
    network: Network,
    pauses: Arc<Pauses>,
    /// The leader handing over.
    id: NodeId,
    /// The transferee.
    to: NodeId,
    /// openraft's leader lease (`election_timeout_max`, which fetcd sets to twice
    /// `--election-timeout`).
    lease: Duration,
    /// Margin past the lease for messages already on the way (one heartbeat interval).
    slack: Duration,
    /// Bound on the whole transfer.
    timeout: Duration,
}

impl Handover {
    /// Goes quiet, hands over, then lifts every pause whatever happened.
    async fn run(self) -> Result<(), TransferError> {
        let deadline = Instant::now() + self.timeout;
        // Each pause outlives the transfer by a lease: lifted here normally, by itself otherwise.
        let pause = self.timeout + self.lease;
        tracing::info!(from = self.id, to = self.to, "leadership transfer starting");
        self.pauses.quiet_leader(pause);
        let others = self.other_voters();
        let res = match tokio::time::timeout_at(deadline, self.hand_over(&others, pause)).await {
            Ok(r) => r,
            Err(_) => Err(TransferError::Timeout),
        };
        // The transferee may have won on its own timer while this waited for something else.
        let leader = self.raft.metrics().borrow().current_leader;
        let res = if leader == Some(self.to) { Ok(()) } else { res };
        self.pauses.resume();
        for addr in others {
            let network = self.network.clone();
            tokio::spawn(async move {
                if let Err(e) = network.transfer_step(&addr, &TransferStep::Resume).await {
                    tracing::debug!(error = %e, %addr, "resume after a transfer (the pause lifts itself)");
                }
            });
        }
        match &res {
            Ok(()) => tracing::info!(from = self.id, to = self.to, "leadership transfer finished"),
            Err(e) => {
                tracing::warn!(from = self.id, to = self.to, error = %e, "leadership transfer failed")
            }
        }
        res
    }

    /// Peer URLs of the voters other than this member and the transferee.
    fn other_voters(&self) -> Vec<String> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let ids: Vec<NodeId> = m
            .membership()
            .voter_ids()
            .filter(|v| *v != self.id && *v != self.to)
            .collect();
        ids.into_iter()
            .filter_map(|v| peer_addr(&self.raft, v))
            .collect()
    }

    async fn hand_over(&self, others: &[String], pause: Duration) -> Result<(), TransferError> {
        let term = self.raft.metrics().borrow().current_term;
        self.caught_up().await?;
        let caught_up = Instant::now();
        let step = TransferStep::PauseElections {
            millis: pause.as_millis() as u64,
        };
        let pauses = others.iter().map(|addr| {
            let step = &step;
            async move {
                if let Err(e) = self.network.transfer_step(addr, step).await {
                    // Unreachable: it hears no leader either, and elects on its own timer at worst.
                    tracing::debug!(error = %e, %addr, "pausing elections for a transfer");
                }
            }
        });
        futures::future::join_all(pauses).await;
        tokio::time::sleep_until(caught_up + self.lease + self.slack).await;
        // A proposal that slipped past the hold would make the transferee's log too short.
        self.caught_up().await?;
        let addr = peer_addr(&self.raft, self.to).ok_or(TransferError::BadTransferee)?;
        let campaign = TransferStep::Campaign {
            term,
            leader: self.id,
        };
        match self.network.transfer_step(&addr, &campaign).await {
            Ok(Ok(())) => {}
            // The transferee's own election timer is not paused: it still campaigns, later.
            Ok(Err(e)) => tracing::info!(error = %e, "transferee refused to campaign"),
            Err(e) => tracing::info!(error = %e, "could not reach the transferee"),
        }
        let mut rx = self.raft.metrics();
        loop {
            match rx.borrow().current_leader {
                Some(l) if l == self.to => return Ok(()),
                Some(l) if l != self.id => return Err(TransferError::Timeout),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(TransferError::Timeout);
            }
        }
    }

    /// Waits until the transferee has matched this leader's last log entry.
    async fn caught_up(&self) -> Result<(), TransferError> {
        let mut rx = self.raft.metrics();
        loop {
            {
                let m = rx.borrow();
                if m.current_leader != Some(self.id) {
                    return Err(TransferError::Timeout);
                }
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&self.to).cloned().flatten())
                    .map(|l| l.index);
                if matched.is_some() && matched == m.last_log_index {
                    return Ok(());
                }
            }
            if rx.changed().await.is_err() {
                return Err(TransferError::Timeout);
            }
        }
    }
}
