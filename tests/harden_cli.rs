//! The CLI as a Unix tool (issue 13, item 15): a reader that goes away early
//! (`edgesync get reported | head -c 10`) ends the command quietly, never with a panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use common::{Agent, AgentOptions, cli_command, report_req, wait_timeout};
use serde_json::json;

#[test]
fn a_closed_pipe_on_stdout_ends_every_command_quietly() {
    let agent = Agent::start(AgentOptions::default().max_bytes("4MiB"));
    // Enough state that `get reported` writes far more than a pipe holds.
    let big = "x".repeat(30_000);
    let changes: Vec<(String, serde_json::Value)> =
        (0..20).map(|i| (format!("k{i}"), json!(big))).collect();
    let r = agent.request(&report_req(
        changes.iter().map(|(k, v)| (k.as_str(), v.clone())),
    ));
    assert_eq!(r["ok"], true, "{r}");
    let config = agent.config_path.clone();
    for args in [
        &["get", "reported"][..],
        &["status"],
        &["status", "--json"],
        &["queue", "peek"],
        &["--help"],
        &["--version"],
    ] {
        let mut cmd = cli_command(&config, args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        // The reader is gone before the command writes anything.
        drop(child.stdout.take());
        let status = wait_timeout(&mut child, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{args:?} did not end"));
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert_eq!(status.code(), Some(0), "{args:?}: {status}, stderr: {err}");
        assert!(!err.contains("internal error"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
