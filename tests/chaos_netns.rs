//! Network faults in the kernel (issue #7 part 5): the agent runs in its own network
//! namespace, joined to the host by a veth pair, and reaches Mosquitto on the host side of
//! the pair; `iptables -j DROP` inside the namespace makes the link silent (no FIN, no RST:
//! the kernel drops every packet, TCP retransmits into the void).
//!
//! Needs root, `ip` (iproute2) and `iptables`; skipped with a message otherwise, unless
//! `EDGESYNC_REQUIRE_NETNS=1`, which makes a missing capability a failure.
//!
//! `ip netns exec` bind-mounts `/etc/netns/NAME/hosts` over `/etc/hosts`, so inside the
//! namespace `localhost` is the host end of the pair and the broker's certificate (for
//! `localhost`) verifies as usual.
//!
//! `EDGESYNC_CHAOS_NETNS_OUTAGES` (default 3) and `EDGESYNC_CHAOS_OUTAGE_MAX_MS` (default
//! 3000) size the outages; `EDGESYNC_CHAOS_OFFLINE_SECS` (default 10) the CPU measurement.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs::OpenOptions;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::chaos::{
    Driver, Ledger, Recorder, agent_options, check, clk_tck, cpu_ticks, env_u64, seed,
};
use common::cloud::{pki, wait};
use common::{Agent, Rng, bin_command, try_request};
use edgesync_testkit::{Mosquitto, MosquittoOptions, ServerCert, free_port};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);

/// Runs a command; its output on failure.
fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace with a veth pair to the host; removed on drop.
struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    host_ip: String,
}

