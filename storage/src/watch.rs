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

use std::collections::BTreeMap;
use std::collections::HashMap;
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

    /// The encoding a watcher gets: with `prev_kv` if it asked for it, once
    /// [`SharedEvent::encoded_with_prev`] has looked it up (until then, and for watchers that
    /// did not ask, the plain encoding).
    pub fn encoded_as_sent(&self, prev_kv: bool) -> &Bytes {
        match self.with_prev.get() {
            Some(b) if prev_kv => b,
            _ => self.encoded(),
        }
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

/// The events one message gives a watcher, shared by every watcher that gets the same ones
/// (the watchers of a revision's keys; lagging watchers that want the same history in a
/// catch-up round), with their encoding as `WatchResponse.events` fields made once for all of
/// them: a response to each watcher then copies one run of bytes, not each event with its tag
/// and length.
#[derive(Debug)]
pub struct EventBatch {
    events: Vec<Arc<SharedEvent>>,
    fields: OnceLock<Bytes>,
    fields_with_prev: OnceLock<Bytes>,
}

impl EventBatch {
    /// Shares `events` (in revision order).
    pub fn new(events: Vec<Arc<SharedEvent>>) -> Arc<Self> {
        Arc::new(EventBatch {
            events,
            fields: OnceLock::new(),
            fields_with_prev: OnceLock::new(),
        })
    }

    /// The events as `WatchResponse.events` fields, without `prev_kv`.
    pub fn fields(&self) -> &Bytes {
        self.fields.get_or_init(|| self.frame(|e| e.encoded()))
    }

    /// The events as `WatchResponse.events` fields with `prev_kv`, each looked up through
    /// `prev` as [`SharedEvent::encoded_with_prev`] does (once per event, whichever batch asks
    /// first).
    pub fn fields_with_prev(&self, prev: impl Fn(&Event) -> Option<KeyValue>) -> &Bytes {
        self.fields_with_prev
            .get_or_init(|| self.frame(|e| e.encoded_with_prev(&prev)))
    }

    /// The fields a watcher gets: with `prev_kv` if it asked for it, once
    /// [`EventBatch::fields_with_prev`] has made them (until then, the plain fields).
    pub fn fields_as_sent(&self, prev_kv: bool) -> &Bytes {
        match self.fields_with_prev.get() {
            Some(b) if prev_kv => b,
            _ => self.fields(),
        }
    }

    fn frame<'a>(&'a self, encoded: impl Fn(&'a SharedEvent) -> &'a Bytes) -> Bytes {
        let len = self
            .events
            .iter()
            .map(|e| fetcd_proto::wire::event_field_len(encoded(e)))
            .sum();
        let mut out = Vec::with_capacity(len);
        for e in &self.events {
            fetcd_proto::wire::put_event_field(&mut out, encoded(e));
        }
        Bytes::from(out)
    }
}

impl std::ops::Deref for EventBatch {
    type Target = [Arc<SharedEvent>];

    fn deref(&self) -> &Self::Target {
        &self.events
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
        /// The events, shared with the other watchers they go to (the batch itself too, when a
        /// watcher gets all of a revision's events).
        events: Arc<EventBatch>,
    },
    /// Any other response: a compaction cancel or a progress notification. Boxed: these are
    /// rare, and a stream's queue holds thousands of event messages, which stay small.
    Response(Box<WatchResponse>),
}

impl WatchMessage {
    /// A message carrying `resp`.
    pub fn response(resp: WatchResponse) -> Self {
        WatchMessage::Response(Box::new(resp))
    }
}

/// Where a stream's responses go: a bounded, non-blocking queue owned by the server.
pub trait WatchSink: Send + Sync {
    /// Queues `msg` without waiting.
    fn try_send(&self, msg: WatchMessage) -> SendOutcome;

    /// True if nothing could be queued now; catch-up skips the history read then.
    fn is_full(&self) -> bool;

    /// Queues the messages of `msgs` in order until one is refused, and empties `msgs`. Returns
    /// how many were queued and, if not all, why the next was refused (the rest are dropped).
    /// Fan-out hands a stream all its watchers' messages of a revision at once, so a sink can
    /// take them in one lock.
    fn try_send_many(&self, msgs: &mut Vec<WatchMessage>) -> (usize, SendOutcome) {
        let mut sent = 0;
        for msg in msgs.drain(..) {
            match self.try_send(msg) {
                SendOutcome::Sent => sent += 1,
                refused => return (sent, refused),
            }
        }
        (sent, SendOutcome::Sent)
    }
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
        passes_filters(self.no_put, self.no_delete, ev)
    }
}

