//! etcd's core Prometheus metrics, written in the text exposition format from cheap atomics
//! (no metrics library): enough for dashboards and alerts built on etcd's metric names.
//!
//! - `etcd_server_has_leader`, `etcd_server_leader_changes_seen_total`,
//!   `etcd_server_proposals_committed_total`, `etcd_server_proposals_applied_total`;
//! - `etcd_mvcc_db_total_size_in_bytes` (the member's on-disk size, as the quota sees it);
//! - `etcd_disk_wal_fsync_duration_seconds` (see `fetcd_raft::metrics`);
//! - `grpc_server_started_total` / `grpc_server_handled_total` by service, method, type and code
//!   (go-grpc-prometheus names), counted by [`GrpcMetricsLayer`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::Context;
use std::task::Poll;

use bytes::Bytes;
use fetcd_raft::RaftNode;
use http_body::Frame;
use tonic::body::Body;
use tonic::Status;

use crate::node::EtcdNode;

/// gRPC codes by number, with the names go-grpc-prometheus uses as `grpc_code`.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// One gRPC method: `(service, method)`.
type MethodKey = (String, String);

#[derive(Debug, Default)]
struct MethodCounts {
    started: u64,
    handled: BTreeMap<&'static str, u64>,
}

/// The member's counters (gauges are read from Raft and the store when scraped).
#[derive(Debug, Default)]
pub struct Metrics {
    leader_changes: AtomicU64,
    grpc: Mutex<BTreeMap<MethodKey, MethodCounts>>,
}

impl Metrics {
    fn grpc(&self) -> std::sync::MutexGuard<'_, BTreeMap<MethodKey, MethodCounts>> {
        self.grpc.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn started(&self, key: &MethodKey) {
        self.grpc().entry(key.clone()).or_default().started += 1;
    }

    fn handled(&self, key: &MethodKey, code: &'static str) {
        *self
            .grpc()
            .entry(key.clone())
            .or_default()
            .handled
            .entry(code)
            .or_default() += 1;
    }

    /// Records that the leader changed (or one was elected).
    pub fn leader_changed(&self) {
        self.leader_changes.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts leader changes as etcd does (every time a new leader is known) until `stop`.
pub async fn watch_leader(node: Arc<EtcdNode>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut rx = node.raft().raft().metrics();
    let mut last = None;
    loop {
        let leader = rx.borrow_and_update().current_leader;
        if leader.is_some() && leader != last {
            node.metrics().leader_changed();
        }
        last = leader;
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The gRPC type label of a method, as go-grpc-prometheus reports etcd's.
fn grpc_type(service: &str, method: &str) -> &'static str {
    match (service, method) {
        ("etcdserverpb.Watch", "Watch") | ("etcdserverpb.Lease", "LeaseKeepAlive") => "bidi_stream",
        ("etcdserverpb.Maintenance", "Snapshot") => "server_stream",
        _ => "unary",
    }
}

/// Renders every metric in the Prometheus text format.
pub fn render(node: &EtcdNode) -> String {
    let raft: &RaftNode = node.raft();
    let st = raft.raft_status();
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, v: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    gauge(
        "etcd_server_has_leader",
        "Whether or not a leader exists. 1 is existence, 0 is not.",
        "gauge",
        u8::from(st.leader != 0).to_string(),
    );
    gauge(
        "etcd_server_leader_changes_seen_total",
        "The number of leader changes seen.",
        "counter",
        node.metrics()
            .leader_changes
            .load(Ordering::Relaxed)
            .to_string(),
    );
    gauge(
        "etcd_server_proposals_committed_total",
        "The total number of consensus proposals committed.",
        "gauge",
        st.last_log_index.to_string(),
    );
    gauge(
        "etcd_server_proposals_applied_total",
        "The total number of consensus proposals applied.",
        "gauge",
        st.applied_index.to_string(),
    );
    gauge(
        "etcd_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes.",
        "gauge",
        node.quota().db_size(raft).to_string(),
    );
    let h = fetcd_raft::metrics::WAL_FSYNC.snapshot();
    let name = "etcd_disk_wal_fsync_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} The latency distributions of fsync called by WAL.\n# TYPE {name} histogram"
    );
    for (le, n) in &h.buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count {}", h.count);

    let grpc = node.metrics().grpc();
    let _ = writeln!(out, "# HELP grpc_server_started_total Total number of RPCs started on the server.\n# TYPE grpc_server_started_total counter");
    for ((service, method), c) in grpc.iter() {
        let t = grpc_type(service, method);
        let _ = writeln!(out, "grpc_server_started_total{{grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{t}\"}} {}", c.started);
    }
    let _ = writeln!(out, "# HELP grpc_server_handled_total Total number of RPCs completed on the server, regardless of success or failure.\n# TYPE grpc_server_handled_total counter");
    for ((service, method), c) in grpc.iter() {
        let t = grpc_type(service, method);
        for (code, n) in &c.handled {
            let _ = writeln!(out, "grpc_server_handled_total{{grpc_code=\"{code}\",grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{t}\"}} {n}");
        }
    }
    out
}

/// Counts gRPC calls (started, and handled by final status) around the services.
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    node: Arc<EtcdNode>,
}

impl GrpcMetricsLayer {
    /// Counts into `node`'s metrics.
    pub fn new(node: Arc<EtcdNode>) -> Self {
        GrpcMetricsLayer { node }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            node: self.node.clone(),
        }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
    node: Arc<EtcdNode>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// `(service, method)` of a gRPC request path `/pkg.Service/Method`.
fn method_of(req: &http::Request<Body>) -> Option<MethodKey> {
    let is_grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !is_grpc {
        return None;
    }
    let (service, method) = req.uri().path().strip_prefix('/')?.split_once('/')?;
    Some((service.to_string(), method.to_string()))
}

fn code_name(v: &http::HeaderValue) -> &'static str {
    v.to_str()
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .and_then(|n| CODE_NAMES.get(n).copied())
        .unwrap_or("Unknown")
}

impl<S> tower::Service<http::Request<Body>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(key) = method_of(&req) else {
            return Box::pin(inner.call(req));
        };
        let node = self.node.clone();
        node.metrics().started(&key);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            // A trailers-only answer (an error before any message) carries the status here.
            if let Some(v) = resp.headers().get("grpc-status") {
                node.metrics().handled(&key, code_name(v));
                return Ok(resp);
            }
            Ok(resp.map(|body| {
                Body::new(CountingBody {
                    inner: body,
                    pending: Some((node, key)),
                })
            }))
        })
    }
}

/// A response body that records the call's final status from its trailers (or `Canceled` if
/// the client went away before them).
struct CountingBody {
    inner: Body,
    pending: Option<(Arc<EtcdNode>, MethodKey)>,
}

impl CountingBody {
    fn finish(&mut self, code: &'static str) {
        if let Some((node, key)) = self.pending.take() {
            node.metrics().handled(&key, code);
        }
    }
}

impl Drop for CountingBody {
    fn drop(&mut self) {
        self.finish("Canceled");
    }
}

impl http_body::Body for CountingBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(t) = f.trailers_ref() {
                    let code = t.get("grpc-status").map_or("Unknown", code_name);
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish("Unknown"),
            Poll::Ready(None) => self.finish("Unknown"),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
