//! Configuration: the TOML file of docs/PROTOCOL.md §3, from bytes on disk to a validated [`Config`].
//!
//! This module owns the file format (every section and key, its default, its limits), the
//! validation rules, the resolution of relative paths, and the error report
//! ([`ConfigErrors`]). Nothing else in the crate reads the config file; `socket_path` is the
//! one lenient reader, for CLI commands that only need to find the daemon.
//!
//! # Layout
//!
//! - this file: [`Config`] and its section types, the defaults (each defined once, here or in
//!   the section's `Default` impl, and used by validation too), the load and parse entry
//!   points and the lenient readers for the CLI;
//! - `values`: the value types ([`DeviceId`], [`BrokerUrl`], sizes, durations, [`Encoding`],
//!   [`WhenFull`], ...), each parsed and checked on its own;
//! - `validate`: the one parser of the file, from a `toml::Table` through raw structs (one
//!   field per key, named once) to a [`Config`], collecting every problem;
//! - [`desired`] and [`control`]: the section types of `[desired]` and `[control]`.
//!
//! # Invariants
//!
//! - Every problem in the file is reported, all at once. Each one names the file, the dotted
//!   key and what was expected and found. Nothing unknown is ignored.
//! - A [`Config`] exists only when there was no problem at all.
//! - Relative paths are resolved against the directory of the config file, not the working
//!   directory. `local.socket` is the exception: it must be absolute.
//! - Input never makes this module panic.
//!
//! # Arrays of tables
//!
//! `[desired]` holds three arrays of tables, `[[desired.rule]]`, `[[desired.conflict]]` and
//! `[[desired.handler]]`. Their entries are named by their position in the file, counted from
//! 1: `desired.rule[2].max` is the `max` key of the second `[[desired.rule]]`.

pub mod cloud;
pub mod control;
pub mod desired;
mod validate;
mod values;

pub use crate::model::compress::Compression;
pub use cloud::{AwsConfig, AzureConfig};
pub use control::ControlConfig;
pub use desired::{ConflictRule, DesiredConfig, Handler, HandlerKind, Policy};
pub use values::{BrokerUrl, DeviceId, Encoding, WhenFull, parse_duration};

/// Most `[[source.mqtt]]` entries (each is one connection and one task).
pub const MAX_SOURCES: usize = 16;
/// Default `source.mqtt.max_inflight`.
pub const DEFAULT_SOURCE_INFLIGHT: usize = 1000;

use std::ffi::OsString;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use validate::{Problems, RawConfig, syntax_problem, validate};
use values::{FromValue, MIB, RawDuration, RawSize};

/// Where the daemon and the CLI look for the config file by default (docs/PROTOCOL.md §2).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/edgesync/edgesync.toml";
/// Environment variable naming the config file when `--config` is not given (docs/PROTOCOL.md §2).
pub const CONFIG_ENV: &str = "EDGESYNC_CONFIG";
/// Largest encoded value of one change (docs/PROTOCOL.md §5): [`crate::model::change::MAX_VALUE_BYTES`],
/// as a byte count.
pub const MAX_VALUE_BYTES: u64 = crate::model::change::MAX_VALUE_BYTES as u64;

// Defaults. Each is defined once: here, or in the `Default` impl of its section (`[desired]`,
// `[control]`); validation takes them from there.

/// Default `local.socket`.
pub const DEFAULT_SOCKET: &str = "/run/edgesync/edgesync.sock";
/// Default `local.idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `local.client_timeout`.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_TOPIC_PREFIX: &str = "edgesync";
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
const DEFAULT_RECONNECT_INITIAL: Duration = Duration::from_secs(1);
// 30 s, not 2 min: with full jitter a fleet returning from an outage stays far below what
// the broker accepts, and a 2 min cap made a 30 s outage cost 111-121 s (docs/FLEET.md).
const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(30);
const DEFAULT_RECONNECT_RESET: Duration = Duration::from_secs(60);
const DEFAULT_STORE_PATH: &str = "/var/lib/edgesync/edgesync.redb";
const DEFAULT_MAX_BYTES: u64 = 256 * MIB;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from(DEFAULT_STORE_PATH),
            max_bytes: DEFAULT_MAX_BYTES,
            when_full: WhenFull::DropOldest,
            // The outbox is written at its tail and read once from its head: a larger cache
            // mostly holds pages not read again, and costs RSS (docs/BENCHMARKS.md, "Memory").
            cache_size: MIB,
            classes: Vec::new(),
        }
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            encoding: Encoding::Cbor,
            batch_max_changes: 1000,
            // At least 65KiB (docs/PROTOCOL.md §3): a batch must hold a change with a 64 KiB
            // value.
            batch_max_bytes: 256 * values::KIB,
            linger: Duration::ZERO,
            max_inflight: 8,
            compression: Compression::None,
        }
    }
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            client_timeout: DEFAULT_CLIENT_TIMEOUT,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            interval: Some(Duration::from_secs(60)),
            textfile: None,
        }
    }
}

