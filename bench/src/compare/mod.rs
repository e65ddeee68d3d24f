//! `--compare`: start real etcd and fetcd with the same topology, run each workload against
//! both alternately (etcd, fetcd, etcd, fetcd, … for `--rounds`), then report fetcd/etcd ratios
//! with their spread, memory, disk and restart time, the targets, and an SVG chart.

pub(crate) mod ratio;
pub(crate) mod server;

use std::fmt::Write as _;
use std::path::Path;

use clap::Parser;

use crate::args::Args;
use crate::chart;
use crate::driver::Ui;
use crate::stats::Report;
use crate::workloads;
use ratio::paired_ratios;
use ratio::verdict;
use ratio::Better;
use ratio::Spread;
use server::Cluster;
use server::Server;

/// The standard set: (name, what it measures, flags without `--total`, `--total` at scale 1).
/// Every issue target reads one of these (see `TARGETS`), the rest round out the picture.
const STANDARD: &[(&str, &str, &str, u64)] = &[
    ("put-1", "put, 1 client (latency)", "put --clients 1 --conns 1 --key-size 16 --val-size 256 --key-space-size 100000", 2_000),
    // The same client paced at 1000 puts/s: the gaps between requests are long enough for
    // both servers' threads to sleep, as between a kube-apiserver's writes; back to back, Go's
    // scheduler keeps etcd's threads spinning (see docs/benchmarks.md).
    ("put-1-paced", "put, 1 client at 1000/s (latency)", "put --clients 1 --conns 1 --key-size 16 --val-size 256 --key-space-size 100000 --rate 1000", 2_000),
    ("put-64", "put, 64 clients", "put --clients 64 --conns 8 --key-size 16 --val-size 256 --key-space-size 100000", 50_000),
    ("txn-put", "CAS txn put, 64 clients", "txn-put --clients 64 --conns 8 --key-size 16 --val-size 256 --key-space-size 100000", 30_000),
    ("range-l", "range linearizable, 64 clients", "range --clients 64 --conns 8 --key-size 16 --val-size 256 --key-space-size 10000 --consistency l", 50_000),
    ("range-s", "range serializable, 64 clients", "range --clients 64 --conns 8 --key-size 16 --val-size 256 --key-space-size 10000 --consistency s", 50_000),
    ("txn-mixed", "txn-mixed rw-ratio 1, 64 clients", "txn-mixed --clients 64 --conns 8 --key-size 16 --val-size 256 --key-space-size 10000 --rw-ratio 1 --limit 50", 30_000),
    // The events/s cases write with 64 clients, so that the writers bound the rate a server
    // delivers events at less: 16 → 64 writers, 100 watchers, took etcd from 577k to 655k
    // events/s and fetcd from 715k to 930k. With one watcher, events/s is the put rate of 64
    // writers on one connection.
    ("watch-1", "watch, 1 watcher on a key (events/s)", "watch --watchers 1 --clients 64 --val-size 256", 50_000),
    ("watch", "watch, 100 watchers on a key (events/s)", "watch --watchers 100 --clients 64 --val-size 256", 20_000),
    ("watch-10k", "watch, 10,000 watchers on a key, 100 streams (events/s)", "watch --watchers 10000 --streams 100 --conns 8 --clients 64 --val-size 256", 200),
    ("watch-prefix", "watch, 100 watchers on a prefix (events/s)", "watch --prefix --watchers 100 --clients 64 --val-size 256", 20_000),
    ("watch-prefix-10k", "watch, 10,000 watchers on a prefix, 100 streams (events/s)", "watch --prefix --watchers 10000 --streams 100 --conns 8 --clients 64 --val-size 256", 200),
    ("watch-latency-1", "watch-latency, 1 watcher on a key, 100 puts/s", "watch-latency --watchers 1 --val-size 256", 1_000),
    ("watch-latency", "watch-latency, 100 watchers on a key, 100 puts/s", "watch-latency --watchers 100 --val-size 256", 1_000),
    ("watch-latency-10k", "watch-latency, 10,000 watchers on a key, 100 streams, 10 puts/s", "watch-latency --watchers 10000 --streams 100 --conns 8 --put-rate 10 --val-size 256", 100),
    ("watch-latency-prefix", "watch-latency, 100 watchers on a prefix, 100 puts/s", "watch-latency --prefix --watchers 100 --val-size 256", 1_000),
    ("watch-latency-prefix-10k", "watch-latency, 10,000 watchers on a prefix, 100 streams, 10 puts/s", "watch-latency --prefix --watchers 10000 --streams 100 --conns 8 --put-rate 10 --val-size 256", 100),
    ("lease-keepalive", "lease keepalive, 64 streams", "lease-keepalive --clients 64 --conns 8", 200_000),
    ("lease-grant-revoke", "lease grant+revoke, 64 clients", "lease-grant-revoke --clients 64 --conns 8", 30_000),
    ("lease-expiry", "10,000 leases expiring (writer latency)", "lease-expiry --clients 32 --conns 8 --lease-ttl 5", 10_000),
    ("list-stall", "writes during full lists (writer latency)", "list-stall --conns 8 --val-size 256", 100_000),
    ("kube", "kube-apiserver mix, 32 clients", "kube --clients 32 --conns 8 --kube-objects 1000", 20_000),
];

