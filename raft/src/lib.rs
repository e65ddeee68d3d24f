//! fetcd's consensus layer: openraft glue.
//!
//! - [`command`]: the replicated command (fetcd's `InternalRaftRequest`) and its answer.
//! - [`log_store`]: the durable Raft log, on [`wal`]'s pre-zeroed segments (one fdatasync per
//!   append, which carries a batch of client requests).
//! - [`durable`]: how far the log is durable; a leader's syncs beside replication, and the
//!   gates that keep its commits unseen until then.
//! - [`watermark`]: a log position tasks wait on (durable, applied).
//! - [`state_machine`]: applies committed entries to `fetcd-storage`, snapshots.
//! - `snapshot_file`: the snapshot file, written and read as a stream.
//! - [`coalesce`]: fewer, larger socket writes for HTTP/2 connections (client port and peers).
//! - [`network`]: peer RPCs over tonic (replication, votes, snapshots, forwarded writes, read
//!   index, membership changes).
//! - [`membership`]: etcd's member operations as openraft membership changes.
//! - [`maintenance`]: status, disk size and leader transfer for the Maintenance service.
//! - [`transfer`]: the pauses and peer steps that make a leader transfer possible on openraft.
//! - [`metrics`]: the Raft log's fsync histogram.
//! - [`node`]: one member — opens the stores, bootstraps, proposes, serves read barriers.
//! - `fault` (feature `fault-injection`, tests only): cut or slow links between members.
//!
//! Boundary rule: this crate knows nothing of the etcd gRPC services; it takes
//! `InternalRaftRequest`s and returns storage answers.

pub(crate) mod calls;
pub mod coalesce;
pub mod command;
pub mod durable;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod log_store;
pub mod maintenance;
pub mod membership;
pub mod metrics;
pub mod network;
pub mod node;
pub mod read_index;
mod snapshot_file;
pub mod state_machine;
pub mod transfer;
pub mod vouch;
pub(crate) mod wal;
pub mod watermark;

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

    /// On a runtime with one worker, runs `off_worker_if(long, ..)` from a task on that worker,
    /// with another task queued behind it; the work waits (holding its thread) up to `wait` for
    /// the other task to run. Returns whether it ran meanwhile: only possible if the worker's
    /// queue was handed to another thread.
    fn other_task_ran_during(long: bool, wait: Duration) -> bool {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime");
        rt.block_on(async move {
            tokio::spawn(async move {
                let flag = Arc::new(AtomicBool::new(false));
                let other = {
                    let flag = flag.clone();
                    tokio::spawn(async move { flag.store(true, Ordering::Release) })
                };
                let ran = off_worker_if(long, || {
                    let deadline = Instant::now() + wait;
                    while Instant::now() < deadline && !flag.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    flag.load(Ordering::Acquire)
                });
                other.await.expect("join");
                ran
            })
            .await
            .expect("join")
        })
    }

    #[test]
    fn long_work_leaves_the_only_worker_to_the_other_tasks() {
        assert!(
            other_task_ran_during(true, Duration::from_secs(5)),
            "the other task did not run while the long work held its thread"
        );
    }

    #[test]
    fn short_work_runs_inline() {
        assert!(
            !other_task_ran_during(false, Duration::from_millis(200)),
            "short work was handed off the worker"
        );
    }

    #[test]
    fn long_work_on_a_current_thread_runtime_runs_inline() {
        // `block_in_place` panics on a current-thread runtime.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let here = std::thread::current().id();
        let there = rt.block_on(async { off_worker_if(true, || std::thread::current().id()) });
        assert_eq!(here, there);
    }
}
