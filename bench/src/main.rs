//! `fetcd-bench`: drives an etcd v3 endpoint with the third-party `etcd-client` crate (the watch
//! workloads read their streams on tonic's channel, decoding only the fields they check), so fetcd
//! and etcd are measured by the same client. Workloads and flags follow etcd's `benchmark` tool
//! where it has them, plus `kube`, a replay of kube-apiserver's request mix. `--compare` starts
//! real etcd and fetcd with the same topology and runs the workloads against both.

mod args;
mod chart;
mod compare;
mod driver;
mod grpc_stream;
mod stats;
mod workloads;

use clap::Parser;

use crate::args::Args;
use crate::driver::Ui;

/// jemalloc, as in the server: with glibc's malloc the client spent ~7 % of its CPU in
/// malloc/free, and on a 2-core machine every cycle the client burns is taken from the server
/// under test (both sides of a comparison run against this same client).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = if args.client_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(args.client_threads))
            .enable_all()
            .build()?
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.compare || args.list_cases {
        return compare::run(&args).await;
    }
    let ui = Ui {
        progress: !args.json,
        label: String::new(),
    };
    let report = workloads::run(&args, &ui).await?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.render_text());
    }
    Ok(())
}
