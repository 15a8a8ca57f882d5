//! Issue 13, the link's items, against the real binary and a real broker (rumqttd, TLS):
//! a QoS 0 flood of desired documents (item 2), a retained document over the transport
//! limit (item 4), a leftover wildcard subscription in the agent's broker session, and a
//! link that drops every connection before a batch is through.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::cloud::{Cloud, DEADLINE, decode, pki, tls_agent, unique, wait};
use common::rig::wait_ping;
use common::{Agent, report_req};
use edgesync_testkit::{FaultProxy, RumqttdBroker, RumqttdOptions, TestPki};
use rumqttc::{Client, Event, MqttOptions, Outgoing, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};

/// How the agent reaches the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Direct,
    /// Plain MQTT through an [`Injector`].
    Injector,
    /// TLS through the testkit's fault proxy.
    FaultProxy,
}

struct Rig {
    device: String,
    /// Subscribed to `P/D/reported`.
    reported: Cloud,
    /// Subscribed to `P/D/+/result` (desired results) and used to publish.
    results: Cloud,
    /// Subscribed to `P/D/cmd/+/result`.
    answers: Cloud,
    agent: Agent,
    _broker: RumqttdBroker,
    /// Between the agent and the broker when the agent talks plain MQTT.
    injector: Option<Injector>,
    /// Between the agent and the broker's TLS port.
    proxy: Option<FaultProxy>,
    _pki: TestPki,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// The agent with `extra` appended to its config (after `[mqtt]`'s keys: `mqtt_extra`
    /// goes into `[mqtt]`). `before` runs once the broker is up, before the agent starts.
    fn start(
        device: &str,
        mqtt_extra: &str,
        extra: &str,
        before: impl FnOnce(&TestPki, u16),
    ) -> Rig {
        Self::start_with(device, mqtt_extra, extra, Via::Direct, before)
    }

