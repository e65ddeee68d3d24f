//! Model-based test of the MVCC store: random operation sequences run against [`KvStore`] and
//! against a deliberately naive in-memory model of etcd's MVCC semantics (etcd 3.5
//! `server/etcdserver/apply.go` and `mvcc/kvstore_txn.go`), and every answer must be identical.
//!
//! The model keeps the whole key space after every revision (`states[rev]`), so a read at any
//! revision is a lookup, and it implements the request rules directly:
//! - the first write of a store gets revision 2; a request that changes nothing keeps the revision;
//! - version counts puts since creation and restarts at 1 after a delete; `create_revision` is the
//!   revision of that first put;
//! - Put / DeleteRange / Txn headers carry the revision after the request; a nested Txn's
//!   response has an empty header;
//! - Range: future revision and compacted revision errors, `count` counts every visible key
//!   regardless of limit and filters, `more` tells whether the limit cut anything, filters and
//!   sorting as etcd does them (including etcd's "fetch limit+1, then sort" quirk);
//! - Txn: compares (a missing key compares as an empty key-value, except that VALUE compares fail)
//!   and branch choice are decided on the state before the Txn, nested ones included; then every
//!   put of the chosen branches is checked, then every range (etcd's `checkRequests` order);
//! - Leases: a put (plain or in a Txn) may only name a lease that exists; a grant of an existing
//!   lease fails and takes no revision; a revoke deletes every key whose latest value names the
//!   lease, all in one revision (the model finds them by scanning, the store by its attachment
//!   index);
//! - Compaction fails with Compacted at or below the compaction revision, FutureRevision above the
//!   current revision.
//!
//! Steps also reopen the store from disk (index rebuild) and move it through export / import.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::HashSet;

use fetcd_proto::etcdserverpb::compare::CompareResult;
use fetcd_proto::etcdserverpb::compare::CompareTarget;
use fetcd_proto::etcdserverpb::compare::TargetUnion;
use fetcd_proto::etcdserverpb::range_request::SortOrder;
use fetcd_proto::etcdserverpb::range_request::SortTarget;
use fetcd_proto::etcdserverpb::request_op::Request;
use fetcd_proto::etcdserverpb::response_op::Response;
use fetcd_proto::etcdserverpb::CompactionRequest;
use fetcd_proto::etcdserverpb::CompactionResponse;
use fetcd_proto::etcdserverpb::Compare;
use fetcd_proto::etcdserverpb::DeleteRangeRequest;
use fetcd_proto::etcdserverpb::DeleteRangeResponse;
use fetcd_proto::etcdserverpb::LeaseGrantRequest;
use fetcd_proto::etcdserverpb::LeaseGrantResponse;
use fetcd_proto::etcdserverpb::LeaseRevokeRequest;
use fetcd_proto::etcdserverpb::LeaseRevokeResponse;
use fetcd_proto::etcdserverpb::PutRequest;
use fetcd_proto::etcdserverpb::PutResponse;
use fetcd_proto::etcdserverpb::RangeRequest;
use fetcd_proto::etcdserverpb::RangeResponse;
use fetcd_proto::etcdserverpb::RequestOp;
use fetcd_proto::etcdserverpb::ResponseHeader;
use fetcd_proto::etcdserverpb::ResponseOp;
use fetcd_proto::etcdserverpb::TxnRequest;
use fetcd_proto::etcdserverpb::TxnResponse;
use fetcd_proto::mvccpb::KeyValue;
use fetcd_storage::KvError;
use fetcd_storage::KvStore;
use fetcd_storage::WriteOp;
use fetcd_storage::WriteResponse;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use crate::common::open;

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

type State = BTreeMap<Vec<u8>, KeyValue>;

/// The lease IDs the generator uses; each may or may not exist at any step.
const LEASES: &[i64] = &[7, 8];

#[derive(Clone, Debug)]
struct Model {
    /// `states[r]` is the key space as of revision `r`; 0 and 1 are the empty store.
    states: Vec<State>,
    /// Reads below this revision are refused; -1 before the first compaction.
    compact: i64,
    /// Leases that exist now.
    leases: BTreeSet<i64>,
}

/// etcd's `key` / `range_end` rule, spelled out.
fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    match end {
        [] => key == start,
        [0] => key >= start,
        _ => key >= start && key < end,
    }
}

