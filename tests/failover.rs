//! Broker failover (`mqtt.urls`, issue 20) with the real binary and two Mosquitto brokers
//! sharing one PKI: the first dies mid-traffic, the agent moves to the second and the outbox
//! resends from its oldest unacknowledged change; nothing is lost.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use common::Agent;
use common::cloud::{Cloud, DEADLINE, pki, tls_agent, wait};
use edgesync_testkit::{FaultProxy, Mosquitto, MosquittoOptions};
use serde_json::{Value, json};

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
    let mut want = BTreeSet::new();
    for i in 0..20u64 {
        let changes: Vec<Value> = (0..1000u64)
            .map(|j| json!({"key": format!("k{}", j % 50), "value": {"n": i * 1000 + j, "pad": "x".repeat(40)}}))
            .collect();
        let r = agent.request(&json!({"op": "report", "changes": changes}));
        assert_eq!(r["ok"], true, "{r}");
        want.extend(r["first_seq"].as_u64().unwrap()..=r["last_seq"].as_u64().unwrap());
    }
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
