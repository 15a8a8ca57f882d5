//! Inbound at most once (issue 7 part 6): the agent dies (SIGKILL) between the receipt of a
//! desired document or command and its PUBACK, at every point of the intake, many times over.
//! Pass: nothing lost (the broker delivers the unacknowledged message again and it is taken
//! in), nothing applied or run twice.
//!
//! The deaths come from the debug-build crash points of `src/sys/crash.rs`
//! (`EDGESYNC_DEBUG_CRASH_AT`); a release build has none, so there these tests only say so and
//! pass. Each cycle: start the agent with a crash point, publish one message, wait until the
//! agent is dead, start it without one, wait for the answer, kill -9 it (quiescent). Handler
//! runs are counted by an exec handler appending a line per run.
//!
//! `EDGESYNC_INBOUND_CYCLES` sets the number of crashes per test (default 200).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use common::cloud::{DEADLINE, decode, wait};
use common::rig::{BrokerRig, exec_handler, extends_broker_rig, read_lines};
use serde_json::{Value, json};

const DESIRED_POINTS: [&str; 3] = ["desired-received", "desired-taken", "desired-before-puback"];
const COMMAND_POINTS: [&str; 3] = ["command-received", "command-taken", "command-before-puback"];

fn cycles() -> usize {
    std::env::var("EDGESYNC_INBOUND_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
}

/// The shared rig, and the file the handler appends each run's version to.
struct Rig {
    base: BrokerRig,
    runs: PathBuf,
}

extends_broker_rig!(Rig);

impl Rig {
    /// The agent with an exec handler for `key` that appends `$EDGESYNC_VERSION` to `runs`.
    fn start(device: &str, key: &str) -> Rig {
        let base = BrokerRig::start(device, |dir, _, opts| {
            let runs = dir.join("runs");
            let script = format!("echo \"$EDGESYNC_VERSION\" >> '{}'", runs.display());
            opts.extra_toml = exec_handler(key, &script, "60s");
        });
        let runs = base.dir.path().join("runs");
        Rig { base, runs }
    }

    fn runs(&self) -> Vec<String> {
        read_lines(&self.runs)
    }

    /// Publishes a desired document until the cloud has a result for it (the first one may
    /// come before the agent's subscription is in place).
    fn desired_until_applied(&self, version: u64, state: Value) {
        let doc = json!({"version": version, "state": state}).to_string();
        let deadline = Instant::now() + DEADLINE;
        loop {
            self.cloud
                .publish(&self.topic("desired"), doc.clone(), false);
            let until = Instant::now() + std::time::Duration::from_secs(2);
            while Instant::now() < until {
                if self.applied(version) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            assert!(Instant::now() < deadline, "version {version} never applied");
        }
    }

    fn applied(&self, version: u64) -> bool {
        self.cloud
            .results()
            .iter()
            .any(|(_, r)| r["version"] == version && r["status"] == "applied")
    }

    /// Every response on `cmd/rollback/result`, by id.
    fn rollback_answers(&self) -> BTreeMap<String, Vec<Value>> {
        let topic = self.topic("cmd/rollback/result");
        let mut by_id: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for m in self.cloud.messages() {
            if m.topic == topic {
                let v = decode(&m.payload);
                let id = v["id"].as_str().unwrap_or_default().to_owned();
                by_id.entry(id).or_default().push(v);
            }
        }
        by_id
    }

    /// Starts the agent (stopped) with `point` armed, runs `send`, waits until it died there,
    /// then starts it again without. The armed one is spawned here rather than by
    /// [`Agent::restart`], which waits until it serves: a message the broker delivers again
    /// may kill it before that.
    fn crash_at(&mut self, point: &str, send: impl FnOnce(&Rig)) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.agent.log_path)
            .unwrap();
        let child = self
            .agent
            .run_command()
            .env(edgesync::crash::ENV, point)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut armed = Armed(child);
        send(self);
        let status = common::wait_timeout(&mut armed.0, DEADLINE).unwrap_or_else(|| {
            panic!(
                "the agent did not die at {point}; log:\n{}",
                self.agent.log()
            )
        });
        assert_eq!(status.signal(), Some(9), "killed at {point}: {status}");
        self.agent.restart();
    }
}

/// The armed agent; killed if the test fails before it died.
struct Armed(std::process::Child);

impl Drop for Armed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The number of crashes at each point, from the agent's log.
fn crashes(log: &str, points: &[&str]) -> Vec<(String, usize)> {
    points
        .iter()
        .map(|p| {
            let marker = format!("{}={p}: killing", edgesync::crash::ENV);
            ((*p).to_owned(), log.matches(&marker).count())
        })
        .collect()
}

