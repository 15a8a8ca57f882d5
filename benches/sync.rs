//! Sync benchmark: the real daemon (`edgesync run`) shipping its outbox to Mosquitto over
//! mutual TLS, against the targets of docs/BENCHMARKS-sync.md.
//!
//! ```text
//! cargo bench --bench sync                        # full run, 3 repeats (~3-4 min on 2 cores)
//! cargo bench --bench sync -- --quick             # smaller counts, 10 s offline window
//! cargo bench --bench sync -- --repeats 5 --only 1,3
//! EDGESYNC_BENCH_WRAPPER="perf record -g -o /tmp/p.data" cargo bench --bench sync -- --only 1
//! EDGESYNC_BENCH_PERF_DRAIN=/tmp/drain.data cargo bench --bench sync -- --only 1   # drain only
//! ```
//!
//! Every repeat of every figure starts a fresh Mosquitto (`require_certificate true`), a
//! fresh daemon on a fresh store in a new temporary directory, and a "cloud" subscriber
//! (rumqttc, QoS 1, its own client certificate) on `edgesync/<device>/reported`.
//! 1. **Drain.** The daemon points at a [`FaultProxy`] in front of Mosquitto that is cut,
//!    so it cannot reach the broker; N changes (100-character string values, 100 distinct
//!    keys) go in through `client::report_stream` (the code of `edgesync report --stdin`).
//!    Then the proxy is restored, and the drain is timed from that instant until the
//!    daemon's `status` shows `queue.depth == 0` (every change PUBACKed and deleted),
//!    polled every 2 ms on one socket connection. The daemon uses `reconnect_initial =
//!    reconnect_max = "100ms"` here, so the reconnect after the restore waits 0-100 ms
//!    (full jitter): that wait is inside the figure and reported on its own. Afterwards
//!    the cloud's messages are checked: the distinct seqs must be exactly 1..=N.
//! 2. **Peak RSS** (`VmHWM`) of the daemon after the ingest, then reset (`clear_refs` 5)
//!    and read again after the drain, so the drain figure is the drain's own peak.
//! 3. **Online latency.** The daemon connects straight to Mosquitto (default settings,
//!    fsync per commit). One change per request on one socket connection, sent every 2 ms
//!    on a fixed schedule (never waiting), each value carrying its sample number; latency
//!    is from the write of the request to the cloud subscriber's receipt of the batch
//!    holding it. The floor: a rumqttc client publishing the same size QoS 1 message on the
//!    same schedule to the same Mosquitto, publish call to receipt.
//! 4. **Offline CPU.** One daemon per repeat, all at once, each pointed at its own cut
//!    proxy with the default reconnect backoff (1 s doubling to 120 s, full jitter); after
//!    its first failed attempt plus 1 s, utime+stime (`/proc/<pid>/stat`) over 60 s (10 s
//!    with `--quick`, scaled to 60 s).

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Daemon, KEYS, MIB, Res, Setup, StatusConn, Subscriber, VALUE_LEN, batch_changes,
    clock_ticks_per_sec, cpu_ticks, loadavg, machine, median, mqtt_options, ndjson, nodelay,
    pki_and_mosquitto, proc_status_kb, scheduled, stream, value, wait_online,
};
use edgesync_testkit::{FaultProxy, Mosquitto, TestPki};
use rumqttc::{Client, Event, Publish, QoS};

const DEVICE: &str = "bench-sync";
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// Latency samples discarded at the start (first publish after connect, cold caches).
const WARMUP: usize = 20;

const USAGE: &str =
    "usage: cargo bench --bench sync -- [--quick] [--repeats N] [--only 1,3,4] [--changes N]
       [--store-extra 'cache_size = \"1MiB\"'] [--sync-extra 'max_inflight = 4']

  --quick        200k-change backlog, 500 latency samples, 10 s offline window
  --repeats N    repeats of every figure (default 3)
  --only LIST    figure groups: 1 (figures 1 and 2: drain and its RSS), 3 (latency), 4 (offline CPU)
  --changes N    backlog of figure 1 (default 1000000, 200000 with --quick)
  --store-extra  a TOML line added to the daemons' [store] section
  --sync-extra   a TOML line added to the daemons' [sync] section
env EDGESYNC_BENCH_WRAPPER=\"CMD ARGS\" runs the daemon of figures 1-3 under CMD (perf record, ...)";

