//! The peer network: openraft's RPCs, write forwarding and read-index requests between members,
//! over the tonic `RaftPeer` service on each member's peer URL (never on the client port).
//!
//! Payloads are openraft's own serde types, bincode-encoded inside `PeerMessage.data`; the peer
//! protocol is private to fetcd members of one version. Each peer gets one lazily connected
//! HTTP/2 channel, shared by replication, voting, forwarding and read-index traffic. A peer that
//! cannot be reached is reported `Unreachable`, and openraft backs off before trying it again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use fetcd_proto::raftpb::peer_call;
use fetcd_proto::raftpb::raft_peer_client::RaftPeerClient;
use fetcd_proto::raftpb::raft_peer_server::RaftPeer;
use fetcd_proto::raftpb::raft_peer_server::RaftPeerServer;
use fetcd_proto::raftpb::InternalRaftBatch;
use fetcd_proto::raftpb::PeerCall;
use fetcd_proto::raftpb::PeerMessage;
use openraft::error::ClientWriteError;
use openraft::error::InstallSnapshotError;
use openraft::error::NetworkError;
use openraft::error::RPCError;
use openraft::error::RaftError;
use openraft::error::RemoteError;
use openraft::error::Timeout;
use openraft::error::Unreachable;
use openraft::network::Backoff;
use openraft::network::RPCOption;
use openraft::network::RPCTypes;
use openraft::network::RaftNetwork;
use openraft::network::RaftNetworkFactory;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::InstallSnapshotRequest;
use openraft::raft::InstallSnapshotResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde::Serialize;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use crate::calls::CallConn;
use crate::calls::LeaderRequest;
use crate::coalesce::EndStreamWithData;
use crate::coalesce::RequestConnector;
use crate::durable::Durability;
use crate::metrics::PeerMetrics;
use crate::read_index::LeaderAcks;
use crate::read_index::ReadIndex;
use crate::read_index::ReadIndexAsk;

use crate::command::Command;
use crate::command::CommandResponse;
use crate::membership::MembershipChange;
use crate::membership::MembershipError;
use crate::transfer::Pauses;
use crate::transfer::StepError;
use crate::transfer::TransferStep;
use crate::typ;
use crate::NodeId;
use crate::TypeConfig;

/// Peer messages carry whole Raft entries (a batch may be several MiB) and snapshot chunks.
const MAX_PEER_MESSAGE: usize = 1 << 30;
/// How long connecting to a peer may take before the RPC counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Why a forwarded write or a read-index request failed on the member that got it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum PeerError {
    /// The member asked is not the leader (any more); it names the one it knows of.
    #[error("not leader; leader is {0:?}")]
    NotLeader(Option<NodeId>),
    /// The member could not confirm its leadership with a quorum.
    #[error("quorum not reachable")]
    NoQuorum,
    /// The member is stopping or hit a fatal error.
    #[error("stopped: {0}")]
    Stopped(String),
}

