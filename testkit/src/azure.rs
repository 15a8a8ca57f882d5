//! An Azure IoT Hub emulator for **one device**: device twin, desired-property notifications,
//! direct methods, cloud-to-device and device-to-cloud messages, played by an MQTT client of a
//! real broker (Mosquitto) on IoT Hub's topics (`$iothub/...`, `devices/{id}/messages/...`).
//! Written from Microsoft's documentation (no Microsoft code):
//!
//! | behaviour | page |
//! | --- | --- |
//! | CONNECT (client id, user name, api-version `2021-04-12`), keep-alive, QoS, retain, will, one connection per device, 5 subscriptions, twin/method/C2D/D2C topics and status codes | <https://learn.microsoft.com/azure/iot/iot-mqtt-connect-to-iot-hub> |
//! | twin sections, key/value rules, depth 10, 32 KB per section and how it is computed, versions, reconnection flow (no notifications kept for a disconnected device) | <https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-device-twins> |
//! | direct methods: QoS 0 requests, timeout 30 s default / 3600 s max, 128 KB payloads, 404 for a device not connected | <https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-direct-methods> |
//! | 504101 GatewayTimeout (no answer in time) / 404103 DeviceNotOnline | <https://learn.microsoft.com/azure/iot-hub/iot-hub-troubleshoot-error-504101-gatewaytimeout>, <https://learn.microsoft.com/azure/iot-hub/iot-hub-troubleshoot-error-404103-devicenotonline> |
//! | C2D: `to` = `/devices/{id}/messages/devicebound`, 50 queued per device, at-least-once, MQTT cannot reject/abandon | <https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-messages-c2d> |
//! | message ids, property character sets, message size = body + system property values + application property names and values | <https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-messages-construct> |
//! | 256 KB D2C, 64 KB C2D, 128 KB method payloads, 32 KB twin sections, 429 when throttled | <https://learn.microsoft.com/azure/iot-hub/iot-hub-devguide-quotas-throttling> |
//!
//! The logic lives in plain types ([`twin::TwinStore`], [`topics`]) with unit tests; this file
//! only routes MQTT messages to them and publishes what they answer.
//!
//! ## Documented facts a device (the agent's `azure-iot-hub` profile) relies on
//! - CONNECT: client id = device id; user name `{hub host}/{device id}/?api-version=2021-04-12`
//!   (the version the MQTT page gives; "recommended to include api-version ... otherwise it
//!   could cause unexpected behaviors"); X.509: no password. MQTT 3.1.1 only (TLS, port 8883).
//! - Keep-alive: the hub times out after 1.5 × the client's keep-alive, capped at 1767 s, so the
//!   largest usable keep-alive is 1177 s ([`MAX_KEEP_ALIVE_SECS`]).
//! - QoS 0 and 1 only: a QoS 2 publish closes the connection; a QoS 2 subscription is granted 1.
//! - RETAIN is not kept: the message passes to the back end with the `mqtt-retain` application
//!   property. There is no retained online status: IoT Hub has its own connection state
//!   (device connected/disconnected events). A will on `devices/{id}/messages/events/` is
//!   forwarded as telemetry with `iothub-MessageType=Will`.
//! - One connection per device (a new one drops the old); at most 5 subscriptions.
//! - No in-flight limit for MQTT 3.1.1 found in the docs; throttles are per hub (twin reads
//!   100/s, twin updates 50/s on S1) and answered `429`.
//! - Twin GET → `200` (`$iothub/twin/res/200/?$rid=N`, body
//!   `{"desired":{..,"$version":D},"reported":{..,"$version":R}}`), `429`, `5xx`. PATCH →
//!   `204` with `&$version=R` in the topic, `400` malformed, `429`, `5xx`. Section over 32 KB:
//!   rejected (status not on the MQTT page: 400 here, [`TwinLimits::oversize_status`]).
//! - Desired notifications (`$iothub/twin/PATCH/properties/desired/?$version=D`, body = the
//!   patch with `null` deletions plus `"$version"`) are sent only while the device is connected:
//!   after every connect, subscribe then GET, and ignore notifications with `$version` ≤ the
//!   GET's.
//! - Direct methods: request on `$iothub/methods/POST/{name}/?$rid=R` (QoS 0, JSON or empty
//!   body), answer on `$iothub/methods/res/{status}/?$rid=R` (JSON or empty body, integer
//!   status). The caller gets 404 (404103) for a device not connected, 504 (504101) when the
//!   device does not answer within the timeout.
//! - C2D: subscribe `devices/{id}/messages/devicebound/#`; with CleanSession 0 the
//!   subscription persists and messages sent while offline arrive on reconnect (QoS 1). The
//!   topic's property bag holds `$.mid` (message id), `$.to`, other user-settable system
//!   properties and the application properties, URL-encoded (IoT Hub encodes `$` as `%24`).
//! - D2C: `devices/{id}/messages/events/{property bag}`, e.g. `$.ct=application%2Fjson&$.ce=utf-8`
//!   (content type and encoding, needed for routing on the body); at most 256 KB.
//!
//! ## How the emulator plays it, and where it differs from IoT Hub (by design)
//! - Mosquitto cannot tell which client published on `$iothub/...`; IoT Hub knows the device
//!   from the connection. So one emulator serves one device ([`Options::device`]) and answers
//!   every twin request and method response on the broker as that device's.
//! - Responses go through the broker: the device must subscribe to `$iothub/twin/res/#`
//!   (as on IoT Hub). Twin responses, desired notifications and method requests are published
//!   QoS 0, so Mosquitto drops them for a device that is offline even with a persistent
//!   session (`queue_qos0_messages` is off by default): that is how "notifications only while
//!   connected" is played. C2D messages are QoS 1, so Mosquitto queues them in the device's
//!   persistent session (not across a broker restart without Mosquitto persistence).
//! - The emulator cannot see whether the device is connected: a method without an answer is
//!   always 504 (504101), never 404 (404103). It cannot see QoS 2 publishes (Mosquitto
//!   downgrades them) nor close the device's connection; RETAIN is only visible on a retained
//!   message Mosquitto delivers when the emulator subscribes (kept with `mqtt-retain=true` and
//!   counted in [`Stats::events_retained`]): Mosquitto keeps retained messages, IoT Hub does not.
//! - The CONNECT is checked from Mosquitto's log ([`IotHub::check_connect_log`]); the broker
//!   must keep the device's user name ([`crate::MosquittoOptions::identity_as_username`]
//!   `false`). The 5-subscription limit is not enforced.
//! - No `$metadata`/`$lastUpdated`, no tags, no etag, no `if-version`; both `$version`s start
//!   at 1 (as a new device's twin shows). Objects emptied by `null` deletions stay as `{}`.
//! - 429 only on demand ([`IotHub::throttle_twin`]) or when more than 1,024 requests are held
//!   by [`Options::response_delay`]; 5xx only by injection. No daily quota, no rate throttles.
//! - The C2D queue limit (50 per device) and expiry/feedback are not played (Mosquitto's queue
//!   holds them); C2D message ids and properties are checked against the documented character
//!   sets and the 64 KB size.
//! - D2C events over 256 KB are not kept and are counted in [`Stats::events_oversize`] (IoT Hub
//!   would refuse them and drop the connection); a malformed property bag likewise in
//!   [`Stats::events_malformed`].
//!
//! Bounds (test-tool caps): [`EVENT_CAP`] kept events by default (beyond: counted in
//! [`Stats::events_dropped`]), 1,024 held twin requests (beyond: 429), 1,024 method calls
//! waiting for an answer (beyond: 429), 4,096 queued outgoing messages (beyond: dropped and
//! counted in [`Stats::responses_dropped`]).

