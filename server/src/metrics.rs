//! etcd's core Prometheus metrics, written in the text exposition format from cheap atomics
//! (no metrics library): enough for dashboards and alerts built on etcd's metric names.
//!
//! - `etcd_server_has_leader`, `etcd_server_leader_changes_seen_total`,
//!   `etcd_server_proposals_committed_total`, `etcd_server_proposals_applied_total`;
//! - `etcd_mvcc_db_total_size_in_bytes` (the member's on-disk size, as the quota sees it);
//! - `etcd_disk_wal_fsync_duration_seconds` and `etcd_disk_wal_write_bytes_total` (see
//!   `fetcd_raft::metrics`);
//! - `fetcd_raft_append_entries_round_trip_seconds{To="<member id, hex>",kind="entries"|"empty"}`:
//!   this member's AppendEntries round trips to each peer, by whether they carried entries
//!   (fetcd's own: etcd streams its appends and has no per-RPC time; see `fetcd_raft::metrics`);
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

/// etcd's gRPC methods as `(service, method)`: counted in atomics, with no lock or allocation per
/// call. Anything else (a method etcd does not have) is counted in [`Metrics::other`].
const METHODS: &[(&str, &str)] = &[
    ("etcdserverpb.KV", "Range"),
    ("etcdserverpb.KV", "Put"),
    ("etcdserverpb.KV", "DeleteRange"),
    ("etcdserverpb.KV", "Txn"),
    ("etcdserverpb.KV", "Compact"),
    ("etcdserverpb.Watch", "Watch"),
    ("etcdserverpb.Lease", "LeaseGrant"),
    ("etcdserverpb.Lease", "LeaseRevoke"),
    ("etcdserverpb.Lease", "LeaseKeepAlive"),
    ("etcdserverpb.Lease", "LeaseTimeToLive"),
    ("etcdserverpb.Lease", "LeaseLeases"),
    ("etcdserverpb.Cluster", "MemberAdd"),
    ("etcdserverpb.Cluster", "MemberRemove"),
    ("etcdserverpb.Cluster", "MemberUpdate"),
    ("etcdserverpb.Cluster", "MemberList"),
    ("etcdserverpb.Cluster", "MemberPromote"),
    ("etcdserverpb.Maintenance", "Alarm"),
    ("etcdserverpb.Maintenance", "Status"),
    ("etcdserverpb.Maintenance", "Defragment"),
    ("etcdserverpb.Maintenance", "Hash"),
    ("etcdserverpb.Maintenance", "HashKV"),
    ("etcdserverpb.Maintenance", "Snapshot"),
    ("etcdserverpb.Maintenance", "MoveLeader"),
    ("etcdserverpb.Maintenance", "Downgrade"),
    ("etcdserverpb.Auth", "AuthEnable"),
    ("etcdserverpb.Auth", "AuthDisable"),
    ("etcdserverpb.Auth", "AuthStatus"),
    ("etcdserverpb.Auth", "Authenticate"),
    ("etcdserverpb.Auth", "UserAdd"),
    ("etcdserverpb.Auth", "UserGet"),
    ("etcdserverpb.Auth", "UserList"),
    ("etcdserverpb.Auth", "UserDelete"),
    ("etcdserverpb.Auth", "UserChangePassword"),
    ("etcdserverpb.Auth", "UserGrantRole"),
    ("etcdserverpb.Auth", "UserRevokeRole"),
    ("etcdserverpb.Auth", "RoleAdd"),
    ("etcdserverpb.Auth", "RoleGet"),
    ("etcdserverpb.Auth", "RoleList"),
    ("etcdserverpb.Auth", "RoleDelete"),
    ("etcdserverpb.Auth", "RoleGrantPermission"),
    ("etcdserverpb.Auth", "RoleRevokePermission"),
];

/// `(service, method)` of a method etcd does not have.
type OtherKey = (String, String);
/// Counters of such methods.
type OtherCounts = BTreeMap<Arc<OtherKey>, Arc<MethodCounts>>;

