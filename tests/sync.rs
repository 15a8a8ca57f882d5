//! Sync over TLS MQTT against real brokers: the real binary, rumqttd in-process (default)
//! and Mosquitto (interop, broker restarts). A "cloud" subscriber records every batch.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::thread;
use std::time::{Duration, Instant};

use common::cloud::{Cloud, DEADLINE, pki, tls_agent, wait};
use common::{Agent, AgentOptions};
use edgesync_testkit::{
    FaultProxy, Mosquitto, MosquittoOptions, RumqttdBroker, RumqttdOptions, ServerCert, TestPki,
};
use serde_json::{Value, json};

/// Reports `n` changes in requests of `per` on one connection; returns their seqs.
fn report_many(agent: &Agent, n: u64, per: u64) -> BTreeSet<u64> {
    let mut seqs = BTreeSet::new();
    let mut i = 0;
    while i < n {
        let k = per.min(n - i);
        let changes: Vec<Value> = (i..i + k)
            .map(|j| json!({"key": format!("k{}", j % 50), "value": {"n": j, "pad": "x".repeat(40)}}))
            .collect();
        let r = agent.request(&json!({"op": "report", "changes": changes}));
        assert_eq!(r["ok"], true, "{r}");
        seqs.extend(r["first_seq"].as_u64().unwrap()..=r["last_seq"].as_u64().unwrap());
        i += k;
    }
    seqs
}

/// Waits until the agent's queue is empty; on timeout shows its status.
fn wait_drained(agent: &Agent) {
    let deadline = Instant::now() + DEADLINE;
    while agent.depth() != 0 {
        assert!(
            Instant::now() < deadline,
            "queue not drained: {:#}",
            agent.status()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn online(agent: &Agent) -> bool {
    agent.status()["connection"]["state"] == "online"
}

/// Every batch's changes ascend; the union is what was reported, each with its value.
fn assert_batches_well_formed(batches: &[Value], device: &str) {
    for b in batches {
        assert_eq!(b["device"], device);
        let seqs: Vec<u64> = b["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["seq"].as_u64().unwrap())
            .collect();
        assert!(!seqs.is_empty());
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "batch not ascending: {seqs:?}"
        );
    }
}

#[test]
fn changes_arrive_in_order_with_seq_key_value_and_ts() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "sync-order");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let cloud = Cloud::start(&pki, broker.tls_port, "edgesync/sync-order/#", false);
    let agent = Agent::start(tls_agent(&pki, broker.tls_port, ""));
    wait("online", DEADLINE, || online(&agent));

    let out = agent.cli(&["report", "temp=21.5", "mode=eco"]);
    assert!(out.status.success());
    let seqs = report_many(&agent, 300, 7);
    let mut want: BTreeSet<u64> = seqs.clone();
    want.extend([1, 2]);
    cloud.wait_for_seqs(&want, DEADLINE);

    let batches = cloud.batches();
    assert_batches_well_formed(&batches, "sync-order");
    let all: Vec<Value> = batches
        .iter()
        .flat_map(|b| b["changes"].as_array().cloned().unwrap())
        .collect();
    let order: Vec<u64> = all.iter().map(|c| c["seq"].as_u64().unwrap()).collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "no resends, all in order"
    );
    assert_eq!(all[0]["key"], "temp");
    assert_eq!(all[0]["value"], 21.5);
    assert_eq!(all[1]["value"], "eco");
    assert!(all[0]["ts"].as_u64().unwrap() > 1_700_000_000_000);
    assert_eq!(all[2]["value"]["n"], 0);

    wait("queue drained", DEADLINE, || agent.depth() == 0);
    let s = agent.status();
    assert_eq!(s["counters"]["sent"], 302);
    assert_eq!(s["counters"]["acked"], 302);
    assert_eq!(s["counters"]["resent"], 0);
    assert!(s["connection"]["last_sync"].as_u64().is_some());
    assert_eq!(s["connection"]["last_error"], Value::Null);
}

