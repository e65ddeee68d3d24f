//! Leader transfer (etcd's `MoveLeader`) on openraft 0.9, which has no transfer of its own.
//!
//! Why it takes a protocol: openraft 0.9 protects a leader with a *lease* — a voter that heard
//! from the leader within `leader_lease` (openraft sets it to `election_timeout_max`) refuses any
//! vote request, so `trigger().elect()` on a follower loses while the leader keeps sending. etcd's
//! raft sends the transferee `MsgTimeoutNow`, which bypasses that check; openraft has no such
//! message, and forging a committed vote for another member would bypass its election rules. So
//! the leader instead lets its own lease lapse, in the open, with nothing else able to win in the
//! meantime:
//!
//! 1. The leader checks the transferee is a voter, then goes *quiet*: no heartbeats
//!    (`runtime_config().heartbeat(false)`), and new proposals, forwarded writes, read-index
//!    rounds and membership changes wait (they would send AppendEntries and renew the lease).
//! 2. It waits until the transferee has matched its last log entry, so the transferee's log is
//!    at least as long as any voter's and every voter can grant it its vote.
//! 3. It asks every other voter to pause its election timer (`runtime_config().elect(false)`), so
//!    that when the lease lapses only the transferee campaigns (a paused member still grants
//!    votes).
//! 4. It waits one lease (plus a heartbeat of slack) after the transferee caught up, then asks
//!    the transferee to campaign (`trigger().elect()`). The new term's vote request makes the old
//!    leader step down (a higher vote always wins in openraft) and the transferee wins with the
//!    now lease-free voters; if a vote still arrives early, the transferee retries on its own
//!    election timer, which is not paused.
//! 5. When the leader sees the transferee lead, or at the deadline, every pause is lifted and the
//!    held requests go on: on the old leader they find it is a follower and are forwarded (none
//!    was appended, so none is applied twice).
//!
//! Every pause undoes itself: each member that pauses (the quiet leader, each paused follower)
//! arms its own timer that lifts the pause at a deadline past the transfer's, unless a newer pause
//! replaced it. A coordinator that dies mid-transfer therefore leaves at worst a cluster that
//! elects a little later than usual, never one that cannot elect. Raft's safety does not depend on
//! any of this: the pauses only change *when* members campaign and what the leader sends, and the
//! election itself is openraft's.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::Serialize;
use tokio::sync::watch;

use crate::typ;
use crate::NodeId;

/// One step of a transfer, sent by the leader to another member over the peer service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferStep {
    /// Do not start elections for `millis` (or until [`TransferStep::Resume`]).
    PauseElections {
        /// How long the pause may last at most.
        millis: u64,
    },
    /// Lift a pause now.
    Resume,
    /// Campaign now: sent to the transferee once the leader's lease has lapsed. `term` and
    /// `leader` are the sender's, so a stale request (another election happened since) is
    /// refused rather than starting a needless one.
    Campaign {
        /// The term the transfer started in.
        term: u64,
        /// The leader handing over.
        leader: NodeId,
    },
}

/// Why a member refused a transfer step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StepError {
    /// The member's term or leader is not the sender's any more.
    #[error("stale transfer step: member is at term {term}, leader {leader:?}")]
    Stale {
        /// The member's term.
        term: u64,
        /// The leader it knows.
        leader: Option<NodeId>,
    },
    /// The member is stopping.
    #[error("stopped: {0}")]
    Stopped(String),
}

/// A member's pauses for leader transfers: its own election timer (as a follower), or its
/// heartbeats plus a hold on requests that would reach the followers (as the quiet leader). Each
/// pause lifts itself at its deadline.
pub struct Pauses {
    raft: typ::Raft,
    /// Bumped by every pause and resume; a deadline timer lifts only its own pause.
    generation: AtomicU64,
    /// True while requests that would talk to the followers must wait.
    held: watch::Sender<bool>,
}

impl std::fmt::Debug for Pauses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pauses")
            .field("held", &self.is_held())
            .finish_non_exhaustive()
    }
}

impl Pauses {
    /// No pause on `raft`.
    pub fn new(raft: typ::Raft) -> Arc<Self> {
        Arc::new(Pauses {
            raft,
            generation: AtomicU64::new(0),
            held: watch::channel(false).0,
        })
    }

    /// Leader side: no heartbeats and hold requests for at most `max`.
    pub fn quiet_leader(self: &Arc<Self>, max: Duration) {
        self.raft.runtime_config().heartbeat(false);
        self.held.send_replace(true);
        self.arm(max);
    }

    /// Follower side: no elections for at most `max`.
    pub fn pause_elections(self: &Arc<Self>, max: Duration) {
        self.raft.runtime_config().elect(false);
        self.arm(max);
    }

    /// Lifts every pause now (re-enabling what fetcd never disables otherwise).
    pub fn resume(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.lift();
    }

    /// True while this member is a quiet leader.
    pub fn is_held(&self) -> bool {
        *self.held.borrow()
    }

    /// Waits until this member is not a quiet leader (bounded by the pause's own deadline).
    pub async fn wait_released(&self) {
        let mut rx = self.held.subscribe();
        // An error means the sender is gone, i.e. the member is being dropped: nothing to hold.
        let _ = rx.wait_for(|held| !*held).await;
    }

    fn lift(&self) {
        self.raft.runtime_config().heartbeat(true);
        self.raft.runtime_config().elect(true);
        self.held.send_replace(false);
    }

    /// Lifts the pause just taken after `max`, unless another pause or a resume came since.
    fn arm(self: &Arc<Self>, max: Duration) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(max).await;
            let Some(me) = me.upgrade() else { return };
            if me.generation.load(Ordering::SeqCst) == generation {
                tracing::warn!(
                    after = ?max,
                    "leader-transfer pause reached its deadline; lifting it"
                );
                me.lift();
            }
        });
    }

    /// Carries out a step sent by a leader that transfers its leadership.
    pub async fn apply(self: &Arc<Self>, step: TransferStep) -> Result<(), StepError> {
        match step {
            TransferStep::PauseElections { millis } => {
                self.pause_elections(Duration::from_millis(millis));
                Ok(())
            }
            TransferStep::Resume => {
                self.resume();
                Ok(())
            }
            TransferStep::Campaign { term, leader } => {
                let (my_term, my_leader) = {
                    let m = self.raft.metrics().borrow().clone();
                    (m.current_term, m.current_leader)
                };
                if my_term != term || my_leader != Some(leader) {
                    return Err(StepError::Stale {
                        term: my_term,
                        leader: my_leader,
                    });
                }
                tracing::info!(term, from = leader, "campaigning for a leader transfer");
                self.raft
                    .trigger()
                    .elect()
                    .await
                    .map_err(|e| StepError::Stopped(e.to_string()))
            }
        }
    }
}
