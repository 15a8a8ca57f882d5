//! The first hour of a new user (issue 15): CLI habits, with the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::cloud::{DEADLINE, pki, tls_options};
use common::rig::broker_and_cloud;
use common::{
    Agent, AgentOptions, CLI_DEADLINE, assert_exit, bin_command, report_req, run_with_timeout,
    stderr, stdout, wait_until,
};
use edgesync_testkit::FaultProxy;
use serde_json::{Value, json};

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
        "run",
        "report",
        "status",
        "get",
        "history",
        "rollback",
        "queue",
        "reconnect",
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
    // `reconnect` needs the daemon too.
    assert_exit(&agent.cli(&["reconnect"]), 3);
    // Without --json the text goes to stderr only, as before.
    let text = agent.cli(&["status"]);
    assert_exit(&text, 3);
    assert!(stdout(&text).is_empty(), "{}", stdout(&text));
}

#[test]
fn offline_is_explained_and_reconnect_retries_now() {
    let dir = tempfile::tempdir().unwrap();
    let device = "fh-offline";
    let pki = pki(dir.path(), device);
    let (broker, _cloud) = broker_and_cloud(&pki, device);
    let proxy = FaultProxy::start(broker.tls_addr()).unwrap();
    proxy.cut();
    // Waits of up to an hour: within this test only `reconnect` makes the agent try again.
    let mqtt = "keep_alive = \"5s\"\nreconnect_initial = \"1h\"\nreconnect_max = \"1h\"\n";
    let agent = Agent::start(tls_options(&pki, proxy.port(), mqtt).max_bytes("64MiB"));
    let connection = || agent.status()["connection"].clone();
    let waiting = |c: &Value| c["state"] == "offline" && c["next_attempt_in"].is_u64();

    // The first try failed: down since the start, the next try ahead.
    let mut c = Value::Null;
    wait_until("the first failed attempt", DEADLINE, || {
        c = connection();
        waiting(&c)
    });
    let down = c["down_since"].as_u64().unwrap_or_else(|| panic!("{c}"));
    assert!(c["attempts"].as_u64() >= Some(1), "{c}");

    // `reconnect` while the broker is away tries again at once; `down_since` stays where
    // it was while `attempts` grows. Until the wait drawn is long (at least 2 min, random up
    // to 1 h), so that the connection below can only be `reconnect`'s doing.
    let mut attempts = c["attempts"].as_u64().unwrap();
    while attempts < 3 || c["next_attempt_in"].as_u64() < Some(120_000) {
        assert!(attempts < 30, "{c}");
        let out = agent.cli(&["reconnect"]);
        assert_exit(&out, 0);
        assert!(
            stdout(&out).contains("retrying the broker now"),
            "{}",
            stdout(&out)
        );
        wait_until("the next failed attempt", DEADLINE, || {
            c = connection();
            waiting(&c) && c["attempts"].as_u64() > Some(attempts)
        });
        attempts = c["attempts"].as_u64().unwrap();
        assert_eq!(c["down_since"], down, "not moved by retries: {c}");
    }
    let text = stdout(&agent.cli(&["status"]));
    assert!(
        text.contains(&format!(
            "offline to mqtts://localhost:{} (down for ",
            proxy.port()
        )) && text.contains(&format!("{attempts} attempt(s), next in ")),
        "{text}"
    );

    // Changes queued meanwhile are a backlog, drained (and logged) once connected.
    let keys: Vec<String> = (0..300).map(|i| format!("k{i}")).collect();
    let answer = agent.request(&report_req(keys.iter().map(|k| (k.as_str(), json!(1)))));
    assert_eq!(answer["ok"], true, "{answer}");

    // The broker is back: `reconnect` connects well before the next try (2 min or more).
    proxy.restore();
    let out = agent.cli(&["reconnect"]);
    assert_exit(&out, 0);
    let online_within = Duration::from_secs(60);
    wait_until("online after reconnect", online_within, || {
        connection()["state"] == "online"
    });
    let c = connection();
    assert_eq!(
        (&c["down_since"], &c["attempts"], &c["next_attempt_in"]),
        (&Value::Null, &json!(0), &Value::Null),
        "{c}"
    );

    // Connected: `reconnect` says so and leaves the connection alone.
    let out = agent.cli(&["reconnect"]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("already connected"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        agent.request(&json!({"op": "reconnect"})),
        json!({"ok": true, "state": "online", "retrying": false})
    );
    let after = agent.status();
    assert_eq!(after["connection"]["since"], c["since"], "{after}");
    assert_eq!(after["counters"]["reconnects"], 0, "{after}");

    // The drain in the log: its start with the backlog, its end with count, time and rate.
    wait_until("the backlog drained", DEADLINE, || {
        agent.log().contains("backlog drained: 300 changes in ")
    });
    let log = agent.log();
    assert!(
        log.contains("draining the backlog: 300 changes queued"),
        "{log}"
    );
    assert!(log.contains("retrying now (edgesync reconnect)"), "{log}");
    assert_eq!(agent.depth(), 0);
}

#[test]
fn status_labels_counters_by_scope() {
    let agent = Agent::start(AgentOptions::default());
    let bad = agent.request(&json!({"op": "report", "changes": [{"key": "bad key", "value": 1}]}));
    assert_eq!(bad["ok"], false, "{bad}");
    let s = agent.status();
    assert_eq!(s["counter_scopes"]["persistent"][1], "acked", "{s}");
    assert!(
        s["counter_scopes"]["since_start"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("sent"))),
        "{s}"
    );
    let text = stdout(&agent.cli(&["status"]));
    assert!(
        text.contains("store file  reported 0 · acked 0 · dropped 0 · rejected store-full 0\n"),
        "{text}"
    );
    assert!(
        text.contains("since start sent 0 · resent 0 · reconnects 0 · rejected invalid-change 1\n"),
        "{text}"
    );
    assert!(!text.contains("invalid 1"), "one word per meaning: {text}");
}

