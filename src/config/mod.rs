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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `"cbor"`
    Cbor,
    /// `"json"`
    Json,
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
mod tests;
