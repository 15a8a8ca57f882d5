//! Commands over MQTT (docs/PROTOCOL.md §4, §5) against a real broker: the real binary, rumqttd
//! in-process, a "cloud" client publishing requests on `P/D/cmd/NAME` and reading the
//! responses on `P/D/cmd/NAME/result`. Every command and every error code; replay of an id
//! answered from the record without running again (also after a restart); `kill -9`
//! between receipt and answer (answered after the restart, run at most once).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use common::cloud::{DEADLINE, Msg, cbor, decode, unique, wait};
use common::rig::{BrokerRig, exec_handler, extends_broker_rig, line_count as runs};
use serde_json::{Value, json};

/// The shared rig (a broker, a cloud client subscribed to everything of the device, and the
/// agent) with the command helpers of this file.
struct Rig {
    base: BrokerRig,
}

extends_broker_rig!(Rig);

impl Rig {
    /// `extra` is appended to the agent's config (more sections).
    fn start(device: &str, extra: &str) -> Rig {
        Rig {
            base: BrokerRig::ready(device, extra),
        }
    }

    /// Publishes raw bytes on `P/D/cmd/NAME`.
    fn send_raw(&self, name: &str, payload: impl Into<Vec<u8>>) {
        self.cloud
            .publish(&self.topic(&format!("cmd/{name}")), payload, false);
    }

    fn send(&self, name: &str, req: &Value) {
        self.send_raw(name, req.to_string());
    }

    fn send_cbor(&self, name: &str, req: &Value) {
        self.send_raw(name, cbor(req));
    }

