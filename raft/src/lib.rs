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