/// Why a peer request did not get an answer from the peer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer's URL is unusable.
    #[error("bad peer URL {0}: {1}")]
    BadUrl(String, String),
    /// The peer did not answer (connection refused, reset, timeout).
    #[error("peer unreachable: {0}")]
    Unreachable(tonic::Status),
    /// The request could not be encoded, or the peer's answer decoded.
    #[error("peer message (de)serialization: {0}")]
    Codec(#[from] bincode::Error),
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Result<PeerMessage, tonic::Status> {
    bincode::serialize(v)
        .map(|data| PeerMessage { data })
        .map_err(|e| tonic::Status::internal(format!("encode peer message: {e}")))
}

pub(crate) fn decode<T: DeserializeOwned>(m: &PeerMessage) -> Result<T, bincode::Error> {
    bincode::deserialize(&m.data)
}

/// Connections to peers, shared by every user of the member's network.
#[derive(Clone, Debug)]
pub struct Network {
    id: NodeId,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// How far this member's Raft log is durable: a commit index leaves only once it is.
    log_durability: Arc<Durability>,
    /// The followers' answers, as leadership confirmations for read indexes.
    acks: Arc<LeaderAcks>,
    /// Per peer URL: the open `CallStream` to it, or `None` if it has none (an older fetcd).
    calls: Arc<Mutex<HashMap<String, Option<Arc<CallConn>>>>>,
    /// Held while a `CallStream` opens: one per peer.
    opening_calls: Arc<tokio::sync::Mutex<()>>,
}

impl Network {
    /// The network of member `id`, whose Raft log's durability is `log_durability`.
    pub fn new(id: NodeId, log_durability: Arc<Durability>) -> Self {
        Network {
            id,
            channels: Arc::default(),
            log_durability,
            acks: Arc::default(),
            calls: Arc::default(),
            opening_calls: Arc::default(),
        }
    }

    /// The followers' answers to this member's AppendEntries, as leadership confirmations.
    pub fn acks(&self) -> &Arc<LeaderAcks> {
        &self.acks
    }

    /// The channel to the peer at `addr` (its peer URL), created lazily and then shared.
    pub fn channel(&self, addr: &str) -> Result<Channel, TransportError> {
        self.check_link(addr)?;
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        Ok(match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = Endpoint::from_shared(addr.to_string())
                    .map_err(|e| TransportError::BadUrl(addr.into(), e.to_string()))?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .connect_with_connector_lazy(RequestConnector);
                channels.insert(addr.to_string(), c.clone());
                c
            }
        })
    }

    /// Fails if a test cut the link to `addr` (`fault-injection` feature; always `Ok` without).
    pub(crate) fn check_link(&self, addr: &str) -> Result<(), TransportError> {
        #[cfg(feature = "fault-injection")]
        if crate::fault::get(self.id, addr) == Some(crate::fault::Fault::Cut) {
            return Err(TransportError::Unreachable(tonic::Status::unavailable(
                "fault injection: link cut",
            )));
        }
        #[cfg(not(feature = "fault-injection"))]
        let _ = addr;
        Ok(())
    }

    /// Waits out the test-only delay on the link to `addr`, if one is set (a cut is applied
    /// by [`channel`](Self::channel)); nothing without the `fault-injection` feature.
    pub(crate) async fn delay(&self, addr: &str) {
        #[cfg(feature = "fault-injection")]
        if let Some(crate::fault::Fault::Delay(d)) = crate::fault::get(self.id, addr) {
            tokio::time::sleep(d).await;
        }
        #[cfg(not(feature = "fault-injection"))]
        let _ = addr;
    }

    /// A Raft peer client for the peer at `addr`.
    pub fn client(
        &self,
        addr: &str,
    ) -> Result<RaftPeerClient<EndStreamWithData<Channel>>, TransportError> {
        let channel = self.channel(addr)?;
        Ok(RaftPeerClient::new(EndStreamWithData(channel))
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE))
    }

    /// Sends a batch of client writes to the leader at `addr`; returns the entry's log index and
    /// the state machine's answers, or the leader's refusal.
    pub async fn forward(
        &self,
        addr: &str,
        batch: InternalRaftBatch,
    ) -> Result<Result<(u64, CommandResponse), PeerError>, TransportError> {
        let resp = self
            .leader_call(addr, LeaderRequest::Forward(batch))
            .await?;
        Ok(decode(&resp)?)
    }

    /// Makes `req` of the leader at `addr` on the [`CallConn`] to it, opened if needed, or
    /// unary if it has none (see [`crate::calls`]).
    async fn leader_call(
        &self,
        addr: &str,
        req: LeaderRequest,
    ) -> Result<PeerMessage, TransportError> {
        self.delay(addr).await;
        let mut c = self.client(addr)?;
        let conn = match self.known_calls(addr) {
            Some(known) => known,
            None => self.open_calls(addr, &c).await?,
        };
        let resp = match (conn, req) {
            (Some(conn), req) => conn
                .call(req)
                .await
                .map(|data| PeerMessage { data })
                .map_err(TransportError::Unreachable)?,
            (None, LeaderRequest::Forward(batch)) => c
                .forward(batch)
                .await
                .map_err(TransportError::Unreachable)?
                .into_inner(),
            (None, LeaderRequest::ReadIndex(data)) => c
                .read_index(PeerMessage { data })
                .await
                .map_err(TransportError::Unreachable)?
                .into_inner(),
        };
        Ok(resp)
    }

    /// Asks the leader at `addr` to make a membership change.
    pub async fn change_membership(
        &self,
        addr: &str,
        change: &MembershipChange,
    ) -> Result<Result<(), MembershipError>, TransportError> {
        self.delay(addr).await;
        let mut c = self.client(addr)?;
        let msg = PeerMessage {
            data: bincode::serialize(change)?,
        };
        let resp = c
            .change_membership(msg)
            .await
            .map_err(TransportError::Unreachable)?;
        Ok(decode(resp.get_ref())?)
    }

    /// Sends one leader-transfer step to the member at `addr`.
    pub async fn transfer_step(
        &self,
        addr: &str,
        step: &TransferStep,
    ) -> Result<Result<(), StepError>, TransportError> {
        self.delay(addr).await;
        let mut c = self.client(addr)?;
        let msg = PeerMessage {
            data: bincode::serialize(step)?,
        };
        let resp = c.transfer(msg).await.map_err(TransportError::Unreachable)?;
        Ok(decode(resp.get_ref())?)
    }

    /// What is known of `addr`'s `CallStream`, if it can be used: the open stream, or `None`
    /// if the peer has none. `None` at the outer level: it must be opened (first, or broken).
    fn known_calls(&self, addr: &str) -> Option<Option<Arc<CallConn>>> {
        let calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        match calls.get(addr) {
            Some(Some(conn)) if conn.is_closed() => None,
            known => known.cloned(),
        }
    }

    /// Opens the `CallStream` to `addr` (`None`: the peer has none), once for callers that
    /// found none at the same time.
    async fn open_calls(
        &self,
        addr: &str,
        c: &RaftPeerClient<EndStreamWithData<Channel>>,
    ) -> Result<Option<Arc<CallConn>>, TransportError> {
        let _opening = self.opening_calls.lock().await;
        if let Some(known) = self.known_calls(addr) {
            return Ok(known);
        }
        let opened = match CallConn::open(c.clone()).await {
            Ok(conn) => Some(Arc::new(conn)),
            Err(s) if s.code() == tonic::Code::Unimplemented => None,
            Err(s) => return Err(TransportError::Unreachable(s)),
        };
        let mut calls = self.calls.lock().unwrap_or_else(|p| p.into_inner());
        calls.insert(addr.to_string(), opened.clone());
        Ok(opened)
    }

    /// Asks the leader at `addr` for a read index (it confirms its leadership first, counting
    /// `ask`'s word for it).
    pub async fn read_index(
        &self,
        addr: &str,
        ask: &ReadIndexAsk,
    ) -> Result<Result<u64, PeerError>, TransportError> {
        let ask = bincode::serialize(ask)?;
        let resp = self
            .leader_call(addr, LeaderRequest::ReadIndex(ask))
            .await?;
        Ok(decode(&resp)?)
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            target,
            addr: node.addr.clone(),
            net: self.clone(),
            peer: crate::metrics::peer_metrics(target),
            commit_sent: None,
            acked_last: None,
            answered_here: false,
            stream: None,
            unary_only: false,
        }
    }
}

/// The streaming peer RPCs whose answers come in the order of the requests.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OrderedRpc {
    /// A leader's AppendEntries to a follower (openraft keeps at most one in flight per
    /// follower).
    AppendStream,
    /// A leader's vouch requests ([`crate::vouch`]).
    VouchStream,
}

/// An open [`OrderedRpc`] call: one request at a time, each answered in order.
#[derive(Debug)]
pub(crate) struct OrderedStream {
    tx: futures::channel::mpsc::Sender<PeerMessage>,
    rx: tonic::Streaming<PeerMessage>,
}

impl OrderedStream {
    /// Opens `rpc` to the peer at `addr`.
    pub(crate) async fn open(
        net: &Network,
        addr: &str,
        rpc: OrderedRpc,
    ) -> Result<Self, tonic::Status> {
        let (tx, rx) = futures::channel::mpsc::channel(1);
        let mut c = net
            .client(addr)
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let resp = match rpc {
            OrderedRpc::AppendStream => c.append_stream(rx).await?,
            OrderedRpc::VouchStream => c.vouch_stream(rx).await?,
        };
        Ok(OrderedStream {
            tx,
            rx: resp.into_inner(),
        })
    }

    /// Sends `msg` and reads its answer.
    pub(crate) async fn exchange(
        &mut self,
        msg: PeerMessage,
    ) -> Result<PeerMessage, tonic::Status> {
        use futures::SinkExt;
        self.tx
            .send(msg)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        self.rx
            .message()
            .await?
            .ok_or_else(|| tonic::Status::unavailable("the peer's stream ended"))
    }
}

