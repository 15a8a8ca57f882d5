//! An AWS IoT Core emulator: the Device Shadow and Jobs services, played by an MQTT client
//! of a real broker (Mosquitto) on AWS's reserved `$aws/things/...` topics. Written from the
//! AWS documentation (no AWS code):
//!
//! | behaviour | page |
//! | --- | --- |
//! | shadow topics, who publishes what | <https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-mqtt.html> |
//! | documents, metadata, delta, versions, clientToken, arrays | <https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-document.html> |
//! | update/get/delete flows, `null` deletes, optimistic locking, delete keeps the version | <https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-data-flow.html> |
//! | error codes and messages | <https://docs.aws.amazon.com/iot/latest/developerguide/device-shadow-error-messages.html> |
//! | 8 KB of desired + reported (metadata excluded) | <https://docs.aws.amazon.com/iot/latest/developerguide/diagnosing-shadows.html> |
//! | depth 6, 10 in-flight requests, 128 KB messages | <https://docs.aws.amazon.com/general/latest/gr/iot-core.html> |
//! | Jobs device MQTT API | <https://docs.aws.amazon.com/iot/latest/developerguide/jobs-mqtt-api.html> |
//! | Jobs error responses | <https://docs.aws.amazon.com/iot/latest/developerguide/jobs-api.html> |
//! | notify / notify-next | <https://docs.aws.amazon.com/iot/latest/developerguide/jobs-comm-notifications.html> |
//! | job execution states | <https://docs.aws.amazon.com/iot/latest/developerguide/iot-jobs-lifecycle.html> |
//! | statusDetails / jobId constraints | <https://docs.aws.amazon.com/iot/latest/apireference/API_iot-jobs-data_JobExecutionState.html> |
//!
//! The logic lives in plain types ([`shadow::ShadowStore`], [`jobs::JobStore`]) with unit
//! tests; this file only routes MQTT messages to them and publishes what they answer.
//!
//! Differences from AWS, by design or for lack of documentation:
//! - Responses go through the broker: a device must subscribe to `.../accepted` and
//!   `.../rejected` (AWS delivers Jobs responses to the requester even without a
//!   subscription). Every subscriber of `update/accepted` sees every update, as on AWS.
//! - `update/delta` is published when an accepted update carries a `desired` section and
//!   the shadow's delta is not empty (a reported-only update never triggers one).
//! - An object left empty by `null` deletions is removed; `previous` of the first
//!   `update/documents` is an empty document at version 0.
//! - 429 happens only with [`Options::response_delay`] > 0 (requests held that long are "in
//!   flight", counted per thing) or by [`AwsIot::inject_update_errors`]; 500/503 only by
//!   injection. 401/403 never (no policies).
//! - Jobs: no step timers / TIMED_OUT, no rollouts or retries (`executionNumber` is 1), no
//!   namespaces; `DescribeJobExecution` of a terminal execution is `TerminalStateReached`
//!   (as the ErrorResponse page says).
//! - Time is whole seconds since the epoch.
//!
//! Besides the two services, [`Options::capture`] keeps what arrives on other topics (the
//! change history an IoT rule would route), optionally through a persistent session.
//!
//! Bounds (test-tool caps): 10,000 shadows ([`ShadowLimits::max_shadows`], an update creating
//! one more is a 500), 1,000 things with jobs and 1,000 jobs per thing ([`JobLimits`],
//! `create_job` fails), 1,024 held requests with a response delay (beyond: 429 /
//! `RequestThrottled`), [`CAPTURE_CAP`] captured messages by default (beyond: counted in
//! [`Stats::captured_dropped`]), 4,096 queued outgoing messages (beyond: dropped and counted in
//! [`Stats::responses_dropped`]).

pub mod jobs;
pub mod shadow;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

pub use jobs::{JobCounts, JobExecution, JobLimits, JobStatus, JobStore, JobsOp, JobsOutcome};
pub use shadow::{ShadowCounts, ShadowKey, ShadowLimits, ShadowOp, ShadowStore};

