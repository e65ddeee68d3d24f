//! Three-member in-process clusters: every member accepts every request (followers forward
//! writes and take a read index from the leader), a linearizable read on a follower never misses
//! a write acknowledged before it, the cluster forms once and survives losing its leader under
//! write load without losing an acknowledged write, and all members restart from disk.
#![cfg(feature = "fetcd")]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, WatchOptions};
use fetcd_tests::cluster::Cluster;

fn rev(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.map_or(0, |h| h.revision())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_member_serves_writes_and_linearizable_reads() -> Result<()> {
    let c = Cluster::start(3).await?;
    let leader = c.leader().context("leader")?;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(c.client(i).await?);
    }
    // One cluster: the same cluster id everywhere, each member its own id, one leader.
    let mut cluster_ids = Vec::new();
    let mut member_ids = Vec::new();
    for cl in &mut clients {
        let r = cl.get("nothing", None).await?;
        let h = r.header().unwrap();
        cluster_ids.push(h.cluster_id());
        member_ids.push(h.member_id());
    }
    cluster_ids.dedup();
    ensure!(cluster_ids.len() == 1, "cluster ids {cluster_ids:?}");
    member_ids.sort();
    member_ids.dedup();
    ensure!(member_ids.len() == 3);

    let rpcs_before = append_entries_rpcs(&c, leader)?;
    // Writes through every member (followers forward), each read at once through every other
    // member, linearizably: never stale.
    for round in 0..20 {
        for w in 0..3 {
            let key = format!("k{w}");
            let val = format!("v{round}");
            let put = clients[w].put(key.as_str(), val.as_str(), None).await?;
            let put_rev = rev(put.header());
            for (r, reader) in clients.iter_mut().enumerate() {
                // A Range and a Txn of compares only (which etcd would answer from a follower's
                // own state, without a read index), each first after the write in turn.
                for txn_first in [(round + r) % 2 == 1, (round + r) % 2 == 0] {
                    if txn_first {
                        let cmp = Compare::value(key.as_str(), CompareOp::Equal, val.as_str());
                        let t = reader.txn(Txn::new().when([cmp])).await?;
                        ensure!(
                            t.succeeded() && rev(t.header()) >= put_rev,
                            "member {r}: compares-only Txn stale after a write through member {w}: {t:?}"
                        );
                    } else {
                        let got = reader.get(key.as_str(), None).await?;
                        ensure!(
                            got.kvs().first().map(|kv| kv.value()) == Some(val.as_bytes()),
                            "member {r} read {key} stale after a write through member {w} (leader {leader})"
                        );
                        ensure!(rev(got.header()) >= put_rev);
                    }
                }
            }
            // A serializable read on the member that took the write sees it too: a forwarded
            // write is answered only once applied there.
            let own = clients[w]
                .get(key.as_str(), Some(GetOptions::new().with_serializable()))
                .await?;
            ensure!(own.kvs().first().map(|kv| kv.value()) == Some(val.as_bytes()));
        }
    }
    // Revisions agree on every member.
    let mut revs = Vec::new();
    for cl in &mut clients {
        revs.push(rev(cl.get("k0", None).await?.header()));
    }
    revs.dedup();
    ensure!(revs.len() == 1, "revisions {revs:?}");

    // The leader's /metrics counted the AppendEntries round trips to each follower: each of the
    // 60 writes went to both with its entry; empty ones carried commit indexes and heartbeats.
    let rpcs_after = append_entries_rpcs(&c, leader)?;
    ensure!(rpcs_after.len() == 2);
    // etcd's peer round-trip histogram (its "member communication slow" alert) holds the empty
    // ones, which wait on no disk; only the leader says it leads.
    let text = fetcd_server::metrics::render(c.server(leader).context("server")?.node());
    for (i, (_, empty)) in (0..c.len()).filter(|i| *i != leader).zip(&rpcs_after) {
        let to = c.member_id(i).context("member id")?;
        let name = format!("etcd_network_peer_round_trip_time_seconds_count{{To=\"{to:x}\"}} ");
        let n: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name}"))?;
        ensure!(n >= *empty, "{name}{n}, empty AppendEntries {empty}");
        // The dashboard's peer traffic: the 60 entries went out, answers came back.
        for series in [
            format!("etcd_network_peer_sent_bytes_total{{To=\"{to:x}\"}} "),
            format!("etcd_network_peer_received_bytes_total{{From=\"{to:x}\"}} "),
        ] {
            let bytes: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {series}"))?;
            ensure!(bytes > 60.0 * 10.0, "{series}{bytes}");
        }
    }
    // The followers' side of that traffic, counted where they serve it: what the leader sent
    // its followers they received, and the answers they sent it the leader received. The
    // counters are process-wide and keyed by peer, so the sums also hold the election's votes
    // between followers, and a message may be in flight: a few KiB of slack, against the tens
    // of KiB the entries and leadership checks take.
    let value = |series: &str| -> Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {series}"))
    };
    let me = c.member_id(leader).context("leader id")?;
    let (mut to_followers, mut from_followers) = (0.0, 0.0);
    for i in (0..c.len()).filter(|i| *i != leader) {
        let f = c.member_id(i).context("member id")?;
        to_followers += value(&format!(
            "etcd_network_peer_sent_bytes_total{{To=\"{f:x}\"}}"
        ))?;
        from_followers += value(&format!(
            "etcd_network_peer_received_bytes_total{{From=\"{f:x}\"}}"
        ))?;
    }
    let served = value(&format!(
        "etcd_network_peer_received_bytes_total{{From=\"{me:x}\"}}"
    ))?;
    let answered = value(&format!(
        "etcd_network_peer_sent_bytes_total{{To=\"{me:x}\"}}"
    ))?;
    ensure!(
        served + 4096.0 >= to_followers && answered + 4096.0 >= from_followers,
        "leader sent {to_followers} and received {from_followers} bytes; followers received \
         {served} and answered {answered}"
    );
    for i in 0..c.len() {
        let text = fetcd_server::metrics::render(c.server(i).context("server")?.node());
        let want = format!("etcd_server_is_leader {}", u8::from(i == leader));
        ensure!(text.lines().any(|l| l == want), "member {i}: no `{want}`");
    }
    for (before, after) in rpcs_before.iter().zip(&rpcs_after) {
        ensure!(
            after.0 >= before.0 + 60.0 && after.1 > before.1,
            "AppendEntries round trips (entries, empty): {rpcs_before:?} -> {rpcs_after:?}"
        );
    }
    Ok(())
}

