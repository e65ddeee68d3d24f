//! The `fetcd` binary: etcd's flags in, a running member out, clean stop on SIGTERM/SIGINT.
//!
//! `fetcd snapshot restore <file> [--data-dir DIR] [--name NAME] ...` turns a snapshot taken with
//! `etcdctl snapshot save` (against fetcd) into a new data directory; see
//! `fetcd_server::snapshot`.

use anyhow::Context;
use clap::Parser;
use fetcd_server::Config;
use fetcd_server::EtcdServer;

/// jemalloc for the binary: glibc's malloc took ~17 % of fetcd's CPU under 64 writers (arena
/// consolidation on the many short-lived request buffers); jemalloc cut the CPU per put by about
/// a quarter at the same RSS. Embedders pick their own allocator.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn init_tracing(level: &str) {
    // etcd's levels mapped onto tracing's; `panic`/`fatal` only show errors.
    let level = match level {
        "debug" => "debug",
        "info" => "info",
        "warn" => "warn",
        "error" | "dpanic" | "panic" | "fatal" => "error",
        other => other,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},openraft=warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => { r.context("wait for SIGINT")?; Ok("SIGINT") }
        _ = term.recv() => Ok("SIGTERM"),
    }
}

/// `fetcd snapshot ...`.
#[derive(Debug, Parser)]
#[command(name = "fetcd snapshot", about = "Restore fetcd snapshots")]
struct SnapshotCli {
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SnapshotCommand {
    /// Restores a snapshot file into a new data directory (which must not exist). The restored
    /// member bootstraps a new cluster from the flags it is started with.
    Restore(RestoreArgs),
}

#[derive(Debug, clap::Args)]
struct RestoreArgs {
    /// The snapshot file (`etcdctl snapshot save` output).
    file: std::path::PathBuf,
    /// Path to the data directory to create (default: `<name>.fetcd`).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// Human-readable name for this member.
    #[arg(long, default_value = "default")]
    name: String,
    /// Accepted like etcdctl's: fetcd takes membership from the flags it starts with.
    #[arg(long)]
    initial_cluster: Option<String>,
    /// Accepted like etcdctl's: fetcd takes membership from the flags it starts with.
    #[arg(long)]
    initial_cluster_token: Option<String>,
    /// Accepted like etcdctl's: fetcd takes membership from the flags it starts with.
    #[arg(long)]
    initial_advertise_peer_urls: Option<String>,
}

fn snapshot_main(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    let cli = SnapshotCli::parse_from(args);
    init_tracing("info");
    match cli.command {
        SnapshotCommand::Restore(a) => {
            let dir = a
                .data_dir
                .unwrap_or_else(|| std::path::PathBuf::from(format!("{}.fetcd", a.name)));
            let r = fetcd_server::snapshot::restore(&a.file, &dir)
                .with_context(|| format!("restore {}", a.file.display()))?;
            tracing::info!(
                path = %a.file.display(),
                data_dir = %dir.display(),
                revision = r.revision,
                leases = r.leases,
                "restored snapshot"
            );
            Ok(())
        }
    }
}

/// The runtime, without tokio's LIFO slot. With it, a task woken by another runs right after it:
/// when a Raft batch answers its requests, each request task queues its response and wakes its
/// connection, which then runs at once and writes that one response. Without it the connection
/// runs after the other answered requests and writes them together: one `writev` per connection
/// per batch instead of one per response (4x fewer under 64 writers; server CPU per put about
/// 15 % lower). Needs `--cfg tokio_unstable` (set in `.cargo/config.toml`); a build without it
/// keeps the LIFO slot and behaves the same otherwise.
///
/// The runtime's workers: see [`worker_threads`].
fn main() -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let env = std::env::var(WORKER_THREADS_ENV).ok();
    let workers = worker_threads(cores, env.as_deref())?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.worker_threads(workers);
    rt.enable_all();
    #[cfg(tokio_unstable)]
    rt.disable_lifo_slot();
    rt.build()
        .context("starting the tokio runtime")?
        .block_on(async_main())
}

/// The variable tokio itself reads for its worker count; fetcd keeps that meaning.
const WORKER_THREADS_ENV: &str = "TOKIO_WORKER_THREADS";

/// One tokio worker fewer than the machine has cores (at least one), unless
/// `TOKIO_WORKER_THREADS` sets the count. fetcd's busiest threads are not all workers: the
/// persister writes every applied revision into sled (about a fifth of a put's CPU), and the
/// kernel's network and disk work runs on the same cores. With a worker on every core, workers
/// were preempted mid-request and woke each other across cores; on two cores shared with the
/// bench client, one worker instead of two gave ~12 % more puts and ~35 % more ranges per second
/// at 15–22 % less server CPU per request (docs/benchmarks.md). On large machines the one core
/// held back is small change.
fn worker_threads(cores: usize, env: Option<&str>) -> anyhow::Result<usize> {
    match env {
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => anyhow::bail!("{WORKER_THREADS_ENV} must be a positive integer, not {v:?}"),
        },
        None => Ok(cores.saturating_sub(1).max(1)),
    }
}

async fn async_main() -> anyhow::Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "snapshot") {
        return snapshot_main(args.into_iter().skip(1).collect());
    }
    let config = Config::parse_from(args);
    init_tracing(&config.log_level);
    tracing::info!(name = %config.name, data_dir = %config.data_dir().display(), "starting fetcd");
    let server = EtcdServer::start(config).await.context("start fetcd")?;
    for url in server.client_urls() {
        tracing::info!(%url, "ready to serve client requests");
    }
    let sig = wait_for_signal().await?;
    tracing::info!(signal = sig, "shutting down");
    server.shutdown().await.context("shut down fetcd")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::worker_threads;

    #[test]
    fn one_core_is_left_to_the_persister_and_the_kernel() -> anyhow::Result<()> {
        assert_eq!(worker_threads(1, None)?, 1);
        assert_eq!(worker_threads(2, None)?, 1);
        assert_eq!(worker_threads(16, None)?, 15);
        Ok(())
    }

    #[test]
    fn tokio_worker_threads_overrides_and_must_be_a_count() -> anyhow::Result<()> {
        assert_eq!(worker_threads(2, Some("2"))?, 2);
        assert_eq!(worker_threads(16, Some(" 4 "))?, 4);
        for bad in ["0", "", "two", "-1"] {
            let err = worker_threads(2, Some(bad)).expect_err(bad).to_string();
            assert!(err.contains("TOKIO_WORKER_THREADS"), "{bad}: {err}");
        }
        Ok(())
    }
}
