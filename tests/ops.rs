//! Operations, with the real binary: health metrics on `P/D/metrics` (a real broker), the
//! Prometheus text file and `status --json`; queue inspection (`edgesync queue stats`,
//! `peek`, `export`) through the running daemon and, once it is stopped, from the store file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::cloud::{DEADLINE, Subscription, pki, subscriber, tls_agent, wait};
use common::{Agent, AgentOptions, assert_exit, report_req, stderr, stdout};
use edgesync_testkit::exposition::{self, samples_by_series};
use edgesync_testkit::{
    FaultProxy, Mosquitto, MosquittoOptions, RumqttdBroker, RumqttdOptions, TestPki, free_port,
};
use rumqttc::{Client, Event, Packet, QoS};
use serde_json::{Value, json};

/// A metrics document as the subscriber got it.
#[derive(Debug, Clone)]
struct Got {
    at: Instant,
    qos: QoS,
    retain: bool,
    doc: Value,
}

/// A subscriber recording every message on one topic with its arrival time and QoS.
struct Subscriber {
    got: Arc<Mutex<Vec<Got>>>,
    client: Client,
}

impl Subscriber {
    fn start(pki: &TestPki, port: u16, topic: &str) -> Subscriber {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        let how = Subscription {
            role: "ops",
            persistent: false,
            suback: Duration::from_secs(20),
        };
        let (client, _) = subscriber(pki, port, topic, how, move |ev| {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                sink.lock().unwrap().push(Got {
                    at: Instant::now(),
                    qos: p.qos,
                    retain: p.retain,
                    doc: serde_json::from_slice(&p.payload).unwrap_or(Value::Null),
                });
            }
        });
        Subscriber { got, client }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.disconnect();
    }
}

fn online(agent: &Agent) -> bool {
    agent.status()["connection"]["state"] == "online"
}

/// Every figure of a metrics document is there, with the right type.
fn assert_metrics_shape(m: &Value, device: &str) {
    assert_eq!(m["device"], device, "{m:#}");
    assert_eq!(m["version"], env!("CARGO_PKG_VERSION"));
    for path in [
        "/ts",
        "/uptime_s",
        "/queue/depth",
        "/queue/bytes",
        "/queue/max_bytes",
        "/changes/reported",
        "/changes/sent",
        "/changes/acked",
        "/changes/resent",
        "/changes/dropped/drop-oldest",
        "/changes/rejected/store-full",
        "/changes/rejected/invalid-change",
        "/reconnects",
    ] {
        assert!(m.pointer(path).is_some_and(Value::is_u64), "{path}: {m:#}");
    }
    for path in [
        "/queue/oldest_age_ms",
        "/changes/in_per_s",
        "/changes/out_per_s",
        "/last_error",
        "/desired_version",
        "/rss_bytes",
        "/connection",
    ] {
        assert!(m.pointer(path).is_some(), "{path} missing: {m:#}");
    }
    assert!(m["rss_bytes"].as_u64().is_some_and(|b| b > 0), "{m:#}");
}

