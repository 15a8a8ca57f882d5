//! The one-command demo: `cargo run --release --example demo`.
//!
//! Starts an in-process MQTT broker (rumqttd) with TLS certificates made at start, the agent
//! against it (through a small proxy that can cut the link) with a temporary store, a
//! simulated device reporting a few changes a second, and a "cloud" subscriber. Halfway it
//! cuts the link: the queue grows; then restores it: the backlog drains in order. It checks
//! that every acknowledged change arrived and exits 0 (1 if anything is missing).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgesync::Client;
use edgesync::Config;
use edgesync::RawChange;
use edgesync::{Doc, Request};
use edgesync_testkit::{FaultProxy, RumqttdBroker, RumqttdOptions, TestPki};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};

const DEVICE: &str = "demo-pump";
const REPORT_EVERY: Duration = Duration::from_millis(250);
const CUT_AT: Duration = Duration::from_secs(4);
const CUT_FOR: Duration = Duration::from_secs(5);
const REPORTING_FOR: Duration = Duration::from_secs(12);

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(demo()) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Prints a line with the time since the start.
#[derive(Clone)]
struct Trace(Instant);

impl Trace {
    fn say(&self, who: &str, what: impl AsRef<str>) {
        let t = self.0.elapsed().as_secs_f64();
        println!("[{t:5.1}s] {who:<7} {}", what.as_ref());
    }
}