    /// Waits for the `n`th response (from 1) to `id` of `name`.
    fn nth_answer(&self, name: &str, id: &Value, n: usize) -> (Msg, Value) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let got = self.responses(name, id);
            if got.len() >= n {
                return got[n - 1].clone();
            }
            assert!(
                Instant::now() < deadline,
                "no response #{n} to {name} {id} (got {got:?}); log:\n{}",
                self.agent.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the first response to `id` of `name`.
    fn answer(&self, name: &str, id: &str) -> Value {
        self.nth_answer(name, &json!(id), 1).1
    }

    /// Sends `{"id": new, "args": args}` as JSON and waits for the response.
    fn call(&self, name: &str, args: Value) -> Value {
        let id = format!("{name}-{}", unique());
        self.send(name, &json!({"id": id, "args": args}));
        self.answer(name, &id)
    }

    fn restart_after_kill9(&mut self) {
        self.agent.kill9();
        self.agent.restart();
        self.wait_ready();
    }

    fn restart_after_stop(&mut self) {
        self.agent.stop();
        self.agent.restart();
        self.wait_ready();
    }

    /// Publishes a desired document and waits until it is applied.
    fn desired(&self, version: u64, state: Value) {
        self.cloud.publish(
            &self.topic("desired"),
            json!({"version": version, "state": state}).to_string(),
            false,
        );
        self.cloud.wait_result(version, "applied");
    }
}

fn ok_result(v: &Value) -> &Value {
    assert_eq!(v["ok"], true, "expected success, got {v}");
    &v["result"]
}

fn error_code(v: &Value) -> &str {
    assert_eq!(v["ok"], false, "expected an error, got {v}");
    v["error"]["message"].as_str().expect("error.message");
    v["error"]["code"].as_str().expect("error.code")
}

/// An exec handler for `led` that appends a line to `runs` each time it runs, and waits
/// while the file `slow` exists.
fn counting_handler(dir: &std::path::Path) -> (String, PathBuf, PathBuf) {
    let runs = dir.join("runs");
    let slow = dir.join("slow");
    let script = format!(
        "echo run >> '{}'; while [ -e '{}' ]; do sleep 0.05; done",
        runs.display(),
        slow.display()
    );
    let toml = exec_handler("led", &script, "60s");
    (toml, runs, slow)
}

#[test]
fn ping_status_config_history_answer_in_the_encoding_of_the_request() {
    let rig = Rig::start("ctl-basic", "");
    // ping in JSON → JSON.
    let before = edgesync::now_ms();
    rig.send("ping", &json!({"id": "p-json"}));
    let (msg, v) = rig.nth_answer("ping", &json!("p-json"), 1);
    assert_eq!(msg.payload.first(), Some(&b'{'));
    assert!(!msg.retain);
    assert_eq!(ok_result(&v)["pong"], true);
    assert!(ok_result(&v)["ts"].as_u64().unwrap() >= before);
    assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
    // ping in CBOR → CBOR.
    rig.send_cbor("ping", &json!({"id": "p-cbor", "args": {}}));
    let (msg, v) = rig.nth_answer("ping", &json!("p-cbor"), 1);
    assert_ne!(msg.payload.first(), Some(&b'{'), "a CBOR request gets CBOR");
    let direct: Value = ciborium::from_reader(msg.payload.as_slice()).unwrap();
    assert_eq!(direct, v);
    assert_eq!(ok_result(&v)["pong"], true);

    // status: the document of `edgesync status --json`.
    let v = rig.call("status", json!({}));
    let s = ok_result(&v);
    assert_eq!(s["connection"]["state"], "online");
    assert_eq!(s["agent"]["device"], "ctl-basic");
    for path in ["/queue/depth", "/counters/reported", "/desired/version"] {
        assert!(s.pointer(path).is_some(), "{path} missing in {s}");
    }
    let local = rig.agent.status();
    assert_eq!(s["agent"], local["agent"]);

    // config: the effective config, paths but no secrets.
    let v = rig.call("config", json!({}));
    let c = ok_result(&v);
    assert_eq!(c["device"]["id"], "ctl-basic");
    assert_eq!(
        c["store"]["path"],
        rig.agent.store_path.display().to_string()
    );
    assert_eq!(c["control"]["replay_window"], "1d");
    assert_eq!(
        c["control"]["allow"],
        json!([
            "ping",
            "status",
            "sync",
            "history",
            "rollback",
            "log-level",
            "config",
            "reload"
        ])
    );
    assert_eq!(c["log"]["running"], "info");

    // history: newest first, limited.
    rig.desired(1, json!({"mode": "a"}));
    rig.desired(2, json!({"mode": "b"}));
    let v = rig.call("history", json!({"key": "mode", "limit": 1}));
    let h = ok_result(&v);
    assert_eq!(h["key"], "mode");
    assert_eq!(h["history"].as_array().unwrap().len(), 1);
    assert_eq!(h["history"][0]["value"], "b");
    assert_eq!(h["history"][0]["version"], 2);
    let v = rig.call("history", json!({"key": "mode"}));
    let versions: Vec<&Value> = ok_result(&v)["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["version"])
        .collect();
    assert_eq!(versions, [2, 1]);
    let v = rig.call("history", json!({"key": "never.set"}));
    assert_eq!(ok_result(&v)["history"], json!([]));
}

#[test]
fn every_error_code_is_reachable() {
    let rig = Rig::start(
        "ctl-errors",
        "[control]\nallow = [\"ping\", \"history\", \"rollback\", \"log-level\", \"sync\"]\n",
    );
    // bad-request without a readable id: "id": null, in the request's encoding.
    rig.send_raw("ping", "{not json");
    let (msg, v) = rig.nth_answer("ping", &Value::Null, 1);
    assert_eq!(msg.payload.first(), Some(&b'{'));
    assert_eq!(error_code(&v), "bad-request");
    assert!(v["error"]["message"].as_str().unwrap().contains("JSON"));
    rig.send("status", &json!({"args": {}}));
    let (_, v) = rig.nth_answer("status", &Value::Null, 1);
    assert_eq!(error_code(&v), "bad-request");
    assert!(v["error"]["message"].as_str().unwrap().contains("id"));
    rig.send_cbor("ping", &json!({"id": 7}));
    let (msg, v) = rig.nth_answer("ping", &Value::Null, 2);
    assert_ne!(
        msg.payload.first(),
        Some(&b'{'),
        "CBOR request, CBOR answer"
    );
    assert_eq!(error_code(&v), "bad-request");
    rig.send("ping", &json!({"id": "x".repeat(65)}));
    let (_, v) = rig.nth_answer("ping", &Value::Null, 3);
    assert_eq!(error_code(&v), "bad-request");
    // Text that is no JSON document is answered in JSON, which its sender reads (issue 15).
    rig.send_raw("ping", "[1, 2]");
    let (msg, v) = rig.nth_answer("ping", &Value::Null, 4);
    assert_eq!(
        msg.payload.first(),
        Some(&b'{'),
        "text request, JSON answer"
    );
    assert_eq!(error_code(&v), "bad-request");
    // bad-request with an id: malformed envelope or arguments.
    rig.send("ping", &json!({"id": "b1", "args": [1]}));
    assert_eq!(error_code(&rig.answer("ping", "b1")), "bad-request");
    rig.send("history", &json!({"id": "b2", "args": {"limit": 3}}));
    let v = rig.answer("history", "b2");
    assert_eq!(error_code(&v), "bad-request");
    assert!(v["error"]["message"].as_str().unwrap().contains("key"));
    rig.send(
        "history",
        &json!({"id": "b3", "args": {"key": "k", "limt": 3}}),
    );
    assert_eq!(error_code(&rig.answer("history", "b3")), "bad-request");
    rig.send("sync", &json!({"id": "b4", "args": {"timeout": 600_001}}));
    assert_eq!(error_code(&rig.answer("sync", "b4")), "bad-request");
    rig.send("ping", &json!({"id": "b5", "expires": "later"}));
    assert_eq!(error_code(&rig.answer("ping", "b5")), "bad-request");
    // unknown-command.
    rig.send("reboot", &json!({"id": "u1"}));
    let v = rig.answer("reboot", "u1");
    assert_eq!(error_code(&v), "unknown-command");
    assert!(v["error"]["message"].as_str().unwrap().contains("ping"));
    // forbidden: known but not in [control] allow; purge before looking at its args.
    rig.send("config", &json!({"id": "f1"}));
    assert_eq!(error_code(&rig.answer("config", "f1")), "forbidden");
    rig.send("purge", &json!({"id": "f2", "args": {"confirm": true}}));
    assert_eq!(error_code(&rig.answer("purge", "f2")), "forbidden");
    rig.send("purge", &json!({"id": "f3"}));
    assert_eq!(error_code(&rig.answer("purge", "f3")), "forbidden");
    // expired: not run.
    let past = edgesync::now_ms() - 1000;
    rig.send("ping", &json!({"id": "e1", "expires": past}));
    let v = rig.answer("ping", "e1");
    assert_eq!(error_code(&v), "expired");
    assert!(v.get("result").is_none());
    let future = edgesync::now_ms() + 600_000;
    rig.send("ping", &json!({"id": "e2", "expires": future}));
    ok_result(&rig.answer("ping", "e2"));
    // failed: it ran and did not succeed.
    rig.send(
        "rollback",
        &json!({"id": "x1", "args": {"key": "nokey", "version": 3}}),
    );
    let v = rig.answer("rollback", "x1");
    assert_eq!(error_code(&v), "failed");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("version 3")
    );
    rig.send("log-level", &json!({"id": "x2", "args": {"level": "loud"}}));
    let v = rig.answer("log-level", "x2");
    assert_eq!(error_code(&v), "failed");
    // A refused request is not recorded: the same id, now valid, runs.
    rig.send("history", &json!({"id": "b2", "args": {"key": "k"}}));
    let (_, v) = rig.nth_answer("history", &json!("b2"), 2);
    ok_result(&v);
    // An id used by another command is not run under it.
    rig.send("ping", &json!({"id": "x1"}));
    let v = rig.answer("ping", "x1");
    assert_eq!(error_code(&v), "bad-request");
    assert!(v["error"]["message"].as_str().unwrap().contains("rollback"));
    // The agent is still well.
    ok_result(&rig.call("ping", json!({})));
}

#[test]
fn sync_answers_when_drained_or_at_its_timeout_and_never_holds_up_other_commands() {
    // Linger holds a lone change back for 5 s: the queue is not empty meanwhile.
    let rig = Rig::start("ctl-sync", "[sync]\nlinger = \"5s\"\n");
    let v = rig.call("sync", json!({}));
    assert_eq!(ok_result(&v), &json!({"drained": true, "depth": 0}));
    let r = rig
        .agent
        .request(&common::report_req([("temp", json!(21.5))]));
    assert_eq!(r["ok"], true, "{r}");
    let started = Instant::now();
    rig.send(
        "sync",
        &json!({"id": "s-long", "args": {"timeout": 60_000}}),
    );
    rig.send("sync", &json!({"id": "s-short", "args": {"timeout": 100}}));
    rig.send("ping", &json!({"id": "p-during"}));
    let short = rig.answer("sync", "s-short");
    assert_eq!(ok_result(&short), &json!({"drained": false, "depth": 1}));
    ok_result(&rig.answer("ping", "p-during"));
    assert!(
        rig.responses("sync", &json!("s-long")).is_empty(),
        "the long sync answered before the queue drained"
    );
    let long = rig.answer("sync", "s-long");
    assert_eq!(ok_result(&long), &json!({"drained": true, "depth": 0}));
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "drained too early"
    );
    assert_eq!(rig.agent.depth(), 0);
    rig.cloud.wait_change("temp", &json!(21.5), None);
    // Answers went out in the order the commands finished, not the order they came.
    let order: Vec<String> = rig
        .cloud
        .messages()
        .iter()
        .filter(|m| m.topic.ends_with("/result") && m.topic.contains("/cmd/"))
        .map(|m| decode(&m.payload)["id"].as_str().unwrap_or("").to_owned())
        .filter(|id| ["s-long", "s-short", "p-during"].contains(&id.as_str()))
        .collect();
    assert_eq!(
        order.last().map(String::as_str),
        Some("s-long"),
        "{order:?}"
    );
}

