//! A real clustered MQTT broker for the failover tests and the fleet harness: Aedes nodes
//! (Node.js, `testkit/cluster/node.mjs`) sharing one Redis. Publishes cross nodes through
//! `mqemitter-redis`; sessions, subscriptions and queued QoS 1 messages live in Redis
//! (`aedes-persistence-redis`), so a client that moves to another node finds its session
//! there. A node started with [`Sharing::None`] keeps sessions in its own memory: a cluster
//! that does not share sessions.
//!
//! Needs `node` (≥ 20), `redis-server` and `npm ci --prefix testkit/cluster`; skipped with a
//! notice when one is missing, an error when `EDGESYNC_REQUIRE_CLUSTER=1` (CI sets it).
//! Redis is the cluster's database: it keeps running when nodes are killed or restarted.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::pki::{ServerCert, TestPki};
use crate::{Context, Result, free_port, wait_for_listener};

pub const REQUIRE_ENV: &str = "EDGESYNC_REQUIRE_CLUSTER";

/// How a node keeps sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// In the shared Redis: every node knows every session.
    Redis,
    /// In the node's memory: a client that moves here starts with no session.
    None,
}

#[derive(Debug)]
struct Node {
    port: u16,
    sharing: Sharing,
    log: PathBuf,
    child: Option<Child>,
}

/// A running cluster; dropping it kills every process.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<Node>,
    redis: Option<Child>,
    redis_port: u16,
    script: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    dir: tempfile::TempDir,
}

fn script_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster")
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// What is missing to run the cluster, if anything.
pub fn missing() -> Option<String> {
    if on_path("node").is_none() {
        return Some("node (Node.js ≥ 20) is not on PATH".into());
    }
    if on_path("redis-server").is_none() {
        return Some("redis-server is not on PATH (Debian package redis-server)".into());
    }
    if !script_dir().join("node_modules/aedes").is_dir() {
        return Some(format!(
            "the cluster's npm packages are not installed (npm ci --prefix {})",
            script_dir().display()
        ));
    }
    None
}

impl Cluster {
    /// Starts Redis and one node per entry of `nodes`, each on a free loopback port with the
    /// PKI's good server certificate, requiring client certificates of its CA. `Ok(None)`
    /// (with a notice) when the cluster cannot run here and it is not required.
    pub fn start(pki: &TestPki, nodes: &[Sharing]) -> Result<Option<Cluster>> {
        if let Some(why) = missing() {
            if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
                return Err(
                    format!("clustered broker unavailable: {why}, and {REQUIRE_ENV}=1").into(),
                );
            }
            eprintln!(
                "clustered broker unavailable: {why}: skipping this cluster test \
                 (set {REQUIRE_ENV}=1 to make this an error)"
            );
            return Ok(None);
        }
        let dir = tempfile::Builder::new()
            .prefix("edgesync-cluster-")
            .tempdir()
            .context(|| "creating the cluster's directory".into())?;
        let (cert, key) = pki.server_pair(ServerCert::Good);
        let mut c = Cluster {
            nodes: nodes
                .iter()
                .enumerate()
                .map(|(i, &sharing)| Node {
                    port: free_port(),
                    sharing,
                    log: dir.path().join(format!("node{i}.log")),
                    child: None,
                })
                .collect(),
            redis: None,
            redis_port: free_port(),
            script: script_dir().join("node.mjs"),
            ca: pki.ca.clone(),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            dir,
        };
        c.start_redis()?;
        for i in 0..c.nodes.len() {
            c.start_node(i)?;
        }
        Ok(Some(c))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.nodes[i].port))
    }

    /// `mqtts://127.0.0.1:PORT` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("mqtts://127.0.0.1:{}", self.nodes[i].port)
    }

    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// Node `i`'s output so far (empty if none).
    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// When clients connected to node `i` (Unix ms), from its log (all its runs).
    pub fn connects(&self, i: usize) -> Vec<u64> {
        self.log(i)
            .lines()
            .filter_map(|l| l.strip_prefix("conn ")?.split(' ').next()?.parse().ok())
            .collect()
    }

    /// Node `i`'s once-a-second samples (all its runs): Unix ms, publishes received from
    /// clients in that second, clients connected.
    pub fn stats(&self, i: usize) -> Vec<(u64, u64, u64)> {
        self.log(i)
            .lines()
            .filter_map(|l| {
                let mut w = l.strip_prefix("stats ")?.split(' ').map(str::parse::<u64>);
                Some((w.next()?.ok()?, w.next()?.ok()?, w.next()?.ok()?))
            })
            .collect()
    }

    /// SIGKILLs node `i` (a crash: its connections drop without DISCONNECT or will
    /// suppression) and reaps it. No-op if it is not running.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            child.wait().context(|| format!("waiting for node {i}"))?;
        }
        Ok(())
    }

    /// Starts node `i` (again) on its port and waits until it accepts connections.
    /// No-op if it is running.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        if let Some(Ok(None)) = self.nodes[i].child.as_mut().map(Child::try_wait) {
            return Ok(());
        }
        let n = &self.nodes[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .context(|| format!("opening {}", n.log.display()))?;
        let log2 = log
            .try_clone()
            .context(|| format!("opening {}", n.log.display()))?;
        let persistence = match n.sharing {
            Sharing::Redis => "redis",
            Sharing::None => "memory",
        };
        let child = Command::new("node")
            .arg(&self.script)
            .args(["--port", &n.port.to_string()])
            .args(["--redis-port", &self.redis_port.to_string()])
            .arg("--ca")
            .arg(&self.ca)
            .arg("--cert")
            .arg(&self.cert)
            .arg("--key")
            .arg(&self.key)
            .args(["--id", &format!("node{i}")])
            .args(["--persistence", persistence])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .context(|| format!("starting node {}", self.script.display()))?;
        let addr = self.addr(i);
        self.nodes[i].child = Some(child);
        let waited = wait_for_listener(addr, Duration::from_secs(30), || {
            match self.nodes[i].child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Err(format!("node {i} exited: {status}").into()),
                _ => Ok(()),
            }
        });
        if let Err(e) = waited {
            let _ = self.kill(i);
            return Err(format!(
                "cluster node {i} did not come up on {addr}: {e}\n{}",
                self.log(i)
            )
            .into());
        }
        Ok(())
    }

    /// Kills every node, then starts them all again (Redis keeps running).
    pub fn restart_all(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.kill(i)?;
        }
        for i in 0..self.nodes.len() {
            self.start_node(i)?;
        }
        Ok(())
    }

    fn start_redis(&mut self) -> Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.redis_port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(|| "starting redis-server".into())?;
        self.redis = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.redis_port));
        wait_for_listener(addr, Duration::from_secs(10), || {
            match self.redis.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Err(format!("redis-server exited: {status}").into()),
                _ => Ok(()),
            }
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.kill(i);
        }
        if let Some(mut r) = self.redis.take() {
            let _ = r.kill();
            let _ = r.wait();
        }
    }
}
