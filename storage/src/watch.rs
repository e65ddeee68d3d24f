//! Watchers and event fan-out (etcd's `watchableStore`, `watcherGroup`).
//!
//! A watcher is in one of three states:
//! - **inactive**: registered, its `created` response not yet queued by the server; nothing is
//!   sent to it, so no event can overtake `created`;
//! - **unsynced**: behind the store; the catch-up round ([`WatchHub`] via
//!   `KvStore::sync_watchers`) reads its missing events from the `key` tree history;
//! - **synced**: caught up; every new revision's matching events are pushed to it at commit.
//!
//! Guarantees, and how they are kept:
//! - *No gap, no repeat, in order.* A synced watcher's `min_rev` is always `current + 1`: it gets
//!   exactly the revisions notified after it became synced. An unsynced watcher's `min_rev` is the
//!   first revision it has not received; catch-up advances it only past events it delivered, and
//!   it turns synced only under the hub lock when `min_rev > current`, so notification (which
//!   takes the same lock) cannot slip a revision between.
//! - *Writers never wait for readers.* Delivery is a non-blocking `try_send` to the stream's
//!   bounded queue; a full queue turns the watcher unsynced at that revision (etcd's victim),
//!   and it catches up from history, in order, when there is room.
//! - *Compaction.* A watcher whose `min_rev` is below the compaction revision gets one response
//!   with `compact_revision` set and `canceled`, then it is removed — never a silent skip.
//! - *Atomic revisions.* All events of one revision for one watcher go in one response (the
//!   server may fragment it only if the watcher asked).
//!
//! *Encoded once.* Each event becomes one [`SharedEvent`], encoded (with and without `prev_kv`)
//! at most once however many watchers receive it; watchers share it by reference count.
//!
//! Events are notified while the store's index lock is held for writing (like etcd's
//! `watchableStoreTxnWrite.End`): events of revision R are queued before any reader can observe
//! R. Lock order is index → hub, never the reverse.

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::OnceLock;

use bytes::Bytes;

use fetcd_proto::etcdserverpb::ResponseHeader;
use fetcd_proto::etcdserverpb::WatchResponse;
use fetcd_proto::mvccpb::event::EventType;
use fetcd_proto::mvccpb::Event;
use fetcd_proto::mvccpb::KeyValue;
use prost::Message;

use crate::interval_tree::IntervalTree;
use crate::kv::KeyRange;

/// A watch: the gRPC stream it lives on and its id on that stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WatchKey {
    /// Server-wide id of the client stream.
    pub stream: u64,
    /// The watch id on that stream (`WatchResponse.watch_id`).
    pub id: i64,
}

/// What a delivery attempt did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Queued for the client.
    Sent,
    /// The stream's queue is full; try again later.
    Full,
    /// The stream is gone.
    Closed,
}

/// One event, built once and shared by every watcher it goes to, with its protobuf encoding
/// made on first use (so a revision with a thousand watchers is encoded once, not a thousand
/// times).
#[derive(Debug)]
pub struct SharedEvent {
    event: Event,
    encoded: OnceLock<Bytes>,
    with_prev: OnceLock<Bytes>,
}

impl SharedEvent {
    /// Wraps `event` (without `prev_kv`) for sharing.
    pub fn new(event: Event) -> Arc<Self> {
        Arc::new(SharedEvent {
            event,
            encoded: OnceLock::new(),
            with_prev: OnceLock::new(),
        })
    }

    /// The event, without `prev_kv`.
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// True for a PUT event.
    pub fn is_put(&self) -> bool {
        self.event.r#type == EventType::Put as i32
    }

    /// True for the PUT that created its key (etcd's `IsCreate`): it has no previous value.
    pub fn is_create(&self) -> bool {
        self.is_put()
            && self
                .event
                .kv
                .as_ref()
                .is_some_and(|kv| kv.create_revision == kv.mod_revision)
    }

    /// The encoded `mvccpb.Event`, without `prev_kv`.
    pub fn encoded(&self) -> &Bytes {
        self.encoded
            .get_or_init(|| Bytes::from(self.event.encode_to_vec()))
    }