#[test]
fn offline_backlog_drains_completely_after_the_link_returns() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "sync-backlog");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let proxy = FaultProxy::start(broker.tls_addr()).unwrap();
    let cloud = Cloud::start(
        &pki,
        broker.tls_port,
        "edgesync/sync-backlog/reported",
        false,
    );
    proxy.cut();
    let agent = Agent::start(tls_agent(&pki, proxy.port(), ""));
    let want = report_many(&agent, 20_000, 500);
    let s = agent.status();
    assert_ne!(s["connection"]["state"], "online");
    assert_eq!(s["queue"]["depth"], 20_000);
    assert!(s["queue"]["oldest_ts"].as_u64().is_some());
    assert!(cloud.seqs().is_empty());

    proxy.restore();
    wait_drained(&agent);
    cloud.wait_for_seqs(&want, DEADLINE);
    let batches = cloud.batches();
    assert_batches_well_formed(&batches, "sync-backlog");
    assert!(
        batches.len() < 200,
        "a backlog goes in large batches, not {} small ones",
        batches.len()
    );
}

#[test]
fn agent_killed_mid_drain_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "sync-kill");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let proxy = FaultProxy::start(broker.tls_addr()).unwrap();
    let cloud = Cloud::start(&pki, broker.tls_port, "edgesync/sync-kill/reported", false);
    proxy.cut();
    let mut agent = Agent::start(tls_agent(&pki, proxy.port(), ""));
    let want = report_many(&agent, 50_000, 1000);
    // A slow link keeps the drain going for seconds (about 3.5 MB at 500 kB/s), so the kill
    // lands mid-drain even when a loaded machine polls the cloud late.
    proxy.bandwidth(500_000);
    proxy.restore();
    // Kill it while the drain is under way.
    wait("drain started", DEADLINE, || !cloud.seqs().is_empty());
    agent.kill9();
    let before = cloud.seqs().len();
    assert!(
        before < want.len(),
        "the drain was not finished when killed"
    );
    proxy.bandwidth(0);
    agent.restart();
    cloud.wait_for_seqs(&want, DEADLINE);
    wait("queue drained", DEADLINE, || agent.depth() == 0);
    assert_batches_well_formed(&cloud.batches(), "sync-kill");
}

#[test]
fn broker_restarts_mid_drain_lose_nothing_with_and_without_persistence() {
    for persistence in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let device = format!("sync-restart-{persistence}");
        let pki = pki(dir.path(), &device);
        let Some(mut mosq) = Mosquitto::start(
            &pki,
            MosquittoOptions {
                persistence,
                ..MosquittoOptions::default()
            },
        )
        .unwrap() else {
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
        let agent = Agent::start(tls_agent(&pki, proxy.port(), ""));
        let want = report_many(&agent, 30_000, 1000);
        // A slow link keeps the drain going while the broker restarts under it.
        proxy.bandwidth(400_000);
        proxy.restore();
        for _ in 0..3 {
            let seen = cloud.seqs().len();
            wait("drain progress", DEADLINE, || {
                cloud.seqs().len() > seen || agent.depth() == 0
            });
            // Hold the agent back while the broker restarts, until the cloud is subscribed
            // again (without persistence its session is gone).
            proxy.cut();
            let ready = cloud.ready_count();
            mosq.restart().unwrap();
            wait("cloud subscribed again", DEADLINE, || {
                cloud.ready_count() > ready
            });
            proxy.restore();
        }
        assert!(agent.depth() > 0, "the restarts happened mid-drain");
        proxy.bandwidth(0);
        cloud.wait_for_seqs(&want, Duration::from_secs(120));
        wait_drained(&agent);
        assert_batches_well_formed(&cloud.batches(), &device);
        let s = agent.status();
        assert!(s["counters"]["reconnects"].as_u64().unwrap() >= 3, "{s}");
        assert!(s["counters"]["resent"].as_u64().unwrap() > 0, "{s}");
    }
}

