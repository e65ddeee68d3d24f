//! The key index: for every key, the revisions at which it changed, grouped into generations.
//!
//! A *generation* is one life of a key: from the put that created it to the delete (tombstone)
//! that ended it. A key that was put at 1.0, 2.0, deleted at 3.0, put again at 4.0 and 5.0 has:
//!
//! ```text
//! generations: [ {created 1.0, ver 3, revs [1.0 2.0 3.0(tombstone)]},
//!                {created 4.0, ver 2, revs [4.0 5.0]} ]
//! ```
//!
//! A closed generation always ends with its tombstone; after a delete an empty generation is
//! appended so the next put starts a new life with version 1 and a new `create_revision`.
//!
//! Compaction at revision `c` keeps, per key, the newest revision `<= c` (it is still visible at
//! `c`) and everything after it, and drops whole generations that ended at or before `c`. A
//! generation left holding only its tombstone is dropped too: nobody can read a deleted key at a
//! revision `>= c`. Walking the example above with compaction at 4 keeps only `{4.0 5.0}`; at 2 it
//! keeps `{2.0 3.0}` and `{4.0 5.0}`; at 3 it keeps only the second generation.

use std::collections::HashSet;
use std::num::NonZeroI64;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::revision::Revision;

/// Revisions the mutable tail of a [`Revs`] holds before it is frozen.
const CHUNK: usize = 32;

/// A generation's revisions, ascending: a `Vec` whose clone costs O(log n) in the length of
/// the history, not O(n).
///
/// Every write clones its key's index entry into the write transaction (readers keep seeing the
/// committed one until the commit publishes the new one). With a plain `Vec`, a hot key — a
/// leader-election lease, an endpoint, a benchmark key — made each put copy its whole history,
/// O(n) until the next compaction. Here older revisions sit in immutable runs shared by every
/// clone: runs of doubling length, merged like the carries of a binary counter, so each
/// revision is copied O(log n) times in all and a clone copies one pointer plus a tail of fewer
/// than [`CHUNK`] revisions.
#[derive(Clone, Debug, Default)]
pub struct Revs {
    /// The oldest revisions, shared between clones; never changed in place.
    frozen: Option<Arc<Frozen>>,
    /// The newest revisions, fewer than `CHUNK`. Most keys hold one revision: it sits inline,
    /// without an allocation of its own (the index holds every key in memory).
    tail: SmallVec<[Revision; 1]>,
}

#[derive(Debug)]
struct Frozen {
    /// Runs of revisions, oldest first, each longer than the next (lengths are `CHUNK` times
    /// distinct powers of two).
    runs: Vec<Arc<[Revision]>>,
    len: usize,
}

impl Revs {
    fn frozen_len(&self) -> usize {
        self.frozen.as_ref().map_or(0, |f| f.len)
    }

    /// Number of revisions.
    pub fn len(&self) -> usize {
        self.frozen_len() + self.tail.len()
    }

    /// True with no revision.
    pub fn is_empty(&self) -> bool {
        self.tail.is_empty() && self.frozen.is_none()
    }

    /// The `i`-th revision, oldest first.
    pub fn get(&self, mut i: usize) -> Option<Revision> {
        if let Some(f) = &self.frozen {
            if i < f.len {
                for run in &f.runs {
                    if i < run.len() {
                        return run.get(i).copied();
                    }
                    i -= run.len();
                }
                return None;
            }
            i -= f.len;
        }
        self.tail.get(i).copied()
    }

    /// The oldest revision.
    pub fn first(&self) -> Option<Revision> {
        self.get(0)
    }

    /// The newest revision.
    pub fn last(&self) -> Option<Revision> {
        match self.tail.last() {
            Some(r) => Some(*r),
            None => self.len().checked_sub(1).and_then(|i| self.get(i)),
        }
    }

