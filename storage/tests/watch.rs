//! Watch guarantees at the store: ordered, gap-free, duplicate-free delivery even when a
//! consumer is slow; compaction cancels a watcher that fell behind it; progress never reports a
//! revision ahead of undelivered events.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;

use fetcd_proto::etcdserverpb::CompactionRequest;
use fetcd_proto::etcdserverpb::PutRequest;
use fetcd_proto::etcdserverpb::ResponseHeader;
use fetcd_proto::etcdserverpb::WatchResponse;
use fetcd_proto::mvccpb::Event;
use fetcd_storage::KeyRange;
use fetcd_storage::KvStore;
use fetcd_storage::SendOutcome;
use fetcd_storage::WatchKey;
use fetcd_storage::WatchMessage;
use fetcd_storage::WatchSink;
use fetcd_storage::WatchSpec;
use fetcd_storage::WriteOp;
use prost::Message;

/// A bounded queue like a stream's, drained by the test.
struct TestSink {
    cap: usize,
    q: Mutex<VecDeque<WatchResponse>>,
}

impl TestSink {
    fn new(cap: usize) -> Arc<Self> {
        Arc::new(TestSink {
            cap,
            q: Mutex::new(VecDeque::new()),
        })
    }

    fn drain(&self) -> Vec<WatchResponse> {
        self.q.lock().unwrap().drain(..).collect()
    }
}

/// The response a stream would send for `msg`, with events decoded from their shared encoding
/// (so the encoding is checked too).
fn response(msg: WatchMessage) -> WatchResponse {
    match msg {
        WatchMessage::Response(r) => *r,
        WatchMessage::Events {
            watch_id,
            revision,
            events,
        } => WatchResponse {
            header: Some(ResponseHeader {
                revision,
                ..Default::default()
            }),
            watch_id,
            events: events
                .iter()
                .map(|e| {
                    let ev = Event::decode(e.encoded().as_ref()).unwrap();
                    assert_eq!(&ev, e.event());
                    ev
                })
                .collect(),
            ..Default::default()
        },
    }
}

impl WatchSink for TestSink {
    fn try_send(&self, msg: WatchMessage) -> SendOutcome {
        let mut q = self.q.lock().unwrap();
        if q.len() >= self.cap {
            return SendOutcome::Full;
        }
        q.push_back(response(msg));
        SendOutcome::Sent
    }

    fn is_full(&self) -> bool {
        self.q.lock().unwrap().len() >= self.cap
    }
}

fn put(store: &KvStore, k: &str, v: &str) -> i64 {
    let r = store
        .apply([(
            WriteOp::Put(PutRequest {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            }),
            vec![],
        )])
        .unwrap();
    match &r[0] {
        Ok(fetcd_storage::WriteResponse::Put(p)) => p.header.as_ref().unwrap().revision,
        other => panic!("{other:?}"),
    }
}

fn spec(range: KeyRange, start: i64) -> WatchSpec {
    WatchSpec {
        range,
        start_revision: start,
        no_put: false,
        no_delete: false,
    }
}

/// (revision, key, value) of every event, in delivery order.
fn events(resps: &[WatchResponse]) -> Vec<(i64, String, String)> {
    resps
        .iter()
        .flat_map(|r| r.events.iter())
        .map(|e| {
            let kv = e.kv.as_ref().unwrap();
            (
                kv.mod_revision,
                String::from_utf8(kv.key.clone()).unwrap(),
                String::from_utf8(kv.value.to_vec()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn slow_consumer_falls_behind_and_catches_up_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path());
    let sink = TestSink::new(3);
    let key = WatchKey { stream: 1, id: 0 };
    let created = store.watch(key, spec(KeyRange::new(b"k", b"l"), 0), sink.clone());
    assert_eq!(created, 1);
    store.activate_watch(key);
    store.sync_watchers(1000).unwrap();
    assert!(!store.has_unsynced_watchers());

    let mut expected = Vec::new();
    let mut got = Vec::new();
    for i in 0..50 {
        let k = format!("k{}", i % 7);
        let rev = put(&store, &k, &i.to_string());
        put(&store, "other", "x"); // not watched
        expected.push((rev, k, i.to_string()));
        if i % 9 == 0 {
            // The consumer wakes up now and then; the catch-up runs in between.
            got.extend(events(&sink.drain()));
            store.sync_watchers(4).unwrap();
        }
    }
    // Writers never waited: all 100 writes are in. Now let the watcher catch up.
    for _ in 0..100 {
        got.extend(events(&sink.drain()));
        store.sync_watchers(4).unwrap();
        if !store.has_unsynced_watchers() && sink.q.lock().unwrap().is_empty() {
            break;
        }
    }
    got.extend(events(&sink.drain()));
    assert_eq!(got, expected, "events lost, repeated or reordered");
    // Live again: the next write arrives directly.
    let rev = put(&store, "k9", "live");
    assert_eq!(
        events(&sink.drain()),
        vec![(rev, "k9".to_string(), "live".to_string())]
    );
}

#[test]
fn history_then_live_without_gap_and_compaction_cancels_laggards() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path());
    for i in 0..10 {
        put(&store, "a", &i.to_string()); // revisions 2..=11
    }
    let sink = TestSink::new(100);
    let from5 = WatchKey { stream: 1, id: 1 };
    store.watch(
        from5,
        spec(KeyRange::Single(b"a".to_vec()), 5),
        sink.clone(),
    );
    store.activate_watch(from5);
    store.sync_watchers(1000).unwrap();
    put(&store, "a", "live"); // 12
    let revs: Vec<i64> = events(&sink.drain()).iter().map(|e| e.0).collect();
    assert_eq!(revs, (5..=12).collect::<Vec<_>>());

    // A watcher that starts exactly at the compaction revision is served; one below it is
    // canceled with compact_revision set.
    store
        .apply([(
            WriteOp::Compaction(CompactionRequest {
                revision: 8,
                physical: true,
            }),
            vec![],
        )])
        .unwrap();
    let at = WatchKey { stream: 2, id: 0 };
    let below = WatchKey { stream: 2, id: 1 };
    let s2 = TestSink::new(100);
    store.watch(at, spec(KeyRange::Single(b"a".to_vec()), 8), s2.clone());
    store.watch(below, spec(KeyRange::Single(b"a".to_vec()), 7), s2.clone());
    store.activate_watch(at);
    store.activate_watch(below);
    store.sync_watchers(1000).unwrap();
    let resps = s2.drain();
    let at_revs: Vec<i64> = resps
        .iter()
        .filter(|r| r.watch_id == 0)
        .flat_map(|r| r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision))
        .collect();
    assert_eq!(at_revs, (8..=12).collect::<Vec<_>>());
    let cancel: Vec<&WatchResponse> = resps.iter().filter(|r| r.watch_id == 1).collect();
    assert_eq!(cancel.len(), 1);
    assert!(cancel[0].canceled && cancel[0].compact_revision == 8 && cancel[0].events.is_empty());
    assert_eq!(store.watchers().len(), 2, "canceled watcher removed");
}

