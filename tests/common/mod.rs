//! Helpers for integration tests that run the real `edgesync` binary.
//!
//! An [`Agent`] owns a temporary directory (under `/tmp`, so socket paths stay short) holding
//! its config file, an empty CA file, the store and the socket. [`Agent::start`] writes the
//! config, spawns `edgesync run --config` and waits until the socket answers a status request;
//! dropping the `Agent` kills the daemon (SIGKILL) and reaps it, so no test leaves a process
//! behind even when it panics.
//!
//! Nothing here sleeps to wait for an event: every wait polls its condition against a
//! deadline. Later work (a test broker, TLS material) extends [`AgentOptions`]: `mqtt_url`,
//! `ca_pem`, `mqtt_extra` (more keys of `[mqtt]`) and `extra_toml` (more sections).

// Test-only code: lets clippy's allow-unwrap/expect/panic-in-tests (clippy.toml) apply here.
#![cfg(test)]
// Each test crate uses its own subset of these helpers.
#![allow(dead_code)]

pub mod chaos;
pub mod cloud;
pub mod rig;

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use edgesync::{Outbox, StoreOptions, WhenFull};
use serde_json::{Value, json};
use tempfile::TempDir;

/// The binary under test. Start it with [`bin_command`], not `Command::new(BIN)`.
pub const BIN: &str = env!("CARGO_BIN_EXE_edgesync");

/// A `Command` for [`BIN`]. When the tests run for another architecture under emulation
/// (`cross/build TARGET --env` sets `EDGESYNC_TEST_RUNNER`, e.g. "qemu-aarch64-static -L
/// /usr/aarch64-linux-gnu"; there is no binfmt), BIN is a binary of that target: it is run
/// through the runner, given as space-separated words. qemu-user runs it in the same process,
/// so the child's PID, signals and exit status are the binary's own.
pub fn bin_command() -> Command {
    let runner = std::env::var("EDGESYNC_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.args(words).arg(BIN);
            cmd
        }
        None => Command::new(BIN),
    }
}
/// How long the daemon gets to come up or to stop.
pub const DAEMON_DEADLINE: Duration = Duration::from_secs(10);
/// How long a CLI command gets by default.
pub const CLI_DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval of every wait.
const POLL: Duration = Duration::from_millis(5);
/// Read timeout on raw socket connections, so a missing answer fails instead of hanging.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// What goes into the config file. Paths are relative to the agent's temporary directory.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub device_id: String,
    /// `mqtt.url`; a TOML array (`["mqtts://a", ...]`) is written as `mqtt.urls` instead.
    pub mqtt_url: String,
    /// Contents of `ca.pem` (the link does not exist yet, so empty is fine).
    pub ca_pem: Vec<u8>,
    /// Further `key = value` lines of `[mqtt]`.
    pub mqtt_extra: String,
    /// `store.path`, written relative (resolved against the config file's directory).
    pub store_path: String,
    pub max_bytes: String,
    pub when_full: String,
    /// The socket, relative to the temporary directory; written as an absolute path.
    pub socket: String,
    /// Appended verbatim: further sections.
    pub extra_toml: String,
    /// Environment of the daemon (on top of a cleaned environment).
    pub env: Vec<(String, String)>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            device_id: "test-1".into(),
            mqtt_url: "mqtts://localhost:8883".into(),
            ca_pem: Vec::new(),
            mqtt_extra: String::new(),
            store_path: "store/edgesync.redb".into(),
            max_bytes: "1MiB".into(),
            when_full: "reject".into(),
            socket: "s.sock".into(),
            extra_toml: String::new(),
            env: Vec::new(),
        }
    }
}

impl AgentOptions {
    pub fn max_bytes(mut self, v: &str) -> Self {
        self.max_bytes = v.into();
        self
    }

    pub fn when_full(mut self, v: &str) -> Self {
        self.when_full = v.into();
        self
    }

    pub fn socket(mut self, v: &str) -> Self {
        self.socket = v.into();
        self
    }

    pub fn store_path(mut self, v: &str) -> Self {
        self.store_path = v.into();
        self
    }

    /// The config file's text for an agent living in `dir`.
    pub fn to_toml(&self, dir: &Path) -> String {
        let socket = dir.join(&self.socket);
        format!(
            "[device]\n\
             id = {device}\n\
             [mqtt]\n\
             {url_key} = {url}\n\
             {ca}\
             {mqtt_extra}\n\
             [store]\n\
             path = {store}\n\
             max_bytes = {max}\n\
             when_full = {when_full}\n\
             [local]\n\
             socket = {socket}\n\
             {extra}\n",
            device = toml_str(&self.device_id),
            url_key = if self.mqtt_url.starts_with('[') {
                "urls"
            } else {
                "url"
            },
            url = if self.mqtt_url.starts_with('[') {
                self.mqtt_url.clone()
            } else {
                toml_str(&self.mqtt_url)
            },
            // A CA is required with mqtts:// and refused with plain mqtt://.
            ca = if self.mqtt_url.starts_with("mqtt://") {
                ""
            } else {
                "ca = \"ca.pem\"\n"
            },
            mqtt_extra = self.mqtt_extra,
            store = toml_str(&self.store_path),
            max = toml_str(&self.max_bytes),
            when_full = toml_str(&self.when_full),
            socket = toml_str(&socket.to_string_lossy()),
            extra = self.extra_toml,
        )
    }

