//! Commands as AWS IoT Jobs with the real binary (`[cloud] profile = "aws-iot"`): a real
//! Mosquitto over mutual TLS, the test kit's AWS IoT emulator playing the Jobs service on
//! it (docs/PROTOCOL.md §7.3). Skipped with a notice when Mosquitto is not installed
//! (`EDGESYNC_REQUIRE_MOSQUITTO=1` makes that a failure).
//!
//! The crash test uses the crash points of debug builds (`EDGESYNC_DEBUG_CRASH_AT`,
//! src/sys/crash.rs); a release build says so and skips it.

// Test code: clippy.toml's allow-*-in-tests covers #[test] functions only, not helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;

use common::cloud::{self, DEADLINE};
use common::{Agent, AgentOptions};
use edgesync_testkit::aws::{AwsIot, Connect, JobExecution, JobStatus, Options};
use edgesync_testkit::{Mosquitto, MosquittoOptions, TestPki};
use serde_json::{Value, json};
use tempfile::TempDir;

/// Mosquitto, the emulator on it, and an agent (not started) of thing `thing`.
struct Rig {
    emu: AwsIot,
    agent: Agent,
    thing: String,
    // Dropped last: the broker outlives the agent and the emulator.
    _broker: Mosquitto,
    _dir: TempDir,
}

impl Rig {
    /// `None` when Mosquitto is not installed.
    fn new(thing: &str) -> Option<Rig> {
        Rig::with(thing, Options::default())
    }

    /// With the emulator's `options`.
    fn with(thing: &str, options: Options) -> Option<Rig> {
        let dir = tempfile::tempdir().unwrap();
        let pki: TestPki = cloud::pki(&dir.path().join("pki"), thing);
        let broker = Mosquitto::start(&pki, MosquittoOptions::default()).unwrap()?;
        let connect = Connect::mosquitto(&broker, &pki).unwrap();
        let emu = AwsIot::start_with(&connect, options).unwrap();
        let mut opts: AgentOptions = cloud::aws_agent(&pki, broker.tls_port);
        opts.extra_toml = "[cloud]\nprofile = \"aws-iot\"\n".into();
        Some(Rig {
            emu,
            agent: Agent::prepare(opts),
            thing: thing.to_owned(),
            _broker: broker,
            _dir: dir,
        })
    }

    fn create(&self, job: &str, document: Value) {
        self.emu.create_job(&self.thing, job, document).unwrap();
    }

    /// Waits until `job` is terminal; returns it.
    fn ended(&self, job: &str) -> JobExecution {
        let ended = |e: &AwsIot| {
            e.job(&self.thing, job)
                .is_some_and(|j| j.status.is_terminal())
        };
        if let Err(e) = self.emu.wait_for(DEADLINE, ended) {
            panic!(
                "job {job} not ended: {e}; {:?}\nagent log:\n{}",
                self.emu.job(&self.thing, job),
                self.agent.log()
            );
        }
        self.emu.job(&self.thing, job).unwrap()
    }

    /// How often the agent's log says it ran the command of `job`, over every run.
    fn runs(&self, job: &str) -> usize {
        let id = format!("id={job}");
        self.agent
            .log()
            .lines()
            .filter(|l| l.contains("running command") && l.split_whitespace().any(|w| w == id))
            .count()
    }

    /// Job ids in the order the agent ran their commands.
    fn run_order(&self) -> Vec<String> {
        self.agent
            .log()
            .lines()
            .filter(|l| l.contains("running command"))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("id="))
                    .map(str::to_owned)
            })
            .collect()
    }
}

fn details(j: &JobExecution, key: &str) -> String {
    j.status_details.get(key).cloned().unwrap_or_default()
}

