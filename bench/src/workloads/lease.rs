//! lease-keepalive and lease-grant-revoke, after etcd benchmark's lease workloads.

use std::time::Instant;

use etcd_client::Client;
use etcd_client::LeaseKeepAliveStream;
use etcd_client::LeaseKeeper;

use crate::args::Args;
use crate::args::Workload;
use crate::driver::closed_loop;
use crate::driver::connect_all;
use crate::driver::probe_put;
use crate::driver::ClientOp;
use crate::driver::Ui;
use crate::stats::Recorder;
use crate::stats::Report;

/// A client with one lease and its keepalive stream; every op is one request answered.
struct KeepAliveOp {
    client: Client,
    ttl: i64,
    stream: Result<(LeaseKeeper, LeaseKeepAliveStream), String>,
}

impl ClientOp for KeepAliveOp {
    async fn setup(&mut self) {
        let r = async {
            let lease = self.client.lease_grant(self.ttl, None).await?;
            self.client.lease_keep_alive(lease.id()).await
        }
        .await;
        self.stream = r.map_err(|e| format!("grant + open keepalive stream: {e}"));
    }

    async fn op(&mut self, _i: u64, _rec: &mut Recorder) -> anyhow::Result<()> {
        let (keeper, stream) = self.stream.as_mut().map_err(|e| anyhow::anyhow!("{e}"))?;
        keeper.keep_alive().await?;
        match stream.message().await? {
            Some(r) if r.ttl() > 0 => Ok(()),
            Some(_) => anyhow::bail!("lease {} expired", keeper.id()),
            None => anyhow::bail!("keepalive stream closed by the server"),
        }
    }
}

struct GrantRevokeOp {
    client: Client,
    ttl: i64,
}

impl ClientOp for GrantRevokeOp {
    async fn op(&mut self, _i: u64, rec: &mut Recorder) -> anyhow::Result<()> {
        let t = Instant::now();
        let g = self.client.lease_grant(self.ttl, None).await;
        rec.kind("grant", t.elapsed(), g.is_ok());
        let id = g?.id();
        let t = Instant::now();
        let r = self.client.lease_revoke(id).await;
        rec.kind("revoke", t.elapsed(), r.is_ok());
        r?;
        Ok(())
    }
}

pub(crate) async fn run(args: &Args, workload: Workload, ui: &Ui) -> anyhow::Result<Report> {
    let conns = connect_all(&args.endpoints, args.conns).await?;
    let n = args.clients.max(1);
    let conn = |c: usize| conns[c % conns.len()].clone();
    let name = workload.name();
    let pb = ui.bar(args.total, &name);
    let (rec, elapsed) = match workload {
        Workload::LeaseKeepalive => {
            let clients = (0..n)
                .map(|c| KeepAliveOp {
                    client: conn(c),
                    ttl: args.lease_ttl,
                    stream: Err("not set up".into()),
                })
                .collect();
            let r = closed_loop(clients, args.total, args.rate, &pb).await?;
            // Revoke what we granted so repeated runs do not pile leases up on the server.
            for mut c in r.clients {
                if let Ok((k, _)) = &c.stream {
                    let _ = c.client.lease_revoke(k.id()).await;
                }
            }
            (r.rec, r.elapsed)
        }
        Workload::LeaseGrantRevoke => {
            let clients = (0..n)
                .map(|c| GrantRevokeOp {
                    client: conn(c),
                    ttl: args.lease_ttl,
                })
                .collect();
            let r = closed_loop(clients, args.total, args.rate, &pb).await?;
            (r.rec, r.elapsed)
        }
        other => anyhow::bail!("{} is not a lease workload", other.name()),
    };
    pb.finish_and_clear();
    Ok(Report::from_recorder(
        name,
        n,
        args.total,
        elapsed.as_secs_f64(),
        rec,
    ))
}

/// `lease-expiry`: grant `--total` leases with one key each, let them all expire while one
/// writer keeps putting, and measure the writer's latency and when the last key was gone.
pub(crate) async fn expiry(args: &Args, ui: &Ui) -> anyhow::Result<Report> {
    use anyhow::Context;
    use etcd_client::GetOptions;
    use etcd_client::PutOptions;
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    let conns = connect_all(&args.endpoints, args.conns).await?;
    let prefix = "fetcd-bench/lease-expiry/";
    let total = args.total;
    let pb = ui.bar(total, "lease-expiry: grant");
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let grants_started = Instant::now();
    for c in 0..args.clients.max(1) {
        let mut client = conns[c % conns.len()].clone();
        let next = next.clone();
        let ttl = args.lease_ttl;
        let pb = pb.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(());
                }
                let lease = client.lease_grant(ttl, None).await?.id();
                client
                    .put(
                        format!("{prefix}{i:08}"),
                        "v",
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await?;
                pb.inc(1);
            }
        }));
    }
    for t in tasks {
        t.await.context("grant task")??;
    }
    pb.finish_and_clear();
    // The earliest any lease can expire, and the latest by its TTL.
    let deadline = grants_started + Duration::from_secs(args.lease_ttl.max(0) as u64);
    let mut writer = conns[0].clone();
    let mut watcher = conns[conns.len() - 1].clone();
    let mut rec = Recorder::default();
    let started = Instant::now();
    let mut gone_at = None;
    let mut last_count_check = Instant::now() - Duration::from_secs(1);
    let give_up = Instant::now() + Duration::from_secs(args.lease_ttl.max(0) as u64 + 120);
    let mut i = 0u64;
    while Instant::now() < give_up {
        probe_put(&mut writer, "fetcd-bench/lease-expiry-probe", i, &mut rec).await;
        i += 1;
        if last_count_check.elapsed() >= Duration::from_millis(100) {
            last_count_check = Instant::now();
            let n = watcher
                .get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await?
                .count();
            if n == 0 {
                gone_at = Some(Instant::now());
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    let mut report = Report::from_recorder("lease-expiry".into(), 1, i, elapsed.as_secs_f64(), rec);
    match gone_at {
        Some(at) => {
            let late = at.saturating_duration_since(deadline).as_secs_f64();
            report.extra.insert("leases".into(), total.into());
            report
                .extra
                .insert("all_gone_after_deadline_s".into(), late.into());
            report.note = Some(format!(
                "{total} leases: last key gone {late:.2} s after the TTL deadline; \
                 writer max latency {:.1} ms",
                report.latency.max_ms()
            ));
        }
        None => anyhow::bail!("leased keys still present {give_up:?} after the deadline"),
    }
    Ok(report)
}
