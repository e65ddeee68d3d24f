//! fetcd's own behaviour as a server, through the third-party `etcd-client` crate: response
//! headers, restart from the data dir, the limits set by flags, services not implemented yet,
//! and linearizable reads under concurrent writes.
#![cfg(feature = "fetcd")]
#![allow(clippy::unwrap_used)]

use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicI64;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Result;
use etcd_client::Client;
use etcd_client::GetOptions;
use etcd_client::Txn;
use etcd_client::TxnOp;
use fetcd_server::Config;
use fetcd_server::EtcdServer;
use fetcd_tests::connect;
use fetcd_tests::expect_grpc_error;

async fn start(config: Config) -> Result<(EtcdServer, Client)> {
    let server = EtcdServer::start(config).await?;
    let client = connect(&server.client_url()).await?;
    Ok((server, client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_headers_carry_etcds_ids_and_term() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = Config::for_test(dir.path().to_path_buf());
    let (member_id, cluster_id) = (config.member_id(), config.cluster_id());
    let (server, mut c) = start(config).await?;
    let r = c.put("k", "v", None).await?;
    let h = r.header().unwrap();
    assert_eq!((h.member_id(), h.cluster_id()), (member_id, cluster_id));
    assert!(h.raft_term() >= 1, "term {}", h.raft_term());
    assert_eq!(h.revision(), 2);
    let r = c.get("k", None).await?;
    assert_eq!(r.header().unwrap().member_id(), member_id);
    server.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_data_revision_and_compaction() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (server, mut c) = start(Config::for_test(dir.path().to_path_buf())).await?;
    for i in 0..50 {
        c.put(format!("k{i:02}"), format!("v{i}"), None).await?;
    }
    c.delete("k00", None).await?;
    c.compact(10, None).await?;
    server.shutdown().await?;

    let (server, mut c) = start(Config::for_test(dir.path().to_path_buf())).await?;
    let r = c.get("k", Some(GetOptions::new().with_prefix())).await?;
    assert_eq!(r.header().unwrap().revision(), 52);
    assert_eq!(r.count(), 49);
    assert_eq!(r.kvs()[0].key(), b"k01");
    let r = c.get("k05", Some(GetOptions::new().with_revision(9))).await;
    expect_grpc_error(
        &r,
        "OutOfRange",
        "etcdserver: mvcc: required revision has been compacted",
    )?;
    let r = c.put("k00", "again", None).await?;
    assert_eq!(r.header().unwrap().revision(), 53);
    let r = c.get("k00", None).await?;
    assert_eq!(
        (r.kvs()[0].create_revision(), r.kvs()[0].version()),
        (53, 1)
    );
    server.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_not_built_yet_answer_unimplemented() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (server, mut c) = start(Config::for_test(dir.path().to_path_buf())).await?;
    let code = |e: etcd_client::Error| match e {
        etcd_client::Error::GRpcStatus(s) => s.code(),
        other => panic!("not a gRPC status: {other}"),
    };
    let unimplemented = tonic::Code::Unimplemented;
    // Maintenance is built; only Downgrade is not.
    let r = c
        .maintenance_client()
        .downgrade(etcd_client::DowngradeOptions::Validate("3.4.0".into()))
        .await;
    assert_eq!(code(r.unwrap_err()), unimplemented);
    assert_eq!(code(c.user_list().await.unwrap_err()), unimplemented);
    server.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_follow_the_flags() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = Config::for_test(dir.path().to_path_buf());
    config.max_txn_ops = 3;
    config.max_request_bytes = 1024;
    let (server, mut c) = start(config).await?;

    let txn = |n: usize| {
        Txn::new().and_then(
            (0..n)
                .map(|i| TxnOp::put(format!("t{i}"), "v", None))
                .collect::<Vec<_>>(),
        )
    };
    c.txn(txn(3)).await?;
    let r = c.txn(txn(4)).await;
    expect_grpc_error(
        &r,
        "InvalidArgument",
        "etcdserver: too many operations in txn request",
    )?;

    c.put("small", vec![b'x'; 900], None).await?;
    let r = c.put("big", vec![b'x'; 2000], None).await;
    expect_grpc_error(&r, "InvalidArgument", "etcdserver: request is too large")?;
    // Past the gRPC allowance (limit + 512 KiB) the transport refuses it, as grpc-go does.
    let r = c
        .put("huge", vec![b'x'; 1024 + 512 * 1024 + 100], None)
        .await;
    let (code, msg) = fetcd_tests::grpc_error(&r).unwrap();
    assert_eq!(code, "ResourceExhausted");
    assert!(
        msg.starts_with("grpc: received message larger than max ("),
        "{msg}"
    );
    // Nothing of the refused requests was applied.
    let r = c
        .get("", Some(GetOptions::new().with_all_keys().with_keys_only()))
        .await?;
    assert_eq!(r.header().unwrap().revision(), 3);
    assert_eq!(r.count(), 4);
    server.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_sort_option_is_refused() -> Result<()> {
    use fetcd_proto::etcdserverpb::kv_client::KvClient;
    use fetcd_proto::etcdserverpb::RangeRequest;
    let dir = tempfile::tempdir()?;
    let server = EtcdServer::start(Config::for_test(dir.path().to_path_buf())).await?;
    let mut kv = KvClient::connect(server.client_url()).await?;
    let err = kv
        .range(RangeRequest {
            key: b"k".to_vec(),
            sort_order: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "etcdserver: invalid sort option");
    server.shutdown().await?;
    Ok(())
}

/// A linearizable read started after a write was acknowledged must see it (or something newer):
/// readers check each answer against the newest revision acknowledged before they asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linearizable_reads_never_go_back_in_time() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (server, c) = start(Config::for_test(dir.path().to_path_buf())).await?;
    let acked = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3 {
        let (mut c, acked, stop) = (c.clone(), acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = c.put(format!("w{w}"), format!("{i}"), None).await.unwrap();
                acked.fetch_max(r.header().unwrap().revision(), Ordering::SeqCst);
                i += 1;
            }
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (mut c, acked) = (c.clone(), acked.clone());
        readers.push(tokio::spawn(async move {
            for _ in 0..200 {
                let before = acked.load(Ordering::SeqCst);
                let r = c
                    .get("w", Some(GetOptions::new().with_prefix()))
                    .await
                    .unwrap();
                let rev = r.header().unwrap().revision();
                assert!(
                    rev >= before,
                    "stale read: revision {rev} < acknowledged {before}"
                );
                let newest = r
                    .kvs()
                    .iter()
                    .map(|kv| kv.mod_revision())
                    .max()
                    .unwrap_or(0);
                assert!(newest <= rev);
            }
        }));
    }
    for r in readers {
        r.await?;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await?;
    }
    server.shutdown().await?;
    Ok(())
}

/// `--auto-compaction-mode revision --auto-compaction-retention 10`: the leader compacts at
/// `current - 10` on its own (every 200 ms here instead of etcd's five minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revision_auto_compaction_keeps_the_last_revisions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = Config::for_test(dir.path().to_path_buf());
    config.auto_compaction_mode = "revision".into();
    config.auto_compaction_retention = "10".into();
    config.auto_compaction_revision_interval = std::time::Duration::from_millis(200);
    let (server, mut c) = start(config).await?;
    for i in 0..30 {
        c.put("k", format!("v{i}"), None).await?; // 2..=31
    }
    let at = |rev| Some(GetOptions::new().with_revision(rev));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let r = c.get("k", at(20)).await;
        if expect_grpc_error(
            &r,
            "OutOfRange",
            "etcdserver: mvcc: required revision has been compacted",
        )
        .is_ok()
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not compacted: {r:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Compacted at 31 - 10 = 21: that revision and the later ones stay readable.
    let r = c.get("k", at(21)).await?;
    assert_eq!(r.kvs()[0].value(), b"v19");
    // Nothing more is compacted while nothing is written.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let r = c.get("k", at(21)).await?;
    assert_eq!(r.kvs()[0].value(), b"v19");
    server.shutdown().await?;
    Ok(())
}

#[test]
fn compaction_flags_are_checked_like_etcds() {
    use clap::Parser;
    let parse = |args: &[&str]| {
        Config::try_parse_from(std::iter::once("fetcd").chain(args.iter().copied()))
            .unwrap()
            .validate()
    };
    assert!(parse(&["--auto-compaction-retention", "1"]).is_ok());
    assert!(parse(&["--auto-compaction-retention", "30m"]).is_ok());
    assert!(parse(&[
        "--auto-compaction-mode",
        "revision",
        "--auto-compaction-retention",
        "1000"
    ])
    .is_ok());
    let e = parse(&[
        "--auto-compaction-mode",
        "daily",
        "--auto-compaction-retention",
        "1",
    ]);
    assert!(e.unwrap_err().to_string().contains("auto-compaction-mode"));
    let e = parse(&[
        "--auto-compaction-mode",
        "revision",
        "--auto-compaction-retention",
        "1h",
    ]);
    assert!(e
        .unwrap_err()
        .to_string()
        .contains("auto-compaction-retention"));
}

#[test]
fn initial_corrupt_check_flag_reads_as_etcds_boolean() {
    use clap::Parser;
    let parse = |args: &[&str]| {
        Config::try_parse_from(std::iter::once("fetcd").chain(args.iter().copied())).unwrap()
    };
    assert!(!parse(&[]).initial_corrupt_check());
    assert!(parse(&["--experimental-initial-corrupt-check"]).initial_corrupt_check());
    assert!(parse(&["--experimental-initial-corrupt-check=true"]).initial_corrupt_check());
    assert!(!parse(&["--experimental-initial-corrupt-check=false"]).initial_corrupt_check());
    let e = parse(&["--experimental-initial-corrupt-check=maybe"]).validate();
    assert!(e.unwrap_err().to_string().contains("initial-corrupt-check"));
}
