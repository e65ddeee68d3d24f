//! The `key` tree's layout: every revision of every key, grouped into blocks.
//!
//! sled's cost is per record: each insert descends the tree and rewrites a leaf, and sled 0.34
//! splits a leaf past 16 items. Revisions only grow, so with one record per revision every
//! insert went to the rightmost leaf and split it every ~9 puts: under load, inserts and splits
//! were ~22 % of a one-member server's CPU. The persister therefore writes the revisions of a
//! group commit as *blocks*, one sled record holding consecutive revisions.
//!
//! Two record forms are read:
//! - a block: key = the encoded first revision + [`BLOCK_MARK`]; value = a format byte, the
//!   entry count (u32), one fixed-size entry per revision (main, sub, tombstone flag, end of its
//!   value), then the values (encoded `mvccpb.KeyValue`s) back to back;
//! - a single revision, what fetcd wrote before blocks: key = the encoded revision (plus the
//!   tombstone mark, see [`crate::revision`]), value = the encoded `mvccpb.KeyValue`.
//!
//! Records never share a revision and are ordered by their first one, so the record holding
//! revision R is the last one whose key sorts at or below R's. Everything above this module sees
//! revisions ([`Record`]), never records: HashKV hashes and snapshots carry the single-revision
//! form, whatever the layout of the member they come from.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::RwLock;

use sled::IVec;

use crate::error::Result;
use crate::error::StorageError;
use crate::revision::Revision;
use crate::revision::REV_BYTES_LEN;

/// Appended to a block's first revision in its key: tells a block from a single revision.
pub(crate) const BLOCK_MARK: u8 = b'b';
/// The block format written now (the value's first byte).
const FORMAT: u8 = 1;
/// Format byte and entry count.
const HEADER_LEN: usize = 1 + 4;
/// Main, sub, flags, end of the value within the values area.
const ENTRY_LEN: usize = 8 + 8 + 1 + 4;
const TOMBSTONE_FLAG: u8 = 1;
/// Bytes of a block (entries and values) past which it is sealed. A sled leaf holds up to 17
/// records and is rewritten whole as it changes; sled stores any page over 128 KiB as a file of
/// its own, so a leaf of full blocks must stay well under that. A single value bigger than this
/// gets a block of its own, as it got a record of its own before.
const BLOCK_BYTES: usize = 4096;

/// One revision of one key, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub rev: Revision,
    /// A delete: `value` holds only the key.
    pub tombstone: bool,
    /// The encoded `mvccpb.KeyValue`.
    pub value: IVec,
}

impl Record {
    /// The single-revision key of this record: what HashKV hashes and snapshots carry.
    pub(crate) fn key(&self) -> Vec<u8> {
        self.rev.to_bytes(self.tombstone)
    }
}

/// What a `key` tree record's key says it is.
enum Stored {
    Single(Revision, bool),
    Block(Revision),
}

fn decode_key(k: &[u8]) -> Result<Stored> {
    if k.len() == REV_BYTES_LEN + 1 && k[REV_BYTES_LEN] == BLOCK_MARK {
        if let Some((rev, false)) = Revision::from_bytes(&k[..REV_BYTES_LEN]) {
            return Ok(Stored::Block(rev));
        }
    }
    match Revision::from_bytes(k) {
        Some((rev, tombstone)) => Ok(Stored::Single(rev, tombstone)),
        None => Err(StorageError::Corrupt(format!("bad revision key {k:?}"))),
    }
}

/// The revision and tombstone mark of a single-revision key (the persister's queue, snapshots).
pub(crate) fn decode_single(k: &[u8]) -> Result<(Revision, bool)> {
    match decode_key(k)? {
        Stored::Single(rev, tombstone) => Ok((rev, tombstone)),
        Stored::Block(_) => Err(StorageError::Corrupt(format!(
            "a block key {k:?} given as one revision"
        ))),
    }
}

