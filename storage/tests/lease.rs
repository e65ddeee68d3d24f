//! The replicated half of leases: grant, attach through puts, detach, revoke deleting every
//! attached key in one revision, checkpoints, and everything surviving a reopen or a snapshot.
#![allow(clippy::unwrap_used)]

mod common;

use fetcd_proto::etcdserverpb::request_op::Request;
use fetcd_proto::etcdserverpb::DeleteRangeRequest;
use fetcd_proto::etcdserverpb::LeaseCheckpoint;
use fetcd_proto::etcdserverpb::LeaseCheckpointRequest;
use fetcd_proto::etcdserverpb::LeaseGrantRequest;
use fetcd_proto::etcdserverpb::LeaseRevokeRequest;
use fetcd_proto::etcdserverpb::PutRequest;
use fetcd_proto::etcdserverpb::RangeRequest;
use fetcd_proto::etcdserverpb::RequestOp;
use fetcd_proto::etcdserverpb::TxnRequest;
use fetcd_proto::mvccpb::event::EventType;
use fetcd_storage::KvError;
use fetcd_storage::KvStore;
use fetcd_storage::LeaseStamp;
use fetcd_storage::WriteOp;
use fetcd_storage::WriteResponse;
use fetcd_storage::MAX_LEASE_TTL;

use crate::common::open;

fn apply(s: &KvStore, op: WriteOp) -> Result<WriteResponse, KvError> {
    s.apply([(op, b"ci".to_vec())]).unwrap().pop().unwrap()
}

fn grant(id: i64, ttl: i64) -> WriteOp {
    WriteOp::LeaseGrant(LeaseGrantRequest { ttl, id }, None)
}

fn revoke(id: i64) -> WriteOp {
    WriteOp::LeaseRevoke(LeaseRevokeRequest { id })
}

fn put(key: &str, value: &str, lease: i64) -> WriteOp {
    WriteOp::Put(PutRequest {
        key: key.into(),
        value: value.into(),
        lease,
        ..Default::default()
    })
}

fn lease_of(s: &KvStore, key: &str) -> Option<i64> {
    s.range(&RangeRequest {
        key: key.into(),
        ..Default::default()
    })
    .unwrap()
    .unwrap()
    .kvs
    .first()
    .map(|kv| kv.lease)
}

fn keys_of(s: &KvStore, id: i64) -> Vec<String> {
    s.lease_keys(id)
        .into_iter()
        .map(|k| String::from_utf8(k).unwrap())
        .collect()
}

#[test]
fn grant_checks_id_ttl_and_takes_no_revision() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    match apply(&s, grant(7, 60)).unwrap() {
        WriteResponse::LeaseGrant(r) => {
            assert_eq!((r.id, r.ttl), (7, 60));
            assert_eq!(r.header.unwrap().revision, 1);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.current_revision(), 1);
    assert_eq!(apply(&s, grant(7, 60)), Err(KvError::LeaseExists));
    assert_eq!(apply(&s, grant(0, 60)), Err(KvError::LeaseNotFound));
    assert_eq!(
        apply(&s, grant(8, MAX_LEASE_TTL + 1)),
        Err(KvError::LeaseTtlTooLarge)
    );
    assert_eq!(s.leases().len(), 1);
    assert_eq!(s.lease(7).unwrap().ttl, 60);
}