pub mod topics;
pub mod twin;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

pub use crate::connect::{Connect, TlsFiles};
pub use topics::{ConnectRecord, DeviceTopic};
pub use twin::{HubError, TwinLimits, TwinOp, TwinReply, TwinStore};

use crate::connect::client_config;
use crate::{Context, Result};

/// The api-version of the user name, as the MQTT page gives it.
pub const API_VERSION: &str = "2021-04-12";
/// The largest client keep-alive IoT Hub tolerates (1767 s / 1.5).
pub const MAX_KEEP_ALIVE_SECS: u32 = 1177;
/// Device-to-cloud message size limit.
pub const MAX_D2C_BYTES: usize = 256 * 1024;
/// Cloud-to-device message size limit.
pub const MAX_C2D_BYTES: usize = 64 * 1024;
/// Direct method payload limit.
pub const MAX_METHOD_PAYLOAD_BYTES: usize = 128 * 1024;
/// Longest direct method timeout.
pub const MAX_METHOD_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default of [`Options::event_cap`].
pub const EVENT_CAP: usize = 100_000;
/// Held twin requests (with a response delay) beyond which requests are throttled.
const HELD_CAP: usize = 1024;
/// Method calls waiting for an answer.
const PENDING_CAP: usize = 1024;
/// Outgoing messages queued in the MQTT client.
const OUTGOING_CAP: usize = 4096;

