//! Process-wide Raft metrics, cheap enough for the write path (a few relaxed atomics).
//!
//! [`WAL_FSYNC`] times every `fdatasync` of the Raft log's write-ahead log segment, the call
//! alone, as etcd's histogram of the same name does.
//!
//! [`peer_metrics`] counts, per peer, the bytes of Raft messages exchanged with it, the RPCs
//! to it that got no answer, and times this member's AppendEntries RPCs to it, split by whether
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

/// This member's Raft traffic with one peer (see the module documentation).
#[derive(Debug)]
pub struct PeerMetrics {
    /// The peer's member id.
    pub id: u64,
    /// Round trips of the AppendEntries RPCs the peer answered, `[with entries, empty]`.
    pub append_entries: [Histogram; 2],
    /// Raft RPCs to the peer that got no answer (unreachable, cut off, timed out): etcd's
    /// `etcd_network_peer_sent_failures_total`, which its "members down" alert watches.
    pub sent_failures: AtomicU64,
    /// Bytes of Raft messages sent to the peer (requests, and answers to its requests) and
    /// received from it: etcd's `etcd_network_peer_{sent,received}_bytes_total`.
    pub sent_bytes: AtomicU64,
    pub received_bytes: AtomicU64,
}

impl PeerMetrics {
    /// Counts `n` bytes sent to this peer.
    pub fn sent(&self, n: usize) {
        self.sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts `n` bytes received from this peer.
    pub fn received(&self, n: usize) {
        self.received_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}

static PEER_METRICS: Mutex<BTreeMap<u64, Arc<PeerMetrics>>> = Mutex::new(BTreeMap::new());

/// The metrics of traffic with member `target`, created on first use and kept for the
/// process's life (a removed member's series stays, as Prometheus counters should).
pub fn peer_metrics(target: u64) -> Arc<PeerMetrics> {
    let mut peers = PEER_METRICS.lock().unwrap_or_else(|p| p.into_inner());
    peers
        .entry(target)
        .or_insert_with(|| {
            Arc::new(PeerMetrics {
                id: target,
                append_entries: [
                    Histogram::new(&PEER_RTT_BUCKETS),
                    Histogram::new(&PEER_RTT_BUCKETS),
                ],
                sent_failures: AtomicU64::new(0),
                sent_bytes: AtomicU64::new(0),
                received_bytes: AtomicU64::new(0),
            })
        })
        .clone()
}

/// Every peer with its metrics so far, by member id.
pub fn all_peer_metrics() -> Vec<(u64, Arc<PeerMetrics>)> {
    let peers = PEER_METRICS.lock().unwrap_or_else(|p| p.into_inner());
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