    /// The encoded event with `prev_kv` set to what `prev` finds (called at most once per
    /// event; a create has no previous value, and `None` leaves `prev_kv` empty as in etcd).
    pub fn encoded_with_prev(&self, prev: impl FnOnce(&Event) -> Option<KeyValue>) -> &Bytes {
        self.with_prev.get_or_init(|| {
            if self.is_create() {
                return self.encoded().clone();
            }
            match prev(&self.event) {
                None => self.encoded().clone(),
                Some(p) => {
                    let mut ev = self.event.clone();
                    ev.prev_kv = Some(p);
                    Bytes::from(ev.encode_to_vec())
                }
            }
        })
    }
}

/// What the store hands a stream.
#[derive(Debug)]
pub enum WatchMessage {
    /// Events of one watch, in revision order; all of a revision's events are in one message.
    Events {
        /// The watch (`WatchResponse.watch_id`).
        watch_id: i64,
        /// The header revision to report.
        revision: i64,
        /// The events, shared with the other watchers they go to (the list itself too, when a
        /// watcher gets all of a revision's events).
        events: Arc<[Arc<SharedEvent>]>,
    },
    /// Any other response: a compaction cancel or a progress notification.
    Response(WatchResponse),
}

/// Where a stream's responses go: a bounded, non-blocking queue owned by the server.
pub trait WatchSink: Send + Sync {
    /// Queues `msg` without waiting.
    fn try_send(&self, msg: WatchMessage) -> SendOutcome;

    /// True if nothing could be queued now; catch-up skips the history read then.
    fn is_full(&self) -> bool;
}

/// What a watcher wants, decoded from a `WatchCreateRequest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchSpec {
    /// Keys watched.
    pub range: KeyRange,
    /// First revision wanted; 0 = after the current one.
    pub start_revision: i64,
    /// Drop PUT events.
    pub no_put: bool,
    /// Drop DELETE events.
    pub no_delete: bool,
}

impl WatchSpec {
    /// False for events the filters drop.
    pub fn wants_event(&self, ev: &SharedEvent) -> bool {
        let put = ev.is_put();
        !(put && self.no_put || !put && self.no_delete)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Inactive,
    Unsynced,
    Synced,
}

struct Watcher {
    /// Distinguishes re-registrations of the same key across a catch-up round.
    gen: u64,
    spec: WatchSpec,
    /// First revision not yet delivered (meaningful while not synced).
    min_rev: i64,
    state: State,
    sink: Arc<dyn WatchSink>,
}

/// Finds synced watchers for a key without scanning all of them: exact keys and prefixes
/// (kube-apiserver's shapes) by hash lookups, other intervals by an interval tree.
#[derive(Default)]
struct Matcher {
    exact: HashMap<Vec<u8>, HashSet<WatchKey>>,
    prefix: HashMap<Vec<u8>, HashSet<WatchKey>>,
    other: IntervalTree<WatchKey>,
}

/// The end of the prefix range of `p` (etcd's `GetPrefixRangeEnd`), if it has one.
fn prefix_end(p: &[u8]) -> Option<Vec<u8>> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

enum Shape<'a> {
    Exact(&'a [u8]),
    Prefix(&'a [u8]),
    /// `[start, end)`, `end == None` for every key from `start` on.
    Other(&'a [u8], Option<&'a [u8]>),
}

fn shape(range: &KeyRange) -> Shape<'_> {
    match range {
        KeyRange::Single(k) => Shape::Exact(k),
        KeyRange::Interval {
            start,
            end: Some(end),
        } if !start.is_empty() && prefix_end(start).as_deref() == Some(end.as_slice()) => {
            Shape::Prefix(start)
        }
        KeyRange::Interval { start, end } => Shape::Other(start, end.as_deref()),
    }
}

impl Matcher {
    fn add(&mut self, key: WatchKey, range: &KeyRange) {
        match shape(range) {
            Shape::Exact(k) => {
                self.exact.entry(k.to_vec()).or_default().insert(key);
            }
            Shape::Prefix(p) => {
                self.prefix.entry(p.to_vec()).or_default().insert(key);
            }
            Shape::Other(start, end) => self.other.insert(start, end, key),
        }
    }