#[test]
fn retained_status_is_online_then_offline_on_stop_and_by_last_will_after_kill() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "sync-status");
    let Some(mosq) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    let mut agent = Agent::start(tls_agent(&pki, mosq.tls_port, ""));
    wait("online", DEADLINE, || online(&agent));
    // A subscriber arriving later sees the retained "online".
    let cloud = Cloud::start(&pki, mosq.tls_port, "edgesync/sync-status/status", false);
    wait("retained online", DEADLINE, || {
        cloud
            .statuses()
            .iter()
            .any(|(v, retained)| v["state"] == "online" && *retained)
    });
    let (online_doc, _) = cloud.statuses()[0].clone();
    assert!(
        online_doc["agent"]
            .as_str()
            .unwrap()
            .starts_with("edgesync ")
    );
    assert!(online_doc["since"].as_u64().is_some());

    agent.stop();
    wait("offline on clean stop", DEADLINE, || {
        cloud
            .statuses()
            .last()
            .is_some_and(|(v, _)| v["state"] == "offline")
    });
    agent.restart();
    wait("online again", DEADLINE, || {
        cloud
            .statuses()
            .last()
            .is_some_and(|(v, _)| v["state"] == "online")
    });
    agent.kill9();
    // The broker publishes the last will once it sees the connection die.
    wait("last will", DEADLINE, || {
        cloud
            .statuses()
            .last()
            .is_some_and(|(v, _)| v["state"] == "offline")
    });
    let late = Cloud::start(&pki, mosq.tls_port, "edgesync/sync-status/status", false);
    wait("retained offline", DEADLINE, || {
        late.statuses()
            .iter()
            .any(|(v, retained)| v["state"] == "offline" && *retained)
    });
}

/// `mqtt.retain = false` (brokers that refuse retained messages, e.g. Azure Event Grid's MQTT
/// broker): the presence and its will go out, none of them retained.
#[test]
fn with_retain_off_the_presence_and_the_will_are_not_retained() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "sync-noretain");
    let Some(mosq) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    let topic = "edgesync/sync-noretain/status";
    let cloud = Cloud::start(&pki, mosq.tls_port, topic, false);
    let mut agent = Agent::start(tls_agent(&pki, mosq.tls_port, "retain = false"));
    wait("online", DEADLINE, || online(&agent));
    wait("online published", DEADLINE, || {
        cloud.statuses().iter().any(|(v, _)| v["state"] == "online")
    });
    agent.kill9();
    wait("last will", DEADLINE, || {
        cloud
            .statuses()
            .last()
            .is_some_and(|(v, _)| v["state"] == "offline")
    });
    // A later subscriber is given nothing retained: the first status it sees is the next
    // live "online".
    let late = Cloud::start(&pki, mosq.tls_port, topic, false);
    agent.restart();
    wait("online again", DEADLINE, || !late.statuses().is_empty());
    let first = late.statuses()[0].clone();
    assert_eq!(first.0["state"], "online", "{first:?}");
    for (v, retained) in cloud.statuses().into_iter().chain(late.statuses()) {
        assert!(!retained, "retained {v}");
    }
}

#[test]
fn mosquitto_interop_mutual_tls_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "sync-mosq");
    let Some(mosq) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    let cloud = Cloud::start(&pki, mosq.tls_port, "edgesync/sync-mosq/reported", false);
    let agent = Agent::start(tls_agent(&pki, mosq.tls_port, ""));
    wait("online", DEADLINE, || online(&agent));
    let want = report_many(&agent, 5000, 100);
    cloud.wait_for_seqs(&want, DEADLINE);
    assert_batches_well_formed(&cloud.batches(), "sync-mosq");
    wait("queue drained", DEADLINE, || agent.depth() == 0);
}

