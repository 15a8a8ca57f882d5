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

/// `edgesync estimate` (issue 19): the config's encoding and compression, rows with and
/// without compression and deadband, exit codes of PROTOCOL §2.1.
#[test]
fn estimate_prints_a_month_of_data_from_the_config() {
    let agent = Agent::prepare(AgentOptions {
        extra_toml: "[sync]\nencoding = \"json\"\ncompression = \"gzip\"\n".into(),
        ..AgentOptions::default()
    });
    let run = |args: &[&str]| {
        let out = cli_command(&agent.config_path, args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, text, _) = run(&[
        "estimate", "--keys", "100", "--every", "10s", "--skip", "50",
    ]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.starts_with("100 keys every 10s: 25,920,000 changes a month"),
        "{text}"
    );
    assert!(
        text.contains("sync.encoding json, sync.compression gzip"),
        "{text}"
    );
    let mb = |label: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(label) && l[label.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no row {label:?} in\n{text}"));
        line[label.len()..]
            .split_whitespace()
            .nth(3)
            .unwrap()
            .parse()
            .unwrap()
    };
    let (none, gzip) = (mb("compression none"), mb("compression gzip"));
    assert!(gzip < none * 0.5, "gzip {gzip} MB against {none} MB");
    assert!(mb("compression gzip, skip 50%") < gzip * 0.7);
    let configured = text
        .lines()
        .find(|l| l.ends_with("<- this config"))
        .unwrap();
    assert!(configured.starts_with("compression gzip "), "{configured}");

    // Bad usage and an invalid config: exit 2, as every command.
    let (code, _, err) = run(&["estimate", "--skip", "100"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--skip needs a percent from 0 to 99"), "{err}");
    agent.write_file("edgesync.toml", {
        let mut t = std::fs::read_to_string(&agent.config_path).unwrap();
        t = t.replace("compression = \"gzip\"", "compression = \"zip\"");
        t
    });
    let (code, _, err) = run(&["estimate"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("sync.compression"), "{err}");
}