#[test]
fn purge_is_forbidden_by_default_and_when_allowed_needs_confirm() {
    let mut rig = Rig::start(
        "ctl-purge",
        "[sync]\nlinger = \"10s\"\nbatch_max_changes = 100000\n\
         [control]\nallow = [\"ping\", \"status\", \"purge\"]\n",
    );
    let changes: Vec<(&str, Value)> = (0..5).map(|i| ("k", json!(i))).collect();
    let r = rig.agent.request(&common::report_req(changes));
    assert_eq!(r["ok"], true, "{r}");
    rig.send("purge", &json!({"id": "pg-0"}));
    let v = rig.answer("purge", "pg-0");
    assert_eq!(error_code(&v), "bad-request");
    assert!(v["error"]["message"].as_str().unwrap().contains("confirm"));
    rig.send("purge", &json!({"id": "pg-1", "args": {"confirm": "yes"}}));
    assert_eq!(error_code(&rig.answer("purge", "pg-1")), "bad-request");
    assert_eq!(rig.agent.depth(), 5, "a refused purge drops nothing");
    rig.send("purge", &json!({"id": "pg-2", "args": {"confirm": true}}));
    let v = rig.answer("purge", "pg-2");
    let p = ok_result(&v);
    assert_eq!(p["dropped"], 5);
    assert!(p["bytes"].as_u64().unwrap() > 0);
    let s = rig.agent.status();
    assert_eq!(s["queue"]["depth"], 0);
    assert_eq!(s["counters"]["dropped"], 5);
    // Replayed, not purged again: later changes stay.
    let r = rig.agent.request(&common::report_req([("k", json!(9))]));
    assert_eq!(r["ok"], true, "{r}");
    rig.send("purge", &json!({"id": "pg-2", "args": {"confirm": true}}));
    let (_, again) = rig.nth_answer("purge", &json!("pg-2"), 2);
    assert_eq!(again, v);
    assert_eq!(rig.agent.depth(), 1);
    // The counters hold across a restart.
    rig.restart_after_stop();
    assert_eq!(rig.agent.status()["counters"]["dropped"], 5);

    // Default config: forbidden.
    let rig = Rig::start("ctl-purge-default", "");
    rig.send("purge", &json!({"id": "pg-d", "args": {"confirm": true}}));
    let v = rig.answer("purge", "pg-d");
    assert_eq!(error_code(&v), "forbidden");
    assert!(v["error"]["message"].as_str().unwrap().contains("allow"));
}

