//! Crash test: a real `fetcd` process under concurrent write load is killed with SIGKILL, then
//! restarted from the same data dir. Every write that was acknowledged must be there, with the
//! revision it was acknowledged at, and the store's revision must have moved on consistently.
//! Three rounds also damage the sled store before restarting (its database file cut short, part
//! of it zeroed, the whole store gone), so the member must rebuild it from the fsynced snapshot
//! plus the Raft log — sled is a cache of the log, not the durability boundary.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::Client;
use etcd_client::Compare;
use etcd_client::CompareOp;
use etcd_client::GetOptions;
use etcd_client::LeaseGrantOptions;
use etcd_client::LeaseTimeToLiveOptions;
use etcd_client::PutOptions;
use etcd_client::TxnOp;

use common::connect_when_serving;
use common::free_port;

fn spawn_fetcd(dir: &Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_fetcd"))
        .arg("--data-dir")
        .arg(dir)
        .arg("--listen-client-urls")
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("--listen-peer-urls")
        .arg("http://127.0.0.1:0")
        // Small, so snapshots and log purges happen during the test.
        .arg("--snapshot-count")
        .arg("300")
        .arg("--experimental-snapshot-catchup-entries")
        .arg("50")
        .arg("--log-level")
        .arg("warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Acknowledged writes: key → (value, revision it was acknowledged at).
type Acked = Arc<Mutex<BTreeMap<String, (String, i64)>>>;

/// Writers doing puts and CAS txns on unique keys until told to stop (or their server dies).
async fn write_load(
    port: u16,
    round: usize,
    acked: Acked,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut tasks = Vec::new();
    for w in 0..8 {
        let acked = acked.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(mut c) = Client::connect([format!("http://127.0.0.1:{port}")], None).await
            else {
                return;
            };
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("crash/{round}/{w}/{i:06}");
                let value = format!("v{i}");
                let rev = if i.is_multiple_of(2) {
                    match c.put(key.clone(), value.clone(), None).await {
                        Ok(r) => r.header().unwrap().revision(),
                        Err(_) => break,
                    }
                } else {
                    // Create-if-absent, the apiserver's create shape.
                    let txn = etcd_client::Txn::new()
                        .when([Compare::mod_revision(key.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(key.clone(), value.clone(), None)]);
                    match c.txn(txn).await {
                        Ok(r) => {
                            assert!(r.succeeded(), "fresh key {key} already existed");
                            r.header().unwrap().revision()
                        }
                        Err(_) => break,
                    }
                };
                acked.lock().unwrap().insert(key, (value, rev));
                i += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn verify(c: &mut Client, acked: &Acked) {
    let acked = acked.lock().unwrap().clone();
    let resp = c
        .get("crash/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let current = resp.header().unwrap().revision();
    let stored: BTreeMap<String, (String, i64)> = resp
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                (kv.value_str().unwrap().to_string(), kv.mod_revision()),
            )
        })
        .collect();
    let max_acked = acked.values().map(|(_, r)| *r).max().unwrap_or(0);
    assert!(
        current >= max_acked,
        "revision went back: {current} < {max_acked}"
    );
    for (k, (v, rev)) in &acked {
        let Some((sv, srev)) = stored.get(k) else {
            panic!("acknowledged write {k}@{rev} lost");
        };
        assert_eq!((sv, srev), (v, rev), "acknowledged write {k} changed");
    }
    // Every stored key has its own revision (one write per revision), none beyond current.
    let mut revs: Vec<i64> = stored.values().map(|(_, r)| *r).collect();
    revs.sort();
    revs.dedup();
    assert_eq!(revs.len(), stored.len(), "two writes share a revision");
    assert!(revs.last().copied().unwrap_or(0) <= current);
}

/// Applies `damage` to every sled database file (`db`) of the member in `dir`, given the file
/// opened for writing and its length.
fn damage_sled_db(dir: &Path, damage: impl Fn(&std::fs::File, u64) -> std::io::Result<()>) {
    let mut damaged = 0;
    let mut pending = vec![dir.join("member").join("kv")];
    while let Some(d) = pending.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.file_name().is_some_and(|n| n == "db") {
                let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                let len = f.metadata().unwrap().len();
                assert!(len > 0, "{path:?} is empty");
                damage(&f, len).unwrap();
                damaged += 1;
            }
        }
    }
    assert_eq!(damaged, 1, "sled database files found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let acked: Acked = Arc::default();
    let rounds = 4;
    for round in 0..rounds {
        let port = free_port();
        let mut child = spawn_fetcd(dir.path(), port);
        let mut c = connect_when_serving(port).await;
        verify(&mut c, &acked).await;

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = tokio::spawn(write_load(port, round, acked.clone(), stop.clone()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // SIGKILL mid-load: no shutdown path runs.
        child.kill().unwrap();
        child.wait().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        load.await.unwrap();
        let n = acked.lock().unwrap().len();
        assert!(n > 0, "round {round}: no write was acknowledged");
        match round {
            // sled does not fsync: after a power cut its database file may lack its tail, or
            // hold zeros where blocks were never written. Either way the member must rebuild
            // what is missing from the snapshot and the Raft log.
            0 => damage_sled_db(dir.path(), |f, len| f.set_len(len / 2)),
            1 => damage_sled_db(dir.path(), |f, len| {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&vec![0u8; (len / 2) as usize], len / 4)
            }),
            // Lose the whole sled store: only the snapshot and the Raft log remain.
            2 => std::fs::remove_dir_all(dir.path().join("member").join("kv")).unwrap(),
            _ => {}
        }
    }
    let port = free_port();
    let mut child = spawn_fetcd(dir.path(), port);
    let mut c = connect_when_serving(port).await;
    verify(&mut c, &acked).await;
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_leases_survive_sigkill_and_a_lost_store() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = spawn_fetcd(dir.path(), port);
    let mut c = connect_when_serving(port).await;
    c.lease_grant(600, Some(LeaseGrantOptions::new().with_id(0x77)))
        .await
        .unwrap();
    for k in ["crash-lease/a", "crash-lease/b"] {
        c.put(k, "v", Some(PutOptions::new().with_lease(0x77)))
            .await
            .unwrap();
    }
    // SIGKILL right after the acknowledgements, then lose sled too: only the Raft log is left.
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(dir.path().join("member").join("kv")).unwrap();

    let port = free_port();
    let mut child = spawn_fetcd(dir.path(), port);
    let mut c = connect_when_serving(port).await;
    let ttl = c
        .lease_time_to_live(0x77, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(ttl.granted_ttl(), 600);
    assert!(ttl.ttl() > 500, "remaining {}", ttl.ttl());
    let mut keys = ttl.keys().to_vec();
    keys.sort();
    assert_eq!(keys, [b"crash-lease/a".to_vec(), b"crash-lease/b".to_vec()]);
    c.lease_revoke(0x77).await.unwrap();
    let left = c
        .get("crash-lease/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert!(left.kvs().is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
}
