//! The AWS IoT emulator through a real Mosquitto over TLS, with a plain rumqttc client as
//! "the device": Device Shadow (update, delta, get, delete, errors, named shadows) and Jobs
//! (notify-next, start-next, update with expectedVersion, errors). Skipped with a notice
//! when Mosquitto is not installed.

// Test code: clippy.toml's allow-*-in-tests covers #[test] functions only, not helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use edgesync_testkit::aws::{AwsIot, Connect, JobStatus, Options};
use edgesync_testkit::{Mosquitto, MosquittoOptions, TestPki};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

const THING: &str = "pump-0042";
const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    _dir: tempfile::TempDir,
    pki: TestPki,
    broker: Mosquitto,
    emu: AwsIot,
}

/// Mosquitto (TLS, client certificates required) and the emulator on it; `None` when
/// Mosquitto is not installed.
fn setup_with(options: Options) -> Option<Setup> {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(&dir.path().join("pki")).unwrap();
    let broker = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap()?;
    let emu = AwsIot::start_with(&Connect::mosquitto(&broker, &pki).unwrap(), options).unwrap();
    Some(Setup {
        _dir: dir,
        pki,
        broker,
        emu,
    })
}

fn setup() -> Option<Setup> {
    setup_with(Options::default())
}

/// The device: a rumqttc client with the PKI's client certificate, subscribed to
/// `$aws/things/THING/#`; received messages wait in a buffer until a test asks for them.
struct Device {
    client: Client,
    rx: Receiver<(String, Vec<u8>)>,
    seen: Vec<(String, Value)>,
}

impl Device {
    fn connect(s: &Setup) -> Device {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&s.pki.ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let chain = CertificateDer::pem_file_iter(&s.pki.client_cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&s.pki.client_key).unwrap();
        let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let mut opts = MqttOptions::new(THING, "localhost", s.broker.tls_port);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = Client::new(opts, 100);
        client
            .subscribe(format!("$aws/things/{THING}/#"), QoS::AtLeastOnce)
            .unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for event in connection.iter() {
                let msg = match event {
                    Ok(Event::Incoming(Packet::SubAck(_))) => ("suback".to_owned(), Vec::new()),
                    Ok(Event::Incoming(Packet::Publish(p))) => (p.topic, p.payload.to_vec()),
                    Ok(_) => continue,
                    Err(_) => return,
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
        });
        let (topic, _) = rx.recv_timeout(WAIT).expect("no SUBACK");
        assert_eq!(topic, "suback");
        Device {
            client,
            rx,
            seen: Vec::new(),
        }
    }

    fn send(&self, topic_suffix: &str, payload: impl Into<Vec<u8>>) {
        let topic = format!("$aws/things/{THING}/{topic_suffix}");
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .unwrap();
    }

