//! The `aws-iot` profile (docs/PROTOCOL.md §7.3, issue 17): shadow update rate, desired
//! delta → handler latency, and bytes on the wire per change.
//!
//! `cargo bench --bench aws`
//!
//! Starts Mosquitto (mutual TLS), the test kit's AWS IoT Core emulator (Device Shadow, with a
//! capture of the change-history topic) and the real daemon with `profile = "aws-iot"`.
//! 1. shadow updates: 5,000 one-change reports as fast as the socket takes them, over
//!    100 keys (a shadow holds at most 8 KB of state, so not 5,000 distinct keys); updates
//!    accepted per second until the shadow holds every key's last value, and changes per
//!    update (coalescing);
//! 2. bytes per change of those reports: on the change-history topic (payload bytes /
//!    changes) and on the shadow topics (request bytes the emulator received / changes);
//! 3. sustained shadow updates: reports paced at 2,000/s for 4 s (more than one update can
//!    take in, so every update is followed by the next at once); updates accepted per second
//!    over the middle 2 s (the update round trip bounds it: one request in flight per shadow);
//! 4. latency: 50 desired deltas, one key at a time, from just before the emulator's
//!    `update_desired` to the start of an exec handler (`date +%s%N` appended to a file).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Daemon, Setup, machine, wait_online};
use edgesync_testkit::aws::{AwsIot, Connect, Options};
use edgesync_testkit::{Mosquitto, MosquittoOptions, TestPki};
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error + Send + Sync>;

const THING: &str = "bench-aws";
const REPORTS: usize = 5000;
const KEYS: usize = 100;
const DELTAS: usize = 50;
/// Reports per second and seconds of the paced phase.
const PACE: u32 = 2000;
const PACE_SECS: u32 = 4;
const DEADLINE: Duration = Duration::from_secs(120);

