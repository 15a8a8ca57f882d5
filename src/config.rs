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
//! The sections `[desired]`, `[control]` and `[telemetry]` are not part of the format yet:
//! until they are added here, they are reported as unknown.

use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::{Table, Value};

/// Where the daemon and the CLI look for the config file by default (SPEC §2).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/edgesync/edgesync.toml";
/// Environment variable naming the config file when `--config` is not given (SPEC §2).
pub const CONFIG_ENV: &str = "EDGESYNC_CONFIG";
/// Default `local.socket`.
pub const DEFAULT_SOCKET: &str = "/run/edgesync/edgesync.sock";
/// Largest encoded value of one change (SPEC §5).
pub const MAX_VALUE_BYTES: u64 = 64 * 1024;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

// Defaults.
const DEFAULT_TOPIC_PREFIX: &str = "edgesync";
const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
const DEFAULT_STORE_PATH: &str = "/var/lib/edgesync/edgesync.redb";
const DEFAULT_MAX_BYTES: u64 = 256 * MIB;
const DEFAULT_CACHE_SIZE: u64 = 4 * MIB;
const DEFAULT_BATCH_MAX_CHANGES: i64 = 1000;
/// SPEC §3 shows "64KiB" as an example, but that cannot hold a change with a 64 KiB value.
const DEFAULT_BATCH_MAX_BYTES: u64 = 256 * KIB;
const DEFAULT_LINGER: Duration = Duration::ZERO;
const DEFAULT_MAX_INFLIGHT: i64 = 8;
const DEFAULT_LOG_LEVEL: &str = "info";

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

const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

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
}

/// `[log]` (extension section).
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// A `tracing_subscriber::EnvFilter` directive, default `"info"`.
    pub level: String,
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
        Self::from_toml_str(path, &text)
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

    /// Whether a problem was already reported for `key` or for one of its parent sections.
    fn mentions(&self, key: &str) -> bool {
        self.0.iter().any(|p| {
            p.key == key
                || key
                    .strip_prefix(p.key.as_str())
                    .is_some_and(|rest| rest.starts_with('.'))
        })
    }
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

/// Keep quoted input in messages readable.
fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let mut short: String = s.chars().take(MAX).collect();
        short.push('…');
        short
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

/// Declares a raw section struct (every field optional, `deny_unknown_fields`), its key list
/// and its field-by-field collector from a `toml::Table`.
macro_rules! raw_section {
    ($(#[$meta:meta])* struct $name:ident = $section:literal { $($field:ident: $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            $($field: Option<$ty>,)*
        }

        impl $name {
            const KEYS: &[&str] = &[$(stringify!($field)),*];

            fn collect(table: &Table, p: &mut Problems) -> Self {
                $name {
                    $($field: take(table, $section, stringify!($field), p),)*
                }
            }
        }
    };
}

raw_section! {
    /// `[device]`
    struct RawDevice = "device" {
        id: String,
    }
}

raw_section! {
    /// `[mqtt]`
    struct RawMqtt = "mqtt" {
        url: String,
        topic_prefix: String,
        ca: String,
        cert: String,
        key: String,
        keep_alive: RawDuration,
        client_id: String,
        username: String,
        password_file: String,
        allow_plaintext: bool,
    }
}

raw_section! {
    /// `[store]`
    struct RawStore = "store" {
        path: String,
        max_bytes: RawSize,
        when_full: String,
        cache_size: RawSize,
    }
}

raw_section! {
    /// `[sync]`
    struct RawSync = "sync" {
        encoding: String,
        batch_max_changes: i64,
        batch_max_bytes: RawSize,
        linger: RawDuration,
        max_inflight: i64,
    }
}

raw_section! {
    /// `[local]`
    struct RawLocal = "local" {
        socket: String,
    }
}

raw_section! {
    /// `[log]`
    struct RawLog = "log" {
        level: String,
    }
}

/// The whole file, as written.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    device: Option<RawDevice>,
    mqtt: Option<RawMqtt>,
    store: Option<RawStore>,
    sync: Option<RawSync>,
    local: Option<RawLocal>,
    log: Option<RawLog>,
}

/// The known sections and their keys, in file order.
const SECTIONS: &[(&str, &[&str])] = &[
    ("device", RawDevice::KEYS),
    ("mqtt", RawMqtt::KEYS),
    ("store", RawStore::KEYS),
    ("sync", RawSync::KEYS),
    ("local", RawLocal::KEYS),
    ("log", RawLog::KEYS),
];

