//! Starting, restarting and measuring the servers `--compare` runs: etcd and fetcd get the same
//! flags (etcd's), loopback ports picked free, and data dirs in one temp dir per cluster.

use std::fmt;
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use etcd_client::Client;
use etcd_client::ConnectOptions;

/// How long a cluster may take to answer its first linearizable read.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a member may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Server {
    Etcd,
    Fetcd,
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Server::Etcd => "etcd",
            Server::Fetcd => "fetcd",
        })
    }
}

struct Member {
    name: String,
    client_url: String,
    peer_url: String,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd or fetcd cluster of one or three members.
pub(crate) struct Cluster {
    pub server: Server,
    bin: PathBuf,
    /// Holds the members' data dirs and logs; removed when the cluster is dropped.
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

/// `n` distinct free loopback ports (all held open until every one is picked).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("pick a free port")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

impl Cluster {
    /// Starts `nodes` members and waits until a linearizable read succeeds. On failure the
    /// error carries the tail of the log of a member that exited.
    pub(crate) async fn start(server: Server, bin: &Path, nodes: usize) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("fetcd-bench-{server}-"))
            .tempdir()
            .context("create a temp dir")?;
        let ports = free_ports(2 * nodes)?;
        let members = (0..nodes)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", ports[2 * i]),
                peer_url: format!("http://127.0.0.1:{}", ports[2 * i + 1]),
                data_dir: dir.path().join(format!("m{i}.data")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let mut c = Cluster {
            server,
            bin: bin.to_owned(),
            dir,
            members,
        };
        c.spawn_all().await?;
        Ok(c)
    }

    pub(crate) fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    async fn spawn_all(&mut self) -> anyhow::Result<Duration> {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let t = Instant::now();
        for m in &mut self.members {
            let log = File::options()
                .create(true)
                .append(true)
                .open(&m.log)
                .with_context(|| format!("open {}", m.log.display()))?;
            let child = Command::new(&self.bin)
                .args(["--name", &m.name])
                .arg("--data-dir")
                .arg(&m.data_dir)
                .args(["--listen-client-urls", &m.client_url])
                .args(["--advertise-client-urls", &m.client_url])
                .args(["--listen-peer-urls", &m.peer_url])
                .args(["--initial-advertise-peer-urls", &m.peer_url])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-token", "fetcd-bench"])
                .args(["--initial-cluster-state", "new"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("start {}", self.bin.display()))?;
            m.child = Some(child);
        }
        self.wait_ready().await?;
        Ok(t.elapsed())
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let ep = self.members[0].client_url.clone();
        loop {
            for m in &mut self.members {
                if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    m.child = None;
                    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
                    anyhow::bail!(
                        "{} member {} exited ({status}) before serving: {} (log: {})",
                        self.server,
                        m.name,
                        exit_reason(&log),
                        m.log.display()
                    );
                }
            }
            if linearizable_get(&ep).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{} did not serve a linearizable read within {READY_TIMEOUT:?} (logs in {})",
                    self.server,
                    self.dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM every member (SIGKILL after `STOP_TIMEOUT`) and wait for it to exit.
    pub(crate) fn stop(&mut self) {
        for m in &mut self.members {
            if let Some(c) = &m.child {
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
            }
        }
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let deadline = Instant::now() + STOP_TIMEOUT;
                while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Stops every member, starts them again on the same data and returns the time from the
    /// start until a linearizable read succeeds.
    pub(crate) async fn restart(&mut self) -> anyhow::Result<Duration> {
        self.stop();
        self.spawn_all().await
    }

    /// Peak resident memory (VmHWM) summed over the members, in bytes.
    pub(crate) fn peak_rss(&self) -> Option<u64> {
        self.sum_proc("status", |s| Some(status_kib(s, "VmHWM")? * 1024))
    }

    /// CPU seconds (user + system) the members have used since they started; None once one
    /// has stopped.
    pub(crate) fn cpu_seconds(&self) -> Option<f64> {
        Some(self.sum_proc("stat", stat_cpu_ticks)? as f64 / USER_HZ)
    }

    /// `read` of every member's `/proc/<pid>/<file>`, summed; None if a member is not running
    /// or a file could not be read.
    fn sum_proc(&self, file: &str, read: impl Fn(&str) -> Option<u64>) -> Option<u64> {
        let mut sum = 0;
        for m in &self.members {
            let pid = m.child.as_ref()?.id();
            let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
            sum += read(&text)?;
        }
        Some(sum)
    }

    /// Bytes allocated on disk by the members' data dirs (what `du` counts, so preallocated
    /// but sparse WAL files count only for what they hold).
    pub(crate) fn disk_bytes(&self) -> u64 {
        self.members.iter().map(|m| dir_bytes(&m.data_dir)).sum()
    }

    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn linearizable_get(ep: &str) -> bool {
    let opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(1));
    let attempt = async {
        let mut c = Client::connect([ep], Some(opts)).await.ok()?;
        c.get("fetcd-bench/ready", None).await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), attempt).await,
        Ok(Some(_))
    )
}

/// The unit of /proc's CPU times: Linux reports them in USER_HZ, 100 on every architecture's ABI.
const USER_HZ: f64 = 100.0;

/// utime + stime from a /proc/<pid>/stat line. The command name (field 2, in parentheses) may
/// hold spaces, so fields are counted after its closing parenthesis: state is field 3, utime 14
/// and stime 15.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A `/proc/<pid>/status` field in KiB, e.g. `VmHWM:   123456 kB`.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if !md.is_dir() {
        return md.blocks() * 512;
    }
    std::fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| dir_bytes(&e.path())).sum())
        .unwrap_or(0)
}

