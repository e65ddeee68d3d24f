//! fetcd-only checks of what etcd 3.4 (the differential reference) answers in another shape:
//! the HTTP endpoints (etcd 3.5's `/health` JSON with `reason`, `/version` with fetcd's reported
//! 3.5 version) on the client port and on `--listen-metrics-urls`, and the snapshot round trip
//! `etcdctl snapshot save` → `fetcd snapshot restore` → fetcd serving the restored data.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use etcd_client::{Client, GetOptions, PutOptions};
use fetcd_server::{Config, EtcdServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Key, value, create and mod revision, version, lease.
type KvFields = (Vec<u8>, Vec<u8>, i64, i64, i64, i64);

/// A plain HTTP/1.1 GET over TCP: `(status code, body)`.
async fn http_get(url: &str, path: &str) -> (u16, String) {
    let host = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, body.to_string())
}

/// The value of an unlabelled metric line `name value`.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_on_client_and_metrics_ports() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_test(dir.path().join("data"));
    config.listen_metrics_urls = vec!["http://127.0.0.1:0".into()];
    let server = EtcdServer::start(config).await.unwrap();
    let url = server.client_url();
    let metrics_url = server.metrics_urls()[0].clone();
    let mut c = Client::connect([url.as_str()], None).await.unwrap();
    c.put("k", "v", None).await.unwrap();
    let _ = c
        .get("missing", Some(GetOptions::new().with_revision(99)))
        .await;

    let (code, body) = http_get(&url, "/health").await;
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"health":"true","reason":""}"#)
    );
    let (code, body) = http_get(&url, "/version").await;
    assert_eq!(code, 200);
    assert_eq!(body, r#"{"etcdserver":"3.5.13","etcdcluster":"3.5.0"}"#);
    for base in [&url, &metrics_url] {
        let (code, text) = http_get(base, "/metrics").await;
        assert_eq!(code, 200);
        assert_eq!(metric(&text, "etcd_server_has_leader"), 1.0);
        assert!(metric(&text, "etcd_server_leader_changes_seen_total") >= 1.0);
        assert!(metric(&text, "etcd_server_proposals_committed_total") >= 2.0);
        assert!(metric(&text, "etcd_server_proposals_applied_total") >= 2.0);
        assert!(metric(&text, "etcd_mvcc_db_total_size_in_bytes") > 0.0);
        assert!(metric(&text, "etcd_disk_wal_fsync_duration_seconds_count") >= 1.0);
        assert!(metric(&text, "etcd_disk_wal_write_bytes_total") > 0.0);
        assert!(text.contains(r#"grpc_server_started_total{grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"} 1"#), "{text}");
        assert!(text.contains(r#"grpc_server_handled_total{grpc_code="OK",grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"} 1"#), "{text}");
        assert!(text.contains(r#"grpc_server_handled_total{grpc_code="OutOfRange",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 1"#), "{text}");
    }
    let (code, body) = http_get(&metrics_url, "/health").await;
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"health":"true","reason":""}"#)
    );

    // An active alarm makes the member unhealthy, as in etcd 3.5.
    let mut opts = etcd_client::AlarmOptions::new();
    opts.with_member(server.node().raft().id());
    c.alarm(
        etcd_client::AlarmAction::Activate,
        etcd_client::AlarmType::Nospace,
        Some(opts),
    )
    .await
    .unwrap();
    let (code, body) = http_get(&url, "/health").await;
    assert_eq!(
        (code, body.as_str()),
        (503, r#"{"health":"false","reason":"ALARM NOSPACE"}"#)
    );
    server.shutdown().await.unwrap();
}

fn etcdctl() -> Command {
    let bin = std::env::var("ETCDCTL_BIN").unwrap_or_else(|_| "/usr/bin/etcdctl".into());
    let mut c = Command::new(bin);
    c.env("ETCDCTL_API", "3");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_snapshot_save_then_fetcd_restore() {
    let dir = tempfile::tempdir().unwrap();
    let server = EtcdServer::start(Config::for_test(dir.path().join("data")))
        .await
        .unwrap();
    let url = server.client_url();
    let mut c = Client::connect([url.as_str()], None).await.unwrap();
    let lease = c
        .lease_grant(
            600,
            Some(etcd_client::LeaseGrantOptions::new().with_id(0x77)),
        )
        .await
        .unwrap();
    for i in 0..20 {
        c.put(format!("key/{i:02}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    c.put(
        "leased",
        "x",
        Some(PutOptions::new().with_lease(lease.id())),
    )
    .await
    .unwrap();
    c.delete("key/05", None).await.unwrap();
    c.compact(10, None).await.unwrap();
    let before = c
        .get("", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    let rev = before.header().unwrap().revision();
    let hash = c.hash_kv(0).await.unwrap().hash();

    let snap = dir.path().join("snap.db");
    let out = etcdctl()
        .arg(format!("--endpoints={url}"))
        .args(["snapshot", "save"])
        .arg(&snap)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Snapshot saved at"));
    server.shutdown().await.unwrap();

    let restored = dir.path().join("restored");
    let out = Command::new(env!("CARGO_BIN_EXE_fetcd"))
        .args(["snapshot", "restore"])
        .arg(&snap)
        .arg("--data-dir")
        .arg(&restored)
        .args(["--name", "restored"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Restoring again into the same directory is refused.
    let again = Command::new(env!("CARGO_BIN_EXE_fetcd"))
        .args(["snapshot", "restore"])
        .arg(&snap)
        .arg("--data-dir")
        .arg(&restored)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));

    let server = EtcdServer::start(Config::for_test(restored)).await.unwrap();
    let url = server.client_url();
    let mut c = Client::connect([url.as_str()], None).await.unwrap();
    let after = c
        .get("", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(after.header().unwrap().revision(), rev);
    let kvs = |r: &etcd_client::GetResponse| -> Vec<KvFields> {
        r.kvs()
            .iter()
            .map(|kv| {
                (
                    kv.key().to_vec(),
                    kv.value().to_vec(),
                    kv.create_revision(),
                    kv.mod_revision(),
                    kv.version(),
                    kv.lease(),
                )
            })
            .collect()
    };
    assert_eq!(kvs(&after), kvs(&before));
    assert_eq!(kvs(&after).len(), 20);
    assert_eq!(c.hash_kv(0).await.unwrap().hash(), hash);
    let ttl = c.lease_time_to_live(0x77, None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 600);
    let r = c.hash_kv(9).await;
    assert!(r.is_err(), "compaction survives the restore: {r:?}");
    let put = c.put("new", "1", None).await.unwrap();
    assert_eq!(put.header().unwrap().revision(), rev + 1);
    server.shutdown().await.unwrap();
}
