//! etcd's request semantics as functions over a view: Range, Put, DeleteRange, Txn.
//!
//! Each function checks everything before it writes (etcd's `checkRequests` before
//! `executeTxn`), so a refused request leaves the transaction untouched.

use fetcd_proto::etcdserverpb::compare::CompareResult;
use fetcd_proto::etcdserverpb::compare::CompareTarget;
use fetcd_proto::etcdserverpb::compare::TargetUnion;
use fetcd_proto::etcdserverpb::range_request::SortOrder;
use fetcd_proto::etcdserverpb::range_request::SortTarget;
use fetcd_proto::etcdserverpb::request_op::Request;
use fetcd_proto::etcdserverpb::response_op::Response;
use fetcd_proto::etcdserverpb::Compare;
use fetcd_proto::etcdserverpb::DeleteRangeRequest;
use fetcd_proto::etcdserverpb::DeleteRangeResponse;
use fetcd_proto::etcdserverpb::LeaseCheckpointRequest;
use fetcd_proto::etcdserverpb::LeaseCheckpointResponse;
use fetcd_proto::etcdserverpb::LeaseGrantRequest;
use fetcd_proto::etcdserverpb::LeaseGrantResponse;
use fetcd_proto::etcdserverpb::LeaseRevokeRequest;
use fetcd_proto::etcdserverpb::LeaseRevokeResponse;
use fetcd_proto::etcdserverpb::PutRequest;
use fetcd_proto::etcdserverpb::PutResponse;
use fetcd_proto::etcdserverpb::RangeRequest;
use fetcd_proto::etcdserverpb::RangeResponse;
use fetcd_proto::etcdserverpb::ResponseHeader;
use fetcd_proto::etcdserverpb::ResponseOp;
use fetcd_proto::etcdserverpb::TxnRequest;
use fetcd_proto::etcdserverpb::TxnResponse;
use fetcd_proto::mvccpb::KeyValue;
use fetcd_proto::wire::EncodedRangeResponse;

use crate::kv::visible_revisions;
use crate::kv::KeyRange;
use crate::kv::ReadView;
use crate::kvstore::WriteTxn;
use crate::lease::Lease;
use crate::lease::LeaseStamp;
use crate::lease::MAX_LEASE_TTL;
use crate::revision::Revision;
use crate::KvError;
use crate::Result;

type Answer<T> = Result<std::result::Result<T, KvError>>;

/// A response header carrying only the revision; the server fills in the cluster fields.
pub(crate) fn header(revision: i64) -> ResponseHeader {
    ResponseHeader {
        revision,
        ..Default::default()
    }
}

/// Checks a read revision against the view like etcd's `rangeKeys`; returns the revision to read.
fn read_rev(view: &dyn ReadView, rev: i64) -> std::result::Result<i64, KvError> {
    let cur = view.rev();
    if rev > cur {
        return Err(KvError::FutureRevision);
    }
    let rev = if rev <= 0 { cur } else { rev };
    if rev < view.compact_rev() {
        return Err(KvError::Compacted);
    }
    Ok(rev)
}

/// The live key-values of `range` at `rev`: at most `limit` (0 = all), plus the total count.
fn range_keys(
    view: &dyn ReadView,
    range: &KeyRange,
    rev: i64,
    limit: usize,
) -> Result<(Vec<KeyValue>, usize)> {
    let (revs, count) = visible_revisions(view, range, rev, limit);
    let mut kvs = Vec::with_capacity(revs.len());
    for rev in revs {
        kvs.push(view.load(rev)?);
    }
    Ok((kvs, count))
}

/// Range with etcd's server-side options (limit + `more`, filters, sort, keys/count only).
pub(crate) fn range(view: &dyn ReadView, req: &RangeRequest) -> Answer<RangeResponse> {
    match plan_range(view, req)? {
        Ok(plan) => Ok(Ok(plan.finish(|rev| view.load(rev))?)),
        Err(e) => Ok(Err(e)),
    }
}

/// A Range in two steps: what the key index says, under its lock, then the stored key-values,
/// which for a large range take far longer and need no lock (see
/// [`crate::KvStore::range_encoded`]).
pub(crate) struct RangePlan<'r> {
    req: &'r RangeRequest,
    /// The revision read at, which the history must keep until the values are loaded.
    rev: i64,
    /// The revisions to load: the visible ones of the range's keys in key order, as many as
    /// the answer needs (one beyond the limit tells whether there is `more`).
    revs: Vec<Revision>,
    count: usize,
    /// The store's revision, for the header.
    current: i64,
}

