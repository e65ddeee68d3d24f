//! fetcd's server: the etcd v3 gRPC services over one Raft member, as a library.
//!
//! The `fetcd` binary is a thin shell over [`EtcdServer`]; tests and embedding programs start the
//! same server in-process:
//!
//! ```no_run
//! # async fn demo() -> Result<(), fetcd_server::Error> {
//! let dir = std::path::PathBuf::from("/tmp/fetcd-demo");
//! let server = fetcd_server::EtcdServer::start(fetcd_server::Config::for_test(dir)).await?;
//! println!("serving etcd v3 at {}", server.client_url());
//! server.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Data path: client → [`services`] (validation, error table, headers) → `fetcd-raft` (proposal,
//! log, apply) → `fetcd-storage` (MVCC on sled).

pub mod authority;
pub mod auto_compaction;
pub mod config;
pub mod corrupt;
pub mod http;
pub mod idle_spin;
pub mod learner;
pub mod lessor;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod quota;
pub mod services;
pub mod snapshot;
pub mod status;
pub mod validate;
pub mod version;

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::Config;
use fetcd_proto::etcdserverpb::auth_server::AuthServer;
use fetcd_proto::etcdserverpb::cluster_server::ClusterServer;
use fetcd_proto::etcdserverpb::lease_server::LeaseServer;
use fetcd_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use fetcd_proto::etcdserverpb::Member;
use fetcd_proto::wire::kv_server::KVServer as KvServer;
use fetcd_proto::wire::watch_server::WatchServer;
use fetcd_raft::coalesce::CoalescedWrites;
use fetcd_raft::RaftNode;
use fetcd_raft::RaftNodeConfig;
pub use node::EtcdNode;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;

use crate::lessor::Lessor;
use crate::services::cluster::ClusterService;
use crate::services::kv::KvService;
use crate::services::lease::LeasePeerService;
use crate::services::lease::LeaseService;
use crate::services::maintenance::MaintenancePeerService;
use crate::services::maintenance::MaintenanceService;
use crate::services::unimplemented::Unimplemented;
use crate::services::watch::WatchService;
use fetcd_proto::raftpb::lease_peer_server::LeasePeerServer;
use fetcd_proto::raftpb::maintenance_peer_server::MaintenancePeerServer;

/// gRPC's framing allowance on top of `--max-request-bytes`, as etcd's `grpcOverheadBytes`:
/// requests up to the limit reach the server's own size check and get etcd's error text.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// How long [`EtcdServer::shutdown`] waits for the member's files to be closed.
const FILES_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag combination fetcd cannot honour.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The member's stores or Raft could not be opened.
    #[error("open member: {0}")]
    Open(#[from] fetcd_raft::node::OpenError),
    /// A client URL could not be parsed or bound.
    #[error("listen on {url}: {source}")]
    Listen {
        /// The URL from `--listen-client-urls`.
        url: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A gRPC listener failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// `--experimental-initial-corrupt-check` found this member's data differs from its peers'.
    #[error(transparent)]
    Corrupt(#[from] corrupt::CorruptError),
    /// A server task panicked or was cancelled.
    #[error("server task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A running fetcd member serving clients.
pub struct EtcdServer {
    node: Arc<EtcdNode>,
    client_urls: Vec<String>,
    stop: tokio::sync::watch::Sender<bool>,
    listeners: Vec<JoinHandle<Result<(), tonic::transport::Error>>>,
    lessor_task: JoinHandle<()>,
    peer_server: JoinHandle<Result<(), tonic::transport::Error>>,
    metrics_urls: Vec<String>,
}

impl std::fmt::Debug for EtcdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdServer")
            .field("client_urls", &self.client_urls)
            .finish_non_exhaustive()
    }
}

fn host_port(url: &str) -> Result<&str, std::io::Error> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "only http:// client URLs are supported",
        )
    })?;
    Ok(rest.trim_end_matches('/'))
}

/// Listeners bound before the server starts.
#[derive(Debug, Default)]
pub struct Listeners {
    /// For peer RPCs (`--listen-peer-urls`).
    pub peers: Vec<TcpListener>,
    /// For clients (`--listen-client-urls`).
    pub clients: Vec<TcpListener>,
}

