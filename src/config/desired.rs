//! Configuration types of desired state (`[desired]`, `[[desired.rule]]`,
//! `[[desired.conflict]]`, `[[desired.handler]]`), produced by the validation in this
//! module's parent.

use std::path::PathBuf;
use std::time::Duration;

use crate::model::glob::KeyGlob;
use crate::model::rules::{Rule, UnknownKeys};

/// `[desired]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredConfig {
    /// Largest desired document accepted (encoded), default 256 KiB.
    pub max_document_bytes: u64,
    /// Deepest nesting of arrays/objects inside one value, default 16.
    pub max_depth: usize,
    /// What to do with keys that no rule matches, default `Accept`.
    pub unknown_keys: UnknownKeys,
    /// Values kept per key in the history, default 10.
    pub history: usize,
    /// Handlers running at once, default 4.
    pub concurrency: usize,
    /// Default timeout of exec handlers, merge programs and watch acks, default 30 s.
    pub handler_timeout: Duration,
    /// How far ahead of this device's clock a `ts` is believed, default 1 h: a report with a
    /// later `ts` is refused; a stored change or a document beyond it does not win a conflict
    /// by its `ts`.
    pub max_future_ts: Duration,
    /// Validation rules, in file order (first matching rule wins).
    pub rules: Vec<Rule>,
    /// Conflict policies, in file order (first match wins; default cloud-wins).
    pub conflicts: Vec<ConflictRule>,
    /// Handlers, in file order (first match wins; none = record only).
    pub handlers: Vec<Handler>,
}

impl Default for DesiredConfig {
    fn default() -> Self {
        Self {
            max_document_bytes: 256 * 1024,
            max_depth: 16,
            unknown_keys: UnknownKeys::Accept,
            history: 10,
            concurrency: 4,
            handler_timeout: Duration::from_secs(30),
            max_future_ts: Duration::from_secs(3600),
            rules: Vec::new(),
            conflicts: Vec::new(),
            handlers: Vec::new(),
        }
    }
}

/// `[[desired.conflict]]`: who wins when the device changed a key the cloud had not seen.
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictRule {
    pub keys: KeyGlob,
    pub policy: Policy,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    CloudWins,
    DeviceWins,
    LastWriteWins,
    /// Run `argv` (no shell) with `{"key","device","cloud"}` as JSON on stdin; its stdout JSON
    /// is the value applied.
    Merge {
        argv: Vec<String>,
        timeout: Duration,
    },
}

/// `[[desired.handler]]`: how a key's new value reaches the device.
#[derive(Debug, Clone, PartialEq)]
pub struct Handler {
    pub keys: KeyGlob,
    pub kind: HandlerKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HandlerKind {
    /// Run `argv` (no shell). `{key}` and `{value}` (compact JSON) in arguments are replaced;
    /// env `EDGESYNC_KEY`, `EDGESYNC_VALUE`, `EDGESYNC_VERSION`; the JSON value on stdin.
    /// Exit 0 → applied (stdout, if JSON, is the value actually applied), else failed with
    /// stderr's last line.
    Exec {
        argv: Vec<String>,
        timeout: Duration,
    },
    /// Write the JSON value to `path` (`{key}` replaced) atomically: temp file, fsync, rename.
    File { path: PathBuf },
    /// Local programs that sent `{"op":"watch","keys":[...]}` get the change and must ack
    /// within `deadline`.
    Watch { deadline: Duration },
}
