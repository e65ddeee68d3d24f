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

use crate::revision::Revision;

/// One life of a key: from creation to (possibly) its tombstone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Generation {
    /// Number of changes in this generation, including ones compacted away; the version of the
    /// last revision in `revs`.
    pub ver: i64,
    /// The revision that created this generation (`create_revision` of its key-values).
    pub created: Revision,
    /// Revisions of this generation that are still stored, ascending.
    pub revs: Vec<Revision>,
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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyIndex {
    /// The newest revision of this key, put or tombstone.
    pub modified: Revision,
    /// Lives of the key, oldest first; the last one is open (possibly empty).
    pub generations: Vec<Generation>,
}

impl KeyIndex {
    /// Records a put at `rev`.
    pub fn put(&mut self, rev: Revision) {
        if self.generations.is_empty() {
            self.generations.push(Generation::default());
        }
        let last = self.generations.len() - 1;
        let g = &mut self.generations[last];
        if g.revs.is_empty() {
            g.created = rev;
        }
        g.revs.push(rev);
        g.ver += 1;
        self.modified = rev;
    }

    /// Rebuilds the index entry from the first stored revision of a key, whose earlier history may
    /// have been compacted away; `created` and `ver` come from the stored key-value.
    pub fn restore(created: Revision, modified: Revision, ver: i64) -> Self {
        KeyIndex {
            modified,
            generations: vec![Generation {
                ver,
                created,
                revs: vec![modified],
            }],
        }
    }

    /// Records a delete at `rev`; the key must be live.
    pub fn tombstone(&mut self, rev: Revision) {
        self.put(rev);
        self.generations.push(Generation::default());
    }

    /// True while the key exists at the newest revision.
    pub fn is_live(&self) -> bool {
        self.generations.last().is_some_and(|g| !g.is_empty())
    }

    /// True when nothing of the key is left (after compaction).
    pub fn is_empty(&self) -> bool {
        self.generations.len() == 1 && self.generations[0].is_empty()
    }

    /// What a read at `at_rev` sees, or `None` if the key did not exist then.
    pub fn get(&self, at_rev: i64) -> Option<VisibleRevision> {
        let last = self.generations.len().checked_sub(1)?;
        for (i, g) in self.generations.iter().enumerate().rev() {
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
            let n = g.revs.iter().rposition(|r| r.main <= at_rev)?;
            return Some(VisibleRevision {
                modified: g.revs[n],
                created: g.created,
                version: g.ver - (g.revs.len() - 1 - n) as i64,
            });
        }
        None
    }

    /// Compacts this key's history at `at_rev`, adding the revisions that must survive to `keep`.
    /// Afterwards [`KeyIndex::is_empty`] tells whether the key can leave the index.
    pub fn compact(&mut self, at_rev: i64, keep: &mut HashSet<Revision>) {
        if self.generations.is_empty() {
            return;
        }
        // Find the first generation that is still alive after `at_rev`, or created after it.
        let mut gen_idx = 0;
        while gen_idx < self.generations.len() - 1 {
            let g = &self.generations[gen_idx];
            if g.revs.last().is_some_and(|tomb| tomb.main > at_rev) {
                break;
            }
            gen_idx += 1;
        }
        let last_gen = self.generations.len() - 1;
        let g = &mut self.generations[gen_idx];
        if !g.is_empty() {
            if let Some(n) = g.revs.iter().rposition(|r| r.main <= at_rev) {
                keep.insert(g.revs[n]);
                g.revs.drain(..n);
            }
            // A generation reduced to its tombstone is invisible at every revision >= at_rev.
            if g.revs.len() == 1 && gen_idx != last_gen {
                keep.remove(&g.revs[0]);
                gen_idx += 1;
            }
        }
        self.generations.drain(..gen_idx);
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
        assert_eq!(ki.generations.len(), 1);
        assert_eq!(ki.generations[0].revs, vec![r(4), r(5)]);
        assert!(keep.contains(&r(4)));

        let mut keep = HashSet::new();
        let mut ki = example();
        ki.compact(2, &mut keep);
        assert_eq!(ki.generations[0].revs, vec![r(2), r(3)]);
        assert_eq!(ki.get(2).unwrap().version, 2);
        assert!(keep.contains(&r(2)));

        let mut keep = HashSet::new();
        let mut ki = example();
        ki.compact(3, &mut keep);
        assert_eq!(ki.generations.len(), 1);
        assert_eq!(ki.generations[0].revs, vec![r(4), r(5)]);
        assert!(keep.is_empty());
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
}
