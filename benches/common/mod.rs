//! The harness every bench shares (`benches/{compare,sync,ingest,desired}.rs`): starting and
//! stopping the daemon, its `status`, `/proc` figures, MQTT clients with their own
//! certificates and a subscriber thread, the generated workload, reading change batches, the
//! machine description and medians.
//!
//! Every bench includes this with `mod common;` and uses only a part of it.
#![allow(dead_code)]

pub mod profile;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use edgesync::report_stream;
use edgesync_testkit::{Mosquitto, MosquittoOptions, TestPki};
use rumqttc::{Client, Connection, Event, MqttOptions, Packet, Publish, QoS, TlsConfiguration};
use tempfile::TempDir;

pub type Res<T> = Result<T, String>;

pub const DAEMON: &str = env!("CARGO_BIN_EXE_edgesync");

/// The daemon the benches start: `EDGESYNC_BENCH_DAEMON` if set (e.g. the `ship` build that
/// devices run, `target/ship/edgesync`), else [`DAEMON`], the bench profile's build.
pub fn daemon_path() -> String {
    std::env::var("EDGESYNC_BENCH_DAEMON").unwrap_or_else(|_| DAEMON.to_owned())
}

/// The `Environment=` settings of the shipped systemd unit: the daemon runs with them, as
/// it does on a device.
pub fn unit_env() -> Vec<(&'static str, &'static str)> {
    include_str!("../../systemd/edgesync.service")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Environment="))
        .filter_map(|kv| kv.split_once('='))
        .collect()
}
/// Distinct keys in the generated changes.
pub const KEYS: usize = 100;
/// Length of every generated string value.
pub const VALUE_LEN: usize = 100;
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
pub const MIB: f64 = 1024.0 * 1024.0;

// ---------------------------------------------------------------------------------------------
// The daemon under test.

/// Paths of one daemon: its config, socket and log.
pub struct Setup {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Setup {
    /// Writes `config` to `DIR/edgesync.toml`; the daemon's log goes to `DIR/daemon.log`.
    pub fn write(dir: &Path, socket: PathBuf, config: &str) -> Res<Setup> {
        let path = dir.join("edgesync.toml");
        std::fs::write(&path, config).map_err(|e| format!("writing the config: {e}"))?;
        Ok(Setup {
            config: path,
            socket,
            log: dir.join("daemon.log"),
        })
    }
}

pub struct Daemon {
    child: Option<Child>,
    /// Started under `EDGESYNC_BENCH_WRAPPER`.
    wrapped: bool,
    pub socket: PathBuf,
    log: PathBuf,
    /// From the spawn to the first answered `status`.
    pub started_in: Duration,
}

impl Daemon {
    /// Starts `edgesync run` (under `EDGESYNC_BENCH_WRAPPER` when `wrapped`), its stderr
    /// appended to the setup's log, and waits until it answers `status`.
    pub fn start(s: &Setup, wrapped: bool) -> Res<Daemon> {
        Daemon::start_with(s, wrapped, &[])
    }

