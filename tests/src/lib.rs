//! Test harness for fetcd: real etcd child processes, a recording client [`Session`],
//! normalized [`Observation`]s, a differential runner that executes one scenario against two
//! servers (reference etcd vs candidate) and diffs the transcripts, and etcdctl helpers.
//!
//! Running:
//! * `cargo test -p fetcd-tests` — etcd vs in-process fetcd (feature `fetcd`, on by default);
//! * `cargo test -p fetcd-tests --no-default-features` — etcd vs a second etcd (validates the
//!   harness and the scenarios themselves);
//! * `FETCD_TESTS_CANDIDATE=etcd|fetcd` overrides the candidate;
//! * `FETCD_TESTS_VERBOSE=1 ... -- --nocapture` prints both full transcripts;
//! * `ETCD_BIN` / `ETCDCTL_BIN` override `/usr/bin/etcd` / `/usr/bin/etcdctl`.
//!
//! Writing a scenario:
//! ```text
//! async fn my_scenario(s: &mut Session) -> anyhow::Result<()> {
//!     let r = s.put("put a", "a", "1", None).await?;        // recorded + returned
//!     anyhow::ensure!(r.header().unwrap().revision() == 2); // absolute fact
//!     let r = s.get("get future", "a", Some(GetOptions::new().with_revision(99))).await;
//!     expect_grpc_error(&r, "OutOfRange", "etcdserver: mvcc: required revision is a future revision")?;
//!     Ok(())
//! }
//! #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
//! async fn my_test() -> anyhow::Result<()> { run_differential("mine", my_scenario).await }
//! ```

#[cfg(feature = "fetcd")]
pub mod cluster;
pub mod diff;
pub mod etcd;
pub mod etcdctl;
pub mod etcdctl_stream;
#[cfg(feature = "fetcd")]
pub mod fetcd;
pub mod observe;
pub mod session;
pub mod target;
pub mod watch;

pub use diff::{assert_same_observations, compare_observations, diff_values, FieldDiff};
pub use etcd::{connect, etcd_bin, etcdctl_bin, free_port, EtcdProcess};
pub use etcdctl::{run_etcdctl, EtcdctlOutput};
#[cfg(feature = "fetcd")]
pub use fetcd::{start_fetcd, FetcdInstance};
pub use observe::{expect_grpc_error, grpc_error, Observation};
pub use session::{
    run_differential, run_differential_against, run_differential_with_flags, run_on_targets,
    Session,
};
pub use target::{start_pair, start_pair_with_flags, Target, TargetKind};

/// Installs a `tracing` subscriber honoring `RUST_LOG` (idempotent; output captured by libtest).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
