//! Hashes of the store, for the Maintenance service's `Hash` and `HashKV` (corruption checks:
//! members with the same history must report the same hash).
//!
//! [`KvStore::hash_kv`] follows etcd's `HashByRev`: CRC-32C (Castagnoli) over the tree name
//! `key`, then over every stored `(revision key, value)` pair of the `key` tree up to `rev`,
//! skipping revisions at or below the compaction revision that a compaction at `rev` would not
//! keep. fetcd stores revisions with etcd's byte layout (`main`, `_`, `sub`, optional `t`) and
//! values as the same `mvccpb.KeyValue` protobuf, so the hash depends only on the history.

use std::collections::HashSet;

use crate::key_tree;
use crate::revision::Revision;
use crate::schema;
use crate::KvError;
use crate::KvStore;
use crate::Result;

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum etcd's hashes use.
#[derive(Clone, Debug)]
pub struct Crc32c {
    state: u32,
}

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC32C_TABLE: [u32; 256] = crc32c_table();

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32c {
    /// An empty checksum.
    pub fn new() -> Self {
        Crc32c { state: !0 }
    }

    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut c = self.state;
        for &b in bytes {
            c = CRC32C_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
        self.state = c;
    }

    /// The checksum of everything added so far.
    pub fn sum(&self) -> u32 {
        !self.state
    }
}

/// The answer of [`KvStore::hash_kv`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HashKv {
    /// The hash of the key space up to `hash_revision`.
    pub hash: u32,
    /// The store's current revision when the hash was computed.
    pub current_revision: i64,
    /// The compaction revision then (-1 if none).
    pub compact_revision: i64,
    /// The revision the hash covers.
    pub hash_revision: i64,
}

impl KvStore {
    /// etcd's `HashByRev`: the hash of every key revision up to `rev` (0 = current). A revision
    /// at or below the compaction revision is refused as compacted, one above the current
    /// revision as future, with etcd's errors. Holds the writer only while it fixes the revision
    /// and what compaction keeps, and keeps deletions out while it reads the history, so the
    /// hash covers exactly one revision while writes go on.
    pub fn hash_kv(&self, rev: i64) -> Result<std::result::Result<HashKv, KvError>> {
        // Every member hashes the same stored history: what decided compactions free is gone.
        self.wait_compaction(self.compact_revision());
        let _history = self.read_history();
        let writer = self.lock_writer();
        let (current, compact, keep) = {
            let st = self.read_index();
            if rev > 0 && rev <= st.compact {
                return Ok(Err(KvError::Compacted));
            }
            if rev > 0 && rev > st.current {
                return Ok(Err(KvError::FutureRevision));
            }
            let at = if rev == 0 { st.current } else { rev };
            // What a compaction at `at` would keep: older revisions still stored only because
            // the last compaction kept them count only if they are still visible at `at`.
            let mut keep = HashSet::new();
            for ki in st.keys.values() {
                ki.clone().compact(at, &mut keep);
            }
            (st.current, st.compact, keep)
        };
        let at = if rev == 0 { current } else { rev };
        let mut h = Crc32c::new();
        h.update(schema::KEY_TREE.as_bytes());
        let end = Revision::new(at.saturating_add(1), 0);
        // Revisions up to `at` may still be queued for sled.
        self.persister.barrier()?;
        drop(writer);
        // Revision by revision in etcd's record form, so that members whose blocks differ (or
        // that predate blocks) agree.
        for item in key_tree::scan(&self.trees().key, Revision::default(), Some(end)) {
            let r = item?;
            if r.rev.main <= compact && !keep.is_empty() && !keep.contains(&r.rev) {
                continue;
            }
            h.update(&r.key());
            h.update(&r.value);
        }
        Ok(Ok(HashKv {
            hash: h.sum(),
            current_revision: current,
            compact_revision: compact,
            hash_revision: at,
        }))
    }

    /// A hash of everything the store holds (etcd's `Hash`, a testing aid): every tree's name
    /// and records, except the member-specific applied marker, from one consistent copy (see
    /// [`KvStore::export`]).
    pub fn hash_all(&self) -> Result<u32> {
        let mut h = Crc32c::new();
        self.export(&mut |tree, k, v| {
            if tree == schema::META_TREE && k == schema::CONSISTENT_INDEX.as_bytes() {
                return Ok(());
            }
            h.update(tree.as_bytes());
            h.update(k);
            h.update(v);
            Ok(())
        })?;
        Ok(h.sum())
    }

    /// Bytes of keys and values the store holds (a live-data estimate for `dbSizeInUse`; it
    /// reads every record, so callers cache it).
    pub fn live_bytes(&self) -> Result<u64> {
        let mut n = 0u64;
        self.export(&mut |_, k, v| {
            n += (k.len() + v.len()) as u64;
            Ok(())
        })?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C.
        let mut h = Crc32c::new();
        h.update(b"123456789");
        assert_eq!(h.sum(), 0xE306_9283);
    }

    #[test]
    fn empty_store_hash_equals_etcds() {
        // etcd 3.4 answers HashKV on a fresh member with 1084519789: the hash of "key" alone.
        let mut h = Crc32c::new();
        h.update(b"key");
        assert_eq!(h.sum(), 1_084_519_789);
    }
}
