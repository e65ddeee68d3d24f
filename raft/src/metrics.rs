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
use std::sync::Arc;
use std::sync::Mutex;

pub use fetcd_storage::metrics::Histogram;
pub use fetcd_storage::metrics::HistogramSnapshot;
pub use fetcd_storage::metrics::FSYNC_BUCKETS;

/// Upper bounds (seconds) of the peer round-trip buckets, as etcd's
/// `etcd_network_peer_round_trip_time_seconds`: 0.1 ms doubling 16 times.
pub const PEER_RTT_BUCKETS: [f64; 16] = [
    0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.0512, 0.1024, 0.2048,
    0.4096, 0.8192, 1.6384, 3.2768,
];

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
    /// Raft RPCs to this member that got no answer (unreachable, cut off, timed out): etcd's
    /// `etcd_network_peer_sent_failures_total`, which its "members down" alert watches.
    pub sent_failures: AtomicU64,
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
                sent_failures: AtomicU64::new(0),
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
    use std::time::Duration;

    use super::*;

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
