//! Ingest benchmark: drives the real daemon (`edgesync run`) over its Unix socket and
//! measures what the local side of the agent promises (see docs/BENCHMARKS.md).
//!
//! ```text
//! cargo bench --bench ingest                  # full run, 5 repeats (~5 min on 2 cores)
//! cargo bench --bench ingest -- --quick       # smoke run with small counts (< 30 s)
//! cargo bench --bench ingest -- --repeats 3 --dir /var/tmp
//! ```
//!
//! Every figure starts a fresh daemon on a fresh store in a temporary directory (`--dir`,
//! default the system temp dir), so the disk under that directory is what is measured.
//! Figures:
//! 1. durable ingest, one client: N changes through `client::report_stream` (the code of
//!    `edgesync report --stdin`), timed until the last one is acknowledged;
//! 2. the same with 8 concurrent clients (one thread and runtime each, like 8 processes);
//! 3. ack latency: one change per request at a fixed offered rate on one connection,
//!    pipelined, send→answer per request;
//! 4. peak RSS (VmHWM) of the daemon holding the N changes of figure 1;
//! 5. start-up time with those N changes queued (SIGTERM, start again on the same store),
//!    and the store file size per queued change.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgesync::client::report_stream;

type Res<T> = Result<T, String>;

const DAEMON: &str = env!("CARGO_BIN_EXE_edgesync");
/// Distinct keys in the generated changes.
const KEYS: usize = 100;
/// Length of every generated string value.
const VALUE_LEN: usize = 100;
const CLIENTS: usize = 8;
/// How long to wait for a daemon to answer before giving up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
struct Args {
    quick: bool,
    repeats: usize,
    dir: PathBuf,
    /// Changes of figure 1 (and held for figures 4 and 5).
    single: usize,
    /// Changes per client of figure 2.
    per_client: usize,
    /// Offered rate (requests/s) and duration of figure 3.
    rate: u64,
    latency_secs: f64,
}