/// The pseudo-case that loads `--load-keys` into fresh servers for memory, disk and restart.
const LOAD_CASE: &str = "load";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metric {
    Throughput,
    P50,
    P99,
    /// The slowest successful op (a stall).
    Max,
    /// Peak RSS after the load case.
    Rss,
    /// Restart time with the load case's keys.
    Restart,
    /// Server CPU per successful op: the server's own cost, which a throughput ratio on a
    /// machine the client shares understates.
    ServerCpu,
}

struct Target {
    label: &'static str,
    case: &'static str,
    metric: Metric,
    better: Better,
    goal: f64,
}

/// The targets of the benchmark, watch and lease issues, as fetcd/etcd ratios.
const TARGETS: &[Target] = &[
    Target {
        label: "put, 64 clients: throughput",
        case: "put-64",
        metric: Metric::Throughput,
        better: Better::Higher,
        goal: 2.0,
    },
    Target {
        label: "txn-put: throughput",
        case: "txn-put",
        metric: Metric::Throughput,
        better: Better::Higher,
        goal: 2.0,
    },
    Target {
        label: "range linearizable: throughput",
        case: "range-l",
        metric: Metric::Throughput,
        better: Better::Higher,
        goal: 1.5,
    },
    Target {
        label: "range serializable: throughput",
        case: "range-s",
        metric: Metric::Throughput,
        better: Better::Higher,
        goal: 1.5,
    },
    Target {
        label: "put, 1 client: p50 latency",
        case: "put-1",
        metric: Metric::P50,
        better: Better::Lower,
        goal: 0.7,
    },
    Target {
        label: "put, 1 client at 1000/s: p50 latency",
        case: "put-1-paced",
        metric: Metric::P50,
        better: Better::Lower,
        goal: 0.7,
    },
    Target {
        label: "watch, 1 watcher: events/s",
        case: "watch-1",
        metric: Metric::Throughput,
        better: Better::Higher,
        goal: 1.5,
    },
    Target {
        label: "watch, 100 watchers: events/s",
        case: "watch",
        metric: Metric::Throughput,
        better: Better::Higher,
        goal: 1.5,
    },
    Target {
        label: "watch, 10,000 watchers: events/s",
        case: "watch-10k",
        metric: Metric::Throughput,
        better: Better::Higher,
        goal: 1.5,
    },
    Target {
        label: "watch prefix, 100 watchers: events/s",
        case: "watch-prefix",
        metric: Metric::Throughput,
        better: Better::Higher,
        goal: 1.5,
    },
    Target {
        label: "watch prefix, 10,000 watchers: events/s",
        case: "watch-prefix-10k",
        metric: Metric::Throughput,
        better: Better::Higher,
        goal: 1.5,
    },
    Target {
        label: "watch-latency, 1 watcher: p99",
        case: "watch-latency-1",
        metric: Metric::P99,
        better: Better::Lower,
        goal: 1.0,
    },
    Target {
        label: "watch-latency: p99",
        case: "watch-latency",
        metric: Metric::P99,
        better: Better::Lower,
        goal: 1.0,
    },
    Target {
        label: "watch-latency, 10,000 watchers: p99",
        case: "watch-latency-10k",
        metric: Metric::P99,
        better: Better::Lower,
        goal: 1.0,
    },
    Target {
        label: "watch-latency prefix, 100 watchers: p99",
        case: "watch-latency-prefix",
        metric: Metric::P99,
        better: Better::Lower,
        goal: 1.0,
    },
    Target {
        label: "watch-latency prefix, 10,000 watchers: p99",
        case: "watch-latency-prefix-10k",
        metric: Metric::P99,
        better: Better::Lower,
        goal: 1.0,
    },
    Target {
        label: "RSS after loading keys",
        case: LOAD_CASE,
        metric: Metric::Rss,
        better: Better::Lower,
        goal: 0.5,
    },
    Target {
        label: "restart time with loaded keys",
        case: LOAD_CASE,
        metric: Metric::Restart,
        better: Better::Lower,
        goal: 0.5,
    },
    Target {
        label: "lease keepalive: throughput",
        case: "lease-keepalive",
        metric: Metric::Throughput,
        better: Better::Higher,
        goal: 2.0,
    },
    Target {
        label: "lease grant+revoke: throughput",
        case: "lease-grant-revoke",
        metric: Metric::Throughput,
        better: Better::Higher,
        goal: 2.0,
    },
    Target {
        label: "lease expiry: writer max stall",
        case: "lease-expiry",
        metric: Metric::Max,
        better: Better::Lower,
        goal: 1.0,
    },
    Target {
        label: "full lists: writer max stall",
        case: "list-stall",
        metric: Metric::Max,
        better: Better::Lower,
        goal: 1.0,
    },
    Target {
        label: "kube mix: throughput",
        case: "kube",
        metric: Metric::Throughput,
        better: Better::Higher,
        goal: 2.0,
    },
];