    fn remove(&mut self, key: WatchKey, range: &KeyRange) {
        let remove_from = |m: &mut HashMap<Vec<u8>, HashSet<WatchKey>>, k: &[u8]| {
            if let Some(set) = m.get_mut(k) {
                set.remove(&key);
                if set.is_empty() {
                    m.remove(k);
                }
            }
        };
        match shape(range) {
            Shape::Exact(k) => remove_from(&mut self.exact, k),
            Shape::Prefix(p) => remove_from(&mut self.prefix, p),
            Shape::Other(start, _) => {
                self.other.remove(start, key);
            }
        }
    }

    fn matches(&self, k: &[u8], out: &mut Vec<WatchKey>) {
        if let Some(s) = self.exact.get(k) {
            out.extend(s.iter().copied());
        }
        if !self.prefix.is_empty() {
            for i in 1..=k.len() {
                if let Some(s) = self.prefix.get(&k[..i]) {
                    out.extend(s.iter().copied());
                }
            }
        }
        if self.other.len() > 0 {
            self.other.stab(k, out);
        }
    }
}

#[derive(Default)]
struct HubState {
    /// The newest revision notified (equal to the store's current revision at rest).
    current: i64,
    next_gen: u64,
    watchers: HashMap<WatchKey, Watcher>,
    synced: Matcher,
    /// Streams that asked for progress while some of their watchers were behind.
    pending_progress: HashMap<u64, Arc<dyn WatchSink>>,
}

/// Registry of watchers of one store.
#[derive(Default)]
pub struct WatchHub {
    state: Mutex<HubState>,
}

impl std::fmt::Debug for WatchHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHub").finish_non_exhaustive()
    }
}

/// A copy of an unsynced watcher's needs, for a catch-up round done without the hub lock.
#[derive(Clone)]
pub(crate) struct CatchUp {
    pub key: WatchKey,
    pub gen: u64,
    pub spec: WatchSpec,
    pub min_rev: i64,
    pub sink: Arc<dyn WatchSink>,
}

