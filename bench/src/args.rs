//! Command-line flags. Names and meanings follow etcd's `tools/benchmark` where it has the same
//! knob, so a command line can be carried over from one tool to the other.

use std::path::PathBuf;

use clap::Parser;
use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Workload {
    /// Put `--total` keys of `--val-size` bytes.
    Put,
    /// Get keys written beforehand (linearizable unless `--consistency s`).
    Range,
    /// The apiserver's update: Txn{mod_revision(key) == last seen → put, else get}; a failed
    /// compare adopts the revision read and retries (counted as `cas_conflicts`).
    TxnPut,
    /// etcd's txn-mixed: read txns (range of `--limit` keys) and put txns, `--rw-ratio` reads
    /// per write.
    TxnMixed,
    /// Watch throughput: `--watchers` watch `--key` (or the prefix with `--prefix`), then
    /// `--clients` writers put `--total` times as fast as they can (or at `--put-rate`); reports
    /// events delivered per second over all watchers until every event arrived.
    Watch,
    /// Watch latency: like `watch`, but puts are paced at `--put-rate` (default 100/s); reports
    /// put→event latency percentiles over all (put, watcher) pairs.
    WatchLatency,
    /// Every client grants a lease, then sends keepalives on its stream as fast as the answers
    /// come back; an op is one keepalive answered.
    LeaseKeepalive,
    /// Grant a lease, then revoke it; an op is the pair.
    LeaseGrantRevoke,
    /// Mass expiry: `--total` leases of `--lease-ttl` seconds with one key each are granted,
    /// then left to expire while one writer keeps putting; ops are that writer's puts, so the
    /// latency percentiles and max are the write stall expiry causes. Reports how long after the
    /// deadline the last key was gone.
    LeaseExpiry,
    /// Write stall under full lists: `--total` keys of `--val-size` bytes under one prefix,
    /// then one client lists the whole prefix 5 times, each in one response (a LIST without a
    /// limit), while one writer puts at `--put-rate` (default 200/s); ops are the writer's
    /// puts, so the latency max is the longest a list held a write up.
    ListStall,
    /// A replay of kube-apiserver's request mix on `/registry/...`: paginated lists, gets, CAS
    /// updates, event creates with shared leases, counts, health reads, plus one watch per
    /// resource prefix and a compactor in the background.
    Kube,
}

impl Workload {
    pub(crate) fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_else(|| format!("{self:?}").to_lowercase())
    }
}

/// Range consistency, spelled as in etcd's benchmark (`l` or `s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Consistency {
    Linearizable,
    Serializable,
}

/// Accepts etcd benchmark's `l` / `s` and the long words.
pub(crate) fn parse_consistency(s: &str) -> Result<Consistency, String> {
    match s.to_ascii_lowercase().as_str() {
        "l" | "linearizable" => Ok(Consistency::Linearizable),
        "s" | "serializable" => Ok(Consistency::Serializable),
        other => Err(format!(
            "unknown consistency {other:?}: use l (linearizable) or s (serializable)"
        )),
    }
}

#[derive(Clone, Debug, Parser)]
#[command(
    name = "fetcd-bench",
    // A later flag wins, so wrapper scripts can set defaults the caller overrides.
    args_override_self = true,
    about = "Load generator for etcd-compatible servers; `--compare` runs etcd and fetcd side by side",
    after_help = "Examples:\n  fetcd-bench put --clients 64 --conns 8 --total 100000\n  fetcd-bench kube --clients 32 --json\n  fetcd-bench --compare --rounds 3 --chart bench.svg"
)]
pub(crate) struct Args {
    /// What to run. Required unless `--compare` (which then runs its standard set; with a
    /// workload, `--compare` compares just that one with the flags given).
    #[arg(required_unless_present = "compare")]
    pub workload: Option<Workload>,
    /// Comma-separated client URLs; clients are spread over them.
    #[arg(long, default_value = "http://127.0.0.1:2379", value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// Concurrent clients (requests in flight); for watch workloads, the concurrent writers.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// gRPC connections shared by the clients; for watch workloads, the connections the watch
    /// streams are spread over (writers get one connection of their own).
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// Threads the client runs on. The client shares the machine with the server under test,
    /// and every cycle it spends is one the server cannot use: one thread (the default) spends
    /// about 40 % less CPU per request than two, which wake each other across cores.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub client_threads: u16,
    /// Total requests (for watch workloads: puts; for lease-keepalive: keepalives answered).
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// Number of distinct keys (0 = `--total`).
    #[arg(long, default_value_t = 0)]
    pub key_space_size: u64,
    /// Use keys 0, 1, 2, … in order instead of random keys from the key space.
    #[arg(long)]
    pub sequential_keys: bool,
    /// Range consistency: `l` (linearizable) or `s` (serializable).
    #[arg(long, default_value = "l", value_parser = parse_consistency)]
    pub consistency: Consistency,
    /// Requests per second over all clients (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Print one JSON line per run instead of the summary (and no progress bar).
    #[arg(long)]
    pub json: bool,

