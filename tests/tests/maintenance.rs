//! The Maintenance service against real etcd: Status, HashKV, Hash, Defragment, MoveLeader,
//! alarms and the space quota, through etcd-client and through etcdctl.
//!
//! What legitimately differs between the servers and is scrubbed (never compared):
//! - member and cluster ids (each server derives them from its own ports/token): replaced by
//!   `<self>` where etcdctl prints them;
//! - `version` (etcd 3.4.x vs fetcd's reported 3.5.13), db sizes, Raft indexes and terms (fetcd's
//!   log has a different number of internal entries): checked for sanity, not compared;
//! - `Hash` (a hash of the whole backend file, bolt vs sled): only success is compared.
//!
//! `HashKV` *is* compared exactly: fetcd hashes the same revision keys and `mvccpb.KeyValue`
//! bytes as etcd, so the same history gives the same hash.
#![allow(clippy::unwrap_used)]

use anyhow::{ensure, Context, Result};
use etcd_client::{
    AlarmAction, AlarmOptions, AlarmType, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp,
};
use fetcd_tests::observe::{error, revision};
use fetcd_tests::{expect_grpc_error, run_differential, run_differential_with_flags, Session};
use serde_json::{json, Value};

const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
const FUTURE_REV: &str = "etcdserver: mvcc: required revision is a future revision";
const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";
const BAD_TRANSFEREE: &str = "etcdserver: bad leader transferee";
const CORRUPT: &str = "etcdserver: corrupt cluster";

/// This server's member id (from a Status header).
async fn member_id(s: &mut Session) -> Result<u64> {
    let st = s.client().status().await?;
    st.header()
        .map(|h| h.member_id())
        .context("status without header")
}

/// Replaces this member's id (decimal and etcdctl's hex) with `<self>`.
fn scrub_member(out: &str, id: u64) -> String {
    out.replace(&id.to_string(), "<self>")
        .replace(&format!("{id:x}"), "<self>")
}

async fn hash_kv(s: &mut Session, step: &str, rev: i64) -> Result<Option<u32>> {
    let r = s.client().hash_kv(rev).await;
    let v = match &r {
        Ok(h) => json!({
            "hash": h.hash(),
            "compact_revision": h.compact_version(),
            "header_revision": revision(h.header()),
        }),
        Err(e) => json!({ "error": error(e) }),
    };
    s.record(step, v);
    Ok(r.ok().map(|h| h.hash()))
}

