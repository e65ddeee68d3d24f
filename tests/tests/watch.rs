//! Differential tests of the Watch service (etcd 3.4 semantics): every scenario runs against a
//! fresh real etcd and a fresh candidate; the normalized watch responses (header revision,
//! watch_id, created, canceled, compact_revision, cancel_reason, fragment, events with kv and
//! prev_kv) must be identical, and each scenario asserts etcd's behaviour in absolute terms.
//! Every wait is bounded: 5 s per expected response, 300 ms to conclude "nothing more".
//!
//! Plus `concurrent_writers_and_watchers`: not differential; checks the watch guarantees
//! (ordered, unique, gap-free, atomic per revision, correct prev_kv) on the candidate under
//! concurrent writes.
//!
//! Run etcd vs etcd: `FETCD_TESTS_CANDIDATE=etcd cargo test -p fetcd-tests --test watch`.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn,
    TxnOp, TxnOpResponse,
};
use fetcd_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use fetcd_proto::mvccpb::{Event, KeyValue};
use fetcd_tests::watch::{
    create_request, event_tuple, events, header_revision, progress_request, watch_from_key,
    watch_key, watch_prefix, watch_range, watch_response, CreateExt, Received, WatchConn, DELETE,
    PUT, QUIET_PERIOD,
};
use fetcd_tests::{run_differential, Session, TargetKind};

const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
const EMPTY_RANGE: &str = "mvcc: watcher range is empty";

type Ev<'a> = (i32, &'a str, &'a str, i64, i64, i64);

