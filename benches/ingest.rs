//! Ingest benchmark: drives the real daemon (`edgesync run`) over its Unix socket and
//! measures the local side of the agent against its targets (docs/BENCHMARKS.md).
//!
//! ```text
//! cargo bench --bench ingest                      # full run, 5 repeats (~1 min on 2 cores)
//! cargo bench --bench ingest -- --quick           # smoke run with small counts (~5 s)
//! cargo bench --bench ingest -- --repeats 3 --only 1,3 --dir /var/tmp
//! EDGESYNC_BENCH_WRAPPER="valgrind --tool=massif" cargo bench --bench ingest -- --quick --only 1
//! ```
//!
//! Every group of figures starts a fresh daemon on a fresh store in a new temporary directory
//! under `--dir` (default: the system temp dir), so the disk under that directory is what is
//! measured. The daemon is spawned with `run --config`, and is ready when it answers
//! `{"op":"status"}` on its socket (polled). Figures:
//! 1. durable ingest, one client: N changes through `client::report_stream` (the code of
//!    `edgesync report --stdin`), timed until the last one is acknowledged;
//! 2. the same with 8 concurrent clients (one thread and runtime each, like 8 processes);
//! 3. ack latency: one change per request on one connection, sent on a fixed schedule
//!    (pipelined, never waiting for answers), send→answer per request;
//! 4. peak RSS (VmHWM) of the daemon after taking in and holding the N changes of figure 1;
//! 5. start-up with those N changes queued (SIGTERM, start again on the same store), and the
//!    store file size per queued change; also start-up on an empty store and after a SIGKILL
//!    (redb repairs the file first).
//!
//! Under `cargo test --benches` (no `--bench` argument) it is a smoke test: one quick repeat.
//! Figure 1 also splits the CPU time per change between the client, the daemon's runtime
//! threads (socket, JSON, validation) and its store writer thread (from `schedstat`).

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{
    Daemon, KEYS, MIB, Res, VALUE_LEN, loadavg, machine_in, median, ndjson, proc_status_kb, status,
    stream, value,
};

const CLIENTS: usize = 8;
const USAGE: &str = "usage: cargo bench --bench ingest -- [--quick] [--repeats N] [--dir PATH] \
[--only 1,2,3] [--store-extra 'cache_size = \"1MiB\"']

  --quick        small counts (100k changes, 8x25k, 1 s of latency), 3 repeats: a smoke run
                 (also what `cargo test --benches` runs, with 1 repeat: it passes no --bench)
  --repeats N    repeats of every figure (default 5, or 3 with --quick)
  --dir PATH     where the temporary stores go (default: the system temp dir)
  --only LIST    figure groups to run: 1 (figures 1, 4 and 5), 2, 3
  --store-extra  a TOML line added to the [store] section of the daemon's config
env EDGESYNC_BENCH_WRAPPER=\"CMD ARGS\" runs the daemon under CMD (valgrind, perf record, ...)";

#[derive(Debug, Clone)]
struct Args {
    quick: bool,
    repeats: usize,
    dir: PathBuf,
    /// Changes of figure 1 (held for figures 4 and 5).
    single: usize,
    /// Changes per client of figure 2.
    per_client: usize,
    /// Offered rate (requests/s) and duration of figure 3.
    rate: u64,
    latency_secs: f64,
    only: Vec<u8>,
    store_extra: String,
}

fn parse_args() -> Res<Args> {
    let mut quick = false;
    let mut repeats = None;
    let mut dir = std::env::temp_dir();
    let mut only = vec![1, 2, 3];
    let mut store_extra = String::new();
    // `cargo bench` passes --bench; `cargo test --benches` does not: a smoke run then.
    let mut bench_mode = false;
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
            "--only" => {
                let v = it.next().ok_or("--only needs a list like 1,3")?;
                only = v
                    .split(',')
                    .map(|p| match p.trim() {
                        "1" | "4" | "5" => Ok(1),
                        "2" => Ok(2),
                        "3" => Ok(3),
                        _ => Err(format!("--only {v:?}: figures are 1 to 5")),
                    })
                    .collect::<Res<Vec<u8>>>()?;
            }
            "--store-extra" => {
                store_extra = it.next().ok_or("--store-extra needs a TOML line")?;
            }
            // `cargo bench` passes --bench to every bench target.
            "--bench" => bench_mode = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if !bench_mode && !quick {
        quick = true;
        repeats = repeats.or(Some(1));
    }
    let (single, per_client, latency_secs, default_repeats) = if quick {
        (100_000, 25_000, 1.0, 3)
    } else {
        (1_000_000, 250_000, 5.0, 5)
    };
    Ok(Args {
        quick,
        repeats: repeats.unwrap_or(default_repeats),
        dir,
        single,
        per_client,
        rate: 10_000,
        latency_secs,
        only,
        store_extra,
    })
}

