//! Watch helpers: a raw gRPC watch stream ([`WatchConn`]) with bounded waits, request
//! builders, and the normalization of `WatchResponse`s into comparable JSON.
//!
//! The raw generated client (`fetcd_proto::etcdserverpb::watch_client::WatchClient`) is used
//! by default because it shows every field of a `WatchResponse` (`fragment` included, which
//! `etcd-client` hides) and gives exact control over what is sent on the stream. A stream
//! opened with `etcd-client` ([`WatchConn::from_client`]) behaves the same, except that its
//! responses always report `fragment = false`.
//!
//! Normalization (see [`watch_response`]): the header keeps only `revision`; `watch_id`,
//! `created`, `canceled`, `compact_revision`, `cancel_reason`, `fragment` and the events
//! (`type`, `kv`, `prev_kv`) are kept.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use fetcd_proto::etcdserverpb::watch_client::WatchClient;
use fetcd_proto::etcdserverpb::watch_create_request::FilterType;
use fetcd_proto::etcdserverpb::watch_request::RequestUnion;
use fetcd_proto::etcdserverpb::{
    ResponseHeader, WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest,
    WatchResponse,
};
use fetcd_proto::mvccpb::{Event, KeyValue};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tonic::transport::Endpoint;

use crate::observe::bytes;

/// How long a test waits for one expected watch response.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a test waits to conclude that nothing more arrives.
pub const QUIET_PERIOD: Duration = Duration::from_millis(300);

/// Decoding limit of the raw client: far above anything the tests provoke, so that an
/// unfragmented multi-MiB response is observed rather than rejected by the client.
const MAX_DECODING: usize = 64 * 1024 * 1024;

/// `mvccpb.Event.EventType`.
pub const PUT: i32 = 0;
pub const DELETE: i32 = 1;

/// What one read from a watch stream produced.
#[derive(Debug)]
pub enum Received {
    Response(WatchResponse),
    /// The server ended the stream with this gRPC status.
    Status(tonic::Status),
    /// Any other error of the client library (etcd-client streams).
    ClientError(String),
    /// The server closed the stream cleanly.
    End,
    /// Nothing arrived within the wait.
    Nothing,
}

impl Received {
    /// Normalized JSON: `{"response": ..}`, `{"status": {code, message}}`, `{"client_error"}`,
    /// `{"end": true}` or `{"nothing": true}`.
    pub fn to_value(&self) -> Value {
        match self {
            Received::Response(r) => json!({ "response": watch_response(r) }),
            Received::Status(s) => json!({ "status": status(s) }),
            Received::ClientError(e) => json!({ "client_error": e }),
            Received::End => json!({ "end": true }),
            Received::Nothing => json!({ "nothing": true }),
        }
    }
}

enum Inner {
    Raw {
        tx: Option<mpsc::UnboundedSender<WatchRequest>>,
        rx: tonic::Streaming<WatchResponse>,
    },
    Client(etcd_client::WatchStream),
}

/// One bidirectional Watch stream.
pub struct WatchConn {
    inner: Inner,
}

/// Opens a raw gRPC channel to `url` (`http://host:port`).
pub async fn raw_client(url: &str) -> anyhow::Result<WatchClient<tonic::transport::Channel>> {
    let channel = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("bad endpoint {url}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(WatchClient::new(channel)
        .max_decoding_message_size(MAX_DECODING)
        .max_encoding_message_size(MAX_DECODING))
}

impl WatchConn {
    /// Opens a raw Watch stream on `url`, sending `first` as its first request (a gRPC server
    /// need not answer the call before it has something to say, so the stream is opened with a
    /// request in flight). `Err(status)` if the server refuses the call (e.g. `Unimplemented`).
    pub async fn open(
        url: &str,
        first: WatchRequest,
    ) -> anyhow::Result<Result<Self, tonic::Status>> {
        let mut client = raw_client(url).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(first)
            .map_err(|_| anyhow!("request channel closed"))?;
        let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let call = tokio::time::timeout(WATCH_TIMEOUT, client.watch(requests))
            .await
            .with_context(|| {
                format!("Watch call to {url} not answered within {WATCH_TIMEOUT:?}")
            })?;
        Ok(call.map(|response| WatchConn {
            inner: Inner::Raw {
                tx: Some(tx),
                rx: response.into_inner(),
            },
        }))
    }

