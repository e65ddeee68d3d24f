//! Stored key-values of recently read revisions.
//!
//! A Range loads every value it returns by revision, and in sled each load is a B-tree descent
//! plus a protobuf decode: on kube-apiserver's list pages (500 objects each) that was ~40 % of
//! the server's CPU. A revision's key-value never changes once written, so it can be kept and
//! handed out again without any invalidation; compaction only makes some entries unreachable
//! (the key index no longer points at them) until they are evicted. Only reads fill the cache,
//! so a write-only load does not grow memory.
//!
//! Entries are the encoded `mvccpb.KeyValue`, as sled stores it: a Range copies them into its
//! response as they are, and other readers decode one without copying its value (prost slices
//! a [`Bytes`] field out of a [`Bytes`] buffer).
//!
//! Each entry carries the store's epoch its reader started in. A snapshot install replaces the
//! store, and a reader that no longer holds the key index lock may still insert what it read
//! from before; such an entry never matches a later epoch, so it is never handed out.

use bytes::Bytes;
use quick_cache::sync::Cache;
use quick_cache::Weighter;

use crate::revision::Revision;

/// What one entry costs beyond its encoded bytes (the entry and its epoch, the buffer's header,
/// the map slot).
const ENTRY_OVERHEAD: u64 = 104;

/// Weighs an entry by the bytes it holds, so the capacity is a memory bound.
#[derive(Clone, Copy, Debug, Default)]
struct ByBytes;

impl Weighter<Revision, (u64, Bytes)> for ByBytes {
    fn weight(&self, _rev: &Revision, (_, kv): &(u64, Bytes)) -> u64 {
        kv.len() as u64 + ENTRY_OVERHEAD
    }
}

/// A bounded, concurrent cache of encoded key-values by revision (evicts with S3-FIFO, which
/// keeps one long scan from flushing the values read again and again).
pub(crate) struct ValueCache {
    cache: Cache<Revision, (u64, Bytes), ByBytes>,
}

impl ValueCache {
    /// A cache holding at most about `bytes` of encoded key-values.
    pub(crate) fn new(bytes: u64) -> Self {
        // The item estimate only sizes the initial table; 1 KiB is a typical Kubernetes object.
        let items = (bytes / 1024).max(16) as usize;
        Self {
            cache: Cache::with_weighter(items, bytes, ByBytes),
        }
    }

    /// The encoded key-value stored at `rev`, if it was read recently in `epoch`.
    pub(crate) fn get(&self, rev: Revision, epoch: u64) -> Option<Bytes> {
        self.cache
            .get(&rev)
            .and_then(|(e, kv)| (e == epoch).then_some(kv))
    }

    /// Remembers the encoded key-value read at `rev` by a reader that started in `epoch`.
    pub(crate) fn insert(&self, rev: Revision, epoch: u64, kv: Bytes) {
        self.cache.insert(rev, (epoch, kv));
    }

    /// Forgets everything: the store's content was replaced (a snapshot install), so a
    /// revision may now hold something else.
    pub(crate) fn clear(&self) {
        self.cache.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value_len: usize, rev: i64) -> Bytes {
        use fetcd_proto::mvccpb::KeyValue;
        use prost::Message;
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: vec![b'v'; value_len].into(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        }
        .encode_to_vec()
        .into()
    }

    #[test]
    fn returns_what_was_inserted_at_that_revision_only() {
        let c = ValueCache::new(1 << 20);
        c.insert(Revision::new(5, 0), 2, kv("a", 10, 5));
        assert_eq!(c.get(Revision::new(5, 0), 2), Some(kv("a", 10, 5)));
        assert_eq!(c.get(Revision::new(5, 1), 2), None);
        assert_eq!(c.get(Revision::new(6, 0), 2), None);
        c.clear();
        assert_eq!(c.get(Revision::new(5, 0), 2), None);
    }

    #[test]
    fn an_entry_of_another_epoch_is_not_handed_out() {
        let c = ValueCache::new(1 << 20);
        c.insert(Revision::new(5, 0), 2, kv("a", 10, 5));
        assert_eq!(c.get(Revision::new(5, 0), 4), None);
        c.insert(Revision::new(5, 0), 4, kv("b", 10, 5));
        assert_eq!(c.get(Revision::new(5, 0), 4), Some(kv("b", 10, 5)));
    }

    #[test]
    fn holds_no_more_than_its_byte_capacity() {
        let cap = 64 * 1024;
        let c = ValueCache::new(cap);
        for i in 0..1000 {
            c.insert(Revision::new(i, 0), 0, kv("k", 1024, i));
        }
        let held = (0..1000)
            .filter(|i| c.get(Revision::new(*i, 0), 0).is_some())
            .count() as u64;
        assert!(held > 0, "a cache that keeps nothing is no cache");
        assert!(
            held * (1024 + ENTRY_OVERHEAD) <= cap,
            "{held} entries of ~1 KiB exceed {cap} bytes"
        );
    }
}
