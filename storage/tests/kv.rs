//! Example tests for the rules of etcd's MVCC store that are easy to get subtly wrong.
#![allow(clippy::unwrap_used)]

mod common;

use fetcd_proto::etcdserverpb::compare::CompareResult;
use fetcd_proto::etcdserverpb::compare::CompareTarget;
use fetcd_proto::etcdserverpb::compare::TargetUnion;
use fetcd_proto::etcdserverpb::range_request::SortOrder;
use fetcd_proto::etcdserverpb::range_request::SortTarget;
use fetcd_proto::etcdserverpb::request_op::Request;
use fetcd_proto::etcdserverpb::response_op::Response;
use fetcd_proto::etcdserverpb::CompactionRequest;
use fetcd_proto::etcdserverpb::Compare;
use fetcd_proto::etcdserverpb::DeleteRangeRequest;
use fetcd_proto::etcdserverpb::PutRequest;
use fetcd_proto::etcdserverpb::RangeRequest;
use fetcd_proto::etcdserverpb::RangeResponse;
use fetcd_proto::etcdserverpb::RequestOp;
use fetcd_proto::etcdserverpb::ResponseHeader;
use fetcd_proto::etcdserverpb::TxnRequest;
use fetcd_proto::etcdserverpb::TxnResponse;
use fetcd_proto::mvccpb::KeyValue;
use fetcd_storage::schema;
use fetcd_storage::KvError;
use fetcd_storage::KvStore;
use fetcd_storage::Revision;
use fetcd_storage::WriteOp;
use fetcd_storage::WriteResponse;

use crate::common::open;
use crate::common::open_db;

// --- helpers ---------------------------------------------------------------------------------

fn put_req(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

fn del_req(key: &str, range_end: &str) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: key.into(),
        range_end: range_end.into(),
        prev_kv: false,
    }
}

fn get_req(key: &str, revision: i64) -> RangeRequest {
    RangeRequest {
        key: key.into(),
        revision,
        ..Default::default()
    }
}

/// Every key, at `revision`.
fn all_req(revision: i64) -> RangeRequest {
    RangeRequest {
        key: vec![0],
        range_end: vec![0],
        revision,
        ..Default::default()
    }
}

