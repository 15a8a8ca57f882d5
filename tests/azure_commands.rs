//! The `azure-iot-hub` profile's commands, connection and change history with the real
//! binary against the test kit's IoT Hub emulator, on Mosquitto over mutual TLS: direct
//! methods answered with the status of their result; a cloud-to-device command runs once
//! across a kill -9 and its answer arrives as a device-to-cloud event correlated by `$.cid`;
//! a method answer left from an ended connection is not sent; the CONNECT is IoT Hub's
//! (client id, user name, no retained messages, the will on the events topic); the change
//! history loses nothing across broker restarts. Skipped with a notice when Mosquitto is not
//! installed (`EDGESYNC_REQUIRE_MOSQUITTO=1` makes that a failure).
//!
//! The crash tests use the crash points of debug builds (`EDGESYNC_DEBUG_CRASH_AT`,
//! src/sys/crash.rs); a release build says so and skips them.

// Test code: clippy.toml's allow-*-in-tests covers #[test] functions only, not helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use common::cloud::{self, DEADLINE, decode, wait};
use common::{Agent, AgentOptions, report_req};
use edgesync_testkit::azure::{Connect, D2c, IotHub, Options, hub_status};
use edgesync_testkit::{FaultProxy, Mosquitto, MosquittoOptions, TestPki};
use serde_json::{Value, json};
use tempfile::TempDir;

const HUB: &str = "edgesync-test.azure-devices.net";

/// Mosquitto, the emulator on it, and an agent of device `device` (not started).
struct Rig {
    hub: IotHub,
    agent: Agent,
    pki: TestPki,
    // Dropped last: the broker outlives the agent and the emulator.
    broker: Mosquitto,
    _dir: TempDir,
}

impl Rig {
    /// `None` when Mosquitto is not installed. `persistence`: the broker keeps sessions
    /// across its restarts, and the emulator's session is persistent.
    fn new(device: &str, persistence: bool) -> Option<Rig> {
        let dir = tempfile::tempdir().unwrap();
        let pki = cloud::pki(&dir.path().join("pki"), device);
        let broker = Mosquitto::start(
            &pki,
            MosquittoOptions {
                // Keeps the user name the agent sends, for the CONNECT check.
                identity_as_username: false,
                persistence,
                ..MosquittoOptions::default()
            },
        )
        .unwrap()?;
        let connect = Connect::mosquitto_as(&broker, &pki, "iothub-emulator").unwrap();
        let options = Options {
            persistent_session: persistence,
            ..Options::new(device, HUB)
        };
        let hub = IotHub::start(&connect, options).unwrap();
        hub.wait_for(DEADLINE, IotHub::is_ready).unwrap();
        let opts = azure_agent(&pki, broker.tls_port);
        Some(Rig {
            hub,
            agent: Agent::prepare(opts),
            pki,
            broker,
            _dir: dir,
        })
    }

    fn start(&mut self) {
        self.agent.launch();
        self.wait_online();
    }

    fn wait_online(&self) {
        wait("online", DEADLINE, || {
            self.agent.status()["connection"]["state"] == "online"
        });
    }

    /// `metrics.hub_commands` of the status document.
    fn figures(&self) -> Value {
        self.agent.status()["metrics"]["hub_commands"].clone()
    }

    /// Device-to-cloud events with `edgesync=kind`.
    fn events(&self, kind: &str) -> Vec<D2c> {
        self.hub
            .events()
            .into_iter()
            .filter(|e| e.property("edgesync") == Some(kind))
            .collect()
    }

    /// Waits for the answer to cloud-to-device message `mid` and returns it.
    fn c2d_answer(&self, mid: &str) -> (D2c, Value) {
        let found = |h: &IotHub| {
            h.events().into_iter().find(|e| {
                e.property("edgesync") == Some("result") && e.property("$.cid") == Some(mid)
            })
        };
        if self.hub.wait_for(DEADLINE, |h| found(h).is_some()).is_err() {
            panic!(
                "no answer to {mid}; events {:?}\nagent log:\n{}",
                self.hub.events(),
                self.agent.log()
            );
        }
        let e = found(&self.hub).unwrap();
        let v = serde_json::from_slice(&e.payload).unwrap();
        (e, v)
    }

