//! etcd's Watch service: one bidirectional stream carries many watches.
//!
//! Per stream, a receive loop handles create / cancel / progress requests and a send loop turns
//! the stream's queue into gRPC responses. Everything for a stream — `created`, events,
//! progress, `canceled` — passes through one ordered queue, so `created` precedes a watch's
//! events and a progress revision never overtakes events at or below it. The send loop fills
//! `prev_kv` (the value at `mod_revision - 1`, as etcd's `sendLoop`), fills the header and splits
//! large responses for watches that asked for `fragment`.
//!
//! Events arrive as [`fetcd_storage::SharedEvent`]s and leave as their protobuf encoding
//! ([`EncodedWatchResponse`]): an event going to a thousand watchers is encoded once (once more
//! with `prev_kv`, looked up once), and each watcher's response only copies those bytes.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use fetcd_proto::etcdserverpb::watch_request::RequestUnion;
use fetcd_proto::etcdserverpb::ResponseHeader;
use fetcd_proto::etcdserverpb::WatchCreateRequest;
use fetcd_proto::etcdserverpb::WatchRequest;
use fetcd_proto::etcdserverpb::WatchResponse;
use fetcd_proto::status as msg;
use fetcd_proto::wire::event_field_len;
use fetcd_proto::wire::watch_server::Watch;
use fetcd_proto::wire::EncodedEvents;
use fetcd_proto::wire::EncodedWatchResponse;
use fetcd_storage::watch::progress_response;
use fetcd_storage::EventBatch;
use fetcd_storage::KeyRange;
use fetcd_storage::SendOutcome;
use fetcd_storage::WatchKey;
use fetcd_storage::WatchMessage;
use fetcd_storage::WatchSink;
use fetcd_storage::WatchSpec;
use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio::sync::Notify;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;

use crate::node::EtcdNode;

/// Responses a stream may have queued before its watchers fall behind. etcd's is 128, but
/// queued responses here only hold references to shared events, so a deeper queue is cheap, and
/// a stream multiplexing hundreds of watchers (one response each per revision) would otherwise
/// overflow on every burst and send them all through the slower catch-up path.
const STREAM_QUEUE: usize = 4096;
/// Responses the send loop may have handed to gRPC and not yet written.
const OUT_QUEUE: usize = 128;
/// Revisions one catch-up round hands one watcher (etcd's `watchBatchMaxRevs`).
const CATCH_UP_REVISIONS: i64 = 1000;
/// Event bytes (before `prev_kv`) up to which a watch's queued revisions join into one response.
/// Well under the 4 MiB a gRPC client accepts by default, even with `prev_kv` doubling them.
const JOIN_BYTES: usize = 256 * 1024;
/// How often lagging watchers are retried even without a wake-up (etcd: 100 ms).
const CATCH_UP_INTERVAL: Duration = Duration::from_millis(100);

/// etcd's text for a duplicate client-chosen watch id.
const ERR_DUPLICATE_WATCH_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
/// etcd's text for `key >= range_end`.
const ERR_EMPTY_WATCHER_RANGE: &str = "mvcc: watcher range is empty";

/// The Watch service of one member.
#[derive(Clone)]
pub struct WatchService {
    node: Arc<EtcdNode>,
    /// Becomes true when the server stops: open streams end so shutdown can complete.
    stop: tokio::sync::watch::Receiver<bool>,
    next_stream: Arc<AtomicU64>,
    progress_interval: Duration,
    max_request_bytes: usize,
    catch_up: Arc<Notify>,
}

impl std::fmt::Debug for WatchService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchService").finish_non_exhaustive()
    }
}

impl WatchService {
    /// A Watch service over `node`; spawns the catch-up task that feeds lagging watchers.
    pub fn new(
        node: Arc<EtcdNode>,
        progress_interval: Duration,
        max_request_bytes: usize,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let catch_up = Arc::new(Notify::new());
        tokio::spawn(catch_up_loop(node.clone(), catch_up.clone()));
        WatchService {
            node,
            stop,
            next_stream: Arc::new(AtomicU64::new(1)),
            progress_interval,
            max_request_bytes,
            catch_up,
        }
    }
}