fn kv(key: &str, value: &str, create: i64, modified: i64, version: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.as_bytes().to_vec().into(),
        create_revision: create,
        mod_revision: modified,
        version,
        lease: 0,
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

fn op(r: Request) -> RequestOp {
    RequestOp { request: Some(r) }
}

/// Applies one operation with the consistent index `ci`.
fn apply_ci(s: &KvStore, op: WriteOp, ci: &[u8]) -> Result<WriteResponse, KvError> {
    let mut out = s.apply([(op, ci.to_vec())]).unwrap();
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

fn apply(s: &KvStore, op: WriteOp) -> Result<WriteResponse, KvError> {
    apply_ci(s, op, b"ci")
}

/// Puts `key` and returns the response revision.
fn put(s: &KvStore, key: &str, value: &str) -> i64 {
    match apply(s, WriteOp::Put(put_req(key, value))).unwrap() {
        WriteResponse::Put(r) => r.header.unwrap().revision,
        other => panic!("unexpected {other:?}"),
    }
}

/// Deletes `[key, range_end)` and returns `(deleted, header revision)`.
fn delete(s: &KvStore, key: &str, range_end: &str) -> (i64, i64) {
    match apply(s, WriteOp::DeleteRange(del_req(key, range_end))).unwrap() {
        WriteResponse::DeleteRange(r) => (r.deleted, r.header.unwrap().revision),
        other => panic!("unexpected {other:?}"),
    }
}

fn compact(s: &KvStore, revision: i64) -> Result<WriteResponse, KvError> {
    apply(
        s,
        WriteOp::Compaction(CompactionRequest {
            revision,
            physical: false,
        }),
    )
}

fn txn(s: &KvStore, t: TxnRequest) -> Result<TxnResponse, KvError> {
    match apply(s, WriteOp::Txn(t))? {
        WriteResponse::Txn(r) => Ok(r),
        other => panic!("unexpected {other:?}"),
    }
}

fn range(s: &KvStore, r: &RangeRequest) -> Result<RangeResponse, KvError> {
    s.range(r).unwrap()
}

fn get(s: &KvStore, key: &str, revision: i64) -> Result<Vec<KeyValue>, KvError> {
    range(s, &get_req(key, revision)).map(|r| r.kvs)
}

fn temp_store() -> (tempfile::TempDir, KvStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    (dir, s)
}

fn reopen(dir: &tempfile::TempDir, s: KvStore) -> KvStore {
    s.flush().unwrap();
    drop(s);
    open(dir.path())
}

/// Every revision from the compaction revision (or 1) to the current one, as `all_req` sees it.
fn history(s: &KvStore) -> Vec<Result<RangeResponse, KvError>> {
    (s.compact_revision().max(1)..=s.current_revision())
        .map(|rev| range(s, &all_req(rev)))
        .collect()
}

// --- revisions -------------------------------------------------------------------------------

#[test]
fn empty_store_is_at_revision_1_and_first_write_gets_2() {
    let (_dir, s) = temp_store();
    assert_eq!(s.current_revision(), 1);
    assert_eq!(s.compact_revision(), -1);
    let empty = range(&s, &all_req(0)).unwrap();
    assert_eq!(empty.header, header(1));
    assert_eq!(empty.count, 0);

    assert_eq!(put(&s, "a", "1"), 2);
    assert_eq!(s.current_revision(), 2);
    assert_eq!(get(&s, "a", 0).unwrap(), vec![kv("a", "1", 2, 2, 1)]);
    // Revision 1 is readable: the empty store.
    assert_eq!(get(&s, "a", 1).unwrap(), vec![]);
}

#[test]
fn requests_that_change_nothing_keep_the_revision() {
    let (_dir, s) = temp_store();
    put(&s, "a", "1");

    // A delete of nothing: header is the current revision, no new revision.
    assert_eq!(delete(&s, "zz", ""), (0, 2));
    assert_eq!(delete(&s, "b", "c"), (0, 2));
    assert_eq!(s.current_revision(), 2);

    // A Txn whose chosen branch only reads, or deletes nothing.
    let t = TxnRequest {
        compare: vec![],
        success: vec![
            op(Request::RequestRange(get_req("a", 0))),
            op(Request::RequestDeleteRange(del_req("nope", ""))),
        ],
        failure: vec![],
    };
    let r = txn(&s, t).unwrap();
    assert_eq!(r.header, header(2));
    assert_eq!(s.current_revision(), 2);

    // A refused request.
    let leased = PutRequest {
        lease: 42,
        ..put_req("a", "2")
    };
    assert_eq!(apply(&s, WriteOp::Put(leased)), Err(KvError::LeaseNotFound));
    assert_eq!(apply(&s, WriteOp::Noop), Ok(WriteResponse::Noop));
    assert_eq!(s.current_revision(), 2);

    // The next write takes the next revision.
    assert_eq!(put(&s, "b", "1"), 3);
}

#[test]
fn version_and_create_revision_restart_after_delete() {
    let (_dir, s) = temp_store();
    put(&s, "a", "1"); // 2
    put(&s, "a", "2"); // 3
    assert_eq!(delete(&s, "a", ""), (1, 4));
    put(&s, "a", "3"); // 5
    assert_eq!(get(&s, "a", 3).unwrap(), vec![kv("a", "2", 2, 3, 2)]);
    assert_eq!(get(&s, "a", 4).unwrap(), vec![]);
    assert_eq!(get(&s, "a", 5).unwrap(), vec![kv("a", "3", 5, 5, 1)]);
}

#[test]
fn future_revision_is_refused() {
    let (_dir, s) = temp_store();
    put(&s, "a", "1");
    assert_eq!(get(&s, "a", 3), Err(KvError::FutureRevision));
    assert_eq!(get(&s, "a", 2).unwrap().len(), 1);
    // Same inside a Txn, checked against the revision before the Txn writes.
    let t = TxnRequest {
        compare: vec![],
        success: vec![
            op(Request::RequestPut(put_req("b", "1"))),
            op(Request::RequestRange(get_req("b", 3))),
        ],
        failure: vec![],
    };
    assert_eq!(txn(&s, t), Err(KvError::FutureRevision));
    assert_eq!(s.current_revision(), 2);
}

// --- compaction ------------------------------------------------------------------------------

#[test]
fn compaction_revision_itself_stays_readable() {
    let (_dir, s) = temp_store();
    put(&s, "a", "1"); // 2
    put(&s, "a", "2"); // 3
    put(&s, "b", "1"); // 4
    put(&s, "a", "3"); // 5

    match compact(&s, 4).unwrap() {
        WriteResponse::Compaction(r) => assert_eq!(r.header, header(5)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(s.compact_revision(), 4);
    assert_eq!(s.current_revision(), 5);
    assert_eq!(get(&s, "a", 4).unwrap(), vec![kv("a", "2", 2, 3, 2)]);
    assert_eq!(get(&s, "a", 5).unwrap(), vec![kv("a", "3", 2, 5, 3)]);
    assert_eq!(get(&s, "a", 3), Err(KvError::Compacted));
    assert_eq!(get(&s, "a", 1), Err(KvError::Compacted));
    // Revision 0 still means "current".
    assert_eq!(get(&s, "b", 0).unwrap(), vec![kv("b", "1", 4, 4, 1)]);

    // At or below the compaction revision: Compacted; above the current one: FutureRevision.
    assert_eq!(compact(&s, 4), Err(KvError::Compacted));
    assert_eq!(compact(&s, 2), Err(KvError::Compacted));
    assert_eq!(compact(&s, 6), Err(KvError::FutureRevision));
    assert!(compact(&s, 5).is_ok());
    assert_eq!(compact(&s, 5), Err(KvError::Compacted));
}

#[test]
fn compaction_checks_compacted_before_future() {
    let (_dir, s) = temp_store();
    // Fresh store: compaction revision -1, current 1.
    assert_eq!(compact(&s, -1), Err(KvError::Compacted));
    assert_eq!(compact(&s, 2), Err(KvError::FutureRevision));
    assert!(compact(&s, 0).is_ok());
    assert_eq!(compact(&s, 0), Err(KvError::Compacted));
    assert!(compact(&s, 1).is_ok());
    assert_eq!(s.compact_revision(), 1);
}

#[test]
fn restart_keeps_the_revision_after_compacting_everything_away() {
    let (dir, s) = temp_store();
    put(&s, "a", "1"); // 2
    put(&s, "b", "1"); // 3
    assert_eq!(delete(&s, "a", "c"), (2, 4));
    assert!(compact(&s, 4).is_ok());
    assert_eq!(range(&s, &all_req(0)).unwrap().count, 0);

    let s = reopen(&dir, s);
    // Nothing is left in the key tree, yet the revision must not go back.
    assert_eq!(s.current_revision(), 4);
    assert_eq!(s.compact_revision(), 4);
    assert_eq!(get(&s, "a", 3), Err(KvError::Compacted));
    assert_eq!(range(&s, &all_req(4)).unwrap().header, header(4));
    assert_eq!(put(&s, "a", "2"), 5);
    assert_eq!(get(&s, "a", 0).unwrap(), vec![kv("a", "2", 5, 5, 1)]);
}

#[test]
fn restart_rebuilds_versions_of_compacted_keys() {
    let (dir, s) = temp_store();
    put(&s, "a", "1"); // 2
    put(&s, "a", "2"); // 3
    put(&s, "a", "3"); // 4
    put(&s, "b", "1"); // 5
    assert!(compact(&s, 4).is_ok());
    let before = history(&s);

    let s = reopen(&dir, s);
    assert_eq!(history(&s), before);
    // The rebuilt index knows the version and creation of a key whose early history is gone.
    put(&s, "a", "4"); // 6
    assert_eq!(get(&s, "a", 0).unwrap(), vec![kv("a", "4", 2, 6, 4)]);
}

#[test]
fn an_interrupted_compaction_is_finished_on_reopen() {
    let (dir, s) = temp_store();
    put(&s, "a", "1"); // 2
    put(&s, "a", "2"); // 3
    put(&s, "b", "1"); // 4
    assert_eq!(delete(&s, "b", ""), (1, 5));
    put(&s, "a", "3"); // 6
    assert!(compact(&s, 2).is_ok());
    s.flush().unwrap();
    drop(s);

    // A crash between scheduling compaction at 5 and finishing it: the schedule is on disk,
    // the finished mark still says 2 and no revision was deleted.
    {
        let db = open_db(dir.path());
        let meta = db.open_tree(schema::META_TREE).unwrap();
        assert_eq!(
            meta.get(schema::FINISHED_COMPACT_REV)
                .unwrap()
                .unwrap()
                .as_ref(),
            2i64.to_be_bytes()
        );
        meta.insert(schema::SCHEDULED_COMPACT_REV, &5i64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }

    let s = open(dir.path());
    assert_eq!(s.compact_revision(), 5);
    assert_eq!(s.current_revision(), 6);
    assert_eq!(get(&s, "a", 4), Err(KvError::Compacted));
    assert_eq!(get(&s, "a", 5).unwrap(), vec![kv("a", "2", 2, 3, 2)]);
    assert_eq!(get(&s, "b", 5).unwrap(), vec![]);
    assert_eq!(get(&s, "a", 6).unwrap(), vec![kv("a", "3", 2, 6, 3)]);
    s.flush().unwrap();
    drop(s);

    // The compaction really happened on disk: it is marked finished, and only a's revision 3
    // (visible at 5) and 6 are left; b's put and tombstone are gone.
    let db = open_db(dir.path());
    let meta = db.open_tree(schema::META_TREE).unwrap();
    assert_eq!(
        meta.get(schema::FINISHED_COMPACT_REV)
            .unwrap()
            .unwrap()
            .as_ref(),
        5i64.to_be_bytes()
    );
    drop(meta);
    drop(db);
    let s = open(dir.path());
    let revs: Vec<Revision> = export_all(&s)
        .into_iter()
        .map(Result::unwrap)
        .filter(|(tree, _, _)| tree == schema::KEY_TREE)
        .map(|(_, k, _)| Revision::from_bytes(&k).unwrap().0)
        .collect();
    assert_eq!(revs, vec![Revision::new(3, 0), Revision::new(6, 0)]);
}

// --- consistent index, export / import -------------------------------------------------------

#[test]
fn consistent_index_is_written_with_the_data() {
    let (dir, s) = temp_store();
    assert_eq!(s.consistent_index().unwrap(), None);
    apply_ci(&s, WriteOp::Put(put_req("a", "1")), b"ci-1").unwrap();
    let s = reopen(&dir, s);
    assert_eq!(s.consistent_index().unwrap(), Some(b"ci-1".to_vec()));
    assert_eq!(get(&s, "a", 0).unwrap(), vec![kv("a", "1", 2, 2, 1)]);

    // Every applied entry records its index, including ones that change nothing or are refused.
    apply_ci(&s, WriteOp::Noop, b"ci-2").unwrap();
    assert_eq!(s.consistent_index().unwrap(), Some(b"ci-2".to_vec()));
    let leased = PutRequest {
        lease: 9,
        ..put_req("a", "2")
    };
    assert_eq!(
        apply_ci(&s, WriteOp::Put(leased), b"ci-3"),
        Err(KvError::LeaseNotFound)
    );
    assert_eq!(s.consistent_index().unwrap(), Some(b"ci-3".to_vec()));
    let future = WriteOp::Compaction(CompactionRequest {
        revision: 100,
        physical: false,
    });
    assert_eq!(apply_ci(&s, future, b"ci-4"), Err(KvError::FutureRevision));
    assert_eq!(s.consistent_index().unwrap(), Some(b"ci-4".to_vec()));
    let ok = WriteOp::Compaction(CompactionRequest {
        revision: 2,
        physical: false,
    });
    assert!(apply_ci(&s, ok, b"ci-5").is_ok());
    assert_eq!(s.consistent_index().unwrap(), Some(b"ci-5".to_vec()));

    // A batch records the index of its last entry, compaction in the middle or not.
    let out = s
        .apply([
            (WriteOp::Put(put_req("b", "1")), b"ci-6".to_vec()),
            (
                WriteOp::Compaction(CompactionRequest {
                    revision: 3,
                    physical: false,
                }),
                b"ci-7".to_vec(),
            ),
            (WriteOp::Put(put_req("c", "1")), b"ci-8".to_vec()),
        ])
        .unwrap();
    assert!(out.iter().all(Result::is_ok));
    let s = reopen(&dir, s);
    assert_eq!(s.consistent_index().unwrap(), Some(b"ci-8".to_vec()));
    assert_eq!(s.current_revision(), 4);
    assert_eq!(s.compact_revision(), 3);
}

#[test]
fn export_import_round_trip() {
    let (_dir, s) = temp_store();
    put(&s, "a", "1"); // 2
    put(&s, "b", "1"); // 3
    put(&s, "a", "2"); // 4
    delete(&s, "b", ""); // 5
    put(&s, "c", "1"); // 6
    assert!(compact(&s, 3).is_ok());
    put(&s, "b", "2"); // 7
    apply_ci(&s, WriteOp::Noop, b"last").unwrap();

    let mut records = Vec::new();
    s.export(&mut |tree, k, v| {
        records.push(Ok((tree.to_string(), k.to_vec(), v.to_vec())));
        Ok(())
    })
    .unwrap();

    let (_dir2, t) = temp_store();
    put(&t, "stale", "x"); // replaced by the import
    t.import(records).unwrap();
    assert_eq!(t.current_revision(), s.current_revision());
    assert_eq!(t.compact_revision(), 3);
    assert_eq!(t.consistent_index().unwrap(), Some(b"last".to_vec()));
    assert_eq!(history(&t), history(&s));
    assert_eq!(get(&t, "a", 2), Err(KvError::Compacted));
    assert_eq!(get(&t, "stale", 0).unwrap(), vec![]);
    // And it goes on from there.
    assert_eq!(put(&t, "a", "3"), 8);
    assert_eq!(get(&t, "a", 0).unwrap(), vec![kv("a", "3", 2, 8, 3)]);
}

/// A snapshot install may bring other content at revisions this store has read (a member
/// that diverged, a restored backup): nothing read before may be served after it.
#[test]
fn import_replaces_values_read_before_it() {
    let (_dir, s) = temp_store();
    put(&s, "a", "theirs"); // 2
    let (_dir2, t) = temp_store();
    put(&t, "a", "ours"); // 2, the same revision
    assert_eq!(get(&t, "a", 0).unwrap(), vec![kv("a", "ours", 2, 2, 1)]);
    t.import(export_all(&s)).unwrap();
    assert_eq!(get(&t, "a", 0).unwrap(), vec![kv("a", "theirs", 2, 2, 1)]);
    assert_eq!(get(&t, "a", 2).unwrap(), vec![kv("a", "theirs", 2, 2, 1)]);
}

/// Records of an export, as `import` takes them.
type Records = Vec<Result<(String, Vec<u8>, Vec<u8>), fetcd_storage::StorageError>>;

fn export_all(s: &KvStore) -> Records {
    let mut records = Vec::new();
    s.export(&mut |tree, k, v| {
        records.push(Ok((tree.to_string(), k.to_vec(), v.to_vec())));
        Ok(())
    })
    .unwrap();
    records
}

/// Starts an export of `s` on another thread and returns once it has read its first record; it
/// goes on (and its thread returns the records) when the returned sender is used.
fn paused_export(
    s: &std::sync::Arc<KvStore>,
) -> (
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<Records>,
) {
    use std::sync::mpsc;
    let (started_tx, started) = mpsc::channel();
    let (resume, resume_rx) = mpsc::channel::<()>();
    let s = s.clone();
    let exporter = std::thread::spawn(move || {
        let mut records: Records = Vec::new();
        let mut first = true;
        s.export(&mut |tree, k, v| {
            if first {
                first = false;
                started_tx.send(()).unwrap();
                resume_rx.recv().unwrap();
            }
            records.push(Ok((tree.to_string(), k.to_vec(), v.to_vec())));
            Ok(())
        })
        .unwrap();
        records
    });
    started.recv().unwrap();
    (resume, exporter)
}

#[test]
fn export_lets_writes_through_and_copies_the_revision_it_started_at() {
    use std::sync::mpsc;
    use std::time::Duration;

    let (_dir, s) = temp_store();
    for i in 0..50 {
        put(&s, &format!("k{i:02}"), "old"); // 2..=51
    }
    apply_ci(&s, WriteOp::Noop, b"at-51").unwrap();
    let expected = history(&s);
    let s = std::sync::Arc::new(s);

    // The export stops after its first record until told to go on.
    let (resume, exporter) = paused_export(&s);

    // Writes go on while the export is paused (before, they waited for the whole export).
    let (wrote_tx, wrote) = mpsc::channel();
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || {
            let revs: Vec<i64> = (0..50)
                .map(|i| put(&s, &format!("k{i:02}"), "new"))
                .collect();
            delete(&s, "k00", "k10");
            wrote_tx.send(revs).unwrap();
        })
    };
    let revs = wrote
        .recv_timeout(Duration::from_secs(30))
        .expect("writes blocked behind a paused export");
    assert_eq!(revs, (52..=101).collect::<Vec<_>>());
    writer.join().unwrap();

    // A compaction is decided at once, and writes go on after it, but its deletions wait for
    // the walk: the records they remove are still being read.
    assert!(compact(&s, 100).is_ok());
    assert_eq!(get(&s, "k20", 99), Err(KvError::Compacted));
    assert_eq!(put(&s, "after", "compaction"), 103);
    let (deleted_tx, deleted) = mpsc::channel();
    let waiter = {
        let s = s.clone();
        std::thread::spawn(move || {
            s.wait_compaction(100);
            deleted_tx.send(()).unwrap();
        })
    };
    assert!(deleted.recv_timeout(Duration::from_millis(300)).is_err());
    resume.send(()).unwrap();
    let records = exporter.join().unwrap();
    deleted.recv_timeout(Duration::from_secs(30)).unwrap();
    waiter.join().unwrap();

    // The copy is the store as of revision 51, with that revision's applied marker.
    let (_dir2, t) = temp_store();
    t.import(records).unwrap();
    assert_eq!(t.current_revision(), 51);
    assert_eq!(t.consistent_index().unwrap(), Some(b"at-51".to_vec()));
    assert_eq!(history(&t), expected);
    assert_eq!(get(&t, "k00", 0).unwrap(), vec![kv("k00", "old", 2, 2, 1)]);

    // And a later export sees everything, compaction included.
    let (_dir3, u) = temp_store();
    u.import(export_all(&s)).unwrap();
    assert_eq!(u.current_revision(), s.current_revision());
    assert_eq!(u.compact_revision(), 100);
    assert_eq!(history(&u), history(&s));
}

#[test]
fn a_snapshot_install_drops_compactions_decided_about_what_it_replaced() {
    // What will be installed: its own history, with revisions that overlap the old store's.
    let (_dir, t) = temp_store();
    for i in 0..30 {
        put(&t, &format!("t{}", i % 3), &format!("{i}")); // 2..=31
    }
    let records = export_all(&t);
    // Which of the compaction and the install gets the history first is up to the lock; the
    // install must win some of these rounds, and whichever wins, the installed history is
    // whole.
    for _ in 0..20 {
        install_while_a_compaction_waits(&t, &records);
    }
}

fn install_while_a_compaction_waits(t: &KvStore, records: &Records) {
    let (_dir, s) = temp_store();
    for i in 0..30 {
        put(&s, &format!("s{}", i % 3), &format!("{i}")); // 2..=31
    }
    let s = std::sync::Arc::new(s);
    // A paused export holds the history, so the compaction decided next cannot run yet.
    let (resume, exporter) = paused_export(&s);
    assert!(compact(&s, 31).is_ok());
    let installer = {
        let s = s.clone();
        let records: Records = records
            .iter()
            .map(|r| Ok(r.as_ref().unwrap().clone()))
            .collect();
        std::thread::spawn(move || s.import(records).unwrap())
    };
    // Let the installer queue up behind the export too, then let both go.
    std::thread::sleep(std::time::Duration::from_millis(20));
    resume.send(()).unwrap();
    exporter.join().unwrap();
    installer.join().unwrap();
    s.wait_compaction(31);

    assert_eq!(s.compact_revision(), -1);
    assert_eq!(history(&s), history(t));
    assert_eq!(get(&s, "t0", 2).unwrap(), vec![kv("t0", "0", 2, 2, 1)]);
}

#[test]
fn after_a_restart_compactions_of_the_last_run_need_no_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv");
    let s = KvStore::open_path(&path).unwrap();
    for i in 0..20 {
        put(&s, &format!("k{}", i % 2), &format!("{i}")); // 2..=21
    }
    assert!(compact(&s, 20).is_ok());
    drop(s);
    let s = std::sync::Arc::new(KvStore::open_path(&path).unwrap());
    assert_eq!(s.compact_revision(), 20);
    // Neither waits for a compaction this run never submitted.
    let (done_tx, done) = std::sync::mpsc::channel();
    let t = {
        let s = s.clone();
        std::thread::spawn(move || {
            s.wait_compaction(20);
            s.defragment().unwrap();
            done_tx.send(()).unwrap();
        })
    };
    done.recv_timeout(std::time::Duration::from_secs(30))
        .expect("waited for a compaction of the last run");
    t.join().unwrap();
    assert_eq!(get(&s, "k1", 0).unwrap(), vec![kv("k1", "19", 3, 21, 10)]);
}

/// Writes racing the compaction thread (it compacts the index a chunk of keys at a time while
/// they are applied) must leave the same store as writes applied after it finished.
#[test]
fn writes_during_a_compaction_of_many_keys_leave_what_writes_after_it_leave() {
    fn key_tree(s: &KvStore) -> Vec<(Vec<u8>, Vec<u8>)> {
        s.flush().unwrap();
        export_all(s)
            .into_iter()
            .map(Result::unwrap)
            .filter(|(tree, _, _)| tree == schema::KEY_TREE)
            .map(|(_, k, v)| (k, v))
            .collect()
    }
    const KEYS: usize = 12_000;
    let run = |wait_first: bool| {
        let (dir, s) = temp_store();
        for round in ["a", "b"] {
            for i in 0..KEYS {
                put(&s, &format!("k{i:05}"), round);
            }
        }
        for i in (0..KEYS).step_by(3) {
            delete(&s, &format!("k{i:05}"), "");
        }
        let at = s.current_revision();
        assert!(compact(&s, at).is_ok());
        if wait_first {
            s.wait_compaction(at);
        }
        // Overwrite, delete and recreate keys across the whole index while it is compacted.
        for i in (0..KEYS).step_by(5) {
            put(&s, &format!("k{i:05}"), "c");
            if i % 4 == 0 {
                delete(&s, &format!("k{i:05}"), "");
            }
        }
        s.wait_compaction(at);
        let after = s.current_revision();
        assert!(compact(&s, after - 100).is_ok());
        s.wait_compaction(after - 100);
        (dir, s)
    };
    let (_d1, raced) = run(false);
    let (_d2, waited) = run(true);
    assert_eq!(history(&raced), history(&waited));
    assert_eq!(key_tree(&raced), key_tree(&waited));
}

// --- Range -----------------------------------------------------------------------------------

#[test]
fn count_ignores_limit_and_filters() {
    let (_dir, s) = temp_store();
    for k in ["a", "b", "c", "d"] {
        put(&s, k, "v"); // 2..=5
    }
    let r = range(
        &s,
        &RangeRequest {
            limit: 2,
            ..all_req(0)
        },
    )
    .unwrap();
    assert_eq!((r.kvs.len(), r.more, r.count), (2, true, 4));
    let r = range(
        &s,
        &RangeRequest {
            min_mod_revision: 4,
            ..all_req(0)
        },
    )
    .unwrap();
    assert_eq!((r.kvs.len(), r.more, r.count), (2, false, 4));
    let r = range(
        &s,
        &RangeRequest {
            limit: 4,
            ..all_req(0)
        },
    )
    .unwrap();
    assert_eq!((r.kvs.len(), r.more), (4, false));
    let r = range(
        &s,
        &RangeRequest {
            count_only: true,
            limit: 1,
            ..all_req(0)
        },
    )
    .unwrap();
    assert_eq!((r.kvs.len(), r.more, r.count), (0, false, 4));
}

#[test]
fn descending_sort_keeps_ties_in_key_order() {
    let (_dir, s) = temp_store();
    put(&s, "a", "1"); // 2
    put(&s, "b", "1"); // 3
    put(&s, "c", "1"); // 4
    put(&s, "c", "2"); // 5
    let keys = |r: RangeResponse| -> Vec<String> {
        r.kvs
            .into_iter()
            .map(|kv| String::from_utf8(kv.key).unwrap())
            .collect()
    };
    let by_version = |order: SortOrder| RangeRequest {
        sort_order: order as i32,
        sort_target: SortTarget::Version as i32,
        ..all_req(0)
    };
    // etcd: sort.Sort(sort.Reverse(byVersion)) leaves a and b (both version 1) in key order.
    assert_eq!(
        keys(range(&s, &by_version(SortOrder::Descend)).unwrap()),
        ["c", "a", "b"]
    );
    assert_eq!(
        keys(range(&s, &by_version(SortOrder::Ascend)).unwrap()),
        ["a", "b", "c"]
    );
    // A non-key target with no order sorts ascending.
    assert_eq!(
        keys(range(&s, &by_version(SortOrder::None)).unwrap()),
        ["a", "b", "c"]
    );
}

// --- Txn -------------------------------------------------------------------------------------

fn cmp(key: &str, target: CompareTarget, result: CompareResult, union: TargetUnion) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: key.into(),
        range_end: vec![],
        target_union: Some(union),
    }
}

