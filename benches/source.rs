//! Local MQTT source benchmark (docs/BENCHMARKS.md, "Local MQTT sources"): one QoS 1
//! publisher → a local Mosquitto → the agent's `[[source.mqtt]]` (each message durable in the
//! store before its PUBACK), against the same publisher → the same Mosquitto → a plain QoS 1
//! subscriber (rumqttc, automatic acks): what Mosquitto alone does on this machine.
//!
//! ```text
//! cargo bench --bench source                # 200,000 messages a figure
//! cargo bench --bench source -- --quick     # 20,000
//! SOURCE_BENCH_RATE=40000 cargo bench --bench source -- --quick   # the publisher paced
//! SOURCE_BENCH_DEBUG=1 cargo bench --bench source -- --quick      # the source's figures as it runs
//! ```
//!
//! Each figure runs with the local broker's `max_inflight_messages` at 20 (Mosquitto's
//! default) and at 1000: the QoS 1 messages Mosquitto sends a subscriber before waiting for
//! its PUBACKs. The agent holds PUBACKs until its append is durable (one fsync'ed group
//! commit), so that window, not the agent's CPU, is what limits it at 20. The rate is
//! messages over the time from the first publish to the last one taken (the subscriber:
//! received; the agent: `taken`, i.e. appended and acknowledged). The agent's link is up,
//! to a cloud Mosquitto over mTLS, so the drain runs too.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, Res, Setup, StatusConn, loadavg, machine, pki_and_mosquitto};
use edgesync_testkit::{Mosquitto, MosquittoOptions, TestPki};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

fn main() {
    common::main_of("source", run);
}

fn run() -> Res<()> {
    let quick =
        std::env::args().any(|a| a == "--quick") || !std::env::args().any(|a| a == "--bench");
    let n: u64 = if quick { 20_000 } else { 200_000 };
    println!(
        "edgesync local source benchmark{}",
        if quick { " (--quick)" } else { "" }
    );
    print!("{}", machine());
    println!("daemon  {}", common::daemon_path());
    println!(
        "work    {n} QoS 1 messages of one publisher (inflight 1000), payload a number, 100 topics"
    );
    println!("load    {} at start\n", loadavg());
    let (dir, pki, cloud) = pki_and_mosquitto("es-src-bench", "bench-src", Vec::new())?;
    for inflight in [20, 1000] {
        let local = local_broker(&pki, inflight)?;
        let port = local.tcp_port.ok_or("no tcp listener")?;
        let alone = mosquitto_alone(port, n)?;
        let agent = through_agent(dir.path(), &pki, cloud.tls_port, port, n, inflight)?;
        println!(
            "max_inflight_messages {inflight:>4}: Mosquitto alone {:>8.0} msg/s · through the agent {:>8.0} changes/s ({:.0} %)",
            alone,
            agent,
            100.0 * agent / alone
        );
    }
    Ok(())
}

fn local_broker(pki: &TestPki, inflight: u32) -> Res<Mosquitto> {
    Mosquitto::start(
        pki,
        MosquittoOptions {
            plain_tcp: true,
            allow_anonymous: true,
            extra_config: vec![
                format!("max_inflight_messages {inflight}"),
                "max_queued_messages 1000000".into(),
            ],
            ..MosquittoOptions::default()
        },
    )
    .map_err(|e| format!("mosquitto: {e}"))?
    .ok_or_else(|| "mosquitto is not installed".to_owned())
}