struct Case {
    name: String,
    what: String,
    args: Args,
}

fn scaled(total: u64, scale: f64) -> u64 {
    ((total as f64 * scale).round() as u64).max(100)
}

fn parse_case(flags: &str, total: u64) -> anyhow::Result<Args> {
    let total = total.to_string();
    let argv = std::iter::once("fetcd-bench")
        .chain(flags.split_whitespace())
        .chain(["--total", total.as_str()]);
    Args::try_parse_from(argv).map_err(|e| anyhow::anyhow!("standard case {flags:?}: {e}"))
}

fn standard_cases(scale: f64) -> anyhow::Result<Vec<Case>> {
    STANDARD
        .iter()
        .map(|&(name, what, flags, total)| {
            Ok(Case {
                name: name.into(),
                what: what.into(),
                args: parse_case(flags, scaled(total, scale))?,
            })
        })
        .collect()
}

fn load_args(keys: u64) -> anyhow::Result<Args> {
    parse_case(
        &format!("put --clients 64 --conns 8 --key-size 16 --val-size 256 --sequential-keys --key-space-size {keys}"),
        keys,
    )
}

/// What one case measured on both servers, one report per round.
struct CaseResult {
    name: String,
    what: String,
    etcd: Vec<Report>,
    fetcd: Vec<Report>,
}

impl CaseResult {
    fn values(reports: &[Report], m: Metric) -> Vec<f64> {
        // A run without one successful op has no latency (NaN drops it from the spread), but
        // its throughput of 0 is a measurement.
        reports
            .iter()
            .map(|r| match m {
                Metric::Throughput => r.ops_per_sec,
                Metric::ServerCpu => r.server_cpu_us_per_op().unwrap_or(f64::NAN),
                _ if r.latency.count() == 0 => f64::NAN,
                Metric::P50 => r.p_ms(0.50),
                Metric::Max => r.latency.max_ms(),
                _ => r.p_ms(0.99),
            })
            .collect()
    }

