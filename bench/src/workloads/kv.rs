//! put, range, txn-put and txn-mixed: etcd benchmark's KV workloads.

use std::collections::HashMap;
use std::time::Instant;

use etcd_client::Client;
use etcd_client::Compare;
use etcd_client::CompareOp;
use etcd_client::GetOptions;
use etcd_client::Txn;
use etcd_client::TxnOp;
use etcd_client::TxnOpResponse;

use crate::args::key;
use crate::args::pick_key;
use crate::args::Args;
use crate::args::Consistency;
use crate::args::Rng;
use crate::args::Workload;
use crate::driver::closed_loop;
use crate::driver::connect_all;
use crate::driver::preload;
use crate::driver::ClientOp;
use crate::driver::Ui;
use crate::stats::Recorder;
use crate::stats::Report;

/// Keys the range workload preloads at most (reads beyond them would find nothing).
const RANGE_PRELOAD_MAX: u64 = 10_000;
/// Compare failures a CAS update tolerates before giving up (the apiserver retries forever, but
/// a benchmark must end).
const MAX_CAS_ATTEMPTS: u32 = 16;

/// Per-client settings every KV op needs.
struct KeyPicker {
    key_space: u64,
    key_size: usize,
    sequential: bool,
    rng: Rng,
}

impl KeyPicker {
    fn new(args: &Args, key_space: u64, client: usize) -> Self {
        KeyPicker {
            key_space,
            key_size: args.key_size,
            sequential: args.sequential_keys,
            rng: Rng::new(client as u64 + 1),
        }
    }

    fn pick(&mut self, i: u64) -> (u64, Vec<u8>) {
        let n = pick_key(i, self.key_space, self.sequential, &mut self.rng);
        (n, key(n, self.key_size))
    }
}

struct PutOp {
    client: Client,
    keys: KeyPicker,
    value: Vec<u8>,
}

impl ClientOp for PutOp {
    async fn op(&mut self, i: u64, _rec: &mut Recorder) -> anyhow::Result<()> {
        let (_, k) = self.keys.pick(i);
        self.client.put(k, self.value.clone(), None).await?;
        Ok(())
    }
}

struct RangeOp {
    client: Client,
    keys: KeyPicker,
    serializable: bool,
}

impl ClientOp for RangeOp {
    async fn op(&mut self, i: u64, _rec: &mut Recorder) -> anyhow::Result<()> {
        let (_, k) = self.keys.pick(i);
        let mut o = GetOptions::new();
        if self.serializable {
            o = o.with_serializable();
        }
        self.client.get(k, Some(o)).await?;
        Ok(())
    }
}

/// The outcome of a CAS update: the revision it wrote and the compare failures on the way.
pub(crate) struct CasOutcome {
    pub revision: i64,
    pub conflicts: u64,
}

/// kube-apiserver's GuaranteedUpdate: `Txn{mod_revision(key) == rev → put, else get(key)}`;
/// on a failed compare, adopt the revision the failure branch read and try again.
pub(crate) async fn cas_update(
    client: &mut Client,
    k: &[u8],
    value: &[u8],
    mut rev: i64,
) -> anyhow::Result<CasOutcome> {
    for conflicts in 0..MAX_CAS_ATTEMPTS {
        let txn = Txn::new()
            .when([Compare::mod_revision(k, CompareOp::Equal, rev)])
            .and_then([TxnOp::put(k, value, None)])
            .or_else([TxnOp::get(k, None)]);
        let resp = client.txn(txn).await?;
        if resp.succeeded() {
            let revision = resp.header().map_or(0, |h| h.revision());
            return Ok(CasOutcome {
                revision,
                conflicts: u64::from(conflicts),
            });
        }
        rev = match resp.op_responses().first() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map_or(0, |kv| kv.mod_revision()),
            _ => anyhow::bail!("txn failure branch did not return the range it was given"),
        };
    }
    anyhow::bail!("CAS update gave up after {MAX_CAS_ATTEMPTS} compare failures")
}