/// `check-config` with the store and the socket in other directories than the agent's.
fn check_dirs(store: &str, socket: &str) -> std::process::Output {
    let agent = Agent::prepare(AgentOptions::default());
    let text = std::fs::read_to_string(&agent.config_path)
        .unwrap()
        .replace("\"store/edgesync.redb\"", &format!("{store:?}"))
        .replace(
            &format!("{:?}", agent.socket.display().to_string()),
            &format!("{socket:?}"),
        );
    let config = agent.write_file("dirs.toml", text);
    agent.cli_at(&config, &["check-config"])
}

#[test]
fn check_config_says_how_to_make_the_store_and_socket_directories() {
    let tmp = tempfile::Builder::new()
        .prefix("esdir")
        .tempdir_in("/tmp")
        .unwrap();
    let t = tmp.path().display().to_string();

    // Missing directories this user can create: the agent makes them; nothing is made now.
    let out = check_dirs(
        &format!("{t}/new/store/s.redb"),
        &format!("{t}/run/x/s.sock"),
    );
    assert_exit(&out, 0);
    assert!(!tmp.path().join("new").exists() && !tmp.path().join("run").exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "probe left behind"
    );

    // A regular file where a directory must be: the message names it (any user).
    std::fs::write(tmp.path().join("file"), "").unwrap();
    let out = check_dirs(
        &format!("{t}/file/store/s.redb"),
        &format!("{t}/file/s.sock"),
    );
    assert_exit(&out, 2);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("store.path: \"{t}/file\" is not a directory")),
        "{err}"
    );
    assert!(
        err.contains(&format!("local.socket: \"{t}/file\" is not a directory")),
        "{err}"
    );

    // A directory nobody may create (/proc refuses even root): exit 2 with the command to run.
    let out = check_dirs("/proc/edgesync-none/s.redb", "/proc/edgesync-none/s.sock");
    assert_exit(&out, 2);
    let err = stderr(&out);
    for key in ["store.path", "local.socket"] {
        assert!(
            err.contains(&format!(
                "{key}: directory \"/proc/edgesync-none\" does not exist and this user cannot \
                 create it"
            )) && err.contains(
                "create it: sudo install -d -o edgesync -g edgesync -m 0750 /proc/edgesync-none"
            ),
            "{err}"
        );
    }

    // An existing directory this user cannot write: only meaningful without root, which
    // writes anything (the probe tells which one runs this test).
    let ro = tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let root = std::fs::write(ro.join("probe"), "").is_ok();
    let out = check_dirs(&format!("{t}/ro/s.redb"), &format!("{t}/ro/s.sock"));
    if root {
        assert_exit(&out, 0);
        eprintln!("running as root: the unwritable-directory case is checked only as non-root");
    } else {
        assert_exit(&out, 2);
        assert!(
            stderr(&out).contains(&format!(
                "store.path: directory \"{t}/ro\" is not writable by this user"
            )) && stderr(&out).contains(&format!("sudo chown edgesync:edgesync {t}/ro")),
            "{}",
            stderr(&out)
        );
    }
}

