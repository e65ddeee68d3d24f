//! etcd's Prometheus metrics, written in the text exposition format from cheap atomics (no
//! metrics library), under etcd's names, types and label names: every series etcd's own alerts
//! (its Prometheus mixin) and dashboard read has one here, so they work unchanged on fetcd
//! (checked against etcd's own `/metrics` by `tests/tests/maintenance.rs`).
//!
//! - `etcd_server_has_leader`, `etcd_server_is_leader`, `etcd_server_is_learner`,
//!   `etcd_server_leader_changes_seen_total`, `etcd_server_id`, `etcd_server_version`,
//!   `etcd_cluster_version`;
//! - `etcd_server_proposals_committed_total`, `etcd_server_proposals_applied_total`,
//!   `etcd_server_proposals_pending`, `etcd_server_proposals_failed_total`;
//! - `etcd_mvcc_db_total_size_in_bytes` (the member's on-disk size, as the quota sees it),
//!   `etcd_mvcc_db_total_size_in_use_in_bytes` (Status's `dbSizeInUse`),
//!   `etcd_server_quota_backend_bytes`;
//! - `etcd_disk_wal_fsync_duration_seconds` and `etcd_disk_wal_write_bytes_total` (see
//!   `fetcd_raft::metrics`), `etcd_disk_backend_commit_duration_seconds` (the store's group
//!   commits, see `fetcd_storage::metrics`);
//! - `etcd_network_peer_round_trip_time_seconds{To}` (AppendEntries without entries, which wait
//!   on no disk; only a leader sends them), `etcd_network_peer_sent_failures_total{To}`,
//!   `etcd_network_peer_sent_bytes_total{To}`, `etcd_network_peer_received_bytes_total{From}`
//!   (Raft messages: requests and their answers);
//! - `fetcd_raft_append_entries_round_trip_seconds{To="<member id, hex>",kind="entries"|"empty"}`:
//!   this member's AppendEntries round trips to each peer, by whether they carried entries
//!   (fetcd's own: etcd streams its appends and has no per-RPC time; see `fetcd_raft::metrics`);
//! - `etcd_network_client_grpc_received_bytes_total`, `etcd_network_client_grpc_sent_bytes_total`
//!   and `grpc_server_started_total` / `grpc_server_handled_total` by service, method, type and
//!   code (go-grpc-prometheus names), counted by [`GrpcMetricsLayer`];
//! - `fetcd_server_proposals_lone_total`: writes proposed around the batcher (fetcd's own; see
//!   `fetcd_raft::node::RaftNode::propose`);
//! - `process_*` (memory, CPU, file descriptors, start time), from `/proc/self`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::Context;
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use fetcd_raft::metrics::Histogram;
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
#[derive(Debug)]
struct MethodCounts {
    started: AtomicU64,
    handled: [AtomicU64; CODE_NAMES.len()],
    /// How long calls took, start to final status (`--metrics extensive` only).
    handling: Histogram,
}

impl Default for MethodCounts {
    fn default() -> Self {
        MethodCounts {
            started: AtomicU64::new(0),
            handled: Default::default(),
            handling: Histogram::new(&HANDLING_BUCKETS),
        }
    }
}

/// Upper bounds (seconds) of `grpc_server_handling_seconds`' buckets: go-grpc-prometheus's
/// defaults, which etcd keeps.
const HANDLING_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The member's counters (gauges are read from Raft and the store when scraped).
#[derive(Debug)]
pub struct Metrics {
    leader_changes: AtomicU64,
    /// `--metrics extensive`: calls are timed.
    time_calls: AtomicBool,
    proposals_failed: AtomicU64,
    proposals_pending: AtomicU64,
    /// gRPC message bytes (with their 5-byte prefixes) from and to clients.
    received_bytes: AtomicU64,
    sent_bytes: AtomicU64,
    known: Vec<Arc<MethodCounts>>,
    other: Mutex<OtherCounts>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            leader_changes: AtomicU64::new(0),
            time_calls: AtomicBool::new(false),
            proposals_failed: AtomicU64::new(0),
            proposals_pending: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
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

    /// Records a call's final status, and its duration if calls are timed.
    fn handled(&self, m: &Method, code: usize, started: Instant) {
        let timed = self.time_calls.load(Ordering::Relaxed);
        self.with_counts(m, |c| {
            if let Some(n) = c.handled.get(code) {
                n.fetch_add(1, Ordering::Relaxed);
            }
            if timed {
                c.handling.observe(started.elapsed());
            }
        });
    }