    /// [`Daemon::start`] with `env` set for the daemon (e.g. `EDGESYNC_LOG`).
    pub fn start_with(s: &Setup, wrapped: bool, env: &[(&str, &str)]) -> Res<Daemon> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.log)
            .map_err(|e| format!("daemon log: {e}"))?;
        let wrapper = if wrapped {
            std::env::var("EDGESYNC_BENCH_WRAPPER").unwrap_or_default()
        } else {
            String::new()
        };
        let mut words = wrapper.split_whitespace();
        let daemon = daemon_path();
        let mut cmd = match words.next() {
            Some(tool) => {
                let mut c = Command::new(tool);
                c.args(words).arg(&daemon);
                c
            }
            None => Command::new(&daemon),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&s.config)
            .env_remove("EDGESYNC_LOG")
            .envs(unit_env())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let t0 = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {daemon}: {e}"))?;
        let mut d = Daemon {
            child: Some(child),
            wrapped: !wrapper.is_empty(),
            socket: s.socket.clone(),
            log: s.log.clone(),
            started_in: Duration::ZERO,
        };
        loop {
            if status(&d.socket).is_ok() {
                d.started_in = t0.elapsed();
                return Ok(d);
            }
            if let Some(c) = d.child.as_mut()
                && let Ok(Some(code)) = c.try_wait()
            {
                d.child = None;
                return Err(format!(
                    "daemon exited with {code} at start:\n{}",
                    d.log_tail()
                ));
            }
            if t0.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "daemon did not answer in {START_TIMEOUT:?}:\n{}",
                    d.log_tail()
                ));
            }
            // Poll interval, not a settling delay: readiness is the answered status.
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The daemon's PID. Under a wrapper (perf, strace: they fork it) its first child.
    pub fn pid(&self) -> u32 {
        let pid = self.child.as_ref().map_or(0, Child::id);
        if !self.wrapped {
            return pid;
        }
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(pid)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM and wait (so a wrapper like `perf record` can write its output).
    pub fn stop(&mut self) -> Res<()> {
        self.terminate().map(|_| ())
    }

    /// [`Daemon::stop`], failing unless the daemon exited with status 0; returns how long
    /// it took from the signal to the exit.
    pub fn stop_clean(&mut self) -> Res<Duration> {
        match self.terminate()? {
            Some((code, _)) if !code.success() => {
                Err(format!("daemon exited with {code}:\n{}", self.log_tail()))
            }
            Some((_, took)) => Ok(took),
            None => Ok(Duration::ZERO),
        }
    }

    /// SIGTERM and wait: the exit status and the time from the signal to the exit (`None`
    /// when the daemon was not running).
    fn terminate(&mut self) -> Res<Option<(ExitStatus, Duration)>> {
        // Under a wrapper, the daemon itself gets the signal; the wrapper ends with it.
        let daemon = self.pid();
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let t0 = Instant::now();
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(daemon.to_string())
            .status();
        if !sent.is_ok_and(|s| s.success()) {
            let _ = child.kill();
        }
        let deadline = t0 + Duration::from_secs(30);
        loop {
            if let Ok(Some(code)) = child.try_wait() {
                return Ok(Some((code, t0.elapsed())));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("daemon ignored SIGTERM for 30 s".into());
            }
            // Poll interval (the shutdown time is a figure of the ingest bench).
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

impl Daemon {
    /// SIGKILL (a crash: nothing is flushed or closed) and reap.
    pub fn kill9(&mut self) {
        let daemon = self.pid();
        if let Some(mut c) = self.child.take() {
            if daemon != c.id() && daemon != 0 {
                // Wrapped: the daemon is the wrapper's child; do not leave it behind.
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(daemon.to_string())
                    .status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// One connection to the daemon's socket for repeated `status` requests.
pub struct StatusConn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl StatusConn {
    pub fn connect(socket: &Path) -> Res<StatusConn> {
        let s = UnixStream::connect(socket).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let writer = s.try_clone().map_err(|e| e.to_string())?;
        Ok(StatusConn {
            reader: BufReader::new(s),
            writer,
            line: String::new(),
        })
    }

    pub fn get(&mut self) -> Res<serde_json::Value> {
        self.writer
            .write_all(b"{\"op\":\"status\"}\n")
            .map_err(|e| e.to_string())?;
        self.line.clear();
        self.reader
            .read_line(&mut self.line)
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_str(&self.line).map_err(|e| e.to_string())?;
        if v["ok"] != true {
            return Err(format!("status failed: {}", self.line.trim_end()));
        }
        Ok(v)
    }
}

/// One `status` request on a new connection; the parsed reply.
pub fn status(socket: &Path) -> Res<serde_json::Value> {
    StatusConn::connect(socket)?.get()
}

/// Waits until the daemon reports its link online.
pub fn wait_online(d: &Daemon) -> Res<()> {
    let mut status = StatusConn::connect(&d.socket)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while status.get()?["connection"]["state"] != "online" {
        if Instant::now() > deadline {
            return Err(format!("daemon not online: {}", d.log_tail()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// /proc figures.

/// A `kB` field of `/proc/<pid>/status`, in bytes.
pub fn proc_status_kb(pid: u32, field: &str) -> Res<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| format!("no {field} in {path}"))
}

/// utime + stime of a process (all its threads, dead ones too), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Res<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    match (num(11), num(12)) {
        (Some(u), Some(s)) => Ok(u + s),
        _ => Err(format!("cannot parse {path}")),
    }
}

/// `getconf CLK_TCK`: the unit of `cpu_ticks`.
pub fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

// ---------------------------------------------------------------------------------------------
// MQTT clients with their own test certificates.

pub fn mqtt_options(pki: &TestPki, port: u16, name: &str) -> Res<MqttOptions> {
    let (cert, key) = pki
        .issue_client(name, name)
        .map_err(|e| format!("client cert: {e}"))?;
    let tls = edgesync::tls::client_config(&pki.ca, Some((&cert, &key)))
        .map_err(|e| format!("tls: {e}"))?;
    let mut o = MqttOptions::new(name, "localhost", port);
    o.set_transport(rumqttc::Transport::tls_with_config(
        TlsConfiguration::Rustls(tls),
    ));
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_max_packet_size(1 << 24, 1 << 20);
    Ok(o)
}

/// A temporary directory (`PREFIX…`) holding a fresh PKI for `device` in `pki/`, and the
/// "cloud" Mosquitto on it: mutual TLS (`require_certificate`), 16 MiB messages, `extra`
/// config lines.
pub fn pki_and_mosquitto(
    prefix: &str,
    device: &str,
    extra: Vec<String>,
) -> Res<(TempDir, TestPki, Mosquitto)> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let pki = TestPki::generate_for(&dir.path().join("pki"), device, "edgesync")
        .map_err(|e| format!("pki: {e}"))?;
    let mosq = Mosquitto::start(
        &pki,
        MosquittoOptions {
            require_certificate: true,
            // Batches are at most sync.batch_max_bytes (256 KiB by default).
            max_payload: 16 * 1024 * 1024,
            extra_config: extra,
            ..MosquittoOptions::default()
        },
    )
    .map_err(|e| format!("mosquitto: {e}"))?
    .ok_or("mosquitto is not installed (/usr/sbin/mosquitto)")?;
    Ok((dir, pki, mosq))
}

pub fn nodelay(conn: &mut Connection) {
    let mut n = conn.eventloop.network_options();
    n.set_tcp_nodelay(true);
    conn.eventloop.set_network_options(n);
}

/// An MQTT client subscribed to one filter, its event loop on a thread that hands every
/// message to a callback with its arrival time. Disconnects (without reconnecting) on
/// [`Subscriber::close`] and on drop.
pub struct Subscriber {
    client: Client,
    thread: Option<JoinHandle<()>>,
}

impl Subscriber {
    /// Connects with `opts` (TCP_NODELAY), subscribes to `filter` at QoS 1 and returns
    /// once the SUBACK arrived (or fails after 20 s or on the first connection error).
    pub fn start(
        opts: MqttOptions,
        filter: &str,
        mut on_publish: impl FnMut(Instant, Publish) + Send + 'static,
    ) -> Res<Subscriber> {
        let (client, mut connection) = Client::new(opts, 64);
        nodelay(&mut connection);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .map_err(|e| format!("subscribe: {e}"))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            for ev in connection.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => on_publish(Instant::now(), p),
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(Ok(()));
                    }
                    // Closed by `close()`: do not reconnect.
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => return,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        });
        let mut sub = Subscriber {
            client,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(())) => Ok(sub),
            Ok(Err(e)) => {
                sub.close();
                Err(format!("cloud subscriber: {e}"))
            }
            Err(_) => {
                sub.close();
                Err("cloud subscriber got no SUBACK in 20 s".into())
            }
        }
    }

    pub fn close(&mut self) {
        let _ = self.client.disconnect();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.close();
    }
}

// ---------------------------------------------------------------------------------------------
// Just enough CBOR to read a change batch without decoding values.

/// A head at `*i`: (major type, argument). Floats (major 7, 2/4/8 bytes) are read whole.
pub fn cbor_head(b: &[u8], i: &mut usize) -> Option<(u8, u64)> {
    let ib = *b.get(*i)?;
    *i += 1;
    let n = match ib & 0x1f {
        v @ 0..=23 => return Some((ib >> 5, u64::from(v))),
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        _ => return None,
    };
    let bytes = b.get(*i..*i + n)?;
    *i += n;
    Some((
        ib >> 5,
        bytes.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)),
    ))
}

pub fn cbor_text<'a>(b: &'a [u8], i: &mut usize) -> Option<&'a str> {
    let (major, len) = cbor_head(b, i)?;
    if major != 3 {
        return None;
    }
    let s = b.get(*i..*i + usize::try_from(len).ok()?)?;
    *i += s.len();
    std::str::from_utf8(s).ok()
}

