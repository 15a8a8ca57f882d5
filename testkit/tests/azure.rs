//! The Azure IoT Hub emulator through a real Mosquitto over TLS, with a plain rumqttc client
//! as "the device": twin GET/PATCH with `$rid`, throttling, desired notifications only while
//! connected, direct methods (answer and timeout), C2D across a reconnect (persistent
//! session), D2C events with their property bags, the CONNECT check from Mosquitto's log.
//! Skipped with a notice when Mosquitto is not installed.

// Test code: clippy.toml's allow-*-in-tests covers #[test] functions only, not helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use edgesync_testkit::azure::{self, Connect, IotHub, Options, hub_status, topics};
use edgesync_testkit::{Mosquitto, MosquittoOptions, TestPki};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

const DEVICE: &str = "pump-0042";
const HUB: &str = "edgesync-test.azure-devices.net";
const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    _dir: tempfile::TempDir,
    pki: TestPki,
    broker: Mosquitto,
    hub: IotHub,
}

/// Mosquitto (TLS, client certificates required, user names kept) and the emulator on it;
/// `None` when Mosquitto is not installed.
fn setup_with(options: Options) -> Option<Setup> {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(&dir.path().join("pki")).unwrap();
    let broker = Mosquitto::start(
        &pki,
        MosquittoOptions {
            identity_as_username: false,
            ..MosquittoOptions::default()
        },
    )
    .unwrap()?;
    let hub = IotHub::start(&emulator_connect(&broker, &pki), options).unwrap();
    Some(Setup {
        _dir: dir,
        pki,
        broker,
        hub,
    })
}

fn setup() -> Option<Setup> {
    setup_with(Options::new(DEVICE, HUB))
}

fn emulator_connect(broker: &Mosquitto, pki: &TestPki) -> Connect {
    Connect::mosquitto_as(broker, pki, "iothub-emulator").unwrap()
}

/// The device: a rumqttc client (client id = device id, IoT Hub's user name) with the PKI's
/// client certificate; received messages wait in a buffer until a test asks for them.
struct Device {
    client: Client,
    rx: Receiver<(String, Vec<u8>)>,
    seen: Vec<(String, Vec<u8>)>,
    rid: u64,
}

impl Device {
    fn connect(s: &Setup, clean: bool, filters: &[&str]) -> Device {
        Device::connect_as(s, &s.hub.username(), clean, filters)
    }

    fn connect_as(s: &Setup, username: &str, clean: bool, filters: &[&str]) -> Device {
        Device::connect_to(&s.pki, &s.broker, username, clean, filters)
    }

