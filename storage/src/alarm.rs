//! Cluster alarms (etcd's `alarmStore`) as replicated state.
//!
//! An alarm is a `(member id, alarm type)` pair, raised and cleared through Raft
//! ([`crate::WriteOp::Alarm`]) and kept in the `meta` tree under [`schema::ALARM_PREFIX`],
//! written in the same sled transaction as the consistent index of the entry that changed it, so
//! alarms survive restarts and travel in snapshots like the data.
//!
//! While a `NOSPACE` alarm is active the store refuses, at apply time, every request that could
//! grow the database (etcd's `applierV3Capped`): Put, a Txn with a put in any branch, and
//! LeaseGrant. Reads, deletes, revokes and compaction go on, so an operator can free space.
//!
//! While a `CORRUPT` alarm is active (a member's data was found to differ from the others') the
//! store refuses every write that would change the key space or leases (etcd's
//! `applierV3Corrupt`): Put, DeleteRange, a Txn that writes, Compaction, LeaseGrant and
//! LeaseRevoke. Reads go on, and so do alarm requests, so the alarm can be disarmed.

use std::collections::BTreeSet;

use fetcd_proto::etcdserverpb::alarm_request::AlarmAction;
use fetcd_proto::etcdserverpb::request_op::Request;
use fetcd_proto::etcdserverpb::AlarmMember;
use fetcd_proto::etcdserverpb::AlarmRequest;
use fetcd_proto::etcdserverpb::AlarmResponse;
use fetcd_proto::etcdserverpb::AlarmType;
use fetcd_proto::etcdserverpb::TxnRequest;

use crate::schema;
use crate::KvStore;
use crate::Result;
use crate::StorageError;
use crate::WriteOp;

/// The set of active alarms, ordered by member then type.
pub type AlarmSet = BTreeSet<(u64, i32)>;

/// The `meta` tree key of one alarm.
pub(crate) fn alarm_key(member: u64, alarm: i32) -> Vec<u8> {
    let mut k = schema::ALARM_PREFIX.as_bytes().to_vec();
    k.extend_from_slice(&member.to_be_bytes());
    k.extend_from_slice(&alarm.to_be_bytes());
    k
}

/// Reads the alarms stored in `meta`.
pub(crate) fn load(meta: &sled::Tree) -> Result<AlarmSet> {
    let mut out = AlarmSet::new();
    for item in meta.scan_prefix(schema::ALARM_PREFIX) {
        let (k, _) = item?;
        let rest = &k[schema::ALARM_PREFIX.len()..];
        let (m, a) = match (rest.get(..8), rest.get(8..)) {
            (Some(m), Some(a)) if a.len() == 4 => (m, a),
            _ => return Err(StorageError::Corrupt(format!("bad alarm key {k:?}"))),
        };
        let member = u64::from_be_bytes(m.try_into().unwrap_or_default());
        let alarm = i32::from_be_bytes(a.try_into().unwrap_or_default());
        out.insert((member, alarm));
    }
    Ok(out)
}

/// True if `req` (Put, LeaseGrant, or a Txn with a put anywhere) needs space, so a `NOSPACE`
/// alarm refuses it.
pub fn needs_space(op: &WriteOp) -> bool {
    match op {
        WriteOp::Put(_) | WriteOp::LeaseGrant(..) => true,
        WriteOp::Txn(t) => txn_has_put(t),
        _ => false,
    }
}

/// True if `op` is refused while a `CORRUPT` alarm is active.
pub fn refused_when_corrupt(op: &WriteOp) -> bool {
    match op {
        WriteOp::Put(_)
        | WriteOp::DeleteRange(_)
        | WriteOp::Compaction(_)
        | WriteOp::LeaseGrant(..)
        | WriteOp::LeaseRevoke(_) => true,
        WriteOp::Txn(t) => !crate::ops::is_txn_read_only(t),
        _ => false,
    }
}

fn txn_has_put(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .any(|op| match &op.request {
            Some(Request::RequestPut(_)) => true,
            Some(Request::RequestTxn(t)) => txn_has_put(t),
            _ => false,
        })
}

/// Applies an ACTIVATE or DEACTIVATE to `alarms` (a GET changes nothing). As etcd's
/// `applyAlarm`, the answer lists the alarm after every ACTIVATE (even of an active one) and after
/// a DEACTIVATE that removed it. Returns whether the set changed.
pub(crate) fn apply(alarms: &mut AlarmSet, req: &AlarmRequest) -> (AlarmResponse, bool) {
    let mut resp = AlarmResponse::default();
    let entry = (req.member_id, req.alarm);
    let (changed, report) = match AlarmAction::try_from(req.action) {
        Ok(AlarmAction::Activate) if req.alarm != AlarmType::None as i32 => {
            (alarms.insert(entry), true)
        }
        Ok(AlarmAction::Deactivate) => {
            let removed = alarms.remove(&entry);
            (removed, removed)
        }
        _ => (false, false),
    };
    if report {
        resp.alarms.push(AlarmMember {
            member_id: req.member_id,
            alarm: req.alarm,
        });
    }
    (resp, changed)
}

