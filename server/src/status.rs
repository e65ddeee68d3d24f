//! One table from internal errors to etcd's gRPC status codes and message texts (etcd's
//! `v3rpc/util.go` `toGRPCErrorMap` and `rpctypes`), so clients that match on the text — clientv3,
//! kube-apiserver — behave as with etcd.

use fetcd_proto::status as msg;
use fetcd_raft::ProposeError;
use fetcd_storage::KvError;
use fetcd_storage::StorageError;
use tonic::Status;

/// A refused KV request.
pub fn kv_error(e: &KvError) -> Status {
    match e {
        KvError::Compacted => Status::out_of_range(msg::ERR_COMPACTED),
        KvError::FutureRevision => Status::out_of_range(msg::ERR_FUTURE_REV),
        KvError::KeyNotFound => Status::invalid_argument(msg::ERR_KEY_NOT_FOUND),
        KvError::LeaseNotFound => Status::not_found(msg::ERR_LEASE_NOT_FOUND),
        KvError::LeaseExists => Status::failed_precondition(msg::ERR_LEASE_EXIST),
        KvError::LeaseTtlTooLarge => Status::out_of_range(msg::ERR_LEASE_TTL_TOO_LARGE),
        KvError::NoSpace => no_space(),
        KvError::Corrupt => Status::data_loss(msg::ERR_CORRUPT),
        other => Status::internal(format!("etcdserver: {other}")),
    }
}

/// A failure of the member's own storage while serving a read.
pub fn storage_error(e: &StorageError) -> Status {
    tracing::error!(error = %e, "storage failure");
    Status::internal(format!("etcdserver: storage failure: {e}"))
}

/// A proposal or read barrier that did not complete.
pub fn propose_error(e: &ProposeError) -> Status {
    match e {
        ProposeError::NoLeader => Status::unavailable(msg::ERR_NO_LEADER),
        ProposeError::LeaderChanged => Status::unavailable(msg::ERR_LEADER_CHANGED),
        ProposeError::Stopped(why) => {
            tracing::warn!(%why, "request on a stopped member");
            Status::unavailable(msg::ERR_STOPPED)
        }
        ProposeError::Timeout => Status::unavailable(msg::ERR_TIMEOUT),
    }
}

/// A request larger than `--max-request-bytes`.
pub fn request_too_large() -> Status {
    Status::invalid_argument(msg::ERR_REQUEST_TOO_LARGE)
}

/// A write refused because the database is over its quota or a `NOSPACE` alarm is active.
pub fn no_space() -> Status {
    Status::resource_exhausted(msg::ERR_NO_SPACE)
}