    /// Wraps a stream opened with `etcd_client::Client::watch`.
    pub fn from_client(stream: etcd_client::WatchStream) -> Self {
        WatchConn {
            inner: Inner::Client(stream),
        }
    }

    /// Sends one request on the stream.
    pub async fn send(&mut self, req: WatchRequest) -> anyhow::Result<()> {
        match &mut self.inner {
            Inner::Raw { tx, .. } => tx
                .as_ref()
                .ok_or_else(|| anyhow!("request side already closed"))?
                .send(req)
                .map_err(|_| anyhow!("watch request stream closed")),
            Inner::Client(stream) => match req.request_union {
                Some(RequestUnion::CreateRequest(c)) => {
                    let key = c.key.clone();
                    Ok(stream.watch(key, Some(client_options(c))).await?)
                }
                Some(RequestUnion::CancelRequest(c)) => Ok(stream.cancel(c.watch_id).await?),
                Some(RequestUnion::ProgressRequest(_)) => Ok(stream.request_progress().await?),
                None => bail!("etcd-client cannot send an empty WatchRequest"),
            },
        }
    }

    pub async fn create(&mut self, req: WatchCreateRequest) -> anyhow::Result<()> {
        self.send(create_request(req)).await
    }

    pub async fn cancel(&mut self, watch_id: i64) -> anyhow::Result<()> {
        self.send(cancel_request(watch_id)).await
    }

    pub async fn request_progress(&mut self) -> anyhow::Result<()> {
        self.send(progress_request()).await
    }

    /// Half-closes the request side (raw streams only; a no-op for etcd-client streams).
    pub fn close_send(&mut self) {
        if let Inner::Raw { tx, .. } = &mut self.inner {
            tx.take();
        }
    }

    /// Waits up to `wait` for the next message.
    pub async fn recv_within(&mut self, wait: Duration) -> Received {
        match &mut self.inner {
            Inner::Raw { rx, .. } => match tokio::time::timeout(wait, rx.message()).await {
                Err(_) => Received::Nothing,
                Ok(Ok(Some(r))) => Received::Response(r),
                Ok(Ok(None)) => Received::End,
                Ok(Err(s)) => Received::Status(s),
            },
            Inner::Client(stream) => match tokio::time::timeout(wait, stream.message()).await {
                Err(_) => Received::Nothing,
                Ok(Ok(Some(r))) => Received::Response(from_client_response(&r)),
                Ok(Ok(None)) => Received::End,
                Ok(Err(etcd_client::Error::GRpcStatus(s))) => Received::Status(s),
                Ok(Err(e)) => Received::ClientError(e.to_string()),
            },
        }
    }

    /// The next response, waiting at most [`WATCH_TIMEOUT`]; anything else is an error.
    pub async fn next(&mut self) -> anyhow::Result<WatchResponse> {
        match self.recv_within(WATCH_TIMEOUT).await {
            Received::Response(r) => Ok(r),
            other => bail!("expected a watch response, got {}", other.to_value()),
        }
    }

    /// Fails if anything arrives within [`QUIET_PERIOD`].
    pub async fn expect_quiet(&mut self) -> anyhow::Result<()> {
        match self.recv_within(QUIET_PERIOD).await {
            Received::Nothing => Ok(()),
            other => bail!("expected silence, got {}", other.to_value()),
        }
    }
}

/// etcd-client's `WatchOptions` equivalent to a raw create request.
fn client_options(c: WatchCreateRequest) -> etcd_client::WatchOptions {
    let mut o = etcd_client::WatchOptions::new()
        .with_start_revision(c.start_revision)
        .with_watch_id(c.watch_id);
    if !c.range_end.is_empty() {
        o = o.with_range(c.range_end);
    }
    if c.progress_notify {
        o = o.with_progress_notify();
    }
    if c.prev_kv {
        o = o.with_prev_key();
    }
    if c.fragment {
        o = o.with_fragment();
    }
    let filters: Vec<etcd_client::WatchFilterType> = c
        .filters
        .iter()
        .map(|f| match f {
            0 => etcd_client::WatchFilterType::NoPut,
            _ => etcd_client::WatchFilterType::NoDelete,
        })
        .collect();
    if !filters.is_empty() {
        o = o.with_filters(filters);
    }
    o
}