fn main() -> Result<(), Error> {
    print!("{}", machine());
    println!("command: cargo bench --bench aws");
    let dir = tempfile::Builder::new().prefix("esba").tempdir_in("/tmp")?;
    let pki = TestPki::generate_for(&dir.path().join("pki"), THING, "edgesync")?;
    let broker = Mosquitto::start(&pki, MosquittoOptions::default())?
        .ok_or("the aws bench needs mosquitto (apt-get install mosquitto)")?;
    let options = Options {
        capture: vec!["edgesync/+/changes".into()],
        ..Options::default()
    };
    let emu = AwsIot::start_with(&Connect::mosquitto(&broker, &pki)?, options)?;
    emu.wait_for(DEADLINE, AwsIot::is_ready)?;

    let socket = dir.path().join("s.sock");
    let stamps = dir.path().join("stamps");
    let handler = serde_json::to_string(&[
        "/bin/sh",
        "-c",
        &format!("date +%s%N >> {}", stamps.display()),
    ])?;
    let config = dir.path().join("edgesync.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"{THING}\"\n[mqtt]\nurl = \"mqtts://localhost:{}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             keep_alive = \"30s\"\n[store]\npath = \"store.redb\"\nmax_bytes = \"1GiB\"\n[local]\nsocket = {socket:?}\n\
             [cloud]\nprofile = \"aws-iot\"\n[aws]\n\
             [[desired.handler]]\nkeys = \"led.*\"\ntype = \"exec\"\ncommand = {handler}\n",
            broker.tls_port, pki.ca, pki.client_cert, pki.client_key
        ),
    )?;
    let setup = Setup {
        config,
        socket: socket.clone(),
        log: dir.path().join("daemon.log"),
    };
    let level = std::env::var("BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into());
    let daemon = Daemon::start_with(&setup, false, &[("EDGESYNC_LOG", &level)])?;
    wait_online(&daemon)?;
    // The connect's /get is answered before the figures start.
    emu.wait_for(DEADLINE, |e| {
        let s = e.stats().shadow;
        s.gets_accepted + s.gets_rejected > 0
    })?;

    // 1. Shadow updates: reports written back to back, answers read on another thread.
    let before = emu.stats();
    let conn = UnixStream::connect(&socket)?;
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
    // Until the shadow holds every key's last value.
    let done = |e: &AwsIot| {
        e.shadow(THING, None).is_some_and(|d| {
            (REPORTS - KEYS..REPORTS)
                .all(|i| d["state"]["reported"][format!("k{:03}", i % KEYS)] == i)
        })
    };
    let mut samples = Vec::new();
    while !done(&emu) {
        if t0.elapsed() > DEADLINE {
            return Err(format!("shadow did not converge: {}", daemon.log_tail()).into());
        }
        samples.push((t0.elapsed(), emu.stats().shadow.updates_accepted));
        thread::sleep(Duration::from_millis(20));
    }
    let secs = t0.elapsed().as_secs_f64();
    let after = emu.stats();
    let updates = after.shadow.updates_accepted - before.shadow.updates_accepted;
    let rejected: u64 = after.shadow.updates_rejected.values().sum();
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

    // 2. Bytes per change: every change in the history (waited for), and the shadow's share.
    let topic = format!("edgesync/{THING}/changes");
    let history = |e: &AwsIot| {
        e.captured()
            .iter()
            .filter(|(t, _)| *t == topic)
            .fold((0usize, 0usize), |(c, b), (_, p)| {
                (c + changes_in(p), b + p.len())
            })
    };
    emu.wait_for(DEADLINE, |e| history(e).0 >= REPORTS)?;
    let (hist_changes, hist_bytes) = history(&emu);
    let shadow_bytes = after.shadow_bytes_received - before.shadow_bytes_received;
    let shadow_msgs = after.shadow_messages_received - before.shadow_messages_received;

    // 3. Sustained updates: reports paced faster than updates can follow; the count of
    // updates accepted is sampled at 1 s and at 3 s of the phase.
    let conn = UnixStream::connect(&socket)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let paced = (PACE * PACE_SECS) as usize;
    let (hist0, shadow0) = (history(&emu), emu.stats().shadow_bytes_received);
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
                *mark = Some((at, emu.stats().shadow.updates_accepted));
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
    emu.wait_for(DEADLINE, |e| history(e).0 >= hist0.0 + paced)?;
    let hist1 = history(&emu);
    let paced_hist = (hist1.1 - hist0.1) as f64 / (hist1.0 - hist0.0).max(1) as f64;
    let paced_shadow = (emu.stats().shadow_bytes_received - shadow0) as f64 / paced as f64;
    let paced_rejected: u64 = emu.stats().shadow.updates_rejected.values().sum::<u64>() - rejected;

    // 4. Delta → handler start, one key at a time, each from idle (its result in the shadow).
    let mut lat = Vec::with_capacity(DELTAS);
    for i in 0..DELTAS {
        let start_ns = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let v = emu.update_desired(THING, None, json!({"led": {"level": i}}))?;
        let started = wait_lines(&stamps, i + 1)?;
        let ns = started
            .get(i)
            .and_then(|l| l.trim().parse::<u128>().ok())
            .ok_or("bad stamp")?;
        lat.push(ns.saturating_sub(start_ns) as f64 / 1e6);
        emu.wait_for(DEADLINE, |e| {
            e.shadow(THING, None).is_some_and(|d| {
                d["state"]["reported"]["edgesync"]["desired_result"]["version"] == v
            })
        })?;
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
        "shadow updates accepted, burst (until converged)       {:8.1} updates/s ({updates} in {secs:.2} s, {rejected} rejected)",
        updates as f64 / secs
    );
    println!(
        "shadow updates accepted, sustained (paced {PACE}/s reports) {sustained:8.1} updates/s ({paced_rejected} rejected)"
    );
    println!(
        "paced: change history / shadow bytes per change        {paced_hist:8.1} B / {paced_shadow:.1} B"
    );
    if let Some(p) = peak {
        println!("shadow updates accepted, best 1 s window              {p:8} updates/s");
    }
    println!(
        "changes per shadow update (coalescing)                 {:8.1}",
        REPORTS as f64 / updates.max(1) as f64
    );
    println!(
        "change history: bytes per change                       {:8.1} B ({hist_bytes} B, {hist_changes} changes)",
        hist_bytes as f64 / hist_changes.max(1) as f64
    );
    println!(
        "shadow topics: bytes per change                        {:8.1} B ({shadow_bytes} B in {shadow_msgs} requests)",
        shadow_bytes as f64 / REPORTS as f64
    );
    println!(
        "desired delta → handler start p50 ({DELTAS} deltas)         {:8.2} ms",
        pct(0.5)
    );
    println!(
        "desired delta → handler start p95                      {:8.2} ms",
        pct(0.95)
    );
    println!(
        "desired delta → handler start max                      {:8.2} ms",
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