fn parse_args() -> Res<Args> {
    let mut quick = false;
    let mut repeats = None;
    let mut dir = std::env::temp_dir();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--repeats" => {
                let v = it.next().ok_or("--repeats needs a number")?;
                let n: usize = v
                    .parse()
                    .map_err(|_| format!("--repeats {v:?}: not a number"))?;
                repeats = Some(n.max(1));
            }
            "--dir" => dir = PathBuf::from(it.next().ok_or("--dir needs a path")?),
            // Passed by `cargo bench` to every harness-less bench.
            "--bench" => {}
            "-h" | "--help" => {
                println!(
                    "usage: cargo bench --bench ingest -- [--quick] [--repeats N] [--dir PATH]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(if quick {
        Args {
            quick,
            repeats: repeats.unwrap_or(3),
            dir,
            single: 100_000,
            per_client: 25_000,
            rate: 10_000,
            latency_secs: 1.0,
        }
    } else {
        Args {
            quick,
            repeats: repeats.unwrap_or(5),
            dir,
            single: 1_000_000,
            per_client: 250_000,
            rate: 10_000,
            latency_secs: 5.0,
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The daemon under test.

struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    store: PathBuf,
    log: PathBuf,
}

/// A temporary directory with a config for one daemon.
struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    socket: PathBuf,
    store: PathBuf,
    log: PathBuf,
}

fn setup(base: &Path, n: usize) -> Res<Setup> {
    let dir = tempfile::Builder::new()
        .prefix("edgesync-bench-")
        .tempdir_in(base)
        .map_err(|e| format!("cannot create a temp dir in {}: {e}", base.display()))?;
    // sun_path is short: keep the socket under /tmp whatever --dir is.
    let socket = PathBuf::from(format!("/tmp/esb-{}-{n}.sock", std::process::id()));
    let config = dir.path().join("edgesync.toml");
    let text = format!(
        "[device]\nid = \"bench-0001\"\n\n\
         [mqtt]\nurl = \"mqtts://localhost:8883\"\nca = \"ca.pem\"\n\n\
         [store]\npath = \"edgesync.redb\"\nmax_bytes = \"4GiB\"\nwhen_full = \"reject\"\n\n\
         [local]\nsocket = \"{}\"\n",
        socket.display()
    );
    std::fs::write(&config, text).map_err(|e| format!("writing the config: {e}"))?;
    std::fs::write(dir.path().join("ca.pem"), b"").map_err(|e| format!("writing ca.pem: {e}"))?;
    Ok(Setup {
        config,
        socket,
        store: dir.path().join("edgesync.redb"),
        log: dir.path().join("daemon.log"),
        _dir: dir,
    })
}

impl Daemon {
    /// Starts the daemon and waits until it answers `status`; returns it and the time from
    /// spawn to the first answer.
    fn start(s: &Setup) -> Res<(Daemon, Duration)> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.log)
            .map_err(|e| format!("daemon log: {e}"))?;
        let t0 = Instant::now();
        let child = Command::new(DAEMON)
            .arg("run")
            .arg("--config")
            .arg(&s.config)
            .env_remove("EDGESYNC_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {DAEMON}: {e}"))?;
        let mut d = Daemon {
            child: Some(child),
            socket: s.socket.clone(),
            store: s.store.clone(),
            log: s.log.clone(),
        };
        loop {
            if status(&d.socket).is_ok() {
                return Ok((d, t0.elapsed()));
            }
            if let Some(c) = d.child.as_mut()
                && let Ok(Some(code)) = c.try_wait()
            {
                d.child = None;
                return Err(format!(
                    "daemon exited with {code} at start:\n{}",
                    d.log_tail()
                ));
            }
            if t0.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "daemon did not answer in {START_TIMEOUT:?}:\n{}",
                    d.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `VmHWM` and `VmRSS` of the daemon in bytes.
    fn memory(&self) -> Res<(u64, u64)> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .map_err(|e| format!("/proc status: {e}"))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
                .ok_or_else(|| format!("no {name} in /proc/{}/status", self.pid()))
        };
        Ok((field("VmHWM:")?, field("VmRSS:")?))
    }

    /// SIGTERM, then waits for the exit; returns how long the shutdown took.
    fn stop(&mut self) -> Res<Duration> {
        let Some(mut child) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        let t0 = Instant::now();
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .map_err(|e| format!("kill: {e}"))?;
        if !sent.success() {
            let _ = child.kill();
        }
        let code = child.wait().map_err(|e| format!("wait: {e}"))?;
        let took = t0.elapsed();
        if !code.success() {
            return Err(format!("daemon exited with {code}:\n{}", self.log_tail()));
        }
        Ok(took)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// One `status` request on a new connection; the parsed reply.
fn status(socket: &Path) -> Res<serde_json::Value> {
    let mut s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"{\"op\":\"status\"}\n")
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
    if v["ok"] != true {
        return Err(format!("status failed: {line}"));
    }
    Ok(v)
}

fn queue_depth(socket: &Path) -> Res<u64> {
    status(socket)?["queue"]["depth"]
        .as_u64()
        .ok_or_else(|| "status without queue.depth".to_owned())
}

// ---------------------------------------------------------------------------------------------
// Workload.

fn value(i: usize) -> String {
    // 100 characters, different for every change.
    format!("reading-{i:0>width$}", width = VALUE_LEN - 8)
}

/// NDJSON input of `n` changes, `{"key":"sensor.N","value":"<100 chars>"}` a line.
fn ndjson(n: usize) -> Vec<u8> {
    let mut out = String::with_capacity(n * (VALUE_LEN + 40));
    for i in 0..n {
        let _ = writeln!(
            out,
            "{{\"key\":\"sensor.{}\",\"value\":\"{}\"}}",
            i % KEYS,
            value(i)
        );
    }
    out.into_bytes()
}

/// Splits NDJSON into `parts` pieces of whole lines, `per` lines each.
fn split_lines(input: &[u8], parts: usize, per: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(parts);
    let mut rest = input;
    for _ in 0..parts {
        let mut end = 0;
        for _ in 0..per {
            let nl = rest[end..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |p| end + p + 1);
            end = nl;
        }
        out.push(&rest[..end]);
        rest = &rest[end..];
        if rest.is_empty() {
            rest = input;
        }
    }
    out
}

fn client_runtime() -> Res<tokio::runtime::Runtime> {
    // The same runtime `edgesync report` uses.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))
}