#[derive(Debug, Clone)]
struct Args {
    quick: bool,
    repeats: usize,
    changes: usize,
    samples: usize,
    spacing: Duration,
    offline: Duration,
    only: Vec<u8>,
    store_extra: String,
    sync_extra: String,
}

fn parse_args() -> Res<Args> {
    let mut quick = false;
    let mut repeats = 3;
    let mut changes = None;
    let mut only = vec![1, 3, 4];
    let mut store_extra = String::new();
    let mut sync_extra = String::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--repeats" => {
                let v = it.next().ok_or("--repeats needs a number")?;
                repeats = v
                    .parse::<usize>()
                    .map_err(|_| format!("--repeats {v:?}: not a number"))?
                    .max(1);
            }
            "--changes" => {
                let v = it.next().ok_or("--changes needs a number")?;
                changes = Some(
                    v.parse::<usize>()
                        .map_err(|_| format!("--changes {v:?}: not a number"))?
                        .max(1),
                );
            }
            "--only" => {
                let v = it.next().ok_or("--only needs a list like 1,3")?;
                only = v
                    .split(',')
                    .map(|p| match p.trim() {
                        "1" | "2" => Ok(1),
                        "3" => Ok(3),
                        "4" => Ok(4),
                        _ => Err(format!("--only {v:?}: figures are 1 to 4")),
                    })
                    .collect::<Res<Vec<u8>>>()?;
            }
            "--store-extra" => {
                store_extra = it.next().ok_or("--store-extra needs a TOML line")?;
            }
            "--sync-extra" => {
                sync_extra = it.next().ok_or("--sync-extra needs a TOML line")?;
            }
            // `cargo bench` passes --bench to every bench target.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(Args {
        quick,
        repeats,
        changes: changes.unwrap_or(if quick { 200_000 } else { 1_000_000 }),
        samples: if quick { 500 } else { 2000 },
        spacing: Duration::from_millis(2),
        offline: Duration::from_secs(if quick { 10 } else { 60 }),
        only,
        store_extra,
        sync_extra,
    })
}

// ---------------------------------------------------------------------------------------------
// The world of one repeat: certificates, Mosquitto, a temporary directory.

struct World {
    dir: tempfile::TempDir,
    pki: TestPki,
    mosq: Mosquitto,
    store_extra: String,
    sync_extra: String,
}

impl World {
    fn new(args: &Args) -> Res<World> {
        let (mut dir, pki, mosq) = pki_and_mosquitto("edgesync-syncbench-", DEVICE, Vec::new())?;
        if std::env::var_os("EDGESYNC_BENCH_KEEP").is_some() {
            // For digging into the daemon logs afterwards.
            eprintln!("keeping {}", dir.path().display());
            dir.disable_cleanup(true);
        }
        Ok(World {
            dir,
            pki,
            mosq,
            store_extra: args.store_extra.clone(),
            sync_extra: args.sync_extra.clone(),
        })
    }

    /// Writes a daemon config talking to `port`; returns (config path, socket path, log path).
    fn agent_config(&self, name: &str, port: u16, extra_mqtt: &str) -> Res<Setup> {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // sun_path is short: the socket stays directly under /tmp.
        let socket = PathBuf::from(format!("/tmp/ess-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let text = format!(
            "[device]\nid = \"{DEVICE}\"\n\n\
             [mqtt]\nurl = \"mqtts://localhost:{port}\"\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n{extra_mqtt}\n\n\
             [store]\npath = \"edgesync.redb\"\nmax_bytes = \"2GiB\"\nwhen_full = \"reject\"\n{store_extra}\n\n\
             [sync]\n{sync_extra}\n\n\
             [local]\nsocket = {socket:?}\n",
            store_extra = self.store_extra,
            sync_extra = self.sync_extra,
            ca = self.pki.ca,
            cert = self.pki.client_cert,
            key = self.pki.client_key,
        );
        Setup::write(&dir, socket, &text)
    }
}

// ---------------------------------------------------------------------------------------------
// /proc figures.

/// Where the RSS of a process is: anon/file totals and the largest mappings (debugging aid).
fn rss_breakdown(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mut out: String = status
        .lines()
        .filter(|l| l.starts_with("Rss") || l.starts_with("VmHWM") || l.starts_with("Threads"))
        .map(|l| format!("{l}\n"))
        .collect();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut maps: Vec<(u64, String)> = Vec::new();
    let mut name = String::new();
    for l in smaps.lines() {
        if l.split_whitespace()
            .next()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            let f: Vec<&str> = l.split_whitespace().collect();
            name = format!("{} {}", f[0], f.get(5).copied().unwrap_or("[anon]"));
        } else if let Some(v) = l.strip_prefix("Rss:") {
            let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            maps.push((kb, name.clone()));
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.0));
    for (kb, n) in maps.iter().take(12) {
        let _ = writeln!(out, "{kb:>8} kB {n}");
    }
    out
}

