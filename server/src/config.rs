//! fetcd's flags: etcd's names, etcd's defaults, and `ETCD_*` environment variables, so an etcd
//! manifest or systemd unit runs fetcd unchanged.
//!
//! Flags fall into three groups, each handled on purpose:
//! - implemented: they do what etcd's do;
//! - accepted: they have no meaning for fetcd (e.g. `--logger zap`) or fetcd's behaviour already
//!   matches; they are parsed so existing command lines keep working;
//! - refused: fetcd cannot honour them yet (TLS, multi-member clusters, auto compaction);
//!   [`Config::validate`] fails with a message naming the flag rather than silently running
//!   without what the operator asked for.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::auto_compaction::AutoCompaction;

/// Default `--max-request-bytes`: 1.5 MiB, as etcd.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// Default `--max-txn-ops`, as etcd.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

/// fetcd: an etcd-compatible key-value store.
#[derive(Clone, Debug, Parser)]
#[command(name = "fetcd", version, about)]
pub struct Config {
    /// Human-readable name for this member.
    #[arg(long, env = "ETCD_NAME", default_value = "default")]
    pub name: String,

    /// Path to the data directory (default: `<name>.fetcd`).
    #[arg(long, env = "ETCD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Comma-separated URLs to listen on for client traffic.
    #[arg(
        long,
        env = "ETCD_LISTEN_CLIENT_URLS",
        default_value = "http://localhost:2379",
        value_delimiter = ','
    )]
    pub listen_client_urls: Vec<String>,

    /// Comma-separated client URLs to advertise to the rest of the cluster.
    #[arg(
        long,
        env = "ETCD_ADVERTISE_CLIENT_URLS",
        default_value = "http://localhost:2379",
        value_delimiter = ','
    )]
    pub advertise_client_urls: Vec<String>,

    /// Comma-separated URLs to listen on for peer traffic (a single member has no peers).
    #[arg(
        long,
        env = "ETCD_LISTEN_PEER_URLS",
        default_value = "http://localhost:2380",
        value_delimiter = ','
    )]
    pub listen_peer_urls: Vec<String>,

    /// This member's peer URLs to advertise; they determine the member id, as in etcd.
    #[arg(
        long,
        env = "ETCD_INITIAL_ADVERTISE_PEER_URLS",
        default_value = "http://localhost:2380",
        value_delimiter = ','
    )]
    pub initial_advertise_peer_urls: Vec<String>,

    /// Initial cluster configuration for bootstrapping (`name=peerURL,...`).
    #[arg(long, env = "ETCD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,

    /// `new` or `existing`.
    #[arg(long, env = "ETCD_INITIAL_CLUSTER_STATE", default_value = "new")]
    pub initial_cluster_state: String,

    /// Initial cluster token; part of the member and cluster id derivation.
    #[arg(
        long,
        env = "ETCD_INITIAL_CLUSTER_TOKEN",
        default_value = "etcd-cluster"
    )]
    pub initial_cluster_token: String,

    /// Time (ms) of a heartbeat interval.
    #[arg(long, env = "ETCD_HEARTBEAT_INTERVAL", default_value_t = 100)]
    pub heartbeat_interval: u64,

    /// Time (ms) for an election to timeout.
    #[arg(long, env = "ETCD_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,

    /// Number of committed transactions to trigger a snapshot.
    #[arg(long, env = "ETCD_SNAPSHOT_COUNT", default_value_t = 100_000)]
    pub snapshot_count: u64,

    /// Entries kept in the Raft log behind a snapshot, for slow followers to catch up from.
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_SNAPSHOT_CATCHUP_ENTRIES",
        default_value_t = 5000
    )]
    pub experimental_snapshot_catchup_entries: u64,

    /// Interval of progress notifications for watches that ask for them (a Go duration: `10m`,
    /// `5s`, `500ms`).
    #[arg(long, env = "ETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value = "10m", value_parser = parse_go_duration)]
    pub experimental_watch_progress_notify_interval: Duration,

    /// How often the leader records the remaining TTL of long leases through Raft, so a new
    /// leader or a restart does not give them their full TTL again (a Go duration).
    #[arg(long, env = "ETCD_EXPERIMENTAL_LEASE_CHECKPOINT_INTERVAL", default_value = "5m", value_parser = parse_go_duration)]
    pub experimental_lease_checkpoint_interval: Duration,

    /// Accepted for compatibility: fetcd always checkpoints lease TTLs.
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_LEASE_CHECKPOINT", default_value = "true", num_args = 0..=1, default_missing_value = "true")]
    pub experimental_enable_lease_checkpoint: String,

    /// Accepted for compatibility: fetcd always persists lease checkpoints.
    #[arg(long, env = "ETCD_EXPERIMENTAL_ENABLE_LEASE_CHECKPOINT_PERSIST", default_value = "true", num_args = 0..=1, default_missing_value = "true")]
    pub experimental_enable_lease_checkpoint_persist: String,

    /// Before serving clients, compare this member's key-space hash with every reachable peer's
    /// at the same revision and refuse to start on a mismatch.
    #[arg(long, env = "ETCD_EXPERIMENTAL_INITIAL_CORRUPT_CHECK", default_value = "false", num_args = 0..=1, default_missing_value = "true")]
    pub experimental_initial_corrupt_check: String,

    /// How often the leader compares every member's key-space hash with its own and raises a
    /// `CORRUPT` alarm on a mismatch (a Go duration; 0, the default, turns it off).
    #[arg(long, env = "ETCD_EXPERIMENTAL_CORRUPT_CHECK_TIME", default_value = "0", value_parser = parse_go_duration)]
    pub experimental_corrupt_check_time: Duration,

    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "ETCD_MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,

    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "ETCD_MAX_TXN_OPS", default_value_t = DEFAULT_MAX_TXN_OPS)]
    pub max_txn_ops: usize,

    /// Log level: debug, info, warn, error, panic or fatal.
    #[arg(long, env = "ETCD_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Accepted for compatibility: fetcd always logs through `tracing`.
    #[arg(long, env = "ETCD_LOGGER", default_value = "zap")]
    pub logger: String,

    /// Accepted for compatibility: log to stderr (`default`/`stderr`) only.
    #[arg(
        long,
        env = "ETCD_LOG_OUTPUTS",
        default_value = "default",
        value_delimiter = ','
    )]
    pub log_outputs: Vec<String>,

    /// Accepted for compatibility; fetcd has no v2 API (only `false` is allowed).
    #[arg(long, env = "ETCD_ENABLE_V2", default_value = "false")]
    pub enable_v2: String,

    /// Raise an alarm when the backend size exceeds the given quota (0 defaults to 2 GiB, as
    /// etcd). fetcd's backend size is its whole data directory.
    #[arg(long, env = "ETCD_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: u64,

    /// How much history automatic compaction keeps: for `periodic`, a time (a bare number is
    /// hours, or a Go duration such as `30m`); for `revision`, a number of revisions. 0 turns it
    /// off, the default.
    #[arg(long, env = "ETCD_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,

    /// `periodic` (compact to the revision of one retention ago, at most hourly) or `revision`
    /// (compact to the current revision minus the retention, every five minutes).
    #[arg(long, env = "ETCD_AUTO_COMPACTION_MODE", default_value = "periodic")]
    pub auto_compaction_mode: String,

    /// How many compacted revisions are deleted per storage batch (etcd's default, 1000).
    #[arg(
        long,
        env = "ETCD_EXPERIMENTAL_COMPACTION_BATCH_LIMIT",
        default_value_t = 1000
    )]
    pub experimental_compaction_batch_limit: usize,

    /// The pause between two such batches, so compaction's disk writes do not stall the log's
    /// fsyncs (a Go duration; etcd's default, 10ms).
    #[arg(long, env = "ETCD_EXPERIMENTAL_COMPACTION_SLEEP_INTERVAL", default_value = "10ms", value_parser = parse_go_duration)]
    pub experimental_compaction_sleep_interval: Duration,

    /// fetcd's own: while requests come back to back, after a request starts and after it is
    /// answered, keep one lowest-priority thread per CPU spinning for this long (a Go duration
    /// such as `500us`; `0`, the default, is off), so that on virtual machines whose idle CPUs
    /// halt at once the next request or disk completion does not have to wake a halted CPU.
    /// Costs otherwise idle CPU time (see `idle_spin`).
    #[arg(long, env = "FETCD_IDLE_SPIN", default_value = "0", value_parser = parse_go_duration)]
    pub idle_spin: Duration,

    /// How often `revision` auto-compaction checks (five minutes, as etcd's); settable only by
    /// code embedding fetcd, for tests.
    #[arg(skip = crate::auto_compaction::REVISION_INTERVAL)]
    pub auto_compaction_revision_interval: Duration,

    /// Refused until fetcd serves TLS.
    #[arg(long, env = "ETCD_CERT_FILE")]
    pub cert_file: Option<PathBuf>,

    /// Refused until fetcd serves TLS.
    #[arg(long, env = "ETCD_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// Refused until fetcd serves TLS.
    #[arg(long, env = "ETCD_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,

    /// Refused until fetcd serves TLS.
    #[arg(long, env = "ETCD_CLIENT_CERT_AUTH", default_value = "false")]
    pub client_cert_auth: String,

    /// Refused until fetcd serves TLS.
    #[arg(long, env = "ETCD_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,

    /// Refused until fetcd serves TLS.
    #[arg(long, env = "ETCD_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,

    /// Refused until fetcd serves TLS.
    #[arg(long, env = "ETCD_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,

    /// Refused until fetcd serves TLS.
    #[arg(long, env = "ETCD_PEER_CLIENT_CERT_AUTH", default_value = "false")]
    pub peer_client_cert_auth: String,

    /// Comma-separated URLs to serve `/metrics` and `/health` on (besides the client URLs).
    #[arg(long, env = "ETCD_LISTEN_METRICS_URLS", value_delimiter = ',')]
    pub listen_metrics_urls: Vec<String>,

    /// `basic`, or `extensive` to also time every gRPC call (`grpc_server_handling_seconds`,
    /// which etcd's "gRPC requests slow" alert reads), as etcd.
    #[arg(long, env = "ETCD_METRICS", default_value = "basic")]
    pub metrics: String,
}