/// etcd's NOPUT / NODELETE filters.
fn passes_filters(no_put: bool, no_delete: bool, ev: &SharedEvent) -> bool {
    let put = ev.is_put();
    !(put && no_put || !put && no_delete)
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
    /// Shared with catch-up rounds, which copy every lagging watcher's needs.
    spec: Arc<WatchSpec>,
    /// First revision not yet delivered (meaningful while not synced).
    min_rev: i64,
    state: State,
    sink: Arc<dyn WatchSink>,
}

/// What fan-out needs of a synced watcher. Kept in the matcher's ordered sets, next to each
/// other, so a revision with ten thousand watchers reads them from a few dense nodes instead of
/// making one hash lookup (a cache miss) per watcher.
#[derive(Clone)]
struct Synced {
    min_rev: i64,
    no_put: bool,
    no_delete: bool,
    sink: Arc<dyn WatchSink>,
}

impl Synced {
    fn of(w: &Watcher) -> Self {
        Synced {
            min_rev: w.min_rev,
            no_put: w.spec.no_put,
            no_delete: w.spec.no_delete,
            sink: w.sink.clone(),
        }
    }

    fn wants(&self, ev: &SharedEvent) -> bool {
        passes_filters(self.no_put, self.no_delete, ev)
    }
}

/// A watcher an event of the revision being notified goes to.
struct Hit {
    key: WatchKey,
    /// The event's index in the revision.
    event: usize,
    watcher: Synced,
}

/// Finds synced watchers for a key without scanning all of them: exact keys and prefixes
/// (kube-apiserver's shapes) by hash lookups, other intervals by an interval tree.
#[derive(Default)]
struct Matcher {
    // Ordered: a key's watchers come out grouped by stream, so fan-out hands each stream its
    // messages in one batch.
    exact: HashMap<Vec<u8>, BTreeMap<WatchKey, Synced>>,
    /// Prefix watchers by the prefix's length, then the prefix: an event's key is looked up at
    /// the lengths watched only, not at every length up to its own (35 lookups for
    /// `/registry/pods/default/nginx-1234`, where kube-apiserver's prefixes have a few).
    prefix: BTreeMap<usize, HashMap<Vec<u8>, BTreeMap<WatchKey, Synced>>>,
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
    fn add(&mut self, key: WatchKey, w: &Watcher) {
        match shape(&w.spec.range) {
            Shape::Exact(k) => {
                let set = self.exact.entry(k.to_vec()).or_default();
                set.insert(key, Synced::of(w));
            }
            Shape::Prefix(p) => {
                let set = self
                    .prefix
                    .entry(p.len())
                    .or_default()
                    .entry(p.to_vec())
                    .or_default();
                set.insert(key, Synced::of(w));
            }
            Shape::Other(start, end) => self.other.insert(start, end, key),
        }
    }

    fn remove(&mut self, key: WatchKey, range: &KeyRange) {
        let remove_from = |m: &mut HashMap<Vec<u8>, BTreeMap<WatchKey, Synced>>, k: &[u8]| {
            if let Some(set) = m.get_mut(k) {
                set.remove(&key);
                if set.is_empty() {
                    m.remove(k);
                }
            }
        };
        match shape(range) {
            Shape::Exact(k) => remove_from(&mut self.exact, k),
            Shape::Prefix(p) => {
                if let Some(of_len) = self.prefix.get_mut(&p.len()) {
                    remove_from(of_len, p);
                    if of_len.is_empty() {
                        self.prefix.remove(&p.len());
                    }
                }
            }
            Shape::Other(start, _) => {
                self.other.remove(start, key);
            }
        }
    }