/// openraft's connection to one peer.
#[derive(Debug)]
pub struct PeerClient {
    target: NodeId,
    addr: String,
    net: Network,
    peer: Arc<PeerMetrics>,
    /// The newest commit index sent to this peer (durable here when it was sent).
    commit_sent: Option<openraft::LogId<NodeId>>,
    /// The last entry this peer is known to hold: that of the newest AppendEntries with entries
    /// it accepted, as long as every RPC since succeeded. `None` on a client that never carried
    /// entries (openraft's leadership checks for reads use clients of their own, and a
    /// replication stream's first RPC has none), after any failure or refusal, and once a
    /// snapshot is sent.
    acked_last: Option<openraft::LogId<NodeId>>,
    /// The previous empty AppendEntries was answered here without being sent
    /// ([`PeerClient::answer_here`]).
    answered_here: bool,
    /// The AppendEntries stream to the peer, opened by the first AppendEntries with entries.
    stream: Option<OrderedStream>,
    /// The peer has no AppendEntries stream (an older fetcd): every AppendEntries is unary.
    unary_only: bool,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, BasicNode, E>>;

impl PeerClient {
    /// Whether the empty AppendEntries `rpc` can be answered here rather than sent: its commit
    /// index will reach the peer a moment later with the entries that follow.
    ///
    /// openraft 0.9 keeps one AppendEntries in flight per follower and sends one without
    /// entries whenever the commit index moves while no new entry is queued for that follower.
    /// Under write load the next entry is usually written by then, and its AppendEntries then
    /// waited for the empty one's round trip: two of five AppendEntries to each follower were
    /// empty, and they took a third of each follower's replication time (docs/benchmarks.md).
    /// An empty AppendEntries asks the peer nothing new when it holds exactly what this stream
    /// last delivered (`prev_log_id` is that entry): the answer is known, "success", unless the
    /// peer moved to a newer term or lost its log, which the AppendEntries with the next
    /// entries finds out.
    /// So it is answered here when:
    /// - the peer accepted this stream's previous RPCs, and holds up to `prev_log_id`;
    /// - entries after `prev_log_id` are written here, so openraft sends them, with the
    ///   newest commit index, as soon as this answer comes back;
    /// - the previous empty one was sent: the peer still hears from this leader at least every
    ///   other heartbeat interval even if no entry went out meanwhile.
    ///
    /// A read index loses nothing here: an AppendEntries answered here confirms no leadership
    /// (see [`crate::read_index`]), but the entries that follow at once do. openraft's own
    /// leadership checks never take this path: they go on clients of their own, which have
    /// carried no entries.
    fn answer_here(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
        let Some(prev) = rpc.prev_log_id else {
            return false;
        };
        !self.answered_here
            && rpc.entries.is_empty()
            && self.acked_last == Some(prev)
            && self.net.log_durability.written_end() > prev.index + 1
    }

    /// Records what `rpc`'s answer says of the peer's log (see [`PeerClient::acked_last`]).
    fn note_answer(
        &mut self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        res: &RpcResult<AppendEntriesResponse<NodeId>, RaftError<NodeId>>,
    ) {
        self.answered_here = false;
        self.acked_last = match (res, rpc.entries.last()) {
            (Ok(AppendEntriesResponse::Success), Some(last)) => Some(last.log_id),
            (Ok(AppendEntriesResponse::Success), None) if rpc.prev_log_id == self.acked_last => {
                self.acked_last
            }
            _ => None,
        };
    }

    /// Sends one openraft RPC and decodes the peer's `Result<Resp, E>`.
    async fn call<Req, Resp, E>(
        &self,
        action: RPCTypes,
        req: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let msg = encode(req).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        self.peer.sent(msg.data.len());
        let mut c = self
            .net
            .client(&self.addr)
            .map_err(|e| self.failed(RPCError::Unreachable(Unreachable::new(&e))))?;
        // A slow link holds the request before it leaves; the RPC's own timeout is for the peer.
        self.net.delay(&self.addr).await;
        let call = async {
            match action {
                RPCTypes::AppendEntries => c.append_entries(msg).await,
                RPCTypes::Vote => c.vote(msg).await,
                RPCTypes::InstallSnapshot => c.install_snapshot(msg).await,
            }
        };
        let resp = match tokio::time::timeout(option.hard_ttl(), call).await {
            Err(_) => return Err(self.failed(self.timed_out(action, option))),
            Ok(Err(status)) => return Err(self.failed(status_error(&status))),
            Ok(Ok(r)) => r.into_inner(),
        };
        self.decode_answer(&resp)
    }

    /// Sends an AppendEntries on this client's `AppendStream`, opening it first if needed.
    ///
    /// A unary RPC per AppendEntries made each one an HTTP/2 stream of its own: request
    /// headers, a task spawned for the handler on the follower, answer headers and trailers,
    /// and on the leader a hop through the channel's buffer task. On the stream each one is one
    /// DATA frame each way. Three members, one put at a time: p50 0.707–0.719 → 0.539–0.559 ms
    /// and the members' CPU −24 % (docs/benchmarks.md). etcd's members likewise stream their
    /// messages to each other.
    ///
    /// The stream is taken out of `self` for the exchange and put back only once the answer
    /// came: any error or timeout drops it (a late answer would otherwise be taken for the next
    /// request's), and the next call opens a new one.
    ///
    /// `Ok(None)`: the peer has no such RPC (an older fetcd); the caller sends it unary.
    async fn call_stream(
        &mut self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        option: &RPCOption,
    ) -> Result<Option<AppendEntriesResponse<NodeId>>, AeError> {
        let held = self.stream.take();
        if let Err(e) = self.net.check_link(&self.addr) {
            return Err(self.failed(RPCError::Unreachable(Unreachable::new(&e))));
        }
        let msg = encode(rpc).map_err(|s| RPCError::Network(NetworkError::new(&s)))?;
        self.peer.sent(msg.data.len());
        self.net.delay(&self.addr).await;
        let (net, addr) = (&self.net, &self.addr);
        let exchange = async move {
            let mut s = match held {
                Some(s) => s,
                None => OrderedStream::open(net, addr, OrderedRpc::AppendStream).await?,
            };
            let m = s.exchange(msg).await?;
            Ok::<_, tonic::Status>((m, s))
        };
        let resp = match tokio::time::timeout(option.hard_ttl(), exchange).await {
            Ok(Ok((m, s))) => {
                self.stream = Some(s);
                m
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                self.unary_only = true;
                return Ok(None);
            }
            Ok(Err(status)) => return Err(self.failed(status_error(&status))),
            Err(_) => {
                return Err(self.failed(self.timed_out(RPCTypes::AppendEntries, option)));
            }
        };
        self.decode_answer(&resp).map(Some)
    }

