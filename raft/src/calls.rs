//! A follower's forwarded writes and read indexes on one long-lived stream to the leader.
//!
//! As unary RPCs each was an HTTP/2 stream of its own: request headers, a task spawned for the
//! handler on the leader, answer headers and trailers. A follower forwards every batch of its
//! clients' writes and asks the leader for every read index: one run of kube's mix on three
//! members (8000 objects preloaded, then 10k operations) made about 1800 and 1000 of them. On
//! `CallStream` each is one DATA frame each way, tagged with an id that its answer carries
//! back. Answers come in any order: a read index does not wait behind a forwarded write. A
//! peer without the RPC (an older fetcd) gets them unary.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;

use fetcd_proto::raftpb::peer_call;
use fetcd_proto::raftpb::raft_peer_client::RaftPeerClient;
use fetcd_proto::raftpb::InternalRaftBatch;
use fetcd_proto::raftpb::PeerCall;
use futures::SinkExt;
use tokio::sync::oneshot;
use tonic::transport::Channel;

use crate::coalesce::EndStreamWithData;

/// A request a follower makes of the leader.
#[derive(Debug, Clone)]
pub(crate) enum LeaderRequest {
    /// Propose this batch of client writes.
    Forward(InternalRaftBatch),
    /// Confirm leadership and answer with the read index: the asker's word, a bincode
    /// [`ReadIndexAsk`](crate::read_index::ReadIndexAsk).
    ReadIndex(Vec<u8>),
}

impl From<LeaderRequest> for peer_call::Call {
    fn from(r: LeaderRequest) -> Self {
        match r {
            LeaderRequest::Forward(b) => peer_call::Call::Forward(b),
            LeaderRequest::ReadIndex(ask) => peer_call::Call::ReadIndexAsk(ask),
        }
    }
}

type Answer = Result<Vec<u8>, tonic::Status>;

#[derive(Default)]
struct Pending {
    /// The stream failed or ended: no answer will come.
    closed: Option<tonic::Status>,
    waiting: HashMap<u64, oneshot::Sender<Answer>>,
}

type SharedPending = Arc<Mutex<Pending>>;

fn lock(p: &SharedPending) -> std::sync::MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// One open `CallStream` to a peer. Dropping it ends the stream (once no call is in flight).
pub(crate) struct CallConn {
    tx: futures::channel::mpsc::Sender<PeerCall>,
    pending: SharedPending,
    next_id: AtomicU64,
}

impl std::fmt::Debug for CallConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallConn")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Takes a call's waiter out when the caller gives up (its own timeout), so that an answer
/// that never comes leaves nothing behind.
struct Waiting<'a>(&'a SharedPending, u64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(self.0).waiting.remove(&self.1);
    }
}

impl CallConn {
    /// Opens a `CallStream` through `client`; its reader task resolves the calls' answers and
    /// fails every call in flight when the stream breaks. `Unimplemented`: the peer has none.
    pub(crate) async fn open(
        mut client: RaftPeerClient<EndStreamWithData<Channel>>,
    ) -> Result<CallConn, tonic::Status> {
        let (tx, rx) = futures::channel::mpsc::channel(64);
        let mut inbound = client.call_stream(rx).await?.into_inner();
        let pending = SharedPending::default();
        let reader = pending.clone();
        tokio::spawn(async move {
            let status = loop {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        let Some(peer_call::Call::Answer(data)) = m.call else {
                            break tonic::Status::internal("a call stream answer without one");
                        };
                        if let Some(w) = lock(&reader).waiting.remove(&m.id) {
                            let _ = w.send(Ok(data));
                        }
                    }
                    Ok(None) => break tonic::Status::unavailable("the call stream ended"),
                    Err(s) => break s,
                }
            };
            let mut p = lock(&reader);
            for (_, w) in p.waiting.drain() {
                let _ = w.send(Err(status.clone()));
            }
            p.closed = Some(status);
        });
        Ok(CallConn {
            tx,
            pending,
            next_id: AtomicU64::new(1),
        })
    }

    /// Whether the stream broke; a new one is then opened for the next call.
    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.pending).closed.is_some() || self.tx.is_closed()
    }

    /// Sends `req` and waits for its answer (the unary RPC's `PeerMessage.data`).
    pub(crate) async fn call(&self, req: LeaderRequest) -> Answer {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        {
            let mut p = lock(&self.pending);
            if let Some(s) = &p.closed {
                return Err(s.clone());
            }
            p.waiting.insert(id, done);
        }
        let _waiting = Waiting(&self.pending, id);
        let msg = PeerCall {
            id,
            call: Some(req.into()),
        };
        self.tx
            .clone()
            .send(msg)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        answer
            .await
            .unwrap_or_else(|_| Err(tonic::Status::unavailable("the call stream closed")))
    }
}