async fn demo() -> Result<bool, Error> {
    let trace = Trace(Instant::now());
    let dir = tempfile::tempdir()?;
    let pki = TestPki::generate_for(&dir.path().join("pki"), DEVICE, "edgesync")?;
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default())?;
    let proxy = FaultProxy::start(broker.tls_addr())?;
    println!(
        "edgesync demo: broker rumqttd with TLS on 127.0.0.1:{}, the agent reaches it through a cuttable link on :{}\n",
        broker.tls_port,
        proxy.port()
    );

    // The cloud: a subscriber on the broker itself (not through the cut link).
    let received = Arc::new(Mutex::new(Received::default()));
    let (cloud_cert, cloud_key) = pki.issue_client("cloud", "cloud")?;
    let (cloud, cloud_client) = cloud_subscriber(
        &pki,
        &cloud_cert,
        &cloud_key,
        broker.tls_port,
        &received,
        &trace,
    )
    .await?;

    // The agent, in this process, with a temporary store.
    let socket = dir.path().join("edgesync.sock");
    let config_path = dir.path().join("edgesync.toml");
    std::fs::write(
        &config_path,
        format!(
            "[device]\nid = \"{DEVICE}\"\n\
             [mqtt]\nurl = \"mqtts://localhost:{port}\"\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
             keep_alive = \"5s\"\nreconnect_initial = \"250ms\"\nreconnect_max = \"1s\"\n\
             [store]\npath = \"store/edgesync.redb\"\n\
             [local]\nsocket = {socket:?}\n\
             [[desired.rule]]\nkeys = \"setpoint\"\ntype = \"number\"\nmin = 5\nmax = 30\n",
            port = proxy.port(),
            ca = pki.ca,
            cert = pki.client_cert,
            key = pki.client_key,
        ),
    )?;
    let config = Config::load(&config_path).map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(edgesync::run_until(config, async move {
        let _ = stop_rx.await;
        "demo finished"
    }));
    let mut client = connect_when_ready(&socket).await?;
    wait_for(Duration::from_secs(10), || async {
        status(&socket)
            .await
            .is_some_and(|s| s["connection"]["state"] == "online")
    })
    .await
    .map_err(|()| "the agent did not come online")?;
    trace.say(
        "agent",
        "online: TLS 1.3, mutual certificates, persistent session",
    );

    // The device reports a temperature and, now and then, a mode.
    let start = Instant::now();
    let mut acked: Vec<u64> = Vec::new();
    let mut cut = false;
    let mut restored = false;
    let mut last_status = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < REPORTING_FOR {
        i += 1;
        let temp = 20.0 + ((i as f64) * 0.7).sin() * 2.0;
        let temp = (temp * 10.0).round() / 10.0;
        let mut changes = vec![RawChange::new("temp", json!(temp))];
        if i.is_multiple_of(8) {
            let mode = if i.is_multiple_of(16) { "eco" } else { "boost" };
            changes.push(RawChange::new("mode", json!(mode)));
        }
        let with_mode = changes.len() > 1;
        let reply = client.call(&Request::Report { changes }).await?;
        let (first, last) = (
            reply["first_seq"].as_u64().unwrap_or(0),
            reply["last_seq"].as_u64().unwrap_or(0),
        );
        acked.extend(first..=last);
        trace.say(
            "device",
            format!(
                "temp={temp}{} → queued as seq {first}{}",
                if with_mode { " + mode" } else { "" },
                if last > first {
                    format!("..{last}")
                } else {
                    String::new()
                }
            ),
        );
        if !cut && start.elapsed() >= CUT_AT {
            proxy.cut();
            cut = true;
            trace.say(
                "link",
                "✂ CUT: the proxy drops the connection and refuses new ones",
            );
        }
        if cut && !restored && start.elapsed() >= CUT_AT + CUT_FOR {
            proxy.restore();
            restored = true;
            trace.say("link", "✔ RESTORED");
        }
        if last_status.elapsed() >= Duration::from_secs(1) {
            last_status = Instant::now();
            if let Some(s) = status(&socket).await {
                trace.say(
                    "agent",
                    format!(
                        "{} · queue {} · sent {} acked {} resent {}",
                        s["connection"]["state"].as_str().unwrap_or("?"),
                        s["queue"]["depth"],
                        s["counters"]["sent"],
                        s["counters"]["acked"],
                        s["counters"]["resent"],
                    ),
                );
            }
        }
        tokio::time::sleep(REPORT_EVERY).await;
    }

    // Wait for the backlog to drain and every acknowledged change to reach the cloud.
    let want: BTreeSet<u64> = acked.iter().copied().collect();
    let drained = wait_for(Duration::from_secs(30), || async {
        let done = received
            .lock()
            .map(|r| want.is_subset(&r.seqs))
            .unwrap_or(false);
        done && status(&socket)
            .await
            .is_some_and(|s| s["queue"]["depth"] == 0)
    })
    .await
    .is_ok();

    // The cloud sets desired state: v1 applies, v2 has a setpoint out of range (that key
    // is rejected, the other applies), and v1 again arrives late (stale).
    println!();
    let desired = format!("edgesync/{DEVICE}/desired");
    let docs = [
        json!({"version": 1, "state": {"setpoint": 21.5, "mode": "eco"}}),
        json!({"version": 2, "state": {"setpoint": 99, "fan": "on"}}),
        json!({"version": 1, "state": {"setpoint": 18}}),
    ];
    for d in &docs {
        trace.say("cloud", format!("→ desired {d}"));
        cloud_client
            .publish(&desired, QoS::AtLeastOnce, false, d.to_string())
            .await?;
    }
    let results_in = wait_for(Duration::from_secs(10), || async {
        received.lock().map(|r| r.results >= 3).unwrap_or(false)
    })
    .await
    .is_ok();
    if let Some(state) = get_desired(&socket).await {
        trace.say(
            "agent",
            format!("desired state now {state} (edgesync get desired)"),
        );
    }

    // The operator asks the device over MQTT: a ping, one key's history, the same request
    // id again (answered from the record, not run twice), and a destructive command that
    // this agent does not allow.
    println!();
    let cmd = |name: &str| format!("edgesync/{DEVICE}/cmd/{name}");
    let requests = [
        ("ping", json!({"id": "op-1"})),
        (
            "history",
            json!({"id": "op-2", "args": {"key": "setpoint", "limit": 3}}),
        ),
        ("ping", json!({"id": "op-1"})),
        ("purge", json!({"id": "op-3", "args": {"confirm": true}})),
    ];
    for (name, req) in &requests {
        trace.say("cloud", format!("→ cmd/{name} {req}"));
        cloud_client
            .publish(cmd(name), QoS::AtLeastOnce, false, req.to_string())
            .await?;
    }
    let answers_in = wait_for(Duration::from_secs(10), || async {
        received
            .lock()
            .map(|r| r.answers >= requests.len() as u64)
            .unwrap_or(false)
    })
    .await
    .is_ok();

    let final_status = status(&socket).await.unwrap_or(Value::Null);
    let _ = stop_tx.send(());
    let _ = agent.await;
    drop(cloud);

    let r = received.lock().map_err(|_| "lock poisoned")?.clone();
    let missing: Vec<u64> = want.difference(&r.seqs).copied().collect();
    println!();
    println!("summary");
    println!(
        "  device: {} changes acknowledged (durable in the store)",
        want.len()
    );
    println!(
        "  cloud:  {} distinct changes received in {} batches, {} duplicates (resent after the cut; deduplicated by seq)",
        r.seqs.len(),
        r.batches,
        r.duplicates
    );
    println!(
        "  order:  {}",
        if r.out_of_order == 0 {
            "every batch in ascending seq".to_owned()
        } else {
            format!("{} seqs out of order", r.out_of_order)
        }
    );
    println!(
        "  agent:  queue {} · reconnects {} · resent {}",
        final_status["queue"]["depth"],
        final_status["counters"]["reconnects"],
        final_status["counters"]["resent"]
    );
    println!(
        "  desired: version {} applied; {} results received",
        final_status["desired"]["version"], r.results
    );
    println!("  commands: {} answers received", r.answers);
    if drained && missing.is_empty() && r.out_of_order == 0 && results_in && answers_in {
        println!("  result: OK — nothing lost, nothing out of order");
        Ok(true)
    } else {
        println!("  result: FAILED — missing seqs {missing:?}");
        Ok(false)
    }
}

