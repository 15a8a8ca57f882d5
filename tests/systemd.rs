//! systemd integration (issue 5, points 4 and 5): the real binary notifying a test
//! `NOTIFY_SOCKET` (READY, STATUS, WATCHDOG, STOPPING, and the watchdog going quiet when the
//! store writer or the link is stuck), journal-style logs under `JOURNAL_STREAM`, and the
//! agent at work under the hardened unit `systemd/edgesync.service`, run by a real systemd.
//!
//! # The hardened unit under systemd
//! [`hardened_unit_under_systemd`] needs root and a machine where systemd is not PID 1 (CI's
//! and the developers' here): it starts its own systemd *user* manager in a private mount
//! namespace (`unshare -m`, a tmpfs on `/run`) and runs the unit there, with only these
//! changes: ExecStart points at the binary under test and a test config; `User=`/`Group=`
//! are dropped (a user manager cannot switch users; it runs as root, with an empty
//! capability bounding set); `SystemCallErrorNumber=` is dropped, so a system call outside
//! the filter kills the agent with SIGSYS instead of failing quietly; `WatchdogSec=` and
//! `RestartSec=` are shortened; its output goes to a file (no journald); the directories
//! live where a user manager puts them ($XDG_STATE_HOME, $XDG_CONFIG_HOME,
//! $XDG_RUNTIME_DIR). Every sandboxing directive is applied by systemd itself. Without the
//! prerequisites the test is skipped with a notice; `EDGESYNC_REQUIRE_SYSTEMD=1`
//! (.ci/systemd-check) makes that a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::cloud::{decode, pki, unique};
use common::rig::broker_and_cloud;
use common::{Agent, AgentOptions, BIN, report_req, try_request, wait_timeout};
use serde_json::{Value, json};

/// How long a notification may take to come.
const NOTIFY_DEADLINE: Duration = Duration::from_secs(15);

