//! Membership changes (what etcd's MemberAdd / MemberRemove / MemberUpdate / MemberPromote do to
//! Raft), made by the leader through openraft's joint consensus. A follower that gets one hands
//! it to the leader over the peer port.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use openraft::error::ClientWriteError;
use openraft::error::RaftError;
use openraft::BasicNode;
use openraft::ChangeMembers;
use serde::Deserialize;
use serde::Serialize;

use crate::typ;
use crate::NodeId;

/// etcd's "learner is ready" rule: it has at least 90% of what the leader has.
const LEARNER_READY_PERCENT: f64 = 0.9;

/// One change to the cluster's membership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// A new member that receives the log but does not vote.
    AddLearner {
        /// Its id.
        id: NodeId,
        /// Its peer URL.
        peer_url: String,
    },
    /// A new voting member.
    AddVoter {
        /// Its id.
        id: NodeId,
        /// Its peer URL.
        peer_url: String,
    },
    /// A learner becomes a voter.
    Promote {
        /// The learner.
        id: NodeId,
    },
    /// A member leaves.
    Remove {
        /// The member.
        id: NodeId,
    },
    /// A member's peer URL changes.
    Update {
        /// The member.
        id: NodeId,
        /// Its new peer URL.
        peer_url: String,
    },
}

/// Why the leader refused a membership change (etcd's member errors).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MembershipError {
    /// No member has that id.
    #[error("member not found")]
    NotFound,
    /// A member with that id exists already.
    #[error("member id already exists")]
    Exists,
    /// Promote of a member that already votes.
    #[error("member is not a learner")]
    NotLearner,
    /// Promote of a learner that is too far behind the leader.
    #[error("learner is not in sync with the leader")]
    LearnerNotReady,
    /// Leadership moved meanwhile, or Raft refused; nothing changed that the caller can rely on.
    #[error("{0}")]
    Failed(String),
}

/// One member as the Raft membership knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftMember {
    /// Its id.
    pub id: NodeId,
    /// The peer URL replication uses.
    pub peer_url: String,
    /// True if it does not vote.
    pub is_learner: bool,
}

/// The current members, voters and learners, in id order.
pub fn members(raft: &typ::Raft) -> Vec<RaftMember> {
    let m = raft.metrics().borrow().membership_config.clone();
    let voters: BTreeSet<NodeId> = m.membership().voter_ids().collect();
    m.membership()
        .nodes()
        .map(|(id, node)| RaftMember {
            id: *id,
            peer_url: node.addr.clone(),
            is_learner: !voters.contains(id),
        })
        .collect()
}

/// True if `id` is in `membership` without a vote.
pub(crate) fn is_learner_in(
    membership: &openraft::Membership<NodeId, BasicNode>,
    id: NodeId,
) -> bool {
    membership.get_node(&id).is_some() && !membership.voter_ids().any(|v| v == id)
}

fn failed<E: std::fmt::Display>(e: E) -> MembershipError {
    MembershipError::Failed(e.to_string())
}

/// Makes `change` on this member, which must lead.
pub async fn apply(raft: &typ::Raft, change: MembershipChange) -> Result<(), MembershipError> {
    let current = members(raft);
    let find = |id: NodeId| current.iter().find(|m| m.id == id);
    let res = match change {
        MembershipChange::AddLearner { id, peer_url } => {
            if find(id).is_some() {
                return Err(MembershipError::Exists);
            }
            raft.add_learner(id, BasicNode::new(peer_url), false).await
        }
        MembershipChange::AddVoter { id, peer_url } => {
            if find(id).is_some() {
                return Err(MembershipError::Exists);
            }
            let nodes = BTreeMap::from([(id, BasicNode::new(peer_url))]);
            raft.change_membership(ChangeMembers::AddVoters(nodes), false)
                .await
        }
        MembershipChange::Promote { id } => {
            match find(id) {
                None => return Err(MembershipError::NotFound),
                Some(m) if !m.is_learner => return Err(MembershipError::NotLearner),
                Some(_) => {}
            }
            if !learner_ready(raft, id) {
                return Err(MembershipError::LearnerNotReady);
            }
            raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
        }
        MembershipChange::Remove { id } => {
            let Some(m) = find(id) else {
                return Err(MembershipError::NotFound);
            };
            let ids = BTreeSet::from([id]);
            if m.is_learner {
                raft.change_membership(ChangeMembers::RemoveNodes(ids), false)
                    .await
            } else {
                raft.change_membership(ChangeMembers::RemoveVoters(ids), false)
                    .await
            }
        }
        MembershipChange::Update { id, peer_url } => {
            if find(id).is_none() {
                return Err(MembershipError::NotFound);
            }
            let nodes = BTreeMap::from([(id, BasicNode::new(peer_url))]);
            raft.change_membership(ChangeMembers::SetNodes(nodes), false)
                .await
        }
    };
    match res {
        Ok(_) => Ok(()),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(
            MembershipError::Failed(format!("not leader (leader is {:?})", f.leader_id)),
        ),
        Err(e) => Err(failed(e)),
    }
}

/// etcd's `isLearnerReady`: the learner matched at least 90% of the leader's log.
fn learner_ready(raft: &typ::Raft, id: NodeId) -> bool {
    let m = raft.metrics().borrow().clone();
    let leader = m.last_log_index.unwrap_or(0);
    let matched = m
        .replication
        .as_ref()
        .and_then(|r| r.get(&id).cloned().flatten())
        .map_or(0, |l| l.index);
    (matched as f64) >= (leader as f64) * LEARNER_READY_PERCENT
}
