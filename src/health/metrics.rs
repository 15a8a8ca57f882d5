//! Health figures (issue 5, docs/PROTOCOL.md §4 `P/D/metrics`): what an operator of many devices watches
//! without logging in. One [`Metrics`] document holds them all; it is
//!
//! - part of every status (`edgesync status --json`, the socket's `status`), as `metrics`;
//! - published as JSON on `P/D/metrics` every `[telemetry] interval` by the link (QoS 0, not
//!   retained, only while online: a document taken while offline is dropped, never queued);
//! - written as a Prometheus text exposition file for node_exporter's textfile collector
//!   when `[telemetry] textfile` is set, atomically, every interval.
//!
//! # Rates
//! Changes in and out per second come from the persistent counters `reported` (in) and
//! `acked` (out), as the difference between two samples divided by the time between them
//! ([`RateMeter`], sans-IO). The metrics task takes a sample every interval (every
//! [`SAMPLE_WHEN_OFF`] when telemetry is off, so that `status` still shows rates); a status
//! shows the rates of the last completed window, as the published document does.
//!
//! # Counters by reason
//! `dropped` counts `drop-oldest` evictions and `rejected` counts `store-full` refusals
//! (both persistent, from the store); `rejected.invalid-change` counts the changes of
//! requests the socket refused as invalid (since the daemon started).
//!
//! # Bytes written (issue 16)
//! The agent's own `write_bytes` of `/proc/self/io` (a black box, as the bench measures it;
//! the store is the only big writer): per second over the rate window, projected to GB a
//! day, and over the store's life (kept in the store's `meta`, see
//! [`Outbox::note_written`]). `null` where the kernel does not count it.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::TelemetryConfig;
use crate::health::status::{Identity, LinkFigures, LinkState, StatusBoard};
use crate::store::class::ClassStats;
use crate::store::{Outbox, QueueStats};

/// How often rates are sampled while `[telemetry] interval = "0"`.
pub const SAMPLE_WHEN_OFF: Duration = Duration::from_secs(10);

/// The JSON documents the link publishes on `P/D/metrics` (latest only).
pub type Feed = watch::Receiver<Option<Vec<u8>>>;

/// A new feed: the sender goes to the metrics task, the receiver to the link.
pub fn feed() -> (watch::Sender<Option<Vec<u8>>>, Feed) {
    watch::channel(None)
}

// ---------------------------------------------------------------------------------------------
// Rates (sans-IO).

/// Counter values at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Monotonic milliseconds (any fixed origin).
    pub at_ms: u64,
    /// Changes queued so far (persistent counter).
    pub reported: u64,
    /// Changes acknowledged by the broker so far (persistent counter).
    pub acked: u64,
    /// Bytes this process has written so far (`/proc/self/io`), if known.
    pub written: Option<u64>,
}

/// Changes per second over one window between two samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub in_per_s: f64,
    pub out_per_s: f64,
    pub window_ms: u64,
    /// Bytes written per second, when both samples know them.
    #[serde(default)]
    pub written_per_s: Option<f64>,
}

/// Turns successive samples into rates.
#[derive(Debug, Clone, Default)]
pub struct RateMeter {
    last: Option<Sample>,
    rates: Option<Rates>,
}

impl RateMeter {
    /// Takes a sample; returns the rates of the window it closes (`None` for the first
    /// sample, or after the counters went backwards, e.g. a store replaced). A sample no
    /// later than the previous one is ignored and the last rates stand.
    pub fn observe(&mut self, s: Sample) -> Option<Rates> {
        match self.last {
            Some(prev) if s.at_ms <= prev.at_ms => return self.rates,
            Some(prev) => {
                let window_ms = s.at_ms - prev.at_ms;
                let secs = window_ms as f64 / 1000.0;
                self.rates = match (
                    s.reported.checked_sub(prev.reported),
                    s.acked.checked_sub(prev.acked),
                ) {
                    (Some(i), Some(o)) => Some(Rates {
                        in_per_s: round3(i as f64 / secs),
                        out_per_s: round3(o as f64 / secs),
                        window_ms,
                        written_per_s: s
                            .written
                            .zip(prev.written)
                            .and_then(|(now, then)| now.checked_sub(then))
                            .map(|w| round3(w as f64 / secs)),
                    }),
                    _ => None,
                };
            }
            None => self.rates = None,
        }
        self.last = Some(s);
        self.rates
    }