/// A flag combination fetcd cannot honour.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// A configuration for tests and embedding: one member, data in `data_dir`, a client
    /// listener on an OS-chosen loopback port.
    pub fn for_test(data_dir: PathBuf) -> Self {
        let mut c = Config::parse_from(["fetcd"]);
        c.data_dir = Some(data_dir);
        c.listen_client_urls = vec!["http://127.0.0.1:0".into()];
        c.listen_peer_urls = vec!["http://127.0.0.1:0".into()];
        c.advertise_client_urls = vec![];
        c
    }

    /// `--data-dir`, defaulting to `<name>.fetcd`.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.fetcd", self.name)))
    }

    /// True if `--experimental-initial-corrupt-check` is on.
    pub fn initial_corrupt_check(&self) -> bool {
        matches!(
            self.experimental_initial_corrupt_check.as_str(),
            "true" | "1"
        )
    }

    /// The automatic compaction the flags ask for, if any.
    pub fn auto_compaction(&self) -> Result<Option<AutoCompaction>, String> {
        AutoCompaction::from_flags(&self.auto_compaction_mode, &self.auto_compaction_retention)
    }

    /// Heartbeat interval as a duration.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval)
    }

    /// Election timeout as a duration.
    pub fn election(&self) -> Duration {
        Duration::from_millis(self.election_timeout)
    }

    /// etcd's minimum lease TTL in seconds: 1.5 election timeouts (counted in heartbeat ticks,
    /// as etcd does), rounded up.
    pub fn min_lease_ttl(&self) -> i64 {
        let heartbeat = self.heartbeat_interval.max(1);
        let ticks = self.election_timeout / heartbeat;
        let ms = (3 * ticks / 2) * heartbeat;
        ms.div_ceil(1000) as i64
    }

    /// Refuses what fetcd cannot do yet, naming the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let refuse = |m: &str| Err(ConfigError(m.to_string()));
        let truthy = |s: &str| !matches!(s, "" | "false" | "0");
        if self.listen_client_urls.is_empty() {
            return refuse("--listen-client-urls must name at least one URL");
        }
        for u in self
            .listen_client_urls
            .iter()
            .chain(&self.advertise_client_urls)
        {
            if u.starts_with("https://") || u.starts_with("unixs://") {
                return refuse(&format!("{u}: TLS client URLs are not supported yet"));
            }
        }
        if self.cert_file.is_some()
            || self.key_file.is_some()
            || self.trusted_ca_file.is_some()
            || truthy(&self.client_cert_auth)
            || self.peer_cert_file.is_some()
            || self.peer_key_file.is_some()
            || self.peer_trusted_ca_file.is_some()
            || truthy(&self.peer_client_cert_auth)
        {
            return refuse("TLS flags (--cert-file, --key-file, --trusted-ca-file, --client-cert-auth, --peer-*) are not supported yet");
        }
        if !matches!(self.metrics.as_str(), "basic" | "extensive") {
            return refuse(&format!(
                "--metrics {}: must be basic or extensive",
                self.metrics
            ));
        }
        let members = self.initial_members()?;
        let Some(me) = members.iter().find(|m| m.name == self.name) else {
            return refuse(&format!(
                "--initial-cluster {} does not name this member (--name {})",
                self.initial_cluster.as_deref().unwrap_or_default(),
                self.name
            ));
        };
        let mut advertised = self.initial_advertise_peer_urls.clone();
        advertised.sort();
        if me.peer_urls != advertised {
            return refuse(&format!(
                "--initial-cluster has {}={} but --initial-advertise-peer-urls is {} (they must match)",
                me.name,
                me.peer_urls.join(","),
                self.initial_advertise_peer_urls.join(",")
            ));
        }
        let mut ids: Vec<u64> = members.iter().map(|m| m.id).collect();
        ids.sort();
        ids.dedup();
        if ids.len() != members.len() {
            return refuse("--initial-cluster names two members with the same peer URLs");
        }
        for u in members
            .iter()
            .flat_map(|m| &m.peer_urls)
            .chain(&self.listen_peer_urls)
        {
            if !u.starts_with("http://") {
                return refuse(&format!("{u}: only http:// peer URLs are supported"));
            }
        }
        if self.initial_cluster_state != "new" && self.initial_cluster_state != "existing" {
            return refuse("--initial-cluster-state must be 'new' or 'existing'");
        }
        if !matches!(
            self.experimental_initial_corrupt_check.as_str(),
            "true" | "1" | "false" | "0"
        ) {
            return refuse("--experimental-initial-corrupt-check must be true or false");
        }
        if truthy(&self.enable_v2) {
            return refuse("--enable-v2: fetcd serves only the v3 API");
        }
        if let Err(e) = self.auto_compaction() {
            return refuse(&e);
        }
        if self.experimental_compaction_batch_limit == 0 {
            return refuse("--experimental-compaction-batch-limit must be positive");
        }
        for u in &self.listen_metrics_urls {
            if !u.starts_with("http://") {
                return refuse(&format!(
                    "--listen-metrics-urls {u}: only http:// is supported"
                ));
            }
        }
        if self.max_txn_ops == 0 {
            return refuse("--max-txn-ops must be positive");
        }
        if self.experimental_watch_progress_notify_interval.is_zero() {
            return refuse("--experimental-watch-progress-notify-interval must be positive");
        }
        if self.max_request_bytes == 0 {
            return refuse("--max-request-bytes must be positive");
        }
        if self.heartbeat_interval == 0 || self.election_timeout < 5 * self.heartbeat_interval {
            return refuse("--election-timeout must be at least 5 times --heartbeat-interval");
        }
        for o in &self.log_outputs {
            if o != "default" && o != "stderr" {
                return refuse(&format!("--log-outputs {o}: only stderr is supported"));
            }
        }
        Ok(())
    }

    /// This member's id, derived like etcd's from its sorted peer URLs and the cluster token.
    pub fn member_id(&self) -> u64 {
        member_id(
            &self.initial_advertise_peer_urls,
            &self.initial_cluster_token,
        )
    }

    /// The members of `--initial-cluster` (`name=url,...`; a name may repeat for several URLs),
    /// in order of first appearance, each with its id. Without the flag: this member alone, at
    /// its advertised peer URLs (etcd's default `default=http://localhost:2380`).
    pub fn initial_members(&self) -> Result<Vec<InitialMember>, ConfigError> {
        let mut out: Vec<InitialMember> = Vec::new();
        match &self.initial_cluster {
            None => out.push(InitialMember {
                name: self.name.clone(),
                peer_urls: self.initial_advertise_peer_urls.clone(),
                id: 0,
            }),
            Some(ic) => {
                for part in ic.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let Some((name, url)) = part.split_once('=') else {
                        return Err(ConfigError(format!(
                            "--initial-cluster {ic}: {part:?} is not name=peerURL"
                        )));
                    };
                    match out.iter_mut().find(|m| m.name == name) {
                        Some(m) => m.peer_urls.push(url.to_string()),
                        None => out.push(InitialMember {
                            name: name.to_string(),
                            peer_urls: vec![url.to_string()],
                            id: 0,
                        }),
                    }
                }
            }
        }
        for m in &mut out {
            m.peer_urls.sort();
            m.id = member_id(&m.peer_urls, &self.initial_cluster_token);
        }
        Ok(out)
    }

    /// The cluster id, derived like etcd's from the sorted ids of the initial members.
    pub fn cluster_id(&self) -> u64 {
        let mut ids: Vec<u64> = match self.initial_members() {
            Ok(ms) => ms.iter().map(|m| m.id).collect(),
            Err(_) => vec![self.member_id()],
        };
        ids.sort();
        let b: Vec<u8> = ids.iter().flat_map(|id| id.to_be_bytes()).collect();
        first_u64(&sha1_smol::Sha1::from(b).digest().bytes())
    }
}