/// A read whose index walks are done and whose values are still to be loaded.
pub(crate) trait ReadPlan {
    /// The lowest revision it reads at (`None` if none) and how many values it loads.
    fn reads(&self) -> (Option<i64>, usize);
}

impl ReadPlan for RangePlan<'_> {
    fn reads(&self) -> (Option<i64>, usize) {
        (Some(self.rev), self.revs.len())
    }
}

/// The first step of a Range: checks the request and walks the key index.
pub(crate) fn plan_range<'r>(view: &dyn ReadView, req: &'r RangeRequest) -> Answer<RangePlan<'r>> {
    let rev = match read_rev(view, req.revision) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    let sorted = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None) != SortOrder::None;
    let limit = if req.count_only {
        1
    } else if filters(req) || sorted || req.limit <= 0 {
        // Filtering or sorting needs every key. A non-key target with no order sorts too, but
        // only the limit + 1 first keys: etcd's quirk.
        0
    } else {
        req.limit as usize + 1
    };
    let range = KeyRange::new(&req.key, &req.range_end);
    let (revs, count) = visible_revisions(view, &range, rev, limit);
    Ok(Ok(RangePlan {
        req,
        rev,
        revs: if req.count_only { Vec::new() } else { revs },
        count,
        current: view.rev(),
    }))
}

/// The sort a Range asks for: a non-key target with no order means ascending, as in etcd.
fn sort_of(req: &RangeRequest) -> (SortOrder, SortTarget) {
    let order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    if target != SortTarget::Key && order == SortOrder::None {
        (SortOrder::Ascend, target)
    } else {
        (order, target)
    }
}

/// Whether a Range drops key-values by their revisions.
fn filters(req: &RangeRequest) -> bool {
    req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0
}

/// Whether a Range's answer may be in another order than the keys'.
fn reorders(req: &RangeRequest) -> bool {
    !matches!(
        sort_of(req),
        (SortOrder::None | SortOrder::Ascend, SortTarget::Key)
    )
}

impl RangePlan<'_> {
    /// The response, with each key-value loaded by `load`, then filtered, sorted and cut to
    /// the limit.
    pub(crate) fn finish(
        self,
        mut load: impl FnMut(Revision) -> Result<KeyValue>,
    ) -> Result<RangeResponse> {
        let req = self.req;
        let mut kvs = self
            .revs
            .into_iter()
            .map(&mut load)
            .collect::<Result<Vec<_>>>()?;
        if req.max_mod_revision != 0 {
            kvs.retain(|kv| kv.mod_revision <= req.max_mod_revision);
        }
        if req.min_mod_revision != 0 {
            kvs.retain(|kv| kv.mod_revision >= req.min_mod_revision);
        }
        if req.max_create_revision != 0 {
            kvs.retain(|kv| kv.create_revision <= req.max_create_revision);
        }
        if req.min_create_revision != 0 {
            kvs.retain(|kv| kv.create_revision >= req.min_create_revision);
        }
        let (order, target) = sort_of(req);
        if order != SortOrder::None {
            let cmp = |a: &KeyValue, b: &KeyValue| match target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::Version => a.version.cmp(&b.version),
                SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                SortTarget::Value => a.value.cmp(&b.value),
            };
            // Stable, and descending flips the comparison rather than the result, so ties keep
            // key order both ways, as etcd's `sort.Sort(sort.Reverse(..))` (an insertion sort
            // for the small results clients compare) leaves them.
            if order == SortOrder::Descend {
                kvs.sort_by(|a, b| cmp(b, a));
            } else {
                kvs.sort_by(cmp);
            }
        }
        let mut more = false;
        if req.limit > 0 && kvs.len() > req.limit as usize {
            kvs.truncate(req.limit as usize);
            more = true;
        }
        if req.keys_only {
            for kv in &mut kvs {
                kv.value.clear();
            }
        }
        Ok(RangeResponse {
            header: Some(header(self.current)),
            kvs,
            more,
            count: self.count as i64,
        })
    }

    /// The response with the stored encodings of its key-values, which a list page copies into
    /// its response as they are (loaded by `load_encoded`); Ranges that filter or strip values
    /// go through [`RangePlan::finish`] with `load`.
    pub(crate) fn finish_encoded(
        mut self,
        load_encoded: impl FnMut(Revision) -> Result<bytes::Bytes>,
        load: impl FnMut(Revision) -> Result<KeyValue>,
    ) -> Result<EncodedRangeResponse> {
        let req = self.req;
        if req.keys_only || req.count_only || filters(req) || reorders(req) {
            return Ok(self.finish(load)?.into());
        }
        let more = req.limit > 0 && self.revs.len() > req.limit as usize;
        if more {
            self.revs.truncate(req.limit as usize);
        }
        Ok(EncodedRangeResponse {
            header: Some(header(self.current)),
            kvs: self
                .revs
                .into_iter()
                .map(load_encoded)
                .collect::<Result<Vec<_>>>()?,
            more,
            count: self.count as i64,
        })
    }
}