    fn ratio(&self, m: Metric) -> Option<Spread> {
        Spread::of(&paired_ratios(
            &Self::values(&self.etcd, m),
            &Self::values(&self.fetcd, m),
        ))
    }

    fn median(reports: &[Report], m: Metric) -> Option<f64> {
        Spread::of(&Self::values(reports, m)).map(|s| s.median)
    }

    fn fetcd_errors(&self) -> u64 {
        self.fetcd.iter().map(|r| r.errors).sum()
    }

    fn etcd_errors(&self) -> u64 {
        self.etcd.iter().map(|r| r.errors).sum()
    }
}

/// Memory, disk and restart time of one server.
#[derive(Default)]
struct Resources {
    /// Peak RSS over the workload set.
    peak_rss: Option<u64>,
    disk: Option<u64>,
    load_seconds: Option<f64>,
    load_errors: u64,
    load_rss: Option<u64>,
    load_disk: Option<u64>,
    restarts: Vec<f64>,
    problem: Option<String>,
}

async fn run_one(case: &Case, cluster: &Cluster, ui: &Ui) -> Report {
    let mut a = case.args.clone();
    a.endpoints = leader_first(cluster.endpoints()).await;
    a.json = true;
    a.compare = false;
    match workloads::run(&a, ui).await {
        Ok(r) => r,
        Err(e) => Report::failed(a.workload_name(), a.clients, a.total, &e),
    }
}

/// `endpoints` turned so that the leader's comes first, the others following in their order.
///
/// A workload's first client (the only one of put-1, a watch workload's writer) uses the first
/// endpoint, and a write through a follower is forwarded to the leader, a round trip more: with
/// the members in their fixed order, which of the two a round measured depended on which member
/// each cluster elected. Leader first, both servers are measured the same way in every round.
/// Without an answer from every member the order is kept.
async fn leader_first(mut endpoints: Vec<String>) -> Vec<String> {
    if endpoints.len() < 2 {
        return endpoints;
    }
    let mut ids = Vec::with_capacity(endpoints.len());
    let mut leader = 0;
    for e in &endpoints {
        let status = match crate::driver::connect(e).await {
            Ok(mut c) => c.status().await.ok(),
            Err(_) => None,
        };
        let Some(st) = status else {
            return endpoints;
        };
        leader = st.leader();
        ids.push(st.header().map_or(0, |h| h.member_id()));
    }
    if let Some(i) = ids.iter().position(|&id| id == leader && id != 0) {
        endpoints.rotate_left(i);
    }
    endpoints
}

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn mib(b: Option<u64>) -> String {
    b.map_or_else(
        || "-".into(),
        |b| format!("{:.1} MiB", b as f64 / 1048576.0),
    )
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.prec$}"))
}

fn spread_str(s: Option<Spread>) -> String {
    s.map_or_else(|| "n/a".into(), |s| s.to_string())
}