/// One member named by `--initial-cluster`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitialMember {
    /// Its `--name`.
    pub name: String,
    /// Its peer URLs, sorted.
    pub peer_urls: Vec<String>,
    /// Its member id (from the peer URLs and the cluster token, like etcd's).
    pub id: u64,
}

/// etcd's member id: the first 8 bytes of sha1(sorted peer URLs joined, then the cluster token).
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    let mut b = urls.concat().into_bytes();
    b.extend_from_slice(token.as_bytes());
    first_u64(&sha1_smol::Sha1::from(b).digest().bytes())
}

/// Parses a Go `time.Duration` string as etcd's flags take it: a sequence of number+unit pairs
/// (`h`, `m`, `s`, `ms`, `us`/`µs`, `ns`), e.g. `1m30s`, `100ms`, `1.5h`.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let n: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(bad()),
        };
        total += n * secs;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

fn first_u64(h: &[u8; 20]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&h[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_match_etcd() {
        let c = Config::parse_from(["fetcd"]);
        assert_eq!(c.max_request_bytes, 1_572_864);
        assert_eq!(c.max_txn_ops, 128);
        assert_eq!(c.data_dir(), PathBuf::from("default.fetcd"));
        assert!(c.validate().is_ok());
        assert!(
            c.idle_spin.is_zero(),
            "idle spin is fetcd's own and off by default"
        );
        let c = Config::parse_from(["fetcd", "--idle-spin", "500us"]);
        assert_eq!(c.idle_spin, Duration::from_micros(500));
    }

    #[test]
    fn refused_flags_name_themselves() {
        let c = Config::parse_from(["fetcd", "--cert-file", "/x.pem"]);
        assert!(c.validate().is_err_and(|e| e.0.contains("--cert-file")));
        let c = Config::parse_from([
            "fetcd",
            "--initial-cluster",
            "a=http://h1:2380,b=http://h2:2380",
            "--name",
            "a",
        ]);
        assert!(
            c.validate()
                .is_err_and(|e| e.0.contains("--initial-advertise-peer-urls")),
            "advertised URLs must match the member's --initial-cluster entry"
        );
        let c = Config::parse_from(["fetcd", "--initial-cluster", "b=http://h2:2380"]);
        assert!(c.validate().is_err_and(|e| e.0.contains("does not name")));
    }

    #[test]
    fn three_members_get_distinct_ids_and_one_cluster_id() {
        let cluster = "a=http://h1:2380,b=http://h2:2380,c=http://h3:2380";
        let member = |name: &str, url: &str| {
            Config::parse_from([
                "fetcd",
                "--name",
                name,
                "--initial-cluster",
                cluster,
                "--initial-advertise-peer-urls",
                url,
            ])
        };
        let (a, b) = (member("a", "http://h1:2380"), member("b", "http://h2:2380"));
        assert!(a.validate().is_ok() && b.validate().is_ok());
        let ms = a.initial_members().unwrap();
        assert_eq!(ms.len(), 3);
        assert_eq!(ms[0].id, a.member_id());
        assert_eq!(ms[1].id, b.member_id());
        assert_ne!(a.member_id(), b.member_id());
        assert_eq!(a.cluster_id(), b.cluster_id());
        // The single-member default keeps etcd's well-known ids.
        let d = Config::parse_from(["fetcd"]);
        assert_eq!(format!("{:x}", d.member_id()), "8e9e05c52164694d");
        assert_eq!(format!("{:x}", d.cluster_id()), "cdf818194e3a8c32");
    }

    #[test]
    fn member_id_is_deterministic_and_depends_on_token() {
        let a = Config::parse_from(["fetcd"]);
        let b = Config::parse_from(["fetcd", "--initial-cluster-token", "other"]);
        assert_eq!(a.member_id(), Config::parse_from(["fetcd"]).member_id());
        assert_ne!(a.member_id(), b.member_id());
        assert_ne!(a.member_id(), 0);
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_go_duration("10").is_err());
        assert!(parse_go_duration("5x").is_err());
    }

    #[test]
    fn ids_equal_etcds_for_the_same_flags() {
        // What etcd reports for a member started with default flags.
        let c = Config::parse_from(["fetcd"]);
        assert_eq!(c.member_id(), 0x8e9e05c52164694d);
        assert_eq!(c.cluster_id(), 0xcdf818194e3a8c32);
    }
}
