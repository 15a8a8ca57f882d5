//! The agent's status document (docs/PROTOCOL.md §2 `status --json`): what the link, the queue and the
//! counters look like now. The link side lives in a [`StatusBoard`] that the sync engine
//! updates; the queue side is read from the outbox when a status is asked for. The board
//! also keeps what the health figures ([`crate::health::metrics`]) need beyond that: the start time,
//! the rate meter and the count of changes refused as invalid.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::health::metrics::{self, Metrics, RateMeter, Rates, Sample};
use crate::model::text::{human_bytes, human_duration, human_rate};
use crate::store::Outbox;

/// Connection state as docs/PROTOCOL.md §2 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Online,
    Connecting,
    #[default]
    Offline,
}

/// Link-side figures, updated by the sync engine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkFigures {
    pub state: LinkState,
    /// Unix ms of the last change of `state`.
    pub since: Option<u64>,
    /// Unix ms when the link went down (or the agent started unconnected); not moved by
    /// retries; `None` while online.
    #[serde(default)]
    pub down_since: Option<u64>,
    /// Connection attempts since then.
    #[serde(default)]
    pub attempts: u64,
    /// Unix ms of the next attempt while waiting in the backoff.
    #[serde(default)]
    pub next_attempt_at: Option<u64>,
    pub last_error: Option<String>,
    /// Unix ms of the last acknowledged batch.
    pub last_sync: Option<u64>,
    pub sent: u64,
    pub resent: u64,
    pub reconnects: u64,
    pub inflight_batches: u64,
    /// The broker node in use or being tried (`mqtt.urls`: the URL and its position from
    /// 0); `None` with a single broker URL.
    #[serde(default)]
    pub node: Option<(String, u64)>,
    /// The store fault the link is retrying through (a failed read or delete), if any.
    #[serde(default)]
    pub store_error: Option<String>,
    /// The last config reload.
    #[serde(default)]
    pub reload: ReloadStatus,
    /// Retained messages on command topics ignored since start (docs/PROTOCOL.md §7).
    #[serde(default)]
    pub retained_commands: u64,
    /// Incoming messages refused or dropped by the link, since start.
    #[serde(default)]
    pub inbound: Inbound,
    /// The Device Shadow of the `aws-iot` profile; `None` with the `edgesync` profile.
    #[serde(skip)]
    pub shadow: Option<ShadowFigures>,
    /// The device twin of the `azure-iot-hub` profile (the same figures); `None` otherwise.
    #[serde(skip)]
    pub twin: Option<ShadowFigures>,
    /// AWS IoT Jobs of the `aws-iot` profile; `None` with the `edgesync` profile.
    #[serde(skip)]
    pub jobs: Option<JobFigures>,
    /// Direct methods and cloud-to-device messages of the `azure-iot-hub` profile; `None`
    /// with the other profiles.
    #[serde(skip)]
    pub hub_commands: Option<HubCommandFigures>,
}

/// Direct methods and cloud-to-device messages of the `azure-iot-hub` profile, since start
/// (metrics `hub_commands`, also in the status document's `metrics`; docs/PROTOCOL.md §7.4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HubCommandFigures {
    /// Direct method calls taken in.
    pub methods: u64,
    /// Method answers not sent: their connection ended first (IoT Hub has failed the call).
    pub method_answers_dropped: u64,
    /// Cloud-to-device messages taken in as commands.
    pub c2d_commands: u64,
    /// Cloud-to-device messages that are not commands: acknowledged, not acted on.
    pub c2d_not_commands: u64,
}

/// AWS IoT Jobs of the `aws-iot` profile, since start (metrics `jobs`, also in the status
/// document's `metrics`; docs/PROTOCOL.md §7.3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JobFigures {
    /// Executions taken from `start-next` and handed to the commands (a job that comes back
    /// counts again; it runs once).
    pub taken: u64,
    /// Updates accepted: `SUCCEEDED`, `FAILED`.
    pub succeeded: u64,
    pub failed: u64,
    /// `start-next` sent again: after a passing rejection, or an answer overdue.
    pub retried: u64,
    /// Jobs left after a final rejection of their update (or too many passing ones).
    pub left: u64,
    /// Rejections of a repeated answer of a job that had ended already.
    pub repeats_refused: u64,
    /// The last rejection: job, code and message.
    pub last_rejection: Option<String>,
}