/// Feeds unsynced watchers from history: on wake-up and every [`CATCH_UP_INTERVAL`].
async fn catch_up_loop(node: Arc<EtcdNode>, wake: Arc<Notify>) {
    let weak = Arc::downgrade(&node);
    drop(node);
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(CATCH_UP_INTERVAL) => {}
        }
        let Some(node) = weak.upgrade() else { return };
        let store = node.store().clone();
        drop(node);
        // Rounds read history from sled: keep them off the async workers. Stop when a round
        // moved nobody forward (every laggard waits for its client to read); the next wake-up
        // or tick retries.
        loop {
            let s = store.clone();
            let round = tokio::task::spawn_blocking(move || {
                if s.has_unsynced_watchers() {
                    s.sync_watchers(CATCH_UP_REVISIONS).map(Some)
                } else {
                    Ok(None)
                }
            })
            .await;
            match round {
                Ok(Ok(Some(n))) if n > 0 => continue,
                Ok(Ok(_)) => break,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "watch catch-up failed");
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "watch catch-up task failed");
                    break;
                }
            }
        }
    }
}

/// A stream's ordered queue: every response of the stream passes through it.
///
/// A mutex-guarded deque rather than a channel: the store pushes one message per matching
/// watcher per revision (ten thousand watchers on a key are ten thousand pushes), and the send
/// loop takes everything queued in one lock.
struct StreamQueue {
    state: Mutex<QueueState>,
    /// Signaled when the queue goes from empty to non-empty (a permit is kept if the send loop
    /// is not waiting yet, so no wake-up is lost).
    ready: Notify,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<WatchMessage>,
    closed: bool,
    /// A watcher fell behind because the queue was full: the send loop wakes the catch-up as
    /// soon as it has emptied the queue, instead of leaving it to the next tick.
    overflowed: bool,
}

impl StreamQueue {
    fn new() -> Self {
        StreamQueue {
            state: Mutex::new(QueueState::default()),
            ready: Notify::new(),
        }
    }

    /// Queues up to `n` messages through `put` (handed the queue and how many fit); with
    /// `bounded`, no more than [`STREAM_QUEUE`] may wait. Responses to the client's own requests
    /// (created, canceled, progress) are not bounded: there is one per request. Returns how many
    /// were queued and, if not all, why not.
    fn enqueue(
        &self,
        n: usize,
        bounded: bool,
        put: impl FnOnce(&mut VecDeque<WatchMessage>, usize),
    ) -> (usize, SendOutcome) {
        let (queued, was_empty) = {
            let mut st = lock(&self.state);
            if st.closed {
                return (0, SendOutcome::Closed);
            }
            let was_empty = st.items.is_empty();
            let fits = if bounded {
                STREAM_QUEUE.saturating_sub(st.items.len()).min(n)
            } else {
                n
            };
            if fits < n {
                st.overflowed = true;
            }
            put(&mut st.items, fits);
            (fits, was_empty)
        };
        if was_empty && queued > 0 {
            self.ready.notify_one();
        }
        let outcome = if queued < n {
            SendOutcome::Full
        } else {
            SendOutcome::Sent
        };
        (queued, outcome)
    }

    /// Queues `msg` (see [`StreamQueue::enqueue`]).
    fn push(&self, msg: WatchMessage, bounded: bool) -> SendOutcome {
        self.enqueue(1, bounded, |q, fits| {
            if fits == 1 {
                q.push_back(msg);
            }
        })
        .1
    }

    /// Queues a response to a client request; false once the stream is closed.
    fn send(&self, msg: WatchMessage) -> bool {
        self.push(msg, false) == SendOutcome::Sent
    }

