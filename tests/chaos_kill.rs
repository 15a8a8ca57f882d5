//! Kill loop (issue #7 part 1): the agent is killed with SIGKILL at random moments while a
//! driver reports changes and the queue drains to Mosquitto; an independent ledger of what
//! was acknowledged is checked against what a persistent QoS 1 subscriber received.
//!
//! `EDGESYNC_CHAOS_KILLS` (default 50) sets the number of kills, `EDGESYNC_CHAOS_SEED` the
//! schedule. `.ci/soak` runs 1,000.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::chaos::{Driver, Ledger, Recorder, agent_options, check, env_u64, seed};
use common::cloud::pki;
use common::{Agent, Rng};
use edgesync_testkit::{Mosquitto, MosquittoOptions};

#[test]
fn kill_loop_loses_no_acknowledged_change() {
    let kills = env_u64("EDGESYNC_CHAOS_KILLS", 50);
    let seed = seed("kill_loop");
    let dir = tempfile::tempdir().unwrap();
    let device = "chaos-kill";
    let pki = pki(dir.path(), device);
    // Mosquitto: rumqttd 0.20 stops serving after a few hundred killed clients.
    let Some(mosq) = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap() else {
        return;
    };
    let rec = Recorder::start(&pki, mosq.tls_port, device);
    let mut agent = Agent::start(agent_options(
        &pki,
        mosq.tls_port,
        "keep_alive = \"5s\"\nreconnect_initial = \"100ms\"\nreconnect_max = \"1s\"\n",
    ));
    let ledger = Ledger::create(&dir.path().join("ledger.ndjson"));
    let driver = Driver::start(&agent.socket, &ledger, 2, seed);
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut restart_total = Duration::ZERO;
    for i in 0..kills {
        // The fault schedule, not a wait for an event: kill at a random moment.
        std::thread::sleep(Duration::from_millis(rng.range(0, 2000)));
        agent.kill9();
        // The store must open every time: restart() fails if the daemon does not serve.
        let t = Instant::now();
        agent.restart();
        restart_total += t.elapsed();
        if (i + 1) % 100 == 0 {
            eprintln!(
                "kill_loop: {} kills, {} acknowledged, {} delivered, {:.0?}",
                i + 1,
                ledger.acked_len(),
                rec.distinct(),
                started.elapsed()
            );
        }
    }
    driver.stop();
    let loop_took = started.elapsed();
    rec.wait_for_ledger(&ledger, Duration::from_secs(180));
    common::cloud::wait("queue drained", Duration::from_secs(180), || {
        agent.depth() == 0
    });
    let v = check(&ledger, &rec);
    eprintln!(
        "kill_loop: {kills} kills in {loop_took:.1?} (restart to serving: mean {:.0?}); {}",
        restart_total / u32::try_from(kills.max(1)).unwrap(),
        v.summary()
    );
    v.assert_ok();
    assert!(v.acked > 0, "the driver got nothing acknowledged");
}