    /// Parses `max_bytes` (a plain number or `KiB`/`MiB`/`GiB`) for opening the store.
    fn max_bytes_value(&self) -> u64 {
        let s = self.max_bytes.trim();
        for (unit, mul) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if let Some(n) = s.strip_suffix(unit) {
                return n.trim().parse::<u64>().map_or(u64::MAX, |n| n * mul);
            }
        }
        s.parse().unwrap_or(u64::MAX)
    }
}

fn toml_str(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// One change as it sits in the store file.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredChange {
    pub seq: u64,
    pub ts: u64,
    pub key: String,
    pub value: Value,
}

/// A daemon under test, with its own directory. Killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct Agent {
    pub opts: AgentOptions,
    pub config_path: PathBuf,
    pub socket: PathBuf,
    pub store_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    // Last: removed after the daemon is gone.
    dir: TempDir,
}

impl Agent {
    /// Writes the config and the CA file, without starting anything.
    pub fn prepare(opts: AgentOptions) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("es")
            .tempdir_in("/tmp")
            .expect("create temp dir");
        let config_path = dir.path().join("edgesync.toml");
        std::fs::write(dir.path().join("ca.pem"), &opts.ca_pem).expect("write ca.pem");
        std::fs::write(&config_path, opts.to_toml(dir.path())).expect("write config");
        let socket = dir.path().join(&opts.socket);
        assert!(
            socket.as_os_str().len() <= 100,
            "socket path too long for sun_path: {}",
            socket.display()
        );
        Agent {
            config_path,
            socket,
            store_path: dir.path().join(&opts.store_path),
            log_path: dir.path().join("daemon.log"),
            child: None,
            opts,
            dir,
        }
    }

    /// Writes the config, starts `edgesync run` and waits until it answers on its socket.
    pub fn start(opts: AgentOptions) -> Agent {
        let mut agent = Agent::prepare(opts);
        agent.launch();
        agent
    }

    /// The agent's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file into the agent's directory; returns its path.
    pub fn write_file(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        std::fs::write(&path, contents).expect("write file");
        path
    }

    /// Writes another config file (other options, same directory); returns its path.
    pub fn write_config(&self, name: &str, opts: &AgentOptions) -> PathBuf {
        self.write_file(name, opts.to_toml(self.dir()))
    }

    /// What the daemon(s) of this agent wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon not running").id()
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Starts `edgesync run` for a prepared (or stopped) agent and waits until it serves.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "the daemon is already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open daemon log");
        let log2 = log.try_clone().expect("clone log handle");
        let mut cmd = self.run_command();
        cmd.envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        self.child = Some(cmd.spawn().expect("spawn edgesync run"));
        self.wait_ready();
    }

    /// `edgesync run --config <this agent's config>` with a clean environment (not yet
    /// spawned; without [`AgentOptions::env`]).
    pub fn run_command(&self) -> Command {
        let mut cmd = bin_command();
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("EDGESYNC_CONFIG")
            .env_remove("EDGESYNC_LOG")
            .env_remove("JOURNAL_STREAM")
            // Not notifying a systemd that may run the tests (tests/systemd.rs sets them).
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        cmd
    }

    /// A field of the daemon's `/proc/PID/status` as a number (`VmRSS:`, `VmHWM:`: KiB).
    pub fn proc_status_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid(), field)
    }

    /// Polls until the socket answers `{"op":"status"}`; fails if the daemon exits first.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + DAEMON_DEADLINE;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "edgesync run exited with {status} before serving; log:\n{}",
                    self.log()
                );
            }
            if try_request(&self.socket, &json!({"op": "status"})).is_ok_and(|v| v["ok"] == true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not answer on {} within {DAEMON_DEADLINE:?}; log:\n{}",
                self.socket.display(),
                self.log()
            );
            thread::sleep(POLL);
        }
    }

    /// Runs `edgesync ARGS --config <this agent's config>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_at(&self.config_path, args)
    }

    /// Runs `edgesync ARGS --config CONFIG`.
    pub fn cli_at(&self, config: &Path, args: &[&str]) -> Output {
        run_with_timeout(cli_command(config, args), None, CLI_DEADLINE)
    }

    /// Runs `edgesync ARGS --config ...` with `input` on its standard input.
    pub fn cli_stdin(&self, args: &[&str], input: Vec<u8>, timeout: Duration) -> Output {
        run_with_timeout(cli_command(&self.config_path, args), Some(input), timeout)
    }

    /// One raw round trip on a fresh connection.
    pub fn request(&self, req: &Value) -> Value {
        try_request(&self.socket, req)
            .unwrap_or_else(|e| panic!("request {req} failed: {e}; log:\n{}", self.log()))
    }

    /// A raw connection to the socket.
    pub fn connect(&self) -> Conn {
        Conn::connect(&self.socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.socket.display()))
    }

    /// The status document (asserts `ok`).
    pub fn status(&self) -> Value {
        let v = self.request(&json!({"op": "status"}));
        assert_eq!(v["ok"], true, "status failed: {v}");
        v
    }

    /// `status.queue.depth`.
    pub fn depth(&self) -> u64 {
        self.status()["queue"]["depth"]
            .as_u64()
            .expect("queue.depth")
    }

    /// Kills the daemon with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon not running");
        let _ = child.kill();
        child.wait().expect("wait for killed daemon");
    }

    /// Sends `sig` (e.g. "-TERM") to the daemon with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} failed");
    }

    /// SIGTERM; asserts exit status 0 within [`DAEMON_DEADLINE`].
    pub fn stop(&mut self) -> ExitStatus {
        self.signal("-TERM");
        let mut child = self.child.take().expect("daemon not running");
        let status = wait_timeout(&mut child, DAEMON_DEADLINE).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "daemon did not stop within {DAEMON_DEADLINE:?} of SIGTERM; log:\n{}",
                self.log()
            )
        });
        assert!(
            status.success(),
            "daemon exited with {status} after SIGTERM; log:\n{}",
            self.log()
        );
        status
    }

    /// Starts the daemon again with the same directory and config; it must not be running.
    pub fn restart(&mut self) {
        assert!(
            !self.is_running(),
            "restart() needs a stopped agent: call kill9() or stop() first"
        );
        self.child = None;
        self.launch();
    }

    /// Every change in the store file, in seq order, read with the library. The daemon must
    /// not be running (the store is exclusively locked).
    pub fn read_store(&mut self) -> Vec<StoredChange> {
        assert!(
            !self.is_running(),
            "read_store() needs a stopped agent: the store is locked while it runs"
        );
        let when_full = match self.opts.when_full.as_str() {
            "reject" => WhenFull::Reject,
            _ => WhenFull::DropOldest,
        };
        let outbox = Outbox::open(&StoreOptions {
            path: self.store_path.clone(),
            max_bytes: self.opts.max_bytes_value(),
            when_full,
            cache_size: 1 << 20,
        })
        .expect("open store");
        let queued = outbox
            .read_from(0, usize::MAX, usize::MAX)
            .expect("read store");
        outbox.shutdown_blocking();
        drop(outbox);
        queued
            .iter()
            .map(|q| {
                let r = q.decode().expect("decode record");
                StoredChange {
                    seq: q.seq,
                    ts: r.ts,
                    key: r.key.to_owned(),
                    value: edgesync::decode_value(r.value).expect("decode value"),
                }
            })
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "--- daemon log ({}):\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// `edgesync ARGS --config CONFIG` with a clean environment.
pub fn cli_command(config: &Path, args: &[&str]) -> Command {
    let mut cmd = bin_command();
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env_remove("EDGESYNC_CONFIG")
        .env_remove("EDGESYNC_LOG")
        .env_remove("JOURNAL_STREAM");
    cmd
}

/// Runs a command to completion, feeding `stdin` and collecting its output; kills it and
/// fails when it takes longer than `timeout`.
pub fn run_with_timeout(mut cmd: Command, stdin: Option<Vec<u8>>, timeout: Duration) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    // The child may exit before reading all of its input (a bad line): ignore EPIPE.
    let feeder = stdin.map(|data| {
        let mut w = child.stdin.take().expect("stdin pipe");
        thread::spawn(move || {
            let _ = w.write_all(&data);
        })
    });
    let stdout = drain(child.stdout.take().expect("stdout pipe"));
    let stderr = drain(child.stderr.take().expect("stderr pipe"));
    let status = match wait_timeout(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not finish within {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&err)
            );
        }
    };
    if let Some(f) = feeder {
        f.join().expect("stdin feeder");
    }
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Polls `child` until it exits or `timeout` passes.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// Polls `cond` until it holds; fails with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(POLL);
    }
}

