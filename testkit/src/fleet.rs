//! A fleet of agents on one machine (issue 20): N `edgesync run` processes, each with its own
//! directory, store, socket and client certificate from one test CA, all given the same
//! broker nodes (`mqtt.urls`, shuffled per device, so the fleet spreads over the nodes); a
//! [`Reporter`] that reports changes to every agent's socket at a set rate and records the
//! sequence numbers each answer gives; and a [`Backend`] subscribed on one node that records
//! every change batch, apply result and command answer, deduplicated by `(device, seq)`.
//!
//! The agent binary is the caller's (this crate does not depend on `edgesync`); batches are
//! JSON (`sync.encoding = "json"`) so the back end reads them with serde_json.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, Packet, QoS};
use serde_json::{Value, json};

use crate::connect::Connect;
use crate::{Context, Result, TestPki};

/// How to start the fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// The `edgesync` binary.
    pub binary: PathBuf,
    pub agents: usize,
    /// The broker nodes every agent is given (`mqtt.urls`).
    pub urls: Vec<String>,
    /// Further `[mqtt]` lines (keep-alive, reconnect settings).
    pub mqtt_extra: String,
    /// Further TOML after the generated sections.
    pub extra_toml: String,
    /// Environment of every agent (e.g. the systemd unit's `Environment=`).
    pub env: Vec<(String, String)>,
    /// How long to wait for the whole fleet to answer `status` after the spawn.
    pub start_timeout: Duration,
}

