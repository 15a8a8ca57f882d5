//! Identity files (issue 7 part 7): a private key or password file that other users can
//! access, and a config file anyone can write, are refused with a message naming the file,
//! its mode and the fix, at `run`, at `check-config` and at a reload (the running config
//! stays). Group access is allowed (packages install keys `root:edgesync` 0640).
//!
//! The TLS failures themselves (wrong CA, wrong server name, expired server and client
//! certificates) are in `tests/tls_link.rs`; rotation under traffic in `tests/reload.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::cloud::{DEADLINE, pki, tls_agent, wait};
use common::{Agent, CLI_DEADLINE, assert_exit, bin_command, run_with_timeout, stderr};
use edgesync_testkit::{RumqttdBroker, RumqttdOptions};
use serde_json::json;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `edgesync run` must fail at once (exit 2) with `needle` on stderr.
fn run_refused(agent: &Agent, needles: &[&str]) {
    let mut cmd = bin_command();
    cmd.arg("run").arg("--config").arg(&agent.config_path);
    let out = run_with_timeout(cmd, None, CLI_DEADLINE);
    assert_exit(&out, 2);
    for n in needles {
        assert!(
            stderr(&out).contains(n),
            "run: {n:?} not in {}",
            stderr(&out)
        );
    }
}

fn check_config(agent: &Agent, code: i32, needles: &[&str]) {
    let out = agent.cli(&["check-config"]);
    assert_exit(&out, code);
    for n in needles {
        assert!(
            stderr(&out).contains(n),
            "check-config: {n:?} not in {}",
            stderr(&out)
        );
    }
}

#[test]
fn secrets_readable_by_others_and_a_world_writable_config_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "id-modes");
    let mut opts = tls_agent(&pki, 1, "username = \"u\"\npassword_file = \"password\"\n");
    // The agent's own copy of its key, whose mode the test changes.
    opts.mqtt_extra = opts
        .mqtt_extra
        .replace(&format!("{:?}", pki.client_key), "\"device.key\"");
    let agent = Agent::prepare(opts);
    let key = agent.write_file("device.key", std::fs::read(&pki.client_key).unwrap());
    let password = agent.write_file("password", "secret\n");
    chmod(&key, 0o600);
    chmod(&password, 0o600);
    chmod(&agent.config_path, 0o644);
    check_config(&agent, 0, &[]);

    // Group may read (root:edgesync 0640), others may not.
    chmod(&key, 0o640);
    chmod(&password, 0o640);
    check_config(&agent, 0, &[]);

    let key_s = key.display().to_string();
    for mode in [0o644, 0o604, 0o601, 0o666] {
        chmod(&key, mode);
        let m = format!("mode {mode:04o}");
        let needles = ["mqtt.key", key_s.as_str(), m.as_str(), "chmod 600"];
        check_config(&agent, 2, &needles);
        run_refused(&agent, &needles);
    }
    chmod(&key, 0o600);

    let pw_s = password.display().to_string();
    chmod(&password, 0o644);
    let needles = [
        "mqtt.password_file",
        pw_s.as_str(),
        "mode 0644",
        "chmod 600",
    ];
    check_config(&agent, 2, &needles);
    run_refused(&agent, &needles);
    chmod(&password, 0o600);

    // A config file anyone can write; readable by all is fine (it holds no secret).
    let cfg_s = agent.config_path.display().to_string();
    chmod(&agent.config_path, 0o666);
    let needles = [cfg_s.as_str(), "mode 0666", "chmod 640"];
    check_config(&agent, 2, &needles);
    run_refused(&agent, &needles);
    chmod(&agent.config_path, 0o664);
    check_config(&agent, 0, &[]);
}

#[test]
fn a_reload_with_a_key_readable_by_others_is_refused_and_the_link_stays() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "id-reload");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let agent = Agent::start(tls_agent(&pki, broker.tls_port, ""));
    let online = || agent.status()["connection"]["state"] == "online";
    wait("online", DEADLINE, online);
    let key = pki.client_key.clone();
    chmod(&key, 0o644);
    agent.signal("-HUP");
    wait("the reload refused", DEADLINE, || {
        agent.status()["reload"]["problems"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    });
    let problems = agent.status()["reload"]["problems"].to_string();
    assert!(problems.contains("mqtt.key"), "{problems}");
    assert!(problems.contains("mode 0644"), "{problems}");
    assert!(online(), "still online with the previous config");
    // Fixed: the next reload is accepted.
    chmod(&key, 0o600);
    agent.signal("-HUP");
    wait("the reload accepted", DEADLINE, || {
        agent.status()["reload"]["problems"] == json!([])
    });
    assert!(online());
}

/// The agent behind `port` with the chain client certificate reports a change that reaches
/// the cloud: both chains (broker's and agent's, 5 intermediates each) verified.
fn reports_through_chains(pki: &edgesync_testkit::TestPki, port: u16) {
    let cloud = common::cloud::Cloud::start(
        pki,
        port,
        &format!("edgesync/{}/reported", pki.device_id),
        false,
    );
    let mut opts = tls_agent(pki, port, "");
    opts.mqtt_extra = opts
        .mqtt_extra
        .replace(
            &format!("{:?}", pki.client_cert),
            &format!("{:?}", pki.chain_client_cert),
        )
        .replace(
            &format!("{:?}", pki.client_key),
            &format!("{:?}", pki.chain_client_key),
        );
    let agent = Agent::start(opts);
    let r = agent.request(&common::report_req([("chained", json!(true))]));
    assert_eq!(r["ok"], true, "{r}");
    cloud.wait_change("chained", &json!(true), None);
    assert_eq!(agent.status()["connection"]["state"], "online");
}

#[test]
fn five_intermediates_both_ways_with_rumqttd() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "id-chain-r");
    let broker = RumqttdBroker::start(
        &pki,
        RumqttdOptions {
            server_cert: edgesync_testkit::ServerCert::Chain,
            ..RumqttdOptions::default()
        },
    )
    .unwrap();
    reports_through_chains(&pki, broker.tls_port);
}

#[test]
fn five_intermediates_both_ways_with_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "id-chain-m");
    let Some(broker) = edgesync_testkit::Mosquitto::start(
        &pki,
        edgesync_testkit::MosquittoOptions {
            server_cert: edgesync_testkit::ServerCert::Chain,
            ..edgesync_testkit::MosquittoOptions::default()
        },
    )
    .unwrap() else {
        return; // not installed: the testkit printed a notice
    };
    reports_through_chains(&pki, broker.tls_port);
}