#[test]
fn metrics_are_published_every_interval_while_online_and_match_status_and_the_text_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "ops-metrics");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let proxy = FaultProxy::start(broker.tls_addr()).unwrap();
    let sub = Subscriber::start(&pki, broker.tls_port, "edgesync/ops-metrics/metrics");
    let mut opts = tls_agent(&pki, proxy.port(), "");
    opts.extra_toml =
        "[telemetry]\ninterval = \"1s\"\ntextfile = \"prom/edgesync.prom\"\n".to_owned();
    let mut agent = Agent::prepare(opts);
    std::fs::create_dir_all(agent.dir().join("prom")).unwrap();
    agent.launch();
    wait("online", DEADLINE, || online(&agent));

    // Traffic for the counters: 30 changes queued and acknowledged, one refused request.
    for i in 0..3 {
        let changes: Vec<(&str, Value)> = (0..10).map(|j| ("temp", json!(i * 10 + j))).collect();
        let r = agent.request(&report_req(changes));
        assert_eq!(r["ok"], true, "{r}");
    }
    let bad = agent.request(&report_req([("ok", json!(1)), ("bad key", json!(2))]));
    assert_eq!(common::error_code(&bad), "invalid-change");
    wait("queue drained", DEADLINE, || agent.depth() == 0);

    // Documents keep coming, one a second; wait for two after the traffic settled.
    let settled = Instant::now();
    wait("two metrics documents after the traffic", DEADLINE, || {
        sub.got().iter().filter(|g| g.at > settled).count() >= 2
    });
    let got = sub.got();
    // Not retained. (rumqttd forwards with the subscription's QoS, whatever the publish
    // had: QoS 0 is checked against Mosquitto below.)
    assert!(got.iter().all(|g| !g.retain));
    let docs: Vec<&Got> = got.iter().filter(|g| g.at > settled).collect();
    let (a, b) = (docs[0], docs[1]);
    let apart = b.at.duration_since(a.at);
    assert!(
        apart >= Duration::from_millis(400) && apart <= Duration::from_millis(2500),
        "documents {apart:?} apart"
    );
    let ts_apart = b.doc["ts"].as_u64().unwrap() - a.doc["ts"].as_u64().unwrap();
    assert!((600..=2000).contains(&ts_apart), "ts {ts_apart} ms apart");
    for g in &docs {
        assert_metrics_shape(&g.doc, "ops-metrics");
    }
    let m = &b.doc;
    assert_eq!(m["connection"], "online");
    assert_eq!(m["queue"]["depth"], 0);
    assert_eq!(m["queue"]["oldest_age_ms"], Value::Null);
    assert_eq!(m["changes"]["reported"], 30);
    assert_eq!(m["changes"]["acked"], 30);
    assert_eq!(m["changes"]["rejected"]["invalid-change"], 2);
    assert_eq!(m["changes"]["rejected"]["store-full"], 0);
    assert_eq!(m["changes"]["dropped"]["drop-oldest"], 0);
    assert_eq!(m["desired_version"], Value::Null);
    assert_eq!(m["last_error"], Value::Null);
    // Nothing moved during the last window.
    assert_eq!(m["changes"]["in_per_s"], 0.0);
    assert_eq!(m["changes"]["out_per_s"], 0.0);
    // Some document saw the 30 changes go in and out.
    assert!(
        got.iter().any(|g| g.doc["changes"]["in_per_s"]
            .as_f64()
            .is_some_and(|r| r > 0.0)),
        "{got:#?}"
    );

    // The same figures in status --json, and a line of them in status.
    let out = agent.cli(&["status", "--json"]);
    assert_exit(&out, 0);
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_metrics_shape(&status["metrics"], "ops-metrics");
    assert_eq!(status["metrics"]["changes"]["acked"], 30);
    assert_eq!(status["metrics"]["connection"], "online");
    assert_eq!(status["counters"]["acked"], 30);
    assert_eq!(status["desired"]["version"], Value::Null);
    let out = agent.cli(&["status"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("health      in "), "{}", stdout(&out));

    // The text file: valid exposition, every sample labelled with the device.
    let prom = agent.dir().join("prom/edgesync.prom");
    wait("the text file", DEADLINE, || prom.exists());
    let text = std::fs::read_to_string(&prom).unwrap();
    let samples = exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(
        samples
            .iter()
            .all(|s| s.label("device") == Some("ops-metrics"))
    );
    let by = samples_by_series(&samples);
    assert_eq!(by["edgesync_connected"], 1.0);
    assert_eq!(by["edgesync_queue_depth"], 0.0);
    assert_eq!(by["edgesync_changes_reported_total"], 30.0);
    assert_eq!(by["edgesync_changes_acked_total"], 30.0);
    assert_eq!(
        by["edgesync_changes_rejected_total{reason=invalid-change}"],
        2.0
    );
    assert_eq!(
        by["edgesync_changes_dropped_total{reason=drop-oldest}"],
        0.0
    );
    assert!(by["edgesync_resident_memory_bytes"] > 0.0);
    for name in [
        "edgesync_queue_bytes",
        "edgesync_oldest_queued_age_seconds",
        "edgesync_changes_rejected_total{reason=store-full}",
        "edgesync_reconnects_total",
        "edgesync_uptime_seconds",
    ] {
        assert!(by.contains_key(name), "{name} missing:\n{text}");
    }
    // Rewritten in place: only the file itself in its directory, no temporary left.
    let names: Vec<_> = std::fs::read_dir(agent.dir().join("prom"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["edgesync.prom"]);

    // Offline: documents are skipped, not queued for later. After the link is back, only
    // documents taken after it came back arrive, showing the reconnect.
    proxy.cut();
    wait("offline", DEADLINE, || !online(&agent));
    thread::sleep(Duration::from_millis(2500));
    let restored_at = Instant::now();
    let restored_ms = edgesync::now_ms();
    proxy.restore();
    wait("online again", DEADLINE, || online(&agent));
    wait("a document after the reconnect", DEADLINE, || {
        sub.got().iter().any(|g| g.at > restored_at)
    });
    let after: Vec<Got> = sub
        .got()
        .into_iter()
        .filter(|g| g.at > restored_at)
        .collect();
    for g in &after {
        assert!(
            g.doc["ts"].as_u64().unwrap() >= restored_ms,
            "a document taken while offline was published: {:#}",
            g.doc
        );
    }
    assert!(after[0].doc["reconnects"].as_u64().unwrap() >= 1);
    agent.stop();
}

#[test]
fn metrics_go_out_at_qos_0_not_retained() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "ops-qos");
    // Mosquitto delivers at the lower of the publish's and the subscription's QoS.
    let Some(mosq) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    let sub = Subscriber::start(&pki, mosq.tls_port, "edgesync/ops-qos/metrics");
    let mut opts = tls_agent(&pki, mosq.tls_port, "");
    opts.extra_toml = "[telemetry]\ninterval = \"1s\"\n".to_owned();
    let agent = Agent::start(opts);
    wait("two metrics documents", DEADLINE, || sub.got().len() >= 2);
    for g in sub.got() {
        assert_eq!((g.qos, g.retain), (QoS::AtMostOnce, false));
        assert_metrics_shape(&g.doc, "ops-qos");
    }
    drop(agent);
}