/// The key-value of `key` visible now, if any.
fn get_one(view: &dyn ReadView, key: &[u8]) -> Result<Option<KeyValue>> {
    let (mut kvs, _) = range_keys(view, &KeyRange::Single(key.to_vec()), view.rev(), 1)?;
    Ok(kvs.pop())
}

/// Checks a plain Put before it writes, in etcd's `applierV3backend.Put` order: lease first.
/// (Puts inside a Txn are checked by [`check_path`], key first.)
fn check_put(view: &dyn ReadView, req: &PutRequest) -> Answer<()> {
    if req.lease != 0 && !view.lease_exists(req.lease) {
        return Ok(Err(KvError::LeaseNotFound));
    }
    if (req.ignore_value || req.ignore_lease) && get_one(view, &req.key)?.is_none() {
        return Ok(Err(KvError::KeyNotFound));
    }
    Ok(Ok(()))
}

fn do_put(txn: &mut WriteTxn<'_>, req: &PutRequest) -> Result<PutResponse> {
    let prev = if req.prev_kv || req.ignore_value || req.ignore_lease {
        get_one(txn, &req.key)?
    } else {
        None
    };
    let value = match (&prev, req.ignore_value) {
        (Some(p), true) => p.value.clone(),
        _ => bytes::Bytes::copy_from_slice(&req.value),
    };
    let lease = match (&prev, req.ignore_lease) {
        (Some(p), true) => p.lease,
        _ => req.lease,
    };
    let rev = txn.put(&req.key, value, lease);
    Ok(PutResponse {
        header: Some(header(rev)),
        prev_kv: if req.prev_kv { prev } else { None },
    })
}

/// Put (etcd's `applierV3backend.Put`).
pub(crate) fn put(txn: &mut WriteTxn<'_>, req: &PutRequest) -> Answer<PutResponse> {
    if let Err(e) = check_put(txn, req)? {
        return Ok(Err(e));
    }
    Ok(Ok(do_put(txn, req)?))
}

/// DeleteRange (etcd's `applierV3backend.DeleteRange`): every key in one revision.
pub(crate) fn delete_range(
    txn: &mut WriteTxn<'_>,
    req: &DeleteRangeRequest,
) -> Answer<DeleteRangeResponse> {
    let range = KeyRange::new(&req.key, &req.range_end);
    let prev_kvs = if req.prev_kv {
        range_keys(txn, &range, txn.rev(), 0)?.0
    } else {
        Vec::new()
    };
    let deleted = txn.delete_range(&range);
    Ok(Ok(DeleteRangeResponse {
        header: Some(header(txn.rev())),
        deleted,
        prev_kvs,
    }))
}

/// Evaluates one compare like etcd's `applyCompare`: every key in its range must satisfy it; a
/// missing key compares as an empty key-value, except that a value compare on it always fails.
fn compare(view: &dyn ReadView, c: &Compare) -> Result<bool> {
    let range = KeyRange::new(&c.key, &c.range_end);
    let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
    if let Some(held) = compare_in_index(view, c, target, &range) {
        return Ok(held);
    }
    let (kvs, _) = range_keys(view, &range, view.rev(), 0)?;
    if kvs.is_empty() {
        if target == CompareTarget::Value {
            return Ok(false);
        }
        return Ok(compare_kv(c, target, &KeyValue::default()));
    }
    Ok(kvs.iter().all(|kv| compare_kv(c, target, kv)))
}

