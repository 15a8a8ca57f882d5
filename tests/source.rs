//! Local MQTT sources (`[[source.mqtt]]`, docs/PROTOCOL.md §7.1) with real brokers: a local
//! Mosquitto (plain TCP on loopback) as the source, the cloud Mosquitto (mutual TLS) as the
//! sink. Mapping rules end to end, invalid payloads counted, kill -9 of the agent during a
//! flood losing nothing the local broker took, back-pressure at the store's bound, and the
//! loop guard of check-config.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::cloud::{Cloud, DEADLINE, pki, tls_agent, wait};
use common::{Agent, AgentOptions, assert_exit, stdout};
use edgesync_testkit::{FaultProxy, Mosquitto, MosquittoOptions, TestPki};
use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Value, json};

/// The local broker: plain TCP on loopback, anonymous, with room for an offline persistent
/// session (the settings docs/DEPLOY.md gives users).
fn local_broker(pki: &TestPki) -> Option<Mosquitto> {
    Mosquitto::start(
        pki,
        MosquittoOptions {
            plain_tcp: true,
            allow_anonymous: true,
            extra_config: vec![
                "max_inflight_messages 1000".into(),
                "max_queued_messages 1000000".into(),
            ],
            ..MosquittoOptions::default()
        },
    )
    .unwrap()
}

fn with_sources(mut o: AgentOptions, sources: &str) -> AgentOptions {
    o.extra_toml.push_str(sources);
    o
}

fn source(port: u16, filter: &str, key: &str, value: &str) -> String {
    format!(
        "[[source.mqtt]]\nurl = \"mqtt://127.0.0.1:{port}\"\nfilter = \"{filter}\"\n\
         key = \"{key}\"\nvalue = \"{value}\"\n"
    )
}

/// The agent's figures of source `i`.
fn figures(agent: &Agent, i: usize) -> Value {
    agent.status()["metrics"]["sources"][i].clone()
}

/// A QoS 1 publisher on the local broker whose PUBACKs are counted: what the broker took.
struct Publisher {
    client: Client,
    acked: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Publisher {
    fn start(port: u16, inflight: u16) -> Publisher {
        let mut o = MqttOptions::new(
            format!("pub-{}", common::cloud::unique()),
            "127.0.0.1",
            port,
        );
        o.set_keep_alive(Duration::from_secs(30));
        o.set_inflight(inflight);
        let (client, mut conn) = Client::new(o, 1024);
        let acked = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let (a, d) = (Arc::clone(&acked), Arc::clone(&done));
        let thread = thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Err(e) if !d.load(Ordering::SeqCst) => panic!("publisher: {e}"),
                    Err(_) => break,
                    _ => {}
                }
            }
        });
        Publisher {
            client,
            acked,
            done,
            thread: Some(thread),
        }
    }

    fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .unwrap();
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        let _ = self.client.disconnect();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The value of every change of `key` the cloud received.
fn values_of(cloud: &Cloud, key: &str) -> Vec<Value> {
    cloud
        .changes()
        .into_iter()
        .filter(|c| c["key"] == key)
        .map(|c| c["value"].clone())
        .collect()
}

