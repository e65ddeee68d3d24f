//! A watcher whose client stops reading must not slow writers down or lose anything: its stream
//! fills up, it falls behind, and it catches up from history in order once the client reads.
#![cfg(feature = "fetcd")]
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::Result;
use fetcd_proto::etcdserverpb::watch_client::WatchClient;
use fetcd_proto::etcdserverpb::watch_request::RequestUnion;
use fetcd_proto::etcdserverpb::WatchCreateRequest;
use fetcd_proto::etcdserverpb::WatchRequest;
use fetcd_server::Config;
use fetcd_server::EtcdServer;
use fetcd_tests::connect;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_watcher_neither_blocks_writers_nor_loses_events() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = EtcdServer::start(Config::for_test(dir.path().to_path_buf())).await?;
    let url = server.client_url();

    // The slow reader: a raw watch stream whose responses nobody reads for now.
    let mut wc = WatchClient::connect(url.clone())
        .await?
        .max_decoding_message_size(64 * 1024 * 1024);
    let (req_tx, req_rx) = tokio::sync::mpsc::channel(4);
    req_tx
        .send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: b"slow/".to_vec(),
                range_end: b"slow0".to_vec(),
                prev_kv: true,
                ..Default::default()
            })),
        })
        .await?;
    let mut responses = wc
        .watch(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await?
        .into_inner();
    let created = responses.message().await?.unwrap();
    assert!(created.created);

    // Writers push far more than the stream's queue and HTTP/2 windows hold (~20 MiB).
    let n = 4000usize;
    let value = vec![b'x'; 5000];
    let mut tasks = Vec::new();
    for w in 0..4 {
        let mut c = connect(&url).await?;
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in (w..n).step_by(4) {
                let r = c
                    .put(format!("slow/{:02}", i % 50), value.clone(), None)
                    .await
                    .unwrap();
                revs.push(r.header().unwrap().revision());
            }
            revs
        }));
    }
    // A deadlock detector, not a performance bound: writers blocked by the stalled watcher
    // would never finish.
    let mut written = Vec::new();
    for t in tasks {
        written.extend(tokio::time::timeout(Duration::from_secs(120), t).await??);
    }
    written.sort();
    assert_eq!(written.len(), n);

    // Now read everything: every revision once, in order, with the right prev_kv.
    let mut seen = Vec::new();
    let mut last_value_of: std::collections::HashMap<Vec<u8>, i64> = Default::default();
    while seen.len() < n {
        let resp = tokio::time::timeout(Duration::from_secs(30), responses.message())
            .await??
            .expect("stream ended early");
        assert!(!resp.canceled, "watch canceled: {resp:?}");
        for ev in resp.events {
            let kv = ev.kv.unwrap();
            if let Some(prev_rev) = last_value_of.get(&kv.key) {
                let prev = ev.prev_kv.expect("prev_kv missing");
                assert_eq!(prev.mod_revision, *prev_rev, "prev_kv of {:?}", kv.key);
            }
            last_value_of.insert(kv.key.clone(), kv.mod_revision);
            seen.push(kv.mod_revision);
        }
    }
    assert_eq!(seen, written, "events lost, repeated or reordered");
    // Shutdown ends open watch streams rather than waiting for clients to close them.
    tokio::time::timeout(Duration::from_secs(30), server.shutdown()).await??;
    assert!(
        responses.message().await.ok().flatten().is_none(),
        "stream still open"
    );
    drop(req_tx);
    Ok(())
}
