//! Leadership confirmations that do not wait for a follower's disk.
//!
//! A follower answers an AppendEntries only once its entries are synced, and openraft keeps one
//! AppendEntries in flight per follower: under write load, a read's confirmation from the
//! replication traffic ([`crate::read_index`]) waited for the AppendEntries in flight, then for
//! a whole round trip of the next one, two of the follower's syncs. etcd's ReadIndex heartbeats
//! wait likewise behind its followers' WAL syncs. A leadership confirmation needs nothing of
//! the follower's log, only its word that it still holds the leader's vote.
//!
//! So a leader with reads to confirm sends each follower a *vouch request* carrying its vote,
//! on a stream of its own (`VouchStream`), and a follower answers at once whether the vote it
//! has saved is that one. A follower saves a vote before it grants it (openraft saves, then
//! answers), so a follower that answers yes at time `t` had granted no newer candidate by `t`:
//! a "yes" to a request sent at `s` vouches for the vote from `s` on, as an answered
//! AppendEntries does ([`LeaderAcks::vouched`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use openraft::Vote;
use serde::Deserialize;
use serde::Serialize;

use crate::network::Network;
use crate::network::OrderedRpc;
use crate::network::OrderedStream;
use crate::read_index::LeaderAcks;
use crate::NodeId;

/// One vouch request: is `vote` the vote you hold?
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct VouchRequest {
    pub seq: u64,
    pub vote: Vote<NodeId>,
}

/// The answer to the [`VouchRequest`] numbered `seq`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct VouchAnswer {
    pub seq: u64,
    pub vouches: bool,
}

/// Whether a member whose saved vote is `saved` vouches for a leader of vote `asked`: only for
/// exactly that vote, committed (a member that saved a newer one may have granted it).
pub(crate) fn vouches(saved: Option<&Vote<NodeId>>, asked: &Vote<NodeId>) -> bool {
    asked.is_committed() && saved == Some(asked)
}

/// How long a vouch request may wait for its answer before its stream is dropped.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// A peer's sender task ends after this long without a request (leadership moved on, or
/// nothing is read).
const IDLE_END: Duration = Duration::from_secs(30);

/// What the leader wants of one peer: a vouch request sent under `vote` at or after `since`.
#[derive(Debug, Default)]
struct Want {
    wanted: Option<(Vote<NodeId>, Instant)>,
    ended: bool,
    /// The peer has no such RPC (an older fetcd): its reads are confirmed by the replication
    /// traffic alone, and no sender starts again.
    unsupported: bool,
}

#[derive(Debug)]
struct PeerVouches {
    /// The peer URL its sender sends to.
    addr: String,
    want: Mutex<Want>,
    changed: tokio::sync::Notify,
}

/// The leader's vouch requests, one sender task per peer, sent when a read waits for a
/// confirmation and no request to that peer has left since the read arrived.
#[derive(Debug, Clone)]
pub struct Vouchers {
    net: Network,
    acks: Arc<LeaderAcks>,
    /// Per peer, its sender's state.
    peers: Arc<Mutex<HashMap<NodeId, Arc<PeerVouches>>>>,
}

impl Vouchers {
    /// Vouch requests over `net`, whose answers are recorded in `acks`.
    pub fn new(net: Network, acks: Arc<LeaderAcks>) -> Self {
        Vouchers {
            net,
            acks,
            peers: Arc::default(),
        }
    }