/// Streams `input` with `report_stream`; returns the changes acknowledged.
fn stream(socket: &Path, input: &[u8]) -> Res<u64> {
    let rt = client_runtime()?;
    let out = rt
        .block_on(report_stream(socket, input))
        .map_err(|e| format!("report_stream: {e}"))?;
    Ok(out.queued)
}

// ---------------------------------------------------------------------------------------------
// Figures of one repeat.

#[derive(Debug, Default, Clone)]
struct Sample {
    single_rate: f64,
    multi_rate: f64,
    lat_p50_ms: f64,
    lat_p99_ms: f64,
    lat_max_ms: f64,
    lat_offered: f64,
    hwm_bytes: f64,
    restart_hwm_bytes: f64,
    startup_ms: f64,
    shutdown_ms: f64,
    file_per_change: f64,
}

/// Figures 1, 4 and 5 on one store.
fn single_client(args: &Args, input: &[u8], n: usize, s: &mut Sample, run: usize) -> Res<()> {
    let setup = setup(&args.dir, run)?;
    let (mut d, _) = Daemon::start(&setup)?;
    let t0 = Instant::now();
    let queued = stream(&d.socket, input)?;
    let dt = t0.elapsed();
    if queued != n as u64 {
        return Err(format!("{queued} of {n} changes acknowledged"));
    }
    s.single_rate = n as f64 / dt.as_secs_f64();
    let depth = queue_depth(&d.socket)?;
    if depth != n as u64 {
        return Err(format!(
            "queue depth {depth} after {n} acknowledged changes"
        ));
    }
    s.hwm_bytes = d.memory()?.0 as f64;

    s.shutdown_ms = d.stop()?.as_secs_f64() * 1e3;
    let size = std::fs::metadata(&d.store)
        .map_err(|e| format!("store size: {e}"))?
        .len();
    s.file_per_change = size as f64 / n as f64;
    drop(d);
    let (d, startup) = Daemon::start(&setup)?;
    s.startup_ms = startup.as_secs_f64() * 1e3;
    let depth = queue_depth(&d.socket)?;
    if depth != n as u64 {
        return Err(format!("queue depth {depth} after restart, expected {n}"));
    }
    s.restart_hwm_bytes = d.memory()?.0 as f64;
    let mut d = d;
    d.stop()?;
    Ok(())
}

/// Figure 2.
fn multi_client(args: &Args, parts: &[&[u8]], s: &mut Sample, run: usize) -> Res<()> {
    let setup = setup(&args.dir, run)?;
    let (mut d, _) = Daemon::start(&setup)?;
    let start = Barrier::new(parts.len() + 1);
    let (dt, results) = std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .iter()
            .map(|part| {
                let start = &start;
                let socket = &d.socket;
                scope.spawn(move || {
                    start.wait();
                    stream(socket, part)
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let results: Vec<Res<u64>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("client thread panicked".into()))
            })
            .collect();
        (t0.elapsed(), results)
    });
    let mut total = 0;
    for r in results {
        total += r?;
    }
    let expected = (parts.len() * args.per_client) as u64;
    if total != expected {
        return Err(format!("{total} of {expected} changes acknowledged"));
    }
    s.multi_rate = total as f64 / dt.as_secs_f64();
    d.stop()?;
    Ok(())
}