#[test]
fn compares_on_a_missing_key() {
    let (_dir, s) = temp_store();
    let holds = |c: Compare| {
        let t = TxnRequest {
            compare: vec![c],
            success: vec![],
            failure: vec![],
        };
        s.read_txn(&t).unwrap().unwrap().succeeded
    };
    use CompareResult::*;
    use CompareTarget::*;
    // A missing key is an empty key-value: version, create, mod and lease are 0 ...
    assert!(holds(cmp("x", Version, Equal, TargetUnion::Version(0))));
    assert!(holds(cmp(
        "x",
        Create,
        Equal,
        TargetUnion::CreateRevision(0)
    )));
    assert!(holds(cmp("x", Mod, Less, TargetUnion::ModRevision(1))));
    assert!(holds(cmp("x", Lease, Equal, TargetUnion::Lease(0))));
    // ... but a value compare on it always fails, even "not equal".
    assert!(!holds(cmp("x", Value, Equal, TargetUnion::Value(vec![]))));
    assert!(!holds(cmp(
        "x",
        Value,
        NotEqual,
        TargetUnion::Value(b"v".to_vec())
    )));
}

#[test]
fn txn_headers_and_nested_txn() {
    let (_dir, s) = temp_store();
    put(&s, "a", "1"); // 2
    let nested = TxnRequest {
        compare: vec![cmp(
            "a",
            CompareTarget::Value,
            CompareResult::Equal,
            TargetUnion::Value(b"1".to_vec()),
        )],
        success: vec![op(Request::RequestPut(put_req("b", "1")))],
        failure: vec![],
    };
    let t = TxnRequest {
        compare: vec![],
        success: vec![
            op(Request::RequestPut(put_req("a", "2"))),
            op(Request::RequestTxn(nested)),
            op(Request::RequestRange(get_req("a", 0))),
        ],
        failure: vec![],
    };
    let r = txn(&s, t).unwrap();
    assert_eq!(r.header, header(3));
    assert!(r.succeeded);
    let Some(Response::ResponseTxn(n)) = &r.responses[1].response else {
        panic!("{r:?}")
    };
    // Nested: empty header; its compare saw the state before the outer Txn wrote a=2.
    assert_eq!(n.header, Some(ResponseHeader::default()));
    assert!(n.succeeded);
    let Some(Response::ResponseRange(g)) = &r.responses[2].response else {
        panic!("{r:?}")
    };
    // A range inside the Txn sees the Txn's own writes, at the Txn's revision.
    assert_eq!(g.header, header(3));
    assert_eq!(g.kvs, vec![kv("a", "2", 2, 3, 2)]);
    assert_eq!(get(&s, "b", 0).unwrap(), vec![kv("b", "1", 3, 3, 1)]);
}

