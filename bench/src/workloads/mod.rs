//! The workloads: each connects, runs and returns a `Report`; printing is the caller's.

pub(crate) mod kube;
pub(crate) mod kv;
pub(crate) mod lease;
pub(crate) mod watch;

use crate::args::Args;
use crate::args::Workload;
use crate::driver::Ui;
use crate::stats::Report;

/// Runs the workload `args` names against `args.endpoints`.
pub(crate) async fn run(args: &Args, ui: &Ui) -> anyhow::Result<Report> {
    let Some(w) = args.workload else {
        anyhow::bail!("no workload given");
    };
    match w {
        Workload::Put | Workload::Range | Workload::TxnPut | Workload::TxnMixed => {
            kv::run(args, w, ui).await
        }
        Workload::Watch | Workload::WatchLatency => watch::run(args, ui).await,
        Workload::LeaseKeepalive | Workload::LeaseGrantRevoke => lease::run(args, w, ui).await,
        Workload::LeaseExpiry => lease::expiry(args, ui).await,
        Workload::ListStall => kv::list_stall(args, ui).await,
        Workload::Kube => kube::run(args, ui).await,
    }
}