    /// Takes everything queued into `into`; true if a watcher overflowed the queue since the
    /// last take (the catch-up should run now that there is room).
    fn take(&self, into: &mut VecDeque<WatchMessage>) -> bool {
        let mut st = lock(&self.state);
        std::mem::swap(&mut st.items, into);
        std::mem::take(&mut st.overflowed)
    }

    /// Refuses everything from now on (the stream ended).
    fn close(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        st.items.clear();
    }
}

impl WatchSink for StreamQueue {
    fn try_send(&self, msg: WatchMessage) -> SendOutcome {
        self.push(msg, true)
    }

    fn is_full(&self) -> bool {
        lock(&self.state).items.len() >= STREAM_QUEUE
    }

    fn try_send_many(&self, msgs: &mut Vec<WatchMessage>) -> (usize, SendOutcome) {
        let n = msgs.len();
        let r = self.enqueue(n, true, |q, fits| q.extend(msgs.drain(..fits)));
        msgs.clear();
        r
    }
}

/// Per-watch options the send loop applies.
#[derive(Clone, Copy, Debug, Default)]
struct WatchOpts {
    prev_kv: bool,
    fragment: bool,
    progress_notify: bool,
    /// Events were sent since the last progress tick.
    active: bool,
}

/// One client stream, shared by its receive and send loops.
struct StreamCtx {
    node: Arc<EtcdNode>,
    /// Server-wide stream id (the store keys watchers by it).
    id: u64,
    /// The stream's ordered queue (events, created, canceled, progress).
    queue: Arc<StreamQueue>,
    watches: Mutex<HashMap<i64, WatchOpts>>,
    next_id: Mutex<i64>,
    catch_up: Arc<Notify>,
}

impl StreamCtx {
    fn key(&self, id: i64) -> WatchKey {
        WatchKey {
            stream: self.id,
            id,
        }
    }
}

type WatchStreamOut =
    Pin<Box<dyn Stream<Item = Result<EncodedWatchResponse, Status>> + Send + 'static>>;

/// Where the send loop puts finished responses (the gRPC stream).
type Out = mpsc::Sender<Result<EncodedWatchResponse, Status>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStreamOut;

    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let require_leader = req
            .metadata()
            .get("hasleader")
            .is_some_and(|v| v.as_bytes() == b"true");
        if require_leader && self.node.raft().leader().is_none() {
            return Err(Status::unavailable(msg::ERR_NO_LEADER));
        }
        let stream_id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let ctx = Arc::new(StreamCtx {
            node: self.node.clone(),
            id: stream_id,
            queue: Arc::new(StreamQueue::new()),
            watches: Mutex::new(HashMap::new()),
            next_id: Mutex::new(0),
            catch_up: self.catch_up.clone(),
        });
        let requests = req.into_inner();
        if require_leader {
            tokio::spawn(monitor_leader(
                ctx.clone(),
                out_tx.clone(),
                self.stop.clone(),
            ));
        }
        tokio::spawn(recv_loop(
            ctx.clone(),
            requests,
            out_tx.clone(),
            self.stop.clone(),
        ));
        tokio::spawn(send_loop(
            ctx,
            out_tx,
            self.progress_interval,
            self.max_request_bytes,
            self.stop.clone(),
        ));
        let out = tokio_stream::wrappers::ReceiverStream::new(out_rx);
        Ok(Response::new(Box::pin(out)))
    }
}

/// Leader checks without a leader after which a `hasleader` stream is canceled (etcd's
/// `maxNoLeaderCnt`).
const MAX_NO_LEADER_CHECKS: u32 = 3;

