//! `kube`: kube-apiserver's request mix against `/registry/...`, after the shapes in
//! shared/docs/etcd-api-for-kubernetes.md §1.3–1.7:
//!
//! * paginated lists: `Range{prefix, range_end, limit 500}`, later pages from the last key +
//!   `\0` at the first page's revision, until `more` is false (the response's `count` is what
//!   1.32+ reads for `hasMore`);
//! * gets: `Range{key, limit 1}`; counts: `Range{prefix, count_only}`; health:
//!   `Range{/registry/health}`;
//! * updates (GuaranteedUpdate): `Txn{mod_revision == cached → put, else get}`, retried;
//! * event creates: `Txn{mod_revision == 0 → put(lease)}`, one lease (TTL 3600 + 60) shared by
//!   the events of a minute, at most 1000 per lease (the apiserver's lease reuse);
//! * in the background: one watch per resource prefix (prev_kv, progress_notify) on its own
//!   connection, counting events, and the compactor: every `--compact-interval`, the CAS on
//!   `compact_rev_key`'s version, then `Compact` at the revision seen one interval before.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use etcd_client::Client;
use etcd_client::Compare;
use etcd_client::CompareOp;
use etcd_client::GetOptions;
use etcd_client::PutOptions;
use etcd_client::Txn;
use etcd_client::TxnOp;
use etcd_client::WatchOptions;
use fetcd_proto::etcdserverpb::RangeRequest;
use tokio::sync::watch;
use tokio::sync::Mutex;
use tonic::client::Grpc;
use tonic::transport::Channel;

use crate::args::prefix_end;
use crate::args::Args;
use crate::args::Rng;
use crate::driver::client_on;
use crate::driver::closed_loop;
use crate::driver::connect;
use crate::driver::connect_each;
use crate::driver::grpc_channel;
use crate::driver::kv_grpc;
use crate::driver::preload;
use crate::driver::range_as;
use crate::driver::ClientOp;
use crate::driver::Ui;
use crate::stats::Recorder;
use crate::stats::Report;
use crate::workloads::kv::cas_update;

/// Resource prefixes the mix works on (`/registry/<resource>/<namespace>/<name>`).
const RESOURCES: &[&str] = &[
    "pods",
    "configmaps",
    "secrets",
    "services/specs",
    "endpointslices",
    "deployments",
    "replicasets",
    "leases",
];
const NAMESPACES: u64 = 4;
const EVENTS_PREFIX: &str = "/registry/events/";
/// `--event-ttl` 1h plus the 60 s the apiserver adds for lease reuse.
const EVENT_LEASE_TTL: i64 = 3600 + 60;
const LEASE_REUSE: Duration = Duration::from_secs(60);
const LEASE_MAX_OBJECTS: u64 = 1000;
const COMPACT_REV_KEY: &str = "compact_rev_key";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    List,
    Count,
    Get,
    Update,
    Event,
    Health,
}

/// The op mix in percent (sums to 100): writes dominate, as on a busy cluster whose reads are
/// mostly served from the apiserver's watch cache.
const MIX: &[(Kind, u64)] = &[
    (Kind::List, 5),
    (Kind::Count, 2),
    (Kind::Get, 23),
    (Kind::Update, 48),
    (Kind::Event, 20),
    (Kind::Health, 2),
];

fn kind_for(roll: u64) -> Kind {
    let mut acc = 0;
    for &(k, w) in MIX {
        acc += w;
        if roll < acc {
            return k;
        }
    }
    Kind::Health
}

fn resource_prefix(res: usize) -> String {
    format!("/registry/{}/", RESOURCES[res % RESOURCES.len()])
}

fn object_key(res: usize, n: u64) -> Vec<u8> {
    format!("{}ns-{}/obj-{n:06}", resource_prefix(res), n % NAMESPACES).into_bytes()
}

/// The apiserver's lease manager: one lease serves the events of up to a minute, up to 1000.
#[derive(Default)]
struct EventLease {
    current: Option<(i64, Instant, u64)>,
    granted: u64,
}

impl EventLease {
    async fn lease(&mut self, client: &mut Client, rec: &mut Recorder) -> anyhow::Result<i64> {
        if let Some((id, at, n)) = &mut self.current {
            if at.elapsed() < LEASE_REUSE && *n < LEASE_MAX_OBJECTS {
                *n += 1;
                return Ok(*id);
            }
        }
        let t = Instant::now();
        let r = client.lease_grant(EVENT_LEASE_TTL, None).await;
        rec.kind("lease-grant", t.elapsed(), r.is_ok());
        let id = r.context("lease grant for events")?.id();
        self.current = Some((id, Instant::now(), 1));
        self.granted += 1;
        Ok(id)
    }
}