/// Resolve the config path: `--config` flag, else `$EDGESYNC_CONFIG`, else
/// [`DEFAULT_CONFIG_PATH`]. An empty `$EDGESYNC_CONFIG` counts as unset.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    choose_path(flag, std::env::var_os(CONFIG_ENV))
}

fn choose_path(flag: Option<&Path>, env: Option<OsString>) -> PathBuf {
    match (flag, env) {
        (Some(flag), _) => flag.to_path_buf(),
        (None, Some(env)) if !env.is_empty() => PathBuf::from(env),
        (None, _) => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

/// Only the socket path, for CLI commands that talk to the daemon.
///
/// Lenient on purpose: every other key and every other problem is ignored. A missing or
/// unreadable file, a file that is not TOML, or one without a `[local] socket` string gives
/// [`DEFAULT_SOCKET`]. The path is returned as written (the daemon only accepts absolute ones).
pub fn socket_path(path: &Path) -> PathBuf {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| toml::from_str::<Table>(&text).ok())
        .and_then(|root| {
            root.get("local")
                .and_then(|local| local.get("socket"))
                .and_then(Value::as_str)
                .filter(|socket| !socket.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Only `local.client_timeout`, for CLI commands that talk to the daemon; lenient like
/// [`socket_path`]: a missing or unusable value gives [`DEFAULT_CLIENT_TIMEOUT`].
pub fn client_timeout(path: &Path) -> Duration {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| toml::from_str::<Table>(&text).ok())
        .and_then(|root| {
            root.get("local")
                .and_then(|local| local.get("client_timeout"))
                .and_then(Value::as_str)
                .and_then(|s| RawDuration(s.to_owned()).timeout().ok())
        })
        .unwrap_or(DEFAULT_CLIENT_TIMEOUT)
}

/// Only the store file and `store.max_bytes`, for `edgesync queue` reading the store while
/// the daemon is down.
///
/// Lenient like [`socket_path`], so that an operator can see a backlog even when another
/// part of the config (say, a key file only the agent's user may read) is a problem: every
/// other key is ignored; a missing or unusable value gives the default. A relative path is
/// resolved against the config file's directory, as the daemon does.
pub fn store_location(path: &Path) -> (PathBuf, u64) {
    let root = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| toml::from_str::<Table>(&text).ok());
    let store = root.as_ref().and_then(|r| r.get("store"));
    let file = store
        .and_then(|s| s.get("path"))
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty() && !p.contains('\0'))
        .unwrap_or(DEFAULT_STORE_PATH);
    let dir = path.parent().unwrap_or(Path::new(""));
    let max_bytes = store
        .and_then(|s| s.get("max_bytes"))
        .and_then(|v| {
            RawSize::from_value(v)
                .ok()?
                .bytes((0, u64::MAX), ("", ""))
                .ok()
        })
        .unwrap_or(DEFAULT_MAX_BYTES);
    (dir.join(file), max_bytes)
}

// ---------------------------------------------------------------------------------------------
// The validated configuration.

/// The validated configuration. Built only by [`Config::load`] / [`Config::from_toml_str`].
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from (as given, not canonicalised).
    pub source: PathBuf,
    pub device: DeviceConfig,
    pub mqtt: MqttConfig,
    pub store: StoreConfig,
    pub sync: SyncConfig,
    pub local: LocalConfig,
    pub log: LogConfig,
    /// `[desired]` and its arrays of tables; `DesiredConfig::default()` without the section.
    pub desired: DesiredConfig,
    /// `[telemetry]`: metrics on MQTT and in a Prometheus text file.
    pub telemetry: TelemetryConfig,
    /// `[control]`: commands over MQTT; `ControlConfig::default()` without the section.
    pub control: ControlConfig,
    /// `[aws]`: set exactly when `[cloud] profile = "aws-iot"` (else the `edgesync` profile).
    pub aws: Option<std::sync::Arc<AwsConfig>>,
    /// `[azure]`: set exactly when `[cloud] profile = "azure-iot-hub"`.
    pub azure: Option<std::sync::Arc<AzureConfig>>,
    /// `[[source.mqtt]]`: local brokers the agent subscribes to (none by default).
    pub sources: Vec<SourceConfig>,
}

/// Where a local source's broker listens: TCP on a loopback address, or a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceUrl {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl fmt::Display for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceUrl::Tcp { host, port } if host.contains(':') => {
                write!(f, "mqtt://[{host}]:{port}")
            }
            SourceUrl::Tcp { host, port } => write!(f, "mqtt://{host}:{port}"),
            SourceUrl::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// One `[[source.mqtt]]` (docs/PROTOCOL.md §7.1).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    pub url: SourceUrl,
    /// An MQTT topic filter, checked by [`crate::model::source::check_filter`].
    pub filter: String,
    pub key: crate::model::source::KeyTemplate,
    pub value: crate::model::source::ValueRule,
    /// The MQTT client id of the source's persistent session.
    pub client_id: String,
    /// Subscription QoS: 1 (acknowledged once durable) or 0.
    pub qos: u8,
    /// Most messages received and not yet acknowledged.
    pub max_inflight: usize,
    pub keep_alive: Duration,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl Config {
    /// Filters of every topic the agent uses on its cloud broker (per profile): the loop
    /// guard keeps local sources off them.
    pub fn own_filters(&self) -> Vec<String> {
        let device = self.device.id.as_str();
        if let Some(a) = &self.aws {
            return vec![
                format!("$aws/things/{}/#", a.thing),
                a.telemetry_topic.clone(),
                a.presence_topic.clone(),
                a.metrics_topic.clone(),
            ];
        }
        if self.azure.is_some() {
            return vec![format!("devices/{device}/#"), "$iothub/#".to_owned()];
        }
        vec![format!("{}/{device}/#", self.mqtt.topic_prefix)]
    }
}