    fn connect_to(
        pki: &TestPki,
        broker: &Mosquitto,
        username: &str,
        clean: bool,
        filters: &[&str],
    ) -> Device {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&pki.ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let chain = CertificateDer::pem_file_iter(&pki.client_cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&pki.client_key).unwrap();
        let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let mut opts = MqttOptions::new(DEVICE, "localhost", broker.tls_port);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
        opts.set_credentials(username, "");
        opts.set_clean_session(clean);
        opts.set_keep_alive(Duration::from_secs(60));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = Client::new(opts, 100);
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                let msg = match event {
                    Ok(Event::Incoming(Packet::SubAck(_))) => ("suback".to_owned(), Vec::new()),
                    Ok(Event::Incoming(Packet::ConnAck(_))) => ("connack".to_owned(), Vec::new()),
                    Ok(Event::Incoming(Packet::PubAck(_))) => ("puback".to_owned(), Vec::new()),
                    Ok(Event::Incoming(Packet::Publish(p))) => (p.topic, p.payload.to_vec()),
                    Ok(_) => continue,
                    Err(_) => return,
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
        });
        let mut dev = Device {
            client,
            rx,
            seen: Vec::new(),
            rid: 0,
        };
        dev.expect(|t| t == "connack");
        if !filters.is_empty() {
            dev.client
                .subscribe_many(
                    filters
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new((*f).to_owned(), QoS::AtLeastOnce)),
                )
                .unwrap();
            dev.expect(|t| t == "suback");
        }
        dev
    }

    fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .unwrap();
    }

    /// The first message whose topic satisfies `pred`, waiting up to 10 s.
    fn expect(&mut self, pred: impl Fn(&str) -> bool) -> (String, Vec<u8>) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.seen.iter().position(|(t, _)| pred(t)) {
                return self.seen.remove(i);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(m) => self.seen.push(m),
                Err(RecvTimeoutError::Timeout) => {
                    let topics: Vec<&str> = self.seen.iter().map(|(t, _)| t.as_str()).collect();
                    panic!("no expected message within {WAIT:?}; seen {topics:?}")
                }
                Err(RecvTimeoutError::Disconnected) => panic!("device connection ended"),
            }
        }
    }

    /// Sends a twin request and returns the response's topic and body.
    fn twin(&mut self, op: &str, body: &str) -> (String, Vec<u8>) {
        self.rid += 1;
        let rid = format!("r{}", self.rid);
        self.publish(&format!("$iothub/twin/{op}/?$rid={rid}"), body);
        let suffix = format!("/?$rid={rid}");
        self.expect(move |t| {
            t.starts_with("$iothub/twin/res/")
                && (t.ends_with(&suffix) || t.contains(&format!("{suffix}&")))
        })
    }

    fn get(&mut self) -> (String, Value) {
        let (t, body) = self.twin("GET", "");
        (t, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    fn patch(&mut self, body: &str) -> String {
        self.twin("PATCH/properties/reported", body).0
    }

    fn has_seen(&mut self, pred: impl Fn(&str) -> bool) -> bool {
        while let Ok(m) = self.rx.try_recv() {
            self.seen.push(m);
        }
        self.seen.iter().any(|(t, _)| pred(t))
    }

    /// DISCONNECT, and wait until the broker has let the client go.
    fn disconnect(self, broker: &Mosquitto) {
        let gone = format!("Client {DEVICE} disconnected");
        let before = broker.log().matches(&gone).count();
        self.client.disconnect().unwrap();
        edgesync_testkit::wait_until(WAIT, || broker.log().matches(&gone).count() > before)
            .unwrap();
    }
}

const TWIN_RES: &str = "$iothub/twin/res/#";
const DESIRED: &str = "$iothub/twin/PATCH/properties/desired/#";
const METHODS: &str = "$iothub/methods/POST/#";

fn c2d_filter() -> String {
    format!("devices/{DEVICE}/messages/devicebound/#")
}

fn events_topic(bag: &str) -> String {
    format!("devices/{DEVICE}/messages/events/{bag}")
}

#[test]
fn twin_get_and_patch_round_trip_with_rid_and_versions() {
    let Some(s) = setup() else { return };
    let mut dev = Device::connect(&s, true, &[TWIN_RES]);
    let (t, body) = dev.get();
    assert_eq!(t, "$iothub/twin/res/200/?$rid=r1");
    assert_eq!(
        body,
        json!({"desired":{"$version":1},"reported":{"$version":1}})
    );
    assert_eq!(
        dev.patch(r#"{"fw":"1.0","net":{"kind":"wifi","rssi":-60}}"#),
        "$iothub/twin/res/204/?$rid=r2&$version=2"
    );
    assert_eq!(
        dev.patch(r#"{"fw":null,"net":{"rssi":-70}}"#),
        "$iothub/twin/res/204/?$rid=r3&$version=3"
    );
    let (_, body) = dev.get();
    assert_eq!(
        body["reported"],
        json!({"net":{"kind":"wifi","rssi":-70},"$version":3})
    );
    assert_eq!(s.hub.reported(), body["reported"]);
    assert_eq!(s.hub.twin()["properties"], body);
    assert_eq!(s.hub.twin()["deviceId"], DEVICE);
    // Malformed and invalid patches: 400, nothing changes.
    assert_eq!(dev.patch("not json"), "$iothub/twin/res/400/?$rid=r5");
    assert_eq!(dev.patch(r#"{"a.b":1}"#), "$iothub/twin/res/400/?$rid=r6");
    assert_eq!(s.hub.reported_version(), 3);
    let (status, why) = s.hub.last_rejection().unwrap();
    assert_eq!(status, 400);
    assert!(why.contains("forbidden character"), "{why}");
    // A request without $rid cannot be answered: counted.
    dev.publish("$iothub/twin/GET/", "");
    s.hub
        .wait_for(WAIT, |h| h.stats().bad_requests == 1)
        .unwrap();
    let st = s.hub.stats();
    assert_eq!((st.twin_gets, st.twin_patches), (2, 4));
    assert_eq!(st.patches_accepted, 2);
    assert_eq!(st.patches_rejected.get(&400), Some(&2));
    // The CONNECT as Mosquitto logged it.
    let record = s.hub.check_connect_log(&s.broker.log()).unwrap();
    assert_eq!(record.client_id, DEVICE);
    assert_eq!(
        record.username.as_deref(),
        Some("edgesync-test.azure-devices.net/pump-0042/?api-version=2021-04-12")
    );
    assert_eq!((record.protocol, record.keep_alive_secs), (2, 60));
    assert!(record.clean_session);
    assert_eq!(
        topics::check_username(record.username.as_deref().unwrap(), HUB, DEVICE).unwrap(),
        azure::API_VERSION
    );
}

#[test]
fn a_wrong_user_name_fails_the_connect_check() {
    let Some(s) = setup() else { return };
    let _dev = Device::connect_as(&s, "edgesync-test.azure-devices.net/other/", true, &[]);
    let err = s.hub.check_connect_log(&s.broker.log()).unwrap_err();
    assert!(err.to_string().contains("does not start with"), "{err}");
}

#[test]
fn throttled_twin_requests_are_429_then_succeed() {
    let Some(s) = setup() else { return };
    let mut dev = Device::connect(&s, true, &[TWIN_RES]);
    s.hub.throttle_twin(2);
    assert_eq!(dev.patch(r#"{"a":1}"#), "$iothub/twin/res/429/?$rid=r1");
    assert_eq!(dev.get().0, "$iothub/twin/res/429/?$rid=r2");
    assert_eq!(
        dev.patch(r#"{"a":1}"#),
        "$iothub/twin/res/204/?$rid=r3&$version=2"
    );
    s.hub.inject_twin_errors(503, 1);
    assert_eq!(dev.get().0, "$iothub/twin/res/503/?$rid=r4");
    assert_eq!(dev.get().0, "$iothub/twin/res/200/?$rid=r5");
    let st = s.hub.stats();
    assert_eq!(st.patches_rejected.get(&429), Some(&1));
    assert_eq!(st.gets_rejected.get(&429), Some(&1));
    assert_eq!(st.gets_rejected.get(&503), Some(&1));
    assert_eq!(st.patches_accepted, 1);
}

/// With a response delay, twin answers come that much later, in request order.
#[test]
fn a_response_delay_holds_twin_answers_in_order() {
    let mut options = Options::new(DEVICE, HUB);
    options.response_delay = Duration::from_millis(300);
    let Some(s) = setup_with(options) else { return };
    let mut dev = Device::connect(&s, true, &[TWIN_RES]);
    let started = Instant::now();
    dev.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=a",
        r#"{"x":1}"#,
    );
    dev.publish("$iothub/twin/GET/?$rid=b", "");
    let (t, _) = dev.expect(|t| t.starts_with("$iothub/twin/res/"));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(t, "$iothub/twin/res/204/?$rid=a&$version=2");
    let (t, body) = dev.expect(|t| t.starts_with("$iothub/twin/res/"));
    assert_eq!(t, "$iothub/twin/res/200/?$rid=b");
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["reported"], json!({"x":1,"$version":2}));
}

/// IoT Hub sends desired notifications only while the device is connected: QoS 0, so
/// Mosquitto drops them for the offline persistent session; the GET after reconnect has them.
#[test]
fn desired_patches_reach_a_connected_device_only_and_the_get_after_reconnect_has_them() {
    let Some(s) = setup() else { return };
    let mut dev = Device::connect(&s, false, &[TWIN_RES, DESIRED]);
    assert_eq!(
        s.hub
            .update_desired(json!({"rate":5,"cfg":{"a":1}}))
            .unwrap(),
        2
    );
    let (t, body) = dev.expect(|t| t.starts_with("$iothub/twin/PATCH/properties/desired/"));
    assert_eq!(t, "$iothub/twin/PATCH/properties/desired/?$version=2");
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap(),
        json!({"rate":5,"cfg":{"a":1},"$version":2})
    );
    dev.disconnect(&s.broker);

    assert_eq!(
        s.hub
            .update_desired(json!({"rate":7,"cfg":{"a":null}}))
            .unwrap(),
        3
    );
    assert_eq!(s.hub.desired_version(), 3);
    let mut dev = Device::connect(&s, false, &[TWIN_RES, DESIRED]);
    let (_, twin) = dev.get();
    assert_eq!(twin["desired"], json!({"rate":7,"cfg":{},"$version":3}));
    // A queued notification would have arrived before the GET's answer.
    assert!(
        !dev.has_seen(|t| t.starts_with("$iothub/twin/PATCH/properties/desired/")),
        "a desired notification was queued for the offline device: {:?}",
        dev.seen
    );
    assert_eq!(s.hub.stats().desired_notifications, 2);
    // Invalid desired patches are refused on the service side.
    let err = s.hub.update_desired(json!({"$bad":1})).unwrap_err();
    assert_eq!(hub_status(&err), Some(400));
    assert_eq!(s.hub.desired_version(), 3);
}

#[test]
fn a_direct_method_is_answered_and_an_unanswered_one_times_out_504() {
    let Some(s) = setup() else { return };
    let mut dev = Device::connect(&s, true, &[METHODS]);
    let answer = std::thread::scope(|scope| {
        let call = scope.spawn(|| {
            s.hub
                .invoke_method("reboot", json!({"delay":1}), Duration::from_secs(10))
        });
        let (t, body) = dev.expect(|t| t.starts_with("$iothub/methods/POST/"));
        let rid = t
            .strip_prefix("$iothub/methods/POST/reboot/?$rid=")
            .unwrap()
            .to_owned();
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"delay":1})
        );
        dev.publish(
            &format!("$iothub/methods/res/201/?$rid={rid}"),
            r#"{"ok":true}"#,
        );
        call.join().unwrap()
    })
    .unwrap();
    assert_eq!(answer.status, 201);
    assert_eq!(answer.payload, json!({"ok":true}));

    // No answer: 504 (GatewayTimeout) after the timeout.
    let started = Instant::now();
    let err = s
        .hub
        .invoke_method("slow", Value::Null, Duration::from_millis(300))
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(hub_status(&err), Some(504));
    assert!(err.to_string().contains("504101"), "{err}");
    // The request went out with an empty body; a late answer matches nothing.
    let (t, body) = dev.expect(|t| t.starts_with("$iothub/methods/POST/slow/"));
    assert!(body.is_empty());
    let rid = t.rsplit_once("$rid=").unwrap().1.to_owned();
    dev.publish(&format!("$iothub/methods/res/200/?$rid={rid}"), "");
    s.hub
        .wait_for(WAIT, |h| h.stats().methods_unmatched == 1)
        .unwrap();
    let st = s.hub.stats();
    assert_eq!(
        (
            st.methods_invoked,
            st.methods_answered,
            st.methods_timed_out
        ),
        (2, 1, 1)
    );
    // Names that cannot be a topic level are refused before anything is sent.
    let err = s
        .hub
        .invoke_method("a/b", Value::Null, Duration::from_secs(1))
        .unwrap_err();
    assert_eq!(hub_status(&err), Some(400));
}

/// A C2D message sent while the device is offline arrives when it reconnects with its
/// persistent session (QoS 1, queued by Mosquitto).
#[test]
fn c2d_messages_reach_the_device_and_survive_it_being_offline() {
    let Some(s) = setup() else { return };
    let filter = c2d_filter();
    let mut dev = Device::connect(&s, false, &[&filter]);
    let prefix = format!("devices/{DEVICE}/messages/devicebound/");
    s.hub
        .send_c2d("cmd-1", b"{\"command\":\"ping\"}".to_vec(), &[])
        .unwrap();
    let (t, body) = dev.expect(|t| t.starts_with(&prefix));
    let bag = topics::decode_property_bag(t.strip_prefix(&prefix).unwrap()).unwrap();
    assert_eq!(bag[0], ("$.mid".to_owned(), "cmd-1".to_owned()));
    assert_eq!(
        bag[1],
        (
            "$.to".to_owned(),
            format!("/devices/{DEVICE}/messages/devicebound")
        )
    );
    assert_eq!(body, b"{\"command\":\"ping\"}");
    dev.disconnect(&s.broker);

    s.hub
        .send_c2d(
            "cmd-2",
            b"{\"command\":\"restart\"}".to_vec(),
            &[("command", "restart"), ("iothub-ack", "full")],
        )
        .unwrap();
    let mut dev = Device::connect(&s, false, &[]);
    let (t, body) = dev.expect(|t| t.starts_with(&prefix));
    let bag = topics::decode_property_bag(t.strip_prefix(&prefix).unwrap()).unwrap();
    assert!(
        bag.contains(&("$.mid".to_owned(), "cmd-2".to_owned())),
        "{bag:?}"
    );
    assert!(bag.contains(&("command".to_owned(), "restart".to_owned())));
    assert!(bag.contains(&("iothub-ack".to_owned(), "full".to_owned())));
    assert_eq!(body, b"{\"command\":\"restart\"}");
    assert_eq!(s.hub.stats().c2d_sent, 2);
    // Ids and properties outside the documented character sets are refused.
    let err = s.hub.send_c2d("bad id", Vec::new(), &[]).unwrap_err();
    assert_eq!(hub_status(&err), Some(400));
    let err = s
        .hub
        .send_c2d("ok", vec![0; azure::MAX_C2D_BYTES], &[])
        .unwrap_err();
    assert_eq!(hub_status(&err), Some(400));
}

#[test]
fn d2c_events_are_kept_with_their_decoded_properties() {
    let Some(s) = setup() else { return };
    let dev = Device::connect(&s, true, &[]);
    dev.publish(
        &events_topic("$.ct=application%2Fjson&$.ce=utf-8&batch=7"),
        r#"{"changes":[1,2]}"#,
    );
    dev.publish(&events_topic(""), "plain");
    // Over 256 KB once the properties count: not kept.
    dev.publish(&events_topic("big=1"), vec![b'x'; azure::MAX_D2C_BYTES - 3]);
    dev.publish(&events_topic("a=%zz"), "malformed bag");
    // Another device's topic is not this hub's.
    dev.publish("devices/other/messages/events/", "not mine");
    s.hub
        .wait_for(WAIT, |h| {
            let st = h.stats();
            st.events_kept == 2 && st.events_oversize == 1 && st.events_malformed == 1
        })
        .unwrap();
    let events = s.hub.events();
    assert_eq!(events[0].property("$.ct"), Some("application/json"));
    assert_eq!(events[0].property("$.ce"), Some("utf-8"));
    assert_eq!(events[0].property("batch"), Some("7"));
    assert_eq!(events[0].payload, br#"{"changes":[1,2]}"#);
    assert_eq!(
        events[0].topic,
        events_topic("$.ct=application%2Fjson&$.ce=utf-8&batch=7")
    );
    assert!(events[1].properties.is_empty());
    assert_eq!(events[1].payload, b"plain");
}

/// With a persistent session, events published while the emulator is away are not lost; the
/// cap keeps the first ones and counts the rest.
#[test]
fn events_published_while_the_emulator_is_away_reach_the_next_one() {
    let mut options = Options::new(DEVICE, HUB);
    options.persistent_session = true;
    options.event_cap = 2;
    let Some(Setup {
        _dir,
        pki,
        broker,
        hub,
    }) = setup_with(options.clone())
    else {
        return;
    };
    let user = hub.username();
    drop(hub);
    let mut dev = Device::connect_to(&pki, &broker, &user, true, &[]);
    for i in 0..3 {
        dev.publish(&events_topic(&format!("n={i}")), "x");
    }
    for _ in 0..3 {
        dev.expect(|t| t == "puback");
    }
    let hub = IotHub::start(&emulator_connect(&broker, &pki), options).unwrap();
    hub.wait_for(WAIT, |h| {
        let st = h.stats();
        st.events_kept == 2 && st.events_dropped == 1
    })
    .unwrap();
    let events = hub.events();
    assert_eq!(events[0].property("n"), Some("0"));
    assert_eq!(events[1].property("n"), Some("1"));
}