/// A list page (`etcdserverpb.RangeResponse`) as the mix reads it: the header's revision, and of
/// each key-value only its key (a slice of the received buffer) and mod revision, what the
/// apiserver's cache keeps here. prost skips the values. The client shares the machine's cores
/// with the server under test, and decoding whole pages (two copies per object) was a fifth of
/// its CPU, against either server.
#[derive(Clone, PartialEq, prost::Message)]
struct ListPage {
    #[prost(message, optional, tag = "1")]
    header: Option<HeaderRevision>,
    #[prost(message, repeated, tag = "2")]
    kvs: Vec<KeyRevision>,
    #[prost(bool, tag = "3")]
    more: bool,
}

/// `etcdserverpb.ResponseHeader` with only its `revision`.
#[derive(Clone, PartialEq, prost::Message)]
struct HeaderRevision {
    #[prost(int64, tag = "3")]
    revision: i64,
}

/// `mvccpb.KeyValue` with only `key` and `mod_revision`.
#[derive(Clone, PartialEq, prost::Message)]
struct KeyRevision {
    #[prost(bytes = "bytes", tag = "1")]
    key: Bytes,
    #[prost(int64, tag = "3")]
    mod_revision: i64,
}

struct KubeOp {
    client: Client,
    /// The same connection as `client`'s, for the lists.
    grpc: Grpc<Channel>,
    rng: Rng,
    objects: u64,
    page_limit: i64,
    value: Vec<u8>,
    lease: Arc<Mutex<EventLease>>,
    /// Makes this run's event names unique: events live for an hour, longer than a run.
    run_id: u64,
    /// object key → mod revision last seen (the apiserver's watch cache, per client). Every
    /// listed object updates it, so it hashes with foldhash rather than SipHash: the client
    /// shares the cores with the server under test.
    seen: HashMap<Vec<u8>, i64, foldhash::fast::RandomState>,
    conflicts: u64,
    pages: u64,
}

impl KubeOp {
    /// Records `rev` as `key`'s last seen mod revision, copying the key only when it is new.
    fn remember(&mut self, key: &[u8], rev: i64) {
        match self.seen.get_mut(key) {
            Some(r) => *r = rev,
            None => {
                self.seen.insert(key.to_vec(), rev);
            }
        }
    }

