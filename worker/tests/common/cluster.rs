//! A real Redis Cluster for the tests: three masters with one replica each, every node a
//! `redis-server --cluster-enabled yes` on free ports (its bus port, +10000, free too),
//! joined with `redis-cli --cluster create`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub struct RedisCluster {
    pub nodes: Vec<Node>,
    dir: PathBuf,
}

/// A master: port, node id, slot ranges served.
struct Master(u16, String, Vec<(u16, u16)>);

pub struct Node {
    pub port: u16,
    child: Option<Child>,
}

/// A port whose cluster bus port (+10000) is free as well.
fn cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p < 22_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

impl RedisCluster {
    /// Six nodes, three masters with one replica each; returns once every slot is served.
    pub fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("ew-cluster-{}", free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cluster = Self { nodes: Vec::new(), dir };
        for _ in 0..6 {
            let port = cluster_port();
            let child = cluster.spawn(port);
            cluster.nodes.push(Node { port, child: Some(child) });
        }
        for n in &cluster.nodes {
            wait_for(&format!("node {} answers", n.port), || cli(n.port, &["PING"]).is_some_and(|o| o == "PONG"));
        }
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for n in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create.args(["--cluster-replicas", "1", "--cluster-yes"]).output().expect("redis-cli");
        assert!(out.status.success(), "cluster create: {}", String::from_utf8_lossy(&out.stdout));
        for n in &cluster.nodes {
            wait_for(&format!("node {} sees the cluster ok", n.port), || {
                cli(n.port, &["CLUSTER", "INFO"]).is_some_and(|o| o.contains("cluster_state:ok"))
            });
            // A replica that never finished its first sync would not take over.
            wait_for(&format!("node {} in sync", n.port), || {
                cli(n.port, &["INFO", "replication"])
                    .is_some_and(|o| o.contains("role:master") || o.contains("master_link_status:up"))
            });
        }
        cluster
    }

    fn spawn(&self, port: u16) -> Child {
        let node_dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&node_dir).unwrap();
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"])
            // A replica takes over however long it was cut off (a test kills masters).
            .args(["--cluster-replica-validity-factor", "0"])
            .args(["--appendonly", "yes", "--save", "", "--dir"])
            .arg(&node_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)")
    }

    /// `redis+cluster://` URL with every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// Process ids of the nodes that run.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(|n| n.child.as_ref().map(|c| c.id())).collect()
    }

    /// A node that was not killed.
    pub fn live(&self) -> u16 {
        self.nodes.iter().find(|n| n.child.is_some()).expect("a live node").port
    }

    /// Masters that are up.
    fn master_table(&self) -> Vec<Master> {
        let nodes = cli(self.live(), &["CLUSTER", "NODES"]).unwrap();
        let mut out = Vec::new();
        for line in nodes.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let port = f[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
            let ranges = f[8..]
                .iter()
                .filter_map(|range| {
                    let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                    Some((lo.parse().ok()?, hi.parse().ok()?))
                })
                .collect();
            out.push(Master(port, f[0].to_string(), ranges));
        }
        out
    }

    /// Ports of the masters that are up and serve slots.
    pub fn masters(&self) -> Vec<u16> {
        self.master_table().into_iter().filter(|m| !m.2.is_empty()).map(|m| m.0).collect()
    }

    /// The port of the master serving `key`'s slot now.
    pub fn master_of(&self, key: &str) -> u16 {
        let slot: u16 = cli(self.live(), &["CLUSTER", "KEYSLOT", key]).unwrap().trim().parse().unwrap();
        let table = self.master_table();
        table
            .iter()
            .find(|m| m.2.iter().any(|(lo, hi)| (*lo..=*hi).contains(&slot)))
            .map(|m| m.0)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// Move every slot of master `from` to master `to` with `redis-cli --cluster reshard`
    /// (keys migrate while clients use them); returns how many slots moved.
    pub fn reshard_all(&self, from: u16, to: u16) -> usize {
        let table = self.master_table();
        let id = |port: u16| table.iter().find(|m| m.0 == port).map(|m| m.1.clone()).expect("a master");
        let slots: usize =
            table.iter().find(|m| m.0 == from).unwrap().2.iter().map(|(lo, hi)| (hi - lo + 1) as usize).sum();
        let out = Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{to}")])
            .args(["--cluster-from", &id(from), "--cluster-to", &id(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "reshard: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        wait_for("the cluster is ok after the reshard", || {
            self.nodes
                .iter()
                .filter(|n| n.child.is_some())
                .all(|n| cli(n.port, &["CLUSTER", "INFO"]).is_some_and(|o| o.contains("cluster_state:ok")))
        });
        slots
    }

    /// Waits until every replica of the master on `port` has what the master has
    /// (replication is asynchronous: a master killed before that takes its last writes along).
    pub fn wait_replicated(&self, port: u16) {
        wait_for(&format!("replicas of {port} caught up"), || {
            let Some(info) = cli(port, &["INFO", "replication"]) else { return false };
            let offset = info.lines().find_map(|l| l.strip_prefix("master_repl_offset:")).map(str::trim);
            let replicas: Vec<&str> =
                info.lines().filter(|l| l.starts_with("slave") && l.contains("offset=")).collect();
            !replicas.is_empty()
                && replicas.iter().all(|r| {
                    r.split(',').find_map(|f| f.strip_prefix("offset=")).map(str::trim) == offset
                        && r.contains("state=online")
                })
        });
    }

    /// Waits until the slots of the killed master `old` are served by another node.
    pub fn wait_failover(&self, old: u16) {
        wait_for(&format!("a replica of {old} took over"), || {
            let masters = self.master_table();
            !masters.iter().any(|m| m.0 == old) && masters.iter().map(|m| m.2.len()).sum::<usize>() > 0
        });
        wait_for("the cluster is ok after the failover", || {
            cli(self.live(), &["CLUSTER", "INFO"]).is_some_and(|o| o.contains("cluster_state:ok"))
        });
    }

    /// Start a killed node again, from its own files: it rejoins the cluster (a master that
    /// was replaced comes back as a replica of its successor) and catches up.
    pub fn restart(&mut self, port: u16) {
        let child = self.spawn(port);
        self.nodes.iter_mut().find(|n| n.port == port).expect("a node of this cluster").child = Some(child);
        wait_for(&format!("node {port} back and in sync"), || {
            cli(port, &["INFO", "replication"])
                .is_some_and(|o| o.contains("role:master") || o.contains("master_link_status:up"))
        });
    }

    /// `kill -9` one node.
    pub fn kill(&mut self, port: u16) {
        let n = self.nodes.iter_mut().find(|n| n.port == port).expect("a node of this cluster");
        if let Some(mut c) = n.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `redis-cli -p <port> <args>`: its output, None when it failed.
pub fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
