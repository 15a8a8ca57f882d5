//! Broker faults (issue #7 part 4): Mosquitto killed and restarted again and again while the
//! agent drains a backlog and a driver keeps reporting, with persistence (graceful restart:
//! the agent's session is present again) and without (SIGKILL: the session is gone).
//!
//! Checks: nothing acknowledged is lost (ledger vs. a persistent QoS 1 subscriber); the
//! agent never sends a PUBLISH with DUP set (Mosquitto's debug log shows the flag of every
//! PUBLISH it receives: the agent resends from its outbox as fresh PUBLISHes, never through
//! rumqttc's in-memory retry); and no reconnect storm (connection attempts are counted at
//! the proxy in front of the broker).
//!
//! `EDGESYNC_CHAOS_BROKER_RESTARTS` (default 25 per mode, 50 in all) sets the number of
//! restarts per mode; `.ci/soak` runs more.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::Agent;
use common::chaos::{Driver, Ledger, Recorder, agent_options, check, env_u64, seed};
use common::cloud::{pki, wait};
use edgesync_testkit::{FaultProxy, Mosquitto, MosquittoOptions};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(60);

fn online(agent: &Agent) -> bool {
    agent.status()["connection"]["state"] == "online"
}

/// `restarts` broker restarts mid-drain; `persistence` picks graceful restarts with a saved
/// session (session present) or SIGKILL without persistence (no session).
fn broker_restarts(persistence: bool) {
    let restarts = env_u64("EDGESYNC_CHAOS_BROKER_RESTARTS", 25);
    let name = format!("broker_restarts(persistence={persistence})");
    let seed = seed(&name);
    let dir = tempfile::tempdir().unwrap();
    let device = format!("chaos-broker-{persistence}");
    let pki = pki(dir.path(), &device);
    let Some(mut mosq) = Mosquitto::start(
        &pki,
        MosquittoOptions {
            persistence,
            // Debug level logs every PUBLISH with its DUP flag ("Received PUBLISH from ID (d1, ...").
            extra_config: vec!["log_type debug".into()],
            ..MosquittoOptions::default()
        },
    )
    .unwrap() else {
        return;
    };
    let proxy = FaultProxy::start(mosq.tls_addr()).unwrap();
    let rec = Recorder::start(&pki, mosq.tls_port, &device);
    proxy.cut();
    let agent = Agent::start(agent_options(
        &pki,
        proxy.port(),
        "keep_alive = \"5s\"\nreconnect_initial = \"200ms\"\nreconnect_max = \"1s\"\n",
    ));
    let ledger = Ledger::create(&dir.path().join("ledger.ndjson"));
    // A backlog, so a drain is under way at every restart, and a driver adding to it.
    for r in 0..20 {
        let changes: Vec<(String, Value)> = (0..500)
            .map(|i| {
                (
                    format!("b{}", i % 50),
                    json!({"pad": "x".repeat(60), "r": r, "i": i}),
                )
            })
            .collect();
        let req = json!({"op": "report", "changes": changes
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect::<Vec<_>>()});
        let a = agent.request(&req);
        assert_eq!(a["ok"], true, "{a}");
        ledger.ack(a["first_seq"].as_u64().unwrap(), &changes);
    }
    let driver = Driver::start(&agent.socket, &ledger, 1, seed);
    // A slow link keeps the drain going across the restarts.
    proxy.bandwidth(300_000);
    proxy.restore();

    let mut after_restore = Vec::new();
    let mut mid_drain = 0;
    let started = Instant::now();
    for _ in 0..restarts {
        let seen = rec.received();
        wait("drain progress", DEADLINE, || rec.received() > seen);
        if agent.depth() > 0 {
            mid_drain += 1;
        }
        // The agent is held back until the subscriber is back, so nothing reaches a broker
        // without a subscriber (that loss would be the test's, not the agent's).
        proxy.cut();
        let ready = rec.ready_count();
        if persistence {
            mosq.restart().unwrap();
        } else {
            mosq.stop().unwrap();
            mosq.start_again().unwrap();
        }
        wait("subscriber back", DEADLINE, || rec.ready_count() > ready);
        wait("agent offline", DEADLINE, || !online(&agent));
        let attempts = proxy.connections_accepted();
        proxy.restore();
        wait("agent online again", DEADLINE, || online(&agent));
        after_restore.push(proxy.connections_accepted() - attempts);
    }
    let took = started.elapsed();
    driver.stop();
    proxy.bandwidth(0);
    rec.wait_for_ledger(&ledger, Duration::from_secs(180));
    wait("queue drained", Duration::from_secs(180), || {
        agent.depth() == 0
    });
    let v = check(&ledger, &rec);
    let status = agent.status();

    // DUP: every PUBLISH the broker received from the agent.
    let log = mosq.log();
    let from_agent = format!("Received PUBLISH from {device} (");
    let publishes = log.matches(&from_agent).count();
    let dup = log.matches(&format!("{from_agent}d1")).count();
    let connects = log
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&format!(" as {device} ")))
        .count();
    let agent_log = agent.log();
    let resumed = agent_log.matches("(session present: true)").count();
    let fresh = agent_log.matches("(session present: false)").count();
    let max_after = after_restore.iter().copied().max().unwrap_or(0);
    let mean_after = after_restore.iter().sum::<u64>() as f64 / after_restore.len().max(1) as f64;
    eprintln!(
        "{name}: {restarts} restarts in {took:.1?} ({mid_drain} with a backlog); connection attempts after each restore: mean {mean_after:.2}, max {max_after}; \
         {connects} successful connects in the broker log (session present {resumed}, not {fresh}); {publishes} PUBLISHes from the agent, {dup} with DUP; subscriber got {} DUP-flagged batches (broker redeliveries); \
         reconnects {}, resent {}; {}",
        rec.dup_flagged(),
        status["counters"]["reconnects"],
        status["counters"]["resent"],
        v.summary()
    );
    v.assert_ok();
    assert!(publishes > 0, "no PUBLISH from {device} in the broker log");
    assert_eq!(dup, 0, "the agent sent PUBLISHes with DUP set");
    assert!(
        mid_drain * 2 >= restarts,
        "most restarts hit a backlog: {mid_drain}/{restarts}"
    );
    // No storm (docs/RELIABILITY.md §4): once the broker is back, the agent connects at its
    // next backoff step, once. While the proxy is cut its attempts are refused at once and
    // counted before the restore.
    assert!(
        after_restore.iter().all(|&n| n == 1),
        "connection attempts after each restore, 1 each: {after_restore:?}"
    );
    // One successful connect per restart, plus the first.
    let want = usize::try_from(restarts).unwrap() + 1;
    assert_eq!(
        connects, want,
        "{connects} connects in the broker log for {restarts} restarts"
    );
    // The session is present after every graceful restart with persistence (only the
    // first connect makes it), and never without.
    if persistence {
        assert_eq!(
            (resumed, fresh),
            (want - 1, 1),
            "session present after every graceful restart: resumed {resumed}, fresh {fresh}"
        );
    } else {
        assert_eq!(
            (resumed, fresh),
            (0, want),
            "a session survived a broker without persistence: resumed {resumed}, fresh {fresh}"
        );
    }
}

#[test]
fn broker_restarts_with_persistence_lose_nothing_and_never_send_dup() {
    broker_restarts(true);
}

#[test]
fn broker_kills_without_persistence_lose_nothing_and_never_send_dup() {
    broker_restarts(false);
}
