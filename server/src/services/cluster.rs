//! etcd's Cluster service: the member list joins the Raft membership (ids, roles, the peer URL
//! replication uses) with the attributes every member records through Raft (name, all peer and
//! client URLs); add / remove / update / promote are openraft membership changes made by the
//! leader.

use std::sync::Arc;

use fetcd_proto::etcdserverpb::cluster_server::Cluster;
use fetcd_proto::etcdserverpb::Member;
use fetcd_proto::etcdserverpb::MemberAddRequest;
use fetcd_proto::etcdserverpb::MemberAddResponse;
use fetcd_proto::etcdserverpb::MemberListRequest;
use fetcd_proto::etcdserverpb::MemberListResponse;
use fetcd_proto::etcdserverpb::MemberPromoteRequest;
use fetcd_proto::etcdserverpb::MemberPromoteResponse;
use fetcd_proto::etcdserverpb::MemberRemoveRequest;
use fetcd_proto::etcdserverpb::MemberRemoveResponse;
use fetcd_proto::etcdserverpb::MemberUpdateRequest;
use fetcd_proto::etcdserverpb::MemberUpdateResponse;
use fetcd_proto::raftpb::internal_raft_request::Request;
use fetcd_proto::raftpb::MemberAttributes;
use fetcd_proto::status as msg;
use fetcd_raft::membership::MembershipChange;
use fetcd_raft::membership::MembershipError;
use tonic::Request as GrpcRequest;
use tonic::Response;
use tonic::Status;

use crate::node::EtcdNode;
use crate::status;

/// The Cluster service of one member.
#[derive(Debug, Clone)]
pub struct ClusterService {
    node: Arc<EtcdNode>,
    token: String,
}

impl ClusterService {
    /// The Cluster service of `node`; `token` (`--initial-cluster-token`) derives new members'
    /// ids the way each member derives its own, so a member started with
    /// `--initial-cluster-state existing` has the id it was added under.
    pub fn new(node: Arc<EtcdNode>, token: String) -> Self {
        ClusterService { node, token }
    }

    /// The members now, Raft membership joined with the recorded attributes.
    fn members(&self) -> Result<Vec<Member>, Status> {
        // Waits for the persister to write what is queued (see `KvStore::members`).
        let store = self.node.store();
        let attrs = fetcd_raft::off_worker_if(true, || store.members())
            .map_err(|e| status::storage_error(&e))?;
        Ok(self
            .node
            .raft()
            .members()
            .into_iter()
            .map(|m| {
                let a = attrs.iter().find(|a| a.id == m.id);
                Member {
                    id: m.id,
                    name: a.map(|a| a.name.clone()).unwrap_or_default(),
                    peer_ur_ls: match a {
                        Some(a) if !a.peer_ur_ls.is_empty() => a.peer_ur_ls.clone(),
                        _ => vec![m.peer_url.clone()],
                    },
                    client_ur_ls: a.map(|a| a.client_ur_ls.clone()).unwrap_or_default(),
                    is_learner: m.is_learner,
                }
            })
            .collect())
    }

    async fn change(&self, change: MembershipChange) -> Result<(), Status> {
        match self.node.raft().change_membership(change).await {
            Err(e) => Err(status::propose_error(&e)),
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(membership_error(&e)),
        }
    }

    /// Records (or forgets) a member's attributes through Raft.
    async fn record(&self, member: Member, remove: bool) -> Result<(), Status> {
        let req = Request::MemberAttributes(MemberAttributes {
            member: Some(member),
            remove,
        });
        self.node.write(req).await.map(|_| ())
    }
}

/// etcd's gRPC errors for member operations.
fn membership_error(e: &MembershipError) -> Status {
    match e {
        MembershipError::NotFound => Status::not_found(msg::ERR_MEMBER_NOT_FOUND),
        MembershipError::Exists => Status::failed_precondition(msg::ERR_MEMBER_EXIST),
        MembershipError::NotLearner => Status::failed_precondition(msg::ERR_MEMBER_NOT_LEARNER),
        MembershipError::LearnerNotReady => Status::failed_precondition(msg::ERR_LEARNER_NOT_READY),
        MembershipError::Failed(why) => {
            tracing::warn!(%why, "membership change failed");
            Status::unavailable(msg::ERR_LEADER_CHANGED)
        }
    }
}