/// Resets the peak RSS (`VmHWM`) of a process to its current RSS. False if not allowed.
fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// CPU ns of the live threads of a process (`schedstat`), finer than ticks.
fn cpu_ns_live(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| {
            std::fs::read_to_string(t.path().join("schedstat"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Voluntary + involuntary context switches of the live threads of a process.
fn ctx_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))?
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

// ---------------------------------------------------------------------------------------------
// The cloud: a subscriber on Mosquitto recording every message with its arrival time.

struct Cloud {
    msgs: Arc<Mutex<Vec<(Instant, Publish)>>>,
    _sub: Subscriber,
}

impl Cloud {
    fn start(pki: &TestPki, port: u16, filter: &str, name: &str) -> Res<Cloud> {
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&msgs);
        let sub = Subscriber::start(mqtt_options(pki, port, name)?, filter, move |at, p| {
            if let Ok(mut m) = sink.lock() {
                m.push((at, p));
            }
        })?;
        Ok(Cloud { msgs, _sub: sub })
    }

    /// Messages received so far (cheap clones: payloads are shared).
    fn messages(&self) -> Vec<(Instant, Publish)> {
        self.msgs.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn len(&self) -> usize {
        self.msgs.lock().map(|m| m.len()).unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Figures 1 and 2: drain of a backlog.

#[derive(Debug, Default, Clone)]
struct Drain {
    ingest_rate: f64,
    hwm_ingest: f64,
    hwm_drain: f64,
    hwm_reset: bool,
    rate: f64,
    to_online_ms: f64,
    first_msg_ms: f64,
    /// Rate from the first message at the cloud to an empty queue.
    rate_from_first: f64,
    /// Restore to the cloud holding every change.
    cloud_all_ms: f64,
    messages: usize,
    agent_cpu_us: f64,
    broker_cpu_us: f64,
    bench_cpu_us: f64,
}

fn drain(args: &Args, input: &[u8]) -> Res<Drain> {
    let n = args.changes;
    let mut r = Drain::default();
    let world = World::new(args)?;
    let proxy = FaultProxy::start(world.mosq.tls_addr()).map_err(|e| format!("proxy: {e}"))?;
    proxy.cut();
    let cloud = Cloud::start(
        &world.pki,
        world.mosq.tls_port,
        &format!("edgesync/{DEVICE}/reported"),
        "cloud-drain",
    )?;
    let setup = world.agent_config(
        "drain",
        proxy.port(),
        "keep_alive = \"30s\"\nreconnect_initial = \"100ms\"\nreconnect_max = \"100ms\"",
    )?;
    let mut d = Daemon::start(&setup, true)?;
    let pid = d.pid();

    let t0 = Instant::now();
    let queued = stream(&d.socket, input)?;
    r.ingest_rate = n as f64 / t0.elapsed().as_secs_f64();
    if queued != n as u64 {
        return Err(format!("{queued} of {n} changes acknowledged"));
    }
    let mut status = StatusConn::connect(&d.socket)?;
    let s = status.get()?;
    if s["queue"]["depth"] != n as u64 {
        return Err(format!("queue depth {} after ingest", s["queue"]["depth"]));
    }
    if s["connection"]["state"] == "online" {
        return Err("the daemon reached the broker through a cut proxy".into());
    }
    if cloud.len() != 0 {
        return Err("the cloud got messages before the restore".into());
    }
    r.hwm_ingest = proc_status_kb(pid, "VmHWM")? as f64;
    if std::env::var_os("EDGESYNC_BENCH_SMAPS").is_some() {
        eprintln!("after the ingest:\n{}", rss_breakdown(pid));
    }
    r.hwm_reset = reset_hwm(pid);

    let ticks0 = (
        cpu_ticks(pid)?,
        world.mosq.pid().map_or(Ok(0), cpu_ticks)?,
        cpu_ticks(std::process::id())?,
    );
    // EDGESYNC_BENCH_PERF_DRAIN=FILE: profile the daemon during the drain only.
    let perf = std::env::var("EDGESYNC_BENCH_PERF_DRAIN")
        .ok()
        .and_then(|out| {
            let child = Command::new("perf")
                .args([
                    "record",
                    "-e",
                    "cpu-clock",
                    "-F",
                    "4000",
                    "-g",
                    "-o",
                    &out,
                    "-p",
                ])
                .arg(pid.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            std::thread::sleep(Duration::from_millis(300));
            Some(child)
        });
    let t_restore = Instant::now();
    proxy.restore();
    let mut online_at = None;
    loop {
        let s = status.get()?;
        let now = Instant::now();
        if online_at.is_none() && s["connection"]["state"] == "online" {
            online_at = Some(now);
        }
        if s["queue"]["depth"] == 0 {
            break;
        }
        if now - t_restore > DRAIN_TIMEOUT {
            return Err(format!("not drained in {DRAIN_TIMEOUT:?}: {s}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let t_drained = Instant::now();
    if let Some(mut p) = perf {
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(p.id().to_string())
            .status();
        let _ = p.wait();
    }
    let ticks1 = (
        cpu_ticks(pid)?,
        world.mosq.pid().map_or(Ok(0), cpu_ticks)?,
        cpu_ticks(std::process::id())?,
    );
    r.hwm_drain = proc_status_kb(pid, "VmHWM")? as f64;
    if std::env::var_os("EDGESYNC_BENCH_SMAPS").is_some() {
        eprintln!("after the drain:\n{}", rss_breakdown(pid));
    }
    let drain_secs = (t_drained - t_restore).as_secs_f64();
    r.rate = n as f64 / drain_secs;
    r.to_online_ms = online_at.map_or(f64::NAN, |t| (t - t_restore).as_secs_f64() * 1e3);
    let tick_us = 1e6 / clock_ticks_per_sec() as f64;
    let per_change = |a: u64, b: u64| (b - a) as f64 * tick_us / n as f64;
    r.agent_cpu_us = per_change(ticks0.0, ticks1.0);
    r.broker_cpu_us = per_change(ticks0.1, ticks1.1);
    r.bench_cpu_us = per_change(ticks0.2, ticks1.2);

    let s = status.get()?;
    if s["counters"]["acked"] != n as u64 {
        return Err(format!("drained but acked = {}", s["counters"]["acked"]));
    }

    // The cloud: every change arrived (it may trail the PUBACKs a little).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = vec![false; n + 1];
    let mut distinct = 0usize;
    let mut parsed = 0usize;
    let mut complete_at = None;
    loop {
        let msgs = cloud.messages();
        for (at, p) in &msgs[parsed..] {
            if !p.topic.ends_with("/reported") {
                continue;
            }
            let changes = batch_changes(&p.payload).ok_or("undecodable batch at the cloud")?;
            for (seq, _) in changes {
                let slot = usize::try_from(seq)
                    .ok()
                    .and_then(|s| seen.get_mut(s))
                    .filter(|_| seq >= 1)
                    .ok_or_else(|| format!("seq {seq} out of 1..={n}"))?;
                if !*slot {
                    *slot = true;
                    distinct += 1;
                }
            }
            if distinct == n && complete_at.is_none() {
                complete_at = Some(*at);
            }
        }
        parsed = msgs.len();
        if let Some(first) = msgs.first() {
            r.first_msg_ms = (first.0 - t_restore).as_secs_f64() * 1e3;
            r.rate_from_first = n as f64 / (t_drained - first.0).as_secs_f64();
        }
        if distinct == n {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the cloud has {distinct} distinct seqs of {n} after 60 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    r.messages = parsed;
    r.cloud_all_ms = complete_at.map_or(f64::NAN, |t| (t - t_restore).as_secs_f64() * 1e3);
    d.stop()?;
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Figure 3: online latency, and the plain Mosquitto floor.

#[derive(Debug, Default, Clone, Copy)]
struct Lat {
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
    /// Agent CPU (live threads) and context switches per sample, for the agent's run.
    cpu_us: f64,
    switches: f64,
}

fn percentiles(mut ns: Vec<u64>) -> Lat {
    ns.sort_unstable();
    if ns.is_empty() {
        return Lat {
            p50: f64::NAN,
            p95: f64::NAN,
            p99: f64::NAN,
            max: f64::NAN,
            cpu_us: f64::NAN,
            switches: f64::NAN,
        };
    }
    let ms = |v: u64| v as f64 / 1e6;
    let pick = |q: f64| ms(ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)]);
    Lat {
        p50: pick(0.50),
        p95: pick(0.95),
        p99: pick(0.99),
        max: ms(ns[ns.len() - 1]),
        cpu_us: f64::NAN,
        switches: f64::NAN,
    }
}

/// Waits until `count()` reaches `n` (or 10 s pass).
fn wait_count(n: usize, count: impl Fn() -> usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn latency(args: &Args) -> Res<(Lat, Lat)> {
    let n = args.samples + WARMUP;
    let world = World::new(args)?;
    let topic = format!("edgesync/{DEVICE}/reported");
    let cloud = Cloud::start(&world.pki, world.mosq.tls_port, &topic, "cloud-lat")?;
    let setup = world.agent_config("latency", world.mosq.tls_port, "")?;
    let mut d = Daemon::start(&setup, true)?;
    wait_online(&d)?;

    let conn = UnixStream::connect(&d.socket).map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let reader_conn = conn.try_clone().map_err(|e| e.to_string())?;
    let failed = Arc::new(AtomicBool::new(false));
    let failed2 = Arc::clone(&failed);
    let replies = std::thread::spawn(move || {
        let mut reader = BufReader::new(reader_conn);
        let mut line = String::new();
        for _ in 0..n {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(1..) if line.starts_with("{\"ok\":true") => {}
                _ => {
                    failed2.store(true, Ordering::SeqCst);
                    return Err(format!("report failed: {}", line.trim_end()));
                }
            }
        }
        Ok(())
    });
    let mut writer = &conn;
    let pid = d.pid();
    let (cpu0, sw0) = (cpu_ns_live(pid), ctx_switches(pid));
    let sent = scheduled(n, args.spacing, |i| {
        if failed.load(Ordering::SeqCst) {
            return Err("a report failed".into());
        }
        let req = format!(
            "{{\"op\":\"report\",\"changes\":[{{\"key\":\"sensor.{}\",\"value\":\"{}\"}}]}}\n",
            i % KEYS,
            value(i)
        );
        writer
            .write_all(req.as_bytes())
            .map_err(|e| format!("send: {e}"))
    })?;
    replies
        .join()
        .map_err(|_| "reply reader panicked".to_owned())??;
    // Every sample arrives in some batch; count changes.
    let changes = || {
        cloud
            .messages()
            .iter()
            .filter_map(|(_, p)| batch_changes(&p.payload))
            .map(|c| c.len())
            .sum::<usize>()
    };
    wait_count(n, changes);
    let mut received: HashMap<usize, Instant> = HashMap::new();
    for (at, p) in cloud.messages() {
        for (_, v) in batch_changes(&p.payload).unwrap_or_default() {
            if let Some(i) = v
                .and_then(|v| v.strip_prefix("reading-"))
                .and_then(|v| v.parse::<usize>().ok())
            {
                received.entry(i).or_insert(at);
            }
        }
    }
    let mut ns = Vec::with_capacity(n);
    for (i, s) in sent.iter().enumerate().skip(WARMUP) {
        let at = received
            .get(&i)
            .ok_or_else(|| format!("sample {i} never reached the cloud"))?;
        ns.push(at.saturating_duration_since(*s).as_nanos() as u64);
    }
    let mut agent = percentiles(ns);
    agent.cpu_us = cpu_ns_live(pid).saturating_sub(cpu0) as f64 / 1e3 / n as f64;
    agent.switches = ctx_switches(pid).saturating_sub(sw0) as f64 / n as f64;
    d.stop()?;
    drop(cloud);

    // The floor: plain publish -> subscribe through the same Mosquitto.
    let cloud = Cloud::start(&world.pki, world.mosq.tls_port, "floor/x", "cloud-floor")?;
    let (client, mut connection) = Client::new(
        mqtt_options(&world.pki, world.mosq.tls_port, "floor-pub")?,
        64,
    );
    nodelay(&mut connection);
    let publisher = std::thread::spawn(move || {
        for ev in connection.iter() {
            match ev {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))
                | Err(rumqttc::ConnectionError::RequestsDone) => return,
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    // Connected once its first publish arrives; then the timed ones.
    client
        .publish("floor/x", QoS::AtLeastOnce, false, vec![0u8; 8])
        .map_err(|e| e.to_string())?;
    wait_count(1, || cloud.len());
    let base = cloud.len();
    let sent = scheduled(n, args.spacing, |i| {
        // About the size of a one-change batch: the sample number, then padding.
        let mut payload = (i as u64).to_be_bytes().to_vec();
        payload.resize(VALUE_LEN + 60, b'x');
        client
            .publish("floor/x", QoS::AtLeastOnce, false, payload)
            .map_err(|e| e.to_string())
    })?;
    wait_count(base + n, || cloud.len());
    let mut received: HashMap<usize, Instant> = HashMap::new();
    for (at, p) in cloud.messages().iter().skip(base) {
        let Some(b) = p.payload.get(..8) else {
            continue;
        };
        let mut raw = [0u8; 8];
        raw.copy_from_slice(b);
        received
            .entry(u64::from_be_bytes(raw) as usize)
            .or_insert(*at);
    }
    let mut ns = Vec::with_capacity(n);
    for (i, s) in sent.iter().enumerate().skip(WARMUP) {
        let at = received
            .get(&i)
            .ok_or_else(|| format!("floor sample {i} never arrived"))?;
        ns.push(at.saturating_duration_since(*s).as_nanos() as u64);
    }
    let floor = percentiles(ns);
    let _ = client.disconnect();
    let _ = publisher.join();
    Ok((agent, floor))
}

// ---------------------------------------------------------------------------------------------
// Figure 4: CPU while offline.

#[derive(Debug, Default, Clone, Copy)]
struct Offline {
    /// ms of CPU per 60 s, from utime + stime.
    ms_per_min: f64,
    /// The same from the live threads' schedstat (ns resolution).
    ms_per_min_fine: f64,
    attempts: u64,
}

fn offline(args: &Args) -> Res<Vec<Offline>> {
    let world = World::new(args)?;
    let mut agents = Vec::new();
    for i in 0..args.repeats {
        // Nothing listens behind a cut proxy: every connection is accepted and closed.
        let proxy = FaultProxy::start(world.mosq.tls_addr()).map_err(|e| format!("proxy: {e}"))?;
        proxy.cut();
        let setup = world.agent_config(&format!("offline{i}"), proxy.port(), "")?;
        let d = Daemon::start(&setup, false)?;
        agents.push((proxy, d));
    }
    // Settled: the first attempt failed, plus 1 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    for (_, d) in &agents {
        let mut status = StatusConn::connect(&d.socket)?;
        while status.get()?["connection"]["last_error"].is_null() {
            if Instant::now() > deadline {
                return Err("no failed connection attempt in 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let before: Vec<(u64, u64, u64)> = agents
        .iter()
        .map(|(p, d)| {
            Ok((
                cpu_ticks(d.pid())?,
                cpu_ns_live(d.pid()),
                p.connections_accepted(),
            ))
        })
        .collect::<Res<_>>()?;
    let t0 = Instant::now();
    std::thread::sleep(args.offline);
    let secs = t0.elapsed().as_secs_f64();
    let tick_ms = 1e3 / clock_ticks_per_sec() as f64;
    let scale = 60.0 / secs;
    let mut out = Vec::new();
    for ((p, d), (t0, ns0, a0)) in agents.iter().zip(before) {
        let t1 = cpu_ticks(d.pid())?;
        let ns1 = cpu_ns_live(d.pid());
        out.push(Offline {
            ms_per_min: (t1 - t0) as f64 * tick_ms * scale,
            ms_per_min_fine: ns1.saturating_sub(ns0) as f64 / 1e6 * scale,
            attempts: p.connections_accepted() - a0,
        });
    }
    for (_, mut d) in agents {
        d.stop()?;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Report.

#[derive(Clone, Copy)]
enum Target {
    None,
    AtLeast(f64),
    AtMost(f64),
}

struct Figure {
    name: String,
    unit: &'static str,
    target: Target,
    values: Vec<f64>,
    scale: f64,
    decimals: usize,
}

impl Figure {
    fn new(name: &str, unit: &'static str, target: Target, values: Vec<f64>) -> Figure {
        Figure {
            name: name.to_owned(),
            unit,
            target,
            values,
            scale: 1.0,
            decimals: 0,
        }
    }

    fn scaled(mut self, scale: f64, decimals: usize) -> Figure {
        self.scale = scale;
        self.decimals = decimals;
        self
    }

    fn fmt(&self, v: f64) -> String {
        format!("{:.*}", self.decimals, v / self.scale)
    }

    fn row(&self) -> String {
        let mut v: Vec<f64> = self
            .values
            .iter()
            .copied()
            .filter(|x| !x.is_nan())
            .collect();
        v.sort_by(f64::total_cmp);
        let m = median(&v);
        let (target, met) = match self.target {
            Target::None => ("-".to_owned(), "-"),
            Target::AtLeast(t) => (
                format!("≥ {}", self.fmt(t)),
                if m >= t { "yes" } else { "NO" },
            ),
            Target::AtMost(t) => (
                format!("≤ {}", self.fmt(t)),
                if m <= t { "yes" } else { "NO" },
            ),
        };
        format!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            self.name,
            self.fmt(m),
            self.fmt(v.first().copied().unwrap_or(f64::NAN)),
            self.fmt(v.last().copied().unwrap_or(f64::NAN)),
            self.unit,
            target,
            met
        )
    }
}

fn main() {
    common::main_of("sync", run);
}

fn run() -> Res<()> {
    let args = parse_args()?;
    let started = Instant::now();
    println!(
        "edgesync sync benchmark{}",
        if args.quick { " (--quick)" } else { "" }
    );
    print!("{}", machine());
    println!("daemon  {}", common::daemon_path());
    println!(
        "work    fig.1 {} changes ({KEYS} keys, {VALUE_LEN}-char values) drained to Mosquitto \
         over mTLS; fig.3 {} samples every {:?}; fig.4 {:?} offline; {} repeats",
        args.changes, args.samples, args.spacing, args.offline, args.repeats
    );
    for (section, extra) in [("store", &args.store_extra), ("sync", &args.sync_extra)] {
        if !extra.is_empty() {
            println!("config  [{section}] {extra}");
        }
    }
    println!("load    {} at start\n", loadavg());
    let mut figures = Vec::new();

    if args.only.contains(&1) {
        let input = ndjson(args.changes);
        let mut runs = Vec::new();
        for r in 0..args.repeats {
            let t = Instant::now();
            let d = drain(&args, &input)?;
            println!(
                "drain {}/{}: ingest {:.0}/s (HWM {:.1} MiB) · restore→online {:.0} ms · first msg \
                 {:.0} ms · drained {:.0}/s ({:.0}/s from first msg) in {} msgs · cloud complete \
                 {:.0} ms · HWM {:.1} MiB{} · CPU µs/change agent {:.2} broker {:.2} bench {:.2} · {:.1} s \
                 · load {}",
                r + 1,
                args.repeats,
                d.ingest_rate,
                d.hwm_ingest / MIB,
                d.to_online_ms,
                d.first_msg_ms,
                d.rate,
                d.rate_from_first,
                d.messages,
                d.cloud_all_ms,
                d.hwm_drain / MIB,
                if d.hwm_reset {
                    ""
                } else {
                    " (not reset: includes ingest)"
                },
                d.agent_cpu_us,
                d.broker_cpu_us,
                d.bench_cpu_us,
                t.elapsed().as_secs_f64(),
                loadavg()
            );
            runs.push(d);
        }
        let col = |f: fn(&Drain) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
        figures.extend([
            Figure::new(
                &format!(
                    "1. drain {}k backlog, restore → queue empty",
                    args.changes / 1000
                ),
                "changes/s",
                Target::AtLeast(500_000.0),
                col(|d| d.rate),
            ),
            Figure::new(
                "   of which restore → online (reconnect wait + TLS)",
                "ms",
                Target::None,
                col(|d| d.to_online_ms),
            ),
            Figure::new(
                "   time to first message at the cloud",
                "ms",
                Target::None,
                col(|d| d.first_msg_ms),
            ),
            Figure::new(
                "   drain rate from the first message",
                "changes/s",
                Target::None,
                col(|d| d.rate_from_first),
            ),
            Figure::new(
                "   restore → cloud holds every change",
                "ms",
                Target::None,
                col(|d| d.cloud_all_ms),
            ),
            Figure::new(
                "   CPU per change: agent",
                "µs",
                Target::None,
                col(|d| d.agent_cpu_us),
            )
            .scaled(1.0, 2),
            Figure::new(
                "   CPU per change: Mosquitto",
                "µs",
                Target::None,
                col(|d| d.broker_cpu_us),
            )
            .scaled(1.0, 2),
            Figure::new(
                "   CPU per change: bench (cloud subscriber, status polls)",
                "µs",
                Target::None,
                col(|d| d.bench_cpu_us),
            )
            .scaled(1.0, 2),
            Figure::new(
                "2. agent peak RSS during the drain",
                "MiB",
                Target::AtMost(24.0 * MIB),
                col(|d| d.hwm_drain),
            )
            .scaled(MIB, 1),
            Figure::new(
                "2. agent peak RSS after the ingest",
                "MiB",
                Target::AtMost(12.0 * MIB),
                col(|d| d.hwm_ingest),
            )
            .scaled(MIB, 1),
            Figure::new(
                "   (ingest rate while offline)",
                "changes/s",
                Target::None,
                col(|d| d.ingest_rate),
            ),
        ]);
    }

    if args.only.contains(&3) {
        let mut agent = Vec::new();
        let mut floor = Vec::new();
        for r in 0..args.repeats {
            let t = Instant::now();
            let (a, f) = latency(&args)?;
            println!(
                "latency {}/{}: agent p50 {:.3} p95 {:.3} p99 {:.3} max {:.2} ms ({:.0} µs CPU, \
                 {:.1} context switches per change) · floor p50 {:.3} p95 {:.3} p99 {:.3} max {:.2} ms · {:.1} s \
                 · load {}",
                r + 1,
                args.repeats,
                a.p50,
                a.p95,
                a.p99,
                a.max,
                a.cpu_us,
                a.switches,
                f.p50,
                f.p95,
                f.p99,
                f.max,
                t.elapsed().as_secs_f64(),
                loadavg()
            );
            agent.push(a);
            floor.push(f);
        }
        let col = |v: &[Lat], f: fn(&Lat) -> f64| v.iter().map(f).collect::<Vec<f64>>();
        let ms =
            |name: &str, target, values| Figure::new(name, "ms", target, values).scaled(1.0, 3);
        figures.extend([
            ms(
                "3. online latency p50 (report → cloud)",
                Target::AtMost(1.0),
                col(&agent, |l| l.p50),
            ),
            ms(
                "3. online latency p95",
                Target::None,
                col(&agent, |l| l.p95),
            ),
            ms(
                "3. online latency p99",
                Target::AtMost(5.0),
                col(&agent, |l| l.p99),
            ),
            ms(
                "   online latency max",
                Target::None,
                col(&agent, |l| l.max),
            ),
            ms(
                "   floor: Mosquitto publish → subscribe p50",
                Target::None,
                col(&floor, |l| l.p50),
            ),
            ms("   floor p99", Target::None, col(&floor, |l| l.p99)),
            Figure::new(
                "   agent CPU per change (online)",
                "µs",
                Target::None,
                col(&agent, |l| l.cpu_us),
            ),
            Figure::new(
                "   agent context switches per change",
                "",
                Target::None,
                col(&agent, |l| l.switches),
            )
            .scaled(1.0, 1),
        ]);
    }

    if args.only.contains(&4) {
        let t = Instant::now();
        let runs = offline(&args)?;
        for (i, o) in runs.iter().enumerate() {
            println!(
                "offline {}/{}: {:.1} ms CPU per 60 s (schedstat of live threads {:.2} ms) · {} \
                 connection attempts in {:?}",
                i + 1,
                runs.len(),
                o.ms_per_min,
                o.ms_per_min_fine,
                o.attempts,
                args.offline
            );
        }
        println!("offline: {:.1} s", t.elapsed().as_secs_f64());
        let col = |f: fn(&Offline) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
        figures.extend([
            Figure::new(
                "4. offline CPU (utime+stime)",
                "ms / 60 s",
                Target::AtMost(20.0),
                col(|o| o.ms_per_min),
            )
            .scaled(1.0, 1),
            Figure::new(
                "   offline CPU (schedstat, live threads)",
                "ms / 60 s",
                Target::None,
                col(|o| o.ms_per_min_fine),
            )
            .scaled(1.0, 2),
            Figure::new(
                "   connection attempts in the window",
                "",
                Target::None,
                col(|o| o.attempts as f64),
            ),
        ]);
    }

    println!("\n| figure | median | min | max | unit | target | met? |");
    println!("| --- | ---: | ---: | ---: | --- | --- | --- |");
    for f in &figures {
        println!("{}", f.row());
    }
    println!(
        "\n{} repeats in {:.0} s; load {} at the end",
        args.repeats,
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    Ok(())
}