/// Emulator settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// The one device this hub serves (its client id and the `devices/{id}/...` topics).
    pub device: String,
    /// The hub's host name, e.g. `edgesync-test.azure-devices.net` (the user name's prefix).
    pub hub: String,
    pub limits: TwinLimits,
    /// Hold every twin answer this long (in order); more than 1,024 held requests are
    /// answered 429 at once.
    pub response_delay: Duration,
    /// Connect with `clean_session = false` under a fixed client id, so that the broker queues
    /// device-to-cloud events (and twin requests) while the emulator is away (across a broker
    /// restart only with Mosquitto persistence).
    pub persistent_session: bool,
    /// Device-to-cloud events kept; 0 means [`EVENT_CAP`].
    pub event_cap: usize,
}

impl Options {
    /// IoT Hub's limits, immediate answers, a clean session.
    pub fn new(device: &str, hub: &str) -> Options {
        Options {
            device: device.to_owned(),
            hub: hub.to_owned(),
            limits: TwinLimits::default(),
            response_delay: Duration::ZERO,
            persistent_session: false,
            event_cap: 0,
        }
    }
}

/// A device-to-cloud message as the back end would read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct D2c {
    pub topic: String,
    /// The decoded property bag, in topic order (`$.ct`, `$.ce`, application properties, ...).
    pub properties: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl D2c {
    /// The first property of that name.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The device's answer to a direct method.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResponse {
    pub status: i32,
    /// The JSON body (`Null` for an empty one).
    pub payload: Value,
}

/// What the emulator saw and did since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Twin GET requests received, and those answered with an error, by status.
    pub twin_gets: u64,
    pub gets_rejected: BTreeMap<u16, u64>,
    /// Reported PATCH requests received, accepted, and rejected by status.
    pub twin_patches: u64,
    pub patches_accepted: u64,
    pub patches_rejected: BTreeMap<u16, u64>,
    /// Messages on `$iothub/...` request topics that could not be answered (no `$rid`, a
    /// method status that is not an integer).
    pub bad_requests: u64,
    /// Desired-property notifications published (delivered only if the device is connected).
    pub desired_notifications: u64,
    pub methods_invoked: u64,
    pub methods_answered: u64,
    pub methods_timed_out: u64,
    /// Method answers with an unknown or expired `$rid`.
    pub methods_unmatched: u64,
    pub c2d_sent: u64,
    /// Device-to-cloud events kept, beyond the cap (counted, not kept), over 256 KB (not
    /// kept), with a malformed property bag (not kept), with RETAIN (kept).
    pub events_kept: u64,
    pub events_dropped: u64,
    pub events_oversize: u64,
    pub events_malformed: u64,
    pub events_retained: u64,
    /// Connections to the broker (1 + reconnects).
    pub connects: u64,
    /// Messages not published because the client's queue was full.
    pub responses_dropped: u64,
}

/// The emulator's subscriptions: every device-to-service topic of its device.
pub fn request_filters(device: &str) -> [String; 4] {
    [
        "$iothub/twin/GET/#".to_owned(),
        "$iothub/twin/PATCH/properties/reported/#".to_owned(),
        "$iothub/methods/res/#".to_owned(),
        format!("devices/{device}/messages/events/#"),
    ]
}

struct State {
    twin: TwinStore,
    stats: Stats,
    events: Vec<D2c>,
    /// Method calls waiting for the device, by `$rid`.
    pending: HashMap<String, std_mpsc::SyncSender<std::result::Result<MethodResponse, HubError>>>,
    /// Held twin requests (with a response delay).
    held: usize,
    last_rejection: Option<(u16, String)>,
}

