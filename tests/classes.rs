//! Retention classes end to end (issue 19): the real binary, a real Mosquitto as the cloud
//! behind the fault proxy. The link is cut so the store fills; what a full store evicts
//! (expired first, then superseded values, never a class's latest values while superseded
//! ones remain), the seq order on the wire, the drops per class in status; deadband and
//! dedupe at the socket.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use common::cloud::{Cloud, DEADLINE, pki, tls_agent, wait};
use common::{Agent, AgentOptions};
use edgesync_testkit::{FaultProxy, Mosquitto, MosquittoOptions};
use serde_json::{Value, json};

const CLASSES: &str = "[[store.class]]\nname = \"lo\"\nkeys = \"lo.*\"\npriority = 10\n\
    ttl = \"1h\"\n\
    [[store.class]]\nname = \"temps\"\nkeys = \"t.*\"\ndeadband = 0.5\ndedupe = true\n\
    max_interval = \"1h\"\n";

fn agent_options(pki: &edgesync_testkit::TestPki, port: u16) -> AgentOptions {
    let mut o = tls_agent(pki, port, "")
        .max_bytes("1MiB")
        .when_full("drop-oldest");
    o.extra_toml = CLASSES.into();
    o
}

fn class<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn a_full_store_evicts_expired_then_superseded_and_sends_the_rest_in_seq_order() {
    let dir = tempfile::tempdir().unwrap();
    let device = "classes-evict";
    let pki = pki(dir.path(), device);
    let Some(mosq) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    let proxy = FaultProxy::start(mosq.tls_addr()).unwrap();
    let cloud = Cloud::start(
        &pki,
        mosq.tls_port,
        &format!("edgesync/{device}/reported"),
        true,
    );
    proxy.cut();
    let mut o = agent_options(&pki, proxy.port());
    o.device_id = device.into();
    let agent = Agent::start(o);

    // Deadband and dedupe, said in the answer.
    let r = agent.request(&json!({"op": "report", "changes": [
        {"key": "t.1", "value": 20.0}, {"key": "t.1", "value": 20.2},
        {"key": "t.2", "value": "on"}, {"key": "t.2", "value": "on"}]}));
    assert_eq!(
        (r["ok"].clone(), r["filtered"].clone()),
        (json!(true), json!(2)),
        "{r}"
    );
    assert_eq!(
        r["last_seq"].as_u64().unwrap() - r["first_seq"].as_u64().unwrap(),
        1
    );
    let r = agent.request(&json!({"op": "report", "changes": [{"key": "t.1", "value": 20.4}]}));
    assert_eq!(r["filtered"], 1, "{r}");
    assert!(r["first_seq"].as_u64() > r["last_seq"].as_u64());
    let cli = agent.cli(&["report", "t.1=20.1"]);
    let out = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success() && out.contains("1 filtered"), "{out}");

    // An expired change and a class's latest values, then a flood of 100 keys cycled.
    let old = now_ms() - 2 * 3_600_000;
    let r = agent.request(&json!({"op": "report", "changes": [
        {"key": "lo.old", "value": "x".repeat(1000), "ts": old},
        {"key": "lo.a", "value": "kept"}]}));
    assert_eq!(r["ok"], true, "{r}");
    let mut latest = BTreeMap::new();
    for round in 0..6 {
        for chunk in 0..10 {
            let changes: Vec<Value> = (0..10)
                .map(|i| {
                    let key = format!("f{}", chunk * 10 + i);
                    let value = format!("{round}-{}", "y".repeat(2500));
                    latest.insert(key.clone(), value.clone());
                    json!({"key": key, "value": value})
                })
                .collect();
            let r = agent.request(&json!({"op": "report", "changes": changes}));
            assert_eq!(r["ok"], true, "{r}");
        }
    }
    let s = agent.status();
    assert!(s["counters"]["dropped"].as_u64().unwrap() > 0, "{s:#}");
    let lo = class(&s, "lo");
    assert_eq!(
        (lo["expired"].clone(), lo["oldest"].clone()),
        (json!(1), json!(0)),
        "{s:#}"
    );
    let d = class(&s, "default");
    assert!(d["superseded"].as_u64().unwrap() > 0);
    assert_eq!(
        d["oldest"], 0,
        "no latest value goes while superseded ones remain"
    );
    let dropped: u64 = s["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            ["expired", "superseded", "oldest"]
                .iter()
                .map(|r| c[r].as_u64().unwrap())
                .sum::<u64>()
        })
        .sum();
    assert_eq!(s["counters"]["dropped"].as_u64().unwrap(), dropped);
    assert_eq!(class(&s, "temps")["deadband"], 3);
    assert_eq!(class(&s, "temps")["dedupe"], 1);
    let metrics = &s["metrics"]["classes"];
    assert_eq!(metrics, &s["classes"]);

    // Back online: what is left arrives in seq order; the expired change never does, every
    // key's latest value does.
    proxy.restore();
    wait("drained", DEADLINE, || agent.depth() == 0);
    let next = agent.status()["queue"]["next_seq"].as_u64().unwrap();
    wait("all acked arrive", DEADLINE, || {
        cloud.changes().last().and_then(|c| c["seq"].as_u64()) == Some(next - 1)
    });
    let changes = cloud.changes();
    let seqs: Vec<u64> = changes.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seq order on the wire"
    );
    let mut got: BTreeMap<String, Value> = BTreeMap::new();
    for c in &changes {
        got.insert(c["key"].as_str().unwrap().into(), c["value"].clone());
    }
    assert!(
        !got.contains_key("lo.old"),
        "the expired change was evicted"
    );
    assert_eq!(got["lo.a"], "kept");
    assert_eq!(got["t.1"], 20.0);
    for (k, v) in &latest {
        assert_eq!(got[k], json!(v), "{k}: the latest value arrives");
    }
}
