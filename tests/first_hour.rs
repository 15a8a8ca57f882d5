//! The first hour of a new user (issue 15): CLI habits, with the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{
    Agent, AgentOptions, CLI_DEADLINE, assert_exit, bin_command, run_with_timeout, stdout,
};

fn bare(args: &[&str]) -> std::process::Output {
    let mut cmd = bin_command();
    cmd.args(args).env_remove("EDGESYNC_CONFIG");
    run_with_timeout(cmd, None, CLI_DEADLINE)
}

#[test]
fn help_is_a_command_and_dash_c_is_the_config_option() {
    // `help` and `help COMMAND` print what `--help` and `COMMAND --help` print.
    let main = bare(&["--help"]);
    assert_exit(&main, 0);
    assert!(
        stdout(&main).contains("-c, --config PATH"),
        "{}",
        stdout(&main)
    );
    assert!(stdout(&main).contains("help          Show this help"));
    let help = bare(&["help"]);
    assert_exit(&help, 0);
    assert_eq!(stdout(&help), stdout(&main));
    for command in [
        "run", "report", "status", "get", "history", "rollback", "queue",
    ] {
        let a = bare(&["help", command]);
        let b = bare(&[command, "--help"]);
        assert_exit(&a, 0);
        assert_eq!(stdout(&a), stdout(&b), "{command}");
    }
    let unknown = bare(&["help", "frobnicate"]);
    assert_exit(&unknown, 2);

    // `-c PATH` reads the same file as `--config PATH`.
    let agent = Agent::prepare(AgentOptions::default());
    let config = agent.config_path.to_str().unwrap();
    let long = bare(&["check-config", "--config", config]);
    let short = bare(&["check-config", "-c", config]);
    assert_exit(&long, 0);
    assert_exit(&short, 0);
    assert_eq!(stdout(&short), stdout(&long));
    let missing = bare(&["check-config", "-c", "/nonexistent/edgesync.toml"]);
    assert_exit(&missing, 2);
}

#[test]
fn status_json_says_the_daemon_is_down_and_exits_3() {
    let agent = Agent::prepare(AgentOptions::default());
    let out = agent.cli(&["status", "--json"]);
    assert_exit(&out, 3);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    assert_eq!(doc["running"], false, "{doc}");
    assert_eq!(doc["socket"], agent.socket.display().to_string(), "{doc}");
    assert!(
        doc["error"]
            .as_str()
            .unwrap_or("")
            .contains("not reachable"),
        "{doc}"
    );
    // Without --json the text goes to stderr only, as before.
    let text = agent.cli(&["status"]);
    assert_exit(&text, 3);
    assert!(stdout(&text).is_empty(), "{}", stdout(&text));
}