#[test]
fn interval_zero_publishes_nothing_but_status_keeps_the_figures() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "ops-quiet");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let sub = Subscriber::start(&pki, broker.tls_port, "edgesync/ops-quiet/#");
    let mut opts = tls_agent(&pki, broker.tls_port, "");
    opts.extra_toml = "[telemetry]\ninterval = \"0\"\n".to_owned();
    let agent = Agent::start(opts);
    wait("online", DEADLINE, || online(&agent));
    thread::sleep(Duration::from_millis(2500));
    assert!(
        sub.got().iter().all(|g| g.doc.get("state").is_some()),
        "only statuses expected: {:#?}",
        sub.got()
    );
    let s = agent.status();
    assert_metrics_shape(&s["metrics"], "ops-quiet");
}

/// Reports `n` changes of various kinds in requests of 500; returns them as
/// (seq, key, value) in order.
fn report_backlog(agent: &Agent, n: u64) -> Vec<(u64, String, Value)> {
    let value = |i: u64| match i % 5 {
        0 => json!(i),
        1 => json!(format!("s-{i} ünïcode \"quoted\"")),
        2 => json!({"n": i, "list": [1, 2.5, null, true]}),
        3 => Value::Null,
        _ => json!(i as f64 + 0.25),
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let batch: Vec<(String, Value)> = (i..(i + 500).min(n))
            .map(|j| (format!("k{}.x", j % 37), value(j)))
            .collect();
        let r = agent.request(&report_req(
            batch.iter().map(|(k, v)| (k.as_str(), v.clone())),
        ));
        assert_eq!(r["ok"], true, "{r}");
        let first = r["first_seq"].as_u64().unwrap();
        for (n, (k, v)) in batch.into_iter().enumerate() {
            out.push((first + n as u64, k, v));
        }
        i += 500;
    }
    out
}

/// The NDJSON lines of an export as (seq, key, value); also checks ts and origin.
fn read_export(text: &str) -> Vec<(u64, String, Value)> {
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let obj = v.as_object().unwrap();
            assert!(
                obj.keys()
                    .all(|k| ["seq", "key", "value", "ts"].contains(&k.as_str())),
                "{l}"
            );
            assert!(v["ts"].as_u64().unwrap() > 1_700_000_000_000);
            (
                v["seq"].as_u64().unwrap(),
                v["key"].as_str().unwrap().to_owned(),
                v["value"].clone(),
            )
        })
        .collect()
}

fn queue_json(agent: &Agent, config: Option<&Path>) -> Value {
    let out = match config {
        Some(c) => agent.cli_at(c, &["queue", "stats", "--json"]),
        None => agent.cli(&["queue", "stats", "--json"]),
    };
    assert_exit(&out, 0);
    serde_json::from_str(&stdout(&out)).unwrap()
}