    /// Appends `rev`, newer than every revision held.
    pub fn push(&mut self, rev: Revision) {
        self.tail.push(rev);
        if self.tail.len() < CHUNK {
            return;
        }
        let (mut runs, len) = match &self.frozen {
            Some(f) => (f.runs.clone(), f.len),
            None => (Vec::new(), 0),
        };
        let mut run: Arc<[Revision]> = Arc::from(std::mem::take(&mut self.tail).into_vec());
        // Carry, as in a binary counter: merge with the previous run while it is no longer.
        while let Some(prev) = runs.last() {
            if prev.len() > run.len() {
                break;
            }
            let merged: Vec<Revision> = prev.iter().chain(run.iter()).copied().collect();
            runs.pop();
            run = Arc::from(merged);
        }
        runs.push(run);
        self.frozen = Some(Arc::new(Frozen {
            runs,
            len: len + CHUNK,
        }));
    }

    /// The index of the newest revision whose main revision is `<= at_rev`.
    pub fn last_at_or_below(&self, at_rev: i64) -> Option<usize> {
        // Usually the newest one: reads at the current revision.
        if let Some(last) = self.last() {
            if last.main <= at_rev {
                return Some(self.len() - 1);
            }
        }
        let (mut lo, mut hi) = (0, self.len());
        // Invariant: every index < lo is <= at_rev, every index >= hi is > at_rev.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.get(mid) {
                Some(r) if r.main <= at_rev => lo = mid + 1,
                _ => hi = mid,
            }
        }
        lo.checked_sub(1)
    }

    /// Drops the `n` oldest revisions (compaction).
    pub fn drop_front(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        *self = self.iter().skip(n).collect();
    }

    /// The revisions, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = Revision> + '_ {
        self.frozen
            .iter()
            .flat_map(|f| f.runs.iter().flat_map(|c| c.iter().copied()))
            .chain(self.tail.iter().copied())
    }
}

impl FromIterator<Revision> for Revs {
    fn from_iter<I: IntoIterator<Item = Revision>>(iter: I) -> Self {
        let mut revs = Revs::default();
        for r in iter {
            revs.push(r);
        }
        revs
    }
}

impl PartialEq for Revs {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Revs {}

impl PartialEq<Vec<Revision>> for Revs {
    fn eq(&self, other: &Vec<Revision>) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter().copied())
    }
}

/// One life of a key: from creation to (possibly) its tombstone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Generation {
    /// Number of changes in this generation, including ones compacted away; the version of the
    /// last revision in `revs`.
    pub ver: i64,
    /// The revision that created this generation (`create_revision` of its key-values).
    pub created: Revision,
    /// Revisions of this generation that are still stored, ascending.
    pub revs: Revs,
}

impl Generation {
    fn is_empty(&self) -> bool {
        self.revs.is_empty()
    }
}

/// What a read at some revision sees of a key.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct VisibleRevision {
    /// The revision holding the value visible at the read revision.
    pub modified: Revision,
    /// The revision that created the key's current generation.
    pub created: Revision,
    /// The key's version at the read revision.
    pub version: i64,
}

/// The history of one key (etcd's `keyIndex`).
///
/// The index holds every key in memory, so an entry is kept small. Most keys have one live
/// generation holding one revision — written once, or compacted down to their newest value —
/// and such an entry is 40 bytes inline in the index's B-tree node, without an allocation of its
/// own; any other history (several revisions, deletes) moves to a vector. etcd's `modified`
/// field is not kept: nothing reads it, the newest revision is the last one of the generations.
#[derive(Clone, Debug, Default)]
pub struct KeyIndex(Repr);

#[derive(Clone, Debug)]
enum Repr {
    /// One open generation with one revision. `ver` is never 0, which leaves room (a niche) for
    /// [`Repr::Many`]'s vector, so the enum is no larger than this variant.
    Single {
        created: Revision,
        modified: Revision,
        ver: NonZeroI64,
    },
    /// Lives of the key, oldest first; the last one is open (possibly empty). Never a single
    /// generation holding a single revision (that is [`Repr::Single`]).
    Many(Vec<Generation>),
}

