//! The first hour of a new user (issue 15): CLI habits, with the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::cloud::{DEADLINE, pki, tls_options};
use common::rig::broker_and_cloud;
use common::{
    Agent, AgentOptions, CLI_DEADLINE, assert_exit, bin_command, report_req, run_with_timeout,
    stdout, wait_until,
};
use edgesync_testkit::FaultProxy;
use serde_json::{Value, json};

fn bare(args: &[&str]) -> std::process::Output {
    let mut cmd = bin_command();
    cmd.args(args).env_remove("EDGESYNC_CONFIG");
    run_with_timeout(cmd, None, CLI_DEADLINE)
}

#[test]
fn help_is_a_command_and_dash_c_is_the_config_option() {
    // `help` and `help COMMAND` print what `--help` and `COMMAND --help` print.
    let main = bare(&["--help"]);
    assert_exit(&main, 0);
    assert!(
        stdout(&main).contains("-c, --config PATH"),
        "{}",
        stdout(&main)
    );
    assert!(stdout(&main).contains("help          Show this help"));
    let help = bare(&["help"]);
    assert_exit(&help, 0);
    assert_eq!(stdout(&help), stdout(&main));
    for command in [
        "run",
        "report",
        "status",
        "get",
        "history",
        "rollback",
        "queue",
        "reconnect",
    ] {
        let a = bare(&["help", command]);
        let b = bare(&[command, "--help"]);
        assert_exit(&a, 0);
        assert_eq!(stdout(&a), stdout(&b), "{command}");
    }
    let unknown = bare(&["help", "frobnicate"]);
    assert_exit(&unknown, 2);

    // `-c PATH` reads the same file as `--config PATH`.
    let agent = Agent::prepare(AgentOptions::default());
    let config = agent.config_path.to_str().unwrap();
    let long = bare(&["check-config", "--config", config]);
    let short = bare(&["check-config", "-c", config]);
    assert_exit(&long, 0);
    assert_exit(&short, 0);
    assert_eq!(stdout(&short), stdout(&long));
    let missing = bare(&["check-config", "-c", "/nonexistent/edgesync.toml"]);
    assert_exit(&missing, 2);
}

#[test]
fn status_json_says_the_daemon_is_down_and_exits_3() {
    let agent = Agent::prepare(AgentOptions::default());
    let out = agent.cli(&["status", "--json"]);
    assert_exit(&out, 3);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    assert_eq!(doc["running"], false, "{doc}");
    assert_eq!(doc["socket"], agent.socket.display().to_string(), "{doc}");
    assert!(
        doc["error"]
            .as_str()
            .unwrap_or("")
            .contains("not reachable"),
        "{doc}"
    );
    // `reconnect` needs the daemon too.
    assert_exit(&agent.cli(&["reconnect"]), 3);
    // Without --json the text goes to stderr only, as before.
    let text = agent.cli(&["status"]);
    assert_exit(&text, 3);
    assert!(stdout(&text).is_empty(), "{}", stdout(&text));
}

