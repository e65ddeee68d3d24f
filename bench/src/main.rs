//! `fetcd-bench`: drives an etcd v3 endpoint with the third-party `etcd-client` crate, so fetcd
//! and etcd are measured by the same client. Flags follow etcd's `benchmark` tool where they
//! exist. This is the quick core workload set (put, range, watch, watch-latency); the full suite
//! and `--compare` orchestration grow with the benchmark issue.

mod watch;

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use clap::ValueEnum;
use etcd_client::Client;
use etcd_client::GetOptions;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Workload {
    /// Put `--total` keys of `--val-size` bytes.
    Put,
    /// Get keys written beforehand (linearizable unless `--consistency s`).
    Range,
    /// Watch throughput: `--watchers` watch `--key` (or the prefix with `--prefix`), then
    /// `--clients` writers put `--total` times as fast as they can (or at `--put-rate`); reports
    /// events delivered per second over all watchers until every event arrived.
    Watch,
    /// Watch latency: like `watch`, but puts are paced at `--put-rate` (default 100/s); reports
    /// put→event latency percentiles over all (put, watcher) pairs.
    WatchLatency,
}

impl Workload {
    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_else(|| format!("{self:?}").to_lowercase())
    }
}

#[derive(Debug, Parser)]
#[command(name = "fetcd-bench", about)]
pub(crate) struct Args {
    /// What to run.
    workload: Workload,
    /// Comma-separated client URLs; clients are spread over them.
    #[arg(long, default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Concurrent clients (requests in flight); for watch workloads, the concurrent writers.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// gRPC connections shared by the clients; for watch workloads, the connections the watch
    /// streams are spread over (writers get one connection of their own).
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Total requests (for watch workloads: puts).
    #[arg(long, default_value_t = 10_000)]
    total: u64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 8)]
    val_size: usize,
    /// Number of distinct keys (0 = `--total`).
    #[arg(long, default_value_t = 0)]
    key_space_size: u64,
    /// Range consistency: `l` (linearizable) or `s` (serializable).
    #[arg(long, default_value = "l")]
    consistency: String,
    /// Print one JSON line instead of the summary.
    #[arg(long)]
    json: bool,
    /// Watch workloads: total watchers.
    #[arg(long, default_value_t = 1)]
    watchers: usize,
    /// Watch workloads: gRPC watch streams the watchers are multiplexed on, spread round-robin
    /// over `--conns` (0 = one stream per connection, as Go's clientv3 does; `--streams` equal to
    /// `--watchers` gives every watcher its own stream).
    #[arg(long, default_value_t = 0)]
    streams: usize,
    /// Watch workloads: the watched key, or the watched prefix with `--prefix` (puts then go to
    /// `<key>/<n>` with `--key-size` digits, over `--key-space-size` keys).
    #[arg(long, default_value = "fetcd-bench/watch")]
    key: String,
    /// Watch workloads: watch `--key` as a prefix and spread the puts over keys under it.
    #[arg(long)]
    prefix: bool,
    /// Watch workloads: puts per second over all writers (0 = unlimited). Default 100 for
    /// watch-latency, unlimited for watch.
    #[arg(long)]
    put_rate: Option<u64>,
    /// Watch workloads: seconds to wait after the last put for outstanding events; events still
    /// missing then count as errors.
    #[arg(long, default_value_t = 10.0)]
    grace: f64,
}

fn key(i: u64, size: usize) -> Vec<u8> {
    let mut k = format!("{i:0width$}", width = size.max(1)).into_bytes();
    k.truncate(size.max(1));
    if k.len() < size {
        k.resize(size, b'0');
    }
    k
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if matches!(args.workload, Workload::Watch | Workload::WatchLatency) {
        return watch::run(&args).await;
    }
    let key_space = if args.key_space_size == 0 {
        args.total.max(1)
    } else {
        args.key_space_size
    };
    let mut conns = Vec::new();
    for i in 0..args.conns.max(1) {
        let ep = &args.endpoints[i % args.endpoints.len()];
        conns.push(
            Client::connect([ep.as_str()], None)
                .await
                .with_context(|| format!("connect {ep}"))?,
        );
    }
    if let Workload::Range = args.workload {
        // Preload the key space so reads find data.
        let mut c = conns[0].clone();
        for i in 0..key_space.min(10_000) {
            c.put(key(i, args.key_size), vec![b'v'; args.val_size], None)
                .await
                .context("preload")?;
        }
    }
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients.max(1) {
        let mut client = conns[c % conns.len()].clone();
        let next = next.clone();
        let errors = errors.clone();
        let (workload, total, ks, val_size, key_size) = (
            args.workload,
            args.total,
            key_space,
            args.val_size,
            args.key_size,
        );
        let serializable = args.consistency == "s";
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                let r = match workload {
                    Workload::Put => client
                        .put(key(i % ks, key_size), vec![b'v'; val_size], None)
                        .await
                        .map(|_| ()),
                    Workload::Range => {
                        let mut o = GetOptions::new();
                        if serializable {
                            o = o.with_serializable();
                        }
                        client
                            .get(key(i % ks.min(10_000), key_size), Some(o))
                            .await
                            .map(|_| ())
                    }
                    // Handled by `watch::run` before any client task starts.
                    Workload::Watch | Workload::WatchLatency => Ok(()),
                };
                lat.push(t.elapsed());
                if r.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.context("client task")?);
    }
    let elapsed = start.elapsed();
    lat.sort();
    let ops = lat.len() as f64;
    let rate = ops / elapsed.as_secs_f64();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let summary = serde_json::json!({
        "workload": args.workload.name(),
        "clients": args.clients,
        "total": lat.len(),
        "errors": errors.load(Ordering::Relaxed),
        "seconds": elapsed.as_secs_f64(),
        "ops_per_sec": rate,
        "p50_ms": ms(percentile(&lat, 0.50)),
        "p90_ms": ms(percentile(&lat, 0.90)),
        "p99_ms": ms(percentile(&lat, 0.99)),
        "p999_ms": ms(percentile(&lat, 0.999)),
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{:?}: {} ops in {:.2}s = {:.0} ops/s; errors {}; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
            args.workload,
            lat.len(),
            elapsed.as_secs_f64(),
            rate,
            errors.load(Ordering::Relaxed),
            ms(percentile(&lat, 0.50)),
            ms(percentile(&lat, 0.90)),
            ms(percentile(&lat, 0.99)),
            ms(percentile(&lat, 0.999)),
        );
    }
    Ok(())
}
