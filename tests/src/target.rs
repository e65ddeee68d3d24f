//! Servers a scenario can run against: real etcd (reference) and the candidate (fetcd, or a
//! second etcd when the `fetcd` feature is off / `FETCD_TESTS_CANDIDATE=etcd`).

use anyhow::bail;
use etcd_client::Client;

use crate::etcd::EtcdProcess;

/// Environment variable choosing the differential candidate: `etcd` or `fetcd`.
/// Default: `fetcd` when built with `--features fetcd`, otherwise `etcd`.
pub const CANDIDATE_ENV: &str = "FETCD_TESTS_CANDIDATE";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// Real etcd child process.
    Etcd,
    /// In-process fetcd (requires the `fetcd` cargo feature).
    Fetcd,
    /// Three in-process fetcd members in one cluster (requires the `fetcd` cargo feature);
    /// sessions send each request to the next member.
    FetcdCluster,
}

impl TargetKind {
    /// The candidate selected by `$FETCD_TESTS_CANDIDATE` (see [`CANDIDATE_ENV`]).
    pub fn candidate() -> anyhow::Result<TargetKind> {
        match std::env::var(CANDIDATE_ENV) {
            Ok(v) if v == "etcd" => Ok(TargetKind::Etcd),
            Ok(v) if v == "fetcd" => Ok(TargetKind::Fetcd),
            Ok(v) => bail!("{CANDIDATE_ENV}={v:?}: expected `etcd` or `fetcd`"),
            Err(_) if cfg!(feature = "fetcd") => Ok(TargetKind::Fetcd),
            Err(_) => Ok(TargetKind::Etcd),
        }
    }

    /// Starts a fresh server of this kind (fresh data dir, revision 1).
    pub async fn start(self, label: impl Into<String>) -> anyhow::Result<Target> {
        self.start_with_flags(label, &[]).await
    }

    /// Like [`TargetKind::start`], with extra etcd-style flags given to either kind.
    pub async fn start_with_flags(
        self,
        label: impl Into<String>,
        flags: &[&str],
    ) -> anyhow::Result<Target> {
        let label = label.into();
        let inner = match self {
            TargetKind::Etcd => Inner::Etcd(EtcdProcess::start_with_flags(flags).await?),
            #[cfg(feature = "fetcd")]
            TargetKind::Fetcd => Inner::Fetcd(crate::fetcd::start_fetcd_with_flags(flags).await?),
            #[cfg(feature = "fetcd")]
            TargetKind::FetcdCluster => {
                if !flags.is_empty() {
                    bail!("flags are not passed to an in-process cluster: {flags:?}");
                }
                Inner::Cluster(crate::cluster::Cluster::start(3).await?)
            }
            #[cfg(not(feature = "fetcd"))]
            TargetKind::Fetcd | TargetKind::FetcdCluster => bail!(
                "the fetcd target needs the `fetcd` cargo feature: \
                 cargo test -p fetcd-tests --features fetcd"
            ),
        };
        Ok(Target {
            label,
            kind: self,
            inner,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Etcd => "etcd",
            TargetKind::Fetcd => "fetcd",
            TargetKind::FetcdCluster => "fetcd x3",
        }
    }
}

enum Inner {
    Etcd(EtcdProcess),
    #[cfg(feature = "fetcd")]
    Fetcd(crate::fetcd::FetcdInstance),
    #[cfg(feature = "fetcd")]
    Cluster(crate::cluster::Cluster),
}

/// A running server plus the label used for it in diffs.
pub struct Target {
    label: String,
    kind: TargetKind,
    inner: Inner,
}

impl Target {
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn kind(&self) -> TargetKind {
        self.kind
    }

    /// The client URL of the (first) member.
    pub fn client_url(&self) -> String {
        match &self.inner {
            Inner::Etcd(p) => p.client_url(),
            #[cfg(feature = "fetcd")]
            Inner::Fetcd(f) => f.client_url(),
            #[cfg(feature = "fetcd")]
            Inner::Cluster(c) => c.client_url(0),
        }
    }

    /// The client URL of every member.
    pub fn client_urls(&self) -> Vec<String> {
        match &self.inner {
            #[cfg(feature = "fetcd")]
            Inner::Cluster(c) => (0..c.len()).map(|i| c.client_url(i)).collect(),
            _ => vec![self.client_url()],
        }
    }

    pub async fn connect(&self) -> anyhow::Result<Client> {
        crate::etcd::connect(&self.client_url()).await
    }

    /// For etcd: the last lines of its log (empty for fetcd).
    pub fn log_tail(&self, lines: usize) -> String {
        match &self.inner {
            Inner::Etcd(p) => p.log_tail(lines),
            #[cfg(feature = "fetcd")]
            Inner::Fetcd(_) | Inner::Cluster(_) => {
                let _ = lines;
                String::new()
            }
        }
    }

    /// Stops the server (etcd: kill + wait; fetcd: graceful shutdown).
    pub async fn stop(self) -> anyhow::Result<()> {
        match self.inner {
            Inner::Etcd(p) => {
                drop(p);
                Ok(())
            }
            #[cfg(feature = "fetcd")]
            Inner::Fetcd(f) => f.stop().await,
            #[cfg(feature = "fetcd")]
            Inner::Cluster(mut c) => c.stop_all().await,
        }
    }
}

/// Starts the reference (always real etcd) and the candidate ([`TargetKind::candidate`])
/// concurrently. Labels: `etcd` and `fetcd`, or `etcd` and `etcd2`.
pub async fn start_pair() -> anyhow::Result<(Target, Target)> {
    start_pair_with_flags(&[]).await
}

/// Like [`start_pair`], both servers started with the same extra flags.
pub async fn start_pair_with_flags(flags: &[&str]) -> anyhow::Result<(Target, Target)> {
    start_pair_against(TargetKind::candidate()?, flags).await
}

/// Starts real etcd and the given candidate concurrently, both with `flags`.
pub async fn start_pair_against(
    candidate: TargetKind,
    flags: &[&str],
) -> anyhow::Result<(Target, Target)> {
    let candidate_label = match candidate {
        TargetKind::Etcd => "etcd2",
        other => other.name(),
    };
    let (reference, candidate) = tokio::join!(
        TargetKind::Etcd.start_with_flags("etcd", flags),
        candidate.start_with_flags(candidate_label, flags)
    );
    Ok((reference?, candidate?))
}
