//! fetcd's consensus layer: openraft glue.
//!
//! - [`command`]: the replicated command (fetcd's `InternalRaftRequest`) and its answer.
//! - [`log_store`]: the durable Raft log, on [`wal`]'s pre-zeroed segments (one fdatasync per
//!   append, which carries a batch of client requests).
//! - [`state_machine`]: applies committed entries to `fetcd-storage`, snapshots.
//! - `snapshot_file`: the snapshot file, written and read as a stream.
//! - [`network`]: peer RPCs over tonic (replication, votes, snapshots, forwarded writes, read
//!   index, membership changes).
//! - [`membership`]: etcd's member operations as openraft membership changes.
//! - [`maintenance`]: status, disk size and leader transfer for the Maintenance service.
//! - [`transfer`]: the pauses and peer steps that make a leader transfer possible on openraft.
//! - [`metrics`]: the Raft log's fsync histogram.
//! - [`node`]: one member — opens the stores, bootstraps, proposes, serves read barriers.
//!
//! Boundary rule: this crate knows nothing of the etcd gRPC services; it takes
//! `InternalRaftRequest`s and returns storage answers.

pub mod command;
pub mod log_store;
pub mod maintenance;
pub mod membership;
pub mod metrics;
pub mod network;
pub mod node;
mod snapshot_file;
pub mod state_machine;
pub mod transfer;
pub(crate) mod wal;

pub use command::ApplyResult;
pub use command::Command;
pub use command::CommandResponse;
pub use node::ProposeError;
pub use node::RaftNode;
pub use node::RaftNodeConfig;

/// Runs `work`, which may hold its thread for long (a slow disk's sync, a range or delete over
/// many keys), without holding up the runtime's other tasks when `long` is set.
///
/// The `fetcd` binary runs few tokio workers (one on two cores), and Raft's heartbeats,
/// proposals, applies and the watch fan-out share them: a second-long read on the only worker
/// would stall them all, and followers would start an election. `block_in_place` hands the
/// worker's queue to another thread for the duration. Short work stays inline, where the
/// hand-off would cost more than the work; so does everything on a current-thread runtime (an
/// embedder's), which has no other thread to hand to.
pub fn off_worker_if<R>(long: bool, work: impl FnOnce() -> R) -> R {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if long && multi_thread {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

/// Member ids are etcd's: u64 derived from peer URLs and the cluster token.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// openraft types for fetcd.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        SnapshotData = tokio::fs::File,
);

/// openraft's long generic types, fixed once.
pub mod typ {
    use crate::NodeId;
    use crate::TypeConfig;

    /// The Raft handle.
    pub type Raft = openraft::Raft<TypeConfig>;
    /// Errors from `client_write`.
    pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, openraft::BasicNode>;
    /// Errors from Raft APIs.
    pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
    /// Errors from the read-index path.
    pub type CheckIsLeaderError = openraft::error::CheckIsLeaderError<NodeId, openraft::BasicNode>;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;
    use std::time::Instant;

    use super::off_worker_if;

    /// Waits (holding its thread) until `flag` is set, for at most a few seconds.
    fn wait_for(flag: &AtomicBool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if flag.load(Ordering::Acquire) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn long_work_leaves_the_only_worker_to_the_other_tasks() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime");
        // On the worker itself: the other task is queued there, and an inline wait would keep
        // the only worker from ever running it.
        let ran = rt.block_on(async {
            tokio::spawn(async {
                let flag = Arc::new(AtomicBool::new(false));
                let other = {
                    let flag = flag.clone();
                    tokio::spawn(async move { flag.store(true, Ordering::Release) })
                };
                let ran = off_worker_if(true, || wait_for(&flag));
                other.await.expect("join");
                ran
            })
            .await
            .expect("join")
        });
        assert!(
            ran,
            "the other task did not run while the long work held its thread"
        );
    }

    #[test]
    fn short_work_and_current_thread_runtimes_run_inline() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let here = std::thread::current().id();
        let there = rt.block_on(async { off_worker_if(true, || std::thread::current().id()) });
        assert_eq!(here, there);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime");
        let flag = AtomicBool::new(false);
        let v = rt.block_on(async { off_worker_if(false, || flag.load(Ordering::Acquire)) });
        assert!(!v);
    }
}
