//! The values of the config file, each parsed on its own: sizes, durations, the device id,
//! the broker URL, the enumerations, and the raw shapes TOML values are read into before
//! they are checked (a [`RawSize`] is a string with a unit or an integer; a [`RawDuration`]
//! is a string). Every function here returns the message for the key it is given; which key
//! that is, and the collecting of every problem, is [`super::validate`]'s business.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use toml::Value;

use crate::model::glob::KeyGlob;
use crate::model::rules::{UnknownKeys, ValueType};
use crate::model::text::{shorten, suggest};

pub(super) const KIB: u64 = 1024;
pub(super) const MIB: u64 = 1024 * KIB;
pub(super) const GIB: u64 = 1024 * MIB;

const DEVICE_ID_MAX: usize = 64;
const TOPIC_PREFIX_MAX: usize = 128;
const CLIENT_ID_MAX: usize = 128;

/// A device id: 1-64 characters of `[A-Za-z0-9_.-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceId(String);

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

/// `store.when_full`: what a report does when the store is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// `"drop-oldest"`: drop the oldest queued changes to make room (counted).
    DropOldest,
    /// `"reject"`: refuse the new report (counted).
    Reject,
}

/// `sync.encoding`: the encoding of reported batches.
pub use crate::model::doc::Encoding;

pub(super) fn is_id_char(c: char) -> bool {
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
    pub(super) fn parse(s: &str) -> Result<Self, String> {
        match s {
            "drop-oldest" => Ok(WhenFull::DropOldest),
            "reject" => Ok(WhenFull::Reject),
            _ => Err(one_of(s, &["drop-oldest", "reject"])),
        }
    }
}

impl Encoding {
    pub(super) fn parse(s: &str) -> Result<Self, String> {
        match s {
            "cbor" => Ok(Encoding::Cbor),
            "json" => Ok(Encoding::Json),
            _ => Err(one_of(s, &["cbor", "json"])),
        }
    }
}

pub(super) fn one_of(found: &str, allowed: &[&str]) -> String {
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
pub(super) fn fmt_size(bytes: u64) -> String {
    for (unit, name) in [(GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{name} ({bytes} bytes)", bytes / unit);
        }
    }
    format!("{bytes} bytes")
}

// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Raw shapes: what one TOML value is read into before it is checked.

/// Conversion of one TOML value to a raw value, with an error saying what was expected and
/// what was found.
pub(super) trait FromValue: Sized {
    fn from_value(value: &Value) -> Result<Self, String>;
}

/// A size as written: a string with a unit, or an integer number of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RawSize {
    Bytes(i64),
    Text(String),
}

/// A duration as written: always a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawDuration(pub(super) String);

/// Names as written: an array of strings (`control.allow`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawNames(pub(super) Vec<String>);

/// A number as written: TOML integers and floats are both numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum RawNumber {
    Integer(i64),
    Float(f64),
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

impl FromValue for RawNames {
    fn from_value(value: &Value) -> Result<Self, String> {
        strings(value, "an array of names such as [\"ping\", \"status\"]").map(RawNames)
    }
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
        strings(
            value,
            "an array of strings such as [\"/usr/bin/prog\", \"--flag\"]",
        )
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

/// An array of strings; `what` says what it holds.
fn strings(value: &Value, what: &str) -> Result<Vec<String>, String> {
    let Value::Array(items) = value else {
        return Err(expected(what, value));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(format!(
                "expected {what}, found an array whose item {} is {}",
                i + 1,
                describe(other)
            )),
        })
        .collect()
}

pub(super) fn expected(what: &str, found: &Value) -> String {
    format!("expected {what}, found {}", describe(found))
}