/// Binds each URL's `host:port`.
pub async fn bind_all(urls: &[String]) -> Result<Vec<TcpListener>, Error> {
    let mut out = Vec::new();
    for url in urls {
        let listen_err = |source| Error::Listen {
            url: url.clone(),
            source,
        };
        let addr = host_port(url).map_err(listen_err)?;
        out.push(TcpListener::bind(addr).await.map_err(listen_err)?);
    }
    Ok(out)
}

impl EtcdServer {
    /// Binds every `--listen-peer-urls` and `--listen-client-urls` address (port 0 picks a free
    /// port), then starts as [`EtcdServer::start_with`].
    pub async fn start(config: Config) -> Result<Self, Error> {
        config.validate()?;
        let peers = bind_all(&config.listen_peer_urls).await?;
        let clients = bind_all(&config.listen_client_urls).await?;
        Self::start_with(config, Listeners { peers, clients }).await
    }

    /// Opens the member under `--data-dir` with already bound listeners (tests bind port 0 first
    /// to learn the peer URLs of a cluster), serves peers at once, waits a bounded time for a
    /// leader, and serves clients.
    pub async fn start_with(config: Config, listeners: Listeners) -> Result<Self, Error> {
        config.validate()?;
        let mut rc = RaftNodeConfig::new(config.member_id(), config.data_dir());
        if let Some(u) = config.initial_advertise_peer_urls.first() {
            rc.peer_url = u.clone();
        }
        rc.initial_members = config
            .initial_members()?
            .into_iter()
            .filter_map(|m| m.peer_urls.first().map(|u| (m.id, u.clone())))
            .collect();
        rc.join_existing = config.initial_cluster_state == "existing";
        rc.heartbeat_interval = config.heartbeat();
        rc.election_timeout = config.election();
        rc.snapshot_count = config.snapshot_count;
        rc.snapshot_catchup_entries = config.experimental_snapshot_catchup_entries;
        let raft = RaftNode::open(rc).await?;
        let lessor = Lessor::new(
            raft.id(),
            config.min_lease_ttl(),
            config.election(),
            config.experimental_lease_checkpoint_interval,
        );
        let node = EtcdNode::new(
            raft,
            config.cluster_id(),
            config.max_request_bytes,
            config.max_txn_ops,
            lessor,
        );

        node.quota().set_bytes(config.quota_backend_bytes);
        node.metrics().time_calls(config.metrics == "extensive");
        node.store()
            .set_compaction_pacing(fetcd_storage::CompactionPacing {
                batch_limit: config.experimental_compaction_batch_limit,
                sleep: config.experimental_compaction_sleep_interval,
            });
        idle_spin::start(config.idle_spin);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        // Peers first: electing a leader needs them.
        let peer_server = tokio::spawn(serve_peers(node.clone(), listeners.peers, stop_rx.clone()));
        if let Err(e) = node.raft().wait_for_leader(config.election() * 10).await {
            tracing::warn!(error = %e, "no leader yet; serving anyway, requests fail until one is elected");
        }
        if config.initial_corrupt_check() {
            // Before any client is served, as etcd's: a member with damaged data must not start.
            if let Err(e) = corrupt::check_initial_hash_kv(&node).await {
                let _ = stop.send(true);
                let _ = peer_server.await;
                node.raft().shutdown().await;
                return Err(e.into());
            }
        }
        let lessor_task = tokio::spawn(lessor::run(node.clone(), stop_rx.clone()));
        if !config.experimental_corrupt_check_time.is_zero() {
            tokio::spawn(corrupt::monitor_hash_kv(
                node.clone(),
                config.experimental_corrupt_check_time,
                stop_rx.clone(),
            ));
        }
        if let Ok(Some(policy)) = config.auto_compaction() {
            tokio::spawn(auto_compaction::run(
                node.clone(),
                policy,
                config.auto_compaction_revision_interval,
                stop_rx.clone(),
            ));
        }
        tokio::spawn(metrics::watch_leader(node.clone(), stop_rx.clone()));
        let watch = WatchService::new(
            node.clone(),
            config.experimental_watch_progress_notify_interval,
            // etcd fragments at the same size it accepts: the limit plus gRPC's allowance.
            config.max_request_bytes.saturating_add(GRPC_OVERHEAD_BYTES),
            stop_rx.clone(),
        );
        let cluster = ClusterService::new(node.clone(), config.initial_cluster_token.clone());
        let mut client_urls = Vec::new();
        let mut servers = Vec::new();
        for listener in listeners.clients {
            let local: SocketAddr = listener.local_addr().map_err(|source| Error::Listen {
                url: "client listener".into(),
                source,
            })?;
            client_urls.push(format!("http://{local}"));
            tracing::info!(%local, "serving client requests");
            servers.push(tokio::spawn(serve(
                node.clone(),
                watch.clone(),
                cluster.clone(),
                listener,
                config.max_request_bytes,
                stop_rx.clone(),
            )));
        }
        let mut metrics_urls = Vec::new();
        for listener in bind_all(&config.listen_metrics_urls).await? {
            let local: SocketAddr = listener.local_addr().map_err(|source| Error::Listen {
                url: "metrics listener".into(),
                source,
            })?;
            metrics_urls.push(format!("http://{local}"));
            tracing::info!(%local, "serving /metrics and /health");
            servers.push(tokio::spawn(serve_metrics(
                node.clone(),
                listener,
                stop_rx.clone(),
            )));
        }
        // Like etcd's publish: record this member's name and URLs once there is a leader.
        let mut peer_urls = config.initial_advertise_peer_urls.clone();
        peer_urls.sort();
        let me = Member {
            id: node.raft().id(),
            name: config.name.clone(),
            peer_ur_ls: peer_urls,
            client_ur_ls: if config.advertise_client_urls.is_empty() {
                client_urls.clone()
            } else {
                config.advertise_client_urls.clone()
            },
            is_learner: false,
        };
        tokio::spawn(publish_attributes(node.clone(), me, stop_rx.clone()));
        Ok(EtcdServer {
            node,
            client_urls,
            stop,
            listeners: servers,
            peer_server,
            lessor_task,
            metrics_urls,
        })
    }