    /// Times every call from now on (`--metrics extensive`), or stops.
    pub fn time_calls(&self, on: bool) {
        self.time_calls.store(on, Ordering::Relaxed);
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

    /// Counts a proposal in flight until the returned guard is dropped
    /// (`etcd_server_proposals_pending`).
    pub fn proposal_pending(&self) -> PendingProposal<'_> {
        self.proposals_pending.fetch_add(1, Ordering::Relaxed);
        PendingProposal(&self.proposals_pending)
    }

    /// Records a proposal that Raft did not commit: timed out, lost to a leader change, no
    /// leader, or the member stopping (`etcd_server_proposals_failed_total`).
    pub fn proposal_failed(&self) {
        self.proposals_failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// A proposal in flight; see [`Metrics::proposal_pending`].
#[derive(Debug)]
pub struct PendingProposal<'a>(&'a AtomicU64);

impl Drop for PendingProposal<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
    sample(
        &mut out,
        "etcd_server_has_leader",
        "Whether or not a leader exists. 1 is existence, 0 is not.",
        "gauge",
        u8::from(st.leader != 0).to_string(),
    );
    sample(
        &mut out,
        "etcd_server_leader_changes_seen_total",
        "The number of leader changes seen.",
        "counter",
        node.metrics()
            .leader_changes
            .load(Ordering::Relaxed)
            .to_string(),
    );
    sample(
        &mut out,
        "etcd_server_proposals_committed_total",
        "The total number of consensus proposals committed.",
        "gauge",
        st.last_log_index.to_string(),
    );
    sample(
        &mut out,
        "etcd_server_proposals_applied_total",
        "The total number of consensus proposals applied.",
        "gauge",
        st.applied_index.to_string(),
    );
    sample(
        &mut out,
        "etcd_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes.",
        "gauge",
        node.quota().db_size(raft).to_string(),
    );
    sample(
        &mut out,
        "etcd_disk_wal_write_bytes_total",
        "Total number of bytes written in WAL.",
        // etcd declares this total a gauge; a scraper sees the same type from both.
        "gauge",
        fetcd_raft::metrics::WAL_WRITE_BYTES
            .load(Ordering::Relaxed)
            .to_string(),
    );
    sample(
        &mut out,
        "fetcd_server_proposals_lone_total",
        "Writes proposed on their own, around the batcher, for finding no other write in flight.",
        "counter",
        raft.lone_proposals().to_string(),
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
    let peers = fetcd_raft::metrics::all_peer_metrics();
    for (to, peer) in &peers {
        let [entries, empty] = &peer.append_entries;
        let labels = |kind: &str| format!("To=\"{to:x}\",kind=\"{kind}\"");
        histogram(&mut out, name, &labels("entries"), &entries.snapshot());
        histogram(&mut out, name, &labels("empty"), &empty.snapshot());
    }

    let me = raft.id();
    sample(
        &mut out,
        "etcd_server_is_leader",
        "1 while this member leads, 0 otherwise.",
        "gauge",
        u8::from(st.leader == me).to_string(),
    );
    sample(
        &mut out,
        "etcd_server_is_learner",
        "1 while this member is a learner (a non-voting member), 0 otherwise.",
        "gauge",
        u8::from(st.is_learner).to_string(),
    );
    let label_gauges = [
        (
            "etcd_server_id",
            "This member's id (hex) as a label; always 1.",
            format!("server_id=\"{me:x}\""),
        ),
        (
            "etcd_server_version",
            "The etcd version this member reports as a label; always 1.",
            format!("server_version=\"{}\"", crate::version::ETCD_SERVER_VERSION),
        ),
        (
            "etcd_cluster_version",
            "The cluster's etcd version (major.minor) as a label; always 1.",
            format!(
                "cluster_version=\"{}\"",
                major_minor(crate::version::ETCD_CLUSTER_VERSION)
            ),
        ),
    ];
    for (name, help, labels) in label_gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} 1"
        );
    }
    let m = node.metrics();
    sample(
        &mut out,
        "etcd_server_proposals_pending",
        "Proposals this member has made that are not committed (or failed) yet.",
        "gauge",
        m.proposals_pending.load(Ordering::Relaxed).to_string(),
    );
    sample(
        &mut out,
        "etcd_server_proposals_failed_total",
        "Proposals this member made that failed: timed out, lost to a leader change, no leader.",
        "counter",
        m.proposals_failed.load(Ordering::Relaxed).to_string(),
    );
    sample(
        &mut out,
        "etcd_server_quota_backend_bytes",
        "The backend quota (--quota-backend-bytes) in bytes.",
        "gauge",
        node.quota().bytes().to_string(),
    );
    if let Some(n) = node.db_size_in_use_measured() {
        sample(
            &mut out,
            "etcd_mvcc_db_total_size_in_use_in_bytes",
            "Bytes of the backend in use by live records: about its size after a defragmentation.",
            "gauge",
            n.to_string(),
        );
    }
    sample(
        &mut out,
        "etcd_network_client_grpc_received_bytes_total",
        "gRPC message bytes received from clients.",
        "counter",
        m.received_bytes.load(Ordering::Relaxed).to_string(),
    );
    sample(
        &mut out,
        "etcd_network_client_grpc_sent_bytes_total",
        "gRPC message bytes sent to clients.",
        "counter",
        m.sent_bytes.load(Ordering::Relaxed).to_string(),
    );
    process(&mut out);
    let name = "etcd_disk_backend_commit_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Durations of the backend's batched commits (one sled transaction each).\n# TYPE {name} histogram"
    );
    histogram(
        &mut out,
        name,
        "",
        &fetcd_storage::metrics::BACKEND_COMMIT.snapshot(),
    );
    let name = "etcd_network_peer_round_trip_time_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Round trips to each peer: AppendEntries without entries (heartbeats, commit indexes, leadership checks), which wait on no disk.\n# TYPE {name} histogram"
    );
    for (to, peer) in &peers {
        let [_, empty] = &peer.append_entries;
        histogram(&mut out, name, &format!("To=\"{to:x}\""), &empty.snapshot());
    }
    type PeerCounter = fn(&fetcd_raft::metrics::PeerMetrics) -> &AtomicU64;
    let counters: [(&str, &str, &str, PeerCounter); 3] = [
        (
            "etcd_network_peer_sent_failures_total",
            "Raft messages to each peer that got no answer.",
            "To",
            |p| &p.sent_failures,
        ),
        (
            "etcd_network_peer_sent_bytes_total",
            "Bytes of Raft messages sent to each peer.",
            "To",
            |p| &p.sent_bytes,
        ),
        (
            "etcd_network_peer_received_bytes_total",
            "Bytes of Raft messages received from each peer.",
            "From",
            |p| &p.received_bytes,
        ),
    ];
    for (name, help, label, counter) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (id, peer) in &peers {
            let n = counter(peer).load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{{label}=\"{id:x}\"}} {n}");
        }
    }

    let called = m.called();
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
    if m.time_calls.load(Ordering::Relaxed) {
        let name = "grpc_server_handling_seconds";
        let _ = writeln!(out, "# HELP {name} How long gRPC calls took, from start to final status.\n# TYPE {name} histogram");
        for (service, method, c) in &called {
            let t = grpc_type(service, method);
            let labels =
                format!("grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{t}\"");
            histogram(&mut out, name, &labels, &c.handling.snapshot());
        }
    }
    out
}