/// For a stream opened with `hasleader: true` (clientv3's `WithRequireLeader`): once this member
/// has seen no leader for three election timeouts in a row, end the stream with etcd's
/// `etcdserver: no leader`, so the client reconnects elsewhere instead of waiting on a member
/// cut off from the cluster (etcd's `monitorLeader`).
async fn monitor_leader(
    ctx: Arc<StreamCtx>,
    out: Out,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let period = ctx.node.raft().election_timeout();
    let mut misses = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = out.closed() => return,
            _ = stop.wait_for(|s| *s) => return,
        }
        if ctx.node.raft().has_live_leader(period).await {
            misses = 0;
            continue;
        }
        misses += 1;
        if misses >= MAX_NO_LEADER_CHECKS {
            tracing::info!(
                stream = ctx.id,
                "no leader: canceling a watch stream that requires one"
            );
            ctx.node.store().cancel_watch_stream(ctx.id);
            let _ = out.send(Err(Status::unavailable(msg::ERR_NO_LEADER))).await;
            return;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// Reads the client's requests until the stream ends, then removes the stream's watchers.
async fn recv_loop(
    ctx: Arc<StreamCtx>,
    mut requests: Streaming<WatchRequest>,
    out: Out,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let (node, stream, queue) = (&ctx.node, ctx.id, &ctx.queue);
    loop {
        let next = tokio::select! {
            r = requests.message() => r,
            _ = stopped(&mut stop) => break,
        };
        let req = match next {
            Ok(Some(r)) => r,
            // The client closed its sending side: it may still read (etcd keeps the stream).
            // The send loop ends the stream when the client goes away.
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, stream, "watch stream closed by error");
                break;
            }
        };
        let ok = match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => create(&ctx, c).await,
            Some(RequestUnion::CancelRequest(c)) => {
                let known = lock(&ctx.watches).remove(&c.watch_id).is_some();
                node.store().cancel_watch(ctx.key(c.watch_id));
                if known {
                    let resp = WatchResponse {
                        header: header(node.store().current_revision()),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    };
                    queue.send(WatchMessage::response(resp))
                } else {
                    true
                }
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                let sink = ctx.queue.clone();
                match node.store().request_progress(stream, sink) {
                    Some(rev) => queue.send(WatchMessage::response(progress_response(rev))),
                    // Answered by the catch-up once this stream's watchers are synced.
                    None => {
                        ctx.catch_up.notify_one();
                        true
                    }
                }
            }
            None => true,
        };
        if !ok {
            break;
        }
    }
    node.store().cancel_watch_stream(stream);
    drop(out);
}

async fn create(ctx: &StreamCtx, c: WatchCreateRequest) -> bool {
    let (node, queue) = (&ctx.node, &ctx.queue);
    // etcd: an empty key means "\0", the smallest key.
    let key = if c.key.is_empty() {
        vec![0]
    } else {
        c.key.clone()
    };
    let range = KeyRange::new(&key, &c.range_end);
    let refuse = |reason: &str, id: i64| {
        WatchMessage::response(WatchResponse {
            header: header(node.store().current_revision()),
            watch_id: id,
            created: true,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        })
    };
    if let KeyRange::Interval {
        start,
        end: Some(end),
    } = &range
    {
        if start >= end {
            return queue.send(refuse(ERR_EMPTY_WATCHER_RANGE, -1));
        }
    }
    let id = {
        let mut watches = lock(&ctx.watches);
        let id = if c.watch_id != 0 {
            if watches.contains_key(&c.watch_id) {
                None
            } else {
                Some(c.watch_id)
            }
        } else {
            let mut next = lock(&ctx.next_id);
            while watches.contains_key(&*next) {
                *next += 1;
            }
            let id = *next;
            *next += 1;
            Some(id)
        };
        if let Some(id) = id {
            watches.insert(
                id,
                WatchOpts {
                    prev_kv: c.prev_kv,
                    fragment: c.fragment,
                    progress_notify: c.progress_notify,
                    active: false,
                },
            );
        }
        id
    };
    let Some(id) = id else {
        return queue.send(refuse(ERR_DUPLICATE_WATCH_ID, -1));
    };
    let no_put = c.filters.contains(&0);
    let no_delete = c.filters.contains(&1);
    let key = ctx.key(id);
    let spec = WatchSpec {
        range,
        start_revision: c.start_revision,
        no_put,
        no_delete,
    };
    let sink = ctx.queue.clone();
    let rev = node.store().watch(key, spec, sink);
    let created = WatchResponse {
        header: header(rev),
        watch_id: id,
        created: true,
        ..Default::default()
    };
    if !queue.send(WatchMessage::response(created)) {
        return false;
    }
    node.store().activate_watch(key);
    ctx.catch_up.notify_one();
    true
}