    /// How often the agent's log says it ran the request `id`, over every run.
    fn runs(&self, id: &str) -> usize {
        let id = format!("id={id}");
        self.agent
            .log()
            .lines()
            .filter(|l| l.contains("running command") && l.split_whitespace().any(|w| w == id))
            .count()
    }

    /// Spawns the agent armed to die at crash point `point` (not waiting for it to serve:
    /// it may die before); returns the child.
    fn spawn_armed(&self, point: &str) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.agent.log_path)
            .unwrap();
        self.agent
            .run_command()
            .env(edgesync::crash::ENV, point)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn wait_death(&self, child: &mut std::process::Child, point: &str) {
        let status = common::wait_timeout(child, DEADLINE).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the agent did not die at {point}; log:\n{}",
                self.agent.log()
            )
        });
        assert_eq!(status.signal(), Some(9), "killed at {point}: {status}");
    }
}

/// Agent options for the `azure-iot-hub` profile on the broker at `port`.
fn azure_agent(pki: &TestPki, port: u16) -> AgentOptions {
    let mut o = cloud::tls_agent(pki, port, "");
    o.extra_toml = format!("[cloud]\nprofile = \"azure-iot-hub\"\n[azure]\nhub = \"{HUB}\"\n");
    o
}

const METHOD_WAIT: Duration = Duration::from_secs(30);

#[test]
fn direct_methods_are_answered_with_the_status_of_their_result() {
    let Some(mut r) = Rig::new("az-methods", false) else {
        return;
    };
    r.start();
    let ping = r
        .hub
        .invoke_method("ping", Value::Null, METHOD_WAIT)
        .unwrap();
    assert_eq!(ping.status, 200, "{ping:?}");
    assert_eq!(ping.payload["pong"], true, "{ping:?}");
    // Arguments are the payload, checked as the command's.
    let history = r
        .hub
        .invoke_method("history", json!({"key": "temp", "limit": 1}), METHOD_WAIT)
        .unwrap();
    assert_eq!(history.status, 200, "{history:?}");
    let bad = r
        .hub
        .invoke_method("history", json!({"key": "temp", "limt": 1}), METHOD_WAIT)
        .unwrap();
    assert_eq!(
        (bad.status, bad.payload["code"].as_str()),
        (400, Some("bad-request")),
        "{bad:?}"
    );
    assert!(bad.payload["message"].as_str().unwrap().contains("limt"));
    let not_json = r
        .hub
        .invoke_method("ping", json!([1]), METHOD_WAIT)
        .unwrap();
    assert_eq!(not_json.status, 400, "{not_json:?}");
    let unknown = r
        .hub
        .invoke_method("reboot", json!({}), METHOD_WAIT)
        .unwrap();
    assert_eq!(
        (unknown.status, unknown.payload["code"].as_str()),
        (404, Some("unknown-command")),
        "{unknown:?}"
    );
    // Destructive commands are not in the default [control] allow.
    let forbidden = r
        .hub
        .invoke_method("purge", json!({}), METHOD_WAIT)
        .unwrap();
    assert_eq!(
        (forbidden.status, forbidden.payload["code"].as_str()),
        (403, Some("forbidden")),
        "{forbidden:?}"
    );
    let f = r.figures();
    assert_eq!(f["methods"], 6, "{f}");
    assert_eq!(f["method_answers_dropped"], 0, "{f}");
    let s = r.hub.stats();
    assert_eq!((s.methods_answered, s.methods_unmatched), (6, 0), "{s:?}");
}

#[test]
fn a_method_answer_left_from_an_ended_connection_is_not_sent() {
    if common::no_debug_hooks() {
        return;
    }
    let Some(mut r) = Rig::new("az-stale", false) else {
        return;
    };
    r.start();
    r.agent.kill9();
    let mut armed = r.spawn_armed("command-answered");
    // Not `status()`, which fails while the socket is not served yet.
    wait("armed agent online", DEADLINE, || {
        common::try_request(&r.agent.socket, &json!({"op": "status"}))
            .is_ok_and(|s| s["connection"]["state"] == "online")
    });
    // The agent dies with the answer queued, not published: IoT Hub fails the call.
    let e = r
        .hub
        .invoke_method("ping", Value::Null, Duration::from_secs(5))
        .unwrap_err();
    assert_eq!(hub_status(&e), Some(504), "{e}");
    r.wait_death(&mut armed, "command-answered");
    r.agent.restart();
    r.wait_online();
    wait("the stale answer dropped", DEADLINE, || {
        r.figures()["method_answers_dropped"] == 1
    });
    // Dropped when the results were read on connect, before any later answer went out.
    let ok = r
        .hub
        .invoke_method("ping", Value::Null, METHOD_WAIT)
        .unwrap();
    assert_eq!(ok.status, 200);
    let s = r.hub.stats();
    assert_eq!(
        s.methods_unmatched, 0,
        "no answer to a call IoT Hub ended: {s:?}"
    );
    assert_eq!(r.runs_matching("m"), 2, "each method ran once");
    assert!(r.agent.log().contains("dropped"), "{}", r.agent.log());
}