#[test]
fn log_level_changes_the_running_filter() {
    let rig = Rig::start("ctl-log", "[log]\nlevel = \"warn\"\n");
    ok_result(&rig.call("ping", json!({})));
    rig.send("ping", &json!({"id": "quiet-ping"}));
    rig.answer("ping", "quiet-ping");
    assert!(
        !rig.agent.log().contains("quiet-ping"),
        "debug lines at level warn"
    );
    let v = rig.call("log-level", json!({"level": "debug"}));
    assert_eq!(
        ok_result(&v),
        &json!({"level": "debug", "previous": "warn"})
    );
    rig.send("ping", &json!({"id": "loud-ping"}));
    rig.answer("ping", "loud-ping");
    wait("the debug line of loud-ping", DEADLINE, || {
        rig.agent
            .log()
            .lines()
            .any(|l| l.contains("DEBUG") && l.contains("loud-ping"))
    });
    let v = rig.call("log-level", json!({"level": "info,edgesync=nonsense"}));
    assert_eq!(error_code(&v), "failed");
    let v = rig.call("log-level", json!({}));
    assert_eq!(error_code(&v), "bad-request");
    let v = rig.call("config", json!({}));
    assert_eq!(ok_result(&v)["log"]["running"], "debug");
    let v = rig.call("log-level", json!({"level": "warn"}));
    assert_eq!(ok_result(&v)["previous"], "debug");
    rig.send("ping", &json!({"id": "quiet-again"}));
    rig.answer("ping", "quiet-again");
    ok_result(&rig.call("ping", json!({})));
    assert!(!rig.agent.log().contains("quiet-again"));
}

