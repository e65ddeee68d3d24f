//! The `fetcd` binary's command line: etcd's `ETCD_*` environment variables configure it, flags
//! fetcd cannot honour yet stop it with a message naming them, and SIGTERM stops it cleanly.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use common::connect_when_serving;
use common::free_port;

#[test]
fn refused_flags_stop_the_binary_and_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    for (args, needle) in [
        (vec!["--cert-file", "/tmp/c.pem"], "--cert-file"),
        (
            vec!["--initial-cluster", "default=http://a:2380,b=http://b:2380"],
            "--initial-advertise-peer-urls",
        ),
        (
            vec!["--listen-metrics-urls", "https://127.0.0.1:0"],
            "--listen-metrics-urls",
        ),
        (vec!["--listen-client-urls", "https://127.0.0.1:0"], "TLS"),
        (vec!["--metrics", "verbose"], "--metrics"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_fetcd"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen-peer-urls", "http://127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_environment_variables_configure_it_and_sigterm_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fetcd"))
        .env("ETCD_DATA_DIR", dir.path())
        .env(
            "ETCD_LISTEN_CLIENT_URLS",
            format!("http://127.0.0.1:{port}"),
        )
        .env("ETCD_LISTEN_PEER_URLS", "http://127.0.0.1:0")
        .env("ETCD_MAX_TXN_OPS", "2")
        .env("ETCD_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut c = connect_when_serving(port).await;
    let ops = |n: usize| {
        etcd_client::Txn::new().and_then(
            (0..n)
                .map(|i| etcd_client::TxnOp::put(format!("k{i}"), "v", None))
                .collect::<Vec<_>>(),
        )
    };
    c.txn(ops(2)).await.unwrap();
    let err = c.txn(ops(3)).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("too many operations in txn request"),
        "{err}"
    );
    assert!(dir.path().join("member").join("wal").is_dir());

    // SIGTERM: a clean, zero-status exit.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "fetcd ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
}
