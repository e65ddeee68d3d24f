//! The lessor: the clock half of etcd's `lease` package. The lease table itself is replicated
//! state in the store; this module keeps, on the leader only, each lease's deadline, renews it on
//! keepalive, and revokes leases whose deadline passed by proposing a revoke through Raft.
//!
//! Rules (etcd's, plus one refinement):
//! - Only the primary (the leader, once it applied everything of earlier terms) has deadlines;
//!   followers never expire anything.
//! - On promotion every lease gets `now + extend + remaining` where `remaining` is the
//!   checkpointed remaining TTL or else the full TTL, and `extend` is one election timeout, so
//!   clients have time to find the new leader. No lease can expire earlier than the last
//!   acknowledged keepalive + TTL: a keepalive first clears any checkpoint through Raft, and the
//!   new leader then grants the full TTL from its own promotion, which is later than the ack.
//! - Refinement: a checkpoint (or grant) stamped by *this* member is counted down against this
//!   member's own wall clock, so after a restart a lease that ran out while the member was down
//!   is revoked at once instead of living a further TTL. Stamps of other members are not compared
//!   with the local clock.
//! - Long leases are checkpointed every `checkpoint_interval` (etcd's lease checkpointing), so a
//!   new leader does not restart an hour-long TTL from the top.

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;
use std::time::SystemTime;

use fetcd_proto::etcdserverpb::LeaseCheckpoint;
use fetcd_proto::etcdserverpb::LeaseCheckpointRequest;
use fetcd_proto::etcdserverpb::LeaseRevokeRequest;
use fetcd_proto::raftpb::internal_raft_request::Request;
use fetcd_storage::Lease;
use tokio::task::JoinSet;

use crate::node::EtcdNode;

/// Most revokes of expired leases proposed at once (etcd rate-limits to 1000/s; proposals are
/// batched into Raft entries, so a burst of expiries costs few entries).
const MAX_REVOKES_IN_FLIGHT: usize = 1024;
/// Most checkpoints in one proposal (etcd's `maxLeaseCheckpointBatchSize`).
const MAX_CHECKPOINTS_PER_REQUEST: usize = 1000;
/// How often the expiry loop looks at the clock.
const TICK: Duration = Duration::from_millis(50);
/// After a failed revoke, how long before trying again.
const REVOKE_RETRY: Duration = Duration::from_millis(500);

/// The wall clock in milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The outcome of a keepalive.
#[derive(Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Renewed for `ttl` seconds; `clear_checkpoint` asks the caller to clear the recorded
    /// countdown through Raft before acknowledging.
    Renewed {
        /// The lease's TTL.
        ttl: i64,
        /// The lease has a checkpointed remaining TTL that a new leader would otherwise trust.
        clear_checkpoint: bool,
    },
    /// The lease ran out; its revoke is on the way.
    Expired,
    /// The lease does not exist.
    NotFound,
    /// This member is not the primary lessor (not leader, or not yet caught up).
    NotPrimary,
}

#[derive(Debug, Default)]
struct State {
    primary: bool,
    deadlines: HashMap<i64, Instant>,
    /// `deadlines` ordered by time, for the expiry scan.
    queue: BTreeSet<(Instant, i64)>,
    /// The store's lease epoch the deadlines were last reconciled with.
    epoch: u64,
    /// Leases whose revoke is proposed and not yet answered.
    revoking: HashSet<i64>,
}

impl State {
    fn set(&mut self, id: i64, at: Instant) {
        if let Some(old) = self.deadlines.insert(id, at) {
            self.queue.remove(&(old, id));
        }
        self.queue.insert((at, id));
    }

    fn remove(&mut self, id: i64) {
        if let Some(old) = self.deadlines.remove(&id) {
            self.queue.remove(&(old, id));
        }
    }
}

/// Lease deadlines on the leader (etcd's `lessor`, without the replicated table).
#[derive(Debug)]
pub struct Lessor {
    member_id: u64,
    min_ttl: i64,
    extend: Duration,
    checkpoint_interval: Duration,
    state: Mutex<State>,
    primary: tokio::sync::watch::Sender<bool>,
    /// Woken whenever a revoke finishes, for keepalives waiting on an expired lease.
    revoked: tokio::sync::Notify,
    next_id: AtomicU64,
}

