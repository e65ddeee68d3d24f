//! etcdctl (v3 API, the 3.4 client from `etcd-client` apt package) against the reference etcd
//! and the candidate: exit status, stdout and stderr must be identical after normalization
//! (`-w json` header cluster_id/member_id/raft_term removed, log timestamps removed, endpoint
//! URL replaced by `<endpoint>`).
#![allow(clippy::unwrap_used)]

use anyhow::{ensure, Result};
use fetcd_tests::{run_differential, EtcdctlOutput, Session};

fn ensure_stdout(out: &EtcdctlOutput, want: &str, what: &str) -> Result<()> {
    ensure!(
        out.success() && out.stdout == want,
        "{what}: status {:?}, stdout {:?} (want {want:?}), stderr {:?}",
        out.status,
        out.stdout,
        out.stderr
    );
    Ok(())
}

fn ensure_failure(out: &EtcdctlOutput, stderr_contains: &str, what: &str) -> Result<()> {
    ensure!(
        !out.success() && out.stderr.contains(stderr_contains),
        "{what}: expected failure mentioning {stderr_contains:?}, got status {:?}, stdout {:?}, \
         stderr {:?}",
        out.status,
        out.stdout,
        out.stderr
    );
    Ok(())
}

async fn put_get_scenario(s: &mut Session) -> Result<()> {
    let out = s
        .etcdctl("put foo bar", &["put", "foo", "bar"], None)
        .await?;
    ensure_stdout(&out, "OK\n", "put")?;
    let out = s.etcdctl("get foo", &["get", "foo"], None).await?;
    ensure_stdout(&out, "foo\nbar\n", "get")?;
    let out = s
        .etcdctl(
            "put foo bar2 --prev-kv",
            &["put", "foo", "bar2", "--prev-kv"],
            None,
        )
        .await?;
    ensure_stdout(&out, "OK\nfoo\nbar\n", "put --prev-kv")?;
    s.etcdctl(
        "put value from stdin",
        &["put", "stdin-key"],
        Some("from stdin"),
    )
    .await?;
    for (k, v) in [
        ("a", "1"),
        ("ab", "2"),
        ("abc", "3"),
        ("b", "4"),
        ("c", "5"),
        ("a", "1b"),
    ] {
        s.etcdctl(&format!("put {k} {v}"), &["put", k, v], None)
            .await?;
    }
    let out = s.etcdctl("get missing", &["get", "missing"], None).await?;
    ensure_stdout(&out, "", "get missing")?;

    let out = s
        .etcdctl("get a --prefix", &["get", "a", "--prefix"], None)
        .await?;
    ensure_stdout(&out, "a\n1b\nab\n2\nabc\n3\n", "get --prefix")?;
    s.etcdctl(
        "get a --prefix --limit 2",
        &["get", "a", "--prefix", "--limit=2"],
        None,
    )
    .await?;
    s.etcdctl("get range [ab, c)", &["get", "ab", "c"], None)
        .await?;
    s.etcdctl("get --from-key b", &["get", "--from-key", "b"], None)
        .await?;
    s.etcdctl("get --from-key '' (all)", &["get", "--from-key", ""], None)
        .await?;
    let out = s
        .etcdctl("get foo --rev=2", &["get", "foo", "--rev=2"], None)
        .await?;
    ensure_stdout(&out, "foo\nbar\n", "get --rev")?;
    s.etcdctl(
        "get a --prefix --rev=7",
        &["get", "a", "--prefix", "--rev=7"],
        None,
    )
    .await?;
    for target in ["KEY", "VERSION", "CREATE", "MODIFY", "VALUE"] {
        for order in ["ASCEND", "DESCEND"] {
            s.etcdctl(
                &format!("get --from-key a --sort-by={target} --order={order}"),
                &[
                    "get",
                    "--from-key",
                    "a",
                    &format!("--sort-by={target}"),
                    &format!("--order={order}"),
                ],
                None,
            )
            .await?;
        }
    }
    s.etcdctl(
        "get --prefix a --order=DESCEND",
        &["get", "--prefix", "a", "--order=DESCEND"],
        None,
    )
    .await?;
    s.etcdctl(
        "get --from-key a --sort-by=MODIFY --order=DESCEND --limit=2",
        &[
            "get",
            "--from-key",
            "a",
            "--sort-by=MODIFY",
            "--order=DESCEND",
            "--limit=2",
        ],
        None,
    )
    .await?;
    let out = s
        .etcdctl(
            "get a --prefix --keys-only",
            &["get", "a", "--prefix", "--keys-only"],
            None,
        )
        .await?;
    ensure_stdout(&out, "a\n\nab\n\nabc\n\n", "--keys-only")?;
    let out = s
        .etcdctl(
            "get a --prefix --print-value-only",
            &["get", "a", "--prefix", "--print-value-only"],
            None,
        )
        .await?;
    ensure_stdout(&out, "1b\n2\n3\n", "--print-value-only")?;
    // etcdctl 3.4 has no --count-only (added in 3.5): a client-side usage error.
    let out = s
        .etcdctl(
            "get a --prefix --count-only",
            &["get", "a", "--prefix", "--count-only"],
            None,
        )
        .await?;
    ensure!(!out.success());
    s.etcdctl(
        "get --consistency=s",
        &["get", "a", "--prefix", "--consistency=s"],
        None,
    )
    .await?;
    s.etcdctl("get --hex", &["get", "foo", "--hex"], None)
        .await?;

    let out = s
        .etcdctl("get foo -w json", &["get", "foo", "-w", "json"], None)
        .await?;
    let v = out.json()?;
    ensure!(
        v["header"]["revision"] == 10 && v["count"] == 1,
        "json: {v}"
    );
    s.etcdctl(
        "get a --prefix --limit=1 -w json",
        &["get", "a", "--prefix", "--limit=1", "-w", "json"],
        None,
    )
    .await?;
    s.etcdctl(
        "get missing -w json",
        &["get", "missing", "-w", "json"],
        None,
    )
    .await?;
    s.etcdctl(
        "get a --prefix --keys-only -w json",
        &["get", "a", "--prefix", "--keys-only", "-w", "json"],
        None,
    )
    .await?;
    s.etcdctl("get foo -w fields", &["get", "foo", "-w", "fields"], None)
        .await?;
    s.etcdctl(
        "put foo baz -w json",
        &["put", "foo", "baz", "-w", "json"],
        None,
    )
    .await?;
    s.etcdctl(
        "put foo qux --prev-kv -w json",
        &["put", "foo", "qux", "--prev-kv", "-w", "json"],
        None,
    )
    .await?;

    s.etcdctl(
        "put --ignore-value",
        &["put", "foo", "--ignore-value"],
        None,
    )
    .await?;
    let out = s
        .etcdctl(
            "put --ignore-value missing",
            &["put", "nokey", "--ignore-value"],
            None,
        )
        .await?;
    ensure_failure(
        &out,
        "etcdserver: key not found",
        "ignore-value on missing key",
    )?;
    let out = s
        .etcdctl(
            "put --lease=1234 (missing lease)",
            &["put", "foo", "v", "--lease=1234"],
            None,
        )
        .await?;
    ensure_failure(
        &out,
        "etcdserver: requested lease not found",
        "missing lease",
    )?;
    let out = s.etcdctl("put empty key", &["put", "", "v"], None).await?;
    ensure_failure(&out, "etcdserver: key is not provided", "empty key")?;
    let out = s
        .etcdctl(
            "get --rev=1000 (future)",
            &["get", "foo", "--rev=1000"],
            None,
        )
        .await?;
    ensure_failure(
        &out,
        "etcdserver: mvcc: required revision is a future revision",
        "future rev",
    )?;
    s.etcdctl(
        "get all -w json",
        &["get", "--from-key", "", "-w", "json"],
        None,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_put_get() -> Result<()> {
    run_differential("etcdctl_put_get", put_get_scenario).await
}

async fn del_scenario(s: &mut Session) -> Result<()> {
    for (k, v) in [
        ("a", "1"),
        ("ab", "2"),
        ("abc", "3"),
        ("b", "4"),
        ("c", "5"),
        ("d", "6"),
        ("e", "7"),
    ] {
        s.etcdctl(&format!("put {k} {v}"), &["put", k, v], None)
            .await?;
    }
    let out = s.etcdctl("del b", &["del", "b"], None).await?;
    ensure_stdout(&out, "1\n", "del")?;
    let out = s.etcdctl("del missing", &["del", "missing"], None).await?;
    ensure_stdout(&out, "0\n", "del missing")?;
    let out = s
        .etcdctl(
            "del a --prefix --prev-kv",
            &["del", "a", "--prefix", "--prev-kv"],
            None,
        )
        .await?;
    ensure_stdout(&out, "3\na\n1\nab\n2\nabc\n3\n", "del --prefix --prev-kv")?;
    s.etcdctl("del range [c, e)", &["del", "c", "e", "--prev-kv"], None)
        .await?;
    s.etcdctl(
        "del missing -w json",
        &["del", "missing", "-w", "json"],
        None,
    )
    .await?;
    s.etcdctl(
        "del e --prev-kv -w json",
        &["del", "e", "--prev-kv", "-w", "json"],
        None,
    )
    .await?;
    for k in ["x", "y", "z"] {
        s.etcdctl(&format!("put {k}"), &["put", k, k], None).await?;
    }
    s.etcdctl("del --from-key y", &["del", "--from-key", "y"], None)
        .await?;
    s.etcdctl("del --from-key '' (all)", &["del", "--from-key", ""], None)
        .await?;
    let out = s
        .etcdctl(
            "get all after deletes",
            &["get", "--from-key", "", "-w", "json"],
            None,
        )
        .await?;
    let v = out.json()?;
    ensure!(
        v["header"]["revision"] == 17 && v.get("kvs").is_none(),
        "json: {v}"
    );
    let out = s.etcdctl("del empty key", &["del", ""], None).await?;
    ensure_failure(&out, "etcdserver: key is not provided", "del empty key")?;
    s.etcdctl("re-put a", &["put", "a", "again"], None).await?;
    s.etcdctl("get a -w json", &["get", "a", "-w", "json"], None)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_del() -> Result<()> {
    run_differential("etcdctl_del", del_scenario).await
}

async fn txn_scenario(s: &mut Session) -> Result<()> {
    let create_k = "mod(\"k\") = \"0\"\n\nput k v\n\nget k\n\n";
    let out = s.etcdctl("txn create k", &["txn"], Some(create_k)).await?;
    ensure_stdout(&out, "SUCCESS\n\nOK\n", "txn success")?;
    let out = s
        .etcdctl("txn create k again (failure)", &["txn"], Some(create_k))
        .await?;
    ensure_stdout(&out, "FAILURE\n\nk\nv\n", "txn failure")?;
    s.etcdctl(
        "txn create k -w json",
        &["txn", "-w", "json"],
        Some(create_k),
    )
    .await?;

    s.etcdctl("put k2", &["put", "k2", "x"], None).await?;
    let multi = "value(\"k\") = \"v\"\nversion(\"k\") > \"0\"\ncreate(\"k\") < \"100\"\n\n\
                 put k v2\ndel k2\nget k --prefix\n\nget k\n\n";
    let out = s
        .etcdctl("txn multiple compares, put/del/get", &["txn"], Some(multi))
        .await?;
    ensure_stdout(&out, "SUCCESS\n\nOK\n\n1\n\nk\nv2\n", "multi txn")?;
    s.etcdctl(
        "txn same again -w json",
        &["txn", "-w", "json"],
        Some(multi),
    )
    .await?;
    s.etcdctl(
        "txn value != and mod >",
        &["txn"],
        Some("value(\"k\") != \"v\"\nmod(\"k\") > \"1\"\n\nput k3 z\n\n\n"),
    )
    .await?;
    s.etcdctl(
        "txn no compares",
        &["txn"],
        Some("\nput k4 a\nput k5 b\n\n\n"),
    )
    .await?;
    s.etcdctl("txn empty", &["txn"], Some("\n\n\n")).await?;
    s.etcdctl(
        "txn prefix get and del --prefix in failure",
        &["txn"],
        Some("version(\"nope\") > \"0\"\n\nput never x\n\nget k --prefix --keys-only\ndel k4 --prev-kv\n\n"),
    )
    .await?;
    let out = s
        .etcdctl(
            "txn duplicate put",
            &["txn"],
            Some("\nput d 1\nput d 2\n\n\n"),
        )
        .await?;
    ensure_failure(
        &out,
        "etcdserver: duplicate key given in txn request",
        "duplicate",
    )?;
    s.etcdctl(
        "txn put + del same key",
        &["txn"],
        Some("\nput d 1\ndel d\n\n\n"),
    )
    .await?;
    s.etcdctl("txn malformed compare", &["txn"], Some("garbage\n\n\n\n"))
        .await?;
    s.etcdctl("txn truncated input", &["txn"], Some("\nput k v\n\n"))
        .await?;
    s.etcdctl(
        "txn -i (interactive prompts)",
        &["txn", "-i"],
        Some(create_k),
    )
    .await?;
    s.etcdctl(
        "get all -w json",
        &["get", "--from-key", "", "-w", "json"],
        None,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_txn() -> Result<()> {
    run_differential("etcdctl_txn", txn_scenario).await
}

async fn compaction_scenario(s: &mut Session) -> Result<()> {
    for i in 2..=8 {
        s.etcdctl(
            &format!("put k v{i}"),
            &["put", "k", &format!("v{i}")],
            None,
        )
        .await?;
    }
    let out = s
        .etcdctl("compaction 4", &["compaction", "4"], None)
        .await?;
    ensure_stdout(&out, "compacted revision 4\n", "compaction")?;
    let out = s
        .etcdctl("get --rev=3 (compacted)", &["get", "k", "--rev=3"], None)
        .await?;
    ensure_failure(
        &out,
        "etcdserver: mvcc: required revision has been compacted",
        "compacted",
    )?;
    let out = s
        .etcdctl("get --rev=4 (compact rev)", &["get", "k", "--rev=4"], None)
        .await?;
    ensure_stdout(&out, "k\nv4\n", "at compact rev")?;
    s.etcdctl(
        "get --rev=5 -w json",
        &["get", "k", "--rev=5", "-w", "json"],
        None,
    )
    .await?;
    let out = s
        .etcdctl("compaction 4 again", &["compaction", "4"], None)
        .await?;
    ensure_failure(
        &out,
        "etcdserver: mvcc: required revision has been compacted",
        "again",
    )?;
    let out = s
        .etcdctl("compaction 100 (future)", &["compaction", "100"], None)
        .await?;
    ensure_failure(
        &out,
        "etcdserver: mvcc: required revision is a future revision",
        "future",
    )?;
    s.etcdctl(
        "compaction --physical 6",
        &["compaction", "--physical", "6"],
        None,
    )
    .await?;
    s.etcdctl(
        "get --rev=5 after physical compaction",
        &["get", "k", "--rev=5"],
        None,
    )
    .await?;
    s.etcdctl(
        "get --rev=6 -w json",
        &["get", "k", "--rev=6", "-w", "json"],
        None,
    )
    .await?;
    s.etcdctl("compaction 8 (current)", &["compaction", "8"], None)
        .await?;
    s.etcdctl("compaction abc (bad arg)", &["compaction", "abc"], None)
        .await?;
    s.etcdctl("get k latest", &["get", "k", "-w", "json"], None)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_compaction() -> Result<()> {
    run_differential("etcdctl_compaction", compaction_scenario).await
}
