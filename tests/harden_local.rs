//! Hardening of the local side (issue 13 items 1, 10, 14 and 15) against the real binary:
//! clients that never read their answers, idle connections at the client limit, a stalled
//! daemon, a closed stdout pipe, and option-like keys substituted into handler commands.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::chaos::cpu_ticks;
use std::process::Stdio;

use common::{
    Agent, AgentOptions, Conn, assert_exit, cli_command, proc_status_kib, report_req,
    run_with_timeout, stderr, wait_timeout, wait_until,
};
use serde_json::{Value, json};

/// Waits until `pid` has used (almost) no CPU for two seconds (at most 2 clock ticks, where
/// a busy process, even starved by parallel tests, uses tens): it has done all the work it
/// will do on its own.
fn wait_quiet(pid: u32, timeout: Duration) {
    const WINDOW: usize = 20; // samples 100 ms apart
    let deadline = Instant::now() + timeout;
    let mut samples = std::collections::VecDeque::from([cpu_ticks(pid)]);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        samples.push_back(cpu_ticks(pid));
        if samples.len() > WINDOW {
            samples.pop_front();
            if samples.back().unwrap() - samples.front().unwrap() <= 2 {
                return;
            }
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
    let before = proc_status_kib(pid, "VmHWM:");
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
    let peak = proc_status_kib(pid, "VmHWM:");
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

/// Item 10: 600 idle connections (more than the 512 served at once) do not keep `status` and
/// `report` out: the longest-idle connections are closed to admit new clients.
#[test]
fn idle_connections_cannot_keep_new_clients_out() {
    let agent = Agent::start(AgentOptions::default());
    let idle: Vec<Conn> = (0..600).map(|_| agent.connect()).collect();
    let started = Instant::now();
    let out = run_with_timeout(
        cli_command(&agent.config_path, &["status"]),
        None,
        Duration::from_secs(20),
    );
    assert_exit(&out, 0);
    let out = run_with_timeout(
        cli_command(&agent.config_path, &["report", "t=1"]),
        None,
        Duration::from_secs(20),
    );
    assert_exit(&out, 0);
    let took = started.elapsed();
    eprintln!("600 idle connections: status and report answered in {took:.1?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    drop(idle);
}

/// Item 10: a connection with no request for `local.idle_timeout` is closed, one that
/// watches desired keys is not, and a request line must be completed within 10 s.
#[test]
fn idle_connections_and_unfinished_lines_are_closed() {
    let agent = Agent::start(AgentOptions {
        extra_toml: "idle_timeout = \"1s\"\n".into(),
        ..Default::default()
    });
    let mut watcher = agent.connect();
    let w = watcher
        .call(&json!({"op": "watch", "keys": ["led"]}))
        .unwrap();
    assert_eq!(w["ok"], true, "{w}");
    let mut idle = agent.connect();
    let started = Instant::now();
    let eof = idle.recv().unwrap_err();
    assert_eq!(eof.kind(), std::io::ErrorKind::UnexpectedEof, "{eof}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The watcher, older, is still served.
    assert_eq!(watcher.call(&json!({"op": "status"})).unwrap()["ok"], true);

    use std::io::Write as _;
    let mut raw = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    raw.write_all(b"{\"op\":").unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut raw, &mut answer).unwrap();
    let v: Value = serde_json::from_str(answer.trim()).unwrap();
    assert_eq!(v["error"]["code"], "bad-request", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not completed"),
        "{v}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// Item 10: a stalled daemon (SIGSTOP) makes the CLI give up after `local.client_timeout`
/// with exit 3; a streamed report with quiet input is not closed as idle.
#[test]
fn a_stalled_daemon_makes_the_cli_exit_3() {
    let agent = Agent::start(AgentOptions {
        extra_toml: "idle_timeout = \"1s\"\nclient_timeout = \"2s\"\n".into(),
        ..Default::default()
    });

    // Quiet input for 3 s (longer than the idle timeout): the stream keeps its connection.
    let mut child = cli_command(&agent.config_path, &["report", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    use std::io::Write as _;
    writeln!(input, "{}", json!({"key": "a", "value": 1})).unwrap();
    wait_until("the first change queued", Duration::from_secs(10), || {
        agent.depth() >= 1
    });
    std::thread::sleep(Duration::from_secs(3));
    writeln!(input, "{}", json!({"key": "b", "value": 2})).unwrap();
    drop(input);
    let status = wait_timeout(&mut child, Duration::from_secs(20)).expect("report --stdin ends");
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status}: {err}");
    assert_eq!(agent.depth(), 2);

    agent.signal("-STOP");
    let started = Instant::now();
    let out = run_with_timeout(
        cli_command(&agent.config_path, &["status"]),
        None,
        Duration::from_secs(20),
    );
    let took = started.elapsed();
    agent.signal("-CONT");
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains("no answer within 2s"),
        "{}",
        stderr(&out)
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    eprintln!("stalled daemon: status exited 3 after {took:.1?}");
}

/// Item 15: `edgesync get reported | head -c 10`: the CLI's standard output is closed early;
/// it exits quietly (0, nothing on stderr) instead of panicking (exit 101).
#[test]
fn a_closed_stdout_pipe_ends_the_cli_quietly() {
    let agent = Agent::start(AgentOptions::default().max_bytes("16MiB"));
    let big = "x".repeat(60_000);
    for chunk in 0..4 {
        let r = agent.request(&report_req((0..5).map(|i| {
            (
                ["k0", "k1", "k2", "k3", "k4"][i],
                json!(format!("{chunk}{big}")),
            )
        })));
        assert_eq!(r["ok"], true, "{r}");
    }
    let reported = agent.request(&json!({"op": "get", "doc": "reported"}));
    assert_eq!(reported["state"].as_object().unwrap().len(), 5);
    for _ in 0..3 {
        let mut child = cli_command(&agent.config_path, &["get", "reported"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Like `head -c 10`: read 10 bytes, then close the pipe (300 KB do not fit in it).
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 10];
        std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
        drop(stdout);
        let status = wait_timeout(&mut child, Duration::from_secs(30)).expect("the CLI ends");
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(0), "{status}: {err}");
        assert_eq!(err, "", "nothing on stderr");
    }
}

/// Item 14: an exec handler `command = [sh, -c, script, "{key}"]` gets desired keys `-rf`
/// and `--version` over a real broker: each gets a per-key `failed` result saying why, and
/// the handler never runs for them; an ordinary key in the same document is applied.
#[test]
fn option_like_keys_are_never_passed_to_exec_handlers() {
    use common::cloud::{DEADLINE, wait};
    use common::rig::BrokerRig;
    let device = "hl-optkey";
    let rig = BrokerRig::start(device, |dir, _, opts| {
        // Appends its first argument to `runs`.
        let script = format!("printf '%s\\n' \"$1\" >> '{}'", dir.join("runs").display());
        opts.extra_toml = format!(
            "[[desired.handler]]\nkeys = \"*\"\ntype = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", {}, \"sh\", \"{{key}}\"]\n",
            Value::String(script)
        );
    });
    let (cloud, runs) = (&rig.cloud, rig.dir.path().join("runs"));
    let doc = json!({"version": 1, "state": {"-rf": 1, "--version": 2, "ok.key": 3}});
    let topic = format!("edgesync/{device}/desired");
    // Published again until the agent's subscription is in place.
    let (_, r) = cloud.publish_until(
        &topic,
        doc.to_string().as_bytes(),
        "the result of version 1",
        |m| {
            if !m.topic.ends_with("/desired/result") {
                return None;
            }
            let v = common::cloud::decode(&m.payload);
            (v["version"] == 1).then(|| (m.clone(), v))
        },
    );
    assert_eq!(r["status"], "partial", "{r}");
    for key in ["-rf", "--version"] {
        let k = &r["keys"][key];
        assert_eq!(k["status"], "failed", "{key} in {r}");
        let e = k["error"].as_str().unwrap();
        assert!(e.contains("starts with \"-\""), "{key}: {e}");
    }
    assert_eq!(r["keys"]["ok.key"]["status"], "applied", "{r}");
    wait("the ordinary key's run", DEADLINE, || runs.exists());
    let ran = std::fs::read_to_string(&runs).unwrap();
    assert_eq!(ran, "ok.key\n", "only the ordinary key ran the handler");
    drop(rig);
}

/// Item 1, the request side: 500 connections each send most of a 1 MiB request line and no
/// newline. Partial lines count against a byte budget before they are read off the socket,
/// so the daemon's memory stays bounded and other clients are still served.
#[test]
fn partial_request_lines_of_many_clients_cannot_grow_memory() {
    use std::io::Write as _;
    const CLIENTS: usize = 500;
    let agent = Agent::start(AgentOptions::default());
    let pid = agent.pid();
    let before = proc_status_kib(pid, "VmHWM:");
    let chunk = vec![b'x'; 64 * 1024];
    let mut conns: Vec<(std::os::unix::net::UnixStream, usize)> = (0..CLIENTS)
        .map(|_| {
            let s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
            s.set_nonblocking(true).unwrap();
            (s, 0)
        })
        .collect();
    // Push up to 1,000 KiB into each until the daemon stops taking more.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut moved = false;
        for (s, sent) in &mut conns {
            while *sent < 1000 * 1024 {
                match s.write(&chunk[..chunk.len().min(1000 * 1024 - *sent)]) {
                    Ok(n) => {
                        *sent += n;
                        moved = true;
                    }
                    Err(_) => break, // full (or closed): next connection
                }
            }
        }
        if !moved {
            // Nothing moved this round: let the daemon read, then see whether it did.
            wait_quiet(pid, Duration::from_secs(60));
            let mut again = false;
            for (s, sent) in &mut conns {
                if *sent < 1000 * 1024 && s.write(&chunk[..1]).is_ok() {
                    *sent += 1;
                    again = true;
                }
            }
            if !again {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the daemon kept reading");
    }
    let total: usize = conns.iter().map(|(_, n)| n).sum();
    let peak = proc_status_kib(pid, "VmHWM:");
    eprintln!(
        "partial lines: {CLIENTS} clients pushed {} MiB of unfinished lines; peak RSS {peak} KiB \
         (before {before} KiB)",
        total >> 20
    );
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
    // Small requests need no line budget: served at once.
    let out = run_with_timeout(
        cli_command(&agent.config_path, &["status"]),
        None,
        Duration::from_secs(20),
    );
    assert_exit(&out, 0);
    drop(conns);
}