    /// Adds a hit for `event` (whose key is `k`) per synced watcher it matches; `scratch` is
    /// a buffer, `watchers` holds what the interval tree does not keep.
    fn matches(
        &self,
        k: &[u8],
        event: usize,
        watchers: &HashMap<WatchKey, Watcher>,
        scratch: &mut Vec<WatchKey>,
        out: &mut Vec<Hit>,
    ) {
        fn hits(set: &BTreeMap<WatchKey, Synced>, event: usize) -> impl Iterator<Item = Hit> + '_ {
            set.iter().map(move |(key, w)| Hit {
                key: *key,
                event,
                watcher: w.clone(),
            })
        }
        if let Some(set) = self.exact.get(k) {
            out.extend(hits(set, event));
        }
        for (&len, of_len) in &self.prefix {
            let Some(p) = k.get(..len) else { break };
            if let Some(set) = of_len.get(p) {
                out.extend(hits(set, event));
            }
        }
        if self.other.len() > 0 {
            scratch.clear();
            self.other.stab(k, scratch);
            out.extend(scratch.iter().filter_map(|key| {
                watchers.get(key).map(|w| Hit {
                    key: *key,
                    event,
                    watcher: Synced::of(w),
                })
            }));
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
    /// Notify's buffers, kept between revisions: with thousands of watchers they are large, and
    /// growing them anew for every revision cost more than filling them.
    hits: Vec<Hit>,
    scratch: Vec<WatchKey>,
    batch: Vec<WatchMessage>,
    batch_keys: Vec<WatchKey>,
}

impl HubState {
    /// Queues `events` (revision `rev`) for the watchers in `hits` (grouped by watcher, each
    /// watcher's event indexes in order). Consecutive watchers of one stream go to its sink in
    /// one batch; a watcher whose stream is full turns unsynced at `rev`.
    fn fan_out(&mut self, rev: i64, events: Vec<Event>, hits: &[Hit]) {
        let shared = EventBatch::new(events.into_iter().map(SharedEvent::new).collect());
        let mut batch = std::mem::take(&mut self.batch);
        let mut batch_keys = std::mem::take(&mut self.batch_keys);
        let mut sink: Option<Arc<dyn WatchSink>> = None;
        let mut demote = Vec::new();
        let mut closed = Vec::new();
        let mut flush =
            |sink: &dyn WatchSink, batch: &mut Vec<WatchMessage>, keys: &mut Vec<WatchKey>| {
                let (sent, outcome) = sink.try_send_many(batch);
                match outcome {
                    SendOutcome::Sent => {}
                    SendOutcome::Full => demote.extend_from_slice(&keys[sent..]),
                    SendOutcome::Closed => closed.extend_from_slice(&keys[sent..]),
                }
                batch.clear();
                keys.clear();
            };
        for group in hits.chunk_by(|a, b| a.key == b.key) {
            let key = group[0].key;
            let w = &group[0].watcher;
            // A watcher that starts in the future is synced but waits for its start revision.
            if rev < w.min_rev {
                continue;
            }
            let evs = if group.len() == shared.len() && shared.iter().all(|e| w.wants(e)) {
                // The usual case (one event, or a watcher that gets every event): no copy.
                shared.clone()
            } else {
                EventBatch::new(
                    group
                        .iter()
                        .map(|h| &shared[h.event])
                        .filter(|e| w.wants(e))
                        .cloned()
                        .collect(),
                )
            };
            if evs.is_empty() {
                continue;
            }
            match &sink {
                Some(s) if std::ptr::addr_eq(Arc::as_ptr(s), Arc::as_ptr(&w.sink)) => {}
                _ => {
                    if let Some(s) = sink.replace(w.sink.clone()) {
                        flush(&*s, &mut batch, &mut batch_keys);
                    }
                }
            }
            batch.push(WatchMessage::Events {
                watch_id: key.id,
                revision: rev,
                events: evs,
            });
            batch_keys.push(key);
        }
        if let Some(s) = sink {
            flush(&*s, &mut batch, &mut batch_keys);
        }
        self.batch = batch;
        self.batch_keys = batch_keys;
        for key in demote {
            if let Some(w) = self.watchers.get_mut(&key) {
                w.state = State::Unsynced;
                w.min_rev = rev;
                let spec = w.spec.clone();
                self.synced.remove(key, &spec.range);
            }
        }
        for key in closed {
            if let Some(w) = self.watchers.remove(&key) {
                self.synced.remove(key, &w.spec.range);
            }
        }
    }
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
    pub spec: Arc<WatchSpec>,
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
                spec: Arc::new(spec),
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
        let mut guard = self.lock();
        let st = &mut *guard;
        st.current = rev;
        if st.watchers.is_empty() {
            return;
        }
        // (watcher, event index) for every match.
        let mut hits = std::mem::take(&mut st.hits);
        let mut scratch = std::mem::take(&mut st.scratch);
        for (i, ev) in events.iter().enumerate() {
            let Some(kv) = &ev.kv else { continue };
            st.synced
                .matches(&kv.key, i, &st.watchers, &mut scratch, &mut hits);
        }
        if !hits.is_empty() {
            if events.len() > 1 {
                // By watcher, then event: each watcher's events together and in revision order.
                hits.sort_unstable_by_key(|h| (h.key, h.event));
            }
            st.fan_out(rev, events, &hits);
        }
        hits.clear();
        scratch.clear();
        st.hits = hits;
        st.scratch = scratch;
    }