    /// The rates of the last completed window.
    pub fn rates(&self) -> Option<Rates> {
        self.rates
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// GB (10^9 bytes, as card makers count) a day at `bytes_per_s`.
pub fn gb_per_day(bytes_per_s: f64) -> f64 {
    round3(bytes_per_s * 86_400.0 / 1e9)
}

// ---------------------------------------------------------------------------------------------
// The document.

/// Every health figure at one moment. Field names are part of the `P/D/metrics` payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Unix ms when the figures were taken.
    pub ts: u64,
    pub device: String,
    /// The agent's version.
    pub version: String,
    pub connection: LinkState,
    pub uptime_s: u64,
    /// Resident memory (VmRSS); `null` where `/proc` cannot tell.
    pub rss_bytes: Option<u64>,
    pub queue: QueueMetrics,
    pub changes: ChangeMetrics,
    pub reconnects: u64,
    pub last_error: Option<String>,
    /// A store fault the link is retrying through, while it lasts.
    #[serde(default)]
    pub store_error: Option<String>,
    pub desired_version: Option<u64>,
    /// Retained messages on command topics ignored since start (docs/PROTOCOL.md §7).
    #[serde(default)]
    pub retained_commands: u64,
    /// Incoming messages the link refused or dropped, since start.
    #[serde(default)]
    pub inbound: crate::health::status::Inbound,
    /// Bytes the agent wrote over the store's life; `null` where `/proc` cannot tell.
    #[serde(default)]
    pub written_bytes: Option<u64>,
    /// Bytes written per second over the rate window.
    #[serde(default)]
    pub written_bytes_per_s: Option<f64>,
    /// GB a day at that rate.
    #[serde(default)]
    pub written_gb_per_day: Option<f64>,
    /// The Device Shadow (`aws-iot` profile only); not read back (no code for it).
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<crate::health::status::ShadowFigures>,
    /// The device twin (`azure-iot-hub` profile only); not read back.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub twin: Option<crate::health::status::ShadowFigures>,
    /// AWS IoT Jobs (`aws-iot` profile only); not read back (no code for it).
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<crate::health::status::JobFigures>,
    /// Direct methods and cloud-to-device messages (`azure-iot-hub` profile only).
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub hub_commands: Option<crate::health::status::HubCommandFigures>,
    /// The local MQTT sources (`[[source.mqtt]]`); absent without any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<crate::health::status::SourceFigures>,
    /// Per retention class (`[[store.class]]` only): drops and filtered changes since start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ClassStats>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueMetrics {
    pub depth: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// Age of the oldest queued change; `null` when the queue is empty.
    pub oldest_age_ms: Option<u64>,
    /// Bytes of `max_bytes` held by the latest values and the desired state.
    #[serde(default)]
    pub state_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeMetrics {
    /// Queued so far (persistent).
    pub reported: u64,
    /// Sent in batches since start (resends included).
    pub sent: u64,
    /// Acknowledged by the broker and deleted (persistent).
    pub acked: u64,
    /// Sent again after a reconnect, since start.
    pub resent: u64,
    /// Changes in (queued) per second over the last window; `null` before the second sample.
    pub in_per_s: Option<f64>,
    /// Changes out (acknowledged) per second over the last window.
    pub out_per_s: Option<f64>,
    /// The window the rates cover.
    pub rate_window_ms: Option<u64>,
    pub dropped: Dropped,
    pub rejected: Rejected,
}

/// Changes dropped, by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    /// Evicted to make room (`store.when_full = "drop-oldest"`), persistent.
    #[serde(rename = "drop-oldest")]
    pub drop_oldest: u64,
    /// Damaged queued records skipped and removed, never sent, persistent.
    #[serde(default)]
    pub corrupt: u64,
}

/// Changes refused, by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Refused because the store was full (`store.when_full = "reject"`), persistent.
    #[serde(rename = "store-full")]
    pub store_full: u64,
    /// Changes of requests refused at the socket as `invalid-change`, since start.
    #[serde(rename = "invalid-change")]
    pub invalid_change: u64,
}

/// Everything a [`Metrics`] (and a status) is made of, read once.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub now_ms: u64,
    pub device: String,
    pub queue: QueueStats,
    pub oldest_ts: Option<u64>,
    pub link: LinkFigures,
    pub rates: Option<Rates>,
    pub invalid_changes: u64,
    pub desired_version: Option<u64>,
    pub rss_bytes: Option<u64>,
    pub uptime: Duration,
    /// Bytes written over the store's life.
    pub written_bytes: Option<u64>,
    pub sources: Vec<crate::health::status::SourceFigures>,
    /// Per retention class (empty without `[[store.class]]`).
    pub classes: Vec<ClassStats>,
}