#[test]
fn progress_waits_until_the_stream_is_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path());
    let sink = TestSink::new(1);
    let key = WatchKey { stream: 7, id: 0 };
    store.watch(key, spec(KeyRange::new(b"k", b"l"), 0), sink.clone());
    store.activate_watch(key);
    store.sync_watchers(1000).unwrap();
    // Synced and idle: progress right away, at the current revision.
    assert_eq!(store.request_progress(7, sink.clone()), Some(1));

    put(&store, "k1", "a"); // 2: queued
    put(&store, "k2", "b"); // 3: queue full -> unsynced at 3
    assert!(store.has_unsynced_watchers());
    assert_eq!(
        store.request_progress(7, sink.clone()),
        None,
        "would run ahead of revision 3"
    );
    let first = sink.drain();
    assert_eq!(events(&first)[0].0, 2);
    store.sync_watchers(1000).unwrap(); // delivers 3, becomes synced, then answers the progress
    let rest = sink.drain();
    assert_eq!(events(&rest), vec![(3, "k2".to_string(), "b".to_string())]);
    store.sync_watchers(1000).unwrap();
    let progress = sink.drain();
    assert_eq!(progress.len(), 1, "{progress:?}");
    assert_eq!(progress[0].watch_id, -1);
    assert_eq!(progress[0].header.as_ref().unwrap().revision, 3);
}

#[test]
fn one_catch_up_round_gives_each_lagging_watcher_exactly_its_own_events() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path());
    // History on two keys, with deletes: (revision, key, is a put).
    let mut history = Vec::new();
    for i in 0..12 {
        let k = if i % 3 == 0 { "b" } else { "a" };
        if i % 4 == 3 {
            let r = store
                .apply([(
                    WriteOp::DeleteRange(fetcd_proto::etcdserverpb::DeleteRangeRequest {
                        key: k.into(),
                        ..Default::default()
                    }),
                    vec![],
                )])
                .unwrap();
            let rev = match &r[0] {
                Ok(fetcd_storage::WriteResponse::DeleteRange(d)) => {
                    d.header.as_ref().unwrap().revision
                }
                other => panic!("{other:?}"),
            };
            history.push((rev, k.to_string(), false));
        } else {
            history.push((put(&store, k, &i.to_string()), k.to_string(), true));
        }
    }
    // Watchers asking for the same events share one selection in a round; each of these asks
    // for something different from the one before it in at least one respect.
    let a = || KeyRange::Single(b"a".to_vec());
    let both = || KeyRange::new(b"a", b"c");
    let wants = [
        (a(), 2, false, false),
        (a(), 2, true, false),
        (a(), 2, false, true),
        (a(), 5, false, false),
        (both(), 2, false, false),
        (a(), 2, false, false),
        (both(), 5, true, false),
    ];
    let sink = TestSink::new(100);
    for (id, (range, start, no_put, no_delete)) in wants.iter().enumerate() {
        let key = WatchKey {
            stream: 1,
            id: id as i64,
        };
        let spec = WatchSpec {
            range: range.clone(),
            start_revision: *start,
            no_put: *no_put,
            no_delete: *no_delete,
        };
        store.watch(key, spec, sink.clone());
        store.activate_watch(key);
    }
    store.sync_watchers(1000).unwrap();
    assert!(!store.has_unsynced_watchers());
    let resps = sink.drain();
    for (id, (range, start, no_put, no_delete)) in wants.iter().enumerate() {
        let got: Vec<(i64, String, bool)> = resps
            .iter()
            .filter(|r| r.watch_id == id as i64)
            .flat_map(|r| r.events.iter())
            .map(|e| {
                let kv = e.kv.as_ref().unwrap();
                (
                    kv.mod_revision,
                    String::from_utf8(kv.key.clone()).unwrap(),
                    e.r#type == 0,
                )
            })
            .collect();
        let expected: Vec<(i64, String, bool)> = history
            .iter()
            .filter(|(rev, k, put)| {
                *rev >= *start
                    && range.contains(k.as_bytes())
                    && if *put { !*no_put } else { !*no_delete }
            })
            .cloned()
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(got, expected, "watch {id}");
    }
}
