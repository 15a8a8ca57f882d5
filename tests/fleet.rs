//! A small fleet (issue 20) with the real binary against the test kit's real clustered broker
//! (three Aedes nodes sharing Redis): every scenario of the fleet bench (`benches/fleet.rs`,
//! docs/FLEET.md) at a size CI runs, each asserting that no acknowledged change is lost:
//! steady traffic, the busiest node killed mid-traffic, the whole cluster down while the fleet
//! queues, a desired document to every device and a command fan-out.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use edgesync_testkit::fleet::{
    Backend, Fleet, FleetOptions, Reporter, Scenario, fronted, wait_for,
};
use edgesync_testkit::{Cluster, Sharing, TestPki};

const AGENTS: usize = 6;
const TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn a_small_fleet_loses_nothing_through_a_node_death_and_a_cluster_outage() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(&dir.path().join("pki")).unwrap();
    let Some(mut cluster) =
        Cluster::start(&pki, &[Sharing::Redis, Sharing::Redis, Sharing::Redis]).unwrap()
    else {
        return;
    };
    // The agents reach each node through a proxy: a node's links are frozen before it dies
    // (see `Scenario`).
    let (proxies, urls) = fronted(&cluster).unwrap();
    let backend = Backend::start(&pki, cluster.addr(0).port(), "edgesync").unwrap();
    let fleet = Fleet::start(
        &pki,
        &dir.path().join("fleet"),
        FleetOptions {
            binary: env!("CARGO_BIN_EXE_edgesync").into(),
            agents: AGENTS,
            urls,
            mqtt_extra:
                "keep_alive = \"5s\"\nreconnect_initial = \"200ms\"\nreconnect_max = \"1s\"\n"
                    .into(),
            extra_toml: String::new(),
            env: Vec::new(),
            start_timeout: TIMEOUT,
        },
    )
    .unwrap();
    let mut s = Scenario {
        cluster: &mut cluster,
        proxies: &proxies,
        fleet: &fleet,
        backend: &backend,
        backend_node: 0,
        timeout: TIMEOUT,
    };
    s.wait_online().unwrap();

    let mut reporter = Reporter::start(fleet.sockets(), 20.0).unwrap();
    wait_for("steady traffic at the back end", TIMEOUT, || {
        backend.distinct() >= 100
    })
    .unwrap();

    let death = s.kill_busiest_node(&reporter).unwrap();
    assert!(death.agents_on_it > 0, "{death:?}");
    assert_eq!(s.spread()[death.node], 0);
    s.cluster.start_node(death.node).unwrap();

    // The whole cluster down while the fleet queues: every agent holds changes.
    let before = reporter.total();
    let (_, back, drained) = s.cluster_outage(&reporter, Duration::from_secs(3)).unwrap();
    assert!(
        reporter.total() > before + AGENTS * 20,
        "the fleet kept queueing"
    );
    assert!(back <= drained);

    reporter.stop();
    assert_eq!(reporter.refused(), 0, "every report was taken");
    let (lost, some) = s.lost(&reporter);
    assert_eq!(lost, 0, "lost {some:?}");

    s.desired_fanout("edgesync", 1).unwrap();
    s.command_fanout("edgesync", "fan-1").unwrap();
}