/// One request on a fresh connection.
pub fn try_request(socket: &Path, req: &Value) -> std::io::Result<Value> {
    Conn::connect(socket)?.call(req)
}

/// A raw NDJSON connection to the local socket.
#[derive(Debug)]
pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl Conn {
    pub fn connect(socket: &Path) -> std::io::Result<Conn> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(SOCKET_TIMEOUT))?;
        stream.set_write_timeout(Some(SOCKET_TIMEOUT))?;
        Ok(Conn {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            line: String::new(),
        })
    }

    /// Writes `bytes` and a newline.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(bytes.len() + 1);
        buf.extend_from_slice(bytes);
        buf.push(b'\n');
        self.writer.write_all(&buf)
    }

    /// Writes several requests at once (pipelining).
    pub fn send_all(&mut self, reqs: &[Value]) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for r in reqs {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        self.writer.write_all(&buf)
    }

    pub fn send(&mut self, req: &Value) -> std::io::Result<()> {
        self.send_raw(req.to_string().as_bytes())
    }

    /// Reads one answer; the daemon closing the connection is `UnexpectedEof`.
    pub fn recv(&mut self) -> std::io::Result<Value> {
        self.line.clear();
        if self.reader.read_line(&mut self.line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&self.line).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{e}: {:?}", self.line),
            )
        })
    }

    pub fn call(&mut self, req: &Value) -> std::io::Result<Value> {
        self.send(req)?;
        self.recv()
    }
}

