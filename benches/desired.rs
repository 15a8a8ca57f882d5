//! Desired state: broker → handler start latency, and apply throughput.
//!
//! `cargo bench --bench desired [-- --quick]`
//!
//! Starts a broker (Mosquitto, mutual TLS) and the real daemon with a `watch`
//! handler for keys `w.*` (keys `n.*` have no handler: the value is only recorded). A local
//! program watches `w.*` over the socket and acks at once.
//! 1. latency: the cloud publishes one document at a time; time from the publish call to
//!    the watcher receiving the event (the handler's start), p50/p95/max;
//! 2. throughput: the cloud publishes documents back to back (one key each, no handler);
//!    documents/s until the last one's result is published.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, Setup, machine, mqtt_options, nodelay, wait_online};
use edgesync_testkit::{Mosquitto, MosquittoOptions, TestPki};
use rumqttc::{Client, Event, Packet, QoS};
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error + Send + Sync>;

const DEVICE: &str = "bench-desired";

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    // Mosquitto queues at most 1000 messages per client by default: stay below.
    let (samples, docs) = if quick { (50, 200) } else { (500, 900) };
    print!("{}", machine());
    let dir = tempfile::Builder::new().prefix("esbd").tempdir_in("/tmp")?;
    let pki = TestPki::generate_for(&dir.path().join("pki"), DEVICE, "edgesync")?;
    // Mosquitto (mutual TLS), as a fleet would run; rumqttd's router adds tens of ms.
    let broker = Mosquitto::start(&pki, MosquittoOptions::default())?
        .ok_or("the desired bench needs mosquitto (apt-get install mosquitto)")?;
    let socket = dir.path().join("s.sock");
    let config = dir.path().join("edgesync.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"{DEVICE}\"\n[mqtt]\nurl = \"mqtts://localhost:{}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             [store]\npath = \"store.redb\"\nmax_bytes = \"1GiB\"\n[local]\nsocket = {socket:?}\n\
             [[desired.handler]]\nkeys = \"w.*\"\ntype = \"watch\"\ndeadline = \"5s\"\n",
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

    // The cloud: publishes documents, reads results.
    let mut o = mqtt_options(&pki, broker.tls_port, "bench-cloud")?;
    o.set_inflight(1000);
    let (client, mut connection) = Client::new(o, 10_000);
    nodelay(&mut connection);
    client.subscribe(
        format!("edgesync/{DEVICE}/desired/result"),
        QoS::AtLeastOnce,
    )?;
    let (results_tx, results) = mpsc::channel::<u64>();
    let (suback_tx, suback) = mpsc::channel::<()>();
    thread::spawn(move || {
        for ev in connection.iter() {
            match ev {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = suback_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(v) = serde_json::from_slice::<Value>(&p.payload)
                        && let Some(n) = v["version"].as_u64()
                    {
                        let _ = results_tx.send(n);
                    }
                }
                Ok(_) => {}
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    suback.recv_timeout(Duration::from_secs(10))?;

    // The watching program.
    let mut watch = UnixStream::connect(&socket)?;
    watch.write_all(b"{\"op\":\"watch\",\"keys\":[\"w.*\"]}\n")?;
    let (events_tx, events) = mpsc::channel::<(u64, Instant)>();
    let mut reader = BufReader::new(watch.try_clone()?);
    let mut acker = watch;
    thread::spawn(move || {
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            let at = Instant::now();
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["event"] == "desired"
            {
                let _ = events_tx.send((v["version"].as_u64().unwrap_or(0), at));
                let ack = json!({"op": "ack", "id": v["id"], "ok": true});
                let _ = acker.write_all(format!("{ack}\n").as_bytes());
            }
            line.clear();
        }
    });

    let topic = format!("edgesync/{DEVICE}/desired");
    // 1. Latency, one document at a time.
    let mut lat = Vec::with_capacity(samples);
    for v in 1..=samples as u64 {
        let doc = json!({"version": v, "state": {"w.setpoint": v}}).to_string();
        let t0 = Instant::now();
        client.publish(&topic, QoS::AtLeastOnce, false, doc)?;
        let (got, at) = events
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| format!("no handler event for version {v}: {e}"))?;
        if got != v {
            return Err(format!("event for version {got}, expected {v}").into());
        }
        lat.push(at.duration_since(t0).as_secs_f64() * 1000.0);
        // Wait for its result so the next document starts from idle.
        while results
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| format!("no result for version {v}: {e}"))?
            < v
        {}
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];

    // 2. Throughput, back to back, no handler.
    let first = samples as u64 + 1;
    let last = first + docs as u64 - 1;
    let t0 = Instant::now();
    for v in first..=last {
        let doc = json!({"version": v, "state": {"n.value": v}}).to_string();
        client.publish(&topic, QoS::AtLeastOnce, false, doc)?;
    }
    while results
        .recv_timeout(Duration::from_secs(60))
        .map_err(|e| format!("no result for version {last}: {e}"))?
        < last
    {}
    let secs = t0.elapsed().as_secs_f64();

    println!();
    println!("figure                                             value         target");
    println!(
        "broker → handler start latency p50                 {:8.2} ms   ≤ 5 ms {}",
        pct(0.5),
        if pct(0.5) <= 5.0 { "(met)" } else { "(MISSED)" }
    );
    println!(
        "broker → handler start latency p95                 {:8.2} ms",
        pct(0.95)
    );
    println!(
        "broker → handler start latency max                 {:8.2} ms",
        pct(1.0)
    );
    println!(
        "apply throughput, no handler ({docs} documents)        {:8.0} documents/s",
        docs as f64 / secs
    );
    Ok(())
}
