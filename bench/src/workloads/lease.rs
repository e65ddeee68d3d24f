//! lease-keepalive and lease-grant-revoke, after etcd benchmark's lease workloads.

use std::time::Instant;

use etcd_client::Client;
use etcd_client::LeaseKeepAliveStream;
use etcd_client::LeaseKeeper;

use crate::args::Args;
use crate::args::Workload;
use crate::driver::closed_loop;
use crate::driver::connect_all;
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