pub(crate) async fn run(args: &Args) -> anyhow::Result<()> {
    let mut cases = match args.workload {
        Some(w) => {
            let mut a = args.clone();
            a.compare = false;
            vec![Case {
                name: w.name(),
                what: format!("{} as given on the command line", w.name()),
                args: a,
            }]
        }
        None => standard_cases(args.scale)?,
    };
    let mut with_load = args.workload.is_none();
    if !args.only.is_empty() {
        let known: Vec<&str> = STANDARD.iter().map(|s| s.0).chain([LOAD_CASE]).collect();
        if let Some(bad) = args.only.iter().find(|o| !known.contains(&o.as_str())) {
            anyhow::bail!("--only {bad}: unknown case; known: {}", known.join(", "));
        }
        cases.retain(|c| args.only.contains(&c.name));
        with_load = args.only.iter().any(|o| o == LOAD_CASE);
    }
    if args.list_cases {
        for c in standard_cases(args.scale)? {
            println!("{:<20} {:<40} --total {}", c.name, c.what, c.args.total);
        }
        println!(
            "{LOAD_CASE:<20} {:<40} --total {} (--load-keys)",
            "load keys: RSS, disk, restart time", args.load_keys
        );
        return Ok(());
    }

    server::ensure_etcd(&args.etcd_bin)?;
    let fetcd_bin = server::fetcd_bin(args.fetcd_bin.as_deref())?;
    let nodes = usize::from(args.nodes);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let header = format!(
        "fetcd vs etcd — {nodes} member(s) each on loopback, {} rounds, {cpus} CPUs, scale {}\n  etcd:  {} ({})\n  fetcd: {} ({})",
        args.rounds,
        args.scale,
        args.etcd_bin.display(),
        server::version(&args.etcd_bin),
        fetcd_bin.display(),
        server::version(&fetcd_bin),
    );
    eprintln!("{header}");

    let mut results = Vec::new();
    let mut res_etcd = Resources::default();
    let mut res_fetcd = Resources::default();
    if !cases.is_empty() {
        let etcd = Cluster::start(Server::Etcd, &args.etcd_bin, nodes).await?;
        let fetcd = match Cluster::start(Server::Fetcd, &fetcd_bin, nodes).await {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("fetcd could not start ({nodes} members): {e:#}\n  → etcd runs alone; ratios are n/a");
                res_fetcd.problem = Some(format!("did not start: {}", first_line(&e)));
                None
            }
        };
        for case in &cases {
            let mut r = CaseResult {
                name: case.name.clone(),
                what: case.what.clone(),
                etcd: Vec::new(),
                fetcd: Vec::new(),
            };
            for round in 1..=args.rounds {
                let sides = std::iter::once(&etcd).chain(fetcd.as_ref());
                for cluster in sides {
                    let ui = Ui {
                        progress: !args.json,
                        label: format!(
                            "[{round}/{}] {} {}",
                            args.rounds, cluster.server, case.name
                        ),
                    };
                    // The other cluster's last run may still have dirty pages on their way to
                    // the disk; writing them back now keeps them out of this run's fsyncs.
                    settle_disk();
                    let cpu_before = cluster.cpu_seconds();
                    let mut rep = run_one(case, cluster, &ui).await;
                    rep.server_cpu_seconds = cluster
                        .cpu_seconds()
                        .zip(cpu_before)
                        .map(|(after, before)| after - before);
                    log_run(args.json, &case.name, round, cluster.server, &rep);
                    match cluster.server {
                        Server::Etcd => r.etcd.push(rep),
                        Server::Fetcd => r.fetcd.push(rep),
                    }
                }
            }
            results.push(r);
        }
        res_etcd.peak_rss = etcd.peak_rss();
        res_etcd.disk = Some(etcd.disk_bytes());
        if let Some(f) = &fetcd {
            res_fetcd.peak_rss = f.peak_rss();
            res_fetcd.disk = Some(f.disk_bytes());
        }
    }
    if with_load {
        load_phase(args, &fetcd_bin, nodes, &mut res_etcd, &mut res_fetcd).await?;
    }

    let report = render(args, &header, &results, &res_etcd, &res_fetcd, with_load);
    if args.json {
        for line in target_json(args, &results, &res_etcd, &res_fetcd, with_load) {
            println!("{line}");
        }
    } else {
        print!("{report}");
    }
    if !results.is_empty() {
        let rows: Vec<chart::Row> = results
            .iter()
            .map(|r| chart::Row {
                case: r.name.clone(),
                throughput: r.ratio(Metric::Throughput),
                p99: r.ratio(Metric::P99),
            })
            .collect();
        let title = format!("fetcd / etcd, {nodes} member(s), {} rounds", args.rounds);
        match chart::write(&args.chart, &title, &rows) {
            Ok(()) => eprintln!("chart written to {}", args.chart.display()),
            Err(e) => eprintln!("chart not written: {e:#}"),
        }
    }
    Ok(())
}

/// Writes every dirty page back (sync(1)) so a run does not pay for the writeback of the run
/// before it, which was the other server's: etcd leaves several times fetcd's bytes behind (its
/// WAL preallocates 64 MB files), so without this the side that runs after it pays more.
fn settle_disk() {
    if let Err(e) = std::process::Command::new("sync").status() {
        eprintln!("sync before a run failed: {e}");
    }
}

