//! Live reload: SIGHUP and the `reload` command with valid and invalid configs, and
//! certificate rotation under traffic with nothing lost and nothing sent twice.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::Agent;
use common::cloud::{Cloud, pki, tls_agent, wait};
use edgesync_testkit::{FaultProxy, RumqttdBroker, RumqttdOptions};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

fn online(agent: &Agent) -> bool {
    agent.status()["connection"]["state"] == "online"
}

/// Rewrites the agent's config with `extra` appended and sends SIGHUP.
fn reload_with(agent: &Agent, base: &str, extra: &str) {
    std::fs::write(&agent.config_path, format!("{base}\n{extra}")).unwrap();
    agent.signal("-HUP");
}

#[test]
fn sighup_applies_a_valid_config_and_keeps_the_old_one_when_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "reload-rules");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let cloud = Cloud::start(&pki, broker.tls_port, "edgesync/reload-rules/#", false);
    let agent = Agent::start(tls_agent(&pki, broker.tls_port, ""));
    wait("online", DEADLINE, || online(&agent));
    let base = std::fs::read_to_string(&agent.config_path).unwrap();

    // No rule yet: 99 is accepted.
    let topic = "edgesync/reload-rules/desired";
    // Repeated until answered: "online" comes before the agent's subscription; a repeat
    // of version 1 is answered "duplicate".
    cloud.publish_until(
        topic,
        json!({"version": 1, "state": {"setpoint": 99}})
            .to_string()
            .as_bytes(),
        "result of version 1",
        |m| {
            let v = common::cloud::decode(&m.payload);
            (m.topic.ends_with("/desired/result") && v["version"] == 1).then_some(v)
        },
    );
    cloud.wait_result(1, "applied");

    // A rule arrives by reload: the next document is checked against it.
    let rule = "[[desired.rule]]\nkeys = \"setpoint\"\ntype = \"number\"\nmax = 30\n";
    reload_with(&agent, &base, rule);
    wait("reload recorded", DEADLINE, || {
        agent.status()["reload"]["at"].as_u64().is_some()
    });
    assert_eq!(agent.status()["reload"]["problems"], json!([]));
    cloud.publish(
        topic,
        json!({"version": 2, "state": {"setpoint": 99, "x": 1}}).to_string(),
        false,
    );
    let (_, result) = cloud.wait_result(2, "partial");
    assert_eq!(result["keys"]["setpoint"]["status"], "rejected");

    // An invalid file changes nothing: the rule stays, the problem is shown.
    reload_with(
        &agent,
        &base,
        &format!("{rule}\n[sync]\nbatch_max_changes = \"lots\"\n"),
    );
    wait("problems shown", DEADLINE, || {
        agent.status()["reload"]["problems"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    });
    let problems = agent.status()["reload"]["problems"].to_string();
    assert!(problems.contains("sync.batch_max_changes"), "{problems}");
    let human = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).into_owned();
    assert!(human.contains("reload refused"), "{human}");
    cloud.publish(
        topic,
        json!({"version": 3, "state": {"setpoint": 50}}).to_string(),
        false,
    );
    let (_, result) = cloud.wait_result(3, "rejected");
    assert_eq!(
        result["keys"]["setpoint"]["status"], "rejected",
        "old rule still on"
    );
    assert!(agent.log().contains("reload refused"), "{}", agent.log());
    assert!(
        online(&agent),
        "a reload without link changes keeps the connection"
    );
}

#[test]
fn settings_that_need_a_restart_keep_their_running_values() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "reload-restart");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let agent = Agent::start(tls_agent(&pki, broker.tls_port, ""));
    wait("online", DEADLINE, || online(&agent));
    let base = std::fs::read_to_string(&agent.config_path).unwrap();
    let changed = base.replace("id = \"reload-restart\"", "id = \"someone-else\"");
    assert_ne!(changed, base);
    reload_with(&agent, &changed, "");
    wait("reload recorded", DEADLINE, || {
        agent.status()["reload"]["needs_restart"] == json!(["device.id"])
    });
    assert_eq!(agent.status()["agent"]["device"], "reload-restart");
}