#[test]
fn txn_checks_puts_before_ranges_and_keys_before_leases() {
    let (_dir, s) = temp_store();
    put(&s, "a", "1"); // 2
    let missing_key_and_lease = PutRequest {
        key: "x".into(),
        lease: 5,
        ignore_value: true,
        ..Default::default()
    };
    // A plain Put checks the lease first ...
    assert_eq!(
        apply(&s, WriteOp::Put(missing_key_and_lease.clone())),
        Err(KvError::LeaseNotFound)
    );
    // ... a put inside a Txn the key first (etcd's checkRequestPut) ...
    let t = TxnRequest {
        compare: vec![],
        success: vec![op(Request::RequestPut(missing_key_and_lease))],
        failure: vec![],
    };
    assert_eq!(txn(&s, t), Err(KvError::KeyNotFound));
    // ... and every put of a Txn is checked before any of its ranges.
    let t = TxnRequest {
        compare: vec![],
        success: vec![
            op(Request::RequestRange(get_req("a", 10))),
            op(Request::RequestPut(PutRequest {
                lease: 5,
                ..put_req("a", "2")
            })),
        ],
        failure: vec![],
    };
    assert_eq!(txn(&s, t), Err(KvError::LeaseNotFound));
    assert_eq!(s.current_revision(), 2);
}