/// A compare of revisions or versions, which the key index holds: the apiserver's
/// `mod_revision` compare-and-swap, and its creates' `mod_revision == 0`, must not load and
/// decode each key's stored value (every member applies every Txn). `None` for the targets
/// only the stored key-value holds (value, lease).
fn compare_in_index(
    view: &dyn ReadView,
    c: &Compare,
    target: CompareTarget,
    range: &KeyRange,
) -> Option<bool> {
    if !matches!(
        target,
        CompareTarget::Mod | CompareTarget::Create | CompareTarget::Version
    ) {
        return None;
    }
    let at = view.rev();
    let mut seen = false;
    let mut held = true;
    view.for_each_key(range, &mut |_, ki| {
        let Some(v) = ki.get(at) else {
            return true;
        };
        seen = true;
        let kv = KeyValue {
            mod_revision: v.modified.main,
            create_revision: v.created.main,
            version: v.version,
            ..Default::default()
        };
        held = compare_kv(c, target, &kv);
        held
    });
    // A range with no key compares against an absent key's zeros, as below.
    Some(if seen {
        held
    } else {
        compare_kv(c, target, &KeyValue::default())
    })
}

fn compare_kv(c: &Compare, target: CompareTarget, kv: &KeyValue) -> bool {
    let int = |want: i64, have: i64| have.cmp(&want);
    let ord = match target {
        CompareTarget::Value => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_ref().cmp(want)
        }
        CompareTarget::Version => int(
            match c.target_union {
                Some(TargetUnion::Version(v)) => v,
                _ => 0,
            },
            kv.version,
        ),
        CompareTarget::Create => int(
            match c.target_union {
                Some(TargetUnion::CreateRevision(v)) => v,
                _ => 0,
            },
            kv.create_revision,
        ),
        CompareTarget::Mod => int(
            match c.target_union {
                Some(TargetUnion::ModRevision(v)) => v,
                _ => 0,
            },
            kv.mod_revision,
        ),
        CompareTarget::Lease => int(
            match c.target_union {
                Some(TargetUnion::Lease(v)) => v,
                _ => 0,
            },
            kv.lease,
        ),
    };
    match CompareResult::try_from(c.result).unwrap_or(CompareResult::Equal) {
        CompareResult::Equal => ord.is_eq(),
        CompareResult::NotEqual => ord.is_ne(),
        CompareResult::Greater => ord.is_gt(),
        CompareResult::Less => ord.is_lt(),
    }
}

/// Which branch each (nested) Txn takes, decided on the state before the Txn writes anything
/// (etcd's `compareToPath`), in the order the Txns execute.
fn compare_to_path(view: &dyn ReadView, req: &TxnRequest, path: &mut Vec<bool>) -> Result<()> {
    let mut ok = true;
    for c in &req.compare {
        if !compare(view, c)? {
            ok = false;
            break;
        }
    }
    path.push(ok);
    let ops = if ok { &req.success } else { &req.failure };
    for op in ops {
        if let Some(Request::RequestTxn(t)) = &op.request {
            compare_to_path(view, t, path)?;
        }
    }
    Ok(())
}

/// etcd's `checkRequestRange`: a Range inside a Txn is checked with its revision as given.
/// Unlike a plain Range, which reads a negative revision as the current one, a negative
/// revision below the compacted revision (-1 before any compaction) is refused as compacted.
fn check_txn_range(view: &dyn ReadView, rev: i64) -> std::result::Result<(), KvError> {
    if rev == 0 {
        Ok(())
    } else if rev > view.rev() {
        Err(KvError::FutureRevision)
    } else if rev < view.compact_rev() {
        Err(KvError::Compacted)
    } else {
        Ok(())
    }
}

/// Which requests a pass of [`check_path`] checks.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Check {
    Puts,
    Ranges,
}

