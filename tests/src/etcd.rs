//! A real etcd server (`/usr/bin/etcd`, or `$ETCD_BIN`) running as a child process on free
//! loopback ports, in its own temporary data directory. Killed (and reaped) on drop.

use std::collections::HashSet;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use etcd_client::{Client, ConnectOptions};
use tempfile::TempDir;

/// How long a server may take to answer its first request.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// How many times [`EtcdProcess::start`] retries with fresh ports when etcd dies during startup
/// (e.g. because another process grabbed one of the "free" ports in the meantime).
const START_ATTEMPTS: usize = 3;

const INSTALL_HINT: &str = "install real etcd with `apt-get install -y etcd-server etcd-client` \
     (or point ETCD_BIN / ETCDCTL_BIN at the binaries)";

/// Path of the etcd server binary: `$ETCD_BIN`, else `/usr/bin/etcd`, else `etcd` on `$PATH`.
/// Fails (never skips) with an installation hint if it cannot be found.
pub fn etcd_bin() -> anyhow::Result<PathBuf> {
    find_binary("ETCD_BIN", "/usr/bin/etcd", "etcd")
}

/// Path of etcdctl: `$ETCDCTL_BIN`, else `/usr/bin/etcdctl`, else `etcdctl` on `$PATH`.
pub fn etcdctl_bin() -> anyhow::Result<PathBuf> {
    find_binary("ETCDCTL_BIN", "/usr/bin/etcdctl", "etcdctl")
}

fn find_binary(env: &str, default: &str, name: &str) -> anyhow::Result<PathBuf> {
    find_binary_with(std::env::var_os(env), env, default, name)
}

fn find_binary_with(
    env_value: Option<std::ffi::OsString>,
    env: &str,
    default: &str,
    name: &str,
) -> anyhow::Result<PathBuf> {
    if let Some(p) = env_value {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("{env}={} does not exist; {INSTALL_HINT}", p.display());
    }
    let default = Path::new(default);
    if default.is_file() {
        return Ok(default.to_path_buf());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "`{name}` binary not found ({} missing, not on PATH); {INSTALL_HINT}",
        default.display()
    )
}

/// Returns a loopback port that was free a moment ago. Ports handed out by this process are
/// remembered, so concurrently starting servers in the same test binary never get the same one.
pub fn free_port() -> anyhow::Result<u16> {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .context("binding 127.0.0.1:0 to find a free port")?
            .local_addr()?
            .port();
        let mut set = handed_out
            .lock()
            .map_err(|_| anyhow!("free-port registry poisoned"))?;
        if set.insert(port) {
            return Ok(port);
        }
    }
    bail!("could not find a free loopback port")
}

/// A running single-member etcd cluster.
pub struct EtcdProcess {
    child: Child,
    name: String,
    client_url: String,
    peer_url: String,
    log_path: PathBuf,
    // Dropped after `child` is killed (see Drop): removes data dir and log.
    dir: TempDir,
}

impl EtcdProcess {
    /// Starts etcd on fresh loopback ports and waits (bounded by [`STARTUP_TIMEOUT`]) until it
    /// serves a linearizable read.
    pub async fn start() -> anyhow::Result<EtcdProcess> {
        Self::start_with_flags(&[]).await
    }

    /// Like [`EtcdProcess::start`], with extra command-line flags (e.g.
    /// `["--quota-backend-bytes", "1"]`).
    pub async fn start_with_flags(flags: &[&str]) -> anyhow::Result<EtcdProcess> {
        let bin = etcd_bin()?;
        let mut last_err = None;
        for attempt in 1..=START_ATTEMPTS {
            match Self::start_once(&bin, flags).await {
                Ok(p) => return Ok(p),
                Err(e) => {
                    tracing::warn!("etcd start attempt {attempt} failed: {e:#}");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("etcd did not start")))
    }

    async fn start_once(bin: &Path, flags: &[&str]) -> anyhow::Result<EtcdProcess> {
        let dir = tempfile::Builder::new()
            .prefix("fetcd-tests-etcd-")
            .tempdir()
            .context("creating etcd temp dir")?;
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let name = format!("etcd-{client_port}");
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let data_dir = dir.path().join("data");
        let log_path = dir.path().join("etcd.log");
        let log = File::create(&log_path).context("creating etcd log file")?;

        let mut cmd = Command::new(bin);
        // etcd reads its whole configuration from ETCD_* variables as well; don't let the
        // environment of whoever runs the tests change the server under test.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("--name")
            .arg(&name)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("{name}={peer_url}"))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(format!("fetcd-tests-{client_port}"))
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .args(flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}; {INSTALL_HINT}", bin.display()))?;
        let mut proc = EtcdProcess {
            child,
            name,
            client_url,
            peer_url,
            log_path,
            dir,
        };
        proc.wait_ready().await?;
        Ok(proc)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "etcd ({}) exited during startup with {status}; log tail:\n{}",
                    self.client_url,
                    self.log_tail(40)
                );
            }
            let last_err = match probe(&self.client_url).await {
                Ok(()) => return Ok(()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "etcd ({}) did not answer within {STARTUP_TIMEOUT:?}: {last_err}; log tail:\n{}",
                    self.client_url,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn client_url(&self) -> String {
        self.client_url.clone()
    }

    pub fn peer_url(&self) -> String {
        self.peer_url.clone()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The last `lines` lines of the server log (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A client connected to this server.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        connect(&self.client_url).await
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects an etcd-client to `url` with short connect/request timeouts.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(30));
    Client::connect([url], Some(opts))
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// One linearizable read (does not change the revision).
async fn probe(url: &str) -> anyhow::Result<()> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_secs(2));
    let mut client = Client::connect([url], Some(opts)).await?;
    client.get("fetcd-tests/readiness-probe", None).await?;
    Ok(())
}

/// Waits (bounded by [`STARTUP_TIMEOUT`]) until the server at `url` serves a linearizable read.
pub async fn wait_until_serving(url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        match probe(url).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{url} did not answer within {STARTUP_TIMEOUT:?}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_fails_with_install_hint() {
        let err = find_binary_with(
            Some("/nonexistent/etcd".into()),
            "ETCD_BIN",
            "/usr/bin/etcd",
            "etcd",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("apt-get install -y etcd-server etcd-client"),
            "{err}"
        );
        let err = find_binary_with(None, "X_BIN", "/nonexistent/x", "no-such-binary-fetcd")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("apt-get install"), "{err}");
    }

    #[test]
    fn free_ports_are_distinct() {
        let mut seen = HashSet::new();
        for _ in 0..50 {
            let p = free_port().ok();
            assert!(p.is_some());
            assert!(seen.insert(p));
        }
    }
}
