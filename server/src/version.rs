//! The etcd versions fetcd reports, in one place.
//!
//! kube-apiserver (1.31+) parses `StatusResponse.version` and relies on watch progress requests
//! (consistent reads from its cache) only for etcd >= 3.5.13, so fetcd reports a 3.5 release at
//! least that new; the API it serves is etcd 3.5's.

/// `StatusResponse.version` and `/version`'s `etcdserver`.
pub const ETCD_SERVER_VERSION: &str = "3.5.13";
/// `/version`'s `etcdcluster`: the cluster version, major.minor.0 as etcd reports it.
pub const ETCD_CLUSTER_VERSION: &str = "3.5.0";
