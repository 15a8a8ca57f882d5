//! The `azure-iot-hub` profile's device twin (docs/PROTOCOL.md §7.4) with the real binary
//! against the test kit's IoT Hub emulator, on Mosquitto over mutual TLS: reported values
//! converge to the twin (dotted keys as nested properties), desired properties patched while
//! the agent is down are picked up by the GET after the reconnect and applied once, throttled
//! (429) patches are retried until they converge, a 400 drops the key with the counter
//! raised, and the apply result is visible under `reported.edgesync.desired_result`.
//! Skipped with a notice when Mosquitto is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::cloud::{DEADLINE, azure_agent, pki, wait};
use common::{Agent, report_req};
use edgesync_testkit::azure::{Connect, IotHub, Options};
use edgesync_testkit::{Mosquitto, MosquittoOptions};
use serde_json::{Value, json};

const HUB: &str = "edgesync-test.azure-devices.net";

struct Rig {
    hub: IotHub,
    agent: Agent,
    _mosq: Mosquitto,
    _dir: tempfile::TempDir,
}

/// Mosquitto (keeping the agent's IoT Hub user name), the emulator for `device` and an agent
/// with the azure-iot-hub profile (`rest`: more sections); `None` without Mosquitto.
fn rig(device: &str, rest: &str) -> Option<Rig> {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), device);
    let mosq = Mosquitto::start(
        &pki,
        MosquittoOptions {
            identity_as_username: false,
            ..MosquittoOptions::default()
        },
    )
    .unwrap()?;
    let connect = Connect::mosquitto_as(&mosq, &pki, "iothub-emulator").unwrap();
    let hub = IotHub::start(&connect, Options::new(device, HUB)).unwrap();
    hub.wait_for(DEADLINE, IotHub::is_ready).unwrap();
    let mut opts = azure_agent(&pki, mosq.tls_port, HUB);
    opts.extra_toml.push_str(rest);
    let agent = Agent::start(opts);
    let rig = Rig {
        hub,
        agent,
        _mosq: mosq,
        _dir: dir,
    };
    rig.wait_online();
    Some(rig)
}

impl Rig {
    fn wait_online(&self) {
        wait("online", DEADLINE, || {
            self.agent.status()["connection"]["state"] == "online"
        });
    }

    fn report(&self, changes: Vec<(&str, Value)>) {
        let r = self.agent.request(&report_req(changes));
        assert_eq!(r["ok"], true, "{r}");
    }

    /// The twin's reported properties without their `$version`.
    fn reported(&self) -> Value {
        let mut r = self.hub.reported();
        if let Some(m) = r.as_object_mut() {
            m.remove("$version");
        }
        r
    }

    fn wait_reported(&self, what: &str, ok: impl Fn(&Value) -> bool) {
        wait(what, DEADLINE, || ok(&self.reported()));
    }

    /// `metrics.twin` of the status document.
    fn figures(&self) -> Value {
        self.agent.status()["metrics"]["twin"].clone()
    }

    fn gets(&self) -> u64 {
        self.hub.stats().twin_gets
    }
}

/// A handler that appends `$EDGESYNC_VERSION`, the key and the value to `file` (its run log).
fn counting_handler(keys: &str, file: &Path) -> String {
    let script = format!(
        "echo \"$EDGESYNC_VERSION $EDGESYNC_KEY $EDGESYNC_VALUE\" >> {}",
        file.display()
    );
    format!(
        "[[desired.handler]]\nkeys = \"{keys}\"\ntype = \"exec\"\ncommand = {}\n",
        serde_json::to_string(&["/bin/sh", "-c", &script]).unwrap()
    )
}