fn block_key(first: Revision) -> IVec {
    let mut k = first.to_bytes(false);
    k.push(BLOCK_MARK);
    k.into()
}

/// A block's value, checked once so that reading its entries cannot go out of bounds.
struct Block {
    value: IVec,
    count: usize,
}

impl Block {
    fn parse(first: Revision, value: IVec) -> Result<Block> {
        let corrupt =
            |what: &str| StorageError::Corrupt(format!("block of revision {first:?}: {what}"));
        if value.len() < HEADER_LEN || value[0] != FORMAT {
            return Err(corrupt("unknown format"));
        }
        let count = u32::from_be_bytes([value[1], value[2], value[3], value[4]]) as usize;
        let values_at = count
            .checked_mul(ENTRY_LEN)
            .and_then(|n| n.checked_add(HEADER_LEN))
            .filter(|&n| n <= value.len() && count > 0)
            .ok_or_else(|| corrupt("bad entry count"))?;
        let b = Block { value, count };
        let mut end = 0;
        let mut prev: Option<Revision> = None;
        for i in 0..count {
            let e = b.end(i);
            if e < end || values_at + e > b.value.len() {
                return Err(corrupt("bad value bounds"));
            }
            end = e;
            let rev = b.rev(i);
            if prev.is_some_and(|p| p >= rev) || (i == 0 && rev != first) {
                return Err(corrupt("revisions out of order"));
            }
            prev = Some(rev);
        }
        Ok(b)
    }

    fn entry(&self, i: usize) -> &[u8] {
        let at = HEADER_LEN + i * ENTRY_LEN;
        &self.value[at..at + ENTRY_LEN]
    }

    fn rev(&self, i: usize) -> Revision {
        let e = self.entry(i);
        let mut main = [0; 8];
        let mut sub = [0; 8];
        main.copy_from_slice(&e[0..8]);
        sub.copy_from_slice(&e[8..16]);
        Revision::new(i64::from_be_bytes(main), i64::from_be_bytes(sub))
    }

    fn end(&self, i: usize) -> usize {
        let e = self.entry(i);
        u32::from_be_bytes([e[17], e[18], e[19], e[20]]) as usize
    }

    fn record(&self, i: usize) -> Record {
        let values_at = HEADER_LEN + self.count * ENTRY_LEN;
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        Record {
            rev: self.rev(i),
            tombstone: self.entry(i)[16] & TOMBSTONE_FLAG != 0,
            value: self.value.subslice(values_at + start, self.end(i) - start),
        }
    }

    /// The value of revision `rev`, if this block holds it.
    fn value_of(&self, rev: Revision) -> Option<IVec> {
        let i = self.seek(rev);
        (i < self.count && self.rev(i) == rev).then(|| self.record(i).value)
    }