impl WatchHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_current(&self, rev: i64) {
        self.lock().current = rev;
    }

    /// Registers an inactive watcher; returns the revision its `created` response reports.
    pub(crate) fn register(&self, key: WatchKey, spec: WatchSpec, sink: Arc<dyn WatchSink>) -> i64 {
        let mut st = self.lock();
        let current = st.current;
        // 0 means "after now"; a negative start is kept as etcd keeps it (no history, and a
        // compacted cancel once a compaction passes it).
        let min_rev = if spec.start_revision != 0 {
            spec.start_revision
        } else {
            current + 1
        };
        if let Some(old) = st.watchers.remove(&key) {
            if old.state == State::Synced {
                st.synced.remove(key, &old.spec.range);
            }
        }
        st.next_gen += 1;
        let gen = st.next_gen;
        st.watchers.insert(
            key,
            Watcher {
                gen,
                spec,
                min_rev,
                state: State::Inactive,
                sink,
            },
        );
        current
    }

    /// Lets an inactive watcher receive events (its `created` response is queued).
    pub(crate) fn activate(&self, key: WatchKey) {
        if let Some(w) = self.lock().watchers.get_mut(&key) {
            if w.state == State::Inactive {
                w.state = State::Unsynced;
            }
        }
    }

    /// Removes the watcher a catch-up round worked for, unless it was replaced meanwhile.
    pub(crate) fn cancel_caught_up(&self, c: &CatchUp) {
        let same = self
            .lock()
            .watchers
            .get(&c.key)
            .is_some_and(|w| w.gen == c.gen);
        if same {
            self.cancel(c.key);
        }
    }

    /// Removes a watcher; false if it did not exist.
    pub(crate) fn cancel(&self, key: WatchKey) -> bool {
        let mut st = self.lock();
        match st.watchers.remove(&key) {
            Some(w) => {
                if w.state == State::Synced {
                    st.synced.remove(key, &w.spec.range);
                }
                true
            }
            None => false,
        }
    }

    /// Removes every watcher of a stream.
    pub(crate) fn cancel_stream(&self, stream: u64) {
        let mut st = self.lock();
        let keys: Vec<WatchKey> = st
            .watchers
            .keys()
            .filter(|k| k.stream == stream)
            .copied()
            .collect();
        for key in keys {
            if let Some(w) = st.watchers.remove(&key) {
                if w.state == State::Synced {
                    st.synced.remove(key, &w.spec.range);
                }
            }
        }
        st.pending_progress.remove(&stream);
    }

    /// Pushes one revision's events to the synced watchers they match. Called with the store's
    /// index write lock held, in revision order.
    pub(crate) fn notify(&self, rev: i64, events: Vec<Event>) {
        let mut st = self.lock();
        st.current = rev;
        if st.watchers.is_empty() {
            return;
        }
        // (watcher, event index) for every match, in event order per watcher.
        let mut hits: Vec<(WatchKey, usize)> = Vec::new();
        let mut scratch = Vec::new();
        for (i, ev) in events.iter().enumerate() {
            let Some(kv) = &ev.kv else { continue };
            scratch.clear();
            st.synced.matches(&kv.key, &mut scratch);
            hits.extend(scratch.iter().map(|w| (*w, i)));
        }
        if hits.is_empty() {
            return;
        }
        if events.len() > 1 {
            // Stable: each watcher's events stay in revision order.
            hits.sort_by_key(|(w, _)| *w);
        }
        let shared: Arc<[Arc<SharedEvent>]> = events.into_iter().map(SharedEvent::new).collect();
        let mut demote = Vec::new();
        let mut closed = Vec::new();
        for group in hits.chunk_by(|a, b| a.0 == b.0) {
            let key = group[0].0;
            let Some(w) = st.watchers.get(&key) else {
                continue;
            };
            // A watcher that starts in the future is synced but waits for its start revision.
            if rev < w.min_rev {
                continue;
            }
            let evs: Arc<[Arc<SharedEvent>]> =
                if group.len() == shared.len() && shared.iter().all(|e| w.spec.wants_event(e)) {
                    // The usual case (one event, or a watcher that gets every event): no copy.
                    shared.clone()
                } else {
                    group
                        .iter()
                        .map(|(_, i)| &shared[*i])
                        .filter(|e| w.spec.wants_event(e))
                        .cloned()
                        .collect()
                };
            if evs.is_empty() {
                continue;
            }
            let msg = WatchMessage::Events {
                watch_id: key.id,
                revision: rev,
                events: evs,
            };
            match w.sink.try_send(msg) {
                SendOutcome::Sent => {}
                SendOutcome::Full => demote.push(key),
                SendOutcome::Closed => closed.push(key),
            }
        }
        for key in demote {
            if let Some(w) = st.watchers.get_mut(&key) {
                w.state = State::Unsynced;
                w.min_rev = rev;
                let range = w.spec.range.clone();
                st.synced.remove(key, &range);
            }
        }
        for key in closed {
            if let Some(w) = st.watchers.remove(&key) {
                st.synced.remove(key, &w.spec.range);
            }
        }
    }

    /// The watchers that need history, for a catch-up round.
    pub(crate) fn unsynced(&self) -> Vec<CatchUp> {
        self.lock()
            .watchers
            .iter()
            .filter(|(_, w)| w.state == State::Unsynced)
            .map(|(k, w)| CatchUp {
                key: *k,
                gen: w.gen,
                spec: w.spec.clone(),
                min_rev: w.min_rev,
                sink: w.sink.clone(),
            })
            .collect()
    }

    /// Records that a catch-up delivered everything below `next_rev` to `key`; turns it synced if
    /// that reaches the current revision. Returns false if the watcher is gone.
    pub(crate) fn advance(&self, c: &CatchUp, next_rev: i64) -> bool {
        let key = c.key;
        let mut st = self.lock();
        let current = st.current;
        let Some(w) = st.watchers.get_mut(&key) else {
            return false;
        };
        if w.gen != c.gen {
            return false;
        }
        if w.state != State::Unsynced {
            return true;
        }
        w.min_rev = w.min_rev.max(next_rev);
        if w.min_rev > current {
            w.state = State::Synced;
            let range = w.spec.range.clone();
            st.synced.add(key, &range);
            self.flush_progress(&mut st, key.stream);
        }
        true
    }

    /// The current revision, if every watcher of `stream` is synced; otherwise remembers to
    /// answer once they are (etcd's `progressAll`, answered late instead of never).
    pub(crate) fn request_progress(&self, stream: u64, sink: Arc<dyn WatchSink>) -> Option<i64> {
        let mut st = self.lock();
        if Self::stream_synced(&st, stream) {
            Some(st.current)
        } else {
            st.pending_progress.insert(stream, sink);
            None
        }
    }

    /// The current revision if this watcher is synced (for periodic progress notifications).
    pub(crate) fn watcher_progress(&self, key: WatchKey) -> Option<i64> {
        let st = self.lock();
        match st.watchers.get(&key) {
            Some(w) if w.state == State::Synced => Some(st.current),
            _ => None,
        }
    }

    fn stream_synced(st: &HubState, stream: u64) -> bool {
        st.watchers
            .iter()
            .all(|(k, w)| k.stream != stream || w.state == State::Synced)
    }

    /// Answers a pending progress request of `stream` once all its watchers are synced.
    fn flush_progress(&self, st: &mut HubState, stream: u64) {
        if !st.pending_progress.contains_key(&stream) || !Self::stream_synced(st, stream) {
            return;
        }
        if let Some(sink) = st.pending_progress.remove(&stream) {
            let resp = WatchMessage::Response(progress_response(st.current));
            if sink.try_send(resp) == SendOutcome::Full {
                st.pending_progress.insert(stream, sink);
            }
        }
    }

    /// True while some watcher waits for history or a progress answer waits for room.
    pub(crate) fn has_unsynced(&self) -> bool {
        let st = self.lock();
        !st.pending_progress.is_empty() || st.watchers.values().any(|w| w.state == State::Unsynced)
    }

    /// Retries progress answers that found their stream's queue full.
    pub(crate) fn retry_progress(&self) {
        let mut st = self.lock();
        let streams: Vec<u64> = st.pending_progress.keys().copied().collect();
        for stream in streams {
            self.flush_progress(&mut st, stream);
        }
    }

    /// Number of registered watchers.
    pub fn len(&self) -> usize {
        self.lock().watchers.len()
    }

    /// True with no watcher.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The answer to a stream-wide progress request: no events, `watch_id` -1.