/// Turns the stream's queue into gRPC responses: prev_kv, header, fragments, progress ticks.
async fn send_loop(
    ctx: Arc<StreamCtx>,
    out: Out,
    progress_interval: Duration,
    max_request_bytes: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(progress_interval);
    ticker.tick().await;
    let mut batch = VecDeque::new();
    'stream: loop {
        tokio::select! {
            _ = ctx.queue.ready.notified() => {}
            _ = ticker.tick() => {
                // Periodic progress for quiet, synced watches that asked for it; queued behind
                // their events so it never runs ahead of them.
                let due: Vec<i64> = {
                    let mut watches = lock(&ctx.watches);
                    let mut due = Vec::new();
                    for (id, o) in watches.iter_mut() {
                        if o.progress_notify && !o.active {
                            due.push(*id);
                        }
                        o.active = false;
                    }
                    due
                };
                for id in due {
                    if let Some(rev) = ctx.node.store().watcher_progress(ctx.key(id)) {
                        let resp = WatchResponse { header: header(rev), watch_id: id, ..Default::default() };
                        let _ = ctx.queue.try_send(WatchMessage::response(resp));
                    }
                }
            }
            _ = out.closed() => break,
            _ = stopped(&mut stop) => break,
        }
        // Everything queued goes out before the next wait.
        loop {
            if ctx.queue.take(&mut batch) {
                // Watchers of this stream fell behind on a full queue; it is empty now.
                ctx.catch_up.notify_one();
            }
            if batch.is_empty() {
                break;
            }
            if !send_batch(&ctx, &mut batch, &out, max_request_bytes).await {
                break 'stream;
            }
        }
    }
    ctx.queue.close();
    ctx.node.store().cancel_watch_stream(ctx.id);
}

/// Resolves once the server stops (never, if the stop signal is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// One watch's events waiting in a batch: whole revisions, in order, possibly several.
struct Joined {
    watch_id: i64,
    /// The header revision: the latest of the joined messages'.
    revision: i64,
    parts: Vec<Arc<EventBatch>>,
    /// Encoded size of the events (without `prev_kv`), to bound the response.
    bytes: usize,
}

/// What the send loop sends, in order: a watch's joined events or any other response.
enum Outgoing {
    Events(Joined),
    Response(WatchResponse),
}

/// Most parts a joined response's list is sized for before its first part: a stream whose
/// watchers each get one of many revisions (watches on different keys) then allocates a little
/// more per watcher, not a list as long as the batch.
const PARTS_PRESIZED: usize = 16;

