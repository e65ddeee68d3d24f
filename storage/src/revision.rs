//! Revisions and their on-disk byte layout.
//!
//! Every change to the key space happens at a *main* revision (one per Put, DeleteRange or Txn that
//! changes something); the changes inside one main revision are told apart by a *sub* revision. The
//! `key` tree in sled is keyed by encoded revisions (a block's first one, see `crate::key_tree`)
//! so that a scan in byte order is a scan in history order — which is what index rebuild,
//! compaction and watch catch-up rely on.

/// Length of an encoded revision: 8-byte big-endian main, a `_` separator, 8-byte big-endian sub.
pub const REV_BYTES_LEN: usize = 8 + 1 + 8;
/// Length of an encoded revision that carries the tombstone mark.
pub const MARKED_REV_BYTES_LEN: usize = REV_BYTES_LEN + 1;
/// Appended to the revision of a delete so that index rebuild knows the key ended there without
/// decoding the value.
pub const TOMBSTONE_MARK: u8 = b't';

/// A point in the store's history: `(main, sub)`, ordered lexicographically.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    /// The revision a client sees (`header.revision`, `mod_revision`).
    pub main: i64,
    /// The position of a change inside its main revision.
    pub sub: i64,
}

impl Revision {
    /// A revision at `main` with sub revision `sub`.
    pub const fn new(main: i64, sub: i64) -> Self {
        Self { main, sub }
    }

    /// The sled key of this revision; `tombstone` adds the delete mark.
    pub fn to_bytes(self, tombstone: bool) -> Vec<u8> {
        let mut b = Vec::with_capacity(MARKED_REV_BYTES_LEN);
        b.extend_from_slice(&self.main.to_be_bytes());
        b.push(b'_');
        b.extend_from_slice(&self.sub.to_be_bytes());
        if tombstone {
            b.push(TOMBSTONE_MARK);
        }
        b
    }

    /// Decodes a sled key of the `key` tree; `None` if it is not one this crate wrote.
    pub fn from_bytes(b: &[u8]) -> Option<(Revision, bool)> {
        let tombstone = match b.len() {
            REV_BYTES_LEN => false,
            MARKED_REV_BYTES_LEN if b[REV_BYTES_LEN] == TOMBSTONE_MARK => true,
            _ => return None,
        };
        if b[8] != b'_' {
            return None;
        }
        let main = i64::from_be_bytes(b[0..8].try_into().ok()?);
        let sub = i64::from_be_bytes(b[9..17].try_into().ok()?);
        Some((Revision { main, sub }, tombstone))
    }

    /// The smallest key of main revision `main` in the `key` tree, for range scans over history.
    pub fn main_start_bytes(main: i64) -> Vec<u8> {
        Revision::new(main, 0).to_bytes(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_orders_like_revisions() {
        let revs = [
            Revision::new(1, 0),
            Revision::new(1, 1),
            Revision::new(2, 0),
            Revision::new(256, 3),
            Revision::new(i64::MAX, 0),
        ];
        for w in revs.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].to_bytes(false) < w[1].to_bytes(false));
            assert!(w[0].to_bytes(true) < w[1].to_bytes(false));
        }
        for r in revs {
            assert_eq!(Revision::from_bytes(&r.to_bytes(false)), Some((r, false)));
            assert_eq!(Revision::from_bytes(&r.to_bytes(true)), Some((r, true)));
        }
        assert_eq!(Revision::from_bytes(b"short"), None);
    }
}
