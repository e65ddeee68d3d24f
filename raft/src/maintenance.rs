//! What the Maintenance service asks of a member's Raft: its status as etcd reports it, the
//! on-disk size of its data, and leader transfer.

use std::path::Path;

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

/// Why a leader transfer was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    /// This member does not lead; only the leader can hand leadership over.
    #[error("not leader")]
    NotLeader,
    /// The target is not a voting member of the cluster.
    #[error("bad leader transferee")]
    BadTransferee,
    /// The target is another voter, but openraft 0.9 has no leader-transfer API (its `Trigger`
    /// offers `elect`, `heartbeat`, `snapshot` and `purge_log` only).
    #[error("leader transfer to another member is not supported by openraft 0.9")]
    Unsupported,
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
            is_learner: membership.get_node(&id).is_some()
                && !membership.voter_ids().any(|v| v == id),
        }
    }

    /// True if `id` is a voting member.
    pub fn is_voter(&self, id: NodeId) -> bool {
        let m = self.raft().metrics().borrow().membership_config.clone();
        let found = m.membership().voter_ids().any(|v| v == id);
        found
    }

    /// Hands leadership to `to` (etcd's `MoveLeader`). Moving to the leader itself succeeds at
    /// once, as in etcd (raft ignores a transfer to the current leader). The hook for the
    /// multi-member work: once openraft offers a transfer trigger, call it here and wait until
    /// `to` leads.
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
        Err(TransferError::Unsupported)
    }

    /// Bytes this member's data takes on disk: the sled store, the Raft log and the snapshot
    /// (everything under `<data-dir>/member`).
    pub fn disk_size(&self) -> u64 {
        dir_size(&self.data_dir().join("member"))
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