/// A negative revision: a plain Range reads it as the current revision; a Range inside a Txn is
/// checked with it as given (etcd's `checkRequestRange`), so it is compacted below the
/// compacted revision, which is -1 before any compaction.
#[test]
fn negative_range_revisions_in_and_out_of_a_txn() {
    let (_dir, s) = temp_store();
    put(&s, "a", "1"); // 2
    put(&s, "a", "2"); // 3
    let in_txn = |rev: i64| TxnRequest {
        compare: vec![],
        success: vec![op(Request::RequestRange(get_req("a", rev)))],
        failure: vec![],
    };
    assert_eq!(get(&s, "a", -2).unwrap(), vec![kv("a", "2", 2, 3, 2)]);
    assert!(txn(&s, in_txn(-1)).is_ok());
    assert_eq!(txn(&s, in_txn(-2)), Err(KvError::Compacted));
    compact(&s, 2).unwrap();
    assert_eq!(get(&s, "a", -1).unwrap(), vec![kv("a", "2", 2, 3, 2)]);
    assert_eq!(txn(&s, in_txn(-1)), Err(KvError::Compacted));
    assert!(txn(&s, in_txn(0)).is_ok());
}

/// A from-key delete followed, in the same Txn, by a put that takes its value or lease from the
/// key it just deleted (etcd 3.4 panics applying this): refused whole, nothing written. A plain
/// put after the delete, and an `ignore_value` put before it, still go through as in etcd.
#[test]
fn txn_refuses_ignore_flags_on_a_key_it_deleted_from() {
    let (_dir, s) = temp_store();
    put(&s, "a/1", "x"); // 2
    put(&s, "a/2", "y"); // 3
    let from_a1 = || op(Request::RequestDeleteRange(del_req("a/1", "\0")));
    let keep = |ignore_value: bool| PutRequest {
        key: "a/2".into(),
        value: if ignore_value { vec![] } else { b"z".to_vec() },
        ignore_value,
        ignore_lease: !ignore_value,
        ..Default::default()
    };
    for ignore_value in [true, false] {
        // At the outer level ...
        let t = TxnRequest {
            compare: vec![],
            success: vec![from_a1(), op(Request::RequestPut(keep(ignore_value)))],
            failure: vec![],
        };
        assert_eq!(txn(&s, t), Err(KvError::KeyNotFound));
        // ... and with the delete in a nested Txn that runs first.
        let nested = TxnRequest {
            compare: vec![],
            success: vec![from_a1()],
            failure: vec![],
        };
        let t = TxnRequest {
            compare: vec![],
            success: vec![
                op(Request::RequestTxn(nested)),
                op(Request::RequestPut(keep(ignore_value))),
            ],
            failure: vec![],
        };
        assert_eq!(txn(&s, t), Err(KvError::KeyNotFound));
    }
    assert_eq!(s.current_revision(), 3);
    assert_eq!(get(&s, "a/2", 0).unwrap(), vec![kv("a/2", "y", 3, 3, 1)]);

    // The put first, then the delete: the flags find their key.
    let t = TxnRequest {
        compare: vec![],
        success: vec![op(Request::RequestPut(keep(true))), from_a1()],
        failure: vec![],
    };
    assert!(txn(&s, t).unwrap().succeeded);
    assert_eq!(s.current_revision(), 4);
    assert_eq!(get(&s, "a/2", 0).unwrap(), vec![]);

    // A plain put after the delete recreates the key in the same revision.
    put(&s, "a/1", "x"); // 5
    let t = TxnRequest {
        compare: vec![],
        success: vec![from_a1(), op(Request::RequestPut(put_req("a/1", "w")))],
        failure: vec![],
    };
    assert!(txn(&s, t).unwrap().succeeded);
    assert_eq!(get(&s, "a/1", 0).unwrap(), vec![kv("a/1", "w", 6, 6, 1)]);
}