impl Rig {
    /// Commands run whose request id starts with `prefix`.
    fn runs_matching(&self, prefix: &str) -> usize {
        let id = format!("id={prefix}");
        self.agent
            .log()
            .lines()
            .filter(|l| {
                l.contains("running command") && l.split_whitespace().any(|w| w.starts_with(&id))
            })
            .count()
    }
}

/// Points where a kill -9 leaves a cloud-to-device command taken in and not run, taken in
/// and not acknowledged, answered and not published.
const CRASH_POINTS: [&str; 3] = ["command-taken", "command-before-puback", "command-answered"];

#[test]
fn a_cloud_to_device_command_runs_once_across_a_kill_9() {
    if common::no_debug_hooks() {
        return;
    }
    let Some(mut r) = Rig::new("az-c2d-crash", false) else {
        return;
    };
    // The first connection makes the persistent session that queues messages while the
    // agent is down.
    r.start();
    r.agent.kill9();
    for (i, point) in CRASH_POINTS.iter().enumerate() {
        let mid = format!("crash-{i}");
        let mut armed = r.spawn_armed(point);
        r.hub
            .send_c2d(&mid, br#"{"command":"ping"}"#.to_vec(), &[("trace", "t1")])
            .unwrap();
        r.wait_death(&mut armed, point);
        r.agent.restart();
        let (e, answer) = r.c2d_answer(&mid);
        assert_eq!(answer["id"], mid.as_str(), "{answer}");
        assert_eq!(answer["ok"], true, "{point}: {answer}");
        assert_eq!(answer["result"]["pong"], true, "{answer}");
        assert_eq!(e.property("command"), Some("ping"), "{e:?}");
        assert_eq!(e.property("$.ct"), Some("application/json"), "{e:?}");
        assert_eq!(r.runs(&mid), 1, "{mid} ran once across the kill at {point}");
        r.agent.kill9();
    }
    let marker = format!("{}=", edgesync::crash::ENV);
    assert_eq!(
        r.agent.log().matches(&marker).count(),
        CRASH_POINTS.len(),
        "one death per point"
    );
}

#[test]
fn cloud_to_device_messages_run_once_per_message_id_and_others_are_counted() {
    let Some(mut r) = Rig::new("az-c2d", false) else {
        return;
    };
    r.start();
    r.hub.send_c2d("hello-1", b"hello".to_vec(), &[]).unwrap();
    r.hub
        .send_c2d("not-cmd", br#"{"temp":1}"#.to_vec(), &[])
        .unwrap();
    let cmd = json!({"command": "history", "args": {"key": "temp", "limit": 1}});
    r.hub
        .send_c2d("c-1", cmd.to_string().into_bytes(), &[])
        .unwrap();
    let (_, answer) = r.c2d_answer("c-1");
    assert_eq!(answer["ok"], true, "{answer}");
    // The same message id again (IoT Hub delivers at least once): the recorded answer, not
    // a second run.
    r.hub
        .send_c2d("c-1", cmd.to_string().into_bytes(), &[])
        .unwrap();
    wait("the answer repeated", DEADLINE, || {
        r.events("result")
            .iter()
            .filter(|e| e.property("$.cid") == Some("c-1"))
            .count()
            == 2
    });
    assert_eq!(r.runs("c-1"), 1);
    // Refused ones are answered with their code.
    r.hub
        .send_c2d("c-2", br#"{"command":"purge"}"#.to_vec(), &[])
        .unwrap();
    let (_, refused) = r.c2d_answer("c-2");
    assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
    let f = r.figures();
    assert_eq!(f["c2d_not_commands"], 2, "{f}");
    assert_eq!(f["c2d_commands"], 3, "{f}");
    let log = r.agent.log();
    assert_eq!(
        log.matches("not a command").count(),
        1,
        "logged once per connection: {log}"
    );
}

#[test]
fn the_agent_connects_as_iot_hub_requires_and_retains_nothing() {
    let Some(mut r) = Rig::new("az-connect", false) else {
        return;
    };
    r.start();
    let record = r.hub.check_connect_log(&r.broker.log()).unwrap();
    assert_eq!(record.client_id, "az-connect");
    assert_eq!(
        record.username.as_deref(),
        Some("edgesync-test.azure-devices.net/az-connect/?api-version=2021-04-12")
    );
    assert!(
        !record.clean_session,
        "a persistent session, for C2D messages"
    );
    wait("online presence", DEADLINE, || {
        r.events("presence")
            .iter()
            .any(|e| decode(&e.payload)["state"] == "online")
    });
    // A kill -9 leaves the will: IoT Hub forwards it as telemetry from the events topic.
    r.agent.kill9();
    wait("the will", DEADLINE, || {
        r.events("presence")
            .iter()
            .any(|e| decode(&e.payload)["state"] == "offline")
    });
    r.agent.restart();
    r.wait_online();
    let out = r.agent.request(&report_req(vec![("temp", json!(21.5))]));
    assert_eq!(out["ok"], true, "{out}");
    wait("the change", DEADLINE, || !r.events("changes").is_empty());
    let s = r.hub.stats();
    assert_eq!(s.events_retained, 0, "nothing retained: {s:?}");
    assert_eq!(s.events_malformed, 0, "{s:?}");
    for e in r.hub.events() {
        assert!(
            e.topic.starts_with("devices/az-connect/messages/events/"),
            "{e:?}"
        );
        assert!(e.property("$.ct").is_some(), "{e:?}");
    }
}

#[test]
fn the_change_history_loses_nothing_across_broker_restarts() {
    let Some(mut r) = Rig::new("az-history", true) else {
        return;
    };
    // The agent reconnects through a proxy that holds it back while the broker restarts.
    let proxy = FaultProxy::start(r.broker.tls_addr()).unwrap();
    r.agent.opts = azure_agent(&r.pki, proxy.port());
    std::fs::write(&r.agent.config_path, r.agent.opts.to_toml(r.agent.dir())).unwrap();
    proxy.cut();
    r.agent.launch();
    let mut want = BTreeSet::new();
    for i in 0..30 {
        let k = format!("k{}", i % 5);
        let changes: Vec<(&str, Value)> = (0..1000)
            .map(|j| (k.as_str(), json!({"i": i, "j": j, "pad": "x".repeat(40)})))
            .collect();
        let out = r.agent.request(&report_req(changes));
        assert_eq!(out["ok"], true, "{out}");
        want.extend(out["first_seq"].as_u64().unwrap()..=out["last_seq"].as_u64().unwrap());
    }
    let history = |r: &Rig| -> BTreeSet<u64> {
        r.events("changes")
            .iter()
            .flat_map(|e| {
                assert!(e.payload.len() <= 256 * 1024, "{} bytes", e.payload.len());
                let ct = e.property("$.ct");
                assert!(
                    matches!(ct, Some("application/cbor" | "application/json")),
                    "{e:?}"
                );
                if ct == Some("application/json") {
                    assert_eq!(e.property("$.ce"), Some("utf-8"), "{e:?}");
                }
                let b = decode(&e.payload);
                assert_eq!(b["device"], "az-history", "{b}");
                b["changes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["seq"].as_u64().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    // A slow link keeps the drain going while the broker restarts under it.
    proxy.bandwidth(400_000);
    proxy.restore();
    for _ in 0..3 {
        let seen = history(&r).len();
        wait("drain progress", DEADLINE, || {
            history(&r).len() > seen || r.agent.depth() == 0
        });
        proxy.cut();
        let connects = r.hub.stats().connects;
        r.broker.restart().unwrap();
        wait("emulator back", DEADLINE, || {
            r.hub.stats().connects > connects
        });
        proxy.restore();
    }
    assert!(r.agent.depth() > 0, "the restarts happened mid-drain");
    proxy.bandwidth(0);
    wait("every change captured", DEADLINE * 2, || {
        history(&r).is_superset(&want)
    });
    wait("queue drained", DEADLINE, || r.agent.depth() == 0);
    let s = r.hub.stats();
    assert_eq!((s.events_oversize, s.events_dropped), (0, 0), "{s:?}");
}