async fn status_hash_scenario(s: &mut Session) -> Result<()> {
    let me = member_id(s).await?;
    let st = s.client().status().await?;
    ensure!(st.leader() == me, "a single member leads itself");
    ensure!(st.raft_index() >= st.raft_applied_index() && st.raft_applied_index() > 0);
    ensure!(st.raft_term() > 0 && st.db_size() > 0 && st.raft_used_db_size() > 0);
    let v: Vec<&str> = st.version().split('.').collect();
    ensure!(v.len() == 3 && v[0] == "3", "version {}", st.version());
    s.record(
        "status",
        json!({
            "leader_is_self": st.leader() == me,
            "errors": st.errors(),
            "is_learner": st.is_learner(),
            "header_revision": revision(st.header()),
        }),
    );

    let empty = hash_kv(s, "hashkv of an empty store", 0).await?;
    s.put("put a", "a", "1", None).await?;
    s.put("put b", "b", "1", None).await?;
    let at3 = hash_kv(s, "hashkv at 3", 0).await?;
    ensure!(at3 != empty, "a write changes the hash");
    ensure!(at3 == hash_kv(s, "hashkv at 3 again", 0).await?);
    s.put(
        "put a again",
        "a",
        "2",
        Some(PutOptions::new().with_lease(0)),
    )
    .await?;
    s.delete("delete b", "b", None).await?;
    s.put("put c", "c", "1", None).await?;
    let now = hash_kv(s, "hashkv at 6", 0).await?;
    ensure!(now == hash_kv(s, "hashkv at 6 explicitly", 6).await?);
    ensure!(at3 == hash_kv(s, "hashkv of revision 3 later", 3).await?);
    hash_kv(s, "hashkv of revision 5", 5).await?;
    let r = s.client().hash_kv(7).await;
    expect_grpc_error(&r, "OutOfRange", FUTURE_REV)?;
    s.compact("compact at 4", 4, None).await?;
    for rev in [2, 4] {
        let r = s.client().hash_kv(rev).await;
        s.record(
            format!("hashkv of compacted {rev}"),
            json!(error(&r.err().context("compacted hashkv succeeded")?)),
        );
    }
    let r = s.client().hash_kv(3).await;
    expect_grpc_error(&r, "OutOfRange", COMPACTED)?;
    hash_kv(s, "hashkv of revision 5 after compaction", 5).await?;
    let after = hash_kv(s, "hashkv after compaction", 0).await?;
    ensure!(after.is_some());

    let r = s.client().hash().await;
    s.record("hash succeeds", json!(r.is_ok()));
    let r = s.client().defragment().await;
    s.record("defragment", json!(r.map(|_| "ok").map_err(|e| error(&e))));
    let r = s.client().move_leader(me).await;
    s.record("move leader to self", json!(r.is_ok()));
    ensure!(r.is_ok(), "{r:?}");
    let r = s.client().move_leader(me ^ 1).await;
    expect_grpc_error(&r, "FailedPrecondition", BAD_TRANSFEREE)?;
    s.record(
        "move leader to a stranger",
        json!(error(&r.err().context("moved")?)),
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_hashkv_defrag_move_leader() -> Result<()> {
    run_differential("maintenance status/hashkv", status_hash_scenario).await
}

fn scrubbed_alarms(alarms: &[etcd_client::AlarmMember], me: u64) -> Value {
    json!(alarms
        .iter()
        .map(|a| json!({
            "member": if a.member_id() == me { "<self>".to_string() } else { a.member_id().to_string() },
            "alarm": format!("{:?}", a.alarm()),
        }))
        .collect::<Vec<_>>())
}

/// Sends `action` for this member's `alarm` and returns the answer's alarms, scrubbed.
async fn member_alarm(
    s: &mut Session,
    action: AlarmAction,
    alarm: AlarmType,
    me: u64,
) -> Result<Value> {
    let mut opts = AlarmOptions::new();
    opts.with_member(me);
    let r = s.client().alarm(action, alarm, Some(opts)).await?;
    Ok(scrubbed_alarms(r.alarms(), me))
}

/// NOSPACE raised by hand (default quota): writes that grow the store are refused with etcd's
/// error, reads, deletes and compaction go on, and `etcdctl alarm disarm` clears it.
async fn nospace_scenario(s: &mut Session) -> Result<()> {
    let me = member_id(s).await?;
    s.put("put before", "k", "v", None).await?;
    s.put("put other", "other", "v", None).await?;
    let alarms = member_alarm(s, AlarmAction::Activate, AlarmType::Nospace, me).await?;
    ensure!(alarms.as_array().map(Vec::len) == Some(1), "{alarms}");
    s.record("activate", alarms);
    let alarms = member_alarm(s, AlarmAction::Activate, AlarmType::Nospace, me).await?;
    s.record("activate again", alarms);
    let r = s
        .client()
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await?;
    s.record("get", scrubbed_alarms(r.alarms(), me));

    let r = s.put("put refused", "k", "v2", None).await;
    expect_grpc_error(&r, "ResourceExhausted", NO_SPACE)?;
    let r = s
        .txn(
            "txn with a put refused",
            Txn::new()
                .when(vec![Compare::version("k", CompareOp::Greater, 0)])
                .and_then(vec![TxnOp::put("k", "v3", None)]),
        )
        .await;
    expect_grpc_error(&r, "ResourceExhausted", NO_SPACE)?;
    let r = s.client().lease_grant(60, None).await;
    s.record("lease grant", json!(r.map(|_| "ok").map_err(|e| error(&e))));
    s.get("get served", "k", None).await?;
    s.txn(
        "read-only txn served",
        Txn::new().and_then(vec![TxnOp::get("k", None)]),
    )
    .await?;
    s.delete("delete served", "other", None).await?;
    s.compact("compaction served", 2, None).await?;
    let st = s.client().status().await?;
    let errors: Vec<String> = st.errors().iter().map(|e| scrub_member(e, me)).collect();
    s.record("status errors", json!(errors));
    ensure!(errors == ["memberID:<self> alarm:NOSPACE "], "{errors:?}");

    let scrub = move |o: &str| scrub_member(o, me);
    let out = s
        .etcdctl_scrubbed("alarm list", &["alarm", "list"], scrub)
        .await?;
    ensure!(
        scrub(&out.stdout) == "memberID:<self> alarm:NOSPACE \n",
        "{out:?}"
    );
    let out = s
        .etcdctl_scrubbed("alarm disarm", &["alarm", "disarm"], scrub)
        .await?;
    ensure!(
        scrub(&out.stdout) == "memberID:<self> alarm:NOSPACE \n",
        "{out:?}"
    );
    let out = s
        .etcdctl_scrubbed("alarm list after disarm", &["alarm", "list"], scrub)
        .await?;
    ensure!(out.stdout.is_empty(), "{out:?}");
    s.put("put after disarm", "k", "v4", None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_alarm_refuses_growth_until_disarmed() -> Result<()> {
    run_differential("maintenance nospace alarm", nospace_scenario).await
}

/// A quota smaller than any database: the first write raises NOSPACE for this member and is
/// refused; disarming does not help while the store is over quota.
async fn tiny_quota_scenario(s: &mut Session) -> Result<()> {
    let me = member_id(s).await?;
    let r = s.put("put over quota", "k", "v", None).await;
    expect_grpc_error(&r, "ResourceExhausted", NO_SPACE)?;
    let r = s
        .client()
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await?;
    s.record("alarm raised", scrubbed_alarms(r.alarms(), me));
    ensure!(r.alarms().len() == 1 && r.alarms()[0].member_id() == me);
    s.get("reads served", "k", None).await?;
    let scrub = move |o: &str| scrub_member(o, me);
    s.etcdctl_scrubbed("alarm disarm", &["alarm", "disarm"], scrub)
        .await?;
    let r = s.put("still over quota", "k", "v", None).await;
    expect_grpc_error(&r, "ResourceExhausted", NO_SPACE)?;
    let r = s
        .client()
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await?;
    s.record("raised again", scrubbed_alarms(r.alarms(), me));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_quota_raises_nospace() -> Result<()> {
    run_differential_with_flags(
        "maintenance tiny quota",
        &["--quota-backend-bytes", "1"],
        tiny_quota_scenario,
    )
    .await
}

/// `endpoint status` prints `endpoint, id, version, size, is-leader, is-learner, term, index,
/// applied, errors`: keep what must agree.
fn scrub_endpoint_status(out: &str) -> String {
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(", ").collect();
            match f.as_slice() {
                [_, _, _, _, leader, learner, _, _, _, errors @ ..] => {
                    format!("leader={leader} learner={learner} errors={errors:?}\n")
                }
                _ => format!("{l}\n"),
            }
        })
        .collect()
}

/// Runs etcdctl against the session's endpoint written as operators write it
/// (`http://host:port`) and records the normalized output. etcdctl 3.4's per-endpoint commands
/// (`endpoint status`, `endpoint hashkv`, `defrag`, `move-leader`) send that string as the
/// HTTP/2 `:authority`, which is not a valid authority: etcd accepts it, and so must fetcd (see
/// `fetcd_server::authority`). The `-w json` status below uses `host:port`, the other form.
async fn etcdctl_at_url(
    s: &mut Session,
    step: &str,
    args: &[&str],
    scrub: impl Fn(&str) -> String,
) -> Result<fetcd_tests::EtcdctlOutput> {
    let url = s.url().to_string();
    let out = fetcd_tests::run_etcdctl(&url, args, None).await?;
    let scrubbed = fetcd_tests::EtcdctlOutput {
        status: out.status,
        stdout: scrub(&out.stdout),
        stderr: scrub(&out.stderr),
    };
    s.record(step, fetcd_tests::etcdctl::normalize(&scrubbed, &url));
    Ok(out)
}

async fn etcdctl_scenario(s: &mut Session) -> Result<()> {
    let me = member_id(s).await?;
    s.put("put a", "a", "1", None).await?;
    let out = etcdctl_at_url(
        s,
        "endpoint status",
        &["endpoint", "status"],
        scrub_endpoint_status,
    )
    .await?;
    ensure!(
        scrub_endpoint_status(&out.stdout) == "leader=true learner=false errors=[\"\"]\n",
        "{out:?}"
    );
    let host_port = s.url().trim_start_matches("http://").to_string();
    let out =
        fetcd_tests::run_etcdctl(&host_port, &["endpoint", "status", "-w", "json"], None).await?;
    ensure!(out.success(), "{out:?}");
    let out = out.json()?;
    let st = &out[0]["Status"];
    ensure!(st["leader"] == st["header"]["member_id"] && st["dbSize"].as_i64() > Some(0));
    let took = |o: &str| match o.find("took = ") {
        Some(i) => format!("{}took = <t>\n", &o[..i]),
        None => o.to_string(),
    };
    let out = s
        .etcdctl_scrubbed("endpoint health", &["endpoint", "health"], took)
        .await?;
    ensure!(
        out.stderr
            .contains("is healthy: successfully committed proposal"),
        "{out:?}"
    );
    let out = etcdctl_at_url(s, "endpoint hashkv", &["endpoint", "hashkv"], |o| {
        o.to_string()
    })
    .await?;
    ensure!(out.success(), "{out:?}");
    let out = etcdctl_at_url(s, "defrag", &["defrag"], |o| o.to_string()).await?;
    ensure!(
        out.stdout
            .starts_with("Finished defragmenting etcd member["),
        "{out:?}"
    );
    let scrub = move |o: &str| scrub_member(o, me);
    let hex = format!("{me:x}");
    let out = etcdctl_at_url(s, "move-leader to self", &["move-leader", &hex], scrub).await?;
    ensure!(
        scrub(&out.stdout) == "Leadership transferred from <self> to <self>\n",
        "{out:?}"
    );
    let out = etcdctl_at_url(
        s,
        "move-leader to a stranger",
        &["move-leader", "1234"],
        scrub,
    )
    .await?;
    ensure!(
        !out.success() && out.stderr.contains(BAD_TRANSFEREE),
        "{out:?}"
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("snap.db");
    let path_s = path.to_string_lossy().into_owned();
    let out = fetcd_tests::run_etcdctl(s.url(), &["snapshot", "save", &path_s], None).await?;
    s.record(
        "snapshot save",
        json!({"status": out.status, "stdout": out.stdout.replace(&path_s, "<path>")}),
    );
    ensure!(
        out.success() && std::fs::metadata(&path)?.len() > 0,
        "{out:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_maintenance_commands() -> Result<()> {
    run_differential("etcdctl maintenance", etcdctl_scenario).await
}

/// Keys overwritten to fill the store, and the size of each value.
const FILL_KEYS: usize = 10;
const FILL_VALUE: usize = 64 * 1024;

/// A 4 MiB quota filled by overwriting ten 64 KiB keys: the history grows the backend until
/// NOSPACE. Compaction alone frees space without shrinking the file; defragmentation shrinks it,
/// and once disarmed, writes work again with all the data still there — on etcd as on fetcd.
async fn nospace_defrag_scenario(s: &mut Session) -> Result<()> {
    let me = member_id(s).await?;
    let value = |i: usize| format!("{i:08}").repeat(FILL_VALUE / 8);
    let mut written = 0;
    let refused = loop {
        ensure!(written < 400, "no NOSPACE after {written} puts of 64 KiB");
        let key = format!("fill/{}", written % FILL_KEYS);
        match s.client().put(key, value(written), None).await {
            Ok(_) => written += 1,
            Err(e) => break e,
        }
    };
    s.record("put past the quota", json!(error(&refused)));
    ensure!(written >= FILL_KEYS, "NOSPACE after only {written} puts");
    let r = s
        .client()
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await?;
    s.record("alarm raised", scrubbed_alarms(r.alarms(), me));

    let rev = revision(s.client().get("fill/0", None).await?.header());
    // Unrecorded: revisions depend on how many puts each server took.
    s.client().compact(rev, None).await?;
    let full = s.client().status().await?.db_size();
    let r = s.client().defragment().await;
    s.record("defragment", json!(r.map(|_| "ok").map_err(|e| error(&e))));
    let defragged = s.client().status().await?.db_size();
    eprintln!(
        "{}: {written} puts to NOSPACE; dbSize {full} after compaction, {defragged} after defrag",
        s.label()
    );
    s.record("defrag shrank the backend", json!(defragged < full));
    ensure!(defragged < full, "dbSize {full} -> {defragged}");

    // Still refused while the alarm is active, accepted once disarmed.
    let r = s.client().put("after", "1", None).await;
    expect_grpc_error(&r, "ResourceExhausted", NO_SPACE)?;
    s.record("put before disarm", json!(error(&r.err().context("put")?)));
    let scrub = move |o: &str| scrub_member(o, me);
    s.etcdctl_scrubbed("alarm disarm", &["alarm", "disarm"], scrub)
        .await?;
    let r = s.client().put("after", "2", None).await;
    s.record("put after disarm", json!(r.is_ok()));
    r?;
    let r = s
        .client()
        .get("fill/", Some(GetOptions::new().with_prefix()))
        .await?;
    // Every key holds the last value written to it, given `puts` applied puts.
    let intact_after = |puts: usize| {
        r.kvs().len() == FILL_KEYS
            && r.kvs().iter().all(|kv| {
                let n: usize = kv
                    .key_str()
                    .ok()
                    .and_then(|k| k[5..].parse().ok())
                    .unwrap_or(99);
                // The last value written to key n is the highest i < puts with i % 10 == n.
                let last = (puts - 1) - ((puts - 1 + FILL_KEYS - n) % FILL_KEYS);
                kv.value() == value(last).as_bytes()
            })
    };
    // etcd checks the quota once more after applying a put (quotaApplierV3), so the put that
    // reported NOSPACE may have been applied there. fetcd refuses before the log: the refused
    // put must not be.
    let intact = intact_after(written) || (s.label() == "etcd" && intact_after(written + 1));
    s.record("latest values intact", json!(intact));
    ensure!(intact, "values changed by defragmentation");
    let r = s.client().get("after", None).await?;
    ensure!(r.kvs().first().map(|kv| kv.value()) == Some(&b"2"[..]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_cleared_by_compaction_defrag_and_disarm() -> Result<()> {
    run_differential_with_flags(
        "maintenance nospace defrag",
        &["--quota-backend-bytes", "4194304"],
        nospace_defrag_scenario,
    )
    .await
}

/// Polls `Get key @ rev` (unrecorded) until the server refuses it as compacted, bounded.
async fn wait_compacted(s: &mut Session, key: &str, rev: i64) -> Result<bool> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let r = s
            .client()
            .get(key, Some(GetOptions::new().with_revision(rev)))
            .await;
        if expect_grpc_error(&r, "OutOfRange", COMPACTED).is_ok() {
            return Ok(true);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(false)
}

/// `--auto-compaction-retention 2s` (periodic): the history older than two seconds goes, the
/// last two seconds stay readable, without any client compacting.
async fn periodic_auto_compaction_scenario(s: &mut Session) -> Result<()> {
    s.put("put a=1", "a", "1", None).await?;
    s.put("put a=2", "a", "2", None).await?;
    let compacted = wait_compacted(s, "a", 2).await?;
    s.record("revision 2 compacted within 30 s", json!(compacted));
    ensure!(compacted, "{}: revision 2 was never compacted", s.label());
    let r = s.put("put a=3", "a", "3", None).await?;
    let now = r.header().map(|h| h.revision()).unwrap_or(0);
    // Written a moment ago: far inside the retention.
    s.get(
        "get a at the revision of the last put",
        "a",
        Some(GetOptions::new().with_revision(now)),
    )
    .await?;
    s.get("get a", "a", None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_auto_compaction_keeps_the_retention() -> Result<()> {
    run_differential_with_flags(
        "periodic auto-compaction",
        &["--auto-compaction-retention", "2s"],
        periodic_auto_compaction_scenario,
    )
    .await
}

/// CORRUPT raised through the Alarm API (as etcd's corruption check raises it): every write is
/// refused with etcd's `corrupt cluster` (DataLoss), reads go on, and disarming it lets writes
/// through again.
async fn corrupt_scenario(s: &mut Session) -> Result<()> {
    let me = member_id(s).await?;
    s.put("put before", "k", "v", None).await?;
    let lease = s.client().lease_grant(60, None).await?.id();
    let alarms = member_alarm(s, AlarmAction::Activate, AlarmType::Corrupt, me).await?;
    s.record("activate", alarms);

    let r = s.put("put refused", "k", "v2", None).await;
    expect_grpc_error(&r, "DataLoss", CORRUPT)?;
    let r = s.delete("delete refused", "k", None).await;
    expect_grpc_error(&r, "DataLoss", CORRUPT)?;
    let r = s
        .txn(
            "txn with a delete refused",
            Txn::new().and_then(vec![TxnOp::delete("k", None)]),
        )
        .await;
    expect_grpc_error(&r, "DataLoss", CORRUPT)?;
    let r = s.compact("compaction refused", 2, None).await;
    expect_grpc_error(&r, "DataLoss", CORRUPT)?;
    let r = s.client().lease_grant(60, None).await;
    s.record("lease grant", json!(r.map(|_| "ok").map_err(|e| error(&e))));
    let r = s.client().lease_revoke(lease).await;
    s.record(
        "lease revoke",
        json!(r.map(|_| "ok").map_err(|e| error(&e))),
    );
    s.get("get served", "k", None).await?;
    s.txn(
        "read-only txn served",
        Txn::new().and_then(vec![TxnOp::get("k", None)]),
    )
    .await?;
    let r = s
        .client()
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await?;
    s.record("get alarms", scrubbed_alarms(r.alarms(), me));

    let alarms = member_alarm(s, AlarmAction::Deactivate, AlarmType::Corrupt, me).await?;
    s.record("deactivate", alarms);
    s.put("put after disarm", "k", "v3", None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_alarm_refuses_writes_until_disarmed() -> Result<()> {
    run_differential("maintenance corrupt alarm", corrupt_scenario).await
}

/// `GET path` on a client URL; the body. (HTTP/1.0, so that no server answers in chunks.)
async fn http_body(url: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host).await?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    ensure!(
        text.split_whitespace().nth(1) == Some("200"),
        "GET {path}: {text}"
    );
    let (_, body) = text.split_once("\r\n\r\n").context("no body")?;
    Ok(body.to_string())
}

/// A scrape: per metric family, its `TYPE` and the label names of each of its samples (sorted,
/// `le` left out), and the value of each unlabelled sample.
#[derive(Debug, Default)]
struct Scrape {
    types: std::collections::BTreeMap<String, String>,
    labels: std::collections::BTreeMap<String, std::collections::BTreeSet<Vec<String>>>,
    values: std::collections::BTreeMap<String, f64>,
}

fn parse_scrape(text: &str) -> Scrape {
    let mut s = Scrape::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                s.types.insert(name.to_string(), kind.to_string());
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or((line, ""));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| name.strip_suffix(suf).filter(|f| s.types.contains_key(*f)))
            .unwrap_or(name);
        let mut names: Vec<String> = labels
            .split(',')
            .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_string()))
            .filter(|k| k != "le")
            .collect();
        names.sort();
        s.labels
            .entry(family.to_string())
            .or_default()
            .insert(names);
        if labels.is_empty() {
            if let Ok(v) = value.parse() {
                s.values.insert(name.to_string(), v);
            }
        }
    }
    s
}

/// The series etcd's own Prometheus alerts (its mixin) and dashboard read on one member, with
/// the process's standard ones: fetcd serves each under etcd's name, type and label names. (The
/// peer series, `etcd_network_peer_round_trip_time_seconds` and
/// `etcd_network_peer_sent_failures_total`, exist only with peers: see the cluster tests.)
const ETCD_DASHBOARD_SERIES: &[&str] = &[
    "etcd_server_has_leader",
    "etcd_server_is_leader",
    "etcd_server_is_learner",
    "etcd_server_id",
    "etcd_server_version",
    "etcd_cluster_version",
    "etcd_server_leader_changes_seen_total",
    "etcd_server_proposals_committed_total",
    "etcd_server_proposals_applied_total",
    "etcd_server_proposals_pending",
    "etcd_server_proposals_failed_total",
    "etcd_server_quota_backend_bytes",
    "etcd_mvcc_db_total_size_in_bytes",
    "etcd_mvcc_db_total_size_in_use_in_bytes",
    "etcd_disk_wal_fsync_duration_seconds",
    "etcd_disk_wal_write_bytes_total",
    "etcd_disk_backend_commit_duration_seconds",
    "etcd_network_client_grpc_received_bytes_total",
    "etcd_network_client_grpc_sent_bytes_total",
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_start_time_seconds",
    "process_open_fds",
    "process_max_fds",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_for_etcds_alerts_and_dashboards_match_etcds() -> Result<()> {
    let (etcd, candidate) = fetcd_tests::target::start_pair().await?;
    let mut scrapes = Vec::new();
    for t in [&etcd, &candidate] {
        let mut c = t.connect().await?;
        c.put("m", "v", None).await?;
        c.get("m", None).await?;
        // A backend commit happens within etcd's 100 ms batch interval (and fetcd's).
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let text = http_body(&t.client_url(), "/metrics").await?;
        scrapes.push((t.label().to_string(), parse_scrape(&text)));
    }
    let [(_, want), (label, got)] = &scrapes[..] else {
        anyhow::bail!("two scrapes expected");
    };
    for name in ETCD_DASHBOARD_SERIES {
        let (Some(wt), Some(wl)) = (want.types.get(*name), want.labels.get(*name)) else {
            anyhow::bail!("etcd serves no {name}: the list is wrong");
        };
        ensure!(
            got.types.get(*name) == Some(wt),
            "{label}: {name} has type {:?}, etcd's is {wt}",
            got.types.get(*name)
        );
        ensure!(
            got.labels.get(*name) == Some(wl),
            "{label}: {name} has label names {:?}, etcd's are {wl:?}",
            got.labels.get(*name)
        );
    }
    // Without `--metrics extensive` neither times calls.
    for (l, scrape) in &scrapes {
        ensure!(
            !scrape.types.contains_key("grpc_server_handling_seconds"),
            "{l} times calls without --metrics extensive"
        );
    }
    // Values that mean the same on both.
    for name in [
        "etcd_server_has_leader",
        "etcd_server_is_leader",
        "etcd_server_is_learner",
        "etcd_server_proposals_pending",
        "etcd_server_proposals_failed_total",
        "etcd_server_quota_backend_bytes",
    ] {
        ensure!(
            got.values.get(name) == want.values.get(name),
            "{label}: {name} = {:?}, etcd's = {:?}",
            got.values.get(name),
            want.values.get(name)
        );
    }
    for scrape in [want, got] {
        let v = |n: &str| scrape.values.get(n).copied().unwrap_or(0.0);
        ensure!(v("etcd_network_client_grpc_received_bytes_total") > 0.0);
        ensure!(v("etcd_network_client_grpc_sent_bytes_total") > 0.0);
        ensure!(v("etcd_disk_backend_commit_duration_seconds_count") > 0.0);
        ensure!(v("process_resident_memory_bytes") > 1e6);
        let (used, total) = (
            v("etcd_mvcc_db_total_size_in_use_in_bytes"),
            v("etcd_mvcc_db_total_size_in_bytes"),
        );
        ensure!(used > 0.0 && used <= total, "in use {used} of {total}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extensive_metrics_time_grpc_calls_as_etcd() -> Result<()> {
    let (etcd, candidate) =
        fetcd_tests::target::start_pair_with_flags(&["--metrics", "extensive"]).await?;
    let name = "grpc_server_handling_seconds";
    let mut scrapes = Vec::new();
    for t in [&etcd, &candidate] {
        let mut c = t.connect().await?;
        c.put("m", "v", None).await?;
        let text = http_body(&t.client_url(), "/metrics").await?;
        // The Put was timed: its count is 1, in etcd's labels.
        let put = format!(
            "{name}_count{{grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}} 1"
        );
        ensure!(text.lines().any(|l| l == put), "{}: no `{put}`", t.label());
        scrapes.push(parse_scrape(&text));
    }
    ensure!(scrapes[0].types.get(name).map(String::as_str) == Some("histogram"));
    ensure!(scrapes[1].types.get(name) == scrapes[0].types.get(name));
    ensure!(
        scrapes[1].labels.get(name) == scrapes[0].labels.get(name),
        "label names {:?}, etcd's {:?}",
        scrapes[1].labels.get(name),
        scrapes[0].labels.get(name)
    );
    Ok(())
}

/// A write that finds no other in flight is proposed from its own task, around the batcher
/// (`fetcd_server_proposals_lone_total` counts them); once writes come together they all go
/// through the batcher, which would otherwise see the first of every round take a sync of its
/// own; after a quiet spell writes go around it again.
#[cfg(feature = "fetcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_writes_go_around_the_batcher_until_writes_come_together() -> Result<()> {
    let fetcd = fetcd_tests::start_fetcd().await?;
    let url = fetcd.client_url();
    let mut c = fetcd_tests::connect(&url).await?;
    c.put("warm", "up", None).await?;
    let lone = || async {
        let text = http_body(&url, "/metrics").await?;
        parse_scrape(&text)
            .values
            .get("fetcd_server_proposals_lone_total")
            .copied()
            .context("no fetcd_server_proposals_lone_total")
    };

    // Rounds of 32 writers at once. Until the batcher has counted them, the first to arrive
    // go alone, one at a time (how many depends on how fast the client sends the rest: two on
    // a busy machine); from then on none does.
    let many = |round: usize| {
        let c = c.clone();
        async move {
            let mut writers = tokio::task::JoinSet::new();
            for w in 0..32 {
                let mut c = c.clone();
                writers.spawn(async move { c.put(format!("many/{round}/{w}"), "v", None).await });
            }
            while let Some(r) = writers.join_next().await {
                r??;
            }
            anyhow::Ok(())
        }
    };
    many(0).await?;
    let before = lone().await?;
    for round in 1..4 {
        many(round).await?;
    }
    let together = lone().await? - before;
    ensure!(
        together == 0.0,
        "{together} writes went alone while 32 writers came together"
    );

    // Two seconds without a batch: the first write refreshes the batcher's count, the rest go
    // alone again.
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    c.put("quiet", "v", None).await?;
    let before = lone().await?;
    for i in 0..10 {
        c.put(format!("again/{i}"), "v", None).await?;
    }
    ensure!(
        lone().await? - before == 10.0,
        "writes did not go alone after a quiet spell"
    );
    fetcd.stop().await?;
    Ok(())
}