use crate::connect::client_config;
pub use crate::connect::{Connect, TlsFiles};
use crate::{Context, Result};

/// Held requests (with a response delay) beyond which requests are throttled.
const HELD_CAP: usize = 1024;
/// Outgoing messages queued in the MQTT client.
const OUTGOING_CAP: usize = 4096;
/// Default of [`Options::capture_cap`]: captured messages kept; later ones are counted, not
/// kept.
pub const CAPTURE_CAP: usize = 100_000;

/// Emulator settings; `Default` is AWS's limits and answers as fast as possible.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub shadow_limits: ShadowLimits,
    pub job_limits: JobLimits,
    /// Hold every request this long before answering (in order). With a delay, more than
    /// [`Options::max_in_flight`] held requests of one thing are answered 429 (shadow) or
    /// `RequestThrottled` (jobs) at once.
    pub response_delay: Duration,
    /// In-flight requests per thing (AWS: 10); only with a response delay. 0 means 10.
    pub max_in_flight: usize,
    /// Other topic filters to subscribe to and keep what arrives (what an IoT rule on the
    /// change-history topic would see), e.g. `"edgesync/+/changes"`; see [`AwsIot::captured`].
    pub capture: Vec<String>,
    /// Connect with `clean_session = false`, so that the broker queues captured messages
    /// while the emulator is away (across a broker restart only with Mosquitto persistence).
    pub persistent_session: bool,
    /// Captured messages kept; 0 means [`CAPTURE_CAP`].
    pub capture_cap: usize,
}

/// What the emulator saw and did since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub shadow: ShadowCounts,
    pub jobs: JobCounts,
    /// Requests received on shadow topics, and their payload bytes.
    pub shadow_messages_received: u64,
    pub shadow_bytes_received: u64,
    /// Requests received on jobs topics, and their payload bytes.
    pub jobs_messages_received: u64,
    pub jobs_bytes_received: u64,
    /// Connections to the broker (1 + reconnects).
    pub connects: u64,
    /// Messages not published because the client's queue was full.
    pub responses_dropped: u64,
    /// Messages received on [`Options::capture`] topics beyond the cap (not kept).
    pub captured_dropped: u64,
}

/// A request topic, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Shadow(ShadowKey, ShadowOp),
    Jobs(String, JobsOp),
}

/// The emulator's subscriptions: every request topic, never a response topic.
pub const REQUEST_FILTERS: [&str; 10] = [
    "$aws/things/+/shadow/update",
    "$aws/things/+/shadow/get",
    "$aws/things/+/shadow/delete",
    "$aws/things/+/shadow/name/+/update",
    "$aws/things/+/shadow/name/+/get",
    "$aws/things/+/shadow/name/+/delete",
    "$aws/things/+/jobs/get",
    "$aws/things/+/jobs/start-next",
    "$aws/things/+/jobs/+/get",
    "$aws/things/+/jobs/+/update",
];

/// Which service and operation a topic addresses; `None` for anything else.
pub fn parse_topic(topic: &str) -> Option<Route> {
    let rest = topic.strip_prefix("$aws/things/")?;
    let (thing, rest) = rest.split_once('/')?;
    if thing.is_empty() {
        return None;
    }
    let op = |s: &str| match s {
        "update" => Some(ShadowOp::Update),
        "get" => Some(ShadowOp::Get),
        "delete" => Some(ShadowOp::Delete),
        _ => None,
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["shadow", o] => Some(Route::Shadow(ShadowKey::new(thing, None), op(o)?)),
        ["shadow", "name", name, o] if !name.is_empty() => {
            Some(Route::Shadow(ShadowKey::new(thing, Some(name)), op(o)?))
        }
        ["jobs", "get"] => Some(Route::Jobs(thing.into(), JobsOp::GetPending)),
        ["jobs", "start-next"] => Some(Route::Jobs(thing.into(), JobsOp::StartNext)),
        ["jobs", id, "get"] if !id.is_empty() => {
            Some(Route::Jobs(thing.into(), JobsOp::Describe((*id).into())))
        }
        ["jobs", id, "update"] if !id.is_empty() => {
            Some(Route::Jobs(thing.into(), JobsOp::Update((*id).into())))
        }
        _ => None,
    }
}

