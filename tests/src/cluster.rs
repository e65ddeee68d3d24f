//! In-process fetcd clusters (cargo feature `fetcd`): every member binds its peer and client
//! listeners on loopback port 0 first, so the `--initial-cluster` can name the real ports, then
//! all members start at once. Members can be stopped (graceful shutdown, data kept) and started
//! again on the same peer port.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use etcd_client::Client;
use fetcd_server::{Config, EtcdServer, Listeners};
use tempfile::TempDir;
use tokio::net::TcpListener;

/// One member's fixed identity: name, peer port, data dir.
struct Slot {
    name: String,
    peer_port: u16,
    client_port: u16,
    server: Option<EtcdServer>,
}

/// Adjusts every member's configuration (e.g. small snapshot counts).
pub type Tweak = std::sync::Arc<dyn Fn(&mut Config) + Send + Sync>;

/// A running in-process cluster.
pub struct Cluster {
    dir: TempDir,
    slots: Vec<Slot>,
    initial_cluster: String,
    tweak: Option<Tweak>,
}

async fn bind(port: u16) -> anyhow::Result<TcpListener> {
    // A port just released by a stopped member may take a moment to be free again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => return Ok(l),
            Err(e) if Instant::now() < deadline && port != 0 => {
                tracing::debug!(error = %e, port, "rebinding");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("bind 127.0.0.1:{port}")),
        }
    }
}

impl Cluster {
    /// Starts `n` members of a new cluster at once and waits until a leader serves a
    /// linearizable read through every member.
    pub async fn start(n: usize) -> anyhow::Result<Cluster> {
        Self::start_with(n, None).await
    }