/// `"a string \"x\""`, `"an integer 5"`, `"a table"`.
pub(super) fn describe(value: &Value) -> String {
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

// ---------------------------------------------------------------------------------------------
// Checked values.

impl RawSize {
    /// The size in bytes within `min..=max`; `why` is appended to the message of a size
    /// below `min` or above `max`.
    pub(super) fn bytes(
        self,
        (min, max): (u64, u64),
        (why_min, why_max): (&str, &str),
    ) -> Result<u64, String> {
        let bytes = match self {
            RawSize::Bytes(n) => u64::try_from(n)
                .map_err(|_| format!("expected a size of zero or more bytes, found {n}"))?,
            RawSize::Text(s) => parse_size(&s)?,
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
}

impl RawDuration {
    /// The duration within `range`; `limits` says the range in the message (`"1s to 1d"`).
    pub(super) fn within(
        &self,
        range: RangeInclusive<Duration>,
        limits: &str,
    ) -> Result<Duration, String> {
        let d = parse_duration(&self.0)?;
        if range.contains(&d) {
            Ok(d)
        } else {
            Err(format!("expected a duration from {limits}, found {d:?}"))
        }
    }

    /// A timeout (handlers, merge programs, watch acks, the CLI's waits): 100ms to 1h.
    pub(super) fn timeout(&self) -> Result<Duration, String> {
        self.within(TIMEOUT_MIN..=TIMEOUT_MAX, "100ms to 1h")
    }
}

/// Timeouts of handlers, merge programs, watch acks and the CLI.
const TIMEOUT_MIN: Duration = Duration::from_millis(100);
const TIMEOUT_MAX: Duration = Duration::from_secs(3600);

/// An integer within `min..=max`.
pub(super) fn count(n: i64, (min, max): (i64, i64)) -> Result<usize, String> {
    match usize::try_from(n) {
        Ok(count) if (min..=max).contains(&n) => Ok(count),
        _ => Err(format!("expected {min} to {max}, found {n}")),
    }
}

/// A path from the file, resolved against the config file's directory.
pub(super) fn resolve(value: &str, dir: &Path) -> Result<PathBuf, String> {
    if value.is_empty() {
        return Err("expected a path, found an empty string".to_owned());
    }
    if value.contains('\0') {
        return Err("expected a path, found a string containing NUL".to_owned());
    }
    let path = Path::new(value);
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    })
}

/// `store.path`: a file (not a directory) whose parent, if it exists, is a directory.
pub(super) fn store_file(path: PathBuf) -> Result<PathBuf, String> {
    if path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/') {
        return Err(format!(
            "expected the path of the store file, found the directory \"{}\" (e.g. use \
             \"{}\")",
            path.display(),
            path.join("edgesync.redb").display()
        ));
    }
    match path.parent() {
        Some(parent) if parent.exists() && !parent.is_dir() => Err(format!(
            "\"{}\" cannot be created: \"{}\" is not a directory",
            path.display(),
            parent.display()
        )),
        _ => Ok(path),
    }
}

/// `local.socket`: absolute, short enough for `sun_path`, not a directory. `example` is the
/// default, shown in messages.
pub(super) fn socket(socket: String, example: &str) -> Result<PathBuf, String> {
    /// `sun_path` holds 108 bytes on Linux (104 on some other systems); keep a margin.
    const SOCKET_PATH_MAX: usize = 100;
    if socket.is_empty() || socket.contains('\0') {
        Err(format!(
            "expected an absolute path such as \"{example}\", found {:?}",
            shorten(&socket)
        ))
    } else if !Path::new(&socket).is_absolute() {
        Err(format!(
            "expected an absolute path such as \"{example}\", found the relative path \
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
    }
}

// ---------------------------------------------------------------------------------------------
// Checks of single keys.

const UNKNOWN_KEYS: &[&str] = &["accept", "reject"];
const VALUE_TYPES: &[&str] = &["bool", "integer", "number", "string", "object", "array"];
/// `telemetry.interval`, when not "0" (off).
const TELEMETRY_INTERVAL_MIN: Duration = Duration::from_secs(1);
const TELEMETRY_INTERVAL_MAX: Duration = Duration::from_secs(86_400);

pub(super) fn check_topic_prefix(prefix: &str) -> Result<String, String> {
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

pub(super) fn check_client_id(id: &str) -> Result<(), String> {
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

pub(super) fn check_username(name: &str) -> Result<(), String> {
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

/// A program and its arguments (exec handlers, merge programs), run without a shell.
pub(super) fn check_command(argv: Vec<String>) -> Result<Vec<String>, String> {
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

/// The path of a file handler: a file (not a directory), `{key}` its only placeholder, and
/// `{key}` present when the glob matches more than one key (else every key would overwrite
/// the same file).
pub(super) fn check_path_template(path: &str, keys: Option<&KeyGlob>) -> Result<String, String> {
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

/// A TOML value as JSON. Datetimes have no JSON form; NaN and infinities neither.
pub(super) fn toml_to_json(value: &Value) -> Result<serde_json::Value, String> {
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

pub(super) fn parse_unknown_keys(s: &str) -> Result<UnknownKeys, String> {
    match s {
        "accept" => Ok(UnknownKeys::Accept),
        "reject" => Ok(UnknownKeys::Reject),
        _ => Err(one_of(s, UNKNOWN_KEYS)),
    }
}

pub(super) fn parse_value_type(s: &str) -> Result<ValueType, String> {
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

/// `telemetry.interval`: "0" is off; otherwise within the limits.
pub(super) fn telemetry_interval(d: Duration, text: &str) -> Result<Option<Duration>, String> {
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
pub(super) fn prom_file(path: PathBuf, text: &str) -> Result<PathBuf, String> {
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

impl RawNumber {
    /// A finite number, as `f64`.
    pub(super) fn finite(self) -> Result<f64, String> {
        match self {
            RawNumber::Integer(i) => Ok(i as f64),
            RawNumber::Float(x) if x.is_finite() => Ok(x),
            RawNumber::Float(x) => Err(format!("expected a finite number, found {x}")),
        }
    }
}