#[test]
fn history_spans_sled_and_writes_still_queued_for_it() {
    // Flushing between rounds leaves the older revisions in sled while the newest may still be
    // queued for it; history must give every revision once, in order, wherever it is.
    let (_dir, s) = temp_store();
    let mut revs = Vec::new();
    for round in 0..3 {
        for i in 0..10 {
            revs.push(put(&s, &format!("k{round}-{i}"), "v"));
        }
        if round < 2 {
            s.flush().unwrap();
        }
        let events = s.history(None, 1, s.current_revision()).unwrap();
        let got: Vec<i64> = events
            .iter()
            .map(|e| e.kv.as_ref().unwrap().mod_revision)
            .collect();
        assert_eq!(got, revs, "round {round}");
    }
}

/// Bytes under `dir`. sled renames and removes files of a live database in the background, so
/// one that vanishes between listing and reading counts as nothing.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let m = match e.metadata() {
                Ok(m) => m,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => return 0,
                Err(err) => panic!("{}: {err}", e.path().display()),
            };
            if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

fn with_suffix(path: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

#[test]
fn defragment_gives_compacted_space_back_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv");
    let s = KvStore::open_path(&path).unwrap();
    let big = "x".repeat(16 * 1024);
    for i in 0..400 {
        put(&s, &format!("k{}", i % 4), &format!("{i}{big}"));
    }
    let rev = s.current_revision();
    assert!(compact(&s, rev).is_ok());
    let before_history = history(&s);
    let before_hash = s.hash_kv(0).unwrap().unwrap().hash;
    s.flush().unwrap();
    let full = dir_bytes(&path);
    s.defragment().unwrap();
    let defragged = dir_bytes(&path);
    assert!(defragged < full / 2, "{full} -> {defragged}");
    // The old generation is gone, and nothing else was left beside the store.
    assert_eq!(dir_names(&path), ["CURRENT", "gen-1"]);
    assert_eq!(dir_names(dir.path()), ["kv"]);
    // Same data, same hash, and writes go on into the new database.
    assert_eq!(history(&s), before_history);
    assert_eq!(s.hash_kv(0).unwrap().unwrap().hash, before_hash);
    assert_eq!(put(&s, "after", "1"), rev + 1);
    s.flush().unwrap();
    drop(s);
    let s = KvStore::open_path(&path).unwrap();
    assert_eq!(s.current_revision(), rev + 1);
    assert_eq!(get(&s, "after", 0).unwrap().len(), 1);
    assert_eq!(
        get(&s, "k3", 0).unwrap()[0].value,
        format!("399{big}").into_bytes()
    );
}

