//! Leases across a restart of the member (in-process fetcd, same data dir): leases and their
//! attached keys come back from storage; a never-renewed lease keeps counting down over the
//! restart (its remaining TTL survives); a lease that ran out while the member was down is
//! revoked promptly, with DELETE events; a kept-alive lease gets its full TTL again.
#![cfg(feature = "fetcd")]
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use etcd_client::{
    Client, EventType, GetOptions, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions,
    WatchOptions,
};
use fetcd_server::{Config, EtcdServer};
use fetcd_tests::connect;

async fn start(dir: &std::path::Path) -> Result<(EtcdServer, Client)> {
    let server = EtcdServer::start(Config::for_test(dir.to_path_buf())).await?;
    let client = connect(&server.client_url()).await?;
    Ok((server, client))
}

fn keys(r: &etcd_client::GetResponse) -> Vec<String> {
    r.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

const SHORT: i64 = 0x10; // runs out while the member is down
const LONG: i64 = 0x20; // never renewed: keeps counting down
const KEPT: i64 = 0x30; // renewed once: full TTL from the restart

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_survive_restart_and_expire_on_time() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (server, mut c) = start(dir.path()).await?;
    for (id, ttl) in [(SHORT, 3), (LONG, 30), (KEPT, 30)] {
        c.lease_grant(ttl, Some(LeaseGrantOptions::new().with_id(id)))
            .await?;
    }
    for (k, id) in [
        ("r/short1", SHORT),
        ("r/short2", SHORT),
        ("r/long", LONG),
        ("r/kept", KEPT),
    ] {
        c.put(k, "v", Some(PutOptions::new().with_lease(id)))
            .await?;
    }
    c.put("r/plain", "v", None).await?;
    let last_rev = c.get("r/", None).await?.header().unwrap().revision();
    let (mut keeper, mut stream) = c.lease_keep_alive(KEPT).await?;
    keeper.keep_alive().await?;
    let r = stream.message().await?.context("keepalive answer")?;
    ensure!(r.ttl() == 30);
    drop((keeper, stream));
    let granted = Instant::now();
    server.shutdown().await?;

    // Down for longer than SHORT's TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (server, mut c) = start(dir.path()).await?;
    let restarted = Instant::now();

    // The expired lease goes promptly, all its keys in one revision, seen by a watcher.
    let mut events = c
        .watch(
            "r/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_prev_key()
                    .with_start_revision(last_rev + 1),
            ),
        )
        .await?;
    let resp = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let r = events.message().await?.context("watch ended")?;
            if !r.events().is_empty() {
                return anyhow::Ok(r);
            }
        }
    })
    .await
    .context("no delete event within 5 s of the restart")??;
    let took = restarted.elapsed();
    ensure!(
        took < Duration::from_secs(2),
        "expired-while-down lease revoked only after {took:?}"
    );
    let evs = resp.events();
    ensure!(evs.len() == 2, "events {evs:?}");
    for e in evs {
        ensure!(e.event_type() == EventType::Delete);
        let kv = e.kv().unwrap();
        ensure!(kv.mod_revision() == last_rev + 1, "one revision");
        ensure!(
            e.prev_kv().unwrap().lease() == SHORT,
            "prev_kv carries the lease"
        );
    }
    let r = c.get("r/", Some(GetOptions::new().with_prefix())).await?;
    ensure!(
        keys(&r) == ["r/kept", "r/long", "r/plain"],
        "{:?}",
        keys(&r)
    );

    // The never-renewed lease kept counting down while the member was down.
    let r = c
        .lease_time_to_live(LONG, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await?;
    let elapsed = granted.elapsed().as_secs() as i64;
    ensure!(r.granted_ttl() == 30);
    ensure!(
        r.ttl() <= 30 - elapsed + 1 && r.ttl() >= 30 - elapsed - 3,
        "remaining {} after {elapsed} s",
        r.ttl()
    );
    ensure!(r.keys() == [b"r/long".to_vec()]);

    // The renewed one starts over: full TTL (plus the election allowance) from the restart.
    let r = c.lease_time_to_live(KEPT, None).await?;
    ensure!(r.ttl() >= 29, "kept lease has {} s", r.ttl());

    let mut ids: Vec<i64> = c.leases().await?.leases().iter().map(|l| l.id()).collect();
    ids.sort();
    ensure!(ids == [LONG, KEPT], "{ids:?}");
    server.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_keeps_the_countdown_of_long_leases() -> Result<()> {
    // With a 1 s checkpoint interval the leader records the remaining TTL of leases longer than
    // that; after a keepalive cleared the countdown, the next checkpoint records it again.
    let dir = tempfile::tempdir()?;
    let mut config = Config::for_test(dir.path().to_path_buf());
    config.experimental_lease_checkpoint_interval = Duration::from_secs(1);
    let server = EtcdServer::start(config).await?;
    let mut c = connect(&server.client_url()).await?;
    c.lease_grant(60, Some(LeaseGrantOptions::new().with_id(7)))
        .await?;
    let store = server.node().store().clone();
    ensure!(
        store.lease(7).unwrap().remaining_ttl == 60,
        "grant records its countdown"
    );
    let (mut keeper, mut stream) = c.lease_keep_alive(7).await?;
    keeper.keep_alive().await?;
    stream.message().await?.context("keepalive answer")?;
    let l = store.lease(7).unwrap();
    ensure!(
        l.remaining_ttl == 0 && l.stamp.is_none(),
        "a keepalive clears the countdown before it is answered: {l:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = store.lease(7).unwrap();
        if l.remaining_ttl > 0 {
            ensure!((55..=60).contains(&l.remaining_ttl), "{l:?}");
            ensure!(l.stamp.is_some());
            break;
        }
        ensure!(Instant::now() < deadline, "no checkpoint within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((keeper, stream));
    server.shutdown().await?;
    Ok(())
}