    /// Every `--listen-metrics-urls` URL actually bound (with the real port).
    pub fn metrics_urls(&self) -> &[String] {
        &self.metrics_urls
    }

    /// The first client URL actually bound (with the real port).
    pub fn client_url(&self) -> String {
        self.client_urls.first().cloned().unwrap_or_default()
    }

    /// Every client URL actually bound.
    pub fn client_urls(&self) -> &[String] {
        &self.client_urls
    }

    /// The member behind the services.
    pub fn node(&self) -> &Arc<EtcdNode> {
        &self.node
    }

    /// Stops accepting requests, lets in-flight ones finish, stops Raft and flushes the store;
    /// returns once the member's files are closed, so a program embedding fetcd can reopen the
    /// same data dir at once.
    pub async fn shutdown(self) -> Result<(), Error> {
        let _ = self.stop.send(true);
        let mut first_err = None;
        for l in self.listeners {
            match l.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(Error::Transport(e));
                }
                Err(e) => {
                    first_err.get_or_insert(Error::Join(e));
                }
            }
        }
        if let Err(e) = self.lessor_task.await {
            first_err.get_or_insert(Error::Join(e));
        }
        match self.peer_server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(Error::Transport(e));
            }
            Err(e) => {
                first_err.get_or_insert(Error::Join(e));
            }
        }
        self.node.raft().shutdown().await;
        // The files are released by whichever task drops the last handle, a moment after Raft
        // stopped; a caller may reopen the member as soon as this returns.
        let data_dir = self.node.raft().data_dir().to_path_buf();
        drop(self.node);
        let closed =
            tokio::task::spawn_blocking(move || RaftNode::wait_closed(&data_dir, FILES_CLOSE_WAIT))
                .await;
        match closed {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                "member files still open {FILES_CLOSE_WAIT:?} after shutdown; a restart waits for them"
            ),
            Err(e) => {
                first_err.get_or_insert(Error::Join(e));
            }
        }
        tracing::info!("fetcd stopped");
        first_err.map_or(Ok(()), Err)
    }
}