/// Reads the inputs: queue figures (no I/O), the oldest change's time and the desired
/// version (one short read transaction each), the board, and `/proc/self/status`.
pub fn gather(identity: &Identity, outbox: &Outbox, board: &StatusBoard) -> Inputs {
    let queue = outbox.stats();
    let oldest_ts = if queue.depth == 0 {
        None
    } else {
        outbox.oldest_ts().ok().flatten()
    };
    Inputs {
        now_ms: crate::model::change::now_ms(),
        device: identity.device.clone(),
        queue,
        oldest_ts,
        link: board.snapshot(),
        rates: board.rates(),
        invalid_changes: board.invalid_changes(),
        desired_version: crate::store::desired::applied_version(outbox)
            .ok()
            .flatten(),
        rss_bytes: rss_bytes(),
        uptime: board.started().elapsed(),
        written_bytes: write_bytes().map(|b| outbox.note_written(b)),
        sources: board.sources(),
        classes: outbox.class_stats(),
    }
}

/// The document of `inputs`.
pub fn build(i: &Inputs) -> Metrics {
    Metrics {
        ts: i.now_ms,
        device: i.device.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        connection: i.link.state,
        uptime_s: i.uptime.as_secs(),
        rss_bytes: i.rss_bytes,
        queue: QueueMetrics {
            depth: i.queue.depth,
            bytes: i.queue.bytes,
            max_bytes: i.queue.max_bytes,
            oldest_age_ms: i.oldest_ts.map(|t| i.now_ms.saturating_sub(t)),
            state_bytes: i.queue.state_bytes,
        },
        changes: ChangeMetrics {
            reported: i.queue.reported,
            sent: i.link.sent,
            acked: i.queue.acked,
            resent: i.link.resent,
            in_per_s: i.rates.map(|r| r.in_per_s),
            out_per_s: i.rates.map(|r| r.out_per_s),
            rate_window_ms: i.rates.map(|r| r.window_ms),
            dropped: Dropped {
                drop_oldest: i.queue.dropped,
                corrupt: i.queue.corrupt,
            },
            rejected: Rejected {
                store_full: i.queue.rejected,
                invalid_change: i.invalid_changes,
            },
        },
        reconnects: i.link.reconnects,
        last_error: i.link.last_error.clone(),
        store_error: i.link.store_error.clone(),
        desired_version: i.desired_version,
        retained_commands: i.link.retained_commands,
        inbound: i.link.inbound,
        written_bytes: i.written_bytes,
        written_bytes_per_s: i.rates.and_then(|r| r.written_per_s),
        written_gb_per_day: i.rates.and_then(|r| r.written_per_s).map(gb_per_day),
        shadow: i.link.shadow.clone(),
        twin: i.link.twin.clone(),
        jobs: i.link.jobs.clone(),
        hub_commands: i.link.hub_commands,
        sources: i.sources.clone(),
        classes: i.classes.clone(),
    }
}

/// The document now.
pub fn collect(identity: &Identity, outbox: &Outbox, board: &StatusBoard) -> Metrics {
    build(&gather(identity, outbox, board))
}

/// `VmRSS` of this process, in bytes.
pub fn rss_bytes() -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// `write_bytes` of this process (`/proc/self/io`): bytes it made the kernel write.
pub fn write_bytes() -> Option<u64> {
    parse_write_bytes(&std::fs::read_to_string("/proc/self/io").ok()?)
}

/// `write_bytes: 1234` of a `/proc/PID/io` text.
pub fn parse_write_bytes(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// `VmRSS:   1234 kB` of a `/proc/PID/status` text, in bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut words = line.split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    let mul = match words.next() {
        Some("kB") => 1024,
        Some("mB") => 1024 * 1024,
        Some("B") | None => 1,
        Some(_) => return None,
    };
    n.checked_mul(mul)
}

// ---------------------------------------------------------------------------------------------
// Prometheus text exposition (format 0.0.4).