#[test]
fn a_replayed_id_is_answered_from_the_record_without_running_again_also_after_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (handler, runs_file, _) = counting_handler(dir.path());
    let mut rig = Rig::start("ctl-replay", &handler);
    rig.desired(1, json!({"led": "red"}));
    rig.desired(2, json!({"led": "green"}));
    assert_eq!(runs(&runs_file), 2);

    rig.send(
        "rollback",
        &json!({"id": "rb-1", "args": {"key": "led", "version": 1}}),
    );
    let first = rig.answer("rollback", "rb-1");
    assert_eq!(
        ok_result(&first),
        &json!({"key": "led", "version": 1, "value": "red", "status": "applied"})
    );
    assert_eq!(runs(&runs_file), 3);
    rig.cloud
        .wait_change("led", &json!("red"), Some("rollback"));

    // The same id again (in CBOR): the first answer, re-encoded; nothing runs.
    rig.send_cbor(
        "rollback",
        &json!({"id": "rb-1", "args": {"key": "led", "version": 1}}),
    );
    let (msg, again) = rig.nth_answer("rollback", &json!("rb-1"), 2);
    assert_ne!(msg.payload.first(), Some(&b'{'));
    assert_eq!(again, first);
    // Even with other arguments, or expired by now: the id was executed.
    rig.send(
        "rollback",
        &json!({"id": "rb-1", "args": {"key": "led", "version": 2}, "expires": 1}),
    );
    let (_, again) = rig.nth_answer("rollback", &json!("rb-1"), 3);
    assert_eq!(again, first);

    // After a clean restart and after kill -9: still answered from the record.
    rig.restart_after_stop();
    rig.send(
        "rollback",
        &json!({"id": "rb-1", "args": {"key": "led", "version": 1}}),
    );
    let (_, again) = rig.nth_answer("rollback", &json!("rb-1"), 4);
    assert_eq!(again, first);
    rig.restart_after_kill9();
    rig.send(
        "rollback",
        &json!({"id": "rb-1", "args": {"key": "led", "version": 1}}),
    );
    let (_, again) = rig.nth_answer("rollback", &json!("rb-1"), 5);
    assert_eq!(again, first);

    // A new id runs.
    let v = rig.call("rollback", json!({"key": "led", "version": 2}));
    assert_eq!(ok_result(&v)["value"], "green");
    assert_eq!(runs(&runs_file), 4, "only the two ids ran, once each");
    let h = rig.call("history", json!({"key": "led"}));
    let origins: Vec<&Value> = ok_result(&h)["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["origin"])
        .collect();
    assert_eq!(origins, ["rollback", "rollback", "cloud", "cloud"]);
}