    /// Decodes a peer's `Result<Resp, E>`.
    // The error is openraft's, as its network trait returns it.
    #[allow(clippy::result_large_err)]
    fn decode_answer<Resp, E>(&self, resp: &PeerMessage) -> RpcResult<Resp, E>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        self.peer.received(resp.data.len());
        let answer: Result<Resp, E> =
            decode(resp).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    fn timed_out<E: std::error::Error>(
        &self,
        action: RPCTypes,
        option: &RPCOption,
    ) -> RPCError<NodeId, BasicNode, E> {
        RPCError::Timeout(Timeout {
            action,
            id: self.net.id,
            target: self.target,
            timeout: option.hard_ttl(),
        })
    }

    /// Counts an RPC that got no answer in
    /// [`PeerMetrics::sent_failures`](crate::metrics::PeerMetrics); returns its error.
    fn failed<E: std::error::Error>(
        &self,
        e: RPCError<NodeId, BasicNode, E>,
    ) -> RPCError<NodeId, BasicNode, E> {
        self.peer
            .sent_failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        e
    }
}

/// An AppendEntries error as openraft takes it.
type AeError = RPCError<NodeId, BasicNode, RaftError<NodeId>>;

/// The openraft error for a call that failed with `status`: unreachable (openraft backs off)
/// when the peer could not be reached or went away, a network error otherwise.
fn status_error<E: std::error::Error>(status: &tonic::Status) -> RPCError<NodeId, BasicNode, E> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            RPCError::Unreachable(Unreachable::new(status))
        }
        _ => RPCError::Network(NetworkError::new(status)),
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        let kind = usize::from(rpc.entries.is_empty());
        if rpc.entries.is_empty() {
            // An empty AppendEntries carries a new commit index (or is a heartbeat). openraft
            // queues it for the followers before the leader applies the entry and answers
            // the client, and on a member with one worker thread the tasks run in that
            // order: the answer waited for the empty RPCs' encoding and socket writes. Let
            // the apply and the answer go first; the followers learn the commit index a few
            // microseconds later. (Three members, one put at a time: p50 1.68 → 1.50 ms.)
            tokio::task::yield_now().await;
            if self.answer_here(&rpc) {
                self.answered_here = true;
                return Ok(AppendEntriesResponse::Success);
            }
        }
        // A leader counts itself in a commit quorum once its entry is written; the commit is
        // shown to the followers (who then apply it) only once the entry is durable here too
        // (see `crate::durable`). Usually it already is: the followers' syncs and the round
        // trip take longer than the leader's own sync.
        if let Some(commit) = rpc.leader_commit {
            let durability = &self.net.log_durability;
            if durability.end() <= commit.index {
                if rpc.entries.is_empty() {
                    // It carries nothing but the commit index: wait for it.
                    if let Err(e) = durability.wait(commit.index).await {
                        return Err(RPCError::Network(NetworkError::new(&e)));
                    }
                } else {
                    // New entries must not wait for the leader's disk: send them with the
                    // last commit index this peer was told. (Raft allows any older one.)
                    rpc.leader_commit = self.commit_sent.filter(|c| *c <= commit);
                }
            }
        }
        let started = Instant::now();
        let acks = self.net.acks.clone();
        let sent = acks.sending(
            self.target,
            rpc.vote,
            rpc.entries.last().map(|e| e.log_id.index + 1),
            rpc.leader_commit.map(|c| c.index),
        );
        // The replication stream's AppendEntries go on its AppendEntries stream; openraft's
        // leadership checks (clients of their own, without entries) stay unary.
        let streamed = if !self.unary_only && (self.stream.is_some() || !rpc.entries.is_empty()) {
            self.call_stream(&rpc, &option).await.transpose()
        } else {
            None
        };
        let res = match streamed {
            Some(res) => res,
            None => self.call(RPCTypes::AppendEntries, &rpc, &option).await,
        };
        // Any answer but a higher vote vouches for this leader (see `crate::read_index`).
        match &res {
            Ok(AppendEntriesResponse::HigherVote(_)) => sent.answered(false),
            Ok(_) => sent.answered(true),
            Err(_) => sent.answered(false),
        }
        self.note_answer(&rpc, &res);
        if res.is_ok() && rpc.leader_commit > self.commit_sent {
            self.commit_sent = rpc.leader_commit;
        }
        // Answered by the peer (whatever it answered): a round trip to count.
        if matches!(res, Ok(_) | Err(RPCError::RemoteError(_))) {
            self.peer.append_entries[kind].observe(started.elapsed());
        }
        res
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        // The peer's log is being replaced: what it held before tells nothing any more.
        self.acked_last = None;
        self.call(RPCTypes::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, RaftError<NodeId>> {
        self.call(RPCTypes::Vote, &rpc, &option).await
    }

    /// Retries a dead peer after 100 ms, then less and less often, at most once a second.
    fn backoff(&self) -> Backoff {
        let steps = [100u64, 200, 400, 800].map(Duration::from_millis);
        Backoff::new(
            steps
                .into_iter()
                .chain(std::iter::repeat(Duration::from_secs(1))),
        )
    }
}

/// The peer service of one member: hands openraft's RPCs to the local Raft, proposes forwarded
/// writes, answers read-index requests when this member leads, and carries out leader-transfer
/// steps. While this member is a quiet leader (handing over leadership), forwarded writes, read
/// indexes and membership changes wait for the transfer to end: they would renew the followers'
/// leader lease.
#[derive(Clone)]
pub struct PeerService {
    raft: typ::Raft,
    pauses: Arc<Pauses>,
    read_index: Arc<ReadIndex>,
    /// Set when the member's server stops: AppendEntries streams then end, since a graceful
    /// shutdown waits for every open call and a leader keeps its stream open for good.
    stop: tokio::sync::watch::Receiver<bool>,
}

