//! Issue 13, store items: damaged records and pages, store faults while online, seqs of a
//! replaced store, the bound on the whole file. The real binary, real damaged files, a real
//! TLS broker (rumqttd in-process) for the cloud side.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgesync::{NewChange, Origin, encode_value};
use edgesync::{Outbox, StoreError, StoreOptions, WhenFull};

use common::cloud::{Cloud, DEADLINE, pki, tls_agent};
use common::rig::broker_and_cloud;
use common::{Agent, AgentOptions};
use edgesync_testkit::{RumqttdBroker, RumqttdOptions};
use serde_json::{Value, json};

/// A TCP port nothing listens on (bound, then released): the agent stays offline.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Reports `n` changes, 100 per request; change `j` has key `k{j % 50}` and a value holding
/// the text `mark` + `j` (7 digits), unique in the store (but for copies redb left in
/// freed pages). Returns the seq of each change.
fn report_marked(agent: &Agent, mark: &str, n: u64) -> Vec<u64> {
    report_marked_per(agent, mark, n, 100)
}

/// [`report_marked`] with `per` changes per request.
fn report_marked_per(agent: &Agent, mark: &str, n: u64, per: u64) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut j = 0;
    while j < n {
        let k = per.min(n - j);
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

/// Damages the B-tree page holding change `j`'s record (marked as in [`report_marked`]):
/// its page type byte no longer names a leaf or a branch, which makes redb's cursor panic
/// ("entered unreachable code").
fn damage_page(path: &std::path::Path, mark: &str, j: u64) {
    let mut file = std::fs::read(path).unwrap();
    let hits = find_all(&file, format!("{mark}{j:07}").as_bytes());
    assert_eq!(hits.len(), 1);
    let page = hits[0] - hits[0] % 4096;
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    use std::io::{Seek, Write};
    f.seek(std::io::SeekFrom::Start(page as u64)).unwrap();
    f.write_all(&[0x07]).unwrap();
    file.clear();
}

/// A redb backend in memory that the test can damage under an open store.
#[derive(Debug, Clone, Default)]
struct MemDisk(Arc<Mutex<Vec<u8>>>);

impl redb::StorageBackend for MemDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.0.lock().unwrap().len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let d = self.0.lock().unwrap();
        let off = offset as usize;
        let src = d
            .get(off..off + out.len())
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        out.copy_from_slice(src);
        Ok(())
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.0.lock().unwrap().resize(len as usize, 0);
        Ok(())
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut d = self.0.lock().unwrap();
        let end = offset as usize + data.len();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
}

/// Item 9, the drain's read: a page of the queue damaged under the open store (20,000
/// changes, more than redb's page cache holds). Before the fix `read_from` panicked inside
/// redb ("entered unreachable code"), killing the drain; now it is `StoreError::Damaged`,
/// again on every retry, and the store still takes appends.
#[test]
fn a_damaged_page_under_the_drain_is_an_error_not_a_panic() {
    let disk = MemDisk::default();
    let opts = StoreOptions {
        path: "mem.redb".into(),
        max_bytes: 64 << 20,
        when_full: WhenFull::Reject,
        cache_size: 256 << 10,
    };
    let outbox = Outbox::open_with_backend(disk.clone(), &opts).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let changes: Vec<NewChange> = (0..20_000u64)
        .map(|i| {
            let key = format!("k{}", i % 50);
            NewChange {
                value: encode_value(
                    &key,
                    &json!({"tag": format!("pg{i:07}"), "pad": "x".repeat(60)}),
                )
                .unwrap(),
                key,
                ts: None,
                origin: Origin::Device,
            }
        })
        .collect();
    rt.block_on(outbox.append(changes)).unwrap();
    {
        let mut d = disk.0.lock().unwrap();
        let hits = find_all(&d, b"pg0010000");
        assert_eq!(hits.len(), 1);
        let page = hits[0] - hits[0] % 4096;
        d[page] = 0x07;
    }
    for _ in 0..3 {
        match outbox.read_from(0, usize::MAX, usize::MAX) {
            Err(StoreError::Damaged { .. }) => {}
            other => panic!(
                "expected a damaged-store error, got {:?}",
                other.map(|v| v.len())
            ),
        }
    }
    let r = rt.block_on(outbox.append(vec![NewChange {
        key: "after".into(),
        value: encode_value("after", &json!(1)).unwrap(),
        ts: None,
        origin: Origin::Device,
    }]));
    assert!(r.is_ok(), "{r:?}");
    outbox.shutdown_blocking();
}

