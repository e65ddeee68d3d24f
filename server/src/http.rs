//! etcd's HTTP endpoints, served on the client port next to gRPC (as etcd does: one listener,
//! requests told apart by content type) and on `--listen-metrics-urls`:
//!
//! - `GET /health`: `{"health":"true","reason":""}` (etcd 3.5's shape) only if no alarm is active,
//!   a leader is known and a linearizable read point is reached within a second; otherwise 503
//!   with `"health":"false"` and etcd's reason text.
//! - `GET /version`: `{"etcdserver":"3.5.x","etcdcluster":"3.5.0"}`.
//! - `GET /metrics`: Prometheus text (see [`crate::metrics`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use fetcd_proto::etcdserverpb::AlarmType;
use http::header::CONTENT_TYPE;
use http::StatusCode;

use crate::node::EtcdNode;
use crate::version;

/// How long `/health` waits for a linearizable read point (etcd: one second).
const HEALTH_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// The HTTP routes of one member.
pub fn router(node: Arc<EtcdNode>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/version", get(version_handler))
        .route("/metrics", get(metrics))
        .with_state(node)
}

/// Why the member is unhealthy, as etcd 3.5 words it; `None` when healthy.
pub async fn health_problem(node: &EtcdNode) -> Option<String> {
    if let Some(a) = node.store().alarms(AlarmType::None).first() {
        let name = AlarmType::try_from(a.alarm)
            .map(|t| t.as_str_name().to_string())
            .unwrap_or_else(|_| a.alarm.to_string());
        return Some(format!("ALARM {name}"));
    }
    if node.raft().leader().is_none() {
        return Some("RAFT NO LEADER".into());
    }
    match tokio::time::timeout(HEALTH_READ_TIMEOUT, node.read_barrier(false)).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("QGET ERROR:{}", e.message())),
        Err(_) => Some("QGET ERROR:etcdserver: request timed out".into()),
    }
}

fn json(status: StatusCode, body: String) -> axum::response::Response {
    (status, [(CONTENT_TYPE, "application/json")], body).into_response()
}

async fn health(State(node): State<Arc<EtcdNode>>) -> axum::response::Response {
    match health_problem(&node).await {
        None => json(StatusCode::OK, r#"{"health":"true","reason":""}"#.into()),
        Some(reason) => {
            tracing::warn!(%reason, "serving /health false");
            let reason = reason.replace('\\', "\\\\").replace('"', "\\\"");
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(r#"{{"health":"false","reason":"{reason}"}}"#),
            )
        }
    }
}

async fn version_handler() -> axum::response::Response {
    json(
        StatusCode::OK,
        format!(
            r#"{{"etcdserver":"{}","etcdcluster":"{}"}}"#,
            version::ETCD_SERVER_VERSION,
            version::ETCD_CLUSTER_VERSION
        ),
    )
}

async fn metrics(State(node): State<Arc<EtcdNode>>) -> axum::response::Response {
    node.refresh_db_size_in_use().await;
    (
        StatusCode::OK,
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        crate::metrics::render(&node),
    )
        .into_response()
}
