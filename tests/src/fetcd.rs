//! In-process fetcd glue (cargo feature `fetcd`).
//!
//! Uses the embedding API of `fetcd_server`:
//! `Config::for_test(data_dir)` (listens on `http://127.0.0.1:0`), `EtcdServer::start(config)`,
//! `EtcdServer::client_url()`, `EtcdServer::shutdown()`.

use anyhow::{anyhow, Context};
use clap::Parser;
use etcd_client::Client;
use fetcd_server::{Config, EtcdServer};
use tempfile::TempDir;

/// A fetcd server running inside the test process, with its own temporary data directory.
pub struct FetcdInstance {
    // `Option` so that `stop(self)` can move the server out; dropped before `dir`.
    server: Option<EtcdServer>,
    client_url: String,
    dir: TempDir,
}

/// Starts fetcd on a free loopback port (port 0) in a fresh temp dir and waits (bounded) until
/// it serves a linearizable read.
pub async fn start_fetcd() -> anyhow::Result<FetcdInstance> {
    start_fetcd_with_flags(&[]).await
}

/// Like [`start_fetcd`], with extra etcd-style flags (parsed as the `fetcd` binary would).
pub async fn start_fetcd_with_flags(flags: &[&str]) -> anyhow::Result<FetcdInstance> {
    let dir = tempfile::Builder::new()
        .prefix("fetcd-tests-fetcd-")
        .tempdir()
        .context("creating fetcd temp dir")?;
    let mut config = Config::for_test(dir.path().join("data"));
    if !flags.is_empty() {
        let for_test = config;
        config = Config::try_parse_from(std::iter::once("fetcd").chain(flags.iter().copied()))
            .map_err(|e| anyhow!("fetcd flags {flags:?}: {e}"))?;
        config.data_dir = for_test.data_dir;
        config.listen_client_urls = for_test.listen_client_urls;
        config.advertise_client_urls = for_test.advertise_client_urls;
        // Never the default :2380, which another server on the machine may hold.
        if !flags.iter().any(|f| f.starts_with("--listen-peer-urls")) {
            config.listen_peer_urls = for_test.listen_peer_urls;
        }
    }
    let server = EtcdServer::start(config)
        .await
        .map_err(|e| anyhow!("fetcd failed to start: {e}"))?;
    let client_url = server.client_url();
    let instance = FetcdInstance {
        server: Some(server),
        client_url,
        dir,
    };
    crate::etcd::wait_until_serving(&instance.client_url).await?;
    Ok(instance)
}

impl FetcdInstance {
    /// e.g. `http://127.0.0.1:41234` (the actually bound port).
    pub fn client_url(&self) -> String {
        self.client_url.clone()
    }

    pub fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// A client connected to this server.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        crate::etcd::connect(&self.client_url).await
    }

    /// Graceful shutdown.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(server) = self.server.take() {
            server
                .shutdown()
                .await
                .map_err(|e| anyhow!("fetcd shutdown failed: {e}"))?;
        }
        Ok(())
    }
}