#[test]
fn puts_attach_detach_and_move_keys() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    apply(&s, grant(1, 60)).unwrap();
    apply(&s, grant(2, 60)).unwrap();
    assert_eq!(apply(&s, put("a", "v", 3)), Err(KvError::LeaseNotFound));
    assert_eq!(s.current_revision(), 1, "a refused put writes nothing");
    apply(&s, put("a", "v", 1)).unwrap();
    apply(&s, put("b", "v", 1)).unwrap();
    assert_eq!(keys_of(&s, 1), ["a", "b"]);
    // ignore_lease keeps it; a plain put moves it; lease 0 detaches it.
    apply(
        &s,
        WriteOp::Put(PutRequest {
            key: "a".into(),
            value: "v2".into(),
            ignore_lease: true,
            ..Default::default()
        }),
    )
    .unwrap();
    assert_eq!(lease_of(&s, "a"), Some(1));
    apply(&s, put("a", "v3", 2)).unwrap();
    assert_eq!(keys_of(&s, 1), ["b"]);
    assert_eq!(keys_of(&s, 2), ["a"]);
    apply(&s, put("b", "v", 0)).unwrap();
    assert!(keys_of(&s, 1).is_empty());
    // A delete detaches too.
    apply(
        &s,
        WriteOp::DeleteRange(DeleteRangeRequest {
            key: "a".into(),
            ..Default::default()
        }),
    )
    .unwrap();
    assert!(keys_of(&s, 2).is_empty());
    // A Txn put checks the lease like a plain put.
    let t = TxnRequest {
        success: vec![RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: "t".into(),
                lease: 99,
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    assert_eq!(
        apply(&s, WriteOp::Txn(t.clone())),
        Err(KvError::LeaseNotFound)
    );
    let mut ok = t;
    if let Some(Request::RequestPut(p)) = &mut ok.success[0].request {
        p.lease = 2;
    }
    apply(&s, WriteOp::Txn(ok)).unwrap();
    assert_eq!(keys_of(&s, 2), ["t"]);
}

#[test]
fn revoke_deletes_every_attached_key_in_one_revision_with_events() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    apply(&s, grant(5, 60)).unwrap();
    for k in ["k3", "k1", "k2"] {
        apply(&s, put(k, "v", 5)).unwrap();
    }
    apply(&s, put("other", "v", 0)).unwrap();
    let before = s.current_revision();
    match apply(&s, revoke(5)).unwrap() {
        WriteResponse::LeaseRevoke(r) => assert_eq!(r.header.unwrap().revision, before + 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.current_revision(), before + 1);
    let events = s.history(None, before + 1, before + 1).unwrap();
    let deleted: Vec<_> = events
        .iter()
        .map(|e| {
            assert_eq!(e.r#type, EventType::Delete as i32);
            String::from_utf8(e.kv.as_ref().unwrap().key.clone()).unwrap()
        })
        .collect();
    assert_eq!(deleted, ["k1", "k2", "k3"], "key order, one revision");
    assert!(s.lease(5).is_none());
    assert_eq!(lease_of(&s, "other"), Some(0));
    assert_eq!(apply(&s, revoke(5)), Err(KvError::LeaseNotFound));
    // A lease without keys revokes without a revision.
    apply(&s, grant(6, 60)).unwrap();
    apply(&s, revoke(6)).unwrap();
    assert_eq!(s.current_revision(), before + 1);
}

#[test]
fn grant_put_and_revoke_in_one_batch_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let out = s
        .apply([
            (grant(9, 60), b"1".to_vec()),
            (put("x", "v", 9), b"2".to_vec()),
            (put("y", "v", 9), b"3".to_vec()),
            (revoke(9), b"4".to_vec()),
            (put("z", "v", 9), b"5".to_vec()),
        ])
        .unwrap();
    assert!(out[..4].iter().all(|r| r.is_ok()), "{out:?}");
    assert_eq!(out[4], Err(KvError::LeaseNotFound));
    assert_eq!(s.current_revision(), 4, "two puts and one revoke");
    assert!(s.lease(9).is_none());
    assert!(lease_of(&s, "x").is_none() && lease_of(&s, "y").is_none());
}

#[test]
fn leases_and_attachments_survive_reopen_and_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let stamp = LeaseStamp {
        member: 3,
        unix_ms: 1_700_000_000_000,
    };
    apply(
        &s,
        WriteOp::LeaseGrant(LeaseGrantRequest { ttl: 600, id: 1 }, Some(stamp)),
    )
    .unwrap();
    apply(&s, grant(2, 30)).unwrap();
    apply(&s, put("a", "v", 1)).unwrap();
    apply(&s, put("b", "v", 2)).unwrap();
    apply(&s, put("b", "v2", 1)).unwrap();
    apply(&s, put("c", "v", 1)).unwrap();
    apply(
        &s,
        WriteOp::DeleteRange(DeleteRangeRequest {
            key: "c".into(),
            ..Default::default()
        }),
    )
    .unwrap();
    let granted = s.lease(1).unwrap();
    assert_eq!(
        (granted.remaining_ttl, granted.stamp),
        (600, Some(stamp)),
        "a stamped grant records its full countdown"
    );
    apply(
        &s,
        WriteOp::LeaseCheckpoint(
            LeaseCheckpointRequest {
                checkpoints: vec![
                    LeaseCheckpoint {
                        id: 2,
                        remaining_ttl: 12,
                    },
                    LeaseCheckpoint {
                        id: 1,
                        remaining_ttl: 0,
                    },
                    LeaseCheckpoint {
                        id: 77,
                        remaining_ttl: 5,
                    },
                ],
            },
            Some(stamp),
        ),
    )
    .unwrap();
    let want = s.leases();
    assert_eq!(
        want.len(),
        2,
        "a checkpoint of an unknown lease creates nothing"
    );
    assert_eq!((want[0].remaining_ttl, want[0].stamp), (0, None));
    assert_eq!((want[1].remaining_ttl, want[1].stamp), (12, Some(stamp)));

    s.flush().unwrap();
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.leases(), want);
    assert_eq!(keys_of(&s, 1), ["a", "b"]);
    assert!(keys_of(&s, 2).is_empty());

    let mut records = Vec::new();
    s.export(&mut |t, k, v| {
        records.push((t.to_string(), k.to_vec(), v.to_vec()));
        Ok(())
    })
    .unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other = open(other_dir.path());
    apply(&other, grant(40, 5)).unwrap();
    other.import(records.into_iter().map(Ok)).unwrap();
    assert_eq!(
        other.leases(),
        want,
        "the snapshot replaces the lease table"
    );
    assert_eq!(keys_of(&other, 1), ["a", "b"]);
    match apply(&other, revoke(1)).unwrap() {
        WriteResponse::LeaseRevoke(_) => {}
        other => panic!("{other:?}"),
    }
    assert!(lease_of(&other, "a").is_none() && lease_of(&other, "b").is_none());
}