    async fn list(&mut self, res: usize) -> anyhow::Result<()> {
        let prefix = resource_prefix(res).into_bytes();
        let end = prefix_end(&prefix);
        let mut from = prefix;
        let mut rev = 0;
        loop {
            let req = RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: self.page_limit,
                revision: rev,
                ..Default::default()
            };
            let page: ListPage = range_as(&mut self.grpc, req).await?;
            self.pages += 1;
            if rev == 0 {
                rev = page.header.map_or(0, |h| h.revision);
            }
            let mut after: &[u8] = &from[..from.len().saturating_sub(1)];
            for kv in &page.kvs {
                // What the apiserver's list relies on: keys in order within the range, each
                // at a revision the page's snapshot holds.
                anyhow::ensure!(
                    *kv.key > *after && *kv.key < *end && (1..=rev).contains(&kv.mod_revision),
                    "list page of {rev}: key {:?} (mod revision {}) after {:?}",
                    String::from_utf8_lossy(&kv.key),
                    kv.mod_revision,
                    String::from_utf8_lossy(after),
                );
                after = &kv.key;
                self.remember(&kv.key, kv.mod_revision);
            }
            let Some(last) = page.kvs.last().filter(|_| page.more) else {
                return Ok(());
            };
            from = last.key.to_vec();
            from.push(0);
        }
    }

    async fn get(&mut self, k: &[u8]) -> anyhow::Result<i64> {
        let resp = self
            .client
            .get(k, Some(GetOptions::new().with_limit(1)))
            .await?;
        let rev = resp.kvs().first().map_or(0, |kv| kv.mod_revision());
        self.remember(k, rev);
        Ok(rev)
    }

    async fn update(&mut self, k: Vec<u8>, rec: &mut Recorder) -> anyhow::Result<()> {
        let rev = match self.seen.get(&k) {
            Some(&r) => r,
            None => {
                // No cached object: the apiserver reads the current state first.
                let t = Instant::now();
                let r = self.get(&k).await;
                rec.kind("get", t.elapsed(), r.is_ok());
                r?
            }
        };
        let out = cas_update(&mut self.client, &k, &self.value, rev).await?;
        self.conflicts += out.conflicts;
        self.seen.insert(k, out.revision);
        Ok(())
    }

    async fn create_event(&mut self, i: u64, rec: &mut Recorder) -> anyhow::Result<()> {
        let lease = self.lease.lock().await.lease(&mut self.client, rec).await?;
        let k = format!(
            "{EVENTS_PREFIX}ns-{}/obj-{:06}.{:x}{i:08x}",
            i % NAMESPACES,
            self.rng.below(self.objects),
            self.run_id,
        );
        let txn = Txn::new()
            .when([Compare::mod_revision(k.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                k.as_str(),
                self.value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let resp = self.client.txn(txn).await?;
        anyhow::ensure!(resp.succeeded(), "event {k} already exists");
        Ok(())
    }
}

impl ClientOp for KubeOp {
    async fn op(&mut self, i: u64, rec: &mut Recorder) -> anyhow::Result<()> {
        let kind = kind_for(self.rng.below(100));
        let res = self.rng.below(RESOURCES.len() as u64) as usize;
        let obj = object_key(res, self.rng.below(self.objects));
        let t = Instant::now();
        let (name, r) = match kind {
            Kind::List => ("list", self.list(res).await),
            Kind::Count => {
                let prefix = resource_prefix(res);
                let o = GetOptions::new().with_prefix().with_count_only();
                let r = self.client.get(prefix, Some(o)).await.map(|_| ());
                ("count", r.map_err(Into::into))
            }
            Kind::Get => ("get", self.get(&obj).await.map(|_| ())),
            Kind::Update => ("update", self.update(obj, rec).await),
            Kind::Event => ("create-event", self.create_event(i, rec).await),
            Kind::Health => {
                let r = self.client.get("/registry/health", None).await.map(|_| ());
                ("health", r.map_err(Into::into))
            }
        };
        rec.kind(name, t.elapsed(), r.is_ok());
        r
    }
}

/// Counters the background tasks share with the report.
#[derive(Default)]
struct Background {
    events: AtomicU64,
    compactions: AtomicU64,
}

/// One resource watch, as the apiserver's cacher opens it; counts events until `stop`.
async fn watch_prefix(
    mut client: Client,
    prefix: String,
    start_rev: i64,
    bg: Arc<Background>,
    mut stop: watch::Receiver<bool>,
) -> Recorder {
    let mut rec = Recorder::default();
    let o = WatchOptions::new()
        .with_prefix()
        .with_prev_key()
        .with_progress_notify()
        .with_start_revision(start_rev);
    let mut stream = match client.watch(prefix.as_str(), Some(o)).await {
        Ok(stream) => stream,
        Err(e) => {
            rec.error(&anyhow::anyhow!("watch {prefix}: {e}"));
            return rec;
        }
    };
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = stop.wait_for(|s| *s) => return rec,
        };
        match msg {
            Ok(Some(r)) if r.canceled() => {
                rec.error(&anyhow::anyhow!(
                    "watch {prefix} canceled: {}",
                    r.cancel_reason()
                ));
                return rec;
            }
            Ok(Some(r)) => {
                bg.events
                    .fetch_add(r.events().len() as u64, Ordering::Relaxed);
            }
            Ok(None) => {
                rec.error(&anyhow::anyhow!("watch {prefix}: closed by the server"));
                return rec;
            }
            Err(e) => {
                rec.error(&anyhow::anyhow!("watch {prefix}: {e}"));
                return rec;
            }
        }
    }
}

/// The apiserver's compactor (compact.go), with the interval scaled down.
async fn compactor(
    mut client: Client,
    interval: Duration,
    bg: Arc<Background>,
    mut stop: watch::Receiver<bool>,
) -> Recorder {
    let mut rec = Recorder::default();
    let (mut version, mut rev) = (0i64, 0i64);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return rec,
        }
        let txn = Txn::new()
            .when([Compare::version(COMPACT_REV_KEY, CompareOp::Equal, version)])
            .and_then([TxnOp::put(COMPACT_REV_KEY, rev.to_string(), None)])
            .or_else([TxnOp::get(COMPACT_REV_KEY, None)]);
        let t = Instant::now();
        let resp = match client.txn(txn).await {
            Ok(r) => {
                rec.kind("compact-cas", t.elapsed(), true);
                r
            }
            Err(e) => {
                rec.kind("compact-cas", t.elapsed(), false);
                rec.error(&anyhow::anyhow!("compactor txn: {e}"));
                continue;
            }
        };
        let compact_to = rev;
        rev = resp.header().map_or(0, |h| h.revision());
        if !resp.succeeded() {
            // Another compactor won this round: adopt its version and wait for the next.
            if let Some(etcd_client::TxnOpResponse::Get(g)) = resp.op_responses().first() {
                version = g.kvs().first().map_or(0, |kv| kv.version());
            }
            continue;
        }
        version += 1;
        if compact_to == 0 {
            continue; // The first round only records where the next one compacts to.
        }
        let t = Instant::now();
        let r = client.compact(compact_to, None).await;
        rec.kind("compact", t.elapsed(), r.is_ok());
        match r {
            Ok(_) => {
                bg.compactions.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => rec.error(&anyhow::anyhow!("compact {compact_to}: {e}")),
        }
    }
}