/// A new key's version.
const ONE: NonZeroI64 = match NonZeroI64::new(1) {
    Some(one) => one,
    None => NonZeroI64::MAX,
};

impl Default for Repr {
    fn default() -> Self {
        Repr::Many(Vec::new())
    }
}

impl PartialEq for KeyIndex {
    fn eq(&self, other: &Self) -> bool {
        self.with_generations(|a| other.with_generations(|b| a == b))
    }
}

impl Eq for KeyIndex {}

impl KeyIndex {
    /// Calls `f` with the generations, oldest first (a single one built on the stack for the
    /// inline form).
    fn with_generations<R>(&self, f: impl FnOnce(&[Generation]) -> R) -> R {
        match &self.0 {
            Repr::Single {
                created,
                modified,
                ver,
            } => f(&[Generation {
                ver: ver.get(),
                created: *created,
                revs: std::iter::once(*modified).collect(),
            }]),
            Repr::Many(gens) => f(gens),
        }
    }

    /// Runs a change on the generations as a vector, then goes back to the inline form if the
    /// result allows it.
    fn change<R>(&mut self, f: impl FnOnce(&mut Vec<Generation>) -> R) -> R {
        let mut gens = match std::mem::take(&mut self.0) {
            Repr::Many(gens) => gens,
            single => {
                let mut gens = Vec::with_capacity(1);
                KeyIndex(single).with_generations(|g| gens.extend_from_slice(g));
                gens
            }
        };
        let out = f(&mut gens);
        self.0 = match gens.as_slice() {
            [g] if g.revs.len() == 1 => match (g.revs.first(), NonZeroI64::new(g.ver)) {
                (Some(modified), Some(ver)) => Repr::Single {
                    created: g.created,
                    modified,
                    ver,
                },
                _ => Repr::Many(gens),
            },
            _ => Repr::Many(gens),
        };
        out
    }

    /// The revisions of each generation, oldest first (for tests and debugging).
    pub fn history(&self) -> Vec<Vec<Revision>> {
        self.with_generations(|gens| gens.iter().map(|g| g.revs.iter().collect()).collect())
    }

    /// Records a put at `rev` and returns the key's `create_revision` and version after it.
    pub fn put(&mut self, rev: Revision) -> (Revision, i64) {
        if let Repr::Many(gens) = &self.0 {
            if gens.is_empty() {
                // A new key: straight to the inline form.
                self.0 = Repr::Single {
                    created: rev,
                    modified: rev,
                    ver: ONE,
                };
                return (rev, 1);
            }
        }
        self.change(|gens| {
            if gens.is_empty() {
                gens.push(Generation::default());
            }
            let last = gens.len() - 1;
            let g = &mut gens[last];
            if g.revs.is_empty() {
                g.created = rev;
            }
            g.revs.push(rev);
            g.ver += 1;
            (g.created, g.ver)
        })
    }

    /// Rebuilds the index entry from the first stored revision of a key, whose earlier history may
    /// have been compacted away; `created` and `ver` come from the stored key-value.
    pub fn restore(created: Revision, modified: Revision, ver: i64) -> Self {
        KeyIndex(match NonZeroI64::new(ver) {
            Some(ver) => Repr::Single {
                created,
                modified,
                ver,
            },
            // Not written by this store (versions start at 1); kept as found.
            None => Repr::Many(vec![Generation {
                ver,
                created,
                revs: std::iter::once(modified).collect(),
            }]),
        })
    }

    /// Records a delete at `rev`; the key must be live.
    pub fn tombstone(&mut self, rev: Revision) {
        self.put(rev);
        self.change(|gens| {
            // Deleted keys wait for compaction in this form: no room for more.
            gens.reserve_exact(1);
            gens.push(Generation::default())
        });
    }

