//! The cloud-profile bench both `benches/aws.rs` and `benches/azure.rs` run (issues 17, 18):
//! the same workload against the test kit's emulator of each cloud, so the figures compare.
//! 1. document updates: {REPORTS} one-change reports as fast as the socket takes them, over
//!    {KEYS} keys (an AWS shadow holds at most 8 KB of state, so not 5,000 distinct keys);
//!    updates accepted per second until the document (shadow or twin `reported`) holds every
//!    key's last value, and changes per update (coalescing);
//! 2. bytes per change of those reports: in the change history (payload bytes / changes)
//!    and in the document requests (request payload bytes the emulator received / changes);
//! 3. sustained updates: reports paced at 2,000/s for 4 s (more than one update can take in,
//!    so every update is followed by the next at once); updates accepted per second over the
//!    middle 2 s (the update round trip bounds it: one request in flight per document);
//! 4. latency: 50 desired changes, one key at a time, from just before the emulator's
//!    service-side update to the start of an exec handler (`date +%s%N` appended to a file).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::{Daemon, Setup, wait_online};
use edgesync_testkit::{Mosquitto, TestPki};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

pub const REPORTS: usize = 5000;
pub const KEYS: usize = 100;
pub const DELTAS: usize = 50;
/// Reports per second and seconds of the paced phase.
pub const PACE: u32 = 2000;
pub const PACE_SECS: u32 = 4;
pub const DEADLINE: Duration = Duration::from_secs(120);

/// What the bench reads of a cloud emulator.
pub trait Emu {
    /// The document's name in the figures: `shadow`, `twin`.
    fn doc(&self) -> &'static str;
    /// Updates of reported values accepted, and rejected, since the emulator started.
    fn accepted(&self) -> u64;
    fn rejected(&self) -> u64;
    /// Requests on the document's topics, and their payload bytes.
    fn requests(&self) -> u64;
    fn request_bytes(&self) -> u64;
    /// The document's reported values (`edgesync.desired_result` included).
    fn reported(&self) -> Value;
    /// The change-history payloads received so far.
    fn history(&self) -> Vec<Vec<u8>>;
    /// Sets desired state as the cloud's service side does; the new version.
    fn set_desired(&self, patch: Value) -> Result<u64, Error>;
}

/// The daemon under test: its socket, and the file its exec handler on `led.*` stamps.
pub struct Agent {
    pub daemon: Daemon,
    pub socket: std::path::PathBuf,
    pub stamps: std::path::PathBuf,
}

/// Starts the daemon as `device` in `dir` against `broker` over mutual TLS, with the
/// profile's sections (`cloud`: `[cloud]` and its cloud's section) and the handler the
/// latency phase times; returns once it is online.
pub fn start_agent(
    dir: &Path,
    broker: &Mosquitto,
    pki: &TestPki,
    device: &str,
    cloud: &str,
) -> Result<Agent, Error> {
    let socket = dir.join("s.sock");
    let stamps = dir.join("stamps");
    let handler = serde_json::to_string(&[
        "/bin/sh",
        "-c",
        &format!("date +%s%N >> {}", stamps.display()),
    ])?;
    let config = dir.join("edgesync.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"{device}\"\n[mqtt]\nurl = \"mqtts://localhost:{}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             keep_alive = \"30s\"\n[store]\npath = \"store.redb\"\nmax_bytes = \"1GiB\"\n[local]\nsocket = {socket:?}\n\
             {cloud}\n\
             [[desired.handler]]\nkeys = \"led.*\"\ntype = \"exec\"\ncommand = {handler}\n",
            broker.tls_port, pki.ca, pki.client_cert, pki.client_key
        ),
    )?;
    let setup = Setup {
        config,
        socket: socket.clone(),
        log: dir.join("daemon.log"),
    };
    let level = std::env::var("BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into());
    let daemon = Daemon::start_with(&setup, false, &[("EDGESYNC_LOG", &level)])?;
    wait_online(&daemon)?;
    Ok(Agent {
        daemon,
        socket,
        stamps,
    })
}

