//! fetcd's storage: etcd's MVCC model on sled.
//!
//! Layers, bottom up:
//! - [`revision`]: `(main, sub)` revisions and their byte layout in sled.
//! - `key_tree`: the `key` tree's layout, revisions grouped into blocks.
//! - [`key_index`]: per-key history in generations (etcd's `keyIndex`).
//! - [`kvstore`]: the store — sled trees, the in-memory index, write transactions, compaction.
//! - `compactor`: deletes compacted revisions from sled off the write path.
//! - `ops`: etcd's request semantics (Range, Put, DeleteRange, Txn) over a read view.
//! - [`lease`]: leases and their attached keys (replicated state; expiry timing is the server's).
//! - [`watch`]: watchers, event fan-out at commit, catch-up from history.
//! - [`alarm`]: cluster alarms as replicated state; [`hash`]: etcd's HashKV over the history.
//! - `value_cache`: decoded values of recently read revisions, for list-heavy readers.
//! - [`defrag`]: rewriting the sled database to give freed space back, crash-safely.
//!
//! Boundary rule: this crate must not depend on openraft or tonic. It takes etcd's protobuf
//! request/response types from `fetcd-proto` and an opaque "consistent index" blob from whoever
//! drives it, and knows nothing of how the writes were agreed on.

pub mod alarm;
mod compactor;
pub mod defrag;
mod error;
pub mod hash;
mod interval_tree;
pub mod key_index;
mod key_tree;
mod kv;
pub mod kvstore;
pub mod lease;
pub mod metrics;
mod ops;
mod persister;
pub mod revision;
pub mod schema;
mod value_cache;
pub mod watch;
pub mod write_behind;

pub use alarm::alarm_text;
pub use compactor::CompactionPacing;
pub use error::KvError;
pub use error::Result;
pub use error::StorageError;
pub use hash::HashKv;
pub use kv::KeyRange;
pub use kvstore::KvStore;
pub use kvstore::WriteOp;
pub use kvstore::WriteResponse;
pub use lease::Lease;
pub use lease::LeaseStamp;
pub use lease::MAX_LEASE_TTL;
pub use ops::is_txn_read_only;
pub use ops::range_may_take_long;
pub use ops::txn_may_take_long;
pub use revision::Revision;
pub use watch::EventBatch;
pub use watch::SendOutcome;
pub use watch::SharedEvent;
pub use watch::WatchKey;
pub use watch::WatchMessage;
pub use watch::WatchSink;
pub use watch::WatchSpec;
