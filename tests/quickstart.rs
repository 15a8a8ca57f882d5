//! The README's "Real broker in five minutes", run as written: `examples/quickstart/quickstart.sh`
//! into a temporary directory (on a free port), then every command of the README section
//! between `<!-- quickstart:begin -->` and `<!-- quickstart:end -->`, each through `sh -c`, with
//! the real binary first in `PATH`, a real Mosquitto and the real `mosquitto_sub` /
//! `mosquitto_pub` over mutual TLS. The section must be exactly what the script prints (port
//! 8883), and every step must be one this test knows how to check: a README that drifts from
//! the script or gains a step fails here.
//!
//! The second test uses the examples of `examples/handlers/` (exec, file, merge) and the Python
//! client of `examples/python/` as a watch handler, against the same quick-start broker.
//!
//! Needs openssl, mosquitto and mosquitto-clients: skipped with a notice when one is missing,
//! unless `EDGESYNC_REQUIRE_MOSQUITTO=1` (CI) makes that a failure. The watch part needs
//! python3 (`EDGESYNC_REQUIRE_PYTHON=1` makes a missing one a failure).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{BIN, assert_exit, run_with_timeout, stderr, stdout, wait_until};
use edgesync_testkit::free_port;
use serde_json::{Value, json};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const DEADLINE: Duration = Duration::from_secs(30);
const TOPIC: &str = "edgesync/demo-1";

/// `PATH` with the binary under test first and `/usr/sbin` (Mosquitto on Debian) last.
fn test_path() -> String {
    let bin_dir = Path::new(BIN).parent().unwrap().display().to_string();
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{bin_dir}:{path}:/usr/sbin")
}

fn which(tool: &str) -> bool {
    std::env::split_paths(&test_path()).any(|d| d.join(tool).is_file())
}

/// Whether every tool is there; a missing one skips (notice) unless required.
fn tools(needed: &[&str], require_env: &str) -> bool {
    let missing: Vec<&str> = needed.iter().copied().filter(|t| !which(t)).collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var(require_env).as_deref() != Ok("1"),
        "{require_env}=1 but {missing:?} not installed"
    );
    eprintln!("SKIPPED: {missing:?} not installed (set {require_env}=1 to make this an error)");
    false
}

/// The README's quick-start commands: the `sh` block between the markers, `\` continuations
/// joined, blank lines and comments left out.
fn readme_commands() -> Vec<String> {
    let readme = fs::read_to_string(Path::new(REPO).join("README.md")).unwrap();
    let start = readme
        .find("<!-- quickstart:begin -->")
        .expect("README: no quickstart:begin marker");
    let end = readme
        .find("<!-- quickstart:end -->")
        .expect("README: no quickstart:end marker");
    let block = &readme[start..end];
    let body = block
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("README: no ```sh block between the quickstart markers")
        .0;
    logical_lines(body)
}

fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            continue;
        }
        current.push_str(line);
        let l = current.trim().to_owned();
        current.clear();
        if !l.is_empty() && !l.starts_with('#') {
            lines.push(l);
        }
    }
    lines
}

/// Children killed and reaped on drop, so a failing test leaves no broker or agent behind.
#[derive(Default)]
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The quick start in a temporary directory: the script's output, its directory and port.
struct Quickstart {
    dir: tempfile::TempDir,
    port: u16,
    printed: String,
    logs: usize,
}