/// `(type, key, value, create_revision, mod_revision, version)` of each event.
fn ensure_events(r: &WatchResponse, want: &[Ev<'_>], what: &str) -> Result<()> {
    let got: Vec<_> = r.events.iter().map(event_tuple).collect();
    let want: Vec<_> = want
        .iter()
        .map(|&(t, k, v, c, m, ver)| (t, k.to_owned(), v.to_owned(), c, m, ver))
        .collect();
    ensure!(got == want, "{what}: events {got:?}, want {want:?}");
    Ok(())
}

fn ensure_event_list(got: &[Event], want: &[Ev<'_>], what: &str) -> Result<()> {
    let got: Vec<_> = got.iter().map(event_tuple).collect();
    let want: Vec<_> = want
        .iter()
        .map(|&(t, k, v, c, m, ver)| (t, k.to_owned(), v.to_owned(), c, m, ver))
        .collect();
    ensure!(got == want, "{what}: events {got:?}, want {want:?}");
    Ok(())
}

/// A plain event response of watcher `id` at header revision `rev`.
fn ensure_event_response(r: &WatchResponse, id: i64, rev: i64, what: &str) -> Result<()> {
    ensure!(
        r.watch_id == id
            && header_revision(r) == rev
            && !r.created
            && !r.canceled
            && r.compact_revision == 0
            && r.cancel_reason.is_empty()
            && !r.fragment,
        "{what}: want an event response of watch {id} at revision {rev}, got {}",
        watch_response(r)
    );
    Ok(())
}

fn ensure_created(r: &WatchResponse, id: i64, rev: i64, what: &str) -> Result<()> {
    ensure!(
        r.created
            && !r.canceled
            && r.watch_id == id
            && header_revision(r) == rev
            && r.events.is_empty()
            && r.compact_revision == 0
            && r.cancel_reason.is_empty(),
        "{what}: want created watch {id} at revision {rev}, got {}",
        watch_response(r)
    );
    Ok(())
}

fn ensure_canceled(r: &WatchResponse, id: i64, rev: i64, what: &str) -> Result<()> {
    ensure!(
        r.canceled
            && !r.created
            && r.watch_id == id
            && header_revision(r) == rev
            && r.events.is_empty()
            && r.compact_revision == 0
            && r.cancel_reason.is_empty(),
        "{what}: want cancel of watch {id} at revision {rev}, got {}",
        watch_response(r)
    );
    Ok(())
}

/// etcd 3.4's answer to a create request it refuses: `created` and `canceled` both set,
/// `watch_id` -1, the mvcc error text as `cancel_reason`.
fn ensure_refused(r: &WatchResponse, rev: i64, reason: &str, what: &str) -> Result<()> {
    ensure!(
        r.created
            && r.canceled
            && r.watch_id == -1
            && header_revision(r) == rev
            && r.cancel_reason == reason
            && r.events.is_empty(),
        "{what}: want refused create ({reason:?}) at revision {rev}, got {}",
        watch_response(r)
    );
    Ok(())
}

/// etcd 3.4's answer to a watch whose start revision is compacted: `canceled`,
/// `compact_revision` set, the watch's own id, **header.revision 0** (the mvcc response has no
/// revision), no `cancel_reason`.
fn ensure_compacted(r: &WatchResponse, id: i64, compact: i64, what: &str) -> Result<()> {
    ensure!(
        r.canceled
            && !r.created
            && r.watch_id == id
            && r.compact_revision == compact
            && header_revision(r) == 0
            && r.cancel_reason.is_empty()
            && r.events.is_empty(),
        "{what}: want compacted-cancel of watch {id} at compact revision {compact}, got {}",
        watch_response(r)
    );
    Ok(())
}

/// Progress response: watch_id -1, no flags, no events, header at `rev`.
fn ensure_progress(r: &WatchResponse, rev: i64, what: &str) -> Result<()> {
    ensure!(
        r.watch_id == -1
            && header_revision(r) == rev
            && !r.created
            && !r.canceled
            && r.events.is_empty()
            && r.compact_revision == 0,
        "{what}: want a progress response (watch_id -1) at revision {rev}, got {}",
        watch_response(r)
    );
    Ok(())
}

fn prev_of(e: &Event) -> Option<(String, String, i64, i64, i64)> {
    e.prev_kv.as_ref().map(|p| {
        (
            String::from_utf8_lossy(&p.key).into_owned(),
            String::from_utf8_lossy(&p.value).into_owned(),
            p.create_revision,
            p.mod_revision,
            p.version,
        )
    })
}

fn ensure_prev(e: &Event, want: Option<(&str, &str, i64, i64, i64)>, what: &str) -> Result<()> {
    let want = want.map(|(k, v, c, m, ver)| (k.to_owned(), v.to_owned(), c, m, ver));
    let got = prev_of(e);
    ensure!(got == want, "{what}: prev_kv {got:?}, want {want:?}");
    Ok(())
}

fn by_id(rs: &[WatchResponse], id: i64) -> Vec<&WatchResponse> {
    rs.iter().filter(|r| r.watch_id == id).collect()
}

fn ids(rs: &[WatchResponse]) -> Vec<i64> {
    rs.iter().map(|r| r.watch_id).collect()
}

fn op_put(k: &str, v: &str) -> TxnOp {
    TxnOp::put(k, v, None)
}

// ---------------------------------------------------------------------------------------------
// 1. Live events on a key, a prefix, a range, from-key and all keys
// ---------------------------------------------------------------------------------------------

async fn live_events_scenario(s: &mut Session) -> Result<()> {
    // The key watcher goes through etcd-client's own watch API; the others are raw streams.
    let mut w_key = s
        .watch_with_client("etcd-client watch foo", "foo", None)
        .await?;
    let r = s.watch_recv("created foo", &mut w_key).await?;
    ensure_created(&r, 0, 1, "watch foo")?;
    let mut w_pre = s
        .watch_create("watch prefix foo/", watch_prefix("foo/"))
        .await?;
    let r = s.watch_recv("created foo/", &mut w_pre).await?;
    ensure_created(&r, 0, 1, "watch foo/")?;
    let mut w_from = s
        .watch_create("watch from-key m", watch_from_key("m"))
        .await?;
    let r = s.watch_recv("created from m", &mut w_from).await?;
    ensure_created(&r, 0, 1, "watch from m")?;
    // Empty key + range_end "\0": every key.
    let mut w_all = s.watch_create("watch all keys", watch_from_key("")).await?;
    let r = s.watch_recv("created all", &mut w_all).await?;
    ensure_created(&r, 0, 1, "watch all")?;
    let mut w_range = s
        .watch_create("watch [foo, foo/b)", watch_range("foo", "foo/b"))
        .await?;
    let r = s.watch_recv("created range", &mut w_range).await?;
    ensure_created(&r, 0, 1, "watch range")?;
    for w in [
        &mut w_key,
        &mut w_pre,
        &mut w_from,
        &mut w_all,
        &mut w_range,
    ] {
        s.watch_quiet("nothing before the first write", w).await?;
    }

    s.put("rev2 put foo=1", "foo", "1", None).await?;
    s.put("rev3 put foo/a=1", "foo/a", "1", None).await?;
    s.put("rev4 put foo=2", "foo", "2", None).await?;
    s.put("rev5 put n=1", "n", "1", None).await?;
    s.delete("rev6 delete foo", "foo", None).await?;
    let r = s
        .delete("delete missing: no revision", "missing", None)
        .await?;
    ensure!(r.deleted() == 0);
    let r = s
        .txn(
            "rev7 txn put foo/b, put z, delete foo/a",
            Txn::new()
                .when(vec![Compare::version("foo/a", CompareOp::Greater, 0)])
                .and_then(vec![
                    op_put("foo/b", "2"),
                    op_put("z", "1"),
                    TxnOp::delete("foo/a", None),
                ]),
        )
        .await?;
    ensure!(r.succeeded());
    let r = s
        .txn(
            "rev8 txn failing compare, else put foo=else",
            Txn::new()
                .when(vec![Compare::value("foo", CompareOp::Equal, "x")])
                .and_then(vec![op_put("never", "1")])
                .or_else(vec![op_put("foo", "else")]),
        )
        .await?;
    ensure!(!r.succeeded());
    s.txn(
        "read-only txn: no revision",
        Txn::new().and_then(vec![TxnOp::get("foo", None)]),
    )
    .await?;
    s.put("rev9 put foo/a=again (re-created)", "foo/a", "again", None)
        .await?;
    s.txn(
        "rev10 nested txn put foo/c, (put foo/d)",
        Txn::new().and_then(vec![
            op_put("foo/c", "1"),
            TxnOp::txn(Txn::new().and_then(vec![op_put("foo/d", "1")])),
        ]),
    )
    .await?;
    let r = s
        .put("rev11 put foo/a=again (same value)", "foo/a", "again", None)
        .await?;
    ensure!(r.header().unwrap().revision() == 11);

    // foo: revisions 2, 4, 6, 8.
    let r = s.watch_recv("foo @2", &mut w_key).await?;
    ensure_event_response(&r, 0, 2, "foo @2")?;
    ensure_events(&r, &[(PUT, "foo", "1", 2, 2, 1)], "foo @2")?;
    let r = s.watch_recv("foo @4", &mut w_key).await?;
    ensure_events(&r, &[(PUT, "foo", "2", 2, 4, 2)], "foo @4")?;
    let r = s.watch_recv("foo @6", &mut w_key).await?;
    // A DELETE event's kv is the bare key at the delete's revision.
    ensure_events(&r, &[(DELETE, "foo", "", 0, 6, 0)], "foo @6")?;
    ensure!(r.events[0].prev_kv.is_none(), "prev_kv without asking");
    let r = s.watch_recv("foo @8", &mut w_key).await?;
    ensure_events(&r, &[(PUT, "foo", "else", 8, 8, 1)], "foo @8")?;
    s.watch_quiet("foo: nothing more", &mut w_key).await?;

    // foo/: revisions 3, 7, 9, 10, 11.
    let r = s.watch_recv("foo/ @3", &mut w_pre).await?;
    ensure_events(&r, &[(PUT, "foo/a", "1", 3, 3, 1)], "foo/ @3")?;
    let r = s.watch_recv("foo/ @7", &mut w_pre).await?;
    ensure_event_response(&r, 0, 7, "foo/ @7")?;
    ensure_events(
        &r,
        &[(PUT, "foo/b", "2", 7, 7, 1), (DELETE, "foo/a", "", 0, 7, 0)],
        "foo/ @7 (txn order)",
    )?;
    let r = s.watch_recv("foo/ @9", &mut w_pre).await?;
    ensure_events(&r, &[(PUT, "foo/a", "again", 9, 9, 1)], "foo/ @9")?;
    let r = s.watch_recv("foo/ @10", &mut w_pre).await?;
    ensure_events(
        &r,
        &[
            (PUT, "foo/c", "1", 10, 10, 1),
            (PUT, "foo/d", "1", 10, 10, 1),
        ],
        "foo/ @10 (nested txn)",
    )?;
    let r = s.watch_recv("foo/ @11", &mut w_pre).await?;
    ensure_events(&r, &[(PUT, "foo/a", "again", 9, 11, 2)], "foo/ @11")?;
    s.watch_quiet("foo/: nothing more", &mut w_pre).await?;

    // >= m: revisions 5, 7.
    let r = s.watch_recv("from m @5", &mut w_from).await?;
    ensure_events(&r, &[(PUT, "n", "1", 5, 5, 1)], "from m @5")?;
    let r = s.watch_recv("from m @7", &mut w_from).await?;
    ensure_events(&r, &[(PUT, "z", "1", 7, 7, 1)], "from m @7")?;
    s.watch_quiet("from m: nothing more", &mut w_from).await?;

    // all keys: one response per revision 2..=11.
    for rev in 2..=11 {
        let r = s.watch_recv(&format!("all @{rev}"), &mut w_all).await?;
        ensure_event_response(&r, 0, rev, "all")?;
        ensure!(
            r.events
                .iter()
                .all(|e| e.kv.as_ref().unwrap().mod_revision == rev),
            "all @{rev}: {}",
            watch_response(&r)
        );
        if rev == 7 {
            ensure_events(
                &r,
                &[
                    (PUT, "foo/b", "2", 7, 7, 1),
                    (PUT, "z", "1", 7, 7, 1),
                    (DELETE, "foo/a", "", 0, 7, 0),
                ],
                "all @7",
            )?;
        }
    }
    s.watch_quiet("all: nothing more", &mut w_all).await?;

    // [foo, foo/b): revisions 2, 3, 4, 6, 7 (only the delete of foo/a), 8, 9, 11.
    for rev in [2, 3, 4, 6, 7, 8, 9, 11] {
        let r = s.watch_recv(&format!("range @{rev}"), &mut w_range).await?;
        ensure_event_response(&r, 0, rev, "range")?;
        if rev == 7 {
            ensure_events(&r, &[(DELETE, "foo/a", "", 0, 7, 0)], "range @7")?;
        }
    }
    s.watch_quiet("range: nothing more", &mut w_range).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events() -> Result<()> {
    run_differential("watch live events", live_events_scenario).await
}

// ---------------------------------------------------------------------------------------------
// 2. Start revision in the past: replay, then live; compaction
// ---------------------------------------------------------------------------------------------

async fn history_scenario(s: &mut Session) -> Result<()> {
    s.put("rev2 put a=1", "a", "1", None).await?;
    s.put("rev3 put b=1", "b", "1", None).await?;
    s.put("rev4 put a=2", "a", "2", None).await?;
    s.delete("rev5 delete a", "a", None).await?;
    s.put("rev6 put a=3", "a", "3", None).await?;
    s.txn(
        "rev7 txn put a=4, c=1",
        Txn::new().and_then(vec![op_put("a", "4"), op_put("c", "1")]),
    )
    .await?;

    let a_history: [Ev<'_>; 5] = [
        (PUT, "a", "1", 2, 2, 1),
        (PUT, "a", "2", 2, 4, 2),
        (DELETE, "a", "", 0, 5, 0),
        (PUT, "a", "3", 6, 6, 1),
        (PUT, "a", "4", 6, 7, 2),
    ];

    // The created response comes first (header = current revision), then the replay. How the
    // replay is batched is not compared here (see `replay_batching_exact`).
    let mut w1 = s
        .watch_create("watch a from rev 2", watch_key("a").rev(2))
        .await?;
    let r = s.watch_recv("a from 2: created", &mut w1).await?;
    ensure_created(&r, 0, 7, "a from 2")?;
    let evs = s.watch_events("a from 2: replay", &mut w1, 5).await?;
    ensure_event_list(&evs, &a_history, "a from 2 replay")?;
    s.watch_quiet("a from 2: replay complete", &mut w1).await?;

    let mut w2 = s
        .watch_create(
            "watch all from rev 4 prev_kv",
            watch_from_key("").rev(4).prev_kv(),
        )
        .await?;
    let r = s.watch_recv("all from 4: created", &mut w2).await?;
    ensure_created(&r, 0, 7, "all from 4")?;
    let evs = s.watch_events("all from 4: replay", &mut w2, 5).await?;
    ensure_event_list(
        &evs,
        &[
            (PUT, "a", "2", 2, 4, 2),
            (DELETE, "a", "", 0, 5, 0),
            (PUT, "a", "3", 6, 6, 1),
            (PUT, "a", "4", 6, 7, 2),
            (PUT, "c", "1", 7, 7, 1),
        ],
        "all from 4 replay",
    )?;
    ensure_prev(&evs[0], Some(("a", "1", 2, 2, 1)), "replayed put")?;
    ensure_prev(&evs[1], Some(("a", "2", 2, 4, 2)), "replayed delete")?;
    ensure_prev(&evs[2], None, "replayed re-create")?;
    ensure_prev(&evs[3], Some(("a", "3", 6, 6, 1)), "replayed txn put")?;
    ensure_prev(&evs[4], None, "replayed create")?;
    s.watch_quiet("all from 4: replay complete", &mut w2)
        .await?;

    let mut w3 = s
        .watch_create("watch a from current rev 7", watch_key("a").rev(7))
        .await?;
    let r = s.watch_recv("a from 7: created", &mut w3).await?;
    ensure_created(&r, 0, 7, "a from 7")?;
    let evs = s.watch_events("a from 7: replay", &mut w3, 1).await?;
    ensure_event_list(&evs, &a_history[4..], "a from 7")?;

    let mut w4 = s
        .watch_create("watch b from rev 1", watch_key("b").rev(1))
        .await?;
    let r = s.watch_recv("b from 1: created", &mut w4).await?;
    ensure_created(&r, 0, 7, "b from 1")?;
    let evs = s.watch_events("b from 1: replay", &mut w4, 1).await?;
    ensure_event_list(&evs, &[(PUT, "b", "1", 3, 3, 1)], "b from 1")?;

    // etcd 3.4 accepts a negative start revision: the watcher starts unsynced, its first
    // (empty: revision -1 encodes above every real revision) catch-up read replays nothing,
    // and it then follows live events. After a compaction it is a compacted watch (below).
    let mut w5 = s
        .watch_create("watch a from rev -1", watch_key("a").rev(-1))
        .await?;
    let r = s.watch_recv("a from -1: created", &mut w5).await?;
    ensure_created(&r, 0, 7, "a from -1")?;
    s.watch_quiet("a from -1: no replay", &mut w5).await?;

    // Live events continue right after the replay: no gap, no duplicate.
    s.put("rev8 put a=5", "a", "5", None).await?;
    for (name, w) in [
        ("a from 2", &mut w1),
        ("all from 4", &mut w2),
        ("a from 7", &mut w3),
        ("a from -1", &mut w5),
    ] {
        let r = s.watch_recv(&format!("{name}: live @8"), w).await?;
        ensure_event_response(&r, 0, 8, name)?;
        ensure_events(&r, &[(PUT, "a", "5", 6, 8, 3)], name)?;
    }
    s.put("rev9 put b=2", "b", "2", None).await?;
    for (name, w) in [("all from 4", &mut w2), ("b from 1", &mut w4)] {
        let r = s.watch_recv(&format!("{name}: live @9"), w).await?;
        ensure_events(&r, &[(PUT, "b", "2", 3, 9, 2)], name)?;
    }
    for w in [&mut w1, &mut w2, &mut w3, &mut w4, &mut w5] {
        s.watch_quiet("no duplicates", w).await?;
    }

    // Compaction.
    s.put("rev10 put a=6", "a", "6", None).await?;
    s.delete("rev11 delete b", "b", None).await?;
    s.watch_recv("a from 2: @10", &mut w1).await?;
    s.watch_recv("all from 4: @10", &mut w2).await?;
    s.watch_recv("all from 4: @11", &mut w2).await?;
    s.watch_recv("a from 7: @10", &mut w3).await?;
    s.watch_recv("b from 1: @11", &mut w4).await?;
    s.watch_recv("a from -1: @10", &mut w5).await?;
    // Physical: etcd removes compacted revisions from its backend asynchronously; wait for it
    // so that what a watch from the compaction revision sees is deterministic.
    s.compact(
        "compact 10 physical",
        10,
        Some(CompactionOptions::new().with_physical()),
    )
    .await?;

    // Exactly at the compaction revision: works; the previous value (rev 8) is compacted, so
    // etcd omits prev_kv even though it was asked for.
    let mut w6 = s
        .watch_create(
            "watch a from compact rev 10 prev_kv",
            watch_key("a").rev(10).prev_kv(),
        )
        .await?;
    let r = s.watch_recv("a from 10: created", &mut w6).await?;
    ensure_created(&r, 0, 11, "a from 10")?;
    let evs = s.watch_events("a from 10: replay", &mut w6, 1).await?;
    ensure_event_list(&evs, &[(PUT, "a", "6", 6, 10, 4)], "a from 10")?;
    ensure_prev(&evs[0], None, "prev_kv of a compacted previous revision")?;

    // Below the compaction revision: created, then canceled with compact_revision.
    let mut w7 = s
        .watch_create("watch a from rev 9 (compacted)", watch_key("a").rev(9))
        .await?;
    let r = s.watch_recv("a from 9: created", &mut w7).await?;
    ensure_created(&r, 0, 11, "a from 9")?;
    let r = s.watch_recv("a from 9: compacted", &mut w7).await?;
    ensure_compacted(&r, 0, 10, "a from 9")?;
    s.watch_quiet("a from 9: nothing after the compaction cancel", &mut w7)
        .await?;
    // etcd 3.4 keeps the compacted watcher registered on the stream: cancelling it answers
    // like any cancel, and a new watch gets the next id.
    w7.cancel(0).await?;
    let r = s.watch_recv("cancel the compacted watch", &mut w7).await?;
    ensure_canceled(&r, 0, 11, "cancel compacted watch")?;
    w7.create(watch_from_key("").rev(-1)).await?;
    let r = s
        .watch_recv("all from -1 after compaction: created", &mut w7)
        .await?;
    ensure_created(&r, 1, 11, "all from -1")?;
    let r = s
        .watch_recv("all from -1 after compaction: compacted", &mut w7)
        .await?;
    ensure_compacted(&r, 1, 10, "all from -1")?;
    w7.create(watch_key("a").rev(1).prev_kv()).await?;
    let r = s.watch_recv("a from 1 prev_kv: created", &mut w7).await?;
    ensure_created(&r, 2, 11, "a from 1")?;
    let r = s.watch_recv("a from 1 prev_kv: compacted", &mut w7).await?;
    ensure_compacted(&r, 2, 10, "a from 1")?;
    s.watch_quiet("compacted watches stay silent", &mut w7)
        .await?;

    // A compaction at a delete drops the tombstone: watching from exactly that revision sees
    // nothing of it.
    s.compact(
        "compact 11 (the delete of b) physical",
        11,
        Some(CompactionOptions::new().with_physical()),
    )
    .await?;
    let mut w8 = s
        .watch_create("watch b from 11", watch_key("b").rev(11))
        .await?;
    let r = s.watch_recv("b from 11: created", &mut w8).await?;
    ensure_created(&r, 0, 11, "b from 11")?;
    s.watch_quiet("b from 11: the compacted delete is gone", &mut w8)
        .await?;
    w8.create(watch_from_key("").rev(11).prev_kv()).await?;
    let r = s.watch_recv("all from 11: created", &mut w8).await?;
    ensure_created(&r, 1, 11, "all from 11")?;
    s.watch_quiet("all from 11: nothing", &mut w8).await?;

    s.put("rev12 put b=3", "b", "3", None).await?;
    let rs = s
        .watch_recv_sorted("b=3 on both watches", &mut w8, 2)
        .await?;
    ensure!(ids(&rs) == [0, 1]);
    for r in &rs {
        ensure_events(r, &[(PUT, "b", "3", 12, 12, 1)], "b @12")?;
        ensure_prev(&r.events[0], None, "re-created b")?;
    }
    s.watch_recv("all from 4: @12", &mut w2).await?;
    let r = s.watch_recv("b from 1: @12", &mut w4).await?;
    ensure_events(&r, &[(PUT, "b", "3", 12, 12, 1)], "b from 1 @12")?;
    for w in [&mut w1, &mut w2, &mut w3, &mut w4, &mut w5, &mut w6] {
        s.watch_quiet("nothing more", w).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_compaction() -> Result<()> {
    run_differential("watch history and compaction", history_scenario).await
}

/// etcd 3.4 sends a historical replay as ONE response (all events from the start revision up
/// to the current revision, header = current revision), and with `fragment` splits that batch
/// by size regardless of revision boundaries. Recorded exactly (the other scenarios record
/// replays flattened, independent of batching).
async fn replay_batching_scenario(s: &mut Session) -> Result<()> {
    for i in 0..5 {
        s.put(&format!("put r/{i}"), format!("r/{i}"), "small", None)
            .await?;
    }
    let mut w = s
        .watch_create("watch r/ from 2", watch_prefix("r/").rev(2))
        .await?;
    let r = s.watch_recv("created", &mut w).await?;
    ensure_created(&r, 0, 6, "r/ from 2")?;
    let r = s.watch_recv("replay: one response", &mut w).await?;
    ensure_event_response(&r, 0, 6, "replay")?;
    ensure!(r.events.len() == 5, "{} events", r.events.len());
    s.watch_quiet("replay complete", &mut w).await?;

    for i in 0..5 {
        s.put(
            &format!("put r/big{i} 500 KiB"),
            format!("r/big{i}"),
            vec![b'a' + i as u8; 500 * 1024],
            None,
        )
        .await?;
    }
    // 10 events, ~2.5 MiB > etcd's 2 MiB limit (1.5 MiB request limit + 512 KiB gRPC
    // overhead): the 5 small and 4 big events fit in the first fragment, the last big one in
    // the second.
    let mut w2 = s
        .watch_create(
            "watch r/ from 2 fragment",
            watch_prefix("r/").rev(2).fragment(),
        )
        .await?;
    let r = s.watch_recv("fragment: created", &mut w2).await?;
    ensure_created(&r, 0, 11, "fragmented replay")?;
    let r1 = s.watch_recv("fragment 1", &mut w2).await?;
    let r2 = s.watch_recv("fragment 2", &mut w2).await?;
    ensure!(
        r1.fragment && r1.events.len() == 9 && !r2.fragment && r2.events.len() == 1,
        "fragments: {}+{} events, fragment flags {} {}",
        r1.events.len(),
        r2.events.len(),
        r1.fragment,
        r2.fragment
    );
    ensure!(header_revision(&r1) == 11 && header_revision(&r2) == 11);
    s.watch_quiet("fragmented replay complete", &mut w2).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_batching_exact() -> Result<()> {
    run_differential("watch replay batching", replay_batching_scenario).await
}

// ---------------------------------------------------------------------------------------------
// 3. Future start revision
// ---------------------------------------------------------------------------------------------

async fn future_scenario(s: &mut Session) -> Result<()> {
    s.put("rev2 put k=1", "k", "1", None).await?;
    let mut w1 = s
        .watch_create("watch k from rev 5", watch_key("k").rev(5))
        .await?;
    let r = s.watch_recv("k from 5: created", &mut w1).await?;
    ensure_created(&r, 0, 2, "k from 5")?;
    let mut w2 = s
        .watch_create(
            "watch all from rev 4 prev_kv",
            watch_from_key("").rev(4).prev_kv(),
        )
        .await?;
    let r = s.watch_recv("all from 4: created", &mut w2).await?;
    ensure_created(&r, 0, 2, "all from 4")?;

    s.put("rev3 put k=2", "k", "2", None).await?;
    s.watch_quiet("k from 5: nothing at 3", &mut w1).await?;
    s.watch_quiet("all from 4: nothing at 3", &mut w2).await?;

    s.put("rev4 put j=1", "j", "1", None).await?;
    s.watch_quiet("k from 5: nothing at 4", &mut w1).await?;
    let r = s.watch_recv("all from 4: @4", &mut w2).await?;
    ensure_event_response(&r, 0, 4, "all @4")?;
    ensure_events(&r, &[(PUT, "j", "1", 4, 4, 1)], "all @4")?;

    s.put("rev5 put k=3", "k", "3", None).await?;
    let r = s.watch_recv("k from 5: @5", &mut w1).await?;
    ensure_event_response(&r, 0, 5, "k @5")?;
    ensure_events(&r, &[(PUT, "k", "3", 2, 5, 3)], "k @5")?;
    let r = s.watch_recv("all from 4: @5", &mut w2).await?;
    ensure_prev(&r.events[0], Some(("k", "2", 2, 3, 2)), "all @5")?;

    s.delete("rev6 delete k", "k", None).await?;
    let r = s.watch_recv("k from 5: @6", &mut w1).await?;
    ensure_events(&r, &[(DELETE, "k", "", 0, 6, 0)], "k @6")?;
    let r = s.watch_recv("all from 4: @6", &mut w2).await?;
    ensure_prev(&r.events[0], Some(("k", "3", 2, 5, 3)), "all @6")?;

    let mut w3 = s
        .watch_create("watch k from rev 100", watch_key("k").rev(100))
        .await?;
    let r = s.watch_recv("k from 100: created", &mut w3).await?;
    ensure_created(&r, 0, 6, "k from 100")?;
    s.put("rev7 put k=4", "k", "4", None).await?;
    s.watch_quiet("k from 100: nothing at 7", &mut w3).await?;
    s.watch_recv("k from 5: @7", &mut w1).await?;
    s.watch_recv("all from 4: @7", &mut w2).await?;
    for w in [&mut w1, &mut w2, &mut w3] {
        s.watch_quiet("nothing more", w).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn future_start_revision() -> Result<()> {
    run_differential("watch future start revision", future_scenario).await
}

// ---------------------------------------------------------------------------------------------
// 4. prev_kv
// ---------------------------------------------------------------------------------------------

async fn prev_kv_scenario(s: &mut Session) -> Result<()> {
    // One stream: 0 = k with prev_kv, 1 = k without, 2 = prefix "k" with prev_kv.
    let mut w = s
        .watch_create("watch k prev_kv", watch_key("k").prev_kv())
        .await?;
    let r = s.watch_recv("created 0", &mut w).await?;
    ensure_created(&r, 0, 1, "k prev_kv")?;
    w.create(watch_key("k")).await?;
    let r = s.watch_recv("created 1", &mut w).await?;
    ensure_created(&r, 1, 1, "k")?;
    w.create(watch_prefix("k").prev_kv()).await?;
    let r = s.watch_recv("created 2", &mut w).await?;
    ensure_created(&r, 2, 1, "k* prev_kv")?;

    s.put("rev2 put k=1 (create)", "k", "1", None).await?;
    let rs = s.watch_recv_sorted("@2", &mut w, 3).await?;
    ensure!(ids(&rs) == [0, 1, 2]);
    for r in &rs {
        ensure_events(r, &[(PUT, "k", "1", 2, 2, 1)], "@2")?;
        ensure_prev(&r.events[0], None, "a create has no prev_kv")?;
    }

    s.put("rev3 put k=2", "k", "2", None).await?;
    let rs = s.watch_recv_sorted("@3", &mut w, 3).await?;
    ensure_prev(&rs[0].events[0], Some(("k", "1", 2, 2, 1)), "@3 w0")?;
    ensure_prev(&rs[1].events[0], None, "@3 w1 (not asked)")?;
    ensure_prev(&rs[2].events[0], Some(("k", "1", 2, 2, 1)), "@3 w2")?;

    s.put("rev4 put k=2 (same value)", "k", "2", None).await?;
    let rs = s.watch_recv_sorted("@4", &mut w, 3).await?;
    ensure_prev(&rs[0].events[0], Some(("k", "2", 2, 3, 2)), "@4")?;

    s.delete("rev5 delete k", "k", None).await?;
    let rs = s.watch_recv_sorted("@5", &mut w, 3).await?;
    ensure_events(&rs[0], &[(DELETE, "k", "", 0, 5, 0)], "@5")?;
    ensure_prev(
        &rs[0].events[0],
        Some(("k", "2", 2, 4, 3)),
        "delete prev_kv",
    )?;
    ensure_prev(&rs[1].events[0], None, "delete without prev_kv")?;

    s.put("rev6 put k=3 (re-create)", "k", "3", None).await?;
    let rs = s.watch_recv_sorted("@6", &mut w, 3).await?;
    ensure_events(&rs[0], &[(PUT, "k", "3", 6, 6, 1)], "@6")?;
    ensure_prev(&rs[0].events[0], None, "re-create has no prev_kv")?;

    s.txn(
        "rev7 txn put k=4, k2=1",
        Txn::new().and_then(vec![op_put("k", "4"), op_put("k2", "1")]),
    )
    .await?;
    let rs = s.watch_recv_sorted("@7", &mut w, 3).await?;
    ensure_prev(&rs[0].events[0], Some(("k", "3", 6, 6, 1)), "@7 w0")?;
    ensure!(rs[2].events.len() == 2, "prefix watch: both txn events");
    ensure_prev(&rs[2].events[0], Some(("k", "3", 6, 6, 1)), "@7 w2 k")?;
    ensure_prev(&rs[2].events[1], None, "@7 w2 k2 (create)")?;

    s.delete(
        "rev8 delete prefix k",
        "k",
        Some(DeleteOptions::new().with_prefix()),
    )
    .await?;
    let rs = s.watch_recv_sorted("@8", &mut w, 3).await?;
    ensure_events(
        &rs[2],
        &[(DELETE, "k", "", 0, 8, 0), (DELETE, "k2", "", 0, 8, 0)],
        "@8 w2",
    )?;
    ensure_prev(&rs[2].events[0], Some(("k", "4", 6, 7, 2)), "@8 k")?;
    ensure_prev(&rs[2].events[1], Some(("k2", "1", 7, 7, 1)), "@8 k2")?;

    s.put("rev9 put k=5", "k", "5", None).await?;
    s.watch_recv_sorted("@9", &mut w, 3).await?;
    s.put(
        "rev10 put k ignore_value",
        "k",
        "",
        Some(PutOptions::new().with_ignore_value()),
    )
    .await?;
    let rs = s.watch_recv_sorted("@10", &mut w, 3).await?;
    ensure_events(&rs[0], &[(PUT, "k", "5", 9, 10, 2)], "@10")?;
    ensure_prev(&rs[0].events[0], Some(("k", "5", 9, 9, 1)), "@10")?;
    s.watch_quiet("nothing more", &mut w).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prev_kv() -> Result<()> {
    run_differential("watch prev_kv", prev_kv_scenario).await
}

// ---------------------------------------------------------------------------------------------
// 5. Filters
// ---------------------------------------------------------------------------------------------

async fn filters_scenario(s: &mut Session) -> Result<()> {
    // 0 NOPUT, 1 NODELETE, 2 NOPUT+NODELETE, 3 NOPUT prev_kv, 4 no filter.
    let mut w = s
        .watch_create("watch f/ NOPUT", watch_prefix("f/").no_put())
        .await?;
    s.watch_recv("created 0", &mut w).await?;
    let more = [
        watch_prefix("f/").no_delete(),
        watch_prefix("f/").no_put().no_delete(),
        watch_prefix("f/").no_put().prev_kv(),
        watch_prefix("f/"),
    ];
    for (i, req) in more.into_iter().enumerate() {
        w.create(req).await?;
        let r = s.watch_recv(&format!("created {}", i + 1), &mut w).await?;
        ensure_created(&r, i as i64 + 1, 1, "filters")?;
    }

    s.put("rev2 put f/a=1", "f/a", "1", None).await?;
    let rs = s.watch_recv_sorted("@2", &mut w, 2).await?;
    ensure!(ids(&rs) == [1, 4], "@2: {:?}", ids(&rs));
    s.put("rev3 put f/b=1", "f/b", "1", None).await?;
    let rs = s.watch_recv_sorted("@3", &mut w, 2).await?;
    ensure!(ids(&rs) == [1, 4], "@3: {:?}", ids(&rs));
    s.delete("rev4 delete f/a", "f/a", None).await?;
    let rs = s.watch_recv_sorted("@4", &mut w, 3).await?;
    ensure!(ids(&rs) == [0, 3, 4], "@4: {:?}", ids(&rs));
    ensure_prev(
        &rs[1].events[0],
        Some(("f/a", "1", 2, 2, 1)),
        "@4 NOPUT prev_kv",
    )?;
    ensure_prev(&rs[0].events[0], None, "@4 NOPUT")?;

    s.txn(
        "rev5 txn put f/c, delete f/b",
        Txn::new().and_then(vec![op_put("f/c", "1"), TxnOp::delete("f/b", None)]),
    )
    .await?;
    let rs = s.watch_recv_sorted("@5", &mut w, 4).await?;
    ensure!(ids(&rs) == [0, 1, 3, 4], "@5: {:?}", ids(&rs));
    ensure_events(&rs[0], &[(DELETE, "f/b", "", 0, 5, 0)], "@5 NOPUT")?;
    ensure_events(&rs[1], &[(PUT, "f/c", "1", 5, 5, 1)], "@5 NODELETE")?;
    ensure!(rs[3].events.len() == 2);

    s.delete(
        "rev6 delete prefix f/",
        "f/",
        Some(DeleteOptions::new().with_prefix()),
    )
    .await?;
    let rs = s.watch_recv_sorted("@6", &mut w, 3).await?;
    ensure!(ids(&rs) == [0, 3, 4], "@6: {:?}", ids(&rs));
    // A revision whose events are all filtered out produces no response at all.
    s.watch_quiet("nothing more (filtered revisions send nothing)", &mut w)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters() -> Result<()> {
    run_differential("watch filters", filters_scenario).await
}

// ---------------------------------------------------------------------------------------------
// 6. Several watches on one stream: ids, duplicates, cancel
// ---------------------------------------------------------------------------------------------

async fn ids_scenario(s: &mut Session) -> Result<()> {
    let mut w = s.watch_create("watch a", watch_key("a")).await?;
    let r = s.watch_recv("auto id", &mut w).await?;
    ensure_created(&r, 0, 1, "first auto id")?;
    w.create(watch_key("b").id(100)).await?;
    let r = s.watch_recv("client id 100", &mut w).await?;
    ensure_created(&r, 100, 1, "client id")?;
    w.create(watch_key("b").id(100)).await?;
    let r = s.watch_recv("duplicate client id 100", &mut w).await?;
    ensure_refused(&r, 1, DUPLICATE_ID, "duplicate id")?;
    w.create(watch_key("b").id(1)).await?;
    let r = s.watch_recv("client id 1", &mut w).await?;
    ensure_created(&r, 1, 1, "client id 1")?;
    w.create(watch_key("b")).await?;
    let r = s.watch_recv("auto id skips ids in use", &mut w).await?;
    ensure_created(&r, 2, 1, "auto id after 0 and client 1")?;
    w.create(watch_range("z", "a")).await?;
    let r = s
        .watch_recv("empty range (key > range_end)", &mut w)
        .await?;
    ensure_refused(&r, 1, EMPTY_RANGE, "empty range")?;
    w.create(watch_range("a", "a")).await?;
    let r = s
        .watch_recv("empty range (key == range_end)", &mut w)
        .await?;
    ensure_refused(&r, 1, EMPTY_RANGE, "empty range")?;
    // etcd 3.4 accepts any non-zero client id, negative ones included.
    w.create(watch_key("b").id(-5)).await?;
    let r = s.watch_recv("client id -5", &mut w).await?;
    ensure_created(&r, -5, 1, "negative client id")?;
    // A WatchRequest without a request is ignored.
    w.send(WatchRequest {
        request_union: None,
    })
    .await?;
    s.watch_quiet("empty WatchRequest: no answer", &mut w)
        .await?;

    s.put("rev2 put a=1", "a", "1", None).await?;
    let rs = s.watch_recv_sorted("@2", &mut w, 1).await?;
    ensure_event_response(&rs[0], 0, 2, "@2")?;
    s.put("rev3 put b=1", "b", "1", None).await?;
    let rs = s.watch_recv_sorted("@3", &mut w, 4).await?;
    ensure!(ids(&rs) == [-5, 1, 2, 100], "@3: {:?}", ids(&rs));
    for r in &rs {
        ensure_events(r, &[(PUT, "b", "1", 3, 3, 1)], "@3")?;
    }

    w.cancel(1).await?;
    let r = s.watch_recv("cancel 1", &mut w).await?;
    ensure_canceled(&r, 1, 3, "cancel 1")?;
    w.cancel(1).await?;
    s.watch_quiet("cancel 1 again: no answer", &mut w).await?;
    w.cancel(777).await?;
    s.watch_quiet("cancel unknown id: no answer", &mut w)
        .await?;
    w.cancel(-1).await?;
    s.watch_quiet("cancel -1: no answer", &mut w).await?;

    s.put("rev4 put b=2", "b", "2", None).await?;
    let rs = s
        .watch_recv_sorted("@4 (not to canceled 1)", &mut w, 3)
        .await?;
    ensure!(ids(&rs) == [-5, 2, 100], "@4: {:?}", ids(&rs));
    s.watch_quiet("@4: nothing for the canceled watch", &mut w)
        .await?;

    w.create(watch_key("b").id(1)).await?;
    let r = s.watch_recv("reuse canceled id 1", &mut w).await?;
    ensure_created(&r, 1, 4, "reuse id 1")?;
    w.create(watch_key("b")).await?;
    let r = s.watch_recv("auto id continues at 3", &mut w).await?;
    ensure_created(&r, 3, 4, "auto id after cancel")?;
    s.put("rev5 put b=3", "b", "3", None).await?;
    let rs = s.watch_recv_sorted("@5", &mut w, 5).await?;
    ensure!(ids(&rs) == [-5, 1, 2, 3, 100], "@5: {:?}", ids(&rs));

    for id in [0, 100, -5] {
        w.cancel(id).await?;
        let r = s.watch_recv(&format!("cancel {id}"), &mut w).await?;
        ensure_canceled(&r, id, 5, "cancel")?;
    }
    s.put("rev6 put a=2", "a", "2", None).await?;
    s.watch_quiet("@6: a no longer watched", &mut w).await?;
    s.put("rev7 put b=4", "b", "4", None).await?;
    let rs = s.watch_recv_sorted("@7", &mut w, 3).await?;
    ensure!(ids(&rs) == [1, 2, 3], "@7: {:?}", ids(&rs));

    // A second stream numbers its watches from 0 again.
    let mut w2 = s
        .watch_create("second stream: watch b", watch_key("b"))
        .await?;
    let r = s.watch_recv("second stream: id 0", &mut w2).await?;
    ensure_created(&r, 0, 7, "second stream")?;

    // Half-closing the request side does not end the stream: events keep coming.
    w2.close_send();
    s.put("rev8 put b=5", "b", "5", None).await?;
    let r = s
        .watch_recv("second stream after half-close: @8", &mut w2)
        .await?;
    ensure_event_response(&r, 0, 8, "after half-close")?;
    s.watch_recv_sorted("first stream: @8", &mut w, 3).await?;
    s.watch_quiet("nothing more", &mut w).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ids_and_cancel() -> Result<()> {
    run_differential("watch ids and cancel", ids_scenario).await
}

// ---------------------------------------------------------------------------------------------
// 7. All events of a revision in one response
// ---------------------------------------------------------------------------------------------

async fn atomic_scenario(s: &mut Session) -> Result<()> {
    // 0 = prefix t/, 1 = key t/b prev_kv, 2 = all keys.
    let mut w = s.watch_create("watch t/", watch_prefix("t/")).await?;
    s.watch_recv("created 0", &mut w).await?;
    w.create(watch_key("t/b").prev_kv()).await?;
    s.watch_recv("created 1", &mut w).await?;
    w.create(watch_from_key("")).await?;
    s.watch_recv("created 2", &mut w).await?;

    for (i, k) in ["t/a", "t/b", "t/c", "u/x"].iter().enumerate() {
        s.put(&format!("rev{} put {k}", i + 2), *k, "1", None)
            .await?;
        let n = if *k == "t/b" {
            3
        } else if k.starts_with("t/") {
            2
        } else {
            1
        };
        s.watch_recv_sorted(&format!("@{}", i + 2), &mut w, n)
            .await?;
    }

    s.txn(
        "rev6 txn put t/a, delete t/c, put t/d, put u/y",
        Txn::new().and_then(vec![
            op_put("t/a", "2"),
            TxnOp::delete("t/c", None),
            op_put("t/d", "1"),
            op_put("u/y", "1"),
        ]),
    )
    .await?;
    let rs = s
        .watch_recv_sorted("@6: one response per watcher", &mut w, 2)
        .await?;
    ensure!(ids(&rs) == [0, 2], "@6: {:?}", ids(&rs));
    ensure_events(
        &rs[0],
        &[
            (PUT, "t/a", "2", 2, 6, 2),
            (DELETE, "t/c", "", 0, 6, 0),
            (PUT, "t/d", "1", 6, 6, 1),
        ],
        "@6 t/",
    )?;
    ensure!(rs[1].events.len() == 4, "@6 all: {}", rs[1].events.len());

    s.delete(
        "rev7 delete prefix t/",
        "t/",
        Some(DeleteOptions::new().with_prefix()),
    )
    .await?;
    let rs = s.watch_recv_sorted("@7", &mut w, 3).await?;
    ensure_events(
        &rs[0],
        &[
            (DELETE, "t/a", "", 0, 7, 0),
            (DELETE, "t/b", "", 0, 7, 0),
            (DELETE, "t/d", "", 0, 7, 0),
        ],
        "@7 t/ (key order)",
    )?;
    ensure_events(&rs[1], &[(DELETE, "t/b", "", 0, 7, 0)], "@7 t/b")?;
    ensure_prev(&rs[1].events[0], Some(("t/b", "1", 3, 3, 1)), "@7 t/b")?;
    ensure!(rs[2].events.len() == 3);

    s.delete(
        "rev8 delete all keys",
        "",
        Some(DeleteOptions::new().with_all_keys()),
    )
    .await?;
    let rs = s.watch_recv_sorted("@8", &mut w, 1).await?;
    ensure_events(
        &rs[0],
        &[(DELETE, "u/x", "", 0, 8, 0), (DELETE, "u/y", "", 0, 8, 0)],
        "@8",
    )?;

    s.txn(
        "rev9 nested txn",
        Txn::new().and_then(vec![
            op_put("t/x", "1"),
            TxnOp::txn(
                Txn::new()
                    .when(vec![Compare::version("t/x", CompareOp::Equal, 0)])
                    .and_then(vec![op_put("t/y", "1"), op_put("t/b", "9")])
                    .or_else(vec![op_put("t/z", "1")]),
            ),
            op_put("u/z", "1"),
        ]),
    )
    .await?;
    let rs = s.watch_recv_sorted("@9", &mut w, 3).await?;
    ensure_events(
        &rs[0],
        &[
            (PUT, "t/x", "1", 9, 9, 1),
            (PUT, "t/y", "1", 9, 9, 1),
            (PUT, "t/b", "9", 9, 9, 1),
        ],
        "@9 t/",
    )?;
    ensure!(rs[2].events.len() == 4);
    s.watch_quiet("nothing more", &mut w).await?;

    // The same revisions replayed from history are still grouped per revision.
    let mut h = s
        .watch_create("replay all from 6", watch_from_key("").rev(6))
        .await?;
    s.watch_recv("replay: created", &mut h).await?;
    let evs = s.watch_events("replay 6..9", &mut h, 4 + 3 + 2 + 4).await?;
    let revs: Vec<i64> = evs
        .iter()
        .map(|e| e.kv.as_ref().unwrap().mod_revision)
        .collect();
    ensure!(
        revs == [6, 6, 6, 6, 7, 7, 7, 8, 8, 9, 9, 9, 9],
        "replayed revisions {revs:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_revisions() -> Result<()> {
    run_differential("watch atomic revisions", atomic_scenario).await
}

// ---------------------------------------------------------------------------------------------
// 8. Progress requests
// ---------------------------------------------------------------------------------------------

async fn progress_scenario(s: &mut Session) -> Result<()> {
    // A stream without any watcher answers too.
    let mut w = s
        .watch_open("open stream with a progress request", progress_request())
        .await?;
    let r = s.watch_recv("progress, no watchers", &mut w).await?;
    ensure_progress(&r, 1, "no watchers")?;

    w.create(watch_key("p")).await?;
    let r = s.watch_recv("created p", &mut w).await?;
    ensure_created(&r, 0, 1, "p")?;
    w.request_progress().await?;
    let r = s.watch_recv("progress, synced watcher", &mut w).await?;
    ensure_progress(&r, 1, "synced")?;

    s.put("rev2 put p", "p", "1", None).await?;
    s.watch_recv("p @2", &mut w).await?;
    s.put("rev3 put q (not watched)", "q", "1", None).await?;
    s.watch_quiet("q not watched", &mut w).await?;
    w.request_progress().await?;
    let r = s
        .watch_recv("progress after an unwatched write", &mut w)
        .await?;
    ensure_progress(&r, 3, "after q")?;

    w.create(watch_key("p").rev(10)).await?;
    let r = s.watch_recv("created future watch", &mut w).await?;
    ensure_created(&r, 1, 3, "future")?;
    w.request_progress().await?;
    let r = s
        .watch_recv("progress with a future watcher", &mut w)
        .await?;
    ensure_progress(&r, 3, "future watcher")?;

    w.cancel(0).await?;
    s.watch_recv("cancel 0", &mut w).await?;
    w.cancel(1).await?;
    s.watch_recv("cancel 1", &mut w).await?;
    w.request_progress().await?;
    let r = s
        .watch_recv("progress after all watches were canceled", &mut w)
        .await?;
    ensure_progress(&r, 3, "all canceled")?;
    w.request_progress().await?;
    w.request_progress().await?;
    let r = s.watch_recv("two progress requests: first", &mut w).await?;
    ensure_progress(&r, 3, "first")?;
    let r = s
        .watch_recv("two progress requests: second", &mut w)
        .await?;
    ensure_progress(&r, 3, "second")?;
    s.watch_quiet("nothing more", &mut w).await?;

    // Through etcd-client's API.
    let mut c = s
        .watch_with_client("etcd-client watch p", "p", None)
        .await?;
    let r = s.watch_recv("etcd-client: created", &mut c).await?;
    ensure_created(&r, 0, 3, "etcd-client")?;
    c.request_progress().await?;
    let r = s.watch_recv("etcd-client: progress", &mut c).await?;
    ensure_progress(&r, 3, "etcd-client")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_requests() -> Result<()> {
    run_differential("watch progress request", progress_scenario).await
}

// ---------------------------------------------------------------------------------------------
// 9. Fragmentation of large revisions
// ---------------------------------------------------------------------------------------------

fn blob(byte: u8, kib: usize) -> Vec<u8> {
    vec![byte; kib * 1024]
}

async fn fragment_scenario(s: &mut Session) -> Result<()> {
    // 0 = prev_kv + fragment, 1 = prev_kv, 2 = fragment.
    let mut w = s
        .watch_create(
            "watch big/ prev_kv fragment",
            watch_prefix("big/").prev_kv().fragment(),
        )
        .await?;
    s.watch_recv("created 0", &mut w).await?;
    w.create(watch_prefix("big/").prev_kv()).await?;
    s.watch_recv("created 1", &mut w).await?;
    w.create(watch_prefix("big/").fragment()).await?;
    s.watch_recv("created 2", &mut w).await?;

    for i in 0..5u8 {
        s.put(
            &format!("put big/{i} 500 KiB"),
            format!("big/{i}"),
            blob(b'a' + i, 500),
            None,
        )
        .await?;
        let rs = s
            .watch_recv_sorted(&format!("big/{i}: single event, unfragmented"), &mut w, 3)
            .await?;
        ensure!(rs.iter().all(|r| !r.fragment && r.events.len() == 1));
    }

    // 5 deletes with 500 KiB prev_kvs: ~2.5 MiB > etcd's watch limit of 2 MiB (1.5 MiB
    // --max-request-bytes + 512 KiB gRPC overhead): 4 events, then 1.
    s.delete(
        "rev7 delete prefix big/",
        "big/",
        Some(DeleteOptions::new().with_prefix()),
    )
    .await?;
    let rs = s.watch_recv_sorted("@7", &mut w, 4).await?;
    ensure!(ids(&rs) == [0, 0, 1, 2], "@7: {:?}", ids(&rs));
    let frags = by_id(&rs, 0);
    ensure!(
        frags[0].fragment
            && frags[0].events.len() == 4
            && !frags[1].fragment
            && frags[1].events.len() == 1,
        "@7 fragments: {} (fragment {}) + {} (fragment {})",
        frags[0].events.len(),
        frags[0].fragment,
        frags[1].events.len(),
        frags[1].fragment
    );
    ensure!(frags
        .iter()
        .all(|r| header_revision(r) == 7 && !r.created && !r.canceled));
    let joined: Vec<Event> = frags.iter().flat_map(|r| r.events.clone()).collect();
    ensure!(
        events(&joined) == events(&rs[2].events),
        "reassembled fragments differ from the unfragmented response"
    );
    ensure!(!rs[2].fragment && rs[2].events.len() == 5);
    ensure!(
        !rs[3].fragment && rs[3].events.len() == 5,
        "no prev_kv: small"
    );

    // A txn overwriting two 700 KiB values: each event carries 1.4 MiB (kv + prev_kv).
    s.put("rev8 put big/t0", "big/t0", blob(b'x', 700), None)
        .await?;
    s.watch_recv_sorted("@8", &mut w, 3).await?;
    s.put("rev9 put big/t1", "big/t1", blob(b'y', 700), None)
        .await?;
    s.watch_recv_sorted("@9", &mut w, 3).await?;
    s.txn(
        "rev10 txn overwrite big/t0, big/t1",
        Txn::new().and_then(vec![
            TxnOp::put("big/t0", blob(b'X', 700), None),
            TxnOp::put("big/t1", blob(b'Y', 700), None),
        ]),
    )
    .await?;
    let rs = s.watch_recv_sorted("@10", &mut w, 4).await?;
    ensure!(ids(&rs) == [0, 0, 1, 2], "@10: {:?}", ids(&rs));
    ensure!(rs[0].fragment && rs[0].events.len() == 1);
    ensure!(!rs[1].fragment && rs[1].events.len() == 1);
    let joined: Vec<Event> = rs[..2].iter().flat_map(|r| r.events.clone()).collect();
    ensure!(events(&joined) == events(&rs[2].events));
    ensure!(!rs[3].fragment && rs[3].events.len() == 2);

    // A single event is never split, however large.
    s.put("rev11 put big/s 1.4 MiB", "big/s", blob(b's', 1400), None)
        .await?;
    s.watch_recv_sorted("@11", &mut w, 3).await?;
    s.put(
        "rev12 put big/s 1.4 MiB again",
        "big/s",
        blob(b'S', 1400),
        None,
    )
    .await?;
    let rs = s
        .watch_recv_sorted("@12: 2.8 MiB single event", &mut w, 3)
        .await?;
    ensure!(rs.iter().all(|r| !r.fragment && r.events.len() == 1));
    s.watch_quiet("nothing more", &mut w).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragment() -> Result<()> {
    run_differential("watch fragment", fragment_scenario).await
}

// ---------------------------------------------------------------------------------------------
// Concurrency: writers vs watchers, checked against the history the writers observed
// ---------------------------------------------------------------------------------------------

const KEYS: usize = 10;
const WRITERS: usize = 4;
const OPS_PER_WRITER: usize = 100;

fn key(i: usize) -> String {
    format!("h/k{i}")
}

/// One expected event: what the watch must report for a write, derived from the write's own
/// response (header revision + prev_kv).
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    typ: i32,
    kv: KeyValue,
    prev: Option<KeyValue>,
}

fn put_event(k: &str, v: &str, rev: i64, prev: Option<&etcd_client::KeyValue>) -> Expected {
    let prev = prev.map(fetcd_tests::watch::from_client_kv);
    Expected {
        typ: PUT,
        kv: KeyValue {
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec().into(),
            create_revision: prev.as_ref().map(|p| p.create_revision).unwrap_or(rev),
            mod_revision: rev,
            version: prev.as_ref().map(|p| p.version + 1).unwrap_or(1),
            lease: 0,
        },
        prev,
    }
}

fn delete_event(prev: &etcd_client::KeyValue, rev: i64) -> Expected {
    Expected {
        typ: DELETE,
        kv: KeyValue {
            key: prev.key().to_vec(),
            mod_revision: rev,
            ..Default::default()
        },
        prev: Some(fetcd_tests::watch::from_client_kv(prev)),
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Runs random writes, at least `OPS_PER_WRITER` and until `keep_going` is cleared; returns
/// (revision, events) for every write that created a revision.
async fn writer(
    mut c: Client,
    id: usize,
    keep_going: Arc<std::sync::atomic::AtomicBool>,
) -> Result<Vec<(i64, Vec<Expected>)>> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((id as u64 + 1) * 0x1234_5678));
    let mut out = Vec::new();
    let mut n = 0;
    while n < OPS_PER_WRITER || keep_going.load(std::sync::atomic::Ordering::SeqCst) {
        n += 1;
        let value = format!("w{id}-{n}");
        match rng.below(20) {
            0..=9 => {
                let k = key(rng.below(KEYS));
                let r = c
                    .put(
                        k.as_str(),
                        value.as_str(),
                        Some(PutOptions::new().with_prev_key()),
                    )
                    .await?;
                let rev = r.header().unwrap().revision();
                out.push((rev, vec![put_event(&k, &value, rev, r.prev_key())]));
            }
            10..=12 => {
                let k = key(rng.below(KEYS));
                let r = c
                    .delete(k.as_str(), Some(DeleteOptions::new().with_prev_key()))
                    .await?;
                if r.deleted() > 0 {
                    let rev = r.header().unwrap().revision();
                    out.push((
                        rev,
                        r.prev_kvs().iter().map(|p| delete_event(p, rev)).collect(),
                    ));
                }
            }
            13..=14 => {
                let lo = rng.below(KEYS - 3);
                let r = c
                    .delete(
                        key(lo).as_str(),
                        Some(
                            DeleteOptions::new()
                                .with_range(key(lo + 3).as_str())
                                .with_prev_key(),
                        ),
                    )
                    .await?;
                if r.deleted() > 0 {
                    let rev = r.header().unwrap().revision();
                    out.push((
                        rev,
                        r.prev_kvs().iter().map(|p| delete_event(p, rev)).collect(),
                    ));
                }
            }
            _ => {
                // Three distinct keys: put, put, delete; branch chosen by a compare.
                let a = rng.below(KEYS);
                let b = (a + 1 + rng.below(KEYS - 1)) % KEYS;
                let mut d = rng.below(KEYS);
                while d == a || d == b {
                    d = (d + 1) % KEYS;
                }
                let (ka, kb, kd) = (key(a), key(b), key(d));
                let ops = |x: &str, y: &str| {
                    vec![
                        TxnOp::put(x, value.as_str(), Some(PutOptions::new().with_prev_key())),
                        TxnOp::put(y, value.as_str(), Some(PutOptions::new().with_prev_key())),
                        TxnOp::delete(kd.as_str(), Some(DeleteOptions::new().with_prev_key())),
                    ]
                };
                let r = c
                    .txn(
                        Txn::new()
                            .when(vec![Compare::version(ka.as_str(), CompareOp::Greater, 0)])
                            .and_then(ops(&ka, &kb))
                            .or_else(ops(&kb, &ka)),
                    )
                    .await?;
                let rev = r.header().unwrap().revision();
                let order = if r.succeeded() {
                    [&ka, &kb]
                } else {
                    [&kb, &ka]
                };
                let mut evs = Vec::new();
                for (i, op) in r.op_responses().iter().enumerate() {
                    match op {
                        TxnOpResponse::Put(p) => {
                            evs.push(put_event(order[i], &value, rev, p.prev_key()))
                        }
                        TxnOpResponse::Delete(dr) => {
                            evs.extend(dr.prev_kvs().iter().map(|p| delete_event(p, rev)))
                        }
                        other => bail!("unexpected txn op response {other:?}"),
                    }
                }
                out.push((rev, evs));
            }
        }
    }
    Ok(out)
}

/// What one watch asked for.
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    req: WatchCreateRequest,
}

impl Spec {
    fn new(name: &str, req: WatchCreateRequest) -> Self {
        Spec {
            name: name.to_owned(),
            req,
        }
    }

    fn matches(&self, e: &Expected) -> bool {
        let k = &e.kv.key;
        let in_range = if self.req.range_end.is_empty() {
            *k == self.req.key
        } else if self.req.range_end == [0] {
            *k >= self.req.key
        } else {
            *k >= self.req.key && *k < self.req.range_end
        };
        let filtered = self
            .req
            .filters
            .iter()
            .any(|f| (*f == 0 && e.typ == PUT) || (*f == 1 && e.typ == DELETE));
        in_range && !filtered
    }
}

/// A stream whose responses are collected in the background.
struct Collector {
    responses: Arc<Mutex<Vec<WatchResponse>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Result<()>>,
    /// watch_id → spec, filled from the created responses in creation order.
    specs: Vec<Spec>,
}

impl Collector {
    /// Opens a stream, creates the watches one after the other (waiting for each created
    /// response), then collects everything in the background.
    async fn start(url: &str, specs: Vec<Spec>) -> Result<Collector> {
        let mut conn = WatchConn::open(url, create_request(specs[0].req.clone()))
            .await?
            .map_err(|s| anyhow::anyhow!("Watch refused: {s}"))?;
        let mut pending = Vec::new();
        let mut created = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            if i > 0 {
                conn.create(spec.req.clone()).await?;
            }
            loop {
                let r = conn.next().await.context("waiting for created")?;
                if r.created {
                    ensure!(
                        !r.canceled,
                        "{}: refused: {}",
                        spec.name,
                        watch_response(&r)
                    );
                    created.push(r);
                    break;
                }
                pending.push(r);
            }
        }
        let mut all = created;
        all.extend(pending);
        let responses = Arc::new(Mutex::new(all));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (resp2, stop2) = (Arc::clone(&responses), Arc::clone(&stop));
        let task = tokio::spawn(async move {
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                match conn.recv_within(Duration::from_millis(50)).await {
                    Received::Response(r) => resp2.lock().unwrap().push(r),
                    Received::Nothing => {}
                    other => bail!("watch stream failed: {}", other.to_value()),
                }
            }
            Ok(())
        });
        Ok(Collector {
            responses,
            stop,
            task,
            specs,
        })
    }

    fn snapshot(&self) -> Vec<WatchResponse> {
        self.responses.lock().unwrap().clone()
    }

    async fn finish(self) -> Result<Vec<WatchResponse>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await??;
        Ok(self.responses.lock().unwrap().clone())
    }
}

/// The created response of each watch (in creation order: ids are assigned 0, 1, ...).
fn created_of(rs: &[WatchResponse], n: usize) -> Vec<WatchResponse> {
    rs.iter().filter(|r| r.created).take(n).cloned().collect()
}

/// The events a watch must deliver. For a watch from "now" (start_revision 0) the server may
/// start anywhere up to created.header.revision + 1 (etcd reads the header after registering
/// the watcher), so the expected list starts at the first received event if that is earlier.
fn expected_for(
    spec: &Spec,
    created_rev: i64,
    first_received: Option<i64>,
    history: &BTreeMap<i64, Vec<Expected>>,
) -> Vec<Expected> {
    let from = if spec.req.start_revision > 0 {
        spec.req.start_revision
    } else {
        let live = created_rev + 1;
        first_received.map_or(live, |f| f.min(live))
    };
    history
        .range(from..)
        .flat_map(|(_, evs)| evs.iter().filter(|e| spec.matches(e)).cloned())
        .map(|mut e| {
            if !spec.req.prev_kv {
                e.prev = None;
            }
            e
        })
        .collect()
}

fn to_expected(e: &Event) -> Expected {
    Expected {
        typ: e.r#type,
        kv: e.kv.clone().unwrap_or_default(),
        prev: e.prev_kv.clone(),
    }
}

/// Checks one watch's responses against the history. Returns the problems found.
fn check_watch(
    spec: &Spec,
    id: i64,
    created: &WatchResponse,
    responses: &[&WatchResponse],
    history: &BTreeMap<i64, Vec<Expected>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let name = &spec.name;
    // Atomicity and order: every revision in exactly one response, increasing.
    let mut seen_revs: HashMap<i64, usize> = HashMap::new();
    let mut last = 0i64;
    let mut got = Vec::new();
    for (i, r) in responses.iter().enumerate() {
        if r.created || r.canceled || r.compact_revision != 0 || r.fragment {
            problems.push(format!("{name}: unexpected response {}", watch_response(r)));
        }
        if r.events.is_empty() {
            problems.push(format!(
                "{name}: empty event response {}",
                watch_response(r)
            ));
        }
        for e in &r.events {
            let rev = e.kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(0);
            if rev < last {
                problems.push(format!("{name}: revision {rev} after {last}"));
            }
            last = rev;
            if let Some(&j) = seen_revs.get(&rev) {
                if j != i {
                    problems.push(format!(
                        "{name}: revision {rev} split over responses {j} and {i}"
                    ));
                }
            }
            seen_revs.insert(rev, i);
            got.push(to_expected(e));
        }
        if header_revision(r) < last {
            problems.push(format!(
                "{name}: header revision {} below its events' revision {last}",
                header_revision(r)
            ));
        }
    }
    let first = got.first().map(|e| e.kv.mod_revision);
    let want = expected_for(spec, header_revision(created), first, history);
    if got != want {
        let pos = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        problems.push(format!(
            "{name} (watch {id}): {} events, want {}; first difference at #{pos}: got {:?}, want {:?}",
            got.len(),
            want.len(),
            got.get(pos),
            want.get(pos)
        ));
    }
    problems
}

async fn wait_for_revision(c: &mut Client, rev: i64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = c
            .get("h/", Some(GetOptions::new().with_count_only()))
            .await?;
        if r.header().unwrap().revision() >= rev {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "revision {rev} not reached");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn concurrent_scenario(url: &str) -> Result<()> {
    let mut c = fetcd_tests::connect(url).await?;
    let h = |s: &str| s.to_owned();
    let all_h = || watch_prefix("h/");

    // Before any write.
    let mut collectors = vec![
        Collector::start(url, vec![Spec::new("prefix h/ from now", all_h())]).await?,
        Collector::start(
            url,
            vec![Spec::new(
                "h/k1 prev_kv from now",
                watch_key(&key(1)).prev_kv(),
            )],
        )
        .await?,
        Collector::start(
            url,
            vec![
                Spec::new(
                    "[h/k2, h/k5) prev_kv",
                    watch_range(&key(2), &key(5)).prev_kv(),
                ),
                Spec::new("h/k7 NOPUT", watch_key(&key(7)).no_put()),
                Spec::new("from h/k8", watch_from_key(&key(8))),
                Spec::new("prefix h/ NODELETE prev_kv", all_h().no_delete().prev_kv()),
            ],
        )
        .await?,
    ];

    // The writers keep going until every watch has been created, so that the mid-run watches
    // really are created under concurrent writes.
    let keep_going = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writers: Vec<_> = (0..WRITERS)
        .map(|i| {
            let url = h(url);
            let keep_going = Arc::clone(&keep_going);
            tokio::spawn(async move {
                let c = fetcd_tests::connect(&url).await?;
                writer(c, i, keep_going).await
            })
        })
        .collect();

    // While the writers run: watches from the past (must catch up without gap or duplicate
    // while new revisions keep coming), and from "now".
    wait_for_revision(&mut c, 80).await?;
    collectors.push(
        Collector::start(
            url,
            vec![Spec::new(
                "prefix h/ prev_kv from 20",
                all_h().rev(20).prev_kv(),
            )],
        )
        .await?,
    );
    collectors.push(
        Collector::start(
            url,
            vec![
                Spec::new("h/k3 prev_kv from 2", watch_key(&key(3)).rev(2).prev_kv()),
                Spec::new("prefix h/ mid-run from now", all_h()),
            ],
        )
        .await?,
    );
    wait_for_revision(&mut c, 200).await?;
    collectors.push(
        Collector::start(
            url,
            vec![Spec::new("prefix h/ from 1", all_h().rev(1).prev_kv())],
        )
        .await?,
    );

    let mid_run = c
        .get("h/", Some(GetOptions::new().with_count_only()))
        .await?
        .header()
        .unwrap()
        .revision();
    keep_going.store(false, std::sync::atomic::Ordering::SeqCst);

    // The history, from the writers' own responses.
    let mut history: BTreeMap<i64, Vec<Expected>> = BTreeMap::new();
    for w in writers {
        for (rev, evs) in w.await?? {
            ensure!(
                history.insert(rev, evs).is_none(),
                "two writes got revision {rev}"
            );
        }
    }
    let last = *history.keys().last().context("no writes")?;
    let revs: Vec<i64> = history.keys().copied().collect();
    ensure!(
        revs == (2..=last).collect::<Vec<_>>(),
        "the writes' revisions are not exactly 2..={last}"
    );
    for (rev, evs) in &history {
        ensure!(!evs.is_empty(), "revision {rev} without events");
    }

    // Wait until every watch has caught up to the last revision it must see (bounded), then
    // make sure nothing more arrives.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut behind = Vec::new();
        for col in &collectors {
            let rs = col.snapshot();
            let created = created_of(&rs, col.specs.len());
            for (id, spec) in col.specs.iter().enumerate() {
                let want_last = expected_for(spec, header_revision(&created[id]), None, &history)
                    .last()
                    .map(|e| e.kv.mod_revision);
                let got_last = rs
                    .iter()
                    .filter(|r| r.watch_id == id as i64 && !r.created)
                    .flat_map(|r| r.events.iter())
                    .map(|e| e.kv.as_ref().unwrap().mod_revision)
                    .next_back();
                if want_last.is_some() && got_last < want_last {
                    behind.push(format!("{} at {got_last:?} < {want_last:?}", spec.name));
                }
            }
        }
        if behind.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "watches did not catch up with revision {last}: {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(QUIET_PERIOD).await;

    let mut problems = Vec::new();
    let mut total = 0usize;
    for col in collectors {
        let specs = col.specs.clone();
        let rs = col.finish().await?;
        let created = created_of(&rs, specs.len());
        for (id, spec) in specs.iter().enumerate() {
            let id = id as i64;
            if created[id as usize].watch_id != id {
                problems.push(format!(
                    "{}: created with id {}",
                    spec.name, created[id as usize].watch_id
                ));
            }
            let mine: Vec<&WatchResponse> = rs
                .iter()
                .filter(|r| r.watch_id == id && !r.created)
                .collect();
            total += mine.iter().map(|r| r.events.len()).sum::<usize>();
            problems.extend(check_watch(
                spec,
                id,
                &created[id as usize],
                &mine,
                &history,
            ));
        }
        let stray: Vec<i64> = rs
            .iter()
            .map(|r| r.watch_id)
            .filter(|id| *id < 0 || *id >= specs.len() as i64)
            .collect();
        if !stray.is_empty() {
            problems.push(format!("responses for unknown watch ids {stray:?}"));
        }
    }
    eprintln!(
        "concurrent watch check: {} revisions (last watch created by revision {mid_run}), \
         {total} delivered events checked",
        history.len()
    );
    ensure!(
        problems.is_empty(),
        "watch guarantees violated:\n{}",
        problems.join("\n")
    );
    Ok(())
}

/// Several writers (Put, DeleteRange, multi-key Txn) race with watchers on prefixes, single
/// keys, ranges, filters, prev_kv, and starts in the past, the present and mid-run. Each
/// watcher's events must be exactly the store's history restricted to its range (in revision
/// order, no gaps, no duplicates), each revision in one response, with correct prev_kv. The
/// history comes from the writers' own responses (each write's revision and prev_kv).
/// Runs against the candidate only (`FETCD_TESTS_CANDIDATE=etcd` checks real etcd).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_and_watchers() -> Result<()> {
    fetcd_tests::init_tracing();
    let started = Instant::now();
    let kind = TargetKind::candidate()?;
    let target = kind.start(kind.name()).await?;
    let url = target.client_url();
    let result = tokio::time::timeout(Duration::from_secs(120), concurrent_scenario(&url))
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("concurrent scenario timed out")));
    let log = target.log_tail(30);
    target.stop().await?;
    eprintln!(
        "concurrent watch scenario on {}: {:?}",
        kind.name(),
        started.elapsed()
    );
    result.map_err(|e| e.context(format!("on {}; log tail:\n{log}", kind.name())))
}

/// The checker itself must notice gaps, duplicates, split revisions and wrong prev_kvs.
#[test]
fn concurrency_checker_detects_violations() {
    let kv = |k: &str, v: &str, c: i64, m: i64, ver: i64| KeyValue {
        key: k.as_bytes().to_vec(),
        value: v.as_bytes().to_vec().into(),
        create_revision: c,
        mod_revision: m,
        version: ver,
        lease: 0,
    };
    let put = |k: &str, v: &str, c: i64, m: i64, ver: i64, prev: Option<KeyValue>| Expected {
        typ: PUT,
        kv: kv(k, v, c, m, ver),
        prev,
    };
    let mut history = BTreeMap::new();
    history.insert(2, vec![put("h/k1", "a", 2, 2, 1, None)]);
    history.insert(
        3,
        vec![
            put("h/k1", "b", 2, 3, 2, Some(kv("h/k1", "a", 2, 2, 1))),
            put("h/k2", "c", 3, 3, 1, None),
        ],
    );
    history.insert(
        4,
        vec![put("h/k2", "d", 3, 4, 2, Some(kv("h/k2", "c", 3, 3, 1)))],
    );
    let ev = |e: &Expected, with_prev: bool| Event {
        r#type: e.typ,
        kv: Some(e.kv.clone()),
        prev_kv: if with_prev { e.prev.clone() } else { None },
    };
    let resp = |evs: Vec<Event>, rev: i64| WatchResponse {
        header: Some(fetcd_proto::etcdserverpb::ResponseHeader {
            revision: rev,
            ..Default::default()
        }),
        events: evs,
        ..Default::default()
    };
    let spec = Spec::new("all", watch_prefix("h/").rev(2).prev_kv());
    let created = WatchResponse {
        created: true,
        header: Some(fetcd_proto::etcdserverpb::ResponseHeader {
            revision: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let all: Vec<&Expected> = history.values().flatten().collect();
    let good = [
        resp(vec![ev(all[0], true)], 2),
        resp(vec![ev(all[1], true), ev(all[2], true)], 3),
        resp(vec![ev(all[3], true)], 4),
    ];
    let refs: Vec<&WatchResponse> = good.iter().collect();
    assert!(check_watch(&spec, 0, &created, &refs, &history).is_empty());

    let gap = [good[0].clone(), good[2].clone()];
    let refs: Vec<&WatchResponse> = gap.iter().collect();
    assert!(
        !check_watch(&spec, 0, &created, &refs, &history).is_empty(),
        "gap"
    );

    let dup = [
        good[0].clone(),
        good[1].clone(),
        good[1].clone(),
        good[2].clone(),
    ];
    let refs: Vec<&WatchResponse> = dup.iter().collect();
    assert!(
        !check_watch(&spec, 0, &created, &refs, &history).is_empty(),
        "duplicate"
    );

    let split = [
        good[0].clone(),
        resp(vec![ev(all[1], true)], 3),
        resp(vec![ev(all[2], true)], 3),
        good[2].clone(),
    ];
    let refs: Vec<&WatchResponse> = split.iter().collect();
    let problems = check_watch(&spec, 0, &created, &refs, &history);
    assert!(problems.iter().any(|p| p.contains("split")), "{problems:?}");

    let no_prev = [
        good[0].clone(),
        resp(vec![ev(all[1], false), ev(all[2], true)], 3),
        good[2].clone(),
    ];
    let refs: Vec<&WatchResponse> = no_prev.iter().collect();
    assert!(
        !check_watch(&spec, 0, &created, &refs, &history).is_empty(),
        "missing prev_kv"
    );

    // A watch from "now" created at revision 2 must start at 3 at the latest.
    let live = Spec::new("live", watch_prefix("h/").prev_kv());
    let created2 = WatchResponse {
        created: true,
        header: Some(fetcd_proto::etcdserverpb::ResponseHeader {
            revision: 2,
            ..Default::default()
        }),
        ..Default::default()
    };
    let refs: Vec<&WatchResponse> = good[1..].iter().collect();
    assert!(check_watch(&live, 0, &created2, &refs, &history).is_empty());
    let refs: Vec<&WatchResponse> = good[2..].iter().collect();
    assert!(
        !check_watch(&live, 0, &created2, &refs, &history).is_empty(),
        "late start"
    );
    // Starting earlier than the created revision (but without a gap) is allowed.
    let refs: Vec<&WatchResponse> = good.iter().collect();
    assert!(check_watch(&live, 0, &created2, &refs, &history).is_empty());
}