#[test]
fn messages_map_to_changes_and_invalid_ones_are_counted_and_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let device = "src-map";
    let pki = pki(dir.path(), device);
    let Some(cloud_broker) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    let Some(local) = local_broker(&pki) else {
        return;
    };
    let port = local.tcp_port.unwrap();
    let cloud = Cloud::start(
        &pki,
        cloud_broker.tls_port,
        &format!("edgesync/{device}/reported"),
        false,
    );
    let agent = Agent::start(with_sources(
        tls_agent(&pki, cloud_broker.tls_port, ""),
        &(source(port, "sensors/+/temperature", "{2}.temperature", "number")
            + &source(port, "json/#", "{2}.{3}", "/v")
            + &source(port, "raw/+", "raw.{2}", "payload")),
    ));
    wait("sources subscribed", DEADLINE, || {
        (0..3).all(|i| figures(&agent, i)["connected"] == true)
    });
    let p = Publisher::start(port, 100);
    p.publish("sensors/t1/temperature", "21.5");
    p.publish("sensors/t1/temperature", "abc"); // not a number
    p.publish("sensors/bad key/temperature", "1"); // not a key
    p.publish("json/a/b", r#"{"v": {"x": 1}, "w": 2}"#);
    p.publish("json/a", r#"{"v": 1}"#); // no level 3
    p.publish("json/a/c", r#"{"w": 1}"#); // nothing at /v
    p.publish("raw/on", "on");
    p.publish("raw/obj", r#"{"a": [1, 2]}"#);
    wait("every message acknowledged", DEADLINE, || p.acked() == 8);
    wait("changes at the cloud", DEADLINE, || {
        cloud.changes().len() >= 4
    });
    assert_eq!(values_of(&cloud, "t1.temperature"), [json!(21.5)]);
    assert_eq!(values_of(&cloud, "a.b"), [json!({"x": 1})]);
    assert_eq!(values_of(&cloud, "raw.on"), [json!("on")]);
    assert_eq!(values_of(&cloud, "raw.obj"), [json!({"a": [1, 2]})]);
    // Counted once each append returned (after the cloud may have it already).
    wait("figures", DEADLINE, || figures(&agent, 2)["taken"] == 2);
    let s = [0, 1, 2].map(|i| figures(&agent, i));
    assert_eq!(
        (&s[0]["received"], &s[0]["taken"], &s[0]["invalid"]),
        (&json!(3), &json!(1), &json!(2))
    );
    assert_eq!(
        (&s[1]["received"], &s[1]["taken"], &s[1]["invalid"]),
        (&json!(3), &json!(1), &json!(2))
    );
    assert_eq!((&s[2]["taken"], &s[2]["invalid"]), (&json!(2), &json!(0)));
    let last = s[1]["last_invalid"].as_str().unwrap();
    assert!(
        last.contains("json/a/c") && last.contains("nothing at /v"),
        "{last}"
    );
    assert_eq!(s[0]["backpressure"], false);
    // Logged, and shown by `edgesync status`.
    assert!(agent.log().contains("not taken"), "{}", agent.log());
    let text = stdout(&agent.cli(&["status"]));
    assert!(
        text.contains("source      connected sensors/+/temperature"),
        "{text}"
    );
}

#[test]
fn kill9_during_a_flood_loses_nothing_the_local_broker_took() {
    let dir = tempfile::tempdir().unwrap();
    let device = "src-kill";
    let pki = pki(dir.path(), device);
    let Some(cloud_broker) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    let Some(local) = local_broker(&pki) else {
        return;
    };
    let port = local.tcp_port.unwrap();
    let cloud = Cloud::start(
        &pki,
        cloud_broker.tls_port,
        &format!("edgesync/{device}/reported"),
        false,
    );
    let mut agent = Agent::start(
        with_sources(
            tls_agent(&pki, cloud_broker.tls_port, ""),
            &source(port, "flood/+", "flood.{2}", "number"),
        )
        .max_bytes("256MiB"),
    );
    wait("source subscribed", DEADLINE, || {
        figures(&agent, 0)["connected"] == true
    });
    const N: u64 = 20_000;
    let publisher = Arc::new(Mutex::new(Publisher::start(port, 200)));
    let p2 = Arc::clone(&publisher);
    // Paced (about 10,000 a second) so that the kills land mid-flood.
    let flood = thread::spawn(move || {
        for i in 0..N {
            p2.lock()
                .unwrap()
                .publish(&format!("flood/k{}", i % 10), i.to_string());
            if i % 100 == 99 {
                thread::sleep(Duration::from_millis(10));
            }
        }
    });
    let acked = || publisher.lock().unwrap().acked();
    for round in 0..4 {
        let at = acked();
        wait("the flood going on", DEADLINE, || {
            acked() >= (at + 2_000).min(N)
        });
        if acked() >= N {
            break;
        }
        agent.kill9();
        eprintln!(
            "round {round}: killed at {} taken by the local broker",
            acked()
        );
        agent.restart();
    }
    flood.join().unwrap();
    wait("the local broker took every message", DEADLINE, || {
        acked() == N
    });
    let want: BTreeSet<u64> = (0..N).collect();
    let got = || -> BTreeSet<u64> {
        cloud
            .changes()
            .iter()
            .filter_map(|c| c["value"].as_u64())
            .collect()
    };
    wait(
        "every message at the cloud",
        Duration::from_secs(120),
        || got().len() == want.len(),
    );
    assert_eq!(got(), want);
    // Each value under the key of its topic.
    for c in cloud.changes() {
        let v = c["value"].as_u64().unwrap();
        assert_eq!(c["key"], format!("flood.k{}", v % 10));
    }
}

#[test]
fn at_the_store_bound_messages_wait_unacknowledged_in_the_local_broker() {
    let dir = tempfile::tempdir().unwrap();
    let device = "src-full";
    let pki = pki(dir.path(), device);
    let Some(cloud_broker) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    let Some(local) = local_broker(&pki) else {
        return;
    };
    let port = local.tcp_port.unwrap();
    let proxy = FaultProxy::start(cloud_broker.tls_addr()).unwrap();
    proxy.cut();
    let cloud = Cloud::start(
        &pki,
        cloud_broker.tls_port,
        &format!("edgesync/{device}/reported"),
        false,
    );
    // 1 MiB, refusing when full; the cloud out of reach: the store fills.
    let agent = Agent::start(
        with_sources(
            tls_agent(&pki, proxy.port(), ""),
            &source(port, "big/+", "big.{2}", "string"),
        )
        .max_bytes("1MiB")
        .when_full("reject"),
    );
    wait("source subscribed", DEADLINE, || {
        figures(&agent, 0)["connected"] == true
    });
    let p = Publisher::start(port, 100);
    const N: u64 = 1_500;
    let filler = "x".repeat(1000);
    for i in 0..N {
        // Few keys: the latest values stay small (they may take half the store).
        p.publish(&format!("big/k{}", i % 10), format!("{i}:{filler}"));
    }
    wait("back-pressure", DEADLINE, || {
        figures(&agent, 0)["backpressure"] == true
    });
    let s = figures(&agent, 0);
    assert!(s["held"].as_u64().unwrap() > 0, "{s}");
    assert!(s["taken"].as_u64().unwrap() < N, "{s}");
    let text = stdout(&agent.cli(&["status"]));
    assert!(text.contains("store refusing"), "{text}");
    // The cloud comes back: the queue drains, the held messages go in, nothing is lost.
    proxy.restore();
    wait(
        "every message at the cloud",
        Duration::from_secs(120),
        || {
            let seen: BTreeSet<String> = cloud
                .changes()
                .iter()
                .filter_map(|c| c["value"].as_str()?.split(':').next().map(str::to_owned))
                .collect();
            seen.len() as u64 == N
        },
    );
    wait("back-pressure over", DEADLINE, || {
        figures(&agent, 0)["backpressure"] == false
    });
}

#[test]
fn check_config_refuses_a_filter_that_would_loop() {
    let agent = Agent::prepare(with_sources(
        AgentOptions {
            mqtt_url: "mqtt://127.0.0.1:1883".into(),
            mqtt_extra: "allow_plaintext = true\n".into(),
            ..AgentOptions::default()
        },
        &source(1883, "+/test-1/#", "{1}", "payload"),
    ));
    let out = agent.cli(&["check-config"]);
    assert_exit(&out, 2);
    let err = common::stderr(&out);
    assert!(
        err.contains("source.mqtt[1].filter") && err.contains("loop"),
        "{err}"
    );
}