fn runs(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn reported_values_converge_to_the_twin_as_nested_properties() {
    let Some(r) = rig("az-report", "") else {
        return;
    };
    r.report(vec![
        ("led.mode", json!("blink")),
        ("net.wifi.rssi", json!(-61)),
        ("temp", json!(20)),
        ("gone", json!(1)),
    ]);
    r.report(vec![("temp", json!(21.5)), ("gone", Value::Null)]);
    r.wait_reported("twin converged", |v| {
        *v == json!({"led": {"mode": "blink"}, "net": {"wifi": {"rssi": -61}}, "temp": 21.5})
    });
    let twin = r.hub.twin();
    assert_eq!(twin["properties"]["reported"]["led"]["mode"], "blink");
    let f = r.figures();
    assert!(f["accepted"].as_u64().unwrap() >= 1, "{f}");
    assert_eq!(f["dropped_keys"], 0, "{f}");
    // Coalesced: no more patches than reports; the GET on connect.
    let s = r.hub.stats();
    assert!(s.patches_accepted <= 2, "{s:?}");
    assert!(s.twin_gets >= 1, "GET on connect: {s:?}");
    assert_eq!(s.bad_requests, 0, "{s:?}");
}

#[test]
fn desired_properties_patched_while_the_agent_is_down_are_applied_once_after_the_get() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("runs");
    let Some(mut r) = rig("az-desired", &counting_handler("led.*", &log)) else {
        return;
    };
    // Applied while online (a desired notification): once.
    let v1 = r
        .hub
        .update_desired(json!({"led": {"color": "red"}}))
        .unwrap();
    wait("patch applied", DEADLINE, || runs(&log).len() == 1);
    assert_eq!(runs(&log), [format!("{v1} led.color \"red\"")]);
    r.wait_reported("first result", |rep| {
        rep["edgesync"]["desired_result"]["version"] == v1
    });
    // Patched while the agent is down: no notification reaches it, the GET brings it; its
    // first GET is throttled and read again.
    r.agent.stop();
    let v2 = r
        .hub
        .update_desired(json!({"led": {"mode": "blink"}}))
        .unwrap();
    r.hub.throttle_twin(1);
    r.agent.restart();
    r.wait_online();
    wait("applied after the GET", DEADLINE, || runs(&log).len() >= 2);
    r.wait_reported("applied value and result reported", |rep| {
        rep["led"]["mode"] == "blink"
            && rep["edgesync"]["desired_result"]["version"] == v2
            && rep["edgesync"]["desired_result"]["status"] == "applied"
    });
    // Only what changed ran: led.color was applied already.
    assert_eq!(
        runs(&log),
        [
            format!("{v1} led.color \"red\""),
            format!("{v2} led.mode \"blink\"")
        ]
    );
    let d = &r.reported()["edgesync"]["desired_result"];
    assert_eq!(
        d["keys"],
        json!([{"key": "led.mode", "status": "applied"}]),
        "{d}"
    );
    assert!(
        r.hub
            .stats()
            .gets_rejected
            .get(&429)
            .is_some_and(|n| *n >= 1)
    );
    assert!(
        r.figures()["retried"].as_u64().unwrap() >= 1,
        "{}",
        r.figures()
    );
    // Reconnects and a kill -9 apply nothing again: each GET finds the version taken in.
    for kill in [false, true] {
        let before = r.gets();
        if kill {
            r.agent.kill9();
        } else {
            r.agent.stop();
        }
        r.agent.restart();
        r.wait_online();
        wait("GET after the reconnect", DEADLINE, || r.gets() > before);
    }
    // A later patch while online still applies, once; a removal too.
    let v3 = r
        .hub
        .update_desired(json!({"led": {"mode": "off"}}))
        .unwrap();
    assert_eq!(v3, v2 + 1);
    wait("third value applied", DEADLINE, || runs(&log).len() == 3);
    assert_eq!(runs(&log)[2], format!("{v3} led.mode \"off\""));
    r.wait_reported("third value reported", |rep| {
        rep["led"]["mode"] == "off" && rep["edgesync"]["desired_result"]["version"] == v3
    });
    let v4 = r
        .hub
        .update_desired(json!({"led": {"color": null}}))
        .unwrap();
    wait("removal applied", DEADLINE, || runs(&log).len() == 4);
    assert_eq!(runs(&log)[3], format!("{v4} led.color null"));
    // Counted since the last start: only v3 and v4 were handed over by this run.
    assert_eq!(r.figures()["deltas"], 2, "{}", r.figures());
}

#[test]
fn throttled_patches_are_retried_until_the_twin_converges() {
    let Some(r) = rig("az-throttle", "") else {
        return;
    };
    wait("first GET", DEADLINE, || r.gets() >= 1);
    r.hub.throttle_twin(3);
    r.report(vec![("x", json!(1)), ("y.z", json!("a"))]);
    r.wait_reported("accepted after the 429s", |v| {
        *v == json!({"x": 1, "y": {"z": "a"}})
    });
    assert_eq!(r.hub.stats().patches_rejected.get(&429), Some(&3));
    let f = r.figures();
    assert!(f["retried"].as_u64().unwrap() >= 3, "{f}");
    assert_eq!(f["dropped_keys"], 0, "{f}");
}

#[test]
fn a_rejected_key_is_dropped_and_counted_and_the_rest_converges() {
    let Some(r) = rig("az-reject", "") else {
        return;
    };
    wait("first GET", DEADLINE, || r.gets() >= 1);
    // A 400 for one key: dropped for good.
    r.hub.inject_twin_errors(400, 1);
    r.report(vec![("bad", json!(1))]);
    wait("dropped", DEADLINE, || r.figures()["dropped_keys"] == 1);
    let f = r.figures();
    assert!(f["last_rejection"].as_str().unwrap().contains("400"), "{f}");
    // A value the twin can never take is dropped before sending; the rest goes on.
    r.report(vec![("cfg", json!({"$bad": 1})), ("ok", json!(2))]);
    r.wait_reported("the rest converged", |v| *v == json!({"ok": 2}));
    wait("counted", DEADLINE, || r.figures()["dropped_keys"] == 2);
    assert_eq!(r.hub.stats().patches_rejected.get(&400), Some(&1));
}