/// One agent process.
#[derive(Debug)]
pub struct FleetAgent {
    pub id: String,
    pub socket: PathBuf,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl FleetAgent {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `status` over the socket (one connection per request).
    pub fn status(&self) -> Result<Value> {
        request(&self.socket, &json!({"op": "status"}))
    }

    /// Resident memory (KiB) from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.pid()?;
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// User + system CPU time so far, in clock ticks (`/proc/PID/stat` fields 14 and 15).
    pub fn cpu_ticks(&self) -> Option<u64> {
        let pid = self.pid()?;
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = s.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    }
}

/// One JSON request on a local socket, its one-line answer.
pub fn request(socket: &Path, req: &Value) -> Result<Value> {
    let mut s =
        UnixStream::connect(socket).context(|| format!("connecting {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .context(|| "socket timeout".into())?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())
        .context(|| format!("writing to {}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .context(|| format!("reading from {}", socket.display()))?;
    serde_json::from_str(&answer).context(|| format!("answer {answer:?}"))
}

/// The fleet; dropping it kills every agent.
#[derive(Debug)]
pub struct Fleet {
    pub agents: Vec<FleetAgent>,
    opts: FleetOptions,
}

/// Device id of agent `i`.
pub fn device_id(i: usize) -> String {
    format!("fleet-{i:04}")
}

impl Fleet {
    /// Issues a client certificate per agent from `pki`'s CA, writes each config under
    /// `dir/NNNN/`, spawns every agent and waits until each answers `status`.
    pub fn start(pki: &TestPki, dir: &Path, opts: FleetOptions) -> Result<Fleet> {
        let mut agents = Vec::with_capacity(opts.agents);
        for i in 0..opts.agents {
            let id = device_id(i);
            let adir = dir.join(format!("{i:04}"));
            std::fs::create_dir_all(&adir).context(|| format!("creating {}", adir.display()))?;
            let (cert, key) = pki.issue_client(&id, &id)?;
            let socket = adir.join("s.sock");
            let urls: Vec<String> = opts.urls.iter().map(|u| format!("{u:?}")).collect();
            let config = format!(
                "[device]\nid = {id:?}\n\
                 [mqtt]\nurls = [{urls}]\nurl_order = \"shuffled\"\nca = {ca:?}\n\
                 cert = {cert:?}\nkey = {key:?}\n{extra_mqtt}\n\
                 [sync]\nencoding = \"json\"\n\
                 [store]\npath = {store:?}\n\
                 [local]\nsocket = {socket:?}\n{extra}\n",
                urls = urls.join(", "),
                ca = pki.ca,
                extra_mqtt = opts.mqtt_extra,
                store = adir.join("store.redb"),
                extra = opts.extra_toml,
            );
            let path = adir.join("edgesync.toml");
            std::fs::write(&path, config).context(|| format!("writing {}", path.display()))?;
            agents.push(FleetAgent {
                id,
                socket,
                dir: adir,
                child: None,
            });
        }
        let mut fleet = Fleet { agents, opts };
        for i in 0..fleet.agents.len() {
            fleet.spawn(i)?;
        }
        fleet.wait_answering(fleet.opts.start_timeout)?;
        Ok(fleet)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let a = &mut self.agents[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(a.dir.join("daemon.log"))
            .context(|| format!("opening {}/daemon.log", a.dir.display()))?;
        let child = Command::new(&self.opts.binary)
            .arg("run")
            .arg("--config")
            .arg(a.dir.join("edgesync.toml"))
            .env_remove("EDGESYNC_LOG")
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context(|| format!("starting {}", self.opts.binary.display()))?;
        a.child = Some(child);
        Ok(())
    }

    /// Waits until every agent answers `status`.
    pub fn wait_answering(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for i in 0..self.agents.len() {
            loop {
                if self.agents[i].status().is_ok() {
                    break;
                }
                if let Some(Ok(Some(code))) = self.agents[i].child.as_mut().map(Child::try_wait) {
                    return Err(format!(
                        "{} exited with {code}: {}",
                        self.agents[i].id,
                        self.log_tail(i)
                    )
                    .into());
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{} did not answer within {timeout:?}: {}",
                        self.agents[i].id,
                        self.log_tail(i)
                    )
                    .into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    }

    /// The last lines of agent `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        let text =
            std::fs::read_to_string(self.agents[i].dir.join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    pub fn sockets(&self) -> Vec<PathBuf> {
        self.agents.iter().map(|a| a.socket.clone()).collect()
    }

    pub fn ids(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.id.clone()).collect()
    }

    /// Every agent's `status` (an error value for one that does not answer).
    pub fn statuses(&self) -> Vec<Value> {
        self.agents
            .iter()
            .map(|a| {
                a.status()
                    .unwrap_or_else(|e| json!({"error": e.to_string()}))
            })
            .collect()
    }

    /// How many agents are online with an empty queue.
    pub fn online_and_drained(&self) -> (usize, usize) {
        let mut online = 0;
        let mut drained = 0;
        for s in self.statuses() {
            if s["connection"]["state"] == "online" {
                online += 1;
                if s["queue"]["depth"] == 0 {
                    drained += 1;
                }
            }
        }
        (online, drained)
    }

    /// SIGKILLs every agent.
    pub fn kill_all(&mut self) {
        for a in &mut self.agents {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Reports one change per tick to each agent, every agent on its own task; records the
/// sequence numbers the answers give.
#[derive(Debug)]
pub struct Reporter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Per agent: the seqs acknowledged by its socket.
    seqs: Arc<Mutex<Vec<BTreeSet<u64>>>>,
    refused: Arc<AtomicU64>,
}

impl Reporter {
    /// Starts reporting `rate` changes per second to each socket, agent `i` first after
    /// `i / n` of the period, so the fleet's reports spread evenly over it.
    pub fn start(sockets: Vec<PathBuf>, rate: f64) -> Result<Reporter> {
        let stop = Arc::new(AtomicBool::new(false));
        let seqs = Arc::new(Mutex::new(vec![BTreeSet::new(); sockets.len()]));
        let refused = Arc::new(AtomicU64::new(0));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context(|| "the reporter's runtime".into())?;
        let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
        let (s2, q2, r2) = (stop.clone(), seqs.clone(), refused.clone());
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let mut tasks = tokio::task::JoinSet::new();
                let n = sockets.len().max(1);
                for (i, socket) in sockets.into_iter().enumerate() {
                    let (stop, seqs, refused) = (s2.clone(), q2.clone(), r2.clone());
                    let phase = period.mul_f64(i as f64 / n as f64);
                    tasks.spawn(report_loop(i, socket, period, phase, stop, seqs, refused));
                }
                while tasks.join_next().await.is_some() {}
            });
        });
        Ok(Reporter {
            stop,
            thread: Some(thread),
            seqs,
            refused,
        })
    }

    /// Stops reporting; every report sent has its answer.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Per agent, the seqs its socket acknowledged so far.
    pub fn seqs(&self) -> Vec<BTreeSet<u64>> {
        self.seqs.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn total(&self) -> usize {
        self.seqs
            .lock()
            .map(|g| g.iter().map(BTreeSet::len).sum())
            .unwrap_or(0)
    }

    /// Reports the agents refused (or that failed).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn report_loop(
    i: usize,
    socket: PathBuf,
    period: Duration,
    phase: Duration,
    stop: Arc<AtomicBool>,
    seqs: Arc<Mutex<Vec<BTreeSet<u64>>>>,
    refused: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    tokio::time::sleep(phase).await;
    let Ok(stream) = tokio::net::UnixStream::connect(&socket).await else {
        refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let (r, mut w) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(r).lines();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let req = json!({"op": "report", "changes": [{"key": format!("k{}", n % 10), "value": n}]});
        let mut line = req.to_string();
        line.push('\n');
        if w.write_all(line.as_bytes()).await.is_err() {
            refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let answer = match lines.next_line().await {
            Ok(Some(a)) => a,
            _ => {
                refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let v: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
        match (
            v["ok"].as_bool(),
            v["first_seq"].as_u64(),
            v["last_seq"].as_u64(),
        ) {
            (Some(true), Some(a), Some(b)) => {
                if let Ok(mut g) = seqs.lock() {
                    g[i].extend(a..=b);
                }
            }
            _ => {
                refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What the back end received.
#[derive(Debug, Default)]
pub struct Received {
    /// Per device, the seqs of the changes received.
    pub seqs: HashMap<String, BTreeSet<u64>>,
    /// Changes received again (the same `(device, seq)`).
    pub duplicates: u64,
    /// When the last new change arrived.
    pub last_new: Option<Instant>,
    /// Per device: apply results (version, status, when).
    pub results: HashMap<String, Vec<(u64, String, Instant)>>,
    /// Per device: command answers (id, ok, when).
    pub answers: HashMap<String, Vec<(String, bool, Instant)>>,
}

/// A fleet back end: an MQTT client of one node with a persistent session, subscribed to
/// every device's batches, apply results and command answers.
pub struct Backend {
    client: Client,
    pub received: Arc<Mutex<Received>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Backend {
    /// Connects to `port` on localhost with its own certificate from `pki` and subscribes
    /// under `prefix` (the agents' `mqtt.topic_prefix`, `edgesync` by default).
    pub fn start(pki: &TestPki, port: u16, prefix: &str) -> Result<Backend> {
        let id = format!("fleet-backend-{}", std::process::id());
        let (cert, key) = pki.issue_client(&id, &id)?;
        let mut opts =
            Connect::tls("localhost", port, pki.ca.clone(), cert, key).mqtt_options(&id)?;
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(4 << 20, 4 << 20);
        opts.set_inflight(1000);
        let (client, mut conn) = Client::new(opts, 10_000);
        for f in ["reported", "desired/result", "cmd/+/result"] {
            client
                .subscribe(format!("{prefix}/+/{f}"), QoS::AtLeastOnce)
                .context(|| "subscribing".into())?;
        }
        let received = Arc::new(Mutex::new(Received::default()));
        let r2 = received.clone();
        let subscribed = Arc::new(AtomicU64::new(0));
        let s2 = subscribed.clone();
        let thread = std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        s2.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(mut g) = r2.lock() {
                            take(&mut g, &p.topic, &p.payload);
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    // The node went away: rumqttc reconnects on the next poll; the session
                    // (in the cluster's Redis) kept what came meanwhile.
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while subscribed.load(Ordering::Relaxed) < 3 {
            if Instant::now() > deadline {
                return Err("the back end's subscriptions were not acknowledged in 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Backend {
            client,
            received,
            thread: Some(thread),
        })
    }

    /// Publishes QoS 1 (queued in the client; the broker's PUBACK comes later).
    pub fn publish(&self, topic: String, payload: Vec<u8>) -> Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .context(|| "publishing".into())
    }

    /// Changes received (distinct `(device, seq)`).
    pub fn distinct(&self) -> usize {
        self.received
            .lock()
            .map(|g| g.seqs.values().map(BTreeSet::len).sum())
            .unwrap_or(0)
    }

    /// Of `want` (per device), the `(device, seq)` not received, at most `limit` of them,
    /// and how many in all.
    pub fn missing(
        &self,
        want: &[(String, BTreeSet<u64>)],
        limit: usize,
    ) -> (usize, Vec<(String, u64)>) {
        let Ok(g) = self.received.lock() else {
            return (usize::MAX, Vec::new());
        };
        let empty = BTreeSet::new();
        let mut n = 0;
        let mut some = Vec::new();
        for (dev, seqs) in want {
            let got = g.seqs.get(dev).unwrap_or(&empty);
            for q in seqs.difference(got) {
                n += 1;
                if some.len() < limit {
                    some.push((dev.clone(), *q));
                }
            }
        }
        (n, some)
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").finish_non_exhaustive()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn take(g: &mut Received, topic: &str, payload: &[u8]) {
    let now = Instant::now();
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return;
    };
    let mut parts = topic.split('/');
    let _prefix = parts.next();
    let Some(device) = parts.next() else { return };
    let rest: Vec<&str> = parts.collect();
    match rest.as_slice() {
        ["reported"] => {
            let set = g.seqs.entry(device.to_owned()).or_default();
            let mut new = false;
            let mut dup = 0;
            for c in v["changes"].as_array().into_iter().flatten() {
                if let Some(q) = c["seq"].as_u64() {
                    if set.insert(q) {
                        new = true;
                    } else {
                        dup += 1;
                    }
                }
            }
            g.duplicates += dup;
            if new {
                g.last_new = Some(now);
            }
        }
        ["desired", "result"] => {
            let version = v["version"].as_u64().unwrap_or(0);
            let status = v["status"].as_str().unwrap_or("").to_owned();
            g.results
                .entry(device.to_owned())
                .or_default()
                .push((version, status, now));
        }
        ["cmd", _, "result"] => {
            let id = v["id"].as_str().unwrap_or("").to_owned();
            let ok = v["ok"].as_bool().unwrap_or(false);
            g.answers
                .entry(device.to_owned())
                .or_default()
                .push((id, ok, now));
        }
        _ => {}
    }
}

/// A fault proxy in front of every node of `cluster` (see [`Scenario`]) and the URLs the
/// agents get for them (`mqtt.urls`, in node order).
pub fn fronted(cluster: &crate::Cluster) -> Result<(Vec<crate::FaultProxy>, Vec<String>)> {
    let proxies = (0..cluster.len())
        .map(|i| crate::FaultProxy::start(cluster.addr(i)))
        .collect::<Result<Vec<_>>>()?;
    let urls = proxies
        .iter()
        .map(|p| format!("mqtts://localhost:{}", p.port()))
        .collect();
    Ok((proxies, urls))
}

/// Unix time in ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Polls `cond` every 50 ms until it holds; how long that took, or an error naming `what`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<Duration> {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(t0.elapsed())
}

/// The scenarios of issue 20 on a running cluster, fleet and back end; the figures are
/// measured here, the verdicts (nothing lost) asserted by the caller.
///
/// The agents reach node `i` through `proxies[i]`. Aedes sends a QoS 1 PUBACK before it
/// passes the message on (aedes lib/handlers/publish.js), so a node killed at any moment
/// may lose what it acknowledged in its last milliseconds: the broker's loss, not the
/// agent's. To test the agent alone, a node's links are frozen before it dies, and it dies
/// once the back end holds every change the agents saw acknowledged; then its connections
/// are reset, as the dead node's kernel would.
#[derive(Debug)]
pub struct Scenario<'a> {
    pub cluster: &'a mut crate::Cluster,
    pub proxies: &'a [crate::FaultProxy],
    pub fleet: &'a Fleet,
    pub backend: &'a Backend,
    /// The node the back end is on (never killed alone).
    pub backend_node: usize,
    pub timeout: Duration,
}

/// A node death: which node, when (Unix ms), how many agents were on it.
#[derive(Debug, Clone)]
pub struct Death {
    pub node: usize,
    pub at_ms: u64,
    pub agents_on_it: usize,
    /// From the kill until every agent was online again, and until every queue was empty.
    pub back_in: Duration,
    pub drained_in: Duration,
}

impl Scenario<'_> {
    /// Per node, how many agents are on it now (`connection.url_index`; 0 with one URL).
    pub fn spread(&self) -> Vec<usize> {
        let mut per = vec![0; self.cluster.len()];
        for s in self.fleet.statuses() {
            if s["connection"]["state"] == "online" {
                let i = s["connection"]["url_index"].as_u64().unwrap_or(0) as usize;
                if let Some(n) = per.get_mut(i) {
                    *n += 1;
                }
            }
        }
        per
    }

    /// Waits until every agent is online.
    pub fn wait_online(&self) -> Result<Duration> {
        let n = self.fleet.agents.len();
        wait_for("every agent online", self.timeout, || {
            self.fleet.online_and_drained().0 == n
        })
    }

    /// Waits until every agent is online with an empty queue.
    pub fn wait_drained(&self) -> Result<Duration> {
        let n = self.fleet.agents.len();
        wait_for("every agent online and drained", self.timeout, || {
            self.fleet.online_and_drained().1 == n
        })
    }

    /// Kills the node (other than the back end's) with the most agents, mid-traffic, and
    /// waits until every agent is back online and then drained.
    pub fn kill_busiest_node(&mut self, reporter: &Reporter) -> Result<Death> {
        let spread = self.spread();
        let node = (0..spread.len())
            .filter(|&i| i != self.backend_node)
            .max_by_key(|&i| spread[i])
            .ok_or("no node to kill")?;
        self.proxies[node].blackhole();
        self.wait_acked_delivered(reporter)?;
        let at_ms = now_ms();
        let t0 = Instant::now();
        self.cluster.kill(node)?;
        self.proxies[node].reset_all();
        self.proxies[node].restore();
        // Until the agents notice, they still look online: wait for the ones on it to leave.
        let n = self.fleet.agents.len();
        wait_for(
            "every agent off the dead node and online",
            self.timeout,
            || {
                let s = self.spread();
                s[node] == 0 && s.iter().sum::<usize>() == n
            },
        )?;
        let back_in = t0.elapsed();
        self.wait_drained()?;
        let drained_in = t0.elapsed();
        Ok(Death {
            node,
            at_ms,
            agents_on_it: spread[node],
            back_in,
            drained_in,
        })
    }

    /// Stops every node, waits `down` (the fleet keeps queueing), starts them all again;
    /// the time from the restart until every agent was online, and until drained.
    pub fn cluster_outage(
        &mut self,
        reporter: &Reporter,
        down: Duration,
    ) -> Result<(u64, Duration, Duration)> {
        for p in self.proxies {
            p.blackhole();
        }
        self.wait_acked_delivered(reporter)?;
        for i in 0..self.cluster.len() {
            self.cluster.kill(i)?;
        }
        for p in self.proxies {
            p.reset_all();
            p.restore();
        }
        std::thread::sleep(down);
        let at_ms = now_ms();
        let t0 = Instant::now();
        for i in 0..self.cluster.len() {
            self.cluster.start_node(i)?;
        }
        self.wait_online()?;
        let back = t0.elapsed();
        self.wait_drained()?;
        Ok((at_ms, back, t0.elapsed()))
    }

    /// Waits until the back end holds every change an agent has seen acknowledged (below
    /// its queue's oldest entry: deleted after the broker's PUBACK).
    fn wait_acked_delivered(&self, reporter: &Reporter) -> Result<Duration> {
        let seqs = reporter.seqs();
        let want: Vec<(String, BTreeSet<u64>)> = self
            .fleet
            .statuses()
            .iter()
            .zip(self.fleet.ids())
            .zip(seqs)
            .map(|((s, id), seqs)| {
                let below = s["queue"]["next_seq"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(s["queue"]["depth"].as_u64().unwrap_or(u64::MAX));
                (id, seqs.into_iter().filter(|&q| q < below).collect())
            })
            .collect();
        wait_for(
            "the broker to pass on every acknowledged change",
            self.timeout,
            || self.backend.missing(&want, 0).0 == 0,
        )
    }

    /// Publishes a desired document (`version`, one key) to every device and waits for
    /// every device's `applied` result: the time from the first publish to the last result.
    pub fn desired_fanout(&self, prefix: &str, version: u64) -> Result<Duration> {
        let t0 = Instant::now();
        for (i, a) in self.fleet.agents.iter().enumerate() {
            let doc = json!({"version": version, "state": {"fleet.setpoint": i}});
            self.backend.publish(
                format!("{prefix}/{}/desired", a.id),
                doc.to_string().into_bytes(),
            )?;
        }
        let ids = self.fleet.ids();
        wait_for("every device's apply result", self.timeout, || {
            let Ok(g) = self.backend.received.lock() else {
                return false;
            };
            ids.iter().all(|d| {
                g.results
                    .get(d)
                    .is_some_and(|r| r.iter().any(|(v, s, _)| *v == version && s == "applied"))
            })
        })?;
        Ok(t0.elapsed())
    }

    /// Sends command `ping` with id `id` to every device and waits for every answer.
    pub fn command_fanout(&self, prefix: &str, id: &str) -> Result<Duration> {
        let t0 = Instant::now();
        for a in &self.fleet.agents {
            let req = json!({"id": id, "args": {}});
            self.backend.publish(
                format!("{prefix}/{}/cmd/ping", a.id),
                req.to_string().into_bytes(),
            )?;
        }
        let ids = self.fleet.ids();
        wait_for("every device's ping answer", self.timeout, || {
            let Ok(g) = self.backend.received.lock() else {
                return false;
            };
            ids.iter().all(|d| {
                g.answers
                    .get(d)
                    .is_some_and(|r| r.iter().any(|(i, ok, _)| i == id && *ok))
            })
        })?;
        Ok(t0.elapsed())
    }

    /// Waits until the back end holds every change the reporter got acknowledged; returns
    /// how many are missing at the deadline (0: nothing lost).
    pub fn lost(&self, reporter: &Reporter) -> (usize, Vec<(String, u64)>) {
        let want: Vec<(String, BTreeSet<u64>)> =
            self.fleet.ids().into_iter().zip(reporter.seqs()).collect();
        let _ = wait_for(
            "every acknowledged change at the back end",
            self.timeout,
            || self.backend.missing(&want, 0).0 == 0,
        );
        self.backend.missing(&want, 10)
    }
}
