//! One module per etcd gRPC service; handlers stay thin (validate → delegate → map → header).

pub mod cluster;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod unimplemented;
pub mod watch;
