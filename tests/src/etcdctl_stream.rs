//! Long-running etcdctl commands (`etcdctl watch ...`): started as a child process whose
//! output is collected in the background, inspected while it runs, and killed at the end.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;

use crate::etcdctl::{normalize, EtcdctlOutput};
use crate::observe::{strip_keys, SERVER_IDENTITY_FIELDS};

type Buffer = Arc<Mutex<Vec<u8>>>;

/// A running `ETCDCTL_API=3 etcdctl --endpoints=<endpoint> <args>`. Killed on drop.
pub struct EtcdctlChild {
    child: tokio::process::Child,
    args: Vec<String>,
    stdout: Buffer,
    stderr: Buffer,
    readers: Vec<JoinHandle<()>>,
}

fn collect<R>(mut pipe: R, buf: Buffer) -> JoinHandle<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => match buf.lock() {
                    Ok(mut b) => b.extend_from_slice(&chunk[..n]),
                    Err(_) => break,
                },
            }
        }
    })
}

fn text(buf: &Buffer) -> String {
    buf.lock()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

impl EtcdctlChild {
    /// Starts etcdctl (stdin closed, stdout/stderr collected).
    pub fn spawn(endpoint: &str, args: &[&str]) -> anyhow::Result<Self> {
        let mut cmd = crate::etcdctl::etcdctl_command(endpoint, args)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| {
            format!("spawning {}", cmd.as_std().get_program().to_string_lossy())
        })?;
        let stdout: Buffer = Arc::default();
        let stderr: Buffer = Arc::default();
        let out = child.stdout.take().context("etcdctl stdout")?;
        let err = child.stderr.take().context("etcdctl stderr")?;
        let readers = vec![
            collect(out, Arc::clone(&stdout)),
            collect(err, Arc::clone(&stderr)),
        ];
        Ok(EtcdctlChild {
            child,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            stdout,
            stderr,
            readers,
        })
    }

    /// Everything printed on stdout so far.
    pub fn stdout(&self) -> String {
        text(&self.stdout)
    }

    /// Everything printed on stderr so far.
    pub fn stderr(&self) -> String {
        text(&self.stderr)
    }

    /// Waits (bounded) until stdout contains `needle`; fails with the output so far otherwise
    /// (or as soon as etcdctl exits without printing it).
    pub async fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) {
                return Ok(());
            }
            let exited = self.child.try_wait()?;
            if exited.is_some() || Instant::now() >= deadline {
                // Let the readers drain whatever was written before the exit.
                tokio::time::sleep(Duration::from_millis(50)).await;
                if self.stdout().contains(needle) {
                    return Ok(());
                }
                bail!(
                    "etcdctl {:?}: {needle:?} not printed within {timeout:?} (exit: {exited:?}); \
                     stdout {:?}, stderr {:?}",
                    self.args,
                    self.stdout(),
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills etcdctl if it is still running, then returns what it printed. `status` is the exit
    /// code if it had exited on its own, `None` if it was killed.
    pub async fn finish(mut self) -> anyhow::Result<EtcdctlOutput> {
        let status = match self.child.try_wait()? {
            Some(s) => s.code(),
            None => {
                self.child.start_kill()?;
                tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                    .await
                    .map_err(|_| anyhow!("etcdctl did not die after kill"))??;
                None
            }
        };
        for r in self.readers.drain(..) {
            tokio::time::timeout(Duration::from_secs(10), r)
                .await
                .map_err(|_| anyhow!("etcdctl output pipes not closed"))??;
        }
        Ok(EtcdctlOutput {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        })
    }

    /// Waits (bounded) for etcdctl to exit on its own, then returns its output.
    pub async fn wait_exit(mut self, timeout: Duration) -> anyhow::Result<EtcdctlOutput> {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                bail!(
                    "etcdctl {:?} still running after {timeout:?}; stdout {:?}, stderr {:?}",
                    self.args,
                    self.stdout(),
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.finish().await
    }
}

/// [`normalize`] for streamed output: each stdout line that is a JSON object (`watch -w json`
/// prints one response per line) first loses `cluster_id`/`member_id`/`raft_term`.
pub fn normalize_stream(out: &EtcdctlOutput, endpoint: &str) -> Value {
    let stdout: String = out
        .stdout
        .split_inclusive('\n')
        .map(
            |line| match serde_json::from_str::<Value>(line.trim_end()) {
                Ok(mut v) if v.is_object() => {
                    strip_keys(&mut v, SERVER_IDENTITY_FIELDS);
                    let nl = if line.ends_with('\n') { "\n" } else { "" };
                    format!("{v}{nl}")
                }
                _ => line.to_owned(),
            },
        )
        .collect();
    let cleaned = EtcdctlOutput {
        status: out.status,
        stdout,
        stderr: out.stderr.clone(),
    };
    normalize(&cleaned, endpoint)
}

impl crate::Session {
    /// Starts a long-running etcdctl command against this session's server (nothing recorded).
    pub fn etcdctl_spawn(&self, args: &[&str]) -> anyhow::Result<EtcdctlChild> {
        EtcdctlChild::spawn(self.url(), args)
    }

    /// Records the normalized output of a finished [`EtcdctlChild`].
    pub fn record_etcdctl(&mut self, step: &str, out: &EtcdctlOutput) {
        let v = normalize_stream(out, self.url());
        self.record(step, v);
    }
}
