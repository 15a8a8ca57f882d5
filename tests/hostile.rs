//! Hostile input from the broker (issue 7 part 8): messages on topics the agent does not own,
//! malformed topics, hostile CBOR and JSON (huge length prefixes, tags, invalid UTF-8, deep
//! nesting, non-finite numbers, duplicate keys), 1,000 replays of a document and of a
//! command, and a flood of oversize messages. The agent answers what it can, changes
//! nothing, never dies, keeps its link, and its memory stays bounded.
//!
//! `tests/desired.rs` (`bad_documents_change_nothing_and_never_stop_the_agent`, the two
//! oversize tests) and `tests/control.rs` (`every_error_code_is_reachable`) cover the plain
//! cases; this file adds the hostile ones.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::time::Instant;

use common::cloud::{DEADLINE, decode, wait};
use common::rig::{BrokerRig, exec_handler, extends_broker_rig, line_count};
use serde_json::{Value, json};

/// The shared rig, and the file the `led` handler appends a line to per run.
struct Rig {
    base: BrokerRig,
    runs: PathBuf,
}

extends_broker_rig!(Rig);

impl Rig {
    /// The agent with `extra` appended to its config and an exec handler for `led` that
    /// appends a line to `runs` per run; returns once the agent answers a ping.
    fn start(device: &str, extra: &str) -> Rig {
        let base = BrokerRig::start(device, |dir, _, opts| {
            let script = format!("echo run >> '{}'", dir.join("runs").display());
            opts.extra_toml = format!("{extra}\n{}", exec_handler("led", &script, "60s"));
        });
        let runs = base.dir.path().join("runs");
        base.wait_ready();
        Rig { base, runs }
    }

    fn runs(&self) -> usize {
        line_count(&self.runs)
    }

    fn result(&self, version: u64, status: &str) -> Value {
        wait(&format!("result {status} of {version}"), DEADLINE, || {
            self.desired_results()
                .iter()
                .any(|r| r["version"] == version && r["status"] == status)
        });
        self.desired_results()
            .into_iter()
            .find(|r| r["version"] == version && r["status"] == status)
            .unwrap()
    }

    /// `edgesync get desired` over the socket.
    fn desired(&self) -> Value {
        let r = self.agent.request(&json!({"op": "get", "doc": "desired"}));
        assert_eq!(r["ok"], true, "{r}");
        r["state"].clone()
    }

    fn rss_kib(&self, field: &str) -> u64 {
        self.agent.proc_status_kib(field)
    }
}

/// `haystack` with the first `from` replaced by `to`.
fn replace_bytes(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    match haystack.windows(from.len()).position(|w| w == from) {
        Some(at) => [&haystack[..at], to, &haystack[at + from.len()..]].concat(),
        None => haystack.to_vec(),
    }
}

/// CBOR text string header + bytes (no UTF-8 check: the point is to send bad ones).
fn cbor_text(bytes: &[u8]) -> Vec<u8> {
    assert!(bytes.len() < 24);
    let mut out = vec![0x60 | bytes.len() as u8];
    out.extend_from_slice(bytes);
    out
}

/// `{"version": V, "state": {"k": <value>}}` in CBOR around raw value bytes.
fn cbor_doc_raw(version: u32, value: &[u8]) -> Vec<u8> {
    let mut out = vec![0xa2];
    out.extend(cbor_text(b"version"));
    out.push(0x1a);
    out.extend(version.to_be_bytes());
    out.extend(cbor_text(b"state"));
    out.push(0xa1);
    out.extend(cbor_text(b"k"));
    out.extend_from_slice(value);
    out
}