/// `{"op":"report","changes":[{"key":k,"value":v},...]}`.
pub fn report_req<'a>(changes: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
    let changes: Vec<Value> = changes
        .into_iter()
        .map(|(k, v)| json!({"key": k, "value": v}))
        .collect();
    json!({"op": "report", "changes": changes})
}

/// The error code of a `{"ok":false}` answer (fails on success).
pub fn error_code(answer: &Value) -> &str {
    assert_eq!(answer["ok"], false, "expected an error, got {answer}");
    answer["error"]["code"].as_str().expect("error.code")
}

/// Skips a test that cannot test here (`why`), loudly; with `require_var=1` (CI) that is a
/// failure instead. Returns true when the test must return without testing.
pub fn skip_unless_required(require_var: &str, why: &str) -> bool {
    let required = std::env::var_os(require_var).is_some_and(|v| v == "1");
    assert!(
        !required,
        "{require_var}=1 but this test cannot test: {why}"
    );
    eprintln!("SKIPPED (nothing tested): {why}; {require_var}=1 makes this a failure");
    true
}

/// Crash points and stall hooks (`EDGESYNC_DEBUG_*`) exist in debug builds only: true when
/// the test must return (a release build), loudly, and a failure with
/// `EDGESYNC_REQUIRE_DEBUG_HOOKS=1` (set by `.ci/run`).
pub fn no_debug_hooks() -> bool {
    !cfg!(debug_assertions)
        && skip_unless_required(
            "EDGESYNC_REQUIRE_DEBUG_HOOKS",
            "a release build has no crash points or stall hooks",
        )
}

/// A tmpfs of a given size mounted for one test (tests of a full disk); unmounted (lazily) on
/// drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts, or returns `None` (with a message) where mounting is impossible, unless
    /// `EDGESYNC_REQUIRE_TMPFS=1` makes that a failure.
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Some(Tmpfs(dir.to_path_buf())),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            Err(e) => e.to_string(),
        };
        let required = std::env::var_os("EDGESYNC_REQUIRE_TMPFS").is_some_and(|v| v == "1");
        assert!(
            !required,
            "EDGESYNC_REQUIRE_TMPFS=1 but mounting a tmpfs failed: {why}"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs here ({why}); needs root or CAP_SYS_ADMIN");
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A full disk that can get space back: mounts a 2 MiB tmpfs on the directory of the (not yet
/// launched) agent's store and fills half of it with a 1 MiB ballast file, whose path is
/// returned with the mount (remove it: "space returns"). `None` where mounting is impossible
/// (see [`Tmpfs::mount`]). Keep the mount in a variable declared after the agent: it is
/// unmounted before the agent's directory goes.
pub fn half_full_store_fs(agent: &Agent) -> Option<(Tmpfs, PathBuf)> {
    let fs = agent.store_path.parent().expect("the store's directory");
    let mount = Tmpfs::mount(fs, "2m")?;
    let ballast = fs.join("ballast");
    std::fs::write(&ballast, vec![0xA5u8; 1 << 20]).unwrap();
    Some((mount, ballast))
}

/// A small deterministic PRNG (xorshift64*), so tests need no `rand`.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// A field of `/proc/PID/status` as a number (kB fields in KiB).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a number in /proc/PID/status")
}

/// Stdout of a command as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Stderr of a command as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code, showing the output when it differs.
#[track_caller]
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit {code}, got {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}