#[test]
fn json_encoding_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "sync-json");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let cloud = Cloud::start(&pki, broker.tls_port, "edgesync/sync-json/reported", false);
    let mut opts = tls_agent(&pki, broker.tls_port, "");
    opts.extra_toml = "[sync]\nencoding = \"json\"\n".into();
    let agent = Agent::start(opts);
    wait("online", DEADLINE, || online(&agent));
    let want = report_many(&agent, 10, 3);
    cloud.wait_for_seqs(&want, DEADLINE);
    let m = cloud.messages();
    assert_eq!(m[0].payload.first(), Some(&b'{'), "JSON payload");
}

/// Numeric sensor changes (floats and integers over 20 keys) reported in requests of 100;
/// returns (seq, key, value) in seq order.
fn report_sensors(agent: &Agent, n: u64) -> Vec<(u64, String, Value)> {
    let mut out = Vec::new();
    for start in (0..n).step_by(100) {
        let changes: Vec<(String, Value)> = (start..(start + 100).min(n))
            .map(|i| {
                let v = if i % 2 == 0 {
                    json!(20.0 + (i % 17) as f64 / 8.0)
                } else {
                    json!(i * 3)
                };
                (format!("plant.pump{}.m{}", i % 10, i % 20), v)
            })
            .collect();
        let req: Vec<Value> = changes
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        let r = agent.request(&json!({"op": "report", "changes": req}));
        assert_eq!(r["ok"], true, "{r}");
        let first = r["first_seq"].as_u64().unwrap();
        out.extend(
            changes
                .into_iter()
                .enumerate()
                .map(|(i, (k, v))| (first + i as u64, k, v)),
        );
    }
    out
}

/// The agent with `sync.compression` and `sync.encoding` against Mosquitto: the cloud gets
/// exactly the changes reported, in order; compressed batches (first bytes `1f 8b`) only
/// with "gzip", and each one `gzip -d` reads to the same document.
fn compressed_batches_reach_the_cloud(device: &str, encoding: &str, compression: &str) {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), device);
    let Some(mosq) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    let topic = format!("edgesync/{device}/reported");
    let cloud = Cloud::start(&pki, mosq.tls_port, &topic, false);
    let mut opts = tls_agent(&pki, mosq.tls_port, "");
    opts.extra_toml =
        format!("[sync]\nencoding = \"{encoding}\"\ncompression = \"{compression}\"\n");
    let agent = Agent::start(opts);
    wait("online", DEADLINE, || online(&agent));
    let reported = report_sensors(&agent, 2000);
    let want: BTreeSet<u64> = reported.iter().map(|r| r.0).collect();
    cloud.wait_for_seqs(&want, DEADLINE);
    wait_drained(&agent);

    let msgs = cloud.messages();
    let zipped: Vec<&Vec<u8>> = msgs
        .iter()
        .map(|m| &m.payload)
        .filter(|p| p.starts_with(&[0x1f, 0x8b]))
        .collect();
    if compression == "none" {
        assert!(zipped.is_empty(), "no compressed batch without compression");
    } else {
        assert!(!zipped.is_empty(), "batches of 100 changes are compressed");
    }
    for m in &msgs {
        let plain = match m.payload.first() {
            Some(0x1f) => common::cloud::gunzip(&m.payload),
            _ => m.payload.clone(),
        };
        let first = plain[0];
        match encoding {
            "json" => assert_eq!(first, b'{'),
            _ => assert!((0xa0..=0xbf).contains(&first), "a CBOR map: {first:#x}"),
        }
    }
    // The real tool of a back end reads every compressed batch (CRC and length checked).
    for (i, p) in zipped.iter().enumerate() {
        let path = dir.path().join(format!("batch-{i}.gz"));
        std::fs::write(&path, p).unwrap();
        let out = std::process::Command::new("gzip")
            .arg("-dc")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gzip -d: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, common::cloud::gunzip(p));
    }
    // Exactly the changes reported, in order (no reconnect here: no resends).
    let got: Vec<(u64, String, Value)> = cloud
        .changes()
        .iter()
        .map(|c| {
            (
                c["seq"].as_u64().unwrap(),
                c["key"].as_str().unwrap().to_owned(),
                c["value"].clone(),
            )
        })
        .collect();
    assert_eq!(got, reported);
}