// ---------------------------------------------------------------------------------------------
// The daemon under test.

/// A temporary directory with the config of one daemon, and its store file.
struct Setup {
    _dir: tempfile::TempDir,
    daemon: common::Setup,
    store: PathBuf,
}

fn setup(args: &Args, n: usize) -> Res<Setup> {
    let dir = tempfile::Builder::new()
        .prefix("edgesync-bench-")
        .tempdir_in(&args.dir)
        .map_err(|e| format!("cannot create a temp dir in {}: {e}", args.dir.display()))?;
    // sun_path is short: the socket stays under /tmp whatever --dir is.
    let socket = PathBuf::from(format!("/tmp/esb-{}-{n}.sock", std::process::id()));
    let text = format!(
        "[device]\nid = \"bench-0001\"\n\n\
         [mqtt]\nurl = \"mqtts://localhost:8883\"\nca = \"ca.pem\"\n\n\
         [store]\npath = \"edgesync.redb\"\nmax_bytes = \"4GiB\"\nwhen_full = \"reject\"\n{}\n\n\
         [local]\nsocket = \"{}\"\n",
        args.store_extra,
        socket.display()
    );
    let daemon = common::Setup::write(dir.path(), socket, &text)?;
    std::fs::write(dir.path().join("ca.pem"), b"").map_err(|e| format!("writing ca.pem: {e}"))?;
    Ok(Setup {
        daemon,
        store: dir.path().join("edgesync.redb"),
        _dir: dir,
    })
}

/// Starts the daemon (under `EDGESYNC_BENCH_WRAPPER`) and waits until it answers `status`;
/// returns it and the time from spawn to that first answer.
fn start_daemon(s: &Setup) -> Res<(Daemon, Duration)> {
    let d = Daemon::start(&s.daemon, true)?;
    let took = d.started_in;
    Ok((d, took))
}

impl Daemon {
    /// `VmHWM` of the daemon in bytes.
    fn peak_rss(&self) -> Res<u64> {
        proc_status_kb(self.pid(), "VmHWM")
    }

    /// CPU seconds of the daemon's threads by thread name.
    fn cpu_by_thread(&self) -> HashMap<String, f64> {
        let mut out = HashMap::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) else {
            return out;
        };
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            *out.entry(comm.trim().to_owned()).or_default() += schedstat_secs(&t.path());
        }
        out
    }
}