#[test]
fn desired_documents_killed_between_receipt_and_puback_are_applied_exactly_once() {
    if common::no_debug_hooks() {
        return;
    }
    let n = cycles();
    let mut rig = Rig::start("in-desired", "n");
    rig.desired_until_applied(1, json!({"n": 1}));
    let started = Instant::now();
    for i in 0..n {
        let version = i as u64 + 2;
        let point = DESIRED_POINTS[i % DESIRED_POINTS.len()];
        rig.agent.kill9();
        rig.crash_at(point, |rig| {
            rig.cloud.publish(
                &rig.topic("desired"),
                json!({"version": version, "state": {"n": version}}).to_string(),
                false,
            );
        });
        wait(
            &format!("version {version} applied after a crash at {point}"),
            DEADLINE,
            || rig.applied(version),
        );
    }
    let elapsed = started.elapsed();
    let last = n as u64 + 1;
    let expected: Vec<String> = (1..=last).map(|v| v.to_string()).collect();
    assert_eq!(
        rig.runs(),
        expected,
        "every version ran exactly once, in order"
    );
    for (_, r) in rig.cloud.results() {
        let status = r["status"].as_str().unwrap_or_default();
        assert!(
            status == "applied" || status == "duplicate",
            "only applied and duplicate results: {r}"
        );
    }
    assert_eq!(rig.agent.status()["desired"]["version"], last);
    let log = rig.agent.log();
    let counts = crashes(&log, &DESIRED_POINTS);
    for (k, (point, count)) in counts.iter().enumerate() {
        let want = (0..n).filter(|i| i % DESIRED_POINTS.len() == k).count();
        assert_eq!(*count, want, "crashes at {point}");
    }
    let duplicates = rig
        .cloud
        .results()
        .iter()
        .filter(|(_, r)| r["status"] == "duplicate")
        .count();
    eprintln!(
        "inbound desired: {n} crashes {counts:?} in {elapsed:.1?}; {} versions applied once each; \
         {duplicates} redeliveries answered duplicate",
        last
    );
}

#[test]
fn commands_killed_between_receipt_and_puback_run_exactly_once() {
    if common::no_debug_hooks() {
        return;
    }
    let n = cycles();
    let mut rig = Rig::start("in-command", "led");
    rig.desired_until_applied(1, json!({"led": "red"}));
    rig.desired_until_applied(2, json!({"led": "green"}));
    assert_eq!(rig.runs().len(), 2);
    let started = Instant::now();
    for i in 0..n {
        let id = format!("rb-{i}");
        // Back and forth between the two values, so every rollback changes something.
        let version = 1 + (i as u64 % 2);
        let point = COMMAND_POINTS[i % COMMAND_POINTS.len()];
        rig.agent.kill9();
        rig.crash_at(point, |rig| {
            rig.cloud.publish(
                &rig.topic("cmd/rollback"),
                json!({"id": id, "args": {"key": "led", "version": version}}).to_string(),
                false,
            );
        });
        wait(
            &format!("an answer to {id} after a crash at {point}"),
            DEADLINE,
            || rig.rollback_answers().contains_key(&id),
        );
        let runs = rig.runs().len();
        assert_eq!(
            runs,
            3 + i,
            "{id} ran once: {:?}",
            rig.rollback_answers()[&id]
        );
    }
    let elapsed = started.elapsed();
    let answers = rig.rollback_answers();
    assert_eq!(answers.len(), n, "every id answered");
    let mut repeats = 0;
    for (id, all) in &answers {
        assert_eq!(all[0]["ok"], true, "{id}: {all:?}");
        assert!(
            all.iter().all(|a| a == &all[0]),
            "{id}: every answer the first one: {all:?}"
        );
        repeats += all.len() - 1;
    }
    // The handler may still be finishing the last one: every run is counted once it answered.
    assert_eq!(rig.runs().len(), 2 + n, "each rollback ran exactly once");
    let log = rig.agent.log();
    let counts = crashes(&log, &COMMAND_POINTS);
    assert_eq!(
        counts.iter().map(|(_, c)| c).sum::<usize>(),
        n,
        "{counts:?}"
    );
    eprintln!(
        "inbound commands: {n} crashes {counts:?} in {elapsed:.1?}; {n} rollbacks ran once each; \
         {repeats} repeated answers (from the record)"
    );
}
