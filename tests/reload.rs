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

/// A plain TCP relay to the broker that reads the client id of every MQTT CONNECT it
/// passes on, and can cut every connection (to force a reconnect).
struct ConnectTap {
    port: u16,
    client_ids: Arc<std::sync::Mutex<Vec<String>>>,
    open: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl ConnectTap {
    fn start(upstream: std::net::SocketAddr) -> ConnectTap {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client_ids = Arc::new(std::sync::Mutex::new(Vec::new()));
        let open = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (ids, conns) = (Arc::clone(&client_ids), Arc::clone(&open));
        thread::spawn(move || {
            for mut client in listener.incoming().flatten() {
                let Some((packet, id)) = read_connect(&mut client) else {
                    continue;
                };
                let Ok(mut server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                ids.lock().unwrap().push(id);
                if std::io::Write::write_all(&mut server, &packet).is_err() {
                    continue;
                }
                conns.lock().unwrap().push(client.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        ConnectTap {
            port,
            client_ids,
            open,
        }
    }

    fn client_ids(&self) -> Vec<String> {
        self.client_ids.lock().unwrap().clone()
    }

    fn cut(&self) {
        for c in self.open.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Reads an MQTT 3.1.1 CONNECT packet: its bytes and its client id.
fn read_connect(s: &mut std::net::TcpStream) -> Option<(Vec<u8>, String)> {
    use std::io::Read;
    let mut packet = vec![0u8; 1];
    s.read_exact(&mut packet).ok()?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok()?;
        packet.push(b[0]);
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 || shift > 21 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    packet.extend_from_slice(&body);
    // Protocol name (2 + 4), level, flags, keep-alive (2): the client id follows.
    let at = 10;
    let n = usize::from(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]));
    let id = String::from_utf8(body.get(at + 2..at + 2 + n)?.to_vec()).ok()?;
    Some((packet, id))
}

// Issue 15: after a reload with a new device.id the client id followed the new id at once
// (a reconnect right away), while the topics kept the old one until the restart.
#[test]
fn a_new_device_id_changes_client_id_and_topics_together_at_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "reload-id");
    let broker = RumqttdBroker::start(
        &pki,
        RumqttdOptions {
            plain_tcp: true,
            ..RumqttdOptions::default()
        },
    )
    .unwrap();
    let cloud = Cloud::start(&pki, broker.tls_port, "edgesync/+/status", false);
    let tap = ConnectTap::start(broker.tcp_addr().unwrap());
    let online_on = |device: &str| {
        cloud
            .messages()
            .iter()
            .filter(|m| m.topic == format!("edgesync/{device}/status"))
            .filter(|m| common::cloud::decode(&m.payload)["state"] == "online")
            .count()
    };
    let mut agent = Agent::start(common::AgentOptions {
        device_id: "reload-id".into(),
        mqtt_url: format!("mqtt://127.0.0.1:{}", tap.port),
        mqtt_extra: "allow_plaintext = true\nkeep_alive = \"5s\"\n\
                     reconnect_initial = \"100ms\"\nreconnect_max = \"500ms\"\n"
            .into(),
        ..common::AgentOptions::default()
    });
    wait("online", DEADLINE, || online_on("reload-id") == 1);
    assert_eq!(tap.client_ids(), ["reload-id"]);

    let base = std::fs::read_to_string(&agent.config_path).unwrap();
    let renamed = base.replace("id = \"reload-id\"", "id = \"reload-id-2\"");
    assert_ne!(renamed, base);
    reload_with(&agent, &renamed, "");
    wait("reload recorded", DEADLINE, || {
        agent.status()["reload"]["needs_restart"] == json!(["device.id"])
    });
    // A reconnect after the reload: the old client id, the old topics.
    let reconnects = agent.status()["counters"]["reconnects"].as_u64().unwrap();
    tap.cut();
    wait("reconnected", DEADLINE, || {
        agent.status()["counters"]["reconnects"].as_u64().unwrap() > reconnects && online(&agent)
    });
    wait("online again on the old topic", DEADLINE, || {
        online_on("reload-id") == 2
    });
    let ids = tap.client_ids();
    assert!(ids.iter().all(|id| id == "reload-id"), "{ids:?}");
    assert_eq!(online_on("reload-id-2"), 0);

    // The restart applies both.
    agent.stop();
    agent.restart();
    wait("online on the new topic", DEADLINE, || {
        online_on("reload-id-2") == 1
    });
    assert_eq!(tap.client_ids().last().unwrap(), "reload-id-2");
    assert_eq!(agent.status()["agent"]["device"], "reload-id-2");
}