/// Hostile CBOR pieces, each with a name.
fn hostile_cbor_values() -> Vec<(&'static str, Vec<u8>)> {
    let huge = [0xff; 8];
    let mut v = vec![
        (
            "byte string of 2^64-1 bytes",
            [&[0x5b][..], &huge, b"ab"].concat(),
        ),
        (
            "text string of 2^64-1 bytes",
            [&[0x7b][..], &huge, b"ab"].concat(),
        ),
        (
            "array of 2^64-1 items",
            [&[0x9b][..], &huge, &[0x01]].concat(),
        ),
        (
            "map of 2^64-1 pairs",
            [&[0xbb][..], &huge, &[0x61, b'a', 0x01]].concat(),
        ),
        (
            "array of 2^32 items",
            vec![0x9a, 0xff, 0xff, 0xff, 0xff, 0x01],
        ),
        (
            "tag 1 (epoch time)",
            vec![0xc1, 0x1a, 0x65, 0x00, 0x00, 0x00],
        ),
        ("tag 2^64-1", [&[0xdb][..], &huge, &[0x01]].concat()),
        ("a bignum tag", vec![0xc2, 0x49, 1, 0, 0, 0, 0, 0, 0, 0, 0]),
        ("invalid UTF-8 text", cbor_text(&[0xff, 0xfe, 0x80])),
        ("half float NaN", vec![0xf9, 0x7e, 0x00]),
        ("half float -Infinity", vec![0xf9, 0xfc, 0x00]),
        (
            "indefinite text of bad chunks",
            vec![0x7f, 0x41, 0x00, 0xff],
        ),
        ("undefined", vec![0xf7]),
        ("simple value 255", vec![0xf8, 0xff]),
        ("a break out of place", vec![0xff]),
        ("reserved additional info", vec![0x1c]),
    ];
    // 10,000 nested arrays (the decoder's recursion limit is 256).
    let mut deep = vec![0x81; 10_000];
    deep.push(0x01);
    v.push(("10,000 nested arrays", deep));
    let mut deep_maps = Vec::new();
    for _ in 0..10_000 {
        deep_maps.extend([0xa1, 0x61, b'a']);
    }
    deep_maps.push(0x01);
    v.push(("10,000 nested maps", deep_maps));
    v
}

/// Hostile JSON documents (whole payloads), version `V` (replaced by the caller).
fn hostile_json() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "invalid UTF-8",
            b"{\"version\": 9, \"state\": {\"k\": \"\xff\xfe\"}}".to_vec(),
        ),
        (
            "NaN literal",
            br#"{"version": 9, "state": {"k": NaN}}"#.to_vec(),
        ),
        (
            "Infinity literal",
            br#"{"version": 9, "state": {"k": Infinity}}"#.to_vec(),
        ),
        (
            "1e999",
            br#"{"version": 9, "state": {"k": 1e999}}"#.to_vec(),
        ),
        (
            "lone surrogate",
            br#"{"version": 9, "state": {"k": "\ud800"}}"#.to_vec(),
        ),
        (
            "10,000 nested arrays",
            format!(
                "{{\"version\": 9, \"state\": {{\"k\": {}1{}}}}}",
                "[".repeat(10_000),
                "]".repeat(10_000)
            )
            .into_bytes(),
        ),
        (
            "duplicate version",
            br#"{"version": 9, "version": 10, "state": {}}"#.to_vec(),
        ),
        (
            "duplicate state key",
            br#"{"version": 9, "state": {"k": 1, "k": 2}}"#.to_vec(),
        ),
        (
            "version 2^64",
            br#"{"version": 18446744073709551616, "state": {}}"#.to_vec(),
        ),
        (
            "trailing garbage",
            br#"{"version": 9, "state": {}} {"#.to_vec(),
        ),
        ("NUL bytes", b"{\0\0\0}".to_vec()),
    ]
}

