//! "The cloud": an MQTT client on the test broker that records every message it receives
//! (change batches, statuses, apply results) and publishes like a fleet back end would
//! (desired documents), plus the helpers the broker tests share.
//!
//! The client runs its event loop on a thread; [`Cloud::publish`] waits for the broker's
//! PUBACK, so once it returns the broker holds the message (retained, or queued for an
//! offline persistent session).

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use edgesync_testkit::TestPki;
use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport};
use serde_json::Value;

use super::AgentOptions;

/// How long the broker tests wait for anything to arrive.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A fresh PKI for `device` (org `edgesync`) in `dir`.
pub fn pki(dir: &Path, device: &str) -> TestPki {
    TestPki::generate_for(dir, device, "edgesync").expect("generate pki")
}

/// Agent options for a TLS broker at `port` (usually a proxy) with the pki's client cert.
pub fn tls_agent(pki: &TestPki, port: u16, extra: &str) -> AgentOptions {
    tls_options(
        pki,
        port,
        &format!(
            "keep_alive = \"5s\"\nreconnect_initial = \"200ms\"\nreconnect_max = \"1s\"\n{extra}"
        ),
    )
    .max_bytes("64MiB")
}

/// [`tls_agent`] for the `aws-iot` profile, whose check holds `mqtt.keep_alive` within AWS
/// IoT Core's 30-1200 s (the tests cut links by closing them, so a short one is not needed).
pub fn aws_agent(pki: &TestPki, port: u16) -> AgentOptions {
    let mut o = tls_agent(pki, port, "");
    o.mqtt_extra = o
        .mqtt_extra
        .replace("keep_alive = \"5s\"", "keep_alive = \"30s\"");
    o
}

/// [`tls_agent`] for the `azure-iot-hub` profile with IoT hub `hub` (its `[cloud]` and
/// `[azure]` sections in `extra_toml`: append further sections).
pub fn azure_agent(pki: &TestPki, port: u16, hub: &str) -> AgentOptions {
    let mut o = tls_agent(pki, port, "");
    o.extra_toml = format!("[cloud]\nprofile = \"azure-iot-hub\"\n[azure]\nhub = \"{hub}\"\n");
    o
}

/// Agent options for a TLS broker at `port` with the pki's client cert and CA, refusing
/// changes when full; `mqtt` is further `[mqtt]` lines.
pub fn tls_options(pki: &TestPki, port: u16, mqtt: &str) -> AgentOptions {
    AgentOptions {
        device_id: pki.device_id.clone(),
        mqtt_url: format!("mqtts://localhost:{port}"),
        ca_pem: std::fs::read(&pki.ca).expect("read ca"),
        mqtt_extra: format!(
            "cert = {:?}\nkey = {:?}\n{mqtt}",
            pki.client_cert, pki.client_key
        ),
        when_full: "reject".into(),
        ..AgentOptions::default()
    }
}

/// A payload as the agent sends it: JSON when it starts with `{`, a compressed batch (gzip,
/// docs/PROTOCOL.md §5.1) when it starts with `1f 8b`, else CBOR.
pub fn decode(payload: &[u8]) -> Value {
    if payload.starts_with(&[0x1f, 0x8b]) {
        return decode(&gunzip(payload));
    }
    if payload.first() == Some(&b'{') {
        serde_json::from_slice(payload).unwrap()
    } else {
        ciborium::from_reader(payload).unwrap()
    }
}

/// A gzip member as the agent writes it (a 10-byte header without options, deflate, CRC-32
/// and length): the back end's side. `tests/sync.rs` checks the same payloads with `gzip -d`.
pub fn gunzip(payload: &[u8]) -> Vec<u8> {
    assert!(
        payload.len() >= 18 && payload[..4] == [0x1f, 0x8b, 8, 0],
        "gzip header"
    );
    let body = &payload[10..payload.len() - 8];
    let data = miniz_oxide::inflate::decompress_to_vec(body).expect("inflate");
    let size = &payload[payload.len() - 4..];
    assert_eq!(size, (data.len() as u32).to_le_bytes(), "gzip ISIZE");
    data
}

/// A number unique in this test run (process id and a counter).
pub fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    u64::from(std::process::id()) * 1000 + N.fetch_add(1, Ordering::Relaxed)
}

/// Polls `cond` every 10 ms until it holds; fails with `what` after `timeout`.
pub fn wait(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A payload encoded as CBOR.
pub fn cbor(v: &impl serde::Serialize) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).unwrap();
    out
}