/// The Device Shadow of the `aws-iot` profile, since start (metrics `shadow`, also in the
/// status document's `metrics`; docs/PROTOCOL.md §7.3); the device twin of the
/// `azure-iot-hub` profile likewise (metrics `twin`, §7.4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ShadowFigures {
    /// Updates of reported values accepted.
    pub accepted: u64,
    /// Updates sent again: rejected with 409, 429, 5xx or another passing code, or not
    /// answered within 30 s.
    pub retried: u64,
    /// Reported keys dropped: rejected for good (400, 413), or too large or deep for a shadow.
    pub dropped_keys: u64,
    /// Deltas (and `/get` answers) handed to the desired-state pipeline.
    pub deltas: u64,
    /// The last rejection: shadow, code and message.
    pub last_rejection: Option<String>,
}

/// Incoming messages the link refused or dropped, since start (status `counters`, metrics
/// `inbound`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Inbound {
    /// Messages dropped because the intake was full (bounded in bytes and count): QoS 0, and
    /// QoS 1 beyond a clean session's hard bound.
    pub intake_dropped: u64,
    /// QoS 1 messages not acknowledged because the intake was full: the broker sends them
    /// again after the reconnect that follows once the intake has drained.
    pub intake_deferred: u64,
    /// Messages over the incoming packet limit (never read whole).
    pub oversize_refused: u64,
    /// Messages on topics the agent does not act on (e.g. via a leftover wildcard
    /// subscription in its broker session).
    pub foreign_messages: u64,
}

/// One local MQTT source (`[[source.mqtt]]`, docs/PROTOCOL.md §7.1), since start (metrics
/// `sources`, also in the status document's `metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceFigures {
    pub url: String,
    pub filter: String,
    pub client_id: String,
    /// Connected and subscribed.
    pub connected: bool,
    /// Messages received (a message the broker sends again counts again).
    pub received: u64,
    /// Messages taken in as changes (durable, then acknowledged).
    pub taken: u64,
    /// Messages that map to no valid change: acknowledged and not taken.
    pub invalid: u64,
    pub last_invalid: Option<String>,
    /// The store refuses changes (full, `when_full = "reject"`, or failing): messages are
    /// held unacknowledged, so the local broker keeps them, and retried.
    pub backpressure: bool,
    /// Messages received and not yet acknowledged.
    pub held: u64,
    /// Why the last connection ended or failed.
    pub last_error: Option<String>,
}

/// Shared, cheap-to-clone holder of the link figures (and of the metrics' own state).
#[derive(Debug, Clone, Default)]
pub struct StatusBoard(Arc<Mutex<Board>>);

#[derive(Debug)]
struct Board {
    link: LinkFigures,
    /// When the agent started (the board is made at start).
    started: Instant,
    rates: RateMeter,
    /// Changes of requests refused at the socket as `invalid-change`.
    invalid_changes: u64,
    /// Bumped by `edgesync reconnect` while the link waits to retry (see [`StatusBoard::retry_now`]).
    retry: watch::Sender<u64>,
    /// The local MQTT sources, in config order.
    sources: Vec<SourceFigures>,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            link: LinkFigures::default(),
            started: Instant::now(),
            rates: RateMeter::default(),
            invalid_changes: 0,
            retry: watch::Sender::new(0),
            sources: Vec::new(),
        }
    }
}

impl StatusBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn snapshot(&self) -> LinkFigures {
        self.lock().link.clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut LinkFigures)) {
        f(&mut self.lock().link);
    }

    /// Sets the local sources' figures (at start).
    pub fn set_sources(&self, sources: Vec<SourceFigures>) {
        self.lock().sources = sources;
    }

    /// Updates source `i`'s figures.
    pub fn source(&self, i: usize, f: impl FnOnce(&mut SourceFigures)) {
        if let Some(s) = self.lock().sources.get_mut(i) {
            f(s);
        }
    }

    pub fn sources(&self) -> Vec<SourceFigures> {
        self.lock().sources.clone()
    }

    /// When the board (the agent) started.
    pub fn started(&self) -> Instant {
        self.lock().started
    }

    /// Feeds the rate meter; returns the rates of the window this sample closes.
    pub fn observe(&self, s: Sample) -> Option<Rates> {
        self.lock().rates.observe(s)
    }

    /// Rates of the last completed window.
    pub fn rates(&self) -> Option<Rates> {
        self.lock().rates.rates()
    }

    /// Counts `n` changes refused as `invalid-change`.
    pub fn count_invalid(&self, n: u64) {
        let mut b = self.lock();
        b.invalid_changes = b.invalid_changes.saturating_add(n);
    }

    pub fn invalid_changes(&self) -> u64 {
        self.lock().invalid_changes
    }

    /// `edgesync reconnect`: ends the link's backoff wait if it is offline (a try under way
    /// or a live connection is left alone). Returns the state it found.
    pub fn retry_now(&self) -> LinkState {
        let b = self.lock();
        if b.link.state == LinkState::Offline {
            b.retry.send_modify(|n| *n = n.wrapping_add(1));
        }
        b.link.state
    }

    /// What the link waits on for [`Self::retry_now`].
    pub fn retry_signal(&self) -> watch::Receiver<u64> {
        self.lock().retry.subscribe()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub agent: AgentInfo,
    pub connection: Connection,
    pub queue: Queue,
    pub counters: Counters,
    pub desired: Desired,
    /// The health figures, as published on `P/D/metrics`.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// The last config reload (SIGHUP or the `reload` command).
    #[serde(default)]
    pub reload: ReloadStatus,
    /// Which `counters` are kept in the store file and which count since start.
    #[serde(skip_deserializing)]
    pub counter_scopes: CounterScopes,
    /// Per retention class (`[[store.class]]` only): evicted and filtered changes, since
    /// start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<crate::store::class::ClassStats>,
}