/// A test `NOTIFY_SOCKET`: records every datagram with its arrival time. On `READY=1` it
/// asks the agent's socket for a status at once, once, and records whether that worked.
struct Notifications {
    path: PathBuf,
    msgs: Arc<Mutex<Vec<(Instant, String)>>>,
    ready_probe: Arc<Mutex<Option<Result<Value, String>>>>,
    probe_socket: Arc<Mutex<Option<PathBuf>>>,
    done: Arc<AtomicBool>,
    reader: Option<thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Notifications {
    fn bind() -> Notifications {
        let dir = tempfile::Builder::new()
            .prefix("esn")
            .tempdir_in("/tmp")
            .unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let ready_probe = Arc::new(Mutex::new(None));
        let probe_socket: Arc<Mutex<Option<PathBuf>>> = Arc::new(Mutex::new(None));
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (msgs, ready_probe, probe_socket, done) = (
                Arc::clone(&msgs),
                Arc::clone(&ready_probe),
                Arc::clone(&probe_socket),
                Arc::clone(&done),
            );
            thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while !done.load(Ordering::SeqCst) {
                    let n = match socket.recv(&mut buf) {
                        Ok(n) => n,
                        // Signals to the test process (children exiting) interrupt it.
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock
                                    | ErrorKind::TimedOut
                                    | ErrorKind::Interrupted
                            ) =>
                        {
                            continue;
                        }
                        Err(e) => panic!("notify socket: {e}"),
                    };
                    let at = Instant::now();
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let is_ready = text.lines().any(|l| l == "READY=1");
                    msgs.lock().unwrap().push((at, text));
                    if is_ready {
                        let socket = probe_socket.lock().unwrap().clone();
                        if let Some(s) = socket {
                            let r = try_request(&s, &json!({"op": "status"}))
                                .map_err(|e| e.to_string());
                            *ready_probe.lock().unwrap() = Some(r);
                        }
                    }
                }
            })
        };
        Notifications {
            path,
            msgs,
            ready_probe,
            probe_socket,
            done,
            reader: Some(reader),
            _dir: dir,
        }
    }

    /// The agent options' environment for this socket and a watchdog of `watchdog_usec`.
    fn env(&self, watchdog_usec: Option<u64>) -> Vec<(String, String)> {
        let mut env = vec![(
            "NOTIFY_SOCKET".to_owned(),
            self.path.to_string_lossy().into_owned(),
        )];
        if let Some(us) = watchdog_usec {
            env.push(("WATCHDOG_USEC".into(), us.to_string()));
        }
        env
    }

    /// Probe this local socket when READY=1 comes.
    fn probe_on_ready(&self, socket: &Path) {
        *self.probe_socket.lock().unwrap() = Some(socket.to_path_buf());
    }

    fn messages(&self) -> Vec<(Instant, String)> {
        self.msgs.lock().unwrap().clone()
    }

    /// Waits for the first message that `pred` accepts.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> (Instant, String) {
        let deadline = Instant::now() + NOTIFY_DEADLINE;
        loop {
            if let Some(m) = self.messages().into_iter().find(|(_, m)| pred(m)) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "no notification {what} within {NOTIFY_DEADLINE:?}; got {:?}",
                self.texts()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn texts(&self) -> Vec<String> {
        self.messages().into_iter().map(|(_, m)| m).collect()
    }

    /// Arrival times of the `WATCHDOG=1` pings.
    fn pings(&self) -> Vec<Instant> {
        self.messages()
            .into_iter()
            .filter(|(_, m)| m == "WATCHDOG=1")
            .map(|(t, _)| t)
            .collect()
    }

    fn wait_pings(&self, n: usize) -> Vec<Instant> {
        let deadline = Instant::now() + NOTIFY_DEADLINE;
        loop {
            let pings = self.pings();
            if pings.len() >= n {
                return pings;
            }
            assert!(
                Instant::now() < deadline,
                "only {} WATCHDOG=1 within {NOTIFY_DEADLINE:?}; got {:?}",
                pings.len(),
                self.texts()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn start_notified(n: &Notifications, env: Vec<(String, String)>) -> Agent {
    let mut agent = Agent::prepare(AgentOptions {
        env,
        ..AgentOptions::default()
    });
    n.probe_on_ready(&agent.socket);
    agent.launch();
    agent
}

#[test]
fn ready_status_watchdog_and_stopping() {
    let n = Notifications::bind();
    // WatchdogSec=1s: pings are due every 500 ms.
    let mut agent = start_notified(&n, n.env(Some(1_000_000)));

    // READY=1 comes first, with a status line, and the socket answers at that moment.
    let (ready_at, ready) = n.wait_for("READY=1", |m| m.starts_with("READY=1"));
    assert_eq!(
        n.texts().first().map(String::as_str),
        Some(ready.as_str()),
        "READY=1 must be the first message"
    );
    assert!(
        ready.contains("\nSTATUS=") && ready.contains(" · 0 queued"),
        "{ready:?}"
    );
    let deadline = Instant::now() + NOTIFY_DEADLINE;
    let probe = loop {
        if let Some(p) = n.ready_probe.lock().unwrap().clone() {
            break p;
        }
        assert!(Instant::now() < deadline, "READY=1 was not probed");
        thread::sleep(Duration::from_millis(5));
    };
    let status = probe.expect("the local socket must answer as soon as READY=1 is sent");
    assert_eq!(status["ok"], true, "{status}");

    // STATUS= follows the queue.
    let r = agent.request(&report_req([
        ("a", json!(1)),
        ("b", json!(2)),
        ("c", json!(3)),
    ]));
    assert_eq!(r["ok"], true, "{r}");
    let (_, line) = n.wait_for("STATUS= with 3 queued", |m| {
        m.starts_with("STATUS=") && m.contains(" · 3 queued")
    });
    // Offline (no broker here): the state and the reason are in the line.
    assert!(
        line.starts_with("STATUS=offline · 3 queued · no desired state · last error: ")
            || line.starts_with("STATUS=connecting · 3 queued"),
        "{line:?}"
    );

    // WATCHDOG=1 about every 500 ms, from an idle, offline agent.
    let pings = n.wait_pings(5);
    assert!(
        pings[0] - ready_at < Duration::from_millis(1500),
        "first ping {:?} after READY",
        pings[0] - ready_at
    );
    // On average WatchdogSec/2 apart: not at the (faster) pulse of the monitored loops, and
    // well within WatchdogSec. Each gap is judged loosely (receive times jitter under load).
    let average = (pings[4] - pings[0]) / 4;
    assert!(
        average >= Duration::from_millis(400) && average <= Duration::from_millis(1000),
        "pings {average:?} apart on average: expected about WatchdogSec/2 = 500ms"
    );
    for w in pings.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(150),
            "pings {:?} apart",
            w[1] - w[0]
        );
    }

    // SIGTERM: STOPPING=1, and no ping after it.
    agent.stop();
    n.wait_for("STOPPING=1", |m| m.starts_with("STOPPING=1"));
    let texts = n.texts();
    let stopping = texts
        .iter()
        .position(|m| m.starts_with("STOPPING=1"))
        .unwrap();
    assert!(
        !texts[stopping..].iter().any(|m| m == "WATCHDOG=1"),
        "a ping after STOPPING=1: {texts:?}"
    );
}

#[test]
fn a_watchdog_meant_for_another_pid_gets_no_pings() {
    // WATCHDOG_PID of another process (e.g. inherited from a parent): no pings.
    let n = Notifications::bind();
    let mut env = n.env(Some(400_000));
    env.push(("WATCHDOG_PID".into(), "1".into()));
    let mut agent = start_notified(&n, env);
    n.wait_for("READY=1", |m| m.starts_with("READY=1"));
    thread::sleep(Duration::from_millis(1200));
    assert!(n.pings().is_empty(), "{:?}", n.texts());
    agent.stop();
    n.wait_for("STOPPING=1", |m| m.starts_with("STOPPING=1"));
    assert!(!agent.log().contains("systemd watchdog"), "{}", agent.log());
}

/// Starts an agent whose `stall_var` loop gets stuck 1.5 s after start, and checks that the
/// pings stop and the status line names `loop_name`.
fn pings_stop_when_stuck(stall_var: &str, loop_name: &str) {
    if common::no_debug_hooks() {
        return;
    }
    let n = Notifications::bind();
    let mut env = n.env(Some(600_000));
    env.push((stall_var.to_owned(), "1500".into()));
    let agent = start_notified(&n, env);
    n.wait_for("READY=1", |m| m.starts_with("READY=1"));
    let (stuck_seen, line) = n.wait_for(&format!("a STATUS= naming the {loop_name}"), |m| {
        m.starts_with("STATUS=") && m.contains(&format!("watchdog: {loop_name} not responding"))
    });
    assert!(
        n.pings().len() >= 2,
        "pings before the stall: {:?}",
        n.texts()
    );
    // Quiet from then on: 3 watchdog intervals without a ping.
    thread::sleep(Duration::from_millis(1800));
    let late: Vec<_> = n.pings().into_iter().filter(|t| *t > stuck_seen).collect();
    assert!(
        late.is_empty(),
        "{} pings after the {loop_name} got stuck ({line:?}): {:?}",
        late.len(),
        n.texts()
    );
    // The rest of the agent still answers.
    assert_eq!(agent.status()["ok"], true);
    let log = agent.log();
    assert!(
        log.contains(&format!("watchdog: not pinging systemd: {loop_name}")),
        "{log}"
    );
    // Dropping the agent kills it (a stuck store writer would hold up a clean stop, which
    // is what systemd's watchdog is for).
}

#[test]
fn pings_stop_when_the_store_writer_is_stuck() {
    pings_stop_when_stuck("EDGESYNC_DEBUG_STALL_WRITER_AFTER_MS", "store writer");
}

#[test]
fn pings_stop_when_the_link_is_stuck() {
    pings_stop_when_stuck("EDGESYNC_DEBUG_STALL_LINK_AFTER_MS", "MQTT link");
}

/// Runs `edgesync run` on a pseudo-terminal (script(1)) for 3 s; returns what it printed.
fn run_on_a_terminal() -> Option<String> {
    let agent = Agent::prepare(AgentOptions::default());
    let out = agent.dir().join("tty.out");
    let inner = format!(
        "timeout --preserve-status -s TERM 3 {} run --config {}",
        BIN,
        agent.config_path.display()
    );
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-e", "-c", &inner])
        .arg(&out)
        .env_remove("EDGESYNC_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            common::skip_unless_required(
                "EDGESYNC_REQUIRE_SCRIPT",
                &format!("the terminal part: script(1) not available: {e}"),
            );
            return None;
        }
    };
    let status = wait_timeout(&mut child, Duration::from_secs(20)).expect("script finished");
    assert!(status.success(), "edgesync under script(1): {status}");
    Some(std::fs::read_to_string(&out).unwrap().replace('\r', ""))
}