    /// Like [`Cluster::start`], with every member's configuration adjusted by `tweak`.
    pub async fn start_with(n: usize, tweak: Option<Tweak>) -> anyhow::Result<Cluster> {
        crate::init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("fetcd-cluster-")
            .tempdir()?;
        let mut slots = Vec::new();
        let mut peers = Vec::new();
        let mut clients = Vec::new();
        for i in 0..n {
            let p = bind(0).await?;
            let c = bind(0).await?;
            slots.push(Slot {
                name: format!("m{i}"),
                peer_port: p.local_addr()?.port(),
                client_port: c.local_addr()?.port(),
                server: None,
            });
            peers.push(p);
            clients.push(c);
        }
        let initial_cluster = slots
            .iter()
            .map(|s| format!("{}=http://127.0.0.1:{}", s.name, s.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            dir,
            slots,
            initial_cluster,
            tweak,
        };
        let mut starts = Vec::new();
        for (i, (p, c)) in peers.into_iter().zip(clients).enumerate() {
            let config = cluster.config(i, "new");
            starts.push(async move {
                EtcdServer::start_with(
                    config,
                    Listeners {
                        peers: vec![p],
                        clients: vec![c],
                    },
                )
                .await
            });
        }
        let servers = futures::future::join_all(starts).await;
        for (slot, s) in cluster.slots.iter_mut().zip(servers) {
            slot.server =
                Some(s.map_err(|e| anyhow!("member {} failed to start: {e}", slot.name))?);
        }
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// The configuration of member `i` (with `--initial-cluster-state state`).
    pub fn config(&self, i: usize, state: &str) -> Config {
        let s = &self.slots[i];
        let mut c = Config::for_test(self.dir.path().join(&s.name));
        c.name = s.name.clone();
        c.initial_cluster = Some(self.initial_cluster.clone());
        c.initial_cluster_state = state.into();
        c.initial_advertise_peer_urls = vec![format!("http://127.0.0.1:{}", s.peer_port)];
        c.listen_peer_urls = c.initial_advertise_peer_urls.clone();
        c.listen_client_urls = vec![format!("http://127.0.0.1:{}", s.client_port)];
        c.advertise_client_urls = c.listen_client_urls.clone();
        if let Some(t) = &self.tweak {
            t(&mut c);
        }
        c
    }

    /// Reserves ports for one more member (not started, not yet in the cluster) and returns its
    /// index and peer URL, for `MemberAdd`.
    pub async fn reserve_member(&mut self) -> anyhow::Result<(usize, String)> {
        let i = self.slots.len();
        let p = bind(0).await?;
        let c = bind(0).await?;
        let slot = Slot {
            name: format!("m{i}"),
            peer_port: p.local_addr()?.port(),
            client_port: c.local_addr()?.port(),
            server: None,
        };
        let url = format!("http://127.0.0.1:{}", slot.peer_port);
        self.initial_cluster = format!("{},{}={url}", self.initial_cluster, slot.name);
        self.slots.push(slot);
        Ok((i, url))
    }

    /// Starts a reserved member with `--initial-cluster-state existing`: it joins the running
    /// cluster (it must have been added with `MemberAdd` first).
    pub async fn join(&mut self, i: usize) -> anyhow::Result<()> {
        let s = self.launch(i, "existing").await?;
        self.slots[i].server = Some(s);
        Ok(())
    }

    /// Starts member `i` on its own ports and data dir (not recording it as running).
    async fn launch(&self, i: usize, state: &str) -> anyhow::Result<EtcdServer> {
        let config = self.config(i, state);
        let listeners = Listeners {
            peers: vec![bind(self.slots[i].peer_port).await?],
            clients: vec![bind(self.slots[i].client_port).await?],
        };
        EtcdServer::start_with(config, listeners)
            .await
            .map_err(|e| anyhow!("member {i} start: {e}"))
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True if there are no members.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Client URL of member `i`.
    pub fn client_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.slots[i].client_port)
    }

    /// The running server of member `i`.
    pub fn server(&self, i: usize) -> Option<&EtcdServer> {
        self.slots[i].server.as_ref()
    }

    /// Member `i`'s id, if it runs.
    pub fn member_id(&self, i: usize) -> Option<u64> {
        self.server(i).map(|s| s.node().raft().id())
    }

    /// Member `i`'s peer URL, as the membership names it.
    pub fn peer_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.slots[i].peer_port)
    }

    /// Sets (or with `None` lifts) the test-only fault on the link from member `from` to member
    /// `to`: one direction, every peer request `from` makes to `to` (see `fetcd_raft::fault`).
    pub fn set_link(
        &self,
        from: usize,
        to: usize,
        fault: Option<fetcd_raft::fault::Fault>,
    ) -> anyhow::Result<()> {
        let id = self
            .member_id(from)
            .with_context(|| format!("member {from} is not running"))?;
        match fault {
            Some(f) => fetcd_raft::fault::set(id, &self.peer_url(to), f),
            None => fetcd_raft::fault::heal(id, &self.peer_url(to)),
        }
        Ok(())
    }

    /// Cuts every link between the members in `side` and the other running members, both ways:
    /// a network partition.
    pub fn partition(&self, side: &[usize]) -> anyhow::Result<()> {
        self.links_across(side, Some(fetcd_raft::fault::Fault::Cut))
    }

    /// Lifts what [`partition`](Self::partition) set for `side`.
    pub fn heal(&self, side: &[usize]) -> anyhow::Result<()> {
        self.links_across(side, None)
    }

    fn links_across(
        &self,
        side: &[usize],
        fault: Option<fetcd_raft::fault::Fault>,
    ) -> anyhow::Result<()> {
        let running: Vec<usize> = (0..self.len())
            .filter(|i| self.slots[*i].server.is_some())
            .collect();
        for &a in running.iter().filter(|i| side.contains(i)) {
            for &b in running.iter().filter(|i| !side.contains(i)) {
                self.set_link(a, b, fault)?;
                self.set_link(b, a, fault)?;
            }
        }
        Ok(())
    }

    /// Waits (bounded) until every running member's Status names the member with id `leader` as
    /// the leader.
    pub async fn wait_leader_everywhere(&self, leader: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut seen = Vec::new();
            for i in (0..self.len()).filter(|i| self.slots[*i].server.is_some()) {
                let st = self.client(i).await?.status().await;
                seen.push(st.map(|s| s.leader()).unwrap_or(0));
            }
            if seen.iter().all(|l| *l == leader) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("members report leaders {seen:?}, not {leader}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client talking only to member `i`.
    pub async fn client(&self, i: usize) -> anyhow::Result<Client> {
        crate::etcd::connect(&self.client_url(i)).await
    }

    /// The index of the member that leads now, if a running member knows one.
    pub fn leader(&self) -> Option<usize> {
        for s in self.slots.iter().filter_map(|s| s.server.as_ref()) {
            if let Some(id) = s.node().raft().leader() {
                return self.slots.iter().position(|t| {
                    t.server
                        .as_ref()
                        .is_some_and(|srv| srv.node().raft().id() == id)
                });
            }
        }
        None
    }

    /// Waits until some running member leads and every running member serves a linearizable
    /// read (bounded).
    pub async fn wait_ready(&self) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.leader() {
                let mut all = true;
                for i in 0..self.len() {
                    if self.slots[i].server.is_none() {
                        continue;
                    }
                    let ok = match self.client(i).await {
                        Ok(mut c) => c.get("ready-probe", None).await.is_ok(),
                        Err(_) => false,
                    };
                    all &= ok;
                }
                if all {
                    return Ok(l);
                }
            }
            if Instant::now() > deadline {
                bail!("cluster not ready within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops member `i` (graceful shutdown; its data dir stays).
    pub async fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(s) = self.slots[i].server.take() {
            s.shutdown()
                .await
                .map_err(|e| anyhow!("member {i} shutdown: {e}"))?;
        }
        Ok(())
    }

    /// Starts member `i` again on its own ports and data dir.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let s = self.launch(i, "new").await?;
        self.slots[i].server = Some(s);
        Ok(())
    }

    /// Stops every member.
    pub async fn stop_all(&mut self) -> anyhow::Result<()> {
        for i in 0..self.len() {
            self.stop(i).await?;
        }
        Ok(())
    }

    /// Starts every stopped member at once.
    pub async fn restart_all(&mut self) -> anyhow::Result<()> {
        let stopped: Vec<usize> = (0..self.len())
            .filter(|i| self.slots[*i].server.is_none())
            .collect();
        let starts = stopped.iter().map(|i| self.launch(*i, "new"));
        let servers = futures::future::join_all(starts).await;
        for (i, s) in stopped.into_iter().zip(servers) {
            self.slots[i].server = Some(s?);
        }
        Ok(())
    }
}