/// Options of an MQTT client `ROLE-N` with its own client certificate (issued now), TLS to
/// the broker at `port`, keep-alive 5 s.
pub fn client_options(pki: &TestPki, port: u16, role: &str) -> MqttOptions {
    let id = format!("{role}-{}", unique());
    let (cert, key) = pki
        .issue_client(&id, &id)
        .unwrap_or_else(|e| panic!("{role} cert: {e}"));
    let tls = edgesync::tls::client_config(&pki.ca, Some((&cert, &key))).expect("tls");
    let mut o = MqttOptions::new(id, "localhost", port);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    o.set_keep_alive(Duration::from_secs(5));
    o
}

/// How a [`subscriber`] connects and subscribes.
#[derive(Debug, Clone, Copy)]
pub struct Subscription {
    /// Names the client (`ROLE-N`, with its own certificate) and its failures.
    pub role: &'static str,
    /// A session kept across reconnects and broker restarts (clean_session = false).
    pub persistent: bool,
    /// How long the first SUBACK may take.
    pub suback: Duration,
}

/// An MQTT client with its own client certificate connected to the broker at `port` (TLS),
/// subscribed to `filter` at QoS 1, its event loop on a thread. Counts the subscription
/// becoming active (SUBACK, or a resumed session) in the returned counter, subscribes again
/// when the broker lost the session, and hands every other event to `on_event`. Returns
/// once the first SUBACK arrived.
pub fn subscriber(
    pki: &TestPki,
    port: u16,
    filter: &str,
    how: Subscription,
    mut on_event: impl FnMut(Event) + Send + 'static,
) -> (Client, Arc<AtomicU64>) {
    let role = how.role;
    let mut o = client_options(pki, port, role);
    o.set_clean_session(!how.persistent);
    o.set_max_packet_size(1 << 24, 1 << 24);
    let (client, mut connection) = Client::new(o, 64);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .expect("subscribe");
    let ready = Arc::new(AtomicU64::new(0));
    let ready2 = Arc::clone(&ready);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let resub = client.clone();
    let filter = filter.to_owned();
    thread::spawn(move || {
        for ev in connection.iter() {
            match ev {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    ready2.fetch_add(1, Ordering::SeqCst);
                    let _ = ready_tx.send(());
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if ack.session_present {
                        ready2.fetch_add(1, Ordering::SeqCst);
                    } else {
                        // A broker that lost our session: subscribe again.
                        let _ = resub.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                }
                Ok(ev) => on_event(ev),
                Err(rumqttc::ConnectionError::RequestsDone) => return,
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    ready_rx
        .recv_timeout(how.suback)
        .unwrap_or_else(|_| panic!("{role} got no SUBACK"));
    (client, ready)
}

/// One published message as the cloud saw it.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// Packet ids of the cloud's own publishes, as the event loop sees them.
#[derive(Debug, Default)]
struct PubState {
    /// Packet id of every outgoing PUBLISH, in order (a resend after a reconnect shows again).
    sent: Vec<u16>,
    /// PUBACKs received and not yet claimed by [`Cloud::publish`].
    acked: HashSet<u16>,
}

/// A subscriber ("the cloud") on a broker, in a thread, recording every message.
pub struct Cloud {
    msgs: Arc<Mutex<Vec<Msg>>>,
    /// Times the subscription became active (SUBACK, or a resumed session).
    ready: Arc<AtomicU64>,
    pubs: Arc<(Mutex<PubState>, Condvar)>,
    /// One publish at a time, so each finds its own packet id.
    publishing: Mutex<()>,
    client: Client,
}

impl Cloud {
    /// Connects with its own client certificate and subscribes to `filter`; returns once
    /// the SUBACK arrived. `persistent` keeps a session across broker restarts.
    pub fn start(pki: &TestPki, port: u16, filter: &str, persistent: bool) -> Cloud {
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let pubs = Arc::new((Mutex::new(PubState::default()), Condvar::new()));
        let pubs2 = Arc::clone(&pubs);
        let sink = Arc::clone(&msgs);
        let (client, ready) = subscriber(
            pki,
            port,
            filter,
            Subscription {
                role: "cloud",
                persistent,
                suback: Duration::from_secs(20),
            },
            move |ev| match ev {
                Event::Incoming(Packet::Publish(p)) => {
                    sink.lock().unwrap().push(Msg {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    });
                }
                Event::Outgoing(Outgoing::Publish(pkid)) => {
                    let (state, changed) = &*pubs2;
                    state.lock().unwrap().sent.push(pkid);
                    changed.notify_all();
                }
                Event::Incoming(Packet::PubAck(ack)) => {
                    let (state, changed) = &*pubs2;
                    state.lock().unwrap().acked.insert(ack.pkid);
                    changed.notify_all();
                }
                _ => {}
            },
        );
        Cloud {
            msgs,
            ready,
            pubs,
            publishing: Mutex::new(()),
            client,
        }
    }

    /// Publishes at QoS 1 and returns once the broker acknowledged it (PUBACK).
    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, retain: bool) {
        let _one_at_a_time = self.publishing.lock().unwrap();
        let (state, changed) = &*self.pubs;
        let index = state.lock().unwrap().sent.len();
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.into())
            .expect("hand the publish to the MQTT client");
        let deadline = Instant::now() + DEADLINE;
        let mut s = state.lock().unwrap();
        loop {
            if let Some(&pkid) = s.sent.get(index)
                && s.acked.remove(&pkid)
            {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no PUBACK for the publish on {topic}");
            s = changed.wait_timeout(s, left).unwrap().0;
        }
    }

    pub fn ready_count(&self) -> u64 {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn messages(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().clone()
    }

    /// Every change batch received (decoded), in arrival order.
    pub fn batches(&self) -> Vec<Value> {
        self.messages()
            .iter()
            .filter(|m| m.topic.ends_with("/reported"))
            .map(|m| decode(&m.payload))
            .collect()
    }

    /// Every change of every batch, in arrival order (resends included).
    pub fn changes(&self) -> Vec<Value> {
        self.batches()
            .iter()
            .flat_map(|b| b["changes"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The distinct seqs received.
    pub fn seqs(&self) -> BTreeSet<u64> {
        self.changes()
            .iter()
            .map(|c| c["seq"].as_u64().unwrap())
            .collect()
    }

    pub fn statuses(&self) -> Vec<(Value, bool)> {
        self.messages()
            .iter()
            .filter(|m| m.topic.ends_with("/status"))
            .map(|m| (serde_json::from_slice(&m.payload).unwrap(), m.retain))
            .collect()
    }

    /// Apply results (`.../desired/result`) as received: the raw message and its decoded
    /// document, in arrival order.
    pub fn results(&self) -> Vec<(Msg, Value)> {
        self.messages()
            .into_iter()
            .filter(|m| m.topic.ends_with("/desired/result"))
            .map(|m| {
                let v = decode(&m.payload);
                (m, v)
            })
            .collect()
    }

    /// Waits for the first message that `pick` accepts and returns what it made of it.
    pub fn wait_for<T>(&self, what: &str, mut pick: impl FnMut(&Msg) -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(t) = self.messages().iter().find_map(&mut pick) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; results so far: {:?}",
                self.results().iter().map(|(_, v)| v).collect::<Vec<_>>()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Publishes `payload` to `topic` until a message that `pick` accepts arrives (again
    /// every 500 ms): right after the agent reports "online" its subscription may not be in
    /// place yet (it follows the CONNACK), and a message published before it is not
    /// delivered. Only for messages the agent answers the same when repeated (a command
    /// with its id, a desired version).
    #[allow(dead_code)]
    pub fn publish_until<T>(
        &self,
        topic: &str,
        payload: &[u8],
        what: &str,
        mut pick: impl FnMut(&Msg) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            self.publish(topic, payload.to_vec(), false);
            let again = Instant::now() + Duration::from_millis(500);
            while Instant::now() < again {
                if let Some(t) = self.messages().iter().find_map(&mut pick) {
                    return t;
                }
                thread::sleep(Duration::from_millis(10));
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
        }
    }

    /// The first apply result of `version` with `status`, with its message.
    pub fn wait_result(&self, version: u64, status: &str) -> (Msg, Value) {
        self.wait_for(&format!("a {status:?} result of version {version}"), |m| {
            if !m.topic.ends_with("/desired/result") {
                return None;
            }
            let v = decode(&m.payload);
            (v["version"] == version && v["status"] == status).then(|| (m.clone(), v))
        })
    }

    /// Waits for a reported change of `key` with `value` and `origin` (`None`: made on the
    /// device, so without the field); returns it.
    pub fn wait_change(&self, key: &str, value: &Value, origin: Option<&str>) -> Value {
        let want_origin = origin.map_or(Value::Null, Value::from);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(c) = self
                .changes()
                .into_iter()
                .find(|c| c["key"] == key && &c["value"] == value && c["origin"] == want_origin)
            {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the reported change {key}={value} (origin {origin:?}); got {:?}",
                self.changes()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn wait_for_seqs(&self, want: &BTreeSet<u64>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.seqs();
            if want.is_subset(&got) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cloud is missing {} of {} seqs, e.g. {:?}",
                want.difference(&got).count(),
                want.len(),
                want.difference(&got).take(5).collect::<Vec<_>>()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}
