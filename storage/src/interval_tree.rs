//! An interval tree over byte-string keys (etcd's `adt.IntervalTree`, used by its watcher
//! groups): which watched ranges contain a key, in O(log n + matches) instead of a scan of every
//! range.
//!
//! A treap ordered by `(start, id)` whose nodes also keep the greatest end of their subtree, so a
//! stabbing query skips every subtree that ends at or before the key. Priorities come from a
//! small xorshift generator: the shape is random (balanced in expectation) but reproducible.

use std::cmp::Ordering;
use std::sync::Arc;

/// The end of an interval: exclusive, or `None` for "every key from the start on".
type End = Option<Arc<[u8]>>;

/// Orders ends with the unbounded end greatest.
fn cmp_end(a: &End, b: &End) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(a), Some(b)) => a.cmp(b),
    }
}

/// True if an interval ending at `end` contains keys above `key`.
fn ends_after(end: &End, key: &[u8]) -> bool {
    end.as_deref().is_none_or(|e| e > key)
}

struct Node<V> {
    start: Arc<[u8]>,
    id: V,
    end: End,
    priority: u64,
    /// The greatest `end` in this subtree.
    max_end: End,
    left: Tree<V>,
    right: Tree<V>,
}

type Tree<V> = Option<Box<Node<V>>>;

impl<V> Node<V> {
    fn update(&mut self) {
        let mut max = self.end.clone();
        for child in [&self.left, &self.right].into_iter().flatten() {
            if cmp_end(&child.max_end, &max) == Ordering::Greater {
                max = child.max_end.clone();
            }
        }
        self.max_end = max;
    }
}

/// Intervals `[start, end)` with an id each; several intervals may share bounds.
pub(crate) struct IntervalTree<V> {
    root: Tree<V>,
    len: usize,
    rng: u64,
}

impl<V> Default for IntervalTree<V> {
    fn default() -> Self {
        IntervalTree {
            root: None,
            len: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }
}

impl<V: Ord + Copy> IntervalTree<V> {
    /// Number of intervals.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Adds `[start, end)` under `id`; `(start, id)` must not be present already.
    pub(crate) fn insert(&mut self, start: &[u8], end: Option<&[u8]>, id: V) {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let end: End = end.map(Arc::from);
        let node = Box::new(Node {
            start: Arc::from(start),
            id,
            max_end: end.clone(),
            end,
            priority: self.rng,
            left: None,
            right: None,
        });
        let (l, r) = split(self.root.take(), start, &id, false);
        self.root = merge(merge(l, Some(node)), r);
        self.len += 1;
    }

    /// Removes the interval starting at `start` with `id`; false if there was none.
    pub(crate) fn remove(&mut self, start: &[u8], id: V) -> bool {
        let (l, rest) = split(self.root.take(), start, &id, false);
        let (mid, r) = split(rest, start, &id, true);
        let found = mid.is_some();
        if found {
            self.len -= 1;
        }
        self.root = merge(l, r);
        found
    }

    /// Appends the ids of every interval containing `key`.
    pub(crate) fn stab(&self, key: &[u8], out: &mut Vec<V>) {
        stab(&self.root, key, out);
    }
}

/// True if `(start, id)` sorts before the node's `(start, id)` (or equal, with `or_equal`).
fn goes_left<V: Ord>(start: &[u8], id: &V, node: &Node<V>, or_equal: bool) -> bool {
    match node.start.as_ref().cmp(start).then_with(|| node.id.cmp(id)) {
        Ordering::Less => false,
        Ordering::Equal => !or_equal,
        Ordering::Greater => true,
    }
}

/// Splits `t` into the nodes before `(start, id)` and the rest; with `inclusive` the node equal
/// to it goes left too.
fn split<V: Ord>(t: Tree<V>, start: &[u8], id: &V, inclusive: bool) -> (Tree<V>, Tree<V>) {
    let Some(mut n) = t else {
        return (None, None);
    };
    if goes_left(start, id, &n, inclusive) {
        // The node is at or after the split point: it and its right subtree go right.
        let (l, r) = split(n.left.take(), start, id, inclusive);
        n.left = r;
        n.update();
        (l, Some(n))
    } else {
        let (l, r) = split(n.right.take(), start, id, inclusive);
        n.right = l;
        n.update();
        (Some(n), r)
    }
}

/// Joins two treaps where every node of `a` sorts before every node of `b`.
fn merge<V>(a: Tree<V>, b: Tree<V>) -> Tree<V> {
    match (a, b) {
        (None, t) | (t, None) => t,
        (Some(mut a), Some(mut b)) => {
            if a.priority >= b.priority {
                a.right = merge(a.right.take(), Some(b));
                a.update();
                Some(a)
            } else {
                b.left = merge(Some(a), b.left.take());
                b.update();
                Some(b)
            }
        }
    }
}

fn stab<V: Copy>(t: &Tree<V>, key: &[u8], out: &mut Vec<V>) {
    let Some(n) = t else { return };
    if !ends_after(&n.max_end, key) {
        return;
    }
    stab(&n.left, key, out);
    if &*n.start <= key {
        if ends_after(&n.end, key) {
            out.push(n.id);
        }
        stab(&n.right, key, out);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(0u8..4, 0..4)
    }

    proptest! {
        /// The tree answers exactly what a scan of the live intervals answers, through inserts
        /// and removals.
        #[test]
        fn stab_equals_a_scan(
            ops in prop::collection::vec((any::<bool>(), key(), prop::option::of(key()), 0u32..6), 1..120),
            probes in prop::collection::vec(key(), 1..20),
        ) {
            let mut tree = IntervalTree::default();
            let mut live: Vec<(Vec<u8>, Option<Vec<u8>>, u32)> = Vec::new();
            for (add, start, end, id) in ops {
                let present = live.iter().position(|(s, _, i)| *s == start && *i == id);
                if add && present.is_none() {
                    tree.insert(&start, end.as_deref(), id);
                    live.push((start, end, id));
                } else if !add {
                    prop_assert_eq!(tree.remove(&start, id), present.is_some());
                    if let Some(p) = present {
                        live.remove(p);
                    }
                }
                prop_assert_eq!(tree.len(), live.len());
            }
            for k in probes {
                let mut got = Vec::new();
                tree.stab(&k, &mut got);
                got.sort_unstable();
                let mut want: Vec<u32> = live
                    .iter()
                    .filter(|(s, e, _)| *s <= k && e.as_ref().is_none_or(|e| *e > k))
                    .map(|(_, _, i)| *i)
                    .collect();
                want.sort_unstable();
                prop_assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn thousands_of_disjoint_ranges_stay_shallow() {
        let mut tree = IntervalTree::default();
        for i in 0u32..5000 {
            let s = i.to_be_bytes();
            let e = (i + 1).to_be_bytes();
            tree.insert(&s, Some(&e), i);
        }
        fn depth<V>(t: &Tree<V>) -> usize {
            t.as_ref()
                .map_or(0, |n| 1 + depth(&n.left).max(depth(&n.right)))
        }
        // A treap of 5000 nodes is ~30 deep in expectation; a list would be 5000.
        assert!(depth(&tree.root) < 100, "depth {}", depth(&tree.root));
        let mut out = Vec::new();
        tree.stab(&1234u32.to_be_bytes(), &mut out);
        assert_eq!(out, vec![1234]);
    }
}