impl KvStore {
    /// The active alarms of type `alarm` (every alarm for `NONE`), ordered by member.
    pub fn alarms(&self, alarm: AlarmType) -> Vec<AlarmMember> {
        self.alarm_set()
            .iter()
            .filter(|(_, a)| alarm == AlarmType::None || *a == alarm as i32)
            .map(|&(member_id, alarm)| AlarmMember { member_id, alarm })
            .collect()
    }

    /// True while some member's `NOSPACE` alarm is active.
    pub fn no_space(&self) -> bool {
        has_alarm(&self.alarm_set(), AlarmType::Nospace)
    }
}

/// True if some member's `alarm` is in `alarms`.
pub(crate) fn has_alarm(alarms: &AlarmSet, alarm: AlarmType) -> bool {
    alarms.iter().any(|(_, a)| *a == alarm as i32)
}

/// etcd's text for an active alarm in `StatusResponse.errors` and `etcdctl alarm list`: the
/// protobuf compact text of `AlarmMember`, trailing space included.
pub fn alarm_text(a: &AlarmMember) -> String {
    let name = AlarmType::try_from(a.alarm)
        .map(|t| t.as_str_name().to_string())
        .unwrap_or_else(|_| a.alarm.to_string());
    format!("memberID:{} alarm:{} ", a.member_id, name)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use fetcd_proto::etcdserverpb::PutRequest;
    use fetcd_proto::etcdserverpb::RangeRequest;

    use super::*;
    use crate::KvError;
    use crate::WriteResponse;

    fn nospace(action: AlarmAction) -> WriteOp {
        WriteOp::Alarm(AlarmRequest {
            action: action as i32,
            member_id: 7,
            alarm: AlarmType::Nospace as i32,
        })
    }

    fn put(k: &[u8]) -> WriteOp {
        WriteOp::Put(PutRequest {
            key: k.to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        })
    }

    #[test]
    fn nospace_caps_writes_persists_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv");
        {
            let store = KvStore::open_path(&path).unwrap();
            let out = store
                .apply(vec![
                    (put(b"a"), b"1".to_vec()),
                    (nospace(AlarmAction::Activate), b"2".to_vec()),
                    (put(b"b"), b"3".to_vec()),
                ])
                .unwrap();
            assert!(matches!(out[1], Ok(WriteResponse::Alarm(ref r)) if r.alarms.len() == 1));
            assert_eq!(out[2], Err(KvError::NoSpace), "refused in the same batch");
            assert!(store.no_space());
            assert_eq!(store.current_revision(), 2);
            assert_eq!(store.consistent_index().unwrap(), Some(b"3".to_vec()));
            store.flush().unwrap();
        }
        let store = KvStore::open_path(&path).unwrap();
        assert_eq!(
            store.alarms(AlarmType::None).len(),
            1,
            "alarm survives a reopen"
        );
        let out = store.apply(vec![(put(b"c"), b"4".to_vec())]).unwrap();
        assert_eq!(out[0], Err(KvError::NoSpace));
        let out = store
            .apply(vec![
                (nospace(AlarmAction::Deactivate), b"5".to_vec()),
                (put(b"c"), b"6".to_vec()),
            ])
            .unwrap();
        assert!(out[1].is_ok());
        assert!(store.alarms(AlarmType::None).is_empty());
        let r = store
            .range(&RangeRequest {
                key: b"c".to_vec(),
                ..Default::default()
            })
            .unwrap()
            .unwrap();
        assert_eq!(r.kvs.len(), 1);
    }

    #[test]
    fn activate_twice_reports_once_and_deactivate_clears() {
        let mut set = AlarmSet::new();
        let req = |action: AlarmAction| AlarmRequest {
            action: action as i32,
            member_id: 7,
            alarm: AlarmType::Nospace as i32,
        };
        let (r, changed) = apply(&mut set, &req(AlarmAction::Activate));
        assert!(changed && r.alarms.len() == 1);
        let (r, changed) = apply(&mut set, &req(AlarmAction::Activate));
        assert!(!changed && r.alarms.len() == 1);
        let (r, changed) = apply(&mut set, &req(AlarmAction::Deactivate));
        assert!(changed && r.alarms.len() == 1 && set.is_empty());
        assert_eq!(
            alarm_text(&AlarmMember {
                member_id: 7,
                alarm: AlarmType::Nospace as i32
            }),
            "memberID:7 alarm:NOSPACE "
        );
    }
}