/// The scope of each counter (docs/PROTOCOL.md §2.3), as the status document labels them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CounterScopes {
    pub persistent: &'static [&'static str],
    pub since_start: &'static [&'static str],
}

impl Default for CounterScopes {
    fn default() -> Self {
        CounterScopes {
            persistent: &[
                "reported",
                "acked",
                "dropped",
                "rejected",
                "corrupt",
                "written_bytes",
            ],
            since_start: &[
                "sent",
                "resent",
                "reconnects",
                "retained_commands",
                "intake_dropped",
                "intake_deferred",
                "oversize_refused",
                "foreign_messages",
            ],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub device: String,
    pub store: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Connection {
    pub state: LinkState,
    pub broker: String,
    pub since: Option<u64>,
    pub last_error: Option<String>,
    pub last_sync: Option<u64>,
    pub inflight_batches: u64,
    /// When the link went down; `null` while online.
    #[serde(default)]
    pub down_since: Option<u64>,
    /// Connection attempts since `down_since`.
    #[serde(default)]
    pub attempts: u64,
    /// Ms until the next attempt while waiting to retry, else `null`.
    #[serde(default)]
    pub next_attempt_in: Option<u64>,
    /// With `mqtt.urls`: the node in use or being tried, and its position in the list from
    /// 0; absent with a single `mqtt.url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_index: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Queue {
    pub depth: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub oldest_ts: Option<u64>,
    pub next_seq: u64,
    /// A store fault the link is retrying through (reads or deletes failing), while it lasts.
    #[serde(default)]
    pub store_error: Option<String>,
    /// Bytes of `max_bytes` held by the latest values and the desired state.
    #[serde(default)]
    pub state_bytes: u64,
    /// The most the latest values and desired state may take (half of `max_bytes`).
    #[serde(default)]
    pub max_state_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub reported: u64,
    pub sent: u64,
    pub acked: u64,
    pub resent: u64,
    pub dropped: u64,
    pub rejected: u64,
    pub reconnects: u64,
    /// Retained messages on command topics ignored since start, not run (docs/PROTOCOL.md §7).
    #[serde(default)]
    pub retained_commands: u64,
    /// Damaged queued records skipped and removed, never sent (persistent).
    #[serde(default)]
    pub corrupt: u64,
    #[serde(flatten)]
    pub inbound: Inbound,
    /// Bytes the agent wrote over the store's life (persistent); `null` where unknown.
    #[serde(default)]
    pub written_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub version: Option<u64>,
}

/// Static facts the status repeats.
#[derive(Debug, Clone)]
pub struct Identity {
    pub device: String,
    pub broker: String,
}

/// Builds the status, with its health figures and the desired version, from the outbox and
/// the board (two short read transactions).
pub fn collect(identity: &Identity, outbox: &Outbox, board: &StatusBoard) -> Status {
    from_inputs(
        identity,
        outbox.path(),
        &metrics::gather(identity, outbox, board),
    )
}

/// The status of figures read already.
pub fn from_inputs(identity: &Identity, store: &Path, inputs: &metrics::Inputs) -> Status {
    let q = inputs.queue;
    let oldest_ts = inputs.oldest_ts;
    let link = inputs.link.clone();
    Status {
        agent: AgentInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            device: identity.device.clone(),
            store: store.display().to_string(),
        },
        connection: Connection {
            state: link.state,
            broker: identity.broker.clone(),
            since: link.since,
            last_error: link.last_error,
            last_sync: link.last_sync,
            inflight_batches: link.inflight_batches,
            down_since: link.down_since,
            attempts: link.attempts,
            next_attempt_in: link
                .next_attempt_at
                .map(|t| t.saturating_sub(inputs.now_ms)),
            url: link.node.as_ref().map(|n| n.0.clone()),
            url_index: link.node.as_ref().map(|n| n.1),
        },
        queue: Queue {
            depth: q.depth,
            bytes: q.bytes,
            max_bytes: q.max_bytes,
            oldest_ts,
            next_seq: q.next_seq,
            store_error: link.store_error.clone(),
            state_bytes: q.state_bytes,
            max_state_bytes: q.max_state_bytes,
        },
        counters: Counters {
            reported: q.reported,
            sent: link.sent,
            acked: q.acked,
            resent: link.resent,
            dropped: q.dropped,
            rejected: q.rejected,
            reconnects: link.reconnects,
            retained_commands: link.retained_commands,
            corrupt: q.corrupt,
            inbound: link.inbound,
            written_bytes: inputs.written_bytes,
        },
        desired: Desired {
            version: inputs.desired_version,
        },
        metrics: Some(metrics::build(inputs)),
        reload: link.reload.clone(),
        counter_scopes: CounterScopes::default(),
        classes: inputs.classes.clone(),
    }
}

/// A few lines for people (`edgesync status`).
pub fn render(s: &Status, now_ms: u64) -> String {
    let ago = |t: Option<u64>| match t {
        Some(t) => format!("{} ago", human_duration(now_ms.saturating_sub(t))),
        None => "-".to_owned(),
    };
    let state = match s.connection.state {
        LinkState::Online => "online",
        LinkState::Connecting => "connecting",
        LinkState::Offline => "offline",
    };
    let c = &s.connection;
    // Offline: how long the link has been down (not since the last retry) and what next.
    let link = match (c.state, c.down_since) {
        (LinkState::Online, _) | (_, None) => format!("since {}", ago(c.since)),
        (_, Some(down)) => format!(
            "down for {}, {} attempt(s), {}",
            human_duration(now_ms.saturating_sub(down)),
            c.attempts,
            c.next_attempt_in.map_or_else(
                || "trying now".to_owned(),
                |t| format!("next in {} (edgesync reconnect: now)", human_duration(t))
            )
        ),
    };
    let mut out = format!(
        "edgesync {} · device {}\n\
         connection  {state} to {} ({link}, last sync {})\n",
        s.agent.version,
        s.agent.device,
        c.url.as_deref().unwrap_or(&c.broker),
        ago(c.last_sync),
    );
    if !s.reload.problems.is_empty() {
        out.push_str(&format!(
            "config      reload refused ({} problem(s)), running the previous config: {}\n",
            s.reload.problems.len(),
            s.reload.problems.join("; ")
        ));
    }
    if !s.reload.needs_restart.is_empty() {
        out.push_str(&format!(
            "config      changed, applied at the next restart: {}\n",
            s.reload.needs_restart.join(", ")
        ));
    }
    if let Some(e) = &s.connection.last_error {
        out.push_str(&format!("last error  {e}\n"));
    }
    if let Some(e) = &s.queue.store_error {
        out.push_str(&format!("store error {e}\n"));
    }
    if s.counters.corrupt > 0 {
        out.push_str(&format!(
            "store       {} damaged queued change(s) skipped, never sent (see the log)\n",
            s.counters.corrupt
        ));
    }
    // Counters by scope (docs/PROTOCOL.md §2.3); "rejected" with the error code as reason.
    let k = &s.counters;
    let invalid = s
        .metrics
        .as_ref()
        .map_or(0, |m| m.changes.rejected.invalid_change);
    out.push_str(&format!(
        "queue       {} changes, {} of {} (oldest {}), next seq {}\n\
         store file  reported {} · acked {} · dropped {} · rejected store-full {}\n\
         since start sent {} · resent {} · reconnects {} · rejected invalid-change {invalid}\n\
         desired     version {}\n",
        s.queue.depth,
        human_bytes(s.queue.bytes),
        human_bytes(s.queue.max_bytes),
        ago(s.queue.oldest_ts),
        s.queue.next_seq,
        k.reported,
        k.acked,
        k.dropped,
        k.rejected,
        k.sent,
        k.resent,
        k.reconnects,
        s.desired
            .version
            .map_or_else(|| "-".to_owned(), |v| v.to_string()),
    ));
    if s.counters.retained_commands > 0 {
        out.push_str(&format!(
            "commands    {} retained request(s) ignored, not run (publish commands unretained)\n",
            s.counters.retained_commands
        ));
    }
    for src in s.metrics.iter().flat_map(|m| &m.sources) {
        out.push_str(&format!(
            "source      {} {} on {}: received {} · taken {} · invalid {}{}{}\n",
            if src.connected {
                "connected"
            } else {
                "disconnected"
            },
            src.filter,
            src.url,
            src.received,
            src.taken,
            src.invalid,
            src.last_invalid
                .as_ref()
                .map_or_else(String::new, |r| format!(" (last: {r})")),
            if src.backpressure {
                format!(" · store refusing: {} held unacknowledged", src.held)
            } else {
                String::new()
            },
        ));
    }
    let i = s.counters.inbound;
    if i != Inbound::default() {
        out.push_str(&format!(
            "inbound     {} QoS 0 dropped, {} QoS 1 deferred (intake full) · {} over the packet limit · {} on foreign topics\n",
            i.intake_dropped, i.intake_deferred, i.oversize_refused, i.foreign_messages
        ));
    }
    if let Some(m) = &s.metrics {
        let rate = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), human_rate);
        out.push_str(&format!(
            "health      in {} · out {} · memory {} · up {}\n",
            rate(m.changes.in_per_s),
            rate(m.changes.out_per_s),
            m.rss_bytes.map_or_else(|| "-".to_owned(), human_bytes),
            human_duration(m.uptime_s.saturating_mul(1000)),
        ));
        if let Some(w) = m.written_bytes {
            out.push_str(&format!("written     {} (store file)", human_bytes(w)));
            if let (Some(r), Some(d)) = (m.written_bytes_per_s, m.written_gb_per_day) {
                out.push_str(&format!(
                    " · {}/s now · {d:.2} GB/day at this rate",
                    human_bytes(r as u64)
                ));
            }
            out.push('\n');
        }
    }
    out
}