/// etcd-client key-value → wire type.
pub fn from_client_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        value: kv.value().to_vec().into(),
        lease: kv.lease(),
    }
}

/// etcd-client response → wire type (`fragment` is not visible through etcd-client: false).
fn from_client_response(r: &etcd_client::WatchResponse) -> WatchResponse {
    WatchResponse {
        header: r.header().map(|h| ResponseHeader {
            cluster_id: h.cluster_id(),
            member_id: h.member_id(),
            revision: h.revision(),
            raft_term: h.raft_term(),
        }),
        watch_id: r.watch_id(),
        created: r.created(),
        canceled: r.canceled(),
        compact_revision: r.compact_revision(),
        cancel_reason: r.cancel_reason().to_owned(),
        fragment: false,
        events: r
            .events()
            .iter()
            .map(|e| Event {
                r#type: match e.event_type() {
                    etcd_client::EventType::Put => PUT,
                    etcd_client::EventType::Delete => DELETE,
                },
                kv: e.kv().map(from_client_kv),
                prev_kv: e.prev_kv().map(from_client_kv),
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Request builders
// ---------------------------------------------------------------------------------------------

pub fn create_request(req: WatchCreateRequest) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(req)),
    }
}

pub fn cancel_request(watch_id: i64) -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest { watch_id })),
    }
}

pub fn progress_request() -> WatchRequest {
    WatchRequest {
        request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
    }
}

/// The smallest key greater than every key starting with `prefix` (etcd's `GetPrefixRangeEnd`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A create request for exactly `key`.
pub fn watch_key(key: &str) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// A create request for all keys starting with `prefix`.
pub fn watch_prefix(prefix: &str) -> WatchCreateRequest {
    WatchCreateRequest {
        key: prefix.as_bytes().to_vec(),
        range_end: prefix_end(prefix.as_bytes()),
        ..Default::default()
    }
}

/// A create request for `[key, end)`.
pub fn watch_range(key: &str, end: &str) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.as_bytes().to_vec(),
        range_end: end.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// A create request for every key `>= key` (`range_end = "\0"`).
pub fn watch_from_key(key: &str) -> WatchCreateRequest {
    WatchCreateRequest {
        key: key.as_bytes().to_vec(),
        range_end: vec![0],
        ..Default::default()
    }
}

/// Builder-style tweaks of a create request.
pub trait CreateExt: Sized {
    fn rev(self, start_revision: i64) -> Self;
    fn prev_kv(self) -> Self;
    fn id(self, watch_id: i64) -> Self;
    fn fragment(self) -> Self;
    fn no_put(self) -> Self;
    fn no_delete(self) -> Self;
}