/// The manual install (README "Use it": packaging/install.sh) lays out what
/// systemd/edgesync.service expects.
#[test]
fn install_script_matches_the_systemd_unit() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let unit = std::fs::read_to_string(format!("{repo}/systemd/edgesync.service")).unwrap();
    for line in [
        "ExecStart=/usr/bin/edgesync run --config /etc/edgesync/edgesync.toml",
        "User=edgesync",
        "Group=edgesync",
        "StateDirectory=edgesync",
        "RuntimeDirectory=edgesync",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    let root = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(format!("{repo}/packaging/install.sh"));
    cmd.arg(common::BIN).env("DESTDIR", root.path());
    let out = run_with_timeout(cmd, None, CLI_DEADLINE);
    assert_exit(&out, 0);
    let mode = |p: &str| {
        std::fs::metadata(root.path().join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("usr/bin/edgesync"), 0o755);
    assert_eq!(mode("var/lib/edgesync"), 0o750);
    assert_eq!(mode("etc/edgesync/edgesync.toml"), 0o640);
    let installed =
        std::fs::read_to_string(root.path().join("etc/systemd/system/edgesync.service")).unwrap();
    assert_eq!(installed, unit);
    // The installed config names the unit's directories.
    let config = std::fs::read_to_string(root.path().join("etc/edgesync/edgesync.toml")).unwrap();
    assert!(config.contains("path = \"/var/lib/edgesync/edgesync.redb\""));
    assert!(config.contains("socket = \"/run/edgesync/edgesync.sock\""));
}

/// The command names of the real binary's `help` (its Commands section).
fn help_commands() -> Vec<String> {
    let out = bare(&["help"]);
    assert_exit(&out, 0);
    stdout(&out)
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[test]
fn the_man_page_and_the_completions_know_every_command() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let man = read("packaging/deb/edgesync.1");
    let bash = read("packaging/completions/edgesync.bash");
    let zsh = read("packaging/completions/_edgesync");
    let fish = read("packaging/completions/edgesync.fish");
    let commands = help_commands();
    assert!(commands.len() >= 9, "{commands:?}");
    for c in &commands {
        let roff = c.replace('-', "\\-");
        assert!(man.contains(&format!(".SS \"{roff}\"")), "man page: {c}");
        assert!(bash.contains(&format!(" {c}) words=")), "bash: {c}");
        assert!(zsh.contains(&format!("'{c}:")), "zsh: {c}");
        assert!(fish.contains(&format!(" -a {c} -d")), "fish: {c}");
        // Every option of the command's help, too.
        let help = stdout(&bare(&["help", c]));
        for word in help.split(|ch: char| ch.is_whitespace() || "[]<>|".contains(ch)) {
            if let Some(long) = word.strip_prefix("--").filter(|w| !w.is_empty()) {
                assert!(man.contains(&format!("\\-\\-{long}")), "man: {c} --{long}");
                assert!(fish.contains(&format!("-l {long}")), "fish: {c} --{long}");
            }
        }
    }
    // The help says how the files are made.
    assert!(man.contains("do not edit"));
}

#[test]
fn queue_help_is_aligned() {
    let out = bare(&["queue", "--help"]);
    assert_exit(&out, 0);
    let columns: std::collections::BTreeSet<usize> = stdout(&out)
        .lines()
        .filter(|l| l.starts_with("  "))
        .map(|l| {
            let text = l.trim_start();
            let gap = text.find("  ").unwrap();
            l.len() - text.len() + gap + (text[gap..].len() - text[gap..].trim_start().len())
        })
        .collect();
    assert_eq!(columns.len(), 1, "{}", stdout(&out));
}

#[test]
fn report_prints_its_seqs_and_not_found_and_empty_results_say_so() {
    let agent = Agent::start(AgentOptions::default());
    // `report` says what it queued, with the seqs the daemon answered; -q says nothing.
    let out = agent.cli(&["report", "a=1", "b=2", "c=3"]);
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), "queued 3 changes: seq 1-3\n");
    let out = agent.cli(&["report", "a=4"]);
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), "queued 1 change: seq 4\n");
    for quiet in ["-q", "--quiet"] {
        let out = agent.cli(&["report", quiet, "a=5"]);
        assert_exit(&out, 0);
        assert_eq!(stdout(&out), "", "{quiet}");
    }
    let input = b"{\"key\":\"s\",\"value\":1}\n{\"key\":\"s\",\"value\":2}\n".to_vec();
    let out = agent.cli_stdin(&["report", "--stdin"], input, CLI_DEADLINE);
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), "queued 2 changes: seq 7-8\n");

    // Not found is exit 1 with a message on stderr, for `get` and `history` alike.
    let out = agent.cli(&["get", "reported", "nokey"]);
    assert_exit(&out, 1);
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    assert!(
        common::stderr(&out).contains("no reported value for key nokey"),
        "{}",
        common::stderr(&out)
    );
    let out = agent.cli(&["history", "nokey"]);
    assert_exit(&out, 1);
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    assert!(
        common::stderr(&out).contains("no desired values recorded for key nokey"),
        "{}",
        common::stderr(&out)
    );
    let out = agent.cli(&["history", "nokey", "--json"]);
    assert_exit(&out, 1);
    assert_eq!(stdout(&out).trim(), "[]");
    // An empty document is an empty object, not a failure.
    let out = agent.cli(&["get", "desired"]);
    assert_exit(&out, 0);
    assert_eq!(stdout(&out).trim(), "{}");

    // An empty peek says so (NDJSON stays empty).
    let out = agent.cli(&["queue", "peek", "--from", "100"]);
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), "queue empty (from seq 100)\n");
    let out = agent.cli(&["queue", "peek", "--from", "100", "--json"]);
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), "");
}