/// The outcome of the last reload, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ReloadStatus {
    /// Unix ms of the last reload attempt.
    pub at: Option<u64>,
    /// Every problem of the last attempt (empty when it was applied).
    pub problems: Vec<String>,
    /// Settings changed in the file that only a restart applies.
    pub needs_restart: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_json_has_the_spec_fields() {
        let s = Status {
            agent: AgentInfo {
                version: "0.1.0".into(),
                device: "d".into(),
                store: "/x".into(),
            },
            connection: Connection {
                state: LinkState::Offline,
                broker: "mqtts://b:8883".into(),
                since: None,
                last_error: None,
                last_sync: None,
                inflight_batches: 0,
                down_since: Some(4_000),
                attempts: 3,
                next_attempt_in: Some(20_000),
                url: None,
                url_index: None,
            },
            queue: Queue {
                depth: 1,
                bytes: 2,
                max_bytes: 3,
                oldest_ts: Some(4),
                next_seq: 5,
                store_error: None,
                state_bytes: 6,
                max_state_bytes: 7,
            },
            counters: Counters {
                reported: 1,
                sent: 0,
                acked: 0,
                resent: 0,
                dropped: 0,
                rejected: 0,
                reconnects: 0,
                retained_commands: 0,
                corrupt: 0,
                inbound: Inbound::default(),
                written_bytes: None,
            },
            desired: Desired { version: None },
            reload: Default::default(),
            metrics: None,
            counter_scopes: CounterScopes::default(),
            classes: Vec::new(),
        };
        let v = serde_json::to_value(&s).unwrap();
        for path in [
            "/connection/state",
            "/connection/broker",
            "/connection/since",
            "/connection/last_error",
            "/queue/depth",
            "/queue/bytes",
            "/queue/oldest_ts",
            "/queue/next_seq",
            "/counters/reported",
            "/counters/sent",
            "/counters/acked",
            "/counters/resent",
            "/counters/dropped",
            "/counters/rejected",
            "/counters/reconnects",
            "/desired/version",
        ] {
            assert!(v.pointer(path).is_some(), "{path} missing");
        }
        assert_eq!(v["connection"]["state"], "offline");
        assert_eq!(v["connection"]["down_since"], 4_000);
        assert_eq!(v["connection"]["attempts"], 3);
        assert_eq!(v["connection"]["next_attempt_in"], 20_000);
        // Every counter is labelled with its scope, once.
        let counters = v["counters"].as_object().unwrap();
        let scopes = &v["counter_scopes"];
        let mut labelled: Vec<&str> = ["persistent", "since_start"]
            .iter()
            .flat_map(|k| scopes[k].as_array().unwrap())
            .map(|n| n.as_str().unwrap())
            .collect();
        labelled.sort_unstable();
        let mut names: Vec<&str> = counters.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(labelled, names);
        let text = render(&s, 10_000);
        assert!(text.contains("1 changes"), "{text}");
        // Down for 6 s (not since the last try), the next try in 20 s.
        assert!(
            text.contains("offline to mqtts://b:8883 (down for 6s, 3 attempt(s), next in 20s"),
            "{text}"
        );
        assert!(text.contains("store file  reported 1 · acked 0"), "{text}");
        assert!(text.contains("since start sent 0 ·"), "{text}");
        let mut online = s.clone();
        online.connection.state = LinkState::Online;
        online.connection.since = Some(9_000);
        assert!(render(&online, 10_000).contains("online to mqtts://b:8883 (since 1s ago"));
        // An older daemon's status (no counter_scopes, no down_since) still reads.
        let mut old = v.clone();
        old.as_object_mut().unwrap().remove("counter_scopes");
        old["connection"]
            .as_object_mut()
            .unwrap()
            .remove("down_since");
        let old: Status = serde_json::from_value(old).unwrap();
        assert_eq!(old.connection.down_since, None);
    }

    #[test]
    fn status_carries_the_metrics_and_reads_without_them() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&crate::store::StoreOptions {
            path: dir.path().join("s.redb"),
            max_bytes: 1 << 20,
            when_full: crate::store::WhenFull::Reject,
            cache_size: 1 << 20,
        })
        .unwrap();
        let board = StatusBoard::default();
        board.count_invalid(3);
        board.observe(Sample {
            at_ms: 0,
            reported: 0,
            acked: 0,
            written: Some(0),
        });
        board.observe(Sample {
            at_ms: 2_000,
            reported: 4,
            acked: 2,
            written: Some(16_384),
        });
        let identity = Identity {
            device: "d".into(),
            broker: "mqtts://b:8883".into(),
        };
        let s = collect(&identity, &outbox, &board);
        outbox.shutdown_blocking();
        let m = s.metrics.as_ref().unwrap();
        assert_eq!(m.device, "d");
        assert_eq!(m.changes.rejected.invalid_change, 3);
        assert_eq!(m.changes.in_per_s, Some(2.0));
        assert_eq!(m.changes.out_per_s, Some(1.0));
        assert_eq!(m.queue.oldest_age_ms, None);
        let text = render(&s, 10_000);
        assert!(
            text.contains("health      in 2.0/s · out 1.0/s · memory"),
            "{text}"
        );
        assert!(text.contains("rejected invalid-change 3\n"), "{text}");
        // 8 KiB/s: 0.71 GB a day. This process's own bytes written, where /proc tells.
        if let Some(w) = s.counters.written_bytes {
            assert_eq!(m.written_bytes, Some(w));
            assert!(
                text.contains(" (store file) · 8.0 KiB/s now · 0.71 GB/day at this rate\n"),
                "{text}"
            );
        }
        assert!(!text.contains("inbound"), "{text}");
        let mut noisy = s.clone();
        noisy.counters.inbound.intake_dropped = 5;
        assert!(
            render(&noisy, 10_000)
                .contains("inbound     5 QoS 0 dropped, 0 QoS 1 deferred (intake full)"),
            "{}",
            render(&noisy, 10_000)
        );
        // A status from a daemon without metrics still reads.
        let mut v = serde_json::to_value(&s).unwrap();
        v.as_object_mut().unwrap().remove("metrics");
        // Nor the inbound counters.
        for k in [
            "intake_dropped",
            "intake_deferred",
            "oversize_refused",
            "foreign_messages",
        ] {
            v["counters"].as_object_mut().unwrap().remove(k);
        }
        let old: Status = serde_json::from_value(v).unwrap();
        assert_eq!(old.metrics, None);
        assert_eq!(old.counters.inbound, Inbound::default());
        assert!(!render(&old, 10_000).contains("inbound"));
        assert!(!render(&old, 10_000).contains("health"));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(256 << 20), "256.0 MiB");
        assert_eq!(human_duration(500), "500ms");
        assert_eq!(human_duration(90_000), "90s");
        assert_eq!(human_duration(600_000), "10m");
    }
}
