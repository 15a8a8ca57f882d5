//! Issue 13, store items: damaged records and pages, store faults while online, seqs of a
//! replaced store, the bound on the whole file. The real binary, real damaged files, a real
//! TLS broker (rumqttd in-process) for the cloud side.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::cloud::{Cloud, DEADLINE, pki, tls_agent};
use common::{Agent, AgentOptions};
use edgesync_testkit::{RumqttdBroker, RumqttdOptions};
use serde_json::{Value, json};

/// A TCP port nothing listens on (bound, then released): the agent stays offline.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Reports `n` changes, 100 per request; change `j` has key `k{j % 50}` and a value holding
/// the text `mark` + `j` (7 digits), unique in the store. Returns the seq of each change.
fn report_marked(agent: &Agent, mark: &str, n: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut j = 0;
    while j < n {
        let k = 100.min(n - j);
        let changes: Vec<Value> = (j..j + k)
            .map(|i| json!({"key": format!("k{}", i % 50), "value": {"n": i, "tag": format!("{mark}{i:07}")}}))
            .collect();
        let r = agent.request(&json!({"op": "report", "changes": changes}));
        assert_eq!(r["ok"], true, "{r}");
        let first = r["first_seq"].as_u64().unwrap();
        seqs.extend((0..k).map(|o| first + o));
        j += k;
    }
    seqs
}

/// Every start of `needle` in `hay`.
fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// Points the (stopped) agent's config at the broker.
fn retarget(agent: &mut Agent, opts: AgentOptions) {
    std::fs::write(&agent.config_path, opts.to_toml(agent.dir())).unwrap();
    agent.opts = opts;
}

fn status(agent: &Agent) -> Value {
    agent.status()
}

/// Item 8: bytes flipped inside 8 queued values. Before the fix each damaged record was
/// spliced verbatim into its batch, so the cloud could not decode the batch (its 99
/// intact neighbours lost with it), and nothing was logged or counted.
#[test]
fn damaged_records_are_skipped_counted_and_never_spoil_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "store-corrupt");
    let mark = "zq";
    let n = 2000;
    let mut agent = Agent::start(tls_agent(&pki, dead_port(), ""));
    let seqs = report_marked(&agent, mark, n);
    assert!(agent.stop().success());

    // Damage 8 values: the text head before the mark (0x69, text of 9) gets its top bit
    // flipped (0xe9, a CBOR simple value no JSON value has), wherever the record is stored.
    let damaged_js: Vec<u64> = (0..8).map(|i| 137 + i * 233).collect();
    let mut file = std::fs::read(&agent.store_path).unwrap();
    for j in &damaged_js {
        let needle = format!("{mark}{j:07}");
        let hits = find_all(&file, needle.as_bytes());
        assert!(!hits.is_empty(), "{needle} not in the store file");
        for at in hits {
            assert_eq!(file[at - 1], 0x69);
            file[at - 1] ^= 0x80;
        }
    }
    std::fs::write(&agent.store_path, &file).unwrap();
    let damaged: BTreeSet<u64> = damaged_js.iter().map(|j| seqs[*j as usize]).collect();

    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let cloud = Cloud::start(&pki, broker.tls_port, "edgesync/store-corrupt/#", false);
    retarget(&mut agent, tls_agent(&pki, broker.tls_port, ""));
    agent.restart();

    let intact: BTreeSet<u64> = seqs
        .iter()
        .copied()
        .filter(|s| !damaged.contains(s))
        .collect();
    let drained = || {
        let s = status(&agent);
        s["queue"]["depth"] == 0 && s["counters"]["corrupt"] == 8
    };
    let deadline = std::time::Instant::now() + DEADLINE;
    while !drained() {
        assert!(
            std::time::Instant::now() < deadline,
            "not drained: {:#}",
            status(&agent)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Every batch decodes, and every intact change arrived in one.
    let mut got = BTreeSet::new();
    for m in cloud
        .messages()
        .iter()
        .filter(|m| m.topic.ends_with("/reported"))
    {
        let b: Value = ciborium::from_reader(&m.payload[..]).unwrap_or_else(|e| {
            panic!(
                "the cloud cannot decode a batch ({} bytes): {e}",
                m.payload.len()
            )
        });
        for c in b["changes"].as_array().unwrap() {
            got.insert(c["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(got, intact, "exactly the intact changes arrive");
    let s = status(&agent);
    assert_eq!(s["counters"]["acked"], n - 8, "{s:#}");
    assert_eq!(s["metrics"]["changes"]["dropped"]["corrupt"], 8, "{s:#}");
    let log = agent.log();
    for seq in &damaged {
        assert!(
            log.lines()
                .any(|l| l.contains("skipping it") && l.contains(&format!("seq={seq}"))),
            "no log line for damaged seq {seq}:\n{log}"
        );
    }
}