/// Turns what one take from the queue holds into what to send, in order. Event messages of one
/// watch that waited together become one response (as etcd's catch-up sends up to 1000
/// revisions in one), so a stream whose client or connection falls behind sends fewer, larger
/// responses instead of one per watcher per revision. Revisions are never split; a joined
/// response stays under [`JOIN_BYTES`] unless one revision alone is larger; and nothing joins
/// across another kind of message (created, canceled, progress): every event queued before one
/// goes out before it, as queued.
fn join_batch(batch: &mut VecDeque<WatchMessage>, out: &mut Vec<Outgoing>) {
    // Where in `out` each watch's latest joined response is, since the last other response.
    let mut latest: HashMap<i64, usize> = HashMap::new();
    // A watch has at most one message per revision, so no joined response holds more parts
    // than the batch has revisions (at most the times the revision changes along it): each
    // list is sized for that at once, up to [`PARTS_PRESIZED`], where growing part by part
    // reallocated every watcher's list as the revisions came (3 % of the server's CPU with
    // 10,000 watchers on one key).
    let mut revisions = 0usize;
    let mut last = None;
    for msg in batch.iter() {
        if let WatchMessage::Events { revision, .. } = msg {
            if last != Some(*revision) {
                revisions += 1;
                last = Some(*revision);
            }
        }
    }
    for msg in batch.drain(..) {
        match msg {
            WatchMessage::Response(r) => {
                latest.clear();
                out.push(Outgoing::Response(*r));
            }
            WatchMessage::Events {
                watch_id,
                revision,
                events,
            } => {
                let bytes = events.fields().len();
                let joinable = latest.get(&watch_id).and_then(|&i| match &mut out[i] {
                    Outgoing::Events(j) if j.bytes + bytes <= JOIN_BYTES => Some(j),
                    _ => None,
                });
                match joinable {
                    Some(j) => {
                        j.revision = j.revision.max(revision);
                        j.parts.push(events);
                        j.bytes += bytes;
                    }
                    None => {
                        latest.insert(watch_id, out.len());
                        let mut parts = Vec::with_capacity(revisions.min(PARTS_PRESIZED));
                        parts.push(events);
                        out.push(Outgoing::Events(Joined {
                            watch_id,
                            revision,
                            parts,
                            bytes,
                        }));
                    }
                }
            }
        }
    }
}

/// Sends what one take from the queue holds (see [`join_batch`]); false once the client is gone.
async fn send_batch(
    ctx: &StreamCtx,
    batch: &mut VecDeque<WatchMessage>,
    out: &Out,
    max_request_bytes: usize,
) -> bool {
    let mut outgoing = Vec::new();
    join_batch(batch, &mut outgoing);
    for o in outgoing {
        let sent = match o {
            Outgoing::Events(j) => deliver(ctx, j, out, max_request_bytes).await,
            Outgoing::Response(r) => {
                let mut resp = EncodedWatchResponse::from(r);
                ctx.node.fill_ids(&mut resp.header);
                out.send(Ok(resp)).await.is_ok()
            }
        };
        if !sent {
            return false;
        }
    }
    true
}

/// A joined response's events, as the encoder reads them: references to the shared batches
/// of events, each already encoded as the response's fields.
#[derive(Debug)]
struct JoinedEvents {
    parts: Vec<Arc<EventBatch>>,
    /// Send the encodings with `prev_kv` (looked up before this is built).
    prev_kv: bool,
}

impl EncodedEvents for JoinedEvents {
    fn for_each_run(&self, f: &mut dyn FnMut(&[u8])) {
        for p in &self.parts {
            f(p.fields_as_sent(self.prev_kv));
        }
    }
}

/// Sends one watch's joined events: `prev_kv` filled if asked, fragmented if asked and too large.
async fn deliver(ctx: &StreamCtx, j: Joined, out: &Out, max_request_bytes: usize) -> bool {
    let node = &ctx.node;
    let opts = lock(&ctx.watches).get_mut(&j.watch_id).map(|o| {
        o.active = true;
        *o
    });
    let Some(opts) = opts else {
        // Canceled while these were queued: etcd drops them too.
        return true;
    };
    let store = node.store();
    if opts.prev_kv {
        for p in &j.parts {
            p.fields_with_prev(|ev| store.watch_prev_kv(ev));
        }
    }
    let mut resp = EncodedWatchResponse {
        header: header(j.revision),
        watch_id: j.watch_id,
        ..Default::default()
    };
    node.fill_ids(&mut resp.header);
    if opts.fragment {
        // Rare (a watch that asked for fragments): one handle per event, so a large response
        // can be split between them.
        resp.events = j
            .parts
            .iter()
            .flat_map(|p| p.iter())
            .map(|e| e.encoded_as_sent(opts.prev_kv).clone())
            .collect();
        if resp.events.len() > 1 && resp.encoded_len() >= max_request_bytes {
            for part in fragments(resp, max_request_bytes) {
                if out.send(Ok(part)).await.is_err() {
                    return false;
                }
            }
            return true;
        }
        return out.send(Ok(resp)).await.is_ok();
    }
    resp.shared_events = Some(Arc::new(JoinedEvents {
        parts: j.parts,
        prev_kv: opts.prev_kv,
    }));
    out.send(Ok(resp)).await.is_ok()
}