/// CPU time (s) of one thread, from `<task>/schedstat` (first field: ns on CPU).
fn schedstat_secs(task: &Path) -> f64 {
    std::fs::read_to_string(task.join("schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

fn queue_depth(socket: &Path) -> Res<u64> {
    status(socket)?["queue"]["depth"]
        .as_u64()
        .ok_or_else(|| "status without queue.depth".to_owned())
}

// ---------------------------------------------------------------------------------------------
// Workload.

/// The first `lines` lines of NDJSON input.
fn first_lines(input: &[u8], lines: usize) -> &[u8] {
    let end = input
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'\n')
        .nth(lines.saturating_sub(1))
        .map_or(input.len(), |(i, _)| i + 1);
    &input[..end]
}

// ---------------------------------------------------------------------------------------------
// Figures of one repeat.

#[derive(Debug, Default, Clone)]
struct Sample {
    single_rate: f64,
    /// CPU µs per change of figure 1: client thread, daemon runtime threads, store thread.
    cpu_client: f64,
    cpu_runtime: f64,
    cpu_store: f64,
    multi_rate: f64,
    multi_hwm: f64,
    lat_p50_ms: f64,
    lat_p99_ms: f64,
    lat_max_ms: f64,
    lat_offered: f64,
    hwm: f64,
    startup_ms: f64,
    startup_empty_ms: f64,
    restart_hwm: f64,
    recovery_ms: f64,
    recovery_hwm: f64,
    shutdown_ms: f64,
    file_per_change: f64,
}

/// Figures 1, 4 and 5 on one store.
fn single_client(args: &Args, input: &[u8], s: &mut Sample, run: usize) -> Res<()> {
    let n = args.single;
    let setup = setup(args, run)?;
    let (mut d, first_start) = start_daemon(&setup)?;
    s.startup_empty_ms = first_start.as_secs_f64() * 1e3;
    let daemon_cpu0 = d.cpu_by_thread();
    let client_cpu0 = schedstat_secs(Path::new("/proc/thread-self"));
    let t0 = Instant::now();
    let queued = stream(&d.socket, input)?;
    let dt = t0.elapsed();
    let client_cpu = schedstat_secs(Path::new("/proc/thread-self")) - client_cpu0;
    let daemon_cpu = d.cpu_by_thread();
    if queued != n as u64 {
        return Err(format!("{queued} of {n} changes acknowledged"));
    }
    s.single_rate = n as f64 / dt.as_secs_f64();
    let spent = |pred: &dyn Fn(&str) -> bool| -> f64 {
        daemon_cpu
            .iter()
            .filter(|(k, _)| pred(k))
            .map(|(k, v)| v - daemon_cpu0.get(k).copied().unwrap_or(0.0))
            .sum::<f64>()
    };
    let per_change = |secs: f64| secs * 1e6 / n as f64;
    s.cpu_client = per_change(client_cpu);
    s.cpu_store = per_change(spent(&|k| k == "edgesync-store"));
    s.cpu_runtime = per_change(spent(&|k| k != "edgesync-store"));
    let depth = queue_depth(&d.socket)?;
    if depth != n as u64 {
        return Err(format!(
            "queue depth {depth} after {n} acknowledged changes"
        ));
    }
    s.hwm = d.peak_rss()? as f64;

    s.shutdown_ms = d.stop_clean()?.as_secs_f64() * 1e3;
    let size = std::fs::metadata(&setup.store)
        .map_err(|e| format!("store size: {e}"))?
        .len();
    s.file_per_change = size as f64 / n as f64;
    drop(d);
    let (mut d, startup) = start_daemon(&setup)?;
    s.startup_ms = startup.as_secs_f64() * 1e3;
    s.restart_hwm = d.peak_rss()? as f64;
    let depth = queue_depth(&d.socket)?;
    if depth != n as u64 {
        return Err(format!("queue depth {depth} after restart, expected {n}"));
    }

    // A crash (power cut): SIGKILL, then start again; redb repairs the file first.
    d.kill9();
    drop(d);
    let (mut d, recovery) = start_daemon(&setup)?;
    s.recovery_ms = recovery.as_secs_f64() * 1e3;
    s.recovery_hwm = d.peak_rss()? as f64;
    let depth = queue_depth(&d.socket)?;
    if depth != n as u64 {
        return Err(format!("queue depth {depth} after a crash, expected {n}"));
    }
    d.stop_clean()?;
    Ok(())
}

/// Figure 2: `CLIENTS` threads, each streaming its part with its own runtime and connection.
fn multi_client(args: &Args, input: &[u8], s: &mut Sample, run: usize) -> Res<()> {
    let part = first_lines(input, args.per_client);
    let setup = setup(args, run)?;
    let (mut d, _) = start_daemon(&setup)?;
    let start = Barrier::new(CLIENTS + 1);
    let (dt, results) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|_| {
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
    let expected = (CLIENTS * args.per_client) as u64;
    if total != expected {
        return Err(format!("{total} of {expected} changes acknowledged"));
    }
    s.multi_rate = total as f64 / dt.as_secs_f64();
    s.multi_hwm = d.peak_rss()? as f64;
    d.stop_clean()?;
    Ok(())
}

/// Figure 3: one change per request, sent on a fixed schedule without waiting for answers;
/// latency is from the write of a request to the read of its answer.
fn latency(args: &Args, s: &mut Sample, run: usize) -> Res<()> {
    let setup = setup(args, run)?;
    let (mut d, _) = start_daemon(&setup)?;
    let n = (args.rate as f64 * args.latency_secs) as usize;
    let period = Duration::from_nanos(1_000_000_000 / args.rate);
    let due = |i: usize| period * u32::try_from(i).unwrap_or(u32::MAX);
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
    // Send time of each request, ns after t0.
    let sent_at: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
    let t0 = Instant::now();
    let (latencies, sending) = std::thread::scope(|scope| {
        let sent_at = &sent_at;
        let requests = &requests;
        let sender = scope.spawn(move || -> Res<Duration> {
            let mut buf = Vec::with_capacity(64 * 1024);
            let mut i = 0;
            while i < n {
                let now = t0.elapsed();
                if now < due(i) {
                    std::thread::sleep(due(i) - now);
                }
                // Everything due by now goes out in one write (the sleep may overshoot).
                let now = t0.elapsed();
                buf.clear();
                let first = i;
                while i < n && due(i) <= now {
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
        let mut failure = None;
        for (i, at) in sent_at.iter().enumerate() {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) => failure = Some("the daemon closed the connection".to_owned()),
                Ok(_) if !line.starts_with("{\"ok\":true") => {
                    failure = Some(format!("answer {i}: {}", line.trim_end()));
                }
                Ok(_) => {}
                Err(e) => failure = Some(format!("answer {i}: {e}")),
            }
            if failure.is_some() {
                break;
            }
            let now = t0.elapsed().as_nanos() as u64;
            lat.push(now.saturating_sub(at.load(Ordering::Acquire)));
        }
        let sending = sender
            .join()
            .unwrap_or_else(|_| Err("sender panicked".into()));
        (failure.map_or(Ok(lat), Err), sending)
    });
    let mut lat = latencies?;
    let sending = sending?;
    lat.sort_unstable();
    let ms = |ns: u64| ns as f64 / 1e6;
    let pick = |q: f64| ms(lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)]);
    s.lat_p50_ms = pick(0.50);
    s.lat_p99_ms = pick(0.99);
    s.lat_max_ms = ms(lat.last().copied().unwrap_or(0));
    s.lat_offered = n as f64 / sending.as_secs_f64().max(1e-9);
    d.stop_clean()?;
    Ok(())
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
    group: u8,
    name: String,
    unit: &'static str,
    target: Target,
    values: Vec<f64>,
    scale: f64,
    decimals: usize,
}

impl Figure {
    fn fmt(&self, v: f64) -> String {
        format!("{:.*}", self.decimals, v / self.scale)
    }

    fn target(&self) -> String {
        match self.target {
            Target::None => "-".into(),
            Target::AtLeast(t) => format!("≥ {}", self.fmt(t)),
            Target::AtMost(t) => format!("≤ {}", self.fmt(t)),
        }
    }

    fn met(&self) -> &'static str {
        let m = median(&self.values);
        match self.target {
            Target::None => "-",
            Target::AtLeast(t) if m >= t => "yes",
            Target::AtMost(t) if m <= t => "yes",
            _ => "NO",
        }
    }
}

fn main() {
    common::main_of("ingest", run);
}

fn run() -> Res<()> {
    let args = parse_args()?;
    let started = Instant::now();
    println!(
        "edgesync ingest benchmark{}",
        if args.quick { " (--quick)" } else { "" }
    );
    print!("{}", machine_in(&args.dir));
    println!("load    {} at start", loadavg());
    println!("daemon  {}", common::daemon_path());
    println!(
        "work    fig.1 {} changes, fig.2 {CLIENTS}×{}, fig.3 {} req/s for {} s; {KEYS} keys, \
         {VALUE_LEN}-char string values; {} repeats{}\n",
        args.single,
        args.per_client,
        args.rate,
        args.latency_secs,
        args.repeats,
        if args.store_extra.is_empty() {
            String::new()
        } else {
            format!("; [store] {}", args.store_extra)
        }
    );

    let input = ndjson(args.single.max(args.per_client));
    let single_input = first_lines(&input, args.single);

    let mut samples = Vec::new();
    for r in 0..args.repeats {
        let mut s = Sample::default();
        let t = Instant::now();
        let mut line = format!("repeat {}/{}:", r + 1, args.repeats);
        if args.only.contains(&1) {
            single_client(&args, single_input, &mut s, 3 * r)?;
            let _ = write!(
                line,
                " 1 client {:.0}/s (CPU µs/change: client {:.2}, daemon runtime {:.2}, store {:.2}) · \
                 HWM {:.1} MiB · start {:.1} ms (stop {:.0} ms, after SIGKILL {:.0} ms) · \
                 {:.1} B/change ·",
                s.single_rate,
                s.cpu_client,
                s.cpu_runtime,
                s.cpu_store,
                s.hwm / MIB,
                s.startup_ms,
                s.shutdown_ms,
                s.recovery_ms,
                s.file_per_change
            );
        }
        if args.only.contains(&2) {
            multi_client(&args, &input, &mut s, 3 * r + 1)?;
            let _ = write!(
                line,
                " {CLIENTS} clients {:.0}/s (HWM {:.1} MiB) ·",
                s.multi_rate,
                s.multi_hwm / MIB
            );
        }
        if args.only.contains(&3) {
            latency(&args, &mut s, 3 * r + 2)?;
            let _ = write!(
                line,
                " latency p50 {:.2} p99 {:.2} max {:.2} ms at {:.0} req/s ·",
                s.lat_p50_ms, s.lat_p99_ms, s.lat_max_ms, s.lat_offered
            );
        }
        println!("{line} {:.1} s", t.elapsed().as_secs_f64());
        samples.push(s);
    }

    let col = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let figure = |group, name: &str, unit, target, values, scale, decimals| Figure {
        group,
        name: name.to_owned(),
        unit,
        target,
        values,
        scale,
        decimals,
    };
    let single = format!("1. durable ingest, 1 client ({} changes)", args.single);
    let multi = format!(
        "2. durable ingest, {CLIENTS} clients (×{})",
        args.per_client
    );
    let figures = [
        figure(
            1,
            &single,
            "changes/s",
            Target::AtLeast(300_000.0),
            col(|s| s.single_rate),
            1.0,
            0,
        ),
        figure(
            1,
            "   CPU per change: client (report_stream)",
            "µs",
            Target::None,
            col(|s| s.cpu_client),
            1.0,
            2,
        ),
        figure(
            1,
            "   CPU per change: daemon runtime threads",
            "µs",
            Target::None,
            col(|s| s.cpu_runtime),
            1.0,
            2,
        ),
        figure(
            1,
            "   CPU per change: daemon store writer",
            "µs",
            Target::None,
            col(|s| s.cpu_store),
            1.0,
            2,
        ),
        figure(
            2,
            &multi,
            "changes/s",
            Target::AtLeast(200_000.0),
            col(|s| s.multi_rate),
            1.0,
            0,
        ),
        figure(
            2,
            "   peak RSS after fig. 2",
            "MiB",
            Target::None,
            col(|s| s.multi_hwm),
            MIB,
            1,
        ),
        figure(
            3,
            "3. ack latency p50 at 10k changes/s",
            "ms",
            Target::None,
            col(|s| s.lat_p50_ms),
            1.0,
            2,
        ),
        figure(
            3,
            "3. ack latency p99 at 10k changes/s",
            "ms",
            Target::AtMost(5.0),
            col(|s| s.lat_p99_ms),
            1.0,
            2,
        ),
        figure(
            3,
            "3. ack latency max at 10k changes/s",
            "ms",
            Target::None,
            col(|s| s.lat_max_ms),
            1.0,
            2,
        ),
        figure(
            3,
            "   offered rate achieved",
            "req/s",
            Target::None,
            col(|s| s.lat_offered),
            1.0,
            0,
        ),
        figure(
            1,
            "4. peak RSS holding fig. 1's changes",
            "MiB",
            Target::AtMost(12.0 * MIB),
            col(|s| s.hwm),
            MIB,
            1,
        ),
        figure(
            1,
            "5. start-up with fig. 1's changes queued",
            "ms",
            Target::AtMost(100.0),
            col(|s| s.startup_ms),
            1.0,
            1,
        ),
        figure(
            1,
            "   start-up with an empty store",
            "ms",
            Target::None,
            col(|s| s.startup_empty_ms),
            1.0,
            1,
        ),
        figure(
            1,
            "   peak RSS right after that start-up",
            "MiB",
            Target::None,
            col(|s| s.restart_hwm),
            MIB,
            1,
        ),
        figure(
            1,
            "   start-up after SIGKILL (crash recovery)",
            "ms",
            Target::None,
            col(|s| s.recovery_ms),
            1.0,
            1,
        ),
        figure(
            1,
            "   peak RSS right after crash recovery",
            "MiB",
            Target::None,
            col(|s| s.recovery_hwm),
            MIB,
            1,
        ),
        figure(
            1,
            "   shutdown (SIGTERM to exit)",
            "ms",
            Target::None,
            col(|s| s.shutdown_ms),
            1.0,
            1,
        ),
        figure(
            1,
            "5. store file per queued change",
            "bytes",
            Target::None,
            col(|s| s.file_per_change),
            1.0,
            1,
        ),
    ];

    println!("\n| figure | median | min | max | unit | target | met? |");
    println!("| --- | ---: | ---: | ---: | --- | --- | --- |");
    for f in figures.iter().filter(|f| args.only.contains(&f.group)) {
        let mut v = f.values.clone();
        v.sort_by(f64::total_cmp);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            f.name,
            f.fmt(median(&v)),
            f.fmt(v.first().copied().unwrap_or(f64::NAN)),
            f.fmt(v.last().copied().unwrap_or(f64::NAN)),
            f.unit,
            f.target(),
            f.met()
        );
    }
    println!(
        "\n{} repeats in {:.0} s; {} at the end",
        args.repeats,
        started.elapsed().as_secs_f64(),
        loadavg()
    );
    Ok(())
}