pub fn cbor_skip(b: &[u8], i: &mut usize) -> Option<()> {
    let (major, v) = cbor_head(b, i)?;
    match major {
        2 | 3 => *i += usize::try_from(v).ok()?,
        4 => (0..v).try_for_each(|_| cbor_skip(b, i))?,
        5 => (0..v * 2).try_for_each(|_| cbor_skip(b, i))?,
        6 => cbor_skip(b, i)?,
        _ => {}
    }
    (*i <= b.len()).then_some(())
}

/// The (seq, string value) of every change of a CBOR change batch.
pub fn batch_changes(b: &[u8]) -> Option<Vec<(u64, Option<&str>)>> {
    let mut i = 0;
    let (5, fields) = cbor_head(b, &mut i)? else {
        return None;
    };
    let mut out = Vec::new();
    for _ in 0..fields {
        if cbor_text(b, &mut i)? != "changes" {
            cbor_skip(b, &mut i)?;
            continue;
        }
        let (4, n) = cbor_head(b, &mut i)? else {
            return None;
        };
        for _ in 0..n {
            let (5, pairs) = cbor_head(b, &mut i)? else {
                return None;
            };
            let (mut seq, mut value) = (None, None);
            for _ in 0..pairs {
                match cbor_text(b, &mut i)? {
                    "seq" => seq = Some(cbor_head(b, &mut i)?.1),
                    "value" if b.get(i).is_some_and(|x| x >> 5 == 3) => {
                        value = Some(cbor_text(b, &mut i)?);
                    }
                    _ => cbor_skip(b, &mut i)?,
                }
            }
            out.push((seq?, value));
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Workload.

pub fn value(i: usize) -> String {
    format!("reading-{i:0>width$}", width = VALUE_LEN - 8)
}

pub fn ndjson(n: usize) -> Vec<u8> {
    let mut out = String::with_capacity(n * (VALUE_LEN + 40));
    for i in 0..n {
        let _ = writeln!(
            out,
            "{{\"key\":\"sensor.{}\",\"value\":\"{}\"}}",
            i % KEYS,
            value(i)
        );
    }
    out.into_bytes()
}

pub fn stream(socket: &Path, input: &[u8]) -> Res<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let out = rt
        .block_on(report_stream(socket, input))
        .map_err(|e| format!("report_stream: {e}"))?;
    Ok(out.queued)
}

/// Sends `n` things on a fixed schedule (`send(i)` does one); returns each send instant.
pub fn scheduled(
    n: usize,
    spacing: Duration,
    mut send: impl FnMut(usize) -> Res<()>,
) -> Res<Vec<Instant>> {
    let mut sent = Vec::with_capacity(n);
    let t0 = Instant::now() + Duration::from_millis(10);
    for i in 0..n {
        let due = t0 + spacing * u32::try_from(i).unwrap_or(u32::MAX);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        sent.push(Instant::now());
        send(i)?;
    }
    Ok(sent)
}

// ---------------------------------------------------------------------------------------------
// Report.

/// A bench's `main`: runs `run`; on failure says so and exits with status 1.
pub fn main_of(bench: &str, run: impl FnOnce() -> Res<()>) {
    if let Err(e) = run() {
        eprintln!("{bench} bench failed: {e}");
        std::process::exit(1);
    }
}

/// The machine: CPU, cores, memory, kernel, the file system of the temporary directory and
/// the Mosquitto version.
pub fn machine() -> String {
    machine_in(&std::env::temp_dir())
}

/// [`machine`] with the file system of `dir`.
pub fn machine_in(dir: &Path) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or_else(
            || "unknown".to_owned(),
            |v| v.trim_start_matches([' ', '\t', ':']).to_owned(),
        );
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or("?".into(), |kb| format!("{:.1} GiB", kb as f64 / MIB));
    let df = Command::new("df")
        .arg("-T")
        .arg(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let df: Vec<&str> = df.lines().nth(1).unwrap_or("").split_whitespace().collect();
    let disk = match df.as_slice() {
        [dev, fs, ..] => format!("{dev} ({fs})"),
        _ => "unknown".into(),
    };
    let mosq = Command::new("/usr/sbin/mosquitto")
        .arg("-h")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mosq = mosq.lines().next().unwrap_or("?").trim().to_owned();
    format!(
        "cpu     {model}\ncores   {cores}\nmemory  {mem}\nkernel  Linux {}\ntemp    {} on {disk}\nbroker  {mosq}\n",
        kernel.trim(),
        dir.display(),
    )
}

/// Load average (1, 5, 15 min) and CPU pressure (share of the last 60 s in which some
/// runnable task waited for a CPU): how much else wanted this machine.
pub fn loadavg() -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let psi = std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("some"))?
                .split_whitespace()
                .find_map(|f| f.strip_prefix("avg60="))
                .map(str::to_owned)
        })
        .map_or_else(String::new, |p| format!(", CPU pressure {p} % (60 s)"));
    format!("{load} (1/5/15 min){psi}")
}

pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}
