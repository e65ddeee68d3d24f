//! The Cluster service against real etcd (one member each): member list shape and every error
//! of add / remove / update / promote must match, code and text.
#![allow(clippy::unwrap_used)]

use anyhow::{ensure, Context, Result};
use etcd_client::MemberAddOptions;
use fetcd_tests::{expect_grpc_error, run_differential, Session};
use serde_json::json;

const NOT_FOUND: &str = "etcdserver: member not found";
const NOT_LEARNER: &str = "etcdserver: can only promote a learner member";
const NOT_READY: &str =
    "etcdserver: can only promote a learner member which is in sync with leader";
const URL_EXISTS: &str = "etcdserver: Peer URLs already exists";
const BAD_URLS: &str = "etcdserver: given member URLs are invalid";

fn grpc<T>(r: &Result<T, etcd_client::Error>) -> serde_json::Value {
    match r {
        Ok(_) => json!("ok"),
        Err(e) => fetcd_tests::observe::error(e),
    }
}

async fn scenario(s: &mut Session) -> Result<()> {
    let list = s.client().member_list().await?;
    ensure!(list.members().len() == 1);
    let me = &list.members()[0];
    let (my_id, my_peer) = (me.id(), me.peer_urls()[0].clone());
    s.record(
        "member list",
        json!({
            "members": list.members().len(),
            "learner": me.is_learner(),
            "peer_urls": me.peer_urls().len(),
            "client_urls": me.client_urls().len(),
            "named": !me.name().is_empty(),
            // etcd's Cluster responses carry ids and term, no revision.
            "header_revision": list.header().map(|h| h.revision()),
        }),
    );

    let r = s.client().member_remove(0x1234).await;
    s.record("remove unknown", grpc(&r));
    expect_grpc_error(&r, "NotFound", NOT_FOUND)?;
    let r = s
        .client()
        .member_update(0x1234, ["http://127.0.0.1:1".to_string()])
        .await;
    s.record("update unknown", grpc(&r));
    expect_grpc_error(&r, "NotFound", NOT_FOUND)?;
    let r = s.client().member_promote(my_id).await;
    s.record("promote a voter", grpc(&r));
    expect_grpc_error(&r, "FailedPrecondition", NOT_LEARNER)?;
    let r = s.client().member_add([my_peer.clone()], None).await;
    s.record("add an existing peer URL", grpc(&r));
    expect_grpc_error(&r, "FailedPrecondition", URL_EXISTS)?;
    let r = s.client().member_add(["not-a-url".to_string()], None).await;
    s.record("add a bad URL", grpc(&r));
    expect_grpc_error(&r, "InvalidArgument", BAD_URLS)?;

    // A learner that never starts: listed, never ready for promotion, removable.
    let r = s
        .client()
        .member_add(
            ["http://127.0.0.1:1".to_string()],
            Some(MemberAddOptions::new().with_is_learner()),
        )
        .await?;
    let m = r.member().context("added")?;
    s.record(
        "add a learner",
        json!({ "learner": m.is_learner(), "peer_urls": m.peer_urls(), "name": m.name(),
                "members": r.member_list().len(),
                "header_revision": r.header().map(|h| h.revision()) }),
    );
    ensure!(m.is_learner() && r.member_list().len() == 2);
    let id = m.id();
    let r = s.client().member_promote(id).await;
    s.record("promote a learner that is not in sync", grpc(&r));
    expect_grpc_error(&r, "FailedPrecondition", NOT_READY)?;
    let r = s.client().member_remove(id).await?;
    s.record("remove the learner", json!(r.members().len()));
    ensure!(r.members().len() == 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_operations_and_errors_match_etcd() -> Result<()> {
    run_differential("cluster api", scenario).await
}