pub fn progress_response(revision: i64) -> WatchResponse {
    WatchResponse {
        header: Some(ResponseHeader {
            revision,
            ..Default::default()
        }),
        watch_id: -1,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matcher_finds_exact_prefix_and_interval_watchers() {
        let mut m = Matcher::default();
        let w = |id| WatchKey { stream: 1, id };
        m.add(w(1), &KeyRange::Single(b"/a/b".to_vec()));
        m.add(w(2), &KeyRange::new(b"/a/", b"/a0"));
        m.add(w(3), &KeyRange::new(b"/a/b", b"\0"));
        m.add(w(4), &KeyRange::new(b"/z", b"/zz"));
        m.add(w(5), &KeyRange::new(b"/a/a", b"/a/c"));
        let mut out = Vec::new();
        m.matches(b"/a/b", &mut out);
        out.sort();
        assert_eq!(out, vec![w(1), w(2), w(3), w(5)]);
        out.clear();
        m.matches(b"/a/c", &mut out);
        out.sort();
        assert_eq!(out, vec![w(2), w(3)]);
        m.remove(w(2), &KeyRange::new(b"/a/", b"/a0"));
        m.remove(w(5), &KeyRange::new(b"/a/a", b"/a/c"));
        out.clear();
        m.matches(b"/a/b", &mut out);
        out.sort();
        assert_eq!(out, vec![w(1), w(3)]);
        out.clear();
        m.matches(b"/a/", &mut out);
        assert!(out.is_empty());
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff"), None);
    }

    /// Keeps every message, undecoded.
    #[derive(Default)]
    struct Capture(Mutex<Vec<WatchMessage>>);

    impl WatchSink for Capture {
        fn try_send(&self, msg: WatchMessage) -> SendOutcome {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(msg);
            SendOutcome::Sent
        }

        fn is_full(&self) -> bool {
            false
        }
    }

    fn put_event(key: &[u8], rev: i64, create: i64) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: key.to_vec(),
                value: b"v".to_vec(),
                create_revision: create,
                mod_revision: rev,
                version: 1,
                lease: 0,
            }),
            prev_kv: None,
        }
    }

    fn synced(hub: &WatchHub, key: WatchKey, range: KeyRange, sink: Arc<Capture>) {
        hub.register(
            key,
            WatchSpec {
                range,
                start_revision: 0,
                no_put: false,
                no_delete: false,
            },
            sink,
        );
        hub.activate(key);
        let c = hub
            .unsynced()
            .into_iter()
            .find(|c| c.key == key)
            .expect("unsynced");
        hub.advance(&c, 2);
    }

    #[test]
    fn one_event_is_shared_and_encoded_once_for_all_its_watchers() {
        let hub = WatchHub::default();
        hub.set_current(1);
        let sink = Arc::new(Capture::default());
        let n = 300;
        for id in 0..n {
            let range = match id % 3 {
                0 => KeyRange::Single(b"/a/b".to_vec()),
                1 => KeyRange::new(b"/a/", b"/a0"),
                _ => KeyRange::new(b"/a/a", b"/a/c"),
            };
            synced(&hub, WatchKey { stream: 1, id }, range, sink.clone());
        }
        hub.notify(2, vec![put_event(b"/a/b", 2, 1)]);
        let msgs = std::mem::take(&mut *sink.0.lock().unwrap_or_else(|p| p.into_inner()));
        assert_eq!(msgs.len(), n as usize, "every watcher gets the revision");
        let lists: Vec<Arc<[Arc<SharedEvent>]>> = msgs
            .into_iter()
            .map(|m| match m {
                WatchMessage::Events {
                    revision, events, ..
                } => {
                    assert_eq!(revision, 2);
                    events
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(
            lists.iter().all(|l| Arc::ptr_eq(l, &lists[0])),
            "one shared list"
        );
        let ev = &lists[0][0];
        let bytes = ev.encoded().clone();
        for l in &lists {
            // The same buffer, not an equal copy: encoded once.
            assert_eq!(l[0].encoded().as_ptr(), bytes.as_ptr());
        }
        assert_eq!(
            Event::decode(bytes.as_ref()).expect("decodes"),
            put_event(b"/a/b", 2, 1)
        );
        let mut lookups = 0;
        for _ in 0..3 {
            ev.encoded_with_prev(|_| {
                lookups += 1;
                Some(KeyValue {
                    key: b"/a/b".to_vec(),
                    mod_revision: 1,
                    ..Default::default()
                })
            });
        }
        assert_eq!(lookups, 1, "prev_kv looked up once per event");
        let with_prev = Event::decode(ev.encoded_with_prev(|_| None).as_ref()).expect("decodes");
        assert_eq!(with_prev.prev_kv.map(|p| p.mod_revision), Some(1));
    }

    #[test]
    fn filtered_and_multi_key_watchers_get_their_own_subset_in_order() {
        let hub = WatchHub::default();
        hub.set_current(1);
        let sink = Arc::new(Capture::default());
        synced(
            &hub,
            WatchKey { stream: 1, id: 0 },
            KeyRange::new(b"a", b"c"),
            sink.clone(),
        );
        synced(
            &hub,
            WatchKey { stream: 1, id: 1 },
            KeyRange::Single(b"b".to_vec()),
            sink.clone(),
        );
        let del = Event {
            r#type: EventType::Delete as i32,
            kv: Some(KeyValue {
                key: b"a".to_vec(),
                mod_revision: 2,
                ..Default::default()
            }),
            prev_kv: None,
        };
        hub.notify(2, vec![del, put_event(b"b", 2, 2), put_event(b"z", 2, 2)]);
        let msgs = std::mem::take(&mut *sink.0.lock().unwrap_or_else(|p| p.into_inner()));
        let mut got: Vec<(i64, Vec<Vec<u8>>)> = msgs
            .into_iter()
            .map(|m| match m {
                WatchMessage::Events {
                    watch_id, events, ..
                } => (
                    watch_id,
                    events
                        .iter()
                        .map(|e| {
                            e.event()
                                .kv
                                .as_ref()
                                .map(|kv| kv.key.clone())
                                .unwrap_or_default()
                        })
                        .collect(),
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                (0, vec![b"a".to_vec(), b"b".to_vec()]),
                (1, vec![b"b".to_vec()]),
            ]
        );
    }
}