/// Checks the puts or the ranges of the chosen branches before any write (etcd's
/// `checkRequests`, which runs once for puts, then once for ranges).
///
/// `deleted` collects, in execution order, the deletes the Txn runs before the op at hand. A
/// put with `ignore_value` or `ignore_lease` needs its key to exist where it runs, not only
/// before the Txn. The server's duplicate-key check refuses a put after a delete of the same
/// key, except after a from-key delete (`range_end` `"\0"`), in which etcd's interval check,
/// reproduced there, sees no key. etcd 3.4 checks the flags on the state before the Txn only,
/// finds the key, and fails half way through the apply, which it answers with a panic (a 3.4
/// server died on it in the randomized differential test); every member applies the same
/// entry. fetcd refuses such a Txn before it writes anything, with the error the put would get
/// on its own.
fn check_path<'r>(
    view: &dyn ReadView,
    req: &'r TxnRequest,
    path: &[bool],
    at: &mut usize,
    check: Check,
    deleted: &mut Vec<&'r DeleteRangeRequest>,
) -> Answer<()> {
    let ok = path.get(*at).copied().unwrap_or(false);
    *at += 1;
    for op in if ok { &req.success } else { &req.failure } {
        let res = match &op.request {
            Some(Request::RequestRange(r)) if check == Check::Ranges => {
                check_txn_range(view, r.revision)
            }
            Some(Request::RequestDeleteRange(d)) if check == Check::Puts => {
                deleted.push(d);
                Ok(())
            }
            // etcd's `checkRequestPut`: unlike a plain Put, the key before the lease.
            Some(Request::RequestPut(p)) if check == Check::Puts => {
                let needs_prev = p.ignore_value || p.ignore_lease;
                if needs_prev
                    && (get_one(view, &p.key)?.is_none()
                        || deleted
                            .iter()
                            .any(|d| KeyRange::new(&d.key, &d.range_end).contains(&p.key)))
                {
                    Err(KvError::KeyNotFound)
                } else if p.lease != 0 && !view.lease_exists(p.lease) {
                    Err(KvError::LeaseNotFound)
                } else {
                    Ok(())
                }
            }
            Some(Request::RequestTxn(t)) => check_path(view, t, path, at, check, deleted)?,
            _ => Ok(()),
        };
        if let Err(e) = res {
            return Ok(Err(e));
        }
    }
    Ok(Ok(()))
}

fn execute(
    txn: &mut WriteTxn<'_>,
    req: &TxnRequest,
    path: &[bool],
    at: &mut usize,
) -> Answer<TxnResponse> {
    let ok = path.get(*at).copied().unwrap_or(false);
    *at += 1;
    let mut responses = Vec::new();
    for op in if ok { &req.success } else { &req.failure } {
        let resp = match &op.request {
            Some(Request::RequestRange(r)) => match range(txn, r)? {
                Ok(r) => Response::ResponseRange(r),
                Err(e) => return Ok(Err(e)),
            },
            Some(Request::RequestPut(p)) => Response::ResponsePut(do_put(txn, p)?),
            Some(Request::RequestDeleteRange(d)) => match delete_range(txn, d)? {
                Ok(r) => Response::ResponseDeleteRange(r),
                Err(e) => return Ok(Err(e)),
            },
            Some(Request::RequestTxn(t)) => match execute(txn, t, path, at)? {
                Ok(r) => Response::ResponseTxn(r),
                Err(e) => return Ok(Err(e)),
            },
            None => continue,
        };
        responses.push(ResponseOp {
            response: Some(resp),
        });
    }
    Ok(Ok(TxnResponse {
        // Nested Txns carry an empty header, as in etcd; the outer one is set by `txn`.
        header: Some(ResponseHeader::default()),
        succeeded: ok,
        responses,
    }))
}

/// A Txn that only reads, in two steps like a [`RangePlan`]: the compares, checks and index
/// walks of the branch taken, then the values of its Ranges.
pub(crate) struct ReadTxnPlan<'r> {
    succeeded: bool,
    ops: Vec<PlannedOp<'r>>,
    /// The store's revision, for the header.
    current: i64,
}

/// One operation of a [`ReadTxnPlan`]'s branch.
enum PlannedOp<'r> {
    Range(RangePlan<'r>),
    Txn(ReadTxnPlan<'r>),
}

/// The first step of a Txn that only reads (see [`is_txn_read_only`]): the same compares and
/// checks as [`txn`], then the index walks of the Ranges of the branch taken.
pub(crate) fn plan_read_txn<'r>(
    view: &dyn ReadView,
    req: &'r TxnRequest,
) -> Answer<ReadTxnPlan<'r>> {
    if !is_txn_read_only(req) {
        return Err(crate::StorageError::Corrupt(
            "a writing Txn reached the read-only path".into(),
        ));
    }
    let mut path = Vec::new();
    compare_to_path(view, req, &mut path)?;
    if let Err(e) = check_path(view, req, &path, &mut 0, Check::Ranges, &mut Vec::new())? {
        return Ok(Err(e));
    }
    plan_branch(view, req, &path, &mut 0)
}

fn plan_branch<'r>(
    view: &dyn ReadView,
    req: &'r TxnRequest,
    path: &[bool],
    at: &mut usize,
) -> Answer<ReadTxnPlan<'r>> {
    let ok = path.get(*at).copied().unwrap_or(false);
    *at += 1;
    let mut ops = Vec::new();
    for op in if ok { &req.success } else { &req.failure } {
        let planned = match &op.request {
            Some(Request::RequestRange(r)) => plan_range(view, r)?.map(PlannedOp::Range),
            Some(Request::RequestTxn(t)) => plan_branch(view, t, path, at)?.map(PlannedOp::Txn),
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => {
                return Err(crate::StorageError::Corrupt(
                    "a writing Txn reached the read-only path".into(),
                ))
            }
            None => continue,
        };
        match planned {
            Ok(p) => ops.push(p),
            Err(e) => return Ok(Err(e)),
        }
    }
    Ok(Ok(ReadTxnPlan {
        succeeded: ok,
        ops,
        current: view.rev(),
    }))
}

