//! The leader's read index, with its leadership confirmed by its followers' word: their
//! answers to the replication traffic, and to vouch requests.
//!
//! A linearizable read needs a read index: a log index at or past everything committed when
//! the read arrived, vouched for by a quorum that still followed this leader after that moment
//! (etcd's ReadIndex, Raft thesis §6.4). openraft 0.9's `get_read_log_id` gets that word with a
//! round of unary empty AppendEntries of its own to every follower, per call. Under kube's mix
//! on three members that was 2381 rounds per 10k operations, each costing an HTTP/2 stream,
//! tasks and a pass through the Raft core on all three members.
//!
//! Every AppendEntries the replication streams carry says the same: a follower that answers one
//! sent under vote `v` at time `t` with anything but a higher vote had seen no higher vote when
//! it answered, and went on to hold `v`. If a quorum did so for AppendEntries sent after the
//! read arrived, no leader newer than `v` had been elected by then (it would have needed votes
//! from that quorum, which would have refused `v` since), so this leader's log held everything
//! committed when the read arrived. Under write load such AppendEntries are in flight anyway;
//! when a follower's stream is idle, a heartbeat is triggered, which rides the same stream.
//! But a follower answers an AppendEntries only once its entries are synced: each read also
//! asks every follower to vouch for the leader's vote ([`crate::vouch`]), which it answers at
//! once, and a "yes" counts as an answered AppendEntries sent when the request was. Whichever
//! comes first confirms.
//!
//! The index must be at or past every entry anyone could have seen committed when the read
//! arrived: acknowledged to a client, shown to a watcher, applied by a follower. Once an entry
//! of the leader's own term is committed (its first entry, etcd's and openraft's no-op), that is
//! the highest of
//! - the last entry this leader handed to its store ([`StateMachine::applying`]): it answers
//!   clients and watchers only from there;
//! - the highest commit index it sent a follower ([`LeaderAcks::sending`]): followers apply, and
//!   show, only up to what they were told;
//!
//! and entries committed under earlier leaders lie below the no-op. A read then waits only for
//! what was committed, not for the entries still in flight, as etcd's ReadIndex does with the
//! leader's commit index. Before the no-op is applied the index is the last entry written to
//! the log ([`Durability::written_end`]), at or past anything committed (a leader replicates
//! only what it wrote): the read waits for the entries in flight to commit and apply.
//!
//! A follower that asks the leader for a read index gives its word too ([`ReadIndexAsk`]): the
//! vote it had saved when it asked, read after every read it asks for had arrived. If that is
//! the leader's vote, it vouches as a "yes" to a vouch request sent at that moment would, a
//! moment after those reads arrived, and it counts toward the quorum of that request only (the
//! leader cannot place that moment on its own clock, so it confirms nothing else). On three
//! members the leader and the asker are a quorum: a follower's read costs one round trip to the
//! leader, and no vouch request goes out for it.
//!
//! A member that is the quorum alone, or that gets no confirmation within the fallback time (a
//! leader cut off, a follower that stopped answering), asks openraft, whose answer is final.

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use openraft::error::CheckIsLeaderError;
use openraft::error::RaftError;
use openraft::BasicNode;
use openraft::ServerState;
use openraft::Vote;
use serde::Deserialize;
use serde::Serialize;

use crate::durable::Durability;
use crate::log_store::LogStore;
use crate::network::Network;
use crate::state_machine::StateMachine;
use crate::typ;
use crate::vouch::Vouchers;
use crate::NodeId;
use crate::TypeConfig;

/// A follower's read-index request: who asks, and the vote it had saved when it asked (after
/// the reads it asks for arrived). openraft saves a vote before granting it, so if this is the
/// leader's vote, no leader newer than it had been elected with the asker's vote by then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadIndexAsk {
    /// The asking member.
    pub from: NodeId,
    /// Its saved vote when it asked.
    pub vote: Option<Vote<NodeId>>,
}