impl PeerService {
    /// Proposes a follower's batch of client writes (unary or on a `CallStream`).
    async fn serve_forward(&self, batch: InternalRaftBatch) -> Result<PeerMessage, tonic::Status> {
        let cmd = Command::from_batch(&batch);
        self.pauses.wait_released().await;
        let res: Result<(u64, CommandResponse), PeerError> = match self.raft.client_write(cmd).await
        {
            Ok(r) => Ok((r.log_id.index, r.data)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(PeerError::NotLeader(f.leader_id))
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(PeerError::Stopped(e.to_string()))
            }
            Err(RaftError::Fatal(f)) => Err(PeerError::Stopped(f.to_string())),
        };
        encode(&res)
    }

    /// Answers a follower's read-index request (unary or on a `CallStream`), `ask` the
    /// follower's word if it gave it (a bincode [`ReadIndexAsk`]; empty if not).
    async fn serve_read_index(&self, ask: &[u8]) -> Result<PeerMessage, tonic::Status> {
        let ask: Option<ReadIndexAsk> = if ask.is_empty() {
            None
        } else {
            Some(bincode::deserialize(ask).map_err(bad_request)?)
        };
        self.pauses.wait_released().await;
        let res: Result<u64, PeerError> =
            match self.read_index.leader_read_index_for(ask.as_ref()).await {
                Ok(read) => Ok(read),
                Err(RaftError::APIError(e)) => match e {
                    openraft::error::CheckIsLeaderError::ForwardToLeader(f) => {
                        Err(PeerError::NotLeader(f.leader_id))
                    }
                    openraft::error::CheckIsLeaderError::QuorumNotEnough(_) => {
                        Err(PeerError::NoQuorum)
                    }
                },
                Err(RaftError::Fatal(f)) => Err(PeerError::Stopped(f.to_string())),
            };
        encode(&res)
    }

    /// The tonic service for `raft`, with its transfer pauses and read index; its
    /// AppendEntries streams end once `stop` turns true.
    pub fn server(
        raft: typ::Raft,
        pauses: Arc<Pauses>,
        read_index: Arc<ReadIndex>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> RaftPeerServer<PeerService> {
        RaftPeerServer::new(PeerService {
            raft,
            pauses,
            read_index,
            stop,
        })
        .max_decoding_message_size(MAX_PEER_MESSAGE)
        .max_encoding_message_size(MAX_PEER_MESSAGE)
    }
}

/// Counts a Raft request of `n` bytes from the member whose `vote` it carries (the leader or
/// candidate that sent it); returns that member's metrics, to count the answer. `known` is the
/// sender's metrics already looked up (an AppendEntries stream's), if any: the lookup takes
/// the process-wide registry's lock.
fn traffic_from(
    vote: &openraft::Vote<NodeId>,
    n: usize,
    known: Option<Arc<PeerMetrics>>,
) -> Option<Arc<PeerMetrics>> {
    let from = vote.leader_id().voted_for()?;
    let peer = match known {
        Some(p) if p.id == from => p,
        _ => crate::metrics::peer_metrics(from),
    };
    peer.received(n);
    Some(peer)
}

/// Serves one AppendEntries, unary or from a stream; `known` as for [`traffic_from`]. Returns
/// the answer and the sender's metrics.
async fn serve_append(
    raft: &typ::Raft,
    m: &PeerMessage,
    known: Option<Arc<PeerMetrics>>,
) -> (Result<PeerMessage, tonic::Status>, Option<Arc<PeerMetrics>>) {
    let rpc: AppendEntriesRequest<TypeConfig> = match decode(m) {
        Ok(rpc) => rpc,
        Err(e) => return (Err(bad_request(e)), known),
    };
    let peer = traffic_from(&rpc.vote, m.data.len(), known);
    let empty = rpc.entries.is_empty();
    let res = raft.append_entries(rpc).await;
    if empty {
        // An empty AppendEntries may have brought a new commit index: let this member
        // apply the entry and answer a client waiting for it (a write it forwarded)
        // before the acknowledgement is encoded and written, as the leader does on its
        // side. Three members, one put at a time through a follower: p50 1.77–2.07 →
        // 1.66–1.84 ms.
        tokio::task::yield_now().await;
    }
    (answer(peer.as_ref(), &res), peer)
}

/// The answers to a `VouchStream`'s requests, in order and at once (nothing here waits for
/// the log): whether this member `vouches` for each request's vote ([`crate::vouch`]).
fn vouch_answers(
    inbound: tonic::Streaming<PeerMessage>,
    vouches: impl Fn(&openraft::Vote<NodeId>) -> bool + Send + 'static,
) -> impl futures::Stream<Item = Result<PeerMessage, tonic::Status>> + Send + 'static {
    use futures::StreamExt;
    inbound.map(move |m| {
        let req: crate::vouch::VouchRequest = decode(&m?).map_err(bad_request)?;
        encode(&crate::vouch::VouchAnswer {
            seq: req.seq,
            vouches: vouches(&req.vote),
        })
    })
}

/// Encodes the answer to a Raft request from `peer`, counting its bytes as sent to it.
fn answer<T: Serialize>(
    peer: Option<&Arc<PeerMetrics>>,
    res: &T,
) -> Result<PeerMessage, tonic::Status> {
    let msg = encode(res)?;
    if let Some(p) = peer {
        p.sent(msg.data.len());
    }
    Ok(msg)
}

/// The answers of a streaming peer RPC.
type PeerStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

