//! Responses larger than one HTTP/2 frame, through a real client: the client port gathers a
//! large response's frames into few socket writes and holds the last of them until the
//! connection's next poll (`fetcd_server::coalesce`). Nothing may be left behind: every such
//! answer must arrive whole and promptly, on unary calls and on a watch stream, and the
//! connection must go on serving after it.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use etcd_client::{Client, GetOptions, Txn, TxnOp, WatchOptions};
use fetcd_server::{Config, EtcdServer};

/// Far above what a loopback answer takes; a held-back tail that is never sent hits it.
const WAIT: Duration = Duration::from_secs(5);

fn value(i: usize, len: usize) -> Vec<u8> {
    let mut v = format!("{i:06}-").into_bytes();
    v.resize(len, b'a' + (i % 26) as u8);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_ranges_and_watch_responses_arrive_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = EtcdServer::start(Config::for_test(dir.path().join("data")))
        .await
        .unwrap();
    let mut c = Client::connect([server.client_url().as_str()], None)
        .await
        .unwrap();
    let mut watcher = c.clone();
    let watch = watcher.watch("big/", Some(WatchOptions::new().with_prefix()));
    let mut events = tokio::time::timeout(WAIT, watch)
        .await
        .expect("the watch was not created")
        .unwrap();

    // One revision with 60 puts of 2 KiB: a single watch response of ~125 KiB.
    let n = 60;
    let ops: Vec<TxnOp> = (0..n)
        .map(|i| TxnOp::put(format!("big/{i:03}"), value(i, 2048), None))
        .collect();
    tokio::time::timeout(WAIT, c.txn(Txn::new().and_then(ops)))
        .await
        .expect("the txn was not answered")
        .unwrap();
    let mut got = 0;
    while got < n {
        let r = tokio::time::timeout(WAIT, events.message())
            .await
            .expect("the watch response was held back")
            .unwrap()
            .unwrap();
        for e in r.events() {
            let kv = e.kv().unwrap();
            assert_eq!(kv.value(), value(got, 2048).as_slice());
            got += 1;
        }
    }

    // Ranges of growing size on one connection, each followed by a small request.
    for (round, limit) in [1, 10, 30, 60, 0].into_iter().enumerate() {
        let opts = GetOptions::new().with_prefix().with_limit(limit);
        let r = tokio::time::timeout(WAIT, c.get("big/", Some(opts)))
            .await
            .expect("the range answer was held back")
            .unwrap();
        let want = if limit == 0 { n } else { limit as usize };
        assert_eq!(r.kvs().len(), want, "round {round}");
        for (i, kv) in r.kvs().iter().enumerate() {
            assert_eq!(kv.value(), value(i, 2048).as_slice(), "round {round}");
        }
        tokio::time::timeout(WAIT, c.put("small", format!("{round}"), None))
            .await
            .expect("a small answer after a large one was held back")
            .unwrap();
    }
}
