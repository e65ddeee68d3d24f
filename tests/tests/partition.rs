//! Three-member clusters under faults (the `fetcd_raft::fault` hooks): a member cut off from the
//! others, a leader cut off from the majority, a slow link, a leader's stalled disk. What must
//! hold is what
//! kube-apiserver relies on: no stale answer on a linearizable path, no acknowledged write lost,
//! and answers that reflect a change once it is acknowledged.
#![cfg(feature = "fetcd")]

use std::time::Duration;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use etcd_client::GetOptions;
use fetcd_raft::fault::Fault;
use fetcd_tests::cluster::Cluster;

/// How long a request on the minority side may take to fail: the server's request timeout (7 s,
/// etcd's default for a 1 s election timeout) and some slack.
const MINORITY_LIMIT: Duration = Duration::from_secs(15);

fn serializable() -> Option<GetOptions> {
    Some(GetOptions::new().with_serializable())
}

/// The value of the sample `series` (name and labels, as rendered) in a metrics text.
fn metric(text: &str, series: &str) -> Result<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {series}"))
}

/// The value of `key` at member `i`, read serializably (from its own state).
async fn local_value(c: &Cluster, i: usize, key: &str) -> Result<Option<String>> {
    let r = c.client(i).await?.get(key, serializable()).await?;
    Ok(match r.kvs().first() {
        Some(kv) => Some(kv.value_str()?.to_string()),
        None => None,
    })
}