fn log_run(json: bool, case: &str, round: u32, server: Server, r: &Report) {
    if json {
        let mut v = r.to_json();
        if let serde_json::Value::Object(m) = &mut v {
            m.insert("case".into(), case.into());
            m.insert("server".into(), server.to_string().into());
            m.insert("round".into(), round.into());
        }
        println!("{v}");
    } else {
        let err = r
            .first_error
            .as_deref()
            .filter(|_| r.errors > 0)
            .map(|e| {
                format!(
                    " — first error: {}",
                    e.chars().take(100).collect::<String>()
                )
            })
            .unwrap_or_default();
        eprintln!(
            "  {case:<20} round {round} {server:<5} {:>10.0} ops/s  p50 {:>8.3} ms  p99 {:>8.3} ms  errors {}{err}",
            r.ops_per_sec,
            r.p_ms(0.5),
            r.p_ms(0.99),
            r.errors
        );
    }
}

/// Loads `--load-keys` into fresh clusters, then measures RSS, disk and restart times (etcd,
/// fetcd, etcd, fetcd, …).
async fn load_phase(
    args: &Args,
    fetcd_bin: &Path,
    nodes: usize,
    res_etcd: &mut Resources,
    res_fetcd: &mut Resources,
) -> anyhow::Result<()> {
    let load = Case {
        name: LOAD_CASE.into(),
        what: format!("{} keys, 256-byte values", args.load_keys),
        args: load_args(args.load_keys)?,
    };
    let mut etcd = Cluster::start(Server::Etcd, &args.etcd_bin, nodes).await?;
    let mut fetcd = match Cluster::start(Server::Fetcd, fetcd_bin, nodes).await {
        Ok(c) => Some(c),
        Err(e) => {
            res_fetcd.problem = Some(format!("did not start: {}", first_line(&e)));
            None
        }
    };
    for (cluster, res) in [
        (Some(&etcd), &mut *res_etcd),
        (fetcd.as_ref(), &mut *res_fetcd),
    ] {
        let Some(cluster) = cluster else { continue };
        let ui = Ui {
            progress: !args.json,
            label: format!("{} load", cluster.server),
        };
        let rep = run_one(&load, cluster, &ui).await;
        log_run(args.json, LOAD_CASE, 1, cluster.server, &rep);
        res.load_seconds = Some(rep.seconds);
        res.load_errors = rep.errors;
        res.load_rss = cluster.peak_rss();
        res.load_disk = Some(cluster.disk_bytes());
    }
    for round in 1..=args.rounds {
        for (cluster, res) in [
            (Some(&mut etcd), &mut *res_etcd),
            (fetcd.as_mut(), &mut *res_fetcd),
        ] {
            let Some(cluster) = cluster else { continue };
            match cluster.restart().await {
                Ok(d) => {
                    if !args.json {
                        eprintln!(
                            "  restart round {round} {:<5} {:.3}s",
                            cluster.server,
                            d.as_secs_f64()
                        );
                    }
                    res.restarts.push(d.as_secs_f64());
                }
                Err(e) => {
                    res.problem = Some(format!("restart failed: {}", first_line(&e)));
                    eprintln!(
                        "{} restart failed: {e:#} (data in {})",
                        cluster.server,
                        cluster.dir().display()
                    );
                    break;
                }
            }
        }
    }
    Ok(())
}

/// The ratio, the fetcd errors behind it, and why it may be missing, for one target.
fn target_ratio(
    t: &Target,
    results: &[CaseResult],
    re: &Resources,
    rf: &Resources,
) -> (Option<Spread>, u64, Option<String>) {
    match t.metric {
        Metric::Rss => {
            let r = match (re.load_rss, rf.load_rss) {
                (Some(e), Some(f)) if e > 0 => Spread::of(&[f as f64 / e as f64]),
                _ => None,
            };
            (r, rf.load_errors, rf.problem.clone())
        }
        Metric::Restart => (
            Spread::of(&paired_ratios(&re.restarts, &rf.restarts)),
            rf.load_errors,
            rf.problem.clone(),
        ),
        m => match results.iter().find(|r| r.name == t.case) {
            Some(r) => (r.ratio(m), r.fetcd_errors(), rf.problem.clone()),
            None => (None, 0, Some("not run".into())),
        },
    }
}