struct Shared {
    state: Mutex<State>,
    client: AsyncClient,
    /// Subscribed on the current connection.
    ready: AtomicBool,
    dropped: AtomicU64,
    next_rid: AtomicU64,
    last_error: Mutex<Option<String>>,
    options: Options,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug in this file; the data is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, topic: String, qos: QoS, payload: Vec<u8>) -> bool {
        let queued = self.client.try_publish(topic, qos, false, payload).is_ok();
        if !queued {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queued
    }

    /// Answers one twin request now.
    fn answer_twin(&self, op: TwinOp, rid: &str, payload: &[u8]) {
        let reply = {
            let mut st = self.lock();
            let reply = st.twin.handle(op, payload);
            count_twin(&mut st, op, &reply);
            reply
        };
        self.send_twin_reply(rid, reply);
    }

    /// The immediate 429 to a request beyond the held cap.
    fn throttle(&self, op: TwinOp, rid: &str) {
        let reply = TwinReply {
            status: 429,
            body: None,
            version: None,
            reason: Some(format!("more than {HELD_CAP} requests held")),
        };
        count_twin(&mut self.lock(), op, &reply);
        self.send_twin_reply(rid, reply);
    }

    fn send_twin_reply(&self, rid: &str, reply: TwinReply) {
        let topic = topics::twin_response_topic(reply.status, rid, reply.version);
        let body = reply.body.map(|b| b.to_string().into_bytes());
        self.publish(topic, QoS::AtMostOnce, body.unwrap_or_default());
    }

    fn keep_event(&self, topic: &str, properties: Vec<(String, String)>, payload: &[u8]) {
        let mut st = self.lock();
        if topics::message_size(&properties, payload) > MAX_D2C_BYTES {
            st.stats.events_oversize += 1;
            st.last_rejection = Some((413, format!("event of over 256 KB on {topic}")));
            return;
        }
        let cap = match self.options.event_cap {
            0 => EVENT_CAP,
            n => n,
        };
        if st.events.len() < cap {
            st.events.push(D2c {
                topic: topic.to_owned(),
                properties,
                payload: payload.to_vec(),
            });
            st.stats.events_kept += 1;
        } else {
            st.stats.events_dropped += 1;
        }
    }

    fn method_answered(&self, status: i32, rid: &str, payload: &[u8]) {
        let mut st = self.lock();
        let Some(tx) = st.pending.remove(rid) else {
            st.stats.methods_unmatched += 1;
            return;
        };
        let answer = if payload.iter().all(u8::is_ascii_whitespace) {
            Ok(MethodResponse {
                status,
                payload: Value::Null,
            })
        } else {
            serde_json::from_slice::<Value>(payload)
                .map(|payload| MethodResponse { status, payload })
                .map_err(|e| HubError::new(400, format!("the device's answer is not JSON: {e}")))
        };
        // The caller may have given up at this very moment: then nobody reads it.
        let _ = tx.try_send(answer);
    }
}

fn count_twin(st: &mut State, op: TwinOp, reply: &TwinReply) {
    let rejected = (reply.status >= 300).then_some(reply.status);
    match (op, rejected) {
        (TwinOp::Get, None) => {}
        (TwinOp::Get, Some(s)) => *st.stats.gets_rejected.entry(s).or_default() += 1,
        (TwinOp::PatchReported, None) => st.stats.patches_accepted += 1,
        (TwinOp::PatchReported, Some(s)) => *st.stats.patches_rejected.entry(s).or_default() += 1,
    }
    if let (Some(s), Some(r)) = (rejected, &reply.reason) {
        st.last_rejection = Some((s, r.clone()));
    }
}

/// The status of a [`HubError`] inside a testkit error (e.g. 504 from
/// [`IotHub::invoke_method`]).
pub fn hub_status(e: &crate::Error) -> Option<u16> {
    e.downcast_ref::<HubError>().map(|h| h.status)
}