#[test]
fn a_ping_job_succeeds_with_its_answer_in_status_details() {
    let Some(mut rig) = Rig::new("jobs-ping") else {
        return;
    };
    rig.agent.launch();
    rig.create("ping-1", json!({"command": "ping"}));
    let j = rig.ended("ping-1");
    assert_eq!(j.status, JobStatus::Succeeded, "{j:?}");
    let result: Value = serde_json::from_str(&details(&j, "result")).unwrap();
    assert_eq!(result["pong"], true, "{j:?}");
    assert!(result["ts"].as_u64().is_some(), "{j:?}");
    // Queued 1, start-next 2, the update with expectedVersion 2 made it 3.
    assert_eq!(j.version_number, 3);
    // Arguments reach the command: an unknown one is the command's bad-request.
    rig.create("ping-2", json!({"command": "ping", "args": {"loud": true}}));
    let j = rig.ended("ping-2");
    assert_eq!(j.status, JobStatus::Failed, "{j:?}");
    assert_eq!(details(&j, "error_code"), "bad-request");
    // A larger answer (the status document) is cut to 1,024 characters and says so.
    rig.create("status-1", json!({"command": "status"}));
    let j = rig.ended("status-1");
    assert_eq!(j.status, JobStatus::Succeeded, "{j:?}");
    let shown = details(&j, "result");
    assert!(shown.chars().count() <= 1024, "{j:?}");
    if shown.chars().count() == 1024 {
        assert!(
            details(&j, "result_truncated").contains("characters"),
            "{j:?}"
        );
    }
    // Counted in the metrics of the status document.
    cloud::wait("jobs figures", DEADLINE, || {
        let s = rig.agent.status();
        let jobs = &s["metrics"]["jobs"];
        jobs["succeeded"] == 2 && jobs["failed"] == 1 && jobs["taken"] == 3
    });
}

#[test]
fn unknown_commands_and_bad_documents_fail_the_job_with_the_error_code() {
    let Some(mut rig) = Rig::new("jobs-fail") else {
        return;
    };
    rig.agent.launch();
    rig.create("unknown", json!({"command": "reboot"}));
    rig.create("no-command", json!({"args": {}}));
    rig.create(
        "not-allowed",
        json!({"command": "purge", "args": {"confirm": true}}),
    );
    rig.create("after", json!({"command": "ping"}));
    for (job, code) in [
        ("unknown", "unknown-command"),
        ("no-command", "bad-request"),
        ("not-allowed", "forbidden"),
    ] {
        let j = rig.ended(job);
        assert_eq!(j.status, JobStatus::Failed, "{j:?}");
        assert_eq!(details(&j, "error_code"), code, "{j:?}");
        assert!(!details(&j, "error_message").is_empty(), "{j:?}");
    }
    assert!(details(&rig.ended("unknown"), "error_message").contains("reboot"));
    // The queue goes on.
    assert_eq!(rig.ended("after").status, JobStatus::Succeeded);
    assert_eq!(
        rig.runs("unknown") + rig.runs("not-allowed"),
        0,
        "never run"
    );
}

#[test]
fn jobs_queued_while_the_agent_is_down_run_in_order_after_it_starts() {
    let Some(mut rig) = Rig::new("jobs-queued") else {
        return;
    };
    let ids = ["q-1", "q-2", "q-3", "q-4", "q-5"];
    for id in ids {
        rig.create(id, json!({"command": "ping"}));
    }
    rig.agent.launch();
    for id in ids {
        assert_eq!(rig.ended(id).status, JobStatus::Succeeded, "{id}");
    }
    assert_eq!(rig.run_order(), ids, "in queue order, once each");
    // Stopped and started again: nothing runs again, the queue is empty.
    rig.agent.stop();
    rig.agent.restart();
    rig.create("q-6", json!({"command": "ping"}));
    assert_eq!(rig.ended("q-6").status, JobStatus::Succeeded);
    let mut all = ids.to_vec();
    all.push("q-6");
    assert_eq!(rig.run_order(), all);
}

