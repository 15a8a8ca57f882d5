//! Hardening of the local side (issue 13 items 1, 10, 14 and 15) against the real binary:
//! clients that never read their answers, idle connections at the client limit, a stalled
//! daemon, a closed stdout pipe, and option-like keys substituted into handler commands.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::chaos::cpu_ticks;
use common::{Agent, AgentOptions, Conn, report_req};
use serde_json::{Value, json};

/// A field of `/proc/PID/status` in KiB (`VmRSS:`, `VmHWM:`).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Waits until `pid` has used (almost) no CPU for a whole second: it has done all the work
/// it will do on its own.
fn wait_quiet(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut since = Instant::now();
    let mut last = cpu_ticks(pid);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = cpu_ticks(pid);
        if now > last + 1 {
            since = Instant::now();
            last = now;
        } else if since.elapsed() >= Duration::from_secs(1) {
            return;
        }
        assert!(Instant::now() < deadline, "the daemon never went quiet");
    }
}

/// Item 1: 20 keys of 60 KB reported, then 2 connections pipeline 300 `get reported` each
/// and do not read. The daemon stops reading them once their unwritten answers fill their
/// share, so its memory stays bounded; when they read, every answer comes, in order.
#[test]
fn clients_that_do_not_read_their_answers_cannot_grow_memory() {
    const KEYS: usize = 20;
    const GETS: usize = 300;
    let agent = Agent::start(AgentOptions::default().max_bytes("64MiB"));
    let big = "x".repeat(60_000);
    let keys: Vec<String> = (0..KEYS).map(|i| format!("k{i}")).collect();
    // 5 keys per report: a request line holds at most 1 MiB.
    for chunk in keys.chunks(5) {
        let r = agent.request(&report_req(
            chunk.iter().map(|k| (k.as_str(), json!(big.clone()))),
        ));
        assert_eq!(r["ok"], true, "{r}");
    }
    let pid = agent.pid();
    let before = proc_kib(pid, "VmHWM:");
    // Even requests ask for the whole document (1.2 MB), odd ones for one key: the key
    // named in an answer shows its place in the order.
    let reqs: Vec<Value> = (0..GETS)
        .map(|i| {
            if i % 2 == 0 {
                json!({"op": "get", "doc": "reported"})
            } else {
                json!({"op": "get", "doc": "reported", "key": format!("k{}", (i / 2) % KEYS)})
            }
        })
        .collect();
    let mut conns: Vec<Conn> = (0..2).map(|_| agent.connect()).collect();
    for c in &mut conns {
        c.send_all(&reqs).unwrap();
    }
    wait_quiet(pid, Duration::from_secs(120));
    let peak = proc_kib(pid, "VmHWM:");
    eprintln!(
        "unread answers: 2 connections x {GETS} get of {KEYS} keys x 60 KB: peak RSS {peak} KiB \
         (before the attack {before} KiB)"
    );
    // Without the bound: ~360 MB of queued answers.
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
    for c in &mut conns {
        for i in 0..GETS {
            let a = c.recv().unwrap();
            assert_eq!(a["ok"], true, "answer {i}");
            let state = a["state"].as_object().unwrap();
            if i % 2 == 0 {
                assert_eq!(state.len(), KEYS, "answer {i}");
            } else {
                let key = format!("k{}", (i / 2) % KEYS);
                assert_eq!(state.keys().collect::<Vec<_>>(), vec![&key], "answer {i}");
                assert_eq!(state[&key].as_str().unwrap().len(), big.len());
            }
        }
    }
    // The daemon serves everyone still.
    assert_eq!(agent.status()["ok"], true);
}
