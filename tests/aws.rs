//! The `aws-iot` profile (docs/PROTOCOL.md §7.3) with the real binary against the test kit's
//! AWS IoT Core emulator (Device Shadow), on Mosquitto over mutual TLS: reported values
//! converge to the shadow, desired state set while the agent is down is applied once, 409 is
//! retried, an oversized state is split over shadows or rejected with a counted error, the
//! change history loses nothing across a broker restart, and the default profile stays off
//! `$aws/`. Skipped with a notice when Mosquitto is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::cloud::{DEADLINE, aws_agent, decode, pki, tls_agent, wait};
use common::{Agent, report_req};
use edgesync_testkit::aws::{AwsIot, Connect, Options};
use edgesync_testkit::{FaultProxy, Mosquitto, MosquittoOptions, TestPki};
use serde_json::{Value, json};

struct Rig {
    thing: String,
    emu: AwsIot,
    agent: Agent,
    mosq: Mosquitto,
    pki: TestPki,
    dir: tempfile::TempDir,
}

/// Mosquitto, the emulator (capturing the change history) and an agent with the aws-iot
/// profile (`aws`: more `[aws]` lines, `rest`: more sections); `None` without Mosquitto.
fn rig(thing: &str, aws: &str, rest: &str, persistence: bool) -> Option<Rig> {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), thing);
    let mosq = Mosquitto::start(
        &pki,
        MosquittoOptions {
            persistence,
            ..MosquittoOptions::default()
        },
    )
    .unwrap()?;
    let options = Options {
        capture: vec!["edgesync/+/changes".into()],
        persistent_session: persistence,
        ..Options::default()
    };
    let emu = AwsIot::start_with(&Connect::mosquitto(&mosq, &pki).unwrap(), options).unwrap();
    emu.wait_for(DEADLINE, AwsIot::is_ready).unwrap();
    let mut opts = aws_agent(&pki, mosq.tls_port);
    opts.extra_toml = format!("[cloud]\nprofile = \"aws-iot\"\n[aws]\n{aws}\n{rest}\n");
    let agent = Agent::start(opts);
    let rig = Rig {
        thing: thing.to_owned(),
        emu,
        agent,
        mosq,
        pki,
        dir,
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

    fn report(&self, changes: Vec<(&str, Value)>) -> (u64, u64) {
        let r = self.agent.request(&report_req(changes));
        assert_eq!(r["ok"], true, "{r}");
        (
            r["first_seq"].as_u64().unwrap(),
            r["last_seq"].as_u64().unwrap(),
        )
    }

    fn reported(&self, shadow: Option<&str>) -> Value {
        self.emu
            .shadow(&self.thing, shadow)
            .map(|d| d["state"]["reported"].clone())
            .unwrap_or(Value::Null)
    }

    fn wait_reported(&self, shadow: Option<&str>, what: &str, ok: impl Fn(&Value) -> bool) {
        wait(what, DEADLINE, || ok(&self.reported(shadow)));
    }

    /// `metrics.shadow` of the status document.
    fn figures(&self) -> Value {
        self.agent.status()["metrics"]["shadow"].clone()
    }

    /// The seqs of the change history captured on the telemetry topic.
    fn history(&self) -> BTreeSet<u64> {
        let topic = format!("edgesync/{}/changes", self.thing);
        self.emu
            .captured()
            .iter()
            .filter(|(t, _)| *t == topic)
            .flat_map(|(_, p)| {
                let b = decode(p);
                assert_eq!(b["device"], self.thing.as_str(), "{b}");
                b["changes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["seq"].as_u64().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[test]
fn reported_values_converge_to_the_shadow_and_every_change_to_the_telemetry_topic() {
    let Some(r) = rig("aws-report", "", "", false) else {
        return;
    };
    let (first, _) = r.report(vec![
        ("led.mode", json!("blink")),
        ("temp", json!(20)),
        ("gone", json!(1)),
    ]);
    let (_, last) = r.report(vec![("temp", json!(21.5)), ("gone", Value::Null)]);
    r.wait_reported(None, "shadow converged", |v| {
        *v == json!({"led": {"mode": "blink"}, "temp": 21.5})
    });
    // Every change, in order, deduplicable by (device, seq), on the telemetry topic.
    let want: BTreeSet<u64> = (first..=last).collect();
    wait("history captured", DEADLINE, || r.history() == want);
    let f = r.figures();
    assert!(f["accepted"].as_u64().unwrap() >= 1, "{f}");
    assert_eq!(f["dropped_keys"], 0, "{f}");
    // Coalesced: far fewer shadow updates than changes is allowed, never more.
    let s = r.emu.stats();
    assert!(s.shadow.updates_accepted <= 5, "{s:?}");
    assert!(
        s.shadow.gets_accepted + s.shadow.gets_rejected >= 1,
        "/get on connect: {s:?}"
    );
}

/// A handler that appends `$EDGESYNC_VERSION` and the value to `file` (its run log).
fn counting_handler(keys: &str, file: &Path) -> String {
    let script = format!(
        "echo \"$EDGESYNC_VERSION $EDGESYNC_VALUE\" >> {}",
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
fn desired_state_set_while_the_agent_is_down_is_applied_once_after_reconnect() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("runs");
    let Some(mut r) = rig("aws-desired", "", &counting_handler("led.*", &log), false) else {
        return;
    };
    r.agent.stop();
    let v = r
        .emu
        .update_desired(&r.thing, None, json!({"led": {"mode": "blink"}}))
        .unwrap();
    r.agent.restart();
    r.wait_online();
    wait("applied once", DEADLINE, || runs(&log).len() == 1);
    assert_eq!(runs(&log), [format!("{v} \"blink\"")]);
    // The applied value is reported, which clears the delta, and the result is visible.
    r.wait_reported(None, "applied value reported", |rep| {
        rep["led"]["mode"] == "blink"
            && rep["edgesync"]["desired_result"]["version"] == v
            && rep["edgesync"]["desired_result"]["status"] == "applied"
    });
    wait("delta cleared", DEADLINE, || {
        r.emu.shadow(&r.thing, None).unwrap()["state"]["delta"].is_null()
    });
    // Reconnects and a kill -9 apply nothing again (the /get finds no delta, or one seen).
    let gets = |r: &Rig| {
        let s = r.emu.stats().shadow;
        s.gets_accepted + s.gets_rejected
    };
    for kill in [false, true] {
        let before = gets(&r);
        if kill {
            r.agent.kill9();
        } else {
            r.agent.stop();
        }
        r.agent.restart();
        r.wait_online();
        wait("/get after the reconnect", DEADLINE, || gets(&r) > before);
    }
    // Versions grow with every update (gaps): a later desired value still applies, once.
    let v2 = r
        .emu
        .update_desired(&r.thing, None, json!({"led": {"mode": "off"}}))
        .unwrap();
    assert!(v2 > v + 1, "versions have gaps: {v} then {v2}");
    wait("second value applied", DEADLINE, || runs(&log).len() == 2);
    r.wait_reported(None, "second value reported", |rep| {
        rep["led"]["mode"] == "off" && rep["edgesync"]["desired_result"]["version"] == v2
    });
    assert_eq!(runs(&log)[1], format!("{v2} \"off\""));
    // Counted since the last start: only v2 was handed over by this run.
    assert_eq!(r.figures()["deltas"], 1, "{}", r.figures());
}

#[test]
fn an_apply_result_names_only_its_own_keys_in_the_shadow() {
    // Per-key entries are an array, which the shadow replaces whole: results for many
    // different keys do not pile up towards the shadow's 8 KB.
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("runs");
    let Some(r) = rig("aws-result", "", &counting_handler("led.*", &log), false) else {
        return;
    };
    // Each value reported before the next is set: the next delta then holds only its key.
    for key in ["a", "b"] {
        let v = r
            .emu
            .update_desired(&r.thing, None, json!({"led": {key: "on"}}))
            .unwrap();
        r.wait_reported(None, "applied and reported", |rep| {
            rep["led"][key] == "on" && rep["edgesync"]["desired_result"]["version"] == v
        });
    }
    assert_eq!(runs(&log).len(), 2, "{:?}", runs(&log));
    let d = &r.reported(None)["edgesync"]["desired_result"];
    assert_eq!(
        d["keys"],
        json!([{"key": "led.b", "status": "applied"}]),
        "{d}"
    );
}

#[test]
fn a_409_conflict_is_retried_until_accepted() {
    let Some(r) = rig("aws-conflict", "", "", false) else {
        return;
    };
    r.emu.inject_update_errors(&r.thing, None, 409, 2);
    r.report(vec![("x", json!(1))]);
    r.wait_reported(None, "accepted after the conflicts", |v| v["x"] == 1);
    let f = r.figures();
    assert!(f["retried"].as_u64().unwrap() >= 2, "{f}");
    assert!(f["last_rejection"].as_str().unwrap().contains("409"), "{f}");
    assert_eq!(f["dropped_keys"], 0, "{f}");
    assert_eq!(r.emu.stats().shadow.updates_rejected.get(&409), Some(&2));
}

#[test]
fn an_oversized_state_is_split_over_shadows_and_what_cannot_fit_is_rejected_and_counted() {
    let Some(r) = rig(
        "aws-big",
        "[[aws.shadow_map]]\nkeys = [\"n.*\"]\nshadow = \"more\"\n",
        "",
        false,
    ) else {
        return;
    };
    let kb = |c: &str| json!(c.repeat(1000));
    // 7 KB in each shadow: 14 KB in all, more than one shadow holds.
    let main: Vec<String> = (0..7).map(|i| format!("k{i}")).collect();
    let more: Vec<String> = (0..7).map(|i| format!("n.{i}")).collect();
    let changes: Vec<(&str, Value)> = main
        .iter()
        .chain(&more)
        .map(|k| (k.as_str(), kb("a")))
        .collect();
    r.report(changes);
    r.wait_reported(None, "main shadow", |v| {
        main.iter().all(|k| v[k.as_str()].is_string())
    });
    r.wait_reported(Some("more"), "named shadow", |v| {
        (0..7).all(|i| v["n"][i.to_string()].is_string())
    });
    // Past 8 KB in the main shadow: 413, split to one key an update, the overflow dropped;
    // a value larger than a shadow is refused before sending.
    let over = ["k7", "k8", "k9"];
    r.report(
        over.iter()
            .map(|k| (*k, kb("b")))
            .chain([("huge", json!("c".repeat(9000)))])
            .collect(),
    );
    wait("every key in the shadow or dropped", DEADLINE, || {
        let v = r.reported(None);
        let f = r.figures();
        let stored = over.iter().filter(|k| v[**k].is_string()).count() as u64;
        stored + f["dropped_keys"].as_u64().unwrap_or(0) == over.len() as u64 + 1
    });
    let f = r.figures();
    assert!(f["dropped_keys"].as_u64().unwrap() >= 2, "{f}");
    assert!(f["last_rejection"].as_str().unwrap().contains("413"), "{f}");
    assert!(r.reported(None)["huge"].is_null());
    let log = r.agent.log();
    assert!(log.contains("larger than the shadow's 8192 bytes"), "{log}");
    assert!(log.contains("413"), "{log}");
    // The change history has every change, the dropped ones too.
    wait("history complete", DEADLINE, || r.history().len() == 18);
}

#[test]
fn the_change_history_loses_nothing_across_broker_restarts_mid_drain() {
    let Some(mut r) = rig("aws-restart", "", "", true) else {
        return;
    };
    // The agent reconnects through a proxy that holds it back while the broker restarts.
    let proxy = FaultProxy::start(r.mosq.tls_addr()).unwrap();
    r.agent.stop();
    let mut opts = aws_agent(&r.pki, proxy.port());
    opts.extra_toml = "[cloud]\nprofile = \"aws-iot\"\n".into();
    r.agent.opts = opts;
    std::fs::write(&r.agent.config_path, r.agent.opts.to_toml(r.agent.dir())).unwrap();
    proxy.cut();
    r.agent.restart();
    let mut want = BTreeSet::new();
    for i in 0..30 {
        let k = format!("k{}", i % 5);
        let changes: Vec<(&str, Value)> = (0..1000)
            .map(|j| (k.as_str(), json!({"i": i, "j": j, "pad": "x".repeat(40)})))
            .collect();
        let (a, b) = r.report(changes);
        want.extend(a..=b);
    }
    // A slow link keeps the drain going while the broker restarts under it.
    proxy.bandwidth(400_000);
    proxy.restore();
    for _ in 0..3 {
        let seen = r.history().len();
        wait("drain progress", DEADLINE, || {
            r.history().len() > seen || r.agent.depth() == 0
        });
        proxy.cut();
        let connects = r.emu.stats().connects;
        r.mosq.restart().unwrap();
        wait("emulator back", DEADLINE, || {
            r.emu.stats().connects > connects
        });
        proxy.restore();
    }
    assert!(r.agent.depth() > 0, "the restarts happened mid-drain");
    proxy.bandwidth(0);
    wait("every change captured", DEADLINE * 2, || {
        r.history().is_superset(&want)
    });
    wait("queue drained", DEADLINE, || r.agent.depth() == 0);
    // And the latest values reached the shadow.
    r.wait_reported(None, "latest values", |v| {
        (0..5).all(|i| v[format!("k{i}")]["i"] == 25 + i && v[format!("k{i}")]["j"] == 999)
    });
    let _ = &r.dir;
}

#[test]
fn the_default_profile_stays_off_the_aws_topics() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "aws-default");
    let Some(mosq) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    let options = Options {
        capture: vec!["edgesync/#".into()],
        ..Options::default()
    };
    let emu = AwsIot::start_with(&Connect::mosquitto(&mosq, &pki).unwrap(), options).unwrap();
    emu.wait_for(DEADLINE, AwsIot::is_ready).unwrap();
    let agent = Agent::start(tls_agent(&pki, mosq.tls_port, ""));
    let r = agent.request(&report_req(vec![("x", json!(1))]));
    assert_eq!(r["ok"], true, "{r}");
    wait("batch on P/D/reported", DEADLINE, || {
        emu.captured()
            .iter()
            .any(|(t, _)| t == "edgesync/aws-default/reported")
    });
    let s = emu.stats();
    assert_eq!(s.shadow_messages_received, 0, "{s:?}");
    assert!(agent.status()["metrics"].get("shadow").is_none());
}
