//! Request checks done before anything is proposed (etcd's `v3rpc/key.go` `check*Request` and
//! `checkIntervals`). They depend only on the request, so every member gives the same answer and
//! a refused request never reaches the Raft log.

use std::collections::HashSet;

use fetcd_proto::etcdserverpb::range_request::SortOrder;
use fetcd_proto::etcdserverpb::range_request::SortTarget;
use fetcd_proto::etcdserverpb::request_op::Request;
use fetcd_proto::etcdserverpb::DeleteRangeRequest;
use fetcd_proto::etcdserverpb::PutRequest;
use fetcd_proto::etcdserverpb::RangeRequest;
use fetcd_proto::etcdserverpb::RequestOp;
use fetcd_proto::etcdserverpb::TxnRequest;
use fetcd_proto::status as msg;
use tonic::Status;

/// etcd's `checkRangeRequest`.
pub fn range(r: &RangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(Status::invalid_argument(msg::ERR_EMPTY_KEY));
    }
    if SortOrder::try_from(r.sort_order).is_err() || SortTarget::try_from(r.sort_target).is_err() {
        return Err(Status::invalid_argument(msg::ERR_INVALID_SORT_OPTION));
    }
    Ok(())
}

/// etcd's `checkPutRequest`.
pub fn put(r: &PutRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(Status::invalid_argument(msg::ERR_EMPTY_KEY));
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(Status::invalid_argument(msg::ERR_VALUE_PROVIDED));
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(Status::invalid_argument(msg::ERR_LEASE_PROVIDED));
    }
    Ok(())
}

/// etcd's `checkDeleteRequest`.
pub fn delete_range(r: &DeleteRangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(Status::invalid_argument(msg::ERR_EMPTY_KEY));
    }
    Ok(())
}

/// etcd's `checkTxnRequest` followed by the duplicate-key check of both branches.
pub fn txn(r: &TxnRequest, max_txn_ops: usize) -> Result<(), Status> {
    txn_ops(r, max_txn_ops)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn txn_ops(r: &TxnRequest, max_txn_ops: usize) -> Result<(), Status> {
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len());
    if opc > max_txn_ops {
        return Err(Status::invalid_argument(msg::ERR_TOO_MANY_OPS));
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(Status::invalid_argument(msg::ERR_EMPTY_KEY));
    }
    for op in r.success.iter().chain(&r.failure) {
        request_op(op, max_txn_ops)?;
    }
    Ok(())
}

fn request_op(op: &RequestOp, max_txn_ops: usize) -> Result<(), Status> {
    match &op.request {
        Some(Request::RequestRange(r)) => range(r),
        Some(Request::RequestPut(r)) => put(r),
        Some(Request::RequestDeleteRange(r)) => delete_range(r),
        Some(Request::RequestTxn(r)) => txn_ops(r, max_txn_ops),
        None => Err(Status::invalid_argument(msg::ERR_KEY_NOT_FOUND)),
    }
}

/// A deleted interval as etcd's duplicate check sees it: `[key, end)`, where an empty end is the
/// single key. Like etcd's affine intervals, an end of `"\0"` yields an interval no key falls in.
#[derive(Clone, Debug)]
struct Deleted {
    key: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Deleted {
    fn covers(&self, k: &[u8]) -> bool {
        match &self.end {
            None => self.key.as_slice() == k,
            Some(end) => self.key.as_slice() <= k && k < end.as_slice(),
        }
    }
}

/// etcd's `checkIntervals`: within one branch (and the Txns nested in it) no key may be put twice
/// or both put and deleted; the two branches of a nested Txn may put the same key.
fn check_intervals(reqs: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<Deleted>), Status> {
    let dup = || Status::invalid_argument(msg::ERR_DUPLICATE_KEY);
    let mut dels: Vec<Deleted> = reqs
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => Some(Deleted {
                key: d.key.clone(),
                end: (!d.range_end.is_empty()).then(|| d.range_end.clone()),
            }),
            _ => None,
        })
        .collect();
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in reqs {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || dels.iter().any(|d| d.covers(k)) {
                return Err(dup());
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            if puts.contains(k) && !puts_then.contains(k) {
                return Err(dup());
            }
            if dels.iter().any(|d| d.covers(k)) {
                return Err(dup());
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in reqs {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || dels.iter().any(|d| d.covers(&p.key)) {
            return Err(dup());
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_op(k: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }

    fn del_op(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }

    fn txn_op(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestTxn(TxnRequest {
                compare: vec![],
                success,
                failure,
            })),
        }
    }

    fn check(success: Vec<RequestOp>) -> Result<(), Status> {
        txn(
            &TxnRequest {
                compare: vec![],
                success,
                failure: vec![],
            },
            128,
        )
    }

    #[test]
    fn duplicate_puts_and_overlapping_deletes_are_refused() {
        assert!(check(vec![put_op("a"), put_op("a")]).is_err());
        assert!(check(vec![put_op("b"), del_op("a", "c")]).is_err());
        assert!(check(vec![put_op("a"), del_op("a", "")]).is_err());
        assert!(check(vec![put_op("c"), del_op("a", "c")]).is_ok());
        assert!(check(vec![del_op("a", "c"), del_op("b", "d")]).is_ok());
        // etcd's affine interval quirk: a "\0" end covers nothing.
        assert!(check(vec![put_op("b"), del_op("a", "\0")]).is_ok());
        // Both branches of a nested txn may put the same key...
        assert!(check(vec![txn_op(vec![put_op("a")], vec![put_op("a")])]).is_ok());
        // ...but not alongside an outer put of it.
        assert!(check(vec![put_op("a"), txn_op(vec![put_op("a")], vec![])]).is_err());
        assert!(check(vec![del_op("a", "b"), txn_op(vec![], vec![put_op("a")])]).is_err());
    }

    #[test]
    fn too_many_ops_and_empty_keys() {
        let ops: Vec<RequestOp> = (0..129).map(|i| put_op(&format!("k{i}"))).collect();
        let e = check(ops).err().map(|s| s.message().to_string());
        assert_eq!(e.as_deref(), Some(msg::ERR_TOO_MANY_OPS));
        let e = check(vec![put_op("")])
            .err()
            .map(|s| s.message().to_string());
        assert_eq!(e.as_deref(), Some(msg::ERR_EMPTY_KEY));
        let e = check(vec![RequestOp { request: None }])
            .err()
            .map(|s| s.code());
        assert_eq!(e, Some(tonic::Code::InvalidArgument));
    }
}