#[test]
fn queue_is_inspected_through_the_daemon_and_from_the_file_after_it_stopped() {
    // The broker is unreachable: every change stays queued.
    let mut agent = Agent::start(AgentOptions {
        mqtt_url: format!("mqtts://127.0.0.1:{}", free_port()),
        max_bytes: "16MiB".into(),
        ..AgentOptions::default()
    });
    let want = report_backlog(&agent, 2300);
    let (first, last) = (want[0].0, want[want.len() - 1].0);

    // stats
    let s = queue_json(&agent, None);
    assert_eq!(s["source"], "daemon");
    assert_eq!(s["depth"], 2300);
    assert_eq!(s["oldest"]["seq"], first);
    assert_eq!(s["newest"]["seq"], last);
    assert_eq!(s["next_seq"], last + 1);
    assert_eq!(s["counters"]["reported"], 2300);
    assert_eq!(s["counters"]["acked"], 0);
    assert_eq!(s["bytes"], agent.status()["queue"]["bytes"]);
    assert!(s["oldest"]["age_ms"].as_u64().is_some());
    let out = agent.cli(&["queue", "stats"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("2300 changes"), "{text}");
    assert!(
        text.contains(&format!("oldest      seq {first}, ")),
        "{text}"
    );
    assert!(text.contains("read from   the daemon at "), "{text}");

    // peek: 20 by default, --from/--limit, pages past one socket answer.
    let out = agent.cli(&["queue", "peek"]);
    assert_exit(&out, 0);
    let lines: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 20);
    let words: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(words[0], first.to_string());
    assert!(
        words[1].ends_with('Z') && words[1].contains('T'),
        "{}",
        lines[0]
    );
    assert_eq!(words[2], want[0].1);
    assert_eq!(words[3], want[0].2.to_string());
    assert_eq!(*words.last().unwrap(), "device");
    let out = agent.cli(&["queue", "peek", "--from", "100", "--limit", "3"]);
    assert_exit(&out, 0);
    let seqs: Vec<u64> = stdout(&out)
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(seqs, [100, 101, 102]);
    let out = agent.cli(&["queue", "peek", "--limit", "1500", "--json"]);
    assert_exit(&out, 0);
    assert_eq!(read_export(&stdout(&out)), want[..1500]);
    let out = agent.cli(&["queue", "peek", "--limit", "many"]);
    assert_exit(&out, 2);

    // export: to a file (atomically) and to stdout; equal to what was reported, in order.
    let file = agent.dir().join("backlog.ndjson");
    let out = agent.cli(&["queue", "export", file.to_str().unwrap()]);
    assert_exit(&out, 0);
    assert!(
        stderr(&out).contains("exported 2300 change(s)"),
        "{}",
        stderr(&out)
    );
    let running = std::fs::read_to_string(&file).unwrap();
    assert_eq!(read_export(&running), want);
    let out = agent.cli(&["queue", "export", "-"]);
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), running);
    // Reading changed nothing.
    assert_eq!(agent.depth(), 2300);

    // Another config naming the same store but no live socket: the store is locked.
    let other = agent.write_config("other.toml", &agent.opts.clone().socket("other.sock"));
    let out = agent.cli_at(&other, &["queue", "stats"]);
    assert_exit(&out, 3);
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));

    // After a clean stop: straight from the file, the same content.
    agent.stop();
    let s = queue_json(&agent, None);
    assert_eq!(s["source"], "store-file");
    assert_eq!(s["depth"], 2300);
    assert_eq!(s["newest"]["seq"], last);
    assert_eq!(s["counters"]["reported"], 2300);
    let out = agent.cli(&["queue", "stats"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("the store file "), "{}", stdout(&out));
    let out = agent.cli(&["queue", "peek", "--from", "2000", "--limit", "2"]);
    assert_exit(&out, 0);
    assert!(
        stderr(&out).contains("daemon is not running"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out).lines().count(), 2);
    let out = agent.cli(&["queue", "export", file.to_str().unwrap()]);
    assert_exit(&out, 0);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), running);
    assert_eq!(agent.read_store().len(), 2300);

    // After a crash the file needs a repair that only a writer may do: say so.
    agent.restart();
    agent.kill9();
    let out = agent.cli(&["queue", "stats"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("not closed cleanly") && stderr(&out).contains("start the daemon"),
        "{}",
        stderr(&out)
    );
    // Starting the daemon repairs it; nothing was lost.
    agent.restart();
    assert_eq!(queue_json(&agent, None)["depth"], 2300);
}

