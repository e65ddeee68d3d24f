//! etcd's Watch service: one bidirectional stream carries many watches.
//!
//! Per stream, a receive loop handles create / cancel / progress requests and a send loop turns
//! the stream's queue into gRPC responses. Everything for a stream — `created`, events,
//! progress, `canceled` — passes through one ordered queue, so `created` precedes a watch's
//! events and a progress revision never overtakes events at or below it. The send loop fills
//! `prev_kv` (the value at `mod_revision - 1`, as etcd's `sendLoop`), fills the header and splits
//! large responses for watches that asked for `fragment`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use fetcd_proto::etcdserverpb::watch_request::RequestUnion;
use fetcd_proto::etcdserverpb::watch_server::Watch;
use fetcd_proto::etcdserverpb::RangeRequest;
use fetcd_proto::etcdserverpb::ResponseHeader;
use fetcd_proto::etcdserverpb::WatchCreateRequest;
use fetcd_proto::etcdserverpb::WatchRequest;
use fetcd_proto::etcdserverpb::WatchResponse;
use fetcd_proto::mvccpb::event::EventType;
use fetcd_proto::status as msg;
use fetcd_storage::watch::progress_response;
use fetcd_storage::KeyRange;
use fetcd_storage::SendOutcome;
use fetcd_storage::WatchKey;
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

