//! etcd's Lease service: grants and revokes go through Raft; keepalives and time-to-live are
//! answered by the leader's lessor (etcd's `v3rpc/lease.go` + `LeaseGrant`/`LeaseRenew` of
//! `v3_server.go`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fetcd_proto::etcdserverpb::lease_server::Lease;
use fetcd_proto::etcdserverpb::LeaseCheckpoint;
use fetcd_proto::etcdserverpb::LeaseCheckpointRequest;
use fetcd_proto::etcdserverpb::LeaseGrantRequest;
use fetcd_proto::etcdserverpb::LeaseGrantResponse;
use fetcd_proto::etcdserverpb::LeaseKeepAliveRequest;
use fetcd_proto::etcdserverpb::LeaseKeepAliveResponse;
use fetcd_proto::etcdserverpb::LeaseLeasesRequest;
use fetcd_proto::etcdserverpb::LeaseLeasesResponse;
use fetcd_proto::etcdserverpb::LeaseRevokeRequest;
use fetcd_proto::etcdserverpb::LeaseRevokeResponse;
use fetcd_proto::etcdserverpb::LeaseStatus;
use fetcd_proto::etcdserverpb::LeaseTimeToLiveRequest;
use fetcd_proto::etcdserverpb::LeaseTimeToLiveResponse;
use fetcd_proto::etcdserverpb::ResponseHeader;
use fetcd_proto::raftpb::internal_raft_request::Request;
use fetcd_proto::raftpb::lease_peer_client::LeasePeerClient;
use fetcd_proto::raftpb::lease_peer_server::LeasePeer;
use fetcd_proto::status as msg;
use fetcd_storage::WriteResponse;
use fetcd_storage::MAX_LEASE_TTL;
use futures::Stream;
use futures::StreamExt;
use tonic::transport::Channel;
use tonic::Request as GrpcRequest;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;

use crate::lessor::Renewal;
use crate::node::EtcdNode;

/// How long a lease request waits for this member to become the primary lessor (a fresh leader
/// promotes once it has applied the log of earlier terms).
const PRIMARY_WAIT: Duration = Duration::from_secs(5);

