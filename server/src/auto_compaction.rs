//! Automatic compaction: etcd's `--auto-compaction-mode` and `--auto-compaction-retention`.
//!
//! Operators who do not run kube-apiserver's own compactor (or run other clients) bound the
//! history this way. As in etcd, only the leader decides: it proposes the compaction through Raft
//! like a client's `Compact`, so every member compacts at the same revision, and a member that
//! loses leadership forgets what it sampled (a new leader starts its own window, so history is
//! never cut shorter than the retention asks).
//!
//! - `periodic` (the default): keep at least the retention's worth of time. The leader samples
//!   the current revision every tenth of the compaction window (the retention, at most an hour)
//!   and, once a window has passed since its last compaction, compacts at the newest sample that
//!   is at least the retention old. A bare number is hours (`1` = one hour), as in etcd; a Go
//!   duration (`30m`, `72h`, `5s`) is taken as written.
//! - `revision`: keep the last `retention` revisions: every five minutes the leader compacts at
//!   `current - retention`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use fetcd_proto::etcdserverpb::CompactionRequest;
use fetcd_proto::raftpb::internal_raft_request::Request;

use crate::config::parse_go_duration;
use crate::node::EtcdNode;

/// The longest compaction window: a longer periodic retention still compacts hourly.
const MAX_WINDOW: Duration = Duration::from_secs(3600);

/// How often `revision` mode checks, as etcd's revision compactor.
pub const REVISION_INTERVAL: Duration = Duration::from_secs(300);

/// What history automatic compaction keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoCompaction {
    /// At least this much time.
    Periodic(Duration),
    /// At least this many revisions.
    Revision(i64),
}

impl AutoCompaction {
    /// Reads etcd's two flags; `None` when the retention is 0 (disabled, etcd's default).
    pub fn from_flags(mode: &str, retention: &str) -> Result<Option<Self>, String> {
        let retention = retention.trim();
        let bad = || format!("invalid auto-compaction-retention {retention:?}");
        let policy = match mode {
            "periodic" => {
                let period = match retention.parse::<u64>() {
                    Ok(hours) => Duration::from_secs(hours.saturating_mul(3600)),
                    Err(_) => parse_go_duration(retention).map_err(|_| bad())?,
                };
                if period.is_zero() {
                    return Ok(None);
                }
                AutoCompaction::Periodic(period)
            }
            "revision" => {
                let revs = retention.parse::<i64>().map_err(|_| bad())?;
                if revs < 0 {
                    return Err(bad());
                }
                if revs == 0 {
                    return Ok(None);
                }
                AutoCompaction::Revision(revs)
            }
            other => return Err(format!("unknown auto-compaction-mode {other:?}")),
        };
        Ok(Some(policy))
    }
}

/// Where a periodic compactor stands: the revisions it sampled and when it last compacted.
#[derive(Debug)]
struct Periodic {
    retention: Duration,
    window: Duration,
    samples: VecDeque<(Instant, i64)>,
    /// When this member became leader or last compacted; the next compaction is a window later.
    since: Option<Instant>,
}

impl Periodic {
    fn new(retention: Duration) -> Self {
        Periodic {
            retention,
            window: retention.min(MAX_WINDOW),
            samples: VecDeque::new(),
            since: None,
        }
    }

    fn sample_every(&self) -> Duration {
        (self.window / 10).max(Duration::from_millis(1))
    }

    /// Records `rev` as current at `now` and returns the revision to compact at, if it is time.
    fn tick(&mut self, now: Instant, rev: i64) -> Option<i64> {
        let since = *self.since.get_or_insert(now);
        self.samples.push_back((now, rev));
        // Keep one sample at least `retention` old: the newest such is the one to compact at.
        while self
            .samples
            .get(1)
            .is_some_and(|&(t, _)| now.duration_since(t) >= self.retention)
        {
            self.samples.pop_front();
        }
        let &(t, target) = self.samples.front()?;
        let due =
            now.duration_since(t) >= self.retention && now.duration_since(since) >= self.window;
        due.then_some(target)
    }

    fn compacted(&mut self, now: Instant) {
        self.since = Some(now);
    }

    /// Leadership lost: what was sampled says nothing about the next term.
    fn reset(&mut self) {
        self.samples.clear();
        self.since = None;
    }
}

/// The state of one member's automatic compactor.
#[derive(Debug)]
enum Schedule {
    Periodic(Periodic),
    /// Revisions to keep.
    Revision(i64),
}

impl Schedule {
    /// The revision to compact at now, if any.
    fn due(&mut self, now: Instant, current: i64) -> Option<i64> {
        match self {
            Schedule::Periodic(p) => p.tick(now, current),
            Schedule::Revision(keep) => Some(current - *keep),
        }
    }

