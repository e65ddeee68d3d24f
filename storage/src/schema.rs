//! Names of sled trees and meta keys: the on-disk contract of this crate.

/// Every revision of every key, in blocks of consecutive revisions keyed by their first one
/// (layout: `crate::key_tree`).
pub const KEY_TREE: &str = "key";
/// Leases: 8-byte big-endian lease ID → lease record (`crate::lease`).
pub const LEASE_TREE: &str = "lease";
/// Small records about the store itself.
pub const META_TREE: &str = "meta";
/// Meta key: the Raft layer's applied marker, written with the data it covers.
pub const CONSISTENT_INDEX: &str = "consistent_index";
/// Meta key: a compaction that was decided (8-byte big-endian revision).
pub const SCHEDULED_COMPACT_REV: &str = "scheduled_compact_rev";
/// Meta key: the last compaction whose physical deletion completed.
pub const FINISHED_COMPACT_REV: &str = "finished_compact_rev";
/// Meta key prefix: `member/` + 8-byte big-endian member id → protobuf `etcdserverpb.Member`
/// (the member's name and URLs).
pub const MEMBER_PREFIX: &[u8] = b"member/";
/// Meta key prefix of the active alarms: prefix + 8-byte big-endian member id + 4-byte big-endian
/// alarm type → empty value.
pub const ALARM_PREFIX: &str = "alarm/";