/// Waits (bounded) until member `i` has `key` = `value` in its own state.
async fn wait_local(c: &Cluster, i: usize, key: &str, value: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while local_value(c, i, key).await?.as_deref() != Some(value) {
        ensure!(
            Instant::now() < deadline,
            "member {i} never had {key}={value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Waits (bounded) until every member is at the same revision with the same HashKV.
async fn wait_converged(cluster: &Cluster) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut revs = Vec::new();
        let mut hashes = Vec::new();
        for i in 0..cluster.len() {
            let mut c = cluster.client(i).await?;
            match c.hash_kv(0).await {
                Ok(h) => {
                    revs.push(h.header().map(|h| h.revision()).unwrap_or(0));
                    hashes.push(h.hash());
                }
                Err(_) => revs.push(-1),
            }
        }
        if revs.iter().all(|r| *r > 0 && *r == revs[0]) {
            ensure!(
                hashes.iter().all(|h| *h == hashes[0]),
                "members at revision {} hash differently: {hashes:?}",
                revs[0]
            );
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "members never converged: {revs:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Fails unless `key` (a write whose outcome its client may not know) is in every member's
/// state or in none.
async fn all_or_none_have(cluster: &Cluster, key: &str) -> Result<()> {
    let mut seen = Vec::new();
    for i in 0..cluster.len() {
        seen.push(local_value(cluster, i, key).await?.is_some());
    }
    ensure!(
        seen.iter().all(|s| *s == seen[0]),
        "members disagree on the write of {key}: {seen:?}"
    );
    Ok(())
}

/// The gRPC code of a failed request, or a description of why it did not fail in time.
fn code_of<T: std::fmt::Debug>(
    r: std::result::Result<std::result::Result<T, etcd_client::Error>, tokio::time::error::Elapsed>,
) -> Result<tonic::Code> {
    match r {
        Err(_) => bail!("no answer within {MINORITY_LIMIT:?}"),
        Ok(Ok(v)) => bail!("answered on the minority side: {v:?}"),
        Ok(Err(etcd_client::Error::GRpcStatus(st))) => Ok(st.code()),
        Ok(Err(e)) => bail!("not a gRPC status: {e}"),
    }
}

/// Requires `request`, made on a minority side, to fail with Unavailable in bounded time.
async fn refused<T: std::fmt::Debug>(
    what: &str,
    request: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<()> {
    let code =
        code_of(tokio::time::timeout(MINORITY_LIMIT, request).await).context(what.to_string())?;
    ensure!(
        code == tonic::Code::Unavailable,
        "{what} failed with {code:?}"
    );
    Ok(())
}

/// A follower cut off from the leader and the other follower keeps its old state: serializable
/// reads show it, but a linearizable read there must fail (Unavailable, in bounded time) rather
/// than answer with it, and so must a write. Healed, it catches up and serves the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_follower_never_serves_a_stale_linearizable_read() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let leader = cluster.wait_ready().await?;
    let f = (0..3).find(|i| *i != leader).context("a follower")?;
    let mut lc = cluster.client(leader).await?;
    lc.put("k", "v1", None).await?;
    wait_local(&cluster, f, "k", "v1").await?;

    cluster.partition(&[f])?;
    lc.put("k", "v2", None).await?;
    let mut fc = cluster.client(f).await?;
    refused(
        "linearizable read on the cut-off follower",
        fc.get("k", None),
    )
    .await?;
    ensure!(
        local_value(&cluster, f, "k").await?.as_deref() == Some("v1"),
        "the cut-off follower learned v2: the partition did not hold"
    );
    refused("write on the cut-off follower", fc.put("k", "v3", None)).await?;

    cluster.heal(&[f])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match fc.get("k", None).await {
            Ok(r) => {
                let v = r.kvs().first().map(|kv| kv.value().to_vec());
                ensure!(
                    v.as_deref() == Some(&b"v2"[..]),
                    "after healing the follower read {v:?}"
                );
                break;
            }
            Err(e) => ensure!(Instant::now() < deadline, "never served after healing: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A leader cut off from both followers, through which nothing was written since: its log holds
/// nothing uncommitted, so only its leadership check stands between a linearizable read and the
/// old value. The followers' answers from before the cut (the replication traffic a read index
/// counts as confirmations) must not vouch for it; the read fails once the majority moved on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_leader_serves_no_linearizable_read_from_before_the_cut() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let old = cluster.wait_ready().await?;
    let mut oc = cluster.client(old).await?;
    oc.put("k", "v1", None).await?;
    // Linearizable reads on the leader, confirmed while it still leads.
    for _ in 0..10 {
        let r = oc.get("k", None).await?;
        ensure!(r.kvs().first().map(|kv| kv.value()) == Some(&b"v1"[..]));
    }

    cluster.partition(&[old])?;
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let mut nc = cluster.client(others[0]).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = nc.put("k", "v2", None).await {
        ensure!(
            Instant::now() < deadline,
            "majority side took no write: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    refused("linearizable read on the cut-off leader", oc.get("k", None)).await?;
    cluster.heal(&[old])?;
    Ok(())
}

/// On three members a follower's read index needs no answer from anyone but the leader: the
/// request carries the follower's own word for it (the vote it saved, read after the read
/// arrived), which with the leader's own makes a quorum. With every request from the leader to
/// the followers cut (no AppendEntries, no vouch request gets through), a follower that still
/// follows it reads, and reads what was written. (Its election timer runs meanwhile: should an
/// election start before the read is served, which would make the read fail, the round is
/// tried again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_followers_own_word_confirms_its_read_index_on_three_members() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    for round in 1..=3 {
        let leader = cluster.wait_ready().await?;
        let f = (0..3).find(|i| *i != leader).context("a follower")?;
        let value = format!("v{round}");
        cluster
            .client(leader)
            .await?
            .put("k", value.as_str(), None)
            .await?;
        wait_local(&cluster, f, "k", &value).await?;
        let mut fc = cluster.client(f).await?;
        let term = fc.status().await?.raft_term();

        for to in (0..3).filter(|i| *i != leader) {
            cluster.set_link(leader, to, Some(Fault::Cut))?;
        }
        let read = fc.get("k", None).await;
        for to in (0..3).filter(|i| *i != leader) {
            cluster.set_link(leader, to, None)?;
        }
        match read {
            Ok(r) => {
                let got = r.kvs().first().map(|kv| kv.value().to_vec());
                ensure!(
                    got.as_deref() == Some(value.as_bytes()),
                    "the follower read {got:?}, not {value}"
                );
                return Ok(());
            }
            Err(e) => {
                let now = fc.status().await?.raft_term();
                ensure!(
                    now != term,
                    "a follower of an unchanged leader (term {term}) got no read index: {e}"
                );
            }
        }
    }
    bail!("an election interrupted every round")
}

/// A leader cut off from both followers: writes through it fail in bounded time, the majority
/// elects another leader and goes on, while the old one serves no linearizable read; once healed
/// every member holds every acknowledged write, agrees on the write the old leader could not
/// commit (present everywhere or nowhere), and hashes the same history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_the_majority_loses_no_acknowledged_write() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let old = cluster.wait_ready().await?;
    let old_id = cluster.member_id(old).context("old leader id")?;
    let mut acked = Vec::new();
    let mut oc = cluster.client(old).await?;
    for i in 0..10 {
        oc.put(format!("a/{i}"), "x", None).await?;
        acked.push(format!("a/{i}"));
    }

    cluster.partition(&[old])?;
    refused("write on the cut-off leader", oc.put("lost?", "x", None)).await?;
    // What etcd's alerts watch shows it: the failed proposal, and Raft messages to both others
    // that got no answer (counters keyed by target; only the cut-off member fails to reach them).
    let text = fetcd_server::metrics::render(cluster.server(old).context("old leader")?.node());
    ensure!(
        metric(&text, "etcd_server_proposals_failed_total")? >= 1.0,
        "no failed proposal counted:\n{text}"
    );
    for i in (0..3).filter(|i| *i != old) {
        let to = cluster.member_id(i).context("member id")?;
        let name = format!("etcd_network_peer_sent_failures_total{{To=\"{to:x}\"}}");
        ensure!(metric(&text, &name)? > 0.0, "no {name} counted:\n{text}");
    }

    // The majority side elects a leader of its own and takes writes.
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let mut nc = cluster.client(others[0]).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..10 {
        let key = format!("b/{i}");
        while let Err(e) = nc.put(key.as_str(), "x", None).await {
            ensure!(
                Instant::now() < deadline,
                "majority side took no write: {e}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        acked.push(key);
    }
    let new_leader = cluster
        .server(others[0])
        .and_then(|s| s.node().raft().leader());
    ensure!(
        new_leader.is_some_and(|l| l != old_id),
        "majority side leader {new_leader:?}"
    );
    // The old leader, still leading in its own eyes, holds an entry no follower has ("lost?"):
    // a linearizable read there must confirm its leadership with the others, and fail, rather
    // than answer without the majority's writes.
    refused(
        "linearizable read on the cut-off leader",
        oc.get("b/0", None),
    )
    .await?;

    cluster.heal(&[old])?;
    wait_converged(&cluster).await?;
    for i in 0..3 {
        for key in &acked {
            ensure!(
                local_value(&cluster, i, key).await?.is_some(),
                "member {i} lost acknowledged {key}"
            );
        }
    }
    all_or_none_have(&cluster, "lost?").await?;
    Ok(())
}

/// A membership change made through a follower that the leader cannot reach for a moment: the
/// answer lists the membership after the change (etcd's), though the follower learns of the
/// change only after the leader committed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_promote_through_a_lagging_follower_answers_the_new_membership() -> Result<()> {
    use etcd_client::MemberAddOptions;
    let mut cluster = Cluster::start(3).await?;
    let leader = cluster.wait_ready().await?;
    let f = (0..3).find(|i| *i != leader).context("a follower")?;
    let mut lc = cluster.client(leader).await?;
    lc.put("k", "v", None).await?;

    let (new, url) = cluster.reserve_member().await?;
    let added = lc
        .member_add([url], Some(MemberAddOptions::new().with_is_learner()))
        .await?;
    let learner_id = added.member().context("added member")?.id();
    cluster.join(new).await?;
    wait_local(&cluster, new, "k", "v").await?;
    wait_local(&cluster, f, "k", "v").await?;

    // The leader's requests to the follower are refused for half a second (less than an
    // election timeout): the promotion, made through the follower, commits without it, and the
    // follower hears of it only once the link is back.
    let mut fc = cluster.client(f).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let promoted = loop {
        cluster.set_link(leader, f, Some(Fault::Cut))?;
        let heal = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            cluster.set_link(leader, f, None)
        };
        let (r, healed) = tokio::join!(fc.member_promote(learner_id), heal);
        healed?;
        match r {
            Ok(r) => break r,
            // The leader refuses until the learner's log matches its own.
            Err(e) if e.to_string().contains("in sync with leader") => {
                ensure!(Instant::now() < deadline, "learner never in sync");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let listed = promoted
        .members()
        .iter()
        .find(|m| m.id() == learner_id)
        .context("the promoted member is not listed")?;
    ensure!(
        !listed.is_learner(),
        "the answer still lists {learner_id:x} as a learner"
    );
    Ok(())
}

/// One client operation as the test saw it: when it was sent and answered, and what it did.
#[derive(Debug, Clone)]
struct Op {
    start: Instant,
    end: Instant,
    /// A write: the revision it was acknowledged at. A read: the `mod_revision` it saw (0 for
    /// no key).
    revision: i64,
    /// A write: the value written.
    value: String,
}

/// A tiny deterministic generator, so that a failing schedule can be told apart from another.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Jepsen-style, in process: writers and linearizable readers on every member of a three-member
/// cluster while a nemesis cuts one member (often the leader) off from the others and heals it,
/// over and over. Then, from the recorded history:
/// - no linearizable read saw less than a write acknowledged before the read was sent;
/// - every acknowledged write is in every member's history (a watch from revision 1) at its
///   revision with its value, no value is there twice (a forwarded write is never applied
///   twice), and all members' histories are equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_partitions_keep_reads_fresh_and_acknowledged_writes() -> Result<()> {
    const KEY: &str = "register";
    const RUN: Duration = Duration::from_secs(8);
    const OP_TIMEOUT: Duration = Duration::from_secs(2);
    let cluster = Cluster::start(3).await?;
    let until = Instant::now() + RUN;

    let mut tasks = Vec::new();
    for m in 0..3 {
        // A writer and a reader per member, each with its own connection to that member only.
        let mut wc = cluster.client(m).await?;
        tasks.push(tokio::spawn(async move {
            let mut ops = Vec::new();
            let mut seq = 0;
            while Instant::now() < until {
                seq += 1;
                let value = format!("m{m}-{seq}");
                let start = Instant::now();
                if let Ok(Ok(r)) =
                    tokio::time::timeout(OP_TIMEOUT, wc.put(KEY, value.as_str(), None)).await
                {
                    let revision = r.header().map(|h| h.revision()).unwrap_or(0);
                    ops.push(Op {
                        start,
                        end: Instant::now(),
                        revision,
                        value,
                    });
                }
            }
            (true, ops)
        }));
        let mut rc = cluster.client(m).await?;
        tasks.push(tokio::spawn(async move {
            let mut ops = Vec::new();
            while Instant::now() < until {
                let start = Instant::now();
                match tokio::time::timeout(OP_TIMEOUT, rc.get(KEY, None)).await {
                    Ok(Ok(r)) => ops.push(Op {
                        start,
                        end: Instant::now(),
                        revision: r.kvs().first().map(|kv| kv.mod_revision()).unwrap_or(0),
                        value: String::new(),
                    }),
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            (false, ops)
        }));
    }

    // The nemesis: cut one member off (the leader half of the time) for 0.4–1.2 s, heal, pause.
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut cuts = 0;
    while Instant::now() + Duration::from_millis(1500) < until {
        let target = match cluster.leader() {
            Some(l) if rng.next(2) == 0 => l,
            _ => usize::try_from(rng.next(3))?,
        };
        cluster.partition(&[target])?;
        cuts += 1;
        tokio::time::sleep(Duration::from_millis(400 + rng.next(800))).await;
        cluster.heal(&[target])?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    for t in tasks {
        let (is_write, ops) = t.await?;
        if is_write {
            writes.extend(ops);
        } else {
            reads.extend(ops);
        }
    }
    println!(
        "nemesis: {cuts} cuts, {} writes and {} reads acknowledged",
        writes.len(),
        reads.len()
    );
    ensure!(cuts >= 3, "the nemesis ran only {cuts} times");
    ensure!(
        writes.len() >= 20 && reads.len() >= 20,
        "too little got through: {} writes, {} reads",
        writes.len(),
        reads.len()
    );

    // No stale read: a read sent after a write was acknowledged sees that write or a later one.
    writes.sort_by_key(|w| w.end);
    for r in &reads {
        let before = writes.partition_point(|w| w.end < r.start);
        let floor = writes[..before].iter().map(|w| w.revision).max();
        if let Some(floor) = floor {
            ensure!(
                r.revision >= floor,
                "stale read: sent {:?} after a write acknowledged at revision {floor}, saw {}",
                r.start.duration_since(writes[0].start),
                r.revision
            );
        }
    }

    // Every member's history of the key, from revision 1, once all have caught up.
    let last = writes.iter().map(|w| w.revision).max().unwrap_or(0);
    let mut histories = Vec::new();
    for m in 0..3 {
        let mut c = cluster.client(m).await?;
        let mut stream = c
            .watch(
                KEY,
                Some(etcd_client::WatchOptions::new().with_start_revision(1)),
            )
            .await?;
        let mut events: Vec<(i64, String)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while events.last().map(|e| e.0).unwrap_or(0) < last {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, stream.message())
                .await
                .with_context(|| format!("member {m}'s history stopped before {last}"))??
                .context("watch stream ended")?;
            for e in msg.events() {
                let kv = e.kv().context("event without kv")?;
                events.push((kv.mod_revision(), kv.value_str()?.to_string()));
            }
        }
        // Unacknowledged writes may follow the last acknowledged one; members are compared up
        // to it.
        events.retain(|e| e.0 <= last);
        histories.push(events);
    }
    for (m, h) in histories.iter().enumerate() {
        ensure!(
            h.windows(2).all(|p| p[0].0 < p[1].0),
            "member {m}'s history is not in revision order"
        );
        let mut values: Vec<&String> = h.iter().map(|e| &e.1).collect();
        values.sort();
        values.dedup();
        ensure!(values.len() == h.len(), "member {m} applied a write twice");
        let by_rev: std::collections::HashMap<i64, &String> =
            h.iter().map(|(r, v)| (*r, v)).collect();
        for w in &writes {
            ensure!(
                by_rev.get(&w.revision) == Some(&&w.value),
                "member {m} lost acknowledged {}={} at revision {}",
                KEY,
                w.value,
                w.revision
            );
        }
    }
    ensure!(
        histories.iter().all(|h| h[..] == histories[0][..]),
        "members' histories differ"
    );
    Ok(())
}

/// A leader of several voters counts itself in a commit quorum once its entry is written, and
/// syncs it beside the followers' writes. Until that sync completes nobody may see the write:
/// the client gets no answer, and the followers, which hold the entry, are not told it is
/// committed (they would apply it, and a linearizable read there could return a write that a
/// power cut of the leader then undoes). Once the sync goes through, the write is answered and
/// applied everywhere. A write proposed meanwhile still reaches the followers' logs: replication
/// does not wait for the leader's disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_shows_a_write_only_once_it_is_on_its_own_disk() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let leader = cluster.wait_ready().await?;
    let id = cluster.member_id(leader).context("the leader's id")?;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let mut lc = cluster.client(leader).await?;
    lc.put("k", "v1", None).await?;
    for f in &followers {
        wait_local(&cluster, *f, "k", "v1").await?;
    }

    fetcd_raft::fault::hold_log_syncs(id);
    let put = tokio::spawn(async move { lc.put("k", "v2", None).await });
    // Time for the followers to write the entry and acknowledge it; well inside an election
    // timeout (1 s), so the leader stays.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answered_early = put.is_finished();

    // A second write meanwhile still reaches the followers' logs (replication does not wait
    // for the leader's disk), but not their state.
    let last_index = |i: usize| {
        cluster
            .server(i)
            .and_then(|s| s.node().raft().raft().metrics().borrow().last_log_index)
            .unwrap_or(0)
    };
    let before = last_index(leader);
    let mut lc2 = cluster.client(leader).await?;
    let put2 = tokio::spawn(async move { lc2.put("k2", "x", None).await });
    let deadline = Instant::now() + Duration::from_millis(500);
    let replicated = loop {
        let want = last_index(leader);
        if want > before && followers.iter().all(|f| last_index(*f) >= want) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut seen = Vec::new();
    for f in &followers {
        seen.push((
            local_value(&cluster, *f, "k").await,
            local_value(&cluster, *f, "k2").await,
        ));
    }
    fetcd_raft::fault::release_log_syncs(id);
    ensure!(
        !answered_early,
        "the write was answered before the leader's own sync"
    );
    ensure!(
        replicated,
        "a new entry did not reach the followers while the leader's sync was held"
    );
    for (f, (v, v2)) in followers.iter().zip(seen) {
        ensure!(
            v?.as_deref() == Some("v1") && v2?.is_none(),
            "follower {f} applied a write before the leader's sync"
        );
    }
    for p in [put, put2] {
        let answer = tokio::time::timeout(Duration::from_secs(10), p)
            .await
            .context("no answer once the sync went through")??;
        answer.context("the write failed")?;
    }
    for i in 0..3 {
        wait_local(&cluster, i, "k", "v2").await?;
        wait_local(&cluster, i, "k2", "x").await?;
    }
    Ok(())
}

/// A leader whose disk stalls for longer than an election timeout stops sending heartbeats
/// (they would carry a commit index its disk has not caught up with), so the followers elect
/// another leader, which takes writes. The old leader steps down, applies what the new one
/// committed, and once its disk answers every member holds the same history. The write it was
/// proposing when its disk stalled is in every member's history or in none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_whose_disk_stalls_is_replaced_and_catches_up() -> Result<()> {
    let cluster = Cluster::start(3).await?;
    let old = cluster.wait_ready().await?;
    let old_id = cluster.member_id(old).context("the leader's id")?;
    let mut oc = cluster.client(old).await?;
    oc.put("k", "v1", None).await?;

    fetcd_raft::fault::hold_log_syncs(old_id);
    let stalled = tokio::spawn(async move { oc.put("stalled", "x", None).await });
    let deadline = Instant::now() + Duration::from_secs(20);
    let new = loop {
        let other = (0..3).filter(|i| *i != old).find(|i| {
            cluster
                .server(*i)
                .and_then(|s| s.node().raft().leader())
                .is_some_and(|l| l != old_id)
        });
        if let Some(i) = other {
            break i;
        }
        if Instant::now() > deadline {
            fetcd_raft::fault::release_log_syncs(old_id);
            bail!("no other member took over from a leader whose disk stalled");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let taken = cluster.client(new).await?.put("k", "v2", None).await;
    fetcd_raft::fault::release_log_syncs(old_id);
    taken.context("a write after the failover")?;

    // Answered or not, the stalled write must not hang past the request timeout.
    let _ = tokio::time::timeout(MINORITY_LIMIT, stalled)
        .await
        .context("the stalled write never got an answer")?;
    for i in 0..3 {
        wait_local(&cluster, i, "k", "v2").await?;
    }
    wait_converged(&cluster).await?;
    all_or_none_have(&cluster, "stalled").await
}