#[test]
fn gzip_batches_in_cbor_decompress_to_exactly_the_changes_reported() {
    compressed_batches_reach_the_cloud("zip-cbor", "cbor", "gzip");
}

#[test]
fn gzip_batches_in_json_decompress_to_exactly_the_changes_reported() {
    compressed_batches_reach_the_cloud("zip-json", "json", "gzip");
}

#[test]
fn compression_none_sends_batches_as_before() {
    compressed_batches_reach_the_cloud("zip-none", "cbor", "none");
}

/// A TLS failure must leave the agent offline with a precise `last_error`.
fn assert_tls_failure(pki: &TestPki, opts: AgentOptions, port_hint: &str, expect: &[&str]) {
    let agent = Agent::start(opts);
    wait(&format!("last_error for {port_hint}"), DEADLINE, || {
        !agent.status()["connection"]["last_error"].is_null()
    });
    let s = agent.status();
    let err = s["connection"]["last_error"].as_str().unwrap().to_owned();
    assert!(
        expect.iter().any(|e| err.contains(e)),
        "{port_hint}: last_error {err:?} should say one of {expect:?}"
    );
    assert_ne!(s["connection"]["state"], "online");
    let _ = pki;
    // The CLI shows it too.
    let out = agent.cli(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&err));
}

#[test]
fn wrong_ca_is_refused_with_a_precise_error() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "sync-wrongca");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let mut opts = tls_agent(&pki, broker.tls_port, "");
    opts.ca_pem = std::fs::read(&pki.wrong_ca).unwrap();
    assert_tls_failure(&pki, opts, "wrong CA", &["not signed by the configured CA"]);
}

#[test]
fn wrong_server_name_is_refused_with_a_precise_error() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "sync-wrongname");
    let broker = RumqttdBroker::start(
        &pki,
        RumqttdOptions {
            server_cert: ServerCert::WrongName,
            ..RumqttdOptions::default()
        },
    )
    .unwrap();
    let opts = tls_agent(&pki, broker.tls_port, "");
    assert_tls_failure(&pki, opts, "wrong name", &["not valid for host localhost"]);
}

#[test]
fn missing_client_certificate_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "sync-nocert");
    let Some(mosq) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    let mut opts = tls_agent(&pki, mosq.tls_port, "");
    opts.mqtt_extra = "keep_alive = \"5s\"\nreconnect_initial = \"200ms\"\n".into();
    assert_tls_failure(
        &pki,
        opts,
        "no client cert",
        &[
            "requires a client certificate",
            "rejected our client certificate",
        ],
    );
}

#[test]
fn plaintext_is_refused_without_the_flag() {
    let opts = AgentOptions {
        mqtt_url: "mqtt://localhost:1883".into(),
        ..AgentOptions::default()
    };
    let agent = Agent::prepare(opts);
    let out = agent.cli(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("plaintext"), "{err}");
}

#[test]
fn plaintext_with_the_flag_works_and_warns() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "sync-plain");
    let broker = RumqttdBroker::start(
        &pki,
        RumqttdOptions {
            plain_tcp: true,
            ..RumqttdOptions::default()
        },
    )
    .unwrap();
    let cloud = Cloud::start(&pki, broker.tls_port, "edgesync/sync-plain/reported", false);
    let agent = Agent::start(AgentOptions {
        device_id: "sync-plain".into(),
        mqtt_url: format!("mqtt://127.0.0.1:{}", broker.tcp_port.unwrap()),
        mqtt_extra: "allow_plaintext = true\n".into(),
        ..AgentOptions::default()
    });
    // An empty ca.pem is written by the helper; with mqtt:// it must not be set.
    wait("online", DEADLINE, || online(&agent));
    let want = report_many(&agent, 5, 5);
    cloud.wait_for_seqs(&want, DEADLINE);
    assert!(agent.log().contains("WITHOUT TLS"), "{}", agent.log());
}

