//! Broker failover (`mqtt.urls`, issue 20) with the real binary: two Mosquitto brokers
//! sharing one PKI, and the test kit's clustered broker (Aedes nodes on one Redis) whose
//! second node either shares the agent's session or has none. The first broker or node dies
//! mid-traffic, the agent moves to the next and the outbox resends from its oldest
//! unacknowledged change; nothing is lost, and desired documents and commands reach the
//! agent on the new node.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::Agent;
use common::cloud::{Cloud, DEADLINE, decode, pki, tls_agent, wait};
use edgesync_testkit::{Cluster, FaultProxy, Mosquitto, MosquittoOptions, Sharing};
use serde_json::{Value, json};

/// Reports `batches` requests of 1,000 changes (50 keys, ~60-byte values); the seqs the
/// agent acknowledged.
fn report_batches(agent: &Agent, batches: u64) -> BTreeSet<u64> {
    let mut want = BTreeSet::new();
    for i in 0..batches {
        let changes: Vec<Value> = (0..1000u64)
            .map(|j| json!({"key": format!("k{}", j % 50), "value": {"n": i * 1000 + j, "pad": "x".repeat(40)}}))
            .collect();
        let r = agent.request(&json!({"op": "report", "changes": changes}));
        assert_eq!(r["ok"], true, "{r}");
        want.extend(r["first_seq"].as_u64().unwrap()..=r["last_seq"].as_u64().unwrap());
    }
    want
}

#[test]
fn killing_the_first_broker_mid_traffic_moves_to_the_second_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let device = "failover-1";
    let pki = pki(dir.path(), device);
    let Some(mut first) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    let Some(second) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    // The proxy slows the first link so the kill lands mid-drain.
    let proxy = FaultProxy::start(first.tls_addr()).unwrap();
    let topic = format!("edgesync/{device}/reported");
    let cloud_a = Cloud::start(&pki, first.tls_port, &topic, false);
    let cloud_b = Cloud::start(&pki, second.tls_port, &topic, false);
    let mut opts = tls_agent(&pki, proxy.port(), "");
    opts.mqtt_url = format!(
        "[\"mqtts://localhost:{}\", \"mqtts://localhost:{}\"]",
        proxy.port(),
        second.tls_port
    );
    proxy.bandwidth(300_000);
    let agent = Agent::start(opts);
    let want = report_batches(&agent, 20);
    let s = agent.status();
    assert_eq!(s["connection"]["url_index"], 0, "{s}");
    wait("traffic on the first broker", DEADLINE, || {
        cloud_a.seqs().len() > 1000
    });
    // Freeze the link, then make sure the first broker delivered every change it
    // acknowledged (the agent's responsibility ends at the PUBACK), then kill it.
    proxy.blackhole();
    let s = agent.status();
    let queued_from =
        s["queue"]["next_seq"].as_u64().unwrap() - s["queue"]["depth"].as_u64().unwrap();
    let acked: BTreeSet<u64> = want.iter().copied().filter(|&q| q < queued_from).collect();
    assert!(acked.len() < want.len(), "the kill comes mid-traffic: {s}");
    cloud_a.wait_for_seqs(&acked, DEADLINE);
    first.stop().unwrap();
    proxy.restore();
    proxy.bandwidth(0);

    wait("the agent on the second broker", DEADLINE, || {
        agent.status()["connection"]["url_index"] == 1 && agent.depth() == 0
    });
    let s = agent.status();
    assert_eq!(
        s["connection"]["url"],
        format!("mqtts://localhost:{}", second.tls_port),
        "{s}"
    );
    assert_eq!(s["connection"]["state"], "online", "{s}");
    let mut got = cloud_a.seqs();
    got.extend(cloud_b.seqs());
    let lost: Vec<u64> = want.difference(&got).copied().take(10).collect();
    assert!(lost.is_empty(), "lost {lost:?}…: {s}");
    // The second broker got what was left, from the oldest unacknowledged change on.
    let b = cloud_b.seqs();
    assert!(b.iter().next().is_some_and(|&q| q <= queued_from), "{b:?}");
}