impl ReadPlan for ReadTxnPlan<'_> {
    fn reads(&self) -> (Option<i64>, usize) {
        self.ops.iter().fold((None, 0), |(low, n), op| {
            let (rev, values) = match op {
                PlannedOp::Range(r) => r.reads(),
                PlannedOp::Txn(t) => t.reads(),
            };
            (low.into_iter().chain(rev).min(), n + values)
        })
    }
}

impl ReadTxnPlan<'_> {
    /// The response, with each key-value loaded by `load`.
    pub(crate) fn finish(
        self,
        load: &mut dyn FnMut(Revision) -> Result<KeyValue>,
    ) -> Result<TxnResponse> {
        let current = self.current;
        let mut resp = self.finish_nested(load)?;
        resp.header = Some(header(current));
        Ok(resp)
    }

    fn finish_nested(
        self,
        load: &mut dyn FnMut(Revision) -> Result<KeyValue>,
    ) -> Result<TxnResponse> {
        let mut responses = Vec::with_capacity(self.ops.len());
        for op in self.ops {
            let resp = match op {
                PlannedOp::Range(r) => Response::ResponseRange(r.finish(&mut *load)?),
                PlannedOp::Txn(t) => Response::ResponseTxn(t.finish_nested(load)?),
            };
            responses.push(ResponseOp {
                response: Some(resp),
            });
        }
        Ok(TxnResponse {
            // Nested Txns carry an empty header, as in etcd; `finish` sets the outer one.
            header: Some(ResponseHeader::default()),
            succeeded: self.succeeded,
            responses,
        })
    }
}

/// True if no branch of `req` (at any depth) writes.
pub fn is_txn_read_only(req: &TxnRequest) -> bool {
    req.success
        .iter()
        .chain(&req.failure)
        .all(|op| match &op.request {
            Some(Request::RequestRange(_)) | None => true,
            Some(Request::RequestTxn(t)) => is_txn_read_only(t),
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => false,
        })
}

/// Ranges over more keys than this, or with no limit, may read for long: a full range over a
/// million keys reads and encodes every one of them.
const LONG_RANGE_KEYS: i64 = 1000;

/// Whether a Range may read many keys: a span (not one key) with no limit or a large one. A
/// `count_only` range over a span still walks the key index.
pub fn range_may_take_long(r: &RangeRequest) -> bool {
    !r.range_end.is_empty() && (r.limit <= 0 || r.limit > LONG_RANGE_KEYS)
}

/// Whether a DeleteRange may touch many keys: any span may.
pub(crate) fn delete_may_take_long(d: &DeleteRangeRequest) -> bool {
    !d.range_end.is_empty()
}

/// Whether a Txn may take long: a Range or DeleteRange that may ([`range_may_take_long`],
/// [`delete_may_take_long`]) in any branch, at any depth.
pub fn txn_may_take_long(req: &TxnRequest) -> bool {
    req.success
        .iter()
        .chain(&req.failure)
        .any(|op| match &op.request {
            Some(Request::RequestRange(r)) => range_may_take_long(r),
            Some(Request::RequestDeleteRange(d)) => delete_may_take_long(d),
            Some(Request::RequestTxn(t)) => txn_may_take_long(t),
            Some(Request::RequestPut(_)) | None => false,
        })
}

/// Txn (etcd's `applierV3backend.Txn`): compares, checks, then executes one branch at one
/// revision.
pub(crate) fn txn(txn: &mut WriteTxn<'_>, req: &TxnRequest) -> Answer<TxnResponse> {
    let mut path = Vec::new();
    compare_to_path(txn, req, &mut path)?;
    for check in [Check::Puts, Check::Ranges] {
        if let Err(e) = check_path(txn, req, &path, &mut 0, check, &mut Vec::new())? {
            return Ok(Err(e));
        }
    }
    let mut resp = match execute(txn, req, &path, &mut 0)? {
        Ok(r) => r,
        Err(e) => return Ok(Err(e)),
    };
    resp.header = Some(header(txn.rev()));
    Ok(Ok(resp))
}

