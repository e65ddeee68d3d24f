//! Self-tests of the harness: the differential runner must notice differences and failed
//! absolute checks, and `EtcdProcess` must start, serve and go away on drop.
#![allow(clippy::unwrap_used)]

use anyhow::{ensure, Result};
use fetcd_tests::{run_differential, EtcdProcess, Session};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_process_lifecycle() -> Result<()> {
    let etcd = EtcdProcess::start().await?;
    let url = etcd.client_url();
    ensure!(url.starts_with("http://127.0.0.1:"), "{url}");
    let mut client = etcd.connect().await?;
    let status = client.status().await?;
    ensure!(
        status.version().starts_with("3."),
        "version {}",
        status.version()
    );
    let r = client.get("anything", None).await?;
    ensure!(
        r.header().unwrap().revision() == 1,
        "fresh etcd starts at revision 1"
    );
    let data_dir = etcd.data_dir();
    ensure!(data_dir.exists());
    drop(etcd);
    ensure!(!data_dir.exists(), "temp dir not removed");
    let port = url.rsplit(':').next().unwrap();
    let refused = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err();
    ensure!(refused, "etcd still listening after drop");
    Ok(())
}

/// The candidate writes one extra key: the diff must name the step and the differing field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_reports_mismatches() -> Result<()> {
    let err = run_differential("deliberately different", async |s: &mut Session| {
        s.put("put a", "a", "1", None).await?;
        if s.label() != "etcd" {
            s.put("only on candidate", "b", "2", None).await?;
        }
        s.get(
            "get all",
            "",
            Some(etcd_client::GetOptions::new().with_all_keys()),
        )
        .await?;
        Ok(())
    })
    .await
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    ensure!(err.contains("step #1"), "no step in report:\n{err}");
    ensure!(err.contains("step names differ"), "{err}");
    ensure!(err.contains("$.ok.header.revision"), "{err}");
    Ok(())
}

/// Identical transcripts but a failing absolute check must still fail the scenario.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_reports_absolute_check_failures() -> Result<()> {
    let res = run_differential("wrong expectation", async |s: &mut Session| {
        let r = s.put("put a", "a", "1", None).await?;
        let rev = r.header().unwrap().revision();
        ensure!(rev == 3, "first write got revision {rev}");
        Ok(())
    })
    .await;
    let err = res.err().map(|e| format!("{e:#}")).unwrap_or_default();
    ensure!(
        err.contains("absolute check failed on etcd: first write got revision 2"),
        "{err}"
    );
    Ok(())
}
