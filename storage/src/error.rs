//! Errors of the MVCC store.
//!
//! Two kinds, kept apart on purpose: [`KvError`] is an answer to a client request (the request was
//! wrong for the current state; nothing was written and the store goes on), while
//! [`StorageError`] means the disk or the data on it failed and the store cannot go on safely.

/// A request that the store refused; nothing of it was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// The requested revision is older than the compaction revision.
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    /// The requested revision is newer than the current revision.
    #[error("mvcc: required revision is a future revision")]
    FutureRevision,
    /// `ignore_value` / `ignore_lease` on a key that does not exist.
    #[error("key not found")]
    KeyNotFound,
    /// A put or revoke refers to a lease that does not exist.
    #[error("requested lease not found")]
    LeaseNotFound,
    /// A grant names an ID that is already in use.
    #[error("lease already exists")]
    LeaseExists,
    /// A grant asks for more than [`crate::MAX_LEASE_TTL`] seconds.
    #[error("too large lease TTL")]
    LeaseTtlTooLarge,
    /// A request that grows the store while a `NOSPACE` alarm is active.
    #[error("mvcc: database space exceeded")]
    NoSpace,
    /// A write while a `CORRUPT` alarm is active.
    #[error("corrupt cluster")]
    Corrupt,
}

/// The store failed underneath; the caller must stop applying.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// sled reported an I/O or corruption error.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// Bytes on disk that this crate cannot have written.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// An earlier group of applied writes could not be written to sled (see the persister).
    #[error("kv store write failed: {0}")]
    Persist(String),
    /// I/O outside sled (snapshot files).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl StorageError {
    /// Whether the store's files hold damage (what sled reports as corruption or a bug of its
    /// own, or records this crate cannot have written), as opposed to an environment that
    /// failed (I/O errors: permissions, a full disk, a lock). A damaged store can be rebuilt
    /// by the layer above from what it replicates; an I/O error must stop it instead.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            StorageError::Sled(sled::Error::Corruption { .. } | sled::Error::ReportableBug(_))
                | StorageError::Corrupt(_)
        )
    }
}

/// Shorthand for results that can fail only underneath.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
