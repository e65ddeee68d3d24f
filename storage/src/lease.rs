//! Leases as replicated state (the half of etcd's `lease` package that lives in the backend):
//! which leases exist, the TTL each was granted, the checkpointed remaining TTL, and which keys
//! are attached.
//!
//! Expiry timing is deliberately not here. Every member holds the same lease table because it is
//! changed only by applied Raft entries (grant, revoke, checkpoint) and by the puts and deletes
//! that attach and detach keys. Only the leader's lessor (in the server) watches the clock, and it
//! revokes an expired lease by proposing a revoke, so no member ever deletes on its own clock.
//!
//! Persistence: the `lease` tree maps the lease ID to a [`Lease`] record, written in the same sled
//! transaction as the revision that granted, revoked or checkpointed it. Attachments are not
//! stored separately: a key's lease is in its latest `KeyValue`, and the index is rebuilt from
//! there on open, as etcd's lessor does.

use std::collections::BTreeSet;
use std::collections::HashMap;

use crate::StorageError;

/// etcd's `MaxLeaseTTL`: the largest TTL a grant may ask for, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// Who recorded a lease's remaining TTL, and when by that member's wall clock.
///
/// A member that finds its own stamp after a restart can count down the time it was down
/// (same clock), so a lease that ran out meanwhile is revoked at once instead of living another
/// full TTL. Another member's stamp is never compared with the local clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseStamp {
    /// The member that proposed the grant or checkpoint.
    pub member: u64,
    /// Its wall clock then, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

/// One lease as every member stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The lease ID.
    pub id: i64,
    /// The granted TTL in seconds (already raised to the minimum by whoever proposed it).
    pub ttl: i64,
    /// The remaining TTL in seconds at `stamp` (etcd's checkpointed `remainingTTL`); 0 when no
    /// countdown is recorded, in which case a new leader grants the full TTL again.
    pub remaining_ttl: i64,
    /// When `remaining_ttl` was recorded; `None` when it is 0.
    pub stamp: Option<LeaseStamp>,
}

const RECORD_VERSION: u8 = 1;
const RECORD_LEN: usize = 1 + 8 * 4;

impl Lease {
    /// The `lease` tree key: the ID, big-endian, so the tree iterates in ID order.
    pub(crate) fn tree_key(id: i64) -> [u8; 8] {
        id.to_be_bytes()
    }

    /// The stored record: version, ttl, remaining ttl, stamp member, stamp time (0, 0 = none).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let (member, unix_ms) = self.stamp.map_or((0, 0), |s| (s.member, s.unix_ms));
        let mut out = Vec::with_capacity(RECORD_LEN);
        out.push(RECORD_VERSION);
        out.extend_from_slice(&self.ttl.to_be_bytes());
        out.extend_from_slice(&self.remaining_ttl.to_be_bytes());
        out.extend_from_slice(&member.to_be_bytes());
        out.extend_from_slice(&unix_ms.to_be_bytes());
        out
    }

    /// Decodes a `lease` tree entry.
    pub(crate) fn decode(key: &[u8], value: &[u8]) -> Result<Lease, StorageError> {
        let corrupt = || StorageError::Corrupt(format!("bad lease record {key:?} = {value:?}"));
        let id = i64::from_be_bytes(key.try_into().map_err(|_| corrupt())?);
        if value.len() != RECORD_LEN || value[0] != RECORD_VERSION {
            return Err(corrupt());
        }
        let word = |i: usize| -> [u8; 8] {
            let mut b = [0u8; 8];
            b.copy_from_slice(&value[1 + 8 * i..9 + 8 * i]);
            b
        };
        let member = u64::from_be_bytes(word(2));
        let unix_ms = u64::from_be_bytes(word(3));
        Ok(Lease {
            id,
            ttl: i64::from_be_bytes(word(0)),
            remaining_ttl: i64::from_be_bytes(word(1)),
            stamp: (member != 0 || unix_ms != 0).then_some(LeaseStamp { member, unix_ms }),
        })
    }
}