/// The document as a Prometheus text exposition: `# HELP` and `# TYPE` for every family,
/// every sample labelled with the device. Figures that are unknown (no desired version yet,
/// no `/proc`) have no sample.
pub fn prometheus(m: &Metrics) -> String {
    let mut e = Expo {
        out: String::with_capacity(4096),
        device: escape_label(&m.device),
    };
    e.family("edgesync_info", "gauge", "Agent version (always 1).");
    e.sample(
        "edgesync_info",
        &[("version", &escape_label(&m.version))],
        1,
    );
    e.gauge(
        "edgesync_connected",
        "Whether the MQTT link to the broker is up (1) or not (0).",
        u8::from(m.connection == LinkState::Online),
    );
    e.gauge(
        "edgesync_queue_depth",
        "Changes queued and not yet acknowledged by the broker.",
        m.queue.depth,
    );
    e.gauge(
        "edgesync_queue_bytes",
        "Bytes of the queued changes, as the store bound counts them.",
        m.queue.bytes,
    );
    e.gauge(
        "edgesync_queue_max_bytes",
        "The store bound (store.max_bytes).",
        m.queue.max_bytes,
    );
    e.gauge(
        "edgesync_store_state_bytes",
        "Bytes of the store bound held by the latest values and the desired state.",
        m.queue.state_bytes,
    );
    e.gauge(
        "edgesync_oldest_queued_age_seconds",
        "Age of the oldest queued change (0 when the queue is empty).",
        Secs(m.queue.oldest_age_ms.unwrap_or(0)),
    );
    e.counter(
        "edgesync_changes_reported_total",
        "Changes queued (reported by local programs or made by the agent).",
        m.changes.reported,
    );
    e.counter(
        "edgesync_changes_sent_total",
        "Changes sent to the broker, resends included, since the agent started.",
        m.changes.sent,
    );
    e.counter(
        "edgesync_changes_acked_total",
        "Changes acknowledged by the broker and removed from the queue.",
        m.changes.acked,
    );
    e.counter(
        "edgesync_changes_resent_total",
        "Changes sent again after a reconnect, since the agent started.",
        m.changes.resent,
    );
    e.family(
        "edgesync_changes_dropped_total",
        "counter",
        "Queued changes dropped, by reason.",
    );
    e.sample(
        "edgesync_changes_dropped_total",
        &[("reason", "drop-oldest")],
        m.changes.dropped.drop_oldest,
    );
    e.sample(
        "edgesync_changes_dropped_total",
        &[("reason", "corrupt")],
        m.changes.dropped.corrupt,
    );
    e.family(
        "edgesync_changes_rejected_total",
        "counter",
        "Changes refused, by reason.",
    );
    e.sample(
        "edgesync_changes_rejected_total",
        &[("reason", "store-full")],
        m.changes.rejected.store_full,
    );
    e.sample(
        "edgesync_changes_rejected_total",
        &[("reason", "invalid-change")],
        m.changes.rejected.invalid_change,
    );
    if !m.classes.is_empty() {
        e.family(
            "edgesync_class_dropped_total",
            "counter",
            "Queued changes evicted from a full store, by retention class and reason, since start.",
        );
        for c in &m.classes {
            for (reason, n) in [
                ("expired", c.counters.expired),
                ("superseded", c.counters.superseded),
                ("oldest", c.counters.oldest),
            ] {
                let labels = [("class", c.name.as_str()), ("reason", reason)];
                e.sample("edgesync_class_dropped_total", &labels, n);
            }
        }
        e.family(
            "edgesync_class_filtered_total",
            "counter",
            "Reported changes not queued, by retention class and filter, since start.",
        );
        for c in &m.classes {
            for (reason, n) in [
                ("deadband", c.counters.deadband),
                ("dedupe", c.counters.dedupe),
            ] {
                let labels = [("class", c.name.as_str()), ("reason", reason)];
                e.sample("edgesync_class_filtered_total", &labels, n);
            }
        }
        e.family(
            "edgesync_class_heartbeats_total",
            "counter",
            "Changes queued only because max_interval had passed, by retention class, since start.",
        );
        for c in &m.classes {
            let labels = [("class", c.name.as_str())];
            e.sample(
                "edgesync_class_heartbeats_total",
                &labels,
                c.counters.heartbeat,
            );
        }
    }
    e.family(
        "edgesync_changes_in_per_second",
        "gauge",
        "Changes queued per second over the last interval.",
    );
    if let Some(v) = m.changes.in_per_s {
        e.sample("edgesync_changes_in_per_second", &[], v);
    }
    e.family(
        "edgesync_changes_out_per_second",
        "gauge",
        "Changes acknowledged per second over the last interval.",
    );
    if let Some(v) = m.changes.out_per_s {
        e.sample("edgesync_changes_out_per_second", &[], v);
    }
    e.counter(
        "edgesync_reconnects_total",
        "Reconnections to the broker since the agent started.",
        m.reconnects,
    );
    e.counter(
        "edgesync_retained_commands_total",
        "Retained messages on command topics ignored (not run), since the agent started.",
        m.retained_commands,
    );
    e.counter(
        "edgesync_intake_dropped_total",
        "Messages from the broker dropped because the intake was full, since start.",
        m.inbound.intake_dropped,
    );
    e.counter(
        "edgesync_intake_deferred_total",
        "QoS 1 messages from the broker deferred because the intake was full (sent again after a reconnect), since start.",
        m.inbound.intake_deferred,
    );
    e.counter(
        "edgesync_inbound_oversize_total",
        "Messages from the broker over the incoming packet limit, since start.",
        m.inbound.oversize_refused,
    );
    e.counter(
        "edgesync_inbound_foreign_total",
        "Messages from the broker on topics the agent does not act on, since start.",
        m.inbound.foreign_messages,
    );
    e.family(
        "edgesync_desired_version",
        "gauge",
        "The last applied desired-state version.",
    );
    if let Some(v) = m.desired_version {
        e.sample("edgesync_desired_version", &[], v);
    }
    e.family(
        "edgesync_resident_memory_bytes",
        "gauge",
        "Resident memory of the agent (VmRSS).",
    );
    if let Some(v) = m.rss_bytes {
        e.sample("edgesync_resident_memory_bytes", &[], v);
    }
    e.family(
        "edgesync_written_bytes_total",
        "counter",
        "Bytes the agent wrote to storage over the store file's life (/proc/self/io).",
    );
    if let Some(v) = m.written_bytes {
        e.sample("edgesync_written_bytes_total", &[], v);
    }
    e.family(
        "edgesync_written_bytes_per_second",
        "gauge",
        "Bytes the agent wrote per second over the last interval.",
    );
    if let Some(v) = m.written_bytes_per_s {
        e.sample("edgesync_written_bytes_per_second", &[], v);
    }
    e.family(
        "edgesync_written_gb_per_day",
        "gauge",
        "GB (10^9 bytes) a day the agent writes at the rate of the last interval.",
    );
    if let Some(v) = m.written_gb_per_day {
        e.sample("edgesync_written_gb_per_day", &[], v);
    }
    if !m.sources.is_empty() {
        source_families(&mut e, &m.sources);
    }
    e.gauge(
        "edgesync_uptime_seconds",
        "Seconds since the agent started.",
        m.uptime_s,
    );
    e.gauge(
        "edgesync_metrics_timestamp_seconds",
        "When these figures were taken (Unix time).",
        Secs(m.ts),
    );
    e.out
}