struct State {
    shadows: ShadowStore,
    jobs: JobStore,
    stats: Stats,
    /// Held requests per thing (with a response delay).
    held: HashMap<String, usize>,
    /// Messages on capture topics, in arrival order.
    captured: Vec<(String, Vec<u8>)>,
}

struct Shared {
    state: Mutex<State>,
    client: AsyncClient,
    /// Subscribed on the current connection.
    ready: AtomicBool,
    dropped: AtomicU64,
    last_error: Mutex<Option<String>>,
    options: Options,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug in this file; the data is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, messages: Vec<(String, Value)>) {
        for (topic, body) in messages {
            let payload = body.to_string().into_bytes();
            if self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, payload)
                .is_err()
            {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Answers one request now.
    fn process(&self, route: &Route, payload: &[u8]) {
        let now = now_secs();
        let messages = {
            let mut st = self.lock();
            match route {
                Route::Shadow(key, op) => {
                    let out = st.shadows.handle(key, *op, payload, now, true);
                    st.stats.shadow.count(*op, &out);
                    shadow_messages(key, out.replies)
                }
                Route::Jobs(thing, op) => {
                    let out = st.jobs.handle(thing, op, payload, now);
                    st.stats.jobs.count(op, &out);
                    jobs_messages(thing, out.replies)
                }
            }
        };
        self.publish(messages);
    }

    /// The immediate answer to a request over the in-flight limit.
    fn throttle(&self, route: &Route, payload: &[u8]) {
        let now = now_secs();
        let token = serde_json::from_slice::<Value>(payload).ok().and_then(|v| {
            v.get("clientToken")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        let mut body = json!({"timestamp": now});
        if let (Some(t), Some(o)) = (token, body.as_object_mut()) {
            o.insert("clientToken".into(), Value::String(t));
        }
        let mut st = self.lock();
        let message = match route {
            Route::Shadow(key, op) => {
                body["code"] = json!(429);
                body["message"] = json!(shadow::error_message(429));
                let suffix = match op {
                    ShadowOp::Update => "update/rejected",
                    ShadowOp::Get => "get/rejected",
                    ShadowOp::Delete => "delete/rejected",
                };
                let out = shadow::Outcome {
                    replies: vec![(suffix, body)],
                    rejected: Some(429),
                    ..Default::default()
                };
                st.stats.shadow.count(*op, &out);
                shadow_messages(key, out.replies)
            }
            Route::Jobs(thing, op) => {
                body["code"] = json!("RequestThrottled");
                body["message"] = json!("Too many in-flight requests");
                let suffix = match op {
                    JobsOp::GetPending => "get/rejected".to_owned(),
                    JobsOp::StartNext => "start-next/rejected".to_owned(),
                    JobsOp::Describe(id) => format!("{id}/get/rejected"),
                    JobsOp::Update(id) => format!("{id}/update/rejected"),
                };
                let out = JobsOutcome {
                    replies: vec![(suffix, body)],
                    rejected: Some("RequestThrottled"),
                };
                st.stats.jobs.count(op, &out);
                jobs_messages(thing, out.replies)
            }
        };
        drop(st);
        self.publish(message);
    }
}

fn shadow_messages(key: &ShadowKey, replies: Vec<(&'static str, Value)>) -> Vec<(String, Value)> {
    let prefix = key.topic_prefix();
    replies
        .into_iter()
        .map(|(suffix, v)| (format!("{prefix}/{suffix}"), v))
        .collect()
}

fn jobs_messages(thing: &str, replies: Vec<(String, Value)>) -> Vec<(String, Value)> {
    replies
        .into_iter()
        .map(|(suffix, v)| (format!("$aws/things/{thing}/jobs/{suffix}"), v))
        .collect()
}

fn thing_of(route: &Route) -> &str {
    match route {
        Route::Shadow(k, _) => &k.thing,
        Route::Jobs(t, _) => t,
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The emulator: an MQTT client on its own thread. Dropping it disconnects and joins.
pub struct AwsIot {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AwsIot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsIot")
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

static INSTANCE: AtomicU64 = AtomicU64::new(0);

impl AwsIot {
    /// Connects, subscribes to every request topic and returns once the broker acknowledged
    /// the subscriptions (10 s at most).
    pub fn start(c: &Connect) -> Result<AwsIot> {
        AwsIot::start_with(c, Options::default())
    }

    /// [`start`](Self::start) with other limits or a response delay.
    pub fn start_with(c: &Connect, options: Options) -> Result<AwsIot> {
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let id = format!("aws-iot-emulator-{}-{n}", std::process::id());
        let mut opts = MqttOptions::new(id, c.host.clone(), c.port);
        opts.set_clean_session(!options.persistent_session);
        opts.set_keep_alive(Duration::from_secs(30));
        // Requests up to the 128 KB broker limit and a bit more (413 must be answerable).
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_inflight(u16::MAX);
        if let Some(tls) = &c.tls {
            let config = client_config(tls)?;
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(config),
            )));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, OUTGOING_CAP);
        // Answers and deltas are small packets: they must not wait for Nagle's algorithm.
        eventloop.network_options.set_tcp_nodelay(true);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context(|| "building the emulator's runtime".into())?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                shadows: ShadowStore::new(options.shadow_limits.clone()),
                jobs: JobStore::new(options.job_limits.clone()),
                stats: Stats::default(),
                held: HashMap::new(),
                captured: Vec::new(),
            }),
            client,
            ready: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            last_error: Mutex::new(None),
            options,
        });
        let (stop, stop_rx) = watch::channel(false);
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("aws-iot-emulator".into())
            .spawn(move || rt.block_on(run(eventloop, s, stop_rx)))
            .context(|| "spawning the emulator thread".into())?;
        let emu = AwsIot {
            shared,
            stop,
            thread: Some(thread),
        };
        let ready = crate::wait_until(Duration::from_secs(10), || emu.is_ready());
        if ready.is_err() {
            let why = emu.last_error().unwrap_or_else(|| "no SUBACK".into());
            return Err(format!(
                "AWS IoT emulator not subscribed on {}:{} within 10 s: {why}",
                c.host, c.port
            )
            .into());
        }
        Ok(emu)
    }

    /// Connected and subscribed (false while the broker is away; true again after the
    /// emulator reconnected and subscribed).
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// The last connection error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The full document as `get/accepted` returns it (`state` with `delta`, `metadata`,
    /// `version`, `timestamp`), or `None` if the shadow does not exist.
    pub fn shadow(&self, thing: &str, name: Option<&str>) -> Option<Value> {
        self.shared
            .lock()
            .shadows
            .document(&ShadowKey::new(thing, name), now_secs())
    }

    /// The shadow's version counter (0 if never created; kept across deletes).
    pub fn shadow_version(&self, thing: &str, name: Option<&str>) -> u64 {
        self.shared
            .lock()
            .shadows
            .version(&ShadowKey::new(thing, name))
    }

    /// A cloud app setting desired state (UpdateThingShadow with `{"state":{"desired":..}}`;
    /// `null` leaves delete): publishes `update/accepted`, `update/documents` and
    /// `update/delta`. Returns the new version, or the rejection (e.g. 413) as an error.
    pub fn update_desired(&self, thing: &str, name: Option<&str>, desired: Value) -> Result<u64> {
        self.update_shadow(thing, name, json!({"state": {"desired": desired}}))
    }

    /// A cloud app's UpdateThingShadow with any request document (`version` for optimistic
    /// locking, `reported`, ...). Injected failures do not apply.
    pub fn update_shadow(&self, thing: &str, name: Option<&str>, request: Value) -> Result<u64> {
        let key = ShadowKey::new(thing, name);
        let payload = request.to_string();
        let (out, messages) = {
            let mut st = self.shared.lock();
            let out = st.shadows.handle(
                &key,
                ShadowOp::Update,
                payload.as_bytes(),
                now_secs(),
                false,
            );
            if out.delta {
                st.stats.shadow.deltas_published += 1;
            }
            let messages = if out.rejected.is_none() {
                shadow_messages(&key, out.replies.clone())
            } else {
                Vec::new()
            };
            (out, messages)
        };
        self.shared.publish(messages);
        match (out.version, out.replies.first()) {
            (Some(v), _) => Ok(v),
            (None, Some((_, body))) => Err(format!("shadow update rejected: {body}").into()),
            (None, None) => Err("shadow update rejected".into()),
        }
    }

    /// A cloud app's DeleteThingShadow: publishes `delete/accepted`; errors if there is no
    /// such shadow.
    pub fn delete_shadow(&self, thing: &str, name: Option<&str>) -> Result<()> {
        let key = ShadowKey::new(thing, name);
        let out = self
            .shared
            .lock()
            .shadows
            .handle(&key, ShadowOp::Delete, b"", now_secs(), false);
        if out.rejected.is_some() {
            return Err(format!("no shadow {key:?}").into());
        }
        self.shared.publish(shadow_messages(&key, out.replies));
        Ok(())
    }

    /// The next `count` device updates of this shadow are rejected with `code` (409, 429,
    /// 500, 503, ...; the documented message of that code); 0 clears.
    pub fn inject_update_errors(&self, thing: &str, name: Option<&str>, code: u16, count: usize) {
        self.shared
            .lock()
            .shadows
            .inject_update_errors(&ShadowKey::new(thing, name), code, count);
    }

    /// CreateJob targeting one thing: a QUEUED execution; publishes `notify` and, if it is
    /// the next one, `notify-next`.
    pub fn create_job(&self, thing: &str, job_id: &str, document: Value) -> Result<()> {
        let out = self
            .shared
            .lock()
            .jobs
            .create(thing, job_id, document, now_secs())?;
        self.job_notifications(thing, out);
        Ok(())
    }

    /// CancelJob for one thing: a pending execution becomes CANCELED.
    pub fn cancel_job(&self, thing: &str, job_id: &str) -> Result<()> {
        let out = self.shared.lock().jobs.cancel(thing, job_id, now_secs())?;
        self.job_notifications(thing, out);
        Ok(())
    }

    fn job_notifications(&self, thing: &str, out: JobsOutcome) {
        self.shared.lock().stats.jobs.count_notifications(&out);
        self.shared.publish(jobs_messages(thing, out.replies));
    }

    /// One job execution as the service holds it.
    pub fn job(&self, thing: &str, job_id: &str) -> Option<JobExecution> {
        self.shared.lock().jobs.get(thing, job_id).cloned()
    }

    /// Every job execution of a thing, in creation order.
    pub fn jobs(&self, thing: &str) -> Vec<JobExecution> {
        self.shared.lock().jobs.executions(thing)
    }

    /// Messages received so far on the [`Options::capture`] topics: `(topic, payload)`, in
    /// arrival order (the first [`Options::capture_cap`]).
    pub fn captured(&self) -> Vec<(String, Vec<u8>)> {
        self.shared.lock().captured.clone()
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        let mut s = self.shared.lock().stats.clone();
        s.responses_dropped = self.shared.dropped.load(Ordering::Relaxed);
        s
    }

    /// Polls `pred` every 10 ms until it holds; fails after `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Self) -> bool) -> Result<()> {
        crate::wait_until(timeout, || pred(self))
    }
}