/// The member whose word in `ask` counts toward confirming `vote` for a quorum of `joint`: a
/// voter other than `me` whose saved vote was `vote`, a committed one.
fn vouching_asker(
    ask: Option<&ReadIndexAsk>,
    me: NodeId,
    vote: &Vote<NodeId>,
    joint: &[BTreeSet<NodeId>],
) -> Option<NodeId> {
    let ask = ask?;
    (ask.from != me
        && joint.iter().any(|c| c.contains(&ask.from))
        && crate::vouch::vouches(ask.vote.as_ref(), vote))
    .then_some(ask.from)
}

/// What one peer's answers to this member's AppendEntries vouch for.
#[derive(Debug, Default)]
struct PeerAcks {
    /// The vote of the newest AppendEntries the peer answered without a higher vote, and when
    /// that AppendEntries was sent.
    confirmed: Option<(Vote<NodeId>, Instant)>,
    /// When the peer last answered anything (or an RPC to it failed).
    answered: Option<Instant>,
    /// AppendEntries sent to the peer and not answered yet.
    in_flight: usize,
    /// One past the last entry sent to the peer.
    sent_end: u64,
}

impl PeerAcks {
    /// The peer vouched for `vote` in answer to a message sent at `sent`.
    fn confirm(&mut self, vote: Vote<NodeId>, sent: Instant) {
        self.confirmed = match self.confirmed {
            Some((v, at)) if v == vote => Some((v, at.max(sent))),
            _ => Some((vote, sent)),
        };
    }
}

#[derive(Debug, Default)]
struct AckState {
    peers: HashMap<NodeId, PeerAcks>,
    /// When a heartbeat was last asked of openraft for a confirmation.
    heartbeat_asked: Option<Instant>,
}

/// Followers' answers to this member's AppendEntries, as leadership confirmations; recorded by
/// the network's clients, read by [`ReadIndex`].
#[derive(Debug, Default)]
pub struct LeaderAcks {
    state: Mutex<AckState>,
    changed: tokio::sync::Notify,
    /// One past the highest commit index sent to any follower: a follower may have applied up
    /// to there, and shown it to a watcher or a serializable read.
    commit_shown: std::sync::atomic::AtomicU64,
}

/// An AppendEntries on its way to a peer; dropping it without [`SentAppend::answered`] counts
/// it as failed (the RPC was cancelled).
#[derive(Debug)]
pub struct SentAppend<'a> {
    acks: &'a LeaderAcks,
    peer: NodeId,
    vote: Vote<NodeId>,
    sent: Instant,
    done: bool,
}

impl SentAppend<'_> {
    /// The peer answered; `vouches` unless it answered with a higher vote.
    pub fn answered(mut self, vouches: bool) {
        self.finish(vouches);
    }

    fn finish(&mut self, vouches: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let mut st = self.acks.lock();
        let p = st.peers.entry(self.peer).or_default();
        p.in_flight = p.in_flight.saturating_sub(1);
        p.answered = Some(Instant::now());
        if vouches {
            p.confirm(self.vote, self.sent);
        }
        drop(st);
        self.acks.changed.notify_waiters();
    }
}

impl Drop for SentAppend<'_> {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// Whether `granted` holds a majority of every configuration of a (possibly joint) membership.
fn is_quorum(joint: &[BTreeSet<NodeId>], granted: impl Fn(NodeId) -> bool) -> bool {
    joint
        .iter()
        .all(|c| c.iter().filter(|id| granted(**id)).count() * 2 > c.len())
}

impl LeaderAcks {
    fn lock(&self) -> std::sync::MutexGuard<'_, AckState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Peer `peer` answered yes to a vouch request for `vote` sent at `sent`
    /// ([`crate::vouch`]): a confirmation as an answered AppendEntries is.
    pub fn vouched(&self, peer: NodeId, vote: Vote<NodeId>, sent: Instant) {
        self.lock()
            .peers
            .entry(peer)
            .or_default()
            .confirm(vote, sent);
        self.changed.notify_waiters();
    }

