//! Process-wide Raft metrics, cheap enough for the write path (a few relaxed atomics).
//!
//! [`WAL_FSYNC`] times every `fdatasync` of the Raft log's write-ahead log segment, the call
//! alone, as etcd's histogram of the same name does.
//!
//! [`peer_round_trips`] times this member's AppendEntries RPCs to each peer, split by whether
//! they carried entries. openraft 0.9 keeps one AppendEntries in flight per follower and, once
//! an entry commits with nothing new to send, spends that slot on an empty AppendEntries that
//! only carries the commit index; the next entries wait for its round trip. Under a closed-loop
//! write load close to half of the RPCs are such empty ones, which is what these counts show.
//!
//! All are process-wide statics: several members in one process (tests) share them.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of etcd's `etcd_disk_wal_fsync_duration_seconds` buckets:
/// 1 ms doubling 14 times.
pub const FSYNC_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192,
];

/// Upper bounds (seconds) of the peer round-trip buckets, as etcd's
/// `etcd_network_peer_round_trip_time_seconds`: 0.1 ms doubling 16 times.
pub const PEER_RTT_BUCKETS: [f64; 16] = [
    0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.0512, 0.1024, 0.2048,
    0.4096, 0.8192, 1.6384, 3.2768,
];

/// Most buckets a [`Histogram`] can have (besides `+Inf`).
const MAX_BUCKETS: usize = 16;

/// A fixed-bucket histogram of durations.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds, ascending.
    bounds: &'static [f64],
    /// Per-bucket (non-cumulative) counts; slot `bounds.len()` is `+Inf`.
    buckets: [AtomicU64; MAX_BUCKETS + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// A histogram's values at one moment, buckets cumulative as Prometheus reports them.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations <= bound)`, ascending; `+Inf` is `count`.
    pub buckets: Vec<(f64, u64)>,
    /// Number of observations.
    pub count: u64,
    /// Sum of observations, in seconds.
    pub sum_seconds: f64,
}

impl Histogram {
    const fn new(bounds: &'static [f64]) -> Self {
        assert!(bounds.len() <= MAX_BUCKETS);
        Histogram {
            bounds,
            buckets: [const { AtomicU64::new(0) }; MAX_BUCKETS + 1],
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.buckets)
            .map(|(b, n)| {
                cumulative += n.load(Ordering::Relaxed);
                (*b, cumulative)
            })
            .collect();
        let count = self.count.load(Ordering::Relaxed);
        HistogramSnapshot {
            buckets,
            count: count.max(cumulative),
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// Durations of the Raft log's synced flushes (see the module documentation).
pub static WAL_FSYNC: Histogram = Histogram::new(&FSYNC_BUCKETS);

/// Bytes written to the Raft log's segments, records only (not the zero-filling of new
/// segments): etcd's `etcd_disk_wal_write_bytes_total`, for disk-bandwidth dashboards.
pub static WAL_WRITE_BYTES: AtomicU64 = AtomicU64::new(0);

/// Round trips of the AppendEntries RPCs a peer answered, `[with entries, empty]`, per target
/// member (see the module documentation).
#[derive(Debug)]
pub struct PeerRoundTrips {
    /// `[with entries, empty]`.
    pub append_entries: [Histogram; 2],
}

static PEER_ROUND_TRIPS: Mutex<BTreeMap<u64, Arc<PeerRoundTrips>>> = Mutex::new(BTreeMap::new());

/// The round-trip histograms of AppendEntries to member `target`, created on first use and kept
/// for the process's life (a removed member's series stays, as Prometheus counters should).
pub fn peer_round_trips(target: u64) -> Arc<PeerRoundTrips> {
    let mut peers = PEER_ROUND_TRIPS.lock().unwrap_or_else(|p| p.into_inner());
    peers
        .entry(target)
        .or_insert_with(|| {
            Arc::new(PeerRoundTrips {
                append_entries: [
                    Histogram::new(&PEER_RTT_BUCKETS),
                    Histogram::new(&PEER_RTT_BUCKETS),
                ],
            })
        })
        .clone()
}

/// Every target member with its round trips so far, by member id.
pub fn all_peer_round_trips() -> Vec<(u64, Arc<PeerRoundTrips>)> {
    let peers = PEER_ROUND_TRIPS.lock().unwrap_or_else(|p| p.into_inner());
    peers.iter().map(|(id, h)| (*id, h.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_cumulative_buckets() {
        let h = Histogram::new(&FSYNC_BUCKETS);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(100));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.001, 1));
        assert_eq!(s.buckets[2], (0.004, 2));
        assert_eq!(s.buckets.last().map(|b| b.1), Some(2));
        assert!(s.sum_seconds > 100.0);
    }

    #[test]
    fn bounds_are_per_histogram() {
        let h = Histogram::new(&PEER_RTT_BUCKETS);
        h.observe(Duration::from_micros(150));
        h.observe(Duration::from_micros(700));
        let s = h.snapshot();
        assert_eq!(s.buckets.len(), PEER_RTT_BUCKETS.len());
        assert_eq!(s.buckets[0], (0.0001, 0));
        assert_eq!(s.buckets[1], (0.0002, 1));
        assert_eq!(s.buckets[3], (0.0008, 2));
        assert_eq!(s.count, 2);
    }
}