/// LeaseGrant (etcd's `lessor.Grant` as applied): the ID must be new and non-zero and the TTL at
/// most [`MAX_LEASE_TTL`]. The grant is recorded as a countdown of the full TTL from `stamp`, so
/// the granting member, should it restart before any keepalive, knows when the lease runs out.
/// Takes no revision.
pub(crate) fn lease_grant(
    txn: &mut WriteTxn<'_>,
    req: &LeaseGrantRequest,
    stamp: Option<LeaseStamp>,
) -> std::result::Result<LeaseGrantResponse, KvError> {
    if req.id == 0 {
        return Err(KvError::LeaseNotFound);
    }
    if req.ttl > MAX_LEASE_TTL {
        return Err(KvError::LeaseTtlTooLarge);
    }
    if txn.lease(req.id).is_some() {
        return Err(KvError::LeaseExists);
    }
    txn.put_lease(Lease {
        id: req.id,
        ttl: req.ttl,
        remaining_ttl: if stamp.is_some() { req.ttl } else { 0 },
        stamp,
    });
    Ok(LeaseGrantResponse {
        header: Some(header(txn.rev())),
        id: req.id,
        ttl: req.ttl,
        error: String::new(),
    })
}

/// LeaseRevoke (etcd's `lessor.Revoke`): deletes every attached key, in key order, all in one
/// revision, then the lease.
pub(crate) fn lease_revoke(
    txn: &mut WriteTxn<'_>,
    req: &LeaseRevokeRequest,
) -> Answer<LeaseRevokeResponse> {
    if txn.lease(req.id).is_none() {
        return Ok(Err(KvError::LeaseNotFound));
    }
    for key in txn.lease_keys(req.id) {
        txn.delete_range(&KeyRange::Single(key));
    }
    txn.remove_lease(req.id);
    Ok(Ok(LeaseRevokeResponse {
        header: Some(header(txn.rev())),
    }))
}

/// LeaseCheckpoint (etcd's `lessor.Checkpoint`): records each lease's remaining TTL; 0 clears it
/// (a keepalive happened, the next leader must grant the full TTL). Unknown leases are skipped.
pub(crate) fn lease_checkpoint(
    txn: &mut WriteTxn<'_>,
    req: &LeaseCheckpointRequest,
    stamp: Option<LeaseStamp>,
) -> LeaseCheckpointResponse {
    for cp in &req.checkpoints {
        if let Some(mut lease) = txn.lease(cp.id) {
            lease.remaining_ttl = cp.remaining_ttl.max(0);
            lease.stamp = if lease.remaining_ttl > 0 { stamp } else { None };
            txn.put_lease(lease);
        }
    }
    LeaseCheckpointResponse {
        header: Some(header(txn.rev())),
    }
}

#[cfg(test)]
mod long_tests {
    use fetcd_proto::etcdserverpb::RequestOp;

    use super::*;
    use crate::WriteOp;

    fn range(key: &str, end: &str, limit: i64) -> RangeRequest {
        RangeRequest {
            key: key.into(),
            range_end: end.into(),
            limit,
            ..Default::default()
        }
    }

    fn op(r: Request) -> RequestOp {
        RequestOp { request: Some(r) }
    }

    #[test]
    fn spans_without_a_small_limit_may_take_long() {
        assert!(!range_may_take_long(&range("a", "", 0)), "one key");
        assert!(range_may_take_long(&range("a", "b", 0)), "a span, no limit");
        assert!(range_may_take_long(&range("\0", "\0", 0)), "every key");
        assert!(!range_may_take_long(&range("a", "b", 500)), "a page");
        assert!(!range_may_take_long(&range("a", "b", LONG_RANGE_KEYS)));
        assert!(range_may_take_long(&range("a", "b", LONG_RANGE_KEYS + 1)));
        let count = RangeRequest {
            count_only: true,
            ..range("a", "b", 0)
        };
        assert!(
            range_may_take_long(&count),
            "count_only still walks the span"
        );
    }