    /// Notes an AppendEntries under `vote` leaving for `peer` now, with entries up to
    /// `sent_end` (exclusive) if it carries any, and the commit index `commit` if it tells one.
    pub fn sending(
        &self,
        peer: NodeId,
        vote: Vote<NodeId>,
        sent_end: Option<u64>,
        commit: Option<u64>,
    ) -> SentAppend<'_> {
        if let Some(c) = commit {
            self.commit_shown
                .fetch_max(c + 1, std::sync::atomic::Ordering::AcqRel);
        }
        let sent = Instant::now();
        let mut st = self.lock();
        let p = st.peers.entry(peer).or_default();
        p.in_flight += 1;
        p.sent_end = p.sent_end.max(sent_end.unwrap_or(0));
        drop(st);
        SentAppend {
            acks: self,
            peer,
            vote,
            sent,
            done: false,
        }
    }

    /// Waits until a quorum of `joint` (with `me` and `also` counted) answered AppendEntries
    /// under `vote` sent at or after `since`; false at `deadline`. Calls `heartbeat` when a peer
    /// still needed has nothing in flight, has been sent every entry below `log_end()` (the log's
    /// written end), and no heartbeat was asked for since its last answer: openraft then sends
    /// nothing to it until new entries come.
    #[allow(clippy::too_many_arguments)]
    pub async fn confirm<F, Fut>(
        &self,
        me: NodeId,
        also: Option<NodeId>,
        vote: Vote<NodeId>,
        since: Instant,
        joint: &[BTreeSet<NodeId>],
        deadline: Instant,
        log_end: impl Fn() -> u64,
        heartbeat: F,
    ) -> bool
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let ask = {
                let mut st = self.lock();
                let granted = |id: NodeId| {
                    id == me
                        || Some(id) == also
                        || st.peers.get(&id).is_some_and(|p| {
                            p.confirmed.is_some_and(|(v, at)| v == vote && at >= since)
                        })
                };
                if is_quorum(joint, granted) {
                    return true;
                }
                let asked = st.heartbeat_asked.filter(|at| *at >= since);
                let end = log_end();
                let idle = joint.iter().flatten().any(|id| {
                    !granted(*id)
                        && st.peers.get(id).is_none_or(|p| {
                            p.in_flight == 0
                                && p.sent_end >= end
                                && asked.is_none_or(|a| p.answered.is_some_and(|t| t > a))
                        })
                });
                if idle {
                    st.heartbeat_asked = Some(Instant::now());
                }
                idle
            };
            if ask {
                heartbeat().await;
            }
            if tokio::time::timeout_at(deadline.into(), changed)
                .await
                .is_err()
            {
                return false;
            }
        }
    }
}

/// The read index of a leader in `term` whose store was last handed entry `applying`, that
/// sent followers commit indexes below `shown_end`, and whose log is written below
/// `written_end` (see the module's documentation).
fn index_to_read(
    applying: Option<openraft::LogId<NodeId>>,
    term: u64,
    shown_end: u64,
    written_end: u64,
) -> u64 {
    match applying {
        // An entry of this leader's term is committed: so is everything before its no-op.
        Some(l) if l.leader_id.term == term => l.index.max(shown_end.saturating_sub(1)),
        _ => written_end.saturating_sub(1),
    }
}

/// A leader's read index: confirmed by the replication traffic where it can be, else by
/// openraft (see the module's documentation).
pub struct ReadIndex {
    raft: typ::Raft,
    acks: Arc<LeaderAcks>,
    durability: Arc<Durability>,
    state_machine: Arc<StateMachine>,
    vouchers: Vouchers,
    /// This member's log: the vote it saved (before it ever granted it), and where reads
    /// waiting here are noted ([`LogStore::reads_here`]).
    log: LogStore<TypeConfig>,
    id: NodeId,
    /// How long to wait for the traffic's confirmation before asking openraft.
    fallback: Duration,
}

/// openraft's error for a read index.
pub type ReadIndexError = RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>;