/// etcd's `sendFragments`: consecutive responses each under the limit (at least one event each),
/// all but the last marked `fragment`.
fn fragments(resp: EncodedWatchResponse, max_bytes: usize) -> Vec<EncodedWatchResponse> {
    let mut parts = Vec::new();
    let mut template = resp.clone();
    template.events.clear();
    template.fragment = true;
    let base = template.encoded_len();
    let mut cur = template.clone();
    let mut size = base;
    for ev in resp.events {
        let len = event_field_len(&ev);
        if !cur.events.is_empty() && size + len >= max_bytes {
            parts.push(std::mem::replace(&mut cur, template.clone()));
            size = base;
        }
        size += len;
        cur.events.push(ev);
    }
    cur.fragment = false;
    parts.push(cur);
    parts
}

#[cfg(test)]
mod tests {
    use fetcd_proto::mvccpb::Event;
    use fetcd_proto::mvccpb::KeyValue;
    use fetcd_storage::SharedEvent;

    use super::*;

    fn encoded(resp: WatchResponse) -> EncodedWatchResponse {
        EncodedWatchResponse::from(resp)
    }

    fn events(watch_id: i64, rev: i64, keys: &[&[u8]], value_len: usize) -> WatchMessage {
        let events = keys
            .iter()
            .map(|k| {
                SharedEvent::new(Event {
                    kv: Some(KeyValue {
                        key: k.to_vec(),
                        value: vec![b'v'; value_len].into(),
                        create_revision: 1,
                        mod_revision: rev,
                        version: 1,
                        lease: 0,
                    }),
                    ..Default::default()
                })
            })
            .collect();
        WatchMessage::Events {
            watch_id,
            revision: rev,
            events: EventBatch::new(events),
        }
    }

    /// (watch id, header revision, each event's (key, revision)) of a response to send; other
    /// responses as (watch id, -1, []).
    type Shape = (i64, i64, Vec<(Vec<u8>, i64)>);

    fn shape(out: &[Outgoing]) -> Vec<Shape> {
        out.iter()
            .map(|o| match o {
                Outgoing::Events(j) => (
                    j.watch_id,
                    j.revision,
                    j.parts
                        .iter()
                        .flat_map(|p| p.iter())
                        .map(|e| {
                            let kv = e.event().kv.as_ref().expect("kv");
                            (kv.key.clone(), kv.mod_revision)
                        })
                        .collect(),
                ),
                Outgoing::Response(r) => (r.watch_id, -1, Vec::new()),
            })
            .collect()
    }

    #[test]
    fn queued_revisions_of_a_watch_join_but_never_across_other_responses() {
        let k = |k: &[u8], r: i64| (k.to_vec(), r);
        let mut batch: VecDeque<WatchMessage> = VecDeque::new();
        batch.push_back(events(1, 5, &[b"a", b"b"], 10));
        batch.push_back(events(2, 5, &[b"a"], 10));
        batch.push_back(events(1, 6, &[b"a"], 10));
        batch.push_back(events(2, 7, &[b"a"], 10));
        // A progress response: everything before it goes out before it.
        batch.push_back(WatchMessage::response(progress_response(7)));
        batch.push_back(events(1, 8, &[b"c"], 10));
        batch.push_back(events(1, 9, &[b"d"], 10));
        let mut out = Vec::new();
        join_batch(&mut batch, &mut out);
        assert!(batch.is_empty());
        assert_eq!(
            shape(&out),
            vec![
                (1, 6, vec![k(b"a", 5), k(b"b", 5), k(b"a", 6)]),
                (2, 7, vec![k(b"a", 5), k(b"a", 7)]),
                (-1, -1, vec![]),
                (1, 9, vec![k(b"c", 8), k(b"d", 9)]),
            ]
        );
    }