/// The local MQTT sources, labelled by their client id (present only with sources).
fn source_families(e: &mut Expo, sources: &[crate::health::status::SourceFigures]) {
    type Get = fn(&crate::health::status::SourceFigures) -> u64;
    let families: [(&str, &str, &str, Get); 5] = [
        (
            "edgesync_source_connected",
            "gauge",
            "Whether the local source is connected and subscribed.",
            |s| u64::from(s.connected),
        ),
        (
            "edgesync_source_received_total",
            "counter",
            "Messages received from the local broker, since start.",
            |s| s.received,
        ),
        (
            "edgesync_source_taken_total",
            "counter",
            "Messages taken in as changes (durable, then acknowledged), since start.",
            |s| s.taken,
        ),
        (
            "edgesync_source_invalid_total",
            "counter",
            "Messages that map to no valid change (acknowledged, not taken), since start.",
            |s| s.invalid,
        ),
        (
            "edgesync_source_backpressure",
            "gauge",
            "Whether the store refuses the source's changes (messages held unacknowledged).",
            |s| u64::from(s.backpressure),
        ),
    ];
    for (name, kind, help, get) in families {
        e.family(name, kind, help);
        for s in sources {
            e.sample(name, &[("source", &escape_label(&s.client_id))], get(s));
        }
    }
}

/// Milliseconds shown as seconds with three decimals.
struct Secs(u64);

impl std::fmt::Display for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:03}", self.0 / 1000, self.0 % 1000)
    }
}