/// `[device]`
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub id: DeviceId,
}

/// `[mqtt]`. Paths are resolved against the config file's directory.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// The first of `urls`; for what names one broker (logs, the cloud profiles).
    pub url: BrokerUrl,
    /// `mqtt.urls`, or `[mqtt.url]`: 1 to 16 broker nodes, all mqtts:// or all mqtt://.
    pub urls: Vec<BrokerUrl>,
    /// The order the link tries `urls` in.
    pub url_order: UrlOrder,
    pub topic_prefix: String,
    /// PEM CA bundle; always `Some` when `url.tls`, always `None` otherwise.
    pub ca: Option<PathBuf>,
    /// Client certificate chain (mTLS); `cert` and `key` are both set or both unset.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Whole seconds, 5 s to 65535 s.
    pub keep_alive: Duration,
    /// First reconnect delay ceiling (backoff: exponential, full jitter).
    pub reconnect_initial: Duration,
    /// Largest reconnect delay ceiling.
    pub reconnect_max: Duration,
    /// A connection that lasted this long resets the backoff.
    pub reconnect_reset: Duration,
    /// Whether the reconnect delay is random under its ceiling or the ceiling itself.
    pub reconnect_jitter: ReconnectJitter,
    pub client_id: String,
    pub username: Option<String>,
    /// Only set together with `username`.
    pub password_file: Option<PathBuf>,
    /// Plain TCP was allowed explicitly; the daemon warns at every start when `!url.tls`.
    pub allow_plaintext: bool,
    /// Publish the presence (and its will) retained; off for brokers that refuse retained
    /// messages (Azure Event Grid's MQTT broker closes the connection).
    pub retain: bool,
}

/// `mqtt.url_order`: the order the link tries the broker nodes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlOrder {
    /// `"in-order"`: as listed (the first node is the preferred one).
    InOrder,
    /// `"shuffled"`: a stable permutation per device id, so a fleet spreads over the nodes.
    Shuffled,
}

impl UrlOrder {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "in-order" => Ok(UrlOrder::InOrder),
            "shuffled" => Ok(UrlOrder::Shuffled),
            _ => Err(values::one_of(s, &["in-order", "shuffled"])),
        }
    }
}

/// `mqtt.reconnect_jitter`: how the reconnect delay is drawn under its ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconnectJitter {
    /// `"full"`: uniform in `[0, ceiling]`, so a fleet does not come back in lockstep.
    Full,
    /// `"none"`: the ceiling itself; a fleet retries at the same moments (for measuring
    /// reconnect storms, not for fleets).
    None,
}

impl ReconnectJitter {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(ReconnectJitter::Full),
            "none" => Ok(ReconnectJitter::None),
            _ => Err(values::one_of(s, &["full", "none"])),
        }
    }
}