    /// The first message on `$aws/things/THING/{suffix}` (with `clientToken` == `token` if
    /// given), waiting up to 10 s.
    fn expect(&mut self, suffix: &str, token: Option<&str>) -> Value {
        let topic = format!("$aws/things/{THING}/{suffix}");
        let matches = |t: &str, v: &Value| {
            t == topic && token.is_none_or(|tok| v.get("clientToken") == Some(&json!(tok)))
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = self.seen.iter().position(|(t, v)| matches(t, v)) {
                return self.seen.remove(i).1;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((t, payload)) => {
                    let v: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
                    self.seen.push((t, v));
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "nothing on {topic} (token {token:?}) within {WAIT:?}; seen {:?}",
                        self.seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => panic!("device connection ended"),
            }
        }
    }

    /// Whether a message on the topic has been received so far (without waiting).
    fn has_seen(&mut self, suffix: &str) -> bool {
        while let Ok((t, payload)) = self.rx.try_recv() {
            self.seen
                .push((t, serde_json::from_slice(&payload).unwrap_or(Value::Null)));
        }
        let topic = format!("$aws/things/{THING}/{suffix}");
        self.seen.iter().any(|(t, _)| *t == topic)
    }
}

// ---------------------------------------------------------------------------------------------
// Device Shadow

/// Mosquitto routes `$aws/...` topics published by a client; the update is accepted with
/// the clientToken echoed, version 1, per-leaf metadata, and the documents message.
#[test]
fn update_is_accepted_with_token_version_and_documents() {
    let Some(s) = setup() else { return };
    let mut dev = Device::connect(&s);
    dev.send(
        "shadow/update",
        r#"{"state":{"reported":{"led":{"mode":"blink"},"temp":21.5}},"clientToken":"tok-1"}"#,
    );
    let acc = dev.expect("shadow/update/accepted", Some("tok-1"));
    assert_eq!(acc["version"], 1);
    assert_eq!(acc["state"]["reported"]["led"]["mode"], "blink");
    assert!(acc["metadata"]["reported"]["led"]["mode"]["timestamp"].is_u64());
    let docs = dev.expect("shadow/update/documents", Some("tok-1"));
    assert_eq!(docs["current"]["version"], 1);
    assert_eq!(docs["current"]["state"]["reported"]["temp"], 21.5);
    // A second update bumps the version.
    dev.send(
        "shadow/update",
        r#"{"state":{"reported":{"temp":22}},"clientToken":"tok-2"}"#,
    );
    assert_eq!(
        dev.expect("shadow/update/accepted", Some("tok-2"))["version"],
        2
    );
    let doc = s.emu.shadow(THING, None).unwrap();
    assert_eq!(
        doc["state"]["reported"],
        json!({"led":{"mode":"blink"},"temp":22})
    );
    let st = s.emu.stats();
    assert_eq!(st.shadow.updates_accepted, 2);
    assert_eq!(st.shadow_messages_received, 2);
    assert!(st.shadow_bytes_received > 100);
    assert!(
        !dev.has_seen("shadow/update/delta"),
        "reported only: no delta"
    );
}

/// The cloud sets desired: the device gets the delta; reporting the same values clears it.
#[test]
fn desired_reaches_the_device_as_a_delta_and_reporting_it_clears_the_delta() {
    let Some(s) = setup() else { return };
    let mut dev = Device::connect(&s);
    dev.send(
        "shadow/update",
        r#"{"state":{"reported":{"fan":"off","rpm":0}}}"#,
    );
    dev.expect("shadow/update/accepted", None);
    let v = s
        .emu
        .update_desired(THING, None, json!({"fan":"on","rpm":0,"led":{"mode":"on"}}))
        .unwrap();
    assert_eq!(v, 2);
    let delta = dev.expect("shadow/update/delta", None);
    assert_eq!(delta["state"], json!({"fan":"on","led":{"mode":"on"}}));
    assert_eq!(delta["version"], 2);
    assert!(delta["metadata"]["led"]["mode"]["timestamp"].is_u64());
    dev.send("shadow/get", r#"{"clientToken":"g1"}"#);
    let doc = dev.expect("shadow/get/accepted", Some("g1"));
    assert_eq!(
        doc["state"]["delta"],
        json!({"fan":"on","led":{"mode":"on"}})
    );

    dev.send(
        "shadow/update",
        r#"{"state":{"reported":{"fan":"on","led":{"mode":"on"}}},"clientToken":"r"}"#,
    );
    assert_eq!(
        dev.expect("shadow/update/accepted", Some("r"))["version"],
        3
    );
    dev.send("shadow/get", r#"{"clientToken":"g2"}"#);
    let doc = dev.expect("shadow/get/accepted", Some("g2"));
    assert!(doc["state"].get("delta").is_none(), "{doc}");
    assert_eq!(doc["version"], 3);
    assert!(
        s.emu.shadow(THING, None).unwrap()["state"]
            .get("delta")
            .is_none()
    );
    assert_eq!(s.emu.stats().shadow.deltas_published, 1);
}

#[test]
fn a_stale_version_is_rejected_409() {
    let Some(s) = setup() else { return };
    let mut dev = Device::connect(&s);
    dev.send("shadow/update", r#"{"state":{"reported":{"a":1}}}"#);
    dev.expect("shadow/update/accepted", None);
    dev.send(
        "shadow/update",
        r#"{"state":{"reported":{"a":2}},"version":0,"clientToken":"old"}"#,
    );
    let rej = dev.expect("shadow/update/rejected", Some("old"));
    assert_eq!(rej["code"], 409);
    assert_eq!(rej["message"], "Version conflict");
    assert!(rej["timestamp"].is_u64());
    dev.send(
        "shadow/update",
        r#"{"state":{"reported":{"a":2}},"version":1,"clientToken":"cur"}"#,
    );
    assert_eq!(
        dev.expect("shadow/update/accepted", Some("cur"))["version"],
        2
    );
    assert_eq!(s.emu.stats().shadow.updates_rejected.get(&409), Some(&1));
}

#[test]
fn an_oversized_state_is_rejected_413() {
    let Some(s) = setup() else { return };
    let mut dev = Device::connect(&s);
    let big = json!({"state":{"reported":{"blob":"x".repeat(8 * 1024)}},"clientToken":"big"});
    dev.send("shadow/update", big.to_string());
    let rej = dev.expect("shadow/update/rejected", Some("big"));
    assert_eq!(rej["code"], 413);
    assert_eq!(
        rej["message"],
        "The payload exceeds the maximum size allowed"
    );
    assert!(s.emu.shadow(THING, None).is_none());
    // Just under the limit fits: {"blob":"..."} is 11 bytes of syntax.
    let fits =
        json!({"state":{"reported":{"blob":"x".repeat(8 * 1024 - 11)}},"clientToken":"fits"});
    dev.send("shadow/update", fits.to_string());
    assert_eq!(
        dev.expect("shadow/update/accepted", Some("fits"))["version"],
        1
    );
}

#[test]
fn invalid_json_is_rejected_400_and_get_of_a_missing_shadow_404() {
    let Some(s) = setup() else { return };
    let mut dev = Device::connect(&s);
    dev.send("shadow/update", "{\"state\": {");
    let rej = dev.expect("shadow/update/rejected", None);
    assert_eq!(
        (rej["code"].as_u64(), rej["message"].as_str()),
        (Some(400), Some("Invalid JSON"))
    );
    dev.send("shadow/update", r#"{"clientToken":"ns"}"#);
    let rej = dev.expect("shadow/update/rejected", Some("ns"));
    assert_eq!(rej["message"], "Missing required node: state");

    dev.send("shadow/get", "");
    let rej = dev.expect("shadow/get/rejected", None);
    assert_eq!(rej["code"], 404);
    assert_eq!(
        rej["message"],
        format!("No shadow exists with name: '{THING}'")
    );
    dev.send("shadow/delete", r#"{"clientToken":"d"}"#);
    assert_eq!(dev.expect("shadow/delete/rejected", Some("d"))["code"], 404);
}

#[test]
fn named_shadows_are_separate_and_deletable() {
    let Some(s) = setup() else { return };
    let mut dev = Device::connect(&s);
    dev.send(
        "shadow/name/config/update",
        r#"{"state":{"reported":{"interval":5}},"clientToken":"n1"}"#,
    );
    assert_eq!(
        dev.expect("shadow/name/config/update/accepted", Some("n1"))["version"],
        1
    );
    assert!(
        s.emu.shadow(THING, None).is_none(),
        "the classic shadow is untouched"
    );
    s.emu
        .update_desired(THING, Some("config"), json!({"interval":10}))
        .unwrap();
    let delta = dev.expect("shadow/name/config/update/delta", None);
    assert_eq!(delta["state"], json!({"interval":10}));
    dev.send("shadow/name/config/delete", "");
    assert_eq!(
        dev.expect("shadow/name/config/delete/accepted", None)["version"],
        2
    );
    assert!(s.emu.shadow(THING, Some("config")).is_none());
    // Deleting does not reset the version.
    dev.send(
        "shadow/name/config/update",
        r#"{"state":{"reported":{"interval":1}},"clientToken":"n2"}"#,
    );
    assert_eq!(
        dev.expect("shadow/name/config/update/accepted", Some("n2"))["version"],
        3
    );
}

/// Injected failures (the agent's retry tests) and, with a response delay, 429 beyond ten
/// in-flight requests per thing.
#[test]
fn injected_errors_and_too_many_in_flight_requests() {
    let Some(s) = setup() else { return };
    let mut dev = Device::connect(&s);
    s.emu.inject_update_errors(THING, None, 503, 1);
    dev.send(
        "shadow/update",
        r#"{"state":{"reported":{"a":1}},"clientToken":"x1"}"#,
    );
    assert_eq!(
        dev.expect("shadow/update/rejected", Some("x1"))["code"],
        503
    );
    dev.send(
        "shadow/update",
        r#"{"state":{"reported":{"a":1}},"clientToken":"x2"}"#,
    );
    assert_eq!(
        dev.expect("shadow/update/accepted", Some("x2"))["version"],
        1
    );
    drop(dev);

    let Some(s) = setup_with(Options {
        response_delay: Duration::from_secs(2),
        ..Options::default()
    }) else {
        return;
    };
    let mut dev = Device::connect(&s);
    for i in 0..12 {
        dev.send(
            "shadow/update",
            json!({"state":{"reported":{"i":i}},"clientToken":format!("t{i}")}).to_string(),
        );
    }
    for i in 10..12 {
        let rej = dev.expect("shadow/update/rejected", Some(&format!("t{i}")));
        assert_eq!(rej["code"], 429);
    }
    for i in 0..10 {
        dev.expect("shadow/update/accepted", Some(&format!("t{i}")));
    }
    assert_eq!(s.emu.shadow_version(THING, None), 10);
    assert_eq!(s.emu.stats().shadow.updates_rejected.get(&429), Some(&2));
}

/// After a broker restart the emulator reconnects, subscribes again and keeps its shadows.
#[test]
fn the_emulator_survives_a_broker_restart() {
    let Some(mut s) = setup() else { return };
    s.emu.update_desired(THING, None, json!({"a":1})).unwrap();
    s.broker.restart().unwrap();
    s.emu
        .wait_for(WAIT, |e| e.stats().connects >= 2 && e.is_ready())
        .unwrap();
    let mut dev = Device::connect(&s);
    dev.send("shadow/get", r#"{"clientToken":"after"}"#);
    let doc = dev.expect("shadow/get/accepted", Some("after"));
    assert_eq!(doc["state"]["delta"], json!({"a":1}));
}

// ---------------------------------------------------------------------------------------------
// Jobs

#[test]
fn a_job_runs_from_notify_next_to_succeeded() {
    let Some(s) = setup() else { return };
    let mut dev = Device::connect(&s);
    s.emu
        .create_job(
            THING,
            "job-1",
            json!({"command":"reboot","args":{"delay":1}}),
        )
        .unwrap();
    let next = dev.expect("jobs/notify-next", None);
    assert_eq!(next["execution"]["jobId"], "job-1");
    assert_eq!(next["execution"]["status"], "QUEUED");
    assert_eq!(next["execution"]["jobDocument"]["command"], "reboot");

    dev.send("jobs/start-next", r#"{"clientToken":"sn"}"#);
    let started = dev.expect("jobs/start-next/accepted", Some("sn"));
    let exec = &started["execution"];
    assert_eq!(exec["status"], "IN_PROGRESS");
    let version = exec["versionNumber"].as_u64().unwrap();
    assert_eq!(
        s.emu.job(THING, "job-1").unwrap().status,
        JobStatus::InProgress
    );

    dev.send(
        "jobs/job-1/update",
        json!({
            "status": "SUCCEEDED",
            "statusDetails": {"result": "ok"},
            "expectedVersion": version,
            "includeJobExecutionState": true,
            "clientToken": "done",
        })
        .to_string(),
    );
    let acc = dev.expect("jobs/job-1/update/accepted", Some("done"));
    assert_eq!(acc["executionState"]["status"], "SUCCEEDED");
    assert_eq!(acc["executionState"]["versionNumber"], version + 1);
    // Nothing is pending any more: notify-next without an execution.
    let next = dev.expect("jobs/notify-next", None);
    assert!(next.get("execution").is_none(), "{next}");
    let job = s.emu.job(THING, "job-1").unwrap();
    assert_eq!(job.status, JobStatus::Succeeded);
    assert_eq!(
        job.status_details.get("result").map(String::as_str),
        Some("ok")
    );
    assert_eq!(job.version_number, version + 1);

    dev.send("jobs/get", r#"{"clientToken":"pending"}"#);
    let list = dev.expect("jobs/get/accepted", Some("pending"));
    assert_eq!(list["inProgressJobs"], json!([]));
    assert_eq!(list["queuedJobs"], json!([]));
    let st = s.emu.stats();
    assert_eq!(st.jobs.accepted.get("update"), Some(&1));
    assert_eq!(st.jobs.notify_next_published, 2);
}

#[test]
fn wrong_expected_version_and_updates_of_terminal_jobs_are_rejected() {
    let Some(s) = setup() else { return };
    let mut dev = Device::connect(&s);
    s.emu
        .create_job(THING, "job-2", json!({"command":"noop"}))
        .unwrap();
    dev.expect("jobs/notify-next", None);
    dev.send(
        "jobs/job-2/update",
        r#"{"status":"IN_PROGRESS","expectedVersion":42,"clientToken":"vm"}"#,
    );
    let rej = dev.expect("jobs/job-2/update/rejected", Some("vm"));
    assert_eq!(rej["code"], "VersionMismatch");
    assert_eq!(rej["executionState"]["status"], "QUEUED");
    assert_eq!(rej["executionState"]["versionNumber"], 1);

    dev.send(
        "jobs/job-2/update",
        r#"{"status":"FAILED","clientToken":"f"}"#,
    );
    dev.expect("jobs/job-2/update/accepted", Some("f"));
    dev.send(
        "jobs/job-2/update",
        r#"{"status":"SUCCEEDED","clientToken":"late"}"#,
    );
    let rej = dev.expect("jobs/job-2/update/rejected", Some("late"));
    assert_eq!(rej["code"], "InvalidStateTransition");
    assert_eq!(rej["executionState"]["status"], "FAILED");
    assert_eq!(s.emu.job(THING, "job-2").unwrap().status, JobStatus::Failed);

    dev.send(
        "jobs/nope/update",
        r#"{"status":"SUCCEEDED","clientToken":"nf"}"#,
    );
    assert_eq!(
        dev.expect("jobs/nope/update/rejected", Some("nf"))["code"],
        "ResourceNotFound"
    );
    dev.send("jobs/job-2/update", "not json");
    assert_eq!(
        dev.expect("jobs/job-2/update/rejected", None)["code"],
        "InvalidJson"
    );
    let st = s.emu.stats();
    assert_eq!(st.jobs.rejected.get("VersionMismatch"), Some(&1));
    assert_eq!(st.jobs.rejected.get("InvalidStateTransition"), Some(&1));
}

// ---------------------------------------------------------------------------------------------
// Capture (what an IoT rule on the change-history topic would see)

#[test]
fn other_topics_are_captured_up_to_the_cap() {
    let Some(s) = setup_with(Options {
        capture: vec!["edgesync/+/changes".into()],
        persistent_session: true,
        capture_cap: 3,
        ..Options::default()
    }) else {
        return;
    };
    let dev = Device::connect(&s);
    for i in 0..5 {
        dev.client
            .publish(
                format!("edgesync/{THING}/changes"),
                QoS::AtLeastOnce,
                false,
                format!("batch-{i}"),
            )
            .unwrap();
    }
    s.emu
        .wait_for(WAIT, |e| e.stats().captured_dropped == 2)
        .unwrap();
    let got: Vec<String> = s
        .emu
        .captured()
        .into_iter()
        .map(|(t, p)| {
            assert_eq!(t, format!("edgesync/{THING}/changes"));
            String::from_utf8(p).unwrap()
        })
        .collect();
    assert_eq!(got, ["batch-0", "batch-1", "batch-2"]);
    assert_eq!(s.emu.stats().shadow_messages_received, 0);
}