    fn start_with(
        device: &str,
        mqtt_extra: &str,
        extra: &str,
        via: Via,
        before: impl FnOnce(&TestPki, u16),
    ) -> Rig {
        let inject = via == Via::Injector;
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path(), device);
        let broker = RumqttdBroker::start(
            &pki,
            RumqttdOptions {
                plain_tcp: inject,
                ..RumqttdOptions::default()
            },
        )
        .unwrap();
        // Narrow subscriptions: the cloud must not record the floods itself.
        let reported = Cloud::start(
            &pki,
            broker.tls_port,
            &format!("edgesync/{device}/reported"),
            false,
        );
        let results = Cloud::start(
            &pki,
            broker.tls_port,
            &format!("edgesync/{device}/desired/result"),
            false,
        );
        let answers = Cloud::start(
            &pki,
            broker.tls_port,
            &format!("edgesync/{device}/cmd/+/result"),
            false,
        );
        // With the injector the agent talks to the plain listener: so does `before` (a
        // session there is not the session of the same client id over TLS).
        before(&pki, broker.tcp_port.unwrap_or(broker.tls_port));
        let proxy = (via == Via::FaultProxy).then(|| FaultProxy::start(broker.tls_addr()).unwrap());
        let port = proxy.as_ref().map_or(broker.tls_port, FaultProxy::port);
        let mut opts = tls_agent(&pki, port, mqtt_extra);
        let injector = inject.then(|| Injector::start(broker.tcp_addr().unwrap()));
        if let Some(i) = &injector {
            opts.mqtt_url = format!("mqtt://127.0.0.1:{}", i.port);
            opts.ca_pem = Vec::new();
            opts.mqtt_extra = format!(
                "allow_plaintext = true\nkeep_alive = \"5s\"\nreconnect_initial = \"200ms\"\nreconnect_max = \"1s\"\n{mqtt_extra}"
            );
        }
        opts.extra_toml = extra.to_owned();
        let agent = Agent::start(opts);
        let rig = Rig {
            device: device.to_owned(),
            reported,
            results,
            answers,
            agent,
            _broker: broker,
            injector,
            proxy,
            _pki: pki,
            _dir: dir,
        };
        rig.wait_ready();
        rig
    }

    fn topic(&self, suffix: &str) -> String {
        format!("edgesync/{}/{suffix}", self.device)
    }

    fn pings(&self, id: &str) -> usize {
        self.answers
            .messages()
            .iter()
            .filter(|m| decode(&m.payload)["id"] == id)
            .count()
    }

    /// A ping comes back (sent again until the subscription is in place).
    fn wait_ready(&self) {
        wait_ping(&self.results, &self.device, &self.agent, |id| {
            self.pings(id) > 0
        });
    }

    fn desired_results(&self) -> Vec<Value> {
        self.results
            .messages()
            .iter()
            .map(|m| decode(&m.payload))
            .collect()
    }

    /// Reports `key = value` locally and waits until the cloud has it.
    fn report_syncs(&self, key: &str, value: Value, timeout: Duration) {
        let r = self.agent.request(&report_req([(key, value.clone())]));
        assert_eq!(r["ok"], true, "{r}");
        let started = Instant::now();
        loop {
            if self
                .reported
                .changes()
                .iter()
                .any(|c| c["key"] == key && c["value"] == value)
            {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "the report {key}={value} did not reach the cloud within {timeout:?}; status {}; log:\n{}",
                self.agent.status(),
                tail(&self.agent.log(), 40)
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Before a flood of version 1: version 10 applied (so every flood document is stale)
    /// and a report synced. Returns the agent's peak RSS (VmHWM, KiB) so far.
    fn flood_baseline(&self) -> u64 {
        self.results.publish(
            &self.topic("desired"),
            json!({"version": 10, "state": {"base": 1}}).to_string(),
            false,
        );
        wait("version 10 applied", DEADLINE, || {
            self.desired_results()
                .iter()
                .any(|r| r["version"] == 10 && r["status"] == "applied")
        });
        self.report_syncs("before", json!(1), DEADLINE);
        self.rss_kib("VmHWM:")
    }

    fn rss_kib(&self, field: &str) -> u64 {
        self.agent.proc_status_kib(field)
    }
}

/// A plain TCP proxy between the agent and the broker that can slip extra packets into the
/// broker → agent stream between whole packets, as fast as the agent reads: a broker that
/// sends faster than the agent takes in (rumqttd in a debug test process cannot).
struct Injector {
    port: u16,
    to_agent: Arc<Mutex<Option<Arc<Mutex<TcpStream>>>>>,
    /// Every filter of every UNSUBSCRIBE the agent sent.
    unsubscribed: Arc<Mutex<Vec<String>>>,
}

impl Injector {
    fn start(upstream: std::net::SocketAddr) -> Injector {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let to_agent = Arc::new(Mutex::new(None));
        let current = Arc::clone(&to_agent);
        let unsubscribed = Arc::new(Mutex::new(Vec::new()));
        let unsubs = Arc::clone(&unsubscribed);
        thread::spawn(move || {
            for agent in listener.incoming() {
                let Ok(agent) = agent else { return };
                let Ok(broker) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = agent.set_nodelay(true);
                let _ = broker.set_nodelay(true);
                let writer = Arc::new(Mutex::new(agent.try_clone().unwrap()));
                *current.lock().unwrap() = Some(Arc::clone(&writer));
                let (mut a, mut b) = (agent.try_clone().unwrap(), broker.try_clone().unwrap());
                let unsubs = Arc::clone(&unsubs);
                thread::spawn(move || {
                    while let Some(frame) = read_frame(&mut a) {
                        if frame[0] == 0xa2 {
                            unsubs.lock().unwrap().extend(unsubscribe_filters(&frame));
                        }
                        // PUBACKs of injected QoS 1 messages are not the broker's business.
                        if frame[0] == 0x40
                            && frame.len() == 4
                            && u16::from_be_bytes([frame[2], frame[3]]) >= INJECTED_PKIDS
                        {
                            continue;
                        }
                        if b.write_all(&frame).is_err() {
                            break;
                        }
                    }
                    let _ = b.shutdown(Shutdown::Both);
                    let _ = a.shutdown(Shutdown::Both);
                });
                let mut from_broker = broker;
                thread::spawn(move || {
                    while let Some(frame) = read_frame(&mut from_broker) {
                        if writer.lock().unwrap().write_all(&frame).is_err() {
                            break;
                        }
                    }
                    let _ = writer.lock().unwrap().shutdown(Shutdown::Both);
                });
            }
        });
        Injector {
            port,
            to_agent,
            unsubscribed,
        }
    }

    /// Writes `packet` to the agent (between two of the broker's packets); false if there is
    /// no connection.
    fn inject(&self, packet: &[u8]) -> bool {
        let Some(w) = self.to_agent.lock().unwrap().clone() else {
            return false;
        };
        w.lock().unwrap().write_all(packet).is_ok()
    }
}

/// The topic filters of an UNSUBSCRIBE packet.
fn unsubscribe_filters(frame: &[u8]) -> Vec<String> {
    let mut at = 1;
    while frame[at] & 0x80 != 0 {
        at += 1;
    }
    at += 1 + 2; // last length byte, packet id
    let mut out = Vec::new();
    while at + 2 <= frame.len() {
        let len = usize::from(u16::from_be_bytes([frame[at], frame[at + 1]]));
        at += 2;
        out.push(String::from_utf8_lossy(&frame[at..at + len]).into_owned());
        at += len;
    }
    out
}

/// One whole MQTT packet: fixed header byte, remaining length, body.
fn read_frame(r: &mut impl Read) -> Option<Vec<u8>> {
    let mut frame = vec![0u8; 1];
    r.read_exact(&mut frame).ok()?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        r.read_exact(&mut b).ok()?;
        frame.push(b[0]);
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let at = frame.len();
    frame.resize(at + len, 0);
    r.read_exact(&mut frame[at..]).ok()?;
    Some(frame)
}

/// Packet ids of QoS 1 messages the injector slips in (the broker's are far below).
const INJECTED_PKIDS: u16 = 0xc000;

/// An MQTT 3.1.1 PUBLISH packet at QoS 0.
fn publish_qos0(topic: &str, payload: &[u8]) -> Vec<u8> {
    publish(topic, payload, None)
}

/// An MQTT 3.1.1 PUBLISH packet at QoS 1 (`Some(pkid)`) or 0.
fn publish(topic: &str, payload: &[u8], pkid: Option<u16>) -> Vec<u8> {
    let mut len = 2 + topic.len() + payload.len() + if pkid.is_some() { 2 } else { 0 };
    let mut out = vec![if pkid.is_some() { 0x32 } else { 0x30 }];
    loop {
        let mut b = (len & 0x7f) as u8;
        len >>= 7;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    if let Some(id) = pkid {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A raw MQTT client with its event loop on a thread; counts its outgoing publishes
/// (written to the socket). `identity`: connect as the device itself (its certificate and
/// client id) instead of a fresh cloud identity.
fn raw_client(
    pki: &TestPki,
    port: u16,
    identity: Option<(&str, PathBuf, PathBuf)>,
    clean: bool,
    plain: bool,
) -> (Client, Arc<AtomicU64>) {
    let (id, cert, key) = match identity {
        Some((id, cert, key)) => (id.to_owned(), cert, key),
        None => {
            let id = format!("raw-{}", unique());
            let (cert, key) = pki.issue_client(&id, &id).expect("client cert");
            (id, cert, key)
        }
    };
    let tls = edgesync::tls::client_config(&pki.ca, Some((&cert, &key))).expect("tls");
    let mut o = MqttOptions::new(id, "localhost", port);
    if !plain {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    o.set_keep_alive(Duration::from_secs(5));
    o.set_clean_session(clean);
    o.set_max_packet_size(1 << 24, 1 << 24);
    let (client, mut connection) = Client::new(o, 16);
    let written = Arc::new(AtomicU64::new(0));
    let w = Arc::clone(&written);
    thread::spawn(move || {
        for ev in connection.iter() {
            match ev {
                Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                    w.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    w.fetch_add(1 << 32, Ordering::SeqCst);
                }
                // Never reconnect after a DISCONNECT (it would take the client id over).
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(rumqttc::ConnectionError::RequestsDone) => return,
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    (client, written)
}

// ---------------------------------------------------------------------------------------------
// Item 2: a QoS 0 flood of desired documents.

/// 2,000 stale desired documents of 200 KB (400 MB) at QoS 0, written to the agent as fast
/// as it reads them. Before the fix the intake queue was unbounded and held whatever the
/// agent read and had not yet taken in (issue 13: 666 MB peak for 8,000); now QoS 0 intake
/// beyond its bound is dropped and counted, the agent's peak RSS stays under 64 MiB, and
/// reports still sync.
#[test]
fn a_qos0_flood_of_desired_documents_keeps_memory_bounded_and_reports_flowing() {
    const FLOOD: u64 = 2000;
    const DOC: usize = 200_000;
    let rig = Rig::start_with("hl-flood", "", "", Via::Injector, |_, _| {});
    // Version 10 applied: every flood document (version 1) is stale.
    let baseline = rig.flood_baseline();

    let doc = json!({"version": 1, "state": {"k": "z".repeat(DOC)}}).to_string();
    let packet = publish_qos0(&rig.topic("desired"), doc.as_bytes());
    let injector = rig.injector.as_ref().unwrap();
    let started = Instant::now();
    for _ in 0..FLOOD {
        assert!(injector.inject(&packet), "the agent's connection went");
    }
    let sent = started.elapsed();
    // The agent still syncs, promptly: the uplink never waits for the intake.
    rig.report_syncs("after", json!(2), DEADLINE);
    let took = started.elapsed();
    // Wait until the agent has taken in all it kept: its answers and drops stop growing.
    let taken = || {
        let dropped = rig.agent.status()["counters"]["intake_dropped"]
            .as_u64()
            .unwrap_or(0);
        let stale = rig
            .desired_results()
            .iter()
            .filter(|r| r["status"] == "stale")
            .count() as u64;
        stale + dropped
    };
    wait(
        "every flood document answered or dropped",
        DEADLINE * 5,
        || taken() >= FLOOD,
    );
    let peak = rig.rss_kib("VmHWM:");
    let rss = rig.rss_kib("VmRSS:");
    let status = rig.agent.status();
    let dropped = status["counters"]["intake_dropped"].as_u64();
    eprintln!(
        "QoS 0 flood: {FLOOD} × {DOC} B written in {sent:.1?}, report synced after {took:.1?}; \
         agent peak RSS (VmHWM) {baseline} KiB before, {peak} KiB after (now {rss} KiB); \
         intake_dropped {dropped:?}"
    );
    assert!(
        peak < 64 * 1024,
        "peak RSS {peak} KiB (bound 64 MiB); log:\n{}",
        tail(&rig.agent.log(), 20)
    );
    assert!(dropped.is_some_and(|d| d > 0), "drops counted: {status}");
    assert_eq!(
        status["metrics"]["inbound"]["intake_dropped"].as_u64(),
        dropped,
        "and in the metrics: {status}"
    );
    let log = rig.agent.log();
    assert!(
        log.matches("QoS 0 intake full").count() < 20,
        "logged once per burst, not per message:\n{}",
        tail(&log, 20)
    );
    assert_eq!(status["connection"]["state"], "online", "{status}");
}

// ---------------------------------------------------------------------------------------------
// Item 4: a retained desired document over the transport limit.

/// A retained 5 MB desired document, over the agent's incoming packet limit (4 MiB here:
/// `desired.max_document_bytes = 4KiB`, the limit is 4 × that, at least 4 MiB). rumqttc
/// cannot read it and drops the connection; before the fix the agent reconnected,
/// subscribed again, got the retained document again, and so on for ever (issue 13: ~20
/// reconnects in 30 s, the uplink never progressed). Now the agent refuses it once with a
/// `rejected` result naming the size, does not subscribe `P/D/desired` again for a while,
/// and the uplink flows.
#[test]
fn a_retained_document_over_the_transport_limit_is_refused_once_and_the_uplink_flows() {
    let rig = Rig::start(
        "hl-giant",
        "",
        "[desired]\nmax_document_bytes = \"4KiB\"\n",
        |_, _| {},
    );
    rig.report_syncs("before", json!(0), DEADLINE);
    let giant = json!({"version": 1, "state": {"big": "z".repeat(5 << 20)}}).to_string();
    rig.results.publish(&rig.topic("desired"), giant, true);
    // Refused with a reason naming the size.
    wait(
        "a rejected result for the oversize document",
        DEADLINE,
        || {
            rig.desired_results()
                .iter()
                .any(|r| r["status"] == "rejected")
        },
    );
    let rejected: Vec<Value> = rig
        .desired_results()
        .into_iter()
        .filter(|r| r["status"] == "rejected")
        .collect();
    let error = rejected[0]["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("larger than this agent reads"), "{error}");
    let named = error
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse::<u64>().ok())
        .any(|n| n >= 5 << 20);
    assert!(named, "names the size: {error}");
    // The uplink flows: reports sync within a deadline, again and again, for 3 s (the old
    // loop reconnected every 0.2-1 s).
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(3) || n < 3 {
        n += 1;
        rig.report_syncs(&format!("after-{n}"), json!(n), Duration::from_secs(20));
    }
    let status = rig.agent.status();
    let reconnects = status["counters"]["reconnects"].as_u64().unwrap();
    eprintln!(
        "retained oversize: {n} reports synced in {:.1?} after it; reconnects {reconnects}; \
         results {}; last_error {}; peak RSS {} KiB",
        started.elapsed(),
        rejected.len(),
        status["connection"]["last_error"],
        rig.rss_kib("VmHWM:")
    );
    assert!(reconnects <= 2, "reconnects bounded: {status}");
    assert_eq!(rejected.len(), 1, "refused once: {rejected:?}");
    let counted = status["counters"]["oversize_refused"].as_u64().unwrap();
    assert!((1..=2).contains(&counted), "counted: {status}");
    assert!(
        status["connection"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not subscribing")),
        "status says what happened: {status}"
    );
    assert_eq!(status["connection"]["state"], "online", "{status}");
    let log = rig.agent.log();
    assert_eq!(
        log.matches("refused, not read").count(),
        1,
        "logged once:\n{}",
        tail(&log, 30)
    );
    // Commands still work.
    rig.wait_ready();
    assert!(rig.rss_kib("VmHWM:") < 64 * 1024);
}

// ---------------------------------------------------------------------------------------------
// A leftover wildcard subscription in the agent's broker session.

/// An old session of the agent's client id subscribed `#` (a debugging session, an older
/// agent). The broker keeps it and delivers every message of the broker to the agent,
/// including the agent's own publishes. Before the fix each one was logged at WARN, for
/// ever; now the first is logged, all are counted, and the agent unsubscribes the filters
/// that may have delivered it (`#` among them).
///
/// The agent talks plain MQTT through the test's proxy, which records its UNSUBSCRIBEs:
/// rumqttd 0.20 ignores an UNSUBSCRIBE of a filter restored from a persistent session (it
/// looks the filter up under the old connection's id and sends no UNSUBACK), so that the
/// messages stop cannot be shown with it; Mosquitto removes it.
#[test]
fn a_leftover_wildcard_subscription_is_logged_once_counted_and_unsubscribed() {
    let rig = Rig::start_with("hl-hash", "", "", Via::Injector, |pki, port| {
        let (old, events) = raw_client(
            pki,
            port,
            Some((
                pki.device_id.as_str(),
                pki.client_cert.clone(),
                pki.client_key.clone(),
            )),
            false,
            true,
        );
        old.subscribe("#", QoS::AtLeastOnce).unwrap();
        wait("the old session's SUBACK", DEADLINE, || {
            events.load(Ordering::SeqCst) >> 32 >= 1
        });
        old.disconnect().unwrap();
    });
    let foreign = |n: usize| {
        for i in 0..n {
            rig.results.publish(
                &format!("fleet/other-{i}/telemetry"),
                json!({"i": i}).to_string(),
                false,
            );
        }
    };
    let count = || {
        rig.agent.status()["counters"]["foreign_messages"]
            .as_u64()
            .unwrap_or(0)
    };
    foreign(100);
    wait("foreign messages counted", DEADLINE, || count() >= 100);
    rig.report_syncs("later", json!(1), DEADLINE);
    rig.wait_ready();
    let counted = count();
    let log = rig.agent.log();
    let warned = log
        .matches("ignoring a message on a topic this agent does not act on")
        .count();
    let unsubscribed = rig
        .injector
        .as_ref()
        .unwrap()
        .unsubscribed
        .lock()
        .unwrap()
        .clone();
    eprintln!(
        "leftover #: {counted} foreign messages counted, {warned} WARN line(s), \
         {} filters unsubscribed: {unsubscribed:?}",
        unsubscribed.len()
    );
    assert!(
        warned <= 2,
        "logged once, not per message:\n{}",
        tail(&log, 30)
    );
    for want in ["#", "fleet/#", "edgesync/#", "edgesync/hl-hash/#"] {
        assert!(
            unsubscribed.iter().any(|f| f == want),
            "{want} unsubscribed: {unsubscribed:?}"
        );
    }
    for own in ["edgesync/hl-hash/desired", "edgesync/hl-hash/cmd/+"] {
        assert!(!unsubscribed.iter().any(|f| f == own), "{own} kept");
    }
    let status = rig.agent.status();
    assert_eq!(
        status["metrics"]["inbound"]["foreign_messages"].as_u64(),
        Some(count()),
        "{status}"
    );
    assert_eq!(status["connection"]["state"], "online", "{status}");
}

// ---------------------------------------------------------------------------------------------
// A link that drops every connection before a full batch is through.

/// The fault proxy closes every connection after 12 KiB from the agent (TLS handshake
/// included); batches of 64 changes of 512 bytes (about 40 KB) never fit. Before the fix the
/// agent resent the same batch on every connection for ever; now, after 3 such connections
/// in a row, it halves the batch limit (64 → 32 → 16 changes), a batch gets through per
/// connection, and the backlog drains.
#[test]
fn a_link_that_drops_every_connection_mid_batch_still_drains_with_smaller_batches() {
    const CHANGES: u64 = 96;
    let rig = Rig::start_with(
        "hl-shrink",
        "",
        "[sync]\nbatch_max_changes = 64\nmax_inflight = 1\n",
        Via::FaultProxy,
        |_, _| {},
    );
    let proxy = rig.proxy.as_ref().unwrap();
    rig.report_syncs("before", json!(0), DEADLINE);
    let acked_before = rig.agent.status()["counters"]["acked"].as_u64().unwrap();
    proxy.drop_after(12 * 1024);
    let value = "v".repeat(500);
    let pairs: Vec<(String, Value)> = (0..CHANGES)
        .map(|i| (format!("k{i:03}"), json!(value)))
        .collect();
    let r = rig.agent.request(&report_req(
        pairs.iter().map(|(k, v)| (k.as_str(), v.clone())),
    ));
    assert_eq!(r["ok"], true, "{r}");
    let started = Instant::now();
    wait(
        "the backlog acknowledged through the dropping link",
        DEADLINE * 2,
        || rig.agent.status()["counters"]["acked"].as_u64().unwrap() >= acked_before + CHANGES,
    );
    let status = rig.agent.status();
    let batches: Vec<usize> = rig
        .reported
        .batches()
        .iter()
        .map(|b| b["changes"].as_array().map_or(0, Vec::len))
        .collect();
    eprintln!(
        "dropping link: {CHANGES} changes through in {:.1?}, {} connections, reconnects {}, \
         batch sizes seen {batches:?}",
        started.elapsed(),
        proxy.connections_accepted(),
        status["counters"]["reconnects"]
    );
    let log = rig.agent.log();
    assert!(
        log.contains("batches now at most 32 changes"),
        "{}",
        tail(&log, 30)
    );
}

/// The same flood at QoS 1, from a broker with an unbounded in-flight window (the injector
/// does not wait for PUBACKs; rumqttd allows 1,000 unacknowledged messages, Mosquitto 20 by
/// default but 0 = unlimited is common). QoS 1 is never dropped: beyond the intake's bound
/// it is not acknowledged and not kept, and once the intake has drained the agent reconnects
/// so that the broker sends it again, in order. Peak RSS stays under 64 MiB.
#[test]
fn a_qos1_flood_beyond_the_intake_bound_is_deferred_to_the_broker_not_held() {
    const FLOOD: u16 = 2000;
    const DOC: usize = 200_000;
    let rig = Rig::start_with("hl-flood1", "", "", Via::Injector, |_, _| {});
    let baseline = rig.flood_baseline();
    let doc = json!({"version": 1, "state": {"k": "z".repeat(DOC)}}).to_string();
    let injector = rig.injector.as_ref().unwrap();
    let started = Instant::now();
    let mut injected = 0;
    for i in 0..FLOOD {
        let packet = publish(
            &rig.topic("desired"),
            doc.as_bytes(),
            Some(INJECTED_PKIDS + i),
        );
        // The agent reconnects (to have deferred messages sent again): the flood ends there.
        if !injector.inject(&packet) {
            break;
        }
        injected += 1;
    }
    let sent = started.elapsed();
    rig.report_syncs("after", json!(2), DEADLINE);
    let status = rig.agent.status();
    let deferred = status["counters"]["intake_deferred"].as_u64();
    let peak = rig.rss_kib("VmHWM:");
    eprintln!(
        "QoS 1 flood: {injected} × {DOC} B written in {sent:.1?}; agent peak RSS (VmHWM) \
         {baseline} KiB before, {peak} KiB after; intake_deferred {deferred:?}, reconnects {}",
        status["counters"]["reconnects"]
    );
    assert!(
        peak < 64 * 1024,
        "peak RSS {peak} KiB (bound 64 MiB); log:\n{}",
        tail(&rig.agent.log(), 20)
    );
    assert!(
        deferred.is_some_and(|d| d > 0),
        "deferrals counted: {status}"
    );
    assert_eq!(
        status["counters"]["intake_dropped"], 0,
        "QoS 1 never dropped"
    );
    assert_eq!(status["connection"]["state"], "online", "{status}");
}

/// Deferred QoS 1 messages are not lost, with a real broker: 120 desired documents of
/// 200 KB (24 MB, three times the intake's bound), each setting a key of its own with a
/// higher version, published while the agent is stopped; once it runs again it reads
/// them as fast as the broker sends, defers what does not fit, reconnects when the intake
/// has drained, and the broker sends the rest again: every document applied, in order
/// (none stale), every key set.
#[test]
fn deferred_qos1_documents_all_arrive_in_order_after_the_reconnect() {
    const DOCS: u64 = 120;
    let rig = Rig::start("hl-defer", "", "", |_, _| {});
    rig.report_syncs("before", json!(0), DEADLINE);
    let filler = "z".repeat(200_000);
    rig.agent.signal("-STOP");
    for v in 1..=DOCS {
        rig.results.publish(
            &rig.topic("desired"),
            json!({"version": v, "state": {format!("k{v:03}"): v, "filler": filler}}).to_string(),
            false,
        );
    }
    rig.agent.signal("-CONT");
    wait("every document answered", DEADLINE * 2, || {
        rig.desired_results().iter().any(|r| r["version"] == DOCS)
    });
    let results = rig.desired_results();
    let mut applied: Vec<u64> = results
        .iter()
        // `partial`: the filler is over the 64 KiB value limit and refused; k### is applied.
        .filter(|r| r["status"] == "applied" || r["status"] == "partial")
        .filter_map(|r| r["version"].as_u64())
        .collect();
    // Results are QoS 1 until acknowledged (PROTOCOL §5.3): a result whose PUBACK came as
    // the link went for the redelivery is published once more, right after itself. A second
    // apply would be answered `duplicate`, not `applied`.
    applied.dedup();
    let status = rig.agent.status();
    let deferred = status["counters"]["intake_deferred"].as_u64().unwrap_or(0);
    eprintln!(
        "deferred QoS 1: {} results, {} applied, intake_deferred {deferred}, reconnects {}, peak RSS {} KiB",
        results.len(),
        applied.len(),
        status["counters"]["reconnects"],
        rig.rss_kib("VmHWM:")
    );
    assert!(
        results
            .iter()
            .all(|r| ["applied", "partial", "duplicate"].contains(&r["status"].as_str().unwrap())),
        "in order, none stale: {:?}",
        results
            .iter()
            .filter(|r| r["status"] != "applied")
            .map(|r| (r["version"].clone(), r["status"].clone()))
            .collect::<Vec<_>>()
    );
    let want: Vec<u64> = (1..=DOCS).collect();
    assert_eq!(applied, want, "every version applied once, in order");
    let r = rig.agent.request(&json!({"op": "get", "doc": "desired"}));
    for v in 1..=DOCS {
        assert_eq!(r["state"][format!("k{v:03}")], v, "k{v:03}");
    }
    assert!(deferred > 0, "the bound was reached: {status}");
}
