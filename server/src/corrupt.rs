//! etcd's `--experimental-initial-corrupt-check`: a member that starts compares the hash of its
//! key space with every peer's before it serves clients, and refuses to start when they differ.
//!
//! A member whose store was damaged (a bad disk, a bug, a restore of the wrong data) would
//! otherwise serve reads that disagree with the rest of the cluster. The hashes are HashKV's at
//! this member's own revision: peers that are behind (future revision), compacted past it, or
//! unreachable say nothing and are skipped with a warning, as in etcd; only a peer that hashed
//! the same revision with the same compaction and got another hash counts as a mismatch.

use std::time::Duration;

use fetcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use fetcd_proto::etcdserverpb::HashKvRequest;

use crate::node::EtcdNode;

/// How long one peer gets to answer.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the check refused to let the member start.
#[derive(Debug, thiserror::Error)]
pub enum CorruptError {
    /// A peer hashed the same history differently (etcd's message).
    #[error("{member:x} found data inconsistency with peers")]
    Inconsistent {
        /// This member's id.
        member: u64,
    },
    /// The local hash could not be computed.
    #[error("initial corruption check: {0}")]
    Local(String),
}

/// Compares this member's HashKV with each peer's (through the peers' client URLs) at this
/// member's current revision.
pub async fn check_initial_hash_kv(node: &EtcdNode) -> Result<(), CorruptError> {
    let me = node.raft().id();
    let store = node.store().clone();
    let local = tokio::task::spawn_blocking(move || store.hash_kv(0))
        .await
        .map_err(|e| CorruptError::Local(e.to_string()))?
        .map_err(|e| CorruptError::Local(e.to_string()))?
        .map_err(|e| CorruptError::Local(e.to_string()))?;
    let peers = node
        .store()
        .members()
        .map_err(|e| CorruptError::Local(e.to_string()))?;
    let mut mismatches = 0;
    for peer in peers.iter().filter(|m| m.id != me) {
        let Some(url) = peer.client_ur_ls.first() else {
            tracing::warn!(peer = %format!("{:x}", peer.id), "initial corruption check: peer has no client URL yet, skipped");
            continue;
        };
        match peer_hash_kv(url, local.hash_revision).await {
            Ok((hash, compact_revision)) => {
                if compact_revision != local.compact_revision {
                    tracing::warn!(peer = %url, compact_revision, local_compact_revision = local.compact_revision, "initial corruption check: peer compacted elsewhere, skipped");
                } else if hash != local.hash {
                    tracing::error!(peer = %url, revision = local.hash_revision, local_hash = local.hash, peer_hash = hash, "initial corruption check: hash mismatch");
                    mismatches += 1;
                } else {
                    tracing::info!(peer = %url, revision = local.hash_revision, "initial corruption check: hash matches");
                }
            }
            Err(e) => {
                tracing::warn!(peer = %url, error = %e, "initial corruption check: cannot fetch the peer's hash, skipped");
            }
        }
    }
    if mismatches > 0 {
        return Err(CorruptError::Inconsistent { member: me });
    }
    Ok(())
}

/// The peer's `(hash, compact_revision)` at `revision`.
async fn peer_hash_kv(url: &str, revision: i64) -> Result<(u32, i64), String> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(PEER_TIMEOUT)
        .timeout(PEER_TIMEOUT)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let r = MaintenanceClient::new(channel)
        .hash_kv(HashKvRequest { revision })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    Ok((r.hash, r.compact_revision))
}