struct Expo {
    out: String,
    /// The escaped device label value.
    device: String,
}

impl Expo {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// `labels` values must be escaped already.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{name}{{device=\"{}\"", self.device);
        for (k, v) in labels {
            let _ = write!(self.out, ",{k}=\"{v}\"");
        }
        let _ = writeln!(self.out, "}} {value}");
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }

    fn counter(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, "counter", help);
        self.sample(name, &[], value);
    }
}

/// A label value as the text format writes it: `\`, `"` and newline escaped.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The task.

/// Samples rates every interval and, when telemetry is on, hands the document to the link
/// (`feed`) and rewrites the text file; until `stop` is cancelled.
pub async fn run(
    mut config: watch::Receiver<Arc<crate::config::Config>>,
    identity: Arc<Identity>,
    outbox: Outbox,
    board: StatusBoard,
    feed: watch::Sender<Option<Vec<u8>>>,
    stop: CancellationToken,
) {
    let ticker = |t: &TelemetryConfig| {
        let mut tick = tokio::time::interval(t.interval.unwrap_or(SAMPLE_WHEN_OFF));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    };
    let mut telemetry = config.borrow_and_update().telemetry.clone();
    let mut tick = ticker(&telemetry);
    let mut textfile_error: Option<String> = None;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            // A reload may change the interval or the text file.
            Ok(()) = config.changed() => {
                let new = config.borrow_and_update().telemetry.clone();
                if new != telemetry {
                    telemetry = new;
                    tick = ticker(&telemetry);
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        let stats = outbox.stats();
        let at_ms = u64::try_from(board.started().elapsed().as_millis()).unwrap_or(u64::MAX);
        let written = write_bytes();
        if let Some(b) = written {
            outbox.note_written(b);
        }
        board.observe(Sample {
            at_ms,
            reported: stats.reported,
            acked: stats.acked,
            written,
        });
        if telemetry.interval.is_none() {
            continue;
        }
        let (id, ob, bd) = (Arc::clone(&identity), outbox.clone(), board.clone());
        let textfile = telemetry.textfile.clone();
        let done = tokio::task::spawn_blocking(move || {
            let m = collect(&id, &ob, &bd);
            let written = textfile.map(|path| {
                crate::sys::atomic_file::write(&path, prometheus(&m).as_bytes())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))
            });
            (m, written)
        })
        .await;
        let Ok((m, written)) = done else {
            tracing::error!("collecting metrics failed");
            continue;
        };
        match serde_json::to_vec(&m) {
            Ok(json) => {
                feed.send_replace(Some(json));
            }
            Err(e) => tracing::error!("encoding metrics failed: {e}"),
        }
        match written {
            // Once per distinct problem, not every interval.
            Some(Err(e)) if textfile_error.as_deref() != Some(e.as_str()) => {
                tracing::warn!("telemetry.textfile: {e}");
                textfile_error = Some(e);
            }
            Some(Ok(())) if textfile_error.take().is_some() => {
                tracing::info!("telemetry.textfile: written again");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgesync_testkit::exposition::{self, samples_by_series};

    fn sample(at_ms: u64, reported: u64, acked: u64) -> Sample {
        Sample {
            at_ms,
            reported,
            acked,
            written: None,
        }
    }

    #[test]
    fn bytes_written_per_second_and_per_day() {
        let mut m = RateMeter::default();
        let w = |at_ms, written| Sample {
            written,
            ..sample(at_ms, 0, 0)
        };
        assert_eq!(m.observe(w(0, Some(1_000))), None);
        // 600 KB over 60 s: 10 kB/s, 0.864 GB a day.
        let r = m.observe(w(60_000, Some(601_000))).unwrap();
        assert_eq!(r.written_per_s, Some(10_000.0));
        assert_eq!(gb_per_day(10_000.0), 0.864);
        // Idle: zero, not unknown.
        let r = m.observe(w(120_000, Some(601_000))).unwrap();
        assert_eq!(r.written_per_s, Some(0.0));
        assert_eq!(gb_per_day(0.0), 0.0);
        // Unknown on either side (no /proc/self/io): no rate, the change rates stand.
        let r = m.observe(w(180_000, None)).unwrap();
        assert_eq!((r.written_per_s, r.in_per_s), (None, 0.0));
        assert_eq!(m.observe(w(240_000, Some(5))).unwrap().written_per_s, None);
        // 57 KB per change at 1 change/s (issue 16's before): ~4.9 GB a day.
        assert_eq!(gb_per_day(57_000.0), 4.925);
        assert_eq!(
            parse_write_bytes("rchar: 1\nwrite_bytes: 4096\ncancelled_write_bytes: 0\n"),
            Some(4096)
        );
        assert_eq!(parse_write_bytes("rchar: 1\n"), None);
        assert_eq!(parse_write_bytes("write_bytes: x\n"), None);
    }

    #[test]
    fn rates_come_from_counter_deltas_between_two_samples() {
        let mut m = RateMeter::default();
        assert_eq!(m.observe(sample(1_000, 100, 50)), None);
        let r = m.observe(sample(3_000, 120, 90)).unwrap();
        assert_eq!(r.in_per_s, 10.0);
        assert_eq!(r.out_per_s, 20.0);
        assert_eq!(r.window_ms, 2_000);
        // The next window stands on its own.
        let r = m.observe(sample(3_500, 121, 90)).unwrap();
        assert_eq!((r.in_per_s, r.out_per_s, r.window_ms), (2.0, 0.0, 500));
        assert_eq!(m.rates(), Some(r));
        // Thirds are rounded to milliunits.
        let r = m.observe(sample(6_500, 122, 90)).unwrap();
        assert_eq!(r.in_per_s, 0.333);
    }

    #[test]
    fn a_sample_at_the_same_time_keeps_the_last_rates_and_a_reset_clears_them() {
        let mut m = RateMeter::default();
        m.observe(sample(0, 0, 0));
        let r = m.observe(sample(1_000, 5, 5));
        assert!(r.is_some());
        assert_eq!(m.observe(sample(1_000, 50, 50)), r);
        assert_eq!(m.observe(sample(900, 50, 50)), r);
        // Counters going backwards (another store): no rate for that window.
        assert_eq!(m.observe(sample(2_000, 1, 1)), None);
        // The next window is measured from the reset.
        let r = m.observe(sample(3_000, 4, 2)).unwrap();
        assert_eq!((r.in_per_s, r.out_per_s), (3.0, 1.0));
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let text = "Name:\tedgesync\nVmPeak:\t  9000 kB\nVmRSS:\t    5120 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(text), Some(5120 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert_eq!(parse_vm_rss("VmRSS: lots kB\n"), None);
        assert_eq!(parse_vm_rss("VmRSS: 1 GB\n"), None);
        // This process has one on Linux.
        if cfg!(target_os = "linux") {
            assert!(rss_bytes().is_some_and(|b| b > 0));
        }
    }

    fn inputs() -> Inputs {
        Inputs {
            now_ms: 1_764_150_010_500,
            device: "pump-0042".into(),
            queue: QueueStats {
                depth: 3,
                bytes: 300,
                next_seq: 11,
                max_bytes: 1 << 20,
                reported: 10,
                acked: 7,
                dropped: 1,
                rejected: 2,
                corrupt: 0,
                state_bytes: 0,
                max_state_bytes: 1 << 19,
            },
            oldest_ts: Some(1_764_150_000_000),
            link: LinkFigures {
                state: LinkState::Online,
                since: Some(1),
                down_since: None,
                attempts: 0,
                next_attempt_at: None,
                node: None,
                last_error: Some("broker said \"no\"".into()),
                last_sync: None,
                sent: 8,
                resent: 1,
                reconnects: 4,
                inflight_batches: 0,
                store_error: None,
                reload: Default::default(),
                retained_commands: 3,
                inbound: crate::health::status::Inbound {
                    intake_dropped: 11,
                    intake_deferred: 14,
                    oversize_refused: 12,
                    foreign_messages: 13,
                },
                shadow: None,
                twin: None,
                jobs: None,
                hub_commands: None,
            },
            rates: Some(Rates {
                in_per_s: 1.5,
                out_per_s: 0.25,
                window_ms: 60_000,
                written_per_s: Some(2_500.0),
            }),
            invalid_changes: 5,
            desired_version: Some(7),
            rss_bytes: Some(4 << 20),
            uptime: Duration::from_secs(61),
            written_bytes: Some(7 << 20),
            sources: Vec::new(),
            classes: Vec::new(),
        }
    }

    #[test]
    fn the_document_holds_every_figure() {
        let m = build(&inputs());
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["device"], "pump-0042");
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["connection"], "online");
        assert_eq!(v["uptime_s"], 61);
        assert_eq!(v["rss_bytes"], 4 << 20);
        assert_eq!(v["queue"]["depth"], 3);
        assert_eq!(v["queue"]["bytes"], 300);
        assert_eq!(v["queue"]["oldest_age_ms"], 10_500);
        assert_eq!(v["changes"]["in_per_s"], 1.5);
        assert_eq!(v["changes"]["out_per_s"], 0.25);
        assert_eq!(v["changes"]["dropped"]["drop-oldest"], 1);
        assert_eq!(v["changes"]["rejected"]["store-full"], 2);
        assert_eq!(v["changes"]["rejected"]["invalid-change"], 5);
        assert_eq!(v["reconnects"], 4);
        assert_eq!(v["last_error"], "broker said \"no\"");
        assert_eq!(v["desired_version"], 7);
        assert_eq!(v["retained_commands"], 3);
        assert_eq!(v["inbound"]["intake_dropped"], 11);
        assert_eq!(v["inbound"]["intake_deferred"], 14);
        assert_eq!(v["inbound"]["oversize_refused"], 12);
        assert_eq!(v["inbound"]["foreign_messages"], 13);
        assert_eq!(v["written_bytes"], 7 << 20);
        assert_eq!(v["written_bytes_per_s"], 2_500.0);
        assert_eq!(v["written_gb_per_day"], 0.216);
        let back: Metrics = serde_json::from_value(v).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn the_exposition_is_valid_and_labels_every_sample_with_the_device() {
        let text = prometheus(&build(&inputs()));
        let samples = exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(
            samples
                .iter()
                .all(|s| s.label("device") == Some("pump-0042"))
        );
        let by = samples_by_series(&samples);
        for (series, want) in [
            ("edgesync_connected", 1.0),
            ("edgesync_queue_depth", 3.0),
            ("edgesync_queue_bytes", 300.0),
            ("edgesync_oldest_queued_age_seconds", 10.5),
            ("edgesync_changes_reported_total", 10.0),
            ("edgesync_changes_acked_total", 7.0),
            ("edgesync_changes_dropped_total{reason=drop-oldest}", 1.0),
            ("edgesync_changes_rejected_total{reason=store-full}", 2.0),
            (
                "edgesync_changes_rejected_total{reason=invalid-change}",
                5.0,
            ),
            ("edgesync_changes_in_per_second", 1.5),
            ("edgesync_reconnects_total", 4.0),
            ("edgesync_retained_commands_total", 3.0),
            ("edgesync_intake_dropped_total", 11.0),
            ("edgesync_intake_deferred_total", 14.0),
            ("edgesync_inbound_oversize_total", 12.0),
            ("edgesync_inbound_foreign_total", 13.0),
            ("edgesync_desired_version", 7.0),
            ("edgesync_resident_memory_bytes", f64::from(4u32 << 20)),
            ("edgesync_uptime_seconds", 61.0),
            ("edgesync_written_bytes_total", f64::from(7u32 << 20)),
            ("edgesync_written_bytes_per_second", 2_500.0),
            ("edgesync_written_gb_per_day", 0.216),
        ] {
            assert_eq!(by.get(series), Some(&want), "{series}\n{text}");
        }
        assert!(text.contains("# TYPE edgesync_changes_acked_total counter\n"));
        assert!(text.contains("# HELP edgesync_queue_depth "));
        // Unknown figures have a family but no sample.
        let mut i = inputs();
        i.desired_version = None;
        i.rss_bytes = None;
        i.rates = None;
        i.written_bytes = None;
        i.oldest_ts = None;
        i.link.state = LinkState::Offline;
        let text = prometheus(&build(&i));
        let by = samples_by_series(&exposition::parse(&text).unwrap());
        assert!(!by.contains_key("edgesync_desired_version"));
        assert!(!by.contains_key("edgesync_resident_memory_bytes"));
        assert!(!by.contains_key("edgesync_written_bytes_total"));
        assert!(!by.contains_key("edgesync_written_gb_per_day"));
        assert_eq!(by["edgesync_connected"], 0.0);
        assert_eq!(by["edgesync_oldest_queued_age_seconds"], 0.0);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut i = inputs();
        i.device = "a\"b\\c\nd".into();
        let samples = exposition::parse(&prometheus(&build(&i))).unwrap();
        assert!(
            samples
                .iter()
                .all(|s| s.label("device") == Some("a\"b\\c\nd"))
        );
    }
}
