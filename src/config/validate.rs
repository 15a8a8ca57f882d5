//! From a `toml::Table` to a [`Config`], collecting every problem on the way.
//!
//! 1. **Raw.** The table is walked against the known sections and keys (every unknown one is
//!    reported with its dotted path and, when one is close, a did-you-mean); then every known
//!    key is read on its own into a [`Field`] of its section's raw struct, so that one value of
//!    the wrong type does not hide the next one. One macro declares each raw struct together
//!    with its key list: the field is the key, named once, and every later problem of that
//!    key is reported through the field (its dotted name, `desired.rule[2].max`, comes along).
//! 2. **Validated.** Each section turns its fields into typed values (see [`super::values`]),
//!    applies the defaults of the section's `Default` impl, checks ranges and the rules that
//!    involve several keys, and checks that the files it names can be read.
//!
//! Every step records its problems in [`Problems`] and goes on; a [`Config`] is built only
//! when every part of it could be.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use toml::{Table, Value};

use super::cloud::{
    AWS_KEEP_ALIVE, AWS_MAX_PAYLOAD, AWS_SHADOW_MAX, AWS_SHADOWS_MAX, AWS_THING_MAX,
    AZURE_API_VERSION, AZURE_KEEP_ALIVE, AZURE_MAX_PAYLOAD, AwsConfig, AzureConfig,
    DEFAULT_METRICS_TOPIC, DEFAULT_PRESENCE_TOPIC, DEFAULT_TELEMETRY_TOPIC, PROFILES, ShadowMap,
    aws_topic, check_api_version, check_aws_name, check_hub,
};
use super::values::{
    BrokerUrl, DeviceId, Encoding, FromValue, GIB, KIB, MIB, RawDuration, RawNames, RawNumber,
    RawSize, WhenFull, check_client_id, check_command, check_path_template, check_topic_prefix,
    check_username, count, describe, expected, is_id_char, one_of, parse_duration,
    parse_unknown_keys, parse_value_type, prom_file, resolve, socket, store_file,
    telemetry_interval, toml_to_json,
};
use super::{
    Compression, Config, ConflictRule, ControlConfig, DEFAULT_CLASS_PRIORITY, DEFAULT_KEEP_ALIVE,
    DEFAULT_RECONNECT_INITIAL, DEFAULT_RECONNECT_MAX, DEFAULT_RECONNECT_RESET, DEFAULT_SOCKET,
    DEFAULT_STORE_PATH, DEFAULT_TOPIC_PREFIX, DesiredConfig, DeviceConfig, Handler, HandlerKind,
    LocalConfig, LogConfig, MAX_VALUE_BYTES, MqttConfig, Policy, Problem, ReconnectJitter,
    STORE_CLASSES_MAX, StoreClass, StoreConfig, SyncConfig, TelemetryConfig, UrlOrder,
};
use super::{DEFAULT_SOURCE_INFLIGHT, MAX_SOURCES, SourceConfig, SourceUrl};
use crate::model::command::CommandName;
use crate::model::glob::KeyGlob;
use crate::model::rules::{self, Rule, UnknownKeys, ValueType};
use crate::model::source;
use crate::model::text::{shorten, suggest};
use crate::sys::log::check_log_level;

/// Most entries of each of `[[desired.rule]]`, `[[desired.conflict]]`, `[[desired.handler]]`:
/// every key of every document is matched against them in order.
const DESIRED_TABLES_MAX: usize = 1000;
const POLICIES: &[&str] = &["cloud-wins", "device-wins", "last-write-wins", "merge"];
/// Most entries of `mqtt.urls`: the nodes of one cluster.
const MQTT_URLS_MAX: usize = 16;
const HANDLER_TYPES: &[&str] = &["exec", "file", "watch"];

// ---------------------------------------------------------------------------------------------
// The accumulator.

/// A problem list being collected.
#[derive(Debug, Default)]
pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(super) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Put the problems in the order of the file format: file-level ones first, then the known
    /// sections and their keys in documented order (unknown keys after the known ones), then
    /// unknown sections. Stable: problems of one key keep their order.
    pub(super) fn sort(&mut self) {
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

/// One key of the file: its dotted name and its value when it is set with the right TOML type
/// (a value of a wrong type is reported when it is read, and leaves the field unset). Every
/// problem of the key is reported through its field.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Field<T> {
    pub(super) key: String,
    pub(super) value: Option<T>,
}

impl<T: Clone> Field<T> {
    /// Read `table[name]`; `at` is the dotted name of the table.
    #[inline(never)]
    fn read(table: &Table, at: &str, name: &str, p: &mut Problems) -> Self
    where
        T: FromValue,
    {
        let key = format!("{at}.{name}");
        let value = table
            .get(name)
            .and_then(|value| T::from_value(value).map_err(|m| p.push(&key, m)).ok());
        Field { key, value }
    }

    fn is_set(&self) -> bool {
        self.value.is_some()
    }

    fn report(&self, p: &mut Problems, message: impl Into<String>) {
        p.push(self.key.as_str(), message);
    }

    /// `Ok` as is; `Err(message)` reported.
    fn check<U>(&self, p: &mut Problems, result: Result<U, String>) -> Option<U> {
        result.map_err(|message| self.report(p, message)).ok()
    }

    /// Report `message` unless a problem was already reported for the key (a value of the
    /// wrong type is not also "missing").
    fn missing(&self, p: &mut Problems, message: impl Into<String>) {
        if !p.mentions(&self.key) {
            self.report(p, message);
        }
    }

    /// A required value, checked by `f`; `what` says what is expected when it is missing.
    fn require<U>(
        &self,
        p: &mut Problems,
        what: &str,
        f: impl FnOnce(T) -> Result<U, String>,
    ) -> Option<U> {
        match self.value.clone() {
            None => {
                self.missing(p, format!("missing required key; expected {what}"));
                None
            }
            Some(value) => self.check(p, f(value)),
        }
    }

    /// The value checked by `f`, or `default` when the key is not set.
    fn or<U>(
        &self,
        p: &mut Problems,
        default: U,
        f: impl FnOnce(T) -> Result<U, String>,
    ) -> Option<U> {
        match self.value.clone() {
            None => Some(default),
            Some(value) => self.check(p, f(value)),
        }
    }

    /// The value, or `default` when the key is not set, checked by `f`.
    fn or_checked<U>(
        &self,
        p: &mut Problems,
        default: T,
        f: impl FnOnce(T) -> Result<U, String>,
    ) -> Option<U> {
        self.check(p, f(self.value.clone().unwrap_or(default)))
    }