/// Item 9, the CLI: `queue export` of a store file with a damaged page exited 101
/// ("internal error"); now 1 with the reason. A start refuses the file clearly.
#[test]
fn queue_export_of_a_damaged_store_exits_1_and_run_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "store-page");
    let mut agent = Agent::start(tls_agent(&pki, dead_port(), ""));
    report_marked_per(&agent, "pg", 4000, 4000);
    assert!(agent.stop().success());
    damage_page(&agent.store_path, "pg", 2000);

    let out = agent.cli(&["queue", "export", "-"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("damaged"), "stderr: {stderr}");

    let out = common::run_with_timeout(
        {
            let mut c = common::bin_command();
            c.arg("run").arg("--config").arg(&agent.config_path);
            c
        },
        None,
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("damaged"), "stderr: {stderr}");
}

/// Item 11: the disk fills while online, so deletes of broker-acknowledged changes fail.
/// Before the fix a failed delete was logged and taken as done: those changes stayed
/// queued (and were sent again) until the next reconnect. Now the delete is retried with
/// backoff, the status shows the store fault while it lasts, and once space returns the
/// queue empties on the same connection.
#[test]
fn deletes_that_fail_on_a_full_disk_are_retried_until_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "store-full");
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let _cloud = Cloud::start(&pki, broker.tls_port, "edgesync/store-full/#", false);
    let mut agent = Agent::prepare(
        tls_agent(&pki, broker.tls_port, "")
            .max_bytes("256MiB")
            .store_path("fs/store.redb"),
    );
    let Some((_mount, ballast)) = common::half_full_store_fs(&agent) else {
        return;
    };
    agent.launch();
    let deadline = std::time::Instant::now() + DEADLINE;
    while status(&agent)["connection"]["state"] != "online" {
        assert!(std::time::Instant::now() < deadline, "never online");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Report until the disk is full and a delete has failed. (The 1 MiB store journal does
    // not fit beside the ballast: every commit is a durable store commit.)
    let mut fault_seen = false;
    for n in 0..5000 {
        let changes: Vec<Value> = (0..8)
            .map(|j| json!({"key": format!("c{n}.{j}"), "value": "x".repeat(2000)}))
            .collect();
        let _ = agent.request(&json!({"op": "report", "changes": changes}));
        fault_seen |= status(&agent)["queue"]["store_error"].is_string();
        // A delete failed, or (deletes waiting in memory for the journal) a commit failed
        // with deletes in it: both must be carried out once space returns.
        let log = agent.log();
        if log.contains("deleting acknowledged changes failed")
            || (fault_seen && log.contains("store commit failed"))
        {
            break;
        }
        assert!(n < 4999, "no delete ever failed");
    }
    // The fault shows while it lasts.
    let deadline = std::time::Instant::now() + DEADLINE;
    while !fault_seen {
        fault_seen = status(&agent)["queue"]["store_error"].is_string();
        assert!(
            std::time::Instant::now() < deadline,
            "no store fault in status"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // Space returns: the acknowledged changes leave the queue on this connection.
    std::fs::remove_file(&ballast).unwrap();
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let s = status(&agent);
        if s["queue"]["depth"] == 0 && s["queue"]["store_error"].is_null() {
            assert_eq!(s["counters"]["reconnects"], 0, "{s:#}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still queued: {s:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Item 7: a store file truncated to 0 bytes. Before the fix redb silently made a new store
/// in it and seqs restarted at 1, so a receiver deduplicating by (device, seq) dropped the
/// new changes as duplicates. Now the agent says so loudly and the new store's seqs start
/// at a floor from the clock (Unix ms × 1000), above any seq the old store handed out.
#[test]
fn an_emptied_store_file_never_reuses_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "store-empty");
    let mut agent = Agent::start(tls_agent(&pki, dead_port(), ""));
    let old = report_marked(&agent, "em", 300);
    assert!(agent.stop().success());
    std::fs::write(&agent.store_path, b"").unwrap();
    let before = edgesync::now_ms() * 1000;
    agent.restart();
    let new = report_marked(&agent, "en", 10);
    assert!(new[0] >= before, "seqs restarted at {}", new[0]);
    assert!(new[0] > *old.last().unwrap());
    assert!(new[0] < 1 << 53, "exact as a JSON number");
    let log = agent.log();
    assert!(log.contains("the store file is empty (0 bytes)"), "{log}");
    // The floor is persisted: a restart continues after it.
    assert!(agent.stop().success());
    agent.restart();
    let again = report_marked(&agent, "eo", 1);
    assert_eq!(again[0], new.last().unwrap() + 1);
}

/// A store created outside systemd (no UMask= there) was 0644: any local user could read
/// every queued value. Now it is created 0600.
#[test]
fn a_new_store_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "store-mode");
    // The umask of a shell outside systemd.
    let mut agent = Agent::start(tls_agent(&pki, dead_port(), ""));
    report_marked(&agent, "md", 1);
    let mode = std::fs::metadata(&agent.store_path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "store mode {:o}", mode & 0o777);
    assert!(agent.stop().success());
}

/// The store file's length (what the file system reserves for it at most; redb grows it).
fn file_len(agent: &Agent) -> u64 {
    std::fs::metadata(&agent.store_path).unwrap().len()
}

/// The documented bound on the store file: `2 × store.max_bytes + 1 MiB` (redb's page slack:
/// B-tree pages at most half empty after splits, growth in steps, metadata pages).
fn file_bound(max_bytes: u64) -> u64 {
    2 * max_bytes + (1 << 20)
}

/// Item 6, reported keys: 400 distinct keys × 60 KB reported with `max_bytes = "1MiB"`
/// (drop-oldest, offline). Before the fix the queue stayed within 1 MiB but the latest-value
/// table kept a copy of every key: a 49 MB file. Now the latest values count against
/// `max_bytes` (at most half of it): a report adding keys beyond that is refused
/// `store-full` saying which bound, the file stays within the documented bound, a report of
/// an existing key still works, and the queue drains once the broker is there.
#[test]
fn distinct_reported_keys_cannot_grow_the_store_past_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "bound-keys");
    let max: u64 = 1 << 20;
    let mut agent = Agent::start(
        tls_agent(&pki, dead_port(), "")
            .max_bytes("1MiB")
            .when_full("drop-oldest"),
    );
    let big = |i: usize| json!(format!("{i:05}{}", "x".repeat(60_000)));
    let mut accepted = 0;
    let mut refused = 0;
    let mut message = String::new();
    for i in 0..400 {
        let r = agent.request(
            &json!({"op": "report", "changes": [{"key": format!("k{i}"), "value": big(i)}]}),
        );
        if r["ok"] == true {
            accepted += 1;
        } else {
            assert_eq!(common::error_code(&r), "store-full", "{r}");
            refused += 1;
            message = r["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
        }
    }
    let len = file_len(&agent);
    eprintln!(
        "400 keys x 60 KB, max_bytes 1 MiB: {accepted} accepted, {refused} refused, file {len} bytes"
    );
    assert!(refused > 0, "every key was taken: file {len} bytes");
    assert!(message.contains("latest values"), "which bound: {message}");
    assert!(
        len <= file_bound(max),
        "store file {len} bytes > {}",
        file_bound(max)
    );
    let s = status(&agent);
    let state = s["queue"]["state_bytes"].as_u64().expect("state_bytes");
    let bytes = s["queue"]["bytes"].as_u64().unwrap();
    assert!(state + bytes <= max, "{s:#}");
    assert!(state <= max / 2, "{s:#}");
    assert_eq!(s["counters"]["rejected"], refused, "{s:#}");

    // An existing key is still reported (drop-oldest makes room in the queue).
    for i in 0..20 {
        let r = agent
            .request(&json!({"op": "report", "changes": [{"key": "k0", "value": big(1000 + i)}]}));
        assert_eq!(r["ok"], true, "{r}");
    }
    assert!(file_len(&agent) <= file_bound(max));

    // The broker appears: the queue drains.
    agent.stop();
    let broker = RumqttdBroker::start(&pki, RumqttdOptions::default()).unwrap();
    let _cloud = Cloud::start(&pki, broker.tls_port, "edgesync/bound-keys/#", false);
    retarget(
        &mut agent,
        tls_agent(&pki, broker.tls_port, "")
            .max_bytes("1MiB")
            .when_full("drop-oldest"),
    );
    agent.launch();
    common::wait_until("the queue drained", DEADLINE, || agent.depth() == 0);
    let r = agent.request(&json!({"op": "report", "changes": [{"key": "k1", "value": 1}]}));
    assert_eq!(r["ok"], true, "{r}");
    assert!(file_len(&agent) <= file_bound(max));
}

/// Item 6, desired documents: 40 documents, each with a new 60 KB key, against
/// `max_bytes = "4MiB"` with an empty queue. Before the fix the desired state and its
/// history were not counted: a 39 MB file. Now they count against `max_bytes` (with the
/// latest values, at most half of it): a key that would pass the bound is `rejected` with a
/// clear error in the document's result, the file stays within the documented bound, and the
/// agent keeps working (reports and later documents of existing keys).
#[test]
fn desired_documents_with_new_keys_cannot_grow_the_store_past_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let device = "bound-desired";
    let pki = pki(dir.path(), device);
    let max: u64 = 4 << 20;
    let (broker, cloud) = broker_and_cloud(&pki, device);
    let agent = Agent::start(tls_agent(&pki, broker.tls_port, "").max_bytes("4MiB"));
    common::wait_until("online", DEADLINE, || {
        status(&agent)["connection"]["state"] == "online"
    });
    let topic = format!("edgesync/{device}/desired");
    let big = |i: u64| json!(format!("{i:05}{}", "y".repeat(60_000)));
    let mut rejected = 0;
    let mut error = String::new();
    for v in 1..=40u64 {
        let doc = json!({"version": v, "state": {format!("d{v}"): big(v)}});
        let pick = |m: &common::cloud::Msg| {
            if !m.topic.ends_with("/desired/result") {
                return None;
            }
            let r = common::cloud::decode(&m.payload);
            (r["version"] == v).then_some(r)
        };
        let what = format!("the result of version {v}");
        // The first one again until the agent's subscription is in place (a repeat is a
        // duplicate, answered the same).
        let r = if v == 1 {
            cloud.publish_until(&topic, doc.to_string().as_bytes(), &what, pick)
        } else {
            cloud.publish(&topic, doc.to_string().into_bytes(), false);
            cloud.wait_for(&what, pick)
        };
        let key = &r["keys"][format!("d{v}")];
        if key["status"] != "applied" {
            assert_eq!(key["status"], "rejected", "{r}");
            error = key["error"].as_str().unwrap_or_default().to_owned();
            rejected += 1;
        }
    }
    let len = file_len(&agent);
    eprintln!("40 desired keys x 60 KB, max_bytes 4 MiB: {rejected} rejected, file {len} bytes");
    assert!(rejected > 0, "every key was applied: file {len} bytes");
    assert!(error.contains("store-full"), "{error}");
    assert!(
        len <= file_bound(max),
        "store file {len} bytes > {}",
        file_bound(max)
    );
    let s = status(&agent);
    let state = s["queue"]["state_bytes"].as_u64().expect("state_bytes");
    assert!(
        state + s["queue"]["bytes"].as_u64().unwrap() <= max,
        "{s:#}"
    );

    // The agent keeps working: an applied key changes again, a local report goes out.
    let doc = json!({"version": 41, "state": {"d1": "small"}});
    cloud.publish(&topic, doc.to_string().into_bytes(), false);
    cloud.wait_result(41, "applied");
    let r = agent.request(&json!({"op": "report", "changes": [{"key": "local", "value": 7}]}));
    assert_eq!(r["ok"], true, "{r}");
    cloud.wait_change("local", &json!(7), None);
    common::wait_until("the queue drained", DEADLINE, || agent.depth() == 0);
    assert!(file_len(&agent) <= file_bound(max));
}