impl Quickstart {
    fn make() -> Quickstart {
        // Under /tmp: the socket path must stay short.
        let dir = tempfile::Builder::new()
            .prefix("esqs")
            .tempdir_in("/tmp")
            .unwrap();
        let port = free_port();
        let mut cmd = Command::new(Path::new(REPO).join("examples/quickstart/quickstart.sh"));
        cmd.current_dir(dir.path())
            .env("PATH", test_path())
            .env("QUICKSTART_PORT", port.to_string());
        let out = run_with_timeout(cmd, None, DEADLINE);
        assert_exit(&out, 0);
        Quickstart {
            dir,
            port,
            printed: stdout(&out),
            logs: 0,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `sh -c LINE` in the directory, with the test's `PATH`.
    fn sh(&self, line: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(line)
            .current_dir(self.dir.path())
            .env("PATH", test_path())
            .env_remove("EDGESYNC_CONFIG")
            .env_remove("EDGESYNC_LOG");
        cmd
    }

    fn run(&self, line: &str) -> Output {
        let out = run_with_timeout(self.sh(line), None, DEADLINE);
        assert_exit(&out, 0);
        out
    }

    /// Starts a long-running `LINE` (`exec`: the child is the program itself); its output
    /// goes to a file, whose path is returned.
    fn spawn(&mut self, procs: &mut Procs, line: &str) -> PathBuf {
        self.logs += 1;
        let log = self.path(&format!("out.{}.log", self.logs));
        let f = fs::File::create(&log).unwrap();
        let child = self
            .sh(&format!("exec {line}"))
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        procs.0.push(child);
        log
    }

    /// Starts the broker and waits until it accepts connections.
    fn broker(&mut self, procs: &mut Procs, line: &str) -> PathBuf {
        let log = self.spawn(procs, line);
        let port = self.port;
        wait_until("mosquitto to listen", DEADLINE, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        log
    }

    /// Starts the agent and waits until it is online.
    fn agent(&mut self, procs: &mut Procs, line: &str) -> PathBuf {
        let log = self.spawn(procs, line);
        wait_until("the agent to be online", DEADLINE, || {
            let out = run_with_timeout(
                self.sh("edgesync -c quickstart/edgesync.toml status --json"),
                None,
                DEADLINE,
            );
            serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|v| v["connection"]["state"] == "online")
        });
        log
    }

    /// The messages `mosquitto_sub -v` printed so far: (topic, JSON payload).
    fn messages(log: &Path) -> Vec<(String, Value)> {
        fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter_map(|(t, p)| Some((t.to_owned(), serde_json::from_str(p).ok()?)))
            .collect()
    }

    /// Waits for a message on `topic` that satisfies `check`; returns it.
    fn wait_message(log: &Path, topic: &str, check: impl Fn(&Value) -> bool) -> Value {
        let mut found = None;
        wait_until(&format!("a message on {topic}"), DEADLINE, || {
            found = Self::messages(log)
                .into_iter()
                .find(|(t, v)| t == topic && check(v))
                .map(|(_, v)| v);
            found.is_some()
        });
        found.unwrap()
    }
}

/// The commands the script printed: the lines after its first blank line.
fn printed_commands(printed: &str) -> Vec<String> {
    let rest = printed
        .split_once("\n\n")
        .expect("the script prints its commands after a blank line")
        .1;
    logical_lines(rest)
}

#[test]
fn readme_quick_start_runs_as_written() {
    if !tools(
        &["openssl", "mosquitto", "mosquitto_sub", "mosquitto_pub"],
        "EDGESYNC_REQUIRE_MOSQUITTO",
    ) {
        return;
    }
    let mut qs = Quickstart::make();
    let port = qs.port.to_string();
    // The README shows what the script prints for the default port.
    let readme: Vec<String> = readme_commands()
        .iter()
        .map(|l| l.replace(" -p 8883 ", &format!(" -p {port} ")))
        .collect();
    assert_eq!(
        readme,
        printed_commands(&qs.printed),
        "the README's quick-start section differs from what quickstart.sh prints"
    );
    // What the script promised: a private device key, a broker certificate for localhost.
    let mode = fs::metadata(qs.path("quickstart/device.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "device.key mode {mode:o}");
    let san = qs.run("openssl x509 -in quickstart/broker.pem -noout -ext subjectAltName");
    let san = stdout(&san);
    assert!(
        san.contains("DNS:localhost") && san.contains("IP Address:127.0.0.1"),
        "{san}"
    );

    let mut procs = Procs::default();
    let mut sub = None;
    for line in &readme {
        let sub_log = || sub.clone().expect("mosquitto_sub comes before this step");
        if line.starts_with("mosquitto -c ") {
            qs.broker(&mut procs, line);
        } else if line.starts_with("edgesync ") && line.ends_with(" run") {
            qs.agent(&mut procs, line);
        } else if line.starts_with("mosquitto_sub ") {
            let log = qs.spawn(&mut procs, line);
            // Subscribed once the agent's retained presence arrives.
            Quickstart::wait_message(&log, &format!("{TOPIC}/status"), |v| v["state"] == "online");
            sub = Some(log);
        } else if line.contains(" report temp=21.5 mode=eco") {
            qs.run(line);
            let batch = Quickstart::wait_message(&sub_log(), &format!("{TOPIC}/reported"), |v| {
                v["changes"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["key"] == "temp"))
            });
            assert_eq!(batch["device"], "demo-1", "{batch}");
            let changes = batch["changes"].as_array().unwrap();
            let value = |k: &str| changes.iter().find(|c| c["key"] == k).unwrap()["value"].clone();
            assert_eq!(value("temp"), json!(21.5), "{batch}");
            assert_eq!(value("mode"), json!("eco"), "{batch}");
        } else if line.contains(&format!("-t {TOPIC}/desired ")) {
            qs.run(line);
            let result =
                Quickstart::wait_message(&sub_log(), &format!("{TOPIC}/desired/result"), |_| true);
            assert_eq!(
                result,
                json!({"version": 1, "status": "applied", "keys": {"setpoint": {"status": "applied", "handler": "none"}}})
            );
        } else if line.ends_with(" get desired") {
            let out = qs.run(line);
            let got: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(got, json!({"setpoint": 20}), "{}", stderr(&out));
        } else if line.contains(&format!("-t {TOPIC}/cmd/ping ")) {
            qs.run(line);
            let answer =
                Quickstart::wait_message(&sub_log(), &format!("{TOPIC}/cmd/ping/result"), |_| true);
            assert_eq!(answer["id"], "req-1", "{answer}");
            assert_eq!(answer["ok"], true, "{answer}");
            assert_eq!(answer["result"]["pong"], true, "{answer}");
        } else {
            panic!("the README's quick start has a step this test does not check: {line}");
        }
    }
    assert!(
        sub.is_some(),
        "the README's quick start has no mosquitto_sub"
    );
}

/// `examples/handlers/handlers.toml` with its programs and files moved into the quick start's
/// directory (the only edit: the install paths).
fn example_handlers(qs: &Quickstart) -> String {
    let text = fs::read_to_string(Path::new(REPO).join("examples/handlers/handlers.toml")).unwrap();
    let state = qs.path("state");
    fs::create_dir_all(state.join("display")).unwrap();
    text.replace(
        "/usr/local/lib/edgesync/",
        &format!("{REPO}/examples/handlers/"),
    )
    .replace("/var/lib/edgesync/", &format!("{}/", state.display()))
}

#[test]
fn example_handlers_and_the_python_watcher_apply_desired_values() {
    if !tools(
        &["openssl", "mosquitto", "mosquitto_sub", "mosquitto_pub"],
        "EDGESYNC_REQUIRE_MOSQUITTO",
    ) || !tools(&["python3"], "EDGESYNC_REQUIRE_PYTHON")
    {
        return;
    }
    let mut qs = Quickstart::make();
    let config = qs.path("quickstart/edgesync.toml");
    let mut text = fs::read_to_string(&config).unwrap();
    text.push_str(&example_handlers(&qs));
    fs::write(&config, text).unwrap();

    let port = qs.port;
    let tls = format!(
        "-h localhost -p {port} --cafile quickstart/ca.pem --cert quickstart/cloud.pem \
         --key quickstart/cloud.key"
    );
    let mut procs = Procs::default();
    qs.broker(&mut procs, "mosquitto -c quickstart/mosquitto.conf");
    qs.agent(&mut procs, "edgesync -c quickstart/edgesync.toml run");
    let sub = qs.spawn(
        &mut procs,
        &format!("mosquitto_sub {tls} -t '{TOPIC}/#' -v"),
    );
    Quickstart::wait_message(&sub, &format!("{TOPIC}/status"), |v| v["state"] == "online");
    // The Python client takes led.* (watch handler) and acks each event applied.
    let socket = qs.path("quickstart/edgesync.sock");
    let watcher = qs.spawn(
        &mut procs,
        &format!(
            "python3 -u {REPO}/examples/python/edgesync_client.py --socket {} watch 'led.*'",
            socket.display()
        ),
    );
    wait_until("the Python watcher to watch", DEADLINE, || {
        fs::read_to_string(&watcher).is_ok_and(|t| t.contains(r#"{"watching": ["led.*"]}"#))
    });

    // The device changed "schedule" and the change reached the broker: the cloud's document,
    // issued before it (ts 1), conflicts and merge.py decides.
    qs.run(
        r#"edgesync -c quickstart/edgesync.toml report 'schedule={"mon":"8-17","sat":"10-12"}'"#,
    );
    wait_until("the queue to drain", DEADLINE, || {
        let out = qs.run("edgesync -c quickstart/edgesync.toml status --json");
        serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|v| v["queue"]["depth"] == 0)
    });

    let mut version = 0;
    let mut publish = |state: Value| -> Value {
        version += 1;
        let doc = json!({"version": version, "ts": 1, "state": state});
        qs.run(&format!(
            "mosquitto_pub {tls} -t {TOPIC}/desired -m '{doc}'"
        ));
        Quickstart::wait_message(&sub, &format!("{TOPIC}/desired/result"), |r| {
            r["version"] == version
        })
    };
    let led = publish(json!({"led.mode": "blink"}));
    assert_eq!(led["status"], "applied", "{led}");
    let event = fs::read_to_string(&watcher).unwrap();
    assert!(
        event.contains(r#"{"key": "led.mode", "value": "blink""#),
        "{event}"
    );

    let result = publish(json!({
        "setpoint": 21.5,
        "display.line1": "hello",
        "schedule": {"mon": "9-17", "sun": "off"},
    }));
    assert_eq!(result["status"], "applied", "{result}");
    assert_eq!(
        fs::read_to_string(qs.path("state/setpoint")).unwrap(),
        "21.5\n"
    );
    assert_eq!(
        fs::read_to_string(qs.path("state/display/display.line1.json")).unwrap(),
        "\"hello\"\n"
    );
    let out = qs.run("edgesync -c quickstart/edgesync.toml get desired schedule");
    let merged: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(merged, json!({"mon": "9-17", "sat": "10-12", "sun": "off"}));

    // Out of range: the exec handler fails the key with its message.
    let failed = publish(json!({"setpoint": 99}));
    // Its only key failed: the document failed (docs/PROTOCOL.md §5.3).
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["keys"]["setpoint"]["status"], "failed", "{failed}");
    assert!(
        failed["keys"]["setpoint"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("out of range"),
        "{failed}"
    );
}

/// `examples/python/test_edgesync_client.py` (unittest) against the binary under test, so that
/// `cargo test` covers the Python client too.
#[test]
fn python_client_tests_pass_against_the_real_agent() {
    if !tools(&["python3"], "EDGESYNC_REQUIRE_PYTHON") {
        return;
    }
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "unittest", "discover", "-s", "examples/python", "-v"])
        .current_dir(REPO)
        .env("PATH", test_path())
        .env("EDGESYNC_BIN", BIN)
        // Set: a skipped Python test would hide a broken client.
        .env("EDGESYNC_REQUIRE_PYTHON", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let out = run_with_timeout(cmd, None, Duration::from_secs(120));
    assert_exit(&out, 0);
    let report = stderr(&out);
    assert!(
        report.contains("\nOK") && !report.contains("skipped"),
        "{report}"
    );
}