fn kvs_in(state: &State, start: &[u8], end: &[u8]) -> Vec<KeyValue> {
    state
        .values()
        .filter(|kv| in_range(&kv.key, start, end))
        .cloned()
        .collect()
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

fn compare_holds(state: &State, c: &Compare) -> bool {
    let kvs = kvs_in(state, &c.key, &c.range_end);
    if kvs.is_empty() {
        if c.target == CompareTarget::Value as i32 {
            return false;
        }
        return compare_kv(c, &KeyValue::default());
    }
    kvs.iter().all(|kv| compare_kv(c, kv))
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    use std::cmp::Ordering;
    let int = |have: i64| -> Ordering {
        let want = match &c.target_union {
            Some(TargetUnion::Version(v))
            | Some(TargetUnion::CreateRevision(v))
            | Some(TargetUnion::ModRevision(v))
            | Some(TargetUnion::Lease(v)) => *v,
            _ => 0,
        };
        have.cmp(&want)
    };
    let ord = if c.target == CompareTarget::Value as i32 {
        let want: &[u8] = match &c.target_union {
            Some(TargetUnion::Value(v)) => v,
            _ => b"",
        };
        kv.value.as_ref().cmp(want)
    } else if c.target == CompareTarget::Version as i32 {
        int(kv.version)
    } else if c.target == CompareTarget::Create as i32 {
        int(kv.create_revision)
    } else if c.target == CompareTarget::Mod as i32 {
        int(kv.mod_revision)
    } else {
        int(kv.lease)
    };
    if c.result == CompareResult::Equal as i32 {
        ord == Ordering::Equal
    } else if c.result == CompareResult::NotEqual as i32 {
        ord != Ordering::Equal
    } else if c.result == CompareResult::Greater as i32 {
        ord == Ordering::Greater
    } else {
        ord == Ordering::Less
    }
}

/// The branch a Txn takes on `state`.
fn branch<'t>(state: &State, t: &'t TxnRequest) -> (bool, &'t [RequestOp]) {
    if t.compare.iter().all(|c| compare_holds(state, c)) {
        (true, &t.success)
    } else {
        (false, &t.failure)
    }
}

/// Calls `f` on every non-Txn op of the branches `t` takes on `state`, in order.
fn walk_chosen(
    state: &State,
    t: &TxnRequest,
    f: &mut dyn FnMut(&Request) -> Result<(), KvError>,
) -> Result<(), KvError> {
    for op in branch(state, t).1 {
        match &op.request {
            Some(Request::RequestTxn(n)) => walk_chosen(state, n, f)?,
            Some(r) => f(r)?,
            None => {}
        }
    }
    Ok(())
}

fn txn_writes(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .any(|op| match &op.request {
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => true,
            Some(Request::RequestTxn(n)) => txn_writes(n),
            _ => false,
        })
}

/// One request in progress: the key space as the request has changed it so far.
struct Tx<'m> {
    m: &'m Model,
    work: State,
    changes: i64,
}

impl<'m> Tx<'m> {
    fn new(m: &'m Model) -> Self {
        Tx {
            m,
            work: m.states.last().unwrap().clone(),
            changes: 0,
        }
    }

    /// The revision the request's reads see: current, or the one it is writing.
    fn rev(&self) -> i64 {
        self.m.current() + i64::from(self.changes > 0)
    }

    fn state_at(&self, rev: i64) -> &State {
        if rev == self.rev() {
            &self.work
        } else {
            &self.m.states[usize::try_from(rev).unwrap()]
        }
    }

