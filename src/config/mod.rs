//! Configuration: the TOML file of SPEC §3, from bytes on disk to a validated [`Config`].
//!
//! This module owns the file format (every section and key, its default, its limits), the
//! validation rules, the resolution of relative paths, and the error report
//! ([`ConfigErrors`]). Nothing else in the crate reads the config file; `socket_path` is the
//! one lenient reader, for CLI commands that only need to find the daemon.
//!
//! # Two stages
//!
//! 1. **Raw.** The text is parsed into a `toml::Table`. The table is walked against the known
//!    sections and keys: every unknown section or key is reported with its dotted path and,
//!    when one is close, a did-you-mean. Then every known key is converted on its own into the
//!    `Raw*` structs, so one value of the wrong type does not hide the next one. The `Raw*`
//!    structs mirror the file one to one (`deny_unknown_fields`, every field optional); one
//!    macro declares each struct together with its key list, so the two cannot drift apart.
//! 2. **Validated.** `validate` turns raw values into typed ones ([`DeviceId`], [`BrokerUrl`],
//!    [`Duration`], byte counts, resolved paths), applies defaults, checks ranges and the rules
//!    that involve several keys, and checks that the files it names can be read.
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
//!
//! `[control]` (commands over MQTT) is validated here into [`ControlConfig`]; the section
//! types of `[desired]` and `[control]` are in [`desired`] and [`control`].

pub mod control;
pub mod desired;

pub use control::ControlConfig;
pub use desired::{ConflictRule, DesiredConfig, Handler, HandlerKind, Policy};

use crate::model::text::{shorten, suggest};
use crate::sys::log::check_log_level;
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::{Table, Value};

use crate::model::command::CommandName;
use crate::model::glob::KeyGlob;
use crate::model::rules;
use crate::model::rules::{Rule, UnknownKeys, ValueType};

/// Where the daemon and the CLI look for the config file by default (SPEC §2).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/edgesync/edgesync.toml";
/// Environment variable naming the config file when `--config` is not given (SPEC §2).
pub const CONFIG_ENV: &str = "EDGESYNC_CONFIG";
/// Default `local.socket`.
pub const DEFAULT_SOCKET: &str = "/run/edgesync/edgesync.sock";
/// Default `local.idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `local.client_timeout`.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest encoded value of one change (SPEC §5).
pub const MAX_VALUE_BYTES: u64 = 64 * 1024;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

// Defaults.
const DEFAULT_TOPIC_PREFIX: &str = "edgesync";
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(3600);
const DEFAULT_STORE_PATH: &str = "/var/lib/edgesync/edgesync.redb";
const DEFAULT_MAX_BYTES: u64 = 256 * MIB;
const DEFAULT_CACHE_SIZE: u64 = 4 * MIB;
const DEFAULT_BATCH_MAX_CHANGES: i64 = 1000;
/// SPEC §3 shows "64KiB" as an example, but that cannot hold a change with a 64 KiB value.
const DEFAULT_BATCH_MAX_BYTES: u64 = 256 * KIB;
const DEFAULT_LINGER: Duration = Duration::ZERO;
const DEFAULT_MAX_INFLIGHT: i64 = 8;
const DEFAULT_LOG_LEVEL: &str = "info";
const DEFAULT_DOCUMENT_BYTES: u64 = 256 * KIB;
const DEFAULT_MAX_DEPTH: i64 = 16;
const DEFAULT_HISTORY: i64 = 10;
const DEFAULT_CONCURRENCY: i64 = 4;
const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(30);
/// `desired.max_future_ts`: how far ahead of the clock a `ts` is still believed.
const DEFAULT_MAX_FUTURE_TS: Duration = Duration::from_secs(3600);
const MAX_FUTURE_TS_MIN: Duration = Duration::from_secs(1);
const MAX_FUTURE_TS_MAX: Duration = Duration::from_secs(30 * 86_400);
const DEFAULT_TELEMETRY_INTERVAL: Duration = Duration::from_secs(60);
const DEFAULT_REPLAY_WINDOW: &str = "24h";

// Limits.
const DEVICE_ID_MAX: usize = 64;
const TOPIC_PREFIX_MAX: usize = 128;
const CLIENT_ID_MAX: usize = 128;
const KEEP_ALIVE_MIN: Duration = Duration::from_secs(5);
const KEEP_ALIVE_MAX: Duration = Duration::from_secs(65535);
const STORE_MIN_BYTES: u64 = MIB;
const CACHE_MIN: u64 = 256 * KIB;
const CACHE_MAX: u64 = GIB;
const BATCH_MAX_CHANGES_LIMIT: i64 = 100_000;
/// A 64 KiB value plus a 128-character key and the batch envelope.
const BATCH_BYTES_MIN: u64 = MAX_VALUE_BYTES + KIB;
const BATCH_BYTES_MAX: u64 = 256 * MIB;
const LINGER_MAX: Duration = Duration::from_secs(10);
const MAX_INFLIGHT_LIMIT: i64 = 1024;
/// `sun_path` holds 108 bytes on Linux (104 on some other systems); keep a margin.
const SOCKET_PATH_MAX: usize = 100;

const DOCUMENT_BYTES_MIN: u64 = KIB;
const DOCUMENT_BYTES_MAX: u64 = 16 * MIB;
const MAX_DEPTH_LIMIT: i64 = 64;
const HISTORY_LIMIT: i64 = 1000;
const CONCURRENCY_LIMIT: i64 = 64;
/// Timeouts of handlers, merge programs and watch acks.
const HANDLER_TIMEOUT_MIN: Duration = Duration::from_millis(100);
const HANDLER_TIMEOUT_MAX: Duration = Duration::from_secs(3600);
/// Most entries of each of `[[desired.rule]]`, `[[desired.conflict]]`, `[[desired.handler]]`:
/// every key of every document is matched against them in order.
const DESIRED_TABLES_MAX: usize = 1000;
/// `telemetry.interval`, when not "0" (off).
const TELEMETRY_INTERVAL_MIN: Duration = Duration::from_secs(1);
const TELEMETRY_INTERVAL_MAX: Duration = Duration::from_secs(86_400);
/// `control.replay_window`: ids are kept from a minute to 30 days.
const REPLAY_WINDOW_MIN: Duration = Duration::from_secs(60);
const REPLAY_WINDOW_MAX: Duration = Duration::from_secs(30 * 86_400);
/// `control.replay_max`: each kept id holds its response (at most 64 KiB, usually < 1 KiB).
const REPLAY_MAX_LIMIT: i64 = 1_000_000;

const UNKNOWN_KEYS: &[&str] = &["accept", "reject"];
const VALUE_TYPES: &[&str] = &["bool", "integer", "number", "string", "object", "array"];
const POLICIES: &[&str] = &["cloud-wins", "device-wins", "last-write-wins", "merge"];
const HANDLER_TYPES: &[&str] = &["exec", "file", "watch"];

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
                .and_then(|s| {
                    timeout_value(Some(&RawDuration(s.to_owned())), DEFAULT_CLIENT_TIMEOUT).ok()
                })
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
        .and_then(|v| match v {
            Value::String(s) => parse_size(s).ok(),
            Value::Integer(n) => u64::try_from(*n).ok(),
            _ => None,
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
}

/// `[device]`
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub id: DeviceId,
}

/// A device id: 1-64 characters of `[A-Za-z0-9_.-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceId(String);

/// `[mqtt]`. Paths are resolved against the config file's directory.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub url: BrokerUrl,
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
    pub client_id: String,
    pub username: Option<String>,
    /// Only set together with `username`.
    pub password_file: Option<PathBuf>,
    /// Plain TCP was allowed explicitly; the daemon warns at every start when `!url.tls`.
    pub allow_plaintext: bool,
}

/// A broker address: `mqtts://host[:port]` or `mqtt://host[:port]`.
///
/// `host` is a DNS name or an IP address; an IPv6 address is held without its brackets.
/// `Display` gives back the canonical form, `mqtts://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
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
}

/// `store.when_full`: what a report does when the store is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// `"drop-oldest"`: drop the oldest queued changes to make room (counted).
    DropOldest,
    /// `"reject"`: refuse the new report (counted).
    Reject,
}

/// `[sync]`
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub encoding: Encoding,
    pub batch_max_changes: usize,
    /// At least `MAX_VALUE_BYTES + 1 KiB`, so the largest accepted change fits in a batch.
    pub batch_max_bytes: u64,
    pub linger: Duration,
    pub max_inflight: usize,
}

/// `sync.encoding`: the encoding of reported batches.
pub use crate::model::doc::Encoding;

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

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            interval: Some(DEFAULT_TELEMETRY_INTERVAL),
            textfile: None,
        }
    }
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
                validate(path, raw, &mut problems)
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

// ---------------------------------------------------------------------------------------------
// Newtypes.

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

impl DeviceId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn check(s: &str) -> Result<(), String> {
        const EXPECTED: &str = "expected 1-64 characters of [A-Za-z0-9_.-]";
        if s.is_empty() {
            return Err(format!("{EXPECTED}, found an empty string"));
        }
        if let Some((at, c)) = s.char_indices().find(|&(_, c)| !is_id_char(c)) {
            return Err(format!(
                "{EXPECTED}, found {:?} ({c:?} at byte {at} is not allowed)",
                shorten(s)
            ));
        }
        if s.len() > DEVICE_ID_MAX {
            return Err(format!(
                "{EXPECTED}, found {} characters: {:?}",
                s.len(),
                shorten(s)
            ));
        }
        Ok(())
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for DeviceId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::check(s)?;
        Ok(DeviceId(s.to_owned()))
    }
}

impl TryFrom<String> for DeviceId {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::check(&s)?;
        Ok(DeviceId(s))
    }
}

impl BrokerUrl {
    /// The port used when the URL names none: 8883 for `mqtts`, 1883 for `mqtt`.
    pub fn default_port(tls: bool) -> u16 {
        if tls { 8883 } else { 1883 }
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls { "mqtts" } else { "mqtt" }
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}://[{}]:{}", self.scheme(), self.host, self.port)
        } else {
            write!(f, "{}://{}:{}", self.scheme(), self.host, self.port)
        }
    }
}

impl FromStr for BrokerUrl {
    type Err = String;

    /// Parses `mqtts://host[:port][/]` or `mqtt://host[:port][/]`. Whether plain `mqtt://` is
    /// allowed is not decided here (see `mqtt.allow_plaintext`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const FORM: &str = "expected mqtts://host[:port] (or mqtt://host[:port] with \
                            mqtt.allow_plaintext = true)";
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(format!("{FORM}, found {:?} (no scheme)", shorten(s)));
        };
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "mqtts" => true,
            "mqtt" => false,
            _ => {
                return Err(format!(
                    "unsupported scheme \"{}://\" in {:?}; the allowed schemes are mqtts:// \
                     (TLS) and mqtt:// (plain TCP, needs mqtt.allow_plaintext = true)",
                    shorten(scheme),
                    shorten(s)
                ));
            }
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(format!(
                "{FORM}, found {:?}: nothing may follow host[:port] except a trailing \"/\"",
                shorten(s)
            ));
        }
        if authority.contains('@') {
            return Err(format!(
                "{FORM}, found {:?}: credentials in the URL are not supported; use \
                 mqtt.username and mqtt.password_file",
                shorten(s)
            ));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let Some((host, after)) = bracketed.split_once(']') else {
                return Err(format!("{FORM}, found {:?}: missing \"]\"", shorten(s)));
            };
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!(
                    "{FORM}, found {:?}: {host:?} is not an IPv6 address",
                    shorten(s)
                ));
            }
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(port) => Some(port),
                    None => {
                        return Err(format!(
                            "{FORM}, found {:?}: expected \":port\" after \"]\"",
                            shorten(s)
                        ));
                    }
                },
            };
            (host, port)
        } else {
            let (host, port) = match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            };
            if port.is_some_and(|port| port.contains(':')) {
                return Err(format!(
                    "{FORM}, found {:?}: write an IPv6 address in brackets, e.g. \
                     mqtts://[2001:db8::1]:8883",
                    shorten(s)
                ));
            }
            if host.is_empty() {
                return Err(format!("{FORM}, found {:?}: the host is empty", shorten(s)));
            }
            if let Some(c) = host
                .chars()
                .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
            {
                return Err(format!(
                    "{FORM}, found {:?}: {c:?} is not allowed in a host name",
                    shorten(s)
                ));
            }
            if host.len() > 253 {
                return Err(format!(
                    "{FORM}, found a host name of {} bytes (at most 253)",
                    host.len()
                ));
            }
            (host, port)
        };
        let port = match port {
            None => Self::default_port(tls),
            Some(port) => match port.parse::<u16>() {
                Ok(n) if n != 0 && port.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => {
                    return Err(format!(
                        "{FORM}, found {:?}: the port must be a number from 1 to 65535",
                        shorten(s)
                    ));
                }
            },
        };
        Ok(BrokerUrl {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

impl WhenFull {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "drop-oldest" => Ok(WhenFull::DropOldest),
            "reject" => Ok(WhenFull::Reject),
            _ => Err(one_of(s, &["drop-oldest", "reject"])),
        }
    }
}

impl Encoding {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "cbor" => Ok(Encoding::Cbor),
            "json" => Ok(Encoding::Json),
            _ => Err(one_of(s, &["cbor", "json"])),
        }
    }
}

fn one_of(found: &str, allowed: &[&str]) -> String {
    let list = allowed
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(" or ");
    match suggest(found, allowed) {
        Some(near) => format!(
            "expected {list}, found {:?} (did you mean {near:?}?)",
            shorten(found)
        ),
        None => format!("expected {list}, found {:?}", shorten(found)),
    }
}

// ---------------------------------------------------------------------------------------------
// Durations and sizes.

/// Parse a duration: a whole number and a unit, `ms`, `s`, `m`, `h` or `d` (`"250ms"`,
/// `"30s"`, `"5m"`, `"1h"`, `"2d"`); `"0"` alone is zero. Rejects negative, fractional,
/// empty, unknown units and values too large to represent.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const FORM: &str = "expected a duration such as \"250ms\", \"30s\", \"5m\", \"1h\" or \"2d\"";
    let (number, unit) = split_number(s, FORM)?;
    let per_unit_ms: u64 = match unit {
        "" if number == 0 => 0,
        "" => {
            return Err(format!(
                "{FORM}, found {:?}: the unit is missing (ms, s, m, h or d)",
                shorten(s)
            ));
        }
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{FORM}, found {:?}: unknown unit {:?} (expected ms, s, m, h or d)",
                shorten(s),
                shorten(unit)
            ));
        }
    };
    number
        .checked_mul(per_unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{FORM}, found {:?}: too large", shorten(s)))
}

/// Parse a size: a whole number and an optional unit: `B` (or none) for bytes; `KiB`, `MiB`,
/// `GiB`, `TiB` (powers of 1024); `KB`, `MB`, `GB`, `TB` (powers of 1000). Units are matched
/// without regard to case. Rejects negative, fractional, empty, unknown units and overflow.
pub fn parse_size(s: &str) -> Result<u64, String> {
    const FORM: &str =
        "expected a size such as \"64KiB\", \"256MiB\", \"1GiB\", \"100B\" or \"512\" (bytes)";
    let (number, unit) = split_number(s, FORM)?;
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        "tib" => 1024 * GIB,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "{FORM}, found {:?}: unknown unit {:?} (expected B, KiB, MiB, GiB, TiB, KB, \
                 MB, GB or TB)",
                shorten(s),
                shorten(unit)
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{FORM}, found {:?}: too large", shorten(s)))
}

/// Split `" 30 s "` into `(30, "s")`: surrounding whitespace and whitespace between the
/// number and the unit are allowed.
fn split_number<'a>(s: &'a str, form: &str) -> Result<(u64, &'a str), String> {
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("{form}, found an empty string"));
    }
    if t.starts_with('-') {
        return Err(format!("{form}, found {:?}: it is negative", shorten(s)));
    }
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(end);
    if digits.is_empty() {
        return Err(format!(
            "{form}, found {:?}: it does not start with a number",
            shorten(s)
        ));
    }
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "{form}, found {:?}: use a whole number (a smaller unit instead of a fraction)",
            shorten(s)
        ));
    }
    let number = digits
        .parse::<u64>()
        .map_err(|_| format!("{form}, found {:?}: too large", shorten(s)))?;
    Ok((number, unit.trim_start()))
}

/// `65536` → `"64KiB (65536 bytes)"`, `1000` → `"1000 bytes"`.
fn fmt_size(bytes: u64) -> String {
    for (unit, name) in [(GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{name} ({bytes} bytes)", bytes / unit);
        }
    }
    format!("{bytes} bytes")
}

// ---------------------------------------------------------------------------------------------
// Stage 1: the raw file.

/// A problem list being collected.
#[derive(Debug, Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Put the problems in the order of the file format: file-level ones first, then the known
    /// sections and their keys in documented order (unknown keys after the known ones), then
    /// unknown sections. Stable: problems of one key keep their order.
    fn sort(&mut self) {
        self.0.sort_by_key(|problem| sort_key(&problem.key));
    }

    /// Whether a problem was already reported for `key` or for one of its parents (a
    /// section, an array of tables or one of its entries).
    fn mentions(&self, key: &str) -> bool {
        self.0.iter().any(|p| {
            p.key == key
                || key
                    .strip_prefix(p.key.as_str())
                    .is_some_and(|rest| rest.starts_with(['.', '[']))
        })
    }
}

/// Where a problem goes in the report: `(file-level / known section / unknown section,
/// section, key, entry of an array of tables, key inside that entry)`, in documented order;
/// unknown keys come after the known ones of their section or table.
fn sort_key(key: &str) -> (u8, usize, usize, usize, usize) {
    if key.is_empty() {
        return (0, 0, 0, 0, 0);
    }
    let (section, rest) = key.split_once('.').unwrap_or((key, ""));
    let Some(s) = SECTIONS.iter().position(|(name, _)| *name == section) else {
        return (2, 0, 0, 0, 0);
    };
    if rest.is_empty() {
        return (1, s, 0, 0, 0);
    }
    let position = |keys: &[&str], key: &str| {
        keys.iter()
            .position(|k| *k == key)
            .map_or(keys.len() + 1, |k| k + 1)
    };
    let end = rest.find(['[', '.']).unwrap_or(rest.len());
    let (base, after) = rest.split_at(end);
    let k = position(SECTIONS[s].1, base);
    // `rule[2].max`: the entry's number, then the key inside it.
    let Some((index, inner)) = after
        .strip_prefix('[')
        .and_then(|after| after.split_once(']'))
    else {
        return (1, s, k, 0, 0);
    };
    let index = index.parse::<usize>().unwrap_or(usize::MAX);
    let inner = inner.strip_prefix('.').unwrap_or("");
    let inner = match (
        inner,
        SUBTABLES.iter().find(|t| t.0 == section && t.1 == base),
    ) {
        ("", _) => 0,
        (inner, Some((_, _, keys))) => position(keys, inner),
        (_, None) => usize::MAX,
    };
    (1, s, k, index, inner)
}

/// A size as written: a string with a unit, or an integer number of bytes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

/// A duration as written: always a string.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
struct RawDuration(String);

/// Conversion of one TOML value to a raw field type, with an error saying what was expected
/// and what was found.
trait FromValue: Sized {
    fn from_value(value: &Value) -> Result<Self, String>;
}

impl FromValue for String {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::String(s) => Ok(s.clone()),
            other => Err(expected("a string", other)),
        }
    }
}

impl FromValue for bool {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Boolean(b) => Ok(*b),
            other => Err(expected("true or false", other)),
        }
    }
}

impl FromValue for i64 {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Integer(i) => Ok(*i),
            other => Err(expected("an integer", other)),
        }
    }
}

impl FromValue for RawSize {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Integer(i) => Ok(RawSize::Bytes(*i)),
            Value::String(s) => Ok(RawSize::Text(s.clone())),
            other => Err(expected(
                "a size such as \"64KiB\" or an integer number of bytes",
                other,
            )),
        }
    }
}

impl FromValue for RawDuration {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::String(s) => Ok(RawDuration(s.clone())),
            other => Err(expected("a duration string such as \"30s\"", other)),
        }
    }
}

/// Names as written: an array of strings (`control.allow`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
struct RawNames(Vec<String>);

impl FromValue for RawNames {
    fn from_value(value: &Value) -> Result<Self, String> {
        const WHAT: &str = "an array of names such as [\"ping\", \"status\"]";
        let Value::Array(items) = value else {
            return Err(expected(WHAT, value));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "expected {WHAT}, found an array whose item {} is {}",
                    i + 1,
                    describe(other)
                )),
            })
            .collect::<Result<_, _>>()
            .map(RawNames)
    }
}

/// A number as written: TOML integers and floats are both numbers.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
enum RawNumber {
    Integer(i64),
    Float(f64),
}

impl FromValue for RawNumber {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Integer(i) => Ok(RawNumber::Integer(*i)),
            Value::Float(x) => Ok(RawNumber::Float(*x)),
            other => Err(expected("a number", other)),
        }
    }
}

