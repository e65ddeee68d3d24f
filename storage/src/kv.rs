//! Key ranges and the read view that both the plain read path and write transactions use.

use fetcd_proto::mvccpb::KeyValue;

use crate::key_index::KeyIndex;
use crate::revision::Revision;
use crate::StorageError;

/// The key interval a request names, decoded from etcd's `key` / `range_end` convention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRange {
    /// `range_end` empty: exactly one key.
    Single(Vec<u8>),
    /// `[start, end)`; `end == None` when `range_end` is `"\0"` (every key from `start` on).
    Interval {
        /// Inclusive start.
        start: Vec<u8>,
        /// Exclusive end, or unbounded.
        end: Option<Vec<u8>>,
    },
}

impl KeyRange {
    /// etcd's `key`/`range_end` rule: empty end = one key, `"\0"` = to the end of the key space.
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => KeyRange::Single(key.to_vec()),
            [0] => KeyRange::Interval {
                start: key.to_vec(),
                end: None,
            },
            end => KeyRange::Interval {
                start: key.to_vec(),
                end: Some(end.to_vec()),
            },
        }
    }

    /// True if `key` falls in this range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeyRange::Single(k) => k.as_slice() == key,
            KeyRange::Interval { start, end } => {
                key >= start.as_slice() && end.as_deref().is_none_or(|e| key < e)
            }
        }
    }

    /// True if the two ranges share at least one key.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        match (self, other) {
            (KeyRange::Single(k), r) | (r, KeyRange::Single(k)) => r.contains(k),
            (
                KeyRange::Interval { start: s1, end: e1 },
                KeyRange::Interval { start: s2, end: e2 },
            ) => {
                let before = |s: &[u8], e: &Option<Vec<u8>>| e.as_deref().is_some_and(|e| e <= s);
                // Empty intervals overlap nothing.
                if before(s1, e1) || before(s2, e2) {
                    return false;
                }
                !(before(s2, e1) || before(s1, e2))
            }
        }
    }

    /// Bounds for a `BTreeMap` range over keys; `None` if the interval is empty.
    pub(crate) fn bounds(&self) -> Option<KeyBounds<'_>> {
        use std::ops::Bound;
        match self {
            KeyRange::Single(k) => Some((Bound::Included(k), Bound::Included(k))),
            KeyRange::Interval { start, end: None } => {
                Some((Bound::Included(start), Bound::Unbounded))
            }
            KeyRange::Interval {
                start,
                end: Some(end),
            } => (start < end).then_some((
                Bound::Included(start.as_slice()),
                Bound::Excluded(end.as_slice()),
            )),
        }
    }
}

/// `BTreeMap::range` bounds over byte-string keys.
pub(crate) type KeyBounds<'a> = (std::ops::Bound<&'a [u8]>, std::ops::Bound<&'a [u8]>);

/// What a transaction reads through: the key index and stored values as of its view.
///
/// Implemented by the committed store (plain reads) and by a write transaction, which layers
/// its own not-yet-committed changes on top, so a range inside a Txn sees the Txn's earlier puts.
pub(crate) trait ReadView {
    /// The revision a read at revision 0 uses.
    fn rev(&self) -> i64;
    /// Reads below this revision are refused.
    fn compact_rev(&self) -> i64;
    /// Calls `f` for every key of `range` in key order until it returns false.
    fn for_each_key(&self, range: &KeyRange, f: &mut dyn FnMut(&[u8], &KeyIndex) -> bool);
    /// Loads the stored key-value written at `rev`.
    fn load(&self, rev: Revision) -> Result<KeyValue, StorageError>;
    /// Whether lease `id` exists in this view (a put may only attach a key to one that does).
    fn lease_exists(&self, id: i64) -> bool;
}

/// The revisions holding the values of the keys of `range` visible at `at_rev`, in key order:
/// up to `limit` of them (0 = all), and how many keys are visible.
pub(crate) fn visible_revisions(
    view: &dyn ReadView,
    range: &KeyRange,
    at_rev: i64,
    limit: usize,
) -> (Vec<Revision>, usize) {
    let mut revs = Vec::new();
    let mut count = 0usize;
    view.for_each_key(range, &mut |_, ki| {
        if let Some(v) = ki.get(at_rev) {
            count += 1;
            if limit == 0 || revs.len() < limit {
                revs.push(v.modified);
            }
        }
        true
    });
    (revs, count)
}