    /// True while the key exists at the newest revision.
    pub fn is_live(&self) -> bool {
        match &self.0 {
            Repr::Single { .. } => true,
            Repr::Many(gens) => gens.last().is_some_and(|g| !g.is_empty()),
        }
    }

    /// True when nothing of the key is left (after compaction).
    pub fn is_empty(&self) -> bool {
        match &self.0 {
            Repr::Single { .. } => false,
            Repr::Many(gens) => gens.len() == 1 && gens[0].is_empty(),
        }
    }

    /// What a read at `at_rev` sees, or `None` if the key did not exist then.
    pub fn get(&self, at_rev: i64) -> Option<VisibleRevision> {
        if let Repr::Single {
            created,
            modified,
            ver,
        } = &self.0
        {
            // The common case, without building a generation.
            return (modified.main <= at_rev).then_some(VisibleRevision {
                modified: *modified,
                created: *created,
                version: ver.get(),
            });
        }
        self.with_generations(|gens| {
            let last = gens.len().checked_sub(1)?;
            for (i, g) in gens.iter().enumerate().rev() {
                let Some(first) = g.revs.first() else {
                    continue;
                };
                if first.main > at_rev {
                    continue;
                }
                // This generation started at or before `at_rev`.
                if i != last {
                    if let Some(tomb) = g.revs.last() {
                        if tomb.main <= at_rev {
                            return None;
                        }
                    }
                }
                let n = g.revs.last_at_or_below(at_rev)?;
                return Some(VisibleRevision {
                    modified: g.revs.get(n)?,
                    created: g.created,
                    version: g.ver - (g.revs.len() - 1 - n) as i64,
                });
            }
            None
        })
    }

    /// True if [`KeyIndex::compact`] at `at_rev` would drop anything: that is when the first
    /// generation's second revision is at or below it (its first one is superseded, or the
    /// generation ended there). O(1), so a writer can check every entry it publishes.
    pub fn needs_compaction(&self, at_rev: i64) -> bool {
        match &self.0 {
            Repr::Single { .. } => false,
            Repr::Many(gens) => gens
                .first()
                .and_then(|g| g.revs.get(1))
                .is_some_and(|second| second.main <= at_rev),
        }
    }