impl Lessor {
    /// A lessor for `member_id`. `min_ttl` is etcd's minimum lease TTL in seconds, `extend` what a
    /// new leader adds to every lease (one election timeout).
    pub fn new(
        member_id: u64,
        min_ttl: i64,
        extend: Duration,
        checkpoint_interval: Duration,
    ) -> Self {
        // etcd's ID generator layout: the member id's low 16 bits, then the clock in ms, then a
        // counter, so IDs from different members or restarts do not collide.
        let prefix = (member_id & 0xffff) << 48;
        let suffix = (unix_ms() & ((1 << 40) - 1)) << 8;
        Lessor {
            member_id,
            min_ttl,
            extend,
            checkpoint_interval,
            state: Mutex::new(State::default()),
            primary: tokio::sync::watch::channel(false).0,
            revoked: tokio::sync::Notify::new(),
            next_id: AtomicU64::new(prefix | suffix),
        }
    }

    /// A fresh positive lease ID for a grant that asked for ID 0.
    pub fn next_id(&self) -> i64 {
        loop {
            let prefix = (self.member_id & 0xffff) << 48;
            let n = self.next_id.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            let id = ((prefix | (n & ((1 << 48) - 1))) & (i64::MAX as u64)) as i64;
            if id != 0 {
                return id;
            }
        }
    }

    /// The smallest TTL a grant gets, in seconds.
    pub fn min_ttl(&self) -> i64 {
        self.min_ttl
    }

    /// This member, as it stamps checkpoints.
    pub fn member_id(&self) -> u64 {
        self.member_id
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while this member keeps lease deadlines.
    pub fn is_primary(&self) -> bool {
        self.state().primary
    }

    /// Waits up to `timeout` for this member to become primary.
    pub async fn wait_primary(&self, timeout: Duration) -> bool {
        let mut rx = self.primary.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|p| *p))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Becomes primary: every lease gets a deadline (see the module rules).
    pub fn promote(&self, leases: &[Lease], epoch: u64) {
        let now = Instant::now();
        let now_ms = unix_ms();
        let mut st = self.state();
        st.deadlines.clear();
        st.queue.clear();
        for l in leases {
            let at = now + self.initial_remaining(l, now_ms);
            st.set(l.id, at);
        }
        st.epoch = epoch;
        st.primary = true;
        drop(st);
        self.primary.send_replace(true);
        tracing::info!(leases = leases.len(), "lessor promoted");
    }

    /// How long a lease has left when this member starts keeping its deadline.
    fn initial_remaining(&self, l: &Lease, now_ms: u64) -> Duration {
        let secs = |s: i64| Duration::from_secs(s.max(0) as u64);
        if l.remaining_ttl <= 0 {
            return secs(l.ttl) + self.extend;
        }
        match l.stamp {
            Some(s) if s.member == self.member_id && s.unix_ms <= now_ms => {
                let end_ms = s
                    .unix_ms
                    .saturating_add(l.remaining_ttl.max(0) as u64 * 1000);
                Duration::from_millis(end_ms.saturating_sub(now_ms))
            }
            _ => secs(l.remaining_ttl) + self.extend,
        }
    }

    /// Stops keeping deadlines (leadership lost).
    pub fn demote(&self) {
        let mut st = self.state();
        st.primary = false;
        st.deadlines.clear();
        st.queue.clear();
        drop(st);
        self.primary.send_replace(false);
        self.revoked.notify_waiters();
        tracing::info!("lessor demoted");
    }

    /// A grant was applied with this member as primary: the lease runs from now.
    pub fn granted(&self, id: i64, ttl: i64) {
        let mut st = self.state();
        if st.primary {
            st.set(id, Instant::now() + Duration::from_secs(ttl.max(0) as u64));
        }
    }

    /// A revoke was applied (or the lease is gone): forget its deadline.
    pub fn forget(&self, id: i64) {
        self.state().remove(id);
        self.revoked.notify_waiters();
    }

    /// Brings the deadlines in line with the lease table after grants or revokes this member did
    /// not see through its own handlers (replayed entries, other proposers).
    pub fn reconcile(&self, leases: &[Lease], epoch: u64) {
        let now = Instant::now();
        let now_ms = unix_ms();
        let mut st = self.state();
        if !st.primary || st.epoch == epoch {
            return;
        }
        let live: HashSet<i64> = leases.iter().map(|l| l.id).collect();
        let gone: Vec<i64> = st
            .deadlines
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in gone {
            st.remove(id);
        }
        for l in leases {
            if !st.deadlines.contains_key(&l.id) {
                let at = now + self.initial_remaining(l, now_ms);
                st.set(l.id, at);
            }
        }
        st.epoch = epoch;
    }

    /// The store's lease epoch the deadlines last matched.
    pub fn epoch(&self) -> u64 {
        self.state().epoch
    }