/// `[store]`
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The redb file; its parent directory may not exist yet (the daemon creates it).
    pub path: PathBuf,
    pub max_bytes: u64,
    pub when_full: WhenFull,
    /// redb page cache, in bytes.
    pub cache_size: u64,
    /// `[[store.class]]`, in file order (issue 19); empty: one class, as before.
    pub classes: Vec<StoreClass>,
}

/// `[[store.class]]`: a retention class (docs/PROTOCOL.md §3.3). A key belongs to the first
/// class whose `keys` glob matches it; other keys to the default class
/// ([`DEFAULT_CLASS_PRIORITY`], no ttl, no filter).
#[derive(Debug, Clone, PartialEq)]
pub struct StoreClass {
    /// For status and metrics; defaults to the glob.
    pub name: String,
    pub keys: crate::model::glob::KeyGlob,
    /// 0-100; the lowest is evicted first when the store is full.
    pub priority: u8,
    /// A queued change older than this (by its `ts`) is evicted first when the store is full.
    pub ttl: Option<Duration>,
    /// A number within this of the key's last queued number is not queued.
    pub deadband: Option<f64>,
    /// A value equal to the key's last queued value is not queued.
    pub dedupe: bool,
    /// A filtered change is queued anyway this long after the key's last queued one.
    pub max_interval: Option<Duration>,
}

/// The priority of keys no `[[store.class]]` matches, and of a class without `priority`.
pub const DEFAULT_CLASS_PRIORITY: u8 = 50;
/// Most `[[store.class]]` entries: every change is matched against them in order.
pub const STORE_CLASSES_MAX: usize = 32;

/// `[sync]`
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub encoding: Encoding,
    pub batch_max_changes: usize,
    /// At least `MAX_VALUE_BYTES + 1 KiB`, so the largest accepted change fits in a batch.
    pub batch_max_bytes: u64,
    pub linger: Duration,
    pub max_inflight: usize,
    pub compression: Compression,
}

/// `[local]`
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Absolute, at most 100 bytes.
    pub socket: PathBuf,
    /// A connection with no request for this long and no answer pending is closed
    /// (watching connections excepted); 1s to 1d.
    pub idle_timeout: Duration,
    /// How long the CLI waits to connect and for each answer; 100ms to 1h.
    pub client_timeout: Duration,
}

/// `[log]` (extension section).
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A level or `target=level` directives (`tracing_subscriber` `Targets`), default `"info"`.
    pub level: String,
}

/// `[telemetry]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// How often metrics are published on `P/D/metrics` and the text file is written;
    /// `None` when `interval = "0"` (off). Otherwise 1 s to 1 d.
    pub interval: Option<Duration>,
    /// Prometheus text exposition file for node_exporter's textfile collector (a `.prom`
    /// file, resolved against the config file's directory), written atomically.
    pub textfile: Option<PathBuf>,
}

/// Every problem found in one config file.
///
/// `Display` prints one line per problem: `{file}: {key}: {message}`, or `{file}: {message}`
/// for problems with the file as a whole.
#[derive(Debug, thiserror::Error)]
#[error("{}", Lines { file: &self.file, problems: &self.problems })]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `"mqtt.keep_alive"`; a section name alone for a whole section; `""`
    /// for the file as a whole.
    pub key: String,
    /// What was expected and what was found.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

struct Lines<'a> {
    file: &'a Path,
    problems: &'a [Problem],
}

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {problem}", self.file.display())?;
        }
        Ok(())
    }
}

impl ConfigErrors {
    fn single(file: &Path, message: String) -> Self {
        ConfigErrors {
            file: file.to_path_buf(),
            problems: vec![Problem {
                key: String::new(),
                message,
            }],
        }
    }
}