/// A program and its arguments, `["/usr/bin/prog", "--flag", "{key}"]`.
impl FromValue for Vec<String> {
    fn from_value(value: &Value) -> Result<Self, String> {
        const WHAT: &str = "an array of strings such as [\"/usr/bin/prog\", \"--flag\"]";
        let Value::Array(items) = value else {
            return Err(expected(WHAT, value));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "expected {WHAT}, found an array whose item {} is {}",
                    i + 1,
                    describe(other)
                )),
            })
            .collect()
    }
}

/// The values of `enum`, any TOML values (converted to JSON during validation).
impl FromValue for Vec<Value> {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Array(items) => Ok(items.clone()),
            other => Err(expected("an array of the allowed values", other)),
        }
    }
}

fn expected(what: &str, found: &Value) -> String {
    format!("expected {what}, found {}", describe(found))
}

/// `"a string \"x\""`, `"an integer 5"`, `"a table"`.
fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("a string {:?}", shorten(s)),
        Value::Integer(i) => format!("an integer {i}"),
        Value::Float(x) => format!("a float {x}"),
        Value::Boolean(b) => format!("a boolean {b}"),
        Value::Datetime(d) => format!("a datetime {d}"),
        Value::Array(_) => "an array".to_owned(),
        Value::Table(_) => "a table".to_owned(),
    }
}

/// Convert `table[key]` if present; on a type error record it under `section.key`.
fn take<T: FromValue>(table: &Table, section: &str, key: &str, p: &mut Problems) -> Option<T> {
    let value = table.get(key)?;
    match T::from_value(value) {
        Ok(v) => Some(v),
        Err(message) => {
            p.push(format!("{section}.{key}"), message);
            None
        }
    }
}

/// A table of the file as a raw struct: its keys, in documented order, and its
/// field-by-field collector (`section` is the dotted name of the table, for messages).
trait RawTable: Default {
    const KEYS: &'static [&'static str];

    fn collect(table: &Table, section: &str, p: &mut Problems) -> Self;
}

/// The TOML key of a raw field: its name, or the name given with `as "key"` (for keys that
/// are Rust keywords, such as `type`).
macro_rules! key_name {
    ($field:ident) => {
        stringify!($field)
    };
    ($field:ident $key:literal) => {
        $key
    };
}

/// Declares a raw table struct (every field optional, `deny_unknown_fields`), its key list
/// and its field-by-field collector from a `toml::Table`. `field as "key": Type` reads the
/// TOML key `key`; the fields after `tables` are arrays of tables (`[[section.field]]`).
macro_rules! raw_section {
    (
        $(#[$meta:meta])*
        struct $name:ident {
            $($field:ident $(as $key:literal)?: $ty:ty),* $(,)?
        }
        $(tables { $($table:ident: $table_ty:ty),* $(,)? })?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Default, Clone, PartialEq, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            $($(#[serde(rename = $key)])? $field: Option<$ty>,)*
            $($($table: Option<Vec<$table_ty>>,)*)?
        }

        impl RawTable for $name {
            const KEYS: &'static [&'static str] =
                &[$(key_name!($field $($key)?)),* $($(, stringify!($table))*)?];

            fn collect(table: &Table, section: &str, p: &mut Problems) -> Self {
                $name {
                    $($field: take(table, section, key_name!($field $($key)?), p),)*
                    $($($table: take_tables(table, section, stringify!($table), p),)*)?
                }
            }
        }
    };
}

/// Convert the array of tables `table[key]` (`[[section.key]]`) if present. Every entry is
/// checked for unknown keys and converted on its own, named `section.key[n]` (from 1); an
/// entry that is not a table is reported and kept as an empty entry, so that the entries
/// after it keep their numbers.
fn take_tables<T: RawTable>(
    table: &Table,
    section: &str,
    key: &str,
    p: &mut Problems,
) -> Option<Vec<T>> {
    let value = table.get(key)?;
    let name = format!("{section}.{key}");
    let Value::Array(items) = value else {
        let hint = if value.is_table() {
            format!(" (write [[{name}]], with double brackets, once per entry)")
        } else {
            String::new()
        };
        p.push(
            name.as_str(),
            format!(
                "expected an array of tables [[{name}]], found {}{hint}",
                describe(value)
            ),
        );
        return None;
    };
    if items.len() > DESIRED_TABLES_MAX {
        p.push(
            name.as_str(),
            format!(
                "expected at most {DESIRED_TABLES_MAX} [[{name}]] tables, found {}",
                items.len()
            ),
        );
    }
    let entries = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let entry = format!("{name}[{}]", i + 1);
            match item {
                Value::Table(fields) => {
                    for field in fields.keys().filter(|f| !T::KEYS.contains(&f.as_str())) {
                        p.push(
                            format!("{entry}.{field}"),
                            unknown_table_key(&name, field, T::KEYS),
                        );
                    }
                    T::collect(fields, &entry, p)
                }
                other => {
                    p.push(entry, expected(&format!("a table [[{name}]]"), other));
                    T::default()
                }
            }
        })
        .collect();
    Some(entries)
}

raw_section! {
    /// `[device]`
    struct RawDevice {
        id: String,
    }
}

raw_section! {
    /// `[mqtt]`
    struct RawMqtt {
        url: String,
        topic_prefix: String,
        ca: String,
        cert: String,
        key: String,
        keep_alive: RawDuration,
        reconnect_initial: RawDuration,
        reconnect_max: RawDuration,
        reconnect_reset: RawDuration,
        client_id: String,
        username: String,
        password_file: String,
        allow_plaintext: bool,
    }
}

raw_section! {
    /// `[store]`
    struct RawStore {
        path: String,
        max_bytes: RawSize,
        when_full: String,
        cache_size: RawSize,
    }
}

raw_section! {
    /// `[sync]`
    struct RawSync {
        encoding: String,
        batch_max_changes: i64,
        batch_max_bytes: RawSize,
        linger: RawDuration,
        max_inflight: i64,
    }
}

raw_section! {
    /// `[local]`
    struct RawLocal {
        socket: String,
        idle_timeout: RawDuration,
        client_timeout: RawDuration,
    }
}

raw_section! {
    /// `[log]`
    struct RawLog {
        level: String,
    }
}

raw_section! {
    /// `[control]`
    struct RawControl {
        allow: RawNames,
        replay_window: RawDuration,
        replay_max: i64,
    }
}

raw_section! {
    /// `[telemetry]`
    struct RawTelemetry {
        interval: RawDuration,
        textfile: String,
    }
}

raw_section! {
    /// `[desired]`
    struct RawDesired {
        max_document_bytes: RawSize,
        max_depth: i64,
        unknown_keys: String,
        history: i64,
        concurrency: i64,
        handler_timeout: RawDuration,
        max_future_ts: RawDuration,
    }
    tables {
        rule: RawRule,
        conflict: RawConflict,
        handler: RawHandler,
    }
}

raw_section! {
    /// `[[desired.rule]]`
    struct RawRule {
        keys: String,
        kind as "type": String,
        min: RawNumber,
        max: RawNumber,
        one_of as "enum": Vec<Value>,
        max_length: i64,
        nullable: bool,
    }
}

raw_section! {
    /// `[[desired.conflict]]`
    struct RawConflict {
        keys: String,
        policy: String,
        command: Vec<String>,
        timeout: RawDuration,
    }
}

raw_section! {
    /// `[[desired.handler]]`: every key of every handler type (each type takes some).
    struct RawHandler {
        keys: String,
        kind as "type": String,
        command: Vec<String>,
        timeout: RawDuration,
        path: String,
        deadline: RawDuration,
    }
}

/// The whole file, as written.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    device: Option<RawDevice>,
    mqtt: Option<RawMqtt>,
    store: Option<RawStore>,
    sync: Option<RawSync>,
    local: Option<RawLocal>,
    log: Option<RawLog>,
    telemetry: Option<RawTelemetry>,
    desired: Option<RawDesired>,
    control: Option<RawControl>,
}

/// The known sections and their keys, in file order.
const SECTIONS: &[(&str, &[&str])] = &[
    ("device", RawDevice::KEYS),
    ("mqtt", RawMqtt::KEYS),
    ("store", RawStore::KEYS),
    ("sync", RawSync::KEYS),
    ("local", RawLocal::KEYS),
    ("log", RawLog::KEYS),
    ("telemetry", RawTelemetry::KEYS),
    ("desired", RawDesired::KEYS),
    ("control", RawControl::KEYS),
];

/// The known arrays of tables: section, key, and the keys of one entry.
const SUBTABLES: &[(&str, &str, &[&str])] = &[
    ("desired", "rule", RawRule::KEYS),
    ("desired", "conflict", RawConflict::KEYS),
    ("desired", "handler", RawHandler::KEYS),
];

impl RawConfig {
    /// Report every unknown section and key, then convert every known key on its own.
    fn collect(root: &Table, p: &mut Problems) -> RawConfig {
        fn known<T: RawTable>(root: &Table, name: &str, p: &mut Problems) -> Option<T> {
            section(root, name, p).map(|t| T::collect(t, name, p))
        }
        report_unknown(root, p);
        RawConfig {
            device: known(root, "device", p),
            mqtt: known(root, "mqtt", p),
            store: known(root, "store", p),
            sync: known(root, "sync", p),
            local: known(root, "local", p),
            log: known(root, "log", p),
            telemetry: known(root, "telemetry", p),
            desired: known(root, "desired", p),
            control: known(root, "control", p),
        }
    }
}

fn section<'a>(root: &'a Table, name: &str, p: &mut Problems) -> Option<&'a Table> {
    match root.get(name)? {
        Value::Table(table) => Some(table),
        other => {
            p.push(name, expected(&format!("a table [{name}]"), other));
            None
        }
    }
}

fn report_unknown(root: &Table, p: &mut Problems) {
    let section_list = SECTIONS
        .iter()
        .map(|(name, _)| format!("[{name}]"))
        .collect::<Vec<_>>()
        .join(", ");
    for (name, value) in root {
        match SECTIONS.iter().find(|(known, _)| known == name) {
            Some((_, keys)) => {
                if let Value::Table(table) = value {
                    for key in table.keys().filter(|key| !keys.contains(&key.as_str())) {
                        p.push(format!("{name}.{key}"), unknown_key(name, key, keys));
                    }
                }
            }
            None if value.is_table() => {
                let names: Vec<&str> = SECTIONS.iter().map(|(name, _)| *name).collect();
                let hint = match suggest(name, &names) {
                    Some(near) => format!(" (did you mean [{near}]?)"),
                    None => String::new(),
                };
                p.push(
                    name.as_str(),
                    format!("unknown section{hint}; expected one of {section_list}"),
                );
            }
            None => {
                let hint = match SECTIONS
                    .iter()
                    .find(|(_, keys)| keys.contains(&name.as_str()))
                {
                    Some((section, _)) => format!(" (it belongs in [{section}])"),
                    None => String::new(),
                };
                p.push(
                    name.as_str(),
                    format!(
                        "unknown key outside any section{hint}; keys go in one of the \
                         sections {section_list}"
                    ),
                );
            }
        }
    }
}

/// An unknown key in an entry of the array of tables `name` (`"desired.rule"`).
fn unknown_table_key(name: &str, key: &str, keys: &[&str]) -> String {
    let hint = match suggest(key, keys) {
        Some(near) => format!(" (did you mean {near:?}?)"),
        None => {
            let other_table = SUBTABLES
                .iter()
                .find(|(section, table, keys)| {
                    format!("{section}.{table}") != name && keys.contains(&key)
                })
                .map(|(section, table, _)| format!(" (it belongs in [[{section}.{table}]])"));
            let section = name.split('.').next().unwrap_or(name);
            let own_section = SECTIONS
                .iter()
                .find(|(known, keys)| *known == section && keys.contains(&key))
                .map(|(known, _)| format!(" (it belongs in [{known}])"));
            other_table.or(own_section).unwrap_or_default()
        }
    };
    format!("unknown key{hint}; expected one of {}", keys.join(", "))
}

fn unknown_key(section: &str, key: &str, keys: &[&str]) -> String {
    let hint = match suggest(key, keys) {
        Some(near) => format!(" (did you mean {near:?}?)"),
        None => match SECTIONS
            .iter()
            .find(|(other, other_keys)| *other != section && other_keys.contains(&key))
        {
            Some((other, _)) => format!(" (it belongs in [{other}])"),
            None => String::new(),
        },
    };
    format!("unknown key{hint}; expected one of {}", keys.join(", "))
}

/// A TOML syntax error as a problem: line and column, and the dotted key of the line when
/// the line is a `key = value` line.
fn syntax_problem(text: &str, err: &toml::de::Error) -> Problem {
    let message = err.message().trim().replace('\n', "; ");
    match err.span() {
        Some(span) => {
            let offset = floor_char_boundary(text, span.start);
            let (line, column) = line_column(text, offset);
            Problem {
                key: key_of_line(text, offset).unwrap_or_default(),
                message: format!("TOML syntax error at line {line}, column {column}: {message}"),
            }
        }
        None => Problem {
            key: String::new(),
            message: format!("TOML syntax error: {message}"),
        },
    }
}

fn floor_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// 1-based line and column (in characters) of a byte offset on a char boundary.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// `mqtt.keep_alive` for an error on the line `keep_alive = 30s` below `[mqtt]`.
fn key_of_line(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let is_key = !key.is_empty() && key.chars().all(|c| is_id_char(c) || c == ' ');
    if !is_key {
        return None;
    }
    let key = key.replace(' ', "");
    let before: Vec<&str> = text[..line_start].lines().map(str::trim).collect();
    let header_name = |line: &str| {
        line.trim_start_matches('[')
            .split(']')
            .next()
            .map(|name| name.replace(' ', ""))
            .filter(|name| !name.is_empty())
    };
    let header = before
        .iter()
        .rposition(|l| l.starts_with('['))
        .and_then(|at| {
            let name = header_name(before[at])?;
            if !before[at].starts_with("[[") {
                return Some(name);
            }
            // `[[desired.rule]]`: its entries are numbered from 1.
            let n = before[..=at]
                .iter()
                .filter(|l| l.starts_with("[[") && header_name(l).as_deref() == Some(&name))
                .count();
            Some(format!("{name}[{n}]"))
        });
    Some(match header {
        Some(header) => format!("{header}.{key}"),
        None => key,
    })
}

// ---------------------------------------------------------------------------------------------
// Stage 2: validation.

fn validate(source: &Path, raw: RawConfig, p: &mut Problems) -> Option<Config> {
    let dir = source.parent().unwrap_or(Path::new(""));
    let device = validate_device(raw.device, p);
    let mqtt = validate_mqtt(raw.mqtt, device.as_ref().map(|d| &d.id), dir, p);
    let store = validate_store(raw.store.unwrap_or_default(), dir, p);
    let sync = validate_sync(raw.sync.unwrap_or_default(), p);
    let local = validate_local(raw.local.unwrap_or_default(), p);
    let log = validate_log(raw.log.unwrap_or_default(), p);
    let desired = validate_desired(raw.desired.unwrap_or_default(), dir, p);
    let telemetry = validate_telemetry(raw.telemetry.unwrap_or_default(), dir, p);
    let control = validate_control(raw.control.unwrap_or_default(), p);
    Some(Config {
        source: source.to_path_buf(),
        device: device?,
        mqtt: mqtt?,
        store: store?,
        sync: sync?,
        local: local?,
        log: log?,
        desired: desired?,
        telemetry: telemetry?,
        control: control?,
    })
}

/// A required value: `None` is reported as missing, unless a problem was already reported
/// for it (a value of the wrong type is not also "missing").
fn require<T>(p: &mut Problems, key: &str, value: Option<T>, what: &str) -> Option<T> {
    if value.is_none() && !p.mentions(key) {
        p.push(key, format!("missing required key; expected {what}"));
    }
    value
}

/// Record `Err(message)` under `key`.
fn check<T>(p: &mut Problems, key: &str, result: Result<T, String>) -> Option<T> {
    result.map_err(|message| p.push(key, message)).ok()
}

fn validate_device(raw: Option<RawDevice>, p: &mut Problems) -> Option<DeviceConfig> {
    let raw = raw.unwrap_or_default();
    let id = require(
        p,
        "device.id",
        raw.id,
        "this device's id, 1-64 characters of [A-Za-z0-9_.-]",
    )?;
    let id = check(p, "device.id", DeviceId::try_from(id))?;
    Some(DeviceConfig { id })
}

fn validate_mqtt(
    raw: Option<RawMqtt>,
    device: Option<&DeviceId>,
    dir: &Path,
    p: &mut Problems,
) -> Option<MqttConfig> {
    let Some(raw) = raw else {
        if !p.mentions("mqtt") {
            p.push(
                "mqtt",
                "missing required section [mqtt]; it needs at least url = \"mqtts://host:port\" \
                 and ca = \"/path/to/ca.pem\"",
            );
        }
        return None;
    };
    let allow_plaintext = raw.allow_plaintext.unwrap_or(false);

    let url = require(
        p,
        "mqtt.url",
        raw.url,
        "the broker address, mqtts://host[:port]",
    )
    .and_then(|url| check(p, "mqtt.url", url.parse::<BrokerUrl>()));
    let tls = url.as_ref().map(|url| url.tls);
    let url = url.filter(|url| {
        let refused = !url.tls && !allow_plaintext;
        if refused {
            p.push(
                "mqtt.url",
                "\"mqtt://\" is plaintext; set mqtt.allow_plaintext = true to allow it, or use \
                 mqtts://",
            );
        }
        !refused
    });

    let topic_prefix = check(
        p,
        "mqtt.topic_prefix",
        check_topic_prefix(raw.topic_prefix.as_deref().unwrap_or(DEFAULT_TOPIC_PREFIX)),
    );

    // TLS files: checked when the URL is TLS or could not be read; refused with plain TCP,
    // where they would be silently unused.
    let tls_files = [
        ("mqtt.ca", &raw.ca),
        ("mqtt.cert", &raw.cert),
        ("mqtt.key", &raw.key),
    ];
    if tls == Some(false) {
        for (key, value) in tls_files {
            if value.is_some() {
                p.push(
                    key,
                    "is set, but mqtt.url is plaintext (mqtt://) and it would be unused; use \
                     mqtts:// or remove it",
                );
            }
        }
    }
    let check_tls_files = tls != Some(false);
    let ca = readable_file(p, "mqtt.ca", raw.ca.as_deref(), dir, check_tls_files);
    let cert = readable_file(p, "mqtt.cert", raw.cert.as_deref(), dir, check_tls_files);
    let key = readable_file(p, "mqtt.key", raw.key.as_deref(), dir, check_tls_files);
    if check_tls_files && let Some(Some(path)) = &key {
        private_file(p, "mqtt.key", path, "a private key");
    }
    if tls == Some(true) && raw.ca.is_none() && !p.mentions("mqtt.ca") {
        p.push(
            "mqtt.ca",
            "missing; mqtts:// needs a PEM CA bundle to verify the broker's certificate, e.g. \
             ca = \"/etc/edgesync/ca.pem\"",
        );
    }
    match (&raw.cert, &raw.key) {
        _ if tls == Some(false) => {}
        (Some(_), None) if !p.mentions("mqtt.key") => p.push(
            "mqtt.key",
            "missing; mqtt.cert is set and a client certificate needs its private key (set \
             both cert and key, or neither)",
        ),
        (None, Some(_)) if !p.mentions("mqtt.cert") => p.push(
            "mqtt.cert",
            "missing; mqtt.key is set and a private key needs its client certificate (set \
             both cert and key, or neither)",
        ),
        _ => {}
    }

    let keep_alive = raw
        .keep_alive
        .map_or(Ok(DEFAULT_KEEP_ALIVE), |d| parse_duration(&d.0))
        .and_then(|d| {
            if !(KEEP_ALIVE_MIN..=KEEP_ALIVE_MAX).contains(&d) {
                Err(format!(
                    "expected a duration from 5s to 65535s, found {d:?}"
                ))
            } else if d.subsec_nanos() != 0 {
                Err(format!(
                    "expected whole seconds (MQTT keep-alive is counted in seconds), found {d:?}"
                ))
            } else {
                Ok(d)
            }
        });
    let keep_alive = check(p, "mqtt.keep_alive", keep_alive);
    let mut backoff = |key: &str, raw: Option<RawDuration>, default: Duration| {
        let d = raw
            .map_or(Ok(default), |d| parse_duration(&d.0))
            .and_then(|d| {
                if (RECONNECT_MIN..=RECONNECT_MAX).contains(&d) {
                    Ok(d)
                } else {
                    Err(format!("expected a duration from 100ms to 1h, found {d:?}"))
                }
            });
        check(p, key, d)
    };
    let reconnect_initial = backoff(
        "mqtt.reconnect_initial",
        raw.reconnect_initial,
        Duration::from_secs(1),
    );
    let reconnect_max = backoff(
        "mqtt.reconnect_max",
        raw.reconnect_max,
        Duration::from_secs(120),
    );
    let reconnect_reset = backoff(
        "mqtt.reconnect_reset",
        raw.reconnect_reset,
        Duration::from_secs(60),
    );
    if let (Some(i), Some(m)) = (reconnect_initial, reconnect_max)
        && m < i
    {
        p.push(
            "mqtt.reconnect_max",
            format!("must not be below mqtt.reconnect_initial ({i:?}), found {m:?}"),
        );
    }

    let client_id = match raw.client_id {
        Some(id) => check(p, "mqtt.client_id", check_client_id(&id).map(|()| id)),
        // Defaults to the device id, which is already known to be valid (or reported).
        None => device.map(|d| d.as_str().to_owned()),
    };

    let has_username = raw.username.is_some();
    let username = match raw.username {
        Some(name) => check(
            p,
            "mqtt.username",
            check_username(&name).map(|()| Some(name)),
        ),
        None => Some(None),
    };
    let password_file = readable_file(
        p,
        "mqtt.password_file",
        raw.password_file.as_deref(),
        dir,
        true,
    );
    if let Some(Some(path)) = &password_file {
        private_file(p, "mqtt.password_file", path, "a password file");
    }
    if raw.password_file.is_some() && !has_username {
        p.push(
            "mqtt.password_file",
            "is set without mqtt.username; a password needs a user name",
        );
    }

    Some(MqttConfig {
        url: url?,
        topic_prefix: topic_prefix?,
        ca: ca?,
        cert: cert?,
        key: key?,
        keep_alive: keep_alive?,
        reconnect_initial: reconnect_initial?,
        reconnect_max: reconnect_max?,
        reconnect_reset: reconnect_reset?,
        client_id: client_id?,
        username: username?,
        password_file: password_file?,
        allow_plaintext,
    })
}