/// Figure 3: one change per request, sent on a fixed schedule without waiting for answers.
fn latency(args: &Args, s: &mut Sample, run: usize) -> Res<()> {
    let setup = setup(&args.dir, run)?;
    let (mut d, _) = Daemon::start(&setup)?;
    let n = (args.rate as f64 * args.latency_secs) as usize;
    let period = Duration::from_nanos(1_000_000_000 / args.rate);
    let requests: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            format!(
                "{{\"op\":\"report\",\"changes\":[{{\"key\":\"sensor.{}\",\"value\":\"{}\"}}]}}\n",
                i % KEYS,
                value(i)
            )
            .into_bytes()
        })
        .collect();
    let conn = UnixStream::connect(&d.socket).map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut writer = conn.try_clone().map_err(|e| e.to_string())?;
    let sent_at: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
    let t0 = Instant::now();
    let (latencies, last_send) = std::thread::scope(|scope| {
        let sent_at = &sent_at;
        let requests = &requests;
        let sender = scope.spawn(move || -> Res<Duration> {
            let mut buf = Vec::with_capacity(64 * 1024);
            let mut i = 0;
            while i < n {
                let due = period * i as u32;
                let now = t0.elapsed();
                if now < due {
                    std::thread::sleep(due - now);
                }
                // Everything due by now goes out in one write.
                let now = t0.elapsed();
                buf.clear();
                let first = i;
                while i < n && period * i as u32 <= now {
                    buf.extend_from_slice(&requests[i]);
                    i += 1;
                }
                let stamp = t0.elapsed().as_nanos() as u64;
                for at in &sent_at[first..i] {
                    at.store(stamp, Ordering::Release);
                }
                writer.write_all(&buf).map_err(|e| format!("send: {e}"))?;
            }
            Ok(t0.elapsed())
        });
        let mut reader = BufReader::with_capacity(64 * 1024, &conn);
        let mut line = String::new();
        let mut lat = Vec::with_capacity(n);
        for (i, at) in sent_at.iter().enumerate() {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => {
                    return (
                        Err("the daemon closed the connection".to_owned()),
                        Ok(Duration::ZERO),
                    );
                }
                Ok(_) => {}
                Err(e) => return (Err(format!("answer {i}: {e}")), Ok(Duration::ZERO)),
            }
            let now = t0.elapsed().as_nanos() as u64;
            if !line.starts_with("{\"ok\":true") {
                return (
                    Err(format!("answer {i}: {}", line.trim_end())),
                    Ok(Duration::ZERO),
                );
            }
            lat.push(now.saturating_sub(at.load(Ordering::Acquire)));
        }
        let last = sender
            .join()
            .unwrap_or_else(|_| Err("sender panicked".into()));
        (Ok(lat), last)
    });
    let mut lat = latencies?;
    let last_send = last_send?;
    lat.sort_unstable();
    let pick = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)] as f64 / 1e6;
    s.lat_p50_ms = pick(0.50);
    s.lat_p99_ms = pick(0.99);
    s.lat_max_ms = lat.last().copied().unwrap_or(0) as f64 / 1e6;
    s.lat_offered = n as f64 / last_send.as_secs_f64().max(1e-9);
    d.stop()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report.

fn machine(dir: &Path) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/version").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or("?".into(), |kb| format!("{:.1} GiB", kb as f64 / 1048576.0));
    let df = Command::new("df")
        .arg("-T")
        .arg(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let df = df
        .lines()
        .nth(1)
        .unwrap_or("?")
        .split_whitespace()
        .collect::<Vec<_>>();
    let disk = match df.as_slice() {
        [dev, fs, ..] => format!("{dev} ({fs})"),
        _ => "unknown".into(),
    };
    format!(
        "cpu     {model}\ncores   {cores}\nmemory  {mem}\nkernel  {}\ntemp    {} on {disk}\n",
        kernel.trim(),
        dir.display()
    )
}

struct Figure {
    name: String,
    unit: &'static str,
    target: Option<(f64, bool)>, // (value, higher is better)
    values: Vec<f64>,
    scale: f64,
    decimals: usize,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

impl Figure {
    fn fmt(&self, v: f64) -> String {
        format!("{:.*}", self.decimals, v / self.scale)
    }

    fn met(&self) -> &'static str {
        match self.target {
            None => "-",
            Some((t, higher)) => {
                let m = median(&self.values);
                if (higher && m >= t) || (!higher && m <= t) {
                    "yes"
                } else {
                    "NO"
                }
            }
        }
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ingest bench failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args = parse_args()?;
    println!(
        "edgesync ingest benchmark{}",
        if args.quick { " (--quick)" } else { "" }
    );
    print!("{}", machine(&args.dir));
    println!("daemon  {DAEMON}");
    println!(
        "load    fig.1 {} changes, fig.2 {CLIENTS}×{}, fig.3 {} req/s for {} s; {KEYS} keys, \
         {VALUE_LEN}-char values; {} repeats\n",
        args.single, args.per_client, args.rate, args.latency_secs, args.repeats
    );

    let input = ndjson(args.single.max(args.per_client));
    let single_input = split_lines(&input, 1, args.single)[0];
    let parts = split_lines(&input, CLIENTS, args.per_client);

