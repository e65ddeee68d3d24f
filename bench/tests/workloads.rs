//! Every `fetcd-bench` workload, run briefly against fetcd and against real etcd: the
//! benchmark's figures are only worth something if the same client completes the same work
//! against both without an error. Each run's JSON line must report no error, as many ops as
//! asked for, and for the watch workloads every event delivered once, in order, at the revision
//! its put returned. Performance is not judged here (see `docs/benchmarks.md`).

use std::process::Stdio;

use anyhow::Context;
use fetcd_tests::start_fetcd;
use fetcd_tests::EtcdProcess;
use serde_json::Value;

/// Each workload with flags small enough for a few seconds on two cores.
const RUNS: &[(&str, &str)] = &[
    ("put", "--clients 8 --conns 2 --total 400 --val-size 64"),
    ("range", "--clients 4 --conns 2 --total 200"),
    ("range", "--clients 4 --total 200 --consistency s"),
    (
        "txn-put",
        "--clients 8 --conns 2 --total 300 --key-space-size 20",
    ),
    ("txn-mixed", "--clients 4 --total 200"),
    (
        "watch",
        "--watchers 40 --streams 4 --conns 2 --clients 4 --total 50",
    ),
    (
        "watch",
        "--watchers 20 --streams 2 --clients 2 --total 30 --prefix",
    ),
    ("watch-latency", "--watchers 10 --total 20 --put-rate 400"),
    ("lease-keepalive", "--clients 4 --total 200"),
    ("lease-grant-revoke", "--clients 4 --total 100"),
    ("list-stall", "--total 200 --val-size 64 --put-rate 400"),
    (
        "kube",
        "--clients 4 --conns 2 --kube-objects 20 --object-size 200 --total 300 \
         --compact-interval 0.2",
    ),
];

/// Runs one workload against `endpoint` and returns its JSON report.
async fn run(endpoint: &str, workload: &str, flags: &str) -> anyhow::Result<Value> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fetcd-bench"))
        .args(["--endpoints", endpoint, "--json", workload])
        .args(flags.split_whitespace())
        .stdin(Stdio::null())
        .output()
        .await
        .context("run fetcd-bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "{workload} {flags}: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("{workload}: no JSON line in {stdout:?}"))?;
    serde_json::from_str(line).with_context(|| format!("{workload}: JSON line {line:?}"))
}

/// The checks every report must pass; returns what failed, for the server named `server`.
fn check(server: &str, workload: &str, flags: &str, report: &Value) -> Vec<String> {
    let mut failed = Vec::new();
    let field = |k: &str| report.get(k).and_then(Value::as_f64);
    let asked: f64 = flags
        .split_whitespace()
        .skip_while(|f| *f != "--total")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    let what = format!("{server} {workload} {flags}");
    if field("errors") != Some(0.0) {
        failed.push(format!(
            "{what}: errors {:?}: {report}",
            report.get("errors")
        ));
    }
    match workload {
        // Their ops are events (watch), or a writer's puts beside the work (list-stall).
        "watch" | "watch-latency" => {
            if field("events") != field("expected_events") || field("events") == Some(0.0) {
                failed.push(format!("{what}: events delivered: {report}"));
            }
            for k in ["missing_events", "order_errors", "revision_mismatches"] {
                if field(k) != Some(0.0) {
                    failed.push(format!("{what}: {k}: {report}"));
                }
            }
        }
        "list-stall" => {}
        _ => {
            if field("total") != Some(asked) {
                failed.push(format!("{what}: total {:?}, asked {asked}", field("total")));
            }
        }
    }
    if !field("ops_per_sec").is_some_and(|r| r > 0.0) {
        failed.push(format!("{what}: no throughput: {report}"));
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_completes_against_fetcd_and_etcd() -> anyhow::Result<()> {
    let fetcd = start_fetcd().await?;
    let etcd = EtcdProcess::start().await?;
    let mut failed = Vec::new();
    for (server, endpoint) in [("fetcd", fetcd.client_url()), ("etcd", etcd.client_url())] {
        for (workload, flags) in RUNS {
            let report = run(&endpoint, workload, flags).await?;
            failed.extend(check(server, workload, flags, &report));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    fetcd.stop().await?;
    Ok(())
}