    /// txn-mixed: read txns per write txn.
    #[arg(long, default_value_t = 1.0)]
    pub rw_ratio: f64,
    /// txn-mixed: keys a read txn returns at most.
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    /// Lease workloads: TTL of the granted leases, in seconds.
    #[arg(long, default_value_t = 60)]
    pub lease_ttl: i64,

    /// kube: objects preloaded per resource prefix (lists page through them 500 at a time).
    #[arg(long, default_value_t = 1000)]
    pub kube_objects: u64,
    /// kube: size of an object's value in bytes (apiserver objects are protobuf, ~1–4 KiB).
    #[arg(long, default_value_t = 1024)]
    pub object_size: usize,
    /// kube: seconds between compactions (the apiserver's 5 minutes, scaled down); each compacts
    /// to the revision seen one interval before.
    #[arg(long, default_value_t = 5.0)]
    pub compact_interval: f64,
    /// kube: page size of the paginated lists.
    #[arg(long, default_value_t = 500)]
    pub page_limit: i64,

    /// Watch workloads: total watchers.
    #[arg(long, default_value_t = 1)]
    pub watchers: usize,
    /// Watch workloads: gRPC watch streams the watchers are multiplexed on, spread round-robin
    /// over `--conns` (0 = one stream per connection, as Go's clientv3 does; `--streams` equal to
    /// `--watchers` gives every watcher its own stream).
    #[arg(long, default_value_t = 0)]
    pub streams: usize,
    /// Watch workloads: the watched key, or the watched prefix with `--prefix` (puts then go to
    /// `<key>/<n>` with `--key-size` digits, over `--key-space-size` keys).
    #[arg(long, default_value = "fetcd-bench/watch")]
    pub key: String,
    /// Watch workloads: watch `--key` as a prefix and spread the puts over keys under it.
    #[arg(long)]
    pub prefix: bool,
    /// Watch workloads: puts per second over all writers (0 = unlimited). Default 100 for
    /// watch-latency, `--rate` for watch.
    #[arg(long)]
    pub put_rate: Option<u64>,
    /// Watch workloads: seconds to wait after the last put for outstanding events; events still
    /// missing then count as errors.
    #[arg(long, default_value_t = 10.0)]
    pub grace: f64,

    /// Start real etcd and fetcd with the same topology and run the workloads against both,
    /// alternately, `--rounds` times; prints fetcd/etcd ratios and the targets.
    #[arg(long)]
    pub compare: bool,
    /// compare: members per server (1 or 3), on loopback with free ports and temp data dirs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub nodes: u8,
    /// compare: rounds per workload (each round runs etcd then fetcd); at least 3.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(3..))]
    pub rounds: u32,
    /// compare: the fetcd binary (default: `fetcd` next to this executable, i.e.
    /// `target/release/fetcd`).
    #[arg(long)]
    pub fetcd_bin: Option<PathBuf>,
    /// compare: the etcd binary (installed with apt-get when missing at the default path).
    #[arg(long, default_value = "/usr/bin/etcd")]
    pub etcd_bin: PathBuf,
    /// compare: keys (256-byte values) loaded into fresh servers to measure memory, disk and
    /// restart time (the target is 1,000,000).
    #[arg(long, default_value_t = 100_000)]
    pub load_keys: u64,
    /// compare: multiply every standard workload's `--total` (e.g. 0.2 for a quick run).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// compare: comma-separated standard cases to run (default all; `--list-cases` names them).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// compare: print the standard cases and exit.
    #[arg(long)]
    pub list_cases: bool,
    /// compare: write an SVG chart of the throughput and p99 ratios here.
    #[arg(long, default_value = "bench-compare.svg")]
    pub chart: PathBuf,
}