    let mut samples = Vec::new();
    for r in 0..args.repeats {
        let mut s = Sample::default();
        let t = Instant::now();
        single_client(&args, single_input, args.single, &mut s, 3 * r)?;
        multi_client(&args, &parts, &mut s, 3 * r + 1)?;
        latency(&args, &mut s, 3 * r + 2)?;
        println!(
            "repeat {}/{}: 1 client {:.0}/s · {CLIENTS} clients {:.0}/s · latency p50 {:.2} \
             p99 {:.2} max {:.2} ms ({:.0} req/s) · HWM {:.1} MiB · start {:.1} ms \
             (stop {:.0} ms) · {:.1} B/change · {:.1} s",
            r + 1,
            args.repeats,
            s.single_rate,
            s.multi_rate,
            s.lat_p50_ms,
            s.lat_p99_ms,
            s.lat_max_ms,
            s.lat_offered,
            s.hwm_bytes / 1048576.0,
            s.startup_ms,
            s.shutdown_ms,
            s.file_per_change,
            t.elapsed().as_secs_f64()
        );
        samples.push(s);
    }

    let col = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let single = format!("1. ingest, 1 client ({})", args.single);
    let multi = format!("2. ingest, {CLIENTS} clients (×{})", args.per_client);
    let figures = [
        Figure {
            name: single,
            unit: "changes/s",
            target: Some((300_000.0, true)),
            values: col(|s| s.single_rate),
            scale: 1.0,
            decimals: 0,
        },
        Figure {
            name: multi,
            unit: "changes/s",
            target: Some((200_000.0, true)),
            values: col(|s| s.multi_rate),
            scale: 1.0,
            decimals: 0,
        },
        Figure {
            name: "3. ack latency p50 @10k/s".into(),
            unit: "ms",
            target: None,
            values: col(|s| s.lat_p50_ms),
            scale: 1.0,
            decimals: 2,
        },
        Figure {
            name: "3. ack latency p99 @10k/s".into(),
            unit: "ms",
            target: Some((5.0, false)),
            values: col(|s| s.lat_p99_ms),
            scale: 1.0,
            decimals: 2,
        },
        Figure {
            name: "3. ack latency max @10k/s".into(),
            unit: "ms",
            target: None,
            values: col(|s| s.lat_max_ms),
            scale: 1.0,
            decimals: 2,
        },
        Figure {
            name: "3. offered rate achieved".into(),
            unit: "req/s",
            target: None,
            values: col(|s| s.lat_offered),
            scale: 1.0,
            decimals: 0,
        },
        Figure {
            name: "4. peak RSS holding fig.1 queue".into(),
            unit: "MiB",
            target: Some((12.0 * 1048576.0, false)),
            values: col(|s| s.hwm_bytes),
            scale: 1048576.0,
            decimals: 1,
        },
        Figure {
            name: "5. start-up, fig.1 queue held".into(),
            unit: "ms",
            target: Some((100.0, false)),
            values: col(|s| s.startup_ms),
            scale: 1.0,
            decimals: 1,
        },
        Figure {
            name: "5. peak RSS after start-up".into(),
            unit: "MiB",
            target: None,
            values: col(|s| s.restart_hwm_bytes),
            scale: 1048576.0,
            decimals: 1,
        },
        Figure {
            name: "5. shutdown (SIGTERM→exit)".into(),
            unit: "ms",
            target: None,
            values: col(|s| s.shutdown_ms),
            scale: 1.0,
            decimals: 1,
        },
        Figure {
            name: "5. store file per queued change".into(),
            unit: "bytes",
            target: None,
            values: col(|s| s.file_per_change),
            scale: 1.0,
            decimals: 1,
        },
    ];

    println!("\n| figure | median | min | max | unit | target | met? |");
    println!("| --- | ---: | ---: | ---: | --- | --- | --- |");
    for f in &figures {
        let mut v = f.values.clone();
        v.sort_by(f64::total_cmp);
        let target = match f.target {
            Some((t, true)) => format!("≥ {}", f.fmt(t)),
            Some((t, false)) => format!("≤ {}", f.fmt(t)),
            None => "-".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {target} | {} |",
            f.name,
            f.fmt(median(&v)),
            f.fmt(v.first().copied().unwrap_or(f64::NAN)),
            f.fmt(v.last().copied().unwrap_or(f64::NAN)),
            f.unit,
            f.met()
        );
    }
    Ok(())
}