pub(crate) async fn run(args: &Args, ui: &Ui) -> anyhow::Result<Report> {
    anyhow::ensure!(args.kube_objects > 0, "--kube-objects must be at least 1");
    let channels = connect_each(&args.endpoints, args.conns, grpc_channel).await?;
    let mut conns = Vec::with_capacity(channels.len());
    for c in &channels {
        conns.push(client_on(c.clone()).await?);
    }
    let objects = args.kube_objects;
    let n_res = RESOURCES.len() as u64;
    preload(
        &conns,
        objects * n_res,
        move |i| object_key((i % n_res) as usize, i / n_res),
        args.object_size,
        ui,
    )
    .await?;
    let mut c0 = conns[0].clone();
    let start_rev = c0
        .get("/registry/health", None)
        .await
        .context("read the current revision")?
        .header()
        .map_or(0, |h| h.revision());

    let bg = Arc::new(Background::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut background = Vec::new();
    let prefixes: Vec<String> = (0..RESOURCES.len())
        .map(resource_prefix)
        .chain([EVENTS_PREFIX.to_owned()])
        .collect();
    for (i, p) in prefixes.iter().enumerate() {
        // One connection per resource storage, as the apiserver has.
        let c = connect(&args.endpoints[i % args.endpoints.len()]).await?;
        background.push(tokio::spawn(watch_prefix(
            c,
            p.clone(),
            start_rev + 1,
            bg.clone(),
            stop_rx.clone(),
        )));
    }
    let interval = Duration::from_secs_f64(args.compact_interval.max(0.1));
    background.push(tokio::spawn(compactor(
        connect(&args.endpoints[0]).await?,
        interval,
        bg.clone(),
        stop_rx,
    )));

    let lease = Arc::new(Mutex::new(EventLease::default()));
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let n = args.clients.max(1);
    let clients = (0..n)
        .map(|c| KubeOp {
            client: conns[c % conns.len()].clone(),
            grpc: kv_grpc(channels[c % channels.len()].clone()),
            rng: Rng::new(c as u64 + 1),
            objects,
            page_limit: args.page_limit,
            value: vec![b'o'; args.object_size],
            lease: lease.clone(),
            run_id,
            seen: HashMap::default(),
            conflicts: 0,
            pages: 0,
        })
        .collect();
    let pb = ui.bar(args.total, "kube");
    let run = closed_loop(clients, args.total, args.rate, &pb).await?;
    pb.finish_and_clear();
    // Let the watches catch up with the last writes before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop_tx.send(true);
    let mut rec = run.rec;
    for t in background {
        rec.merge(t.await.context("background task")?);
    }
    let conflicts: u64 = run.clients.iter().map(|c| c.conflicts).sum();
    let pages: u64 = run.clients.iter().map(|c| c.pages).sum();
    let events = bg.events.load(Ordering::Relaxed);
    let compactions = bg.compactions.load(Ordering::Relaxed);
    let leases = lease.lock().await.granted;
    let mut report =
        Report::from_recorder("kube".into(), n, args.total, run.elapsed.as_secs_f64(), rec);
    report.note = Some(format!(
        "{} watches received {events} events; {compactions} compactions; {leases} event leases; \
         {pages} list pages; {conflicts} CAS conflicts retried",
        prefixes.len()
    ));
    for (k, v) in [
        ("watch_events", events),
        ("compactions", compactions),
        ("event_leases", leases),
        ("list_pages", pages),
        ("cas_conflicts", conflicts),
    ] {
        report.extra.insert(k.into(), v.into());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_covers_every_roll() {
        assert_eq!(MIX.iter().map(|&(_, w)| w).sum::<u64>(), 100);
        assert_eq!(kind_for(0), Kind::List);
        assert_eq!(kind_for(5), Kind::Count);
        assert_eq!(kind_for(99), Kind::Health);
    }

    #[test]
    fn object_keys_live_under_their_resource_prefix() {
        let k = object_key(3, 17);
        assert_eq!(k, b"/registry/services/specs/ns-1/obj-000017");
        let p = resource_prefix(3).into_bytes();
        assert!(k.starts_with(&p) && k.as_slice() < prefix_end(&p).as_slice());
    }
}