    /// Compacts this key's history at `at_rev`, adding the revisions that must survive to `keep`.
    /// Afterwards [`KeyIndex::is_empty`] tells whether the key can leave the index.
    pub fn compact(&mut self, at_rev: i64, keep: &mut HashSet<Revision>) {
        if let Repr::Single { modified, .. } = &self.0 {
            // Nothing to drop; the revision survives if it is visible at `at_rev`.
            if modified.main <= at_rev {
                keep.insert(*modified);
            }
            return;
        }
        self.change(|gens| {
            if gens.is_empty() {
                return;
            }
            // Find the first generation that is still alive after `at_rev`, or created after it.
            let mut gen_idx = 0;
            while gen_idx < gens.len() - 1 {
                let g = &gens[gen_idx];
                if g.revs.last().is_some_and(|tomb| tomb.main > at_rev) {
                    break;
                }
                gen_idx += 1;
            }
            let last_gen = gens.len() - 1;
            let g = &mut gens[gen_idx];
            if !g.is_empty() {
                if let Some(n) = g.revs.last_at_or_below(at_rev) {
                    if let Some(r) = g.revs.get(n) {
                        keep.insert(r);
                    }
                    g.revs.drop_front(n);
                }
                // A generation reduced to its tombstone is invisible at every revision >= at_rev.
                if g.revs.len() == 1 && gen_idx != last_gen {
                    if let Some(tomb) = g.revs.first() {
                        keep.remove(&tomb);
                    }
                    gen_idx += 1;
                }
            }
            gens.drain(..gen_idx);
            gens.shrink_to_fit();
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn r(main: i64) -> Revision {
        Revision::new(main, 0)
    }

    fn example() -> KeyIndex {
        let mut ki = KeyIndex::default();
        ki.put(r(1));
        ki.put(r(2));
        ki.tombstone(r(3));
        ki.put(r(4));
        ki.put(r(5));
        ki
    }

    #[test]
    fn get_walks_generations() {
        let ki = example();
        assert_eq!(ki.get(0), None);
        let v = ki.get(2).unwrap();
        assert_eq!((v.modified, v.created, v.version), (r(2), r(1), 2));
        assert_eq!(ki.get(3), None);
        let v = ki.get(4).unwrap();
        assert_eq!((v.modified, v.created, v.version), (r(4), r(4), 1));
        let v = ki.get(100).unwrap();
        assert_eq!((v.modified, v.version), (r(5), 2));
    }

    #[test]
    fn compaction_matches_the_doc_example() {
        let mut keep = HashSet::new();
        let mut ki = example();
        ki.compact(4, &mut keep);
        assert_eq!(ki.history(), vec![vec![r(4), r(5)]]);
        assert!(keep.contains(&r(4)));

        let mut keep = HashSet::new();
        let mut ki = example();
        ki.compact(2, &mut keep);
        assert_eq!(ki.history()[0], vec![r(2), r(3)]);
        assert_eq!(ki.get(2).unwrap().version, 2);
        assert!(keep.contains(&r(2)));

        let mut keep = HashSet::new();
        let mut ki = example();
        ki.compact(3, &mut keep);
        assert_eq!(ki.history(), vec![vec![r(4), r(5)]]);
        assert!(keep.is_empty());
    }

    #[test]
    fn needs_compaction_says_exactly_when_compaction_changes_the_entry() {
        // Histories of puts and deletes from a small generator, each checked at every revision.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300 {
            let mut ki = KeyIndex::default();
            let mut rev = 0;
            for _ in 0..(seed % 12) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                rev += 1 + (seed >> 60) as i64 % 3;
                if (seed >> 33).is_multiple_of(4) && ki.is_live() {
                    ki.tombstone(r(rev));
                } else {
                    ki.put(r(rev));
                }
            }
            // Also from an already compacted entry, as the compaction thread may find it.
            let mut compacted = ki.clone();
            compacted.compact(rev / 2, &mut HashSet::new());
            for entry in [ki, compacted] {
                for at in 0..=rev + 1 {
                    let mut after = entry.clone();
                    after.compact(at, &mut HashSet::new());
                    assert_eq!(
                        entry.needs_compaction(at),
                        after != entry,
                        "{entry:?} at {at}"
                    );
                }
            }
            seed = seed.rotate_left(7) ^ 0x5851_f42d;
        }
    }

    /// Reads against a model computed from the list of changes, through every change of form
    /// (inline, vector, back to inline by compaction): compaction at `c` changes no read at or
    /// above `c`, and more changes after it read as they would without it.
    #[test]
    fn reads_match_a_model_of_the_changes_through_compaction() {
        // What a read at `at` sees, from the changes (revision, is a delete) alone.
        fn model(changes: &[(i64, bool)], at: i64) -> Option<(i64, i64, i64)> {
            let upto: Vec<_> = changes.iter().filter(|c| c.0 <= at).collect();
            let (rev, deleted) = *upto.last()?;
            if *deleted {
                return None;
            }
            let life: Vec<_> = upto.iter().rev().take_while(|c| !c.1).collect();
            Some((*rev, life.last()?.0, life.len() as i64))
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..500 {
            let (mut ki, mut changes, mut rev) = (KeyIndex::default(), Vec::new(), 0);
            let mut compacted_at = 0;
            for step in 0..(next() % 10) {
                rev += 1 + (next() % 3) as i64;
                if next() % 4 == 0 && ki.is_live() {
                    ki.tombstone(r(rev));
                    changes.push((rev, true));
                } else {
                    ki.put(r(rev));
                    changes.push((rev, false));
                }
                if step % 3 == 2 {
                    compacted_at = rev - (next() % 3) as i64;
                    ki.compact(compacted_at, &mut HashSet::new());
                }
            }
            for at in compacted_at..=rev + 1 {
                let got = ki
                    .get(at)
                    .map(|v| (v.modified.main, v.created.main, v.version));
                assert_eq!(
                    got,
                    model(&changes, at),
                    "{changes:?} compacted at {compacted_at}, read at {at}: {ki:?}"
                );
            }
            assert_eq!(ki.is_live(), changes.last().is_some_and(|c| !c.1));
            // The inline form is used exactly when it can be.
            let one = matches!(ki.history().as_slice(), [g] if g.len() == 1);
            assert_eq!(matches!(ki.0, Repr::Single { .. }), one, "{ki:?}");
        }
    }

    #[test]
    fn a_key_written_once_or_compacted_to_one_revision_stays_inline() {
        // The index's memory per key: see `docs/benchmarks.md`.
        assert_eq!(size_of::<KeyIndex>(), 40);
        let mut ki = KeyIndex::default();
        assert_eq!(ki.put(r(7)), (r(7), 1));
        assert!(matches!(ki.0, Repr::Single { .. }));
        assert_eq!(ki.put(r(9)), (r(7), 2));
        assert!(matches!(ki.0, Repr::Many(_)));
        let mut keep = HashSet::new();
        ki.compact(9, &mut keep);
        assert!(matches!(ki.0, Repr::Single { .. }));
        assert_eq!(keep, HashSet::from([r(9)]));
        let v = ki.get(9).unwrap();
        assert_eq!((v.modified, v.created, v.version), (r(9), r(7), 2));
        assert_eq!(ki.get(8), None);
        assert_eq!(KeyIndex::restore(r(7), r(9), 2), ki);
    }

    #[test]
    fn deleted_key_disappears_after_compaction() {
        let mut ki = KeyIndex::default();
        ki.put(r(1));
        ki.tombstone(r(2));
        let mut keep = HashSet::new();
        ki.compact(2, &mut keep);
        assert!(ki.is_empty());
        assert!(keep.is_empty());
    }

    #[test]
    fn revs_behave_like_a_vec_across_chunks_and_clones_share_history() {
        let mut revs = Revs::default();
        let mut model: Vec<Revision> = Vec::new();
        for main in 1..=(CHUNK as i64 * 5 + 7) {
            // Two changes per main revision, as in a txn.
            for sub in 0..2 {
                revs.push(Revision::new(main * 2, sub));
                model.push(Revision::new(main * 2, sub));
            }
            assert_eq!(revs.len(), model.len());
        }
        assert_eq!(revs, model);
        assert_eq!(revs.first(), model.first().copied());
        assert_eq!(revs.last(), model.last().copied());
        for at in 0..(CHUNK as i64 * 12 + 20) {
            assert_eq!(
                revs.last_at_or_below(at),
                model.iter().rposition(|r| r.main <= at),
                "at {at}"
            );
        }
        for i in 0..model.len() + 2 {
            assert_eq!(revs.get(i), model.get(i).copied());
        }
        // Runs stay few: O(log n).
        let runs = revs.frozen.as_ref().unwrap().runs.len();
        assert!(runs <= 8, "{runs} runs for {} revisions", revs.len());
        // A clone shares the frozen runs and does not see later pushes of the original.
        let snapshot = revs.clone();
        assert!(Arc::ptr_eq(
            snapshot.frozen.as_ref().unwrap(),
            revs.frozen.as_ref().unwrap()
        ));
        revs.push(Revision::new(10_000, 0));
        assert_eq!(snapshot, model);
        assert_eq!(revs.len(), model.len() + 1);
        // Compaction drops a prefix.
        let mut dropped = snapshot.clone();
        dropped.drop_front(CHUNK + 3);
        assert_eq!(dropped, model[CHUNK + 3..].to_vec());
        assert_eq!(dropped.last_at_or_below(0), None);
    }
}