/// Polls `cond` until it holds, at most [`DEADLINE`].
fn wait_for(cond: impl Fn() -> bool) -> Result<(), Error> {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > DEADLINE {
            return Err("timed out".into());
        }
        // Poll interval, not a settling delay.
        thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Runs the four phases against `emu` and `agent`; prints the figures.
pub fn run<E: Emu>(emu: &E, agent: &Agent) -> Result<(), Error> {
    let (daemon, socket, stamps) = (
        &agent.daemon,
        agent.socket.as_path(),
        agent.stamps.as_path(),
    );
    let doc = emu.doc();
    // 1. Updates of the cloud's document: reports written back to back, answers read on another thread.
    let before = (
        emu.accepted(),
        emu.rejected(),
        emu.request_bytes(),
        emu.requests(),
    );
    let conn = UnixStream::connect(socket)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let answers = thread::spawn(move || -> Result<usize, String> {
        let (mut line, mut ok) = (String::new(), 0);
        for _ in 0..REPORTS {
            line.clear();
            reader.read_line(&mut line).map_err(|e| e.to_string())?;
            ok += usize::from(line.contains("\"ok\":true"));
        }
        Ok(ok)
    });
    let mut writer = std::io::BufWriter::new(conn);
    let t0 = Instant::now();
    for i in 0..REPORTS {
        let r =
            json!({"op": "report", "changes": [{"key": format!("k{:03}", i % KEYS), "value": i}]});
        writeln!(writer, "{r}")?;
    }
    writer.flush()?;
    let ok = answers.join().map_err(|_| "reader panicked")??;
    let queued = t0.elapsed().as_secs_f64();
    if ok != REPORTS {
        return Err(format!("{ok} of {REPORTS} reports answered ok").into());
    }
    // Until the document holds every key's last value.
    let done = |e: &E| {
        let d = e.reported();
        (REPORTS - KEYS..REPORTS).all(|i| d[format!("k{:03}", i % KEYS)] == i)
    };
    let mut samples = Vec::new();
    while !done(emu) {
        if t0.elapsed() > DEADLINE {
            return Err(format!("{doc} did not converge: {}", daemon.log_tail()).into());
        }
        samples.push((t0.elapsed(), emu.accepted()));
        thread::sleep(Duration::from_millis(20));
    }
    let secs = t0.elapsed().as_secs_f64();
    let after = (
        emu.accepted(),
        emu.rejected(),
        emu.request_bytes(),
        emu.requests(),
    );
    let updates = after.0 - before.0;
    let rejected = after.1 - before.1;
    // Best 1 s window of the samples.
    let peak = samples
        .iter()
        .filter_map(|&(t, n)| {
            let (_, m) = samples
                .iter()
                .rev()
                .find(|(u, _)| *u <= t.saturating_sub(Duration::from_secs(1)))?;
            Some(n - m)
        })
        .max();

    // 2. Bytes per change: every change in the history (waited for), and the document's share.
    let history = |e: &E| {
        e.history().iter().fold((0usize, 0usize), |(c, b), p| {
            (c + changes_in(p), b + p.len())
        })
    };
    wait_for(|| history(emu).0 >= REPORTS)?;
    let (hist_changes, hist_bytes) = history(emu);
    let doc_bytes = after.2 - before.2;
    let doc_msgs = after.3 - before.3;

    // 3. Sustained updates: reports paced faster than updates can follow; the count of
    // updates accepted is sampled at 1 s and at 3 s of the phase.
    let conn = UnixStream::connect(socket)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let paced = (PACE * PACE_SECS) as usize;
    let (hist0, doc0) = (history(emu), emu.request_bytes());
    let answers = thread::spawn(move || -> Result<usize, String> {
        let (mut line, mut ok) = (String::new(), 0);
        for _ in 0..paced {
            line.clear();
            reader.read_line(&mut line).map_err(|e| e.to_string())?;
            ok += usize::from(line.contains("\"ok\":true"));
        }
        Ok(ok)
    });
    let mut writer = &conn;
    let spacing = Duration::from_secs(1) / PACE;
    let t1 = Instant::now();
    let mut marks = [None, None];
    for i in 0..paced {
        let due = t1 + spacing * u32::try_from(i)?;
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        let at = t1.elapsed();
        for (k, mark) in marks.iter_mut().enumerate() {
            if mark.is_none() && at >= Duration::from_secs(1 + 2 * k as u64) {
                *mark = Some((at, emu.accepted()));
            }
        }
        let r =
            json!({"op": "report", "changes": [{"key": format!("k{:03}", i % KEYS), "value": i}]});
        writer.write_all(format!("{r}\n").as_bytes())?;
    }
    let ok = answers.join().map_err(|_| "reader panicked")??;
    if ok != paced {
        return Err(format!("{ok} of {paced} paced reports answered ok").into());
    }
    let sustained = match marks {
        [Some((a, n)), Some((b, m))] => (m - n) as f64 / (b - a).as_secs_f64(),
        _ => return Err("the paced phase was too short to sample".into()),
    };
    wait_for(|| history(emu).0 >= hist0.0 + paced)?;
    let hist1 = history(emu);
    let paced_hist = (hist1.1 - hist0.1) as f64 / (hist1.0 - hist0.0).max(1) as f64;
    let paced_doc = (emu.request_bytes() - doc0) as f64 / paced as f64;
    let paced_rejected = emu.rejected() - after.1;

    // 4. Desired → handler start, one key at a time, each from idle (its result in the
    // document).
    let mut lat = Vec::with_capacity(DELTAS);
    for i in 0..DELTAS {
        let start_ns = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let v = emu.set_desired(json!({"led": {"level": i}}))?;
        let started = wait_lines(stamps, i + 1)?;
        let ns = started
            .get(i)
            .and_then(|l| l.trim().parse::<u128>().ok())
            .ok_or("bad stamp")?;
        lat.push(ns.saturating_sub(start_ns) as f64 / 1e6);
        wait_for(|| emu.reported()["edgesync"]["desired_result"]["version"] == v)?;
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];

    println!();
    println!("figure                                                 value");
    println!(
        "reports queued ({REPORTS} one-change reports, {KEYS} keys)      {:8.0} reports/s",
        REPORTS as f64 / queued
    );
    println!(
        "{doc} updates accepted, burst (until converged)         {:8.1} updates/s ({updates} in {secs:.2} s, {rejected} rejected)",
        updates as f64 / secs
    );
    println!(
        "{doc} updates accepted, sustained (paced {PACE}/s reports)   {sustained:8.1} updates/s ({paced_rejected} rejected)"
    );
    println!(
        "paced: change history / {doc} bytes per change          {paced_hist:8.1} B / {paced_doc:.1} B"
    );
    if let Some(p) = peak {
        println!("{doc} updates accepted, best 1 s window                {p:8} updates/s");
    }
    println!(
        "changes per {doc} update (coalescing)                   {:8.1}",
        REPORTS as f64 / updates.max(1) as f64
    );
    println!(
        "change history: bytes per change                       {:8.1} B ({hist_bytes} B, {hist_changes} changes)",
        hist_bytes as f64 / hist_changes.max(1) as f64
    );
    println!(
        "{doc} requests: payload bytes per change                {:8.1} B ({doc_bytes} B in {doc_msgs} requests)",
        doc_bytes as f64 / REPORTS as f64
    );
    println!(
        "desired → handler start p50 ({DELTAS} changes)              {:8.2} ms",
        pct(0.5)
    );
    println!(
        "desired → handler start p95                            {:8.2} ms",
        pct(0.95)
    );
    println!(
        "desired → handler start max                            {:8.2} ms",
        pct(1.0)
    );
    Ok(())
}

/// Changes in one change batch (JSON or CBOR, [§5.1]).
fn changes_in(payload: &[u8]) -> usize {
    let v: Value = if payload.first() == Some(&b'{') {
        serde_json::from_slice(payload).unwrap_or_default()
    } else {
        ciborium::from_reader(payload).unwrap_or_default()
    };
    v["changes"].as_array().map_or(0, Vec::len)
}

/// The file's lines once it has at least `n` (polled).
fn wait_lines(file: &std::path::Path, n: usize) -> Result<Vec<String>, Error> {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.lines().count() >= n && text.ends_with('\n') {
            return Ok(text.lines().map(str::to_owned).collect());
        }
        if t0.elapsed() > DEADLINE {
            return Err(format!("handler ran {} times, expected {n}", text.lines().count()).into());
        }
        // Poll interval, not a settling delay.
        thread::sleep(Duration::from_micros(200));
    }
}
