//! `fetcd-floor` serves what put-1 and the compare harness ask of it, and nothing more: puts
//! answered with increasing revisions, an empty range for the readiness probe, Unimplemented
//! for the rest, and a `fetcd-bench put` run against it without an error.

use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use fetcd_tests::connect;
use fetcd_tests::free_port;

/// The floor server, killed when dropped.
struct Floor {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_floor() -> anyhow::Result<Floor> {
    let dir = tempfile::tempdir()?;
    let url = format!("http://127.0.0.1:{}", free_port()?);
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_fetcd-floor"))
        .args(["--name", "floor", "--data-dir"])
        .arg(dir.path())
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .stdin(Stdio::null())
        .spawn()
        .context("start fetcd-floor")?;
    let floor = Floor {
        child,
        url,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = connect(&floor.url).await {
            if c.get("ready", None).await.is_ok() {
                return Ok(floor);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "fetcd-floor did not serve");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_floor_answers_puts_and_the_harness_probe_only() -> anyhow::Result<()> {
    let floor = start_floor().await?;
    let mut c = connect(&floor.url).await?;
    let first = c.put("a", "1", None).await?;
    let second = c.put("b", vec![9u8; 10_000], None).await?;
    let rev = |h: Option<&etcd_client::ResponseHeader>| h.map_or(0, |h| h.revision());
    assert_eq!(rev(second.header()), rev(first.header()) + 1);
    let got = c.get("a", None).await?;
    assert!(got.kvs().is_empty(), "the floor keeps nothing");
    assert_eq!(rev(got.header()), rev(second.header()));
    match c.delete("a", None).await {
        Err(etcd_client::Error::GRpcStatus(s)) => assert_eq!(s.code(), tonic::Code::Unimplemented),
        other => anyhow::bail!("delete answered {other:?}"),
    }

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fetcd-bench"))
        .args(["--endpoints", &floor.url, "--json", "put"])
        .args(["--clients", "1", "--total", "200", "--val-size", "256"])
        .stdin(Stdio::null())
        .output()
        .await
        .context("run fetcd-bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "fetcd-bench: {stdout}");
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no JSON line")?;
    let report: serde_json::Value = serde_json::from_str(line)?;
    assert_eq!(report.get("errors").and_then(|v| v.as_u64()), Some(0));
    assert_eq!(report.get("total").and_then(|v| v.as_u64()), Some(200));
    Ok(())
}
