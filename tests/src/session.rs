//! A recording client session, and the differential runner.

use std::time::Instant;

use etcd_client::{
    Client, CompactionOptions, CompactionResponse, DeleteOptions, DeleteResponse, Error,
    GetOptions, GetResponse, LeaseGrantOptions, LeaseGrantResponse, LeaseRevokeResponse,
    LeaseTimeToLiveOptions, LeaseTimeToLiveResponse, PutOptions, PutResponse, Txn, TxnResponse,
};
use serde_json::Value;

use crate::diff::{compare_observations, render_transcript};
use crate::etcdctl::{normalize, run_etcdctl, EtcdctlOutput};
use crate::observe::{self, Observation};
use crate::target::{Target, TargetKind};

/// Set to `1` to print both full transcripts (run with `--nocapture`).
pub const VERBOSE_ENV: &str = "FETCD_TESTS_VERBOSE";

/// A client connected to one server that records a normalized [`Observation`] for every
/// request it makes. The typed methods return the raw etcd-client result too, so a scenario
/// can additionally assert absolute facts (e.g. "the first write gets revision 2").
///
/// Connected to a cluster ([`Session::connect_all`]), each request goes to the next member in
/// turn, so a scenario's answers must not depend on which member serves them.
pub struct Session {
    label: String,
    urls: Vec<String>,
    clients: Vec<Client>,
    /// Requests made so far; the next one goes to member `turn % len`.
    turn: usize,
    observations: Vec<Observation>,
}

impl Session {
    pub async fn connect(label: impl Into<String>, url: impl Into<String>) -> anyhow::Result<Self> {
        Self::connect_all(label, vec![url.into()]).await
    }

    /// Connects to every member of a cluster; requests rotate over them.
    pub async fn connect_all(label: impl Into<String>, urls: Vec<String>) -> anyhow::Result<Self> {
        anyhow::ensure!(!urls.is_empty(), "a session needs at least one endpoint");
        let mut clients = Vec::with_capacity(urls.len());
        for url in &urls {
            clients.push(crate::etcd::connect(url).await?);
        }
        Ok(Session {
            label: label.into(),
            urls,
            clients,
            turn: 0,
            observations: Vec::new(),
        })
    }

