//! Test-only faults (the `fault-injection` cargo feature): links between members, and a
//! leader's log syncs.
//!
//! Partitions and slow links are what Raft's guarantees are about, and in-process clusters share
//! one loopback: a test cuts or slows the path from one member to another peer URL here. A cut
//! refuses every peer request that member makes (replication, votes, snapshots, forwarded
//! writes, read indexes, membership changes, lease and hash requests); a delay holds Raft's own
//! requests (all of those but the lease and hash requests). A cut is one direction; a partition
//! is both. Requests already in flight finish.
//!
//! A member's log syncs can be held as well ([`hold_log_syncs`]): the syncs its Raft log makes
//! beside replication while it leads several voters ([`crate::durable`]), or off its worker
//! thread as any other member of several voters, wait until released, as behind a stalled disk,
//! so a test can see what a member shows of entries not yet durable on its own disk.
//!
//! The rules are process-wide, keyed by the sending member's id and the receiver's peer URL (as
//! in the membership), so that members of one in-process cluster see one network. Only the test
//! crate turns the feature on, and the workspace's default members leave that crate out, so a
//! server built with `cargo build`/`cargo run --bin fetcd` or `-p fetcd-server` has none of this.

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::time::Duration;

use crate::NodeId;

/// What happens to a request from one member to one peer URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Refused at once, as by a peer that cannot be reached.
    Cut,
    /// Sent after this long, as over a slow link.
    Delay(Duration),
}

static RULES: Mutex<Option<HashMap<(NodeId, String), Fault>>> = Mutex::new(None);
/// Set while any rule exists, so that a request does not take the lock when there is none.
static ANY: AtomicBool = AtomicBool::new(false);

fn rules() -> MutexGuard<'static, Option<HashMap<(NodeId, String), Fault>>> {
    RULES.lock().unwrap_or_else(|p| p.into_inner())
}

/// From now on, requests from member `from` to the peer at `to` meet `fault`.
pub fn set(from: NodeId, to: &str, fault: Fault) {
    rules()
        .get_or_insert_with(HashMap::new)
        .insert((from, to.to_string()), fault);
    ANY.store(true, Ordering::SeqCst);
}

/// Requests from member `from` to the peer at `to` go through normally again.
pub fn heal(from: NodeId, to: &str) {
    let mut r = rules();
    if let Some(map) = r.as_mut() {
        map.remove(&(from, to.to_string()));
        ANY.store(!map.is_empty(), Ordering::SeqCst);
    }
}

/// Every rule is lifted.
pub fn heal_all() {
    *rules() = None;
    ANY.store(false, Ordering::SeqCst);
}

/// The fault requests from `from` to `to` meet now, if any.
pub fn get(from: NodeId, to: &str) -> Option<Fault> {
    if !ANY.load(Ordering::SeqCst) {
        return None;
    }
    rules()
        .as_ref()
        .and_then(|m| m.get(&(from, to.to_string())).copied())
}

static HELD_SYNCS: Mutex<BTreeSet<NodeId>> = Mutex::new(BTreeSet::new());
static SYNCS_RELEASED: Condvar = Condvar::new();

fn held_syncs() -> MutexGuard<'static, BTreeSet<NodeId>> {
    HELD_SYNCS.lock().unwrap_or_else(|p| p.into_inner())
}

/// From now on, member `member`'s leader log syncs wait before they start (see the module
/// documentation); a sync already started completes.
pub fn hold_log_syncs(member: NodeId) {
    held_syncs().insert(member);
}

/// Member `member`'s held log syncs go ahead.
pub fn release_log_syncs(member: NodeId) {
    held_syncs().remove(&member);
    SYNCS_RELEASED.notify_all();
}

/// Blocks the calling (sync) thread while `member`'s syncs are held.
pub(crate) fn wait_log_syncs_released(member: NodeId) {
    let mut held = held_syncs();
    while held.contains(&member) {
        held = SYNCS_RELEASED.wait(held).unwrap_or_else(|p| p.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_one_way_and_lift() {
        heal_all();
        set(1, "http://b", Fault::Cut);
        set(1, "http://c", Fault::Delay(Duration::from_millis(5)));
        assert_eq!(get(1, "http://b"), Some(Fault::Cut));
        assert_eq!(
            get(2, "http://b"),
            None,
            "another member's path is untouched"
        );
        assert_eq!(
            get(1, "http://c"),
            Some(Fault::Delay(Duration::from_millis(5)))
        );
        heal(1, "http://b");
        assert_eq!(get(1, "http://b"), None);
        assert_eq!(
            get(1, "http://c"),
            Some(Fault::Delay(Duration::from_millis(5)))
        );
        heal_all();
        assert_eq!(get(1, "http://c"), None);
    }
}