/// Per follower of `leader`: `(with entries, empty)` AppendEntries round trips to it in the
/// leader's metrics (process-wide counters labelled by target member; no member outside this
/// cluster sends to these, as member ids follow from the cluster's own peer URLs).
fn append_entries_rpcs(c: &Cluster, leader: usize) -> Result<Vec<(f64, f64)>> {
    let text = fetcd_server::metrics::render(c.server(leader).context("server")?.node());
    let mut out = Vec::new();
    for i in (0..c.len()).filter(|i| *i != leader) {
        let to = c.member_id(i).context("member id")?;
        let count = |kind: &str| -> Result<f64> {
            let name = format!(
                "fetcd_raft_append_entries_round_trip_seconds_count{{To=\"{to:x}\",kind=\"{kind}\"}} "
            );
            text.lines()
                .find_map(|l| l.strip_prefix(name.as_str()))
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {name} in\n{text}"))
        };
        out.push((count("entries")?, count("empty")?));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_on_a_follower_sees_writes_through_the_leader() -> Result<()> {
    let c = Cluster::start(3).await?;
    let leader = c.leader().context("leader")?;
    let follower = (leader + 1) % 3;
    let mut fc = c.client(follower).await?;
    let mut lc = c.client(leader).await?;
    let mut stream = fc
        .watch(
            "w/",
            Some(WatchOptions::new().with_prefix().with_prev_key()),
        )
        .await?;
    for i in 0..10 {
        lc.put(format!("w/{i}"), format!("{i}"), None).await?;
    }
    lc.delete("w/3", None).await?;
    let mut seen = Vec::new();
    while seen.len() < 11 {
        let r = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .context("watch on follower stalled")??
            .context("watch ended")?;
        for e in r.events() {
            seen.push((
                e.kv().unwrap().key_str()?.to_string(),
                e.kv().unwrap().mod_revision(),
            ));
        }
    }
    let revs: Vec<i64> = seen.iter().map(|s| s.1).collect();
    let mut sorted = revs.clone();
    sorted.sort();
    sorted.dedup();
    ensure!(revs == sorted, "ordered and unique: {revs:?}");
    ensure!(seen[10].0 == "w/3");
    Ok(())
}

type Acked = Arc<Mutex<BTreeMap<String, (String, i64)>>>;

/// Keys under `prefix` and their (value, mod revision), read linearizably through member `i`.
async fn stored(c: &Cluster, i: usize, prefix: &str) -> Result<BTreeMap<String, (String, i64)>> {
    let mut cl = c.client(i).await?;
    let r = cl
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    r.kvs()
        .iter()
        .map(|kv| {
            Ok((
                kv.key_str()?.to_string(),
                (kv.value_str()?.to_string(), kv.mod_revision()),
            ))
        })
        .collect()
}

/// Checks that member `i` stores every acknowledged write under `prefix` at its revision, and
/// that no two writes share a revision.
async fn check_acked(
    c: &Cluster,
    i: usize,
    prefix: &str,
    acked: &BTreeMap<String, (String, i64)>,
) -> Result<()> {
    let all = stored(c, i, prefix).await?;
    for (k, v) in acked {
        ensure!(
            all.get(k) == Some(v),
            "member {i}: acknowledged {k}={v:?} is {:?}",
            all.get(k)
        );
    }
    let mut revs: Vec<i64> = all.values().map(|v| v.1).collect();
    let n = revs.len();
    revs.sort();
    revs.dedup();
    ensure!(revs.len() == n, "member {i}: two writes share a revision");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_failover_under_load_loses_no_acknowledged_write() -> Result<()> {
    let mut c = Cluster::start(3).await?;
    let leader = c.leader().context("leader")?;
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..6 {
        let member = w % 3;
        let mut cl = c.client(member).await?;
        let acked = acked.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            let mut errors = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("f/{w}/{n}");
                let val = format!("{w}-{n}");
                match tokio::time::timeout(
                    Duration::from_secs(10),
                    cl.put(key.as_str(), val.as_str(), None),
                )
                .await
                {
                    Ok(Ok(r)) => {
                        acked.lock().unwrap().insert(key, (val, rev(r.header())));
                    }
                    // Refused or timed out: unknown outcome, not counted as acknowledged.
                    _ => {
                        errors += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                n += 1;
            }
            errors
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = acked.lock().unwrap().len();
    c.stop(leader).await?;
    // The survivors elect a new leader and writes continue.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after_failover = acked.lock().unwrap().len();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await?;
    }
    ensure!(before > 0, "no write before the failover");
    ensure!(
        after_failover > before,
        "no write acknowledged after the leader stopped ({before} before)"
    );
    let new_leader = c.wait_ready().await?;
    ensure!(new_leader != leader);

    // Every acknowledged write is there, at its revision, on both survivors.
    let acked = acked.lock().unwrap().clone();
    for i in (0..3).filter(|i| *i != leader) {
        check_acked(&c, i, "f/", &acked).await?;
    }

    // The old leader comes back and catches up.
    c.restart(leader).await?;
    c.wait_ready().await?;
    let mut cl = c.client(leader).await?;
    let r = cl
        .get(
            "f/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?;
    ensure!(r.count() as usize >= acked.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn all_members_restart_from_disk() -> Result<()> {
    let mut c = Cluster::start(3).await?;
    let mut cl = c.client(0).await?;
    for i in 0..50 {
        cl.put(format!("r/{i}"), format!("{i}"), None).await?;
    }
    let last = rev(cl.get("r/49", None).await?.header());
    drop(cl);
    c.stop_all().await?;
    c.restart_all().await?;
    c.wait_ready().await?;
    for i in 0..3 {
        let mut cl = c.client(i).await?;
        let r = cl
            .get(
                "r/",
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?;
        ensure!(r.count() == 50, "member {i} has {} keys", r.count());
        ensure!(rev(r.header()) >= last);
    }
    let mut cl = c.client(2).await?;
    let r = cl.put("r/after", "x", None).await?;
    ensure!(rev(r.header()) > last);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_work_through_followers_and_survive_a_leader_change() -> Result<()> {
    use etcd_client::{LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions};
    let mut c = Cluster::start(3).await?;
    let leader = c.leader().context("leader")?;
    let (f1, f2) = ((leader + 1) % 3, (leader + 2) % 3);
    let mut a = c.client(f1).await?;
    let mut b = c.client(f2).await?;
    // Granted through one follower, attached through the other.
    let g = a
        .lease_grant(2, Some(LeaseGrantOptions::new().with_id(0x51)))
        .await?;
    ensure!(g.ttl() == 2);
    // TimeToLive through the other follower lists the key at once, with a header revision no
    // older than the put's (the leader's answer, not the follower's own state).
    for i in 0..10 {
        let put = b
            .put(
                "lk",
                format!("v{i}"),
                Some(PutOptions::new().with_lease(0x51)),
            )
            .await?;
        let t = a
            .lease_time_to_live(0x51, Some(LeaseTimeToLiveOptions::new().with_keys()))
            .await?;
        ensure!(
            t.granted_ttl() == 2
                && t.keys() == [b"lk".to_vec()]
                && rev(t.header()) >= rev(put.header()),
            "put at {}, then {t:?}",
            rev(put.header())
        );
    }
    // Kept alive through a follower for three TTLs.
    let (mut keeper, mut stream) = b.lease_keep_alive(0x51).await?;
    for _ in 0..12 {
        keeper.keep_alive().await?;
        let r = stream.message().await?.context("keepalive ended")?;
        ensure!(
            r.ttl() == 2,
            "keepalive through a follower answered {}",
            r.ttl()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ensure!(a.get("lk", None).await?.kvs().len() == 1);
    let leases = a.leases().await?;
    ensure!(leases.leases().iter().any(|l| l.id() == 0x51));

    // A long lease survives the leader's loss: the new leader keeps it.
    a.lease_grant(60, Some(LeaseGrantOptions::new().with_id(0x52)))
        .await?;
    a.put("long", "v", Some(PutOptions::new().with_lease(0x52)))
        .await?;
    drop((keeper, stream));
    c.stop(leader).await?;
    c.wait_ready().await?;
    let t = a.lease_time_to_live(0x52, None).await?;
    ensure!(t.ttl() > 50, "long lease after failover: {}", t.ttl());
    // The short one, no longer kept alive, expires under the new leader.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        if a.get("lk", None).await?.kvs().is_empty() {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "short lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(b.get("long", None).await?.kvs().len() == 1);
    Ok(())
}

/// Waits until member `i`'s serializable read of prefix `p` counts `n` keys.
async fn wait_count(c: &Cluster, i: usize, p: &str, n: i64) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut cl) = c.client(i).await {
            let opts = GetOptions::new()
                .with_prefix()
                .with_count_only()
                .with_serializable();
            if let Ok(r) = cl.get(p, Some(opts)).await {
                if r.count() == n {
                    return Ok(());
                }
            }
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "member {i} never saw {n} keys under {p}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_list_add_learner_snapshot_catch_up_promote_remove() -> Result<()> {
    use etcd_client::MemberAddOptions;
    // Small snapshots and a short kept log: the new member must catch up from a snapshot.
    let tweak: fetcd_tests::cluster::Tweak = Arc::new(|c| {
        c.snapshot_count = 50;
        c.experimental_snapshot_catchup_entries = 10;
    });
    let mut c = Cluster::start_with(3, Some(tweak)).await?;
    let mut cl = c.client(0).await?;

    // Every member publishes its name and client URL.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = cl.member_list().await?;
        let mut names: Vec<String> = list
            .members()
            .iter()
            .map(|m| m.name().to_string())
            .collect();
        names.sort();
        if names == ["m0", "m1", "m2"] {
            for m in list.members() {
                ensure!(!m.is_learner() && m.client_urls().len() == 1 && m.peer_urls().len() == 1);
            }
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "names {names:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for i in 0..300 {
        cl.put(format!("s/{i:03}"), "x".repeat(100), None).await?;
    }

    // Add a learner, start it: it catches up (the log it needs was purged: a snapshot).
    let (new, url) = c.reserve_member().await?;
    let added = cl
        .member_add(
            [url.clone()],
            Some(MemberAddOptions::new().with_is_learner()),
        )
        .await?;
    let m = added.member().context("added member")?;
    ensure!(m.is_learner() && m.peer_urls() == [url.clone()] && m.name().is_empty());
    ensure!(added.member_list().len() == 4);
    let new_id = m.id();
    // The leader purged the start of its log: the new member can only start from a snapshot.
    let leader = c.leader().context("leader")?;
    let purged = c
        .server(leader)
        .context("leader server")?
        .node()
        .raft()
        .raft()
        .metrics()
        .borrow()
        .purged;
    ensure!(
        purged.is_some_and(|p| p.index > 10),
        "leader log not purged: {purged:?}"
    );
    c.join(new).await?;
    wait_count(&c, new, "s/", 300).await?;
    let mut learner = c.client(new).await?;
    let r = learner
        .get("s/000", Some(GetOptions::new().with_serializable()))
        .await?;
    ensure!(
        r.header().unwrap().member_id() == new_id,
        "the joined member has the id it was added under"
    );
    // A learner serves serializable reads and Status only, as etcd's.
    learner.status().await?;
    let refused: [(&str, Result<(), etcd_client::Error>); 4] = [
        ("get", learner.get("s/000", None).await.map(drop)),
        ("put", learner.put("s/x", "x", None).await.map(drop)),
        ("member list", learner.member_list().await.map(drop)),
        ("lease grant", learner.lease_grant(10, None).await.map(drop)),
    ];
    for (what, r) in refused {
        match r {
            Err(etcd_client::Error::GRpcStatus(st)) => ensure!(
                st.code() == tonic::Code::Unavailable
                    && st.message() == "etcdserver: rpc not supported for learner",
                "{what} on a learner: {st:?}"
            ),
            other => anyhow::bail!("{what} on a learner: {other:?}"),
        }
    }

    // The same peer URL again, an invalid one: etcd's errors.
    let e = cl.member_add([url.clone()], None).await.unwrap_err();
    ensure!(
        e.to_string()
            .contains("etcdserver: Peer URLs already exists"),
        "{e}"
    );
    let e = cl
        .member_add(["not-a-url".to_string()], None)
        .await
        .unwrap_err();
    ensure!(
        e.to_string()
            .contains("etcdserver: given member URLs are invalid"),
        "{e}"
    );

    // Promote (retry while the learner is not in sync yet), through a follower.
    let mut f = c.client((leader + 1) % 3).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match f.member_promote(new_id).await {
            Ok(r) => {
                ensure!(r.members().iter().all(|m| !m.is_learner()));
                break;
            }
            Err(e) if e.to_string().contains("in sync") => {
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "learner never ready"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let e = f.member_promote(new_id).await.unwrap_err();
    ensure!(
        e.to_string()
            .contains("etcdserver: can only promote a learner member"),
        "{e}"
    );
    cl.put("s/after-promote", "y", None).await?;
    wait_count(&c, new, "s/", 301).await?;
    // Promoted, it serves everything once it has the promotion (it may still be on its way):
    // a linearizable read sees the write above.
    let mut promoted = c.client(new).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let r = loop {
        match promoted.get("s/after-promote", None).await {
            Err(e) if e.to_string().contains("not supported for learner") => {
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "still a learner: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => break r?,
        }
    };
    ensure!(
        r.kvs().len() == 1,
        "a promoted member serves linearizable reads"
    );

    // Remove it again; the cluster keeps working; unknown ids are refused.
    let r = cl.member_remove(new_id).await?;
    ensure!(r.members().len() == 3);
    let e = cl.member_remove(new_id).await.unwrap_err();
    ensure!(
        e.to_string().contains("etcdserver: member not found"),
        "{e}"
    );
    c.stop(new).await?;
    cl.put("s/after-remove", "z", None).await?;
    let list = cl.member_list().await?;
    ensure!(list.members().len() == 3 && list.members().iter().all(|m| m.id() != new_id));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hash_kv_and_status_agree_across_members() -> Result<()> {
    let c = Cluster::start(3).await?;
    let mut cl = c.client(1).await?;
    for i in 0..100 {
        cl.put(format!("h/{}", i % 17), format!("{i}"), None)
            .await?;
    }
    cl.delete("h/3", None).await?;
    let rev = rev(cl.get("h/0", None).await?.header());
    cl.compact(rev - 10, None).await?;
    let mut hashes = Vec::new();
    let mut leaders = Vec::new();
    for i in 0..3 {
        let mut m = c.client(i).await?;
        // Each member answers from its own store: wait until it applied the compaction.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let h = loop {
            let h = m.hash_kv(rev).await?;
            if h.compact_version() == rev - 10 {
                break h;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "member {i} never compacted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        hashes.push(h.hash());
        let s = m.status().await?;
        leaders.push(s.leader());
        ensure!(s.raft_index() >= s.raft_applied_index() || s.raft_applied_index() > 0);
    }
    ensure!(
        hashes.windows(2).all(|w| w[0] == w[1]),
        "hashes differ: {hashes:?}"
    );
    ensure!(
        leaders.windows(2).all(|w| w[0] == w[1]) && leaders[0] != 0,
        "leaders {leaders:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_requiring_a_leader_is_canceled_when_the_member_loses_it() -> Result<()> {
    use fetcd_proto::etcdserverpb::watch_request::RequestUnion;
    use fetcd_proto::etcdserverpb::{WatchCreateRequest, WatchRequest};
    let mut c = Cluster::start(3).await?;
    let open = |url: String, require_leader: bool| async move {
        let mut client = fetcd_tests::watch::raw_client(&url).await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: b"hl".to_vec(),
                ..Default::default()
            })),
        })?;
        let mut req = tonic::Request::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        if require_leader {
            req.metadata_mut().insert("hasleader", "true".parse()?);
        }
        let mut stream = client.watch(req).await?.into_inner();
        let created = stream.message().await?.context("no created response")?;
        ensure!(created.created);
        anyhow::Ok((tx, stream))
    };
    let (_t1, mut strict) = open(c.client_url(0), true).await?;
    let (_t2, mut relaxed) = open(c.client_url(0), false).await?;
    // Member 0 alone: it has no leader any more.
    c.stop(1).await?;
    c.stop(2).await?;
    let started = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(20), strict.message())
        .await
        .context("the hasleader stream was not canceled within 20 s")?;
    let status = end.expect_err("the stream must end with an error");
    ensure!(
        status.code() == tonic::Code::Unavailable && status.message() == "etcdserver: no leader",
        "{status:?}"
    );
    // The stream without the requirement stays open.
    let quiet = tokio::time::timeout(Duration::from_millis(500), relaxed.message()).await;
    ensure!(
        quiet.is_err(),
        "the watch without hasleader ended: {quiet:?}"
    );
    eprintln!(
        "hasleader stream canceled {:?} after losing quorum",
        started.elapsed()
    );
    Ok(())
}

const NOT_LEADER: &str = "etcdserver: not leader";
const BAD_TRANSFEREE: &str = "etcdserver: bad leader transferee";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn move_leader_to_each_member_in_turn() -> Result<()> {
    use etcd_client::MemberAddOptions;
    use fetcd_tests::expect_grpc_error;
    let mut c = Cluster::start(3).await?;
    let ids: Vec<u64> = (0..3)
        .map(|i| c.member_id(i).context("member id"))
        .collect::<Result<_>>()?;
    let mut cl = c.client(0).await?;
    for i in 0..20 {
        cl.put(format!("ml/before/{i}"), format!("{i}"), None)
            .await?;
    }

    // etcd's errors. A follower answers `not leader` whatever the target (v3rpc checks that
    // first); the leader refuses a stranger and a learner.
    let leader = c.leader().context("leader")?;
    let (f1, f2) = ((leader + 1) % 3, (leader + 2) % 3);
    let mut fc = c.client(f1).await?;
    for target in [ids[f2], ids[leader], 0x1234] {
        let r = fc.move_leader(target).await;
        expect_grpc_error(&r, "FailedPrecondition", NOT_LEADER)?;
    }
    let mut lc = c.client(leader).await?;
    let r = lc.move_leader(0x1234).await;
    expect_grpc_error(&r, "FailedPrecondition", BAD_TRANSFEREE)?;
    // A learner that never starts (its ports are only reserved): still a member, not a voter.
    let (_, url) = c.reserve_member().await?;
    let added = lc
        .member_add([url], Some(MemberAddOptions::new().with_is_learner()))
        .await?;
    let learner = added.member().context("added member")?.id();
    let r = lc.move_leader(learner).await;
    expect_grpc_error(&r, "FailedPrecondition", BAD_TRANSFEREE)?;
    lc.member_remove(learner).await?;
    ensure!(
        c.leader() == Some(leader),
        "a refused move changed the leader"
    );

    // Three moves, each to the next member: every member leads once, and every member's Status
    // says so. Writes go through the member that just stopped leading.
    for round in 0..3 {
        let from = c.leader().context("leader")?;
        let to = (from + 1) % 3;
        c.client(from).await?.move_leader(ids[to]).await?;
        c.wait_leader_everywhere(ids[to]).await?;
        ensure!(
            c.leader() == Some(to),
            "round {round}: leader {:?}",
            c.leader()
        );
        c.client(from)
            .await?
            .put(format!("ml/after/{round}"), "x", None)
            .await?;
    }

    // etcdctl finds the leader among the endpoints and moves it (host:port endpoints: see the
    // README's note on etcdctl 3.4's per-endpoint commands).
    let from = c.leader().context("leader")?;
    let to = (from + 2) % 3;
    let endpoints = (0..3)
        .map(|i| c.client_url(i).trim_start_matches("http://").to_string())
        .collect::<Vec<_>>()
        .join(",");
    let hex = format!("{:x}", ids[to]);
    let out = fetcd_tests::run_etcdctl(&endpoints, &["move-leader", &hex], None).await?;
    ensure!(
        out.stdout == format!("Leadership transferred from {:x} to {hex}\n", ids[from]),
        "{out:?}"
    );
    c.wait_leader_everywhere(ids[to]).await?;

    // Everything written before, between and after is on every member.
    for i in 0..3 {
        let all = stored(&c, i, "ml/").await?;
        ensure!(all.len() == 23, "member {i} has {} keys", all.len());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn move_leader_under_write_load_loses_no_acknowledged_write() -> Result<()> {
    let c = Cluster::start(3).await?;
    let ids: Vec<u64> = (0..3)
        .map(|i| c.member_id(i).context("member id"))
        .collect::<Result<_>>()?;
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..6 {
        let mut cl = c.client(w % 3).await?;
        let acked = acked.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let (mut n, mut errors) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let key = format!("mw/{w}/{n}");
                let val = format!("{w}-{n}");
                match cl.put(key.as_str(), val.as_str(), None).await {
                    Ok(r) => {
                        acked.lock().unwrap().insert(key, (val, rev(r.header())));
                    }
                    // Unknown outcome: not counted as acknowledged.
                    Err(e) => {
                        errors.push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                n += 1;
            }
            errors
        }));
    }
    let mut counts = Vec::new();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..2 {
        counts.push(acked.lock().unwrap().len());
        let from = c.leader().context("leader")?;
        let to = (from + 1) % 3;
        c.client(from).await?.move_leader(ids[to]).await?;
        c.wait_leader_everywhere(ids[to]).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    counts.push(acked.lock().unwrap().len());
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for w in writers {
        errors.extend(w.await?);
    }
    eprintln!(
        "acknowledged writes at each move and at the end: {counts:?}; failed writes: {}: {:?}",
        errors.len(),
        errors.iter().take(5).collect::<Vec<_>>()
    );
    ensure!(
        counts.windows(2).all(|w| w[1] > w[0]),
        "writes did not go on between moves: {counts:?}"
    );

    let acked = acked.lock().unwrap().clone();
    for i in 0..3 {
        check_acked(&c, i, "mw/", &acked).await?;
    }
    Ok(())
}

/// A leader that dies in the middle of a transfer, after pausing the other members' elections:
/// the pauses lift themselves and the survivors elect a new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfer_pauses_lift_themselves_when_the_leader_dies() -> Result<()> {
    let mut c = Cluster::start(3).await?;
    let leader = c.leader().context("leader")?;
    let pause = Duration::from_secs(4);
    for i in 0..3 {
        let pauses = c
            .server(i)
            .context("server")?
            .node()
            .raft()
            .transfer_pauses()
            .clone();
        if i == leader {
            pauses.quiet_leader(pause);
        } else {
            pauses.pause_elections(pause);
        }
    }
    c.stop(leader).await?;
    let started = std::time::Instant::now();
    let new_leader = c.wait_ready().await?;
    ensure!(new_leader != leader);
    eprintln!(
        "new leader {:?} after the paused leader stopped",
        started.elapsed()
    );
    c.client(new_leader).await?.put("after", "1", None).await?;
    Ok(())
}

/// Writes 20 keys through member 0 and waits until every member has applied them and published
/// its client URL.
async fn write_and_settle(cluster: &Cluster) -> Result<etcd_client::Client> {
    let mut c = cluster.client(0).await?;
    let mut last = 0;
    for i in 0..20 {
        last = rev(c.put(format!("k{i:02}"), "value", None).await?.header());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut ready = c
            .member_list()
            .await?
            .members()
            .iter()
            .all(|m| !m.client_urls().is_empty());
        for i in 0..cluster.len() {
            let r = cluster
                .client(i)
                .await?
                .get("k19", Some(GetOptions::new().with_serializable()))
                .await?;
            ready &= rev(r.header()) >= last;
        }
        if ready {
            return Ok(c);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "members never caught up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Flips one bit of one stored value of stopped member `i` (inside the value field: its last
/// byte), leaving its revision and everything else as they were.
fn damage_one_value(cluster: &Cluster, i: usize) -> Result<()> {
    let kv_dir = cluster
        .config(i, "new")
        .data_dir()
        .join("member")
        .join("kv");
    let store = fetcd_storage::KvStore::open_path(&kv_dir)?;
    let mut records = Vec::new();
    store.export(&mut |tree, k, v| {
        records.push((tree.to_string(), k.to_vec(), v.to_vec()));
        Ok(())
    })?;
    let damaged = records
        .iter_mut()
        .filter(|(tree, _, _)| tree == fetcd_storage::schema::KEY_TREE)
        .nth(5)
        .context("a stored revision")?;
    if let Some(b) = damaged.2.last_mut() {
        *b ^= 1;
    }
    store.import(records.into_iter().map(Ok))?;
    store.flush()?;
    Ok(())
}

/// `EtcdServer::shutdown` returns with the member's files closed, so a program embedding fetcd
/// can reopen the member at once. The leader's replication streams read the Raft log and end a
/// moment after Raft itself stopped: here one of them is always waiting on an RPC, to a peer
/// port that accepts connections and never answers, when the leader stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_returns_with_the_member_files_closed() -> Result<()> {
    let mut cluster = Cluster::start(3).await?;
    cluster.stop(2).await?;
    let peer_url = cluster.config(2, "new").listen_peer_urls[0].clone();
    let black_hole = tokio::net::TcpListener::bind(
        peer_url
            .strip_prefix("http://")
            .context("peer URL without http://")?,
    )
    .await?;
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((conn, _)) = black_hole.accept().await {
            conns.push(conn);
        }
    });
    let leader = cluster.wait_ready().await?;
    let mut c = cluster.client(leader).await?;
    for i in 0..20 {
        c.put(format!("k{i}"), "v", None).await?;
    }
    // Let AppendEntries to the silent peer pile up behind RPC timeouts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut order = vec![leader];
    order.extend((0..2).filter(|i| *i != leader));
    for i in order {
        cluster.stop(i).await?;
        ensure!(
            fetcd_raft::RaftNode::wait_closed(&cluster.config(i, "new").data_dir(), Duration::ZERO),
            "member {i}: Raft log or MVCC store still open after shutdown returned"
        );
    }
    held.abort();
    Ok(())
}

/// `--experimental-initial-corrupt-check`: a member restarts only if its key-space hash matches
/// its peers' at its revision; one whose stored data was damaged while it was down is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn initial_corrupt_check_refuses_a_member_whose_data_differs() -> Result<()> {
    let tweak: fetcd_tests::cluster::Tweak = Arc::new(|c: &mut fetcd_server::Config| {
        c.experimental_initial_corrupt_check = "true".into()
    });
    let mut cluster = Cluster::start_with(3, Some(tweak)).await?;
    let mut c = write_and_settle(&cluster).await?;
    // Undamaged, the member passes the check.
    cluster.stop(2).await?;
    cluster.restart(2).await?;
    cluster.stop(2).await?;

    damage_one_value(&cluster, 2)?;
    let refused = cluster.restart(2).await;
    let err = refused.err().context("a damaged member started")?;
    ensure!(
        err.to_string()
            .contains("found data inconsistency with peers"),
        "unexpected error: {err:#}"
    );
    // The others go on serving (after an election if member 2 had led).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while let Err(e) = c.put("after", "v", None).await {
        ensure!(
            std::time::Instant::now() < deadline,
            "no write after the refusal: {e}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// `--experimental-corrupt-check-time`: the leader finds a member whose stored data differs
/// (damaged while it was down, restarted without the initial check), raises `CORRUPT`, and the
/// cluster then refuses writes with etcd's error while reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn periodic_corrupt_check_raises_the_corrupt_alarm() -> Result<()> {
    let tweak: fetcd_tests::cluster::Tweak = Arc::new(|c: &mut fetcd_server::Config| {
        c.experimental_corrupt_check_time = Duration::from_millis(300)
    });
    let mut cluster = Cluster::start_with(3, Some(tweak)).await?;
    let mut c = write_and_settle(&cluster).await?;
    // Several passes over undamaged members raise nothing.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let raised = alarms(&mut c).await?;
    ensure!(raised.is_empty(), "alarm without damage: {raised:?}");

    cluster.stop(2).await?;
    damage_one_value(&cluster, 2)?;
    cluster.restart(2).await?;
    // Every member refuses, followers included (their writes are refused by the leader).
    for i in 0..3 {
        let mut m = cluster.client(i).await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = m.put("probe", "v", None).await;
            if fetcd_tests::expect_grpc_error(&r, "DataLoss", "etcdserver: corrupt cluster").is_ok()
            {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "member {i} never refused: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let alarms = alarms(&mut c).await?;
    ensure!(
        alarms
            .iter()
            .any(|(_, a)| *a == etcd_client::AlarmType::Corrupt),
        "{alarms:?}"
    );
    c.get("k00", None).await?;
    Ok(())
}

/// The active alarms: (member id, alarm type).
async fn alarms(c: &mut etcd_client::Client) -> Result<Vec<(u64, etcd_client::AlarmType)>> {
    let r = c
        .alarm(
            etcd_client::AlarmAction::Get,
            etcd_client::AlarmType::None,
            None,
        )
        .await?;
    Ok(r.alarms()
        .iter()
        .map(|a| (a.member_id(), a.alarm()))
        .collect())
}

/// The periodic corruption check asks learners too, on their peer port (a learner refuses
/// HashKV on its client port, as etcd's): a learner whose stored data differs gets the
/// `CORRUPT` alarm under its own id, and an undamaged one raises nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn periodic_corrupt_check_covers_a_learner() -> Result<()> {
    use etcd_client::MemberAddOptions;
    let tweak: fetcd_tests::cluster::Tweak = Arc::new(|c: &mut fetcd_server::Config| {
        c.experimental_corrupt_check_time = Duration::from_millis(300)
    });
    let mut cluster = Cluster::start_with(3, Some(tweak)).await?;
    let mut c = write_and_settle(&cluster).await?;
    let (new, url) = cluster.reserve_member().await?;
    let added = c
        .member_add([url], Some(MemberAddOptions::new().with_is_learner()))
        .await?;
    let learner_id = added.member().context("added member")?.id();
    cluster.join(new).await?;
    wait_count(&cluster, new, "k", 20).await?;
    // The learner refuses HashKV on its client port.
    let r = cluster.client(new).await?.hash_kv(0).await;
    fetcd_tests::expect_grpc_error(
        &r,
        "Unavailable",
        "etcdserver: rpc not supported for learner",
    )?;
    // Several passes that include the undamaged learner raise nothing.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let raised = alarms(&mut c).await?;
    ensure!(raised.is_empty(), "alarm without damage: {raised:?}");

    cluster.stop(new).await?;
    damage_one_value(&cluster, new)?;
    cluster.restart(new).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let raised = alarms(&mut c).await?;
        if !raised.is_empty() {
            ensure!(
                raised == [(learner_id, etcd_client::AlarmType::Corrupt)],
                "expected CORRUPT for the learner {learner_id:x}, got {raised:?}"
            );
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the damaged learner was never found"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