fn check_topic_prefix(prefix: &str) -> Result<String, String> {
    let found = format!("found {:?}", shorten(prefix));
    if prefix.is_empty() {
        return Err("expected a non-empty topic prefix such as \"edgesync\"".to_owned());
    }
    if prefix.len() > TOPIC_PREFIX_MAX {
        return Err(format!(
            "expected at most {TOPIC_PREFIX_MAX} bytes, found {} bytes",
            prefix.len()
        ));
    }
    if let Some(c) = prefix.chars().find(|c| matches!(c, '+' | '#' | '\0')) {
        return Err(format!(
            "expected a topic prefix without the MQTT wildcards \"+\" and \"#\" or NUL, {found} \
             (contains {c:?})"
        ));
    }
    if prefix.starts_with('/') || prefix.ends_with('/') {
        return Err(format!(
            "expected a topic prefix that does not start or end with \"/\", {found}"
        ));
    }
    Ok(prefix.to_owned())
}

fn check_client_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > CLIENT_ID_MAX {
        return Err(format!(
            "expected 1-{CLIENT_ID_MAX} bytes, found {} bytes",
            id.len()
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(format!(
            "expected no control characters, found {:?}",
            shorten(id)
        ));
    }
    Ok(())
}

fn check_username(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("expected a non-empty user name (or leave username unset)".to_owned());
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "expected no control characters, found {:?}",
            shorten(name)
        ));
    }
    Ok(())
}

/// A path from the file, resolved against the config file's directory.
fn resolve(p: &mut Problems, key: &str, value: &str, dir: &Path) -> Option<PathBuf> {
    if value.is_empty() {
        p.push(key, "expected a path, found an empty string");
        return None;
    }
    if value.contains('\0') {
        p.push(key, "expected a path, found a string containing NUL");
        return None;
    }
    let path = Path::new(value);
    Some(if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    })
}

/// An optional file that must exist and be readable (opened to check, when `check_file`).
/// `Some(None)`: not set; `None`: a problem was reported.
fn readable_file(
    p: &mut Problems,
    key: &str,
    value: Option<&str>,
    dir: &Path,
    check_file: bool,
) -> Option<Option<PathBuf>> {
    let Some(value) = value else {
        return Some(None);
    };
    let path = resolve(p, key, value, dir)?;
    if check_file {
        let opened = File::open(&path).and_then(|file| file.metadata());
        let problem = match opened {
            Err(err) => Some(format!("cannot read \"{}\": {err}", path.display())),
            Ok(meta) if meta.is_dir() => Some(format!(
                "\"{}\" is a directory; expected a file",
                path.display()
            )),
            Ok(_) => None,
        };
        if let Some(problem) = problem {
            p.push(key, problem);
            return None;
        }
    }
    Some(Some(path))
}

/// A secret (`what`) that users other than its owner and group can access is refused: the
/// device identity or broker password would leak to any local account. Group access stays
/// allowed (packages install keys `root:edgesync` 0640).
fn private_file(p: &mut Problems, key: &str, path: &Path, what: &str) {
    let Ok(meta) = std::fs::metadata(path) else {
        return; // readable_file already reported why it cannot be read
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        p.push(
            key,
            format!(
                "\"{}\" has mode {mode:04o}: {what} must not be accessible to other users; \
                 run: chmod 600 \"{}\" (or chmod 640 with the agent's group as the file's group)",
                path.display(),
                path.display()
            ),
        );
    }
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

/// A size from the file (string with unit, or integer bytes) within `min..=max`.
fn size_value(
    raw: Option<RawSize>,
    default: u64,
    (min, max): (u64, u64),
    (why_min, why_max): (&str, &str),
) -> Result<u64, String> {
    let bytes = match raw {
        None => default,
        Some(RawSize::Bytes(n)) => u64::try_from(n)
            .map_err(|_| format!("expected a size of zero or more bytes, found {n}"))?,
        Some(RawSize::Text(s)) => parse_size(&s)?,
    };
    if bytes < min {
        Err(format!(
            "expected at least {}, found {}{why_min}",
            fmt_size(min),
            fmt_size(bytes)
        ))
    } else if bytes > max {
        Err(format!(
            "expected at most {}, found {}{why_max}",
            fmt_size(max),
            fmt_size(bytes)
        ))
    } else {
        Ok(bytes)
    }
}

/// An integer from the file within `min..=max`.
fn count_value(raw: Option<i64>, default: i64, (min, max): (i64, i64)) -> Result<usize, String> {
    let n = raw.unwrap_or(default);
    if (min..=max).contains(&n) {
        usize::try_from(n).map_err(|_| format!("expected {min} to {max}, found {n}"))
    } else {
        Err(format!("expected {min} to {max}, found {n}"))
    }
}

fn validate_store(raw: RawStore, dir: &Path, p: &mut Problems) -> Option<StoreConfig> {
    let path = resolve(
        p,
        "store.path",
        raw.path.as_deref().unwrap_or(DEFAULT_STORE_PATH),
        dir,
    )
    .filter(|path| {
        let problem = if path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/') {
            Some(format!(
                "expected the path of the store file, found the directory \"{}\" (e.g. use \
                 \"{}\")",
                path.display(),
                path.join("edgesync.redb").display()
            ))
        } else {
            match path.parent() {
                Some(parent) if parent.exists() && !parent.is_dir() => Some(format!(
                    "\"{}\" cannot be created: \"{}\" is not a directory",
                    path.display(),
                    parent.display()
                )),
                _ => None,
            }
        };
        let ok = problem.is_none();
        if let Some(problem) = problem {
            p.push("store.path", problem);
        }
        ok
    });
    let max_bytes = check(
        p,
        "store.max_bytes",
        size_value(
            raw.max_bytes,
            DEFAULT_MAX_BYTES,
            (STORE_MIN_BYTES, u64::MAX),
            ("", ""),
        ),
    );
    let when_full = check(
        p,
        "store.when_full",
        raw.when_full
            .as_deref()
            .map_or(Ok(WhenFull::DropOldest), WhenFull::parse),
    );
    let cache_size = check(
        p,
        "store.cache_size",
        size_value(
            raw.cache_size,
            DEFAULT_CACHE_SIZE,
            (CACHE_MIN, CACHE_MAX),
            ("", ""),
        ),
    );
    Some(StoreConfig {
        path: path?,
        max_bytes: max_bytes?,
        when_full: when_full?,
        cache_size: cache_size?,
    })
}

fn validate_sync(raw: RawSync, p: &mut Problems) -> Option<SyncConfig> {
    let encoding = check(
        p,
        "sync.encoding",
        raw.encoding
            .as_deref()
            .map_or(Ok(Encoding::Cbor), Encoding::parse),
    );
    let batch_max_changes = check(
        p,
        "sync.batch_max_changes",
        count_value(
            raw.batch_max_changes,
            DEFAULT_BATCH_MAX_CHANGES,
            (1, BATCH_MAX_CHANGES_LIMIT),
        ),
    );
    let batch_max_bytes = check(
        p,
        "sync.batch_max_bytes",
        size_value(
            raw.batch_max_bytes,
            DEFAULT_BATCH_MAX_BYTES,
            (BATCH_BYTES_MIN, BATCH_BYTES_MAX),
            (
                "; a batch must hold the largest change the agent accepts, a 64KiB value \
                 plus its key and the batch envelope",
                "; that is the MQTT packet limit",
            ),
        ),
    );
    let linger = raw
        .linger
        .map_or(Ok(DEFAULT_LINGER), |d| parse_duration(&d.0))
        .and_then(|d| {
            if d > LINGER_MAX {
                Err(format!("expected at most 10s, found {d:?}"))
            } else {
                Ok(d)
            }
        });
    let linger = check(p, "sync.linger", linger);
    let max_inflight = check(
        p,
        "sync.max_inflight",
        count_value(
            raw.max_inflight,
            DEFAULT_MAX_INFLIGHT,
            (1, MAX_INFLIGHT_LIMIT),
        ),
    );
    Some(SyncConfig {
        encoding: encoding?,
        batch_max_changes: batch_max_changes?,
        batch_max_bytes: batch_max_bytes?,
        linger: linger?,
        max_inflight: max_inflight?,
    })
}

fn validate_local(raw: RawLocal, p: &mut Problems) -> Option<LocalConfig> {
    let socket = raw.socket.unwrap_or_else(|| DEFAULT_SOCKET.to_owned());
    let result = if socket.is_empty() || socket.contains('\0') {
        Err(format!(
            "expected an absolute path such as \"{DEFAULT_SOCKET}\", found {:?}",
            shorten(&socket)
        ))
    } else if !Path::new(&socket).is_absolute() {
        Err(format!(
            "expected an absolute path such as \"{DEFAULT_SOCKET}\", found the relative path \
             {:?}",
            shorten(&socket)
        ))
    } else if socket.len() > SOCKET_PATH_MAX {
        Err(format!(
            "expected at most {SOCKET_PATH_MAX} bytes (a Unix socket path must fit in sun_path, \
             108 bytes on Linux), found {} bytes: {:?}",
            socket.len(),
            shorten(&socket)
        ))
    } else if Path::new(&socket).is_dir() {
        Err(format!(
            "expected the path of the socket, found the directory {socket:?}"
        ))
    } else {
        Ok(PathBuf::from(socket))
    };
    let socket = check(p, "local.socket", result);
    let idle_timeout = check(
        p,
        "local.idle_timeout",
        raw.idle_timeout
            .map_or(Ok(DEFAULT_IDLE_TIMEOUT), |d| parse_duration(&d.0))
            .and_then(|d| {
                if (Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&d) {
                    Ok(d)
                } else {
                    Err(format!("expected a duration from 1s to 1d, found {d:?}"))
                }
            }),
    );
    let client_timeout = check(
        p,
        "local.client_timeout",
        timeout_value(raw.client_timeout.as_ref(), DEFAULT_CLIENT_TIMEOUT),
    );
    Some(LocalConfig {
        socket: socket?,
        idle_timeout: idle_timeout?,
        client_timeout: client_timeout?,
    })
}

fn validate_log(raw: RawLog, p: &mut Problems) -> Option<LogConfig> {
    let level = raw.level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
    let level = check(p, "log.level", check_log_level(&level).map(|()| level))?;
    Some(LogConfig { level })
}

// ---------------------------------------------------------------------------------------------
// [telemetry]

fn validate_telemetry(raw: RawTelemetry, dir: &Path, p: &mut Problems) -> Option<TelemetryConfig> {
    let interval = match raw.interval {
        None => Some(Some(DEFAULT_TELEMETRY_INTERVAL)),
        Some(RawDuration(text)) => check(
            p,
            "telemetry.interval",
            parse_duration(&text).and_then(|d| telemetry_interval(d, &text)),
        ),
    };
    let textfile = match raw.textfile {
        None => Some(None),
        Some(text) => resolve(p, "telemetry.textfile", &text, dir)
            .and_then(|path| check(p, "telemetry.textfile", prom_file(path, &text)))
            .map(Some),
    };
    Some(TelemetryConfig {
        interval: interval?,
        textfile: textfile?,
    })
}

/// `telemetry.interval`: "0" is off; otherwise within the limits.
fn telemetry_interval(d: Duration, text: &str) -> Result<Option<Duration>, String> {
    if d.is_zero() {
        Ok(None)
    } else if d < TELEMETRY_INTERVAL_MIN || d > TELEMETRY_INTERVAL_MAX {
        Err(format!(
            "expected \"0\" (off) or a duration from \"1s\" to \"1d\", found {:?}",
            shorten(text)
        ))
    } else {
        Ok(Some(d))
    }
}

/// `telemetry.textfile`: a file whose name ends in `.prom`.
fn prom_file(path: PathBuf, text: &str) -> Result<PathBuf, String> {
    if path.is_dir() || text.ends_with('/') {
        Err(format!(
            "expected the path of a file, found the directory \"{}\" (e.g. use \"{}\")",
            path.display(),
            path.join("edgesync.prom").display()
        ))
    } else if path.extension().is_none_or(|e| e != "prom") {
        Err(format!(
            "expected a file name ending in \".prom\" (node_exporter's textfile collector \
             reads only those), found {:?}",
            shorten(text)
        ))
    } else {
        Ok(path)
    }
}

// ---------------------------------------------------------------------------------------------
// [control]

fn validate_control(raw: RawControl, p: &mut Problems) -> Option<ControlConfig> {
    let defaults = ControlConfig::default();
    let allow = match raw.allow {
        None => Some(defaults.allow),
        Some(RawNames(names)) => {
            let known = CommandName::names();
            let mut allow = std::collections::BTreeSet::new();
            let mut ok = true;
            for (i, name) in names.iter().enumerate() {
                match CommandName::parse(name) {
                    Some(c) if !allow.insert(c) => {
                        ok = false;
                        p.push(
                            "control.allow",
                            format!("{name:?} is listed twice (item {})", i + 1),
                        );
                    }
                    Some(_) => {}
                    None => {
                        ok = false;
                        let hint = match suggest(name, &known) {
                            Some(near) => format!(" (did you mean {near:?}?)"),
                            None => String::new(),
                        };
                        p.push(
                            "control.allow",
                            format!(
                                "unknown command {:?} (item {}){hint}; expected some of {}",
                                shorten(name),
                                i + 1,
                                known.join(", ")
                            ),
                        );
                    }
                }
            }
            ok.then_some(allow)
        }
    };
    let window = raw
        .replay_window
        .map_or_else(
            || parse_duration(DEFAULT_REPLAY_WINDOW),
            |d| parse_duration(&d.0),
        )
        .and_then(|d| {
            if (REPLAY_WINDOW_MIN..=REPLAY_WINDOW_MAX).contains(&d) {
                Ok(d)
            } else {
                Err(format!(
                    "expected a duration from \"1m\" to \"30d\", found {d:?}"
                ))
            }
        });
    let replay_window = check(p, "control.replay_window", window);
    let replay_max = check(
        p,
        "control.replay_max",
        count_value(
            raw.replay_max,
            i64::try_from(control::DEFAULT_REPLAY_MAX).unwrap_or(i64::MAX),
            (1, REPLAY_MAX_LIMIT),
        ),
    );
    Some(ControlConfig {
        allow: allow?,
        replay_window: replay_window?,
        replay_max: replay_max?,
    })
}

// ---------------------------------------------------------------------------------------------
// [desired] and its arrays of tables.

fn validate_desired(raw: RawDesired, dir: &Path, p: &mut Problems) -> Option<DesiredConfig> {
    let max_document_bytes = check(
        p,
        "desired.max_document_bytes",
        size_value(
            raw.max_document_bytes,
            DEFAULT_DOCUMENT_BYTES,
            (DOCUMENT_BYTES_MIN, DOCUMENT_BYTES_MAX),
            ("", ""),
        ),
    );
    let max_depth = check(
        p,
        "desired.max_depth",
        count_value(raw.max_depth, DEFAULT_MAX_DEPTH, (1, MAX_DEPTH_LIMIT)),
    );
    let unknown_keys = check(
        p,
        "desired.unknown_keys",
        raw.unknown_keys
            .as_deref()
            .map_or(Ok(UnknownKeys::Accept), parse_unknown_keys),
    );
    let history = check(
        p,
        "desired.history",
        count_value(raw.history, DEFAULT_HISTORY, (0, HISTORY_LIMIT)),
    );
    let concurrency = check(
        p,
        "desired.concurrency",
        count_value(raw.concurrency, DEFAULT_CONCURRENCY, (1, CONCURRENCY_LIMIT)),
    );
    let handler_timeout = check(
        p,
        "desired.handler_timeout",
        timeout_value(raw.handler_timeout.as_ref(), DEFAULT_HANDLER_TIMEOUT),
    );
    let max_future_ts = check(
        p,
        "desired.max_future_ts",
        raw.max_future_ts
            .as_ref()
            .map_or(Ok(DEFAULT_MAX_FUTURE_TS), |d| parse_duration(&d.0))
            .and_then(|d| {
                if (MAX_FUTURE_TS_MIN..=MAX_FUTURE_TS_MAX).contains(&d) {
                    Ok(d)
                } else {
                    Err(format!(
                        "expected a duration from \"1s\" to \"30d\", found {d:?}"
                    ))
                }
            }),
    );
    // The default of the tables' timeouts; if handler_timeout itself is wrong (reported), the
    // tables are still checked, against the built-in default.
    let default_timeout = handler_timeout.unwrap_or(DEFAULT_HANDLER_TIMEOUT);

    let rules = entries(raw.rule, "desired.rule", p, |raw, at, p| {
        validate_rule(raw, at, p)
    });
    let conflicts = entries(raw.conflict, "desired.conflict", p, |raw, at, p| {
        validate_conflict(raw, at, default_timeout, p)
    });
    let handlers = entries(raw.handler, "desired.handler", p, |raw, at, p| {
        validate_handler(raw, at, default_timeout, dir, p)
    });
    if let Some(rules) = &rules {
        shadowed(p, "desired.rule", rules.iter().map(|r| &r.keys));
    }
    if let Some(conflicts) = &conflicts {
        shadowed(p, "desired.conflict", conflicts.iter().map(|c| &c.keys));
    }
    if let Some(handlers) = &handlers {
        shadowed(p, "desired.handler", handlers.iter().map(|h| &h.keys));
    }

    Some(DesiredConfig {
        max_document_bytes: max_document_bytes?,
        max_depth: max_depth?,
        unknown_keys: unknown_keys?,
        history: history?,
        concurrency: concurrency?,
        handler_timeout: handler_timeout?,
        max_future_ts: max_future_ts?,
        rules: rules?,
        conflicts: conflicts?,
        handlers: handlers?,
    })
}

/// Validate every entry of an array of tables (each one, even after a bad one), named
/// `name[n]` from 1. `None` if any entry had a problem.
fn entries<R, T>(
    raw: Option<Vec<R>>,
    name: &str,
    p: &mut Problems,
    mut validate: impl FnMut(R, &str, &mut Problems) -> Option<T>,
) -> Option<Vec<T>> {
    let validated: Vec<Option<T>> = raw
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, raw)| validate(raw, &format!("{name}[{}]", i + 1), p))
        .collect();
    validated.into_iter().collect()
}

/// An entry whose glob is the same as an earlier one's, or comes after a `*`, is never used
/// (the first match wins): certainly a mistake.
fn shadowed<'a>(p: &mut Problems, name: &str, globs: impl Iterator<Item = &'a KeyGlob>) {
    let globs: Vec<&KeyGlob> = globs.collect();
    for (i, glob) in globs.iter().enumerate() {
        let earlier = globs[..i]
            .iter()
            .position(|g| g.as_str() == glob.as_str() || g.as_str().chars().all(|c| c == '*'));
        if let Some(j) = earlier {
            let why = if globs[j].as_str() == glob.as_str() {
                "has the same keys"
            } else {
                "matches every key"
            };
            p.push(
                format!("{name}[{}].keys", i + 1),
                format!(
                    "this entry is never used: {name}[{}] (keys = {:?}) {why} and comes first \
                     (the first match wins)",
                    j + 1,
                    globs[j].as_str()
                ),
            );
        }
    }
}

fn parse_unknown_keys(s: &str) -> Result<UnknownKeys, String> {
    match s {
        "accept" => Ok(UnknownKeys::Accept),
        "reject" => Ok(UnknownKeys::Reject),
        _ => Err(one_of(s, UNKNOWN_KEYS)),
    }
}

fn parse_value_type(s: &str) -> Result<ValueType, String> {
    match s {
        "bool" => Ok(ValueType::Bool),
        "integer" => Ok(ValueType::Integer),
        "number" => Ok(ValueType::Number),
        "string" => Ok(ValueType::String),
        "object" => Ok(ValueType::Object),
        "array" => Ok(ValueType::Array),
        // Common spellings from other schema languages.
        "boolean" => Err(format!(
            "{} (did you mean \"bool\"?)",
            one_of(s, VALUE_TYPES)
        )),
        "int" | "i64" | "u64" => Err(format!(
            "{} (did you mean \"integer\"?)",
            one_of(s, VALUE_TYPES)
        )),
        "float" | "f64" | "double" => Err(format!(
            "{} (did you mean \"number\"?)",
            one_of(s, VALUE_TYPES)
        )),
        _ => Err(one_of(s, VALUE_TYPES)),
    }
}