struct TxnPutOp {
    client: Client,
    keys: KeyPicker,
    value: Vec<u8>,
    /// key number → mod revision this client last saw for it.
    seen: HashMap<u64, i64>,
    conflicts: u64,
}

impl ClientOp for TxnPutOp {
    async fn op(&mut self, i: u64, _rec: &mut Recorder) -> anyhow::Result<()> {
        let (n, k) = self.keys.pick(i);
        let rev = self.seen.get(&n).copied().unwrap_or(0);
        let out = cas_update(&mut self.client, &k, &self.value, rev).await?;
        self.conflicts += out.conflicts;
        self.seen.insert(n, out.revision);
        Ok(())
    }
}

struct TxnMixedOp {
    client: Client,
    keys: KeyPicker,
    value: Vec<u8>,
    read_share: f64,
    limit: i64,
    range_end: Vec<u8>,
}

impl ClientOp for TxnMixedOp {
    async fn op(&mut self, i: u64, rec: &mut Recorder) -> anyhow::Result<()> {
        let (_, k) = self.keys.pick(i);
        let read = self.keys.rng.unit() < self.read_share;
        let op = if read {
            let o = GetOptions::new()
                .with_range(self.range_end.clone())
                .with_limit(self.limit);
            TxnOp::get(k, Some(o))
        } else {
            TxnOp::put(k, self.value.clone(), None)
        };
        let t = Instant::now();
        let r = self.client.txn(Txn::new().and_then([op])).await;
        rec.kind(if read { "read" } else { "write" }, t.elapsed(), r.is_ok());
        r?;
        Ok(())
    }
}

pub(crate) async fn run(args: &Args, workload: Workload, ui: &Ui) -> anyhow::Result<Report> {
    let conns = connect_all(&args.endpoints, args.conns).await?;
    let n = args.clients.max(1);
    let value = vec![b'v'; args.val_size];
    let conn = |c: usize| conns[c % conns.len()].clone();
    let name = workload.name();
    let mut extra = serde_json::Map::new();
    let pb = ui.bar(args.total, &name);
    let (rec, elapsed) = match workload {
        Workload::Put => {
            let clients = (0..n)
                .map(|c| PutOp {
                    client: conn(c),
                    keys: KeyPicker::new(args, args.key_space(), c),
                    value: value.clone(),
                })
                .collect();
            let r = closed_loop(clients, args.total, args.rate, &pb).await?;
            (r.rec, r.elapsed)
        }
        Workload::Range => {
            let space = args.key_space().min(RANGE_PRELOAD_MAX);
            let key_size = args.key_size;
            preload(&conns, space, move |i| key(i, key_size), args.val_size, ui).await?;
            let clients = (0..n)
                .map(|c| RangeOp {
                    client: conn(c),
                    keys: KeyPicker::new(args, space, c),
                    serializable: args.consistency == Consistency::Serializable,
                })
                .collect();
            let r = closed_loop(clients, args.total, args.rate, &pb).await?;
            (r.rec, r.elapsed)
        }
        Workload::TxnPut => {
            let clients = (0..n)
                .map(|c| TxnPutOp {
                    client: conn(c),
                    keys: KeyPicker::new(args, args.key_space(), c),
                    value: value.clone(),
                    seen: HashMap::new(),
                    conflicts: 0,
                })
                .collect();
            let r = closed_loop(clients, args.total, args.rate, &pb).await?;
            let conflicts: u64 = r.clients.iter().map(|c| c.conflicts).sum();
            extra.insert("cas_conflicts".into(), conflicts.into());
            (r.rec, r.elapsed)
        }
        Workload::TxnMixed => {
            let ratio = args.rw_ratio.max(0.0);
            // Every key has `key_size` digits, so this bound is past all of them.
            let range_end = vec![b'9' + 1];
            let clients = (0..n)
                .map(|c| TxnMixedOp {
                    client: conn(c),
                    keys: KeyPicker::new(args, args.key_space(), c),
                    value: value.clone(),
                    read_share: ratio / (1.0 + ratio),
                    limit: args.limit,
                    range_end: range_end.clone(),
                })
                .collect();
            let r = closed_loop(clients, args.total, args.rate, &pb).await?;
            extra.insert("rw_ratio".into(), ratio.into());
            (r.rec, r.elapsed)
        }
        other => anyhow::bail!("{} is not a KV workload", other.name()),
    };
    pb.finish_and_clear();
    let mut report = Report::from_recorder(name, n, args.total, elapsed.as_secs_f64(), rec);
    if let Some(c) = extra.get("cas_conflicts") {
        report.note = Some(format!("CAS compare failures retried: {c}"));
    }
    report.extra = extra;
    Ok(report)
}