    fn range(&self, r: &RangeRequest) -> Result<RangeResponse, KvError> {
        let cur = self.rev();
        if r.revision > cur {
            return Err(KvError::FutureRevision);
        }
        let at = if r.revision <= 0 { cur } else { r.revision };
        if at < self.m.compact {
            return Err(KvError::Compacted);
        }
        let mut kvs = kvs_in(self.state_at(at), &r.key, &r.range_end);
        let count = kvs.len() as i64;
        if r.count_only {
            return Ok(RangeResponse {
                header: header(cur),
                kvs: Vec::new(),
                more: false,
                count,
            });
        }
        let filtered = r.min_mod_revision != 0
            || r.max_mod_revision != 0
            || r.min_create_revision != 0
            || r.max_create_revision != 0;
        // etcd fetches limit+1 keys (in key order) unless it sorts or filters.
        if r.sort_order == SortOrder::None as i32 && !filtered && r.limit > 0 {
            kvs.truncate(r.limit as usize + 1);
        }
        kvs.retain(|kv| {
            (r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
                && (r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
                && (r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
                && (r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
        });
        let order = if r.sort_target != SortTarget::Key as i32 && r.sort_order == 0 {
            SortOrder::Ascend as i32
        } else {
            r.sort_order
        };
        let target = r.sort_target;
        let sort_key = |kv: &KeyValue| -> (i64, Vec<u8>) {
            match SortTarget::try_from(target).unwrap() {
                SortTarget::Key => (0, kv.key.clone()),
                SortTarget::Version => (kv.version, Vec::new()),
                SortTarget::Create => (kv.create_revision, Vec::new()),
                SortTarget::Mod => (kv.mod_revision, Vec::new()),
                SortTarget::Value => (0, kv.value.to_vec()),
            }
        };
        // etcd's sort.Sort is an insertion sort for small inputs: stable, so ties keep key order
        // in both directions (sort.Reverse only flips the comparison).
        if order == SortOrder::Ascend as i32 {
            kvs.sort_by_key(|kv| sort_key(kv));
        } else if order == SortOrder::Descend as i32 {
            kvs.sort_by_key(|kv| std::cmp::Reverse(sort_key(kv)));
        }
        let mut more = false;
        if r.limit > 0 && kvs.len() > r.limit as usize {
            kvs.truncate(r.limit as usize);
            more = true;
        }
        if r.keys_only {
            for kv in &mut kvs {
                kv.value.clear();
            }
        }
        Ok(RangeResponse {
            header: header(cur),
            kvs,
            more,
            count,
        })
    }

    /// A put whose checks passed.
    fn put(&mut self, p: &PutRequest) -> PutResponse {
        let rev = self.m.current() + 1;
        let prev = self.work.get(&p.key).cloned();
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision: prev.as_ref().map_or(rev, |kv| kv.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |kv| kv.version + 1),
            value: match (&prev, p.ignore_value) {
                (Some(kv), true) => kv.value.clone(),
                _ => p.value.clone().into(),
            },
            lease: match (&prev, p.ignore_lease) {
                (Some(kv), true) => kv.lease,
                _ => p.lease,
            },
        };
        self.work.insert(p.key.clone(), kv);
        self.changes += 1;
        PutResponse {
            header: header(rev),
            prev_kv: if p.prev_kv { prev } else { None },
        }
    }

    fn delete(&mut self, d: &DeleteRangeRequest) -> DeleteRangeResponse {
        let doomed = kvs_in(&self.work, &d.key, &d.range_end);
        for kv in &doomed {
            self.work.remove(&kv.key);
        }
        self.changes += doomed.len() as i64;
        DeleteRangeResponse {
            header: header(self.rev()),
            deleted: doomed.len() as i64,
            prev_kvs: if d.prev_kv { doomed } else { Vec::new() },
        }
    }

    /// Runs the branches chosen on `before` (the state before the whole Txn).
    fn exec(&mut self, before: &State, t: &TxnRequest) -> TxnResponse {
        let (succeeded, ops) = branch(before, t);
        let mut responses = Vec::new();
        for op in ops {
            let resp = match &op.request {
                Some(Request::RequestRange(r)) => Response::ResponseRange(self.range(r).unwrap()),
                Some(Request::RequestPut(p)) => Response::ResponsePut(self.put(p)),
                Some(Request::RequestDeleteRange(d)) => {
                    Response::ResponseDeleteRange(self.delete(d))
                }
                Some(Request::RequestTxn(n)) => Response::ResponseTxn(self.exec(before, n)),
                None => unreachable!("the generator makes no empty ops"),
            };
            responses.push(ResponseOp {
                response: Some(resp),
            });
        }
        TxnResponse {
            header: Some(ResponseHeader::default()),
            succeeded,
            responses,
        }
    }
}

impl Model {
    fn new() -> Self {
        Model {
            states: vec![State::new(), State::new()],
            compact: -1,
            leases: BTreeSet::new(),
        }
    }

    fn current(&self) -> i64 {
        self.states.len() as i64 - 1
    }

    fn commit(&mut self, work: State, changes: i64) {
        if changes > 0 {
            self.states.push(work);
        }
    }

    fn range(&self, r: &RangeRequest) -> Result<RangeResponse, KvError> {
        Tx::new(self).range(r)
    }

    fn put(&mut self, p: &PutRequest) -> Result<PutResponse, KvError> {
        if p.lease != 0 && !self.leases.contains(&p.lease) {
            return Err(KvError::LeaseNotFound);
        }
        let mut tx = Tx::new(self);
        if (p.ignore_value || p.ignore_lease) && !tx.work.contains_key(&p.key) {
            return Err(KvError::KeyNotFound);
        }
        let resp = tx.put(p);
        let (work, changes) = (tx.work, tx.changes);
        self.commit(work, changes);
        Ok(resp)
    }

    fn delete(&mut self, d: &DeleteRangeRequest) -> DeleteRangeResponse {
        let mut tx = Tx::new(self);
        let resp = tx.delete(d);
        let (work, changes) = (tx.work, tx.changes);
        self.commit(work, changes);
        resp
    }

    fn txn(&mut self, t: &TxnRequest) -> Result<TxnResponse, KvError> {
        let before = self.states.last().unwrap().clone();
        if txn_writes(t) {
            // A put that keeps the value or lease needs its key before the Txn and not deleted
            // by the Txn before it runs (etcd 3.4 panics on the latter).
            let mut deleted: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            walk_chosen(&before, t, &mut |r| match r {
                Request::RequestDeleteRange(d) => {
                    deleted.push((d.key.clone(), d.range_end.clone()));
                    Ok(())
                }
                Request::RequestPut(p) => {
                    let gone = deleted.iter().any(|(s, e)| in_range(&p.key, s, e));
                    if (p.ignore_value || p.ignore_lease) && (!before.contains_key(&p.key) || gone)
                    {
                        Err(KvError::KeyNotFound)
                    } else if p.lease != 0 && !self.leases.contains(&p.lease) {
                        Err(KvError::LeaseNotFound)
                    } else {
                        Ok(())
                    }
                }
                _ => Ok(()),
            })?;
        }
        let (current, compact) = (self.current(), self.compact);
        walk_chosen(&before, t, &mut |r| match r {
            Request::RequestRange(r) if r.revision == 0 => Ok(()),
            Request::RequestRange(r) if r.revision > current => Err(KvError::FutureRevision),
            Request::RequestRange(r) if r.revision < compact => Err(KvError::Compacted),
            _ => Ok(()),
        })?;
        let mut tx = Tx::new(self);
        let mut resp = tx.exec(&before, t);
        resp.header = header(tx.rev());
        let (work, changes) = (tx.work, tx.changes);
        self.commit(work, changes);
        Ok(resp)
    }

    fn compaction(&mut self, rev: i64) -> Result<CompactionResponse, KvError> {
        if rev <= self.compact {
            return Err(KvError::Compacted);
        }
        if rev > self.current() {
            return Err(KvError::FutureRevision);
        }
        self.compact = rev;
        Ok(CompactionResponse {
            header: header(self.current()),
        })
    }

    /// The keys whose current value names lease `id`.
    fn lease_keys(&self, id: i64) -> Vec<Vec<u8>> {
        let state = self.states.last().unwrap();
        state
            .values()
            .filter(|kv| kv.lease == id)
            .map(|kv| kv.key.clone())
            .collect()
    }

    fn grant(&mut self, g: &LeaseGrantRequest) -> Result<LeaseGrantResponse, KvError> {
        if !self.leases.insert(g.id) {
            return Err(KvError::LeaseExists);
        }
        Ok(LeaseGrantResponse {
            header: header(self.current()),
            id: g.id,
            ttl: g.ttl,
            error: String::new(),
        })
    }

    fn revoke(&mut self, id: i64) -> Result<LeaseRevokeResponse, KvError> {
        if !self.leases.remove(&id) {
            return Err(KvError::LeaseNotFound);
        }
        let mut tx = Tx::new(self);
        let doomed: Vec<Vec<u8>> = tx
            .work
            .values()
            .filter(|kv| kv.lease == id)
            .map(|kv| kv.key.clone())
            .collect();
        for k in &doomed {
            tx.work.remove(k);
        }
        tx.changes += doomed.len() as i64;
        let rev = tx.rev();
        let (work, changes) = (tx.work, tx.changes);
        self.commit(work, changes);
        Ok(LeaseRevokeResponse {
            header: header(rev),
        })
    }

    fn apply(&mut self, op: &WriteOp) -> Result<WriteResponse, KvError> {
        match op {
            WriteOp::LeaseGrant(g, _) => self.grant(g).map(WriteResponse::LeaseGrant),
            WriteOp::LeaseRevoke(r) => self.revoke(r.id).map(WriteResponse::LeaseRevoke),
            WriteOp::LeaseCheckpoint(..)
            | WriteOp::SetMember(_)
            | WriteOp::RemoveMember(_)
            | WriteOp::Alarm(_) => {
                unreachable!("the generator makes no checkpoints, member records or alarms")
            }
            WriteOp::Put(p) => self.put(p).map(WriteResponse::Put),
            WriteOp::DeleteRange(d) => Ok(WriteResponse::DeleteRange(self.delete(d))),
            WriteOp::Txn(t) => self.txn(t).map(WriteResponse::Txn),
            WriteOp::Compaction(c) => self.compaction(c.revision).map(WriteResponse::Compaction),
            WriteOp::Noop => Ok(WriteResponse::Noop),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

/// Keys with shared prefixes so that ranges overlap in interesting ways.
const KEYS: &[&[u8]] = &[b"a", b"aa", b"ab", b"b", b"ba", b"c", b"d", b"e", b"f"];
/// Range ends that are not keys: inside the "ab" family, the end of prefix "a", past every key.
const EXTRA_ENDS: &[&[u8]] = &[b"abc", b"b", b"g"];
const VALUES: &[&[u8]] = &[b"", b"x", b"y", b"zz"];

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(KEYS).prop_map(<[u8]>::to_vec)
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(VALUES).prop_map(<[u8]>::to_vec)
}

/// `range_end`: one key, an interval (possibly empty or reversed), or everything from the key.
fn range_end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => Just(Vec::new()),
        1 => Just(vec![0]),
        3 => key(),
        1 => prop::sample::select(EXTRA_ENDS).prop_map(<[u8]>::to_vec),
    ]
}

/// Revision-like fields are generated as *specs* and turned into revisions when the step runs,
/// relative to the model's state then (see [`resolve_rev`]); a spec is in `0..=24`.
fn rev_spec() -> impl Strategy<Value = i64> {
    prop_oneof![3 => Just(0i64), 4 => 1i64..=7, 4 => 8i64..=24]
}

/// 0 (no filter) most of the time.
fn filter_spec() -> impl Strategy<Value = i64> {
    prop_oneof![6 => Just(0i64), 1 => rev_spec()]
}

fn resolve_rev(spec: i64, m: &Model) -> i64 {
    let (cur, c) = (m.current(), m.compact);
    match spec {
        0 => 0,
        1 => c,
        2 => c + 1,
        3 => c - 1,
        4 => cur,
        5 => cur + 1,
        6 => cur + 2,
        7 => -1,
        n => 1 + (n - 8) * (cur - 1) / 16,
    }
}

fn range_req() -> impl Strategy<Value = RangeRequest> {
    (
        (
            key(),
            range_end(),
            rev_spec(),
            prop_oneof![1 => Just(0i64), 1 => 1i64..=3],
        ),
        (
            0i32..=2,
            0i32..=4,
            any::<bool>(),
            prop::bool::weighted(0.15),
        ),
        (filter_spec(), filter_spec(), filter_spec(), filter_spec()),
        prop_oneof![3 => Just(b"".to_vec()), 1 => Just(vec![0])],
        prop::bool::weighted(0.75),
    )
        .prop_map(
            |((k, end, rev, limit), (order, target, keys_only, count_only), f, from_zero, fix)| {
                // Mostly a proper interval; sometimes a reversed (empty) one.
                let proper_end = !matches!(end.as_slice(), [] | [0]);
                let (k, end) = if fix && proper_end && end < k {
                    (end, k)
                } else {
                    (k, end)
                };
                RangeRequest {
                    // Sometimes the whole key space: "\0" to "\0".
                    key: if from_zero.is_empty() { k } else { vec![0] },
                    range_end: if from_zero.is_empty() { end } else { vec![0] },
                    limit,
                    revision: rev,
                    sort_order: order,
                    sort_target: target,
                    keys_only,
                    count_only,
                    min_mod_revision: f.0,
                    max_mod_revision: f.1,
                    min_create_revision: f.2,
                    max_create_revision: f.3,
                    ..Default::default()
                }
            },
        )
}

fn put_req() -> impl Strategy<Value = PutRequest> {
    (
        key(),
        value(),
        any::<bool>(),
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.15),
        prop::option::weighted(0.3, prop::sample::select(LEASES)),
    )
        .prop_map(
            |(key, value, prev_kv, ignore_value, ignore_lease, leased)| PutRequest {
                key,
                // etcd's gRPC layer refuses a value with ignore_value and a lease with ignore_lease.
                value: if ignore_value { Vec::new() } else { value },
                lease: match leased {
                    Some(l) if !ignore_lease => l,
                    _ => 0,
                },
                prev_kv,
                ignore_value,
                ignore_lease,
            },
        )
}

fn delete_req() -> impl Strategy<Value = DeleteRangeRequest> {
    (key(), range_end(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| DeleteRangeRequest {
        key,
        range_end,
        prev_kv,
    })
}

fn compare() -> impl Strategy<Value = Compare> {
    (
        key(),
        prop_oneof![4 => Just(Vec::new()), 1 => range_end()],
        0i32..=4,
        0i32..=3,
        (
            0i64..=3,
            rev_spec(),
            value(),
            prop::option::weighted(0.5, prop::sample::select(LEASES)),
        ),
    )
        .prop_map(
            |(key, range_end, target, result, (version, rev, value, leased))| {
                let target_union = match CompareTarget::try_from(target).unwrap() {
                    CompareTarget::Version => TargetUnion::Version(version),
                    CompareTarget::Create => TargetUnion::CreateRevision(rev),
                    CompareTarget::Mod => TargetUnion::ModRevision(rev),
                    CompareTarget::Value => TargetUnion::Value(value),
                    CompareTarget::Lease => TargetUnion::Lease(leased.unwrap_or(0)),
                };
                Compare {
                    result,
                    target,
                    key,
                    range_end,
                    target_union: Some(target_union),
                }
            },
        )
}

fn op(read_only: bool, depth: u32) -> BoxedStrategy<RequestOp> {
    let range = range_req().prop_map(Request::RequestRange);
    let req = if read_only {
        if depth == 0 {
            range.boxed()
        } else {
            prop_oneof![5 => range, 1 => txn_req(read_only, depth - 1).prop_map(Request::RequestTxn)]
                .boxed()
        }
    } else {
        let put = put_req().prop_map(Request::RequestPut);
        let del = delete_req().prop_map(Request::RequestDeleteRange);
        if depth == 0 {
            prop_oneof![2 => range, 3 => put, 2 => del].boxed()
        } else {
            prop_oneof![
                2 => range,
                3 => put,
                2 => del,
                1 => txn_req(read_only, depth - 1).prop_map(Request::RequestTxn),
            ]
            .boxed()
        }
    };
    req.prop_map(|r| RequestOp { request: Some(r) }).boxed()
}

fn txn_req(read_only: bool, depth: u32) -> BoxedStrategy<TxnRequest> {
    (
        prop::collection::vec(compare(), 0..=2),
        prop::collection::vec(op(read_only, depth), 0..=3),
        prop::collection::vec(op(read_only, depth), 0..=3),
    )
        .prop_map(|(compare, success, failure)| {
            let mut t = TxnRequest {
                compare,
                success,
                failure,
            };
            make_valid(&mut t);
            t
        })
        .boxed()
}

/// Drops puts that etcd's gRPC layer (`checkIntervals`) would refuse: a key put twice, or put
/// inside a deleted range, anywhere in the Txn. Like etcd, a delete with `range_end` "\0" is
/// not checked (its interval `[key, "\0")` is empty to `checkIntervals`), so a Txn may put and
/// delete the same key in one revision that way.
fn make_valid(t: &mut TxnRequest) {
    fn deletes(t: &TxnRequest, out: &mut Vec<(Vec<u8>, Vec<u8>)>) {
        for op in t.success.iter().chain(&t.failure) {
            match &op.request {
                Some(Request::RequestDeleteRange(d)) if d.range_end != [0] => {
                    out.push((d.key.clone(), d.range_end.clone()))
                }
                Some(Request::RequestTxn(n)) => deletes(n, out),
                _ => {}
            }
        }
    }
    fn prune(t: &mut TxnRequest, dels: &[(Vec<u8>, Vec<u8>)], puts: &mut HashSet<Vec<u8>>) {
        for ops in [&mut t.success, &mut t.failure] {
            ops.retain_mut(|op| match &mut op.request {
                Some(Request::RequestPut(p)) => {
                    let ok = !dels.iter().any(|(s, e)| in_range(&p.key, s, e))
                        && puts.insert(p.key.clone());
                    ok
                }
                Some(Request::RequestTxn(n)) => {
                    prune(n, dels, puts);
                    true
                }
                _ => true,
            });
        }
    }
    let mut dels = Vec::new();
    deletes(t, &mut dels);
    prune(t, &dels, &mut HashSet::new());
}

fn write_op() -> impl Strategy<Value = WriteOp> {
    prop_oneof![
        8 => put_req().prop_map(WriteOp::Put),
        2 => delete_req().prop_map(WriteOp::DeleteRange),
        4 => txn_req(false, 1).prop_map(WriteOp::Txn),
        1 => txn_req(true, 1).prop_map(WriteOp::Txn),
        2 => rev_spec().prop_map(|revision| WriteOp::Compaction(CompactionRequest {
            revision,
            physical: false,
        })),
        1 => Just(WriteOp::Noop),
        2 => prop::sample::select(LEASES).prop_map(|id| WriteOp::LeaseGrant(
            LeaseGrantRequest { ttl: 60, id },
            None,
        )),
        1 => prop::sample::select(LEASES)
            .prop_map(|id| WriteOp::LeaseRevoke(LeaseRevokeRequest { id })),
    ]
}

#[derive(Clone, Debug)]
enum Step {
    /// One `apply` call: usually one operation, sometimes a batch.
    Apply(Vec<WriteOp>),
    Range(RangeRequest),
    /// A read-only Txn through `read_txn`.
    ReadTxn(TxnRequest),
    /// Drop the store and its sled database, open them again from disk.
    Reopen,
    /// Export the store and import it into a fresh one, which replaces it.
    ExportImport,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => write_op().prop_map(|op| Step::Apply(vec![op])),
        2 => prop::collection::vec(write_op(), 2..=4).prop_map(Step::Apply),
        6 => range_req().prop_map(Step::Range),
        2 => txn_req(true, 1).prop_map(Step::ReadTxn),
        1 => Just(Step::Reopen),
        1 => Just(Step::ExportImport),
    ]
}

/// Turns the revision specs of a request into revisions for the model's current state.
/// `nonneg`: Ranges inside a Txn get no negative revision (etcd's Txn check would call it
/// compacted, its Range would read the current revision; nobody sends one).
fn resolve_range(r: &mut RangeRequest, m: &Model, nonneg: bool) {
    r.revision = resolve_rev(r.revision, m);
    if nonneg {
        r.revision = r.revision.max(0);
    }
    for f in [
        &mut r.min_mod_revision,
        &mut r.max_mod_revision,
        &mut r.min_create_revision,
        &mut r.max_create_revision,
    ] {
        *f = resolve_rev(*f, m).max(0);
    }
}

fn resolve_txn(t: &mut TxnRequest, m: &Model) {
    for c in &mut t.compare {
        if let Some(TargetUnion::CreateRevision(r) | TargetUnion::ModRevision(r)) =
            &mut c.target_union
        {
            *r = resolve_rev(*r, m);
        }
    }
    for op in t.success.iter_mut().chain(&mut t.failure) {
        match &mut op.request {
            Some(Request::RequestRange(r)) => resolve_range(r, m, true),
            Some(Request::RequestTxn(n)) => resolve_txn(n, m),
            _ => {}
        }
    }
}

fn resolve_op(op: &mut WriteOp, m: &Model) {
    match op {
        WriteOp::Txn(t) => resolve_txn(t, m),
        WriteOp::Compaction(c) => c.revision = resolve_rev(c.revision, m),
        WriteOp::Put(_)
        | WriteOp::DeleteRange(_)
        | WriteOp::Noop
        | WriteOp::LeaseGrant(..)
        | WriteOp::LeaseRevoke(_)
        | WriteOp::LeaseCheckpoint(..)
        | WriteOp::SetMember(_)
        | WriteOp::RemoveMember(_)
        | WriteOp::Alarm(_) => {}
    }
}

// ---------------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------------

struct Harness {
    dir: tempfile::TempDir,
    store: Option<KvStore>,
    model: Model,
    /// Consistent index blobs are a counter.
    next_ci: u64,
    last_ci: Option<Vec<u8>>,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        Harness {
            dir,
            store: Some(store),
            model: Model::new(),
            next_ci: 1,
            last_ci: None,
        }
    }

    fn store(&self) -> &KvStore {
        self.store.as_ref().unwrap()
    }

    fn run(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match step {
            Step::Apply(ops) => {
                let mut batch = Vec::new();
                let mut want = Vec::new();
                for op in ops {
                    let mut op = op.clone();
                    resolve_op(&mut op, &self.model);
                    want.push(self.model.apply(&op));
                    let ci = self.next_ci.to_be_bytes().to_vec();
                    self.next_ci += 1;
                    self.last_ci = Some(ci.clone());
                    batch.push((op, ci));
                }
                let resolved: Vec<_> = batch.iter().map(|(op, _)| op.clone()).collect();
                let got = self.store().apply(batch).unwrap();
                prop_assert_eq!(got, want, "apply {:?}", resolved);
                prop_assert_eq!(
                    self.store().consistent_index().unwrap(),
                    self.last_ci.clone()
                );
            }
            Step::Range(r) => {
                let mut r = r.clone();
                resolve_range(&mut r, &self.model, false);
                let got = range_both(self.store(), &r);
                prop_assert_eq!(got, self.model.range(&r), "range {:?}", r);
            }
            Step::ReadTxn(t) => {
                let mut t = t.clone();
                resolve_txn(&mut t, &self.model);
                let got = self.store().read_txn(&t).unwrap();
                let before = self.model.current();
                let want = self.model.txn(&t);
                prop_assert_eq!(self.model.current(), before);
                prop_assert_eq!(got, want, "read txn {:?}", t);
            }
            Step::Reopen => {
                let store = self.store.take().unwrap();
                store.flush().unwrap();
                drop(store);
                self.store = Some(open(self.dir.path()));
                prop_assert_eq!(
                    self.store().consistent_index().unwrap(),
                    self.last_ci.clone()
                );
                self.check_all_revisions()?;
            }
            Step::ExportImport => {
                let mut records = Vec::new();
                self.store()
                    .export(&mut |tree, k, v| {
                        records.push(Ok((tree.to_string(), k.to_vec(), v.to_vec())));
                        Ok(())
                    })
                    .unwrap();
                let dir = tempfile::tempdir().unwrap();
                let fresh = open(dir.path());
                // Something to be replaced by the import.
                fresh
                    .apply([(
                        WriteOp::Put(PutRequest {
                            key: b"zzz".to_vec(),
                            value: b"stale".to_vec(),
                            ..Default::default()
                        }),
                        b"stale".to_vec(),
                    )])
                    .unwrap();
                fresh.import(records).unwrap();
                self.store = Some(fresh);
                self.dir = dir;
                prop_assert_eq!(
                    self.store().consistent_index().unwrap(),
                    self.last_ci.clone()
                );
                self.check_all_revisions()?;
            }
        }
        prop_assert_eq!(self.store().current_revision(), self.model.current());
        prop_assert_eq!(self.store().compact_revision(), self.model.compact);
        let leases: Vec<i64> = self.store().leases().iter().map(|l| l.id).collect();
        prop_assert_eq!(
            leases,
            self.model.leases.iter().copied().collect::<Vec<_>>()
        );
        for &id in LEASES {
            prop_assert_eq!(
                self.store().lease_keys(id),
                self.model.lease_keys(id),
                "lease {}",
                id
            );
        }
        Ok(())
    }

    /// Every readable revision holds exactly what the model says; older ones are refused.
    fn check_all_revisions(&self) -> Result<(), TestCaseError> {
        let all = |revision| RangeRequest {
            key: vec![0],
            range_end: vec![0],
            revision,
            ..Default::default()
        };
        for rev in self.model.compact.max(1)..=self.model.current() {
            let variants = [
                all(rev),
                RangeRequest {
                    limit: 2,
                    sort_order: SortOrder::Descend as i32,
                    sort_target: SortTarget::Mod as i32,
                    ..all(rev)
                },
                RangeRequest {
                    limit: 1,
                    keys_only: true,
                    sort_target: SortTarget::Version as i32,
                    ..all(rev)
                },
                RangeRequest {
                    count_only: true,
                    ..all(rev)
                },
            ];
            for r in variants {
                let got = range_both(self.store(), &r);
                prop_assert_eq!(got, self.model.range(&r), "{:?}", r);
            }
        }
        if self.model.compact > 1 {
            let r = all(self.model.compact - 1);
            prop_assert_eq!(range_both(self.store(), &r), Err(KvError::Compacted));
        }
        Ok(())
    }
}

/// The store's answer to `r`, after checking that the answer with stored encodings
/// ([`KvStore::range_encoded`], what the server sends) decodes on the wire to the same answer.
fn range_both(store: &KvStore, r: &RangeRequest) -> Result<RangeResponse, KvError> {
    use prost::Message;
    let plain = store.range(r).unwrap();
    let encoded = store.range_encoded(r).unwrap().map(|e| {
        RangeResponse::decode(e.encode_to_vec().as_slice()).expect("decodes as a RangeResponse")
    });
    assert_eq!(
        encoded, plain,
        "range_encoded disagrees with range for {r:?}"
    );
    plain
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_model(steps in prop::collection::vec(step(), 1..60)) {
        let mut h = Harness::new();
        for (i, s) in steps.iter().enumerate() {
            h.run(s).map_err(|e| TestCaseError::fail(format!("step {i} {s:?}: {e}")))?;
        }
        h.check_all_revisions()?;
    }
}