/// Runs `edgesync run` for 3 s with stderr on a file, as journald's stream socket would be
/// (`JOURNAL_STREAM` = the file's `DEVICE:INODE`, or another stream's when `inherited`).
fn run_with_journal_stream(inherited: bool) -> String {
    use std::os::unix::fs::MetadataExt;
    let agent = Agent::prepare(AgentOptions::default());
    let path = agent.dir().join("stderr.out");
    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let ino = meta.ino() + u64::from(inherited);
    let mut child = Command::new("timeout")
        .args([
            "--preserve-status",
            "-s",
            "TERM",
            "3",
            BIN,
            "run",
            "--config",
        ])
        .arg(&agent.config_path)
        .env_remove("EDGESYNC_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env("JOURNAL_STREAM", format!("{}:{ino}", meta.dev()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(20)).expect("agent finished");
    assert!(status.success(), "edgesync run: {status}");
    std::fs::read_to_string(&path).unwrap()
}

/// Removes SGR sequences (`ESC [ ... m`).
fn strip_colours(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether a log line (not script(1)'s own header and footer) starts with an RFC 3339 time.
fn has_timestamps(log: &str) -> bool {
    let log = strip_colours(log);
    log.lines().filter(|l| !l.starts_with("Script ")).any(|l| {
        let b = l.as_bytes();
        b.len() > 20
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && l[..4].parse::<u16>().is_ok()
    })
}

#[test]
fn journal_stream_logs_have_priorities_and_no_timestamps_or_colours() {
    let on_tty = thread::spawn(run_on_a_terminal);
    let inherited = thread::spawn(|| run_with_journal_stream(true));
    let journal = run_with_journal_stream(false);
    // Under systemd (JOURNAL_STREAM names stderr): `<N>` syslog priorities, which journald
    // strips and keeps (`journalctl -p`), no time (the journal adds it), no colours.
    assert!(journal.contains("serving device"), "{journal}");
    assert!(
        !journal.contains('\x1b'),
        "colours under journald: {journal:?}"
    );
    assert!(
        !has_timestamps(&journal),
        "timestamps under journald: {journal:?}"
    );
    assert!(
        journal.lines().any(|l| l.starts_with("<6>INFO edgesync ")),
        "{journal}"
    );
    assert!(
        journal.lines().all(|l| l.len() > 3
            && l.starts_with('<')
            && matches!(l.as_bytes()[1], b'3'..=b'7')
            && l.as_bytes()[2] == b'>'),
        "a line without a priority: {journal}"
    );
    // JOURNAL_STREAM inherited from a service but stderr elsewhere: ordinary lines.
    let inherited = inherited.join().unwrap();
    assert!(inherited.contains("serving device"), "{inherited}");
    assert!(!inherited.contains("<6>"), "{inherited}");
    assert!(has_timestamps(&inherited), "{inherited}");
    // On a terminal without JOURNAL_STREAM: timestamped, plain text (the "ansi" feature is
    // left out for the size budget).
    if let Some(tty) = on_tty.join().unwrap() {
        assert!(tty.contains("serving device"), "{tty}");
        assert!(!tty.contains("\x1b["), "colours on a terminal: {tty:?}");
        assert!(!tty.contains("<6>"), "{tty}");
        assert!(has_timestamps(&tty), "no timestamps on a terminal: {tty:?}");
    }
}

// --- The hardened unit, run by systemd ---------------------------------------------------

/// Where the test's systemd user manager keeps everything (a tmpfs in its mount namespace).
const BASE: &str = "/run/es";
const CONFIG: &str = "/run/es/config/edgesync/edgesync.toml";
const STATE: &str = "/run/es/state/edgesync";

/// Why the hardened-unit test cannot run here, if it cannot.
fn systemd_prerequisites() -> Result<PathBuf, String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !status
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
    {
        return Err("needs root (a mount namespace and a systemd manager of its own)".into());
    }
    if Path::new("/run/systemd/system").exists() {
        return Err(
            "systemd runs this machine: this test starts its own manager only where none runs"
                .into(),
        );
    }
    let systemd = ["/lib/systemd/systemd", "/usr/lib/systemd/systemd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or("no systemd binary (apt-get install systemd)")?;
    for tool in ["unshare", "nsenter", "systemctl", "mount"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!("{tool} not found"));
        }
    }
    Ok(systemd)
}

/// A systemd user manager in a private mount namespace, and the service's files.
struct UserManager {
    manager: Child,
    pid: u32,
    cgroups: Vec<PathBuf>,
    src: tempfile::TempDir,
}

impl UserManager {
    /// `files`: name → contents, copied into the manager's config dir (`edgesync/...`,
    /// `systemd/user/...`) before it starts.
    fn start(systemd: &Path, files: &[(&str, Vec<u8>)]) -> UserManager {
        let src = tempfile::tempdir().unwrap();
        for (name, data) in files {
            let p = src.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, data).unwrap();
            if name.ends_with(".key") {
                // The agent refuses a private key readable by other users.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
        // Its own cgroup first: a manager started in the machine's root cgroup would take
        // over that cgroup and move every process of it into its init.scope.
        let cg = format!("edgesync-test-{}", unique());
        let script = format!(
            r#"set -eu
for root in /sys/fs/cgroup /sys/fs/cgroup/unified /sys/fs/cgroup/systemd; do
  if [ -f "$root/cgroup.procs" ]; then
    mkdir -p "$root/{cg}" && echo $$ > "$root/{cg}/cgroup.procs" || exit 3
  fi
done
mount -t tmpfs -o mode=0755 tmpfs /run
# What PID 1 would have made: the marker of a systemd-run machine, and the inaccessible
# nodes that ProtectHome= and friends mount over hidden paths.
mkdir -p /run/systemd/system /run/systemd/inaccessible/dir
touch /run/systemd/inaccessible/reg
mkfifo /run/systemd/inaccessible/fifo
mknod /run/systemd/inaccessible/chr c 0 0
mknod /run/systemd/inaccessible/blk b 0 0
chmod 0000 /run/systemd/inaccessible/*
mkdir -p {BASE}/rt {BASE}/state {BASE}/cache {BASE}/home {BASE}/config
chmod 0700 {BASE}/rt
cp -R "$SRC/." {BASE}/config/
# The binary under test, wherever the checkout is (ProtectHome= would hide /root, /home).
touch {BASE}/edgesync
mount --bind "$BIN" {BASE}/edgesync
export XDG_RUNTIME_DIR={BASE}/rt XDG_STATE_HOME={BASE}/state XDG_CONFIG_HOME={BASE}/config \
  XDG_CACHE_HOME={BASE}/cache HOME={BASE}/home
exec "$SYSTEMD" --user
"#
        );
        let manager = Command::new("unshare")
            .args(["-m", "--propagation", "private", "--", "sh", "-c", &script])
            .env("SRC", src.path())
            .env("BIN", BIN)
            .env("SYSTEMD", systemd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn unshare");
        let pid = manager.id();
        // Every hierarchy (the manager may make cgroups in the v1 controllers' too).
        let mut cgroups = vec![Path::new("/sys/fs/cgroup").join(&cg)];
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            cgroups.extend(rd.flatten().map(|e| e.path().join(&cg)));
        }
        let mut um = UserManager {
            manager,
            pid,
            cgroups,
            src,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = um.ctl(&["is-system-running"]);
            let state = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            if state == "running" || state == "degraded" {
                break;
            }
            if let Ok(Some(s)) = um.manager.try_wait() {
                panic!(
                    "the systemd user manager exited with {s} (3: no cgroup of its own could be made)"
                );
            }
            assert!(
                Instant::now() < deadline,
                "the systemd user manager did not come up: {state:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        um
    }

    /// A command inside the manager's mount namespace, with its environment.
    fn ns(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-m", "--"])
            .args(["env", &format!("XDG_RUNTIME_DIR={BASE}/rt")])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run nsenter")
    }

    fn ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["systemctl", "--user", "--no-pager"];
        all.extend_from_slice(args);
        self.ns(&all)
    }

    /// One property of the service.
    fn show(&self, prop: &str) -> String {
        let o = self.ctl(&["show", "-p", prop, "--value", "edgesync.service"]);
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    }

    /// What the service printed (all runs).
    fn log(&self) -> String {
        String::from_utf8_lossy(&self.ns(&["cat", &format!("{BASE}/agent.log")]).stdout)
            .into_owned()
    }

    fn context(&self) -> String {
        let status = self.ctl(&["status", "edgesync.service"]);
        format!(
            "systemctl status:\n{}\nagent log:\n{}",
            String::from_utf8_lossy(&status.stdout),
            self.log()
        )
    }
}

impl Drop for UserManager {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop", "edgesync.service"]);
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if wait_timeout(&mut self.manager, Duration::from_secs(10)).is_none() {
            let _ = self.manager.kill();
            let _ = self.manager.wait();
        }
        // Anything left in the test's cgroups, then the cgroups themselves (deepest first).
        for root in &self.cgroups {
            let mut dirs = Vec::new();
            collect_dirs(root, &mut dirs);
            for d in dirs.iter().rev() {
                for pid in std::fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            for d in dirs.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
        }
        if thread::panicking() {
            eprintln!("--- unit files in {}", self.src.path().display());
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    out.push(dir.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// The shipped unit with the test's changes (see the module docs).
fn test_unit() -> String {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/edgesync.service"),
    )
    .unwrap();
    let mut out = String::new();
    for line in shipped.lines() {
        let key = line.split('=').next().unwrap_or("");
        match key {
            "ExecStart" => {
                out.push_str(&format!(
                    "ExecStart={BASE}/edgesync run --config {CONFIG}\n"
                ));
            }
            "User" | "Group" | "SystemCallErrorNumber" => {
                out.push_str(&format!("# test: dropped {line}\n"));
            }
            "WatchdogSec" => out.push_str("WatchdogSec=2s\n"),
            "RestartSec" => out.push_str("RestartSec=1s\n"),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
        if line == "[Service]" {
            out.push_str(&format!(
                "StandardOutput=append:{BASE}/agent.log\nStandardError=append:{BASE}/agent.log\n"
            ));
        }
    }
    for must in [
        "Type=notify",
        "ProtectSystem=strict",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "MemoryDenyWriteExecute=yes",
        "CapabilityBoundingSet=\n",
        "PrivateDevices=yes",
    ] {
        assert!(out.contains(must), "the test unit lost {must:?}:\n{out}");
    }
    out
}

fn skip_or_fail(reason: &str) {
    if std::env::var("EDGESYNC_REQUIRE_SYSTEMD").is_ok_and(|v| v == "1") {
        panic!("EDGESYNC_REQUIRE_SYSTEMD=1 but the hardened-unit test cannot run: {reason}");
    }
    eprintln!("skipped: the hardened unit under systemd: {reason}");
}

/// `/proc/PID/status` field.
fn proc_status(pid: &str, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default()
}

#[test]
fn hardened_unit_under_systemd() {
    let systemd = match systemd_prerequisites() {
        Ok(s) => s,
        Err(reason) => return skip_or_fail(&reason),
    };
    let device = format!("sd-{}", unique());
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), &device);
    let (broker, cloud) = broker_and_cloud(&pki, &device);
    let config = format!(
        r#"[device]
id = "{device}"
[mqtt]
url = "mqtts://localhost:{port}"
ca = "ca.pem"
cert = "device.pem"
key = "device.key"
keep_alive = "5s"
reconnect_initial = "200ms"
reconnect_max = "1s"
[store]
path = "{STATE}/edgesync.redb"
[local]
socket = "{BASE}/rt/edgesync/edgesync.sock"
[telemetry]
interval = "1s"
# A handler program (runs under the same sandbox) and a file handler.
[[desired.handler]]
keys = "setpoint"
type = "exec"
command = ["/bin/sh", "-c", "cat > {STATE}/setpoint.json"]
[[desired.handler]]
keys = "display.*"
type = "file"
path = "{STATE}/desired/{{key}}.json"
"#,
        port = broker.tls_port
    );
    let um = UserManager::start(
        &systemd,
        &[
            ("edgesync/edgesync.toml", config.into_bytes()),
            ("edgesync/ca.pem", std::fs::read(&pki.ca).unwrap()),
            (
                "edgesync/device.pem",
                std::fs::read(&pki.client_cert).unwrap(),
            ),
            (
                "edgesync/device.key",
                std::fs::read(&pki.client_key).unwrap(),
            ),
            ("systemd/user/edgesync.service", test_unit().into_bytes()),
        ],
    );
    assert!(um.ctl(&["daemon-reload"]).status.success());

    // Type=notify: `start` returns once READY=1 came (store open, socket bound).
    let started = Instant::now();
    let o = um.ctl(&["start", "edgesync.service"]);
    assert!(
        o.status.success(),
        "systemctl start failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        um.context()
    );
    assert_eq!(um.show("ActiveState"), "active", "{}", um.context());
    assert_eq!(um.show("SubState"), "running");
    let pid = um.show("MainPID");
    // The sandbox is in force on the process itself.
    assert_eq!(proc_status(&pid, "NoNewPrivs"), "1", "{}", um.context());
    assert_eq!(proc_status(&pid, "Seccomp"), "2", "seccomp filter mode");
    assert_eq!(proc_status(&pid, "CapEff"), "0000000000000000");
    assert_eq!(proc_status(&pid, "CapBnd"), "0000000000000000");
    // Two malloc arenas (issue 16: the memory bounds holding and draining a large queue).
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|v| v == b"MALLOC_ARENA_MAX=2"),
        "the unit's Environment= is not in the agent's environment"
    );

    // A report through the socket in the RuntimeDirectory reaches the broker over TLS.
    let o = um.ns(&[
        &format!("{BASE}/edgesync"),
        "report",
        "--config",
        CONFIG,
        "temp=21.5",
    ]);
    assert!(
        o.status.success(),
        "report failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        um.context()
    );
    cloud.wait_change("temp", &json!(21.5), None);

    // Desired state through an exec handler (a child process) and a file handler.
    cloud.publish(
        &format!("edgesync/{device}/desired"),
        json!({"version": 1, "state": {"setpoint": 20, "display.a": "hello"}}).to_string(),
        false,
    );
    cloud.wait_result(1, "applied");
    let setpoint = um.ns(&["cat", &format!("{STATE}/setpoint.json")]);
    assert_eq!(String::from_utf8_lossy(&setpoint.stdout).trim(), "20");
    let display = um.ns(&["cat", &format!("{STATE}/desired/display.a.json")]);
    assert_eq!(String::from_utf8_lossy(&display.stdout).trim(), "\"hello\"");

    // A command, and the metrics (RSS read from /proc/self under ProcSubset=pid).
    cloud.publish(
        &format!("edgesync/{device}/cmd/ping"),
        json!({"id": "sd-ping"}).to_string(),
        false,
    );
    let pong = cloud.wait_for("the ping's answer", |m| {
        (m.topic.ends_with("/cmd/ping/result")).then(|| decode(&m.payload))
    });
    assert_eq!(pong["id"], "sd-ping");
    assert_eq!(pong["ok"], true, "{pong}");
    let metrics: Value = cloud.wait_for("metrics", |m| {
        m.topic.ends_with("/metrics").then(|| decode(&m.payload))
    });
    assert!(
        metrics["rss_bytes"].as_u64().is_some_and(|r| r > 0),
        "{metrics}"
    );

    // STATUS= reaches systemd (shown by `systemctl status`).
    let deadline = Instant::now() + NOTIFY_DEADLINE;
    loop {
        let text = um.show("StatusText");
        if text.starts_with("online · 0 queued · desired v1") {
            break;
        }
        assert!(Instant::now() < deadline, "StatusText {text:?}");
        thread::sleep(Duration::from_millis(100));
    }

    // The watchdog (WatchdogSec=2s here): pings keep coming and are accepted
    // (NotifyAccess=main); the service outlives several intervals without a restart.
    let first = um.show("WatchdogTimestampMonotonic");
    let deadline = Instant::now() + NOTIFY_DEADLINE;
    while um.show("WatchdogTimestampMonotonic") == first {
        assert!(
            Instant::now() < deadline,
            "no watchdog ping reached systemd"
        );
        thread::sleep(Duration::from_millis(100));
    }
    if let Some(rest) = Duration::from_secs(5).checked_sub(started.elapsed()) {
        thread::sleep(rest);
    }
    assert_eq!(um.show("ActiveState"), "active", "{}", um.context());
    assert_eq!(um.show("NRestarts"), "0", "{}", um.context());

    // `systemctl reload` (ExecReload=, under the same sandbox): SIGHUP, the config is read
    // again, the agent goes on.
    let o = um.ctl(&["reload", "edgesync.service"]);
    assert!(o.status.success(), "reload failed\n{}", um.context());
    let deadline = Instant::now() + NOTIFY_DEADLINE;
    while !um.log().contains("SIGHUP: reloading the configuration") {
        assert!(Instant::now() < deadline, "no reload\n{}", um.context());
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(um.show("MainPID"), pid);

    // A clean stop: SIGTERM, STOPPING=1, exit 0.
    let o = um.ctl(&["stop", "edgesync.service"]);
    assert!(o.status.success());
    assert_eq!(um.show("Result"), "success", "{}", um.context());
    assert_eq!(um.show("ExecMainStatus"), "0", "{}", um.context());
    assert!(um.log().contains("stopped"), "{}", um.context());

    // A stuck store writer (debug builds): systemd's watchdog kills the agent and
    // Restart=on-failure starts it again.
    if !common::no_debug_hooks() {
        let dropin = format!("{BASE}/config/systemd/user/edgesync.service.d");
        let o = um.ns(&[
            "sh",
            "-c",
            &format!(
                "mkdir -p {dropin} && printf '[Service]\\nEnvironment=EDGESYNC_DEBUG_STALL_WRITER_AFTER_MS=1000\\n' > {dropin}/stall.conf"
            ),
        ]);
        assert!(o.status.success());
        assert!(um.ctl(&["daemon-reload"]).status.success());
        assert!(um.ctl(&["start", "edgesync.service"]).status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let restarts: u64 = um.show("NRestarts").parse().unwrap_or(0);
            if restarts >= 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the watchdog did not restart a stuck agent\n{}",
                um.context()
            );
            thread::sleep(Duration::from_millis(100));
        }
        let log = um.log();
        assert!(
            log.contains("watchdog: not pinging systemd: store writer"),
            "{log}"
        );
        let _ = um.ctl(&["stop", "edgesync.service"]);
    }
    drop(um);
    drop(cloud);
}

/// A command's failure printed outside the logger (here: a config that cannot be read) is
/// an error (`<3>`) in the journal too, each line of it.
#[test]
fn failures_outside_the_logger_are_errors_in_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[device]\nid = 5\n[mqtt]\nurl = 1\n").unwrap();
    let path = dir.path().join("stderr.out");
    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let status = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    let err = std::fs::read_to_string(&path).unwrap();
    assert!(err.lines().count() >= 2, "{err}");
    assert!(err.lines().all(|l| l.starts_with("<3>")), "{err}");
    assert!(err.contains("problem(s) in"), "{err}");
}