/// Writes one unlabelled sample with its `HELP` and `TYPE` lines.
fn sample(out: &mut String, name: &str, help: &str, kind: &str, v: String) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
    );
}

/// `major.minor` of a version string, as etcd labels its cluster version.
fn major_minor(v: &str) -> &str {
    match v.match_indices('.').nth(1) {
        Some((i, _)) => &v[..i],
        None => v,
    }
}

/// The unit of `/proc`'s CPU times (`USER_HZ`, 100 on Linux whatever the kernel's tick).
const USER_HZ: f64 = 100.0;

/// The process's own metrics under the Prometheus client libraries' standard names (etcd's
/// dashboards plot `process_resident_memory_bytes`), read from `/proc/self`; any that cannot be
/// read is left out.
fn process(out: &mut String) {
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // Field n of proc(5) (1-based) is fields[n - 3] here; its times are in USER_HZ (100/s).
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        let secs = (utime + stime) as f64 / USER_HZ;
        sample(
            out,
            "process_cpu_seconds_total",
            "User and system CPU time spent, in seconds.",
            "counter",
            secs.to_string(),
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|k| (k * 1024).to_string())
    };
    if let Some(v) = kib("VmRSS:") {
        sample(
            out,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            "gauge",
            v,
        );
    }
    if let Some(v) = kib("VmSize:") {
        sample(
            out,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            "gauge",
            v,
        );
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    if let (Some(boot), Some(start)) = (boot, field(22)) {
        let at = boot as f64 + start as f64 / USER_HZ;
        sample(
            out,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds.",
            "gauge",
            at.to_string(),
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        sample(
            out,
            "process_open_fds",
            "Open file descriptors.",
            "gauge",
            fds.count().to_string(),
        );
    }
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<u64>().ok())
        });
    if let Some(n) = max_fds {
        sample(
            out,
            "process_max_fds",
            "The soft limit of open file descriptors.",
            "gauge",
            n.to_string(),
        );
    }
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
        let started = Instant::now();
        node.metrics().started(&key);
        let req = req.map(|body| {
            Body::new(MeteredBody {
                inner: body,
                node: node.clone(),
                bytes: |m| &m.received_bytes,
                pending: None,
                started,
            })
        });
        Box::pin(async move {
            let resp = inner.call(req).await?;
            // A trailers-only answer (an error before any message) carries the status here.
            if let Some(v) = resp.headers().get("grpc-status") {
                node.metrics().handled(&key, code_of(v), started);
                return Ok(resp);
            }
            Ok(resp.map(|body| {
                Body::new(MeteredBody {
                    inner: body,
                    node,
                    bytes: |m| &m.sent_bytes,
                    pending: Some(key),
                    started,
                })
            }))
        })
    }
}