/// The committed lease table with its key attachments (etcd's `leaseMap` + `itemMap`).
#[derive(Debug, Default)]
pub(crate) struct LeaseIndex {
    pub(crate) leases: HashMap<i64, LeaseEntry>,
    /// Key → its lease, for keys attached to one. A put or delete looks up the key's old lease
    /// here instead of loading the previous value.
    pub(crate) key_lease: HashMap<Vec<u8>, i64>,
    /// Bumped whenever a lease is granted or revoked, so the lessor notices without diffing.
    pub(crate) epoch: u64,
}

/// One lease and its attached keys.
#[derive(Debug)]
pub(crate) struct LeaseEntry {
    pub(crate) lease: Lease,
    pub(crate) keys: BTreeSet<Vec<u8>>,
}

impl LeaseIndex {
    /// Publishes a write transaction's lease changes: lease records first (grants, checkpoints,
    /// revokes), then key attachments, so a key attached to a lease granted in the same
    /// transaction finds it.
    pub(crate) fn publish(
        &mut self,
        leases: HashMap<i64, Option<Lease>>,
        key_lease: HashMap<Vec<u8>, i64>,
    ) {
        for (id, lease) in leases {
            match lease {
                Some(l) => match self.leases.get_mut(&id) {
                    Some(e) => e.lease = l,
                    None => {
                        self.leases.insert(
                            id,
                            LeaseEntry {
                                lease: l,
                                keys: BTreeSet::new(),
                            },
                        );
                        self.epoch += 1;
                    }
                },
                None => {
                    if self.leases.remove(&id).is_some() {
                        self.epoch += 1;
                    }
                }
            }
        }
        for (key, new) in key_lease {
            self.attach(key, new);
        }
    }

    /// Moves `key` to lease `new` (0 = none), detaching it from its old lease.
    pub(crate) fn attach(&mut self, key: Vec<u8>, new: i64) {
        let old = self.key_lease.get(&key).copied().unwrap_or(0);
        if old == new {
            return;
        }
        if let Some(e) = self.leases.get_mut(&old) {
            e.keys.remove(&key);
        }
        match self.leases.get_mut(&new) {
            Some(e) if new != 0 => {
                e.keys.insert(key.clone());
                self.key_lease.insert(key, new);
            }
            // Detached, or a lease that no longer exists (only possible in a store restored from
            // data written by a member that had revoked it; etcd ignores those too).
            _ => {
                self.key_lease.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn record_round_trips_with_and_without_stamp() {
        for lease in [
            Lease {
                id: 0x694d_1234,
                ttl: 60,
                remaining_ttl: 0,
                stamp: None,
            },
            Lease {
                id: -5,
                ttl: 3600,
                remaining_ttl: 1800,
                stamp: Some(LeaseStamp {
                    member: 0x8e9e_05c5_2164_694d,
                    unix_ms: 1_790_000_000_000,
                }),
            },
        ] {
            let k = Lease::tree_key(lease.id);
            assert_eq!(Lease::decode(&k, &lease.encode()).unwrap(), lease);
        }
        assert!(Lease::decode(&7i64.to_be_bytes(), &[9, 9]).is_err());
    }

    #[test]
    fn attach_moves_keys_between_leases_and_ignores_unknown_ones() {
        let mut ix = LeaseIndex::default();
        let l = |id| {
            Some(Lease {
                id,
                ttl: 10,
                remaining_ttl: 0,
                stamp: None,
            })
        };
        ix.publish(
            HashMap::from([(1, l(1)), (2, l(2))]),
            HashMap::from([(b"a".to_vec(), 1), (b"b".to_vec(), 1)]),
        );
        assert_eq!(ix.epoch, 2);
        assert_eq!(ix.leases[&1].keys.len(), 2);
        ix.attach(b"a".to_vec(), 2);
        assert_eq!(ix.leases[&1].keys.len(), 1);
        assert!(ix.leases[&2].keys.contains(b"a".as_slice()));
        ix.attach(b"b".to_vec(), 0);
        assert!(ix.leases[&1].keys.is_empty());
        assert!(!ix.key_lease.contains_key(b"b".as_slice()));
        ix.attach(b"c".to_vec(), 42);
        assert!(!ix.key_lease.contains_key(b"c".as_slice()));
        ix.publish(HashMap::from([(2, None)]), HashMap::new());
        assert_eq!(ix.epoch, 3);
        assert!(!ix.leases.contains_key(&2));
    }
}
