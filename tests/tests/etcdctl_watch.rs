//! `etcdctl watch` (the 3.4 client) against the reference etcd and the candidate: etcdctl runs
//! as a child process (it streams until killed) while the test writes through the client; the
//! printed events (simple, `--prev-kv`, `--hex`, `-w json`, `-w fields`, exec mode) must be
//! identical. Every wait is bounded; watchers are killed once their last expected event was
//! printed and a short quiet period passed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::{ensure, Result};
use etcd_client::{DeleteOptions, Txn, TxnOp};
use fetcd_tests::etcdctl_stream::EtcdctlChild;
use fetcd_tests::watch::QUIET_PERIOD;
use fetcd_tests::{run_differential, EtcdctlOutput, Session};

/// How long etcdctl may take to print an expected event (includes its own startup).
const PRINT_TIMEOUT: Duration = Duration::from_secs(10);

/// A watcher: its etcdctl arguments, what it prints once the history is replayed (if it
/// replays any), and what it prints for the final live write.
struct Watcher {
    name: &'static str,
    args: Vec<&'static str>,
    replayed: Option<&'static str>,
    done: &'static str,
}

const EXEC: &str =
    r#"echo "$ETCD_WATCH_EVENT_TYPE $ETCD_WATCH_KEY $ETCD_WATCH_VALUE $ETCD_WATCH_REVISION""#;

fn watchers() -> Vec<Watcher> {
    // base64("H-END") / base64("L-END") for -w json; \x.. for --hex.
    let w = |name, args: &[&'static str], replayed, done| Watcher {
        name,
        args: args.to_vec(),
        replayed,
        done,
    };
    vec![
        w(
            "watch a --rev=2",
            &["watch", "a", "--rev=2"],
            Some("H-END"),
            "L-END",
        ),
        w(
            "watch a --prefix --rev=2",
            &["watch", "a", "--prefix", "--rev=2"],
            Some("H-END"),
            "L-END",
        ),
        w(
            "watch a --prefix --rev=2 --prev-kv",
            &["watch", "a", "--prefix", "--rev=2", "--prev-kv"],
            Some("H-END"),
            "L-END",
        ),
        w(
            "watch a --rev=2 -w json",
            &["watch", "a", "--rev=2", "-w", "json"],
            Some("SC1FTkQ="),
            "TC1FTkQ=",
        ),
        w(
            "watch a --prefix --rev=9 -w fields (future)",
            &["watch", "a", "--prefix", "--rev=9", "-w", "fields"],
            None,
            "L-END",
        ),
        w(
            "watch a --prefix --rev=2 --hex",
            &["watch", "a", "--prefix", "--rev=2", "--hex"],
            Some(r"\x48\x2d\x45\x4e\x44"),
            r"\x4c\x2d\x45\x4e\x44",
        ),
        w(
            "watch a b --rev=2 (range)",
            &["watch", "a", "b", "--rev=2"],
            Some("H-END"),
            "L-END",
        ),
        w(
            "watch a c --rev=4 (range)",
            &["watch", "a", "c", "--rev=4"],
            Some("H-END"),
            "L-END",
        ),
        w(
            "watch a --rev=9 --prev-kv (future)",
            &["watch", "a", "--rev=9", "--prev-kv"],
            None,
            "L-END",
        ),
        w(
            "watch --prefix a --rev=2 -- sh -c echo (exec)",
            &["watch", "--prefix", "a", "--rev=2", "--", "sh", "-c", EXEC],
            Some("H-END"),
            "L-END",
        ),
    ]
}