    /// The index of the first entry at or after `rev`.
    fn seek(&self, rev: Revision) -> usize {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.rev(mid) < rev {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

/// Builds blocks from records given in revision order.
#[derive(Default)]
pub(crate) struct BlockWriter {
    /// Revision, tombstone, end of the value of each entry of the open block.
    entries: Vec<(Revision, bool, usize)>,
    values: Vec<u8>,
    last: Option<Revision>,
    sealed: Vec<(IVec, IVec)>,
}

impl BlockWriter {
    /// Adds a revision; `value` is its encoded `mvccpb.KeyValue`.
    pub(crate) fn push(&mut self, rev: Revision, tombstone: bool, value: &[u8]) -> Result<()> {
        if self.last.is_some_and(|l| l >= rev) {
            return Err(StorageError::Corrupt(format!(
                "revision {rev:?} written after {:?}",
                self.last
            )));
        }
        let grown = HEADER_LEN + (self.entries.len() + 1) * ENTRY_LEN + self.values.len();
        if !self.entries.is_empty() && grown + value.len() > BLOCK_BYTES {
            self.seal();
        }
        let end = self.values.len() + value.len();
        if u32::try_from(end).is_err() {
            return Err(StorageError::Corrupt(format!(
                "revision {rev:?}: value of {} bytes",
                value.len()
            )));
        }
        self.values.extend_from_slice(value);
        self.entries.push((rev, tombstone, end));
        self.last = Some(rev);
        Ok(())
    }

    /// Adds a record as the persister queues it: its single-revision key and its value.
    pub(crate) fn push_single(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        let (rev, tombstone) = decode_single(key)?;
        self.push(rev, tombstone, value)
    }

    fn seal(&mut self) {
        let Some(&(first, _, _)) = self.entries.first() else {
            return;
        };
        let mut v =
            Vec::with_capacity(HEADER_LEN + self.entries.len() * ENTRY_LEN + self.values.len());
        v.push(FORMAT);
        // `push` keeps every end within u32, and so the count too.
        v.extend_from_slice(&(self.entries.len() as u32).to_be_bytes());
        for &(rev, tombstone, end) in &self.entries {
            v.extend_from_slice(&rev.main.to_be_bytes());
            v.extend_from_slice(&rev.sub.to_be_bytes());
            v.push(if tombstone { TOMBSTONE_FLAG } else { 0 });
            v.extend_from_slice(&(end as u32).to_be_bytes());
        }
        v.extend_from_slice(&self.values);
        self.sealed.push((block_key(first), v.into()));
        self.entries.clear();
        self.values.clear();
    }

    /// Takes the blocks sealed so far, leaving the open one open.
    pub(crate) fn take_sealed(&mut self) -> Vec<(IVec, IVec)> {
        std::mem::take(&mut self.sealed)
    }

    /// Seals the open block and returns every block, as `key` tree records.
    pub(crate) fn finish(mut self) -> Vec<(IVec, IVec)> {
        self.seal();
        self.sealed
    }
}

/// Most blocks' first revisions are unknown to a reader, so finding the block of a revision is a
/// reverse scan, and every sled iterator step copies a whole leaf (~20 % of a cold list's CPU).
/// Hints remember the first revisions of blocks point reads found, so that later reads in the
/// same block are one `get` of its key. A hint is only ever a guess checked against sled: a
/// block compaction rewrote or an import replaced is looked up again, and forgotten.
#[derive(Default)]
pub(crate) struct BlockHints(RwLock<BTreeSet<Revision>>);

/// Hints kept at most (~40 bytes each); past that they start over.
const MAX_HINTS: usize = 256 * 1024;

impl BlockHints {
    fn below(&self, rev: Revision) -> Option<Revision> {
        let hints = self.0.read().unwrap_or_else(|p| p.into_inner());
        hints.range(..=rev).next_back().copied()
    }

    fn learn(&self, first: Revision) {
        let mut hints = self.0.write().unwrap_or_else(|p| p.into_inner());
        if hints.len() >= MAX_HINTS {
            hints.clear();
        }
        hints.insert(first);
    }

    fn forget(&self, first: Revision) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&first);
    }
}

/// The value stored at `rev`, if the tree holds it.
pub(crate) fn get(tree: &sled::Tree, hints: &BlockHints, rev: Revision) -> Result<Option<IVec>> {
    if let Some(first) = hints.below(rev) {
        match tree.get(block_key(first))? {
            Some(v) => {
                if let Some(v) = Block::parse(first, v)?.value_of(rev) {
                    return Ok(Some(v));
                }
            }
            None => hints.forget(first),
        }
    }
    // A record of one revision (a data dir written before blocks) has a key to ask for.
    if let Some(v) = tree.get(rev.to_bytes(false))? {
        return Ok(Some(v));
    }
    // Above every key a record starting at `rev` can have.
    let mut bound = rev.to_bytes(false);
    bound.push(u8::MAX);
    let Some(item) = tree.range(..bound).next_back() else {
        return Ok(None);
    };
    let (k, v) = item?;
    Ok(match decode_key(&k)? {
        Stored::Single(r, _) => (r == rev).then_some(v),
        Stored::Block(first) => {
            hints.learn(first);
            Block::parse(first, v)?.value_of(rev)
        }
    })
}

/// The records of revisions in `[from, end)` (`None`: no end), in revision order.
pub(crate) fn scan(tree: &sled::Tree, from: Revision, end: Option<Revision>) -> Scan {
    let from_key = from.to_bytes(false);
    // The record holding `from` may start before it.
    let start = match tree.range(..from_key.as_slice()).next_back() {
        Some(Ok((k, _))) if matches!(decode_key(&k), Ok(Stored::Block(_))) => k.to_vec(),
        Some(Err(e)) => {
            return Scan {
                iter: None,
                block: None,
                from,
                end,
                last: None,
                failed: Some(e.into()),
            }
        }
        _ => from_key,
    };
    let hi = match end {
        Some(e) => Bound::Excluded(e.to_bytes(false)),
        None => Bound::Unbounded,
    };
    Scan {
        iter: Some(tree.range((Bound::Included(start), hi))),
        block: None,
        from,
        end,
        last: None,
        failed: None,
    }
}

/// The iterator [`scan`] returns.
pub(crate) struct Scan {
    iter: Option<sled::Iter>,
    /// The block being read and its next entry.
    block: Option<(Block, usize)>,
    from: Revision,
    end: Option<Revision>,
    /// The last revision returned: a compaction rewriting a block while the scan goes on can
    /// show the scan its survivors a second time, under a later key.
    last: Option<Revision>,
    failed: Option<StorageError>,
}

impl Scan {
    fn wanted(&mut self, r: &Record) -> bool {
        let fresh = r.rev >= self.from && self.last.is_none_or(|l| r.rev > l);
        if fresh {
            self.last = Some(r.rev);
        }
        fresh
    }
}

impl Iterator for Scan {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        if let Some(e) = self.failed.take() {
            self.iter = None;
            return Some(Err(e));
        }
        loop {
            if let Some((b, i)) = &mut self.block {
                if *i < b.count {
                    let r = b.record(*i);
                    *i += 1;
                    if self.end.is_some_and(|e| r.rev >= e) {
                        self.block = None;
                        self.iter = None;
                        return None;
                    }
                    if self.wanted(&r) {
                        return Some(Ok(r));
                    }
                    continue;
                }
                self.block = None;
            }
            let item = self.iter.as_mut()?.next()?;
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            match decode_key(&k) {
                Ok(Stored::Single(rev, tombstone)) => {
                    let r = Record {
                        rev,
                        tombstone,
                        value: v,
                    };
                    if self.wanted(&r) {
                        return Some(Ok(r));
                    }
                }
                Ok(Stored::Block(first)) => match Block::parse(first, v) {
                    Ok(b) => {
                        let i = b.seek(self.from);
                        self.block = Some((b, i));
                    }
                    Err(e) => return Some(Err(e)),
                },
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// What compaction does with one stored record.
pub(crate) enum Retain {
    /// Every revision in it lives on.
    Keep,
    /// None does.
    Remove { revisions: usize },
    /// Some do: the record is replaced by blocks of them, the first under the key of the
    /// first survivor.
    Rewrite {
        revisions: usize,
        blocks: Vec<(IVec, IVec)>,
    },
}

/// Which revisions of the record `(k, v)` compaction keeps: those `alive` says so of.
pub(crate) fn retain(k: &[u8], v: IVec, alive: impl Fn(Revision) -> bool) -> Result<Retain> {
    match decode_key(k)? {
        Stored::Single(rev, _) if alive(rev) => Ok(Retain::Keep),
        Stored::Single(..) => Ok(Retain::Remove { revisions: 1 }),
        Stored::Block(first) => {
            let b = Block::parse(first, v)?;
            let survivors: Vec<Record> = (0..b.count)
                .map(|i| b.record(i))
                .filter(|r| alive(r.rev))
                .collect();
            let revisions = b.count - survivors.len();
            if revisions == 0 {
                return Ok(Retain::Keep);
            }
            if survivors.is_empty() {
                return Ok(Retain::Remove { revisions });
            }
            let mut w = BlockWriter::default();
            for r in &survivors {
                w.push(r.rev, r.tombstone, &r.value)?;
            }
            Ok(Retain::Rewrite {
                revisions,
                blocks: w.finish(),
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn tree() -> (sled::Db, sled::Tree) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = db.open_tree("key").unwrap();
        (db, t)
    }

    fn value(rev: Revision, len: usize) -> Vec<u8> {
        let mut v = format!("{}.{}:", rev.main, rev.sub).into_bytes();
        v.resize(len.max(v.len()), b'x');
        v
    }

    /// A model: revision → (tombstone, value).
    type Model = BTreeMap<Revision, (bool, Vec<u8>)>;

    /// Checks `t` against `model`, point reads with `hints` (learning from them) and without.
    fn check(t: &sled::Tree, model: &Model, hints: &BlockHints) {
        let all: Vec<Record> = scan(t, Revision::default(), None)
            .map(Result::unwrap)
            .collect();
        let want: Vec<(Revision, bool, Vec<u8>)> = model
            .iter()
            .map(|(r, (t, v))| (*r, *t, v.clone()))
            .collect();
        let got: Vec<(Revision, bool, Vec<u8>)> = all
            .iter()
            .map(|r| (r.rev, r.tombstone, r.value.to_vec()))
            .collect();
        assert_eq!(got, want);
        let revs: Vec<Revision> = model.keys().copied().collect();
        let lo = revs.first().map_or(0, |r| r.main - 1);
        let hi = revs.last().map_or(2, |r| r.main + 2);
        for main in lo..hi {
            for sub in 0..3 {
                let rev = Revision::new(main, sub);
                let want = model.get(&rev).map(|(_, v)| v.clone());
                for hints in [hints, hints, &BlockHints::default()] {
                    let got = get(t, hints, rev).unwrap().map(|v| v.to_vec());
                    assert_eq!(got, want, "get {rev:?}");
                }
            }
            // Every window of history, from any revision to any later one.
            for to in main..hi {
                let got: Vec<Revision> =
                    scan(t, Revision::new(main, 0), Some(Revision::new(to, 1)))
                        .map(|r| r.unwrap().rev)
                        .collect();
                let want: Vec<Revision> = model
                    .range(Revision::new(main, 0)..Revision::new(to, 1))
                    .map(|(r, _)| *r)
                    .collect();
                assert_eq!(got, want, "scan [{main}, {to}.1)");
            }
        }
    }

    /// Writes revisions 2 to 5 as fetcd did before blocks, one record each, with values of
    /// `len` bytes and the tombstones `tombstone` picks, recording them in `model`.
    fn write_singles(t: &sled::Tree, model: &mut Model, len: usize, tombstone: fn(i64) -> bool) {
        for main in 2..6 {
            let rev = Revision::new(main, 0);
            let v = value(rev, len);
            t.insert(rev.to_bytes(tombstone(main)), v.clone()).unwrap();
            model.insert(rev, (tombstone(main), v));
        }
    }

    /// Writes `revs` in blocks, with values of varied sizes (some past a block's size) and
    /// tombstones, recording them in `model`.
    fn write(t: &sled::Tree, model: &mut Model, revs: &[Revision]) {
        let mut w = BlockWriter::default();
        for (n, &rev) in revs.iter().enumerate() {
            let len = [10, 300, 2000, BLOCK_BYTES + 5][(rev.main as usize + n) % 4];
            let tombstone = rev.main % 5 == 0;
            let v = value(rev, len);
            w.push(rev, tombstone, &v).unwrap();
            model.insert(rev, (tombstone, v));
        }
        for (k, v) in w.finish() {
            t.insert(k, v).unwrap();
        }
    }

    /// Entries count toward a block's size as much as values do: tiny values (a lease's key,
    /// an empty value) must not make leaves of full blocks big enough for sled to store them
    /// as files.
    #[test]
    fn blocks_stay_within_their_size_whatever_the_values() {
        for len in [0, 1, 12, 300, BLOCK_BYTES / 2, BLOCK_BYTES * 3] {
            let mut w = BlockWriter::default();
            for m in 1..2000 {
                w.push(Revision::new(m, 0), false, &vec![7; len]).unwrap();
            }
            for (k, v) in w.finish() {
                let b =
                    Block::parse(Revision::from_bytes(&k[..REV_BYTES_LEN]).unwrap().0, v).unwrap();
                assert!(
                    b.value.len() <= BLOCK_BYTES || b.count == 1,
                    "{} bytes in {} entries of {len}-byte values",
                    b.value.len(),
                    b.count
                );
                assert!(
                    b.count > 1 || len > BLOCK_BYTES / 4,
                    "{len}-byte values alone"
                );
            }
        }
    }

    #[test]
    fn revisions_read_back_from_blocks_and_single_records_alike() {
        let (_db, t) = tree();
        let mut model = Model::new();
        // What fetcd wrote before blocks: one record per revision.
        write_singles(&t, &mut model, 50, |main| main == 4);
        // Then blocks of several revisions, with several sub revisions.
        let revs: Vec<Revision> = (6..40)
            .flat_map(|m| (0..(m % 3 + 1)).map(move |s| Revision::new(m, s)))
            .collect();
        write(&t, &mut model, &revs);
        assert!(t.len() < revs.len(), "blocks hold several revisions");
        let hints = BlockHints::default();
        check(&t, &model, &hints);
        assert!(
            !hints.0.read().unwrap().is_empty(),
            "point reads learn where blocks start"
        );
    }

    #[test]
    fn compaction_rewrites_blocks_without_their_dead_revisions() {
        let (_db, t) = tree();
        let mut model = Model::new();
        write_singles(&t, &mut model, 20, |_| false);
        let revs: Vec<Revision> = (6..60).map(|m| Revision::new(m, 0)).collect();
        write(&t, &mut model, &revs);
        // Hints learned before the compaction point at blocks it rewrites or removes.
        let hints = BlockHints::default();
        check(&t, &model, &hints);
        // Compact at 40, keeping every third revision below it.
        let alive = |r: Revision| r.main > 40 || r.main % 3 == 0;
        let mut batch = sled::Batch::default();
        let (mut removed, mut rewritten) = (0, 0);
        for item in t.range(..Revision::new(41, 0).to_bytes(false)) {
            let (k, v) = item.unwrap();
            match retain(&k, v, alive).unwrap() {
                Retain::Keep => {}
                Retain::Remove { revisions } => {
                    removed += revisions;
                    batch.remove(k);
                }
                Retain::Rewrite { revisions, blocks } => {
                    removed += revisions;
                    rewritten += 1;
                    batch.remove(k);
                    for (k, v) in blocks {
                        batch.insert(k, v);
                    }
                }
            }
        }
        t.apply_batch(batch).unwrap();
        model.retain(|r, _| alive(*r));
        assert_eq!(removed, 39 - 13);
        assert!(rewritten > 0, "some block kept part of its revisions");
        check(&t, &model, &hints);
    }

    /// A compaction replaces a block by its survivors under a later key, in one sled batch; a
    /// scan's iterator is not atomic over that, so it may meet both. Each revision still comes
    /// once.
    #[test]
    fn a_scan_that_meets_a_block_and_its_rewrite_gives_each_revision_once() {
        let (_db, t) = tree();
        let mut w = BlockWriter::default();
        for m in 2..12 {
            let rev = Revision::new(m, 0);
            w.push(rev, false, &value(rev, 10)).unwrap();
        }
        let blocks = w.finish();
        assert_eq!(blocks.len(), 1);
        let (k, v) = blocks[0].clone();
        // Revisions from 5 on survive a compaction, under the key of 5.
        let Retain::Rewrite { mut blocks, .. } = retain(&k, v.clone(), |r| r.main >= 5).unwrap()
        else {
            panic!("expected a rewrite");
        };
        let (key, value) = blocks.pop().unwrap();
        assert!(blocks.is_empty() && key > k);
        t.insert(&k, v).unwrap();
        t.insert(key, value).unwrap();
        for from in 1..13 {
            let got: Vec<i64> = scan(&t, Revision::new(from, 0), None)
                .map(|r| r.unwrap().rev.main)
                .collect();
            assert_eq!(got, (from.max(2)..12).collect::<Vec<_>>(), "from {from}");
        }
    }

    #[test]
    fn damaged_blocks_are_errors_not_panics() {
        let mut w = BlockWriter::default();
        for m in 2..6 {
            w.push(Revision::new(m, 0), false, b"value").unwrap();
        }
        assert!(w.push(Revision::new(5, 0), false, b"again").is_err());
        let (k, v) = w.finish().pop().unwrap();
        let first = Revision::new(2, 0);
        for cut in 0..v.len() {
            // Any prefix that drops part of the entries or values is refused.
            if let Ok(b) = Block::parse(first, v.subslice(0, cut)) {
                for i in 0..b.count {
                    let _ = b.record(i);
                }
                panic!("a block cut at {cut} of {} parsed", v.len());
            }
        }
        let mut bad = v.to_vec();
        bad[1 + 4 + 17] = 0xff; // the first value's end, far past the values
        assert!(Block::parse(first, bad.into()).is_err());
        // Values that end before the one ahead of them.
        let mut bad = v.to_vec();
        let second_end = 1 + 4 + ENTRY_LEN + 17;
        let end: [u8; 4] = bad[second_end..second_end + 4].try_into().unwrap();
        bad[1 + 4 + 17..1 + 4 + 21].copy_from_slice(&(u32::from_be_bytes(end) + 1).to_be_bytes());
        assert!(Block::parse(first, bad.into()).is_err());
        assert!(Block::parse(Revision::new(3, 0), v.clone()).is_err());
        assert!(decode_key(&k[..k.len() - 1]).is_ok());
        assert!(decode_key(b"not a revision").is_err());
    }
}

/// The store over both layouts: a data dir written before blocks must answer as one in blocks.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod store_tests {
    use fetcd_proto::etcdserverpb::request_op::Request;
    use fetcd_proto::etcdserverpb::CompactionRequest;
    use fetcd_proto::etcdserverpb::DeleteRangeRequest;
    use fetcd_proto::etcdserverpb::PutRequest;
    use fetcd_proto::etcdserverpb::RangeRequest;
    use fetcd_proto::etcdserverpb::RangeResponse;
    use fetcd_proto::etcdserverpb::RequestOp;
    use fetcd_proto::etcdserverpb::TxnRequest;

    use crate::kvstore::testing::put;
    use crate::kvstore::KvStore;
    use crate::kvstore::WriteOp;
    use crate::schema;

    fn apply(s: &KvStore, op: WriteOp) {
        s.apply([(op, b"ci".to_vec())])
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
    }

    /// Puts of every size (some past a block), overwrites, range deletes and multi-put txns
    /// (several sub revisions each).
    fn fill(s: &KvStore, round: usize) {
        for i in 0..120 {
            let len = [3, 200, 1500, 5000][i % 4];
            put(
                s,
                &format!("k{:02}", i % 37),
                &format!("{round}.{i}").repeat(len / 4 + 1),
            );
            if i % 17 == 16 {
                let del = DeleteRangeRequest {
                    key: format!("k{:02}", i % 7).into(),
                    range_end: format!("k{:02}", i % 7 + 3).into(),
                    ..Default::default()
                };
                apply(s, WriteOp::DeleteRange(del));
            }
            if i % 23 == 22 {
                let success = (0..4)
                    .map(|j| RequestOp {
                        request: Some(Request::RequestPut(PutRequest {
                            key: format!("t{j}").into(),
                            value: format!("{round}.{i}.{j}").into(),
                            ..Default::default()
                        })),
                    })
                    .collect();
                apply(
                    s,
                    WriteOp::Txn(TxnRequest {
                        success,
                        ..Default::default()
                    }),
                );
            }
        }
    }

    /// What a client can see of the store: every key at every revision, the events of the
    /// whole history, and HashKV.
    fn seen(s: &KvStore) -> (Vec<RangeResponse>, Vec<String>, u32) {
        let ranges = (s.compact_revision().max(1)..=s.current_revision())
            .map(|rev| {
                let req = RangeRequest {
                    key: vec![0],
                    range_end: vec![0],
                    revision: rev,
                    ..Default::default()
                };
                s.range(&req).unwrap().unwrap()
            })
            .collect();
        let events = s
            .history(None, s.compact_revision().max(1), s.current_revision())
            .unwrap()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect();
        let hash = s.hash_kv(0).unwrap().unwrap().hash;
        (ranges, events, hash)
    }

    fn compact(s: &KvStore, rev: i64) {
        apply(
            s,
            WriteOp::Compaction(CompactionRequest {
                revision: rev,
                physical: true,
            }),
        );
        s.wait_compaction(rev);
    }

    #[test]
    fn a_store_written_before_blocks_answers_as_one_written_in_them() {
        let blocks_dir = tempfile::tempdir().unwrap();
        let blocks = KvStore::open_path(&blocks_dir.path().join("kv")).unwrap();
        fill(&blocks, 0);
        blocks.flush().unwrap();
        let revisions = (1..=blocks.current_revision())
            .map(|r| blocks.history(None, r, r).unwrap().len())
            .sum::<usize>();
        // A fifth of the values are bigger than a block and get one each.
        assert!(
            blocks.trees().key.len() < revisions / 2,
            "{} records for {revisions} revisions",
            blocks.trees().key.len()
        );

        // The same history as fetcd wrote it before blocks: one record per revision (what an
        // export carries), in a data dir of that time (sled's files right in `kv/`).
        let singles_dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new()
                .path(singles_dir.path().join("kv"))
                .open()
                .unwrap();
            blocks
                .export(&mut |tree, k, v| {
                    db.open_tree(tree)?.insert(k, v)?;
                    Ok(())
                })
                .unwrap();
            assert_eq!(db.open_tree(schema::KEY_TREE).unwrap().len(), revisions);
            db.flush().unwrap();
        }
        let singles = KvStore::open_path(&singles_dir.path().join("kv")).unwrap();
        assert_eq!(singles.trees().key.len(), revisions);
        assert_eq!(seen(&singles), seen(&blocks));

        // Writes go on in blocks after the old records; compaction removes from both forms.
        for s in [&blocks, &singles] {
            fill(s, 1);
            compact(s, s.current_revision() - 150);
        }
        assert_eq!(seen(&singles), seen(&blocks));

        // Defragmenting packs what is left into full blocks: no more records than group
        // commits and compaction left the other store.
        let before = singles.trees().key.len();
        singles.defragment().unwrap();
        let after = singles.trees().key.len();
        assert!(
            after < before && after <= blocks.trees().key.len(),
            "{before} -> {after} records, against {}",
            blocks.trees().key.len()
        );
        assert_eq!(seen(&singles), seen(&blocks));
        // And all of it survives a restart.
        singles.flush().unwrap();
        drop(singles);
        let singles = KvStore::open_path(&singles_dir.path().join("kv")).unwrap();
        assert_eq!(seen(&singles), seen(&blocks));
    }
}