fn render(
    args: &Args,
    header: &str,
    results: &[CaseResult],
    re: &Resources,
    rf: &Resources,
    with_load: bool,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "\n{header}\n");
    if !results.is_empty() {
        let _ = writeln!(
            s,
            "{:<19} {:>10} {:>10} {:>19} {:>9} {:>9} {:>19} {:>13} {:>19} {:>11}",
            "case",
            "etcd op/s",
            "fetcd op/s",
            "ratio med [min–max]",
            "etcd p99",
            "fetcd p99",
            "p99 ratio",
            "CPU µs/op e/f",
            "CPU ratio",
            "errors e/f"
        );
        for r in results {
            let _ = writeln!(
                s,
                "{:<19} {:>10} {:>10} {:>19} {:>9} {:>9} {:>19} {:>13} {:>19} {:>11}",
                r.name,
                opt(CaseResult::median(&r.etcd, Metric::Throughput), 0),
                opt(CaseResult::median(&r.fetcd, Metric::Throughput), 0),
                spread_str(r.ratio(Metric::Throughput)),
                opt(CaseResult::median(&r.etcd, Metric::P99), 2),
                opt(CaseResult::median(&r.fetcd, Metric::P99), 2),
                spread_str(r.ratio(Metric::P99)),
                format!(
                    "{}/{}",
                    opt(CaseResult::median(&r.etcd, Metric::ServerCpu), 0),
                    opt(CaseResult::median(&r.fetcd, Metric::ServerCpu), 0)
                ),
                spread_str(r.ratio(Metric::ServerCpu)),
                format!("{}/{}", r.etcd_errors(), r.fetcd_errors()),
            );
        }
        let _ = writeln!(s, "(op/s: median over rounds of successful ops per second — events/s for watch; p99 in ms; ratio = fetcd/etcd per round;\n CPU µs/op: the servers' CPU time (all members, the run's setup included) per successful op or event, a cost the client sharing the machine does not distort)");
        for r in results {
            if let Some(e) = r
                .fetcd
                .iter()
                .find_map(|x| x.first_error.as_ref().filter(|_| x.errors > 0))
            {
                let _ = writeln!(
                    s,
                    "  fetcd {} first error: {}",
                    r.name,
                    e.chars().take(160).collect::<String>()
                );
            }
            if let Some(e) = r
                .etcd
                .iter()
                .find_map(|x| x.first_error.as_ref().filter(|_| x.errors > 0))
            {
                let _ = writeln!(
                    s,
                    "  etcd {} first error: {}",
                    r.name,
                    e.chars().take(160).collect::<String>()
                );
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "cases:");
        for r in results {
            let _ = writeln!(s, "  {:<19} {}", r.name, r.what);
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "{:<6} {:>16} {:>14} {:>14} {:>16} {:>16} {:>24}",
        "server",
        "peak RSS (set)",
        "disk (set)",
        "load s",
        "RSS after load",
        "disk after load",
        "restart s med [min–max]"
    );
    for (name, r) in [("etcd", re), ("fetcd", rf)] {
        let _ = writeln!(
            s,
            "{:<6} {:>16} {:>14} {:>14} {:>16} {:>16} {:>24}{}",
            name,
            mib(r.peak_rss),
            mib(r.disk),
            opt(r.load_seconds, 1),
            mib(r.load_rss),
            mib(r.load_disk),
            spread_str(Spread::of(&r.restarts)),
            r.problem
                .as_ref()
                .map(|p| format!("  ({p})"))
                .unwrap_or_default(),
        );
    }
    if with_load {
        let _ = writeln!(
            s,
            "(load: {} keys, 256-byte values, 64 clients, into fresh servers; restart = SIGTERM, start on the same data, time to the first linearizable Get)",
            args.load_keys
        );
    }
    let _ = writeln!(
        s,
        "\n{:<34} {:>22} {:>8}  met",
        "target (fetcd/etcd)", "ratio med [min–max]", "goal"
    );
    for t in TARGETS {
        if t.case == LOAD_CASE && !with_load {
            continue;
        }
        let (ratio, errors, problem) = target_ratio(t, results, re, rf);
        if ratio.is_none() && problem.as_deref() == Some("not run") {
            continue;
        }
        let mut v = verdict(ratio, t.better, t.goal, errors);
        if let (None, Some(p)) = (ratio, problem) {
            v = ratio::Verdict::Unmeasured(p);
        }
        let goal = match t.better {
            Better::Higher => format!("≥ {:.2}", t.goal),
            Better::Lower => format!("≤ {:.2}", t.goal),
        };
        let _ = writeln!(
            s,
            "{:<34} {:>22} {:>8}  {v}",
            t.label,
            spread_str(ratio),
            goal
        );
    }
    s
}

fn target_json(
    args: &Args,
    results: &[CaseResult],
    re: &Resources,
    rf: &Resources,
    with_load: bool,
) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for t in TARGETS {
        if t.case == LOAD_CASE && !with_load {
            continue;
        }
        let (ratio, errors, problem) = target_ratio(t, results, re, rf);
        out.push(serde_json::json!({
            "target": t.label,
            "case": t.case,
            "ratio_median": ratio.map(|r| r.median),
            "ratio_min": ratio.map(|r| r.min),
            "ratio_max": ratio.map(|r| r.max),
            "goal": t.goal,
            "higher_is_better": t.better == Better::Higher,
            "fetcd_errors": errors,
            "problem": problem,
            "met": verdict(ratio, t.better, t.goal, errors) == ratio::Verdict::Met,
        }));
    }
    for (name, r) in [("etcd", re), ("fetcd", rf)] {
        out.push(serde_json::json!({
            "server": name,
            "peak_rss_bytes": r.peak_rss,
            "disk_bytes": r.disk,
            "load_keys": args.load_keys,
            "load_seconds": r.load_seconds,
            "load_rss_bytes": r.load_rss,
            "load_disk_bytes": r.load_disk,
            "restart_seconds": r.restarts,
            "problem": r.problem,
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::*;

    #[test]
    fn standard_cases_parse_and_scale() {
        let cases = standard_cases(0.1).expect("standard cases parse");
        assert_eq!(cases.len(), STANDARD.len());
        let put64 = cases.iter().find(|c| c.name == "put-64").expect("put-64");
        assert_eq!(put64.args.total, 5_000);
        assert_eq!(put64.args.clients, 64);
        assert_eq!(scaled(10, 0.01), 100);
        assert!(load_args(1000).expect("load args").sequential_keys);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_leader_endpoint_comes_first_the_others_in_turn() -> anyhow::Result<()> {
        let cluster = fetcd_tests::cluster::Cluster::start(3).await?;
        let mut leader = cluster.wait_ready().await?;
        if leader == 0 {
            // The order as given would already be right: hand leadership on.
            let to = cluster.member_id(1).context("member 1's id")?;
            cluster.client(0).await?.move_leader(to).await?;
            leader = cluster.wait_ready().await?;
        }
        anyhow::ensure!(leader != 0, "leadership stayed with member 0");
        let urls: Vec<String> = (0..3).map(|i| cluster.client_url(i)).collect();
        let ordered = leader_first(urls.clone()).await;
        let mut expected = urls.clone();
        expected.rotate_left(leader);
        assert_eq!(ordered, expected, "leader is member {leader}");
        // An endpoint that does not answer leaves the order as given.
        let mut with_dead = urls.clone();
        with_dead.push(format!("http://127.0.0.1:{}", fetcd_tests::free_port()?));
        assert_eq!(leader_first(with_dead.clone()).await, with_dead);
        Ok(())
    }

    #[test]
    fn every_target_reads_a_case_that_exists() {
        for t in TARGETS {
            assert!(
                t.case == LOAD_CASE || STANDARD.iter().any(|s| s.0 == t.case),
                "{}",
                t.label
            );
        }
    }
}