impl ReadIndex {
    /// The read index of member `id`, with its `network` (which records the followers'
    /// answers), its `log` and its `state_machine`; `fallback` is how long to wait for the
    /// followers before asking openraft.
    pub fn new(
        raft: typ::Raft,
        network: &Network,
        state_machine: Arc<StateMachine>,
        log: LogStore<TypeConfig>,
        id: NodeId,
        fallback: Duration,
    ) -> Self {
        let acks = network.acks().clone();
        ReadIndex {
            raft,
            vouchers: Vouchers::new(network.clone(), acks.clone()),
            acks,
            durability: log.durability(),
            state_machine,
            log,
            id,
            fallback,
        }
    }

    /// Whether this member vouches for a leader of vote `asked` ([`crate::vouch`]).
    pub fn vouches(&self, asked: &Vote<NodeId>) -> bool {
        self.log.reads_here();
        crate::vouch::vouches(self.log.saved_vote().as_ref(), asked)
    }

    /// A client's linearizable read waits on this member.
    pub fn reading(&self) {
        self.log.reads_here();
    }

    /// This member's word for a read-index request it sends now, after the reads it asks for
    /// arrived.
    pub fn ask(&self) -> ReadIndexAsk {
        ReadIndexAsk {
            from: self.id,
            vote: self.log.saved_vote(),
        }
    }

    /// The index a read arriving now must see applied, if the leader's vote is `vote` (see
    /// the module's documentation).
    fn index_to_read(&self, vote: &Vote<NodeId>) -> u64 {
        index_to_read(
            self.state_machine.applying(),
            vote.leader_id().get_term(),
            self.acks
                .commit_shown
                .load(std::sync::atomic::Ordering::Acquire),
            self.durability.written_end(),
        )
    }

    /// The log index a linearizable read that arrived now must see applied, if this member
    /// leads (`ForwardToLeader` if not, `QuorumNotEnough` if a quorum does not confirm it).
    // The error is openraft's.
    #[allow(clippy::result_large_err)]
    pub async fn leader_read_index(&self) -> Result<u64, ReadIndexError> {
        self.leader_read_index_for(None).await
    }