impl Netns {
    fn create() -> Result<Netns, String> {
        let id = std::process::id();
        let name = format!("es-chaos-{id}");
        // Interface names: at most 15 bytes.
        let (host_if, ns_if) = (
            format!("esh{}", id % 1_000_000),
            format!("esn{}", id % 1_000_000),
        );
        let net = 20 + id % 200;
        let host_ip = format!("10.231.{net}.1");
        let ns_ip = format!("10.231.{net}.2");
        let hosts_dir = format!("/etc/netns/{name}");
        let ns = Netns {
            name,
            host_if,
            ns_if,
            host_ip,
        };
        let n = ns.name.as_str();
        sh(&["ip", "netns", "add", n])?;
        sh(&[
            "ip",
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ])?;
        sh(&["ip", "link", "set", &ns.ns_if, "netns", n])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ])?;
        sh(&["ip", "link", "set", &ns.host_if, "up"])?;
        sh(&[
            "ip",
            "netns",
            "exec",
            n,
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns.ns_if,
        ])?;
        sh(&[
            "ip", "netns", "exec", n, "ip", "link", "set", &ns.ns_if, "up",
        ])?;
        sh(&["ip", "netns", "exec", n, "ip", "link", "set", "lo", "up"])?;
        std::fs::create_dir_all(&hosts_dir).map_err(|e| format!("{hosts_dir}: {e}"))?;
        std::fs::write(
            format!("{hosts_dir}/hosts"),
            format!("{} localhost\n", ns.host_ip),
        )
        .map_err(|e| format!("{hosts_dir}/hosts: {e}"))?;
        // iptables works in the namespace (nft or legacy backend present and allowed).
        sh(&["ip", "netns", "exec", n, "iptables", "-L", "-n"])?;
        Ok(ns)
    }

    /// Drops every packet through the namespace's end of the pair, both ways.
    fn drop_all(&self) {
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            let n = self.name.as_str();
            sh(&[
                "ip",
                "netns",
                "exec",
                n,
                "iptables",
                "-A",
                chain,
                dir,
                &self.ns_if,
                "-j",
                "DROP",
            ])
            .unwrap();
        }
    }

    fn restore(&self) {
        sh(&["ip", "netns", "exec", &self.name, "iptables", "-F"]).unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
        let _ = sh(&["ip", "link", "del", &self.host_if]);
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

/// The agent's daemon, started inside the namespace (its socket is a file: reachable from
/// the host). Killed on drop.
struct NsDaemon(Child);

impl Drop for NsDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn online(agent: &Agent) -> bool {
    agent.status()["connection"]["state"] == "online"
}

#[test]
fn iptables_drop_in_a_namespace_silent_link_outages_and_offline_cpu() {
    let require = std::env::var("EDGESYNC_REQUIRE_NETNS").as_deref() == Ok("1");
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(e) if !require => {
            eprintln!(
                "network namespaces not usable here ({e}): skipping (needs root, iproute2, iptables; \
                 EDGESYNC_REQUIRE_NETNS=1 makes this a failure)"
            );
            return;
        }
        Err(e) => panic!("EDGESYNC_REQUIRE_NETNS=1 but network namespaces are not usable: {e}"),
    };
    let outages = env_u64("EDGESYNC_CHAOS_NETNS_OUTAGES", 3);
    let max_ms = env_u64("EDGESYNC_CHAOS_OUTAGE_MAX_MS", 3000).max(1000);
    let secs = env_u64("EDGESYNC_CHAOS_OFFLINE_SECS", 10);
    let seed = seed("netns");
    let dir = tempfile::tempdir().unwrap();
    let device = "chaos-netns";
    let pki = pki(dir.path(), device);
    let veth_port = free_port();
    let (cert, key) = pki.server_pair(ServerCert::Good);
    let Some(mosq) = Mosquitto::start(
        &pki,
        MosquittoOptions {
            extra_config: vec![
                format!("\nlistener {veth_port} {}", ns.host_ip),
                format!("cafile {}", pki.ca.display()),
                format!("certfile {}", cert.display()),
                format!("keyfile {}", key.display()),
                "require_certificate true".into(),
                "use_identity_as_username true".into(),
            ],
            ..MosquittoOptions::default()
        },
    )
    .unwrap() else {
        return;
    };
    let rec = Recorder::start(&pki, mosq.tls_port, device);
    let agent = Agent::prepare(agent_options(
        &pki,
        veth_port,
        "keep_alive = \"5s\"\nreconnect_initial = \"100ms\"\nreconnect_max = \"1s\"\n",
    ));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&agent.log_path)
        .unwrap();
    // The binary under test (through EDGESYNC_TEST_RUNNER if set), inside the namespace.
    let bin = bin_command();
    let daemon = NsDaemon(
        Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(bin.get_program())
            .args(bin.get_args())
            .args(["run", "--config"])
            .arg(&agent.config_path)
            .env_remove("EDGESYNC_CONFIG")
            .env_remove("EDGESYNC_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // `ip netns exec` execs the agent: same PID.
    let pid = daemon.0.id();
    wait("daemon serving", DEADLINE, || {
        try_request(&agent.socket, &json!({"op": "status"})).is_ok_and(|v| v["ok"] == true)
    });
    wait("online through the veth pair", DEADLINE, || online(&agent));

    // 1. A silent link is detected within 1.5 x keep_alive.
    let t0 = Instant::now();
    ns.drop_all();
    wait("offline", Duration::from_secs(30), || !online(&agent));
    let detected = t0.elapsed();
    let err = agent.status()["connection"]["last_error"].clone();
    assert!(
        err.as_str().unwrap_or("").contains("link considered dead"),
        "{err}"
    );

    // 2. CPU while offline (every packet dropped: connects hang until their timeout).
    let (c0, w0) = (cpu_ticks(pid), Instant::now());
    // A measurement window, not a wait for an event.
    thread::sleep(Duration::from_secs(secs));
    let (ticks, wall) = (cpu_ticks(pid) - c0, w0.elapsed());
    let share = ticks as f64 / clk_tck() as f64 / wall.as_secs_f64();
    ns.restore();
    wait("online after the drop", DEADLINE, || online(&agent));

    // 3. Outages under load: nothing acknowledged is lost.
    let ledger = Ledger::create(&dir.path().join("ledger.ndjson"));
    let driver = Driver::start(&agent.socket, &ledger, 2, seed);
    let mut rng = Rng::new(seed);
    for _ in 0..outages {
        let seen = rec.received();
        wait("delivery between outages", DEADLINE, || {
            rec.received() > seen + 20
        });
        ns.drop_all();
        // The outage's length is the fault schedule, not a wait for an event.
        thread::sleep(Duration::from_millis(rng.range(1000, max_ms)));
        ns.restore();
        wait("online after the outage", DEADLINE, || online(&agent));
    }
    driver.stop();
    rec.wait_for_ledger(&ledger, Duration::from_secs(180));
    wait("queue drained", Duration::from_secs(180), || {
        agent.depth() == 0
    });
    let v = check(&ledger, &rec);
    eprintln!(
        "netns: silent link detected after {detected:.2?} (keep_alive 5 s, limit 7.5 s); offline CPU {ticks} ticks in {wall:.1?} = {:.3} %; {outages} outages of 1-{max_ms} ms: {}",
        share * 100.0,
        v.summary()
    );
    v.assert_ok();
    assert!(
        detected <= Duration::from_millis(7500 + 1500),
        "silent link detected after {detected:?}"
    );
    assert!(share < 0.01, "{:.2} % CPU while offline", share * 100.0);
    drop(daemon);
}