/// A request or response body that counts its DATA bytes into one of the member's byte
/// counters (`etcd_network_client_grpc_received_bytes_total` / `_sent_bytes_total`) and, for a
/// response, records the call's final status from its trailers (or `Canceled` if the client
/// went away before them).
struct MeteredBody {
    inner: Body,
    node: Arc<EtcdNode>,
    /// Which of the member's byte counters.
    bytes: fn(&Metrics) -> &AtomicU64,
    /// A response's call, until its status is recorded.
    pending: Option<Method>,
    /// When the call started.
    started: Instant,
}

impl MeteredBody {
    fn finish(&mut self, code: usize) {
        if let Some(key) = self.pending.take() {
            self.node.metrics().handled(&key, code, self.started);
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        self.finish(CANCELED);
    }
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    let n = d.len() as u64;
                    (self.bytes)(self.node.metrics()).fetch_add(n, Ordering::Relaxed);
                }
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
        let t = Instant::now();
        m.handled(&put, 0, t);
        m.handled(&put, 0, t);
        m.handled(&put, code_of(&http::HeaderValue::from_static("11")), t);
        // Timed only with `--metrics extensive`.
        m.time_calls(true);
        m.started(&odd);
        m.handled(&odd, code_of(&http::HeaderValue::from_static("99")), t);

        let called = m.called();
        let names: Vec<_> = called.iter().map(|(s, m, _)| format!("{s}/{m}")).collect();
        assert_eq!(names, ["etcdserverpb.KV/Put", "some.Service/Odd"]);
        let (_, _, put_counts) = &called[0];
        assert_eq!(put_counts.started.load(Ordering::Relaxed), 3);
        assert_eq!(put_counts.handled[0].load(Ordering::Relaxed), 2);
        assert_eq!(put_counts.handled[11].load(Ordering::Relaxed), 1);
        assert_eq!(put_counts.handling.snapshot().count, 0);
        let (_, _, odd_counts) = &called[1];
        assert_eq!(odd_counts.handled[UNKNOWN].load(Ordering::Relaxed), 1);
        assert_eq!(odd_counts.handling.snapshot().count, 1);
    }

    #[test]
    fn cluster_version_label_is_major_minor() {
        assert_eq!(major_minor("3.5.0"), "3.5");
        assert_eq!(major_minor("3.5.13"), "3.5");
        assert_eq!(major_minor("3"), "3");
    }

    #[test]
    fn process_metrics_read_this_process() {
        let mut out = String::new();
        process(&mut out);
        let value = |name: &str| -> f64 {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in\n{out}"))
        };
        // A test binary holds some megabytes and a few files, started after 2020 and before now.
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let started = value("process_start_time_seconds");
        assert!(
            started > 1.6e9 && started <= now + 1.0,
            "started {started}, now {now}"
        );
        assert!(value("process_cpu_seconds_total") >= 0.0);
        assert!(out.contains("# TYPE process_cpu_seconds_total counter"));
    }

    #[test]
    fn pending_proposals_are_counted_while_in_flight() {
        let m = Metrics::default();
        let a = m.proposal_pending();
        let b = m.proposal_pending();
        assert_eq!(m.proposals_pending.load(Ordering::Relaxed), 2);
        drop(a);
        assert_eq!(m.proposals_pending.load(Ordering::Relaxed), 1);
        drop(b);
        assert_eq!(m.proposals_pending.load(Ordering::Relaxed), 0);
        m.proposal_failed();
        assert_eq!(m.proposals_failed.load(Ordering::Relaxed), 1);
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