    /// [`ReadIndex::leader_read_index`] for a follower's request `ask`, whose word counts
    /// toward the quorum if it vouches for this leader.
    // The error is openraft's.
    #[allow(clippy::result_large_err)]
    pub async fn leader_read_index_for(
        &self,
        ask: Option<&ReadIndexAsk>,
    ) -> Result<u64, ReadIndexError> {
        let since = Instant::now();
        let lead = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let joint = membership.get_joint_config().clone();
            let lead = m.state == ServerState::Leader
                && m.current_leader == Some(self.id)
                && m.vote.is_committed()
                && !is_quorum(&joint, |id| id == self.id);
            let also = vouching_asker(ask, self.id, &m.vote, &joint);
            if lead && !is_quorum(&joint, |id| id == self.id || Some(id) == also) {
                for (id, node) in membership.nodes() {
                    if *id != self.id && joint.iter().any(|c| c.contains(id)) {
                        self.vouchers.want(*id, &node.addr, m.vote, since);
                    }
                }
            }
            lead.then_some((m.vote, joint, also))
        };
        if let Some((vote, joint, also)) = lead {
            // Computed after `since`: at least what it was when the read arrived.
            let read = self.index_to_read(&vote);
            let heartbeat = || async {
                if let Err(e) = self.raft.trigger().heartbeat().await {
                    tracing::debug!(error = %e, "no heartbeat for a read index");
                }
            };
            let deadline = since + self.fallback;
            if self
                .acks
                .confirm(
                    self.id,
                    also,
                    vote,
                    since,
                    &joint,
                    deadline,
                    || self.durability.written_end(),
                    heartbeat,
                )
                .await
            {
                return Ok(read);
            }
        }
        let (read, _) = self.raft.get_read_log_id().await?;
        Ok(read.map_or(0, |l| l.index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(term: u64) -> Vote<NodeId> {
        let mut v = Vote::new(term, 1);
        v.commit();
        v
    }

    fn three() -> Vec<BTreeSet<NodeId>> {
        vec![BTreeSet::from([1, 2, 3])]
    }

    async fn confirmed(acks: &LeaderAcks, since: Instant, joint: &[BTreeSet<NodeId>]) -> bool {
        let deadline = Instant::now() + Duration::from_millis(20);
        acks.confirm(1, None, vote(2), since, joint, deadline, || 0, || async {})
            .await
    }

    impl LeaderAcks {
        fn sending_test(&self, peer: NodeId, vote: Vote<NodeId>) -> SentAppend<'_> {
            self.sending(peer, vote, None, None)
        }
    }

    #[tokio::test]
    async fn only_answers_to_appends_sent_after_the_read_under_its_vote_confirm() {
        let acks = LeaderAcks::default();
        let early = acks.sending_test(2, vote(2));
        let since = Instant::now();
        early.answered(true);
        assert!(
            !confirmed(&acks, since, &three()).await,
            "sent before the read"
        );

        acks.sending_test(2, vote(1)).answered(true);
        assert!(!confirmed(&acks, since, &three()).await, "an older vote");

        acks.sending_test(3, vote(2)).answered(false);
        assert!(!confirmed(&acks, since, &three()).await, "a higher vote");

        drop(acks.sending_test(3, vote(2)));
        assert!(!confirmed(&acks, since, &three()).await, "cancelled");

        acks.sending_test(3, vote(2)).answered(true);
        assert!(confirmed(&acks, since, &three()).await);
    }

    #[test]
    fn the_index_is_the_commit_point_once_this_term_commits_and_the_log_end_before() {
        let at = |term, index| {
            Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(term, 1),
                index,
            ))
        };
        // Nothing of term 3 applied yet: entries of earlier terms may be committed past what
        // this leader knows, so everything written counts.
        assert_eq!(index_to_read(at(2, 10), 3, 0, 15), 14);
        assert_eq!(index_to_read(None, 3, 0, 15), 14);
        // Its no-op applied: the highest of what it applies and what followers were told.
        assert_eq!(index_to_read(at(3, 11), 3, 0, 15), 11);
        assert_eq!(index_to_read(at(3, 11), 3, 14, 15), 13);
    }

    #[tokio::test]
    async fn a_vouch_confirms_from_its_send_time_under_its_vote() {
        let acks = LeaderAcks::default();
        let before = Instant::now();
        let since = Instant::now();
        acks.vouched(2, vote(2), before);
        assert!(
            !confirmed(&acks, since, &three()).await,
            "asked before the read"
        );
        acks.vouched(2, vote(1), Instant::now());
        assert!(!confirmed(&acks, since, &three()).await, "an older vote");
        acks.vouched(3, vote(2), Instant::now());
        assert!(confirmed(&acks, since, &three()).await);
    }

    #[tokio::test]
    async fn a_joint_membership_needs_a_quorum_of_both_configurations() {
        let acks = LeaderAcks::default();
        let joint = vec![BTreeSet::from([1, 2, 3]), BTreeSet::from([3, 4, 5])];
        let since = Instant::now();
        acks.sending_test(2, vote(2)).answered(true);
        assert!(!confirmed(&acks, since, &joint).await);
        acks.sending_test(4, vote(2)).answered(true);
        assert!(!confirmed(&acks, since, &joint).await);
        acks.sending_test(5, vote(2)).answered(true);
        assert!(confirmed(&acks, since, &joint).await);
    }

    #[tokio::test]
    async fn a_waiting_read_is_confirmed_by_an_answer_that_comes_later() {
        let acks = Arc::new(LeaderAcks::default());
        let since = Instant::now();
        let sent = acks.sending_test(3, vote(2));
        let waiter = {
            let acks = acks.clone();
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                acks.confirm(
                    1,
                    None,
                    vote(2),
                    since,
                    &three(),
                    deadline,
                    || 0,
                    || async {},
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        sent.answered(true);
        assert!(waiter.await.is_ok_and(|ok| ok));
    }

    #[tokio::test]
    async fn a_heartbeat_is_asked_only_while_a_needed_peer_is_idle() {
        let acks = LeaderAcks::default();
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let since = Instant::now();
        // Heartbeats asked by one unconfirmed wait, with the log written up to `log_end`.
        let asks = |log_end: u64| {
            let before = asked.load(std::sync::atomic::Ordering::SeqCst);
            let count = || async {
                asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            };
            let deadline = Instant::now() + Duration::from_millis(20);
            let acks = &acks;
            let asked = &asked;
            async move {
                let ok = acks
                    .confirm(
                        1,
                        None,
                        vote(2),
                        since,
                        &three(),
                        deadline,
                        || log_end,
                        count,
                    )
                    .await;
                assert!(!ok);
                asked.load(std::sync::atomic::Ordering::SeqCst) - before
            }
        };
        // Both followers have an AppendEntries in flight: they will answer, no heartbeat.
        let to2 = acks.sending_test(2, vote(2));
        let to3 = acks.sending_test(3, vote(2));
        assert_eq!(asks(0).await, 0);
        drop(to2);
        drop(to3);
        // Nothing in flight, but entries written here were not sent yet: openraft sends them.
        assert_eq!(asks(5).await, 0);
        // Every entry sent, nothing in flight, no confirmation: a heartbeat, once.
        assert_eq!(asks(0).await, 1);
        // Still idle but nothing answered since that heartbeat was asked: not again.
        assert_eq!(asks(0).await, 0);
    }

    #[test]
    fn only_a_voters_word_for_the_leaders_own_vote_counts() {
        let five = vec![BTreeSet::from([1, 2, 3, 4, 5])];
        let ask = |from, vote| ReadIndexAsk { from, vote };
        let mine = vote(2);
        assert_eq!(
            vouching_asker(Some(&ask(2, Some(mine))), 1, &mine, &three()),
            Some(2)
        );
        assert_eq!(vouching_asker(None, 1, &mine, &three()), None);
        assert_eq!(
            vouching_asker(Some(&ask(2, Some(vote(1)))), 1, &mine, &three()),
            None,
            "an older vote"
        );
        assert_eq!(
            vouching_asker(Some(&ask(2, Some(vote(3)))), 1, &mine, &three()),
            None,
            "a newer vote"
        );
        assert_eq!(
            vouching_asker(Some(&ask(2, Some(Vote::new(2, 1)))), 1, &mine, &three()),
            None,
            "a vote granted, not yet committed"
        );
        assert_eq!(
            vouching_asker(Some(&ask(2, None)), 1, &mine, &three()),
            None
        );
        assert_eq!(
            vouching_asker(Some(&ask(4, Some(mine))), 1, &mine, &three()),
            None,
            "a learner"
        );
        assert_eq!(
            vouching_asker(Some(&ask(1, Some(mine))), 1, &mine, &three()),
            None,
            "the leader itself"
        );
        assert_eq!(
            vouching_asker(Some(&ask(4, Some(mine))), 1, &mine, &five),
            Some(4)
        );
    }

    #[tokio::test]
    async fn a_vouching_asker_completes_a_quorum_with_the_leader_and_no_more() {
        let acks = LeaderAcks::default();
        let since = Instant::now();
        let deadline = Instant::now() + Duration::from_millis(20);
        let confirm = |also, joint: Vec<BTreeSet<NodeId>>| {
            let acks = &acks;
            async move {
                acks.confirm(1, also, vote(2), since, &joint, deadline, || 0, || async {})
                    .await
            }
        };
        assert!(confirm(Some(2), three()).await, "leader and asker: 2 of 3");
        assert!(!confirm(None, three()).await);
        let five = vec![BTreeSet::from([1, 2, 3, 4, 5])];
        assert!(!confirm(Some(2), five.clone()).await, "2 of 5");
        acks.vouched(3, vote(2), Instant::now());
        assert!(confirm(Some(2), five.clone()).await, "3 of 5");
        assert!(!confirm(None, five).await, "2 of 5 without the asker");
    }
}