/// SIGKILLs node 0 of a two-node cluster mid-traffic (a [`FaultProxy`] in front of it slows
/// the drain), with node 1 sharing sessions or not. The agent moves to node 1, where a back
/// end gets every reported change (resent from the oldest unacknowledged one: node 0's
/// PUBACK came only after it had routed the change through Redis, so acknowledged changes
/// reach node 1 too), and where a desired document and a command reach the agent: it
/// subscribes again after every CONNACK, session or not.
fn cluster_node_dies_mid_traffic(device: &str, node1: Sharing) {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), device);
    let Some(mut cluster) = Cluster::start(&pki, &[Sharing::Redis, node1]).unwrap() else {
        return;
    };
    let proxy = FaultProxy::start(cluster.addr(0)).unwrap();
    let cloud = Cloud::start(
        &pki,
        cluster.addr(1).port(),
        &format!("edgesync/{device}/#"),
        false,
    );
    let mut opts = tls_agent(&pki, proxy.port(), "");
    opts.mqtt_url = format!(
        "[\"mqtts://127.0.0.1:{}\", \"{}\"]",
        proxy.port(),
        cluster.url(1)
    );
    // About 7 s for the whole backlog through the proxy: the kill lands mid-drain.
    proxy.bandwidth(100_000);
    let agent = Agent::start(opts);
    let want = report_batches(&agent, 10);
    let total = want.len() as u64;
    wait("node 0 acknowledging the first batches", DEADLINE, || {
        agent.depth() <= total - 1000
    });
    let s = agent.status();
    assert_eq!(s["connection"]["url_index"], 0, "{s}");
    assert!(
        s["queue"]["depth"].as_u64().unwrap() > 0,
        "mid-traffic: {s}"
    );
    // Aedes sends a QoS 1 PUBACK before it passes the message on (aedes
    // lib/handlers/publish.js): a node killed at any moment may lose what it acknowledged
    // last, the broker's loss. Freeze the link, wait until every change the agent saw
    // acknowledged reached the back end, then kill the node and reset its connections.
    proxy.blackhole();
    let s = agent.status();
    let queued_from =
        s["queue"]["next_seq"].as_u64().unwrap() - s["queue"]["depth"].as_u64().unwrap();
    let acked: BTreeSet<u64> = want.iter().copied().filter(|&q| q < queued_from).collect();
    cloud.wait_for_seqs(&acked, DEADLINE);
    cluster.kill(0).unwrap();
    proxy.reset_all();
    proxy.restore();

    let deadline = Instant::now() + DEADLINE * 2;
    loop {
        let s = agent.status();
        if s["connection"]["url_index"] == 1
            && s["connection"]["state"] == "online"
            && s["queue"]["depth"] == 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent is not on node 1 and drained: {s}\nagent log:\n{}\nnode 1 log:\n{}",
            agent.log(),
            cluster.log(1)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = agent.status();
    assert_eq!(s["connection"]["url"], cluster.url(1), "{s}");
    cloud.wait_for_seqs(&want, DEADLINE);

    // The agent's log: the session node 1 had for it, and the backlog it resent there.
    let log = agent.log();
    let on_node1 = format!("connected to {} (session present: ", cluster.url(1));
    let at = log
        .find(&on_node1)
        .unwrap_or_else(|| panic!("no connection to node 1 in the log:\n{log}"));
    let after = &log[at + on_node1.len()..];
    let shared = after.starts_with("true");
    assert_eq!(shared, node1 == Sharing::Redis, "{log}");
    // The first connection to node 1 found changes unacknowledged (the kill came
    // mid-traffic) and sent them again from the oldest: a batch starting there arrived.
    let line = after.lines().find(|l| l.contains("draining the backlog: "));
    let queued: u64 = line
        .and_then(|l| l.split("draining the backlog: ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no backlog resent on node 1:\n{log}"));
    let oldest = want.last().unwrap() + 1 - queued;
    let firsts: BTreeSet<u64> = cloud
        .batches()
        .iter()
        .filter_map(|b| b["changes"][0]["seq"].as_u64())
        .collect();
    assert!(
        firsts.contains(&oldest),
        "no batch from seq {oldest}: {firsts:?}"
    );

    // Desired state and commands on the new node (published again until answered: the
    // subscription follows the CONNACK).
    let desired = format!("edgesync/{device}/desired");
    let doc = json!({"version": 1, "state": {"fan": "on"}}).to_string();
    cloud.publish_until(
        &desired,
        doc.as_bytes(),
        "the desired document applied",
        |m| {
            (m.topic.ends_with("/desired/result")
                && decode(&m.payload)["version"] == 1
                && decode(&m.payload)["status"] == "applied")
                .then_some(())
        },
    );
    cloud.wait_change("fan", &json!("on"), Some("cloud"));
    let ping = format!("edgesync/{device}/cmd/ping");
    let answer = cloud.publish_until(
        &ping,
        json!({"id": "after-failover"}).to_string().as_bytes(),
        "the ping answered",
        |m| {
            m.topic
                .ends_with("/cmd/ping/result")
                .then(|| decode(&m.payload))
                .filter(|v| v["id"] == "after-failover")
        },
    );
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["result"]["pong"], true, "{answer}");
    let s = agent.status();
    assert_eq!(s["connection"]["url_index"], 1, "{s}");
}

#[test]
fn cluster_node_death_moves_to_a_node_sharing_the_session_and_loses_nothing() {
    cluster_node_dies_mid_traffic("failover-shared", Sharing::Redis);
}

#[test]
fn cluster_node_death_moves_to_a_node_without_the_session_and_loses_nothing() {
    cluster_node_dies_mid_traffic("failover-unshared", Sharing::None);
}