#[test]
fn kill9_between_receipt_and_answer_is_answered_after_restart_and_run_at_most_once() {
    let dir = tempfile::tempdir().unwrap();
    let (handler, runs_file, slow) = counting_handler(dir.path());
    let mut rig = Rig::start("ctl-kill", &handler);
    rig.desired(1, json!({"led": "red"}));
    rig.desired(2, json!({"led": "green"}));
    assert_eq!(runs(&runs_file), 2);

    // The handler hangs; the agent dies while the rollback runs.
    std::fs::write(&slow, "").unwrap();
    rig.send(
        "rollback",
        &json!({"id": "rb-k", "args": {"key": "led", "version": 1}}),
    );
    wait("the rollback's handler to start", DEADLINE, || {
        runs(&runs_file) == 3
    });
    assert!(rig.responses("rollback", &json!("rb-k")).is_empty());
    rig.agent.kill9();
    // Let the orphaned handler end.
    std::fs::remove_file(&slow).unwrap();
    rig.agent.restart();
    let v = rig.answer("rollback", "rb-k");
    assert_eq!(error_code(&v), "failed");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("interrupted by a restart"),
        "{v}"
    );
    rig.wait_ready();
    // Asked again: the same answer; it never runs again.
    rig.send(
        "rollback",
        &json!({"id": "rb-k", "args": {"key": "led", "version": 1}}),
    );
    let (_, again) = rig.nth_answer("rollback", &json!("rb-k"), 2);
    assert_eq!(again, v);
    ok_result(&rig.call("ping", json!({})));
    assert_eq!(runs(&runs_file), 3, "the interrupted rollback ran once");
    assert_eq!(rig.responses("rollback", &json!("rb-k")).len(), 2);
}

#[test]
fn a_request_received_but_not_started_before_a_crash_runs_after_restart() {
    let mut rig = Rig::start("ctl-recv", "");
    rig.agent.stop();
    // What the intake leaves behind when the agent dies right after the PUBACK: the
    // request recorded as received, nothing started.
    let store = rig.agent.store_path.clone();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let outbox = edgesync::Outbox::open(&edgesync::StoreOptions {
                path: store,
                max_bytes: 64 << 20,
                when_full: edgesync::WhenFull::Reject,
                cache_size: 1 << 20,
            })
            .unwrap();
            let req = edgesync::codec::command::Incoming {
                id: "only-received".into(),
                name: "ping".into(),
                json: false,
                args: serde_json::Map::new(),
                expires: None,
                refusal: None,
            };
            let limits = edgesync::codec::command::Limits {
                window_ms: 86_400_000,
                max: 100,
                clock: 0,
            };
            let r = edgesync::codec::command::receive(&outbox, req, limits, edgesync::now_ms())
                .await
                .unwrap();
            assert_eq!(r, edgesync::codec::command::Intake::Accepted);
            outbox.shutdown().await;
        });
    rig.agent.restart();
    let (msg, v) = rig.nth_answer("ping", &json!("only-received"), 1);
    assert_ne!(msg.payload.first(), Some(&b'{'), "answered in its encoding");
    assert_eq!(ok_result(&v)["pong"], true);
}