    #[test]
    fn a_txn_or_write_is_long_if_any_part_is() {
        let span_delete = DeleteRangeRequest {
            key: "a".into(),
            range_end: "b".into(),
            ..Default::default()
        };
        let one_delete = DeleteRangeRequest {
            key: "a".into(),
            ..Default::default()
        };
        let nested = |r: Request| TxnRequest {
            success: vec![op(Request::RequestRange(range("k", "", 0)))],
            failure: vec![op(Request::RequestTxn(TxnRequest {
                failure: vec![op(r)],
                ..Default::default()
            }))],
            ..Default::default()
        };
        assert!(txn_may_take_long(&nested(Request::RequestRange(range(
            "a", "b", 0
        )))));
        assert!(txn_may_take_long(&nested(Request::RequestDeleteRange(
            span_delete.clone()
        ))));
        assert!(!txn_may_take_long(&nested(Request::RequestDeleteRange(
            one_delete.clone()
        ))));
        assert!(!txn_may_take_long(&nested(Request::RequestRange(range(
            "a", "b", 10
        )))));

        assert!(WriteOp::DeleteRange(span_delete).may_take_long());
        assert!(!WriteOp::DeleteRange(one_delete).may_take_long());
        assert!(!WriteOp::Put(PutRequest::default()).may_take_long());
        assert!(WriteOp::LeaseRevoke(Default::default()).may_take_long());
        assert!(
            WriteOp::Compaction(Default::default()).may_take_long(),
            "a compaction waits for the persister"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod compare_tests {
    use fetcd_proto::etcdserverpb::RequestOp;

    use super::*;
    use crate::kvstore::testing::put;
    use crate::kvstore::testing::store;
    use crate::kvstore::testing::with_committed;
    use crate::WriteOp;

    fn op(r: Request) -> RequestOp {
        RequestOp { request: Some(r) }
    }

    /// The compares answered from the key index must answer as the stored key-values do, over
    /// a history of updates, deletes, re-creates and a Txn writing two keys in one revision.
    #[test]
    fn compares_from_the_key_index_answer_as_the_stored_values_do() {
        let s = store();
        let delete = |k: &str| {
            let req = DeleteRangeRequest {
                key: k.into(),
                ..Default::default()
            };
            s.apply([(WriteOp::DeleteRange(req), b"ci".to_vec())])
                .unwrap();
        };
        put(&s, "a", "1");
        put(&s, "a", "2");
        put(&s, "b", "1");
        delete("a");
        put(&s, "a", "3");
        let both = TxnRequest {
            success: ["c", "d"]
                .map(|k| {
                    op(Request::RequestPut(PutRequest {
                        key: k.into(),
                        value: b"t".to_vec(),
                        ..Default::default()
                    }))
                })
                .to_vec(),
            ..Default::default()
        };
        s.apply([(WriteOp::Txn(both), b"ci".to_vec())]).unwrap();
        put(&s, "d", "2");
        put(&s, "e", "1");
        delete("e");
        with_committed(&s, |view| {
            let by_load = |c: &Compare, target: CompareTarget, range: &KeyRange| {
                let (kvs, _) = range_keys(view, range, view.rev(), 0).unwrap();
                if kvs.is_empty() {
                    compare_kv(c, target, &KeyValue::default())
                } else {
                    kvs.iter().all(|kv| compare_kv(c, target, kv))
                }
            };
            let (mut held, mut checked) = (0, 0);
            let ranges: [(&str, &str); 8] = [
                ("a", ""),
                ("b", ""),
                ("c", ""),
                ("d", ""),
                ("e", ""),
                ("z", ""),
                ("a", "e"),
                ("\0", "\0"),
            ];
            for (key, end) in ranges {
                for target in [
                    CompareTarget::Mod,
                    CompareTarget::Create,
                    CompareTarget::Version,
                ] {
                    for result in [
                        CompareResult::Equal,
                        CompareResult::NotEqual,
                        CompareResult::Greater,
                        CompareResult::Less,
                    ] {
                        for want in 0..=12 {
                            let c = Compare {
                                key: key.into(),
                                range_end: end.into(),
                                target: target as i32,
                                result: result as i32,
                                target_union: Some(match target {
                                    CompareTarget::Mod => TargetUnion::ModRevision(want),
                                    CompareTarget::Create => TargetUnion::CreateRevision(want),
                                    _ => TargetUnion::Version(want),
                                }),
                            };
                            let range = KeyRange::new(&c.key, &c.range_end);
                            let got = compare_in_index(view, &c, target, &range);
                            assert_eq!(
                                got,
                                Some(by_load(&c, target, &range)),
                                "{key:?}..{end:?} {target:?} {result:?} {want}"
                            );
                            checked += 1;
                            held += usize::from(got == Some(true));
                        }
                    }
                }
            }
            // Both outcomes occur, so the comparison above could tell the two apart.
            assert!(held > 0 && held < checked, "{held} of {checked}");
        });
    }
}