#[derive(Debug, Default, Clone)]
struct Received {
    seqs: BTreeSet<u64>,
    results: u64,
    answers: u64,
    batches: u64,
    duplicates: u64,
    out_of_order: u64,
}

async fn cloud_subscriber(
    pki: &TestPki,
    cert: &std::path::Path,
    key: &std::path::Path,
    port: u16,
    received: &Arc<Mutex<Received>>,
    trace: &Trace,
) -> Result<(tokio::task::JoinHandle<()>, AsyncClient), Error> {
    let tls = edgesync::tls::client_config(&pki.ca, Some((cert, key)))?;
    let mut o = MqttOptions::new("demo-cloud", "localhost", port);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    o.set_keep_alive(Duration::from_secs(10));
    o.set_max_packet_size(1 << 24, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 64);
    client
        .subscribe(format!("edgesync/{DEVICE}/#"), QoS::AtLeastOnce)
        .await?;
    let received = Arc::clone(received);
    let trace = trace.clone();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let publisher = client.clone();
    let task = tokio::spawn(async move {
        let _keep = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic.ends_with("/reported") {
                        on_batch(&p.payload, &received, &trace);
                    } else if p.topic.contains("/cmd/") && p.topic.ends_with("/result") {
                        let s = String::from_utf8_lossy(&p.payload).into_owned();
                        let name = p.topic.split('/').nth(3).unwrap_or("?");
                        trace.say("cloud", format!("← cmd/{name} answer {s}"));
                        if let Ok(mut r) = received.lock() {
                            r.answers += 1;
                        }
                    } else if p.topic.ends_with("/desired/result") {
                        let s = String::from_utf8_lossy(&p.payload).into_owned();
                        trace.say("cloud", format!("← result {s}"));
                        if let Ok(mut r) = received.lock() {
                            r.results += 1;
                        }
                    } else if p.topic.ends_with("/status") {
                        let s = String::from_utf8_lossy(&p.payload).into_owned();
                        trace.say("cloud", format!("← status {s}"));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    trace.say("cloud", format!("subscriber connection error: {e}"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready_rx)
        .await
        .map_err(|_| "the cloud subscriber did not get its SUBACK")?
        .map_err(|_| "the cloud subscriber stopped")?;
    Ok((task, publisher))
}

async fn get_desired(socket: &std::path::Path) -> Option<Value> {
    let mut c = Client::connect(socket).await.ok()?;
    let get = Request::Get {
        doc: Doc::Desired,
        key: None,
    };
    let v = c.call(&get).await.ok()?;
    Some(v["state"].clone())
}

fn on_batch(payload: &[u8], received: &Arc<Mutex<Received>>, trace: &Trace) {
    let Ok(doc) = ciborium::from_reader::<Value, _>(payload) else {
        trace.say("cloud", "← undecodable batch");
        return;
    };
    let changes = doc["changes"].as_array().cloned().unwrap_or_default();
    let Ok(mut r) = received.lock() else { return };
    r.batches += 1;
    let mut prev = 0;
    let mut new = 0;
    for c in &changes {
        let seq = c["seq"].as_u64().unwrap_or(0);
        if seq <= prev {
            r.out_of_order += 1;
        }
        prev = seq;
        if r.seqs.insert(seq) {
            new += 1;
        } else {
            r.duplicates += 1;
        }
    }
    let first = changes
        .first()
        .map(|c| c["seq"].clone())
        .unwrap_or(Value::Null);
    let last = changes
        .last()
        .map(|c| c["seq"].clone())
        .unwrap_or(Value::Null);
    let sample = changes
        .last()
        .map(|c| format!("{}={}", c["key"].as_str().unwrap_or("?"), c["value"]))
        .unwrap_or_default();
    if changes.len() == 1 {
        trace.say("cloud", format!("← seq {first} {sample}"));
    } else {
        trace.say(
            "cloud",
            format!(
                "← batch of {} (seq {first}..{last}, {new} new), last {sample}",
                changes.len()
            ),
        );
    }
}

async fn connect_when_ready(socket: &std::path::Path) -> Result<Client, Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(socket).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn status(socket: &std::path::Path) -> Option<Value> {
    let mut c = Client::connect(socket).await.ok()?;
    c.call(&Request::Status).await.ok()
}

async fn wait_for<F, Fut>(timeout: Duration, mut cond: F) -> Result<(), ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(())
}