#[test]
fn hostile_desired_documents_are_rejected_and_change_nothing() {
    let rig = Rig::start("ho-desired", "");
    rig.cloud.publish(
        &rig.topic("desired"),
        json!({"version": 1, "state": {"base": 1}}).to_string(),
        false,
    );
    rig.result(1, "applied");
    let before = rig.desired();

    // Every case has a version of its own: one taken in with its keys refused must not
    // turn the next into a duplicate.
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, value) in hostile_cbor_values() {
        let version = 100 + cases.len() as u32;
        cases.push((format!("CBOR value: {name}"), cbor_doc_raw(version, &value)));
        // The same bytes as the whole document.
        cases.push((format!("CBOR document: {name}"), value));
    }
    for (name, doc) in hostile_json() {
        let version = format!("\"version\": {}", 100 + cases.len());
        let doc = replace_bytes(&doc, b"\"version\": 9", version.as_bytes());
        cases.push((format!("JSON: {name}"), doc));
    }
    for (i, (name, payload)) in cases.iter().enumerate() {
        rig.cloud
            .publish(&rig.topic("desired"), payload.clone(), false);
        // Results come in order: the i-th answer after the first answers the i-th case.
        wait(&format!("an answer to {name}"), DEADLINE, || {
            rig.desired_results().len() > i + 1
        });
        let r = &rig.desired_results()[i + 1];
        if name == "CBOR value: undefined" {
            // ciborium reads CBOR `undefined` as null: the key is removed (it was not set).
            assert_eq!(r["status"], "applied", "{name}: {r}");
            continue;
        }
        assert!(
            r["status"] == "rejected",
            "{name}: {r}; log:\n{}",
            rig.agent.log()
        );
        assert!(
            r["error"].as_str().is_some_and(|e| !e.is_empty())
                || r["keys"]["k"]["error"]
                    .as_str()
                    .is_some_and(|e| !e.is_empty()),
            "{name}: a reason: {r}"
        );
    }
    assert_eq!(
        rig.agent.status()["connection"]["state"],
        "online",
        "alive and linked"
    );
    assert_eq!(rig.desired(), before, "nothing changed");
    rig.cloud.publish(
        &rig.topic("desired"),
        json!({"version": 1000, "state": {"base": 2}}).to_string(),
        false,
    );
    rig.result(1000, "applied");
    eprintln!("hostile desired: {} documents rejected", cases.len());
}