/// Resolves once the member's server stops: a streaming peer RPC's answers end then, since a
/// graceful shutdown waits for every open call.
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn bad_request(e: bincode::Error) -> tonic::Status {
    tonic::Status::invalid_argument(format!("undecodable peer message: {e}"))
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(
        &self,
        req: tonic::Request<PeerMessage>,
    ) -> Result<tonic::Response<PeerMessage>, tonic::Status> {
        let (answer, _) = serve_append(&self.raft, req.get_ref(), None).await;
        answer.map(tonic::Response::new)
    }

    type AppendStreamStream = PeerStream<PeerMessage>;

    async fn append_stream(
        &self,
        req: tonic::Request<tonic::Streaming<PeerMessage>>,
    ) -> Result<tonic::Response<Self::AppendStreamStream>, tonic::Status> {
        use futures::StreamExt;
        // Requests are served one at a time, in order; the sender's metrics are looked up once.
        let state = (req.into_inner(), self.raft.clone(), None);
        let out = futures::stream::unfold(state, |(mut inbound, raft, known)| async move {
            let (answer, known) = match inbound.next().await? {
                Ok(m) => serve_append(&raft, &m, known).await,
                Err(status) => (Err(status), known),
            };
            Some((answer, (inbound, raft, known)))
        });
        Ok(tonic::Response::new(Box::pin(
            out.take_until(stopped(self.stop.clone())),
        )))
    }

    async fn vote(
        &self,
        req: tonic::Request<PeerMessage>,
    ) -> Result<tonic::Response<PeerMessage>, tonic::Status> {
        let rpc: VoteRequest<NodeId> = decode(req.get_ref()).map_err(bad_request)?;
        let peer = traffic_from(&rpc.vote, req.get_ref().data.len(), None);
        let res = self.raft.vote(rpc).await;
        answer(peer.as_ref(), &res).map(tonic::Response::new)
    }

    async fn install_snapshot(
        &self,
        req: tonic::Request<PeerMessage>,
    ) -> Result<tonic::Response<PeerMessage>, tonic::Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref()).map_err(bad_request)?;
        let peer = traffic_from(&rpc.vote, req.get_ref().data.len(), None);
        let res = self.raft.install_snapshot(rpc).await;
        answer(peer.as_ref(), &res).map(tonic::Response::new)
    }

    async fn forward(
        &self,
        req: tonic::Request<InternalRaftBatch>,
    ) -> Result<tonic::Response<PeerMessage>, tonic::Status> {
        self.serve_forward(req.into_inner())
            .await
            .map(tonic::Response::new)
    }

    type VouchStreamStream = PeerStream<PeerMessage>;

    async fn vouch_stream(
        &self,
        req: tonic::Request<tonic::Streaming<PeerMessage>>,
    ) -> Result<tonic::Response<Self::VouchStreamStream>, tonic::Status> {
        use futures::StreamExt;
        let read_index = self.read_index.clone();
        let out = vouch_answers(req.into_inner(), move |v| read_index.vouches(v));
        Ok(tonic::Response::new(Box::pin(
            out.take_until(stopped(self.stop.clone())),
        )))
    }

    type CallStreamStream = PeerStream<PeerCall>;

    async fn call_stream(
        &self,
        req: tonic::Request<tonic::Streaming<PeerCall>>,
    ) -> Result<tonic::Response<Self::CallStreamStream>, tonic::Status> {
        use futures::SinkExt;
        use futures::StreamExt;
        // Each call is served by a task of its own, as a unary RPC would be, and answered as
        // soon as it is done.
        let (tx, rx) = futures::channel::mpsc::channel(64);
        let mut inbound = req.into_inner();
        let svc = self.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let stop = stopped(stop);
            tokio::pin!(stop);
            loop {
                let call = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(call)) => call,
                        _ => break,
                    },
                    _ = &mut stop => break,
                };
                let (svc, mut tx) = (svc.clone(), tx.clone());
                tokio::spawn(async move {
                    let answer = match call.call {
                        Some(peer_call::Call::Forward(batch)) => svc.serve_forward(batch).await,
                        Some(peer_call::Call::ReadIndex(_)) => svc.serve_read_index(&[]).await,
                        Some(peer_call::Call::ReadIndexAsk(ask)) => {
                            svc.serve_read_index(&ask).await
                        }
                        _ => Err(tonic::Status::invalid_argument("not a call")),
                    };
                    let msg = answer.map(|m| PeerCall {
                        id: call.id,
                        call: Some(peer_call::Call::Answer(m.data)),
                    });
                    let _ = tx.send(msg).await;
                });
            }
        });
        Ok(tonic::Response::new(Box::pin(
            rx.take_until(stopped(self.stop.clone())),
        )))
    }

    async fn change_membership(
        &self,
        req: tonic::Request<PeerMessage>,
    ) -> Result<tonic::Response<PeerMessage>, tonic::Status> {
        let change: MembershipChange = decode(req.get_ref()).map_err(bad_request)?;
        self.pauses.wait_released().await;
        let res = crate::membership::apply(&self.raft, change).await;
        encode(&res).map(tonic::Response::new)
    }

    async fn read_index(
        &self,
        req: tonic::Request<PeerMessage>,
    ) -> Result<tonic::Response<PeerMessage>, tonic::Status> {
        self.serve_read_index(&req.get_ref().data)
            .await
            .map(tonic::Response::new)
    }

    async fn transfer(
        &self,
        req: tonic::Request<PeerMessage>,
    ) -> Result<tonic::Response<PeerMessage>, tonic::Status> {
        let step: TransferStep = decode(req.get_ref()).map_err(bad_request)?;
        let res = self.pauses.apply(step).await;
        encode(&res).map(tonic::Response::new)
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;
    use openraft::Entry;
    use openraft::EntryPayload;
    use openraft::LogId;
    use openraft::Vote;

    use super::*;

    fn log_id(index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    /// An AppendEntries after entry `prev` carrying `entries`.
    fn request(prev: u64, entries: std::ops::Range<u64>) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(log_id(prev)),
            leader_commit: Some(log_id(prev)),
            entries: entries
                .map(|i| Entry {
                    log_id: log_id(i),
                    payload: EntryPayload::Blank,
                })
                .collect(),
        }
    }

    type Answer = RpcResult<AppendEntriesResponse<NodeId>, RaftError<NodeId>>;

    /// A peer as an older fetcd was: AppendEntries only unary (counted), no `AppendStream`;
    /// with `call_stream`, a leader whose `CallStream` takes three calls and answers them in
    /// reverse order, else one with unary forwards and read indexes only. A forwarded batch of
    /// `n` requests is answered with log index `n`; a read index with 42.
    #[derive(Default)]
    struct UnaryOnlyPeer {
        unary: Arc<std::sync::atomic::AtomicUsize>,
        call_stream: bool,
        /// With a vote: answers vouch requests as a member that saved it.
        saved_vote: Option<Vote<NodeId>>,
    }

    /// The test leader's read index: 40 plus the asker's id, so a test sees the ask arrive.
    fn read_index_answer(ask: &[u8]) -> Result<PeerMessage, tonic::Status> {
        let ask: ReadIndexAsk = bincode::deserialize(ask).map_err(bad_request)?;
        encode(&Ok::<u64, PeerError>(40 + ask.from))
    }

    fn forward_answer(batch: &InternalRaftBatch) -> Result<PeerMessage, tonic::Status> {
        let n = batch.requests.len() as u64;
        encode(&Ok::<_, PeerError>((n, CommandResponse::default())))
    }

    #[tonic::async_trait]
    impl RaftPeer for UnaryOnlyPeer {
        async fn append_entries(
            &self,
            _req: tonic::Request<PeerMessage>,
        ) -> Result<tonic::Response<PeerMessage>, tonic::Status> {
            self.unary.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answer: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
                Ok(AppendEntriesResponse::Success);
            encode(&answer).map(tonic::Response::new)
        }

        type AppendStreamStream = PeerStream<PeerMessage>;

        async fn append_stream(
            &self,
            _req: tonic::Request<tonic::Streaming<PeerMessage>>,
        ) -> Result<tonic::Response<Self::AppendStreamStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("no AppendStream here"))
        }

        type VouchStreamStream = PeerStream<PeerMessage>;

        async fn vouch_stream(
            &self,
            req: tonic::Request<tonic::Streaming<PeerMessage>>,
        ) -> Result<tonic::Response<Self::VouchStreamStream>, tonic::Status> {
            let Some(saved) = self.saved_vote else {
                return Err(tonic::Status::unimplemented("no VouchStream here"));
            };
            let out = vouch_answers(req.into_inner(), move |v| {
                crate::vouch::vouches(Some(&saved), v)
            });
            Ok(tonic::Response::new(Box::pin(out)))
        }

        async fn vote(
            &self,
            _req: tonic::Request<PeerMessage>,
        ) -> Result<tonic::Response<PeerMessage>, tonic::Status> {
            Err(tonic::Status::unimplemented("vote"))
        }

        async fn install_snapshot(
            &self,
            _req: tonic::Request<PeerMessage>,
        ) -> Result<tonic::Response<PeerMessage>, tonic::Status> {
            Err(tonic::Status::unimplemented("install_snapshot"))
        }

        async fn forward(
            &self,
            req: tonic::Request<InternalRaftBatch>,
        ) -> Result<tonic::Response<PeerMessage>, tonic::Status> {
            self.unary.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            forward_answer(req.get_ref()).map(tonic::Response::new)
        }

        async fn read_index(
            &self,
            req: tonic::Request<PeerMessage>,
        ) -> Result<tonic::Response<PeerMessage>, tonic::Status> {
            self.unary.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            read_index_answer(&req.get_ref().data).map(tonic::Response::new)
        }

        type CallStreamStream = PeerStream<PeerCall>;

        async fn call_stream(
            &self,
            req: tonic::Request<tonic::Streaming<PeerCall>>,
        ) -> Result<tonic::Response<Self::CallStreamStream>, tonic::Status> {
            use futures::StreamExt;
            if !self.call_stream {
                return Err(tonic::Status::unimplemented("no CallStream here"));
            }
            let inbound = req.into_inner();
            let answers = futures::stream::once(async move {
                let mut calls: Vec<PeerCall> = inbound
                    .take(3)
                    .filter_map(|c| async { c.ok() })
                    .collect()
                    .await;
                calls.reverse();
                let answers: Vec<Result<PeerCall, tonic::Status>> = calls
                    .into_iter()
                    .map(|c| {
                        let answer = match &c.call {
                            Some(peer_call::Call::Forward(b)) => forward_answer(b)?,
                            Some(peer_call::Call::ReadIndexAsk(ask)) => read_index_answer(ask)?,
                            _ => return Err(tonic::Status::invalid_argument("not a call")),
                        };
                        Ok(PeerCall {
                            id: c.id,
                            call: Some(peer_call::Call::Answer(answer.data)),
                        })
                    })
                    .collect();
                futures::stream::iter(answers)
            })
            .flatten();
            Ok(tonic::Response::new(Box::pin(answers)))
        }

        async fn change_membership(
            &self,
            _req: tonic::Request<PeerMessage>,
        ) -> Result<tonic::Response<PeerMessage>, tonic::Status> {
            Err(tonic::Status::unimplemented("change_membership"))
        }

        async fn transfer(
            &self,
            _req: tonic::Request<PeerMessage>,
        ) -> Result<tonic::Response<PeerMessage>, tonic::Status> {
            Err(tonic::Status::unimplemented("transfer"))
        }
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_unary_append_entries() {
        let peer = UnaryOnlyPeer::default();
        let unary = peer.unary.clone();
        let (addr, server) = serve_peer(peer).await;
        // A member id of this test's own: peer metrics are process-wide.
        let target = 0x01df_e7cd_u64;
        let mut net = Network::new(1, Arc::new(Durability::new(100)));
        let mut client = net.new_client(target, &BasicNode::new(addr)).await;
        for (prev, entries) in [(4, 5..7), (6, 7..8)] {
            let option = RPCOption::new(Duration::from_secs(5));
            let answer: Answer = client.append_entries(request(prev, entries), option).await;
            assert!(
                matches!(answer, Ok(AppendEntriesResponse::Success)),
                "{answer:?}"
            );
            assert!(client.unary_only && client.stream.is_none());
        }
        // Both went unary; the refused stream was not a failed send.
        assert_eq!(unary.load(std::sync::atomic::Ordering::SeqCst), 2);
        let failures = crate::metrics::peer_metrics(target)
            .sent_failures
            .load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(failures, 0);
        server.abort();
    }

    /// Serves `peer` on a port of its own; returns its URL and the server task.
    async fn serve_peer(peer: UnaryOnlyPeer) -> (String, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let incoming = futures::stream::unfold(listener, |l| async move {
            let conn = l.accept().await.map(|(s, _)| s);
            Some((conn, l))
        });
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(RaftPeerServer::new(peer))
                .serve_with_incoming(incoming)
                .await;
        });
        (format!("http://{addr}"), server)
    }

    /// Waits up to `wait` for a quorum of members 1 (this one), 2 and 3 to confirm `vote` since
    /// `since`.
    async fn vouched(net: &Network, vote: Vote<NodeId>, since: Instant, wait: Duration) -> bool {
        let three = [std::collections::BTreeSet::from([1, 2, 3])];
        net.acks()
            .confirm(
                1,
                None,
                vote,
                since,
                &three,
                since + wait,
                || 0,
                || async {},
            )
            .await
    }

    #[tokio::test]
    async fn a_peer_that_saved_the_leaders_vote_vouches_for_it_and_no_other_does() {
        let mut vote = Vote::new(2, 1);
        vote.commit();
        let mut newer = Vote::new(3, 3);
        newer.commit();
        let net = Network::new(1, Arc::new(Durability::new(100)));
        let vouchers = crate::vouch::Vouchers::new(net.clone(), net.acks().clone());
        let (follows, _s1) = serve_peer(UnaryOnlyPeer {
            saved_vote: Some(vote),
            ..Default::default()
        })
        .await;
        let (moved_on, _s2) = serve_peer(UnaryOnlyPeer {
            saved_vote: Some(newer),
            ..Default::default()
        })
        .await;
        let (older_fetcd, _s3) = serve_peer(UnaryOnlyPeer::default()).await;

        let since = Instant::now();
        vouchers.want(3, &moved_on, vote, since);
        vouchers.want(2, &older_fetcd, vote, since);
        assert!(
            !vouched(&net, vote, since, Duration::from_millis(300)).await,
            "vouched for by a member that holds a newer vote, or by one without the RPC"
        );
        vouchers.want(2, &follows, vote, since);
        assert!(vouched(&net, vote, since, Duration::from_secs(5)).await);
        // A later read needs a request sent after it arrived.
        let later = Instant::now();
        assert!(!vouched(&net, vote, later, Duration::from_millis(50)).await);
        vouchers.want(2, &follows, vote, later);
        assert!(vouched(&net, vote, later, Duration::from_secs(5)).await);
    }

    /// Member 2's word, which the test leader answers as 42.
    fn ask() -> ReadIndexAsk {
        ReadIndexAsk {
            from: 2,
            vote: Some(Vote::new(2, 1)),
        }
    }

    fn batch(n: usize) -> InternalRaftBatch {
        InternalRaftBatch {
            requests: vec![Default::default(); n],
        }
    }

    #[tokio::test]
    async fn calls_on_the_call_stream_get_their_own_answers_in_any_order() {
        let peer = UnaryOnlyPeer {
            call_stream: true,
            ..Default::default()
        };
        let unary = peer.unary.clone();
        let (addr, server) = serve_peer(peer).await;
        let net = Network::new(1, Arc::new(Durability::new(100)));
        // Three calls at once; the leader answers the last one first.
        let ask = ask();
        let (a, b, c) = tokio::join!(
            net.forward(&addr, batch(1)),
            net.read_index(&addr, &ask),
            net.forward(&addr, batch(3)),
        );
        let index = |r: Result<Result<(u64, CommandResponse), PeerError>, TransportError>| {
            r.ok().and_then(|r| r.ok()).map(|(i, _)| i)
        };
        assert_eq!(index(a), Some(1));
        assert!(matches!(b, Ok(Ok(42))), "{b:?}");
        assert_eq!(index(c), Some(3));
        assert_eq!(unary.load(std::sync::atomic::Ordering::SeqCst), 0);
        server.abort();
    }

    #[tokio::test]
    async fn a_leader_without_the_call_stream_gets_unary_calls() {
        let peer = UnaryOnlyPeer::default();
        let unary = peer.unary.clone();
        let (addr, server) = serve_peer(peer).await;
        let net = Network::new(1, Arc::new(Durability::new(100)));
        for _ in 0..2 {
            let fwd = net.forward(&addr, batch(2)).await;
            assert!(matches!(fwd, Ok(Ok((2, _)))), "{fwd:?}");
            let ri = net.read_index(&addr, &ask()).await;
            assert!(matches!(ri, Ok(Ok(42))), "{ri:?}");
        }
        assert_eq!(unary.load(std::sync::atomic::Ordering::SeqCst), 4);
        server.abort();
    }

    #[tokio::test]
    async fn empty_append_entries_are_answered_here_only_on_a_healthy_stream_with_entries_to_follow(
    ) {
        // Entries up to 9 are written on the leader.
        let log = Arc::new(Durability::new(0));
        log.wrote(10);
        let mut c = Network::new(1, log.clone())
            .new_client(2, &BasicNode::new("127.0.0.1:1"))
            .await;

        // A client that never carried entries (a read's leadership check) always sends.
        assert!(!c.answer_here(&request(5, 0..0)));
        c.note_answer(&request(5, 0..0), &Ok(AppendEntriesResponse::Success));
        assert!(!c.answer_here(&request(5, 0..0)));

        // The peer accepted entries 4 and 5: an empty one after 5 is answered here.
        c.note_answer(&request(3, 4..6), &Ok(AppendEntriesResponse::Success));
        assert!(c.answer_here(&request(5, 0..0)));
        // Not one with entries, nor one after an entry the stream did not deliver last.
        assert!(!c.answer_here(&request(5, 6..7)));
        assert!(!c.answer_here(&request(4, 0..0)));
        assert!(!c.answer_here(&request(6, 0..0)));

        // Never two in a row: after one answered here, the next is sent.
        c.answered_here = true;
        assert!(!c.answer_here(&request(5, 0..0)));
        c.note_answer(&request(5, 0..0), &Ok(AppendEntriesResponse::Success));
        assert!(c.answer_here(&request(5, 0..0)));

        // Nothing written after 5: no entries follow to carry the commit index.
        let idle = Arc::new(Durability::new(0));
        idle.wrote(6);
        let mut c2 = Network::new(1, idle.clone())
            .new_client(2, &BasicNode::new("127.0.0.1:1"))
            .await;
        c2.note_answer(&request(3, 4..6), &Ok(AppendEntriesResponse::Success));
        assert!(!c2.answer_here(&request(5, 0..0)));
        idle.wrote(7);
        assert!(c2.answer_here(&request(5, 0..0)));

        // Any failure or refusal forgets what the peer holds, until entries are accepted again.
        let link_down = std::io::Error::other("link down");
        let answers: [Answer; 4] = [
            Err(RPCError::Unreachable(Unreachable::new(&link_down))),
            Ok(AppendEntriesResponse::Conflict),
            Ok(AppendEntriesResponse::HigherVote(Vote::new_committed(2, 3))),
            Ok(AppendEntriesResponse::PartialSuccess(Some(log_id(4)))),
        ];
        for answer in answers {
            c.note_answer(&request(3, 4..6), &Ok(AppendEntriesResponse::Success));
            assert!(c.answer_here(&request(5, 0..0)));
            c.note_answer(&request(5, 6..8), &answer);
            assert!(!c.answer_here(&request(5, 0..0)), "after {answer:?}");
            assert!(!c.answer_here(&request(7, 0..0)), "after {answer:?}");
        }
        // An empty one the peer accepted after another entry than the last delivered one.
        c.note_answer(&request(3, 4..6), &Ok(AppendEntriesResponse::Success));
        c.note_answer(&request(4, 0..0), &Ok(AppendEntriesResponse::Success));
        assert!(!c.answer_here(&request(5, 0..0)));
        assert!(!c.answer_here(&request(4, 0..0)));
    }
}