impl Args {
    /// The key space the key pickers draw from (`--key-space-size`, or `--total`).
    pub(crate) fn key_space(&self) -> u64 {
        if self.key_space_size == 0 {
            self.total.max(1)
        } else {
            self.key_space_size
        }
    }

    pub(crate) fn workload_name(&self) -> String {
        self.workload
            .map_or_else(|| "compare".to_owned(), Workload::name)
    }
}

/// Key number `i` as `size` ASCII digits (zero-padded; truncated if `i` has more digits).
pub(crate) fn key(i: u64, size: usize) -> Vec<u8> {
    let mut k = format!("{i:0width$}", width = size.max(1)).into_bytes();
    k.truncate(size.max(1));
    k
}

/// splitmix64: a tiny deterministic generator for key picks and op mixes (no crypto needed, and
/// per-client seeds keep runs reproducible).
#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is irrelevant at benchmark key-space sizes.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The key number op `i` uses: `i` itself with `--sequential-keys`, else a random one.
pub(crate) fn pick_key(i: u64, key_space: u64, sequential: bool, rng: &mut Rng) -> u64 {
    if sequential {
        i % key_space.max(1)
    } else {
        rng.below(key_space)
    }
}

/// The smallest key after every key that starts with `prefix` (etcd's `GetPrefixRangeEnd`).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): the range runs to the end of the key space.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_accepts_etcd_spellings() {
        assert_eq!(parse_consistency("l"), Ok(Consistency::Linearizable));
        assert_eq!(parse_consistency("S"), Ok(Consistency::Serializable));
        assert_eq!(
            parse_consistency("serializable"),
            Ok(Consistency::Serializable)
        );
        assert!(parse_consistency("x").is_err());
    }

    #[test]
    fn flags_parse_like_etcd_benchmark() {
        let a = Args::try_parse_from([
            "fetcd-bench",
            "txn-mixed",
            "--endpoints",
            "http://a:1,http://b:2",
            "--consistency",
            "s",
            "--rw-ratio",
            "4",
            "--sequential-keys",
            "--rate",
            "500",
        ])
        .expect("valid flags");
        assert_eq!(a.workload, Some(Workload::TxnMixed));
        assert_eq!(a.endpoints, ["http://a:1", "http://b:2"]);
        assert_eq!(a.consistency, Consistency::Serializable);
        assert_eq!(a.rw_ratio, 4.0);
        assert!(a.sequential_keys);
        assert_eq!(a.rate, 500);
        assert_eq!(a.key_space(), a.total);
    }

    #[test]
    fn workload_required_unless_compare_and_rounds_at_least_three() {
        assert!(Args::try_parse_from(["fetcd-bench"]).is_err());
        assert!(Args::try_parse_from(["fetcd-bench", "--compare"]).is_ok());
        assert!(Args::try_parse_from(["fetcd-bench", "--compare", "--rounds", "2"]).is_err());
        assert!(Args::try_parse_from(["fetcd-bench", "--compare", "--nodes", "4"]).is_err());
        let a =
            Args::try_parse_from(["fetcd-bench", "--compare", "--scale", "0.2", "--scale", "1"])
                .expect("repeated flag");
        assert_eq!(a.scale, 1.0);
    }

    #[test]
    fn keys_have_the_requested_size() {
        assert_eq!(key(42, 8), b"00000042");
        assert_eq!(key(123_456, 3), b"123");
        assert_eq!(key(7, 0), b"7");
    }

    #[test]
    fn prefix_end_matches_etcd() {
        assert_eq!(prefix_end(b"/registry/pods/"), b"/registry/pods0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn pick_key_stays_in_key_space() {
        let mut rng = Rng::new(1);
        assert_eq!(pick_key(12, 10, true, &mut rng), 2);
        for i in 0..1000 {
            assert!(pick_key(i, 7, false, &mut rng) < 7);
        }
        let u = rng.unit();
        assert!((0.0..1.0).contains(&u));
    }
}