#[test]
fn canceled_jobs_are_not_run_and_an_update_rejected_for_good_leaves_the_job() {
    // Every request held 4 s: the job is canceled while its update waits (after its run is
    // seen in the log, well within the hold).
    let options = Options {
        response_delay: std::time::Duration::from_secs(4),
        ..Options::default()
    };
    let Some(mut rig) = Rig::with("jobs-cancel", options) else {
        return;
    };
    // Canceled while queued: never taken.
    rig.create("c-0", json!({"command": "ping"}));
    rig.emu.cancel_job(&rig.thing, "c-0").unwrap();
    rig.create("c-1", json!({"command": "ping"}));
    rig.create("c-2", json!({"command": "ping"}));
    rig.agent.launch();
    cloud::wait("c-1 run", DEADLINE, || rig.runs("c-1") == 1);
    rig.emu.cancel_job(&rig.thing, "c-1").unwrap();
    // Its update is rejected (InvalidStateTransition, final): the job is left, the queue
    // goes on.
    assert_eq!(rig.ended("c-2").status, JobStatus::Succeeded);
    assert_eq!(
        rig.emu.job(&rig.thing, "c-1").unwrap().status,
        JobStatus::Canceled
    );
    assert_eq!(
        rig.emu.job(&rig.thing, "c-0").unwrap().status,
        JobStatus::Canceled
    );
    assert_eq!(rig.run_order(), ["c-1", "c-2"], "once each, c-0 never");
    cloud::wait("jobs.left", DEADLINE, || {
        let s = rig.agent.status();
        let jobs = &s["metrics"]["jobs"];
        let last = jobs["last_rejection"].as_str().unwrap_or("");
        jobs["left"] == 1
            && jobs["succeeded"] == 1
            && last.contains("c-1")
            && last.contains("InvalidStateTransition")
    });
    let st = rig.emu.stats();
    assert_eq!(
        st.jobs.rejected.get("InvalidStateTransition"),
        Some(&1),
        "answered once, not again: {st:?}"
    );
}

/// Points where a kill -9 leaves a job in progress at AWS: taken in and not run, taken in
/// and not acknowledged, answered and not published.
const CRASH_POINTS: [&str; 3] = ["command-taken", "command-before-puback", "command-answered"];

#[test]
fn a_job_runs_exactly_once_across_a_kill_9_after_it_started() {
    if common::no_debug_hooks() {
        return;
    }
    let Some(mut rig) = Rig::new("jobs-crash") else {
        return;
    };
    for (i, point) in CRASH_POINTS.iter().enumerate() {
        let job = format!("crash-{i}");
        // The armed agent is spawned here rather than by `launch`, which waits until it
        // serves: the job may kill it before.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&rig.agent.log_path)
            .unwrap();
        let mut armed = rig
            .agent
            .run_command()
            .env(edgesync::crash::ENV, point)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        rig.create(&job, json!({"command": "ping"}));
        let status = common::wait_timeout(&mut armed, DEADLINE).unwrap_or_else(|| {
            let _ = armed.kill();
            let _ = armed.wait();
            panic!(
                "the agent did not die at {point}; log:\n{}",
                rig.agent.log()
            )
        });
        assert_eq!(status.signal(), Some(9), "killed at {point}: {status}");
        let at_aws = rig.emu.job(&rig.thing, &job).unwrap();
        assert_eq!(at_aws.status, JobStatus::InProgress, "{point}: {at_aws:?}");
        rig.agent.restart();
        let j = rig.ended(&job);
        assert_eq!(j.status, JobStatus::Succeeded, "{point}: {j:?}");
        let result: Value = serde_json::from_str(&details(&j, "result")).unwrap();
        assert_eq!(result["pong"], true);
        assert_eq!(
            rig.runs(&job),
            1,
            "{job} ran once across the kill at {point}"
        );
        rig.agent.kill9();
    }
    let st = rig.emu.stats();
    eprintln!(
        "jobs across kill -9: {} crashes, updates accepted {:?}, rejected {:?} (repeated answers)",
        CRASH_POINTS.len(),
        st.jobs.accepted.get("update"),
        st.jobs.rejected
    );
    let marker = format!("{}=", edgesync::crash::ENV);
    let log = rig.agent.log();
    assert_eq!(
        log.matches(&marker).count(),
        CRASH_POINTS.len(),
        "one death per point"
    );
}