/// etcd's URL check for member peer URLs: each must be `http://host:port` with nothing after.
fn check_peer_urls(urls: &[String]) -> Result<Vec<String>, Status> {
    let bad = || Status::invalid_argument(msg::ERR_MEMBER_BAD_URLS);
    if urls.is_empty() {
        return Err(bad());
    }
    let mut out = Vec::new();
    for u in urls {
        let rest = u.strip_prefix("http://").ok_or_else(bad)?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        out.push(u.clone());
    }
    out.sort();
    Ok(out)
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn member_add(
        &self,
        req: GrpcRequest<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let r = req.into_inner();
        let peer_urls = check_peer_urls(&r.peer_ur_ls)?;
        let members = self.members()?;
        if members
            .iter()
            .any(|m| m.peer_ur_ls.iter().any(|u| peer_urls.contains(u)))
        {
            return Err(Status::failed_precondition(msg::ERR_PEER_URL_EXIST));
        }
        let id = crate::config::member_id(&peer_urls, &self.token);
        let peer_url = peer_urls[0].clone();
        let change = if r.is_learner {
            MembershipChange::AddLearner { id, peer_url }
        } else {
            MembershipChange::AddVoter { id, peer_url }
        };
        self.change(change).await?;
        let member = Member {
            id,
            name: String::new(),
            peer_ur_ls: peer_urls,
            client_ur_ls: Vec::new(),
            is_learner: r.is_learner,
        };
        self.record(member.clone(), false).await?;
        let mut resp = MemberAddResponse {
            header: None,
            member: Some(member),
            members: self.members()?,
        };
        self.node.fill_ids(&mut resp.header);
        Ok(Response::new(resp))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn member_remove(
        &self,
        req: GrpcRequest<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let id = req.into_inner().id;
        self.change(MembershipChange::Remove { id }).await?;
        let gone = Member {
            id,
            ..Default::default()
        };
        self.record(gone, true).await?;
        let mut resp = MemberRemoveResponse {
            header: None,
            members: self.members()?,
        };
        self.node.fill_ids(&mut resp.header);
        Ok(Response::new(resp))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn member_update(
        &self,
        req: GrpcRequest<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let r = req.into_inner();
        let peer_urls = check_peer_urls(&r.peer_ur_ls)?;
        let members = self.members()?;
        if members
            .iter()
            .any(|m| m.id != r.id && m.peer_ur_ls.iter().any(|u| peer_urls.contains(u)))
        {
            return Err(Status::failed_precondition(msg::ERR_PEER_URL_EXIST));
        }
        let peer_url = peer_urls[0].clone();
        self.change(MembershipChange::Update { id: r.id, peer_url })
            .await?;
        let mut member = members
            .into_iter()
            .find(|m| m.id == r.id)
            .unwrap_or_default();
        member.id = r.id;
        member.peer_ur_ls = peer_urls;
        self.record(member, false).await?;
        let mut resp = MemberUpdateResponse {
            header: None,
            members: self.members()?,
        };
        self.node.fill_ids(&mut resp.header);
        Ok(Response::new(resp))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn member_list(
        &self,
        req: GrpcRequest<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        if req.get_ref().linearizable {
            self.node
                .raft()
                .membership_barrier()
                .await
                .map_err(|e| status::propose_error(&e))?;
        }
        let mut resp = MemberListResponse {
            header: None,
            members: self.members()?,
        };
        self.node.fill_ids(&mut resp.header);
        Ok(Response::new(resp))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn member_promote(
        &self,
        req: GrpcRequest<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let id = req.into_inner().id;
        self.change(MembershipChange::Promote { id }).await?;
        let mut resp = MemberPromoteResponse {
            header: None,
            members: self.members()?,
        };
        self.node.fill_ids(&mut resp.header);
        Ok(Response::new(resp))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn peer_urls_are_checked_like_etcd() {
        assert!(check_peer_urls(&["http://10.0.0.1:2380".into()]).is_ok());
        for bad in [
            "",
            "10.0.0.1:2380",
            "http://10.0.0.1",
            "http://:2380",
            "http://h:x",
        ] {
            let e = check_peer_urls(&[bad.to_string()]).unwrap_err();
            assert_eq!(e.message(), msg::ERR_MEMBER_BAD_URLS, "{bad}");
        }
        assert!(check_peer_urls(&[]).is_err());
    }
}