#[test]
fn offline_is_explained_and_reconnect_retries_now() {
    let dir = tempfile::tempdir().unwrap();
    let device = "fh-offline";
    let pki = pki(dir.path(), device);
    let (broker, _cloud) = broker_and_cloud(&pki, device);
    let proxy = FaultProxy::start(broker.tls_addr()).unwrap();
    proxy.cut();
    // Waits of up to an hour: within this test only `reconnect` makes the agent try again.
    let mqtt = "keep_alive = \"5s\"\nreconnect_initial = \"1h\"\nreconnect_max = \"1h\"\n";
    let agent = Agent::start(tls_options(&pki, proxy.port(), mqtt).max_bytes("64MiB"));
    let connection = || agent.status()["connection"].clone();
    let waiting = |c: &Value| c["state"] == "offline" && c["next_attempt_in"].is_u64();

    // The first try failed: down since the start, the next try ahead.
    let mut c = Value::Null;
    wait_until("the first failed attempt", DEADLINE, || {
        c = connection();
        waiting(&c)
    });
    let down = c["down_since"].as_u64().unwrap_or_else(|| panic!("{c}"));
    assert!(c["attempts"].as_u64() >= Some(1), "{c}");

    // `reconnect` while the broker is away tries again at once; `down_since` stays where
    // it was while `attempts` grows. Until the wait drawn is long (at least 2 min, random up
    // to 1 h), so that the connection below can only be `reconnect`'s doing.
    let mut attempts = c["attempts"].as_u64().unwrap();
    while attempts < 3 || c["next_attempt_in"].as_u64() < Some(120_000) {
        assert!(attempts < 30, "{c}");
        let out = agent.cli(&["reconnect"]);
        assert_exit(&out, 0);
        assert!(
            stdout(&out).contains("retrying the broker now"),
            "{}",
            stdout(&out)
        );
        wait_until("the next failed attempt", DEADLINE, || {
            c = connection();
            waiting(&c) && c["attempts"].as_u64() > Some(attempts)
        });
        attempts = c["attempts"].as_u64().unwrap();
        assert_eq!(c["down_since"], down, "not moved by retries: {c}");
    }
    let text = stdout(&agent.cli(&["status"]));
    assert!(
        text.contains(&format!(
            "offline to mqtts://localhost:{} (down for ",
            proxy.port()
        )) && text.contains(&format!("{attempts} attempt(s), next in ")),
        "{text}"
    );

    // Changes queued meanwhile are a backlog, drained (and logged) once connected.
    let keys: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    let answer = agent.request(&report_req(keys.iter().map(|k| (k.as_str(), json!(1)))));
    assert_eq!(answer["ok"], true, "{answer}");

    // The broker is back: `reconnect` connects well before the next try (2 min or more).
    proxy.restore();
    let out = agent.cli(&["reconnect"]);
    assert_exit(&out, 0);
    let online_within = Duration::from_secs(60);
    wait_until("online after reconnect", online_within, || {
        connection()["state"] == "online"
    });
    let c = connection();
    assert_eq!(
        (&c["down_since"], &c["attempts"], &c["next_attempt_in"]),
        (&Value::Null, &json!(0), &Value::Null),
        "{c}"
    );

    // Connected: `reconnect` says so and leaves the connection alone.
    let out = agent.cli(&["reconnect"]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("already connected"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        agent.request(&json!({"op": "reconnect"})),
        json!({"ok": true, "state": "online", "retrying": false})
    );
    let after = agent.status();
    assert_eq!(after["connection"]["since"], c["since"], "{after}");
    assert_eq!(after["counters"]["reconnects"], 0, "{after}");

    // The drain in the log: its start with the backlog, its end with count, time and rate.
    wait_until("the backlog drained", DEADLINE, || {
        agent.log().contains("backlog drained: 300 changes in ")
    });
    let log = agent.log();
    assert!(
        log.contains("draining the backlog: 300 changes queued"),
        "{log}"
    );
    assert!(log.contains("retrying now (edgesync reconnect)"), "{log}");
    assert_eq!(agent.depth(), 0);
}

#[test]
fn status_labels_counters_by_scope() {
    let agent = Agent::start(AgentOptions::default());
    let bad = agent.request(&json!({"op": "report", "changes": [{"key": "bad key", "value": 1}]}));
    assert_eq!(bad["ok"], false, "{bad}");
    let s = agent.status();
    assert_eq!(s["counter_scopes"]["persistent"][1], "acked", "{s}");
    assert!(
        s["counter_scopes"]["since_start"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("sent"))),
        "{s}"
    );
    let text = stdout(&agent.cli(&["status"]));
    assert!(
        text.contains("store file  reported 0 · acked 0 · dropped 0 · rejected store-full 0\n"),
        "{text}"
    );
    assert!(
        text.contains("since start sent 0 · resent 0 · reconnects 0 · rejected invalid-change 1\n"),
        "{text}"
    );
    assert!(!text.contains("invalid 1"), "one word per meaning: {text}");
}
