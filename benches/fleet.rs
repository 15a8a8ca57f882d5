//! A fleet on one machine (issue 20; docs/FLEET.md): N agents (separate processes, stores and
//! certificates from one test CA) on the test kit's clustered broker (three Aedes nodes
//! sharing Redis), each reporting one change every `1/RATE` s, a back end on node 0
//! deduplicating by `(device, seq)`.
//!
//! `cargo bench --bench fleet` runs the matrix docs/FLEET.md quotes (about 15 min): the
//! defaults with 500 agents three times, the cap of before issue 20 (`reconnect_max` 2 min)
//! and no jitter once each, and 1,000 agents. Any of `--agents N`, `--rate R`,
//! `--outage SECS`, `--no-jitter`, `--reconnect-initial DURATION`, `--reconnect-max DURATION`
//! makes it one run of those settings instead; `--out DIR` (default `bench-out/fleet`);
//! `--charts FLEET_JSON` redraws the comparison charts of an earlier matrix.
//!
//! Phases: the fleet starts and connects; idle (per-agent RSS and CPU); steady rate (the
//! same, plus broker-side publishes/s); the busiest node other than the back end's killed
//! mid-traffic (connections per 100 ms over the surviving nodes: the reconnect storm; time
//! until every agent is back and until every queue is empty); the whole cluster down for
//! `--outage` s while the fleet queues, then started again (connections per second, time until
//! back and drained); a desired document to every device; a `ping` to every device; the
//! count of acknowledged changes the back end never got (must be 0). Writes `fleet.json`
//! (every run), a summary table and the storm charts (SVG, per run) to `--out`.

mod common;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use edgesync_testkit::fleet::{Backend, Fleet, FleetOptions, Reporter, Scenario, fronted, now_ms};
use edgesync_testkit::{Cluster, Sharing, TestPki};
use serde_json::{Value, json};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Clone)]
struct Args {
    agents: usize,
    rate: f64,
    outage: u64,
    jitter: bool,
    /// `mqtt.reconnect_max`, when not the default.
    reconnect_max: Option<String>,
    /// `mqtt.reconnect_initial`, when not the default.
    reconnect_initial: Option<String>,
    out: PathBuf,
    /// A run option was given: that one run, not the matrix.
    single: bool,
}

fn args() -> Args {
    let mut a = Args {
        agents: 500,
        rate: 1.0,
        outage: 30,
        jitter: true,
        reconnect_max: None,
        reconnect_initial: None,
        out: PathBuf::from("bench-out/fleet"),
        single: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(w) = it.next() {
        match w.as_str() {
            "--agents" => a.agents = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.agents),
            "--rate" => a.rate = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.rate),
            "--outage" => a.outage = it.next().and_then(|v| v.parse().ok()).unwrap_or(a.outage),
            "--no-jitter" => a.jitter = false,
            "--reconnect-max" => a.reconnect_max = it.next(),
            "--reconnect-initial" => a.reconnect_initial = it.next(),
            "--out" => {
                a.out = it.next().map(PathBuf::from).unwrap_or(a.out);
                continue;
            }
            _ => continue,
        }
        a.single = true;
    }
    a
}