/// The Lease service of one member.
#[derive(Debug, Clone)]
pub struct LeaseService {
    node: Arc<EtcdNode>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl LeaseService {
    /// A Lease service over `node`; keepalive streams end when `stop` turns true.
    pub fn new(node: Arc<EtcdNode>, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        LeaseService { node, stop }
    }
}

fn unexpected(what: &str) -> Status {
    Status::internal(format!("etcdserver: unexpected answer to {what}"))
}

fn not_primary() -> Status {
    Status::unavailable(msg::ERR_NO_LEADER)
}

/// Where a request only the primary lessor can answer goes.
enum Route {
    /// This member is the primary lessor.
    Local,
    /// Another member leads: its peer port.
    Leader(LeasePeerClient<Channel>),
}

/// Finds the primary lessor: this member, or the leader over the peer port (waiting a bounded
/// time through an election or a fresh leader's promotion).
async fn route(node: &EtcdNode) -> Result<Route, Status> {
    let deadline = tokio::time::Instant::now() + PRIMARY_WAIT;
    loop {
        if node.lessor().is_primary() {
            return Ok(Route::Local);
        }
        if let Some((_, channel)) = node.raft().leader_channel() {
            return Ok(Route::Leader(LeasePeerClient::new(channel)));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(not_primary());
        }
        node.lessor().wait_primary(Duration::from_millis(50)).await;
    }
}

/// One keepalive (etcd's `LeaseRenew`), wherever the primary lessor is.
async fn renew(node: &EtcdNode, id: i64) -> Result<i64, Status> {
    match route(node).await? {
        Route::Local => renew_local(node, id).await,
        Route::Leader(mut c) => Ok(c
            .renew(LeaseKeepAliveRequest { id })
            .await?
            .into_inner()
            .ttl),
    }
}

/// One keepalive on the primary lessor: the TTL granted, or 0 if the lease is gone.
async fn renew_local(node: &EtcdNode, id: i64) -> Result<i64, Status> {
    let lessor = node.lessor();
    loop {
        if !lessor.is_primary() {
            return Err(not_primary());
        }
        let lease = node.store().lease(id);
        match lessor.renew(id, lease.as_ref()) {
            Renewal::Renewed {
                ttl,
                clear_checkpoint,
            } => {
                if clear_checkpoint {
                    // A new leader must not trust a countdown older than this keepalive.
                    let req = LeaseCheckpointRequest {
                        checkpoints: vec![LeaseCheckpoint {
                            id,
                            remaining_ttl: 0,
                        }],
                    };
                    node.write(Request::LeaseCheckpoint(req)).await?;
                }
                return Ok(ttl);
            }
            Renewal::NotFound => return Ok(0),
            Renewal::NotPrimary => return Err(not_primary()),
            Renewal::Expired => {
                // An expired lease is being revoked; like etcd, answer once the revoke is done.
                lessor.wait_revoked(Duration::from_millis(500)).await;
                if node.store().lease(id).is_none() {
                    return Ok(0);
                }
            }
        }
    }
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn lease_grant(
        &self,
        req: GrpcRequest<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let mut r = req.into_inner();
        if r.ttl > MAX_LEASE_TTL {
            return Err(Status::out_of_range(msg::ERR_LEASE_TTL_TOO_LARGE));
        }
        let lessor = self.node.lessor();
        // Decided before proposing, so every member applies the same ID and TTL.
        r.ttl = r.ttl.max(lessor.min_ttl());
        if r.id == 0 {
            r.id = lessor.next_id();
        }
        let (id, ttl) = (r.id, r.ttl);
        match self.node.write(Request::LeaseGrant(r)).await? {
            WriteResponse::LeaseGrant(mut resp) => {
                lessor.granted(id, ttl);
                self.node.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("LeaseGrant")),
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn lease_revoke(
        &self,
        req: GrpcRequest<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let r = req.into_inner();
        let id = r.id;
        match self.node.write(Request::LeaseRevoke(r)).await? {
            WriteResponse::LeaseRevoke(mut resp) => {
                self.node.lessor().forget(id);
                self.node.fill_header(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected("LeaseRevoke")),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    #[tracing::instrument(level = "debug", skip_all)]
    async fn lease_keep_alive(
        &self,
        req: GrpcRequest<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let node = self.node.clone();
        let mut stop = self.stop.clone();
        let requests = req.into_inner();
        // Answers in request order, one at a time per stream, as etcd's recvLoop does.
        let out = requests
            .then(move |r| {
                let node = node.clone();
                async move {
                    let r = r?;
                    let ttl = renew(&node, r.id).await?;
                    let mut resp = LeaseKeepAliveResponse {
                        header: None,
                        id: r.id,
                        ttl,
                    };
                    node.fill_header(&mut resp.header);
                    Ok(resp)
                }
            })
            // etcd ends the stream at the first error.
            .scan(
                false,
                |failed, r: Result<LeaseKeepAliveResponse, Status>| {
                    let item = if *failed { None } else { Some(r) };
                    if let Some(Err(_)) = &item {
                        *failed = true;
                    }
                    futures::future::ready(item)
                },
            )
            // A stopping server ends its streams, so graceful shutdown does not wait on clients.
            .take_until(async move {
                let _ = stop.wait_for(|s| *s).await;
            });
        Ok(Response::new(Box::pin(out)))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn lease_time_to_live(
        &self,
        req: GrpcRequest<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let r = req.into_inner();
        let mut resp = match route(&self.node).await? {
            Route::Local => time_to_live_local(&self.node, &r),
            Route::Leader(mut c) => c.time_to_live(r).await?.into_inner(),
        };
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn lease_leases(
        &self,
        req: GrpcRequest<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let mut resp = match route(&self.node).await? {
            Route::Local => leases_local(&self.node),
            Route::Leader(mut c) => c.leases(req.into_inner()).await?.into_inner(),
        };
        self.node.fill_header(&mut resp.header);
        Ok(Response::new(resp))
    }
}

/// LeaseTimeToLive on the primary lessor (the remaining time is its deadline).
fn time_to_live_local(node: &EtcdNode, r: &LeaseTimeToLiveRequest) -> LeaseTimeToLiveResponse {
    match node.store().lease(r.id) {
        // etcd answers an unknown lease with TTL -1, not an error.
        None => LeaseTimeToLiveResponse {
            id: r.id,
            ttl: -1,
            ..Default::default()
        },
        Some(l) => LeaseTimeToLiveResponse {
            header: None,
            id: l.id,
            ttl: node
                .lessor()
                .remaining(l.id)
                .map_or(l.ttl, |d| d.as_secs() as i64),
            granted_ttl: l.ttl,
            keys: if r.keys {
                node.store().lease_keys(l.id)
            } else {
                Vec::new()
            },
        },
    }
}

/// LeaseLeases on the primary lessor: soonest-expiring first, as etcd lists them.
fn leases_local(node: &EtcdNode) -> LeaseLeasesResponse {
    let lessor = node.lessor();
    let mut leases: Vec<(Duration, i64)> = node
        .store()
        .leases()
        .into_iter()
        .map(|l| (lessor.remaining(l.id).unwrap_or(Duration::MAX), l.id))
        .collect();
    leases.sort();
    LeaseLeasesResponse {
        header: None,
        leases: leases
            .into_iter()
            .map(|(_, id)| LeaseStatus { id })
            .collect(),
    }
}

/// The leader's side of lease requests forwarded by followers.
#[derive(Debug, Clone)]
pub struct LeasePeerService {
    node: Arc<EtcdNode>,
}

impl LeasePeerService {
    /// The peer-port lease service of `node`.
    pub fn new(node: Arc<EtcdNode>) -> Self {
        LeasePeerService { node }
    }

    /// A follower may ask a fresh leader before its lessor is promoted (it first applies the log
    /// of earlier terms): wait for that, bounded.
    async fn wait_primary(&self) -> Result<(), Status> {
        let lessor = self.node.lessor();
        if lessor.is_primary() || lessor.wait_primary(PRIMARY_WAIT).await {
            Ok(())
        } else {
            Err(not_primary())
        }
    }
}

#[tonic::async_trait]
impl LeasePeer for LeasePeerService {
    async fn renew(
        &self,
        req: GrpcRequest<LeaseKeepAliveRequest>,
    ) -> Result<Response<LeaseKeepAliveResponse>, Status> {
        let id = req.into_inner().id;
        self.wait_primary().await?;
        let ttl = renew_local(&self.node, id).await?;
        Ok(Response::new(LeaseKeepAliveResponse {
            header: None,
            id,
            ttl,
        }))
    }

    async fn time_to_live(
        &self,
        req: GrpcRequest<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        self.wait_primary().await?;
        let mut resp = time_to_live_local(&self.node, req.get_ref());
        resp.header = leader_revision(&self.node);
        Ok(Response::new(resp))
    }

    async fn leases(
        &self,
        _req: GrpcRequest<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.wait_primary().await?;
        let mut resp = leases_local(&self.node);
        resp.header = leader_revision(&self.node);
        Ok(Response::new(resp))
    }
}

/// A header with only the leader's revision, for the answer to a forwarded request. The
/// follower fills in its own ids and term but keeps this revision: the leader has applied every
/// write acknowledged so far, while the follower may not have yet, and a header older than a
/// write the client saw acknowledged would look like time going back.
fn leader_revision(node: &EtcdNode) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision: node.store().current_revision(),
        ..Default::default()
    })
}