/// The method of one call.
#[derive(Clone, Debug)]
enum Method {
    /// An index into [`METHODS`].
    Known(usize),
    /// Any other `(service, method)`.
    Other(Arc<OtherKey>),
}

/// A method's counters: calls started, and calls handled by gRPC code (see [`CODE_NAMES`]).
#[derive(Debug, Default)]
struct MethodCounts {
    started: AtomicU64,
    handled: [AtomicU64; CODE_NAMES.len()],
}

/// The member's counters (gauges are read from Raft and the store when scraped).
#[derive(Debug)]
pub struct Metrics {
    leader_changes: AtomicU64,
    known: Vec<Arc<MethodCounts>>,
    other: Mutex<OtherCounts>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            leader_changes: AtomicU64::new(0),
            known: METHODS.iter().map(|_| Arc::default()).collect(),
            other: Mutex::default(),
        }
    }
}

impl Metrics {
    fn other(&self) -> std::sync::MutexGuard<'_, OtherCounts> {
        self.other.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the counters of `m` (creating them for an unknown method).
    fn with_counts(&self, m: &Method, f: impl FnOnce(&MethodCounts)) {
        match m {
            Method::Known(i) => {
                if let Some(c) = self.known.get(*i) {
                    f(c)
                }
            }
            Method::Other(key) => {
                let c = self.other().entry(key.clone()).or_default().clone();
                f(&c)
            }
        }
    }

    fn started(&self, m: &Method) {
        self.with_counts(m, |c| {
            c.started.fetch_add(1, Ordering::Relaxed);
        });
    }