/// Per-agent RSS (MiB) and CPU (% of one core) over `window`: medians and maxima.
fn sample(fleet: &Fleet, window: Duration) -> Value {
    let tick = 100.0; // USER_HZ on Linux
    let before: Vec<Option<u64>> = fleet.agents.iter().map(|a| a.cpu_ticks()).collect();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let secs = t0.elapsed().as_secs_f64();
    let mut cpu: Vec<f64> = fleet
        .agents
        .iter()
        .zip(before)
        .filter_map(|(a, b)| Some((a.cpu_ticks()? - b?) as f64 / tick / secs * 100.0))
        .collect();
    let mut rss: Vec<f64> = fleet
        .agents
        .iter()
        .filter_map(|a| Some(a.rss_kib()? as f64 / 1024.0))
        .collect();
    cpu.sort_by(f64::total_cmp);
    rss.sort_by(f64::total_cmp);
    let total_rss: f64 = rss.iter().sum();
    let total_cpu: f64 = cpu.iter().sum();
    json!({
        "rss_mib_median": round2(common::median(&rss)),
        "rss_mib_max": round2(rss.last().copied().unwrap_or(0.0)),
        "rss_mib_total": round2(total_rss),
        "cpu_pct_median": round2(common::median(&cpu)),
        "cpu_pct_max": round2(cpu.last().copied().unwrap_or(0.0)),
        "cpu_pct_total": round2(total_cpu),
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Connections to every node from `from_ms` for `span_ms`, counted per `bucket_ms`.
fn buckets(cluster: &Cluster, from_ms: u64, span_ms: u64, bucket_ms: u64) -> Vec<u64> {
    let mut b = vec![0u64; usize::try_from(span_ms / bucket_ms).unwrap_or(0)];
    for i in 0..cluster.len() {
        for t in cluster.connects(i) {
            let Some(d) = t.checked_sub(from_ms) else {
                continue;
            };
            if let Some(n) = b.get_mut(usize::try_from(d / bucket_ms).unwrap_or(usize::MAX)) {
                *n += 1;
            }
        }
    }
    b
}

/// Broker-side publishes per second (summed over the nodes) between two Unix ms.
fn broker_rate(cluster: &Cluster, from_ms: u64, to_ms: u64) -> f64 {
    let mut per_node = Vec::new();
    for i in 0..cluster.len() {
        let s: Vec<u64> = cluster
            .stats(i)
            .into_iter()
            .filter(|(t, _, _)| *t > from_ms && *t <= to_ms)
            .map(|(_, p, _)| p)
            .collect();
        if !s.is_empty() {
            per_node.push(s.iter().sum::<u64>() as f64 / s.len() as f64);
        }
    }
    per_node.iter().sum()
}

/// Bar charts of connection counts (one bar per `bucket_ms`), one panel per series, stacked
/// on one scale (the same y maximum and time span) so they compare at a glance; as SVG.
fn svg(title: &str, panels: &[(String, Vec<u64>)], bucket_ms: u64, unit: &str) -> String {
    let (w, ph, left, bottom, top) = (720.0, 170.0, 50.0, 30.0, 24.0);
    let h = 24.0 + ph * panels.len() as f64;
    let max = panels
        .iter()
        .flat_map(|(_, c)| c.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let len = panels
        .iter()
        .map(|(_, c)| c.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let bw = (w - left - 10.0) / len as f64;
    let plot = ph - bottom - top;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{left}\" y=\"16\" font-size=\"13\">{title}</text>"
    );
    for (p, (label, counts)) in panels.iter().enumerate() {
        let y0 = 24.0 + ph * p as f64 + top + plot;
        let _ = write!(
            s,
            "<text x=\"{left}\" y=\"{:.1}\" font-size=\"12\">{label}</text>",
            y0 - plot - 6.0
        );
        for (i, &c) in counts.iter().enumerate() {
            let bh = c as f64 / max * plot;
            let _ = write!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#3b6ea5\"/>",
                left + i as f64 * bw,
                y0 - bh,
                (bw - 1.0).max(0.5)
            );
        }
        // Axes: y at 0 and max, x every tenth of the span.
        let _ = write!(
            s,
            "<line x1=\"{left}\" y1=\"{y0:.1}\" x2=\"{x1}\" y2=\"{y0:.1}\" stroke=\"black\"/>\
             <text x=\"{lx}\" y=\"{y0:.1}\" text-anchor=\"end\">0</text>\
             <text x=\"{lx}\" y=\"{ytop:.1}\" text-anchor=\"end\">{max}</text>\
             <text x=\"5\" y=\"{ymid:.1}\">{unit}</text>",
            x1 = w - 10.0,
            lx = left - 4.0,
            ytop = y0 - plot + 4.0,
            ymid = y0 - plot / 2.0,
        );
        let step = (len / 10).max(1);
        for i in (0..=len).step_by(step) {
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.1} s</text>",
                left + i as f64 * bw,
                y0 + 14.0,
                (i as u64 * bucket_ms) as f64 / 1000.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// The matrix's comparison charts: after a node death, with and without jitter; after the
/// cluster outage, the cap of before issue 20, the default and no jitter.
fn compare_charts(results: &[Value], out: &std::path::Path) -> Res<()> {
    let find = |tag: &str| results.iter().rev().find(|r| r["tag"] == tag);
    let series = |r: &Value, k: &str, f: &str| -> Vec<u64> {
        r[k][f]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    };
    let mut node = Vec::new();
    let mut outage = Vec::new();
    for (tag, label) in [
        (
            "jitter-max-2m-500",
            "reconnect_max 2 min (the default before issue 20), full jitter",
        ),
        (
            "jitter-500",
            "defaults: reconnect_initial 1 s, reconnect_max 30 s, full jitter",
        ),
        ("no-jitter-500", "reconnect_jitter = \"none\""),
    ] {
        let Some(r) = find(tag) else { continue };
        if tag != "jitter-max-2m-500" {
            node.push((
                label.to_owned(),
                series(r, "node_death", "connections_per_100ms"),
            ));
        }
        outage.push((
            label.to_owned(),
            series(r, "cluster_outage", "connections_per_s"),
        ));
    }
    if let Some(r) = find("jitter-500") {
        let n = r["node_death"]["agents_on_it"].as_u64().unwrap_or(0);
        std::fs::write(
            out.join("storm-node.svg"),
            svg(
                &format!("Connections per 100 ms after a node death ({n} of 500 agents on it)"),
                &node,
                100,
                "conn",
            ),
        )?;
        std::fs::write(
            out.join("storm-outage.svg"),
            svg(
                "Connections per second after a 30 s outage of the whole cluster (500 agents)",
                &outage,
                1000,
                "conn",
            ),
        )?;
    }
    Ok(())
}

fn main() -> Res<()> {
    let a = args();
    std::fs::create_dir_all(&a.out)?;
    // `--charts FLEET_JSON`: redraw the comparison charts of an earlier matrix, run nothing.
    if let Some(p) = std::env::args().skip_while(|w| w != "--charts").nth(1) {
        let results: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(p)?)?;
        return compare_charts(&results, &a.out);
    }
    print!("{}", common::machine());
    let runs: Vec<Args> = if a.single {
        vec![a.clone()]
    } else {
        // The matrix docs/FLEET.md quotes: the defaults at 500 agents three times (medians),
        // the 2-minute cap of before issue 20 and no jitter once each, and 1,000 agents.
        let with = |f: &dyn Fn(&mut Args)| {
            let mut r = a.clone();
            f(&mut r);
            r
        };
        vec![
            a.clone(),
            a.clone(),
            a.clone(),
            with(&|r| r.reconnect_max = Some("2m".into())),
            with(&|r| r.jitter = false),
            with(&|r| r.agents = 1000),
        ]
    };
    let mut results = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        println!("\n--- run {} of {}", i + 1, runs.len());
        results.push(run(r)?);
    }
    summary(&results);
    compare_charts(&results, &a.out)?;
    std::fs::write(
        a.out.join("fleet.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    println!("wrote {}", a.out.display());
    let lost: u64 = results.iter().filter_map(|r| r["lost"].as_u64()).sum();
    if lost > 0 {
        return Err(format!("{lost} acknowledged changes lost").into());
    }
    Ok(())
}

/// The table of every run (kept by `.ci/evidence`: lines starting with `|`).
fn summary(results: &[Value]) {
    println!(
        "\n| agents | settings | online s | RSS MiB (med) | CPU % idle/steady (med) | broker pub/s | node death: agents, back s, drained s, peak conn/100ms | outage: back s, drained s, peak conn/s | desired s | ping s | reported | lost |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in results {
        let d = &r["node_death"];
        let o = &r["cluster_outage"];
        let peak = |v: &Value| {
            v.as_array()
                .and_then(|a| a.iter().filter_map(Value::as_u64).max())
                .unwrap_or(0)
        };
        println!(
            "| {} | {} | {} | {} | {}/{} | {} | {}, {}, {}, {} | {}, {}, {} | {} | {} | {} | {} |",
            r["agents"],
            r["tag"].as_str().unwrap_or(""),
            r["all_online_s"],
            r["steady"]["rss_mib_median"],
            r["idle"]["cpu_pct_median"],
            r["steady"]["cpu_pct_median"],
            r["broker_publishes_per_s"],
            d["agents_on_it"],
            d["all_back_s"],
            d["drained_s"],
            peak(&d["connections_per_100ms"]),
            o["all_back_s"],
            o["drained_s"],
            peak(&o["connections_per_s"]),
            r["desired_fanout_s"],
            r["command_fanout_s"],
            r["reported"],
            r["lost"],
        );
    }
}

fn run(a: &Args) -> Res<Value> {
    let mut tag = if a.jitter { "jitter" } else { "no-jitter" }.to_owned();
    if let Some(m) = &a.reconnect_initial {
        let _ = write!(tag, "-initial-{m}");
    }
    if let Some(m) = &a.reconnect_max {
        let _ = write!(tag, "-max-{m}");
    }
    let _ = write!(tag, "-{}", a.agents);
    println!(
        "fleet: {} agents, {} change/s each, outage {} s, {tag}",
        a.agents, a.rate, a.outage
    );
    let dir = tempfile::Builder::new()
        .prefix("edgesync-fleet-")
        .tempdir()?;
    let pki = TestPki::generate(&dir.path().join("pki"))?;
    let Some(mut cluster) =
        Cluster::start(&pki, &[Sharing::Redis, Sharing::Redis, Sharing::Redis])?
    else {
        return Err("the clustered broker is not available here".into());
    };
    let (proxies, urls) = fronted(&cluster)?;
    let backend = Backend::start(&pki, cluster.addr(0).port(), "edgesync")?;
    let mut mqtt = String::new();
    if !a.jitter {
        mqtt.push_str("reconnect_jitter = \"none\"\n");
    }
    if let Some(m) = &a.reconnect_max {
        let _ = writeln!(mqtt, "reconnect_max = {m:?}");
    }
    if let Some(m) = &a.reconnect_initial {
        let _ = writeln!(mqtt, "reconnect_initial = {m:?}");
    }
    let t0 = Instant::now();
    let fleet = Fleet::start(
        &pki,
        &dir.path().join("fleet"),
        FleetOptions {
            binary: common::daemon_path().into(),
            agents: a.agents,
            urls,
            mqtt_extra: mqtt,
            extra_toml: String::new(),
            env: common::unit_env()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            start_timeout: Duration::from_secs(300),
        },
    )?;
    let started = t0.elapsed();
    let timeout = Duration::from_secs(300);
    let mut s = Scenario {
        cluster: &mut cluster,
        proxies: &proxies,
        fleet: &fleet,
        backend: &backend,
        backend_node: 0,
        timeout,
    };
    s.wait_online()?;
    let online = t0.elapsed();
    let spread = s.spread();
    println!("started in {started:.1?}, all online in {online:.1?}, per node {spread:?}");

    let idle = sample(&fleet, Duration::from_secs(10));
    println!("idle: {idle}");

    let mut reporter = Reporter::start(fleet.sockets(), a.rate)?;
    std::thread::sleep(Duration::from_secs(5));
    let from = now_ms();
    let steady = sample(&fleet, Duration::from_secs(10));
    let to = now_ms();
    let broker_pps = broker_rate(s.cluster, from, to);
    println!("steady: {steady}, broker publishes/s {broker_pps:.0}");

    let death = s.kill_busiest_node(&reporter)?;
    let storm = buckets(s.cluster, death.at_ms, 5_000, 100);
    println!(
        "node {} died with {} agents: all back in {:.2?}, drained in {:.2?}; connections per 100 ms: {storm:?}",
        death.node, death.agents_on_it, death.back_in, death.drained_in
    );
    s.cluster.start_node(death.node)?;

    let (restart_ms, back, drained) = s.cluster_outage(&reporter, Duration::from_secs(a.outage))?;
    let span = u64::try_from(drained.as_millis()).unwrap_or(0).max(1000) + 1000;
    let outage_storm = buckets(s.cluster, restart_ms, span, 1000);
    println!(
        "cluster down {} s: all back in {back:.2?}, drained in {drained:.2?}; connections per s: {outage_storm:?}",
        a.outage
    );

    reporter.stop();
    let (lost, some) = s.lost(&reporter);
    let reported = reporter.total();
    let refused = reporter.refused();
    println!("reported {reported} changes ({refused} refused); lost {lost} {some:?}");

    let desired = s.desired_fanout("edgesync", 1)?;
    let command = s.command_fanout("edgesync", "fleet-ping-1")?;
    println!("desired to every device in {desired:.2?}; ping to every device in {command:.2?}");
    let duplicates = backend.received.lock().map(|g| g.duplicates).unwrap_or(0);

    let report = json!({
        "tag": tag,
        "agents": a.agents,
        "nodes": s.cluster.len(),
        "rate_per_agent": a.rate,
        "jitter": a.jitter,
        "reconnect_max": a.reconnect_max.as_deref().unwrap_or("default"),
        "reconnect_initial": a.reconnect_initial.as_deref().unwrap_or("default"),
        "start_s": round2(started.as_secs_f64()),
        "all_online_s": round2(online.as_secs_f64()),
        "spread": spread,
        "idle": idle,
        "steady": steady,
        "broker_publishes_per_s": broker_pps.round(),
        "node_death": {
            "node": death.node,
            "agents_on_it": death.agents_on_it,
            "all_back_s": round2(death.back_in.as_secs_f64()),
            "drained_s": round2(death.drained_in.as_secs_f64()),
            "connections_per_100ms": storm,
        },
        "cluster_outage": {
            "down_s": a.outage,
            "all_back_s": round2(back.as_secs_f64()),
            "drained_s": round2(drained.as_secs_f64()),
            "connections_per_s": outage_storm,
        },
        "desired_fanout_s": round2(desired.as_secs_f64()),
        "command_fanout_s": round2(command.as_secs_f64()),
        "reported": reported,
        "refused": refused,
        "duplicates": duplicates,
        "lost": lost,
    });
    std::fs::write(
        a.out.join(format!("storm-node-{tag}.svg")),
        svg(
            &format!(
                "Reconnections after a node death ({} agents on it, {tag}), per 100 ms",
                death.agents_on_it
            ),
            &[(String::new(), storm.clone())],
            100,
            "conn",
        ),
    )?;
    std::fs::write(
        a.out.join(format!("storm-cluster-{tag}.svg")),
        svg(
            &format!(
                "Reconnections after a {} s cluster outage ({} agents, {tag}), per second",
                a.outage, a.agents
            ),
            &[(String::new(), outage_storm.clone())],
            1000,
            "conn",
        ),
    )?;
    Ok(report)
}
