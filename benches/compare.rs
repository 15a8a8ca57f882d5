//! Side by side: edgesync against a bridged Mosquitto, the same workload, one machine, one run.
//!
//! ```text
//! cargo bench --bench compare                 # full run: 3 repeats, backlogs 10^4..10^7, writes docs/compare.svg
//! cargo bench --bench compare -- --quick      # smoke run: 1 repeat, backlogs 10^4 and 10^5
//! cargo bench --bench compare -- --only 1 --sizes 1000000 --budget 300
//! cargo bench --bench compare -- --only 1,3 --repeats 5 --sizes 1000000
//! cargo bench --bench compare -- --only 1 --sizes 1000000 --no-peer   # edgesync's peak RSS holding and draining
//! EDGESYNC_BENCH_DAEMON=target/ship/edgesync cargo bench --bench compare -- --only 1 --no-peer
//! cargo bench --bench compare -- --only 5                 # flash wear, about 6 min a repeat
//! ```
//!
//! Both systems take changes from a local publisher while the "cloud" is unreachable, keep
//! them, and deliver them to the same cloud Mosquitto over mutual TLS once it is reachable:
//! - **edgesync**: `client::report_stream` (the code of `edgesync report --stdin`, one
//!   connection to the daemon's Unix socket) → redb outbox → MQTT batches → cloud.
//! - **peer**: a rumqttc publisher (one plain-TCP connection to 127.0.0.1, QoS 1, a PUBACK is
//!   the acknowledgement) → a local Mosquitto (`persistence true`, default `autosave_interval`
//!   1800 s) → its bridge (`cleansession false`, QoS 1, mutual TLS) → cloud.
//! - **durable peer** (groups 1 and 2, beside the default one): the same Mosquitto with its
//!   most durable settings, `autosave_on_changes true` and `autosave_interval 1` (a save of
//!   the whole database after every queued message; `--durable-peer N`). The default peer
//!   answers from memory, edgesync after the fsync: its rows say "durable vs in-memory".
//!
//! The cloud is a [`FaultProxy`] in front of the cloud Mosquitto: cut while the backlog is
//! built, restored for the drain. Each change is `sensor.<i % 100>` with a 100-byte value
//! `reading-000…<i>`; the cloud subscriber reads the index back out of every delivered
//! change (CBOR batches for edgesync, the message payload for the peer), so duplicates
//! (at-least-once) are counted once and a missing change is seen.
//!
//! Groups: 1 = backlog runs per size (ingest while offline, drain, time to first message,
//! peak RSS, bytes on disk, CPU); 2 = kill -9 with a backlog, lost acknowledged changes;
//! 3 = online latency; 4 = slow link (250 kB/s and 200 ms round trip through the proxy's
//! delay line: backlog drains over batch size and window, online latency over linger);
//! 5 = flash wear (bytes written per change, `write_bytes` of /proc/PID/io, in the cases of
//! issue 16; only with `--only 5`: it spends minutes of wall clock at 1 report/s).

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    Daemon, KEYS, MIB, Res, Setup, StatusConn, Subscriber, VALUE_LEN, batch_changes,
    clock_ticks_per_sec, cpu_ticks, loadavg, machine, median, mqtt_options, ndjson, nodelay,
    pki_and_mosquitto, proc_status_kb, scheduled, stream, value, wait_online,
};
use edgesync_testkit::{FaultProxy, Mosquitto, MosquittoOptions, TestPki};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

const DEVICE: &str = "bench-compare";
const BRIDGE_ID: &str = "peer-bridge";
/// No new change at the cloud for this long (once connected) ends a wait for deliveries
/// that may never come (the peer after a kill -9).
const SETTLE: Duration = Duration::from_secs(5);
/// A drain that must complete may pause this long (the bridge reconnecting) before it fails.
const DRAIN_STALL: Duration = Duration::from_secs(90);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(600);
/// Latency samples discarded at the start (first publish after connect, cold caches).
const WARMUP: usize = 20;

/// Which local Mosquitto the peer runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Peer {
    /// Mosquitto's defaults: `autosave_interval 1800` (seconds), `autosave_on_changes false`:
    /// the backlog lives in memory and a PUBACK means "in memory".
    Memory,
    /// Its most durable settings: `autosave_on_changes true` with `autosave_interval N`
    /// (changes): the whole database is rewritten after every N queued messages. Mosquitto
    /// still answers the PUBACK before that save, so it is not an fsync before the answer.
    Durable(u32),
}

impl Peer {
    fn label(self) -> String {
        match self {
            Peer::Memory => "peer (in memory: autosave_interval 1800 s)".into(),
            Peer::Durable(n) => {
                format!("peer (durable: autosave_on_changes true, autosave_interval {n})")
            }
        }
    }
}

const USAGE: &str = "usage: cargo bench --bench compare -- [--quick] [--repeats N] [--only 1,2,3,4,5]
       [--sizes 10000,100000,1000000,10000000] [--budget S] [--kill N] [--samples N]
       [--inflight N] [--svg PATH] [--no-peer] [--store-extra LINE] [--wear-secs S]
       [--wear-warmup S] [--durable-peer N]

  --quick       1 repeat, backlogs 10^4 and 10^5, kill with 10^4, 300 latency samples, no SVG,
                peer budget 30 s (also what `cargo test --benches` runs)
  --repeats N   repeats of every figure (default 3)
  --only LIST   groups: 1 backlog (ingest, drain, RSS, disk, CPU), 2 kill -9, 3 latency, 4 slow link,
                5 flash wear (not run unless listed)
  --sizes LIST  backlog sizes of group 1 (default 10000,100000,1000000,10000000); the headline
                is the largest size the peer completed
  --budget S    seconds the peer may take for its ingest and for its drain at one size (default
                120, 30 with --quick); past it the run records 'did not complete: k of N in
                T s' and moves on
  --kill N      backlog at the kill -9 (default 100000)
  --samples N   latency samples (default 1000, every 2 ms)
  --inflight N  the peer publisher's QoS 1 window (default 10000: the fastest of 100/1000/10000 here)
  --svg PATH    chart output (default docs/compare.svg on a full run of groups 1 and 3)
  --wear-secs S   length of each measured case of group 5 (default 30, 5 with --quick)
  --wear-warmup S warm-up of each case of group 5, not measured (default 5, 2 with --quick)
  --durable-peer N  autosave_interval (changes, with autosave_on_changes true) of the durable
                peer run beside the default one in groups 1 and 2 (default 1: a save after
                every queued message; 0: no durable peer)
  --no-peer     group 1 runs edgesync only and prints its medians per size (for A/B runs of
                edgesync settings; no comparison table)
  --store-extra LINE  a TOML line added to edgesync's [store] section in group 1, e.g.
                'cache_size = \"1MiB\"'
env EDGESYNC_BENCH_DAEMON=PATH starts that edgesync binary (e.g. target/ship/edgesync, the
                build devices run) instead of the bench profile's";

#[derive(Debug, Clone)]
struct Args {
    quick: bool,
    repeats: usize,
    only: Vec<u8>,
    sizes: Vec<usize>,
    budget: Duration,
    kill: usize,
    samples: usize,
    spacing: Duration,
    inflight: u16,
    svg: Option<PathBuf>,
    no_peer: bool,
    store_extra: String,
    wear_secs: u64,
    wear_warmup: u64,
    /// `autosave_interval` of the durable peer (changes between saves); 0: not run.
    durable: u32,
}

fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Res<T> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    v.parse::<T>()
        .map_err(|_| format!("{flag} {v:?}: not a number"))
}

fn list(flag: &str, v: Option<String>) -> Res<Vec<usize>> {
    let v = v.ok_or_else(|| format!("{flag} needs a list"))?;
    v.split(',')
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .map_err(|_| format!("{flag} {v:?}: not a list of numbers"))
        })
        .collect()
}

