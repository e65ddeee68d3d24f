//! What a learner serves to clients.
//!
//! etcd lets a member that does not vote answer only `Status`, `Snapshot` and serializable
//! `Range`; every other gRPC call gets `Unavailable: etcdserver: rpc not supported for learner`,
//! which etcd's clients take as a reason to try another endpoint, and which tools that wait for
//! a new member (kubeadm, Talos) read as "joined, not promoted yet". This layer refuses by the
//! call's path; `Range` passes, and the KV service refuses a linearizable one, as only it sees
//! the request. HTTP endpoints (`/health`, `/metrics`, `/version`) are not gRPC and pass.

use std::sync::Arc;
use std::task::Context;
use std::task::Poll;

use fetcd_proto::status as msg;
use futures::future::Either;
use futures::future::Ready;
use tonic::body::Body;
use tonic::Status;

use crate::node::EtcdNode;

/// The gRPC calls a learner serves (the Range among them only when serializable).
const LEARNER_PATHS: [&str; 3] = [
    "/etcdserverpb.Maintenance/Status",
    "/etcdserverpb.Maintenance/Snapshot",
    "/etcdserverpb.KV/Range",
];

/// etcd's answer to a call a learner does not serve.
pub fn not_for_learner() -> Status {
    Status::unavailable(msg::ERR_NOT_SUPPORTED_FOR_LEARNER)
}

/// Adds [`LearnerGate`] around a service.
#[derive(Clone, Debug)]
pub struct LearnerGateLayer {
    node: Arc<EtcdNode>,
}

impl LearnerGateLayer {
    /// Refuses what `node` may not serve while it is a learner.
    pub fn new(node: Arc<EtcdNode>) -> Self {
        LearnerGateLayer { node }
    }
}

impl<S> tower::Layer<S> for LearnerGateLayer {
    type Service = LearnerGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LearnerGate {
            inner,
            node: self.node.clone(),
        }
    }
}

/// See [`LearnerGateLayer`].
#[derive(Clone, Debug)]
pub struct LearnerGate<S> {
    inner: S,
    node: Arc<EtcdNode>,
}

/// True for a gRPC call a learner must refuse.
fn refused_for_learner(req: &http::Request<Body>) -> bool {
    crate::metrics::is_grpc(req) && !LEARNER_PATHS.contains(&req.uri().path())
}

impl<S> tower::Service<http::Request<Body>> for LearnerGate<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if self.node.raft().is_learner() && refused_for_learner(&req) {
            return Either::Left(futures::future::ready(Ok(not_for_learner().into_http())));
        }
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpc(path: &str) -> http::Request<Body> {
        http::Request::builder()
            .uri(path)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(Body::empty())
            .expect("request")
    }

    #[test]
    fn a_learner_serves_status_snapshot_and_range_only() {
        for p in LEARNER_PATHS {
            assert!(!refused_for_learner(&grpc(p)), "{p}");
        }
        for p in [
            "/etcdserverpb.KV/Put",
            "/etcdserverpb.KV/Txn",
            "/etcdserverpb.Watch/Watch",
            "/etcdserverpb.Lease/LeaseGrant",
            "/etcdserverpb.Cluster/MemberList",
            "/etcdserverpb.Cluster/MemberPromote",
            "/etcdserverpb.Maintenance/Alarm",
            "/etcdserverpb.Auth/Authenticate",
        ] {
            assert!(refused_for_learner(&grpc(p)), "{p}");
        }
        // Not gRPC: etcd's HTTP endpoints stay up on a learner.
        let health = http::Request::builder()
            .uri("/health")
            .body(Body::empty())
            .expect("request");
        assert!(!refused_for_learner(&health));
    }
}