/// Records this member's attributes through Raft unless they are already recorded, retrying
/// until it works or the server stops.
async fn publish_attributes(
    node: Arc<EtcdNode>,
    me: Member,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let recorded = node
            .store()
            .members()
            .map(|ms| {
                ms.iter().any(|m| {
                    m.id == me.id
                        && m.name == me.name
                        && m.peer_ur_ls == me.peer_ur_ls
                        && m.client_ur_ls == me.client_ur_ls
                })
            })
            .unwrap_or(false);
        if recorded {
            return;
        }
        let req = fetcd_proto::raftpb::internal_raft_request::Request::MemberAttributes(
            fetcd_proto::raftpb::MemberAttributes {
                member: Some(me.clone()),
                remove: false,
            },
        );
        match node.write(req).await {
            Ok(_) => {
                tracing::info!(name = %me.name, "published member attributes");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "publishing member attributes; will retry"),
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Accepted connections of `listener`, with Nagle off (small answers must not wait for delayed
/// ACKs: a 40 ms stall).
fn accept_stream(
    listener: TcpListener,
) -> std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send>> {
    Box::pin(TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            if let Err(e) = c.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY");
            }
        }
        conn
    }))
}

/// `--listen-metrics-urls`: the HTTP endpoints only.
async fn serve_metrics(
    node: Arc<EtcdNode>,
    listener: TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(tonic::service::Routes::from(http::router(node)))
        .serve_with_incoming_shutdown(accept_stream(listener), async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

/// Serves the peer port: Raft's RPCs, the lease requests followers hand to the leader, and the
/// hashes members ask of each other.
async fn serve_peers(
    node: Arc<EtcdNode>,
    listeners: Vec<TcpListener>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    if listeners.is_empty() {
        return Ok(());
    }
    let incoming = futures::stream::select_all(listeners.into_iter().map(accept_stream));
    let raft = node.raft().peer_service(stop.clone());
    tonic::transport::Server::builder()
        .layer(idle_spin::IdleSpinLayer)
        .add_service(raft)
        .add_service(LeasePeerServer::new(LeasePeerService::new(node.clone())))
        .add_service(MaintenancePeerServer::new(MaintenancePeerService::new(
            node,
        )))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

async fn serve(
    node: Arc<EtcdNode>,
    watch: WatchService,
    cluster: ClusterService,
    listener: TcpListener,
    max_request_bytes: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let max_recv = max_request_bytes.saturating_add(GRPC_OVERHEAD_BYTES);
    let kv = KvServer::new(KvService::new(node.clone()))
        .max_decoding_message_size(max_recv)
        .max_encoding_message_size(usize::MAX);
    let grpc = tonic::service::Routes::builder()
        .add_service(kv)
        .add_service(
            WatchServer::new(watch)
                .max_decoding_message_size(max_recv)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(LeaseServer::new(LeaseService::new(
            node.clone(),
            stop.clone(),
        )))
        .add_service(ClusterServer::new(cluster))
        .add_service(
            MaintenanceServer::new(MaintenanceService::new(node.clone()))
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(AuthServer::new(Unimplemented))
        .clone()
        .routes();
    // One port for gRPC and etcd's HTTP endpoints, as etcd: HTTP/1 requests and non-gRPC paths
    // reach the HTTP router, gRPC paths the services.
    let routes =
        tonic::service::Routes::from(grpc.into_axum_router().merge(http::router(node.clone())));
    tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(idle_spin::IdleSpinLayer)
        .layer(limits::MaxRecvMsgSizeLayer::new(max_recv))
        .layer(metrics::GrpcMetricsLayer::new(node.clone()))
        .layer(learner::LearnerGateLayer::new(node))
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            accept_stream(listener)
                .map(|c| c.map(|s| authority::AuthorityFix::new(CoalescedWrites::new(s)))),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )
        .await
}