impl RawConfig {
    /// Report every unknown section and key, then convert every known key on its own.
    fn collect(root: &Table, p: &mut Problems) -> RawConfig {
        report_unknown(root, p);
        RawConfig {
            device: section(root, "device", p).map(|t| RawDevice::collect(t, p)),
            mqtt: section(root, "mqtt", p).map(|t| RawMqtt::collect(t, p)),
            store: section(root, "store", p).map(|t| RawStore::collect(t, p)),
            sync: section(root, "sync", p).map(|t| RawSync::collect(t, p)),
            local: section(root, "local", p).map(|t| RawLocal::collect(t, p)),
            log: section(root, "log", p).map(|t| RawLog::collect(t, p)),
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
                let hint = match SECTIONS.iter().find(|(_, keys)| keys.contains(&name.as_str())) {
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

/// The candidate closest to `word` if it is within edit distance 2 (ignoring case).
fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word = word.to_lowercase();
    candidates
        .iter()
        .map(|candidate| (edit_distance(&word, &candidate.to_lowercase()), *candidate))
        .filter(|&(distance, _)| distance <= 2)
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitute.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
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
    let header = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .and_then(|l| l.trim_start_matches('[').split(']').next())
        .map(str::trim)
        .filter(|h| !h.is_empty());
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
    Some(Config {
        source: source.to_path_buf(),
        device: device?,
        mqtt: mqtt?,
        store: store?,
        sync: sync?,
        local: local?,
        log: log?,
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
    if tls == Some(true) && raw.ca.is_none() && !p.mentions("mqtt.ca") {
        p.push(
            "mqtt.ca",
            "missing; mqtts:// needs a PEM CA bundle to verify the broker's certificate, e.g. \
             ca = \"/etc/edgesync/ca.pem\"",
        );
    }
    match (&raw.cert, &raw.key) {
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
                    "expected a duration from 5s to 65535s, found {:?}",
                    d
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

    let client_id = match raw.client_id {
        Some(id) => check(p, "mqtt.client_id", check_client_id(&id).map(|()| id)),
        // Defaults to the device id, which is already known to be valid (or reported).
        None => device.map(|d| d.as_str().to_owned()),
    };

    let has_username = raw.username.is_some();
    let username = match raw.username {
        Some(name) => check(p, "mqtt.username", check_username(&name).map(|()| Some(name))),
        None => Some(None),
    };
    let password_file = readable_file(
        p,
        "mqtt.password_file",
        raw.password_file.as_deref(),
        dir,
        true,
    );
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

/// A size from the file (string with unit, or integer bytes) within `min..=max`.
fn size_value(
    raw: Option<RawSize>,
    default: u64,
    (min, max): (u64, u64),
    why: &str,
) -> Result<u64, String> {
    let bytes = match raw {
        None => default,
        Some(RawSize::Bytes(n)) => u64::try_from(n)
            .map_err(|_| format!("expected a size of zero or more bytes, found {n}"))?,
        Some(RawSize::Text(s)) => parse_size(&s)?,
    };
    if bytes < min {
        Err(format!(
            "expected at least {}{why}, found {}",
            fmt_size(min),
            fmt_size(bytes)
        ))
    } else if bytes > max {
        Err(format!(
            "expected at most {}{why}, found {}",
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
        size_value(raw.max_bytes, DEFAULT_MAX_BYTES, (STORE_MIN_BYTES, u64::MAX), ""),
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
        size_value(raw.cache_size, DEFAULT_CACHE_SIZE, (CACHE_MIN, CACHE_MAX), ""),
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
            " (a batch must hold the largest change the agent accepts: a 64KiB value plus \
             its key and the envelope; and at most 256MiB, the MQTT packet limit)",
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
    let socket = check(p, "local.socket", result)?;
    Some(LocalConfig { socket })
}

fn validate_log(raw: RawLog, p: &mut Problems) -> Option<LogConfig> {
    let level = raw.level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
    let level = check(p, "log.level", check_log_level(&level).map(|()| level))?;
    Some(LogConfig { level })
}

/// A level, or comma-separated `target=level` directives (a subset of `EnvFilter` syntax).
fn check_log_level(filter: &str) -> Result<(), String> {
    const FORM: &str = "expected a level (trace, debug, info, warn, error, off) or \
                        directives such as \"info,edgesync=debug\"";
    if filter.is_empty() {
        return Err(format!("{FORM}, found an empty string"));
    }
    if let Some(c) = filter
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '=' | ',' | ':' | '.' | '-')))
    {
        return Err(format!(
            "{FORM}, found {:?} ({c:?} is not allowed)",
            shorten(filter)
        ));
    }
    for directive in filter.split(',') {
        let (target, level) = match directive.split_once('=') {
            Some((target, level)) => (Some(target), level),
            None => (None, directive),
        };
        if directive.is_empty() || target.is_some_and(str::is_empty) || level.contains('=') {
            return Err(format!(
                "{FORM}, found {:?} (bad directive {directive:?})",
                shorten(filter)
            ));
        }
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            let hint = match suggest(level, LOG_LEVELS) {
                Some(near) => format!("; did you mean {near:?}?"),
                None => String::new(),
            };
            return Err(format!(
                "{FORM}, found {:?} ({level:?} is not a level{hint})",
                shorten(filter)
            ));
        }
    }
    Ok(())
}