/// A timeout (handlers, merge programs, watch acks): 100ms to 1h.
fn timeout_value(raw: Option<&RawDuration>, default: Duration) -> Result<Duration, String> {
    let d = raw.map_or(Ok(default), |d| parse_duration(&d.0))?;
    if (HANDLER_TIMEOUT_MIN..=HANDLER_TIMEOUT_MAX).contains(&d) {
        Ok(d)
    } else {
        Err(format!("expected a duration from 100ms to 1h, found {d:?}"))
    }
}

/// The required `keys` glob of an entry.
fn glob_value(p: &mut Problems, at: &str, raw: Option<String>) -> Option<KeyGlob> {
    let key = format!("{at}.keys");
    let pattern = require(
        p,
        &key,
        raw,
        "a key glob such as \"setpoint\" or \"led.*\" (* matches any run of characters, ? \
         one character)",
    )?;
    check(p, &key, KeyGlob::new(&pattern))
}

/// A finite number, as `f64`.
fn number_value(p: &mut Problems, key: &str, raw: Option<RawNumber>) -> Option<Option<f64>> {
    match raw {
        None => Some(None),
        Some(RawNumber::Integer(i)) => Some(Some(i as f64)),
        Some(RawNumber::Float(x)) if x.is_finite() => Some(Some(x)),
        Some(RawNumber::Float(x)) => {
            p.push(key, format!("expected a finite number, found {x}"));
            None
        }
    }
}