#[test]
fn certificate_rotation_under_traffic_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "reload-rotate");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let proxy = FaultProxy::start(broker.tls_addr()).unwrap();
    let cloud = Cloud::start(
        &pki,
        broker.tls_port,
        "edgesync/reload-rotate/reported",
        false,
    );
    // The agent's certificate and key live at fixed paths that get replaced.
    let cert = dir.path().join("device.pem");
    let key = dir.path().join("device.key");
    std::fs::copy(&pki.client_cert, &cert).unwrap();
    std::fs::copy(&pki.client_key, &key).unwrap();
    let mut opts = tls_agent(&pki, proxy.port(), "");
    opts.mqtt_extra = opts
        .mqtt_extra
        .replace(&format!("{:?}", pki.client_cert), &format!("{cert:?}"))
        .replace(&format!("{:?}", pki.client_key), &format!("{key:?}"));
    let agent = Arc::new(Agent::start(opts));
    wait("online", DEADLINE, || online(&agent));
    let connections_before = proxy.connections_accepted();

    // Traffic: a steady stream of reports while the certificate changes.
    let running = Arc::new(AtomicBool::new(true));
    let reporter = {
        let (agent, running) = (Arc::clone(&agent), Arc::clone(&running));
        thread::spawn(move || {
            let mut seqs = Vec::new();
            let mut i = 0u64;
            while running.load(Ordering::SeqCst) {
                let changes: Vec<Value> = (0..20)
                    .map(|j| json!({"key": format!("k{}", j % 5), "value": i * 20 + j}))
                    .collect();
                let r = agent.request(&json!({"op": "report", "changes": changes}));
                assert_eq!(r["ok"], true, "{r}");
                seqs.extend(r["first_seq"].as_u64().unwrap()..=r["last_seq"].as_u64().unwrap());
                i += 1;
            }
            seqs
        })
    };
    wait("traffic flowing", DEADLINE, || cloud.seqs().len() > 200);
    let (new_cert, new_key) = pki.issue_client("rotated", "reload-rotate").unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    agent.signal("-HUP");
    wait("reconnected with the new certificate", DEADLINE, || {
        proxy.connections_accepted() > connections_before && online(&agent)
    });
    let seen = cloud.seqs().len();
    wait("traffic after the rotation", DEADLINE, || {
        cloud.seqs().len() > seen + 200
    });
    running.store(false, Ordering::SeqCst);
    let reported = reporter.join().unwrap();

    let want: std::collections::BTreeSet<u64> = reported.iter().copied().collect();
    cloud.wait_for_seqs(&want, DEADLINE);
    wait("queue drained", DEADLINE, || agent.depth() == 0);
    // Every change exactly once: the in-flight batches were finished before reconnecting.
    let mut count: BTreeMap<u64, u32> = BTreeMap::new();
    for c in cloud.changes() {
        *count.entry(c["seq"].as_u64().unwrap()).or_default() += 1;
    }
    let dups: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "sent twice: {dups:?}");
    let s = agent.status();
    assert_eq!(s["counters"]["resent"], 0, "{s}");
    assert!(
        agent
            .log()
            .contains("reconnecting with the reloaded link settings")
    );
}

#[test]
fn the_reload_command_reloads_too() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "reload-cmd");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let cloud = Cloud::start(
        &pki,
        broker.tls_port,
        "edgesync/reload-cmd/cmd/+/result",
        false,
    );
    let agent = Agent::start(tls_agent(&pki, broker.tls_port, ""));
    wait("online", DEADLINE, || online(&agent));
    let base = std::fs::read_to_string(&agent.config_path).unwrap();
    std::fs::write(
        &agent.config_path,
        format!("{base}\n[log]\nlevel = \"debug\"\n"),
    )
    .unwrap();
    // Repeated until answered: "online" comes before the agent's subscription.
    let answer = cloud.publish_until(
        "edgesync/reload-cmd/cmd/reload",
        json!({"id": "r1"}).to_string().as_bytes(),
        "reload answer",
        |m| {
            m.topic
                .ends_with("/cmd/reload/result")
                .then(|| common::cloud::decode(&m.payload))
        },
    );
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["result"]["reloaded"], true);
    std::fs::write(&agent.config_path, format!("{base}\n[log]\nlevel = 7\n")).unwrap();
    cloud.publish(
        "edgesync/reload-cmd/cmd/reload",
        json!({"id": "r2"}).to_string(),
        false,
    );
    let answer = cloud.wait_for("failed reload answer", |m| {
        let v = common::cloud::decode(&m.payload);
        (m.topic.ends_with("/cmd/reload/result") && v["id"] == "r2").then_some(v)
    });
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["error"]["code"], "failed");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("log.level")
    );
}