    /// A keepalive for `lease` (as the store has it, `None` if unknown).
    pub fn renew(&self, id: i64, lease: Option<&Lease>) -> Renewal {
        let now = Instant::now();
        let mut st = self.state();
        if !st.primary {
            return Renewal::NotPrimary;
        }
        let Some(lease) = lease else {
            return Renewal::NotFound;
        };
        if st.revoking.contains(&id) || st.deadlines.get(&id).is_some_and(|d| *d <= now) {
            return Renewal::Expired;
        }
        st.set(id, now + Duration::from_secs(lease.ttl.max(0) as u64));
        Renewal::Renewed {
            ttl: lease.ttl,
            clear_checkpoint: lease.remaining_ttl > 0,
        }
    }

    /// Waits until a revoke finishes (or the lessor is demoted), at most `timeout`.
    pub async fn wait_revoked(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.revoked.notified()).await;
    }

    /// The time left on a lease, if this member keeps its deadline.
    pub fn remaining(&self, id: i64) -> Option<Duration> {
        let st = self.state();
        st.deadlines
            .get(&id)
            .map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// Leases whose deadline passed, up to `max`, now marked as being revoked.
    fn take_expired(&self, max: usize) -> Vec<i64> {
        let now = Instant::now();
        let mut st = self.state();
        if !st.primary {
            return Vec::new();
        }
        let due: Vec<i64> = st
            .queue
            .iter()
            .take_while(|(at, _)| *at <= now)
            .filter(|(_, id)| !st.revoking.contains(id))
            .take(max)
            .map(|(_, id)| *id)
            .collect();
        st.revoking.extend(due.iter().copied());
        due
    }

    /// A proposed revoke ended: `gone` if the lease no longer exists.
    fn revoke_done(&self, id: i64, gone: bool) {
        let mut st = self.state();
        st.revoking.remove(&id);
        if gone {
            st.remove(id);
        } else if st.deadlines.contains_key(&id) {
            st.set(id, Instant::now() + REVOKE_RETRY);
        }
        drop(st);
        self.revoked.notify_waiters();
    }

    /// The checkpoints to record now: every lease with more than one checkpoint interval left,
    /// with its remaining TTL in whole seconds (rounded up, never shortening it).
    fn due_checkpoints(&self) -> Vec<LeaseCheckpoint> {
        let now = Instant::now();
        let st = self.state();
        if !st.primary {
            return Vec::new();
        }
        st.deadlines
            .iter()
            .filter_map(|(id, at)| {
                let left = at.saturating_duration_since(now);
                (left > self.checkpoint_interval).then(|| LeaseCheckpoint {
                    id: *id,
                    remaining_ttl: left.as_secs() as i64 + i64::from(left.subsec_nanos() > 0),
                })
            })
            .collect()
    }
}

/// Runs the lessor of `node` until `stop`: promotion and demotion with leadership, expiry of
/// leases by revoke proposals, and periodic checkpoints.
pub async fn run(node: Arc<EtcdNode>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let lessor = node.lessor();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut revokes: JoinSet<(i64, bool)> = JoinSet::new();
    let mut checkpoints: JoinSet<()> = JoinSet::new();
    let mut last_checkpoint = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = stop.wait_for(|s| *s) => {
                let _ = r;
                break;
            }
            Some(done) = revokes.join_next() => {
                if let Ok((id, gone)) = done {
                    lessor.revoke_done(id, gone);
                }
                continue;
            }
            Some(_) = checkpoints.join_next() => continue,
        }
        let leader = node.raft().is_leader();
        if leader && !lessor.is_primary() {
            // Like etcd, promote only once everything committed in earlier terms is applied:
            // the lease table is then final.
            if node.raft().read_barrier().await.is_ok() && node.raft().is_leader() {
                let store = node.store();
                lessor.promote(&store.leases(), store.lease_epoch());
                last_checkpoint = Instant::now();
            }
            continue;
        }
        if !leader {
            if lessor.is_primary() {
                lessor.demote();
            }
            continue;
        }
        let store = node.store();
        let epoch = store.lease_epoch();
        if lessor.epoch() != epoch {
            lessor.reconcile(&store.leases(), epoch);
        }
        let room = MAX_REVOKES_IN_FLIGHT.saturating_sub(revokes.len());
        for id in lessor.take_expired(room) {
            let node = node.clone();
            revokes.spawn(async move {
                let res = node
                    .write(Request::LeaseRevoke(LeaseRevokeRequest { id }))
                    .await;
                let gone = match &res {
                    Ok(_) => true,
                    Err(s) => s.code() == tonic::Code::NotFound,
                };
                if !gone {
                    if let Err(e) = res {
                        tracing::warn!(lease = id, error = %e, "revoking an expired lease failed; will retry");
                    }
                } else {
                    tracing::debug!(lease = id, "expired lease revoked");
                }
                (id, gone)
            });
        }
        if last_checkpoint.elapsed() >= lessor.checkpoint_interval && checkpoints.is_empty() {
            last_checkpoint = Instant::now();
            let due = lessor.due_checkpoints();
            for chunk in due.chunks(MAX_CHECKPOINTS_PER_REQUEST) {
                let node = node.clone();
                let req = LeaseCheckpointRequest {
                    checkpoints: chunk.to_vec(),
                };
                checkpoints.spawn(async move {
                    if let Err(e) = node.write(Request::LeaseCheckpoint(req)).await {
                        tracing::warn!(error = %e, "lease checkpoint failed");
                    }
                });
            }
        }
    }
    revokes.abort_all();
    checkpoints.abort_all();
}