#[test]
fn hostile_command_requests_are_answered_bad_request_and_run_nothing() {
    let rig = Rig::start("ho-command", "");
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, value) in hostile_cbor_values() {
        // {"id": "x", "args": {"k": <value>}}
        let mut doc = vec![0xa2];
        doc.extend(cbor_text(b"id"));
        doc.extend(cbor_text(b"hostile"));
        doc.extend(cbor_text(b"args"));
        doc.push(0xa1);
        doc.extend(cbor_text(b"k"));
        doc.extend_from_slice(&value);
        cases.push((format!("CBOR args: {name}"), doc));
        cases.push((format!("CBOR request: {name}"), value));
    }
    for (name, doc) in [
        ("two ids", br#"{"id": "a", "id": "b"}"#.to_vec()),
        (
            "duplicate args key",
            br#"{"id": "dup", "args": {"k": 1, "k": 2}}"#.to_vec(),
        ),
        ("NaN", br#"{"id": "nan", "args": {"k": NaN}}"#.to_vec()),
        ("invalid UTF-8 id", b"{\"id\": \"\xff\"}".to_vec()),
        (
            "id of 65 chars",
            format!("{{\"id\": \"{}\"}}", "i".repeat(65)).into_bytes(),
        ),
        ("id a number", br#"{"id": 7}"#.to_vec()),
        (
            "expires a string",
            br#"{"id": "exp", "expires": "soon"}"#.to_vec(),
        ),
        ("args a list", br#"{"id": "lst", "args": [1]}"#.to_vec()),
        (
            "10,000 nested arrays",
            format!(
                "{{\"id\": \"deep\", \"args\": {{\"k\": {}1{}}}}}",
                "[".repeat(10_000),
                "]".repeat(10_000)
            )
            .into_bytes(),
        ),
        (
            "over 64 KiB",
            format!(
                "{{\"id\": \"big\", \"args\": {{\"k\": \"{}\"}}}}",
                "x".repeat(70_000)
            )
            .into_bytes(),
        ),
    ] {
        cases.push((format!("JSON: {name}"), doc));
    }
    let answers = || {
        rig.on("cmd/ping/result")
            .into_iter()
            .filter(|(_, v)| !v["id"].as_str().is_some_and(|id| id.starts_with("ready-")))
            .collect::<Vec<_>>()
    };
    let mut non_bad = Vec::new();
    for (i, (name, payload)) in cases.iter().enumerate() {
        rig.cloud
            .publish(&rig.topic("cmd/ping"), payload.clone(), false);
        wait(&format!("an answer to {name}"), DEADLINE, || {
            answers().len() > i
        });
        let (_, a) = &answers()[i];
        if a["ok"] != false || a["error"]["code"] != "bad-request" {
            non_bad.push(format!("{name}: {a}"));
        }
        assert!(
            a["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}: {a}"
        );
    }
    assert!(
        non_bad.is_empty(),
        "answered other than bad-request: {non_bad:#?}"
    );
    assert_eq!(
        rig.agent.status()["connection"]["state"],
        "online",
        "alive and linked"
    );
    rig.ping();
    eprintln!(
        "hostile commands: {} requests answered bad-request",
        cases.len()
    );
}

#[test]
fn messages_on_topics_the_agent_does_not_own_are_ignored() {
    let rig = Rig::start("ho-topics", "");
    let doc = json!({"version": 5, "state": {"led": "intruder"}}).to_string();
    let ping = json!({"id": "intruder"}).to_string();
    // Other devices (also ones whose id starts like ours), deeper and malformed topics.
    for topic in [
        "edgesync/ho-topics-2/desired".to_owned(),
        "edgesync/ho-topic/desired".to_owned(),
        "edgesync/other/cmd/ping".to_owned(),
        "other-prefix/ho-topics/desired".to_owned(),
        rig.topic("desired/extra"),
        rig.topic("desired/result"),
        rig.topic("cmd/ping/result"),
        rig.topic("cmd/ping/x"),
        rig.topic("cmd/"),
        rig.topic("cmd/bad name"),
        rig.topic("cmd/p.ng"),
        rig.topic("cmd/ünicode"),
        rig.topic(&format!("cmd/{}", "x".repeat(65))),
        rig.topic("desired "),
        rig.topic("Desired"),
    ] {
        let payload = if topic.contains("cmd") { &ping } else { &doc };
        rig.cloud.publish(&topic, payload.clone(), false);
    }
    rig.ping();
    assert_eq!(rig.runs(), 0, "no handler ran");
    assert_eq!(rig.desired(), json!({}));
    let answered: Vec<Value> = rig
        .cloud
        .messages()
        .iter()
        .filter(|m| m.topic.ends_with("/result"))
        .map(|m| decode(&m.payload))
        .filter(|v| v["id"] == "intruder" || v["version"] == 5)
        .collect();
    // Our own result topics were published by the test itself: those are the only ones.
    assert!(
        answered.iter().all(|v| v == &json!({"id": "intruder"})
            || v == &json!({"version": 5, "state": {"led": "intruder"}})),
        "{answered:?}"
    );
    assert!(answered.len() <= 2, "{answered:?}");
    let log = rig.agent.log();
    assert!(
        log.contains("ignoring a message on a topic this agent does not act on"),
        "{log}"
    );
    assert_eq!(
        rig.agent.status()["connection"]["state"],
        "online",
        "alive and linked"
    );
}

#[test]
fn a_thousand_replays_apply_and_run_nothing_again() {
    const REPLAYS: usize = 1000;
    let rig = Rig::start("ho-replay", "");
    let doc = json!({"version": 1, "state": {"led": "red"}}).to_string();
    rig.cloud.publish(&rig.topic("desired"), doc.clone(), false);
    rig.result(1, "applied");
    rig.cloud.publish(
        &rig.topic("desired"),
        json!({"version": 2, "state": {"led": "green"}}).to_string(),
        false,
    );
    rig.result(2, "applied");
    assert_eq!(rig.runs(), 2);
    let rb = json!({"id": "rb-once", "args": {"key": "led", "version": 1}}).to_string();
    rig.cloud
        .publish(&rig.topic("cmd/rollback"), rb.clone(), false);
    wait("the rollback's answer", DEADLINE, || {
        !rig.on("cmd/rollback/result").is_empty()
    });
    assert_eq!(rig.runs(), 3);
    let first = rig.on("cmd/rollback/result")[0].1.clone();
    assert_eq!(first["ok"], true, "{first}");

    let started = Instant::now();
    let doc2 = json!({"version": 2, "state": {"led": "green"}}).to_string();
    for i in 0..REPLAYS {
        // Old versions (stale), the applied one (duplicate), and the command.
        let d = if i % 2 == 0 { &doc } else { &doc2 };
        rig.cloud.publish(&rig.topic("desired"), d.clone(), false);
        rig.cloud
            .publish(&rig.topic("cmd/rollback"), rb.clone(), false);
    }
    let sent = started.elapsed();
    wait("every replayed document answered", DEADLINE * 2, || {
        rig.desired_results().len() >= 2 + REPLAYS
    });
    wait("every replayed command answered", DEADLINE * 2, || {
        rig.on("cmd/rollback/result").len() > REPLAYS
    });
    let answered = started.elapsed();
    assert_eq!(rig.runs(), 3, "nothing ran again");
    for r in &rig.desired_results()[2..] {
        assert!(
            (r["version"] == 1 && r["status"] == "stale")
                || (r["version"] == 2 && r["status"] == "duplicate"),
            "{r}"
        );
    }
    for (_, a) in rig.on("cmd/rollback/result") {
        assert_eq!(a, first, "answered from the record");
    }
    assert_eq!(rig.desired(), json!({"led": "red"}));
    eprintln!(
        "replays: {REPLAYS} documents + {REPLAYS} commands published in {sent:.1?}, all answered after {answered:.1?}; 0 re-applied, 0 re-run"
    );
}

#[test]
fn a_flood_of_oversize_messages_keeps_memory_bounded_and_the_link_up() {
    // Documents over 64 KiB are refused; the transport reads up to 4 MiB.
    let rig = Rig::start("ho-flood", "[desired]\nmax_document_bytes = \"64KiB\"\n");
    rig.ping();
    let baseline = rig.rss_kib("VmRSS:");
    const FLOOD: usize = 40;
    let big = json!({"version": 7, "state": {"k": "z".repeat(3 << 20)}}).to_string();
    let big_cmd = json!({"id": "big", "args": {"k": "z".repeat(3 << 20)}}).to_string();
    let started = Instant::now();
    for i in 0..FLOOD {
        if i % 2 == 0 {
            rig.cloud.publish(&rig.topic("desired"), big.clone(), false);
        } else {
            rig.cloud
                .publish(&rig.topic("cmd/ping"), big_cmd.clone(), false);
        }
    }
    wait("every oversize document answered", DEADLINE * 2, || {
        rig.desired_results().len() >= FLOOD / 2
    });
    rig.ping();
    let took = started.elapsed();
    for r in rig.desired_results() {
        assert_eq!(r["status"], "rejected", "{r}");
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("larger than desired.max_document_bytes"),
            "{r}"
        );
    }
    let big_answers: Vec<Value> = rig
        .on("cmd/ping/result")
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| v["ok"] == false)
        .collect();
    assert!(big_answers.len() >= FLOOD / 2, "{}", big_answers.len());
    assert!(
        big_answers
            .iter()
            .all(|v| v["error"]["code"] == "bad-request")
    );
    let rss = rig.rss_kib("VmRSS:");
    let peak = rig.rss_kib("VmHWM:");
    eprintln!(
        "oversize flood: {FLOOD} messages of 3 MiB in {took:.1?}; RSS {baseline} KiB before, \
         {rss} KiB after, peak {peak} KiB"
    );
    // A few incoming packets of at most 4 MiB at a time, not the flood (300 MiB).
    assert!(peak < 96 * 1024, "peak RSS {peak} KiB");
    assert_eq!(
        rig.agent.status()["connection"]["state"],
        "online",
        "the link stayed up"
    );
    assert_eq!(
        rig.agent.status()["connection"]["state"],
        "online",
        "alive and linked"
    );
}