async fn history_and_live_scenario(s: &mut Session) -> Result<()> {
    s.put("rev2 put a=1", "a", "1", None).await?;
    s.put("rev3 put a/1=x", "a/1", "x", None).await?;
    s.put("rev4 put ab=3", "ab", "3", None).await?;
    s.put("rev5 put a=2", "a", "2", None).await?;
    s.delete("rev6 delete a", "a", None).await?;
    s.txn(
        "rev7 txn put a/2=y, b=z",
        Txn::new().and_then(vec![
            TxnOp::put("a/2", "y", None),
            TxnOp::put("b", "z", None),
        ]),
    )
    .await?;
    s.put("rev8 put a=H-END", "a", "H-END", None).await?;

    // Note: `-w json` prints one line per response and exec mode exports the response's header
    // revision, so those two also show how the replay is batched (etcd 3.4: the whole replay in
    // one response whose header is the current revision, 8).
    let specs = watchers();
    let mut children = Vec::new();
    for w in &specs {
        children.push(s.etcdctl_spawn(&w.args)?);
    }
    // The replay must be complete before live writes start (a replay's header revision is the
    // store's revision at that moment, and exec mode prints it).
    for (w, c) in specs.iter().zip(children.iter_mut()) {
        if let Some(needle) = w.replayed {
            c.wait_for_stdout(needle, PRINT_TIMEOUT).await?;
        }
    }

    s.put("rev9 put a=3", "a", "3", None).await?;
    s.put("rev10 put a/3=w", "a/3", "w", None).await?;
    s.delete(
        "rev11 delete prefix a/",
        "a/",
        Some(DeleteOptions::new().with_prefix()),
    )
    .await?;
    s.txn(
        "rev12 txn put a=4, ab=5",
        Txn::new().and_then(vec![
            TxnOp::put("a", "4", None),
            TxnOp::put("ab", "5", None),
        ]),
    )
    .await?;
    let r = s.put("rev13 put a=L-END", "a", "L-END", None).await?;
    ensure!(r.header().unwrap().revision() == 13);

    for (w, c) in specs.iter().zip(children.iter_mut()) {
        c.wait_for_stdout(w.done, PRINT_TIMEOUT).await?;
    }
    tokio::time::sleep(QUIET_PERIOD).await;
    let mut outs = Vec::new();
    for (w, c) in specs.iter().zip(children) {
        let out = c.finish().await?;
        s.record_etcdctl(w.name, &out);
        outs.push(out);
    }

    ensure_stdout(
        &outs[0],
        "PUT\na\n1\nPUT\na\n2\nDELETE\na\n\nPUT\na\nH-END\n\
         PUT\na\n3\nPUT\na\n4\nPUT\na\nL-END\n",
        "watch a --rev=2",
    )?;
    ensure_stdout(
        &outs[2],
        "PUT\na\n1\nPUT\na/1\nx\nPUT\nab\n3\nPUT\na\n1\na\n2\nDELETE\na\n2\na\n\nPUT\na/2\ny\n\
         PUT\na\nH-END\nPUT\na\nH-END\na\n3\nPUT\na/3\nw\n\
         DELETE\na/1\nx\na/1\n\nDELETE\na/2\ny\na/2\n\nDELETE\na/3\nw\na/3\n\n\
         PUT\na\n3\na\n4\nPUT\nab\n3\nab\n5\nPUT\na\n4\na\nL-END\n",
        "watch a --prefix --rev=2 --prev-kv",
    )?;
    ensure_stdout(
        &outs[8],
        "PUT\na\nH-END\na\n3\nPUT\na\n3\na\n4\nPUT\na\n4\na\nL-END\n",
        "future watch --prev-kv",
    )?;
    // Exec mode prints each response's events, then runs the command once per event with
    // ETCD_WATCH_* set (type, key and value %q-quoted; the revision is the response header's:
    // 8 for the whole replay, which etcd sends as one response).
    let exec = &outs[9].stdout;
    ensure!(
        exec.starts_with("PUT\na\n1\n")
            && exec.contains("PUT\na\nH-END\n\"PUT\" \"a\" \"1\" 8\n\"PUT\" \"a/1\" \"x\" 8\n")
            && exec.ends_with("PUT\na\nL-END\n\"PUT\" \"a\" \"L-END\" 13\n"),
        "exec mode: {exec:?}"
    );
    Ok(())
}