#[test]
fn a_silent_dead_link_is_detected_within_one_and_a_half_keep_alives() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "sync-dead");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let proxy = FaultProxy::start(broker.tls_addr()).unwrap();
    let agent = Agent::start(tls_agent(&pki, proxy.port(), ""));
    wait("online", DEADLINE, || online(&agent));
    let t0 = Instant::now();
    proxy.blackhole();
    wait("offline", Duration::from_secs(20), || !online(&agent));
    let took = t0.elapsed();
    // keep_alive = 5 s: at most 7.5 s after the last packet heard, plus polling slack.
    assert!(took <= Duration::from_millis(8000), "took {took:?}");
    let err = agent.status()["connection"]["last_error"].clone();
    assert!(
        err.as_str().unwrap().contains("link considered dead"),
        "{err}"
    );
    proxy.restore();
    wait("online again", DEADLINE, || online(&agent));
}

/// Changes reported one by one while a `linger` runs go out together: a change committed
/// behind the buffered one joins its batch instead of ending the wait (regression: each
/// change went alone).
#[test]
fn linger_gathers_changes_reported_one_by_one_into_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "sync-linger");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let cloud = Cloud::start(
        &pki,
        broker.tls_port,
        "edgesync/sync-linger/reported",
        false,
    );
    let mut opts = tls_agent(&pki, broker.tls_port, "");
    // Long enough that five requests on a loaded machine fit in it.
    opts.extra_toml = "[sync]\nlinger = \"5s\"\n".into();
    let agent = Agent::start(opts);
    wait("online", DEADLINE, || online(&agent));
    let mut want = BTreeSet::new();
    for _ in 0..5 {
        want.extend(report_many(&agent, 1, 1));
    }
    cloud.wait_for_seqs(&want, DEADLINE);
    let batches = cloud.batches();
    assert_eq!(batches.len(), 1, "{batches:#?}");
    assert_eq!(batches[0]["changes"].as_array().unwrap().len(), 5);
}

/// Online changes are published while their commit syncs, from seqs reserved on disk: a
/// kill -9 makes the next seqs skip past the reservation (never reuse one the broker may
/// hold), a clean stop gives the reservation back. Real store, real broker.
#[test]
fn seqs_skip_the_reservation_after_a_kill_and_continue_after_a_clean_stop() {
    const SEQ_RESERVE: u64 = edgesync::SEQ_RESERVE;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "sync-reserve");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let cloud = Cloud::start(
        &pki,
        broker.tls_port,
        "edgesync/sync-reserve/reported",
        false,
    );
    let mut agent = Agent::start(tls_agent(&pki, broker.tls_port, ""));
    wait("online", DEADLINE, || online(&agent));
    let first = report_many(&agent, 3, 1);
    cloud.wait_for_seqs(&first, DEADLINE);
    wait_drained(&agent);
    let last = *first.last().unwrap();

    agent.kill9();
    agent.restart();
    wait("online", DEADLINE, || online(&agent));
    let after_kill = report_many(&agent, 1, 1);
    let skipped = *after_kill.first().unwrap();
    assert_eq!(
        skipped,
        last + 1 + SEQ_RESERVE,
        "continues at the reservation"
    );
    cloud.wait_for_seqs(&after_kill, DEADLINE);
    wait_drained(&agent);

    agent.stop();
    agent.restart();
    wait("online", DEADLINE, || online(&agent));
    let after_stop = report_many(&agent, 1, 1);
    assert_eq!(
        *after_stop.first().unwrap(),
        skipped + 1,
        "no gap after a clean stop"
    );
    cloud.wait_for_seqs(&after_stop, DEADLINE);
    // Every seq reached the cloud once per distinct change: none was given twice.
    let mut by_seq = std::collections::BTreeMap::new();
    for c in cloud.changes() {
        let seq = c["seq"].as_u64().unwrap();
        let prev = by_seq.insert(seq, c["value"].clone());
        assert!(prev.is_none_or(|p| p == c["value"]), "seq {seq} reused");
    }
    assert_eq!(by_seq.len(), 5);
}