    /// Asks peer `id` at `addr` to vouch for `vote` with a request sent at or after `since`.
    pub fn want(&self, id: NodeId, addr: &str, vote: Vote<NodeId>, since: Instant) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = peers.get(&id).filter(|p| p.addr == addr) {
            // Under the want's lock: the sender ends only under it, having found nothing new
            // wanted, so either it sees this want or this sees it ended.
            let mut w = lock(&p.want);
            if w.unsupported {
                return;
            }
            if !w.ended {
                let newer = match w.wanted {
                    Some((v, at)) => v != vote || since > at,
                    None => true,
                };
                if newer {
                    w.wanted = Some((vote, since));
                    drop(w);
                    p.changed.notify_one();
                }
                return;
            }
        }
        let p = Arc::new(PeerVouches {
            addr: addr.to_string(),
            want: Mutex::new(Want {
                wanted: Some((vote, since)),
                ..Want::default()
            }),
            changed: tokio::sync::Notify::new(),
        });
        // A sender replaced (its peer moved to another URL) gets no more wants and idles out.
        peers.insert(id, p.clone());
        tokio::spawn(send_vouch_requests(self.clone(), id, p));
    }
}

fn lock(m: &Mutex<Want>) -> std::sync::MutexGuard<'_, Want> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends `peer`'s vouch requests one at a time: whenever one is wanted since later than the
/// last one left, the next leaves at once.
async fn send_vouch_requests(v: Vouchers, id: NodeId, peer: Arc<PeerVouches>) {
    // When the last request left, and for which vote.
    let mut last_sent: Option<(Instant, Vote<NodeId>)> = None;
    let mut stream: Option<OrderedStream> = None;
    let mut seq = 0u64;
    loop {
        let changed = peer.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let due = {
            let w = lock(&peer.want);
            w.wanted
                .filter(|(vote, since)| last_sent.is_none_or(|(s, v)| *since > s || *vote != v))
        };
        let Some((vote, _)) = due else {
            if tokio::time::timeout(IDLE_END, changed).await.is_err() {
                let mut w = lock(&peer.want);
                if w.wanted.is_none_or(|(vote, since)| {
                    last_sent.is_some_and(|(s, v)| since <= s && vote == v)
                }) {
                    w.ended = true;
                    return;
                }
            }
            continue;
        };
        seq += 1;
        let sent = Instant::now();
        last_sent = Some((sent, vote));
        let req = VouchRequest { seq, vote };
        match tokio::time::timeout(
            ANSWER_TIMEOUT,
            exchange(&v.net, &peer.addr, &mut stream, &req),
        )
        .await
        {
            Ok(Ok(a)) if a.seq == seq => {
                if a.vouches {
                    v.acks.vouched(id, vote, sent);
                }
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                let mut w = lock(&peer.want);
                w.ended = true;
                w.unsupported = true;
                return;
            }
            Ok(Ok(_)) | Ok(Err(_)) | Err(_) => {
                // A late or lost answer: start over on a new stream, after a pause (a peer that
                // is down; the reads fall back to the replication traffic meanwhile).
                stream = None;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Sends `req` on the stream (opened first if needed) and reads its answer.
async fn exchange(
    net: &Network,
    addr: &str,
    stream: &mut Option<OrderedStream>,
    req: &VouchRequest,
) -> Result<VouchAnswer, tonic::Status> {
    if let Err(e) = net.check_link(addr) {
        return Err(tonic::Status::unavailable(e.to_string()));
    }
    let msg = crate::network::encode(req)?;
    net.delay(addr).await;
    let s = match stream {
        Some(s) => s,
        None => stream.insert(OrderedStream::open(net, addr, OrderedRpc::VouchStream).await?),
    };
    let res = s.exchange(msg).await.and_then(|m| {
        crate::network::decode::<VouchAnswer>(&m)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    });
    if res.is_err() {
        *stream = None;
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_vouches_only_for_the_committed_vote_it_saved() {
        let mut v = Vote::new(3, 1);
        assert!(!vouches(Some(&v), &v), "not a leader's vote yet");
        v.commit();
        assert!(vouches(Some(&v), &v));
        assert!(!vouches(None, &v));
        let mut newer = Vote::new(4, 2);
        assert!(!vouches(Some(&newer), &v), "voted for a newer candidate");
        newer.commit();
        assert!(!vouches(Some(&newer), &v), "follows a newer leader");
        let mut older = Vote::new(2, 1);
        older.commit();
        assert!(!vouches(Some(&older), &v), "has not seen this leader yet");
    }
}