    #[test]
    fn joined_responses_stay_under_the_bound_without_splitting_a_revision() {
        let third = JOIN_BYTES / 3;
        let mut batch: VecDeque<WatchMessage> =
            (1..=7).map(|rev| events(1, rev, &[b"k"], third)).collect();
        // One revision larger than the bound on its own still goes whole.
        batch.push_back(events(1, 8, &[b"x", b"y"], JOIN_BYTES));
        let mut out = Vec::new();
        join_batch(&mut batch, &mut out);
        let revs: Vec<Vec<i64>> = shape(&out)
            .into_iter()
            .map(|(_, _, evs)| evs.into_iter().map(|(_, r)| r).collect())
            .collect();
        assert_eq!(
            revs,
            vec![vec![1, 2], vec![3, 4], vec![5, 6], vec![7], vec![8, 8]]
        );
        for o in &out[..4] {
            let Outgoing::Events(j) = o else {
                panic!("events expected")
            };
            assert!(j.bytes <= JOIN_BYTES);
        }
    }

    #[test]
    fn a_stream_queue_takes_a_fan_out_batch_up_to_its_bound() {
        let q = StreamQueue::new();
        for rev in 0..(STREAM_QUEUE - 2) as i64 {
            assert_eq!(q.try_send(events(1, rev, &[b"k"], 1)), SendOutcome::Sent);
        }
        let mut msgs: Vec<WatchMessage> = (0..5).map(|id| events(id, 99, &[b"k"], 1)).collect();
        assert_eq!(q.try_send_many(&mut msgs), (2, SendOutcome::Full));
        assert!(msgs.is_empty());
        let mut taken = VecDeque::new();
        assert!(
            q.take(&mut taken),
            "the overflow is reported to the send loop"
        );
        assert_eq!(taken.len(), STREAM_QUEUE);
        let last: Vec<i64> = taken
            .iter()
            .rev()
            .take(2)
            .map(|m| match m {
                WatchMessage::Events { watch_id, .. } => *watch_id,
                WatchMessage::Response(_) => -1,
            })
            .collect();
        assert_eq!(
            last,
            vec![1, 0],
            "the first of the batch were queued, in order"
        );
        q.close();
        let mut msgs = vec![events(1, 100, &[b"k"], 1)];
        assert_eq!(q.try_send_many(&mut msgs), (0, SendOutcome::Closed));
    }

    #[test]
    fn fragments_keep_every_event_in_order_and_mark_all_but_last() {
        let ev = |i: u8| Event {
            kv: Some(KeyValue {
                key: vec![i],
                value: vec![i; 400].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let resp = WatchResponse {
            watch_id: 3,
            events: (0..10).map(ev).collect(),
            ..Default::default()
        };
        let parts = fragments(encoded(resp.clone()), 1000);
        assert!(parts.len() > 1);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
        assert!(!parts[parts.len() - 1].fragment);
        // Each part decodes as a WatchResponse; together they hold every event in order.
        let decoded: Vec<WatchResponse> = parts
            .iter()
            .map(|p| WatchResponse::decode(p.encode_to_vec().as_slice()).expect("decodes"))
            .collect();
        let joined: Vec<Event> = decoded.iter().flat_map(|p| p.events.clone()).collect();
        assert_eq!(joined, resp.events);
        assert!(parts
            .iter()
            .all(|p| p.watch_id == 3 && !p.events.is_empty()));
        // Every part but those holding a single event stays under the limit.
        assert!(parts
            .iter()
            .all(|p| p.events.len() == 1 || p.encoded_len() < 1000));
    }
}