/// A TOML value as JSON. Datetimes have no JSON form; NaN and infinities neither.
fn toml_to_json(value: &Value) -> Result<serde_json::Value, String> {
    Ok(match value {
        Value::String(s) => serde_json::Value::String(s.clone()),
        Value::Integer(i) => serde_json::Value::from(*i),
        Value::Float(x) => serde_json::Number::from_f64(*x)
            .map(serde_json::Value::Number)
            .ok_or_else(|| format!("{x} has no JSON form (expected a finite number)"))?,
        Value::Boolean(b) => serde_json::Value::Bool(*b),
        Value::Datetime(d) => {
            return Err(format!(
                "the datetime {d} has no JSON form; write it as a string, \"{d}\""
            ));
        }
        Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(toml_to_json).collect::<Result<_, _>>()?)
        }
        Value::Table(table) => serde_json::Value::Object(
            table
                .iter()
                .map(|(k, v)| Ok((k.clone(), toml_to_json(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

fn validate_rule(raw: RawRule, at: &str, p: &mut Problems) -> Option<Rule> {
    let before = p.0.len();
    let keys = glob_value(p, at, raw.keys);
    let value_type = match raw.kind.as_deref() {
        None => None,
        Some(kind) => check(p, &format!("{at}.type"), parse_value_type(kind)),
    };
    let type_name = raw.kind.as_deref().unwrap_or_default();
    let min = number_value(p, &format!("{at}.min"), raw.min).flatten();
    let max = number_value(p, &format!("{at}.max"), raw.max).flatten();
    let numeric = matches!(
        value_type,
        None | Some(ValueType::Integer | ValueType::Number)
    );
    for (name, bound) in [("min", min), ("max", max)] {
        if bound.is_some() && !numeric {
            p.push(
                format!("{at}.{name}"),
                format!(
                    "{name} applies to numbers only, but {at}.type = {type_name:?}; remove it \
                     (max_length limits the length of strings, arrays and objects)"
                ),
            );
        }
    }
    if let (Some(min), Some(max)) = (min, max)
        && max < min
    {
        p.push(
            format!("{at}.max"),
            format!("must not be below {at}.min ({min}), found {max}"),
        );
    }
    let max_length = raw.max_length.and_then(|n| {
        let result =
            usize::try_from(n).map_err(|_| format!("expected an integer of 0 or more, found {n}"));
        check(p, &format!("{at}.max_length"), result)
    });
    if max_length.is_some()
        && matches!(
            value_type,
            Some(ValueType::Bool | ValueType::Integer | ValueType::Number)
        )
    {
        p.push(
            format!("{at}.max_length"),
            format!(
                "max_length applies to strings, arrays and objects only, but {at}.type = \
                 {type_name:?}; remove it (min and max limit numbers)"
            ),
        );
    }
    let nullable = raw.nullable.unwrap_or(true);
    let enum_key = format!("{at}.enum");
    let one_of = match raw.one_of {
        None => None,
        Some(values) if values.is_empty() => {
            p.push(
                enum_key.as_str(),
                "expected at least one allowed value, found an empty array",
            );
            None
        }
        Some(values) => {
            let converted: Vec<Option<serde_json::Value>> = values
                .iter()
                .enumerate()
                .map(|(i, value)| {
                    toml_to_json(value)
                        .map_err(|message| {
                            p.push(enum_key.as_str(), format!("item {}: {message}", i + 1))
                        })
                        .ok()
                })
                .collect();
            converted.into_iter().collect::<Option<Vec<_>>>()
        }
    };
    let rule = Rule {
        keys: keys?,
        value_type,
        min,
        max,
        one_of: None,
        max_length,
        nullable,
    };
    // An allowed value that the rest of the rule refuses can never be set.
    if p.0.len() == before
        && let Some(values) = &one_of
    {
        for (i, value) in values.iter().enumerate() {
            if let Err(reason) = rules::check_value(Some(&rule), UnknownKeys::Accept, value) {
                p.push(
                    enum_key.as_str(),
                    format!(
                        "item {} can never be set, the rest of this rule refuses it: {reason}",
                        i + 1
                    ),
                );
            }
        }
    }
    (p.0.len() == before).then_some(Rule { one_of, ..rule })
}

/// A program and its arguments (exec handlers, merge programs), run without a shell.
fn check_command(argv: Vec<String>) -> Result<Vec<String>, String> {
    const FORM: &str = "expected a program and its arguments such as [\"/usr/local/bin/apply\", \
                        \"{key}\"]";
    let Some(program) = argv.first() else {
        return Err(format!("{FORM}, found an empty array"));
    };
    if let Some(i) = argv.iter().position(|arg| arg.contains('\0')) {
        return Err(format!("{FORM}, found NUL in item {}", i + 1));
    }
    if program.is_empty() {
        return Err(format!("{FORM}, found an empty program name"));
    }
    if program.contains('/') && !Path::new(program).is_absolute() {
        return Err(format!(
            "expected the program as an absolute path or a bare name looked up in PATH, found \
             the relative path {:?}",
            shorten(program)
        ));
    }
    Ok(argv)
}

fn validate_conflict(
    raw: RawConflict,
    at: &str,
    default_timeout: Duration,
    p: &mut Problems,
) -> Option<ConflictRule> {
    let before = p.0.len();
    let keys = glob_value(p, at, raw.keys);
    let policy_key = format!("{at}.policy");
    let policy = require(
        p,
        &policy_key,
        raw.policy,
        "\"cloud-wins\", \"device-wins\", \"last-write-wins\" or \"merge\"",
    )
    .and_then(|policy| {
        let result = if POLICIES.contains(&policy.as_str()) {
            Ok(policy)
        } else {
            Err(one_of(&policy, POLICIES))
        };
        check(p, &policy_key, result)
    });
    let command_key = format!("{at}.command");
    let timeout_key = format!("{at}.timeout");
    let is_merge = policy.as_deref().map(|policy| policy == "merge");
    let command = match (is_merge, raw.command) {
        (Some(false), Some(_)) => {
            p.push(
                command_key.as_str(),
                format!(
                    "is only used with policy = \"merge\", but {policy_key} = {:?}; remove it",
                    policy.as_deref().unwrap_or_default()
                ),
            );
            None
        }
        (Some(true), None) => {
            require::<()>(
                p,
                &command_key,
                None,
                "the merge program and its arguments, e.g. [\"/usr/local/bin/merge\"]; it gets \
                 {\"key\",\"device\",\"cloud\"} as JSON on stdin and prints the merged value",
            );
            None
        }
        (_, Some(argv)) => check(p, &command_key, check_command(argv)),
        (_, None) => None,
    };
    let timeout = match (is_merge, raw.timeout) {
        (Some(false), Some(_)) => {
            p.push(
                timeout_key.as_str(),
                format!(
                    "is only used with policy = \"merge\" (the merge program's time limit), but \
                     {policy_key} = {:?}; remove it",
                    policy.as_deref().unwrap_or_default()
                ),
            );
            None
        }
        (_, timeout) => check(
            p,
            &timeout_key,
            timeout_value(timeout.as_ref(), default_timeout),
        ),
    };
    if p.0.len() != before {
        return None;
    }
    let policy = match policy?.as_str() {
        "cloud-wins" => Policy::CloudWins,
        "device-wins" => Policy::DeviceWins,
        "last-write-wins" => Policy::LastWriteWins,
        _ => Policy::Merge {
            argv: command?,
            timeout: timeout?,
        },
    };
    Some(ConflictRule {
        keys: keys?,
        policy,
    })
}

/// The keys each handler type takes (besides `keys` and `type`).
fn handler_keys(kind: &str) -> &'static [&'static str] {
    match kind {
        "exec" => &["command", "timeout"],
        "file" => &["path"],
        "watch" => &["deadline"],
        _ => &[],
    }
}

fn validate_handler(
    raw: RawHandler,
    at: &str,
    default_timeout: Duration,
    dir: &Path,
    p: &mut Problems,
) -> Option<Handler> {
    let before = p.0.len();
    let keys = glob_value(p, at, raw.keys);
    let type_key = format!("{at}.type");
    let kind = require(
        p,
        &type_key,
        raw.kind,
        "\"exec\" (run a program), \"file\" (write a file) or \"watch\" (tell local programs)",
    )
    .and_then(|kind| {
        let result = if HANDLER_TYPES.contains(&kind.as_str()) {
            Ok(kind)
        } else {
            Err(one_of(&kind, HANDLER_TYPES))
        };
        check(p, &type_key, result)
    });

    // Keys that the handler's type does not take.
    if let Some(kind) = kind.as_deref() {
        let takes = handler_keys(kind);
        let set = [
            ("command", raw.command.is_some()),
            ("timeout", raw.timeout.is_some()),
            ("path", raw.path.is_some()),
            ("deadline", raw.deadline.is_some()),
        ];
        for (name, _) in set
            .iter()
            .filter(|(name, set)| *set && !takes.contains(name))
        {
            let users: Vec<&str> = HANDLER_TYPES
                .iter()
                .copied()
                .filter(|t| handler_keys(t).contains(name))
                .collect();
            p.push(
                format!("{at}.{name}"),
                format!(
                    "is not used by a handler of type = {kind:?} (it takes {}); {name} is for \
                     type = {}",
                    takes.join(" and "),
                    users
                        .iter()
                        .map(|t| format!("{t:?}"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            );
        }
    }

    let handler_kind = match kind.as_deref() {
        Some("exec") => {
            let command_key = format!("{at}.command");
            let argv = require(
                p,
                &command_key,
                raw.command,
                "the program and its arguments, e.g. [\"/usr/local/bin/apply\", \"{key}\"]",
            )
            .and_then(|argv| check(p, &command_key, check_command(argv)));
            let timeout = check(
                p,
                &format!("{at}.timeout"),
                timeout_value(raw.timeout.as_ref(), default_timeout),
            );
            argv.zip(timeout)
                .map(|(argv, timeout)| HandlerKind::Exec { argv, timeout })
        }
        Some("file") => {
            let path_key = format!("{at}.path");
            let path = require(
                p,
                &path_key,
                raw.path,
                "the file to write, e.g. \"/var/lib/app/{key}.json\" ({key} is replaced by the \
                 key)",
            );
            path.and_then(|path| {
                let template = check(p, &path_key, check_path_template(&path, keys.as_ref()))?;
                resolve(p, &path_key, &template, dir)
            })
            .map(|path| HandlerKind::File { path })
        }
        // "watch", the only other type.
        Some(_) => check(
            p,
            &format!("{at}.deadline"),
            timeout_value(raw.deadline.as_ref(), default_timeout),
        )
        .map(|deadline| HandlerKind::Watch { deadline }),
        None => None,
    };
    if p.0.len() != before {
        return None;
    }
    Some(Handler {
        keys: keys?,
        kind: handler_kind?,
    })
}

/// The path of a file handler: a file (not a directory), `{key}` its only placeholder, and
/// `{key}` present when the glob matches more than one key (else every key would overwrite
/// the same file).
fn check_path_template(path: &str, keys: Option<&KeyGlob>) -> Result<String, String> {
    if path.ends_with('/') {
        return Err(format!(
            "expected the path of a file, found the directory {:?} (e.g. use \"{}{{key}}.json\")",
            shorten(path),
            shorten(path)
        ));
    }
    let mut rest = path;
    while let Some(open) = rest.find(['{', '}']) {
        let after = &rest[open..];
        if let Some(after_key) = after.strip_prefix("{key}") {
            rest = after_key;
        } else {
            // `{value}`, or a stray brace alone.
            let placeholder = match after.find('}') {
                Some(close) if after.starts_with('{') => &after[..=close],
                _ => &after[..1],
            };
            return Err(format!(
                "only the placeholder {{key}} is replaced in a path, found {:?} in {:?}",
                shorten(placeholder),
                shorten(path)
            ));
        }
    }
    if let Some(keys) = keys
        && keys.as_str().contains(['*', '?'])
        && !path.contains("{key}")
    {
        return Err(format!(
            "keys = {:?} can match several keys, but the path has no {{key}}: every key would \
             overwrite the same file; put {{key}} in the path, e.g. \"/var/lib/app/{{key}}.json\"",
            keys.as_str()
        ));
    }
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::text::edit_distance;

    const FILE: &str = "/test/edgesync.toml";
    const EXAMPLE: &str = include_str!("../../config/edgesync.example.toml");
    const DEV: &str = include_str!("../../config/dev.toml");

    /// A valid config over plain TCP (no certificate files needed): `mqtt_extra` goes into
    /// `[mqtt]`, `rest` after it (further sections).
    fn plain(mqtt_extra: &str, rest: &str) -> String {
        format!(
            "[device]\nid = \"pump-0042\"\n\n[mqtt]\nurl = \"mqtt://localhost\"\n\
             allow_plaintext = true\n{mqtt_extra}\n\n{rest}\n"
        )
    }

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml_str(Path::new(FILE), text)
    }

    fn valid(text: &str) -> Config {
        parse(text).unwrap_or_else(|err| panic!("expected a valid config, got:\n{err}"))
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text) {
            Ok(config) => panic!("expected problems, got {config:#?}"),
            Err(err) => err.problems,
        }
    }

    fn keys(problems: &[Problem]) -> Vec<&str> {
        problems.iter().map(|p| p.key.as_str()).collect()
    }

    /// The only problem of `text`, which must be for `key`; returns its message.
    fn only_problem(text: &str, key: &str) -> String {
        let problems = problems(text);
        assert_eq!(keys(&problems), [key], "{problems:#?}");
        problems[0].message.clone()
    }

    /// A directory holding `edgesync.toml`, `ca.pem`, `device.pem` and `device.key`.
    fn tls_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for name in ["ca.pem", "device.pem", "device.key"] {
            std::fs::write(dir.path().join(name), "-----BEGIN TEST-----\n").unwrap();
        }
        private(&dir.path().join("device.key"));
        dir
    }

    /// Mode 0600: the agent refuses secrets that other users can read.
    fn private(path: &Path) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn tls_config(extra_mqtt: &str) -> String {
        format!(
            "[device]\nid = \"pump-0042\"\n[mqtt]\nurl = \"mqtts://broker.example.com\"\n\
             ca = \"ca.pem\"\n{extra_mqtt}\n"
        )
    }

    // --- valid files -----------------------------------------------------------------------

    #[test]
    fn defaults_apply_when_optional_keys_are_omitted() {
        let config = valid(&plain("", ""));
        assert_eq!(config.source, Path::new(FILE));
        assert_eq!(config.device.id.as_str(), "pump-0042");
        let mqtt = &config.mqtt;
        assert_eq!(mqtt.url.to_string(), "mqtt://localhost:1883");
        assert_eq!(mqtt.topic_prefix, "edgesync");
        assert_eq!((&mqtt.ca, &mqtt.cert, &mqtt.key), (&None, &None, &None));
        assert_eq!(mqtt.keep_alive, Duration::from_secs(30));
        assert_eq!(mqtt.client_id, "pump-0042");
        assert_eq!((&mqtt.username, &mqtt.password_file), (&None, &None));
        assert!(mqtt.allow_plaintext);
        assert_eq!(
            config.store.path,
            Path::new("/var/lib/edgesync/edgesync.redb")
        );
        assert_eq!(config.store.max_bytes, 256 * MIB);
        assert_eq!(config.store.when_full, WhenFull::DropOldest);
        assert_eq!(config.store.cache_size, 4 * MIB);
        assert_eq!(config.sync.encoding, Encoding::Cbor);
        assert_eq!(config.sync.batch_max_changes, 1000);
        assert_eq!(config.sync.batch_max_bytes, 256 * KIB);
        assert!(config.sync.batch_max_bytes >= MAX_VALUE_BYTES + KIB);
        assert_eq!(config.sync.linger, Duration::ZERO);
        assert_eq!(config.sync.max_inflight, 8);
        assert_eq!(config.local.socket, Path::new(DEFAULT_SOCKET));
        assert_eq!(config.log.level, "info");
    }

    #[test]
    fn every_key_can_be_set() {
        let config = valid(&plain(
            "topic_prefix = \"acme/fleet\"\nkeep_alive = \"1m\"\nclient_id = \"pump-0042-a\"\n\
             username = \"pump\"",
            "[store]\npath = \"/data/q.redb\"\nmax_bytes = \"1GiB\"\nwhen_full = \"reject\"\n\
             cache_size = 1048576\n\
             [sync]\nencoding = \"json\"\nbatch_max_changes = 50\nbatch_max_bytes = \"1MB\"\n\
             linger = \"250ms\"\nmax_inflight = 1\n\
             [local]\nsocket = \"/run/es.sock\"\n\
             [log]\nlevel = \"warn,edgesync::sync=trace\"",
        ));
        assert_eq!(config.mqtt.topic_prefix, "acme/fleet");
        assert_eq!(config.mqtt.keep_alive, Duration::from_secs(60));
        assert_eq!(config.mqtt.client_id, "pump-0042-a");
        assert_eq!(config.mqtt.username.as_deref(), Some("pump"));
        assert_eq!(config.store.path, Path::new("/data/q.redb"));
        assert_eq!(config.store.max_bytes, GIB);
        assert_eq!(config.store.when_full, WhenFull::Reject);
        assert_eq!(config.store.cache_size, MIB);
        assert_eq!(config.sync.encoding, Encoding::Json);
        assert_eq!(config.sync.batch_max_changes, 50);
        assert_eq!(config.sync.batch_max_bytes, 1_000_000);
        assert_eq!(config.sync.linger, Duration::from_millis(250));
        assert_eq!(config.sync.max_inflight, 1);
        assert_eq!(config.local.socket, Path::new("/run/es.sock"));
        assert_eq!(config.log.level, "warn,edgesync::sync=trace");
    }

    #[test]
    fn secrets_accessible_to_others_and_a_world_writable_config_are_refused() {
        let dir = tls_dir();
        let (key, pw) = (dir.path().join("device.key"), dir.path().join("pw"));
        std::fs::write(&pw, "secret").unwrap();
        let file = dir.path().join("edgesync.toml");
        let text = tls_config(
            "cert = \"device.pem\"\nkey = \"device.key\"\nusername = \"u\"\n\
             password_file = \"pw\"",
        );
        std::fs::write(&file, text).unwrap();
        let chmod = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        // Owner only, or owner and group (root:edgesync 0640): accepted.
        for mode in [0o600, 0o640, 0o400] {
            chmod(&key, mode);
            chmod(&pw, mode);
            Config::load(&file).unwrap_or_else(|err| panic!("{mode:o}: {err}"));
        }
        chmod(&key, 0o604);
        chmod(&pw, 0o601);
        let errors = Config::load(&file).unwrap_err();
        assert_eq!(keys(&errors.problems), ["mqtt.key", "mqtt.password_file"]);
        let key_msg = &errors.problems[0].message;
        assert!(key_msg.contains(&*key.to_string_lossy()), "{key_msg}");
        assert!(key_msg.contains("mode 0604"), "{key_msg}");
        assert!(key_msg.contains("chmod 600"), "{key_msg}");
        assert!(errors.problems[1].message.contains("mode 0601"));
        chmod(&key, 0o600);
        chmod(&pw, 0o600);
        // The config file: readable by all is fine, writable by all is not.
        chmod(&file, 0o644);
        Config::load(&file).unwrap_or_else(|err| panic!("{err}"));
        chmod(&file, 0o666);
        let errors = Config::load(&file).unwrap_err();
        assert_eq!(keys(&errors.problems), [""]);
        assert!(errors.problems[0].message.contains("mode 0666"));
        assert!(errors.problems[0].message.contains("chmod 640"));
    }

    #[test]
    fn tls_config_with_readable_certificate_files_loads_from_disk() {
        let dir = tls_dir();
        std::fs::write(dir.path().join("password"), "secret\n").unwrap();
        private(&dir.path().join("password"));
        let file = dir.path().join("edgesync.toml");
        let text = tls_config(
            "cert = \"device.pem\"\nkey = \"device.key\"\nusername = \"pump\"\n\
             password_file = \"password\"",
        );
        std::fs::write(&file, text).unwrap();
        let config = Config::load(&file).unwrap_or_else(|err| panic!("{err}"));
        let mqtt = &config.mqtt;
        assert_eq!(mqtt.url.to_string(), "mqtts://broker.example.com:8883");
        assert!(mqtt.url.tls);
        assert!(!mqtt.allow_plaintext);
        assert_eq!(mqtt.ca.as_deref(), Some(&*dir.path().join("ca.pem")));
        assert_eq!(mqtt.cert.as_deref(), Some(&*dir.path().join("device.pem")));
        assert_eq!(mqtt.key.as_deref(), Some(&*dir.path().join("device.key")));
        assert_eq!(
            mqtt.password_file.as_deref(),
            Some(&*dir.path().join("password"))
        );
        assert_eq!(config.source, file);
    }

    #[test]
    fn relative_paths_resolve_against_the_config_file_directory() {
        let dir = tls_dir();
        let conf_dir = dir.path().join("conf");
        std::fs::create_dir(&conf_dir).unwrap();
        let text = format!(
            "[device]\nid = \"d\"\n[mqtt]\nurl = \"mqtts://h\"\nca = \"../ca.pem\"\n\
             cert = \"{}\"\nkey = \"../device.key\"\n\
             [store]\npath = \"../state/not-yet/edgesync.redb\"\n",
            dir.path().join("device.pem").display()
        );
        let config = Config::from_toml_str(&conf_dir.join("edgesync.toml"), &text)
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(config.mqtt.ca, Some(conf_dir.join("../ca.pem")));
        // Absolute paths stay as they are.
        assert_eq!(config.mqtt.cert, Some(dir.path().join("device.pem")));
        assert_eq!(config.mqtt.key, Some(conf_dir.join("../device.key")));
        // The store's directory need not exist: the daemon creates it.
        assert_eq!(
            config.store.path,
            conf_dir.join("../state/not-yet/edgesync.redb")
        );
    }

    #[test]
    fn relative_config_path_keeps_paths_relative_to_the_working_directory() {
        let config = Config::from_toml_str(
            Path::new("config/dev-plain.toml"),
            &plain("", "[store]\npath = \"../target/dev/q.redb\""),
        )
        .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(config.store.path, Path::new("config/../target/dev/q.redb"));
        let config = Config::from_toml_str(
            Path::new("edgesync.toml"),
            &plain("", "[store]\npath = \"q.redb\""),
        )
        .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(config.store.path, Path::new("q.redb"));
    }

    // --- required keys, unknown keys, types ------------------------------------------------

    #[test]
    fn missing_device_id_is_reported() {
        let message = only_problem(
            "[mqtt]\nurl = \"mqtt://h\"\nallow_plaintext = true\n",
            "device.id",
        );
        assert!(message.contains("missing required key"), "{message}");
        assert!(message.contains("[A-Za-z0-9_.-]"), "{message}");
    }

    #[test]
    fn missing_mqtt_section_is_reported_once() {
        let message = only_problem("[device]\nid = \"d\"\n", "mqtt");
        assert!(
            message.contains("missing required section [mqtt]"),
            "{message}"
        );
    }

    #[test]
    fn missing_mqtt_url_is_reported() {
        let message = only_problem("[device]\nid = \"d\"\n[mqtt]\n", "mqtt.url");
        assert!(message.contains("missing required key"), "{message}");
        assert!(message.contains("mqtts://"), "{message}");
    }

    #[test]
    fn empty_file_reports_every_missing_required_key() {
        assert_eq!(keys(&problems("")), ["device.id", "mqtt"]);
    }

    #[test]
    fn unknown_key_is_reported_with_a_suggestion() {
        let message = only_problem(&plain("keepalive = \"30s\"", ""), "mqtt.keepalive");
        assert!(message.starts_with("unknown key"), "{message}");
        assert!(
            message.contains("did you mean \"keep_alive\"?"),
            "{message}"
        );
        assert!(
            message.contains("expected one of url, topic_prefix, ca, cert, key, keep_alive"),
            "{message}"
        );
    }

    #[test]
    fn unknown_key_without_a_close_match_lists_the_expected_keys() {
        let message = only_problem(
            &plain("", "[sync]\ncompression = \"zstd\""),
            "sync.compression",
        );
        assert_eq!(
            message,
            "unknown key; expected one of encoding, batch_max_changes, batch_max_bytes, \
             linger, max_inflight"
        );
    }

    #[test]
    fn key_in_the_wrong_section_names_its_section() {
        let message = only_problem(&plain("when_full = \"reject\"", ""), "mqtt.when_full");
        assert!(message.contains("it belongs in [store]"), "{message}");
    }

    #[test]
    fn unknown_sections_are_reported_including_those_not_supported_yet() {
        let problems = problems(&plain(
            "",
            "[contrl]\n[mqt]\nurl = \"x\"\n[desierd]\n[telemetri]",
        ));
        assert_eq!(
            keys(&problems),
            ["contrl", "desierd", "mqt", "telemetri"],
            "{problems:#?}"
        );
        for problem in &problems {
            assert!(
                problem.message.starts_with("unknown section"),
                "{problem:?}"
            );
        }
        assert!(problems[1].message.contains("did you mean [desired]?"));
        assert!(problems[2].message.contains("did you mean [mqtt]?"));
        assert!(
            problems[0].message.contains(
                "[device], [mqtt], [store], [sync], [local], [log], [telemetry], [desired]"
            ),
            "{problems:#?}"
        );
    }

    #[test]
    fn key_outside_any_section_is_reported() {
        let message = only_problem(
            &format!("socket = \"/x.sock\"\n{}", plain("", "")),
            "socket",
        );
        assert!(message.contains("outside any section"), "{message}");
        assert!(message.contains("it belongs in [local]"), "{message}");
    }

    #[test]
    fn wrong_type_is_reported_with_what_was_expected_and_found() {
        let message = only_problem(
            &plain("", "[sync]\nbatch_max_changes = \"1000\""),
            "sync.batch_max_changes",
        );
        assert_eq!(message, "expected an integer, found a string \"1000\"");

        let message = only_problem(&plain("keep_alive = 30", ""), "mqtt.keep_alive");
        assert_eq!(
            message,
            "expected a duration string such as \"30s\", found an integer 30"
        );

        let message = only_problem(&plain("", "[store]\nmax_bytes = 1.5"), "store.max_bytes");
        assert!(message.ends_with("found a float 1.5"), "{message}");

        let message = only_problem(&format!("log = \"debug\"\n{}", plain("", "")), "log");
        assert_eq!(message, "expected a table [log], found a string \"debug\"");
    }

    #[test]
    fn value_of_the_wrong_type_is_not_also_reported_as_missing() {
        let message = only_problem(
            "[device]\nid = 42\n[mqtt]\nurl = \"mqtt://h\"\nallow_plaintext = true\n",
            "device.id",
        );
        assert_eq!(message, "expected a string, found an integer 42");
        let found = problems("device = 1\n[mqtt]\nurl = \"mqtt://h\"\nallow_plaintext = true\n");
        assert_eq!(keys(&found), ["device"], "{found:#?}");
        let found = problems("mqtt = [1]\n[device]\nid = \"d\"\n");
        assert_eq!(keys(&found), ["mqtt"], "{found:#?}");
        // Below [device], `mqtt = ...` is a key of [device].
        let found = problems("[device]\nid = \"d\"\nmqtt = [1]\n");
        assert_eq!(keys(&found), ["device.mqtt", "mqtt"], "{found:#?}");
    }

    // --- device ----------------------------------------------------------------------------

    #[test]
    fn invalid_device_ids_are_rejected() {
        let long = "a".repeat(65);
        for id in ["", "pump 42", "pump/42", "pümp", "+", long.as_str()] {
            let text = format!(
                "[device]\nid = {id:?}\n[mqtt]\nurl = \"mqtt://h\"\nallow_plaintext = true\n"
            );
            let message = only_problem(&text, "device.id");
            assert!(
                message.starts_with("expected 1-64 characters of [A-Za-z0-9_.-], found"),
                "{id:?}: {message}"
            );
        }
    }

    #[test]
    fn device_id_accepts_the_allowed_characters() {
        let max = "Z".repeat(64);
        for id in ["a", "pump-0042", "A.b_C-9", max.as_str()] {
            let parsed: DeviceId = id.parse().unwrap();
            assert_eq!(parsed.as_str(), id);
            assert_eq!(parsed.to_string(), id);
            assert_eq!(DeviceId::try_from(id.to_owned()).unwrap(), parsed);
        }
        assert!("a b".parse::<DeviceId>().is_err());
        assert!(DeviceId::try_from(String::new()).is_err());
    }

    // --- mqtt ------------------------------------------------------------------------------

    #[test]
    fn unsupported_url_scheme_names_the_allowed_schemes() {
        for url in ["ssl://h:8883", "tcp://h", "wss://h/mqtt", "https://h"] {
            let message = only_problem(
                &format!("[device]\nid = \"d\"\n[mqtt]\nurl = {url:?}\nallow_plaintext = true\n"),
                "mqtt.url",
            );
            assert!(message.starts_with("unsupported scheme"), "{message}");
            assert!(message.contains("mqtts://"), "{message}");
            assert!(message.contains("mqtt://"), "{message}");
        }
    }

    #[test]
    fn broker_urls_parse_with_default_ports() {
        let cases = [
            (
                "mqtts://broker.example.com:8883",
                true,
                "broker.example.com",
                8883,
            ),
            (
                "mqtts://broker.example.com",
                true,
                "broker.example.com",
                8883,
            ),
            (
                "mqtts://broker.example.com/",
                true,
                "broker.example.com",
                8883,
            ),
            ("mqtt://10.0.0.1", false, "10.0.0.1", 1883),
            ("mqtt://localhost:1884/", false, "localhost", 1884),
            ("MQTTS://Host_1:1", true, "Host_1", 1),
            ("mqtts://[::1]", true, "::1", 8883),
            ("mqtts://[2001:db8::1]:9000", true, "2001:db8::1", 9000),
        ];
        for (text, tls, host, port) in cases {
            let url: BrokerUrl = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                url,
                BrokerUrl {
                    tls,
                    host: host.to_owned(),
                    port
                },
                "{text}"
            );
        }
    }

    #[test]
    fn broker_urls_with_anything_but_host_and_port_are_rejected() {
        for text in [
            "",
            "broker.example.com:8883",
            "mqtts://",
            "mqtts://:8883",
            "mqtts://h:",
            "mqtts://h:0",
            "mqtts://h:65536",
            "mqtts://h:+80",
            "mqtts://h:port",
            "mqtts://h:8883/topic",
            "mqtts://h:8883//",
            "mqtts://h?x=1",
            "mqtts://user:pw@h",
            "mqtts://h h",
            "mqtts://::1",
            "mqtts://[::1",
            "mqtts://[nothost]",
            "mqtts://[::1]8883",
        ] {
            assert!(text.parse::<BrokerUrl>().is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn broker_url_displays_in_canonical_form() {
        for (text, shown) in [
            ("mqtts://h", "mqtts://h:8883"),
            ("MQTT://h:1/", "mqtt://h:1"),
            ("mqtts://[::1]", "mqtts://[::1]:8883"),
        ] {
            let url: BrokerUrl = text.parse().unwrap();
            assert_eq!(url.to_string(), shown);
            assert_eq!(url.to_string().parse::<BrokerUrl>().unwrap(), url);
        }
    }

    #[test]
    fn plaintext_url_without_allow_plaintext_is_rejected() {
        let message = only_problem(
            "[device]\nid = \"d\"\n[mqtt]\nurl = \"mqtt://broker:1883\"\n",
            "mqtt.url",
        );
        assert!(message.contains("plaintext"), "{message}");
        assert!(message.contains("allow_plaintext = true"), "{message}");
        let message = only_problem(
            "[device]\nid = \"d\"\n[mqtt]\nurl = \"mqtt://b\"\nallow_plaintext = false\n",
            "mqtt.url",
        );
        assert!(message.contains("plaintext"), "{message}");
    }

    #[test]
    fn plaintext_url_with_allow_plaintext_is_accepted_without_ca() {
        let config =
            valid("[device]\nid = \"d\"\n[mqtt]\nurl = \"mqtt://b\"\nallow_plaintext = true\n");
        assert!(!config.mqtt.url.tls);
        assert!(config.mqtt.allow_plaintext);
        assert_eq!(config.mqtt.ca, None);
    }

    #[test]
    fn certificate_files_with_a_plaintext_url_are_rejected() {
        let problems = problems(&plain(
            "ca = \"/etc/ca.pem\"\ncert = \"/etc/d.pem\"\nkey = \"/etc/d.key\"",
            "",
        ));
        assert_eq!(keys(&problems), ["mqtt.ca", "mqtt.cert", "mqtt.key"]);
        assert!(problems[0].message.contains("plaintext"), "{problems:#?}");
    }

    #[test]
    fn tls_url_without_ca_is_rejected() {
        let message = only_problem(
            "[device]\nid = \"d\"\n[mqtt]\nurl = \"mqtts://b\"\n",
            "mqtt.ca",
        );
        assert!(message.contains("missing"), "{message}");
        assert!(message.contains("CA"), "{message}");
    }

    #[test]
    fn missing_ca_file_names_the_path_and_the_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edgesync.toml");
        let errors = Config::from_toml_str(&file, &tls_config("")).unwrap_err();
        assert_eq!(keys(&errors.problems), ["mqtt.ca"]);
        let ca = dir.path().join("ca.pem");
        assert_eq!(
            errors.problems[0].message,
            format!(
                "cannot read \"{}\": No such file or directory (os error 2)",
                ca.display()
            )
        );
    }

    #[test]
    fn ca_that_is_a_directory_is_rejected() {
        let dir = tls_dir();
        std::fs::create_dir(dir.path().join("certs")).unwrap();
        let text = tls_config("").replace("ca.pem", "certs");
        let errors = Config::from_toml_str(&dir.path().join("e.toml"), &text).unwrap_err();
        assert_eq!(keys(&errors.problems), ["mqtt.ca"]);
        assert!(
            errors.problems[0].message.contains("is a directory"),
            "{errors}"
        );
    }

    #[test]
    fn client_certificate_without_its_key_is_rejected() {
        let dir = tls_dir();
        let file = dir.path().join("e.toml");
        let errors =
            Config::from_toml_str(&file, &tls_config("cert = \"device.pem\"")).unwrap_err();
        assert_eq!(keys(&errors.problems), ["mqtt.key"]);
        assert!(
            errors.problems[0]
                .message
                .contains("set both cert and key, or neither")
        );

        let errors = Config::from_toml_str(&file, &tls_config("key = \"device.key\"")).unwrap_err();
        assert_eq!(keys(&errors.problems), ["mqtt.cert"]);
    }

    #[test]
    fn missing_client_certificate_files_are_reported_each() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
        let errors = Config::from_toml_str(
            &dir.path().join("e.toml"),
            &tls_config("cert = \"device.pem\"\nkey = \"device.key\""),
        )
        .unwrap_err();
        assert_eq!(keys(&errors.problems), ["mqtt.cert", "mqtt.key"]);
        assert!(errors.problems[1].message.contains("device.key"));
    }

    #[test]
    fn password_file_needs_a_username_and_must_be_readable() {
        let dir = tls_dir();
        std::fs::write(dir.path().join("pw"), "secret").unwrap();
        private(&dir.path().join("pw"));
        let file = dir.path().join("e.toml");
        let errors =
            Config::from_toml_str(&file, &tls_config("password_file = \"pw\"")).unwrap_err();
        assert_eq!(keys(&errors.problems), ["mqtt.password_file"]);
        assert!(errors.problems[0].message.contains("without mqtt.username"));

        let errors = Config::from_toml_str(
            &file,
            &tls_config("username = \"u\"\npassword_file = \"missing\""),
        )
        .unwrap_err();
        assert_eq!(keys(&errors.problems), ["mqtt.password_file"]);
        assert!(errors.problems[0].message.starts_with("cannot read"));
    }

    #[test]
    fn username_must_not_be_empty() {
        only_problem(&plain("username = \"\"", ""), "mqtt.username");
    }

    #[test]
    fn topic_prefix_rules_are_enforced() {
        for prefix in ["acme", "acme/fleet-1", "a b", &"p".repeat(128)] {
            let config = valid(&plain(&format!("topic_prefix = {prefix:?}"), ""));
            assert_eq!(config.mqtt.topic_prefix, prefix);
        }
        for prefix in [
            "",
            "a/+",
            "#",
            "a\u{0}b",
            "/acme",
            "acme/",
            &"p".repeat(129),
        ] {
            only_problem(
                &plain(&format!("topic_prefix = {prefix:?}"), ""),
                "mqtt.topic_prefix",
            );
        }
    }

    #[test]
    fn client_id_defaults_to_the_device_id_and_is_checked() {
        assert_eq!(valid(&plain("", "")).mqtt.client_id, "pump-0042");
        assert_eq!(
            valid(&plain("client_id = \"any id/ü\"", "")).mqtt.client_id,
            "any id/ü"
        );
        for id in ["", "a\nb", &"c".repeat(129)] {
            only_problem(&plain(&format!("client_id = {id:?}"), ""), "mqtt.client_id");
        }
    }

    #[test]
    fn keep_alive_must_be_whole_seconds_from_5s_to_65535s() {
        for (text, secs) in [("5s", 5), ("65535s", 65535), ("2m", 120), ("5000ms", 5)] {
            let config = valid(&plain(&format!("keep_alive = {text:?}"), ""));
            assert_eq!(config.mqtt.keep_alive, Duration::from_secs(secs));
        }
        for text in ["4s", "0", "65536s", "1d", "5500ms"] {
            let message = only_problem(
                &plain(&format!("keep_alive = {text:?}"), ""),
                "mqtt.keep_alive",
            );
            assert!(message.starts_with("expected"), "{message}");
        }
    }

    #[test]
    fn bad_duration_is_reported() {
        let message = only_problem(&plain("keep_alive = \"30 sec\"", ""), "mqtt.keep_alive");
        assert!(message.contains("unknown unit \"sec\""), "{message}");
        let message = only_problem(&plain("", "[sync]\nlinger = \"-1ms\""), "sync.linger");
        assert!(message.contains("negative"), "{message}");
    }

    // --- store -----------------------------------------------------------------------------

    #[test]
    fn bad_size_is_reported() {
        let message = only_problem(
            &plain("", "[store]\nmax_bytes = \"lots\""),
            "store.max_bytes",
        );
        assert!(message.starts_with("expected a size such as"), "{message}");
        assert!(message.contains("\"lots\""), "{message}");
        let message = only_problem(
            &plain("", "[store]\nmax_bytes = \"512KiB\""),
            "store.max_bytes",
        );
        assert_eq!(
            message,
            "expected at least 1MiB (1048576 bytes), found 512KiB (524288 bytes)"
        );
        let message = only_problem(&plain("", "[store]\nmax_bytes = -1"), "store.max_bytes");
        assert!(message.contains("found -1"), "{message}");
    }

    #[test]
    fn sizes_may_be_integer_numbers_of_bytes() {
        let config = valid(&plain(
            "",
            "[store]\nmax_bytes = 2097152\ncache_size = 262144\n[sync]\nbatch_max_bytes = 66560",
        ));
        assert_eq!(config.store.max_bytes, 2 * MIB);
        assert_eq!(config.store.cache_size, 256 * KIB);
        assert_eq!(config.sync.batch_max_bytes, 66560);
    }

    #[test]
    fn cache_size_must_be_from_256kib_to_1gib() {
        only_problem(
            &plain("", "[store]\ncache_size = \"255KiB\""),
            "store.cache_size",
        );
        only_problem(
            &plain("", "[store]\ncache_size = \"2GiB\""),
            "store.cache_size",
        );
        valid(&plain("", "[store]\ncache_size = \"1GiB\""));
    }

    #[test]
    fn when_full_accepts_drop_oldest_or_reject_and_suggests() {
        let message = only_problem(
            &plain("", "[store]\nwhen_full = \"drop_oldest\""),
            "store.when_full",
        );
        assert_eq!(
            message,
            "expected \"drop-oldest\" or \"reject\", found \"drop_oldest\" (did you mean \
             \"drop-oldest\"?)"
        );
    }

    #[test]
    fn store_path_that_is_a_directory_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let text = plain("", &format!("[store]\npath = \"{}\"", dir.path().display()));
        let message = only_problem(&text, "store.path");
        assert!(message.contains("found the directory"), "{message}");
        only_problem(
            &plain("", "[store]\npath = \"/var/lib/edgesync/\""),
            "store.path",
        );
        only_problem(&plain("", "[store]\npath = \"\""), "store.path");
    }

    #[test]
    fn store_path_below_a_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "").unwrap();
        let text = plain(
            "",
            &format!("[store]\npath = \"{}/file/q.redb\"", dir.path().display()),
        );
        let message = only_problem(&text, "store.path");
        assert!(message.contains("is not a directory"), "{message}");
    }

    // --- sync ------------------------------------------------------------------------------

    #[test]
    fn batch_max_bytes_too_small_for_the_largest_change_is_rejected_with_the_reason() {
        let message = only_problem(
            &plain("", "[sync]\nbatch_max_bytes = \"64KiB\""),
            "sync.batch_max_bytes",
        );
        assert!(
            message.starts_with("expected at least 65KiB (66560 bytes), found 64KiB (65536 bytes)"),
            "{message}"
        );
        assert!(
            message.contains("largest change the agent accepts"),
            "{message}"
        );
        valid(&plain("", "[sync]\nbatch_max_bytes = \"65KiB\""));
    }

    #[test]
    fn batch_max_bytes_above_256mib_is_rejected() {
        valid(&plain("", "[sync]\nbatch_max_bytes = \"256MiB\""));
        let message = only_problem(
            &plain("", "[sync]\nbatch_max_bytes = 268435457"),
            "sync.batch_max_bytes",
        );
        assert!(message.starts_with("expected at most 256MiB"), "{message}");
    }

    #[test]
    fn sync_limits_are_enforced() {
        for (line, key) in [
            ("batch_max_changes = 0", "sync.batch_max_changes"),
            ("batch_max_changes = 100001", "sync.batch_max_changes"),
            ("max_inflight = 0", "sync.max_inflight"),
            ("max_inflight = 1025", "sync.max_inflight"),
            ("linger = \"11s\"", "sync.linger"),
            ("encoding = \"JSON\"", "sync.encoding"),
        ] {
            only_problem(&plain("", &format!("[sync]\n{line}")), key);
        }
        let config = valid(&plain(
            "",
            "[sync]\nbatch_max_changes = 100000\nmax_inflight = 1024\nlinger = \"10s\"",
        ));
        assert_eq!(config.sync.batch_max_changes, 100_000);
        assert_eq!(config.sync.max_inflight, 1024);
        assert_eq!(config.sync.linger, Duration::from_secs(10));
    }

    // --- local, log ------------------------------------------------------------------------

    #[test]
    fn socket_path_longer_than_sun_path_allows_is_rejected() {
        let long = format!("/run/{}.sock", "s".repeat(95));
        assert_eq!(long.len(), 105);
        let message = only_problem(
            &plain("", &format!("[local]\nsocket = {long:?}")),
            "local.socket",
        );
        assert!(message.contains("at most 100 bytes"), "{message}");
        assert!(message.contains("sun_path"), "{message}");
        let just_fits = format!("/run/{}.sock", "s".repeat(90));
        assert_eq!(just_fits.len(), 100);
        valid(&plain("", &format!("[local]\nsocket = {just_fits:?}")));
    }

    #[test]
    fn relative_socket_path_is_rejected() {
        let message = only_problem(
            &plain("", "[local]\nsocket = \"edgesync.sock\""),
            "local.socket",
        );
        assert!(message.contains("absolute"), "{message}");
        only_problem(&plain("", "[local]\nsocket = \"\""), "local.socket");
    }

    #[test]
    fn log_level_accepts_levels_and_target_directives() {
        for level in [
            "trace",
            "DEBUG",
            "info",
            "warn",
            "error",
            "off",
            "info,edgesync=debug",
            "edgesync::store=trace,rumqttc=warn",
        ] {
            assert_eq!(
                valid(&plain("", &format!("[log]\nlevel = {level:?}")))
                    .log
                    .level,
                level
            );
        }
        for level in [
            "",
            "verbose",
            "infoo",
            "info,",
            "=debug",
            "a=b=c",
            "edgesync[span]=debug",
            "info warn",
        ] {
            only_problem(
                &plain("", &format!("[log]\nlevel = {level:?}")),
                "log.level",
            );
        }
        let message = only_problem(&plain("", "[log]\nlevel = \"infoo\""), "log.level");
        assert!(message.contains("did you mean \"info\"?"), "{message}");
    }

    // --- desired ---------------------------------------------------------------------------

    /// The `[desired]` configuration of a valid file with `rest` after `[mqtt]`.
    fn desired(rest: &str) -> DesiredConfig {
        valid(&plain("", rest)).desired
    }

    /// The only problem of a file with `rest` after `[mqtt]`, which must be for `key`.
    fn desired_problem(rest: &str, key: &str) -> String {
        only_problem(&plain("", rest), key)
    }

    fn glob(pattern: &str) -> KeyGlob {
        KeyGlob::new(pattern).unwrap()
    }

    #[test]
    fn desired_defaults_apply_without_the_section_or_with_an_empty_one() {
        assert_eq!(desired(""), DesiredConfig::default());
        assert_eq!(desired("[desired]"), DesiredConfig::default());
        let defaults = DesiredConfig::default();
        assert_eq!(defaults.max_document_bytes, 256 * KIB);
        assert_eq!(defaults.max_depth, 16);
        assert_eq!(defaults.unknown_keys, UnknownKeys::Accept);
        assert_eq!(defaults.history, 10);
        assert_eq!(defaults.concurrency, 4);
        assert_eq!(defaults.handler_timeout, Duration::from_secs(30));
        assert_eq!(defaults.max_future_ts, Duration::from_secs(3600));
    }

    #[test]
    fn desired_max_future_ts_is_a_bounded_duration() {
        assert_eq!(
            desired("[desired]\nmax_future_ts = \"5m\"").max_future_ts,
            Duration::from_secs(300)
        );
        for bad in ["\"0s\"", "\"31d\"", "\"soon\"", "5"] {
            let text = plain("", &format!("[desired]\nmax_future_ts = {bad}"));
            only_problem(&text, "desired.max_future_ts");
        }
    }

    #[test]
    fn desired_full_valid_example() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edgesync.toml");
        let text = plain(
            "",
            r#"
[desired]
max_document_bytes = "1MiB"
max_depth = 8
unknown_keys = "reject"
history = 0
concurrency = 2
handler_timeout = "5s"

[[desired.rule]]
keys = "setpoint"
type = "number"
min = -10
max = 30.5
nullable = false

[[desired.rule]]
keys = "led.mode"
type = "string"
enum = ["off", "blink"]
max_length = 8

[[desired.rule]]
keys = "level"
type = "integer"
enum = [1, 2.0, 3]

[[desired.rule]]
keys = "config.*"
enum = [{ a = [1, true] }, "x"]

[[desired.rule]]
keys = "*"

[[desired.conflict]]
keys = "led.*"
policy = "device-wins"

[[desired.conflict]]
keys = "schedule"
policy = "merge"
command = ["merge-schedule"]

[[desired.conflict]]
keys = "sched?"
policy = "merge"
command = ["/usr/bin/merge", "{key}"]
timeout = "1h"

[[desired.conflict]]
keys = "setpoint"
policy = "last-write-wins"

[[desired.conflict]]
keys = "x"
policy = "cloud-wins"

[[desired.handler]]
keys = "setpoint"
type = "exec"
command = ["/usr/local/bin/set", "--value", "{value}"]

[[desired.handler]]
keys = "led.*"
type = "exec"
command = ["led-ctl"]
timeout = "100ms"

[[desired.handler]]
keys = "display.*"
type = "file"
path = "out/{key}.json"

[[desired.handler]]
keys = "motd"
type = "file"
path = "/run/motd"

[[desired.handler]]
keys = "fan.*"
type = "watch"

[[desired.handler]]
keys = "pump.*"
type = "watch"
deadline = "2s"
"#,
        );
        let config = Config::from_toml_str(&file, &text).unwrap_or_else(|err| panic!("{err}"));
        let d = config.desired;
        assert_eq!(d.max_document_bytes, MIB);
        assert_eq!(d.max_depth, 8);
        assert_eq!(d.unknown_keys, UnknownKeys::Reject);
        assert_eq!(d.history, 0);
        assert_eq!(d.concurrency, 2);
        assert_eq!(d.handler_timeout, Duration::from_secs(5));

        let any = Rule {
            keys: glob("*"),
            value_type: None,
            min: None,
            max: None,
            one_of: None,
            max_length: None,
            nullable: true,
        };
        assert_eq!(
            d.rules,
            [
                Rule {
                    keys: glob("setpoint"),
                    value_type: Some(ValueType::Number),
                    min: Some(-10.0),
                    max: Some(30.5),
                    nullable: false,
                    ..any.clone()
                },
                Rule {
                    keys: glob("led.mode"),
                    value_type: Some(ValueType::String),
                    one_of: Some(vec![serde_json::json!("off"), serde_json::json!("blink")]),
                    max_length: Some(8),
                    ..any.clone()
                },
                Rule {
                    keys: glob("level"),
                    value_type: Some(ValueType::Integer),
                    one_of: Some(vec![
                        serde_json::json!(1),
                        serde_json::json!(2.0),
                        serde_json::json!(3)
                    ]),
                    ..any.clone()
                },
                Rule {
                    keys: glob("config.*"),
                    one_of: Some(vec![
                        serde_json::json!({"a": [1, true]}),
                        serde_json::json!("x")
                    ]),
                    ..any.clone()
                },
                any,
            ]
        );

        assert_eq!(
            d.conflicts,
            [
                ConflictRule {
                    keys: glob("led.*"),
                    policy: Policy::DeviceWins
                },
                ConflictRule {
                    keys: glob("schedule"),
                    policy: Policy::Merge {
                        argv: vec!["merge-schedule".to_owned()],
                        timeout: Duration::from_secs(5)
                    }
                },
                ConflictRule {
                    keys: glob("sched?"),
                    policy: Policy::Merge {
                        argv: vec!["/usr/bin/merge".to_owned(), "{key}".to_owned()],
                        timeout: Duration::from_secs(3600)
                    }
                },
                ConflictRule {
                    keys: glob("setpoint"),
                    policy: Policy::LastWriteWins
                },
                ConflictRule {
                    keys: glob("x"),
                    policy: Policy::CloudWins
                },
            ]
        );

        let handler = |keys: &str, kind| Handler {
            keys: glob(keys),
            kind,
        };
        assert_eq!(
            d.handlers,
            [
                handler(
                    "setpoint",
                    HandlerKind::Exec {
                        argv: vec![
                            "/usr/local/bin/set".to_owned(),
                            "--value".to_owned(),
                            "{value}".to_owned()
                        ],
                        timeout: Duration::from_secs(5)
                    }
                ),
                handler(
                    "led.*",
                    HandlerKind::Exec {
                        argv: vec!["led-ctl".to_owned()],
                        timeout: Duration::from_millis(100)
                    }
                ),
                // Relative paths are resolved against the config file's directory.
                handler(
                    "display.*",
                    HandlerKind::File {
                        path: dir.path().join("out/{key}.json")
                    }
                ),
                handler(
                    "motd",
                    HandlerKind::File {
                        path: PathBuf::from("/run/motd")
                    }
                ),
                handler(
                    "fan.*",
                    HandlerKind::Watch {
                        deadline: Duration::from_secs(5)
                    }
                ),
                handler(
                    "pump.*",
                    HandlerKind::Watch {
                        deadline: Duration::from_secs(2)
                    }
                ),
            ]
        );
    }

    #[test]
    fn desired_limits_are_enforced() {
        for (line, key, message) in [
            (
                "max_document_bytes = \"1023B\"",
                "desired.max_document_bytes",
                "expected at least 1KiB (1024 bytes), found 1023 bytes",
            ),
            (
                "max_document_bytes = \"17MiB\"",
                "desired.max_document_bytes",
                "expected at most 16MiB (16777216 bytes), found 17MiB (17825792 bytes)",
            ),
            (
                "max_document_bytes = \"big\"",
                "desired.max_document_bytes",
                "expected a size such as",
            ),
            (
                "max_depth = 0",
                "desired.max_depth",
                "expected 1 to 64, found 0",
            ),
            (
                "max_depth = 65",
                "desired.max_depth",
                "expected 1 to 64, found 65",
            ),
            (
                "history = -1",
                "desired.history",
                "expected 0 to 1000, found -1",
            ),
            (
                "history = 1001",
                "desired.history",
                "expected 0 to 1000, found 1001",
            ),
            (
                "concurrency = 0",
                "desired.concurrency",
                "expected 1 to 64, found 0",
            ),
            (
                "concurrency = 65",
                "desired.concurrency",
                "expected 1 to 64, found 65",
            ),
            (
                "concurrency = \"4\"",
                "desired.concurrency",
                "expected an integer, found a string \"4\"",
            ),
            (
                "handler_timeout = \"99ms\"",
                "desired.handler_timeout",
                "expected a duration from 100ms to 1h, found 99ms",
            ),
            (
                "handler_timeout = \"2h\"",
                "desired.handler_timeout",
                "expected a duration from 100ms to 1h, found 7200s",
            ),
            (
                "handler_timeout = 30",
                "desired.handler_timeout",
                "expected a duration string such as \"30s\", found an integer 30",
            ),
            (
                "unknown_keys = \"rejct\"",
                "desired.unknown_keys",
                "expected \"accept\" or \"reject\", found \"rejct\" (did you mean \"reject\"?)",
            ),
        ] {
            let found = desired_problem(&format!("[desired]\n{line}"), key);
            assert!(found.starts_with(message), "{line}: {found}");
        }
        let d = desired(
            "[desired]\nmax_document_bytes = 1024\nmax_depth = 64\nhistory = 1000\n\
             concurrency = 64\nhandler_timeout = \"100ms\"\nunknown_keys = \"accept\"",
        );
        assert_eq!(
            (d.max_document_bytes, d.max_depth, d.history, d.concurrency),
            (1024, 64, 1000, 64)
        );
        assert_eq!(d.handler_timeout, Duration::from_millis(100));
        let d = desired("[desired]\nmax_document_bytes = \"16MiB\"\nhandler_timeout = \"1h\"");
        assert_eq!(d.max_document_bytes, 16 * MIB);
        assert_eq!(d.handler_timeout, Duration::from_secs(3600));
    }

    #[test]
    fn desired_unknown_keys_are_reported_with_suggestions() {
        let message = desired_problem(
            "[desired]\nhandler_timout = \"1s\"",
            "desired.handler_timout",
        );
        assert!(
            message.starts_with("unknown key (did you mean \"handler_timeout\"?)"),
            "{message}"
        );
        assert!(
            message.ends_with(
                "expected one of max_document_bytes, max_depth, unknown_keys, history, \
                 concurrency, handler_timeout, max_future_ts, rule, conflict, handler"
            ),
            "{message}"
        );
        // In an entry of an array of tables: did-you-mean, or where the key belongs.
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\nmaxlength = 3",
            "desired.rule[1].maxlength",
        );
        assert_eq!(
            message,
            "unknown key (did you mean \"max_length\"?); expected one of keys, type, min, max, \
             enum, max_length, nullable"
        );
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\npolicy = \"merge\"",
            "desired.rule[1].policy",
        );
        assert!(
            message.contains("(it belongs in [[desired.conflict]])"),
            "{message}"
        );
        let message = desired_problem(
            "[[desired.handler]]\nkeys = \"a\"\ntype = \"watch\"\nconcurrency = 2",
            "desired.handler[1].concurrency",
        );
        assert!(message.contains("(it belongs in [desired])"), "{message}");
        let message = desired_problem(
            "[[desired.conflict]]\nkeys = \"a\"\npolicy = \"device-wins\"\nnullable = true",
            "desired.conflict[1].nullable",
        );
        assert!(
            message.contains("(it belongs in [[desired.rule]])"),
            "{message}"
        );
        // An array of tables of an unknown name.
        let message = desired_problem("[[desired.rules]]\nkeys = \"a\"", "desired.rules");
        assert!(message.contains("did you mean \"rule\"?"), "{message}");
    }

    #[test]
    fn desired_tables_must_be_arrays_of_tables() {
        let message = desired_problem("[desired.rule]\nkeys = \"a\"", "desired.rule");
        assert_eq!(
            message,
            "expected an array of tables [[desired.rule]], found a table (write \
             [[desired.rule]], with double brackets, once per entry)"
        );
        let message = desired_problem("[desired]\nhandler = \"exec\"", "desired.handler");
        assert_eq!(
            message,
            "expected an array of tables [[desired.handler]], found a string \"exec\""
        );
        // An entry that is not a table keeps the numbering of the others.
        let found = problems(&plain(
            "",
            "[desired]\nrule = [1, { keys = \"a\", min = \"x\" }]",
        ));
        assert_eq!(
            keys(&found),
            ["desired.rule[1]", "desired.rule[2].min"],
            "{found:#?}"
        );
        assert_eq!(
            found[0].message,
            "expected a table [[desired.rule]], found an integer 1"
        );
        let message = only_problem(&format!("desired = 1\n{}", plain("", "")), "desired");
        assert_eq!(message, "expected a table [desired], found an integer 1");
    }

    #[test]
    fn desired_tables_have_a_limit() {
        let mut text = String::new();
        for i in 0..1001 {
            text.push_str(&format!("[[desired.rule]]\nkeys = \"k{i}\"\n"));
        }
        let message = desired_problem(&text, "desired.rule");
        assert_eq!(
            message,
            "expected at most 1000 [[desired.rule]] tables, found 1001"
        );
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&format!(
                "[[desired.handler]]\nkeys = \"k{i}\"\ntype = \"watch\"\n"
            ));
        }
        assert_eq!(desired(&text).handlers.len(), 1000);
    }

    #[test]
    fn desired_rule_keys_is_a_required_glob() {
        let message = desired_problem("[[desired.rule]]\ntype = \"bool\"", "desired.rule[1].keys");
        assert!(message.starts_with("missing required key; expected a key glob"));
        let message = desired_problem("[[desired.rule]]\nkeys = \"led/*\"", "desired.rule[1].keys");
        assert_eq!(
            message,
            "expected a key glob of 1-128 characters of [A-Za-z0-9_.-] and the wildcards * and \
             ?, found \"led/*\" ('/' at byte 3 is not allowed)"
        );
        desired_problem("[[desired.rule]]\nkeys = \"\"", "desired.rule[1].keys");
        desired_problem(
            &format!("[[desired.rule]]\nkeys = \"{}\"", "a".repeat(129)),
            "desired.rule[1].keys",
        );
        let message = desired_problem("[[desired.rule]]\nkeys = [\"a\"]", "desired.rule[1].keys");
        assert_eq!(message, "expected a string, found an array");
    }

    #[test]
    fn desired_rule_type_names_the_allowed_types() {
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\ntype = \"boolean\"",
            "desired.rule[1].type",
        );
        assert_eq!(
            message,
            "expected \"bool\" or \"integer\" or \"number\" or \"string\" or \"object\" or \
             \"array\", found \"boolean\" (did you mean \"bool\"?)"
        );
        for (written, meant) in [("int", "integer"), ("float", "number"), ("strin", "string")] {
            let message = desired_problem(
                &format!("[[desired.rule]]\nkeys = \"a\"\ntype = {written:?}"),
                "desired.rule[1].type",
            );
            assert!(
                message.ends_with(&format!("(did you mean {meant:?}?)")),
                "{message}"
            );
        }
    }

    #[test]
    fn desired_rule_bounds_are_numbers_in_order_and_only_for_numbers() {
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\nmin = 10\nmax = 9.5",
            "desired.rule[1].max",
        );
        assert_eq!(
            message,
            "must not be below desired.rule[1].min (10), found 9.5"
        );
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\nmin = \"5\"",
            "desired.rule[1].min",
        );
        assert_eq!(message, "expected a number, found a string \"5\"");
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\nmax = nan",
            "desired.rule[1].max",
        );
        assert_eq!(message, "expected a finite number, found NaN");
        desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\nmin = -inf",
            "desired.rule[1].min",
        );
        for value_type in ["string", "bool", "object", "array"] {
            let found = problems(&plain(
                "",
                &format!(
                    "[[desired.rule]]\nkeys = \"a\"\ntype = \"{value_type}\"\nmin = 1\nmax = 2"
                ),
            ));
            assert_eq!(
                keys(&found),
                ["desired.rule[1].min", "desired.rule[1].max"],
                "{found:#?}"
            );
            assert_eq!(
                found[0].message,
                format!(
                    "min applies to numbers only, but desired.rule[1].type = \"{value_type}\"; \
                     remove it (max_length limits the length of strings, arrays and objects)"
                )
            );
        }
        // Equal bounds and bounds with no type are fine.
        let d = desired("[[desired.rule]]\nkeys = \"a\"\nmin = 3\nmax = 3.0");
        assert_eq!((d.rules[0].min, d.rules[0].max), (Some(3.0), Some(3.0)));
        assert_eq!(d.rules[0].value_type, None);
        let d = desired("[[desired.rule]]\nkeys = \"a\"\ntype = \"integer\"\nmin = 0");
        assert_eq!(d.rules[0].min, Some(0.0));
    }

    #[test]
    fn desired_rule_max_length_is_for_strings_arrays_and_objects() {
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\nmax_length = -1",
            "desired.rule[1].max_length",
        );
        assert_eq!(message, "expected an integer of 0 or more, found -1");
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\nmax_length = 2.5",
            "desired.rule[1].max_length",
        );
        assert_eq!(message, "expected an integer, found a float 2.5");
        for value_type in ["bool", "integer", "number"] {
            let message = desired_problem(
                &format!("[[desired.rule]]\nkeys = \"a\"\ntype = \"{value_type}\"\nmax_length = 3"),
                "desired.rule[1].max_length",
            );
            assert!(
                message.starts_with("max_length applies to strings, arrays and objects only"),
                "{message}"
            );
        }
        for value_type in ["string", "array", "object"] {
            let d = desired(&format!(
                "[[desired.rule]]\nkeys = \"a\"\ntype = \"{value_type}\"\nmax_length = 0"
            ));
            assert_eq!(d.rules[0].max_length, Some(0));
        }
    }

    #[test]
    fn desired_rule_enum_is_a_non_empty_list_of_settable_values() {
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\nenum = []",
            "desired.rule[1].enum",
        );
        assert_eq!(
            message,
            "expected at least one allowed value, found an empty array"
        );
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\nenum = \"eco\"",
            "desired.rule[1].enum",
        );
        assert_eq!(
            message,
            "expected an array of the allowed values, found a string \"eco\""
        );
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\nenum = [\"x\", 1979-05-27]",
            "desired.rule[1].enum",
        );
        assert_eq!(
            message,
            "item 2: the datetime 1979-05-27 has no JSON form; write it as a string, \
             \"1979-05-27\""
        );
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\nenum = [1, [nan]]",
            "desired.rule[1].enum",
        );
        assert_eq!(
            message,
            "item 2: NaN has no JSON form (expected a finite number)"
        );
        // Values the rest of the rule refuses.
        let found = problems(&plain(
            "",
            "[[desired.rule]]\nkeys = \"a\"\ntype = \"integer\"\nmax = 10\n\
             enum = [1, \"2\", 2.5, 11]",
        ));
        assert_eq!(
            found.iter().map(|p| p.message.as_str()).collect::<Vec<_>>(),
            [
                "item 2 can never be set, the rest of this rule refuses it: expected an \
                 integer, found a string",
                "item 3 can never be set, the rest of this rule refuses it: expected an \
                 integer, found the number 2.5 (it has a fractional part)",
                "item 4 can never be set, the rest of this rule refuses it: 11 is above the \
                 maximum 10",
            ]
        );
        assert_eq!(keys(&found), ["desired.rule[1].enum"; 3], "{found:#?}");
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\nmax_length = 3\nenum = [\"abcd\"]",
            "desired.rule[1].enum",
        );
        assert!(
            message.ends_with("string of 4 characters is longer than 3"),
            "{message}"
        );
    }

    #[test]
    fn desired_rule_nullable_is_a_boolean() {
        assert!(desired("[[desired.rule]]\nkeys = \"a\"").rules[0].nullable);
        assert!(!desired("[[desired.rule]]\nkeys = \"a\"\nnullable = false").rules[0].nullable);
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"a\"\nnullable = \"no\"",
            "desired.rule[1].nullable",
        );
        assert_eq!(message, "expected true or false, found a string \"no\"");
    }

    #[test]
    fn desired_rules_are_validated_in_turn_and_named_by_their_number() {
        let mut text = String::new();
        for i in 1..=11 {
            let extra = match i {
                2 => "max = \"x\"\n",
                5 => "type = \"str\"\n",
                10 => "bogus = 1\nmin = 2\nmax = 1\n",
                _ => "",
            };
            text.push_str(&format!("[[desired.rule]]\nkeys = \"k{i}\"\n{extra}"));
        }
        // Problems from both stages, in file order (rule 10 after rule 2, the unknown key
        // after the known ones).
        let found = problems(&plain(
            "",
            &format!("[[desired.conflict]]\nkeys = \"a\"\n{text}"),
        ));
        assert_eq!(
            keys(&found),
            [
                "desired.rule[2].max",
                "desired.rule[5].type",
                "desired.rule[10].max",
                "desired.rule[10].bogus",
                "desired.conflict[1].policy",
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn desired_entries_that_are_never_used_are_reported() {
        let message = desired_problem(
            "[[desired.rule]]\nkeys = \"led.*\"\n[[desired.rule]]\nkeys = \"a\"\n\
             [[desired.rule]]\nkeys = \"led.*\"\ntype = \"string\"",
            "desired.rule[3].keys",
        );
        assert_eq!(
            message,
            "this entry is never used: desired.rule[1] (keys = \"led.*\") has the same keys and \
             comes first (the first match wins)"
        );
        let message = desired_problem(
            "[[desired.handler]]\nkeys = \"**\"\ntype = \"watch\"\n\
             [[desired.handler]]\nkeys = \"a\"\ntype = \"watch\"",
            "desired.handler[2].keys",
        );
        assert!(message.contains("matches every key"), "{message}");
        let message = desired_problem(
            "[[desired.conflict]]\nkeys = \"a\"\npolicy = \"device-wins\"\n\
             [[desired.conflict]]\nkeys = \"a\"\npolicy = \"cloud-wins\"",
            "desired.conflict[2].keys",
        );
        assert!(message.contains("desired.conflict[1]"), "{message}");
        // A catch-all last is the usual way to end a list.
        desired("[[desired.rule]]\nkeys = \"a\"\n[[desired.rule]]\nkeys = \"*\"");
    }

    #[test]
    fn desired_conflict_policy_is_required_and_checked() {
        let message = desired_problem(
            "[[desired.conflict]]\nkeys = \"a\"",
            "desired.conflict[1].policy",
        );
        assert_eq!(
            message,
            "missing required key; expected \"cloud-wins\", \"device-wins\", \
             \"last-write-wins\" or \"merge\""
        );
        let message = desired_problem(
            "[[desired.conflict]]\nkeys = \"a\"\npolicy = \"cloud_wins\"",
            "desired.conflict[1].policy",
        );
        assert!(
            message.ends_with("(did you mean \"cloud-wins\"?)"),
            "{message}"
        );
        desired_problem(
            "[[desired.conflict]]\npolicy = \"merge\"\ncommand = [\"m\"]",
            "desired.conflict[1].keys",
        );
    }

    #[test]
    fn desired_conflict_command_and_timeout_go_with_merge_only() {
        let message = desired_problem(
            "[[desired.conflict]]\nkeys = \"a\"\npolicy = \"merge\"",
            "desired.conflict[1].command",
        );
        assert!(message.starts_with("missing required key; expected the merge program"));
        let found = problems(&plain(
            "",
            "[[desired.conflict]]\nkeys = \"a\"\npolicy = \"device-wins\"\n\
             command = [\"/bin/m\"]\ntimeout = \"1s\"",
        ));
        assert_eq!(
            keys(&found),
            ["desired.conflict[1].command", "desired.conflict[1].timeout"],
            "{found:#?}"
        );
        assert_eq!(
            found[0].message,
            "is only used with policy = \"merge\", but desired.conflict[1].policy = \
             \"device-wins\"; remove it"
        );
        let message = desired_problem(
            "[[desired.conflict]]\nkeys = \"a\"\npolicy = \"merge\"\ncommand = [\"m\"]\n\
             timeout = \"50ms\"",
            "desired.conflict[1].timeout",
        );
        assert_eq!(message, "expected a duration from 100ms to 1h, found 50ms");
        // The merge timeout defaults to desired.handler_timeout.
        let d = desired(
            "[desired]\nhandler_timeout = \"7s\"\n\
             [[desired.conflict]]\nkeys = \"a\"\npolicy = \"merge\"\ncommand = [\"m\"]",
        );
        assert_eq!(
            d.conflicts[0].policy,
            Policy::Merge {
                argv: vec!["m".to_owned()],
                timeout: Duration::from_secs(7)
            }
        );
    }

    #[test]
    fn commands_are_a_program_and_its_arguments() {
        for (command, message) in [
            (
                "[]",
                "expected a program and its arguments such as [\"/usr/local/bin/apply\", \
                 \"{key}\"], found an empty array",
            ),
            (
                "[\"\"]",
                "expected a program and its arguments such as [\"/usr/local/bin/apply\", \
                 \"{key}\"], found an empty program name",
            ),
            (
                "[\"bin/merge\"]",
                "expected the program as an absolute path or a bare name looked up in PATH, \
                 found the relative path \"bin/merge\"",
            ),
            (
                "[\"./merge\"]",
                "expected the program as an absolute path or a bare name looked up in PATH, \
                 found the relative path \"./merge\"",
            ),
            (
                "[\"/bin/m\", \"a\\u0000b\"]",
                "expected a program and its arguments such as [\"/usr/local/bin/apply\", \
                 \"{key}\"], found NUL in item 2",
            ),
            (
                "[\"/bin/m\", 5]",
                "expected an array of strings such as [\"/usr/bin/prog\", \"--flag\"], found \
                 an array whose item 2 is an integer 5",
            ),
            (
                "\"/bin/m --flag\"",
                "expected an array of strings such as [\"/usr/bin/prog\", \"--flag\"], found a \
                 string \"/bin/m --flag\"",
            ),
        ] {
            let found = desired_problem(
                &format!(
                    "[[desired.conflict]]\nkeys = \"a\"\npolicy = \"merge\"\ncommand = {command}"
                ),
                "desired.conflict[1].command",
            );
            assert_eq!(found, message, "{command}");
            let found = desired_problem(
                &format!("[[desired.handler]]\nkeys = \"a\"\ntype = \"exec\"\ncommand = {command}"),
                "desired.handler[1].command",
            );
            assert_eq!(found, message, "{command}");
        }
        // Empty arguments after the program are allowed.
        let d =
            desired("[[desired.handler]]\nkeys = \"a\"\ntype = \"exec\"\ncommand = [\"p\", \"\"]");
        assert!(matches!(&d.handlers[0].kind, HandlerKind::Exec { argv, .. } if argv.len() == 2));
    }

    #[test]
    fn desired_handler_type_is_required_and_checked() {
        let message = desired_problem(
            "[[desired.handler]]\nkeys = \"a\"",
            "desired.handler[1].type",
        );
        assert!(
            message.starts_with("missing required key; expected \"exec\""),
            "{message}"
        );
        let message = desired_problem(
            "[[desired.handler]]\nkeys = \"a\"\ntype = \"exe\"",
            "desired.handler[1].type",
        );
        assert_eq!(
            message,
            "expected \"exec\" or \"file\" or \"watch\", found \"exe\" (did you mean \"exec\"?)"
        );
    }

    #[test]
    fn desired_handler_keys_must_belong_to_its_type() {
        let found = problems(&plain(
            "",
            "[[desired.handler]]\nkeys = \"a\"\ntype = \"exec\"\ncommand = [\"p\"]\n\
             path = \"/x\"\ndeadline = \"1s\"\n\
             [[desired.handler]]\nkeys = \"b\"\ntype = \"file\"\npath = \"/x\"\ntimeout = \"1s\"\n\
             [[desired.handler]]\nkeys = \"c\"\ntype = \"watch\"\ncommand = [\"p\"]",
        ));
        assert_eq!(
            keys(&found),
            [
                "desired.handler[1].path",
                "desired.handler[1].deadline",
                "desired.handler[2].timeout",
                "desired.handler[3].command",
            ],
            "{found:#?}"
        );
        assert_eq!(
            found[0].message,
            "is not used by a handler of type = \"exec\" (it takes command and timeout); path is \
             for type = \"file\""
        );
        assert_eq!(
            found[2].message,
            "is not used by a handler of type = \"file\" (it takes path); timeout is for type = \
             \"exec\""
        );
        assert_eq!(
            found[3].message,
            "is not used by a handler of type = \"watch\" (it takes deadline); command is for \
             type = \"exec\""
        );
    }

    #[test]
    fn desired_exec_handler_needs_a_command_and_takes_a_timeout() {
        let message = desired_problem(
            "[[desired.handler]]\nkeys = \"a\"\ntype = \"exec\"",
            "desired.handler[1].command",
        );
        assert!(message.starts_with("missing required key; expected the program"));
        let message = desired_problem(
            "[[desired.handler]]\nkeys = \"a\"\ntype = \"exec\"\ncommand = [\"p\"]\ntimeout = \"2h\"",
            "desired.handler[1].timeout",
        );
        assert_eq!(message, "expected a duration from 100ms to 1h, found 7200s");
    }

    #[test]
    fn desired_file_handler_path_is_checked() {
        let message = desired_problem(
            "[[desired.handler]]\nkeys = \"a\"\ntype = \"file\"",
            "desired.handler[1].path",
        );
        assert!(message.starts_with("missing required key; expected the file to write"));
        for (path, message) in [
            ("", "expected a path, found an empty string"),
            (
                "/var/lib/app/",
                "expected the path of a file, found the directory \"/var/lib/app/\" (e.g. use \
                 \"/var/lib/app/{key}.json\")",
            ),
            (
                "/var/lib/{value}.json",
                "only the placeholder {key} is replaced in a path, found \"{value}\" in \
                 \"/var/lib/{value}.json\"",
            ),
            (
                "/var/lib/{key.json",
                "only the placeholder {key} is replaced in a path, found \"{\" in \
                 \"/var/lib/{key.json\"",
            ),
            (
                "/var/lib/a}.json",
                "only the placeholder {key} is replaced in a path, found \"}\" in \
                 \"/var/lib/a}.json\"",
            ),
        ] {
            let found = desired_problem(
                &format!("[[desired.handler]]\nkeys = \"a\"\ntype = \"file\"\npath = {path:?}"),
                "desired.handler[1].path",
            );
            assert_eq!(found, message, "{path:?}");
        }
        // A glob that can match several keys needs {key} in the path.
        let message = desired_problem(
            "[[desired.handler]]\nkeys = \"led.*\"\ntype = \"file\"\npath = \"/run/led.json\"",
            "desired.handler[1].path",
        );
        assert!(
            message
                .starts_with("keys = \"led.*\" can match several keys, but the path has no {key}"),
            "{message}"
        );
        let d = desired(
            "[[desired.handler]]\nkeys = \"led?\"\ntype = \"file\"\npath = \"/run/{key}/{key}.json\"",
        );
        assert_eq!(
            d.handlers[0].kind,
            HandlerKind::File {
                path: PathBuf::from("/run/{key}/{key}.json")
            }
        );
    }

    #[test]
    fn desired_watch_deadline_defaults_to_the_handler_timeout() {
        let d = desired(
            "[desired]\nhandler_timeout = \"250ms\"\n\
             [[desired.handler]]\nkeys = \"a\"\ntype = \"watch\"\n\
             [[desired.handler]]\nkeys = \"b\"\ntype = \"exec\"\ncommand = [\"p\"]",
        );
        assert_eq!(
            d.handlers[0].kind,
            HandlerKind::Watch {
                deadline: Duration::from_millis(250)
            }
        );
        assert_eq!(
            d.handlers[1].kind,
            HandlerKind::Exec {
                argv: vec!["p".to_owned()],
                timeout: Duration::from_millis(250)
            }
        );
        let message = desired_problem(
            "[[desired.handler]]\nkeys = \"a\"\ntype = \"watch\"\ndeadline = \"0\"",
            "desired.handler[1].deadline",
        );
        assert_eq!(message, "expected a duration from 100ms to 1h, found 0ns");
    }

    #[test]
    fn desired_problems_are_all_reported_even_with_a_bad_handler_timeout() {
        let found = problems(&plain(
            "",
            "[desired]\nhandler_timeout = \"forever\"\nunknown_keys = 1\n\
             [[desired.rule]]\nkeys = \"a\"\ntype = \"text\"\n\
             [[desired.conflict]]\nkeys = \"a\"\npolicy = \"merge\"\n\
             [[desired.handler]]\nkeys = \"a\"\ntype = \"exec\"\ncommand = [\"p\"]\n\
             [[desired.handler]]\nkeys = \"b\"\ntype = \"watch\"\ndeadline = \"5h\"",
        ));
        assert_eq!(
            keys(&found),
            [
                "desired.unknown_keys",
                "desired.handler_timeout",
                "desired.rule[1].type",
                "desired.conflict[1].command",
                "desired.handler[2].deadline",
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn syntax_error_in_an_array_of_tables_names_the_entry() {
        let text = plain(
            "",
            "[[desired.rule]]\nkeys = \"a\"\n\n[[desired.rule]]\nkeys = \"b\"\nmin = 5x\n",
        );
        let found = problems(&text);
        assert_eq!(keys(&found), ["desired.rule[2].min"], "{found:#?}");
        assert!(found[0].message.starts_with("TOML syntax error at line"));
        let found = problems(&plain(
            "",
            "[[desired.rule]]\nkeys = \"a\"\n[[ desired.handler ]]\ntype = exec\n",
        ));
        assert_eq!(keys(&found), ["desired.handler[1].type"], "{found:#?}");
    }

    // --- the report ------------------------------------------------------------------------

    #[test]
    fn every_problem_is_reported_together() {
        let text = "[device]\nid = \"bad id\"\n\
                    [mqtt]\nurl = \"mqtt://b\"\nkeepalive = \"30s\"\ncert = \"/nonexistent/d.pem\"\n\
                    [store]\nmax_bytes = \"lots\"\nwhen_full = \"never\"\n\
                    [sync]\nbatch_max_changes = \"10\"\nbatch_max_bytes = \"1KiB\"\nlinger = \"1 fortnight\"\n\
                    [local]\nsocket = \"rel.sock\"\n\
                    [log]\nlevel = \"\"\n\
                    [desired]\nmax_depth = 0\n\
                    [[desired.rule]]\nkeys = \"a b\"\n\
                    [[desired.handler]]\nkeys = \"a\"\ntype = \"exec\"\npath = \"/x\"\n";
        let problems = problems(text);
        assert_eq!(
            keys(&problems),
            [
                "device.id",
                "mqtt.url",
                "mqtt.cert",
                "mqtt.keepalive",
                "store.max_bytes",
                "store.when_full",
                "sync.batch_max_changes",
                "sync.batch_max_bytes",
                "sync.linger",
                "local.socket",
                "log.level",
                "desired.max_depth",
                "desired.rule[1].keys",
                "desired.handler[1].command",
                "desired.handler[1].path",
            ],
            "{problems:#?}"
        );
    }

    #[test]
    fn report_prints_one_line_per_problem_with_file_and_key() {
        let errors = parse("[device]\nid = \"a b\"\n[mqtt]\nurl = \"mqtt://b\"\n").unwrap_err();
        assert_eq!(errors.file, Path::new(FILE));
        let shown = errors.to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 2, "{shown}");
        assert!(lines[0].starts_with("/test/edgesync.toml: device.id: expected 1-64"));
        assert_eq!(
            lines[1],
            "/test/edgesync.toml: mqtt.url: \"mqtt://\" is plaintext; set \
             mqtt.allow_plaintext = true to allow it, or use mqtts://"
        );
    }

    #[test]
    fn unreadable_file_is_a_file_level_problem() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("missing.toml");
        let errors = Config::load(&file).unwrap_err();
        assert_eq!(keys(&errors.problems), [""]);
        assert_eq!(
            errors.to_string(),
            format!(
                "{}: cannot read: No such file or directory (os error 2)",
                file.display()
            )
        );
    }

    #[test]
    fn file_that_is_not_utf8_is_a_file_level_problem() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("e.toml");
        std::fs::write(&file, b"[device]\nid = \"\xff\"\n").unwrap();
        let errors = Config::load(&file).unwrap_err();
        assert_eq!(keys(&errors.problems), [""]);
        assert!(errors.problems[0].message.contains("not UTF-8"), "{errors}");
    }

    #[test]
    fn syntax_error_reports_line_column_and_key() {
        let text = "[device]\nid = \"d\"\n\n[mqtt]\nurl = \"mqtts://b\"\nkeep_alive = 30s\n";
        let found = problems(text);
        assert_eq!(keys(&found), ["mqtt.keep_alive"], "{found:#?}");
        assert!(
            found[0]
                .message
                .starts_with("TOML syntax error at line 6, column "),
            "{found:#?}"
        );

        let found = problems("[device\nid = 1\n");
        assert_eq!(keys(&found), [""], "{found:#?}");
        assert!(found[0].message.contains("line 1"), "{found:#?}");

        let found = problems("[device]\nid = \"a\"\nid = \"b\"\n");
        assert_eq!(keys(&found), ["device.id"], "{found:#?}");
        assert!(found[0].message.contains("line 3"), "{found:#?}");
    }

    // --- durations and sizes ---------------------------------------------------------------

    #[test]
    fn local_timeouts_have_defaults_and_bounds() {
        let base = "[device]\nid = \"d\"\n[mqtt]\nurl = \"mqtts://h:8883\"\nca = \"/dev/null\"\n";
        let c = Config::from_toml_str(Path::new("/etc/edgesync/e.toml"), base).unwrap();
        assert_eq!(c.local.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(c.local.client_timeout, DEFAULT_CLIENT_TIMEOUT);
        let text = format!("{base}[local]\nidle_timeout = \"2s\"\nclient_timeout = \"500ms\"\n");
        let c = Config::from_toml_str(Path::new("/etc/edgesync/e.toml"), &text).unwrap();
        assert_eq!(c.local.idle_timeout, Duration::from_secs(2));
        assert_eq!(c.local.client_timeout, Duration::from_millis(500));
        let text = format!("{base}[local]\nidle_timeout = \"500ms\"\nclient_timeout = \"2h\"\n");
        let e = Config::from_toml_str(Path::new("/etc/edgesync/e.toml"), &text).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("local.idle_timeout") && e.contains("from 1s to 1d"),
            "{e}"
        );
        assert!(e.contains("local.client_timeout"), "{e}");
    }

    #[test]
    fn parse_duration_accepts_whole_numbers_with_units() {
        for (text, expected) in [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("0ms", Duration::ZERO),
            ("250ms", Duration::from_millis(250)),
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("2d", Duration::from_secs(2 * 86400)),
            (" 30 s ", Duration::from_secs(30)),
            ("007s", Duration::from_secs(7)),
        ] {
            assert_eq!(parse_duration(text), Ok(expected), "{text:?}");
        }
    }

    #[test]
    fn parse_duration_rejects_junk_negative_fractions_and_overflow() {
        for text in [
            "",
            " ",
            "30",
            "s",
            "-5s",
            "+5s",
            "1.5s",
            "30sec",
            "30S",
            "5 m 3s",
            "1m30s",
            "ms",
            "99999999999999999999s",
            "18446744073709551615d",
            "213503982334602d",
        ] {
            assert!(parse_duration(text).is_err(), "{text:?} was accepted");
        }
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        assert!(parse_duration("1.5s").unwrap_err().contains("whole number"));
        assert!(
            parse_duration("213503982334602d")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn parse_size_accepts_binary_and_decimal_units() {
        for (text, expected) in [
            ("0", 0),
            ("512", 512),
            ("100B", 100),
            ("64KiB", 64 * 1024),
            ("256MiB", 256 * 1024 * 1024),
            ("1GiB", 1 << 30),
            ("2TiB", 2 << 40),
            ("64KB", 64_000),
            ("256MB", 256_000_000),
            ("1GB", 1_000_000_000),
            ("3TB", 3_000_000_000_000),
            ("64kib", 64 * 1024),
            (" 1 MiB ", 1 << 20),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_size(text), Ok(expected), "{text:?}");
        }
    }

    #[test]
    fn parse_size_rejects_junk_negative_fractions_and_overflow() {
        for text in [
            "",
            "KiB",
            "-1",
            "-1KiB",
            "1.5MiB",
            "64K",
            "64Kb ps",
            "lots",
            "1 2 KiB",
            "18446744073709551616",
            "16777216TiB",
            "0x10",
        ] {
            assert!(parse_size(text).is_err(), "{text:?} was accepted");
        }
        assert!(parse_size("16777216TiB").unwrap_err().contains("too large"));
    }

    #[test]
    fn sizes_are_shown_with_their_unit_and_in_bytes() {
        assert_eq!(fmt_size(65536), "64KiB (65536 bytes)");
        assert_eq!(fmt_size(3 * GIB), "3GiB (3221225472 bytes)");
        assert_eq!(fmt_size(1000), "1000 bytes");
        assert_eq!(fmt_size(0), "0 bytes");
    }

    #[test]
    fn store_location_is_read_leniently() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[mqtt]\nca = 5\n[store]\npath = \"s/q.redb\"\nmax_bytes = \"2MiB\"\n",
        )
        .unwrap();
        assert_eq!(
            store_location(&file),
            (dir.path().join("s/q.redb"), 2 * MIB)
        );
        std::fs::write(
            &file,
            "[store]\npath = \"/abs/q.redb\"\nmax_bytes = 1048576\n",
        )
        .unwrap();
        assert_eq!(store_location(&file), (PathBuf::from("/abs/q.redb"), MIB));
        std::fs::write(&file, "not toml [").unwrap();
        assert_eq!(
            store_location(&file),
            (PathBuf::from(DEFAULT_STORE_PATH), DEFAULT_MAX_BYTES)
        );
    }

    // --- [telemetry] --------------------------------------------------------------------------

    #[test]
    fn telemetry_defaults_to_every_minute_without_a_text_file() {
        let c = valid(&plain("", ""));
        assert_eq!(c.telemetry, TelemetryConfig::default());
        assert_eq!(c.telemetry.interval, Some(Duration::from_secs(60)));
        assert_eq!(c.telemetry.textfile, None);
    }

    #[test]
    fn telemetry_interval_zero_is_off_and_others_are_bounded() {
        let c = valid(&plain("", "[telemetry]\ninterval = \"0\""));
        assert_eq!(c.telemetry.interval, None);
        let c = valid(&plain("", "[telemetry]\ninterval = \"1s\""));
        assert_eq!(c.telemetry.interval, Some(Duration::from_secs(1)));
        for bad in ["\"500ms\"", "\"2d\"", "\"soon\"", "5"] {
            let text = plain("", &format!("[telemetry]\ninterval = {bad}"));
            let message = only_problem(&text, "telemetry.interval");
            assert!(!message.is_empty(), "{bad}");
        }
        let message = only_problem(
            &plain("", "[telemetry]\ninterval = \"999ms\""),
            "telemetry.interval",
        );
        assert!(message.contains("\"0\" (off)"), "{message}");
    }

    #[test]
    fn telemetry_textfile_is_a_prom_file_resolved_against_the_config_dir() {
        let c = valid(&plain(
            "",
            "[telemetry]\ntextfile = \"metrics/edgesync.prom\"",
        ));
        assert_eq!(
            c.telemetry.textfile,
            Some(PathBuf::from("/test/metrics/edgesync.prom"))
        );
        let c = valid(&plain(
            "",
            "[telemetry]\ntextfile = \"/var/lib/node_exporter/edgesync.prom\"",
        ));
        assert_eq!(
            c.telemetry.textfile,
            Some(PathBuf::from("/var/lib/node_exporter/edgesync.prom"))
        );
        let message = only_problem(
            &plain("", "[telemetry]\ntextfile = \"/tmp/edgesync.txt\""),
            "telemetry.textfile",
        );
        assert!(message.contains(".prom"), "{message}");
        let message = only_problem(
            &plain("", "[telemetry]\ntextfile = \"/tmp/\""),
            "telemetry.textfile",
        );
        assert!(message.contains("directory"), "{message}");
        only_problem(
            &plain("", "[telemetry]\ntextfile = \"\""),
            "telemetry.textfile",
        );
        let message = only_problem(
            &plain("", "[telemetry]\ninterval = \"1s\"\ntext_file = \"x.prom\""),
            "telemetry.text_file",
        );
        assert!(message.contains("did you mean \"textfile\""), "{message}");
    }

    // --- [control] ----------------------------------------------------------------------------

    #[test]
    fn control_defaults_allow_every_non_destructive_command() {
        let c = valid(&plain("", ""));
        assert_eq!(c.control, ControlConfig::default());
        let allowed: Vec<&str> = c.control.allow.iter().map(|n| n.as_str()).collect();
        assert_eq!(
            allowed,
            [
                "ping",
                "status",
                "sync",
                "history",
                "rollback",
                "log-level",
                "config",
                "reload"
            ]
        );
        assert_eq!(c.control.replay_window, Duration::from_secs(86_400));
        assert_eq!(c.control.replay_max, 10_000);
        assert_eq!(
            valid(&plain("", "[control]")).control,
            ControlConfig::default()
        );
    }

    #[test]
    fn control_allow_lists_exactly_what_runs_and_purge_only_when_listed() {
        let c = valid(&plain(
            "",
            "[control]\nallow = [\"ping\", \"purge\"]\nreplay_window = \"1h\"\nreplay_max = 5",
        ));
        assert_eq!(
            c.control.allow.iter().copied().collect::<Vec<_>>(),
            [CommandName::Ping, CommandName::Purge]
        );
        assert_eq!(c.control.replay_window, Duration::from_secs(3600));
        assert_eq!(c.control.replay_max, 5);
        let c = valid(&plain("", "[control]\nallow = []"));
        assert!(c.control.allow.is_empty());
    }

    #[test]
    fn control_problems_are_reported() {
        let message = only_problem(
            &plain("", "[control]\nallow = [\"ping\", \"pruge\"]"),
            "control.allow",
        );
        assert!(message.contains("unknown command \"pruge\""), "{message}");
        assert!(message.contains("did you mean \"purge\""), "{message}");
        let message = only_problem(
            &plain("", "[control]\nallow = [\"ping\", \"ping\"]"),
            "control.allow",
        );
        assert!(message.contains("twice"), "{message}");
        let message = only_problem(&plain("", "[control]\nallow = \"ping\""), "control.allow");
        assert!(message.contains("an array of names"), "{message}");
        let message = only_problem(&plain("", "[control]\nallow = [1]"), "control.allow");
        assert!(message.contains("item 1 is an integer"), "{message}");
        for bad in ["\"30s\"", "\"31d\"", "\"soon\"", "5"] {
            let text = plain("", &format!("[control]\nreplay_window = {bad}"));
            only_problem(&text, "control.replay_window");
        }
        for bad in ["0", "-1", "1000001", "\"10\""] {
            let text = plain("", &format!("[control]\nreplay_max = {bad}"));
            only_problem(&text, "control.replay_max");
        }
        let message = only_problem(&plain("", "[control]\nallows = []"), "control.allows");
        assert!(message.contains("did you mean \"allow\""), "{message}");
    }

    // --- the shipped example files ---------------------------------------------------------

    #[test]
    fn example_config_is_valid_apart_from_the_missing_certificate_files() {
        let errors = Config::from_toml_str(Path::new(DEFAULT_CONFIG_PATH), EXAMPLE).unwrap_err();
        assert_eq!(
            keys(&errors.problems),
            ["mqtt.ca", "mqtt.cert", "mqtt.key"],
            "{errors}"
        );
        for problem in &errors.problems {
            assert!(
                problem.message.starts_with("cannot read \"/etc/edgesync/"),
                "{problem:?}"
            );
        }
    }

    #[test]
    fn example_config_loads_when_its_certificate_files_exist_and_states_the_defaults() {
        let dir = tls_dir();
        let text = EXAMPLE.replace("/etc/edgesync/", &format!("{}/", dir.path().display()));
        let example = valid(&text);
        let defaults =
            valid(&tls_config("").replace("ca.pem", &format!("{}/ca.pem", dir.path().display())));
        assert_eq!(
            example.mqtt.url.to_string(),
            "mqtts://broker.example.com:8883"
        );
        assert_eq!(example.mqtt.topic_prefix, defaults.mqtt.topic_prefix);
        assert_eq!(example.mqtt.keep_alive, defaults.mqtt.keep_alive);
        assert_eq!(example.mqtt.allow_plaintext, defaults.mqtt.allow_plaintext);
        assert_eq!(
            format!("{:?}", example.store),
            format!("{:?}", defaults.store)
        );
        assert_eq!(
            format!("{:?}", example.sync),
            format!("{:?}", defaults.sync)
        );
        assert_eq!(
            format!("{:?}", example.local),
            format!("{:?}", defaults.local)
        );
        assert_eq!(format!("{:?}", example.log), format!("{:?}", defaults.log));
        assert_eq!(example.telemetry, defaults.telemetry);
        assert_eq!(example.control, defaults.control);
        assert_eq!(example.control, ControlConfig::default());
        assert_eq!(example.desired, defaults.desired);
        assert_eq!(example.desired, DesiredConfig::default());
    }

    /// The example with its commented-out keys (`# key = value`) and arrays of tables
    /// (`# [[desired.rule]]`) put into effect.
    fn uncommented_example() -> String {
        EXAMPLE
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|rest| {
                        let table = rest.starts_with("[[") && rest.ends_with("]]");
                        table
                            || rest.split_once(" = ").is_some_and(|(key, _)| {
                                key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                            })
                    })
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn example_config_documents_every_key() {
        for (section, keys) in SECTIONS {
            assert!(
                EXAMPLE.lines().any(|l| l == format!("[{section}]")),
                "[{section}] is missing"
            );
            for key in *keys {
                if SUBTABLES.iter().any(|t| t.0 == *section && t.1 == *key) {
                    continue;
                }
                let set = format!("{key} = ");
                let commented = format!("# {key} = ");
                assert!(
                    EXAMPLE
                        .lines()
                        .any(|l| l.starts_with(&set) || l.starts_with(&commented)),
                    "{section}.{key} is missing from the example"
                );
            }
        }
        // Every array of tables has commented examples that use every one of its keys.
        for (section, table, keys) in SUBTABLES {
            let header = format!("# [[{section}.{table}]]");
            assert!(EXAMPLE.lines().any(|l| l == header), "{header} is missing");
            let mut in_table = false;
            let mut used = Vec::new();
            for line in EXAMPLE.lines() {
                if line.starts_with("# [[") || line.starts_with('[') {
                    in_table = line == header;
                } else if in_table
                    && let Some((key, _)) =
                        line.strip_prefix("# ").and_then(|l| l.split_once(" = "))
                {
                    used.push(key);
                }
            }
            for key in *keys {
                assert!(
                    used.contains(key),
                    "{key} of [[{section}.{table}]] is missing from the example"
                );
                // And it is described (in the list above the examples).
                assert!(
                    EXAMPLE
                        .lines()
                        .any(|l| l.strip_prefix("#   ").is_some_and(|l| {
                            let names = l.split("  ").next().unwrap_or_default();
                            names.split(", ").any(|name| name == *key)
                        })),
                    "{key} of [[{section}.{table}]] is not described in the example"
                );
            }
        }
        // The commented-out keys and tables are valid too.
        let uncommented = uncommented_example();
        let errors =
            Config::from_toml_str(Path::new(DEFAULT_CONFIG_PATH), &uncommented).unwrap_err();
        assert_eq!(
            keys(&errors.problems),
            ["mqtt.ca", "mqtt.cert", "mqtt.key", "mqtt.password_file"],
            "{errors}"
        );
        // And they mean what they say.
        let dir = tls_dir();
        std::fs::write(dir.path().join("mqtt-password"), "secret").unwrap();
        private(&dir.path().join("mqtt-password"));
        let text = uncommented
            .replace("/etc/edgesync/", &format!("{}/", dir.path().display()))
            .replace("# username = ", "username = ");
        let desired = valid(&text).desired;
        let defaults = DesiredConfig::default();
        assert_eq!(
            (
                desired.max_document_bytes,
                desired.max_depth,
                desired.unknown_keys,
                desired.history,
                desired.concurrency,
                desired.handler_timeout
            ),
            (
                defaults.max_document_bytes,
                defaults.max_depth,
                defaults.unknown_keys,
                defaults.history,
                defaults.concurrency,
                defaults.handler_timeout
            )
        );
        assert_eq!(desired.rules.len(), 3);
        assert_eq!(desired.conflicts.len(), 3);
        assert!(matches!(
            desired.conflicts[1].policy,
            Policy::Merge { ref argv, timeout } if argv.len() == 2 && timeout == Duration::from_secs(5)
        ));
        let kinds: Vec<&HandlerKind> = desired.handlers.iter().map(|h| &h.kind).collect();
        assert!(matches!(
            kinds[..],
            [
                HandlerKind::Exec { .. },
                HandlerKind::File { .. },
                HandlerKind::Watch { .. }
            ]
        ));
    }

    #[test]
    fn dev_config_is_valid_when_its_certificate_files_exist() {
        let repo = tempfile::tempdir().unwrap();
        let config_dir = repo.path().join("config");
        let certs = repo.path().join("target/dev-certs");
        std::fs::create_dir_all(&config_dir).unwrap();
        std::fs::create_dir_all(&certs).unwrap();
        for name in ["ca.pem", "device.pem", "device.key"] {
            std::fs::write(certs.join(name), "x").unwrap();
        }
        private(&certs.join("device.key"));
        let file = config_dir.join("dev.toml");
        std::fs::write(&file, DEV).unwrap();
        let config = Config::load(&file).unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(config.device.id.as_str(), "dev-0001");
        assert_eq!(config.mqtt.url.to_string(), "mqtts://localhost:8883");
        assert_eq!(
            config.mqtt.ca,
            Some(config_dir.join("../target/dev-certs/ca.pem"))
        );
        assert_eq!(
            config.store.path,
            config_dir.join("../target/dev/edgesync.redb")
        );
        assert_eq!(config.local.socket, Path::new("/tmp/edgesync-dev.sock"));
    }

    #[test]
    fn dev_config_without_certificate_files_reports_only_those() {
        let errors =
            Config::from_toml_str(Path::new("/nonexistent-edgesync-repo/config/dev.toml"), DEV)
                .unwrap_err();
        assert_eq!(
            keys(&errors.problems),
            ["mqtt.ca", "mqtt.cert", "mqtt.key"],
            "{errors}"
        );
        assert!(
            errors.problems[0]
                .message
                .contains("/nonexistent-edgesync-repo/config/../target/dev-certs/ca.pem")
        );
    }

    #[test]
    fn raw_structs_mirror_the_file_format() {
        // The serde derive and the field-by-field collector read the same file the same way.
        let by_serde: RawConfig = toml::from_str(EXAMPLE).unwrap();
        let root: Table = toml::from_str(EXAMPLE).unwrap();
        let mut p = Problems::default();
        let collected = RawConfig::collect(&root, &mut p);
        assert!(p.0.is_empty(), "{p:?}");
        assert_eq!(by_serde, collected);
        assert_eq!(
            by_serde.store.and_then(|s| s.max_bytes),
            Some(RawSize::Text("256MiB".to_owned()))
        );
        let sized: RawStore = toml::from_str("max_bytes = 1048576").unwrap();
        assert_eq!(sized.max_bytes, Some(RawSize::Bytes(1_048_576)));
        // Both refuse unknown keys.
        assert!(toml::from_str::<RawConfig>("[mqtt]\nkeepalive = \"1s\"").is_err());
        assert!(toml::from_str::<RawConfig>("[contrl]").is_err());
        assert!(toml::from_str::<RawConfig>("[[desired.rule]]\nkey = \"a\"").is_err());
        // Also with every array of tables and every key of [desired] in use.
        let uncommented = uncommented_example();
        let by_serde: RawConfig = toml::from_str(&uncommented).unwrap();
        let root: Table = toml::from_str(&uncommented).unwrap();
        let mut p = Problems::default();
        let collected = RawConfig::collect(&root, &mut p);
        assert!(p.0.is_empty(), "{p:?}");
        assert_eq!(by_serde, collected);
        let desired = collected.desired.unwrap();
        assert_eq!(desired.max_depth, Some(16));
        assert_eq!(desired.rule.as_ref().map(Vec::len), Some(3));
        assert_eq!(desired.conflict.as_ref().map(Vec::len), Some(3));
        assert_eq!(desired.handler.as_ref().map(Vec::len), Some(3));
        let rule = &desired.rule.unwrap()[0];
        assert_eq!(rule.kind.as_deref(), Some("number"));
        assert_eq!(rule.min, Some(RawNumber::Integer(5)));
        assert_eq!(rule.max, Some(RawNumber::Float(30.5)));
    }

    // --- socket_path, resolve_path ---------------------------------------------------------

    #[test]
    fn socket_path_reads_the_socket_and_ignores_every_other_problem() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("e.toml");
        std::fs::write(
            &file,
            "[device]\nid = \"bad id\"\nbogus = 1\n[local]\nsocket = \"/tmp/x.sock\"\nextra = 2\n\
             [desired]\nwhatever = true\n",
        )
        .unwrap();
        assert_eq!(socket_path(&file), Path::new("/tmp/x.sock"));
        assert!(Config::load(&file).is_err());
    }

    #[test]
    fn socket_path_falls_back_to_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let default = Path::new(DEFAULT_SOCKET);
        assert_eq!(socket_path(&dir.path().join("missing.toml")), default);
        assert_eq!(socket_path(dir.path()), default);
        for text in [
            "",
            "[local\nsocket = \"/tmp/x.sock\"",
            "[device]\nid = \"d\"\n",
            "[local]\n",
            "[local]\nsocket = 5\n",
            "[local]\nsocket = \"\"\n",
            "local = \"/tmp/x.sock\"\n",
        ] {
            let file = dir.path().join("e.toml");
            std::fs::write(&file, text).unwrap();
            assert_eq!(socket_path(&file), default, "{text:?}");
        }
    }

    #[test]
    fn config_path_comes_from_the_flag_then_the_environment_then_the_default() {
        let flag = Path::new("/flag.toml");
        let env = || Some(OsString::from("/env.toml"));
        assert_eq!(choose_path(Some(flag), env()), flag);
        assert_eq!(choose_path(None, env()), Path::new("/env.toml"));
        assert_eq!(
            choose_path(None, Some(OsString::new())),
            Path::new(DEFAULT_CONFIG_PATH)
        );
        assert_eq!(choose_path(None, None), Path::new(DEFAULT_CONFIG_PATH));
    }

    #[test]
    fn suggestions_are_within_edit_distance_two() {
        assert_eq!(edit_distance("keepalive", "keep_alive"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(
            suggest("Encodng", &["encoding", "linger"]),
            Some("encoding")
        );
        assert_eq!(suggest("zzz", &["encoding", "linger"]), None);
    }
}