/// sled keeps pages over 128 KiB as files under `blobs/` that it opens and deletes by path, so a
/// defragmentation must never move or reuse the directory of a database still open: the old one
/// would read and delete the new one's blobs (CI caught reads failing with ENOENT after a
/// defragmentation of 64 KiB values). Readers run throughout, as a kube-apiserver's would.
#[test]
fn defragment_keeps_large_values_readable_and_writable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv");
    let s = std::sync::Arc::new(KvStore::open_path(&path).unwrap());
    let value = |i: usize| format!("{i:08}").repeat(64 * 1024 / 8);
    // More than sled's page cache and the value cache hold, so readers go to the files.
    let keys = 400;
    let mut written = 0;
    let check = |s: &KvStore, written: usize, label: &str| {
        for k in 0..keys {
            let last = (0..written).rev().find(|i| i % keys == k).unwrap();
            let got = get(s, &format!("fill/{k}"), 0).unwrap();
            assert_eq!(got.len(), 1, "{label}: fill/{k}");
            assert!(
                got[0].value == value(last).as_bytes(),
                "{label}: fill/{k} is not value {last}"
            );
        }
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = range(&s, &all_req(0)).expect("read during a defragmentation");
                assert!(r.kvs.iter().all(|kv| kv.value.len() == 64 * 1024));
                reads += 1;
            }
            reads
        })
    };
    for round in 0..3 {
        for _ in 0..if round == 0 { keys } else { 60 } {
            put(&s, &format!("fill/{}", written % keys), &value(written));
            written += 1;
        }
        assert!(compact(&s, s.current_revision()).is_ok());
        s.wait_compaction(s.current_revision());
        s.defragment().unwrap();
        check(
            &s,
            written,
            &format!("round {round}, right after the defragmentation"),
        );
        // The new database rewrites its pages (and blobs) while the old one is closing.
        for _ in 0..30 {
            put(&s, &format!("fill/{}", written % keys), &value(written));
            written += 1;
            s.flush().unwrap();
        }
        check(&s, written, &format!("round {round}, after more writes"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    s.flush().unwrap();
    let s = std::sync::Arc::into_inner(s).unwrap();
    drop(s);
    let s = KvStore::open_path(&path).unwrap();
    check(&s, written, "after reopening");
}

/// Copies a directory tree (a sled database: files and `blobs/`).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The names in a directory, sorted.
fn dir_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Every state a crash can leave on disk — during a defragmentation, during the move of an
/// older version's store into generations, or of that version's rename-based swap — opens as
/// the one complete store, with nothing else left beside it.
#[test]
fn a_crash_in_the_middle_of_a_defragmentation_leaves_one_whole_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv");
    let s = KvStore::open_path(&path).unwrap();
    put(&s, "a", "1");
    put(&s, "b", "2");
    s.flush().unwrap();
    drop(s);
    assert_eq!(dir_names(&path), ["CURRENT", "gen-0"]);
    let pristine = dir.path().join("pristine");
    copy_dir(&path.join("gen-0"), &pristine);
    let reset = || {
        for p in [
            path.clone(),
            with_suffix(&path, ".old"),
            with_suffix(&path, ".defrag"),
        ] {
            let _ = std::fs::remove_dir_all(p);
        }
    };
    let check = |label: &str, generation: &str| {
        let s = KvStore::open_path(&path).unwrap();
        assert_eq!(s.current_revision(), 3, "{label}");
        assert_eq!(get(&s, "b", 0).unwrap().len(), 1, "{label}");
        drop(s);
        assert_eq!(dir_names(&path), ["CURRENT", generation], "{label}");
        assert_eq!(
            std::fs::read_to_string(path.join("CURRENT"))
                .unwrap()
                .trim(),
            generation,
            "{label}"
        );
        assert!(!with_suffix(&path, ".old").exists(), "{label}");
        assert!(!with_suffix(&path, ".defrag").exists(), "{label}");
    };

    // Defragmenting generation 0 into 1: an unfinished copy, a torn `CURRENT.tmp`.
    std::fs::create_dir_all(path.join("gen-1")).unwrap();
    std::fs::write(path.join("gen-1").join("db"), b"torn").unwrap();
    std::fs::write(path.join("CURRENT.tmp"), b"gen-").unwrap();
    check("unfinished copy", "gen-0");
    // Switched to generation 1, the old one not yet removed.
    copy_dir(&pristine, &path.join("gen-1"));
    std::fs::write(path.join("CURRENT"), b"gen-1\n").unwrap();
    std::fs::write(path.join("gen-0").join("db"), b"no longer used").unwrap();
    check("old generation left behind", "gen-1");

    // An earlier version's store: sled's files directly in `kv/`.
    reset();
    copy_dir(&pristine, &path);
    check("flat store", "gen-0");
    // A crash while moving them into generation 0.
    reset();
    copy_dir(&pristine, &path);
    std::fs::create_dir_all(path.join("gen-0")).unwrap();
    std::fs::rename(path.join("conf"), path.join("gen-0").join("conf")).unwrap();
    check("half-moved flat store", "gen-0");

    // The earlier version's rename-based swap: an unfinished copy beside the original...
    reset();
    copy_dir(&pristine, &path);
    std::fs::create_dir_all(with_suffix(&path, ".defrag")).unwrap();
    std::fs::write(with_suffix(&path, ".defrag").join("db"), b"torn").unwrap();
    check("unfinished renamed copy", "gen-0");
    // ... between its two renames: only the original, under its `.old` name ...
    reset();
    copy_dir(&pristine, &with_suffix(&path, ".old"));
    copy_dir(&pristine, &with_suffix(&path, ".defrag"));
    check("between the renames", "gen-0");
    // ... and after the swap, before the original was removed.
    reset();
    copy_dir(&pristine, &path);
    copy_dir(&pristine, &with_suffix(&path, ".old"));
    check("original left behind", "gen-0");

    // `CURRENT` naming what is not there is corruption, not an empty store to start over.
    std::fs::write(path.join("CURRENT"), b"gen-7\n").unwrap();
    assert!(KvStore::open_path(&path).is_err());
}

// --- large reads racing writes and compactions -----------------------------------------------

/// Large Ranges load their values without the index lock while writes publish and compactions
/// delete history (see `KvStore::range`): whatever they return must still be one revision's
/// state, each key with the value written at its `mod_revision`.
#[test]
fn large_ranges_stay_consistent_under_writes_and_compactions() {
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;
    use std::time::Duration;
    use std::time::Instant;

    const KEYS: usize = 300;
    let (_dir, s) = temp_store();
    s.set_compaction_pacing(fetcd_storage::CompactionPacing {
        batch_limit: 16,
        sleep: Duration::ZERO,
    });
    // Every value names its key and the write: what a revision must hold, by revision.
    let written = Mutex::new(HashMap::new());
    let mut n = 0u64;
    let mut write = |s: &KvStore, k: usize| {
        let (key, value) = (format!("k{k:03}"), format!("k{k:03}@{n}"));
        n += 1;
        let rev = put(s, &key, &value);
        written.lock().unwrap().insert(rev, (key, value));
    };
    for k in 0..KEYS {
        write(&s, k);
    }
    let stop = AtomicBool::new(false);
    let seen = Mutex::new(Vec::new());
    let (mut reads, mut compacted) = (0u32, 0u32);
    std::thread::scope(|scope| {
        let rangers: Vec<_> = (0..2)
            .map(|t| {
                let (s, stop, seen) = (&s, &stop, &seen);
                scope.spawn(move || {
                    let (mut reads, mut compacted) = (0u32, 0u32);
                    let mut i = 0i64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        // The current revision, or one up to 40 back (often compacted away)
                        // but not before every key was written.
                        let rev = if i % 2 == 0 {
                            0
                        } else {
                            (s.current_revision() - i % 41).max(KEYS as i64 + 1)
                        };
                        let req = RangeRequest {
                            keys_only: t == 1 && i % 3 == 0,
                            ..all_req(rev)
                        };
                        let resp = match range(s, &req) {
                            Ok(r) => r,
                            Err(KvError::Compacted) => {
                                compacted += 1;
                                continue;
                            }
                            Err(e) => panic!("range at {rev}: {e}"),
                        };
                        reads += 1;
                        let at = if rev == 0 {
                            resp.header.unwrap().revision
                        } else {
                            rev
                        };
                        assert_eq!(resp.kvs.len(), KEYS, "range at {at}");
                        assert_eq!(resp.count as usize, KEYS, "range at {at}");
                        let mut kvs = Vec::with_capacity(KEYS);
                        for kv in resp.kvs {
                            assert!(kv.mod_revision <= at, "{kv:?} in a range at {at}");
                            let value = (!req.keys_only).then(|| kv.value.to_vec());
                            kvs.push((kv.mod_revision, kv.key, value));
                        }
                        seen.lock().unwrap().push(kvs);
                    }
                    (reads, compacted)
                })
            })
            .collect();
        let (s, stop) = (&s, &stop);
        let compactor = scope.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let rev = s.current_revision() - 20;
                if rev > s.compact_revision() {
                    compact(s, rev).unwrap();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let until = Instant::now() + Duration::from_millis(1500);
        let mut k = 0;
        while Instant::now() < until {
            write(s, k % KEYS);
            k += 7;
        }
        stop.store(true, Ordering::Relaxed);
        compactor.join().unwrap();
        for r in rangers {
            let (r, c) = r.join().unwrap();
            reads += r;
            compacted += c;
        }
    });
    assert!(reads > 10, "only {reads} ranges answered");
    assert!(compacted > 0, "no range raced a compaction");
    let written = written.into_inner().unwrap();
    for kvs in seen.into_inner().unwrap() {
        for (rev, key, value) in kvs {
            let (k, v) = &written[&rev];
            assert_eq!(&key, k.as_bytes(), "key at revision {rev}");
            if let Some(value) = value {
                assert_eq!(&value, v.as_bytes(), "value at revision {rev}");
            }
        }
    }
}
