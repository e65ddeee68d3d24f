//! etcd's corruption checks: `--experimental-initial-corrupt-check` (a member that starts
//! compares the hash of its key space with every peer's before it serves clients, and refuses to
//! start when they differ) and `--experimental-corrupt-check-time` (the leader compares every
//! peer's hash with its own periodically and raises a `CORRUPT` alarm for a member that differs,
//! after which the cluster refuses writes until an operator disarms it).
//!
//! A member whose store was damaged (a bad disk, a bug, a restore of the wrong data) would
//! otherwise serve reads that disagree with the rest of the cluster. The hashes are HashKV's at
//! this member's own revision: peers that are behind (future revision), compacted past it, or
//! unreachable say nothing and are skipped with a warning, as in etcd; only a peer that hashed
//! the same revision with the same compaction and got another hash counts as a mismatch.

use std::time::Duration;

use fetcd_proto::etcdserverpb::alarm_request::AlarmAction;
use fetcd_proto::etcdserverpb::AlarmRequest;
use fetcd_proto::etcdserverpb::AlarmType;
use fetcd_proto::etcdserverpb::HashKvRequest;
use fetcd_proto::raftpb::internal_raft_request::Request;
use fetcd_proto::raftpb::maintenance_peer_client::MaintenancePeerClient;
use fetcd_storage::HashKv;

use crate::node::EtcdNode;

/// How long one peer gets to answer.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a corruption check failed or refused to let the member start.
#[derive(Debug, thiserror::Error)]
pub enum CorruptError {
    /// A peer hashed the same history differently (etcd's message).
    #[error("{member:x} found data inconsistency with peers")]
    Inconsistent {
        /// This member's id.
        member: u64,
    },
    /// The local hash could not be computed.
    #[error("corruption check: {0}")]
    Local(String),
}

/// Compares this member's HashKV with each peer's at this member's current revision.
pub async fn check_initial_hash_kv(node: &EtcdNode) -> Result<(), CorruptError> {
    let mismatched = compare_with_peers(node).await?;
    if mismatched.is_empty() {
        Ok(())
    } else {
        Err(CorruptError::Inconsistent {
            member: node.raft().id(),
        })
    }
}

/// Every `interval`, while this member leads, compares the peers' hashes with its own and raises
/// a `CORRUPT` alarm for the first member found to differ (etcd's `monitorKVHash`).
pub async fn monitor_hash_kv(
    node: std::sync::Arc<EtcdNode>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tracing::info!(?interval, "periodic corruption check enabled");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        if !node.raft().is_leader() {
            continue;
        }
        let mismatched = match compare_with_peers(&node).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "corruption check failed");
                continue;
            }
        };
        let Some(&member_id) = mismatched.first() else {
            continue;
        };
        let raised = node
            .store()
            .alarms(AlarmType::Corrupt)
            .iter()
            .any(|a| a.member_id == member_id);
        if raised {
            continue;
        }
        let req = AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id,
            alarm: AlarmType::Corrupt as i32,
        };
        match node.write(Request::Alarm(req)).await {
            Ok(_) => {
                tracing::error!(member = %format!("{member_id:x}"), "corruption check: CORRUPT alarm raised")
            }
            Err(e) => {
                tracing::warn!(error = %e.message(), "corruption check: raising the alarm failed")
            }
        }
    }
}

/// This member's hash at its current revision.
async fn local_hash_kv(node: &EtcdNode) -> Result<HashKv, CorruptError> {
    let store = node.store().clone();
    tokio::task::spawn_blocking(move || store.hash_kv(0))
        .await
        .map_err(|e| CorruptError::Local(e.to_string()))?
        .map_err(|e| CorruptError::Local(e.to_string()))?
        .map_err(|e| CorruptError::Local(e.to_string()))
}

/// The ids of the peers whose hash at this member's revision, with the same compaction, differs
/// from this member's. Every other member is asked, learners too, through its peer port (etcd
/// asks its peers' `/members/hashkv` the same way). Peers that cannot answer for that revision
/// are skipped with a warning.
async fn compare_with_peers(node: &EtcdNode) -> Result<Vec<u64>, CorruptError> {
    let me = node.raft().id();
    let local = local_hash_kv(node).await?;
    let mut mismatched = Vec::new();
    for peer in node.raft().members().iter().filter(|m| m.id != me) {
        let (id, url) = (format!("{:x}", peer.id), &peer.peer_url);
        match peer_hash_kv(node, peer.id, local.hash_revision).await {
            Ok((hash, compact_revision)) => {
                if compact_revision != local.compact_revision {
                    tracing::warn!(peer = %id, %url, compact_revision, local_compact_revision = local.compact_revision, "corruption check: peer compacted elsewhere, skipped");
                } else if hash != local.hash {
                    tracing::error!(peer = %id, %url, revision = local.hash_revision, local_hash = local.hash, peer_hash = hash, "corruption check: hash mismatch");
                    mismatched.push(peer.id);
                } else {
                    tracing::debug!(peer = %id, revision = local.hash_revision, "corruption check: hash matches");
                }
            }
            Err(e) => {
                tracing::warn!(peer = %id, %url, error = %e, "corruption check: cannot fetch the peer's hash, skipped");
            }
        }
    }
    Ok(mismatched)
}

/// Member `id`'s `(hash, compact_revision)` at `revision`, asked on its peer port.
async fn peer_hash_kv(node: &EtcdNode, id: u64, revision: i64) -> Result<(u32, i64), String> {
    let channel = node
        .raft()
        .peer_channel(id)
        .ok_or_else(|| "not a member".to_string())?;
    let mut client = MaintenancePeerClient::new(channel);
    let r = tokio::time::timeout(PEER_TIMEOUT, client.hash_kv(HashKvRequest { revision }))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|s| s.message().to_string())?
        .into_inner();
    Ok((r.hash, r.compact_revision))
}