/// Responses a stream may have queued before its watchers fall behind (etcd: 128).
const STREAM_QUEUE: usize = 128;
/// Revisions one catch-up round hands one watcher (etcd's `watchBatchMaxRevs`).
const CATCH_UP_REVISIONS: i64 = 1000;
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
    pub fn new(node: Arc<EtcdNode>, progress_interval: Duration, max_request_bytes: usize) -> Self {
        let catch_up = Arc::new(Notify::new());
        tokio::spawn(catch_up_loop(node.clone(), catch_up.clone()));
        WatchService {
            node,
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
        let store = node.store();
        while store.has_unsynced_watchers() {
            if let Err(e) = store.sync_watchers(CATCH_UP_REVISIONS) {
                tracing::error!(error = %e, "watch catch-up failed");
                break;
            }
            // Let full queues drain before trying again.
            tokio::task::yield_now().await;
            if store.has_unsynced_watchers() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// The stream's ordered queue, as the store sees it.
struct QueueSink(mpsc::Sender<WatchResponse>);

impl WatchSink for QueueSink {
    fn try_send(&self, resp: WatchResponse) -> SendOutcome {
        match self.0.try_send(resp) {
            Ok(()) => SendOutcome::Sent,
            Err(mpsc::error::TrySendError::Full(_)) => SendOutcome::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => SendOutcome::Closed,
        }
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

/// State shared by a stream's two loops.
struct StreamState {
    watches: Mutex<HashMap<i64, WatchOpts>>,
    next_id: Mutex<i64>,
}

type WatchStreamOut = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send + 'static>>;

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
        let (queue_tx, queue_rx) = mpsc::channel(STREAM_QUEUE);
        let (out_tx, out_rx) = mpsc::channel(STREAM_QUEUE);
        let state = Arc::new(StreamState {
            watches: Mutex::new(HashMap::new()),
            next_id: Mutex::new(0),
        });
        let requests = req.into_inner();
        tokio::spawn(recv_loop(
            self.node.clone(),
            stream_id,
            requests,
            queue_tx.clone(),
            state.clone(),
            self.catch_up.clone(),
            out_tx.clone(),
        ));
        tokio::spawn(send_loop(
            self.node.clone(),
            stream_id,
            queue_rx,
            queue_tx,
            out_tx,
            state,
            self.progress_interval,
            self.max_request_bytes,
        ));
        let out = tokio_stream::wrappers::ReceiverStream::new(out_rx);
        Ok(Response::new(Box::pin(out)))
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
    node: Arc<EtcdNode>,
    stream: u64,
    mut requests: Streaming<WatchRequest>,
    queue: mpsc::Sender<WatchResponse>,
    state: Arc<StreamState>,
    catch_up: Arc<Notify>,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
) {
    loop {
        let req = match requests.message().await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, stream, "watch stream closed by error");
                break;
            }
        };
        let ok = match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => {
                create(&node, stream, c, &queue, &state, &catch_up).await
            }
            Some(RequestUnion::CancelRequest(c)) => {
                let key = WatchKey {
                    stream,
                    id: c.watch_id,
                };
                let known = lock(&state.watches).remove(&c.watch_id).is_some();
                node.store().cancel_watch(key);
                if known {
                    let resp = WatchResponse {
                        header: header(node.store().current_revision()),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    };
                    queue.send(resp).await.is_ok()
                } else {
                    true
                }
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                let sink = Arc::new(QueueSink(queue.clone()));
                match node.store().request_progress(stream, sink) {
                    Some(rev) => queue.send(progress_response(rev)).await.is_ok(),
                    // Answered by the catch-up once this stream's watchers are synced.
                    None => {
                        catch_up.notify_one();
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

async fn create(
    node: &Arc<EtcdNode>,
    stream: u64,
    c: WatchCreateRequest,
    queue: &mpsc::Sender<WatchResponse>,
    state: &Arc<StreamState>,
    catch_up: &Arc<Notify>,
) -> bool {
    // etcd: an empty key means "\0", the smallest key.
    let key = if c.key.is_empty() {
        vec![0]
    } else {
        c.key.clone()
    };
    let range = KeyRange::new(&key, &c.range_end);
    let refuse = |reason: &str, id: i64| WatchResponse {
        header: header(node.store().current_revision()),
        watch_id: id,
        created: true,
        canceled: true,
        cancel_reason: reason.to_string(),
        ..Default::default()
    };
    if let KeyRange::Interval {
        start,
        end: Some(end),
    } = &range
    {
        if start >= end {
            return queue
                .send(refuse(ERR_EMPTY_WATCHER_RANGE, -1))
                .await
                .is_ok();
        }
    }
    let id = {
        let mut watches = lock(&state.watches);
        let id = if c.watch_id != 0 {
            if watches.contains_key(&c.watch_id) {
                None
            } else {
                Some(c.watch_id)
            }
        } else {
            let mut next = lock(&state.next_id);
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
        return queue.send(refuse(ERR_DUPLICATE_WATCH_ID, -1)).await.is_ok();
    };
    let no_put = c.filters.contains(&0);
    let no_delete = c.filters.contains(&1);
    let key = WatchKey { stream, id };
    let spec = WatchSpec {
        range,
        start_revision: c.start_revision,
        no_put,
        no_delete,
    };
    let sink = Arc::new(QueueSink(queue.clone()));
    let rev = node.store().watch(key, spec, sink);
    let created = WatchResponse {
        header: header(rev),
        watch_id: id,
        created: true,
        ..Default::default()
    };
    if queue.send(created).await.is_err() {
        return false;
    }
    node.store().activate_watch(key);
    catch_up.notify_one();
    true
}

/// Turns the stream's queue into gRPC responses: prev_kv, header, fragments, progress ticks.
#[allow(clippy::too_many_arguments)]
async fn send_loop(
    node: Arc<EtcdNode>,
    stream: u64,
    mut queue: mpsc::Receiver<WatchResponse>,
    queue_tx: mpsc::Sender<WatchResponse>,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
    state: Arc<StreamState>,
    progress_interval: Duration,
    max_request_bytes: usize,
) {
    let mut ticker = tokio::time::interval(progress_interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            resp = queue.recv() => {
                let Some(resp) = resp else { break };
                if !deliver(&node, &state, resp, &out, max_request_bytes).await {
                    break;
                }
            }
            _ = ticker.tick() => {
                // Periodic progress for quiet, synced watches that asked for it; queued behind
                // their events so it never runs ahead of them.
                let due: Vec<i64> = {
                    let mut watches = lock(&state.watches);
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
                    if let Some(rev) = node.store().watcher_progress(WatchKey { stream, id }) {
                        let resp = WatchResponse { header: header(rev), watch_id: id, ..Default::default() };
                        let _ = queue_tx.try_send(resp);
                    }
                }
            }
            _ = out.closed() => break,
        }
    }
    node.store().cancel_watch_stream(stream);
}

async fn deliver(
    node: &Arc<EtcdNode>,
    state: &Arc<StreamState>,
    mut resp: WatchResponse,
    out: &mpsc::Sender<Result<WatchResponse, Status>>,
    max_request_bytes: usize,
) -> bool {
    let opts = lock(&state.watches).get(&resp.watch_id).copied();
    if !resp.events.is_empty() {
        if let Some(o) = lock(&state.watches).get_mut(&resp.watch_id) {
            o.active = true;
        }
        if opts.is_some_and(|o| o.prev_kv) {
            fill_prev_kv(node, &mut resp);
        }
    }
    node.fill_header(&mut resp.header);
    if opts.is_some_and(|o| o.fragment)
        && resp.encoded_len() >= max_request_bytes
        && resp.events.len() > 1
    {
        for part in fragments(resp, max_request_bytes) {
            if out.send(Ok(part)).await.is_err() {
                return false;
            }
        }
        return true;
    }
    out.send(Ok(resp)).await.is_ok()
}

/// The previous value of each non-create event: the key at `mod_revision - 1` (etcd's rule; a
/// compacted previous revision leaves it empty, as in etcd).
fn fill_prev_kv(node: &EtcdNode, resp: &mut WatchResponse) {
    for ev in &mut resp.events {
        let Some(kv) = &ev.kv else { continue };
        let is_create = ev.r#type == EventType::Put as i32 && kv.create_revision == kv.mod_revision;
        if is_create {
            continue;
        }
        let req = RangeRequest {
            key: kv.key.clone(),
            revision: kv.mod_revision - 1,
            ..Default::default()
        };
        if let Ok(Ok(mut r)) = node.store().range(&req) {
            ev.prev_kv = r.kvs.pop();
        }
    }
}

/// etcd's `sendFragments`: consecutive responses each under the limit (at least one event each),
/// all but the last marked `fragment`.
fn fragments(resp: WatchResponse, max_bytes: usize) -> Vec<WatchResponse> {
    let mut parts = Vec::new();
    let mut template = resp.clone();
    template.events.clear();
    template.fragment = true;
    let mut cur = template.clone();
    for ev in resp.events {
        cur.events.push(ev);
        if cur.events.len() > 1 && cur.encoded_len() >= max_bytes {
            let ev = cur.events.pop();
            parts.push(std::mem::replace(&mut cur, template.clone()));
            cur.events.extend(ev);
        }
    }
    cur.fragment = false;
    parts.push(cur);
    parts
}

#[cfg(test)]
mod tests {
    use fetcd_proto::mvccpb::Event;
    use fetcd_proto::mvccpb::KeyValue;

    use super::*;

    #[test]
    fn fragments_keep_every_event_in_order_and_mark_all_but_last() {
        let ev = |i: u8| Event {
            kv: Some(KeyValue {
                key: vec![i],
                value: vec![i; 400],
                ..Default::default()
            }),
            ..Default::default()
        };
        let resp = WatchResponse {
            watch_id: 3,
            events: (0..10).map(ev).collect(),
            ..Default::default()
        };
        let parts = fragments(resp.clone(), 1000);
        assert!(parts.len() > 1);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
        assert!(!parts[parts.len() - 1].fragment);
        let joined: Vec<Event> = parts.iter().flat_map(|p| p.events.clone()).collect();
        assert_eq!(joined, resp.events);
        assert!(parts
            .iter()
            .all(|p| p.watch_id == 3 && !p.events.is_empty()));
    }
}