impl CreateExt for WatchCreateRequest {
    fn rev(mut self, start_revision: i64) -> Self {
        self.start_revision = start_revision;
        self
    }
    fn prev_kv(mut self) -> Self {
        self.prev_kv = true;
        self
    }
    fn id(mut self, watch_id: i64) -> Self {
        self.watch_id = watch_id;
        self
    }
    fn fragment(mut self) -> Self {
        self.fragment = true;
        self
    }
    fn no_put(mut self) -> Self {
        self.filters.push(FilterType::Noput as i32);
        self
    }
    fn no_delete(mut self) -> Self {
        self.filters.push(FilterType::Nodelete as i32);
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Normalization
// ---------------------------------------------------------------------------------------------

pub fn kv(kv: &KeyValue) -> Value {
    json!({
        "key": bytes(&kv.key),
        "value": bytes(&kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
        "lease": kv.lease,
    })
}

pub fn event_type(t: i32) -> Value {
    match t {
        PUT => Value::from("PUT"),
        DELETE => Value::from("DELETE"),
        other => Value::from(other),
    }
}

pub fn event(e: &Event) -> Value {
    json!({
        "type": event_type(e.r#type),
        "kv": e.kv.as_ref().map(kv).unwrap_or(Value::Null),
        "prev_kv": e.prev_kv.as_ref().map(kv).unwrap_or(Value::Null),
    })
}

pub fn events(evs: &[Event]) -> Value {
    Value::Array(evs.iter().map(event).collect())
}

/// A `WatchResponse` without the server identity fields of its header.
pub fn watch_response(r: &WatchResponse) -> Value {
    json!({
        "header": match &r.header {
            Some(h) => json!({ "revision": h.revision }),
            None => Value::Null,
        },
        "watch_id": r.watch_id,
        "created": r.created,
        "canceled": r.canceled,
        "compact_revision": r.compact_revision,
        "cancel_reason": r.cancel_reason,
        "fragment": r.fragment,
        "events": events(&r.events),
    })
}

pub fn status(s: &tonic::Status) -> Value {
    json!({ "code": format!("{:?}", s.code()), "message": s.message() })
}

/// The header revision of a response (0 if absent).
pub fn header_revision(r: &WatchResponse) -> i64 {
    r.header.as_ref().map(|h| h.revision).unwrap_or(0)
}

/// `(type, key, value, create_revision, mod_revision, version)` of an event, for compact
/// absolute checks.
pub fn event_tuple(e: &Event) -> (i32, String, String, i64, i64, i64) {
    let kv = e.kv.clone().unwrap_or_default();
    (
        e.r#type,
        String::from_utf8_lossy(&kv.key).into_owned(),
        String::from_utf8_lossy(&kv.value).into_owned(),
        kv.create_revision,
        kv.mod_revision,
        kv.version,
    )
}

// ---------------------------------------------------------------------------------------------
// Recording on a Session
// ---------------------------------------------------------------------------------------------

impl crate::Session {
    /// Opens a raw Watch stream on this session's server with `first` as its first request.
    /// Records `{"opened": true}`, or the gRPC status the server refused the call with (and
    /// then fails).
    pub async fn watch_open(
        &mut self,
        step: &str,
        first: WatchRequest,
    ) -> anyhow::Result<WatchConn> {
        match WatchConn::open(self.url(), first).await? {
            Ok(conn) => {
                self.record(step, json!({ "opened": true }));
                Ok(conn)
            }
            Err(s) => {
                self.record(step, json!({ "status": status(&s) }));
                bail!("Watch call refused: {s}")
            }
        }
    }

    /// Opens a raw Watch stream whose first request creates `req`.
    pub async fn watch_create(
        &mut self,
        step: &str,
        req: WatchCreateRequest,
    ) -> anyhow::Result<WatchConn> {
        self.watch_open(step, create_request(req)).await
    }

    /// Opens a Watch stream with `etcd_client::Client::watch` (records like [`Self::watch_open`]).
    pub async fn watch_with_client(
        &mut self,
        step: &str,
        key: impl Into<Vec<u8>>,
        options: Option<etcd_client::WatchOptions>,
    ) -> anyhow::Result<WatchConn> {
        let r = tokio::time::timeout(WATCH_TIMEOUT, self.client().watch(key, options))
            .await
            .context("etcd-client watch call not answered in time")?;
        match r {
            Ok(stream) => {
                self.record(step, json!({ "opened": true }));
                Ok(WatchConn::from_client(stream))
            }
            Err(e) => {
                self.record(step, json!({ "error": crate::observe::error(&e) }));
                bail!("etcd-client watch failed: {e}")
            }
        }
    }

    /// Receives the next message (bounded by [`WATCH_TIMEOUT`]) and records it exactly. Fails
    /// unless it is a response.
    pub async fn watch_recv(
        &mut self,
        step: &str,
        w: &mut WatchConn,
    ) -> anyhow::Result<WatchResponse> {
        self.watch_recv_within(step, w, WATCH_TIMEOUT).await
    }

    /// [`Session::watch_recv`] with its own bound on the wait.
    pub async fn watch_recv_within(
        &mut self,
        step: &str,
        w: &mut WatchConn,
        wait: Duration,
    ) -> anyhow::Result<WatchResponse> {
        let got = w.recv_within(wait).await;
        self.record(step, got.to_value());
        match got {
            Received::Response(r) => Ok(r),
            other => bail!(
                "{step}: expected a watch response, got {}",
                other.to_value()
            ),
        }
    }

    /// Receives exactly `n` responses (each wait bounded by [`WATCH_TIMEOUT`]) and records them
    /// as one observation, stably sorted by `watch_id`: etcd delivers the responses of several
    /// watchers of one stream for the same revision in Go map order (random), while the order
    /// of the responses of one watcher is kept.
    pub async fn watch_recv_sorted(
        &mut self,
        step: &str,
        w: &mut WatchConn,
        n: usize,
    ) -> anyhow::Result<Vec<WatchResponse>> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match w.recv_within(WATCH_TIMEOUT).await {
                Received::Response(r) => got.push(r),
                other => {
                    got.sort_by_key(|r: &WatchResponse| r.watch_id);
                    let mut v: Vec<Value> = got.iter().map(watch_response).collect();
                    v.push(other.to_value());
                    self.record(step, Value::Array(v));
                    bail!(
                        "{step}: got {} of {n} responses, then {}",
                        got.len(),
                        other.to_value()
                    );
                }
            }
        }
        got.sort_by_key(|r| r.watch_id);
        self.record(step, Value::Array(got.iter().map(watch_response).collect()));
        Ok(got)
    }

    /// Waits [`QUIET_PERIOD`] and records `{"nothing": true}`, or whatever arrived (and fails).
    pub async fn watch_quiet(&mut self, step: &str, w: &mut WatchConn) -> anyhow::Result<()> {
        let got = w.recv_within(QUIET_PERIOD).await;
        self.record(step, got.to_value());
        match got {
            Received::Nothing => Ok(()),
            other => bail!("{step}: expected nothing, got {}", other.to_value()),
        }
    }

    /// Receives responses until `n` events have arrived (each wait bounded by
    /// [`WATCH_TIMEOUT`]) and records them flattened: `{"watch_ids": [..distinct, in order],
    /// "events": [..], "fragment": any}`. How the server batches revisions into responses
    /// is not recorded (etcd 3.4 sends a historical replay as one response, live events one
    /// response per revision), but splitting one revision over several responses (without
    /// `fragment`), responses without events, and out-of-order revisions fail the step.
    pub async fn watch_events(
        &mut self,
        step: &str,
        w: &mut WatchConn,
        n: usize,
    ) -> anyhow::Result<Vec<Event>> {
        let mut evs: Vec<Event> = Vec::new();
        let mut ids: Vec<i64> = Vec::new();
        let mut problems: Vec<String> = Vec::new();
        let mut last_rev_of_prev_response = 0i64;
        while evs.len() < n {
            let got = w.recv_within(WATCH_TIMEOUT).await;
            let r = match got {
                Received::Response(r) => r,
                other => {
                    self.record(
                        step,
                        json!({ "watch_ids": ids, "events": events(&evs), "then": other.to_value() }),
                    );
                    bail!(
                        "{step}: got {} of {n} events, then {}",
                        evs.len(),
                        other.to_value()
                    );
                }
            };
            if !ids.contains(&r.watch_id) {
                ids.push(r.watch_id);
            }
            if r.events.is_empty() || r.created || r.canceled {
                problems.push(format!(
                    "unexpected non-event response {}",
                    watch_response(&r)
                ));
            }
            let mut prev = 0i64;
            for e in &r.events {
                let rev = e.kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(0);
                if rev < prev {
                    problems.push(format!(
                        "revisions out of order within a response: {rev} after {prev}"
                    ));
                }
                if rev <= last_rev_of_prev_response {
                    problems.push(format!(
                        "revision {rev} after a response that ended at {last_rev_of_prev_response} \
                         (split or reordered revision)"
                    ));
                }
                prev = rev;
            }
            if !r.fragment {
                last_rev_of_prev_response = prev;
            }
            evs.extend(r.events);
        }
        self.record(step, json!({ "watch_ids": ids, "events": events(&evs) }));
        if !problems.is_empty() {
            bail!("{step}: {}", problems.join("; "));
        }
        Ok(evs)
    }
}