impl Config {
    /// Read, parse and validate the file at `path`. On failure returns every problem found.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let bytes = std::fs::read(path)
            .map_err(|err| ConfigErrors::single(path, format!("cannot read: {err}")))?;
        let text = String::from_utf8(bytes).map_err(|err| {
            let offset = err.utf8_error().valid_up_to();
            ConfigErrors::single(
                path,
                format!("is not UTF-8 text (invalid byte at offset {offset})"),
            )
        })?;
        let world_writable = config_file_mode(path);
        match (Self::from_toml_str(path, &text), world_writable) {
            (result, None) => result,
            (Ok(_), Some(problem)) => Err(ConfigErrors::single(path, problem)),
            (Err(mut errors), Some(problem)) => {
                errors.problems.insert(
                    0,
                    Problem {
                        key: String::new(),
                        message: problem,
                    },
                );
                Err(errors)
            }
        }
    }

    /// Parse and validate `text` as if read from `path`: `path` names the file in messages
    /// and relative paths are resolved against its directory.
    pub fn from_toml_str(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let mut problems = Problems::default();
        let config = match toml::from_str::<Table>(text) {
            Ok(root) => {
                let raw = RawConfig::collect(&root, &mut problems);
                validate(path, &raw, &mut problems)
            }
            Err(err) => {
                problems.0.push(syntax_problem(text, &err));
                None
            }
        };
        match config {
            Some(config) if problems.0.is_empty() => Ok(config),
            _ => {
                if problems.0.is_empty() {
                    // Unreachable by construction (every `None` comes with a problem); never
                    // turn that into an empty error report.
                    problems.push("", "incomplete configuration (internal error)");
                }
                problems.sort();
                Err(ConfigErrors {
                    file: path.to_path_buf(),
                    problems: problems.0,
                })
            }
        }
    }
}

/// The directories the unit makes itself (`StateDirectory=`, `RuntimeDirectory=` of
/// systemd/edgesync.service): missing there is a note, not a problem.
const UNIT_DIRS: [&str; 2] = ["/var/lib/edgesync", "/run/edgesync"];

impl Config {
    /// `check-config` only (docs/PROTOCOL.md §2): can the user running it create or write the
    /// store's and the socket's directories, and write an existing store file? Tried for
    /// real (a probe file, removed at once), so root, modes, ACLs and read-only mounts all
    /// count as they will for the agent. `Ok` holds notes.
    pub fn check_dirs(&self) -> Result<Vec<String>, ConfigErrors> {
        let mut problems = Vec::new();
        let mut notes = Vec::new();
        let store = &self.store.path;
        for (key, file) in [("store.path", store), ("local.socket", &self.local.socket)] {
            let dir = match file.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            let Some((missing, message)) = dir_problem(dir) else {
                continue;
            };
            if missing && UNIT_DIRS.iter().any(|u| dir == Path::new(u)) {
                notes.push(format!(
                    "{key}: note: {message} (not needed under systemd: edgesync.service makes it)"
                ));
            } else {
                problems.push(Problem {
                    key: key.into(),
                    message,
                });
            }
        }
        if let Err(e) = std::fs::OpenOptions::new().write(true).open(store)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            let f = store.display();
            let message = format!(
                "cannot write \"{f}\" as this user ({e}); give it to the agent's user: sudo \
                 chown edgesync:edgesync {f}"
            );
            problems.push(Problem {
                key: "store.path".into(),
                message,
            });
        }
        if problems.is_empty() {
            Ok(notes)
        } else {
            Err(ConfigErrors {
                file: self.source.clone(),
                problems,
            })
        }
    }
}

/// Why this user cannot use `dir` (`true`: it is missing), `None` when it can.
fn dir_problem(dir: &Path) -> Option<(bool, String)> {
    use std::io::ErrorKind;
    // The nearest existing part of the path: the agent creates the rest.
    let mut base = dir;
    loop {
        match std::fs::metadata(base) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                let msg = format!("\"{}\" is not a directory", base.display());
                return Some((false, msg));
            }
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                base = base.parent().filter(|p| !p.as_os_str().is_empty())?;
            }
            Err(e) => return Some((false, format!("cannot reach \"{}\": {e}", base.display()))),
        }
    }
    let probe = base.join(format!(".edgesync-check.{}", std::process::id()));
    let err = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let removed = std::fs::remove_file(&probe);
            return removed
                .err()
                .map(|e| (false, format!("{}: {e}", probe.display())));
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return None,
        Err(e) => e,
    };
    let d = dir.display();
    Some(if base == dir {
        let msg = format!(
            "directory \"{d}\" is not writable by this user ({err}); give it to the agent's \
             user: sudo chown edgesync:edgesync {d}"
        );
        (false, msg)
    } else {
        let msg = format!(
            "directory \"{d}\" does not exist and this user cannot create it ({err}); create \
             it: sudo install -d -o edgesync -g edgesync -m 0750 {d}"
        );
        (true, msg)
    })
}

/// The config file itself must not be writable by other users: whoever can write it
/// chooses the broker, the CA and the handler programs the agent runs.
fn config_file_mode(path: &Path) -> Option<String> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    (mode & 0o002 != 0).then(|| {
        format!(
            "has mode {mode:04o}: a config file writable by every user lets anyone choose the \
             broker, the CA and the programs this agent runs; run: chmod 640 \"{}\" (or 600)",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests;