/// The emulator: an MQTT client on its own thread. Dropping it disconnects and joins.
pub struct IotHub {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for IotHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IotHub")
            .field("device", &self.shared.options.device)
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl IotHub {
    /// Connects, subscribes to the device's request topics and returns once the broker
    /// acknowledged the subscriptions (10 s at most).
    pub fn start(c: &Connect, options: Options) -> Result<IotHub> {
        if options.device.is_empty() || options.hub.is_empty() {
            return Err("IoT Hub emulator: device and hub must not be empty".into());
        }
        if options.device.contains(['/', '+', '#']) {
            return Err(format!("device id {:?} cannot be a topic level", options.device).into());
        }
        // Fixed per device, so that a persistent session survives an emulator restart.
        let id = format!("iothub-emulator-{}", options.device);
        let mut opts = MqttOptions::new(id, c.host.clone(), c.port);
        opts.set_clean_session(!options.persistent_session);
        opts.set_keep_alive(Duration::from_secs(30));
        // Events up to the 256 KB limit and well beyond (oversize ones must be countable).
        opts.set_max_packet_size(4 << 20, 4 << 20);
        opts.set_inflight(u16::MAX);
        if let Some(tls) = &c.tls {
            let config = client_config(tls)?;
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(config),
            )));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, OUTGOING_CAP);
        // Answers are small packets: they must not wait for Nagle's algorithm.
        eventloop.network_options.set_tcp_nodelay(true);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context(|| "building the emulator's runtime".into())?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                twin: TwinStore::new(options.limits.clone()),
                stats: Stats::default(),
                events: Vec::new(),
                pending: HashMap::new(),
                held: 0,
                last_rejection: None,
            }),
            client,
            ready: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            next_rid: AtomicU64::new(1),
            last_error: Mutex::new(None),
            options,
        });
        let (stop, stop_rx) = watch::channel(false);
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("iothub-emulator".into())
            .spawn(move || rt.block_on(run(eventloop, s, stop_rx)))
            .context(|| "spawning the emulator thread".into())?;
        let hub = IotHub {
            shared,
            stop,
            thread: Some(thread),
        };
        let ready = crate::wait_until(Duration::from_secs(10), || hub.is_ready());
        if ready.is_err() {
            let why = hub.last_error().unwrap_or_else(|| "no SUBACK".into());
            return Err(format!(
                "IoT Hub emulator not subscribed on {}:{} within 10 s: {why}",
                c.host, c.port
            )
            .into());
        }
        Ok(hub)
    }

    pub fn device(&self) -> &str {
        &self.shared.options.device
    }

    pub fn hub(&self) -> &str {
        &self.shared.options.hub
    }

    /// The user name the device should send: `{hub}/{device}/?api-version=2021-04-12`.
    pub fn username(&self) -> String {
        format!(
            "{}/{}/?api-version={API_VERSION}",
            self.shared.options.hub, self.shared.options.device
        )
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

    /// The last rejected request or event: its status and why.
    pub fn last_rejection(&self) -> Option<(u16, String)> {
        self.shared.lock().last_rejection.clone()
    }

    /// The twin as the service reads it: `{"deviceId":..,"properties":{"desired":{..,
    /// "$version"},"reported":{..,"$version"}}}`.
    pub fn twin(&self) -> Value {
        json!({
            "deviceId": self.shared.options.device,
            "properties": self.shared.lock().twin.properties(),
        })
    }

    /// `reported` with its `$version`.
    pub fn reported(&self) -> Value {
        self.shared.lock().twin.reported_section()
    }

    /// `desired` with its `$version`.
    pub fn desired(&self) -> Value {
        self.shared.lock().twin.desired_section()
    }

    pub fn desired_version(&self) -> u64 {
        self.shared.lock().twin.desired_version()
    }

    pub fn reported_version(&self) -> u64 {
        self.shared.lock().twin.reported_version()
    }

    /// The back end's partial update of `desired` (`null` deletes): returns the new desired
    /// version and publishes the notification (QoS 0: a device that is not connected never
    /// gets it). A rejection (400) is a [`HubError`].
    pub fn update_desired(&self, patch: Value) -> Result<u64> {
        let out = self.shared.lock().twin.update_desired(&patch);
        self.notify_desired(out)
    }

    /// The back end's "replace desired properties": the notification carries the whole new
    /// document.
    pub fn replace_desired(&self, desired: Value) -> Result<u64> {
        let out = self.shared.lock().twin.replace_desired(&desired);
        self.notify_desired(out)
    }

    fn notify_desired(&self, out: std::result::Result<(u64, Value), HubError>) -> Result<u64> {
        let (version, body) = out?;
        if self.shared.publish(
            topics::desired_patch_topic(version),
            QoS::AtMostOnce,
            body.to_string().into_bytes(),
        ) {
            self.shared.lock().stats.desired_notifications += 1;
        }
        Ok(version)
    }

    /// The next `count` twin requests of the device (GET or PATCH) are answered 429 and
    /// change nothing; 0 clears.
    pub fn throttle_twin(&self, count: usize) {
        self.inject_twin_errors(429, count);
    }

    /// The next `count` twin requests are answered `code` (429, 500, 503, ...); 0 clears.
    pub fn inject_twin_errors(&self, code: u16, count: usize) {
        self.shared.lock().twin.inject(code, count);
    }

    /// Invokes a direct method and waits for the device's answer. `Null` payload: an empty
    /// request body. No answer within `timeout`: a [`HubError`] 504 (504101 GatewayTimeout);
    /// a bad name, payload over 128 KB or timeout over 3600 s: 400; too many calls waiting: 429.
    pub fn invoke_method(
        &self,
        name: &str,
        payload: Value,
        timeout: Duration,
    ) -> Result<MethodResponse> {
        topics::check_method_name(name).map_err(|m| HubError::new(400, m))?;
        if timeout > MAX_METHOD_TIMEOUT {
            return Err(HubError::new(400, "method timeout over 3600 s").into());
        }
        let body = match &payload {
            Value::Null => Vec::new(),
            v => v.to_string().into_bytes(),
        };
        if body.len() > MAX_METHOD_PAYLOAD_BYTES {
            return Err(HubError::new(400, "method payload over 128 KB").into());
        }
        let rid = self
            .shared
            .next_rid
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        let (tx, rx) = std_mpsc::sync_channel(1);
        {
            let mut st = self.shared.lock();
            if st.pending.len() >= PENDING_CAP {
                return Err(HubError::new(429, "too many method calls waiting").into());
            }
            st.pending.insert(rid.clone(), tx);
            st.stats.methods_invoked += 1;
        }
        let topic = topics::method_request_topic(name, &rid);
        if !self.shared.publish(topic, QoS::AtMostOnce, body) {
            self.shared.lock().pending.remove(&rid);
            return Err("the emulator's outgoing queue is full".into());
        }
        match rx.recv_timeout(timeout) {
            Ok(answer) => {
                self.shared.lock().stats.methods_answered += 1;
                Ok(answer?)
            }
            Err(_) => {
                let mut st = self.shared.lock();
                st.pending.remove(&rid);
                st.stats.methods_timed_out += 1;
                Err(HubError::new(
                    504,
                    format!("504101 GatewayTimeout: no answer to {name:?} within {timeout:?}"),
                )
                .into())
            }
        }
    }

    /// Sends a cloud-to-device message (QoS 1) to
    /// `devices/{device}/messages/devicebound/%24.mid={id}&%24.to=..&{properties}`. Ids,
    /// property names and values must fit the documented character sets, the message 64 KB
    /// (400 otherwise).
    pub fn send_c2d(
        &self,
        message_id: &str,
        body: Vec<u8>,
        properties: &[(&str, &str)],
    ) -> Result<()> {
        topics::check_message_id(message_id).map_err(|m| HubError::new(400, m))?;
        for (k, v) in properties {
            topics::check_c2d_property(k).map_err(|m| HubError::new(400, m))?;
            topics::check_c2d_property(v).map_err(|m| HubError::new(400, m))?;
        }
        let size = body.len()
            + message_id.len()
            + properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        if size > MAX_C2D_BYTES {
            return Err(
                HubError::new(400, format!("C2D message of {size} bytes over 64 KB")).into(),
            );
        }
        let topic = topics::c2d_topic(&self.shared.options.device, message_id, properties);
        if !self.shared.publish(topic, QoS::AtLeastOnce, body) {
            return Err("the emulator's outgoing queue is full".into());
        }
        self.shared.lock().stats.c2d_sent += 1;
        Ok(())
    }

    /// Device-to-cloud events kept so far, in arrival order (the first
    /// [`Options::event_cap`]).
    pub fn events(&self) -> Vec<D2c> {
        self.shared.lock().events.clone()
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        let mut s = self.shared.lock().stats.clone();
        s.responses_dropped = self.shared.dropped.load(Ordering::Relaxed);
        s
    }

    /// Every CONNECT of the device in a Mosquitto log, oldest first.
    pub fn device_connects(&self, log: &str) -> Vec<ConnectRecord> {
        topics::connect_records(log, &self.shared.options.device)
    }

    /// Checks the device's last CONNECT in a Mosquitto log ([`crate::Mosquitto::log`]): client
    /// id = device id, MQTT 3.1.1, user name `{hub}/{device}/?api-version=YYYY-MM-DD`,
    /// keep-alive within 1177 s. Returns the record; [`topics::check_username`] gives the
    /// api-version.
    pub fn check_connect_log(&self, log: &str) -> Result<ConnectRecord> {
        let o = &self.shared.options;
        let Some(record) = self.device_connects(log).pop() else {
            return Err(format!("no CONNECT with client id {:?} in the log", o.device).into());
        };
        if record.protocol != 2 {
            return Err(format!(
                "the device connected with MQTT protocol {} (Mosquitto's number; 2 is 3.1.1)",
                record.protocol
            )
            .into());
        }
        let Some(user) = &record.username else {
            return Err("the device sent no user name (or the broker replaced it: \
                 set MosquittoOptions::identity_as_username = false)"
                .into());
        };
        topics::check_username(user, &o.hub, &o.device)?;
        if record.keep_alive_secs > MAX_KEEP_ALIVE_SECS {
            return Err(format!(
                "keep-alive {} s over IoT Hub's {MAX_KEEP_ALIVE_SECS} s",
                record.keep_alive_secs
            )
            .into());
        }
        Ok(record)
    }

    /// Polls `pred` every 10 ms until it holds; fails after `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Self) -> bool) -> Result<()> {
        crate::wait_until(timeout, || pred(self))
    }
}