/// `etcdserverpb.RangeResponse` with its key-values left encoded (the list's check needs only
/// their number), so the client's decoding does not bound the list.
#[derive(Clone, PartialEq, prost::Message)]
struct ListResponse {
    #[prost(bytes = "bytes", repeated, tag = "2")]
    kvs: Vec<bytes::Bytes>,
    #[prost(bool, tag = "3")]
    more: bool,
    #[prost(int64, tag = "4")]
    count: i64,
}

/// How many times `list-stall` lists the whole prefix.
const STALL_LISTS: usize = 5;

/// `list-stall`: see [`Workload::ListStall`].
pub(crate) async fn list_stall(args: &Args, ui: &Ui) -> anyhow::Result<Report> {
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::Context;
    use fetcd_proto::etcdserverpb::RangeRequest;

    use crate::args::prefix_end;
    use crate::driver::grpc_channel;
    use crate::driver::kv_grpc;
    use crate::driver::probe_put;
    use crate::driver::range_as;
    use crate::driver::scheduled_offset;

    let prefix: Arc<[u8]> = Arc::from(&b"fetcd-bench/list/"[..]);
    let n = args.total;
    let conns = connect_all(&args.endpoints, args.conns).await?;
    let p = prefix.clone();
    preload(
        &conns,
        n,
        move |i| [&p[..], format!("{i:08}").as_bytes()].concat(),
        args.val_size,
        ui,
    )
    .await?;

    let channel = grpc_channel(&args.endpoints[0]).await?;
    let req = RangeRequest {
        key: prefix.to_vec(),
        range_end: prefix_end(&prefix),
        ..Default::default()
    };
    let lister = tokio::spawn(async move {
        let mut grpc = kv_grpc(channel);
        let mut took = Vec::with_capacity(STALL_LISTS);
        for _ in 0..STALL_LISTS {
            let started = Instant::now();
            let resp: ListResponse = range_as(&mut grpc, req.clone()).await?;
            took.push(started.elapsed());
            anyhow::ensure!(
                resp.kvs.len() as u64 == n && resp.count as u64 == n && !resp.more,
                "a list returned {} key-values (count {}, more {}) of {n}",
                resp.kvs.len(),
                resp.count,
                resp.more
            );
        }
        anyhow::Ok(took)
    });

    let mut writer = conns[0].clone();
    let rate = args.put_rate.unwrap_or(200);
    let mut rec = Recorder::default();
    let started = Instant::now();
    let mut i = 0u64;
    while !lister.is_finished() {
        if let Some(at) = scheduled_offset(i, rate) {
            tokio::time::sleep_until((started + at).into()).await;
        }
        probe_put(&mut writer, "fetcd-bench/list-stall-probe", i, &mut rec).await;
        i += 1;
    }
    let elapsed = started.elapsed();
    let mut took = lister.await.context("list task")??;
    took.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = took.get(took.len() / 2).copied().unwrap_or_default();
    let mut report = Report::from_recorder("list-stall".into(), 1, i, elapsed.as_secs_f64(), rec);
    report.extra.insert("keys".into(), n.into());
    report
        .extra
        .insert("list_ms_median".into(), ms(median).into());
    report.note = Some(format!(
        "{STALL_LISTS} lists of {n} keys took {:.0} ms at the median; writer max latency {:.1} ms",
        ms(median),
        report.latency.max_ms()
    ));
    Ok(report)
}