/// Why a server exited, from its log: the `Error:` report of a Rust `main` returning an error
/// (message and causes on one line, backtrace dropped), else the last log line.
fn exit_reason(log: &str) -> String {
    let mut lines = log.lines().skip_while(|l| !l.starts_with("Error:"));
    if let Some(first) = lines.next() {
        let mut parts = vec![first.trim_start_matches("Error:").trim().to_owned()];
        for l in lines {
            let l = l.trim();
            if l.starts_with("Stack backtrace") {
                break;
            }
            if !l.is_empty() && l != "Caused by:" {
                // Several causes are numbered `0: …`, `1: …`.
                let unnumbered = l
                    .split_once(": ")
                    .filter(|(n, _)| n.chars().all(|c| c.is_ascii_digit()))
                    .map_or(l, |(_, rest)| rest);
                parts.push(unnumbered.to_owned());
            }
        }
        return parts.join(": ");
    }
    log.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(empty log)")
        .trim()
        .to_owned()
}

/// The etcd binary, installed from Debian (`etcd-server`) when the default path is missing.
pub(crate) fn ensure_etcd(bin: &Path) -> anyhow::Result<()> {
    if bin.exists() {
        return Ok(());
    }
    anyhow::ensure!(
        bin == Path::new("/usr/bin/etcd"),
        "etcd binary {} not found",
        bin.display()
    );
    eprintln!("etcd not found at /usr/bin/etcd: installing Debian's etcd-server with apt-get");
    let sudo = !matches!(
        Command::new("id").arg("-u").output().map(|o| o.stdout),
        Ok(ref out) if out.starts_with(b"0")
    );
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        } else {
            Command::new("apt-get")
        };
        let st = cmd
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("run apt-get")?;
        anyhow::ensure!(st.success(), "apt-get {} failed ({st})", args.join(" "));
        Ok(())
    };
    apt(&["update", "-qq"])?;
    apt(&["install", "-y", "-qq", "etcd-server"])?;
    anyhow::ensure!(
        bin.exists(),
        "etcd-server installed but {} is missing",
        bin.display()
    );
    Ok(())
}

/// The fetcd binary: `--fetcd-bin`, else `fetcd` next to this executable (both are built into
/// `target/release`).
pub(crate) fn fetcd_bin(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    let bin = match flag {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()
            .context("locate fetcd-bench")?
            .with_file_name("fetcd"),
    };
    anyhow::ensure!(
        bin.exists(),
        "fetcd binary not found at {}: build it with `cargo build --release -p fetcd-server` \
         (or pass --fetcd-bin)",
        bin.display()
    );
    Ok(bin)
}

/// The first line of `<bin> --version`, for the report header.
pub(crate) fn version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown version".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_after_a_command_name_with_spaces() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime …
        let stat = "4242 (fetcd ) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 567 0 0 20 0 9 0";
        assert_eq!(stat_cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(stat_cpu_ticks("4242 (fetcd) S 1"), None);
    }

    #[test]
    fn reads_proc_status_fields() {
        let s = "Name:\tetcd\nVmPeak:\t  900 kB\nVmHWM:\t  123456 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(status_kib(s, "VmHWM"), Some(123_456));
        assert_eq!(status_kib(s, "VmRSS"), Some(1000));
        assert_eq!(status_kib(s, "VmSwap"), None);
    }

    #[test]
    fn exit_reason_reads_anyhow_reports() {
        let log = "INFO starting\nError: start fetcd\n\nCaused by:\n    --initial-cluster with more than one member: not yet\n\nStack backtrace:\n   0: x\n";
        assert_eq!(
            exit_reason(log),
            "start fetcd: --initial-cluster with more than one member: not yet"
        );
        let two = "Error: a\n\nCaused by:\n    0: b\n    1: c\n";
        assert_eq!(exit_reason(two), "a: b: c");
        assert_eq!(exit_reason("a\nlast words\n\n"), "last words");
        assert_eq!(exit_reason(""), "(empty log)");
    }

    #[test]
    fn free_ports_are_distinct() {
        let p = free_ports(6).expect("ports");
        let mut q = p.clone();
        q.sort_unstable();
        q.dedup();
        assert_eq!(q.len(), 6);
    }
}