    /// A compaction at the target happened (or was not needed): a periodic window starts over.
    fn done(&mut self, now: Instant) {
        if let Schedule::Periodic(p) = self {
            p.compacted(now);
        }
    }

    /// Leadership lost.
    fn reset(&mut self) {
        if let Schedule::Periodic(p) = self {
            p.reset();
        }
    }
}

/// Runs automatic compaction for `policy` until `stop` turns true; `revision_interval` is how
/// often `revision` mode checks ([`REVISION_INTERVAL`] outside tests).
pub async fn run(
    node: Arc<EtcdNode>,
    policy: AutoCompaction,
    revision_interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (mut schedule, every) = match policy {
        AutoCompaction::Periodic(retention) => {
            let p = Periodic::new(retention);
            let every = p.sample_every();
            (Schedule::Periodic(p), every)
        }
        AutoCompaction::Revision(keep) => (Schedule::Revision(keep), revision_interval),
    };
    tracing::info!(?policy, ?every, "auto-compaction enabled");
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        if !node.raft().is_leader() {
            schedule.reset();
            continue;
        }
        let store = node.store();
        let Some(target) = schedule.due(Instant::now(), store.current_revision()) else {
            continue;
        };
        if target <= store.compact_revision() || target <= 1 {
            // Nothing new to drop: the window starts over, as after a compaction.
            schedule.done(Instant::now());
            continue;
        }
        tracing::info!(revision = target, ?policy, "starting auto-compaction");
        let req = CompactionRequest {
            revision: target,
            physical: false,
        };
        match node.write(Request::Compaction(req)).await {
            Ok(_) => {
                tracing::info!(revision = target, "finished auto-compaction");
                schedule.done(Instant::now());
            }
            // Someone compacted further meanwhile: as good as done.
            Err(status) if status.message() == fetcd_proto::status::ERR_COMPACTED => {
                schedule.done(Instant::now());
            }
            Err(status) => {
                // Retried at the next tick.
                tracing::warn!(revision = target, error = %status.message(), "auto-compaction failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn flags_read_as_etcd_reads_them() {
        let p = |m, r| AutoCompaction::from_flags(m, r);
        assert_eq!(p("periodic", "0"), Ok(None));
        assert_eq!(
            p("periodic", "1"),
            Ok(Some(AutoCompaction::Periodic(Duration::from_secs(3600))))
        );
        assert_eq!(
            p("periodic", "30m"),
            Ok(Some(AutoCompaction::Periodic(Duration::from_secs(1800))))
        );
        assert_eq!(
            p("revision", "1000"),
            Ok(Some(AutoCompaction::Revision(1000)))
        );
        assert_eq!(p("revision", "0"), Ok(None));
        assert!(p("revision", "1h").is_err());
        assert!(p("revision", "-5").is_err());
        assert!(p("periodic", "soon").is_err());
        assert!(p("daily", "1").is_err());
    }

    #[test]
    fn periodic_compacts_at_the_revision_of_one_retention_ago_once_per_window() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut p = Periodic::new(Duration::from_secs(10));
        assert_eq!(p.sample_every(), Duration::from_secs(1));
        // One sample a second, the revision growing by 100 a second.
        let mut decided = Vec::new();
        for sec in 0..=35 {
            if let Some(rev) = p.tick(s(sec), 100 * sec as i64) {
                decided.push((sec, rev));
                p.compacted(s(sec));
            }
        }
        // First after one retention, then once a window, each keeping exactly 10 s of history.
        assert_eq!(decided, vec![(10, 0), (20, 1000), (30, 2000)]);
    }

    #[test]
    fn long_retentions_compact_hourly_and_keep_the_whole_retention() {
        let t0 = Instant::now();
        let mut p = Periodic::new(Duration::from_secs(72 * 3600));
        assert_eq!(p.sample_every(), Duration::from_secs(360));
        let mut decided = Vec::new();
        for i in 0..=(80 * 10) {
            let now = t0 + Duration::from_secs(360 * i);
            if let Some(rev) = p.tick(now, i as i64) {
                decided.push(i);
                p.compacted(now);
                // The revision sampled 72 hours before.
                assert_eq!(rev, i as i64 - 720);
            }
        }
        assert_eq!(decided.first(), Some(&720));
        assert_eq!(decided.len(), 9);
        assert!(decided.windows(2).all(|w| w[1] - w[0] == 10));
    }

    #[test]
    fn a_new_leader_starts_its_window_over() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut p = Periodic::new(Duration::from_secs(10));
        for sec in 0..8 {
            assert_eq!(p.tick(s(sec), sec as i64), None);
        }
        p.reset();
        for sec in 8..18 {
            assert_eq!(p.tick(s(sec), sec as i64), None);
        }
        assert_eq!(p.tick(s(18), 18), Some(8));
    }
}