    fn handled(&self, m: &Method, code: usize) {
        self.with_counts(m, |c| {
            if let Some(n) = c.handled.get(code) {
                n.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    /// Every method called at least once, with its counters, for rendering.
    fn called(&self) -> Vec<(String, String, Arc<MethodCounts>)> {
        let mut out = Vec::new();
        for ((service, method), c) in METHODS.iter().zip(&self.known) {
            if c.started.load(Ordering::Relaxed) > 0 {
                out.push((service.to_string(), method.to_string(), c.clone()));
            }
        }
        for (key, c) in self.other().iter() {
            out.push((key.0.clone(), key.1.clone(), c.clone()));
        }
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    /// Records that the leader changed (or one was elected).
    pub fn leader_changed(&self) {
        self.leader_changes.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts leader changes as etcd does (every time a new leader is known) until `stop`, and
/// logs them as etcd's `raft.node` lines do (elected, changed, lost, with the term), so that an
/// operator can tell from the logs when and why requests failed with `no leader`. Follows
/// openraft's server metrics, which change with votes and roles only, not with every append.
pub async fn watch_leader(node: Arc<EtcdNode>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut rx = node.raft().raft().server_metrics();
    let mut last = None;
    loop {
        let (leader, term, me) = {
            let m = rx.borrow_and_update();
            (m.current_leader, m.vote.leader_id().term, m.id)
        };
        if leader != last {
            log_leader_change(me, last, leader, term);
            if leader.is_some() {
                node.metrics().leader_changed();
            }
        }
        last = leader;
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One leader change, worded as etcd's `raft.node` log lines (member ids in hex).
fn log_leader_change(me: u64, from: Option<u64>, to: Option<u64>, term: u64) {
    match (from, to) {
        (None, Some(to)) => {
            tracing::info!("raft.node: {me:x} elected leader {to:x} at term {term}")
        }
        (Some(from), Some(to)) => {
            tracing::info!(
                "raft.node: {me:x} changed leader from {from:x} to {to:x} at term {term}"
            )
        }
        (Some(from), None) => {
            tracing::warn!("raft.node: {me:x} lost leader {from:x} at term {term}")
        }
        (None, None) => {}
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
    gauge(
        "etcd_disk_wal_write_bytes_total",
        "Total number of bytes written in WAL.",
        // etcd declares this total a gauge; a scraper sees the same type from both.
        "gauge",
        fetcd_raft::metrics::WAL_WRITE_BYTES
            .load(Ordering::Relaxed)
            .to_string(),
    );
    let name = "etcd_disk_wal_fsync_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} The latency distributions of fsync called by WAL.\n# TYPE {name} histogram"
    );
    histogram(
        &mut out,
        name,
        "",
        &fetcd_raft::metrics::WAL_FSYNC.snapshot(),
    );
    let name = "fetcd_raft_append_entries_round_trip_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Round trips of AppendEntries RPCs to peers, by whether they carried entries.\n# TYPE {name} histogram"
    );
    for (to, peer) in fetcd_raft::metrics::all_peer_round_trips() {
        let [entries, empty] = &peer.append_entries;
        let labels = |kind: &str| format!("To=\"{to:x}\",kind=\"{kind}\"");
        histogram(&mut out, name, &labels("entries"), &entries.snapshot());
        histogram(&mut out, name, &labels("empty"), &empty.snapshot());
    }

    let called = node.metrics().called();
    let _ = writeln!(out, "# HELP grpc_server_started_total Total number of RPCs started on the server.\n# TYPE grpc_server_started_total counter");
    for (service, method, c) in &called {
        let t = grpc_type(service, method);
        let n = c.started.load(Ordering::Relaxed);
        let _ = writeln!(out, "grpc_server_started_total{{grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{t}\"}} {n}");
    }
    let _ = writeln!(out, "# HELP grpc_server_handled_total Total number of RPCs completed on the server, regardless of success or failure.\n# TYPE grpc_server_handled_total counter");
    for (service, method, c) in &called {
        let t = grpc_type(service, method);
        for (code, n) in CODE_NAMES.iter().zip(&c.handled) {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(out, "grpc_server_handled_total{{grpc_code=\"{code}\",grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{t}\"}} {n}");
            }
        }
    }
    out
}

/// Writes one histogram's series; `labels` is empty or `name="value"` pairs joined by commas.
fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    h: &fetcd_raft::metrics::HistogramSnapshot,
) {
    let (sep, braces) = if labels.is_empty() {
        ("", String::new())
    } else {
        (",", format!("{{{labels}}}"))
    };
    for (le, n) in &h.buckets {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{braces} {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count{braces} {}", h.count);
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

/// True for a gRPC call (as opposed to etcd's HTTP endpoints on the same port).
pub(crate) fn is_grpc(req: &http::Request<Body>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The method of a gRPC request (path `/pkg.Service/Method`); `None` for anything else.
fn method_of(req: &http::Request<Body>) -> Option<Method> {
    if !is_grpc(req) {
        return None;
    }
    let (service, method) = req.uri().path().strip_prefix('/')?.split_once('/')?;
    Some(
        match METHODS
            .iter()
            .position(|&(s, m)| m == method && s == service)
        {
            Some(i) => Method::Known(i),
            None => Method::Other(Arc::new((service.to_string(), method.to_string()))),
        },
    )
}

/// `Canceled` and `Unknown` in [`CODE_NAMES`].
const CANCELED: usize = 1;
const UNKNOWN: usize = 2;

/// The gRPC code a `grpc-status` value carries (`Unknown` if it is not one).
fn code_of(v: &http::HeaderValue) -> usize {
    v.to_str()
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| *n < CODE_NAMES.len())
        .unwrap_or(UNKNOWN)
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
                node.metrics().handled(&key, code_of(v));
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
    pending: Option<(Arc<EtcdNode>, Method)>,
}

impl CountingBody {
    fn finish(&mut self, code: usize) {
        if let Some((node, key)) = self.pending.take() {
            node.metrics().handled(&key, code);
        }
    }
}

impl Drop for CountingBody {
    fn drop(&mut self) {
        self.finish(CANCELED);
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
                    let code = t.get("grpc-status").map_or(UNKNOWN, code_of);
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(UNKNOWN),
            Poll::Ready(None) => self.finish(UNKNOWN),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str) -> http::Request<Body> {
        http::Request::builder()
            .uri(path)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(Body::empty())
            .expect("request")
    }

    #[test]
    fn counts_known_and_other_methods_by_code() {
        let m = Metrics::default();
        let put = method_of(&request("/etcdserverpb.KV/Put")).expect("grpc");
        assert!(matches!(put, Method::Known(_)));
        let odd = method_of(&request("/some.Service/Odd")).expect("grpc");
        assert!(matches!(odd, Method::Other(_)));
        let plain = http::Request::builder()
            .uri("/metrics")
            .body(Body::empty())
            .expect("request");
        assert!(method_of(&plain).is_none());

        for _ in 0..3 {
            m.started(&put);
        }
        m.handled(&put, 0);
        m.handled(&put, 0);
        m.handled(&put, code_of(&http::HeaderValue::from_static("11")));
        m.started(&odd);
        m.handled(&odd, code_of(&http::HeaderValue::from_static("99")));

        let called = m.called();
        let names: Vec<_> = called.iter().map(|(s, m, _)| format!("{s}/{m}")).collect();
        assert_eq!(names, ["etcdserverpb.KV/Put", "some.Service/Odd"]);
        let (_, _, put_counts) = &called[0];
        assert_eq!(put_counts.started.load(Ordering::Relaxed), 3);
        assert_eq!(put_counts.handled[0].load(Ordering::Relaxed), 2);
        assert_eq!(put_counts.handled[11].load(Ordering::Relaxed), 1);
        let (_, _, odd_counts) = &called[1];
        assert_eq!(odd_counts.handled[UNKNOWN].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn histogram_series_with_and_without_labels() {
        let h = fetcd_raft::metrics::HistogramSnapshot {
            buckets: vec![(0.001, 2), (0.002, 3)],
            count: 4,
            sum_seconds: 0.5,
        };
        let mut plain = String::new();
        histogram(&mut plain, "m", "", &h);
        assert_eq!(
            plain,
            "m_bucket{le=\"0.001\"} 2\nm_bucket{le=\"0.002\"} 3\nm_bucket{le=\"+Inf\"} 4\nm_sum 0.5\nm_count 4\n"
        );
        let mut labelled = String::new();
        histogram(&mut labelled, "m", "To=\"a\",kind=\"empty\"", &h);
        assert_eq!(
            labelled,
            "m_bucket{To=\"a\",kind=\"empty\",le=\"0.001\"} 2\n\
             m_bucket{To=\"a\",kind=\"empty\",le=\"0.002\"} 3\n\
             m_bucket{To=\"a\",kind=\"empty\",le=\"+Inf\"} 4\n\
             m_sum{To=\"a\",kind=\"empty\"} 0.5\n\
             m_count{To=\"a\",kind=\"empty\"} 4\n"
        );
    }

    /// A writer into a shared buffer, for reading back what was logged.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn leader_changes_are_logged_as_etcd_words_them() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            log_leader_change(0xa1, None, Some(0xb2), 2);
            log_leader_change(0xa1, Some(0xb2), Some(0xc3), 3);
            log_leader_change(0xa1, Some(0xc3), None, 3);
            log_leader_change(0xa1, None, None, 4);
        });
        let text =
            String::from_utf8_lossy(&out.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].contains("INFO")
                && lines[0].ends_with("raft.node: a1 elected leader b2 at term 2"),
            "{text}"
        );
        assert!(
            lines[1].ends_with("raft.node: a1 changed leader from b2 to c3 at term 3"),
            "{text}"
        );
        assert!(
            lines[2].contains("WARN")
                && lines[2].ends_with("raft.node: a1 lost leader c3 at term 3"),
            "{text}"
        );
    }
}
