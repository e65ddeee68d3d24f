//! The `fetcd` binary: etcd's flags in, a running member out, clean stop on SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use fetcd_server::Config;
use fetcd_server::EtcdServer;

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
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