    /// The watchers that need history and whose client is reading, for a catch-up round (a
    /// watcher whose stream is full would get nothing; history read for it would be wasted).
    pub(crate) fn unsynced(&self) -> Vec<CatchUp> {
        self.lock()
            .watchers
            .iter()
            .filter(|(_, w)| w.state == State::Unsynced && !w.sink.is_full())
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
            let HubState {
                watchers, synced, ..
            } = &mut *st;
            if let Some(w) = watchers.get(&key) {
                synced.add(key, w);
            }
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
            let resp = WatchMessage::response(progress_response(st.current));
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

    /// A synced watcher of `range` from revision 1, for the matcher.
    fn synced_watcher(range: KeyRange) -> Watcher {
        Watcher {
            gen: 0,
            spec: Arc::new(WatchSpec {
                range,
                start_revision: 0,
                no_put: false,
                no_delete: false,
            }),
            min_rev: 1,
            state: State::Synced,
            sink: Arc::new(Capture::default()),
        }
    }

    /// The watchers `m` matches for key `k`, sorted.
    fn matched(m: &Matcher, watchers: &HashMap<WatchKey, Watcher>, k: &[u8]) -> Vec<WatchKey> {
        let mut out = Vec::new();
        m.matches(k, 0, watchers, &mut Vec::new(), &mut out);
        let mut keys: Vec<WatchKey> = out.iter().map(|h| h.key).collect();
        keys.sort();
        keys
    }

    #[test]
    fn matcher_finds_exact_prefix_and_interval_watchers() {
        let mut m = Matcher::default();
        let mut watchers = HashMap::new();
        let w = |id| WatchKey { stream: 1, id };
        let ranges = [
            (1, KeyRange::Single(b"/a/b".to_vec())),
            (2, KeyRange::new(b"/a/", b"/a0")),
            (3, KeyRange::new(b"/a/b", b"\0")),
            (4, KeyRange::new(b"/z", b"/zz")),
            (5, KeyRange::new(b"/a/a", b"/a/c")),
        ];
        for (id, range) in ranges.iter().cloned() {
            let watcher = synced_watcher(range);
            m.add(w(id), &watcher);
            watchers.insert(w(id), watcher);
        }
        let matches = |m: &Matcher, k: &[u8]| matched(m, &watchers, k);
        assert_eq!(matches(&m, b"/a/b"), vec![w(1), w(2), w(3), w(5)]);
        assert_eq!(matches(&m, b"/a/c"), vec![w(2), w(3)]);
        m.remove(w(2), &ranges[1].1);
        m.remove(w(5), &ranges[4].1);
        assert_eq!(matches(&m, b"/a/b"), vec![w(1), w(3)]);
        assert!(matches(&m, b"/a/").is_empty());
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff"), None);
    }

    #[test]
    fn prefix_watchers_of_every_length_match_and_their_lengths_leave_with_them() {
        let mut m = Matcher::default();
        let watchers = HashMap::new();
        let w = |id| WatchKey { stream: 1, id };
        let prefix = |p: &[u8]| KeyRange::new(p, &prefix_end(p).unwrap_or_default());
        let pods: &[u8] = b"/registry/pods/";
        for (id, p) in [(1, &b"/"[..]), (2, b"/registry/"), (3, pods), (4, pods)] {
            m.add(w(id), &synced_watcher(prefix(p)));
        }
        let key = b"/registry/pods/default/nginx-1234";
        assert_eq!(matched(&m, &watchers, key), vec![w(1), w(2), w(3), w(4)]);
        assert_eq!(matched(&m, &watchers, b"/registry/podsx"), vec![w(1), w(2)]);
        assert_eq!(matched(&m, &watchers, b"/r"), vec![w(1)]);
        let lens = |m: &Matcher| m.prefix.keys().copied().collect::<Vec<_>>();
        assert_eq!(lens(&m), vec![1, 10, 15]);
        // A prefix's length stays while one of its watchers does.
        m.remove(w(3), &prefix(pods));
        assert_eq!(matched(&m, &watchers, key), vec![w(1), w(2), w(4)]);
        m.remove(w(4), &prefix(pods));
        m.remove(w(1), &prefix(b"/"));
        assert_eq!(matched(&m, &watchers, key), vec![w(2)]);
        assert_eq!(lens(&m), vec![10]);
    }

    /// Takes `room` messages, then refuses.
    struct Bounded {
        room: Mutex<usize>,
        got: Mutex<Vec<i64>>,
    }

    impl WatchSink for Bounded {
        fn try_send(&self, msg: WatchMessage) -> SendOutcome {
            let mut room = self.room.lock().unwrap_or_else(|p| p.into_inner());
            if *room == 0 {
                return SendOutcome::Full;
            }
            *room -= 1;
            if let WatchMessage::Events { watch_id, .. } = msg {
                self.got
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(watch_id);
            }
            SendOutcome::Sent
        }

        fn is_full(&self) -> bool {
            *self.room.lock().unwrap_or_else(|p| p.into_inner()) == 0
        }
    }

    #[test]
    fn a_full_stream_demotes_exactly_the_watchers_it_refused() {
        let hub = WatchHub::default();
        hub.set_current(1);
        let full = Arc::new(Bounded {
            room: Mutex::new(3),
            got: Mutex::default(),
        });
        let other = Arc::new(Capture::default());
        let key = |stream, id| WatchKey { stream, id };
        for id in 0..5 {
            synced(
                &hub,
                key(1, id),
                KeyRange::Single(b"k".to_vec()),
                full.clone(),
            );
            synced(
                &hub,
                key(2, id),
                KeyRange::Single(b"k".to_vec()),
                other.clone(),
            );
        }
        hub.notify(2, vec![put_event(b"k", 2, 2)]);
        // The stream with room for three took the first three, in order; its other two fell
        // behind at revision 2 and catch up from there. The other stream got all five.
        assert_eq!(
            *full.got.lock().unwrap_or_else(|p| p.into_inner()),
            vec![0, 1, 2]
        );
        assert_eq!(other.0.lock().unwrap_or_else(|p| p.into_inner()).len(), 5);
        // A catch-up round skips them while their stream is still full.
        assert!(hub.unsynced().is_empty());
        *full.room.lock().unwrap_or_else(|p| p.into_inner()) = 10;
        let mut behind: Vec<(WatchKey, i64)> =
            hub.unsynced().iter().map(|c| (c.key, c.min_rev)).collect();
        behind.sort();
        assert_eq!(behind, vec![(key(1, 3), 2), (key(1, 4), 2)]);
        // The next revision reaches only the watchers still synced.
        hub.notify(3, vec![put_event(b"k", 3, 2)]);
        assert_eq!(
            *full.got.lock().unwrap_or_else(|p| p.into_inner()),
            vec![0, 1, 2, 0, 1, 2]
        );
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
                value: b"v".to_vec().into(),
                create_revision: create,
                mod_revision: rev,
                version: 1,
                lease: 0,
            }),
            prev_kv: None,
        }
    }

    fn synced(hub: &WatchHub, key: WatchKey, range: KeyRange, sink: Arc<dyn WatchSink>) {
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
        let lists: Vec<Arc<EventBatch>> = msgs
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