impl Drop for IotHub {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn run(mut eventloop: EventLoop, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let delay = shared.options.response_delay;
    // Held requests are answered in arrival order by one worker.
    let held_tx = if delay.is_zero() {
        None
    } else {
        let (tx, mut rx) =
            mpsc::channel::<(tokio::time::Instant, TwinOp, String, Vec<u8>)>(HELD_CAP);
        let s = Arc::clone(&shared);
        tokio::spawn(async move {
            while let Some((due, op, rid, payload)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                s.answer_twin(op, &rid, &payload);
                let mut st = s.lock();
                st.held = st.held.saturating_sub(1);
            }
        });
        Some(tx)
    };
    let device = shared.options.device.clone();
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                shared.lock().stats.connects += 1;
                let filters = request_filters(&device)
                    .into_iter()
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
                let route = match topics::parse_device_topic(&device, &p.topic) {
                    Ok(Some(r)) => r,
                    Ok(None) => continue,
                    Err(why) => {
                        let mut st = shared.lock();
                        if p.topic.starts_with("devices/") {
                            st.stats.events_malformed += 1;
                        } else {
                            st.stats.bad_requests += 1;
                        }
                        st.last_rejection = Some((400, why));
                        continue;
                    }
                };
                let (op, rid) = match route {
                    DeviceTopic::Event { mut properties } => {
                        if p.retain {
                            properties.push(("mqtt-retain".into(), "true".into()));
                            shared.lock().stats.events_retained += 1;
                        }
                        shared.keep_event(&p.topic, properties, &p.payload);
                        continue;
                    }
                    DeviceTopic::MethodResponse { status, rid } => {
                        shared.method_answered(status, &rid, &p.payload);
                        continue;
                    }
                    DeviceTopic::TwinGet { rid } => (TwinOp::Get, rid),
                    DeviceTopic::TwinPatchReported { rid } => (TwinOp::PatchReported, rid),
                };
                {
                    let mut st = shared.lock();
                    match op {
                        TwinOp::Get => st.stats.twin_gets += 1,
                        TwinOp::PatchReported => st.stats.twin_patches += 1,
                    }
                }
                match &held_tx {
                    None => shared.answer_twin(op, &rid, &p.payload),
                    Some(tx) => {
                        let admitted = {
                            let mut st = shared.lock();
                            let ok = st.held < HELD_CAP;
                            if ok {
                                st.held += 1;
                            }
                            ok
                        };
                        let due = tokio::time::Instant::now() + delay;
                        let queued = admitted
                            && tx
                                .try_send((due, op, rid.clone(), p.payload.to_vec()))
                                .is_ok();
                        if admitted && !queued {
                            let mut st = shared.lock();
                            st.held = st.held.saturating_sub(1);
                        }
                        if !queued {
                            shared.throttle(op, &rid);
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