#[test]
fn queue_commands_without_daemon_or_store_fail_clearly() {
    let agent = Agent::prepare(AgentOptions::default());
    let out = agent.cli(&["queue", "stats"]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains("daemon not reachable") && err.contains("no store at"),
        "{err}"
    );
    let out = agent.cli(&["queue", "export", "/nonexistent-dir/x.ndjson"]);
    assert_exit(&out, 1);

    // An empty queue exports an empty file.
    let mut agent = Agent::start(AgentOptions {
        mqtt_url: format!("mqtts://127.0.0.1:{}", free_port()),
        ..AgentOptions::default()
    });
    let file = agent.dir().join("empty.ndjson");
    let out = agent.cli(&["queue", "export", file.to_str().unwrap()]);
    assert_exit(&out, 0);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "");
    // An empty peek says so (issue 15); as NDJSON it is no line at all.
    let out = agent.cli(&["queue", "peek"]);
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), "queue empty (from seq 0)\n");
    let out = agent.cli(&["queue", "peek", "--json"]);
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), "");
    // A file that cannot be written: exit 1, nothing left behind.
    let out = agent.cli(&[
        "queue",
        "export",
        agent.dir().join("no/such/dir.ndjson").to_str().unwrap(),
    ]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("cannot write"), "{}", stderr(&out));
    agent.stop();
}

/// Issue 16: the agent's own bytes written (`/proc/self/io`) move with its commits in
/// `status --json` (lifetime in `counters`, rate and projection in `metrics`) and the text
/// file, and the lifetime total survives a restart (kept in the store, no commit of its own).
#[test]
fn bytes_written_move_with_reports_and_survive_a_restart() {
    if std::fs::metadata("/proc/self/io").is_err() {
        return; // a kernel without task I/O accounting: the figures are null
    }
    let mut agent = Agent::prepare(AgentOptions {
        extra_toml: "[telemetry]\ninterval = \"1s\"\ntextfile = \"prom/edgesync.prom\"\n"
            .to_owned(),
        ..AgentOptions::default()
    });
    std::fs::create_dir_all(agent.dir().join("prom")).unwrap();
    agent.launch();
    let status_json = |agent: &Agent| -> Value {
        let out = agent.cli(&["status", "--json"]);
        assert_exit(&out, 0);
        serde_json::from_str(&stdout(&out)).unwrap()
    };
    let written = |s: &Value| s["counters"]["written_bytes"].as_u64();
    let first = status_json(&agent);
    assert!(
        first["counter_scopes"]["persistent"]
            .as_array()
            .unwrap()
            .contains(&json!("written_bytes"))
    );
    let w0 = written(&first).expect("counters.written_bytes");
    assert_eq!(first["metrics"]["written_bytes"], w0);

    // Every report is a durable commit: keep reporting until a rate window saw them.
    let mut i = 0;
    let mut moved = Value::Null;
    wait("a rate window with bytes written", DEADLINE, || {
        i += 1;
        let r = agent.request(&report_req([("wear.probe", json!(i))]));
        assert_eq!(r["ok"], true, "{r}");
        let s = status_json(&agent);
        let busy = s["metrics"]["written_bytes_per_s"]
            .as_f64()
            .is_some_and(|r| r > 0.0);
        if busy {
            moved = s;
        }
        busy
    });
    let m = &moved["metrics"];
    let per_s = m["written_bytes_per_s"].as_f64().unwrap();
    let per_day = m["written_gb_per_day"].as_f64().unwrap();
    // The projection is the rate over a day, in 10^9 bytes (rounded to 0.001).
    assert!((per_day - per_s * 86_400.0 / 1e9).abs() <= 0.001, "{m:#}");
    let w1 = written(&moved).unwrap();
    assert!(w1 > w0, "{w0} -> {w1}");
    let out = agent.cli(&["status"]);
    assert!(stdout(&out).contains("written     "), "{}", stdout(&out));

    // The text file carries the same figures.
    let prom = agent.dir().join("prom/edgesync.prom");
    wait("written bytes in the text file", DEADLINE, || {
        std::fs::read_to_string(&prom).is_ok_and(|t| t.contains("edgesync_written_bytes_total{"))
    });
    let text = std::fs::read_to_string(&prom).unwrap();
    let by = samples_by_series(&exposition::parse(&text).unwrap());
    assert!(by["edgesync_written_bytes_total"] >= w0 as f64, "{text}");
    assert!(
        by.contains_key("edgesync_written_bytes_per_second"),
        "{text}"
    );
    assert!(by.contains_key("edgesync_written_gb_per_day"), "{text}");

    // A status notes the figure; the next commit (a report) persists it with the counters.
    let noted = written(&agent.status()).unwrap();
    let r = agent.request(&report_req([("wear.probe", json!(-1))]));
    assert_eq!(r["ok"], true, "{r}");
    agent.stop();
    agent.restart();
    let after = written(&status_json(&agent)).unwrap();
    assert!(after >= noted, "lifetime went back: {noted} -> {after}");
    agent.stop();
}