#[cfg(test)]
mod tests {
    use fetcd_storage::LeaseStamp;

    use super::*;

    fn lease(id: i64, ttl: i64, remaining_ttl: i64, stamp: Option<LeaseStamp>) -> Lease {
        Lease {
            id,
            ttl,
            remaining_ttl,
            stamp,
        }
    }

    fn stamp(member: u64, unix_ms: u64) -> Option<LeaseStamp> {
        Some(LeaseStamp { member, unix_ms })
    }

    #[test]
    fn ids_are_positive_unique_and_carry_the_member_prefix() {
        let l = Lessor::new(0x8e9e_05c5_2164_694d, 2, Duration::ZERO, Duration::MAX);
        let a = l.next_id();
        let b = l.next_id();
        assert!(a > 0 && b > 0 && a != b);
        assert_eq!((a as u64) >> 48, 0x694d);
    }

    #[test]
    fn promotion_uses_checkpoint_full_ttl_or_own_clock() {
        let me = 7;
        let extend = Duration::from_secs(1);
        let l = Lessor::new(me, 2, extend, Duration::MAX);
        let now_ms = unix_ms();
        // No countdown recorded: full TTL plus the election allowance.
        let full = l.initial_remaining(&lease(1, 10, 0, None), now_ms);
        assert_eq!(full, Duration::from_secs(11));
        // Another member's checkpoint: its remaining TTL plus the allowance, clock ignored.
        let other = stamp(9, now_ms - 100_000);
        assert_eq!(
            l.initial_remaining(&lease(2, 600, 300, other), now_ms),
            Duration::from_secs(301)
        );
        // Own stamp: counted down on the own clock; a lease that ran out meanwhile has nothing.
        let own_old = stamp(me, now_ms - 100_000);
        assert_eq!(
            l.initial_remaining(&lease(3, 60, 60, own_old), now_ms),
            Duration::ZERO
        );
        let own_recent = stamp(me, now_ms - 10_000);
        assert_eq!(
            l.initial_remaining(&lease(4, 60, 60, own_recent), now_ms),
            Duration::from_secs(50)
        );
        // A stamp from the future (clock stepped back): not trusted.
        let future = stamp(me, now_ms + 100_000);
        assert_eq!(
            l.initial_remaining(&lease(5, 60, 30, future), now_ms),
            Duration::from_secs(31)
        );
    }

    #[test]
    fn renew_expire_and_revoke_cycle() {
        let l = Lessor::new(1, 2, Duration::ZERO, Duration::MAX);
        let a = lease(1, 5, 5, None);
        assert_eq!(l.renew(1, Some(&a)), Renewal::NotPrimary);
        l.promote(&[lease(1, 5, 0, None), lease(2, 0, 0, None)], 1);
        assert_eq!(
            l.renew(1, Some(&a)),
            Renewal::Renewed {
                ttl: 5,
                clear_checkpoint: true
            }
        );
        assert_eq!(l.renew(3, None), Renewal::NotFound);
        // Lease 2 has a zero TTL and no allowance: due at once.
        assert_eq!(l.take_expired(10), vec![2]);
        assert!(l.take_expired(10).is_empty(), "already being revoked");
        assert_eq!(l.renew(2, Some(&lease(2, 0, 0, None))), Renewal::Expired);
        l.revoke_done(2, false);
        assert!(l.remaining(2).is_some(), "a failed revoke is retried later");
        l.revoke_done(2, true);
        assert!(l.remaining(2).is_none());
        l.demote();
        assert!(l.remaining(1).is_none());
        assert_eq!(l.renew(1, Some(&a)), Renewal::NotPrimary);
    }

    #[test]
    fn checkpoints_cover_only_leases_longer_than_the_interval() {
        let l = Lessor::new(1, 2, Duration::ZERO, Duration::from_secs(60));
        l.promote(&[lease(1, 3600, 0, None), lease(2, 30, 0, None)], 1);
        let cps = l.due_checkpoints();
        assert_eq!(cps.len(), 1);
        assert_eq!(cps[0].id, 1);
        assert!(cps[0].remaining_ttl > 3590 && cps[0].remaining_ttl <= 3600);
    }
}