    /// An optional value checked by `f`: `Some(None)` when not set, `None` after a problem.
    fn map<U>(
        &self,
        p: &mut Problems,
        f: impl FnOnce(T) -> Result<U, String>,
    ) -> Option<Option<U>> {
        match self.value.clone() {
            None => Some(None),
            Some(value) => self.check(p, f(value)).map(Some),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stage 1: the raw file.

/// A table of the file as a raw struct: its keys, in documented order, and its
/// field-by-field collector (`at` is the dotted name of the table, for messages).
pub(super) trait RawTable: Sized {
    const KEYS: &'static [&'static str];

    fn collect(table: &Table, at: &str, p: &mut Problems) -> Self;

    /// The table when the file does not have it: every key unset.
    fn empty(at: &str) -> Self {
        Self::collect(&Table::new(), at, &mut Problems::default())
    }
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

/// Declares a raw table struct (one [`Field`] per key), its key list and its field-by-field
/// collector from a `toml::Table`. `field as "key": Type` reads the TOML key `key`; the fields
/// after `tables` are arrays of tables (`[[section.field]]`).
macro_rules! raw_section {
    (
        $(#[$meta:meta])*
        struct $name:ident {
            $($field:ident $(as $key:literal)?: $ty:ty),* $(,)?
        }
        $(tables { $($table:ident: $table_ty:ty),* $(,)? })?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub(super) struct $name {
            $(pub(super) $field: Field<$ty>,)*
            $($(pub(super) $table: Field<Vec<$table_ty>>,)*)?
        }

        impl RawTable for $name {
            const KEYS: &'static [&'static str] =
                &[$(key_name!($field $($key)?)),* $($(, stringify!($table))*)?];

            #[inline(never)]
            fn collect(table: &Table, at: &str, p: &mut Problems) -> Self {
                $name {
                    $($field: Field::read(table, at, key_name!($field $($key)?), p),)*
                    $($($table: take_tables(table, at, stringify!($table), p),)*)?
                }
            }
        }
    };
}

/// Read the array of tables `table[key]` (`[[section.key]]`) if present. Every entry is
/// checked for unknown keys and read on its own, named `section.key[n]` (from 1); an entry
/// that is not a table is reported and kept as an empty entry, so that the entries after it
/// keep their numbers.
fn take_tables<T: RawTable>(
    table: &Table,
    section: &str,
    key: &str,
    p: &mut Problems,
) -> Field<Vec<T>> {
    let mut entries = Vec::new();
    let (name, present) = take_entries(table, section, key, T::KEYS, p, &mut |fields, entry, p| {
        entries.push(match fields {
            Some(fields) => T::collect(fields, entry, p),
            None => T::empty(entry),
        })
    });
    Field {
        key: name,
        value: present.then_some(entries),
    }
}

/// The part of [`take_tables`] that does not depend on the entry type: checks
/// `table[key]`, reports its problems and hands each entry to `entry` (its fields, or `None`
/// when it is not a table, and its name). Returns the dotted name of the array and whether it
/// is an array.
fn take_entries(
    table: &Table,
    section: &str,
    key: &str,
    keys: &[&str],
    p: &mut Problems,
    entry: &mut dyn FnMut(Option<&Table>, &str, &mut Problems),
) -> (String, bool) {
    let name = format!("{section}.{key}");
    let Some(value) = table.get(key) else {
        return (name, false);
    };
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
        return (name, false);
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
    for (i, item) in items.iter().enumerate() {
        let at = format!("{name}[{}]", i + 1);
        match item {
            Value::Table(fields) => {
                for field in fields.keys().filter(|f| !keys.contains(&f.as_str())) {
                    p.push(
                        format!("{at}.{field}"),
                        unknown_table_key(&name, field, keys),
                    );
                }
                entry(Some(fields), &at, p)
            }
            other => {
                p.push(at.as_str(), expected(&format!("a table [[{name}]]"), other));
                entry(None, &at, p)
            }
        }
    }
    (name, true)
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
        reconnect_jitter: String,
        client_id: String,
        username: String,
        password_file: String,
        allow_plaintext: bool,
        retain: bool,
        urls: Vec<String>,
        url_order: String,
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
    tables {
        class: RawClass,
    }
}

raw_section! {
    /// `[[store.class]]`
    struct RawClass {
        name: String,
        keys: String,
        priority: i64,
        ttl: RawDuration,
        deadband: RawNumber,
        dedupe: bool,
        max_interval: RawDuration,
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
        compression: String,
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
    /// `[cloud]`
    struct RawCloud {
        profile: String,
    }
}

raw_section! {
    /// `[aws]`
    struct RawAws {
        thing: String,
        shadow: String,
        telemetry_topic: String,
        presence_topic: String,
        metrics_topic: String,
        nested: bool,
    }
    tables {
        shadow_map: RawShadowMap,
    }
}

raw_section! {
    /// `[azure]`
    struct RawAzure {
        hub: String,
        api_version: String,
    }
}

raw_section! {
    /// `[[aws.shadow_map]]`
    struct RawShadowMap {
        keys: Vec<String>,
        shadow: String,
    }
}

raw_section! {
    /// `[[source.mqtt]]`
    struct RawSourceMqtt {
        url: String,
        filter: String,
        key: String,
        value: String,
        client_id: String,
        qos: i64,
        max_inflight: i64,
        keep_alive: RawDuration,
        username: String,
        password_file: String,
    }
}

/// `[source]`: only arrays of tables (the macro needs a key).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawSource {
    pub(super) mqtt: Field<Vec<RawSourceMqtt>>,
}

impl RawTable for RawSource {
    const KEYS: &'static [&'static str] = &["mqtt"];

    fn collect(table: &Table, at: &str, p: &mut Problems) -> Self {
        RawSource {
            mqtt: take_tables(table, at, "mqtt", p),
        }
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

/// The whole file, as written. A section that is not in the file (or is not a table) is read
/// as an empty one; `mqtt` is `None` then, as it is required.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RawConfig {
    pub(super) device: RawDevice,
    pub(super) mqtt: Option<RawMqtt>,
    pub(super) store: RawStore,
    pub(super) sync: RawSync,
    pub(super) local: RawLocal,
    pub(super) log: RawLog,
    pub(super) telemetry: RawTelemetry,
    pub(super) desired: RawDesired,
    pub(super) control: RawControl,
    pub(super) cloud: RawCloud,
    pub(super) aws: Option<RawAws>,
    pub(super) azure: Option<RawAzure>,
    pub(super) source: RawSource,
}

/// The known sections and their keys, in file order.
pub(super) const SECTIONS: &[(&str, &[&str])] = &[
    ("device", RawDevice::KEYS),
    ("mqtt", RawMqtt::KEYS),
    ("store", RawStore::KEYS),
    ("sync", RawSync::KEYS),
    ("local", RawLocal::KEYS),
    ("log", RawLog::KEYS),
    ("telemetry", RawTelemetry::KEYS),
    ("desired", RawDesired::KEYS),
    ("control", RawControl::KEYS),
    ("cloud", RawCloud::KEYS),
    ("aws", RawAws::KEYS),
    ("azure", RawAzure::KEYS),
    ("source", RawSource::KEYS),
];

/// The known arrays of tables: section, key, and the keys of one entry.
pub(super) const SUBTABLES: &[(&str, &str, &[&str])] = &[
    ("store", "class", RawClass::KEYS),
    ("desired", "rule", RawRule::KEYS),
    ("desired", "conflict", RawConflict::KEYS),
    ("desired", "handler", RawHandler::KEYS),
    ("aws", "shadow_map", RawShadowMap::KEYS),
    ("source", "mqtt", RawSourceMqtt::KEYS),
];

impl RawConfig {
    /// Report every unknown section and key, then read every known key on its own.
    pub(super) fn collect(root: &Table, p: &mut Problems) -> RawConfig {
        fn section<T: RawTable>(root: &Table, name: &str, p: &mut Problems) -> Option<T> {
            match root.get(name)? {
                Value::Table(table) => Some(T::collect(table, name, p)),
                other => {
                    p.push(name, expected(&format!("a table [{name}]"), other));
                    None
                }
            }
        }
        fn known<T: RawTable>(root: &Table, name: &str, p: &mut Problems) -> T {
            section(root, name, p).unwrap_or_else(|| T::empty(name))
        }
        report_unknown(root, p);
        RawConfig {
            device: known(root, "device", p),
            mqtt: section(root, "mqtt", p),
            store: known(root, "store", p),
            sync: known(root, "sync", p),
            local: known(root, "local", p),
            log: known(root, "log", p),
            telemetry: known(root, "telemetry", p),
            desired: known(root, "desired", p),
            control: known(root, "control", p),
            cloud: known(root, "cloud", p),
            aws: section(root, "aws", p),
            azure: section(root, "azure", p),
            source: known(root, "source", p),
        }
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
pub(super) fn syntax_problem(text: &str, err: &toml::de::Error) -> Problem {
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

pub(super) fn validate(source: &Path, raw: &RawConfig, p: &mut Problems) -> Option<Config> {
    let dir = source.parent().unwrap_or(Path::new(""));
    let device = device(&raw.device, p);
    let mqtt = mqtt(raw.mqtt.as_ref(), device.as_ref().map(|d| &d.id), dir, p);
    let store = store(&raw.store, dir, p);
    let sync = sync(&raw.sync, p);
    let local = local(&raw.local, p);
    let log = log(&raw.log, p);
    let desired = desired(&raw.desired, dir, p);
    let telemetry = telemetry(&raw.telemetry, dir, p);
    let control = control(&raw.control, p);
    let (aws, azure) = cloud(raw, device.as_ref(), p).unzip();
    let mut sync = sync;
    let mut mqtt = mqtt;
    // The cloud's own limits: (profile, largest batch, keep-alive range, whose, its message
    // limit).
    let limits = match raw.cloud.profile.value.as_deref() {
        Some("aws-iot") => Some((
            "aws-iot",
            AWS_MAX_PAYLOAD,
            AWS_KEEP_ALIVE,
            "AWS IoT Core",
            "128 KB",
        )),
        Some("azure-iot-hub") => Some((
            "azure-iot-hub",
            AZURE_MAX_PAYLOAD,
            AZURE_KEEP_ALIVE,
            "Azure IoT Hub",
            "256 KB, properties included",
        )),
        _ => None,
    };
    if let (Some((name, max, _, whose, kb)), Some(s)) = (&limits, &mut sync) {
        let max = *max;
        // The change history batch must fit in one message of the cloud.
        match raw.sync.batch_max_bytes.value {
            None => s.batch_max_bytes = s.batch_max_bytes.min(max),
            Some(_) if s.batch_max_bytes > max => raw.sync.batch_max_bytes.report(
                p,
                format!(
                    "expected at most {max} bytes with [cloud] profile = \"{name}\" \
                     ({whose} takes messages of at most {kb}), found {} bytes",
                    s.batch_max_bytes
                ),
            ),
            Some(_) => {}
        }
    }
    if let (Some((name, _, range, whose, _)), Some(m), Some(r)) = (&limits, &mqtt, &raw.mqtt)
        && !range.contains(&m.keep_alive)
    {
        r.keep_alive.report(
            p,
            format!(
                "expected {}s to {}s with [cloud] profile = \"{name}\" ({whose}'s \
                 keep-alive range), found {}s",
                range.start().as_secs(),
                range.end().as_secs(),
                m.keep_alive.as_secs()
            ),
        );
    }
    // IoT Hub: the client id is the device id, the user name made from [azure].
    if let (Some(Some(a)), Some(m), Some(r)) = (&azure, &mut mqtt, &raw.mqtt) {
        if m.client_id != a.device {
            r.client_id.report(
                p,
                format!(
                    "must be the device id ({:?}) with [cloud] profile = \"azure-iot-hub\"; \
                     remove it",
                    a.device
                ),
            );
        }
        let user = a.username();
        match &m.username {
            Some(u) if *u != user => r.username.report(
                p,
                format!("is set by [cloud] profile = \"azure-iot-hub\" to {user:?}; remove it"),
            ),
            _ => m.username = Some(user),
        }
    }
    let sources = sources(&raw.source, dir, device.as_ref(), p);
    let config = Config {
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
        aws: aws?,
        azure: azure?,
        sources: sources?,
    };
    loop_guard(&config, &raw.source, p);
    Some(config)
}

/// `[[source.mqtt]]`.
fn sources(
    raw: &RawSource,
    dir: &Path,
    device: Option<&DeviceConfig>,
    p: &mut Problems,
) -> Option<Vec<SourceConfig>> {
    let before = p.0.len();
    let entries = raw.mqtt.value.as_deref().unwrap_or_default();
    if entries.len() > MAX_SOURCES {
        let m = format!(
            "expected at most {MAX_SOURCES} [[source.mqtt]] tables, found {}",
            entries.len()
        );
        raw.mqtt.report(p, m);
    }
    let mut out = Vec::new();
    for (i, r) in entries.iter().enumerate() {
        let url = r.url.require(
            p,
            "the local broker, mqtt://127.0.0.1:1883 or unix:///run/mosquitto/mosquitto.sock",
            |u| source_url(&u),
        );
        let filter = r
            .filter
            .require(p, "an MQTT topic filter, such as \"sensors/#\"", |f| {
                source::check_filter(&f).map(|()| f)
            });
        let what = "a key template, such as \"{2}.temperature\"";
        let key = match &filter {
            Some(f) => r
                .key
                .require(p, what, |k| source::KeyTemplate::parse(&k, f)),
            None => {
                if !r.key.is_set() {
                    r.key
                        .missing(p, format!("missing required key; expected {what}"));
                }
                None
            }
        };
        let value = r.value.or(p, source::ValueRule::Payload, |v| {
            source::ValueRule::parse(&v)
        });
        let default_id = device.map(|d| format!("{}-source-{}", d.id.as_str(), i + 1));
        let client_id = r
            .client_id
            .map(p, |id| check_client_id(&id).map(|()| id))
            .and_then(|id| id.or(default_id));
        if let Some(id) = &client_id
            && out.iter().any(|o: &SourceConfig| o.client_id == *id)
        {
            r.client_id.report(
                p,
                format!("{id:?} is the client id of an earlier source; each needs its own session"),
            );
        }
        let qos = r.qos.or(p, 1, |q| match q {
            0 | 1 => Ok(q as u8),
            q => Err(format!("expected 0 or 1, found {q}")),
        });
        let max_inflight = r
            .max_inflight
            .or(p, DEFAULT_SOURCE_INFLIGHT, |n| count(n, (1, 65_535)));
        let keep_alive = r.keep_alive.or(p, DEFAULT_KEEP_ALIVE, |d| {
            d.within(
                Duration::from_secs(5)..=Duration::from_secs(65535),
                "5s to 65535s",
            )
        });
        let username = r.username.map(p, |n| check_username(&n).map(|()| n));
        let password_file = readable_file(p, &r.password_file, dir, true);
        if let Some(Some(path)) = &password_file {
            private_file(p, &r.password_file, path, "a password file");
        }
        if r.password_file.is_set() && !r.username.is_set() {
            r.password_file
                .report(p, "is set without username; a password needs a user name");
        }
        let entry = (|| {
            Some(SourceConfig {
                url: url?,
                filter: filter?,
                key: key?,
                value: value?,
                client_id: client_id?,
                qos: qos?,
                max_inflight: max_inflight?,
                keep_alive: keep_alive?,
                username: username?,
                password_file: password_file?,
            })
        })();
        out.extend(entry);
    }
    (p.0.len() == before).then_some(out)
}

/// `source.mqtt.url`: plain TCP to a loopback address, or a Unix socket.
fn source_url(u: &str) -> Result<SourceUrl, String> {
    if let Some(path) = u
        .strip_prefix("unix://")
        .or_else(|| u.strip_prefix("unix:"))
    {
        // A Unix socket path holds at most 107 bytes.
        if !path.starts_with('/') || path.len() > 107 || path.contains('\0') {
            return Err(format!(
                "expected unix:///absolute/path (at most 107 bytes), found {:?}",
                shorten(u)
            ));
        }
        return Ok(SourceUrl::Unix(path.into()));
    }
    let url: BrokerUrl = u.parse().map_err(|e: String| {
        e.replace(
            "mqtts://host[:port] (or mqtt://host[:port] with mqtt.allow_plaintext = true)",
            "mqtt://127.0.0.1:PORT or unix:///path",
        )
    })?;
    let host = url.host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    if url.tls || !loopback {
        return Err(format!(
            "expected mqtt:// to a loopback address (127.0.0.1, ::1, localhost) or unix:///path, \
             found {:?}: a local source is plain MQTT on this machine only",
            shorten(u)
        ));
    }
    Ok(SourceUrl::Tcp {
        host: host.to_owned(),
        port: url.port,
    })
}

/// The loop guard (docs/PROTOCOL.md §7.1): a source on the cloud broker itself must not
/// subscribe to a topic the agent uses there.
fn loop_guard(c: &Config, raw: &RawSource, p: &mut Problems) {
    let entries = raw.mqtt.value.as_deref().unwrap_or_default();
    let own = c.own_filters();
    for (s, r) in c.sources.iter().zip(entries) {
        let SourceUrl::Tcp { host, port } = &s.url else {
            continue;
        };
        let cloud = &c.mqtt.url;
        let lo = |h: &str| {
            h.eq_ignore_ascii_case("localhost")
                || h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.is_loopback())
        };
        let same_host = host.eq_ignore_ascii_case(&cloud.host) || (lo(host) && lo(&cloud.host));
        if *port != cloud.port || !same_host {
            continue;
        }
        if let Some(o) = own.iter().find(|o| source::overlap(&s.filter, o)) {
            r.filter.report(
                p,
                format!(
                    "{:?} can match the agent's own topic {o:?} on the cloud broker (mqtt.url is \
                     the same broker): the agent would take its own messages in again (a loop); \
                     narrow the filter",
                    s.filter
                ),
            );
        }
    }
}

/// `[cloud]`, `[aws]` and `[azure]`: `(None, None)` for the `edgesync` profile. A cloud's
/// section is checked with any profile (so a prepared section is ready), and used only with
/// its own profile.
#[allow(clippy::type_complexity)]
fn cloud(
    raw: &RawConfig,
    device: Option<&DeviceConfig>,
    p: &mut Problems,
) -> Option<(
    Option<std::sync::Arc<AwsConfig>>,
    Option<std::sync::Arc<AzureConfig>>,
)> {
    let profile = raw.cloud.profile.or(p, 0, |s| match s.as_str() {
        "edgesync" => Ok(0),
        "aws-iot" => Ok(1),
        "azure-iot-hub" => Ok(2),
        other => Err(one_of(other, PROFILES)),
    });
    let empty = RawAws::empty("aws");
    let aws = match (&raw.aws, profile) {
        (None, Some(0 | 2)) => None,
        (a, _) => Some(aws(a.as_ref().unwrap_or(&empty), device, p)),
    };
    let empty = RawAzure::empty("azure");
    let azure = match (&raw.azure, profile) {
        (None, p) if p != Some(2) => None,
        (a, profile) => Some(azure(
            a.as_ref().unwrap_or(&empty),
            device,
            profile == Some(2),
            p,
        )),
    };
    match profile? {
        1 => Some((Some(std::sync::Arc::new(aws.flatten()?)), None)),
        2 => Some((None, Some(std::sync::Arc::new(azure.flatten()?)))),
        _ => Some((None, None)),
    }
}

/// `[azure]`; `hub` is required only when the profile is used.
fn azure(
    raw: &RawAzure,
    device: Option<&DeviceConfig>,
    used: bool,
    p: &mut Problems,
) -> Option<AzureConfig> {
    let before = p.0.len();
    let hub = raw.hub.value.clone().unwrap_or_default();
    if !raw.hub.is_set() {
        if !used {
            return None;
        }
        raw.hub.missing(
            p,
            "missing required key; expected the IoT hub's host name, such as \
             \"my-hub.azure-devices.net\"",
        );
    } else if let Err(e) = check_hub(&hub) {
        raw.hub.report(p, e);
    }
    let api_version = raw
        .api_version
        .value
        .clone()
        .unwrap_or_else(|| AZURE_API_VERSION.to_owned());
    if let Err(e) = check_api_version(&api_version) {
        raw.api_version.report(p, e);
    }
    let c = AzureConfig {
        hub,
        device: device?.id.as_str().to_owned(),
        api_version,
    };
    (p.0.len() == before).then_some(c)
}

fn aws(raw: &RawAws, device: Option<&DeviceConfig>, p: &mut Problems) -> Option<AwsConfig> {
    // Written out (not through the generic `Field` helpers): each instantiation costs code.
    let before = p.0.len();
    let thing = raw
        .thing
        .value
        .clone()
        .or_else(|| device.map(|d| d.id.as_str().to_owned()))?;
    if let Err(e) = check_aws_name(&thing, AWS_THING_MAX, "thing name") {
        let hint = if raw.thing.is_set() {
            ""
        } else {
            " (device.id; set aws.thing)"
        };
        raw.thing.report(p, format!("{e}{hint}"));
    }
    let name = |f: &Field<String>, s: &str, p: &mut Problems| {
        if !s.is_empty()
            && let Err(e) = check_aws_name(s, AWS_SHADOW_MAX, "shadow name")
        {
            f.report(p, e);
        }
    };
    let shadow = raw.shadow.value.clone().unwrap_or_default();
    name(&raw.shadow, &shadow, p);
    let mut topic = |f: &Field<String>, default: &str| {
        aws_topic(f.value.as_deref().unwrap_or(default), &thing).unwrap_or_else(|e| {
            f.report(p, e);
            String::new()
        })
    };
    let telemetry_topic = topic(&raw.telemetry_topic, DEFAULT_TELEMETRY_TOPIC);
    let presence_topic = topic(&raw.presence_topic, DEFAULT_PRESENCE_TOPIC);
    let metrics_topic = topic(&raw.metrics_topic, DEFAULT_METRICS_TOPIC);
    let mut shadow_map = Vec::new();
    for m in raw.shadow_map.value.iter().flatten() {
        let mut keys = Vec::new();
        for k in m.keys.value.iter().flatten() {
            match KeyGlob::new(k) {
                Ok(g) => keys.push(g),
                Err(e) => m.keys.report(p, e),
            }
        }
        if m.keys.value.as_ref().is_none_or(Vec::is_empty) {
            m.keys
                .missing(p, "expected at least one key glob, such as [\"net.*\"]");
        }
        let shadow = m.shadow.value.clone().unwrap_or_default();
        if m.shadow.is_set() {
            name(&m.shadow, &shadow, p);
        } else {
            m.shadow.missing(
                p,
                "missing required key; expected a shadow name (\"\" for the classic shadow)",
            );
        }
        shadow_map.push(ShadowMap { keys, shadow });
    }
    let c = AwsConfig {
        thing,
        shadow,
        telemetry_topic,
        presence_topic,
        metrics_topic,
        shadow_map,
        nested: raw.nested.value.unwrap_or(true),
    };
    let n = c.shadows().len();
    if n > AWS_SHADOWS_MAX {
        let m = format!("expected at most {AWS_SHADOWS_MAX} shadows in all, found {n}");
        raw.shadow_map.report(p, m);
    }
    (p.0.len() == before).then_some(c)
}

fn device(raw: &RawDevice, p: &mut Problems) -> Option<DeviceConfig> {
    let id = raw.id.require(
        p,
        "this device's id, 1-64 characters of [A-Za-z0-9_.-]",
        DeviceId::try_from,
    )?;
    Some(DeviceConfig { id })
}

fn mqtt(
    raw: Option<&RawMqtt>,
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
    let allow_plaintext = raw.allow_plaintext.value.unwrap_or(false);
    let retain = raw.retain.value.unwrap_or(true);

    // One TLS identity for all the nodes: every URL is mqtts://, or every one mqtt://.
    let (urls, tls) = broker_urls(raw, allow_plaintext, p);
    let url_order = raw
        .url_order
        .or(p, UrlOrder::InOrder, |s| UrlOrder::parse(&s));

    let topic_prefix = raw
        .topic_prefix
        .or(p, DEFAULT_TOPIC_PREFIX.to_owned(), |s| {
            check_topic_prefix(&s)
        });

    // TLS files: checked when the URL is TLS or could not be read; refused with plain TCP,
    // where they would be silently unused.
    let tls_files = [&raw.ca, &raw.cert, &raw.key];
    if tls == Some(false) {
        for file in tls_files.iter().filter(|file| file.is_set()) {
            file.report(
                p,
                "is set, but mqtt.url is plaintext (mqtt://) and it would be unused; use \
                 mqtts:// or remove it",
            );
        }
    }
    let check_tls_files = tls != Some(false);
    let [ca, cert, key] = tls_files.map(|file| readable_file(p, file, dir, check_tls_files));
    if check_tls_files && let Some(Some(path)) = &key {
        private_file(p, &raw.key, path, "a private key");
    }
    if tls == Some(true) && !raw.ca.is_set() {
        raw.ca.missing(
            p,
            "missing; mqtts:// needs a PEM CA bundle to verify the broker's certificate, e.g. \
             ca = \"/etc/edgesync/ca.pem\"",
        );
    }
    match (raw.cert.is_set(), raw.key.is_set()) {
        _ if tls == Some(false) => {}
        (true, false) => raw.key.missing(
            p,
            "missing; mqtt.cert is set and a client certificate needs its private key (set \
             both cert and key, or neither)",
        ),
        (false, true) => raw.cert.missing(
            p,
            "missing; mqtt.key is set and a private key needs its client certificate (set \
             both cert and key, or neither)",
        ),
        _ => {}
    }

    let keep_alive = raw.keep_alive.or(p, DEFAULT_KEEP_ALIVE, |d| {
        let d = d.within(
            Duration::from_secs(5)..=Duration::from_secs(65535),
            "5s to 65535s",
        )?;
        if d.subsec_nanos() != 0 {
            return Err(format!(
                "expected whole seconds (MQTT keep-alive is counted in seconds), found {d:?}"
            ));
        }
        Ok(d)
    });
    let reconnect_initial = raw
        .reconnect_initial
        .or(p, DEFAULT_RECONNECT_INITIAL, |d| d.timeout());
    let reconnect_max = raw
        .reconnect_max
        .or(p, DEFAULT_RECONNECT_MAX, |d| d.timeout());
    let reconnect_reset = raw
        .reconnect_reset
        .or(p, DEFAULT_RECONNECT_RESET, |d| d.timeout());
    let reconnect_jitter = raw
        .reconnect_jitter
        .or(p, ReconnectJitter::Full, |s| ReconnectJitter::parse(&s));
    if let (Some(i), Some(m)) = (reconnect_initial, reconnect_max)
        && m < i
    {
        raw.reconnect_max.report(
            p,
            format!("must not be below mqtt.reconnect_initial ({i:?}), found {m:?}"),
        );
    }

    // Defaults to the device id, which is already known to be valid (or reported).
    let client_id = raw
        .client_id
        .map(p, |id| check_client_id(&id).map(|()| id))
        .and_then(|id| id.or_else(|| device.map(|d| d.as_str().to_owned())));
    let username = raw
        .username
        .map(p, |name| check_username(&name).map(|()| name));
    let password_file = readable_file(p, &raw.password_file, dir, true);
    if let Some(Some(path)) = &password_file {
        private_file(p, &raw.password_file, path, "a password file");
    }
    if raw.password_file.is_set() && !raw.username.is_set() {
        raw.password_file.report(
            p,
            "is set without mqtt.username; a password needs a user name",
        );
    }

    let urls = urls?;
    Some(MqttConfig {
        url: urls.first()?.clone(),
        urls,
        url_order: url_order?,
        topic_prefix: topic_prefix?,
        ca: ca?,
        cert: cert?,
        key: key?,
        keep_alive: keep_alive?,
        reconnect_initial: reconnect_initial?,
        reconnect_max: reconnect_max?,
        reconnect_reset: reconnect_reset?,
        reconnect_jitter: reconnect_jitter?,
        client_id: client_id?,
        username: username?,
        password_file: password_file?,
        allow_plaintext,
        retain,
    })
}

/// `mqtt.url` or `mqtt.urls` (exactly one), each URL checked alike; `None` after a problem.
/// Also whether the first URL that could be read is TLS (even when refused as plaintext).
fn broker_urls(
    raw: &RawMqtt,
    allow_plaintext: bool,
    p: &mut Problems,
) -> (Option<Vec<BrokerUrl>>, Option<bool>) {
    let mut tls = None;
    let urls = broker_urls_checked(raw, allow_plaintext, &mut tls, p);
    (urls, tls)
}

fn broker_urls_checked(
    raw: &RawMqtt,
    allow_plaintext: bool,
    tls: &mut Option<bool>,
    p: &mut Problems,
) -> Option<Vec<BrokerUrl>> {
    let mut one = |field: &Field<String>, text: &str, p: &mut Problems| {
        let url = field.check(p, text.parse::<BrokerUrl>())?;
        tls.get_or_insert(url.tls);
        if !url.tls && !allow_plaintext {
            field.report(
                p,
                "\"mqtt://\" is plaintext; set mqtt.allow_plaintext = true to allow it, or use \
                 mqtts://",
            );
            return None;
        }
        Some(url)
    };
    match (&raw.url.value, &raw.urls.value) {
        (Some(_), Some(_)) => {
            raw.urls.report(
                p,
                "is set together with mqtt.url; set one of them (urls for several broker nodes)",
            );
            None
        }
        (Some(text), None) => one(&raw.url, text, p).map(|url| vec![url]),
        (None, Some(list)) => {
            if list.is_empty() || list.len() > MQTT_URLS_MAX {
                raw.urls.report(
                    p,
                    format!(
                        "expected 1 to {MQTT_URLS_MAX} broker URLs, found {}",
                        list.len()
                    ),
                );
                return None;
            }
            let field = |i: usize| Field::<String> {
                key: format!("{}[{}]", raw.urls.key, i + 1),
                value: None,
            };
            let mut urls = Vec::with_capacity(list.len());
            for (i, text) in list.iter().enumerate() {
                urls.push(one(&field(i), text, p));
            }
            let urls: Vec<BrokerUrl> = urls.into_iter().collect::<Option<_>>()?;
            if let Some(i) = (1..urls.len()).find(|&i| urls[i].tls != urls[0].tls) {
                field(i).report(
                    p,
                    "mixes mqtt:// and mqtts://; the nodes share one TLS identity, use one scheme",
                );
                return None;
            }
            if let Some(i) = (1..urls.len()).find(|&i| urls[..i].contains(&urls[i])) {
                field(i).report(p, format!("{} is listed twice", urls[i]));
                return None;
            }
            Some(urls)
        }
        (None, None) => {
            if !p.mentions(&raw.url.key) && !p.mentions(&raw.urls.key) {
                raw.url.report(
                    p,
                    "missing required key; expected the broker address, mqtts://host[:port] \
                     (or mqtt.urls = [...] for several nodes)",
                );
            }
            None
        }
    }
}

/// An optional file that must exist and be readable (opened to check, when `check_file`).
/// `Some(None)`: not set; `None`: a problem was reported.
fn readable_file(
    p: &mut Problems,
    field: &Field<String>,
    dir: &Path,
    check_file: bool,
) -> Option<Option<std::path::PathBuf>> {
    let Some(value) = &field.value else {
        return Some(None);
    };
    let path = field.check(p, resolve(value, dir))?;
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
            field.report(p, problem);
            return None;
        }
    }
    Some(Some(path))
}

/// A secret (`what`) that users other than its owner and group can access is refused: the
/// device identity or broker password would leak to any local account. Group access stays
/// allowed (packages install keys `root:edgesync` 0640).
fn private_file(p: &mut Problems, field: &Field<String>, path: &Path, what: &str) {
    let Ok(meta) = std::fs::metadata(path) else {
        return; // readable_file already reported why it cannot be read
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        field.report(
            p,
            format!(
                "\"{}\" has mode {mode:04o}: {what} must not be accessible to other users; \
                 run: chmod 600 \"{}\" (or chmod 640 with the agent's group as the file's group)",
                path.display(),
                path.display()
            ),
        );
    }
}

fn store(raw: &RawStore, dir: &Path, p: &mut Problems) -> Option<StoreConfig> {
    let d = StoreConfig::default();
    let path = raw
        .path
        .or_checked(p, DEFAULT_STORE_PATH.to_owned(), |path| {
            resolve(&path, dir).and_then(store_file)
        });
    let max_bytes = raw
        .max_bytes
        .or(p, d.max_bytes, |s| s.bytes((MIB, u64::MAX), ("", "")));
    let when_full = raw.when_full.or(p, d.when_full, |s| WhenFull::parse(&s));
    let cache_size = raw
        .cache_size
        .or(p, d.cache_size, |s| s.bytes((256 * KIB, GIB), ("", "")));
    let classes = store_classes(&raw.class, p);
    Some(StoreConfig {
        path: path?,
        max_bytes: max_bytes?,
        when_full: when_full?,
        cache_size: cache_size?,
        classes: classes?,
    })
}

/// `[[store.class]]`: at most [`STORE_CLASSES_MAX`], names unique, no entry shadowed.
fn store_classes(raw: &Field<Vec<RawClass>>, p: &mut Problems) -> Option<Vec<StoreClass>> {
    let n = raw.value.as_ref().map_or(0, Vec::len);
    if n > STORE_CLASSES_MAX {
        raw.report(
            p,
            format!("expected at most {STORE_CLASSES_MAX} [[store.class]] tables, found {n}"),
        );
    }
    let before = p.0.len();
    let classes = entries(raw, p, store_class)?;
    shadowed(p, "store.class", classes.iter().map(|c| &c.keys));
    for (i, c) in classes.iter().enumerate() {
        if let Some(j) = classes[..i].iter().position(|o| o.name == c.name) {
            p.push(
                format!("store.class[{}].name", i + 1),
                format!(
                    "the name {:?} is taken by store.class[{}]; names must be unique",
                    c.name,
                    j + 1
                ),
            );
        }
    }
    (p.0.len() == before && n <= STORE_CLASSES_MAX).then_some(classes)
}

fn store_class(raw: &RawClass, p: &mut Problems) -> Option<StoreClass> {
    let keys = glob(&raw.keys, p);
    let name = raw.name.map(p, |n| {
        let ok = (1..=64).contains(&n.chars().count())
            && n.chars()
                .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\');
        match n.as_str() {
            "default" => Err(
                "\"default\" is the class of keys no [[store.class]] matches; \
                              choose another name"
                    .to_owned(),
            ),
            _ if ok => Ok(n),
            _ => Err(format!(
                "expected 1-64 printable ASCII characters without quotes, backslashes or \
                 spaces, found {:?}",
                shorten(&n)
            )),
        }
    });
    let priority = raw.priority.or(p, DEFAULT_CLASS_PRIORITY, |n| {
        count(n, (0, 100)).map(|n| n as u8)
    });
    let ttl = raw.ttl.map(p, |t| {
        let d = parse_duration(&t.0)?;
        if d < Duration::from_secs(1) || d > Duration::from_secs(3650 * 86_400) {
            return Err(format!("expected 1s to 3650d, found {d:?}"));
        }
        Ok(d)
    });
    let deadband = raw.deadband.map(p, |n| {
        let x = n.finite()?;
        if x > 0.0 {
            Ok(x)
        } else {
            Err(format!("expected a number above 0, found {x}"))
        }
    });
    let dedupe = raw.dedupe.value.unwrap_or(false);
    let max_interval = raw.max_interval.map(p, |t| {
        let d = parse_duration(&t.0)?;
        if d < Duration::from_secs(1) || d > Duration::from_secs(365 * 86_400) {
            return Err(format!("expected 1s to 365d, found {d:?}"));
        }
        Ok(d)
    });
    if raw.max_interval.is_set() && !raw.deadband.is_set() && !dedupe {
        raw.max_interval.report(
            p,
            "max_interval forces a report a filter held back: set deadband or dedupe = true too",
        );
        return None;
    }
    let keys = keys?;
    Some(StoreClass {
        name: name?.unwrap_or_else(|| keys.as_str().to_owned()),
        keys,
        priority: priority?,
        ttl: ttl?,
        deadband: deadband?,
        dedupe,
        max_interval: max_interval?,
    })
}

fn sync(raw: &RawSync, p: &mut Problems) -> Option<SyncConfig> {
    let d = SyncConfig::default();
    let encoding = raw.encoding.or(p, d.encoding, |s| Encoding::parse(&s));
    let batch_max_changes = raw
        .batch_max_changes
        .or(p, d.batch_max_changes, |n| count(n, (1, 100_000)));
    let batch_max_bytes = raw.batch_max_bytes.or(p, d.batch_max_bytes, |s| {
        s.bytes(
            // A 64 KiB value plus a 128-character key and the batch envelope.
            (MAX_VALUE_BYTES + KIB, 256 * MIB),
            (
                "; a batch must hold the largest change the agent accepts, a 64KiB value \
                 plus its key and the batch envelope",
                "; that is the MQTT packet limit",
            ),
        )
    });
    let linger = raw.linger.or(p, d.linger, |t| {
        let d = parse_duration(&t.0)?;
        if d > Duration::from_secs(10) {
            return Err(format!("expected at most 10s, found {d:?}"));
        }
        Ok(d)
    });
    let max_inflight = raw
        .max_inflight
        .or(p, d.max_inflight, |n| count(n, (1, 1024)));
    let compression = raw.compression.or(p, d.compression, |s| {
        Compression::parse(&s).ok_or_else(|| one_of(&s, &Compression::NAMES))
    });
    Some(SyncConfig {
        compression: compression?,
        encoding: encoding?,
        batch_max_changes: batch_max_changes?,
        batch_max_bytes: batch_max_bytes?,
        linger: linger?,
        max_inflight: max_inflight?,
    })
}

fn local(raw: &RawLocal, p: &mut Problems) -> Option<LocalConfig> {
    let d = LocalConfig::default();
    let socket = raw
        .socket
        .or_checked(p, DEFAULT_SOCKET.to_owned(), |s| socket(s, DEFAULT_SOCKET));
    let idle_timeout = raw.idle_timeout.or(p, d.idle_timeout, |t| {
        t.within(
            Duration::from_secs(1)..=Duration::from_secs(86_400),
            "1s to 1d",
        )
    });
    let client_timeout = raw.client_timeout.or(p, d.client_timeout, |t| t.timeout());
    Some(LocalConfig {
        socket: socket?,
        idle_timeout: idle_timeout?,
        client_timeout: client_timeout?,
    })
}

fn log(raw: &RawLog, p: &mut Problems) -> Option<LogConfig> {
    let d = LogConfig::default();
    let level = raw
        .level
        .or(p, d.level, |level| check_log_level(&level).map(|()| level))?;
    Some(LogConfig { level })
}

fn telemetry(raw: &RawTelemetry, dir: &Path, p: &mut Problems) -> Option<TelemetryConfig> {
    let d = TelemetryConfig::default();
    let interval = raw.interval.or(p, d.interval, |RawDuration(text)| {
        parse_duration(&text).and_then(|d| telemetry_interval(d, &text))
    });
    let textfile = raw.textfile.map(p, |text| {
        resolve(&text, dir).and_then(|path| prom_file(path, &text))
    });
    Some(TelemetryConfig {
        interval: interval?,
        textfile: textfile?,
    })
}

fn control(raw: &RawControl, p: &mut Problems) -> Option<ControlConfig> {
    let d = ControlConfig::default();
    let allow = match &raw.allow.value {
        None => Some(d.allow),
        Some(RawNames(names)) => {
            let known = CommandName::names();
            let mut allow = std::collections::BTreeSet::new();
            let mut ok = true;
            for (i, name) in names.iter().enumerate() {
                match CommandName::parse(name) {
                    Some(c) if !allow.insert(c) => {
                        ok = false;
                        raw.allow
                            .report(p, format!("{name:?} is listed twice (item {})", i + 1));
                    }
                    Some(_) => {}
                    None => {
                        ok = false;
                        let hint = match suggest(name, &known) {
                            Some(near) => format!(" (did you mean {near:?}?)"),
                            None => String::new(),
                        };
                        raw.allow.report(
                            p,
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
    let replay_window = raw.replay_window.or(p, d.replay_window, |w| {
        w.within(
            Duration::from_secs(60)..=Duration::from_secs(30 * 86_400),
            "\"1m\" to \"30d\"",
        )
    });
    // Each kept id holds its response (at most 64 KiB, usually < 1 KiB).
    let replay_max = raw
        .replay_max
        .or(p, d.replay_max, |n| count(n, (1, 1_000_000)));
    Some(ControlConfig {
        allow: allow?,
        replay_window: replay_window?,
        replay_max: replay_max?,
    })
}

// ---------------------------------------------------------------------------------------------
// [desired] and its arrays of tables.

fn desired(raw: &RawDesired, dir: &Path, p: &mut Problems) -> Option<DesiredConfig> {
    let d = DesiredConfig::default();
    let max_document_bytes = raw.max_document_bytes.or(p, d.max_document_bytes, |s| {
        s.bytes((KIB, 16 * MIB), ("", ""))
    });
    let max_depth = raw.max_depth.or(p, d.max_depth, |n| count(n, (1, 64)));
    let unknown_keys = raw
        .unknown_keys
        .or(p, d.unknown_keys, |s| parse_unknown_keys(&s));
    let history = raw.history.or(p, d.history, |n| count(n, (0, 1000)));
    let concurrency = raw.concurrency.or(p, d.concurrency, |n| count(n, (1, 64)));
    let handler_timeout = raw
        .handler_timeout
        .or(p, d.handler_timeout, |t| t.timeout());
    // How far ahead of the clock a `ts` is still believed.
    let max_future_ts = raw.max_future_ts.or(p, d.max_future_ts, |t| {
        t.within(
            Duration::from_secs(1)..=Duration::from_secs(30 * 86_400),
            "\"1s\" to \"30d\"",
        )
    });
    // The default of the tables' timeouts; if handler_timeout itself is wrong (reported), the
    // tables are still checked, against the built-in default.
    let default_timeout = handler_timeout.unwrap_or(d.handler_timeout);

    let rules = entries(&raw.rule, p, rule);
    let conflicts = entries(&raw.conflict, p, |raw, p| conflict(raw, default_timeout, p));
    let handlers = entries(&raw.handler, p, |raw, p| {
        handler(raw, default_timeout, dir, p)
    });
    if let Some(rules) = &rules {
        shadowed(p, &raw.rule.key, rules.iter().map(|r| &r.keys));
    }
    if let Some(conflicts) = &conflicts {
        shadowed(p, &raw.conflict.key, conflicts.iter().map(|c| &c.keys));
    }
    if let Some(handlers) = &handlers {
        shadowed(p, &raw.handler.key, handlers.iter().map(|h| &h.keys));
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

/// Validate every entry of an array of tables (each one, even after a bad one). `None` if any
/// entry had a problem.
fn entries<R, T>(
    raw: &Field<Vec<R>>,
    p: &mut Problems,
    mut validate: impl FnMut(&R, &mut Problems) -> Option<T>,
) -> Option<Vec<T>> {
    let validated: Vec<Option<T>> = raw
        .value
        .iter()
        .flatten()
        .map(|raw| validate(raw, p))
        .collect();
    validated.into_iter().collect()
}

/// The required `keys` glob of an entry.
fn glob(raw: &Field<String>, p: &mut Problems) -> Option<KeyGlob> {
    raw.require(
        p,
        "a key glob such as \"setpoint\" or \"led.*\" (* matches any run of characters, ? \
         one character)",
        |pattern| KeyGlob::new(&pattern),
    )
}

fn rule(raw: &RawRule, p: &mut Problems) -> Option<Rule> {
    let before = p.0.len();
    let keys = glob(&raw.keys, p);
    let value_type = raw.kind.map(p, |kind| parse_value_type(&kind)).flatten();
    let type_name = raw.kind.value.as_deref().unwrap_or_default();
    let type_key = &raw.kind.key;
    let min = raw.min.map(p, RawNumber::finite).flatten();
    let max = raw.max.map(p, RawNumber::finite).flatten();
    let numeric = matches!(
        value_type,
        None | Some(ValueType::Integer | ValueType::Number)
    );
    for (field, name, bound) in [(&raw.min, "min", min), (&raw.max, "max", max)] {
        if bound.is_some() && !numeric {
            field.report(
                p,
                format!(
                    "{name} applies to numbers only, but {type_key} = {type_name:?}; remove it \
                     (max_length limits the length of strings, arrays and objects)"
                ),
            );
        }
    }
    if let (Some(min), Some(max)) = (min, max)
        && max < min
    {
        let min_key = &raw.min.key;
        raw.max.report(
            p,
            format!("must not be below {min_key} ({min}), found {max}"),
        );
    }
    let max_length = raw
        .max_length
        .map(p, |n| {
            usize::try_from(n).map_err(|_| format!("expected an integer of 0 or more, found {n}"))
        })
        .flatten();
    if max_length.is_some()
        && matches!(
            value_type,
            Some(ValueType::Bool | ValueType::Integer | ValueType::Number)
        )
    {
        raw.max_length.report(
            p,
            format!(
                "max_length applies to strings, arrays and objects only, but {type_key} = \
                 {type_name:?}; remove it (min and max limit numbers)"
            ),
        );
    }
    let nullable = raw.nullable.value.unwrap_or(true);
    let one_of = match &raw.one_of.value {
        None => None,
        Some(values) if values.is_empty() => {
            raw.one_of.report(
                p,
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
                            raw.one_of.report(p, format!("item {}: {message}", i + 1))
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
                raw.one_of.report(
                    p,
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

fn conflict(
    raw: &RawConflict,
    default_timeout: Duration,
    p: &mut Problems,
) -> Option<ConflictRule> {
    let before = p.0.len();
    let keys = glob(&raw.keys, p);
    let policy = raw.policy.require(
        p,
        "\"cloud-wins\", \"device-wins\", \"last-write-wins\" or \"merge\"",
        |policy| {
            if POLICIES.contains(&policy.as_str()) {
                Ok(policy)
            } else {
                Err(one_of(&policy, POLICIES))
            }
        },
    );
    let policy_key = &raw.policy.key;
    let is_merge = policy.as_deref().map(|policy| policy == "merge");
    let command = match (is_merge, raw.command.is_set()) {
        (Some(false), true) => {
            raw.command.report(
                p,
                format!(
                    "is only used with policy = \"merge\", but {policy_key} = {:?}; remove it",
                    policy.as_deref().unwrap_or_default()
                ),
            );
            None
        }
        (Some(true), false) => {
            raw.command.missing(
                p,
                "missing required key; expected the merge program and its arguments, e.g. \
                 [\"/usr/local/bin/merge\"]; it gets {\"key\",\"device\",\"cloud\"} as JSON on \
                 stdin and prints the merged value",
            );
            None
        }
        _ => raw.command.map(p, check_command).flatten(),
    };
    let timeout = match (is_merge, raw.timeout.is_set()) {
        (Some(false), true) => {
            raw.timeout.report(
                p,
                format!(
                    "is only used with policy = \"merge\" (the merge program's time limit), but \
                     {policy_key} = {:?}; remove it",
                    policy.as_deref().unwrap_or_default()
                ),
            );
            None
        }
        _ => raw.timeout.or(p, default_timeout, |t| t.timeout()),
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

fn handler(
    raw: &RawHandler,
    default_timeout: Duration,
    dir: &Path,
    p: &mut Problems,
) -> Option<Handler> {
    let before = p.0.len();
    let keys = glob(&raw.keys, p);
    let kind = raw.kind.require(
        p,
        "\"exec\" (run a program), \"file\" (write a file) or \"watch\" (tell local programs)",
        |kind| {
            if HANDLER_TYPES.contains(&kind.as_str()) {
                Ok(kind)
            } else {
                Err(one_of(&kind, HANDLER_TYPES))
            }
        },
    );

    // Keys that the handler's type does not take.
    if let Some(kind) = kind.as_deref() {
        let takes = handler_keys(kind);
        let set = [
            ("command", &raw.command.key, raw.command.is_set()),
            ("timeout", &raw.timeout.key, raw.timeout.is_set()),
            ("path", &raw.path.key, raw.path.is_set()),
            ("deadline", &raw.deadline.key, raw.deadline.is_set()),
        ];
        for (name, key, _) in set
            .iter()
            .filter(|(name, _, set)| *set && !takes.contains(name))
        {
            let users: Vec<&str> = HANDLER_TYPES
                .iter()
                .copied()
                .filter(|t| handler_keys(t).contains(name))
                .collect();
            p.push(
                key.as_str(),
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
            let argv = raw.command.require(
                p,
                "the program and its arguments, e.g. [\"/usr/local/bin/apply\", \"{key}\"]",
                check_command,
            );
            let timeout = raw.timeout.or(p, default_timeout, |t| t.timeout());
            argv.zip(timeout)
                .map(|(argv, timeout)| HandlerKind::Exec { argv, timeout })
        }
        Some("file") => raw
            .path
            .require(
                p,
                "the file to write, e.g. \"/var/lib/app/{key}.json\" ({key} is replaced by the \
                 key)",
                |path| {
                    let template = check_path_template(&path, keys.as_ref())?;
                    resolve(&template, dir)
                },
            )
            .map(|path| HandlerKind::File { path }),
        // "watch", the only other type.
        Some(_) => raw
            .deadline
            .or(p, default_timeout, |t| t.timeout())
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