/// Publishes `n` messages at QoS 1 (1000 in flight) from a thread; returns when the
/// broker acknowledged all of them.
fn publish(port: u16, n: u64, tag: &str) -> Res<std::thread::JoinHandle<Res<()>>> {
    let mut o = MqttOptions::new(format!("pub-{tag}"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(1000);
    let (client, mut conn) = Client::new(o, 1000);
    Ok(std::thread::spawn(move || {
        let sender = std::thread::spawn(move || {
            let rate: u64 = std::env::var("SOURCE_BENCH_RATE")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            let t0 = Instant::now();
            for i in 0..n {
                if rate > 0 && i % 1000 == 0 {
                    let due = t0 + Duration::from_secs_f64(i as f64 / rate as f64);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
                let topic = format!("bench/k{}", i % 100);
                if client
                    .publish(topic, QoS::AtLeastOnce, false, i.to_string())
                    .is_err()
                {
                    return;
                }
            }
        });
        let mut acked = 0;
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked += 1;
                    if acked == n {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(format!("publisher: {e}")),
            }
        }
        let _ = sender.join();
        Ok(())
    }))
}

/// The same publisher to a plain QoS 1 subscriber: messages a second.
fn mosquitto_alone(port: u16, n: u64) -> Res<f64> {
    let mut o = MqttOptions::new("plain-sub", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = Client::new(o, 1000);
    client
        .subscribe("bench/+", QoS::AtLeastOnce)
        .map_err(|e| e.to_string())?;
    for ev in conn.iter() {
        if let Ok(Event::Incoming(Packet::SubAck(_))) = ev {
            break;
        }
        ev.map_err(|e| e.to_string())?;
    }
    let got = Arc::new(AtomicU64::new(0));
    let g = Arc::clone(&got);
    let t0 = Instant::now();
    let publisher = publish(port, n, "alone")?;
    for ev in conn.iter() {
        if let Ok(Event::Incoming(Packet::Publish(_))) = ev
            && g.fetch_add(1, Ordering::Relaxed) + 1 == n
        {
            break;
        }
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    publisher.join().map_err(|_| "publisher panicked")??;
    let _ = client.disconnect();
    Ok(rate)
}

/// The agent with one source on the local broker: changes taken a second.
fn through_agent(
    dir: &std::path::Path,
    pki: &TestPki,
    cloud: u16,
    port: u16,
    n: u64,
    inflight: u32,
) -> Res<f64> {
    let dir = dir.join(format!("agent-{inflight}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let socket = std::path::PathBuf::from(format!(
        "/tmp/es-src-{}-{inflight}.sock",
        std::process::id()
    ));
    let text = format!(
        "[device]\nid = \"bench-src\"\n\
         [mqtt]\nurl = \"mqtts://localhost:{cloud}\"\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
         [store]\npath = \"edgesync.redb\"\nmax_bytes = \"2GiB\"\nwhen_full = \"reject\"\n\
         [local]\nsocket = {socket:?}\n\
         [[source.mqtt]]\nurl = \"mqtt://127.0.0.1:{port}\"\nfilter = \"bench/+\"\n\
         key = \"bench.{{2}}\"\nvalue = \"number\"\nmax_inflight = 1000\n",
        ca = pki.ca,
        cert = pki.client_cert,
        key = pki.client_key,
    );
    let setup = Setup::write(&dir, socket, &text)?;
    let mut d = Daemon::start(&setup, false)?;
    let mut status = StatusConn::connect(&d.socket)?;
    let source = |s: &serde_json::Value, f: &str| s["metrics"]["sources"][0][f].clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while source(&status.get()?, "connected") != true {
        if Instant::now() > deadline {
            return Err(format!("source not connected: {}", d.log_tail()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let t0 = Instant::now();
    let publisher = publish(port, n, &format!("agent-{inflight}"))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let st = status.get()?;
        if std::env::var("SOURCE_BENCH_DEBUG").is_ok() && t0.elapsed().as_millis() % 200 < 2 {
            eprintln!("{:?} {}", t0.elapsed(), st["metrics"]["sources"][0]);
        }
        if source(&st, "taken").as_u64() >= Some(n) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("not every message taken: {}", d.log_tail()));
        }
        // Poll interval (a 1 ms error on runs of a second or more).
        std::thread::sleep(Duration::from_millis(1));
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    publisher.join().map_err(|_| "publisher panicked")??;
    d.stop()?;
    Ok(rate)
}