    pub async fn for_target(target: &Target) -> anyhow::Result<Self> {
        Self::connect_all(target.label(), target.client_urls()).await
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The endpoint of the member whose turn it is.
    pub fn url(&self) -> &str {
        &self.urls[self.turn % self.urls.len()]
    }

    /// The client of the member whose turn it is, for requests the typed helpers don't cover
    /// (record the outcome yourself with [`Session::record`]); the next request goes to the
    /// next member.
    pub fn client(&mut self) -> &mut Client {
        let i = self.turn % self.clients.len();
        self.turn += 1;
        &mut self.clients[i]
    }

    pub fn observations(&self) -> &[Observation] {
        &self.observations
    }

    pub fn into_observations(self) -> Vec<Observation> {
        self.observations
    }

    /// Records a custom observation.
    pub fn record(&mut self, step: impl Into<String>, value: Value) {
        self.observations.push(Observation {
            step: step.into(),
            value,
        });
    }

    pub async fn put(
        &mut self,
        step: &str,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        options: Option<PutOptions>,
    ) -> Result<PutResponse, Error> {
        let r = self.client().put(key, value, options).await;
        self.record(step, observe::result(&r, observe::put_response));
        r
    }

    pub async fn get(
        &mut self,
        step: &str,
        key: impl Into<Vec<u8>>,
        options: Option<GetOptions>,
    ) -> Result<GetResponse, Error> {
        let r = self.client().get(key, options).await;
        self.record(step, observe::result(&r, observe::get_response));
        r
    }

    pub async fn delete(
        &mut self,
        step: &str,
        key: impl Into<Vec<u8>>,
        options: Option<DeleteOptions>,
    ) -> Result<DeleteResponse, Error> {
        let r = self.client().delete(key, options).await;
        self.record(step, observe::result(&r, observe::delete_response));
        r
    }

    pub async fn txn(&mut self, step: &str, txn: Txn) -> Result<TxnResponse, Error> {
        let r = self.client().txn(txn).await;
        self.record(step, observe::result(&r, observe::txn_response));
        r
    }

    pub async fn compact(
        &mut self,
        step: &str,
        revision: i64,
        options: Option<CompactionOptions>,
    ) -> Result<CompactionResponse, Error> {
        let r = self.client().compact(revision, options).await;
        self.record(step, observe::result(&r, observe::compaction_response));
        r
    }

    /// Use `LeaseGrantOptions::new().with_id(..)`: lease IDs are part of the observation.
    pub async fn lease_grant(
        &mut self,
        step: &str,
        ttl: i64,
        options: Option<LeaseGrantOptions>,
    ) -> Result<LeaseGrantResponse, Error> {
        let r = self.client().lease_grant(ttl, options).await;
        self.record(step, observe::result(&r, observe::lease_grant_response));
        r
    }

    pub async fn lease_revoke(
        &mut self,
        step: &str,
        id: i64,
    ) -> Result<LeaseRevokeResponse, Error> {
        let r = self.client().lease_revoke(id).await;
        self.record(step, observe::result(&r, observe::lease_revoke_response));
        r
    }

    pub async fn lease_time_to_live(
        &mut self,
        step: &str,
        id: i64,
        options: Option<LeaseTimeToLiveOptions>,
    ) -> Result<LeaseTimeToLiveResponse, Error> {
        let r = self.client().lease_time_to_live(id, options).await;
        self.record(
            step,
            observe::result(&r, observe::lease_time_to_live_response),
        );
        r
    }

    /// Runs `etcdctl --endpoints=<this server> <args>` and records the normalized output
    /// (exit status, stdout with JSON header ids removed, stderr without timestamps).
    pub async fn etcdctl(
        &mut self,
        step: &str,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<EtcdctlOutput> {
        let url = self.url().to_owned();
        let out = run_etcdctl(&url, args, stdin).await?;
        self.record(step, normalize(&out, &url));
        Ok(out)
    }

    /// Like [`Session::etcdctl`], but records stdout and stderr after `scrub` (for output that
    /// names server-chosen values such as lease IDs or remaining TTLs). Returns the raw output.
    pub async fn etcdctl_scrubbed(
        &mut self,
        step: &str,
        args: &[&str],
        scrub: impl Fn(&str) -> String,
    ) -> anyhow::Result<EtcdctlOutput> {
        let url = self.url().to_owned();
        let out = run_etcdctl(&url, args, None).await?;
        let scrubbed = EtcdctlOutput {
            status: out.status,
            stdout: scrub(&out.stdout),
            stderr: scrub(&out.stderr),
        };
        self.record(step, normalize(&scrubbed, &url));
        Ok(out)
    }
}

/// Starts a fresh reference etcd and a fresh candidate (see [`crate::target::start_pair`]), runs `scenario`
/// against both concurrently, stops them, and fails with a readable diff if the transcripts
/// differ, or if the scenario's own absolute checks failed on either server.
pub async fn run_differential<F>(name: &str, scenario: F) -> anyhow::Result<()>
where
    F: AsyncFn(&mut Session) -> anyhow::Result<()>,
{
    run_differential_with_flags(name, &[], scenario).await
}

/// Like [`run_differential`], both servers started with the same extra etcd-style flags.
pub async fn run_differential_with_flags<F>(
    name: &str,
    flags: &[&str],
    scenario: F,
) -> anyhow::Result<()>
where
    F: AsyncFn(&mut Session) -> anyhow::Result<()>,
{
    run_pair(name, TargetKind::candidate()?, flags, scenario).await
}

/// Like [`run_differential`], with the candidate given instead of [`TargetKind::candidate`]
/// (e.g. [`TargetKind::FetcdCluster`]).
pub async fn run_differential_against<F>(
    name: &str,
    candidate: TargetKind,
    scenario: F,
) -> anyhow::Result<()>
where
    F: AsyncFn(&mut Session) -> anyhow::Result<()>,
{
    run_pair(name, candidate, &[], scenario).await
}

/// Starts etcd and `candidate` with `flags`, runs `scenario` on both, stops them, and reports
/// the comparison (and a failed stop).
async fn run_pair<F>(
    name: &str,
    candidate: TargetKind,
    flags: &[&str],
    scenario: F,
) -> anyhow::Result<()>
where
    F: AsyncFn(&mut Session) -> anyhow::Result<()>,
{
    crate::init_tracing();
    let started = Instant::now();
    let (reference, candidate) = crate::target::start_pair_against(candidate, flags).await?;
    let boot = started.elapsed();
    let result = run_on_targets(name, &reference, &candidate, scenario).await;
    let ref_log = reference.log_tail(30);
    let cand_log = candidate.log_tail(30);
    let stopped = tokio::join!(reference.stop(), candidate.stop());
    eprintln!(
        "scenario `{name}`: servers up in {boot:?}, total {:?}",
        started.elapsed()
    );
    if result.is_err() && std::env::var_os(VERBOSE_ENV).is_some() {
        eprintln!("reference log tail:\n{ref_log}\ncandidate log tail:\n{cand_log}");
    }
    result?;
    stopped.0?;
    stopped.1?;
    Ok(())
}

/// Runs `scenario` against two already running targets (fresh sessions) and compares.
pub async fn run_on_targets<F>(
    name: &str,
    left: &Target,
    right: &Target,
    scenario: F,
) -> anyhow::Result<()>
where
    F: AsyncFn(&mut Session) -> anyhow::Result<()>,
{
    let mut ls = Session::for_target(left).await?;
    let mut rs = Session::for_target(right).await?;
    let (lr, rr) = tokio::join!(scenario(&mut ls), scenario(&mut rs));
    if std::env::var_os(VERBOSE_ENV).is_some() {
        eprintln!("{}", render_transcript(ls.label(), ls.observations()));
        eprintln!("{}", render_transcript(rs.label(), rs.observations()));
    }
    let mut problems = Vec::new();
    if let Err(diff) =
        compare_observations(ls.label(), ls.observations(), rs.label(), rs.observations())
    {
        problems.push(diff);
    }
    if let Err(e) = lr {
        problems.push(format!("absolute check failed on {}: {e:#}", ls.label()));
    }
    if let Err(e) = rr {
        problems.push(format!("absolute check failed on {}: {e:#}", rs.label()));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "differential scenario `{name}` failed:\n{}",
            problems.join("\n\n")
        )
    }
}
