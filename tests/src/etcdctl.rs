//! Running the real `etcdctl` (v3 API) against an endpoint and normalizing its output.

use std::process::Stdio;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::etcd::etcdctl_bin;
use crate::observe::{strip_keys, SERVER_IDENTITY_FIELDS};

/// What one etcdctl invocation produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdctlOutput {
    /// Exit code (`None` if killed by a signal).
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl EtcdctlOutput {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// stdout parsed as JSON (for `-w json`).
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("etcdctl stdout is not JSON: {:?}", self.stdout))
    }
}

/// `ETCDCTL_API=3 etcdctl --endpoints=<endpoint> <args>`, with no other `ETCDCTL_*` variable
/// of the caller's environment leaking in.
pub fn etcdctl_command(endpoint: &str, args: &[&str]) -> anyhow::Result<tokio::process::Command> {
    let mut cmd = tokio::process::Command::new(etcdctl_bin()?);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCDCTL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args);
    Ok(cmd)
}

/// Runs `ETCDCTL_API=3 etcdctl --endpoints=<endpoint> <args>`, feeding `stdin` if given.
pub async fn run_etcdctl(
    endpoint: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<EtcdctlOutput> {
    let mut cmd = etcdctl_command(endpoint, args)?;
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", cmd.as_std().get_program().to_string_lossy()))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().context("etcdctl stdin")?;
        pipe.write_all(input.as_bytes()).await?;
        pipe.shutdown().await?;
        drop(pipe);
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .with_context(|| format!("etcdctl {args:?} timed out"))??;
    Ok(EtcdctlOutput {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Replaces the endpoint (`http://127.0.0.1:1234` and `127.0.0.1:1234`) with `<endpoint>`.
fn scrub_endpoint(s: &str, endpoint: &str) -> String {
    let host_port = endpoint
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    s.replace(endpoint, "<endpoint>")
        .replace(host_port, "<endpoint>")
}

/// `-w fields` prints `"ClusterID" : 123` etc. as lines; drop those.
fn drop_identity_field_lines(s: &str) -> String {
    const FIELDS: &[&str] = &["\"ClusterID\" : ", "\"MemberID\" : ", "\"RaftTerm\" : "];
    s.split_inclusive('\n')
        .filter(|line| !FIELDS.iter().any(|f| line.starts_with(f)))
        .collect()
}

/// Keys of etcdctl's own zap log lines (on stderr) that vary from run to run.
const VOLATILE_LOG_FIELDS: &[&str] = &["ts", "target", "caller"];

/// Normalizes an etcdctl result for comparison between servers:
/// * stdout that is JSON (`-w json`) is parsed, and `cluster_id`/`member_id`/`raft_term` are
///   removed everywhere;
/// * `-w fields` lines `"ClusterID"`, `"MemberID"`, `"RaftTerm"` are dropped;
/// * stderr JSON log lines lose their timestamp/target/caller;
/// * the endpoint URL is replaced by `<endpoint>`.
pub fn normalize(out: &EtcdctlOutput, endpoint: &str) -> Value {
    let stdout = match serde_json::from_str::<Value>(out.stdout.trim()) {
        Ok(mut v) if !out.stdout.trim().is_empty() && (v.is_object() || v.is_array()) => {
            strip_keys(&mut v, SERVER_IDENTITY_FIELDS);
            json!({ "json": v })
        }
        _ => json!({ "text": scrub_endpoint(&drop_identity_field_lines(&out.stdout), endpoint) }),
    };
    let stderr: Vec<Value> = out
        .stderr
        .lines()
        .map(|line| match serde_json::from_str::<Value>(line) {
            Ok(mut v) if v.get("level").is_some() => {
                strip_keys(&mut v, VOLATILE_LOG_FIELDS);
                Value::String(scrub_endpoint(&v.to_string(), endpoint))
            }
            _ => Value::String(scrub_endpoint(line, endpoint)),
        })
        .collect();
    json!({ "status": out.status, "stdout": stdout, "stderr": stderr })
}