fn ensure_stdout(out: &EtcdctlOutput, want: &str, what: &str) -> Result<()> {
    ensure!(
        out.stdout == want,
        "{what}: stdout {:?}, want {want:?}; stderr {:?}",
        out.stdout,
        out.stderr
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_history_and_live() -> Result<()> {
    run_differential("etcdctl watch history and live", history_and_live_scenario).await
}

/// `etcdctl watch` without `--rev` starts "now": it is ready once it prints a sentinel put
/// (repeated until it shows up, always with the same value). Only what it prints afterwards
/// is compared, and the writes are not recorded (the number of sentinel puts, hence the
/// revisions, may differ between the servers).
async fn live_scenario(s: &mut Session) -> Result<()> {
    let specs: [(&str, &[&str]); 3] = [
        ("watch k", &["watch", "k"]),
        (
            "watch --prefix k --prev-kv",
            &["watch", "--prefix", "k", "--prev-kv"],
        ),
        ("watch k -w json", &["watch", "k", "-w", "json"]),
    ];
    let mut children: Vec<EtcdctlChild> = specs
        .iter()
        .map(|(_, args)| s.etcdctl_spawn(args))
        .collect::<Result<_>>()?;
    let mut ready = false;
    for _ in 0..40 {
        s.client().put("k", "ready", None).await?;
        tokio::time::sleep(Duration::from_millis(250)).await;
        // "cmVhZHk=" is base64("ready") for -w json.
        if children[0].stdout().contains("ready")
            && children[1].stdout().contains("ready")
            && children[2].stdout().contains("cmVhZHk=")
        {
            ready = true;
            break;
        }
    }
    ensure!(ready, "etcdctl watchers never printed the sentinel");
    tokio::time::sleep(QUIET_PERIOD).await;
    let marks: Vec<usize> = children.iter().map(|c| c.stdout().len()).collect();

    let c = s.client();
    c.put("k", "v1", None).await?;
    c.put("k2", "x", None).await?;
    c.put("k", "v2", None).await?;
    c.delete("k", None).await?;
    c.txn(Txn::new().and_then(vec![
        TxnOp::put("k", "v3", None),
        TxnOp::put("k3", "y", None),
    ]))
    .await?;
    c.delete("k", Some(DeleteOptions::new().with_prefix()))
        .await?;
    c.put("k", "END", None).await?;

    for (i, child) in children.iter_mut().enumerate() {
        let needle = if i == 2 { "RU5E" } else { "END" };
        child.wait_for_stdout(needle, PRINT_TIMEOUT).await?;
    }
    tokio::time::sleep(QUIET_PERIOD).await;
    let mut outs = Vec::new();
    for ((name, _), (child, mark)) in specs.iter().zip(children.into_iter().zip(marks)) {
        let mut out = child.finish().await?;
        out.stdout = out.stdout[mark..].to_owned();
        // The JSON lines carry header revisions, which depend on the number of sentinel puts.
        if name.contains("json") {
            out.stdout = out
                .stdout
                .lines()
                .map(|l| match serde_json::from_str::<serde_json::Value>(l) {
                    Ok(mut v) => {
                        fetcd_tests::observe::strip_keys(
                            &mut v,
                            &["revision", "create_revision", "mod_revision", "version"],
                        );
                        format!("{v}\n")
                    }
                    Err(_) => format!("{l}\n"),
                })
                .collect();
        }
        s.record_etcdctl(&format!("{name} (after the sentinel)"), &out);
        outs.push(out);
    }
    ensure_stdout(
        &outs[0],
        "PUT\nk\nv1\nPUT\nk\nv2\nDELETE\nk\n\nPUT\nk\nv3\nDELETE\nk\n\nPUT\nk\nEND\n",
        "watch k",
    )?;
    ensure_stdout(
        &outs[1],
        "PUT\nk\nready\nk\nv1\nPUT\nk2\nx\nPUT\nk\nv1\nk\nv2\nDELETE\nk\nv2\nk\n\n\
         PUT\nk\nv3\nPUT\nk3\ny\nDELETE\nk\nv3\nk\n\nDELETE\nk2\nx\nk2\n\nDELETE\nk3\ny\nk3\n\n\
         PUT\nk\nEND\n",
        "watch --prefix k --prev-kv",
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_live() -> Result<()> {
    run_differential("etcdctl watch live", live_scenario).await
}

/// Watches the server cancels: etcdctl reports it and exits with status 5.
async fn canceled_scenario(s: &mut Session) -> Result<()> {
    for v in ["1", "2", "3"] {
        s.put(&format!("put a={v}"), "a", v, None).await?;
    }
    s.compact("compact 3", 3, None).await?;
    let cases: [(&str, &[&str], &str); 3] = [
        (
            "watch a --rev=2 (compacted)",
            &["watch", "a", "--rev=2"],
            "watch was canceled (etcdserver: mvcc: required revision has been compacted)\n\
             Error: watch is canceled by the server\n",
        ),
        (
            "watch --prefix a --rev=1 --prev-kv (compacted)",
            &["watch", "--prefix", "a", "--rev=1", "--prev-kv"],
            "watch was canceled (etcdserver: mvcc: required revision has been compacted)\n\
             Error: watch is canceled by the server\n",
        ),
        (
            "watch b a (empty range)",
            &["watch", "b", "a"],
            "watch was canceled (mvcc: watcher range is empty)\n\
             Error: watch is canceled by the server\n",
        ),
    ];
    for (name, args, stderr) in cases {
        let child = s.etcdctl_spawn(args)?;
        let out = match child.wait_exit(PRINT_TIMEOUT).await {
            Ok(out) => out,
            Err(e) => {
                s.record(
                    name,
                    serde_json::json!({ "still_running": format!("{e:#}") }),
                );
                return Err(e);
            }
        };
        s.record_etcdctl(name, &out);
        ensure!(
            out.status == Some(5) && out.stdout.is_empty() && out.stderr == stderr,
            "{name}: {out:?}"
        );
    }
    // Watching exactly at the compaction revision works (a=2 was written at revision 3).
    let mut child = s.etcdctl_spawn(&["watch", "a", "--rev=3"])?;
    child.wait_for_stdout("PUT\na\n3\n", PRINT_TIMEOUT).await?;
    tokio::time::sleep(QUIET_PERIOD).await;
    let out = child.finish().await?;
    s.record_etcdctl("watch a --rev=3 (compaction revision)", &out);
    ensure_stdout(
        &out,
        "PUT\na\n2\nPUT\na\n3\n",
        "watch at the compaction revision",
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_watch_canceled() -> Result<()> {
    run_differential("etcdctl watch canceled", canceled_scenario).await
}