fn parse_args() -> Res<Args> {
    let mut quick = false;
    let mut repeats = None;
    let mut only = vec![1, 2, 3, 4];
    let mut sizes = None;
    let mut budget = None;
    let mut kill = None;
    let mut samples = None;
    let mut inflight = 10_000u16;
    let mut svg = None;
    let mut no_peer = false;
    let mut store_extra = String::new();
    let mut wear_secs = None;
    let mut wear_warmup = None;
    let mut durable = 1u32;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--repeats" => repeats = Some(num::<usize>("--repeats", it.next())?.max(1)),
            "--only" => {
                only = list("--only", it.next())?
                    .into_iter()
                    .map(|g| u8::try_from(g).unwrap_or(0))
                    .collect();
                if only.iter().any(|g| !(1..=5).contains(g)) {
                    return Err("--only: groups are 1 to 5".into());
                }
            }
            "--sizes" => sizes = Some(list("--sizes", it.next())?),
            "--budget" => budget = Some(num::<u64>("--budget", it.next())?.max(1)),
            "--kill" => kill = Some(num::<usize>("--kill", it.next())?.max(1)),
            "--samples" => samples = Some(num::<usize>("--samples", it.next())?.max(10)),
            "--inflight" => inflight = num::<u16>("--inflight", it.next())?.max(1),
            "--svg" => svg = Some(PathBuf::from(it.next().ok_or("--svg needs a path")?)),
            "--no-peer" => no_peer = true,
            "--durable-peer" => durable = num::<u32>("--durable-peer", it.next())?,
            "--store-extra" => {
                store_extra = it.next().ok_or("--store-extra needs a TOML line")?;
            }
            "--wear-secs" => wear_secs = Some(num::<u64>("--wear-secs", it.next())?.max(1)),
            "--wear-warmup" => wear_warmup = Some(num::<u64>("--wear-warmup", it.next())?),
            // `cargo bench` passes --bench to every bench target.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    // `cargo test --benches` runs this without --bench: a smoke run.
    if !std::env::args().any(|a| a == "--bench") {
        quick = true;
    }
    let mut sizes = sizes.unwrap_or_else(|| {
        if quick {
            vec![10_000, 100_000]
        } else {
            vec![10_000, 100_000, 1_000_000, 10_000_000]
        }
    });
    sizes.retain(|&s| s > 0);
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.is_empty() {
        return Err("--sizes: no size".into());
    }
    let full = !quick && !no_peer && only.contains(&1) && only.contains(&3);
    Ok(Args {
        quick,
        repeats: repeats.unwrap_or(if quick { 1 } else { 3 }),
        only,
        sizes,
        // A smoke run must not hang on a stuck peer for long.
        budget: Duration::from_secs(budget.unwrap_or(if quick { 30 } else { 120 })),
        kill: kill.unwrap_or(if quick { 10_000 } else { 100_000 }),
        samples: samples.unwrap_or(if quick { 300 } else { 1000 }),
        spacing: Duration::from_millis(2),
        inflight,
        svg: svg.or_else(|| {
            full.then(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/compare.svg"))
        }),
        no_peer,
        store_extra,
        wear_secs: wear_secs.unwrap_or(if quick { 5 } else { 30 }),
        wear_warmup: wear_warmup.unwrap_or(if quick { 2 } else { 5 }),
        durable,
    })
}

// ---------------------------------------------------------------------------------------------
// The cloud: a Mosquitto behind a proxy, and a subscriber that records the first arrival of
// every change index.

/// How the cloud reads change indices out of a message.
#[derive(Debug, Clone, Copy)]
enum Format {
    /// edgesync's CBOR change batches.
    Batch,
    /// One change per message, the value as the payload.
    Plain,
}

fn index_of(v: &str) -> Option<usize> {
    v.strip_prefix("reading-")?.parse().ok()
}

#[derive(Default)]
struct Arrivals {
    first: Vec<Option<Instant>>,
    distinct: usize,
    messages: usize,
    first_msg: Option<Instant>,
    last_new: Option<Instant>,
    /// Messages that were not a change of this run (undecodable or out of range).
    stray: usize,
}

struct Cloud {
    state: Arc<Mutex<Arrivals>>,
    _sub: Subscriber,
}

impl Cloud {
    fn start(world: &World, filter: &str, name: &str, format: Format, n: usize) -> Res<Cloud> {
        trace(&format!("cloud subscriber {name}"));
        let mut opts = mqtt_options(&world.pki, world.cloud.tls_port, name)?;
        opts.set_clean_session(true);
        let state = Arc::new(Mutex::new(Arrivals {
            first: vec![None; n],
            ..Arrivals::default()
        }));
        let sink = Arc::clone(&state);
        let sub = Subscriber::start(opts, filter, move |at, p| {
            let ids: Vec<Option<usize>> = match format {
                Format::Batch => batch_changes(&p.payload).map_or_else(
                    || vec![None],
                    |c| c.iter().map(|(_, v)| v.and_then(index_of)).collect(),
                ),
                Format::Plain => {
                    vec![std::str::from_utf8(&p.payload).ok().and_then(index_of)]
                }
            };
            let Ok(mut s) = sink.lock() else { return };
            s.messages += 1;
            s.first_msg.get_or_insert(at);
            for id in ids {
                match id.and_then(|i| s.first.get(i).map(|f| (i, f.is_none()))) {
                    Some((i, true)) => {
                        s.first[i] = Some(at);
                        s.distinct += 1;
                        s.last_new = Some(at);
                    }
                    Some((_, false)) => {}
                    None => s.stray += 1,
                }
            }
        })?;
        Ok(Cloud { state, _sub: sub })
    }

    fn distinct(&self) -> usize {
        self.state.lock().map(|s| s.distinct).unwrap_or(0)
    }

    /// Waits until all `n` changes arrived, or (once `connected()`) none arrived for
    /// [`SETTLE`]. Returns the distinct count.
    fn wait_delivery(
        &self,
        n: usize,
        settle: Duration,
        mut connected: impl FnMut() -> bool,
    ) -> usize {
        let t0 = Instant::now();
        let mut since: Option<(usize, Instant)> = None;
        loop {
            let d = self.distinct();
            if d >= n || t0.elapsed() > DELIVERY_TIMEOUT {
                return d;
            }
            if connected() {
                match since {
                    Some((seen, at)) if seen == d => {
                        if at.elapsed() > settle {
                            return d;
                        }
                    }
                    _ => since = Some((d, Instant::now())),
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A temporary directory, a PKI, the cloud Mosquitto and the proxy in front of it.
struct World {
    dir: tempfile::TempDir,
    pki: TestPki,
    cloud: Mosquitto,
    proxy: FaultProxy,
}

impl World {
    fn new() -> Res<World> {
        trace("world");
        // The cloud subscriber may trail a 10^6 burst: never drop for it.
        let (dir, pki, cloud) = pki_and_mosquitto(
            "edgesync-compare-",
            DEVICE,
            vec!["max_queued_messages 0".into()],
        )?;
        let proxy = FaultProxy::start(cloud.tls_addr()).map_err(|e| format!("proxy: {e}"))?;
        Ok(World {
            dir,
            pki,
            cloud,
            proxy,
        })
    }

    /// Times the bridge has connected to the cloud so far (from the cloud's log).
    fn bridge_connects(&self) -> usize {
        self.cloud
            .log()
            .matches(&format!(" as {BRIDGE_ID} "))
            .count()
    }

    // --- edgesync -----------------------------------------------------------------------

    /// A daemon config pointing at the proxy. `mqtt`/`sync`: extra lines of those sections.
    fn agent(&self, name: &str, mqtt: &str, sync: &str) -> Res<Setup> {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // sun_path is short: the socket stays directly under /tmp.
        let socket = PathBuf::from(format!("/tmp/esc-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let text = format!(
            "[device]\nid = \"{DEVICE}\"\n\n\
             [mqtt]\nurl = \"mqtts://localhost:{port}\"\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n{mqtt}\n\n\
             [store]\npath = \"edgesync.redb\"\nmax_bytes = \"4GiB\"\nwhen_full = \"reject\"\n\n\
             [sync]\n{sync}\n\n\
             [local]\nsocket = {socket:?}\n",
            port = self.proxy.port(),
            ca = self.pki.ca,
            cert = self.pki.client_cert,
            key = self.pki.client_key,
        );
        Setup::write(&dir, socket, &text)
    }

    // --- the peer -----------------------------------------------------------------------

    /// The local Mosquitto: persistence on (default autosave), a plain listener for the
    /// local publisher, and a bridge to the cloud through the proxy. `restart`: the bridge's
    /// `restart_timeout` (None: Mosquitto's default).
    fn peer(&self, restart: Option<&str>) -> Res<Mosquitto> {
        self.peer_as(restart, Peer::Memory)
    }

    fn peer_as(&self, restart: Option<&str>, kind: Peer) -> Res<Mosquitto> {
        let (cert, key) = self
            .pki
            .issue_client(BRIDGE_ID, BRIDGE_ID)
            .map_err(|e| format!("bridge cert: {e}"))?;
        // Mosquitto reads the bridge's files after dropping root for its own user.
        for (path, mode) in [(self.dir.path(), 0o755), (key.as_path(), 0o644)] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod {}: {e}", path.display()))?;
        }
        let mut extra = Vec::new();
        let autosave_interval = match kind {
            // Mosquitto's default.
            Peer::Memory => 1800,
            Peer::Durable(n) => {
                extra.push("autosave_on_changes true".to_owned());
                n
            }
        };
        extra.extend([
            // A 10^6 backlog for the bridge must not be cut at Mosquitto's default of 1000.
            "max_queued_messages 0".to_owned(),
            "max_queued_bytes 0".to_owned(),
            // Mosquitto's default; the testkit's 0 (unlimited) made the bridge spin for
            // minutes without sending anything when it reconnected to a 10^6 backlog.
            "max_inflight_messages 20".to_owned(),
            format!("\nconnection {BRIDGE_ID}"),
            format!("address 127.0.0.1:{}", self.proxy.port()),
            format!("clientid {BRIDGE_ID}"),
            "cleansession false".into(),
            "bridge_protocol_version mqttv311".into(),
            "topic peer/# out 1".into(),
            format!("bridge_cafile {}", self.pki.ca.display()),
            format!("bridge_certfile {}", cert.display()),
            format!("bridge_keyfile {}", key.display()),
        ]);
        if let Some(r) = restart {
            extra.push(format!("restart_timeout {r}"));
        }
        Mosquitto::start(
            &self.pki,
            MosquittoOptions {
                plain_tcp: true,
                persistence: true,
                autosave_interval,
                max_payload: 16 * 1024 * 1024,
                extra_config: extra,
                ..MosquittoOptions::default()
            },
        )
        .map_err(|e| format!("peer mosquitto: {e}"))?
        .ok_or_else(|| "mosquitto is not installed".to_owned())
    }
}

/// Progress on stderr with `EDGESYNC_BENCH_TRACE=1` (where a hung run stands).
fn trace(what: &str) {
    if std::env::var_os("EDGESYNC_BENCH_TRACE").is_some() {
        eprintln!("[{:?}] {what}", std::time::SystemTime::now());
    }
}

fn peer_topic(i: usize) -> String {
    format!("peer/sensor.{}", i % KEYS)
}

/// The peer's local publisher: one connection, QoS 1, up to `inflight` unacknowledged.
struct Publisher {
    client: Client,
    acks: Arc<AtomicU64>,
    failed: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Publisher {
    fn connect(port: u16, inflight: u16) -> Res<Publisher> {
        let mut o = MqttOptions::new("peer-publisher", "127.0.0.1", port);
        // Long: under a 10^6 backlog Mosquitto answers a PINGREQ only after the publishes
        // queued before it, which took over a keep-alive period of 30 s here.
        o.set_keep_alive(Duration::from_secs(600));
        o.set_clean_session(true);
        o.set_inflight(inflight);
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = Client::new(o, 1024);
        nodelay(&mut conn);
        let acks = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(None));
        let (a, f) = (Arc::clone(&acks), Arc::clone(&failed));
        let thread = std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))
                    | Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Ok(_) => {}
                    Err(e) => {
                        // No reconnect: a PUBACK must belong to this connection.
                        if let Ok(mut f) = f.lock() {
                            f.get_or_insert(e.to_string());
                        }
                        return;
                    }
                }
            }
        });
        Ok(Publisher {
            client,
            acks,
            failed,
            thread: Some(thread),
        })
    }

    fn publish(&self, i: usize) -> Res<()> {
        self.client
            .publish(
                peer_topic(i),
                QoS::AtLeastOnce,
                false,
                value(i).into_bytes(),
            )
            .map_err(|e| {
                let why = self.failed.lock().ok().and_then(|f| f.clone());
                format!(
                    "publish {i}: {e} (connection: {}; {} PUBACKs)",
                    why.unwrap_or_default(),
                    self.acks.load(Ordering::SeqCst)
                )
            })
    }

    /// Waits for `n` PUBACKs in all; returns how many came.
    fn wait_acks(&self, n: u64) -> Res<u64> {
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        loop {
            let a = self.acks.load(Ordering::SeqCst);
            if a >= n {
                return Ok(a);
            }
            if let Ok(f) = self.failed.lock()
                && let Some(e) = f.as_ref()
            {
                return Err(format!("publisher: {e} after {a} PUBACKs"));
            }
            if Instant::now() > deadline {
                return Err(format!("{a} of {n} PUBACKs in {DELIVERY_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn close(&mut self) {
        let _ = self.client.disconnect();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.close();
    }
}

// ---------------------------------------------------------------------------------------------
// Group 1: backlog runs.

#[derive(Debug, Default, Clone, Copy)]
struct Run {
    /// Changes acknowledged to the local publisher per second, cloud down.
    ingest: f64,
    /// Restore → the first change at the cloud.
    first_ms: f64,
    /// Changes per second from the first change at the cloud to the last.
    drain: f64,
    /// Restore → the cloud holds every change.
    total_ms: f64,
    /// Changes per second from the restore (the link's return) to the last new change at
    /// the cloud: the drain with the reconnect and the first message in it.
    from_return: f64,
    /// `VmHWM` once every change is acknowledged, before the cloud comes back: the peak
    /// while taking in and holding the backlog.
    held_rss: f64,
    /// `VmHWM` at the end: the peak of the whole run, the drain included.
    peak_rss: f64,
    /// Bytes the backlog's file takes on disk (allocated blocks, what `du` shows), per change.
    disk_per_change: f64,
    /// The file's apparent size per change: larger when the file has holes (redb grows its
    /// file by doubling with `set_len`, and the part not written yet takes no blocks).
    file_per_change: f64,
    /// CPU seconds of the local component (agent or local Mosquitto) per 10^6 changes:
    /// taking them in, and delivering them.
    cpu_ingest: f64,
    cpu_drain: f64,
    /// Messages at the cloud (batches for edgesync).
    messages: usize,
    /// Set when the peer ran out of its time budget; the rates above are then the ones it
    /// reached, and the figures of a phase not run are NaN.
    ingest_cut: Option<Cut>,
    drain_cut: Option<Cut>,
}

/// A phase stopped at its time budget: `done` of `of` changes in `secs`, using `cpu`
/// seconds of the local component's CPU.
#[derive(Debug, Clone, Copy)]
struct Cut {
    done: usize,
    of: usize,
    secs: f64,
    cpu: f64,
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "did not complete: {} of {} in {:.0} s ({:.1} s of CPU)",
            self.done, self.of, self.secs, self.cpu
        )
    }
}

impl Run {
    fn cut(&self) -> Option<Cut> {
        self.ingest_cut.or(self.drain_cut)
    }
}

/// The runs of edgesync and of the peer at one backlog size.
type Pair = (Vec<Run>, Vec<Run>);

fn ticks_to_s(t: u64) -> f64 {
    t as f64 / clock_ticks_per_sec() as f64
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// Bytes allocated to a file on disk (`st_blocks` × 512): what it takes from the device.
fn disk_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or(0, |m| m.blocks() * 512)
}

/// Waits for all `n` changes at the cloud. Without a `budget` (edgesync) a drain that does
/// not complete is an error; with one (the peer) running out of it, or stalling, is recorded
/// as a [`Cut`] so that the run goes on.
fn finish_drain(
    r: &mut Run,
    cloud: &Cloud,
    n: usize,
    restore: Instant,
    budget: Option<Duration>,
) -> Res<()> {
    let limit = budget.unwrap_or(DELIVERY_TIMEOUT);
    let mut progress = (0, Instant::now());
    loop {
        let d = cloud.distinct();
        if d >= n {
            break;
        }
        if d != progress.0 {
            progress = (d, Instant::now());
        }
        // A stall counts only once the drain started: the bridge may take a while to connect.
        let stalled = d > 0 && progress.1.elapsed() > DRAIN_STALL;
        if restore.elapsed() > limit || stalled {
            let secs = restore.elapsed().as_secs_f64();
            if budget.is_none() {
                return Err(format!(
                    "the cloud has {d} of {n} changes after {secs:.0} s"
                ));
            }
            r.drain_cut = Some(Cut {
                done: d,
                of: n,
                secs,
                cpu: f64::NAN,
            });
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = cloud.state.lock().map_err(|_| "cloud state poisoned")?;
    r.messages = s.messages;
    r.first_ms = s
        .first_msg
        .map_or(f64::NAN, |f| (f - restore).as_secs_f64() * 1e3);
    match (r.drain_cut, s.first_msg, s.last_new) {
        (None, Some(first), Some(last)) => {
            r.total_ms = (last - restore).as_secs_f64() * 1e3;
            r.drain = n as f64 / (last - first).as_secs_f64().max(1e-6);
            r.from_return = n as f64 / (last - restore).as_secs_f64().max(1e-6);
        }
        (None, ..) => return Err("no change at the cloud".into()),
        // The rate it reached, from its first message to the end of the budget.
        (Some(c), Some(first), _) => {
            r.total_ms = f64::NAN;
            let t = (restore + Duration::from_secs_f64(c.secs)).saturating_duration_since(first);
            r.drain = c.done as f64 / t.as_secs_f64().max(1e-6);
            r.from_return = c.done as f64 / c.secs.max(1e-6);
        }
        (Some(_), None, _) => {
            r.total_ms = f64::NAN;
            r.drain = 0.0;
        }
    }
    Ok(())
}

fn edgesync_backlog(n: usize, input: &[u8], store_extra: &str) -> Res<Run> {
    let mut r = Run::default();
    let w = World::new()?;
    w.proxy.cut();
    let cloud = Cloud::start(
        &w,
        &format!("edgesync/{DEVICE}/reported"),
        "cloud-e",
        Format::Batch,
        n,
    )?;
    let mut setup = w.agent(
        "backlog",
        "reconnect_initial = \"100ms\"\nreconnect_max = \"100ms\"",
        "",
    )?;
    if !store_extra.is_empty() {
        let text = std::fs::read_to_string(&setup.config).map_err(|e| e.to_string())?;
        let text = text.replacen("[store]\n", &format!("[store]\n{store_extra}\n"), 1);
        setup = Setup::write(&w.dir.path().join("backlog"), setup.socket, &text)?;
    }
    trace("daemon");
    let mut d = Daemon::start(&setup, true)?;
    let pid = d.pid();
    trace("ingest");
    let c0 = cpu_ticks(pid)?;
    let t0 = Instant::now();
    let queued = stream(&d.socket, input)?;
    r.ingest = n as f64 / t0.elapsed().as_secs_f64();
    let c1 = cpu_ticks(pid)?;
    if queued != n as u64 {
        return Err(format!("{queued} of {n} changes acknowledged"));
    }
    let mut status = StatusConn::connect(&d.socket)?;
    if status.get()?["queue"]["depth"] != n as u64 {
        return Err("queue depth differs after the ingest".into());
    }
    let store = w.dir.path().join("backlog/edgesync.redb");
    r.disk_per_change = disk_bytes(&store) as f64 / n as f64;
    r.file_per_change = file_size(&store) as f64 / n as f64;
    r.held_rss = proc_status_kb(pid, "VmHWM")? as f64;
    trace("drain");
    let restore = Instant::now();
    w.proxy.restore();
    finish_drain(&mut r, &cloud, n, restore, None)?;
    let c2 = cpu_ticks(pid)?;
    r.peak_rss = proc_status_kb(pid, "VmHWM")? as f64;
    r.cpu_ingest = ticks_to_s(c1 - c0) * 1e6 / n as f64;
    r.cpu_drain = ticks_to_s(c2 - c1) * 1e6 / n as f64;
    d.stop()?;
    Ok(r)
}

/// The peer at one size. Its ingest and its drain may each take `budget`; past it the run is
/// recorded as cut (see [`Cut`]) and the local Mosquitto is killed.
fn peer_backlog(n: usize, inflight: u16, budget: Duration, kind: Peer) -> Res<Run> {
    let mut r = Run::default();
    let w = World::new()?;
    w.proxy.cut();
    let cloud = Cloud::start(&w, "peer/#", "cloud-p", Format::Plain, n)?;
    // Reconnect after 1 s (its smallest) so the drain is not hidden behind the default backoff.
    trace("peer broker");
    let mut m = w.peer_as(Some("1"), kind)?;
    trace("peer ingest");
    let pid = m.pid().ok_or("peer mosquitto not running")?;
    let port = m.tcp_port.ok_or("no plain listener")?;
    let mut publisher = Publisher::connect(port, inflight)?;
    let c0 = cpu_ticks(pid)?;
    let t0 = Instant::now();
    let acked = publish_within(&publisher, n, t0 + budget)?;
    let secs = t0.elapsed().as_secs_f64();
    r.ingest = acked as f64 / secs;
    let c1 = cpu_ticks(pid)?;
    if acked < n {
        r.ingest_cut = Some(Cut {
            done: acked,
            of: n,
            secs,
            cpu: ticks_to_s(c1 - c0),
        });
        r.peak_rss = proc_status_kb(pid, "VmHWM")? as f64;
        r.held_rss = r.peak_rss;
        r.cpu_ingest = ticks_to_s(c1 - c0) * 1e6 / acked.max(1) as f64;
        for f in [
            &mut r.first_ms,
            &mut r.drain,
            &mut r.total_ms,
            &mut r.from_return,
            &mut r.disk_per_change,
            &mut r.file_per_change,
            &mut r.cpu_drain,
        ] {
            *f = f64::NAN;
        }
        // Broker first: the publisher's disconnect then fails at once instead of queueing
        // behind a full window.
        let _ = m.stop();
        publisher.close();
        return Ok(r);
    }
    r.cpu_ingest = ticks_to_s(c1 - c0) * 1e6 / n as f64;
    r.held_rss = proc_status_kb(pid, "VmHWM")? as f64;
    publisher.close();
    // What the backlog takes on disk once saved: SIGUSR1 makes Mosquitto save now (by
    // default it would only at the 1800 s autosave or at a clean shutdown).
    let db = m.dir().join("data/mosquitto.db");
    let _ = Command::new("kill")
        .arg("-USR1")
        .arg(pid.to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(120);
    while file_size(&db) == 0 {
        if Instant::now() > deadline {
            return Err("mosquitto did not save its database after SIGUSR1".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    r.disk_per_change = disk_bytes(&db) as f64 / n as f64;
    r.file_per_change = file_size(&db) as f64 / n as f64;
    let c1b = cpu_ticks(pid)?;
    trace("drain");
    let restore = Instant::now();
    w.proxy.restore();
    finish_drain(&mut r, &cloud, n, restore, Some(budget))?;
    let c2 = cpu_ticks(pid)?;
    r.peak_rss = proc_status_kb(pid, "VmHWM")? as f64;
    let cpu = ticks_to_s(c2 - c1b);
    // Per change delivered; a drain that delivered nothing has no such figure, only its
    // CPU seconds (in the cut).
    let done = r.drain_cut.map_or(n, |c| c.done);
    r.cpu_drain = if done == 0 {
        f64::NAN
    } else {
        cpu * 1e6 / done as f64
    };
    if let Some(c) = r.drain_cut.as_mut() {
        c.cpu = cpu;
    }
    let _ = m.stop();
    Ok(r)
}

/// Publishes changes 0..n until `deadline`; the PUBACKs received by then.
fn publish_within(publisher: &Publisher, n: usize, deadline: Instant) -> Res<usize> {
    // try_publish: a blocking publish could wait past the deadline behind a full window.
    let mut sent = 0;
    while sent < n && Instant::now() < deadline {
        let p = &publisher.client;
        match p.try_publish(peer_topic(sent), QoS::AtLeastOnce, false, value(sent)) {
            Ok(()) => sent += 1,
            Err(_) => {
                if let Some(e) = publisher.failed.lock().ok().and_then(|f| f.clone()) {
                    return Err(format!("publish {sent}: {e}"));
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
    while (publisher.acks.load(Ordering::SeqCst) as usize) < n && Instant::now() < deadline {
        if let Some(e) = publisher.failed.lock().ok().and_then(|f| f.clone()) {
            return Err(format!("publisher: {e}"));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(publisher.acks.load(Ordering::SeqCst) as usize)
}

/// One run on one line; a cut phase says how far it got.
fn run_line(x: &Run) -> String {
    let mut o = String::new();
    match x.ingest_cut {
        Some(c) => {
            let _ = write!(
                o,
                "ingest {c} ({:.0}/s reached), drain not run · peak RSS {:.1} MiB · CPU s/10^6 \
                 ingest {:.2}",
                x.ingest,
                x.peak_rss / MIB,
                x.cpu_ingest
            );
            return o;
        }
        None => {
            let _ = write!(
                o,
                "ingest {:.0}/s · first msg {:.0} ms · ",
                x.ingest, x.first_ms
            );
        }
    }
    match x.drain_cut {
        Some(c) => {
            let _ = write!(o, "drain {c} after the restore ({:.0}/s reached)", x.drain);
        }
        None => {
            let _ = write!(
                o,
                "drain {:.0}/s · all at cloud {:.0} ms",
                x.drain, x.total_ms
            );
        }
    }
    let _ = write!(
        o,
        " ({} msgs) · peak RSS {:.1} MiB (holding the backlog {:.1}) · disk {:.1} B/change (file size {:.1}) · CPU s/10^6: ingest {:.2} drain {:.2}",
        x.messages,
        x.peak_rss / MIB,
        x.held_rss / MIB,
        x.disk_per_change,
        x.file_per_change,
        x.cpu_ingest,
        x.cpu_drain
    );
    o
}

fn drain_from_return(r: &Run) -> f64 {
    r.from_return
}

/// 1234567 → "1.23M", for table cells.
fn si(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A scaling-table cell: the median and, over several runs, the range.
fn cell(v: &[Run], f: fn(&Run) -> f64) -> String {
    let x: Vec<f64> = v.iter().map(f).filter(|x| x.is_finite()).collect();
    if x.is_empty() {
        return "-".into();
    }
    let (lo, hi) = (
        x.iter().copied().fold(f64::INFINITY, f64::min),
        x.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    if x.len() == 1 || si(lo) == si(hi) {
        si(median(&x))
    } else {
        format!("{} ({}–{})", si(median(&x)), si(lo), si(hi))
    }
}

// ---------------------------------------------------------------------------------------------
// Group 2: kill -9 of the local component with a backlog, default settings of each.

#[derive(Debug, Default, Clone, Copy)]
struct Kill {
    acked: u64,
    delivered: usize,
}

fn edgesync_kill(n: usize, input: &[u8]) -> Res<Kill> {
    let w = World::new()?;
    w.proxy.cut();
    let cloud = Cloud::start(
        &w,
        &format!("edgesync/{DEVICE}/reported"),
        "cloud-ek",
        Format::Batch,
        n,
    )?;
    let setup = w.agent("kill", "", "")?;
    let mut d = Daemon::start(&setup, false)?;
    let acked = stream(&d.socket, input)?;
    d.kill9();
    let d = Daemon::start(&setup, false)?;
    w.proxy.restore();
    let mut status = StatusConn::connect(&d.socket)?;
    let delivered = cloud.wait_delivery(n, SETTLE, || {
        status
            .get()
            .is_ok_and(|s| s["connection"]["state"] == "online")
    });
    Ok(Kill { acked, delivered })
}

/// The peer's kill -9. The durable peer may not take all `n` within `budget`: it is killed
/// with what it acknowledged by then (printed).
fn peer_kill(n: usize, inflight: u16, kind: Peer, budget: Duration) -> Res<Kill> {
    let w = World::new()?;
    w.proxy.cut();
    let cloud = Cloud::start(&w, "peer/#", "cloud-pk", Format::Plain, n)?;
    let mut m = w.peer_as(None, kind)?;
    let port = m.tcp_port.ok_or("no plain listener")?;
    let mut publisher = Publisher::connect(port, inflight)?;
    let acked = if kind == Peer::Memory {
        for i in 0..n {
            publisher.publish(i)?;
        }
        publisher.wait_acks(n as u64)?
    } else {
        publish_within(&publisher, n, Instant::now() + budget)? as u64
    };
    // kill -9 first: closing the publisher waits for its event loop, which a wedged
    // broker holds (seen: the durable peer at 100 % CPU, no PUBACK, for 10 min).
    m.stop().map_err(|e| format!("kill -9: {e}"))?;
    publisher.close();
    m.start_again().map_err(|e| format!("peer restart: {e}"))?;
    w.proxy.restore();
    let before = w.bridge_connects();
    let delivered = cloud.wait_delivery(n, SETTLE, || w.bridge_connects() > before);
    let _ = m.stop();
    Ok(Kill { acked, delivered })
}

// ---------------------------------------------------------------------------------------------
// Group 3: online latency, report → cloud, on a fixed schedule.

/// Waits until the peer's bridge has connected to the cloud.
fn wait_bridge(w: &World) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.bridge_connects() == 0 {
        if Instant::now() > deadline {
            return Err("the bridge did not connect in 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The socket request reporting change `i` alone.
fn report_request(i: usize) -> String {
    format!(
        "{{\"op\":\"report\",\"changes\":[{{\"key\":\"sensor.{}\",\"value\":\"{}\"}}]}}\n",
        i % KEYS,
        value(i)
    )
}

/// Reads `n` answers on their own thread, so that the socket never fills; the thread
/// returns the first answer that was not `ok` (or the read error).
fn read_replies(conn: &UnixStream, n: usize) -> Res<std::thread::JoinHandle<Option<String>>> {
    let replies = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    Ok(std::thread::spawn(move || {
        let mut bad = None;
        for line in replies.lines().take(n) {
            match line {
                Ok(l) if l.starts_with("{\"ok\":true") => {}
                Ok(l) => bad = bad.or(Some(l)),
                Err(e) => return Some(e.to_string()),
            }
        }
        bad
    }))
}

/// Latency in ms of every sample after the warm-up, sorted.
fn latencies(cloud: &Cloud, sent: &[Instant]) -> Res<Vec<f64>> {
    let got = cloud.wait_delivery(sent.len(), DRAIN_STALL, || cloud.distinct() > 0);
    if got < sent.len() {
        return Err(format!("{got} of {} samples reached the cloud", sent.len()));
    }
    let s = cloud.state.lock().map_err(|_| "cloud state poisoned")?;
    let mut ms: Vec<f64> = sent
        .iter()
        .zip(&s.first)
        .skip(WARMUP)
        .filter_map(|(t, at)| Some(at.as_ref()?.saturating_duration_since(*t).as_secs_f64() * 1e3))
        .collect();
    ms.sort_by(f64::total_cmp);
    Ok(ms)
}

fn edgesync_latency(args: &Args) -> Res<Vec<f64>> {
    let n = args.samples + WARMUP;
    let w = World::new()?;
    let cloud = Cloud::start(
        &w,
        &format!("edgesync/{DEVICE}/reported"),
        "cloud-el",
        Format::Batch,
        n,
    )?;
    let setup = w.agent("latency", "", "")?;
    let mut d = Daemon::start(&setup, true)?;
    wait_online(&d)?;
    let conn = UnixStream::connect(&d.socket).map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let reader = read_replies(&conn, n)?;
    let mut writer = &conn;
    let sent = scheduled(n, args.spacing, |i| {
        writer
            .write_all(report_request(i).as_bytes())
            .map_err(|e| format!("send: {e}"))
    })?;
    if let Some(e) = reader.join().map_err(|_| "reply reader panicked")? {
        return Err(format!("report failed: {e}"));
    }
    let ms = latencies(&cloud, &sent)?;
    d.stop()?;
    Ok(ms)
}

fn peer_latency(args: &Args) -> Res<Vec<f64>> {
    let n = args.samples + WARMUP;
    let w = World::new()?;
    let cloud = Cloud::start(&w, "peer/#", "cloud-pl", Format::Plain, n)?;
    let mut m = w.peer(None)?;
    wait_bridge(&w)?;
    let port = m.tcp_port.ok_or("no plain listener")?;
    let publisher = Publisher::connect(port, args.inflight)?;
    let sent = scheduled(n, args.spacing, |i| publisher.publish(i))?;
    let ms = latencies(&cloud, &sent)?;
    drop(publisher);
    let _ = m.stop();
    Ok(ms)
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------------------------
// Group 4: a slow link. The proxy is a delay line: SLOW_DELAY each way (a 200 ms round
// trip) and SLOW_BW each way, paced, with many chunks in flight as on a long fat link.

const SLOW_BW: u64 = 250_000;
const SLOW_DELAY: Duration = Duration::from_millis(100);
/// A drain's backlog: ~0.85 MB, 3.4 s at the cap.
const SLOW_BACKLOG: usize = 6_000;
/// A drain is measured for at most this long from its first change at the cloud, so that
/// a window-bound variant (a few changes per round trip) stays short.
const SLOW_WINDOW: Duration = Duration::from_secs(6);
/// Length of an online run, after the warm-up.
const SLOW_ONLINE: Duration = Duration::from_millis(2_500);

/// The bandwidth-delay product of the slow link, in bytes.
fn slow_bdp() -> f64 {
    SLOW_BW as f64 * 2.0 * SLOW_DELAY.as_secs_f64()
}

/// One backlog drain through the slow link.
#[derive(Debug, Clone)]
struct Drain {
    label: String,
    /// `batch_max_changes`, `max_inflight`, `linger` (ms) of an edgesync run.
    knobs: Option<(usize, usize, u64)>,
    /// Changes/s from the first message at the cloud to the last new change (the changes
    /// of the first message excluded: they crossed the link before the clock started).
    rate: f64,
    /// Bytes sent up through the proxy per change delivered (TLS, MQTT, reconnect included).
    wire_per_change: f64,
    /// Upstream bytes/s over the cap, from the first change at the cloud to the end.
    utilisation: f64,
    delivered: usize,
}

fn slow_edgesync(label: &str, knobs: (usize, usize, u64), input: &[u8]) -> Res<Drain> {
    let n = SLOW_BACKLOG;
    let w = World::new()?;
    w.proxy.cut();
    let cloud = Cloud::start(
        &w,
        &format!("edgesync/{DEVICE}/reported"),
        "cloud-es",
        Format::Batch,
        n,
    )?;
    let (batch, inflight, linger) = knobs;
    let setup = w.agent(
        "slow",
        "keep_alive = \"30s\"\nreconnect_initial = \"100ms\"\nreconnect_max = \"100ms\"",
        &format!("batch_max_changes = {batch}\nmax_inflight = {inflight}\nlinger = \"{linger}ms\""),
    )?;
    let mut d = Daemon::start(&setup, false)?;
    stream(&d.socket, input)?;
    slow_link(&w);
    let out = slow_drain(label, &w, &cloud, n).map(|mut r| {
        r.knobs = Some(knobs);
        r
    });
    let _ = d.stop();
    out
}

fn slow_peer(inflight: u16) -> Res<Drain> {
    let n = SLOW_BACKLOG;
    let w = World::new()?;
    w.proxy.cut();
    let cloud = Cloud::start(&w, "peer/#", "cloud-ps", Format::Plain, n)?;
    let mut m = w.peer(Some("1"))?;
    let port = m.tcp_port.ok_or("no plain listener")?;
    let publisher = Publisher::connect(port, inflight)?;
    for i in 0..n {
        publisher.publish(i)?;
    }
    publisher.wait_acks(n as u64)?;
    drop(publisher);
    slow_link(&w);
    let out = slow_drain("peer: Mosquitto bridge, QoS 1", &w, &cloud, n);
    let _ = m.stop();
    out
}

/// Opens the proxy as the slow link.
fn slow_link(w: &World) {
    w.proxy.bandwidth(SLOW_BW);
    w.proxy.delay(SLOW_DELAY);
    w.proxy.restore();
}

fn slow_drain(label: &str, w: &World, cloud: &Cloud, n: usize) -> Res<Drain> {
    let up0 = w.proxy.bytes_up();
    let deadline = Instant::now() + DRAIN_STALL;
    while cloud.distinct() == 0 {
        if Instant::now() > deadline {
            return Err(format!("{label}: nothing at the cloud in {DRAIN_STALL:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Link use runs from the first change at the cloud: the reconnect before it is not the
    // link's doing.
    let (t1, up1) = (Instant::now(), w.proxy.bytes_up());
    while cloud.distinct() < n && t1.elapsed() < SLOW_WINDOW {
        std::thread::sleep(Duration::from_millis(5));
    }
    let (t2, up2) = (Instant::now(), w.proxy.bytes_up());
    let s = cloud.state.lock().map_err(|_| "cloud state poisoned")?;
    let first = s.first_msg.ok_or("no message")?;
    let last = if s.distinct >= n {
        s.last_new.ok_or("no change")?
    } else {
        t2
    };
    let later = s.first.iter().flatten().filter(|at| **at > first).count();
    Ok(Drain {
        label: label.to_owned(),
        knobs: None,
        rate: later as f64 / (last - first).as_secs_f64().max(1e-6),
        wire_per_change: (up2 - up0) as f64 / s.distinct.max(1) as f64,
        utilisation: (up2 - up1) as f64 / (t2 - t1).as_secs_f64().max(1e-6) / SLOW_BW as f64,
        delivered: s.distinct,
    })
}

/// Changes arriving at a steady rate over the slow link.
#[derive(Debug, Clone)]
struct Online {
    label: String,
    per_sec: u32,
    p50: f64,
    p95: f64,
    wire_per_change: f64,
    /// MQTT PUBLISH packets sent up per change (edgesync: one per batch).
    publishes_per_change: f64,
}

fn slow_online_edgesync(label: &str, per_sec: u32, sync: &str) -> Res<Online> {
    let n = WARMUP + (SLOW_ONLINE.as_secs_f64() * f64::from(per_sec)) as usize;
    let w = World::new()?;
    slow_link(&w);
    let cloud = Cloud::start(
        &w,
        &format!("edgesync/{DEVICE}/reported"),
        "cloud-eo",
        Format::Batch,
        n,
    )?;
    let setup = w.agent("slow-online", "", sync)?;
    let mut d = Daemon::start(&setup, false)?;
    wait_online(&d)?;
    let conn = UnixStream::connect(&d.socket).map_err(|e| format!("connect: {e}"))?;
    let reader = read_replies(&conn, n)?;
    let up0 = w.proxy.bytes_up();
    let mut writer = &conn;
    let sent = scheduled(n, Duration::from_secs(1) / per_sec.max(1), |i| {
        writer
            .write_all(report_request(i).as_bytes())
            .map_err(|e| format!("send: {e}"))
    })?;
    if let Some(e) = reader.join().map_err(|_| "reply reader panicked")? {
        return Err(format!("report failed: {e}"));
    }
    let out = slow_online_finish(label, per_sec, &w, &cloud, &sent, up0);
    d.stop()?;
    out
}

fn slow_online_peer(per_sec: u32, inflight: u16) -> Res<Online> {
    let n = WARMUP + (SLOW_ONLINE.as_secs_f64() * f64::from(per_sec)) as usize;
    let w = World::new()?;
    slow_link(&w);
    let cloud = Cloud::start(&w, "peer/#", "cloud-po", Format::Plain, n)?;
    let mut m = w.peer(None)?;
    wait_bridge(&w)?;
    let port = m.tcp_port.ok_or("no plain listener")?;
    let publisher = Publisher::connect(port, inflight)?;
    let up0 = w.proxy.bytes_up();
    let sent = scheduled(n, Duration::from_secs(1) / per_sec.max(1), |i| {
        publisher.publish(i)
    })?;
    let out = slow_online_finish(
        "peer: Mosquitto bridge, QoS 1",
        per_sec,
        &w,
        &cloud,
        &sent,
        up0,
    );
    drop(publisher);
    let _ = m.stop();
    out
}

fn slow_online_finish(
    label: &str,
    per_sec: u32,
    w: &World,
    cloud: &Cloud,
    sent: &[Instant],
    up0: u64,
) -> Res<Online> {
    let n = sent.len();
    let got = cloud.wait_delivery(n, DRAIN_STALL, || true);
    if got < n {
        return Err(format!("{label}: {got} of {n} changes reached the cloud"));
    }
    let up = w.proxy.bytes_up() - up0;
    let s = cloud.state.lock().map_err(|_| "cloud state poisoned")?;
    let mut ms: Vec<f64> = sent
        .iter()
        .zip(&s.first)
        .skip(WARMUP)
        .filter_map(|(t, at)| Some(at.as_ref()?.saturating_duration_since(*t).as_secs_f64() * 1e3))
        .collect();
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| ms.get(((ms.len() as f64 * p) as usize).min(ms.len().saturating_sub(1)));
    Ok(Online {
        label: label.to_owned(),
        per_sec,
        p50: q(0.5).copied().unwrap_or(f64::NAN),
        p95: q(0.95).copied().unwrap_or(f64::NAN),
        wire_per_change: up as f64 / n as f64,
        publishes_per_change: s.messages as f64 / n as f64,
    })
}

/// The median run of `runs` by `key` (repeats of one variant).
fn slow_median<T: Clone>(mut runs: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    runs.get(runs.len() / 2).cloned()
}

// ---------------------------------------------------------------------------------------------
// Group 5: flash wear (issue 16). Bytes the local component makes the kernel write
// (`write_bytes` of /proc/PID/io: page-granular, counted when a page is dirtied) per change,
// each system on one process for every case, measured over the case after a warm-up.

/// One case of group 5: `per_report` changes in each report, `per_sec` reports a second.
struct WearCase {
    name: &'static str,
    per_report: usize,
    per_sec: u32,
    online: bool,
    /// The issue's target: bytes per change (for idle: bytes over the whole case).
    target: f64,
    target_label: &'static str,
}

const WEAR_CASES: [WearCase; 5] = [
    WearCase {
        name: "online, 1 report/s",
        per_report: 1,
        per_sec: 1,
        online: true,
        target: 12.0 * 1024.0,
        target_label: "≤ 12 KiB",
    },
    WearCase {
        name: "online, 10 reports/s",
        per_report: 1,
        per_sec: 10,
        online: true,
        target: 8.0 * 1024.0,
        target_label: "≤ 8 KiB",
    },
    WearCase {
        name: "online, bursts of 1,000 changes in one report, 1/s",
        per_report: 1000,
        per_sec: 1,
        online: true,
        target: 100.0,
        target_label: "≤ 100 B",
    },
    WearCase {
        name: "idle, no report",
        per_report: 0,
        per_sec: 0,
        online: true,
        target: 0.0,
        target_label: "0",
    },
    // Last: the link stays cut.
    WearCase {
        name: "offline (cloud cut), 1 report/s",
        per_report: 1,
        per_sec: 1,
        online: false,
        target: 8.0 * 1024.0,
        target_label: "≤ 8 KiB",
    },
];

/// Key `sensor.<i % 100>` and a 32-byte value: about 40 bytes, the issue's change.
fn wear_value(i: usize) -> String {
    format!("w-{i:030}")
}

/// `write_bytes` of /proc/PID/io.
fn write_bytes(pid: u32) -> Res<u64> {
    let path = format!("/proc/{pid}/io");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no write_bytes in {path}"))
}

/// What one system needs for group 5: its process, one report of `n` changes from `i` on,
/// the cut of its link.
trait WearTarget {
    fn pid(&self) -> u32;
    fn report(&mut self, i: usize, n: usize) -> Res<()>;
    /// Cuts the cloud and waits until the local component noticed.
    fn go_offline(&mut self) -> Res<()>;
    /// Waits until what was reported so far has left (edgesync: queue empty).
    fn settle(&mut self) -> Res<()>;
}

/// Bytes written per change (idle: bytes in all) in every case, in `WEAR_CASES` order.
fn wear_run(t: &mut dyn WearTarget, secs: u64, warmup: u64) -> Res<Vec<(f64, u64)>> {
    let mut next = 0usize;
    let mut out = Vec::new();
    for c in &WEAR_CASES {
        if !c.online {
            t.go_offline()?;
        }
        let mut run = |t: &mut dyn WearTarget, s: u64| -> Res<usize> {
            if c.per_sec == 0 {
                std::thread::sleep(Duration::from_secs(s));
                return Ok(0);
            }
            let n = usize::try_from(s * u64::from(c.per_sec)).unwrap_or(usize::MAX);
            let spacing = Duration::from_secs(1) / c.per_sec;
            let t0 = Instant::now();
            scheduled(n, spacing, |_| {
                t.report(next, c.per_report)?;
                next += c.per_report;
                Ok(())
            })?;
            // The window is n whole periods: the last report's writes fall inside it.
            let end = t0 + spacing * u32::try_from(n).unwrap_or(u32::MAX);
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
            Ok(n * c.per_report)
        };
        if c.per_sec == 0 {
            t.settle()?;
        }
        run(t, warmup)?;
        let b0 = write_bytes(t.pid())?;
        let changes = run(t, secs)?;
        let bytes = write_bytes(t.pid())? - b0;
        let per = if changes == 0 {
            bytes as f64
        } else {
            bytes as f64 / changes as f64
        };
        trace(&format!(
            "wear {}: {bytes} bytes, {changes} changes",
            c.name
        ));
        out.push((per, bytes));
    }
    Ok(out)
}

struct WearEdgesync<'a> {
    w: &'a World,
    d: Daemon,
    conn: UnixStream,
    replies: BufReader<UnixStream>,
    line: String,
    status: StatusConn,
}

impl WearTarget for WearEdgesync<'_> {
    fn pid(&self) -> u32 {
        self.d.pid()
    }

    fn report(&mut self, i: usize, n: usize) -> Res<()> {
        let mut req = String::with_capacity(32 + n * 64);
        req.push_str("{\"op\":\"report\",\"changes\":[");
        for k in i..i + n {
            if k > i {
                req.push(',');
            }
            let _ = write!(
                req,
                "{{\"key\":\"sensor.{}\",\"value\":\"{}\"}}",
                k % KEYS,
                wear_value(k)
            );
        }
        req.push_str("]}\n");
        self.conn
            .write_all(req.as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        // One report at a time: at most 10/s, the answer is quick.
        self.line.clear();
        self.replies
            .read_line(&mut self.line)
            .map_err(|e| format!("answer: {e}"))?;
        if !self.line.starts_with("{\"ok\":true") {
            return Err(format!("report failed: {}", self.line.trim_end()));
        }
        Ok(())
    }

    fn go_offline(&mut self) -> Res<()> {
        self.w.proxy.cut();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.status.get()?["connection"]["state"] == "online" {
            if Instant::now() > deadline {
                return Err("still online 30 s after the cut".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn settle(&mut self) -> Res<()> {
        let deadline = Instant::now() + DRAIN_STALL;
        while self.status.get()?["queue"]["depth"] != 0 {
            if Instant::now() > deadline {
                return Err("the queue did not empty".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

struct WearPeer<'a> {
    w: &'a World,
    m: Mosquitto,
    publisher: Publisher,
    pid: u32,
    /// PUBACKs that did not come within [`WEAR_ACK_WAIT`].
    missing: u64,
}

/// How long a report of the peer waits for its PUBACKs. One went missing once in about
/// 70,000 (while the bridge was cut): the figure is bytes written, so the run goes on.
const WEAR_ACK_WAIT: Duration = Duration::from_secs(10);

impl WearTarget for WearPeer<'_> {
    fn pid(&self) -> u32 {
        self.pid
    }

    /// MQTT has no batch: a report of n changes is n publishes, all acknowledged.
    fn report(&mut self, i: usize, n: usize) -> Res<()> {
        for k in i..i + n {
            self.publisher
                .client
                .publish(
                    peer_topic(k),
                    QoS::AtLeastOnce,
                    false,
                    wear_value(k).into_bytes(),
                )
                .map_err(|e| format!("publish {k}: {e}"))?;
        }
        let want = (i + n) as u64 - self.missing;
        let deadline = Instant::now() + WEAR_ACK_WAIT;
        loop {
            let a = self.publisher.acks.load(Ordering::SeqCst);
            if a >= want {
                return Ok(());
            }
            if let Some(e) = self.publisher.failed.lock().ok().and_then(|f| f.clone()) {
                return Err(format!("publisher: {e} after {a} PUBACKs"));
            }
            if Instant::now() > deadline {
                println!("wear peer: {} PUBACK(s) missing after {a}", want - a);
                self.missing += want - a;
                return Ok(());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn go_offline(&mut self) -> Res<()> {
        // The cut closes the bridge's connection: Mosquitto sees it at once.
        self.w.proxy.cut();
        Ok(())
    }

    fn settle(&mut self) -> Res<()> {
        Ok(())
    }
}

fn edgesync_wear(args: &Args) -> Res<Vec<(f64, u64)>> {
    let w = World::new()?;
    let setup = w.agent("wear", "", "")?;
    let d = Daemon::start(&setup, true)?;
    wait_online(&d)?;
    let conn = UnixStream::connect(&d.socket).map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let replies = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
    let status = StatusConn::connect(&d.socket)?;
    let mut t = WearEdgesync {
        w: &w,
        d,
        conn,
        replies,
        line: String::new(),
        status,
    };
    let out = wear_run(&mut t, args.wear_secs, args.wear_warmup);
    t.d.stop()?;
    out
}

fn peer_wear(args: &Args) -> Res<Vec<(f64, u64)>> {
    let w = World::new()?;
    let m = w.peer(None)?;
    wait_bridge(&w)?;
    let port = m.tcp_port.ok_or("no plain listener")?;
    let pid = m.pid().ok_or("peer mosquitto not running")?;
    let publisher = Publisher::connect(port, args.inflight)?;
    let mut t = WearPeer {
        w: &w,
        m,
        publisher,
        pid,
        missing: 0,
    };
    let out = wear_run(&mut t, args.wear_secs, args.wear_warmup);
    t.publisher.close();
    let _ = t.m.stop();
    out
}

// ---------------------------------------------------------------------------------------------
// The chart: hand-written SVG.

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One throughput point: the median rate, and a label if the phase ran out of its budget.
type Point = (f64, Option<String>);

/// Throughput against backlog size (log-log) on the left, latency CDF on the right. A point
/// with a label did not complete: hollow, joined by a dotted line, the label beside it.
fn svg(
    machine_line: &str,
    sizes: &[usize],
    series: &[(&str, &str, bool, Vec<Point>)],
    lat: &[(&str, &str, Vec<f64>)],
) -> String {
    let (w, h) = (960.0, 450.0);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(o, "<rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>");
    let _ = writeln!(
        o,
        "<text x=\"480\" y=\"20\" text-anchor=\"middle\" font-size=\"15\">edgesync vs Mosquitto + bridge (medians, same run)</text>"
    );
    let _ = writeln!(
        o,
        "<text x=\"480\" y=\"440\" text-anchor=\"middle\" fill=\"#555\">{}</text>",
        esc(machine_line)
    );
    // Left panel.
    let (x0, y0, pw, ph) = (70.0, 50.0, 360.0, 300.0);
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.3.iter().map(|p| p.0))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    // Headroom above the highest point for the legend.
    let hi = (all.iter().copied().fold(0.0, f64::max) * 3.0).max(lo * 10.0);
    let (dlo, dhi) = (lo.log10().floor(), hi.log10().ceil());
    let (slo, shi) = (
        (*sizes.first().unwrap_or(&1) as f64).log10(),
        (*sizes.last().unwrap_or(&10) as f64).log10(),
    );
    let sx = |s: f64| x0 + (s.log10() - slo) / (shi - slo).max(1e-9) * pw;
    let sy = |v: f64| y0 + ph - (v.log10() - dlo) / (dhi - dlo).max(1e-9) * ph;
    let _ = writeln!(
        o,
        "<rect x=\"{x0}\" y=\"{y0}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>"
    );
    let _ = writeln!(
        o,
        "<text x=\"{}\" y=\"42\" text-anchor=\"middle\">throughput vs backlog size (changes/s, log-log)</text>",
        x0 + pw / 2.0
    );
    let mut d = dlo;
    while d <= dhi {
        let y = sy(10f64.powf(d));
        let _ = writeln!(
            o,
            "<line x1=\"{x0}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">1e{d}</text>",
            x0 + pw,
            x0 - 5.0,
            y + 4.0
        );
        d += 1.0;
    }
    for &s in sizes {
        let x = sx(s as f64);
        let _ = writeln!(
            o,
            "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">1e{:.0}</text>",
            y0 + ph + 16.0,
            (s as f64).log10()
        );
    }
    let _ = writeln!(
        o,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">queued changes</text>",
        x0 + pw / 2.0,
        y0 + ph + 34.0
    );
    for (i, (name, colour, dashed, v)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64, &Option<String>)> = sizes
            .iter()
            .zip(v)
            .filter(|(_, p)| p.0.is_finite() && (p.0 > 0.0 || p.1.is_some()))
            // A cut phase that moved nothing sits on the bottom edge.
            .map(|(s, p)| {
                let y = if p.0 > 0.0 { sy(p.0) } else { y0 + ph };
                (sx(*s as f64), y, &p.1)
            })
            .collect();
        let dash = if *dashed {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        let line = |a: &[(f64, f64, &Option<String>)]| {
            a.iter()
                .map(|(x, y, _)| format!("{x:.1},{y:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let done = pts.iter().take_while(|p| p.2.is_none()).count();
        let _ = writeln!(
            o,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"{dash}/>",
            line(&pts[..done])
        );
        if done < pts.len() {
            let _ = writeln!(
                o,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1\" stroke-dasharray=\"1 3\"/>",
                line(&pts[done.saturating_sub(1)..])
            );
        }
        for (px, py, cut) in &pts {
            match cut {
                None => {
                    let _ = writeln!(
                        o,
                        "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"3\" fill=\"{colour}\"/>"
                    );
                }
                Some(label) => {
                    // Below the point, kept inside the panel at its right edge.
                    let (tx, anchor) = if *px > x0 + pw - 40.0 {
                        (x0 + pw - 3.0, "end")
                    } else {
                        (*px, "middle")
                    };
                    let _ = writeln!(
                        o,
                        "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"4\" fill=\"white\" stroke=\"{colour}\" stroke-width=\"1.5\"/>"
                    );
                    // Above a point on the bottom edge, below any other.
                    let lines = label.lines().count() as f64;
                    let top = if *py > y0 + ph - 30.0 {
                        py - 8.0 - 11.0 * (lines - 1.0)
                    } else {
                        py + 16.0
                    };
                    for (k, l) in label.lines().enumerate() {
                        let _ = writeln!(
                            o,
                            "<text x=\"{tx:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\" font-size=\"10\" fill=\"{colour}\">{}</text>",
                            top + 11.0 * k as f64,
                            esc(l)
                        );
                    }
                }
            }
        }
        let ly = y0 + 12.0 + i as f64 * 16.0;
        let _ = writeln!(
            o,
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"2\"{dash}/><text x=\"{}\" y=\"{}\">{}</text>",
            x0 + 8.0,
            x0 + 30.0,
            x0 + 34.0,
            ly + 4.0,
            esc(name)
        );
    }
    let _ = writeln!(
        o,
        "<circle cx=\"{}\" cy=\"{}\" r=\"4\" fill=\"white\" stroke=\"#555\" stroke-width=\"1.5\"/><text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"#555\">did not complete in its time budget: the rate it reached (a drain runs only after a complete ingest)</text>",
        x0 + 19.0,
        y0 + ph + 50.0,
        x0 + 30.0,
        y0 + ph + 54.0
    );
    // Right panel: latency CDF, linear ms up to the largest p99.
    let (x1, pw2) = (540.0, 380.0);
    let xmax = lat
        .iter()
        .map(|l| pct(&l.2, 0.99))
        .filter(|v| v.is_finite())
        .fold(0.1, f64::max)
        * 1.1;
    let lx = |ms: f64| x1 + (ms / xmax).min(1.0) * pw2;
    let ly = |q: f64| y0 + ph - q * ph;
    let _ = writeln!(
        o,
        "<rect x=\"{x1}\" y=\"{y0}\" width=\"{pw2}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>"
    );
    let _ = writeln!(
        o,
        "<text x=\"{}\" y=\"42\" text-anchor=\"middle\">online latency, report → cloud (CDF, to p99)</text>",
        x1 + pw2 / 2.0
    );
    for q in [0.0, 0.25, 0.5, 0.75, 0.95, 1.0] {
        let y = ly(q);
        let _ = writeln!(
            o,
            "<line x1=\"{x1}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{q}</text>",
            x1 + pw2,
            x1 - 5.0,
            y + 4.0
        );
    }
    for k in 0..=5 {
        let ms = xmax * f64::from(k) / 5.0;
        let _ = writeln!(
            o,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{ms:.2}</text>",
            lx(ms),
            y0 + ph + 16.0
        );
    }
    let _ = writeln!(
        o,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">ms</text>",
        x1 + pw2 / 2.0,
        y0 + ph + 34.0
    );
    for (i, (name, colour, v)) in lat.iter().enumerate() {
        let step = (v.len() / 400).max(1);
        let pts: Vec<String> = v
            .iter()
            .enumerate()
            .step_by(step)
            .filter(|(_, ms)| **ms <= xmax)
            .map(|(k, ms)| format!("{:.1},{:.1}", lx(*ms), ly(k as f64 / v.len() as f64)))
            .collect();
        let _ = writeln!(
            o,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>",
            pts.join(" ")
        );
        let ty = y0 + ph - 40.0 + i as f64 * 16.0;
        let _ = writeln!(
            o,
            "<line x1=\"{}\" y1=\"{ty}\" x2=\"{}\" y2=\"{ty}\" stroke=\"{colour}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{} (p50 {:.2}, p95 {:.2} ms)</text>",
            x1 + pw2 - 230.0,
            x1 + pw2 - 208.0,
            x1 + pw2 - 204.0,
            ty + 4.0,
            esc(name),
            pct(v, 0.5),
            pct(v, 0.95)
        );
    }
    o.push_str("</svg>\n");
    o
}

// ---------------------------------------------------------------------------------------------
// Report.

/// One comparison row: medians of both, the ratio edgesync/peer, the target.
fn row(name: &str, unit: &str, e: &[f64], p: &[f64], target: &str, met: Option<bool>) -> String {
    let (me, mp) = (median(e), median(p));
    let f = |v: f64| {
        if !v.is_finite() {
            "-".to_owned()
        } else if v.abs() >= 1000.0 {
            let s = format!("{v:.0}");
            // Thousands separators for readability.
            let mut out = String::new();
            for (i, c) in s.chars().enumerate() {
                if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
                    out.push(',');
                }
                out.push(c);
            }
            out
        } else if v.abs() >= 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.3}")
        }
    };
    let ratio = if mp.is_finite() && mp != 0.0 {
        format!("{:.2}×", me / mp)
    } else {
        "-".into()
    };
    let met = match met {
        Some(true) => "yes",
        Some(false) => "**NO**",
        None => "-",
    };
    format!(
        "| {name} | {} | {} | {ratio} | {unit} | {target} | {met} |",
        f(me),
        f(mp)
    )
}

fn main() {
    common::main_of("compare", run);
}

fn run() -> Res<()> {
    let args = parse_args()?;
    let started = Instant::now();
    println!(
        "edgesync vs Mosquitto-with-bridge{}",
        if args.quick { " (--quick)" } else { "" }
    );
    let mach = machine();
    print!("{mach}");
    println!(
        "work    {KEYS} keys, {VALUE_LEN}-byte values; backlogs {:?}; kill -9 with {}; {} latency \
         samples every {:?}; {} repeats; peer publisher QoS 1 window {}",
        args.sizes, args.kill, args.samples, args.spacing, args.repeats, args.inflight
    );
    println!(
        "daemon  {} (environment of systemd/edgesync.service: {:?})",
        common::daemon_path(),
        common::unit_env()
    );
    println!("load    {} at start\n", loadavg());
    let mut table = Vec::new();
    let mut per_size: BTreeMap<usize, Pair> = BTreeMap::new();
    // The durable peer's runs per size (group 1).
    let mut durable: BTreeMap<usize, Vec<Run>> = BTreeMap::new();
    let durable_peer = (args.durable > 0 && !args.no_peer).then_some(Peer::Durable(args.durable));
    let mut lat_e = Vec::new();
    let mut lat_p = Vec::new();
    let mut lat_pool = (Vec::new(), Vec::new());

    if args.only.contains(&1) {
        // Once the peer ran out of its budget, one run per size shows it: more repeats would
        // only spend the budget again.
        let mut peer_cut = false;
        // The size at which the durable peer ran out of its budget: not run again at it or
        // above (it rewrites its whole database per save, so larger backlogs only cost more).
        let mut durable_cut: Option<usize> = None;
        for &n in &args.sizes {
            let input = ndjson(n);
            for r in 0..args.repeats {
                let e = edgesync_backlog(n, &input, &args.store_extra)
                    .map_err(|e| format!("edgesync: {e}"))?;
                println!(
                    "backlog {n} {}/{} edgesync: {} · load {}",
                    r + 1,
                    args.repeats,
                    run_line(&e),
                    loadavg()
                );
                per_size.entry(n).or_default().0.push(e);
                if let Some(kind) = durable_peer {
                    if let Some(at) = durable_cut {
                        if r == 0 && at < n {
                            println!(
                                "backlog {n} durable peer: not run (it did not complete {at} changes)"
                            );
                        }
                    } else {
                        let d = peer_backlog(n, args.inflight, args.budget, kind)
                            .map_err(|e| format!("durable peer: {e}"))?;
                        println!(
                            "backlog {n} {}/{} peer, durable: {} · load {}",
                            r + 1,
                            args.repeats,
                            run_line(&d),
                            loadavg()
                        );
                        if d.cut().is_some() {
                            durable_cut = Some(n);
                        }
                        durable.entry(n).or_default().push(d);
                    }
                }
                if args.no_peer || (peer_cut && r > 0) {
                    continue;
                }
                // One retry: a failed peer run is printed, not hidden.
                let p = peer_backlog(n, args.inflight, args.budget, Peer::Memory)
                    .or_else(|e| {
                        println!("backlog {n} peer run failed, retrying once: {e}");
                        peer_backlog(n, args.inflight, args.budget, Peer::Memory)
                    })
                    .map_err(|e| format!("peer: {e}"))?;
                println!(
                    "backlog {n} {}/{} peer    : {} · load {}",
                    r + 1,
                    args.repeats,
                    run_line(&p),
                    loadavg()
                );
                peer_cut |= p.cut().is_some();
                per_size.entry(n).or_default().1.push(p);
            }
        }
        if args.no_peer {
            for (n, (e, _)) in &per_size {
                let m = |f: fn(&Run) -> f64| median(&e.iter().map(f).collect::<Vec<f64>>());
                println!(
                    "backlog {n} edgesync medians of {}: ingest {:.0}/s · drain {:.0}/s · \
                     peak RSS holding {:.1} MiB · peak RSS draining {:.1} MiB",
                    e.len(),
                    m(|r| r.ingest),
                    m(|r| r.drain),
                    m(|r| r.held_rss / MIB),
                    m(|r| r.peak_rss / MIB),
                );
            }
        }
        // The headline: the largest size at which every peer run completed.
        let headline = per_size
            .iter()
            .rev()
            .find(|(_, (_, p))| !p.is_empty() && p.iter().all(|r| r.cut().is_none()));
        if let Some((&n, (e, p))) = headline {
            let col = |v: &[Run], f: fn(&Run) -> f64| v.iter().map(f).collect::<Vec<f64>>();
            let ratio = |f: fn(&Run) -> f64| median(&col(e, f)) / median(&col(p, f));
            table.push(format!(
                "| **against the {}, at {n} queued** | | | | | | |",
                Peer::Memory.label()
            ));
            table.push(row(
                &format!(
                    "ingest, cloud down ({n} changes): edgesync durable (fsync before the answer) vs peer in memory"
                ),
                "changes/s",
                &col(e, |r| r.ingest),
                &col(p, |r| r.ingest),
                "≥ 3× peer",
                Some(ratio(|r| r.ingest) >= 3.0),
            ));
            table.push(row(
                &format!("drain of the {n} backlog (first → last change at the cloud)"),
                "changes/s",
                &col(e, |r| r.drain),
                &col(p, |r| r.drain),
                "≥ 5× peer and ≥ 500,000",
                Some(ratio(|r| r.drain) >= 5.0 && median(&col(e, |r| r.drain)) >= 500_000.0),
            ));
            // The same drain timed from the link's return: the reconnect and the first
            // message (a whole batch for edgesync, one change for the peer) included.
            table.push(row(
                "  drain from the link's return (cloud back → every change at the cloud)",
                "changes/s",
                &col(e, drain_from_return),
                &col(p, drain_from_return),
                "-",
                None,
            ));
            table.push(row(
                "  time to first message after the cloud comes back",
                "ms",
                &col(e, |r| r.first_ms),
                &col(p, |r| r.first_ms),
                "-",
                None,
            ));
            table.push(row(
                "  cloud back → cloud holds every change",
                "ms",
                &col(e, |r| r.total_ms),
                &col(p, |r| r.total_ms),
                "-",
                None,
            ));
            table.push(row(
                "peak RSS of the local component",
                "MiB",
                &col(e, |r| r.peak_rss / MIB),
                &col(p, |r| r.peak_rss / MIB),
                "≤ 0.5× peer",
                Some(ratio(|r| r.peak_rss) <= 0.5),
            ));
            table.push(row(
                "  peak RSS holding the backlog (before the cloud comes back)",
                "MiB",
                &col(e, |r| r.held_rss / MIB),
                &col(p, |r| r.held_rss / MIB),
                "-",
                None,
            ));
            table.push(row(
                "on disk per queued change (allocated blocks)",
                "bytes",
                &col(e, |r| r.disk_per_change),
                &col(p, |r| r.disk_per_change),
                "≤ 160",
                Some(median(&col(e, |r| r.disk_per_change)) <= 160.0),
            ));
            table.push(row(
                "  on disk per queued change (file length: redb's holes counted)",
                "bytes",
                &col(e, |r| r.file_per_change),
                &col(p, |r| r.file_per_change),
                "-",
                None,
            ));
            table.push(row(
                "CPU per 10^6 changes: taking them in",
                "s",
                &col(e, |r| r.cpu_ingest),
                &col(p, |r| r.cpu_ingest),
                "-",
                None,
            ));
            table.push(row(
                "CPU per 10^6 changes: delivering them",
                "s",
                &col(e, |r| r.cpu_drain),
                &col(p, |r| r.cpu_drain),
                "-",
                None,
            ));
        }
        // Against the durable peer at the largest size it completed (else the smallest it
        // ran, with the rate it reached).
        let at = durable
            .iter()
            .rev()
            .find(|(_, d)| d.iter().all(|r| r.cut().is_none()))
            .or_else(|| durable.iter().next())
            .map(|(&n, d)| (n, d.clone()));
        if let (Some((n, d)), Some(kind)) = (at, durable_peer)
            && let Some((e, _)) = per_size.get(&n)
        {
            let col = |v: &[Run], f: fn(&Run) -> f64| v.iter().map(f).collect::<Vec<f64>>();
            let note = d
                .iter()
                .find_map(Run::cut)
                .map_or(String::new(), |c| format!(" ({c})"));
            table.push(format!(
                "| **against the {}, at {n} queued{note}** | | | | | | |",
                kind.label()
            ));
            for (name, unit, f) in [
                (
                    "ingest, cloud down",
                    "changes/s",
                    (|r: &Run| r.ingest) as fn(&Run) -> f64,
                ),
                (
                    "drain, first → last change at the cloud",
                    "changes/s",
                    |r| r.drain,
                ),
                (
                    "drain from the link's return",
                    "changes/s",
                    drain_from_return,
                ),
                (
                    "on disk per queued change (allocated blocks)",
                    "bytes",
                    |r| r.disk_per_change,
                ),
                ("on disk per queued change (file length)", "bytes", |r| {
                    r.file_per_change
                }),
                ("peak RSS of the local component", "MiB", |r| {
                    r.peak_rss / MIB
                }),
                ("CPU per 10^6 changes: taking them in", "s", |r| {
                    r.cpu_ingest
                }),
            ] {
                table.push(row(name, unit, &col(e, f), &col(&d, f), "-", None));
            }
        }
    }

    if args.only.contains(&2) {
        let input = ndjson(args.kill);
        let (mut ke, mut kp, mut kd) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..args.repeats {
            let e = edgesync_kill(args.kill, &input).map_err(|e| format!("edgesync: {e}"))?;
            let p = peer_kill(args.kill, args.inflight, Peer::Memory, args.budget)
                .map_err(|e| format!("peer: {e}"))?;
            let mut each = vec![("edgesync", e), ("peer    ", p)];
            if let Some(kind) = durable_peer {
                let d = peer_kill(args.kill, args.inflight, kind, args.budget)
                    .map_err(|e| format!("durable peer: {e}"))?;
                each.push(("peer, durable", d));
                kd.push(d);
            }
            for (who, k) in each {
                println!(
                    "kill -9 {}/{} {who}: {} acknowledged, {} delivered after restart, {} lost · load {}",
                    r + 1,
                    args.repeats,
                    k.acked,
                    k.delivered,
                    k.acked.saturating_sub(k.delivered as u64),
                    loadavg()
                );
            }
            ke.push(e);
            kp.push(p);
        }
        let lost = |v: &[Kill]| {
            v.iter()
                .map(|k| k.acked.saturating_sub(k.delivered as u64) as f64)
                .collect::<Vec<f64>>()
        };
        let worst = lost(&ke).into_iter().fold(0.0, f64::max);
        table.push(row(
            &format!(
                "acknowledged changes lost after kill -9 ({} queued)",
                args.kill
            ),
            "changes",
            &lost(&ke),
            &lost(&kp),
            "0 (every repeat)",
            Some(worst == 0.0),
        ));
        if let Some(kind) = durable_peer {
            let acked: Vec<f64> = kd.iter().map(|k: &Kill| k.acked as f64).collect();
            table.push(row(
                &format!(
                    "  the same against the {} ({} acknowledged before the kill, {} s budget)",
                    kind.label(),
                    median(&acked),
                    args.budget.as_secs()
                ),
                "changes",
                &lost(&ke),
                &lost(&kd),
                "0 (every repeat)",
                Some(worst == 0.0),
            ));
        }
    }

    if args.only.contains(&3) {
        for r in 0..args.repeats {
            let e = edgesync_latency(&args).map_err(|e| format!("edgesync: {e}"))?;
            let p = peer_latency(&args).map_err(|e| format!("peer: {e}"))?;
            println!(
                "latency {}/{}: edgesync p50 {:.3} p95 {:.3} p99 {:.3} ms · peer p50 {:.3} p95 {:.3} \
                 p99 {:.3} ms · load {}",
                r + 1,
                args.repeats,
                pct(&e, 0.5),
                pct(&e, 0.95),
                pct(&e, 0.99),
                pct(&p, 0.5),
                pct(&p, 0.95),
                pct(&p, 0.99),
                loadavg()
            );
            lat_e.push((pct(&e, 0.5), pct(&e, 0.95)));
            lat_p.push((pct(&p, 0.5), pct(&p, 0.95)));
            lat_pool.0.extend(e);
            lat_pool.1.extend(p);
        }
        let p50e: Vec<f64> = lat_e.iter().map(|l| l.0).collect();
        let p50p: Vec<f64> = lat_p.iter().map(|l| l.0).collect();
        table.push(row(
            "online latency p50, report → cloud",
            "ms",
            &p50e,
            &p50p,
            "≤ peer",
            Some(median(&p50e) <= median(&p50p)),
        ));
        table.push(row(
            "online latency p95",
            "ms",
            &lat_e.iter().map(|l| l.1).collect::<Vec<_>>(),
            &lat_p.iter().map(|l| l.1).collect::<Vec<_>>(),
            "-",
            None,
        ));
        lat_pool.0.sort_by(f64::total_cmp);
        lat_pool.1.sort_by(f64::total_cmp);
    }

    let mut slow = Vec::new();
    let mut slow_online = Vec::new();
    if args.only.contains(&4) {
        let n = SLOW_BACKLOG;
        let input = ndjson(n);
        println!(
            "slow link: {} kB/s and {:?} each way through the proxy's delay line (bandwidth-delay \
             product {:.0} kB); drains of {n} queued changes, each measured for at most {:?}",
            SLOW_BW / 1000,
            SLOW_DELAY,
            slow_bdp() / 1e3,
            SLOW_WINDOW
        );
        let mut knobs: Vec<(usize, usize, u64)> = Vec::new();
        for batch in [10, 100, 1000] {
            for inflight in [1, 2, 8, 32] {
                knobs.push((batch, inflight, 0));
            }
        }
        knobs.extend([(1000, 8, 5), (1000, 8, 50)]);
        for k in knobs {
            let label = format!(
                "edgesync: batch_max_changes {}, max_inflight {}, linger {} ms",
                k.0, k.1, k.2
            );
            let mut runs = Vec::new();
            for _ in 0..args.repeats {
                runs.push(slow_edgesync(&label, k, &input)?);
            }
            slow.extend(slow_median(runs, |r| r.rate));
        }
        let mut runs = Vec::new();
        for _ in 0..args.repeats {
            runs.push(slow_peer(args.inflight)?);
        }
        slow.extend(slow_median(runs, |r| r.rate));
        for s in &slow {
            println!(
                "  {}: {:.0} changes/s, {:.1} bytes up per change, link {:.0} % full, {} delivered",
                s.label,
                s.rate,
                s.wire_per_change,
                s.utilisation * 100.0,
                s.delivered
            );
        }
        println!("slow link online: changes at a steady rate, report → cloud latency");
        for per_sec in [200u32, 1000] {
            // linger acts only while the window has room: with 8 batches in flight for a
            // 200 ms round trip the window is always full at these rates, so it is swept
            // with a wider window too.
            for (batch, inflight, linger) in [
                (1000, 8, 0),
                (1000, 8, 5),
                (1000, 8, 50),
                (10, 8, 0),
                (1000, 2, 0),
                (1000, 32, 0),
                (1000, 32, 5),
                (1000, 32, 50),
            ] {
                let label = format!(
                    "edgesync: batch_max_changes {batch}, max_inflight {inflight}, linger {linger} ms"
                );
                let sync = format!(
                    "batch_max_changes = {batch}\nmax_inflight = {inflight}\nlinger = \"{linger}ms\""
                );
                let mut runs = Vec::new();
                for _ in 0..args.repeats {
                    runs.push(slow_online_edgesync(&label, per_sec, &sync)?);
                }
                slow_online.extend(slow_median(runs, |r| r.p50));
            }
            let mut runs = Vec::new();
            for _ in 0..args.repeats {
                runs.push(slow_online_peer(per_sec, args.inflight)?);
            }
            slow_online.extend(slow_median(runs, |r| r.p50));
        }
        for o in &slow_online {
            println!(
                "  {} at {}/s: p50 {:.0} ms, p95 {:.0} ms, {:.1} bytes up and {:.3} PUBLISH per change",
                o.label, o.per_sec, o.p50, o.p95, o.wire_per_change, o.publishes_per_change
            );
        }
        println!("load    {} after the slow link", loadavg());
    }

    if args.only.contains(&5) {
        println!(
            "flash wear: write_bytes of /proc/PID/io of the agent / the local Mosquitto \
             (persistence true, autosave_interval 1800: no fsync per message), {} s per case \
             after {} s of warm-up, one ~40-byte change per report",
            args.wear_secs, args.wear_warmup
        );
        let (mut we, mut wp) = (Vec::new(), Vec::new());
        for r in 0..args.repeats {
            let e = edgesync_wear(&args).map_err(|e| format!("edgesync: {e}"))?;
            let p = peer_wear(&args).map_err(|e| format!("peer: {e}"))?;
            for (c, (e, p)) in WEAR_CASES.iter().zip(e.iter().zip(&p)) {
                println!(
                    "wear {}/{} {}: edgesync {:.0} ({} bytes) · peer {:.0} ({} bytes) · load {}",
                    r + 1,
                    args.repeats,
                    c.name,
                    e.0,
                    e.1,
                    p.0,
                    p.1,
                    loadavg()
                );
            }
            we.push(e);
            wp.push(p);
        }
        for (k, c) in WEAR_CASES.iter().enumerate() {
            let col = |v: &[Vec<(f64, u64)>]| v.iter().map(|r| r[k].0).collect::<Vec<f64>>();
            let unit = if c.per_sec == 0 {
                "bytes in the case"
            } else {
                "bytes/change"
            };
            table.push(row(
                &format!("flash wear: {}", c.name),
                unit,
                &col(&we),
                &col(&wp),
                c.target_label,
                Some(median(&col(&we)) <= c.target),
            ));
        }
    }

    if !per_size.is_empty() {
        println!(
            "\nscaling with backlog size: median (min–max) of the runs; a peer phase past its \
             {} s budget shows the rate it reached\n",
            args.budget.as_secs()
        );
        println!(
            "| queued | runs | ingest/s | drain/s | drain/s from the link's return | first msg ms | peak RSS MiB | B/change on disk: blocks (file length) | CPU µs/change |"
        );
        println!("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        let none = Vec::new();
        for (n, (e, p)) in &per_size {
            let d = durable.get(n).unwrap_or(&none);
            for (who, v) in [("edgesync", e), ("peer", p), ("peer, durable", d)] {
                if v.is_empty() {
                    continue;
                }
                let note = v.iter().find_map(Run::cut).map_or(String::new(), |c| {
                    let phase = if v.iter().any(|r| r.ingest_cut.is_some()) {
                        "ingest"
                    } else {
                        "drain"
                    };
                    format!(" · {phase} {c}")
                });
                println!(
                    "| {n} | {who} ×{}{note} | {} | {} | {} | {} | {} | {} ({}) | {} |",
                    v.len(),
                    cell(v, |r| r.ingest),
                    cell(v, |r| r.drain),
                    cell(v, drain_from_return),
                    cell(v, |r| r.first_ms),
                    cell(v, |r| r.peak_rss / MIB),
                    cell(v, |r| r.disk_per_change),
                    cell(v, |r| r.file_per_change),
                    cell(v, |r| if r.ingest_cut.is_some() {
                        r.cpu_ingest
                    } else {
                        r.cpu_ingest + r.cpu_drain
                    }),
                );
            }
        }
    }
    if !slow.is_empty() {
        println!(
            "\nslow link ({} kB/s and {:?} each way, delay line; bandwidth-delay product {:.0} kB), \
             drain of {SLOW_BACKLOG} queued changes:\n",
            SLOW_BW / 1000,
            SLOW_DELAY,
            slow_bdp() / 1e3
        );
        println!(
            "| variant | changes/s | link capacity changes/s | bytes up per change | link use | delivered in {:?} |",
            SLOW_WINDOW
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        for s in slow
            .iter()
            .filter(|s| s.knobs.is_none_or(|k| k == (1000, 8, 0)))
        {
            println!(
                "| {} | {:.0} | {:.0} | {:.1} | {:.0} % | {} |",
                s.label,
                s.rate,
                SLOW_BW as f64 / s.wire_per_change,
                s.wire_per_change,
                s.utilisation * 100.0,
                s.delivered
            );
        }
        // Window = max_inflight batches; a window of at least the bandwidth-delay product
        // (plus one batch, sent while the first PUBACK travels) keeps the link full.
        println!(
            "\n| batch_max_changes | max_inflight | linger | window kB | window / BDP | model link use | changes/s | link use |"
        );
        println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for s in &slow {
            let Some((batch, inflight, linger)) = s.knobs else {
                continue;
            };
            let b = batch as f64 * s.wire_per_change;
            let window = inflight as f64 * b;
            let model = (window / (slow_bdp() + b)).min(1.0);
            println!(
                "| {batch} | {inflight} | {linger} ms | {:.1} | {:.2} | {:.0} % | {:.0} | {:.0} % |",
                window / 1e3,
                window / slow_bdp(),
                model * 100.0,
                s.rate,
                s.utilisation * 100.0
            );
        }
    }
    if !slow_online.is_empty() {
        println!(
            "\nslow link online ({:?} after {WARMUP} warm-up changes per run; latency = report \
             written → change at the cloud subscriber, one way of the link):\n",
            SLOW_ONLINE
        );
        println!(
            "| variant | changes/s | p50 ms | p95 ms | bytes up per change | PUBLISH per change |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        for o in &slow_online {
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.1} | {:.3} |",
                o.label, o.per_sec, o.p50, o.p95, o.wire_per_change, o.publishes_per_change
            );
        }
    }
    if !table.is_empty() {
        println!("\n| figure | edgesync | peer | edgesync/peer | unit | target | met? |");
        println!("| --- | ---: | ---: | ---: | --- | --- | --- |");
        for r in &table {
            println!("{r}");
        }
    }

    if let Some(path) = &args.svg
        && !per_size.is_empty()
    {
        let sizes: Vec<usize> = per_size.keys().copied().collect();
        // Medians per size; a phase cut in any run is drawn as cut, at the rate it reached.
        let m = |pick: fn(&Pair) -> &Vec<Run>,
                 f: fn(&Run) -> f64,
                 cut: fn(&Run) -> Option<Cut>|
         -> Vec<Point> {
            per_size
                .values()
                .map(|v| {
                    let runs = pick(v);
                    let label = runs.iter().find_map(cut).map(|c| {
                        format!(
                            "{} % done\nof 1e{:.0} in {:.0} s",
                            c.done * 100 / c.of.max(1),
                            (c.of as f64).log10(),
                            c.secs
                        )
                    });
                    (median(&runs.iter().map(f).collect::<Vec<_>>()), label)
                })
                .collect()
        };
        let series = [
            (
                "edgesync drain",
                "#1f77b4",
                false,
                m(|v| &v.0, |r| r.drain, |r| r.drain_cut),
            ),
            (
                "edgesync ingest",
                "#1f77b4",
                true,
                m(|v| &v.0, |r| r.ingest, |r| r.ingest_cut),
            ),
            (
                "peer drain",
                "#d62728",
                false,
                m(|v| &v.1, |r| r.drain, |r| r.drain_cut),
            ),
            (
                "peer ingest",
                "#d62728",
                true,
                m(|v| &v.1, |r| r.ingest, |r| r.ingest_cut),
            ),
        ];
        let lat = [
            ("edgesync", "#1f77b4", lat_pool.0.clone()),
            ("peer", "#d62728", lat_pool.1.clone()),
        ];
        let cpu = mach
            .lines()
            .next()
            .unwrap_or("")
            .trim_start_matches("cpu")
            .trim();
        let line = format!(
            "{cpu}, {} cores · Mosquitto local broker + bridge vs edgesync · {} repeats",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            args.repeats
        );
        std::fs::write(path, svg(&line, &sizes, &series, &lat))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        println!("\nchart written to {}", path.display());
    }
    println!(
        "\ndone in {:.0} s; load {} at the end",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    Ok(())
}