impl Drop for AwsIot {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn run(mut eventloop: EventLoop, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let delay = shared.options.response_delay;
    let max_in_flight = match shared.options.max_in_flight {
        0 => 10,
        n => n,
    };
    // Held requests are answered in arrival order by one worker.
    let held_tx = if delay.is_zero() {
        None
    } else {
        let (tx, mut rx) = mpsc::channel::<(tokio::time::Instant, Route, Vec<u8>)>(HELD_CAP);
        let s = Arc::clone(&shared);
        tokio::spawn(async move {
            while let Some((due, route, payload)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                s.process(&route, &payload);
                if let Some(n) = s.lock().held.get_mut(thing_of(&route)) {
                    *n = n.saturating_sub(1);
                }
            }
        });
        Some(tx)
    };
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                shared.lock().stats.connects += 1;
                let filters = REQUEST_FILTERS
                    .iter()
                    .map(|f| (*f).to_owned())
                    .chain(shared.options.capture.iter().cloned())
                    .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce));
                if let Err(e) = shared.client.try_subscribe_many(filters) {
                    set_error(&shared, format!("subscribe: {e}"));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
                {
                    shared.ready.store(true, Ordering::Release);
                } else {
                    set_error(
                        &shared,
                        format!("subscription refused: {:?}", ack.return_codes),
                    );
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some(route) = parse_topic(&p.topic) else {
                    let mut st = shared.lock();
                    let cap = match shared.options.capture_cap {
                        0 => CAPTURE_CAP,
                        n => n,
                    };
                    if st.captured.len() < cap {
                        st.captured.push((p.topic.clone(), p.payload.to_vec()));
                    } else {
                        st.stats.captured_dropped += 1;
                    }
                    continue;
                };
                {
                    let mut st = shared.lock();
                    let n = p.payload.len() as u64;
                    match &route {
                        Route::Shadow(..) => {
                            st.stats.shadow_messages_received += 1;
                            st.stats.shadow_bytes_received += n;
                        }
                        Route::Jobs(..) => {
                            st.stats.jobs_messages_received += 1;
                            st.stats.jobs_bytes_received += n;
                        }
                    }
                }
                match &held_tx {
                    None => shared.process(&route, &p.payload),
                    Some(tx) => {
                        let admitted = {
                            let mut st = shared.lock();
                            let held = st.held.entry(thing_of(&route).to_owned()).or_default();
                            if *held >= max_in_flight {
                                false
                            } else {
                                *held += 1;
                                true
                            }
                        };
                        let due = tokio::time::Instant::now() + delay;
                        let queued = admitted
                            && tx
                                .try_send((due, route.clone(), p.payload.to_vec()))
                                .is_ok();
                        if admitted
                            && !queued
                            && let Some(n) = shared.lock().held.get_mut(thing_of(&route))
                        {
                            *n = n.saturating_sub(1);
                        }
                        if !queued {
                            shared.throttle(&route, &p.payload);
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                shared.ready.store(false, Ordering::Release);
                set_error(&shared, e.to_string());
                // rumqttc reconnects on the next poll; do not spin while the broker is away.
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    let _ = shared.client.try_disconnect();
}

fn set_error(shared: &Shared, e: String) {
    *shared.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_route_to_services() {
        assert_eq!(
            parse_topic("$aws/things/pump/shadow/update"),
            Some(Route::Shadow(
                ShadowKey::new("pump", None),
                ShadowOp::Update
            ))
        );
        assert_eq!(
            parse_topic("$aws/things/pump/shadow/name/cfg/delete"),
            Some(Route::Shadow(
                ShadowKey::new("pump", Some("cfg")),
                ShadowOp::Delete
            ))
        );
        assert_eq!(
            parse_topic("$aws/things/pump/jobs/start-next"),
            Some(Route::Jobs("pump".into(), JobsOp::StartNext))
        );
        assert_eq!(
            parse_topic("$aws/things/pump/jobs/$next/get"),
            Some(Route::Jobs("pump".into(), JobsOp::Describe("$next".into())))
        );
        assert_eq!(
            parse_topic("$aws/things/pump/jobs/j1/update"),
            Some(Route::Jobs("pump".into(), JobsOp::Update("j1".into())))
        );
        for t in [
            "$aws/things/pump/shadow/update/accepted",
            "$aws/things/pump/jobs/j1/update/accepted",
            "$aws/things/pump/jobs/notify-next",
            "$aws/things//shadow/get",
            "other/pump/shadow/get",
            "$aws/things/pump/shadow/name//get",
        ] {
            assert_eq!(parse_topic(t), None, "{t}");
        }
    }
}
